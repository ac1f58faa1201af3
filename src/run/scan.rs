//! The advisory scan as a run of its own: fetch the feeds, read every selected
//! host's installed packages (read-only), judge them, and journal the result as a
//! run named `<UTC>Z-advscan-<n>` (`advisory.feed`, one `advisory.scan.host` per
//! host, `host.unreachable` for the hosts it could not read, `advisory.scan`).
//! With a notification severity it also compares the result with the previous
//! scan and mails each owner the CVEs their hosts newly have open.
//!
//! The newest closed scan run is "the last scan": `exposure --from-last-scan` and
//! `inventory list` read it back with [`last_scan`] and never contact a host.
//! This module never changes a host and takes no host claim; it must not know
//! Rhai, the CLI or the watch service's schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::advisory::exposure::{plan, Exposure, FeedRef, HostSummary, PackageFinding};
use crate::advisory::feed::{self, FeedSource};
use crate::advisory::{probe, AdvisoryError, Finding, Severity, Verdict};
use crate::journal::entry::{
    Entry, HostUnreachable, ScanFeed, ScanFinding, ScanHost, ScanPackage, ScanSummary,
};
use crate::journal::state::{is_scan_run, list_runs, SCAN_RUN_MARK};
use crate::journal::{read_records, Journal, JournalError, RunHeader};
use crate::primitives::artifact::ArtifactSettings;
use crate::primitives::notify::{self, Delivery, Notice};
use crate::primitives::{HostCtx, Mode, RunCtx};
use crate::runtime::Runtime;

/// What to scan.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    /// Inventory selector of the hosts to read.
    pub selector: String,
    /// Feed specs (`URL` or `URL#sha256=HEX`); empty: `[advisories] feeds`.
    pub feeds: Vec<String>,
    /// Mail owners about newly open CVEs of at least this severity; `None` sends
    /// nothing (an interactive `exposure`).
    pub notify_min: Option<Severity>,
}

/// What a scan found and did.
#[derive(Debug, Clone)]
pub struct ScanOutcome {
    /// The scan's run id.
    pub run_id: String,
    pub exposure: Exposure,
    /// Hosts that could not be read, with why.
    pub unreachable: Vec<(String, String)>,
    /// Per host, the CVEs open now that the previous scan did not have open, at or
    /// above `notify_min`. Empty without `notify_min` or without a previous scan.
    pub newly_open: BTreeMap<String, Vec<Finding>>,
    /// One delivery per owner mailed.
    pub deliveries: Vec<Delivery>,
}

/// A scan read back from the journal.
#[derive(Debug, Clone)]
pub struct RecordedScan {
    pub run_id: String,
    /// When it started (RFC 3339), as its journal says.
    pub started: Option<String>,
    pub exposure: Exposure,
    pub unreachable: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(
        "no advisory feed given; pass --feed URL or list feeds under [advisories] feeds \
         in patchbook.toml"
    )]
    NoFeeds,
    #[error(transparent)]
    Feed(#[from] AdvisoryError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("the advisory scan could not be journaled: {0}")]
    Journal(#[from] JournalError),
    #[error(
        "no advisory scan recorded under {dir}; run `patchbook exposure` once (or let \
         `patchbook watch` run its [advisories] scan) first"
    )]
    NoScan { dir: PathBuf },
    #[error(
        "`{given}` is not a severity; use negligible, low, medium, high or critical \
         ([advisories] notify_min_severity in patchbook.toml)"
    )]
    Severity { given: String },
}

/// The severity `[advisories] notify_min_severity` names; `high` when unset.
pub fn notify_min_severity(setting: Option<&str>) -> Result<Severity, ScanError> {
    let Some(word) = setting else {
        return Ok(Severity::High);
    };
    match Severity::parse(word) {
        Severity::Unknown => Err(ScanError::Severity {
            given: word.to_string(),
        }),
        s => Ok(s),
    }
}

