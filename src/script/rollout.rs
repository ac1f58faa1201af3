//! `window()`, `param()`, `test()` and `rollout()`: the bridge from a playbook to
//! the run core ([`RunControl`]) and the rollout engine.
//!
//! This module adapts Rhai values and closures and owns nothing of a run: the
//! journal, host states, notifications and plan results are the run core's; the
//! policy, waves, budget and ordering are the rollout layer's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rhai::{
    Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext,
};

use super::patch::no_unknown_keys;
use super::playbook::{to_json, CompiledPlaybook, HostClosure};
use super::register::ScriptHost;
use crate::inventory::Host;
use crate::journal::entry::{
    Entry, HostEndDetail, HostUnreachable, RolloutPlan, RolloutResume, SoakPlanned, WindowRecord,
};
use crate::rollout::{
    Clock, Executor, HostContext, HostOutcome, Plan, Policy, RollbackContext, RolloutEvent, Target,
    Window,
};
use crate::run::{fleet, FleetRole, HostPlan, RunControl};

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Keys of `window(spec, #{ … })`; `patchbook check` reads the same list.
pub const WINDOW_OPTION_KEYS: &[&str] = &["buffer"];
/// Keys of `test(name, kind, #{ … }, check)`.
pub const TEST_OPTION_KEYS: &[&str] = &["patch_version"];

/// `plan`: every target's work runs once with changes recording instead of acting,
/// whatever the budget or pilot would decide, so the plan shows every host: what
/// it would change, or the error that would stop it.
fn plan_hosts(
    c: &Arc<RunControl>,
    plan: &Plan,
    closure: &HostClosure,
    engine: &Engine,
    budget: Duration,
    sources: Option<&CompiledPlaybook>,
    unreachable: Vec<(Host, String)>,
) -> RhaiResult<Map> {
    let ordered: Vec<&Host> = plan.run_order().into_iter().map(|i| plan.host(i)).collect();
    let rt = &c.session.runtime;
    let stack = Some(super::engine::stack_size(engine));
    let results = crate::rollout::pool::map_bounded_on_stack(&ordered, rt.forks, stack, |h| {
        let r = closure.call(engine, ScriptHost::new((*h).clone()), budget, None);
        HostPlan {
            host: h.name.clone(),
            error: r.err().map(|e| host_failure(&e, sources)),
        }
    });
    let failed: Array = results
        .iter()
        .filter(|p| p.error.is_some())
        .map(|p| Dynamic::from(p.host.clone()))
        .collect();
    for p in results {
        c.push_host_plan(p);
    }
    // A host a probe could not connect to is in no plan: say so, so the plan
    // does not silently show fewer hosts than the fleet has.
    for (h, reason) in unreachable {
        c.push_host_plan(HostPlan {
            host: h.name.clone(),
            error: Some(format!("unreachable: {reason}")),
        });
    }
    let mut m = Map::new();
    m.insert("stop".into(), "planned".into());
    m.insert(
        "targets".into(),
        i64::try_from(ordered.len()).unwrap_or(i64::MAX).into(),
    );
    m.insert("failed".into(), Dynamic::from_array(failed));
    m.insert("pending".into(), Dynamic::from_array(Array::new()));
    Ok(m)
}

fn fail<T>(ctx: &NativeCallContext, message: impl Into<String>) -> RhaiResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        ctx.call_position(),
    )))
}

fn control<'a>(
    ctx: &NativeCallContext,
    c: &'a Option<Arc<RunControl>>,
    what: &str,
) -> RhaiResult<&'a Arc<RunControl>> {
    match c {
        Some(c) => Ok(c),
        None => fail(
            ctx,
            format!(
                "{what}() cannot run while modules are being compiled; call it from the playbook"
            ),
        ),
    }
}

/// The innermost message of a script error: what failed, not the call chain.
pub fn root_message(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
        | EvalAltResult::ErrorInModule(_, inner, _) => root_message(inner),
        EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        other => other.to_string(),
    }
}

/// A JSON value as a Rhai value.
pub fn from_json(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        Value::Object(m) => {
            let map: Map = m
                .iter()
                .map(|(k, v)| (k.as_str().into(), from_json(v)))
                .collect();
            Dynamic::from_map(map)
        }
    }
}

