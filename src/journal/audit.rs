//! `audit verify`: checks every run's hash chain against itself and against the audit
//! index, and the index's own chain.
//!
//! It owns the verdicts (intact, open, tampered, with the first problem and the last
//! good seq). It only reads: it never repairs, and it must not take a run's lock for
//! longer than the instant needed to see whether a controller holds it.
//!
//! What it can and cannot see: any edit, deletion, reordering or insertion breaks the
//! chain, and a field added outside the hashed content makes the line unreadable.
//! Without a verify key, a writer of the state directory can recompute every hash
//! and re-chain the index: the chains prove only that the files agree with each
//! other. With `[audit] verify_key`, every index entry and every run's close must
//! carry a signature of that key, which no writer of the state directory holds: a
//! re-hashed run, a re-chained index and a close line dropped from the index are
//! caught. What a signature cannot show is that something signed is gone: cutting
//! the index's tail (with the newest runs) back to an earlier signed entry leaves a
//! state that verifies, unless the verifier is told how far it went
//! ([`VerifyOptions::expect_at_least`], fed from the syslog copy or the heads the
//! runs printed). The records after a run's last signed checkpoint are only as
//! trustworthy as the chain.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::anchor::VerifyKey;
use super::entry::Entry;
use super::index::{self, IndexEntry, IndexEvent};
use super::lock::{Holder, RunLock};
use super::{JournalError, Record, Store, GENESIS};

/// The first thing wrong with a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The index knows the run, its file is gone.
    Missing { indexed_seq: u64 },
    /// A run file the index has never heard of.
    NotIndexed,
    /// A line before the last one is not a record.
    Unreadable { line: usize, message: String },
    /// The last line is torn (a crash mid-write, or a cut).
    TornTail { line: usize },
    /// A record's hash does not match its content.
    Edited { seq: u64 },
    /// The record with this seq is gone.
    Deleted { seq: u64 },
    /// A record appears where another seq belongs.
    Reordered { seq: u64, expected: u64 },
    /// A record's `prev` is not the hash of the record before it.
    Unlinked { seq: u64 },
    /// A record names another run.
    WrongRun { seq: u64, found: String },
    /// The file ends before a checkpoint the index holds.
    Truncated { index_seq: u64 },
    /// The record at an index checkpoint has another hash: the file was rewritten.
    Rewritten { seq: u64 },
    /// Records follow the run's close.
    AfterClose { seq: u64, closed_at: u64 },
    /// The index entry vouching for record `seq` has no valid signature of the
    /// verify key.
    BadSignature { seq: u64, index_seq: u64 },
    /// The run's close record has no valid signature of the verify key.
    CloseUnsigned { seq: u64 },
    /// The run file holds a signed close the index does not know.
    CloseLost { seq: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { indexed_seq } => write!(
                f,
                "run file deleted: the audit index knows it up to seq {indexed_seq}"
            ),
            Problem::NotIndexed => write!(
                f,
                "not in the audit index: the file was put there by hand, or index entries were removed"
            ),
            Problem::Unreadable { line, message } => {
                write!(f, "line {line} is not a record ({message})")
            }
            Problem::TornTail { line } => write!(
                f,
                "truncated tail: line {line} is torn (a crash mid-write, or a cut)"
            ),
            Problem::Edited { seq } => write!(
                f,
                "record seq {seq} edited: its hash does not match its content (edited or forged)"
            ),
            Problem::Deleted { seq } => write!(f, "record seq {seq} deleted"),
            Problem::Reordered { seq, expected } => write!(
                f,
                "records reordered: seq {seq} appears where seq {expected} belongs"
            ),
            Problem::Unlinked { seq } => write!(
                f,
                "record seq {seq} does not link to the chain (forged or inserted)"
            ),
            Problem::WrongRun { seq, found } => {
                write!(f, "record seq {seq} belongs to run `{found}`")
            }
            Problem::Truncated { index_seq } => write!(
                f,
                "truncated: the audit index holds seq {index_seq}, the file ends before it"
            ),
            Problem::Rewritten { seq } => write!(
                f,
                "rewritten: record seq {seq} differs from the hash the audit index holds"
            ),
            Problem::AfterClose { seq, closed_at } => write!(
                f,
                "record seq {seq} appended after the run was closed at seq {closed_at}"
            ),
            Problem::BadSignature { seq, index_seq } => write!(
                f,
                "record seq {seq}: audit index entry {index_seq}, which vouches for it, has no valid signature of the verify key (the run was re-hashed, or the index re-chained or forged)"
            ),
            Problem::CloseUnsigned { seq } => write!(
                f,
                "record seq {seq} (run.close) has no valid signature of the verify key (the run was re-hashed, or its close forged)"
            ),
            Problem::CloseLost { seq } => write!(
                f,
                "the run file holds a signed close at seq {seq} that the audit index lacks (index entries were removed, or a crash came between the two writes)"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verdict {
    /// Closed, and every check passed.
    Intact { records: u64, final_hash: String },
    /// Not closed yet: in progress (the lock is held), or stopped or crashed. Every
    /// check that applies to it passed.
    Open {
        records: u64,
        holder: Option<Holder>,
    },
    Tampered {
        #[serde(flatten)]
        problem: Problem,
        last_good_seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunAudit {
    pub run: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl fmt::Display for RunAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Intact {
                records,
                final_hash,
            } => write!(
                f,
                "{}  OK  {records} records, closed, final hash {}",
                self.run,
                final_hash.get(..16).unwrap_or(final_hash)
            ),
            Verdict::Open {
                records,
                holder: Some(h),
            } => write!(
                f,
                "{}  OPEN  {records} records, in progress: pid {} on {} since {}",
                self.run, h.pid, h.host, h.since
            ),
            Verdict::Open {
                records: 0,
                holder: None,
            } => write!(
                f,
                "{}  OPEN  0 records, never began (its controller stopped before the header; no host was touched)",
                self.run
            ),
            Verdict::Open {
                records,
                holder: None,
            } => write!(
                f,
                "{}  OPEN  {records} records, chain intact, not closed (stopped or crashed: resume or roll it back)",
                self.run
            ),
            Verdict::Tampered {
                problem,
                last_good_seq,
            } => write!(
                f,
                "{}  TAMPERED  {problem}; last good seq {last_good_seq}",
                self.run
            ),
        }
    }
}

/// The index's own verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexAudit {
    pub entries: u64,
    pub problem: Option<String>,
}

impl fmt::Display for IndexAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => write!(f, "{}  OK  {} entries", index::INDEX_FILE, self.entries),
            Some(p) => write!(f, "{}  TAMPERED  {p}", index::INDEX_FILE),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub runs: Vec<RunAudit>,
    pub index: IndexAudit,
}

