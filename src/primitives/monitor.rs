//! Post-patch monitoring of one host against its own pre-patch baseline: what a
//! sample reads (CPU, memory, load, disk use and I/O from `/proc` and `df`, error
//! lines in named log files, restarts of named services, custom probe commands
//! returning a number), read with one command per sample; the rates derived from
//! two consecutive readings; and the verdict of thresholds relative to the
//! baseline (`"2x"`, `"+20%"`, `"+5"`, or an absolute ceiling `90`).
//!
//! It owns the probe, the arithmetic and the verdict. When samples are taken and
//! how long the window is belong to the script layer (which holds the run's
//! clock); it writes the records. Reading never changes the host.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{HostCtx, PrimitiveError};
use crate::transport::quote;

/// Metrics read from `/proc` and `df` on every sample unless `metrics` names fewer.
pub const PROC_METRICS: &[&str] = &["cpu", "mem", "load", "disk", "io"];

/// Lines counted as errors in `logs` unless `error_pattern` says otherwise.
pub const DEFAULT_ERROR_PATTERN: &str = "error|fail|crit|panic";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MonitorError {
    #[error("monitor: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> MonitorError {
    MonitorError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// How far a metric may move from its baseline.
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    /// `"2x"`: at most this multiple of the baseline.
    Times(f64),
    /// `"+20%"`: at most this many percent above the baseline.
    Percent(f64),
    /// `"+5"`: at most this much above the baseline.
    Plus(f64),
    /// `90`: at most this, whatever the baseline.
    Ceiling(f64),
}

impl Threshold {
    pub fn parse(key: &str, text: &str) -> Result<Self, MonitorError> {
        let t = text.trim();
        let num = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    invalid(
                        &format!("thresholds.{key}"),
                        format!("`{text}` is not like \"2x\", \"+20%\", \"+5\" or 90"),
                    )
                })
        };
        if let Some(x) = t.strip_suffix('x') {
            Ok(Threshold::Times(num(x)?))
        } else if let Some(p) = t.strip_prefix('+').and_then(|p| p.strip_suffix('%')) {
            Ok(Threshold::Percent(num(p)?))
        } else if let Some(p) = t.strip_prefix('+') {
            Ok(Threshold::Plus(num(p)?))
        } else {
            Ok(Threshold::Ceiling(num(t)?))
        }
    }

    /// The highest value that still passes, given the baseline.
    pub fn limit(&self, baseline: f64) -> f64 {
        match self {
            Threshold::Times(x) => baseline * x,
            Threshold::Percent(p) => baseline * (1.0 + p / 100.0),
            Threshold::Plus(d) => baseline + d,
            Threshold::Ceiling(c) => *c,
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Times(x) => write!(f, "{x}x"),
            Threshold::Percent(p) => write!(f, "+{p}%"),
            Threshold::Plus(d) => write!(f, "+{d}"),
            Threshold::Ceiling(c) => write!(f, "{c}"),
        }
    }
}

/// What to read on each sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Probe {
    /// Of [`PROC_METRICS`].
    pub proc_metrics: Vec<String>,
    /// Log files whose matching lines give `error_rate` (per minute).
    pub logs: Vec<String>,
    pub error_pattern: String,
    /// Services (process names) whose main process changing counts as a restart.
    pub services: Vec<String>,
    /// Custom metrics: name → shell line printing a number.
    pub commands: BTreeMap<String, String>,
}

/// One reading: counters as they are, before rates are derived.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reading {
    /// `cpu` busy and total jiffies.
    pub cpu: Option<(f64, f64)>,
    pub mem_pct: Option<f64>,
    pub load: Option<f64>,
    pub disk_pct: Option<f64>,
    /// Sectors read and written since boot.
    pub io_sectors: Option<f64>,
    /// Matching lines in all the logs together.
    pub error_lines: Option<f64>,
    /// Main PID of each service (0 when it is not running).
    pub pids: BTreeMap<String, u64>,
    pub commands: BTreeMap<String, f64>,
}

