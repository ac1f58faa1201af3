//! Maintenance windows: when a rollout may run, and how much time it has left.
//!
//! Forms accepted by [`Window::parse`]:
//! - weekly: `"Sat 02:00-06:00 Asia/Hong_Kong"`, several days `"Sat,Sun 01:00-05:00 UTC"`,
//!   day ranges `"Mon-Fri 22:00-23:30 Europe/Berlin"`;
//! - daily: `"02:00-06:00 Europe/Berlin"`;
//! - across midnight: `"Sat 23:00-03:00 UTC"` opens Saturday and closes Sunday
//!   (the day names the day the window opens);
//! - an explicit range: `"2026-11-28T02:00+08:00/2026-11-28T06:00+08:00"`.
//!
//! Local times are resolved with chrono-tz in the window's zone. On a DST change a
//! window whose opening or closing time does not exist that day is skipped for that
//! day; an ambiguous time (the repeated hour) takes the earlier instant.
//!
//! The `buffer` is the contingency kept free at the end of the window: the executor
//! starts a wave only if its estimate plus the buffer fits in the time left. It does
//! not shrink what [`Window::contains`] answers.
//!
//! This module owns calendar arithmetic only; it must not decide what a rollout does
//! with the answer.

use std::fmt;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, FixedOffset, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;

