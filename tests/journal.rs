//! The journal: tamper detection (library and `patchbook audit verify`), the run lock
//! across threads and processes, torn tails, and state derived for resume and rollback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbook::journal::audit::{self, Problem, Verdict};
use patchbook::journal::index::{self, IndexEvent};
use patchbook::journal::lock::{self, RunLock};
use patchbook::journal::state::{list_runs_in, RunState};
use patchbook::journal::{
    kind, read_records, BackupRef, Journal, JournalError, Record, RunHeader, StepId, Store,
    UndoStep, GENESIS,
};
use serde_json::json;

#[path = "support/store.rs"]
#[macro_use]
mod store;
use store::TestStore;

impl TestStore {
    fn state(&self) -> &Path {
        self.dir.path()
    }

    fn url(&self) -> Option<&str> {
        match &self.store {
            Store::Postgres { url, .. } => Some(url),
            Store::File { .. } => None,
        }
    }

    fn client(&self) -> ::postgres::Client {
        ::postgres::Client::connect(self.url().unwrap(), ::postgres::NoTls).unwrap()
    }

    /// A run's records as stored: the file's lines, or the rows' lines by seq.
    fn lines(&self, run: &str) -> Vec<String> {
        if self.url().is_none() {
            return lines(&run_file(self.state(), run));
        }
        self.client()
            .query(
                "SELECT line FROM records WHERE run = $1 ORDER BY seq",
                &[&run],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Replaces a run's records as someone with write access to the store would:
    /// the file's lines, or the rows (row N holds line N).
    fn write_lines(&self, run: &str, new: &[String]) {
        if self.url().is_none() {
            return write_lines(&run_file(self.state(), run), new);
        }
        let mut c = self.client();
        c.execute("DELETE FROM records WHERE run = $1", &[&run])
            .unwrap();
        for (i, line) in new.iter().enumerate() {
            let seq = i64::try_from(i).unwrap() + 1;
            c.execute(
                "INSERT INTO records (run, seq, ts, host, kind, prev, hash, line) \
                 VALUES ($1, $2, '', NULL, '', '', '', $3)",
                &[&run, &seq, line],
            )
            .unwrap();
        }
    }

    fn write_rechained(&self, run: &str, mut records: Vec<Record>) {
        let mut prev = GENESIS.to_string();
        for (i, r) in records.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
            r.prev = prev.clone();
            r.hash = r.compute_hash();
            prev = r.hash.clone();
        }
        let lines: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        self.write_lines(run, &lines);
    }

    fn tampered(&self, run: &str) -> (Problem, u64) {
        let report = audit::verify_in(&self.store, Some(run), &Default::default()).unwrap();
        assert!(!report.intact(), "tampering not detected: {report:?}");
        match &report.run(run).unwrap().verdict {
            Verdict::Tampered {
                problem,
                last_good_seq,
            } => (problem.clone(), *last_good_seq),
            other => panic!("expected a tampered verdict, got {other:?}"),
        }
    }

    /// `patchbook --state-dir STATE [--store URL] [--json] audit verify [RUN]`.
    fn cli_verify(&self, run: Option<&str>, json: bool) -> (i32, String, String) {
        let cwd = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbook"));
        cmd.current_dir(cwd.path())
            .env_remove("PATCHBOOK_STORE")
            .arg("--state-dir")
            .arg(self.state());
        if let Some(url) = self.url() {
            cmd.args(["--store", url]);
        }
        if json {
            cmd.arg("--json");
        }
        cmd.args(["audit", "verify"]);
        if let Some(r) = run {
            cmd.arg(r);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn assert_cli_tampered(&self, run: &str, needle: &str) {
        let (code, out, err) = self.cli_verify(None, false);
        assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{run}  ")))
            .unwrap_or_else(|| panic!("no line for {run} in:\n{out}"));
        assert!(line.contains("TAMPERED"), "{line}");
        assert!(line.contains(needle), "expected `{needle}` in: {line}");
    }

    /// [`closed_run`] in this store.
    fn closed_run(&self, run: &str) -> Vec<Record> {
        let j = Journal::begin_in(&self.store, run, "alice", &header(), None).unwrap();
        fill_closed_run(j);
        self.store.read_records(run).unwrap()
    }
}

fn header() -> RunHeader {
    RunHeader::new(
        PathBuf::from("scripts/patch.rhai"),
        "a".repeat(64),
        BTreeMap::from([("patch/debian".to_string(), "b".repeat(64))]),
        "c".repeat(64),
        json!({"waves": ["10%", "100%"], "max_failed": "5%"}),
    )
}

fn reinstall(version: &str) -> UndoStep {
    UndoStep::Reinstall {
        package: "acme-agent".into(),
        artifact_sha256: "d".repeat(64),
        artifact_path: PathBuf::from(format!("cache/artifacts/acme-agent_{version}")),
        version: version.into(),
    }
}

/// A closed run: header, two hosts with a backup and a deploy each, close.
fn closed_run(state: &Path, run: &str) -> Vec<Record> {
    fill_closed_run(Journal::begin(state, run, "alice", &header()).unwrap());
    read_records(&Journal::run_path(state, run)).unwrap()
}

fn fill_closed_run(j: Journal) {
    for host in ["web1", "web2"] {
        let b = j
            .intent(host, "backup", json!({"paths": ["/etc/acme"]}))
            .unwrap();
        j.outcome(host, b, true, json!({"archive": "x.tar"}), None)
            .unwrap();
        let d = j
            .intent(host, "deploy", json!({"version": "1.0.1"}))
            .unwrap();
        j.outcome(host, d, true, json!({}), Some(reinstall("1.0.0")))
            .unwrap();
        j.host_finished(host, true, Default::default()).unwrap();
    }
    j.close().unwrap();
}

fn run_file(state: &Path, run: &str) -> PathBuf {
    Journal::run_path(state, run)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// Rewrites records as a careful forger would: every hash recomputed, chain intact.
fn write_rechained(path: &Path, mut records: Vec<Record>) {
    let mut prev = GENESIS.to_string();
    for (i, r) in records.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
        r.prev = prev.clone();
        r.hash = r.compute_hash();
        prev = r.hash.clone();
    }
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    write_lines(path, &lines);
}

fn tampered(state: &Path, run: &str) -> (Problem, u64) {
    let report = audit::verify(state, Some(run)).unwrap();
    assert!(!report.intact(), "tampering not detected: {report:?}");
    match &report.run(run).unwrap().verdict {
        Verdict::Tampered {
            problem,
            last_good_seq,
        } => (problem.clone(), *last_good_seq),
        other => panic!("expected a tampered verdict, got {other:?}"),
    }
}

/// `patchbook --state-dir STATE audit verify [RUN]`, run in an empty folder so no
/// config or inventory is found: (exit code, stdout, stderr).
fn cli_verify(state: &Path, run: Option<&str>) -> (i32, String, String) {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbook"));
    cmd.current_dir(cwd.path())
        .arg("--state-dir")
        .arg(state)
        .args(["audit", "verify"]);
    if let Some(r) = run {
        cmd.arg(r);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_cli_tampered(state: &Path, run: &str, needle: &str) {
    let (code, out, err) = cli_verify(state, None);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{run}  ")))
        .unwrap_or_else(|| panic!("no line for {run} in:\n{out}"));
    assert!(line.contains("TAMPERED"), "{line}");
    assert!(line.contains(needle), "expected `{needle}` in: {line}");
}

fn intact_runs_pass_with_exit_zero(s: &TestStore) {
    let recs = s.closed_run("r1");
    s.closed_run("r2");
    assert_eq!(recs.len(), 12);
    assert_eq!(recs[0].kind, kind::RUN_START);
    assert_eq!(recs[0].data["patchbook_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(recs[0].data["modules"]["patch/debian"], "b".repeat(64));
    assert_eq!(recs.last().unwrap().kind, kind::RUN_CLOSE);
    assert!(recs.iter().all(|r| r.operator == "alice"));
    assert!(chrono::DateTime::parse_from_rfc3339(&recs[3].ts).is_ok());

    let report = audit::verify_in(&s.store, None, &Default::default()).unwrap();
    assert!(report.intact());
    assert_eq!(
        report.run("r1").unwrap().verdict,
        Verdict::Intact {
            records: 12,
            final_hash: recs[11].hash.clone()
        }
    );
    let (code, out, err) = s.cli_verify(None, false);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("r1  OK  12 records, closed"), "{out}");
    assert!(out.contains("r2  OK  12 records, closed"), "{out}");
    assert!(out.contains("audit-index.jsonl  OK  4 entries"), "{out}");
    let (code, out, _) = s.cli_verify(Some("r2"), false);
    assert_eq!(code, 0);
    assert!(out.contains("r2  OK") && !out.contains("r1"), "{out}");
}

fn deleted_record_is_detected(s: &TestStore) {
    s.closed_run("r1");
    let mut l = s.lines("r1");
    l.remove(4); // seq 5
    s.write_lines("r1", &l);
    assert_eq!(s.tampered("r1"), (Problem::Deleted { seq: 5 }, 4));
    s.assert_cli_tampered("r1", "record seq 5 deleted; last good seq 4");

    let (code, stdout, _) = s.cli_verify(Some("r1"), true);
    assert_eq!(code, 1);
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        first,
        json!({"run": "r1", "status": "tampered", "problem": "deleted", "seq": 5, "last_good_seq": 4})
    );
}

fn edited_record_is_detected(s: &TestStore) {
    s.closed_run("r1");
    let l = s.lines("r1");
    let mut edited = l.clone();
    edited[2] = l[2].replace("\"ok\":true", "\"ok\":false");
    assert_ne!(edited[2], l[2]);
    s.write_lines("r1", &edited);
    assert_eq!(s.tampered("r1"), (Problem::Edited { seq: 3 }, 2));
    s.assert_cli_tampered("r1", "record seq 3 edited");

    // The same edit with that record's hash recomputed breaks the next link.
    let mut recs: Vec<Record> = l.iter().map(|x| serde_json::from_str(x).unwrap()).collect();
    recs[2].data["ok"] = json!(false);
    recs[2].hash = recs[2].compute_hash();
    let rehashed: Vec<String> = recs
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    s.write_lines("r1", &rehashed);
    assert_eq!(s.tampered("r1"), (Problem::Unlinked { seq: 4 }, 3));

    // Resume and rollback refuse to extend a broken chain.
    match Journal::open_in(&s.store, "r1", "bob", None) {
        Err(e @ JournalError::Tampered { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("record seq 4 does not link to the chain")
                    && msg.contains("last good seq 3"),
                "{msg}"
            );
        }
        Err(other) => panic!("expected Tampered, got {other}"),
        Ok(_) => panic!("a tampered run was opened for appending"),
    }
}

fn reordered_records_are_detected(s: &TestStore) {
    s.closed_run("r1");
    let mut l = s.lines("r1");
    l.swap(5, 6); // seq 6 and 7
    s.write_lines("r1", &l);
    assert_eq!(
        s.tampered("r1"),
        (
            Problem::Reordered {
                seq: 7,
                expected: 6
            },
            5
        )
    );
    s.assert_cli_tampered(
        "r1",
        "records reordered: seq 7 appears where seq 6 belongs; last good seq 5",
    );
}

#[test]
fn torn_tail_is_tolerated_by_readers_reported_by_audit_and_repaired_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::begin(dir.path(), "r1", "alice", &header()).unwrap();
    let id = j.intent("web1", "deploy", json!({"v": "1.0.1"})).unwrap();
    drop(j); // the controller dies here ...
    let path = run_file(dir.path(), "r1");
    // ... in the middle of writing its next record.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"seq":3,"ts":"2026-01-01T00:00:00Z","run":"r1","ope"#);
    std::fs::write(&path, &bytes).unwrap();

    let recs = read_records(&path).unwrap();
    assert_eq!(recs.len(), 2, "readers skip the torn line");
    let st = RunState::load(dir.path(), "r1").unwrap();
    assert_eq!(st.open_intents().len(), 1);

    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::TornTail { line: 3 }, 2)
    );
    assert_cli_tampered(
        dir.path(),
        "r1",
        "truncated tail: line 3 is torn (a crash mid-write, or a cut); last good seq 2",
    );

    // Resume: the torn bytes are cut, the cut is recorded, the intent can be closed.
    let j = Journal::open(dir.path(), "r1", "bob").unwrap();
    let recs = j.records().unwrap();
    assert_eq!(recs[2].kind, kind::JOURNAL_REPAIR);
    assert_eq!(recs[2].data["torn_after_seq"], 2);
    j.outcome("web1", id, true, json!({"verified": true}), None)
        .unwrap();
    j.close().unwrap();
    let report = audit::verify(dir.path(), Some("r1")).unwrap();
    assert!(report.intact(), "{report:?}");
    assert!(matches!(
        report.run("r1").unwrap().verdict,
        Verdict::Intact { records: 5, .. }
    ));
}

#[test]
fn forged_record_appended_without_the_chain_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let recs = closed_run(dir.path(), "r1");
    let path = run_file(dir.path(), "r1");
    let mut forged = recs[10].clone();
    forged.seq = 13;
    forged.kind = "host.finish".into();
    forged.host = Some("db1".into());
    forged.prev = "f".repeat(64);
    forged.hash = forged.compute_hash();
    let mut l = lines(&path);
    l.push(serde_json::to_string(&forged).unwrap());
    write_lines(&path, &l);
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Unlinked { seq: 13 }, 12)
    );
    assert_cli_tampered(
        dir.path(),
        "r1",
        "record seq 13 does not link to the chain (forged or inserted); last good seq 12",
    );
}

