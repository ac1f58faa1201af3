//! The journal: one append-only, hash-chained JSON Lines file per run.
//!
//! It is the one truth of a run: rollback, resume, audit, reports and patch levels
//! all read it, and nothing else keeps a second copy. It owns the record format,
//! durability (an intent is fsynced before the action it announces) and chaining,
//! and the type of every record kind ([`Entry`]), so that every reader derives the
//! same meaning from a record through serde. It must not act on what a record
//! says (that is the layers above), and it imports nothing of the crate.
//!
//! Submodules: [`entry`] (the typed records: one [`Entry`] variant per kind),
//! [`lock`] (one controller per run), [`index`] (the audit index of run
//! checkpoints), [`anchor`] (the Ed25519 key that signs index entries and closes),
//! [`fleet`] (a rollout shared with workers on the PostgreSQL store: its control
//! row and host claims),
//! [`audit`] (chain and signature verification), [`state`] (the read side: per-host
//! state, open intents, undo order, run listing).

pub mod anchor;
pub mod audit;
pub mod entry;
pub mod fleet;
mod group;
pub mod index;
pub mod lock;
pub mod pg;
pub mod private;
pub mod secrets;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use entry::{Entry, EntryError, LogRecord};
pub use store::Store;

/// The `prev` of a run's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of a run file. Every field but `prev` and `hash` is in the hash, and a
/// field it does not know makes the line unreadable: nothing rides along outside
/// the hashed content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
        let mut data = Vec::new();
        write_canonical(&mut data, &self.data);
        hash_parts(
            &self.prev,
            self.seq,
            &self.ts,
            &self.run,
            &self.operator,
            self.host.as_deref(),
            &self.kind,
            &data,
        )
    }

    /// The record's kind and data as a typed [`Entry`]. A kind this binary does not
    /// know is [`Entry::Unknown`]; a known kind whose data does not fit is an error.
    pub fn entry(&self) -> Result<Entry, JournalError> {
        Entry::from_parts(&self.kind, self.data.clone()).map_err(|source| JournalError::BadEntry {
            run: self.run.clone(),
            seq: self.seq,
            source,
        })
    }
}

/// The record hash from its parts, `data` already in canonical form: SHA-256 of
/// `prev` followed by `{"seq":…,"ts":…,"run":…,"operator":…,"host":…,"kind":…,"data":…}`
/// (compact JSON, fields in that order). Streamed into the hasher, so a record
/// costs no intermediate JSON tree.
#[allow(clippy::too_many_arguments)]
fn hash_parts(
    prev: &str,
    seq: u64,
    ts: &str,
    run: &str,
    operator: &str,
    host: Option<&str>,
    kind: &str,
    canonical_data: &[u8],
) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    let mut body = Vec::with_capacity(160 + canonical_data.len());
    body.extend_from_slice(b"{\"seq\":");
    body.extend_from_slice(seq.to_string().as_bytes());
    for (name, value) in [
        ("ts", Some(ts)),
        ("run", Some(run)),
        ("operator", Some(operator)),
    ] {
        json_field(&mut body, name, value);
    }
    json_field(&mut body, "host", host);
    json_field(&mut body, "kind", Some(kind));
    body.extend_from_slice(b",\"data\":");
    h.update(&body);
    h.update(canonical_data);
    h.update(b"}");
    hex::encode(h.finalize())
}

/// `,"name":"value"` (or `null`), escaped as serde_json escapes.
fn json_field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    match value {
        // Writing a str into a Vec cannot fail.
        Some(v) => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Writes `v` as compact JSON with object keys sorted at every level: the same
/// bytes as `canonical(v).to_string()`, without building the sorted copy.
pub fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(out, &map[k]);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, x);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// A record's `data` with both of its serialisations, made before the append lock
/// is taken: canonical (for the hash) and as given (for the line).
struct Prepared {
    value: Value,
    canonical: Vec<u8>,
    json: Vec<u8>,
}

impl Prepared {
    fn new(value: Value) -> Self {
        let mut canonical = Vec::new();
        write_canonical(&mut canonical, &value);
        let json = serde_json::to_vec(&value).unwrap_or_else(|_| b"null".to_vec());
        Prepared {
            value,
            canonical,
            json,
        }
    }
}

/// The line a record is written as: the bytes `serde_json::to_string(rec)` gives,
/// with `data` already serialised, and a newline.
fn line_bytes(rec: &Record, data_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(300 + data_json.len());
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(rec.seq.to_string().as_bytes());
    json_field(&mut out, "ts", Some(&rec.ts));
    json_field(&mut out, "run", Some(&rec.run));
    json_field(&mut out, "operator", Some(&rec.operator));
    if let Some(h) = &rec.host {
        json_field(&mut out, "host", Some(h));
    }
    json_field(&mut out, "kind", Some(&rec.kind));
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data_json);
    json_field(&mut out, "prev", Some(&rec.prev));
    json_field(&mut out, "hash", Some(&rec.hash));
    out.extend_from_slice(b"}\n");
    out
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

/// The kind strings of the records the journal's own API writes. Every kind is
/// listed in [`Entry::KINDS`]; readers match on [`Entry`], not on these.
pub mod kind {
    /// First record of every run; `data` is a [`super::RunHeader`].
    pub const RUN_START: &str = "run.start";
    /// Last record of a closed run.
    pub const RUN_CLOSE: &str = "run.close";
    /// A mutating step is about to act; `data` is a [`super::IntentData`].
    pub const STEP_INTENT: &str = "step.intent";
    /// What a step did; `data` is an [`super::OutcomeData`].
    pub const STEP_OUTCOME: &str = "step.outcome";
    /// A host's work ended; `data` is `{ok, detail}`.
    pub const HOST_FINISH: &str = "host.finish";
    /// A host's rollback ended; `data` is `{ok, detail}`.
    pub const HOST_ROLLBACK: &str = "host.rollback";
    /// A torn last line (crash mid-write) was cut off when the run was reopened.
    pub const JOURNAL_REPAIR: &str = "journal.repair";
    /// A backup archive of the record's host.
    pub const BACKUP: &str = "backup";
    /// A backup the controller stopped on its own side.
    pub const BACKUP_STOPPED: &str = "backup.stopped";
    /// A staging check.
    pub const TEST: &str = "test";
    /// One event of the rollout executor.
    pub const ROLLOUT_EVENT: &str = "rollout.event";
    /// The maintenance window the playbook set.
    pub const WINDOW: &str = "window";
}

/// What the first record of a run names: enough to say later exactly what ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunHeader {
    pub playbook: PathBuf,
    /// SHA-256 of the compiled playbook version the run pinned.
    pub playbook_sha256: String,
    /// Every imported module: its path (as resolved) and SHA-256.
    #[serde(default)]
    pub modules: BTreeMap<String, String>,
    pub inventory_sha256: String,
    pub patchbook_version: String,
    /// The rollout policy (waves, budget, window, …) as the playbook gave it.
    #[serde(default)]
    pub policy: Value,
    /// Set for an ad-hoc `patchbook exec` run: what ran, on which hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_hoc: Option<AdHoc>,
    /// Every `--param` the run started with, by name, as [`param_digest`] of its
    /// value: a value may be a secret, so the journal never holds it. `None` in
    /// journals written before params were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<BTreeMap<String, String>>,
    /// SHA-256 of the config file the run started with (trusted sources, pinned
    /// keys, limits, notify settings); `None` when it ran on built-in defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Set by `run --retry RUN`: the run whose failed and unreachable hosts this
    /// run works on again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

/// The digest a run header keeps of a `--param` value: SHA-256 over the run id,
/// the name and the value, so equal values in two runs do not give equal digests
/// and a table of digests of common values does not apply.
pub fn param_digest(run: &str, name: &str, value: &str) -> String {
    let mut h = Sha256::new();
    for part in [run, name, value] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A resume refused because the run would not be the one the journal started.
#[derive(Debug, thiserror::Error)]
#[error("run {run} cannot be resumed: {}; a resume runs exactly what the run started with. Restore them (the same playbook, libraries, config and --param values), or start a new run with `patchbook run PLAYBOOK`", differences.join("; "))]
pub struct ResumeRefused {
    pub run: String,
    /// One sentence per difference, naming what differs but never a value.
    pub differences: Vec<String>,
}

/// What an ad-hoc run (`patchbook exec SELECTOR SNIPPET`) ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdHoc {
    pub selector: String,
    pub snippet: String,
}

impl RunHeader {
    /// A header stamped with this build's version.
    pub fn new(
        playbook: PathBuf,
        playbook_sha256: String,
        modules: BTreeMap<String, String>,
        inventory_sha256: String,
        policy: Value,
    ) -> Self {
        RunHeader {
            playbook,
            playbook_sha256,
            modules,
            inventory_sha256,
            patchbook_version: env!("CARGO_PKG_VERSION").to_string(),
            policy,
            ad_hoc: None,
            params: None,
            config_sha256: None,
            retry_of: None,
        }
    }

