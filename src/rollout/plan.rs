//! Wave planning: targets + policy → a pilot and waves, in run order. The plan is
//! pure data: `patchbook plan` prints it and the executor runs it.
//!
//! How the order is built:
//! 1. Targets start in inventory order (the order they were given).
//! 2. With `order: "criticality"` they are sorted low → medium → high → critical,
//!    ties keeping inventory order.
//! 3. Inside each criticality class (the whole list with `order: "inventory"`),
//!    dependency edges between targets move hosts as little as possible so that,
//!    with `dependencies: "first"`, a dependency comes before the hosts depending on
//!    it (with `"last"`, after them). Criticality wins over dependencies: an edge
//!    between classes never reorders classes (the scheduler still keeps the two
//!    hosts from overlapping).
//! 4. The pilot comes first: the named targets (names that are not targets are
//!    skipped with a warning) or the first `N` of the order. It is exempt from the
//!    criticality order, since it is chosen by hand; a warning says so when a pilot
//!    host is more critical than a host of a later wave.
//! 5. Waves are cut from the rest, in order. Each entry of `waves` is the size of
//!    one wave: a count, or a percentage of the hosts left after the pilot, rounded
//!    up and at least one. A size larger than what is left takes what is left; when
//!    the list runs out before the hosts do, its last entry repeats (Ansible's
//!    `serial` does the same).
//!
//! Because waves are cut from the criticality-sorted list and run one after the
//! other, and because the scheduler starts a class inside a wave only after every
//! lower class of that wave has finished, every low host finishes before any
//! critical host starts (the pilot excepted, see 4).
//!
//! It must not run anything or know about time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use std::sync::Arc;

use crate::inventory::{Criticality, Host, Inventory};

use super::budget::FailureBudget;
use super::policy::{format_duration, DependencyOrder, Order, Pilot, Policy, RollbackScope};

/// One host of a run with the names of the hosts it depends on, groups already
/// expanded ([`Inventory::dependencies_of`]).
/// The host is shared, not copied: a playbook's `hosts()` already holds each one,
/// and at 100,000 hosts every copy of the fleet costs about 100 MB.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: Arc<Host>,
    pub depends_on: Vec<String>,
}

impl Target {
    pub fn new(host: Host, depends_on: Vec<String>) -> Self {
        Target {
            host: Arc::new(host),
            depends_on,
        }
    }

    pub fn from_inventory(inventory: &Inventory, host: &Host) -> Self {
        Self::shared(inventory, Arc::new(host.clone()))
    }