fn forged_record_with_a_valid_chain_after_close_is_caught_by_the_index(s: &TestStore) {
    let mut recs = s.closed_run("r1");
    let mut forged = recs[10].clone();
    forged.host = Some("db1".into());
    recs.push(forged);
    s.write_rechained("r1", recs);
    assert_eq!(
        s.tampered("r1"),
        (
            Problem::AfterClose {
                seq: 13,
                closed_at: 12
            },
            12
        )
    );
    s.assert_cli_tampered("r1", "appended after the run was closed at seq 12");
}

#[test]
fn truncation_and_rewrites_with_recomputed_hashes_are_caught_by_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let recs = closed_run(dir.path(), "r1");
    let path = run_file(dir.path(), "r1");

    // Whole lines cut from the end: the chain that is left is valid.
    let l = lines(&path);
    write_lines(&path, &l[..9]);
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Truncated { index_seq: 12 }, 9)
    );
    assert_cli_tampered(
        dir.path(),
        "r1",
        "truncated: the audit index holds seq 12, the file ends before it; last good seq 9",
    );

    // An edited deploy outcome with every hash after it recomputed.
    let mut edited = recs.clone();
    edited[4].data["ok"] = json!(false);
    write_rechained(&path, edited);
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Rewritten { seq: 12 }, 0)
    );

    // A record dropped and the rest re-chained and re-numbered.
    let mut dropped = recs;
    dropped.remove(4);
    write_rechained(&path, dropped);
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Truncated { index_seq: 12 }, 11)
    );
}

