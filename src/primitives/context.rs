//! What a primitive needs to know about the run and the host it works on: the
//! transport, the journal, the state directory, and whether this is a `plan`.
//!
//! It owns the per-run caches (facts), the plan's list of would-be actions, what
//! the run's backups hold, and the hosts whose work stopped on a controller-side
//! fault. It must not decide policy: that is the rollout layer's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::backup::{BackupLimits, BackupUsage};
use super::facts::Facts;
use super::PrimitiveError;
use crate::inventory::Host;
use crate::journal::lock::HostClaims;
use crate::journal::state::HostHistory;
use crate::journal::{BackupRef, Entry, Journal, JournalError, Record, StepId, UndoStep};
use crate::transport::Transport;

/// Whether mutating primitives act or only record what they would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Plan,
}

/// The name `plan` lists actions under that belong to no host (notifications).
pub const CONTROLLER: &str = "(controller)";

/// One action a mutating primitive would have taken, in `plan` mode.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedAction {
    pub host: String,
    pub step: String,
    pub detail: String,
    /// `unknown` where the result cannot be known without acting.
    pub result: String,
    /// True for a change to the host; false for a check that `plan` does not run
    /// because what it would see depends on changes it does not make.
    pub change: bool,
}

/// Shared by every host of one run.
pub struct RunCtx {
    pub run_id: String,
    pub state_dir: PathBuf,
    pub journal: Option<Arc<Journal>>,
    pub mode: Mode,
    /// The playbook this run executes, for messages.
    pub playbook: String,
    /// How much backups may write to the controller's disk (`[backup]`).
    pub backup_limits: BackupLimits,
    /// The hosts this run holds (one run per host). A change claims its host
    /// before its intent is written, so no change ever runs on a host another run
    /// holds; `None` where nothing can change (no journal, tests).
    pub claims: Option<Arc<HostClaims>>,
    /// What this run's backups hold so far, per host and in all.
    pub(super) backup_usage: BackupUsage,
    /// Hosts whose work stopped on a controller-side fault (disk full, a backup
    /// cap), with the message: the rollout stops and charges no host with it.
    controller_faults: Mutex<HashMap<String, String>>,
    /// Hosts whose leftover staging folders this process has looked for.
    staging_checked: Mutex<std::collections::HashSet<String>>,
    facts: Mutex<HashMap<String, Facts>>,
    /// What the package query printed last for a host and package, in this run (see
    /// [`RunCtx::package_seen`]).
    packages_seen: Mutex<HashMap<(String, String), String>>,
    planned: Mutex<Vec<PlannedAction>>,
}

impl RunCtx {
    /// True the first time it is asked for `host`: whether this process still has
    /// to look for staging folders an interrupted attempt left there.
    pub fn first_staging(&self, host: &str) -> bool {
        self.staging_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string())
    }

    pub fn new(
        run_id: impl Into<String>,
        state_dir: PathBuf,
        journal: Option<Arc<Journal>>,
        mode: Mode,
    ) -> Self {
        RunCtx {
            run_id: run_id.into(),
            state_dir,
            journal,
            mode,
            playbook: String::new(),
            backup_limits: BackupLimits::default(),
            claims: None,
            backup_usage: BackupUsage::default(),
            controller_faults: Mutex::new(HashMap::new()),
            staging_checked: Mutex::new(std::collections::HashSet::new()),
            facts: Mutex::new(HashMap::new()),
            packages_seen: Mutex::new(HashMap::new()),
            planned: Mutex::new(Vec::new()),
        }
    }

    pub fn with_playbook(mut self, playbook: impl Into<String>) -> Self {
        self.playbook = playbook.into();
        self
    }

    pub fn with_backup_limits(mut self, limits: BackupLimits) -> Self {
        self.backup_limits = limits;
        self
    }

    pub fn with_claims(mut self, claims: Arc<HostClaims>) -> Self {
        self.claims = Some(claims);
        self
    }

    /// Claims `hosts` for this run, all or nothing (see [`HostClaims::claim`]).
    /// `plan` and runs without a journal change nothing and claim nothing.
    pub fn claim(&self, hosts: &[String]) -> Result<(), JournalError> {
        match (&self.claims, &self.journal, self.mode) {
            (Some(c), Some(_), Mode::Apply) => c.claim(hosts),
            _ => Ok(()),
        }
    }

    /// Notes that `host`'s work stopped on the controller's side, not the host's.
    pub fn note_controller_fault(&self, host: &str, message: impl Into<String>) {
        self.controller_faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), message.into());
    }

    /// The controller-side fault noted for `host`, once: the next call says `None`.
    pub fn take_controller_fault(&self, host: &str) -> Option<String> {
        self.controller_faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host)
    }

    pub fn cached_facts(&self, host: &str) -> Option<Facts> {
        self.facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned()
    }

    pub fn cache_facts(&self, host: &str, facts: Facts) {
        self.facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), facts);
    }

    /// What the package database said of `pkg` on `host` when this run last asked
    /// (the query's output, empty when it was absent). Only a hint: anything may have
    /// changed the package since, so a step that relies on it re-checks it on the
    /// host in the command that acts.
    pub fn package_seen(&self, host: &str, pkg: &str) -> Option<String> {
        self.packages_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(host.to_string(), pkg.to_string()))
            .cloned()
    }

    pub fn saw_package(&self, host: &str, pkg: &str, query_output: String) {
        self.packages_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((host.to_string(), pkg.to_string()), query_output);
    }

    pub fn planned(&self) -> Vec<PlannedAction> {
        self.planned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A step's typed input or output as the journal stores it. The payload types
/// (`journal::entry`) serialise to JSON objects; that cannot fail.
fn typed(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// One host's view of the run, handed to every primitive.
pub struct HostCtx<'a> {
    pub host: &'a Host,
    pub transport: &'a dyn Transport,
    pub run: &'a RunCtx,
    /// When the host's work must be done; commands get at most the time left.
    pub deadline: Option<Instant>,
}

impl HostCtx<'_> {
    pub fn name(&self) -> &str {
        &self.host.name
    }

    pub fn planning(&self) -> bool {
        self.run.mode == Mode::Plan
    }

    /// Records what a mutating step would do, instead of doing it.
    pub fn plan(&self, step: &str, detail: impl Into<String>, result: &str) {
        self.planned(step, detail.into(), result, true);
    }

    /// Records a check (verify, health) or a controller-side step (backup) that
    /// `plan` does not run; it changes nothing on the host.
    pub fn plan_check(&self, step: &str, detail: impl Into<String>, result: &str) {
        self.planned(step, detail.into(), result, false);
    }

    fn planned(&self, step: &str, detail: String, result: &str, change: bool) {
        self.run
            .planned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(PlannedAction {
                host: self.host.name.clone(),
                step: step.to_string(),
                detail,
                result: result.to_string(),
                change,
            });
    }

    /// Appends a record of what a step saw or kept (a backup, a verify, a health
    /// check) for this host. It announces no action on the host, so it is durable
    /// with the next group commit, at the latest before the host's next intent (see
    /// [`crate::journal::Journal::note`]). With no journal (unit tests, `eval`),
    /// nothing is written. `step` names the step in errors.
    pub fn record(&self, step: &str, entry: Entry) -> Result<Option<Record>, PrimitiveError> {
        match &self.run.journal {
            None => Ok(None),
            Some(j) => j
                .note_entry(Some(&self.host.name), &entry)
                .map(Some)
                .map_err(|source| PrimitiveError::Journal {
                    host: self.host.name.clone(),
                    step: step.to_string(),
                    source: Box::new(source),
                }),
        }
    }

    /// The command timeout for a step: its own, cut to the host's deadline.
    pub fn timeout(&self, step_timeout: std::time::Duration) -> std::time::Duration {
        match self.deadline {
            Some(d) => step_timeout.min(d.saturating_duration_since(Instant::now())),
            None => step_timeout,
        }
    }
}

