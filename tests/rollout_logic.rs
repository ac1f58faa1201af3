//! The rollout engine's rules, run through the real executor and its worker pool
//! with simulated per-host work (no hosts are contacted here; the lab tests drive
//! the same executor over SSH).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use patchbook::inventory::{Criticality, Group, Host, Inventory};
use patchbook::rollout::{
    Clock, Executor, HostOutcome, HostStatus, Plan, Policy, RollbackCause, RolloutError,
    RolloutEvent, StopReason, Summary, Target, Window,
};
use proptest::prelude::*;
use serde_json::{json, Value};

fn host(name: &str, groups: &[&str], c: Criticality) -> Host {
    let mut h = Host::new(name);
    h.groups = groups.iter().map(|g| g.to_string()).collect();
    h.criticality = c;
    h
}

fn plain_targets(n: usize) -> Vec<Target> {
    (0..n)
        .map(|i| Target::new(host(&format!("h{i}"), &[], Criticality::Low), vec![]))
        .collect()
}

fn policy(v: Value) -> Policy {
    Policy::from_value(&v).expect("valid policy")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Every event of a run, in emission order.
#[derive(Default)]
struct Log(Mutex<Vec<RolloutEvent>>);

impl Log {
    fn events(&self) -> Vec<RolloutEvent> {
        self.0.lock().unwrap().clone()
    }
}

fn observe(log: &Log) -> impl Fn(DateTime<Utc>, &RolloutEvent) + '_ {
    move |_, e| log.0.lock().unwrap().push(e.clone())
}

/// Real start and end instants per host, recorded inside the work itself.
#[derive(Default)]
struct Spans(Mutex<BTreeMap<String, (Instant, Instant)>>);

impl Spans {
    fn record(&self, name: &str, work: impl FnOnce()) {
        let s = Instant::now();
        work();
        self.0
            .lock()
            .unwrap()
            .insert(name.to_string(), (s, Instant::now()));
    }
    fn get(&self, name: &str) -> (Instant, Instant) {
        self.0.lock().unwrap()[name]
    }
}

// ---------------------------------------------------------------- failure budget

