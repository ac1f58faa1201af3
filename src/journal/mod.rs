//! The journal: one append-only, hash-chained JSON Lines file per run.
//!
//! It is the one truth of a run: rollback, resume, audit, reports and patch levels
//! all read it, and nothing else keeps a second copy. It owns the record format,
//! durability (an intent is fsynced before the action it announces) and chaining.
//! It must not know what a step does: `data` is opaque JSON to it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev` of a run's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of a run file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// UTC, RFC 3339.
    pub ts: String,
    pub run: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub kind: String,
    pub data: Value,
    pub prev: String,
    pub hash: String,
}

impl Record {
    /// SHA-256 over `prev` and the canonical serialization of every other field.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "ts": self.ts,
            "run": self.run,
            "operator": self.operator,
            "host": self.host,
            "kind": self.kind,
            "data": canonical(&self.data),
        });
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(body.to_string().as_bytes());
        hex::encode(h.finalize())
    }
}

/// JSON with object keys sorted, so the hash does not depend on insertion order.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} line {line}: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("run {run} is locked by pid {pid} on {host} since {since}; wait for it, or stop that controller first")]
    Locked {
        run: String,
        pid: u32,
        host: String,
        since: String,
    },
    #[error("no run `{run}` under {dir}; `patchbook audit verify` lists the runs it knows")]
    NoSuchRun { run: String, dir: PathBuf },
}

struct Tail {
    file: File,
    seq: u64,
    prev: String,
}

/// An open run journal. Appends are serialised and fsynced before they return.
pub struct Journal {
    path: PathBuf,
    run: String,
    operator: String,
    tail: Mutex<Tail>,
    redact: Vec<String>,
}

impl Journal {
    /// Path of a run's file under a state directory.
    pub fn run_path(state_dir: &Path, run: &str) -> PathBuf {
        state_dir.join("runs").join(format!("{run}.jsonl"))
    }

    /// Creates a new run file; fails if the run exists.
    pub fn create(state_dir: &Path, run: &str, operator: &str) -> Result<Self, JournalError> {
        let path = Self::run_path(state_dir, run);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().unwrap_or(state_dir)).map_err(io)?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Journal {
            path: path.clone(),
            run: run.to_string(),
            operator: operator.to_string(),
            tail: Mutex::new(Tail {
                file,
                seq: 0,
                prev: GENESIS.to_string(),
            }),
            redact: Vec::new(),
        })
    }

    /// Opens an existing run to append to it (resume, rollback).
    pub fn open(state_dir: &Path, run: &str, operator: &str) -> Result<Self, JournalError> {
        let path = Self::run_path(state_dir, run);
        if !path.exists() {
            return Err(JournalError::NoSuchRun {
                run: run.to_string(),
                dir: state_dir.join("runs"),
            });
        }
        let records = read_records(&path)?;
        let (seq, prev) = records
            .last()
            .map(|r| (r.seq, r.hash.clone()))
            .unwrap_or((0, GENESIS.to_string()));
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        Ok(Journal {
            path: path.clone(),
            run: run.to_string(),
            operator: operator.to_string(),
            tail: Mutex::new(Tail { file, seq, prev }),
            redact: Vec::new(),
        })
    }

    /// Values that must never reach the disk; each is replaced by `***`.
    pub fn with_secrets(mut self, secrets: Vec<String>) -> Self {
        self.redact = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        self
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and fsyncs it before returning.
    pub fn append(
        &self,
        host: Option<&str>,
        kind: &str,
        data: Value,
    ) -> Result<Record, JournalError> {
        let data = redact_value(data, &self.redact);
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = Record {
            seq: tail.seq + 1,
            ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            run: self.run.clone(),
            operator: self.operator.clone(),
            host: host.map(str::to_string),
            kind: kind.to_string(),
            data,
            prev: tail.prev.clone(),
            hash: String::new(),
        };
        rec.hash = rec.compute_hash();
        let mut line = serde_json::to_string(&rec).unwrap_or_default();
        line.push('\n');
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        tail.file.write_all(line.as_bytes()).map_err(io)?;
        tail.file.sync_data().map_err(io)?;
        tail.seq = rec.seq;
        tail.prev = rec.hash.clone();
        Ok(rec)
    }

    /// Every record of this run, read back from disk.
    pub fn records(&self) -> Result<Vec<Record>, JournalError> {
        read_records(&self.path)
    }
}

/// Reads a run file; a torn last line (crash mid-write) is ignored.
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    let file = File::open(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(&line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == n => break,
            Err(e) => {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Replaces every occurrence of a secret in every string of `v` with `***`.
pub fn redact_value(v: Value, secrets: &[String]) -> Value {
    if secrets.is_empty() {
        return v;
    }
    match v {
        Value::String(s) => Value::String(redact_str(&s, secrets)),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| redact_value(x, secrets)).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, x)| (k, redact_value(x, secrets)))
                .collect(),
        ),
        other => other,
    }
}

pub fn redact_str(s: &str, secrets: &[String]) -> String {
    let mut out = s.to_string();
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}
