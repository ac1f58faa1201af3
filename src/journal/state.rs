//! The read side of the journal: what resume, rollback and reports need to know about
//! a run, derived from its records every time and never stored anywhere else.
//!
//! It owns the meaning of the kinds the journal defines (intent, outcome, host finish,
//! host rollback), read as typed [`Entry`] values; it must not write anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::entry::ParamValue;
use super::{
    Entry, IntentData, JournalError, OutcomeData, Record, RunHeader, StepId, Store, UndoStep,
};

/// One step of a host: its intent and, once it is known, its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub id: StepId,
    pub step: String,
    pub intent: Record,
    pub outcome: Option<Record>,
    /// The intent's data, typed.
    pub intent_data: IntentData,
    /// The outcome's data, typed, once it is recorded.
    pub outcome_data: Option<OutcomeData>,
    /// The undo planned with the intent (`input.undo`), replaced by the one recorded
    /// with the outcome when there is one.
    pub undo: Option<UndoStep>,
    /// Set when this step applied the undo of an earlier step.
    pub undoes: Option<StepId>,
}

impl StepState {
    /// `Some(ok)` once the outcome is recorded, `None` while the intent is open.
    pub fn ok(&self) -> Option<bool> {
        self.outcome_data.as_ref().map(|o| o.ok)
    }

    pub fn input(&self) -> serde_json::Value {
        self.intent_data.input.clone()
    }
}

/// Everything the journal says about one host of a run: its steps and how its work
/// and rollback ended. Its status in a run is a [`super::entry::HostStatus`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostHistory {
    pub steps: Vec<StepState>,
    /// A `host.finish` was recorded.
    pub finished: bool,
    /// The last `host.finish` said failed, or (without one) the last step that
    /// ended did.
    pub failed: bool,
    /// The last `host.rollback` said it succeeded.
    pub rolled_back: bool,
    /// The host could not be connected to (`host.unreachable`) and no `host.finish`
    /// came since: `run --resume` asks it again, and it is one of the hosts
    /// `run --retry` works on.
    pub unreachable: bool,
}

impl HostHistory {
    /// Steps whose intent is on disk but whose outcome is not: the action may or may
    /// not have happened, so resume must check the host before going on.
    pub fn open_intents(&self) -> Vec<&StepState> {
        self.steps.iter().filter(|s| s.outcome.is_none()).collect()
    }

    /// The undo steps still to apply, newest first: steps that recorded an undo and
    /// whose undo has not yet been applied successfully.
    pub fn undo_steps(&self) -> Vec<(StepId, &UndoStep)> {
        let applied: Vec<StepId> = self
            .steps
            .iter()
            .filter(|s| s.ok() == Some(true))
            .filter_map(|s| s.undoes)
            .collect();
        self.steps
            .iter()
            .rev()
            .filter(|s| s.undoes.is_none() && !applied.contains(&s.id))
            .filter_map(|s| s.undo.as_ref().map(|u| (s.id, u)))
            .collect()
    }

    /// The last step with an outcome, undo steps excluded.
    pub fn last_completed(&self) -> Option<&StepState> {
        self.steps
            .iter()
            .rev()
            .find(|s| s.undoes.is_none() && s.outcome.is_some())
    }
}

/// A run as its records describe it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunState {
    pub run: String,
    pub header: Option<RunHeader>,
    pub operator: Option<String>,
    pub started: Option<String>,
    pub hosts: BTreeMap<String, HostHistory>,
    /// Hosts in the order their first (non-undo) step began: the deployment order.
    pub deploy_order: Vec<String>,
    /// A `run.close` record is present.
    pub closed: bool,
    pub last_seq: u64,
    /// The `--param` values of the run's latest start or resume (`run.params`).
    pub params: Option<BTreeMap<String, ParamValue>>,
}

