//! Rollback: runs a host's undo steps for this run, newest first, and verifies the
//! result. The undo steps themselves are recorded by the steps they reverse (see
//! [`UndoStep`]); this module reads them back from the journal, the only place
//! they are kept, so a second rollback finds nothing left to do.

use std::time::Duration;

use serde::Serialize;

use super::backup::restore;
use super::facts::{facts, PackageManager};
use super::packages::{check_package, installed};
use super::{HostCtx, PrimitiveError};
use crate::journal::entry::StepResult;
use crate::journal::UndoStep;
use crate::transport::Command;

/// A short human description of an undo step, for reports and plans.
pub fn describe(undo: &UndoStep) -> String {
    match undo {
        UndoStep::Reinstall {
            package, version, ..
        } => format!("reinstall {package} {version}"),
        UndoStep::Restore { backups } => {
            format!(
                "restore backup {}",
                backups
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        UndoStep::Remove { package } => format!("remove {package}"),
        UndoStep::Command { argv } => format!("run `{}`", crate::transport::quote::argv(argv)),
        UndoStep::Manual { reason } => format!("manual: {reason}"),
        UndoStep::File { path, previous } => super::files::describe_undo(path, previous.as_ref()),
        UndoStep::Service { .. } => super::services::describe_undo(undo),
        UndoStep::Packages { versions } => super::upgrade::describe_versions(versions),
    }
}

/// What a rollback did on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RollbackReport {
    pub undone: Vec<String>,
    /// Undo steps that need a person.
    pub manual: Vec<String>,
}

impl RollbackReport {
    /// What was reversed and what is left to a person, for a host whose rollback
    /// could not reverse everything.
    pub fn partial(&self) -> String {
        let done = if self.undone.is_empty() {
            "nothing reversed".to_string()
        } else {
            format!("reversed: {}", self.undone.join(", "))
        };
        format!("{done}; needs a person: {}", self.manual.join("; "))
    }
}

/// Runs the host's pending undo steps for this run, newest first, verifying each.
/// Idempotent: steps already undone are not run again.
pub fn rollback(ctx: &HostCtx) -> Result<RollbackReport, PrimitiveError> {
    let mut report = RollbackReport::default();
    let Some(state) = ctx.journal_state()? else {
        return Ok(report);
    };
    for (id, undo) in state.undo_steps() {
        if let UndoStep::Manual { reason } = undo {
            report.manual.push(reason.clone());
            continue;
        }
        if ctx.planning() {
            ctx.plan("rollback", describe(undo), "unknown");
            continue;
        }
        let Some(journal) = &ctx.run.journal else {
            break;
        };
        let step = journal
            .undo_intent(ctx.name(), id, undo)
            .map_err(|source| PrimitiveError::Journal {
                host: ctx.name().to_string(),
                step: "rollback".into(),
                source: Box::new(source),
            })?;
        let result = apply(ctx, undo);
        ctx.outcome(
            "rollback",
            Some(step),
            result.is_ok(),
            &StepResult {
                undo: Some(describe(undo)),
                error: result.as_ref().err().map(|e| e.to_string()),
            },
            None,
        )?;
        result?;
        report.undone.push(describe(undo));
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
                            "{remote} hashes to {} on the host, expected {artifact_sha256}",
                            up.sha256
                        ),
                    ));
                }
                // `--replacepkgs`: a deploy that failed before rpm changed anything
                // leaves the old version in place, and reinstalling it must succeed.
                let argv: Vec<&str> = match pm {
                    PackageManager::Rpm => {
                        vec!["rpm", "-U", "--oldpackage", "--replacepkgs", "--", &remote]
                    }
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
            super::packages::verify(ctx, package, version)?;
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
        UndoStep::Command { argv } => {
            let out = ctx.transport.run(
                &Command::new(argv.iter().cloned()).timeout(ctx.timeout(Duration::from_secs(900))),
            )?;
            if !out.success() {
                return Err(PrimitiveError::failed(ctx.name(), "rollback", &out));
            }
            Ok(())
        }
        UndoStep::Manual { .. } => Ok(()),
        UndoStep::File { path, previous } => {
            super::files::restore_file(ctx, path, previous.as_ref())
        }
        UndoStep::Service {
            unit,
            was_active,
            was_enabled,
            ..
        } => super::services::restore_state(ctx, unit, *was_active, *was_enabled),
        UndoStep::Packages { versions } => super::upgrade::restore_versions(ctx, versions),
    }
}
