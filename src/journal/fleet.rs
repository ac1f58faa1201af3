//! The shared state of a rollout run by many processes on the PostgreSQL store
//! (`migrations/0002_workers.sql`): the run's control row (open wave, halt, the
//! one failure budget, the window) and one claim per target host, taken by
//! workers under a lease. It owns these statements and nothing else: which wave
//! opens, when a gate passes and what a host's work is stay with the layers above
//! (`script::fleet`), and the run's records stay in `records`, appended through
//! [`super::Journal`] like any other run's.
//!
//! Every decision that must be the same for every process is one statement or
//! one transaction here: a claim (`FOR UPDATE SKIP LOCKED`, under a `FOR SHARE`
//! lock on the control row, so no claim is granted once a halt has committed),
//! a failure counted with `UPDATE … RETURNING` that halts the run as it crosses
//! `max_failed`, and a lease renewal that fails once another worker took the host.
//! Changes of the control row are announced with `NOTIFY patchbook_run`.
//! The policy's limits a shared run keeps here (`max_unreachable`, the
//! `max_unavailable` counters) are `migrations/0003_fleet_limits.sql`'s, kept by
//! [`claim`] and [`end_claim`].

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::Client;

/// The channel every change of a run's control row is announced on; the payload
/// is the run id.
pub const CHANNEL: &str = "patchbook_run";

/// Where a run shared by workers stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Halted,
    Finished,
}

impl Phase {
    fn parse(s: &str) -> Phase {
        match s {
            "running" => Phase::Running,
            "finished" => Phase::Finished,
            _ => Phase::Halted,
        }
    }
}

/// A run's control row as the coordinator writes it first.
#[derive(Debug, Clone)]
pub struct NewControl {
    pub run: String,
    pub playbook: String,
    pub playbook_sha256: String,
    /// `--param` values as given (secret references unread).
    pub params: BTreeMap<String, String>,
    pub waves: usize,
    /// Failures tolerated: the run halts at failure `max_failed + 1`.
    pub max_failed: usize,
    pub parallel: usize,
    pub window_spec: Option<String>,
}

/// One target host as the coordinator writes it.
#[derive(Debug, Clone)]
pub struct NewClaim {
    pub host: String,
    pub wave: usize,
    pub position: usize,
    pub zone: Option<String>,
}

/// A run's control row as read back.
#[derive(Debug, Clone)]
pub struct Control {
    pub run: String,
    pub playbook: String,
    pub playbook_sha256: String,
    pub params: BTreeMap<String, String>,
    pub waves: usize,
    /// `None` before the first wave opens.
    pub open_wave: Option<usize>,
    pub phase: Phase,
    pub halt_reason: Option<String>,
    pub failed: usize,
    pub max_failed: usize,
    pub unreachable: usize,
    pub parallel: usize,
    pub window_spec: Option<String>,
}

/// Where one claim stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    Pending,
    Claimed,
    Done,
    Failed,
    Unreachable,
}

impl ClaimState {
    fn as_str(self) -> &'static str {
        match self {
            ClaimState::Pending => "pending",
            ClaimState::Claimed => "claimed",
            ClaimState::Done => "done",
            ClaimState::Failed => "failed",
            ClaimState::Unreachable => "unreachable",
        }
    }

    fn parse(s: &str) -> ClaimState {
        match s {
            "claimed" => ClaimState::Claimed,
            "done" => ClaimState::Done,
            "failed" => ClaimState::Failed,
            "unreachable" => ClaimState::Unreachable,
            _ => ClaimState::Pending,
        }
    }
}

/// One claim as read back.
#[derive(Debug, Clone)]
pub struct Claim {
    pub host: String,
    pub wave: usize,
    pub position: usize,
    pub zone: Option<String>,
    pub state: ClaimState,
    pub worker: Option<String>,
    pub attempts: usize,
    pub reason: Option<String>,
    pub started: Option<DateTime<Utc>>,
    pub ended: Option<DateTime<Utc>>,
}

/// What a worker's claim got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// This host is the worker's until its lease runs out; `attempts` counts
    /// this claim (more than 1: another worker had it before).
    Host {
        host: String,
        wave: usize,
        attempts: usize,
    },
    /// Nothing to take now (the open wave is taken or done, or not yet open).
    Nothing,
    /// The run is over: no claim is granted any more.
    Over(Phase),
}

