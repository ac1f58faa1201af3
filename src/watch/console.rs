//! The deployment console: a live model of the runs `watch` started, built from
//! their journal records as they are written (a [`JournalTap`](crate::journal::JournalTap) on each run's
//! journal) and served by the status page as JSON and over its event stream.
//!
//! It holds, per run: the counts (targeted, patched, in progress, failed,
//! unreachable, pending), the waves with their gate verdicts and their soak or
//! pause timers, each host's state and last step, and the controller's latest
//! `controller.usage` sample. It only reads records: it must not write to a
//! journal, act on hosts or decide anything about the run. The journal stays the
//! record; this is a view that a restart of the service forgets.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::journal::entry::{ControllerUsage, RolloutEvent};
use crate::journal::{Entry, Record};

/// Runs the console keeps, newest first; older ones are in their journals.
pub const KEPT_RUNS: usize = 4;

/// The counts at the top of the console.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub targeted: usize,
    pub patched: usize,
    pub in_progress: usize,
    pub failed: usize,
    pub unreachable: usize,
    pub rolled_back: usize,
    pub pending: usize,
}

/// Where a host is in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Pending,
    InProgress,
    Patched,
    Failed,
    Unreachable,
    /// Patched, then rolled back (a failed gate's `rollback_wave`).
    RolledBack,
}

/// One host's line on the console.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostLine {
    pub name: String,
    /// The wave index (0 is the pilot), once known.
    pub wave: Option<usize>,
    pub state: HostState,
    /// The last step journaled on the host (`deploy`, `verify`, …), or the kind
    /// of its last record when that was no step.
    pub last_step: String,
    /// The host was rolled back (after a failure, or with its wave).
    pub rolled_back: bool,
}

/// Where a wave is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    Pending,
    Running,
    Done,
}

/// A wait between waves: a gate's soak, or the policy's pause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timer {
    /// `soak` or `pause`.
    pub kind: String,
    pub seconds: f64,
    /// Wall time the wait ends (the record's time plus `seconds`).
    pub until: DateTime<Utc>,
}

/// A gate's verdict after a wave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateLine {
    /// `prometheus` or `closure`.
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

/// One wave's line on the console.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaveLine {
    pub index: usize,
    pub label: String,
    pub hosts: Vec<String>,
    pub state: WaveState,
    /// The gate asked after this wave, once it answered.
    pub gate: Option<GateLine>,
    /// The soak or pause after this wave, once it began.
    pub timers: Vec<Timer>,
}

/// One run on the console.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConsole {
    pub run_id: String,
    pub playbook: String,
    pub tally: Tally,
    pub waves: Vec<WaveLine>,
    pub hosts: Vec<HostLine>,
    /// The controller's latest sample of itself.
    pub controller: Option<ControllerUsage>,
    /// `controller.usage` samples seen.
    pub controller_samples: usize,
    /// Records seen: the journal's last seq this view includes.
    pub seq: u64,
    /// Every rollout of the run reported `run_done`.
    pub finished: bool,
    /// Why the run stopped early (a gate, a budget), when it did.
    pub stopped: Option<String>,
    #[serde(skip)]
    by_host: BTreeMap<String, usize>,
    #[serde(skip)]
    rollouts_open: usize,
    /// Targets the rollouts announced, plus hosts a probe left out.
    #[serde(skip)]
    announced: usize,
}

impl RunConsole {
    pub fn new(run_id: &str, playbook: &str) -> Self {
        RunConsole {
            run_id: run_id.to_string(),
            playbook: playbook.to_string(),
            tally: Tally::default(),
            waves: Vec::new(),
            hosts: Vec::new(),
            controller: None,
            controller_samples: 0,
            seq: 0,
            finished: false,
            stopped: None,
            by_host: BTreeMap::new(),
            rollouts_open: 0,
            announced: 0,
        }
    }

    fn host(&mut self, name: &str) -> &mut HostLine {
        let i = match self.by_host.get(name) {
            Some(i) => *i,
            None => {
                self.hosts.push(HostLine {
                    name: name.to_string(),
                    wave: None,
                    state: HostState::Pending,
                    last_step: String::new(),
                    rolled_back: false,
                });
                let i = self.hosts.len() - 1;
                self.by_host.insert(name.to_string(), i);
                i
            }
        };
        &mut self.hosts[i]
    }

