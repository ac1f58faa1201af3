//! Issue 18, item 6: a host cannot fill the controller's disk through `backup`.
//!
//! Through the local transport, with a real journal: a host whose backup path
//! streams far more than the caps allow (a large sparse file, read back as zeros)
//! stops at the per-host and per-run caps; a state directory on a 2 MiB tmpfs hits
//! ENOSPC mid-stream; a filesystem below the free-space margin refuses to start.
//! Each time the partial archive is gone, the journal says why in a typed
//! `backup.stopped` record, and `audit verify` finds the run intact. The rollout
//! executor stops on such a controller-side fault without charging the host.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchbook::inventory::{Host, TransportKind};
use patchbook::journal::entry::BackupStopCause;
use patchbook::journal::{Entry, Journal};
use patchbook::primitives::backup::{backup, free_bytes, BackupLimits};
use patchbook::primitives::{HostCtx, Mode, PrimitiveError, RunCtx};
use patchbook::rollout::{Executor, HostOutcome, HostStatus, Plan, Policy, StopReason, Target};
use patchbook::transport::local::LocalTransport;

const MIB: u64 = 1 << 20;

/// A sparse file of `size` bytes: costs no disk, streams `size` bytes of zeros.
fn sparse(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p.to_string_lossy().into_owned()
}

struct Rig {
    state: PathBuf,
    journal: Arc<Journal>,
    run: RunCtx,
}

impl Rig {
    fn new(state: &Path, limits: BackupLimits) -> Rig {
        let journal = Arc::new(Journal::create(state, "r1", "tester").unwrap());
        let run = RunCtx::new(
            "r1",
            state.to_path_buf(),
            Some(journal.clone()),
            Mode::Apply,
        )
        .with_backup_limits(limits);
        Rig {
            state: state.to_path_buf(),
            journal,
            run,
        }
    }

    fn backup(&self, host: &str, paths: &[String]) -> Result<u64, PrimitiveError> {
        let mut h = Host::new(host);
        h.transport = TransportKind::Local;
        let t = LocalTransport::new(host);
        let ctx = HostCtx {
            host: &h,
            transport: &t,
            run: &self.run,
            deadline: None,
        };
        backup(&ctx, paths).map(|b| b.size)
    }

    /// Every file left in the host's backup folder.
    fn left(&self, host: &str) -> Vec<String> {
        let dir = self.state.join("backups").join("r1").join(host);
        match std::fs::read_dir(&dir) {
            Ok(d) => d
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn stops(&self) -> Vec<(Option<String>, BackupStopCause, u64)> {
        self.journal
            .records()
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.entry() {
                Ok(Entry::BackupStopped(s)) => Some((r.host.clone(), s.cause, s.received)),
                _ => None,
            })
            .collect()
    }

    fn assert_audit_intact(&self) {
        self.journal.flush().unwrap();
        let report = patchbook::journal::audit::verify(&self.state, None).unwrap();
        assert!(report.intact(), "audit verify: {report:?}");
    }
}

fn controller_message(e: PrimitiveError) -> String {
    match e {
        PrimitiveError::Controller { message, .. } => message,
        other => panic!("expected a controller-side stop, got: {other}"),
    }
}

#[test]
fn an_endless_backup_stops_at_the_per_host_cap_and_leaves_nothing() {
    let host_root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let huge = sparse(host_root.path(), "huge", 256 * MIB);
    let rig = Rig::new(
        state.path(),
        BackupLimits {
            max_per_host: 4 * MIB,
            max_per_run: 1 << 40,
            min_free: 0,
        },
    );
    let err = rig.backup("h1", std::slice::from_ref(&huge)).unwrap_err();
    let msg = controller_message(err);
    assert!(msg.contains("backup cap reached"), "{msg}");
    assert!(msg.contains("max_per_host"), "says what to change: {msg}");
    assert!(msg.contains("--resume"), "says how to continue: {msg}");
    assert!(
        rig.left("h1").is_empty(),
        "partial files: {:?}",
        rig.left("h1")
    );
    let stops = rig.stops();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].0.as_deref(), Some("h1"));
    assert_eq!(stops[0].1, BackupStopCause::HostCap { limit: 4 * MIB });
    assert!(stops[0].2 <= 4 * MIB, "wrote past the cap: {}", stops[0].2);
    // The host's fault is noted for the rollout, once.
    assert!(rig.run.take_controller_fault("h1").is_some());
    assert!(rig.run.take_controller_fault("h1").is_none());
    rig.assert_audit_intact();

    // The cap is per host across the run: a 3 MiB backup fits, the next 3 MiB does not.
    let small = sparse(host_root.path(), "small", 3 * MIB);
    assert!(rig.backup("h1", std::slice::from_ref(&small)).unwrap() > 3 * MIB);
    let msg = controller_message(rig.backup("h1", std::slice::from_ref(&small)).unwrap_err());
    assert!(msg.contains("backup cap reached"), "{msg}");
    assert_eq!(rig.left("h1").len(), 2, "only b001 and its manifest stay");
    // Another host has its own allowance.
    assert!(rig.backup("h2", std::slice::from_ref(&small)).is_ok());
    rig.assert_audit_intact();
}

