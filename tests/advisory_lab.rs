//! Advisories on a real lab fleet: two Debian hosts carrying this machine's dpkg
//! database plus acme-agent 1.0.0, and one RHEL host. A Debian Security Tracker
//! feed written by the test names acme-agent (fixed in 1.0.1), a source package of
//! this machine whose binaries have other names (open, no fix) and others
//! (fixed, not affected). `exposure` lists exactly the expected CVEs per host and
//! the RHEL host as not covered; a run patches the vulnerable hosts and journals
//! evidence after re-reading the package database; the compliance report shows it;
//! `audit verify` passes, and fails once one evidence record is edited.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use patchbook::lab::{Fleet, PkgDb};
use serde_json::Value;
use support::{lab_project, patch_params, patchbook_in, text};

const PLAYBOOK: &str = r#"
import "patch/debian" as deb;
let adv = advisories(param("feed"));
let vuln = hosts("all").vulnerable(adv, #{ min_severity: "medium" });
for v in vuln {
    for p in v.packages {
        log(`${v.host.name}: ${p.name} ${p.installed} -> ${p.fixed} closes ${p.cves}`);
    }
}
let targets = needing(vuln, "acme-agent", "1.0.1");
let patch = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
rollout(targets, #{ waves: ["100%"], max_failed: 0 }, |host| {
    deb::patch(host, patch, "acme-agent", "1.0.1", #{});
    let ev = evidence(host, vuln);
    if ev.len() != 1 || !ev[0].closed { throw `evidence: ${ev}`; }
});
"#;

fn fleet() -> &'static Fleet {
    support::shared_fleet_of(&[PkgDb::Dpkg, PkgDb::Dpkg, PkgDb::Rpm])
}

/// A source package of this machine (its dpkg database is the hosts') whose
/// binary has another name, with its source version.
fn renamed_source() -> (String, String) {
    let out = std::process::Command::new("dpkg-query")
        .args([
            "-W",
            "-f",
            "${binary:Package}\\t${source:Package}\\t${source:Version}\\n",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let bin = f[0].split(':').next().unwrap();
            (f.len() == 3 && bin != f[1] && f[1] != "acme-agent")
                .then(|| (f[1].to_string(), f[2].to_string()))
        })
        .next()
        .expect("this machine has a package built from a source of another name")
}

fn write_feed(dir: &Path) -> (PathBuf, String) {
    let (src, ver) = renamed_source();
    let feed = serde_json::json!({
        "acme-agent": {
            "CVE-2099-1001": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "1.0.1", "urgency": "high"}}},
            "CVE-2099-1002": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "0.9", "urgency": "high"}}},
            "CVE-2099-1003": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "0", "urgency": "high"}}}
        },
        src.clone(): {
            "CVE-2099-2001": {"releases": {"bookworm": {"status": "open", "urgency": "medium"}}},
            "CVE-2099-2002": {"releases": {"bookworm": {"status": "resolved", "fixed_version": ver, "urgency": "high"}}},
            "CVE-2099-2003": {"releases": {"bookworm": {"status": "resolved", "fixed_version": format!("{ver}~"), "urgency": "low"}}}
        }
    });
    let feeds = dir.join("feeds");
    std::fs::create_dir_all(&feeds).unwrap();
    let path = feeds.join("tracker.json");
    let bytes = serde_json::to_vec_pretty(&feed).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    (path, sha)
}