#[test]
fn deleted_run_file_and_unindexed_run_file_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    closed_run(dir.path(), "r1");
    let recs = closed_run(dir.path(), "r2");
    std::fs::remove_file(run_file(dir.path(), "r1")).unwrap();
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Missing { indexed_seq: 12 }, 0)
    );
    assert_cli_tampered(
        dir.path(),
        "r1",
        "run file deleted: the audit index knows it up to seq 12",
    );

    // A whole run fabricated by hand, chain and all.
    let fake: Vec<Record> = recs
        .into_iter()
        .map(|mut r| {
            r.run = "r3".into();
            r
        })
        .collect();
    write_rechained(&run_file(dir.path(), "r3"), fake);
    assert_eq!(tampered(dir.path(), "r3"), (Problem::NotIndexed, 12));
    assert_cli_tampered(dir.path(), "r3", "not in the audit index");
    assert!(matches!(
        audit::verify(dir.path(), Some("r2"))
            .unwrap()
            .run("r2")
            .unwrap()
            .verdict,
        Verdict::Intact { .. }
    ));
}

#[test]
fn tampered_audit_index_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    closed_run(dir.path(), "r1");
    closed_run(dir.path(), "r2");
    let path = index::index_path(dir.path());
    let mut l = lines(&path);
    // Drop the close of r2 (the last entry): r2 then reads as merely open, but
    // deleting a middle entry breaks the index chain.
    l.remove(1);
    write_lines(&path, &l);
    let report = audit::verify(dir.path(), None).unwrap();
    assert!(!report.intact());
    let problem = report.index.problem.clone().unwrap();
    assert!(
        problem.contains("entry 3 (line 2) where entry 2 belongs"),
        "{problem}"
    );
    let (code, out, _) = cli_verify(dir.path(), None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit-index.jsonl  TAMPERED"), "{out}");
}

