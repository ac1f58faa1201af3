//! The wave timeline: an inline SVG with one row per host and time across, one bar
//! per host that started (from its `host_started` to its `host_done` or
//! `host_failed`, or to the run's last record while it has no end), coloured by
//! outcome, wave starts marked, and a legend. Hosts that never started get a
//! `pending` mark in their row, not a bar. Plain SVG, no script.

use std::fmt::Write;

use chrono::{DateTime, FixedOffset};

use super::html::esc;
use super::model::{fmt_ms, parse_ts, HostReport, RunReport};

const LABEL_W: f64 = 190.0;
const CHART_W: f64 = 960.0;
const PAD_R: f64 = 30.0;
const TOP: f64 = 46.0;
const ROW_H: f64 = 18.0;
const BAR_H: f64 = 12.0;
const BOTTOM: f64 = 70.0;

/// Outcome classes in legend order, with their colours.
pub const CLASSES: [(&str, &str, &str); 6] = [
    ("done", "done", "#2e8b57"),
    ("failed", "failed", "#c0392b"),
    ("rolled-back", "rolled back", "#e67e22"),
    ("in-progress", "in progress", "#2f80ed"),
    ("unknown", "unknown", "#7f8c8d"),
    ("pending", "pending", "#c8c8c8"),
];

pub fn colour(class: &str) -> &'static str {
    CLASSES
        .iter()
        .find(|(c, _, _)| *c == class)
        .map(|(_, _, colour)| *colour)
        .unwrap_or("#999999")
}

/// When a host's bar starts and ends.
type Span = (DateTime<FixedOffset>, DateTime<FixedOffset>);

