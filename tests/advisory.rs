//! Advisory feeds and exposure against the project's fixtures (tests/fixtures/advisory,
//! written by its generate.py in the real schemas). The reference check runs
//! reference.py, which reads the same files on its own and compares every version
//! with the real `dpkg --compare-versions` and rpm's `rpm.vercmp`; both must agree
//! on every (host, CVE) pair.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbook::advisory::exposure::{assess, verdict_of};
use patchbook::advisory::feed::{fetch, FeedSource};
use patchbook::advisory::{Feed, FeedFormat, HostPackages, InstalledPackage, Release, Verdict};
use patchbook::primitives::artifact::{ArtifactError, ArtifactSettings};
use patchbook::primitives::facts::{Facts, PackageManager};

const FEEDS: [&str; 4] = [
    "debian-tracker.json",
    "debian-osv.json",
    "ubuntu-osv.json",
    "rhel9-vex.json",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/advisory")
}

fn feeds() -> Vec<Feed> {
    FEEDS
        .iter()
        .map(|f| {
            let p = fixtures().join(f);
            Feed::parse(f, &std::fs::read(&p).unwrap()).unwrap()
        })
        .collect()
}

fn hosts() -> Vec<HostPackages> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("hosts.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let s = |k: &str| h[k].as_str().unwrap().to_string();
            let facts = Facts {
                os_id: s("os_id"),
                os_version: s("os_version"),
                os_like: vec![],
                package_manager: PackageManager::Unknown,
                arch: "x86_64".into(),
                kernel: String::new(),
            };
            HostPackages {
                host: s("host").into(),
                release: Release::of_facts(&facts),
                os: format!("{} {}", s("os_id"), s("os_version")),
                packages: h["packages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| InstalledPackage {
                        binary: p["binary"].as_str().unwrap().into(),
                        version: p["version"].as_str().unwrap().into(),
                        source: p["source"].as_str().unwrap().into(),
                        source_version: p["source_version"].as_str().unwrap().into(),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn fixtures_are_large_and_varied_enough() {
    let feeds = feeds();
    let formats: BTreeSet<String> = feeds.iter().map(|f| f.format.to_string()).collect();
    assert_eq!(formats.len(), 3, "{formats:?}");
    assert_eq!(feeds[0].format, FeedFormat::DebianTracker);
    let cves: BTreeSet<&str> = feeds
        .iter()
        .flat_map(|f| f.statements.iter().map(|s| &*s.cve))
        .collect();
    let packages: BTreeSet<&str> = feeds
        .iter()
        .flat_map(|f| f.statements.iter().map(|s| &*s.package))
        .collect();
    assert!(cves.len() >= 200, "{} CVEs", cves.len());
    assert!(packages.len() >= 40, "{} source packages", packages.len());
    let releases: BTreeSet<String> = feeds
        .iter()
        .flat_map(|f| f.releases().map(|r| r.to_string()))
        .collect();
    for r in ["Debian 12", "Ubuntu 22.04", "RHEL 9"] {
        assert!(releases.contains(r), "{releases:?}");
    }
    let all: Vec<_> = feeds.iter().flat_map(|f| &f.statements).collect();
    let fixed = |s: &&&patchbook::advisory::Statement| {
        matches!(&s.state, patchbook::advisory::FixState::Fixed(_))
    };
    assert!(all.iter().filter(fixed).any(|s| match &s.state {
        patchbook::advisory::FixState::Fixed(v) => v.contains(':'),
        _ => false,
    }));
    assert!(all.iter().filter(fixed).any(|s| match &s.state {
        patchbook::advisory::FixState::Fixed(v) => v.contains('~'),
        _ => false,
    }));
    assert!(all
        .iter()
        .any(|s| s.state == patchbook::advisory::FixState::NotAffected));
    assert!(all
        .iter()
        .any(|s| s.state == patchbook::advisory::FixState::NoFix));
    // The EUS stream's lower fix is not RHEL 9's.
    assert!(!all.iter().any(|s| match &s.state {
        patchbook::advisory::FixState::Fixed(v) => v.starts_with("0:0.1-"),
        _ => false,
    }));
    // Source ≠ binary names on the hosts.
    assert!(hosts()
        .iter()
        .flat_map(|h| &h.packages)
        .any(|p| p.binary != p.source));
}

#[test]
fn every_verdict_agrees_with_dpkg_and_rpm() {
    let feeds = feeds();
    let hosts = hosts();
    let out = std::process::Command::new("python3")
        .arg(fixtures().join("reference.py"))
        .arg(fixtures())
        .env("LC_ALL", "C")
        .output()
        .expect("python3 runs the reference check");
    assert!(
        out.status.success(),
        "reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_slice(&out.stdout).unwrap();
    let universe: BTreeSet<String> = feeds
        .iter()
        .flat_map(|f| f.statements.iter().map(|s| s.cve.to_string()))
        .collect();
    assert_eq!(theirs.len(), hosts.len());
    let mut pairs = 0;
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for h in &hosts {
        let found = assess(h, &feeds);
        let ref_host = &theirs[&*h.host];
        assert_eq!(
            ref_host.keys().cloned().collect::<BTreeSet<_>>(),
            universe,
            "{}: the two readers found different CVEs",
            h.host
        );
        for cve in &universe {
            let ours = verdict_of(h, &feeds, &found, cve).as_str();
            seen.insert(ours);
            pairs += 1;
            if ours != ref_host[cve] {
                wrong.push(format!(
                    "{} {cve}: ours {ours}, reference {}",
                    h.host, ref_host[cve]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {pairs} pairs disagree:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(pairs >= 13 * 200, "{pairs}");
    assert_eq!(seen.len(), 5, "every verdict kind occurs: {seen:?}");
}

#[test]
fn uncovered_releases_are_not_covered_never_clean() {
    let feeds = feeds();
    let plan = patchbook::advisory::exposure::plan(&hosts(), &feeds);
    let line = |n: &str| plan.hosts.iter().find(|h| h.host == n).unwrap();
    for h in ["old-1", "rocky-1"] {
        assert!(!line(h).covered, "{h}");
        assert_eq!(plan.of_host(h).count(), 0);
    }
    assert!(line("deb-1").covered && line("rhel-1").covered && line("ubu-1").covered);
    let found = assess(&hosts()[0], &feeds);
    assert!(found
        .values()
        .any(|f| f.verdict == Verdict::VulnerableFixAvailable));
}

fn settings(dir: &Path, trusted: &[String]) -> ArtifactSettings {
    ArtifactSettings {
        trusted_sources: trusted.to_vec(),
        base_dir: dir.to_path_buf(),
        cache_dir: dir.join("cache"),
        attempts: 1,
        public_keys: vec![],
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn feeds_come_only_from_trusted_sources_and_pins_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir(&mirror).unwrap();
    let bytes = std::fs::read(fixtures().join("debian-tracker.json")).unwrap();
    let file = mirror.join("tracker.json");
    std::fs::write(&file, &bytes).unwrap();
    let url = file.display().to_string();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };

    let mut checks = Vec::new();
    let untrusted = fetch(
        &FeedSource::parse(&url),
        &settings(dir.path(), &[]),
        &mut checks,
    )
    .unwrap_err();
    assert!(
        matches!(
            untrusted,
            patchbook::advisory::AdvisoryError::Artifact(ArtifactError::Untrusted { .. })
        ),
        "{untrusted}"
    );

    let s = settings(dir.path(), &[mirror.display().to_string()]);
    let feed = fetch(&FeedSource::parse(&url), &s, &mut checks).unwrap();
    assert_eq!(&*feed.sha256, digest);
    assert!(!feed.pinned);
    assert!(dir.path().join("cache").join(&digest).exists());

    let pinned = fetch(
        &FeedSource::parse(&format!("{url}#sha256={digest}")),
        &s,
        &mut checks,
    )
    .unwrap();
    assert!(pinned.pinned);
    let entry = pinned.entry();
    assert_eq!(entry.kind(), "advisory.feed");
    assert_eq!(entry.to_data()["sha256"], digest.as_str());

    let wrong = fetch(
        &FeedSource::parse(&format!("{url}#sha256={}", "0".repeat(64))),
        &s,
        &mut checks,
    )
    .unwrap_err()
    .to_string();
    assert!(wrong.contains("SHA-256 mismatch"), "{wrong}");
}