/// Registers `window` and `rollout`. Without a control (compile time) they exist
/// but refuse to run.
/// `sources` is the playbook the run executes: a host's failure reason names the
/// file, line and column where its work stopped.
pub fn register_rollout(
    engine: &mut Engine,
    control_: Option<Arc<RunControl>>,
    sources: Option<Arc<CompiledPlaybook>>,
) {
    super::monitor::register_monitor(engine, control_.clone());
    let c = control_.clone();
    let window_fn = move |ctx: NativeCallContext, spec: &str, opts: Map| -> RhaiResult<()> {
        let c = control(&ctx, &c, "window")?;
        if let Err(e) = no_unknown_keys(&opts, WINDOW_OPTION_KEYS) {
            return fail(&ctx, format!("window: {e}"));
        }
        let buffer = opts
            .get("buffer")
            .map(|b| b.to_string())
            .unwrap_or_else(|| "0s".into());
        let w = match Window::with_buffer(spec, &buffer) {
            Ok(w) => w,
            Err(e) => return fail(&ctx, format!("window: {e}")),
        };
        let now = c.clock.now();
        let open = w.contains(now);
        let start = if open { Some(now) } else { w.next_start(now) };
        let end = if open {
            w.current_end(now)
        } else {
            start.and_then(|t| w.current_end(t))
        };
        c.record(
            None,
            Entry::Window(WindowRecord {
                spec: spec.to_string(),
                zone: spec.split_whitespace().last().map(str::to_string),
                buffer: Some(buffer),
                open: Some(open),
                start: start.map(|t| w.display_time(t)),
                end: end.map(|t| w.display_time(t)),
            }),
        );
        c.set_window(w);
        Ok(())
    };
    let w2 = window_fn.clone();
    FuncRegistration::new("window")
        .with_volatility(true)
        .with_params_info(["spec: &str", "()"])
        .with_comments(["/// Sets the maintenance window for the rollouts that follow, e.g.\n/// `window(\"Sat 02:00-06:00 Asia/Hong_Kong\")`. A rollout refuses to start outside it."])
        .register_into_engine(engine, move |ctx: NativeCallContext, spec: &str| w2(ctx, spec, Map::new()));
    FuncRegistration::new("window")
        .with_volatility(true)
        .with_params_info(["spec: &str", "opts: Map", "()"])
        .with_comments(["/// Sets the maintenance window with options: `#{ buffer: \"30m\" }` keeps that much\n/// time in reserve; no wave starts unless it fits before the end minus the buffer."])
        .register_into_engine(engine, window_fn);

    let c = control_.clone();
    FuncRegistration::new("param")
        .with_volatility(true)
        .with_params_info(["name: &str", "String"])
        .with_comments(["/// The value of `--param NAME=VALUE` from the command line; an error names the\n/// missing variable."])
        .register_into_engine(engine, move |ctx: NativeCallContext, name: &str| -> RhaiResult<String> {
            let c = control(&ctx, &c, "param")?;
            match c.var(name) {
                Some(v) => Ok(v.clone()),
                None => fail(&ctx, format!("param(\"{name}\") is not set; pass it as `--param {name}=VALUE`")),
            }
        });
    let c = control_.clone();
    FuncRegistration::new("param")
        .with_volatility(true)
        .with_params_info(["name: &str", "default: &str", "String"])
        .with_comments([
            "/// The value of `--param NAME=VALUE`, or `default` when it was not given.",
        ])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, name: &str, default: &str| -> RhaiResult<String> {
                let c = control(&ctx, &c, "param")?;
                Ok(c.var(name).cloned().unwrap_or_else(|| default.to_string()))
            },
        );

    let c = control_.clone();
    let test_fn = move |ctx: NativeCallContext,
                        name: &str,
                        kind: &str,
                        opts: Map,
                        check: FnPtr|
          -> RhaiResult<bool> {
        let c = control(&ctx, &c, "test")?;
        if let Err(e) = no_unknown_keys(&opts, TEST_OPTION_KEYS) {
            return fail(&ctx, format!("test: {e}"));
        }
        let kind: crate::report::TestKind = match kind.parse() {
            Ok(k) => k,
            Err(e) => return fail(&ctx, format!("test: {e}")),
        };
        let patch_version = opts.get("patch_version").map(|v| v.to_string());
        let closure = HostClosure::from_context(&ctx, check);
        let budget = Duration::from_secs(c.session.runtime.config.limits.deadline_secs.max(1));
        let engine = ctx.engine();
        let case = crate::report::TestCase::run(name, kind, patch_version, || {
            match closure.call_with(
                engine,
                Dynamic::UNIT,
                Vec::new(),
                budget,
                Some(c.stop.clone()),
            ) {
                Ok(v) if v.is_map() => serde_json::from_value(to_json(&v)).map(Some).map_err(|e| {
                    format!("a check returns () or #{{ before, after, threshold_pct, unit }}: {e}")
                }),
                Ok(_) => Ok(None),
                Err(e) => Err(root_message(&e)),
            }
        });
        if let (Some(j), false) = (&c.session.run.journal, c.planning()) {
            if let Err(e) = case.record(j, None) {
                return fail(&ctx, format!("test: cannot write the journal: {e}"));
            }
        }
        Ok(case.ok)
    };
    let t2 = test_fn.clone();
    FuncRegistration::new("test")
        .with_volatility(true)
        .with_params_info(["name: &str", "kind: &str", "check: FnPtr", "bool"])
        .with_comments(["/// A staging check for the test report: `kind` is functional, integration,\n/// performance or regression; the closure throws to fail, or returns\n/// `#{ before, after, threshold_pct, unit }` for a performance check. Returns pass."])
        .register_into_engine(engine, move |ctx: NativeCallContext, name: &str, kind: &str, check: FnPtr| {
            t2(ctx, name, kind, Map::new(), check)
        });
    FuncRegistration::new("test")
        .with_volatility(true)
        .with_params_info([
            "name: &str",
            "kind: &str",
            "opts: Map",
            "check: FnPtr",
            "bool",
        ])
        .with_comments(["/// A staging check with options: `#{ patch_version: \"1.0.1\" }`."])
        .register_into_engine(engine, test_fn);

    let c = control_;
    let src = sources;
    FuncRegistration::new("rollout")
        .with_volatility(true)
        .with_params_info(["targets: Array", "policy: Map", "work: FnPtr", "Map"])
        .with_comments(["/// Runs `work(host)` over the targets: pilot first, then waves, under one failure\n/// budget, inside the window. A host whose work throws is rolled back (its undo\n/// steps, newest first); one that cannot be connected to is unreachable, counted\n/// against `max_unreachable`. Returns `#{ stop, totals, per_group, failed, unreachable, pending }`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, targets: Array, policy: Map, work: FnPtr| -> RhaiResult<Map> {
                let c = control(&ctx, &c, "rollout")?;
                rollout(&ctx, c, src.as_deref(), targets, policy, work)
            },
        );
}