/// Runs one scan and journals it; see the module docs.
pub fn scan(rt: &Runtime, req: &ScanRequest) -> Result<ScanOutcome, ScanError> {
    let specs: Vec<String> = if req.feeds.is_empty() {
        rt.config.advisories.feeds.clone()
    } else {
        req.feeds.clone()
    };
    if specs.is_empty() {
        return Err(ScanError::NoFeeds);
    }
    let hosts = rt.targets(&req.selector)?;
    let settings = ArtifactSettings::from_config(&rt.config, &rt.state_dir);
    let mut loaded = Vec::new();
    let mut checks = Vec::new();
    for spec in &specs {
        let src = FeedSource::parse(spec);
        let mut c = Vec::new();
        let f = feed::fetch(&src, &settings, &mut c)?;
        checks.push((src.url.clone(), f.sha256.to_string(), c));
        loaded.push(f);
    }

    // Facts are cached per run context: a fresh one per scan reads them anew.
    let probe_run = RunCtx::new("advisory-scan", rt.state_dir.clone(), None, Mode::Apply);
    let read = crate::rollout::pool::map_bounded(&hosts, rt.forks, |h| {
        let t = rt
            .transport(h)
            .map_err(|e| (h.name.clone(), e.to_string()))?;
        let ctx = HostCtx {
            host: h,
            transport: &*t,
            run: &probe_run,
            deadline: None,
        };
        probe::scan(&ctx).map_err(|e| {
            // A dead session must not be reused by the next scan.
            rt.forget(&h.name);
            (h.name.clone(), e.to_string())
        })
    });
    let mut scanned = Vec::new();
    let mut unreachable = Vec::new();
    for r in read {
        match r {
            Ok(s) => scanned.push(s),
            Err(e) => unreachable.push(e),
        }
    }
    let exposure = plan(&scanned, &loaded);

    // The previous scans are read before this one exists.
    let newly_open = match req.notify_min {
        Some(min) => {
            let read: BTreeSet<&str> = exposure.hosts.iter().map(|h| h.host.as_str()).collect();
            gained(&previous_of(&rt.state_dir, &read)?, &exposure, min)
        }
        None => BTreeMap::new(),
    };

    rt.ensure_state_dir()?;
    let header = RunHeader::new(
        PathBuf::from("<advisory scan>"),
        String::new(),
        BTreeMap::new(),
        rt.inventory.content_hash(),
        serde_json::json!({ "selector": req.selector }),
    )
    .with_config(rt.config.sha256.clone());
    let journal = begin_scan_run(rt, &header)?.with_secrets(rt.secrets.clone());
    for (url, sha, c) in &checks {
        for check in c {
            journal.note_entry(None, &check.entry(url, sha))?;
        }
    }
    for f in &loaded {
        journal.note_entry(None, &f.entry())?;
    }
    for h in &exposure.hosts {
        journal.note_entry(Some(&h.host), &Entry::ScanHost(scan_host(&exposure, h)))?;
    }
    for (host, reason) in &unreachable {
        journal.note_entry(
            Some(host),
            &Entry::HostUnreachable(HostUnreachable {
                step: "advisory.scan".into(),
                reason: reason.clone(),
            }),
        )?;
    }

    let deliveries = mail_owners(rt, &journal, &newly_open, req.notify_min);
    for d in &deliveries {
        journal.note_entry(None, &Entry::Notify(d.clone().into()))?;
    }
    let count = |f: fn(&HostSummary) -> usize| {
        exposure
            .hosts
            .iter()
            .map(|h| u64::try_from(f(h)).unwrap_or(u64::MAX))
            .sum::<u64>()
    };
    let summary = ScanSummary {
        feeds: exposure
            .feeds
            .iter()
            .map(|f| ScanFeed {
                source: f.source.clone(),
                format: f.format.clone(),
                sha256: f.sha256.clone(),
            })
            .collect(),
        selector: req.selector.clone(),
        hosts: exposure.hosts.iter().map(|h| h.host.clone()).collect(),
        unreachable: unreachable.iter().map(|(h, _)| h.clone()).collect(),
        fixable: count(|h| h.fixable),
        no_fix: count(|h| h.no_fix),
        not_covered: count(|h| usize::from(!h.covered)),
        newly_open: newly_open
            .values()
            .map(|v| u64::try_from(v.len()).unwrap_or(u64::MAX))
            .sum(),
    };
    journal.append_entry(None, &Entry::Scan(summary))?;
    let run_id = journal.run().to_string();
    journal.close()?;
    Ok(ScanOutcome {
        run_id,
        exposure,
        unreachable,
        newly_open,
        deliveries,
    })
}

