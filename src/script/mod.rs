//! The script layer: the sandboxed Rhai engine, module resolution, the registration
//! of primitives, compiled playbook versions, and error rendering with positions.
//!
//! It adapts typed primitives to Rhai and owns nothing else: it must not open
//! sockets, files or processes itself.

use serde::Deserialize;

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
