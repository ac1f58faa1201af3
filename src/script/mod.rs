//! The script layer: the sandboxed Rhai engine, module resolution, the registration
//! of primitives, compiled playbook versions, and error rendering with positions.
//!
//! It adapts typed primitives to Rhai and owns nothing else: it must not open
//! sockets, files or processes itself.

pub mod diagnostics;
pub mod docs;
pub mod engine;
pub mod lint;
pub mod patch;
pub mod playbook;
pub mod register;
pub mod resolver;
pub mod rollout;
pub mod session;

use std::path::PathBuf;

use serde::Deserialize;

pub use diagnostics::{Diagnostic, Frame, Location, SourceMap};
pub use engine::{sandbox, CallGuard};
pub use patch::{ScriptArtifact, ScriptBackup};
pub use playbook::{
    run_per_host, to_json, CompiledPlaybook, Compiler, HostClosure, HostResult, ScriptRun, HOST_VAR,
};
pub use register::ScriptHost;
pub use resolver::{ImportError, LibraryResolver};
pub use session::Session;

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

/// Sandbox limits, `[limits]` in `patchbook.toml`. Every one is set: Rhai's own
/// defaults are "unlimited".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_function_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    pub max_variables: usize,
    pub max_modules: usize,
    /// Wall-clock deadline for one call into a script, in seconds.
    pub deadline_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 50_000_000,
            max_call_levels: 64,
            max_expr_depth: 64,
            max_function_expr_depth: 32,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_variables: 1_000,
            max_modules: 100,
            deadline_secs: 3600,
        }
    }
}
