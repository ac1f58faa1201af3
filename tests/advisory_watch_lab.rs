//! The continuous advisory scan on a real lab fleet: two Debian hosts carrying
//! this machine's dpkg database plus acme-agent, each with its own owner, a Debian
//! Security Tracker feed written by the test, a real SMTP server, and
//! `patchbook watch` with `[advisories] scan` due every clock minute (the test
//! clock runs at 60x, so about once a second).
//!
//! Every scan is a journaled run that `audit verify` accepts. The first scans mail
//! nobody (a baseline, then nothing new); installing the older, vulnerable
//! acme-agent on one host makes the next scan mail exactly that host's owner,
//! once, with the new high CVE and not the low one it also gained; a new low CVE
//! in the feed mails nobody. `report last` still means the last patch run, and
//! `exposure --from-last-scan` prints the same plan after both hosts are stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchbook::lab::{Fleet, PkgDb};
use serde_json::Value;
use support::smtp::SmtpSink;
use support::watch::WatchProcess as Watch;
use support::{lab_project, open_cves, patchbook_in, run_ids, text};

fn fleet() -> &'static Fleet {
    support::shared_fleet_of(&[PkgDb::Dpkg, PkgDb::Dpkg])
}

fn owner(host: &str) -> String {
    format!("owner-{host}@example.com")
}

/// The tracker feed: acme-agent below 1.0.1 has a high and a low CVE, and one
/// medium CVE has no fix on any version; `extra_low` adds a low CVE fixed only in
/// 1.0.2, which every host then has open.
fn write_feed(dir: &Path, extra_low: bool) -> PathBuf {
    let mut cves = serde_json::json!({
        "CVE-2099-3001": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "1.0.1", "urgency": "high"}}},
        "CVE-2099-3002": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "1.0.1", "urgency": "low"}}},
        "CVE-2099-3003": {"releases": {"bookworm": {"status": "open", "urgency": "medium"}}}
    });
    if extra_low {
        cves["CVE-2099-3004"] = serde_json::json!(
            {"releases": {"bookworm": {"status": "resolved", "fixed_version": "1.0.2", "urgency": "low"}}}
        );
    }
    let feeds = dir.join("feeds");
    std::fs::create_dir_all(&feeds).unwrap();
    let path = feeds.join("tracker.json");
    // Written aside and renamed: a scan must never read half a feed.
    let tmp = feeds.join("tracker.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&serde_json::json!({ "acme-agent": cves })).unwrap(),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A project whose inventory gives each host its own owner, scanning every clock
/// minute and mailing owners through the SMTP sink.
fn project(fleet: &Fleet, smtp_port: u16) -> tempfile::TempDir {
    let dir = lab_project(fleet, "advisory-watch-", "");
    let feed = write_feed(dir.path(), false);
    let inv = std::fs::read_to_string(fleet.dir().join("inventory.toml")).unwrap();
    let mut own = String::new();
    let mut host = None;
    for line in inv.lines() {
        if let Some(name) = line
            .strip_prefix("[hosts.")
            .and_then(|l| l.strip_suffix(']'))
        {
            host = Some(name.to_string());
        }
        match (&host, line.starts_with("owner = ")) {
            (Some(h), true) => own.push_str(&format!("owner = [\"{}\"]\n", owner(h))),
            _ => own.push_str(&format!("{line}\n")),
        }
    }
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, own).unwrap();
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    let toml = dir.path().join("patchbook.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace(
            &fleet.dir().join("inventory.toml").display().to_string(),
            &inv_path.display().to_string(),
        )
        .replace(
            "trusted_sources = [",
            &format!("trusted_sources = [\"{}/feeds\", ", dir.path().display()),
        );
    std::fs::write(
        toml,
        format!(
            "{text}\n[advisories]\nfeeds = [\"{}\"]\nscan = \"* * * * * UTC\"\n\
             notify_min_severity = \"high\"\n\n[notify]\ncontacts_channel = \"mail\"\n\
             retries = 0\n[notify.channels.mail]\ntype = \"smtp\"\nserver = \"127.0.0.1\"\n\
             port = {smtp_port}\nstarttls = false\nfrom = \"patchbook@example.com\"\n",
            feed.display()
        ),
    )
    .unwrap();
    dir
}

