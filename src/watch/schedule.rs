//! When a playbook wants to run by itself: `schedule("Sat 02:00 Asia/Hong_Kong")`
//! (weekly or daily at a local time in a zone) or a five-field cron expression with
//! its zone, `schedule("0 2 * * 6", "Asia/Hong_Kong")`.
//!
//! Schedules are found statically, by walking the compiled playbook's top-level
//! statements for `schedule(…)` calls whose arguments are string literals. The
//! playbook is never evaluated to discover them: its top level calls primitives that
//! touch hosts. A `schedule()` nested in a function or a branch is not a schedule;
//! a non-literal argument is a compile error with its position. At run time
//! `schedule()` does nothing ([`register_schedule_noop`]).
//!
//! Weekly specs are parsed by [`crate::rollout::Window`], which already owns day,
//! time and zone parsing and DST rules: `"Sat 02:00 Asia/Hong_Kong"` is the opening
//! of the one-minute window `"Sat 02:00-02:01 Asia/Hong_Kong"`. Cron expressions use
//! the small parser below (`*`, lists, ranges, steps, month and day names; day of
//! month and day of week are ORed when both are restricted, as in Vixie cron). A
//! local time that does not exist on a DST day is skipped; a repeated one fires once,
//! at the earlier instant.
//!
//! This module owns calendar answers only; it must not start runs.

use std::fmt;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rhai::{Engine, Expr, Stmt, AST};

use crate::rollout::Window;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    spec: String,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Weekly(Window),
    Cron(Box<Cron>, Tz),
}

/// A schedule declaration that could not be used, with where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ScheduleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

const FORMS: &str = "write schedule(\"Sat 02:00 Asia/Hong_Kong\"), schedule(\"02:00 UTC\") or schedule(\"0 2 * * 6\", \"Asia/Hong_Kong\")";

