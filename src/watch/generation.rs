//! Generations: every playbook and library module compiled together into one
//! immutable, numbered set. A reload builds a candidate from what is on disk now;
//! it goes live only when every file compiled and every schedule parsed, otherwise
//! the errors are kept and the previous generation stays live.
//!
//! Every playbook is compiled again on each reload (compiling is ~1 ms a file), so
//! a changed module always reaches every playbook that imports it, and library
//! modules are also compiled on their own so an error in a module nobody imports
//! yet still shows. A content hash over every input lets a save that changes
//! nothing skip the compile.
//!
//! This module reads `.rhai` files under the watched folders and nothing else; it
//! must not start runs or know about the file watcher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::files::ignored_name;
use super::schedule::{discover, Schedule};
use crate::script::resolver::sha256_hex;
use crate::script::{CompiledPlaybook, Compiler, ScriptError};

/// What a generation is built from: the playbook folder and the import roots.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub playbook_dir: PathBuf,
    pub compiler: Compiler,
}

impl Inputs {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Inputs {
            playbook_dir: cfg.playbook_dir(),
            compiler: Compiler::from_config(cfg),
        }
    }

    /// Every folder to watch: the playbook folder, then the stdlib and library roots.
    pub fn folders(&self) -> Vec<PathBuf> {
        let mut v = vec![self.playbook_dir.clone()];
        for r in self.compiler.roots() {
            if !v.contains(r) {
                v.push(r.clone());
            }
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Playbook,
    Module,
}

/// One input file as read for a generation.
#[derive(Debug, Clone, Serialize)]
pub struct FileVersion {
    pub path: PathBuf,
    pub kind: FileKind,
    pub sha256: String,
    #[serde(skip)]
    pub text: Arc<str>,
}

/// The inputs as they are on disk now, with their combined hash.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub files: Vec<FileVersion>,
    pub input_hash: String,
}

/// One live (or candidate) set of compiled playbooks.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub created: DateTime<Utc>,
    pub input_hash: String,
    pub files: Vec<FileVersion>,
    /// By name: the path under the playbook folder without `.rhai` (`nightly`, `team/db`).
    pub playbooks: BTreeMap<String, Arc<CompiledPlaybook>>,
    pub schedules: BTreeMap<String, Vec<Schedule>>,
}

/// One file's compile error, kept for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct FileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The full rendering: message, position, source frame, call chain.
    pub message: String,
}

impl FileError {
    fn from_script(file: &Path, e: &ScriptError) -> Self {
        let loc = e.diagnostic().and_then(|d| d.location.clone());
        FileError {
            file: loc
                .as_ref()
                .map(|l| l.file.clone())
                .unwrap_or_else(|| file.display().to_string()),
            line: loc.as_ref().map(|l| l.line),
            column: loc.as_ref().map(|l| l.column),
            message: e.to_string(),
        }
    }

    fn plain(file: &Path, message: String) -> Self {
        FileError {
            file: file.display().to_string(),
            line: None,
            column: None,
            message,
        }
    }
}

/// Reads every input. A missing library folder is no input; a missing playbook
/// folder is an error, because nothing could ever run.
pub fn snapshot(inputs: &Inputs) -> Result<Snapshot, FileError> {
    let mut files = Vec::new();
    if !inputs.playbook_dir.is_dir() {
        return Err(FileError::plain(
            &inputs.playbook_dir,
            format!(
                "playbook folder {} does not exist; create it or set `playbooks` in patchbook.toml",
                inputs.playbook_dir.display()
            ),
        ));
    }
    let mut seen = Vec::new();
    for (dir, kind) in std::iter::once((&inputs.playbook_dir, FileKind::Playbook)).chain(
        inputs
            .compiler
            .roots()
            .iter()
            .map(|r| (r, FileKind::Module)),
    ) {
        if !dir.is_dir() || seen.contains(dir) {
            continue;
        }
        seen.push(dir.clone());
        let mut paths = Vec::new();
        let root = std::fs::canonicalize(dir)
            .map_err(|e| FileError::plain(dir, format!("cannot list {}: {e}", dir.display())))?;
        collect(&root, dir, &mut paths)?;
        for path in paths {
            let text: Arc<str> = match std::fs::read_to_string(&path) {
                Ok(t) => t.into(),
                // Deleted between listing and reading: the next event reloads again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(FileError::plain(
                        &path,
                        format!("cannot read {}: {e}", path.display()),
                    ))
                }
            };
            files.push(FileVersion {
                sha256: sha256_hex(text.as_bytes()),
                path,
                kind,
                text,
            });
        }
    }
    let mut all = String::new();
    for f in &files {
        all.push_str(&format!(
            "{:?}\0{}\0{}\n",
            f.kind,
            f.path.display(),
            f.sha256
        ));
    }
    Ok(Snapshot {
        input_hash: sha256_hex(all.as_bytes()),
        files,
    })
}

