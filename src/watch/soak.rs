//! Soak after the run: the hosts a `watch` run patched under a policy with a
//! `soak` key (its journal ends with `soak.planned`) are sampled on a schedule for
//! the policy's period, each sample held against the host's baseline; a host that
//! moves past a threshold is reported to its owners once (`soak_regression`, an
//! escalation) and ends the soak `regressed`, the others `passed`.
//!
//! It owns the soak threads and the [`SoakBoard`] the status page reads. What a
//! sample reads and how thresholds judge it are `primitives::monitor`'s, the
//! option map is `script::soak`'s, delivery is the notify layer's. Each soak
//! writes its own journal (`<run>-soak`, so `audit verify` covers it): the run's
//! journal is closed by then. Both are read and written through the runtime's
//! store, so a service on PostgreSQL (`--store`) soaks as one on run files does. It never changes a host: a regressed host keeps its
//! patch until a person decides (`patchbook rollback`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::launcher::{run_header, LaunchRequest};
use crate::inventory::Host;
use crate::journal::entry::{Entry, MonitorSample, SoakEnded, SoakPlanned, SoakStarted};
use crate::journal::Journal;
use crate::primitives::monitor::{mean, regressions, sample, Reading};
use crate::primitives::notify::SoakRegression;
use crate::primitives::{Mode, RunCtx};
use crate::rollout::clock::between;
use crate::rollout::Clock;
use crate::run::{Courier, Session};
use crate::runtime::Runtime;
use crate::script::soak::{from_record, SoakSpec};

/// How often a waiting soak looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How many hosts whose soak is over the status page remembers; hosts still under
/// soak are always listed.
const ENDED_ROWS: usize = 500;

/// One host under soak, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoakRow {
    pub host: String,
    /// The run that patched the host.
    pub run: String,
    /// The soak's own journal.
    pub journal: String,
    pub until: DateTime<Utc>,
    /// Samples judged against the baseline so far.
    pub samples: u64,
    /// `soaking`, then `passed`, `regressed`, `unread` or `stopped`; `regressed`
    /// shows as soon as it is seen.
    pub verdict: String,
    /// The first regressed sample's lines past a threshold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub regressions: Vec<String>,
}

