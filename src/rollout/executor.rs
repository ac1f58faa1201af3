//! The executor: runs a [`Plan`] with a per-host closure on a bounded pool of
//! `parallel` worker threads, under the failure budget, the window and the gates,
//! and reports every state change as a [`RolloutEvent`].
//!
//! A run, in order:
//! 1. Outside its window the run is refused ([`RolloutError::OutsideWindow`], the
//!    next opening in the window's zone) before anything starts.
//! 2. For each wave (pilot first): after the previous wave, `pause`, then the
//!    metric gate's soak and evaluation ([`super::gate`]), then the closure gate
//!    (`Ok(true)` goes on; `Ok(false)` or `Err` stops the run as if the budget were
//!    spent; each evaluation is a `GateEvaluated` event). A failed gate with
//!    `on_gate_fail: "rollback_wave"` also rolls back the previous wave's hosts,
//!    newest first. With [`Executor::gate_before_first_wave`] (a resume) the
//!    gates are asked, without soak, before the first wave too. Then the window
//!    check; then the wave's hosts run under the [`schedule`](super::schedule) rules.
//! 3. Window check: the wave starts only if
//!    `time_left ≥ estimate + buffer`, with
//!    `estimate = per_host × ceil(wave_size / parallel)` and `per_host` the longest
//!    per-host duration seen so far in this run (pilot and earlier waves), or the
//!    policy's `estimate` (default 1m) before any host finished. Otherwise the run
//!    stops cleanly: no host of that wave starts, the rest stay pending for a resume,
//!    nothing is rolled back.
//! 4. A host whose closure returns [`HostOutcome::Failed`], panics, or returns after
//!    its deadline (`timeout`) has failed. Its rollback runs at once on the same
//!    worker; the host stays unavailable (in flight) until the rollback is over.
//!    Each failure counts against the budget ([`budget`](super::budget)); at failure
//!    number `allowed + 1` no new host starts, in-flight hosts finish (their failures
//!    still count and are still rolled back).
//! 5. A host whose closure returns [`HostOutcome::Unreachable`] could not be
//!    connected to: it is not rolled back (nothing can reach it) and counts against
//!    the unreachable budget (`max_unreachable`) instead, exhausted the same way;
//!    hosts a probe found unreachable before the rollout
//!    ([`Executor::unreachable_before`]) are in the summary and count from the start.
//!    Any failure in the pilot, an unreachable pilot host included, stops the run
//!    before wave 1.
//!    A [`HostOutcome::ControllerFault`] (the controller's disk, a backup cap) is
//!    no failure of the host: nothing is charged to the budget or rolled back, no
//!    new host starts, in-flight hosts finish, and the host stays pending with the
//!    rest ([`StopReason::ControllerFault`]) for `run --resume`.
//! 6. After a stop for budget, pilot failure or gate, with `rollback: "all"`, every
//!    host that succeeded in this run is rolled back too, one at a time, in reverse
//!    order of completion (the host that finished last is undone first).
//!    Hosts that never started are reported as pending.
//!
//! Deadlines: the executor cannot interrupt a blocking closure. It hands the
//! closure a [`HostContext`] with the deadline; the transport layer must honour it
//! (e.g. by shutting the socket down). Whatever happens, a closure that returns
//! after its deadline is marked failed, even if it reports success.
//!
//! Every event is emitted from the thread that called [`Executor::run`], in the
//! order the executor decided things, so observers (journal, progress display)
//! need no locking of their own. This module must not know Rhai or transports.
//!
//! ```
//! use patchbook::inventory::Host;
//! use patchbook::rollout::{Clock, Executor, HostOutcome, Plan, Policy, Target};
//!
//! let policy = Policy::from_value(&serde_json::json!({ "pilot": 1, "max_failed": "10%" }))?;
//! let targets = ["web1", "web2", "web3"].map(|n| Target::new(Host::new(n), vec![]));
//! let plan = Plan::build(targets.to_vec(), &policy, 10)?;
//! println!("{plan}");
//! let summary = Executor::new(&plan)
//!     .clock(Clock::from_env()?)
//!     .observer(|at: chrono::DateTime<chrono::Utc>, e: &patchbook::rollout::RolloutEvent| {
//!         println!("{at} {}", serde_json::to_string(e).unwrap_or_default())
//!     })
//!     .run(
//!         |host, ctx| {
//!             // The script layer calls the playbook's closure here, passing
//!             // `ctx.remaining()` on to the transport as the deadline.
//!             let _ = (host, ctx.remaining());
//!             HostOutcome::Done
//!         },
//!         |_host, _ctx| Ok(()), // replay the host's undo steps, newest first
//!     )?;
//! assert_eq!(summary.totals.done, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::inventory::Host;
// The events and the summary are journal records (`rollout.event`): their types
// live with the record format and are re-exported here under their old paths.
pub use crate::journal::entry::{
    Counts, HostReport, HostStatus, RollbackCause, RolloutEvent, StopReason, Summary,
};