/// Creates the scan's run: `<UTC>Z-advscan-<n>`, the first free `n` of that second.
fn begin_scan_run(rt: &Runtime, header: &RunHeader) -> Result<Journal, ScanError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let anchor = rt.anchor()?;
    let mut n = 1u32;
    loop {
        let id = format!("{stamp}{SCAN_RUN_MARK}{n}");
        match Journal::begin_with(&rt.state_dir, &id, &rt.operator, header, anchor.clone()) {
            Err(JournalError::Exists { .. }) if n < 1000 => n += 1,
            other => return Ok(other?),
        }
    }
}

/// One host of the plan as its `advisory.scan.host` record.
fn scan_host(e: &Exposure, h: &HostSummary) -> ScanHost {
    let finding = |f: &Finding| ScanFinding {
        cve: f.cve.to_string(),
        severity: f.severity.as_str().to_string(),
        packages: f
            .packages
            .iter()
            .map(|p| ScanPackage {
                package: p.package.to_string(),
                binaries: p.binaries.iter().map(|b| b.to_string()).collect(),
                installed: p.installed.to_string(),
                fixed: p.fixed.as_ref().map(|v| v.to_string()),
                verdict: p.verdict.as_str().to_string(),
                feed_sha256: p.feed_sha256.to_string(),
            })
            .collect(),
    };
    let (open, no_fix): (Vec<&Finding>, Vec<&Finding>) = e
        .of_host(&h.host)
        .partition(|f| f.verdict == Verdict::VulnerableFixAvailable);
    ScanHost {
        host: h.host.clone(),
        os: h.os.clone(),
        release: h.release.clone(),
        covered: h.covered,
        open: open.into_iter().map(finding).collect(),
        no_fix: no_fix.into_iter().map(finding).collect(),
    }
}

/// The exposure plan a scan run recorded, rebuilt from its records.
fn exposure_of(records: &[Entry]) -> (Exposure, Vec<String>) {
    let mut feeds = Vec::new();
    let mut hosts = Vec::new();
    let mut findings = Vec::new();
    let mut unreachable = Vec::new();
    for e in records {
        match e {
            Entry::Scan(s) => {
                feeds = s
                    .feeds
                    .iter()
                    .map(|f| FeedRef {
                        source: f.source.clone(),
                        format: f.format.clone(),
                        sha256: f.sha256.clone(),
                    })
                    .collect();
                unreachable.clone_from(&s.unreachable);
            }
            Entry::ScanHost(h) => {
                let host: Arc<str> = h.host.as_str().into();
                let mut mine: Vec<Finding> = h
                    .open
                    .iter()
                    .map(|f| (f, Verdict::VulnerableFixAvailable))
                    .chain(h.no_fix.iter().map(|f| (f, Verdict::VulnerableNoFix)))
                    .map(|(f, verdict)| Finding {
                        host: host.clone(),
                        cve: f.cve.as_str().into(),
                        severity: Severity::parse(&f.severity),
                        verdict,
                        packages: f
                            .packages
                            .iter()
                            .map(|p| PackageFinding {
                                package: p.package.as_str().into(),
                                binaries: p.binaries.iter().map(|b| b.as_str().into()).collect(),
                                installed: p.installed.as_str().into(),
                                fixed: p.fixed.as_deref().map(Into::into),
                                verdict: Verdict::parse(&p.verdict).unwrap_or(verdict),
                                feed_sha256: p.feed_sha256.as_str().into(),
                            })
                            .collect(),
                    })
                    .collect();
                // The live plan lists a host's CVEs in order.
                mine.sort_by(|a, b| a.cve.cmp(&b.cve));
                hosts.push(HostSummary {
                    host: h.host.clone(),
                    os: h.os.clone(),
                    release: h.release.clone(),
                    covered: h.covered,
                    fixable: h.open.len(),
                    no_fix: h.no_fix.len(),
                });
                findings.extend(mine);
            }
            _ => {}
        }
    }
    (
        Exposure {
            feeds,
            hosts,
            findings,
        },
        unreachable,
    )
}

