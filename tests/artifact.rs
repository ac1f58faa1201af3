//! Artifact fetching against a real HTTP server on loopback (tiny_http in a thread,
//! counting every request it receives) and real minisign keys made at test time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchbook::config::Config;
use patchbook::primitives::artifact::{
    fetch, fetch_recorded, ArtifactError, ArtifactSettings, ArtifactSpec, AttemptFailure,
};
use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What the test server sends for one request.
enum Reply {
    Body(Vec<u8>),
    /// A body that never ends; the counter holds how many bytes were handed out.
    Endless(Arc<AtomicU64>),
    Status(u16),
    Redirect(String),
}

struct Endless(Arc<AtomicU64>);

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        buf.fill(b'x');
        self.0.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(buf.len())
    }
}

type Handler = dyn Fn(&str, usize) -> Reply + Send + Sync;

/// A loopback HTTP server that records the path of every request. Stopped on drop.
struct TestServer {
    server: Arc<tiny_http::Server>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
    base: String,
}

impl TestServer {
    /// `handler(path, n)` gets the request path and how many requests came before.
    fn start(handler: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let server = server.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    let path = req.url().to_string();
                    let n = {
                        let mut r = requests.lock().unwrap();
                        r.push(path.clone());
                        r.len() - 1
                    };
                    // A client that cuts the body off makes the write fail; that is
                    // the point of some tests, not an error here.
                    let _ = match handler(&path, n) {
                        Reply::Body(b) => req.respond(tiny_http::Response::from_data(b)),
                        Reply::Endless(counter) => req.respond(tiny_http::Response::new(
                            tiny_http::StatusCode(200),
                            vec![],
                            Endless(counter),
                            None,
                            None,
                        )),
                        Reply::Redirect(to) => req.respond(
                            tiny_http::Response::empty(tiny_http::StatusCode(302)).with_header(
                                tiny_http::Header::from_bytes("Location", to.as_bytes()).unwrap(),
                            ),
                        ),
                        Reply::Status(code) => {
                            req.respond(tiny_http::Response::empty(tiny_http::StatusCode(code)))
                        }
                    };
                }
            })
        };
        TestServer {
            server,
            requests,
            thread: Some(thread),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn hits_on(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn settings(state: &Path, trusted: &[String]) -> ArtifactSettings {
    ArtifactSettings {
        trusted_sources: trusted.to_vec(),
        base_dir: state.to_path_buf(),
        cache_dir: state.join("cache").join("artifacts"),
        attempts: 3,
        public_keys: vec![],
        timeout: Duration::from_secs(10),
    }
}

fn spec(url: String, body: &[u8]) -> ArtifactSpec {
    ArtifactSpec {
        url,
        sha256: sha(body),
        size: None,
        signature: None,
    }
}

/// Files in the cache folder, temp files included.
fn cache_entries(s: &ArtifactSettings) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&s.cache_dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const GOOD: &[u8] = b"acme-agent 1.0.1 package bytes\n";

#[test]
fn wrong_checksum_is_downloaded_again_then_refused() {
    let srv = TestServer::start(|_, _| Reply::Body(b"tampered bytes".to_vec()));
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/pool/")]);
    let mut checks = Vec::new();
    let err = fetch_recorded(&spec(srv.url("/pool/a.deb"), GOOD), &s, &mut checks).unwrap_err();

    assert_eq!(srv.hits(), 3, "one request per attempt");
    match &err {
        ArtifactError::Exhausted {
            attempts,
            last: AttemptFailure::Checksum {
                expected, actual, ..
            },
            ..
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(expected, &sha(GOOD));
            assert_eq!(actual, &sha(b"tampered bytes"));
        }
        other => panic!("expected a checksum failure, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&sha(GOOD)) && msg.contains(&sha(b"tampered bytes")),
        "{msg}"
    );
    assert!(msg.contains("3 attempt"), "{msg}");
    let failed: Vec<_> = checks.iter().filter(|c| c.what == "download").collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|c| !c.ok));
    assert!(cache_entries(&s).is_empty(), "{:?}", cache_entries(&s));
}

#[test]
fn corrupt_first_then_good_is_accepted_on_retry() {
    let srv = TestServer::start(|_, n| {
        if n == 0 {
            Reply::Body(b"acme-agent 1.0.1 package bytez\n".to_vec())
        } else {
            Reply::Body(GOOD.to_vec())
        }
    });
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/pool/")]);
    let a = fetch(&spec(srv.url("/pool/a.deb"), GOOD), &s).unwrap();

    assert_eq!(srv.hits(), 2);
    assert_eq!(a.downloads, 2);
    assert!(!a.from_cache);
    assert_eq!(a.path, s.cache_dir.join(sha(GOOD)));
    assert_eq!(std::fs::read(&a.path).unwrap(), GOOD);
    assert_eq!(a.bytes, GOOD.len() as u64);
    let downloads: Vec<bool> = a
        .checks
        .iter()
        .filter(|c| c.what == "download")
        .map(|c| c.ok)
        .collect();
    assert_eq!(downloads, vec![false, true]);
    assert_eq!(
        cache_entries(&s),
        vec![sha(GOOD), format!("{}.sources.json", sha(GOOD))],
        "the entry and the list of its sources, no temp files left"
    );
}

#[test]
fn untrusted_urls_are_refused_without_a_request() {
    let srv = TestServer::start(|_, _| Reply::Body(GOOD.to_vec()));
    let state = tempfile::tempdir().unwrap();
    let port = srv.base.rsplit(':').next().unwrap().to_string();
    let s = settings(
        state.path(),
        &[
            srv.url("/pool/"),
            "https://mirror.example.com/pool/".to_string(),
        ],
    );
    for url in [
        srv.url("/other/a.deb"),
        srv.url("/poolx/a.deb"),
        srv.url("/pool/../other/a.deb"),
        srv.url("/pool/%2e%2e/other/a.deb"),
        srv.url("/pool/..%2Fother/a.deb"),
        format!("http://localhost:{port}/pool/a.deb"),
        "https://mirror.example.com.evil.net/pool/a.deb".to_string(),
        "/etc/passwd".to_string(),
    ] {
        let err = fetch(&spec(url.clone(), GOOD), &s).unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::Untrusted { .. } | ArtifactError::InvalidSpec { .. }
            ),
            "{url}: {err:?}"
        );
    }
    // A trusted artifact whose signature lives elsewhere is refused before either is fetched.
    let mut with_sig = spec(srv.url("/pool/a.deb"), GOOD);
    with_sig.signature = Some(srv.url("/keys/a.deb.minisig"));
    let err = fetch(&with_sig, &s).unwrap_err();
    assert!(matches!(err, ArtifactError::Untrusted { .. }), "{err:?}");

    let empty = settings(state.path(), &[]);
    let err = fetch(&spec(srv.url("/pool/a.deb"), GOOD), &empty).unwrap_err();
    assert!(err.to_string().contains("trusted_sources"), "{err}");

    assert_eq!(srv.hits(), 0, "no request may reach the server");
}

