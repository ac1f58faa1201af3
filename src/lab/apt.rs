//! apt inside lab hosts: each host's own `/etc/apt`, `/var/lib/apt`,
//! `/var/cache/apt` and `/var/log/apt`, and local apt repositories the hosts
//! install from (`file://` on this machine, `[trusted=yes]`).
//!
//! It owns those per-host trees and the repositories it builds. It must not touch
//! the machine's own apt state: the lists, cache, locks, logs and sources the hosts
//! use are the per-host copies bind-mounted over the real paths in each host's
//! private mount namespace. A host starts with no sources at all, so nothing in a
//! lab ever reaches the network.

use std::path::{Path, PathBuf};

use super::{write, Fleet, LabError};

/// The per-host trees (under the host's folder) and the paths they stand in for.
pub const TREES: &[(&str, &str)] = &[
    ("etc-apt", "/etc/apt"),
    ("lib-apt", "/var/lib/apt"),
    ("cache-apt", "/var/cache/apt"),
    ("log-apt", "/var/log/apt"),
];

/// Folders apt expects to exist in its trees.
const SUBDIRS: &[&str] = &[
    "etc-apt/apt.conf.d",
    "etc-apt/sources.list.d",
    "etc-apt/preferences.d",
    "etc-apt/trusted.gpg.d",
    "etc-apt/keyrings",
    "etc-apt/auth.conf.d",
    "lib-apt/lists/partial",
    "cache-apt/archives/partial",
    "log-apt",
];

/// Puts a host's apt trees in their start state: no sources, empty lists and
/// cache. The tree folders themselves stay (they are mount sources of a running
/// host); only their contents are replaced.
pub(super) fn seed(hdir: &Path) -> Result<(), LabError> {
    for (tree, _) in TREES {
        let d = hdir.join(tree);
        std::fs::create_dir_all(&d).map_err(LabError::io(&d))?;
        super::clear_dir(&d)?;
    }
    for sub in SUBDIRS {
        let d = hdir.join(sub);
        std::fs::create_dir_all(&d).map_err(LabError::io(&d))?;
    }
    Ok(())
}

/// The real paths the trees are mounted over must exist.
pub(super) fn mount_points() {
    for (_, real) in TREES {
        let _ = std::fs::create_dir_all(real);
    }
}

/// The mount commands (each starting with ` && `) that put the host's apt trees in
/// place of the machine's.
pub(super) fn bind_mounts(hdir: &Path) -> String {
    TREES
        .iter()
        .map(|(tree, real)| {
            format!(
                " && mount --bind {} {real}",
                crate::transport::quote::word(&hdir.join(tree).to_string_lossy())
            )
        })
        .collect()
}

/// A local apt repository: `dists/SUITE/main/binary-{all,ARCH}/Packages` and a
/// `Release` naming its origin, label and suite.
#[derive(Debug, Clone)]
pub struct AptRepo {
    pub dir: PathBuf,
    pub suite: String,
}

impl AptRepo {
    /// The sources line a host uses it with.
    pub fn sources_line(&self) -> String {
        format!(
            "deb [trusted=yes] file:{} {} main\n",
            self.dir.display(),
            self.suite
        )
    }
}

/// Builds a repository in `dir` (replacing one there) from `debs`, with
/// `dpkg-scanpackages`. A `label` like `Debian-Security` and a suite like
/// `bookworm-security` make apt call it a security origin.
pub fn build_repo(
    dir: &Path,
    debs: &[PathBuf],
    suite: &str,
    label: &str,
) -> Result<AptRepo, LabError> {
    if !super::which("dpkg-scanpackages") {
        return Err(LabError::MissingTool {
            tool: "dpkg-scanpackages (dpkg-dev)".into(),
        });
    }
    let _ = std::fs::remove_dir_all(dir);
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).map_err(LabError::io(&pool))?;
    for deb in debs {
        let name = deb.file_name().ok_or_else(|| LabError::Io {
            path: deb.clone(),
            source: std::io::Error::other("not a file"),
        })?;
        std::fs::copy(deb, pool.join(name)).map_err(LabError::io(deb))?;
    }
    let out = std::process::Command::new("dpkg-scanpackages")
        .args(["--multiversion", "pool", "/dev/null"])
        .current_dir(dir)
        .output()
        .map_err(|e| LabError::Tool {
            tool: "dpkg-scanpackages".into(),
            status: "did not start".into(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Tool {
            tool: "dpkg-scanpackages".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let arch = native_arch()?;
    let dists = dir.join("dists").join(suite);
    let mut sums = String::new();
    // apt fetches the native architecture's index as well as `all`'s.
    for a in ["all", arch.as_str()] {
        let rel = format!("main/binary-{a}/Packages");
        let p = dists.join(&rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(LabError::io(parent))?;
        }
        std::fs::write(&p, &out.stdout).map_err(LabError::io(&p))?;
        use sha2::{Digest, Sha256};
        sums.push_str(&format!(
            " {} {} {rel}\n",
            hex::encode(Sha256::digest(&out.stdout)),
            out.stdout.len()
        ));
    }
    let date = chrono::Utc::now().to_rfc2822();
    write(
        &dists.join("Release"),
        &format!(
            "Origin: Debian\nLabel: {label}\nSuite: {suite}\nCodename: {suite}\nDate: {date}\n\
             Architectures: all {arch}\nComponents: main\nSHA256:\n{sums}"
        ),
    )?;
    Ok(AptRepo {
        dir: dir.to_path_buf(),
        suite: suite.to_string(),
    })
}

fn native_arch() -> Result<String, LabError> {
    let out = std::process::Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .map_err(|_| LabError::MissingTool {
            tool: "dpkg".into(),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Fleet {
    /// Makes `repo` the only apt source of host `name` and reads its lists (inside
    /// the host, so only the host's own lists change).
    pub fn use_apt_repo(&self, name: &str, repo: &AptRepo) -> Result<(), LabError> {
        let h = self.host(name)?;
        let sources = h.dir.join("etc-apt/sources.list.d");
        super::clear_dir(&sources)?;
        write(&sources.join("lab.list"), &repo.sources_line())?;
        self.apt_update(name)
    }

    /// `apt-get update` inside host `name`.
    pub fn apt_update(&self, name: &str) -> Result<(), LabError> {
        let out = self.exec_in(name, &["env", "LC_ALL=C", "apt-get", "update", "-q"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("E: ") {
            return Err(LabError::Tool {
                tool: format!("apt-get update on {name}"),
                status: out.status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(())
    }

    /// The host's own apt package cache (`/var/cache/apt/archives` inside it).
    pub fn apt_cache_dir(&self, name: &str) -> Result<PathBuf, LabError> {
        Ok(self.host(name)?.dir.join("cache-apt/archives"))
    }
}
