//! What a report shows, derived from a run's records every time it is rendered.
//!
//! [`RunReport`] is also the JSON format (`--format json`), a stable structure:
//! fields are only ever added, never renamed or removed, and `schema` changes its
//! number when a change could break a reader. Absent values are `null`, never left
//! out. Timestamps are the journal's (UTC, RFC 3339); durations are milliseconds.
//!
//! ```text
//! { "schema": "patchbook.report/1",
//!   "run": { "id", "operator", "started", "ended" (run.close; null while open),
//!            "last_record", "closed", "playbook", "playbook_sha256",
//!            "modules": {path: sha256}, "inventory_sha256", "patchbook_version",
//!            "policy", "window": {spec, zone, start, end, buffer} | null,
//!            "stop": <run_done summary.stop> | null, "alerts": [{ts, kind, text}],
//!            "open_intents" },
//!   "counts": { targeted, done, failed, reverted, rolled_back, rollback_failed,
//!               in_progress, unknown, pending },
//!   "groups": { group: {targeted, done, failed, reverted, rolled_back,
//!                       rollback_failed, pending} },   // as the run recorded it
//!   "waves": [{ index, label, started, hosts: [name] }],
//!   "hosts": [{ name, wave, wave_label,
//!               outcome: "done"|"failed"|"reverted"|"in_progress"|"unknown"|"pending",
//!               rolled_back, rollback_error, reason, started, ended, duration_ms,
//!               packages: [{package, before, target, after}],
//!               steps: [{id, step, started, ended, duration_ms, ok, undoes, detail, error}],
//!               error_output, rollback: {ok, ts, cause, error, undone: [text]} | null,
//!               backups: [{id, archive, sha256, size, paths, missing, ts}],
//!               verifications: [{package, expected, found, ok, ts}],
//!               health: [{command, ok, attempts, error, ts}] }],
//!   "tests": { patch_versions, total, passed, failed,
//!              cases: [{ts, host, name, kind, ok, duration_ms, error, patch_version,
//!                       metrics: {before, after, threshold_pct, unit, higher_is_better}
//!                                | null,
//!                       degradation_pct}] },
//!   "artifacts": [{ts, url, what, ok, detail}],
//!   "controller": {samples, cpu_seconds, peak_rss_kib, max_sockets, max_threads,
//!                  read_bytes, written_bytes, rss_kib: [n]},   // only with samples
//!   "gates": [{ts, after_wave, check, query, bounds, value, passed, detail,
//!              soaked_seconds}],   // only with a gate between waves
//!   "notifications": [{ts, event, message, severity, channel, to, ok, attempts, error}],
//!   "problems": [text] }   // records that could not be read as their kind says
//! ```
//!
//! A host's outcome comes from the rollout events first (`host_done`, `host_failed`,
//! `rolled_back`), then from `host.finish`; a host that started and has no end is
//! `in_progress` while the run is open (a crash or a stop) and `unknown` once it is
//! closed: never `done` without a record saying so.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset};
use serde::Serialize;
use serde_json::Value;

use super::testcase::TestCase;
use crate::journal::entry::{
    ControllerUsage, GateVerdict, HostStatus, MonitorVerdict, NotifyRecord, RolloutEvent,
    StopReason, Summary as RolloutSummary,
};
use crate::journal::state::RunState;
use crate::journal::{Entry, HostEndData, IntentData, OutcomeData, Record, UndoStep};
use crate::primitives::undo::describe;

pub const SCHEMA: &str = "patchbook.report/1";

/// Kind of the records the rollout glue writes, one per [`crate::rollout::RolloutEvent`].
pub const ROLLOUT_EVENT: &str = crate::journal::kind::ROLLOUT_EVENT;
/// Kind of the record naming the run's maintenance window.
pub const WINDOW: &str = crate::journal::kind::WINDOW;

/// Host error output longer than this many characters is cut, marking the cut.
pub const OUTPUT_LIMIT: usize = 2000;

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub schema: &'static str,
    pub run: RunSummary,
    pub counts: Counts,
    pub groups: BTreeMap<String, Value>,
    pub waves: Vec<WaveReport>,
    pub hosts: Vec<HostReport>,
    pub tests: TestSection,
    pub artifacts: Vec<ArtifactCheck>,
    /// Gate evaluations between waves, in order (absent without a gate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateCheck>,
    /// What the controller itself used during the rollouts (absent without samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerReport>,
    pub notifications: Vec<Notification>,
    pub problems: Vec<String>,
}

/// The controller's own use of its machine over the run, from its samples.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ControllerReport {
    pub samples: usize,
    /// CPU time between the first and the last sample.
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
    pub max_sockets: u64,
    pub max_threads: u64,
    /// Bytes read and written (files and sockets) between the first and last sample.
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Resident memory at each sample, for a sparkline.
    pub rss_kib: Vec<u64>,
    /// TCP bytes sent and received between the first and the last sample.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Most TCP connections open at one sample.
    pub max_connections: u64,
}

impl ControllerReport {
    fn from_samples(samples: &[ControllerUsage]) -> Option<Self> {
        let (first, last) = (samples.first()?, samples.last()?);
        Some(ControllerReport {
            samples: samples.len(),
            cpu_seconds: (last.cpu_seconds - first.cpu_seconds).max(0.0),
            peak_rss_kib: samples.iter().map(|u| u.peak_rss_kib).max().unwrap_or(0),
            max_sockets: samples.iter().map(|u| u.sockets).max().unwrap_or(0),
            max_threads: samples.iter().map(|u| u.threads).max().unwrap_or(0),
            read_bytes: last.read_bytes.saturating_sub(first.read_bytes),
            written_bytes: last.written_bytes.saturating_sub(first.written_bytes),
            rss_kib: samples.iter().map(|u| u.rss_kib).collect(),
            bytes_sent: last.bytes_sent.saturating_sub(first.bytes_sent),
            bytes_received: last.bytes_received.saturating_sub(first.bytes_received),
            max_connections: samples.iter().map(|u| u.connections).max().unwrap_or(0),
        })
    }
}

