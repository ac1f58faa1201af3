//! Live progress of a rollout on the terminal: bars on a TTY, one plain line per
//! state change elsewhere, one JSON event per line with `--json`. The bar and the
//! lines end with the controller's own CPU, memory, TCP traffic and connections
//! ([`crate::run::usage`], read at most once a second). It only renders events;
//! the journal is written before any of this runs.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::terminal::{escape_controls, escape_controls_but_colours};
use crate::rollout::RolloutEvent;
use crate::run::EventSink;

/// stderr with every registered secret shown as `***` and control characters
/// shown as `\xNN`: logs go through it, so neither a secret nor a terminal escape
/// in a command line, a host name or host output reaches the terminal. With
/// `colour`, SGR sequences (colours only: they cannot move the cursor, clear the
/// screen or set a title) pass, so the log's own colours still work.
#[derive(Debug, Clone, Copy)]
pub struct ScrubbedStderr {
    pub colour: bool,
}

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = crate::journal::scrub(&String::from_utf8_lossy(buf));
        let shown = if self.colour {
            escape_controls_but_colours(&text)
        } else {
            escape_controls(&text)
        };
        std::io::stderr().write_all(shown.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Bars,
    Lines,
    Json,
    Quiet,
}

impl Style {
    pub fn pick(json: bool, quiet: bool) -> Self {
        if json {
            Style::Json
        } else if quiet {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Lines
        }
    }
}

#[derive(Default)]
struct Tally {
    targeted: usize,
    done: usize,
    failed: usize,
    unreachable: usize,
    rolled_back: usize,
    in_flight: usize,
    wave: String,
    /// The controller's figures and when they were read.
    controller: Option<(std::time::Instant, String)>,
}

/// How often the progress line reads the controller's figures again.
const CONTROLLER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The controller's figures as the progress line shows them.
pub fn controller_figures(u: &crate::journal::entry::ControllerUsage) -> String {
    #[allow(clippy::cast_precision_loss)] // display only: KiB and MiB to one decimal
    let k = |b: u64| b as f64 / 1024.0;
    format!(
        "controller cpu {:.1}s mem {:.1} MiB net {:.1}/{:.1} KiB sent/received {} conns",
        u.cpu_seconds,
        k(u.rss_kib),
        k(u.bytes_sent),
        k(u.bytes_received),
        u.connections
    )
}

impl Tally {
    /// The controller's figures, read again when [`CONTROLLER_EVERY`] passed.
    fn controller(&mut self, at: DateTime<Utc>) -> String {
        let fresh = self
            .controller
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() < CONTROLLER_EVERY);
        if !fresh {
            if let Some(u) = crate::run::usage::read(at) {
                self.controller = Some((std::time::Instant::now(), controller_figures(&u)));
            }
        }
        self.controller
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    fn line(&self) -> String {
        let pending = self
            .targeted
            .saturating_sub(self.done + self.failed + self.unreachable + self.in_flight);
        format!(
            "{} | done {} | in progress {} | failed {} | unreachable {} | rolled back {} | pending {}",
            self.wave,
            self.done,
            self.in_flight,
            self.failed,
            self.unreachable,
            self.rolled_back,
            pending
        )
    }

    fn apply(&mut self, e: &RolloutEvent) {
        match e {
            RolloutEvent::RunStarted { targets, .. } => self.targeted = *targets,
            RolloutEvent::WaveStarted { label, .. } => self.wave = label.clone(),
            RolloutEvent::HostStarted { .. } => self.in_flight += 1,
            RolloutEvent::HostDone { .. } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.done += 1;
            }
            RolloutEvent::HostFailed { .. } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.failed += 1;
            }
            RolloutEvent::HostUnreachable { .. } => {
                // Before the first wave: a host a probe left out, not a target
                // the rollout started.
                if self.wave.is_empty() {
                    self.targeted += 1;
                } else {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
                self.unreachable += 1;
            }
            RolloutEvent::RolledBack { .. } => self.rolled_back += 1,
            _ => {}
        }
    }
}