/// The budget after a counted failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub failed: usize,
    pub max_failed: usize,
    /// This failure halted the run (it was failure `max_failed + 1`).
    pub halted_now: bool,
    /// The host's failure had been counted before (by a worker that died).
    pub already: bool,
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn to_usize(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn time(epoch: Option<f64>) -> Option<DateTime<Utc>> {
    epoch.and_then(|s| {
        // Whole microseconds: the database keeps no finer time.
        #[allow(clippy::cast_possible_truncation)] // a timestamp in µs fits an i64
        let micros = (s * 1_000_000.0).round() as i64;
        DateTime::from_timestamp_micros(micros)
    })
}

/// Writes a run's control row and its claims, in one transaction.
pub fn create(
    client: &mut Client,
    control: &NewControl,
    claims: &[NewClaim],
) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    let params = serde_json::to_value(&control.params).unwrap_or_default();
    tx.execute(
        "INSERT INTO run_control (run, playbook, playbook_sha256, params, waves, max_failed, parallel, window_spec)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &control.run,
            &control.playbook,
            &control.playbook_sha256,
            &params,
            &to_i32(control.waves),
            &to_i32(control.max_failed),
            &to_i32(control.parallel.max(1)),
            &control.window_spec,
        ],
    )?;
    let insert = tx.prepare(
        "INSERT INTO host_claims (run, host, wave, position, zone) VALUES ($1, $2, $3, $4, $5)",
    )?;
    for c in claims {
        tx.execute(
            &insert,
            &[
                &control.run,
                &c.host,
                &to_i32(c.wave),
                &to_i32(c.position),
                &c.zone,
            ],
        )?;
    }
    tx.commit()
}

/// The run's control row; `None` when the run is not shared with workers.
pub fn control(client: &mut Client, run: &str) -> Result<Option<Control>, postgres::Error> {
    let row = client.query_opt(
        "SELECT run, playbook, playbook_sha256, params, waves, open_wave, state, halt_reason,
                failed, max_failed, unreachable, parallel, window_spec
         FROM run_control WHERE run = $1",
        &[&run],
    )?;
    Ok(row.map(|r| {
        let params: serde_json::Value = r.get(3);
        let open: i32 = r.get(5);
        let state: String = r.get(6);
        Control {
            run: r.get(0),
            playbook: r.get(1),
            playbook_sha256: r.get(2),
            params: serde_json::from_value(params).unwrap_or_default(),
            waves: to_usize(r.get(4)),
            open_wave: usize::try_from(open).ok(),
            phase: Phase::parse(&state),
            halt_reason: r.get(7),
            failed: to_usize(r.get(8)),
            max_failed: to_usize(r.get(9)),
            unreachable: to_usize(r.get(10)),
            parallel: to_usize(r.get(11)).max(1),
            window_spec: r.get(12),
        }
    }))
}

/// The runs shared with workers that are still running, oldest first.
pub fn running(client: &mut Client) -> Result<Vec<String>, postgres::Error> {
    let rows = client.query(
        "SELECT c.run FROM run_control c JOIN runs r USING (run)
         WHERE c.state = 'running' ORDER BY r.created, c.run",
        &[],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn notify(client: &mut impl postgres::GenericClient, run: &str) -> Result<(), postgres::Error> {
    client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &run])?;
    Ok(())
}

/// Opens `wave` for claims (while the run is running).
pub fn open_wave(client: &mut Client, run: &str, wave: usize) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "UPDATE run_control SET open_wave = $2, updated = now() WHERE run = $1 AND state = 'running'",
        &[&run, &to_i32(wave)],
    )?;
    notify(&mut tx, run)?;
    tx.commit()
}

/// Halts a running run with `reason`; `false` when it was halted or finished
/// already (the first reason stays).
pub fn halt(client: &mut Client, run: &str, reason: &str) -> Result<bool, postgres::Error> {
    let mut tx = client.transaction()?;
    let n = tx.execute(
        "UPDATE run_control SET state = 'halted', halt_reason = $2, updated = now()
         WHERE run = $1 AND state = 'running'",
        &[&run, &reason],
    )?;
    notify(&mut tx, run)?;
    tx.commit()?;
    Ok(n == 1)
}

/// Marks a running run finished: every wave is done.
pub fn finish(client: &mut Client, run: &str) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "UPDATE run_control SET state = 'finished', updated = now() WHERE run = $1 AND state = 'running'",
        &[&run],
    )?;
    notify(&mut tx, run)?;
    tx.commit()
}

