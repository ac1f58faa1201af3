//! The `sim` transport: a pretend Debian host that answers at once (or after a
//! configured latency), for controller-only scale benchmarks of 10,000 hosts.
//!
//! It owns nothing but an in-memory model of one host: which version of one package
//! is installed and which files were uploaded. It understands just the commands the
//! patch primitives send (the facts probe, `dpkg-query`, the deploy scripts, `mktemp -d`,
//! `tar -c`, `dpkg -i` alone or behind the checked-install wrapper) and answers
//! anything else with exit 0. It is a benchmark transport: it must never be used to
//! prove that a feature works, and it must not touch the controller's files except to
//! read (hash) what is uploaded.
//!
//! Inventory vars: `sim_latency_ms` (added to every command and upload, default 0),
//! `sim_package` (default `acme-agent`), `sim_installed` (version at start, default
//! `1.0.0`), `sim_patched` (version a `dpkg -i` installs, default `1.0.1`).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Command, Output, Transport, TransportError, Upload};
use crate::inventory::Host;

/// What `sh -c PROBE` prints on the pretend host.
const FACTS: &str = "ID=debian\nVERSION_ID=\"12\"\n__arch=x86_64\n__kernel=6.1.0-sim\n__pm=dpkg\n";

/// Exit code of the checked-install wrapper when the staged file's hash is wrong.
const CHANGED_AFTER_UPLOAD: i32 = 97;

#[derive(Debug)]
struct SimState {
    /// Installed version of the package, `None` when it is absent.
    installed: Option<String>,
    /// Remote path → SHA-256 of each uploaded file still on the host.
    staged: Vec<(String, String)>,
    /// Counts `mktemp -d` calls, so every temp folder has its own name.
    temps: u32,
}

/// One pretend host. Cheap: a few strings and a mutex.
pub struct SimTransport {
    host: String,
    latency: Duration,
    package: String,
    patched: String,
    state: Mutex<SimState>,
}

