//! Issue 18, items 6 and 10, on real sshd lab hosts.
//!
//! - Item 6: a host whose backup path streams far more than `[backup]
//!   max_per_host` (a large sparse file in its own /root, read as zeros) stops the
//!   rollout as a controller-side fault: no host is charged to the failure budget
//!   or rolled back, the hosts stay pending for `run --resume`, no partial archive
//!   stays, the journal says "backup cap reached" and `audit verify` finds it intact.
//! - Item 10: archives that GNU tar on the host would read differently from the
//!   controller's check (a pax `GNU.sparse.name`, a symlink resolving outside the
//!   backed-up paths) are refused, nothing changes on the host (fingerprinted), and
//!   a real backup/restore round trip with a long name and a link still works.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchbook::inventory::Host;
use patchbook::journal::entry::BackupStopCause;
use patchbook::journal::{BackupRef, Entry, Journal, RunHeader};
use patchbook::lab::Fleet;
use patchbook::primitives::backup::{backup, restore};
use patchbook::primitives::{Mode, RunCtx};
use patchbook::rollout::StopReason;
use patchbook::run::Session;
use patchbook::runtime::{Options, Runtime};
use sha2::Digest;

fn fleet() -> &'static Fleet {
    support::shared_fleet(3)
}

/// A journaled session on the lab with the lab's config plus `extra` settings.
struct LabRun {
    _state: tempfile::TempDir,
    session: Arc<Session>,
    journal: Arc<Journal>,
}

impl LabRun {
    fn new(f: &Fleet, config_name: &str, extra: &str) -> LabRun {
        let base = std::fs::read_to_string(f.dir().join("patchbook.toml")).unwrap();
        // Beside the lab's own config, so its relative paths still resolve.
        let config = f.dir().join(config_name);
        std::fs::write(&config, format!("{base}\n{extra}\n")).unwrap();
        let state = tempfile::tempdir().unwrap();
        let opts = Options {
            config: Some(config),
            state_dir: Some(state.path().to_path_buf()),
            operator: Some("tester".into()),
            forks: Some(1),
            ..Options::default()
        };
        let rt = Arc::new(Runtime::build(&opts).unwrap_or_else(|e| panic!("{e}")));
        let header = RunHeader::new(
            PathBuf::from("<lab>"),
            "0".repeat(64),
            BTreeMap::new(),
            "0".repeat(64),
            serde_json::Value::Null,
        );
        let journal = Arc::new(Journal::begin(state.path(), "r1", "tester", &header).unwrap());
        let session = Arc::new(Session::new(
            rt,
            RunCtx::new(
                "r1",
                state.path().to_path_buf(),
                Some(journal.clone()),
                Mode::Apply,
            ),
        ));
        LabRun {
            _state: state,
            session,
            journal,
        }
    }

    fn entries(&self) -> Vec<(Option<String>, Entry)> {
        self.journal
            .records()
            .unwrap()
            .into_iter()
            .map(|r| (r.host.clone(), r.entry().unwrap()))
            .collect()
    }

