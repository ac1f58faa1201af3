//! Scheduling inside one wave: which host may start now. A pure state machine the
//! executor drives (`start_next` → run → `finish`), so every rule is testable
//! without threads.
//!
//! A pending host starts when all of these hold:
//! - fewer than `parallel` hosts are in flight;
//! - `order: "criticality"`: every host of a lower class in this wave has finished,
//!   so a class starts only after the classes below it are done;
//! - `dependencies: "first"`: every host it depends on that is in this wave has
//!   finished (`"last"`: every host in this wave depending on it has finished).
//!   Under `order: "criticality"` an edge pointing to a higher class is not waited
//!   for: the class rule already orders the two, the other way round;
//! - no host it depends on, and no host depending on it, is in flight, so two
//!   dependent hosts never overlap, whatever the edge's direction or wave;
//! - for each of its groups with a `max_unavailable` cap, fewer than the cap are in
//!   flight. The cap is a count, or a percentage of the group's targets in the whole
//!   run rounded down, at least 1.
//!
//! A host counts as in flight from its start until its work and, for a failed host,
//! its rollback are over: a host being rolled back is still unavailable.
//! Hosts are considered in wave order; one that cannot start yet is skipped, not
//! waited for. The rules cannot deadlock: the "must finish first" relation only
//! goes up in class or along dependency edges inside a class, which the plan
//! checked to be acyclic, so with nothing in flight the earliest such host can start.
//!
//! It must not run hosts or know about time, budgets or windows.

use crate::inventory::Criticality;

use super::plan::{Plan, Wave};
use super::policy::{DependencyOrder, Order};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    NotInWave,
    Pending,
    InFlight,
    Finished,
}

#[derive(Debug)]
pub struct WaveSchedule<'p> {
    plan: &'p Plan,
    slots: Vec<Slot>,
    pending: Vec<usize>,
    class_unfinished: [usize; 4],
    in_flight: usize,
    group_in_flight: Vec<usize>,
    stopped: bool,
}

fn class_rank(c: Criticality) -> usize {
    match c {
        Criticality::Low => 0,
        Criticality::Medium => 1,
        Criticality::High => 2,
        Criticality::Critical => 3,
    }
}

impl<'p> WaveSchedule<'p> {
    pub fn new(plan: &'p Plan, wave: &Wave) -> Self {
        let mut slots = vec![Slot::NotInWave; plan.targets.len()];
        let mut class_unfinished = [0usize; 4];
        for &i in &wave.hosts {
            slots[i] = Slot::Pending;
            class_unfinished[class_rank(plan.host(i).criticality)] += 1;
        }
        WaveSchedule {
            plan,
            slots,
            pending: wave.hosts.clone(),
            class_unfinished,
            in_flight: 0,
            group_in_flight: vec![0; plan.group_caps.len()],
            stopped: false,
        }
    }

    fn class(&self, i: usize) -> Option<usize> {
        (self.plan.policy.order == Order::Criticality)
            .then(|| class_rank(self.plan.host(i).criticality))
    }

    fn unfinished(&self, i: usize) -> bool {
        matches!(self.slots[i], Slot::Pending | Slot::InFlight)
    }

    fn can_start(&self, h: usize) -> bool {
        if self.in_flight >= self.plan.parallel {
            return false;
        }
        if let Some(c) = self.class(h) {
            if self.class_unfinished[..c].iter().any(|&n| n > 0) {
                return false;
            }
        }
        let before = match self.plan.policy.dependencies {
            DependencyOrder::First => &self.plan.deps[h],
            DependencyOrder::Last => &self.plan.dependents[h],
        };
        let waits = before
            .iter()
            .any(|&d| self.unfinished(d) && self.class(d) <= self.class(h));
        if waits {
            return false;
        }
        let overlaps = self.plan.deps[h]
            .iter()
            .chain(&self.plan.dependents[h])
            .any(|&d| self.slots[d] == Slot::InFlight);
        if overlaps {
            return false;
        }
        self.plan.capped_groups[h]
            .iter()
            .all(|&g| self.group_in_flight[g] < self.plan.group_caps[g].1)
    }

    /// Marks as started, and returns, every host that may start now, in wave order.
    pub fn start_next(&mut self) -> Vec<usize> {
        if self.stopped {
            return Vec::new();
        }
        let mut started = Vec::new();
        let mut i = 0;
        while i < self.pending.len() && self.in_flight < self.plan.parallel {
            let h = self.pending[i];
            if self.can_start(h) {
                self.slots[h] = Slot::InFlight;
                self.in_flight += 1;
                for &g in &self.plan.capped_groups[h] {
                    self.group_in_flight[g] += 1;
                }
                self.pending.remove(i);
                started.push(h);
            } else {
                i += 1;
            }
        }
        started
    }

    /// A host's work (and rollback, if it failed) is over.
    pub fn finish(&mut self, h: usize) {
        if self.slots[h] != Slot::InFlight {
            return;
        }
        self.slots[h] = Slot::Finished;
        self.in_flight -= 1;
        self.class_unfinished[class_rank(self.plan.host(h).criticality)] -= 1;
        for &g in &self.plan.capped_groups[h] {
            self.group_in_flight[g] -= 1;
        }
    }

    /// No host starts after this; in-flight hosts still finish.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hosts of this wave that have not started, in wave order.
    pub fn pending(&self) -> &[usize] {
        &self.pending
    }

    pub fn is_over(&self) -> bool {
        self.in_flight == 0 && (self.stopped || self.pending.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Host;
    use crate::rollout::plan::Target;
    use crate::rollout::policy::Policy;
    use serde_json::json;

    fn target(name: &str, groups: &[&str], deps: &[&str]) -> Target {
        let mut h = Host::new(name);
        h.groups = groups.iter().map(|s| s.to_string()).collect();
        Target::new(h, deps.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn group_cap_and_dependencies() {
        let targets = vec![
            target("db", &["db"], &[]),
            target("w1", &["web"], &["db"]),
            target("w2", &["web"], &["db"]),
            target("x", &[], &[]),
        ];
        let policy = Policy::from_value(&json!({"max_unavailable": {"web": 1}})).unwrap();
        let plan = Plan::build(targets, &policy, 10).unwrap();
        let mut s = WaveSchedule::new(&plan, &plan.waves[0]);
        assert_eq!(s.start_next(), vec![0, 3], "web waits for its database");
        s.finish(0);
        assert_eq!(s.start_next(), vec![1], "one web host at a time");
        s.finish(1);
        assert_eq!(s.start_next(), vec![2]);
        s.finish(2);
        s.finish(3);
        assert!(s.is_over());
    }

    #[test]
    fn stop_keeps_the_rest_pending() {
        let targets = vec![target("a", &[], &[]), target("b", &[], &[])];
        let plan = Plan::build(targets, &Policy::default(), 1).unwrap();
        let mut s = WaveSchedule::new(&plan, &plan.waves[0]);
        assert_eq!(s.start_next(), vec![0]);
        s.stop();
        s.finish(0);
        assert!(s.start_next().is_empty());
        assert_eq!(s.pending(), &[1]);
        assert!(s.is_over());
    }
}