impl SimTransport {
    /// A pretend host configured by the host's `sim_*` vars.
    pub fn for_host(host: &Host) -> Result<Self, TransportError> {
        let text = |key: &str, default: &str| -> Result<String, TransportError> {
            match host.vars.get(key) {
                None => Ok(default.to_string()),
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(v) => Err(TransportError::Other {
                    host: host.name.clone(),
                    message: format!("inventory var {key} must be a non-empty string, got {v}"),
                }),
            }
        };
        let latency_ms = match host.vars.get("sim_latency_ms") {
            None => 0,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| TransportError::Other {
                    host: host.name.clone(),
                    message: format!(
                        "inventory var sim_latency_ms must be a whole number of milliseconds, got {v}"
                    ),
                })?,
        };
        Ok(SimTransport {
            host: host.name.clone(),
            latency: Duration::from_millis(latency_ms),
            package: text("sim_package", "acme-agent")?,
            patched: text("sim_patched", "1.0.1")?,
            state: Mutex::new(SimState {
                installed: Some(text("sim_installed", "1.0.0")?),
                staged: Vec::new(),
                temps: 0,
            }),
        })
    }

    /// The installed version right now (for unit tests and benchmark checks).
    pub fn installed(&self) -> Option<String> {
        self.lock().installed.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps the configured latency, or fails as the real transport would when the
    /// latency alone is past the command's deadline.
    fn wait(&self, cmd: &Command) -> Result<(), TransportError> {
        if self.latency.is_zero() {
            return Ok(());
        }
        if self.latency > cmd.timeout {
            std::thread::sleep(cmd.timeout);
            return Err(TransportError::Deadline {
                host: self.host.clone(),
                command: super::quote::argv(&cmd.argv),
                timeout: cmd.timeout,
            });
        }
        std::thread::sleep(self.latency);
        Ok(())
    }

    fn answer(&self, argv: &[String], stdin: Option<&[u8]>) -> Output {
        let words: Vec<&str> = argv.iter().map(String::as_str).collect();
        let sent = stdin.map(|b| hex::encode(Sha256::digest(b)));
        match words.as_slice() {
            ["sh", "-c", script, ..] if script.contains("/etc/os-release") => ok(FACTS),
            ["sh", "-c", _, "patchbook-stage", file, name, _dir] => {
                let sha = sent.unwrap_or_default();
                self.lock().staged.push((file.to_string(), sha.clone()));
                let argv: Vec<String> = ["sh", "-c", "", "patchbook-fields", file, name]
                    .iter()
                    .map(|w| w.to_string())
                    .collect();
                self.answer(&argv, None)
            }
            ["sh", "-c", _, "patchbook-deploy", sha, _file, _name, _dir, want, back, install @ ..] =>
            {
                if sent.as_deref() != Some(*sha) {
                    return Output {
                        code: 94,
                        stderr: b"patchbook: the upload arrived corrupted".to_vec(),
                        ..Output::default()
                    };
                }
                let seen = |v: &Option<String>| {
                    v.as_ref().map(|v| format!("ii \t{v}")).unwrap_or_default()
                };
                let before = seen(&self.lock().installed);
                if before != *want {
                    return Output {
                        code: 96,
                        stdout: format!("__PB_BEFORE__\n{before}\n__PB_CHANGED__\n").into_bytes(),
                        ..Output::default()
                    };
                }
                let mut out = self.install(install);
                // As the host's script: not read back after a good `dpkg -i`.
                let after = if *back == "0" && out.code == 0 {
                    "__PB_AS_INSTALLED__".to_string()
                } else {
                    seen(&self.lock().installed)
                };
                out.stdout =
                    format!("__PB_BEFORE__\n{before}\n\n__PB_AFTER__\n{after}\n").into_bytes();
                out
            }
            ["sh", "-c", _, "patchbook-fields", file, name] => {
                let st = self.lock();
                let sha = st
                    .staged
                    .iter()
                    .find(|(p, _)| p == file)
                    .map(|(_, h)| h.clone())
                    .unwrap_or_default();
                let mut text = format!("{sha}  {file}\n__PB_FIELDS__\n");
                if name.is_empty() {
                    text.push_str(&format!("{}\n{}\n", self.package, self.patched));
                }
                text.push_str("__PB_BEFORE__\n");
                if let Some(v) = &st.installed {
                    text.push_str(&format!("ii \t{v}\n"));
                }
                ok(&text)
            }
            ["sh", "-c", _, "patchbook-install", sha, file, _name, dir, install @ ..] => {
                let staged = self
                    .lock()
                    .staged
                    .iter()
                    .any(|(p, h)| p == file && h == sha);
                if !staged {
                    return Output {
                        code: CHANGED_AFTER_UPLOAD,
                        stderr: format!("patchbook: {file} changed on the host after upload")
                            .into_bytes(),
                        ..Output::default()
                    };
                }
                let mut out = self.install(install);
                let after = self.lock().installed.clone().unwrap_or_default();
                out.stdout = format!("\n__PB_AFTER__\nii \t{after}\n").into_bytes();
                self.lock().staged.retain(|(p, _)| !p.starts_with(dir));
                out
            }
            ["dpkg", "-i", ..] => self.install(&words),
            ["dpkg-query", rest @ ..] => self.query(rest),
            ["dpkg-deb", ..] => ok(&format!("{}\n{}\n", self.package, self.patched)),
            ["mktemp", "-d", ..] => {
                let mut st = self.lock();
                st.temps += 1;
                ok(&format!("/tmp/patchbook.sim{:06}\n", st.temps))
            }
            ["rm", "-rf", "--", dir] => {
                self.lock().staged.retain(|(p, _)| !p.starts_with(dir));
                ok("")
            }
            ["rpm", ..] => Output {
                code: 127,
                stderr: b"rpm: command not found".to_vec(),
                ..Output::default()
            },
            _ => ok(""),
        }
    }

    fn install(&self, words: &[&str]) -> Output {
        if words.first() == Some(&"dpkg") && words.get(1) == Some(&"-i") {
            self.lock().installed = Some(self.patched.clone());
        }
        ok("")
    }

    fn query(&self, args: &[&str]) -> Output {
        let asked = args.last().copied().unwrap_or_default();
        let Some(version) = self
            .lock()
            .installed
            .clone()
            .filter(|_| asked == self.package)
        else {
            return Output {
                code: 1,
                stderr: format!("dpkg-query: no packages found matching {asked}").into_bytes(),
                ..Output::default()
            };
        };
        let format = args
            .iter()
            .find_map(|a| {
                a.strip_prefix("-f=")
                    .or_else(|| a.strip_prefix("--showformat="))
            })
            .unwrap_or("${Version}");
        let text = format
            .replace("${db:Status-Abbrev}", "ii ")
            .replace("${Version}", &version)
            .replace("${Package}", &self.package)
            .replace("\\t", "\t")
            .replace("\\n", "\n");
        ok(&text)
    }

    /// A tiny archive holding one folder and one file under each requested path.
    fn archive(&self, argv: &[String]) -> Result<Vec<u8>, TransportError> {
        let roots = argv
            .iter()
            .position(|a| a == "--")
            .map(|i| &argv[i + 1..])
            .unwrap_or(&[]);
        let version = self.installed().unwrap_or_default();
        let mut builder = tar::Builder::new(Vec::new());
        let io = |e: std::io::Error| TransportError::Io {
            host: self.host.clone(),
            context: "build the sim archive".into(),
            source: e,
        };
        for root in roots {
            let mut dir = tar::Header::new_gnu();
            dir.set_entry_type(tar::EntryType::Directory);
            dir.set_mode(0o755);
            // Owner and time too: the backup reads them, and a GNU header
            // starts with those fields empty, which no tar accepts.
            dir.set_uid(0);
            dir.set_gid(0);
            dir.set_mtime(0);
            dir.set_size(0);
            dir.set_cksum();
            builder
                .append_data(&mut dir, format!("{root}/"), std::io::empty())
                .map_err(io)?;
            let body = format!("{version}\n");
            let mut file = tar::Header::new_gnu();
            file.set_mode(0o644);
            file.set_uid(0);
            file.set_gid(0);
            file.set_mtime(0);
            file.set_size(body.len() as u64);
            file.set_cksum();
            builder
                .append_data(&mut file, format!("{root}/VERSION"), body.as_bytes())
                .map_err(io)?;
        }
        builder.into_inner().map_err(io)
    }
}

