//! The Debian Security Tracker's JSON (`security-tracker.debian.org/tracker/data/json`):
//! `data[source][CVE].releases[codename] → {status, fixed_version, urgency}`, keyed
//! by *source* package. `resolved` with `fixed_version` `0` is the tracker's way of
//! saying the release was never affected; `open` and `undetermined` are vulnerable
//! with no fix, since nothing is guessed.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{AdvisoryError, FixState, Release, Severity, Statement};

#[derive(Debug, Deserialize)]
struct TrackerCve {
    #[serde(default)]
    releases: BTreeMap<String, TrackerRelease>,
}

#[derive(Debug, Deserialize)]
struct TrackerRelease {
    #[serde(default)]
    status: String,
    #[serde(default)]
    fixed_version: Option<String>,
    #[serde(default)]
    urgency: Option<String>,
}

/// The tracker as serde reads it: source package → CVE id → details.
type TrackerData = BTreeMap<String, BTreeMap<String, TrackerCve>>;

pub fn read(source: &str, value: Value) -> Result<Vec<Statement>, AdvisoryError> {
    let data: TrackerData = serde_json::from_value(value).map_err(|e| AdvisoryError::Parse {
        feed: source.to_string(),
        reason: format!("not Debian Security Tracker JSON: {e}"),
    })?;
    statements(source, data)
}

/// Reads a document straight from its bytes when it is plainly the tracker's:
/// the whole tracker is hundreds of megabytes as a `serde_json::Value` tree, and
/// its typed form is a fraction of that. `Ok(None)` when the document is not
/// plainly the tracker (another format, not JSON, or a shape only the general
/// reader in [`super::feed`] can tell); that reader then decides, as before.
pub fn read_bytes(source: &str, bytes: &[u8]) -> Result<Option<Vec<Statement>>, AdvisoryError> {
    let Ok(data) = serde_json::from_slice::<TrackerData>(bytes) else {
        return Ok(None);
    };
    // The same shapes the format detection tells apart: CSAF and OSV documents
    // whose fields happen to read as the tracker's stay theirs.
    let has = |k: &str| data.contains_key(k);
    if (has("document") && has("vulnerabilities"))
        || (has("id") && (has("affected") || has("modified")))
    {
        return Ok(None);
    }
    let mut ids = data.values().flat_map(|c| c.keys()).peekable();
    if ids.peek().is_none() || !ids.all(|k| k.starts_with("CVE-") || k.starts_with("TEMP-")) {
        return Ok(None);
    }
    statements(source, data).map(Some)
}

fn statements(source: &str, data: TrackerData) -> Result<Vec<Statement>, AdvisoryError> {
    let mut out = Vec::new();
    for (package, cves) in data {
        let package: std::sync::Arc<str> = package.into();
        for (cve, details) in cves {
            // TEMP- ids are tracker placeholders with no CVE yet; they name no
            // vulnerability a compliance report could cite.
            if !cve.starts_with("CVE-") {
                continue;
            }
            let cve: std::sync::Arc<str> = cve.into();
            for (codename, r) in details.releases {
                // Releases the tracker lists but this reader cannot place (sid,
                // unknown codenames) are left out rather than guessed.
                let Some(release) = Release::debian_codename(&codename) else {
                    continue;
                };
                let fixed = r.fixed_version.filter(|v| !v.is_empty());
                let state = match (r.status.as_str(), fixed) {
                    ("not-affected", _) => FixState::NotAffected,
                    ("resolved", Some(v)) if v == "0" => FixState::NotAffected,
                    ("resolved", Some(v)) => FixState::Fixed(v.into()),
                    ("open" | "undetermined" | "resolved", _) => FixState::NoFix,
                    (other, _) => {
                        return Err(AdvisoryError::Parse {
                            feed: source.to_string(),
                            reason: format!("{package} {cve} {codename}: unknown status {other:?}"),
                        })
                    }
                };
                out.push(Statement {
                    cve: cve.clone(),
                    release,
                    package: package.clone(),
                    introduced: None,
                    state,
                    severity: Severity::parse(r.urgency.as_deref().unwrap_or("")),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisory::Distro;

    #[test]
    fn statuses_map_to_fix_states() {
        let v = serde_json::json!({
            "openssl": {
                "CVE-2024-1": {"releases": {
                    "bookworm": {"status": "resolved", "fixed_version": "3.0.11-1~deb12u2", "urgency": "high"},
                    "sid": {"status": "resolved", "fixed_version": "3.1.0-1", "urgency": "high"}
                }},
                "CVE-2024-2": {"releases": {
                    "bookworm": {"status": "resolved", "fixed_version": "0", "urgency": "unimportant"}
                }},
                "CVE-2024-3": {"releases": {"bookworm": {"status": "open", "urgency": "low**"}}},
                "TEMP-0000001-ABCDEF": {"releases": {"bookworm": {"status": "open"}}}
            }
        });
        let s = read("t", v).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].release, Release::new(Distro::Debian, "12"));
        assert_eq!(s[0].state, FixState::Fixed("3.0.11-1~deb12u2".into()));
        assert_eq!(s[0].severity, Severity::High);
        assert_eq!(s[1].state, FixState::NotAffected);
        assert_eq!(s[2].state, FixState::NoFix);
        assert_eq!(s[2].severity, Severity::Low);
    }

    #[test]
    fn an_unknown_status_is_an_error_not_a_guess() {
        let v =
            serde_json::json!({"x": {"CVE-1": {"releases": {"bookworm": {"status": "maybe"}}}}});
        let e = read("feed.json", v).unwrap_err().to_string();
        assert!(e.contains("unknown status \"maybe\""), "{e}");
    }
}