    /// The same header, naming the config it ran under by its SHA-256.
    pub fn with_config(mut self, config_sha256: Option<String>) -> Self {
        self.config_sha256 = config_sha256;
        self
    }

    /// Checks that `now` (the header a resume would write) runs the same thing as
    /// this one: playbook, imported modules, config and `--param` values. What the
    /// journal did not record (older runs) is not compared.
    pub fn check_resume(&self, run: &str, now: &RunHeader) -> Result<(), ResumeRefused> {
        let mut differences = Vec::new();
        if self.playbook_sha256 != now.playbook_sha256 {
            differences.push(format!(
                "the playbook {} has sha256 {}, the run started with {}",
                now.playbook.display(),
                now.playbook_sha256,
                self.playbook_sha256
            ));
        }
        // Module keys are import names (`run`) or paths (`watch`): compare contents.
        let mut was: Vec<&String> = self.modules.values().collect();
        let mut is: Vec<&String> = now.modules.values().collect();
        was.sort();
        is.sort();
        if was != is {
            differences.push("an imported library module changed since the run started".into());
        }
        if self.config_sha256.is_some() && self.config_sha256 != now.config_sha256 {
            differences.push(format!(
                "the config (trusted sources, keys, limits, notify) has sha256 {}, the run started with {}",
                now.config_sha256.as_deref().unwrap_or("none (built-in defaults)"),
                self.config_sha256.as_deref().unwrap_or("none (built-in defaults)")
            ));
        }
        if let (Some(was), Some(is)) = (&self.params, &now.params) {
            let names: std::collections::BTreeSet<&String> = was.keys().chain(is.keys()).collect();
            for name in names {
                match (was.get(name), is.get(name)) {
                    (Some(a), Some(b)) if a != b => {
                        differences.push(format!("--param {name} has another value"))
                    }
                    (Some(_), None) => differences.push(format!(
                        "--param {name} is missing (the run started with it)"
                    )),
                    (None, Some(_)) => differences.push(format!(
                        "--param {name} is new (the run started without it)"
                    )),
                    _ => {}
                }
            }
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(ResumeRefused {
                run: run.to_string(),
                differences,
            })
        }
    }
}

/// A step of a run, named by the `seq` of its intent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepId(pub u64);

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How to reverse a step that changed a host. Recorded with the step's outcome, so
/// rollback needs nothing but the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UndoStep {
    /// Install the previous version again from a cached, checksummed artifact.
    Reinstall {
        package: String,
        artifact_sha256: String,
        artifact_path: PathBuf,
        version: String,
    },
    /// Unpack backup archives over the paths they were taken from, newest first.
    Restore { backups: Vec<BackupRef> },
    /// Remove a package that was not installed before.
    Remove { package: String },
    /// Run this argv on the host; it reverses an `exec`/`shell` change the
    /// playbook declared reversible. Fails unless it exits 0.
    Command { argv: Vec<String> },
    /// Cannot be reversed automatically; a person must.
    Manual { reason: String },
    /// Bring a service back to the state a `service` step found it in: active or
    /// not, and enabled or not where that was known. A restart or reload cannot be
    /// undone (`restarted`); its undo only makes the unit active again.
    Service {
        unit: String,
        was_active: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        was_enabled: Option<bool>,
        #[serde(default)]
        restarted: bool,
    },
    /// Put a file back exactly as it was before a file step changed it (its bytes
    /// from the controller's store, mode, owner and group), or remove it when it
    /// did not exist.
    File {
        path: String,
        previous: Option<PreviousFile>,
    },
    /// Put packages back at the versions they had before a repository upgrade,
    /// from the repository or the host's package cache; purge those that were absent.
    Packages { versions: Vec<PackageBefore> },
}

/// A host file as it was before a file step, as an undo step names it. The bytes
/// are on the controller, at `<state>/files/<sha256>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousFile {
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One package as a repository upgrade found it, for its undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageBefore {
    pub package: String,
    /// `None`: the upgrade installed it new, so the undo purges it.
    pub version: Option<String>,
    /// Where the undo reinstalls `version` from when the repository no longer
    /// offers it: a `.deb` on the host, checked against its SHA-256 first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<CachedPackage>,
}

/// A package file kept on the host (`/var/cache/apt/archives`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPackage {
    pub path: String,
    pub sha256: String,
}

/// A backup archive on the controller, as an undo step names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRef {
    pub id: String,
    pub archive: PathBuf,
    pub sha256: String,
    /// Absolute paths on the host the archive was taken from.
    pub paths: Vec<String>,
}

/// `data` of a [`kind::STEP_INTENT`] record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentData {
    pub step: String,
    #[serde(default)]
    pub input: Value,
    /// Set when this step applies the undo of an earlier step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undoes: Option<StepId>,
}

/// `data` of a [`kind::STEP_OUTCOME`] record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeData {
    pub step_id: StepId,
    pub step: String,
    pub ok: bool,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub undo: Option<UndoStep>,
}

/// `data` of [`kind::HOST_FINISH`] and [`kind::HOST_ROLLBACK`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEndData {
    pub ok: bool,
    #[serde(default)]
    pub detail: entry::HostEndDetail,
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
    /// Another run holds some of the hosts a claim asked for.
    #[error("{busy}; nothing was changed. Wait for that run to end, or pass `--wait` to queue behind it")]
    HostsBusy { busy: lock::BusyHosts },
    #[error("waited {} for hosts that are still busy: {busy}; nothing was changed. Try again later, or wait longer with `--wait=DURATION`", crate::config::format_duration(*waited))]
    WaitTimedOut {
        busy: lock::BusyHosts,
        waited: std::time::Duration,
    },
    #[error("stopped while waiting for hosts: {busy}; nothing was changed")]
    WaitCancelled { busy: lock::BusyHosts },
    #[error("no run `{run}` under {dir}; `patchbook audit verify` lists the runs it knows")]
    NoSuchRun { run: String, dir: PathBuf },
    #[error("run `{run}` already exists at {path}; resume it, or pick another run id")]
    Exists { run: String, path: PathBuf },
    #[error("`{run}` is not a usable run id: use letters, digits, `-`, `_` and `.`, not starting with `.`")]
    BadRunId { run: String },
    #[error("run {run}: no open intent {step} for host {host}; an outcome must follow its own intent, once")]
    UnknownStep {
        run: String,
        host: String,
        step: StepId,
    },
    #[error("run {run} cannot be continued: {problem}; last good seq {last_good_seq}. Keep the file as evidence and see `patchbook audit verify {run}`")]
    Tampered {
        run: String,
        problem: String,
        last_good_seq: u64,
    },
    #[error("journal {path} can no longer be appended to ({message}); stop this controller, check the disk, then resume the run")]
    Broken { path: PathBuf, message: String },
    #[error("run {run} already has {records} records; the run header must be its first record")]
    HeaderNotFirst { run: String, records: u64 },
    #[error("run {run} record {seq}: {source}")]
    BadEntry {
        run: String,
        seq: u64,
        #[source]
        source: EntryError,
    },
    #[error("journal store {url}: {message}; check that the PostgreSQL server is up and that the store URL (`--store`, `PATCHBOOK_STORE` or `[store] url`) names it, with a user that may create tables")]
    Store { url: String, message: String },
    #[error("run {run} is not in a PostgreSQL store: workers share a run through the database; start it with `patchbook run PLAYBOOK --store postgres://… --workers external`")]
    NotShared { run: String },
    #[error("`{url}` is not a store this build knows: use `postgres://USER@HOST/DB` (or `postgresql://…`), or leave the store unset for run files in the state directory")]
    BadStoreUrl { url: String },
}

/// UTC now, RFC 3339 with microseconds: the one timestamp format of the journal.
pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Makes a directory entry (a new file, a rename) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

fn check_run_id(run: &str) -> Result<(), JournalError> {
    let ok = !run.is_empty()
        && !run.starts_with('.')
        && run
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(JournalError::BadRunId {
            run: run.to_string(),
        })
    }
}

/// Where appended records go.
enum Sink {
    /// The run file, opened for append.
    File(File),
    /// The PostgreSQL store: records go through [`Journal::pg`]'s group commit,
    /// never under the `tail` lock (its waiters would hold up every appender).
    Postgres,
}

/// A journal's connection to the PostgreSQL store, shared by its appenders: each
/// transaction writes every record queued while the one before was in flight.
struct PgSink {
    url: String,
    group: group::Group<pg::Appender, Queued, Record>,
}

