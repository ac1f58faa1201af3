//! Backups and restores. A backup streams a tar of paths from the host into the
//! controller's store (`<state>/backups/<run>/<host>/`), never onto the host being
//! patched; a manifest holds the archive's SHA-256, and the archive is re-read and
//! checked after writing. A restore validates every entry on the controller and
//! sends the host a fresh archive rebuilt from the checked entries, never the
//! stored one. This module must not touch the host outside the backed-up paths,
//! nor keep anything of a backup that failed.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{BackupStopCause, BackupStopped, RestoreInput, StepResult};
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

/// Default `[backup] max_per_host`: 1 GiB.
pub const DEFAULT_MAX_PER_HOST: u64 = 1 << 30;
/// Default `[backup] max_per_run`: 10 GiB.
pub const DEFAULT_MAX_PER_RUN: u64 = 10 << 30;
/// Default `[backup] min_free`: 256 MiB left free for the journal and the system.
pub const DEFAULT_MIN_FREE: u64 = 256 << 20;
/// Most bytes a backup writes between two free-space checks.
const FREE_CHECK_EVERY: u64 = 1 << 20;
/// Fewest bytes between two checks, however close to the margin.
const FREE_CHECK_MIN: u64 = 32 << 10;

/// Bytes to write before the next free-space check: half the headroom above the
/// margin, so the checks come closer together as the disk fills and the stream
/// stops before the margin is gone rather than one interval too late.
fn next_free_check(free: u64, min_free: u64) -> u64 {
    (free.saturating_sub(min_free) / 2).clamp(FREE_CHECK_MIN, FREE_CHECK_EVERY)
}

/// How much backups may write to the controller's disk, from `[backup]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupLimits {
    pub max_per_host: u64,
    pub max_per_run: u64,
    pub min_free: u64,
}

impl Default for BackupLimits {
    fn default() -> Self {
        BackupLimits {
            max_per_host: DEFAULT_MAX_PER_HOST,
            max_per_run: DEFAULT_MAX_PER_RUN,
            min_free: DEFAULT_MIN_FREE,
        }
    }
}

impl BackupLimits {
    pub fn from_config(c: &crate::config::BackupConfig) -> Self {
        let d = BackupLimits::default();
        BackupLimits {
            max_per_host: c.max_per_host.map_or(d.max_per_host, |b| b.0),
            max_per_run: c.max_per_run.map_or(d.max_per_run, |b| b.0),
            min_free: c.min_free.map_or(d.min_free, |b| b.0),
        }
    }
}

/// What one run's backups hold on the controller, per host and in all. Bytes of
/// a backup that failed are given back when its partial archive is removed.
#[derive(Debug, Default)]
pub struct BackupUsage {
    per_host: Mutex<HashMap<String, u64>>,
    run: AtomicU64,
}

impl BackupUsage {
    fn host(&self, host: &str) -> u64 {
        self.per_host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
            .unwrap_or(0)
    }

