//! The controller watching itself: its CPU time, memory, open network sockets and
//! I/O, read from `/proc/self` and journaled as `controller.usage` samples during
//! a rollout (at its start, at most every few seconds on its events, and at its
//! end), so the report can say what a run cost the machine that drove it.
//!
//! It reads only this process; it must not sample hosts (that is `monitor()`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::journal::entry::ControllerUsage;

/// The least real time between two samples taken on rollout events.
pub const EVERY: Duration = Duration::from_secs(5);

/// Reads this process's usage now; `None` where `/proc` is missing.
pub fn read(at: DateTime<Utc>) -> Option<ControllerUsage> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: utime is the 14th
    // field of the line, so the 12th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let jiffies = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let cpu_seconds = (jiffies(11)? + jiffies(12)?) / ticks;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let sockets = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0);
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let io_bytes = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ControllerUsage {
        at,
        cpu_seconds,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
        sockets: sockets as u64,
        read_bytes: io_bytes("rchar:"),
        written_bytes: io_bytes("wchar:"),
    })
}

/// Paces samples taken on events: one now and then, not one per host.
#[derive(Debug, Default)]
pub struct Pace {
    last: Mutex<Option<Instant>>,
}

impl Pace {
    /// Whether a sample is due: always when `force`, else when [`EVERY`] passed.
    pub fn due(&self, force: bool) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let due = force || last.is_none_or(|t| t.elapsed() >= EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let u = read(Utc::now()).unwrap();
        assert!(u.rss_kib > 0 && u.peak_rss_kib >= u.rss_kib, "{u:?}");
        assert!(u.threads >= 1, "{u:?}");
        let pace = Pace::default();
        assert!(pace.due(false));
        assert!(!pace.due(false));
        assert!(pace.due(true));
    }
}
