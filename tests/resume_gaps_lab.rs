//! Resume after a SIGKILL that lands between a host's `dpkg -i` and the journal's
//! outcome, when the playbook targets `needing()` hosts: the patched host drops out
//! of the targets on resume, yet it must be re-probed and its open intent closed
//! (never left unknown), a pilot made of such hosts must not make the resume fail,
//! and a resume under another config or another playbook is refused before
//! anything runs (other `--param` values override the recorded ones and are said:
//! see `unreachable_lab.rs`).
//!
//! The kill point is made exact by the install command itself: after `dpkg -i` it
//! waits while a hold file exists, so the test kills the controller once the host's
//! own dpkg database says 1.0.1, then removes the hold.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use patchbook::journal::entry::Entry;
use patchbook::journal::read_records;
use patchbook::journal::state::RunState;
use support::Lab;

/// `POLICY` is replaced by each test's rollout policy.
const PLAYBOOK: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
let hold = param("hold");
let targets = hosts("all").needing("acme-agent", "1.0.1");
rollout(targets, POLICY, |host| {
    deploy(host, good, #{
        rollback_to: previous,
        method: ["sh", "-c", "dpkg -i -- \"$1\" || exit; while [ -e \"$2\" ]; do sleep 0.05; done", "install", "{file}", hold],
    });
    verify(host, "acme-agent", "1.0.1");
});
"#;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    playbook: PathBuf,
    params: Vec<String>,
}

fn setup(lab: &Lab, policy: &str) -> Setup {
    let dir = support::lab_project(lab, "resume-gaps-", "");
    let config = dir.path().join("patchbook.toml");
    let playbook = dir.path().join("play.rhai");
    std::fs::write(&playbook, PLAYBOOK.replace("POLICY", policy)).unwrap();
    let mut params = support::patch_params(lab);
    params.extend([
        "--param".into(),
        format!("hold={}", dir.path().join("hold").display()),
    ]);
    Setup {
        dir,
        config,
        playbook,
        params,
    }
}

impl Setup {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn hold(&self) -> PathBuf {
        self.dir.path().join("hold")
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

    /// Starts a run, kills it with SIGKILL once `host` has 1.0.1 in its own dpkg
    /// database (its install done, its outcome not journaled), releases the hold and
    /// returns the run id.
    fn run_killed_after_install(&self, lab: &Lab, host: &str) -> String {
        std::fs::write(self.hold(), "").unwrap();
        let mut child = self
            .command(&["-q", "run"])
            .arg(&self.playbook)
            .args(&self.params)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        support::wait_installed(lab, host, "acme-agent", "1.0.1");
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(self.hold()).unwrap();
        let runs = self.runs();
        assert_eq!(runs.len(), 1, "{runs:?}");
        runs[0].clone()
    }

    fn resume(&self, run: &str, params: &[String]) -> Output {
        self.command(&["-q", "run", "--resume", run])
            .args(params)
            .output()
            .unwrap()
    }

    fn state_of(&self, run: &str) -> (RunState, Vec<patchbook::journal::Record>) {
        let records =
            read_records(&self.state().join("runs").join(format!("{run}.jsonl"))).unwrap();
        (RunState::from_records(run, &records), records)
    }
}

use support::text;

/// Completed installs of acme-agent 1.0.1 in a host's dpkg log.
fn installs(lab: &Lab, host: &str) -> usize {
    lab.dpkg_log(host)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" status installed acme-agent:all 1.0.1"))
        .count()
}

/// Every host patched exactly once, none with an open intent, every one finished
/// with a passing verify in the journal.
fn assert_all_patched_once_and_closed(lab: &Lab, s: &Setup, run: &str) {
    let (state, records) = s.state_of(run);
    for h in lab.hosts() {
        let name = h.name.as_str();
        assert_eq!(
            lab.installed_version(name, "acme-agent")
                .unwrap()
                .as_deref(),
            Some("1.0.1"),
            "{name}"
        );
        assert_eq!(
            installs(lab, name),
            1,
            "{name} installed 1.0.1 more than once"
        );
        let hist = &state.hosts[name];
        assert!(
            hist.open_intents().is_empty(),
            "{name} still has open intents: {:?}",
            hist.open_intents()
        );
        assert!(hist.finished && !hist.failed, "{name}: {hist:?}");
        assert!(
            records.iter().any(|r| r.host.as_deref() == Some(name)
                && matches!(r.entry(), Ok(Entry::Verify(v)) if v.ok)),
            "{name} has no passing verify"
        );
    }
}

