//! The failure budget: ONE budget for the whole run, never per wave.
//!
//! The formula, exactly:
//!
//! - `max_failed: N` (a count) → `allowed = N`;
//! - `max_failed: "P%"` → `allowed = floor(P / 100 × total_targets)`, where
//!   `total_targets` counts every target of the run, pilot included;
//! - the budget is **exhausted at failure number `allowed + 1`**: failures may
//!   reach `allowed` and the run goes on; the next one stops it.
//!
//! So `max_failed: 0` (the default) stops at the first failure, and `"5%"` of 30
//! targets gives `floor(1.5) = 1` allowed, stopping at the second failure.
//! Failures are counted in the order the executor learns of them. When the budget
//! is exhausted no new host starts, but hosts already in flight finish, so the
//! final failure count can exceed `allowed + 1` by at most `parallel − 1`.
//!
//! The unreachable budget (`max_unreachable`, default `max_failed`) is a second
//! value of this type with the same arithmetic: hosts that could not be connected
//! to count there and never against the failure budget.
//!
//! This module owns the arithmetic only; the executor decides what stopping means.

use super::policy::Amount;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureBudget {
    allowed: usize,
    failures: usize,
}

impl FailureBudget {
    pub fn new(max_failed: Amount, total_targets: usize) -> Self {
        FailureBudget {
            allowed: max_failed.of_total_floor(total_targets),
            failures: 0,
        }
    }

    /// Failures the run tolerates and still goes on.
    pub fn allowed(&self) -> usize {
        self.allowed
    }

    /// The failure number that stops the run: `allowed + 1`.
    pub fn stops_at(&self) -> usize {
        self.allowed.saturating_add(1)
    }

    pub fn failures(&self) -> usize {
        self.failures
    }

    /// Counts one failure; true exactly when this failure exhausted the budget.
    pub fn record_failure(&mut self) -> bool {
        self.failures += 1;
        self.failures == self.stops_at()
    }

    pub fn exhausted(&self) -> bool {
        self.failures > self.allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_rounds_down_and_stops_after_allowed() {
        let mut b = FailureBudget::new(Amount::Percent { hundredths: 500 }, 30);
        assert_eq!(b.allowed(), 1);
        assert!(!b.record_failure());
        assert!(!b.exhausted());
        assert!(b.record_failure());
        assert!(b.exhausted());
        assert!(
            !b.record_failure(),
            "only the crossing failure reports exhaustion"
        );
    }

    #[test]
    fn zero_stops_at_first_failure() {
        let mut b = FailureBudget::new(Amount::Count(0), 10);
        assert!(b.record_failure());
    }
}
