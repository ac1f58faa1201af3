//! Private files and folders under the state directory: everything patchbook keeps
//! there (journals, the audit index, locks, backups of hosts' files, the artifact
//! cache, kept file copies) is created 0700 (folders) / 0600 (files) whatever the
//! process umask, because backups hold the hosts' secrets (`/etc/shadow`, keys).
//!
//! This module owns those modes: the helpers that create state, and the check
//! [`loose_paths`] behind `audit verify`'s warning. It must not decide where
//! anything lives (each owner names its own paths) and never loosens a mode, nor
//! tightens one it did not create: an existing folder the operator chose keeps its
//! mode, and the audit names it instead.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every folder patchbook creates in the state directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file patchbook creates in the state directory.
pub const FILE_MODE: u32 = 0o600;

/// `create_dir_all` with every folder it creates at 0700. The mode is set again
/// after creation because `mkdir`'s mode is filtered by the umask, and a umask such
/// as 0277 would otherwise leave a folder its owner cannot write.
pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    // Create missing ancestors one by one, so each of them gets the mode too.
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    for dir in missing.iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))?,
            // Another process created it between the check and here: not ours to chmod.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Open options that create files 0600. Callers add read/write/append/create flags.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// After opening with [`options`]: makes sure a file this process just created is
/// 0600 even under an unusual umask (`open`'s mode is filtered by it too).
pub fn seal(file: &File) -> std::io::Result<()> {
    file.set_permissions(Permissions::from_mode(FILE_MODE))
}

/// Writes a whole file created (or truncated) at 0600.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut f = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    seal(&f)?;
    f.write_all(bytes.as_ref())
}

/// Makes an existing file 0600, e.g. one another component (a transport's
/// download, a temp file library) wrote with its own mode.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))
}

/// One path whose mode lets other users in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoosePath {
    pub path: PathBuf,
    pub mode: u32,
    pub is_dir: bool,
}

impl std::fmt::Display for LoosePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let want = if self.is_dir { DIR_MODE } else { FILE_MODE };
        write!(
            f,
            "{} is mode {:04o}, readable by other users; run `chmod {:o} {}` (patchbook creates {:04o})",
            self.path.display(),
            self.mode,
            want,
            self.path.display(),
            want
        )
    }
}

/// Every path under `state_dir` (itself included) that group or others may read,
/// write or enter. Symlinks are reported by their own entry and not followed:
/// their target is outside what patchbook owns. Unreadable folders are skipped
/// (the audit reports what it cannot read on its own).
pub fn loose_paths(state_dir: &Path) -> Vec<LoosePath> {
    let mut out = Vec::new();
    let mut stack = vec![state_dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        // The control socket is 0600 by its own code; sockets' modes are the same check.
        if mode & 0o077 != 0 {
            out.push(LoosePath {
                path: p.clone(),
                mode,
                is_dir: meta.is_dir(),
            });
        }
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                let mut children: Vec<PathBuf> =
                    rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                // Reverse so the stack pops them in name order: stable output.
                children.sort();
                children.reverse();
                stack.extend(children);
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn helpers_create_private_paths_and_the_check_finds_loose_ones() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("a/b/state");
        create_dir_all(&state.join("runs")).unwrap();
        for d in ["a", "a/b", "a/b/state", "a/b/state/runs"] {
            assert_eq!(mode(&root.path().join(d)), 0o700, "{d}");
        }
        write(&state.join("runs/x.jsonl"), b"{}").unwrap();
        assert_eq!(mode(&state.join("runs/x.jsonl")), 0o600);
        assert!(loose_paths(&state).is_empty());
        std::fs::set_permissions(state.join("runs"), Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(state.join("runs/x.jsonl"), Permissions::from_mode(0o644))
            .unwrap();
        let loose = loose_paths(&state);
        assert_eq!(loose.len(), 2, "{loose:?}");
        assert!(loose[0].to_string().contains("chmod 700"), "{}", loose[0]);
        assert!(loose[1].to_string().contains("0644"), "{}", loose[1]);
    }
}
