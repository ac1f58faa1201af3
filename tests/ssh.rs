//! Acceptance of the SSH transport against real sshd hosts of the lab fleet.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use patchbook::inventory::Host;
use patchbook::lab::Fleet;
use patchbook::rollout::pool::map_bounded;
use patchbook::transport::ssh::{SshConnector, SshTransport};
use patchbook::transport::{Command, Connector, Transport, TransportError};
use support::{shared_fleet, Lab};

const HOSTS: usize = 20;

fn fleet() -> &'static Fleet {
    shared_fleet(HOSTS)
}

fn connector(f: &Fleet) -> SshConnector {
    SshConnector::new(f.known_hosts()).identity(f.identity())
}

fn first(f: &Fleet) -> Host {
    f.inventory_hosts().remove(0)
}

fn connect(f: &Fleet, host: &Host) -> SshTransport {
    connector(f)
        .connect_ssh(host)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn refusal(kh: &Path, f: &Fleet, host: &Host) -> String {
    match SshConnector::new(kh)
        .identity(f.identity())
        .connect_ssh(host)
    {
        Ok(_) => panic!("connection with {} should be refused", kh.display()),
        Err(e @ TransportError::HostKey { .. }) => e.to_string(),
        Err(e) => panic!("expected a host key error, got {e}"),
    }
}

#[test]
fn dpkg_query_returns_base_version_from_every_host_in_parallel() {
    let f = fleet();
    let hosts = f.inventory_hosts();
    assert_eq!(hosts.len(), HOSTS);
    let conn = connector(f);
    let results = map_bounded(&hosts, 50, |h| {
        let t = conn.connect(h)?;
        let out = t.run(&Command::new([
            "dpkg-query",
            "-W",
            "-f=${Version}",
            "acme-agent",
        ]))?;
        Ok::<_, TransportError>((h.name.clone(), out))
    });
    for r in results {
        let (name, out) = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.code, 0, "{name}: {}", out.stderr_str());
        assert_eq!(out.stdout_str(), "1.0.0", "{name}");
    }
}

