//! A feed: the statements read from one document, with the digest of its bytes.
//! Which reader applies is told by the document's shape, not its name, so a
//! mirror may call the file anything.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::{AdvisoryError, Release, Statement};
use crate::journal::entry::AdvisoryFeed;
use crate::journal::Entry;
use crate::primitives::artifact::{self, ArtifactCheck, ArtifactSettings, ArtifactSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeedFormat {
    Osv,
    DebianTracker,
    CsafVex,
}

impl fmt::Display for FeedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FeedFormat::Osv => "osv",
            FeedFormat::DebianTracker => "debian-tracker",
            FeedFormat::CsafVex => "csaf-vex",
        })
    }
}

/// Where a feed comes from: `URL` or `URL#sha256=HEX` to pin its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedSource {
    pub url: String,
    pub sha256: Option<String>,
}

impl FeedSource {
    pub fn parse(spec: &str) -> FeedSource {
        match spec.rsplit_once("#sha256=") {
            Some((url, sha)) => FeedSource {
                url: url.to_string(),
                sha256: Some(sha.trim().to_ascii_lowercase()),
            },
            None => FeedSource {
                url: spec.to_string(),
                sha256: None,
            },
        }
    }
}

/// One feed, read.
#[derive(Debug, Clone)]
pub struct Feed {
    pub source: String,
    pub format: FeedFormat,
    pub sha256: Arc<str>,
    pub pinned: bool,
    pub statements: Vec<Statement>,
    /// Statement positions per release and source package, for matching.
    index: HashMap<Release, HashMap<Arc<str>, Vec<usize>>>,
    releases: BTreeSet<Release>,
}

impl Feed {
    /// A feed from statements already read (tests, benchmarks, several documents
    /// of one format merged).
    pub fn from_statements(
        source: impl Into<String>,
        format: FeedFormat,
        sha256: impl Into<Arc<str>>,
        statements: Vec<Statement>,
    ) -> Feed {
        let mut index: HashMap<Release, HashMap<Arc<str>, Vec<usize>>> = HashMap::new();
        let mut releases = BTreeSet::new();
        for (i, s) in statements.iter().enumerate() {
            if !releases.contains(&s.release) {
                releases.insert(s.release.clone());
            }
            // Looked up before inserting: a feed names few releases, and cloning
            // the key for every statement would copy one per statement.
            if !index.contains_key(&s.release) {
                index.insert(s.release.clone(), HashMap::new());
            }
            if let Some(by_package) = index.get_mut(&s.release) {
                by_package.entry(s.package.clone()).or_default().push(i);
            }
        }
        Feed {
            source: source.into(),
            format,
            sha256: sha256.into(),
            pinned: false,
            statements,
            index,
            releases,
        }
    }

    /// Reads a feed document of any supported format.
    pub fn parse(source: &str, bytes: &[u8]) -> Result<Feed, AdvisoryError> {
        // The tracker, the largest feed by far, is read from the bytes into its
        // typed form; everything else goes through the shape detection below.
        if let Some(statements) = super::debian::read_bytes(source, bytes)? {
            let format = FeedFormat::DebianTracker;
            return Ok(Feed::from_statements(
                source,
                format,
                sha256_hex(bytes),
                statements,
            ));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| AdvisoryError::Parse {
            feed: source.to_string(),
            reason: format!("not JSON: {e}"),
        })?;
        let format = detect(&value).ok_or_else(|| AdvisoryError::UnknownFormat {
            feed: source.to_string(),
        })?;
        let statements = match format {
            FeedFormat::Osv => super::osv::read(source, value)?,
            FeedFormat::DebianTracker => super::debian::read(source, value)?,
            FeedFormat::CsafVex => super::csaf::read(source, value)?,
        };
        Ok(Feed::from_statements(
            source,
            format,
            sha256_hex(bytes),
            statements,
        ))
    }

    /// Whether the feed says anything about `release`: a host of a release it does
    /// not name is not covered by it.
    pub fn covers(&self, release: &Release) -> bool {
        self.releases.contains(release)
    }

