//! Package state on a host, read from the package database itself: `installed`,
//! `verify` and `needing`. `verify` never trusts a deploy's exit code; it asks
//! `dpkg-query` or `rpm -q` independently.

use std::cmp::Ordering;

use super::facts::{facts, PackageManager};
use super::version;
use super::{HostCtx, PrimitiveError};
use crate::journal::entry::VerifyRecord;
use crate::journal::Entry;
use crate::transport::Command;

/// What the package database says about one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: String,
    /// dpkg's `db:Status-Abbrev` (`ii`, `iF`, …) or `installed` for rpm.
    pub status: String,
}

impl Installed {
    /// Fully installed and configured, not half-done by a failed maintainer script.
    pub fn healthy(&self) -> bool {
        self.status == "ii" || self.status == "installed"
    }
}

/// Refuses a package name the host's package manager would not accept, before it
/// reaches a command line.
pub fn check_package(step: &str, pm: PackageManager, name: &str) -> Result<(), PrimitiveError> {
    let ok = match pm {
        PackageManager::Rpm => version::valid_rpm_name(name),
        _ => version::valid_deb_package(name),
    };
    if ok {
        Ok(())
    } else {
        Err(PrimitiveError::Refused {
            step: step.to_string(),
            what: "package name".into(),
            value: super::cut(name, 80),
            reason: format!("not a valid {} package name", pm.as_str()),
        })
    }
}

pub fn check_version(step: &str, pm: PackageManager, v: &str) -> Result<(), PrimitiveError> {
    let ok = match pm {
        PackageManager::Rpm => version::valid_rpm_version(v),
        _ => version::valid_deb_version(v),
    };
    if ok {
        Ok(())
    } else {
        Err(PrimitiveError::Refused {
            step: step.to_string(),
            what: "version".into(),
            value: super::cut(v, 80),
            reason: format!("not a valid {} version", pm.as_str()),
        })
    }
}

/// Compares two versions by the rules of the host's package manager.
pub fn compare(pm: PackageManager, a: &str, b: &str) -> Ordering {
    match pm {
        PackageManager::Rpm => version::rpm_cmp(a, b),
        _ => version::dpkg_cmp(a, b),
    }
}

/// The argv that asks the package database about `pkg`.
pub fn query_argv(pm: PackageManager, pkg: &str) -> Vec<String> {
    let words: &[&str] = match pm {
        PackageManager::Rpm => &[
            "rpm",
            "-q",
            "--qf",
            "%{EPOCH}:%{VERSION}-%{RELEASE}\\n",
            "--",
        ],
        _ => &[
            "dpkg-query",
            "-W",
            "-f=${db:Status-Abbrev}\\t${Version}\\n",
            "--",
        ],
    };
    words
        .iter()
        .map(|w| w.to_string())
        .chain([pkg.to_string()])
        .collect()
}

/// Reads what [`query_argv`] printed (only when it succeeded): the installed
/// package, or `None` when it is absent or only its config remains.
pub fn parse_query(pm: PackageManager, stdout: &str) -> Option<Installed> {
    let line = stdout.lines().next().unwrap_or_default().trim_end();
    if line.is_empty() {
        return None;
    }
    match pm {
        PackageManager::Rpm => {
            if line.starts_with("package ") {
                return None;
            }
            let version = line.strip_prefix("(none):").unwrap_or(line).to_string();
            Some(Installed {
                version,
                status: "installed".into(),
            })
        }
        _ => {
            let (status, version) = line.split_once('\t').unwrap_or((line, ""));
            let status = status.trim().to_string();
            // `rc`: removed, config files remain; `un`/`pn`: not installed.
            if version.is_empty() || status.starts_with(['r', 'u', 'p']) {
                return None;
            }
            Some(Installed {
                version: version.to_string(),
                status,
            })
        }
    }
}

/// The installed package, or `None` when it is absent (or only its config remains).
pub fn installed(ctx: &HostCtx, pkg: &str) -> Result<Option<Installed>, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    check_package("installed", pm, pkg)?;
    let timeout = ctx.timeout(std::time::Duration::from_secs(60));
    let out = ctx
        .transport
        .run(&Command::new(query_argv(pm, pkg)).timeout(timeout))?;
    ctx.run.saw_package(
        ctx.name(),
        pkg,
        query_seen(out.success(), &out.stdout_str()),
    );
    if !out.success() {
        return Ok(None);
    }
    Ok(parse_query(pm, &out.stdout_str()))
}

/// What a package query left, as [`super::RunCtx::package_seen`] keeps it and as a
/// host shell's `out=$(QUERY) || out=` holds it: the output without its final
/// newlines, empty when the query failed.
pub fn query_seen(success: bool, stdout: &str) -> String {
    if success {
        stdout.trim_end_matches('\n').to_string()
    } else {
        String::new()
    }
}

/// Checks the package database independently: `pkg` must be fully installed at
/// exactly `expected`. Returns the version found.
pub fn verify(ctx: &HostCtx, pkg: &str, expected: &str) -> Result<String, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    check_version("verify", pm, expected)?;
    check_package("verify", pm, pkg)?;
    if ctx.planning() {
        // What verify would see depends on steps a plan does not take.
        ctx.plan_check("verify", format!("{pkg} = {expected}"), "unknown");
        return Ok(expected.to_string());
    }
    let found = installed(ctx, pkg)?;
    let ok = found
        .as_ref()
        .map(|i| i.healthy() && compare(pm, &i.version, expected) == Ordering::Equal)
        .unwrap_or(false);
    let found_text = match &found {
        None => "not installed".to_string(),
        Some(i) if i.healthy() => i.version.clone(),
        Some(i) => format!("{} (state {}, not fully installed)", i.version, i.status),
    };
    ctx.record(
        "verify",
        Entry::Verify(VerifyRecord {
            package: pkg.to_string(),
            expected: expected.to_string(),
            found: found_text.clone(),
            ok,
        }),
    )?;
    if ok {
        Ok(found.map(|i| i.version).unwrap_or_default())
    } else {
        Err(PrimitiveError::Verify {
            host: ctx.name().to_string(),
            package: pkg.to_string(),
            expected: expected.to_string(),
            found: found_text,
        })
    }
}

/// True when the host has `pkg` installed below `fixed` (an absent package does not
/// need the fix).
pub fn needs(ctx: &HostCtx, pkg: &str, fixed: &str) -> Result<bool, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    check_version("needing", pm, fixed)?;
    Ok(match installed(ctx, pkg)? {
        Some(i) => compare(pm, &i.version, fixed) == Ordering::Less,
        None => false,
    })
}