/// `patchbook watch` for the project, on a test clock 60 times as fast.
fn start_watch(dir: &Path) -> Watch {
    let mut cmd = patchbook_in(dir);
    cmd.args(["watch", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("PATCHBOOK_LOG", "info")
        .env("PATCHBOOK_NOW", "2026-11-28T01:59:00Z")
        .env("PATCHBOOK_CLOCK_SPEED", "60");
    Watch::start(cmd)
}

/// The scan runs that were closed (their `advisory.scan` summary written), oldest
/// first.
fn scans(dir: &Path) -> Vec<String> {
    let state = dir.join("state");
    run_ids(&state)
        .into_iter()
        .filter(|r| r.contains("-advscan-"))
        .filter(|r| {
            std::fs::read_to_string(state.join("runs").join(format!("{r}.jsonl")))
                .is_ok_and(|t| t.contains("\"run.close\""))
        })
        .collect()
}

/// Waits until `n` more scans than `since` have closed.
fn wait_scans(dir: &Path, since: usize, n: usize, w: &Watch) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let s = scans(dir);
        if s.len() >= since + n {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} scans, waited for {}: {}",
            s.len(),
            since + n,
            w.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn install(fleet: &Fleet, host: &str, version: &str) {
    let deb = fleet.deb(version);
    let out = fleet
        .exec_in(host, &["dpkg", "-i", deb.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fleet
            .installed_version(host, "acme-agent")
            .unwrap()
            .as_deref(),
        Some(version)
    );
}

fn exposure_from_last_scan(dir: &Path, format: &str) -> (std::process::Output, String) {
    let out = patchbook_in(dir)
        .args(["exposure", "--from-last-scan", "--format", format])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    (out, t)
}

#[test]
fn a_watch_scan_mails_the_owner_of_a_host_that_gains_a_cve() {
    let fleet = fleet();
    let hosts: Vec<String> = fleet.hosts().iter().map(|h| h.name.clone()).collect();
    let (a, b) = (hosts[0].as_str(), hosts[1].as_str());
    // Both hosts start patched: nothing above the threshold is open.
    for h in [a, b] {
        install(fleet, h, "1.0.1");
    }
    let smtp = SmtpSink::start(None);
    let dir = project(fleet, smtp.port);
    let d = dir.path();

    // A patch run before the scans: `report last` must keep meaning it.
    let out = patchbook_in(d)
        .args(["exec", "all", "host.name"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let patch_run = run_ids(&d.join("state")).pop().unwrap();

    let mut watch = start_watch(d);
    // A baseline, then a scan with nothing new: nobody is mailed.
    let before = wait_scans(d, 0, 2, &watch);
    assert!(
        watch.output().contains("advisory scan: * * * * * UTC"),
        "{}",
        watch.output()
    );
    assert!(smtp.mails().is_empty(), "{:#?}", smtp.mails());

    // The older, vulnerable package on one host: its owner alone hears of it.
    install(fleet, a, "1.0.0");
    // Two more closed scans: at least one of them started after the install.
    let after = wait_scans(d, before.len(), 2, &watch);
    let mails = smtp.wait_for(1);
    assert_eq!(mails.len(), 1, "{mails:#?}\n{}", watch.output());
    let m = &mails[0];
    assert_eq!(m.rcpt_tos, vec![owner(a)]);
    assert!(m.subject.contains("newly open CVE"), "{}", m.subject);
    assert!(m.body.contains(a) && !m.body.contains(b), "{}", m.body);
    assert!(
        m.body
            .contains("CVE-2099-3001 high: acme-agent 1.0.0 (fixed in 1.0.1)"),
        "{}",
        m.body
    );
    // The low CVE it gained too is below notify_min_severity; the no-fix one was
    // open before.
    assert!(
        !m.body.contains("CVE-2099-3002") && !m.body.contains("CVE-2099-3003"),
        "{}",
        m.body
    );

    // Nothing new: no second mail.
    let after = wait_scans(d, after.len(), 2, &watch);
    assert_eq!(smtp.mails().len(), 1, "{:#?}", smtp.mails());

    // A new low CVE on every host: below the threshold, nobody is mailed.
    write_feed(d, true);
    wait_scans(d, after.len(), 3, &watch);
    watch.stop();
    assert_eq!(smtp.mails().len(), 1, "{:#?}", smtp.mails());
    let all = scans(d);

    // The scan that mailed journaled the delivery and how many CVEs were new.
    let state = d.join("state");
    let mailed: Vec<Value> = all
        .iter()
        .flat_map(|r| {
            std::fs::read_to_string(state.join("runs").join(format!("{r}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .filter(|rec| rec["kind"] == "notify")
        .collect();
    assert_eq!(mailed.len(), 1, "{mailed:#?}");
    assert_eq!(mailed[0]["data"]["to"], owner(a).as_str());
    assert_eq!(mailed[0]["data"]["ok"], true);

    // Every scan is a run `audit verify` accepts.
    let out = patchbook_in(d).args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A scan is not "the last run" of a report.
    let out = patchbook_in(d)
        .args(["report", "last", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["run"]["id"], patch_run.as_str(), "{report:#}");

    // The last scan, rendered while the hosts are up ...
    let (out, json_up) = exposure_from_last_scan(d, "json");
    assert!(out.status.success(), "{}", text(&out));
    let (_, table_up) = exposure_from_last_scan(d, "table");
    let plan: Value = serde_json::from_str(&json_up).unwrap();
    assert_eq!(
        open_cves(&plan, a),
        [
            "CVE-2099-3001",
            "CVE-2099-3002",
            "CVE-2099-3003",
            "CVE-2099-3004"
        ]
    );
    assert_eq!(open_cves(&plan, b), ["CVE-2099-3003", "CVE-2099-3004"]);
    assert_eq!(plan["fixable"][0]["cve"], "CVE-2099-3001");
    assert_eq!(plan["fixable"][0]["fixed"]["acme-agent"], "1.0.1");
    assert_eq!(plan["no_fix"][0]["cve"], "CVE-2099-3003");

    // ... and after both hosts are stopped: the same, no host contacted.
    for h in [a, b] {
        let lab_host = fleet.host(h).unwrap();
        let (address, port) = (lab_host.address.clone(), lab_host.connect_port());
        fleet.kill_host(h).unwrap();
        assert!(
            std::net::TcpStream::connect((address.as_str(), port)).is_err(),
            "{h} still answers"
        );
    }
    let (out, json_down) = exposure_from_last_scan(d, "json");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_down, json_up);
    let (_, table_down) = exposure_from_last_scan(d, "table");
    assert_eq!(table_down, table_up);
    assert!(table_down.contains("CVE-2099-3001"), "{table_down}");
    // No scan was added by reading the last one.
    assert_eq!(scans(d), all);
}
