//! The journal on real hosts: rollback from the record after a controller restart,
//! crash-safe resume after SIGKILL at twenty points of a rollout, and a secret
//! canary that must never reach the disk, the terminal or a notification.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use patchbook::journal::read_records;
use support::Lab;

const PATCH: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{ waves: ["25%", "100%"], parallel: param("parallel", "4").parse_int() }, |host| {
    backup(host, ["/etc/acme", "/opt/acme"]);
    deploy(host, good, #{ rollback_to: previous });
    verify(host, "acme-agent", "1.0.1");
});
"#;

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    playbook: PathBuf,
    state: PathBuf,
    params: Vec<String>,
}

fn setup(lab: &Lab, playbook: &str, extra_config: &str) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("journal-lab-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let lab_cfg = std::fs::read_to_string(lab.dir().join("patchbook.toml")).unwrap();
    let lab_cfg = lab_cfg.replace(
        "inventory = [\"inventory.toml\"]",
        &format!(
            "inventory = [\"{}\"]",
            lab.dir().join("inventory.toml").display()
        ),
    );
    let config = dir.path().join("patchbook.toml");
    std::fs::write(&config, format!("{lab_cfg}\n{extra_config}")).unwrap();
    let pb = dir.path().join("play.rhai");
    std::fs::write(&pb, playbook).unwrap();
    let params = support::patch_params(lab);
    Setup {
        state: dir.path().join("state"),
        config,
        playbook: pb,
        params,
        _dir: dir,
    }
}

impl Setup {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_patchbook"));
        c.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args);
        c
    }

    fn run(&self, extra: &[&str]) -> Output {
        let mut c = self.command(&["-q", "run"]);
        c.arg(&self.playbook).args(&self.params).args(extra);
        c.output().unwrap()
    }

    fn runs(&self) -> Vec<String> {
        support::run_ids(&self.state)
    }

    fn audit_ok(&self) -> bool {
        self.command(&["audit", "verify"])
            .output()
            .unwrap()
            .status
            .success()
    }
}

use support::text;

#[test]
fn rollback_after_a_restart_restores_every_host_in_reverse_deployment_order() {
    let lab = Lab::start(10);
    let s = setup(&lab, PATCH, "");
    let out = s.run(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    support::assert_every_host_at(&lab, "1.0.1");
    let run = s.runs().pop().unwrap();
    // A fresh process, knowing nothing but the journal.
    let out = s.command(&["rollback", &run]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    support::assert_every_host_at(&lab, "1.0.0");
    let records = read_records(&s.state.join("runs").join(format!("{run}.jsonl"))).unwrap();
    let first_deploy = |host: &str| {
        records
            .iter()
            .find(|r| {
                r.kind == "step.intent"
                    && r.host.as_deref() == Some(host)
                    && r.data["step"] == "deploy"
            })
            .map(|r| r.ts.clone())
            .unwrap()
    };
    let rollbacks: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.kind == "host.rollback")
        .map(|r| (r.host.clone().unwrap(), r.ts.clone()))
        .collect();
    assert_eq!(rollbacks.len(), 10);
    // Timestamps say: the later a host was deployed, the earlier it was rolled back.
    for pair in rollbacks.windows(2) {
        let ((a, ta), (b, tb)) = (&pair[0], &pair[1]);
        assert!(ta <= tb);
        assert!(
            first_deploy(a) >= first_deploy(b),
            "{a} rolled back before {b} but deployed earlier"
        );
    }
    assert!(s.audit_ok());
    // Idempotent: a second rollback changes nothing.
    let out = s.command(&["rollback", &run]).output().unwrap();
    assert!(
        text(&out).contains("nothing left to undo"),
        "{}",
        text(&out)
    );
}

/// Completed installs of acme-agent 1.0.1 in a host's dpkg log.
fn installs(lab: &Lab, host: &str) -> usize {
    lab.dpkg_log(host)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" status installed acme-agent:all 1.0.1"))
        .count()
}

// Twenty kill points in all, in two halves on fleets of their own, so that the
// halves run side by side: each point is a whole run and a resume.
#[test]
fn sigkill_at_ten_points_then_resume_patches_every_host_exactly_once() {
    sigkill_then_resume(0x5eed_1234_abcd_0001, 0..10);
}

#[test]
fn sigkill_at_ten_more_points_then_resume_patches_every_host_exactly_once() {
    sigkill_then_resume(0x0dd5_eed5_7777_0002, 10..20);
}

