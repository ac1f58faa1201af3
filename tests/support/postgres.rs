//! A private PostgreSQL server for one test: `initdb` and `pg_ctl` in a temporary
//! folder, listening only on a Unix socket in that folder (no TCP port, no system
//! service), stopped and removed on drop, even on panic. Debian's server binaries
//! (`.ci/setup` installs `postgresql`) refuse to run as root, so the server runs as
//! the `postgres` OS user, which owns the folder.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running private server. [`PgServer::url`] names a database of its own.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    /// `postgresql://patchbook@<socket dir>/patchbook`.
    pub url: String,
}

/// The newest `/usr/lib/postgresql/<major>/bin` with `initdb` in it.
fn server_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("no /usr/lib/postgresql: run `.ci/setup` as root (it installs postgresql)")
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin: run `.ci/setup` as root")
        .1
}

/// uid and gid of the `postgres` OS user.
fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam takes a NUL-terminated name; the record it returns is read
    // at once, before any other call could reuse its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no `postgres` OS user: run `.ci/setup` as root (it installs postgresql)"
    );
    // SAFETY: checked non-null above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = server_bin();
        let (uid, gid) = postgres_user();
        let dir = tempfile::Builder::new().prefix("pb-pg").tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let server = PgServer {
            url: format!("postgresql://patchbook@{}/patchbook", url_path(dir.path())),
            dir,
            bin,
            uid,
            gid,
        };
        let data = server.data();
        server.as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "patchbook",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c full_page_writes=off",
            server.dir.path().display()
        );
        let log = server.dir.path().join("server.log");
        server.as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        server.as_postgres(
            "createdb",
            &[
                "-h",
                server.dir.path().to_str().unwrap(),
                "-U",
                "patchbook",
                "patchbook",
            ],
        );
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The socket folder, for `psql -h`.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs one SQL statement as the database owner; its output.
    pub fn psql(&self, sql: &str) -> String {
        self.as_postgres(
            "psql",
            &[
                "-h",
                self.dir.path().to_str().unwrap(),
                "-U",
                "patchbook",
                "-d",
                "patchbook",
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ],
        )
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(self.bin.join(tool))
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C.UTF-8")
            .uid(self.uid)
            .gid(self.gid)
            .output()
            .unwrap();
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate: nothing of a test's database needs to survive it.
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", self.data().to_str().unwrap_or_default()])
            .args(["-m", "immediate", "-w", "stop"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .uid(self.uid)
            .gid(self.gid)
            .output();
    }
}

/// A folder as the host of a URL: percent-encoded, so `/` reads as a Unix socket.
fn url_path(p: &Path) -> String {
    p.to_str()
        .unwrap()
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