impl Probe {
    /// The one shell script a sample runs.
    pub fn script(&self) -> String {
        let mut s = String::new();
        let has = |m: &str| self.proc_metrics.iter().any(|x| x == m);
        if has("cpu") {
            s.push_str("echo \"cpu $(head -n1 /proc/stat)\"\n");
        }
        if has("mem") {
            s.push_str("awk '/^MemTotal:|^MemAvailable:/{print \"mem\", $1, $2}' /proc/meminfo\n");
        }
        if has("load") {
            s.push_str("echo \"load $(cut -d' ' -f1 /proc/loadavg)\"\n");
        }
        if has("disk") {
            s.push_str("df -P / | awk 'NR==2{sub(\"%\",\"\",$5); print \"disk\", $5}'\n");
        }
        if has("io") {
            s.push_str("awk '{t+=$6+$10} END{print \"io\", t+0}' /proc/diskstats\n");
        }
        if !self.logs.is_empty() {
            let files: Vec<String> = self.logs.iter().map(|f| quote::word(f)).collect();
            s.push_str(&format!(
                "echo \"errors $(cat {} 2>/dev/null | grep -c -i -E {})\"\n",
                files.join(" "),
                quote::word(&self.error_pattern)
            ));
        }
        for svc in &self.services {
            s.push_str(&format!(
                "echo \"svc {} $(pgrep -o -x {} || echo 0)\"\n",
                quote::word(svc),
                quote::word(svc)
            ));
        }
        for (name, cmd) in &self.commands {
            s.push_str(&format!(
                "echo \"probe {} $( ( {} ) 2>/dev/null | head -n1)\"\n",
                quote::word(name),
                cmd
            ));
        }
        s
    }

    /// Reads the host once.
    pub fn read(&self, ctx: &HostCtx, timeout: Duration) -> Result<Reading, PrimitiveError> {
        let argv = vec!["sh".to_string(), "-c".to_string(), self.script()];
        let r = super::exec::probe(ctx, &argv, timeout)?;
        parse_reading(&r.stdout).map_err(|m| PrimitiveError::step(ctx.name(), "monitor", m))
    }
}

fn number(what: &str, s: Option<&str>) -> Result<f64, String> {
    s.and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("the host printed no number for {what}"))
}

/// Parses the output of [`Probe::script`].
pub fn parse_reading(out: &str) -> Result<Reading, String> {
    let mut r = Reading::default();
    let (mut total, mut avail) = (None, None);
    for line in out.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                // "cpu cpu user nice system idle iowait irq softirq steal …"
                let v: Vec<f64> = f.skip(1).filter_map(|x| x.parse().ok()).collect();
                if v.len() >= 4 {
                    let all: f64 = v.iter().sum();
                    let idle = v[3] + v.get(4).copied().unwrap_or(0.0);
                    r.cpu = Some((all - idle, all));
                }
            }
            Some("mem") => match (f.next(), f.next()) {
                (Some("MemTotal:"), v) => total = Some(number("MemTotal", v)?),
                (Some("MemAvailable:"), v) => avail = Some(number("MemAvailable", v)?),
                _ => {}
            },
            Some("load") => r.load = Some(number("load", f.next())?),
            Some("disk") => r.disk_pct = Some(number("disk use", f.next())?),
            Some("io") => r.io_sectors = Some(number("disk I/O", f.next())?),
            Some("errors") => r.error_lines = Some(number("error lines", f.next())?),
            Some("svc") => {
                if let (Some(name), pid) = (f.next(), f.next()) {
                    r.pids.insert(
                        name.to_string(),
                        pid.and_then(|p| p.parse().ok()).unwrap_or(0),
                    );
                }
            }
            Some("probe") => {
                if let Some(name) = f.next() {
                    let v = number(&format!("probe `{name}`"), f.next())?;
                    r.commands.insert(name.to_string(), v);
                }
            }
            _ => {}
        }
    }
    if let (Some(t), Some(a)) = (total, avail) {
        if t > 0.0 {
            r.mem_pct = Some((t - a) / t * 100.0);
        }
    }
    Ok(r)
}

/// The metrics of one sample: levels as read, rates over the time since `prev`.
pub fn sample(prev: &Reading, now: &Reading, elapsed: Duration) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let secs = elapsed.as_secs_f64().max(0.001);
    if let (Some((b0, t0)), Some((b1, t1))) = (prev.cpu, now.cpu) {
        let dt = t1 - t0;
        m.insert(
            "cpu".into(),
            if dt > 0.0 {
                ((b1 - b0) / dt * 100.0).clamp(0.0, 100.0)
            } else {
                0.0
            },
        );
    }
    if let Some(v) = now.mem_pct {
        m.insert("mem".into(), v);
    }
    if let Some(v) = now.load {
        m.insert("load".into(), v);
    }
    if let Some(v) = now.disk_pct {
        m.insert("disk".into(), v);
    }
    if let (Some(a), Some(b)) = (prev.io_sectors, now.io_sectors) {
        // 512-byte sectors → KiB per second.
        m.insert("io".into(), ((b - a).max(0.0) * 0.5) / secs);
    }
    if let (Some(a), Some(b)) = (prev.error_lines, now.error_lines) {
        // A rotated log shrinks: count it as no new lines, not negative ones.
        m.insert("error_rate".into(), (b - a).max(0.0) / secs * 60.0);
    }
    if !now.pids.is_empty() {
        let restarts = now
            .pids
            .iter()
            .filter(|(name, pid)| prev.pids.get(*name).is_some_and(|p| p != *pid))
            .count();
        m.insert("restarts".into(), restarts as f64);
    }
    for (k, v) in &now.commands {
        m.insert(k.clone(), *v);
    }
    m
}