impl AuditReport {
    /// True when nothing was tampered with: every run intact or open, the index sound.
    pub fn intact(&self) -> bool {
        self.index.problem.is_none()
            && self
                .runs
                .iter()
                .all(|r| !matches!(r.verdict, Verdict::Tampered { .. }))
    }

    pub fn run(&self, run: &str) -> Option<&RunAudit> {
        self.runs.iter().find(|r| r.run == run)
    }
}

/// What a verifier brings from outside the state directory.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The public half of `[audit] signing_key`: every index entry and close must
    /// be signed by it.
    pub key: Option<VerifyKey>,
    /// The index must hold at least this many entries (the last signed index seq
    /// the verifier saw elsewhere): catches a cut of the index's tail.
    pub expect_at_least: Option<u64>,
}

/// Verifies one run, or every run the state directory or the index knows.
pub fn verify(state_dir: &Path, run: Option<&str>) -> Result<AuditReport, JournalError> {
    verify_with(state_dir, run, &VerifyOptions::default())
}

/// [`verify`] with a verify key and what the verifier knows of the index's length.
pub fn verify_with(
    state_dir: &Path,
    run: Option<&str>,
    opts: &VerifyOptions,
) -> Result<AuditReport, JournalError> {
    verify_in(&Store::file(state_dir), run, opts)
}

