//! `patchbook watch` end to end: the built binary on a temporary project with a
//! local-transport host, its status page over real HTTP, its control socket, real
//! inotify events from real file saves. Plus library-level checks of the service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_patchbook");

fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A temporary project: scripts/, stdlib/, an inventory with one local host.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Readable by other users: the control-socket tests need the file mode,
        // not the folder, to be what refuses them.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        std::fs::create_dir_all(dir.path().join("stdlib/patch")).unwrap();
        std::fs::write(
            dir.path().join("inv.toml"),
            "[hosts.local]\ntransport = \"local\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("patchbook.toml"),
            "inventory = [\"inv.toml\"]\n",
        )
        .unwrap();
        Project { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }
    fn socket(&self) -> PathBuf {
        self.path(".patchbook/control.sock")
    }
}

/// The running service; killed on drop, even when a test panics.
struct Service {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    url: String,
}

impl Service {
    fn start(p: &Project, env: &[(&str, &str)]) -> Self {
        Self::start_as(p, env, None)
    }

    fn start_as(p: &Project, env: &[(&str, &str)], user: Option<&str>) -> Self {
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new(setpriv());
                c.args([
                    &format!("--reuid={u}"),
                    "--regid=nogroup",
                    "--clear-groups",
                    BIN,
                ]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["watch", "--listen", "127.0.0.1:0"])
            .current_dir(p.dir.path())
            .env("PATCHBOOK_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                o.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                o.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        let mut s = Service {
            child,
            out,
            url: String::new(),
        };
        let t0 = Instant::now();
        loop {
            let found = s.out.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("status page: ")
                    .map(|u| u.trim_end_matches('/').to_string())
            });
            if let Some(u) = found {
                s.url = u;
                break;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("watch exited early ({st}): {:#?}", s.output());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "watch did not start: {:#?}",
                s.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn output(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> String {
        let addr = self.url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    fn status(&self) -> Value {
        let resp = self.get("/status.json");
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap()
    }

    /// Polls the status until `f` holds, or panics after `within`.
    fn wait(&self, within: Duration, what: &str, f: impl Fn(&Value) -> bool) -> (Value, Duration) {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return (s, t0.elapsed());
            }
            assert!(
                t0.elapsed() < within,
                "{what} did not happen within {within:?}; status: {s:#}\noutput: {:#?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the reload counters have stood still for `quiet` (several
    /// debounce windows), restarting the wait on any change, and returns the
    /// status then. An extra reload can only be ruled out over a window; this one
    /// grows with the watcher's activity instead of being a fixed guess.
    fn settled(&self, quiet: Duration) -> Value {
        let t0 = Instant::now();
        let counters = |s: &Value| s["reloads"].clone();
        let mut last = self.status();
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let s = self.status();
            if counters(&s) != counters(&last) {
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return s;
            }
            last = s;
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the watcher kept reloading: {last:#}"
            );
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: a plain libc call on values this test owns; no memory is shared.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "watch ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn setpriv() -> &'static str {
    for p in ["/usr/bin/setpriv", "/bin/setpriv"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("setpriv (util-linux) is missing; run .ci/setup");
}

fn generation(s: &Value) -> u64 {
    s["generation"]["number"].as_u64().unwrap_or(0)
}

fn playbook_sha(s: &Value, name: &str) -> Option<String> {
    s["generation"]["playbooks"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| p["sha256"].as_str().unwrap().to_string())
}

fn module_sha(s: &Value, playbook: &str, module: &str) -> Option<String> {
    s["generation"]["playbooks"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == playbook)?["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == module)
        .map(|m| m["sha256"].as_str().unwrap().to_string())
}

fn trigger(p: &Project, name: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["trigger", name, "--socket"])
        .arg(p.socket())
        .current_dir(p.dir.path())
        .output()
        .unwrap()
}

fn journal_header(p: &Project, run: &str) -> Value {
    let text = std::fs::read_to_string(p.path(&format!(".patchbook/runs/{run}.jsonl"))).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "run.start");
    first["data"].clone()
}

fn journal_kinds(p: &Project, run: &str) -> Vec<String> {
    std::fs::read_to_string(p.path(&format!(".patchbook/runs/{run}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

const QUICK: &str = "let x = 1;\nx + 1\n";

#[test]
fn each_save_style_goes_live_once_within_a_second() {
    let p = Project::new();
    p.write("scripts/a.rhai", QUICK);
    let svc = Service::start(&p, &[]);
    let (s, _) = svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    assert_eq!(playbook_sha(&s, "a").unwrap(), sha(QUICK));

    let file = p.path("scripts/a.rhai");
    type Save<'a> = &'a dyn Fn(&str);
    let styles: [(&str, Save); 3] = [
        ("in-place write", &|text: &str| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&file)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
            f.sync_all().unwrap();
        }),
        ("rename-over", &|text: &str| {
            let tmp = p.path("scripts/.a.rhai.tmp123");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        }),
        ("vim backup dance", &|text: &str| {
            let swap = p.path("scripts/.a.rhai.swp");
            std::fs::write(&swap, "vim swap").unwrap();
            let probe = p.path("scripts/4913");
            std::fs::write(&probe, "").unwrap();
            std::fs::remove_file(&probe).unwrap();
            let backup = p.path("scripts/a.rhai~");
            std::fs::rename(&file, &backup).unwrap();
            let mut f = std::fs::File::create(&file).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            f.sync_all().unwrap();
            std::fs::remove_file(&backup).unwrap();
            std::fs::remove_file(&swap).unwrap();
        }),
    ];
    for (i, (style, save)) in styles.iter().enumerate() {
        let before = svc.status();
        let (gen0, attempts0) = (
            generation(&before),
            before["reloads"]["attempts"].as_u64().unwrap(),
        );
        let text = format!("// {style}\nlet x = {i};\nx + 1\n");
        save(&text);
        let (_, took) = svc.wait(
            Duration::from_secs(1),
            &format!("{style}: new hash live"),
            |s| playbook_sha(s, "a").as_deref() == Some(sha(&text).as_str()),
        );
        // Let any stray event settle, then count.
        let after = svc.settled(Duration::from_millis(400));
        assert_eq!(
            generation(&after),
            gen0 + 1,
            "{style}: exactly one new generation (took {took:?})"
        );
        assert_eq!(
            after["reloads"]["attempts"].as_u64().unwrap(),
            attempts0 + 1,
            "{style}: exactly one compile"
        );
        assert!(after["last_error"].is_null(), "{style}: {after:#}");
    }
    // A save that changes nothing compiles nothing.
    let before = svc.status();
    let same = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &same).unwrap();
    let unchanged0 = before["reloads"]["unchanged"].as_u64().unwrap();
    let (after, _) = svc.wait(Duration::from_secs(5), "the save seen as unchanged", |s| {
        s["reloads"]["unchanged"].as_u64().unwrap() > unchanged0
    });
    assert_eq!(generation(&after), generation(&before));
    assert_eq!(after["reloads"]["attempts"], before["reloads"]["attempts"]);
}

#[test]
fn a_syntax_error_keeps_the_old_generation_and_shows_its_position() {
    let p = Project::new();
    p.write("scripts/a.rhai", QUICK);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    p.write("scripts/a.rhai", "let x = 1;\nlet y = ;\n");
    let (s, _) = svc.wait(Duration::from_secs(2), "error shown", |s| {
        !s["last_error"].is_null()
    });
    assert_eq!(generation(&s), 1, "the old generation stays live");
    assert_eq!(playbook_sha(&s, "a").unwrap(), sha(QUICK));
    let e = &s["last_error"]["errors"][0];
    assert!(
        e["file"].as_str().unwrap().ends_with("scripts/a.rhai"),
        "{e:#}"
    );
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(2), Some(9)),
        "{e:#}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("let y = ;"),
        "source frame: {e:#}"
    );
    assert_eq!(s["reloads"]["rejected"], 1);
    // Runs still use the live generation.
    let out = trigger(&p, "a");
    assert!(out.status.success(), "{out:?}");
    // Fixing it clears the error and goes live.
    p.write("scripts/a.rhai", "let x = 2;\nx\n");
    let (s, _) = svc.wait(Duration::from_secs(2), "fixed generation", |s| {
        generation(s) == 2
    });
    assert!(s["last_error"].is_null());
    // The page and the event stream are served.
    assert!(svc.get("/").contains("<title>patchbook watch</title>"));
    let addr = svc.url.trim_start_matches("http://").to_string();
    let mut es = TcpStream::connect(&addr).unwrap();
    write!(es, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    es.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("\n\n") || !got.contains("data: ") {
        let n = es.read(&mut buf).unwrap();
        assert!(n > 0);
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        got.contains("text/event-stream") && got.contains("event: status"),
        "{got}"
    );
    assert!(svc.get("/nope").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_library_edit_reloads_every_importer_and_only_if_all_compile() {
    let p = Project::new();
    let v1 = "fn twice(x) { x * 2 }\n";
    p.write("stdlib/patch/util.rhai", v1);
    p.write(
        "scripts/a.rhai",
        "import \"patch/util\" as u;\nu::twice(1)\n",
    );
    p.write(
        "scripts/b.rhai",
        "import \"patch/util\" as u;\nu::twice(2)\n",
    );
    p.write("scripts/c.rhai", QUICK);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });

    p.write("stdlib/patch/util.rhai", "fn twice(x) {\n  x * \n}\n");
    let (s, _) = svc.wait(Duration::from_secs(2), "module error", |s| {
        !s["last_error"].is_null()
    });
    assert_eq!(generation(&s), 1);
    for pb in ["a", "b"] {
        assert_eq!(
            module_sha(&s, pb, "patch/util").unwrap(),
            sha(v1),
            "{pb} keeps the old module"
        );
    }
    let errors = s["last_error"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "reported once: {errors:#?}");
    assert!(
        errors[0]["file"].as_str().unwrap().contains("util"),
        "{errors:#?}"
    );
    assert!(errors[0]["line"].as_u64().is_some());

    let v2 = "fn twice(x) { x + x }\n";
    p.write("stdlib/patch/util.rhai", v2);
    let (s, _) = svc.wait(Duration::from_secs(2), "module fix live", |s| {
        generation(s) == 2
    });
    for pb in ["a", "b"] {
        assert_eq!(
            module_sha(&s, pb, "patch/util").unwrap(),
            sha(v2),
            "{pb} has the new module"
        );
    }
    assert!(s["last_error"].is_null());
}

const SLOW: &str = "rollout(hosts(\"all\"), #{}, |h| { exec(h, [\"sleep\", \"2\"]); });\n";

#[test]
fn an_in_flight_run_keeps_its_generation_and_runs_never_overlap() {
    let p = Project::new();
    p.write("scripts/slow.rhai", SLOW);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    let out = trigger(&p, "slow");
    assert!(out.status.success(), "{out:?}");
    let (s, _) = svc.wait(Duration::from_secs(2), "run in flight with progress", |s| {
        s["runs"]["in_flight"][0]["progress"]["in_progress"] == 1
    });
    let run1 = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s["runs"]["in_flight"][0]["progress"]["targeted"], 1);

    // A second trigger while it runs is refused and names the run.
    let again = trigger(&p, "slow");
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&run1),
        "{again:?}"
    );

    let v2 = format!("// v2\n{SLOW}");
    p.write("scripts/slow.rhai", &v2);
    let (s, _) = svc.wait(Duration::from_secs(1), "edit live during the run", |s| {
        generation(s) == 2
    });
    assert_eq!(
        s["runs"]["in_flight"][0]["run_id"],
        run1.as_str(),
        "still running"
    );
    assert_eq!(s["runs"]["in_flight"][0]["sha256"], sha(SLOW).as_str());

    svc.wait(Duration::from_secs(10), "first run ends", |s| {
        s["runs"]["in_flight"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    assert_eq!(
        journal_header(&p, &run1)["playbook_sha256"],
        sha(SLOW).as_str()
    );
    assert_eq!(journal_kinds(&p, &run1).last().unwrap(), "run.close");

    let out = trigger(&p, "slow");
    assert!(out.status.success(), "{out:?}");
    let (s, _) = svc.wait(Duration::from_secs(2), "second run", |s| {
        // Progress is reported once the journal header is written.
        s["runs"]["in_flight"][0]["progress"]["in_progress"] == 1
    });
    let run2 = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(run1, run2);
    assert_eq!(
        journal_header(&p, &run2)["playbook_sha256"],
        sha(&v2).as_str()
    );
}

#[test]
fn a_scheduled_run_starts_on_time_and_never_overlaps_itself() {
    let p = Project::new();
    p.write(
        "scripts/weekly.rhai",
        "schedule(\"Sat 02:00 Asia/Hong_Kong\");\nlet x = 1;\n",
    );
    // Due every clock minute, i.e. every real second at speed 60; takes 2.5 s.
    p.write(
        "scripts/every.rhai",
        "schedule(\"* * * * *\", \"UTC\");\nfor h in hosts(\"all\") { exec(h, [\"sleep\", \"2.5\"]); }\n",
    );
    let svc = Service::start(
        &p,
        &[
            ("PATCHBOOK_NOW", "2026-11-28T01:59:30+08:00"),
            ("PATCHBOOK_CLOCK_SPEED", "60"),
        ],
    );
    let (s, _) = svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    let weekly = s["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["playbook"] == "weekly")
        .unwrap()
        .clone();
    // 30 clock seconds are half a real second at speed 60: on a loaded machine
    // the run may already have started, and then the slot is next week's.
    let started = weekly["running"] == true
        || s["runs"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["playbook"] == "weekly");
    let expected = if started {
        "2026-12-04T18:00:00Z"
    } else {
        "2026-11-27T18:00:00Z"
    };
    assert_eq!(weekly["next_start"], expected, "{weekly:#}");

    let (s, _) = svc.wait(Duration::from_secs(8), "weekly run", |s| {
        s["runs"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["playbook"] == "weekly")
    });
    let run = s["runs"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["playbook"] == "weekly")
        .unwrap()
        .clone();
    let started = chrono::DateTime::parse_from_rfc3339(run["started"].as_str().unwrap()).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339("2026-11-28T02:00:00+08:00").unwrap();
    let late = (started - due).num_milliseconds();
    // One 50 ms scheduler tick is three clock seconds at speed 60.
    assert!(
        (0..6_000).contains(&late),
        "started {started}, {late} ms after 02:00"
    );
    assert_eq!(run["cause"]["by"], "schedule");
    assert_eq!(run["ok"], true, "{run:#}");

    // `every` falls due each second while each run takes 2.5 s: wait for two of
    // its runs to finish and for a start to have been skipped as an overlap.
    let (s, _) = svc.wait(
        Duration::from_secs(20),
        "two `every` runs and a skip",
        |s| {
            let finished = s["runs"]["recent"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["playbook"] == "every")
                .count();
            let skipped = s["schedules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["playbook"] == "every")
                .and_then(|x| x["skipped_overlaps"].as_u64())
                .unwrap_or(0);
            finished >= 2 && skipped >= 1
        },
    );
    let mut runs: Vec<(String, String)> = s["runs"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .chain(s["runs"]["in_flight"].as_array().unwrap())
        .filter(|r| r["playbook"] == "every")
        .map(|r| {
            (
                r["started"].as_str().unwrap().to_string(),
                r["finished"].as_str().unwrap_or("9999").to_string(),
            )
        })
        .collect();
    runs.sort();
    assert!(runs.len() >= 2, "{s:#}");
    for w in runs.windows(2) {
        assert!(w[0].1 <= w[1].0, "runs overlap: {w:?}");
    }
    let every = s["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["playbook"] == "every")
        .unwrap();
    assert!(
        every["skipped_overlaps"].as_u64().unwrap() >= 1,
        "{every:#}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs root to run a client as nobody: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn the_control_socket_refuses_a_client_of_another_user() {
    let p = Project::new();
    p.write("scripts/a.rhai", QUICK);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    let mode = std::fs::metadata(p.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = Command::new(setpriv())
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            BIN,
            "trigger",
            "a",
            "--socket",
        ])
        .arg(p.socket())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("owner-only"), "{err}");
    // The owner is served; its run is the only one, so the refused client
    // started none (the refusal was answered before the owner connected).
    let out = trigger(&p, "a");
    assert!(out.status.success(), "{out:?}");
    let (s, _) = svc.wait(Duration::from_secs(5), "the owner's run", |s| {
        s["runs"]["recent"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    assert!(
        s["runs"]["in_flight"].as_array().unwrap().is_empty(),
        "{s:#}"
    );
    assert_eq!(
        s["runs"]["recent"].as_array().unwrap().len(),
        1,
        "only the owner's run: {s:#}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs root to run a client as nobody: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn the_control_socket_checks_the_peer_uid_not_only_the_file_mode() {
    // The service runs as nobody; root ignores file modes, so only SO_PEERCRED
    // stands between it and the socket.
    let p = Project::new();
    p.write("scripts/a.rhai", QUICK);
    let st = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(p.dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "chown needs root");
    let svc = Service::start_as(&p, &[], Some("nobody"));
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    let out = trigger(&p, "a");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("owner-only"),
        "{err}"
    );
    assert!(svc.status()["runs"]["recent"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn sigterm_lets_the_run_finish_its_step_and_exits_zero() {
    let p = Project::new();
    p.write("scripts/slow.rhai", SLOW);
    let mut svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    assert!(trigger(&p, "slow").status.success());
    let (s, _) = svc.wait(Duration::from_secs(2), "run in flight", |s| {
        // Progress is reported once the journal header is written.
        s["runs"]["in_flight"][0]["progress"]["in_progress"] == 1
    });
    let run = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = Instant::now();
    let st = svc.terminate();
    assert!(st.success(), "{st:?} {:#?}", svc.output());
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "the host step was not cut short"
    );
    assert!(svc.output().iter().any(|l| l == "stopped"));
    assert!(!p.socket().exists(), "socket removed");
    let kinds = journal_kinds(&p, &run);
    assert_eq!(kinds[0], "run.start");
}

/// The library-level service: a launcher with its own `sleep_ms`, runs pinned to
/// their generation, journals naming that generation's hashes.
#[test]
fn service_pins_generations_for_runs_library_level() {
    use patchbook::script::Compiler;
    use patchbook::watch::launcher::JournalTarget;
    use patchbook::watch::{Inputs, ScriptLauncher, Service as Svc};

    let p = Project::new();
    let v1 = "sleep_ms(600);\n1\n";
    p.write("scripts/nap.rhai", v1);
    let inputs = Inputs {
        playbook_dir: p.path("scripts"),
        compiler: Compiler::new(Default::default(), vec![p.path("stdlib")]),
    };
    let launcher = ScriptLauncher::new(Default::default())
        .with_journal(JournalTarget {
            state_dir: p.path("state"),
            operator: "tester".into(),
        })
        .with_engine_hook(Arc::new(|e: &mut rhai::Engine| {
            e.register_fn("sleep_ms", |ms: i64| {
                std::thread::sleep(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
            });
        }));
    let svc = Svc::new(
        inputs,
        Arc::new(launcher),
        patchbook::rollout::Clock::system(),
    );
    assert!(matches!(
        svc.reload(false),
        patchbook::watch::ReloadOutcome::Live { generation: 1, .. }
    ));
    assert!(matches!(
        svc.reload(false),
        patchbook::watch::ReloadOutcome::Unchanged
    ));
    let run1 = svc
        .trigger("nap", patchbook::watch::Cause::Trigger)
        .unwrap();
    let v2 = "sleep_ms(10);\n2\n";
    p.write("scripts/nap.rhai", v2);
    assert!(matches!(
        svc.reload(false),
        patchbook::watch::ReloadOutcome::Live { generation: 2, .. }
    ));
    assert!(matches!(
        svc.trigger("nap", patchbook::watch::Cause::Trigger),
        Err(patchbook::watch::TriggerError::AlreadyRunning { .. })
    ));
    svc.shutdown();
    let header = |run: &str| -> Value {
        let text = std::fs::read_to_string(p.path(&format!("state/runs/{run}.jsonl"))).unwrap();
        serde_json::from_str::<Value>(text.lines().next().unwrap()).unwrap()["data"].clone()
    };
    assert_eq!(header(&run1)["playbook_sha256"], sha(v1).as_str());
    let run2 = svc.trigger("nap", patchbook::watch::Cause::Trigger);
    assert_eq!(run2, Err(patchbook::watch::TriggerError::ShuttingDown));
}

// The lab tests below start real hosts: built with `--features lab` only.
#[cfg(feature = "lab")]
mod support;

/// A project whose settings are the lab's: its hosts, key and known_hosts.
#[cfg(feature = "lab")]
fn lab_project(lab: &support::Lab) -> Project {
    let p = Project::new();
    let lab_cfg = std::fs::read_to_string(lab.dir().join("patchbook.toml")).unwrap();
    p.write(
        "patchbook.toml",
        &lab_cfg.replace(
            "inventory = [\"inventory.toml\"]",
            &format!(
                "inventory = [\"{}\"]",
                lab.dir().join("inventory.toml").display()
            ),
        ),
    );
    p
}

/// The same pinning on a 10-host lab over SSH, with a pause between waves so the
/// edit lands while the run is half done.
#[cfg(feature = "lab")]
#[test]
fn an_edit_during_a_run_on_a_ten_host_lab_does_not_change_that_run() {
    let lab = support::Lab::start(10);
    let p = lab_project(&lab);
    let v1 = "rollout(hosts(\"all\"), #{ waves: [\"50%\", \"100%\"], pause: \"3s\" }, |h| { exec(h, [\"true\"]); });\n";
    p.write("scripts/fleet.rhai", v1);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    let out = trigger(&p, "fleet");
    assert!(out.status.success(), "{out:?}");
    let (s, _) = svc.wait(Duration::from_secs(5), "the first wave done", |s| {
        s["runs"]["in_flight"][0]["progress"]["done"] == 5
    });
    let run1 = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v2 = format!("// v2\n{v1}");
    p.write("scripts/fleet.rhai", &v2);
    let (s, _) = svc.wait(Duration::from_secs(1), "edit live during the pause", |s| {
        generation(s) == 2
    });
    assert_eq!(
        s["runs"]["in_flight"][0]["run_id"],
        run1.as_str(),
        "still the same run"
    );
    assert_eq!(s["runs"]["in_flight"][0]["sha256"], sha(v1).as_str());
    svc.wait(Duration::from_secs(30), "first run ends", |s| {
        s["runs"]["in_flight"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    assert_eq!(
        journal_header(&p, &run1)["playbook_sha256"],
        sha(v1).as_str()
    );
    let done = std::fs::read_to_string(p.path(&format!(".patchbook/runs/{run1}.jsonl")))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"host_done\""))
        .count();
    assert_eq!(done, 10, "every host finished on the old generation");

    let out = trigger(&p, "fleet");
    assert!(out.status.success(), "{out:?}");
    let (s, _) = svc.wait(Duration::from_secs(5), "second run", |s| {
        s["runs"]["in_flight"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    let run2 = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(run1, run2);
    // The run's journal may be created a moment before its first record lands.
    let journal2 = p.path(&format!(".patchbook/runs/{run2}.jsonl"));
    let t0 = Instant::now();
    while std::fs::read_to_string(&journal2)
        .map(|t| t.lines().next().is_none())
        .unwrap_or(true)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "run {run2} wrote no journal header"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        journal_header(&p, &run2)["playbook_sha256"],
        sha(&v2).as_str()
    );
}

/// SIGTERM in the middle of a lab rollout: hosts in flight finish, the rest stay
/// pending, the service exits 0, and `run --resume` patches up the rest.
#[cfg(feature = "lab")]
#[test]
fn sigterm_mid_rollout_then_run_resume_finishes_the_fleet() {
    let lab = support::Lab::start(10);
    let p = lab_project(&lab);
    p.write(
        "scripts/fleet.rhai",
        "rollout(hosts(\"all\"), #{ waves: [\"50%\", \"100%\"], pause: \"3s\" }, |h| { exec(h, [\"true\"]); });\n",
    );
    let mut svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    assert!(trigger(&p, "fleet").status.success());
    let (s, _) = svc.wait(Duration::from_secs(5), "the first wave done", |s| {
        s["runs"]["in_flight"][0]["progress"]["done"] == 5
    });
    let run = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(svc.terminate().success());
    let journal = p.path(&format!(".patchbook/runs/{run}.jsonl"));
    let count = |what: &str| {
        std::fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    };
    assert_eq!(count("\"kind\":\"host_done\""), 5);
    assert_eq!(
        count("\"kind\":\"halted\""),
        1,
        "the run records why it stopped"
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(p.path("patchbook.toml"))
        .arg("--state-dir")
        .arg(p.path(".patchbook"))
        .args(["-q", "run", "--resume", &run])
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The five done hosts were not touched again; the five pending ones ran.
    assert_eq!(count("\"kind\":\"host_started\""), 10);
    assert_eq!(count("\"kind\":\"host_done\""), 10);
}

/// A playbook asleep in `sleep(100000)` does not hold up SIGTERM: the sleep
/// wakes on the service's stop, the run is closed, the service exits.
#[test]
fn sigterm_wakes_a_sleeping_playbook() {
    let p = Project::new();
    p.write("scripts/nap.rhai", "sleep(100000);\n");
    let mut svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    assert!(trigger(&p, "nap").status.success());
    let (s, _) = svc.wait(Duration::from_secs(5), "run in flight", |s| {
        s["runs"]["in_flight"][0]["run_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    });
    let run = s["runs"]["in_flight"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Asleep for a moment first: the stop must wake the sleep, not race it.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    svc.terminate();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?} with a playbook asleep: {:#?}",
        t0.elapsed(),
        svc.output()
    );
    assert_eq!(journal_kinds(&p, &run).last().unwrap(), "run.close");
}

/// Scripts that grow values by copying or nesting them (closure chains, curry
/// chains, curried arrays and maps, maps in maps) end their run as failed with a
/// sandbox error; the service stays up and runs the next playbook.
#[test]
fn sandbox_bombs_fail_their_run_and_the_service_stays_up() {
    let bombs = [
        (
            "closures",
            "let f = || 0; for i in 0..1000000 { let g = f; f = || g; }\n",
        ),
        (
            "curry",
            "let f = || 0; for i in 0..1000000 { f = f.curry(f); }\n",
        ),
        (
            "chain",
            "let f = |x| x; for i in 0..1000000 { f = f.curry(i); }\n",
        ),
        (
            "curried_arrays",
            "let f = || 0; let a = []; for i in 0..1000000 { a = [f.curry(a), f.curry(a)]; }\n",
        ),
        (
            "maps",
            "let m = #{}; for i in 0..1000000 { m = #{ x: m }; }\n",
        ),
    ];
    let p = Project::new();
    p.write(
        "patchbook.toml",
        "inventory = [\"inv.toml\"]\n[limits]\nmax_operations = 2000000\n",
    );
    for (name, src) in bombs {
        p.write(&format!("scripts/{name}.rhai"), src);
    }
    p.write("scripts/quick.rhai", QUICK);
    let svc = Service::start(&p, &[]);
    svc.wait(Duration::from_secs(5), "first generation", |s| {
        generation(s) == 1
    });
    for (name, _) in bombs {
        let t0 = Instant::now();
        let out = trigger(&p, name);
        assert!(out.status.success(), "{name}: {out:?}");
        let (s, _) = svc.wait(Duration::from_secs(30), &format!("{name} ends"), |s| {
            s["runs"]["recent"][0]["playbook"] == name
        });
        let r = &s["runs"]["recent"][0];
        assert_eq!(r["ok"], false, "{name}: {r:#}");
        let summary = r["summary"].as_str().unwrap_or_default();
        assert!(
            [
                "nests deeper",
                "curried values",
                "too large",
                "Too many operations"
            ]
            .iter()
            .any(|m| summary.contains(m)),
            "{name}: {summary}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{name} took {:?}",
            t0.elapsed()
        );
        // The run is closed, not left open for a resume.
        let run = r["run_id"].as_str().filter(|r| !r.is_empty()).unwrap();
        assert_eq!(
            journal_kinds(&p, run).last().unwrap(),
            "run.close",
            "{name}"
        );
    }
    // Still up: the next playbook runs and succeeds.
    assert!(trigger(&p, "quick").status.success());
    let (s, _) = svc.wait(Duration::from_secs(10), "quick ends", |s| {
        s["runs"]["recent"][0]["playbook"] == "quick"
    });
    assert_eq!(s["runs"]["recent"][0]["ok"], true, "{s:#}");
}
