//! The rollout engine on a 30-host lab fleet, driven through `patchbook run` and
//! judged from the journal it leaves: the failure budget, a failing pilot,
//! dependency ordering, `max_unavailable`, the window cut-off, criticality order,
//! and `plan` changing nothing. Each test works on its own hosts of the shared fleet.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use patchbook::journal::{read_records, Record};
use patchbook::lab::Fleet;
use serde_json::Value;

const FLEET: usize = 30;

fn fleet() -> &'static Fleet {
    support::shared_fleet(FLEET)
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A playbook folder with its own state dir and a config using the repo's stdlib.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            dir: tempfile::Builder::new()
                .prefix("rollout-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lab's settings plus the repo's stdlib, and `inventory` (the lab's by default).
    fn config(&self, inventory: Option<&Path>) -> PathBuf {
        let f = fleet();
        let lab = std::fs::read_to_string(f.dir().join("patchbook.toml")).unwrap();
        let inv = inventory
            .map(Path::to_path_buf)
            .unwrap_or_else(|| f.dir().join("inventory.toml"));
        let lab = lab.replace(
            "inventory = [\"inventory.toml\"]",
            &format!("inventory = [\"{}\"]", inv.display()),
        );
        let text = format!("stdlib = \"{}/stdlib\"\n{lab}", env!("CARGO_MANIFEST_DIR"));
        let p = self.path("patchbook.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn playbook(&self, body: &str) -> PathBuf {
        let p = self.path("play.rhai");
        std::fs::write(&p, body).unwrap();
        p
    }

    fn run(&self, config: &Path, playbook: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
        let f = fleet();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"));
        cmd.arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("-q")
            .arg("run")
            .arg(playbook);
        cmd.args([
            "--param",
            &format!("mirror={}", f.dir().join("debs").display()),
        ]);
        for v in ["1.0.0", "1.0.1", "1.0.2"] {
            cmd.args([
                "--param",
                &format!("sha_{}={}", v.replace('.', "_"), sha(&f.deb(v))),
            ]);
        }
        cmd.args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("patchbook runs")
    }

    /// The records of the one run in this bench's state dir.
    fn records(&self) -> Vec<Record> {
        let runs = self.path("state").join("runs");
        let file = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .expect("a run file");
        let records = read_records(&file).unwrap();
        // Every record a real run writes, the script layer's included, is typed.
        for r in &records {
            match r.entry() {
                Ok(patchbook::journal::Entry::Unknown { kind, .. }) => {
                    panic!("record {} has a kind no Entry variant types: {kind}", r.seq)
                }
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        records
    }
}

fn events(records: &[Record]) -> Vec<(u64, Value)> {
    records
        .iter()
        .filter(|r| r.kind == "rollout.event")
        .map(|r| (r.seq, r.data.clone()))
        .collect()
}

fn kind_of(e: &Value) -> &str {
    e["kind"].as_str().unwrap_or_default()
}

/// Start and end (record seq) of each host's work.
fn spans(records: &[Record]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for (seq, e) in events(records) {
        let host = e["host"].as_str().unwrap_or_default().to_string();
        match kind_of(&e) {
            "host_started" => {
                out.insert(host, (seq, u64::MAX));
            }
            "host_done" | "host_failed" => {
                if let Some(s) = out.get_mut(&host) {
                    s.1 = seq;
                }
            }
            _ => {}
        }
    }
    out
}

fn run_done(records: &[Record]) -> Value {
    events(records)
        .into_iter()
        .map(|(_, e)| e)
        .find(|e| kind_of(e) == "run_done")
        .expect("run_done event")["summary"]
        .clone()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An inventory of some lab hosts with extra lines per host and extra groups.
fn inventory(
    bench: &Bench,
    hosts: &[&str],
    extra: &dyn Fn(&str) -> String,
    groups: &str,
) -> PathBuf {
    let f = fleet();
    let mut text = String::new();
    for name in hosts {
        let h = f.host(name).unwrap();
        text.push_str(&format!(
            "[hosts.{name}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"root\"\nidentity = \"{}\"\ncriticality = \"{}\"\n{}\n",
            h.port,
            f.identity().display(),
            h.criticality.as_str(),
            extra(name)
        ));
    }
    text.push_str(groups);
    let p = bench.path("inventory.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const PATCH_OR_BREAK: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_1_0_1") });
let bad = artifact(`${param("mirror")}/acme-agent_1.0.2_all.deb`, #{ sha256: param("sha_1_0_2") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_1_0_0") });
let breaking = param("bad").split(",");
rollout(hosts(param("targets")), #{ pilot: param("pilot", "0").parse_int(), waves: ["100%"], max_failed: param("max_failed").parse_int(), parallel: 1 }, |host| {
    let p = if breaking.contains(host.name) { bad } else { good };
    deploy(host, p, #{ rollback_to: previous });
    verify(host, "acme-agent", if breaking.contains(host.name) { "1.0.2" } else { "1.0.1" });
});
"#;

#[test]
fn failure_budget_stops_at_the_third_failure_and_rolls_the_failed_back() {
    let f = fleet();
    let b = Bench::new();
    let cfg = b.config(None);
    let pb = b.playbook(PATCH_OR_BREAK);
    let targets = "lab03:lab04:lab05:lab06:lab07:lab08:lab09:lab10:lab11:lab12";
    let out = b.run(
        &cfg,
        &pb,
        &[],
        &[
            "--param",
            &format!("targets={targets}"),
            "--param",
            "bad=lab05,lab07,lab09",
            "--param",
            "max_failed=2",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = b.records();
    let summary = run_done(&recs);
    assert_eq!(summary["stop"]["kind"], "budget_exhausted", "{summary}");
    assert_eq!(summary["totals"]["failed"], 3);
    assert_eq!(summary["totals"]["done"], 4);
    assert_eq!(summary["totals"]["pending"], 3);
    assert_eq!(summary["totals"]["rolled_back"], 3);
    // The budget of 2 is spent at the third failure: nothing starts after lab09.
    let started: Vec<String> = events(&recs)
        .into_iter()
        .filter(|(_, e)| kind_of(e) == "host_started")
        .map(|(_, e)| e["host"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        started,
        ["lab03", "lab04", "lab05", "lab06", "lab07", "lab08", "lab09"]
    );
    for h in ["lab05", "lab07", "lab09"] {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h} rolled back"
        );
    }
    for h in ["lab03", "lab04", "lab06", "lab08"] {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1"),
            "{h} patched"
        );
    }
    for h in ["lab10", "lab11", "lab12"] {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h} untouched"
        );
        assert!(
            !f.dpkg_log(h).unwrap().contains("1.0.1"),
            "{h} was never deployed to"
        );
    }
    // Each group's counts add up to its members among the targets.
    let groups = &summary["per_group"];
    let web = &groups["web"];
    let db = &groups["db"];
    let total = |g: &Value| g["targeted"].as_u64().unwrap();
    assert_eq!(total(web) + total(db), 10, "{groups}");
    assert_eq!(
        web["failed"].as_u64().unwrap() + db["failed"].as_u64().unwrap(),
        3
    );
    assert_eq!(
        web["pending"].as_u64().unwrap() + db["pending"].as_u64().unwrap(),
        3
    );
    for h in ["lab03", "lab04", "lab06", "lab08"] {
        f.reseed(h).unwrap();
    }
}

#[test]
fn a_failing_pilot_stops_the_run_before_wave_one() {
    let f = fleet();
    let b = Bench::new();
    let cfg = b.config(None);
    let pb = b.playbook(PATCH_OR_BREAK);
    let out = b.run(
        &cfg,
        &pb,
        &[],
        &[
            "--param",
            "targets=lab13:lab14:lab15:lab16",
            "--param",
            "bad=lab13",
            "--param",
            "max_failed=3",
            "--param",
            "pilot=1",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = b.records();
    let summary = run_done(&recs);
    assert_eq!(summary["stop"]["kind"], "pilot_failed", "{summary}");
    let started: Vec<Value> = events(&recs)
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| kind_of(e) == "host_started")
        .collect();
    assert_eq!(started.len(), 1, "only the pilot started: {started:?}");
    for h in ["lab13", "lab14", "lab15", "lab16"] {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h}"
        );
    }
}

const SLOW_TOUCH: &str = r#"
rollout(hosts("all"), #{ waves: ["100%"], parallel: 8, order: param("order", "inventory"), max_unavailable: #{ quad: 1 } }, |host| {
    exec(host, ["sleep", "0.3"]);
});
"#;

