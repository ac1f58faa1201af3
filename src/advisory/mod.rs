//! Advisory feeds and exposure: which hosts are vulnerable, to what, and what fixes it.
//!
//! This module owns the internal advisory model ([`Statement`]: one CVE, one
//! distribution release, one source package, one fix state), the readers that turn
//! OSV records, the Debian Security Tracker JSON and Red Hat CSAF VEX documents into
//! it, the matching of a host's installed source packages against it
//! ([`exposure`]), and the evidence check after a fix ([`evidence`]). Feeds are
//! fetched as artifacts (`primitives::artifact`: trusted sources, pinned digests,
//! the cache); this module never changes a host and writes no journal itself: it
//! returns typed entries for the caller to journal. It must not know Rhai or the
//! CLI.

pub mod csaf;
pub mod debian;
pub mod evidence;
pub mod exposure;
pub mod feed;
pub mod osv;
pub mod probe;

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::primitives::facts::Facts;
use crate::primitives::version;

pub use exposure::{Exposure, Finding, HostPackages, InstalledPackage, Verdict};
pub use feed::{Feed, FeedFormat, FeedSource};

/// Why a feed could not be used. Every message names the feed.
#[derive(Debug, thiserror::Error)]
pub enum AdvisoryError {
    #[error("advisory feed {feed}: {reason}")]
    Parse { feed: String, reason: String },
    #[error(
        "advisory feed {feed}: not a format patchbook reads (OSV JSON, Debian Security \
         Tracker JSON, CSAF VEX); check the URL points at the feed itself"
    )]
    UnknownFormat { feed: String },
    #[error(transparent)]
    Artifact(#[from] crate::primitives::artifact::ArtifactError),
    #[error("advisory feed {feed}: {detail}")]
    Io { feed: String, detail: String },
}

/// The distributions whose feeds are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    Debian,
    Ubuntu,
    Rhel,
}

impl Distro {
    /// Versions of this distribution's packages compare by dpkg's or rpm's rules.
    pub fn compare(self, a: &str, b: &str) -> Ordering {
        match self {
            Distro::Debian | Distro::Ubuntu => version::dpkg_cmp(a, b),
            Distro::Rhel => version::rpm_cmp(a, b),
        }
    }
}

/// One release of a distribution: `Debian 12`, `Ubuntu 22.04`, `RHEL 9`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Release {
    pub distro: Distro,
    /// `12`, `22.04`, `9` (RHEL: the major version; minor releases share a stream).
    pub version: String,
}

impl Release {
    pub fn new(distro: Distro, version: impl Into<String>) -> Self {
        Release {
            distro,
            version: version.into(),
        }
    }

    /// The release a host runs, from its facts. `None` for a distribution no feed
    /// here describes: such a host is "not covered", never clean. Only RHEL itself
    /// counts as RHEL: a rebuild has its own errata.
    pub fn of_facts(f: &Facts) -> Option<Release> {
        let distro = match f.os_id.as_str() {
            "debian" => Distro::Debian,
            "ubuntu" => Distro::Ubuntu,
            "rhel" => Distro::Rhel,
            _ => return None,
        };
        if f.os_version.is_empty() {
            return None;
        }
        let version = match distro {
            Distro::Rhel => f.os_version.split('.').next().unwrap_or("").to_string(),
            _ => f.os_version.clone(),
        };
        Some(Release { distro, version })
    }

    /// The Debian release a tracker codename names.
    pub fn debian_codename(codename: &str) -> Option<Release> {
        let v = match codename {
            "buster" => "10",
            "bullseye" => "11",
            "bookworm" => "12",
            "trixie" => "13",
            "forky" => "14",
            _ => return None,
        };
        Some(Release::new(Distro::Debian, v))
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = match self.distro {
            Distro::Debian => "Debian",
            Distro::Ubuntu => "Ubuntu",
            Distro::Rhel => "RHEL",
        };
        write!(f, "{d} {}", self.version)
    }
}

/// Severity on one scale for all feeds (Debian urgency, Ubuntu priority, Red Hat
/// impact), lowest first so `>=` reads as "at least".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Unknown,
    Negligible,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// Reads any feed's word for it; unknown words are `Unknown`, not guessed.
    pub fn parse(s: &str) -> Severity {
        match s.trim().trim_end_matches('*').to_ascii_lowercase().as_str() {
            "unimportant" | "negligible" | "none" => Severity::Negligible,
            "low" => Severity::Low,
            "medium" | "moderate" => Severity::Medium,
            "high" | "important" => Severity::High,
            "critical" => Severity::Critical,
            _ => Severity::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Unknown => "unknown",
            Severity::Negligible => "negligible",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a feed says about one source package in one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "version")]
pub enum FixState {
    /// Versions below this one are vulnerable.
    Fixed(Arc<str>),
    /// Vulnerable, no fix published yet (open, undetermined, deferred).
    NoFix,
    /// The release's package was never affected.
    NotAffected,
}

/// One statement of a feed: the internal model every reader produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    pub cve: Arc<str>,
    pub release: Release,
    /// The source package (Debian source, RPM source package name).
    pub package: Arc<str>,
    /// The first vulnerable version, when the feed says (OSV `introduced`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introduced: Option<String>,
    pub state: FixState,
    pub severity: Severity,
}