#[test]
fn open_runs_are_reported_open_not_tampered() {
    let dir = tempfile::tempdir().unwrap();
    // Stopped or crashed: never closed, lock released.
    let j = Journal::begin(dir.path(), "stopped", "alice", &header()).unwrap();
    j.intent("web1", "deploy", json!({})).unwrap();
    drop(j);
    // In progress: this process holds the lock.
    let live = Journal::begin(dir.path(), "live", "alice", &header()).unwrap();

    // Another test of this binary that starts a process at that moment holds a
    // copy of every descriptor, the dropped lock's too, until its child execs;
    // on a loaded machine that lasts long enough to be seen. Look again then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let report = loop {
        let report = audit::verify(dir.path(), None).unwrap();
        let released = matches!(
            report.run("stopped").map(|r| &r.verdict),
            Some(Verdict::Open { holder: None, .. })
        );
        if released || std::time::Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(report.intact(), "{report:?}");
    assert_eq!(
        report.run("stopped").unwrap().verdict,
        Verdict::Open {
            records: 2,
            holder: None
        }
    );
    match &report.run("live").unwrap().verdict {
        Verdict::Open {
            records: 1,
            holder: Some(h),
        } => {
            assert_eq!(h.pid, std::process::id());
            assert_eq!(h.host, lock::hostname());
        }
        other => panic!("{other:?}"),
    }
    let (code, out, err) = cli_verify(dir.path(), None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "live  OPEN  1 records, in progress: pid {} on",
            std::process::id()
        )),
        "{out}"
    );
    assert!(out.contains("stopped  OPEN  2 records, chain intact, not closed"));
    drop(live);
}

/// A controller killed between creating a run's journal and writing its header
/// leaves a run that touched nothing: resuming it is refused with that said, and
/// the journal still verifies.
#[test]
fn a_run_killed_before_its_header_is_refused_on_resume_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    drop(Journal::create(&state, "r-headless", "alice").unwrap());
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(cwd.path())
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "--resume", "r-headless"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("run r-headless never began") && err.contains("no host was touched"),
        "{err}"
    );
    let (code, out, err) = cli_verify(&state, None);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("r-headless  OPEN  0 records, never began"),
        "{out}"
    );
}