/// How long reading a host's state for a rehearsal may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The rollback rehearsal on a pilot host: its state, the work, the rollback,
/// its state again (which must equal the first), then the work once more. A
/// rehearsal that does not restore the state fails the host, so the pilot stops
/// the run before the first wave.
fn rehearse(
    c: &Arc<RunControl>,
    host: &Host,
    scope: &crate::primitives::snapshot::Scope,
    work: impl Fn() -> RhaiResult<Dynamic>,
) -> RhaiResult<Dynamic> {
    let session = &c.session;
    let stop = |m: String| -> RhaiResult<Dynamic> {
        Err(Box::new(EvalAltResult::ErrorRuntime(
            m.into(),
            rhai::Position::NONE,
        )))
    };
    let before = match session.with_host(host, |hc| scope.read(hc, SNAPSHOT_TIMEOUT)) {
        Ok(s) => s,
        Err(e) => {
            return stop(format!(
                "rollback rehearsal: cannot read the state before: {e}"
            ))
        }
    };
    let _ = work()?;
    let (undone, error) = match session.with_host(host, crate::primitives::undo::rollback) {
        Ok(rep) if rep.manual.is_empty() => (rep.undone, None),
        Ok(rep) => (rep.undone.clone(), Some(rep.partial())),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let differences = match session.with_host(host, |hc| scope.read(hc, SNAPSHOT_TIMEOUT)) {
        Ok(after) => after.differences(&before),
        Err(e) => vec![format!("cannot read the state after the rollback: {e}")],
    };
    let ok = error.is_none() && differences.is_empty();
    c.record(
        Some(&host.name),
        Entry::Rehearsal(crate::journal::entry::RehearsalRecord {
            ok,
            compared: before.size(),
            undone,
            differences: differences.clone(),
            error: error.clone(),
        }),
    );
    let case = crate::report::TestCase::run(
        format!("rollback rehearsal on {}", host.name),
        crate::report::TestKind::Functional,
        None,
        || match (&error, differences.is_empty()) {
            (Some(e), _) => Err(format!("the rollback failed: {e}")),
            (None, false) => Err(format!(
                "the rollback did not restore the state: {}",
                differences.join("; ")
            )),
            (None, true) => Ok(None),
        },
    );
    if let Some(j) = &session.run.journal {
        let _ = case.record(j, Some(&host.name));
    }
    if !ok {
        let why = error.unwrap_or_else(|| {
            let shown: Vec<&str> = differences.iter().take(5).map(String::as_str).collect();
            let more = differences.len().saturating_sub(5);
            let more = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            format!("{}{more}", shown.join("; "))
        });
        return stop(format!(
            "rollback rehearsal: the rollback did not restore the state before the patch: {why}; no wave starts until the undo is fixed"
        ));
    }
    work()
}

/// A host's failure as one line: the innermost message and, when the playbook is
/// known, where it happened.
fn host_failure(e: &EvalAltResult, sources: Option<&CompiledPlaybook>) -> String {
    let message = root_message(e);
    match sources.and_then(|pb| pb.diagnose(e).location) {
        Some(at) => format!("{message} (at {at})"),
        None => message,
    }
}

fn rollout(
    ctx: &NativeCallContext,
    c: &Arc<RunControl>,
    sources: Option<&CompiledPlaybook>,
    targets: Array,
    mut policy: Map,
    work: FnPtr,
) -> RhaiResult<Map> {
    let session = &c.session;
    let rt = &session.runtime;
    c.record_params();
    // The script's own host values, shared rather than copied (see `Target`).
    let mut hosts: Vec<Arc<Host>> = Vec::with_capacity(targets.len());
    for (i, t) in targets.into_iter().enumerate() {
        match t.try_cast::<ScriptHost>() {
            Some(h) => hosts.push(h.0),
            None => {
                return fail(
                    ctx,
                    format!("rollout: targets[{i}] is not a host; build targets with hosts(\"…\")"),
                )
            }
        }
    }
    // A resumed run leaves alone the hosts the journal saw to the end, takes back
    // the ones it had begun (see `RunControl::take_unfinished`), and checks the
    // pilot against the journal: one that passed before the restart is not asked
    // for again, and pilot hosts are looked for among the targets as they are now.
    let unfinished = c.take_unfinished();
    if c.has_finished_hosts() || !unfinished.is_empty() {
        let before = hosts.len();
        hosts.retain(|h| !c.is_finished(&h.name));
        let skipped_finished = before - hosts.len();
        let mut rechecked = Vec::new();
        for name in unfinished {
            if hosts.iter().any(|h| h.name == name) {
                continue;
            }
            // A host gone from the inventory cannot be reached; `report` shows its
            // open steps and `rollback` names it.
            if let Some(h) = rt.inventory.host(&name) {
                hosts.push(Arc::new(h.clone()));
                rechecked.push(name);
            }
        }
        let mut pilot_passed = false;
        if let Some(pilot) = policy.remove("pilot") {
            match pilot.clone().try_cast::<Array>() {
                Some(list) => {
                    let name_of = |p: &Dynamic| {
                        p.clone()
                            .try_cast::<ScriptHost>()
                            .map(|h| h.name().to_string())
                            .unwrap_or_else(|| p.to_string())
                    };
                    let passed = list.iter().any(|p| c.is_finished(&name_of(p)));
                    let left: Array = list
                        .iter()
                        .filter(|p| {
                            let name = name_of(p);
                            !c.is_finished(&name) && hosts.iter().any(|h| h.name == name)
                        })
                        .cloned()
                        .collect();
                    if !left.is_empty() {
                        policy.insert("pilot".into(), Dynamic::from_array(left));
                    } else if passed {
                        pilot_passed = true;
                    } else {
                        // Nothing of the pilot ran before the restart: the pilot
                        // stands as the playbook gave it, checked as on a fresh run.
                        policy.insert("pilot".into(), pilot);
                    }
                }
                None => {
                    policy.insert("pilot".into(), pilot);
                }
            }
        }
        c.record(
            None,
            Entry::RolloutResume(RolloutResume {
                skipped_finished,
                rechecked,
                pilot_passed,
            }),
        );
    }
    let gate = match policy.remove("gate") {
        None => None,
        // A metric gate is policy: the rollout layer parses and asks it.
        Some(g) if g.is_map() => {
            policy.insert("gate".into(), g);
            None
        }
        Some(g) => match g.try_cast::<FnPtr>() {
            Some(f) => Some(HostClosure::from_context(ctx, f)),
            None => {
                return fail(
                    ctx,
                    "rollout: `gate` must be a closure, e.g. `gate: || http_check(url) == 200`, or a metric gate #{ prometheus: URL, query: PROMQL, max: N }",
                )
            }
        },
    };
    // What happens after the run is not the rollout layer's: parsed here, journaled
    // at the end as `soak.planned`.
    let soak = match policy.remove("soak") {
        None => None,
        Some(v) => match v.try_cast::<Map>() {
            Some(m) => match super::soak::parse(&m) {
                Ok(spec) => Some((spec, to_json(&Dynamic::from_map(m)))),
                Err(e) => return fail(ctx, format!("rollout policy: {e}")),
            },
            None => {
                return fail(
                    ctx,
                    "rollout policy: `soak` must be a map like #{ period: \"72h\", every: \"15m\", thresholds: #{ error_rate: \"2x\" } }",
                )
            }
        },
    };
    let policy_json = to_json(&Dynamic::from_map(policy));
    let policy = match Policy::from_value(&policy_json) {
        Ok(p) => p,
        Err(e) => return fail(ctx, format!("rollout policy: {e}")),
    };
    let targets: Vec<Target> = hosts
        .iter()
        .map(|h| Target::shared(&rt.inventory, h.clone()))
        .collect();
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    // One run per host: the rollout takes its whole target set here, once the
    // playbook has chosen it, and before its plan is recorded or any host is
    // touched. `hosts()` and probes (`needing()`) before this point never wait
    // on another run, and `plan` never claims; a change outside any rollout
    // claims its own host on the way (see `HostCtx::claim_host`).
    if !c.planning() {
        if let Err(message) = c.claim_targets(&names) {
            return fail(ctx, format!("rollout: {message}"));
        }
    }
    // Hosts a probe (`needing()`) could not connect to were left out of the
    // targets; this rollout reports them and charges them to `max_unreachable`.
    let unreachable_before: Vec<(Host, String)> = session
        .take_unreachable()
        .into_iter()
        .filter(|(name, _)| !names.contains(name))
        .filter_map(|(name, reason)| rt.inventory.host(&name).map(|h| (h.clone(), reason)))
        .collect();
    let plan = match Plan::build(targets, &policy, rt.forks) {
        Ok(p) => p,
        Err(e) => return fail(ctx, format!("rollout: {e}")),
    };
    c.push_plan(plan.to_string());
    c.record(
        None,
        Entry::RolloutPlan(RolloutPlan {
            policy: policy_json.clone(),
            plan: plan.to_string(),
            groups: hosts
                .iter()
                .map(|h| (h.name.clone(), h.groups.clone()))
                .collect(),
        }),
    );

    let closure = HostClosure::from_context(ctx, work);
    let engine = ctx.engine();
    let budget = Duration::from_secs(rt.config.limits.deadline_secs.max(1));
    let cancel = Some(c.stop.clone());
    let planning = c.planning();
    if planning {
        return plan_hosts(
            c,
            &plan,
            &closure,
            engine,
            budget,
            sources,
            unreachable_before,
        );
    }
    let clock = if planning {
        Clock::manual(c.clock.now())
    } else {
        c.clock.clone()
    };

    // A resumed rollout may have stopped on its gate: it goes on only once the
    // gate passes again.
    let resumed = c.has_finished_hosts();
    let mut ex = Executor::new(&plan)
        .gate_before_first_wave(resumed)
        .unreachable_before(unreachable_before)
        .clock(clock)
        .halt_on(c.stop.clone())
        .worker_stack(super::engine::stack_size(engine));
    if let (Some(w), false) = (c.window(), planning) {
        ex = ex.window(w);
    }
    if let Some(g) = &gate {
        let cancel = cancel.clone();
        ex = ex.gate(move |_| {
            match g.call_with(engine, Dynamic::UNIT, Vec::new(), budget, cancel.clone()) {
                Ok(v) => v
                    .as_bool()
                    .map_err(|t| format!("the gate returned {t}, not true or false")),
                Err(e) => Err(root_message(&e)),
            }
        });
    }
    let names_for_events = names.clone();
    let cc = c.clone();
    ex = ex
        .observer(move |at: DateTime<Utc>, e: &RolloutEvent| cc.on_event(at, e, &names_for_events));

    let journal = session.run.journal.clone();
    let rehearsal = plan.policy.rehearse_rollback.clone();
    let pilot_wave = plan
        .waves
        .iter()
        .find(|w| matches!(w.kind, crate::rollout::WaveKind::Pilot))
        .map(|w| w.index);
    if rehearsal.is_some() && pilot_wave.is_none() && !resumed {
        return fail(
            ctx,
            "rollout: `rehearse_rollback` rehearses on the pilot; give the policy a `pilot`",
        );
    }
    let work = |host: &Host, hc: &HostContext| -> HostOutcome {
        if c.is_finished(&host.name) {
            return HostOutcome::Done;
        }
        if c.stop.load(Ordering::SeqCst) {
            return HostOutcome::failed(
                "stopped before this host began (the controller is shutting down)",
            );
        }
        let deadline = hc
            .remaining()
            .map(|left| Instant::now() + hc.clock.real_duration(left));
        session.set_deadline(&host.name, deadline);
        // A connection failure from before this host's work (a probe) is not its.
        let _ = session.take_lost(&host.name);
        // The host's timeout ends the script too, not only its commands: a
        // closure busy in a loop after its last command would otherwise hold
        // the host's slot until limits.deadline_secs.
        let call = || {
            let host_left = hc.remaining().map(|left| hc.clock.real_duration(left));
            match host_left {
                Some(left) if left < budget => closure.call_until(
                    engine,
                    ScriptHost::new(host.clone()),
                    left,
                    "the rollout's per-host timeout",
                    cancel.clone(),
                ),
                _ => closure.call(
                    engine,
                    ScriptHost::new(host.clone()),
                    budget,
                    cancel.clone(),
                ),
            }
        };
        let r = match (&rehearsal, pilot_wave) {
            (Some(scope), Some(p)) if hc.wave == p => rehearse(c, host, scope, call),
            _ => call(),
        };
        session.set_deadline(&host.name, None);
        // A controller-side stop (disk full, a backup cap) noted by a primitive
        // is the controller's, even when the script caught and rethrew it.
        let fault = session.run.take_controller_fault(&host.name);
        // The work stopped because the host could not be connected to: it is
        // unreachable, not failed (nothing ran that a rollback could reach).
        let lost = session.take_lost(&host.name);
        let outcome = match (&r, fault, lost) {
            (Ok(_), _, _) => HostOutcome::Done,
            (Err(_), Some(reason), _) => HostOutcome::ControllerFault { reason },
            (Err(_), None, Some(reason)) => HostOutcome::Unreachable { reason },
            (Err(e), None, None) => HostOutcome::failed(host_failure(e, sources)),
        };
        let reason = match &outcome {
            HostOutcome::Done => None,
            HostOutcome::Failed { reason } => Some(reason.clone()),
            // No end is recorded: the host stays unfinished for `run --resume`.
            HostOutcome::ControllerFault { .. } => return outcome,
            HostOutcome::Unreachable { reason } => {
                if let (Some(j), false) = (&journal, planning) {
                    let entry = Entry::HostUnreachable(HostUnreachable {
                        step: "rollout".into(),
                        reason: reason.clone(),
                    });
                    let _ = j.note_entry(Some(&host.name), &entry);
                }
                return outcome;
            }
        };
        if let (Some(j), false) = (&journal, planning) {
            let detail = HostEndDetail {
                reason,
                ..Default::default()
            };
            let _ = j.host_finished(&host.name, outcome == HostOutcome::Done, detail);
        }
        outcome
    };
    let host_timeout = policy.timeout;
    let rollback = |host: &Host, rc: &RollbackContext| -> Result<(), String> {
        // A host's rollback gets as long again as its work did: a host that hangs
        // (its shell after login, a command) must give its slot back, not hold
        // it for as long as each undo command's own timeout allows.
        let deadline = host_timeout.map(|t| Instant::now() + rc.clock.real_duration(t));
        session.set_deadline(&host.name, deadline);
        let r = session.with_host(host, crate::primitives::undo::rollback);
        session.set_deadline(&host.name, None);
        let cause = Some(rc.cause);
        let (ok, detail, result) = match r {
            Ok(rep) if rep.manual.is_empty() => (
                true,
                HostEndDetail {
                    undone: rep.undone,
                    cause,
                    ..Default::default()
                },
                Ok(()),
            ),
            Ok(rep) => {
                let why = format!("failed, not fully reverted: {}", rep.partial());
                let detail = HostEndDetail {
                    undone: rep.undone,
                    manual: rep.manual,
                    cause,
                    ..Default::default()
                };
                (false, detail, Err(why))
            }
            Err(e) => (
                false,
                HostEndDetail {
                    error: Some(e.to_string()),
                    cause,
                    ..Default::default()
                },
                Err(e.to_string()),
            ),
        };
        if let (Some(j), false) = (&journal, planning) {
            let _ = j.host_rolled_back(&host.name, ok, detail);
        }
        result
    };
    let summary = match c.fleet() {
        None => ex.run(work, rollback).map_err(|e| e.to_string()),
        Some(FleetRole::Coordinator { url }) => {
            let ask = |_after: usize| -> Result<bool, String> {
                match &gate {
                    None => Ok(true),
                    Some(g) => {
                        match g.call_with(engine, Dynamic::UNIT, Vec::new(), budget, cancel.clone())
                        {
                            Ok(v) => v
                                .as_bool()
                                .map_err(|t| format!("the gate returned {t}, not true or false")),
                            Err(e) => Err(root_message(&e)),
                        }
                    }
                }
            };
            let closure_gate: Option<&dyn Fn(usize) -> Result<bool, String>> =
                gate.is_some().then_some(&ask);
            let sha = sources.map(|p| p.sha256.clone()).unwrap_or_default();
            fleet::coordinate(c, url, &plan, &sha, closure_gate, &rollback, &names)
                .map_err(|e| e.to_string())
        }
        Some(FleetRole::Worker(spec)) => {
            let served = fleet::serve(
                c,
                spec,
                host_timeout,
                &work,
                &rollback,
                super::engine::stack_size(engine),
            );
            // A worker's part ends here: what the playbook does after its rollout
            // (reports, notices) is the coordinator's.
            return match served {
                Ok(()) => Err(Box::new(EvalAltResult::ErrorTerminated(
                    Dynamic::from("worker done"),
                    ctx.call_position(),
                ))),
                Err(e) => fail(ctx, format!("worker: {e}")),
            };
        }
    };
    // Progress and host ends ride on group commits; before the playbook goes on
    // (a report, a notice to people) everything this rollout wrote is on disk.
    if let (Some(j), false) = (&journal, planning) {
        if let Err(e) = j.flush() {
            return fail(
                ctx,
                format!("rollout: cannot make the journal durable: {e}"),
            );
        }
    }
    let summary = match summary {
        Ok(s) => s,
        Err(e) => return fail(ctx, e),
    };
    if let (Some((spec, options)), false) = (&soak, planning) {
        let hosts: Vec<String> = summary
            .hosts
            .iter()
            .filter(|h| h.state == crate::rollout::HostStatus::Done)
            .map(|h| h.name.clone())
            .collect();
        if !hosts.is_empty() {
            c.record(
                None,
                Entry::SoakPlanned(SoakPlanned {
                    hosts,
                    period_seconds: spec.period.as_secs_f64(),
                    every_seconds: spec.every.as_secs_f64(),
                    options: options.clone(),
                }),
            );
        }
    }
    c.push_summary(summary.clone());
    // The script gets the counts; the per-host detail stays in the journal, so a
    // 10,000-host rollout does not meet the sandbox's map and array limits.
    let mut brief = serde_json::to_value(&summary).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut brief {
        for k in ["hosts", "completion_order", "rollback_order"] {
            m.remove(k);
        }
        m.insert("pending".into(), summary.pending_hosts().into());
        m.insert(
            "failed".into(),
            summary
                .hosts
                .iter()
                .filter(|h| h.state == crate::rollout::HostStatus::Failed)
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
                .into(),
        );
        m.insert(
            "unreachable".into(),
            summary
                .hosts
                .iter()
                .filter(|h| h.state == crate::rollout::HostStatus::Unreachable)
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
                .into(),
        );
    }
    match from_json(&brief).try_cast::<Map>() {
        Some(m) => Ok(m),
        None => Ok(Map::new()),
    }
}