/// The soaks of the service: their rows and threads.
#[derive(Default)]
pub struct SoakBoard {
    rows: Mutex<Vec<SoakRow>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SoakBoard {
    /// Every host under soak or soaked since the service started.
    pub fn rows(&self) -> Vec<SoakRow> {
        lock(&self.rows).clone()
    }

    fn update(&self, journal: &str, host: &str, f: impl FnOnce(&mut SoakRow)) {
        if let Some(r) = lock(&self.rows)
            .iter_mut()
            .find(|r| r.journal == journal && r.host == host)
        {
            f(r);
        }
    }

    /// Ends every soak at its next sample (their hosts end `stopped`) and waits.
    pub fn stop_and_wait(&self) {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Starts a soak for every `soak.planned` record in the journal of the run
    /// `run_id`, which `req` launched through `rt`. `changed` is called whenever a
    /// row changes. Returns how many soaks started.
    pub fn start_after_run(
        self: &Arc<Self>,
        rt: &Arc<Runtime>,
        req: &LaunchRequest,
        run_id: &str,
        clock: &Clock,
        changed: Arc<dyn Fn() + Send + Sync>,
    ) -> usize {
        if self.stop.load(Ordering::Acquire) {
            return 0;
        }
        // The run's records from the store it journaled into: run files, or the
        // database of `--store` / `[store] url`.
        let records = match rt.store().and_then(|store| store.read_records(run_id)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(run = %run_id, "no soak: cannot read the run's journal: {e}");
                return 0;
            }
        };
        let mut planned = Vec::new();
        let mut baseline: BTreeMap<String, Vec<BTreeMap<String, f64>>> = BTreeMap::new();
        for r in &records {
            match r.entry() {
                Ok(Entry::SoakPlanned(p)) => planned.push(p),
                Ok(Entry::MonitorSample(s)) if s.phase == "baseline" => {
                    if let Some(h) = &r.host {
                        baseline.entry(h.clone()).or_default().push(s.values);
                    }
                }
                _ => {}
            }
        }
        let mut started = 0;
        for (i, p) in planned.into_iter().enumerate() {
            let spec = match from_record(&p.options) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(run = %run_id, "no soak: {e}");
                    continue;
                }
            };
            let journal_id = if i == 0 {
                format!("{run_id}-soak")
            } else {
                format!("{run_id}-soak{}", i + 1)
            };
            // The run's baseline serves only when it has every metric the soak
            // judges; otherwise the soak samples its own.
            let baselines = baseline
                .iter()
                .filter(|(h, _)| p.hosts.contains(h))
                .map(|(h, s)| (h.clone(), mean(s)))
                .filter(|(_, b)| spec.thresholds.keys().all(|k| b.contains_key(k)))
                .collect();
            let job = SoakJob {
                rt: rt.clone(),
                req: req.clone(),
                run: run_id.to_string(),
                journal_id,
                spec,
                baselines,
                planned: p,
                clock: clock.clone(),
                changed: changed.clone(),
            };
            let until = job.clock.now()
                + chrono::Duration::from_std(job.spec.period).unwrap_or(chrono::Duration::MAX);
            let mut rows = lock(&self.rows);
            let ended = rows.iter().filter(|r| r.verdict != "soaking").count();
            let mut drop_ended = ended.saturating_sub(ENDED_ROWS);
            // Oldest first: rows are kept in the order their soaks started.
            rows.retain(|r| {
                if drop_ended > 0 && r.verdict != "soaking" {
                    drop_ended -= 1;
                    return false;
                }
                true
            });
            rows.extend(job.planned.hosts.iter().map(|h| SoakRow {
                host: h.clone(),
                run: run_id.to_string(),
                journal: job.journal_id.clone(),
                until,
                samples: 0,
                verdict: "soaking".into(),
                regressions: Vec::new(),
            }));
            drop(rows);
            let me = self.clone();
            match std::thread::Builder::new()
                .name(format!("soak-{run_id}"))
                .spawn(move || me.soak(job, until))
            {
                Ok(h) => {
                    let mut threads = lock(&self.threads);
                    threads.retain(|t| !t.is_finished());
                    threads.push(h);
                    started += 1;
                }
                Err(e) => tracing::error!(run = %run_id, "cannot start the soak thread: {e}"),
            }
        }
        if started > 0 {
            changed();
        }
        started
    }

    /// Waits `d` of the clock, in steps that notice a stop. True when stopped.
    fn wait(&self, clock: &Clock, d: Duration) -> bool {
        let deadline = Instant::now() + clock.real_duration(d);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(STOP_CHECK));
        }
    }

    fn soak(&self, job: SoakJob, until: DateTime<Utc>) {
        let rt = &job.rt;
        let anchor = match rt.anchor() {
            Ok(a) => a,
            Err(e) => return self.give_up(&job, &format!("cannot load the audit key: {e}")),
        };
        // Beside the run's journal, in the same store.
        let store = match rt.store() {
            Ok(s) => s,
            Err(e) => return self.give_up(&job, &format!("cannot open its journal: {e}")),
        };
        let journal = match Journal::begin_in(
            &store,
            &job.journal_id,
            &rt.operator,
            &run_header(&job.req.playbook),
            anchor,
        ) {
            Ok(j) => Arc::new(j),
            Err(e) => return self.give_up(&job, &format!("cannot open its journal: {e}")),
        };
        let session = Session::new(
            rt.clone(),
            RunCtx::new(
                job.journal_id.clone(),
                rt.state_dir.clone(),
                Some(journal.clone()),
                Mode::Apply,
            ),
        );
        let courier = Courier::start(rt.config.notify.clone(), Some(journal.clone()));
        let note = |host: &str, e: Entry| {
            if let Err(err) = journal.note_entry(Some(host), &e) {
                tracing::error!(soak = %job.journal_id, "cannot write the soak journal: {err}");
            }
        };
        // The plan as the run wrote it opens the soak's journal.
        if let Err(e) = journal.note_entry(None, &Entry::SoakPlanned(job.planned.clone())) {
            tracing::error!(soak = %job.journal_id, "cannot write the soak journal: {e}");
        }
        let mut hosts: Vec<HostSoak> = Vec::new();
        for name in &job.planned.hosts {
            match rt.inventory.host(name) {
                Some(h) => hosts.push(HostSoak::new(h.clone(), job.baselines.get(name).cloned())),
                None => tracing::warn!(host = %name, "not soaked: no longer in the inventory"),
            }
        }
        let spec = &job.spec;
        let read = |h: &Host| -> Option<(Reading, DateTime<Utc>)> {
            match session.with_host(h, |hc| spec.probe.read(hc, spec.timeout)) {
                Ok(r) => Some((r, job.clock.now())),
                Err(e) => {
                    tracing::warn!(host = %h.name, soak = %job.journal_id, "soak sample not taken: {e}");
                    None
                }
            }
        };
        let started = job.clock.now();
        for h in &mut hosts {
            h.prev = read(&h.host);
            if let Some(b) = &h.baseline {
                note(&h.host.name, h.started(&job.run, started, until, b, "run"));
            }
        }
        let mut stopped = false;
        while job.clock.now() < until {
            if self.wait(&job.clock, spec.every) {
                stopped = true;
                break;
            }
            for h in &mut hosts {
                let Some((now, at)) = read(&h.host) else {
                    continue;
                };
                let Some((prev, prev_at)) = h.prev.replace((now.clone(), at)) else {
                    continue;
                };
                let values = sample(&prev, &now, between(prev_at, at));
                let Some(baseline) = h.baseline.clone() else {
                    // No baseline from the run: the first samples make it.
                    note(&h.host.name, sample_entry("baseline", at, &values));
                    h.warmup.push(values);
                    if h.warmup.len() >= spec.baseline {
                        let b = mean(&h.warmup);
                        note(&h.host.name, h.started(&job.run, at, until, &b, "soak"));
                        h.baseline = Some(b);
                    }
                    continue;
                };
                note(&h.host.name, sample_entry("soak", at, &values));
                h.samples += 1;
                let found = regressions(&baseline, &values, &spec.thresholds);
                let first = !found.is_empty() && h.regressions.is_empty();
                if first {
                    h.regressions = found.clone();
                    let notice = SoakRegression {
                        run: job.run.clone(),
                        host: h.host.name.clone(),
                        regressions: found.clone(),
                        after: between(started, at),
                    }
                    .notice();
                    courier.send(notice, h.host.owners.clone(), rt.secrets.list());
                }
                let samples = h.samples;
                self.update(&job.journal_id, &h.host.name, |r| {
                    r.samples = samples;
                    if first {
                        r.verdict = "regressed".into();
                        r.regressions = found;
                    }
                });
                (job.changed)();
            }
        }
        let at = job.clock.now();
        for h in &hosts {
            let verdict = if !h.regressions.is_empty() {
                "regressed"
            } else if stopped {
                "stopped"
            } else if h.samples == 0 {
                "unread"
            } else {
                "passed"
            };
            note(
                &h.host.name,
                Entry::SoakEnded(SoakEnded {
                    run: job.run.clone(),
                    at,
                    verdict: verdict.to_string(),
                    samples: h.samples,
                    regressions: h.regressions.clone(),
                }),
            );
            self.update(&job.journal_id, &h.host.name, |r| {
                r.verdict = verdict.to_string();
            });
            tracing::info!(host = %h.host.name, run = %job.run, "soak ended: {verdict}");
        }
        courier.finish();
        drop(session);
        match Arc::try_unwrap(journal) {
            Ok(j) => {
                if let Err(e) = j.close() {
                    tracing::error!(soak = %job.journal_id, "cannot close the soak journal: {e}");
                }
            }
            Err(_) => {
                tracing::error!(soak = %job.journal_id, "the soak journal is still in use; left open")
            }
        }
        (job.changed)();
    }

    fn give_up(&self, job: &SoakJob, why: &str) {
        tracing::error!(run = %job.run, "no soak: {why}");
        for h in &job.planned.hosts {
            self.update(&job.journal_id, h, |r| r.verdict = "unread".into());
        }
        (job.changed)();
    }
}