#[test]
fn reopened_closed_run_keeps_its_old_checkpoint_checked() {
    let dir = tempfile::tempdir().unwrap();
    let recs = closed_run(dir.path(), "r1");
    // Rollback after a restart: the closed run is reopened and appended to.
    let j = Journal::open(dir.path(), "r1", "bob").unwrap();
    let st = j.state().unwrap();
    let (of, undo) = st.host("web2").unwrap().undo_steps()[0];
    let u = j.undo_intent("web2", of, undo).unwrap();
    j.outcome("web2", u, true, json!({}), None).unwrap();
    j.host_rolled_back("web2", true, Default::default())
        .unwrap();
    drop(j);
    let idx = index::read(dir.path()).unwrap();
    assert_eq!(idx.entries.last().unwrap().event, IndexEvent::Reopen);
    assert!(matches!(
        audit::verify(dir.path(), Some("r1")).unwrap().runs[0].verdict,
        Verdict::Open { records: 15, .. }
    ));
    // Rewriting the part before the reopen is still caught.
    let mut all = read_records(&run_file(dir.path(), "r1")).unwrap();
    all[1].data["input"]["paths"] = json!(["/etc/other"]);
    write_rechained(&run_file(dir.path(), "r1"), all);
    assert_eq!(
        tampered(dir.path(), "r1"),
        (Problem::Rewritten { seq: 12 }, 0)
    );
    assert_eq!(recs.len(), 12);
}

#[test]
fn second_opener_in_another_thread_fails_at_once_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::begin(dir.path(), "r1", "alice", &header()).unwrap();
    let state = dir.path().to_path_buf();
    let (elapsed, err) = std::thread::spawn(move || {
        let t = Instant::now();
        let err = Journal::open(&state, "r1", "bob").err();
        (t.elapsed(), err)
    })
    .join()
    .unwrap();
    assert!(elapsed < Duration::from_secs(1), "waited {elapsed:?}");
    match err {
        Some(JournalError::Locked {
            run,
            pid,
            host,
            since,
        }) => {
            assert_eq!(run, "r1");
            assert_eq!(pid, std::process::id());
            assert_eq!(host, lock::hostname());
            assert_eq!(since, j.holder().since);
            assert!(chrono::DateTime::parse_from_rfc3339(&since).is_ok());
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // Creating the same run again meets the lock too, before the file.
    assert!(matches!(
        Journal::create(dir.path(), "r1", "bob"),
        Err(JournalError::Locked { .. })
    ));
    drop(j);
    assert!(matches!(
        Journal::create(dir.path(), "r1", "bob"),
        Err(JournalError::Exists { .. })
    ));
    let again = Journal::open(dir.path(), "r1", "bob").unwrap();
    assert_eq!(again.records().unwrap().len(), 1);
}

const CHILD_ENV: &str = "PATCHBOOK_TEST_LOCK_CHILD_STATE";

/// Kills the lock-holding child even when an assertion fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run twice: as the parent it re-runs this test binary as a child that takes the
/// lock and waits; the parent then meets the lock, kills the child with SIGKILL, and
/// takes the lock the kernel released.
#[test]
fn lock_held_by_another_process_names_it_and_dies_with_it() {
    if let Ok(state) = std::env::var(CHILD_ENV) {
        let j = Journal::begin(Path::new(&state), "r1", "child", &header()).unwrap();
        println!("LOCKED {}", j.holder().pid);
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_held_by_another_process_names_it_and_dies_with_it",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let child_pid = guard.0.id();
    let stdout = guard.0.stdout.take().unwrap();
    let mut seen = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints the test's name on the same line first.
        if let Some((_, pid)) = line.split_once("LOCKED ") {
            seen = Some(pid.trim().parse::<u32>().unwrap());
            break;
        }
    }
    assert_eq!(seen, Some(child_pid), "the child never took the lock");

    let t = Instant::now();
    let err = Journal::open(dir.path(), "r1", "parent").err();
    assert!(t.elapsed() < Duration::from_secs(1));
    match err {
        Some(JournalError::Locked { pid, host, .. }) => {
            assert_eq!(pid, child_pid);
            assert_eq!(host, lock::hostname());
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let msg = Journal::open(dir.path(), "r1", "parent")
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&format!("locked by pid {child_pid} on ")),
        "{msg}"
    );
    assert_eq!(
        RunLock::holder(dir.path(), "r1").unwrap().map(|h| h.pid),
        Some(child_pid)
    );
    let (code, out, _) = cli_verify(dir.path(), Some("r1"));
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "r1  OPEN  1 records, in progress: pid {child_pid}"
        )),
        "{out}"
    );

    guard.0.kill().unwrap();
    guard.0.wait().unwrap();
    assert_eq!(RunLock::holder(dir.path(), "r1").unwrap(), None);
    let j = Journal::open(dir.path(), "r1", "parent").unwrap();
    assert_eq!(j.holder().pid, std::process::id());
}

