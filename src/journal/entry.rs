//! Typed journal records: [`Entry`], one variant per record kind this binary
//! writes, and the payload type of each.
//!
//! A record line keeps `kind` and `data` as two separate fields (the hash chain is
//! computed over both, so that format never changes); [`Entry::kind`],
//! [`Entry::to_data`] and [`Entry::from_parts`] convert between that pair and the
//! enum, through serde only. Every reader matches on [`Entry`] instead of comparing
//! kind strings or looking fields up by name, so a renamed field is a compile error
//! or a reported problem, never a silent empty string. A kind this binary does not
//! know (a newer version wrote it) reads as [`Entry::Unknown`], so old binaries can
//! still read new journals.
//!
//! The payload types that upper layers use as values (the rollout's events and
//! summary, a backup handle, a notification delivery, a staging test case) are
//! defined here and re-exported there, because the record format is the journal's.
//! This module, like the rest of the journal, imports nothing of the crate above it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{HostEndData, IntentData, OutcomeData, RunHeader, StepId, UndoStep};

/// A record's `data` that does not match what its `kind` says it holds.
#[derive(Debug, thiserror::Error)]
#[error("a `{kind}` record does not hold what that kind holds ({source}); the journal was written by another version or edited: see `patchbook audit verify`")]
pub struct EntryError {
    pub kind: String,
    #[source]
    pub source: serde_json::Error,
}

macro_rules! entries {
    ($( $(#[$doc:meta])* $variant:ident($ty:ty) = $kind:literal, )*) => {
        /// One journal record's kind and data, typed. See the module docs.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Entry {
            $( $(#[$doc])* $variant($ty), )*
            /// A kind this binary does not know: written by a newer version.
            Unknown { kind: String, data: Value },
        }

        impl Entry {
            /// Every kind string this binary writes, in declaration order.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// The `kind` field of the record line.
            pub fn kind(&self) -> &str {
                match self {
                    $( Entry::$variant(_) => $kind, )*
                    Entry::Unknown { kind, .. } => kind,
                }
            }

            /// The `data` field of the record line.
            pub fn to_data(&self) -> Value {
                // None of the payload types has a map with non-string keys or a
                // failing `Serialize`, so serialising into a `Value` cannot fail.
                match self {
                    $( Entry::$variant(x) => serde_json::to_value(x).unwrap_or(Value::Null), )*
                    Entry::Unknown { data, .. } => data.clone(),
                }
            }

            /// The entry a record line's `kind` and `data` describe. An unknown kind
            /// is [`Entry::Unknown`]; a known kind whose data does not fit is an error.
            pub fn from_parts(kind: &str, data: Value) -> Result<Entry, EntryError> {
                match kind {
                    $( $kind => parse(kind, data).map(Entry::$variant), )*
                    _ => Ok(Entry::Unknown { kind: kind.to_string(), data }),
                }
            }
        }
    };
}

fn parse<T: DeserializeOwned>(kind: &str, data: Value) -> Result<T, EntryError> {
    serde_json::from_value(data).map_err(|source| EntryError {
        kind: kind.to_string(),
        source,
    })
}

entries! {
    /// First record of every run.
    RunStart(RunHeader) = "run.start",
    /// Last record of a closed run.
    RunClose(RunClose) = "run.close",
    /// A mutating step is about to act.
    StepIntent(IntentData) = "step.intent",
    /// What a step did, and how to undo it.
    StepOutcome(OutcomeData) = "step.outcome",
    /// A host's work ended.
    HostFinish(HostEndData) = "host.finish",
    /// A host's rollback ended.
    HostRollback(HostEndData) = "host.rollback",
    /// A torn last line was cut off when the run was reopened.
    JournalRepair(JournalRepair) = "journal.repair",
    /// `run --resume` continued the run.
    RunResume(RunResume) = "run.resume",
    /// `patchbook rollback` began reversing the run.
    RunRollback(RunRollback) = "run.rollback",
    /// The run did not start on some hosts because other runs held them.
    RunRefused(RunRefused) = "run.refused",
    /// A backup archive taken of the record's host.
    Backup(BackupHandle) = "backup",
    /// A backup the controller stopped on its own side (disk full, low space, a
    /// size cap); its partial archive was removed.
    BackupStopped(BackupStopped) = "backup.stopped",
    /// An independent package check on the record's host.
    Verify(VerifyRecord) = "verify",
    /// A health check on the record's host.
    Health(HealthRecord) = "health",
    /// An HTTP health check seen from the controller.
    HttpCheck(HttpCheckRecord) = "http_check",
    /// A check made on a fetched artifact (source, download, checksum, signature).
    Artifact(ArtifactRecord) = "artifact",
    /// A staging check.
    Test(TestCase) = "test",
    /// The maintenance window the playbook set.
    Window(WindowRecord) = "window",
    /// A rollout's plan, before it runs.
    RolloutPlan(RolloutPlan) = "rollout.plan",
    /// A resumed rollout left the hosts it had finished alone.
    RolloutResume(RolloutResume) = "rollout.resume",
    /// One event of the rollout executor.
    Rollout(RolloutEvent) = "rollout.event",
    /// A notification sent to people.
    Notify(NotifyRecord) = "notify",
    /// A file step found the file already as asked: nothing was written.
    FileUnchanged(FileUnchanged) = "file.unchanged",
    /// A repository upgrade found nothing to do on the record's host.
    UpgradeNoChange(UpgradeNoChange) = "upgrade.no_change",
    /// A rollback left a step's undo to a person: the host is no longer in the
    /// state the step left it in.
    UndoSkipped(UndoSkipped) = "undo.skipped",
    /// The record's host could not be connected to: a probe left it out, or the
    /// rollout gave up on it. It counts against `max_unreachable`, not `max_failed`.
    HostUnreachable(HostUnreachable) = "host.unreachable",
    /// The `--param` values a run works with: plain values as given, secret
    /// references (`${env:NAME}`) as references, values marked secret as neither.
    RunParams(RunParams) = "run.params",
    /// A message the playbook logged with `log()`, on the record's host if any.
    Log(LogRecord) = "log",
    /// One sample `monitor()` took of the record's host, before or after its change.
    MonitorSample(MonitorSample) = "monitor.sample",
    /// `monitor()`'s judgement of the record's host: after the change against its
    /// baseline.
    MonitorVerdict(MonitorVerdict) = "monitor.verdict",
    /// A rollback rehearsal on the record's (pilot) host: patched, rolled back,
    /// its state compared with before, patched again.
    Rehearsal(RehearsalRecord) = "rollout.rehearsal",
    /// What the controller process itself used at one moment of a rollout.
    ControllerUsage(ControllerUsage) = "controller.usage",
    /// An advisory feed this run read: where from and its SHA-256.
    AdvisoryFeed(AdvisoryFeed) = "advisory.feed",
    /// A CVE closed on the record's host, checked against the installed version.
    Evidence(EvidenceRecord) = "advisory.evidence",
    /// A rollout with a `soak` policy ended: the hosts it patched, to be watched
    /// by `patchbook watch` for the policy's period.
    SoakPlanned(SoakPlanned) = "soak.planned",
    /// `watch` began soaking the record's host: its baseline and until when.
    SoakStarted(SoakStarted) = "soak.started",
    /// The soak of the record's host ended, with its verdict.
    SoakEnded(SoakEnded) = "soak.ended",
    /// What an advisory scan found on the record's host.
    ScanHost(ScanHost) = "advisory.scan.host",
    /// An advisory scan's summary: the feeds it used and its totals. Last record
    /// before `run.close` of a scan run.
    Scan(ScanSummary) = "advisory.scan",
}

impl Entry {
    /// How a record of `kind` ends a host's part of a run, read from its kind
    /// alone: `Some(true)` unreachable, `Some(false)` finished (done or failed),
    /// `None` for any other kind. For readers that skip the records' data, as
    /// the end of a 100,000-host run does to name its unreachable hosts.
    pub fn ends_host_as_unreachable(kind: &str) -> Option<bool> {
        match kind {
            "host.unreachable" => Some(true),
            "host.finish" => Some(false),
            _ => None,
        }
    }
}

/// `data` of `advisory.scan.host`: one host as an advisory scan judged it. Enough
/// to render the exposure plan again without contacting the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanHost {
    pub host: String,
    /// `os_id os_version` as the host reported it.
    pub os: String,
    /// `Debian 12`, `Ubuntu 22.04`, `RHEL 9`; absent for a distribution no reader
    /// knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// False when no feed describes the host's release: nothing is known of it.
    pub covered: bool,
    /// Open CVEs a fix exists for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<ScanFinding>,
    /// Open CVEs with no fix published yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_fix: Vec<ScanFinding>,
}

/// One open CVE of a host in an `advisory.scan.host` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanFinding {
    pub cve: String,
    /// `unknown`, `negligible`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
    pub packages: Vec<ScanPackage>,
}

/// One source package's part in a [`ScanFinding`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPackage {
    /// The source package the feed names.
    pub package: String,
    /// The installed binary packages built from it.
    #[serde(default)]
    pub binaries: Vec<String>,
    pub installed: String,
    /// The version that fixes it; absent when none is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<String>,
    /// `vulnerable-fix-available` or `vulnerable-no-fix`.
    pub verdict: String,
    /// SHA-256 of the feed that said so.
    pub feed_sha256: String,
}

