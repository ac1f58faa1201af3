//! The metric gate between waves: the policy's `gate: #{ prometheus, query, max |
//! min, soak, range, timeout }`, parsed, and its evaluation against a Prometheus
//! server over the HTTP API (`/api/v1/query`, or `/api/v1/query_range` with
//! `range`).
//!
//! It owns the gate's parsing and the one question "does the fleet look healthy
//! now?"; when it is asked (after a wave and its soak) and what a "no" does are
//! the executor's. Everything that is not a clear yes is a no: an unreachable
//! server, an error status, a query that returns no series, a NaN. It must not
//! know Rhai or the journal; the verdict it returns is the record the executor
//! emits.

use std::time::Duration;

use serde_json::{Map, Value};

use super::policy::{format_duration, parse_duration, PolicyError};
use crate::journal::entry::GateVerdict;

/// How long one request to Prometheus may take when the gate does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys of the `gate` map.
pub const GATE_KEYS: &[&str] = &[
    "prometheus",
    "query",
    "max",
    "min",
    "soak",
    "range",
    "timeout",
];

/// A gate on a PromQL query: every sample it returns must lie within the bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricGate {
    /// Base URL of the Prometheus server, e.g. `http://prometheus:9090`.
    pub prometheus: String,
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// Waited after each wave before the query is asked.
    pub soak: Duration,
    /// With a range, every sample of the last `range` must pass, not only the latest.
    pub range: Option<Duration>,
    pub timeout: Duration,
}

fn invalid(key: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: format!("gate.{key}"),
        message: message.into(),
    }
}

