//! One run per host, and nothing matched is an error, on real sshd lab hosts.
//!
//! Runs overlap for as long as a test wants: the deploy method waits after
//! `dpkg -i` while a hold file exists, so the first run holds its hosts until the
//! test removes the file. Each test works on hosts of its own in one shared fleet
//! and has its own state directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use patchbook::journal::entry::Entry;
use patchbook::journal::lock::HostClaims;
use patchbook::journal::{read_records, Record};
use patchbook::lab::Fleet;

const HOSTS: usize = 12;

const PLAYBOOK: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
let hold = param("hold");
let targets = hosts(param("targets"));
rollout(targets, #{}, |host| {
    deploy(host, good, #{
        rollback_to: previous,
        method: ["sh", "-c", "dpkg -i -- \"$1\" || exit; while [ -e \"$2\" ]; do sleep 0.05; done", "install", "{file}", hold],
    });
    verify(host, "acme-agent", "1.0.1");
});
"#;

fn fleet() -> &'static Fleet {
    support::shared_fleet(HOSTS)
}

/// A project of one test: its state dir, playbook and hold file.
struct Project {
    dir: tempfile::TempDir,
    params: Vec<String>,
}

impl Project {
    fn new(prefix: &str, hosts: &[&str]) -> Project {
        let lab = fleet();
        for h in hosts {
            lab.reseed(h).unwrap();
        }
        let dir = support::lab_project(lab, prefix, "");
        std::fs::write(dir.path().join("play.rhai"), PLAYBOOK).unwrap();
        Project {
            params: support::patch_params(lab),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn hold(&self) {
        std::fs::write(self.path("hold"), "").unwrap();
    }

    fn release(&self) {
        let _ = std::fs::remove_file(self.path("hold"));
    }

    fn cmd(&self) -> Command {
        support::patchbook_in(self.dir.path())
    }

    /// `patchbook [pre…] --operator OP run play.rhai` on `targets`, its installs
    /// held by the hold file.
    fn run(&self, operator: &str, targets: &str, pre: &[&str]) -> Command {
        self.run_held_by(operator, targets, pre, "hold")
    }

    /// [`Project::run`] with the hold file named `hold`.
    fn run_held_by(&self, operator: &str, targets: &str, pre: &[&str], hold: &str) -> Command {
        let mut c = self.cmd();
        c.args(pre)
            .args(["--operator", operator, "run"])
            .arg(self.path("play.rhai"))
            .args(&self.params)
            .args(["--param", &format!("targets={targets}")])
            .arg("--param")
            .arg(format!("hold={}", self.path(hold).display()));
        c
    }

    fn spawn(&self, operator: &str, targets: &str, pre: &[&str]) -> Child {
        self.run(operator, targets, pre)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Every run id in the state dir, sorted.
    fn runs(&self) -> Vec<String> {
        support::run_ids(&self.state())
    }

    fn records(&self, run: &str) -> Vec<Record> {
        read_records(&self.state().join("runs").join(format!("{run}.jsonl"))).unwrap()
    }

    /// The run holding `host`, waiting up to 60 s for one to take it.
    fn wait_held(&self, host: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(h) = HostClaims::holder_of(&self.state(), host).unwrap() {
                return h.run;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "nobody took {host}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // A host's install loop must never outlive its test.
        self.release();
    }
}

use support::text;

/// Completed installs of acme-agent 1.0.1 in a host's dpkg log.
fn installs(host: &str) -> usize {
    fleet()
        .dpkg_log(host)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" status installed acme-agent:all 1.0.1"))
        .count()
}

fn kinds(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.kind.clone()).collect()
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn two_overlapping_runs_started_together_one_proceeds_the_other_refuses_naming_it() {
    let p = Project::new("lock-race-", &["lab01", "lab02", "lab03"]);
    p.hold();
    let mut alice = p.spawn("alice", "lab01:lab02", &[]);
    let mut bob = p.spawn("bob", "lab02:lab03", &[]);
    // The loser ends on its own while the winner waits on the hold file.
    let started = Instant::now();
    let (loser, winner, loser_is_alice) = loop {
        if alice.try_wait().unwrap().is_some() {
            break (alice, bob, true);
        }
        if bob.try_wait().unwrap().is_some() {
            break (bob, alice, false);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "neither run ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let lost = loser.wait_with_output().unwrap();
    p.release();
    let won = winner.wait_with_output().unwrap();
    assert_eq!(won.status.code(), Some(0), "{}", text(&won));
    assert_eq!(lost.status.code(), Some(2), "{}", text(&lost));

    let runs = p.runs();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let refused: Vec<&String> = runs
        .iter()
        .filter(|r| kinds(&p.records(r)).iter().any(|k| k == "run.refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{runs:?}");
    let loser_run = refused[0];
    let winner_run = runs.iter().find(|r| *r != loser_run).unwrap();
    let (winner_op, loser_hosts, winner_hosts) = if loser_is_alice {
        ("bob", ["lab01"], ["lab03"])
    } else {
        ("alice", ["lab03"], ["lab01"])
    };
    let message = text(&lost);
    assert!(
        message.contains(&format!(
            "lab02 held by run {winner_run} (run by operator {winner_op}"
        )),
        "{message}"
    );
    // The refused run changed nothing and recorded why, naming the holder.
    let records = p.records(loser_run);
    assert!(
        !kinds(&records)
            .iter()
            .any(|k| k.starts_with("step.") || k.starts_with("host.")),
        "{:?}",
        kinds(&records)
    );
    let refusal = records
        .iter()
        .find_map(|r| match r.entry().unwrap() {
            Entry::RunRefused(x) => Some(x),
            _ => None,
        })
        .unwrap();
    assert_eq!(refusal.hosts, vec!["lab02".to_string()]);
    assert_eq!(&refusal.holders[0].run, winner_run);
    assert_eq!(refusal.holders[0].operator, winner_op);
    // No host was touched twice; the loser's own host was not touched at all.
    assert_eq!(installs("lab02"), 1);
    assert_eq!(installs(winner_hosts[0]), 1);
    assert_eq!(installs(loser_hosts[0]), 0);
    assert_eq!(
        fleet()
            .installed_version(loser_hosts[0], "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
}

#[test]
fn a_waiting_run_proceeds_once_the_holder_ends() {
    let p = Project::new("lock-wait-", &["lab04", "lab05"]);
    p.hold();
    let first = p.spawn("alice", "lab04", &[]);
    let holder = p.wait_held("lab04");
    // The second run's own hold file does not exist: it never waits on a host.
    let mut second = p
        .run_held_by("bob", "lab04:lab05", &["--wait=2m"], "no-hold")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second run did not wait"
    );
    // While it waits it changes nothing, not even on the host nobody holds.
    assert_eq!(installs("lab05"), 0);
    assert_eq!(
        HostClaims::holder_of(&p.state(), "lab05").unwrap(),
        None,
        "a waiting run holds part of its set"
    );
    p.release();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let status = wait_with_timeout(&mut second, Duration::from_secs(60)).expect("second run ends");
    let second = second.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(0), "{}", text(&second));
    assert!(
        text(&second).contains(&format!(
            "waiting (up to 2m) for lab04 held by run {holder} (run by operator alice"
        )),
        "{}",
        text(&second)
    );
    // The second run's first change came after the first run had closed.
    let first_close = p
        .records(&holder)
        .into_iter()
        .find(|r| r.kind == "run.close")
        .unwrap();
    let other = p.runs().into_iter().find(|r| *r != holder).unwrap();
    let first_intent = p
        .records(&other)
        .into_iter()
        .find(|r| r.kind == "step.intent")
        .unwrap();
    assert!(
        first_intent.ts >= first_close.ts,
        "{} before {}",
        first_intent.ts,
        first_close.ts
    );
    assert_eq!(installs("lab04"), 2);
    assert_eq!(installs("lab05"), 1);
}

#[test]
fn ctrl_c_ends_a_wait_with_nothing_changed() {
    let p = Project::new("lock-cancel-", &["lab12"]);
    p.hold();
    let first = p.spawn("alice", "lab12", &[]);
    let holder = p.wait_held("lab12");
    let mut second = p.spawn("bob", "lab12", &["--wait"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(second.try_wait().unwrap().is_none(), "it did not wait");
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(second.id().cast_signed(), libc::SIGINT);
    }
    let status = wait_with_timeout(&mut second, Duration::from_secs(10));
    let out = second.wait_with_output().unwrap();
    p.release();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "stopped while waiting for hosts: lab12 held by run {holder}"
        )),
        "{}",
        text(&out)
    );
    let waited = p.runs().into_iter().find(|r| *r != holder).unwrap();
    let kinds = kinds(&p.records(&waited));
    assert!(kinds.iter().any(|k| k == "run.refused"), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("step.")), "{kinds:?}");
    assert_eq!(installs("lab12"), 1);
}

#[test]
fn a_killed_holder_releases_its_hosts() {
    let p = Project::new("lock-kill-", &["lab06"]);
    p.hold();
    let mut first = p.spawn("alice", "lab06", &[]);
    let holder = p.wait_held("lab06");
    // Killed in the middle of its host's work: installed, waiting on the hold.
    support::wait_installed(fleet(), "lab06", "acme-agent", "1.0.1");
    first.kill().unwrap();
    first.wait().unwrap();
    // Its install loop on the host ends with the hold file.
    p.release();
    assert_eq!(HostClaims::holder_of(&p.state(), "lab06").unwrap(), None);
    let out = p.run("bob", "lab06", &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains(&holder), "{}", text(&out));
    assert_eq!(installs("lab06"), 2);
    // The killed run is never resumed, so its staging folder on the host (lab
    // hosts share the machine's /tmp) is this test's to remove.
    let leftovers: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("patchbook.{holder}."))
        })
        .collect();
    for e in leftovers {
        std::fs::remove_dir_all(e.path()).unwrap();
    }
}

