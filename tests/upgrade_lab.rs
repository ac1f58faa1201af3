//! Repository upgrades on a 10-host lab fleet, each host with its own apt state and
//! a local apt repository (`file://`, built with dpkg-scanpackages) that offers
//! acme-agent 1.0.0 and 1.0.1 from a `bookworm-security` suite labelled
//! `Debian-Security`. Every test checks that this machine's own apt state is
//! untouched.
//!
//! The rollout test needs all ten hosts, so the tests take turns (one lock) and
//! each starts by putting its hosts back to their start state.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;

use patchbook::lab::apt::{build_repo, AptRepo};
use patchbook::lab::Fleet;
use serde_json::Value;

const N: usize = 10;

static TURN: Mutex<()> = Mutex::new(());

fn fleet() -> &'static Fleet {
    support::shared_fleet(N)
}

fn all_hosts() -> Vec<String> {
    (1..=N).map(|i| format!("lab{i:02}")).collect()
}

/// A repository in the fleet's folder offering `versions` of acme-agent.
fn repo(name: &str, versions: &[&str], suite: &str, label: &str) -> AptRepo {
    let f = fleet();
    let debs: Vec<PathBuf> = versions.iter().map(|v| f.deb(v)).collect();
    build_repo(&f.dir().join("repos").join(name), &debs, suite, label)
        .unwrap_or_else(|e| panic!("repository {name}: {e}"))
}

fn security_repo(name: &str, versions: &[&str]) -> AptRepo {
    repo(name, versions, "bookworm-security", "Debian-Security")
}

/// Host back to acme-agent 1.0.0 with empty apt state, then `repo` as its source.
fn prepare(host: &str, repo: &AptRepo) {
    let f = fleet();
    f.reseed(host).unwrap();
    f.use_apt_repo(host, repo).unwrap();
    assert_eq!(
        f.installed_version(host, "acme-agent").unwrap().as_deref(),
        Some("1.0.0")
    );
}

/// Name, size and modification time of every file under the machine's own apt
/// folders: a test that changed them would show here.
fn machine_apt_state() -> String {
    fn walk(p: &Path, out: &mut Vec<String>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        out.push(format!("{} {} {mtime}", p.display(), meta.len()));
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        }
    }
    let mut out = Vec::new();
    for p in ["/etc/apt", "/var/lib/apt", "/var/cache/apt", "/var/log/apt"] {
        walk(Path::new(p), &mut out);
    }
    out.join("\n")
}

/// Holds the turn and checks on drop (also after a failure) that the machine's apt
/// state is what it was.
struct Turn {
    _guard: std::sync::MutexGuard<'static, ()>,
    machine_apt: String,
}

fn take_turn() -> Turn {
    let guard = TURN.lock().unwrap_or_else(|p| p.into_inner());
    fleet();
    Turn {
        _guard: guard,
        machine_apt: machine_apt_state(),
    }
}

impl Turn {
    fn machine_untouched(&self) {
        assert_eq!(
            machine_apt_state(),
            self.machine_apt,
            "a lab host changed this machine's own apt state"
        );
    }
}