/// `data` of `advisory.scan`: the scan as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    /// The feeds read, with their digests (each also has an `advisory.feed`).
    pub feeds: Vec<ScanFeed>,
    /// The selector the hosts came from.
    pub selector: String,
    /// Hosts scanned (each has an `advisory.scan.host` record).
    pub hosts: Vec<String>,
    /// Hosts that could not be read (each has a `host.unreachable` record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// Open CVEs a fix exists for, summed over hosts.
    pub fixable: u64,
    /// Open CVEs with no fix yet, summed over hosts.
    pub no_fix: u64,
    /// Hosts whose release no feed describes.
    pub not_covered: u64,
    /// (host, CVE) pairs open now that the previous scan did not have open, at
    /// or above the notification severity.
    #[serde(default)]
    pub newly_open: u64,
}

/// A feed as a scan cites it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanFeed {
    pub source: String,
    pub format: String,
    pub sha256: String,
}

/// `data` of `soak.planned`: written at the end of the rollout whose policy had a
/// `soak` key. `options` is the policy's `soak` map as written, read back by the
/// service that soaks the hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakPlanned {
    /// The hosts the rollout patched (finished), in its completion order.
    pub hosts: Vec<String>,
    pub period_seconds: f64,
    pub every_seconds: f64,
    pub options: Value,
}

/// `data` of `soak.started`, on the soaked host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakStarted {
    /// The run that patched the host.
    pub run: String,
    pub at: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Metric → value the soak samples are held against.
    pub baseline: BTreeMap<String, f64>,
    /// `run` (the means of that run's `monitor` baseline samples) or `soak`
    /// (sampled when the soak began).
    pub baseline_from: String,
}

/// `data` of `soak.ended`, on the soaked host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakEnded {
    pub run: String,
    pub at: DateTime<Utc>,
    /// `passed`, `regressed`, `unread` (no sample could be taken) or `stopped`
    /// (the service shut down before the period was over).
    pub verdict: String,
    pub samples: u64,
    /// The first sample's lines past a threshold, for a regressed host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regressions: Vec<String>,
}

/// `data` of `advisory.feed`: a feed read by the run, so every verdict and every
/// evidence record can be traced to the exact bytes it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvisoryFeed {
    /// Where the feed came from, as given.
    pub source: String,
    /// `osv`, `debian-tracker` or `csaf-vex`.
    pub format: String,
    pub sha256: String,
    /// True when the config or playbook pinned the digest and it matched.
    #[serde(default)]
    pub pinned: bool,
    /// How many (CVE, release, package) statements it holds.
    #[serde(default)]
    pub statements: usize,
}

/// `data` of `advisory.evidence`: one CVE closed on the record's host. Written only
/// after the installed version was read back from the package database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    pub cve: String,
    pub host: String,
    /// The source package the advisory names.
    pub package: String,
    /// The source version installed before the run.
    pub before: String,
    /// The source version read back after it.
    pub after: String,
    /// The version the feed says fixes the CVE.
    pub fixed: String,
    /// SHA-256 of the feed the verdict came from.
    pub feed_sha256: String,
    /// RFC 3339 time of the re-check.
    pub time: String,
    /// False when the package is still below the fixed version: the CVE is open.
    pub closed: bool,
}

/// `data` of `controller.usage`: this process, read from `/proc/self`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerUsage {
    /// The run clock's time.
    pub at: DateTime<Utc>,
    /// User and system CPU time since the process started.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    pub threads: u64,
    /// Open sockets (SSH sessions, HTTP clients, listeners).
    pub sockets: u64,
    /// Bytes read and written through system calls since the start: files and
    /// sockets alike (`/proc/self/io` rchar and wchar).
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Bytes sent and received over TCP (SSH sessions, HTTP clients) since the
    /// process started, from the kernel's count of each connection (`TCP_INFO`
    /// bytes acked and received); a connection that closed between two samples
    /// counts up to the last sample that saw it open.
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
    /// TCP connections established at the sample (listeners not counted).
    #[serde(default)]
    pub connections: u64,
}

/// `data` of `rollout.rehearsal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RehearsalRecord {
    /// The rollback restored every compared piece of state exactly.
    pub ok: bool,
    /// How many pieces of state (packages, paths, services) were compared.
    pub compared: usize,
    /// What the rollback reversed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<String>,
    /// One line per piece of state the rollback did not restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// The rollback itself failed or left steps to a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `data` of `monitor.sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorSample {
    /// `baseline` (before the change) or `after`.
    pub phase: String,
    /// The run clock's time of the sample.
    pub at: DateTime<Utc>,
    /// Metric → value: levels as read (`mem` %, `load`, `disk` %), rates since the
    /// previous sample (`cpu` %, `io` KiB/s, `error_rate` lines/min, `restarts`),
    /// and custom probes.
    pub values: BTreeMap<String, f64>,
}

/// `data` of `monitor.verdict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorVerdict {
    pub ok: bool,
    /// Means over the baseline samples and over the window after the change.
    pub baseline: BTreeMap<String, f64>,
    pub after: BTreeMap<String, f64>,
    /// Metric → threshold as written (`"2x"`, `"+20%"`).
    pub thresholds: BTreeMap<String, String>,
    /// One line per metric past its threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regressions: Vec<String>,
    pub window_seconds: f64,
}