    fn add_host(&self, host: &str, bytes: u64) {
        *self
            .per_host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default() += bytes;
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`
/// (root's reserved blocks are not counted: the margin is for everyone).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// ENOSPC or EDQUOT: the controller's disk, not the host, is the problem.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The archive file on its way to disk: hashes and counts every byte, and stops
/// the stream (an error the transport passes on) at a cap, below the free-space
/// margin, or on a full disk, saying which in `stop`.
struct GuardedWriter<'a, W> {
    inner: W,
    hash: Sha256,
    len: u64,
    dir: &'a Path,
    limits: BackupLimits,
    /// What this host's earlier backups of the run hold.
    host_before: u64,
    run_total: &'a AtomicU64,
    /// Bytes still to write before the next free-space check.
    until_check: u64,
    stop: &'a Cell<Option<BackupStopCause>>,
}

impl<W: Write> GuardedWriter<'_, W> {
    fn refuse(&self, cause: BackupStopCause) -> std::io::Error {
        let e = std::io::Error::other(cause.to_string());
        self.stop.set(Some(cause));
        e
    }
}

impl<W: Write> Write for GuardedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len() as u64;
        if self.host_before + self.len + n > self.limits.max_per_host {
            return Err(self.refuse(BackupStopCause::HostCap {
                limit: self.limits.max_per_host,
            }));
        }
        // Claimed before writing, so parallel hosts never pass the run cap together.
        if self.run_total.fetch_add(n, Ordering::SeqCst) + n > self.limits.max_per_run {
            self.run_total.fetch_sub(n, Ordering::SeqCst);
            return Err(self.refuse(BackupStopCause::RunCap {
                limit: self.limits.max_per_run,
            }));
        }
        self.until_check = self.until_check.saturating_sub(n);
        if self.until_check == 0 {
            // A failed statvfs checks again soon; the write's own ENOSPC still stops it.
            let free = free_bytes(self.dir);
            self.until_check = FREE_CHECK_MIN;
            if let Ok(free) = free {
                self.until_check = next_free_check(free, self.limits.min_free);
                if free < self.limits.min_free {
                    self.run_total.fetch_sub(n, Ordering::SeqCst);
                    return Err(self.refuse(BackupStopCause::LowSpace {
                        free,
                        min_free: self.limits.min_free,
                    }));
                }
            }
        }
        match self.inner.write(buf) {
            Ok(w) => {
                self.run_total.fetch_sub(n - w as u64, Ordering::SeqCst);
                self.hash.update(&buf[..w]);
                self.len += w as u64;
                Ok(w)
            }
            Err(e) => {
                self.run_total.fetch_sub(n, Ordering::SeqCst);
                if is_disk_full(&e) {
                    self.stop.set(Some(BackupStopCause::DiskFull));
                }
                Err(e)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().inspect_err(|e| {
            if is_disk_full(e) {
                self.stop.set(Some(BackupStopCause::DiskFull));
            }
        })
    }
}

/// Streams a tar of `paths` from the host into the backup store and checks it.
///
/// The controller's disk is guarded: no start below `[backup] min_free`, a stop
/// when the host's or the run's backups reach their cap, when free space falls
/// below the margin, or on ENOSPC. Any failure removes the partial archive; a
/// controller-side stop is journaled (`backup.stopped`), noted for the rollout
/// (which stops without charging the host) and returned as
/// [`PrimitiveError::Controller`].
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
    let stop: Cell<Option<BackupStopCause>> = Cell::new(None);
    let received: Cell<u64> = Cell::new(0);
    let partial: Cell<Option<PathBuf>> = Cell::new(None);
    let result = take_backup(ctx, paths, &rel, &dir, &stop, &received, &partial);
    let Err(err) = result else {
        if let Ok(h) = &result {
            ctx.run.backup_usage.add_host(ctx.name(), h.size);
        }
        return result;
    };
    // Nothing of a failed backup stays: the partial archive would fill the disk
    // again on the next run, and a restore must never find it.
    let mut left = Vec::new();
    if let Some(archive) = partial.take() {
        for f in [archive.with_extension("manifest.json"), archive] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => left.push(format!("{} ({e})", f.display())),
            }
        }
    }
    ctx.run
        .backup_usage
        .run
        .fetch_sub(received.get(), Ordering::SeqCst);
    let Some(cause) = stop.take() else {
        return Err(err);
    };
    let removed = if left.is_empty() {
        "the partial archive was removed".to_string()
    } else {
        format!("could not remove {}: remove it by hand", left.join(", "))
    };
    let next = match cause {
        BackupStopCause::HostCap { .. } | BackupStopCause::RunCap { .. } => {
            "back up fewer paths, or raise `[backup] max_per_host` / `max_per_run` in patchbook.toml"
        }
        _ => "free space on the controller (or move the state directory), or lower `[backup] min_free` in patchbook.toml",
    };
    let message = format!(
        "{cause} while backing up {} into {} ({} bytes received; {removed}); {next}, then continue with `patchbook run --resume {}`",
        paths.join(", "),
        dir.display(),
        received.get(),
        ctx.run.run_id
    );
    // Written after the partial archive is gone, so a full disk has room again
    // for the record that says it was full.
    let journaled = ctx.record(
        "backup",
        Entry::BackupStopped(BackupStopped {
            paths: paths.to_vec(),
            cause,
            received: received.get(),
            message: message.clone(),
        }),
    );
    let message = match journaled {
        Ok(_) => message,
        Err(e) => format!("{message} (and the journal could not record it: {e})"),
    };
    ctx.run.note_controller_fault(ctx.name(), message.clone());
    Err(PrimitiveError::Controller {
        host: ctx.name().to_string(),
        step: "backup".into(),
        message,
    })
}

/// The body of [`backup`]; on failure the caller cleans up `partial` and reads
/// `stop` and `received`.
fn take_backup(
    ctx: &HostCtx,
    paths: &[String],
    rel: &[String],
    dir: &Path,
    stop: &Cell<Option<BackupStopCause>>,
    received: &Cell<u64>,
    partial: &Cell<Option<PathBuf>>,
) -> Result<BackupHandle, PrimitiveError> {
    let io = |context: String| {
        move |source: std::io::Error| {
            if is_disk_full(&source) {
                stop.set(Some(BackupStopCause::DiskFull));
            }
            PrimitiveError::Io { context, source }
        }
    };
    // Backups hold the hosts' secrets: 0700 folders, 0600 archives, whatever the umask.
    crate::journal::private::create_dir_all(dir)
        .map_err(io(format!("create {}", dir.display())))?;
    let limits = ctx.run.backup_limits;
    let free = free_bytes(dir).map_err(io(format!("check free space in {}", dir.display())))?;
    if free < limits.min_free {
        stop.set(Some(BackupStopCause::LowSpace {
            free,
            min_free: limits.min_free,
        }));
        return Err(PrimitiveError::step(ctx.name(), "backup", "not started"));
    }
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
    partial.set(Some(archive.clone()));
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
    let mut sink = GuardedWriter {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
        len: 0,
        dir,
        limits,
        host_before: ctx.run.backup_usage.host(ctx.name()),
        run_total: &ctx.run.backup_usage.run,
        until_check: next_free_check(free, limits.min_free),
        stop,
    };
    let out = ctx.transport.run_to_writer(
        &Command::new(argv).timeout(ctx.timeout(Duration::from_secs(3600))),
        &mut sink,
    );
    received.set(sink.len);
    let out = out?;
    sink.flush()
        .map_err(io(format!("write {}", archive.display())))?;
    let sha256 = hex::encode(sink.hash.clone().finalize());
    let size = sink.len;
    let file = sink
        .inner
        .into_inner()
        .map_err(|e| io(format!("write {}", archive.display()))(e.into_error()))?;
    file.sync_all()
        .map_err(io(format!("fsync {}", archive.display())))?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), "backup", &out));
    }
    // tar warns "Cannot stat" for a path that does not exist; it is recorded, not fatal.
    let stderr = out.stderr_str();
    let missing: Vec<String> = paths
        .iter()
        .zip(rel)
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
    let manifest_json = serde_json::to_vec_pretty(&handle).map_err(|e| {
        PrimitiveError::step(
            ctx.name(),
            "backup",
            format!("cannot write its manifest: {e}"),
        )
    })?;
    crate::journal::private::write(&manifest, manifest_json)
        .map_err(io(format!("write {}", manifest.display())))?;
    // Re-read what landed on disk: a backup that cannot be read back is no backup.
    let again = read_back(&handle.archive, rel)
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
/// `roots`, no links resolving outside the backed-up paths, nothing written
/// through a link, only files, folders and links, no pax sparse headers.
pub fn check_archive(archive: &Path, roots: &[String]) -> Result<(), String> {
    let f = File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    check_entries(BufReader::new(f), archive, roots)
}

/// [`check_archive`] over an archive's bytes as they are read; `archive` names it
/// in messages.
fn check_entries(reader: impl Read, archive: &Path, roots: &[String]) -> Result<(), String> {
    replay(
        reader,
        archive,
        roots,
        None::<&mut tar::Builder<std::io::Sink>>,
    )
}

/// Writes a fresh archive of exactly the entries [`check_archive`] accepts into
/// `out`: plain GNU headers built here from the checked name, type, link target,
/// mode, owner and time, and the entry's data. No header of the original archive
/// (pax records, sparse maps, long-name records) reaches the host's `tar`, so the
/// host cannot read a name the controller did not check.
pub fn rebuild_archive(archive: &Path, roots: &[String], out: &Path) -> Result<(), String> {
    let f = File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    let dst = crate::journal::private::options()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(dst));
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    replay(BufReader::new(f), archive, roots, Some(&mut builder))?;
    let w = builder
        .into_inner()
        .map_err(|e| format!("write {}: {e}", out.display()))?;
    let file = w
        .into_inner()
        .map_err(|e| format!("write {}: {}", out.display(), e.error()))?;
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", out.display()))
}

/// Reads every entry of an archive, checks it, and when `out` is given appends the
/// checked entry (and nothing else of it) to `out`. One function for both, so what
/// restore sends is by construction what the check looked at.
fn replay<W: Write>(
    reader: impl Read,
    archive: &Path,
    roots: &[String],
    mut out: Option<&mut tar::Builder<W>>,
) -> Result<(), String> {
    let mut ar = tar::Archive::new(reader);
    let mut links: Vec<PathBuf> = Vec::new();
    let entries = ar
        .entries()
        .map_err(|e| format!("read {}: {e}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("read {}: {e}", archive.display()))?;
        let raw_name = entry
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .into_owned();
        let shown = raw_name.display().to_string();
        // GNU tar reads `GNU.sparse.*` pax records (the real name, a sparse map)
        // that this reader ignores: an entry carrying them means something other
        // to the host than to the check, so it is refused outright.
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| format!("entry `{shown}`: unreadable pax header: {e}"))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| format!("entry `{shown}`: bad pax record: {e}"))?;
                let key = ext.key().unwrap_or("<not UTF-8>");
                if key.starts_with("GNU.sparse") {
                    return Err(format!(
                        "entry `{shown}` has a pax `{key}` record, which GNU tar reads as a different name or content; restore refuses sparse pax entries"
                    ));
                }
            }
        }
        let normal = raw_name
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !normal {
            return Err(format!("entry `{shown}` is absolute or contains `..`"));
        }
        // The name as the rebuilt archive carries it: `.` parts dropped.
        let name: PathBuf = raw_name.components().collect();
        if name.as_os_str().is_empty() {
            return Err(format!("entry `{shown}` names no path"));
        }
        let under_root = roots.iter().any(|r| name.starts_with(r));
        if !under_root {
            return Err(format!("entry `{shown}` is outside the backed-up paths"));
        }
        if links.iter().any(|l| name.starts_with(l) && name != *l) {
            return Err(format!("entry `{shown}` would be written through a link"));
        }
        let mut header = tar::Header::new_gnu();
        {
            let h = entry.header();
            header.set_mode(h.mode().map_err(|e| format!("entry `{shown}`: {e}"))? & 0o7777);
            header.set_uid(h.uid().map_err(|e| format!("entry `{shown}`: {e}"))?);
            header.set_gid(h.gid().map_err(|e| format!("entry `{shown}`: {e}"))?);
            header.set_mtime(h.mtime().map_err(|e| format!("entry `{shown}`: {e}"))?);
        }
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        match kind {
            T::Regular | T::Continuous | T::Directory => {
                let kind = if kind == T::Directory {
                    T::Directory
                } else {
                    T::Regular
                };
                header.set_entry_type(kind);
                header.set_size(if kind == T::Directory {
                    0
                } else {
                    entry.size()
                });
                if let Some(b) = out.as_deref_mut() {
                    b.append_data(&mut header, &name, &mut entry)
                        .map_err(|e| format!("entry `{shown}`: cannot copy: {e}"))?;
                }
            }
            T::Symlink | T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("entry `{shown}`: bad link target: {e}"))?
                    .map(|t| t.into_owned())
                    .ok_or_else(|| format!("link `{shown}` has no target"))?;
                // A hard link's target is an archive member name; a symlink's is
                // resolved from the link's own folder. Either must land inside
                // the backed-up paths, and not through a link of this archive.
                let base = if kind == T::Link {
                    PathBuf::new()
                } else {
                    name.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                let resolved = resolve_inside(&base, &target).ok_or_else(|| {
                    format!("link `{shown}` -> `{}` leaves the root", target.display())
                })?;
                if !roots.iter().any(|r| resolved.starts_with(r)) {
                    return Err(format!(
                        "link `{shown}` -> `{}` leaves the root: it resolves to /{}, outside the backed-up paths",
                        target.display(),
                        resolved.display()
                    ));
                }
                if links
                    .iter()
                    .any(|l| resolved.starts_with(l) && resolved != *l)
                {
                    return Err(format!(
                        "link `{shown}` -> `{}` points through another link",
                        target.display()
                    ));
                }
                header.set_entry_type(kind);
                header.set_size(0);
                if let Some(b) = out.as_deref_mut() {
                    b.append_link(&mut header, &name, &target)
                        .map_err(|e| format!("entry `{shown}`: cannot copy: {e}"))?;
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

/// Where `target`, taken from folder `base` (both relative to `/`), lands, or
/// `None` when it is absolute, climbs above `/`, or has a `..` after a name (on
/// the host that `..` would follow whatever the name is there, which the
/// controller cannot see).
fn resolve_inside(base: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut at: Vec<&std::ffi::OsStr> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    let mut named = false;
    for c in target.components() {
        match c {
            Component::Normal(s) => {
                named = true;
                at.push(s);
            }
            Component::ParentDir if !named => {
                at.pop()?;
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(at.iter().collect())
}

/// Puts a backup back: checks the manifest hash and every entry on the controller,
/// re-creates the archive from the checked entries ([`rebuild_archive`]), uploads
/// that to a private temp folder on the host, and extracts it over `/`.
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
        // The host's tar gets a fresh archive written here from the checked
        // entries, never the stored one: its parser may read headers the check's
        // parser ignores.
        let dir = handle.archive.parent().unwrap_or(Path::new("."));
        let staged = tempfile::Builder::new()
            .prefix(".restore-")
            .suffix(".tar")
            .tempdir_in(dir)
            .map_err(|source| PrimitiveError::Io {
                context: format!("create a staging folder in {}", dir.display()),
                source,
            })?;
        let rebuilt = staged.path().join("restore.tar");
        rebuild_archive(&handle.archive, &rel, &rebuilt)
            .map_err(|m| PrimitiveError::step(ctx.name(), "restore", format!("refused: {m}")))?;
        let tmp = private_tmpdir(ctx, "restore")?;
        let remote = format!("{tmp}/backup.tar");
        let put = ctx.transport.put(&rebuilt, &remote, 0o600);
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
    clear_stale_staging(ctx);
    let tag = format!("{}.{}", staging_tag(&ctx.run.run_id), attempt_tag(ctx));
    let dir = ctx.transport.private_dir(&tag)?;
    if !dir.starts_with("/tmp/patchbook.") || dir.contains(char::is_whitespace) {
        return Err(PrimitiveError::step(
            ctx.name(),
            step,
            format!("the host returned an unexpected staging folder {dir:?}"),
        ));
    }
    Ok(dir)
}

/// A name for a fresh private staging folder on the host that the caller creates
/// itself (`mkdir -m 700`, which fails on anything already there) in the command
/// that uses it: the same name [`private_tmpdir`] would give, without a command of
/// its own.
pub fn staging_dir_name(ctx: &HostCtx) -> String {
    clear_stale_staging(ctx);
    format!(
        "/tmp/patchbook.{}.{}.{}",
        staging_tag(&ctx.run.run_id),
        attempt_tag(ctx),
        crate::transport::fresh_token()
    )
}

/// The part of a staging folder's name that says which run made it: the run id
/// with anything but letters, digits, `-` and `_` replaced.
pub fn staging_tag(run_id: &str) -> String {
    run_id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Which process of the run stages: `a` and the last seq an earlier process
/// wrote (`a0` for the process that began the run). Folders of this attempt are
/// in use; those of earlier attempts are leftovers.
fn attempt_tag(ctx: &HostCtx) -> String {
    format!("a{}", ctx.run.journal.as_ref().map_or(0, |j| j.opened_at()))
}

/// Removes the staging folders an interrupted process of this run left on the
/// host (a controller killed between an upload and its install leaves one in
/// `/tmp`). Only in a process that reopened the run (`run --resume`, `rollback`),
/// and once per host. Folders of this attempt are kept: two inventory hosts can
/// be one machine (the lab's hosts share `/tmp`), and this process may be staging
/// there for the other one. No other process of the run can be using the rest,
/// since the run's lock is this process's. A worker of a shared run
/// (`patchbook worker`) does not hold the run's lock and clears nothing: the
/// other workers' folders in a shared `/tmp` are in use.
fn clear_stale_staging(ctx: &HostCtx) {
    let reopened = ctx
        .run
        .journal
        .as_ref()
        .is_some_and(|j| j.opened_at() > 0 && j.holds_run());
    if !reopened || !ctx.run.first_staging(ctx.name()) {
        return;
    }
    // The tags are data ($1, $2), never spliced into the script.
    const SCRIPT: &str = "for d in /tmp/patchbook.\"$1\".*; do \
        case \"$d\" in /tmp/patchbook.\"$1\".\"$2\".*) continue;; esac; \
        { [ -e \"$d\" ] || [ -L \"$d\" ]; } || continue; \
        rm -rf -- \"$d\" && printf '%s\\n' \"$d\"; done; exit 0";
    let tag = staging_tag(&ctx.run.run_id);
    let attempt = attempt_tag(ctx);
    let cmd =
        Command::new(["sh", "-c", SCRIPT, "sh", &tag, &attempt]).timeout(Duration::from_secs(60));
    match ctx.transport.run(&cmd) {
        Ok(out) => {
            for dir in out.stdout_str().lines().filter(|l| !l.is_empty()) {
                tracing::info!(host = %ctx.name(), "removed {dir}, left by an interrupted attempt of this run");
            }
        }
        Err(e) => {
            tracing::warn!(host = %ctx.name(), "could not look for staging folders an interrupted attempt left: {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_tag_is_the_run_id_in_safe_characters() {
        assert_eq!(
            staging_tag("20261202T130215Z-13366"),
            "20261202T130215Z-13366"
        );
        assert_eq!(
            staging_tag("nightly-20261202T1302-g3-1"),
            "nightly-20261202T1302-g3-1"
        );
        assert_eq!(staging_tag("a/b c*"), "a_b_c_");
    }

    fn archive_with(entries: &[(&str, tar::EntryType, Option<&str>)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
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

    /// An archive with one regular entry named `name` whose pax header carries
    /// `records` (as GNU tar's sparse format 1.0 writes them).
    fn pax_archive(name: &str, records: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(6);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        b.append_data(&mut h, name, &b"pwned\n"[..]).unwrap();
        b.finish().unwrap();
        f
    }

    #[test]
    fn refuses_pax_sparse_names_the_host_would_read_differently() {
        // GNU tar extracts this to /root/PWNED_restore; the tar crate sees
        // opt/acme/innocent.
        let a = pax_archive(
            "opt/acme/innocent",
            &[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.name", "root/PWNED_restore"),
                ("GNU.sparse.realsize", "6"),
            ],
        );
        let err = check_archive(a.path(), &["opt/acme".into()]).unwrap_err();
        assert!(err.contains("GNU.sparse"), "{err}");
        // Any one sparse record is enough: the class, not the instance.
        for key in ["GNU.sparse.name", "GNU.sparse.map", "GNU.sparse.size"] {
            let a = pax_archive("opt/acme/innocent", &[(key, "root/x")]);
            let err = check_archive(a.path(), &["opt/acme".into()]).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn refuses_links_resolving_outside_the_backed_up_paths() {
        for (name, target) in [
            // Depth counted from `/` accepted these: they stay below `/` but
            // leave /opt/acme.
            ("opt/acme/rootlink", "../../root"),
            ("opt/acme/up", ".."),
            ("opt/acme/sub/etc", "../../../etc"),
            // A `..` after a name follows whatever that name is on the host.
            ("opt/acme/x", "sub/../../../root"),
        ] {
            let a = archive_with(&[(name, tar::EntryType::Symlink, Some(target))]);
            let err = check_archive(a.path(), &["opt/acme".into()]).unwrap_err();
            assert!(err.contains("leaves the root"), "{name} -> {target}: {err}");
        }
        // A hard link names an archive member: it must be one of the backed-up paths.
        let a = archive_with(&[("opt/acme/h", tar::EntryType::Link, Some("etc/shadow"))]);
        assert!(check_archive(a.path(), &["opt/acme".into()])
            .unwrap_err()
            .contains("leaves the root"));
        // Links that stay inside are fine.
        let ok = archive_with(&[
            ("opt/acme/sub/", tar::EntryType::Directory, None),
            ("opt/acme/sub/up", tar::EntryType::Symlink, Some("../x")),
            ("opt/acme/self", tar::EntryType::Symlink, Some(".")),
            ("opt/acme/h", tar::EntryType::Link, Some("opt/acme/x")),
        ]);
        assert_eq!(check_archive(ok.path(), &["opt/acme".into()]), Ok(()));
    }

    #[test]
    fn rebuilt_archive_has_only_the_checked_entries_and_plain_headers() {
        // A pax `path` record the host's tar would honour; the rebuilt archive
        // carries the name as checked, in a plain header.
        let src = tempfile::NamedTempFile::new().unwrap();
        {
            let mut b = tar::Builder::new(src.reopen().unwrap());
            let mut d = tar::Header::new_gnu();
            d.set_entry_type(tar::EntryType::Directory);
            d.set_mode(0o750);
            d.set_size(0);
            d.set_uid(0);
            d.set_gid(0);
            d.set_mtime(1);
            b.append_data(&mut d, "opt/acme/", std::io::empty())
                .unwrap();
            b.append_pax_extensions([("path", &b"opt/acme/./conf"[..]), ("comment", b"x")])
                .unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o4755);
            h.set_uid(7);
            h.set_gid(7);
            h.set_mtime(1);
            h.set_size(5);
            b.append_data(&mut h, "opt/acme/ignored", &b"hello"[..])
                .unwrap();
            let long = format!("opt/acme/{}", "n".repeat(150));
            let mut l = tar::Header::new_gnu();
            l.set_entry_type(tar::EntryType::Symlink);
            l.set_size(0);
            l.set_mode(0o777);
            l.set_uid(0);
            l.set_gid(0);
            l.set_mtime(1);
            b.append_link(&mut l, &long, "conf").unwrap();
            b.finish().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.tar");
        rebuild_archive(src.path(), &["opt/acme".into()], &out).unwrap();
        // No pax record of any kind reaches the host.
        let bytes = std::fs::read(&out).unwrap();
        let mut raw = tar::Archive::new(&bytes[..]);
        for e in raw.entries().unwrap().raw(true) {
            let e = e.unwrap();
            let t = e.header().entry_type();
            assert!(
                !matches!(t, tar::EntryType::XHeader | tar::EntryType::XGlobalHeader),
                "pax header {t:?} passed through"
            );
        }
        let mut seen = Vec::new();
        let mut ar = tar::Archive::new(&bytes[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            let h = e.header();
            seen.push((
                name,
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                body,
                e.link_name().unwrap().map(|l| l.display().to_string()),
            ));
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0].0, "opt/acme");
        assert_eq!(seen[0].2, 0o750);
        assert_eq!(
            (seen[1].0.as_str(), seen[1].2, seen[1].3, seen[1].4.as_str()),
            ("opt/acme/conf", 0o4755, 7, "hello")
        );
        assert_eq!(seen[2].0, format!("opt/acme/{}", "n".repeat(150)));
        assert_eq!(seen[2].5.as_deref(), Some("conf"));
        // A refused archive leaves no rebuilt file worth sending.
        let bad = archive_with(&[("opt/acme/l", tar::EntryType::Symlink, Some("../../root"))]);
        let out2 = dir.path().join("r2.tar");
        assert!(rebuild_archive(bad.path(), &["opt/acme".into()], &out2).is_err());
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