use super::clock::{between, Clock};
use super::plan::{Plan, Wave, WaveKind};
use super::policy::{format_duration, GateFailAction};
use super::schedule::WaveSchedule;
use super::window::{after, Window};

/// What the per-host closure reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOutcome {
    Done,
    Failed {
        reason: String,
    },
    /// The controller, not the host, could not go on (its disk is full, a backup
    /// cap was reached). Not a failure of the host: it is not charged to the
    /// budget nor rolled back; the run stops and the host stays pending, with the
    /// rest, for `run --resume`.
    ControllerFault {
        reason: String,
    },
    /// The host could not be connected to (refused, timed out, handshake or login
    /// failed): not rolled back, charged to the unreachable budget.
    Unreachable {
        reason: String,
    },
}

impl HostOutcome {
    pub fn failed(reason: impl Into<String>) -> Self {
        HostOutcome::Failed {
            reason: reason.into(),
        }
    }
}

impl<E: std::fmt::Display> From<Result<(), E>> for HostOutcome {
    fn from(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => HostOutcome::Done,
            Err(e) => HostOutcome::failed(e.to_string()),
        }
    }
}

/// Handed to the per-host closure: the run's clock and the host's deadline.
#[derive(Debug, Clone)]
pub struct HostContext {
    pub wave: usize,
    pub started: DateTime<Utc>,
    /// `None` without a `timeout` in the policy.
    pub deadline: Option<DateTime<Utc>>,
    pub clock: Clock,
}

impl HostContext {
    /// Clock time left before the deadline (`None`: no deadline). Pass
    /// `clock.real_duration(left)` to a transport that waits in real time.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| between(self.clock.now(), d))
    }

    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| self.clock.now() > d)
    }
}

#[derive(Debug, Clone)]
pub struct RollbackContext {
    pub cause: RollbackCause,
    pub clock: Clock,
}

/// Passed to the gate between waves.
#[derive(Debug, Clone)]
pub struct GateContext {
    /// The wave that just finished, and the one that would start next.
    pub finished_wave: usize,
    pub next_wave: usize,
    pub failures: usize,
    pub now: DateTime<Utc>,
}

/// Receives the events of a run, with the run clock's time.
pub trait RolloutObserver {
    fn on_event(&self, at: DateTime<Utc>, event: &RolloutEvent);
}

impl<F: Fn(DateTime<Utc>, &RolloutEvent)> RolloutObserver for F {
    fn on_event(&self, at: DateTime<Utc>, event: &RolloutEvent) {
        self(at, event)
    }
}

impl Counts {
    fn add(&mut self, h: &HostReport) {
        self.targeted += 1;
        match h.state {
            // The executor ends every host it started, so a summary holds no host in
            // progress or unknown; were one there, it would still be pending.
            HostStatus::Pending | HostStatus::InProgress | HostStatus::Unknown => self.pending += 1,
            HostStatus::Done => self.done += 1,
            HostStatus::Failed => self.failed += 1,
            HostStatus::Unreachable => self.unreachable += 1,
            HostStatus::Reverted => self.reverted += 1,
        }
        if h.rolled_back {
            self.rolled_back += 1;
        }
        if h.rollback_error.is_some() {
            self.rollback_failed += 1;
        }
    }
}