impl MetricGate {
    /// Parses the `gate` map of a policy.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, PolicyError> {
        for k in map.keys() {
            if !GATE_KEYS.contains(&k.as_str()) {
                return Err(PolicyError::UnknownKey {
                    key: format!("gate.{k}"),
                    known: GATE_KEYS.join(", "),
                });
            }
        }
        let text = |k: &str| -> Result<String, PolicyError> {
            match map.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                Some(other) => Err(invalid(k, format!("expected a string, got {other}"))),
                None => Err(invalid(k, "is required in a metric gate")),
            }
        };
        let prometheus = text("prometheus")?;
        match url::Url::parse(&prometheus) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(invalid(
                    "prometheus",
                    format!(
                    "`{prometheus}` is not an http:// or https:// URL like http://prometheus:9090"
                ),
                ))
            }
        }
        let query = text("query")?;
        let bound = |k: &str| -> Result<Option<f64>, PolicyError> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .map(Some)
                    .ok_or_else(|| invalid(k, format!("`{n}` is not a finite number"))),
                Some(Value::String(s)) => s
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(Some)
                    .ok_or_else(|| invalid(k, format!("`{s}` is not a number"))),
                Some(other) => Err(invalid(k, format!("expected a number, got {other}"))),
            }
        };
        let (max, min) = (bound("max")?, bound("min")?);
        if max.is_none() && min.is_none() {
            return Err(invalid(
                "max",
                "a metric gate needs `max` or `min` (or both): the bound the query must stay within",
            ));
        }
        let duration = |k: &str| -> Result<Option<Duration>, PolicyError> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Some(Duration::from_secs_f64(s)))
                    .ok_or_else(|| invalid(k, format!("`{n}` is not a number of seconds"))),
                Some(Value::String(s)) => parse_duration(s).map(Some).map_err(|m| invalid(k, m)),
                Some(other) => Err(invalid(
                    k,
                    format!("expected a duration like \"10m\", got {other}"),
                )),
            }
        };
        let timeout = duration("timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(invalid("timeout", "a zero timeout would fail every gate"));
        }
        let range = duration("range")?.filter(|r| !r.is_zero());
        Ok(MetricGate {
            prometheus,
            query,
            max,
            min,
            soak: duration("soak")?.unwrap_or(Duration::ZERO),
            range,
            timeout,
        })
    }

    /// The bounds as a reader says them: `max 0.5`, `min 1, max 3`.
    pub fn bounds(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.min {
            parts.push(format!("min {m}"));
        }
        if let Some(m) = self.max {
            parts.push(format!("max {m}"));
        }
        parts.join(", ")
    }

    fn within(&self, v: f64) -> bool {
        !v.is_nan() && self.max.is_none_or(|m| v <= m) && self.min.is_none_or(|m| v >= m)
    }

    /// Asks Prometheus now. `range` is read in real time: Prometheus keeps real
    /// timestamps whatever the run's clock says.
    pub fn evaluate(&self, after_wave: usize, soaked: Duration) -> GateVerdict {
        let result = self.fetch().and_then(|samples| self.judge(&samples));
        let (passed, value, detail) = match result {
            Ok((worst, detail)) => (true, Some(worst), detail),
            Err(Judged { value, detail }) => (false, value, detail),
        };
        GateVerdict {
            after_wave,
            check: "prometheus".into(),
            query: Some(self.query.clone()),
            bounds: Some(self.bounds()),
            value,
            passed,
            detail,
            soaked_seconds: soaked.as_secs_f64(),
        }
    }

    fn fetch(&self) -> Result<Vec<(String, f64)>, Judged> {
        let base = self.prometheus.trim_end_matches('/');
        let agent = ureq::AgentBuilder::new()
            .timeout(self.timeout)
            .redirects(0)
            .build();
        let request = match self.range {
            None => agent
                .get(&format!("{base}/api/v1/query"))
                .query("query", &self.query),
            Some(range) => {
                let end = chrono::Utc::now();
                let span = chrono::Duration::from_std(range).unwrap_or(chrono::Duration::MAX);
                let start = end.checked_sub_signed(span).unwrap_or(end);
                // About 60 points over the range, never finer than a second.
                let step = (range.as_secs_f64() / 60.0).max(1.0);
                agent
                    .get(&format!("{base}/api/v1/query_range"))
                    .query("query", &self.query)
                    .query("start", &start.timestamp().to_string())
                    .query("end", &end.timestamp().to_string())
                    .query("step", &format!("{step}"))
            }
        };
        let unreachable = |m: String| {
            Judged {
            value: None,
            detail: format!(
                "Prometheus at {} did not answer ({m}); an unreachable gate is a failed gate: check the server, then `patchbook run --resume`",
                self.prometheus
            ),
        }
        };
        let body: Value = match request.call() {
            Ok(r) => json_body(r).map_err(unreachable)?,
            // Prometheus answers a bad query with 400 and a JSON error.
            Err(ureq::Error::Status(code, r)) => match json_body(r) {
                Ok(v) => v,
                Err(_) => return Err(unreachable(format!("HTTP {code}"))),
            },
            Err(e) => return Err(unreachable(e.to_string())),
        };
        if body["status"] != "success" {
            return Err(Judged {
                value: None,
                detail: format!(
                    "Prometheus refused the query: {}",
                    body["error"].as_str().unwrap_or("no reason given")
                ),
            });
        }
        parse_samples(&body["data"]).map_err(|detail| Judged {
            value: None,
            detail,
        })
    }

    /// The sample furthest out of bounds (or, when all pass, nearest the bound)
    /// and a line naming it.
    fn judge(&self, samples: &[(String, f64)]) -> Result<(f64, String), Judged> {
        if samples.is_empty() {
            return Err(Judged {
                value: None,
                detail: "the query returned no samples; a gate without data does not pass".into(),
            });
        }
        if let Some((series, v)) = samples.iter().find(|(_, v)| !self.within(*v)) {
            return Err(Judged {
                value: Some(*v),
                detail: format!("{series} = {v} is outside {}", self.bounds()),
            });
        }
        // Every sample passed: report the one closest to failing.
        let worst = match (self.max, self.min) {
            (Some(_), _) => samples.iter().map(|s| s.1).fold(f64::MIN, f64::max),
            _ => samples.iter().map(|s| s.1).fold(f64::MAX, f64::min),
        };
        let over = self
            .range
            .map(|r| format!(" over the last {}", format_duration(r)))
            .unwrap_or_default();
        Ok((
            worst,
            format!(
                "{} samples{over} within {} (worst {worst})",
                samples.len(),
                self.bounds()
            ),
        ))
    }
}

fn json_body(r: ureq::Response) -> Result<Value, String> {
    let text = r.into_string().map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("not a Prometheus API answer: {e}"))
}

struct Judged {
    value: Option<f64>,
    detail: String,
}

