//! The service's state: the live generation, the last reload error, schedules and
//! runs. Reloads, triggers and schedule ticks all go through [`Service`], which the
//! file watcher, the control socket, the scheduler and the status page share.
//!
//! Rules it enforces:
//! - only a generation where everything compiled goes live; a rejected one leaves
//!   the live one in place and its errors on the status page;
//! - a run pins the live generation's `Arc<CompiledPlaybook>` when it starts;
//! - runs of one playbook never overlap: a trigger while it runs is refused (the
//!   answer names the run in flight), and a schedule that falls due while it runs is
//!   skipped, counted and logged (not queued: a burst of catch-up runs after a long
//!   run is never what an operator wants);
//! - after a stop request no run starts, and [`Service::shutdown`] waits for the
//!   runs in flight.
//!
//! It must not know about sockets, HTTP or the file watcher.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::generation::{compile, snapshot, FileError, Generation, Inputs};
use super::launcher::{Cause, LaunchRequest, Launcher, ProgressCounts};
use super::metrics::{Meters, Outcome};
use super::soak::SoakBoard;
use crate::rollout::Clock;

/// How many finished runs the status page remembers.
const RECENT_RUNS: usize = 20;

/// What one reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Nothing changed since the live (or the last rejected) inputs.
    Unchanged,
    /// A new generation is live.
    Live {
        generation: u64,
        playbooks: usize,
        took: std::time::Duration,
    },
    /// Rejected; the previous generation (if any) stays live.
    Rejected { errors: Vec<FileError> },
}

/// A rejected reload, kept for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadFailure {
    pub at: DateTime<Utc>,
    pub errors: Vec<FileError>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TriggerError {
    #[error("no generation is live yet: every playbook must compile first (see the errors `patchbook watch` printed)")]
    NoGeneration,
    #[error("no playbook `{name}` in generation {generation}; playbooks: {known}")]
    Unknown {
        name: String,
        generation: u64,
        known: String,
    },
    #[error("`{name}` is already running as run {run_id} (started {since}); runs of one playbook never overlap, trigger it again when that run ends")]
    AlreadyRunning {
        name: String,
        run_id: String,
        since: String,
    },
    #[error("the service is shutting down; no new runs start")]
    ShuttingDown,
    #[error("cannot start a thread for the run: {0}")]
    Thread(String),
}

/// A run in flight or finished.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub playbook: String,
    pub run_id: String,
    pub generation: u64,
    pub sha256: String,
    pub cause: Cause,
    /// Clock time (the test clock when one is set).
    pub started: DateTime<Utc>,
    pub progress: ProgressCounts,
    pub finished: Option<DateTime<Utc>>,
    pub ok: Option<bool>,
    pub summary: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Due {
    spec: String,
    next: Option<DateTime<Utc>>,
    skipped: u64,
}

#[derive(Default)]
struct State {
    attempts: u64,
    went_live: u64,
    rejected: u64,
    unchanged: u64,
    last_error: Option<ReloadFailure>,
    last_failed_hash: Option<String>,
    /// Per playbook, one entry per declared schedule.
    due: BTreeMap<String, Vec<Due>>,
    in_flight: BTreeMap<String, RunStatus>,
    recent: VecDeque<RunStatus>,
}

/// The shared heart of `patchbook watch`.
pub struct Service {
    inputs: Inputs,
    launcher: Arc<dyn Launcher>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    live: RwLock<Option<Arc<Generation>>>,
    state: Mutex<State>,
    numbers: AtomicU64,
    runs_started: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    updates: tokio::sync::watch::Sender<u64>,
    /// Serialises reloads: the watcher and a rescan must not compile concurrently.
    reload_lock: Mutex<()>,
    meters: Meters,
    soaks: Arc<SoakBoard>,
    /// The deployment console, fed by the runs' journals.
    console: super::console::Board,
}

/// The service's numbers at one moment, for `/metrics`.
#[derive(Debug, Clone)]
pub struct Counts {
    pub went_live: u64,
    pub rejected: u64,
    pub unchanged: u64,
    pub live_generation: u64,
    pub in_flight: u64,
    pub runs_started: u64,
    /// Each playbook's latest run: the one in flight, else the last finished.
    pub latest: Vec<RunStatus>,
}

impl Service {
    pub fn new(inputs: Inputs, launcher: Arc<dyn Launcher>, clock: Clock) -> Arc<Self> {
        Arc::new(Service {
            inputs,
            launcher,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            live: RwLock::new(None),
            state: Mutex::new(State::default()),
            numbers: AtomicU64::new(0),
            runs_started: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            updates: tokio::sync::watch::Sender::new(0),
            reload_lock: Mutex::new(()),
            meters: Meters::default(),
            soaks: Arc::new(SoakBoard::default()),
            console: super::console::Board::default(),
        })
    }

    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live generation, if any compiled yet.
    pub fn live(&self) -> Option<Arc<Generation>> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The deployment console of the latest runs.
    pub fn console(&self) -> &super::console::Board {
        &self.console
    }

