//! One rollout shared by a coordinator and any number of workers through the
//! PostgreSQL store: [`coordinate`] (`patchbook run --workers external`) and
//! [`serve`] (`patchbook worker`). It owns the loops and their decisions (which
//! wave opens, when the run is over, what a claimed host's end is); the SQL is
//! [`crate::journal::fleet`]'s, the waves and the budget's size are the rollout
//! layer's plan, and a host's work and rollback are the closures the script
//! layer hands in, the same ones `run` gives its executor. It must not know Rhai.
//!
//! The run's records: the coordinator holds the run (its lock, `run.start`,
//! `rollout.plan`, wave events, the summary, `run.close`); each worker joins it
//! ([`crate::journal::Journal::join_in`]) and appends its hosts' records (intents,
//! outcomes with their undo, host ends, rollbacks, host events) to the same run.
//! Every append chains onto the run's last record in the database under the
//! run's append lock, so a run stays one hash chain whoever wrote its records,
//! and `audit verify`, `report`, `rollback RUN` and `run --resume` read it as any
//! other run.
//!
//! A worker's lease on a host is renewed while the host runs; a worker that dies
//! stops renewing, and once the lease has run out another worker claims the host
//! and treats it as `run --resume` treats a host it had begun: it reads the
//! host's records ([`crate::journal::Journal::adopt_host`]), leaves a host whose
//! work ended alone (only its claim is closed), rolls back a failed one not yet
//! rolled back, and runs the work again on one whose steps did not finish, so its
//! steps check the host before acting and close the intents left open.
//!
//! The budget: every failure is counted in the database by one `UPDATE …
//! RETURNING`, which halts the run as it crosses `max_failed`; a claim reads the
//! control row `FOR SHARE`, so no host is claimed after a committed halt. Hosts
//! already claimed finish (and a failed one is rolled back by the worker that ran
//! it): failures ≤ max_failed + hosts in flight, where hosts in flight ≤ workers ×
//! the policy's `parallel` (each worker runs that many hosts at once).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::{RunControl, WorkerSpec};
use crate::inventory::Host;
use crate::journal::entry::{Counts, Entry, HostReport, HostStatus, RollbackCause};
use crate::journal::fleet::{self, ClaimState, Claimed, NewClaim, NewControl, Phase};
use crate::journal::{pg, JournalError};
use crate::rollout::policy::RollbackScope;
use crate::rollout::{
    GateFailAction, HostContext, HostOutcome, Plan, RollbackContext, RolloutEvent, StopReason,
    Summary, WaveKind,
};

/// How often a process that waits looks at the database when no notice came.
const POLL: Duration = Duration::from_millis(500);

/// Why a shared rollout could not go on.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] JournalError),
    #[error(
        "run {run} has no journal; a rollout shared with workers runs only under `patchbook run`"
    )]
    NoJournal { run: String },
    #[error("run {run} is not shared with workers (no control row in the store); start it with `patchbook run PLAYBOOK --store postgres://… --workers external`")]
    NotShared { run: String },
    #[error("the rollout policy's {what} is not supported with --workers external yet; drop it from the policy, or run without --workers")]
    Unsupported { what: &'static str },
}

/// Refuses what the executor does but a shared rollout does not (yet), rather
/// than ignoring it.
fn check_supported(plan: &Plan) -> Result<(), FleetError> {
    let p = &plan.policy;
    let what = if p.gate.is_some() {
        Some("metric `gate`")
    } else if !p.max_unavailable.is_empty() {
        Some("`max_unavailable`")
    } else if matches!(p.rollback, RollbackScope::All) {
        Some("`rollback: \"all\"`")
    } else if matches!(p.on_gate_fail, GateFailAction::RollbackWave) {
        Some("`on_gate_fail: \"rollback_wave\"`")
    } else {
        None
    };
    match what {
        Some(what) => Err(FleetError::Unsupported { what }),
        None => Ok(()),
    }
}

fn db(url: &str) -> impl Fn(postgres::Error) -> FleetError + '_ {
    move |e| FleetError::Store(pg::store_error(url, &e))
}

/// The zone a host is pinned to: its inventory var `zone`.
pub fn zone_of(host: &Host) -> Option<String> {
    host.vars
        .get("zone")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .filter(|z| !z.is_empty())
}