/// Kills a run of 20 hosts at one pseudo-random moment per point (`seed` fixes
/// them), resumes it, and checks every host was patched exactly once.
fn sigkill_then_resume(seed: u64, points: std::ops::Range<usize>) {
    let lab = Lab::start(20);
    let s = setup(&lab, PATCH, "");
    // How long an undisturbed run takes, to spread the kill points over it.
    let started = Instant::now();
    let out = s.run(&["--param", "parallel=6"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let full = started.elapsed();
    let mut rng: u64 = seed;
    for point in points {
        for h in lab.hosts() {
            lab.reseed(&h.name).unwrap();
        }
        let before: Vec<usize> = lab
            .hosts()
            .iter()
            .map(|h| installs(&lab, &h.name))
            .collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = full.mul_f64((rng % 1000) as f64 / 1000.0 * 0.9 + 0.02);
        let runs_before = s.runs().len();
        let mut c = s.command(&["-q", "run"]);
        c.arg(&s.playbook)
            .args(&s.params)
            .args(["--param", "parallel=6"]);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        let runs = s.runs();
        if runs.len() == runs_before {
            continue; // killed before the journal existed: nothing to resume
        }
        let run = runs.last().unwrap().clone();
        let out = s
            .command(&["-q", "run", "--resume", &run])
            .args(&s.params)
            .args(["--param", "parallel=6"])
            .output()
            .unwrap();
        if text(&out).contains("never began") {
            // Killed between creating the journal and its header: the refusal
            // must be true, no host touched and the journal still sound.
            assert_eq!(out.status.code(), Some(2), "{}", text(&out));
            for (i, h) in lab.hosts().iter().enumerate() {
                assert_eq!(
                    installs(&lab, &h.name),
                    before[i],
                    "point {point}: {}",
                    h.name
                );
            }
            assert!(s.audit_ok(), "point {point}: audit verify failed");
            continue;
        }
        assert!(
            out.status.success(),
            "point {point} ({at:?}): resume failed: {}",
            text(&out)
        );
        for (i, h) in lab.hosts().iter().enumerate() {
            let v = lab.installed_version(&h.name, "acme-agent").unwrap();
            assert_eq!(
                v.as_deref(),
                Some("1.0.1"),
                "point {point}: {} not patched",
                h.name
            );
            let n = installs(&lab, &h.name) - before[i];
            assert_eq!(
                n, 1,
                "point {point} ({at:?}): {} installed 1.0.1 {n} times",
                h.name
            );
        }
        let records = read_records(&s.state.join("runs").join(format!("{run}.jsonl"))).unwrap();
        for h in lab.hosts() {
            assert!(
                records.iter().any(|r| r.kind == "verify"
                    && r.host.as_deref() == Some(h.name.as_str())
                    && r.data["ok"] == true),
                "point {point}: {} has no passing verify in the journal",
                h.name
            );
        }
        assert!(s.audit_ok(), "point {point}: audit verify failed");
    }
}

/// A loopback HTTP server that keeps every request body it receives.
fn webhook_sink() -> (String, Arc<Mutex<Vec<String>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
            keep.lock()
                .unwrap()
                .push(format!("{:?} {body}", req.headers()));
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
    });
    (url, bodies)
}

fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(p);
            }
        }
    }
    hits
}

/// Every form a secret can take on the way out: as given, JSON-escaped,
/// Debug-formatted, shell-quoted, base64, and each of its longer lines alone.
fn leak_forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let inner = |s: String| s[1..s.len() - 1].to_string();
    let mut forms = vec![
        secret.to_string(),
        inner(serde_json::to_string(secret).unwrap()),
        inner(format!("{secret:?}")),
        patchbook::transport::quote::word(secret),
        base64::engine::general_purpose::STANDARD.encode(secret),
    ];
    forms.extend(secret.lines().filter(|l| l.len() >= 8).map(str::to_string));
    forms.sort();
    forms.dedup();
    forms
}

#[test]
fn a_secret_canary_never_reaches_the_journal_logs_output_or_notifications() {
    let lab = Lab::start(3);
    for canary in [
        "CANARY-7f3a9c1e-do-not-leak",
        // A PEM key: several lines, quotes and backslashes.
        "-----BEGIN CANARY KEY-----\nMIIEvQ\"quoted\"-line-9f2b\nback\\slash\\line-4c1d\n-----END CANARY KEY-----",
        "it's \"CANARY\" with 'quotes' and \\back\\slashes 5e7a",
    ] {
        secret_stays_secret(&lab, canary);
    }
}

fn secret_stays_secret(lab: &Lab, canary: &str) {
    let (url, bodies) = webhook_sink();
    let config = format!(
        "[notify]\nto = [\"hook\"]\nretries = 0\n[notify.channels.hook]\ntype = \"webhook\"\nurl = \"{url}\"\n"
    );
    let playbook = r#"
let token = secret(param("token"));
notify("hook", `deploying with ${token}`);
rollout(hosts("all"), #{ waves: ["100%"], max_failed: 3, timeout: "3s" }, |host| {
    let r = exec(host, ["printf", "%s\n", token]);
    log(`${host.name} answered ${r.stdout}`);
    if host.name == "lab01" { throw `lab01 failed holding ${token}`; }
    if host.name == "lab02" { exec(host, ["sh", "-c", "sleep 20; printf '%s' \"$1\"", "sh", token]); }
});
"#;
    let s = setup(lab, playbook, &config);
    let mut outputs = String::new();
    for mode in [&["-vv"][..], &["--json", "-vv"][..]] {
        let mut c = s.command(mode);
        c.arg("run")
            .arg(&s.playbook)
            .args(["--param", &format!("token={canary}")]);
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        outputs.push_str(&text(&out));
    }
    // The paths were really taken: a failure, a deadline, a notification.
    assert!(outputs.contains("failed holding ***"), "{outputs}");
    assert!(outputs.contains("deadline"), "{outputs}");
    let received = bodies.lock().unwrap().join("\n");
    assert!(received.contains("deploying with ***"), "{received}");
    // The automatic notifications went out too: run started, first failure (the
    // failure's text, redacted), run finished.
    assert!(received.contains("started by"), "{received}");
    assert!(received.contains("failed holding ***"), "{received}");
    assert!(received.contains("patchbook report"), "{received}");
    let report = s
        .command(&["report", "last", "--format", "json"])
        .output()
        .unwrap();
    for form in leak_forms(canary) {
        assert!(
            !outputs.contains(&form),
            "the canary reached stdout or stderr as {form:?}"
        );
        assert!(
            !received.contains(&form),
            "the canary reached a notification as {form:?}"
        );
        let leaks = files_containing(&s.state, &form);
        assert!(leaks.is_empty(), "the canary is in {leaks:?} as {form:?}");
        assert!(
            !text(&report).contains(&form),
            "the canary is in the report as {form:?}"
        );
    }
    // Every record a real run writes (notices, plans, rollout events, host ends)
    // reads back as its typed entry.
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{}", v["problems"]);
}
