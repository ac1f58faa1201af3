//! `window()` and `rollout()`: the bridge from a playbook to the rollout engine.
//!
//! A [`RunControl`] holds what one run's rollouts share: the session, the clock,
//! the maintenance window, the event sink (progress display, journal) and the
//! summaries the CLI turns into an exit code. Every rollout event goes to the
//! journal as a `rollout.event` record before the sink sees it. This module adapts;
//! the policy, waves, budget and ordering are the rollout layer's.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rhai::{
    Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext,
};

use super::patch::no_unknown_keys;
use super::playbook::{to_json, HostClosure};
use super::register::ScriptHost;
use super::session::Session;
use crate::inventory::Host;
use crate::primitives::notify;
use crate::primitives::Mode;
use crate::rollout::{
    Clock, Executor, HostContext, HostOutcome, Plan, Policy, RollbackContext, RolloutEvent,
    Summary, Target, Window,
};

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Receives every rollout event after the journal has it (progress display).
pub type EventSink = Arc<dyn Fn(DateTime<Utc>, &RolloutEvent) + Send + Sync>;

/// Keys of `window(spec, #{ … })`; `patchbook check` reads the same list.
pub const WINDOW_OPTION_KEYS: &[&str] = &["buffer"];
/// Keys of `test(name, kind, #{ … }, check)`.
pub const TEST_OPTION_KEYS: &[&str] = &["patch_version"];

/// Journal record kind of a rollout event.
pub const EVENT_KIND: &str = "rollout.event";

/// What the rollouts of one run share.
pub struct RunControl {
    pub session: Arc<Session>,
    pub clock: Clock,
    /// Set to stop starting new hosts (SIGTERM); hosts in flight finish.
    pub stop: Arc<AtomicBool>,
    sink: EventSink,
    window: Mutex<Option<Window>>,
    summaries: Mutex<Vec<Summary>>,
    plans: Mutex<Vec<String>>,
    /// Hosts a resumed run must not touch again.
    finished: BTreeSet<String>,
    first_failure: AtomicBool,
    started: Instant,
    /// `--param NAME=VALUE` from the command line, read with `param("NAME")`.
    vars: std::collections::BTreeMap<String, String>,
}

