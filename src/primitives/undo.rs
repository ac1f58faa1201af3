//! Undo steps and rollback. Every mutating step records, with its intent, the
//! step that reverses it; `rollback(host)` reads them back from the journal — the
//! only place they are kept — and runs them newest first, then verifies.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backup::{restore, BackupHandle};
use super::facts::{facts, PackageManager};
use super::packages::{check_package, installed};
use super::{HostCtx, PrimitiveError};
use crate::journal::Record;
use crate::transport::Command;

/// What reverses one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UndoStep {
    /// Install this package file again (the version that was there before).
    Reinstall {
        package: String,
        /// The version expected after the reinstall, for verification.
        version: Option<String>,
        artifact_path: PathBuf,
        artifact_sha256: String,
    },
    /// Put these backups back, newest first.
    Restore { backups: Vec<BackupHandle> },
    /// The package was not installed before: remove it.
    Remove { package: String },
    /// Nothing automatic can reverse the step; the run reports it.
    Manual { reason: String },
}

impl UndoStep {
    pub fn describe(&self) -> String {
        match self {
            UndoStep::Reinstall {
                package, version, ..
            } => {
                format!(
                    "reinstall {package} {}",
                    version.as_deref().unwrap_or("(previous file)")
                )
            }
            UndoStep::Restore { backups } => {
                format!(
                    "restore {}",
                    backups
                        .iter()
                        .map(|b| b.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            UndoStep::Remove { package } => format!("remove {package}"),
            UndoStep::Manual { reason } => format!("manual: {reason}"),
        }
    }
}

/// One intent of a run whose undo step has not been carried out yet.
#[derive(Debug, Clone)]
pub struct PendingUndo {
    /// `seq` of the step's intent record.
    pub intent: u64,
    pub step: String,
    pub undo: UndoStep,
}

/// The host's undo steps still to run, newest first, derived from the records.
/// An intent without an outcome counts: the step may have acted before a crash.
pub fn pending_undos(records: &[Record], host: &str) -> Vec<PendingUndo> {
    let mine = records.iter().filter(|r| r.host.as_deref() == Some(host));
    let mut pending: Vec<PendingUndo> = Vec::new();
    let mut done: Vec<u64> = Vec::new();
    for r in mine {
        match r.kind.as_str() {
            "step.intent" => {
                if let Some(undo) = r
                    .data
                    .get("undo")
                    .and_then(|u| serde_json::from_value::<UndoStep>(u.clone()).ok())
                {
                    let step = r
                        .data
                        .get("step")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    pending.push(PendingUndo {
                        intent: r.seq,
                        step,
                        undo,
                    });
                }
            }
            "undo.outcome" if r.data.get("ok").and_then(Value::as_bool) == Some(true) => {
                if let Some(seq) = r.data.get("intent").and_then(Value::as_u64) {
                    done.push(seq);
                }
            }
            _ => {}
        }
    }
    pending.retain(|p| !done.contains(&p.intent));
    pending.reverse();
    pending
}

/// What a rollback did on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RollbackReport {
    pub undone: Vec<String>,
    /// Undo steps that need a person.
    pub manual: Vec<String>,
}

/// Runs the host's pending undo steps for this run, newest first, verifying each.
/// Idempotent: steps already undone are not run again.
pub fn rollback(ctx: &HostCtx) -> Result<RollbackReport, PrimitiveError> {
    let records = ctx.records()?;
    let mut report = RollbackReport::default();
    for p in pending_undos(&records, ctx.name()) {
        if let UndoStep::Manual { reason } = &p.undo {
            report.manual.push(reason.clone());
            continue;
        }
        if ctx.planning() {
            ctx.plan("rollback", p.undo.describe(), "unknown");
            continue;
        }
        let intent = ctx.record(
            "rollback",
            "undo.intent",
            serde_json::json!({ "intent": p.intent, "step": p.step, "undo": p.undo }),
        )?;
        let result = apply(ctx, &p.undo);
        ctx.record(
            "rollback",
            "undo.outcome",
            serde_json::json!({
                "intent": p.intent,
                "undo_intent": intent.map(|r| r.seq),
                "ok": result.is_ok(),
                "error": result.as_ref().err().map(|e| e.to_string()),
            }),
        )?;
        result?;
        report.undone.push(p.undo.describe());
    }
    Ok(report)
}

fn apply(ctx: &HostCtx, undo: &UndoStep) -> Result<(), PrimitiveError> {
    match undo {
        UndoStep::Reinstall {
            package,
            version,
            artifact_path,
            artifact_sha256,
        } => {
            let pm = facts(ctx)?.package_manager;
            let tmp = super::backup::private_tmpdir(ctx, "rollback")?;
            let name = artifact_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "artifact".into());
            let remote = format!("{tmp}/{name}");
            let result = (|| {
                let up = ctx.transport.put(artifact_path, &remote, 0o600)?;
                if &up.sha256 != artifact_sha256 {
                    return Err(PrimitiveError::step(
                        ctx.name(),
                        "rollback",
                        format!(
                            "{} hashes to {} on the host, expected {artifact_sha256}",
                            remote, up.sha256
                        ),
                    ));
                }
                let argv: Vec<&str> = match pm {
                    PackageManager::Rpm => vec!["rpm", "-U", "--oldpackage", "--", &remote],
                    _ => vec!["dpkg", "-i", "--", &remote],
                };
                let out = ctx
                    .transport
                    .run(&Command::new(argv).timeout(ctx.timeout(Duration::from_secs(900))))?;
                if !out.success() {
                    return Err(PrimitiveError::failed(ctx.name(), "rollback", &out));
                }
                Ok(())
            })();
            let _ = ctx
                .transport
                .run(&Command::new(["rm", "-rf", "--", &tmp]).timeout(Duration::from_secs(60)));
            result?;
            if let Some(v) = version {
                super::packages::verify(ctx, package, v)?;
            }
            Ok(())
        }
        UndoStep::Restore { backups } => {
            for b in backups.iter().rev() {
                restore(ctx, b)?;
            }
            Ok(())
        }
        UndoStep::Remove { package } => {
            let pm = facts(ctx)?.package_manager;
            check_package("rollback", pm, package)?;
            let argv: Vec<&str> = match pm {
                PackageManager::Rpm => vec!["rpm", "-e", "--", package],
                _ => vec!["dpkg", "--purge", "--", package],
            };
            let out = ctx
                .transport
                .run(&Command::new(argv).timeout(ctx.timeout(Duration::from_secs(900))))?;
            if !out.success() {
                return Err(PrimitiveError::failed(ctx.name(), "rollback", &out));
            }
            if installed(ctx, package)?.is_some() {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    "rollback",
                    format!("{package} is still installed after removal"),
                ));
            }
            Ok(())
        }
        UndoStep::Manual { .. } => Ok(()),
    }
}
