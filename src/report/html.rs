//! The HTML report: one self-contained file (inline CSS, inline SVG, no scripts, no
//! network assets) that opens anywhere. Every value from the journal goes through
//! [`esc`]: host output can contain markup and must show as text.

use std::fmt::Write;

use serde_json::Value;

use super::model::{fmt_ms, lines_or_dash, step_result, HostReport, RunReport};
use super::timeline;
use crate::journal::entry::HostStatus;

/// Text safe in HTML element content and in quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(v: Option<&str>) -> String {
    v.map(esc).unwrap_or_else(|| "—".into())
}

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px; }
pre.output { background: #1e1e1e; color: #f1f1f1; padding: 8px 10px; white-space: pre-wrap; word-break: break-all; max-height: 320px; overflow: auto; }
.status { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff; font-size: 12px; }
.status-done { background: #2e8b57; } .status-failed { background: #c0392b; } .status-unreachable { background: #8e44ad; }
.status-rolled-back { background: #e67e22; } .status-in-progress { background: #2f80ed; }
.status-unknown { background: #7f8c8d; } .status-pending { background: #9a9a9a; }
.ok { color: #2e8b57; } .bad { color: #c0392b; font-weight: 600; } .open { color: #2f80ed; font-weight: 600; }
.alert { background: #fff4e5; border-left: 4px solid #e67e22; padding: 6px 10px; margin: 6px 0; }
svg.timeline { border: 1px solid #ddd; background: #fff; max-width: 100%; height: auto; }
svg .host-label, svg .axis-label, svg .legend-label { font: 11px system-ui, sans-serif; fill: #333; }
svg .wave-label { font: bold 11px system-ui, sans-serif; fill: #333; }
table.hosts td:first-child, td.num, .step, .status { white-space: nowrap; }
details { margin: 4px 0; } summary { cursor: pointer; }
"#;

pub fn render(r: &RunReport) -> String {
    let mut o = String::new();
    let run = &r.run;
    let _ = writeln!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>Patch report: run {}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        esc(&run.id)
    );
    let _ = writeln!(
        o,
        "<h1>Patch report: run <code>{}</code></h1>",
        esc(&run.id)
    );

    let _ = writeln!(
        o,
        "<section id=\"summary\"><h2>Summary</h2><dl class=\"summary\">"
    );
    let mut dt = |k: &str, v: String| {
        let _ = writeln!(o, "<dt>{k}</dt><dd>{v}</dd>");
    };
    dt("Operator", opt(run.operator.as_deref()));
    dt("Started", opt(run.started.as_deref()));
    dt(
        "Ended",
        match &run.ended {
            Some(t) => esc(t),
            None => format!(
                "<span class=\"open\">not closed</span> (still running, stopped or crashed); last record {}",
                opt(run.last_record.as_deref())
            ),
        },
    );
    dt(
        "Window",
        match &run.window {
            Some(w) => format!(
                "<code>{}</code> ({}), {} to {}, buffer {}",
                opt(w.spec.as_deref()),
                opt(w.zone.as_deref()),
                opt(w.start.as_deref()),
                opt(w.end.as_deref()),
                opt(w.buffer.as_deref())
            ),
            None => "none recorded".into(),
        },
    );
    dt(
        "Playbook",
        format!(
            "<code>{}</code> sha256 <code>{}</code>",
            opt(run.playbook.as_deref()),
            opt(run.playbook_sha256.as_deref())
        ),
    );
    if !run.modules.is_empty() {
        dt(
            "Modules",
            run.modules
                .iter()
                .map(|(p, s)| format!("<code>{}</code> sha256 <code>{}</code>", esc(p), esc(s)))
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    dt(
        "Inventory sha256",
        format!("<code>{}</code>", opt(run.inventory_sha256.as_deref())),
    );
    dt("patchbook", opt(run.patchbook_version.as_deref()));
    if !run.policy.is_null() {
        dt(
            "Policy",
            format!("<code>{}</code>", esc(&run.policy.to_string())),
        );
    }
    if let Some(stop) = &run.stop {
        dt("Stop", format!("<code>{}</code>", esc(&stop.to_string())));
    }
    if run.open_intents > 0 {
        dt(
            "Open intents",
            format!(
                "<span class=\"open\">{}</span> step(s) started with no recorded outcome; <code>patchbook run --resume {}</code> checks those hosts first",
                run.open_intents,
                esc(&run.id)
            ),
        );
    }
    let _ = writeln!(o, "</dl>");
    for a in &run.alerts {
        let _ = writeln!(o, "<p class=\"alert\">{}: {}</p>", esc(&a.ts), esc(&a.text));
    }
    let _ = writeln!(o, "</section>");

    counts(&mut o, r);

    let _ = writeln!(
        o,
        "<section id=\"timeline\"><h2>Wave timeline</h2>\n{}</section>",
        timeline::render(r)
    );

    let _ = writeln!(o, "<section id=\"hosts\"><h2>Hosts</h2>");
    let _ = writeln!(
        o,
        "<table class=\"hosts\"><thead><tr><th>Host</th><th>Wave</th><th>Outcome</th><th>Before</th><th>After</th><th>Steps</th><th class=\"num\">Time</th><th>Backups</th></tr></thead><tbody>"
    );
    for h in &r.hosts {
        host_row(&mut o, h);
    }
    let _ = writeln!(o, "</tbody></table></section>");

    let failures: Vec<&HostReport> = r
        .hosts
        .iter()
        .filter(|h| h.error_output.is_some() || h.rollback_error.is_some())
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(o, "<section id=\"failures\"><h2>Failures</h2>");
        for h in failures {
            let _ = writeln!(
                o,
                "<h3 class=\"failure\">{} <span class=\"status status-{}\">{}</span></h3>",
                esc(&h.name),
                h.class(),
                esc(&h.status_text())
            );
            if let Some(out) = &h.error_output {
                let _ = writeln!(o, "<pre class=\"output\">{}</pre>", esc(out));
            }
            if let Some(e) = &h.rollback_error {
                let _ = writeln!(
                    o,
                    "<p>Rollback failed:</p><pre class=\"output\">{}</pre>",
                    esc(e)
                );
            }
        }
        let _ = writeln!(o, "</section>");
    }

    let _ = writeln!(o, "<section id=\"details\"><h2>Host details</h2>");
    for h in &r.hosts {
        host_details(&mut o, h);
    }
    let _ = writeln!(o, "</section>");

    tests(&mut o, r);

    if !r.artifacts.is_empty() {
        let _ = writeln!(
            o,
            "<section id=\"artifacts\"><h2>Artifact checks</h2><table><thead><tr><th>Time</th><th>URL</th><th>Check</th><th>Result</th><th>Detail</th></tr></thead><tbody>"
        );
        for a in &r.artifacts {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&a.ts),
                opt(a.url.as_deref()),
                esc(&a.what),
                ok_cell(a.ok, "ok", "FAILED"),
                esc(&a.detail)
            );
        }
        let _ = writeln!(o, "</tbody></table></section>");
    }

    if let Some(c) = &r.controller {
        let _ = writeln!(
            o,
            "<section id=\"controller\"><h2>Controller</h2><p>CPU <span class=\"controller-cpu\">{:.2}</span> s, peak memory {} MiB {}, up to {} sockets and {} threads, {} KiB read and {} KiB written, over {} samples.</p>",
            c.cpu_seconds,
            c.peak_rss_kib / 1024,
            super::sparkline::svg(&super::sparkline::series(&c.rss_kib)),
            c.max_sockets,
            c.max_threads,
            c.read_bytes / 1024,
            c.written_bytes / 1024,
            c.samples
        );
        let _ = writeln!(
            o,
            "<p>Network: <span class=\"controller-sent\">{}</span> KiB sent and <span class=\"controller-received\">{}</span> KiB received over TCP, up to <span class=\"controller-connections\">{}</span> connections open.</p></section>",
            c.bytes_sent / 1024,
            c.bytes_received / 1024,
            c.max_connections
        );
    }

    if !r.gates.is_empty() {
        let _ = writeln!(
            o,
            "<section id=\"gates\"><h2>Gates between waves</h2><table><thead><tr><th>Time</th><th>After wave</th><th>Check</th><th>Query</th><th>Bounds</th><th class=\"num\">Value</th><th class=\"num\">Soaked</th><th>Result</th><th>Detail</th></tr></thead><tbody>"
        );
        for g in &r.gates {
            let v = &g.verdict;
            let _ = writeln!(
                o,
                "<tr class=\"gate\"><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.0} s</td><td>{}</td><td>{}</td></tr>",
                esc(&g.ts),
                v.after_wave,
                esc(&v.check),
                opt(v.query.as_deref()),
                opt(v.bounds.as_deref()),
                v.value.map(|x| x.to_string()).unwrap_or_else(|| "—".into()),
                v.soaked_seconds,
                ok_cell(v.passed, "passed", "FAILED"),
                esc(&v.detail)
            );
        }
        let _ = writeln!(o, "</tbody></table></section>");
    }

    let _ = writeln!(o, "<section id=\"notifications\"><h2>Notifications</h2>");
    if r.notifications.is_empty() {
        let _ = writeln!(o, "<p>None recorded.</p>");
    } else {
        let _ = writeln!(
            o,
            "<table><thead><tr><th>Time</th><th>Event</th><th>Channel</th><th>To</th><th>Result</th><th class=\"num\">Attempts</th><th>Message</th><th>Error</th></tr></thead><tbody>"
        );
        for n in &r.notifications {
            let _ = writeln!(
                o,
                "<tr class=\"notification\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.ts),
                opt(n.event.as_deref()),
                esc(&n.channel),
                esc(&n.to),
                ok_cell(n.ok, "sent", "FAILED"),
                n.attempts.map(|a| a.to_string()).unwrap_or_default(),
                opt(n.message.as_deref()),
                opt(n.error.as_deref())
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    let _ = writeln!(o, "</section>");

    if !r.problems.is_empty() {
        let _ = writeln!(
            o,
            "<section id=\"problems\"><h2>Unreadable records</h2><ul>"
        );
        for p in &r.problems {
            let _ = writeln!(o, "<li>{}</li>", esc(p));
        }
        let _ = writeln!(o, "</ul></section>");
    }
    let _ = writeln!(o, "</body>\n</html>");
    o
}

fn ok_cell(ok: bool, yes: &str, no: &str) -> String {
    if ok {
        format!("<span class=\"ok\">{yes}</span>")
    } else {
        format!("<span class=\"bad\">{no}</span>")
    }
}

fn counts(o: &mut String, r: &RunReport) {
    let c = &r.counts;
    let cells = [
        ("targeted", c.targeted),
        ("done", c.done),
        ("failed", c.failed),
        ("unreachable", c.unreachable),
        ("reverted", c.reverted),
        ("rolled back", c.rolled_back),
        ("rollback failed", c.rollback_failed),
        ("in progress", c.in_progress),
        ("unknown", c.unknown),
        ("pending", c.pending),
    ];
    let _ = writeln!(
        o,
        "<section id=\"counts\"><h2>Counts</h2><table class=\"counts\"><thead><tr>{}</tr></thead><tbody><tr>{}</tr></tbody></table>",
        cells
            .iter()
            .map(|(k, _)| format!("<th class=\"num\">{k}</th>"))
            .collect::<String>(),
        cells
            .iter()
            .map(|(k, v)| format!("<td class=\"num\" data-count=\"{}\">{v}</td>", k.replace(' ', "_")))
            .collect::<String>()
    );
    if !r.groups.is_empty() {
        let keys = [
            "targeted",
            "done",
            "failed",
            "unreachable",
            "reverted",
            "rolled_back",
            "rollback_failed",
            "in_progress",
            "unknown",
            "pending",
        ];
        let _ = writeln!(
            o,
            "<h3>Per group</h3><table class=\"groups\"><thead><tr><th>Group</th>{}</tr></thead><tbody>",
            keys.iter()
                .map(|k| format!("<th class=\"num\">{}</th>", k.replace('_', " ")))
                .collect::<String>()
        );
        for (g, v) in &r.groups {
            let _ = writeln!(
                o,
                "<tr><td>{}</td>{}</tr>",
                esc(g),
                keys.iter()
                    .map(|k| format!(
                        "<td class=\"num\">{}</td>",
                        esc(&v.get(*k).map(value_text).unwrap_or_default())
                    ))
                    .collect::<String>()
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    let _ = writeln!(o, "</section>");
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn host_row(o: &mut String, h: &HostReport) {
    let version = |package: &str, v: Option<&str>| {
        format!(
            "{} <code>{}</code>",
            esc(package),
            v.map(esc).unwrap_or_else(|| "(none)".into())
        )
    };
    let steps = lines_or_dash(h.steps.iter().map(|s| {
        let (class, result) = step_result(s.ok);
        format!(
            "<span class=\"step\">{} <span class=\"{class}\">{result}</span> {}</span>",
            esc(&s.step),
            esc(&s.duration_ms.map(fmt_ms).unwrap_or_else(|| "?".into()))
        )
    }));
    let backups = lines_or_dash(h.backups.iter().map(|b| {
        format!(
            "{} <code title=\"sha256\">{}</code>",
            esc(&b.id),
            esc(&b.sha256)
        )
    }));
    let _ = writeln!(
        o,
        "<tr class=\"host-row outcome-{}\" data-host=\"{}\"><td>{}</td><td>{}</td><td><span class=\"status status-{}\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
        h.class(),
        esc(&h.name),
        esc(&h.name),
        esc(&h.wave_text()),
        h.class(),
        esc(&h.status_text()),
        h.package_lines(|p| p.before.as_deref(), version),
        h.package_lines(|p| p.after.as_deref(), version),
        steps,
        esc(&h.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into())),
        backups
    );
}

fn host_details(o: &mut String, h: &HostReport) {
    let _ = writeln!(
        o,
        "<details class=\"host-detail\"><summary>{} <span class=\"status status-{}\">{}</span>{}</summary>",
        esc(&h.name),
        h.class(),
        esc(&h.status_text()),
        h.reason
            .as_deref()
            .map(|r| format!(" {}", esc(&crate::primitives::cut(r, 160))))
            .unwrap_or_default()
    );
    if h.outcome == HostStatus::Pending {
        let _ = writeln!(o, "<p>Never started.</p></details>");
        return;
    }
    let _ = writeln!(
        o,
        "<p>Started {}, ended {}, took {}.</p>",
        opt(h.started.as_deref()),
        opt(h.ended.as_deref()),
        esc(&h.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into()))
    );
    if let Some(m) = &h.monitor {
        monitor(o, m);
    }
    if !h.packages.is_empty() {
        let _ = writeln!(
            o,
            "<table><thead><tr><th>Package</th><th>Before</th><th>Target</th><th>After</th></tr></thead><tbody>"
        );
        for p in &h.packages {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&p.package),
                opt(p.before.as_deref()),
                opt(p.target.as_deref()),
                opt(p.after.as_deref())
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    if !h.steps.is_empty() {
        let _ = writeln!(
            o,
            "<table class=\"steps\"><thead><tr><th>#</th><th>Step</th><th>What</th><th>Result</th><th class=\"num\">Duration</th><th>Error</th></tr></thead><tbody>"
        );
        for s in &h.steps {
            let result = match s.ok {
                Some(true) => ok_cell(true, "ok", ""),
                Some(false) => ok_cell(false, "", "FAILED"),
                None => "<span class=\"open\">OPEN: intent recorded, no outcome</span>".into(),
            };
            let _ = writeln!(
                o,
                "<tr class=\"step-row\"><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                s.id,
                esc(&s.step),
                s.undoes.map(|u| format!(" (undoes #{u})")).unwrap_or_default(),
                esc(&s.detail),
                result,
                esc(&s.duration_ms.map(fmt_ms).unwrap_or_else(|| "?".into())),
                s.error
                    .as_deref()
                    .map(|e| esc(&crate::primitives::cut(e, 300)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    if !h.backups.is_empty() {
        let _ = writeln!(
            o,
            "<table class=\"backups\"><thead><tr><th>Backup</th><th>Archive</th><th>SHA-256</th><th class=\"num\">Bytes</th><th>Paths</th><th>Missing</th></tr></thead><tbody>"
        );
        for b in &h.backups {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&b.id),
                esc(&b.archive),
                esc(&b.sha256),
                b.size.map(|s| s.to_string()).unwrap_or_default(),
                esc(&b.paths.join(", ")),
                esc(&b.missing.join(", "))
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    for v in &h.verifications {
        let _ = writeln!(
            o,
            "<p>Verify <code>{}</code>: expected {}, found {} — {}</p>",
            esc(&v.package),
            opt(v.expected.as_deref()),
            opt(v.found.as_deref()),
            ok_cell(v.ok, "ok", "FAILED")
        );
    }
    for c in &h.health {
        let _ = writeln!(
            o,
            "<p>Health <code>{}</code>: {}{}</p>",
            esc(&c.command),
            ok_cell(c.ok, "ok", "FAILED"),
            c.attempts
                .map(|a| format!(" after {a} attempt(s)"))
                .unwrap_or_default()
        );
    }
    if let Some(rb) = &h.rollback {
        let _ = writeln!(
            o,
            "<p>Rollback: {}{}{}</p>",
            match rb.ok {
                Some(true) => ok_cell(true, "done", ""),
                Some(false) => ok_cell(false, "", "FAILED"),
                None => "partial".into(),
            },
            rb.cause
                .as_deref()
                .map(|c| format!(" ({})", esc(c)))
                .unwrap_or_default(),
            rb.ts
                .as_deref()
                .map(|t| format!(" at {}", esc(t)))
                .unwrap_or_default()
        );
        if !rb.undone.is_empty() {
            let _ = writeln!(
                o,
                "<ul>{}</ul>",
                rb.undone
                    .iter()
                    .map(|u| format!("<li>{}</li>", esc(u)))
                    .collect::<String>()
            );
        }
    }
    let _ = writeln!(o, "</details>");
}

fn tests(o: &mut String, r: &RunReport) {
    let t = &r.tests;
    let _ = writeln!(o, "<section id=\"tests\"><h2>Staging test report</h2>");
    if t.cases.is_empty() {
        let _ = writeln!(
            o,
            "<p>No staging checks recorded in this run.</p></section>"
        );
        return;
    }
    let _ = writeln!(
        o,
        "<p>Patch version: <strong>{}</strong>. {} case(s): <span class=\"ok\">{} passed</span>, <span class=\"{}\">{} failed</span>.</p>",
        if t.patch_versions.is_empty() {
            "—".into()
        } else {
            esc(&t.patch_versions.join(", "))
        },
        t.total,
        t.passed,
        if t.failed > 0 { "bad" } else { "ok" },
        t.failed
    );
    let _ = writeln!(
        o,
        "<table class=\"tests\"><thead><tr><th>Case</th><th>Kind</th><th>Result</th><th class=\"num\">Time</th><th class=\"num\">Before</th><th class=\"num\">After</th><th class=\"num\">Degradation</th><th class=\"num\">Threshold</th><th>Issues</th></tr></thead><tbody>"
    );
    for c in &t.cases {
        let case = &c.case;
        let [before, after, change, threshold] = c.metric_cells().map(|t| esc(&t));
        let _ = writeln!(
            o,
            "<tr class=\"test-case\"><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&case.name),
            case.kind,
            ok_cell(case.ok, "pass", "FAIL"),
            esc(&fmt_ms(case.duration_ms)),
            before,
            after,
            change,
            threshold,
            case.error.as_deref().map(esc).unwrap_or_default()
        );
    }
    let _ = writeln!(o, "</tbody></table></section>");
}

/// A host's `monitor()` verdict and a table of its metrics, each with an SVG
/// sparkline (a dashed line marks the change).
fn monitor(o: &mut String, m: &crate::report::model::HostMonitor) {
    let (ok, text) = match &m.verdict {
        Some(v) if v.ok => (true, "monitor passed".to_string()),
        Some(v) => (
            false,
            format!("monitor: REGRESSED: {}", v.regressions.join("; ")),
        ),
        None => (
            false,
            "monitor: no verdict (the window did not finish)".to_string(),
        ),
    };
    let _ = writeln!(
        o,
        "<p class=\"monitor-verdict\">{}</p><table class=\"monitor\"><thead><tr><th>Metric</th><th>Samples</th><th class=\"num\">Baseline</th><th class=\"num\">After</th><th>Threshold</th></tr></thead><tbody>",
        ok_cell(ok, &text, &text)
    );
    for (metric, points) in &m.series {
        let v = m.verdict.as_ref();
        let num = |x: Option<&f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(metric),
            super::sparkline::svg(points),
            num(v.and_then(|v| v.baseline.get(metric))),
            num(v.and_then(|v| v.after.get(metric))),
            opt(v.and_then(|v| v.thresholds.get(metric)).map(String::as_str))
        );
    }
    let _ = writeln!(o, "</tbody></table>");
}