/// `run --workers external`: writes the plan's claims (once: a restarted
/// coordinator finds them and carries on), opens each wave when the previous one
/// is done and `gate` passes, halts outside the window or when asked to stop,
/// and returns the summary once no host is in flight any more. Runs no host.
pub fn coordinate(
    c: &RunControl,
    url: &str,
    plan: &Plan,
    playbook_sha256: &str,
    gate: &dyn Fn(usize) -> Result<bool, String>,
    targets: &[String],
) -> Result<Summary, FleetError> {
    let session = &c.session;
    let Some(journal) = session.run.journal.clone() else {
        return Err(FleetError::NoJournal {
            run: session.run.run_id.clone(),
        });
    };
    let run = journal.run().to_string();
    let err = db(url);
    let mut client = pg::connect(url)?;
    let allowed = plan.budget().allowed();
    let parallel = plan.parallel.max(1);
    let event = |e: RolloutEvent| c.on_event(c.clock.now(), &e, targets);
    check_supported(plan)?;
    if fleet::control(&mut client, &run).map_err(&err)?.is_none() {
        let mut claims = Vec::with_capacity(plan.total());
        for w in &plan.waves {
            for (position, &i) in w.hosts.iter().enumerate() {
                let host = plan.host(i);
                claims.push(NewClaim {
                    host: host.name.clone(),
                    wave: w.index,
                    position,
                    zone: zone_of(host),
                });
            }
        }
        let control = NewControl {
            run: run.clone(),
            playbook: session.run.playbook.clone(),
            playbook_sha256: playbook_sha256.to_string(),
            params: c.given_params(),
            waves: plan.waves.len(),
            max_failed: allowed,
            parallel,
            window_spec: c.window().map(|w| w.spec().to_string()),
        };
        fleet::create(&mut client, &control, &claims).map_err(&err)?;
        event(RolloutEvent::RunStarted {
            targets: plan.total(),
            waves: plan.waves.len(),
            parallel,
            allowed_failures: allowed,
        });
    }
    fleet::listen(&mut client).map_err(&err)?;
    let waves: BTreeSet<usize> = fleet::claims(&mut client, &run)
        .map_err(&err)?
        .iter()
        .map(|cl| cl.wave)
        .collect();
    let mut ran_before = false;
    for &w in &waves {
        let Some(ctl) = fleet::control(&mut client, &run).map_err(&err)? else {
            return Err(FleetError::NotShared { run });
        };
        if ctl.phase != Phase::Running {
            break;
        }
        if fleet::wave_over(&mut client, &run, w).map_err(&err)? {
            ran_before = true;
            continue;
        }
        // A wave that was open when a coordinator stopped is open again at once.
        let reopening = ctl.open_wave == Some(w);
        if ran_before && !reopening && !plan.policy.pause.is_zero() {
            event(RolloutEvent::Paused {
                seconds: plan.policy.pause.as_secs_f64(),
            });
            c.clock.sleep(plan.policy.pause);
        }
        if ran_before && !reopening {
            let verdict = match gate(w - 1) {
                Ok(true) => None,
                Ok(false) => Some("the gate returned false".to_string()),
                Err(e) => Some(e),
            };
            if let Some(reason) = verdict {
                fleet::halt(&mut client, &run, &format!("gate:{}:{reason}", w - 1))
                    .map_err(&err)?;
                event(RolloutEvent::GateStopped {
                    after_wave: w - 1,
                    reason,
                });
                break;
            }
        }
        if let Some(window) = c.window() {
            let now = c.clock.now();
            if !window.contains(now) {
                fleet::halt(&mut client, &run, &format!("window:{w}")).map_err(&err)?;
                event(RolloutEvent::WindowClosed {
                    before_wave: w,
                    time_left_seconds: 0.0,
                    needed_seconds: 0.0,
                });
                break;
            }
        }
        if !reopening {
            fleet::open_wave(&mut client, &run, w).map_err(&err)?;
            let label = plan
                .waves
                .iter()
                .find(|x| x.index == w)
                .map_or_else(|| format!("wave {w}"), |x| x.label());
            let hosts = fleet::claims(&mut client, &run)
                .map_err(&err)?
                .into_iter()
                .filter(|cl| cl.wave == w)
                .map(|cl| cl.host)
                .collect();
            event(RolloutEvent::WaveStarted {
                index: w,
                label,
                hosts,
            });
        }
        ran_before = true;
        loop {
            if c.stop.load(Ordering::SeqCst) {
                fleet::halt(&mut client, &run, "operator").map_err(&err)?;
            }
            if fleet::wave_over(&mut client, &run, w).map_err(&err)? {
                break;
            }
            let phase = fleet::control(&mut client, &run)
                .map_err(&err)?
                .map_or(Phase::Halted, |x| x.phase);
            if phase != Phase::Running {
                break;
            }
            fleet::wait_notice(&mut client, POLL).map_err(&err)?;
        }
        let pilot = plan
            .waves
            .iter()
            .any(|x| x.index == w && matches!(x.kind, WaveKind::Pilot));
        if pilot {
            let failed = fleet::claims(&mut client, &run)
                .map_err(&err)?
                .into_iter()
                .find(|cl| {
                    cl.wave == w && matches!(cl.state, ClaimState::Failed | ClaimState::Unreachable)
                });
            if let Some(f) = failed {
                fleet::halt(&mut client, &run, &format!("pilot:{}", f.host)).map_err(&err)?;
                break;
            }
        }
    }
    // Hosts in flight when the run halted finish (a failed one is rolled back by
    // its worker) before the summary is made.
    loop {
        if fleet::in_flight(&mut client, &run).map_err(&err)? == 0 {
            break;
        }
        fleet::wait_notice(&mut client, POLL).map_err(&err)?;
    }
    fleet::finish(&mut client, &run).map_err(&err)?;
    let ctl = fleet::control(&mut client, &run)
        .map_err(&err)?
        .ok_or_else(|| FleetError::NotShared { run: run.clone() })?;
    let summary = summarize(c, &mut client, &ctl, url)?;
    if let StopReason::BudgetExhausted { failures, allowed } = summary.stop {
        event(RolloutEvent::BudgetExhausted { failures, allowed });
    }
    event(RolloutEvent::RunDone {
        summary: summary.clone(),
    });
    Ok(summary)
}

