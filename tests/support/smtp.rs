//! A real SMTP server on loopback for the notification tests: aiosmtpd from the CI
//! venv (`tests/smtp_sink.py`), each accepted message saved as JSON and read back
//! as a [`Mail`]. Stopped by its Drop guard; it also exits when its stdin closes.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Mail {
    pub rcpt_tos: Vec<String>,
    /// The raw message as received.
    pub data: String,
    pub subject: String,
    pub from: String,
    pub to: String,
    /// Decoded text body.
    pub body: String,
    pub tls: bool,
}

/// aiosmtpd on loopback, saving each message as JSON in a temp folder.
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

pub fn venv_python() -> PathBuf {
    let in_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python");
    let candidates = std::iter::once(in_tree)
        .chain(std::env::var_os("PATCHBOOK_VENV").map(|v| PathBuf::from(v).join("bin/python")));
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return py;
        }
    }
    panic!(
        "no Python venv with aiosmtpd at target/ci-venv or $PATCHBOOK_VENV: run .ci/setup \
         (or set PATCHBOOK_VENV to a venv that has aiosmtpd)"
    );
}

impl SmtpSink {
    pub fn start(starttls: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py");
        // The sink binds a port of the kernel's choosing and says which.
        let mut cmd = Command::new(venv_python());
        cmd.arg(&script).arg(dir.path());
        if let Some((cert, key)) = starttls {
            cmd.arg("--starttls").arg(cert).arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        match line.trim().strip_prefix("ready ").map(str::parse::<u16>) {
            Some(Ok(port)) => SmtpSink { child, port, dir },
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("aiosmtpd did not start (said {line:?}); see its output above");
            }
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
                Mail {
                    rcpt_tos: v["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_string())
                        .collect(),
                    data: v["data"].as_str().unwrap().to_string(),
                    subject: v["subject"].as_str().unwrap().to_string(),
                    from: v["from"].as_str().unwrap().to_string(),
                    to: v["to"].as_str().unwrap().to_string(),
                    body: v["body"].as_str().unwrap().to_string(),
                    tls: v["tls"].as_bool().unwrap(),
                }
            })
            .collect()
    }

    /// aiosmtpd answers 250 after the handler returns, so the file is there by
    /// the time `send` returns; the wait only absorbs scheduling noise.
    pub fn wait_for(&self, n: usize) -> Vec<Mail> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.mails();
            if m.len() >= n || Instant::now() > until {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