/// [`verify_with`] for the runs of `store`, against the audit index of its state
/// directory: PostgreSQL records are checked exactly as run files are.
pub fn verify_in(
    store: &Store,
    run: Option<&str>,
    opts: &VerifyOptions,
) -> Result<AuditReport, JournalError> {
    let mut idx = index::read(store.state_dir())?;
    if idx.problem.is_none() {
        idx.problem = signed_index_problem(&idx.entries, opts);
    }
    let mut names: BTreeSet<String> = idx.entries.iter().map(|e| e.run.clone()).collect();
    names.extend(store.run_names()?);
    if let Some(run) = run {
        if !names.contains(run) {
            return Err(JournalError::NoSuchRun {
                run: run.to_string(),
                dir: store.location(),
            });
        }
        names = BTreeSet::from([run.to_string()]);
    }
    let mut runs = Vec::new();
    for name in names {
        let checkpoints: Vec<&IndexEntry> = idx.entries.iter().filter(|e| e.run == name).collect();
        let verdict = verify_run(store, &name, &checkpoints, opts.key.as_ref())?;
        runs.push(RunAudit { run: name, verdict });
    }
    Ok(AuditReport {
        runs,
        index: IndexAudit {
            entries: idx.entries.len() as u64,
            problem: idx.problem,
        },
    })
}

/// The first index entry without a valid signature, or the index ending before
/// the length the verifier expects.
fn signed_index_problem(entries: &[IndexEntry], opts: &VerifyOptions) -> Option<String> {
    if let Some(key) = &opts.key {
        for e in entries {
            let ok = e
                .sig
                .as_deref()
                .is_some_and(|sig| key.verify_index(&e.hash, sig));
            if !ok {
                let what = if e.sig.is_none() {
                    "is not signed"
                } else {
                    "has a signature the verify key rejects"
                };
                return Some(format!(
                    "entry {} (run {}, {} records) {what}: forged, re-chained, or written without `[audit] signing_key`",
                    e.seq, e.run, e.at_seq
                ));
            }
        }
    }
    let held = entries.last().map(|e| e.seq).unwrap_or(0);
    match opts.expect_at_least {
        Some(n) if held < n => Some(format!(
            "ends at entry {held}, but entry {n} was signed: entries {}..={n} were cut from its end, and the runs they name may be gone",
            held + 1
        )),
        _ => None,
    }
}

fn verify_run(
    store: &Store,
    run: &str,
    checkpoints: &[&IndexEntry],
    key: Option<&VerifyKey>,
) -> Result<Verdict, JournalError> {
    let tampered = |problem, last_good_seq| Verdict::Tampered {
        problem,
        last_good_seq,
    };
    let Some(scan) = store.scan(run)? else {
        let indexed_seq = checkpoints.iter().map(|c| c.at_seq).max().unwrap_or(0);
        return Ok(tampered(Problem::Missing { indexed_seq }, 0));
    };
    let first_bad = scan.bad.first().cloned();
    let records: Vec<&Record> = scan
        .items
        .iter()
        .filter(|(line, _)| first_bad.as_ref().is_none_or(|(b, _)| line < b))
        .map(|(_, r)| r)
        .collect();

    let good = match check_chain(run, &records) {
        Ok(()) => records,
        Err((problem, last_good_seq)) => return Ok(tampered(problem, last_good_seq)),
    };
    let prev = good.last().map(|r| r.hash.as_str()).unwrap_or(GENESIS);
    let last_good = good.len() as u64;
    if let Some((line, message)) = first_bad {
        return Ok(tampered(Problem::Unreadable { line, message }, last_good));
    }

    // The chain against what the index remembers.
    if checkpoints.is_empty() {
        return Ok(tampered(Problem::NotIndexed, last_good));
    }
    if let Some(key) = key {
        if let Some(v) = check_signatures(run, &good, checkpoints, key) {
            return Ok(v);
        }
    }
    // The highest checkpoint that matched: all before it is vouched for by the index.
    let mut vouched = 0;
    for c in checkpoints {
        if c.at_seq == 0 {
            continue;
        }
        match good.get(seq_index(c.at_seq)) {
            None => {
                return Ok(tampered(
                    Problem::Truncated {
                        index_seq: c.at_seq,
                    },
                    last_good,
                ))
            }
            Some(r) if r.hash != c.at_hash => {
                return Ok(tampered(Problem::Rewritten { seq: c.at_seq }, vouched))
            }
            Some(_) => vouched = vouched.max(c.at_seq),
        }
    }
    let latest = checkpoints[checkpoints.len() - 1];
    let closed = latest.event == IndexEvent::Close;
    if closed && last_good > latest.at_seq {
        return Ok(tampered(
            Problem::AfterClose {
                seq: latest.at_seq + 1,
                closed_at: latest.at_seq,
            },
            latest.at_seq,
        ));
    }

    let holder = if closed {
        None
    } else {
        RunLock::holder(store.state_dir(), run)?
    };
    if let Some((line, _)) = scan.torn {
        // A controller mid-append can leave a half-written last line for an instant.
        if holder.is_none() {
            return Ok(tampered(Problem::TornTail { line }, last_good));
        }
    }
    Ok(if closed {
        Verdict::Intact {
            records: last_good,
            final_hash: prev.to_string(),
        }
    } else {
        Verdict::Open {
            records: last_good,
            holder,
        }
    })
}

