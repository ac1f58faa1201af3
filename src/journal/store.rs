//! Where a state directory's run records live: run files under `<state>/runs/` (the
//! zero-setup default) or a PostgreSQL database (`--store postgres://…`,
//! `PATCHBOOK_STORE`, `[store] url`). Every path that opens, lists or reads a run
//! goes through [`Store`], so resume, rollback, reports and `audit verify` read both
//! the same way: the same records, parsed by the same code, checked by the same
//! chain. It owns the choice between the two and nothing else: the record format
//! and its checks are the journal's, the SQL is [`super::pg`]'s. The run lock, the
//! audit index, backups and cached files stay in the state directory with either.

use std::path::{Path, PathBuf};

use super::{pg, scan_lines, Journal, JournalError, Record, Scan};

/// The store of a state directory's runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// `<state_dir>/runs/<run>.jsonl`.
    File { state_dir: PathBuf },
    /// The `runs` and `records` tables of a PostgreSQL database.
    Postgres { state_dir: PathBuf, url: String },
}

impl Store {
    /// Run files in `state_dir`.
    pub fn file(state_dir: &Path) -> Self {
        Store::File {
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// The store a URL names: `postgres://…` or `postgresql://…` is PostgreSQL;
    /// none, or `file`, is the run files of `state_dir`.
    pub fn from_url(state_dir: &Path, url: Option<&str>) -> Result<Self, JournalError> {
        match url.map(str::trim) {
            None | Some("" | "file") => Ok(Store::file(state_dir)),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Store::Postgres {
                    state_dir: state_dir.to_path_buf(),
                    url: u.to_string(),
                })
            }
            Some(u) => Err(JournalError::BadStoreUrl {
                url: pg::shown_url(u),
            }),
        }
    }

    /// The state directory: locks, the audit index, backups and files, with either store.
    pub fn state_dir(&self) -> &Path {
        match self {
            Store::File { state_dir } | Store::Postgres { state_dir, .. } => state_dir,
        }
    }

    /// Where a run's records are, for messages: its file, or `URL#run`.
    pub fn run_location(&self, run: &str) -> PathBuf {
        match self {
            Store::File { state_dir } => Journal::run_path(state_dir, run),
            Store::Postgres { url, .. } => PathBuf::from(format!("{}#{run}", pg::shown_url(url))),
        }
    }

    /// Where the store keeps its runs, for messages.
    pub fn location(&self) -> PathBuf {
        match self {
            Store::File { state_dir } => state_dir.join("runs"),
            Store::Postgres { url, .. } => PathBuf::from(pg::shown_url(url)),
        }
    }

    /// The run ids this store holds (unsorted for files, by id for PostgreSQL).
    pub fn run_names(&self) -> Result<Vec<String>, JournalError> {
        match self {
            Store::File { state_dir } => {
                let dir = state_dir.join("runs");
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(source) => return Err(JournalError::Io { path: dir, source }),
                };
                let mut out = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|source| JournalError::Io {
                        path: dir.clone(),
                        source,
                    })?;
                    if let Some(name) = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".jsonl"))
                    {
                        out.push(name.to_string());
                    }
                }
                Ok(out)
            }
            Store::Postgres { url, .. } => {
                let mut client = pg::connect(url)?;
                pg::run_names(&mut client).map_err(|e| pg::store_error(url, &e))
            }
        }
    }

    /// A run's records read leniently (see [`scan_lines`]); `None` when the store
    /// has no such run.
    pub(crate) fn scan(&self, run: &str) -> Result<Option<Scan<Record>>, JournalError> {
        self.scan_as(run)
    }

    /// [`Store::scan`] into any shape a record's line reads as: a shape with fewer
    /// fields skips the rest (a record's `data` included) without building it.
    pub(crate) fn scan_as<T: serde::de::DeserializeOwned>(
        &self,
        run: &str,
    ) -> Result<Option<Scan<T>>, JournalError> {
        match self {
            Store::File { state_dir } => {
                let path = Journal::run_path(state_dir, run);
                if !path.exists() {
                    return Ok(None);
                }
                scan_lines(&path).map(Some)
            }
            Store::Postgres { url, .. } => {
                let mut client = pg::connect(url)?;
                let Some(lines) =
                    pg::lines(&mut client, run).map_err(|e| pg::store_error(url, &e))?
                else {
                    return Ok(None);
                };
                Ok(Some(scan_rows(&lines)))
            }
        }
    }

    /// Every record of a run, in order. A run the store does not hold is
    /// [`JournalError::NoSuchRun`]; an unreadable record is [`JournalError::Corrupt`].
    pub fn read_records(&self, run: &str) -> Result<Vec<Record>, JournalError> {
        let Some(scan) = self.scan(run)? else {
            return Err(JournalError::NoSuchRun {
                run: run.to_string(),
                dir: self.location(),
            });
        };
        if let Some((line, message)) = scan.bad.into_iter().next() {
            return Err(JournalError::Corrupt {
                path: self.run_location(run),
                line,
                message,
            });
        }
        Ok(scan.items.into_iter().map(|(_, r)| r).collect())
    }
}

/// Rows of the `records` table read as a scan: row N is "line" N. A database
/// write is whole or absent, so nothing is ever torn.
pub(crate) fn scan_rows<T: serde::de::DeserializeOwned>(lines: &[String]) -> Scan<T> {
    let mut scan = Scan {
        items: Vec::new(),
        bad: Vec::new(),
        torn: None,
        good_len: 0,
        total_len: 0,
    };
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<T>(line) {
            Ok(r) => scan.items.push((i + 1, r)),
            Err(e) => scan.bad.push((i + 1, e.to_string())),
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_picks_the_store_and_hides_its_password() {
        let dir = Path::new("/var/lib/patchbook");
        assert_eq!(Store::from_url(dir, None).unwrap(), Store::file(dir));
        assert_eq!(
            Store::from_url(dir, Some("file")).unwrap(),
            Store::file(dir)
        );
        let pg = Store::from_url(dir, Some("postgres://pb:hunter2@db/patchbook")).unwrap();
        assert!(matches!(pg, Store::Postgres { .. }));
        assert_eq!(pg.state_dir(), dir);
        let shown = pg.run_location("r1").display().to_string();
        assert!(
            shown.ends_with("#r1") && !shown.contains("hunter2"),
            "{shown}"
        );
        let e = Store::from_url(dir, Some("mysql://x:hunter2@db/y")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("postgres://") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn database_rows_that_do_not_parse_are_reported_by_row() {
        let scan = scan_rows::<Record>(&["{}".to_string(), "not json".to_string()]);
        assert!(scan.items.is_empty() && scan.torn.is_none());
        assert_eq!(scan.bad.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
    }
}