/// One gate evaluation between waves, with when it was made.
#[derive(Debug, Clone, Serialize)]
pub struct GateCheck {
    pub ts: String,
    #[serde(flatten)]
    pub verdict: GateVerdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub operator: Option<String>,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub last_record: Option<String>,
    pub closed: bool,
    pub playbook: Option<String>,
    pub playbook_sha256: Option<String>,
    pub modules: BTreeMap<String, String>,
    pub inventory_sha256: Option<String>,
    pub patchbook_version: Option<String>,
    pub policy: Value,
    pub window: Option<WindowReport>,
    pub stop: Option<StopReason>,
    pub alerts: Vec<Alert>,
    pub open_intents: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    pub spec: Option<String>,
    pub zone: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub buffer: Option<String>,
}

/// A rollout event worth a reader's attention: budget spent, gate stop, window close.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub ts: String,
    pub kind: String,
    pub text: String,
}

/// Table cell lines joined by a line break, or a dash when there are none.
pub fn lines_or_dash(lines: impl IntoIterator<Item = String>) -> String {
    let joined = lines.into_iter().collect::<Vec<_>>().join("<br>");
    if joined.is_empty() {
        "—".into()
    } else {
        joined
    }
}

/// A step's result as (style class, word): ok, FAILED, or OPEN for an intent with
/// no outcome.
pub fn step_result(ok: Option<bool>) -> (&'static str, &'static str) {
    match ok {
        Some(true) => ("ok", "ok"),
        Some(false) => ("bad", "FAILED"),
        None => ("open", "OPEN"),
    }
}

/// `targeted = done + failed + unreachable + reverted + in_progress + unknown + pending`;
/// `rolled_back` and `rollback_failed` overlap with `failed` and `reverted`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub targeted: usize,
    pub done: usize,
    pub failed: usize,
    pub unreachable: usize,
    pub reverted: usize,
    pub rolled_back: usize,
    pub rollback_failed: usize,
    pub in_progress: usize,
    pub unknown: usize,
    pub pending: usize,
}

impl Counts {
    /// Counts one more host with its outcome.
    fn add(&mut self, h: &HostReport) {
        self.targeted += 1;
        match h.outcome {
            HostStatus::Done => self.done += 1,
            HostStatus::Failed => self.failed += 1,
            HostStatus::Reverted => self.reverted += 1,
            HostStatus::InProgress => self.in_progress += 1,
            HostStatus::Unknown => self.unknown += 1,
            HostStatus::Pending => self.pending += 1,
            HostStatus::Unreachable => self.unreachable += 1,
        }
        self.rolled_back += usize::from(h.rolled_back);
        self.rollback_failed += usize::from(h.rollback_error.is_some());
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveReport {
    pub index: usize,
    pub label: String,
    pub started: Option<String>,
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub name: String,
    pub wave: Option<usize>,
    pub wave_label: Option<String>,
    pub outcome: HostStatus,
    pub rolled_back: bool,
    pub rollback_error: Option<String>,
    /// Why it failed, as the rollout recorded it.
    pub reason: Option<String>,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub duration_ms: Option<f64>,
    pub packages: Vec<PackageChange>,
    pub steps: Vec<StepReport>,
    /// The host's error output, cut to [`OUTPUT_LIMIT`] characters.
    pub error_output: Option<String>,
    pub rollback: Option<RollbackReport>,
    pub backups: Vec<BackupReport>,
    pub verifications: Vec<Verification>,
    pub health: Vec<HealthCheck>,
    /// `monitor()`'s samples and verdict (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<HostMonitor>,
}

/// What `monitor()` saw on one host: every sample per metric, in order, and the
/// latest verdict.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HostMonitor {
    /// Metric → `(phase, value)` per sample, baseline first.
    pub series: BTreeMap<String, Vec<(String, f64)>>,
    pub verdict: Option<MonitorVerdict>,
}

impl HostReport {
    /// The colour class a timeline bar and a table row get.
    pub fn class(&self) -> &'static str {
        match self.outcome {
            HostStatus::Done => "done",
            HostStatus::Failed if self.rolled_back => "rolled-back",
            HostStatus::Failed => "failed",
            HostStatus::Reverted => "rolled-back",
            HostStatus::InProgress => "in-progress",
            HostStatus::Unknown => "unknown",
            HostStatus::Pending => "pending",
            HostStatus::Unreachable => "unreachable",
        }
    }

    /// The wave as a reader names it: its label, else its number, else a dash.
    pub fn wave_text(&self) -> String {
        self.wave_label
            .clone()
            .or_else(|| self.wave.map(|w| w.to_string()))
            .unwrap_or_else(|| "—".into())
    }

    /// One line per package, with the version `pick` chooses (before or after),
    /// written by `line` in the report's own markup; a dash when no package changed.
    pub fn package_lines(
        &self,
        pick: fn(&PackageChange) -> Option<&str>,
        line: impl Fn(&str, Option<&str>) -> String,
    ) -> String {
        lines_or_dash(self.packages.iter().map(|p| line(&p.package, pick(p))))
    }

