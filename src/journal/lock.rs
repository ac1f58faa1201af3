//! The run lock and the host locks, enforced with `flock`: one controller per run
//! (`runs/<run>.lock`) and one run per host (`locks/hosts/<host>.lock`, see
//! [`HostClaims`]).
//!
//! It owns the lock files and the small JSON notes inside them that name the holder
//! (pid, host, since; for a host also the run and its operator). The kernel drops a
//! `flock` when its holder exits, however it exits, so a crashed controller never
//! leaves a run or a host locked. It must not read or write the run file itself,
//! and decides nothing about when a host is claimed: that is the run's business.
//!
//! The lock file is never deleted: unlinking it would let a late opener lock the old
//! inode while a newer one locks a fresh file, and both would believe they hold it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// One run's claims on hosts: a `flock` on `locks/hosts/<host>.lock` per host,
/// held until the claims are dropped or the process ends (however it ends, so a
/// killed controller never leaves a host locked).
///
/// A set of hosts is claimed all or nothing while holding `locks/hosts.lock`, the
/// state directory's guard of the host-lock table: two runs whose sets overlap
/// cannot each take part of the other's, so exactly one of them proceeds and the
/// other sees whole ownership, never a half-claimed set. The guard is held for the
/// few milliseconds of one attempt, never while waiting. A run that holds hosts
/// and waits for more (a second rollout) may wait on a run that waits for it; the
/// wait's timeout ends that, with nothing of the new set taken.
///
/// Like the run lock, the lock files are never deleted. Each claimed host costs a
/// file descriptor while the run lasts (as does its SSH session); the soft
/// open-files limit is raised to the hard one when a claim needs it.
pub struct HostClaims {
    state_dir: PathBuf,
    holder: HostHolder,
    wait: Option<Duration>,
    cancel: Option<Arc<AtomicBool>>,
    on_wait: Option<WaitNotice>,
    held: Mutex<BTreeMap<String, File>>,
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

impl HostClaims {
    /// Claims that refuse at once when a host is held by another run.
    pub fn new(state_dir: &Path, holder: HostHolder) -> Self {
        HostClaims {
            state_dir: state_dir.to_path_buf(),
            holder,
            wait: None,
            cancel: None,
            on_wait: None,
            held: Mutex::new(BTreeMap::new()),
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
        self.lock_held().contains_key(host)
    }

    /// The hosts this run holds, sorted.
    pub fn held(&self) -> Vec<String> {
        self.lock_held().keys().cloned().collect()
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, File>> {
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
                    .filter(|h| !held.contains_key(*h))
                    .collect();
                missing.sort_unstable();
                missing.dedup();
                if missing.is_empty() {
                    return Ok(());
                }
                match self.try_claim(&missing)? {
                    Ok(files) => {
                        held.extend(files);
                        return Ok(());
                    }
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

    /// One attempt under the table's guard: every host's lock, or the holders of
    /// the ones that are taken (and nothing kept).
    fn try_claim(
        &self,
        hosts: &[&str],
    ) -> Result<Result<Vec<(String, File)>, BusyHosts>, JournalError> {
        let dir = self.state_dir.join("locks");
        let table = dir.join("hosts");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        super::private::create_dir_all(&table).map_err(io(&table))?;
        raise_open_files_limit(hosts.len());
        let guard_path = dir.join("hosts.lock");
        let guard = open_lock_file(&guard_path).map_err(io(&guard_path))?;
        guard.lock().map_err(io(&guard_path))?;
        let mut files = Vec::with_capacity(hosts.len());
        let mut busy: Vec<(HostHolder, Vec<String>)> = Vec::new();
        for host in hosts {
            let path = table.join(format!("{}.lock", file_stem(host)));
            let mut file = open_lock_file(&path).map_err(io(&path))?;
            match file.try_lock() {
                Ok(()) => files.push(((*host).to_string(), file)),
                Err(TryLockError::WouldBlock) => {
                    // The holder wrote its note before it let go of the guard.
                    let holder = read_note::<HostHolder>(&mut file).unwrap_or_else(|| HostHolder {
                        run: "an unknown run".into(),
                        operator: "an unknown operator".into(),
                        command: "run".into(),
                        pid: 0,
                        controller: "an unknown host".into(),
                        since: "an unknown time".into(),
                    });
                    match busy.iter_mut().find(|(h, _)| h.run == holder.run) {
                        Some((_, hosts)) => hosts.push((*host).to_string()),
                        None => busy.push((holder, vec![(*host).to_string()])),
                    }
                }
                Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
        if !busy.is_empty() {
            // Dropping `files` lets go of every host taken in this attempt.
            return Ok(Err(BusyHosts { held: busy }));
        }
        let note = serde_json::to_vec(&self.holder).unwrap_or_default();
        for (host, file) in &mut files {
            let path = table.join(format!("{}.lock", file_stem(host)));
            file.set_len(0).map_err(io(&path))?;
            file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
            file.write_all(&note).map_err(io(&path))?;
        }
        drop(guard);
        Ok(Ok(files))
    }

    /// Who holds `host` in the state directory, `None` when nobody does.
    pub fn holder_of(state_dir: &Path, host: &str) -> Result<Option<HostHolder>, JournalError> {
        let dir = state_dir.join("locks");
        let path = dir.join("hosts").join(format!("{}.lock", file_stem(host)));
        let mut file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        // Probing takes the host's lock for an instant when it is free; under the
        // guard, so a claim never mistakes the probe for a holder.
        let guard_path = dir.join("hosts.lock");
        let guard = open_lock_file(&guard_path).map_err(|source| JournalError::Io {
            path: guard_path.clone(),
            source,
        })?;
        guard.lock().map_err(|source| JournalError::Io {
            path: guard_path,
            source,
        })?;
        match file.try_lock_shared() {
            Ok(()) => Ok(None),
            Err(TryLockError::WouldBlock) => Ok(read_note(&mut file)),
            Err(TryLockError::Error(source)) => Err(JournalError::Io { path, source }),
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

/// Raises the soft open-files limit to the hard one when `more` descriptors might
/// not fit under it. Failing to raise it is not an error here: opening a lock file
/// then fails with EMFILE, naming the file.
fn raise_open_files_limit(more: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    // A rough count of what is open already is enough: stay well under the limit.
    let wanted = (more as libc::rlim_t)
        .saturating_mul(2)
        .saturating_add(1024);
    if lim.rlim_cur >= wanted || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    lim.rlim_cur = lim.rlim_max.min(wanted.max(lim.rlim_cur));
    // SAFETY: setrlimit reads the struct; raising the soft limit up to the hard one
    // needs no privilege.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
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
        assert!(dir.path().join("locks/hosts/db%2F1.lock").exists());
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