impl RunState {
    pub fn from_records(run: &str, records: &[Record]) -> Self {
        let mut st = RunState {
            run: run.to_string(),
            ..RunState::default()
        };
        // Where each step lives, so an outcome finds its intent without a scan.
        let mut where_is: BTreeMap<StepId, (String, usize)> = BTreeMap::new();
        for rec in records {
            st.last_seq = rec.seq;
            // A record whose data does not fit its kind says nothing this state
            // can rely on; `audit verify` and the report name it.
            match rec.entry() {
                Ok(Entry::RunStart(header)) => {
                    st.header = Some(header);
                    st.operator = Some(rec.operator.clone());
                    st.started = Some(rec.ts.clone());
                }
                Ok(Entry::RunClose(_)) => st.closed = true,
                Ok(Entry::StepIntent(data)) => {
                    let Some(host) = rec.host.clone() else {
                        continue;
                    };
                    if data.undoes.is_none() && !st.deploy_order.contains(&host) {
                        st.deploy_order.push(host.clone());
                    }
                    let h = st.hosts.entry(host.clone()).or_default();
                    let id = StepId(rec.seq);
                    where_is.insert(id, (host, h.steps.len()));
                    h.steps.push(StepState {
                        id,
                        step: data.step.clone(),
                        intent: rec.clone(),
                        outcome: None,
                        // The undo planned before acting, so a crash between the
                        // action and its outcome still leaves a way back.
                        undo: data.planned_undo(),
                        undoes: data.undoes,
                        intent_data: data,
                        outcome_data: None,
                    });
                }
                Ok(Entry::StepOutcome(data)) => {
                    let Some((host, i)) = where_is.get(&data.step_id) else {
                        continue;
                    };
                    if let Some(step) = st.hosts.get_mut(host).and_then(|h| h.steps.get_mut(*i)) {
                        step.outcome = Some(rec.clone());
                        if data.undo.is_some() {
                            step.undo = data.undo.clone();
                        }
                        step.outcome_data = Some(data);
                    }
                }
                Ok(Entry::HostFinish(data)) => {
                    if let Some(host) = rec.host.clone() {
                        let h = st.hosts.entry(host).or_default();
                        h.finished = true;
                        h.failed = !data.ok;
                        h.unreachable = false;
                    }
                }
                Ok(Entry::HostUnreachable(_)) => {
                    if let Some(host) = rec.host.clone() {
                        st.hosts.entry(host).or_default().unreachable = true;
                    }
                }
                Ok(Entry::RunParams(p)) => {
                    st.params = Some(p.values);
                }
                Ok(Entry::HostRollback(data)) => {
                    if let Some(host) = rec.host.clone() {
                        st.hosts.entry(host).or_default().rolled_back = data.ok;
                    }
                }
                _ => {
                    if let Some(host) = &rec.host {
                        st.hosts.entry(host.clone()).or_default();
                    }
                }
            }
        }
        for h in st.hosts.values_mut() {
            if !h.finished {
                h.failed = h.last_completed().and_then(StepState::ok) == Some(false);
            }
        }
        st
    }

    /// Reads a run from the state directory. A torn last line is ignored.
    pub fn load(state_dir: &Path, run: &str) -> Result<Self, JournalError> {
        Self::load_in(&Store::file(state_dir), run)
    }

    /// Reads a run from `store`.
    pub fn load_in(store: &Store, run: &str) -> Result<Self, JournalError> {
        Ok(Self::from_records(run, &store.read_records(run)?))
    }

    /// The hosts [`RunState::unreachable_hosts`] names for a run in `store`,
    /// reading only each record's host and kind: the end of a 100,000-host run
    /// asks this, and building every record and the whole state for it cost more
    /// memory than the run itself. A run with an unreadable line reads as
    /// [`JournalError::Corrupt`], as [`Store::read_records`] does.
    pub fn unreachable_in(store: &Store, run: &str) -> Result<Vec<String>, JournalError> {
        /// A record's line, every field but these two skipped unbuilt.
        #[derive(serde::Deserialize)]
        struct HostKind {
            #[serde(default)]
            host: Option<String>,
            kind: String,
        }
        let Some(scan) = store.scan_as::<HostKind>(run)? else {
            return Err(JournalError::NoSuchRun {
                run: run.to_string(),
                dir: store.location(),
            });
        };
        if let Some((line, message)) = scan.bad.into_iter().next() {
            return Err(JournalError::Corrupt {
                path: store.run_location(run),
                line,
                message,
            });
        }
        // The same rule as `from_records`: unreachable until the host finishes.
        let mut hosts: BTreeMap<String, bool> = BTreeMap::new();
        for (_, r) in scan.items {
            let Some(host) = r.host else { continue };
            let Some(unreachable) = Entry::ends_host_as_unreachable(&r.kind) else {
                continue;
            };
            hosts.insert(host, unreachable);
        }
        Ok(hosts
            .into_iter()
            .filter(|(_, u)| *u)
            .map(|(h, _)| h)
            .collect())
    }