impl RunControl {
    pub fn new(session: Arc<Session>, clock: Clock, sink: EventSink) -> Self {
        // On resume, hosts the journal already saw to the end are not touched again.
        let finished = session
            .run
            .journal
            .as_ref()
            .and_then(|j| j.state().ok())
            .map(|st| {
                st.hosts
                    .iter()
                    .filter(|(_, h)| h.finished && (!h.failed || h.rolled_back))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        RunControl {
            session,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            sink,
            window: Mutex::new(None),
            summaries: Mutex::new(Vec::new()),
            plans: Mutex::new(Vec::new()),
            finished,
            first_failure: AtomicBool::new(false),
            started: Instant::now(),
            vars: Default::default(),
        }
    }

    /// Shares a stop flag with the caller (signals, the watch service).
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = stop;
        self
    }

    pub fn with_vars(mut self, vars: std::collections::BTreeMap<String, String>) -> Self {
        self.vars = vars;
        self
    }

    /// Every rollout summary of this run, in order.
    pub fn summaries(&self) -> Vec<Summary> {
        self.summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The printed plans of this run's rollouts (`patchbook plan`).
    pub fn plans(&self) -> Vec<String> {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn window(&self) -> Option<Window> {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn planning(&self) -> bool {
        self.session.run.mode == Mode::Plan
    }

    /// Records what the rollout saw or decided (a plan, a window, a notice). None of
    /// it is an action on a host, so it rides on the next group commit: every
    /// intent fsyncs all records before it.
    fn record(&self, host: Option<&str>, kind: &str, data: serde_json::Value) {
        if let Some(j) = &self.session.run.journal {
            if let Err(e) = j.note(host, kind, data) {
                tracing::error!(error = %e, "cannot write the journal; stopping new hosts");
                self.stop.store(true, Ordering::SeqCst);
            }
        }
    }

    fn notify(&self, notice: &notify::Notice, owners: &[String]) {
        if self.planning() {
            return;
        }
        let cfg = &self.session.runtime.config.notify;
        let deliveries = notify::automatic(cfg, notice, owners, &self.session.secrets());
        for d in deliveries {
            self.record(None, "notify", serde_json::to_value(&d).unwrap_or_default());
        }
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

    fn on_event(&self, at: DateTime<Utc>, event: &RolloutEvent, targets: &[String]) {
        let host = match event {
            RolloutEvent::HostStarted { host, .. }
            | RolloutEvent::HostDone { host, .. }
            | RolloutEvent::HostFailed { host, .. }
            | RolloutEvent::RolledBack { host, .. }
            | RolloutEvent::RollbackFailed { host, .. } => Some(host.as_str()),
            _ => None,
        };
        if !self.planning() {
            // Progress announces no action: it rides on the next group commit.
            if let Some(j) = &self.session.run.journal {
                let data = serde_json::to_value(event).unwrap_or_default();
                if let Err(e) = j.note(host, EVENT_KIND, data) {
                    tracing::error!(error = %e, "cannot write the journal; stopping new hosts");
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
        }
        (self.sink)(at, event);
        let run = self.session.run.run_id.clone();
        match event {
            RolloutEvent::RunStarted { .. } => self.notify(
                &notify::RunStarted {
                    run,
                    playbook: self.session.run.playbook.clone(),
                    operator: self.session.runtime.operator.clone(),
                    targets: targets.to_vec(),
                    window: self.window().map(|w| w.spec().to_string()),
                }
                .notice(),
                &[],
            ),
            RolloutEvent::HostFailed { host, reason, .. }
                if !self.first_failure.swap(true, Ordering::SeqCst) =>
            {
                self.notify(
                    &notify::FirstFailure {
                        run,
                        host: host.clone(),
                        step: None,
                        reason: reason.clone(),
                        action: Some("rolling the host back".into()),
                    }
                    .notice(),
                    &self.owners_of(std::slice::from_ref(host)),
                )
            }
            RolloutEvent::BudgetExhausted { allowed, .. } => {
                let failed = self.failed_so_far();
                self.notify(
                    &notify::BudgetExhausted {
                        run,
                        failed_hosts: failed.clone(),
                        targets: targets.len(),
                        budget: allowed.to_string(),
                        action: Some("no new hosts start; failed hosts are rolled back".into()),
                    }
                    .notice(),
                    &self.owners_of(&failed),
                )
            }
            _ => {}
        }
    }

    fn failed_so_far(&self) -> Vec<String> {
        let Some(j) = &self.session.run.journal else {
            return Vec::new();
        };
        j.records()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| {
                r.kind == EVENT_KIND
                    && r.data.get("kind").and_then(|k| k.as_str()) == Some("host_failed")
            })
            .filter_map(|r| r.host)
            .collect()
    }
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
pub fn register_rollout(engine: &mut Engine, control_: Option<Arc<RunControl>>) {
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
            "window",
            serde_json::json!({
                "spec": spec,
                "zone": spec.split_whitespace().last(),
                "buffer": buffer,
                "open": open,
                "start": start.map(|t| w.display_time(t)),
                "end": end.map(|t| w.display_time(t)),
            }),
        );
        *c.window.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
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
            match c.vars.get(name) {
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
                Ok(c.vars
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| default.to_string()))
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
    FuncRegistration::new("rollout")
        .with_volatility(true)
        .with_params_info(["targets: Array", "policy: Map", "work: FnPtr", "Map"])
        .with_comments(["/// Runs `work(host)` over the targets: pilot first, then waves, under one failure\n/// budget, inside the window. A host whose work throws is rolled back (its undo\n/// steps, newest first). Returns `#{ stop, totals, per_group, failed, pending }`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, targets: Array, policy: Map, work: FnPtr| -> RhaiResult<Map> {
                let c = control(&ctx, &c, "rollout")?;
                rollout(&ctx, c, targets, policy, work)
            },
        );
}

fn rollout(
    ctx: &NativeCallContext,
    c: &Arc<RunControl>,
    targets: Array,
    mut policy: Map,
    work: FnPtr,
) -> RhaiResult<Map> {
    let session = &c.session;
    let rt = &session.runtime;
    let mut hosts: Vec<Host> = Vec::with_capacity(targets.len());
    for (i, t) in targets.into_iter().enumerate() {
        match t.try_cast::<ScriptHost>() {
            Some(h) => hosts.push((*h.0).clone()),
            None => {
                return fail(
                    ctx,
                    format!("rollout: targets[{i}] is not a host; build targets with hosts(\"…\")"),
                )
            }
        }
    }
    // A resumed run leaves alone the hosts the journal saw to the end, and a pilot
    // that already passed before the restart is not asked for again.
    if !c.finished.is_empty() {
        let before = hosts.len();
        hosts.retain(|h| !c.finished.contains(&h.name));
        c.record(
            None,
            "rollout.resume",
            serde_json::json!({ "skipped_finished": before - hosts.len() }),
        );
        if let Some(pilot) = policy.remove("pilot") {
            match pilot.clone().try_cast::<Array>() {
                Some(list) => {
                    let left: Array = list
                        .into_iter()
                        .filter(|p| {
                            let name = p
                                .clone()
                                .try_cast::<ScriptHost>()
                                .map(|h| h.name().to_string())
                                .unwrap_or_else(|| p.to_string());
                            !c.finished.contains(&name)
                        })
                        .collect();
                    if !left.is_empty() {
                        policy.insert("pilot".into(), Dynamic::from_array(left));
                    }
                }
                None => {
                    policy.insert("pilot".into(), pilot);
                }
            }
        }
    }
    let gate = match policy.remove("gate") {
        None => None,
        Some(g) => match g.try_cast::<FnPtr>() {
            Some(f) => Some(HostClosure::from_context(ctx, f)),
            None => {
                return fail(
                    ctx,
                    "rollout: `gate` must be a closure, e.g. `gate: || http_check(url) == 200`",
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
        .map(|h| Target::from_inventory(&rt.inventory, h))
        .collect();
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let plan = match Plan::build(targets, &policy, rt.forks) {
        Ok(p) => p,
        Err(e) => return fail(ctx, format!("rollout: {e}")),
    };
    c.plans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(plan.to_string());
    c.record(
        None,
        "rollout.plan",
        serde_json::json!({ "policy": policy_json, "plan": plan.to_string() }),
    );

    let closure = HostClosure::from_context(ctx, work);
    let engine = ctx.engine();
    let budget = Duration::from_secs(rt.config.limits.deadline_secs.max(1));
    let cancel = Some(c.stop.clone());
    let planning = c.planning();
    let clock = if planning {
        Clock::manual(c.clock.now())
    } else {
        c.clock.clone()
    };

    let mut ex = Executor::new(&plan)
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
    let work = |host: &Host, hc: &HostContext| -> HostOutcome {
        if c.finished.contains(&host.name) {
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
        let r = closure.call(
            engine,
            ScriptHost::new(host.clone()),
            budget,
            cancel.clone(),
        );
        session.set_deadline(&host.name, None);
        let outcome = match &r {
            Ok(_) => HostOutcome::Done,
            Err(e) => HostOutcome::failed(root_message(e)),
        };
        if let (Some(j), false) = (&journal, planning) {
            let detail = match &outcome {
                HostOutcome::Done => serde_json::json!({}),
                HostOutcome::Failed { reason } => serde_json::json!({ "reason": reason }),
            };
            let _ = j.host_finished(&host.name, outcome == HostOutcome::Done, detail);
        }
        outcome
    };
    let rollback = |host: &Host, rc: &RollbackContext| -> Result<(), String> {
        let r = session.with_host(host, crate::primitives::undo::rollback);
        let (ok, detail, result) = match r {
            Ok(rep) if rep.manual.is_empty() => (
                true,
                serde_json::json!({ "undone": rep.undone, "cause": rc.cause }),
                Ok(()),
            ),
            Ok(rep) => (
                false,
                serde_json::json!({ "undone": rep.undone, "manual": rep.manual, "cause": rc.cause }),
                Err(format!("needs manual undo: {}", rep.manual.join("; "))),
            ),
            Err(e) => (
                false,
                serde_json::json!({ "error": e.to_string(), "cause": rc.cause }),
                Err(e.to_string()),
            ),
        };
        if let (Some(j), false) = (&journal, planning) {
            let _ = j.host_rolled_back(&host.name, ok, detail);
        }
        result
    };
    let summary = ex.run(work, rollback);
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
        Err(e) => return fail(ctx, e.to_string()),
    };
    c.summaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(summary.clone());
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
                .filter(|h| h.state == crate::rollout::HostState::Failed)
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
