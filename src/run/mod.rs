//! The run core: one run's life, free of Rhai. It owns the [`Session`] every
//! primitive call goes through (runtime, journal, plan mode, secrets, deadlines),
//! the [`RunControl`] the rollouts of a run share (clock, window, stop flag,
//! summaries, plan results, rollout events to the journal), and the [`Courier`]
//! that delivers notifications on its own thread so a dead webhook never holds up a
//! host. An advisory scan ([`scan`]) is a run of its own: journaled, read-only,
//! and the source of "the last scan" that `exposure --from-last-scan` renders.
//!
//! `script` adapts Rhai to this module and owns nothing of a run; this module must
//! not know Rhai, and reads the journal only through its typed API.

pub mod control;
pub mod courier;
pub mod fleet;
pub mod scan;
pub mod session;
pub mod usage;

pub use control::{EventSink, FleetRole, HostPlan, RunControl, WorkerSpec};
pub use courier::Courier;
pub use session::Session;