/// Extends `worker`'s lease on `host`; `false` when the host is no longer the
/// worker's (its lease ran out and another worker took it, or it ended).
pub fn renew(
    client: &mut Client,
    run: &str,
    host: &str,
    worker: &str,
    lease: Duration,
) -> Result<bool, postgres::Error> {
    let n = client.execute(
        "UPDATE host_claims SET lease_until = now() + make_interval(secs => $4)
         WHERE run = $1 AND host = $2 AND worker = $3 AND state = 'claimed'",
        &[&run, &host, &worker, &seconds(lease)],
    )?;
    Ok(n == 1)
}

/// The one statement that counts a host against one of the run's budgets:
/// `counter` goes up by one and, if that takes it past `limit`, a running run
/// halts with `reason`, all in one row update, so two workers counting at once
/// get one count each and exactly one of them halts the run. It returns the
/// counter, the limit and then `more` (columns of `run_control`, or nothing).
/// The names are this module's own constants, never input.
fn count_one_more(counter: &str, limit: &str, reason: &str, more: &str) -> String {
    let more = if more.is_empty() {
        String::new()
    } else {
        format!(", {more}")
    };
    format!(
        "UPDATE run_control SET
             {counter} = {counter} + 1,
             halt_reason = CASE WHEN state = 'running' AND {counter} + 1 > {limit}
                                THEN '{reason}' ELSE halt_reason END,
             state = CASE WHEN state = 'running' AND {counter} + 1 > {limit}
                          THEN 'halted' ELSE state END,
             updated = now()
         WHERE run = $1
         RETURNING {counter}, {limit}{more}"
    )
}

/// Counts `host`'s failure against the run's one budget, once per host. The
/// `UPDATE … RETURNING` that counts it also halts the run when this is failure
/// `max_failed + 1`, in the same transaction as the host's mark, so two workers
/// failing at once get two different counts and exactly one of them halts.
pub fn count_failure(
    client: &mut Client,
    run: &str,
    host: &str,
) -> Result<Counted, postgres::Error> {
    let mut tx = client.transaction()?;
    let first = tx.execute(
        "UPDATE host_claims SET counted = true WHERE run = $1 AND host = $2 AND NOT counted",
        &[&run, &host],
    )? == 1;
    let row = if first {
        tx.query_one(
            &count_one_more("failed", "max_failed", "budget", "state, halt_reason"),
            &[&run],
        )?
    } else {
        tx.query_one(
            "SELECT failed, max_failed, state, halt_reason FROM run_control WHERE run = $1",
            &[&run],
        )?
    };
    let failed = to_usize(row.get(0));
    let max_failed = to_usize(row.get(1));
    let halted_now = first && failed == max_failed + 1;
    if halted_now {
        notify(&mut tx, run)?;
    }
    tx.commit()?;
    Ok(Counted {
        failed,
        max_failed,
        halted_now,
        already: !first,
    })
}

/// Every claim of a run, in wave and run order.
pub fn claims(client: &mut Client, run: &str) -> Result<Vec<Claim>, postgres::Error> {
    let rows = client.query(
        "SELECT host, wave, position, zone, state, worker, attempts, reason,
                extract(epoch FROM started)::float8, extract(epoch FROM ended)::float8
         FROM host_claims WHERE run = $1 ORDER BY wave, position",
        &[&run],
    )?;
    Ok(rows
        .iter()
        .map(|r| Claim {
            host: r.get(0),
            wave: to_usize(r.get(1)),
            position: to_usize(r.get(2)),
            zone: r.get(3),
            state: ClaimState::parse(r.get::<_, &str>(4)),
            worker: r.get(5),
            attempts: to_usize(r.get(6)),
            reason: r.get(7),
            started: time(r.get(8)),
            ended: time(r.get(9)),
        })
        .collect())
}

/// Whether every host of `wave` has ended (none pending or claimed). An index
/// probe, not a count: the coordinator asks after every notice, and counting a
/// 100,000-host wave each time cost the server more than the hosts did.
pub fn wave_over(client: &mut Client, run: &str, wave: usize) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT (SELECT position FROM host_claims
                 WHERE run = $1 AND wave = $2 AND state = 'pending'
                 ORDER BY position LIMIT 1) IS NULL
            AND (SELECT position FROM host_claims
                 WHERE run = $1 AND wave = $2 AND state = 'claimed'
                 ORDER BY position LIMIT 1) IS NULL",
        &[&run, &to_i32(wave)],
    )?;
    Ok(row.get(0))
}