/// `(series, value)` of every sample in a query's `data`: vector, matrix or scalar.
fn parse_samples(data: &Value) -> Result<Vec<(String, f64)>, String> {
    let point = |p: &Value| -> Result<f64, String> {
        let s = p.get(1).and_then(Value::as_str).ok_or_else(|| {
            format!("Prometheus sent a sample that is not [time, \"value\"]: {p}")
        })?;
        // "NaN", "+Inf" and "-Inf" parse, and fail every bound but an infinite one.
        s.parse::<f64>()
            .map_err(|_| format!("Prometheus sent a value that is not a number: {s}"))
    };
    let series = |m: &Value| -> String {
        match m.as_object() {
            Some(labels) if !labels.is_empty() => {
                let inner: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", v.as_str().unwrap_or_default()))
                    .collect();
                format!("{{{}}}", inner.join(","))
            }
            _ => "the result".into(),
        }
    };
    let mut out = Vec::new();
    match data["resultType"].as_str() {
        Some("scalar") => out.push(("the result".to_string(), point(&data["result"])?)),
        Some("vector") => {
            for s in data["result"].as_array().into_iter().flatten() {
                out.push((series(&s["metric"]), point(&s["value"])?));
            }
        }
        Some("matrix") => {
            for s in data["result"].as_array().into_iter().flatten() {
                let name = series(&s["metric"]);
                for p in s["values"].as_array().into_iter().flatten() {
                    out.push((name.clone(), point(p)?));
                }
            }
        }
        other => {
            return Err(format!(
                "Prometheus answered with a result type the gate cannot judge: {}",
                other.unwrap_or("none")
            ))
        }
    }
    Ok(out)
}

/// The verdict of a closure gate (`gate: |w| …`) after `after_wave`: its result
/// (an error is a failed gate, named) and how long the wave soaked before it. The
/// one record of it, for a run on one controller and a run shared with workers.
pub fn closure_verdict<E: std::fmt::Display>(
    after_wave: usize,
    result: Result<bool, E>,
    soaked: Duration,
) -> GateVerdict {
    let (passed, detail) = match result {
        Ok(true) => (true, "the gate returned true".to_string()),
        Ok(false) => (false, "the gate returned false".to_string()),
        Err(e) => (false, format!("the gate failed: {e}")),
    };
    GateVerdict {
        after_wave,
        check: "closure".into(),
        query: None,
        bounds: None,
        value: None,
        passed,
        detail,
        soaked_seconds: soaked.as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gate(v: Value) -> Result<MetricGate, PolicyError> {
        MetricGate::from_map(v.as_object().unwrap())
    }

    #[test]
    fn parses_and_refuses() {
        let g =
            gate(json!({"prometheus": "http://p:9090", "query": "up", "min": 1, "soak": "10m"}))
                .unwrap();
        assert_eq!(g.soak, Duration::from_secs(600));
        assert_eq!(g.min, Some(1.0));
        assert_eq!(g.timeout, DEFAULT_TIMEOUT);
        let e = gate(json!({"prometheus": "http://p:9090", "query": "up"})).unwrap_err();
        assert!(e.to_string().contains("`max` or `min`"), "{e}");
        let e = gate(json!({"prometheus": "p:9090", "query": "up", "max": 1})).unwrap_err();
        assert!(e.to_string().contains("gate.prometheus"), "{e}");
        let e = gate(json!({"prometheus": "http://p", "query": "up", "max": 1, "soke": "1m"}))
            .unwrap_err();
        assert!(e.to_string().contains("gate.soke"), "{e}");
    }

    #[test]
    fn judges_every_sample_and_never_passes_without_data() {
        let g = gate(json!({"prometheus": "http://p", "query": "q", "max": 0.5})).unwrap();
        let vector = json!({"resultType": "vector", "result": [
            {"metric": {"instance": "a"}, "value": [1.0, "0.1"]},
            {"metric": {"instance": "b"}, "value": [1.0, "0.9"]}]});
        let s = parse_samples(&vector).unwrap();
        let e = g.judge(&s).err().unwrap();
        assert_eq!(e.value, Some(0.9));
        assert!(e.detail.contains("instance=\"b\""), "{}", e.detail);
        assert!(g.judge(&[]).is_err());
        assert!(g.judge(&[("x".into(), f64::NAN)]).is_err());
        let (worst, _) = g.judge(&s[..1]).ok().unwrap();
        assert_eq!(worst, 0.1);
        let matrix = json!({"resultType": "matrix", "result": [
            {"metric": {}, "values": [[1.0, "0.1"], [2.0, "0.7"]]}]});
        assert!(g.judge(&parse_samples(&matrix).unwrap()).is_err());
    }

    #[test]
    fn an_unreachable_server_fails_the_gate() {
        // A port that was free a moment ago: nothing answers there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let g = gate(
            json!({"prometheus": format!("http://127.0.0.1:{port}"), "query": "up",
                            "min": 1, "timeout": "2s"}),
        )
        .unwrap();
        let v = g.evaluate(1, Duration::ZERO);
        assert!(!v.passed);
        assert!(v.detail.contains("did not answer"), "{}", v.detail);
    }
}