impl PgSink {
    fn new(url: &str, client: postgres::Client) -> Self {
        PgSink {
            url: url.to_string(),
            group: group::Group::new(pg::Appender::new(client)),
        }
    }
}

/// A record waiting for the PostgreSQL store's next transaction, its host and
/// kind already redacted.
struct Queued {
    host: Option<String>,
    kind: String,
    /// `None` for the run's close, whose signature covers the seq and prev the
    /// transaction finds.
    data: Option<Prepared>,
}

struct Tail {
    sink: Sink,
    seq: u64,
    prev: String,
    /// Set after a failed write: the file may end in half a line, so nothing more
    /// may be appended through this handle.
    broken: Option<String>,
    /// Intents still waiting for their outcome: step → (host, step name).
    open_steps: HashMap<StepId, (String, String)>,
    /// Each host's records as written, so a step can consult its host's history
    /// without re-reading the whole run file (a view of the file, not a second truth).
    /// Kept as their journal lines, read back on demand: a line is a few hundred
    /// bytes, the same record as a `Value` tree several times that, and at 100,000
    /// hosts this view was most of a run's memory.
    by_host: HashMap<String, Vec<Box<[u8]>>>,
}

/// A failed [`write_whole_line`]: the write's error, and whether cutting the part
/// already written worked.
struct LineWriteError {
    error: std::io::Error,
    cut: std::io::Result<()>,
}

/// Writes `line` whole or not at all: on a failed write (ENOSPC, EDQUOT, EIO)
/// after part of it reached the file, the file is cut back to where it ended.
fn write_whole_line(file: &mut File, line: &[u8]) -> Result<(), LineWriteError> {
    let mut written = 0usize;
    while written < line.len() {
        match file.write(&line[written..]) {
            Ok(0) => {
                let error = std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the journal file took no more bytes",
                );
                return Err(LineWriteError {
                    error,
                    cut: cut_back(file, written),
                });
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                return Err(LineWriteError {
                    error,
                    cut: cut_back(file, written),
                })
            }
        }
    }
    Ok(())
}

/// Removes the last `written` bytes of `file`.
fn cut_back(file: &File, written: usize) -> std::io::Result<()> {
    if written == 0 {
        return Ok(());
    }
    let len = file.metadata()?.len();
    file.set_len(len.saturating_sub(written as u64))
}

/// An open run journal. Appends are serialised and fsynced before they return, and
/// the run's lock is held for as long as this value lives (except by a worker that
/// joined a shared run, [`Journal::join_in`]).
pub struct Journal {
    path: PathBuf,
    state_dir: PathBuf,
    /// Where this run's records are (the state directory's files, or PostgreSQL).
    store: Store,
    run: String,
    operator: String,
    tail: Mutex<Tail>,
    /// The PostgreSQL store's connection; `None` for run files.
    pg: Option<PgSink>,
    /// Group commit: the seq of the last record written (not yet necessarily synced).
    written: AtomicU64,
    durable: Mutex<Durable>,
    durable_changed: Condvar,
    /// A second descriptor of the run file, so an fsync never holds the append lock.
    /// `None` with PostgreSQL, where each record is durable once its insert commits.
    sync_file: Option<File>,
    /// Values shown as `***`; grows when a script declares a `secret()`.
    redact: Secrets,
    /// `None` for a run joined by a worker ([`Journal::join_in`]): the
    /// coordinator holds the run; workers append beside it through the database.
    lock: Option<lock::RunLock>,
    holder: lock::Holder,
    /// The key that signs this run's checkpoints and close (`[audit] signing_key`).
    anchor: Option<anchor::Anchor>,
    /// The seq of the last signed checkpoint.
    checkpointed: Mutex<u64>,
    /// The last seq on disk when this process opened the run: records up to it
    /// were written by an earlier process (0 for a run this process began).
    opened_at: u64,
    /// Shown each record as it is written ([`Journal::set_tap`]).
    tap: std::sync::OnceLock<JournalTap>,
}

/// A function shown every record of a journal as it is written, in order, for a
/// live view of the run (`watch`'s console). It runs under the append lock, so it
/// must be quick and must not write to the same journal.
#[derive(Clone)]
pub struct JournalTap(pub std::sync::Arc<dyn Fn(&Record) + Send + Sync>);

impl std::fmt::Debug for JournalTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JournalTap")
    }
}

/// With a signing key, a durable record at least this many records after the last
/// signed checkpoint gets a new one in the audit index. Checkpoints cost an index
/// append (a lock and an fsync), so they ride on group commits at this spacing
/// rather than on each; a run's close is always signed.
pub const CHECKPOINT_EVERY: u64 = 64;

/// What is known to be on disk. One appender at a time runs the fsync; the others
/// wait for it, and each fsync covers every record written before it began.
struct Durable {
    synced: u64,
    syncing: bool,
    failed: Option<String>,
}

impl Journal {
    /// Path of a run's file under a state directory.
    pub fn run_path(state_dir: &Path, run: &str) -> PathBuf {
        state_dir.join("runs").join(format!("{run}.jsonl"))
    }

    /// Creates a new run file, locked; fails if the run exists. The file and its
    /// directory entry are on disk when this returns, and the audit index knows the
    /// run is open. Write the header next with [`Journal::start`], or use
    /// [`Journal::begin`] for both.
    pub fn create(state_dir: &Path, run: &str, operator: &str) -> Result<Self, JournalError> {
        Self::create_with(state_dir, run, operator, None)
    }

    /// [`Journal::create`], signing the run's index entries, checkpoints and close
    /// with `anchor`'s key.
    pub fn create_with(
        state_dir: &Path,
        run: &str,
        operator: &str,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        Self::create_in(&Store::file(state_dir), run, operator, anchor)
    }

