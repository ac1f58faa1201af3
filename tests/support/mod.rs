//! Shared harness for the integration tests: real lab fleets and the built binary.
//!
//! A test file gets one fleet shared by all its tests with [`shared_fleet`], or a
//! fleet of its own with [`Lab::start`] (stopped on drop, even on panic). No sshd
//! outlives the test binary: fleets are tied to the thread that starts them by a
//! parent-death signal, and the shared fleet's thread lives until the process exits,
//! when an exit hook also stops it by PID and removes its folder.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

pub mod postgres;
pub mod smtp;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use patchbook::lab::Fleet;

/// Fails (never skips) when the machine cannot run the lab.
pub fn require_lab() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the lab tests need root (mount namespaces, sshd); run them as root after `.ci/setup`"
    );
    for tool in ["/usr/sbin/sshd", "/usr/bin/unshare", "/usr/bin/nsenter"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run `.ci/setup` as root"
        );
    }
}

/// A fleet in its own temporary folder, stopped and removed on drop.
pub struct Lab {
    pub fleet: Fleet,
    dir: tempfile::TempDir,
}

impl Lab {
    pub fn start(n: usize) -> Lab {
        require_lab();
        let dir = tempfile::Builder::new()
            .prefix("lab-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir");
        let fleet = Fleet::up(n, dir.path()).unwrap_or_else(|e| panic!("lab up {n}: {e}"));
        Lab { fleet, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl std::ops::Deref for Lab {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

static SHARED: OnceLock<(Fleet, PathBuf)> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some((fleet, dir)) = SHARED.get() {
        let _ = patchbook::lab::down(fleet.dir());
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One fleet of `n` hosts for every test of this binary (the first caller's `n` wins).
pub fn shared_fleet(n: usize) -> &'static Fleet {
    shared_fleet_of(&vec![patchbook::lab::PkgDb::Dpkg; n])
}

/// [`shared_fleet`] with one host per entry of `kinds`, each with that package
/// database (see `Fleet::start_mixed`).
pub fn shared_fleet_of(kinds: &[patchbook::lab::PkgDb]) -> &'static Fleet {
    let kinds = kinds.to_vec();
    shared_fleet_by(move |d| {
        Fleet::start_mixed(
            &kinds,
            d,
            patchbook::lab::Tie::ToStartingThread,
            patchbook::lab::DpkgDb::Machine,
        )
    })
}

/// [`shared_fleet`] started by `start` in the shared folder (the first caller's
/// `start` wins), e.g. `Fleet::start_behind_bastions`.
pub fn shared_fleet_by<F>(start: F) -> &'static Fleet
where
    F: FnOnce(&Path) -> Result<Fleet, patchbook::lab::LabError> + Send + 'static,
{
    let (fleet, _) = SHARED.get_or_init(|| {
        require_lab();
        let dir = tempfile::Builder::new()
            .prefix("shared-lab-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir")
            .keep();
        // The fleet is started (and so tied) to a thread that never ends before the
        // process does: statics are never dropped, the parent-death signal still fires.
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || {
            let _ = tx.send(start(&d));
            loop {
                std::thread::park();
            }
        });
        let fleet = rx
            .recv()
            .expect("lab thread")
            .unwrap_or_else(|e| panic!("lab up: {e}"));
        // SAFETY: registering a plain extern "C" fn with atexit.
        unsafe {
            libc::atexit(stop_shared);
        }
        (fleet, dir)
    });
    fleet
}

/// Every host of `fleet` has acme-agent at `version`, by its own dpkg database.
pub fn assert_every_host_at(fleet: &Fleet, version: &str) {
    for h in fleet.hosts() {
        assert_eq!(
            fleet
                .installed_version(&h.name, "acme-agent")
                .unwrap()
                .as_deref(),
            Some(version),
            "{}",
            h.name
        );
    }
}

/// Runs the built `patchbook` binary.
pub fn patchbook<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .args(args)
        .output()
        .expect("patchbook binary runs")
}

/// Resident set size of this process in kB.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Whether a PID is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Every file a lab host owns, as `path mode uid gid sha256` lines (symlinks by
/// target, folders by mode and owner): its dpkg database, `/opt`, `/etc/acme`,
/// `/root` and `/var/log/dpkg.log`, and an RPM host's rpm database and
/// os-release too, read from the controller side. Two equal
/// fingerprints mean the host is byte-identical where it can be changed.
pub fn host_fingerprint(fleet: &Fleet, host: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    fn walk(path: &Path, root: &Path, out: &mut Vec<String>) {
        let meta = std::fs::symlink_metadata(path).expect("lab host file");
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .display()
            .to_string();
        let ty = meta.file_type();
        let what = if ty.is_symlink() {
            format!("-> {}", std::fs::read_link(path).unwrap().display())
        } else if ty.is_file() && path.to_string_lossy().ends_with(".sqlite-shm") {
            // SQLite's wal-index (rpm's database): shared memory the first reader
            // after a writer rebuilds; it holds no data, the database and -wal do.
            "wal-index".to_string()
        } else if ty.is_file() {
            hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
        } else if ty.is_dir() {
            "dir".to_string()
        } else {
            "special".to_string()
        };
        out.push(format!(
            "{rel} {:o} {} {} {what}",
            meta.mode(),
            meta.uid(),
            meta.gid()
        ));
        if ty.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, root, out);
            }
        }
    }
    let dir = &fleet.host(host).expect("lab host").dir;
    let mut out = Vec::new();
    for tree in ["dpkg", "opt", "etc-acme", "root", "dpkg.log"] {
        walk(&dir.join(tree), dir, &mut out);
    }
    for tree in ["rpm", "os-release"] {
        if dir.join(tree).exists() {
            walk(&dir.join(tree), dir, &mut out);
        }
    }
    out.join("\n")
}