    fn wave(&mut self, index: usize) -> &mut WaveLine {
        let at = match self.waves.iter().position(|w| w.index >= index) {
            Some(p) if self.waves[p].index == index => p,
            found => {
                let p = found.unwrap_or(self.waves.len());
                let label = if index == 0 {
                    "pilot".to_string()
                } else {
                    format!("wave {index}")
                };
                self.waves.insert(
                    p,
                    WaveLine {
                        index,
                        label,
                        hosts: Vec::new(),
                        state: WaveState::Pending,
                        gate: None,
                        timers: Vec::new(),
                    },
                );
                p
            }
        };
        &mut self.waves[at]
    }

    /// The waves and hosts of a `rollout.plan`'s text (`wave 2 (3 hosts):`, then
    /// one `  name [criticality]` line per host), all pending until events come.
    fn plan(&mut self, text: &str) {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("  ") {
                let Some(w) = current else { continue };
                let Some(name) = rest.split_whitespace().next() else {
                    continue;
                };
                let name = name.to_string();
                if !self.wave(w).hosts.contains(&name) {
                    self.wave(w).hosts.push(name.clone());
                }
                self.host(&name).wave = Some(w);
                continue;
            }
            current = None;
            let Some((label, _)) = line.split_once(" (") else {
                continue;
            };
            if !line.ends_with("hosts):") && !line.ends_with("host):") {
                continue;
            }
            let index = if label == "pilot" {
                Some(0)
            } else {
                label
                    .strip_prefix("wave ")
                    .and_then(|n| n.parse::<usize>().ok())
            };
            if let Some(i) = index {
                self.wave(i).label = label.to_string();
                current = Some(i);
            }
        }
    }

    fn set_state(&mut self, host: &str, wave: Option<usize>, state: HostState) {
        let h = self.host(host);
        h.state = state;
        if wave.is_some() {
            h.wave = wave;
        }
    }

    fn event(&mut self, at: DateTime<Utc>, e: &RolloutEvent) {
        match e {
            RolloutEvent::RunStarted { targets, .. } => {
                self.announced += targets;
                self.rollouts_open += 1;
                self.finished = false;
            }
            RolloutEvent::WaveStarted {
                index,
                label,
                hosts,
            } => {
                for w in self.waves.iter_mut().filter(|w| w.index < *index) {
                    if w.state == WaveState::Running {
                        w.state = WaveState::Done;
                    }
                }
                let w = self.wave(*index);
                w.label.clone_from(label);
                w.state = WaveState::Running;
                for h in hosts {
                    if !w.hosts.contains(h) {
                        w.hosts.push(h.clone());
                    }
                }
                for h in hosts {
                    self.host(h).wave = Some(*index);
                }
            }
            RolloutEvent::HostStarted { host, wave } => {
                self.set_state(host, Some(*wave), HostState::InProgress);
            }
            RolloutEvent::HostDone { host, wave, .. } => {
                self.set_state(host, Some(*wave), HostState::Patched);
            }
            RolloutEvent::HostFailed { host, wave, .. } => {
                self.set_state(host, Some(*wave), HostState::Failed);
            }
            RolloutEvent::HostUnreachable { host, .. } => {
                // Before the first wave it is a host a probe left out: a target
                // the rollout's own count does not include.
                if self.waves.iter().all(|w| w.state == WaveState::Pending)
                    && !self.by_host.contains_key(host.as_str())
                {
                    self.announced += 1;
                }
                self.set_state(host, None, HostState::Unreachable);
            }
            RolloutEvent::RolledBack { host, .. } => {
                let h = self.host(host);
                h.rolled_back = true;
                if h.state == HostState::Patched {
                    h.state = HostState::RolledBack;
                }
            }
            RolloutEvent::Paused { seconds } => self.timer(None, "pause", *seconds, at),
            RolloutEvent::Soaking {
                after_wave,
                seconds,
            } => self.timer(Some(*after_wave), "soak", *seconds, at),
            RolloutEvent::GateEvaluated(v) => {
                let w = self.wave(v.after_wave);
                w.gate = Some(GateLine {
                    check: v.check.clone(),
                    passed: v.passed,
                    detail: v.detail.clone(),
                });
            }
            RolloutEvent::GateStopped { reason, .. } => {
                self.stopped = Some(format!("gate: {reason}"));
            }
            RolloutEvent::BudgetExhausted { failures, allowed } => {
                self.stopped = Some(format!(
                    "failure budget exhausted: {failures} failures, {allowed} allowed"
                ));
            }
            RolloutEvent::UnreachableBudgetExhausted {
                unreachable,
                allowed,
            } => {
                self.stopped = Some(format!(
                    "unreachable budget exhausted: {unreachable} unreachable, {allowed} allowed"
                ));
            }
            RolloutEvent::WindowClosed { before_wave, .. } => {
                self.stopped = Some(format!("window closing before wave {before_wave}"));
            }
            RolloutEvent::RunDone { .. } => {
                for w in &mut self.waves {
                    if w.state == WaveState::Running {
                        w.state = WaveState::Done;
                    }
                }
                self.rollouts_open = self.rollouts_open.saturating_sub(1);
                self.finished = self.rollouts_open == 0;
            }
            RolloutEvent::RollbackFailed { host, .. } => {
                self.host(host).rolled_back = false;
            }
        }
    }

    /// A wait after a wave: `after` names it (a soak), else the wave that ran last.
    fn timer(&mut self, after: Option<usize>, kind: &str, seconds: f64, at: DateTime<Utc>) {
        let index = after.or_else(|| {
            self.waves
                .iter()
                .rev()
                .find(|w| w.state != WaveState::Pending)
                .map(|w| w.index)
        });
        let Some(index) = index else { return };
        let until = at
            + chrono::Duration::milliseconds(
                // Whole milliseconds of a wait the policy bounds; a NaN or a
                // negative wait is none.
                #[allow(clippy::cast_possible_truncation)]
                {
                    (seconds.max(0.0) * 1000.0).min(1e15) as i64
                },
            );
        let w = self.wave(index);
        if w.state == WaveState::Running {
            w.state = WaveState::Done;
        }
        w.timers.push(Timer {
            kind: kind.to_string(),
            seconds,
            until,
        });
    }

    /// Takes one journal record into the view.
    pub fn apply(&mut self, rec: &Record) {
        self.seq = self.seq.max(rec.seq);
        let at = DateTime::parse_from_rfc3339(&rec.ts)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now());
        let Ok(entry) = rec.entry() else { return };
        match &entry {
            Entry::RolloutPlan(p) => self.plan(&p.plan),
            Entry::Rollout(e) => self.event(at, e),
            Entry::ControllerUsage(u) => {
                self.controller = Some(u.clone());
                self.controller_samples += 1;
            }
            Entry::StepIntent(i) => {
                if let Some(h) = &rec.host {
                    self.host(h).last_step.clone_from(&i.step);
                }
            }
            // A host's end and its progress are shown by its state; any other
            // record on a host (a check, a sample, a log line) is its last step.
            Entry::StepOutcome(_) | Entry::HostFinish(_) | Entry::RunStart(_) => {}
            other => {
                if let Some(h) = &rec.host {
                    if self.by_host.contains_key(h.as_str()) {
                        self.host(h).last_step = other.kind().to_string();
                    }
                }
            }
        }
        self.count();
    }

    fn count(&mut self) {
        let mut t = Tally {
            targeted: self.announced.max(self.hosts.len()),
            ..Tally::default()
        };
        for h in &self.hosts {
            match h.state {
                HostState::Pending => {}
                HostState::InProgress => t.in_progress += 1,
                HostState::Patched => t.patched += 1,
                HostState::Failed => t.failed += 1,
                HostState::Unreachable => t.unreachable += 1,
                HostState::RolledBack => {}
            }
            if h.rolled_back {
                t.rolled_back += 1;
            }
        }
        let rolled_back_patched = self
            .hosts
            .iter()
            .filter(|h| h.state == HostState::RolledBack)
            .count();
        t.pending = t.targeted.saturating_sub(
            t.patched + t.in_progress + t.failed + t.unreachable + rolled_back_patched,
        );
        self.tally = t;
    }
}

