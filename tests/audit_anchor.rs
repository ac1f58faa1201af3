//! Signed anchors: with `[audit] signing_key` a writer of the state directory can no
//! longer re-hash a run, re-chain the index or drop a run's close unseen; a cut of
//! the index's tail is caught with `--expect-at-least`; a field added outside the
//! hashed content fails with or without a key; the key never reaches the state dir.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use patchbook::journal::anchor::{Anchor, Signer, Sink, VerifyKey};
use patchbook::journal::audit::{self, AuditReport, Problem, Verdict, VerifyOptions};
use patchbook::journal::index::{self, IndexEntry, IndexEvent};
use patchbook::journal::{
    kind, read_records, Journal, Record, RunHeader, CHECKPOINT_EVERY, GENESIS,
};
use serde_json::json;

const SEED: [u8; 32] = [
    0x3c, 0x91, 0x5e, 0x07, 0xa2, 0x44, 0xd8, 0x19, 0x6b, 0xf0, 0x2d, 0x83, 0xc5, 0x7a, 0x10, 0xee,
    0x58, 0x36, 0x9f, 0x04, 0xb7, 0x62, 0xcd, 0x21, 0x8e, 0x4f, 0xa9, 0x13, 0x75, 0xda, 0x0b, 0x66,
];

fn anchor() -> Anchor {
    Anchor {
        signer: Signer::from_seed(SEED),
        sink: Sink::None,
    }
}

fn key() -> VerifyKey {
    Signer::from_seed(SEED).verify_key()
}

fn header() -> RunHeader {
    RunHeader::new(
        PathBuf::from("scripts/patch.rhai"),
        "a".repeat(64),
        BTreeMap::new(),
        "c".repeat(64),
        json!({"waves": ["100%"]}),
    )
}

/// A signed, closed run: two hosts with a deploy each.
fn signed_run(state: &Path, run: &str) -> Vec<Record> {
    let j = Journal::begin_with(state, run, "alice", &header(), Some(anchor())).unwrap();
    for host in ["web1", "web2"] {
        let d = j
            .intent(host, "deploy", json!({"version": "1.0.1"}))
            .unwrap();
        j.outcome(host, d, true, json!({}), None).unwrap();
        j.host_finished(host, true, Default::default()).unwrap();
    }
    j.close().unwrap();
    read_records(&Journal::run_path(state, run)).unwrap()
}

fn with_key(state: &Path) -> AuditReport {
    audit::verify_with(
        state,
        None,
        &VerifyOptions {
            key: Some(key()),
            expect_at_least: None,
        },
    )
    .unwrap()
}

fn verdict<'a>(report: &'a AuditReport, run: &str) -> &'a Verdict {
    &report.run(run).unwrap().verdict
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

/// Rewrites records as a careful forger would: every hash recomputed.
fn write_rechained(path: &Path, mut records: Vec<Record>) -> Vec<Record> {
    let mut prev = GENESIS.to_string();
    for (i, r) in records.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
        r.prev = prev.clone();
        r.hash = r.compute_hash();
        prev = r.hash.clone();
    }
    let l: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    write_lines(path, &l);
    records
}

/// Rewrites the index with every entry's chain recomputed; `edit` changes entries
/// first. Signatures are kept as they were (the forger cannot make new ones).
fn rechain_index(state: &Path, edit: impl Fn(&mut IndexEntry)) {
    let path = index::index_path(state);
    let mut prev = GENESIS.to_string();
    let mut out = Vec::new();
    for l in lines(&path) {
        let mut e: IndexEntry = serde_json::from_str(&l).unwrap();
        edit(&mut e);
        e.prev = prev.clone();
        e.hash = e.compute_hash();
        prev = e.hash.clone();
        out.push(serde_json::to_string(&e).unwrap());
    }
    write_lines(&path, &out);
}

