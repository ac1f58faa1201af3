//! `patchbook exposure`: fetches the advisory feeds, reads every selected host's
//! installed packages live (read-only, no journal, no host claim) and prints the
//! exposure plan. The plan is also kept as `<state_dir>/advisories/latest.json`,
//! the latest scan `inventory list` counts open CVEs from.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{Cli, CliError};
use crate::advisory::exposure::{plan, Exposure};
use crate::advisory::feed::{self, FeedSource};
use crate::advisory::probe;
use crate::primitives::artifact::ArtifactSettings;
use crate::primitives::{HostCtx, Mode, RunCtx};
use crate::report::exposure::{render_exposure, ExposureFormat};
use crate::runtime::Runtime;

/// Where the latest scan is kept.
pub fn latest_path(state_dir: &Path) -> PathBuf {
    state_dir.join("advisories").join("latest.json")
}

pub fn exposure(
    cli: &Cli,
    selector: &str,
    feeds: &[String],
    format: ExposureFormat,
    out: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    let specs: Vec<String> = if feeds.is_empty() {
        rt.config.advisories.feeds.clone()
    } else {
        feeds.to_vec()
    };
    if specs.is_empty() {
        return Err(CliError::Usage(
            "exposure: no advisory feed given; pass --feed URL or list feeds under \
             [advisories] feeds in patchbook.toml"
                .into(),
        ));
    }
    let settings = ArtifactSettings::from_config(&rt.config, &rt.state_dir);
    let mut loaded = Vec::new();
    for spec in &specs {
        let mut checks = Vec::new();
        let f = feed::fetch(&FeedSource::parse(spec), &settings, &mut checks)
            .map_err(|e| CliError::Other(e.to_string()))?;
        loaded.push(f);
    }
    let hosts = rt.targets(selector)?;
    let run = RunCtx::new("exposure", rt.state_dir.clone(), None, Mode::Apply);
    let scans = crate::rollout::pool::map_bounded(&hosts, rt.forks, |h| {
        let t = rt.transport(h).map_err(|e| format!("{}: {e}", h.name))?;
        let ctx = HostCtx {
            host: h,
            transport: &*t,
            run: &run,
            deadline: None,
        };
        probe::scan(&ctx).map_err(|e| e.to_string())
    });
    let mut scanned = Vec::new();
    let mut failed = Vec::new();
    for s in scans {
        match s {
            Ok(s) => scanned.push(s),
            Err(e) => failed.push(e),
        }
    }
    let exposure = plan(&scanned, &loaded);
    keep_latest(&rt.state_dir, &exposure);
    let text = render_exposure(&exposure, format);
    super::deliver(cli, &text, out)?;
    for f in &failed {
        eprintln!("not scanned: {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Saves the plan for `inventory list`; a failure costs only that, so it is a
/// warning.
fn keep_latest(state_dir: &Path, e: &Exposure) {
    let path = latest_path(state_dir);
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            crate::journal::private::create_dir_all(dir)?;
        }
        let text = serde_json::to_string(e).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)
    };
    if let Err(err) = write() {
        tracing::warn!("the scan was not kept at {}: {err}", path.display());
    }
}

/// Open CVEs per host from the latest scan: (fixable, no fix, covered). Empty
/// when no scan was kept or it cannot be read (then `inventory list` shows no
/// column rather than zeros that would read as clean).
pub fn open_counts(state_dir: &Path) -> std::collections::BTreeMap<String, (u64, u64, bool)> {
    let Ok(text) = std::fs::read_to_string(latest_path(state_dir)) else {
        return Default::default();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        tracing::warn!(
            "{} is not a scan; run `patchbook exposure` again",
            latest_path(state_dir).display()
        );
        return Default::default();
    };
    v["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            Some((
                h["host"].as_str()?.to_string(),
                (
                    h["fixable"].as_u64().unwrap_or(0),
                    h["no_fix"].as_u64().unwrap_or(0),
                    h["covered"].as_bool().unwrap_or(false),
                ),
            ))
        })
        .collect()
}

/// The cell `inventory list` shows for a host.
pub fn open_cell(counts: Option<&(u64, u64, bool)>) -> String {
    match counts {
        None => "-".into(),
        Some((_, _, false)) => "not covered".into(),
        Some((fixable, no_fix, true)) => format!("{} ({no_fix} no fix)", fixable + no_fix),
    }
}
