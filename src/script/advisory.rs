//! Registration of the advisory functions: `advisories(source)` (feeds fetched as
//! artifacts and journaled by digest), `vulnerable(hosts, adv, #{ cve?,
//! min_severity? })` (the hosts a fix exists for, with per host the packages and
//! fixed versions; `needing()` takes the list) and `evidence(host, vulnerable)`
//! (the compliance record after a fix). Thin adapters over [`crate::advisory`]:
//! no matching or version logic lives here.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FuncRegistration, Map, NativeCallContext};

use super::patch::{
    call_deadline, fail, host_message, no_unknown_keys, on_host, session, with_host,
};
use super::register::ScriptHost;
use crate::advisory::exposure::{assess, covered, PackageFinding};
use crate::advisory::feed::{self, FeedSource};
use crate::advisory::{evidence, probe, Feed, Finding, Severity, Verdict};
use crate::run::Session;

type RhaiResult<T> = Result<T, Box<rhai::EvalAltResult>>;

/// Keys of `vulnerable(hosts, adv, #{ … })`; `patchbook check` reads the same list.
pub const VULNERABLE_OPTION_KEYS: &[&str] = &["cve", "min_severity"];

/// Feeds as scripts see them: read once, shared by every call that uses them.
#[derive(Debug, Clone)]
pub struct ScriptAdvisories(pub Arc<Vec<Feed>>);

fn load(
    ctx: &NativeCallContext,
    s: &Session,
    sources: Vec<String>,
) -> RhaiResult<ScriptAdvisories> {
    let mut feeds = Vec::new();
    for spec in sources {
        let src = FeedSource::parse(&spec);
        let mut checks = Vec::new();
        let result = feed::fetch(&src, &s.artifacts, &mut checks);
        if let Some(j) = &s.run.journal {
            let sha = result
                .as_ref()
                .map(|f| f.sha256.clone())
                .unwrap_or_default();
            for c in &checks {
                if let Err(e) = j.note_entry(None, &c.entry(&src.url, &sha)) {
                    return fail(
                        ctx,
                        format!("advisories {}: cannot write the journal: {e}", src.url),
                    );
                }
            }
            if let Ok(f) = &result {
                // Every verdict of this run can be traced to these bytes.
                if let Err(e) = j.note_entry(None, &f.entry()) {
                    return fail(
                        ctx,
                        format!("advisories {}: cannot write the journal: {e}", src.url),
                    );
                }
            }
        }
        match result {
            Ok(f) => feeds.push(f),
            Err(e) => return fail(ctx, e.to_string()),
        }
    }
    Ok(ScriptAdvisories(Arc::new(feeds)))
}

fn string_list(v: &Dynamic, what: &str) -> Result<Vec<String>, String> {
    if let Some(s) = v.clone().try_cast::<rhai::ImmutableString>() {
        return Ok(vec![s.to_string()]);
    }
    match v.clone().try_cast::<Array>() {
        Some(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                x.into_immutable_string()
                    .map(|s| s.to_string())
                    .map_err(|ty| format!("{what}[{i}] is {ty}, not a string"))
            })
            .collect(),
        None => Err(format!(
            "{what} is a string or an array of strings, not {}",
            v.type_name()
        )),
    }
}

fn package_map(p: &PackageFinding, cves: Vec<String>) -> Dynamic {
    let mut m = Map::new();
    m.insert("name".into(), p.package.to_string().into());
    m.insert(
        "binaries".into(),
        Dynamic::from_array(
            p.binaries
                .iter()
                .map(|b| Dynamic::from(b.clone()))
                .collect(),
        ),
    );
    m.insert("installed".into(), p.installed.to_string().into());
    m.insert(
        "fixed".into(),
        p.fixed.as_deref().unwrap_or_default().into(),
    );
    m.insert("feed_sha256".into(), p.feed_sha256.to_string().into());
    m.insert(
        "cves".into(),
        Dynamic::from_array(cves.into_iter().map(Dynamic::from).collect()),
    );
    Dynamic::from_map(m)
}