/// Hosts claimed (in flight) anywhere in the run.
pub fn in_flight(client: &mut Client, run: &str) -> Result<usize, postgres::Error> {
    let row = client.query_one(
        "SELECT count(*)::int4 FROM host_claims WHERE run = $1 AND state = 'claimed'",
        &[&run],
    )?;
    Ok(to_usize(row.get(0)))
}

/// Subscribes this connection to [`CHANNEL`].
pub fn listen(client: &mut Client) -> Result<(), postgres::Error> {
    client.batch_execute("LISTEN patchbook_run")
}

/// Waits up to `timeout` for a notice on [`CHANNEL`] (after [`listen`]);
/// `true` when one came. Pending notices are all taken.
pub fn wait_notice(client: &mut Client, timeout: Duration) -> Result<bool, postgres::Error> {
    let mut got = false;
    let mut notices = client.notifications();
    let mut it = notices.timeout_iter(timeout);
    if let Some(n) = postgres::fallible_iterator::FallibleIterator::next(&mut it)? {
        got = n.channel() == CHANNEL;
    }
    drop(it);
    // Whatever else arrived meanwhile says the same: look again.
    let mut rest = notices.iter();
    while postgres::fallible_iterator::FallibleIterator::next(&mut rest)?.is_some() {
        got = true;
    }
    Ok(got)
}

/// The policy's limits for a shared run, as the coordinator writes them.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Unreachable hosts tolerated: the run halts at `max_unreachable + 1`.
    pub max_unreachable: usize,
    /// `max_unavailable`: (group, cap, the run's hosts in that group).
    pub caps: Vec<(String, usize, Vec<String>)>,
}

/// Writes a run's limits (after [`create`], before the first wave opens). Safe
/// to repeat (a restarted coordinator): counters already there keep their count.
pub fn set_limits(client: &mut Client, run: &str, limits: &Limits) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "UPDATE run_control SET max_unreachable = $2 WHERE run = $1",
        &[&run, &to_i32(limits.max_unreachable)],
    )?;
    for (group, cap, hosts) in &limits.caps {
        tx.execute(
            "INSERT INTO run_unavailable (run, grp, cap) VALUES ($1, $2, $3)
             ON CONFLICT (run, grp) DO UPDATE SET cap = excluded.cap",
            &[&run, group, &to_i32(*cap)],
        )?;
        tx.execute(
            "UPDATE host_claims SET capped_groups = array_append(capped_groups, $2)
             WHERE run = $1 AND host = ANY($3) AND NOT ($2 = ANY(capped_groups))",
            &[&run, group, hosts],
        )?;
    }
    tx.commit()
}

/// A run's unreachable count and limit (`None`: the run has none).
pub fn unreachable_limit(
    client: &mut Client,
    run: &str,
) -> Result<(usize, Option<usize>), postgres::Error> {
    let row = client.query_one(
        "SELECT unreachable, max_unreachable FROM run_control WHERE run = $1",
        &[&run],
    )?;
    Ok((
        to_usize(row.get(0)),
        row.get::<_, Option<i32>>(1).map(to_usize),
    ))
}

/// Each capped group's (cap, hosts in flight) now, by group.
pub fn unavailable(
    client: &mut Client,
    run: &str,
) -> Result<BTreeMap<String, (usize, usize)>, postgres::Error> {
    let rows = client.query(
        "SELECT grp, cap, in_flight FROM run_unavailable WHERE run = $1",
        &[&run],
    )?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (to_usize(r.get(1)), to_usize(r.get(2)))))
        .collect())
}