#[test]
fn exec_refuses_hosts_a_run_holds() {
    let p = Project::new("lock-exec-", &["lab07", "lab08"]);
    let marker = fleet().host("lab08").unwrap().dir.join("opt/exec-marker");
    let _ = std::fs::remove_file(&marker);
    p.hold();
    let first = p.spawn("alice", "lab07", &[]);
    let holder = p.wait_held("lab07");
    let out = p
        .cmd()
        .args([
            "--operator",
            "bob",
            "exec",
            "lab07:lab08",
            r#"exec(host, ["touch", "/opt/exec-marker"])"#,
        ])
        .output()
        .unwrap();
    p.release();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "lab07 held by run {holder} (run by operator alice"
        )),
        "{}",
        text(&out)
    );
    // A refused exec leaves no journal and touched neither host.
    assert_eq!(p.runs(), vec![holder]);
    assert!(!marker.exists());
}

#[test]
fn rollback_refuses_hosts_another_run_holds() {
    let p = Project::new("lock-rollback-", &["lab09"]);
    let out = p.run("alice", "lab09", &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let patched = p.runs().pop().unwrap();
    p.hold();
    let second = p.spawn("bob", "lab09", &[]);
    let holder = p.wait_held("lab09");
    assert_ne!(holder, patched);
    let before = p.records(&patched).len();
    let out = p
        .cmd()
        .args(["--operator", "carol", "rollback", &patched])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("lab09 held by run {holder} (run by operator bob")),
        "{}",
        text(&out)
    );
    // Refused before the journal said a rollback began.
    assert_eq!(p.records(&patched).len(), before);
    p.release();
    let second = second.wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    let out = p.cmd().args(["rollback", &patched]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        fleet()
            .installed_version("lab09", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
}

#[test]
fn a_selector_or_limit_matching_no_host_is_an_error_unless_allowed() {
    let p = Project::new("nomatch-", &["lab10"]);
    let write = |name: &str, text: &str| -> PathBuf {
        let path = p.path(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |playbook: &Path, pre: &[&str]| -> Output {
        p.cmd()
            .args(pre)
            .arg("run")
            .arg(playbook)
            .args(&p.params)
            .output()
            .unwrap()
    };

    // A typo'd group in the playbook: exit 2, the selector and what was meant.
    let typo = write(
        "typo.rhai",
        "let t = hosts(\"wbe\");\nrollout(t, #{}, |h| {});\n",
    );
    let out = run(&typo, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    for want in [
        "selector `wbe` matched no host (no --limit in force)",
        "`wbe` is neither a host nor a group (did you mean `web`?)",
        "hosts(\"wbe\", #{ allow_empty: true })",
        "typo.rhai:1",
    ] {
        assert!(said.contains(want), "{want}: {said}");
    }

    // A real group narrowed by --limit to nothing names the --limit in force.
    let db = write(
        "db.rhai",
        "let t = hosts(\"db\");\nrollout(t, #{}, |h| {});\n",
    );
    let out = run(&db, &["--limit", "pilot"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("selector `db` matched no host (--limit `pilot` in force)"),
        "{}",
        text(&out)
    );

    // A --limit that matches nothing at all: exit 2 naming it, with a suggestion,
    // before any run is started.
    let runs = p.runs();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let out = run(&db, &["--limit", "lba10"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--limit `lba10` matched no host")
            && text(&out).contains("did you mean `lab10`?"),
        "{}",
        text(&out)
    );
    let out = p
        .cmd()
        .args(["--limit", "lba10", "exec", "all", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--limit `lba10`"), "{}", text(&out));
    assert_eq!(p.runs(), runs);

    // Opting in: an empty selection is an empty list, and the run goes on.
    let allowed = write(
        "allowed.rhai",
        &PLAYBOOK.replace(
            "let targets = hosts(param(\"targets\"));",
            "let none = hosts(\"canary\", #{ allow_empty: true });\n\
             if none.len() != 0 { throw \"expected no canary hosts\"; }\n\
             let targets = hosts(param(\"targets\")) + none;",
        ),
    );
    let out = p
        .cmd()
        .arg("run")
        .arg(&allowed)
        .args(&p.params)
        .args(["--param", "targets=lab10", "--param"])
        .arg(format!("hold={}", p.path("no-hold").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(installs("lab10"), 1);
    // `check` knows the option, and names a misspelt one.
    let out = p.cmd().arg("check").arg(&allowed).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let misspelt = write(
        "misspelt.rhai",
        "let t = hosts(\"web\", #{ alow_empty: true });\n",
    );
    let out = p.cmd().arg("check").arg(&misspelt).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("did you mean `allow_empty`?"),
        "{}",
        text(&out)
    );
}

#[test]
fn watch_started_runs_hold_their_hosts_and_are_refused_on_busy_ones() {
    let p = Project::new("lock-watch-", &["lab11"]);
    let lab = fleet();
    let sha = |v: &str| {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(lab.deb(v)).unwrap()))
    };
    // The service passes no --param: the playbook carries its values.
    let scripts = p.path("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let playbook = PLAYBOOK
        .replace(
            "param(\"mirror\")",
            &format!("{:?}", lab.dir().join("debs").display().to_string()),
        )
        .replace("param(\"sha_new\")", &format!("{:?}", sha("1.0.1")))
        .replace("param(\"sha_old\")", &format!("{:?}", sha("1.0.0")))
        .replace(
            "param(\"hold\")",
            &format!("{:?}", p.path("hold").display().to_string()),
        )
        .replace("param(\"targets\")", "\"lab11\"");
    std::fs::write(scripts.join("w.rhai"), playbook).unwrap();
    let mut service = p
        .cmd()
        .args(["--operator", "watcher", "watch"])
        .current_dir(p.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let trigger = || -> Output {
        let started = Instant::now();
        loop {
            let out = p.cmd().args(["trigger", "w"]).output().unwrap();
            if out.status.success() || started.elapsed() > Duration::from_secs(30) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A watch run holds its host: a command-line run is refused, naming it.
    p.hold();
    let out = trigger();
    assert!(out.status.success(), "{}", text(&out));
    let holder = p.wait_held("lab11");
    let out = p.run("alice", "lab11", &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "lab11 held by run {holder} (watch by operator watcher"
        )),
        "{}",
        text(&out)
    );
    p.release();
    let started = Instant::now();
    while HostClaims::holder_of(&p.state(), "lab11")
        .unwrap()
        .is_some()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "watch run never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A command-line run holds it: the watch run is refused and says so.
    p.hold();
    let cli = p.spawn("alice", "lab11", &[]);
    let cli_run = p.wait_held("lab11");
    let before = p.runs();
    let out = trigger();
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let refusal = loop {
        let found = p
            .runs()
            .into_iter()
            .filter(|r| !before.contains(r))
            .find_map(|r| {
                p.records(&r).into_iter().find_map(|rec| match rec.entry() {
                    Ok(Entry::RunRefused(x)) => Some(x),
                    _ => None,
                })
            });
        if let Some(f) = found {
            break f;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no refusal");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refusal.holders[0].run, cli_run);
    assert_eq!(refusal.holders[0].operator, "alice");
    p.release();
    let cli = cli.wait_with_output().unwrap();
    assert_eq!(cli.status.code(), Some(0), "{}", text(&cli));
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(service.id().cast_signed(), libc::SIGTERM);
    }
    let status = wait_with_timeout(&mut service, Duration::from_secs(30));
    if status.is_none() {
        let _ = service.kill();
        let _ = service.wait();
        panic!("watch did not stop on SIGTERM");
    }
    assert_eq!(installs("lab11"), 2);
}