    pub fn host(&self, name: &str) -> Option<&HostHistory> {
        self.hosts.get(name)
    }

    /// Every open intent of the run, with its host, in record order.
    pub fn open_intents(&self) -> Vec<(&str, &StepState)> {
        let mut out: Vec<(&str, &StepState)> = self
            .hosts
            .iter()
            .flat_map(|(name, h)| {
                h.open_intents()
                    .into_iter()
                    .map(move |s| (name.as_str(), s))
            })
            .collect();
        out.sort_by_key(|(_, s)| s.id);
        out
    }

    /// Hosts whose work failed (rolled back or not) or that could not be connected
    /// to: what `run --retry` works on again, in name order.
    pub fn retry_hosts(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.unreachable || h.failed)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Hosts that could not be connected to (and were not reached since), in name
    /// order: a probe or a rollout met them.
    pub fn unreachable_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.unreachable)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Hosts in the order a rollback must visit them: reverse deployment order.
    pub fn rollback_order(&self) -> Vec<&str> {
        self.deploy_order.iter().rev().map(String::as_str).collect()
    }
}

/// What `list_runs` says about one run file.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub run: String,
    pub path: PathBuf,
    pub records: usize,
    pub started: Option<String>,
    pub operator: Option<String>,
    pub playbook: Option<PathBuf>,
    pub closed: bool,
    /// Some line did not parse; `patchbook audit verify` says which.
    pub damaged: bool,
}

/// What names an advisory scan's run: `<UTC>Z-advscan-<n>`. A scan is a run of
/// its own (journaled, verified by `audit verify`) but never "the last run" a
/// report means.
pub const SCAN_RUN_MARK: &str = "-advscan-";

/// Whether `run` is an advisory scan's run: exactly `YYYYMMDDTHHMMSSZ-advscan-N`,
/// so a playbook that happens to be called `…-advscan-…` is not taken for one.
pub fn is_scan_run(run: &str) -> bool {
    let Some((stamp, n)) = run.split_once(SCAN_RUN_MARK) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    stamp.len() == 16
        && stamp.get(8..9) == Some("T")
        && stamp.get(15..) == Some("Z")
        && stamp.get(..8).is_some_and(digits)
        && stamp.get(9..15).is_some_and(digits)
        && digits(n)
}

#[cfg(test)]
#[test]
fn scan_runs_are_told_by_their_whole_name() {
    assert!(is_scan_run("20261128T020000Z-advscan-1"));
    assert!(is_scan_run("20261128T020000Z-advscan-12"));
    assert!(!is_scan_run("20261128T020000Z-12345"));
    assert!(!is_scan_run("nightly-advscan-x-20261128T020000-g1-1"));
    assert!(!is_scan_run("20261128T020000Z-advscan-"));
}

/// Every run under a state directory, oldest first (by start time, then id).
pub fn list_runs(state_dir: &Path) -> Result<Vec<RunInfo>, JournalError> {
    list_runs_in(&Store::file(state_dir))
}

/// Every run in `store`, oldest first (by start time, then id).
pub fn list_runs_in(store: &Store) -> Result<Vec<RunInfo>, JournalError> {
    let mut out = Vec::new();
    for run in store.run_names()? {
        let path = store.run_location(&run);
        // A run removed between listing and reading is not listed.
        let Some(scan) = store.scan(&run)? else {
            continue;
        };
        let damaged = !scan.bad.is_empty() || scan.torn.is_some();
        let records: Vec<Record> = scan.items.into_iter().map(|(_, r)| r).collect();
        let st = RunState::from_records(&run, &records);
        out.push(RunInfo {
            run,
            path,
            records: records.len(),
            started: st.started,
            operator: st.operator,
            playbook: st.header.map(|h| h.playbook),
            closed: st.closed,
            damaged,
        });
    }
    out.sort_by(|a, b| (&a.started, &a.run).cmp(&(&b.started, &b.run)));
    Ok(out)
}