pub fn render(r: &RunReport) -> String {
    let end_of_run = r
        .run
        .ended
        .as_deref()
        .or(r.run.last_record.as_deref())
        .and_then(parse_ts);
    let spans: Vec<(&HostReport, Option<Span>)> = r
        .hosts
        .iter()
        .map(|h| {
            let start = h.started.as_deref().and_then(parse_ts);
            let end = h.ended.as_deref().and_then(parse_ts).or(end_of_run);
            let span = match (start, end) {
                (Some(s), Some(e)) => Some((s, e.max(s))),
                (Some(s), None) => Some((s, s)),
                _ => None,
            };
            (h, span)
        })
        .collect();
    let wave_starts: Vec<DateTime<FixedOffset>> = r
        .waves
        .iter()
        .filter_map(|w| w.started.as_deref().and_then(parse_ts))
        .collect();
    let t0 = spans
        .iter()
        .filter_map(|(_, s)| s.map(|s| s.0))
        .chain(wave_starts.iter().copied())
        .min();
    let t1 = spans
        .iter()
        .filter_map(|(_, s)| s.map(|s| s.1))
        .chain(wave_starts.iter().copied())
        .chain(end_of_run)
        .max();
    let rows = r.hosts.len().max(1) as f64;
    let width = LABEL_W + CHART_W + PAD_R;
    let height = TOP + rows * ROW_H + BOTTOM;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="Wave timeline of run {}">"#,
        esc(&r.run.id)
    );
    let (Some(t0), Some(t1)) = (t0, t1) else {
        let _ = writeln!(
            o,
            r#"<text x="10" y="24" class="axis-label">No host started in this run.</text>"#
        );
        legend(&mut o, TOP + rows * ROW_H + 30.0);
        o.push_str("</svg>\n");
        return o;
    };
    let span_ms = ((t1 - t0).num_microseconds().unwrap_or(0) as f64 / 1000.0).max(1.0);
    let x = |t: DateTime<FixedOffset>| {
        let ms = (t - t0).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        LABEL_W + ms / span_ms * CHART_W
    };
    let chart_bottom = TOP + rows * ROW_H;

    // Time axis: six ticks, elapsed since the first start.
    let _ = writeln!(o, r#"<g class="axis">"#);
    for i in 0..=5 {
        let frac = f64::from(i) / 5.0;
        let tx = LABEL_W + frac * CHART_W;
        let _ = writeln!(
            o,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{chart_bottom}" stroke="#e3e3e3"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" class="axis-label">+{}</text>"##,
            chart_bottom + 14.0,
            esc(&fmt_ms(frac * span_ms))
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{LABEL_W}" y="{:.1}" class="axis-label">time from {} (UTC)</text>"#,
        chart_bottom + 28.0,
        esc(&t0.to_rfc3339())
    );
    let _ = writeln!(o, "</g>");

    // Row stripes and host names.
    for (i, (h, _)) in spans.iter().enumerate() {
        let y = TOP + i as f64 * ROW_H;
        if i % 2 == 1 {
            let _ = writeln!(
                o,
                r##"<rect x="0" y="{y}" width="{width}" height="{ROW_H}" fill="#f6f6f6"/>"##
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="host-label">{}</text>"#,
            LABEL_W - 8.0,
            y + ROW_H - 5.0,
            esc(&h.name)
        );
    }

    // Wave starts.
    for w in &r.waves {
        let Some(t) = w.started.as_deref().and_then(parse_ts) else {
            continue;
        };
        let wx = x(t);
        let _ = writeln!(
            o,
            r##"<g class="wave-boundary"><line x1="{wx:.1}" y1="{:.1}" x2="{wx:.1}" y2="{chart_bottom}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" class="wave-label">{}</text></g>"##,
            TOP - 14.0,
            wx + 3.0,
            TOP - 18.0 + if w.index % 2 == 1 { 10.0 } else { 0.0 },
            esc(&w.label)
        );
    }

    // One bar per host that started.
    for (i, (h, span)) in spans.iter().enumerate() {
        let y = TOP + i as f64 * ROW_H + (ROW_H - BAR_H) / 2.0;
        let class = h.class();
        match span {
            Some((s, e)) => {
                let bx = x(*s);
                let bw = (x(*e) - bx).max(2.0);
                let took = h
                    .duration_ms
                    .map(fmt_ms)
                    .unwrap_or_else(|| "no end recorded".into());
                let _ = writeln!(
                    o,
                    r#"<rect class="bar bar-{class}" data-host="{}" x="{bx:.1}" y="{y:.1}" width="{bw:.1}" height="{BAR_H}" rx="2" fill="{}"><title>{}: {}, {}</title></rect>"#,
                    esc(&h.name),
                    colour(class),
                    esc(&h.name),
                    esc(&h.status_text()),
                    esc(&took)
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    r##"<g class="pending-mark" data-host="{}"><rect x="{LABEL_W}" y="{y:.1}" width="6" height="{BAR_H}" fill="{}"/><text x="{:.1}" y="{:.1}" class="axis-label">{}</text></g>"##,
                    esc(&h.name),
                    colour(class),
                    LABEL_W + 10.0,
                    y + BAR_H - 2.0,
                    esc(h.outcome.as_str())
                );
            }
        }
    }
    legend(&mut o, chart_bottom + 44.0);
    o.push_str("</svg>\n");
    o
}

fn legend(o: &mut String, y: f64) {
    let _ = writeln!(o, r#"<g class="legend">"#);
    let mut lx = LABEL_W;
    for (class, label, fill) in CLASSES {
        let _ = writeln!(
            o,
            r#"<rect class="swatch swatch-{class}" x="{lx}" y="{:.1}" width="14" height="12" fill="{fill}"/><text x="{:.1}" y="{y:.1}" class="legend-label">{label}</text>"#,
            y - 10.0,
            lx + 19.0
        );
        lx += 120.0;
    }
    let _ = writeln!(
        o,
        r##"<line x1="{lx}" y1="{:.1}" x2="{lx}" y2="{:.1}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{y:.1}" class="legend-label">wave start</text>"##,
        y - 12.0,
        y + 2.0,
        lx + 6.0
    );
    let _ = writeln!(o, "</g>");
}
