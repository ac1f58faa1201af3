//! patchbook: bulk security patching of server fleets.
//!
//! The layers below follow `DESIGN.md`; data flows down this list and nothing below
//! imports anything above it:
//!
//! | module       | owns                                                                 |
//! |--------------|----------------------------------------------------------------------|
//! | [`cli`]      | argument parsing, exit codes, terminal output                        |
//! | [`report`]   | run reports (md, json, html) and patch levels, read from the journal |
//! | [`runtime`]  | wiring config + inventory + engine + journal + transports, built once |
//! | [`script`]   | the sandboxed Rhai engine, module resolution, primitive registration |
//! | [`run`]      | one run's life without Rhai: session, run control, notifications     |
//! | [`rollout`]  | waves, bounded concurrency, failure budget, windows, rollback order  |
//! | [`primitives`] | typed Rust functions: facts, artifact, backup, deploy, verify, …   |
//! | [`transport`]| run an argv, put a file, get a file: `ssh` and `local`               |
//! | [`journal`]  | the append-only, hash-chained event log                              |
//! | [`inventory`]| hosts, groups, vars, selectors; TOML and Ansible loaders             |
//!
//! [`config`] is read by every layer; [`lab`] starts real sshd hosts for tests, demos
//! and benchmarks and is never used by a real run.

pub mod cli;
pub mod config;
pub mod inventory;
pub mod journal;
pub mod lab;
pub mod primitives;
pub mod report;
pub mod rollout;
pub mod run;
pub mod runtime;
pub mod script;
pub mod transport;
pub mod watch;
