//! Exposure at fleet scale: 10,000 simulated hosts (400 installed packages each,
//! Debian 12 and some Ubuntu 22.04 that the feed does not cover) against a
//! 100,000-entry Debian Security Tracker feed (5,000 source packages × 20 CVEs).
//! Prints the feed's parse time, the exposure plan's time, the findings, the
//! process's peak memory, and (no goal, for scale) the time to build the text
//! table from the plan. Goal: plan ≤ 5 s and peak ≤ 1 GB on the 2-core machine;
//! each figure says "goal met" or "MISSED", and the process exits 1 on a miss.
//! Run with `cargo bench --bench advisory`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use patchbook::advisory::exposure::plan;
use patchbook::advisory::{Distro, Feed, HostPackages, InstalledPackage, Release};
use patchbook::report::exposure::{render_exposure, ExposureFormat};

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
    let t = Instant::now();
    let by_cve = exposure.by_cve().len();
    let per_cve = t.elapsed();
    let peak = peak_rss_mb();
    // The views a user reads: every host's open CVEs and every CVE's hosts.
    let t = Instant::now();
    let table = render_exposure(&exposure, ExposureFormat::Table);
    let rendered = t.elapsed();
    let peak_rendered = peak_rss_mb();

    let verdict = |ok: bool| if ok { "goal met" } else { "MISSED" };
    let plan_ok = planned.as_secs_f64() <= 5.0;
    let peak_ok = peak <= 1024.0;
    println!(
        "machine: {} threads available, {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model()
    );
    println!(
        "feed: {entries} entries, {} statements",
        feed.statements.len()
    );
    println!(
        "hosts: {HOSTS} × {PACKAGES_PER_HOST} packages ({covered} covered, {} not covered)",
        HOSTS - covered
    );
    println!(
        "findings: {} open (host, CVE) pairs, {by_cve} CVEs",
        exposure.findings.len()
    );
    println!(
        "parse seconds: {:.2} (feed read; no goal)",
        parse.as_secs_f64()
    );
    println!(
        "plan seconds: {:.2} (goal ≤ 5 s): {}",
        planned.as_secs_f64(),
        verdict(plan_ok)
    );
    println!(
        "per-CVE view seconds: {:.2} (no goal)",
        per_cve.as_secs_f64()
    );
    println!(
        "peak MB: {peak:.0} (VmHWM after the plan; goal ≤ 1024 MB): {}",
        verdict(peak_ok)
    );
    println!(
        "table render seconds: {:.2}, {} MB of text, peak MB after it: {peak_rendered:.0} (no goal)",
        rendered.as_secs_f64(),
        table.len() >> 20
    );
    println!(
        "goal (plan ≤ 5 s, peak ≤ 1 GB): {}",
        verdict(plan_ok && peak_ok)
    );
    if !(plan_ok && peak_ok) {
        std::process::exit(1);
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}