/// A folder with the lab's settings and its own state dir.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: support::lab_project(fleet(), "upgrade-", ""),
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

    fn playbook(&self, name: &str, body: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    }

    /// Ids of the runs in the state dir.
    fn runs(&self) -> Vec<String> {
        support::run_ids(&self.path("state"))
    }

    fn records(&self, run: &str) -> Vec<Value> {
        std::fs::read_to_string(self.path("state/runs").join(format!("{run}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The run the command just made (the one not in `before`).
    fn new_run(&self, before: &[String]) -> String {
        let now = self.runs();
        let fresh: Vec<&String> = now.iter().filter(|r| !before.contains(r)).collect();
        assert_eq!(fresh.len(), 1, "expected one new run, have {now:?}");
        fresh[0].clone()
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `upgrade` intents of a run, by host.
fn upgrade_intents(records: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in records {
        if r["kind"] == "step.intent" && r["data"]["step"] == "upgrade" {
            out.entry(r["host"].as_str().unwrap().to_string())
                .or_default()
                .push(r["data"]["input"].clone());
        }
    }
    out
}

/// The value `patchbook --json exec HOST SNIPPET` printed for each host.
fn exec_values(p: &Project, selector: &str, snippet: &str) -> BTreeMap<String, Value> {
    let out = p.patchbook(&["--json", "exec", selector, snippet]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            assert_eq!(v["ok"], true, "{v}");
            (v["host"].as_str().unwrap().to_string(), v["value"].clone())
        })
        .collect()
}

#[test]
fn pending_updates_lists_the_fix_as_a_security_update_and_needing_candidate_finds_it() {
    let turn = take_turn();
    prepare("lab01", &security_repo("security", &["1.0.0", "1.0.1"]));
    prepare(
        "lab02",
        &repo("updates", &["1.0.0", "1.0.1"], "bookworm-updates", "Debian"),
    );
    prepare("lab03", &security_repo("base-only", &["1.0.0"]));
    let p = Project::new();

    let all = exec_values(&p, "lab01:lab02:lab03", "pending_updates(host)");
    let lab01 = all["lab01"].as_array().unwrap();
    assert_eq!(lab01.len(), 1, "{lab01:?}");
    assert_eq!(lab01[0]["package"], "acme-agent");
    assert_eq!(lab01[0]["installed"], "1.0.0");
    assert_eq!(lab01[0]["candidate"], "1.0.1");
    assert_eq!(lab01[0]["security"], true);
    assert!(
        lab01[0]["origin"]
            .as_str()
            .unwrap()
            .contains("bookworm-security"),
        "{lab01:?}"
    );
    let lab02 = all["lab02"].as_array().unwrap();
    assert_eq!(lab02.len(), 1, "{lab02:?}");
    assert_eq!(lab02[0]["candidate"], "1.0.1");
    assert_eq!(lab02[0]["security"], false, "{lab02:?}");
    assert_eq!(all["lab03"], serde_json::json!([]));

    let security = exec_values(
        &p,
        "lab01:lab02",
        "pending_updates(host, #{ security_only: true }).map(|u| u[\"package\"])",
    );
    assert_eq!(security["lab01"], serde_json::json!(["acme-agent"]));
    assert_eq!(security["lab02"], serde_json::json!([]));

    let needing = exec_values(
        &p,
        "lab01",
        "hosts(\"lab01:lab02:lab03\").needing(\"acme-agent\", \"candidate\").map(|h| h.name)",
    );
    assert_eq!(needing["lab01"], serde_json::json!(["lab01", "lab02"]));

    // security_only leaves a fix that no security release offers.
    let skipped = exec_values(
        &p,
        "lab02",
        "let u = upgrade(host, [\"acme-agent\"], #{ security_only: true }); #{ changed: u.changed.len(), why: u.skipped[0].reason }",
    );
    assert_eq!(skipped["lab02"]["changed"], 0);
    let why = skipped["lab02"]["why"].as_str().unwrap();
    assert!(why.contains("not a security origin"), "{why}");

    // Nothing on any host changed, nothing was journaled as a step.
    for h in ["lab01", "lab02", "lab03"] {
        assert_eq!(fleet().dpkg_log(h).unwrap(), "", "{h}");
    }
    for run in p.runs() {
        assert!(upgrade_intents(&p.records(&run)).is_empty());
    }
    turn.machine_untouched();
}

const ROLLOUT: &str = r#"
rollout(hosts("all"), #{ waves: ["20%", "100%"] }, |h| {
    upgrade(h, ["acme-agent"], #{ to: "candidate" });
    verify(h, "acme-agent", "1.0.1");
});
"#;

#[test]
fn a_rollout_upgrades_all_hosts_in_waves_a_second_run_changes_nothing_and_rollback_restores_1_0_0()
{
    let turn = take_turn();
    let f = fleet();
    let r = security_repo("fleet", &["1.0.0", "1.0.1"]);
    let hosts = all_hosts();
    for h in &hosts {
        prepare(h, &r);
    }
    let p = Project::new();
    let pb = p.playbook("rollout.rhai", ROLLOUT);
    let out = p.patchbook(&["run", &pb]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run1 = p.new_run(&[]);
    for h in &hosts {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1"),
            "{h}"
        );
        assert!(f
            .dpkg_log(h)
            .unwrap()
            .contains("upgrade acme-agent:all 1.0.0 1.0.1"));
    }

    // The waves, from the journal: 2 hosts, then the other 8, the first wave done
    // before the second started.
    let records = p.records(&run1);
    let events: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "rollout.event")
        .collect();
    let waves: Vec<(u64, Vec<String>)> = events
        .iter()
        .filter(|e| e["data"]["kind"] == "wave_started")
        .map(|e| {
            let hosts = e["data"]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_string())
                .collect();
            (e["seq"].as_u64().unwrap(), hosts)
        })
        .collect();
    assert_eq!(waves.len(), 2, "{events:#?}");
    assert_eq!(waves[0].1.len(), 2, "{waves:?}");
    assert_eq!(waves[1].1.len(), 8, "{waves:?}");
    for h in &waves[0].1 {
        let done = events
            .iter()
            .find(|e| e["data"]["kind"] == "host_done" && e["data"]["host"] == h.as_str())
            .unwrap_or_else(|| panic!("{h} has no host_done"));
        assert!(done["seq"].as_u64().unwrap() < waves[1].0, "{h}");
    }

    // Every host's intent holds the version before and the undo, before acting.
    let intents = upgrade_intents(&records);
    assert_eq!(intents.len(), N);
    for (h, list) in &intents {
        assert_eq!(list.len(), 1, "{h}");
        let i = &list[0];
        assert_eq!(i["packages"][0]["package"], "acme-agent", "{h}");
        assert_eq!(i["packages"][0]["before"], "1.0.0", "{h}");
        assert_eq!(i["packages"][0]["after"], "1.0.1", "{h}");
        assert_eq!(i["undo"]["kind"], "packages", "{h}");
        assert_eq!(
            i["undo"]["versions"],
            serde_json::json!([{ "package": "acme-agent", "version": "1.0.0" }])
        );
        let argv: Vec<&str> = i["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert!(argv.contains(&"acme-agent=1.0.1"), "{argv:?}");
        assert!(!argv.contains(&"upgrade"), "{argv:?}");
    }

    // A second run: nothing installed, nothing intended, and each host says so.
    let logs: Vec<String> = hosts.iter().map(|h| f.dpkg_log(h).unwrap()).collect();
    let before = p.runs();
    let out = p.patchbook(&["run", &pb]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run2 = p.new_run(&before);
    for (h, log) in hosts.iter().zip(&logs) {
        assert_eq!(
            &f.dpkg_log(h).unwrap(),
            log,
            "{h} changed on the second run"
        );
    }
    let records2 = p.records(&run2);
    assert!(upgrade_intents(&records2).is_empty());
    let no_change: Vec<&Value> = records2
        .iter()
        .filter(|r| r["kind"] == "upgrade.no_change")
        .collect();
    assert_eq!(no_change.len(), N);
    assert!(no_change[0]["data"]["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("no change: acme-agent is at 1.0.1"));

    // A fresh process rolls the first run back from its journal alone.
    let out = p.patchbook(&["rollback", &run1]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for h in &hosts {
        assert!(said.contains(&format!("{h}: rolled back")), "{said}");
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h}"
        );
        let status = f
            .exec_in(
                h,
                &[
                    "dpkg-query",
                    "-W",
                    "-f=${db:Status-Abbrev}\t${Version}",
                    "acme-agent",
                ],
            )
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&status.stdout).trim(),
            "ii \t1.0.0",
            "{h}"
        );
        // dpkg logs any replacement, a downgrade too, as "upgrade OLD NEW".
        let log = f.dpkg_log(h).unwrap();
        assert!(
            log.contains("upgrade acme-agent:all 1.0.1 1.0.0"),
            "{h}: {log}"
        );
    }
    turn.machine_untouched();
}

const SINGLE: &str = r#"
rollout(hosts(param("host")), #{}, |h| {
    upgrade(h, ["acme-agent"], #{ to: "candidate", irreversible: param("irreversible", "no") == "yes" });
});
"#;

#[test]
fn an_upgrade_whose_previous_version_is_gone_is_refused_before_acting_unless_irreversible() {
    let turn = take_turn();
    let f = fleet();
    // 1.0.0 is in neither the repository nor the host's package cache.
    prepare("lab04", &security_repo("fix-only", &["1.0.1"]));
    assert_eq!(
        std::fs::read_dir(f.apt_cache_dir("lab04").unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "deb"))
            .count(),
        0
    );
    let p = Project::new();
    let pb = p.playbook("single.rhai", SINGLE);
    let before_fp = support::host_fingerprint(f, "lab04");
    let out = p.patchbook(&["run", &pb, "--param", "host=lab04"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("refused before changing anything"), "{said}");
    assert!(
        said.contains("acme-agent 1.0.0 cannot be reinstalled"),
        "{said}"
    );
    assert!(said.contains("irreversible: true"), "{said}");
    assert_eq!(support::host_fingerprint(f, "lab04"), before_fp);
    let run = p.new_run(&[]);
    assert!(upgrade_intents(&p.records(&run)).is_empty());

    // Declared irreversible: it upgrades, and the undo says a person must act.
    let before = p.runs();
    let out = p.patchbook(&[
        "run",
        &pb,
        "--param",
        "host=lab04",
        "--param",
        "irreversible=yes",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run = p.new_run(&before);
    assert_eq!(
        f.installed_version("lab04", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    let intents = upgrade_intents(&p.records(&run));
    assert_eq!(intents["lab04"][0]["undo"]["kind"], "manual");
    let out = p.patchbook(&["rollback", &run]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("lab04: NOT FULLY REVERTED"),
        "{}",
        text(&out)
    );
    assert_eq!(
        f.installed_version("lab04", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    turn.machine_untouched();
}

#[test]
fn the_hosts_package_cache_makes_an_upgrade_reversible_when_the_repository_dropped_the_old_version()
{
    let turn = take_turn();
    let f = fleet();
    prepare("lab05", &security_repo("fix-only-cached", &["1.0.1"]));
    let cached = f
        .apt_cache_dir("lab05")
        .unwrap()
        .join("acme-agent_1.0.0_all.deb");
    std::fs::copy(f.deb("1.0.0"), &cached).unwrap();
    let p = Project::new();
    let pb = p.playbook("single.rhai", SINGLE);
    let out = p.patchbook(&["run", &pb, "--param", "host=lab05"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run = p.new_run(&[]);
    assert_eq!(
        f.installed_version("lab05", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    let intents = upgrade_intents(&p.records(&run));
    let undo = &intents["lab05"][0]["undo"];
    assert_eq!(undo["kind"], "packages");
    assert_eq!(
        undo["versions"][0]["cached"]["path"],
        "/var/cache/apt/archives/acme-agent_1.0.0_all.deb"
    );
    let out = p.patchbook(&["rollback", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        f.installed_version("lab05", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    turn.machine_untouched();
}

/// Every file of the host's apt trees, as `path size sha256` lines.
fn apt_fingerprint(host: &str) -> String {
    use sha2::{Digest, Sha256};
    fn walk(p: &Path, out: &mut Vec<String>) {
        let meta = std::fs::symlink_metadata(p).unwrap();
        if meta.is_dir() {
            out.push(format!("{} dir", p.display()));
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else {
            let bytes = std::fs::read(p).unwrap_or_default();
            out.push(format!(
                "{} {} {}",
                p.display(),
                meta.len(),
                hex::encode(Sha256::digest(bytes))
            ));
        }
    }
    let dir = &fleet().host(host).unwrap().dir;
    let mut out = Vec::new();
    for (tree, _) in patchbook::lab::apt::TREES {
        walk(&dir.join(tree), &mut out);
    }
    out.join("\n")
}

#[test]
fn plan_shows_before_and_after_and_changes_nothing() {
    let turn = take_turn();
    let f = fleet();
    prepare("lab06", &security_repo("plan", &["1.0.0", "1.0.1"]));
    let p = Project::new();
    let pb = p.playbook("single.rhai", SINGLE);
    let host_fp = support::host_fingerprint(f, "lab06");
    let apt_fp = apt_fingerprint("lab06");
    let out = p.patchbook(&["plan", &pb, "--param", "host=lab06"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("lab06: would change"), "{said}");
    assert!(
        said.contains("acme-agent 1.0.0 → 1.0.1 (Debian-Security:bookworm-security)"),
        "{said}"
    );
    assert!(said.contains("undo: reinstall acme-agent 1.0.0"), "{said}");
    assert_eq!(support::host_fingerprint(f, "lab06"), host_fp);
    assert_eq!(apt_fingerprint("lab06"), apt_fp);
    assert!(p.runs().is_empty(), "plan wrote a journal");

    // Once upgraded, plan says there is nothing to do.
    let out = p.patchbook(&["run", &pb, "--param", "host=lab06"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = p.patchbook(&["plan", &pb, "--param", "host=lab06"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("lab06: would not change"), "{said}");
    assert!(said.contains("no change: acme-agent is at 1.0.1"), "{said}");
    turn.machine_untouched();
}

#[test]
fn hostile_package_names_and_versions_are_refused_before_any_command() {
    let turn = take_turn();
    let f = fleet();
    prepare("lab07", &security_repo("hostile", &["1.0.0", "1.0.1"]));
    let p = Project::new();
    for (pkgs, opts, expect) in [
        (r#"["--reinstall"]"#, "#{}", "refused package name"),
        (r#"["acme-agent; rm -rf /"]"#, "#{}", "refused package name"),
        (
            r#"["acme-agent"]"#,
            r#"#{ to: "1.0.1 -o APT::X=1" }"#,
            "refused version",
        ),
        (
            r#"["acme-agent"]"#,
            r#"#{ too: "candidate" }"#,
            "unknown option `too`",
        ),
    ] {
        let out = p.patchbook(&["exec", "lab07", &format!("upgrade(host, {pkgs}, {opts})")]);
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(text(&out).contains(expect), "{expect}: {}", text(&out));
    }
    assert_eq!(f.dpkg_log("lab07").unwrap(), "");
    turn.machine_untouched();
}

#[test]
fn stdlib_security_upgrade_installs_only_what_a_security_release_offers() {
    let turn = take_turn();
    prepare(
        "lab04",
        &security_repo("stdlib-security", &["1.0.0", "1.0.1"]),
    );
    prepare(
        "lab05",
        &repo(
            "stdlib-updates",
            &["1.0.0", "1.0.1"],
            "bookworm-updates",
            "Debian",
        ),
    );
    let p = Project::new();
    let snippet = r#"import "patch/debian" as deb; deb::security_upgrade(host).changed.len()"#;
    let changed = exec_values(&p, "lab04:lab05", snippet);
    assert_eq!(changed["lab04"], 1, "{changed:?}");
    assert_eq!(changed["lab05"], 0, "{changed:?}");
    let f = fleet();
    assert_eq!(
        f.installed_version("lab04", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    assert_eq!(
        f.installed_version("lab05", "acme-agent")
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    // Run again: nothing left to do.
    let again = exec_values(&p, "lab04", snippet);
    assert_eq!(again["lab04"], 0);
    turn.machine_untouched();
}
