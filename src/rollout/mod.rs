//! The rollout layer: targets + policy → pilot and waves, run with bounded
//! concurrency under one failure budget, inside a maintenance window, with rollback
//! in reverse deployment order. It must not know Rhai syntax: the script layer hands
//! it a per-host closure.

pub mod pool;