use super::clock::{parse_instant, to_chrono};
use super::policy::{format_duration, parse_duration};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WindowError {
    #[error("window `{spec}`: {message}")]
    Invalid { spec: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Recurring {
        /// Indexed by `Weekday::num_days_from_monday`.
        days: [bool; 7],
        start: NaiveTime,
        end: NaiveTime,
        tz: Tz,
    },
    Range {
        start: DateTime<FixedOffset>,
        end: DateTime<FixedOffset>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    spec: String,
    kind: Kind,
    pub buffer: Duration,
}

const FORMS: &str = "write e.g. \"Sat 02:00-06:00 Asia/Hong_Kong\", \"02:00-06:00 UTC\" or \"2026-11-28T02:00+08:00/2026-11-28T06:00+08:00\"";

impl Window {
    pub fn parse(spec: &str) -> Result<Window, WindowError> {
        let err = |message: String| WindowError::Invalid {
            spec: spec.to_string(),
            message,
        };
        let s = spec.trim();
        if s.contains('/') && !s.contains(' ') {
            let (a, b) = s.split_once('/').unwrap_or((s, ""));
            let start = parse_instant(a)
                .ok_or_else(|| err(format!("`{a}` is not a time with an offset; {FORMS}")))?;
            let end = parse_instant(b)
                .ok_or_else(|| err(format!("`{b}` is not a time with an offset; {FORMS}")))?;
            if end <= start {
                return Err(err("the range ends before it starts".into()));
            }
            return Ok(Window {
                spec: s.to_string(),
                kind: Kind::Range { start, end },
                buffer: Duration::ZERO,
            });
        }
        let parts: Vec<&str> = s.split_whitespace().collect();
        let (days, times, zone) = match parts.as_slice() {
            [times, zone] => ([true; 7], *times, *zone),
            [days, times, zone] => (parse_days(days).map_err(err)?, *times, *zone),
            [_] => return Err(err(format!("a time zone is missing (e.g. UTC); {FORMS}"))),
            _ => return Err(err(FORMS.to_string())),
        };
        let (a, b) = times
            .split_once('-')
            .ok_or_else(|| err(format!("`{times}` is not a range like 02:00-06:00")))?;
        let start = parse_hm(a).ok_or_else(|| err(format!("`{a}` is not a time like 02:00")))?;
        let end = parse_hm(b).ok_or_else(|| err(format!("`{b}` is not a time like 06:00")))?;
        if start == end {
            return Err(err("the window opens and closes at the same time".into()));
        }
        let tz: Tz = zone.parse().map_err(|_| {
            err(format!(
                "`{zone}` is not an IANA time zone like Europe/Berlin or UTC"
            ))
        })?;
        Ok(Window {
            spec: s.to_string(),
            kind: Kind::Recurring {
                days,
                start,
                end,
                tz,
            },
            buffer: Duration::ZERO,
        })
    }

    /// Parses a window and its `buffer` (e.g. `"30m"`).
    pub fn with_buffer(spec: &str, buffer: &str) -> Result<Window, WindowError> {
        let buffer = parse_duration(buffer).map_err(|m| WindowError::Invalid {
            spec: spec.to_string(),
            message: format!("buffer: {m}"),
        })?;
        Ok(Window {
            buffer,
            ..Window::parse(spec)?
        })
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        self.current_end(now).is_some()
    }

    /// When the window that `now` is in closes; `None` outside every window.
    pub fn current_end(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Range { start, end } => {
                (*start <= now && now < *end).then(|| end.with_timezone(&Utc))
            }
            Kind::Recurring { .. } => {
                let today = self.local_date(now);
                (-2i64..=1)
                    .filter_map(|off| self.occurrence(today + chrono::Duration::days(off)))
                    .filter(|(s, e)| *s <= now && now < *e)
                    .map(|(_, e)| e)
                    .max()
            }
        }
    }

    /// The first opening strictly after `now`; `None` when there is none (a range
    /// that already began).
    pub fn next_start(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Range { start, .. } => (now < *start).then(|| start.with_timezone(&Utc)),
            Kind::Recurring { .. } => {
                let today = self.local_date(now);
                // Two weeks covers any weekly pattern plus a skipped DST day.
                (-1i64..=15)
                    .filter_map(|off| self.occurrence(today + chrono::Duration::days(off)))
                    .map(|(s, _)| s)
                    .find(|s| *s > now)
            }
        }
    }

    /// Time left until the current window closes, zero outside.
    pub fn time_left(&self, now: DateTime<Utc>) -> Duration {
        self.current_end(now)
            .map(|e| super::clock::between(now, e))
            .unwrap_or(Duration::ZERO)
    }

    /// An instant in the window's own zone, e.g. `Sat 2026-12-05 02:00 HKT (Asia/Hong_Kong)`.
    pub fn display_time(&self, t: DateTime<Utc>) -> String {
        match &self.kind {
            Kind::Recurring { tz, .. } => {
                let local = t.with_timezone(tz);
                format!("{} ({})", local.format("%a %Y-%m-%d %H:%M %Z"), tz.name())
            }
            Kind::Range { start, .. } => t
                .with_timezone(start.offset())
                .format("%a %Y-%m-%d %H:%M %:z")
                .to_string(),
        }
    }

    fn local_date(&self, now: DateTime<Utc>) -> NaiveDate {
        match &self.kind {
            Kind::Recurring { tz, .. } => now.with_timezone(tz).date_naive(),
            Kind::Range { start, .. } => now.with_timezone(start.offset()).date_naive(),
        }
    }

    /// The window opening on local date `d`, as UTC instants, if it opens that day.
    fn occurrence(&self, d: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let Kind::Recurring {
            days,
            start,
            end,
            tz,
        } = &self.kind
        else {
            return None;
        };
        if !days[d.weekday().num_days_from_monday() as usize] {
            return None;
        }
        let end_date = if end <= start { d.succ_opt()? } else { d };
        let s = resolve(tz, d.and_time(*start))?;
        let e = resolve(tz, end_date.and_time(*end))?;
        (s < e).then_some((s, e))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.spec)?;
        if !self.buffer.is_zero() {
            write!(f, " (buffer {})", format_duration(self.buffer))?;
        }
        Ok(())
    }
}

/// Earlier instant when ambiguous; `None` when the local time does not exist.
fn resolve(tz: &Tz, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        LocalResult::None => None,
    }
}

fn parse_hm(s: &str) -> Option<NaiveTime> {
    let s = s.trim();
    if s == "24:00" {
        return NaiveTime::from_hms_opt(23, 59, 59);
    }
    NaiveTime::parse_from_str(s, "%H:%M").ok()
}

fn parse_day(s: &str) -> Option<Weekday> {
    let l = s.trim().to_ascii_lowercase();
    let all = [
        ("mon", Weekday::Mon, "monday"),
        ("tue", Weekday::Tue, "tuesday"),
        ("wed", Weekday::Wed, "wednesday"),
        ("thu", Weekday::Thu, "thursday"),
        ("fri", Weekday::Fri, "friday"),
        ("sat", Weekday::Sat, "saturday"),
        ("sun", Weekday::Sun, "sunday"),
    ];
    all.iter()
        .find(|(short, _, long)| l == *short || l == *long)
        .map(|(_, d, _)| *d)
}

fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let bad = || format!("`{part}` is not a day like Sat, Sat,Sun or Mon-Fri");
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (parse_day(a).ok_or_else(bad)?, parse_day(b).ok_or_else(bad)?);
            let mut d = a;
            loop {
                days[d.num_days_from_monday() as usize] = true;
                if d == b {
                    break;
                }
                d = d.succ();
            }
        } else {
            days[parse_day(part).ok_or_else(bad)?.num_days_from_monday() as usize] = true;
        }
    }
    if days.iter().all(|d| !d) {
        return Err(format!("`{s}` names no day"));
    }
    Ok(days)
}

/// Adds a duration to an instant without panicking on overflow.
pub(crate) fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(to_chrono(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        parse_instant(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekly_in_zone() {
        let w = Window::parse("Sat 02:00-06:00 Asia/Hong_Kong").unwrap();
        // 2026-11-28 is a Saturday.
        assert!(w.contains(at("2026-11-28T05:50:00+08:00")));
        assert!(!w.contains(at("2026-11-28T06:00:00+08:00")));
        assert_eq!(
            w.current_end(at("2026-11-28T05:50:00+08:00")),
            Some(at("2026-11-28T06:00:00+08:00"))
        );
        assert_eq!(
            w.next_start(at("2026-11-28T07:00:00+08:00")),
            Some(at("2026-12-05T02:00:00+08:00"))
        );
        assert!(w
            .display_time(at("2026-12-05T02:00:00+08:00"))
            .contains("2026-12-05 02:00 HKT (Asia/Hong_Kong)"));
    }

    #[test]
    fn across_midnight_and_several_days() {
        let w = Window::parse("Sat,Sun 23:00-03:00 UTC").unwrap();
        assert!(
            w.contains(at("2026-11-29T01:00:00Z")),
            "Saturday's window runs into Sunday"
        );
        assert!(
            w.contains(at("2026-11-30T02:00:00Z")),
            "Sunday's window runs into Monday"
        );
        assert!(
            !w.contains(at("2026-11-28T01:00:00Z")),
            "Friday's night is not a window"
        );
        assert_eq!(
            w.current_end(at("2026-11-29T01:00:00Z")),
            Some(at("2026-11-29T03:00:00Z"))
        );
        let daily = Window::parse("02:00-06:00 Europe/Berlin").unwrap();
        assert!(daily.contains(at("2026-11-25T03:00:00+01:00")));
        let r = Window::parse("Mon-Wed 10:00-11:00 UTC").unwrap();
        assert!(r.contains(at("2026-11-24T10:30:00Z")));
        assert!(!r.contains(at("2026-11-26T10:30:00Z")));
    }

    #[test]
    fn explicit_range() {
        let w = Window::parse("2026-11-28T02:00+08:00/2026-11-28T06:00+08:00").unwrap();
        assert!(w.contains(at("2026-11-28T03:00:00+08:00")));
        assert_eq!(
            w.next_start(at("2026-11-27T03:00:00+08:00")),
            Some(at("2026-11-28T02:00:00+08:00"))
        );
        assert_eq!(w.next_start(at("2026-11-28T03:00:00+08:00")), None);
    }

    #[test]
    fn dst_gap_skips_the_day_and_overlap_takes_the_earlier() {
        // Europe/Berlin springs forward 2026-03-29 02:00 -> 03:00.
        let w = Window::parse("02:30-04:00 Europe/Berlin").unwrap();
        assert!(!w.contains(at("2026-03-29T03:30:00+02:00")));
        assert_eq!(
            w.next_start(at("2026-03-29T00:00:00+01:00")),
            Some(at("2026-03-30T02:30:00+02:00"))
        );
        // Falls back 2026-10-25 03:00 -> 02:00; 02:30 happens twice.
        assert_eq!(
            w.next_start(at("2026-10-25T00:00:00+02:00")),
            Some(at("2026-10-25T02:30:00+02:00"))
        );
    }

    #[test]
    fn bad_specs_explain() {
        for bad in [
            "Sat 02:00-06:00",
            "Caturday 02:00-06:00 UTC",
            "02:00-02:00 UTC",
            "02:00-06:00 Mars/Base",
        ] {
            let e = Window::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(Window::with_buffer("Sat 02:00-06:00 UTC", "half").is_err());
    }
}
