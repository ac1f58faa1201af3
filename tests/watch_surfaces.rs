//! The `watch` service's control surfaces under hostile local use: the status
//! page's connection budget, idle timeout and Host check, symlinks out of the
//! playbook folder, `--socket` pointing at a file, and absurd clock speeds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/watch.rs"]
mod watch_process;
use watch_process::WatchProcess;

const BIN: &str = env!("CARGO_BIN_EXE_patchbook");
const QUICK: &str = "let x = 1;\nx + 1\n";

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
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
        std::fs::write(dir.path().join("scripts/a.rhai"), QUICK).unwrap();
        Project { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn socket(&self) -> PathBuf {
        self.path(".patchbook/control.sock")
    }
    fn watch(&self, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["watch", "--listen", "127.0.0.1:0"])
            .args(extra)
            .current_dir(self.dir.path())
            .env("PATCHBOOK_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// The service under test: the shared `watch` process plus the probes these
/// tests need (any Host header, its open descriptors).
struct Service(WatchProcess);

impl std::ops::Deref for Service {
    type Target = WatchProcess;
    fn deref(&self) -> &WatchProcess {
        &self.0
    }
}

impl Service {
    fn start(p: &Project) -> Self {
        Self::start_cmd(p.watch(&[], &[]))
    }

    fn start_cmd(cmd: Command) -> Self {
        Service(WatchProcess::start(cmd))
    }

    fn request(&self, path: &str, host: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    fn get(&self, path: &str) -> String {
        self.request(path, &self.addr.clone())
    }

    fn status_text(&self) -> String {
        let r = self.get("/status.json");
        r.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or(r)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn wait_generation(svc: &Service) {
    let t0 = Instant::now();
    while !svc.status_text().contains("\"number\": 1") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no generation");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's descriptor limit so the test can hold 1,100 sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain libc call on values this test owns; no memory is shared.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max.min(8192);
    // SAFETY: a plain libc call on values this test owns; no memory is shared.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

#[test]
fn a_regular_file_at_the_socket_path_is_never_deleted() {
    let p = Project::new();
    std::fs::write(p.path("important.txt"), "keep me\n").unwrap();
    std::fs::create_dir_all(p.path("adir")).unwrap();
    std::os::unix::fs::symlink(p.path("important.txt"), p.path("link.sock")).unwrap();
    for (arg, kind) in [
        ("./important.txt", "regular file"),
        ("./adir", "directory"),
        ("./link.sock", "symlink"),
    ] {
        let out = p
            .watch(&["--socket", arg], &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{arg}: {err}");
        assert!(err.contains("not a socket") && err.contains(kind), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(p.path("important.txt")).unwrap(),
        "keep me\n"
    );
    assert!(p.path("adir").is_dir());
    assert!(std::fs::symlink_metadata(p.path("link.sock")).is_ok());
}

#[test]
fn absurd_clock_speeds_are_a_clear_error_not_a_panic() {
    let p = Project::new();
    for speed in ["1e308", "NaN", "inf", "-5", "0"] {
        let out = p
            .watch(
                &[],
                &[
                    ("PATCHBOOK_NOW", "2026-11-28T05:50:00Z"),
                    ("PATCHBOOK_CLOCK_SPEED", speed),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{speed}");
        assert!(!err.contains("panicked"), "{speed}: {err}");
        assert_ne!(out.status.code(), Some(101), "{speed}: {err}");
        assert!(err.contains("PATCHBOOK_CLOCK_SPEED"), "{speed}: {err}");
    }
}

#[test]
fn a_foreign_host_header_is_refused() {
    let p = Project::new();
    let svc = Service::start(&p);
    wait_generation(&svc);
    for host in [
        "evil.example",
        "evil.example:80",
        "rebind.attacker.test:1234",
    ] {
        let r = svc.request("/status.json", host);
        assert!(r.starts_with("HTTP/1.1 421"), "{host}: {r}");
        assert!(!r.contains("generation"), "{r}");
    }
    let port = svc.addr.rsplit_once(':').unwrap().1.to_string();
    for host in [svc.addr.clone(), format!("localhost:{port}")] {
        let r = svc.request("/status.json", &host);
        assert!(r.starts_with("HTTP/1.1 200"), "{host}: {r}");
    }
}

#[test]
fn a_symlink_out_of_the_playbook_folder_is_never_shown() {
    let p = Project::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("secret"),
        "TOPSECRET-line-one ( {\nmore\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), p.path("scripts/leak.rhai")).unwrap();
    std::fs::create_dir_all(outside.path().join("d")).unwrap();
    std::fs::write(outside.path().join("d/x.rhai"), "TOPSECRET-in-dir (\n").unwrap();
    let svc = Service::start(&p);
    let t0 = Instant::now();
    let s = loop {
        let s = svc.status_text();
        if s.contains("leak.rhai") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!s.contains("TOPSECRET"), "{s}");
    assert!(s.contains("symlink"), "{s}");
    let _ = Path::new("");
    // A linked folder is held to the same rule.
    std::fs::remove_file(p.path("scripts/leak.rhai")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("d"), p.path("scripts/d")).unwrap();
    let t0 = Instant::now();
    loop {
        let s = svc.status_text();
        assert!(!s.contains("TOPSECRET"), "{s}");
        if s.contains("scripts/d") && s.contains("symlink") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn eleven_hundred_idle_connections_neither_exhaust_descriptors_nor_block_trigger() {
    raise_nofile();
    let p = Project::new();
    let svc = Service::start(&p);
    wait_generation(&svc);
    // 100 event streams that never read, then 1,000 connections that never speak.
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(&svc.addr).unwrap();
        let _ = write!(s, "GET /events HTTP/1.1\r\nHost: {}\r\n\r\n", svc.addr);
        held.push(s);
    }
    for _ in 0..1000 {
        if let Ok(s) = TcpStream::connect(&svc.addr) {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds = svc.fds();
    assert!(fds < 400, "service holds {fds} descriptors");
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args(["trigger", "a", "--socket"])
        .arg(p.socket())
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Idle connections time out and free their slots: the page answers again.
    let t0 = Instant::now();
    loop {
        let s = svc.status_text();
        if s.contains("\"recent\"") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "page never recovered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(held);
}

#[test]
fn trigger_passes_params_and_watch_says_when_a_run_starts_and_ends() {
    let p = Project::new();
    std::fs::write(
        p.path("scripts/greet.rhai"),
        "log(`greeting ${param(\"who\")}`);\n",
    )
    .unwrap();
    // The default log level, as an operator starts it.
    let mut cmd = p.watch(&[], &[]);
    cmd.env_remove("PATCHBOOK_LOG");
    let svc = Service::start_cmd(cmd);
    wait_generation(&svc);
    let out = Command::new(BIN)
        .args(["trigger", "greet", "--param", "who=alice", "--socket"])
        .arg(p.socket())
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run = stdout
        .split_whitespace()
        .nth(2)
        .expect("started run RUN on generation N")
        .to_string();
    let t0 = Instant::now();
    loop {
        let lines = svc.out.lock().unwrap().clone();
        let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
        if has(&format!("run {run} started")) && has(&format!("run {run} ended, ok")) {
            assert!(has("greeting alice"), "{lines:#?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no start/end lines for {run}: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The run's journal holds the message and the param's digest, not its value.
    let journal = std::fs::read_to_string(p.path(&format!(".patchbook/runs/{run}.jsonl"))).unwrap();
    assert!(journal.contains("\"kind\":\"log\""), "{journal}");
    assert!(journal.contains("\"who\""), "{journal}");
}

/// The value of one sample line (`name{labels} value`) of a `/metrics` body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn metrics_count_reloads_runs_and_hosts_of_a_live_watch() {
    let p = Project::new();
    std::fs::write(
        p.path("scripts/fleet.rhai"),
        "rollout(hosts(\"all\"), #{}, |h| { exec(h, [\"true\"]); });\n",
    )
    .unwrap();
    let svc = Service::start(&p);
    wait_generation(&svc);
    let metrics = || {
        let r = svc.get("/metrics");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        body.to_string()
    };
    let m = metrics();
    assert_eq!(
        sample(&m, "patchbook_reloads_total{result=\"live\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "patchbook_generation"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "patchbook_reload_duration_seconds_count"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "patchbook_runs_total{outcome=\"ok\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(!m.contains("last_scan_open_cves"), "no scan ran: {m}");

    // One run over the inventory's one local host.
    let out = Command::new(BIN)
        .args(["trigger", "fleet", "--socket"])
        .arg(p.socket())
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let t0 = Instant::now();
    let m = loop {
        let m = metrics();
        if sample(&m, "patchbook_runs_total{outcome=\"ok\"}") == Some(1.0) {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the run never ended ok: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let hosts = |state: &str| {
        sample(
            &m,
            &format!("patchbook_hosts{{playbook=\"fleet\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(hosts("targeted"), Some(1.0), "{m}");
    assert_eq!(hosts("done"), Some(1.0), "{m}");
    assert_eq!(hosts("failed"), Some(0.0), "{m}");
    assert_eq!(sample(&m, "patchbook_runs_started_total"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "patchbook_runs_in_flight"), Some(0.0), "{m}");

    // A broken save is rejected and timed; the live generation stays.
    std::fs::write(p.path("scripts/a.rhai"), "let x = ;\n").unwrap();
    let t0 = Instant::now();
    let m = loop {
        let m = metrics();
        if sample(&m, "patchbook_reloads_total{result=\"rejected\"}") == Some(1.0) {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no rejected reload: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sample(&m, "patchbook_reload_duration_seconds_count"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(sample(&m, "patchbook_generation"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "patchbook_reloads_total{result=\"live\"}"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn metrics_refuse_foreign_hosts_and_malformed_requests() {
    let p = Project::new();
    let svc = Service::start(&p);
    wait_generation(&svc);
    let r = svc.request("/metrics", "evil.example");
    assert!(r.starts_with("HTTP/1.1 421"), "{r}");
    assert!(!r.contains("patchbook_"), "{r}");
    // Not HTTP at all: refused by the HTTP stack, not answered with data.
    let mut s = TcpStream::connect(&svc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/9\0\r\n\r\n").unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    assert!(!r.contains("patchbook_"), "{r}");
    // The page still answers afterwards.
    assert!(svc.get("/metrics").contains("patchbook_generation"));
}
