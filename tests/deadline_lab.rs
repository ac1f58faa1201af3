//! Deadlines interrupt on real hosts: a rollout's per-host `timeout` ends the SSH
//! command at the deadline and kills what it started on the host, a host whose
//! shell hangs after login fails at the deadline, and a script busy after its
//! last command is ended by the same timeout. Real sshd on loopback, strict
//! known_hosts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::Lab;

/// Processes on this machine (every lab host's PID namespace included) whose
/// command line is exactly `cmdline`.
fn processes(cmdline: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        if words.join(" ") == cmdline {
            found.push(pid);
        }
    }
    found
}

fn run(dir: &Path, playbook: &str) -> (std::process::Output, Duration) {
    let pb = dir.join("play.rhai");
    std::fs::write(&pb, playbook).unwrap();
    let t0 = Instant::now();
    let out = support::patchbook_in(dir)
        .args(["run", pb.to_str().unwrap()])
        .output()
        .unwrap();
    (out, t0.elapsed())
}

#[test]
fn a_hosts_timeout_ends_the_command_and_kills_it_on_the_host() {
    let lab = Lab::start(1);
    let project = support::lab_project(&lab, "deadline-", "");
    // A duration no other test uses, to find the process by.
    let (out, took) = run(
        project.path(),
        r#"rollout(hosts("lab01"), #{ timeout: "3s" }, |host| {
    exec(host, ["sleep", "47.25"], #{ undo: ["true"] });
});
"#,
    );
    let text = support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        took < Duration::from_secs(10),
        "a 3s timeout let the command run {took:?}: {text}"
    );
    assert!(text.contains("deadline"), "{text}");
    // Gone on the host, not left running until it ends by itself.
    let t0 = Instant::now();
    while !processes("sleep 47.25").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the host still runs the command the timeout ended: {:?}\n{text}",
            processes("sleep 47.25")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The host is reachable again for the next run.
    let (out, _) = run(
        project.path(),
        "rollout(hosts(\"lab01\"), #{}, |host| { probe(host, [\"true\"]); });\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", support::text(&out));
}

#[test]
fn a_host_whose_shell_hangs_after_login_fails_at_its_timeout() {
    let mut lab = Lab::start(2);
    // lab02 logs in, then its session never runs a shell.
    let config = lab.host("lab02").unwrap().dir.join("sshd_config");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("ForceCommand /bin/sleep 300.5\n");
    std::fs::write(&config, text).unwrap();
    lab.fleet.kill_host("lab02").unwrap();
    lab.fleet.revive_host("lab02").unwrap();
    let project = support::lab_project(&lab, "deadline-", "");
    let (out, took) = run(
        project.path(),
        r#"rollout(hosts("all"), #{ timeout: "3s", max_failed: 1, max_unreachable: 1 }, |host| {
    exec(host, ["true"], #{ undo: ["true"] });
});
"#,
    );
    let text = support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        took < Duration::from_secs(15),
        "a host with a hung shell held the run {took:?}: {text}"
    );
    // Only the hung host failed.
    let state = project.path().join("state");
    let runs = support::run_ids(&state);
    let journal = std::fs::read_to_string(state.join(format!("runs/{}.jsonl", runs[0]))).unwrap();
    let finished: Vec<serde_json::Value> = journal
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "host.finish")
        .collect();
    let ok = |h: &str| {
        finished
            .iter()
            .find(|r| r["host"] == h)
            .map(|r| r["data"]["ok"].clone())
    };
    assert_eq!(
        ok("lab01"),
        Some(serde_json::Value::Bool(true)),
        "{journal}"
    );
    assert_ne!(
        ok("lab02"),
        Some(serde_json::Value::Bool(true)),
        "{journal}"
    );
    lab.fleet.kill_host("lab02").unwrap();
}

#[test]
fn a_hosts_timeout_ends_a_script_busy_after_its_last_command() {
    let lab = Lab::start(1);
    let project = support::lab_project(
        &lab,
        "deadline-",
        "limits.max_operations = 0\nlimits.deadline_secs = 120\n",
    );
    let (out, took) = run(
        project.path(),
        r#"rollout(hosts("lab01"), #{ timeout: "2s" }, |host| {
    probe(host, ["true"]);
    let i = 0;
    loop { i += 1; }
});
"#,
    );
    let text = support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        took < Duration::from_secs(10),
        "the host's 2s timeout let its script run {took:?}: {text}"
    );
    assert!(text.contains("deadline"), "{text}");
}
