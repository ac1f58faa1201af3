//! The run lock and the host claims, enforced with `flock`: one controller per run
//! (`runs/<run>.lock`) and one run per host (`locks/claims/*.claims`, one file per
//! run listing its hosts, see [`HostClaims`]).
//!
//! It owns the lock and claims files and the small JSON notes inside them that name
//! the holder (pid, host, since; for a host also the run and its operator). The
//! kernel drops a `flock` when its holder exits, however it exits, so a crashed
//! controller never leaves a run or a host locked. It must not read or write the run
//! file itself, and decides nothing about when a host is claimed: that is the run's
//! business.
//!
//! The run lock file is never deleted: it is opened without any guard, and unlinking
//! it would let a late opener lock the old inode while a newer one locks a fresh
//! file, and both would believe they hold it. Claims files are deleted (by their
//! holder when it ends, or by the next claimer when their holder was killed), which
//! is safe only because every process opens them under the claims table's guard,
//! `locks/hosts.lock` (see [`HostClaims`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{now_rfc3339, JournalError};

/// Who holds a run: written into the lock file by the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// UTC, RFC 3339.
    pub since: String,
}

impl Holder {
    pub(crate) fn current() -> Self {
        Holder {
            pid: std::process::id(),
            host: hostname(),
            since: now_rfc3339(),
        }
    }

    fn unknown() -> Self {
        Holder {
            pid: 0,
            host: "an unknown host".into(),
            since: "an unknown time".into(),
        }
    }
}

/// An exclusive lock on one run, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    // Held only for its flock; closing the descriptor releases the lock.
    _file: File,
    path: PathBuf,
    holder: Holder,
}

impl RunLock {
    pub fn path_for(state_dir: &Path, run: &str) -> PathBuf {
        state_dir.join("runs").join(format!("{run}.lock"))
    }

    /// Takes the run's lock at once, or fails with [`JournalError::Locked`] naming
    /// the holder. Never waits: two controllers on one run is an operator mistake.
    pub fn acquire(state_dir: &Path, run: &str) -> Result<Self, JournalError> {
        let path = Self::path_for(state_dir, run);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            super::private::create_dir_all(dir).map_err(io)?;
        }
        let existed = path.exists();
        let mut file = super::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if !existed {
            super::private::seal(&file).map_err(io)?;
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file).unwrap_or_else(Holder::unknown);
                return Err(JournalError::Locked {
                    run: run.to_string(),
                    pid: holder.pid,
                    host: holder.host,
                    since: holder.since,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let holder = Holder::current();
        let note = serde_json::to_vec(&holder).unwrap_or_default();
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&note).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(RunLock {
            _file: file,
            path,
            holder,
        })
    }

    /// The holder of a run's lock when another open file holds it, `None` when it is
    /// free. Probing takes the lock for an instant when it is free.
    pub fn holder(state_dir: &Path, run: &str) -> Result<Option<Holder>, JournalError> {
        let path = Self::path_for(state_dir, run);
        let mut file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(None),
            Err(TryLockError::WouldBlock) => {
                Ok(Some(read_holder(&mut file).unwrap_or_else(Holder::unknown)))
            }
            Err(TryLockError::Error(source)) => Err(JournalError::Io { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn holder_note(&self) -> &Holder {
        &self.holder
    }
}

/// Reads the holder's note. The holder writes it just after locking, so a reader that
/// races a starting controller retries briefly before giving up.
fn read_holder(file: &mut File) -> Option<Holder> {
    for _ in 0..20 {
        if let Some(h) = read_note(file) {
            return Some(h);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// This machine's host name, for the lock note.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Who holds a host: the run working on it and the operator who started that run,
/// written into the host's lock file by the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHolder {
    pub run: String,
    /// The operator recorded in the run's journal (`--operator`, else the login name).
    pub operator: String,
    /// `run`, `exec`, `rollback` or `watch`.
    pub command: String,
    pub pid: u32,
    /// The controller machine's host name.
    pub controller: String,
    /// UTC, RFC 3339.
    pub since: String,
}

impl HostHolder {
    pub fn new(run: &str, operator: &str, command: &str) -> Self {
        HostHolder {
            run: run.to_string(),
            operator: operator.to_string(),
            command: command.to_string(),
            pid: std::process::id(),
            controller: hostname(),
            since: now_rfc3339(),
        }
    }
}

impl std::fmt::Display for HostHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} ({} by operator {}, pid {} on {}, since {})",
            self.run, self.command, self.operator, self.pid, self.controller, self.since
        )
    }
}

/// Hosts another run holds, grouped by the run holding them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyHosts {
    /// Each holder with the hosts of the request it holds, sorted.
    pub held: Vec<(HostHolder, Vec<String>)>,
}

