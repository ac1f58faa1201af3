//! patchbook: bulk security patching of server fleets.
//!
//! The top-level modules form layers, highest first. A module imports only modules
//! in rows below its own, never one above, so there is no import circle, directly
//! or through others. `tests/layers.rs` guards both: it scans every `src/**/*.rs`
//! file for the modules it names, fails on any circle (showing each edge's
//! file:line), and fails when a module imports one listed above it here or is
//! missing from this table.
//!
//! | module         | owns                                                                 |
//! |----------------|----------------------------------------------------------------------|
//! | [`cli`]        | argument parsing, exit codes, terminal output                        |
//! | [`lab`]        | real sshd hosts for tests, demos and benchmarks; never a real run    |
//! | [`watch`]      | the long-running service: hot reload, schedules, control socket      |
//! | [`script`]     | the sandboxed Rhai engine, module resolution, primitive registration |
//! | [`run`]        | one run's life without Rhai: session, run control, notifications     |
//! | [`report`]     | run reports (md, json, html) and patch levels, read from the journal |
//! | [`runtime`]    | wiring config + inventory + journal secrets + transports, built once |
//! | [`rollout`]    | waves, bounded concurrency, failure budget, windows, rollback order  |
//! | [`advisory`]   | advisory feeds (OSV, Debian tracker, CSAF VEX), exposure, evidence   |
//! | [`primitives`] | typed Rust functions: facts, artifact, backup, deploy, verify, …     |
//! | [`transport`]  | run an argv, put a file, get a file: `ssh`, `local`, `sim`           |
//! | [`journal`]    | the append-only, hash-chained event log                              |
//! | [`inventory`]  | hosts, groups, vars, selectors; TOML and Ansible loaders             |
//! | [`config`]     | `patchbook.toml` as plain settings data, and the duration grammar    |
//!
//! Rows that do not import each other (`report` and `runtime`, `rollout` and
//! `primitives`) could swap places. `config` is the bottom so every layer can read
//! its settings; each layer turns them into its own types
//! (`ArtifactSettings::from_config`, `SshConnector::from_config`, …) rather than
//! `config` naming a type of the layer above.

pub mod advisory;
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