#[test]
fn backups_stop_at_the_per_run_cap_across_hosts() {
    let host_root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = sparse(host_root.path(), "three", 3 * MIB);
    let rig = Rig::new(
        state.path(),
        BackupLimits {
            max_per_host: 1 << 40,
            max_per_run: 5 * MIB,
            min_free: 0,
        },
    );
    assert!(rig.backup("h1", std::slice::from_ref(&file)).is_ok());
    let msg = controller_message(rig.backup("h2", std::slice::from_ref(&file)).unwrap_err());
    assert!(msg.contains("backup cap reached"), "{msg}");
    assert!(rig.left("h2").is_empty());
    assert!(matches!(
        rig.stops()[..],
        [(_, BackupStopCause::RunCap { limit }, _)] if limit == 5 * MIB
    ));
    // The bytes of the removed partial archive are given back: a small backup
    // that fits beside h1's still runs.
    let one = sparse(host_root.path(), "one", MIB);
    assert!(rig.backup("h3", std::slice::from_ref(&one)).is_ok());
    rig.assert_audit_intact();
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs root to mount a tmpfs: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn a_backup_does_not_start_below_the_free_space_margin() {
    let host_root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = sparse(host_root.path(), "f", MIB);
    let free = free_bytes(state.path()).unwrap();
    let rig = Rig::new(
        state.path(),
        BackupLimits {
            max_per_host: 1 << 40,
            max_per_run: 1 << 40,
            min_free: free.saturating_mul(2).max(1 << 50),
        },
    );
    let msg = controller_message(rig.backup("h1", &[file]).unwrap_err());
    assert!(msg.contains("disk full"), "{msg}");
    assert!(msg.contains("min_free"), "says what to change: {msg}");
    assert!(rig.left("h1").is_empty());
    assert!(matches!(
        rig.stops()[..],
        [(_, BackupStopCause::LowSpace { .. }, 0)]
    ));
    rig.assert_audit_intact();
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "mounting a tmpfs needs root");
        let dir = tempfile::Builder::new()
            .prefix("tmpfs-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs failed");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs root to mount a tmpfs: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn enospc_mid_stream_leaves_a_journal_that_says_disk_full() {
    let host_root = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount("2m");
    let state = fs.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let huge = sparse(host_root.path(), "huge", 64 * MIB);
    let rig = Rig::new(
        &state,
        BackupLimits {
            max_per_host: 1 << 40,
            max_per_run: 1 << 40,
            // No margin: the write itself must meet ENOSPC.
            min_free: 0,
        },
    );
    let msg = controller_message(rig.backup("h1", std::slice::from_ref(&huge)).unwrap_err());
    assert!(msg.contains("disk full"), "{msg}");
    assert!(rig.left("h1").is_empty(), "partial: {:?}", rig.left("h1"));
    let stops = rig.stops();
    assert!(
        matches!(stops[..], [(_, BackupStopCause::DiskFull, n)] if n > 0),
        "{stops:?}"
    );
    rig.assert_audit_intact();
    // The space is back: the next, smaller backup works on the same state dir.
    let small = sparse(host_root.path(), "small", 64 * 1024);
    assert!(rig.backup("h1", &[small]).is_ok());
    rig.assert_audit_intact();

    // With a margin, the same stream stops before the disk is full.
    drop(rig);
    let state2 = fs.dir.path().join("state2");
    std::fs::create_dir(&state2).unwrap();
    let rig = Rig::new(
        &state2,
        BackupLimits {
            max_per_host: 1 << 40,
            max_per_run: 1 << 40,
            min_free: 512 * 1024,
        },
    );
    let msg = controller_message(rig.backup("h1", &[huge]).unwrap_err());
    assert!(msg.contains("disk full"), "{msg}");
    assert!(
        matches!(rig.stops()[..], [(_, BackupStopCause::LowSpace { .. }, _)]),
        "{:?}",
        rig.stops()
    );
    assert!(rig.left("h1").is_empty());
    rig.assert_audit_intact();
}

#[test]
fn a_controller_fault_stops_the_rollout_without_charging_the_host() {
    let policy = Policy::from_value(&serde_json::json!({
        "pilot": 0, "max_failed": 5, "parallel": 1
    }))
    .unwrap();
    let targets: Vec<Target> = ["a", "b", "c", "d"]
        .map(|n| Target::new(Host::new(n), vec![]))
        .to_vec();
    let plan = Plan::build(targets, &policy, 1).unwrap();
    let rolled_back = std::sync::Mutex::new(Vec::new());
    let summary = Executor::new(&plan)
        .run(
            |host, _| match host.name.as_str() {
                "b" => HostOutcome::ControllerFault {
                    reason: "disk full".into(),
                },
                _ => HostOutcome::Done,
            },
            |host, _| {
                rolled_back.lock().unwrap().push(host.name.clone());
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(
        summary.stop,
        StopReason::ControllerFault {
            host: "b".into(),
            reason: "disk full".into()
        }
    );
    assert_eq!(
        summary.totals.failed, 0,
        "the host was charged: {summary:?}"
    );
    assert_eq!(summary.totals.done, 1);
    assert_eq!(summary.totals.pending, 3);
    let b = summary.hosts.iter().find(|h| h.name == "b").unwrap();
    assert_eq!(b.state, HostStatus::Pending);
    assert_eq!(b.reason.as_deref(), Some("disk full"));
    assert!(rolled_back.lock().unwrap().is_empty());
    assert_eq!(summary.pending_hosts(), ["b", "c", "d"]);
}

#[test]
fn a_controller_fault_past_the_deadline_is_still_not_the_hosts() {
    let policy = Policy::from_value(&serde_json::json!({
        "pilot": 0, "max_failed": 0, "parallel": 1, "timeout": "1m"
    }))
    .unwrap();
    let targets: Vec<Target> = ["a", "b"]
        .map(|n| Target::new(Host::new(n), vec![]))
        .to_vec();
    let plan = Plan::build(targets, &policy, 1).unwrap();
    let clock = patchbook::rollout::Clock::manual(chrono::Utc::now());
    let summary = Executor::new(&plan)
        .clock(clock.clone())
        .run(
            |_, ctx| {
                // The stream ran long before the disk filled.
                ctx.clock.advance(std::time::Duration::from_secs(120));
                HostOutcome::ControllerFault {
                    reason: "disk full".into(),
                }
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert!(
        matches!(summary.stop, StopReason::ControllerFault { .. }),
        "{:?}",
        summary.stop
    );
    assert_eq!(summary.totals.failed, 0, "{summary:?}");
    assert_eq!(summary.totals.pending, 2);
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs root to mount a tmpfs: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn a_journal_append_on_a_full_disk_leaves_no_torn_line() {
    let fs = Tmpfs::mount("1m");
    let state = fs.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let journal = Journal::create(&state, "r1", "tester").unwrap();
    let path = state.join("runs").join("r1.jsonl");
    let stopped = |n: usize| {
        Entry::BackupStopped(patchbook::journal::entry::BackupStopped {
            paths: vec!["/root/huge".into()],
            cause: BackupStopCause::DiskFull,
            received: 0,
            message: "x".repeat(n),
        })
    };
    journal.append_entry(Some("h1"), &stopped(10)).unwrap();
    journal.flush().unwrap();
    // Fill the disk, leaving only the slack of the journal's last page.
    let filler = fs.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    let before = std::fs::metadata(&path).unwrap().len();
    assert_ne!(
        before % 4096,
        0,
        "the journal must end mid-page for this test"
    );
    let err = journal.append_entry(Some("h1"), &stopped(64 * 1024));
    assert!(err.is_err(), "the append should meet ENOSPC");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        before,
        "half a line stayed in the journal"
    );
    // Space back: the same journal goes on, and the record saying so lands.
    std::fs::remove_file(&filler).unwrap();
    journal.append_entry(Some("h1"), &stopped(10)).unwrap();
    journal.flush().unwrap();
    drop(journal);
    let report = patchbook::journal::audit::verify(&state, None).unwrap();
    assert!(report.intact(), "{report:?}");
    let records = patchbook::journal::read_records(&path).unwrap();
    // The two whole records, numbered without a gap; the failed one left nothing.
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
}
