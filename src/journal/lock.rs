//! The run lock: one controller per run, enforced with `flock` on `runs/<run>.lock`.
//!
//! It owns the lock file and the small JSON note inside it that names the holder
//! (pid, host, since). The kernel drops a `flock` when its holder exits, however it
//! exits, so a crashed controller never leaves a run locked. It must not read or
//! write the run file itself.
//!
//! The lock file is never deleted: unlinking it would let a late opener lock the old
//! inode while a newer one locks a fresh file, and both would believe they hold it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    fn current() -> Self {
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
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(h) = serde_json::from_str::<Holder>(&text) {
                return Some(h);
            }
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