impl Summary {
    pub fn pending_hosts(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .filter(|h| h.state == HostStatus::Pending)
            .map(|h| h.name.as_str())
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RolloutError {
    #[error("it is {now}, outside the maintenance window `{window}`; the next window starts {next}: run again then, or pass a window that is open now")]
    OutsideWindow {
        window: String,
        now: String,
        next: String,
    },
    #[error("it is {now} and the maintenance window `{window}` will not open again; give the rollout a new window")]
    WindowPassed { window: String, now: String },
    #[error("the rollout scheduler stalled in {wave} with {pending} hosts pending and none in flight; this is a bug, please report it with the plan")]
    Stalled { wave: String, pending: usize },
    #[error("cannot start a worker thread for the rollout ({0}); lower --forks or raise the process's thread limit")]
    Worker(String),
}

type GateFn<'a> = dyn Fn(&GateContext) -> Result<bool, String> + 'a;

/// Runs a plan. Build it with [`Executor::new`], add what the run needs, then
/// call [`Executor::run`] with the per-host work and the rollback.
pub struct Executor<'a> {
    plan: &'a Plan,
    clock: Clock,
    window: Option<Window>,
    gate: Option<Box<GateFn<'a>>>,
    observer: Option<Box<dyn RolloutObserver + 'a>>,
    halt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Stack of each worker thread; `None` keeps the platform default.
    worker_stack: Option<usize>,
    /// Hosts outside the plan that a probe found unreachable, with the reason.
    unreachable_before: Vec<(Host, String)>,
    /// Ask the gates before the first wave too (a resume after a gate stop).
    gate_first: bool,
}

enum Msg {
    Outcome {
        host: usize,
        outcome: HostOutcome,
        started: DateTime<Utc>,
        ended: DateTime<Utc>,
    },
    Released {
        host: usize,
        rollback: Option<Result<(), String>>,
    },
}

impl<'a> Executor<'a> {
    pub fn new(plan: &'a Plan) -> Self {
        Executor {
            plan,
            clock: Clock::system(),
            window: None,
            gate: None,
            observer: None,
            halt: None,
            worker_stack: None,
            unreachable_before: Vec::new(),
            gate_first: false,
        }
    }

    /// Asks the gates (without a soak) before the first wave as well: a run
    /// resumed after a gate stopped it goes on only once the gate passes.
    pub fn gate_before_first_wave(mut self, yes: bool) -> Self {
        self.gate_first = yes;
        self
    }

    /// Waits `soak` on the run's clock in short real slices, so a halt is seen
    /// within a quarter second; false when halted.
    fn soak(&self, soak: Duration, halted: &dyn Fn() -> bool) -> bool {
        let end = after(self.clock.now(), soak);
        loop {
            if halted() {
                return false;
            }
            if self.clock.step_toward(end) {
                return true;
            }
        }
    }

    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    pub fn gate(mut self, gate: impl Fn(&GateContext) -> Result<bool, String> + 'a) -> Self {
        self.gate = Some(Box::new(gate));
        self
    }

    /// Gives every worker thread a stack of `bytes`, so host work that needs a deep
    /// stack runs on the worker itself instead of starting a thread per host; the
    /// work reads the size back with [`super::pool::worker_stack`].
    pub fn worker_stack(mut self, bytes: usize) -> Self {
        self.worker_stack = Some(bytes);
        self
    }

    /// A flag that, once set, stops new hosts from starting; hosts in flight finish.
    pub fn halt_on(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.halt = Some(flag);
        self
    }

    /// Hosts a probe of this run could not connect to before the rollout (and so
    /// not among the plan's targets): the summary reports them unreachable and they
    /// count against `max_unreachable` from the start.
    pub fn unreachable_before(mut self, hosts: Vec<(Host, String)>) -> Self {
        self.unreachable_before = hosts;
        self
    }

    pub fn observer(mut self, observer: impl RolloutObserver + 'a) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    fn emit(&self, e: RolloutEvent) {
        if let Some(o) = &self.observer {
            o.on_event(self.clock.now(), &e);
        }
    }

    fn refuse_outside_window(&self) -> Result<(), RolloutError> {
        let Some(w) = &self.window else {
            return Ok(());
        };
        let now = self.clock.now();
        if w.contains(now) {
            return Ok(());
        }
        match w.next_start(now) {
            Some(next) => Err(RolloutError::OutsideWindow {
                window: w.spec().to_string(),
                now: w.display_time(now),
                next: w.display_time(next),
            }),
            None => Err(RolloutError::WindowPassed {
                window: w.spec().to_string(),
                now: w.display_time(now),
            }),
        }
    }

