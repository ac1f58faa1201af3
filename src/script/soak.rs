//! The `soak` key of a rollout policy: `soak: #{ period: "72h", every: "15m",
//! logs: [...], thresholds: #{ error_rate: "2x" } }` keeps the hosts the rollout
//! patched under watch after the run, sampled on a schedule against a baseline.
//!
//! This module owns the option map: its keys, its checks, and turning it into a
//! [`SoakSpec`]. The sampling options (`metrics`, `logs`, `probes`, `services`,
//! `thresholds`, `baseline`, `timeout`) mean what they mean to `monitor()` and are
//! parsed by the same code; `period` is the key for how long (`for` is reserved in
//! Rhai). A run only journals the plan (`soak.planned`); `patchbook watch` does the
//! soaking, so this module must not sample hosts or wait.

use std::collections::BTreeMap;
use std::time::Duration;

use rhai::Map;
use serde_json::Value;

use super::patch::{no_unknown_keys, opt_duration};
use super::rollout::from_json;
use crate::primitives::monitor::{Probe, Threshold};

/// Keys of a policy's `soak` map; `patchbook check` reads the same list.
pub const SOAK_OPTION_KEYS: &[&str] = &[
    "period",
    "every",
    "metrics",
    "baseline",
    "thresholds",
    "logs",
    "error_pattern",
    "services",
    "probes",
    "timeout",
];

const DEFAULT_EVERY: Duration = Duration::from_secs(15 * 60);

/// A parsed `soak` map.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    /// How long the hosts are watched after their run.
    pub period: Duration,
    /// Time between two samples of one host.
    pub every: Duration,
    pub probe: Probe,
    /// Samples taken at the start when the run left no `monitor` baseline.
    pub baseline: usize,
    pub thresholds: BTreeMap<String, Threshold>,
    /// Metric → threshold as written, for records and messages.
    pub written: BTreeMap<String, String>,
    /// Deadline of one sample.
    pub timeout: Duration,
}

/// Parses a policy's `soak` map.
pub fn parse(opts: &Map) -> Result<SoakSpec, String> {
    no_unknown_keys(opts, SOAK_OPTION_KEYS).map_err(|e| format!("soak: {e}"))?;
    let period = opt_duration(opts, "period")
        .map_err(|e| format!("soak: {e}"))?
        .ok_or(
            "soak: `period` is required: how long to watch the hosts after the run, e.g. \"72h\"",
        )?;
    let every = opt_duration(opts, "every")
        .map_err(|e| format!("soak: {e}"))?
        .unwrap_or(DEFAULT_EVERY);
    if period.is_zero() || every.is_zero() {
        return Err("soak: `period` and `every` must be more than zero".into());
    }
    if every > period {
        return Err(format!(
            "soak: `every` ({}s) is longer than `period` ({}s): no sample would be taken; shorten `every`",
            every.as_secs(),
            period.as_secs()
        ));
    }
    let mut sampling = opts.clone();
    sampling.remove("period");
    sampling.remove("every");
    let p = super::monitor::plan(&sampling).map_err(|e| format!("soak: {e}"))?;
    Ok(SoakSpec {
        period,
        every,
        probe: p.probe,
        baseline: p.baseline,
        thresholds: p.thresholds,
        written: p.written,
        timeout: p.timeout,
    })
}

/// Parses the map as a `soak.planned` record keeps it.
pub fn from_record(options: &Value) -> Result<SoakSpec, String> {
    match from_json(options).try_cast::<Map>() {
        Some(m) => parse(&m),
        None => Err("soak: the recorded options are not a map".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_soak_map_parses_like_monitor_options() {
        let s = from_record(&json!({
            "period": "72h", "every": "15m",
            "logs": ["/var/log/app.log"],
            "thresholds": {"error_rate": "2x", "mem": "+20%"},
        }))
        .unwrap();
        assert_eq!(s.period, Duration::from_secs(72 * 3600));
        assert_eq!(s.every, Duration::from_secs(900));
        assert_eq!(s.probe.logs, ["/var/log/app.log"]);
        assert_eq!(s.thresholds["error_rate"], Threshold::Times(2.0));
        assert_eq!(s.written["mem"], "+20%");

        let err = |v: Value| from_record(&v).unwrap_err();
        assert!(err(json!({"thresholds": {"mem": "+5"}})).contains("`period` is required"));
        assert!(
            err(json!({"period": "1m", "every": "2m", "thresholds": {"mem": "+5"}}))
                .contains("longer than `period`")
        );
        assert!(
            err(json!({"period": "1m", "window": "2m", "thresholds": {"mem": "+5"}}))
                .contains("unknown option `window`")
        );
        assert!(
            err(json!({"period": "1m", "every": "10s", "thresholds": {"error_rate": "2x"}}))
                .contains("error_rate needs `logs`")
        );
    }
}