impl BusyHosts {
    /// Every busy host, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut all: Vec<String> = self.held.iter().flat_map(|(_, h)| h.clone()).collect();
        all.sort();
        all
    }
}

impl std::fmt::Display for BusyHosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (holder, hosts)) in self.held.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            const SHOWN: usize = 5;
            let mut names = hosts
                .iter()
                .take(SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if hosts.len() > SHOWN {
                names.push_str(&format!(" and {} more", hosts.len() - SHOWN));
            }
            write!(f, "{names} held by {holder}")?;
        }
        Ok(())
    }
}

/// One run's claims on hosts: one claims file per [`HostClaims`],
/// `locks/claims/<run>.<pid>.<n>.claims`, `flock`ed by its holder until the claims
/// are dropped or the process ends (however it ends, so a killed controller never
/// leaves a host locked). The file holds the holder's note on its first line, then
/// one line per claimed host (the host's `file_stem`), appended per claim. One
/// descriptor per run, whatever the number of hosts.
///
/// A set of hosts is claimed all or nothing while holding `locks/hosts.lock`, the
/// state directory's guard of the claims table: the claimer reads the other runs'
/// claims files and takes the set only if no live one lists any of it, so two runs
/// whose sets overlap cannot each take part of the other's, and exactly one of them
/// proceeds while the other sees whole ownership, never a half-claimed set. The
/// guard is held for the few milliseconds of one attempt, never while waiting. A
/// run that holds hosts and waits for more (a second rollout) may wait on a run
/// that waits for it; the wait's timeout ends that, with nothing of the new set
/// taken.
///
/// A claims file nobody holds a `flock` on belongs to a run that ended without
/// removing it (killed): it claims nothing, and the claimer that finds it removes
/// it. Unlike the run lock, these files may be deleted, because every process that
/// opens one (its holder creating it, a claimer reading it, [`HostClaims::holder_of`]
/// probing it, a holder removing its own on drop) does so under the guard: nobody
/// can have opened a file it is about to lock between the moment its former holder
/// let go and the moment it is unlinked, so no two processes ever lock two
/// different files while both believing they hold the same name.
///
/// What this run holds, and what it has read of the other runs' files, is kept in
/// memory: checking a host the run holds costs no system call, and each attempt
/// reads only what other runs appended since the last one.
pub struct HostClaims {
    state_dir: PathBuf,
    holder: HostHolder,
    wait: Option<Duration>,
    cancel: Option<Arc<AtomicBool>>,
    on_wait: Option<WaitNotice>,
    held: Mutex<Claimed>,
}

/// This run's side of the claims table.
#[derive(Default)]
struct Claimed {
    /// This run's claims file and its `flock`ed descriptor, from the first claim on.
    own: Option<(PathBuf, File)>,
    /// The hosts this run holds.
    hosts: BTreeSet<String>,
    /// Other runs' live claims files, by file name, as far as they have been read.
    others: HashMap<OsString, OtherClaims>,
}

/// What has been read of another run's claims file.
#[derive(Default)]
struct OtherClaims {
    /// Bytes read: the next attempt reads on from here.
    read: u64,
    holder: Option<HostHolder>,
    stems: HashSet<String>,
}

impl OtherClaims {
    /// Reads the complete lines appended since the last read. A line without its
    /// newline is left for later: its writer holds the guard until it is whole, so
    /// only a writer killed mid-line leaves one, and its file is stale at once.
    fn read_on(&mut self, file: &mut File) -> std::io::Result<()> {
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(self.read))?;
        file.read_to_end(&mut buf)?;
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        for line in buf[..end].split(|&b| b == b'\n') {
            if self.holder.is_none() {
                self.holder =
                    Some(serde_json::from_slice(line).unwrap_or_else(|_| unknown_holder()));
            } else if !line.is_empty() {
                self.stems
                    .insert(String::from_utf8_lossy(line).into_owned());
            }
        }
        // The cast widens: a buffer's length always fits in a file offset.
        self.read += end as u64 + 1;
        Ok(())
    }
}