    /// [`Journal::create_with`] in `store`: with PostgreSQL the run is a row of
    /// `runs` and its records rows of `records`; the lock and the audit index stay
    /// in the store's state directory.
    pub fn create_in(
        store: &Store,
        run: &str,
        operator: &str,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        check_run_id(run)?;
        let state_dir = store.state_dir();
        let path = store.run_location(run);
        let runs_dir = state_dir.join("runs");
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let fresh_state = !state_dir.exists();
        let fresh_runs = !runs_dir.exists();
        private::create_dir_all(&runs_dir).map_err(io)?;
        if fresh_state {
            if let Some(parent) = state_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        if fresh_runs {
            fsync_dir(state_dir)?;
        }
        let lock = lock::RunLock::acquire(state_dir, run)?;
        let exists = || JournalError::Exists {
            run: run.to_string(),
            path: path.clone(),
        };
        let (sink, sync_file, pg) = match store {
            Store::File { .. } => {
                let file = match private::options().create_new(true).append(true).open(&path) {
                    Ok(f) => {
                        private::seal(&f).map_err(io)?;
                        f
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
                    Err(e) => return Err(io(e)),
                };
                fsync_dir(&runs_dir)?;
                let sync_file = file.try_clone().map_err(io)?;
                (Sink::File(file), Some(sync_file), None)
            }
            Store::Postgres { url, .. } => {
                let mut client = pg::connect(url)?;
                let created = pg::create_run(&mut client, run, operator)
                    .map_err(|e| pg::store_error(url, &e))?;
                if !created {
                    return Err(exists());
                }
                (Sink::Postgres, None, Some(PgSink::new(url, client)))
            }
        };
        index::append(
            state_dir,
            run,
            index::IndexEvent::Open,
            0,
            GENESIS,
            anchor.as_ref(),
        )?;
        Ok(Journal {
            path: path.clone(),
            state_dir: state_dir.to_path_buf(),
            store: store.clone(),
            run: run.to_string(),
            operator: operator.to_string(),
            sync_file,
            pg,
            tail: Mutex::new(Tail {
                sink,
                seq: 0,
                prev: GENESIS.to_string(),
                broken: None,
                open_steps: HashMap::new(),
                by_host: HashMap::new(),
            }),
            written: AtomicU64::new(0),
            durable: Mutex::new(Durable {
                synced: 0,
                syncing: false,
                failed: None,
            }),
            durable_changed: Condvar::new(),
            // The process's store until the runtime's is shared (`with_secrets`).
            redact: Secrets::process(),
            holder: lock.holder_note().clone(),
            lock: Some(lock),
            anchor,
            checkpointed: Mutex::new(0),
            opened_at: 0,
            tap: std::sync::OnceLock::new(),
        })
    }

    /// [`Journal::create`] followed by [`Journal::start`].
    pub fn begin(
        state_dir: &Path,
        run: &str,
        operator: &str,
        header: &RunHeader,
    ) -> Result<Self, JournalError> {
        Self::begin_with(state_dir, run, operator, header, None)
    }

    /// [`Journal::create_with`] followed by [`Journal::start`].
    pub fn begin_with(
        state_dir: &Path,
        run: &str,
        operator: &str,
        header: &RunHeader,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        Self::begin_in(&Store::file(state_dir), run, operator, header, anchor)
    }

    /// [`Journal::begin_with`] in `store`.
    pub fn begin_in(
        store: &Store,
        run: &str,
        operator: &str,
        header: &RunHeader,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        let j = Self::create_in(store, run, operator, anchor)?;
        j.start(header)?;
        Ok(j)
    }

    /// Writes the `run.start` record; it must be the run's first record.
    pub fn start(&self, header: &RunHeader) -> Result<Record, JournalError> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.seq != 0 {
            return Err(JournalError::HeaderNotFirst {
                run: self.run.clone(),
                records: tail.seq,
            });
        }
        let entry = Entry::RunStart(header.clone());
        let data = Prepared::new(entry.to_data());
        let rec = if let Some(sink) = &self.pg {
            drop(tail);
            self.pg_append(sink, None, entry.kind(), Some(data))?
        } else {
            let rec = self.append_locked(&mut tail, None, entry.kind(), data)?;
            drop(tail);
            rec
        };
        self.durable(rec.seq, &rec.hash)?;
        Ok(rec)
    }

    /// Opens an existing run to append to it (resume, rollback), taking its lock.
    /// A torn last line left by a crash is cut off and the cut is recorded.
    pub fn open(state_dir: &Path, run: &str, operator: &str) -> Result<Self, JournalError> {
        Self::open_with(state_dir, run, operator, None)
    }

    /// [`Journal::open`], signing with `anchor`'s key from here on.
    pub fn open_with(
        state_dir: &Path,
        run: &str,
        operator: &str,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        Self::open_in(&Store::file(state_dir), run, operator, anchor)
    }

    /// [`Journal::open_with`] for a run in `store`.
    pub fn open_in(
        store: &Store,
        run: &str,
        operator: &str,
        anchor: Option<anchor::Anchor>,
    ) -> Result<Self, JournalError> {
        check_run_id(run)?;
        let state_dir = store.state_dir();
        let path = store.run_location(run);
        let no_such_run = || JournalError::NoSuchRun {
            run: run.to_string(),
            dir: store.location(),
        };
        if store.scan(run)?.is_none() {
            return Err(no_such_run());
        }
        let lock = lock::RunLock::acquire(state_dir, run)?;
        // Read again under the lock: the records an earlier holder left are final now.
        let scan = store.scan(run)?.ok_or_else(no_such_run)?;
        if let Some((line, message)) = scan.bad.first() {
            return Err(JournalError::Corrupt {
                path,
                line: *line,
                message: format!(
                    "{message}; run `patchbook audit verify {run}` before resuming this run"
                ),
            });
        }
        let chain: Vec<&Record> = scan.items.iter().map(|(_, r)| r).collect();
        if let Err((problem, last_good_seq)) = audit::check_chain(run, &chain) {
            return Err(JournalError::Tampered {
                run: run.to_string(),
                problem: problem.to_string(),
                last_good_seq,
            });
        }
        // Whatever this controller appends next it signs: it must not vouch for a
        // run a writer of the state directory re-hashed, or whose close it dropped.
        if let Some(a) = &anchor {
            let opts = audit::VerifyOptions {
                key: Some(a.signer.verify_key()),
                expect_at_least: None,
            };
            let report = audit::verify_in(store, Some(run), &opts)?;
            if let Some(audit::Verdict::Tampered {
                problem,
                last_good_seq,
            }) = report.run(run).map(|r| &r.verdict)
            {
                return Err(JournalError::Tampered {
                    run: run.to_string(),
                    problem: problem.to_string(),
                    last_good_seq: *last_good_seq,
                });
            }
        }
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let (sink, sync_file, torn, pg) = match store {
            Store::File { .. } => {
                let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
                let torn = if scan.torn.is_some() {
                    let dropped = scan.total_len - scan.good_len;
                    file.set_len(scan.good_len).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    Some(dropped)
                } else {
                    if scan.good_len < scan.total_len {
                        // The last record is whole but its newline never reached the disk.
                        (&file).write_all(b"\n").map_err(io)?;
                        file.sync_data().map_err(io)?;
                    }
                    None
                };
                let sync_file = file.try_clone().map_err(io)?;
                (Sink::File(file), Some(sync_file), torn, None)
            }
            // A row is inserted whole or not at all: nothing to repair.
            Store::Postgres { url, .. } => (
                Sink::Postgres,
                None,
                None,
                Some(PgSink::new(url, pg::connect(url)?)),
            ),
        };
        let records: Vec<Record> = scan.items.into_iter().map(|(_, r)| r).collect();
        let (seq, prev) = records
            .last()
            .map(|r| (r.seq, r.hash.clone()))
            .unwrap_or((0, GENESIS.to_string()));
        let open_steps = state::RunState::from_records(run, &records)
            .open_intents()
            .into_iter()
            .map(|(host, s)| (s.id, (host.to_string(), s.step.clone())))
            .collect();
        let mut by_host: HashMap<String, Vec<Box<[u8]>>> = HashMap::new();
        for r in &records {
            if let Some(h) = &r.host {
                // A record read from the store serialises again: it came from JSON.
                if let Ok(line) = serde_json::to_vec(r) {
                    by_host
                        .entry(h.clone())
                        .or_default()
                        .push(line.into_boxed_slice());
                }
            }
        }
        let index = index::read(state_dir)?;
        let closed = index
            .entries
            .iter()
            .rev()
            .find(|e| e.run == run)
            .is_some_and(|e| e.event == index::IndexEvent::Close);
        if closed {
            index::append(
                state_dir,
                run,
                index::IndexEvent::Reopen,
                seq,
                &prev,
                anchor.as_ref(),
            )?;
        }
        let j = Journal {
            path: path.clone(),
            state_dir: state_dir.to_path_buf(),
            store: store.clone(),
            run: run.to_string(),
            operator: operator.to_string(),
            sync_file,
            pg,
            tail: Mutex::new(Tail {
                sink,
                seq,
                prev,
                broken: None,
                open_steps,
                by_host,
            }),
            written: AtomicU64::new(seq),
            durable: Mutex::new(Durable {
                synced: seq,
                syncing: false,
                failed: None,
            }),
            durable_changed: Condvar::new(),
            // The process's store until the runtime's is shared (`with_secrets`).
            redact: Secrets::process(),
            holder: lock.holder_note().clone(),
            lock: Some(lock),
            anchor,
            checkpointed: Mutex::new(seq),
            opened_at: seq,
            tap: std::sync::OnceLock::new(),
        };
        if let Some(dropped) = torn {
            j.append_entry(
                None,
                &Entry::JournalRepair(entry::JournalRepair {
                    torn_after_seq: seq,
                    dropped_bytes: dropped,
                }),
            )?;
        }
        Ok(j)
    }

    /// Joins a run in the PostgreSQL store to append beside the process that holds
    /// it: a `patchbook worker` writing its hosts' records into the coordinator's
    /// run. No run lock is taken (the coordinator has it, perhaps on another
    /// machine) and nothing is written on joining; each record chains onto the
    /// run's last record in the database under the run's append lock (see
    /// `pg::append_batch`), so the run stays one chain that `audit verify` checks as
    /// it checks any run. A host's earlier records are read when the worker takes
    /// the host ([`Journal::adopt_host`]).
    pub fn join_in(store: &Store, run: &str, operator: &str) -> Result<Self, JournalError> {
        check_run_id(run)?;
        let Store::Postgres { url, state_dir } = store else {
            return Err(JournalError::NotShared {
                run: run.to_string(),
            });
        };
        let mut client = pg::connect(url)?;
        let tail = pg::tail(&mut client, run).map_err(|e| pg::store_error(url, &e))?;
        let Some((seq, prev)) = tail else {
            return Err(JournalError::NoSuchRun {
                run: run.to_string(),
                dir: store.location(),
            });
        };
        Ok(Journal {
            path: store.run_location(run),
            state_dir: state_dir.clone(),
            store: store.clone(),
            run: run.to_string(),
            operator: operator.to_string(),
            sync_file: None,
            pg: Some(PgSink::new(url, client)),
            tail: Mutex::new(Tail {
                sink: Sink::Postgres,
                seq,
                prev,
                broken: None,
                open_steps: HashMap::new(),
                by_host: HashMap::new(),
            }),
            written: AtomicU64::new(seq),
            durable: Mutex::new(Durable {
                synced: seq,
                syncing: false,
                failed: None,
            }),
            durable_changed: Condvar::new(),
            redact: Secrets::process(),
            lock: None,
            holder: lock::Holder::current(),
            anchor: None,
            checkpointed: Mutex::new(seq),
            opened_at: seq,
            tap: std::sync::OnceLock::new(),
        })
    }

    /// Reads `host`'s records of this run from the store again, for a process
    /// that takes the host over from another (a worker after a crashed one): the
    /// host's history and its open intents become this journal's, so its steps
    /// see what was done before and close what was left open, as on a resume.
    pub fn adopt_host(&self, host: &str) -> Result<state::HostHistory, JournalError> {
        // Read before taking `tail`: the connection may be in a transaction whose
        // leader needs `tail` to finish it.
        let stored = match &self.pg {
            Some(sink) => Some(
                sink.group
                    .with_conn(|c| pg::host_lines(&mut c.client, &self.run, host))
                    .map_err(|e| self.pg_error(sink, e))?
                    .map_err(|e| pg::store_error(&sink.url, &e))?,
            ),
            None => None,
        };
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let (records, lines): (Vec<Record>, Vec<Box<[u8]>>) = match stored {
            Some(lines) => {
                let scan = store::scan_rows::<Record>(&lines);
                if let Some((line, message)) = scan.bad.into_iter().next() {
                    return Err(JournalError::Corrupt {
                        path: self.path.clone(),
                        line,
                        message,
                    });
                }
                let kept = lines.iter().map(|l| l.as_bytes().into()).collect();
                (scan.items.into_iter().map(|(_, r)| r).collect(), kept)
            }
            None => {
                let lines = tail.by_host.get(host).cloned().unwrap_or_default();
                let records = lines
                    .iter()
                    .filter_map(|l| serde_json::from_slice(l).ok())
                    .collect();
                (records, lines)
            }
        };
        let state = state::RunState::from_records(&self.run, &records);
        tail.open_steps.retain(|_, (h, _)| h != host);
        for (h, s) in state.open_intents() {
            tail.open_steps
                .insert(s.id, (h.to_string(), s.step.clone()));
        }
        tail.by_host.insert(host.to_string(), lines);
        drop(tail);
        Ok(self.host_state(host))
    }

    /// Adds a value to hide from every record written from now on (to the store
    /// this journal shares, see [`Journal::with_secrets`]).
    pub fn add_secret(&self, value: &str) {
        self.redact.add(value);
    }

    fn secrets_now(&self) -> Vec<String> {
        self.redact.list()
    }

    /// Shares `secrets` (the runtime's store): values added to it anywhere are
    /// hidden from this journal's records from then on.
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.redact = secrets;
        self
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn operator(&self) -> &str {
        &self.operator
    }

    /// The last seq an earlier process wrote: non-zero when this process reopened
    /// the run (`run --resume`, `rollback`).
    pub fn opened_at(&self) -> u64 {
        self.opened_at
    }

    /// Whether this process holds the run's lock; `false` for a worker that
    /// joined the run ([`Journal::join_in`]) beside the process that holds it.
    pub fn holds_run(&self) -> bool {
        self.lock.is_some()
    }

    /// Who holds this run's lock: this process.
    pub fn holder(&self) -> &lock::Holder {
        self.lock.as_ref().map_or(&self.holder, |l| l.holder_note())
    }

    /// Shows every record written from now on to `tap` as well (records written
    /// before are not replayed). A journal has at most one tap; a second is refused
    /// and returned.
    pub fn set_tap(&self, tap: JournalTap) -> Result<(), JournalTap> {
        self.tap.set(tap)
    }

    /// Appends one typed record and fsyncs it before returning. Secrets are
    /// redacted from the host, the keys and the values.
    pub fn append_entry(&self, host: Option<&str>, entry: &Entry) -> Result<Record, JournalError> {
        self.append(host, entry.kind(), entry.to_data())
    }

    /// Appends one typed record without waiting for its fsync; see
    /// [`Journal::note`] for when it is durable.
    pub fn note_entry(&self, host: Option<&str>, entry: &Entry) -> Result<Record, JournalError> {
        self.note(host, entry.kind(), entry.to_data())
    }

    /// [`Journal::append_entry`] with the kind and data given apart: for tests that
    /// write records of other shapes on purpose. The crate writes typed entries
    /// only (`tests/typed_records.rs` guards it); readers see every record through
    /// [`Record::entry`], so `data` must be what [`Entry`] says `kind` holds.
    pub fn append(
        &self,
        host: Option<&str>,
        kind: &str,
        data: Value,
    ) -> Result<Record, JournalError> {
        let rec = self.note(host, kind, data)?;
        self.durable(rec.seq, &rec.hash)?;
        Ok(rec)
    }

    /// Appends one record that announces no action on a host (an observation, a
    /// progress event, a host's end) without waiting for its fsync. It is written
    /// and chained at once, so a crash of this process cannot lose it, and it is on
    /// disk no later than the next group commit: every [`Journal::intent`] and
    /// [`Journal::outcome`] (of any host), [`Journal::flush`] and
    /// [`Journal::close`] fsync every record written before them. So no host acts
    /// on anything this record says before it is durable, and a 10,000-host run
    /// pays one fsync per group commit instead of one per record.
    ///
    /// Takes the kind and data apart, for the script layer until it moves to typed
    /// entries; everything else writes through [`Journal::note_entry`].
    pub fn note(
        &self,
        host: Option<&str>,
        kind: &str,
        data: Value,
    ) -> Result<Record, JournalError> {
        // Serialised before the lock: appenders wait on each other only for the
        // hash chain and the write.
        let data = Prepared::new(redact_value(data, &self.secrets_now()));
        if let Some(sink) = &self.pg {
            return self.pg_append(sink, host, kind, Some(data));
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        self.append_locked(&mut tail, host, kind, data)
    }

    /// Appends one record to the PostgreSQL store through the group commit and
    /// returns once the transaction holding it committed. Must not be called with
    /// `tail` held: the transaction's leader takes it to note what it wrote.
    fn pg_append(
        &self,
        sink: &PgSink,
        host: Option<&str>,
        kind: &str,
        data: Option<Prepared>,
    ) -> Result<Record, JournalError> {
        let secrets = self.secrets_now();
        let item = Queued {
            host: host.map(|h| redact_str(h, &secrets)),
            kind: redact_str(kind, &secrets),
            data,
        };
        sink.group
            .submit(item, |conn, batch| self.pg_write(conn, batch))
            .map_err(|e| self.pg_error(sink, e))
    }

    /// Writes one batch in one transaction (run by whichever appender leads it),
    /// then notes every record, in seq order, as the file sink does after a write.
    fn pg_write(&self, conn: &mut pg::Appender, batch: Vec<Queued>) -> Result<Vec<Record>, String> {
        let secrets = self.secrets_now();
        let operator = redact_str(&self.operator, &secrets);
        let written = pg::append_batch(conn, &self.run, batch, |q, seq, prev| {
            let data = q.data.unwrap_or_else(|| {
                // The close's signature is part of its hashed data, over the seq
                // and prev this transaction found.
                let sig = self
                    .anchor
                    .as_ref()
                    .map(|a| a.signer.sign_close(&self.run, seq + 1, &prev));
                Prepared::new(Entry::RunClose(entry::RunClose { sig }).to_data())
            });
            self.make_record(seq + 1, prev, q.host, q.kind, &operator, data)
        })
        .map_err(|e| pg::error_message(&e))?;
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        Ok(written
            .into_iter()
            .map(|(rec, line)| {
                self.remember(&mut tail, &rec, &line);
                rec
            })
            .collect())
    }

    fn pg_error(&self, sink: &PgSink, e: group::GroupError) -> JournalError {
        match e {
            // The COMMIT may have reached the server before the connection failed:
            // only a reopen, which reads the store, knows where the chain ends.
            group::GroupError::Failed(message) => JournalError::Store {
                url: pg::shown_url(&sink.url),
                message,
            },
            group::GroupError::Broken(message) => JournalError::Broken {
                path: self.path.clone(),
                message,
            },
        }
    }

    /// How many transactions this journal's PostgreSQL appends took so far (each
    /// writes every record queued while the one before was in flight); `None`
    /// for run files.
    pub fn store_transactions(&self) -> Option<u64> {
        self.pg.as_ref().map(|sink| sink.group.writes())
    }

    /// A record chained onto (seq − 1, `prev`) and its journal line; `host` and
    /// `kind` come redacted.
    fn make_record(
        &self,
        seq: u64,
        prev: String,
        host: Option<String>,
        kind: String,
        operator: &str,
        data: Prepared,
    ) -> (Record, Vec<u8>) {
        let mut rec = Record {
            seq,
            ts: now_rfc3339(),
            run: self.run.clone(),
            operator: operator.to_string(),
            host,
            kind,
            data: data.value,
            prev,
            hash: String::new(),
        };
        rec.hash = hash_parts(
            &rec.prev,
            rec.seq,
            &rec.ts,
            &rec.run,
            &rec.operator,
            rec.host.as_deref(),
            &rec.kind,
            &data.canonical,
        );
        let line = line_bytes(&rec, &data.json);
        (rec, line)
    }

    /// Notes a written record: the tail, its host's history, the tap.
    fn remember(&self, tail: &mut Tail, rec: &Record, line: &[u8]) {
        tail.seq = tail.seq.max(rec.seq);
        if tail.seq == rec.seq {
            tail.prev = rec.hash.clone();
        }
        if let Some(h) = &rec.host {
            let kept = line.strip_suffix(b"\n").unwrap_or(line);
            match tail.by_host.get_mut(h) {
                Some(lines) => lines.push(kept.into()),
                None => {
                    tail.by_host.insert(h.clone(), vec![kept.into()]);
                }
            }
        }
        self.written.fetch_max(rec.seq, Ordering::AcqRel);
        if let Some(tap) = self.tap.get() {
            (tap.0)(rec);
        }
    }

    /// Returns once every record written so far is on disk.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.wait_durable(self.written.load(Ordering::Acquire))
    }

    fn append_locked(
        &self,
        tail: &mut Tail,
        host: Option<&str>,
        kind: &str,
        data: Prepared,
    ) -> Result<Record, JournalError> {
        if let Some(message) = &tail.broken {
            return Err(JournalError::Broken {
                path: self.path.clone(),
                message: message.clone(),
            });
        }
        let secrets = self.secrets_now();
        let make = |seq: u64, prev: String| -> (Record, Vec<u8>) {
            self.make_record(
                seq,
                prev,
                host.map(|h| redact_str(h, &secrets)),
                redact_str(kind, &secrets),
                &redact_str(&self.operator, &secrets),
                data,
            )
        };
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let (rec, line) = match &mut tail.sink {
            Sink::Postgres => {
                // Records go through `pg_append`, which must not wait under `tail`.
                return Err(JournalError::Broken {
                    path: self.path.clone(),
                    message: "a PostgreSQL record was written past its group commit".into(),
                });
            }
            Sink::File(file) => {
                let (rec, line) = make(tail.seq + 1, tail.prev.clone());
                if let Err(e) = write_whole_line(file, &line) {
                    // A full disk (or any failed write) must not leave half a line: cut
                    // what was written so the file still ends on a whole record, which
                    // `audit verify` reads as intact rather than torn. Only when that
                    // cut fails is the handle unusable.
                    if let Err(cut) = e.cut {
                        tail.broken = Some(format!(
                            "{} (and cutting the half-written line failed: {cut})",
                            e.error
                        ));
                    }
                    return Err(io(e.error));
                }
                (rec, line)
            }
        };
        self.remember(tail, &rec, &line);
        Ok(rec)
    }

    /// Returns once record `seq` is on disk, running an fsync itself unless one that
    /// covers it is already under way.
    fn wait_durable(&self, seq: u64) -> Result<(), JournalError> {
        let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(message) = &d.failed {
                return Err(JournalError::Broken {
                    path: self.path.clone(),
                    message: message.clone(),
                });
            }
            if d.synced >= seq {
                return Ok(());
            }
            if d.syncing {
                d = self
                    .durable_changed
                    .wait(d)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            d.syncing = true;
            drop(d);
            // Every record up to `target` was fully written before this fsync starts.
            let target = self.written.load(Ordering::Acquire);
            let res = self.sync_file.as_ref().map_or(Ok(()), File::sync_data);
            d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            d.syncing = false;
            match res {
                Ok(()) => d.synced = d.synced.max(target),
                // After a failed fsync the kernel may have dropped the dirty pages:
                // nothing written through this handle can be trusted to be on disk.
                Err(e) => d.failed = Some(format!("fsync failed: {e}")),
            }
            self.durable_changed.notify_all();
        }
    }

    /// Records that a mutating step is about to act on `host`. The record is on disk
    /// when this returns: only then may the step act.
    pub fn intent(&self, host: &str, step: &str, data: Value) -> Result<StepId, JournalError> {
        self.intent_inner(host, step, data, None)
    }

    /// Records that the undo of step `undoes` is about to be applied on `host`.
    /// Close it with [`Journal::outcome`] like any other step.
    pub fn undo_intent(
        &self,
        host: &str,
        undoes: StepId,
        undo: &UndoStep,
    ) -> Result<StepId, JournalError> {
        let input = serde_json::to_value(undo).unwrap_or(Value::Null);
        self.intent_inner(host, "undo", input, Some(undoes))
    }

    fn intent_inner(
        &self,
        host: &str,
        step: &str,
        input: Value,
        undoes: Option<StepId>,
    ) -> Result<StepId, JournalError> {
        let payload = IntentData {
            step: redact_str(step, &self.secrets_now()),
            input: redact_value(input, &self.secrets_now()),
            undoes,
        };
        let step = payload.step.clone();
        let entry = Entry::StepIntent(payload);
        let data = Prepared::new(entry.to_data());
        if let Some(sink) = &self.pg {
            let rec = self.pg_append(sink, Some(host), entry.kind(), Some(data))?;
            let id = StepId(rec.seq);
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.open_steps
                .insert(id, (rec.host.unwrap_or_default(), step));
            drop(tail);
            // The transaction holding the intent committed: the step may act.
            self.durable(id.0, &rec.hash)?;
            return Ok(id);
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.append_locked(&mut tail, Some(host), entry.kind(), data)?;
        let id = StepId(rec.seq);
        tail.open_steps
            .insert(id, (rec.host.unwrap_or_default(), step));
        drop(tail);
        // Only now may the step act: its intent is on disk.
        self.durable(id.0, &rec.hash)?;
        Ok(id)
    }

    /// Records what step `step_id` did on `host`, with the undo step that reverses
    /// it when it changed something. Fails when `step_id` is not an open intent of
    /// that host.
    pub fn outcome(
        &self,
        host: &str,
        step_id: StepId,
        ok: bool,
        data: Value,
        undo: Option<UndoStep>,
    ) -> Result<Record, JournalError> {
        let host = redact_str(host, &self.secrets_now());
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let step = match tail.open_steps.get(&step_id) {
            Some((h, step)) if *h == host => step.clone(),
            _ => {
                return Err(JournalError::UnknownStep {
                    run: self.run.clone(),
                    host,
                    step: step_id,
                })
            }
        };
        // With PostgreSQL the write happens outside `tail`: the step is closed now,
        // so a second outcome for it is refused as above. If the write fails the
        // journal is broken anyway.
        let tail = if self.pg.is_some() {
            tail.open_steps.remove(&step_id);
            drop(tail);
            None
        } else {
            Some(tail)
        };
        let undo = undo.map(|u| {
            let v = redact_value(
                serde_json::to_value(&u).unwrap_or(Value::Null),
                &self.secrets_now(),
            );
            serde_json::from_value(v).unwrap_or(u)
        });
        let payload = OutcomeData {
            step_id,
            step,
            ok,
            output: redact_value(data, &self.secrets_now()),
            undo,
        };
        let entry = Entry::StepOutcome(payload);
        let data = Prepared::new(entry.to_data());
        let rec = match (tail, &self.pg) {
            (Some(mut tail), _) => {
                let rec = self.append_locked(&mut tail, Some(&host), entry.kind(), data)?;
                tail.open_steps.remove(&step_id);
                drop(tail);
                rec
            }
            (None, Some(sink)) => self.pg_append(sink, Some(&host), entry.kind(), Some(data))?,
            (None, None) => {
                return Err(JournalError::UnknownStep {
                    run: self.run.clone(),
                    host,
                    step: step_id,
                })
            }
        };
        self.durable(rec.seq, &rec.hash)?;
        Ok(rec)
    }

    /// Records that a host's work ended, well or not. Durable with the next group
    /// commit, like [`Journal::note`].
    pub fn host_finished(
        &self,
        host: &str,
        ok: bool,
        detail: entry::HostEndDetail,
    ) -> Result<Record, JournalError> {
        self.host_end(host, Entry::HostFinish, ok, detail)
    }

    /// Records that a host's rollback ended, well or not. Durable with the next
    /// group commit, like [`Journal::note`].
    pub fn host_rolled_back(
        &self,
        host: &str,
        ok: bool,
        detail: entry::HostEndDetail,
    ) -> Result<Record, JournalError> {
        self.host_end(host, Entry::HostRollback, ok, detail)
    }

    fn host_end(
        &self,
        host: &str,
        variant: fn(HostEndData) -> Entry,
        ok: bool,
        detail: entry::HostEndDetail,
    ) -> Result<Record, JournalError> {
        // A host's end announces no action: it rides on the next group commit
        // (see [`Journal::note`]); a crash before that only makes a resume look at
        // the host again. `note` redacts the detail.
        self.note_entry(Some(host), &variant(HostEndData { ok, detail }))
    }

    /// Closes the run: appends `run.close`, records the final hash and record count
    /// in the audit index, and releases the lock. A run that is never closed (a
    /// crash, a stop) stays "open" to `audit verify` and can be resumed.
    pub fn close(self) -> Result<index::IndexEntry, JournalError> {
        let rec = if let Some(sink) = &self.pg {
            // Workers may have appended to this run: the close is signed over what
            // the database ends with, inside the transaction that writes it.
            self.pg_append(sink, None, kind::RUN_CLOSE, None)?
        } else {
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            // The signature is part of the close record's hashed data, so the run file
            // itself says it was closed, whatever happens to the index.
            let sig = self
                .anchor
                .as_ref()
                .map(|a| a.signer.sign_close(&self.run, tail.seq + 1, &tail.prev));
            let entry = Entry::RunClose(entry::RunClose { sig });
            let data = Prepared::new(entry.to_data());
            let rec = self.append_locked(&mut tail, None, entry.kind(), data)?;
            drop(tail);
            rec
        };
        self.wait_durable(rec.seq)?;
        index::append(
            &self.state_dir,
            &self.run,
            index::IndexEvent::Close,
            rec.seq,
            &rec.hash,
            self.anchor.as_ref(),
        )
    }

    /// Returns once record `seq` (whose hash is `hash`) is on disk; with a signing
    /// key, signs it as a checkpoint when the last one is [`CHECKPOINT_EVERY`]
    /// records behind. Only durable records are checkpointed: the index must never
    /// vouch for a record a crash could still take back.
    fn durable(&self, seq: u64, hash: &str) -> Result<(), JournalError> {
        self.wait_durable(seq)?;
        let Some(anchor) = &self.anchor else {
            return Ok(());
        };
        let mut last = self.checkpointed.lock().unwrap_or_else(|p| p.into_inner());
        if seq >= *last + CHECKPOINT_EVERY {
            index::append(
                &self.state_dir,
                &self.run,
                index::IndexEvent::Checkpoint,
                seq,
                hash,
                Some(anchor),
            )?;
            *last = seq;
        }
        Ok(())
    }

    /// Every record of this run, read back from its store.
    pub fn records(&self) -> Result<Vec<Record>, JournalError> {
        self.store.read_records(&self.run)
    }

    /// The store this run's records are in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether any record of one host so far holds `text` verbatim in its line: a
    /// test that costs no parsing, so a caller looking for a value (a deploy of one
    /// artifact's SHA-256) reads the host's records only when one might hold it.
    /// `text` must be written as is in JSON (no quotes, backslashes or control
    /// characters), or this may miss it.
    pub fn host_records_mention(&self, host: &str, text: &str) -> bool {
        let needle = text.as_bytes();
        if needle.is_empty() {
            return true;
        }
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.by_host.get(host).is_some_and(|lines| {
            lines
                .iter()
                .any(|l| l.windows(needle.len()).any(|w| w == needle))
        })
    }

    /// The records of one host so far, in order, without reading the file.
    pub fn host_records(&self, host: &str) -> Vec<Record> {
        let lines = {
            let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.by_host.get(host).cloned().unwrap_or_default()
        };
        // Each line was written by this journal (or read from its store), so it
        // reads back; one that somehow does not is left out, as a reader of the
        // file would skip it.
        lines
            .iter()
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    }

    /// What the records say about one host, without reading the file.
    pub fn host_state(&self, host: &str) -> state::HostHistory {
        state::RunState::from_records(&self.run, &self.host_records(host))
            .hosts
            .remove(host)
            .unwrap_or_default()
    }

    /// This run's state, derived from its records on disk.
    pub fn state(&self) -> Result<state::RunState, JournalError> {
        Ok(state::RunState::from_records(&self.run, &self.records()?))
    }
}

/// A JSON Lines file read leniently: parsed items, lines that did not parse, and
/// whether the last line is torn (a crash mid-write).
pub(crate) struct Scan<T> {
    /// (1-based line, item)
    pub items: Vec<(usize, T)>,
    /// Unparseable lines before the last one: (1-based line, parse error).
    pub bad: Vec<(usize, String)>,
    /// The last line, when it did not parse: (1-based line, parse error).
    pub torn: Option<(usize, String)>,
    /// Bytes up to the end of the last line that parsed (or was blank).
    pub good_len: u64,
    pub total_len: u64,
}

pub(crate) fn scan_lines<T: DeserializeOwned>(path: &Path) -> Result<Scan<T>, JournalError> {
    let bytes = std::fs::read(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut scan = Scan {
        items: Vec::new(),
        bad: Vec::new(),
        torn: None,
        good_len: 0,
        total_len: bytes.len() as u64,
    };
    let mut offset = 0usize;
    let pieces: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
    let n = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        offset += piece.len();
        let line = String::from_utf8_lossy(piece);
        if line.trim().is_empty() {
            scan.good_len = offset as u64;
            continue;
        }
        match serde_json::from_str::<T>(line.trim_end_matches(['\n', '\r'])) {
            Ok(item) if piece.ends_with(b"\n") || i + 1 < n => {
                scan.items.push((i + 1, item));
                scan.good_len = offset as u64;
            }
            // A whole record without its newline: the crash came before the newline
            // reached the disk; keep it, the next append must not glue onto it.
            Ok(item) => {
                scan.items.push((i + 1, item));
            }
            // A torn line is cut JSON. A last line that is whole JSON but not a `T`
            // (a field added, one removed) was edited, not torn, and must not be
            // cut off as a crash's leftover.
            Err(e)
                if i + 1 == n
                    && serde_json::from_str::<Value>(line.trim_end_matches(['\n', '\r']))
                        .is_err() =>
            {
                scan.torn = Some((i + 1, e.to_string()))
            }
            Err(e) => scan.bad.push((i + 1, e.to_string())),
        }
    }
    Ok(scan)
}

/// Reads a run file; a torn last line (crash mid-write) is ignored.
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    let scan = scan_lines::<Record>(path)?;
    if let Some((line, message)) = scan.bad.into_iter().next() {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            line,
            message,
        });
    }
    Ok(scan.items.into_iter().map(|(_, r)| r).collect())
}

