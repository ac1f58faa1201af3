//! The scheduled advisory scan of `patchbook watch`: `[advisories] scan` in
//! `patchbook.toml` says when (the syntax of a playbook's `schedule()`), and a
//! thread of its own runs `run::scan` at each due time on the service's clock,
//! with `notify_min_severity` so owners hear of CVEs their hosts newly have open.
//!
//! It owns the schedule of the scan and reporting it to the service's meters and
//! log; the scan itself, its journal and its mails are `run::scan`'s. Scans never
//! overlap (one thread runs them one after another), and a slot missed while one
//! ran collapses into the next, as playbook schedules do. It must not start
//! playbook runs or touch the service's generations.

use std::sync::Arc;
use std::time::Duration;

use super::schedule::Schedule;
use super::service::Service;
use crate::advisory::Severity;
use crate::config::AdvisoriesConfig;
use crate::run::scan::{notify_min_severity, scan, ScanRequest};
use crate::runtime::Runtime;

/// How often the thread looks at the clock.
const TICK: Duration = Duration::from_millis(50);

/// The scan `[advisories]` asks for.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    pub schedule: Schedule,
    pub selector: String,
    pub min_severity: Severity,
}

/// `[advisories] scan` that cannot be used, said so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ScanPlanError {
    #[error("patchbook.toml [advisories] scan: {0}")]
    Schedule(String),
    #[error("patchbook.toml [advisories]: {0}")]
    Severity(String),
    #[error(
        "patchbook.toml [advisories] scan is set but no feeds are listed; add \
         feeds = [\"URL\"] under [advisories]"
    )]
    NoFeeds,
}

impl ScanPlan {
    /// The scan the config asks for; `None` without `[advisories] scan`.
    pub fn from_config(cfg: &AdvisoriesConfig) -> Result<Option<ScanPlan>, ScanPlanError> {
        let Some(spec) = cfg.scan.as_deref() else {
            return Ok(None);
        };
        if cfg.feeds.is_empty() {
            return Err(ScanPlanError::NoFeeds);
        }
        let schedule = parse_schedule(spec).map_err(ScanPlanError::Schedule)?;
        let min_severity = notify_min_severity(cfg.notify_min_severity.as_deref())
            .map_err(|e| ScanPlanError::Severity(e.to_string()))?;
        Ok(Some(ScanPlan {
            schedule,
            selector: cfg.scan_hosts.clone().unwrap_or_else(|| "all".into()),
            min_severity,
        }))
    }
}

/// `"Sat 02:00 UTC"` as `schedule("Sat 02:00 UTC")`, and a cron expression with its
/// zone as the sixth word, `"0 2 * * 6 UTC"`, as `schedule("0 2 * * 6", "UTC")`:
/// a config value is one string.
pub fn parse_schedule(spec: &str) -> Result<Schedule, String> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    if let [cron @ .., zone] = words.as_slice() {
        if cron.len() == 5 {
            return Schedule::parse(&cron.join(" "), Some(zone));
        }
    }
    Schedule::parse(spec, None)
}

/// Starts the scan thread; it ends when the service stops and
/// [`Service::shutdown`] waits for it like for a run.
pub fn start(service: &Arc<Service>, runtime: Arc<Runtime>, plan: ScanPlan) -> std::io::Result<()> {
    let svc = service.clone();
    let handle = std::thread::Builder::new()
        .name("advisory-scan".into())
        .spawn(move || run(&svc, &runtime, &plan))?;
    service.adopt(handle);
    Ok(())
}

fn run(service: &Service, rt: &Runtime, plan: &ScanPlan) {
    let mut next = plan.schedule.next_after(service.clock().now());
    tracing::info!(
        schedule = %plan.schedule,
        next = ?next,
        "advisory scan scheduled ({})",
        plan.schedule
    );
    while !service.stopping() {
        let now = service.clock().now();
        let Some(due) = next.filter(|t| *t <= now) else {
            std::thread::sleep(TICK);
            continue;
        };
        let req = ScanRequest {
            selector: plan.selector.clone(),
            feeds: Vec::new(),
            notify_min: Some(plan.min_severity),
        };
        match scan(rt, &req) {
            Ok(o) => {
                let open = o
                    .exposure
                    .hosts
                    .iter()
                    .map(|h| u64::try_from(h.fixable + h.no_fix).unwrap_or(u64::MAX))
                    .sum();
                service.meters().record_scan(open);
                let newly: usize = o.newly_open.values().map(Vec::len).sum();
                let failed: Vec<&str> = o
                    .deliveries
                    .iter()
                    .filter(|d| !d.ok)
                    .map(|d| d.to.as_str())
                    .collect();
                tracing::info!(
                    run = %o.run_id,
                    due = %due,
                    open,
                    newly_open = newly,
                    mails = o.deliveries.len(),
                    "advisory scan {} done: {open} open CVEs, {newly} newly open",
                    o.run_id
                );
                for (host, reason) in &o.unreachable {
                    tracing::warn!(run = %o.run_id, host = %host, "advisory scan could not read {host}: {reason}");
                }
                if !failed.is_empty() {
                    tracing::warn!(run = %o.run_id, "advisory scan mail not delivered to {}", failed.join(", "));
                }
            }
            Err(e) => tracing::error!("advisory scan failed: {e}"),
        }
        // Slots missed while the scan ran collapse into the next one.
        next = plan.schedule.next_after(service.clock().now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schedule_forms_read_from_one_string() {
        let weekly = parse_schedule("Sat 02:00 UTC").unwrap();
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            weekly.next_after(t).unwrap().to_rfc3339(),
            "2026-11-28T02:00:00+00:00"
        );
        let cron = parse_schedule("*/5 * * * * UTC").unwrap();
        assert_eq!(
            cron.next_after(t).unwrap().to_rfc3339(),
            "2026-11-27T00:05:00+00:00"
        );
        assert!(parse_schedule("0 2 * * 6").is_err());
    }

    #[test]
    fn the_config_says_when_whom_and_how_severe() {
        let mut cfg = AdvisoriesConfig {
            scan: Some("Sat 02:00 UTC".into()),
            ..Default::default()
        };
        assert!(matches!(
            ScanPlan::from_config(&cfg),
            Err(ScanPlanError::NoFeeds)
        ));
        cfg.feeds = vec!["/srv/f.json".into()];
        let p = ScanPlan::from_config(&cfg).unwrap().unwrap();
        assert_eq!(
            (p.selector.as_str(), p.min_severity),
            ("all", Severity::High)
        );
        cfg.notify_min_severity = Some("loud".into());
        assert!(ScanPlan::from_config(&cfg).is_err());
        cfg.scan = None;
        assert!(ScanPlan::from_config(&cfg).unwrap().is_none());
    }
}
