//! `patchbook watch` on the PostgreSQL store, on real lab hosts and a real private
//! server: the same triggered run (a rollout with a soak after it) once on run
//! files and once with `--store postgres://…`. The status page (`/status.json`,
//! `/console.json`) shows the same run, outcome, console and soak rows from both;
//! with the database no run file is written, and the run and its soak journal are
//! in the database, where `report` and `audit verify` read them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::postgres::PgServer;
use support::watch::WatchProcess as Watch;
use support::{lab_project, patchbook_in, run_ids, shared_fleet, text};

/// Both lab hosts patched, then soaked for a minute of the test clock (3 s real).
const PLAYBOOK: &str = r#"
let fresh = artifact(MIRROR + "/acme-agent_1.0.1_all.deb", #{ sha256: SHA_NEW });
let old = artifact(MIRROR + "/acme-agent_1.0.0_all.deb", #{ sha256: SHA_OLD });
rollout(hosts("all"), #{
    parallel: 2,
    soak: #{
        period: "1m", every: "15s", baseline: 1,
        logs: ["/opt/acme-agent.log"],
        thresholds: #{ error_rate: "2x" },
    },
}, |host| {
    deploy(host, fresh, #{ rollback_to: old });
    verify(host, "acme-agent", "1.0.1");
});
"#;

/// What one watch run left: its status, its console and the project.
struct Seen {
    run: String,
    status: Value,
    console: Value,
    dir: tempfile::TempDir,
}

/// Starts `patchbook watch` (with `--store URL` when given), triggers the
/// playbook, waits for the run to end and its soak to be over, and stops it.
fn watch_one_run(store: Option<&str>) -> Seen {
    let fleet = shared_fleet(2);
    let dir = lab_project(fleet, "watch-store-", "");
    let sha = |v: &str| {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(fleet.deb(v)).unwrap()))
    };
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    std::fs::write(
        dir.path().join("scripts/patch.rhai"),
        PLAYBOOK
            .replace(
                "MIRROR",
                &format!("{:?}", fleet.dir().join("debs").display().to_string()),
            )
            .replace("SHA_NEW", &format!("{:?}", sha("1.0.1")))
            .replace("SHA_OLD", &format!("{:?}", sha("1.0.0"))),
    )
    .unwrap();

    let mut cmd = patchbook_in(dir.path());
    if let Some(url) = store {
        cmd.args(["--store", url]);
    }
    cmd.args(["watch", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("PATCHBOOK_LOG", "info")
        .env("PATCHBOOK_NOW", "2026-12-05T02:00:00Z")
        .env("PATCHBOOK_CLOCK_SPEED", "20");
    let mut watch = Watch::start(cmd);
    let t0 = Instant::now();
    let run = loop {
        let out = patchbook_in(dir.path())
            .args(["trigger", "patch"])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "trigger: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = watch.wait_status(Duration::from_secs(90), "the run and its soak end", |s| {
        s["runs"]["in_flight"].as_array().is_some_and(Vec::is_empty)
            && s["runs"]["recent"].as_array().is_some_and(|r| r.len() == 1)
            && s["soak"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|r| r["verdict"] != "soaking"))
    });
    let console: Value = serde_json::from_str(&watch.get("/console.json")).unwrap();
    watch.stop();
    let run_id = status["runs"]["recent"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(run.contains(&run_id), "trigger said {run}");
    assert!(
        !watch.output().contains("no soak"),
        "the soak could not read the run: {}",
        watch.output()
    );
    Seen {
        run: run_id,
        status,
        console,
        dir,
    }
}

/// The parts of a status that do not depend on when or where the run happened.
fn shown(seen: &Seen) -> Value {
    let s = &seen.status;
    let recent = &s["runs"]["recent"][0];
    let mut soak: Vec<Value> = s["soak"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::json!({
                "host": r["host"],
                "run": r["run"].as_str().unwrap().replace(&seen.run, "RUN"),
                "journal": r["journal"].as_str().unwrap().replace(&seen.run, "RUN"),
                "verdict": r["verdict"],
                "sampled": r["samples"].as_u64().unwrap() > 0,
            })
        })
        .collect();
    soak.sort_by_key(|r| r["host"].as_str().unwrap().to_string());
    let console = &seen.console[0];
    assert_eq!(console["run_id"], seen.run.as_str(), "{console:#}");
    serde_json::json!({
        "recent": {
            "playbook": recent["playbook"],
            "ok": recent["ok"],
            "summary": recent["summary"],
            "progress": recent["progress"],
        },
        "console": {
            "tally": console["tally"],
            "finished": console["finished"],
            "hosts": console["hosts"].as_array().unwrap().iter()
                .map(|h| (h["name"].clone(), h["state"].clone())).collect::<Vec<_>>(),
        },
        "soak": soak,
    })
}

#[test]
fn a_watch_run_on_the_postgres_store_shows_on_the_status_page_as_on_run_files() {
    support::require_lab();
    let files = watch_one_run(None);
    let files_state = files.dir.path().join("state");
    assert_eq!(
        run_ids(&files_state),
        [files.run.clone(), format!("{}-soak", files.run)],
        "the run and its soak journal as run files"
    );

    let pg = PgServer::start();
    let db = watch_one_run(Some(&pg.url));
    let expected = shown(&files);
    assert_eq!(expected["recent"]["ok"], true, "{:#}", files.status);
    assert_eq!(expected["console"]["tally"]["patched"], 2, "{expected:#}");
    assert!(
        expected["soak"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["verdict"] == "passed" && r["sampled"] == true),
        "{expected:#}"
    );
    assert_eq!(shown(&db), expected, "{:#}", db.status);

    // Nothing in the state directory; the run and its soak are in the database.
    let state = db.dir.path().join("state");
    assert!(
        run_ids(&state).is_empty(),
        "run files beside the database: {:?}",
        run_ids(&state)
    );
    let runs = pg.psql("SELECT run FROM runs ORDER BY run");
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        [db.run.clone(), format!("{}-soak", db.run)],
        "{runs}"
    );
    let samples: usize = pg
        .psql(&format!(
            "SELECT count(*) FROM records WHERE run = '{}-soak' AND kind = 'monitor.sample'",
            db.run
        ))
        .trim()
        .parse()
        .unwrap();
    assert!(samples >= 2, "{samples} soak samples in the database");

    // report and audit verify read both from the database.
    let with_store = |args: &[&str]| {
        patchbook_in(db.dir.path())
            .args(["--store", &pg.url])
            .args(args)
            .output()
            .unwrap()
    };
    let out = with_store(&["report", &db.run, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["run"]["id"], db.run.as_str(), "{report}");
    let out = with_store(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let verified = String::from_utf8_lossy(&out.stdout);
    assert!(
        verified.contains(&db.run) && verified.contains(&format!("{}-soak", db.run)),
        "{verified}"
    );
    support::assert_every_host_at(shared_fleet(2), "1.0.1");
}
