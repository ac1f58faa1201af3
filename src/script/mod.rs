//! The script layer: the sandboxed Rhai engine, module resolution, the registration
//! of primitives, compiled playbook versions, and error rendering with positions.
//!
//! It adapts typed primitives to Rhai and owns nothing else: it must not open
//! sockets, files or processes itself.

pub mod advisory;
pub mod builtin;
pub mod diagnostics;
pub mod docs;
pub mod engine;
pub mod files;
pub mod lint;
pub mod memory;
pub mod monitor;
pub mod patch;
pub mod playbook;
pub mod register;
pub mod resolver;
pub mod rollout;
pub mod services;
pub mod soak;
pub mod upgrade;

use std::path::PathBuf;

pub use crate::config::Limits;
pub use diagnostics::{Diagnostic, Frame, Location, SourceMap};
pub use engine::{sandbox, CallGuard};
pub use patch::{ScriptArtifact, ScriptBackup};
pub use playbook::{
    run_per_host, run_per_host_in, to_json, CompiledPlaybook, Compiler, HostClosure, HostResult,
    ScriptRun, HOST_VAR,
};
pub use register::ScriptHost;
pub use resolver::{ImportError, LibraryResolver};

/// Why a script did not compile or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read script {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A compile or run error, rendered with its position and call chain.
    #[error("{0}")]
    Script(Box<Diagnostic>),
}

impl ScriptError {
    /// The rendered diagnostic, when the error came from a script.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ScriptError::Script(d) => Some(d),
            ScriptError::Read { .. } => None,
        }
    }
}
