//! The local transport: runs argv on the controller itself, for `transport = "local"`
//! hosts and ad-hoc runs. Same contract as SSH: real deadline, capped capture,
//! atomic uploads re-hashed after the move.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{Command, Output, Transport, TransportError, Upload};

pub struct LocalTransport {
    host: String,
}

impl LocalTransport {
    pub fn new(host: impl Into<String>) -> Self {
        LocalTransport { host: host.into() }
    }

    fn io(&self, context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
        let context = context.into();
        move |source| TransportError::Io {
            host: self.host.clone(),
            context,
            source,
        }
    }

    fn spawn(&self, cmd: &Command) -> Result<Child, TransportError> {
        let Some((prog, args)) = cmd.argv.split_first() else {
            return Err(TransportError::Other {
                host: self.host.clone(),
                message: "empty argv".into(),
            });
        };
        let mut c = std::process::Command::new(prog);
        c.args(args)
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so a deadline kills the whole tree.
            .process_group(0);
        c.spawn().map_err(self.io(format!("cannot start `{prog}`")))
    }

    /// Waits for the child until the deadline; kills its process group past it.
    fn wait(
        &self,
        child: &mut Child,
        cmd: &Command,
        started: Instant,
    ) -> Result<i32, TransportError> {
        loop {
            if let Some(status) = child.try_wait().map_err(self.io("wait"))? {
                use std::os::unix::process::ExitStatusExt;
                return Ok(status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            if started.elapsed() >= cmd.timeout {
                // SAFETY: kill(2) on a process group id we created; no memory is touched.
                unsafe {
                    libc::kill(-child.id().cast_signed(), libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(TransportError::Deadline {
                    host: self.host.clone(),
                    command: super::quote::argv(&cmd.argv),
                    timeout: cmd.timeout,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn feed_stdin(child: &mut Child, cmd: &Command) {
        if let (Some(bytes), Some(mut stdin)) = (cmd.stdin.clone(), child.stdin.take()) {
            thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
    }
}

/// Reads a pipe to its end, keeping at most `cap` bytes.
pub(crate) fn read_capped(mut r: impl Read, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

impl Transport for LocalTransport {
    fn host(&self) -> &str {
        &self.host
    }

    fn run(&self, cmd: &Command) -> Result<Output, TransportError> {
        let started = Instant::now();
        let mut child = self.spawn(cmd)?;
        Self::feed_stdin(&mut child, cmd);
        let cap = cmd.output_cap;
        let out = child
            .stdout
            .take()
            .map(|p| thread::spawn(move || read_capped(p, cap)));
        let err = child
            .stderr
            .take()
            .map(|p| thread::spawn(move || read_capped(p, cap)));
        let code = self.wait(&mut child, cmd, started)?;
        let (stdout, t1) = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let (stderr, t2) = err.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(Output {
            code,
            stdout,
            stderr,
            truncated: t1 || t2,
        })
    }

    fn run_to_writer(&self, cmd: &Command, sink: &mut dyn Write) -> Result<Output, TransportError> {
        let started = Instant::now();
        let mut child = self.spawn(cmd)?;
        Self::feed_stdin(&mut child, cmd);
        let cap = cmd.output_cap;
        let err = child
            .stderr
            .take()
            .map(|p| thread::spawn(move || read_capped(p, cap)));
        if let Some(mut stdout) = child.stdout.take() {
            std::io::copy(&mut stdout, sink).map_err(self.io("stream stdout"))?;
        }
        let code = self.wait(&mut child, cmd, started)?;
        let (stderr, truncated) = err.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(Output {
            code,
            stdout: Vec::new(),
            stderr,
            truncated,
        })
    }

    fn put(&self, local: &Path, remote: &str, mode: u32) -> Result<Upload, TransportError> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = super::staging_name(remote);
        let size = {
            let mut src =
                std::fs::File::open(local).map_err(self.io(format!("open {}", local.display())))?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(self.io(format!("create {}", tmp.display())))?;
            dst.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(self.io("chmod 0600"))?;
            let n = std::io::copy(&mut src, &mut dst).map_err(self.io("copy"))?;
            dst.sync_all().map_err(self.io("fsync"))?;
            n
        };
        std::fs::rename(&tmp, remote).map_err(self.io(format!("move into {remote}")))?;
        std::fs::set_permissions(remote, std::fs::Permissions::from_mode(mode))
            .map_err(self.io("chmod"))?;
        let out = self.run(&Command::new(["sha256sum", "--", remote]))?;
        let sha256 = out
            .stdout_str()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Upload {
            remote_path: remote.to_string(),
            size,
            sha256,
        })
    }

    fn get(&self, remote: &str, local: &Path) -> Result<u64, TransportError> {
        std::fs::copy(remote, local).map_err(self.io(format!("copy {remote}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_code_and_output() {
        let t = LocalTransport::new("local");
        let out = t
            .run(&Command::new(["sh", "-c", "echo hi; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(out.code, 3);
        assert_eq!(out.stdout_str(), "hi\n");
        assert_eq!(out.stderr_str(), "err\n");
    }

    #[test]
    fn deadline_is_enforced() {
        let t = LocalTransport::new("local");
        let started = Instant::now();
        let err = t
            .run(&Command::new(["sleep", "30"]).timeout(Duration::from_millis(300)))
            .unwrap_err();
        assert!(matches!(err, TransportError::Deadline { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn output_is_capped() {
        let t = LocalTransport::new("local");
        let out = t
            .run(&Command::new(["sh", "-c", "head -c 5000000 /dev/zero"]).output_cap(1000))
            .unwrap();
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.truncated);
    }
}
