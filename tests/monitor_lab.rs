//! `monitor()` on real lab hosts: each host is sampled before and after its patch;
//! on one of them the new version makes its log grow error lines (a thread of this
//! test writes them into the host's `/opt` once the host runs 1.0.1, as a broken
//! release would), and that host alone is caught and rolled back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use patchbook::journal::{read_records, Entry};
use support::{lab_project, patch_params, patchbook_in, run_ids, text, Lab};

const MONITORED: &str = r#"
let fresh = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let old = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("lab01:lab02:lab03"), #{ parallel: 3, max_failed: 1 }, |host| {
    monitor(host, #{
        window: "2m", interval: "30s", baseline: 2,
        logs: ["/opt/acme-agent.log"],
        probes: #{ agent_files: "ls /opt | wc -l" },
        thresholds: #{ error_rate: "2x", disk: "+10", agent_files: "+5" },
    }, || {
        deploy(host, fresh, #{ rollback_to: old });
        verify(host, "acme-agent", "1.0.1");
    });
});
"#;

#[test]
fn a_host_whose_log_fills_with_errors_after_the_patch_is_rolled_back() {
    let lab = Lab::start(3);
    let bad = lab.host("lab02").unwrap().dir.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        while !d.load(Ordering::SeqCst) {
            let status = std::fs::read_to_string(bad.join("dpkg/status")).unwrap_or_default();
            if patchbook::lab::status_version(&status, "acme-agent").as_deref() == Some("1.0.1") {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(bad.join("opt/acme-agent.log"))
                    .unwrap();
                writeln!(f, "ERROR acme-agent: cannot bind 0.0.0.0:8443").unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let project = lab_project(&lab, "monitor-", "");
    let dir = project.path();
    let play = dir.join("play.rhai");
    std::fs::write(&play, MONITORED).unwrap();
    let out = patchbook_in(dir)
        .arg("-q")
        .arg("run")
        .arg(&play)
        .args(patch_params(&lab))
        // Each 30 s interval of the run's clock takes half a real second.
        .env("PATCHBOOK_NOW", "2026-11-28T02:00:00Z")
        .env("PATCHBOOK_CLOCK_SPEED", "60")
        .output()
        .unwrap();
    done.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    let run = run_ids(&dir.join("state")).pop().unwrap();
    let records = read_records(&dir.join("state/runs").join(format!("{run}.jsonl"))).unwrap();
    let mut verdicts = std::collections::BTreeMap::new();
    let mut samples: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in &records {
        match r.entry().unwrap() {
            Entry::MonitorVerdict(v) => {
                verdicts.insert(r.host.clone().unwrap(), v);
            }
            Entry::MonitorSample(s) => samples
                .entry(r.host.clone().unwrap())
                .or_default()
                .push(s.phase.clone()),
            _ => {}
        }
    }
    assert_eq!(verdicts.len(), 3, "{verdicts:?}");
    for h in ["lab01", "lab03"] {
        let v = &verdicts[h];
        assert!(v.ok, "{h}: {v:?}");
        assert_eq!(v.after["error_rate"], 0.0, "{h}");
        assert!(
            v.baseline.contains_key("cpu") && v.after.contains_key("mem"),
            "{v:?}"
        );
        assert_eq!(
            lab.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1"),
            "{h} keeps its patch"
        );
    }
    let v = &verdicts["lab02"];
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.baseline["error_rate"], 0.0);
    assert!(v.after["error_rate"] > 0.0, "{v:?}");
    assert_eq!(v.regressions.len(), 1, "{v:?}");
    assert!(v.regressions[0].starts_with("error_rate"), "{v:?}");
    assert_eq!(
        lab.installed_version("lab02", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0"),
        "the regressed host is rolled back"
    );
    for (h, phases) in &samples {
        assert_eq!(
            phases.iter().filter(|p| *p == "baseline").count(),
            2,
            "{h}: {phases:?}"
        );
        assert!(
            phases.iter().filter(|p| *p == "after").count() >= 4,
            "{h}: {phases:?}"
        );
    }
    let failed: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == "rollout.event" && r.data["kind"] == "host_failed")
        .map(|r| r.data["host"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["lab02"]);

    // The report shows each host's verdict and its samples as sparklines.
    let file = dir.join("report.html");
    let out = patchbook_in(dir)
        .args(["report", &run, "--format", "html", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // As a browser renders it: headless Chromium's DOM, and a screenshot.
    let url = format!("file://{}", file.display());
    let chromium = |extra: &[String]| support::headless_chromium(&url, extra);
    let dom = chromium(&["--dump-dom".to_string()]);
    assert_eq!(dom.matches("class=\"monitor-verdict\"").count(), 3, "{dom}");
    assert_eq!(dom.matches("monitor: REGRESSED").count(), 1, "{dom}");
    // One sparkline per sampled metric of each host, and the controller's own.
    let metrics: usize = ["lab01", "lab02", "lab03"]
        .iter()
        .map(|h| verdicts[*h].after.len())
        .sum();
    assert_eq!(
        dom.matches("<svg class=\"sparkline\"").count(),
        metrics + 1,
        "{dom}"
    );
    assert!(dom.contains("id=\"controller\""), "{dom}");
    let png = dir.join("report.png");
    chromium(&[
        format!("--screenshot={}", png.display()),
        "--window-size=1400,3000".to_string(),
    ]);
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(bytes.len() > 20_000, "screenshot of {} bytes", bytes.len());
    let out = patchbook_in(dir).args(["report", &run]).output().unwrap();
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("REGRESSED"), "{md}");
}