/// The summary of a shared run from its claims and its hosts' records.
fn summarize(
    c: &RunControl,
    client: &mut postgres::Client,
    ctl: &fleet::Control,
    url: &str,
) -> Result<Summary, FleetError> {
    let err = db(url);
    let claims = fleet::claims(client, &ctl.run).map_err(&err)?;
    let state = c
        .session
        .run
        .journal
        .as_ref()
        .map(|j| j.state())
        .transpose()?
        .unwrap_or_default();
    let stop = stop_reason(ctl.halt_reason.as_deref(), ctl.failed, ctl.max_failed);
    let inventory = &c.session.runtime.inventory;
    let mut totals = Counts::default();
    let mut per_group: BTreeMap<String, Counts> = BTreeMap::new();
    let mut hosts = Vec::with_capacity(claims.len());
    let mut done_order: Vec<(chrono::DateTime<Utc>, String)> = Vec::new();
    for cl in &claims {
        let history = state.hosts.get(&cl.host);
        let rolled_back = history.is_some_and(|h| h.rolled_back);
        let status = match cl.state {
            ClaimState::Pending | ClaimState::Claimed => HostStatus::Pending,
            ClaimState::Done => HostStatus::Done,
            ClaimState::Failed => HostStatus::Failed,
            ClaimState::Unreachable => HostStatus::Unreachable,
        };
        let report = HostReport {
            name: cl.host.clone(),
            wave: cl.wave,
            state: status,
            reason: cl.reason.clone(),
            started: cl.started,
            ended: cl.ended,
            rolled_back,
            rollback_error: (status == HostStatus::Failed && !rolled_back)
                .then(|| "its rollback did not complete; see `patchbook report`".to_string()),
        };
        if status == HostStatus::Done {
            if let Some(t) = cl.ended {
                done_order.push((t, cl.host.clone()));
            }
        }
        let groups = inventory
            .host(&cl.host)
            .map(|h| h.groups.clone())
            .unwrap_or_default();
        add(&mut totals, &report);
        for g in groups {
            add(per_group.entry(g).or_default(), &report);
        }
        hosts.push(report);
    }
    done_order.sort();
    Ok(Summary {
        stop,
        allowed_failures: ctl.max_failed,
        allowed_unreachable: ctl.max_failed,
        totals,
        per_group,
        hosts,
        completion_order: done_order.into_iter().map(|(_, h)| h).collect(),
        rollback_order: Vec::new(),
    })
}

