//! Rollback never reverts a state its run did not create: two runs on one lab host,
//! the second changing what the first left, then `rollback FIRST` must leave the
//! host alone (and say what it found and expected), while `rollback SECOND` works
//! and, once the host is back where the first run left it, so does the first's.
//! Packages (deploy) and files (put_file) each get their own host.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use patchbook::journal::entry::Entry;
use patchbook::journal::read_records;
use support::Lab;

/// The first run: the good patch over the base version.
const FIRST: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{}, |host| {
    deploy(host, good, #{ rollback_to: previous });
});
"#;

/// The second run, changing the package again (here: back to the base version, the
/// only other good build the lab has), with its own undo.
const SECOND: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{}, |host| {
    deploy(host, previous, #{ rollback_to: good });
});
"#;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    params: Vec<String>,
}

fn setup(lab: &Lab) -> Setup {
    let dir = support::lab_project(lab, "undo-drift-", "playbooks = \"{dir}\"\n");
    let config = dir.path().join("patchbook.toml");
    let params = support::patch_params(lab);
    Setup {
        config,
        params,
        dir,
    }
}

impl Setup {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_patchbook"));
        c.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(self.state())
            .args(args);
        c
    }

    fn runs(&self) -> Vec<String> {
        support::run_ids(&self.state())
    }

    /// Runs `playbook` (written into the playbook folder as `name`) to success and
    /// returns its run id.
    fn run_ok(&self, name: &str, playbook: &str) -> String {
        let pb = self.dir.path().join(name);
        std::fs::write(&pb, playbook).unwrap();
        let before = self.runs();
        let out = self
            .command(&["-q", "run"])
            .arg(&pb)
            .args(&self.params)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out));
        let new: Vec<String> = self
            .runs()
            .into_iter()
            .filter(|r| !before.contains(r))
            .collect();
        assert_eq!(new.len(), 1, "{name}: one new run");
        new[0].clone()
    }

    fn rollback(&self, run: &str) -> Output {
        self.command(&["rollback", run]).output().unwrap()
    }

    /// The `undo.skipped` records of a run, typed.
    fn skipped(&self, run: &str) -> Vec<patchbook::journal::entry::UndoSkipped> {
        read_records(&self.state().join("runs").join(format!("{run}.jsonl")))
            .unwrap()
            .iter()
            .filter_map(|r| match r.entry() {
                Ok(Entry::UndoSkipped(s)) => Some(s),
                _ => None,
            })
            .collect()
    }
}

use support::text;

/// Package installs (any version) in the host's dpkg log.
fn installs(lab: &Lab) -> usize {
    lab.dpkg_log("lab01")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" status installed acme-agent:all "))
        .count()
}

fn version(lab: &Lab) -> Option<String> {
    lab.installed_version("lab01", "acme-agent").unwrap()
}

#[test]
fn rollback_of_a_run_whose_package_another_run_changed_leaves_the_host_alone() {
    let lab = Lab::start(1);
    let s = setup(&lab);
    let first = s.run_ok("first.rhai", FIRST);
    assert_eq!(version(&lab).as_deref(), Some("1.0.1"));
    let second = s.run_ok("second.rhai", SECOND);
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));

    // The first run's undo (reinstall 1.0.0) would hit the second run's work.
    let installs_before = installs(&lab);
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(
            "acme-agent is 1.0.0, this run installed 1.0.1: not reverting a state this run did not create"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));
    assert_eq!(
        installs(&lab),
        installs_before,
        "rollback FIRST touched dpkg"
    );
    let skipped = s.skipped(&first);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].step, "deploy");
    assert_eq!(skipped[0].found, "acme-agent is 1.0.0");
    assert_eq!(skipped[0].expected, "installed 1.0.1");

    // The second run's own state is still there: its rollback works.
    let out = s.rollback(&second);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version(&lab).as_deref(), Some("1.0.1"));
    assert!(s.skipped(&second).is_empty());

    // Now the host is as the first run left it, so its undo is its own to apply.
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));
    assert!(
        s.command(&["audit", "verify"])
            .output()
            .unwrap()
            .status
            .success(),
        "audit verify"
    );
}

#[test]
fn rollback_of_a_run_whose_file_another_run_rewrote_or_removed_leaves_it_alone() {
    let lab = Lab::start(1);
    let s = setup(&lab);
    let conf = lab.host("lab01").unwrap().dir.join("opt/acme/site.conf");
    std::fs::write(s.dir.path().join("a.conf"), "mode = a\n").unwrap();
    std::fs::write(s.dir.path().join("b.conf"), "mode = b\n").unwrap();
    let put =
        |src: &str| format!("put_file(hosts(\"lab01\")[0], \"{src}\", \"/opt/acme/site.conf\");\n");
    let first = s.run_ok("first.rhai", &put("a.conf"));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "mode = a\n");
    let second = s.run_ok("second.rhai", &put("b.conf"));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "mode = b\n");

    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not reverting a state this run did not create"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "mode = b\n");
    let skipped = s.skipped(&first);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0]
            .found
            .starts_with("/opt/acme/site.conf is sha256 "),
        "{skipped:?}"
    );

    // A person removed the file: still not the first run's state, still left alone.
    std::fs::remove_file(&conf).unwrap();
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!conf.exists(), "rollback FIRST re-created a removed file");
    assert_eq!(s.skipped(&first).len(), 2);
    assert_eq!(s.skipped(&first)[1].found, "/opt/acme/site.conf is absent");

    // Put the second run's file back: its rollback restores the first run's file,
    // after which the first run's rollback removes the file it created.
    std::fs::write(&conf, "mode = b\n").unwrap();
    let out = s.rollback(&second);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "mode = a\n");
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !conf.exists(),
        "the first run created the file; its undo removes it"
    );
}

#[test]
fn rollback_of_an_upgrade_whose_package_another_run_changed_leaves_the_host_alone() {
    let lab = Lab::start(1);
    let repo = patchbook::lab::apt::build_repo(
        &lab.dir().join("repos").join("drift"),
        &[lab.deb("1.0.0"), lab.deb("1.0.1")],
        "bookworm-security",
        "Debian-Security",
    )
    .unwrap();
    lab.use_apt_repo("lab01", &repo).unwrap();
    let s = setup(&lab);
    let first = s.run_ok(
        "first.rhai",
        r#"upgrade(hosts("lab01")[0], ["acme-agent"], #{ to: "candidate" });"#,
    );
    assert_eq!(version(&lab).as_deref(), Some("1.0.1"));
    let second = s.run_ok("second.rhai", SECOND);
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));

    let installs_before = installs(&lab);
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("acme-agent is 1.0.0, this run upgraded to acme-agent 1.0.1"),
        "{}",
        text(&out)
    );
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));
    assert_eq!(
        installs(&lab),
        installs_before,
        "rollback FIRST touched dpkg"
    );
    let skipped = s.skipped(&first);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].step, "upgrade");

    let out = s.rollback(&second);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version(&lab).as_deref(), Some("1.0.1"));
    let out = s.rollback(&first);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(version(&lab).as_deref(), Some("1.0.0"));
}