impl HostCtx<'_> {
    fn journal_error(
        &self,
        step: &str,
    ) -> impl FnOnce(crate::journal::JournalError) -> PrimitiveError + '_ {
        let step = step.to_string();
        move |source| PrimitiveError::Journal {
            host: self.host.name.clone(),
            step,
            source: Box::new(source),
        }
    }

    /// Makes sure this run holds the host before `step` changes it. A rollout
    /// claims its whole target set before it starts; this catches a change made
    /// outside a rollout, on a host the run has not claimed yet.
    pub fn claim_host(&self, step: &str) -> Result<(), PrimitiveError> {
        self.run
            .claim(std::slice::from_ref(&self.host.name))
            .map_err(|source| PrimitiveError::HostBusy {
                host: self.host.name.clone(),
                step: step.to_string(),
                source: Box::new(source),
            })
    }

    /// Writes a step's intent, on disk before this returns; only then may the step
    /// act. `None` without a journal.
    pub fn intent(
        &self,
        step: &str,
        input: &impl Serialize,
    ) -> Result<Option<StepId>, PrimitiveError> {
        self.claim_host(step)?;
        match &self.run.journal {
            None => Ok(None),
            Some(j) => j
                .intent(&self.host.name, step, typed(input))
                .map(Some)
                .map_err(self.journal_error(step)),
        }
    }

    /// Writes what a step did, with the undo step that reverses it.
    pub fn outcome(
        &self,
        step: &str,
        intent: Option<StepId>,
        ok: bool,
        output: &impl Serialize,
        undo: Option<UndoStep>,
    ) -> Result<(), PrimitiveError> {
        match (&self.run.journal, intent) {
            (Some(j), Some(id)) => j
                .outcome(&self.host.name, id, ok, typed(output), undo)
                .map(|_| ())
                .map_err(self.journal_error(step)),
            _ => Ok(()),
        }
    }

    /// What the journal says about this host in this run so far.
    pub fn journal_state(&self) -> Result<Option<HostHistory>, PrimitiveError> {
        Ok(self
            .run
            .journal
            .as_ref()
            .map(|j| j.host_state(&self.host.name)))
    }

    /// The backups taken of this host in this run, oldest first, from the journal.
    pub fn backups(&self) -> Result<Vec<BackupRef>, PrimitiveError> {
        let Some(j) = &self.run.journal else {
            return Ok(Vec::new());
        };
        // A record that does not read as its kind is not a backup anyone can restore.
        Ok(j.host_records(&self.host.name)
            .iter()
            .filter_map(|r| match r.entry() {
                Ok(Entry::Backup(h)) => Some(h.as_ref_for_undo()),
                _ => None,
            })
            .collect())
    }
}
