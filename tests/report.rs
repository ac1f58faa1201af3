//! Reports rendered from real journals: a 30-host run with failures and rollbacks
//! written through the `Journal` API, rendered as Markdown, JSON and HTML; the HTML
//! opened in headless Chromium; escaping of hostile host output; a crashed run;
//! `report last`; patch levels in `inventory list`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use patchbook::journal::{Journal, RunHeader, Store, UndoStep};
use patchbook::report::{self, Format, Metrics, TestCase, TestKind};
use patchbook::rollout::{
    Counts, HostReport, HostStatus, RollbackCause, RolloutEvent, StopReason, Summary,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[path = "support/store.rs"]
#[macro_use]
mod store;
use store::TestStore;

impl TestStore {
    fn begin(&self, run: &str, operator: &str) -> Journal {
        Journal::begin_in(&self.store, run, operator, &header(), None).unwrap()
    }

    /// `patchbook --state-dir STATE [--store URL] ARGS…` in an empty folder.
    fn patchbook(&self, args: &[&str]) -> Output {
        let cwd = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbook"));
        cmd.current_dir(cwd.path())
            .env_remove("PATCHBOOK_STORE")
            .arg("--state-dir")
            .arg(self.dir.path());
        if let Store::Postgres { url, .. } = &self.store {
            cmd.args(["--store", url]);
        }
        cmd.args(args).output().unwrap()
    }
}

const PKG: &str = "acme-agent";
const HOSTS: usize = 30;
/// Hosts whose deploy fails; the last one's rollback fails too.
const FAILING: [&str; 3] = ["fleet-07", "fleet-15", "fleet-22"];
const ROLLBACK_FAILS: &str = "fleet-22";
/// Host output long enough to be cut in the report.
const LONG_OUTPUT_HOST: &str = "fleet-15";
const DPKG_ERROR: &str = "dpkg: error processing package acme-agent (--install):\n installed acme-agent package post-installation script subprocess returned error exit status 1";

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn host_name(i: usize) -> String {
    format!("fleet-{i:02}")
}

fn header() -> RunHeader {
    RunHeader::new(
        PathBuf::from("scripts/acme-agent.rhai"),
        sha("playbook"),
        BTreeMap::from([("stdlib/patch/debian.rhai".to_string(), sha("debian"))]),
        sha("inventory"),
        json!({"pilot": 2, "waves": ["30%", "100%"], "max_failed": 5, "parallel": 5}),
    )
}

fn event(j: &Journal, e: &RolloutEvent) {
    j.append(None, "rollout.event", serde_json::to_value(e).unwrap())
        .unwrap();
}

fn backup_sha(host: &str) -> String {
    sha(&format!("backup of {host}"))
}

fn reinstall_100() -> UndoStep {
    UndoStep::Reinstall {
        package: PKG.into(),
        artifact_sha256: sha("acme-agent_1.0.0_all.deb"),
        artifact_path: PathBuf::from("cache/artifacts/acme-agent_1.0.0_all.deb"),
        version: "1.0.0".into(),
    }
}

/// The staging checks of a run: one of each kind, two performance checks.
fn staging_checks(j: &Journal) {
    let v = Some("1.0.1".to_string());
    let cases = [
        TestCase::run(
            "agent starts and answers --check",
            TestKind::Functional,
            v.clone(),
            || {
                std::thread::sleep(Duration::from_millis(2));
                Ok(None)
            },
        ),
        TestCase::run(
            "agent reports to the collector",
            TestKind::Integration,
            v.clone(),
            || Ok(None),
        ),
        TestCase::run(
            "p95 check latency",
            TestKind::Performance,
            v.clone(),
            || {
                Ok(Some(Metrics {
                    before: 120.0,
                    after: 126.0,
                    threshold_pct: 10.0,
                    unit: "ms".into(),
                    higher_is_better: false,
                }))
            },
        ),
        TestCase::run(
            "events per second",
            TestKind::Performance,
            v.clone(),
            || {
                Ok(Some(Metrics {
                    before: 5000.0,
                    after: 4100.0,
                    threshold_pct: 15.0,
                    unit: "ev/s".into(),
                    higher_is_better: true,
                }))
            },
        ),
        TestCase::run(
            "CVE-2026-1234 reproducer no longer crashes",
            TestKind::Regression,
            v,
            || Err("reproducer still exits 139 on staging-2".into()),
        ),
    ];
    for case in &cases {
        report::record_test(j, Some("staging-1"), case).unwrap();
    }
}

/// One host's work: backup, deploy (failing for the hosts in [`FAILING`]), verify,
/// health, then its end; failing hosts are rolled back.
fn work_on(j: &Journal, host: &str, wave: usize) {
    let archive = format!("backups/fleet-run/{host}/etc-acme.tar.gz");
    j.append(
        Some(host),
        "backup",
        json!({"id": format!("bk-{host}"), "host": host, "paths": ["/etc/acme", "/opt/acme"],
               "archive": archive, "sha256": backup_sha(host), "size": 20480, "missing": []}),
    )
    .unwrap();
    let fails = FAILING.contains(&host);
    let deploy = j
        .intent(
            host,
            "deploy",
            json!({"package": PKG, "from": "1.0.0", "to": "1.0.1",
                   "artifact": "https://mirror.example.com/pool/acme-agent_1.0.1_all.deb",
                   "sha256": sha("acme-agent_1.0.1_all.deb"), "undo": reinstall_100()}),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let error = fails.then(|| {
        if host == LONG_OUTPUT_HOST {
            format!(
                "{DPKG_ERROR}\n{}",
                "Setting up acme-agent (1.0.1) ...\n".repeat(200)
            )
        } else {
            DPKG_ERROR.to_string()
        }
    });
    j.outcome(
        host,
        deploy,
        !fails,
        json!({"package": PKG, "from": "1.0.0", "after": if fails { "1.0.1 (state half-configured, not fully installed)" } else { "1.0.1" }, "error": error}),
        Some(reinstall_100()),
    )
    .unwrap();
    if fails {
        let reason = format!("{host}: deploy failed: {DPKG_ERROR}");
        j.host_finished(
            host,
            false,
            serde_json::from_value(json!({"error": reason})).unwrap(),
        )
        .unwrap();
        event(
            j,
            &RolloutEvent::HostFailed {
                host: host.into(),
                wave,
                reason,
            },
        );
        let undo = j.undo_intent(host, deploy, &reinstall_100()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        if host == ROLLBACK_FAILS {
            let error =
                format!("{host}: rollback: dpkg -i exited 2: dpkg: error: cannot access archive");
            j.outcome(
                host,
                undo,
                false,
                json!({"undo": "reinstall acme-agent 1.0.0", "error": error}),
                None,
            )
            .unwrap();
            j.host_rolled_back(
                host,
                false,
                serde_json::from_value(json!({"error": error})).unwrap(),
            )
            .unwrap();
            event(
                j,
                &RolloutEvent::RollbackFailed {
                    host: host.into(),
                    cause: RollbackCause::HostFailed,
                    error,
                },
            );
        } else {
            j.outcome(
                host,
                undo,
                true,
                json!({"undo": "reinstall acme-agent 1.0.0", "error": null}),
                None,
            )
            .unwrap();
            j.append(
                Some(host),
                "verify",
                json!({"package": PKG, "expected": "1.0.0", "found": "1.0.0", "ok": true}),
            )
            .unwrap();
            j.host_rolled_back(host, true, Default::default()).unwrap();
            event(
                j,
                &RolloutEvent::RolledBack {
                    host: host.into(),
                    cause: RollbackCause::HostFailed,
                },
            );
        }
        return;
    }
    j.append(
        Some(host),
        "verify",
        json!({"package": PKG, "expected": "1.0.1", "found": "1.0.1", "ok": true}),
    )
    .unwrap();
    j.append(
        Some(host),
        "health",
        json!({"argv": ["/opt/acme/agent.sh", "--check"], "ok": true, "attempts": 1}),
    )
    .unwrap();
    j.host_finished(host, true, Default::default()).unwrap();
    event(
        j,
        &RolloutEvent::HostDone {
            host: host.into(),
            wave,
            seconds: 0.01,
        },
    );
}

/// A closed 30-host run: pilot of 2, waves of 8 and 20, five hosts at a time, three
/// failures (one whose rollback fails), backups, verifies, staging checks, artifact
/// checks and notifications, ending with the executor's summary.
fn fleet_run(state: &Path, run: &str) {
    fleet_run_in(&Store::file(state), run);
}

fn fleet_run_in(store: &Store, run: &str) {
    let j = Journal::begin_in(store, run, "alice", &header(), None).unwrap();
    j.append(
        None,
        "window",
        json!({"spec": "Sat 02:00-06:00 Asia/Hong_Kong", "zone": "Asia/Hong_Kong",
               "start": "2026-11-28T02:00:00+08:00", "end": "2026-11-28T06:00:00+08:00", "buffer": "30m"}),
    )
    .unwrap();
    j.append(
        None,
        "artifact",
        json!({"url": "https://mirror.example.com/pool/acme-agent_1.0.1_all.deb", "checks": [
            {"what": "source", "ok": true, "detail": "mirror.example.com is trusted"},
            {"what": "download", "ok": true, "detail": format!("sha256 {} matches", sha("acme-agent_1.0.1_all.deb"))},
        ]}),
    )
    .unwrap();
    staging_checks(&j);
    j.append(
        None,
        "notify",
        json!({"event": "run_started", "message": "Patching 30 hosts tonight", "severity": "info",
               "deliveries": [
                   {"channel": "ops-webhook", "to": "ops-webhook", "ok": true, "attempts": 1},
                   {"channel": "mail", "to": "ops@example.com", "ok": true, "attempts": 2}]}),
    )
    .unwrap();
    let names: Vec<String> = (1..=HOSTS).map(host_name).collect();
    event(
        &j,
        &RolloutEvent::RunStarted {
            targets: HOSTS,
            waves: 3,
            parallel: 5,
            allowed_failures: 5,
        },
    );
    let waves = [
        (0, "pilot".to_string(), &names[0..2]),
        (1, "wave 1".to_string(), &names[2..10]),
        (2, "wave 2".to_string(), &names[10..30]),
    ];
    let mut first_failure = true;
    for (index, label, hosts) in waves {
        event(
            &j,
            &RolloutEvent::WaveStarted {
                index,
                label,
                hosts: hosts.to_vec(),
            },
        );
        for batch in hosts.chunks(5) {
            for h in batch {
                event(
                    &j,
                    &RolloutEvent::HostStarted {
                        host: h.clone(),
                        wave: index,
                    },
                );
            }
            for h in batch {
                work_on(&j, h, index);
                if FAILING.contains(&h.as_str()) && first_failure {
                    first_failure = false;
                    j.append(
                        None,
                        "notify",
                        json!({"event": "first_failure", "message": format!("{h} failed; rolled back"), "severity": "critical",
                               "deliveries": [{"channel": "pager", "to": "oncall", "ok": false, "attempts": 3,
                                               "error": "HTTP 503 from pager.example.com"}]}),
                    )
                    .unwrap();
                }
            }
        }
    }
    let mut hosts = Vec::new();
    let (mut web, mut db, mut totals) = (Counts::default(), Counts::default(), Counts::default());
    for (i, name) in names.iter().enumerate() {
        let failed = FAILING.contains(&name.as_str());
        let rollback_error = (name == ROLLBACK_FAILS).then(|| "dpkg -i exited 2".to_string());
        let h = HostReport {
            name: name.clone(),
            wave: if i < 2 {
                0
            } else if i < 10 {
                1
            } else {
                2
            },
            state: if failed {
                HostStatus::Failed
            } else {
                HostStatus::Done
            },
            reason: failed.then(|| "deploy failed".into()),
            started: None,
            ended: None,
            rolled_back: failed && rollback_error.is_none(),
            rollback_error,
        };
        for c in [&mut totals, if i < 15 { &mut web } else { &mut db }] {
            c.targeted += 1;
            if failed {
                c.failed += 1;
            } else {
                c.done += 1;
            }
            c.rolled_back += usize::from(h.rolled_back);
            c.rollback_failed += usize::from(h.rollback_error.is_some());
        }
        hosts.push(h);
    }
    event(
        &j,
        &RolloutEvent::RunDone {
            summary: Summary {
                stop: StopReason::Completed,
                allowed_failures: 5,
                allowed_unreachable: 5,
                totals,
                per_group: BTreeMap::from([("web".to_string(), web), ("db".to_string(), db)]),
                hosts,
                completion_order: vec![],
                rollback_order: vec![],
            },
        },
    );
    j.append(
        None,
        "notify",
        json!({"event": "run_finished", "message": "27 of 30 patched, 3 failed", "severity": "warning",
               "deliveries": [{"channel": "ops-webhook", "to": "ops-webhook", "ok": true, "attempts": 1}]}),
    )
    .unwrap();
    j.close().unwrap();
}

fn patchbook(state: &Path, args: &[&str]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(cwd.path())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

fn ok_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Markdown with every fenced block removed: what a renderer would parse as markup.
fn outside_fences(md: &str) -> String {
    let mut out = String::new();
    let mut fence: Option<String> = None;
    for line in md.lines() {
        let ticks: String = line.chars().take_while(|c| *c == '`').collect();
        match &fence {
            Some(f) if line.trim_end() == f => fence = None,
            Some(_) => {}
            None if ticks.len() >= 3 => fence = Some(ticks),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn markdown_report_of_a_30_host_run() {
    let state = tempfile::tempdir().unwrap();
    fleet_run(state.path(), "fleet-run");
    let md = report::render(state.path(), "fleet-run", Format::Markdown).unwrap();

    assert!(md.contains("**Operator:** alice"), "{md}");
    assert!(md.contains("Sat 02:00-06:00 Asia/Hong\\_Kong"), "{md}");
    assert!(md.contains(&format!(
        "`scripts/acme-agent.rhai` sha256 `{}`",
        sha("playbook")
    )));
    assert!(md.contains(&format!(
        "module `stdlib/patch/debian.rhai` sha256 `{}`",
        sha("debian")
    )));
    // targeted, done, failed, unreachable, reverted, rolled back, rollback failed,
    // in progress, unknown, pending
    assert!(
        md.contains("| 30 | 27 | 3 | 0 | 0 | 2 | 1 | 0 | 0 | 0 |"),
        "{md}"
    );
    // Per group: the same columns.
    assert!(
        md.contains("| web | 15 | 13 | 2 | 0 | 0 | 2 | 0 | 0 | 0 | 0 |"),
        "{md}"
    );
    assert!(
        md.contains("| db | 15 | 14 | 1 | 0 | 0 | 0 | 1 | 0 | 0 | 0 |"),
        "{md}"
    );

    for i in 1..=HOSTS {
        let h = host_name(i);
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {h} |")))
            .unwrap_or_else(|| panic!("no row for {h}:\n{md}"));
        assert!(row.contains(&format!("`{}`", backup_sha(&h))), "{row}");
        assert!(row.contains("acme-agent 1.0.0"), "before version: {row}");
        let failed = FAILING.contains(&h.as_str());
        if !failed {
            assert!(
                row.contains("| done |") && row.contains("acme-agent 1.0.1"),
                "{row}"
            );
        }
        // Every step with a duration: deploy slept 3 ms between intent and outcome.
        let deploy_ms: f64 = row
            .split("deploy ")
            .nth(1)
            .and_then(|s| s.split(" ms").next())
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no deploy duration in {row}"));
        assert!(deploy_ms >= 3.0, "{row}");
    }
    let row = |h: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {h} |")))
            .unwrap()
    };
    assert!(
        row("fleet-07").contains("| failed, rolled back |"),
        "{}",
        row("fleet-07")
    );
    assert!(row("fleet-07").contains("undo ok"), "{}", row("fleet-07"));
    assert!(
        row("fleet-22").contains("| failed, rollback failed |"),
        "{}",
        row("fleet-22")
    );
    // The rolled-back host is back on 1.0.0, the one whose rollback failed is not.
    assert!(
        row("fleet-07").split('|').nth(5).unwrap().contains("1.0.0"),
        "{}",
        row("fleet-07")
    );
    assert!(
        row("fleet-22")
            .split('|')
            .nth(5)
            .unwrap()
            .contains("half-configured"),
        "{}",
        row("fleet-22")
    );

    // Failures show the host's output, cut when long.
    let failures = md
        .split("## Failures")
        .nth(1)
        .unwrap()
        .split("## Host details")
        .next()
        .unwrap();
    for h in FAILING {
        assert!(failures.contains(&format!("### {h} (")), "{failures}");
    }
    assert!(failures.contains("post-installation script subprocess returned error exit status 1"));
    assert!(
        failures.contains("more bytes cut]"),
        "long output is cut: {failures}"
    );
    let f7 = failures
        .split("### fleet-07 (")
        .nth(1)
        .unwrap()
        .split("### ")
        .next()
        .unwrap();
    assert_eq!(
        f7.matches("exit status 1").count(),
        1,
        "each message once: {f7}"
    );
    assert!(
        failures.contains("cannot access archive"),
        "rollback error shown"
    );
    assert!(md.len() < 200_000, "report stays a sane size: {}", md.len());

    // Details: backups with archive and checksum, undo steps, rollback.
    assert!(md.contains(&format!(
        "**Backup** bk-fleet-03: `backups/fleet-run/fleet-03/etc-acme.tar.gz` sha256 `{}`, 20480 bytes",
        backup_sha("fleet-03")
    )), "{md}");
    assert!(md.contains("(undoes #"), "{md}");
    assert!(md.contains("reinstall acme-agent 1.0.0 — ok"), "{md}");
    assert!(md.contains("**Rollback:** done (host\\_failed)"), "{md}");

    // Test report: patch version, every case, performance numbers and threshold.
    let tests = md.split("## Staging test report").nth(1).unwrap();
    assert!(tests.contains("**Patch version:** 1.0.1"), "{tests}");
    assert!(
        tests.contains("**Cases:** 5 — 3 passed, 2 failed"),
        "{tests}"
    );
    let p95 = tests
        .lines()
        .find(|l| l.contains("p95 check latency"))
        .unwrap();
    assert!(
        p95.contains("| performance | pass |") && p95.contains("| 120 ms | 126 ms | +5.0% | 10% |"),
        "{p95}"
    );
    let eps = tests
        .lines()
        .find(|l| l.contains("events per second"))
        .unwrap();
    assert!(
        eps.contains("| 5000 ev/s | 4100 ev/s | +18.0% | 15% |") && eps.contains("FAIL"),
        "{eps}"
    );
    assert!(eps.contains("over the 15% threshold"), "{eps}");
    let reg = tests.lines().find(|l| l.contains("reproducer")).unwrap();
    assert!(
        reg.contains("| regression | FAIL |") && reg.contains("exits 139"),
        "{reg}"
    );

    // Notifications sent, and the one that failed.
    let notes = md.split("## Notifications").nth(1).unwrap();
    assert_eq!(
        notes.lines().filter(|l| l.starts_with("| 20")).count(),
        4,
        "{notes}"
    );
    assert!(notes.contains("| pager | oncall | FAILED | 3 |"), "{notes}");
    assert!(
        notes.contains("| mail | ops@example.com | sent | 2 |"),
        "{notes}"
    );
    assert!(md.contains("## Artifact checks"), "{md}");
}

fn json_report_has_the_documented_structure(s: &TestStore) {
    fleet_run_in(&s.store, "fleet-run");
    let out = ok_stdout(s.patchbook(&["report", "fleet-run", "--format", "json"]));
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["schema"], "patchbook.report/1");
    assert_eq!(r["run"]["id"], "fleet-run");
    assert_eq!(r["run"]["operator"], "alice");
    assert_eq!(r["run"]["closed"], true);
    assert_eq!(r["run"]["playbook_sha256"], sha("playbook"));
    assert_eq!(r["run"]["window"]["buffer"], "30m");
    assert_eq!(r["run"]["stop"]["kind"], "completed");
    assert_eq!(
        r["counts"],
        json!({"targeted": 30, "done": 27, "failed": 3, "unreachable": 0, "reverted": 0,
               "rolled_back": 2, "rollback_failed": 1, "in_progress": 0, "unknown": 0,
               "pending": 0})
    );
    assert_eq!(r["groups"]["web"]["failed"], 2);
    assert_eq!(r["waves"].as_array().unwrap().len(), 3);
    assert_eq!(r["waves"][1]["hosts"].as_array().unwrap().len(), 8);
    let hosts = r["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, (1..=HOSTS).map(host_name).collect::<Vec<_>>());
    for h in hosts {
        let name = h["name"].as_str().unwrap();
        assert_eq!(h["backups"][0]["sha256"], backup_sha(name));
        assert_eq!(h["packages"][0]["before"], "1.0.0");
        assert_eq!(h["packages"][0]["target"], "1.0.1");
        let deploy = &h["steps"][0];
        assert_eq!(deploy["step"], "deploy");
        assert!(deploy["duration_ms"].as_f64().unwrap() >= 3.0, "{deploy}");
        assert!(h["started"].is_string() && h["ended"].is_string(), "{h}");
        let failed = FAILING.contains(&name);
        assert_eq!(
            h["outcome"],
            if failed { "failed" } else { "done" },
            "{name}"
        );
        assert_eq!(h["error_output"].is_string(), failed, "{name}");
        if failed {
            assert_eq!(h["steps"][1]["undoes"], deploy["id"]);
        }
    }
    let f7 = &hosts[6];
    assert_eq!(f7["rolled_back"], true);
    assert_eq!(f7["rollback"]["ok"], true);
    assert_eq!(f7["rollback"]["cause"], "host_failed");
    assert_eq!(f7["packages"][0]["after"], "1.0.0");
    assert!(f7["error_output"]
        .as_str()
        .unwrap()
        .contains("exit status 1"));
    let f22 = &hosts[21];
    assert_eq!(f22["rollback"]["ok"], false);
    assert!(f22["rollback_error"]
        .as_str()
        .unwrap()
        .contains("cannot access archive"));
    let long = hosts[14]["error_output"].as_str().unwrap();
    assert!(
        long.chars().count() < 2100 && long.ends_with("more bytes cut]"),
        "{long}"
    );

    let tests = &r["tests"];
    assert_eq!(tests["patch_versions"], json!(["1.0.1"]));
    assert_eq!(
        (tests["total"].as_u64(), tests["passed"].as_u64()),
        (Some(5), Some(3))
    );
    let p95 = &tests["cases"][2];
    assert_eq!(p95["kind"], "performance");
    assert_eq!(
        p95["metrics"],
        json!({"before": 120.0, "after": 126.0, "threshold_pct": 10.0, "unit": "ms"})
    );
    assert!((p95["degradation_pct"].as_f64().unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(p95["host"], "staging-1");
    assert!(p95["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(r["notifications"].as_array().unwrap().len(), 4);
    assert_eq!(r["artifacts"].as_array().unwrap().len(), 2);
    assert_eq!(r["problems"], json!([]));
}

fn chromium() -> PathBuf {
    let p = PathBuf::from("/usr/bin/chromium");
    assert!(
        p.exists(),
        "chromium is missing at /usr/bin/chromium; run .ci/setup to install it"
    );
    p
}

/// Headless Chromium with everything that reaches out switched off.
fn chromium_cmd(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

fn dump_dom(file: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = chromium_cmd(profile.path())
        .arg("--dump-dom")
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs chromium: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn html_report_opens_in_chromium_with_host_rows_and_one_bar_per_host() {
    let state = tempfile::tempdir().unwrap();
    fleet_run(state.path(), "fleet-run");
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("fleet-run.html");
    let printed = ok_stdout(patchbook(
        state.path(),
        &[
            "report",
            "fleet-run",
            "--format",
            "html",
            "--out",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(printed.trim(), file.display().to_string());
    let html = std::fs::read_to_string(&file).unwrap();
    // Self-contained: no scripts, no linked assets.
    assert!(!html.contains("<script"), "no scripts");
    for linked in ["<link", " src=", " href=", "url(", "@import"] {
        assert!(
            !html.contains(linked),
            "external asset reference `{linked}`"
        );
    }

    let profile = tempfile::tempdir().unwrap();
    let png = out_dir.path().join("shot.png");
    let shot = chromium_cmd(profile.path())
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1400,2000")
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(
        bytes.len() > 20_000,
        "screenshot is suspiciously small: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1400, 2000));

    let dom = dump_dom(&file);
    assert_eq!(
        count(&dom, "<tr class=\"host-row "),
        HOSTS,
        "host rows in the rendered DOM"
    );
    for i in 1..=HOSTS {
        assert!(dom.contains(&format!("data-host=\"{}\"", host_name(i))));
    }
    let svg = dom
        .split("<svg")
        .nth(1)
        .unwrap()
        .split("</svg>")
        .next()
        .unwrap();
    assert_eq!(count(svg, "class=\"bar bar-"), HOSTS, "one bar per host");
    let bar_hosts: HashSet<&str> = svg
        .split("class=\"bar bar-")
        .skip(1)
        .filter_map(|s| s.split("data-host=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(bar_hosts.len(), HOSTS, "each host has its own bar");
    assert_eq!(count(svg, "class=\"bar bar-done\""), 27);
    assert_eq!(count(svg, "class=\"bar bar-rolled-back\""), 2);
    assert_eq!(count(svg, "class=\"bar bar-failed\""), 1);
    assert_eq!(
        count(svg, "class=\"wave-boundary\""),
        3,
        "wave starts marked"
    );
    assert!(svg.contains("class=\"legend\"") && svg.contains(">rolled back</text>"));
    assert!(dom.contains("id=\"tests\"") && dom.contains("p95 check latency"));
}

const HOSTILE: &str = "<script>alert('owned')</script><img src=x onerror=alert(1)>";

#[test]
fn hostile_host_output_is_escaped_in_every_format() {
    let state = tempfile::tempdir().unwrap();
    let j = Journal::begin(state.path(), "xss", "mallory", &header()).unwrap();
    let host = "web-<b>1</b>";
    event(
        &j,
        &RolloutEvent::HostStarted {
            host: host.into(),
            wave: 0,
        },
    );
    let id = j
        .intent(
            host,
            "deploy",
            json!({"package": PKG, "from": "1.0.0", "to": HOSTILE}),
        )
        .unwrap();
    j.outcome(
        host,
        id,
        false,
        json!({"error": format!("```\n{HOSTILE}\n```")}),
        None,
    )
    .unwrap();
    event(
        &j,
        &RolloutEvent::HostFailed {
            host: host.into(),
            wave: 0,
            reason: HOSTILE.into(),
        },
    );
    report::record_test(
        &j,
        None,
        &TestCase {
            name: HOSTILE.into(),
            kind: TestKind::Functional,
            ok: false,
            duration_ms: 1.0,
            error: Some(HOSTILE.into()),
            patch_version: Some(HOSTILE.into()),
            metrics: None,
        },
    )
    .unwrap();
    j.append(
        None,
        "notify",
        json!({"message": HOSTILE, "deliveries": [{"channel": "x", "to": HOSTILE, "ok": true, "attempts": 1}]}),
    )
    .unwrap();
    j.close().unwrap();

    let html = report::render(state.path(), "xss", Format::Html).unwrap();
    assert!(
        !html.contains("<script") && !html.contains("<img") && !html.contains("<b>"),
        "{html}"
    );
    assert!(html.contains("&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;"));
    let file = state.path().join("xss.html");
    std::fs::write(&file, &html).unwrap();
    let dom = dump_dom(&file);
    assert!(
        !dom.contains("<script") && !dom.contains("<img"),
        "markup from the journal became DOM"
    );
    assert!(
        dom.contains("&lt;script&gt;alert('owned')&lt;/script&gt;"),
        "shown as text"
    );
    assert_eq!(count(&dom, "class=\"bar bar-"), 1);

    let md = report::render(state.path(), "xss", Format::Markdown).unwrap();
    let markup = outside_fences(&md);
    assert!(
        !markup.contains("<script") && !markup.contains("<img") && !markup.contains("<b>"),
        "{markup}"
    );
    // The host output sits in a fence its own backticks cannot close.
    assert!(
        md.contains(&format!("````text\ndeploy: ```\n{HOSTILE}\n```\n````")),
        "{md}"
    );

    let json = report::render(state.path(), "xss", Format::Json).unwrap();
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["hosts"][0]["name"], host, "JSON keeps the value exactly");
}

#[test]
fn a_crashed_run_shows_unfinished_hosts_in_progress_not_done() {
    let state = tempfile::tempdir().unwrap();
    {
        let j = Journal::begin(state.path(), "crashed", "bob", &header()).unwrap();
        let hosts: Vec<String> = (1..=5).map(host_name).collect();
        event(
            &j,
            &RolloutEvent::RunStarted {
                targets: 7,
                waves: 1,
                parallel: 4,
                allowed_failures: 1,
            },
        );
        event(
            &j,
            &RolloutEvent::WaveStarted {
                index: 0,
                label: "pilot".into(),
                hosts: hosts.clone(),
            },
        );
        for h in &hosts[..4] {
            event(
                &j,
                &RolloutEvent::HostStarted {
                    host: h.clone(),
                    wave: 0,
                },
            );
        }
        for h in &hosts[..2] {
            work_on(&j, h, 0);
        }
        // fleet-03: intent on disk, then the controller died before the outcome.
        j.intent(
            &hosts[2],
            "deploy",
            json!({"package": PKG, "from": "1.0.0", "to": "1.0.1", "undo": reinstall_100()}),
        )
        .unwrap();
        // fleet-04: its deploy completed, but the host never finished.
        let id = j
            .intent(
                &hosts[3],
                "deploy",
                json!({"package": PKG, "from": "1.0.0", "to": "1.0.1"}),
            )
            .unwrap();
        j.outcome(
            &hosts[3],
            id,
            true,
            json!({"package": PKG, "after": "1.0.1"}),
            Some(reinstall_100()),
        )
        .unwrap();
        // Dropped without close: as after a SIGKILL, no run.close.
    }
    let r: Value =
        serde_json::from_str(&report::render(state.path(), "crashed", Format::Json).unwrap())
            .unwrap();
    assert_eq!(r["run"]["closed"], false);
    assert!(r["run"]["ended"].is_null());
    assert_eq!(r["run"]["open_intents"], 1);
    let outcome = |i: usize| r["hosts"][i]["outcome"].as_str().unwrap().to_string();
    assert_eq!(
        (0..5).map(outcome).collect::<Vec<_>>(),
        ["done", "done", "in_progress", "in_progress", "pending"]
    );
    assert!(r["hosts"][2]["steps"][0]["ok"].is_null());
    assert!(r["hosts"][2]["steps"][0]["duration_ms"].is_null());
    assert!(r["hosts"][2]["ended"].is_null());
    assert_eq!(r["counts"]["done"], 2);
    assert_eq!(r["counts"]["in_progress"], 2);
    // fleet-05 was in the wave but never started; two targets never got a name.
    assert_eq!(r["counts"]["pending"], 3);
    assert_eq!(r["counts"]["targeted"], 7);

    let md = report::render(state.path(), "crashed", Format::Markdown).unwrap();
    assert!(
        md.contains("not closed (still running, stopped or crashed)"),
        "{md}"
    );
    assert!(md.contains("**Open intents:** 1"), "{md}");
    let row = md.lines().find(|l| l.starts_with("| fleet-03 |")).unwrap();
    assert!(
        row.contains("| in progress |") && row.contains("deploy OPEN ?"),
        "{row}"
    );
    assert!(!row.contains("| done |"));
    let html = report::render(state.path(), "crashed", Format::Html).unwrap();
    assert_eq!(count(&html, "class=\"bar bar-in-progress\""), 2);
    assert_eq!(
        count(&html, "class=\"bar bar-"),
        4,
        "the pending host gets a mark, not a bar"
    );
    assert_eq!(count(&html, "class=\"pending-mark\""), 1);
}

fn report_last_renders_the_newest_run_and_bad_runs_are_explained(s: &TestStore) {
    let out = s.patchbook(&["report", "last"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runs under"));

    for run in ["older", "newer"] {
        let j = s.begin(run, "carol");
        work_on(&j, "fleet-01", 0);
        j.close().unwrap();
    }
    let r: Value = serde_json::from_str(&ok_stdout(
        s.patchbook(&["report", "last", "--format", "json"]),
    ))
    .unwrap();
    assert_eq!(r["run"]["id"], "newer");
    let md = ok_stdout(s.patchbook(&["report", "last"]));
    assert!(md.starts_with("# Patch report: run `newer`"), "{md}");

    let out = s.patchbook(&["report", "missing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run `missing`"));
    let out = s.patchbook(&["report", "last", "--format", "pdf"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use md, json or html"));
}

const INVENTORY: &str = r#"
[hosts.fleet-01]
address = "127.0.0.1"
groups = ["web"]
[hosts.fleet-02]
address = "127.0.0.1"
groups = ["web"]
[hosts.fleet-03]
address = "127.0.0.1"
groups = ["db"]
"#;

fn verify(j: &Journal, host: &str, pkg: &str, found: &str, ok: bool) {
    j.append(
        Some(host),
        "verify",
        json!({"package": pkg, "expected": found, "found": found, "ok": ok}),
    )
    .unwrap();
}

fn inventory_list_shows_the_last_verified_version_per_package(s: &TestStore) {
    let inv_dir = tempfile::tempdir().unwrap();
    let inv = inv_dir.path().join("hosts.toml");
    std::fs::write(&inv, INVENTORY).unwrap();
    let list = |json: bool| {
        let mut args = vec!["-i", inv.to_str().unwrap(), "inventory", "list"];
        if json {
            args.insert(0, "--json");
        }
        ok_stdout(s.patchbook(&args))
    };
    let before: Value = serde_json::from_str(&list(true)).unwrap();
    assert!(
        !before.to_string().contains("patchbook_patch_levels"),
        "{before}"
    );

    let j = s.begin("first", "alice");
    verify(&j, "fleet-01", PKG, "1.0.0", true);
    verify(&j, "fleet-01", "openssl", "3.0.13-1", true);
    j.close().unwrap();
    let j = s.begin("second", "alice");
    verify(&j, "fleet-01", PKG, "1.0.1", true);
    // Not verified: a failed check is no patch level.
    verify(
        &j,
        "fleet-02",
        PKG,
        "1.0.1 (state half-configured, not fully installed)",
        false,
    );
    j.close().unwrap();
    // A crashed run's verified versions count too.
    let j = s.begin("third", "alice");
    verify(&j, "fleet-03", PKG, "1.0.1", true);
    drop(j);

    let levels = report::patch_levels_in(&s.store).unwrap();
    assert_eq!(levels["fleet-01"][PKG].version, "1.0.1");
    assert_eq!(levels["fleet-01"][PKG].run, "second");
    assert!(!levels.contains_key("fleet-02"));

    let table = list(false);
    let header_line = table.lines().next().unwrap();
    assert!(header_line.ends_with("PATCH LEVELS"), "{table}");
    let col = header_line.find("PATCH LEVELS").unwrap();
    let cell = |h: &str| {
        table
            .lines()
            .find(|l| l.starts_with(h))
            .map(|l| l[col..].to_string())
            .unwrap()
    };
    assert_eq!(
        cell("fleet-01"),
        "acme-agent=1.0.1,openssl=3.0.13-1",
        "{table}"
    );
    assert_eq!(cell("fleet-02"), "-", "{table}");
    assert_eq!(cell("fleet-03"), "acme-agent=1.0.1", "{table}");

    let after: Value = serde_json::from_str(&list(true)).unwrap();
    let hv = &after["_meta"]["hostvars"];
    assert_eq!(
        hv["fleet-01"]["patchbook_patch_levels"],
        json!({"acme-agent": "1.0.1", "openssl": "3.0.13-1"})
    );
    assert!(
        hv["fleet-02"].get("patchbook_patch_levels").is_none(),
        "{after}"
    );
    assert_eq!(hv["fleet-03"]["patchbook_patch_levels"][PKG], "1.0.1");
    // Everything else is as before.
    let mut stripped = after.clone();
    for h in ["fleet-01", "fleet-03"] {
        stripped["_meta"]["hostvars"]
            .as_object_mut()
            .unwrap()
            .remove(h);
    }
    let mut before_stripped = before.clone();
    for h in ["fleet-01", "fleet-03"] {
        before_stripped["_meta"]["hostvars"]
            .as_object_mut()
            .unwrap()
            .remove(h);
    }
    assert_eq!(stripped, before_stripped);
}

#[test]
fn a_host_that_only_verified_is_not_reported_as_a_fresh_install() {
    let state = tempfile::tempdir().unwrap();
    let j = Journal::begin(state.path(), "audit-only", "alice", &header()).unwrap();
    verify(&j, "fleet-01", PKG, "1.0.1", true);
    j.host_finished("fleet-01", true, Default::default())
        .unwrap();
    j.close().unwrap();

    let json: Value =
        serde_json::from_str(&report::render(state.path(), "audit-only", Format::Json).unwrap())
            .unwrap();
    let host = json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "fleet-01")
        .expect("fleet-01 in the report");
    assert_eq!(host["packages"][0]["package"], PKG, "{host}");
    assert_eq!(host["packages"][0]["before"], "1.0.1", "{host}");
    assert_eq!(host["packages"][0]["after"], "1.0.1", "{host}");

    let md = report::render(state.path(), "audit-only", Format::Markdown).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| fleet-01 |"))
        .expect("a host row");
    assert!(!row.contains("none"), "before must not read `none`: {row}");
}

#[test]
fn per_group_counts_add_up_to_the_totals_after_a_resume() {
    let state = tempfile::tempdir().unwrap();
    let plan = |hosts: &[(&str, &str)]| {
        json!({"policy": {}, "plan": "wave 1",
               "groups": hosts.iter().map(|(h, g)| (h.to_string(), json!([g]))).collect::<serde_json::Map<_, _>>()})
    };
    let started = |j: &Journal, host: &str| {
        event(
            j,
            &RolloutEvent::HostStarted {
                host: host.into(),
                wave: 0,
            },
        )
    };
    // First attempt: four targets in two groups; two finish, then the
    // controller dies (no summary).
    let j = Journal::begin(state.path(), "resumed", "alice", &header()).unwrap();
    j.append(
        None,
        "rollout.plan",
        plan(&[
            ("fleet-01", "web"),
            ("fleet-02", "web"),
            ("fleet-03", "db"),
            ("fleet-04", "db"),
        ]),
    )
    .unwrap();
    for h in ["fleet-01", "fleet-03"] {
        started(&j, h);
        j.host_finished(h, true, Default::default()).unwrap();
    }
    drop(j);
    // The resumed attempt plans and summarises only the two left.
    let j = Journal::open(state.path(), "resumed", "alice").unwrap();
    j.append(
        None,
        "rollout.plan",
        plan(&[("fleet-02", "web"), ("fleet-04", "db")]),
    )
    .unwrap();
    let mut hosts = Vec::new();
    for h in ["fleet-02", "fleet-04"] {
        started(&j, h);
        j.host_finished(h, true, Default::default()).unwrap();
        hosts.push(HostReport {
            name: h.into(),
            wave: 0,
            state: HostStatus::Done,
            reason: None,
            started: None,
            ended: None,
            rolled_back: false,
            rollback_error: None,
        });
    }
    let one = Counts {
        targeted: 1,
        done: 1,
        ..Default::default()
    };
    event(
        &j,
        &RolloutEvent::RunDone {
            summary: Summary {
                stop: StopReason::Completed,
                allowed_failures: 0,
                allowed_unreachable: 0,
                totals: Counts {
                    targeted: 2,
                    done: 2,
                    ..Default::default()
                },
                per_group: BTreeMap::from([("web".into(), one.clone()), ("db".into(), one)]),
                hosts,
                completion_order: vec![],
                rollback_order: vec![],
            },
        },
    );
    j.close().unwrap();

    let r: Value =
        serde_json::from_str(&report::render(state.path(), "resumed", Format::Json).unwrap())
            .unwrap();
    assert_eq!(r["counts"]["targeted"], 4, "{}", r["counts"]);
    assert_eq!(r["counts"]["done"], 4, "{}", r["counts"]);
    for g in ["web", "db"] {
        assert_eq!(r["groups"][g]["targeted"], 2, "{g}: {}", r["groups"]);
        assert_eq!(r["groups"][g]["done"], 2, "{g}: {}", r["groups"]);
    }
}

on_both_stores!(
    json_report_has_the_documented_structure,
    report_last_renders_the_newest_run_and_bad_runs_are_explained,
    inventory_list_shows_the_last_verified_version_per_package,
);
