//! The audit index: `<state-dir>/audit-index.jsonl`, one hash-chained line per
//! checkpoint of a run (opened, reopened, closed).
//!
//! Per-record chaining cannot see a run file deleted whole, or truncated and
//! re-hashed: nothing outside the file remembers what it was. The index does. It owns
//! the index format and its appends; it must not read run files (the audit does).
//! Appends from several controllers are serialised with `flock` on the index itself.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::anchor::Anchor;
use super::{fsync_dir, now_rfc3339, JournalError, GENESIS};

pub const INDEX_FILE: &str = "audit-index.jsonl";

/// What happened to the run at this checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexEvent {
    /// The run file was created; `at_seq` is 0.
    Open,
    /// A closed run was opened again (resume, rollback); appends may follow `at_seq`.
    Reopen,
    /// The run was closed; its file must end at `at_seq` with `at_hash`.
    Close,
    /// A signed point inside a run (written only with `[audit] signing_key`): the
    /// run's first `at_seq` records end with `at_hash`.
    Checkpoint,
}

/// One line of the audit index. A field it does not know makes the line unreadable:
/// nothing may ride along outside the hashed content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub seq: u64,
    pub ts: String,
    pub run: String,
    pub event: IndexEvent,
    /// The run's last record at this checkpoint (0 and [`GENESIS`] for none): seqs
    /// have no gaps, so this is also the run's record count.
    pub at_seq: u64,
    pub at_hash: String,
    pub prev: String,
    pub hash: String,
    /// Ed25519 signature of `hash` ([`super::anchor::Signer::sign_index`]), with
    /// `[audit] signing_key` configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl IndexEntry {
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "ts": self.ts,
            "run": self.run,
            "event": self.event,
            "at_seq": self.at_seq,
            "at_hash": self.at_hash,
        });
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(body.to_string().as_bytes());
        hex::encode(h.finalize())
    }
}

pub fn index_path(state_dir: &Path) -> PathBuf {
    state_dir.join(INDEX_FILE)
}

/// Appends a checkpoint for `run` and fsyncs it. A torn last line left by a crash
/// mid-append is cut off first, so the chain continues from the last whole entry.
pub fn append(
    state_dir: &Path,
    run: &str,
    event: IndexEvent,
    at_seq: u64,
    at_hash: &str,
    anchor: Option<&Anchor>,
) -> Result<IndexEntry, JournalError> {
    let path = index_path(state_dir);
    let io = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    super::private::create_dir_all(state_dir).map_err(io)?;
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
    // Blocking is right here: another controller holds it only for one append.
    file.lock().map_err(io)?;
    if !existed {
        fsync_dir(state_dir)?;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    let whole = match text.rfind('\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if whole < text.len() {
        file.set_len(whole as u64).map_err(io)?;
    }
    let last = text[..whole]
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<IndexEntry>(l).map_err(|e| JournalError::Corrupt {
                path: path.clone(),
                line: text[..whole].lines().count(),
                message: format!(
                    "{e}; the audit index is damaged, run `patchbook audit verify` and keep a copy before repairing it"
                ),
            })
        })
        .transpose()?;
    let (seq, prev) = last
        .map(|e| (e.seq + 1, e.hash))
        .unwrap_or((1, GENESIS.to_string()));
    let mut entry = IndexEntry {
        seq,
        ts: now_rfc3339(),
        run: run.to_string(),
        event,
        at_seq,
        at_hash: at_hash.to_string(),
        prev,
        hash: String::new(),
        sig: None,
    };
    entry.hash = entry.compute_hash();
    entry.sig = anchor.map(|a| a.signer.sign_index(&entry.hash));
    let mut line = serde_json::to_string(&entry).unwrap_or_default();
    line.push('\n');
    file.seek(SeekFrom::End(0)).map_err(io)?;
    file.write_all(line.as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)?;
    drop(file);
    if let Some(a) = anchor {
        a.sink.send(&format!(
            "state={} index_seq={} run={} event={:?} records={} head={} hash={} sig={}",
            state_dir.display(),
            entry.seq,
            entry.run,
            entry.event,
            entry.at_seq,
            entry.at_hash,
            entry.hash,
            entry.sig.as_deref().unwrap_or("")
        ));
    }
    Ok(entry)
}

/// The index as read back, with the first place its own chain breaks.
#[derive(Debug, Clone, Default)]
pub struct IndexRead {
    pub exists: bool,
    /// Every entry that parsed, in file order.
    pub entries: Vec<IndexEntry>,
    /// The first break in the index's own chain, if any.
    pub problem: Option<String>,
}

/// Reads the audit index and checks its chain. A missing index reads as empty.
pub fn read(state_dir: &Path) -> Result<IndexRead, JournalError> {
    let path = index_path(state_dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(IndexRead::default()),
        Err(source) => return Err(JournalError::Io { path, source }),
    };
    // Appenders hold the exclusive lock: never read an entry half-written.
    file.lock_shared().map_err(|source| JournalError::Io {
        path: path.clone(),
        source,
    })?;
    let scan = super::scan_lines::<IndexEntry>(&path)?;
    drop(file);
    let mut problem = None;
    let mut prev = GENESIS.to_string();
    let first_bad = scan.bad.first().map(|(l, _)| *l).unwrap_or(usize::MAX);
    for (i, (line, e)) in scan.items.iter().enumerate() {
        if *line > first_bad {
            break;
        }
        let expected = i as u64 + 1;
        let wrong = if e.compute_hash() != e.hash {
            Some(format!(
                "entry {} (line {line}): its hash does not match its content (edited or forged)",
                e.seq
            ))
        } else if e.seq != expected {
            Some(format!(
                "entry {} (line {line}) where entry {expected} belongs (deleted or reordered)",
                e.seq
            ))
        } else if e.prev != prev {
            Some(format!(
                "entry {} (line {line}) does not link to entry {} (forged or inserted)",
                e.seq,
                expected - 1
            ))
        } else {
            None
        };
        if wrong.is_some() {
            problem = wrong;
            break;
        }
        prev = e.hash.clone();
    }
    if problem.is_none() {
        if let Some((line, message)) = scan.bad.first() {
            problem = Some(format!("line {line} is not an index entry: {message}"));
        } else if let Some((line, _)) = &scan.torn {
            problem = Some(format!(
                "truncated tail: line {line} is torn; last good entry {}",
                scan.items.len()
            ));
        }
    }
    Ok(IndexRead {
        exists: true,
        entries: scan.items.into_iter().map(|(_, e)| e).collect(),
        problem,
    })
}