/// Runs `n` hosts of which `failing` fail and checks the documented boundary.
fn check_budget(
    n: usize,
    max_failed: Value,
    parallel: usize,
    failing: &BTreeSet<usize>,
    waves: Value,
) {
    let expected_allowed = match &max_failed {
        Value::String(s) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap();
            pct * n / 100
        }
        v => usize::try_from(v.as_u64().unwrap()).unwrap(),
    };
    let p = policy(json!({ "max_failed": max_failed, "parallel": parallel, "waves": waves }));
    let plan = Plan::build(plain_targets(n), &p, 99).unwrap();
    let log = Log::default();
    let rolled = Mutex::new(Vec::new());
    let summary = Executor::new(&plan)
        .clock(Clock::manual(at("2026-11-28T03:00:00+08:00")))
        .observer(observe(&log))
        .run(
            |h, _| {
                std::thread::yield_now();
                let i: usize = h.name[1..].parse().unwrap();
                if failing.contains(&i) {
                    HostOutcome::failed("simulated failure")
                } else {
                    HostOutcome::Done
                }
            },
            |h, ctx| {
                assert_eq!(ctx.cause, RollbackCause::HostFailed);
                rolled.lock().unwrap().push(h.name.clone());
                Ok(())
            },
        )
        .unwrap();
    let ctx = format!(
        "n={n} parallel={parallel} failing={} allowed={expected_allowed}",
        failing.len()
    );
    assert_eq!(summary.allowed_failures, expected_allowed, "{ctx}");
    let t = &summary.totals;
    assert_eq!(t.targeted, n, "{ctx}");
    assert_eq!(t.done + t.failed + t.reverted + t.pending, n, "{ctx}");
    assert_eq!(
        rolled.lock().unwrap().len(),
        t.failed,
        "every failed host is rolled back: {ctx}"
    );
    assert_eq!(t.rolled_back, t.failed, "{ctx}");

    let events = log.events();
    let exhausted_at = events
        .iter()
        .position(|e| matches!(e, RolloutEvent::BudgetExhausted { .. }));
    if failing.len() <= expected_allowed {
        assert_eq!(summary.stop, StopReason::Completed, "{ctx}");
        assert!(exhausted_at.is_none(), "{ctx}");
        assert_eq!(t.failed, failing.len(), "{ctx}");
        assert_eq!(t.done, n - failing.len(), "{ctx}");
        assert_eq!(t.pending, 0, "{ctx}");
        return;
    }
    let stop_at = expected_allowed + 1;
    assert_eq!(
        summary.stop,
        StopReason::BudgetExhausted {
            failures: stop_at,
            allowed: expected_allowed
        },
        "{ctx}"
    );
    let exhausted_at = exhausted_at.expect("a BudgetExhausted event");
    let failed_before = events[..exhausted_at]
        .iter()
        .filter(|e| matches!(e, RolloutEvent::HostFailed { .. }))
        .count();
    assert_eq!(
        failed_before, stop_at,
        "the run stops exactly at failure allowed+1: {ctx}"
    );
    assert!(
        !events[exhausted_at..].iter().any(|e| matches!(
            e,
            RolloutEvent::HostStarted { .. } | RolloutEvent::WaveStarted { .. }
        )),
        "no host starts after the budget is spent: {ctx}"
    );
    let exhausted_events = events
        .iter()
        .filter(|e| matches!(e, RolloutEvent::BudgetExhausted { .. }))
        .count();
    assert_eq!(exhausted_events, 1, "{ctx}");
    assert!(t.failed >= stop_at, "{ctx}");
    assert!(
        t.failed - stop_at < parallel,
        "overshoot {} exceeds parallelism - 1: {ctx}",
        t.failed - stop_at
    );
    if parallel == 1 {
        // Sequential: everything after the stopping host is pending.
        let stopping_host = *failing.iter().nth(expected_allowed).unwrap();
        assert_eq!(t.failed, stop_at, "{ctx}");
        assert_eq!(t.pending, n - stopping_host - 1, "{ctx}");
    }
}

#[test]
fn budget_boundary_exhaustive_for_small_fleets() {
    for n in 1..=9usize {
        let mut budgets: Vec<Value> = (0..=100)
            .step_by(10)
            .map(|p| json!(format!("{p}%")))
            .collect();
        budgets.extend([json!(0), json!(1), json!(2), json!(n)]);
        for max_failed in budgets {
            for parallel in 1..=n {
                let all: Vec<usize> = (0..n).collect();
                let patterns: Vec<BTreeSet<usize>> = vec![
                    BTreeSet::new(),
                    all.iter().copied().collect(),
                    all.iter().copied().filter(|i| i % 2 == 1).collect(),
                    all.iter().copied().rev().take(2).collect(),
                    all.iter().copied().take(3).collect(),
                ];
                for failing in &patterns {
                    check_budget(n, max_failed.clone(), parallel, failing, json!(["100%"]));
                    check_budget(n, max_failed.clone(), parallel, failing, json!([1, "50%"]));
                }
            }
        }
    }
}