/// One soak to run: what the run planned and what the service gives it.
struct SoakJob {
    rt: Arc<Runtime>,
    req: LaunchRequest,
    run: String,
    journal_id: String,
    spec: SoakSpec,
    planned: SoakPlanned,
    /// Per host, the means of the run's `monitor` baseline samples.
    baselines: BTreeMap<String, BTreeMap<String, f64>>,
    clock: Clock,
    changed: Arc<dyn Fn() + Send + Sync>,
}

/// One host's soak so far.
struct HostSoak {
    host: Host,
    prev: Option<(Reading, DateTime<Utc>)>,
    baseline: Option<BTreeMap<String, f64>>,
    warmup: Vec<BTreeMap<String, f64>>,
    samples: u64,
    regressions: Vec<String>,
}

impl HostSoak {
    fn new(host: Host, baseline: Option<BTreeMap<String, f64>>) -> Self {
        HostSoak {
            host,
            prev: None,
            baseline,
            warmup: Vec::new(),
            samples: 0,
            regressions: Vec::new(),
        }
    }

    fn started(
        &self,
        run: &str,
        at: DateTime<Utc>,
        until: DateTime<Utc>,
        baseline: &BTreeMap<String, f64>,
        from: &str,
    ) -> Entry {
        Entry::SoakStarted(SoakStarted {
            run: run.to_string(),
            at,
            until,
            baseline: baseline.clone(),
            baseline_from: from.to_string(),
        })
    }
}

fn sample_entry(phase: &str, at: DateTime<Utc>, values: &BTreeMap<String, f64>) -> Entry {
    Entry::MonitorSample(MonitorSample {
        phase: phase.to_string(),
        at,
        values: values.clone(),
    })
}