#[test]
fn a_host_never_runs_at_the_same_time_as_a_host_it_depends_on() {
    let b = Bench::new();
    let hosts = ["lab17", "lab18", "lab19", "lab20", "lab21", "lab22"];
    // lab17 -> lab18 -> db (lab21), lab19 -> lab20; lab22 free.
    let deps = |h: &str| match h {
        "lab17" => "depends_on = [\"lab18\"]".to_string(),
        "lab18" => "depends_on = [\"dbs\"]".to_string(),
        "lab19" => "depends_on = [\"lab20\"]".to_string(),
        _ => String::new(),
    };
    let inv = inventory(&b, &hosts, &deps, "[groups.dbs]\nhosts = [\"lab21\"]\n");
    let cfg = b.config(Some(&inv));
    let out = b.run(&cfg, &b.playbook(SLOW_TOUCH), &[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = spans(&b.records());
    assert_eq!(s.len(), 6);
    for (a, dep) in [("lab17", "lab18"), ("lab18", "lab21"), ("lab19", "lab20")] {
        let (x, y) = (s[a], s[dep]);
        assert!(x.1 < y.0 || y.1 < x.0, "{a} {x:?} overlapped {dep} {y:?}");
        // The documented default: dependencies go first.
        assert!(y.1 < x.0, "{dep} should finish before {a} starts");
    }
}

#[test]
fn max_unavailable_one_keeps_one_of_a_group_of_four_in_flight() {
    let b = Bench::new();
    let hosts = ["lab23", "lab24", "lab25", "lab26"];
    let inv = inventory(
        &b,
        &hosts,
        &|_| String::new(),
        "[groups.quad]\nhosts = [\"lab23\", \"lab24\", \"lab25\", \"lab26\"]\n",
    );
    let cfg = b.config(Some(&inv));
    let out = b.run(&cfg, &b.playbook(SLOW_TOUCH), &[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut in_flight = 0;
    let mut peak = 0;
    for (_, e) in events(&b.records()) {
        match kind_of(&e) {
            "host_started" => in_flight += 1,
            "host_done" | "host_failed" => in_flight -= 1,
            _ => {}
        }
        peak = peak.max(in_flight);
    }
    assert_eq!(peak, 1);
}

#[test]
fn every_low_host_finishes_before_any_critical_host_starts() {
    let b = Bench::new();
    let hosts = [
        "lab03", "lab04", "lab05", "lab06", "lab07", "lab08", "lab09", "lab10",
    ];
    let inv = inventory(&b, &hosts, &|_| String::new(), "");
    let cfg = b.config(Some(&inv));
    let out = b.run(
        &cfg,
        &b.playbook(SLOW_TOUCH),
        &[],
        &["--param", "order=criticality"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = spans(&b.records());
    let f = fleet();
    let of = |c: &str| -> Vec<(u64, u64)> {
        hosts
            .iter()
            .filter(|h| f.host(h).unwrap().criticality.as_str() == c)
            .map(|h| s[*h])
            .collect()
    };
    let (low, critical) = (of("low"), of("critical"));
    assert!(!low.is_empty() && !critical.is_empty());
    let last_low_end = low.iter().map(|x| x.1).max().unwrap();
    let first_critical_start = critical.iter().map(|x| x.0).min().unwrap();
    assert!(
        last_low_end < first_critical_start,
        "low {low:?} critical {critical:?}"
    );
}

#[test]
fn twenty_minutes_before_the_end_with_a_thirty_minute_buffer_starts_nothing() {
    let b = Bench::new();
    let cfg = b.config(None);
    let pb = b.playbook(
        r#"
window("Sat 02:00-06:00 Asia/Hong_Kong", #{ buffer: "30m" });
rollout(hosts("lab27:lab28:lab29"), #{ waves: ["100%"] }, |host| { exec(host, ["true"]); });
"#,
    );
    let out = b.run(
        &cfg,
        &pb,
        &[("PATCHBOOK_NOW", "2026-11-28T05:40:00+08:00")],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = b.records();
    assert!(
        events(&recs)
            .iter()
            .all(|(_, e)| kind_of(e) != "host_started"),
        "a host started"
    );
    let summary = run_done(&recs);
    assert_eq!(summary["stop"]["kind"], "window_closing", "{summary}");
    assert_eq!(summary["totals"]["pending"], 3);
}

#[test]
fn outside_the_window_the_run_is_refused_with_the_next_start() {
    let b = Bench::new();
    let cfg = b.config(None);
    let pb = b.playbook(
        r#"
window("Sat 02:00-06:00 Asia/Hong_Kong");
rollout(hosts("lab27"), #{ waves: ["100%"] }, |host| { exec(host, ["true"]); });
"#,
    );
    let out = b.run(
        &cfg,
        &pb,
        &[("PATCHBOOK_NOW", "2026-11-26T12:00:00+08:00")],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("outside the maintenance window") && err.contains("2026-11-28 02:00"),
        "{err}"
    );
}

#[test]
fn plan_leaves_the_fleet_unchanged_and_shows_unknowns() {
    let f = fleet();
    let b = Bench::new();
    let cfg = b.config(None);
    let hosts = ["lab27", "lab28", "lab29", "lab30"];
    let before: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(f, h))
        .collect();
    let playbook = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/patch-acme.rhai"),
    )
    .unwrap()
    .replace("hosts(\"all\")", "hosts(\"lab27:lab28:lab29:lab30\")")
    .replace("hosts(\"pilot\")", "1");
    let pb = b.playbook(&playbook);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(b.path("state"))
        .arg("plan")
        .arg(&pb);
    cmd.args([
        "--param",
        &format!("mirror={}", f.dir().join("debs").display()),
    ]);
    cmd.args(["--param", &format!("sha256={}", sha(&f.deb("1.0.1")))]);
    cmd.args([
        "--param",
        &format!("previous_sha256={}", sha(&f.deb("1.0.0"))),
    ]);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text, stderr(&out));
    assert!(text.contains("pilot") && text.contains("lab27"), "{text}");
    assert!(
        text.contains("deploy") && text.contains("unknown"),
        "{text}"
    );
    let after: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(f, h))
        .collect();
    assert_eq!(before, after, "plan changed a host");
    assert!(
        !b.path("state").join("runs").exists(),
        "plan wrote a journal"
    );
}

#[test]
fn staging_checks_recorded_with_test_reach_the_report() {
    let b = Bench::new();
    let cfg = b.config(None);
    let pb = b.playbook(
        r#"
let ok = test("agent answers on lab27", "functional", #{ patch_version: "1.0.1" }, || {
    let h = hosts("lab27")[0];
    health(h, ["/opt/acme/agent.sh", "--check"]);
});
let slow = test("check latency", "performance", #{ patch_version: "1.0.1" }, || {
    #{ before: 10.0, after: 12.0, threshold_pct: 10.0, unit: "ms" }
});
if !ok || slow { throw "the functional check should pass and the degraded one fail"; }
"#,
    );
    let out = b.run(&cfg, &pb, &[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .arg("--state-dir")
        .arg(b.path("state"))
        .args(["report", "last", "--format", "json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{}", v["problems"]);
    let tests = &v["tests"];
    assert_eq!(tests["total"], 2, "{tests}");
    assert_eq!(tests["passed"], 1);
    assert_eq!(tests["failed"], 1);
    let cases = tests["cases"].as_array().unwrap();
    let perf = cases.iter().find(|c| c["kind"] == "performance").unwrap();
    assert_eq!(perf["metrics"]["threshold_pct"], 10.0);
    assert!(perf["degradation_pct"].as_f64().unwrap() > 19.0, "{perf}");
    assert_eq!(perf["patch_version"], "1.0.1");
}