/// The summary's stop reason from the control row's `halt_reason` (`budget`,
/// `pilot:HOST`, `gate:WAVE:WHY`, `window:WAVE`, `operator`), none when the run
/// finished.
fn stop_reason(halt: Option<&str>, failed: usize, max_failed: usize) -> StopReason {
    match halt {
        None => StopReason::Completed,
        Some("budget") => StopReason::BudgetExhausted {
            failures: failed,
            allowed: max_failed,
        },
        Some(r) if r.starts_with("pilot:") => StopReason::PilotFailed {
            host: r["pilot:".len()..].to_string(),
        },
        Some(r) if r.starts_with("gate:") => {
            let mut parts = r.splitn(3, ':').skip(1);
            let after_wave = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            StopReason::GateStopped {
                after_wave,
                reason: parts.next().unwrap_or_default().to_string(),
            }
        }
        Some(r) if r.starts_with("window:") => StopReason::WindowClosing {
            before_wave: r["window:".len()..].parse().unwrap_or(0),
        },
        Some(_) => StopReason::Halted,
    }
}

fn add(counts: &mut Counts, h: &HostReport) {
    counts.targeted += 1;
    match h.state {
        HostStatus::Pending | HostStatus::InProgress | HostStatus::Unknown => counts.pending += 1,
        HostStatus::Done => counts.done += 1,
        HostStatus::Failed => counts.failed += 1,
        HostStatus::Unreachable => counts.unreachable += 1,
        HostStatus::Reverted => counts.reverted += 1,
    }
    if h.rolled_back {
        counts.rolled_back += 1;
    }
    if h.rollback_error.is_some() {
        counts.rollback_failed += 1;
    }
}

/// A host's work, as the executor would call it.
pub type Work<'a> = dyn Fn(&Host, &HostContext) -> HostOutcome + Sync + 'a;
/// A host's rollback, as the executor would call it.
pub type Rollback<'a> = dyn Fn(&Host, &RollbackContext) -> Result<(), String> + Sync + 'a;

