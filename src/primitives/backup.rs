//! Backups and restores. A backup streams a tar of paths from the host into the
//! controller's store (`<state>/backups/<run>/<host>/`), never onto the host being
//! patched; a manifest holds the archive's SHA-256, and the archive is re-read and
//! checked after writing. A restore validates every entry on the controller before
//! anything reaches the host.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{RestoreInput, StepResult};
use crate::journal::Entry;
use crate::transport::Command;

/// What `backup` returns and `restore` takes; also recorded in the journal, which is
/// where undo steps find it again. The record format is the journal's.
pub use crate::journal::entry::BackupHandle;

/// Kind of the journal record a backup writes.
pub const RECORD_KIND: &str = crate::journal::kind::BACKUP;

impl BackupHandle {
    /// How an undo step names this backup.
    pub fn as_ref_for_undo(&self) -> crate::journal::BackupRef {
        crate::journal::BackupRef {
            id: self.id.clone(),
            archive: self.archive.clone(),
            sha256: self.sha256.clone(),
            paths: self.paths.clone(),
        }
    }
}

/// A path accepted for backup: absolute, normal components only, no control bytes.
fn check_path(p: &str) -> Result<String, PrimitiveError> {
    let refuse = |reason: &str| PrimitiveError::Refused {
        step: "backup".into(),
        what: "path".into(),
        value: cut(p, 80),
        reason: reason.into(),
    };
    if p.len() > 4096 || p.chars().any(|c| c.is_control()) {
        return Err(refuse(
            "paths have no control characters and are at most 4096 bytes",
        ));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(refuse("backup paths must be absolute"));
    }
    let rel: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(Ok(s.to_string_lossy().into_owned())),
            Component::RootDir | Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, _>>()
        .map_err(|_| refuse("`..` is not allowed in backup paths"))?;
    if rel.is_empty() {
        return Err(refuse("refusing to back up `/` as a whole"));
    }
    Ok(rel.join("/"))
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Hashes what passes through on its way out of a file.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// What one read of an archive on the controller found: its SHA-256 and size, and
/// whether every entry passed [`check_archive`]'s rules for `roots`.
struct ReadBack {
    sha256: String,
    size: u64,
    entries: Result<(), String>,
}

/// Reads an archive once, hashing every byte and checking every entry on the way,
/// so a backup or restore opens and reads it one time rather than twice.
fn read_back(archive: &Path, roots: &[String]) -> std::io::Result<ReadBack> {
    let mut reader = HashingReader {
        inner: BufReader::with_capacity(64 * 1024, File::open(archive)?),
        hash: Sha256::new(),
        len: 0,
    };
    let entries = check_entries(&mut reader, archive, roots);
    // The tar reader stops at the end-of-archive marker: hash whatever follows too.
    std::io::copy(&mut reader, &mut std::io::sink())?;
    Ok(ReadBack {
        sha256: hex::encode(reader.hash.finalize()),
        size: reader.len,
        entries,
    })
}

/// Hashes what passes through on its way to the file.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams a tar of `paths` from the host into the backup store and checks it.
pub fn backup(ctx: &HostCtx, paths: &[String]) -> Result<BackupHandle, PrimitiveError> {
    let rel: Vec<String> = paths
        .iter()
        .map(|p| check_path(p))
        .collect::<Result<_, _>>()?;
    if rel.is_empty() {
        return Err(PrimitiveError::step(ctx.name(), "backup", "no paths given"));
    }
    if ctx.planning() {
        ctx.plan_check(
            "backup",
            format!("tar {} to the controller", paths.join(", ")),
            "ok",
        );
        return Ok(BackupHandle {
            id: "planned".into(),
            host: ctx.name().to_string(),
            paths: paths.to_vec(),
            archive: PathBuf::new(),
            sha256: String::new(),
            size: 0,
            missing: Vec::new(),
        });
    }
    let dir = ctx
        .run
        .state_dir
        .join("backups")
        .join(safe_name(&ctx.run.run_id))
        .join(safe_name(ctx.name()));
    let io = |context: String| move |source| PrimitiveError::Io { context, source };
    // Backups hold the hosts' secrets: 0700 folders, 0600 archives, whatever the umask.
    crate::journal::private::create_dir_all(&dir)
        .map_err(io(format!("create {}", dir.display())))?;
    // The first free number names the backup; `create_new` claims it, so two
    // backups of one host never share an archive.
    let (id, archive, file) = {
        let mut k = 1u32;
        loop {
            let id = format!("b{k:03}");
            let archive = dir.join(format!("{id}.tar"));
            match crate::journal::private::options()
                .write(true)
                .create_new(true)
                .open(&archive)
            {
                Ok(f) => {
                    crate::journal::private::seal(&f)
                        .map_err(io(format!("chmod {}", archive.display())))?;
                    break (id, archive, f);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 100_000 => k += 1,
                Err(e) => return Err(io(format!("create {}", archive.display()))(e)),
            }
        }
    };
    let mut argv: Vec<String> = [
        "tar",
        "-cf",
        "-",
        "--numeric-owner",
        "--ignore-failed-read",
        "-C",
        "/",
        "--",
    ]
    .map(String::from)
    .to_vec();
    argv.extend(rel.iter().cloned());
    let mut sink = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
        len: 0,
    };
    let out = ctx.transport.run_to_writer(
        &Command::new(argv).timeout(ctx.timeout(Duration::from_secs(3600))),
        &mut sink,
    )?;
    sink.flush()
        .map_err(io(format!("write {}", archive.display())))?;
    let sha256 = hex::encode(sink.hash.clone().finalize());
    let size = sink.len;
    if let Ok(f) = sink.inner.into_inner() {
        f.sync_all()
            .map_err(io(format!("fsync {}", archive.display())))?;
    }
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), "backup", &out));
    }
    // tar warns "Cannot stat" for a path that does not exist; it is recorded, not fatal.
    let stderr = out.stderr_str();
    let missing: Vec<String> = paths
        .iter()
        .zip(&rel)
        .filter(|(_, r)| stderr.contains(&format!("{r}: Warning: Cannot stat")))
        .map(|(p, _)| p.clone())
        .collect();
    let handle = BackupHandle {
        id,
        host: ctx.name().to_string(),
        paths: paths.to_vec(),
        archive,
        sha256,
        size,
        missing,
    };
    let manifest = handle.archive.with_extension("manifest.json");
    crate::journal::private::write(
        &manifest,
        serde_json::to_vec_pretty(&handle).unwrap_or_default(),
    )
    .map_err(io(format!("write {}", manifest.display())))?;
    // Re-read what landed on disk: a backup that cannot be read back is no backup.
    let again = read_back(&handle.archive, &rel)
        .map_err(io(format!("re-read {}", handle.archive.display())))?;
    if again.sha256 != handle.sha256 || again.size != handle.size {
        return Err(PrimitiveError::step(
            ctx.name(),
            "backup",
            format!(
                "archive {} reads back as {}, written as {}",
                handle.archive.display(),
                again.sha256,
                handle.sha256
            ),
        ));
    }
    again
        .entries
        .map_err(|m| PrimitiveError::step(ctx.name(), "backup", m))?;
    ctx.record("backup", Entry::Backup(handle.clone()))?;
    Ok(handle)
}

