//! How the service starts a run: the [`Launcher`] trait, and [`ScriptLauncher`],
//! which runs a playbook's top-level statements and writes a journal whose header
//! names the pinned generation's hashes.
//!
//! The service hands a launcher the compiled playbook of the generation that was
//! live when the run started (an `Arc`, so a reload cannot change it under the run),
//! a progress callback, and a stop flag. This module must not watch files or decide
//! when runs start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::journal::lock::{HostClaims, HostHolder};
use crate::journal::{Journal, RunHeader, Store};
use crate::primitives::{Mode, RunCtx};
use crate::run::Session;
use crate::runtime::Runtime;
use crate::script::{CompiledPlaybook, Limits, ScriptRun};

/// Progress of the run in flight, as the status page shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProgressCounts {
    pub targeted: usize,
    pub done: usize,
    pub in_progress: usize,
    pub failed: usize,
    /// Could not be connected to; apart from `failed`.
    pub unreachable: usize,
    pub pending: usize,
}

/// Why a run started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "lowercase")]
pub enum Cause {
    /// `patchbook trigger` through the control socket.
    Trigger,
    /// A schedule fell due at `due` (RFC 3339, test clock time).
    Schedule { spec: String, due: String },
}

/// One run to start.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    /// The playbook's name under the playbook folder (`nightly`, `team/db`).
    pub name: String,
    /// The pinned version: the generation's compiled playbook, never re-read.
    pub playbook: Arc<CompiledPlaybook>,
    pub generation: u64,
    /// A fresh run id the launcher should use for its journal.
    pub run_id: String,
    pub cause: Cause,
    /// `param()` values the trigger gave (`patchbook trigger NAME --param k=v`);
    /// scheduled runs have none.
    pub params: BTreeMap<String, String>,
    /// Shown every record of the run's journal as it is written (the service's
    /// console); a launcher sets it on the journal it opens.
    pub tap: Option<crate::journal::JournalTap>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchResult {
    /// The journal's run id (normally the one requested).
    pub run_id: String,
    pub ok: bool,
    /// One line for the status page and the log.
    pub summary: String,
}

/// Runs one playbook to its end on the calling thread (the service gives each run
/// its own thread).
///
/// A launcher must:
/// - run exactly `req.playbook` (never recompile or re-read the file), and record
///   `req.playbook.sha256` and its `modules` hashes in the run's journal header;
/// - use `req.run_id` for the journal unless it cannot, and return the id it used;
/// - call `progress` whenever its counts change (cheap; it only updates the status
///   page);
/// - honour `stop`: once it is set (SIGTERM), start no new host step, let the steps
///   in flight finish, leave the journal consistent (open, so `run --resume`
///   continues) and return;
/// - register `schedule()` as a no-op on its engine (see
///   [`super::schedule::register_schedule_noop`]).
///
/// `Err` means the run could not start or broke outside the playbook's control; a
/// playbook that ran and failed is `Ok` with `ok: false`.
pub trait Launcher: Send + Sync + 'static {
    fn launch(
        &self,
        req: &LaunchRequest,
        progress: &dyn Fn(ProgressCounts),
        stop: Arc<AtomicBool>,
    ) -> Result<LaunchResult, String>;

    /// The runtime the runs journal and reach hosts through, if any: after a run,
    /// the service soaks the hosts its journal plans a soak for (`soak.planned`)
    /// through it. None: runs are not soaked.
    fn runtime(&self) -> Option<Arc<Runtime>> {
        None
    }
}

/// Where [`ScriptLauncher`] writes journals.
#[derive(Debug, Clone)]
pub struct JournalTarget {
    pub state_dir: std::path::PathBuf,
    pub operator: String,
}

/// Adds functions to a run's engine (embedding and tests).
pub type EngineHook = Arc<dyn Fn(&mut rhai::Engine) + Send + Sync>;

/// Runs the playbook's top-level statements on a fresh [`ScriptRun`], optionally
/// bound to a runtime and writing a journal. Counts the playbook as one target.
/// A stop request cancels the script at its next operation check: a blocking
/// primitive call in progress finishes first, and the journal is left open.
pub struct ScriptLauncher {
    limits: Limits,
    runtime: Option<Arc<Runtime>>,
    journal: Option<JournalTarget>,
    hook: Option<EngineHook>,
}

impl ScriptLauncher {
    pub fn new(limits: Limits) -> Self {
        ScriptLauncher {
            limits,
            runtime: None,
            journal: None,
            hook: None,
        }
    }