    /// The outcome as a reader says it: "failed, rolled back".
    pub fn status_text(&self) -> String {
        let mut s = self.outcome.as_str().to_string();
        if self.rolled_back && self.outcome != HostStatus::Reverted {
            s.push_str(", rolled back");
        }
        let unreverted = self.rollback.as_ref().is_some_and(|r| !r.manual.is_empty());
        if unreverted {
            s.push_str(", not fully reverted");
        } else if self.rollback_error.is_some() {
            s.push_str(", rollback failed");
        }
        s
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageChange {
    pub package: String,
    /// Installed before the run's first deploy of it (`null`: not installed).
    pub before: Option<String>,
    /// The version the deploy installed.
    pub target: Option<String>,
    /// The last version the journal saw on the host: a verify, a deploy read-back,
    /// or an undo.
    pub after: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub id: u64,
    pub step: String,
    pub started: String,
    pub ended: Option<String>,
    pub duration_ms: Option<f64>,
    /// `null` while the intent is open.
    pub ok: Option<bool>,
    pub undoes: Option<u64>,
    /// An `exec`/`shell` change: patchbook ran it but does not know what it changed.
    pub unmanaged: bool,
    pub detail: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub ok: Option<bool>,
    pub ts: Option<String>,
    pub cause: Option<String>,
    pub error: Option<String>,
    pub undone: Vec<String>,
    /// Undo steps that need a person (an unmanaged change without an undo).
    pub manual: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub archive: String,
    pub sha256: String,
    pub size: Option<u64>,
    pub paths: Vec<String>,
    pub missing: Vec<String>,
    pub ts: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub package: String,
    pub expected: Option<String>,
    pub found: Option<String>,
    pub ok: bool,
    pub ts: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthCheck {
    pub command: String,
    pub ok: bool,
    pub attempts: Option<u64>,
    pub error: Option<String>,
    pub ts: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TestSection {
    pub patch_versions: Vec<String>,
    pub total: usize,
    pub passed: usize,
    pub failed: usize,
    pub cases: Vec<TestCaseReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestCaseReport {
    pub ts: String,
    pub host: Option<String>,
    #[serde(flatten)]
    pub case: TestCase,
    pub degradation_pct: Option<f64>,
}

impl TestCaseReport {
    /// The metric columns as plain text: before, after, degradation, threshold
    /// (all empty for a case without metrics). Each format escapes them itself.
    pub fn metric_cells(&self) -> [String; 4] {
        let Some(m) = &self.case.metrics else {
            return Default::default();
        };
        let unit = if m.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", m.unit)
        };
        [
            format!("{}{unit}", m.before),
            format!("{}{unit}", m.after),
            self.degradation_pct
                .map(|p| format!("{p:+.1}%"))
                .unwrap_or_else(|| "n/a".into()),
            format!("{}%", m.threshold_pct),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCheck {
    pub ts: String,
    pub url: Option<String>,
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub ts: String,
    pub event: Option<String>,
    pub message: Option<String>,
    pub severity: Option<String>,
    pub channel: String,
    pub to: String,
    pub ok: bool,
    pub attempts: Option<u64>,
    pub error: Option<String>,
}

/// Milliseconds from `a` to `b`, both RFC 3339.
pub fn ms_between(a: &str, b: &str) -> Option<f64> {
    let a = parse_ts(a)?;
    let b = parse_ts(b)?;
    (b - a).num_microseconds().map(|us| us as f64 / 1000.0)
}

pub fn parse_ts(ts: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(ts).ok()
}

/// A duration for people: "850 µs", "12.3 ms", "4.20 s", "3m 12s".
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1000.0)
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        // ms >= 60,000 here; `as` saturates at u64::MAX, far past any run.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let s = (ms / 1000.0).round() as u64;
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// What the rollout events say about one host.
#[derive(Default)]
struct HostEvents {
    wave: Option<usize>,
    started: Option<String>,
    ended: Option<String>,
    outcome: Option<HostStatus>,
    reason: Option<String>,
    duration_ms: Option<f64>,
    rolled_back: Option<(String, String)>,
    rollback_error: Option<(String, String, String)>,
}

/// Every host the run's records name, in run order, without duplicates.
#[derive(Default)]
struct HostOrder {
    names: Vec<String>,
    seen: BTreeSet<String>,
}

impl HostOrder {
    fn add(&mut self, name: &str) {
        if self.seen.insert(name.to_string()) {
            self.names.push(name.to_string());
        }
    }
}

/// Derives the report of run `run` from its records, in the order they were written.
pub fn build(run: &str, records: &[Record]) -> RunReport {
    let state = RunState::from_records(run, records);
    let mut problems = Vec::new();
    let mut order = HostOrder::default();
    let mut events: BTreeMap<String, HostEvents> = BTreeMap::new();
    let mut waves: Vec<WaveReport> = Vec::new();
    let mut alerts = Vec::new();
    let mut targets: Option<usize> = None;
    let mut summary: Option<RolloutSummary> = None;
    // Every rollout's targets and their groups, across restarts: what per-group
    // counts are taken over, so they add up to the same totals.
    let mut host_groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut window = None;
    let mut ended = None;
    let mut tests = TestSection::default();
    let mut artifacts = Vec::new();
    let mut gates = Vec::new();
    let mut usage: Vec<ControllerUsage> = Vec::new();
    let mut notifications = Vec::new();
    let mut by_host: BTreeMap<String, Vec<(&Record, Entry)>> = BTreeMap::new();

    for rec in records {
        let entry = match Entry::from_parts(&rec.kind, rec.data.clone()) {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("record {} ({}): {}", rec.seq, rec.kind, e.source));
                continue;
            }
        };
        match &entry {
            Entry::RunClose(_) => ended = Some(rec.ts.clone()),
            Entry::ControllerUsage(u) => usage.push(u.clone()),
            Entry::RolloutPlan(p) => host_groups.extend(p.groups.clone()),
            Entry::Rollout(e) => {
                let ts = &rec.ts;
                match e {
                    RolloutEvent::RunStarted { targets: t, .. } => targets = Some(*t),
                    RolloutEvent::WaveStarted {
                        index,
                        label,
                        hosts,
                    } => {
                        for h in hosts {
                            order.add(h);
                            events.entry(h.clone()).or_default().wave.get_or_insert(*index);
                        }
                        waves.push(WaveReport {
                            index: *index,
                            label: label.clone(),
                            started: Some(ts.clone()),
                            hosts: hosts.clone(),
                        });
                    }
                    RolloutEvent::HostStarted { host, wave } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        // A resumed host starts again: the latest attempt is the one shown.
                        ev.started = Some(ts.clone());
                        ev.ended = None;
                        ev.outcome = None;
                        ev.wave = Some(*wave);
                    }
                    RolloutEvent::HostDone {
                        host,
                        wave,
                        seconds,
                    } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        ev.ended = Some(ts.clone());
                        ev.outcome = Some(HostStatus::Done);
                        ev.duration_ms = Some(seconds * 1000.0);
                        ev.wave = Some(*wave);
                    }
                    RolloutEvent::HostFailed { host, wave, reason } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        ev.ended = Some(ts.clone());
                        ev.outcome = Some(HostStatus::Failed);
                        ev.reason = Some(reason.clone());
                        ev.wave = Some(*wave);
                    }
                    RolloutEvent::HostUnreachable { host, wave, reason } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        ev.ended = Some(ts.clone());
                        ev.outcome = Some(HostStatus::Unreachable);
                        ev.reason = Some(reason.clone());
                        if ev.started.is_some() {
                            ev.wave = Some(*wave);
                        }
                    }
                    RolloutEvent::UnreachableBudgetExhausted { unreachable, allowed } => {
                        alerts.push(Alert {
                            ts: ts.clone(),
                            kind: "unreachable_budget_exhausted".into(),
                            text: format!(
                                "unreachable budget (max_unreachable) exhausted: {unreachable} unreachable, {allowed} allowed; no new host started"
                            ),
                        })
                    }
                    RolloutEvent::RolledBack { host, cause } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        ev.rolled_back = Some((ts.clone(), cause.as_str().to_string()));
                        ev.rollback_error = None;
                    }
                    RolloutEvent::RollbackFailed { host, cause, error } => {
                        order.add(host);
                        let ev = events.entry(host.clone()).or_default();
                        ev.rollback_error =
                            Some((ts.clone(), cause.as_str().to_string(), error.clone()));
                    }
                    RolloutEvent::BudgetExhausted { failures, allowed } => alerts.push(Alert {
                        ts: ts.clone(),
                        kind: "budget_exhausted".into(),
                        text: format!(
                            "failure budget exhausted: {failures} failures, {allowed} allowed; no new host started"
                        ),
                    }),
                    RolloutEvent::GateStopped { after_wave, reason } => alerts.push(Alert {
                        ts: ts.clone(),
                        kind: "gate_stopped".into(),
                        text: format!("gate stopped the run after wave {after_wave}: {reason}"),
                    }),
                    RolloutEvent::WindowClosed {
                        before_wave,
                        time_left_seconds,
                        needed_seconds,
                    } => alerts.push(Alert {
                        ts: ts.clone(),
                        kind: "window_closed".into(),
                        text: format!(
                            "window closing before wave {before_wave}: {time_left_seconds:.0} s left, {needed_seconds:.0} s needed; the rest stays pending"
                        ),
                    }),
                    RolloutEvent::RunDone { summary: s } => summary = Some(s.clone()),
                    RolloutEvent::GateEvaluated(v) => gates.push(GateCheck {
                        ts: ts.clone(),
                        verdict: v.clone(),
                    }),
                    RolloutEvent::Paused { .. } | RolloutEvent::Soaking { .. } => {}
                }
            }
            Entry::Window(w) => {
                window = Some(WindowReport {
                    spec: Some(w.spec.clone()),
                    zone: w.zone.clone(),
                    start: w.start.clone(),
                    end: w.end.clone(),
                    buffer: w.buffer.clone(),
                });
            }
            Entry::Test(case) => tests.cases.push(TestCaseReport {
                ts: rec.ts.clone(),
                host: rec.host.clone(),
                degradation_pct: case.metrics.as_ref().and_then(|m| m.degradation_pct()),
                case: case.clone(),
            }),
            Entry::Artifact(a) => {
                for check in a.checks() {
                    artifacts.push(ArtifactCheck {
                        ts: rec.ts.clone(),
                        url: check.url,
                        what: check.what,
                        ok: check.ok,
                        detail: check.detail,
                    });
                }
            }
            Entry::Notify(n) => {
                let (event, message, severity, deliveries) = match n {
                    NotifyRecord::Notice {
                        event,
                        message,
                        severity,
                        deliveries,
                    } => (event, message, severity, deliveries.as_slice()),
                    NotifyRecord::Delivery(d) => (&None, &None, &None, std::slice::from_ref(d)),
                };
                for d in deliveries {
                    notifications.push(Notification {
                        ts: rec.ts.clone(),
                        event: event.clone(),
                        message: message.clone(),
                        severity: severity.clone(),
                        channel: d.channel.clone(),
                        to: d.to.clone(),
                        ok: d.ok,
                        attempts: Some(u64::from(d.attempts)),
                        error: d.error.clone(),
                    });
                }
            }
            _ => {}
        }
        let per_host = matches!(
            entry,
            Entry::StepIntent(_)
                | Entry::StepOutcome(_)
                | Entry::HostFinish(_)
                | Entry::HostUnreachable(_)
                | Entry::HostRollback(_)
                | Entry::Backup(_)
                | Entry::Verify(_)
                | Entry::Health(_)
                | Entry::MonitorSample(_)
                | Entry::MonitorVerdict(_)
        );
        if let (true, Some(h)) = (per_host, &rec.host) {
            by_host.entry(h.clone()).or_default().push((rec, entry));
        }
    }

    if let Some(s) = &summary {
        for h in &s.hosts {
            order.add(&h.name);
            let ev = events.entry(h.name.clone()).or_default();
            if ev.wave.is_none() {
                ev.wave = Some(h.wave);
            }
        }
    }
    for h in &state.deploy_order {
        order.add(h);
    }
    for h in by_host.keys() {
        order.add(h);
    }

    let labels: BTreeMap<usize, String> =
        waves.iter().map(|w| (w.index, w.label.clone())).collect();
    let no_records = Vec::new();
    let hosts: Vec<HostReport> = order
        .names
        .iter()
        .map(|name| {
            host_report(
                name,
                events.remove(name).unwrap_or_default(),
                by_host.get(name).unwrap_or(&no_records),
                state.closed,
                &labels,
            )
        })
        .collect();

    let mut counts = Counts::default();
    for h in &hosts {
        counts.add(h);
    }
    // Targets the run announced but whose names no record carries never started.
    if let Some(t) = targets.filter(|t| *t > hosts.len()) {
        counts.pending += t - hosts.len();
        counts.targeted = t;
    }

    let mut versions = BTreeSet::new();
    for c in &tests.cases {
        if let Some(v) = &c.case.patch_version {
            versions.insert(v.clone());
        }
    }
    tests.patch_versions = versions.into_iter().collect();
    tests.total = tests.cases.len();
    tests.passed = tests.cases.iter().filter(|c| c.case.ok).count();
    tests.failed = tests.total - tests.passed;

    let header = state.header.clone();
    RunReport {
        schema: SCHEMA,
        run: RunSummary {
            id: run.to_string(),
            operator: state.operator.clone(),
            started: state.started.clone(),
            ended,
            last_record: records.last().map(|r| r.ts.clone()),
            closed: state.closed,
            playbook: header.as_ref().map(|h| h.playbook.display().to_string()),
            playbook_sha256: header.as_ref().map(|h| h.playbook_sha256.clone()),
            modules: header
                .as_ref()
                .map(|h| h.modules.clone())
                .unwrap_or_default(),
            inventory_sha256: header.as_ref().map(|h| h.inventory_sha256.clone()),
            patchbook_version: header.as_ref().map(|h| h.patchbook_version.clone()),
            policy: header.map(|h| h.policy).unwrap_or(Value::Null),
            window,
            stop: summary.as_ref().map(|s| s.stop.clone()),
            alerts,
            open_intents: state.open_intents().len(),
        },
        counts,
        groups: if host_groups.is_empty() {
            // A journal from before rollout plans named their targets' groups.
            summary
                .as_ref()
                .map(|s| {
                    s.per_group
                        .iter()
                        .map(|(k, v)| {
                            let c = Counts {
                                targeted: v.targeted,
                                done: v.done,
                                failed: v.failed,
                                reverted: v.reverted,
                                rolled_back: v.rolled_back,
                                rollback_failed: v.rollback_failed,
                                in_progress: 0,
                                unknown: 0,
                                pending: v.pending,
                                unreachable: v.unreachable,
                            };
                            (k.clone(), to_value(&c))
                        })
                        .collect()
                })
                .unwrap_or_default()
        } else {
            group_counts(&host_groups, &hosts)
        },
        waves,
        hosts,
        tests,
        artifacts,
        gates,
        controller: ControllerReport::from_samples(&usage),
        notifications,
        problems,
    }
}