    /// Runs every wave. `work` runs once per host on a worker thread; `rollback`
    /// undoes one host (its undo steps, newest first) and reports why it could not.
    pub fn run<W, R>(&self, work: W, rollback: R) -> Result<Summary, RolloutError>
    where
        W: Fn(&Host, &HostContext) -> HostOutcome + Sync,
        R: Fn(&Host, &RollbackContext) -> Result<(), String> + Sync,
    {
        self.refuse_outside_window()?;
        let plan = self.plan;
        let n = plan.total();
        let mut reports: Vec<HostReport> = (0..n)
            .map(|i| HostReport {
                name: plan.host(i).name.clone(),
                wave: 0,
                state: HostStatus::Pending,
                reason: None,
                started: None,
                ended: None,
                rolled_back: false,
                rollback_error: None,
            })
            .collect();
        for w in &plan.waves {
            for &i in &w.hosts {
                reports[i].wave = w.index;
            }
        }
        let mut budget = plan.budget();
        let mut unreachable = plan.unreachable_budget(self.unreachable_before.len());
        self.emit(RolloutEvent::RunStarted {
            targets: n,
            waves: plan.waves.len(),
            parallel: plan.parallel,
            allowed_failures: budget.allowed(),
        });

        let mut stop: Option<StopReason> = None;
        for (host, reason) in &self.unreachable_before {
            self.emit(RolloutEvent::HostUnreachable {
                host: host.name.clone(),
                wave: 0,
                reason: reason.clone(),
            });
            if unreachable.record_failure() {
                self.emit(RolloutEvent::UnreachableBudgetExhausted {
                    unreachable: unreachable.failures(),
                    allowed: unreachable.allowed(),
                });
                stop.get_or_insert(StopReason::UnreachableBudgetExhausted {
                    unreachable: unreachable.failures(),
                    allowed: unreachable.allowed(),
                });
            }
        }
        let mut completion: Vec<usize> = Vec::new();
        let mut rollback_order: Vec<usize> = Vec::new();
        let mut longest: Option<Duration> = None;
        let mut wave_rollback: Vec<usize> = Vec::new();
        let workers = plan.parallel.min(n).max(1);
        let clock = &self.clock;
        let timeout = plan.policy.timeout;

        let (job_tx, job_rx) = mpsc::channel::<(usize, usize)>();
        let job_rx = Mutex::new(job_rx);
        let (msg_tx, msg_rx) = mpsc::channel::<Msg>();
        let (work, rollback) = (&work, &rollback);

        let result = std::thread::scope(|scope| -> Result<(), RolloutError> {
            // Owned here so that every way out of this closure closes the job
            // queue and lets the workers end.
            let job_tx = job_tx;
            let stack = self.worker_stack;
            for _ in 0..workers {
                let msg_tx = msg_tx.clone();
                let job_rx = &job_rx;
                let spawned = super::pool::spawn_worker(scope, stack, move || {
                    loop {
                        let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((h, wave)) = job else { break };
                        let host = plan.host(h);
                        let started = clock.now();
                        let ctx = HostContext {
                            wave,
                            started,
                            deadline: timeout.map(|t| after(started, t)),
                            clock: clock.clone(),
                        };
                        let mut outcome = catch_unwind(AssertUnwindSafe(|| work(host, &ctx)))
                            .unwrap_or_else(|p| HostOutcome::failed(panic_text(p.as_ref())));
                        let ended = clock.now();
                        // A controller fault stays one even past the deadline:
                        // the host is not to blame for the controller's disk; an
                        // unreachable host stays unreachable.
                        let fault = matches!(
                            outcome,
                            HostOutcome::ControllerFault { .. } | HostOutcome::Unreachable { .. }
                        );
                        if let (Some(limit), Some(deadline), false) = (timeout, ctx.deadline, fault)
                        {
                            if ended > deadline {
                                outcome = HostOutcome::failed(format!(
                                    "exceeded its {} deadline (took {})",
                                    format_duration(limit),
                                    format_duration(between(started, ended))
                                ));
                            }
                        }
                        let failed = matches!(outcome, HostOutcome::Failed { .. });
                        let _ = msg_tx.send(Msg::Outcome {
                            host: h,
                            outcome,
                            started,
                            ended,
                        });
                        let undo = failed.then(|| {
                            let rc = RollbackContext {
                                cause: RollbackCause::HostFailed,
                                clock: clock.clone(),
                            };
                            catch_unwind(AssertUnwindSafe(|| rollback(host, &rc)))
                                .unwrap_or_else(|p| Err(panic_text(p.as_ref())))
                        });
                        let _ = msg_tx.send(Msg::Released {
                            host: h,
                            rollback: undo,
                        });
                    }
                });
                if let Err(e) = spawned {
                    return Err(RolloutError::Worker(e.to_string()));
                }
            }
            drop(msg_tx);

            let halted = || {
                self.halt
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
            };
            let mut previous: Option<&Wave> = None;
            for wave in &plan.waves {
                if stop.is_some() {
                    break;
                }
                if halted() {
                    stop = Some(StopReason::Halted);
                    break;
                }
                let gate_after = match previous {
                    Some(prev) => Some((prev.index, true)),
                    // A resumed run that stopped on a gate asks it again first.
                    None if self.gate_first => plan
                        .waves
                        .first()
                        .map(|w| (w.index.saturating_sub(1), false)),
                    None => None,
                };
                if let Some((after_wave, wave_ran)) = gate_after {
                    if wave_ran && !plan.policy.pause.is_zero() {
                        self.emit(RolloutEvent::Paused {
                            seconds: plan.policy.pause.as_secs_f64(),
                        });
                        clock.sleep(plan.policy.pause);
                    }
                    let soak = plan
                        .policy
                        .gate
                        .as_ref()
                        .map(|g| g.soak)
                        .filter(|s| wave_ran && !s.is_zero());
                    if let Some(soak) = soak {
                        self.emit(RolloutEvent::Soaking {
                            after_wave,
                            seconds: soak.as_secs_f64(),
                        });
                        if !self.soak(soak, &halted) {
                            stop = Some(StopReason::Halted);
                            break;
                        }
                    }
                    let soaked = soak.unwrap_or(Duration::ZERO);
                    let mut failed: Option<String> = None;
                    if let Some(g) = &plan.policy.gate {
                        let verdict = g.evaluate(after_wave, soaked);
                        if !verdict.passed {
                            failed = Some(format!("{}: {}", g.query, verdict.detail));
                        }
                        self.emit(RolloutEvent::GateEvaluated(verdict));
                    }
                    if let (None, Some(gate)) = (&failed, &self.gate) {
                        let ctx = GateContext {
                            finished_wave: after_wave,
                            next_wave: wave.index,
                            failures: budget.failures(),
                            now: clock.now(),
                        };
                        let verdict = catch_unwind(AssertUnwindSafe(|| gate(&ctx)))
                            .unwrap_or_else(|p| Err(panic_text(p.as_ref())));
                        let verdict = super::gate::closure_verdict(after_wave, verdict, soaked);
                        let (passed, detail) = (verdict.passed, verdict.detail.clone());
                        self.emit(RolloutEvent::GateEvaluated(verdict));
                        if !passed {
                            failed = Some(detail);
                        }
                    }
                    if let Some(reason) = failed {
                        self.emit(RolloutEvent::GateStopped {
                            after_wave,
                            reason: reason.clone(),
                        });
                        stop = Some(StopReason::GateStopped { after_wave, reason });
                        if let (Some(prev), GateFailAction::RollbackWave) =
                            (previous, plan.policy.on_gate_fail)
                        {
                            wave_rollback = prev
                                .hosts
                                .iter()
                                .copied()
                                .filter(|h| reports[*h].state == HostStatus::Done)
                                .collect();
                        }
                        break;
                    }
                }
                if let Some(w) = &self.window {
                    let per_host = longest.unwrap_or(plan.policy.estimate);
                    let rounds =
                        u32::try_from(wave.hosts.len().div_ceil(plan.parallel)).unwrap_or(u32::MAX);
                    let needed = per_host.saturating_mul(rounds).saturating_add(w.buffer);
                    let left = w.time_left(clock.now());
                    if left < needed {
                        self.emit(RolloutEvent::WindowClosed {
                            before_wave: wave.index,
                            time_left_seconds: left.as_secs_f64(),
                            needed_seconds: needed.as_secs_f64(),
                        });
                        stop = Some(StopReason::WindowClosing {
                            before_wave: wave.index,
                        });
                        break;
                    }
                }

                self.emit(RolloutEvent::WaveStarted {
                    index: wave.index,
                    label: wave.label(),
                    hosts: wave
                        .hosts
                        .iter()
                        .map(|&i| plan.host(i).name.clone())
                        .collect(),
                });
                let mut sched = WaveSchedule::new(plan, wave);
                loop {
                    if stop.is_none() && halted() {
                        stop = Some(StopReason::Halted);
                        sched.stop();
                    }
                    for h in sched.start_next() {
                        self.emit(RolloutEvent::HostStarted {
                            host: plan.host(h).name.clone(),
                            wave: wave.index,
                        });
                        if job_tx.send((h, wave.index)).is_err() {
                            return Err(RolloutError::Stalled {
                                wave: wave.label(),
                                pending: sched.pending().len(),
                            });
                        }
                    }
                    if sched.is_over() {
                        break;
                    }
                    if sched.in_flight() == 0 {
                        return Err(RolloutError::Stalled {
                            wave: wave.label(),
                            pending: sched.pending().len(),
                        });
                    }
                    let Ok(msg) = msg_rx.recv() else {
                        return Err(RolloutError::Stalled {
                            wave: wave.label(),
                            pending: sched.pending().len(),
                        });
                    };
                    match msg {
                        Msg::Outcome {
                            host,
                            outcome,
                            started,
                            ended,
                        } => {
                            let r = &mut reports[host];
                            r.started = Some(started);
                            r.ended = Some(ended);
                            let took = between(started, ended);
                            longest = Some(longest.map_or(took, |l| l.max(took)));
                            match outcome {
                                HostOutcome::Done => {
                                    r.state = HostStatus::Done;
                                    completion.push(host);
                                    self.emit(RolloutEvent::HostDone {
                                        host: r.name.clone(),
                                        wave: wave.index,
                                        seconds: took.as_secs_f64(),
                                    });
                                }
                                HostOutcome::Failed { reason } => {
                                    r.state = HostStatus::Failed;
                                    r.reason = Some(reason.clone());
                                    self.emit(RolloutEvent::HostFailed {
                                        host: r.name.clone(),
                                        wave: wave.index,
                                        reason,
                                    });
                                    if budget.record_failure() {
                                        self.emit(RolloutEvent::BudgetExhausted {
                                            failures: budget.failures(),
                                            allowed: budget.allowed(),
                                        });
                                        stop.get_or_insert(StopReason::BudgetExhausted {
                                            failures: budget.failures(),
                                            allowed: budget.allowed(),
                                        });
                                    } else if wave.kind == WaveKind::Pilot {
                                        stop.get_or_insert(StopReason::PilotFailed {
                                            host: plan.host(host).name.clone(),
                                        });
                                    }
                                    if stop.is_some() {
                                        sched.stop();
                                    }
                                }
                                HostOutcome::Unreachable { reason } => {
                                    r.state = HostStatus::Unreachable;
                                    r.reason = Some(reason.clone());
                                    self.emit(RolloutEvent::HostUnreachable {
                                        host: r.name.clone(),
                                        wave: wave.index,
                                        reason,
                                    });
                                    if unreachable.record_failure() {
                                        self.emit(RolloutEvent::UnreachableBudgetExhausted {
                                            unreachable: unreachable.failures(),
                                            allowed: unreachable.allowed(),
                                        });
                                        stop.get_or_insert(
                                            StopReason::UnreachableBudgetExhausted {
                                                unreachable: unreachable.failures(),
                                                allowed: unreachable.allowed(),
                                            },
                                        );
                                    } else if wave.kind == WaveKind::Pilot {
                                        stop.get_or_insert(StopReason::PilotFailed {
                                            host: plan.host(host).name.clone(),
                                        });
                                    }
                                    if stop.is_some() {
                                        sched.stop();
                                    }
                                }
                                HostOutcome::ControllerFault { reason } => {
                                    // Pending, not failed: the host did nothing
                                    // wrong and a resume runs it again.
                                    r.state = HostStatus::Pending;
                                    r.reason = Some(reason.clone());
                                    stop.get_or_insert(StopReason::ControllerFault {
                                        host: r.name.clone(),
                                        reason,
                                    });
                                    sched.stop();
                                }
                            }
                        }
                        Msg::Released { host, rollback } => {
                            if let Some(result) = rollback {
                                self.record_rollback(
                                    &mut reports[host],
                                    RollbackCause::HostFailed,
                                    result,
                                );
                                rollback_order.push(host);
                            }
                            sched.finish(host);
                        }
                    }
                }
                if stop.is_some() {
                    break;
                }
                previous = Some(wave);
            }
            Ok(())
        });
        result?;

        // The wave before a failed gate, newest first, before any `rollback: "all"`
        // (which then finds those hosts no longer done).
        let rc = RollbackContext {
            cause: RollbackCause::GateFailed,
            clock: self.clock.clone(),
        };
        let order: Vec<usize> = completion
            .iter()
            .rev()
            .copied()
            .filter(|h| wave_rollback.contains(h))
            .collect();
        for h in order {
            let result = catch_unwind(AssertUnwindSafe(|| rollback(plan.host(h), &rc)))
                .unwrap_or_else(|p| Err(panic_text(p.as_ref())));
            let r = &mut reports[h];
            if result.is_ok() {
                r.state = HostStatus::Reverted;
            }
            self.record_rollback(r, RollbackCause::GateFailed, result);
            rollback_order.push(h);
            completion.retain(|c| *c != h);
        }

        let stop = stop.unwrap_or(StopReason::Completed);
        let undo_all = plan.policy.rollback.undoes_all_after(&stop);
        if undo_all {
            let rc = RollbackContext {
                cause: RollbackCause::RunStopped,
                clock: self.clock.clone(),
            };
            for &h in completion.iter().rev() {
                let result = catch_unwind(AssertUnwindSafe(|| rollback(plan.host(h), &rc)))
                    .unwrap_or_else(|p| Err(panic_text(p.as_ref())));
                let r = &mut reports[h];
                if result.is_ok() {
                    r.state = HostStatus::Reverted;
                }
                self.record_rollback(r, RollbackCause::RunStopped, result);
                rollback_order.push(h);
            }
        }

        let run_order = plan.run_order();
        let mut totals = Counts::default();
        let mut per_group: BTreeMap<String, Counts> = BTreeMap::new();
        for &i in &run_order {
            let r = &reports[i];
            totals.add(r);
            for g in &plan.host(i).groups {
                per_group.entry(g.clone()).or_default().add(r);
            }
        }
        let mut hosts: Vec<HostReport> = run_order.iter().map(|&i| reports[i].clone()).collect();
        for (host, reason) in &self.unreachable_before {
            let r = HostReport {
                name: host.name.clone(),
                wave: 0,
                state: HostStatus::Unreachable,
                reason: Some(reason.clone()),
                started: None,
                ended: None,
                rolled_back: false,
                rollback_error: None,
            };
            totals.add(&r);
            for g in &host.groups {
                per_group.entry(g.clone()).or_default().add(&r);
            }
            hosts.push(r);
        }
        let name = |i: &usize| plan.host(*i).name.clone();
        let summary = Summary {
            stop,
            allowed_failures: budget.allowed(),
            allowed_unreachable: unreachable.allowed(),
            totals,
            per_group,
            completion_order: completion.iter().map(name).collect(),
            rollback_order: rollback_order.iter().map(name).collect(),
            hosts,
        };
        self.emit(RolloutEvent::RunDone {
            summary: summary.clone(),
        });
        Ok(summary)
    }

    fn record_rollback(
        &self,
        r: &mut HostReport,
        cause: RollbackCause,
        result: Result<(), String>,
    ) {
        match result {
            Ok(()) => {
                r.rolled_back = true;
                self.emit(RolloutEvent::RolledBack {
                    host: r.name.clone(),
                    cause,
                });
            }
            Err(error) => {
                r.rollback_error = Some(error.clone());
                self.emit(RolloutEvent::RollbackFailed {
                    host: r.name.clone(),
                    cause,
                    error,
                });
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    format!("panicked: {msg}")
}
