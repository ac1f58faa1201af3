//! What the rollouts of one run share: the session, the clock, the maintenance
//! window, the stop flag, the event sink (progress display), the summaries the CLI
//! turns into an exit code, and — for `plan` — what each host would do or why it
//! could not be planned. Every rollout event goes to the journal as a
//! `rollout.event` record before the sink sees it; notifications go to the
//! [`Courier`] and never block the executor.
//!
//! It must not know Rhai: the script layer's `rollout()` adapts a playbook to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Courier, Session};
use crate::journal::entry::{Entry, ParamValue, RunParams, RunRefused};
use crate::journal::JournalError;
use crate::primitives::{notify, Mode};
use crate::rollout::{Clock, RolloutEvent, Summary, Window};

/// Receives every rollout event after the journal has it (progress display).
pub type EventSink = Arc<dyn Fn(DateTime<Utc>, &RolloutEvent) + Send + Sync>;

/// How one host fared in `plan`: planned, or why it could not be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPlan {
    pub host: String,
    /// The error that stopped the host's work in `plan`, with its position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How this process takes part in a rollout shared through the PostgreSQL store
/// (`script::fleet` does the work; this only says which part is this process's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetRole {
    /// `patchbook run --workers external`: plans the waves, writes the claims,
    /// opens each wave and decides the run's end; runs no host itself.
    Coordinator { url: String },
    /// `patchbook worker`: runs the hosts of the open wave it claims.
    Worker(WorkerSpec),
}

/// What a `patchbook worker` was started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    pub url: String,
    /// Names the worker in claims and records.
    pub id: String,
    /// Only hosts of this zone (and hosts of none); `None`: hosts of none only.
    pub zone: Option<String>,
    /// How long a claimed host stays this worker's without a renewal.
    pub lease: Duration,
}

/// What the rollouts of one run share.
pub struct RunControl {
    /// Set when the rollout is shared with workers through the store.
    fleet: Option<FleetRole>,
    /// A worker's part of the run is over (every wave done, or the run halted).
    fleet_over: AtomicBool,
    pub session: Arc<Session>,
    pub clock: Clock,
    /// Set to stop starting new hosts (SIGTERM); hosts in flight finish.
    pub stop: Arc<AtomicBool>,
    sink: EventSink,
    window: Mutex<Option<Window>>,
    summaries: Mutex<Vec<Summary>>,
    plans: Mutex<Vec<String>>,
    host_plans: Mutex<Vec<HostPlan>>,
    /// Hosts a resumed run must not touch again.
    finished: BTreeSet<String>,
    /// Hosts a resumed run had begun but not seen to the end (an open intent, a
    /// lost outcome, a failure not rolled back). The first rollout takes them back
    /// as targets even when the playbook's filter (`needing()`) drops them: only
    /// running their work again re-probes them and closes their open intents with
    /// what the host says, and a host left out would stay unknown forever.
    unfinished: Mutex<BTreeSet<String>>,
    first_failure: AtomicBool,
    started: Instant,
    /// `--param NAME=VALUE` from the command line, read with `param("NAME")`.
    vars: BTreeMap<String, String>,
    /// The `--param` values as given: a secret reference stays `${env:NAME}` here
    /// while `vars` holds what it read. What `run.params` records.
    given: BTreeMap<String, String>,
    params_recorded: AtomicBool,
    courier: Courier,
    /// When the controller last sampled its own usage.
    usage_pace: super::usage::Pace,
}