/// With a verify key: every index entry of the run and every close in the file is
/// signed, and a signed close the file holds is known to the index.
fn check_signatures(
    run: &str,
    good: &[&Record],
    checkpoints: &[&IndexEntry],
    key: &VerifyKey,
) -> Option<Verdict> {
    // The highest checkpoint that is signed and matches the file.
    let mut vouched = 0;
    for c in checkpoints {
        let signed = c
            .sig
            .as_deref()
            .is_some_and(|sig| key.verify_index(&c.hash, sig));
        if !signed {
            return Some(Verdict::Tampered {
                problem: Problem::BadSignature {
                    seq: c.at_seq,
                    index_seq: c.seq,
                },
                last_good_seq: vouched,
            });
        }
        let matches = c.at_seq == 0
            || good
                .get(seq_index(c.at_seq))
                .is_some_and(|r| r.hash == c.at_hash);
        if matches {
            vouched = vouched.max(c.at_seq);
        }
    }
    let mut last_close = None;
    let close = Entry::RunClose(Default::default());
    let close_kind = close.kind();
    for r in good {
        let sig = match r.entry() {
            Ok(Entry::RunClose(c)) => c.sig,
            // A close whose data does not even parse as a close's (a `sig` that is
            // not a string) is a close without a valid signature, not another kind.
            Err(JournalError::BadEntry { source, .. }) if close_kind == source.kind => None,
            _ => continue,
        };
        let ok = sig
            .as_deref()
            .is_some_and(|sig| key.verify_close(run, r.seq, &r.prev, sig));
        if !ok {
            return Some(Verdict::Tampered {
                problem: Problem::CloseUnsigned { seq: r.seq },
                last_good_seq: vouched.min(r.seq - 1),
            });
        }
        last_close = Some(r.seq);
    }
    match last_close {
        Some(seq) if checkpoints.iter().all(|c| c.at_seq < seq) => Some(Verdict::Tampered {
            problem: Problem::CloseLost { seq },
            last_good_seq: vouched,
        }),
        _ => None,
    }
}

/// Walks a run's chain record by record: seq, link, content hash, run id. On the first
/// break, says what it is and the last good seq.
pub(crate) fn check_chain(run: &str, records: &[&Record]) -> Result<(), (Problem, u64)> {
    let mut prev = GENESIS;
    for (i, r) in records.iter().enumerate() {
        let expected = i as u64 + 1;
        let last_good = expected - 1;
        if r.compute_hash() != r.hash {
            return Err((Problem::Edited { seq: r.seq }, last_good));
        }
        if r.run != run {
            return Err((
                Problem::WrongRun {
                    seq: r.seq,
                    found: r.run.clone(),
                },
                last_good,
            ));
        }
        if r.seq != expected {
            let later = records[i + 1..].iter().any(|x| x.seq == expected);
            let problem = if r.seq < expected || later {
                Problem::Reordered {
                    seq: r.seq,
                    expected,
                }
            } else {
                Problem::Deleted { seq: expected }
            };
            return Err((problem, last_good));
        }
        if r.prev != prev {
            return Err((Problem::Unlinked { seq: r.seq }, last_good));
        }
        prev = &r.hash;
    }
    Ok(())
}

/// The position of journal record `seq` (1-based) in a slice of records; a
/// sequence number past what this platform can index finds nothing.
fn seq_index(seq: u64) -> usize {
    usize::try_from(seq)
        .map(|s| s.saturating_sub(1))
        .unwrap_or(usize::MAX)
}
