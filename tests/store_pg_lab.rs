//! The PostgreSQL store on real hosts and a real private server: a run with
//! `--store postgres://…` patches lab hosts and writes no run file; `report`,
//! `audit verify`, `inventory list` and `rollback RUN` read the database as they
//! read run files; a record edited in the database fails `audit verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::process::Output;

use patchbook::journal::{state::RunState, Store};
use support::postgres::PgServer;
use support::{lab_project, patch_params, patchbook_in, shared_fleet, text};

const PATCH: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{ waves: ["50%", "100%"], parallel: 4 }, |host| {
    backup(host, ["/etc/acme"]);
    deploy(host, good, #{ rollback_to: previous });
    verify(host, "acme-agent", "1.0.1");
});
"#;

#[test]
fn a_run_on_the_postgres_store_is_reported_verified_and_rolled_back_from_it() {
    support::require_lab();
    let fleet = shared_fleet(4);
    let pg = PgServer::start();
    let dir = lab_project(fleet, "store-pg-", "");
    std::fs::write(dir.path().join("play.rhai"), PATCH).unwrap();
    let cmd = |args: &[&str]| -> Output {
        patchbook_in(dir.path())
            .args(["--store", &pg.url])
            .args(args)
            .output()
            .unwrap()
    };

    let mut run = patchbook_in(dir.path());
    run.env("PATCHBOOK_STORE", &pg.url)
        .args(["-q", "run"])
        .arg(dir.path().join("play.rhai"))
        .args(patch_params(fleet));
    let out = run.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    support::assert_every_host_at(fleet, "1.0.1");

    // The records are in the database, not in the state directory.
    let runs = pg.psql("SELECT run FROM runs");
    let run_id = runs.trim().to_string();
    assert!(!run_id.is_empty() && !run_id.contains('\n'), "{runs}");
    assert!(
        support::run_ids(&dir.path().join("state")).is_empty(),
        "a run file was written beside the database"
    );
    let rows: usize = pg
        .psql(&format!(
            "SELECT count(*) FROM records WHERE run = '{run_id}'"
        ))
        .trim()
        .parse()
        .unwrap();
    assert!(rows > 4 * 6, "{rows} records");
    assert_eq!(
        pg.psql("SELECT max(version) FROM schema_version").trim(),
        patchbook::journal::pg::schema_version().to_string()
    );
    let store = Store::from_url(&dir.path().join("state"), Some(&pg.url)).unwrap();
    let st = RunState::load_in(&store, &run_id).unwrap();
    assert!(st.closed);
    assert_eq!(st.deploy_order.len(), 4);

    // report, audit verify and inventory list read the store.
    let out = cmd(&["report", "last", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["run"]["id"], run_id.as_str(), "{report}");
    let out = cmd(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&run_id));
    let out = cmd(&["inventory", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1.0.1"),
        "patch levels from the store: {}",
        text(&out)
    );
    // Without the store, the state directory knows no such run.
    let out = patchbook_in(dir.path())
        .args(["report", &run_id])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));

    // rollback RUN, from the database alone.
    let out = cmd(&["-q", "rollback", &run_id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    support::assert_every_host_at(fleet, "1.0.0");
    let st = RunState::load_in(&store, &run_id).unwrap();
    assert!(st.hosts.values().all(|h| h.rolled_back), "{st:?}");
    let out = cmd(&["audit", "verify", &run_id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // An edit in the database is an edit of the record: audit verify fails.
    pg.psql(&format!(
        "UPDATE records SET line = replace(line, '1.0.1', '1.0.2') \
         WHERE run = '{run_id}' AND kind = 'verify'"
    ));
    let out = cmd(&["audit", "verify", &run_id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TAMPERED"),
        "{}",
        text(&out)
    );
}
