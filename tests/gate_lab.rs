//! Metric gates between waves, against a real Prometheus (Debian's `prometheus`,
//! started here on loopback with its own config and data folder) scraping a small
//! exporter this test serves: its `acme_errors` goes up once a host the test has
//! marked as breaking runs the new package. Lab hosts are real sshd hosts with a
//! real dpkg database; the verdicts are read from the journal.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbook::journal::read_records;
use serde_json::Value;
use support::{lab_project, patch_params, patchbook_in, run_ids, text, Lab};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `/metrics` with `acme_errors`: 3 while `breaking` is set and `watched` (a lab
/// host's dpkg status file) shows acme-agent 1.0.1, 0 otherwise.
struct Exporter {
    port: u16,
    breaking: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    fn start(watched: PathBuf) -> Exporter {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let breaking = Arc::new(AtomicBool::new(true));
        let (s, b) = (server.clone(), breaking.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                let status = std::fs::read_to_string(&watched).unwrap_or_default();
                let patched = patchbook::lab::status_version(&status, "acme-agent").as_deref()
                    == Some("1.0.1");
                let errors = if b.load(Ordering::SeqCst) && patched {
                    3
                } else {
                    0
                };
                let body = format!("# TYPE acme_errors gauge\nacme_errors {errors}\n");
                let _ = req.respond(tiny_http::Response::from_string(body));
            }
        });
        Exporter {
            port,
            breaking,
            server,
            thread: Some(thread),
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Prometheus of this test's own, scraping one target every second.
struct Prometheus {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let bin = ["/usr/bin/prometheus", "/usr/sbin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("prometheus is missing: run `.ci/setup` as root");
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: acme\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    // Dies with the test process, even if it is killed.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("prometheus starts");
        let p = Prometheus {
            child: Some(child),
            port,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if ureq::get(&format!("{}/-/ready", p.url()))
                .timeout(Duration::from_secs(1))
                .call()
                .is_ok()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "prometheus never became ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until Prometheus has scraped `acme_errors` as `value`.
    fn wait_for(&self, value: &str) {
        let started = Instant::now();
        loop {
            let body: Value = ureq::get(&format!("{}/api/v1/query", self.url()))
                .query("query", "acme_errors")
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            if body["data"]["result"][0]["value"][1] == value {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "prometheus never scraped acme_errors {value}: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

const GATED: &str = r#"
let fresh = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let old = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("lab01:lab02:lab03"), #{
    pilot: ["lab01"], waves: [1, 1], parallel: 1,
    gate: #{ prometheus: param("prometheus"), query: "max(acme_errors)", max: 0, soak: "3m",
             timeout: "5s" },
    on_gate_fail: param("on_gate_fail", "stop"),
}, |host| {
    deploy(host, fresh, #{ rollback_to: old });
    verify(host, "acme-agent", "1.0.1");
});
"#;

fn run(dir: &Path, args: &[&str], lab: &Lab, prometheus: &str, extra: &[&str]) -> Output {
    let mut cmd = patchbook_in(dir);
    cmd.arg("-q")
        .args(args)
        // Three clock minutes of soak take three real seconds.
        .env("PATCHBOOK_NOW", "2026-11-28T02:00:00Z")
        .env("PATCHBOOK_CLOCK_SPEED", "60");
    if args[0] == "run" && args[1] != "--resume" {
        cmd.args(patch_params(lab))
            .args(["--param", &format!("prometheus={prometheus}")])
            .args(extra);
    }
    cmd.output().expect("patchbook runs")
}

fn rollout_events(dir: &Path, run: &str) -> Vec<Value> {
    read_records(&dir.join("state/runs").join(format!("{run}.jsonl")))
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "rollout.event")
        .map(|r| r.data)
        .collect()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

fn last_summary(events: &[Value]) -> Value {
    of_kind(events, "run_done").last().expect("run_done")["summary"].clone()
}

#[test]
fn a_failing_gate_halts_after_the_soak_and_a_resume_goes_on_once_healthy() {
    let lab = Lab::start(3);
    let exporter = Exporter::start(lab.host("lab02").unwrap().dir.join("dpkg/status"));
    let prom = Prometheus::start(exporter.port);
    prom.wait_for("0");
    let project = lab_project(&lab, "gate-", "");
    let dir = project.path();
    std::fs::write(dir.join("play.rhai"), GATED).unwrap();

    let play = dir.join("play.rhai").display().to_string();
    let out = run(dir, &["run", &play], &lab, &prom.url(), &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let run_id = run_ids(&dir.join("state"))
        .pop()
        .unwrap_or_else(|| panic!("no run: {}", text(&out)));
    let events = rollout_events(dir, &run_id);
    let gates = of_kind(&events, "gate_evaluated");
    assert_eq!(gates.len(), 2, "{gates:?}");
    // After the pilot nothing is broken yet: the gate passes after its soak.
    assert_eq!(gates[0]["after_wave"], 0);
    assert_eq!(gates[0]["passed"], true, "{}", gates[0]);
    assert_eq!(gates[0]["value"], 0.0);
    assert_eq!(gates[0]["soaked_seconds"], 180.0);
    // lab02 (wave 1) breaks the metric: the gate after it fails.
    assert_eq!(gates[1]["after_wave"], 1);
    assert_eq!(gates[1]["passed"], false, "{}", gates[1]);
    assert_eq!(gates[1]["value"], 3.0);
    assert_eq!(of_kind(&events, "soaking").len(), 2);
    let summary = last_summary(&events);
    assert_eq!(summary["stop"]["kind"], "gate_stopped", "{summary}");
    assert_eq!(summary["totals"]["done"], 2, "{summary}");
    assert_eq!(summary["totals"]["pending"], 1, "{summary}");
    // Stopped, not rolled back: the wave before the gate keeps its patch.
    assert_eq!(
        lab.installed_version("lab02", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    assert_eq!(
        lab.installed_version("lab03", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    assert!(!lab.dpkg_log("lab03").unwrap().contains("1.0.1"));

    // Still unhealthy: the resume asks the gate first and starts nothing.
    prom.wait_for("3");
    let out = run(dir, &["run", "--resume", &run_id], &lab, &prom.url(), &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let events = rollout_events(dir, &run_id);
    let gates = of_kind(&events, "gate_evaluated");
    assert_eq!(gates.len(), 3);
    assert_eq!(gates[2]["passed"], false, "{}", gates[2]);
    assert_eq!(gates[2]["soaked_seconds"], 0.0);
    assert_eq!(last_summary(&events)["stop"]["kind"], "gate_stopped");
    assert_eq!(
        lab.installed_version("lab03", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );

    // Healthy again: the resume passes the gate and patches the pending host.
    exporter.breaking.store(false, Ordering::SeqCst);
    prom.wait_for("0");
    let out = run(dir, &["run", "--resume", &run_id], &lab, &prom.url(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let events = rollout_events(dir, &run_id);
    let gates = of_kind(&events, "gate_evaluated");
    assert_eq!(gates.len(), 4);
    assert_eq!(gates[3]["passed"], true, "{}", gates[3]);
    assert_eq!(last_summary(&events)["stop"]["kind"], "completed");
    assert_eq!(
        lab.installed_version("lab03", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );

    // The report lists every evaluation.
    let mut cmd = patchbook_in(dir);
    let out = cmd
        .args(["report", &run_id, "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let passed: Vec<bool> = report["gates"]
        .as_array()
        .expect("gates in the report")
        .iter()
        .map(|g| g["passed"].as_bool().unwrap())
        .collect();
    assert_eq!(passed, [true, false, false, true]);
    // The controller sampled itself during each of the three rollouts.
    let controller = &report["controller"];
    assert!(controller["samples"].as_u64().unwrap() >= 6, "{controller}");
    assert!(
        controller["peak_rss_kib"].as_u64().unwrap() > 0,
        "{controller}"
    );
    assert!(
        controller["max_sockets"].as_u64().unwrap() >= 1,
        "{controller}"
    );
    let out = patchbook_in(dir)
        .args(["report", &run_id])
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("## Gates between waves"), "{md}");
    assert!(md.contains("## Controller"), "{md}");
    assert!(md.contains(r"max(acme\_errors)"), "{md}");
}

#[test]
fn prometheus_down_fails_the_gate_and_can_roll_the_wave_back() {
    let lab = Lab::start(3);
    let exporter = Exporter::start(lab.host("lab02").unwrap().dir.join("dpkg/status"));
    let mut prom = Prometheus::start(exporter.port);
    let url = prom.url();
    prom.stop();
    let project = lab_project(&lab, "gate-down-", "");
    let dir = project.path();
    std::fs::write(dir.join("play.rhai"), GATED).unwrap();

    let play = dir.join("play.rhai").display().to_string();
    let out = run(
        dir,
        &["run", &play],
        &lab,
        &url,
        &["--param", "on_gate_fail=rollback_wave"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let run_id = run_ids(&dir.join("state"))
        .pop()
        .unwrap_or_else(|| panic!("no run: {}", text(&out)));
    let events = rollout_events(dir, &run_id);
    let gates = of_kind(&events, "gate_evaluated");
    assert_eq!(gates.len(), 1, "{gates:?}");
    assert_eq!(gates[0]["passed"], false);
    assert!(
        gates[0]["detail"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{}",
        gates[0]
    );
    let rolled: Vec<&Value> = of_kind(&events, "rolled_back");
    assert_eq!(rolled.len(), 1, "{rolled:?}");
    assert_eq!(rolled[0]["host"], "lab01");
    assert_eq!(rolled[0]["cause"], "gate_failed");
    let summary = last_summary(&events);
    assert_eq!(summary["stop"]["kind"], "gate_stopped", "{summary}");
    assert_eq!(summary["totals"]["pending"], 2, "{summary}");
    assert_eq!(summary["totals"]["reverted"], 1, "{summary}");
    for h in ["lab01", "lab02", "lab03"] {
        assert_eq!(
            lab.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h}"
        );
    }
    assert!(!lab.dpkg_log("lab02").unwrap().contains("1.0.1"));
}
