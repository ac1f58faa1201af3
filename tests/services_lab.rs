//! `service`, `reboot`, `needs_reboot` and `services_needing_restart` on real lab
//! hosts: the agent's daemon is a real process started by a SysV init script, and
//! a reboot really kills every process of a host and brings its sshd back with a
//! new boot id. Each test works on hosts of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use patchbook::lab::init::{AGENT_DAEMON, FAIL_NEXT_START};
use patchbook::lab::Fleet;

const HOSTS: usize = 12;

fn fleet() -> &'static Fleet {
    support::shared_fleet(HOSTS)
}

/// A folder with the lab's settings and its own state dir.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: support::lab_project(fleet(), "services-", ""),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn patchbook(&self, args: &[&str]) -> Output {
        support::patchbook_in(self.dir.path())
            .args(args)
            .output()
            .expect("patchbook runs")
    }

    fn playbook(&self, body: &str) -> String {
        let p = self.path("play.rhai");
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    }

    /// `exec HOST SNIPPET` as a journaled run: its value and its run id.
    fn exec(&self, host: &str, snippet: &str) -> (serde_json::Value, String) {
        let out = self.patchbook(&["--json", "exec", host, snippet]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{snippet}\n{stdout}\n{stderr}");
        let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap())
            .unwrap_or_else(|e| panic!("{e}: {stdout}"));
        let run = line["run"].as_str().unwrap_or_default().to_string();
        (line["value"].clone(), run)
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn agent_pids(host: &str) -> Vec<i32> {
    fleet().pids_of(host, AGENT_DAEMON).unwrap()
}

/// Starts the agent from inside the host, as its own init would.
fn start_agent(host: &str) -> i32 {
    let out = fleet()
        .exec_in_host(host, &["/etc/init.d/acme-agent", "start"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let [pid] = agent_pids(host)[..] {
            return pid;
        }
        assert!(Instant::now() < until, "the agent did not start on {host}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn service_really_starts_restarts_and_stops_the_agent_and_rollback_restores_each_state() {
    let p = Project::new();
    let h = "lab01";
    assert!(agent_pids(h).is_empty(), "a fresh host runs no agent");

    let (v, started_run) = p.exec(h, r#"service(host, "acme-agent", #{ state: "started" })"#);
    assert_eq!(v["changed"], true, "{v}");
    assert_eq!(v["active"], true, "{v}");
    let first = agent_pids(h);
    assert_eq!(first.len(), 1, "{first:?}");

    // Already active: nothing is done, and the run says so.
    let (v, _) = p.exec(h, r#"service(host, "acme-agent", #{ state: "started" })"#);
    assert_eq!(v["changed"], false, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("no change: acme-agent is already active"),
        "{v}"
    );
    assert_eq!(agent_pids(h), first, "a no-op touched the daemon");

    let (v, _) = p.exec(h, r#"service(host, "acme-agent", #{ state: "restarted" })"#);
    assert_eq!(v["changed"], true, "{v}");
    let second = agent_pids(h);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first, "a restart must replace the process");

    let (v, stopped_run) = p.exec(h, r#"service(host, "acme-agent", #{ state: "stopped" })"#);
    assert_eq!(v["active"], false, "{v}");
    assert!(agent_pids(h).is_empty());

    // Each run's rollback brings back the state that run found, from a fresh process.
    let out = p.patchbook(&["rollback", &stopped_run]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("lab01: rolled back"), "{stdout}");
    assert_eq!(agent_pids(h).len(), 1, "rollback of a stop starts it again");

    let out = p.patchbook(&["rollback", &started_run]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        agent_pids(h).is_empty(),
        "rollback of a start stops it again"
    );
}

#[test]
fn a_restart_whose_daemon_fails_to_start_fails_the_host_and_its_rollback_starts_it_again() {
    let f = fleet();
    let p = Project::new();
    let h = "lab02";
    let before = start_agent(h);
    std::fs::write(
        f.host(h)
            .unwrap()
            .dir
            .join("etc-acme")
            .join(FAIL_NEXT_START),
        "",
    )
    .unwrap();
    let pb = p.playbook(
        r#"rollout(hosts("lab02"), #{}, |host| {
    service(host, "acme-agent", #{ state: "restarted", timeout: "3s" });
});
"#,
    );
    let out = p.patchbook(&["run", &pb]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("1 failed, 0 unreachable, 1 rolled back"),
        "{stdout}\n{stderr}"
    );
    assert!(
        !f.host(h)
            .unwrap()
            .dir
            .join("etc-acme")
            .join(FAIL_NEXT_START)
            .exists(),
        "the failing start happened"
    );
    let now = agent_pids(h);
    assert_eq!(now.len(), 1, "the rollback made the agent active again");
    assert_ne!(
        now,
        vec![before],
        "the old daemon was stopped by the restart"
    );

    let report = p.patchbook(&["report", "last", "--format", "json"]);
    let r = String::from_utf8_lossy(&report.stdout);
    assert!(
        r.contains("acme-agent did not become active within 3s"),
        "{r}"
    );
    assert!(
        r.contains("make acme-agent active again (a restart or reload cannot be undone)"),
        "{r}"
    );
}

#[test]
fn plan_changes_no_service_and_reboots_nothing() {
    let f = fleet();
    let p = Project::new();
    let h = "lab03";
    let pid = start_agent(h);
    let fingerprint = support::host_fingerprint(f, h);
    let boot = f.boot_id(h).unwrap();
    let pb = p.playbook(
        r#"rollout(hosts("lab03"), #{}, |host| {
    service(host, "acme-agent", #{ state: "started" });
    service(host, "acme-agent", #{ state: "restarted" });
    service(host, "acme-agent", #{ state: "stopped" });
    if needs_reboot(host).needed { throw "lab03 needs no reboot"; }
    let stale = services_needing_restart(host);
    reboot(host, #{ timeout: "30s" });
});
"#,
    );
    let out = p.patchbook(&["plan", &pb]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("no change: acme-agent is already active"),
        "{stdout}"
    );
    assert!(stdout.contains("would restart acme-agent"), "{stdout}");
    assert!(stdout.contains("would stop acme-agent"), "{stdout}");
    assert!(
        stdout.contains("would reboot the host and wait up to 30s"),
        "{stdout}"
    );
    assert_eq!(agent_pids(h), vec![pid], "plan touched the daemon");
    assert_eq!(f.boot_id(h).unwrap(), boot, "plan rebooted the host");
    let after = support::host_fingerprint(f, h);
    let changed: Vec<_> = after
        .lines()
        .filter(|l| !fingerprint.lines().any(|b| b == *l))
        .collect();
    assert!(changed.is_empty(), "plan changed the host: {changed:?}");
    assert!(
        !p.path("state").join("runs").exists(),
        "plan wrote a journal"
    );
}

#[test]
fn needs_reboot_reads_the_hosts_own_flag_and_a_reboot_clears_it() {
    let f = fleet();
    let p = Project::new();
    let h = "lab04";
    assert!(
        !std::path::Path::new("/run/reboot-required").exists(),
        "this machine itself wants a reboot; the test would not show anything"
    );
    let (v, _) = p.exec(h, "needs_reboot(host)");
    assert_eq!(v["needed"], false, "{v}");
    assert_eq!(v["reasons"], serde_json::json!([]), "{v}");

    let run = f.host(h).unwrap().dir.join("run");
    std::fs::write(
        run.join("reboot-required"),
        "*** System restart required ***\n",
    )
    .unwrap();
    std::fs::write(run.join("reboot-required.pkgs"), "libc6\nlinux-base\n").unwrap();
    let (v, _) = p.exec(h, "needs_reboot(host)");
    assert_eq!(v["needed"], true, "{v}");
    assert_eq!(
        v["reasons"][0], "/var/run/reboot-required exists (packages: libc6, linux-base)",
        "{v}"
    );
    // Another host does not see it.
    let (v, _) = p.exec("lab05", "needs_reboot(host)");
    assert_eq!(v["needed"], false, "{v}");

    // The stdlib reboots only a host that asks for it, and the reboot empties /run.
    let boot = f.boot_id(h).unwrap();
    let reboot_if_needed =
        r#"import "patch/debian" as deb; deb::reboot_if_needed(host, #{ timeout: "30s" })"#;
    let (v, _) = p.exec(h, reboot_if_needed);
    assert_eq!(
        (&v["needed"], &v["rebooted"]),
        (&true.into(), &true.into()),
        "{v}"
    );
    assert_ne!(f.boot_id(h).unwrap(), boot, "a new boot");
    let (v, _) = p.exec(h, "needs_reboot(host)");
    assert_eq!(v["needed"], false, "a reboot empties /run: {v}");
    let boot = f.boot_id(h).unwrap();
    let (v, _) = p.exec(h, reboot_if_needed);
    assert_eq!(v["rebooted"], false, "{v}");
    assert_eq!(f.boot_id(h).unwrap(), boot, "no reboot when none is needed");
}

#[test]
fn services_needing_restart_lists_a_process_whose_binary_was_replaced() {
    let f = fleet();
    let p = Project::new();
    let h = "lab05";
    let stale = f.host(h).unwrap().dir.join("root/pbstale");
    std::fs::copy("/bin/sleep", &stale).unwrap();
    let out = f
        .exec_in_host(
            h,
            &["sh", "-c", "/root/pbstale 600 </dev/null >/dev/null 2>&1 &"],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let until = Instant::now() + Duration::from_secs(5);
    while f.pids_of(h, "pbstale").unwrap().is_empty() {
        assert!(Instant::now() < until, "pbstale did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (v, _) = p.exec(h, "services_needing_restart(host)");
    let names: Vec<String> = serde_json::from_value(v.clone()).unwrap();
    assert!(!names.contains(&"pbstale".to_string()), "{v}");

    // An upgrade replaces the file; the running process still maps the old one.
    std::fs::remove_file(&stale).unwrap();
    let (v, _) = p.exec(h, "services_needing_restart(host)");
    let names: Vec<String> = serde_json::from_value(v.clone()).unwrap();
    assert!(names.contains(&"pbstale".to_string()), "{v}");

    let out = f.exec_in_host(h, &["pkill", "-x", "pbstale"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let until = Instant::now() + Duration::from_secs(5);
    while !f.pids_of(h, "pbstale").unwrap().is_empty() {
        assert!(Instant::now() < until, "pbstale outlived the test");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rollout_reboots_five_hosts_and_fails_the_one_that_never_returns_within_budget() {
    let f = fleet();
    let p = Project::new();
    let back = ["lab06", "lab07", "lab08", "lab09", "lab10"];
    let lost = "lab11";
    let boots: Vec<String> = back.iter().map(|h| f.boot_id(h).unwrap()).collect();
    start_agent("lab06");
    f.never_return(lost).unwrap();
    let pb = p.playbook(
        r#"rollout(hosts("lab06:lab07:lab08:lab09:lab10:lab11"), #{ max_failed: 1 }, |host| {
    let r = reboot(host, #{ timeout: "10s", ready: ["/opt/acme/agent.sh", "--check"] });
    if r.boot_id_before == r.boot_id_after { throw "same boot id"; }
});
"#,
    );
    let started = Instant::now();
    let out = p.patchbook(&["run", &pb]);
    let took = started.elapsed();
    let (stdout, stderr) = text(&out);
    assert!(
        stderr.contains("lab11: FAILED: lab11: reboot: did not return within 10s"),
        "{stdout}\n{stderr}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("6 targeted, 5 done, 1 failed"),
        "{stdout}\n{stderr}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    let report = p.patchbook(&["report", "last", "--format", "json"]);
    let r: serde_json::Value = serde_json::from_slice(&report.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&report.stdout)));
    let text = r.to_string();
    assert!(text.contains("did not return within 10s"), "{text}");
    for (h, old) in back.iter().zip(&boots) {
        let new = f.boot_id(h).unwrap();
        assert_ne!(&new, old, "{h} kept its boot id");
        let (v, _) = p.exec(
            h,
            r#"probe(host, ["cat", "/proc/sys/kernel/random/boot_id"]).stdout"#,
        );
        assert_eq!(
            v.as_str().unwrap().trim(),
            new,
            "{h} answers with its new boot id"
        );
    }
    assert!(
        agent_pids("lab06").is_empty(),
        "a reboot ends every process of the host"
    );
    assert!(
        !f.host("lab06")
            .unwrap()
            .dir
            .join("run/acme-agent.pid")
            .exists(),
        "a reboot empties /run"
    );
    assert!(
        !support::alive(f.host(lost).unwrap().sshd_pid),
        "the lost host's init is gone, and every process with it"
    );
}

/// Every process in the PID namespace of `init` (seen from outside).
fn namespace_members(init: i32) -> Vec<i32> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == Some(ns.clone()))
        .collect()
}

#[test]
fn a_rebooted_lab_host_is_torn_down_without_a_process_left() {
    let lab = support::Lab::start(1);
    let h = "lab01";
    let init = lab.host(h).unwrap().sshd_pid;
    let boot = lab.boot_id(h).unwrap();
    let out = lab
        .exec_in_host(h, &["/etc/init.d/acme-agent", "start"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = lab.exec_in_host(h, &["/usr/local/sbin/reboot"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let up = std::net::TcpStream::connect(("127.0.0.1", lab.host(h).unwrap().port)).is_ok();
        if up && lab.boot_id(h).unwrap() != boot {
            break;
        }
        assert!(Instant::now() < until, "the host did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = lab
        .exec_in_host(h, &["/etc/init.d/acme-agent", "start"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let members = namespace_members(init);
    assert!(members.len() >= 3, "init, sshd and the agent: {members:?}");
    drop(lab);
    let until = Instant::now() + Duration::from_secs(5);
    while members.iter().any(|p| support::alive(*p)) {
        assert!(
            Instant::now() < until,
            "left behind: {:?}",
            members
                .iter()
                .filter(|p| support::alive(**p))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn restart_if_changed_restarts_only_after_a_change() {
    let p = Project::new();
    let h = "lab12";
    let first = start_agent(h);
    let (v, _) = p.exec(
        h,
        r#"import "services" as svc; svc::restart_if_changed(host, "acme-agent", #{ before: "1.0.1", after: "1.0.1", planned: false })"#,
    );
    assert_eq!(v["changed"], false, "{v}");
    assert_eq!(
        agent_pids(h),
        vec![first],
        "nothing changed, nothing restarted"
    );
    let (v, _) = p.exec(
        h,
        r#"import "services" as svc; svc::restart_if_changed(host, "acme-agent", true)"#,
    );
    assert_eq!(v["changed"], true, "{v}");
    let now = agent_pids(h);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, vec![first], "a change restarts the agent");
}