fn ok(stdout: &str) -> Output {
    Output {
        code: 0,
        stdout: stdout.as_bytes().to_vec(),
        ..Output::default()
    }
}

impl Transport for SimTransport {
    fn host(&self) -> &str {
        &self.host
    }

    fn run(&self, cmd: &Command) -> Result<Output, TransportError> {
        self.wait(cmd)?;
        let mut out = self.answer(&cmd.argv, cmd.stdin.as_deref());
        if out.stdout.len() > cmd.output_cap {
            out.stdout.truncate(cmd.output_cap);
            out.truncated = true;
        }
        Ok(out)
    }

    fn run_to_writer(&self, cmd: &Command, sink: &mut dyn Write) -> Result<Output, TransportError> {
        self.wait(cmd)?;
        if cmd.argv.first().map(String::as_str) == Some("tar") {
            let bytes = self.archive(&cmd.argv)?;
            sink.write_all(&bytes)
                .map_err(|source| TransportError::Io {
                    host: self.host.clone(),
                    context: "write the archive".into(),
                    source,
                })?;
            return Ok(ok(""));
        }
        let out = self.answer(&cmd.argv, cmd.stdin.as_deref());
        sink.write_all(&out.stdout)
            .map_err(|source| TransportError::Io {
                host: self.host.clone(),
                context: "write command output".into(),
                source,
            })?;
        Ok(Output {
            stdout: Vec::new(),
            ..out
        })
    }