/// Takes the next host of the open wave for `worker`: a pending one, or one whose
/// lease ran out (its worker died). With `zone`, hosts of that zone or of none;
/// without, hosts of no zone only. The control row is read `FOR SHARE`, so a
/// halt that commits before this claim is seen, and one that comes after waits
/// for it: a host is either claimed before the halt (in flight) or not at all.
///
/// Once the run is halted, no pending host is taken, but a host whose worker died
/// in flight still is, in whichever wave, once its lease runs out: it finishes
/// (or is rolled back) as the other hosts in flight at the halt do, and the
/// coordinator, which waits for every host in flight, is not left waiting on a
/// dead worker. [`Claimed::Over`] comes only when no host is in flight.
///
/// The run's `max_unavailable` caps: a pending host is taken
/// only if every capped group it is in has room, and taking it raises those
/// groups' counts in the same transaction (`UPDATE … RETURNING`, whose
/// `in_flight < cap` is checked again on the row it locks, so two workers racing
/// for a group's last place get one place between them). A host whose lease ran
/// out keeps the place its dead worker took. Nothing is taken when the open
/// wave's hosts that are left all wait for a place; the end of a claim frees one
/// and notifies.
pub fn claim(
    client: &mut Client,
    run: &str,
    worker: &str,
    zone: Option<&str>,
    lease: Duration,
) -> Result<Claimed, postgres::Error> {
    let mut tx = client.transaction()?;
    let row = tx.query_opt(
        "SELECT state, open_wave FROM run_control WHERE run = $1 FOR SHARE",
        &[&run],
    )?;
    let Some(row) = row else {
        return Ok(Claimed::Over(Phase::Finished));
    };
    let phase = Phase::parse(row.get::<_, &str>(0));
    if phase == Phase::Halted {
        return take_over_after_halt(tx, run, worker, zone, lease);
    }
    if phase != Phase::Running {
        return Ok(Claimed::Over(phase));
    }
    let open: i32 = row.get(1);
    if open < 0 {
        return Ok(Claimed::Nothing);
    }
    // Two probes that each walk the (run, wave, state, position) index in order,
    // a host whose lease ran out first (a dead worker's host waits least), then
    // the next pending one. One probe with `state = 'pending' OR …` could not use
    // the index's order: it scanned and sorted the whole wave for every claim,
    // 50 ms a claim at 100,000 hosts.
    let mut found = tx.query_opt(
        "SELECT c.host, c.state, c.capped_groups FROM host_claims c
         WHERE c.run = $1 AND c.wave = $2 AND c.state = 'claimed' AND c.lease_until < now()
           AND (c.zone IS NULL OR c.zone = $3)
         ORDER BY c.position
         LIMIT 1
         FOR UPDATE OF c SKIP LOCKED",
        &[&run, &open, &zone],
    )?;
    if found.is_none() {
        found = tx.query_opt(
            "SELECT c.host, c.state, c.capped_groups FROM host_claims c
             WHERE c.run = $1 AND c.wave = $2 AND c.state = 'pending'
               AND (c.zone IS NULL OR c.zone = $3)
               AND NOT EXISTS (
                    SELECT 1 FROM run_unavailable u
                    WHERE u.run = c.run AND u.grp = ANY(c.capped_groups)
                      AND u.in_flight >= u.cap)
             ORDER BY c.position
             LIMIT 1
             FOR UPDATE OF c SKIP LOCKED",
            &[&run, &open, &zone],
        )?;
    }
    let Some(found) = found else {
        return Ok(Claimed::Nothing);
    };
    let host: String = found.get(0);
    let state: String = found.get(1);
    let groups: Vec<String> = found.get(2);
    if state == "pending" && !groups.is_empty() {
        let raised = tx
            .query(
                "UPDATE run_unavailable SET in_flight = in_flight + 1
                 WHERE run = $1 AND grp = ANY($2) AND in_flight < cap
                 RETURNING grp",
                &[&run, &groups],
            )?
            .len();
        if raised < groups.len() {
            // Another worker took a group's last place meanwhile.
            tx.rollback()?;
            return Ok(Claimed::Nothing);
        }
    }
    let attempts = lease_to(&mut tx, run, &host, worker, lease)?;
    tx.commit()?;
    Ok(Claimed::Host {
        host,
        wave: to_usize(open),
        attempts,
    })
}

/// Gives `host` to `worker` under a fresh lease, one attempt more: a pending
/// host or one taken over from a worker whose lease ran out (that one is
/// claimed and started already, which the statement leaves as they are).
fn lease_to(
    tx: &mut postgres::Transaction<'_>,
    run: &str,
    host: &str,
    worker: &str,
    lease: Duration,
) -> Result<usize, postgres::Error> {
    let row = tx.query_one(
        "UPDATE host_claims
         SET state = 'claimed', worker = $3, lease_until = now() + make_interval(secs => $4),
             attempts = attempts + 1, started = coalesce(started, now())
         WHERE run = $1 AND host = $2
         RETURNING attempts",
        &[&run, &host, &worker, &seconds(lease)],
    )?;
    Ok(to_usize(row.get(0)))
}

