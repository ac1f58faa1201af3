//! Compliance evidence: after a fix, the host's package database is read again and
//! each CVE the fix was meant to close is journaled as a typed
//! `advisory.evidence` record, closed or not, with the version before and after and
//! the digest of the feed that named the fix. Never written from a deploy's exit
//! code: only from what the database says now.

use super::probe;
use super::{Finding, Verdict};
use crate::journal::entry::EvidenceRecord;
use crate::journal::Entry;
use crate::primitives::{HostCtx, PrimitiveError};

/// Re-reads the host and records one evidence entry per fixable package of each
/// finding. Returns the records written (in `plan` mode none are written, and
/// none are returned).
pub fn record(ctx: &HostCtx, findings: &[Finding]) -> Result<Vec<EvidenceRecord>, PrimitiveError> {
    if ctx.planning() {
        ctx.plan_check(
            "evidence",
            format!("re-read the package database for {} CVE(s)", findings.len()),
            "unknown",
        );
        return Ok(Vec::new());
    }
    let now = probe::scan(ctx)?;
    let Some(release) = now.release.clone() else {
        return Err(PrimitiveError::step(
            ctx.name(),
            "evidence",
            format!(
                "the host now reports {:?}, a release no feed describes",
                now.os
            ),
        ));
    };
    let mut out = Vec::new();
    for f in findings.iter().filter(|f| &*f.host == ctx.name()) {
        for p in &f.packages {
            let (Verdict::VulnerableFixAvailable, Some(fixed)) = (p.verdict, &p.fixed) else {
                continue;
            };
            let after = now
                .packages
                .iter()
                .filter(|i| i.source == p.package)
                .map(|i| &*i.source_version)
                .min_by(|a, b| release.distro.compare(a, b));
            let (after, closed) = match after {
                Some(v) => (v.to_string(), release.distro.compare(v, fixed).is_ge()),
                // Removing the package closes the CVE too; say so plainly.
                None => ("(not installed)".to_string(), true),
            };
            let rec = EvidenceRecord {
                cve: f.cve.to_string(),
                host: ctx.name().to_string(),
                package: p.package.to_string(),
                before: p.installed.to_string(),
                after,
                fixed: fixed.to_string(),
                feed_sha256: p.feed_sha256.to_string(),
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                closed,
            };
            ctx.record("evidence", Entry::Evidence(rec.clone()))?;
            out.push(rec);
        }
    }
    Ok(out)
}