/// One host's entry: `#{ host, cves, no_fix, packages: [#{ name, binaries,
/// installed, fixed, feed_sha256, cves }] }`.
fn host_entry(
    host: ScriptHost,
    found: &[&Finding],
    no_fix: Vec<String>,
    distro: crate::advisory::Distro,
) -> Dynamic {
    let mut packages: Vec<(PackageFinding, Vec<String>)> = Vec::new();
    let mut cves = Vec::new();
    for f in found {
        cves.push(Dynamic::from(f.cve.to_string()));
        for p in f
            .packages
            .iter()
            .filter(|p| p.verdict == Verdict::VulnerableFixAvailable)
        {
            match packages.iter_mut().find(|(q, _)| q.package == p.package) {
                Some((q, list)) => {
                    // Several CVEs of one package: the highest fixed version closes all.
                    if let (Some(a), Some(b)) = (&p.fixed, &q.fixed) {
                        if distro.compare(a, b).is_gt() {
                            q.fixed = Some(a.clone());
                        }
                    }
                    list.push(f.cve.to_string());
                }
                None => packages.push((p.clone(), vec![f.cve.to_string()])),
            }
        }
    }
    let mut m = Map::new();
    m.insert("host".into(), Dynamic::from(host));
    m.insert("cves".into(), Dynamic::from_array(cves));
    m.insert(
        "no_fix".into(),
        Dynamic::from_array(no_fix.into_iter().map(Dynamic::from).collect()),
    );
    m.insert(
        "packages".into(),
        Dynamic::from_array(
            packages
                .iter()
                .map(|(p, c)| package_map(p, c.clone()))
                .collect(),
        ),
    );
    Dynamic::from_map(m)
}

fn vulnerable(
    ctx: &NativeCallContext,
    s: &Session,
    hosts: Array,
    adv: &ScriptAdvisories,
    opts: &Map,
) -> RhaiResult<Array> {
    if let Err(e) = no_unknown_keys(opts, VULNERABLE_OPTION_KEYS) {
        return fail(ctx, format!("vulnerable: {e}"));
    }
    let only: Option<Vec<String>> = match opts.get("cve") {
        None => None,
        Some(v) => match string_list(v, "`cve`") {
            Ok(l) => Some(l),
            Err(e) => return fail(ctx, format!("vulnerable: {e}")),
        },
    };
    let min = match opts.get("min_severity") {
        None => Severity::Unknown,
        Some(v) => {
            let word = v.to_string();
            match Severity::parse(&word) {
                Severity::Unknown if word != "unknown" => {
                    return fail(
                        ctx,
                        format!("vulnerable: `min_severity` {word:?} is none of negligible, low, medium, high, critical"),
                    )
                }
                sev => sev,
            }
        }
    };
    let mut targets = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.into_iter().enumerate() {
        let ty = h.type_name();
        match h.try_cast::<ScriptHost>() {
            Some(h) => targets.push(h),
            None => {
                return fail(
                    ctx,
                    format!("vulnerable: hosts[{i}] is {ty}, not a Host; pass hosts(\"selector\")"),
                )
            }
        }
    }
    let call = call_deadline();
    let scans = crate::rollout::pool::map_bounded(&targets, s.runtime.forks, |h| {
        with_host(s, &h.0, call, probe::scan)
    });
    let mut out = Array::new();
    let mut errors = Vec::new();
    for (h, scan) in targets.into_iter().zip(scans) {
        let scan = match scan {
            Ok(scan) => scan,
            Err(e) if e.is_unreachable() => {
                s.note_unreachable(
                    h.name(),
                    "vulnerable",
                    &host_message(h.name(), "vulnerable", &e),
                );
                continue;
            }
            Err(e) => {
                errors.push(host_message(h.name(), "vulnerable", &e));
                continue;
            }
        };
        if !covered(&scan, &adv.0) {
            // Never read as clean: say so where the operator looks.
            tracing::warn!(target: "patchbook::log", host = h.name(), "{}: not covered: no advisory feed describes {}", h.name(), scan.os);
            continue;
        }
        let found = assess(&scan, &adv.0);
        let wanted = |f: &&Finding| {
            f.severity >= min
                && only
                    .as_ref()
                    .is_none_or(|l| l.iter().any(|c| **c == *f.cve))
        };
        let fixable: Vec<&Finding> = found
            .values()
            .filter(|f| {
                f.packages
                    .iter()
                    .any(|p| p.verdict == Verdict::VulnerableFixAvailable)
            })
            .filter(wanted)
            .collect();
        let no_fix: Vec<String> = found
            .values()
            .filter(|f| f.verdict == Verdict::VulnerableNoFix)
            .filter(wanted)
            .map(|f| f.cve.to_string())
            .collect();
        if let (false, Some(release)) = (fixable.is_empty(), &scan.release) {
            out.push(host_entry(h, &fixable, no_fix, release.distro));
        }
    }
    if !errors.is_empty() {
        return fail(
            ctx,
            format!(
                "vulnerable: {} host(s) could not be read, so the target list would be incomplete:\n{}",
                errors.len(),
                errors.join("\n")
            ),
        );
    }
    Ok(out)
}