#[test]
fn exit_codes_stdin_and_stderr_are_faithful_and_the_session_is_reused() {
    let f = fleet();
    let t = connect(f, &first(f));
    let out = t
        .run(&Command::new([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .unwrap();
    assert_eq!(
        (
            out.code,
            out.stdout_str().as_str(),
            out.stderr_str().as_str()
        ),
        (3, "out\n", "err\n")
    );
    let out = t
        .run(&Command::new(["sh", "-c", "cat; printf tail >&2"]).stdin(b"from stdin".to_vec()))
        .unwrap();
    assert_eq!(out.stdout_str(), "from stdin");
    assert_eq!(
        out.stderr_str(),
        "tail",
        "the exit sentinel must not leak into stderr"
    );
    // Hostile words arrive verbatim: nothing becomes shell syntax.
    let out = t
        .run(&Command::new(["printf", "%s|", "$(id)", "a b", "it's"]))
        .unwrap();
    assert_eq!(out.stdout_str(), "$(id)|a b|it's|");
    // One session: every command is served by the same sshd connection process
    // (the parent of the login shell that runs the command).
    let sshd_of = |t: &SshTransport| {
        let out = t
            .run(&Command::new([
                "sh",
                "-c",
                "cut -d' ' -f4 /proc/$PPID/stat",
            ]))
            .unwrap();
        assert!(out.success(), "{}", out.stderr_str());
        out.stdout_str()
    };
    let a = sshd_of(&t);
    assert_eq!(a, sshd_of(&t));
    let other = connect(f, &first(f));
    assert_ne!(a, sshd_of(&other), "a second transport is a second session");
}

#[test]
fn steps_share_one_session_shell_but_none_of_its_state() {
    let f = fleet();
    let t = connect(f, &first(f));
    // The shell that runs each command: the same process every time, so a step
    // costs the host a fork, not a channel and a login shell.
    let shell_of = |t: &SshTransport| {
        let out = t
            .run(&Command::new([
                "sh",
                "-c",
                "echo $PPID; pwd; echo ${PB_LEAK:-unset}",
            ]))
            .unwrap();
        assert!(out.success(), "{}", out.stderr_str());
        out.stdout_str()
    };
    let first_seen = shell_of(&t);
    // Builtins that would change the shell run in a subshell: no state carries over,
    // and `exit` ends only its own step.
    for argv in [
        vec!["cd", "/tmp"],
        vec!["export", "PB_LEAK=yes"],
        vec!["exit", "4"],
    ] {
        let out = t.run(&Command::new(argv.clone())).unwrap();
        let want = if argv[0] == "exit" { 4 } else { 0 };
        assert_eq!(out.code, want, "{argv:?}: {}", out.stderr_str());
    }
    assert_eq!(shell_of(&t), first_seen);
    assert!(first_seen.ends_with("unset\n"), "{first_seen}");
    // A step that reads stdin gets nothing, and cannot swallow the next step.
    let out = t.run(&Command::new(["cat"])).unwrap();
    assert_eq!((out.code, out.stdout.len()), (0, 0));
    assert_eq!(
        t.run(&Command::new(["echo", "next"])).unwrap().stdout_str(),
        "next\n"
    );
    // Output with no final newline and binary bytes come back exactly.
    let out = t
        .run(&Command::new(["printf", "\\000\\377no newline"]))
        .unwrap();
    assert_eq!(out.stdout, b"\0\xffno newline");
}

#[test]
fn a_stale_public_key_beside_the_identity_does_not_stop_the_login() {
    let f = fleet();
    let dir = tempfile::tempdir().unwrap();
    let id = dir.path().join("id_ed25519");
    std::fs::copy(f.identity(), &id).unwrap();
    // A `.pub` of another key: the private key alone must still get in.
    let other = dir.path().join("other");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(keygen.success());
    std::fs::copy(
        dir.path().join("other.pub"),
        dir.path().join("id_ed25519.pub"),
    )
    .unwrap();
    // The connector's identity, not the one the lab's inventory gives each host.
    let mut host = first(f);
    host.identity = None;
    let t = SshConnector::new(f.known_hosts())
        .identity(&id)
        .connect_ssh(&host)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.run(&Command::new(["echo", "in"])).unwrap().stdout_str(),
        "in\n"
    );
    // And a key the host does not know is refused, with what to check.
    let err = SshConnector::new(f.known_hosts())
        .identity(&other)
        .connect_ssh(&host)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, TransportError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("authorized_keys"), "{err}");
}

#[test]
fn a_shell_killed_by_a_signal_is_no_exit_status_not_zero() {
    let f = fleet();
    let t = connect(f, &first(f));
    let err = t
        .run(&Command::new(["sh", "-c", "kill -9 $PPID"]))
        .unwrap_err();
    assert!(matches!(err, TransportError::NoExitStatus { .. }), "{err}");
    // The transport recovers for the next step.
    assert_eq!(t.run(&Command::new(["true"])).unwrap().code, 0);
}

#[test]
fn unknown_host_is_refused_with_what_to_do() {
    let f = fleet();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts"); // does not exist: nothing is known
    let msg = refusal(&kh, f, &first(f));
    assert!(msg.contains("unknown host"), "{msg}");
    assert!(msg.contains("ssh-keyscan -p"), "{msg}");
    assert!(msg.contains("--accept-new-host-keys"), "{msg}");
    assert!(msg.contains("SHA256:"), "{msg}");
    assert!(!kh.exists(), "a refused key must never be recorded");
}

#[test]
fn host_absent_from_a_populated_known_hosts_is_refused() {
    let f = fleet();
    let host = first(f);
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let all = std::fs::read_to_string(f.known_hosts()).unwrap();
    let others: String = all
        .lines()
        .filter(|l| !l.starts_with(&format!("[127.0.0.1]:{} ", host.port)))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(others.lines().count(), HOSTS - 1);
    std::fs::write(&kh, &others).unwrap();
    let msg = refusal(&kh, f, &host);
    assert!(
        msg.contains(&format!("[127.0.0.1]:{} is not in", host.port)),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), others);
}

