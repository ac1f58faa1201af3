//! The transport layer: run an argv on a host, put a file, get a file.
//!
//! It owns connections and byte movement, and knows nothing of what the commands
//! mean. Commands are argv arrays; the remote side gets them quoted word by word
//! (see [`quote`]), never glued into a shell string from script data. A raw shell
//! string is only ever built by the `shell` primitive, which marks it in the log.
//!
//! Below it sit only `inventory` (the host to reach) and `config` (the `[ssh]`
//! section); it must not import `runtime`, `primitives` or anything else above it,
//! which are the layers that use it.

pub mod local;
pub mod quote;
#[cfg(feature = "lab")]
pub mod sim;
pub mod ssh;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most bytes of stdout (and separately stderr) kept from one command.
/// Anything beyond is drained and dropped, so a chatty host cannot eat the
/// controller's memory.
pub const DEFAULT_OUTPUT_CAP: usize = 1 << 20;

/// Most bytes of [`Command::stdin`] a transport with a session shell sends in the
/// same write as the command (the SSH transport: base64 in a here-document); more
/// goes over a channel of its own. Inline input costs no channel and no round trip
/// of its own, but the host's shell holds it in memory and it travels a third
/// larger.
pub const INLINE_INPUT_MAX: usize = 1 << 20;

/// One command to run on a host.
#[derive(Debug, Clone)]
pub struct Command {
    pub argv: Vec<String>,
    /// Bytes written to the command's stdin, then stdin is closed.
    pub stdin: Option<Vec<u8>>,
    /// A real deadline for the whole command, not a per-read timeout.
    pub timeout: Duration,
    /// Cap on captured stdout and stderr, each.
    pub output_cap: usize,
    /// Set by [`Command::script`]: a transport with a session shell may run the
    /// script in a subshell of it rather than start another shell.
    pub inline: bool,
}

impl Command {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            stdin: None,
            timeout: Duration::from_secs(600),
            output_cap: DEFAULT_OUTPUT_CAP,
            inline: false,
        }
    }

    /// `sh -c SCRIPT NAME ARGS…` for one of patchbook's own fixed scripts (never
    /// text from a playbook): the data arrives as positional parameters. Marked
    /// inline, so a host's session shell runs it without another `sh` process.
    pub fn script(script: &str, name: &str, args: &[&str]) -> Self {
        let mut argv = vec!["sh", "-c", script, name];
        argv.extend_from_slice(args);
        let mut cmd = Command::new(argv);
        cmd.inline = true;
        cmd
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    pub fn output_cap(mut self, cap: usize) -> Self {
        self.output_cap = cap;
        self
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// True when stdout or stderr hit the cap and the rest was dropped.
    pub truncated: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// What an upload left on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub remote_path: String,
    pub size: u64,
    /// SHA-256 as computed by `sha256sum` on the host after the move into place
    /// ([`Transport::put`]), or as sent ([`Transport::put_new`]).
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{host}: cannot connect to {address}: {reason}")]
    Connect {
        host: String,
        address: String,
        reason: String,
    },
    #[error("{host}: host key check failed: {reason}")]
    HostKey { host: String, reason: String },
    #[error("{host}: authentication as {user} failed: {reason}")]
    Auth {
        host: String,
        user: String,
        reason: String,
    },
    #[error("{host}: cannot become {user} with sudo: {reason}")]
    Become {
        host: String,
        user: String,
        reason: String,
    },
    #[error("{host}: `{command}` passed its {timeout:?} deadline and was stopped")]
    Deadline {
        host: String,
        command: String,
        timeout: Duration,
    },
    #[error("{host}: `{command}` ended without an exit status (connection lost?)")]
    NoExitStatus { host: String, command: String },
    #[error("{host}: upload to {remote} arrived corrupted: sent sha256 {sent}, host has {found}")]
    UploadCorrupt {
        host: String,
        remote: String,
        sent: String,
        found: String,
    },
    #[error("{host}: {context}: {source}")]
    Io {
        host: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: ssh: {context}: {message}")]
    Ssh {
        host: String,
        context: String,
        message: String,
    },
    #[error("{host}: {message}")]
    Other { host: String, message: String },
}

impl TransportError {
    /// The host could not be connected to at all (refused, timed out, no route,
    /// handshake or login failed), as opposed to a command failing on it. A host key
    /// that does not match is not this: it is a failure someone must look at.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Auth { .. }
        )
    }
}