/// Replaces every occurrence of a secret in every string of `v`, object keys
/// included, with `***`.
pub fn redact_value(v: Value, secrets: &[String]) -> Value {
    if secrets.is_empty() {
        return v;
    }
    match v {
        Value::String(s) => Value::String(redact_str(&s, secrets)),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| redact_value(x, secrets)).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, x)| (redact_str(&k, secrets), redact_value(x, secrets)))
                .collect(),
        ),
        other => other,
    }
}

pub fn redact_str(s: &str, secrets: &[String]) -> String {
    let mut out = s.to_string();
    let mut forms: Vec<String> = secrets.iter().flat_map(|x| encodings(x)).collect();
    // Longest first, so a secret that contains another is hidden whole.
    forms.sort_by_key(|x| std::cmp::Reverse(x.len()));
    for form in forms {
        if out.contains(form.as_str()) {
            out = out.replace(form.as_str(), "***");
        }
    }
    out
}

/// Every form a secret can take on its way out: as it is, JSON-escaped (a `--json`
/// event, a journal line), Debug-formatted (`{:?}` in a log field), shell-quoted
/// (a command line in a message), base64 (an HTTP basic-auth header), and each
/// line of a multi-line secret (a PEM key whose output was cut or split).
fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    /// Lines this short are words, not secrets: hiding them would hide prose.
    const MIN_LINE: usize = 8;
    if secret.is_empty() {
        return Vec::new();
    }
    let quoted = |q: String| {
        q.strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(&q)
            .to_string()
    };
    let mut out = vec![
        secret.to_string(),
        quoted(serde_json::to_string(secret).unwrap_or_default()),
        quoted(format!("{secret:?}")),
        secret.replace('\'', "'\\''"),
        base64::engine::general_purpose::STANDARD.encode(secret),
    ];
    if secret.contains('\n') {
        out.extend(
            secret
                .lines()
                .map(str::trim)
                .filter(|l| l.len() >= MIN_LINE)
                .map(str::to_string),
        );
    }
    out.retain(|f| !f.is_empty());
    out.sort();
    out.dedup();
    out
}

