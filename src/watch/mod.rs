//! `patchbook watch`: the long-running service that hot-reloads playbooks and
//! libraries, starts scheduled and triggered runs, and shows its state on a
//! read-only status page.
//!
//! - [`files`]: folder watching, editor-save debouncing, inotify limits;
//! - [`generation`]: compiling every input into one numbered, self-contained set;
//! - [`schedule`]: `schedule(…)` declarations, found in the AST, and their next start;
//! - [`service`]: the live generation, reload errors, runs (pinned, never overlapping);
//! - [`launcher`]: the [`Launcher`] trait through which a run is executed;
//! - [`soak`]: after a run, the hosts it patched sampled for the policy's `soak` period;
//! - [`control`]: the owner-only Unix control socket behind `patchbook trigger`;
//! - [`status`]: the status page, `/status.json`, `/events` and `/metrics`;
//! - [`metrics`]: the Prometheus meters and the `/metrics` body;
//! - [`scan`]: the scheduled advisory scan (`[advisories] scan`) on its own thread.
//! - [`console`]: the live deployment console, fed by each run's journal.
//!
//! This module wires them together ([`serve`]); it must not execute playbooks
//! itself (that is the launcher's job) nor parse command lines.

pub mod console;
pub mod control;
pub mod files;
pub mod generation;
pub mod launcher;
pub mod metrics;
pub mod scan;
pub mod schedule;
pub mod service;
pub mod soak;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use files::{FileWatch, FileWatchError, WatchTiming};
pub use generation::{Generation, Inputs};
pub use launcher::{Cause, LaunchRequest, LaunchResult, Launcher, ProgressCounts, ScriptLauncher};
pub use service::{ReloadOutcome, Service, TriggerError};

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Status page address (`--listen`); none without the flag.
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback status address.
    pub public_status: bool,
    /// Use the polling watcher (network filesystems).
    pub poll: bool,
    /// Control socket path.
    pub socket: PathBuf,
    pub timing: WatchTiming,
    /// How often schedules are checked against the clock.
    pub tick: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Files(#[from] FileWatchError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("cannot start the service: {0}")]
    Start(String),
}

/// Prints what a reload did: generation lines on stdout, rejections on stderr.
pub fn report(service: &Service, outcome: &ReloadOutcome) {
    match outcome {
        ReloadOutcome::Unchanged => {}
        ReloadOutcome::Live {
            generation,
            playbooks,
            took,
        } => {
            let hash = service
                .live()
                .map(|g| g.input_hash.chars().take(16).collect::<String>())
                .unwrap_or_default();
            println!(
                "generation {generation} live: {playbooks} playbooks, inputs {hash} ({} ms)",
                took.as_millis()
            );
        }
        ReloadOutcome::Rejected { errors } => {
            let live = match service.live() {
                Some(g) => format!("generation {} stays live", g.number),
                None => "no generation is live".to_string(),
            };
            eprintln!("reload rejected ({} errors); {live}:", errors.len());
            for e in errors {
                eprintln!("error: {}\n", e.message);
            }
        }
    }
}

/// Reloads on every change `watch` reports, until the service stops. With `print`,
/// each outcome is reported on stdout/stderr.
pub fn spawn_reloader(
    service: Arc<Service>,
    watch: FileWatch,
    print: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("watch-reload".into())
        .spawn(move || {
            while !service.stopping() {
                let Some(changes) = watch.next(Duration::from_millis(200)) else {
                    continue;
                };
                let mut rescan = false;
                for c in &changes {
                    match c {
                        files::Change::Rescan => rescan = true,
                        files::Change::Error(e) => {
                            eprintln!("file watcher: {e}; reloading everything");
                            rescan = true;
                        }
                        files::Change::Files => {}
                    }
                }
                let outcome = service.reload(rescan);
                if print {
                    report(&service, &outcome);
                }
            }
        })
}

/// Runs the service until SIGTERM or SIGINT: the first reload, the file watcher,
/// the scheduler, the control socket and (with `listen`) the status page. On the
/// signal it stops starting runs, waits for the runs in flight to finish their
/// current steps, removes the socket and returns.
pub fn serve(service: Arc<Service>, opts: &ServeOptions) -> Result<(), WatchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WatchError::Start(e.to_string()))?;

    let first = service.reload(true);
    report(&service, &first);

    let watch = FileWatch::start(&service.inputs().folders(), opts.poll, opts.timing)?;
    let listener = rt.block_on(async { control::bind(&opts.socket) })?;
    println!("control socket: {}", opts.socket.display());

    let http = match opts.listen {
        Some(addr) => {
            let l = rt.block_on(status::bind(addr, opts.public_status))?;
            let bound = l
                .local_addr()
                .map_err(|e| WatchError::Start(e.to_string()))?;
            println!("status page: http://{bound}/");
            Some(l)
        }
        None => None,
    };

    let reloader = spawn_reloader(service.clone(), watch, true)
        .map_err(|e| WatchError::Start(e.to_string()))?;

    let result: Result<(), WatchError> = rt.block_on(async {
        tokio::spawn(control::serve(listener, service.clone()));
        if let Some(l) = http {
            tokio::spawn(status::serve(l, service.clone()));
        }
        let ticker = service.clone();
        let every = opts.tick;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                let s = ticker.clone();
                // Starting a run spawns a thread; keep it off the reactor.
                let _ = tokio::task::spawn_blocking(move || s.tick()).await;
            }
        });
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| WatchError::Start(e.to_string()))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| WatchError::Start(e.to_string()))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    });
    println!("stopping: waiting for runs in flight to finish their current steps");
    service.shutdown();
    let _ = reloader.join();
    let _ = std::fs::remove_file(&opts.socket);
    rt.shutdown_timeout(Duration::from_secs(1));
    println!("stopped");
    result
}
