//! Matching: a host's installed source packages against the feeds that cover its
//! release, with the release's own version ordering (dpkg or rpm). Pure: the
//! package lists come from [`super::probe`] or from a recorded scan.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::{Feed, FixState, Release, Severity, Statement};

/// One installed binary package and the source package it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstalledPackage {
    pub binary: Arc<str>,
    pub version: Arc<str>,
    pub source: Arc<str>,
    /// The source version (dpkg `${source:Version}`; rpm: the binary's EVR, since a
    /// binary RPM carries its source's epoch, version and release).
    pub source_version: Arc<str>,
}

/// What one host runs, as a probe read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPackages {
    pub host: Arc<str>,
    /// `None` when the host runs a distribution no reader knows.
    pub release: Option<Release>,
    /// `os_id os_version` as the host reports it, for "not covered" messages.
    pub os: String,
    pub packages: Vec<InstalledPackage>,
}

/// The status of one (host, CVE) pair, least worrying first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// No feed read describes the host's release: nothing is known, nothing claimed.
    NotCovered,
    /// The package is absent, or the feed says this release was never affected.
    NotAffected,
    /// The installed version is at or past the fixed one.
    Fixed,
    /// Below the fixed version: patching closes it.
    VulnerableFixAvailable,
    /// Affected and the distribution has published no fix yet.
    VulnerableNoFix,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NotCovered => "not-covered",
            Verdict::NotAffected => "not-affected",
            Verdict::Fixed => "fixed",
            Verdict::VulnerableFixAvailable => "vulnerable-fix-available",
            Verdict::VulnerableNoFix => "vulnerable-no-fix",
        }
    }

    /// Reads [`Verdict::as_str`] back (a recorded scan); `None` for other words.
    pub fn parse(s: &str) -> Option<Verdict> {
        [
            Verdict::NotCovered,
            Verdict::NotAffected,
            Verdict::Fixed,
            Verdict::VulnerableFixAvailable,
            Verdict::VulnerableNoFix,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    pub fn vulnerable(self) -> bool {
        matches!(
            self,
            Verdict::VulnerableFixAvailable | Verdict::VulnerableNoFix
        )
    }
}

/// One source package's part in a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageFinding {
    pub package: Arc<str>,
    /// The installed binary packages built from it, shared by every finding of
    /// this package on this host rather than copied into each.
    pub binaries: Arc<[Arc<str>]>,
    pub installed: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed: Option<Arc<str>>,
    pub verdict: Verdict,
    /// SHA-256 of the feed that said so.
    pub feed_sha256: Arc<str>,
}

/// What one host has of one CVE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub host: Arc<str>,
    pub cve: Arc<str>,
    pub severity: Severity,
    pub verdict: Verdict,
    pub packages: Vec<PackageFinding>,
}

/// One host's line in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSummary {
    pub host: String,
    pub os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    pub covered: bool,
    /// Open CVEs a fix exists for.
    pub fixable: usize,
    /// Open CVEs with no fix yet.
    pub no_fix: usize,
}

/// A feed as the plan cites it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedRef {
    pub source: String,
    pub format: String,
    pub sha256: String,
}

/// The exposure plan: every host's summary and every open (host, CVE) finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exposure {
    pub feeds: Vec<FeedRef>,
    pub hosts: Vec<HostSummary>,
    pub findings: Vec<Finding>,
}

/// The verdict of one statement for an installed source version.
pub fn judge(s: &Statement, installed: &str) -> (Verdict, Option<Arc<str>>) {
    let cmp = |a: &str, b: &str| s.release.distro.compare(a, b);
    if let Some(i) = &s.introduced {
        if cmp(installed, i).is_lt() {
            return (Verdict::NotAffected, None);
        }
    }
    match &s.state {
        FixState::NotAffected => (Verdict::NotAffected, None),
        FixState::NoFix => (Verdict::VulnerableNoFix, None),
        FixState::Fixed(f) if cmp(installed, f).is_lt() => {
            (Verdict::VulnerableFixAvailable, Some(f.clone()))
        }
        FixState::Fixed(f) => (Verdict::Fixed, Some(f.clone())),
    }
}

/// The source packages of a host, as runs of `order` (indices into
/// `host.packages`, sorted by source name and then position): one run per source.
/// `order` is the caller's buffer, reused from host to host so that grouping
/// allocates nothing per (host, package).
fn group_by_source(host: &HostPackages, order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..host.packages.len());
    let pk = &host.packages;
    order.sort_unstable_by(|&a, &b| pk[a].source.cmp(&pk[b].source).then(a.cmp(&b)));
}

