//! Notifications of a run, delivered on their own thread: the executor hands a
//! notice over and goes on, so a dead webhook's retry schedule never stalls new
//! hosts. Every delivery is journaled as it completes; [`Courier::finish`] waits
//! for the queue to drain before the run's journal is closed.
//!
//! It owns the delivery thread and nothing else: what to send, and when, is the
//! [`super::RunControl`]'s decision.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::journal::entry::Entry;
use crate::journal::Journal;
use crate::primitives::notify::{self, NotifyConfig};

struct Job {
    notice: notify::Notice,
    owners: Vec<String>,
    secrets: Vec<String>,
}

/// The delivery worker of one run.
pub struct Courier {
    tx: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Courier {
    /// Starts the worker. Deliveries are journaled in `journal` when there is one.
    pub fn start(cfg: NotifyConfig, journal: Option<Arc<Journal>>) -> Self {
        let (tx, rx) = channel::<Job>();
        let worker = std::thread::Builder::new()
            .name("patchbook-notify".into())
            .spawn(move || {
                for job in rx {
                    let deliveries =
                        notify::automatic(&cfg, &job.notice, &job.owners, &job.secrets);
                    if let Some(j) = &journal {
                        for d in deliveries {
                            if let Err(e) = j.note_entry(None, &Entry::Notify(d.into())) {
                                tracing::error!(error = %e, "cannot journal a notification delivery");
                            }
                        }
                    }
                }
            })
            .ok();
        Courier {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(worker),
        }
    }

    /// Queues a notice; returns at once.
    pub fn send(&self, notice: notify::Notice, owners: Vec<String>, secrets: Vec<String>) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => {
                if tx
                    .send(Job {
                        notice,
                        owners,
                        secrets,
                    })
                    .is_err()
                {
                    tracing::error!("the notification worker is gone; a notice was dropped");
                }
            }
            None => tracing::warn!("notice after the run finished; dropped"),
        }
    }

    /// Waits until every queued notice is delivered (or has spent its retries).
    pub fn finish(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.finish();
    }
}