#[test]
fn a_body_longer_than_declared_is_cut_off() {
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let srv = TestServer::start(move |path, _| match path {
        "/pool/endless.deb" => Reply::Endless(counter.clone()),
        _ => Reply::Body(vec![b'y'; 4 * 1024 * 1024]),
    });
    let state = tempfile::tempdir().unwrap();
    let mut s = settings(state.path(), &[srv.url("/pool/")]);
    s.attempts = 2;

    let started = Instant::now();
    let mut endless = spec(srv.url("/pool/endless.deb"), GOOD);
    endless.size = Some(1024);
    let err = fetch(&endless, &s).unwrap_err();
    assert!(
        matches!(
            err,
            ArtifactError::Exhausted {
                last: AttemptFailure::TooLong { declared: 1024 },
                attempts: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("cut off"), "{err}");
    assert_eq!(srv.hits_on("/pool/endless.deb"), 2);
    assert!(started.elapsed() < Duration::from_secs(20));
    // Only socket buffers' worth went out, not the endless body.
    let sent = served.load(Ordering::SeqCst);
    assert!(sent < 64 * 1024 * 1024, "server handed out {sent} bytes");

    // A declared Content-Length above the size is refused before the body is read.
    let mut big = spec(srv.url("/pool/big.deb"), GOOD);
    big.size = Some(1024);
    let err = fetch(&big, &s).unwrap_err();
    assert!(
        matches!(
            err,
            ArtifactError::Exhausted {
                last: AttemptFailure::TooLong { .. },
                ..
            }
        ),
        "{err:?}"
    );
    // A body shorter than declared is a mismatch too.
    let srv2 = TestServer::start(|_, _| Reply::Body(GOOD.to_vec()));
    let s2 = settings(state.path(), &[srv2.url("/")]);
    let mut short = spec(srv2.url("/a.deb"), GOOD);
    short.size = Some(GOOD.len() as u64 + 10);
    let err = fetch(&short, &s2).unwrap_err();
    assert!(
        matches!(
            err,
            ArtifactError::Exhausted {
                last: AttemptFailure::TooShort { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(cache_entries(&s).is_empty(), "{:?}", cache_entries(&s));
}

#[test]
fn http_errors_are_retried_and_reported() {
    let srv = TestServer::start(|_, _| Reply::Status(404));
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/")]);
    let err = fetch(&spec(srv.url("/missing.deb"), GOOD), &s).unwrap_err();
    assert_eq!(srv.hits(), 3);
    assert!(err.to_string().contains("HTTP 404"), "{err}");

    // A redirect, even to a trusted path, is not followed: it could leave the allowlist.
    let srv = TestServer::start(|path, _| match path {
        "/pool/a.deb" => Reply::Redirect("/other/a.deb".into()),
        _ => Reply::Body(GOOD.to_vec()),
    });
    let s = settings(state.path(), &[srv.url("/")]);
    let err = fetch(&spec(srv.url("/pool/a.deb"), GOOD), &s).unwrap_err();
    assert!(
        err.to_string().contains("redirects are not followed"),
        "{err}"
    );
    assert_eq!(srv.hits_on("/pool/a.deb"), 3);
    assert_eq!(srv.hits(), 3, "the redirect target was never requested");
}

/// A minisign key pair made with the real `minisign` tool.
struct Keys {
    dir: tempfile::TempDir,
    public: String,
}

fn minisign_keys() -> Keys {
    let found = Command::new("sh")
        .args(["-c", "command -v minisign"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "`minisign` is not installed: run .ci/setup as root");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("minisign")
        .args(["-G", "-W", "-p", "key.pub", "-s", "key.sec"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("key.pub")).unwrap();
    let public = text.lines().nth(1).unwrap().trim().to_string();
    Keys { dir, public }
}

impl Keys {
    fn sign(&self, data: &[u8]) -> String {
        let file = self.dir.path().join("payload");
        std::fs::write(&file, data).unwrap();
        let sig = self.dir.path().join("payload.minisig");
        let out = Command::new("minisign")
            .args(["-S", "-s"])
            .arg(self.dir.path().join("key.sec"))
            .arg("-m")
            .arg(&file)
            .arg("-x")
            .arg(&sig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(sig).unwrap()
    }
}

#[test]
fn minisign_signatures_are_checked_against_pinned_keys() {
    let keys = minisign_keys();
    let other = minisign_keys();
    let good_sig = keys.sign(GOOD);
    let wrong_file_sig = keys.sign(b"some other file");
    let other_key_sig = other.sign(GOOD);
    let srv = TestServer::start(move |path, _| match path {
        "/pool/a.deb" => Reply::Body(GOOD.to_vec()),
        "/pool/a.deb.minisig" => Reply::Body(good_sig.clone().into_bytes()),
        "/pool/wrong.minisig" => Reply::Body(wrong_file_sig.clone().into_bytes()),
        "/pool/other.minisig" => Reply::Body(other_key_sig.clone().into_bytes()),
        "/pool/garbage.minisig" => Reply::Body(b"not a signature".to_vec()),
        _ => Reply::Status(404),
    });
    let state = tempfile::tempdir().unwrap();
    let mut s = settings(state.path(), &[srv.url("/pool/")]);
    s.public_keys = vec![other.public.clone(), keys.public.clone()];

    // Missing signature while keys are pinned: refused before any request.
    let err = fetch(&spec(srv.url("/pool/a.deb"), GOOD), &s).unwrap_err();
    assert!(
        matches!(err, ArtifactError::SignatureMissing { .. }),
        "{err:?}"
    );
    assert_eq!(srv.hits(), 0);

    let mut only_first_key = s.clone();
    only_first_key.public_keys = vec![keys.public.clone()];
    for (sig, settings) in [
        ("wrong.minisig", &s),
        ("garbage.minisig", &s),
        ("other.minisig", &only_first_key),
    ] {
        let mut sp = spec(srv.url("/pool/a.deb"), GOOD);
        sp.signature = Some(sig.to_string());
        let mut checks = Vec::new();
        let err = fetch_recorded(&sp, settings, &mut checks).unwrap_err();
        assert!(
            matches!(err, ArtifactError::BadSignature { .. }),
            "{sig}: {err:?}"
        );
        assert!(
            checks.iter().any(|c| c.what == "signature" && !c.ok),
            "{checks:?}"
        );
        assert!(
            cache_entries(settings).is_empty(),
            "a refused artifact must not enter the cache: {:?}",
            cache_entries(settings)
        );
    }

    let mut sp = spec(srv.url("/pool/a.deb"), GOOD);
    sp.signature = Some("a.deb.minisig".to_string());
    let a = fetch(&sp, &s).unwrap();
    assert!(a.signature_checked);
    assert_eq!(std::fs::read(&a.path).unwrap(), GOOD);
    assert_eq!(srv.hits_on("/pool/a.deb.minisig"), 1);

    // Inline signature text, checked again on a cache hit.
    let mut inline = spec(srv.url("/pool/a.deb"), GOOD);
    inline.signature = Some(keys.sign(GOOD));
    let before = srv.hits();
    let a = fetch(&inline, &s).unwrap();
    assert!(a.from_cache && a.signature_checked);
    assert_eq!(
        srv.hits(),
        before,
        "a cache hit with inline signature needs no request"
    );
    inline.signature = Some(keys.sign(b"tampered"));
    assert!(matches!(
        fetch(&inline, &s).unwrap_err(),
        ArtifactError::BadSignature { .. }
    ));
}

#[test]
fn a_local_directory_mirror_works() {
    let keys = minisign_keys();
    let state = tempfile::tempdir().unwrap();
    let mirror = state.path().join("mirror").join("pool");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(mirror.join("a.deb"), GOOD).unwrap();
    std::fs::write(mirror.join("a.deb.minisig"), keys.sign(GOOD)).unwrap();
    std::fs::write(state.path().join("outside.deb"), GOOD).unwrap();
    let mut s = settings(state.path(), &["mirror".to_string()]);
    s.public_keys = vec![keys.public.clone()];

    let mut sp = spec(mirror.join("a.deb").display().to_string(), GOOD);
    sp.signature = Some("a.deb.minisig".to_string());
    let a = fetch(&sp, &s).unwrap();
    assert!(a.signature_checked);
    assert_eq!(std::fs::read(&a.path).unwrap(), GOOD);
    assert!(a.path.starts_with(&s.cache_dir));

    let mut via_url = sp.clone();
    via_url.url = format!("file://{}", mirror.join("a.deb").display());
    assert!(fetch(&via_url, &s).unwrap().from_cache);

    // `..` out of the mirror, and a symlink inside it pointing out, are refused.
    let mut escape = sp.clone();
    escape.url = format!("{}/../../outside.deb", mirror.display());
    assert!(matches!(
        fetch(&escape, &s).unwrap_err(),
        ArtifactError::Untrusted { .. }
    ));
    std::os::unix::fs::symlink(state.path().join("outside.deb"), mirror.join("link.deb")).unwrap();
    let mut link = sp.clone();
    link.url = mirror.join("link.deb").display().to_string();
    assert!(matches!(
        fetch(&link, &s).unwrap_err(),
        ArtifactError::Untrusted { .. }
    ));

    // A changed mirror file fails the checksum, even with the good bytes cached
    // from another file: a cache entry serves only the sources it came from.
    std::fs::write(mirror.join("b.deb"), b"changed").unwrap();
    let mut changed = spec(mirror.join("b.deb").display().to_string(), GOOD);
    changed.signature = Some("a.deb.minisig".to_string());
    assert!(matches!(
        fetch(&changed, &s).unwrap_err(),
        ArtifactError::Exhausted {
            last: AttemptFailure::Checksum { .. },
            ..
        }
    ));
}

#[test]
fn a_cached_artifact_is_rehashed_and_refetched_when_corrupt() {
    let srv = TestServer::start(|_, _| Reply::Body(GOOD.to_vec()));
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/pool/")]);
    let sp = spec(srv.url("/pool/a.deb"), GOOD);

    let first = fetch(&sp, &s).unwrap();
    assert_eq!(srv.hits(), 1);
    let second = fetch(&sp, &s).unwrap();
    assert_eq!(srv.hits(), 1, "a good cache entry is used");
    assert!(second.from_cache && second.downloads == 0);
    assert!(second.checks.iter().any(|c| c.what == "cache" && c.ok));

    std::fs::write(&first.path, b"bit rot").unwrap();
    let third = fetch(&sp, &s).unwrap();
    assert_eq!(srv.hits(), 2, "a corrupt cache entry is fetched again");
    assert!(!third.from_cache);
    assert!(third.checks.iter().any(|c| c.what == "cache" && !c.ok));
    assert_eq!(std::fs::read(&third.path).unwrap(), GOOD);
}

#[test]
fn a_cache_entry_serves_only_the_sources_it_came_from() {
    let srv = TestServer::start(|_, _| Reply::Body(GOOD.to_vec()));
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/pool/"), srv.url("/other/")]);
    fetch(&spec(srv.url("/pool/a.deb"), GOOD), &s).unwrap();
    assert_eq!(srv.hits(), 1);

    // The same SHA-256 named at another URL: that source is asked, and the check
    // says why the cached copy was not used.
    let other = fetch(&spec(srv.url("/other/a.deb"), GOOD), &s).unwrap();
    assert_eq!(
        srv.hits(),
        2,
        "another source is fetched, not served from cache"
    );
    assert!(!other.from_cache);
    let note = other
        .checks
        .iter()
        .find(|c| c.what == "cache")
        .expect("a cache check");
    assert!(
        note.detail.contains("not reused") && note.detail.contains("/pool/a.deb"),
        "{}",
        note.detail
    );

    // Both sources are now bound to the entry: each is a cache hit that says
    // where its bytes came from.
    for path in ["/pool/a.deb", "/other/a.deb"] {
        let again = fetch(&spec(srv.url(path), GOOD), &s).unwrap();
        assert!(again.from_cache, "{path}");
        assert!(
            again
                .checks
                .iter()
                .any(|c| c.what == "cache" && c.ok && c.detail.contains(path)),
            "{:?}",
            again.checks
        );
    }
    assert_eq!(srv.hits(), 2);

    // A dead mirror is found out even when another one filled the cache.
    let dead = TestServer::start(|_, _| Reply::Status(404));
    let mut with_dead = s.clone();
    with_dead.trusted_sources.push(dead.url("/pool/"));
    assert!(fetch(&spec(dead.url("/pool/a.deb"), GOOD), &with_dead).is_err());
}

#[test]
fn settings_come_from_patchbook_toml() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("patchbook.toml");
    std::fs::write(
        &path,
        "trusted_sources = [\"https://mirror.example.com/pool/\"]\n\
         [artifacts]\nattempts = 5\npublic_keys = [\"RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\"]\n",
    )
    .unwrap();
    let cfg = Config::load(&path).unwrap();
    let s = ArtifactSettings::from_config(&cfg, &dir.path().join(".patchbook"));
    assert_eq!(s.attempts, 5);
    assert_eq!(s.public_keys.len(), 1);
    assert_eq!(s.cache_dir, dir.path().join(".patchbook/cache/artifacts"));
    assert_eq!(s.trusted_sources, vec!["https://mirror.example.com/pool/"]);

    std::fs::write(&path, "[artifacts]\nattempt = 5\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("patchbook.toml:2:"), "{err}");
}

#[test]
fn hostile_specs_are_refused_without_a_request() {
    let srv = TestServer::start(|_, _| Reply::Body(GOOD.to_vec()));
    let state = tempfile::tempdir().unwrap();
    let s = settings(state.path(), &[srv.url("/pool/")]);
    let long = "a".repeat(64 * 1024);
    for bad in [
        ";",
        "$(touch /tmp/pwned)",
        "`id`",
        "\n",
        "\0",
        "-rf",
        long.as_str(),
    ] {
        let mut by_sha = spec(srv.url("/pool/a.deb"), GOOD);
        by_sha.sha256 = format!("{}{bad}", &by_sha.sha256[..63]);
        let err = fetch(&by_sha, &s).unwrap_err();
        assert!(
            matches!(err, ArtifactError::InvalidSpec { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().len() < 1000, "the message stays readable");
    }
    for url in [
        format!("{}\n", srv.url("/pool/a.deb")),
        format!("{}\0", srv.url("/pool/a.deb")),
        "-rf".to_string(),
        "$(touch /tmp/pwned)".to_string(),
    ] {
        assert!(fetch(&spec(url.clone(), GOOD), &s).is_err(), "{url:?}");
    }
    let mut by_sig = spec(srv.url("/pool/a.deb"), GOOD);
    by_sig.signature = Some("../../etc/passwd\0".to_string());
    assert!(fetch(&by_sig, &s).is_err());
    assert_eq!(srv.hits(), 0, "no hostile spec may send a request");
}