/// The console of every run `watch` started lately, fed by their journals.
#[derive(Debug, Default)]
pub struct Board {
    runs: Mutex<VecDeque<RunConsole>>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<RunConsole>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A run begins: it is shown (empty) before its first record.
    pub fn start(&self, run_id: &str, playbook: &str) {
        let mut runs = self.lock();
        runs.retain(|r| r.run_id != run_id);
        runs.push_front(RunConsole::new(run_id, playbook));
        runs.truncate(KEPT_RUNS);
    }

    /// One record of a run's journal, as it is written.
    pub fn apply(&self, run_id: &str, rec: &Record) {
        let mut runs = self.lock();
        if let Some(r) = runs.iter_mut().find(|r| r.run_id == run_id) {
            r.apply(rec);
        }
    }

    /// The newest run's console.
    pub fn latest(&self) -> Option<RunConsole> {
        self.lock().front().cloned()
    }

    /// Every run kept, newest first.
    pub fn runs(&self) -> Vec<RunConsole> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::entry::{GateVerdict, RolloutPlan};
    use crate::journal::IntentData;
    use serde_json::Value;

    fn rec(seq: u64, host: Option<&str>, e: &Entry) -> Record {
        Record {
            seq,
            ts: format!("2026-12-03T04:00:{:02}Z", seq % 60),
            run: "r".into(),
            operator: "op".into(),
            host: host.map(str::to_string),
            kind: e.kind().to_string(),
            data: e.to_data(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn counts_waves_timers_and_last_steps_follow_the_records() {
        let mut c = RunConsole::new("r", "fleet");
        let mut seq = 0;
        let mut feed = |c: &mut RunConsole, host: Option<&str>, e: Entry| {
            seq += 1;
            c.apply(&rec(seq, host, &e));
        };
        feed(
            &mut c,
            None,
            Entry::RolloutPlan(RolloutPlan {
                policy: Value::Null,
                plan: "3 targets in 2 waves\npilot (1 hosts):\n  a [normal]\nwave 1 (2 hosts):\n  b [normal]\n  c [high] depends on a\n".into(),
                groups: BTreeMap::new(),
            }),
        );
        assert_eq!(c.waves.len(), 2);
        assert_eq!(c.waves[1].hosts, ["b", "c"]);
        assert_eq!(c.tally.pending, 3);
        feed(
            &mut c,
            None,
            Entry::Rollout(RolloutEvent::RunStarted {
                targets: 3,
                waves: 2,
                parallel: 2,
                allowed_failures: 0,
            }),
        );
        feed(
            &mut c,
            None,
            Entry::Rollout(RolloutEvent::WaveStarted {
                index: 0,
                label: "pilot".into(),
                hosts: vec!["a".into()],
            }),
        );
        feed(
            &mut c,
            Some("a"),
            Entry::Rollout(RolloutEvent::HostStarted {
                host: "a".into(),
                wave: 0,
            }),
        );
        feed(
            &mut c,
            Some("a"),
            Entry::StepIntent(IntentData {
                step: "deploy".into(),
                input: Value::Null,
                undoes: None,
            }),
        );
        assert_eq!(c.tally.in_progress, 1);
        assert_eq!(c.hosts[0].last_step, "deploy");
        feed(
            &mut c,
            Some("a"),
            Entry::Rollout(RolloutEvent::HostDone {
                host: "a".into(),
                wave: 0,
                seconds: 1.0,
            }),
        );
        feed(
            &mut c,
            None,
            Entry::Rollout(RolloutEvent::Soaking {
                after_wave: 0,
                seconds: 60.0,
            }),
        );
        assert_eq!(c.waves[0].state, WaveState::Done);
        assert_eq!(c.waves[0].timers[0].kind, "soak");
        assert_eq!(
            c.waves[0].timers[0].until
                - DateTime::parse_from_rfc3339("2026-12-03T04:00:07Z")
                    .unwrap()
                    .with_timezone(&Utc),
            chrono::Duration::seconds(60)
        );
        feed(
            &mut c,
            None,
            Entry::Rollout(RolloutEvent::GateEvaluated(GateVerdict {
                after_wave: 0,
                check: "prometheus".into(),
                query: Some("up".into()),
                bounds: None,
                value: Some(1.0),
                passed: false,
                detail: "1 > 0".into(),
                soaked_seconds: 60.0,
            })),
        );
        feed(
            &mut c,
            None,
            Entry::Rollout(RolloutEvent::GateStopped {
                after_wave: 0,
                reason: "1 > 0".into(),
            }),
        );
        let gate = c.waves[0].gate.clone().unwrap();
        assert!(!gate.passed);
        assert_eq!(c.stopped.as_deref(), Some("gate: 1 > 0"));
        assert_eq!(
            c.tally,
            Tally {
                targeted: 3,
                patched: 1,
                pending: 2,
                ..Tally::default()
            }
        );
        assert_eq!(c.waves[1].state, WaveState::Pending);
        assert!(!c.finished);
    }

    #[test]
    fn the_board_keeps_the_newest_runs_first() {
        let b = Board::default();
        for i in 0..6 {
            b.start(&format!("r{i}"), "p");
        }
        assert_eq!(b.runs().len(), KEPT_RUNS);
        assert_eq!(b.latest().unwrap().run_id, "r5");
        let e = Entry::ControllerUsage(ControllerUsage {
            at: Utc::now(),
            cpu_seconds: 1.0,
            rss_kib: 1,
            peak_rss_kib: 1,
            threads: 1,
            sockets: 1,
            read_bytes: 0,
            written_bytes: 0,
            bytes_sent: 10,
            bytes_received: 20,
            connections: 2,
        });
        b.apply("r5", &rec(1, None, &e));
        b.apply("r0", &rec(2, None, &e));
        let r5 = b.latest().unwrap();
        assert_eq!(r5.controller.unwrap().connections, 2);
        assert_eq!(r5.seq, 1);
    }
}