/// The findings a `vulnerable()` entry stands for, rebuilt for the evidence check.
fn findings_of(host: &str, entry: &Map) -> Result<Vec<Finding>, String> {
    let text = |m: &Map, k: &str| m.get(k).map(|v| v.to_string()).unwrap_or_default();
    let mut out: Vec<Finding> = Vec::new();
    let packages = entry
        .get("packages")
        .and_then(|p| p.clone().try_cast::<Array>())
        .ok_or("the entry has no `packages`; pass what vulnerable() returned")?;
    for p in packages {
        let p = p
            .try_cast::<Map>()
            .ok_or("`packages` holds something other than maps")?;
        let cves = p
            .get("cves")
            .map(|c| string_list(c, "`cves`"))
            .transpose()?
            .unwrap_or_default();
        for cve in cves {
            out.push(Finding {
                host: host.into(),
                cve: cve.into(),
                severity: Severity::Unknown,
                verdict: Verdict::VulnerableFixAvailable,
                packages: vec![PackageFinding {
                    package: text(&p, "name").into(),
                    binaries: Vec::new().into(),
                    installed: text(&p, "installed").into(),
                    fixed: Some(text(&p, "fixed").into()),
                    verdict: Verdict::VulnerableFixAvailable,
                    feed_sha256: text(&p, "feed_sha256").into(),
                }],
            });
        }
    }
    Ok(out)
}