/// The newest closed scan run under `state_dir`, read back; `None` when there is
/// none. A scan cut off before its close is not a scan to trust.
pub fn last_scan(state_dir: &Path) -> Result<Option<RecordedScan>, ScanError> {
    let Some(info) = list_runs(state_dir)?
        .into_iter()
        .rev()
        .find(|r| is_scan_run(&r.run) && r.closed && !r.damaged)
    else {
        return Ok(None);
    };
    let entries: Vec<Entry> = read_records(&info.path)?
        .iter()
        .filter_map(|r| r.entry().ok())
        .collect();
    let (exposure, unreachable) = exposure_of(&entries);
    Ok(Some(RecordedScan {
        run_id: info.run,
        started: info.started,
        exposure,
        unreachable,
    }))
}

/// How many earlier scans [`previous_of`] looks through for a host.
const LOOK_BACK: usize = 100;

/// Each of `hosts` as the newest closed scan that read it saw it: a host one scan
/// could not reach is still compared with what it had before, so what it gained
/// meanwhile is not taken for its baseline.
fn previous_of(state_dir: &Path, hosts: &BTreeSet<&str>) -> Result<Exposure, ScanError> {
    let mut merged = Exposure {
        feeds: Vec::new(),
        hosts: Vec::new(),
        findings: Vec::new(),
    };
    let mut wanted: BTreeSet<&str> = hosts.clone();
    let runs = list_runs(state_dir)?;
    let scans = runs
        .iter()
        .rev()
        .filter(|r| is_scan_run(&r.run) && r.closed && !r.damaged)
        .take(LOOK_BACK);
    for info in scans {
        if wanted.is_empty() {
            break;
        }
        let entries: Vec<Entry> = read_records(&info.path)?
            .iter()
            .filter_map(|r| r.entry().ok())
            .collect();
        let (e, _) = exposure_of(&entries);
        for h in e.hosts {
            if wanted.remove(h.host.as_str()) {
                merged
                    .findings
                    .extend(e.findings.iter().filter(|f| *f.host == *h.host).cloned());
                merged.hosts.push(h);
            }
        }
    }
    Ok(merged)
}

/// [`last_scan`], or an error saying how to record one.
pub fn require_last_scan(state_dir: &Path) -> Result<RecordedScan, ScanError> {
    last_scan(state_dir)?.ok_or_else(|| ScanError::NoScan {
        dir: state_dir.join("runs"),
    })
}

/// Per host, the CVEs open in `now` at `min` or above that `before` did not have
/// open. Only hosts `before` read are compared: a host seen for the first time
/// sets its baseline, it does not "gain" everything it has.
pub fn gained(before: &Exposure, now: &Exposure, min: Severity) -> BTreeMap<String, Vec<Finding>> {
    let read_before: BTreeSet<&str> = before
        .hosts
        .iter()
        .filter(|h| h.covered)
        .map(|h| h.host.as_str())
        .collect();
    let open_before: BTreeSet<(&str, &str)> = before
        .findings
        .iter()
        .map(|f| (&*f.host, &*f.cve))
        .collect();
    let mut out: BTreeMap<String, Vec<Finding>> = BTreeMap::new();
    for f in &now.findings {
        if f.severity >= min
            && f.verdict.vulnerable()
            && read_before.contains(&*f.host)
            && !open_before.contains(&(&*f.host, &*f.cve))
        {
            out.entry(f.host.to_string()).or_default().push(f.clone());
        }
    }
    out
}

