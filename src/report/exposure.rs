//! Exposure and compliance views: the exposure plan (per CVE, per host, the no-fix
//! list apart) as a text table, JSON or HTML, and a run's compliance report built
//! from its `advisory.feed` and `advisory.evidence` records. Read-only like the
//! rest of the reports.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::html::esc;
use super::ReportError;
use crate::advisory::exposure::{CveSummary, Exposure, Finding, Verdict};
use crate::journal::entry::{AdvisoryFeed, EvidenceRecord};
use crate::journal::{Entry, Store};

/// How `exposure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExposureFormat {
    Table,
    Json,
    Html,
}

impl std::str::FromStr for ExposureFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "html" => Ok(Self::Html),
            _ => Err(format!(
                "`{s}` is not an exposure format; use table, json or html"
            )),
        }
    }
}

/// The JSON shape of `exposure --format json`.
#[derive(Serialize)]
struct ExposureView<'a> {
    feeds: &'a [crate::advisory::exposure::FeedRef],
    /// CVEs a fix exists for, most severe first.
    fixable: Vec<&'a CveSummary>,
    /// CVEs with no fix published yet.
    no_fix: Vec<&'a CveSummary>,
    hosts: Vec<HostView<'a>>,
}

#[derive(Serialize)]
struct HostView<'a> {
    #[serde(flatten)]
    summary: &'a crate::advisory::exposure::HostSummary,
    open: Vec<&'a crate::advisory::Finding>,
}

fn fixed_list(c: &CveSummary) -> String {
    c.fixed
        .iter()
        .map(|(p, v)| format!("{p} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn render_exposure(e: &Exposure, format: ExposureFormat) -> String {
    let cves = e.by_cve();
    let by_host = e.by_host();
    let (fixable, no_fix): (Vec<&CveSummary>, Vec<&CveSummary>) = cves
        .iter()
        .partition(|c| c.verdict == Verdict::VulnerableFixAvailable);
    match format {
        ExposureFormat::Json => {
            let view = ExposureView {
                feeds: &e.feeds,
                fixable,
                no_fix,
                hosts: e
                    .hosts
                    .iter()
                    .map(|h| HostView {
                        summary: h,
                        open: by_host.get(h.host.as_str()).cloned().unwrap_or_default(),
                    })
                    .collect(),
            };
            let mut s = serde_json::to_string_pretty(&view).unwrap_or_default();
            s.push('\n');
            s
        }
        ExposureFormat::Table => table(e, &by_host, &fixable, &no_fix),
        ExposureFormat::Html => html(e, &by_host, &fixable, &no_fix),
    }
}

/// The open findings per host, from [`Exposure::by_host`].
type ByHost<'a> = HashMap<&'a str, Vec<&'a Finding>>;

fn open_of<'a>(by_host: &'a ByHost<'_>, host: &str) -> impl Iterator<Item = &'a Finding> + 'a {
    by_host.get(host).into_iter().flatten().copied()
}

fn table(
    e: &Exposure,
    by_host: &ByHost<'_>,
    fixable: &[&CveSummary],
    no_fix: &[&CveSummary],
) -> String {
    let mut s = String::new();
    for f in &e.feeds {
        let _ = writeln!(s, "feed {} ({}) sha256 {}", f.source, f.format, f.sha256);
    }
    let _ = writeln!(s, "\nCVEs with a fix ({}):", fixable.len());
    let _ = writeln!(
        s,
        "  {:<18} {:<10} {:>5}  FIXED IN",
        "CVE", "SEVERITY", "HOSTS"
    );
    for c in fixable {
        let _ = writeln!(
            s,
            "  {:<18} {:<10} {:>5}  {}",
            c.cve,
            c.severity.as_str(),
            c.hosts.len(),
            fixed_list(c)
        );
    }
    let _ = writeln!(s, "\nCVEs with no fix yet ({}):", no_fix.len());
    for c in no_fix {
        let _ = writeln!(
            s,
            "  {:<18} {:<10} {:>5}  {}",
            c.cve,
            c.severity.as_str(),
            c.hosts.len(),
            c.hosts.join(" ")
        );
    }
    let _ = writeln!(s, "\nHosts:");
    let _ = writeln!(
        s,
        "  {:<20} {:<14} {:>7} {:>6}  OPEN CVES",
        "HOST", "RELEASE", "FIXABLE", "NO-FIX"
    );
    for h in &e.hosts {
        if !h.covered {
            let _ = writeln!(
                s,
                "  {:<20} {:<14} not covered: no feed describes {}",
                h.host,
                h.release.as_deref().unwrap_or("-"),
                h.os
            );
            continue;
        }
        let open: Vec<&str> = open_of(by_host, &h.host).map(|f| &*f.cve).collect();
        let _ = writeln!(
            s,
            "  {:<20} {:<14} {:>7} {:>6}  {}",
            h.host,
            h.release.as_deref().unwrap_or("-"),
            h.fixable,
            h.no_fix,
            open.join(" ")
        );
    }
    s
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px}table{border-collapse:collapse;margin:8px 0 20px}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}\
.nc{color:#8a5a00}.open{color:#b00020}.ok{color:#0a7d32}code{font-size:13px}";

fn html_page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n{body}</body></html>\n",
        esc(title),
        esc(title)
    )
}