    fn host(&self, name: &str) -> Host {
        self.session.runtime.inventory.host(name).unwrap().clone()
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn sh(f: &Fleet, host: &str, script: &str) {
    let out = f.exec_in(host, &["sh", "-c", script]).unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A project folder with the lab's config plus `extra`, run through the binary.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(f: &Fleet, extra: &str) -> Project {
        let dir = tempfile::Builder::new()
            .prefix("backup-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let lab = std::fs::read_to_string(f.dir().join("patchbook.toml")).unwrap();
        let lab = lab.replace(
            "inventory = [\"inventory.toml\"]",
            &format!(
                "inventory = [\"{}\"]",
                f.dir().join("inventory.toml").display()
            ),
        );
        std::fs::write(
            dir.path().join("patchbook.toml"),
            format!(
                "stdlib = \"{}/stdlib\"\n{lab}\n{extra}\n",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
        .unwrap();
        Project { dir }
    }

    fn patchbook(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"))
            .arg("--config")
            .arg(self.dir.path().join("patchbook.toml"))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(args)
            .output()
            .expect("patchbook runs")
    }
}

#[test]
fn an_endless_backup_stops_the_rollout_without_charging_the_hosts() {
    let f = fleet();
    for h in ["lab01", "lab02"] {
        // 256 MiB of zeros for tar, no disk for the host.
        sh(f, h, "truncate -s 256M /root/huge");
    }
    let p = Project::new(f, "[backup]\nmax_per_host = \"4MiB\"\nmin_free = 0");
    let pb = p.dir.path().join("play.rhai");
    std::fs::write(
        &pb,
        r#"rollout(hosts("lab01:lab02"), #{ max_failed: 0, parallel: 1 }, |h| {
    backup(h, ["/root/huge"]);
    exec(h, ["touch", "/root/after-backup"]);
});
"#,
    )
    .unwrap();
    let out = p.patchbook(&["run", &pb.display().to_string()]);
    for h in ["lab01", "lab02"] {
        sh(f, h, "rm -f /root/huge");
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(said.contains("backup cap reached"), "{said}");
    assert!(!said.contains("1 failed"), "a host was charged: {said}");
    // The work after the backup never ran, on either host.
    for h in ["lab01", "lab02"] {
        let out = f.exec_in(h, &["test", "-e", "/root/after-backup"]).unwrap();
        assert!(
            !out.status.success(),
            "{h} went on after the backup stopped"
        );
    }

    let state = p.dir.path().join("state");
    let runs: Vec<PathBuf> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let entries: Vec<(Option<String>, Entry)> = patchbook::journal::read_records(&runs[0])
        .unwrap()
        .into_iter()
        .map(|r| (r.host.clone(), r.entry().unwrap()))
        .collect();
    let stops: Vec<_> = entries
        .iter()
        .filter_map(|(h, e)| match e {
            Entry::BackupStopped(s) => Some((h.clone(), s.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(
        stops[0].1.cause,
        BackupStopCause::HostCap { limit: 4 << 20 }
    );
    assert!(
        !entries
            .iter()
            .any(|(_, e)| matches!(e, Entry::HostFinish(_) | Entry::HostRollback(_))),
        "a host end was recorded, so resume would skip it"
    );
    let summary = entries
        .iter()
        .find_map(|(_, e)| match e {
            Entry::Rollout(patchbook::journal::entry::RolloutEvent::RunDone { summary }) => {
                Some(summary.clone())
            }
            _ => None,
        })
        .expect("the rollout's summary is journaled");
    assert!(
        matches!(&summary.stop, StopReason::ControllerFault { reason, .. } if reason.contains("backup cap reached")),
        "{:?}",
        summary.stop
    );
    assert_eq!(summary.totals.failed, 0);
    assert_eq!(summary.totals.rolled_back, 0);
    assert_eq!(summary.pending_hosts().len(), 2, "{summary:?}");
    let left = files_under(&state.join("backups"));
    assert!(left.is_empty(), "partial archives stay: {left:?}");
    let audit = p.patchbook(&["audit", "verify"]);
    assert_eq!(
        audit.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
}

/// A tar with one regular entry `name` whose pax header carries `records`.
fn pax_archive(path: &Path, name: &str, records: &[(&str, &str)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(7);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    b.append_data(&mut h, name, &b"PWNED!\n"[..]).unwrap();
    b.finish().unwrap();
}

/// A tar with a symlink `name -> target` and a file written through it.
fn link_archive(path: &Path, name: &str, target: &str) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    l.set_mode(0o777);
    l.set_uid(0);
    l.set_gid(0);
    l.set_mtime(1);
    b.append_link(&mut l, name, target).unwrap();
    b.finish().unwrap();
}

#[test]
fn restore_refuses_what_the_hosts_tar_would_read_differently() {
    let f = fleet();
    let name = "lab03";
    let lab = LabRun::new(f, "patchbook-restore.toml", "");
    let host = lab.host(name);
    let before = support::host_fingerprint(f, name);
    let tmp = tempfile::tempdir().unwrap();

    let sparse = tmp.path().join("sparse.tar");
    pax_archive(
        &sparse,
        "opt/acme/innocent",
        &[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "root/PWNED_restore"),
            ("GNU.sparse.realsize", "7"),
        ],
    );
    let rootlink = tmp.path().join("rootlink.tar");
    link_archive(&rootlink, "opt/acme/rootlink", "../../root");
    let up = tmp.path().join("up.tar");
    link_archive(&up, "opt/acme/up", "..");
    for archive in [&sparse, &rootlink, &up] {
        let handle = BackupRef {
            id: "b999".into(),
            archive: archive.clone(),
            sha256: hex::encode(sha2::Sha256::digest(std::fs::read(archive).unwrap())),
            paths: vec!["/opt/acme".into()],
        };
        let err = lab
            .session
            .with_host(&host, |ctx| restore(ctx, &handle))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refused"), "{}: {err}", archive.display());
    }
    assert!(
        !lab.entries()
            .iter()
            .any(|(_, e)| matches!(e, Entry::StepIntent(_))),
        "a refused restore was started"
    );
    let out = f
        .exec_in(name, &["test", "-e", "/root/PWNED_restore"])
        .unwrap();
    assert!(!out.status.success(), "/root/PWNED_restore was written");
    assert_eq!(
        support::host_fingerprint(f, name),
        before,
        "the host changed"
    );

    // A real round trip through the rebuilt archive: a name longer than a plain
    // header holds, a link inside the backed-up path, modes kept.
    let long = "n".repeat(150);
    sh(
        f,
        name,
        &format!(
            "mkdir -p /opt/acme/rt && printf one > /opt/acme/rt/{long} && chmod 0640 /opt/acme/rt/{long} && ln -sfn {long} /opt/acme/rt/link"
        ),
    );
    let b = lab
        .session
        .with_host(&host, |ctx| backup(ctx, &["/opt/acme/rt".to_string()]))
        .unwrap();
    sh(
        f,
        name,
        &format!("printf two > /opt/acme/rt/{long} && chmod 0644 /opt/acme/rt/{long} && rm /opt/acme/rt/link"),
    );
    lab.session
        .with_host(&host, |ctx| restore(ctx, &b.as_ref_for_undo()))
        .unwrap();
    let out = f
        .exec_in(
            name,
            &[
                "sh",
                "-c",
                &format!("cat /opt/acme/rt/link; stat -c ' %a' /opt/acme/rt/{long}; readlink /opt/acme/rt/link"),
            ],
        )
        .unwrap();
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    sh(f, name, "rm -rf /opt/acme/rt");
    assert_eq!(seen, format!("one 640\n{long}\n"));
    assert_eq!(
        support::host_fingerprint(f, name),
        before,
        "the round trip left something behind"
    );
}
