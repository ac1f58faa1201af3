//! The Markdown report. Every value from the journal is escaped: host output lands
//! in fences longer than any backtick run it contains, other text has Markdown and
//! HTML punctuation escaped, so a report never renders markup a host sent.

use std::fmt::Write;

use serde_json::Value;

use super::model::{fmt_ms, lines_or_dash, step_result, HostReport, RunReport};
use crate::journal::entry::HostStatus;

/// Text for a Markdown paragraph or table cell.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '|' => out.push_str("\\|"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An inline code span that holds `s` whatever it contains.
pub fn code(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ").replace('|', "\\|");
    let longest = longest_run(&s, '`');
    if longest == 0 {
        return format!("`{s}`");
    }
    let fence = "`".repeat(longest + 1);
    format!("{fence} {s} {fence}")
}

/// A fenced block that holds `s` verbatim.
pub fn fenced(s: &str) -> String {
    let fence = "`".repeat(longest_run(s, '`').max(2) + 1);
    format!("{fence}text\n{}\n{fence}\n", s.trim_end())
}

fn longest_run(s: &str, c: char) -> usize {
    let (mut best, mut cur) = (0, 0);
    for ch in s.chars() {
        cur = if ch == c { cur + 1 } else { 0 };
        best = best.max(cur);
    }
    best
}

