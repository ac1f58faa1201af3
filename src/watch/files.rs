//! Watching the playbook and library folders for saves.
//!
//! Folders are watched recursively, never single files: an editor's atomic save
//! renames a new file over the old one, and a watch on the old file goes dead.
//! Events pass through `notify-debouncer-full` (which stitches rename pairs) and
//! then through a quiet period of our own: a reload starts only once no relevant
//! event arrived for [`WatchTiming::quiet`]. That turns every save style into one
//! reload: an in-place write (truncate, write, close), an atomic rename-over, and
//! vim's backup dance (`file` → `file~`, write a new `file`, delete `file~`, with
//! `.file.swp` and the `4913` probe file along the way).
//!
//! Editor files are ignored (`.*.swp`, `*~`, `#*#`, `.#*`, `4913`), and so are
//! access events: reading the files to compile them must not look like a change.
//! An inotify queue overflow asks for a rescan, which reloads everything. Running
//! out of inotify watches (ENOSPC) becomes an error naming
//! `fs.inotify.max_user_watches`; `--poll` uses notify's polling watcher instead.
//!
//! This module owns event filtering and timing; it must not compile anything.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::{EventKind, PollWatcher, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer_opt, DebounceEventResult, Debouncer, NoCache};

/// How long the watcher waits before it reloads.
#[derive(Debug, Clone, Copy)]
pub struct WatchTiming {
    /// Debouncer timeout for one path's events.
    pub debounce: Duration,
    /// Quiet time across all paths before a reload starts.
    pub quiet: Duration,
    /// Poll interval with `--poll`.
    pub poll: Duration,
}

impl Default for WatchTiming {
    fn default() -> Self {
        WatchTiming {
            debounce: Duration::from_millis(40),
            quiet: Duration::from_millis(50),
            poll: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileWatchError {
    #[error("out of inotify watches while watching {path}; raise the limit with `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d), or run `patchbook watch --poll`")]
    WatchLimit { path: PathBuf },
    #[error("cannot watch {path}: {message}")]
    Watch { path: PathBuf, message: String },
}

/// A file name that belongs to an editor, not to the project.
pub fn ignored_name(name: &str) -> bool {
    (name.starts_with('.') && (name.ends_with(".swp") || name.ends_with(".swx")))
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || name.starts_with(".#")
        || name == "4913"
}

fn ignored_path(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(ignored_name)
}

/// What the reload loop is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Some input changed.
    Files,
    /// Events were lost: reload everything, even if the content hash matches.
    Rescan,
    /// The watcher reported an error (it keeps running).
    Error(String),
}

enum Inner {
    Native(Debouncer<RecommendedWatcher, NoCache>),
    Poll(Debouncer<PollWatcher, NoCache>),
}

/// A running watch over folders. Dropping it stops the watcher.
pub struct FileWatch {
    _inner: Inner,
    rx: Receiver<Change>,
    timing: WatchTiming,
}

fn relevant(kind: &EventKind) -> bool {
    !matches!(kind, EventKind::Access(_))
}

fn map_error(path: &Path, e: notify::Error) -> FileWatchError {
    let enospc = matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC));
    if enospc {
        FileWatchError::WatchLimit {
            path: path.to_path_buf(),
        }
    } else {
        FileWatchError::Watch {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl FileWatch {
    /// Watches each existing folder in `folders` recursively.
    pub fn start(
        folders: &[PathBuf],
        poll: bool,
        timing: WatchTiming,
    ) -> Result<Self, FileWatchError> {
        let (tx, rx) = channel();
        let handler = move |res: DebounceEventResult| match res {
            Ok(events) => {
                if events.iter().any(|e| e.need_rescan()) {
                    let _ = tx.send(Change::Rescan);
                    return;
                }
                let any = events
                    .iter()
                    .any(|e| relevant(&e.kind) && e.paths.iter().any(|p| !ignored_path(p)));
                if any {
                    let _ = tx.send(Change::Files);
                }
            }
            Err(errors) => {
                for e in errors {
                    let _ = tx.send(Change::Error(e.to_string()));
                }
            }
        };
        let first = folders.first().cloned().unwrap_or_default();
        let tick = Some(timing.debounce / 4);
        let mut inner = if poll {
            let cfg = notify::Config::default().with_poll_interval(timing.poll);
            Inner::Poll(
                new_debouncer_opt(timing.debounce, tick, handler, NoCache, cfg)
                    .map_err(|e| map_error(&first, e))?,
            )
        } else {
            Inner::Native(
                new_debouncer_opt(
                    timing.debounce,
                    tick,
                    handler,
                    NoCache,
                    notify::Config::default(),
                )
                .map_err(|e| map_error(&first, e))?,
            )
        };
        for dir in folders.iter().filter(|d| d.is_dir()) {
            let r = match &mut inner {
                Inner::Native(d) => d.watch(dir, RecursiveMode::Recursive),
                Inner::Poll(d) => d.watch(dir, RecursiveMode::Recursive),
            };
            r.map_err(|e| map_error(dir, e))?;
        }
        Ok(FileWatch {
            _inner: inner,
            rx,
            timing,
        })
    }

    /// Waits up to `timeout` for a change, then for the quiet period to pass, and
    /// returns what happened (a rescan wins over plain changes). `None` on timeout.
    pub fn next(&self, timeout: Duration) -> Option<Vec<Change>> {
        let first = match self.rx.recv_timeout(timeout) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
        };
        let mut changes = vec![first];
        let mut quiet_until = Instant::now() + self.timing.quiet;
        loop {
            let left = quiet_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok(c) => {
                    changes.push(c);
                    quiet_until = Instant::now() + self.timing.quiet;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        Some(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_files_are_ignored() {
        for n in [
            ".a.rhai.swp",
            ".a.rhai.swx",
            "a.rhai~",
            "#a.rhai#",
            ".#a.rhai",
            "4913",
        ] {
            assert!(ignored_name(n), "{n}");
        }
        for n in ["a.rhai", "swp.rhai", "4913.rhai"] {
            assert!(!ignored_name(n), "{n}");
        }
    }
}
