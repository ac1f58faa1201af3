//! One run's world as the primitives see it: the runtime (inventory, transports),
//! the run context (journal, state dir, plan mode), artifact settings, secrets, and
//! each host's deadline while the rollout works on it.
//!
//! It owns no policy and performs no I/O itself; it only hands each primitive a
//! [`HostCtx`] for the host it is called with. It must not know Rhai.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::inventory::Host;
use crate::primitives::artifact::ArtifactSettings;
use crate::primitives::backup::BackupLimits;
use crate::primitives::{HostCtx, Mode, PrimitiveError, RunCtx};
use crate::runtime::Runtime;

pub struct Session {
    pub runtime: Arc<Runtime>,
    pub run: RunCtx,
    pub artifacts: ArtifactSettings,
    deadlines: Mutex<HashMap<String, Instant>>,
    /// The last connection failure of each host since it was last taken: how the
    /// rollout tells an unreachable host from a failed one.
    lost: Mutex<HashMap<String, String>>,
    /// Hosts a probe over many hosts found unreachable and left out, with why, not
    /// yet reported by a rollout.
    unreachable: Mutex<BTreeMap<String, String>>,
}

impl Session {
    /// A session that keeps no journal (`eval`, tests): probes work, changes are
    /// refused by the primitives themselves.
    pub fn unjournaled(runtime: Arc<Runtime>) -> Self {
        let ctx = RunCtx::new("eval", runtime.state_dir.clone(), None, Mode::Apply);
        Session::new(runtime, ctx)
    }

    /// A session for `run`, whose backups take their limits from the runtime's
    /// `[backup]` settings.
    pub fn new(runtime: Arc<Runtime>, run: RunCtx) -> Self {
        let artifacts = ArtifactSettings::from_config(&runtime.config, &runtime.state_dir);
        let run = run.with_backup_limits(BackupLimits::from_config(&runtime.config.backup));
        Session {
            runtime,
            run,
            artifacts,
            deadlines: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(BTreeMap::new()),
        }
    }

    /// Runs `f` with a context for `host`: its cached transport (connected on first
    /// use), the run, and the host's deadline. A transport failure drops the cached
    /// session so the host's next step reconnects.
    pub fn with_host<R>(
        &self,
        host: &Host,
        f: impl FnOnce(&HostCtx) -> Result<R, PrimitiveError>,
    ) -> Result<R, PrimitiveError> {
        let r = match self.runtime.transport(host) {
            Ok(t) => {
                let ctx = HostCtx {
                    host,
                    transport: &*t,
                    run: &self.run,
                    deadline: self.deadline(&host.name),
                };
                f(&ctx)
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e @ PrimitiveError::Transport(_)) = &r {
            self.runtime.forget(&host.name);
            if e.is_unreachable() {
                lock(&self.lost).insert(host.name.clone(), e.to_string());
            }
        }
        r
    }

    /// The connection failure `host` had since the last call, if any, and forgets
    /// it: a rollout asks before a host's work (to start clean) and after it fails.
    pub fn take_lost(&self, host: &str) -> Option<String> {
        lock(&self.lost).remove(host)
    }

    /// A probe over many hosts could not connect to `host` and went on without it:
    /// journaled as `host.unreachable`, and handed to the next rollout's summary.
    pub fn note_unreachable(&self, host: &str, step: &str, reason: &str) {
        if let Some(j) = &self.run.journal {
            let entry = crate::journal::entry::Entry::HostUnreachable(
                crate::journal::entry::HostUnreachable {
                    step: step.to_string(),
                    reason: reason.to_string(),
                },
            );
            if let Err(e) = j.note_entry(Some(host), &entry) {
                tracing::error!(error = %e, host, "cannot journal an unreachable host");
            }
        }
        lock(&self.unreachable).insert(host.to_string(), reason.to_string());
    }

    /// The hosts probes found unreachable since the last call, by name.
    pub fn take_unreachable(&self) -> BTreeMap<String, String> {
        std::mem::take(&mut *lock(&self.unreachable))
    }

    /// Set by the rollout while it works on a host; commands get at most the time left.
    pub fn set_deadline(&self, host: &str, deadline: Option<Instant>) {
        let mut d = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        match deadline {
            Some(at) => d.insert(host.to_string(), at),
            None => d.remove(host),
        };
    }

    pub fn deadline(&self, host: &str) -> Option<Instant> {
        self.deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
    }

    /// A value that must never be shown: journal, logs, reports and notifications
    /// print `***` instead.
    pub fn add_secret(&self, value: &str) {
        // The runtime's store is the one its journals share and the log reads.
        self.runtime.secrets.add(value);
        if let Some(j) = &self.run.journal {
            j.add_secret(value);
        }
    }

    /// Every secret value of the run so far.
    pub fn secrets(&self) -> Vec<String> {
        self.runtime.secrets.list()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