/// One mail per owner listing that owner's hosts' newly open CVEs. Hosts without
/// an owner go to `[notify] to`.
fn mail_owners(
    rt: &Runtime,
    journal: &Journal,
    newly_open: &BTreeMap<String, Vec<Finding>>,
    min: Option<Severity>,
) -> Vec<Delivery> {
    let Some(min) = min else {
        return Vec::new();
    };
    let mut per_owner: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for host in newly_open.keys() {
        let owners = rt
            .inventory
            .hosts()
            .iter()
            .find(|h| &h.name == host)
            .map(|h| h.owners.clone())
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| rt.config.notify.to.clone());
        for o in owners {
            per_owner.entry(o).or_default().push(host);
        }
    }
    let secrets = rt.secrets.list();
    let mut out = Vec::new();
    for (owner, hosts) in per_owner {
        let notice = gained_notice(journal.run(), &hosts, newly_open, min);
        out.extend(notify::send(
            &rt.config.notify,
            std::slice::from_ref(&owner),
            &notice,
            &secrets,
        ));
    }
    out
}

/// The text of one owner's mail.
fn gained_notice(
    run: &str,
    hosts: &[&str],
    newly_open: &BTreeMap<String, Vec<Finding>>,
    min: Severity,
) -> Notice {
    let count: usize = hosts
        .iter()
        .filter_map(|h| newly_open.get(*h))
        .map(Vec::len)
        .sum();
    let mut text = format!(
        "{count} newly open CVE{} of severity {min} or above on {}\n\n",
        if count == 1 { "" } else { "s" },
        hosts.join(", ")
    );
    let mut worst = Severity::Unknown;
    for h in hosts {
        text.push_str(&format!("{h}:\n"));
        for f in newly_open.get(*h).into_iter().flatten() {
            worst = worst.max(f.severity);
            let fixes: Vec<String> = f
                .packages
                .iter()
                .map(|p| match &p.fixed {
                    Some(v) => format!("{} {} (fixed in {v})", p.package, p.installed),
                    None => format!("{} {} (no fix yet)", p.package, p.installed),
                })
                .collect();
            text.push_str(&format!(
                "  {} {}: {}\n",
                f.cve,
                f.severity,
                fixes.join(", ")
            ));
        }
    }
    text.push_str(&format!(
        "\nScan run {run}; `patchbook exposure --from-last-scan` shows the whole fleet.\n"
    ));
    let severity = if worst >= Severity::Critical {
        notify::Severity::Critical
    } else {
        notify::Severity::Warning
    };
    Notice::new(text, severity)
        .field("run", run)
        .field("hosts", hosts.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(host: &str, cve: &str, severity: Severity) -> Finding {
        Finding {
            host: host.into(),
            cve: cve.into(),
            severity,
            verdict: Verdict::VulnerableFixAvailable,
            packages: vec![PackageFinding {
                package: "acme-agent".into(),
                binaries: std::iter::once("acme-agent".into()).collect(),
                installed: "1.0.0".into(),
                fixed: Some("1.0.1".into()),
                verdict: Verdict::VulnerableFixAvailable,
                feed_sha256: "ab".into(),
            }],
        }
    }

    fn plan_of(hosts: &[&str], findings: Vec<Finding>) -> Exposure {
        Exposure {
            feeds: Vec::new(),
            hosts: hosts
                .iter()
                .map(|h| HostSummary {
                    host: (*h).into(),
                    os: "debian 12".into(),
                    release: Some("Debian 12".into()),
                    covered: true,
                    fixable: findings.iter().filter(|f| &*f.host == *h).count(),
                    no_fix: 0,
                })
                .collect(),
            findings,
        }
    }

    #[test]
    fn only_new_open_cves_at_the_severity_count() {
        let before = plan_of(&["a", "b"], vec![finding("a", "CVE-1", Severity::High)]);
        let now = plan_of(
            &["a", "b", "c"],
            vec![
                finding("a", "CVE-1", Severity::High),
                finding("a", "CVE-2", Severity::Critical),
                finding("b", "CVE-3", Severity::Low),
                finding("c", "CVE-4", Severity::Critical),
            ],
        );
        let g = gained(&before, &now, Severity::High);
        assert_eq!(g.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(&*g["a"][0].cve, "CVE-2");
        let g = gained(&before, &now, Severity::Low);
        assert_eq!(g.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(gained(&now, &now, Severity::Negligible).is_empty());
    }

    #[test]
    fn a_recorded_scan_reads_back_as_its_plan() {
        let e = plan_of(
            &["a"],
            vec![
                finding("a", "CVE-2", Severity::High),
                finding("a", "CVE-1", Severity::Medium),
            ],
        );
        let records = vec![Entry::ScanHost(scan_host(&e, &e.hosts[0]))];
        let (back, _) = exposure_of(&records);
        assert_eq!(back.hosts, e.hosts);
        let cves: Vec<&str> = back.findings.iter().map(|f| &*f.cve).collect();
        assert_eq!(cves, ["CVE-1", "CVE-2"]);
        assert_eq!(back.findings[1], e.findings[0]);
    }

    fn record_scan(state: &Path, id: &str, e: &Exposure) {
        let header = RunHeader::new(
            PathBuf::from("<advisory scan>"),
            String::new(),
            BTreeMap::new(),
            String::new(),
            serde_json::Value::Null,
        );
        let j = Journal::begin(state, id, "alice", &header).unwrap();
        for h in &e.hosts {
            j.append_entry(Some(&h.host), &Entry::ScanHost(scan_host(e, h)))
                .unwrap();
        }
        j.close().unwrap();
    }

    #[test]
    fn a_host_the_last_scan_missed_is_compared_with_the_scan_before() {
        let dir = tempfile::tempdir().unwrap();
        let older = plan_of(&["a", "b"], vec![finding("b", "CVE-1", Severity::High)]);
        record_scan(dir.path(), "20261128T020000Z-advscan-1", &older);
        // b was unreachable in the newer scan.
        let newer = plan_of(&["a"], vec![finding("a", "CVE-2", Severity::High)]);
        record_scan(dir.path(), "20261128T020100Z-advscan-1", &newer);
        let prev = previous_of(dir.path(), &["a", "b"].into_iter().collect()).unwrap();
        let mut hosts: Vec<&str> = prev.hosts.iter().map(|h| h.host.as_str()).collect();
        hosts.sort_unstable();
        assert_eq!(hosts, ["a", "b"]);
        let now = plan_of(
            &["a", "b"],
            vec![
                finding("a", "CVE-2", Severity::High),
                finding("b", "CVE-1", Severity::High),
                finding("b", "CVE-3", Severity::High),
            ],
        );
        let g = gained(&prev, &now, Severity::High);
        assert_eq!(g.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(&*g["b"][0].cve, "CVE-3");
        let last = last_scan(dir.path()).unwrap().unwrap();
        assert_eq!(last.run_id, "20261128T020100Z-advscan-1");
    }

    #[test]
    fn the_notice_lists_each_host_and_fix() {
        let mut g = BTreeMap::new();
        g.insert("a".to_string(), vec![finding("a", "CVE-9", Severity::High)]);
        let n = gained_notice("r1", &["a"], &g, Severity::High);
        assert!(n
            .text
            .starts_with("1 newly open CVE of severity high or above on a"));
        assert!(n
            .text
            .contains("CVE-9 high: acme-agent 1.0.0 (fixed in 1.0.1)"));
        assert_eq!(n.severity, notify::Severity::Warning);
        assert!(matches!(
            notify_min_severity(Some("hihg")),
            Err(ScanError::Severity { .. })
        ));
        assert_eq!(notify_min_severity(None).unwrap(), Severity::High);
    }
}