/// `data` of a `log` record: what a playbook said, and where it said it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub message: String,
    /// The script file (playbook or module) that logged it, as Rhai names it.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub line: usize,
}

/// `data` of `undo.skipped`: an undo a rollback did not apply because the host had
/// changed since the step (another run, a person), so applying it would revert a
/// state this run did not create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoSkipped {
    /// The step whose undo was not applied.
    pub step_id: StepId,
    pub step: String,
    /// The undo, as a reader says it.
    pub undo: String,
    /// What the host has now (`acme-agent 1.0.2`, `/etc/x sha256 …`).
    pub found: String,
    /// What the step left (`acme-agent 1.0.1`).
    pub expected: String,
    /// The line a person reads: found, expected, and that nothing was reverted.
    pub reason: String,
}

/// `data` of `host.unreachable`: the step that could not connect, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUnreachable {
    /// `needing`, `rollout`, … : where the connection was tried.
    pub step: String,
    pub reason: String,
}

/// One `--param` as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum ParamValue {
    /// Given as is, and no secret.
    Plain(String),
    /// A secret reference (`${env:NAME}`, `${file:PATH}`), read again on every use.
    Reference(String),
    /// A value the run marked secret: not kept; it must be given again.
    Secret,
}

/// `data` of `run.params`: every `--param` of the run (or of its latest resume).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunParams {
    pub values: BTreeMap<String, ParamValue>,
}

/// `data` of `run.close`: `{}`, or with `[audit] signing_key` the Ed25519
/// signature of the run, this record's seq and the hash before it
/// ([`super::anchor::Signer::sign_close`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunClose {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// `data` of `journal.repair`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRepair {
    /// The last whole record before the cut.
    pub torn_after_seq: u64,
    pub dropped_bytes: u64,
}

/// `data` of `run.resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResume {
    pub operator: String,
}

/// `data` of `run.rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRollback {
    /// The `--hosts` selector, when the rollback was limited to some hosts.
    #[serde(default)]
    pub hosts: Option<String>,
    pub operator: String,
}

/// `data` of `run.refused`: a rollout did not start because other runs held some
/// of its hosts (or the wait for them ended); it changed nothing on any of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRefused {
    /// The busy hosts, sorted.
    pub hosts: Vec<String>,
    /// The runs that held them.
    pub holders: Vec<super::lock::HostHolder>,
    /// What the operator was told.
    pub message: String,
}

/// `data` of `backup.stopped`: a backup of the record's host that the controller
/// stopped because of its own disk or a configured cap, not because of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStopped {
    /// Absolute paths on the host, as given.
    pub paths: Vec<String>,
    pub cause: BackupStopCause,
    /// Bytes received before the stop; the partial archive holding them is gone.
    pub received: u64,
    /// What happened and what to do next, as the operator was told.
    pub message: String,
}

/// Why the controller stopped a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BackupStopCause {
    /// A write to the backup store failed with ENOSPC (or EDQUOT).
    DiskFull,
    /// The store's filesystem had less than `min_free` bytes free.
    LowSpace { free: u64, min_free: u64 },
    /// The host's backups reached `[backup] max_per_host`.
    HostCap { limit: u64 },
    /// The run's backups reached `[backup] max_per_run`.
    RunCap { limit: u64 },
}

impl std::fmt::Display for BackupStopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupStopCause::DiskFull => write!(f, "disk full"),
            BackupStopCause::LowSpace { free, min_free } => write!(
                f,
                "disk full: {free} bytes free, below the {min_free} bytes kept free"
            ),
            BackupStopCause::HostCap { limit } => {
                write!(f, "backup cap reached: {limit} bytes per host")
            }
            BackupStopCause::RunCap { limit } => {
                write!(f, "backup cap reached: {limit} bytes per run")
            }
        }
    }
}

/// What `backup` returns and `restore` takes; also the `data` of a `backup`
/// record, which is where undo steps find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHandle {
    pub id: String,
    pub host: String,
    /// Absolute paths on the host, as given.
    pub paths: Vec<String>,
    /// The archive on the controller.
    pub archive: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// Paths that did not exist on the host when the backup was taken.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// `data` of a `verify` record: the package database read independently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub package: String,
    pub expected: String,
    /// The version found, or a sentence saying why there is none.
    pub found: String,
    pub ok: bool,
}

/// `data` of a `health` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    #[serde(default)]
    pub argv: Vec<String>,
    /// The command as one string, as early journals recorded it instead of `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub ok: bool,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HealthRecord {
    /// The command checked, as one line.
    pub fn command_line(&self) -> String {
        match &self.command {
            Some(c) if self.argv.is_empty() => c.clone(),
            _ => self.argv.join(" "),
        }
    }
}

/// `data` of an `http_check` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCheckRecord {
    pub url: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// One check of a fetched artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactCheck {
    /// Set on a single-check record; a record of several checks names it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `source`, `download`, `checksum`, `signature`, …
    pub what: String,
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
}

/// `data` of an `artifact` record: one check (what a run writes), or one artifact
/// with all of its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ArtifactRecord {
    Checks {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        checks: Vec<ArtifactCheck>,
    },
    One(ArtifactCheck),
}

impl ArtifactRecord {
    /// Every check of the record, each with its artifact's URL.
    pub fn checks(&self) -> Vec<ArtifactCheck> {
        match self {
            ArtifactRecord::One(c) => vec![c.clone()],
            ArtifactRecord::Checks { url, checks, .. } => checks
                .iter()
                .map(|c| ArtifactCheck {
                    url: c.url.clone().or_else(|| Some(url.clone())),
                    ..c.clone()
                })
                .collect(),
        }
    }
}

/// The outcome of one notification to one addressee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The channel used; empty when the addressee matched none.
    pub channel: String,
    /// The addressee as given: a channel name, contact name or e-mail address.
    pub to: String,
    pub ok: bool,
    /// Attempts made; 0 when the configuration made sending impossible.
    pub attempts: u32,
    /// The last attempt's error, secrets redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `data` of a `notify` record: one delivery (what a run writes), or one notice
/// with every delivery of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NotifyRecord {
    Notice {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        severity: Option<String>,
        deliveries: Vec<Delivery>,
    },
    Delivery(Delivery),
}

impl From<Delivery> for NotifyRecord {
    fn from(d: Delivery) -> Self {
        NotifyRecord::Delivery(d)
    }
}

/// The four kinds of staging check the patching process asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestKind {
    Functional,
    Integration,
    Performance,
    Regression,
}

/// Before-and-after numbers of a performance check and the degradation it allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Measured before the patch.
    pub before: f64,
    /// Measured with the patch.
    pub after: f64,
    /// How much worse, in percent of `before`, `after` may be.
    pub threshold_pct: f64,
    #[serde(default)]
    pub unit: String,
    /// Throughput-like numbers get worse when they fall; latency-like numbers
    /// (the default) when they rise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub higher_is_better: bool,
}

/// One staging check: the `data` of a `test` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    pub name: String,
    pub kind: TestKind,
    pub ok: bool,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The patch version under test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

/// `data` of a `window` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// As the playbook wrote it, e.g. `Sat 02:00-06:00 Asia/Hong_Kong`.
    pub spec: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub buffer: Option<String>,
    /// Whether the window was open when it was set; absent in early journals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<bool>,
    /// The current or next opening, in the window's zone.
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
}

