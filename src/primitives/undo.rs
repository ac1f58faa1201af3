//! Rollback: runs a host's undo steps for this run, newest first, and verifies the
//! result. The undo steps themselves are recorded by the steps they reverse (see
//! [`UndoStep`]); this module reads them back from the journal, the only place
//! they are kept, so a second rollback finds nothing left to do.
//!
//! Before it applies an undo it checks that the host is still in the state the step
//! left (the package version it installed, the file hash it wrote); when another run
//! or a person changed it since, the undo is left to a person and recorded as
//! `undo.skipped`, because reverting would destroy work this run did not do. It must
//! not decide which hosts to roll back or in what order: the rollout and the CLI do.

use std::time::Duration;

use serde::Serialize;

use super::backup::restore;
use super::facts::{facts, PackageManager};
use super::packages::{check_package, installed};
use super::{HostCtx, PrimitiveError};
use crate::journal::entry::{Entry, StepResult, UndoSkipped};
use crate::journal::state::StepState;
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
        let done = state.steps.iter().find(|s| s.id == id);
        if let Some(drift) = done.map(|s| drifted(ctx, s)).transpose()?.flatten() {
            let reason = format!(
                "{}, this run {}: not reverting a state this run did not create ({} left to a person)",
                drift.found,
                drift.expected,
                describe(undo)
            );
            journal
                .append_entry(
                    Some(ctx.name()),
                    &Entry::UndoSkipped(UndoSkipped {
                        step_id: id,
                        step: done.map(|s| s.step.clone()).unwrap_or_default(),
                        undo: describe(undo),
                        found: drift.found,
                        expected: drift.expected,
                        reason: reason.clone(),
                    }),
                )
                .map_err(|source| PrimitiveError::Journal {
                    host: ctx.name().to_string(),
                    step: "rollback".into(),
                    source: Box::new(source),
                })?;
            report.manual.push(reason);
            continue;
        }
        ctx.claim_host("rollback")?;
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

/// How the host differs from what a step left, in words for a person.
struct Drift {
    /// `acme-agent is 1.0.2`.
    found: String,
    /// `installed 1.0.1`.
    expected: String,
}

/// Whether the host has moved on from the state `step` left it in. `None`: it is
/// as the step left it (or as it was before, when the step may not have acted),
/// so its undo reverses only this run's work.
///
/// Services are not checked: a unit's active/enabled state changes by itself
/// (crashes, timers, other units), so a difference says nothing about who changed
/// it, and restoring it is harmless to another run's package or file. `exec` and
/// `shell` changes are not checked either: patchbook does not know what they left.
fn drifted(ctx: &HostCtx, step: &StepState) -> Result<Option<Drift>, PrimitiveError> {
    let outcome = step.outcome_data.as_ref();
    // A step whose outcome was not recorded, or that failed, may have left the
    // host as it found it or as it meant to leave it: both are this run's doing.
    let settled = outcome.is_some_and(|o| o.ok);
    if let Some(input) = step.intent_data.deploy_input() {
        let read_back = outcome.and_then(|o| o.deploy_output());
        let after = read_back.as_ref().and_then(|o| o.after.clone());
        let mut left: Vec<Option<String>> = match (&read_back, settled) {
            // The version read back after the step is what it left, success or not;
            // `None` there means the package was not installed afterwards (a custom
            // method that installs no package), which is what the run left.
            (Some(o), true) => vec![o.after.clone()],
            (Some(o), false) => vec![o.after.clone(), input.from.clone()],
            (None, _) => vec![Some(input.to.clone()), input.from.clone()],
        };
        left.dedup();
        let now = installed(ctx, &input.package)?.map(|i| i.version);
        if left.contains(&now) {
            return Ok(None);
        }
        return Ok(Some(Drift {
            found: match &now {
                Some(v) => format!("{} is {v}", input.package),
                None => format!("{} is not installed", input.package),
            },
            expected: match (&after, settled) {
                (Some(a), true) => format!("installed {a}"),
                (Some(a), false) => format!("left {a}"),
                (None, _) if read_back.is_some() => {
                    format!("left {} not installed", input.package)
                }
                (None, _) => format!("installed {}", input.to),
            },
        }));
    }
    if let Some(input) = step.intent_data.file_input() {
        let wrote = match input.action.as_str() {
            "write" => input.sha256.clone(),
            _ => None,
        };
        let mut left = vec![wrote.clone()];
        if !settled {
            if let UndoStep::File { previous, .. } = &input.undo {
                left.push(previous.as_ref().map(|p| p.sha256.clone()));
            }
        }
        let now = file_sha256(ctx, &input.path)?;
        if left.contains(&now) {
            return Ok(None);
        }
        let say = |h: &Option<String>| match h {
            Some(h) => format!("sha256 {h}"),
            None => "absent".to_string(),
        };
        return Ok(Some(Drift {
            found: format!("{} is {}", input.path, say(&now)),
            expected: match &wrote {
                Some(h) => format!("wrote sha256 {h}"),
                None => "removed it".into(),
            },
        }));
    }
    if let Some(after) = outcome.and_then(|o| o.upgrade_after()) {
        let mut found = Vec::new();
        let mut expected = Vec::new();
        for (package, want) in &after {
            let now = installed(ctx, package)?.map(|i| i.version);
            if &now != want {
                let say = |v: &Option<String>| v.clone().unwrap_or_else(|| "absent".into());
                found.push(format!("{package} is {}", say(&now)));
                expected.push(format!("{package} {}", say(want)));
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Drift {
            found: found.join(", "),
            expected: format!("upgraded to {}", expected.join(", ")),
        }));
    }
    Ok(None)
}

/// The SHA-256 of the regular file at `path` on the host, `None` when it is absent.
/// A symlink or special file is reported as such, so it never matches a hash.
fn file_sha256(ctx: &HostCtx, path: &str) -> Result<Option<String>, PrimitiveError> {
    const SCRIPT: &str = r#"p=$1
if [ -L "$p" ]; then printf 'link\n'; exit 0; fi
[ -e "$p" ] || { printf 'absent\n'; exit 0; }
[ -f "$p" ] || { printf 'special\n'; exit 0; }
h=$(sha256sum < "$p") || exit 92
printf 'file %s\n' "${h%% *}""#;
    let out = ctx.transport.run(
        &Command::script(SCRIPT, "patchbook-hash", &[path])
            .timeout(ctx.timeout(Duration::from_secs(120))),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            &format!("rollback: hash {path}"),
            &out,
        ));
    }
    let text = out.stdout_str();
    let line = text.trim();
    Ok(match line.split_once(' ') {
        Some(("file", h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(h.to_string())
        }
        _ if line == "absent" => None,
        // Not a hash any step could have written: it differs from every expectation.
        _ => Some(format!("({})", crate::primitives::cut(line, 40))),
    })
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