/// Counts per inventory group over the same per-host outcomes as the totals; a
/// planned target no record names never started (pending).
fn group_counts(
    host_groups: &BTreeMap<String, Vec<String>>,
    hosts: &[HostReport],
) -> BTreeMap<String, Value> {
    let mut per: BTreeMap<String, Counts> = BTreeMap::new();
    for (name, groups) in host_groups {
        let host = hosts.iter().find(|h| &h.name == name);
        for g in groups {
            let c = per.entry(g.clone()).or_default();
            match host {
                Some(h) => c.add(h),
                None => {
                    c.targeted += 1;
                    c.pending += 1;
                }
            }
        }
    }
    per.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()
}

/// A record type as the report's JSON shows it; record types serialise infallibly.
fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn host_report(
    name: &str,
    ev: HostEvents,
    records: &[(&Record, Entry)],
    run_closed: bool,
    labels: &BTreeMap<usize, String>,
) -> HostReport {
    let mut steps: Vec<StepReport> = Vec::new();
    let mut intents: BTreeMap<u64, (IntentData, usize)> = BTreeMap::new();
    let mut packages: BTreeMap<String, PackageChange> = BTreeMap::new();
    let mut errors = ErrorOutput::default();
    let mut backups = Vec::new();
    let mut verifications = Vec::new();
    let mut health = Vec::new();
    let mut monitor: Option<HostMonitor> = None;
    let mut finish: Option<(String, HostEndData)> = None;
    let mut rollback_rec: Option<(String, HostEndData)> = None;
    let mut undone = Vec::new();
    let mut unreachable: Option<String> = None;

    for (rec, entry) in records {
        match entry {
            Entry::HostUnreachable(u) => unreachable = Some(u.reason.clone()),
            Entry::StepIntent(intent) => {
                if let Some(d) = intent.deploy_input() {
                    let p = packages.entry(d.package.clone()).or_insert(PackageChange {
                        package: d.package.clone(),
                        before: d.from.clone(),
                        target: None,
                        after: None,
                    });
                    p.target = Some(d.to);
                }
                steps.push(StepReport {
                    id: rec.seq,
                    step: intent.step.clone(),
                    started: rec.ts.clone(),
                    ended: None,
                    duration_ms: None,
                    ok: None,
                    undoes: intent.undoes.map(|s| s.0),
                    unmanaged: intent.exec_input().is_some(),
                    detail: step_detail(intent),
                    error: None,
                });
                intents.insert(rec.seq, (intent.clone(), steps.len() - 1));
            }
            Entry::StepOutcome(out) => {
                let Some((intent, i)) = intents.get(&out.step_id.0) else {
                    continue;
                };
                let error = output_error(out);
                if let Some(step) = steps.get_mut(*i) {
                    step.ended = Some(rec.ts.clone());
                    step.duration_ms = ms_between(&step.started, &rec.ts);
                    step.ok = Some(out.ok);
                    step.error = error.clone();
                }
                if !out.ok {
                    if let Some(e) = &error {
                        errors.add(&intent.step, e);
                    }
                }
                if intent.undoes.is_some() {
                    let undo = intent.applied_undo();
                    if out.ok {
                        if let Some(u) = &undo {
                            undone.push(describe(u));
                        }
                    }
                    match (out.ok, undo) {
                        (
                            true,
                            Some(UndoStep::Reinstall {
                                package, version, ..
                            }),
                        ) => {
                            if let Some(p) = packages.get_mut(&package) {
                                p.after = Some(version);
                            }
                        }
                        (true, Some(UndoStep::Remove { package })) => {
                            if let Some(p) = packages.get_mut(&package) {
                                p.after = None;
                            }
                        }
                        _ => {}
                    }
                } else if intent.step == "deploy" {
                    let output = out.deploy_output();
                    let pkg = output
                        .as_ref()
                        .map(|o| o.package.clone())
                        .or_else(|| intent.deploy_input().map(|d| d.package));
                    if let Some(p) = pkg.and_then(|k| packages.get_mut(&k)) {
                        p.after = output.and_then(|o| o.after);
                    }
                }
            }
            Entry::HostFinish(end) => {
                if !end.ok {
                    if let Some(t) = detail_text(end) {
                        errors.add("", &t);
                    }
                }
                finish = Some((rec.ts.clone(), end.clone()));
                unreachable = None;
            }
            Entry::HostRollback(end) => rollback_rec = Some((rec.ts.clone(), end.clone())),
            Entry::Backup(b) => backups.push(BackupReport {
                id: b.id.clone(),
                archive: b.archive.display().to_string(),
                sha256: b.sha256.clone(),
                size: Some(b.size),
                paths: b.paths.clone(),
                missing: b.missing.clone(),
                ts: rec.ts.clone(),
            }),
            Entry::Verify(r) => {
                let v = Verification {
                    package: r.package.clone(),
                    expected: Some(r.expected.clone()),
                    found: Some(r.found.clone()),
                    ok: r.ok,
                    ts: rec.ts.clone(),
                };
                if let Some(p) = packages.get_mut(&v.package) {
                    p.after = v.found.clone();
                } else {
                    packages.insert(
                        v.package.clone(),
                        // Verified with no deploy before it: what it found is
                        // what the host had, not a fresh install.
                        PackageChange {
                            package: v.package.clone(),
                            before: v.found.clone(),
                            target: v.expected.clone(),
                            after: v.found.clone(),
                        },
                    );
                }
                if !v.ok {
                    errors.add(
                        "verify",
                        &format!("{}: expected {}, found {}", r.package, r.expected, r.found),
                    );
                }
                verifications.push(v);
            }
            Entry::MonitorSample(m) => {
                let series = &mut monitor.get_or_insert_with(HostMonitor::default).series;
                for (k, v) in &m.values {
                    series
                        .entry(k.clone())
                        .or_default()
                        .push((m.phase.clone(), *v));
                }
            }
            Entry::MonitorVerdict(v) => {
                if !v.ok {
                    errors.add("monitor", &v.regressions.join("; "));
                }
                monitor.get_or_insert_with(HostMonitor::default).verdict = Some(v.clone());
            }
            Entry::Health(r) => {
                let h = HealthCheck {
                    command: r.command_line(),
                    ok: r.ok,
                    attempts: Some(u64::from(r.attempts)),
                    error: r.error.clone(),
                    ts: rec.ts.clone(),
                };
                if let (false, Some(e)) = (h.ok, &h.error) {
                    errors.add(&format!("health `{}`", h.command), e);
                }
                health.push(h);
            }
            _ => {}
        }
    }

    let has_activity = ev.started.is_some() || !steps.is_empty() || finish.is_some();
    let mut outcome = match (ev.outcome, &finish) {
        (Some(o), _) => o,
        // A probe could not connect to it and no rollout said more.
        (None, None) if unreachable.is_some() => HostStatus::Unreachable,
        (None, Some((_, end))) if end.ok => HostStatus::Done,
        (None, Some(_)) => HostStatus::Failed,
        (None, None) if !has_activity => HostStatus::Pending,
        (None, None) if run_closed => HostStatus::Unknown,
        (None, None) => HostStatus::InProgress,
    };
    let rolled_back = ev.rolled_back.is_some()
        || rollback_rec.as_ref().is_some_and(|(_, end)| end.ok) && ev.rollback_error.is_none();
    let rollback_error = ev
        .rollback_error
        .as_ref()
        .map(|(_, _, e)| e.clone())
        .or_else(|| {
            rollback_rec
                .as_ref()
                .filter(|(_, end)| !end.ok)
                .map(|(_, end)| detail_text(end).unwrap_or_else(|| "rollback failed".into()))
        });
    if outcome == HostStatus::Done && rolled_back {
        outcome = HostStatus::Reverted;
    }
    if let Some(reason) = &ev.reason {
        errors.add("", reason);
    }
    let error_output = errors.text();

    let rollback = if rolled_back || rollback_error.is_some() || !undone.is_empty() {
        Some(RollbackReport {
            ok: if rollback_error.is_some() {
                Some(false)
            } else if rolled_back {
                Some(true)
            } else {
                None
            },
            ts: ev
                .rollback_error
                .as_ref()
                .map(|(ts, _, _)| ts.clone())
                .or_else(|| ev.rolled_back.as_ref().map(|(ts, _)| ts.clone()))
                .or_else(|| rollback_rec.as_ref().map(|(ts, _)| ts.clone())),
            cause: ev
                .rollback_error
                .as_ref()
                .map(|(_, c, _)| c.clone())
                .or_else(|| ev.rolled_back.as_ref().map(|(_, c)| c.clone()))
                .filter(|c| !c.is_empty()),
            error: rollback_error.clone(),
            undone,
            manual: rollback_rec
                .as_ref()
                .map(|(_, end)| end.detail.manual.clone())
                .unwrap_or_default(),
        })
    } else {
        None
    };

    let started = ev
        .started
        .clone()
        .or_else(|| steps.first().map(|s| s.started.clone()));
    let ended = ev.ended.clone().or_else(|| match outcome {
        HostStatus::Done | HostStatus::Failed | HostStatus::Reverted => finish
            .as_ref()
            .map(|(ts, _)| ts.clone())
            .or_else(|| steps.iter().rev().find_map(|s| s.ended.clone())),
        _ => None,
    });
    let duration_ms = match (&started, &ended) {
        (Some(a), Some(b)) => ms_between(a, b),
        _ => None,
    }
    .or(ev.duration_ms);

    HostReport {
        name: name.to_string(),
        wave: ev.wave,
        wave_label: ev.wave.and_then(|w| labels.get(&w).cloned()),
        outcome,
        rolled_back,
        rollback_error,
        reason: ev.reason,
        started,
        ended,
        duration_ms,
        packages: packages.into_values().collect(),
        steps,
        error_output,
        rollback,
        monitor,
        backups,
        verifications,
        health,
    }
}