/// A project folder with `[audit]` keys outside its state dir, for the CLI.
struct Project {
    dir: tempfile::TempDir,
    keys: tempfile::TempDir,
}

impl Project {
    fn new(audit: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(keys.path().join("audit.key"), SEED).unwrap();
        let p = dir.path();
        std::fs::write(
            p.join("patchbook.toml"),
            format!(
                "inventory = [\"hosts.toml\"]\nallow_local_hosts = true\n[audit]\n{}\n",
                audit.replace("KEYDIR", &keys.path().display().to_string())
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("hosts.toml"),
            "[hosts.h1]\ntransport = \"local\"\ngroups = [\"web\"]\n\
             [hosts.h2]\ntransport = \"local\"\ngroups = [\"web\"]\n",
        )
        .unwrap();
        Project { dir, keys }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join(".patchbook")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_patchbook"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PATCHBOOK_LOG")
            .output()
            .unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn untouched_signed_state_passes_with_checkpoints_every_so_many_records() {
    let dir = tempfile::tempdir().unwrap();
    signed_run(dir.path(), "r1");
    // A run long enough for signed checkpoints between its open and its close.
    let j = Journal::begin_with(dir.path(), "long", "alice", &header(), Some(anchor())).unwrap();
    for i in 0..(CHECKPOINT_EVERY * 3) {
        let host = format!("h{}", i % 7);
        let d = j.intent(&host, "deploy", json!({"i": i})).unwrap();
        j.outcome(&host, d, true, json!({}), None).unwrap();
    }
    j.close().unwrap();
    let report = with_key(dir.path());
    assert!(report.intact(), "{report:?}");
    assert!(matches!(verdict(&report, "long"), Verdict::Intact { .. }));
    let idx = index::read(dir.path()).unwrap();
    assert!(idx.entries.iter().all(|e| e.sig.is_some()), "{idx:?}");
    let checkpoints: Vec<u64> = idx
        .entries
        .iter()
        .filter(|e| e.run == "long" && e.event == IndexEvent::Checkpoint)
        .map(|e| e.at_seq)
        .collect();
    assert!(checkpoints.len() >= 5, "{checkpoints:?}");
    assert!(
        checkpoints
            .windows(2)
            .all(|w| w[1] - w[0] >= CHECKPOINT_EVERY),
        "{checkpoints:?}"
    );
    // The close record carries its signature inside the hashed data.
    let records = read_records(&Journal::run_path(dir.path(), "r1")).unwrap();
    let close = records.last().unwrap();
    assert_eq!(close.kind, kind::RUN_CLOSE);
    assert!(close.data["sig"].as_str().is_some_and(|s| s.len() == 128));
}

#[test]
fn a_rehashed_run_with_a_rechained_index_fails_naming_run_and_record() {
    let dir = tempfile::tempdir().unwrap();
    signed_run(dir.path(), "r1");
    signed_run(dir.path(), "r2");
    // Drop every record of web2 from r1, re-hash the run, re-chain the index.
    let kept: Vec<Record> = read_records(&Journal::run_path(dir.path(), "r1"))
        .unwrap()
        .into_iter()
        .filter(|r| r.host.as_deref() != Some("web2"))
        .collect();
    let forged = write_rechained(&Journal::run_path(dir.path(), "r1"), kept);
    let last = forged.last().unwrap().clone();
    rechain_index(dir.path(), |e| {
        if e.run == "r1" && e.event == IndexEvent::Close {
            e.at_seq = last.seq;
            e.at_hash = last.hash.clone();
        }
    });
    // The hole: without a key this passes.
    assert!(audit::verify(dir.path(), None).unwrap().intact());
    let report = with_key(dir.path());
    assert!(!report.intact());
    assert_eq!(
        verdict(&report, "r1"),
        &Verdict::Tampered {
            problem: Problem::BadSignature {
                seq: last.seq,
                index_seq: 2
            },
            last_good_seq: 0
        }
    );
    // Re-chaining rewrote every later entry too: none of them verifies.
    assert!(matches!(
        verdict(&report, "r2"),
        Verdict::Tampered {
            problem: Problem::BadSignature { index_seq: 3, .. },
            ..
        }
    ));
    let p = report.index.problem.clone().unwrap();
    assert!(p.contains("entry 2 (run r1, "), "{p}");
    let line = report.run("r1").unwrap().to_string();
    assert!(
        line.starts_with(&format!(
            "r1  TAMPERED  record seq {}: audit index entry 2",
            last.seq
        )),
        "{line}"
    );

    // Stripping the signatures instead is no better.
    rechain_index(dir.path(), |e| e.sig = None);
    let report = with_key(dir.path());
    assert!(matches!(
        verdict(&report, "r1"),
        Verdict::Tampered {
            problem: Problem::BadSignature { .. },
            ..
        }
    ));
    let p = report.index.problem.clone().unwrap();
    assert!(
        p.contains("entry 1 (run r1, 0 records) is not signed"),
        "{p}"
    );
}

#[test]
fn a_rehashed_run_is_caught_by_its_signed_close_even_if_the_index_entry_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let records = signed_run(dir.path(), "r1");
    // Change a record in place and re-hash: the close's signature covers the
    // hash before it, which changed.
    let mut forged = records.clone();
    forged[2].data = json!({"step_id": 2, "step": "deploy", "ok": false, "output": {}});
    let forged = write_rechained(&Journal::run_path(dir.path(), "r1"), forged);
    let close = forged.last().unwrap().clone();
    // A forger who re-chains the index must change the close entry's head; even
    // leaving the (signed) Open entry untouched, the Close entry no longer verifies.
    rechain_index(dir.path(), |e| {
        if e.event == IndexEvent::Close {
            e.at_hash = close.hash.clone();
        }
    });
    let report = with_key(dir.path());
    let v = verdict(&report, "r1");
    assert!(
        matches!(
            v,
            Verdict::Tampered {
                problem: Problem::BadSignature { seq, .. } | Problem::CloseUnsigned { seq },
                ..
            } if *seq == close.seq
        ),
        "{v:?}"
    );
    let line = report.run("r1").unwrap().to_string();
    assert!(line.starts_with("r1  TAMPERED  record seq "), "{line}");
}

#[test]
fn deleting_the_newest_run_and_cutting_the_index_is_caught_with_the_expected_length() {
    let dir = tempfile::tempdir().unwrap();
    signed_run(dir.path(), "r1");
    signed_run(dir.path(), "r2");
    let idx = index::read(dir.path()).unwrap();
    let last_signed = idx.entries.last().unwrap().seq;
    assert_eq!(last_signed, 4);
    std::fs::remove_file(Journal::run_path(dir.path(), "r2")).unwrap();
    let path = index::index_path(dir.path());
    let l = lines(&path);
    write_lines(&path, &l[..2]);
    // What a signature alone cannot see: everything left is signed and whole.
    assert!(with_key(dir.path()).intact());
    let report = audit::verify_with(
        dir.path(),
        None,
        &VerifyOptions {
            key: Some(key()),
            expect_at_least: Some(last_signed),
        },
    )
    .unwrap();
    assert!(!report.intact());
    let p = report.index.problem.clone().unwrap();
    assert!(
        p.contains("ends at entry 2, but entry 4 was signed: entries 3..=4 were cut"),
        "{p}"
    );
}

#[test]
fn dropping_the_index_close_line_is_caught_by_the_close_signed_in_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let records = signed_run(dir.path(), "r1");
    let path = index::index_path(dir.path());
    let l = lines(&path);
    write_lines(&path, &l[..l.len() - 1]);
    // The hole: without a key the run reads as merely open.
    let plain = audit::verify(dir.path(), None).unwrap();
    assert!(matches!(verdict(&plain, "r1"), Verdict::Open { .. }));
    let report = with_key(dir.path());
    assert_eq!(
        verdict(&report, "r1"),
        &Verdict::Tampered {
            problem: Problem::CloseLost {
                seq: records.len() as u64
            },
            last_good_seq: 0
        }
    );
    // Going on to rewrite the now "open" run (its close dropped, a record
    // changed, re-hashed) leaves an open run that verifies: only the index's
    // length, known from outside, shows the cut.
    let mut forged = records.clone();
    forged.pop();
    forged[1].data = json!({"step": "deploy", "input": {"version": "0.9"}});
    write_rechained(&Journal::run_path(dir.path(), "r1"), forged);
    assert!(with_key(dir.path()).intact());
    let report = audit::verify_with(
        dir.path(),
        None,
        &VerifyOptions {
            key: Some(key()),
            expect_at_least: Some(2),
        },
    )
    .unwrap();
    assert!(!report.intact());
    assert!(report
        .index
        .problem
        .unwrap()
        .contains("entries 2..=2 were cut"));
}