fn or_dash(v: Option<&str>) -> String {
    v.map(esc).unwrap_or_else(|| "—".into())
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render(r: &RunReport) -> String {
    let mut o = String::new();
    let run = &r.run;
    let _ = writeln!(o, "# Patch report: run {}\n", code(&run.id));
    let _ = writeln!(o, "## Summary\n");
    let _ = writeln!(o, "- **Operator:** {}", or_dash(run.operator.as_deref()));
    let _ = writeln!(o, "- **Started:** {}", or_dash(run.started.as_deref()));
    match &run.ended {
        Some(t) => {
            let _ = writeln!(o, "- **Ended:** {}", esc(t));
        }
        None => {
            let _ = writeln!(
                o,
                "- **Ended:** not closed (still running, stopped or crashed); last record {}",
                or_dash(run.last_record.as_deref())
            );
        }
    }
    match &run.window {
        Some(w) => {
            let _ = writeln!(
                o,
                "- **Window:** {} ({}), {} to {}, buffer {}",
                or_dash(w.spec.as_deref()),
                or_dash(w.zone.as_deref()),
                or_dash(w.start.as_deref()),
                or_dash(w.end.as_deref()),
                or_dash(w.buffer.as_deref())
            );
        }
        None => {
            let _ = writeln!(o, "- **Window:** none recorded");
        }
    }
    let _ = writeln!(
        o,
        "- **Playbook:** {} sha256 {}",
        run.playbook
            .as_deref()
            .map(code)
            .unwrap_or_else(|| "—".into()),
        run.playbook_sha256
            .as_deref()
            .map(code)
            .unwrap_or_else(|| "—".into())
    );
    for (path, sha) in &run.modules {
        let _ = writeln!(o, "  - module {} sha256 {}", code(path), code(sha));
    }
    let _ = writeln!(
        o,
        "- **Inventory sha256:** {}",
        run.inventory_sha256
            .as_deref()
            .map(code)
            .unwrap_or_else(|| "—".into())
    );
    let _ = writeln!(
        o,
        "- **patchbook:** {}",
        or_dash(run.patchbook_version.as_deref())
    );
    if !run.policy.is_null() {
        let _ = writeln!(o, "- **Policy:** {}", code(&run.policy.to_string()));
    }
    if let Some(stop) = &run.stop {
        let _ = writeln!(o, "- **Stop:** {}", code(&stop.to_string()));
    }
    if run.open_intents > 0 {
        let _ = writeln!(
            o,
            "- **Open intents:** {} step(s) started with no recorded outcome; `patchbook run --resume {}` checks those hosts first",
            run.open_intents,
            esc(&run.id)
        );
    }
    for a in &run.alerts {
        let _ = writeln!(o, "- **Alert** {}: {}", esc(&a.ts), esc(&a.text));
    }

    let c = &r.counts;
    let _ = writeln!(o, "\n## Counts\n");
    let _ = writeln!(
        o,
        "| targeted | done | failed | unreachable | reverted | rolled back | rollback failed | in progress | unknown | pending |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        o,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.targeted,
        c.done,
        c.failed,
        c.unreachable,
        c.reverted,
        c.rolled_back,
        c.rollback_failed,
        c.in_progress,
        c.unknown,
        c.pending
    );
    if !r.groups.is_empty() {
        let _ = writeln!(o, "\n### Per group\n");
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
        let _ = writeln!(o, "| group | {} |", keys.join(" | ").replace('_', " "));
        let _ = writeln!(o, "|---|{}", "---:|".repeat(keys.len()));
        for (g, counts) in &r.groups {
            let cells: Vec<String> = keys
                .iter()
                .map(|k| counts.get(*k).map(value_text).unwrap_or_default())
                .collect();
            let _ = writeln!(o, "| {} | {} |", esc(g), cells.join(" | "));
        }
    }

    if !r.waves.is_empty() {
        let _ = writeln!(o, "\n## Waves\n");
        let _ = writeln!(o, "| wave | started | hosts |");
        let _ = writeln!(o, "|---|---|---:|");
        for w in &r.waves {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                esc(&w.label),
                or_dash(w.started.as_deref()),
                w.hosts.len()
            );
        }
    }

    let _ = writeln!(o, "\n## Hosts\n");
    let _ = writeln!(
        o,
        "| host | wave | outcome | before | after | steps | time | backups |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---:|---|");
    for h in &r.hosts {
        host_row(&mut o, h);
    }

    let failures: Vec<&HostReport> = r
        .hosts
        .iter()
        .filter(|h| h.error_output.is_some() || h.rollback_error.is_some())
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(o, "\n## Failures\n");
        for h in failures {
            let _ = writeln!(o, "### {} ({})\n", esc(&h.name), esc(&h.status_text()));
            if let Some(out) = &h.error_output {
                o.push_str(&fenced(out));
            }
            if let Some(e) = &h.rollback_error {
                let _ = writeln!(o, "\nRollback failed:\n");
                o.push_str(&fenced(e));
            }
            o.push('\n');
        }
    }

    let _ = writeln!(o, "\n## Host details\n");
    for h in &r.hosts {
        host_details(&mut o, h);
    }

    test_section(&mut o, r);

    if !r.artifacts.is_empty() {
        let _ = writeln!(o, "\n## Artifact checks\n");
        let _ = writeln!(o, "| time | url | check | result | detail |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        for a in &r.artifacts {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                esc(&a.ts),
                or_dash(a.url.as_deref()),
                esc(&a.what),
                if a.ok { "ok" } else { "FAILED" },
                esc(&a.detail)
            );
        }
    }

    if let Some(c) = &r.controller {
        let line = super::sparkline::blocks(&super::sparkline::series(&c.rss_kib));
        let _ = writeln!(o, "\n## Controller\n");
        let _ = writeln!(
            o,
            "CPU {:.2} s, peak memory {} MiB (resident `{}`), up to {} sockets and {} threads, {} KiB read and {} KiB written, over {} samples.",
            c.cpu_seconds,
            c.peak_rss_kib / 1024,
            line.trim_start_matches('|'),
            c.max_sockets,
            c.max_threads,
            c.read_bytes / 1024,
            c.written_bytes / 1024,
            c.samples
        );
        let _ = writeln!(
            o,
            "Network: {} KiB sent and {} KiB received over TCP, up to {} connections open.",
            c.bytes_sent / 1024,
            c.bytes_received / 1024,
            c.max_connections
        );
    }

    if !r.gates.is_empty() {
        let _ = writeln!(o, "\n## Gates between waves\n");
        let _ = writeln!(
            o,
            "| time | after wave | check | query | bounds | value | soaked | result | detail |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for g in &r.gates {
            let v = &g.verdict;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {:.0} s | {} | {} |",
                esc(&g.ts),
                v.after_wave,
                esc(&v.check),
                or_dash(v.query.as_deref()),
                or_dash(v.bounds.as_deref()),
                v.value.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                v.soaked_seconds,
                if v.passed { "passed" } else { "FAILED" },
                esc(&v.detail)
            );
        }
    }

    let _ = writeln!(o, "\n## Notifications\n");
    if r.notifications.is_empty() {
        let _ = writeln!(o, "None recorded.");
    } else {
        let _ = writeln!(
            o,
            "| time | event | channel | to | result | attempts | message | error |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---:|---|---|");
        for n in &r.notifications {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                esc(&n.ts),
                or_dash(n.event.as_deref()),
                esc(&n.channel),
                esc(&n.to),
                if n.ok { "sent" } else { "FAILED" },
                n.attempts.map(|a| a.to_string()).unwrap_or_default(),
                or_dash(n.message.as_deref()),
                or_dash(n.error.as_deref())
            );
        }
    }

    if !r.problems.is_empty() {
        let _ = writeln!(o, "\n## Unreadable records\n");
        for p in &r.problems {
            let _ = writeln!(o, "- {}", esc(p));
        }
    }
    o
}