fn html(
    e: &Exposure,
    by_host: &ByHost<'_>,
    fixable: &[&CveSummary],
    no_fix: &[&CveSummary],
) -> String {
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<h2>Feeds</h2><table><tr><th>source</th><th>format</th><th>sha256</th></tr>"
    );
    for f in &e.feeds {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&f.source),
            esc(&f.format),
            esc(&f.sha256)
        );
    }
    b.push_str("</table>\n");
    for (title, list) in [
        ("CVEs with a fix", fixable),
        ("CVEs with no fix yet", no_fix),
    ] {
        let _ = writeln!(
            b,
            "<h2>{title} ({})</h2><table><tr><th>CVE</th><th>severity</th><th>hosts</th><th>fixed in</th></tr>",
            list.len()
        );
        for c in list {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.cve),
                c.severity.as_str(),
                esc(&c.hosts.join(", ")),
                esc(&fixed_list(c))
            );
        }
        b.push_str("</table>\n");
    }
    b.push_str("<h2>Hosts</h2><table><tr><th>host</th><th>release</th><th>fixable</th><th>no fix</th><th>open CVEs</th></tr>\n");
    for h in &e.hosts {
        if !h.covered {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td class=\"nc\" colspan=\"4\">not covered: no feed describes {}</td></tr>",
                esc(&h.host),
                esc(&h.os)
            );
            continue;
        }
        let open: Vec<String> = open_of(by_host, &h.host).map(|f| esc(&f.cve)).collect();
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&h.host),
            esc(h.release.as_deref().unwrap_or("-")),
            h.fixable,
            h.no_fix,
            open.join(" ")
        );
    }
    b.push_str("</table>\n");
    html_page("Exposure", &b)
}

/// A run's compliance evidence: the feeds it read and every CVE it re-checked.
#[derive(Debug, Clone, Serialize)]
pub struct Compliance {
    pub run: String,
    pub feeds: Vec<AdvisoryFeed>,
    pub evidence: Vec<EvidenceRecord>,
    pub closed: usize,
    pub still_open: usize,
}

pub fn compliance(state_dir: &Path, run: &str) -> Result<Compliance, ReportError> {
    compliance_in(&Store::file(state_dir), run)
}

/// [`compliance`] of a run in `store`.
pub fn compliance_in(store: &Store, run: &str) -> Result<Compliance, ReportError> {
    let run = super::resolve_run_in(store, run)?;
    let mut feeds = Vec::new();
    let mut evidence = Vec::new();
    for r in store.read_records(&run)? {
        match r.entry() {
            Ok(Entry::AdvisoryFeed(f)) => feeds.push(f),
            Ok(Entry::Evidence(e)) => evidence.push(e),
            _ => {}
        }
    }
    let closed = evidence.iter().filter(|e| e.closed).count();
    Ok(Compliance {
        run,
        feeds,
        still_open: evidence.len() - closed,
        evidence,
        closed,
    })
}

/// Renders the compliance report as JSON or HTML (Markdown falls back to JSON's
/// content in a table-less list).
pub fn render_compliance(c: &Compliance, format: super::Format) -> String {
    match format {
        super::Format::Json => {
            let mut s = serde_json::to_string_pretty(c).unwrap_or_default();
            s.push('\n');
            s
        }
        super::Format::Markdown => {
            let mut s = format!(
                "# Compliance evidence: run {}\n\n{} closed, {} still open\n\n",
                c.run, c.closed, c.still_open
            );
            for e in &c.evidence {
                let _ = writeln!(
                    s,
                    "- {} on {}: {} {} → {} (fixed in {}) {} at {}, feed {}",
                    e.cve,
                    e.host,
                    e.package,
                    e.before,
                    e.after,
                    e.fixed,
                    if e.closed { "closed" } else { "STILL OPEN" },
                    e.time,
                    e.feed_sha256
                );
            }
            s
        }
        super::Format::Html => {
            let mut b = String::new();
            let _ = writeln!(
                b,
                "<p>{} closed, {} still open.</p><h2>Feeds</h2><table><tr><th>source</th><th>format</th><th>sha256</th><th>pinned</th></tr>",
                c.closed, c.still_open
            );
            for f in &c.feeds {
                let _ = writeln!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                    esc(&f.source),
                    esc(&f.format),
                    esc(&f.sha256),
                    f.pinned
                );
            }
            b.push_str("</table>\n<h2>Evidence</h2><table><tr><th>CVE</th><th>host</th><th>package</th><th>before</th><th>after (verified)</th><th>fixed in</th><th>status</th><th>time</th><th>feed sha256</th></tr>\n");
            for e in &c.evidence {
                let _ = writeln!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    esc(&e.cve),
                    esc(&e.host),
                    esc(&e.package),
                    esc(&e.before),
                    esc(&e.after),
                    esc(&e.fixed),
                    if e.closed { "ok" } else { "open" },
                    if e.closed { "closed" } else { "still open" },
                    esc(&e.time),
                    esc(&e.feed_sha256)
                );
            }
            b.push_str("</table>\n");
            html_page(&format!("Compliance evidence: run {}", c.run), &b)
        }
    }
}