#[test]
fn a_field_added_outside_the_hashed_content_fails_with_or_without_a_key() {
    for last in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        signed_run(dir.path(), "r1");
        let run = Journal::run_path(dir.path(), "r1");
        let mut l = lines(&run);
        let at = if last { l.len() - 1 } else { 2 };
        l[at] = l[at].replacen("{\"seq\"", "{\"approved_by\":\"mallory\",\"seq\"", 1);
        write_lines(&run, &l);
        for report in [
            audit::verify(dir.path(), None).unwrap(),
            with_key(dir.path()),
        ] {
            let v = verdict(&report, "r1");
            assert!(
                matches!(
                    v,
                    Verdict::Tampered { problem: Problem::Unreadable { line, message }, .. }
                        if *line == at + 1 && message.contains("unknown field `approved_by`")
                ),
                "last={last}: {v:?}"
            );
        }
        // Nor can the run be reopened and its "torn" line cut away.
        assert!(Journal::open(dir.path(), "r1", "bob").is_err());
    }
    // The same for an index line.
    let dir = tempfile::tempdir().unwrap();
    signed_run(dir.path(), "r1");
    let path = index::index_path(dir.path());
    let mut l = lines(&path);
    l[0] = l[0].replacen("{\"seq\"", "{\"note\":\"x\",\"seq\"", 1);
    write_lines(&path, &l);
    let p = audit::verify(dir.path(), None)
        .unwrap()
        .index
        .problem
        .unwrap();
    assert!(p.contains("unknown field `note`"), "{p}");
}