/// `patchbook worker`: claims hosts of the run's open wave and runs `work` on
/// each (and `rollback` on a failed one), `parallel` hosts at once as the run
/// says, until the run is finished or halted. Sets the control's
/// [`RunControl::set_fleet_over`] when it returns.
pub fn serve(
    c: &RunControl,
    spec: &WorkerSpec,
    timeout: Option<Duration>,
    work: &Work<'_>,
    rollback: &Rollback<'_>,
    stack: usize,
) -> Result<(), FleetError> {
    let session = &c.session;
    let Some(journal) = session.run.journal.clone() else {
        return Err(FleetError::NoJournal {
            run: session.run.run_id.clone(),
        });
    };
    let run = journal.run().to_string();
    let err = db(&spec.url);
    let mut client = pg::connect(&spec.url)?;
    let ctl = fleet::control(&mut client, &run)
        .map_err(&err)?
        .ok_or_else(|| FleetError::NotShared { run: run.clone() })?;
    drop(client);
    let failed: std::sync::Mutex<Option<FleetError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for slot in 0..ctl.parallel {
            let id = if ctl.parallel > 1 {
                format!("{}/{slot}", spec.id)
            } else {
                spec.id.clone()
            };
            let failed = &failed;
            let run = run.as_str();
            let spawned = std::thread::Builder::new()
                .name(format!("worker-{slot}"))
                .stack_size(stack)
                .spawn_scoped(s, move || {
                    if let Err(e) = claim_loop(c, spec, run, &id, timeout, work, rollback) {
                        tracing::error!(error = %e, "worker slot stopped");
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a worker slot");
            }
        }
    });
    c.set_fleet_over();
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One slot of a worker: claim, run, end, until the run is over.
fn claim_loop(
    c: &RunControl,
    spec: &WorkerSpec,
    run: &str,
    id: &str,
    timeout: Option<Duration>,
    work: &Work<'_>,
    rollback: &Rollback<'_>,
) -> Result<(), FleetError> {
    let err = db(&spec.url);
    let mut client = pg::connect(&spec.url)?;
    fleet::listen(&mut client).map_err(&err)?;
    // Leases are renewed on a connection of their own, kept for the slot's life.
    let mut renewals = pg::connect(&spec.url)?;
    let wait = POLL.min(spec.lease / 3);
    loop {
        if c.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match fleet::claim(&mut client, run, id, spec.zone.as_deref(), spec.lease).map_err(&err)? {
            Claimed::Over(_) => return Ok(()),
            Claimed::Nothing => {
                fleet::wait_notice(&mut client, wait).map_err(&err)?;
            }
            Claimed::Host {
                host,
                wave,
                attempts,
            } => {
                let (done, renewing) = std::sync::mpsc::channel::<()>();
                let lost = AtomicBool::new(false);
                let result = std::thread::scope(|s| {
                    let (renewals, claimed, lost) = (&mut renewals, &host, &lost);
                    s.spawn(move || renew(renewals, spec, run, claimed, id, &renewing, lost));
                    let r = run_claimed(
                        c,
                        &mut client,
                        spec,
                        run,
                        id,
                        &host,
                        wave,
                        attempts,
                        timeout,
                        work,
                        rollback,
                    );
                    // Ends the renewals at once (they wait on this, not a sleep).
                    drop(done);
                    r
                });
                if lost.load(Ordering::SeqCst) {
                    tracing::warn!(host = %host, "this worker's lease ran out while the host ran; another worker may have taken it");
                }
                result?;
            }
        }
    }
}

/// Renews the lease on `host` every third of the lease until `renewing`'s
/// sender is dropped (the host ended); sets `lost` when the host is no longer
/// this worker's. Waiting on the channel, not polling a flag, lets a host's slot
/// go on to its next host at once: a 50 ms poll here was most of a sim host's
/// time in its slot.
fn renew(
    client: &mut postgres::Client,
    spec: &WorkerSpec,
    run: &str,
    host: &str,
    id: &str,
    renewing: &std::sync::mpsc::Receiver<()>,
    lost: &AtomicBool,
) {
    let every = spec.lease / 3;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = renewing.recv_timeout(every) {
        match fleet::renew(client, run, host, id, spec.lease) {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew a lease"),
        }
    }
}

/// Runs one claimed host to its end and closes its claim.
#[allow(clippy::too_many_arguments)]
fn run_claimed(
    c: &RunControl,
    client: &mut postgres::Client,
    spec: &WorkerSpec,
    run: &str,
    id: &str,
    name: &str,
    wave: usize,
    attempts: usize,
    timeout: Option<Duration>,
    work: &Work<'_>,
    rollback: &Rollback<'_>,
) -> Result<(), FleetError> {
    let err = db(&spec.url);
    let session = &c.session;
    let journal = session
        .run
        .journal
        .clone()
        .ok_or_else(|| FleetError::NoJournal {
            run: run.to_string(),
        })?;
    let note = |e: RolloutEvent| {
        let _ = journal.note_entry(Some(name), &Entry::Rollout(e));
    };
    let Some(host) = session.runtime.inventory.host(name).cloned() else {
        let reason = format!("{name} is not in worker {id}'s inventory");
        note(RolloutEvent::HostFailed {
            host: name.to_string(),
            wave,
            reason: reason.clone(),
        });
        fleet::count_failure(client, run, name).map_err(&err)?;
        fleet::end(client, run, name, id, ClaimState::Failed, Some(&reason)).map_err(&err)?;
        return Ok(());
    };
    let rb = |cause| {
        let rc = RollbackContext {
            cause,
            clock: c.clock.clone(),
        };
        let r = rollback(&host, &rc);
        match &r {
            Ok(()) => note(RolloutEvent::RolledBack {
                host: name.to_string(),
                cause,
            }),
            Err(e) => note(RolloutEvent::RollbackFailed {
                host: name.to_string(),
                cause,
                error: e.clone(),
            }),
        }
        r
    };
    // Taken over from a worker that died: its records say how far it got. A
    // first claim has no records to read (no worker had the host before), and
    // reading them cost a query per host.
    let history = if attempts > 1 {
        journal.adopt_host(name)?
    } else {
        journal.host_state(name)
    };
    if attempts > 1 && history.finished {
        if !history.failed {
            fleet::end(client, run, name, id, ClaimState::Done, None).map_err(&err)?;
            return Ok(());
        }
        fleet::count_failure(client, run, name).map_err(&err)?;
        if !history.rolled_back {
            let _ = rb(RollbackCause::HostFailed);
        }
        fleet::end(
            client,
            run,
            name,
            id,
            ClaimState::Failed,
            Some("failed (its worker stopped before closing the claim)"),
        )
        .map_err(&err)?;
        return Ok(());
    }
    let started = c.clock.now();
    note(RolloutEvent::HostStarted {
        host: name.to_string(),
        wave,
    });
    let hc = HostContext {
        wave,
        started,
        deadline: timeout.and_then(|t| chrono::Duration::from_std(t).ok().map(|t| started + t)),
        clock: c.clock.clone(),
    };
    let began = Instant::now();
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&host, &hc)))
    {
        Ok(o) => o,
        Err(_) => HostOutcome::failed("the host's work panicked"),
    };
    let outcome = match outcome {
        HostOutcome::Done if hc.expired() => HostOutcome::failed("ran past its timeout"),
        o => o,
    };
    match outcome {
        HostOutcome::Done => {
            note(RolloutEvent::HostDone {
                host: name.to_string(),
                wave,
                seconds: began.elapsed().as_secs_f64(),
            });
            fleet::end(client, run, name, id, ClaimState::Done, None).map_err(&err)?;
        }
        HostOutcome::Failed { reason } => {
            note(RolloutEvent::HostFailed {
                host: name.to_string(),
                wave,
                reason: reason.clone(),
            });
            // Counted first: a halt reaches the other workers before this
            // host's rollback is over.
            fleet::count_failure(client, run, name).map_err(&err)?;
            let _ = rb(RollbackCause::HostFailed);
            fleet::end(client, run, name, id, ClaimState::Failed, Some(&reason)).map_err(&err)?;
        }
        HostOutcome::Unreachable { reason } => {
            note(RolloutEvent::HostUnreachable {
                host: name.to_string(),
                wave,
                reason: reason.clone(),
            });
            fleet::end(
                client,
                run,
                name,
                id,
                ClaimState::Unreachable,
                Some(&reason),
            )
            .map_err(&err)?;
        }
        HostOutcome::ControllerFault { reason } => {
            // This worker cannot go on; the host is left to its lease, and
            // another worker takes it over once the lease runs out.
            tracing::error!(host = %name, reason = %reason, "worker stops: its own side failed");
            c.stop.store(true, Ordering::SeqCst);
        }
    }
    let _ = journal.flush();
    Ok(())
}