/// One host's way in. Implementations keep one session per host and reuse it for
/// every step; they must be safe to call from the worker thread that owns the host.
pub trait Transport: Send + Sync {
    /// Name of the host this transport talks to (for errors and logs).
    fn host(&self) -> &str;

    /// Runs `cmd`, capturing stdout and stderr up to the cap.
    fn run(&self, cmd: &Command) -> Result<Output, TransportError>;

    /// Runs `cmd` and streams its stdout into `sink` (never whole into memory);
    /// stderr is captured up to the cap. Used for backups (`tar -c`).
    fn run_to_writer(&self, cmd: &Command, sink: &mut dyn Write) -> Result<Output, TransportError>;

    /// Uploads `local` to `remote` atomically: temp name with mode 0600, fsync,
    /// `mv -f` into place, `chmod mode`, then re-hash on the host.
    fn put(&self, local: &Path, remote: &str, mode: u32) -> Result<Upload, TransportError>;

    /// Uploads `local` as `remote`, a file that must not exist yet, in a folder only
    /// this run can write to (a private staging folder): no temp name and no move.
    /// The file is fsynced but NOT re-hashed on the host: the returned `sha256` is
    /// what was sent, and the caller checks it on the host in its next command.
    /// Transports without a cheaper way fall back to [`Transport::put`].
    fn put_new(&self, local: &Path, remote: &str, mode: u32) -> Result<Upload, TransportError> {
        self.put(local, remote, mode)
    }

    /// Creates a fresh folder with mode 0700 under `/tmp` that did not exist before
    /// (so no pre-existing path, link or folder is ever reused) and returns its path,
    /// `/tmp/patchbook.TAG.RANDOM`: the tag (a run's, see
    /// [`crate::primitives::backup::staging_tag`]) lets a later process of the same
    /// run find what an interrupted one left.
    fn private_dir(&self, tag: &str) -> Result<String, TransportError> {
        let out = self.run(
            &Command::new(["mktemp", "-d", &format!("/tmp/patchbook.{tag}.XXXXXXXXXX")])
                .timeout(Duration::from_secs(60)),
        )?;
        if !out.success() {
            return Err(TransportError::Other {
                host: self.host().to_string(),
                message: format!(
                    "mktemp -d failed ({}): {}",
                    out.code,
                    out.stderr_str().trim()
                ),
            });
        }
        Ok(out.stdout_str().trim().to_string())
    }

    /// Downloads `remote` into `local`, streaming.
    fn get(&self, remote: &str, local: &Path) -> Result<u64, TransportError>;
}

/// How to reach hosts: builds one [`Transport`] per host on first use.
pub trait Connector: Send + Sync {
    fn connect(&self, host: &crate::inventory::Host) -> Result<Box<dyn Transport>, TransportError>;
}

/// 16 hex digits nobody can guess: from the kernel's random source, or (should
/// that fail) a hash of this process, a counter and the time.
pub fn fresh_token() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).is_ok_and(|n| n == bytes.len()) {
        return hex::encode(bytes);
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!(
        "{}-{}-{:?}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
    );
    hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes())[..8])
}

/// Where a transport may stage files it uploads before moving them into place.
pub fn staging_name(remote: &str) -> PathBuf {
    let p = Path::new(remote);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.patchbook-{}.tmp", std::process::id());
    match p.parent() {
        Some(parent) => parent.join(tmp),
        None => PathBuf::from(tmp),
    }
}

/// The login name of the user running the controller: the default SSH user and
/// the operator a journal names when none is given.
pub fn login_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: getuid never fails; getpwuid returns a static buffer we copy at once.
            unsafe {
                let pw = libc::getpwuid(libc::getuid());
                if pw.is_null() {
                    "unknown".to_string()
                } else {
                    std::ffi::CStr::from_ptr((*pw).pw_name)
                        .to_string_lossy()
                        .into_owned()
                }
            }
        })
}