/// The lowest installed source version of one run of packages. Binaries of one
/// source at different versions (a half-done upgrade) count at the lowest, since
/// that one still carries the flaw.
fn lowest<'h>(host: &'h HostPackages, release: &Release, run: &[usize]) -> Option<&'h Arc<str>> {
    let mut out: Option<&Arc<str>> = None;
    for p in run.iter().filter_map(|&i| host.packages.get(i)) {
        match out {
            Some(v) if !release.distro.compare(&p.source_version, v).is_lt() => {}
            _ => out = Some(&p.source_version),
        }
    }
    out
}

/// Whether any feed describes the host's release.
pub fn covered(host: &HostPackages, feeds: &[Feed]) -> bool {
    host.release
        .as_ref()
        .is_some_and(|r| feeds.iter().any(|f| f.covers(r)))
}

/// Every CVE the feeds name for the host's packages, with its verdict. CVEs of
/// packages the host lacks are not listed: their verdict is not-affected (see
/// [`verdict_of`]).
pub fn assess(host: &HostPackages, feeds: &[Feed]) -> BTreeMap<Arc<str>, Finding> {
    assess_with(host, feeds, true, &mut Memo::new(), &mut Vec::new())
}

/// [`assess`] keeping only vulnerable verdicts: what a fleet-wide plan needs,
/// without a record for every fixed or unaffected pair.
pub fn assess_open(host: &HostPackages, feeds: &[Feed]) -> BTreeMap<Arc<str>, Finding> {
    assess_with(host, feeds, false, &mut Memo::new(), &mut Vec::new())
}