fn budget_case() -> impl Strategy<Value = (usize, u32, usize, BTreeSet<usize>, bool)> {
    (1usize..=500, 0u32..=100, 0.0f64..0.3, any::<bool>()).prop_flat_map(|(n, pct, rate, waves)| {
        (
            Just(n),
            Just(pct),
            1usize..=n,
            proptest::collection::vec(proptest::bool::weighted(rate), n),
            Just(waves),
        )
            .prop_map(|(n, pct, parallel, fail, waves)| {
                let failing = fail
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| **f)
                    .map(|(i, _)| i)
                    .collect();
                (n, pct, parallel, failing, waves)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn budget_boundary_holds_for_large_fleets((n, pct, parallel, failing, waves) in budget_case()) {
        let waves = if waves { json!(["10%", "50%", "100%"]) } else { json!(["100%"]) };
        check_budget(n, json!(format!("{pct}%")), parallel, &failing, waves);
    }
}

#[test]
fn three_failures_with_max_failed_two_stop_and_count_per_group() {
    let groups = ["web", "db", "cache"];
    let targets: Vec<Target> = (0..30)
        .map(|i| {
            Target::new(
                host(&format!("h{i:02}"), &[groups[i % 3]], Criticality::Low),
                vec![],
            )
        })
        .collect();
    let plan = Plan::build(
        targets,
        &policy(json!({"max_failed": 2, "parallel": 1, "waves": ["20%", "100%"]})),
        10,
    )
    .unwrap();
    let failing = ["h04", "h08", "h12", "h20"];
    let summary = Executor::new(&plan)
        .run(
            |h, _| {
                if failing.contains(&h.name.as_str()) {
                    HostOutcome::failed("dpkg exited 1")
                } else {
                    HostOutcome::Done
                }
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(
        summary.stop,
        StopReason::BudgetExhausted {
            failures: 3,
            allowed: 2
        }
    );
    let t = &summary.totals;
    assert_eq!((t.done, t.failed, t.rolled_back, t.pending), (10, 3, 3, 17));
    // h04 is in db, h08 in cache, h12 in web; h20 is never reached.
    assert_eq!(summary.per_group["db"].failed, 1);
    assert_eq!(summary.per_group["cache"].failed, 1);
    assert_eq!(summary.per_group["web"].failed, 1);
    let web = &summary.per_group["web"];
    assert_eq!((web.targeted, web.done, web.pending), (10, 4, 5));
    assert_eq!(summary.pending_hosts().first(), Some(&"h13"));
    let h12 = summary.hosts.iter().find(|h| h.name == "h12").unwrap();
    assert_eq!(h12.reason.as_deref(), Some("dpkg exited 1"));
    assert!(h12.rolled_back);
}

// ---------------------------------------------------------------- unreachable hosts

#[test]
fn unreachable_hosts_have_their_own_budget_and_are_never_rolled_back() {
    let plan = Plan::build(
        plain_targets(10),
        &policy(json!({"max_failed": 5, "max_unreachable": 2, "parallel": 1})),
        10,
    )
    .unwrap();
    let dead = ["h2", "h5", "h7"];
    let rolled_back = Mutex::new(Vec::new());
    let log = Log::default();
    let summary = Executor::new(&plan)
        .observer(observe(&log))
        .run(
            |h, _| {
                if dead.contains(&h.name.as_str()) {
                    HostOutcome::Unreachable {
                        reason: format!("{}: connection refused", h.name),
                    }
                } else {
                    HostOutcome::Done
                }
            },
            |h, _| {
                rolled_back.lock().unwrap().push(h.name.clone());
                Ok(())
            },
        )
        .unwrap();
    // The third unreachable host spends the budget of two; the failure budget
    // (five) is untouched.
    assert_eq!(
        summary.stop,
        StopReason::UnreachableBudgetExhausted {
            unreachable: 3,
            allowed: 2
        }
    );
    let t = &summary.totals;
    assert_eq!((t.done, t.failed, t.unreachable, t.pending), (5, 0, 3, 2));
    assert_eq!(summary.allowed_failures, 5);
    assert_eq!(summary.allowed_unreachable, 2);
    assert!(rolled_back.lock().unwrap().is_empty());
    assert!(summary
        .hosts
        .iter()
        .filter(|h| dead.contains(&h.name.as_str()))
        .all(|h| h.state == HostStatus::Unreachable && !h.rolled_back));
    assert!(log
        .events()
        .iter()
        .any(|e| matches!(e, RolloutEvent::UnreachableBudgetExhausted { .. })));
}

#[test]
fn hosts_a_probe_left_out_count_from_the_start_and_default_to_the_failure_budget() {
    let plan = Plan::build(plain_targets(4), &policy(json!({"max_failed": 1})), 10).unwrap();
    let probed = |names: &[&str]| -> Vec<(Host, String)> {
        names
            .iter()
            .map(|n| (host(n, &["web"], Criticality::Low), "refused".to_string()))
            .collect()
    };
    let started = AtomicUsize::new(0);
    let work = |_: &Host, _: &patchbook::rollout::HostContext| {
        started.fetch_add(1, Ordering::SeqCst);
        HostOutcome::Done
    };
    // One left out, one allowed (max_failed): the rollout goes on and reports it.
    let summary = Executor::new(&plan)
        .unreachable_before(probed(&["gone1"]))
        .run(work, |_, _| Ok(()))
        .unwrap();
    assert_eq!(summary.stop, StopReason::Completed);
    assert_eq!(summary.totals.targeted, 5);
    assert_eq!(summary.totals.unreachable, 1);
    assert_eq!(summary.per_group["web"].unreachable, 1);
    assert_eq!(started.load(Ordering::SeqCst), 4);
    // Two left out: the budget is spent before any wave; nothing starts.
    started.store(0, Ordering::SeqCst);
    let summary = Executor::new(&plan)
        .unreachable_before(probed(&["gone1", "gone2"]))
        .run(work, |_, _| Ok(()))
        .unwrap();
    assert_eq!(
        summary.stop,
        StopReason::UnreachableBudgetExhausted {
            unreachable: 2,
            allowed: 1
        }
    );
    assert_eq!(started.load(Ordering::SeqCst), 0);
    assert_eq!(summary.totals.pending, 4);
}

// ---------------------------------------------------------------- pilot, gate, pause

#[test]
fn failing_pilot_stops_before_wave_one() {
    let plan = Plan::build(
        plain_targets(10),
        &policy(json!({"pilot": ["h3", "h7"], "waves": ["50%", "100%"], "max_failed": 5, "parallel": 4})),
        4,
    )
    .unwrap();
    assert_eq!(plan.waves.len(), 3);
    let log = Log::default();
    let summary = Executor::new(&plan)
        .observer(observe(&log))
        .run(
            |h, _| {
                if h.name == "h7" {
                    HostOutcome::failed("health check failed")
                } else {
                    HostOutcome::Done
                }
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(summary.stop, StopReason::PilotFailed { host: "h7".into() });
    let waves: Vec<usize> = log
        .events()
        .iter()
        .filter_map(|e| match e {
            RolloutEvent::WaveStarted { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(waves, vec![0], "only the pilot started");
    assert_eq!(summary.totals.pending, 8);
    assert_eq!(summary.totals.failed, 1);
    assert!(summary
        .hosts
        .iter()
        .filter(|h| h.wave > 0)
        .all(|h| h.state == HostStatus::Pending));
}

#[test]
fn gate_false_or_error_stops_and_pause_uses_the_clock() {
    let start = at("2026-11-28T03:00:00+08:00");
    for verdict in [Ok(false), Err("http_check: 503".to_string())] {
        let plan = Plan::build(
            plain_targets(4),
            &policy(json!({"waves": [1], "pause": "2m", "parallel": 2})),
            2,
        )
        .unwrap();
        let clock = Clock::manual(start);
        let calls = AtomicUsize::new(0);
        let real = Instant::now();
        let summary = Executor::new(&plan)
            .clock(clock.clone())
            .gate(|ctx| {
                // The first gate (after wave 1) lets wave 2 through; the second stops.
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    assert_eq!((ctx.finished_wave, ctx.next_wave), (1, 2));
                    Ok(true)
                } else {
                    verdict.clone()
                }
            })
            .run(|_, _| HostOutcome::Done, |_, _| Ok(()))
            .unwrap();
        assert!(
            matches!(summary.stop, StopReason::GateStopped { after_wave: 2, .. }),
            "{:?}",
            summary.stop
        );
        assert_eq!(summary.totals.done, 2);
        assert_eq!(summary.totals.pending, 2);
        assert_eq!(
            clock.now() - start,
            chrono::Duration::minutes(4),
            "two pauses of 2m on the clock"
        );
        assert!(
            real.elapsed() < Duration::from_secs(5),
            "pauses did not sleep for real"
        );
    }
}

// ---------------------------------------------------------------- rollback order

#[test]
fn rollback_all_goes_in_reverse_completion_order() {
    let plan = Plan::build(
        plain_targets(6),
        &policy(json!({"rollback": "all", "parallel": 1, "waves": [2, "100%"]})),
        1,
    )
    .unwrap();
    let calls = Mutex::new(Vec::new());
    let summary = Executor::new(&plan)
        .run(
            |h, _| {
                if h.name == "h4" {
                    HostOutcome::failed("verify: 1.0.0 installed, 1.0.1 wanted")
                } else {
                    HostOutcome::Done
                }
            },
            |h, ctx| {
                calls.lock().unwrap().push((h.name.clone(), ctx.cause));
                Ok(())
            },
        )
        .unwrap();
    let calls = calls.into_inner().unwrap();
    let order: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, vec!["h4", "h3", "h2", "h1", "h0"]);
    assert_eq!(calls[0].1, RollbackCause::HostFailed);
    assert!(calls[1..]
        .iter()
        .all(|(_, c)| *c == RollbackCause::RunStopped));
    assert_eq!(summary.rollback_order, order);
    let t = &summary.totals;
    assert_eq!(
        (t.done, t.failed, t.reverted, t.rolled_back, t.pending),
        (0, 1, 4, 5, 1)
    );

    // With parallel work the order is still the reverse of completion.
    let plan = Plan::build(
        plain_targets(40),
        &policy(json!({"rollback": "all", "parallel": 8})),
        8,
    )
    .unwrap();
    let undone = Mutex::new(Vec::new());
    let summary = Executor::new(&plan)
        .run(
            |h, _| {
                let i: u64 = h.name[1..].parse().unwrap();
                std::thread::sleep(Duration::from_millis((i * 7) % 5));
                if h.name == "h30" {
                    HostOutcome::failed("boom")
                } else {
                    HostOutcome::Done
                }
            },
            |h, ctx| {
                if ctx.cause == RollbackCause::RunStopped {
                    undone.lock().unwrap().push(h.name.clone());
                }
                Ok(())
            },
        )
        .unwrap();
    let mut expected = summary.completion_order.clone();
    expected.reverse();
    assert!(!expected.is_empty());
    assert_eq!(undone.into_inner().unwrap(), expected);
}

// ---------------------------------------------------------------- deadlines

#[test]
fn a_host_past_its_deadline_fails_and_is_rolled_back() {
    let plan = Plan::build(
        plain_targets(3),
        &policy(json!({"timeout": "15m", "max_failed": 1, "parallel": 1})),
        1,
    )
    .unwrap();
    let clock = Clock::manual(at("2026-11-28T03:00:00+08:00"));
    let rolled = Mutex::new(Vec::new());
    let summary = Executor::new(&plan)
        .clock(clock.clone())
        .run(
            |h, ctx| {
                assert_eq!(
                    ctx.remaining(),
                    Some(Duration::from_secs(900)),
                    "the deadline reaches the work"
                );
                if h.name == "h1" {
                    ctx.clock.advance(Duration::from_secs(16 * 60));
                    assert!(ctx.expired());
                }
                HostOutcome::Done
            },
            |h, _| {
                rolled.lock().unwrap().push(h.name.clone());
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(summary.stop, StopReason::Completed);
    let h1 = summary.hosts.iter().find(|h| h.name == "h1").unwrap();
    assert_eq!(h1.state, HostStatus::Failed);
    assert!(
        h1.reason
            .as_deref()
            .unwrap()
            .contains("exceeded its 15m deadline (took 16m)"),
        "{:?}",
        h1.reason
    );
    assert_eq!(rolled.into_inner().unwrap(), vec!["h1"]);
    assert_eq!(summary.totals.done, 2);
}

// ---------------------------------------------------------------- scheduling rules

fn fleet_with_dependencies() -> Inventory {
    let mut hosts = Vec::new();
    let mut groups = BTreeMap::new();
    let mut db = Group {
        name: "db".into(),
        ..Group::default()
    };
    for i in 0..3 {
        hosts.push(host(&format!("db{i}"), &["db"], Criticality::High));
        db.hosts.push(format!("db{i}"));
    }
    groups.insert("db".to_string(), db);
    for i in 0..12 {
        let mut h = host(&format!("app{i}"), &["app"], Criticality::Medium);
        h.depends_on = vec![format!("db{}", i % 3)];
        hosts.push(h);
    }
    for i in 0..15 {
        let mut h = host(&format!("web{i}"), &["web"], Criticality::Low);
        // Depends on a whole group and on one app host.
        h.depends_on = vec!["db".into(), format!("app{}", i % 12)];
        hosts.push(h);
    }
    let inv = Inventory::from_parts(hosts, groups, vec![]);
    inv.check_dependencies().unwrap();
    inv
}

fn overlaps(a: (Instant, Instant), b: (Instant, Instant)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[test]
fn dependent_hosts_never_overlap() {
    let inv = fleet_with_dependencies();
    for deps in ["first", "last"] {
        let targets: Vec<Target> = inv
            .hosts()
            .iter()
            .map(|h| Target::from_inventory(&inv, h))
            .collect();
        let plan = Plan::build(
            targets.clone(),
            &policy(json!({"dependencies": deps, "parallel": 8, "waves": ["50%", "100%"]})),
            8,
        )
        .unwrap();
        let spans = Spans::default();
        let summary = Executor::new(&plan)
            .run(
                |h, _| {
                    spans.record(&h.name, || std::thread::sleep(Duration::from_millis(2)));
                    HostOutcome::Done
                },
                |_, _| Ok(()),
            )
            .unwrap();
        assert_eq!(summary.totals.done, 30);
        let mut pairs = 0;
        for t in &targets {
            for d in &t.depends_on {
                let (a, b) = (spans.get(&t.host.name), spans.get(d));
                assert!(
                    !overlaps(a, b),
                    "{} overlapped its dependency {d} ({deps})",
                    t.host.name
                );
                if deps == "first" {
                    assert!(b.1 <= a.0, "{d} must finish before {} starts", t.host.name);
                } else {
                    assert!(
                        a.1 <= b.0,
                        "{} must finish before its dependency {d} starts",
                        t.host.name
                    );
                }
                pairs += 1;
            }
        }
        assert!(pairs > 40, "the fleet has real dependency edges");
    }
}

#[test]
fn max_unavailable_caps_a_group() {
    let mut targets: Vec<Target> = (0..4)
        .map(|i| {
            Target::new(
                host(&format!("pair{i}"), &["pair"], Criticality::Low),
                vec![],
            )
        })
        .collect();
    targets.extend((0..8).map(|i| {
        Target::new(
            host(&format!("other{i}"), &["other"], Criticality::Low),
            vec![],
        )
    }));
    for (cap, expected_peak) in [(json!(1), 1), (json!("50%"), 2), (json!("10%"), 1)] {
        let plan = Plan::build(
            targets.clone(),
            &policy(json!({"parallel": 12, "max_unavailable": {"pair": cap}})),
            12,
        )
        .unwrap();
        let (live, peak, all_live, all_peak) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        Executor::new(&plan)
            .run(
                |h, _| {
                    let in_pair = h.in_group("pair");
                    all_peak.fetch_max(
                        all_live.fetch_add(1, Ordering::SeqCst) + 1,
                        Ordering::SeqCst,
                    );
                    if in_pair {
                        peak.fetch_max(live.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(15));
                    if in_pair {
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                    all_live.fetch_sub(1, Ordering::SeqCst);
                    HostOutcome::Done
                },
                |_, _| Ok(()),
            )
            .unwrap();
        assert_eq!(
            peak.load(Ordering::SeqCst),
            expected_peak,
            "cap {expected_peak}"
        );
        assert!(
            all_peak.load(Ordering::SeqCst) > expected_peak + 2,
            "other hosts still ran in parallel"
        );
    }
}

#[test]
fn every_lower_class_finishes_before_a_higher_class_starts() {
    let classes = [
        Criticality::Critical,
        Criticality::Low,
        Criticality::High,
        Criticality::Medium,
    ];
    let targets: Vec<Target> = (0..24)
        .map(|i| Target::new(host(&format!("h{i}"), &[], classes[(i * 7) % 4]), vec![]))
        .collect();
    let plan = Plan::build(
        targets.clone(),
        &policy(json!({"order": "criticality", "parallel": 6, "waves": ["25%", "100%"]})),
        6,
    )
    .unwrap();
    let spans = Spans::default();
    Executor::new(&plan)
        .run(
            |h, _| {
                let i: u64 = h.name[1..].parse().unwrap();
                spans.record(&h.name, || {
                    std::thread::sleep(Duration::from_millis(1 + i % 4))
                });
                HostOutcome::Done
            },
            |_, _| Ok(()),
        )
        .unwrap();
    for lower in &targets {
        for higher in &targets {
            if lower.host.criticality < higher.host.criticality {
                let (l, h) = (spans.get(&lower.host.name), spans.get(&higher.host.name));
                assert!(
                    l.1 <= h.0,
                    "{} ({:?}) must finish before {} ({:?}) starts",
                    lower.host.name,
                    lower.host.criticality,
                    higher.host.name,
                    higher.host.criticality
                );
            }
        }
    }
}

// ---------------------------------------------------------------- windows

const HK: &str = "Sat 02:00-06:00 Asia/Hong_Kong";

#[test]
fn twenty_minutes_before_the_end_with_a_thirty_minute_buffer_starts_nothing() {
    let clock = Clock::from_vars(Some("2026-11-28T05:40:00+08:00"), None).unwrap();
    let window = Window::with_buffer(HK, "30m").unwrap();
    let plan = Plan::build(
        plain_targets(8),
        &policy(json!({"pilot": 1, "waves": ["50%", "100%"]})),
        4,
    )
    .unwrap();
    let ran = AtomicUsize::new(0);
    let log = Log::default();
    let summary = Executor::new(&plan)
        .clock(clock)
        .window(window)
        .observer(observe(&log))
        .run(
            |_, _| {
                ran.fetch_add(1, Ordering::SeqCst);
                HostOutcome::Done
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(summary.stop, StopReason::WindowClosing { before_wave: 0 });
    assert_eq!(summary.totals.pending, 8);
    assert_eq!(summary.pending_hosts().len(), 8);
    let events = log.events();
    assert!(!events
        .iter()
        .any(|e| matches!(e, RolloutEvent::WaveStarted { .. })));
    assert!(events.iter().any(|e| matches!(e, RolloutEvent::WindowClosed { time_left_seconds, .. } if (*time_left_seconds - 1200.0).abs() < 60.0)));
    assert!(matches!(events.last(), Some(RolloutEvent::RunDone { .. })));
}

#[test]
fn the_estimate_learns_from_the_pilot() {
    // 05:00, one hour left, 30m buffer. The pilot (estimate 5m + 30m) fits; it
    // takes 20m, so wave 1 (4 hosts, parallel 2: 2 × 20m + 30m) no longer does.
    let clock = Clock::manual(at("2026-11-28T05:00:00+08:00"));
    let window = Window::with_buffer(HK, "30m").unwrap();
    let plan = Plan::build(
        plain_targets(5),
        &policy(json!({"pilot": 1, "estimate": "5m", "parallel": 2})),
        2,
    )
    .unwrap();
    let summary: Summary = Executor::new(&plan)
        .clock(clock)
        .window(window)
        .run(
            |_, ctx| {
                ctx.clock.advance(Duration::from_secs(20 * 60));
                HostOutcome::Done
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(summary.stop, StopReason::WindowClosing { before_wave: 1 });
    assert_eq!((summary.totals.done, summary.totals.pending), (1, 4));
}

#[test]
fn refuses_to_start_outside_the_window_naming_the_next_one() {
    // The only test that touches the environment: it proves `from_env` reads it.
    std::env::set_var("PATCHBOOK_NOW", "2026-11-28T07:00:00+08:00");
    let clock = Clock::from_env().unwrap();
    std::env::remove_var("PATCHBOOK_NOW");
    let plan = Plan::build(plain_targets(3), &Policy::default(), 2).unwrap();
    let ran = AtomicUsize::new(0);
    let err = Executor::new(&plan)
        .clock(clock)
        .window(Window::with_buffer(HK, "30m").unwrap())
        .run(
            |_, _| {
                ran.fetch_add(1, Ordering::SeqCst);
                HostOutcome::Done
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert!(matches!(err, RolloutError::OutsideWindow { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("Sat 2026-12-05 02:00 HKT (Asia/Hong_Kong)"),
        "{msg}"
    );
    assert!(msg.contains(HK), "{msg}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    let passed = Window::parse("2026-11-28T02:00+08:00/2026-11-28T06:00+08:00").unwrap();
    let err = Executor::new(&plan)
        .clock(Clock::manual(at("2026-11-28T07:00:00+08:00")))
        .window(passed)
        .run(|_, _| HostOutcome::Done, |_, _| Ok(()))
        .unwrap_err();
    assert!(err.to_string().contains("will not open again"), "{err}");
}

// ---------------------------------------------------------------- events and robustness

#[test]
fn events_serialise_with_a_kind_and_a_panicking_host_fails_cleanly() {
    let plan = Plan::build(plain_targets(2), &policy(json!({"max_failed": 1})), 2).unwrap();
    let log = Log::default();
    let summary = Executor::new(&plan)
        .observer(observe(&log))
        .run(
            |h, _| {
                if h.name == "h1" {
                    panic!("index out of range");
                }
                HostOutcome::Done
            },
            |_, _| Err("no undo steps recorded".into()),
        )
        .unwrap();
    let h1 = &summary.hosts[1];
    assert_eq!(h1.reason.as_deref(), Some("panicked: index out of range"));
    assert_eq!(h1.rollback_error.as_deref(), Some("no undo steps recorded"));
    assert_eq!(summary.totals.rollback_failed, 1);
    let kinds: Vec<String> = log
        .events()
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("run_started"));
    assert!(kinds.contains(&"host_failed".to_string()));
    assert!(kinds.contains(&"rollback_failed".to_string()));
    assert_eq!(kinds.last().map(String::as_str), Some("run_done"));
}

#[test]
fn a_halt_lets_hosts_in_flight_finish_and_leaves_the_rest_pending() {
    let plan = Plan::build(
        plain_targets(12),
        &policy(json!({"waves": ["50%", "100%"], "parallel": 3, "max_failed": 0})),
        3,
    )
    .unwrap();
    let halt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = AtomicUsize::new(0);
    let summary = Executor::new(&plan)
        .halt_on(halt.clone())
        .run(
            |_, _| {
                // The fourth host to start asks for the stop, as SIGTERM would.
                if started.fetch_add(1, Ordering::SeqCst) == 3 {
                    halt.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
                HostOutcome::Done
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(summary.stop, StopReason::Halted);
    assert_eq!(summary.totals.failed, 0, "a halt is not a failure");
    assert_eq!(summary.totals.rolled_back, 0);
    let n = started.load(Ordering::SeqCst);
    assert!((4..=6).contains(&n), "{n} hosts started");
    assert_eq!(summary.totals.done, n);
    assert_eq!(summary.totals.pending, 12 - n);
}