#[test]
fn changed_host_key_is_refused_even_with_accept_new() {
    let f = fleet();
    let host = first(f);
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    // Record another host's key under this host's name: a changed key.
    let other = std::fs::read_to_string(
        f.host("lab02")
            .unwrap()
            .dir
            .join("ssh_host_ed25519_key.pub"),
    )
    .unwrap();
    let mut w = other.split_whitespace();
    let forged = format!(
        "[127.0.0.1]:{} {} {}\n",
        host.port,
        w.next().unwrap(),
        w.next().unwrap()
    );
    std::fs::write(&kh, &forged).unwrap();
    let msg = refusal(&kh, f, &host);
    assert!(msg.contains("HOST KEY CHANGED"), "{msg}");
    assert!(msg.contains("ssh-keygen -R"), "{msg}");
    assert!(msg.contains(&format!("{}:1", kh.display())), "{msg}");
    let err = SshConnector::new(&kh)
        .identity(f.identity())
        .accept_new_host_keys(true)
        .connect_ssh(&host)
        .err()
        .expect("a changed key is refused even with --accept-new-host-keys");
    assert!(err.to_string().contains("HOST KEY CHANGED"), "{err}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), forged);
}

#[test]
fn hashed_known_hosts_entry_that_matches_is_accepted() {
    let f = fleet();
    let host = first(f);
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    // A junk line first: one bad line must not hide the rest of the file.
    std::fs::copy(f.known_hosts(), &kh).unwrap();
    let hashed = std::process::Command::new("ssh-keygen")
        .args(["-H", "-f"])
        .arg(&kh)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        hashed.status.success(),
        "{}",
        String::from_utf8_lossy(&hashed.stderr)
    );
    let text = std::fs::read_to_string(&kh).unwrap();
    assert!(
        text.lines().filter(|l| l.starts_with("|1|")).count() >= HOSTS,
        "{text}"
    );
    assert!(
        !text.contains("127.0.0.1"),
        "every entry must be hashed: {text}"
    );
    // A junk line first: one bad line must not hide the rest of the file.
    std::fs::write(&kh, format!("this line is not a key\n{text}")).unwrap();
    let t = SshConnector::new(&kh)
        .identity(f.identity())
        .connect_ssh(&host)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.run(&Command::new(["true"])).unwrap().code, 0);
}

#[test]
fn accept_new_host_keys_appends_the_key_then_checks_strictly() {
    let f = fleet();
    let host = first(f);
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, "# operator's file\n").unwrap();
    let t = SshConnector::new(&kh)
        .identity(f.identity())
        .accept_new_host_keys(true)
        .connect_ssh(&host)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(t.run(&Command::new(["true"])).unwrap().success());
    let recorded = std::fs::read_to_string(&kh).unwrap();
    let expected = std::fs::read_to_string(f.known_hosts()).unwrap();
    let line = expected
        .lines()
        .find(|l| l.starts_with(&format!("[127.0.0.1]:{} ", host.port)))
        .unwrap();
    assert_eq!(recorded, format!("# operator's file\n{line}\n"));
    // Now strict mode accepts it.
    SshConnector::new(&kh)
        .identity(f.identity())
        .connect_ssh(&host)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn dead_host_fails_alone() {
    let lab = Lab::start(4);
    let hosts = lab.inventory_hosts();
    let conn = connector(&lab);
    let transports: Vec<SshTransport> =
        hosts.iter().map(|h| conn.connect_ssh(h).unwrap()).collect();
    // lab03 dies during the run: after its session is up, before its next step.
    lab.kill_host("lab03").unwrap();
    let items: Vec<usize> = (0..hosts.len()).collect();
    let results = map_bounded(&items, 4, |i| {
        transports[*i].run(
            &Command::new(["dpkg-query", "-W", "-f=${Version}", "acme-agent"])
                .timeout(Duration::from_secs(10)),
        )
    });
    for (h, r) in hosts.iter().zip(&results) {
        if h.name == "lab03" {
            let err = r.as_ref().expect_err("the dead host fails");
            assert!(
                matches!(
                    err,
                    TransportError::Ssh { .. }
                        | TransportError::Connect { .. }
                        | TransportError::NoExitStatus { .. }
                ),
                "{err}"
            );
            assert!(err.to_string().starts_with("lab03: "), "{err}");
        } else {
            assert_eq!(r.as_ref().unwrap().stdout_str(), "1.0.0", "{}", h.name);
        }
    }
    // A reconnect attempt fails fast with a connect error naming the address.
    let started = Instant::now();
    let err = conn
        .connect_ssh(&hosts[2])
        .err()
        .expect("dead host refuses");
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn hanging_command_ends_at_its_deadline() {
    let f = fleet();
    let t = connect(f, &f.inventory_hosts()[1]);
    let started = Instant::now();
    let err = t
        .run(&Command::new(["sleep", "600"]).timeout(Duration::from_secs(2)))
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, TransportError::Deadline { .. }), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(3500),
        "took {took:?}"
    );
    // The broken session is replaced on the next step.
    let out = t.run(&Command::new(["echo", "back"])).unwrap();
    assert_eq!(out.stdout_str(), "back\n");
}