    /// Binds primitives to `runtime` and journals into its state directory.
    pub fn with_runtime(mut self, runtime: Arc<Runtime>) -> Self {
        self.journal = Some(JournalTarget {
            state_dir: runtime.state_dir.clone(),
            operator: runtime.operator.clone(),
        });
        self.runtime = Some(runtime);
        self
    }

    pub fn with_journal(mut self, target: JournalTarget) -> Self {
        self.journal = Some(target);
        self
    }

    pub fn with_engine_hook(mut self, hook: EngineHook) -> Self {
        self.hook = Some(hook);
        self
    }
}

/// The journal header for a pinned playbook version.
pub fn run_header(pb: &CompiledPlaybook) -> RunHeader {
    let modules: BTreeMap<String, String> = pb
        .modules
        .iter()
        .map(|(_, path, sha)| (path.display().to_string(), sha.clone()))
        .collect();
    RunHeader::new(
        pb.path.clone(),
        pb.sha256.clone(),
        modules,
        String::new(),
        serde_json::Value::Null,
    )
}

impl Launcher for ScriptLauncher {
    fn runtime(&self) -> Option<Arc<Runtime>> {
        self.runtime.clone()
    }

    fn launch(
        &self,
        req: &LaunchRequest,
        progress: &dyn Fn(ProgressCounts),
        stop: Arc<AtomicBool>,
    ) -> Result<LaunchResult, String> {
        // The runtime's `[audit] signing_key`, when the journal is the runtime's.
        let anchor = match &self.runtime {
            Some(rt) => rt.anchor().map_err(|e| e.to_string())?,
            None => None,
        };
        // The runtime's database (`[store] url`) when it names one; the target's
        // state directory either way.
        let database = match &self.runtime {
            Some(rt) => match rt.store().map_err(|e| e.to_string())? {
                Store::Postgres { url, .. } => Some(url),
                Store::File { .. } => None,
            },
            None => None,
        };
        let journal = match &self.journal {
            Some(t) => Some(
                Journal::begin_in(
                    &match &database {
                        Some(url) => Store::Postgres {
                            state_dir: t.state_dir.clone(),
                            url: url.clone(),
                        },
                        None => Store::file(&t.state_dir),
                    },
                    &req.run_id,
                    &t.operator,
                    &run_header(&req.playbook),
                    anchor,
                )
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        if let (Some(j), Some(tap)) = (&journal, &req.tap) {
            let _ = j.set_tap(tap.clone());
        }
        let journal = journal.map(Arc::new);
        // With a runtime, the playbook's primitives journal into this run's journal.
        let mut run = match (&self.runtime, &journal) {
            (Some(rt), Some(j)) => {
                let ctx = RunCtx::new(
                    req.run_id.clone(),
                    rt.state_dir.clone(),
                    Some(j.clone()),
                    Mode::Apply,
                )
                .with_playbook(req.playbook.path.display().to_string())
                // Like every journaled run: its changes claim their hosts, and a
                // host another run holds refuses the change.
                .with_claims(Arc::new(HostClaims::new(
                    &rt.state_dir,
                    HostHolder::new(&req.run_id, &rt.operator, "watch"),
                )));
                ScriptRun::with_session(&self.limits, Arc::new(Session::new(rt.clone(), ctx)))
            }
            (rt, _) => ScriptRun::new(&self.limits, rt.clone()),
        };
        super::schedule::register_schedule_noop(run.engine_mut());
        if let Some(hook) = &self.hook {
            hook(run.engine_mut());
        }
        progress(ProgressCounts {
            targeted: 1,
            in_progress: 1,
            ..Default::default()
        });
        let cancel = run.cancel_flag();
        let finished = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                while !finished.load(Ordering::Acquire) {
                    if stop.load(Ordering::Acquire) {
                        cancel.store(true, Ordering::Release);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let r = run.run(&req.playbook);
            finished.store(true, Ordering::Release);
            r
        });
        let stopped = stop.load(Ordering::Acquire);
        let ok = result.is_ok();
        progress(ProgressCounts {
            targeted: 1,
            done: usize::from(ok),
            failed: usize::from(!ok && !stopped),
            pending: usize::from(!ok && stopped),
            in_progress: 0,
            unreachable: 0,
        });
        let summary = match (&result, stopped) {
            (Ok(_), _) => "finished".to_string(),
            (Err(_), true) => {
                "stopped by shutdown; the journal stays open for `run --resume`".to_string()
            }
            (Err(e), false) => e.to_string(),
        };
        drop(run);
        if let Some(j) = journal.and_then(|j| Arc::try_unwrap(j).ok()) {
            if ok || !stopped {
                j.close().map_err(|e| e.to_string())?;
            }
        }
        Ok(LaunchResult {
            run_id: req.run_id.clone(),
            ok,
            summary,
        })
    }
}