    /// A target of a host someone else holds too (a script's host value).
    pub fn shared(inventory: &Inventory, host: Arc<Host>) -> Self {
        Target {
            depends_on: inventory.dependencies_of(&host),
            host,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveKind {
    Pilot,
    Regular,
}

/// One wave. `index` 0 is the pilot; regular waves count from 1 whether or not
/// there is a pilot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub index: usize,
    pub kind: WaveKind,
    /// Indices into [`Plan::targets`], in run order.
    pub hosts: Vec<usize>,
}

impl Wave {
    pub fn label(&self) -> String {
        match self.kind {
            WaveKind::Pilot => "pilot".to_string(),
            WaveKind::Regular => format!("wave {}", self.index),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("host `{name}` is targeted twice; pass each host once")]
    DuplicateTarget { name: String },
    #[error("none of the pilot hosts ({}) is a target of this run; pick pilot hosts among the targets or use a count", names.join(", "))]
    EmptyPilot { names: Vec<String> },
    #[error("dependency cycle among the targets: {}; break it in the inventory's depends_on", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// In the order they were given; waves refer to them by index.
    pub targets: Vec<Target>,
    pub policy: Policy,
    pub parallel: usize,
    pub waves: Vec<Wave>,
    pub warnings: Vec<String>,
    /// Per target: indices of the targets it depends on.
    pub(crate) deps: Vec<Vec<usize>>,
    /// Per target: indices of the targets depending on it.
    pub(crate) dependents: Vec<Vec<usize>>,
    /// Groups with a `max_unavailable` cap: name, cap, targets in the group.
    pub(crate) group_caps: Vec<(String, usize, usize)>,
    /// Per target: indices into `group_caps`.
    pub(crate) capped_groups: Vec<Vec<usize>>,
}

impl Plan {
    /// Plans a run. `forks` is the parallelism when the policy has no `parallel`.
    pub fn build(targets: Vec<Target>, policy: &Policy, forks: usize) -> Result<Plan, PlanError> {
        let n = targets.len();
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            if index.insert(t.host.name.as_str(), i).is_some() {
                return Err(PlanError::DuplicateTarget {
                    name: t.host.name.clone(),
                });
            }
        }
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, t) in targets.iter().enumerate() {
            for d in &t.depends_on {
                if let Some(&j) = index.get(d.as_str()) {
                    if j != i && !deps[i].contains(&j) {
                        deps[i].push(j);
                        dependents[j].push(i);
                    }
                }
            }
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(PlanError::Cycle {
                cycle: cycle
                    .into_iter()
                    .map(|i| targets[i].host.name.clone())
                    .collect(),
            });
        }

        let class = |i: usize| match policy.order {
            Order::Inventory => Criticality::Low,
            Order::Criticality => targets[i].host.criticality,
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| class(i));
        let order = dependency_adjusted(&order, &deps, policy.dependencies, &class);

        let mut warnings = Vec::new();
        let pilot: Vec<usize> = match &policy.pilot {
            Pilot::None => Vec::new(),
            Pilot::Count(k) => order.iter().copied().take(*k).collect(),
            Pilot::Hosts(names) => {
                let wanted: BTreeSet<usize> = names
                    .iter()
                    .filter_map(|name| match index.get(name.as_str()) {
                        Some(&i) => Some(i),
                        None => {
                            warnings.push(format!(
                                "pilot host `{name}` is not a target of this run; skipped"
                            ));
                            None
                        }
                    })
                    .collect();
                // With no targets at all there is nothing to pilot: an empty run.
                if wanted.is_empty() && !names.is_empty() && !order.is_empty() {
                    return Err(PlanError::EmptyPilot {
                        names: names.clone(),
                    });
                }
                order
                    .iter()
                    .copied()
                    .filter(|i| wanted.contains(i))
                    .collect()
            }
        };
        let in_pilot: BTreeSet<usize> = pilot.iter().copied().collect();
        let rest: Vec<usize> = order
            .iter()
            .copied()
            .filter(|i| !in_pilot.contains(i))
            .collect();
        if let Some(min_rest) = rest.iter().map(|&i| targets[i].host.criticality).min() {
            for &p in &pilot {
                let c = targets[p].host.criticality;
                if policy.order == Order::Criticality && c > min_rest {
                    warnings.push(format!(
                        "pilot host `{}` is {} but later waves hold {} hosts; the pilot runs first regardless",
                        targets[p].host.name,
                        c.as_str(),
                        min_rest.as_str()
                    ));
                }
            }
        }

        let mut waves = Vec::new();
        if !pilot.is_empty() {
            waves.push(Wave {
                index: 0,
                kind: WaveKind::Pilot,
                hosts: pilot,
            });
        }
        let r = rest.len();
        let mut taken = 0;
        let mut k = 0;
        while taken < r {
            let amount = policy.waves[k.min(policy.waves.len() - 1)];
            let size = amount.of_total_ceil(r).max(1).min(r - taken);
            k += 1;
            waves.push(Wave {
                index: k,
                kind: WaveKind::Regular,
                hosts: rest[taken..taken + size].to_vec(),
            });
            taken += size;
        }

        let mut group_members: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &targets {
            for g in &t.host.groups {
                *group_members.entry(g.as_str()).or_default() += 1;
            }
        }
        for g in policy.max_unavailable.per_group.keys() {
            if !group_members.contains_key(g.as_str()) && g != "all" {
                warnings.push(format!(
                    "max_unavailable names group `{g}`, which holds no target of this run"
                ));
            }
        }
        let mut group_caps = Vec::new();
        let mut cap_index: BTreeMap<&str, usize> = BTreeMap::new();
        for (g, &members) in &group_members {
            if let Some(a) = policy.max_unavailable.for_group(g) {
                cap_index.insert(g, group_caps.len());
                group_caps.push((g.to_string(), a.of_total_floor(members).max(1), members));
            }
        }
        // `all` is implicit in the inventory: a cap on it caps the whole run.
        if let Some(a) = policy.max_unavailable.per_group.get("all") {
            cap_index.insert("all", group_caps.len());
            group_caps.push(("all".to_string(), a.of_total_floor(n).max(1), n));
        }
        let capped_groups = targets
            .iter()
            .map(|t| {
                let mut v: Vec<usize> = t
                    .host
                    .groups
                    .iter()
                    .filter_map(|g| cap_index.get(g.as_str()).copied())
                    .collect();
                if let Some(&a) = cap_index.get("all") {
                    v.push(a);
                }
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();

        Ok(Plan {
            parallel: policy.parallel.unwrap_or(forks).max(1),
            policy: policy.clone(),
            targets,
            waves,
            warnings,
            deps,
            dependents,
            group_caps,
            capped_groups,
        })
    }

    pub fn total(&self) -> usize {
        self.targets.len()
    }

    pub fn budget(&self) -> FailureBudget {
        FailureBudget::new(self.policy.max_failed, self.total())
    }

    /// The unreachable budget of a run whose probes already found `before` hosts
    /// unreachable: they count among the targets and against the budget.
    pub fn unreachable_budget(&self, before: usize) -> FailureBudget {
        FailureBudget::new(
            self.policy
                .max_unreachable
                .unwrap_or(self.policy.max_failed),
            self.total() + before,
        )
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.targets[i].host
    }

    /// Target indices in run order, pilot first.
    pub fn run_order(&self) -> Vec<usize> {
        self.waves
            .iter()
            .flat_map(|w| w.hosts.iter().copied())
            .collect()
    }

    /// `(group, cap, targets in group)` for every group with a `max_unavailable` cap.
    pub fn group_caps(&self) -> &[(String, usize, usize)] {
        &self.group_caps
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.policy;
        let budget = self.budget();
        writeln!(
            f,
            "rollout: {} targets in {} waves, parallel {}, order {}, dependencies {}",
            self.total(),
            self.waves.len(),
            self.parallel,
            match p.order {
                Order::Inventory => "inventory",
                Order::Criticality => "criticality",
            },
            match p.dependencies {
                DependencyOrder::First => "first",
                DependencyOrder::Last => "last",
            }
        )?;
        writeln!(
            f,
            "failure budget: max_failed {} of {} targets allows {}; the run stops at failure {}",
            p.max_failed,
            self.total(),
            budget.allowed(),
            budget.stops_at()
        )?;
        if let Some(m) = p.max_unreachable {
            let u = self.unreachable_budget(0);
            writeln!(
                f,
                "unreachable budget: max_unreachable {m} of {} targets allows {}",
                self.total(),
                u.allowed()
            )?;
        }
        let mut extra = vec![format!(
            "rollback: {}",
            match p.rollback {
                RollbackScope::Failed => "failed hosts",
                RollbackScope::All => "every changed host, in reverse order",
            }
        )];
        if !p.pause.is_zero() {
            extra.push(format!("pause {}", format_duration(p.pause)));
        }
        if let Some(t) = p.timeout {
            extra.push(format!("timeout {} per host", format_duration(t)));
        }
        for (g, cap, members) in &self.group_caps {
            extra.push(format!("max_unavailable {g} {cap} of {members}"));
        }
        writeln!(f, "{}", extra.join(", "))?;
        for w in &self.waves {
            writeln!(f, "{} ({} hosts):", w.label(), w.hosts.len())?;
            for &i in &w.hosts {
                let t = &self.targets[i];
                write!(f, "  {} [{}]", t.host.name, t.host.criticality.as_str())?;
                let d: Vec<&str> = self.deps[i]
                    .iter()
                    .map(|&j| self.targets[j].host.name.as_str())
                    .collect();
                if !d.is_empty() {
                    write!(f, " depends on {}", d.join(", "))?;
                }
                writeln!(f)?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// A stable topological order of `order`: among the hosts whose predecessors are
/// placed, the earliest in `order` goes next. Only edges inside one class count.
fn dependency_adjusted(
    order: &[usize],
    deps: &[Vec<usize>],
    direction: DependencyOrder,
    class: &dyn Fn(usize) -> Criticality,
) -> Vec<usize> {
    let n = order.len();
    let mut pos = vec![0usize; deps.len()];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    // before[i]: hosts that must be placed before i.
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); deps.len()];
    let mut indeg = vec![0usize; deps.len()];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            if class(i) != class(d) {
                continue;
            }
            let (first, then) = match direction {
                DependencyOrder::First => (d, i),
                DependencyOrder::Last => (i, d),
            };
            succ[first].push(then);
            indeg[then] += 1;
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = order
        .iter()
        .filter(|&&i| indeg[i] == 0)
        .map(|&i| Reverse(pos[i]))
        .collect();
    let mut out = Vec::with_capacity(n);
    while let Some(Reverse(p)) = ready.pop() {
        let i = order[p];
        out.push(i);
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.push(Reverse(pos[s]));
            }
        }
    }
    out
}

/// A dependency cycle as a path that returns to its start, if there is one.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = deps.len();
    let mut colour = vec![0u8; n];
    for root in 0..n {
        if colour[root] != 0 {
            continue;
        }
        // Iterative DFS: (node, next edge to try).
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = 1;
        while let Some(&mut (v, ref mut e)) = stack.last_mut() {
            if *e < deps[v].len() {
                let w = deps[v][*e];
                *e += 1;
                match colour[w] {
                    0 => {
                        colour[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => {
                        let start = stack.iter().position(|&(x, _)| x == w).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|&(x, _)| x).collect();
                        cycle.push(w);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                colour[v] = 2;
                stack.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::policy::Amount;
    use serde_json::json;

    fn t(name: &str, c: Criticality, deps: &[&str]) -> Target {
        let mut h = Host::new(name);
        h.criticality = c;
        Target::new(h, deps.iter().map(|s| s.to_string()).collect())
    }

    fn names(p: &Plan, w: usize) -> Vec<&str> {
        p.waves[w]
            .hosts
            .iter()
            .map(|&i| p.host(i).name.as_str())
            .collect()
    }

    #[test]
    fn waves_are_percentages_of_the_rest_rounded_up() {
        let targets: Vec<Target> = (0..23)
            .map(|i| t(&format!("h{i}"), Criticality::Low, &[]))
            .collect();
        let policy =
            Policy::from_value(&json!({"pilot": 3, "waves": ["10%", "50%", "100%"]})).unwrap();
        let p = Plan::build(targets, &policy, 5).unwrap();
        let sizes: Vec<usize> = p.waves.iter().map(|w| w.hosts.len()).collect();
        assert_eq!(sizes, vec![3, 2, 10, 8]);
        assert_eq!(p.waves[0].kind, WaveKind::Pilot);
        assert_eq!(p.waves[1].index, 1);
        assert_eq!(names(&p, 0), vec!["h0", "h1", "h2"]);
    }

    #[test]
    fn last_wave_size_repeats() {
        let targets: Vec<Target> = (0..7)
            .map(|i| t(&format!("h{i}"), Criticality::Low, &[]))
            .collect();
        let policy = Policy {
            waves: vec![Amount::Count(1), Amount::Count(2)],
            ..Policy::default()
        };
        let p = Plan::build(targets, &policy, 5).unwrap();
        let sizes: Vec<usize> = p.waves.iter().map(|w| w.hosts.len()).collect();
        assert_eq!(sizes, vec![1, 2, 2, 2]);
    }

    #[test]
    fn criticality_then_dependencies_within_class() {
        let targets = vec![
            t("crit", Criticality::Critical, &[]),
            t("web", Criticality::Low, &["db"]),
            t("db", Criticality::Low, &[]),
            t("mid", Criticality::Medium, &[]),
        ];
        let policy = Policy::from_value(&json!({"order": "criticality"})).unwrap();
        let p = Plan::build(targets.clone(), &policy, 5).unwrap();
        assert_eq!(names(&p, 0), vec!["db", "web", "mid", "crit"]);
        let policy =
            Policy::from_value(&json!({"order": "criticality", "dependencies": "last"})).unwrap();
        let p = Plan::build(targets, &policy, 5).unwrap();
        assert_eq!(names(&p, 0), vec!["web", "db", "mid", "crit"]);
    }

    #[test]
    fn cycles_and_empty_pilots_are_refused() {
        let targets = vec![
            t("a", Criticality::Low, &["b"]),
            t("b", Criticality::Low, &["a"]),
        ];
        let e = Plan::build(targets, &Policy::default(), 2).unwrap_err();
        assert!(matches!(e, PlanError::Cycle { .. }), "{e}");
        let targets = vec![t("a", Criticality::Low, &[])];
        let policy = Policy::from_value(&json!({"pilot": ["zz"]})).unwrap();
        let e = Plan::build(targets, &policy, 2).unwrap_err();
        assert!(e.to_string().contains("zz"));
    }

    #[test]
    fn printable() {
        let targets = vec![
            t("a", Criticality::Low, &[]),
            t("b", Criticality::High, &["a"]),
        ];
        let policy = Policy::from_value(&json!({"pilot": ["a"], "max_failed": "50%"})).unwrap();
        let text = Plan::build(targets, &policy, 2).unwrap().to_string();
        assert!(text.contains("pilot (1 hosts):\n  a [low]"), "{text}");
        assert!(
            text.contains("wave 1 (1 hosts):\n  b [high] depends on a"),
            "{text}"
        );
        assert!(
            text.contains("allows 1; the run stops at failure 2"),
            "{text}"
        );
    }
}