impl RunControl {
    pub fn new(session: Arc<Session>, clock: Clock, sink: EventSink) -> Self {
        // On resume, hosts the journal already saw to the end are not touched again;
        // the others it knows are taken back (see `unfinished`).
        let state = session.run.journal.as_ref().and_then(|j| j.state().ok());
        let mut finished = BTreeSet::new();
        let mut unfinished = BTreeSet::new();
        for (name, h) in state.iter().flat_map(|st| st.hosts.iter()) {
            // A host that could not be connected to before any step is neither:
            // the resume's probes and rollouts ask it again as if it were new.
            if h.finished && (!h.failed || h.rolled_back) {
                finished.insert(name.clone());
            } else if h.finished || !h.steps.is_empty() {
                unfinished.insert(name.clone());
            }
        }
        let courier = Courier::start(
            session.runtime.config.notify.clone(),
            session.run.journal.clone(),
        );
        RunControl {
            fleet: None,
            fleet_over: AtomicBool::new(false),
            session,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            sink,
            window: Mutex::new(None),
            summaries: Mutex::new(Vec::new()),
            plans: Mutex::new(Vec::new()),
            host_plans: Mutex::new(Vec::new()),
            finished,
            unfinished: Mutex::new(unfinished),
            first_failure: AtomicBool::new(false),
            started: Instant::now(),
            vars: Default::default(),
            given: Default::default(),
            params_recorded: AtomicBool::new(false),
            courier,
            usage_pace: super::usage::Pace::default(),
        }
    }

