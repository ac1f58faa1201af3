//! Exposure at fleet scale: 10,000 simulated hosts (400 installed packages each,
//! Debian 12 and some Ubuntu 22.04 that the feed does not cover) against a
//! 100,000-entry Debian Security Tracker feed (5,000 source packages × 20 CVEs).
//! Prints the feed's parse time, the exposure plan's time, the findings and the
//! process's peak memory. Goal: plan ≤ 5 s and peak ≤ 1 GB on the 2-core machine.
//! Run with `cargo bench --bench advisory`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use patchbook::advisory::exposure::plan;
use patchbook::advisory::{Distro, Feed, HostPackages, InstalledPackage, Release};

const HOSTS: usize = 10_000;
const SOURCES: usize = 5_000;
const CVES_PER_SOURCE: usize = 20;
const PACKAGES_PER_HOST: usize = 400;
const LADDER: usize = 6;

/// xorshift: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

fn version(k: usize) -> String {
    // Epochs, tildes and Debian revisions, as a stable release's updates look.
    match k {
        0 => "1.2.3-1".into(),
        1 => "1.2.3-1+deb12u1~pre1".into(),
        2 => "1.2.3-1+deb12u1".into(),
        3 => "1.2.3-1+deb12u2".into(),
        4 => "1:1.2.0-1".into(),
        _ => "1:1.2.0-1+deb12u1".into(),
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let names: Vec<String> = (0..SOURCES).map(|i| format!("src{i:04}")).collect();

    let mut json = String::with_capacity(12 << 20);
    json.push('{');
    let mut entries = 0;
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let _ = write!(json, "\"{name}\":{{");
        for c in 0..CVES_PER_SOURCE {
            if c > 0 {
                json.push(',');
            }
            let release = match rng.below(100) {
                0 => r#"{"status":"open","urgency":"medium"}"#.to_string(),
                1..=10 => {
                    r#"{"status":"resolved","fixed_version":"0","urgency":"low"}"#.to_string()
                }
                11 => r#"{"status":"undetermined"}"#.to_string(),
                _ => format!(
                    r#"{{"status":"resolved","fixed_version":"{}","urgency":"high"}}"#,
                    version(rng.below(LADDER))
                ),
            };
            let _ = write!(
                json,
                r#""CVE-{}-{:05}":{{"scope":"remote","releases":{{"bookworm":{release},"sid":{{"status":"resolved","fixed_version":"9.9-1"}}}}}}"#,
                2020 + c % 6,
                i * CVES_PER_SOURCE + c
            );
            entries += 1;
        }
        json.push('}');
    }
    json.push('}');

    let t = Instant::now();
    let feed = Feed::parse("bench-tracker.json", json.as_bytes()).expect("feed");
    let parse = t.elapsed();
    drop(json);
    assert_eq!(feed.statements.len(), entries);

    // Names and versions are shared between hosts, as the probe's strings would
    // be after interning; each host still has its own package list.
    let source_names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(n.as_str())).collect();
    let lib_names: Vec<Arc<str>> = names
        .iter()
        .map(|n| Arc::from(format!("lib{n}").as_str()))
        .collect();
    let versions: Vec<Arc<str>> = (0..LADDER)
        .map(|k| Arc::from(version(k).as_str()))
        .collect();
    let d12 = Release::new(Distro::Debian, "12");
    let u2204 = Release::new(Distro::Ubuntu, "22.04");
    let hosts: Vec<HostPackages> = (0..HOSTS)
        .map(|h| {
            let start = rng.below(SOURCES);
            let packages = (0..PACKAGES_PER_HOST)
                .map(|k| {
                    let s = (start + k * 7) % SOURCES;
                    // Most packages are at the latest update; one in forty lags.
                    let v = if rng.below(40) == 0 {
                        versions[rng.below(LADDER)].clone()
                    } else {
                        versions[LADDER - 1].clone()
                    };
                    InstalledPackage {
                        binary: if s.is_multiple_of(3) {
                            lib_names[s].clone()
                        } else {
                            source_names[s].clone()
                        },
                        version: v.clone(),
                        source: source_names[s].clone(),
                        source_version: v,
                    }
                })
                .collect();
            let ubuntu = h.is_multiple_of(33);
            HostPackages {
                host: Arc::from(format!("host{h:05}").as_str()),
                release: Some(if ubuntu { u2204.clone() } else { d12.clone() }),
                os: if ubuntu {
                    "ubuntu 22.04".into()
                } else {
                    "debian 12".into()
                },
                packages,
            }
        })
        .collect();

    let t = Instant::now();
    let exposure = plan(&hosts, std::slice::from_ref(&feed));
    let planned = t.elapsed();
    let covered = exposure.hosts.iter().filter(|h| h.covered).count();
    let by_cve = exposure.by_cve().len();
    let peak = peak_rss_mb();

    println!(
        "feed: {entries} entries, parsed in {:.2} s",
        parse.as_secs_f64()
    );
    println!(
        "hosts: {HOSTS} × {PACKAGES_PER_HOST} packages ({covered} covered, {} not covered)",
        HOSTS - covered
    );
    println!(
        "exposure plan: {:.2} s on {} threads; {} open (host, CVE) findings, {by_cve} CVEs",
        planned.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        exposure.findings.len()
    );
    println!("peak memory (VmHWM): {peak:.0} MB");
    let ok = planned.as_secs_f64() <= 5.0 && peak <= 1024.0;
    println!(
        "goal (plan ≤ 5 s, peak ≤ 1 GB): {}",
        if ok { "met" } else { "MISSED" }
    );
    if !ok {
        std::process::exit(1);
    }
}
