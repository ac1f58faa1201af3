//! The primitives: typed Rust functions that do the work of a playbook —
//! facts, version comparison, artifacts, backup, deploy, verify, health, rollback,
//! notify, exec.
//!
//! Each one is a plain function testable without Rhai; the `script` layer adapts
//! them. A primitive that changes a host writes its intent to the journal before
//! acting and its outcome, with the undo step, after. Primitives must not know Rhai.

pub mod artifact;
pub mod notify;
pub mod version;