/// The mean of each metric over some samples.
pub fn mean(samples: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let mut sum: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in samples {
        for (k, v) in s {
            let e = sum.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sum.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// The lines naming every metric past its threshold: empty when the host passes.
/// A metric with a threshold but no value after the change is a regression too:
/// what cannot be read cannot be said to be healthy.
pub fn regressions(
    baseline: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    thresholds: &BTreeMap<String, Threshold>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (metric, t) in thresholds {
        let base = baseline.get(metric).copied().unwrap_or(0.0);
        let limit = t.limit(base);
        match after.get(metric) {
            None => out.push(format!("{metric}: no value after the change")),
            Some(v) if *v > limit + 1e-9 => out.push(format!(
                "{metric} {v:.2} after the change, baseline {base:.2}, limit {limit:.2} ({t})"
            )),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_relative_to_the_baseline() {
        assert_eq!(Threshold::parse("m", "2x").unwrap().limit(3.0), 6.0);
        assert_eq!(Threshold::parse("m", "+20%").unwrap().limit(50.0), 60.0);
        assert_eq!(Threshold::parse("m", "+5").unwrap().limit(1.0), 6.0);
        assert_eq!(Threshold::parse("m", "90").unwrap().limit(1.0), 90.0);
        assert!(Threshold::parse("m", "lots").is_err());
        let t = BTreeMap::from([
            ("error_rate".to_string(), Threshold::Times(2.0)),
            ("mem".to_string(), Threshold::Percent(20.0)),
        ]);
        let base = BTreeMap::from([("error_rate".into(), 1.0), ("mem".into(), 50.0)]);
        let ok = BTreeMap::from([("error_rate".into(), 2.0), ("mem".into(), 59.0)]);
        assert!(regressions(&base, &ok, &t).is_empty());
        let bad = BTreeMap::from([("error_rate".into(), 2.5), ("mem".into(), 61.0)]);
        assert_eq!(regressions(&base, &bad, &t).len(), 2);
        assert_eq!(regressions(&base, &BTreeMap::new(), &t).len(), 2);
    }

    #[test]
    fn rates_come_from_two_readings() {
        let a = parse_reading(
            "cpu cpu 100 0 100 700 100 0 0 0\nmem MemTotal: 1000 kB\nmem MemAvailable: 250 kB\n\
             io 1000\nerrors 4\nsvc acme 10\nprobe queue 7\nload 0.5\ndisk 40\n",
        )
        .unwrap();
        let b = parse_reading(
            "cpu cpu 150 0 150 750 150 0 0 0\nio 3048\nerrors 10\nsvc acme 12\nprobe queue 9\n",
        )
        .unwrap();
        assert_eq!(a.mem_pct, Some(75.0));
        let s = sample(&a, &b, Duration::from_secs(60));
        assert_eq!(s["cpu"], 50.0);
        assert_eq!(s["io"], 1024.0 / 60.0);
        assert_eq!(s["error_rate"], 6.0);
        assert_eq!(s["restarts"], 1.0);
        assert_eq!(s["queue"], 9.0);
        assert!(parse_reading("probe queue nothing\n").is_err());
    }

    #[test]
    fn the_script_reads_the_local_machine() {
        let t = crate::transport::local::LocalTransport::new("here");
        let p = Probe {
            proc_metrics: PROC_METRICS.iter().map(|s| s.to_string()).collect(),
            commands: BTreeMap::from([("seven".to_string(), "echo 7".to_string())]),
            ..Default::default()
        };
        let argv = vec!["sh".to_string(), "-c".to_string(), p.script()];
        let out = super::super::exec::exec(&t, &argv, Duration::from_secs(10)).unwrap();
        let r = parse_reading(&out.stdout).unwrap();
        assert!(
            r.cpu.is_some() && r.mem_pct.is_some() && r.load.is_some(),
            "{out:?}"
        );
        assert!(r.disk_pct.is_some() && r.io_sectors.is_some(), "{out:?}");
        assert_eq!(r.commands["seven"], 7.0);
    }
}
