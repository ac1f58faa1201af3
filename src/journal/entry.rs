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

use super::{HostEndData, IntentData, OutcomeData, RunHeader, UndoStep};

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
    /// A backup archive taken of the record's host.
    Backup(BackupHandle) = "backup",
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
}

/// `kind` strings of the records this module types, for code that needs one
/// without building an entry.
pub mod kinds {
    pub const BACKUP: &str = "backup";
    pub const TEST: &str = "test";
    pub const ROLLOUT_EVENT: &str = "rollout.event";
    pub const WINDOW: &str = "window";
}

/// `data` of `run.close`: nothing, written as `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunClose {}

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
}

/// `data` of a `rollout.resume` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutResume {
    /// Targets left alone because the journal saw them to the end.
    pub skipped_finished: usize,
}

/// Why a host is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackCause {
    /// The host's own work failed.
    HostFailed,
    /// The run stopped early and the policy says `rollback: "all"`.
    RunStopped,
}

impl RollbackCause {
    /// As it is serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackCause::HostFailed => "host_failed",
            RollbackCause::RunStopped => "run_stopped",
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
    Paused {
        seconds: f64,
    },
    GateStopped {
        after_wave: usize,
        reason: String,
    },
    WindowClosed {
        before_wave: usize,
        time_left_seconds: f64,
        needed_seconds: f64,
    },
    RunDone {
        summary: Summary,
    },
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
}

/// Where a host of a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Never started.
    Pending,
    Done,
    /// Its work failed or ran past its deadline.
    Failed,
    /// Succeeded, then rolled back by `rollback: "all"`.
    Reverted,
}

/// One host of a rollout summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub name: String,
    pub wave: usize,
    pub state: HostState,
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

/// Counts where `targeted = done + failed + reverted + pending`; `rolled_back`
/// counts successful rollbacks of failed and reverted hosts alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub targeted: usize,
    pub done: usize,
    pub failed: usize,
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

/// What any step's intent input may carry besides its own fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct PlannedUndo {
    #[serde(default)]
    undo: Option<UndoStep>,
}

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
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// `patchbook rollback`'s one-line account.
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub cause: Option<RollbackCause>,
    #[serde(default)]
    pub undone: Vec<String>,
    #[serde(default)]
    pub manual: Vec<String>,
    #[serde(default)]
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

    /// The output as a deploy's, when it is one.
    pub fn deploy_output(&self) -> Option<DeployOutput> {
        (self.step == "deploy")
            .then(|| serde_json::from_value(self.output.clone()).ok())
            .flatten()
    }
}

impl HostEndData {
    /// The detail's known fields; a detail that is not an object has none.
    pub fn detail_view(&self) -> HostEndDetail {
        serde_json::from_value(self.detail.clone()).unwrap_or_default()
    }
}