fn host_row(o: &mut String, h: &HostReport) {
    let version = |package: &str, v: Option<&str>| {
        format!(
            "{} {}",
            esc(package),
            v.map(esc).unwrap_or_else(|| "(none)".into())
        )
    };
    let steps = lines_or_dash(h.steps.iter().map(|s| {
        let (_, result) = step_result(s.ok);
        let time = s.duration_ms.map(fmt_ms).unwrap_or_else(|| "?".into());
        format!("{} {result} {time}", esc(&s.step))
    }));
    let backups = lines_or_dash(
        h.backups
            .iter()
            .map(|b| format!("{} sha256 {}", esc(&b.id), code(&b.sha256))),
    );
    let _ = writeln!(
        o,
        "| {} | {} | {} | {} | {} | {} | {} | {} |",
        esc(&h.name),
        esc(&h.wave_text()),
        esc(&h.status_text()),
        h.package_lines(|p| p.before.as_deref(), version),
        h.package_lines(|p| p.after.as_deref(), version),
        steps,
        h.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into()),
        backups,
    );
}

fn host_details(o: &mut String, h: &HostReport) {
    let _ = writeln!(o, "### {}\n", esc(&h.name));
    let _ = writeln!(
        o,
        "- **Outcome:** {}{}",
        esc(&h.status_text()),
        h.reason
            .as_deref()
            .map(|r| format!(": {}", esc(r)))
            .unwrap_or_default()
    );
    if h.outcome == HostStatus::Pending {
        let _ = writeln!(o, "- never started\n");
        return;
    }
    let _ = writeln!(
        o,
        "- **Started:** {}; **ended:** {}; **took:** {}",
        or_dash(h.started.as_deref()),
        or_dash(h.ended.as_deref()),
        h.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into())
    );
    if let Some(m) = &h.monitor {
        monitor(o, m);
    }
    for p in &h.packages {
        let _ = writeln!(
            o,
            "- **Package** {}: before {}, target {}, after {}",
            code(&p.package),
            or_dash(p.before.as_deref()),
            or_dash(p.target.as_deref()),
            or_dash(p.after.as_deref())
        );
    }
    if !h.steps.is_empty() {
        let _ = writeln!(o, "- **Steps:**");
        for s in &h.steps {
            let result = match s.ok {
                Some(true) => "ok".to_string(),
                Some(false) => "FAILED".to_string(),
                None => "OPEN: intent recorded, no outcome".to_string(),
            };
            let _ = writeln!(
                o,
                "  - #{} {}{}: {} — {}, {}{}",
                s.id,
                esc(&s.step),
                s.undoes
                    .map(|u| format!(" (undoes #{u})"))
                    .unwrap_or_default(),
                esc(&s.detail),
                result,
                s.duration_ms.map(fmt_ms).unwrap_or_else(|| "?".into()),
                s.error
                    .as_deref()
                    .map(|e| format!(": {}", esc(&crate::primitives::cut(e, 200))))
                    .unwrap_or_default()
            );
        }
    }
    for b in &h.backups {
        let _ = writeln!(
            o,
            "- **Backup** {}: {} sha256 {}{} of {}{}",
            esc(&b.id),
            code(&b.archive),
            code(&b.sha256),
            b.size.map(|s| format!(", {s} bytes")).unwrap_or_default(),
            b.paths
                .iter()
                .map(|p| code(p))
                .collect::<Vec<_>>()
                .join(", "),
            if b.missing.is_empty() {
                String::new()
            } else {
                format!(
                    " (missing on the host: {})",
                    b.missing
                        .iter()
                        .map(|p| code(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    for v in &h.verifications {
        let _ = writeln!(
            o,
            "- **Verify** {}: expected {}, found {} — {}",
            code(&v.package),
            or_dash(v.expected.as_deref()),
            or_dash(v.found.as_deref()),
            if v.ok { "ok" } else { "FAILED" }
        );
    }
    for c in &h.health {
        let _ = writeln!(
            o,
            "- **Health** {}: {}{}",
            code(&c.command),
            if c.ok { "ok" } else { "FAILED" },
            c.attempts
                .map(|a| format!(" after {a} attempt(s)"))
                .unwrap_or_default()
        );
    }
    if let Some(rb) = &h.rollback {
        let _ = writeln!(
            o,
            "- **Rollback:** {}{}{}{}",
            match rb.ok {
                Some(true) => "done",
                Some(false) => "FAILED",
                None => "partial",
            },
            rb.cause
                .as_deref()
                .map(|c| format!(" ({})", esc(c)))
                .unwrap_or_default(),
            rb.ts
                .as_deref()
                .map(|t| format!(" at {}", esc(t)))
                .unwrap_or_default(),
            if rb.undone.is_empty() {
                String::new()
            } else {
                format!(
                    "; undone: {}",
                    rb.undone
                        .iter()
                        .map(|u| esc(u))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        );
    }
    o.push('\n');
}

fn test_section(o: &mut String, r: &RunReport) {
    let t = &r.tests;
    let _ = writeln!(o, "\n## Staging test report\n");
    if t.cases.is_empty() {
        let _ = writeln!(o, "No staging checks recorded in this run.");
        return;
    }
    let _ = writeln!(
        o,
        "- **Patch version:** {}",
        if t.patch_versions.is_empty() {
            "—".to_string()
        } else {
            t.patch_versions
                .iter()
                .map(|v| esc(v))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(
        o,
        "- **Cases:** {} — {} passed, {} failed\n",
        t.total, t.passed, t.failed
    );
    let _ = writeln!(
        o,
        "| case | kind | result | time | before | after | degradation | threshold | issues |"
    );
    let _ = writeln!(o, "|---|---|---|---:|---:|---:|---:|---:|---|");
    for c in &t.cases {
        let case = &c.case;
        let [before, after, change, threshold] = c.metric_cells().map(|t| esc(&t));
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            esc(&case.name),
            case.kind,
            if case.ok { "pass" } else { "FAIL" },
            fmt_ms(case.duration_ms),
            before,
            after,
            change,
            threshold,
            case.error.as_deref().map(esc).unwrap_or_default()
        );
    }
}

/// A host's `monitor()` verdict and one sparkline per metric (baseline `|` after).
fn monitor(o: &mut String, m: &crate::report::model::HostMonitor) {
    let verdict = match &m.verdict {
        Some(v) if v.ok => "passed".to_string(),
        Some(v) => format!("REGRESSED: {}", esc(&v.regressions.join("; "))),
        None => "no verdict (the window did not finish)".to_string(),
    };
    let _ = writeln!(o, "- **Monitor:** {verdict}");
    for (metric, points) in &m.series {
        let line = super::sparkline::blocks(points);
        let (base, after) = m
            .verdict
            .as_ref()
            .map(|v| (v.baseline.get(metric), v.after.get(metric)))
            .unwrap_or((None, None));
        let num = |x: Option<&f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            o,
            "  - `{}` {} baseline {}, after {}",
            esc(metric),
            line,
            num(base),
            num(after)
        );
    }
}