    /// Shares a stop flag with the caller (signals, the watch service).
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = stop;
        self
    }

    /// Shares this run's rollout with workers (or makes this process one).
    pub fn with_fleet(mut self, role: FleetRole) -> Self {
        self.fleet = Some(role);
        self
    }

    pub fn fleet(&self) -> Option<&FleetRole> {
        self.fleet.as_ref()
    }

    fn is_worker(&self) -> bool {
        matches!(self.fleet, Some(FleetRole::Worker(_)))
    }

    /// A worker says its part of the run is over; the playbook stops there.
    pub fn set_fleet_over(&self) {
        self.fleet_over.store(true, Ordering::SeqCst);
    }

    pub fn fleet_over(&self) -> bool {
        self.fleet_over.load(Ordering::SeqCst)
    }

    pub fn with_vars(mut self, vars: BTreeMap<String, String>) -> Self {
        self.vars = vars;
        self
    }

    /// The `--param` values as given (secret references unread), to be journaled
    /// by [`RunControl::record_params`].
    pub fn with_given_params(mut self, given: BTreeMap<String, String>) -> Self {
        self.given = given;
        self
    }

    /// Journals the run's `--param` values once (`run.params`), so `run --resume`
    /// and `run --retry` need not be given them again. Called when the first
    /// rollout starts, when the playbook has declared its secrets: a value marked
    /// secret by then is recorded as [`ParamValue::Secret`], never as itself, and a
    /// secret reference as the reference.
    pub fn record_params(&self) {
        if self.planning() || self.given.is_empty() || self.is_worker() {
            return;
        }
        if self.params_recorded.swap(true, Ordering::SeqCst) {
            return;
        }
        let secrets = self.session.secrets();
        let values = self
            .given
            .iter()
            .map(|(name, value)| {
                let kept = if is_secret_reference(value) {
                    ParamValue::Reference(value.clone())
                } else if secrets
                    .iter()
                    .any(|s| !s.is_empty() && value.contains(s.as_str()))
                {
                    ParamValue::Secret
                } else {
                    ParamValue::Plain(value.clone())
                };
                (name.clone(), kept)
            })
            .collect();
        self.record(None, Entry::RunParams(RunParams { values }));
    }

    /// The `--param` values as given (secret references unread): what a
    /// coordinator hands its workers.
    pub fn given_params(&self) -> BTreeMap<String, String> {
        self.given.clone()
    }

    /// `--param NAME`.
    pub fn var(&self, name: &str) -> Option<&String> {
        self.vars.get(name)
    }

    /// Every rollout summary of this run, in order.
    pub fn summaries(&self) -> Vec<Summary> {
        self.summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn push_summary(&self, s: Summary) {
        self.summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }

    /// The printed plans of this run's rollouts (`patchbook plan`).
    pub fn plans(&self) -> Vec<String> {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn push_plan(&self, plan: String) {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(plan);
    }

    /// In `plan`: every host the rollouts planned, in order, with its error if any.
    pub fn host_plans(&self) -> Vec<HostPlan> {
        self.host_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn push_host_plan(&self, p: HostPlan) {
        self.host_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p);
    }

    pub fn window(&self) -> Option<Window> {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_window(&self, w: Window) {
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
    }

    /// Whether a resumed run saw this host to the end before the restart.
    pub fn is_finished(&self, host: &str) -> bool {
        self.finished.contains(host)
    }

    pub fn has_finished_hosts(&self) -> bool {
        !self.finished.is_empty()
    }

    /// On resume: the hosts the journal knows but did not see to the end, handed
    /// out once (to the first rollout), in name order. Empty on a fresh run.
    pub fn take_unfinished(&self) -> Vec<String> {
        std::mem::take(&mut *self.unfinished.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn planning(&self) -> bool {
        self.session.run.mode == Mode::Plan
    }

    /// Records what the rollout saw or decided (a plan, a window, a notice). None of
    /// it is an action on a host, so it rides on the next group commit: every
    /// intent fsyncs all records before it.
    /// Claims a rollout's whole target set for this run before the rollout
    /// records or changes anything: all of it, or nothing and an error naming the
    /// runs (and their operators) that hold the busy hosts. A refusal is journaled
    /// as `run.refused`. `plan` claims nothing.
    pub fn claim_targets(&self, hosts: &[String]) -> Result<(), String> {
        match self.session.run.claim(hosts) {
            Ok(()) => Ok(()),
            Err(e) => {
                let busy = match &e {
                    JournalError::HostsBusy { busy }
                    | JournalError::WaitTimedOut { busy, .. }
                    | JournalError::WaitCancelled { busy } => Some(busy),
                    _ => None,
                };
                if let Some(busy) = busy {
                    self.record(
                        None,
                        Entry::RunRefused(RunRefused {
                            hosts: busy.hosts(),
                            holders: busy.held.iter().map(|(h, _)| h.clone()).collect(),
                            message: e.to_string(),
                        }),
                    );
                }
                Err(e.to_string())
            }
        }
    }

    pub fn record(&self, host: Option<&str>, entry: Entry) {
        // A worker writes its hosts' records; what the playbook says of the run
        // as a whole (its window, params, plan) the coordinator has written.
        if host.is_none() && self.is_worker() {
            return;
        }
        if let Some(j) = &self.session.run.journal {
            if let Err(e) = j.note_entry(host, &entry) {
                tracing::error!(error = %e, "cannot write the journal; stopping new hosts");
                self.stop.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Hands a notice to the courier; never waits for delivery. `plan` sends nothing.
    pub fn notify(&self, notice: notify::Notice, owners: Vec<String>) {
        if self.planning() {
            return;
        }
        self.courier.send(notice, owners, self.session.secrets());
    }

    /// Waits for every queued notification; call before closing the journal.
    pub fn finish(&self) {
        self.courier.finish();
    }

    fn owners_of(&self, hosts: &[String]) -> Vec<String> {
        let inv = &self.session.runtime.inventory;
        let mut out: Vec<String> = Vec::new();
        for h in hosts {
            for o in inv.host(h).map(|h| h.owners.clone()).unwrap_or_default() {
                if !out.contains(&o) {
                    out.push(o);
                }
            }
        }
        out
    }

    /// Journals a rollout event, shows it, and sends the notices it calls for.
    pub fn on_event(&self, at: DateTime<Utc>, event: &RolloutEvent, targets: &[String]) {
        let host = match event {
            RolloutEvent::HostStarted { host, .. }
            | RolloutEvent::HostDone { host, .. }
            | RolloutEvent::HostFailed { host, .. }
            | RolloutEvent::HostUnreachable { host, .. }
            | RolloutEvent::RolledBack { host, .. }
            | RolloutEvent::RollbackFailed { host, .. } => Some(host.as_str()),
            _ => None,
        };
        if !self.planning() {
            // Progress announces no action: it rides on the next group commit.
            if let Some(j) = &self.session.run.journal {
                if let Err(e) = j.note_entry(host, &Entry::Rollout(event.clone())) {
                    tracing::error!(error = %e, "cannot write the journal; stopping new hosts");
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
        }
        (self.sink)(at, event);
        // A pause or soak between waves is sampled too: the console shows the
        // controller's figures while the run waits, with the wave's connections.
        let edge = matches!(
            event,
            RolloutEvent::RunStarted { .. }
                | RolloutEvent::WaveStarted { .. }
                | RolloutEvent::Paused { .. }
                | RolloutEvent::Soaking { .. }
                | RolloutEvent::RunDone { .. }
        );
        if !self.planning() && self.usage_pace.due(edge) {
            if let Some(u) = super::usage::read(at) {
                self.record(None, Entry::ControllerUsage(u));
            }
        }
        let run = self.session.run.run_id.clone();
        match event {
            RolloutEvent::RunStarted { .. } => self.notify(
                notify::RunStarted {
                    run,
                    playbook: self.session.run.playbook.clone(),
                    operator: self.session.runtime.operator.clone(),
                    targets: targets.to_vec(),
                    window: self.window().map(|w| w.spec().to_string()),
                }
                .notice(),
                Vec::new(),
            ),
            RolloutEvent::HostFailed { host, reason, .. }
                if !self.first_failure.swap(true, Ordering::SeqCst) =>
            {
                self.notify(
                    notify::FirstFailure {
                        run,
                        host: host.clone(),
                        step: None,
                        reason: reason.clone(),
                        action: Some("rolling the host back".into()),
                    }
                    .notice(),
                    self.owners_of(std::slice::from_ref(host)),
                )
            }
            RolloutEvent::BudgetExhausted { allowed, .. } => {
                let failed = self.failed_so_far();
                self.notify(
                    notify::BudgetExhausted {
                        run,
                        failed_hosts: failed.clone(),
                        unreachable: false,
                        targets: targets.len(),
                        budget: allowed.to_string(),
                        action: Some("no new hosts start; failed hosts are rolled back".into()),
                    }
                    .notice(),
                    self.owners_of(&failed),
                )
            }
            RolloutEvent::UnreachableBudgetExhausted { allowed, .. } => {
                let gone = self.unreachable_so_far();
                self.notify(
                    notify::BudgetExhausted {
                        run,
                        failed_hosts: gone.clone(),
                        unreachable: true,
                        targets: targets.len(),
                        budget: allowed.to_string(),
                        action: Some("no new hosts start; `patchbook run --retry` works on them once they answer".into()),
                    }
                    .notice(),
                    self.owners_of(&gone),
                )
            }
            _ => {}
        }
    }

    /// Hosts of this run the journal says could not be connected to so far.
    fn unreachable_so_far(&self) -> Vec<String> {
        let Some(j) = &self.session.run.journal else {
            return Vec::new();
        };
        j.state()
            .map(|st| st.unreachable_hosts())
            .unwrap_or_default()
    }

    /// Hosts that failed so far in this run, from its summaries in memory and the
    /// rollout under way: the journal's host-finish records say which.
    fn failed_so_far(&self) -> Vec<String> {
        let Some(j) = &self.session.run.journal else {
            return Vec::new();
        };
        j.state()
            .map(|st| {
                st.hosts
                    .iter()
                    .filter(|(_, h)| h.finished && h.failed)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A whole `--param` value that names a secret instead of holding it:
/// `${env:NAME}` or `${file:PATH}`. It is read when the run starts and journaled
/// as written.
pub fn is_secret_reference(value: &str) -> bool {
    value
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .and_then(|v| v.split_once(':'))
        .is_some_and(|(kind, what)| {
            matches!(kind, "env" | "file") && !what.is_empty() && !what.contains('}')
        })
}

#[cfg(test)]
mod tests {
    use super::is_secret_reference;

    #[test]
    fn only_whole_env_or_file_references_are_secret_references() {
        assert!(is_secret_reference("${env:TOKEN}"));
        assert!(is_secret_reference("${file:/run/secrets/pin}"));
        assert!(!is_secret_reference("${env:}"));
        assert!(!is_secret_reference("x${env:TOKEN}"));
        assert!(!is_secret_reference("${vault:TOKEN}"));
        assert!(!is_secret_reference("plain"));
    }
}