/// Shared: whether `run` is shared with workers, and its control row.
pub fn control_of(url: &str, run: &str) -> Result<Option<fleet::Control>, FleetError> {
    let mut client = pg::connect(url)?;
    fleet::control(&mut client, run).map_err(db(url))
}

/// Halts a shared run at an operator's word; `None` when the run is not shared,
/// `Some(false)` when it was over already.
pub fn halt(url: &str, run: &str) -> Result<Option<bool>, FleetError> {
    let mut client = pg::connect(url)?;
    if fleet::control(&mut client, run).map_err(db(url))?.is_none() {
        return Ok(None);
    }
    fleet::halt(&mut client, run, "operator")
        .map(Some)
        .map_err(db(url))
}

/// The oldest running shared run, waiting up to `wait` for one to appear.
pub fn find_running(
    url: &str,
    wait: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<Option<String>, FleetError> {
    let err = db(url);
    let mut client = pg::connect(url)?;
    fleet::listen(&mut client).map_err(&err)?;
    let began = Instant::now();
    loop {
        if let Some(run) = fleet::running(&mut client)
            .map_err(&err)?
            .into_iter()
            .next()
        {
            return Ok(Some(run));
        }
        if began.elapsed() >= wait || stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        fleet::wait_notice(&mut client, POLL).map_err(&err)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_halt_reason_reads_back_as_the_stop_the_executor_would_give() {
        assert_eq!(stop_reason(None, 0, 3), StopReason::Completed);
        assert_eq!(
            stop_reason(Some("budget"), 4, 3),
            StopReason::BudgetExhausted {
                failures: 4,
                allowed: 3
            }
        );
        assert_eq!(
            stop_reason(Some("pilot:web1"), 1, 3),
            StopReason::PilotFailed {
                host: "web1".into()
            }
        );
        assert_eq!(
            stop_reason(Some("gate:1:error rate: 3 > 1"), 0, 3),
            StopReason::GateStopped {
                after_wave: 1,
                reason: "error rate: 3 > 1".into()
            }
        );
        assert_eq!(
            stop_reason(Some("window:2"), 0, 3),
            StopReason::WindowClosing { before_wave: 2 }
        );
        assert_eq!(stop_reason(Some("operator"), 0, 3), StopReason::Halted);
    }

    #[test]
    fn a_host_is_pinned_to_the_zone_its_inventory_var_names() {
        let mut h = Host::new("web1");
        assert_eq!(zone_of(&h), None);
        h.vars.insert("zone".into(), serde_json::json!("eu-1"));
        assert_eq!(zone_of(&h).as_deref(), Some("eu-1"));
        h.vars.insert("zone".into(), serde_json::json!(""));
        assert_eq!(zone_of(&h), None, "an empty zone pins nothing");
    }
}
