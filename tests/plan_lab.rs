//! `plan` runs nothing and tells the truth, and ad-hoc `exec` is a journaled run,
//! on a 4-host lab fleet: every host is fingerprinted (content, mode and owner of
//! every file it owns) before and after, so any change `plan` made would show.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use patchbook::lab::Fleet;

const HOSTS: [&str; 4] = ["lab01", "lab02", "lab03", "lab04"];

/// Tests that change a host hold this exclusively; tests that check no host
/// changed hold it shared around their check, so the one does not show up in
/// the other's fingerprints (the tests of this file share one fleet).
static HOST_CHANGES: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn no_host_changes() -> std::sync::RwLockReadGuard<'static, ()> {
    HOST_CHANGES.read().unwrap_or_else(|p| p.into_inner())
}

fn changing_hosts() -> std::sync::RwLockWriteGuard<'static, ()> {
    HOST_CHANGES.write().unwrap_or_else(|p| p.into_inner())
}

fn fleet() -> &'static Fleet {
    support::shared_fleet(HOSTS.len())
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn fingerprints(f: &Fleet) -> Vec<String> {
    HOSTS
        .iter()
        .map(|h| support::host_fingerprint(f, h))
        .collect()
}

/// A folder with the lab's settings, the repo's stdlib and its own state dir.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: support::lab_project(fleet(), "plan-", ""),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn patchbook(&self, args: &[&str]) -> Output {
        let f = fleet();
        let mut cmd = support::patchbook_in(self.dir.path());
        cmd.args(args);
        if matches!(args.first(), Some(&"plan") | Some(&"run")) {
            cmd.args([
                "--param",
                &format!("mirror={}", f.dir().join("debs").display()),
                "--param",
                &format!("sha={}", sha(&f.deb("1.0.1"))),
            ]);
        }
        cmd.output().expect("patchbook runs")
    }

    fn playbook(&self, body: &str) -> String {
        let p = self.path("play.rhai");
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    }

    /// `plan` of `body`, checked to have changed no host: its exit code and
    /// standard output.
    fn plan_touching_nothing(&self, body: &str) -> (Option<i32>, String) {
        let f = fleet();
        let pb = self.playbook(body);
        let _shared = no_host_changes();
        let before = fingerprints(f);
        let out = self.patchbook(&["plan", &pb]);
        let (stdout, stderr) = text(&out);
        assert_eq!(fingerprints(f), before, "plan changed a host:\n{stdout}");
        (out.status.code(), format!("{stdout}\n{stderr}"))
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every change primitive, inside and outside a rollout.
const EVERY_CHANGE: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha") });
for h in hosts("all") { exec(h, ["touch", "/root/PLAN_WAS_HERE"]); }
rollout(hosts("all"), #{ waves: ["50%", "100%"] }, |host| {
    let b = backup(host, ["/etc/acme"]);
    exec(host, ["touch", "/root/PLAN_WAS_HERE"], #{ undo: ["rm", "-f", "/root/PLAN_WAS_HERE"] });
    shell(host, "echo planned >> /etc/acme/agent.conf", #{ undo: b });
    shell(host, "apt-get -y upgrade");
    deploy(host, good);
    restore(host, b);
    verify(host, "acme-agent", "1.0.1");
    health(host, ["/opt/acme/agent.sh", "--check"]);
    if probe(host, ["cat", "/etc/acme/agent.conf"]).code != 0 { throw "cannot read the config"; }
    rollback(host);
});
notify("ops@example.com", "patched");
"#;

#[test]
fn plan_changes_no_host_whatever_the_playbook_does() {
    let f = fleet();
    let p = Project::new();
    let pb = p.playbook(EVERY_CHANGE);
    let _shared = no_host_changes();
    let before = fingerprints(f);
    let out = p.patchbook(&["plan", &pb]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(fingerprints(f), before, "plan changed a host:\n{stdout}");
    assert!(
        !p.path("state").join("runs").exists(),
        "plan wrote a journal"
    );
    for h in HOSTS {
        assert!(stdout.contains(&format!("{h}: would change")), "{stdout}");
    }
    assert!(
        stdout.contains("would run `touch /root/PLAN_WAS_HERE`, not checked; undo: run `rm -f /root/PLAN_WAS_HERE`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would run `apt-get -y upgrade`, not checked; no undo"),
        "{stdout}"
    );
    assert!(stdout.contains("4 host(s) would change"), "{stdout}");
    assert!(stdout.contains("0 could not be planned"), "{stdout}");
}

#[test]
fn plan_names_the_host_and_position_of_every_failure() {
    let p = Project::new();
    let (code, stdout) = p.plan_touching_nothing(
        r#"rollout(hosts("all"), #{}, |host| {
    backup(host, ["/etc/acme"]);
    if host.name == "lab02" { throw "boom"; }
    if host.name == "lab03" { deplo(host, 1); }
});
"#,
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("lab02: could not be planned"), "{stdout}");
    assert!(stdout.contains("boom (at "), "{stdout}");
    assert!(stdout.contains("play.rhai:3:"), "{stdout}");
    assert!(stdout.contains("lab03: could not be planned"), "{stdout}");
    assert!(stdout.contains("deplo"), "{stdout}");
    assert!(stdout.contains("play.rhai:4:"), "{stdout}");
    assert!(stdout.contains("lab01: would not change"), "{stdout}");
    assert!(
        stdout.contains("0 host(s) would change, 2 would not change, 2 could not be planned"),
        "{stdout}"
    );

    // A script error outside any host's work is exit 2.
    let pb = p.playbook("let x = hosts(\"all\");\nthrow \"top-level\";\n");
    let out = p.patchbook(&["plan", &pb]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}

/// Planned hosts' work runs on the plan's own workers (not a thread per host),
/// so those workers must have the stack a script's call depth needs: a runaway
/// recursion is that host's error, not a crashed controller.
#[test]
fn a_runaway_recursion_in_a_planned_hosts_work_is_that_hosts_error() {
    let p = Project::new();
    let (code, stdout) = p.plan_touching_nothing(
        r#"fn f(n) { if n == 0 { 0 } else { 1 + f(n - 1) } }
rollout(hosts("all"), #{}, |host| {
    backup(host, ["/etc/acme"]);
    if host.name == "lab02" { f(1000000); }
});
"#,
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("lab02: could not be planned"), "{stdout}");
    assert!(stdout.contains("Stack overflow"), "{stdout}");
    assert!(
        stdout.contains("0 host(s) would change, 3 would not change, 1 could not be planned"),
        "{stdout}"
    );
}

#[test]
fn an_ad_hoc_exec_that_backs_up_and_edits_is_reversed_by_rollback() {
    let f = fleet();
    let _exclusive = changing_hosts();
    let p = Project::new();
    let before = support::host_fingerprint(f, "lab04");
    let out = p.patchbook(&[
        "--json",
        "exec",
        "lab04",
        r#"let b = backup(host, ["/etc/acme"]);
           exec(host, ["sh", "-c", "echo 'interval = 5' >> /etc/acme/agent.conf; chmod 600 /etc/acme/agent.conf"], #{ undo: b });
           exec(host, ["touch", "/root/adhoc-marker"], #{ undo: ["rm", "-f", "/root/adhoc-marker"] });
           probe(host, ["cat", "/etc/acme/agent.conf"]).stdout"#,
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert!(
        line["value"].as_str().unwrap().contains("interval = 5"),
        "{line}"
    );
    let run = line["run"].as_str().unwrap().to_string();
    assert_ne!(
        support::host_fingerprint(f, "lab04"),
        before,
        "the edit happened"
    );

    // The report renders the ad-hoc run from its journal, its edits marked unmanaged.
    let out = p.patchbook(&["report", &run, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let host = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "lab04")
        .expect("lab04 in the report")
        .clone();
    let steps = host["steps"].as_array().unwrap();
    let unmanaged: Vec<&serde_json::Value> =
        steps.iter().filter(|s| s["unmanaged"] == true).collect();
    assert_eq!(unmanaged.len(), 2, "{steps:?}");
    assert!(
        unmanaged[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("unmanaged change: `sh -c"),
        "{steps:?}"
    );

    // A fresh process reverses it from the journal alone.
    let out = p.patchbook(&["rollback", &run]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("lab04: rolled back"), "{stdout}");
    assert_eq!(support::host_fingerprint(f, "lab04"), before);
    // And says so when there is nothing left.
    let out = p.patchbook(&["rollback", &run]);
    assert!(
        text(&out).0.contains("nothing left to undo"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn an_unmanaged_change_without_undo_is_never_called_rolled_back() {
    let f = fleet();
    let _exclusive = changing_hosts();
    let p = Project::new();
    let pb = p.playbook(
        r#"rollout(hosts("lab03"), #{}, |host| {
    exec(host, ["touch", "/root/unmanaged-marker"]);
    throw "later step failed";
});
"#,
    );
    let out = p.patchbook(&["run", &pb]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        f.host("lab03")
            .unwrap()
            .dir
            .join("root/unmanaged-marker")
            .exists(),
        "the change happened"
    );
    let report = p.patchbook(&["report", "last", "--format", "json"]);
    let r = String::from_utf8_lossy(&report.stdout);
    assert!(r.contains("not fully reverted"), "{r}");
    let runs = std::fs::read_dir(p.path("state/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let run = runs.file_stem().unwrap().to_str().unwrap().to_string();
    let out = p.patchbook(&["rollback", &run]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("lab03: NOT FULLY REVERTED")
            && stdout.contains("touch /root/unmanaged-marker"),
        "{stdout}"
    );
    std::fs::remove_file(f.host("lab03").unwrap().dir.join("root/unmanaged-marker")).unwrap();
}

#[test]
fn a_hosts_timeout_ends_its_command_instead_of_reporting_the_overrun_afterwards() {
    let _exclusive = changing_hosts();
    let p = Project::new();
    let pb = p.playbook(
        r#"rollout(hosts("lab01"), #{ timeout: "2s" }, |host| {
    exec(host, ["sleep", "40"], #{ undo: ["true"] });
});
"#,
    );
    let t0 = std::time::Instant::now();
    let out = p.patchbook(&["run", &pb]);
    let took = t0.elapsed();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "the host's 2s timeout let a 40s command run for {took:?}"
    );
    // The host is usable again: the next run reaches it.
    let pb = p.playbook("rollout(hosts(\"lab01\"), #{}, |host| { probe(host, [\"true\"]); });\n");
    let out = p.patchbook(&["run", &pb]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}
