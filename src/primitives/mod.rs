//! The primitives: typed Rust functions that do the work of a playbook —
//! facts, version comparison, artifacts, backup, deploy, verify, health, rollback,
//! notify, exec, files, services and reboots, repository upgrades, monitoring.
//!
//! Each one is a plain function testable without Rhai; the `script` layer adapts
//! them. A primitive that changes a host writes its intent to the journal before
//! acting and its outcome, with the undo step, after. Primitives must not know Rhai.

pub mod artifact;
pub mod backup;
pub mod context;
pub mod deploy;
pub mod exec;
pub mod facts;
pub mod files;
pub mod health;
pub mod monitor;
pub mod notify;
pub mod packages;
pub mod services;
pub mod snapshot;
pub mod undo;
pub mod upgrade;
pub mod version;

pub use context::{HostCtx, Mode, PlannedAction, RunCtx};

use crate::transport::{Output, TransportError};

/// How much of a host's output an error message quotes.
pub const ERROR_OUTPUT_CHARS: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum PrimitiveError {
    /// Boxed: transport errors are large and every primitive returns this type.
    #[error(transparent)]
    Transport(Box<TransportError>),
    /// A command on the host failed; `output` is what it printed, cut to a sane size.
    #[error("{host}: {step} failed (exit {code}): {output}")]
    Failed {
        host: String,
        step: String,
        code: i32,
        output: String,
    },
    /// Input refused before it reached a command line.
    #[error("{step}: refused {what} {value:?}: {reason}")]
    Refused {
        step: String,
        what: String,
        value: String,
        reason: String,
    },
    #[error("{host}: verify failed: {package} is {found}, expected {expected}")]
    Verify {
        host: String,
        package: String,
        expected: String,
        found: String,
    },
    #[error("{host}: {step}: {message}")]
    Step {
        host: String,
        step: String,
        message: String,
    },
    #[error("{host}: {step}: cannot write the journal, so the step was not started: {source}")]
    Journal {
        host: String,
        step: String,
        #[source]
        source: Box<crate::journal::JournalError>,
    },
    /// Another run holds the host: the step was not started.
    #[error("{host}: {step} was not started: {source}")]
    HostBusy {
        host: String,
        step: String,
        #[source]
        source: Box<crate::journal::JournalError>,
    },
    /// The controller, not the host, could not go on: its disk is full or a
    /// backup cap was reached. The rollout stops without charging the host.
    #[error("{host}: {step} stopped on the controller, not the host: {message}")]
    Controller {
        host: String,
        step: String,
        message: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<TransportError> for PrimitiveError {
    fn from(e: TransportError) -> Self {
        PrimitiveError::Transport(Box::new(e))
    }
}

impl PrimitiveError {
    /// The host could not be connected to (see [`TransportError::is_unreachable`]).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PrimitiveError::Transport(e) if e.is_unreachable())
    }

    /// A failed command, with its stderr (or stdout) cut to [`ERROR_OUTPUT_CHARS`].
    pub fn failed(host: &str, step: &str, out: &Output) -> Self {
        let text = if out.stderr.is_empty() {
            out.stdout_str()
        } else {
            out.stderr_str()
        };
        PrimitiveError::Failed {
            host: host.to_string(),
            step: step.to_string(),
            code: out.code,
            output: cut(text.trim(), ERROR_OUTPUT_CHARS),
        }
    }

    pub fn step(host: &str, step: &str, message: impl Into<String>) -> Self {
        PrimitiveError::Step {
            host: host.to_string(),
            step: step.to_string(),
            message: message.into(),
        }
    }
}

/// `text` cut to at most `max` characters, marking the cut.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((at, _)) => format!("{}… [{} more bytes cut]", &text[..at], text.len() - at),
    }
}