/// Told once per holder that a claim is waiting, so the operator sees whom for.
pub type WaitNotice = Box<dyn Fn(&BusyHosts) + Send + Sync>;

impl std::fmt::Debug for HostClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostClaims")
            .field("holder", &self.holder)
            .field("wait", &self.wait)
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

/// How often a waiting claim tries again.
const RETRY: Duration = Duration::from_millis(200);

/// Numbers the claims files of one process: two claims of the same run in one
/// process (a watch service) stay two files, as they stay two holders.
static CLAIMS_FILES: AtomicU64 = AtomicU64::new(0);

fn claims_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("locks").join("claims")
}

/// Takes the claims table's guard, `locks/hosts.lock`, until the file is dropped.
fn lock_guard(state_dir: &Path) -> Result<File, JournalError> {
    let path = state_dir.join("locks").join("hosts.lock");
    let io = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        super::private::create_dir_all(dir).map_err(io)?;
    }
    let guard = open_lock_file(&path).map_err(io)?;
    guard.lock().map_err(io)?;
    Ok(guard)
}

/// The claims files under `dir`, by file name; none when the folder does not exist.
fn claims_files(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, JournalError> {
    let io = |source| JournalError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if Path::new(&name).extension().is_some_and(|e| e == "claims") {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

/// Opens another run's claims file under the guard: `None` when nobody holds it
/// (it is then removed: see [`HostClaims`] for why that is safe) or it is gone.
fn open_live(path: &Path) -> Result<Option<File>, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    match file.try_lock_shared() {
        Ok(()) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            Ok(None)
        }
        Err(TryLockError::WouldBlock) => Ok(Some(file)),
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
}

fn unknown_holder() -> HostHolder {
    HostHolder {
        run: "an unknown run".into(),
        operator: "an unknown operator".into(),
        command: "run".into(),
        pid: 0,
        controller: "an unknown host".into(),
        since: "an unknown time".into(),
    }
}

impl HostClaims {
    /// Claims that refuse at once when a host is held by another run.
    pub fn new(state_dir: &Path, holder: HostHolder) -> Self {
        HostClaims {
            state_dir: state_dir.to_path_buf(),
            holder,
            wait: None,
            cancel: None,
            on_wait: None,
            held: Mutex::new(Claimed::default()),
        }
    }

    /// Claims that queue behind the holders for up to `timeout`; setting `cancel`
    /// (Ctrl-C, SIGTERM) ends the wait with nothing claimed.
    pub fn waiting(mut self, timeout: Duration, cancel: Arc<AtomicBool>) -> Self {
        self.wait = Some(timeout);
        self.cancel = Some(cancel);
        self
    }

    pub fn on_wait(mut self, notice: WaitNotice) -> Self {
        self.on_wait = Some(notice);
        self
    }

    pub fn holder(&self) -> &HostHolder {
        &self.holder
    }

    /// Whether this run holds `host`.
    pub fn holds(&self, host: &str) -> bool {
        self.lock_held().hosts.contains(host)
    }

    /// The hosts this run holds, sorted.
    pub fn held(&self) -> Vec<String> {
        self.lock_held().hosts.iter().cloned().collect()
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Claimed> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims every host of `hosts` this run does not hold yet, all or nothing:
    /// [`JournalError::HostsBusy`] naming the holders when any is held elsewhere
    /// (or, when waiting, once the wait times out or is cancelled).
    pub fn claim(&self, hosts: &[String]) -> Result<(), JournalError> {
        let started = Instant::now();
        let mut told: Option<Vec<String>> = None;
        loop {
            let busy = {
                let mut held = self.lock_held();
                let mut missing: Vec<&str> = hosts
                    .iter()
                    .map(String::as_str)
                    .filter(|h| !held.hosts.contains(*h))
                    .collect();
                missing.sort_unstable();
                missing.dedup();
                if missing.is_empty() {
                    return Ok(());
                }
                match self.try_claim(&mut held, &missing)? {
                    Ok(()) => return Ok(()),
                    Err(busy) => busy,
                }
            };
            let Some(timeout) = self.wait else {
                return Err(JournalError::HostsBusy { busy });
            };
            let runs: Vec<String> = busy.held.iter().map(|(h, _)| h.run.clone()).collect();
            if told.as_ref() != Some(&runs) {
                if let Some(notice) = &self.on_wait {
                    notice(&busy);
                }
                told = Some(runs);
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(JournalError::WaitTimedOut { busy, waited });
            }
            // Sleep in short steps so a Ctrl-C ends the wait at once.
            let until = Instant::now() + RETRY.min(timeout - waited);
            while Instant::now() < until {
                if self
                    .cancel
                    .as_ref()
                    .is_some_and(|c| c.load(Ordering::SeqCst))
                {
                    return Err(JournalError::WaitCancelled { busy });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// One attempt under the table's guard: every host of `hosts` (sorted, none held
    /// yet) listed in this run's claims file, or the holders of the ones other runs
    /// hold (and nothing taken).
    fn try_claim(
        &self,
        held: &mut Claimed,
        hosts: &[&str],
    ) -> Result<Result<(), BusyHosts>, JournalError> {
        let dir = claims_dir(&self.state_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        super::private::create_dir_all(&dir).map_err(io(&dir))?;
        let guard = lock_guard(&self.state_dir)?;

        // Bring the other runs' claims up to date; forget the ones gone or stale.
        let own = held
            .own
            .as_ref()
            .and_then(|(p, _)| p.file_name())
            .map(OsString::from);
        let mut live = HashSet::new();
        for (name, path) in claims_files(&dir)? {
            if own.as_ref() == Some(&name) {
                continue;
            }
            let Some(mut file) = open_live(&path)? else {
                continue;
            };
            let other = held.others.entry(name.clone()).or_default();
            other.read_on(&mut file).map_err(io(&path))?;
            live.insert(name);
        }
        held.others.retain(|name, _| live.contains(name));

        let stems: Vec<String> = hosts.iter().map(|h| file_stem(h)).collect();
        let mut busy: Vec<(HostHolder, Vec<String>)> = Vec::new();
        for (host, stem) in hosts.iter().zip(&stems) {
            let Some(other) = held.others.values().find(|o| o.stems.contains(stem)) else {
                continue;
            };
            let holder = other.holder.clone().unwrap_or_else(unknown_holder);
            match busy.iter_mut().find(|(h, _)| h.run == holder.run) {
                Some((_, hosts)) => hosts.push((*host).to_string()),
                None => busy.push((holder, vec![(*host).to_string()])),
            }
        }
        if !busy.is_empty() {
            return Ok(Err(BusyHosts { held: busy }));
        }

        if held.own.is_none() {
            held.own = Some(self.create_claims_file(&dir)?);
        }
        let mut lines = String::with_capacity(stems.iter().map(|s| s.len() + 1).sum());
        for stem in &stems {
            lines.push_str(stem);
            lines.push('\n');
        }
        if let Some((path, file)) = held.own.as_mut() {
            file.write_all(lines.as_bytes()).map_err(io(path))?;
        }
        held.hosts.extend(hosts.iter().map(|h| (*h).to_string()));
        drop(guard);
        Ok(Ok(()))
    }

    /// Creates this run's claims file under the guard, locked, with the holder's note.
    fn create_claims_file(&self, dir: &Path) -> Result<(PathBuf, File), JournalError> {
        let n = CLAIMS_FILES.fetch_add(1, Ordering::Relaxed);
        // The run's name only helps a reader of the folder; pid and number make the
        // name unique, so a long run id is cut to keep the name a valid file name.
        let mut run = file_stem(&self.holder.run);
        run.truncate(64);
        let name = format!("{run}.{}.{n}.claims", std::process::id());
        let path = dir.join(name);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let mut file = super::private::options()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        super::private::seal(&file).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            // Nobody else can have opened a file this process just created.
            Err(TryLockError::WouldBlock) => {
                return Err(io(std::io::Error::from(std::io::ErrorKind::WouldBlock)))
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut note = serde_json::to_vec(&self.holder).unwrap_or_default();
        note.push(b'\n');
        file.write_all(&note).map_err(io)?;
        Ok((path, file))
    }

    /// Who holds `host` in the state directory, `None` when nobody does.
    pub fn holder_of(state_dir: &Path, host: &str) -> Result<Option<HostHolder>, JournalError> {
        let dir = claims_dir(state_dir);
        let files = claims_files(&dir)?;
        if files.is_empty() {
            return Ok(None);
        }
        // Probing takes a claims file's lock for an instant when it is free; under
        // the guard, so a claim never mistakes the probe for a holder.
        let _guard = lock_guard(state_dir)?;
        let stem = file_stem(host);
        for (_, path) in files {
            let Some(mut file) = open_live(&path)? else {
                continue;
            };
            let mut other = OtherClaims::default();
            other
                .read_on(&mut file)
                .map_err(|source| JournalError::Io {
                    path: path.clone(),
                    source,
                })?;
            if other.stems.contains(&stem) {
                return Ok(Some(other.holder.unwrap_or_else(unknown_holder)));
            }
        }
        Ok(None)
    }
}

impl Drop for HostClaims {
    /// Removes this run's claims file under the guard, then lets go of it. When the
    /// guard cannot be taken the file stays, unlocked, for the next claimer to remove.
    fn drop(&mut self) {
        let held = self
            .held
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((path, file)) = held.own.take() else {
            return;
        };
        if let Ok(guard) = lock_guard(&self.state_dir) {
            let _ = std::fs::remove_file(&path);
            drop(file);
            drop(guard);
        }
    }
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let file = super::private::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        super::private::seal(&file)?;
    }
    Ok(file)
}

fn read_note<T: serde::de::DeserializeOwned>(file: &mut File) -> Option<T> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// A host name as a file name: inventory names are free text (`10.0.0.1`,
/// `db/primary`, `..`), so anything but letters, digits, `-` and `_` is written as
/// `%XX`, which keeps distinct names distinct and every name inside the table.
fn file_stem(host: &str) -> String {
    let mut out = String::with_capacity(host.len());
    for b in host.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlapping_claims_are_all_or_nothing_and_name_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostClaims::new(dir.path(), HostHolder::new("run-a", "alice", "run"));
        let b = HostClaims::new(dir.path(), HostHolder::new("run-b", "bob", "exec"));
        a.claim(&names(&["web1", "web2"])).unwrap();
        let err = b.claim(&names(&["web0", "web2", "db/1"])).unwrap_err();
        let JournalError::HostsBusy { busy } = &err else {
            panic!("{err}")
        };
        assert_eq!(busy.hosts(), names(&["web2"]));
        let text = err.to_string();
        assert!(
            text.contains("web2 held by run run-a (run by operator alice"),
            "{text}"
        );
        // Nothing of the refused set was kept: web0 is free for a third run.
        assert!(b.held().is_empty());
        assert_eq!(HostClaims::holder_of(dir.path(), "web0").unwrap(), None);
        assert_eq!(
            HostClaims::holder_of(dir.path(), "web1")
                .unwrap()
                .map(|h| h.run),
            Some("run-a".to_string())
        );
        drop(a);
        b.claim(&names(&["web0", "web2", "db/1"])).unwrap();
        assert_eq!(b.held(), names(&["db/1", "web0", "web2"]));
        // b's one claims file lists each host by its file-name-safe stem.
        let files = claims_files(&claims_dir(dir.path())).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        let text = std::fs::read_to_string(&files[0].1).unwrap();
        assert!(text.lines().any(|l| l == "db%2F1"), "{text}");
        // Dropping the claims removes their file.
        drop(b);
        assert!(claims_files(&claims_dir(dir.path())).unwrap().is_empty());
    }

    /// The paths of this process's open descriptors that lie under `dir`.
    fn open_under(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.starts_with(dir))
            .collect()
    }

    #[test]
    fn a_run_holds_any_number_of_hosts_with_one_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        // More hosts than this machine's hard open-files limit (20,000) allows files.
        let hosts: Vec<String> = (0..25_000).map(|i| format!("h{i:05}")).collect();
        let a = HostClaims::new(dir.path(), HostHolder::new("run-a", "alice", "run"));
        a.claim(&hosts[..10_000]).unwrap();
        a.claim(&hosts).unwrap();
        assert_eq!(a.held().len(), 25_000);
        assert!(a.holds("h24999"));
        let open = open_under(dir.path());
        assert_eq!(open.len(), 1, "{open:?}");
        let b = HostClaims::new(dir.path(), HostHolder::new("run-b", "bob", "run"));
        let err = b.claim(&names(&["h12345", "other"])).unwrap_err();
        let JournalError::HostsBusy { busy } = &err else {
            panic!("{err}")
        };
        assert_eq!(busy.hosts(), names(&["h12345"]));
        assert_eq!(
            HostClaims::holder_of(dir.path(), "h00000")
                .unwrap()
                .map(|h| h.run),
            Some("run-a".to_string())
        );
    }

    #[test]
    fn a_claims_file_nobody_locks_is_stale_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let claims = claims_dir(dir.path());
        std::fs::create_dir_all(&claims).unwrap();
        // As a killed holder leaves it: a note, hosts, and a half-written last line.
        let stale = claims.join("run-old.1.0.claims");
        let note = serde_json::to_string(&HostHolder::new("run-old", "olga", "run")).unwrap();
        std::fs::write(&stale, format!("{note}\nweb1\nweb")).unwrap();
        // Not a claims file: left alone.
        std::fs::write(claims.join("notes.txt"), "web2\n").unwrap();
        assert_eq!(HostClaims::holder_of(dir.path(), "web1").unwrap(), None);
        let a = HostClaims::new(dir.path(), HostHolder::new("run-a", "alice", "run"));
        a.claim(&names(&["web1", "web2"])).unwrap();
        assert!(!stale.exists());
        assert!(claims.join("notes.txt").exists());
        assert_eq!(
            HostClaims::holder_of(dir.path(), "web1")
                .unwrap()
                .map(|h| h.run),
            Some("run-a".to_string())
        );
    }

    /// Set in the child of `a_killed_holder_leaves_no_host_claimed`: the state dir.
    const CHILD_DIR: &str = "PATCHBOOK_TEST_CLAIMS_CHILD";

    /// The holder for `a_killed_holder_leaves_no_host_claimed`, run in a child
    /// process of this test binary; does nothing in a normal test run.
    #[test]
    fn claims_holder_child() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return;
        };
        let a = HostClaims::new(Path::new(&dir), HostHolder::new("run-child", "carl", "run"));
        a.claim(&names(&["web1", "web2"])).unwrap();
        println!("claimed");
        std::thread::sleep(Duration::from_secs(600));
    }

    #[test]
    fn a_killed_holder_leaves_no_host_claimed() {
        let dir = tempfile::tempdir().unwrap();
        /// Kills the child however the test ends, so none is left behind.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reaped(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "journal::lock::tests::claims_holder_child",
                    "--nocapture",
                ])
                .env(CHILD_DIR, dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let started = Instant::now();
        let holder = loop {
            if let Some(h) = HostClaims::holder_of(dir.path(), "web2").unwrap() {
                break h;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "child never claimed"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            (holder.run.as_str(), holder.pid),
            ("run-child", child.0.id())
        );
        let a = HostClaims::new(dir.path(), HostHolder::new("run-a", "alice", "run"));
        let err = a.claim(&names(&["web2"])).unwrap_err();
        assert!(
            err.to_string().contains("web2 held by run run-child"),
            "{err}"
        );
        child.0.kill().unwrap(); // SIGKILL: no destructor runs, the file stays.
        child.0.wait().unwrap();
        let files = claims_files(&claims_dir(dir.path())).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        a.claim(&names(&["web1", "web2"])).unwrap();
        assert_eq!(a.held(), names(&["web1", "web2"]));
        // The killed holder's file is gone; only a's own remains.
        let files = claims_files(&claims_dir(dir.path())).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(
            files[0].0.to_string_lossy().starts_with("run-a."),
            "{files:?}"
        );
    }

    #[test]
    fn a_waiting_claim_proceeds_when_the_holder_lets_go_and_ends_on_timeout_or_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostClaims::new(dir.path(), HostHolder::new("run-a", "alice", "run"));
        a.claim(&names(&["h"])).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let b = HostClaims::new(dir.path(), HostHolder::new("run-b", "bob", "run"))
            .waiting(Duration::from_secs(30), cancel.clone())
            .on_wait(Box::new(move |busy| {
                t.lock().unwrap().push(busy.to_string())
            }));
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                drop(a);
            });
            b.claim(&names(&["h"])).unwrap();
        });
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(told.lock().unwrap().len(), 1, "{told:?}");

        let c = HostClaims::new(dir.path(), HostHolder::new("run-c", "carol", "run"))
            .waiting(Duration::from_millis(300), Arc::new(AtomicBool::new(false)));
        let err = c.claim(&names(&["h"])).unwrap_err();
        assert!(matches!(err, JournalError::WaitTimedOut { .. }), "{err}");
        let d = HostClaims::new(dir.path(), HostHolder::new("run-d", "dave", "run"))
            .waiting(Duration::from_secs(60), cancel.clone());
        cancel.store(true, Ordering::SeqCst);
        let err = d.claim(&names(&["h"])).unwrap_err();
        assert!(matches!(err, JournalError::WaitCancelled { .. }), "{err}");
    }
}
