//! `rehearse_rollback` on real lab hosts: the pilot is patched, rolled back, its
//! state (packages, files under the given paths with modes and hashes) compared
//! with before, and patched again. With the good patch the run goes on; with a
//! package whose `postinst` leaves a file behind that the downgrade cannot take
//! back, the rehearsal fails and no wave starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbook::journal::{read_records, Entry};
use patchbook::lab::Fleet;
use support::{lab_project, patchbook_in, run_ids, text, Lab};

const REHEARSED: &str = r#"
let fresh = artifact(`${param("mirror")}/acme-agent_${param("version")}_all.deb`, #{ sha256: param("sha_new") });
let old = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("lab01:lab02:lab03"), #{
    pilot: ["lab01"], parallel: 1,
    rehearse_rollback: #{ paths: ["/etc/acme", "/opt"] },
}, |host| {
    deploy(host, fresh, #{ rollback_to: old });
    verify(host, "acme-agent", param("version"));
});
"#;

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// acme-agent 1.0.3: 1.0.1's files, and a `postinst` that migrates state into a
/// file no package owns, which reinstalling 1.0.0 leaves in place.
fn build_migrating_package(fleet: &Fleet) -> PathBuf {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = work.path().join("pkg");
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };
    ok(Command::new("dpkg-deb")
        .arg("-R")
        .arg(fleet.deb("1.0.1"))
        .arg(&root));
    let control = root.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    std::fs::write(&control, text.replace("Version: 1.0.1", "Version: 1.0.3")).unwrap();
    let postinst = root.join("DEBIAN/postinst");
    std::fs::write(
        &postinst,
        "#!/bin/sh\nset -e\nmkdir -p /etc/acme\necho 'schema 3' > /etc/acme/migrated.state\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&postinst, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = fleet.dir().join("debs/acme-agent_1.0.3_all.deb");
    ok(Command::new("dpkg-deb").arg("-b").arg(&root).arg(&out));
    out
}

fn run(lab: &Lab, dir: &Path, version: &str, deb: &Path) -> std::process::Output {
    let play = dir.join("play.rhai");
    std::fs::write(&play, REHEARSED).unwrap();
    patchbook_in(dir)
        .arg("-q")
        .arg("run")
        .arg(&play)
        .args([
            "--param",
            &format!("mirror={}", lab.dir().join("debs").display()),
            "--param",
            &format!("version={version}"),
            "--param",
            &format!("sha_new={}", sha(deb)),
            "--param",
            &format!("sha_old={}", sha(&lab.deb("1.0.0"))),
        ])
        .output()
        .unwrap()
}

fn rehearsals(
    dir: &Path,
) -> (
    Vec<(String, patchbook::journal::entry::RehearsalRecord)>,
    Vec<patchbook::journal::Record>,
) {
    let run = run_ids(&dir.join("state")).pop().unwrap();
    let records = read_records(&dir.join("state/runs").join(format!("{run}.jsonl"))).unwrap();
    let found = records
        .iter()
        .filter_map(|r| match r.entry().unwrap() {
            Entry::Rehearsal(x) => Some((r.host.clone().unwrap(), x)),
            _ => None,
        })
        .collect();
    (found, records)
}

#[test]
fn a_rehearsal_that_restores_everything_lets_the_run_go_on() {
    let lab = Lab::start(3);
    let project = lab_project(&lab, "rehearse-", "");
    let out = run(&lab, project.path(), "1.0.1", &lab.deb("1.0.1"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (found, records) = rehearsals(project.path());
    assert_eq!(found.len(), 1, "{found:?}");
    let (host, r) = &found[0];
    assert_eq!(host, "lab01");
    assert!(r.ok, "{r:?}");
    assert!(r.compared > 5, "{r:?}");
    assert!(!r.undone.is_empty(), "{r:?}");
    for h in ["lab01", "lab02", "lab03"] {
        assert_eq!(
            lab.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1"),
            "{h}"
        );
    }
    // The pilot really went there (1.0.1), back (1.0.0) and there again.
    let log = lab.dpkg_log("lab01").unwrap();
    assert_eq!(
        log.matches("status installed acme-agent:all 1.0.1").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("status installed acme-agent:all 1.0.0").count(),
        1,
        "{log}"
    );
    let test = records
        .iter()
        .find_map(|r| match r.entry().unwrap() {
            Entry::Test(t) => Some(t),
            _ => None,
        })
        .expect("a test record");
    assert!(
        test.ok && test.name == "rollback rehearsal on lab01",
        "{test:?}"
    );
}

#[test]
fn a_rehearsal_that_leaves_a_file_behind_stops_the_run_before_any_wave() {
    let lab = Lab::start(3);
    let deb = build_migrating_package(&lab);
    let project = lab_project(&lab, "rehearse-bad-", "");
    let out = run(&lab, project.path(), "1.0.3", &deb);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let (found, records) = rehearsals(project.path());
    assert_eq!(found.len(), 1, "{found:?}");
    let r = &found[0].1;
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.error, None, "the rollback itself ran: {r:?}");
    assert_eq!(r.differences.len(), 1, "{r:?}");
    assert!(
        r.differences[0].starts_with("file /etc/acme/migrated.state: did not exist"),
        "{r:?}"
    );
    let summary = records
        .iter()
        .rev()
        .find(|r| r.kind == "rollout.event" && r.data["kind"] == "run_done")
        .unwrap()
        .data["summary"]
        .clone();
    // With max_failed 0 the pilot's failure also spends the budget: either way
    // the run stops before wave 1.
    assert!(
        ["pilot_failed", "budget_exhausted"].contains(&summary["stop"]["kind"].as_str().unwrap()),
        "{summary}"
    );
    assert_eq!(summary["totals"]["pending"], 2, "{summary}");
    assert!(
        !records.iter().any(|r| r.kind == "rollout.event"
            && r.data["kind"] == "wave_started"
            && r.data["index"] != 0),
        "no wave after the pilot started"
    );
    for h in ["lab02", "lab03"] {
        assert!(!lab.dpkg_log(h).unwrap().contains("1.0.3"), "{h} untouched");
    }
    // The pilot itself is rolled back once more after its failure: still 1.0.0.
    assert_eq!(
        lab.installed_version("lab01", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    // The test report carries the failed rehearsal.
    let run = run_ids(&project.path().join("state")).pop().unwrap();
    let out = patchbook_in(project.path())
        .args(["report", &run])
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("rollback rehearsal on lab01"), "{md}");
    assert!(md.contains("migrated.state"), "{md}");
}
