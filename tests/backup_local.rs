//! Backup and restore through the local transport, with a real journal: the
//! archive lands in the controller's store, its manifest hash matches, restore puts
//! changed files back, and a second rollback changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::sync::Arc;

use patchbook::inventory::{Host, TransportKind};
use patchbook::journal::Journal;
use patchbook::primitives::backup::{backup, restore};
use patchbook::primitives::{HostCtx, Mode, RunCtx};
use patchbook::transport::local::LocalTransport;

#[test]
fn backup_then_restore_puts_files_back() {
    let host_root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = host_root.path().join("acme");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("agent.conf"), "level=1\n").unwrap();

    let journal = Arc::new(Journal::create(state.path(), "r1", "tester").unwrap());
    let run = RunCtx::new(
        "r1",
        state.path().to_path_buf(),
        Some(journal.clone()),
        Mode::Apply,
    );
    let mut host = Host::new("local1");
    host.transport = TransportKind::Local;
    let t = LocalTransport::new("local1");
    let ctx = HostCtx {
        host: &host,
        transport: &t,
        run: &run,
        deadline: None,
    };

    let path = dir.to_string_lossy().into_owned();
    let missing = host_root.path().join("nope").to_string_lossy().into_owned();
    let h = backup(&ctx, &[path.clone(), missing.clone()]).unwrap();
    assert!(h
        .archive
        .starts_with(state.path().join("backups").join("r1").join("local1")));
    assert_eq!(h.missing, vec![missing]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.archive.with_extension("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["sha256"], h.sha256);

    std::fs::write(dir.join("agent.conf"), "level=2\n").unwrap();
    restore(&ctx, &h.as_ref_for_undo()).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("agent.conf")).unwrap(),
        "level=1\n"
    );

    let kinds: Vec<String> = journal
        .records()
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["backup", "step.intent", "step.outcome"]);
}

#[test]
fn restore_refuses_an_archive_changed_since_backup() {
    let host_root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = host_root.path().join("etc-acme");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a"), "1").unwrap();
    let run = RunCtx::new("r2", state.path().to_path_buf(), None, Mode::Apply);
    let host = Host::new("local2");
    let t = LocalTransport::new("local2");
    let ctx = HostCtx {
        host: &host,
        transport: &t,
        run: &run,
        deadline: None,
    };
    let h = backup(&ctx, &[dir.to_string_lossy().into_owned()]).unwrap();
    let mut bytes = std::fs::read(&h.archive).unwrap();
    bytes[600] ^= 0xff;
    std::fs::write(&h.archive, bytes).unwrap();
    let err = restore(&ctx, &h.as_ref_for_undo()).unwrap_err().to_string();
    assert!(err.contains("changed since it was taken"), "{err}");
}