/// The statements one feed makes about one installed source version in one
/// release, each with its verdict (only the kept ones). A fleet runs few distinct
/// versions of each package, so [`plan`] judges each (release, package, version)
/// once per thread instead of once per host: 10,000 hosts × 400 packages × 20
/// CVEs would otherwise be 80 million version comparisons.
type Judged<'f> = Vec<(&'f Statement, Verdict, Option<Arc<str>>)>;
type Memo<'h, 'f> = HashMap<(usize, &'h Release, &'h str, &'h str), Judged<'f>>;

fn assess_with<'h, 'f>(
    host: &'h HostPackages,
    feeds: &'f [Feed],
    all: bool,
    memo: &mut Memo<'h, 'f>,
    order: &mut Vec<usize>,
) -> BTreeMap<Arc<str>, Finding> {
    let mut out: BTreeMap<Arc<str>, Finding> = BTreeMap::new();
    let Some(release) = host.release.as_ref().filter(|_| covered(host, feeds)) else {
        return out;
    };
    group_by_source(host, order);
    let pk = &host.packages;
    for run in order.chunk_by(|&a, &b| pk[a].source == pk[b].source) {
        let (Some(first), Some(installed)) = (
            run.first().and_then(|&i| pk.get(i)),
            lowest(host, release, run),
        ) else {
            continue;
        };
        let source: &'h str = &first.source;
        // Built on the first finding of this package, then shared by the rest.
        let mut binaries: Option<Arc<[Arc<str>]>> = None;
        for (at, feed) in feeds.iter().enumerate().filter(|(_, f)| f.covers(release)) {
            let judged = memo
                .entry((at, release, source, &**installed))
                .or_insert_with(|| {
                    feed.about(release, source)
                        .map(|s| {
                            let (verdict, fixed) = judge(s, installed);
                            (s, verdict, fixed)
                        })
                        .filter(|(_, verdict, _)| all || verdict.vulnerable())
                        .collect()
                });
            for (s, verdict, fixed) in judged.iter() {
                let (verdict, fixed) = (*verdict, fixed.clone());
                let finding = out.entry(s.cve.clone()).or_insert_with(|| Finding {
                    host: host.host.clone(),
                    cve: s.cve.clone(),
                    severity: s.severity,
                    verdict,
                    // Nearly every finding names one package; an empty Vec's
                    // first push would reserve four (a fleet's plan holds
                    // millions of findings).
                    packages: Vec::with_capacity(1),
                });
                finding.verdict = finding.verdict.max(verdict);
                finding.severity = finding.severity.max(s.severity);
                match finding.packages.iter_mut().find(|p| &*p.package == source) {
                    // Several ranges or feeds about one package: the worst holds.
                    Some(p) if verdict > p.verdict => {
                        p.verdict = verdict;
                        p.fixed = fixed;
                        p.feed_sha256 = Arc::clone(&feed.sha256);
                    }
                    Some(_) => {}
                    None => finding.packages.push(PackageFinding {
                        package: s.package.clone(),
                        binaries: Arc::clone(binaries.get_or_insert_with(|| {
                            run.iter()
                                .filter_map(|&i| pk.get(i))
                                .map(|p| Arc::clone(&p.binary))
                                .collect()
                        })),
                        installed: Arc::clone(installed),
                        fixed,
                        verdict,
                        feed_sha256: Arc::clone(&feed.sha256),
                    }),
                }
            }
        }
    }
    out
}

/// The verdict of one (host, CVE) pair from [`assess`]'s answer.
pub fn verdict_of(
    host: &HostPackages,
    feeds: &[Feed],
    found: &BTreeMap<Arc<str>, Finding>,
    cve: &str,
) -> Verdict {
    if !covered(host, feeds) {
        return Verdict::NotCovered;
    }
    found
        .get(cve)
        .map(|f| f.verdict)
        .unwrap_or(Verdict::NotAffected)
}

/// The exposure plan of a fleet: hosts assessed in parallel on every core.
pub fn plan(hosts: &[HostPackages], feeds: &[Feed]) -> Exposure {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let chunk = hosts.len().div_ceil(threads).max(1);
    let parts: Vec<(Vec<HostSummary>, Vec<Finding>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .chunks(chunk)
            .map(|part| scope.spawn(move || plan_part(part, feeds)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    // Sized once: growing by doubling would hold the old and the new copy of
    // millions of findings at once.
    let mut summaries = Vec::with_capacity(hosts.len());
    let mut findings = Vec::with_capacity(parts.iter().map(|(_, f)| f.len()).sum());
    for (s, f) in parts {
        summaries.extend(s);
        findings.extend(f);
    }
    Exposure {
        feeds: feeds
            .iter()
            .map(|f| FeedRef {
                source: f.source.clone(),
                format: f.format.to_string(),
                sha256: f.sha256.to_string(),
            })
            .collect(),
        hosts: summaries,
        findings,
    }
}

fn plan_part(hosts: &[HostPackages], feeds: &[Feed]) -> (Vec<HostSummary>, Vec<Finding>) {
    let mut summaries = Vec::with_capacity(hosts.len());
    let mut findings = Vec::new();
    let mut memo = Memo::new();
    let mut order = Vec::new();
    for h in hosts {
        let found = assess_with(h, feeds, false, &mut memo, &mut order);
        let open: Vec<Finding> = found
            .into_values()
            .filter(|f| f.verdict.vulnerable())
            .collect();
        summaries.push(HostSummary {
            host: h.host.to_string(),
            os: h.os.clone(),
            release: h.release.as_ref().map(|r| r.to_string()),
            covered: covered(h, feeds),
            fixable: open
                .iter()
                .filter(|f| f.verdict == Verdict::VulnerableFixAvailable)
                .count(),
            no_fix: open
                .iter()
                .filter(|f| f.verdict == Verdict::VulnerableNoFix)
                .count(),
        });
        findings.extend(open);
    }
    // The doubling's spare room, returned before the parts are joined.
    findings.shrink_to_fit();
    (summaries, findings)
}

/// One CVE across the fleet, for the per-CVE view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CveSummary {
    pub cve: String,
    pub severity: Severity,
    pub verdict: Verdict,
    /// The hosts, shared with the findings rather than copied.
    pub hosts: Vec<Arc<str>>,
    /// Fixed versions per source package.
    pub fixed: BTreeMap<String, String>,
}

impl Exposure {
    /// Per CVE, worst first within equal severity; fixable and no-fix apart.
    pub fn by_cve(&self) -> Vec<CveSummary> {
        let mut map: HashMap<&str, CveSummary> = HashMap::new();
        for f in &self.findings {
            let e = map.entry(&*f.cve).or_insert_with(|| CveSummary {
                cve: f.cve.to_string(),
                severity: f.severity,
                verdict: f.verdict,
                hosts: Vec::new(),
                fixed: BTreeMap::new(),
            });
            e.severity = e.severity.max(f.severity);
            e.verdict = e.verdict.max(f.verdict);
            e.hosts.push(Arc::clone(&f.host));
            for p in &f.packages {
                if let Some(v) = &p.fixed {
                    if p.verdict == Verdict::VulnerableFixAvailable {
                        // Thousands of hosts name the same fix: copy it only
                        // when it is new.
                        match e.fixed.get_mut(&*p.package) {
                            Some(old) if **old == **v => {}
                            Some(old) => *old = v.to_string(),
                            None => {
                                e.fixed.insert(p.package.to_string(), v.to_string());
                            }
                        }
                    }
                }
            }
        }
        let mut out: Vec<CveSummary> = map.into_values().collect();
        out.sort_by(|a, b| b.severity.cmp(&a.severity).then_with(|| a.cve.cmp(&b.cve)));
        out
    }

    /// The open findings of every host, in plan order: one pass over the
    /// findings, for views that list each host's (calling [`Self::of_host`] per
    /// host would rescan all of them for every host).
    pub fn by_host(&self) -> HashMap<&str, Vec<&Finding>> {
        let mut out: HashMap<&str, Vec<&Finding>> = HashMap::with_capacity(self.hosts.len());
        for f in &self.findings {
            out.entry(&*f.host).or_default().push(f);
        }
        out
    }

    /// The open findings of one host (rescans every finding: for all hosts use
    /// [`Self::by_host`]).
    pub fn of_host<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Finding> + 'a {
        self.findings.iter().filter(move |f| &*f.host == host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisory::{Distro, FeedFormat};

    fn st(cve: &str, pkg: &str, state: FixState, release: Release) -> Statement {
        Statement {
            cve: cve.into(),
            release,
            package: pkg.into(),
            introduced: None,
            state,
            severity: Severity::High,
        }
    }

    fn host(
        name: &str,
        release: Option<Release>,
        pkgs: &[(&str, &str, &str, &str)],
    ) -> HostPackages {
        HostPackages {
            host: name.into(),
            release,
            os: "x".into(),
            packages: pkgs
                .iter()
                .map(|(b, v, s, sv)| InstalledPackage {
                    binary: (*b).into(),
                    version: (*v).into(),
                    source: (*s).into(),
                    source_version: (*sv).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn source_packages_epochs_and_tildes_decide() {
        let d12 = Release::new(Distro::Debian, "12");
        let feed = Feed::from_statements(
            "t",
            FeedFormat::DebianTracker,
            "ab",
            vec![
                st(
                    "CVE-1",
                    "openssl",
                    FixState::Fixed("3.0.11-1~deb12u2".into()),
                    d12.clone(),
                ),
                st(
                    "CVE-2",
                    "openssl",
                    FixState::Fixed("3.0.11-1~deb12u1".into()),
                    d12.clone(),
                ),
                st(
                    "CVE-3",
                    "shadow",
                    FixState::Fixed("1:4.13+dfsg1-1".into()),
                    d12.clone(),
                ),
                st("CVE-4", "shadow", FixState::NoFix, d12.clone()),
                st("CVE-5", "curl", FixState::NotAffected, d12.clone()),
            ],
        );
        let feeds = [feed];
        let h = host(
            "web-1",
            Some(d12.clone()),
            &[
                (
                    "libssl3",
                    "3.0.11-1~deb12u1+b1",
                    "openssl",
                    "3.0.11-1~deb12u1",
                ),
                ("passwd", "1:4.13+dfsg1-1~", "shadow", "1:4.13+dfsg1-1~"),
                ("curl", "7.88.1-10", "curl", "7.88.1-10"),
            ],
        );
        let found = assess(&h, &feeds);
        let v = |c| verdict_of(&h, &feeds, &found, c);
        assert_eq!(v("CVE-1"), Verdict::VulnerableFixAvailable);
        assert_eq!(&*found["CVE-1"].packages[0].binaries[0], "libssl3");
        assert_eq!(v("CVE-2"), Verdict::Fixed);
        assert_eq!(v("CVE-3"), Verdict::VulnerableFixAvailable);
        assert_eq!(v("CVE-4"), Verdict::VulnerableNoFix);
        assert_eq!(v("CVE-5"), Verdict::NotAffected);
        assert_eq!(v("CVE-9"), Verdict::NotAffected);
        let ubuntu = host("u", Some(Release::new(Distro::Ubuntu, "22.04")), &[]);
        assert_eq!(
            verdict_of(&ubuntu, &feeds, &assess(&ubuntu, &feeds), "CVE-1"),
            Verdict::NotCovered
        );
        let plan = plan(&[h, ubuntu], &feeds);
        assert_eq!(plan.hosts[0].fixable, 2);
        assert_eq!(plan.hosts[0].no_fix, 1);
        assert!(!plan.hosts[1].covered);
        assert_eq!(plan.by_cve().len(), 3);
    }
}
