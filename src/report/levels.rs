//! Patch levels: each host's last verified version per package, from every run's
//! `verify` records. This is the "update the documentation" step of the process;
//! `patchbook inventory list` shows it next to the inventory.
//!
//! Only an independent check counts: a `verify` record with `ok: true`. A deploy's
//! own read-back is not a patch level.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::journal::state::list_runs_in;
use crate::journal::{Entry, Store};

use super::model::parse_ts;
use super::ReportError;

/// One host's verified version of one package, and where it was verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatchLevel {
    pub version: String,
    pub run: String,
    pub ts: String,
}

/// host → package → level.
pub type PatchLevels = BTreeMap<String, BTreeMap<String, PatchLevel>>;

/// The newest successful `verify` per host and package across every run under
/// `state_dir`. No state directory, or no runs, is no patch levels. Lines of a run
/// file that do not parse are skipped: `patchbook audit verify` is where damage is
/// reported.
pub fn patch_levels(state_dir: &Path) -> Result<PatchLevels, ReportError> {
    patch_levels_in(&Store::file(state_dir))
}

/// [`patch_levels`] across every run of `store`.
pub fn patch_levels_in(store: &Store) -> Result<PatchLevels, ReportError> {
    let mut levels = PatchLevels::new();
    for info in list_runs_in(store)? {
        // A run removed since it was listed has no levels.
        let Some(scan) = store.scan(&info.run)? else {
            continue;
        };
        for (_, rec) in scan.items {
            // A record that does not read as its kind is no evidence of a version.
            let Ok(Entry::Verify(v)) = rec.entry() else {
                continue;
            };
            let (true, Some(host)) = (v.ok, rec.host.as_deref()) else {
                continue;
            };
            let package = v.package.as_str();
            let level = PatchLevel {
                version: v.found.clone(),
                run: info.run.clone(),
                ts: rec.ts.clone(),
            };
            let slot = levels.entry(host.to_string()).or_default();
            let newer = slot
                .get(package)
                .is_none_or(|old| parse_ts(&level.ts) >= parse_ts(&old.ts));
            if newer {
                slot.insert(package.to_string(), level);
            }
        }
    }
    Ok(levels)
}

/// `pkg=version` pairs of one host, comma-separated; `-` when none is known.
pub fn summary(levels: Option<&BTreeMap<String, PatchLevel>>) -> String {
    match levels {
        Some(l) if !l.is_empty() => l
            .iter()
            .map(|(pkg, level)| format!("{pkg}={}", level.version))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    }
}
