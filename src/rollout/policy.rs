//! The rollout policy: the map a playbook passes as `rollout(targets, #{ … }, …)`,
//! parsed into typed values with an error naming the offending key.
//!
//! It owns parsing and defaults only; what the values mean at run time lives in
//! `plan`, `schedule`, `budget` and `executor`. It must not know Rhai: the script
//! layer converts its map to a `serde_json::Value` first and keeps callbacks
//! (`gate`) for itself, which is why a `gate` key is accepted and ignored here.
//!
//! Keys and defaults:
//!
//! | key | values | default |
//! |---|---|---|
//! | `pilot` | list of host names, or a count | no pilot |
//! | `waves` | list of counts or `"N%"` of the hosts left after the pilot | `["100%"]` |
//! | `parallel` | count ≥ 1 | the run's `--forks` |
//! | `max_failed` | count or `"N%"` of all targets | `0` |
//! | `max_unreachable` | count or `"N%"` of all targets (those a probe found unreachable included) | `max_failed` |
//! | `order` | `"inventory"` or `"criticality"` | `"inventory"` |
//! | `dependencies` | `"first"` (a host's dependencies are patched before it) or `"last"` | `"first"` |
//! | `max_unavailable` | count, `"N%"`, or a map group → count/`"N%"` (key `"*"` for every other group) | unlimited |
//! | `pause` | duration between waves | `0s` |
//! | `timeout` | per-host deadline | none |
//! | `rollback` | `"failed"` or `"all"` | `"failed"` |
//! | `estimate` | per-host duration assumed before any host finished | `1m` |
//! | `gate` | a closure, or a metric gate `#{ prometheus, query, max, min, soak, range, timeout }` ([`super::gate`]) | none |
//! | `rehearse_rollback` | `true`, or `#{ paths, services }`: on each pilot host, patch, roll back, compare the state with before, patch again | off |
//! | `soak` | `#{ period, every, … }`: after the run, `patchbook watch` keeps sampling the patched hosts (parsed by the script layer) | none |
//! | `on_gate_fail` | `"stop"` or `"rollback_wave"` (also roll back the wave before the gate) | `"stop"` |
//!
//! Durations are written `500ms`, `30s`, `2m`, `1h30m`, `1d`; a bare number is seconds.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::gate::MetricGate;
use crate::journal::entry::StopReason;
use crate::primitives::snapshot::{Scope, DEFAULT_PATHS};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("rollout policy must be a map like #{{ waves: [\"10%\", \"100%\"] }}, got {found}")]
    NotAMap { found: String },
    #[error("rollout policy key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("rollout policy has an unknown key `{key}`; known keys: {known}")]
    UnknownKey { key: String, known: String },
}

