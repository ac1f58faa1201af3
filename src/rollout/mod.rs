//! The rollout layer: targets + policy → pilot and waves, run with bounded
//! concurrency under one failure budget, inside a maintenance window, with rollback
//! in reverse deployment order. It must not know Rhai syntax: the script layer hands
//! it a per-host closure.
//!
//! - [`policy`]: the policy map, parsed and defaulted;
//! - [`plan`]: pilot and waves in run order, printable for `patchbook plan`;
//! - [`schedule`]: which host of a wave may start now;
//! - [`budget`]: the one failure budget of a run;
//! - [`window`] and [`clock`]: maintenance windows and a clock tests can fix;
//! - [`gate`]: the metric gate between waves, asked of Prometheus;
//! - [`executor`]: runs a plan on a bounded pool and emits [`RolloutEvent`]s;
//! - [`pool`]: a plain bounded map for work without scheduling rules.

pub mod budget;
pub mod clock;
pub mod executor;
pub mod gate;
pub mod plan;
pub mod policy;
pub mod pool;
pub mod schedule;
pub mod window;

pub use clock::Clock;
pub use executor::{
    Counts, Executor, GateContext, HostContext, HostOutcome, HostReport, HostStatus, RollbackCause,
    RollbackContext, RolloutError, RolloutEvent, RolloutObserver, StopReason, Summary,
};
pub use gate::MetricGate;
pub use plan::{Plan, PlanError, Target, Wave, WaveKind};
pub use policy::{GateFailAction, Policy, PolicyError};
pub use window::{Window, WindowError};