fn intent_is_on_disk_before_the_step_acts(s: &TestStore) {
    let j = Journal::begin_in(&s.store, "r1", "alice", &header(), None).unwrap();
    let id = j
        .intent("web1", "deploy", json!({"version": "1.0.1"}))
        .unwrap();
    // Another reader (a fresh process after a crash would be the same) sees it now.
    let on_disk = s.store.read_records("r1").unwrap();
    let last = on_disk.last().unwrap();
    assert_eq!(last.seq, id.0);
    assert_eq!(last.kind, kind::STEP_INTENT);
    assert_eq!(last.host.as_deref(), Some("web1"));
    assert_eq!(last.data["input"]["version"], "1.0.1");
}

fn outcomes_must_follow_their_own_open_intent(s: &TestStore) {
    let j = Journal::begin_in(&s.store, "r1", "alice", &header(), None).unwrap();
    let id = j.intent("web1", "deploy", json!({})).unwrap();
    assert!(matches!(
        j.outcome("web2", id, true, json!({}), None),
        Err(JournalError::UnknownStep { .. })
    ));
    assert!(matches!(
        j.outcome("web1", StepId(99), true, json!({}), None),
        Err(JournalError::UnknownStep { .. })
    ));
    j.outcome("web1", id, true, json!({}), None).unwrap();
    assert!(matches!(
        j.outcome("web1", id, true, json!({}), None),
        Err(JournalError::UnknownStep { .. })
    ));
    assert!(matches!(
        j.start(&header()),
        Err(JournalError::HeaderNotFirst { records: 3, .. })
    ));
}

fn state_gives_open_intents_undo_order_and_deployment_order(s: &TestStore) {
    let j = Journal::begin_in(&s.store, "r1", "alice", &header(), None).unwrap();
    let restore = UndoStep::Restore {
        backups: vec![BackupRef {
            id: "b1".into(),
            archive: PathBuf::from("backups/r1/web2/etc.tar"),
            sha256: "e".repeat(64),
            paths: vec!["/etc/acme".into()],
        }],
    };
    // web2 deploys first, then web1, then db1 crashes mid-step.
    let b = j.intent("web2", "backup", json!({})).unwrap();
    j.outcome("web2", b, true, json!({}), Some(restore.clone()))
        .unwrap();
    let d = j.intent("web2", "deploy", json!({})).unwrap();
    j.outcome("web2", d, true, json!({}), Some(reinstall("1.0.0")))
        .unwrap();
    j.host_finished("web2", true, Default::default()).unwrap();
    let d1 = j.intent("web1", "deploy", json!({})).unwrap();
    j.outcome(
        "web1",
        d1,
        false,
        json!({"stderr": "dpkg: error"}),
        Some(UndoStep::Remove {
            package: "acme-agent".into(),
        }),
    )
    .unwrap();
    let open = j
        .intent("db1", "deploy", json!({"version": "1.0.1"}))
        .unwrap();
    drop(j); // crash

    let st = RunState::load_in(&s.store, "r1").unwrap();
    assert_eq!(st.header.as_ref().unwrap().playbook_sha256, "a".repeat(64));
    assert_eq!(st.deploy_order, ["web2", "web1", "db1"]);
    assert_eq!(st.rollback_order(), ["db1", "web1", "web2"]);
    let oi = st.open_intents();
    assert_eq!(oi.len(), 1);
    assert_eq!(
        (oi[0].0, oi[0].1.id, oi[0].1.step.as_str()),
        ("db1", open, "deploy")
    );
    assert_eq!(oi[0].1.input()["version"], "1.0.1");

    let web2 = st.host("web2").unwrap();
    assert!(web2.finished && !web2.failed && !web2.rolled_back);
    let undo: Vec<StepId> = web2.undo_steps().iter().map(|(id, _)| *id).collect();
    assert_eq!(undo, [d, b], "newest first");
    assert_eq!(web2.undo_steps()[1].1, &restore);
    let web1 = st.host("web1").unwrap();
    assert!(!web1.finished && web1.failed);
    assert!(!st.host("db1").unwrap().failed);

    // Resume in a fresh process: the open intent can be closed, undo steps applied.
    let j = Journal::open_in(&s.store, "r1", "bob", None).unwrap();
    j.outcome(
        "db1",
        open,
        true,
        json!({"verified": "1.0.1"}),
        Some(reinstall("1.0.0")),
    )
    .unwrap();
    let u = j.undo_intent("web2", d, &reinstall("1.0.0")).unwrap();
    j.outcome("web2", u, true, json!({}), None).unwrap();
    let st = j.state().unwrap();
    assert!(st.open_intents().is_empty());
    let web2 = st.host("web2").unwrap();
    let left: Vec<StepId> = web2.undo_steps().iter().map(|(id, _)| *id).collect();
    assert_eq!(left, [b], "the applied undo is no longer pending");
    assert_eq!(
        st.deploy_order,
        ["web2", "web1", "db1"],
        "undo steps do not reorder"
    );
    j.host_rolled_back("web2", true, Default::default())
        .unwrap();
    assert!(j.state().unwrap().host("web2").unwrap().rolled_back);
    assert_eq!(j.records().unwrap()[0].operator, "alice");
    assert_eq!(j.records().unwrap().last().unwrap().operator, "bob");
}