/// Validates every entry of an archive: relative names without `..`, inside one of
/// `roots`, no links leaving the root, nothing written through a link, only files,
/// folders and links.
pub fn check_archive(archive: &Path, roots: &[String]) -> Result<(), String> {
    let f = File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    check_entries(BufReader::new(f), archive, roots)
}

/// [`check_archive`] over an archive's bytes as they are read; `archive` names it
/// in messages.
fn check_entries(reader: impl Read, archive: &Path, roots: &[String]) -> Result<(), String> {
    let mut ar = tar::Archive::new(reader);
    let mut links: Vec<PathBuf> = Vec::new();
    let entries = ar
        .entries()
        .map_err(|e| format!("read {}: {e}", archive.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", archive.display()))?;
        let name = entry
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .into_owned();
        let shown = name.display().to_string();
        let normal = name
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !normal {
            return Err(format!("entry `{shown}` is absolute or contains `..`"));
        }
        let under_root = roots.iter().any(|r| name.starts_with(r));
        if !under_root {
            return Err(format!("entry `{shown}` is outside the backed-up paths"));
        }
        if links.iter().any(|l| name.starts_with(l) && name != *l) {
            return Err(format!("entry `{shown}` would be written through a link"));
        }
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular
            | T::Directory
            | T::Continuous
            | T::GNULongName
            | T::XHeader
            | T::XGlobalHeader => {}
            T::Symlink | T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("entry `{shown}`: bad link target: {e}"))?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let base = if entry.header().entry_type() == T::Link {
                    PathBuf::new()
                } else {
                    name.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                if !stays_inside(&base, &target) {
                    return Err(format!(
                        "link `{shown}` -> `{}` leaves the root",
                        target.display()
                    ));
                }
                links.push(name.clone());
            }
            other => {
                return Err(format!(
                    "entry `{shown}` has type {other:?}, which restore does not write"
                ))
            }
        }
    }
    Ok(())
}