pub use secrets::{expand, scrub, Secrets};

#[cfg(test)]
mod tests {
    use super::*;

    fn resume_header(run: &str, params: &[(&str, &str)]) -> RunHeader {
        let mut h = RunHeader::new(
            "play.rhai".into(),
            "aa".into(),
            BTreeMap::from([("deb".to_string(), "m1".to_string())]),
            "inv".into(),
            Value::Null,
        )
        .with_config(Some("c1".into()));
        h.params = Some(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), param_digest(run, k, v)))
                .collect(),
        );
        h
    }

    #[test]
    fn a_resume_is_checked_against_playbook_modules_config_and_params() {
        let was = resume_header("r1", &[("sha", "abc"), ("token", "hunter2")]);
        assert!(was.check_resume("r1", &was.clone()).is_ok());
        // The journal never holds a param's value, and the digest depends on the run.
        let line = serde_json::to_string(&was).unwrap();
        assert!(
            !line.contains("hunter2") && !line.contains("\"abc\""),
            "{line}"
        );
        assert_ne!(
            param_digest("r1", "sha", "abc"),
            param_digest("r2", "sha", "abc")
        );

        let mut now = resume_header("r1", &[("sha", "abd"), ("token", "hunter2")]);
        now.playbook_sha256 = "bb".into();
        now.modules.insert("deb".into(), "m2".into());
        now.config_sha256 = Some("c2".into());
        let e = was.check_resume("r1", &now).unwrap_err();
        assert_eq!(e.differences.len(), 4, "{e}");
        let text = e.to_string();
        for want in [
            "the playbook play.rhai has sha256 bb",
            "an imported library module changed",
            "the config",
            "--param sha has another value",
            "start a new run",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!text.contains("abd") && !text.contains("hunter2"), "{text}");

        // A journal from before params and config were recorded checks the rest.
        let mut old = was.clone();
        old.params = None;
        old.config_sha256 = None;
        assert!(old.check_resume("r1", &resume_header("r1", &[])).is_ok());
    }

    #[test]
    fn a_secret_is_hidden_in_every_encoding_it_can_leave_in() {
        let pem = "-----BEGIN KEY-----\nAbCdEf0123456789\nqu\"ote'back\\slash\n-----END KEY-----";
        let secrets = vec![pem.to_string()];
        let json = serde_json::to_string(pem).unwrap();
        let debug = format!("{pem:?}");
        let shell = format!("'{}'", pem.replace('\'', "'\\''"));
        let b64 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(pem)
        };
        for text in [
            format!("raw {pem} end"),
            format!("{{\"reason\":{json}}}"),
            format!("argv = {debug}"),
            format!("sh -c {shell}"),
            format!("Authorization: Basic {b64}"),
            "only one line leaked: AbCdEf0123456789".to_string(),
        ] {
            let out = redact_str(&text, &secrets);
            assert!(out.contains("***"), "{out}");
            for piece in ["AbCdEf0123456789", "ote'back", "slash\\n", &b64] {
                assert!(!out.contains(piece), "{piece:?} leaked in {out:?}");
            }
        }
        assert_eq!(redact_str("plain text", &secrets), "plain text");
    }

    #[test]
    fn secrets_are_redacted_from_host_keys_values_and_step_names() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "r1", "alice")
            .unwrap()
            .with_secrets({
                let s = Secrets::new();
                s.add("s3cr3t");
                s.add("");
                s
            });
        let id = j
            .intent(
                "web-s3cr3t-1",
                "deploy s3cr3t",
                serde_json::json!({"token=s3cr3t": ["x s3cr3t y", 7], "plain": "ok"}),
            )
            .unwrap();
        j.outcome(
            "web-s3cr3t-1",
            id,
            false,
            serde_json::json!({"stderr": "bad password s3cr3t"}),
            Some(UndoStep::Manual {
                reason: "call s3cr3t".into(),
            }),
        )
        .unwrap();
        j.append(Some("s3cr3t"), "note", serde_json::json!({"s3cr3t": 1}))
            .unwrap();
        let text = std::fs::read_to_string(j.path()).unwrap();
        assert!(!text.contains("s3cr3t"), "secret leaked: {text}");
        let recs = j.records().unwrap();
        assert_eq!(recs[0].host.as_deref(), Some("web-***-1"));
        assert_eq!(recs[0].data["step"], "deploy ***");
        assert_eq!(recs[0].data["input"]["token=***"][0], "x *** y");
        assert_eq!(recs[0].data["input"]["plain"], "ok");
        assert_eq!(recs[1].data["output"]["stderr"], "bad password ***");
        assert_eq!(recs[1].data["undo"]["reason"], "call ***");
        assert_eq!(recs[2].host.as_deref(), Some("***"));
        assert!(recs[2].data.get("***").is_some());
        // The redacted records still chain: redaction happens before hashing.
        for r in &recs {
            assert_eq!(r.compute_hash(), r.hash);
        }
    }

    /// The hash as first defined: a JSON tree of the fields, data made canonical.
    fn tree_hash(r: &Record) -> String {
        let body = serde_json::json!({
            "seq": r.seq,
            "ts": r.ts,
            "run": r.run,
            "operator": r.operator,
            "host": r.host,
            "kind": r.kind,
            "data": canonical(&r.data),
        });
        let mut h = Sha256::new();
        h.update(r.prev.as_bytes());
        h.update(body.to_string().as_bytes());
        hex::encode(h.finalize())
    }

    #[test]
    fn streamed_hash_matches_the_json_tree_hash_of_existing_runs() {
        let data = serde_json::json!({
            "z": [1, -2.5, null, true, {"b": "q\"uote\\", "a": "\u{1}\t\n"}],
            "a": {"y": {}, "x": [], "é": "ünïcode ✓"},
            "m": 18446744073709551615u64,
        });
        for host in [None, Some("web-1 \"x\"".to_string())] {
            let mut r = Record {
                seq: 42,
                ts: "2026-01-01T00:00:00.000001Z".into(),
                run: "r1".into(),
                operator: "al\\ice".into(),
                host,
                kind: "step.intent".into(),
                data: data.clone(),
                prev: GENESIS.into(),
                hash: String::new(),
            };
            r.hash = r.compute_hash();
            assert_eq!(r.hash, tree_hash(&r));
        }
        for host in [None, Some("h\u{7f}\"".to_string())] {
            let mut r = Record {
                seq: 7,
                ts: "t".into(),
                run: "r".into(),
                operator: "o".into(),
                host,
                kind: "k".into(),
                data: data.clone(),
                prev: "p".into(),
                hash: "h".into(),
            };
            let p = Prepared::new(r.data.clone());
            r.data = p.value;
            let line = line_bytes(&r, &p.json);
            let mut want = serde_json::to_string(&r).unwrap();
            want.push('\n');
            assert_eq!(String::from_utf8(line).unwrap(), want);
        }
        let mut bytes = Vec::new();
        write_canonical(&mut bytes, &data);
        assert_eq!(bytes, canonical(&data).to_string().into_bytes());
    }

    fn synced(j: &Journal) -> u64 {
        j.durable.lock().unwrap().synced
    }

    #[test]
    fn notes_are_written_at_once_and_made_durable_by_the_next_intent() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "r1", "alice").unwrap();
        let a = j
            .note(Some("h1"), "verify", serde_json::json!({"ok": true}))
            .unwrap();
        let b = j.host_finished("h2", true, Default::default()).unwrap();
        // Written and chained, readable by anyone, but no fsync was waited for.
        let on_disk = j.records().unwrap();
        assert_eq!(on_disk.len(), 2);
        assert_eq!(on_disk[1].prev, a.hash);
        assert!(synced(&j) < b.seq, "a note waited for its fsync");
        // An intent may not act before every earlier record is durable.
        let id = j.intent("h3", "deploy", serde_json::json!({})).unwrap();
        assert!(synced(&j) >= id.0);
        let c = j
            .note(None, "rollout.event", serde_json::json!({}))
            .unwrap();
        assert!(synced(&j) < c.seq);
        j.flush().unwrap();
        assert!(synced(&j) >= c.seq);
        assert_eq!(j.host_records("h2").len(), 1);
    }

    #[test]
    fn a_host_mentions_only_what_its_own_records_hold() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "r1", "alice").unwrap();
        let sha = "ab".repeat(32);
        j.intent("h1", "deploy", serde_json::json!({ "sha256": sha }))
            .unwrap();
        j.note(Some("h2"), "verify", serde_json::json!({"ok": true}))
            .unwrap();
        assert!(j.host_records_mention("h1", &sha));
        assert!(!j.host_records_mention("h1", &"cd".repeat(32)));
        assert!(!j.host_records_mention("h2", &sha));
        assert!(!j.host_records_mention("nobody", &sha));
    }

    #[test]
    fn run_ids_that_could_escape_the_runs_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(matches!(
                Journal::create(dir.path(), bad, "alice"),
                Err(JournalError::BadRunId { .. })
            ));
        }
    }
}
