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
//!
//! `lab` and the `sim` transport are built only with the `lab` cargo feature
//! (`cargo build --features lab`): the demo, benchmarks and the full test suite
//! turn it on; the shipped binary leaves both out.

// The table above links `lab`, which the lean build does not have: its docs
// keep the name unlinked rather than failing.
#![cfg_attr(not(feature = "lab"), allow(rustdoc::broken_intra_doc_links))]

pub mod advisory;
pub mod cli;
pub mod config;
pub mod inventory;
pub mod journal;
#[cfg(feature = "lab")]
pub mod lab;
pub mod primitives;
pub mod report;
pub mod rollout;
pub mod run;
pub mod runtime;
pub mod script;
pub mod transport;
pub mod watch;

/// Plain `cargo test` builds without the `lab` feature, so the test files that
/// start lab hosts are not built at all (`required-features` in Cargo.toml) and
/// tests needing root, chromium or the CI venv are ignored with their reason.
/// This entry makes that visible in the test output instead of silent.
#[cfg(all(test, not(feature = "lab")))]
mod lab_feature {
    #[test]
    #[ignore = "the lab tests (tests/*_lab.rs, tests/lab.rs, tests/ssh.rs and those in tests/watch.rs) were not built: they need root, sshd, chromium and the CI venv; run `cargo test --features lab` after `.ci/setup`, as .ci/run does"]
    fn lab_tests_need_the_lab_feature() {}
}