/// A host's error output gathered from several records, each message once: the
/// rollout's reason and `host.finish` usually repeat the failed step's error.
#[derive(Default)]
struct ErrorOutput {
    /// (where it came from, message)
    entries: Vec<(String, String)>,
}

impl ErrorOutput {
    fn add(&mut self, source: &str, message: &str) {
        let message = message.trim();
        if message.is_empty() {
            return;
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|(_, m)| message.contains(m.as_str()))
        {
            // The longer message says more: it replaces the one it contains.
            self.entries[i] = (source.to_string(), message.to_string());
            self.entries
                .retain(|(_, m)| m == message || !message.contains(m.as_str()));
            return;
        }
        if self.entries.iter().any(|(_, m)| m.contains(message)) {
            return;
        }
        self.entries.push((source.to_string(), message.to_string()));
    }

    fn text(&self) -> Option<String> {
        if self.entries.is_empty() {
            return None;
        }
        let all: Vec<String> = self
            .entries
            .iter()
            .map(|(source, m)| {
                if source.is_empty() {
                    m.clone()
                } else {
                    format!("{source}: {m}")
                }
            })
            .collect();
        Some(crate::primitives::cut(&all.join("\n"), OUTPUT_LIMIT))
    }
}

/// A failed step's error: `error`, else the host's own output.
fn output_error(out: &OutcomeData) -> Option<String> {
    let o = out.output_view();
    if let Some(e) = o.error {
        return Some(e);
    }
    let both = format!(
        "{}{}",
        o.stderr.unwrap_or_default(),
        o.stdout.unwrap_or_default()
    );
    (!both.trim().is_empty()).then(|| both.trim().to_string())
}