/// Every `.rhai` file under `dir`, sorted, skipping hidden entries and editor files.
///
/// A symlink is followed only when it resolves inside `root` (the canonical
/// playbook or library folder). One that leads outside is an error naming the
/// link, never its target's content: the compiler's messages quote source lines,
/// and the status page shows them, so `x.rhai -> /etc/shadow` would otherwise
/// publish a line of that file.
fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FileError> {
    let list_err =
        |e: std::io::Error| FileError::plain(dir, format!("cannot list {}: {e}", dir.display()));
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(list_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || ignored_name(name) {
            continue;
        }
        let is_link = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            let inside = std::fs::canonicalize(&p).is_ok_and(|t| t.starts_with(root));
            if !inside {
                return Err(FileError::plain(
                    &p,
                    format!(
                        "{} is a symlink that leads outside {} (or nowhere); patchbook only reads \
                         files inside its folders: copy the file in, or remove the link",
                        p.display(),
                        root.display()
                    ),
                ));
            }
        }
        if p.is_dir() {
            collect(root, &p, out)?;
        } else if p.extension().is_some_and(|e| e == "rhai") {
            out.push(p);
        }
    }
    Ok(())
}

/// The name a playbook is triggered by: its path under the playbook folder,
/// without `.rhai`.
pub fn playbook_name(playbook_dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(playbook_dir).unwrap_or(path);
    let s = rel.with_extension("").to_string_lossy().replace('\\', "/");
    s.trim_start_matches('/').to_string()
}

/// Compiles a snapshot. `Ok` holds a generation numbered `number`; `Err` every
/// file's error, so one reload reports them all.
pub fn compile(
    inputs: &Inputs,
    snap: Snapshot,
    number: u64,
    created: DateTime<Utc>,
) -> Result<Generation, Vec<FileError>> {
    let mut errors = Vec::new();
    let mut playbooks = BTreeMap::new();
    let mut schedules = BTreeMap::new();
    for f in &snap.files {
        let display = f.path.display().to_string();
        let compiled = inputs.compiler.compile_source(&display, &f.text, &[]);
        match (f.kind, compiled) {
            (_, Err(e)) => errors.push(FileError::from_script(&f.path, &e)),
            (FileKind::Module, Ok(_)) => {}
            (FileKind::Playbook, Ok(pb)) => {
                let name = playbook_name(&inputs.playbook_dir, &f.path);
                match discover(&pb.ast, &display) {
                    Ok(s) if s.is_empty() => {}
                    Ok(s) => {
                        schedules.insert(name.clone(), s);
                    }
                    Err(e) => errors.push(FileError {
                        file: e.file.clone(),
                        line: Some(e.line),
                        column: Some(e.column),
                        message: e.to_string(),
                    }),
                }
                playbooks.insert(name, Arc::new(pb));
            }
        }
    }
    if !errors.is_empty() {
        // A broken module fails every playbook importing it too: report it once.
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert((e.file.clone(), e.line, e.column)));
        return Err(errors);
    }
    Ok(Generation {
        number,
        created,
        input_hash: snap.input_hash,
        files: snap.files,
        playbooks,
        schedules,
    })
}
