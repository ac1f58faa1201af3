//! `monitor(host, #{ … }, change)`: samples the host before the change (its
//! baseline), runs the change, samples it again for a window, and throws when a
//! metric moved past its threshold, so the host fails and is rolled back.
//!
//! This module adapts the options and paces the samples on the run's clock; what
//! a sample reads and how a verdict is reached are `primitives::monitor`'s, and
//! the records it writes are typed journal entries. It must not decide anything
//! about the rollout: a regression is a thrown error like any other.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};

use super::patch::{no_unknown_keys, on_host, opt_duration};
use super::register::ScriptHost;
use super::rollout::from_json;
use crate::journal::entry::{Entry, MonitorSample, MonitorVerdict};
use crate::primitives::monitor::{
    mean, regressions, sample, Probe, Reading, Threshold, DEFAULT_ERROR_PATTERN, PROC_METRICS,
};
use crate::rollout::clock::between;
use crate::run::RunControl;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Keys of `monitor(host, #{ … }, change)`; `patchbook check` reads the same list.
pub const MONITOR_OPTION_KEYS: &[&str] = &[
    "metrics",
    "window",
    "interval",
    "baseline",
    "thresholds",
    "logs",
    "error_pattern",
    "services",
    "probes",
    "timeout",
];

const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_BASELINE: usize = 3;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn fail<T>(ctx: &NativeCallContext, message: impl Into<String>) -> RhaiResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        ctx.call_position(),
    )))
}

/// The parsed options; `soak` parses its sampling options through the same code.
pub(super) struct Plan {
    pub(super) probe: Probe,
    window: Duration,
    interval: Duration,
    pub(super) baseline: usize,
    pub(super) thresholds: BTreeMap<String, Threshold>,
    pub(super) written: BTreeMap<String, String>,
    pub(super) timeout: Duration,
}

fn strings(opts: &Map, key: &str) -> Result<Option<Vec<String>>, String> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) => match v.clone().try_cast::<rhai::Array>() {
            Some(a) => Ok(Some(a.iter().map(|x| x.to_string()).collect())),
            None => Err(format!("`{key}` must be a list of strings")),
        },
    }
}

pub(super) fn plan(opts: &Map) -> Result<Plan, String> {
    no_unknown_keys(opts, MONITOR_OPTION_KEYS)?;
    let logs = strings(opts, "logs")?.unwrap_or_default();
    let services = strings(opts, "services")?.unwrap_or_default();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let mut commands = BTreeMap::new();
    if let Some(p) = opts.get("probes") {
        let Some(m) = p.clone().try_cast::<Map>() else {
            return Err("`probes` must be a map name → shell line printing a number".into());
        };
        for (k, v) in m {
            if !name_ok(&k) {
                return Err(format!(
                    "probe name `{k}` must be letters, digits, `_` or `-`"
                ));
            }
            commands.insert(k.to_string(), v.to_string());
        }
    }
    let proc_metrics = match strings(opts, "metrics")? {
        None => PROC_METRICS.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let mut out = Vec::new();
            for m in list {
                if PROC_METRICS.contains(&m.as_str()) {
                    out.push(m);
                } else if !["error_rate", "restarts"].contains(&m.as_str())
                    && !commands.contains_key(&m)
                {
                    return Err(format!(
                        "metric `{m}` is not one of {}, error_rate (with `logs`), restarts (with `services`) or a probe name",
                        PROC_METRICS.join(", ")
                    ));
                }
            }
            out
        }
    };
    let error_pattern = match opts.get("error_pattern") {
        None => DEFAULT_ERROR_PATTERN.to_string(),
        Some(p) => p.to_string(),
    };
    let mut thresholds = BTreeMap::new();
    let mut written = BTreeMap::new();
    if let Some(t) = opts.get("thresholds") {
        let Some(m) = t.clone().try_cast::<Map>() else {
            return Err(
                "`thresholds` must be a map like #{ error_rate: \"2x\", mem: \"+20%\" }".into(),
            );
        };
        for (k, v) in m {
            let known = PROC_METRICS.contains(&k.as_str())
                && proc_metrics.iter().any(|m| m == k.as_str())
                || (k == "error_rate" && !logs.is_empty())
                || (k == "restarts" && !services.is_empty())
                || commands.contains_key(k.as_str());
            if !known {
                return Err(format!(
                    "threshold `{k}` names no metric this monitor samples (error_rate needs `logs`, restarts needs `services`)"
                ));
            }
            let text = v.to_string();
            thresholds.insert(
                k.to_string(),
                Threshold::parse(&k, &text).map_err(|e| e.to_string())?,
            );
            written.insert(k.to_string(), text);
        }
    }
    if thresholds.is_empty() {
        return Err("`thresholds` is empty: name at least one metric and how far it may move, e.g. #{ error_rate: \"2x\" }".into());
    }
    let baseline = match opts.get("baseline") {
        None => DEFAULT_BASELINE,
        Some(v) => v
            .as_int()
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or("`baseline` must be a count of samples, at least 1")?,
    };
    let interval = opt_duration(opts, "interval")?.unwrap_or(DEFAULT_INTERVAL);
    if interval.is_zero() {
        return Err("`interval` must be more than zero".into());
    }
    Ok(Plan {
        probe: Probe {
            proc_metrics,
            logs,
            error_pattern,
            services,
            commands,
        },
        window: opt_duration(opts, "window")?.unwrap_or(DEFAULT_WINDOW),
        interval,
        baseline,
        thresholds,
        written,
        timeout: opt_duration(opts, "timeout")?.unwrap_or(DEFAULT_TIMEOUT),
    })
}

