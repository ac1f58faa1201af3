//! OSV records (the `osv` crate's schema) for the `Debian:N` and `Ubuntu:N.NN[:LTS]`
//! ecosystems. Each `ECOSYSTEM` range's introduced/fixed pair becomes one
//! statement; a range with no `fixed` event is vulnerable with no fix. The CVE is
//! the record's id when it is one, else the first CVE among `upstream` and
//! `aliases` (`UBUNTU-CVE-…`, `DEBIAN-CVE-…`, `DSA-…`).

use osv::schema::{Ecosystem, Event, RangeType, SeverityType, Vulnerability};
use serde_json::Value;

use super::{AdvisoryError, Distro, FixState, Release, Severity, Statement};

pub fn read(source: &str, value: Value) -> Result<Vec<Statement>, AdvisoryError> {
    let records = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    let mut out = Vec::new();
    for (i, record) in records.into_iter().enumerate() {
        let vuln: Vulnerability = match serde_json::from_value(record) {
            Ok(v) => v,
            // An ecosystem the crate does not know is no release a host here runs.
            Err(e) if e.to_string().contains("unknown variant") => continue,
            Err(e) => {
                return Err(AdvisoryError::Parse {
                    feed: source.to_string(),
                    reason: format!("OSV record {i}: {e}"),
                })
            }
        };
        statements(&vuln, &mut out);
    }
    Ok(out)
}

fn cve_of(v: &Vulnerability) -> String {
    if v.id.starts_with("CVE-") {
        return v.id.clone();
    }
    v.upstream
        .iter()
        .flatten()
        .chain(v.aliases.iter().flatten())
        .find(|a| a.starts_with("CVE-"))
        .cloned()
        .unwrap_or_else(|| v.id.clone())
}

fn release_of(e: &Ecosystem) -> Option<Release> {
    match e {
        Ecosystem::Debian(Some(v)) if v.chars().all(|c| c.is_ascii_digit()) => {
            Some(Release::new(Distro::Debian, v.clone()))
        }
        // Pro, FIPS and "for:" streams carry other packages than a plain host.
        Ecosystem::Ubuntu {
            version,
            metadata: None,
            fips: None,
            pro: false,
            ..
        } => Some(Release::new(Distro::Ubuntu, version.clone())),
        _ => None,
    }
}

fn severity_of(list: Option<&Vec<osv::schema::Severity>>) -> Option<Severity> {
    list?
        .iter()
        .filter(|s| matches!(s.severity_type, SeverityType::Ubuntu))
        .map(|s| Severity::parse(&s.score))
        .find(|s| *s != Severity::Unknown)
}

fn word(v: Option<&Value>, key: &str) -> Option<Severity> {
    v?.get(key)?
        .as_str()
        .map(Severity::parse)
        .filter(|s| *s != Severity::Unknown)
}

fn statements(v: &Vulnerability, out: &mut Vec<Statement>) {
    if v.withdrawn.is_some() {
        return;
    }
    let cve: std::sync::Arc<str> = cve_of(v).into();
    let top = severity_of(v.severity.as_ref())
        .or_else(|| word(v.database_specific.as_ref(), "severity"))
        .unwrap_or_default();
    for a in v.affected.iter().flatten() {
        let Some(pkg) = &a.package else { continue };
        let Some(release) = release_of(&pkg.ecosystem) else {
            continue;
        };
        let severity = severity_of(a.severity.as_ref())
            .or_else(|| word(a.ecosystem_specific.as_ref(), "urgency"))
            .or_else(|| word(a.database_specific.as_ref(), "severity"))
            .unwrap_or(top);
        for r in a.ranges.iter().flatten() {
            if !matches!(r.range_type, RangeType::Ecosystem) {
                continue;
            }
            let mut introduced: Option<String> = None;
            let mut push = |introduced: Option<String>, state: FixState| {
                out.push(Statement {
                    cve: cve.clone(),
                    release: release.clone(),
                    package: pkg.name.as_str().into(),
                    introduced: introduced.filter(|i| i != "0"),
                    state,
                    severity,
                })
            };
            for e in &r.events {
                match e {
                    Event::Introduced(i) => {
                        if let Some(open) = introduced.replace(i.clone()) {
                            push(Some(open), FixState::NoFix);
                        }
                    }
                    Event::Fixed(f) => push(introduced.take(), FixState::Fixed(f.as_str().into())),
                    // Without a fixed version a host past the last affected one
                    // cannot be told apart from one with no fix: say no fix.
                    _ => {}
                }
            }
            if let Some(open) = introduced {
                push(Some(open), FixState::NoFix);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ubuntu_and_debian_records_become_statements() {
        let v = serde_json::json!([
            {"id": "UBUNTU-CVE-2024-1", "modified": "2024-01-01T00:00:00Z", "upstream": ["CVE-2024-1"],
             "affected": [
                {"package": {"ecosystem": "Ubuntu:22.04:LTS", "name": "openssl"},
                 "severity": [{"type": "Ubuntu", "score": "high"}],
                 "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.2-0ubuntu1.15"}]}]},
                {"package": {"ecosystem": "Ubuntu:Pro:16.04:LTS", "name": "openssl"},
                 "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}]}
             ]},
            {"id": "DEBIAN-CVE-2024-2", "modified": "2024-01-01T00:00:00Z", "aliases": ["CVE-2024-2"],
             "affected": [{"package": {"ecosystem": "Debian:12", "name": "glibc"},
                 "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "2.36-1"}]}]}]},
            {"id": "X-1", "modified": "2024-01-01T00:00:00Z", "affected": [
                {"package": {"ecosystem": "NoSuchEcosystem", "name": "x"}}]}
        ]);
        let s = read("f", v).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(&*s[0].cve, "CVE-2024-1");
        assert_eq!(s[0].release, Release::new(Distro::Ubuntu, "22.04"));
        assert_eq!(s[0].state, FixState::Fixed("3.0.2-0ubuntu1.15".into()));
        assert_eq!(s[0].severity, Severity::High);
        assert_eq!(s[0].introduced, None);
        assert_eq!(&*s[1].cve, "CVE-2024-2");
        assert_eq!(s[1].state, FixState::NoFix);
        assert_eq!(s[1].introduced.as_deref(), Some("2.36-1"));
    }
}