/// `data` of a `rollout.plan` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// The policy as the playbook gave it.
    #[serde(default)]
    pub policy: Value,
    /// The plan as printed.
    pub plan: String,
    /// Each target's inventory groups (`all` excluded): the report counts per
    /// group from these, across restarts of the run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, Vec<String>>,
}

/// `data` of a `rollout.resume` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutResume {
    /// Targets left alone because the journal saw them to the end.
    pub skipped_finished: usize,
    /// Hosts the run had begun but not finished that the playbook's targets no
    /// longer held (a filter such as `needing()` dropped them, for instance
    /// because the lost step had in fact patched them): taken back so their work
    /// runs again, re-probes them and closes their open intents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rechecked: Vec<String>,
    /// Set when the pilot was dropped because the journal shows it passed
    /// before the restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pilot_passed: bool,
}

/// Why a host is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackCause {
    /// The host's own work failed.
    HostFailed,
    /// The run stopped early and the policy says `rollback: "all"`.
    RunStopped,
    /// The gate after the host's wave failed and the policy says
    /// `on_gate_fail: "rollback_wave"`.
    GateFailed,
}

impl RollbackCause {
    /// As it is serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackCause::HostFailed => "host_failed",
            RollbackCause::RunStopped => "run_stopped",
            RollbackCause::GateFailed => "gate_failed",
        }
    }
}

/// One state change of a rollout: the `data` of a `rollout.event` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RolloutEvent {
    RunStarted {
        targets: usize,
        waves: usize,
        parallel: usize,
        allowed_failures: usize,
    },
    WaveStarted {
        index: usize,
        label: String,
        hosts: Vec<String>,
    },
    HostStarted {
        host: String,
        wave: usize,
    },
    HostDone {
        host: String,
        wave: usize,
        seconds: f64,
    },
    HostFailed {
        host: String,
        wave: usize,
        reason: String,
    },
    /// The host could not be connected to; it is not rolled back (nothing can reach
    /// it) and counts against the unreachable budget.
    HostUnreachable {
        host: String,
        wave: usize,
        reason: String,
    },
    RolledBack {
        host: String,
        cause: RollbackCause,
    },
    RollbackFailed {
        host: String,
        cause: RollbackCause,
        error: String,
    },
    BudgetExhausted {
        failures: usize,
        allowed: usize,
    },
    UnreachableBudgetExhausted {
        unreachable: usize,
        allowed: usize,
    },
    Paused {
        seconds: f64,
    },
    GateStopped {
        after_wave: usize,
        reason: String,
    },
    /// The wave is over; the gate waits this long before it looks.
    Soaking {
        after_wave: usize,
        seconds: f64,
    },
    /// One evaluation of a gate between waves, passed or not.
    GateEvaluated(GateVerdict),
    WindowClosed {
        before_wave: usize,
        time_left_seconds: f64,
        needed_seconds: f64,
    },
    RunDone {
        summary: Summary,
    },
}

