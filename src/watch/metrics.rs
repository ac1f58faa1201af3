//! `GET /metrics`: the service's numbers for Prometheus, in the OpenMetrics text
//! format (which Prometheus reads natively).
//!
//! It owns the meters that only exist for scraping (the reload latency histogram,
//! runs counted by outcome, the last advisory scan's open CVE count) and the
//! rendering of everything else from [`Service::counts`] at scrape time, so the
//! status page and `/metrics` never disagree. It must not change the service.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::service::Service;

/// The content type `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a run ended, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The playbook finished and every host ended well.
    Ok,
    /// The playbook finished with failed hosts, or stopped on its failure budget.
    Failed,
    /// The run could not be carried out (compile, journal or launch error).
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    playbook: String,
    state: String,
}

/// Meters the service updates as things happen.
pub struct Meters {
    reload_seconds: Histogram,
    runs: Family<OutcomeLabel, Counter>,
    open_cves: Mutex<Option<u64>>,
}

impl Default for Meters {
    fn default() -> Self {
        Meters {
            // 5 ms .. ~10 s: a reload is expected well under 300 ms.
            reload_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
            runs: Family::default(),
            open_cves: Mutex::new(None),
        }
    }
}

impl Meters {
    /// A reload that compiled (whether it went live or was rejected) took `d`.
    pub fn reload_took(&self, d: Duration) {
        self.reload_seconds.observe(d.as_secs_f64());
    }

    /// A run ended.
    pub fn run_ended(&self, outcome: Outcome) {
        self.runs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label().into(),
            })
            .inc();
    }

    /// The hook for the advisory scan: the number of open CVEs its last pass found
    /// on the fleet. Until it is called, `/metrics` has no CVE line at all (no
    /// scan is not the same as zero open CVEs).
    pub fn record_scan(&self, open_cves: u64) {
        *self.open_cves.lock().unwrap_or_else(|p| p.into_inner()) = Some(open_cves);
    }

    fn open_cves(&self) -> Option<u64> {
        *self.open_cves.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// The whole `/metrics` body.
pub fn render(service: &Service) -> String {
    let c = service.counts();
    let meters = service.meters();
    let mut reg = Registry::with_prefix("patchbook");

    let reloads = Family::<ResultLabel, Counter>::default();
    for (result, n) in [
        ("live", c.went_live),
        ("rejected", c.rejected),
        ("unchanged", c.unchanged),
    ] {
        reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc_by(n);
    }
    reg.register(
        "reloads",
        "Reloads of the playbooks and libraries, by result",
        reloads,
    );
    reg.register(
        "reload_duration_seconds",
        "Time to read and compile every input, for reloads that compiled",
        meters.reload_seconds.clone(),
    );
    reg.register(
        "generation",
        "Number of the live generation (0: none compiled yet)",
        gauge(c.live_generation),
    );
    // Every outcome appears from the start, so a rate over it is defined at zero.
    for o in [Outcome::Ok, Outcome::Failed, Outcome::Error] {
        let _ = meters.runs.get_or_create(&OutcomeLabel {
            outcome: o.label().into(),
        });
    }
    reg.register(
        "runs",
        "Runs ended since the service started, by outcome",
        meters.runs.clone(),
    );
    reg.register("runs_in_flight", "Runs going on now", gauge(c.in_flight));
    reg.register(
        "runs_started",
        "Runs started since the service started",
        counter(c.runs_started),
    );

    let hosts = Family::<HostLabels, Gauge>::default();
    for r in &c.latest {
        let p = &r.progress;
        for (state, n) in [
            ("targeted", p.targeted),
            ("done", p.done),
            ("in_progress", p.in_progress),
            ("failed", p.failed),
            ("unreachable", p.unreachable),
            ("pending", p.pending),
        ] {
            hosts
                .get_or_create(&HostLabels {
                    playbook: r.playbook.clone(),
                    state: state.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    reg.register(
        "hosts",
        "Hosts of each playbook's latest run (in flight, else the last finished), by state",
        hosts,
    );
    if let Some(n) = meters.open_cves() {
        reg.register(
            "last_scan_open_cves",
            "Open CVEs the last advisory scan found on the fleet",
            gauge(n),
        );
    }

    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::error!(error = %e, "metrics: cannot encode");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::script::Compiler;
    use crate::watch::{Inputs, ScriptLauncher};

    #[test]
    fn the_cve_line_appears_only_once_a_scan_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.rhai"), "1\n").unwrap();
        let inputs = Inputs {
            playbook_dir: dir.path().to_path_buf(),
            compiler: Compiler::new(Default::default(), vec![]),
        };
        let svc = Service::new(
            inputs,
            Arc::new(ScriptLauncher::new(Default::default())),
            crate::rollout::Clock::system(),
        );
        svc.reload(true);
        let before = render(&svc);
        assert!(before.contains("patchbook_generation 1"), "{before}");
        assert!(!before.contains("open_cves"), "{before}");
        svc.meters().record_scan(3);
        let after = render(&svc);
        assert!(after.contains("patchbook_last_scan_open_cves 3"), "{after}");
    }
}