/// A sink for one run's events.
pub fn sink(style: Style, run: &str) -> EventSink {
    let run = run.to_string();
    let tally = Arc::new(Mutex::new(Tally::default()));
    match style {
        Style::Quiet => Arc::new(|_, _| {}),
        Style::Json => Arc::new(move |at: DateTime<Utc>, e: &RolloutEvent| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("ts".into(), at.to_rfc3339().into());
                m.insert("run".into(), run.clone().into());
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", crate::journal::scrub(&v.to_string()));
        }),
        Style::Lines => Arc::new(move |at: DateTime<Utc>, e: &RolloutEvent| {
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            t.apply(e);
            let controller = t.controller(at);
            let line = format!(
                "{} {}  [{} | {controller}]",
                at.format("%H:%M:%S"),
                describe(e),
                t.line()
            );
            eprintln!("{}", escape_controls(&crate::journal::scrub(&line)));
        }),
        Style::Bars => {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            Arc::new(move |at: DateTime<Utc>, e: &RolloutEvent| {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                t.apply(e);
                bar.set_length(t.targeted as u64);
                bar.set_position((t.done + t.failed + t.unreachable) as u64);
                let controller = t.controller(at);
                bar.set_message(
                    escape_controls(&format!("{} | {controller}", t.line())).into_owned(),
                );
                match e {
                    RolloutEvent::HostFailed { .. }
                    | RolloutEvent::HostUnreachable { .. }
                    | RolloutEvent::RollbackFailed { .. }
                    | RolloutEvent::BudgetExhausted { .. }
                    | RolloutEvent::UnreachableBudgetExhausted { .. }
                    | RolloutEvent::GateStopped { .. }
                    | RolloutEvent::Soaking { .. }
                    | RolloutEvent::GateEvaluated(_)
                    | RolloutEvent::WindowClosed { .. } => {
                        let _ =
                            multi.println(escape_controls(&crate::journal::scrub(&describe(e))));
                    }
                    RolloutEvent::RunDone { .. } => bar.finish(),
                    _ => {}
                }
            })
        }
    }
}

/// One event in words.
pub fn describe(e: &RolloutEvent) -> String {
    match e {
        RolloutEvent::RunStarted { targets, waves, parallel, allowed_failures } => format!(
            "run started: {targets} hosts in {waves} waves, {parallel} at a time, up to {allowed_failures} failures allowed"
        ),
        RolloutEvent::WaveStarted { label, hosts, .. } => format!("{label} started: {} hosts", hosts.len()),
        RolloutEvent::HostStarted { host, .. } => format!("{host}: started"),
        RolloutEvent::HostDone { host, seconds, .. } => format!("{host}: done in {seconds:.1}s"),
        RolloutEvent::HostFailed { host, reason, .. } => format!("{host}: FAILED: {reason}"),
        RolloutEvent::HostUnreachable { host, reason, .. } => format!("{host}: UNREACHABLE: {reason}"),
        RolloutEvent::RolledBack { host, .. } => format!("{host}: rolled back"),
        RolloutEvent::RollbackFailed { host, error, .. } => format!("{host}: ROLLBACK FAILED: {error}"),
        RolloutEvent::BudgetExhausted { failures, allowed } => {
            format!("failure budget exhausted: {failures} failures, {allowed} allowed; no new hosts start")
        }
        RolloutEvent::UnreachableBudgetExhausted { unreachable, allowed } => format!(
            "unreachable budget (max_unreachable) exhausted: {unreachable} unreachable, {allowed} allowed; no new hosts start"
        ),
        RolloutEvent::Paused { seconds } => format!("pausing {seconds:.0}s before the next wave"),
        RolloutEvent::GateStopped { after_wave, reason } => format!("gate stopped the run after wave {after_wave}: {reason}"),
        RolloutEvent::Soaking { after_wave, seconds } => format!("wave {after_wave} done: soaking {seconds:.0}s before the gate"),
        RolloutEvent::GateEvaluated(v) => format!(
            "gate after wave {} {}: {}",
            v.after_wave,
            if v.passed { "passed" } else { "FAILED" },
            v.detail
        ),
        RolloutEvent::WindowClosed { before_wave, time_left_seconds, needed_seconds } => format!(
            "window closing: wave {before_wave} needs {needed_seconds:.0}s, {time_left_seconds:.0}s left; remaining hosts stay pending"
        ),
        RolloutEvent::RunDone { summary } => {
            let t = &summary.totals;
            format!(
                "run done: {} targeted, {} done, {} failed, {} unreachable, {} rolled back, {} pending",
                t.targeted, t.done, t.failed, t.unreachable, t.rolled_back, t.pending
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_carries_the_controllers_figures() {
        let mut t = Tally::default();
        t.apply(&RolloutEvent::RunStarted {
            targets: 2,
            waves: 1,
            parallel: 1,
            allowed_failures: 0,
        });
        let figures = t.controller(Utc::now());
        assert!(figures.starts_with("controller cpu "), "{figures}");
        assert!(
            figures.contains(" MiB net ") && figures.ends_with(" conns"),
            "{figures}"
        );
        // Read again only after a second: the same text within it.
        assert_eq!(t.controller(Utc::now()), figures);
    }
}