/// What a gate between waves saw: the data of a `gate_evaluated` rollout event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateVerdict {
    /// The wave just finished (0 for the pilot); on a resume, the gate asked
    /// before the first wave repeats the wave the run stopped after.
    pub after_wave: usize,
    /// `prometheus` or `closure`.
    pub check: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `max 0.5`, `min 1, max 3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<String>,
    /// The sample that decided: the worst passing one, or the first failing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub passed: bool,
    pub detail: String,
    #[serde(default)]
    pub soaked_seconds: f64,
}

/// Why a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    BudgetExhausted {
        failures: usize,
        allowed: usize,
    },
    /// More hosts could not be connected to than `max_unreachable` allows.
    UnreachableBudgetExhausted {
        unreachable: usize,
        allowed: usize,
    },
    PilotFailed {
        host: String,
    },
    GateStopped {
        after_wave: usize,
        reason: String,
    },
    WindowClosing {
        before_wave: usize,
    },
    /// The controller was asked to stop (SIGTERM, the watch service shutting
    /// down): hosts in flight finished, the rest are pending for `run --resume`.
    Halted,
    /// The controller itself could not go on (its disk is full, a backup cap was
    /// reached) while working on `host`: no host is charged with it, hosts in
    /// flight finished, `host` and the rest are pending for `run --resume`.
    ControllerFault {
        host: String,
        reason: String,
    },
}

impl std::fmt::Display for StopReason {
    /// How the operator reads it: what stopped the rollout, and what is next.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Completed => write!(f, "completed"),
            StopReason::BudgetExhausted { failures, allowed } => write!(
                f,
                "failure budget spent: {failures} failed, {allowed} allowed; no new hosts started"
            ),
            StopReason::UnreachableBudgetExhausted { unreachable, allowed } => write!(
                f,
                "unreachable budget (max_unreachable) spent: {unreachable} unreachable, {allowed} allowed; no new hosts started"
            ),
            StopReason::PilotFailed { host } => {
                write!(f, "pilot {host} failed; no wave started")
            }
            StopReason::GateStopped { after_wave, reason } => {
                write!(f, "gate stopped the rollout after wave {after_wave}: {reason}")
            }
            StopReason::WindowClosing { before_wave } => write!(
                f,
                "the maintenance window closes before wave {before_wave} could finish; resume in the next window"
            ),
            StopReason::Halted => write!(
                f,
                "stopped by the operator; pending hosts wait for `patchbook run --resume`"
            ),
            StopReason::ControllerFault { host, reason } => write!(
                f,
                "the controller failed while working on {host} ({reason}); fix it, then `patchbook run --resume`"
            ),
        }
    }
}

/// Where a host of a run stands: the one status model the rollout's summary, the
/// report and the progress display share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Never started.
    Pending,
    /// Started, no end recorded, run still open (running, stopped or crashed).
    InProgress,
    Done,
    /// Its work failed or ran past its deadline.
    Failed,
    /// Succeeded, then rolled back (`rollback: "all"`, or the run stopped).
    Reverted,
    /// Started, no end recorded, yet the run was closed: only the host can say.
    Unknown,
    /// Could not be connected to (refused, timed out, handshake or login failed).
    Unreachable,
}

impl HostStatus {
    /// As a reader says it.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Pending => "pending",
            HostStatus::InProgress => "in progress",
            HostStatus::Done => "done",
            HostStatus::Failed => "failed",
            HostStatus::Reverted => "reverted",
            HostStatus::Unknown => "unknown",
            HostStatus::Unreachable => "unreachable",
        }
    }
}

/// One host of a rollout summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub name: String,
    pub wave: usize,
    pub state: HostStatus,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub started: Option<DateTime<Utc>>,
    #[serde(default)]
    pub ended: Option<DateTime<Utc>>,
    /// Its rollback ran and succeeded.
    #[serde(default)]
    pub rolled_back: bool,
    #[serde(default)]
    pub rollback_error: Option<String>,
}

/// Counts where `targeted = done + failed + unreachable + reverted + pending`;
/// `rolled_back` counts successful rollbacks of failed and reverted hosts alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub targeted: usize,
    pub done: usize,
    pub failed: usize,
    #[serde(default)]
    pub unreachable: usize,
    pub reverted: usize,
    pub rolled_back: usize,
    pub rollback_failed: usize,
    pub pending: usize,
}

/// How a rollout ended, host by host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub stop: StopReason,
    pub allowed_failures: usize,
    #[serde(default)]
    pub allowed_unreachable: usize,
    pub totals: Counts,
    /// Per inventory group of the targets (`all` excluded).
    #[serde(default)]
    pub per_group: BTreeMap<String, Counts>,
    /// In run order.
    #[serde(default)]
    pub hosts: Vec<HostReport>,
    /// Successful hosts in order of completion.
    #[serde(default)]
    pub completion_order: Vec<String>,
    /// Every rollback in the order it finished.
    #[serde(default)]
    pub rollback_order: Vec<String>,
}

/// The `input` of a `deploy` step's intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployInput {
    /// The artifact's URL.
    #[serde(default)]
    pub artifact: String,
    #[serde(default)]
    pub sha256: String,
    pub package: String,
    /// The version installed before, `None` when the package was not installed.
    #[serde(default)]
    pub from: Option<String>,
    pub to: String,
    /// The install command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Planned before acting, so a crash between the action and its outcome still
    /// leaves a way back.
    #[serde(default)]
    pub undo: Option<UndoStep>,
}

/// The `output` of a `deploy` step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOutput {
    pub package: String,
    #[serde(default)]
    pub from: Option<String>,
    /// The version read back from the host after the install.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Set when a resumed run found the install's result on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<String>,
}

/// The part of an `upgrade` step's output a rollback checks the host against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct UpgradeAfter {
    #[serde(default)]
    after: BTreeMap<String, Option<String>>,
}

/// What any step's intent input may carry besides its own fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct PlannedUndo {
    #[serde(default)]
    undo: Option<UndoStep>,
}

/// The input of an `exec` or `shell` step's intent: an unmanaged change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInput {
    pub argv: Vec<String>,
    /// A raw shell line (`shell`): `argv` is `["sh", "-c", line]`.
    pub raw_shell: bool,
    /// Always true: patchbook does not know what the command changes.
    pub unmanaged: bool,
    /// Recorded before the command runs, so a crash still leaves it reversible.
    pub undo: UndoStep,
}

/// The output of an `exec` or `shell` step: what the command left, by digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_sha256: Option<String>,
    #[serde(default)]
    pub stdout_bytes: usize,
    #[serde(default)]
    pub stderr_bytes: usize,
    #[serde(default)]
    pub truncated: bool,
    /// The transport's error, when the command's end was not seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A package a repository upgrade left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub package: String,
    pub reason: String,
}

/// `data` of an `upgrade.no_change` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeNoChange {
    pub skipped: Vec<Skipped>,
}

/// `data` of a `file.unchanged` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUnchanged {
    pub step: String,
    pub path: String,
}

/// The input of a file step's intent (`put_file`, `template`, `line_in_file`,
/// `remove_file`): what it will write or remove, and the undo kept before it acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInput {
    pub path: String,
    /// `write` or `remove`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chown: Option<String>,
    pub undo: UndoStep,
}

/// The output of a file step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOutput {
    pub path: String,
    /// What the host said after the change (its new hash and mode).
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The input of a `restore` step's intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInput {
    pub backup: super::BackupRef,
}

/// The output of a step that says only whether it failed, and what it undid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// For an undo step: the undo, as a reader says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<String>,
    pub error: Option<String>,
}

/// The names of the steps whose changes patchbook does not understand.
pub const UNMANAGED_STEPS: &[&str] = &["exec", "shell"];

/// What any step's outcome output may carry to explain a failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub stderr: Option<String>,
    #[serde(default)]
    pub stdout: Option<String>,
}

/// What any host end's `detail` may carry. Every field is optional: callers write
/// different details for a finish, a rollback in a rollout and `patchbook rollback`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEndDetail {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `patchbook rollback`'s one-line account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RollbackCause>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manual: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl IntentData {
    /// The undo step planned with the intent (`input.undo`), if the step named one.
    pub fn planned_undo(&self) -> Option<UndoStep> {
        serde_json::from_value::<PlannedUndo>(self.input.clone())
            .ok()
            .and_then(|p| p.undo)
    }

    /// The intent's input as a deploy's, when this is a deploy intent.
    pub fn deploy_input(&self) -> Option<DeployInput> {
        (self.step == "deploy" && self.undoes.is_none())
            .then(|| serde_json::from_value(self.input.clone()).ok())
            .flatten()
    }

    /// The intent's input as a file step's (`put_file`, `template`, `line_in_file`,
    /// `remove_file`), when it is one.
    pub fn file_input(&self) -> Option<FileInput> {
        if self.undoes.is_some() {
            return None;
        }
        serde_json::from_value::<FileInput>(self.input.clone())
            .ok()
            .filter(|f| matches!(f.undo, UndoStep::File { .. }))
    }

    /// The intent's input as an `exec`/`shell` change's, when it is one.
    pub fn exec_input(&self) -> Option<ExecInput> {
        (UNMANAGED_STEPS.contains(&self.step.as_str()) && self.undoes.is_none())
            .then(|| serde_json::from_value(self.input.clone()).ok())
            .flatten()
    }

    /// The undo step an undo intent applies.
    pub fn applied_undo(&self) -> Option<UndoStep> {
        self.undoes?;
        serde_json::from_value(self.input.clone()).ok()
    }
}

impl OutcomeData {
    /// The error fields of the output; all `None` when it has none.
    pub fn output_view(&self) -> StepOutput {
        serde_json::from_value(self.output.clone()).unwrap_or_default()
    }

    /// The versions an `upgrade` step read back after it ran, when this is one.
    pub fn upgrade_after(&self) -> Option<BTreeMap<String, Option<String>>> {
        (self.step == "upgrade")
            .then(|| serde_json::from_value::<UpgradeAfter>(self.output.clone()).ok())
            .flatten()
            .map(|o| o.after)
    }

    /// The output as a deploy's, when it is one.
    pub fn deploy_output(&self) -> Option<DeployOutput> {
        (self.step == "deploy")
            .then(|| serde_json::from_value(self.output.clone()).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Journal, StepId};
    use super::*;
    use serde_json::json;

    fn summary() -> Summary {
        let totals = Counts {
            targeted: 2,
            done: 1,
            failed: 1,
            rolled_back: 1,
            ..Counts::default()
        };
        Summary {
            stop: StopReason::BudgetExhausted {
                failures: 1,
                allowed: 0,
            },
            allowed_failures: 0,
            allowed_unreachable: 0,
            totals: totals.clone(),
            per_group: BTreeMap::from([("web".to_string(), totals)]),
            hosts: vec![HostReport {
                name: "web-1".into(),
                wave: 0,
                state: HostStatus::Failed,
                reason: Some("deploy failed".into()),
                started: Some("2026-11-28T02:00:00Z".parse().unwrap()),
                ended: None,
                rolled_back: true,
                rollback_error: None,
            }],
            completion_order: vec!["web-2".into()],
            rollback_order: vec!["web-1".into()],
        }
    }

    fn delivery() -> Delivery {
        Delivery {
            channel: "ops".into(),
            to: "ops".into(),
            ok: false,
            attempts: 3,
            error: Some("HTTP 503".into()),
        }
    }

    /// One entry of every kind this binary writes, and a few shapes more.
    fn every_entry() -> Vec<Entry> {
        let undo = UndoStep::Remove {
            package: "acme-agent".into(),
        };
        vec![
            Entry::RunStart(RunHeader::new(
                "scripts/p.rhai".into(),
                "ab".repeat(32),
                BTreeMap::from([("stdlib/x.rhai".to_string(), "cd".repeat(32))]),
                "ef".repeat(32),
                json!({"waves": ["50%", "100%"]}),
            )),
            Entry::RunClose(RunClose::default()),
            Entry::RunClose(RunClose {
                sig: Some("5a".repeat(64)),
            }),
            Entry::StepIntent(IntentData {
                step: "deploy".into(),
                input: json!({"package": "acme-agent", "to": "1.0.1", "undo": undo}),
                undoes: None,
            }),
            Entry::StepOutcome(OutcomeData {
                step_id: StepId(3),
                step: "deploy".into(),
                ok: true,
                output: json!({"package": "acme-agent", "after": "1.0.1"}),
                undo: Some(undo.clone()),
            }),
            Entry::HostFinish(HostEndData {
                ok: false,
                detail: HostEndDetail {
                    reason: Some("boom".into()),
                    ..Default::default()
                },
            }),
            Entry::HostRollback(HostEndData {
                ok: true,
                detail: HostEndDetail {
                    undone: vec!["remove acme-agent".into()],
                    cause: Some(RollbackCause::HostFailed),
                    ..Default::default()
                },
            }),
            Entry::JournalRepair(JournalRepair {
                torn_after_seq: 7,
                dropped_bytes: 42,
            }),
            Entry::RunResume(RunResume {
                operator: "alice".into(),
            }),
            Entry::RunRollback(RunRollback {
                hosts: Some("web".into()),
                operator: "alice".into(),
            }),
            Entry::RunRefused(RunRefused {
                hosts: vec!["web-1".into(), "web-2".into()],
                holders: vec![super::super::lock::HostHolder::new("r0", "bob", "exec")],
                message: "web-1, web-2 held by run r0".into(),
            }),
            Entry::Backup(BackupHandle {
                id: "bk-1".into(),
                host: "web-1".into(),
                paths: vec!["/etc/acme".into()],
                archive: "backups/r/web-1/bk-1.tar".into(),
                sha256: "00".repeat(32),
                size: 10240,
                missing: vec![],
            }),
            Entry::BackupStopped(BackupStopped {
                paths: vec!["/root/huge".into()],
                cause: BackupStopCause::HostCap { limit: 1 << 30 },
                received: 1 << 30,
                message: "backup cap reached: 1073741824 bytes per host".into(),
            }),
            Entry::BackupStopped(BackupStopped {
                paths: vec!["/var/lib".into()],
                cause: BackupStopCause::LowSpace {
                    free: 10,
                    min_free: 20,
                },
                received: 0,
                message: "disk full".into(),
            }),
            Entry::Verify(VerifyRecord {
                package: "acme-agent".into(),
                expected: "1.0.1".into(),
                found: "1.0.1".into(),
                ok: true,
            }),
            Entry::Health(HealthRecord {
                argv: vec!["/opt/acme/agent.sh".into(), "--check".into()],
                command: None,
                ok: false,
                attempts: 2,
                error: Some("exit 1".into()),
            }),
            Entry::HttpCheck(HttpCheckRecord {
                url: "https://svc.example.com/health".into(),
                ok: false,
                error: Some("HTTP 500".into()),
            }),
            Entry::Artifact(ArtifactRecord::One(ArtifactCheck {
                url: Some("https://mirror.example.com/a.deb".into()),
                sha256: Some("11".repeat(32)),
                what: "checksum".into(),
                ok: true,
                detail: "matches".into(),
            })),
            Entry::Artifact(ArtifactRecord::Checks {
                url: "https://mirror.example.com/a.deb".into(),
                sha256: None,
                checks: vec![ArtifactCheck {
                    url: None,
                    sha256: None,
                    what: "source".into(),
                    ok: true,
                    detail: "trusted".into(),
                }],
            }),
            Entry::Test(TestCase {
                name: "p95".into(),
                kind: TestKind::Performance,
                ok: true,
                duration_ms: 812.4,
                error: None,
                patch_version: Some("1.0.1".into()),
                metrics: Some(Metrics {
                    before: 120.0,
                    after: 126.0,
                    threshold_pct: 10.0,
                    unit: "ms".into(),
                    higher_is_better: false,
                }),
            }),
            Entry::Window(WindowRecord {
                spec: "Sat 02:00-06:00 Asia/Hong_Kong".into(),
                zone: Some("Asia/Hong_Kong".into()),
                buffer: Some("30m".into()),
                open: Some(false),
                start: Some("2026-11-28 02:00 HKT".into()),
                end: None,
            }),
            Entry::RolloutPlan(RolloutPlan {
                policy: json!({"pilot": 1}),
                plan: "pilot: web-1\nwave 1: web-2".into(),
                groups: BTreeMap::from([
                    ("web-1".into(), vec!["web".into()]),
                    ("web-2".into(), vec!["web".into(), "prod".into()]),
                ]),
            }),
            Entry::RolloutResume(RolloutResume {
                skipped_finished: 4,
                rechecked: vec!["web-9".into()],
                pilot_passed: true,
            }),
            Entry::Rollout(RolloutEvent::HostFailed {
                host: "web-1".into(),
                wave: 0,
                reason: "deploy failed".into(),
            }),
            Entry::Rollout(RolloutEvent::RollbackFailed {
                host: "web-1".into(),
                cause: RollbackCause::RunStopped,
                error: "dpkg exited 2".into(),
            }),
            Entry::Rollout(RolloutEvent::Soaking {
                after_wave: 1,
                seconds: 600.0,
            }),
            Entry::Rollout(RolloutEvent::GateEvaluated(GateVerdict {
                after_wave: 1,
                check: "prometheus".into(),
                query: Some("rate(errors_total[5m])".into()),
                bounds: Some("max 0.5".into()),
                value: Some(0.75),
                passed: false,
                detail: "{instance=\"web-1\"} = 0.75 is outside max 0.5".into(),
                soaked_seconds: 600.0,
            })),
            Entry::Rollout(RolloutEvent::GateEvaluated(GateVerdict {
                after_wave: 0,
                check: "closure".into(),
                query: None,
                bounds: None,
                value: None,
                passed: true,
                detail: "the gate returned true".into(),
                soaked_seconds: 0.0,
            })),
            Entry::Rollout(RolloutEvent::RolledBack {
                host: "web-3".into(),
                cause: RollbackCause::GateFailed,
            }),
            Entry::Rollout(RolloutEvent::WindowClosed {
                before_wave: 2,
                time_left_seconds: 60.5,
                needed_seconds: 120.0,
            }),
            Entry::Rollout(RolloutEvent::RunDone { summary: summary() }),
            Entry::Rollout(RolloutEvent::RunDone {
                summary: Summary {
                    stop: StopReason::ControllerFault {
                        host: "web-2".into(),
                        reason: "disk full".into(),
                    },
                    ..summary()
                },
            }),
            Entry::Notify(NotifyRecord::Delivery(delivery())),
            Entry::Notify(NotifyRecord::Notice {
                event: Some("run_started".into()),
                message: Some("Patching 2 hosts".into()),
                severity: Some("info".into()),
                deliveries: vec![delivery()],
            }),
            Entry::FileUnchanged(FileUnchanged {
                step: "line_in_file".into(),
                path: "/etc/acme/agent.conf".into(),
            }),
            Entry::UpgradeNoChange(UpgradeNoChange {
                skipped: vec![Skipped {
                    package: "acme-agent".into(),
                    reason: "acme-agent is at 1.0.1".into(),
                }],
            }),
            Entry::UndoSkipped(UndoSkipped {
                step_id: StepId(7),
                step: "deploy".into(),
                undo: "reinstall acme-agent 1.0.0".into(),
                found: "acme-agent is 1.0.2".into(),
                expected: "installed 1.0.1".into(),
                reason: "acme-agent is 1.0.2, this run installed 1.0.1: not reverting a state this run did not create".into(),
            }),
            Entry::HostUnreachable(HostUnreachable {
                step: "needing".into(),
                reason: "web-1: cannot connect to 10.0.0.1:22: connection refused".into(),
            }),
            Entry::RunParams(RunParams {
                values: BTreeMap::from([
                    ("mirror".to_string(), ParamValue::Plain("/srv/debs".into())),
                    ("token".to_string(), ParamValue::Reference("${env:TOKEN}".into())),
                    ("pin".to_string(), ParamValue::Secret),
                ]),
            }),
            Entry::Log(LogRecord {
                message: "3 hosts need acme-agent 1.0.1".into(),
                source: "lib/patch/debian.rhai".into(),
                line: 12,
            }),
            Entry::MonitorSample(MonitorSample {
                phase: "after".into(),
                at: "2026-11-28T02:00:00Z".parse().unwrap(),
                values: BTreeMap::from([("cpu".into(), 12.5), ("error_rate".into(), 0.0)]),
            }),
            Entry::MonitorVerdict(MonitorVerdict {
                ok: false,
                baseline: BTreeMap::from([("error_rate".into(), 0.0)]),
                after: BTreeMap::from([("error_rate".into(), 30.0)]),
                thresholds: BTreeMap::from([("error_rate".into(), "2x".into())]),
                regressions: vec!["error_rate 30.00 after the change, baseline 0.00, limit 0.00 (2x)".into()],
                window_seconds: 300.0,
            }),
            Entry::Rehearsal(RehearsalRecord {
                ok: false,
                compared: 812,
                undone: vec!["reinstall acme-agent 1.0.0".into()],
                differences: vec![
                    "file /etc/acme/migrated.state: did not exist, now `f 600 0:0 ab`".into(),
                ],
                error: None,
            }),
            Entry::ControllerUsage(ControllerUsage {
                at: "2026-11-28T02:00:00Z".parse().unwrap(),
                cpu_seconds: 1.25,
                rss_kib: 20480,
                peak_rss_kib: 24576,
                threads: 12,
                sockets: 5,
                read_bytes: 1 << 20,
                written_bytes: 1 << 16,
                bytes_sent: 48_000,
                bytes_received: 310_000,
                connections: 4,
            }),
            Entry::Unknown {
                kind: "wave.paused.v9".into(),
                data: json!({"anything": [1, 2]}),
            },
            Entry::AdvisoryFeed(AdvisoryFeed {
                source: "/srv/feeds/debian.json".into(),
                format: "debian-tracker".into(),
                sha256: "ab".repeat(32),
                pinned: true,
                statements: 12,
            }),
            Entry::Evidence(EvidenceRecord {
                cve: "CVE-2024-0001".into(),
                host: "web-1".into(),
                package: "openssl".into(),
                before: "3.0.11-1~deb12u1".into(),
                after: "3.0.11-1~deb12u2".into(),
                fixed: "3.0.11-1~deb12u2".into(),
                feed_sha256: "cd".repeat(32),
                time: "2026-12-02T16:00:00Z".into(),
                closed: true,
            }),
            Entry::SoakPlanned(SoakPlanned {
                hosts: vec!["web-1".into(), "web-2".into()],
                period_seconds: 259_200.0,
                every_seconds: 900.0,
                options: json!({"period": "72h", "every": "15m", "thresholds": {"error_rate": "2x"}}),
            }),
            Entry::SoakStarted(SoakStarted {
                run: "r1".into(),
                at: "2026-12-02T16:00:00Z".parse().unwrap(),
                until: "2026-12-05T16:00:00Z".parse().unwrap(),
                baseline: BTreeMap::from([("error_rate".to_string(), 0.5)]),
                baseline_from: "run".into(),
            }),
            Entry::SoakEnded(SoakEnded {
                run: "r1".into(),
                at: "2026-12-05T16:00:00Z".parse().unwrap(),
                verdict: "regressed".into(),
                samples: 288,
                regressions: vec!["error_rate 4.00 after the change, baseline 0.50, limit 1.00 (2x)".into()],
            }),
            Entry::ScanHost(ScanHost {
                host: "web-1".into(),
                os: "debian 12".into(),
                release: Some("Debian 12".into()),
                covered: true,
                open: vec![ScanFinding {
                    cve: "CVE-2024-0001".into(),
                    severity: "high".into(),
                    packages: vec![ScanPackage {
                        package: "openssl".into(),
                        binaries: vec!["libssl3".into()],
                        installed: "3.0.11-1~deb12u1".into(),
                        fixed: Some("3.0.11-1~deb12u2".into()),
                        verdict: "vulnerable-fix-available".into(),
                        feed_sha256: "cd".repeat(32),
                    }],
                }],
                no_fix: vec![ScanFinding {
                    cve: "CVE-2024-0002".into(),
                    severity: "medium".into(),
                    packages: vec![ScanPackage {
                        package: "shadow".into(),
                        binaries: vec!["passwd".into()],
                        installed: "1:4.13+dfsg1-1".into(),
                        fixed: None,
                        verdict: "vulnerable-no-fix".into(),
                        feed_sha256: "cd".repeat(32),
                    }],
                }],
            }),
            Entry::Scan(ScanSummary {
                feeds: vec![ScanFeed {
                    source: "/srv/feeds/debian.json".into(),
                    format: "debian-tracker".into(),
                    sha256: "cd".repeat(32),
                }],
                selector: "all".into(),
                hosts: vec!["web-1".into()],
                unreachable: vec!["web-2".into()],
                fixable: 1,
                no_fix: 1,
                not_covered: 0,
                newly_open: 1,
            }),
        ]
    }

    #[test]
    fn the_host_ending_kinds_are_the_entries_kinds() {
        let unreachable = Entry::HostUnreachable(HostUnreachable {
            step: "rollout".into(),
            reason: "refused".into(),
        });
        assert_eq!(
            Entry::ends_host_as_unreachable(unreachable.kind()),
            Some(true)
        );
        assert_eq!(Entry::ends_host_as_unreachable("host.finish"), Some(false));
        assert!(Entry::KINDS.contains(&"host.finish"));
        assert_eq!(Entry::ends_host_as_unreachable("host.rollback"), None);
    }

    #[test]
    fn every_entry_round_trips_through_a_journal_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "r1", "alice").unwrap();
        let entries = every_entry();
        for e in &entries {
            j.append_entry(Some("web-1"), e).unwrap();
        }
        let back: Vec<Entry> = j
            .records()
            .unwrap()
            .iter()
            .map(|r| r.entry().unwrap())
            .collect();
        assert_eq!(back, entries);
        // Every kind this binary writes is covered above.
        let mut covered: Vec<&str> = entries.iter().map(Entry::kind).collect();
        covered.retain(|k| Entry::KINDS.contains(k));
        covered.dedup();
        assert_eq!(covered, Entry::KINDS);
    }

    /// Lines as this version's writers put them on disk before records were typed:
    /// `json!` maps built by the script layer and by earlier primitives.
    #[test]
    fn lines_of_existing_journals_read_as_their_variant() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "old", "alice").unwrap();
        let lines: Vec<(&str, Value)> = vec![
            (
                "window",
                json!({"spec": "Sat 02:00-06:00 Asia/Hong_Kong", "zone": "Asia/Hong_Kong",
                       "buffer": "30m", "open": false,
                       "start": "2026-11-28 02:00 HKT", "end": "2026-11-28 06:00 HKT"}),
            ),
            (
                "rollout.plan",
                json!({"policy": {"pilot": 1}, "plan": "pilot: a"}),
            ),
            ("rollout.resume", json!({"skipped_finished": 3})),
            (
                "rollout.event",
                json!({"kind": "rolled_back", "host": "a", "cause": "host_failed"}),
            ),
            (
                "notify",
                json!({"channel": "ops", "to": "ops", "ok": true, "attempts": 1}),
            ),
            (
                "artifact",
                json!({"url": "https://m.example.com/a.deb", "sha256": "ab", "what": "download",
                       "ok": true, "detail": "sha256 matches"}),
            ),
            (
                "http_check",
                json!({"url": "https://s.example.com", "ok": true, "error": null}),
            ),
            ("run.resume", json!({"operator": "alice"})),
            ("run.rollback", json!({"hosts": null, "operator": "alice"})),
            (
                "journal.repair",
                json!({"torn_after_seq": 9, "dropped_bytes": 17}),
            ),
            (
                "verify",
                json!({"package": "p", "expected": "1", "found": "not installed", "ok": false}),
            ),
            (
                "health",
                json!({"argv": ["true"], "ok": true, "attempts": 1}),
            ),
            (
                "health",
                json!({"command": "curl -f localhost", "ok": true, "attempts": 1}),
            ),
        ];
        for (kind, data) in &lines {
            j.append(Some("a"), kind, data.clone()).unwrap();
        }
        let recs = j.records().unwrap();
        let entries: Vec<Entry> = recs.iter().map(|r| r.entry().unwrap()).collect();
        assert!(
            matches!(&entries[0], Entry::Window(w) if w.open == Some(false) && w.buffer.as_deref() == Some("30m"))
        );
        assert!(matches!(&entries[1], Entry::RolloutPlan(p) if p.plan == "pilot: a"));
        assert!(matches!(&entries[2], Entry::RolloutResume(r) if r.skipped_finished == 3));
        assert!(matches!(
            &entries[3],
            Entry::Rollout(RolloutEvent::RolledBack {
                cause: RollbackCause::HostFailed,
                ..
            })
        ));
        assert!(matches!(&entries[4], Entry::Notify(NotifyRecord::Delivery(d)) if d.ok));
        assert!(
            matches!(&entries[5], Entry::Artifact(ArtifactRecord::One(c)) if c.what == "download")
        );
        assert!(matches!(&entries[6], Entry::HttpCheck(c) if c.ok && c.error.is_none()));
        assert!(matches!(&entries[7], Entry::RunResume(r) if r.operator == "alice"));
        assert!(matches!(&entries[8], Entry::RunRollback(r) if r.hosts.is_none()));
        assert!(matches!(&entries[9], Entry::JournalRepair(r) if r.dropped_bytes == 17));
        assert!(matches!(&entries[10], Entry::Verify(v) if v.found == "not installed"));
        assert!(matches!(&entries[11], Entry::Health(h) if h.command_line() == "true"));
        assert!(
            matches!(&entries[12], Entry::Health(h) if h.command_line() == "curl -f localhost")
        );
        // Writing the typed entry gives back the very data the untyped writer gave:
        // the script layer can switch to typed entries without changing its lines.
        for ((_, data), e) in lines.iter().zip(&entries).take(10) {
            assert_eq!(&e.to_data(), data, "{e:?}");
        }
        for r in &recs {
            assert_eq!(r.compute_hash(), r.hash);
        }
    }

    #[test]
    fn a_line_written_before_typed_records_keeps_its_hash_and_reads_typed() {
        // A `rollout.event` line exactly as the journal wrote it (hash included).
        let mut r: super::super::Record = serde_json::from_value(json!({
            "seq": 5, "ts": "2026-11-28T02:00:01.000001Z", "run": "r", "operator": "alice",
            "host": "a", "kind": "rollout.event",
            "data": {"kind": "host_done", "host": "a", "wave": 0, "seconds": 1.5},
            "prev": super::super::GENESIS, "hash": ""
        }))
        .unwrap();
        r.hash = r.compute_hash();
        let line = serde_json::to_string(&r).unwrap();
        let back: super::super::Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.compute_hash(), r.hash);
        assert_eq!(
            back.entry().unwrap(),
            Entry::Rollout(RolloutEvent::HostDone {
                host: "a".into(),
                wave: 0,
                seconds: 1.5
            })
        );
    }

    #[test]
    fn the_named_kind_constants_are_typed_kinds() {
        use super::super::kind;
        for k in [
            kind::RUN_START,
            kind::RUN_CLOSE,
            kind::STEP_INTENT,
            kind::STEP_OUTCOME,
            kind::HOST_FINISH,
            kind::HOST_ROLLBACK,
            kind::JOURNAL_REPAIR,
            kind::BACKUP,
            kind::TEST,
            kind::ROLLOUT_EVENT,
            kind::WINDOW,
        ] {
            assert!(Entry::KINDS.contains(&k), "{k}");
        }
    }

    #[test]
    fn unknown_kinds_read_and_known_kinds_with_bad_data_say_so() {
        let e = Entry::from_parts("canary.v2", json!({"x": 1})).unwrap();
        assert_eq!(e.kind(), "canary.v2");
        assert_eq!(e.to_data(), json!({"x": 1}));
        let err = Entry::from_parts("verify", json!({"package": "p"})).unwrap_err();
        assert_eq!(err.kind, "verify");
        assert!(err.to_string().contains("`verify` record"), "{err}");
    }

    #[test]
    fn typed_views_of_step_and_host_end_payloads() {
        let undo = UndoStep::Manual {
            reason: "call ops".into(),
        };
        let intent = IntentData {
            step: "deploy".into(),
            input: json!({"package": "p", "from": null, "to": "2", "undo": undo}),
            undoes: None,
        };
        assert_eq!(intent.planned_undo(), Some(undo.clone()));
        let d = intent.deploy_input().unwrap();
        assert_eq!(
            (d.package.as_str(), d.from, d.to.as_str()),
            ("p", None, "2")
        );
        let undoing = IntentData {
            step: "undo".into(),
            input: serde_json::to_value(&undo).unwrap(),
            undoes: Some(StepId(3)),
        };
        assert_eq!(undoing.applied_undo(), Some(undo));
        assert_eq!(undoing.deploy_input(), None);
        let end: HostEndData = serde_json::from_value(
            json!({"ok": false, "detail": {"error": "e", "cause": "run_stopped"}}),
        )
        .unwrap();
        let v = end.detail;
        assert_eq!(
            (v.error.as_deref(), v.cause),
            (Some("e"), Some(RollbackCause::RunStopped))
        );
    }
}