impl Schedule {
    /// `spec` alone (weekly/daily form) or a cron expression plus its zone.
    pub fn parse(spec: &str, zone: Option<&str>) -> Result<Schedule, String> {
        let spec = spec.trim();
        match zone {
            Some(zone) => {
                let tz: Tz = zone.trim().parse().map_err(|_| {
                    format!("`{zone}` is not an IANA time zone like Europe/Berlin or UTC")
                })?;
                let cron = Cron::parse(spec)?;
                Ok(Schedule {
                    spec: format!("{spec} {}", tz.name()),
                    kind: Kind::Cron(Box::new(cron), tz),
                })
            }
            None => {
                let parts: Vec<&str> = spec.split_whitespace().collect();
                let (days, time, zone) = match parts.as_slice() {
                    [days, time] if NaiveTime::parse_from_str(time, "%H:%M").is_ok() => {
                        return Err(format!(
                            "a time zone is missing in `{days} {time}` (e.g. {days} {time} UTC); {FORMS}"
                        ))
                    }
                    [time, zone] => (None, *time, *zone),
                    [days, time, zone] => (Some(*days), *time, *zone),
                    [_, _, _, _, _] => {
                        return Err(format!(
                            "`{spec}` looks like a cron expression; give its time zone as a second argument: schedule(\"{spec}\", \"UTC\")"
                        ))
                    }
                    _ => return Err(format!("`{spec}` is not a schedule; {FORMS}")),
                };
                let at = NaiveTime::parse_from_str(time, "%H:%M")
                    .map_err(|_| format!("`{time}` is not a time like 02:00; {FORMS}"))?;
                let until = at + chrono::Duration::minutes(1);
                let window_spec = format!(
                    "{}{}-{} {zone}",
                    days.map(|d| format!("{d} ")).unwrap_or_default(),
                    at.format("%H:%M"),
                    until.format("%H:%M"),
                );
                let window = Window::parse(&window_spec).map_err(|e| match e {
                    crate::rollout::WindowError::Invalid { message, .. } => message,
                })?;
                Ok(Schedule {
                    spec: spec.to_string(),
                    kind: Kind::Weekly(window),
                })
            }
        }
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The first start strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Weekly(w) => w.next_start(now),
            Kind::Cron(c, tz) => c.next_after(now, tz),
        }
    }

    /// An instant in the schedule's own zone, for people.
    pub fn display_time(&self, t: DateTime<Utc>) -> String {
        match &self.kind {
            Kind::Weekly(w) => w.display_time(t),
            Kind::Cron(_, tz) => {
                let local = t.with_timezone(tz);
                format!("{} ({})", local.format("%a %Y-%m-%d %H:%M %Z"), tz.name())
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

/// Every top-level `schedule(…)` of a compiled playbook, parsed. `file` names the
/// playbook in errors.
pub fn discover(ast: &AST, file: &str) -> Result<Vec<Schedule>, ScheduleError> {
    let mut found = Vec::new();
    for stmt in ast.statements() {
        let (call, pos) = match stmt {
            Stmt::FnCall(call, pos) => (&**call, *pos),
            Stmt::Expr(e) => match &**e {
                Expr::FnCall(call, pos) => (&**call, *pos),
                _ => continue,
            },
            _ => continue,
        };
        if call.name != "schedule" || call.is_qualified() {
            continue;
        }
        let err = |message: String| ScheduleError {
            file: file.to_string(),
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message,
        };
        let mut args = Vec::new();
        for a in call.args.iter() {
            match a {
                Expr::StringConstant(s, _) => args.push(s.to_string()),
                _ => {
                    return Err(err(format!(
                        "schedule() takes string literals, so the schedule is known without running the playbook; {FORMS}"
                    )))
                }
            }
        }
        let parsed = match args.as_slice() {
            [spec] => Schedule::parse(spec, None),
            [spec, zone] => Schedule::parse(spec, Some(zone)),
            _ => Err(format!("schedule() takes one or two strings; {FORMS}")),
        };
        found.push(parsed.map_err(|m| err(format!("schedule: {m}")))?);
    }
    Ok(found)
}

/// Makes `schedule(…)` a no-op on a run's engine: the service reads schedules from
/// the AST, and a run must not fail on the declaration.
pub fn register_schedule_noop(engine: &mut Engine) {
    engine.register_fn("schedule", |_: &str| ());
    engine.register_fn("schedule", |_: &str, _: &str| ());
}

/// A five-field cron expression: minute, hour, day of month, month, day of week.
#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    minutes: Vec<u32>,
    hours: Vec<u32>,
    days: [bool; 32],
    months: [bool; 13],
    weekdays: [bool; 7],
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let [m, h, dom, mon, dow] = fields.as_slice() else {
            return Err(format!(
                "`{expr}` has {} fields; a cron expression has five: minute hour day-of-month month day-of-week",
                fields.len()
            ));
        };
        let minutes = field(m, "minute", 0, 59, &[])?;
        let hours = field(h, "hour", 0, 23, &[])?;
        let dom_v = field(dom, "day of month", 1, 31, &[])?;
        let mon_v = field(mon, "month", 1, 12, &MONTHS)?;
        let dow_v = field(dow, "day of week", 0, 7, &WEEKDAYS)?;
        let mut days = [false; 32];
        dom_v.iter().for_each(|d| days[*d as usize] = true);
        let mut months = [false; 13];
        mon_v.iter().for_each(|d| months[*d as usize] = true);
        let mut weekdays = [false; 7];
        dow_v
            .iter()
            .for_each(|d| weekdays[(*d % 7) as usize] = true);
        Ok(Cron {
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted: !dom.starts_with('*'),
            weekdays_restricted: !dow.starts_with('*'),
        })
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        if !self.months[d.month() as usize] {
            return false;
        }
        let dom = self.days[d.day() as usize];
        let dow = self.weekdays[d.weekday().num_days_from_sunday() as usize];
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first matching minute strictly after `now`, in zone `tz`.
    pub fn next_after(&self, now: DateTime<Utc>, tz: &Tz) -> Option<DateTime<Utc>> {
        let start = now.with_timezone(tz).date_naive();
        // Eight years covers every pattern, 29 February on a Monday included.
        for off in 0..(366 * 8) {
            let d = start + chrono::Duration::days(off);
            if !self.day_matches(d) {
                continue;
            }
            for h in &self.hours {
                for m in &self.minutes {
                    let Some(t) = NaiveTime::from_hms_opt(*h, *m, 0) else {
                        continue;
                    };
                    let at = match tz.from_local_datetime(&d.and_time(t)) {
                        LocalResult::Single(x) => x,
                        LocalResult::Ambiguous(a, b) => a.min(b),
                        LocalResult::None => continue,
                    }
                    .with_timezone(&Utc);
                    if at > now && at.second() == 0 {
                        return Some(at);
                    }
                }
            }
        }
        None
    }
}

fn value(s: &str, what: &str, lo: u32, hi: u32, names: &[&str]) -> Result<u32, String> {
    let l = s.to_ascii_lowercase();
    if let Some(i) = names.iter().position(|n| *n == l) {
        // Month names count from 1, weekday names from 0 (Sunday).
        // `i` indexes a list of 7 or 12 names.
        return Ok(u32::try_from(i).unwrap_or(0) + if names.len() == 12 { 1 } else { 0 });
    }
    match s.parse::<u32>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a {what} ({lo}-{hi})")),
    }
}

fn field(s: &str, what: &str, lo: u32, hi: u32, names: &[&str]) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => {
                let step = st
                    .parse::<u32>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("`{st}` is not a step in the {what} field"))?;
                (r, step)
            }
            None => (item, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                value(a, what, lo, hi, names)?,
                value(b, what, lo, hi, names)?,
            )
        } else {
            let a = value(range, what, lo, hi, names)?;
            // `5/15` means from 5 to the end, every 15.
            (a, if step > 1 { hi } else { a })
        };
        if a > b {
            return Err(format!("`{range}` runs backwards in the {what} field"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekly_spec_reuses_window_rules() {
        let s = Schedule::parse("Sat 02:00 Asia/Hong_Kong", None).unwrap();
        // 2026-11-28 is a Saturday.
        assert_eq!(
            s.next_after(at("2026-11-28T01:59:00+08:00")),
            Some(at("2026-11-28T02:00:00+08:00"))
        );
        assert_eq!(
            s.next_after(at("2026-11-28T02:00:00+08:00")),
            Some(at("2026-12-05T02:00:00+08:00"))
        );
        let daily = Schedule::parse("23:59 UTC", None).unwrap();
        assert_eq!(
            daily.next_after(at("2026-11-28T23:59:30Z")),
            Some(at("2026-11-29T23:59:00Z"))
        );
    }

    #[test]
    fn cron_fields() {
        let s = Schedule::parse("0 2 * * 6", Some("Asia/Hong_Kong")).unwrap();
        assert_eq!(
            s.next_after(at("2026-11-27T12:00:00+08:00")),
            Some(at("2026-11-28T02:00:00+08:00"))
        );
        let every = Schedule::parse("*/15 * * * *", Some("UTC")).unwrap();
        assert_eq!(
            every.next_after(at("2026-11-28T10:07:10Z")),
            Some(at("2026-11-28T10:15:00Z"))
        );
        let names = Schedule::parse("30 4 1 jan,jul mon", Some("UTC")).unwrap();
        // 1 Jan 2027 is a Friday; Monday 4 Jan 2027 matches the weekday (ORed).
        assert_eq!(
            names.next_after(at("2026-12-31T00:00:00Z")),
            Some(at("2027-01-01T04:30:00Z"))
        );
        assert_eq!(
            names.next_after(at("2027-01-01T05:00:00Z")),
            Some(at("2027-01-04T04:30:00Z"))
        );
        // Europe/Berlin: 02:30 does not exist on 2026-03-29; the next day's does.
        let gap = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            gap.next_after(at("2026-03-29T00:00:00+01:00")),
            Some(at("2026-03-30T02:30:00+02:00"))
        );
    }

    #[test]
    fn bad_specs_explain() {
        for (spec, zone, needle) in [
            ("Sat 02:00", None, "time zone"),
            ("Caturday 02:00 UTC", None, "Caturday"),
            ("0 2 * * 6", None, "second argument"),
            ("61 2 * * *", Some("UTC"), "minute"),
            ("0 2 * *", Some("UTC"), "five"),
            ("0 2 * * *", Some("Mars/Base"), "Mars/Base"),
        ] {
            let e = Schedule::parse(spec, zone).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn discovered_from_top_level_literals_only() {
        let engine = rhai::Engine::new_raw();
        let ast = engine
            .compile(
                "schedule(\"Sat 02:00 UTC\");\nfn f() { schedule(\"Sun 03:00 UTC\"); }\nif false { schedule(\"Mon 04:00 UTC\"); }\nschedule(\"0 1 * * *\", \"UTC\");",
            )
            .unwrap();
        let found = discover(&ast, "p.rhai").unwrap();
        let specs: Vec<&str> = found.iter().map(|s| s.spec()).collect();
        assert_eq!(specs, ["Sat 02:00 UTC", "0 1 * * * UTC"]);

        let ast = engine
            .compile("let x = \"Sat 02:00 UTC\";\n  schedule(x);")
            .unwrap();
        let e = discover(&ast, "p.rhai").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        assert!(e
            .to_string()
            .starts_with("p.rhai:2:3: schedule() takes string literals"));
    }
}