#[test]
fn a_wrong_verify_key_fails_and_unsigned_state_fails_under_a_key() {
    let dir = tempfile::tempdir().unwrap();
    signed_run(dir.path(), "r1");
    let wrong = Signer::from_seed([1; 32]).verify_key();
    let report = audit::verify_with(
        dir.path(),
        None,
        &VerifyOptions {
            key: Some(wrong),
            expect_at_least: None,
        },
    )
    .unwrap();
    assert!(!report.intact());
    assert!(matches!(
        verdict(&report, "r1"),
        Verdict::Tampered {
            problem: Problem::BadSignature {
                seq: 0,
                index_seq: 1
            },
            ..
        }
    ));
    let p = report.index.problem.unwrap();
    assert!(p.contains("has a signature the verify key rejects"), "{p}");

    // A run journaled without the key cannot pass as signed.
    let unsigned = tempfile::tempdir().unwrap();
    let j = Journal::begin(unsigned.path(), "r0", "alice", &header()).unwrap();
    j.close().unwrap();
    assert!(audit::verify(unsigned.path(), None).unwrap().intact());
    assert!(!with_key(unsigned.path()).intact());
}

#[test]
fn cli_signs_runs_verifies_them_and_never_writes_the_key_into_the_state_dir() {
    let p = Project::new("signing_key = \"KEYDIR/audit.key\"");
    std::fs::write(
        p.dir.path().join("pb.rhai"),
        "rollout(hosts(\"web\"), #{}, |host| { log(`at ${host.name}`); });\n",
    )
    .unwrap();
    let out = p.run(&["run", "pb.rhai"]);
    assert!(out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("signed audit index entry 2") && err.contains("--expect-at-least 2"),
        "{err}"
    );

    // The verify key a verifier puts in its own config.
    let out = p.run(&["audit", "key"]);
    assert!(out.status.success(), "{out:?}");
    let pubkey = text(&out.stdout).trim().to_string();
    assert_eq!(pubkey, key().to_openssh());

    let verifier = Project::new(&format!("verify_key = \"{pubkey}\""));
    let state = p.state();
    let verify = |extra: &[&str]| {
        let mut args = vec!["--state-dir", state.to_str().unwrap(), "audit", "verify"];
        args.extend_from_slice(extra);
        verifier.run(&args)
    };
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stderr).contains(&key().fingerprint()), "{out:?}");
    assert_eq!(verify(&["--expect-at-least", "2"]).status.code(), Some(0));
    let out = verify(&["--expect-at-least", "3"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stdout).contains("audit-index.jsonl  TAMPERED"));

    // Without a key: the chains pass, with a warning saying what that is worth.
    let out = p.run(&["--state-dir", state.to_str().unwrap(), "audit", "verify"]);
    assert!(out.status.success());
    let bare = Project::new("");
    let out = bare.run(&["--state-dir", state.to_str().unwrap(), "audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text(&out.stderr).contains("can re-hash a run and re-chain the index"),
        "{out:?}"
    );

    // The index cut back by the writer: the verifier's config fails it, naming the run.
    let run = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let path = index::index_path(&state);
    let l = lines(&path);
    write_lines(&path, &l[..1]);
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let run_id = run.file_stem().unwrap().to_str().unwrap();
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{run_id}  TAMPERED  the run file holds a signed close at seq"
        )),
        "{stdout}"
    );

    // No file under the state dir holds the seed, raw, hex or base64.
    let needles: Vec<Vec<u8>> = vec![
        SEED.to_vec(),
        hex::encode(SEED).into_bytes(),
        base64_std(&SEED).into_bytes(),
    ];
    let mut stack = vec![state.clone()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                files += 1;
                for n in &needles {
                    assert!(
                        !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                        "{} holds the signing key",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(files >= 2, "nothing was checked");
    assert!(p.keys.path().join("audit.key").exists());
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn a_signing_key_inside_the_state_dir_is_refused() {
    let p = Project::new("signing_key = \".patchbook/audit.key\"");
    std::fs::create_dir_all(p.state()).unwrap();
    std::fs::write(p.state().join("audit.key"), SEED).unwrap();
    std::fs::write(p.dir.path().join("pb.rhai"), "1\n").unwrap();
    let out = p.run(&["run", "pb.rhai"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("is inside the state directory"),
        "{out:?}"
    );
    assert!(
        !p.state().join("runs").exists()
            || std::fs::read_dir(p.state().join("runs"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn each_signed_index_entry_goes_to_syslog_when_asked() {
    let p = Project::new("signing_key = \"KEYDIR/audit.key\"\nsyslog = true");
    // A `logger` that writes down what it was asked to send, ahead on PATH.
    let bin = tempfile::tempdir().unwrap();
    let sent = bin.path().join("sent");
    let logger = bin.path().join("logger");
    std::fs::write(
        &logger,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", sent.display()),
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(p.dir.path().join("pb.rhai"), "1\n").unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .args(["run", "pb.rhai"])
        .current_dir(p.dir.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sent = std::fs::read_to_string(&sent).unwrap();
    let lines: Vec<&str> = sent.lines().collect();
    assert_eq!(lines.len(), 2, "{sent}");
    assert!(lines[0].starts_with("-t patchbook-audit -p auth.notice -- state="));
    assert!(lines[0].contains("index_seq=1 ") && lines[0].contains("event=Open"));
    assert!(lines[1].contains("index_seq=2 ") && lines[1].contains("event=Close"));
    // What was sent is the signed entry, checkable against the index.
    let idx = index::read(&p.state()).unwrap();
    let close = idx.entries.last().unwrap();
    assert!(lines[1].contains(&format!(
        "hash={} sig={}",
        close.hash,
        close.sig.as_deref().unwrap()
    )));
    assert!(key().verify_index(&close.hash, close.sig.as_deref().unwrap()));
    assert!(!sent.contains(&hex::encode(SEED)));
}

#[test]
fn a_close_forged_into_an_open_run_is_caught_by_its_missing_signature() {
    for data in [
        json!({}),
        json!({"sig": 5}),
        json!({"sig": "ab".repeat(64)}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::begin_with(dir.path(), "r1", "alice", &header(), Some(anchor())).unwrap();
        let d = j.intent("web1", "deploy", json!({})).unwrap();
        j.outcome("web1", d, true, json!({}), None).unwrap();
        drop(j);
        let run = Journal::run_path(dir.path(), "r1");
        let mut records = read_records(&run).unwrap();
        let mut close = records.last().unwrap().clone();
        close.kind = kind::RUN_CLOSE.to_string();
        close.host = None;
        close.data = data.clone();
        records.push(close);
        let forged = write_rechained(&run, records);
        let report = with_key(dir.path());
        assert_eq!(
            verdict(&report, "r1"),
            &Verdict::Tampered {
                problem: Problem::CloseUnsigned {
                    seq: forged.len() as u64
                },
                last_good_seq: 0
            },
            "{data}"
        );
    }
}

#[test]
fn a_controller_with_the_key_refuses_to_continue_a_run_it_cannot_vouch_for() {
    let dir = tempfile::tempdir().unwrap();
    let records = signed_run(dir.path(), "r1");
    // A signed, untouched run reopens (resume, rollback) and closes signed again.
    let j = Journal::open_with(dir.path(), "r1", "bob", Some(anchor())).unwrap();
    j.close().unwrap();
    assert!(with_key(dir.path()).intact());
    // The index's last close dropped, the run's close re-hashed away: the run
    // reads as open, but the key holder will not sign on top of it.
    let path = index::index_path(dir.path());
    let l = lines(&path);
    write_lines(&path, &l[..l.len() - 1]);
    let err = Journal::open_with(dir.path(), "r1", "bob", Some(anchor()))
        .err()
        .expect("reopened a run whose close the index lost");
    assert!(err.to_string().contains("signed close at seq"), "{err}");
    let mut forged = read_records(&Journal::run_path(dir.path(), "r1")).unwrap();
    assert!(forged.len() > records.len());
    forged.pop();
    forged[2].data = json!({"step_id": 2, "step": "deploy", "ok": false, "output": {}});
    write_rechained(&Journal::run_path(dir.path(), "r1"), forged);
    let err = Journal::open_with(dir.path(), "r1", "bob", Some(anchor()))
        .err()
        .expect("reopened a re-hashed run");
    assert!(err.to_string().contains("no valid signature"), "{err}");
}

#[test]
fn an_unusable_verify_key_or_seed_is_an_error_not_a_verdict() {
    let p = Project::new("verify_key = \"ssh-rsa AAAAB3NzaC1yc2E= someone\"");
    let out = p.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("is not an `ssh-ed25519 AAAA…` public key"),
        "{out:?}"
    );
    let p = Project::new("signing_key = \"KEYDIR/short.key\"");
    std::fs::write(p.keys.path().join("short.key"), [1u8; 16]).unwrap();
    let out = p.run(&["audit", "key"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("is not a 32-byte Ed25519 seed (found 16 bytes)"),
        "{out:?}"
    );
}
