//! The rollout's sense of time. Windows, pauses, per-host deadlines and wave
//! estimates all read this clock and never `SystemTime` directly, so a run can be
//! tested at 05:50 on a Saturday in Hong Kong without waiting for one.
//!
//! Three kinds:
//! - **system**: wall time;
//! - **shifted**: starts at a fixed instant (`PATCHBOOK_NOW`) and then advances
//!   with real time, optionally accelerated (`PATCHBOOK_CLOCK_SPEED=60` makes one
//!   real second one clock minute; sleeps shrink by the same factor);
//! - **manual**: time moves only when something sleeps on it or calls
//!   [`Clock::advance`]; sleeping returns at once. Unit tests use it to run a
//!   "2m" pause in microseconds.
//!
//! It owns nothing but time; it must not know about hosts or windows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Utc};

/// Environment variable fixing the clock's starting instant (RFC 3339).
pub const NOW_VAR: &str = "PATCHBOOK_NOW";
/// Environment variable accelerating a shifted clock (a positive number).
pub const SPEED_VAR: &str = "PATCHBOOK_CLOCK_SPEED";
/// The accepted speed range. Outside it the arithmetic stops meaning anything:
/// a speed of 1e308 turns one real nanosecond into more seconds than a
/// `Duration` holds, and 1e-9 turns a one-second sleep into thirty years.
pub const MIN_SPEED: f64 = 0.001;
pub const MAX_SPEED: f64 = 1_000_000.0;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("{var}=`{value}` is not an RFC 3339 time; write it like 2026-11-28T05:50:00+08:00")]
    BadNow { var: &'static str, value: String },
    #[error("{var}=`{value}` is not a positive number; write e.g. 60 to run one clock minute per real second")]
    BadSpeed { var: &'static str, value: String },
    #[error("{var}=`{value}` is out of range; use a speed between {min} and {max} (e.g. 60 runs one clock minute per real second)")]
    SpeedOutOfRange {
        var: &'static str,
        value: String,
        min: f64,
        max: f64,
    },
}

#[derive(Debug)]
enum Kind {
    System,
    Shifted {
        start: DateTime<Utc>,
        real_start: Instant,
        speed: f64,
    },
    Manual(Mutex<DateTime<Utc>>),
}

/// A cheap-to-clone handle; clones share one timeline.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Kind>);

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(Kind::System))
    }

    /// Starts at `start` and advances `speed` clock seconds per real second.
    pub fn shifted(start: DateTime<Utc>, speed: f64) -> Self {
        // Library callers bypass `from_vars`; clamp rather than panic later.
        let speed = if speed.is_finite() && speed > 0.0 {
            speed.clamp(MIN_SPEED, MAX_SPEED)
        } else {
            1.0
        };
        Clock(Arc::new(Kind::Shifted {
            start,
            real_start: Instant::now(),
            speed,
        }))
    }

    /// Stands still at `start` until slept on or advanced.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock(Arc::new(Kind::Manual(Mutex::new(start))))
    }

    /// Reads `PATCHBOOK_NOW` and `PATCHBOOK_CLOCK_SPEED`; without `PATCHBOOK_NOW`
    /// the clock is the system clock.
    pub fn from_env() -> Result<Self, ClockError> {
        let now = std::env::var(NOW_VAR).ok();
        let speed = std::env::var(SPEED_VAR).ok();
        Clock::from_vars(now.as_deref(), speed.as_deref())
    }

    /// [`Clock::from_env`] with the variables' values passed in.
    pub fn from_vars(now: Option<&str>, speed: Option<&str>) -> Result<Self, ClockError> {
        let Some(now) = now.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(Clock::system());
        };
        let start = parse_instant(now).ok_or_else(|| ClockError::BadNow {
            var: NOW_VAR,
            value: now.to_string(),
        })?;
        let speed = match speed.map(str::trim).filter(|s| !s.is_empty()) {
            None => 1.0,
            Some(s) => match s.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => {
                    if !(MIN_SPEED..=MAX_SPEED).contains(&v) {
                        return Err(ClockError::SpeedOutOfRange {
                            var: SPEED_VAR,
                            value: s.to_string(),
                            min: MIN_SPEED,
                            max: MAX_SPEED,
                        });
                    }
                    v
                }
                _ => {
                    return Err(ClockError::BadSpeed {
                        var: SPEED_VAR,
                        value: s.to_string(),
                    })
                }
            },
        };
        Ok(Clock::shifted(start.with_timezone(&Utc), speed))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &*self.0 {
            Kind::System => Utc::now(),
            Kind::Shifted {
                start,
                real_start,
                speed,
            } => {
                let real = real_start.elapsed().as_secs_f64() * speed;
                // A clock left running for centuries at top speed saturates
                // instead of panicking on overflow.
                let gained = Duration::try_from_secs_f64(real).unwrap_or(Duration::MAX);
                start
                    .checked_add_signed(to_chrono(gained))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
            Kind::Manual(t) => *t.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Waits `d` of clock time: real time for the system clock, `d / speed` for a
    /// shifted one, nothing for a manual one (which jumps forward instead).
    pub fn sleep(&self, d: Duration) {
        match &*self.0 {
            Kind::System => std::thread::sleep(d),
            Kind::Shifted { speed, .. } => std::thread::sleep(d.div_f64(*speed)),
            Kind::Manual(_) => self.advance(d),
        }
    }

    /// Moves a manual clock forward; other clocks ignore it (they advance by themselves).
    pub fn advance(&self, d: Duration) {
        if let Kind::Manual(t) = &*self.0 {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            *t += to_chrono(d);
        }
    }

    /// One step of waiting for `end`: true once `end` has come; otherwise sleeps
    /// at most a quarter second of real time towards it and returns false, so a
    /// caller waiting out a soak looks for a halt between steps.
    pub fn step_toward(&self, end: DateTime<Utc>) -> bool {
        let left = between(self.now(), end);
        if left.is_zero() {
            return true;
        }
        let real = self.real_duration(left).as_secs_f64();
        let slice = if real > 0.25 {
            left.mul_f64(0.25 / real)
        } else {
            left
        };
        self.sleep(slice);
        false
    }

    /// Converts a span of clock time into the real time it takes to pass, for
    /// transports that enforce a deadline with real sockets.
    pub fn real_duration(&self, d: Duration) -> Duration {
        match &*self.0 {
            Kind::Shifted { speed, .. } => d.div_f64(*speed),
            _ => d,
        }
    }
}

/// Clock time between two instants, zero when `later` is not later.
pub fn between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> Duration {
    (later - earlier).to_std().unwrap_or(Duration::ZERO)
}

pub(crate) fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// RFC 3339 with or without seconds (`2026-11-28T02:00+08:00`), `Z` allowed.
pub(crate) fn parse_instant(s: &str) -> Option<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t);
    }
    let normalised = match s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        Some(head) => format!("{head}+00:00"),
        None => s.to_string(),
    };
    [
        "%Y-%m-%dT%H:%M%:z",
        "%Y-%m-%d %H:%M%:z",
        "%Y-%m-%d %H:%M:%S%:z",
    ]
    .iter()
    .find_map(|f| DateTime::parse_from_str(&normalised, f).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_jumps_on_sleep() {
        let start = parse_instant("2026-11-28T05:50:00+08:00").unwrap();
        let c = Clock::manual(start.with_timezone(&Utc));
        let real = Instant::now();
        c.sleep(Duration::from_secs(120));
        assert!(real.elapsed() < Duration::from_secs(1));
        assert_eq!(between(start.with_timezone(&Utc), c.now()).as_secs(), 120);
    }

    #[test]
    fn shifted_clock_accelerates() {
        let c = Clock::from_vars(Some("2026-11-28T05:50:00+08:00"), Some("600")).unwrap();
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(50));
        let gained = between(t0, c.now());
        assert!(gained >= Duration::from_secs(29), "gained {gained:?}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Clock::from_vars(Some("Saturday"), None).unwrap_err();
        assert!(e.to_string().contains("PATCHBOOK_NOW"));
        let e = Clock::from_vars(Some("2026-11-28T05:50Z"), Some("-3")).unwrap_err();
        assert!(e.to_string().contains("PATCHBOOK_CLOCK_SPEED"));
    }

    #[test]
    fn absurd_speeds_are_errors_not_panics() {
        for bad in [
            "1e308", "1e7", "NaN", "inf", "-inf", "-1", "0", "1e-9", "fast",
        ] {
            let e = Clock::from_vars(Some("2026-11-28T05:50Z"), Some(bad))
                .err()
                .unwrap_or_else(|| panic!("speed {bad} was accepted"));
            let msg = e.to_string();
            assert!(msg.contains("PATCHBOOK_CLOCK_SPEED"), "{msg}");
            assert!(msg.contains(bad), "{msg}");
        }
        let c = Clock::from_vars(Some("2026-11-28T05:50Z"), Some("1000000")).unwrap();
        let t0 = c.now();
        c.sleep(Duration::from_secs(1));
        assert!(c.now() >= t0);
        // A direct caller passing an absurd speed gets a clamped, working clock.
        let c = Clock::shifted(Utc::now(), 1e308);
        let _ = c.now();
        c.sleep(Duration::from_millis(1));
    }
}
