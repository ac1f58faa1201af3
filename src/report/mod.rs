//! Reports of runs and the fleet's patch levels, rendered from the journal.
//!
//! It owns reading a run's records back into a [`RunReport`] (the JSON format too),
//! rendering it as Markdown or one self-contained HTML file with a wave timeline,
//! the `test` record of staging checks ([`TestCase`]), and each host's last
//! verified version per package across runs ([`patch_levels`]). It only ever reads
//! the journal: it must not keep a copy of a run in memory between calls, write
//! records (except [`record_test`], on behalf of the playbook's `test()`), or touch
//! hosts.
//!
//! Submodules: [`model`] (the derived structure and its documented JSON shape),
//! [`markdown`], [`html`] (with [`timeline`]), [`testcase`], [`levels`].

pub mod exposure;
pub mod html;
pub mod levels;
pub mod markdown;
pub mod model;
pub mod sparkline;
pub mod testcase;
pub mod timeline;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::journal::entry::HostStatus;
pub use levels::{patch_levels, patch_levels_in, PatchLevel, PatchLevels};
pub use model::{build, RunReport, SCHEMA};
pub use testcase::{record_test, Metrics, TestCase, TestKind, UnknownTestKind};

use crate::journal::state::{is_scan_run, list_runs_in};
use crate::journal::{JournalError, Store};

/// The run id that names the most recently started run.
pub const LAST: &str = "last";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
    Html,
}

impl Format {
    /// The file extension a report in this format gets.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Markdown => "md",
            Format::Json => "json",
            Format::Html => "html",
        }
    }
}

impl FromStr for Format {
    type Err = ReportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "md" | "markdown" => Ok(Format::Markdown),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            _ => Err(ReportError::UnknownFormat {
                given: s.to_string(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("no runs under {dir}; run a playbook first, or pass --state-dir pointing at the state directory the run used")]
    NoRuns { dir: PathBuf },
    #[error("`{given}` is not a report format; use md, json or html")]
    UnknownFormat { given: String },
    #[error("cannot write the report to {path}; check the folder exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The run id `run` stands for: itself, or for [`LAST`] the most recently started
/// run under `state_dir` that is not an advisory scan (a scheduled scan must not
/// hide the patch run an operator asks about).
pub fn resolve_run(state_dir: &Path, run: &str) -> Result<String, ReportError> {
    resolve_run_in(&Store::file(state_dir), run)
}

/// [`resolve_run`] among the runs of `store`.
pub fn resolve_run_in(store: &Store, run: &str) -> Result<String, ReportError> {
    if run != LAST {
        return Ok(run.to_string());
    }
    let runs = list_runs_in(store)?;
    // A run literally named `last` wins over the alias.
    if runs.iter().any(|r| r.run == LAST) {
        return Ok(LAST.to_string());
    }
    // `last` is the last patch run: a scan run is read by `exposure --from-last-scan`.
    runs.into_iter()
        .rev()
        .find(|r| !is_scan_run(&r.run))
        .map(|r| r.run)
        .ok_or_else(|| ReportError::NoRuns {
            dir: store.location(),
        })
}

/// Reads run `run` (or [`LAST`]) from `state_dir` and derives its report.
pub fn load(state_dir: &Path, run: &str) -> Result<RunReport, ReportError> {
    load_in(&Store::file(state_dir), run)
}

/// [`load`] from `store`: the same records, the same report, whichever store.
pub fn load_in(store: &Store, run: &str) -> Result<RunReport, ReportError> {
    let run = resolve_run_in(store, run)?;
    // The journal's own error names the store and what to do when there is no such run.
    let records = store.read_records(&run)?;
    Ok(build(&run, &records))
}

/// Renders the report of run `run` (or [`LAST`]) from its journal under `state_dir`.
pub fn render(state_dir: &Path, run: &str, format: Format) -> Result<String, ReportError> {
    render_in(&Store::file(state_dir), run, format)
}

/// [`render`] from `store`.
pub fn render_in(store: &Store, run: &str, format: Format) -> Result<String, ReportError> {
    let report = load_in(store, run)?;
    Ok(render_report(&report, format))
}

/// Renders an already derived report.
pub fn render_report(report: &RunReport, format: Format) -> String {
    match format {
        Format::Markdown => markdown::render(report),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(report).unwrap_or_default();
            s.push('\n');
            s
        }
        Format::Html => html::render(report),
    }
}

/// Writes `text` to `path` through a temporary file in the same folder, so a reader
/// never sees half a report.
pub fn write_file(path: &Path, text: &str) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_the_choices_when_wrong() {
        assert_eq!("MD".parse::<Format>().unwrap(), Format::Markdown);
        assert_eq!("html".parse::<Format>().unwrap(), Format::Html);
        let e = "pdf".parse::<Format>().unwrap_err().to_string();
        assert!(e.contains("`pdf`") && e.contains("md, json or html"), "{e}");
    }

    #[test]
    fn last_without_runs_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_run(dir.path(), LAST).unwrap_err().to_string();
        assert!(e.contains("no runs under") && e.contains("runs"), "{e}");
        let e = render(dir.path(), "nope", Format::Json)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no run `nope`"), "{e}");
    }
}
