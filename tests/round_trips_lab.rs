//! Round trips of the patch job on real sshd hosts behind the lab's relays, which
//! count the request/response turns each host sees; and the journal of the deploy
//! that uploads, checks and installs in one command: its intent, with the version
//! before and the undo step, is on disk before the install runs, and a package that
//! changed since the run read it is never installed over on a stale record.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::time::Duration;

use patchbook::journal::{read_records, Record};
use support::{lab_project, patch_params, patchbook_in, run_ids, text, Lab};

/// The fleet benchmark's job (scripts/bench-patch.rhai), with an install method that
/// proves the ordering: on the host, before `dpkg -i`, it looks for this host's
/// deploy intent, naming 1.0.0 as the version before, in the run's journal file.
const JOB: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
rollout(hosts("all"), #{ waves: ["100%"], max_failed: 0 }, |host| {
    installed(host, "acme-agent");
    backup(host, ["/opt/acme"]);
    deploy(host, good, #{ method: ["sh", "-c",
        "grep -h '\"step.intent\"' \"$1\"/runs/*.jsonl | grep -F \"\\\"host\\\":\\\"$2\\\"\" | grep -F '\"step\":\"deploy\"' | grep -qF '\"from\":\"1.0.0\"' || { echo 'no intent in the journal' >&2; exit 9; }; exec dpkg -i -- \"$0\"",
        "{file}", param("state"), host.name] });
    verify(host, "acme-agent", "1.0.1");
    health(host, ["/opt/acme/agent.sh", "--check"]);
});
"#;

/// The job with a change between reading the package and deploying: something
/// else installs 1.0.2 meanwhile.
const CHANGED: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
rollout(hosts("all"), #{ waves: ["100%"], max_failed: 0 }, |host| {
    installed(host, "acme-agent");
    backup(host, ["/opt/acme"]);
    exec(host, ["dpkg", "-i", "--", `${param("mirror")}/acme-agent_1.0.2_all.deb`]);
    deploy(host, good);
    verify(host, "acme-agent", "1.0.1");
});
"#;

fn run(lab: &Lab, playbook: &str) -> (tempfile::TempDir, String, Vec<Record>) {
    let dir = lab_project(&lab.fleet, "round-trips-", "");
    let file = dir.path().join("job.rhai");
    std::fs::write(&file, playbook).unwrap();
    let state = dir.path().join("state");
    let out = patchbook_in(dir.path())
        .args(["-q", "run"])
        .arg(&file)
        .args(patch_params(&lab.fleet))
        .arg("--param")
        .arg(format!("state={}", state.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs = run_ids(&state);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let records = read_records(&state.join("runs").join(format!("{}.jsonl", runs[0]))).unwrap();
    (dir, runs[0].clone(), records)
}

fn deploy_records<'a>(records: &'a [Record], kind: &str, host: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| r.kind == kind && r.host.as_deref() == Some(host) && r.data["step"] == "deploy")
        .collect()
}

/// Completed installs of acme-agent `version` in a host's dpkg log.
fn installs(lab: &Lab, host: &str, version: &str) -> usize {
    let done = format!(" status installed acme-agent:all {version}");
    lab.dpkg_log(host)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&done))
        .count()
}

#[test]
fn the_patch_job_takes_twelve_turns_and_journals_each_intent_before_its_install() {
    let mut lab = Lab::start(2);
    lab.fleet.start_relays(Duration::from_millis(10)).unwrap();
    let (_dir, run_id, records) = run(&lab, JOB);
    // Key exchange and login 5 (libssh2's floor), the session shell with the facts
    // probe 2, then one each: installed, backup, deploy, verify, health.
    for (host, seen) in lab.traffic() {
        assert_eq!(seen.connections, 1, "{host}: {seen:?}");
        assert!(seen.turns <= 12, "{host}: {seen:?}");
    }
    for h in lab.hosts() {
        assert_eq!(
            lab.installed_version(&h.name, "acme-agent")
                .unwrap()
                .as_deref(),
            Some("1.0.1")
        );
        let intents = deploy_records(&records, "step.intent", &h.name);
        assert_eq!(intents.len(), 1, "{}: {intents:?}", h.name);
        let input = &intents[0].data["input"];
        assert_eq!(input["from"], "1.0.0", "{input}");
        assert_eq!(input["to"], "1.0.1", "{input}");
        assert!(
            input["undo"].to_string().contains("restore"),
            "the undo must restore this run's backup: {input}"
        );
        let outcomes = deploy_records(&records, "step.outcome", &h.name);
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        assert_eq!(outcomes[0].data["ok"], true, "{outcomes:?}");
        assert!(outcomes[0].seq > intents[0].seq);
        // The run's staging folder went with the install (the hosts share the
        // controller's /tmp: only this run's names count).
        let left = lab
            .exec_in(
                &h.name,
                &[
                    "sh",
                    "-c",
                    "ls -d /tmp/patchbook.\"$1\".* 2>/dev/null; true",
                    "sh",
                    &run_id,
                ],
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&left.stdout), "", "{}", h.name);
    }
}

#[test]
fn a_package_changed_since_the_run_read_it_is_deployed_on_a_fresh_intent_once() {
    let lab = Lab::start(1);
    let (_dir, _, records) = run(&lab, CHANGED);
    let host = lab.hosts()[0].name.clone();
    assert_eq!(
        lab.installed_version(&host, "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    assert_eq!(installs(&lab, &host, "1.0.1"), 1);
    let intents = deploy_records(&records, "step.intent", &host);
    let froms: Vec<_> = intents
        .iter()
        .map(|r| r.data["input"]["from"].clone())
        .collect();
    // The first intent carried what the run had read; the host refused to act on
    // it, and the deploy that happened was recorded with the real version before.
    assert_eq!(froms, ["1.0.0", "1.0.2"], "{intents:?}");
    let outcomes = deploy_records(&records, "step.outcome", &host);
    let oks: Vec<_> = outcomes.iter().map(|r| r.data["ok"].clone()).collect();
    assert_eq!(oks, [false, true], "{outcomes:?}");
    assert!(
        outcomes[0].data["output"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("changed on the host since this run read it")),
        "{outcomes:?}"
    );
}
