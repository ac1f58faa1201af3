//! The minimal in-process libssh2 peer: one connection per host, strict host-key
//! check, public-key auth, then the patch job over ONE exec channel (the whole job as
//! one shell script, the .deb on stdin, the backup tar on stdout) or over SEVEN exec
//! channels (one per step). It is the machine's practical limit, not a tool: no
//! journal, no retries, no policy. Hosts run on `forks` threads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ssh2::{CheckResult, KnownHostFileKind, Session};

pub struct Job {
    /// (name, port) of every host, all on 127.0.0.1.
    pub hosts: Vec<(String, u16)>,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub deb: Vec<u8>,
    pub sha256: String,
    /// The one-channel script (remote.sh with the hash filled in).
    pub script: String,
    pub backups: PathBuf,
    pub forks: usize,
    pub channels: usize,
}

/// Runs the job on every host; returns the failures as "host: reason".
pub fn run(job: &Job) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..job.forks.max(1).min(job.hosts.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, port)) = job.hosts.get(i) else {
                    break;
                };
                if let Err(e) = patch_host(job, name, *port) {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{name}: {e}"));
                }
            });
        }
    });
    failures.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn connect(job: &Job, port: u16) -> Result<Session, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    let mut sess = Session::new().map_err(|e| e.to_string())?;
    sess.set_tcp_stream(tcp);
    sess.method_pref(ssh2::MethodType::HostKey, "ssh-ed25519")
        .map_err(|e| e.to_string())?;
    sess.handshake().map_err(|e| format!("handshake: {e}"))?;
    let mut kh = sess.known_hosts().map_err(|e| e.to_string())?;
    kh.read_file(&job.known_hosts, KnownHostFileKind::OpenSSH)
        .map_err(|e| format!("known_hosts: {e}"))?;
    let (key, _) = sess.host_key().ok_or("no host key")?;
    match kh.check_port("127.0.0.1", port, key) {
        CheckResult::Match => {}
        other => return Err(format!("host key check: {other:?}")),
    }
    sess.userauth_pubkey_file("root", None, &job.key, None)
        .map_err(|e| format!("auth: {e}"))?;
    Ok(sess)
}

/// Runs `command` on a fresh exec channel; stdin bytes go in first, stdout goes to
/// `out`. Fails on a non-zero exit.
fn exec(sess: &Session, command: &str, stdin: &[u8], out: &mut dyn Write) -> Result<(), String> {
    let mut ch = sess
        .channel_session()
        .map_err(|e| format!("channel: {e}"))?;
    ch.exec(command).map_err(|e| format!("exec: {e}"))?;
    if !stdin.is_empty() {
        ch.write_all(stdin).map_err(|e| format!("stdin: {e}"))?;
    }
    ch.send_eof().map_err(|e| format!("eof: {e}"))?;
    std::io::copy(&mut ch, out).map_err(|e| format!("stdout: {e}"))?;
    let mut err = String::new();
    let _ = ch.stderr().read_to_string(&mut err);
    ch.wait_close().map_err(|e| format!("close: {e}"))?;
    let code = ch.exit_status().map_err(|e| e.to_string())?;
    if code != 0 {
        return Err(format!("`{command}` exited {code}: {}", err.trim()));
    }
    Ok(())
}

fn patch_host(job: &Job, name: &str, port: u16) -> Result<(), String> {
    let sess = connect(job, port)?;
    let backup = job.backups.join(format!("{name}.tar"));
    let mut tar = std::fs::File::create(&backup).map_err(|e| format!("backup file: {e}"))?;
    if job.channels <= 1 {
        return exec(&sess, &job.script, &job.deb, &mut tar);
    }
    let staged = format!("/tmp/bench-ssh2-{name}.deb");
    let mut sink = Vec::new();
    exec(
        &sess,
        "dpkg-query -W -f='${Version}' acme-agent",
        &[],
        &mut sink,
    )?;
    exec(
        &sess,
        "tar -cf - --numeric-owner -C / opt/acme",
        &[],
        &mut tar,
    )?;
    exec(
        &sess,
        &format!("umask 077 && cat >{staged}"),
        &job.deb,
        &mut sink,
    )?;
    let check = format!("echo '{}  {staged}' | sha256sum -c --status -", job.sha256);
    exec(&sess, &check, &[], &mut sink)?;
    exec(&sess, &format!("dpkg -i {staged}"), &[], &mut sink)?;
    let mut version = Vec::new();
    exec(
        &sess,
        "dpkg-query -W -f='${Version}' acme-agent",
        &[],
        &mut version,
    )?;
    if version != b"1.0.1" {
        return Err(format!(
            "verify: found {:?}",
            String::from_utf8_lossy(&version)
        ));
    }
    exec(
        &sess,
        &format!("/opt/acme/agent.sh --check && rm -f {staged}"),
        &[],
        &mut sink,
    )
}

/// `fleet ssh2-peer HOSTS KEY KNOWN_HOSTS DEB SHA256 SCRIPT BACKUPS FORKS CHANNELS`
pub fn main(args: &[String]) -> i32 {
    let [hosts, key, known, deb, sha, script, backups, forks, channels] = args else {
        eprintln!(
            "usage: ssh2-peer HOSTS KEY KNOWN_HOSTS DEB SHA256 SCRIPT BACKUPS FORKS CHANNELS"
        );
        return 2;
    };
    let read = |p: &str| std::fs::read(Path::new(p)).map_err(|e| format!("{p}: {e}"));
    let parsed = (|| -> Result<Job, String> {
        let text = String::from_utf8_lossy(&read(hosts)?).into_owned();
        let hosts = text
            .lines()
            .filter_map(|l| {
                let (n, p) = l.split_once(' ')?;
                Some((n.to_string(), p.trim().parse().ok()?))
            })
            .collect();
        Ok(Job {
            hosts,
            key: key.into(),
            known_hosts: known.into(),
            deb: read(deb)?,
            sha256: sha.clone(),
            script: String::from_utf8_lossy(&read(script)?).into_owned(),
            backups: backups.into(),
            forks: forks.parse().map_err(|e| format!("forks: {e}"))?,
            channels: channels.parse().map_err(|e| format!("channels: {e}"))?,
        })
    })();
    let job = match parsed {
        Ok(j) => j,
        Err(e) => {
            eprintln!("ssh2-peer: {e}");
            return 2;
        }
    };
    let failures = run(&job);
    for f in &failures {
        eprintln!("ssh2-peer: {f}");
    }
    i32::from(!failures.is_empty())
}
