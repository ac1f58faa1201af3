//! Hosts that cannot be connected to, on real sshd lab hosts: a dead host in a
//! `needing()` probe is reported unreachable while the rest are patched; one that
//! dies before its rollout work is unreachable, not failed, and not rolled back;
//! unreachable hosts have their own budget (`max_unreachable`); `run --retry RUN`
//! patches exactly the hosts RUN did not, and `--resume`/`--retry` reuse the run's
//! `--param` values (secrets as references or not at all).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use patchbook::journal::entry::{Entry, ParamValue, RolloutEvent, StopReason, Summary};
use patchbook::journal::state::RunState;
use patchbook::journal::{read_records, Record};
use patchbook::rollout::HostStatus;
use support::{lab_project, patch_params, patchbook_in, Lab};

/// `TARGETS` and `POLICY` are replaced by each test.
const PLAYBOOK: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
EXTRA
rollout(TARGETS, POLICY, |host| {
    deploy(host, good, #{ rollback_to: previous });
    verify(host, "acme-agent", "1.0.1");
});
"#;

struct Project {
    dir: tempfile::TempDir,
    playbook: PathBuf,
    params: Vec<String>,
}

fn project(lab: &Lab, targets: &str, policy: &str, extra: &str) -> Project {
    let dir = lab_project(lab, "unreachable-", "");
    let playbook = dir.path().join("play.rhai");
    std::fs::write(
        &playbook,
        PLAYBOOK
            .replace("TARGETS", targets)
            .replace("POLICY", policy)
            .replace("EXTRA", extra),
    )
    .unwrap();
    Project {
        params: patch_params(lab),
        playbook,
        dir,
    }
}

impl Project {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn patchbook(&self, args: &[&str], extra: &[String]) -> Output {
        patchbook_in(self.dir.path())
            .args(args)
            .args(extra)
            .output()
            .unwrap()
    }

    fn run(&self, extra: &[String]) -> Output {
        let mut args = self.params.clone();
        args.extend_from_slice(extra);
        patchbook_in(self.dir.path())
            .arg("run")
            .arg(&self.playbook)
            .args(&args)
            .output()
            .unwrap()
    }

    /// Run ids, oldest first.
    fn runs(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.state().join("runs"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".jsonl"))
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        out
    }

    fn records(&self, run: &str) -> Vec<Record> {
        read_records(&self.state().join("runs").join(format!("{run}.jsonl"))).unwrap()
    }

    fn state_of(&self, run: &str) -> RunState {
        RunState::from_records(run, &self.records(run))
    }

    /// The run's last rollout summary.
    fn summary(&self, run: &str) -> Summary {
        self.records(run)
            .iter()
            .rev()
            .find_map(|r| match r.entry() {
                Ok(Entry::Rollout(RolloutEvent::RunDone { summary })) => Some(summary),
                _ => None,
            })
            .expect("a rollout summary")
    }

    /// `(host, step)` of every `host.unreachable` record of the run.
    fn unreachable_records(&self, run: &str) -> Vec<(String, String)> {
        self.records(run)
            .iter()
            .filter_map(|r| match r.entry() {
                Ok(Entry::HostUnreachable(u)) => Some((r.host.clone().unwrap_or_default(), u.step)),
                _ => None,
            })
            .collect()
    }
}

use support::text;

fn state_of(s: &[(String, HostStatus)], host: &str) -> HostStatus {
    s.iter()
        .find(|(h, _)| h == host)
        .map(|(_, st)| *st)
        .unwrap_or_else(|| panic!("{host} not in the summary: {s:?}"))
}

fn states(summary: &Summary) -> Vec<(String, HostStatus)> {
    summary
        .hosts
        .iter()
        .map(|h| (h.name.clone(), h.state))
        .collect()
}

/// Completed installs of acme-agent 1.0.1 in a host's dpkg log.
fn installs(lab: &Lab, host: &str) -> usize {
    lab.dpkg_log(host)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" status installed acme-agent:all 1.0.1"))
        .count()
}

