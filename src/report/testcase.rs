//! Staging checks: the `test` record a `test(name, kind, || { … })` playbook call
//! leaves in the journal, and the timing around the check itself.
//!
//! The record's `data` is one serialized [`TestCase`]:
//!
//! ```json
//! { "name": "p95 latency", "kind": "performance", "ok": true, "duration_ms": 812.4,
//!   "patch_version": "1.0.1",
//!   "metrics": { "before": 120.0, "after": 126.0, "threshold_pct": 10.0, "unit": "ms" } }
//! ```
//!
//! `error`, `patch_version` and `metrics` are left out when absent. The report's
//! test section reads these records back; nothing else keeps them. The types are
//! defined with the other record types in [`crate::journal::entry`]; this module
//! owns running, timing and judging a check, and must not write other records.

use std::str::FromStr;
use std::time::Instant;

// The record types are the journal's (`test` records); re-exported here, where
// checks are run and timed.
pub use crate::journal::entry::{Metrics, TestCase, TestKind};
use crate::journal::{Entry, Journal, JournalError, Record};

/// Kind of the journal record one staging check writes.
pub const RECORD_KIND: &str = crate::journal::kind::TEST;

impl TestKind {
    pub const ALL: [TestKind; 4] = [
        TestKind::Functional,
        TestKind::Integration,
        TestKind::Performance,
        TestKind::Regression,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TestKind::Functional => "functional",
            TestKind::Integration => "integration",
            TestKind::Performance => "performance",
            TestKind::Regression => "regression",
        }
    }
}

impl std::fmt::Display for TestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A test kind that is none of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{given}` is not a test kind; use one of functional, integration, performance, regression"
)]
pub struct UnknownTestKind {
    pub given: String,
}

impl FromStr for TestKind {
    type Err = UnknownTestKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TestKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownTestKind {
                given: s.to_string(),
            })
    }
}

impl Metrics {
    /// How much worse `after` is than `before`, in percent of `before` (negative:
    /// better). `None` when `before` is zero and `after` differs, where no
    /// percentage means anything.
    pub fn degradation_pct(&self) -> Option<f64> {
        let worse_by = if self.higher_is_better {
            self.before - self.after
        } else {
            self.after - self.before
        };
        if self.before == 0.0 {
            return (worse_by == 0.0).then_some(0.0);
        }
        let pct = worse_by / self.before.abs() * 100.0;
        pct.is_finite().then_some(pct)
    }

    /// Within the threshold: degraded by at most `threshold_pct`.
    pub fn within_threshold(&self) -> bool {
        match self.degradation_pct() {
            Some(pct) => pct <= self.threshold_pct,
            // From zero to anything worse is an unbounded degradation.
            None => false,
        }
    }
}

impl TestCase {
    /// Runs one check and times it. The check returns its metrics (performance
    /// checks) or `None`, or an error text. A performance check whose metrics are
    /// over their threshold fails even when the check itself returned `Ok`.
    pub fn run(
        name: impl Into<String>,
        kind: TestKind,
        patch_version: Option<String>,
        check: impl FnOnce() -> Result<Option<Metrics>, String>,
    ) -> TestCase {
        let started = Instant::now();
        let result = check();
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (ok, error, metrics) = match result {
            Err(e) => (false, Some(e), None),
            Ok(Some(m)) if !m.within_threshold() => {
                let error = Some(degraded_message(&m));
                (false, error, Some(m))
            }
            Ok(m) => (true, None, m),
        };
        TestCase {
            name: name.into(),
            kind,
            ok,
            duration_ms,
            error,
            patch_version,
            metrics,
        }
    }

    /// Appends this case as a `test` record, on disk when it returns. `host` is the
    /// staging host the check ran against, when there is one.
    pub fn record(&self, journal: &Journal, host: Option<&str>) -> Result<Record, JournalError> {
        record_test(journal, host, self)
    }
}

/// Appends one staging check as a `test` record (see the module docs for the format).
pub fn record_test(
    journal: &Journal,
    host: Option<&str>,
    case: &TestCase,
) -> Result<Record, JournalError> {
    journal.append_entry(host, &Entry::Test(case.clone()))
}

fn degraded_message(m: &Metrics) -> String {
    let unit = if m.unit.is_empty() {
        String::new()
    } else {
        format!(" {}", m.unit)
    };
    match m.degradation_pct() {
        Some(pct) => format!(
            "degraded by {pct:.1}% ({}{unit} before, {}{unit} after), over the {}% threshold",
            m.before, m.after, m.threshold_pct
        ),
        None => format!(
            "went from {}{unit} to {}{unit}: no percentage of zero is within the {}% threshold",
            m.before, m.after, m.threshold_pct
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(before: f64, after: f64, threshold_pct: f64) -> Metrics {
        Metrics {
            before,
            after,
            threshold_pct,
            unit: "ms".into(),
            higher_is_better: false,
        }
    }

    #[test]
    fn degradation_is_measured_in_the_direction_that_hurts() {
        assert_eq!(m(100.0, 110.0, 10.0).degradation_pct(), Some(10.0));
        assert!(m(100.0, 110.0, 10.0).within_threshold());
        assert!(!m(100.0, 110.5, 10.0).within_threshold());
        assert!(m(100.0, 50.0, 0.0).within_threshold());
        let rps = Metrics {
            higher_is_better: true,
            ..m(1000.0, 850.0, 10.0)
        };
        assert_eq!(rps.degradation_pct(), Some(15.0));
        assert!(!rps.within_threshold());
        assert_eq!(m(0.0, 0.0, 5.0).degradation_pct(), Some(0.0));
        assert!(!m(0.0, 1.0, 5.0).within_threshold());
    }

    #[test]
    fn a_check_over_its_threshold_fails_with_the_numbers() {
        let case = TestCase::run("p95", TestKind::Performance, Some("1.0.1".into()), || {
            Ok(Some(m(100.0, 130.0, 10.0)))
        });
        assert!(!case.ok);
        let error = case.error.unwrap();
        assert!(
            error.contains("30.0%") && error.contains("10% threshold"),
            "{error}"
        );
        let case = TestCase::run("login", TestKind::Functional, None, || {
            Err("HTTP 500".into())
        });
        assert_eq!((case.ok, case.error.as_deref()), (false, Some("HTTP 500")));
        let case = TestCase::run("login", TestKind::Functional, None, || Ok(None));
        assert!(case.ok && case.error.is_none() && case.duration_ms >= 0.0);
    }

    #[test]
    fn kinds_parse_and_name_the_choices_when_wrong() {
        assert_eq!("Performance".parse::<TestKind>(), Ok(TestKind::Performance));
        let e = "smoke".parse::<TestKind>().unwrap_err().to_string();
        assert!(e.contains("`smoke`") && e.contains("regression"), "{e}");
    }

    #[test]
    fn the_record_format_leaves_out_what_is_absent() {
        let case = TestCase {
            name: "n".into(),
            kind: TestKind::Regression,
            ok: true,
            duration_ms: 1.5,
            error: None,
            patch_version: None,
            metrics: None,
        };
        assert_eq!(
            serde_json::to_value(&case).unwrap(),
            serde_json::json!({"name": "n", "kind": "regression", "ok": true, "duration_ms": 1.5})
        );
    }
}