#[test]
fn huge_output_is_capped_and_memory_stays_flat() {
    let f = fleet();
    let t = connect(f, &f.inventory_hosts()[2]);
    let before = support::rss_kb();
    let started = Instant::now();
    let out = t
        .run(
            &Command::new(["head", "-c", "200000000", "/dev/zero"])
                .timeout(Duration::from_secs(120)),
        )
        .unwrap();
    let grown_mb = support::rss_kb().saturating_sub(before) / 1024;
    assert_eq!(out.code, 0);
    assert!(out.truncated);
    assert_eq!(out.stdout.len(), patchbook::transport::DEFAULT_OUTPUT_CAP);
    assert!(grown_mb < 100, "RSS grew by {grown_mb} MB");
    eprintln!(
        "200 MB drained in {:?}, RSS +{grown_mb} MB",
        started.elapsed()
    );
    // stderr is capped the same way, and the exit status still survives it.
    let out = t
        .run(&Command::new(["sh", "-c", "head -c 3000000 /dev/zero >&2; exit 4"]).output_cap(1000))
        .unwrap();
    assert_eq!((out.code, out.stderr.len(), out.truncated), (4, 1000, true));
}

#[test]
fn run_to_writer_streams_stdout() {
    let f = fleet();
    let t = connect(f, &f.inventory_hosts()[3]);
    let mut sink: Vec<u8> = Vec::new();
    let out = t
        .run_to_writer(
            &Command::new(["head", "-c", "3000000", "/dev/zero"]).output_cap(10),
            &mut sink,
        )
        .unwrap();
    assert_eq!(out.code, 0);
    assert_eq!(sink.len(), 3_000_000, "streamed output is never capped");
}

fn random_file(dir: &Path, size: usize) -> (std::path::PathBuf, String) {
    use sha2::Digest;
    let p = dir.join("payload.bin");
    let mut f = std::fs::File::create(&p).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(size);
    f.write_all(&buf).unwrap();
    (p, hex::encode(sha2::Sha256::digest(&buf)))
}

#[test]
fn ten_megabyte_upload_arrives_intact_and_downloads_back() {
    let f = fleet();
    let host = &f.inventory_hosts()[4];
    let t = connect(f, host);
    let dir = tempfile::tempdir().unwrap();
    let (local, sha) = random_file(dir.path(), 10 * 1024 * 1024);
    let remote = "/opt/acme/upload.bin";
    // Twice: the second upload replaces an existing file.
    for _ in 0..2 {
        let up = t.put(&local, remote, 0o640).unwrap();
        assert_eq!(
            (up.size, up.sha256.as_str()),
            (10 * 1024 * 1024, sha.as_str())
        );
    }
    // Checked independently inside the host's namespace.
    let check = f
        .exec_in(
            &host.name,
            &[
                "sh",
                "-c",
                "sha256sum /opt/acme/upload.bin; stat -c %a /opt/acme/upload.bin; ls -a /opt/acme",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.starts_with(&sha), "{text}");
    assert!(text.contains("\n640\n"), "{text}");
    assert!(
        !text.contains("patchbook"),
        "no temp file may be left: {text}"
    );
    assert!(
        !Path::new(remote).exists(),
        "the upload must stay inside the host's /opt"
    );
    let back = dir.path().join("back.bin");
    assert_eq!(t.get(remote, &back).unwrap(), 10 * 1024 * 1024);
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&local).unwrap()
    );
}

#[test]
fn upload_changed_on_the_host_before_hashing_is_detected() {
    let f = fleet();
    let host = f.inventory_hosts()[5].clone();
    let t = connect(f, &host);
    let dir = tempfile::tempdir().unwrap();
    let (local, sha) = random_file(dir.path(), 100_000);
    let remote = "/opt/acme/tampered.bin";
    let mut tamper = |path: &str| {
        let out = f
            .exec_in(
                &host.name,
                &[
                    "sh",
                    "-c",
                    &format!("printf X | dd of={path} bs=1 seek=500 conv=notrunc 2>/dev/null"),
                ],
            )
            .unwrap();
        assert!(out.status.success());
    };
    let err = t
        .put_with_hook(&local, remote, 0o644, Some(&mut tamper))
        .unwrap_err();
    match &err {
        TransportError::UploadCorrupt {
            sent,
            found,
            remote: r,
            ..
        } => {
            assert_eq!(sent, &sha);
            assert_ne!(found, &sha);
            assert_eq!(r, remote);
        }
        other => panic!("expected UploadCorrupt, got {other}"),
    }
    // The same re-hash accepts an intact file.
    let up = t.put(&local, remote, 0o644).unwrap();
    assert_eq!(up.sha256, sha);
}