#[test]
fn a_pilot_killed_between_install_and_outcome_is_rechecked_from_the_journal_on_resume() {
    let lab = Lab::start(3);
    let s = setup(&lab, r#"#{ pilot: hosts("lab01"), waves: ["100%"] }"#);
    let run = s.run_killed_after_install(&lab, "lab01");
    // What a controller killed between an upload and its install leaves in the
    // hosts' /tmp (the lab hosts share the machine's), beside another run's.
    let leftover = PathBuf::from(format!(
        "/tmp/patchbook.{}.leftover",
        patchbook::primitives::backup::staging_tag(&run)
    ));
    let other = PathBuf::from(format!("/tmp/patchbook.other-{run}.keep"));
    for d in [&leftover, &other] {
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/x.deb"), b"partial").unwrap();
    }
    let out = s.resume(&run, &s.params);
    let other_kept = other.exists();
    let _ = std::fs::remove_dir_all(&other);
    assert!(out.status.success(), "resume failed: {}", text(&out));
    assert!(
        !leftover.exists(),
        "the interrupted attempt's staging folder is still there"
    );
    assert!(other_kept, "another run's staging folder was removed");
    assert!(
        !text(&out).contains("none of the pilot hosts"),
        "{}",
        text(&out)
    );
    assert_all_patched_once_and_closed(&lab, &s, &run);
    let (state, records) = s.state_of(&run);
    // The pilot's install was found on the host, not done again.
    let pilot = &state.hosts["lab01"];
    let deploy = pilot
        .steps
        .iter()
        .find(|st| st.step == "deploy" && st.undoes.is_none())
        .unwrap();
    let out = deploy
        .outcome_data
        .as_ref()
        .and_then(|o| o.deploy_output())
        .unwrap();
    assert!(
        out.resumed
            .as_deref()
            .is_some_and(|r| r.contains("the install had completed")),
        "{out:?}"
    );
    assert!(
        records.iter().any(|r| matches!(
            r.entry(),
            Ok(Entry::RolloutResume(rr)) if rr.rechecked == ["lab01"]
        )),
        "no rollout.resume record naming lab01 as rechecked"
    );
}

#[test]
fn a_host_whose_outcome_was_lost_is_reprobed_even_when_needing_drops_it() {
    let lab = Lab::start(3);
    let s = setup(&lab, r#"#{ waves: ["100%"], parallel: 1 }"#);
    let run = s.run_killed_after_install(&lab, "lab01");
    let (state, _) = s.state_of(&run);
    assert_eq!(state.hosts["lab01"].open_intents().len(), 1);
    let out = s.resume(&run, &s.params);
    assert!(out.status.success(), "resume failed: {}", text(&out));
    assert_all_patched_once_and_closed(&lab, &s, &run);
}

#[test]
fn a_resume_with_another_config_or_playbook_is_refused_and_touches_nothing() {
    let lab = Lab::start(2);
    let s = setup(&lab, r#"#{ waves: ["100%"], parallel: 1 }"#);
    let run = s.run_killed_after_install(&lab, "lab01");
    let records_before = s.state_of(&run).1.len();
    let log_before = lab.dpkg_log("lab02").unwrap();

    let refused = |out: &Output, says: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", text(out));
        let t = text(out);
        assert!(t.contains("cannot be resumed"), "{t}");
        assert!(t.contains(says), "{t}");
        assert!(t.contains("start a new run"), "{t}");
    };
    // Another config: a trusted source added.
    let cfg = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        cfg.replacen(
            "trusted_sources = [",
            "trusted_sources = [\"https://elsewhere.example.com/\", ",
            1,
        ),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&s.config).unwrap(), cfg);
    refused(&s.resume(&run, &s.params), "the config");
    std::fs::write(&s.config, &cfg).unwrap();
    // Another playbook.
    let pb = std::fs::read_to_string(&s.playbook).unwrap();
    std::fs::write(&s.playbook, format!("{pb}\n// edited\n")).unwrap();
    let out = s.resume(&run, &s.params);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("changed since run"), "{}", text(&out));
    std::fs::write(&s.playbook, &pb).unwrap();

    // Nothing ran and nothing was journaled by the refused attempts.
    assert_eq!(s.state_of(&run).1.len(), records_before);
    assert_eq!(lab.dpkg_log("lab02").unwrap(), log_before);
    assert_eq!(
        lab.installed_version("lab02", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );

    // The same everything resumes.
    let out = s.resume(&run, &s.params);
    assert!(out.status.success(), "resume failed: {}", text(&out));
    assert_all_patched_once_and_closed(&lab, &s, &run);
}
