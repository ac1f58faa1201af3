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
//!
//! Unreachable hosts have their own budget, as in the executor
//! (`max_unreachable`, default `max_failed`): the end of an unreachable host's
//! claim counts it and halts the run as it crosses the limit, in one
//! transaction. `max_unavailable` is kept in the database as well: one counter
//! per capped group, raised by the claim that takes a host only while the group
//! is under its cap and lowered when the host's claim ends (a failed host's after
//! its rollback), so however many workers there are, no more of a group's hosts
//! are in flight than its cap; a host waiting for a place is skipped, not waited
//! for, as the executor's schedule does.
//!
//! Before each wave the window is checked as the executor checks it: the wave
//! starts only if the time left is at least the wave's estimate plus the
//! window's buffer (`wave_estimate` says how the estimate counts workers).
//!
//! Between waves the coordinator asks the gates the executor asks: the metric
//! gate after its soak ([`crate::rollout::MetricGate::evaluate`]), then the
//! playbook's closure. The rollbacks that follow a stop (`on_gate_fail:
//! "rollback_wave"`, `rollback: "all"`) run on the coordinator, not on workers:
//! the executor runs them on its own thread, one host at a time, newest first,
//! once no host is in flight, with the same rollback closure that
//! `patchbook rollback RUN` and a failed host's worker call, so doing them here
//! keeps one code path and one order, needs no claim states for undo work, and
//! works when every worker has already left the halted run. The cost: the
//! coordinator must reach those hosts, so a policy that asks for them with
//! hosts pinned to zones is refused.

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
use crate::rollout::clock::between;
use crate::rollout::policy::RollbackScope;
use crate::rollout::window::after;
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
    let what = if (matches!(p.rollback, RollbackScope::All)
        || matches!(p.on_gate_fail, GateFailAction::RollbackWave))
        && plan.targets.iter().any(|t| zone_of(&t.host).is_some())
    {
        // The coordinator undoes those hosts itself, and a zone is pinned
        // because not every process reaches it.
        Some("`rollback: \"all\"` or `on_gate_fail: \"rollback_wave\"` with hosts pinned to a zone")
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
/// is done and its gates pass, halts when a wave would not fit the window or
/// when asked to stop, undoes what the policy says after a stop,
/// and returns the summary once no host is in flight any more. Runs no host's
/// work.
pub fn coordinate(
    c: &RunControl,
    url: &str,
    plan: &Plan,
    playbook_sha256: &str,
    gate: Option<&dyn Fn(usize) -> Result<bool, String>>,
    rollback: &Rollback<'_>,
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
    // The limits every worker keeps, written (again, on a restart: the
    // counters keep their counts) before any wave opens.
    fleet::set_limits(&mut client, &run, &limits_of(plan)).map_err(&err)?;
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
            let verdict = match ask_gates(c, &mut client, url, &run, plan, gate, w - 1, &event)? {
                Gates::Passed => None,
                Gates::Failed(reason) => Some(reason),
                Gates::Halted => break,
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
            let needed =
                wave_estimate(c, &mut client, url, &run, plan, w)?.saturating_add(window.buffer);
            let left = window.time_left(c.clock.now());
            if left.is_zero() || left < needed {
                fleet::halt(&mut client, &run, &format!("window:{w}")).map_err(&err)?;
                event(RolloutEvent::WindowClosed {
                    before_wave: w,
                    time_left_seconds: left.as_secs_f64(),
                    needed_seconds: needed.as_secs_f64(),
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
    let (unreachable, max_unreachable) =
        fleet::unreachable_limit(&mut client, &run).map_err(&err)?;
    let stop = stop_reason(
        ctl.halt_reason.as_deref(),
        (ctl.failed, ctl.max_failed),
        (unreachable, max_unreachable.unwrap_or(ctl.max_failed)),
    );
    let undone = undo_after_stop(c, &mut client, url, &run, plan, &stop, rollback, &event)?;
    let mut summary = summarize(c, &mut client, &ctl, url)?;
    for (host, result) in &undone {
        if let (Err(e), Some(h)) = (result, summary.hosts.iter_mut().find(|h| &h.name == host)) {
            h.rollback_error = Some(e.clone());
        }
    }
    summary.rollback_order = undone.into_iter().map(|(h, _)| h).collect();
    match summary.stop {
        StopReason::BudgetExhausted { failures, allowed } => {
            event(RolloutEvent::BudgetExhausted { failures, allowed });
        }
        StopReason::UnreachableBudgetExhausted {
            unreachable,
            allowed,
        } => event(RolloutEvent::UnreachableBudgetExhausted {
            unreachable,
            allowed,
        }),
        _ => {}
    }
    event(RolloutEvent::RunDone {
        summary: summary.clone(),
    });
    Ok(summary)
}

/// A host the coordinator rolled back after a stop, and how that went.
type Undone = (String, Result<(), String>);

/// The rollbacks the executor does after a stop, done here by the coordinator:
/// with `on_gate_fail: "rollback_wave"` the hosts the failed gate judged, then,
/// with `rollback: "all"` after a stop for the budget, the pilot or a gate,
/// every host still patched; each newest first by when its claim ended. The
/// undo is `rollback`, the same closure the executor and `patchbook rollback
/// RUN` call, so its records (`host.rollback`, undo steps) are theirs; the host's
/// records, written by workers, are read first ([`crate::journal::Journal::adopt_host`]),
/// and a host already rolled back (a coordinator restarted mid-way) is skipped.
/// Returns each host undone, in order, with its result.
#[allow(clippy::too_many_arguments)]
fn undo_after_stop(
    c: &RunControl,
    client: &mut postgres::Client,
    url: &str,
    run: &str,
    plan: &Plan,
    stop: &StopReason,
    rollback: &Rollback<'_>,
    event: &dyn Fn(RolloutEvent),
) -> Result<Vec<Undone>, FleetError> {
    let Some(journal) = c.session.run.journal.clone() else {
        return Ok(Vec::new());
    };
    let mut done: Vec<fleet::Claim> = fleet::claims(client, run)
        .map_err(db(url))?
        .into_iter()
        .filter(|cl| cl.state == ClaimState::Done)
        .collect();
    done.sort_by(|a, b| b.ended.cmp(&a.ended).then_with(|| b.host.cmp(&a.host)));
    let mut passes: Vec<(RollbackCause, Vec<String>)> = Vec::new();
    if let (StopReason::GateStopped { after_wave, .. }, GateFailAction::RollbackWave) =
        (stop, plan.policy.on_gate_fail)
    {
        let wave = done
            .iter()
            .filter(|cl| cl.wave == *after_wave)
            .map(|cl| cl.host.clone())
            .collect();
        passes.push((RollbackCause::GateFailed, wave));
    }
    let undo_all = plan.policy.rollback.undoes_all_after(stop);
    if undo_all {
        passes.push((
            RollbackCause::RunStopped,
            done.iter().map(|cl| cl.host.clone()).collect(),
        ));
    }
    let mut undone: Vec<Undone> = Vec::new();
    for (cause, hosts) in passes {
        for name in hosts {
            if undone.iter().any(|(h, _)| *h == name) {
                continue;
            }
            if journal.adopt_host(&name)?.rolled_back {
                continue;
            }
            let Some(host) = c.session.runtime.inventory.host(&name).cloned() else {
                let error = format!("{name} is not in the coordinator's inventory");
                event(RolloutEvent::RollbackFailed {
                    host: name.clone(),
                    cause,
                    error: error.clone(),
                });
                undone.push((name, Err(error)));
                continue;
            };
            let rc = RollbackContext {
                cause,
                clock: c.clock.clone(),
            };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rollback(&host, &rc)))
                    .unwrap_or_else(|_| Err("the host's rollback panicked".to_string()));
            match &result {
                Ok(()) => event(RolloutEvent::RolledBack {
                    host: name.clone(),
                    cause,
                }),
                Err(e) => event(RolloutEvent::RollbackFailed {
                    host: name.clone(),
                    cause,
                    error: e.clone(),
                }),
            }
            undone.push((name, result));
        }
    }
    let _ = journal.flush();
    Ok(undone)
}

/// The policy's limits the database keeps for every worker: the unreachable
/// budget (`max_unreachable`, default `max_failed`, as the executor counts it)
/// and each `max_unavailable` cap with the run's hosts in its group.
fn limits_of(plan: &Plan) -> fleet::Limits {
    let caps = plan
        .group_caps()
        .iter()
        .enumerate()
        .map(|(g, (name, cap, _))| {
            let hosts = (0..plan.total())
                .filter(|&i| plan.capped_groups[i].contains(&g))
                .map(|i| plan.host(i).name.clone())
                .collect();
            (name.clone(), *cap, hosts)
        })
        .collect();
    fleet::Limits {
        max_unreachable: plan.unreachable_budget(0).allowed(),
        caps,
    }
}

/// How long wave `w`'s hosts that are left will take, as the executor
/// estimates a wave: the longest host of this run so far (a claim's start to
/// its end, on the database's clock, scaled to the run's clock), or the
/// policy's `estimate` before any host ended, times the rounds the wave needs.
/// The rounds divide the wave by the slots that have claimed hosts of this
/// run so far (a worker's `parallel` slots each count), at least the policy's
/// `parallel`: the coordinator cannot know how many workers will come, so it
/// counts the ones it has seen, and errs towards stopping early.
fn wave_estimate(
    c: &RunControl,
    client: &mut postgres::Client,
    url: &str,
    run: &str,
    plan: &Plan,
    w: usize,
) -> Result<Duration, FleetError> {
    let claims = fleet::claims(client, run).map_err(db(url))?;
    let longest = claims
        .iter()
        .filter_map(|cl| Some(between(cl.started?, cl.ended?)))
        .max();
    let per_host = match longest {
        // Real seconds to the run's clock (a sped-up clock in a rehearsal).
        Some(real) => {
            let hour = Duration::from_secs(3600);
            let real_hour = c.clock.real_duration(hour).as_secs_f64();
            if real_hour > 0.0 {
                real.mul_f64(hour.as_secs_f64() / real_hour)
            } else {
                real
            }
        }
        None => plan.policy.estimate,
    };
    let slots = claims
        .iter()
        .filter_map(|cl| cl.worker.as_deref())
        .collect::<BTreeSet<_>>()
        .len()
        .max(plan.parallel)
        .max(1);
    let left = claims
        .iter()
        .filter(|cl| cl.wave == w && matches!(cl.state, ClaimState::Pending | ClaimState::Claimed))
        .count();
    let rounds = u32::try_from(left.div_ceil(slots)).unwrap_or(u32::MAX);
    Ok(per_host.saturating_mul(rounds))
}

/// What the gates between two waves said.
enum Gates {
    Passed,
    Failed(String),
    /// The run was halted (an operator's stop, the budget) during the soak.
    Halted,
}

/// The gates after `after_wave`, as the executor asks them: the metric gate's
/// soak (watching for a halt) and evaluation ([`crate::rollout::MetricGate`]),
/// then, if it passed, the playbook's closure gate; each answer is a
/// `GateEvaluated` event. The first "no" is the reason the run stops.
#[allow(clippy::too_many_arguments)]
fn ask_gates(
    c: &RunControl,
    client: &mut postgres::Client,
    url: &str,
    run: &str,
    plan: &Plan,
    closure: Option<&dyn Fn(usize) -> Result<bool, String>>,
    after_wave: usize,
    event: &dyn Fn(RolloutEvent),
) -> Result<Gates, FleetError> {
    let err = db(url);
    let soak = plan
        .policy
        .gate
        .as_ref()
        .map(|g| g.soak)
        .filter(|s| !s.is_zero());
    if let Some(soak) = soak {
        event(RolloutEvent::Soaking {
            after_wave,
            seconds: soak.as_secs_f64(),
        });
        // On the run's clock, in short real slices: a halt ends the soak within
        // a quarter second (an operator's stop) or one look at the database.
        let end = after(c.clock.now(), soak);
        loop {
            if c.stop.load(Ordering::SeqCst) {
                fleet::halt(client, run, "operator").map_err(&err)?;
            }
            let phase = fleet::control(client, run)
                .map_err(&err)?
                .map_or(Phase::Halted, |x| x.phase);
            if phase != Phase::Running {
                return Ok(Gates::Halted);
            }
            if c.clock.step_toward(end) {
                break;
            }
        }
    }
    let soaked = soak.unwrap_or(Duration::ZERO);
    if let Some(g) = &plan.policy.gate {
        let verdict = g.evaluate(after_wave, soaked);
        let failed = (!verdict.passed).then(|| format!("{}: {}", g.query, verdict.detail));
        event(RolloutEvent::GateEvaluated(verdict));
        if let Some(reason) = failed {
            return Ok(Gates::Failed(reason));
        }
    }
    let Some(closure) = closure else {
        return Ok(Gates::Passed);
    };
    let verdict = crate::rollout::gate::closure_verdict(after_wave, closure(after_wave), soaked);
    let (passed, detail) = (verdict.passed, verdict.detail.clone());
    event(RolloutEvent::GateEvaluated(verdict));
    Ok(if passed {
        Gates::Passed
    } else {
        Gates::Failed(detail)
    })
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
    let (unreachable, max_unreachable) =
        fleet::unreachable_limit(client, &ctl.run).map_err(&err)?;
    let allowed_unreachable = max_unreachable.unwrap_or(ctl.max_failed);
    let stop = stop_reason(
        ctl.halt_reason.as_deref(),
        (ctl.failed, ctl.max_failed),
        (unreachable, allowed_unreachable),
    );
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
            // Patched, then undone after the run stopped (a failed gate,
            // `rollback: "all"`).
            ClaimState::Done if rolled_back => HostStatus::Reverted,
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
        allowed_unreachable,
        totals,
        per_group,
        hosts,
        completion_order: done_order.into_iter().map(|(_, h)| h).collect(),
        rollback_order: Vec::new(),
    })
}

/// The summary's stop reason from the control row's `halt_reason` (`budget`,
/// `unreachable`, `pilot:HOST`, `gate:WAVE:WHY`, `window:WAVE`, `operator`),
/// none when the run finished; the budgets are (count, allowed).
fn stop_reason(
    halt: Option<&str>,
    (failed, max_failed): (usize, usize),
    (unreachable, max_unreachable): (usize, usize),
) -> StopReason {
    match halt {
        None => StopReason::Completed,
        Some("budget") => StopReason::BudgetExhausted {
            failures: failed,
            allowed: max_failed,
        },
        Some("unreachable") => StopReason::UnreachableBudgetExhausted {
            unreachable,
            allowed: max_unreachable,
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
        let claimed = fleet::claim(&mut client, run, id, spec.zone.as_deref(), spec.lease);
        match claimed.map_err(&err)? {
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
        fleet::end_claim(client, run, name, id, ClaimState::Failed, Some(&reason)).map_err(&err)?;
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
            fleet::end_claim(client, run, name, id, ClaimState::Done, None).map_err(&err)?;
            return Ok(());
        }
        fleet::count_failure(client, run, name).map_err(&err)?;
        if !history.rolled_back {
            let _ = rb(RollbackCause::HostFailed);
        }
        fleet::end_claim(
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
            fleet::end_claim(client, run, name, id, ClaimState::Done, None).map_err(&err)?;
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
            fleet::end_claim(client, run, name, id, ClaimState::Failed, Some(&reason))
                .map_err(&err)?;
        }
        HostOutcome::Unreachable { reason } => {
            note(RolloutEvent::HostUnreachable {
                host: name.to_string(),
                wave,
                reason: reason.clone(),
            });
            fleet::end_claim(
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
        assert_eq!(stop_reason(None, (0, 3), (0, 3)), StopReason::Completed);
        assert_eq!(
            stop_reason(Some("budget"), (4, 3), (0, 3)),
            StopReason::BudgetExhausted {
                failures: 4,
                allowed: 3
            }
        );
        assert_eq!(
            stop_reason(Some("pilot:web1"), (1, 3), (0, 3)),
            StopReason::PilotFailed {
                host: "web1".into()
            }
        );
        assert_eq!(
            stop_reason(Some("gate:1:error rate: 3 > 1"), (0, 3), (0, 3)),
            StopReason::GateStopped {
                after_wave: 1,
                reason: "error rate: 3 > 1".into()
            }
        );
        assert_eq!(
            stop_reason(Some("window:2"), (0, 3), (0, 3)),
            StopReason::WindowClosing { before_wave: 2 }
        );
        assert_eq!(
            stop_reason(Some("unreachable"), (0, 3), (2, 1)),
            StopReason::UnreachableBudgetExhausted {
                unreachable: 2,
                allowed: 1
            }
        );
        assert_eq!(
            stop_reason(Some("operator"), (0, 3), (0, 3)),
            StopReason::Halted
        );
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