fn invalid(key: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A count of hosts or a percentage (kept in hundredths of a percent, so "2.5%"
/// computes exactly with integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(usize),
    Percent { hundredths: u32 },
}

impl Amount {
    /// `floor(pct/100 × total)` for a percentage; the count itself otherwise.
    pub fn of_total_floor(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent { hundredths } => (hundredths as usize * total) / 10_000,
        }
    }

    /// `ceil(pct/100 × total)` for a percentage; the count itself otherwise.
    pub fn of_total_ceil(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent { hundredths } => (hundredths as usize * total).div_ceil(10_000),
        }
    }

    fn parse(key: &str, v: &Value) -> Result<Self, PolicyError> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Amount::Count)
                .ok_or_else(|| invalid(key, format!("`{n}` is not a whole count of hosts"))),
            Value::String(s) => Amount::parse_str(s).map_err(|m| invalid(key, m)),
            other => Err(invalid(
                key,
                format!("expected a count or \"N%\", got {}", kind_of(other)),
            )),
        }
    }

    fn parse_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(num) = t.strip_suffix('%') {
            let pct: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage like \"5%\""))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("`{s}` is outside 0%..100%"));
            }
            // 0.0..=100.0 was checked above: 0..=10,000 hundredths, exact in a u32.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(Amount::Percent {
                hundredths: (pct * 100.0).round() as u32,
            })
        } else {
            t.parse::<usize>()
                .map(Amount::Count)
                .map_err(|_| format!("`{s}` is neither a count nor a percentage like \"5%\""))
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent { hundredths } if hundredths % 100 == 0 => {
                write!(f, "{}%", hundredths / 100)
            }
            Amount::Percent { hundredths } => write!(f, "{}%", *hundredths as f64 / 100.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pilot {
    #[default]
    None,
    Hosts(Vec<String>),
    Count(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Inventory,
    Criticality,
}

/// Which side of a dependency edge is patched first. Default `First`: a host's
/// dependencies (its database, say) are patched before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DependencyOrder {
    #[default]
    First,
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RollbackScope {
    /// Only hosts that failed are rolled back.
    #[default]
    Failed,
    /// When the run stops early, every host the run changed is rolled back too.
    All,
}

impl RollbackScope {
    /// Whether a run that ended with `stop` rolls back every host it changed:
    /// with `rollback: "all"`, after a stop the run itself decided (budget,
    /// pilot, gate), not after an operator's stop or a closed window. The one
    /// rule for a run on one controller and a run shared with workers.
    pub fn undoes_all_after(self, stop: &StopReason) -> bool {
        self == RollbackScope::All
            && matches!(
                stop,
                StopReason::BudgetExhausted { .. }
                    | StopReason::UnreachableBudgetExhausted { .. }
                    | StopReason::PilotFailed { .. }
                    | StopReason::GateStopped { .. }
            )
    }
}

/// Caps on how many members of a group are in flight at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MaxUnavailable {
    /// Applies to every group without its own entry.
    pub every_group: Option<Amount>,
    pub per_group: BTreeMap<String, Amount>,
}

impl MaxUnavailable {
    pub fn for_group(&self, group: &str) -> Option<Amount> {
        self.per_group.get(group).copied().or(self.every_group)
    }
    pub fn is_empty(&self) -> bool {
        self.every_group.is_none() && self.per_group.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub pilot: Pilot,
    pub waves: Vec<Amount>,
    pub parallel: Option<usize>,
    pub max_failed: Amount,
    /// Hosts that could not be connected to, apart from failures; `None` takes
    /// `max_failed`.
    pub max_unreachable: Option<Amount>,
    pub order: Order,
    pub dependencies: DependencyOrder,
    pub max_unavailable: MaxUnavailable,
    pub pause: Duration,
    pub timeout: Option<Duration>,
    pub rollback: RollbackScope,
    pub estimate: Duration,
    /// A metric gate between waves; a closure gate is the script layer's.
    pub gate: Option<MetricGate>,
    pub on_gate_fail: GateFailAction,
    /// What a rollback rehearsal on the pilot compares; `None`: no rehearsal.
    pub rehearse_rollback: Option<Scope>,
}

/// What a failed gate does besides stopping the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateFailAction {
    /// Stop: the wave before the gate stays patched, the rest pending.
    #[default]
    Stop,
    /// Stop and roll back the hosts of the wave before the gate, newest first.
    RollbackWave,
}

/// Per-host duration assumed for the window check before any host has finished.
pub const DEFAULT_ESTIMATE: Duration = Duration::from_secs(60);

/// Every key a rollout policy map may hold. `rollout()` takes `pilot` and `gate`
/// out before parsing (they hold hosts and a closure); `patchbook check` reads
/// this same list, so the two can never disagree.
pub const POLICY_KEYS: &[&str] = &[
    "pilot",
    "waves",
    "parallel",
    "max_failed",
    "max_unreachable",
    "order",
    "dependencies",
    "max_unavailable",
    "pause",
    "timeout",
    "rollback",
    "estimate",
    "gate",
    "on_gate_fail",
    "rehearse_rollback",
    "soak",
];

impl Default for Policy {
    fn default() -> Self {
        Policy {
            pilot: Pilot::None,
            waves: vec![Amount::Percent { hundredths: 10_000 }],
            parallel: None,
            max_failed: Amount::Count(0),
            max_unreachable: None,
            order: Order::Inventory,
            dependencies: DependencyOrder::First,
            max_unavailable: MaxUnavailable::default(),
            pause: Duration::ZERO,
            timeout: None,
            rollback: RollbackScope::Failed,
            estimate: DEFAULT_ESTIMATE,
            gate: None,
            on_gate_fail: GateFailAction::Stop,
            rehearse_rollback: None,
        }
    }
}

impl Policy {
    /// Parses a policy map; `null` gives every default.
    pub fn from_value(v: &Value) -> Result<Self, PolicyError> {
        let map = match v {
            Value::Null => return Ok(Policy::default()),
            Value::Object(m) => m,
            other => {
                return Err(PolicyError::NotAMap {
                    found: kind_of(other).to_string(),
                })
            }
        };
        let mut p = Policy::default();
        for (key, val) in map {
            let k = key.as_str();
            match k {
                "pilot" => p.pilot = parse_pilot(val)?,
                "waves" => p.waves = parse_waves(val)?,
                "parallel" => p.parallel = Some(parse_count(k, val, 1)?),
                "max_failed" => p.max_failed = Amount::parse(k, val)?,
                "max_unreachable" => p.max_unreachable = Some(Amount::parse(k, val)?),
                "order" => {
                    p.order = match word(k, val)?.as_str() {
                        "inventory" => Order::Inventory,
                        "criticality" => Order::Criticality,
                        w => {
                            return Err(invalid(
                                k,
                                format!("`{w}` is not \"inventory\" or \"criticality\""),
                            ))
                        }
                    }
                }
                "dependencies" => {
                    p.dependencies = match word(k, val)?.as_str() {
                        "first" => DependencyOrder::First,
                        "last" => DependencyOrder::Last,
                        w => return Err(invalid(k, format!("`{w}` is not \"first\" or \"last\""))),
                    }
                }
                "max_unavailable" => p.max_unavailable = parse_max_unavailable(val)?,
                "pause" => p.pause = parse_duration_value(k, val)?,
                "timeout" => {
                    let d = parse_duration_value(k, val)?;
                    if d.is_zero() {
                        return Err(invalid(k, "a zero deadline would fail every host; leave `timeout` out for no deadline"));
                    }
                    p.timeout = Some(d);
                }
                "rollback" => {
                    p.rollback = match word(k, val)?.as_str() {
                        "failed" => RollbackScope::Failed,
                        "all" => RollbackScope::All,
                        w => return Err(invalid(k, format!("`{w}` is not \"failed\" or \"all\""))),
                    }
                }
                "estimate" => p.estimate = parse_duration_value(k, val)?,
                // A closure gate never reaches here as a map: the script layer
                // keeps closures for itself.
                "gate" => {
                    if let Value::Object(m) = val {
                        p.gate = Some(MetricGate::from_map(m)?);
                    }
                }
                "rehearse_rollback" => p.rehearse_rollback = parse_rehearsal(val)?,
                // After the run, not during it: the script layer parses and
                // journals it (`soak.planned`), `watch` acts on it.
                "soak" => {}
                "on_gate_fail" => {
                    p.on_gate_fail = match word(k, val)?.as_str() {
                        "stop" => GateFailAction::Stop,
                        "rollback_wave" => GateFailAction::RollbackWave,
                        w => {
                            return Err(invalid(
                                k,
                                format!("`{w}` is not \"stop\" or \"rollback_wave\""),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(PolicyError::UnknownKey {
                        key: key.clone(),
                        known: POLICY_KEYS.join(", "),
                    })
                }
            }
        }
        Ok(p)
    }
}

impl<'de> serde::Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Policy::from_value(&v).map_err(serde::de::Error::custom)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn word(key: &str, v: &Value) -> Result<String, PolicyError> {
    v.as_str()
        .map(|s| s.trim().to_ascii_lowercase())
        .ok_or_else(|| invalid(key, format!("expected a string, got {}", kind_of(v))))
}

fn parse_count(key: &str, v: &Value, min: usize) -> Result<usize, PolicyError> {
    let n = match v {
        Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        Value::String(s) => s.trim().parse::<usize>().ok(),
        _ => None,
    }
    .ok_or_else(|| invalid(key, format!("expected a whole number, got {v}")))?;
    if n < min {
        return Err(invalid(key, format!("must be at least {min}, got {n}")));
    }
    Ok(n)
}

fn parse_pilot(v: &Value) -> Result<Pilot, PolicyError> {
    match v {
        Value::Null => Ok(Pilot::None),
        Value::Number(_) => Ok(match parse_count("pilot", v, 0)? {
            0 => Pilot::None,
            n => Pilot::Count(n),
        }),
        Value::Array(items) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                // The script layer may hand hosts over as maps with a `name`.
                let name = it
                    .as_str()
                    .or_else(|| it.get("name").and_then(Value::as_str))
                    .ok_or_else(|| {
                        invalid(
                            "pilot",
                            format!("item {i} is {}, expected a host name", kind_of(it)),
                        )
                    })?;
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
            Ok(Pilot::Hosts(names))
        }
        other => Err(invalid(
            "pilot",
            format!(
                "expected a list of host names or a count, got {}",
                kind_of(other)
            ),
        )),
    }
}

fn parse_waves(v: &Value) -> Result<Vec<Amount>, PolicyError> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        one @ (Value::Number(_) | Value::String(_)) => vec![one],
        other => {
            return Err(invalid(
                "waves",
                format!(
                    "expected a list like [\"10%\", \"100%\"], got {}",
                    kind_of(other)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(invalid(
            "waves",
            "the list is empty; leave `waves` out for one wave of every host",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let a = Amount::parse("waves", it)?;
            match a {
                Amount::Count(0) | Amount::Percent { hundredths: 0 } => Err(invalid(
                    "waves",
                    format!(
                        "wave {} has size {a}; every wave needs at least one host",
                        i + 1
                    ),
                )),
                a => Ok(a),
            }
        })
        .collect()
}

fn parse_rehearsal(v: &Value) -> Result<Option<Scope>, PolicyError> {
    let key = "rehearse_rollback";
    let list = |k: &str, v: Option<&Value>| -> Result<Option<Vec<String>>, PolicyError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .filter(|s| !s.trim().is_empty())
                        .map(str::to_string)
                        .ok_or_else(|| invalid(k, format!("expected strings, got {x}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(invalid(
                k,
                format!("expected a list, got {}", kind_of(other)),
            )),
        }
    };
    match v {
        Value::Bool(false) | Value::Null => Ok(None),
        Value::Bool(true) => Ok(Some(Scope {
            paths: DEFAULT_PATHS.iter().map(|s| s.to_string()).collect(),
            services: Vec::new(),
        })),
        Value::Object(m) => {
            if let Some(k) = m
                .keys()
                .find(|k| !["paths", "services"].contains(&k.as_str()))
            {
                return Err(PolicyError::UnknownKey {
                    key: format!("{key}.{k}"),
                    known: "paths, services".into(),
                });
            }
            let paths = list("rehearse_rollback.paths", m.get("paths"))?
                .unwrap_or_else(|| DEFAULT_PATHS.iter().map(|s| s.to_string()).collect());
            if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
                return Err(invalid(
                    "rehearse_rollback.paths",
                    format!("`{p}` is not an absolute path"),
                ));
            }
            Ok(Some(Scope {
                paths,
                services: list("rehearse_rollback.services", m.get("services"))?
                    .unwrap_or_default(),
            }))
        }
        other => Err(invalid(
            key,
            format!(
                "expected true, false or #{{ paths, services }}, got {}",
                kind_of(other)
            ),
        )),
    }
}

fn parse_max_unavailable(v: &Value) -> Result<MaxUnavailable, PolicyError> {
    let key = "max_unavailable";
    let check = |k: &str, a: Amount| match a {
        Amount::Count(0) => Err(invalid(k, "0 would never let a host start; use at least 1")),
        a => Ok(a),
    };
    match v {
        Value::Null => Ok(MaxUnavailable::default()),
        Value::Object(m) => {
            let mut out = MaxUnavailable::default();
            for (group, val) in m {
                let k = format!("{key}.{group}");
                let a = check(&k, Amount::parse(&k, val)?)?;
                if group == "*" {
                    out.every_group = Some(a);
                } else {
                    out.per_group.insert(group.clone(), a);
                }
            }
            Ok(out)
        }
        other => Ok(MaxUnavailable {
            every_group: Some(check(key, Amount::parse(key, other)?)?),
            per_group: BTreeMap::new(),
        }),
    }
}

fn parse_duration_value(key: &str, v: &Value) -> Result<Duration, PolicyError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| invalid(key, format!("`{n}` is not a number of seconds"))),
        Value::String(s) => parse_duration(s).map_err(|m| invalid(key, m)),
        other => Err(invalid(
            key,
            format!("expected a duration like \"2m\", got {}", kind_of(other)),
        )),
    }
}

pub use crate::config::{format_duration, parse_duration};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("2 minutes").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn full_policy() {
        let p = Policy::from_value(&json!({
            "pilot": ["a", "b"], "waves": ["10%", 5, "100%"], "parallel": 4,
            "max_failed": "5%", "order": "criticality", "dependencies": "last",
            "max_unavailable": {"web": 1, "db": "50%"}, "pause": "2m",
            "timeout": "15m", "rollback": "all", "estimate": "3m", "gate": "fn"
        }))
        .unwrap();
        assert_eq!(p.pilot, Pilot::Hosts(vec!["a".into(), "b".into()]));
        assert_eq!(p.waves[1], Amount::Count(5));
        assert_eq!(p.max_failed, Amount::Percent { hundredths: 500 });
        assert_eq!(
            p.max_unavailable.for_group("db"),
            Some(Amount::Percent { hundredths: 5000 })
        );
        assert_eq!(p.max_unavailable.for_group("other"), None);
        assert_eq!(p.timeout, Some(Duration::from_secs(900)));
        assert_eq!(p.rollback, RollbackScope::All);
    }

    #[test]
    fn max_unreachable_is_its_own_amount_and_unset_by_default() {
        assert_eq!(Policy::default().max_unreachable, None);
        let p = Policy::from_value(&json!({"max_unreachable": "10%"})).unwrap();
        assert_eq!(
            p.max_unreachable,
            Some(Amount::Percent { hundredths: 1000 })
        );
        let e = Policy::from_value(&json!({"max_unreachable": "some"})).unwrap_err();
        assert!(e.to_string().contains("`max_unreachable`"), "{e}");
        assert!(POLICY_KEYS.contains(&"max_unreachable"));
    }

    #[test]
    fn deserialises_through_serde() {
        let p: Policy = serde_json::from_value(json!({"waves": [2], "pause": 90})).unwrap();
        assert_eq!(p.waves, vec![Amount::Count(2)]);
        assert_eq!(p.pause, Duration::from_secs(90));
        let e = serde_json::from_value::<Policy>(json!({"order": "random"})).unwrap_err();
        assert!(e.to_string().contains("`order`"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Policy::from_value(&json!({"max_failed": "five"})).unwrap_err();
        assert!(e.to_string().contains("`max_failed`"), "{e}");
        let e = Policy::from_value(&json!({"max_fail": 2})).unwrap_err();
        assert!(e.to_string().contains("`max_fail`"), "{e}");
        let e = Policy::from_value(&json!({"max_unavailable": {"web": 0}})).unwrap_err();
        assert!(e.to_string().contains("max_unavailable.web"), "{e}");
        let e = Policy::from_value(&json!({"waves": ["0%"]})).unwrap_err();
        assert!(e.to_string().contains("`waves`"), "{e}");
        let e = Policy::from_value(&json!({"pause": "soon"})).unwrap_err();
        assert!(e.to_string().contains("`pause`"), "{e}");
    }
}