/// What a host end says went wrong: its `error` or `reason`, else the whole detail.
fn detail_text(end: &HostEndData) -> Option<String> {
    let d = &end.detail;
    d.error
        .clone()
        .or_else(|| d.reason.clone())
        .or_else(|| d.detail.clone())
        .filter(|s| !s.is_empty())
}

/// One line saying what a step set out to do.
fn step_detail(intent: &IntentData) -> String {
    if let Some(u) = intent.applied_undo() {
        return describe(&u);
    }
    if let Some(e) = intent.exec_input() {
        let what = if e.raw_shell {
            format!(
                "raw shell `{}`",
                e.argv.last().map(String::as_str).unwrap_or("")
            )
        } else {
            format!("`{}`", e.argv.join(" "))
        };
        return format!("unmanaged change: {what}; undo: {}", describe(&e.undo));
    }
    if let Some(d) = intent.deploy_input() {
        return format!(
            "{} {} → {}",
            d.package,
            d.from.as_deref().unwrap_or("(not installed)"),
            d.to
        );
    }
    // Any other step: its input's plain fields, as given (the planned undo aside).
    match &intent.input {
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .filter(|(k, _)| k.as_str() != "undo")
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some(format!("{k}={s}")),
                    Value::Number(n) => Some(format!("{k}={n}")),
                    Value::Bool(b) => Some(format!("{k}={b}")),
                    Value::Array(a) if a.iter().all(Value::is_string) => Some(format!(
                        "{k}={}",
                        a.iter().filter_map(text).collect::<Vec<_>>().join(",")
                    )),
                    _ => None,
                })
                .collect();
            crate::primitives::cut(&parts.join(" "), 160)
        }
        Value::Null => String::new(),
        other => crate::primitives::cut(&other.to_string(), 160),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use serde_json::json;

    fn rollout(j: &Journal, e: Value) {
        j.append(None, ROLLOUT_EVENT, e).unwrap();
    }

    #[test]
    fn without_header_or_events_outcomes_come_from_host_records() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "bare", "ops").unwrap();
        for (host, ok) in [("a", true), ("b", false)] {
            let id = j.intent(host, "exec", json!({"argv": ["true"]})).unwrap();
            j.outcome(host, id, ok, json!({"stderr": "boom"}), None)
                .unwrap();
            j.host_finished(host, ok, Default::default()).unwrap();
        }
        let id = j.intent("c", "exec", json!({})).unwrap();
        j.outcome("c", id, true, json!({}), None).unwrap();
        let records = j.records().unwrap();
        j.close().unwrap();
        let mut closed = records.clone();
        closed.push(Record {
            kind: crate::journal::kind::RUN_CLOSE.into(),
            seq: records.len() as u64 + 1,
            ..records[0].clone()
        });

        let open = build("bare", &records);
        let outcomes: Vec<HostStatus> = open.hosts.iter().map(|h| h.outcome).collect();
        assert_eq!(
            outcomes,
            [HostStatus::Done, HostStatus::Failed, HostStatus::InProgress]
        );
        assert_eq!(open.hosts[1].error_output.as_deref(), Some("exec: boom"));
        assert_eq!(open.hosts[0].steps[0].detail, "argv=true");
        assert!(open.run.playbook.is_none() && open.run.window.is_none());
        // Once the run is closed, a host with no end is unknown, still not done.
        let closed = build("bare", &closed);
        assert_eq!(closed.hosts[2].outcome, HostStatus::Unknown);
        assert_eq!(closed.counts.unknown, 1);
        assert_eq!(closed.counts.targeted, 3);
    }

    #[test]
    fn a_host_undone_after_a_stop_is_reverted_and_alerts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "stop", "ops").unwrap();
        rollout(
            &j,
            json!({"kind": "wave_started", "index": 0, "label": "pilot", "hosts": ["a", "b", "c"]}),
        );
        for h in ["a", "b"] {
            rollout(&j, json!({"kind": "host_started", "host": h, "wave": 0}));
        }
        rollout(
            &j,
            json!({"kind": "host_done", "host": "a", "wave": 0, "seconds": 1.5}),
        );
        rollout(
            &j,
            json!({"kind": "host_failed", "host": "b", "wave": 0, "reason": "health check failed"}),
        );
        rollout(
            &j,
            json!({"kind": "budget_exhausted", "failures": 1, "allowed": 0}),
        );
        rollout(
            &j,
            json!({"kind": "rolled_back", "host": "b", "cause": "host_failed"}),
        );
        rollout(
            &j,
            json!({"kind": "rolled_back", "host": "a", "cause": "run_stopped"}),
        );
        let r = build("stop", &j.records().unwrap());
        let by_name = |n: &str| r.hosts.iter().find(|h| h.name == n).unwrap();
        assert_eq!(by_name("a").outcome, HostStatus::Reverted);
        assert_eq!(by_name("a").class(), "rolled-back");
        assert_eq!(by_name("b").outcome, HostStatus::Failed);
        assert_eq!(by_name("b").status_text(), "failed, rolled back");
        assert_eq!(
            by_name("b").error_output.as_deref(),
            Some("health check failed")
        );
        assert_eq!(by_name("c").outcome, HostStatus::Pending);
        assert_eq!(
            (
                r.counts.reverted,
                r.counts.failed,
                r.counts.rolled_back,
                r.counts.pending
            ),
            (1, 1, 2, 1)
        );
        assert_eq!(r.run.alerts.len(), 1);
        assert!(
            r.run.alerts[0].text.contains("1 failures, 0 allowed"),
            "{:?}",
            r.run.alerts
        );
        assert_eq!(by_name("a").wave_label.as_deref(), Some("pilot"));
    }

    #[test]
    fn durations_read_for_people() {
        assert_eq!(fmt_ms(0.25), "250 µs");
        assert_eq!(fmt_ms(12.34), "12.3 ms");
        assert_eq!(fmt_ms(4200.0), "4.20 s");
        assert_eq!(fmt_ms(192_000.0), "3m 12s");
        assert_eq!(
            ms_between("2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:01.500250Z"),
            Some(1500.25)
        );
    }
}