    /// Shows the console (and the event stream) each record of run `run_id`.
    /// Holds the service weakly: a journal outliving it feeds nothing.
    fn console_tap(self: &Arc<Self>, playbook: &str, run_id: &str) -> crate::journal::JournalTap {
        self.console.start(run_id, playbook);
        let me = Arc::downgrade(self);
        let run = run_id.to_string();
        crate::journal::JournalTap(Arc::new(move |rec: &crate::journal::Record| {
            if let Some(s) = me.upgrade() {
                s.console.apply(&run, rec);
                s.changed();
            }
        }))
    }

    /// Bumped on every change the status page shows.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.updates.subscribe()
    }

    fn changed(&self) {
        self.updates.send_modify(|v| *v += 1);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Reads every input and, unless nothing changed (or `force`), compiles a new
    /// generation and puts it live if everything compiled.
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let _one = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let snap = match snapshot(&self.inputs) {
            Ok(s) => s,
            Err(e) => return self.reject(None, vec![e]),
        };
        let live = self.live();
        if !force {
            if live
                .as_ref()
                .is_some_and(|g| g.input_hash == snap.input_hash)
            {
                let mut st = self.state();
                st.unchanged += 1;
                // A save that restores the live inputs clears a stale error.
                if st.last_error.take().is_some() {
                    st.last_failed_hash = None;
                    drop(st);
                    self.changed();
                }
                return ReloadOutcome::Unchanged;
            }
            let mut st = self.state();
            if st.last_failed_hash.as_deref() == Some(snap.input_hash.as_str()) {
                st.unchanged += 1;
                return ReloadOutcome::Unchanged;
            }
        }
        self.state().attempts += 1;
        let hash = snap.input_hash.clone();
        let number = self.numbers.load(Ordering::Acquire) + 1;
        let compiled = compile(&self.inputs, snap, number, self.clock.now());
        self.meters.reload_took(t0.elapsed());
        match compiled {
            Err(errors) => self.reject(Some(hash), errors),
            Ok(generation) => {
                self.numbers.store(number, Ordering::Release);
                let generation = Arc::new(generation);
                let playbooks = generation.playbooks.len();
                *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(generation.clone());
                {
                    let mut st = self.state();
                    st.went_live += 1;
                    st.last_error = None;
                    st.last_failed_hash = None;
                    let now = self.clock.now();
                    let mut due = BTreeMap::new();
                    for (name, schedules) in &generation.schedules {
                        let old = st.due.remove(name).unwrap_or_default();
                        let entries = schedules
                            .iter()
                            .map(|s| {
                                // An unchanged schedule keeps its slot (and its
                                // skip count); a new or changed one starts from now.
                                old.iter()
                                    .find(|d| d.spec == s.spec())
                                    .cloned()
                                    .unwrap_or(Due {
                                        spec: s.spec().to_string(),
                                        next: s.next_after(now),
                                        skipped: 0,
                                    })
                            })
                            .collect();
                        due.insert(name.clone(), entries);
                    }
                    st.due = due;
                }
                self.changed();
                ReloadOutcome::Live {
                    generation: number,
                    playbooks,
                    took: t0.elapsed(),
                }
            }
        }
    }

    fn reject(&self, hash: Option<String>, errors: Vec<FileError>) -> ReloadOutcome {
        {
            let mut st = self.state();
            st.rejected += 1;
            st.last_failed_hash = hash;
            st.last_error = Some(ReloadFailure {
                at: self.clock.now(),
                errors: errors.clone(),
            });
        }
        self.changed();
        ReloadOutcome::Rejected { errors }
    }

    /// Starts `name` on the live generation, on its own thread. Returns the run id.
    pub fn trigger(self: &Arc<Self>, name: &str, cause: Cause) -> Result<String, TriggerError> {
        self.trigger_with(name, cause, BTreeMap::new())
    }

    /// [`Service::trigger`] with the values the playbook's `param()` reads.
    pub fn trigger_with(
        self: &Arc<Self>,
        name: &str,
        cause: Cause,
        params: BTreeMap<String, String>,
    ) -> Result<String, TriggerError> {
        if self.stopping() {
            return Err(TriggerError::ShuttingDown);
        }
        let generation = self.live().ok_or(TriggerError::NoGeneration)?;
        let key = name.trim_end_matches(".rhai").trim_start_matches("./");
        let (key, pb) = generation
            .playbooks
            .get_key_value(key)
            .or_else(|| {
                // A path to the file works too.
                let p = std::fs::canonicalize(name).ok()?;
                generation
                    .playbooks
                    .iter()
                    .find(|(_, pb)| std::fs::canonicalize(&pb.path).ok().as_ref() == Some(&p))
            })
            .map(|(k, pb)| (k.clone(), pb.clone()))
            .ok_or_else(|| TriggerError::Unknown {
                name: name.to_string(),
                generation: generation.number,
                known: generation
                    .playbooks
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let now = self.clock.now();
        let seq = self.runs_started.fetch_add(1, Ordering::AcqRel) + 1;
        let run_id = format!(
            "{}-{}-g{}-{}",
            key.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_"
            ),
            now.format("%Y%m%dT%H%M%S"),
            generation.number,
            seq
        );
        let status = RunStatus {
            playbook: key.clone(),
            run_id: run_id.clone(),
            generation: generation.number,
            sha256: pb.sha256.clone(),
            cause: cause.clone(),
            started: now,
            progress: ProgressCounts::default(),
            finished: None,
            ok: None,
            summary: None,
        };
        {
            let mut st = self.state();
            if let Some(r) = st.in_flight.get(&key) {
                return Err(TriggerError::AlreadyRunning {
                    name: key,
                    run_id: r.run_id.clone(),
                    since: r.started.to_rfc3339(),
                });
            }
            st.in_flight.insert(key.clone(), status);
        }
        let req = LaunchRequest {
            name: key.clone(),
            playbook: pb,
            generation: generation.number,
            run_id: run_id.clone(),
            cause,
            params,
            tap: Some(self.console_tap(&key, &run_id)),
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("run-{key}"))
            .spawn(move || me.run(req));
        match spawned {
            Ok(h) => {
                let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
            Err(e) => {
                self.state().in_flight.remove(&key);
                return Err(TriggerError::Thread(e.to_string()));
            }
        }
        tracing::info!(playbook = %key, run = %run_id, generation = generation.number, "run {run_id} started ({key})");
        self.changed();
        Ok(run_id)
    }

    fn run(self: &Arc<Self>, req: LaunchRequest) {
        let progress = |p: ProgressCounts| {
            if let Some(r) = self.state().in_flight.get_mut(&req.name) {
                r.progress = p;
            }
            self.changed();
        };
        let result = self.launcher.launch(&req, &progress, self.stop.clone());
        // A run that ends while the service stops is not soaked: the soak would
        // end `stopped` at once.
        if let (Ok(res), Some(rt), false) = (&result, self.launcher.runtime(), self.stopping()) {
            let me = self.clone();
            self.soaks.start_after_run(
                &rt,
                &req,
                &res.run_id,
                &self.clock,
                Arc::new(move || me.changed()),
            );
        }
        let mut st = self.state();
        if let Some(mut r) = st.in_flight.remove(&req.name) {
            r.finished = Some(self.clock.now());
            match result {
                Ok(res) => {
                    r.run_id = res.run_id;
                    r.ok = Some(res.ok);
                    r.summary = Some(res.summary);
                    self.meters
                        .run_ended(if res.ok { Outcome::Ok } else { Outcome::Failed });
                }
                Err(e) => {
                    r.ok = Some(false);
                    r.summary = Some(e);
                    self.meters.run_ended(Outcome::Error);
                }
            }
            let verdict = if r.ok == Some(true) { "ok" } else { "FAILED" };
            tracing::info!(
                playbook = %r.playbook,
                run = %r.run_id,
                ok = ?r.ok,
                "run {} ended, {verdict}: {}",
                r.run_id,
                r.summary.as_deref().unwrap_or("")
            );
            st.recent.push_front(r);
            st.recent.truncate(RECENT_RUNS);
        }
        drop(st);
        self.changed();
    }

    /// Starts every schedule that is due at the clock's now. A due schedule whose
    /// playbook is still running is skipped. Returns the run ids started.
    pub fn tick(self: &Arc<Self>) -> Vec<String> {
        if self.stopping() {
            return Vec::new();
        }
        let Some(generation) = self.live() else {
            return Vec::new();
        };
        let now = self.clock.now();
        let mut fire = Vec::new();
        {
            let mut st = self.state();
            for (name, entries) in st.due.iter_mut() {
                let Some(schedules) = generation.schedules.get(name) else {
                    continue;
                };
                for d in entries.iter_mut() {
                    let Some(due) = d.next.filter(|t| *t <= now) else {
                        continue;
                    };
                    let Some(s) = schedules.iter().find(|s| s.spec() == d.spec) else {
                        continue;
                    };
                    // Missed slots (a suspended machine) collapse into this one.
                    d.next = s.next_after(now);
                    fire.push((name.clone(), d.spec.clone(), due));
                }
            }
        }
        let mut started = Vec::new();
        for (name, spec, due) in fire {
            let cause = Cause::Schedule {
                spec: spec.clone(),
                due: due.to_rfc3339(),
            };
            match self.trigger(&name, cause) {
                Ok(id) => started.push(id),
                Err(e) => {
                    tracing::warn!(playbook = %name, schedule = %spec, "scheduled run skipped: {e}");
                    let mut st = self.state();
                    if let Some(d) = st
                        .due
                        .get_mut(&name)
                        .and_then(|v| v.iter_mut().find(|d| d.spec == spec))
                    {
                        d.skipped += 1;
                    }
                }
            }
        }
        if !started.is_empty() {
            self.changed();
        }
        started
    }

    /// Keeps a service thread that is not a run (the advisory scan) so that
    /// [`Service::shutdown`] waits for it too.
    pub fn adopt(&self, thread: JoinHandle<()>) {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
    }

    /// Asks every run to stop after its current steps; no new run starts.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.changed();
    }

    /// [`Service::request_stop`], then waits for every run thread, then ends every
    /// soak (its hosts end `stopped`) and waits for it.
    pub fn shutdown(&self) {
        self.request_stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // After the runs: a soak a run started on its way out is stopped too.
        self.soaks.stop_and_wait();
    }

    /// The meters `/metrics` shows beside [`Service::counts`]; the advisory scan
    /// reports through [`Meters::record_scan`].
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// The hosts under soak and soaked since the service started.
    pub fn soaks(&self) -> &SoakBoard {
        &self.soaks
    }

    /// The numbers `/metrics` shows, read at once under the state lock.
    pub fn counts(&self) -> Counts {
        let live_generation = self.live().map(|g| g.number).unwrap_or(0);
        let st = self.state();
        let mut latest: BTreeMap<&str, &RunStatus> = BTreeMap::new();
        // `recent` is newest first: the first seen of each playbook wins, and a
        // run in flight wins over all of them.
        for r in st.recent.iter() {
            latest.entry(r.playbook.as_str()).or_insert(r);
        }
        for r in st.in_flight.values() {
            latest.insert(r.playbook.as_str(), r);
        }
        Counts {
            went_live: st.went_live,
            rejected: st.rejected,
            unchanged: st.unchanged,
            live_generation,
            in_flight: u64::try_from(st.in_flight.len()).unwrap_or(u64::MAX),
            runs_started: self.runs_started.load(Ordering::Acquire),
            latest: latest.into_values().cloned().collect(),
        }
    }

    /// Everything the status page shows.
    pub fn status(&self) -> Value {
        let generation = self.live();
        let st = self.state();
        let st = &*st;
        let now = self.clock.now();
        let gen_json = generation.as_ref().map(|g| {
            json!({
                "number": g.number,
                "created": g.created,
                "input_hash": g.input_hash,
                "files": g.files,
                "playbooks": g.playbooks.iter().map(|(name, pb)| json!({
                    "name": name,
                    "path": pb.path,
                    "sha256": pb.sha256,
                    "modules": pb.modules.iter().map(|(n, p, s)| json!({"name": n, "path": p, "sha256": s})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        });
        let schedules: Vec<Value> = st
            .due
            .iter()
            .flat_map(|(name, entries)| {
                let schedules = generation.as_ref().and_then(|g| g.schedules.get(name));
                entries.iter().map(move |d| {
                    let local = d.next.and_then(|t| {
                        schedules
                            .and_then(|v| v.iter().find(|s| s.spec() == d.spec))
                            .map(|s| s.display_time(t))
                    });
                    json!({
                        "playbook": name,
                        "spec": d.spec,
                        "next_start": d.next,
                        "next_start_local": local,
                        "skipped_overlaps": d.skipped,
                        "running": st.in_flight.contains_key(name),
                    })
                })
            })
            .collect();
        json!({
            "now": now,
            "stopping": self.stopping(),
            "generation": gen_json,
            "reloads": {
                "attempts": st.attempts,
                "live": generation.as_ref().map(|g| g.number).unwrap_or(0),
                "rejected": st.rejected,
                "unchanged": st.unchanged,
            },
            "last_error": st.last_error,
            "schedules": schedules,
            "runs": {
                "in_flight": st.in_flight.values().collect::<Vec<_>>(),
                "recent": st.recent,
            },
            "soak": self.soaks.rows(),
        })
    }
}