pub fn register_advisory(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    engine.register_type_with_name::<ScriptAdvisories>("Advisories");
    engine.register_fn("to_string", |a: &mut ScriptAdvisories| {
        format!("Advisories({} feed(s))", a.0.len())
    });
    FuncRegistration::new_getter("sha256")
        .with_params_info(["adv: &mut Advisories", "Array"])
        .with_comments(["/// The SHA-256 of each feed read, in the order given."])
        .register_into_engine(engine, |a: &mut ScriptAdvisories| {
            Dynamic::from_array(
                a.0.iter()
                    .map(|f| Dynamic::from(f.sha256.clone()))
                    .collect(),
            )
        });

    let s = session_.clone();
    FuncRegistration::new("advisories")
        .with_volatility(true)
        .with_params_info(["source: &str", "Advisories"])
        .with_comments(["/// Reads an advisory feed (OSV JSON, Debian Security Tracker JSON or Red Hat\n/// CSAF VEX) from a `trusted_sources` entry; `URL#sha256=HEX` pins its digest.\n/// The feed's SHA-256 is journaled, so every verdict of the run can be traced to it."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, source: &str| -> RhaiResult<ScriptAdvisories> {
                let s = session(&ctx, &s, "advisories")?;
                load(&ctx, s, vec![source.to_string()])
            },
        );
    let s = session_.clone();
    FuncRegistration::new("advisories")
        .with_volatility(true)
        .with_params_info(["sources: Array", "Advisories"])
        .with_comments(["/// Several feeds read as one: a host is covered when any of them describes its release."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, sources: Array| -> RhaiResult<ScriptAdvisories> {
                let s = session(&ctx, &s, "advisories")?;
                match string_list(&Dynamic::from_array(sources), "sources") {
                    Ok(list) => load(&ctx, s, list),
                    Err(e) => fail(&ctx, format!("advisories: {e}")),
                }
            },
        );

    let s = session_.clone();
    let vuln = move |ctx: NativeCallContext,
                     hosts: Array,
                     adv: ScriptAdvisories,
                     opts: Map|
          -> RhaiResult<Array> {
        let s = session(&ctx, &s, "vulnerable")?;
        vulnerable(&ctx, s, hosts, &adv, &opts)
    };
    let v2 = vuln.clone();
    FuncRegistration::new("vulnerable")
        .with_volatility(true)
        .with_params_info(["hosts: Array", "adv: Advisories", "Array"])
        .with_comments(["/// The hosts with at least one CVE a fix exists for, read live: per host\n/// `#{ host, cves, no_fix, packages: [#{ name, binaries, installed, fixed, cves }] }`.\n/// A host of a release no feed describes is left out and reported \"not covered\".\n/// `needing()` takes the list. Also a method: `hosts(\"all\").vulnerable(adv)`."])
        .register_into_engine(engine, move |ctx: NativeCallContext, hosts: Array, adv: ScriptAdvisories| v2(ctx, hosts, adv, Map::new()));
    FuncRegistration::new("vulnerable")
        .with_volatility(true)
        .with_params_info(["hosts: Array", "adv: Advisories", "opts: Map", "Array"])
        .with_comments([
            "/// vulnerable with options: `#{ cve: \"CVE-…\" or [..], min_severity: \"high\" }`.",
        ])
        .register_into_engine(engine, vuln);

    let s = session_.clone();
    FuncRegistration::new("evidence")
        .with_volatility(true)
        .with_params_info(["host: Host", "vulnerable: Array", "Array"])
        .with_comments(["/// After a fix: reads the host's package database again and journals one\n/// `advisory.evidence` record per CVE of the host's `vulnerable()` entry (CVE,\n/// package, version before and after, fixed version, feed digest, time, closed or\n/// not). Returns them as maps. In `plan` it reads nothing."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, list: Array| -> RhaiResult<Array> {
                let s = session(&ctx, &s, "evidence")?;
                let entry = list.iter().filter_map(|e| e.clone().try_cast::<Map>()).find(|m| {
                    m.get("host")
                        .and_then(|h| h.clone().try_cast::<ScriptHost>())
                        .is_some_and(|h| h.name() == host.name())
                });
                let Some(entry) = entry else {
                    return Ok(Array::new());
                };
                let findings = match findings_of(host.name(), &entry) {
                    Ok(f) => f,
                    Err(e) => return fail(&ctx, format!("{}: evidence: {e}", host.name())),
                };
                let recs = on_host(&ctx, s, &host, "evidence", |hc| evidence::record(hc, &findings))?;
                Ok(recs
                    .into_iter()
                    .map(|r| {
                        let mut m = Map::new();
                        m.insert("cve".into(), r.cve.into());
                        m.insert("name".into(), r.package.into());
                        m.insert("before".into(), r.before.into());
                        m.insert("after".into(), r.after.into());
                        m.insert("fixed".into(), r.fixed.into());
                        m.insert("closed".into(), r.closed.into());
                        Dynamic::from_map(m)
                    })
                    .collect())
            },
        );
}