pub fn register_monitor(engine: &mut Engine, control_: Option<Arc<RunControl>>) {
    FuncRegistration::new("monitor")
        .with_volatility(true)
        .with_params_info(["host: Host", "opts: Map", "change: FnPtr", "Map"])
        .with_comments(["/// Samples the host before `change()` (its baseline) and after it for a window, and\n/// throws when a metric moved past its threshold, so the host fails and is rolled\n/// back: `monitor(host, #{ window: \"10m\", interval: \"30s\", logs: [\"/var/log/app.log\"],\n/// thresholds: #{ error_rate: \"2x\", mem: \"+20%\" } }, || deploy(host, pkg))`.\n/// Metrics: cpu, mem, load, disk, io (from /proc), error_rate (`logs`), restarts\n/// (`services`), and `probes: #{ name: \"shell line printing a number\" }`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, opts: Map, change: FnPtr| -> RhaiResult<Map> {
                let Some(c) = &control_ else {
                    return fail(&ctx, "monitor() cannot run while modules are being compiled; call it from the playbook");
                };
                monitor(&ctx, c, host, opts, change)
            },
        );
}

fn monitor(
    ctx: &NativeCallContext,
    c: &Arc<RunControl>,
    host: ScriptHost,
    opts: Map,
    change: FnPtr,
) -> RhaiResult<Map> {
    let p = match plan(&opts) {
        Ok(p) => p,
        Err(e) => return fail(ctx, format!("monitor: {e}")),
    };
    // `plan` shows what the change would do; it does not wait out windows.
    if c.planning() {
        let _ = change.call_within_context::<Dynamic>(ctx, ())?;
        return Ok(Map::new());
    }
    let name = host.name().to_string();
    let clock = &c.clock;
    let read = |ctx: &NativeCallContext| -> RhaiResult<Reading> {
        if c.stop.load(Ordering::SeqCst) {
            return fail(ctx, "monitor: stopped (the controller is shutting down)");
        }
        on_host(ctx, &c.session, &host, "monitor", |hc| {
            p.probe.read(hc, p.timeout)
        })
    };
    let record = |phase: &str, values: &BTreeMap<String, f64>| {
        c.record(
            Some(&name),
            Entry::MonitorSample(MonitorSample {
                phase: phase.to_string(),
                at: clock.now(),
                values: values.clone(),
            }),
        );
    };

    // Samples keep to a schedule set by the first reading, so a slow reading
    // delays its own sample, never the ones after it: a window of 2m at 30s
    // intervals has four samples however long each reading takes.
    let tick = |from: DateTime<Utc>, k: u32| {
        let due = p
            .interval
            .checked_mul(k)
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .and_then(|d| from.checked_add_signed(d));
        let now = clock.now();
        match due {
            Some(due) if due > now => clock.sleep(between(now, due)),
            Some(_) => {}
            None => clock.sleep(p.interval),
        }
    };
    let mut prev = read(ctx)?;
    let mut prev_at = clock.now();
    let first = prev_at;
    let mut before = Vec::with_capacity(p.baseline);
    for k in 1..=p.baseline {
        tick(first, u32::try_from(k).unwrap_or(u32::MAX));
        let now = read(ctx)?;
        let at = clock.now();
        let s = sample(&prev, &now, between(prev_at, at));
        record("baseline", &s);
        before.push(s);
        (prev, prev_at) = (now, at);
    }

    let _ = change.call_within_context::<Dynamic>(ctx, ())?;

    // Rates after the change start from a reading taken once it is over.
    let mut prev = read(ctx)?;
    let mut prev_at = clock.now();
    let started = prev_at;
    let mut after = Vec::new();
    for k in 1u32.. {
        tick(started, k);
        let now = read(ctx)?;
        let at = clock.now();
        let s = sample(&prev, &now, between(prev_at, at));
        record("after", &s);
        after.push(s);
        (prev, prev_at) = (now, at);
        if p.interval.checked_mul(k).is_none_or(|d| d >= p.window) {
            break;
        }
    }

    let (baseline, after) = (mean(&before), mean(&after));
    let found = regressions(&baseline, &after, &p.thresholds);
    let verdict = MonitorVerdict {
        ok: found.is_empty(),
        baseline,
        after,
        thresholds: p.written.clone(),
        regressions: found.clone(),
        window_seconds: between(started, clock.now()).as_secs_f64(),
    };
    c.record(Some(&name), Entry::MonitorVerdict(verdict.clone()));
    if !found.is_empty() {
        return fail(
            ctx,
            format!(
                "monitor: {name} regressed after the change: {}",
                found.join("; ")
            ),
        );
    }
    match from_json(&serde_json::to_value(&verdict).unwrap_or_default()).try_cast::<Map>() {
        Some(m) => Ok(m),
        None => Ok(Map::new()),
    }
}
