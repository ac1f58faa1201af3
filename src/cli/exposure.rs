//! `patchbook exposure`: either scans live (fetches the advisory feeds, reads every
//! selected host's installed packages, read-only and without a host claim, and
//! journals the result as a scan run of its own, `run::scan`), or with
//! `--from-last-scan` renders the newest recorded scan without contacting any
//! host. `inventory list` counts open CVEs from that same recorded scan.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use super::{Cli, CliError};
use crate::report::exposure::{render_exposure, ExposureFormat};
use crate::run::scan::{self, ScanError, ScanRequest};
use crate::runtime::Runtime;

impl From<ScanError> for CliError {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::NoFeeds => CliError::Usage(format!("exposure: {e}")),
            e => CliError::Other(e.to_string()),
        }
    }
}

pub fn exposure(
    cli: &Cli,
    selector: &str,
    feeds: &[String],
    format: ExposureFormat,
    out: Option<&Path>,
    from_last_scan: bool,
) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    if from_last_scan {
        if !feeds.is_empty() {
            return Err(CliError::Usage(
                "exposure: --from-last-scan renders the feeds that scan read; leave out --feed"
                    .into(),
            ));
        }
        let recorded = scan::require_last_scan(&rt.state_dir)?;
        // Only the inventory is read to resolve the selector: no host is contacted.
        let wanted: BTreeSet<String> = rt.targets(selector)?.into_iter().map(|h| h.name).collect();
        let mut e = recorded.exposure;
        e.hosts.retain(|h| wanted.contains(&h.host));
        e.findings.retain(|f| wanted.contains(&*f.host));
        super::deliver(cli, &render_exposure(&e, format), out)?;
        if !cli.global.quiet {
            eprintln!(
                "from scan {} (started {})",
                recorded.run_id,
                recorded.started.as_deref().unwrap_or("at an unknown time")
            );
        }
        for h in recorded.unreachable.iter().filter(|h| wanted.contains(*h)) {
            eprintln!("not scanned then: {h}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = scan::scan(
        &rt,
        &ScanRequest {
            selector: selector.to_string(),
            feeds: feeds.to_vec(),
            notify_min: None,
        },
    )?;
    let text = render_exposure(&outcome.exposure, format);
    super::deliver(cli, &text, out)?;
    for (host, reason) in &outcome.unreachable {
        eprintln!("not scanned: {host}: {reason}");
    }
    Ok(if outcome.unreachable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Open CVEs per host from the last recorded scan: (fixable, no fix, covered).
/// Empty when no scan was recorded or it cannot be read (then `inventory list`
/// shows no column rather than zeros that would read as clean).
pub fn open_counts(state_dir: &Path) -> std::collections::BTreeMap<String, (u64, u64, bool)> {
    let recorded = match scan::last_scan(state_dir) {
        Ok(Some(r)) => r,
        Ok(None) => return Default::default(),
        Err(e) => {
            tracing::warn!("open CVE counts left out: {e}");
            return Default::default();
        }
    };
    let n = |x: usize| u64::try_from(x).unwrap_or(u64::MAX);
    recorded
        .exposure
        .hosts
        .iter()
        .map(|h| (h.host.clone(), (n(h.fixable), n(h.no_fix), h.covered)))
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