/// [`claim`] on a halted run: a host in flight whose lease ran out (its worker
/// died), any wave, or `Over` once no host is in flight at all.
fn take_over_after_halt(
    mut tx: postgres::Transaction<'_>,
    run: &str,
    worker: &str,
    zone: Option<&str>,
    lease: Duration,
) -> Result<Claimed, postgres::Error> {
    let found = tx.query_opt(
        "SELECT host, wave FROM host_claims
         WHERE run = $1 AND state = 'claimed' AND lease_until < now()
           AND (zone IS NULL OR zone = $2)
         ORDER BY wave, position
         LIMIT 1
         FOR UPDATE SKIP LOCKED",
        &[&run, &zone],
    )?;
    let Some(found) = found else {
        let left = tx.query_one(
            "SELECT EXISTS (SELECT 1 FROM host_claims WHERE run = $1 AND state = 'claimed')",
            &[&run],
        )?;
        return Ok(if left.get::<_, bool>(0) {
            Claimed::Nothing
        } else {
            Claimed::Over(Phase::Halted)
        });
    };
    let host: String = found.get(0);
    let wave: i32 = found.get(1);
    let attempts = lease_to(&mut tx, run, &host, worker, lease)?;
    tx.commit()?;
    Ok(Claimed::Host {
        host,
        wave: to_usize(wave),
        attempts,
    })
}

/// What ending a claim with [`end_claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The host was still the worker's (its claim is ended now).
    pub mine: bool,
    /// An unreachable end: the run's unreachable count after it.
    pub unreachable: usize,
    /// This unreachable host halted the run (it was `max_unreachable + 1`).
    pub halted_now: bool,
}

/// Ends `worker`'s claim on `host` as `state` (done, failed, unreachable)
/// (`mine: false` when the host was no longer the worker's), and in the same
/// transaction: the host's place under its groups' `max_unavailable` caps is
/// given back, and an unreachable host is counted
/// against `max_unreachable` by one `UPDATE … RETURNING` that halts the run as
/// it crosses the limit (as [`count_failure`] does for failures).
pub fn end_claim(
    client: &mut Client,
    run: &str,
    host: &str,
    worker: &str,
    state: ClaimState,
    reason: Option<&str>,
) -> Result<Ended, postgres::Error> {
    let mut tx = client.transaction()?;
    let row = tx.query_opt(
        "UPDATE host_claims SET state = $4, reason = $5, ended = now(), lease_until = NULL
         WHERE run = $1 AND host = $2 AND worker = $3 AND state = 'claimed'
         RETURNING capped_groups, wave",
        &[&run, &host, &worker, &state.as_str(), &reason],
    )?;
    let mut ended = Ended {
        mine: row.is_some(),
        unreachable: 0,
        halted_now: false,
    };
    if let Some(row) = row {
        let groups: Vec<String> = row.get(0);
        if !groups.is_empty() {
            tx.execute(
                "UPDATE run_unavailable SET in_flight = greatest(in_flight - 1, 0)
                 WHERE run = $1 AND grp = ANY($2)",
                &[&run, &groups],
            )?;
        }
        if state == ClaimState::Unreachable {
            let r = tx.query_one(
                &count_one_more("unreachable", "max_unreachable", "unreachable", ""),
                &[&run],
            )?;
            ended.unreachable = to_usize(r.get(0));
            ended.halted_now = r
                .get::<_, Option<i32>>(1)
                .is_some_and(|m| ended.unreachable == to_usize(m) + 1);
        }
        // A notice only when someone has something to act on: a capped group's
        // place is free again (workers wait for it), or the host's wave has
        // nothing pending or claimed left, or the run is no longer running (the
        // coordinator). A notice per host woke every listening connection of
        // every worker for each host. Two hosts ending last at once may both miss
        // it; the coordinator's poll (`POLL`) sees the wave done instead. Index
        // probes by value: the snapshot still sees this host claimed, so it is
        // left out by name.
        let wave: i32 = row.get(1);
        let tell = !groups.is_empty()
            || tx
                .query_one(
                    "SELECT (SELECT position FROM host_claims
                             WHERE run = $1 AND wave = $2 AND state = 'pending'
                             ORDER BY position LIMIT 1) IS NULL
                        AND (SELECT position FROM host_claims
                             WHERE run = $1 AND wave = $2 AND state = 'claimed' AND host <> $3
                             ORDER BY position LIMIT 1) IS NULL
                        OR EXISTS (SELECT 1 FROM run_control
                                   WHERE run = $1 AND state <> 'running')",
                    &[&run, &wave, &host],
                )?
                .get::<_, bool>(0);
        if tell {
            notify(&mut tx, run)?;
        }
    }
    tx.commit()?;
    Ok(ended)
}