fn project(fleet: &Fleet) -> tempfile::TempDir {
    let dir = lab_project(fleet, "advisory-", "");
    let toml = dir.path().join("patchbook.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "trusted_sources = [",
        &format!("trusted_sources = [\"{}/feeds\", ", dir.path().display()),
    );
    std::fs::write(toml, text).unwrap();
    dir
}

fn exposure(dir: &Path, feed: &Path, format: &str) -> (std::process::Output, String) {
    let out = patchbook_in(dir)
        .args(["exposure", "--feed"])
        .arg(feed)
        .args(["--format", format])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    (out, t)
}

/// The host's open CVEs in an exposure plan's JSON, as a set.
fn open_cves(plan: &Value, host: &str) -> BTreeSet<String> {
    support::open_cves(plan, host).into_iter().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn exposure_run_evidence_and_audit_on_a_lab_fleet() {
    let fleet = fleet();
    let dir = project(fleet);
    let (feed, sha) = write_feed(dir.path());
    let hosts: Vec<String> = fleet.hosts().iter().map(|h| h.name.clone()).collect();
    let (deb1, deb2, rhel) = (&hosts[0], &hosts[1], &hosts[2]);

    // Before: exactly the expected CVEs per host; the RHEL host is not covered.
    let (out, json) = exposure(dir.path(), &feed, "json");
    assert!(out.status.success(), "{}", text(&out));
    let plan: Value = serde_json::from_str(&json).unwrap();
    for h in [deb1, deb2] {
        assert_eq!(
            open_cves(&plan, h),
            set(&["CVE-2099-1001", "CVE-2099-2001"]),
            "{h}"
        );
    }
    assert_eq!(open_cves(&plan, rhel), set(&[]));
    let rhel_line = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == rhel.as_str())
        .unwrap();
    assert_eq!(rhel_line["covered"], false);
    assert_eq!(plan["feeds"][0]["sha256"], sha.as_str());
    let fixable: Vec<&str> = plan["fixable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cve"].as_str().unwrap())
        .collect();
    assert_eq!(fixable, ["CVE-2099-1001"]);
    assert_eq!(plan["fixable"][0]["fixed"]["acme-agent"], "1.0.1");
    let no_fix: Vec<&str> = plan["no_fix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cve"].as_str().unwrap())
        .collect();
    assert_eq!(no_fix, ["CVE-2099-2001"]);
    let (_, table) = exposure(dir.path(), &feed, "table");
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with(rhel.as_str()) && l.contains("not covered")),
        "{table}"
    );
    let (_, html) = exposure(dir.path(), &feed, "html");
    assert!(
        html.starts_with("<!DOCTYPE html>") && html.contains("CVE-2099-1001"),
        "{html}"
    );

    // The run patches the vulnerable hosts and records evidence.
    let out = patchbook_in(dir.path())
        .arg("run")
        .arg(write_playbook(dir.path()))
        .args(patch_params(fleet))
        .arg("--param")
        .arg(format!("feed={}", feed.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for h in [deb1, deb2] {
        assert_eq!(
            fleet.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1")
        );
    }

    let out = patchbook_in(dir.path())
        .args(["report", "last", "--compliance", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["feeds"][0]["sha256"], sha.as_str());
    let ev = c["evidence"].as_array().unwrap();
    let on: BTreeSet<&str> = ev.iter().map(|e| e["host"].as_str().unwrap()).collect();
    assert_eq!(on, [deb1.as_str(), deb2.as_str()].into_iter().collect());
    for e in ev {
        assert_eq!(e["cve"], "CVE-2099-1001");
        assert_eq!(e["package"], "acme-agent");
        assert_eq!(
            (e["before"].as_str(), e["after"].as_str()),
            (Some("1.0.0"), Some("1.0.1"))
        );
        assert_eq!(e["closed"], true);
        assert_eq!(e["feed_sha256"], sha.as_str());
    }
    assert_eq!(c["closed"], 2);
    let out = patchbook_in(dir.path())
        .args(["report", "last", "--compliance", "--format", "html"])
        .output()
        .unwrap();
    let html = String::from_utf8_lossy(&out.stdout);
    assert!(
        html.contains("CVE-2099-1001") && html.contains("1.0.1") && html.contains("closed"),
        "{html}"
    );

    // After: only the CVE with no fix remains open.
    let (_, json) = exposure(dir.path(), &feed, "json");
    let plan: Value = serde_json::from_str(&json).unwrap();
    for h in [deb1, deb2] {
        assert_eq!(open_cves(&plan, h), set(&["CVE-2099-2001"]), "{h}");
    }

    // `inventory list` counts open CVEs from that latest scan.
    let out = patchbook_in(dir.path())
        .args(["inventory", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(list.lines().next().unwrap().contains("OPEN CVES"), "{list}");
    let line_of = |h: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(h))
            .unwrap_or_else(|| panic!("{h} not listed: {list}"))
            .to_string()
    };
    assert!(line_of(deb1).ends_with("1 (1 no fix)"), "{list}");
    assert!(line_of(rhel).ends_with("not covered"), "{list}");
    let out = patchbook_in(dir.path())
        .args(["--json", "inventory", "list"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["_meta"]["hostvars"][deb2.as_str()]["patchbook_open_cves"],
        serde_json::json!({"fixable": 0, "no_fix": 1, "covered": true})
    );

    // The evidence is in the hash chain: intact passes, one edited record fails.
    let verify = || {
        patchbook_in(dir.path())
            .args(["audit", "verify"])
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(out.status.success(), "{}", text(&out));
    // The patch run: the live `exposure` calls above are scan runs of their own.
    let runs = support::run_ids(&dir.path().join("state"));
    let patch_run = runs
        .iter()
        .rev()
        .find(|r| !r.contains("-advscan-"))
        .unwrap();
    let journal = dir
        .path()
        .join("state/runs")
        .join(format!("{patch_run}.jsonl"));
    let body = std::fs::read_to_string(&journal).unwrap();
    let line = body
        .lines()
        .find(|l| l.contains("\"advisory.evidence\""))
        .expect("an evidence record")
        .to_string();
    assert!(line.contains("\"after\":\"1.0.1\""), "{line}");
    std::fs::write(
        &journal,
        body.replace(
            &line,
            &line.replace("\"after\":\"1.0.1\"", "\"after\":\"1.0.9\""),
        ),
    )
    .unwrap();
    let out = verify();
    assert!(
        !out.status.success(),
        "an edited evidence record must fail the audit: {}",
        text(&out)
    );
}

fn write_playbook(dir: &Path) -> PathBuf {
    let p = dir.join("advisory-patch.rhai");
    std::fs::write(&p, PLAYBOOK).unwrap();
    p
}