    pub fn releases(&self) -> impl Iterator<Item = &Release> {
        self.releases.iter()
    }

    /// The statements about `package` in `release`.
    pub fn about<'a>(
        &'a self,
        release: &Release,
        package: &str,
    ) -> impl Iterator<Item = &'a Statement> + 'a {
        self.index
            .get(release)
            .and_then(|p| p.get(package))
            .into_iter()
            .flatten()
            .filter_map(|&i| self.statements.get(i))
    }

    /// Every CVE the feed names for `release`, once each.
    pub fn cves(&self, release: &Release) -> BTreeSet<&str> {
        self.statements
            .iter()
            .filter(|s| &s.release == release)
            .map(|s| &*s.cve)
            .collect()
    }

    /// The journal record saying this run read this feed.
    pub fn entry(&self) -> Entry {
        Entry::AdvisoryFeed(AdvisoryFeed {
            source: self.source.clone(),
            format: self.format.to_string(),
            sha256: self.sha256.to_string(),
            pinned: self.pinned,
            statements: self.statements.len(),
        })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Tells the format by the document's shape.
fn detect(v: &Value) -> Option<FeedFormat> {
    match v {
        Value::Array(items) => {
            let first = items.first()?;
            match detect(first)? {
                FeedFormat::DebianTracker => None,
                f => Some(f),
            }
        }
        Value::Object(m) => {
            if m.contains_key("document") && m.contains_key("vulnerabilities") {
                return Some(FeedFormat::CsafVex);
            }
            if m.contains_key("id") && (m.contains_key("affected") || m.contains_key("modified")) {
                return Some(FeedFormat::Osv);
            }
            // The tracker: source package → CVE id → details.
            let mut cves = m
                .values()
                .filter_map(Value::as_object)
                .flat_map(|c| c.keys());
            cves.next()
                .filter(|k| k.starts_with("CVE-") || k.starts_with("TEMP-"))
                .map(|_| FeedFormat::DebianTracker)
        }
        _ => None,
    }
}

/// Fetches a feed as an artifact (trusted sources only; the digest checked when
/// pinned; cached) and reads it. `checks` gets every artifact check made, for the
/// caller to journal with the feed's own record.
pub fn fetch(
    src: &FeedSource,
    settings: &ArtifactSettings,
    checks: &mut Vec<ArtifactCheck>,
) -> Result<Feed, AdvisoryError> {
    let got = match &src.sha256 {
        Some(sha) => artifact::fetch_recorded(
            &ArtifactSpec {
                url: src.url.clone(),
                sha256: sha.clone(),
                size: None,
                signature: None,
            },
            settings,
            checks,
        )?,
        None => artifact::fetch_unpinned(&src.url, settings, checks)?,
    };
    let bytes = std::fs::read(&got.path).map_err(|e| AdvisoryError::Io {
        feed: src.url.clone(),
        detail: format!("cannot read the cached copy {}: {e}", got.path.display()),
    })?;
    let mut feed = Feed::parse(&src.url, &bytes)?;
    feed.pinned = src.sha256.is_some();
    Ok(feed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_read_off_the_end() {
        let s = FeedSource::parse("https://m/x.json#sha256=AB");
        assert_eq!(s.url, "https://m/x.json");
        assert_eq!(s.sha256.as_deref(), Some("ab"));
        assert_eq!(FeedSource::parse("/srv/f.json").sha256, None);
    }

    #[test]
    fn shapes_tell_the_format() {
        let tracker = serde_json::json!({"openssl": {"CVE-2024-1": {"releases": {}}}});
        assert_eq!(detect(&tracker), Some(FeedFormat::DebianTracker));
        let osv = serde_json::json!({"id": "DEBIAN-CVE-1", "modified": "2024-01-01T00:00:00Z"});
        assert_eq!(detect(&osv), Some(FeedFormat::Osv));
        let csaf = serde_json::json!({"document": {}, "vulnerabilities": []});
        assert_eq!(detect(&csaf), Some(FeedFormat::CsafVex));
        assert_eq!(detect(&serde_json::json!({"a": 1})), None);
    }
}