/// Whether `target`, taken from folder `base`, stays inside the archive's root.
fn stays_inside(base: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = base
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count() as i64;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Puts a backup back: checks the manifest hash and every entry on the controller,
/// uploads to a private temp folder on the host, and extracts over `/`.
pub fn restore(ctx: &HostCtx, handle: &crate::journal::BackupRef) -> Result<(), PrimitiveError> {
    let rel: Vec<String> = handle
        .paths
        .iter()
        .map(|p| check_path(p))
        .collect::<Result<_, _>>()?;
    let again = read_back(&handle.archive, &rel).map_err(|source| PrimitiveError::Io {
        context: format!("read backup {}", handle.archive.display()),
        source,
    })?;
    let sha = again.sha256;
    if sha != handle.sha256 {
        return Err(PrimitiveError::step(
            ctx.name(),
            "restore",
            format!(
                "backup {} changed since it was taken: sha256 {sha}, manifest {}",
                handle.archive.display(),
                handle.sha256
            ),
        ));
    }
    again
        .entries
        .map_err(|m| PrimitiveError::step(ctx.name(), "restore", format!("refused: {m}")))?;
    if ctx.planning() {
        ctx.plan(
            "restore",
            format!("restore {} ({})", handle.id, handle.paths.join(", ")),
            "unknown",
        );
        return Ok(());
    }
    let intent = ctx.intent(
        "restore",
        &RestoreInput {
            backup: handle.clone(),
        },
    )?;
    let result = (|| {
        let tmp = private_tmpdir(ctx, "restore")?;
        let remote = format!("{tmp}/backup.tar");
        let put = ctx.transport.put(&handle.archive, &remote, 0o600);
        let out = put.and_then(|_| {
            ctx.transport.run(
                &Command::new(["tar", "-xpf", &remote, "--numeric-owner", "-C", "/"])
                    .timeout(ctx.timeout(Duration::from_secs(3600))),
            )
        });
        let _ = ctx
            .transport
            .run(&Command::new(["rm", "-rf", "--", &tmp]).timeout(Duration::from_secs(60)));
        let out = out?;
        if !out.success() {
            return Err(PrimitiveError::failed(ctx.name(), "restore", &out));
        }
        Ok(())
    })();
    ctx.outcome(
        "restore",
        intent,
        result.is_ok(),
        &StepResult {
            undo: None,
            error: result.as_ref().err().map(|e| e.to_string()),
        },
        None,
    )?;
    result
}

/// A fresh folder on the host with mode 0700 that did not exist before, so that
/// no pre-existing path can be reused (see [`Transport::private_dir`]).
///
/// [`Transport::private_dir`]: crate::transport::Transport::private_dir
pub fn private_tmpdir(ctx: &HostCtx, step: &str) -> Result<String, PrimitiveError> {
    let dir = ctx.transport.private_dir()?;
    if !dir.starts_with("/tmp/patchbook.") || dir.contains(char::is_whitespace) {
        return Err(PrimitiveError::step(
            ctx.name(),
            step,
            format!("the host returned an unexpected staging folder {dir:?}"),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_with(entries: &[(&str, tar::EntryType, Option<&str>)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(0);
            h.set_mode(0o644);
            // Bypass the builder's own path checks: a hostile archive would.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn accepts_plain_entries() {
        let a = archive_with(&[
            ("opt/acme/", tar::EntryType::Directory, None),
            ("opt/acme/x", tar::EntryType::Regular, None),
        ]);
        assert_eq!(check_archive(a.path(), &["opt/acme".into()]), Ok(()));
    }

    #[test]
    fn refuses_dotdot_and_absolute_names() {
        let a = archive_with(&[("opt/acme/../../etc/passwd", tar::EntryType::Regular, None)]);
        assert!(check_archive(a.path(), &["opt/acme".into()])
            .unwrap_err()
            .contains(".."));
        let b = archive_with(&[("/etc/passwd", tar::EntryType::Regular, None)]);
        assert!(check_archive(b.path(), &["opt/acme".into()]).is_err());
    }

    #[test]
    fn refuses_links_leaving_the_root_and_writes_through_links() {
        let a = archive_with(&[("opt/acme/l", tar::EntryType::Symlink, Some("../../../etc"))]);
        assert!(check_archive(a.path(), &["opt/acme".into()])
            .unwrap_err()
            .contains("leaves the root"));
        let b = archive_with(&[
            ("opt/acme/l", tar::EntryType::Symlink, Some("sub")),
            ("opt/acme/l/x", tar::EntryType::Regular, None),
        ]);
        assert!(check_archive(b.path(), &["opt/acme".into()])
            .unwrap_err()
            .contains("through a link"));
    }

    #[test]
    fn refuses_entries_outside_backed_up_paths() {
        let a = archive_with(&[("etc/shadow", tar::EntryType::Regular, None)]);
        assert!(check_archive(a.path(), &["opt/acme".into()]).is_err());
    }

    #[test]
    fn path_checks() {
        assert_eq!(check_path("/opt/acme").unwrap(), "opt/acme");
        assert!(check_path("opt/acme").is_err());
        assert!(check_path("/opt/../etc").is_err());
        assert!(check_path("/").is_err());
        assert!(check_path("/opt/a\nb").is_err());
    }
}