    fn put(&self, local: &Path, remote: &str, _mode: u32) -> Result<Upload, TransportError> {
        self.wait(&Command::new(["put"]))?;
        let io = |context: String| {
            let host = self.host.clone();
            move |source| TransportError::Io {
                host,
                context,
                source,
            }
        };
        let mut file =
            std::fs::File::open(local).map_err(io(format!("open {}", local.display())))?;
        let mut hash = Sha256::new();
        let mut buf = [0u8; 16 * 1024];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(io(format!("read {}", local.display())))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
        }
        let sha256 = hex::encode(hash.finalize());
        let mut st = self.lock();
        st.staged.retain(|(p, _)| p != remote);
        st.staged.push((remote.to_string(), sha256.clone()));
        Ok(Upload {
            remote_path: remote.to_string(),
            size,
            sha256,
        })
    }

    fn get(&self, remote: &str, local: &Path) -> Result<u64, TransportError> {
        self.wait(&Command::new(["get"]))?;
        let body = format!("{}\n", self.installed().unwrap_or_default());
        std::fs::write(local, &body).map_err(|source| TransportError::Io {
            host: self.host.clone(),
            context: format!("write {} (sim copy of {remote})", local.display()),
            source,
        })?;
        Ok(body.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(vars: &[(&str, serde_json::Value)]) -> SimTransport {
        let mut h = Host::new("s1");
        for (k, v) in vars {
            h.vars.insert(k.to_string(), v.clone());
        }
        SimTransport::for_host(&h).unwrap()
    }

    fn run(t: &SimTransport, argv: &[&str]) -> Output {
        t.run(&Command::new(argv.iter().copied())).unwrap()
    }

    #[test]
    fn dpkg_query_shows_the_seed_then_the_patch_after_dpkg_i() {
        let t = sim(&[]);
        let fmt = "-f=${db:Status-Abbrev}\\t${Version}\\n";
        let before = run(&t, &["dpkg-query", "-W", fmt, "--", "acme-agent"]);
        assert_eq!(before.stdout_str(), "ii \t1.0.0\n");
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"deb").unwrap();
        let up = t
            .put(f.path(), "/tmp/patchbook.sim000001/x.deb", 0o600)
            .unwrap();
        assert_eq!(up.size, 3);
        assert_eq!(up.sha256, hex::encode(Sha256::digest(b"deb")));
        let install = run(
            &t,
            &[
                "sh",
                "-c",
                "check",
                "patchbook-install",
                &up.sha256,
                "/tmp/patchbook.sim000001/x.deb",
                "acme-agent",
                "/tmp/patchbook.sim000001",
                "dpkg",
                "-i",
                "--",
                "/tmp/patchbook.sim000001/x.deb",
            ],
        );
        assert_eq!(install.code, 0);
        assert!(install.stdout_str().ends_with("__PB_AFTER__\nii \t1.0.1\n"));
        let after = run(&t, &["dpkg-query", "-W", fmt, "--", "acme-agent"]);
        assert_eq!(after.stdout_str(), "ii \t1.0.1\n");
        assert_eq!(run(&t, &["dpkg-query", "-W", "--", "other"]).code, 1);
    }

    #[test]
    fn checked_install_of_a_file_never_uploaded_is_refused() {
        let t = sim(&[]);
        let out = run(
            &t,
            &[
                "sh",
                "-c",
                "check",
                "patchbook-install",
                "00",
                "/tmp/f",
                "acme-agent",
                "/tmp",
                "dpkg",
                "-i",
                "--",
                "/tmp/f",
            ],
        );
        assert_eq!(out.code, CHANGED_AFTER_UPLOAD);
        assert_eq!(t.installed().as_deref(), Some("1.0.0"));
    }

    #[test]
    fn tar_returns_an_archive_of_the_requested_paths() {
        let t = sim(&[]);
        let mut sink = Vec::new();
        let cmd = Command::new(["tar", "-cf", "-", "-C", "/", "--", "opt/acme", "etc/acme"]);
        assert!(t.run_to_writer(&cmd, &mut sink).unwrap().success());
        let mut ar = tar::Archive::new(&sink[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "opt/acme/",
                "opt/acme/VERSION",
                "etc/acme/",
                "etc/acme/VERSION"
            ]
        );
    }

    #[test]
    fn latency_is_applied_and_bad_values_are_refused() {
        let t = sim(&[("sim_latency_ms", serde_json::json!(30))]);
        let start = std::time::Instant::now();
        run(&t, &["true"]);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let late = t.run(&Command::new(["true"]).timeout(Duration::from_millis(5)));
        assert!(matches!(late, Err(TransportError::Deadline { .. })));

        let mut h = Host::new("s2");
        h.vars
            .insert("sim_latency_ms".into(), serde_json::json!("soon"));
        let err = SimTransport::for_host(&h).err().unwrap().to_string();
        assert!(err.contains("sim_latency_ms"), "{err}");
    }
}
