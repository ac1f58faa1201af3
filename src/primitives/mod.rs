//! The primitives: typed Rust functions that do the work of a playbook —
//! facts, version comparison, artifacts, backup, deploy, verify, health, rollback,
//! notify, exec.
//!
//! Each one is a plain function testable without Rhai; the `script` layer adapts
//! them. A primitive that changes a host writes its intent to the journal before
//! acting and its outcome, with the undo step, after. Primitives must not know Rhai.

pub mod exec;

use crate::transport::TransportError;

/// Most characters of host output quoted in an error message.
pub const OUTPUT_IN_ERRORS: usize = 2000;

/// Why a primitive failed. Every variant names the host and the step, and quotes
/// host output cut to [`OUTPUT_IN_ERRORS`] characters.
#[derive(Debug, thiserror::Error)]
pub enum PrimitiveError {
    /// The transport's message already names the host.
    #[error("{step}: {source}")]
    Transport {
        host: String,
        step: String,
        #[source]
        source: Box<TransportError>,
    },
    #[error("{host}: {step} failed: {message}{}", if output.is_empty() { String::new() } else { format!("\nhost output:\n{output}") })]
    Failed {
        host: String,
        step: String,
        message: String,
        /// Host output, already cut with [`cut`].
        output: String,
    },
    #[error("{host}: {step}: {message}")]
    Invalid {
        host: String,
        step: String,
        message: String,
    },
}

impl PrimitiveError {
    /// A transport failure during `step` on `host`.
    pub fn transport(host: impl Into<String>, step: impl Into<String>, e: TransportError) -> Self {
        PrimitiveError::Transport {
            host: host.into(),
            step: step.into(),
            source: Box::new(e),
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