fn version(lab: &Lab, host: &str) -> Option<String> {
    lab.installed_version(host, "acme-agent").unwrap()
}

/// Hosts with a step in the run's journal.
fn touched(p: &Project, run: &str) -> BTreeSet<String> {
    p.state_of(run)
        .hosts
        .iter()
        .filter(|(_, h)| !h.steps.is_empty())
        .map(|(n, _)| n.clone())
        .collect()
}

fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(dir) {
        if std::fs::read(&e)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            out.push(e);
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn ten_hosts_with_two_down_patch_eight_report_two_unreachable_and_retry_patches_exactly_those() {
    let mut lab = Lab::start(10);
    let p = project(
        &lab,
        r#"hosts("all").needing("acme-agent", "1.0.1")"#,
        r#"#{ waves: ["50%", "100%"], max_unreachable: 2 }"#,
        "",
    );
    let down = ["lab04", "lab08"];
    for h in down {
        lab.kill_host(h).unwrap();
    }
    let out = p.run(&[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("unreachable: lab04, lab08"), "{t}");
    assert!(stdout.contains("patchbook run --retry"), "{t}");
    assert!(
        t.contains("10 targeted, 8 done, 0 failed, 2 unreachable"),
        "{t}"
    );

    let runs = p.runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = runs[0].clone();
    // The probe met the dead hosts and went on: journaled as unreachable there.
    assert_eq!(
        p.unreachable_records(&run),
        vec![
            ("lab04".to_string(), "needing".to_string()),
            ("lab08".to_string(), "needing".to_string())
        ]
    );
    let summary = p.summary(&run);
    assert_eq!(summary.stop, StopReason::Completed);
    assert_eq!(summary.totals.done, 8, "{summary:?}");
    assert_eq!(summary.totals.unreachable, 2, "{summary:?}");
    assert_eq!(summary.totals.failed, 0, "{summary:?}");
    assert_eq!(summary.allowed_unreachable, 2);
    let st = states(&summary);
    for h in down {
        assert_eq!(state_of(&st, h), HostStatus::Unreachable);
    }
    let up: Vec<String> = lab
        .hosts()
        .iter()
        .map(|h| h.name.clone())
        .filter(|n| !down.contains(&n.as_str()))
        .collect();
    for h in &up {
        assert_eq!(state_of(&st, h), HostStatus::Done);
        assert_eq!(version(&lab, h).as_deref(), Some("1.0.1"), "{h}");
    }
    // The report counts them apart from failures.
    let report = p.patchbook(&["report", &run, "--format", "json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(v["counts"]["unreachable"], 2, "{v}");
    assert_eq!(v["counts"]["failed"], 0, "{v}");
    assert_eq!(v["counts"]["done"], 8, "{v}");

    let logs_before: Vec<String> = up.iter().map(|h| lab.dpkg_log(h).unwrap()).collect();
    for h in down {
        lab.fleet.revive_host(h).unwrap();
        assert_eq!(version(&lab, h).as_deref(), Some("1.0.0"), "{h}");
    }

    // No --param: the retry takes RUN's playbook and values from its journal.
    let out = p.patchbook(&["run", "--retry", &run], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("retrying the 2 failed or unreachable host(s) of run"),
        "{t}"
    );
    let runs = p.runs();
    assert_eq!(runs.len(), 2, "a retry is a new run: {runs:?}");
    let retry = runs.iter().find(|r| **r != run).unwrap().clone();
    let header = p.state_of(&retry).header.unwrap();
    assert_eq!(header.retry_of.as_deref(), Some(run.as_str()));
    assert_eq!(
        touched(&p, &retry),
        down.iter().map(|h| h.to_string()).collect::<BTreeSet<_>>()
    );
    for h in down {
        assert_eq!(version(&lab, h).as_deref(), Some("1.0.1"), "{h}");
        assert_eq!(installs(&lab, h), 1, "{h}");
    }
    // The other eight were not touched again.
    let logs_after: Vec<String> = up.iter().map(|h| lab.dpkg_log(h).unwrap()).collect();
    assert_eq!(logs_before, logs_after);
    let retried = p.summary(&retry);
    assert_eq!(retried.totals.targeted, 2, "{retried:?}");
    assert_eq!(retried.totals.done, 2, "{retried:?}");

    // Nothing failed or unreachable is left: a second retry has nothing to do.
    let out = p.patchbook(&["run", "--retry", &retry], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to retry"), "{}", text(&out));
    assert_eq!(p.runs().len(), 2);
}

#[test]
fn spent_unreachable_budget_stops_the_run_and_a_resume_without_params_reuses_them() {
    let mut lab = Lab::start(3);
    // Default: max_unreachable follows max_failed, which is 0.
    let p = project(
        &lab,
        r#"hosts("all").needing("acme-agent", "1.0.1")"#,
        r#"#{ waves: ["100%"] }"#,
        "",
    );
    lab.kill_host("lab02").unwrap();
    // `plan` names the host the probe could not reach instead of dropping it.
    let out = p.patchbook(&["plan", p.playbook.to_str().unwrap()], &p.params);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("lab02: could not be planned"), "{t}");
    assert!(
        t.contains("error: unreachable: lab02: cannot connect to"),
        "{t}"
    );
    assert!(t.contains("lab01: would change"), "{t}");
    let out = p.run(&[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("unreachable budget (max_unreachable) spent: 1 unreachable, 0 allowed"),
        "{t}"
    );
    let run = p.runs()[0].clone();
    let summary = p.summary(&run);
    assert_eq!(
        summary.stop,
        StopReason::UnreachableBudgetExhausted {
            unreachable: 1,
            allowed: 0
        }
    );
    assert_eq!(summary.totals.pending, 2, "{summary:?}");
    assert_eq!(summary.totals.failed, 0, "{summary:?}");
    // No wave started.
    for h in ["lab01", "lab03"] {
        assert_eq!(version(&lab, h).as_deref(), Some("1.0.0"), "{h}");
    }
    let recorded = p.state_of(&run).params.expect("params recorded");
    assert!(
        matches!(recorded.get("mirror"), Some(ParamValue::Plain(m)) if m.ends_with("debs")),
        "{recorded:?}"
    );

    lab.fleet.revive_host("lab02").unwrap();
    // Not one --param: mirror and checksums come from the journal.
    let out = p.patchbook(&["run", "--resume", &run], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("overrides"), "{t}");
    for h in ["lab01", "lab02", "lab03"] {
        assert_eq!(version(&lab, h).as_deref(), Some("1.0.1"), "{h}");
        assert_eq!(installs(&lab, h), 1, "{h}");
    }
    let st = p.state_of(&run);
    assert!(!st.hosts["lab02"].unreachable, "the resume reached it");
    assert!(st.retry_hosts().is_empty(), "{:?}", st.retry_hosts());
}

#[test]
fn a_host_dead_before_its_work_is_unreachable_not_failed_and_params_reuse_keeps_secrets_out() {
    let mut lab = Lab::start(3);
    let canary = "CANARY-5e1d0c-unreachable";
    let env_secret = "ENV-SECRET-9b2f-unreachable";
    let p = project(
        &lab,
        r#"hosts("all")"#,
        r#"#{ waves: ["100%"], max_unreachable: 1 }"#,
        r#"let token = secret(param("token")); let hook = param("hook"); let note = param("note");"#,
    );
    lab.kill_host("lab02").unwrap();
    let secrets = vec![
        "--param".to_string(),
        format!("token={canary}"),
        "--param".into(),
        "hook=${env:PB_UNREACHABLE_HOOK}".into(),
        "--param".into(),
        "note=first".into(),
    ];
    let mut cmd = patchbook_in(p.dir.path());
    cmd.env("PB_UNREACHABLE_HOOK", env_secret)
        .arg("run")
        .arg(&p.playbook)
        .args(&p.params)
        .args(&secrets);
    let out = cmd.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("lab02: UNREACHABLE"), "{t}");
    let run = p.runs()[0].clone();
    let summary = p.summary(&run);
    let st = states(&summary);
    assert_eq!(state_of(&st, "lab02"), HostStatus::Unreachable);
    assert_eq!(summary.totals.failed, 0, "{summary:?}");
    assert_eq!(summary.totals.unreachable, 1, "{summary:?}");
    assert_eq!(summary.totals.done, 2, "{summary:?}");
    // Nothing could reach it, so nothing was rolled back.
    assert!(!summary.hosts.iter().any(|h| h.rolled_back), "{summary:?}");
    assert!(summary.rollback_order.is_empty(), "{summary:?}");
    assert_eq!(
        p.unreachable_records(&run),
        vec![("lab02".to_string(), "rollout".to_string())]
    );

    // Values as recorded: the secret not at all, the reference as a reference.
    let recorded = p.state_of(&run).params.expect("params recorded");
    assert_eq!(recorded.get("token"), Some(&ParamValue::Secret));
    assert_eq!(
        recorded.get("hook"),
        Some(&ParamValue::Reference("${env:PB_UNREACHABLE_HOOK}".into()))
    );
    assert_eq!(
        recorded.get("note"),
        Some(&ParamValue::Plain("first".into()))
    );
    for needle in [canary, env_secret] {
        let leaks = files_containing(&p.state(), needle);
        assert!(leaks.is_empty(), "{needle} is in {leaks:?}");
    }

    lab.fleet.revive_host("lab02").unwrap();
    // The secret was not kept, so it must be given again; nothing starts.
    let out = p.patchbook(&["run", "--retry", &run], &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("marked token secret"), "{t}");
    assert_eq!(p.runs().len(), 1);

    // Given again but another value: said (never shown); a reference that cannot
    // be read stops the retry before it starts.
    let out = p.patchbook(
        &["run", "--retry", &run],
        &[
            "--param".into(),
            "token=not-the-canary".into(),
            "--param".into(),
            "hook=${env:PB_UNREACHABLE_UNSET}".into(),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!(
            "--param token differs from the value run {run} used (a secret: not shown)"
        )),
        "{t}"
    );
    assert!(t.contains("${env:PB_UNREACHABLE_UNSET} is not set"), "{t}");
    assert_eq!(p.runs().len(), 1);

    // Given again, with another note: the override is said, the rest reused.
    let out = patchbook_in(p.dir.path())
        .env("PB_UNREACHABLE_HOOK", env_secret)
        .args(["run", "--retry", &run])
        .args([
            "--param",
            &format!("token={canary}"),
            "--param",
            "note=second",
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "--param note overrides the value run {run} used: first then, second now"
        )),
        "{t}"
    );
    assert!(!t.contains(canary), "{t}");
    assert!(!t.contains("--param token differs"), "{t}");
    let retry = p.runs().into_iter().find(|r| *r != run).unwrap();
    assert_eq!(touched(&p, &retry), BTreeSet::from(["lab02".to_string()]));
    assert_eq!(version(&lab, "lab02").as_deref(), Some("1.0.1"));
    assert_eq!(installs(&lab, "lab01"), 1);
    assert_eq!(installs(&lab, "lab03"), 1);
    let again = p.state_of(&retry).params.expect("params recorded");
    assert_eq!(again.get("note"), Some(&ParamValue::Plain("second".into())));
    for needle in [canary, env_secret] {
        let leaks = files_containing(&p.state(), needle);
        assert!(leaks.is_empty(), "{needle} is in {leaks:?}");
    }
}