fn list_runs_names_every_run_with_its_header(s: &TestStore) {
    assert!(list_runs_in(&s.store).unwrap().is_empty());
    s.closed_run("r1");
    let j = Journal::begin_in(&s.store, "r2", "bob", &header(), None).unwrap();
    let runs = list_runs_in(&s.store).unwrap();
    assert_eq!(runs.len(), 2, "lock files are not runs: {runs:?}");
    assert_eq!(runs[0].run, "r1");
    assert!(runs[0].closed && !runs[1].closed);
    assert_eq!(runs[0].records, 12);
    assert_eq!(runs[1].operator.as_deref(), Some("bob"));
    assert_eq!(
        runs[1].playbook.as_deref(),
        Some(Path::new("scripts/patch.rhai"))
    );
    drop(j);
}

fn audit_verify_of_an_unknown_run_exits_two(s: &TestStore) {
    s.closed_run("r1");
    let (code, out, err) = s.cli_verify(Some("nope"), false);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("no run `nope`"), "{err}");
}

fn concurrent_workers_share_fsyncs_and_keep_one_valid_chain(s: &TestStore) {
    let j =
        std::sync::Arc::new(Journal::begin_in(&s.store, "r1", "alice", &header(), None).unwrap());
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let j = j.clone();
            std::thread::spawn(move || {
                let host = format!("web{w}");
                for i in 0..40 {
                    let id = j.intent(&host, "deploy", json!({"i": i})).unwrap();
                    // The intent is on disk before the step would act.
                    let on_disk = j.records().unwrap();
                    assert!(on_disk
                        .iter()
                        .any(|r| r.seq == id.0 && r.host.as_deref() == Some(host.as_str())));
                    j.outcome(&host, id, true, json!({}), Some(reinstall("1.0.0")))
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let j = std::sync::Arc::into_inner(j).unwrap();
    j.close().unwrap();
    let report = audit::verify_in(&s.store, None, &Default::default()).unwrap();
    assert!(report.intact(), "{report:?}");
    let st = RunState::load_in(&s.store, "r1").unwrap();
    assert_eq!(st.hosts.len(), 8);
    assert!(st.open_intents().is_empty());
    assert!(st
        .hosts
        .values()
        .all(|h| h.steps.len() == 40 && h.undo_steps().len() == 40));
}

/// PostgreSQL group commit: threads appending at once through one journal share
/// transactions, yet each `intent` returns only once its record is committed (a
/// second connection sees it), and a worker's journal joined to the same run
/// chains beside it. Every record is chained exactly once, in seq order.
#[cfg(feature = "lab")]
#[test]
fn postgres_appends_share_transactions_and_each_is_committed_when_it_returns() {
    let s = TestStore::postgres();
    let coordinator =
        std::sync::Arc::new(Journal::begin_in(&s.store, "gc", "alice", &header(), None).unwrap());
    let worker = std::sync::Arc::new(Journal::join_in(&s.store, "gc", "bob").unwrap());
    let (threads, steps) = (12, 30);
    let appenders: Vec<_> = (0..threads)
        .map(|t| {
            let j = if t % 3 == 0 {
                worker.clone()
            } else {
                coordinator.clone()
            };
            let mut reader = s.client();
            std::thread::spawn(move || {
                let host = format!("web{t}");
                for i in 0..steps {
                    let id = j.intent(&host, "deploy", json!({"i": i})).unwrap();
                    // Committed when `intent` returns: another connection sees it.
                    let seen: i64 = reader
                        .query_one(
                            "SELECT count(*) FROM records WHERE run = 'gc' AND seq = $1 AND host = $2",
                            &[&i64::try_from(id.0).unwrap(), &host],
                        )
                        .unwrap()
                        .get(0);
                    assert_eq!(seen, 1, "intent {id} of {host} not committed on return");
                    j.outcome(&host, id, true, json!({}), Some(reinstall("1.0.0")))
                        .unwrap();
                }
            })
        })
        .collect();
    for a in appenders {
        a.join().unwrap();
    }
    let transactions =
        coordinator.store_transactions().unwrap() + worker.store_transactions().unwrap();
    drop(worker);
    std::sync::Arc::into_inner(coordinator)
        .unwrap()
        .close()
        .unwrap();

    let records = s.store.read_records("gc").unwrap();
    let appended = threads * steps * 2;
    // run.start + every intent and outcome + run.close, seqs 1..=n in order.
    assert_eq!(records.len(), appended + 2);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, u64::try_from(i + 1).unwrap());
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in records.iter().filter(|r| r.kind == kind::STEP_INTENT) {
        assert!(
            seen.insert((r.host.clone(), r.data["input"]["i"].as_u64())),
            "chained twice: {r:?}"
        );
    }
    assert_eq!(seen.len(), threads * steps);
    assert!(audit::verify_in(&s.store, None, &Default::default())
        .unwrap()
        .intact());
    let st = RunState::load_in(&s.store, "gc").unwrap();
    assert!(st.open_intents().is_empty());
    // Fewer transactions than records, by the journals' count and by the
    // database's: rows inserted by one transaction share its xmin.
    let in_db: i64 = s
        .client()
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM records WHERE run = 'gc'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        usize::try_from(in_db).unwrap() < appended,
        "{in_db} transactions for {appended} records: nothing was batched"
    );
    assert!(
        usize::try_from(transactions).unwrap() < appended,
        "{transactions} transactions for {appended} records"
    );
    assert_eq!(
        u64::try_from(in_db).unwrap(),
        transactions + 1,
        "the journals' count (and the close) against the database's"
    );
}

fn records_with_awkward_floats_verify_after_a_round_trip(s: &TestStore) {
    let j = Journal::begin_in(&s.store, "floats", "alice", &header(), None).unwrap();
    let mut x = 0.1f64;
    for i in 0..200 {
        x = x * 1.000_000_7 + 0.1 + f64::from(i) / 3.0;
        j.append(
            Some("h"),
            "sample",
            json!({ "seconds": x, "third": 1.0 / 3.0 }),
        )
        .unwrap();
    }
    j.close().unwrap();
    for r in s.store.read_records("floats").unwrap() {
        assert_eq!(
            r.compute_hash(),
            r.hash,
            "seq {} does not verify after re-reading",
            r.seq
        );
    }
    assert!(audit::verify_in(&s.store, None, &Default::default())
        .unwrap()
        .intact());
}

/// A NUL and other control characters in a record's data (a host's output can
/// hold any byte) are kept and verify in either store.
fn control_characters_in_records_survive_the_store(s: &TestStore) {
    let j = Journal::begin_in(&s.store, "nul", "alice", &header(), None).unwrap();
    let awkward = "a\u{0}b\u{1}\u{7f} \\u0000 ünï\n";
    j.append(Some("h\u{0}1"), "sample", json!({ "stdout": awkward }))
        .unwrap();
    j.close().unwrap();
    let recs = s.store.read_records("nul").unwrap();
    assert_eq!(recs[1].data["stdout"], awkward);
    assert_eq!(recs[1].host.as_deref(), Some("h\u{0}1"));
    assert!(audit::verify_in(&s.store, None, &Default::default())
        .unwrap()
        .intact());
}

/// The lean read at the end of a run names the same unreachable hosts as the
/// whole state does: a host stays unreachable until it finishes, and a host that
/// only finished is not.
fn unreachable_hosts_read_lean_match_the_whole_state(s: &TestStore) {
    use patchbook::journal::entry::{Entry, HostUnreachable};
    let j = Journal::begin_in(&s.store, "unr", "alice", &header(), None).unwrap();
    let unreachable = |step: &str| {
        Entry::HostUnreachable(HostUnreachable {
            step: step.into(),
            reason: "connection refused".into(),
        })
    };
    j.append_entry(Some("web3"), &unreachable("rollout"))
        .unwrap();
    j.append_entry(Some("web1"), &unreachable("needing"))
        .unwrap();
    j.host_finished("web2", true, Default::default()).unwrap();
    j.append_entry(Some("web2"), &unreachable("rollout"))
        .unwrap();
    j.append_entry(Some("web1"), &unreachable("rollout"))
        .unwrap();
    // Reached after all: finishing clears it.
    j.host_finished("web3", false, Default::default()).unwrap();
    assert_eq!(j.host_records("web1").len(), 2);
    assert_eq!(j.host_records("web3")[1].kind, kind::HOST_FINISH);
    j.close().unwrap();
    let whole = RunState::load_in(&s.store, "unr")
        .unwrap()
        .unreachable_hosts();
    assert_eq!(whole, ["web1", "web2"]);
    assert_eq!(RunState::unreachable_in(&s.store, "unr").unwrap(), whole);
    assert!(matches!(
        RunState::unreachable_in(&s.store, "no-such-run"),
        Err(JournalError::NoSuchRun { .. })
    ));
}

on_both_stores!(
    intact_runs_pass_with_exit_zero,
    deleted_record_is_detected,
    edited_record_is_detected,
    reordered_records_are_detected,
    forged_record_with_a_valid_chain_after_close_is_caught_by_the_index,
    intent_is_on_disk_before_the_step_acts,
    outcomes_must_follow_their_own_open_intent,
    state_gives_open_intents_undo_order_and_deployment_order,
    list_runs_names_every_run_with_its_header,
    audit_verify_of_an_unknown_run_exits_two,
    concurrent_workers_share_fsyncs_and_keep_one_valid_chain,
    records_with_awkward_floats_verify_after_a_round_trip,
    control_characters_in_records_survive_the_store,
    unreachable_hosts_read_lean_match_the_whole_state,
);