/// A project folder for a lab test: `patchbook.toml` with the lab's settings (its
/// inventory by absolute path), the repository's stdlib and any `extra` lines
/// (`{dir}` in them stands for the project folder); the state dir is `state/`
/// inside it. Removed on drop.
pub fn lab_project(fleet: &Fleet, prefix: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let lab = std::fs::read_to_string(fleet.dir().join("patchbook.toml")).expect("lab settings");
    let lab = lab.replace(
        "inventory = [\"inventory.toml\"]",
        &format!(
            "inventory = [\"{}\"]",
            fleet.dir().join("inventory.toml").display()
        ),
    );
    std::fs::write(
        dir.path().join("patchbook.toml"),
        format!(
            "stdlib = \"{}/stdlib\"\n{}{lab}",
            env!("CARGO_MANIFEST_DIR"),
            extra.replace("{dir}", &dir.path().display().to_string())
        ),
    )
    .expect("write patchbook.toml");
    dir
}

/// `patchbook --config DIR/patchbook.toml --state-dir DIR/state`, for a folder made
/// by [`lab_project`]; add the verb and its arguments.
pub fn patchbook_in(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_patchbook"));
    cmd.arg("--config")
        .arg(dir.join("patchbook.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"));
    cmd
}

/// `--param mirror=… --param sha_new=… --param sha_old=…`: the lab's package folder
/// and the SHA-256 of acme-agent 1.0.1 (new) and 1.0.0 (old).
pub fn patch_params(fleet: &Fleet) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let sha = |v: &str| {
        hex::encode(Sha256::digest(
            std::fs::read(fleet.deb(v)).expect("lab package"),
        ))
    };
    vec![
        "--param".into(),
        format!("mirror={}", fleet.dir().join("debs").display()),
        "--param".into(),
        format!("sha_new={}", sha("1.0.1")),
        "--param".into(),
        format!("sha_old={}", sha("1.0.0")),
    ]
}

/// Waits (up to 60 s) until `host` has `package` at `version` in its database: for
/// tests that stop a controller in the middle of an install.
pub fn wait_installed(fleet: &Fleet, host: &str, package: &str, version: &str) {
    let started = std::time::Instant::now();
    while fleet
        .installed_version(host, package)
        .expect("installed version")
        .as_deref()
        != Some(version)
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{host} never got {package} {version}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A command's stdout then stderr, as one text for assertions and messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every run id under `state`, sorted (run ids sort by start time).
pub fn run_ids(state: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(state.join("runs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter_map(|n| n.strip_suffix(".jsonl").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The CVEs `host` has open in an exposure plan's JSON (`exposure --format json`),
/// in the plan's order.
pub fn open_cves(plan: &serde_json::Value, host: &str) -> Vec<String> {
    plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("{host} missing: {plan}"))["open"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["cve"].as_str().unwrap().to_string())
        .collect()
}

/// What headless Chromium prints for `url` with the `extra` flags
/// (`--dump-dom`, `--screenshot=…`), in a throwaway profile.
pub fn headless_chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("/usr/bin/chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium is missing: run .ci/setup");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
