//! Editor definitions: `patchbook docs --out DIR` writes Rhai definition files
//! (`.d.rhai`) for every primitive and custom type a playbook can use, with the doc
//! comments they were registered with.
//!
//! The engine is built exactly like a run's engine, only without a session, so a
//! primitive registered for runs cannot be missing here. This file writes files
//! under the folder it is given and nothing else.

use std::path::{Path, PathBuf};

use super::{Limits, ScriptRun};

/// The file holding patchbook's own functions and types (rhai's name for the
/// global namespace).
pub const PRIMITIVES_FILE: &str = "__static__.d.rhai";

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write definitions into {dir}: {source}; check that the folder is writable")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An engine with every primitive registered, as `run` and `plan` build it
/// (`rollout`, `window` and `var` included), with no session behind it.
pub fn run_engine(limits: &Limits) -> ScriptRun {
    let mut run = ScriptRun::new(limits, None);
    super::rollout::register_rollout(run.engine_mut(), None, None);
    run
}

/// The definition files for `run`'s engine, as `(file name, content)` pairs.
pub fn definitions(run: &ScriptRun) -> Vec<(String, String)> {
    run.engine()
        .definitions()
        .with_headers(true)
        .iter_files()
        .collect()
}

/// Writes the definition files into `dir` (created if needed); returns their paths.
pub fn write(dir: &Path, limits: &Limits) -> Result<Vec<PathBuf>, DocsError> {
    let err = |source| DocsError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let run = run_engine(limits);
    let mut written = Vec::new();
    for (name, content) in definitions(&run) {
        let path = dir.join(&name);
        std::fs::write(&path, content).map_err(err)?;
        written.push(path);
    }
    Ok(written)
}
