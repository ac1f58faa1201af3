//! Everything patchbook writes in its state directory is private (0700 folders,
//! 0600 files) whatever the umask, and `audit verify` names anything looser.
//! The binary runs in a child shell with `umask 022`, the common default under
//! which a backup of `/etc/shadow` used to land world-readable.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_patchbook");

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("scripts")).unwrap();
        std::fs::create_dir_all(p.join("host/data")).unwrap();
        std::fs::create_dir_all(p.join("pool")).unwrap();
        std::fs::write(p.join("host/data/secret.conf"), "password=hunter2\n").unwrap();
        std::fs::write(p.join("host/target.conf"), "old\n").unwrap();
        std::fs::write(p.join("scripts/new.conf"), "new\n").unwrap();
        std::fs::write(p.join("pool/fix.deb"), b"not really a package").unwrap();
        std::fs::write(p.join("inv.toml"), "[hosts.local]\ntransport = \"local\"\n").unwrap();
        std::fs::write(
            p.join("patchbook.toml"),
            format!(
                "inventory = [\"inv.toml\"]\ntrusted_sources = [\"{}\"]\n",
                p.join("pool").display()
            ),
        )
        .unwrap();
        let sha = hex::encode(Sha256::digest(b"not really a package"));
        std::fs::write(
            p.join("scripts/touch.rhai"),
            format!(
                "let h = hosts(\"all\")[0];\n\
                 backup(h, [\"{data}\"]);\n\
                 let a = artifact(\"{pool}/fix.deb\", #{{ sha256: \"{sha}\" }});\n\
                 put_file(h, \"new.conf\", \"{target}\");\n",
                data = p.join("host/data").display(),
                pool = p.join("pool").display(),
                target = p.join("host/target.conf").display(),
            ),
        )
        .unwrap();
        Project { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join(".patchbook")
    }

    /// Runs the binary under `sh -c 'umask 022; exec …'`.
    fn patchbook(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg("umask 022; exec \"$0\" \"$@\"")
            .arg(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }
}

fn every_path(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), meta.permissions().mode() & 0o7777, meta.is_dir()));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

/// The path as the state dir's own relative form prints it (from `.patchbook/`).
fn name(p: &Path) -> String {
    let s = p.display().to_string();
    s[s.find(".patchbook").unwrap_or(0)..].to_string()
}

fn names(paths: &[(PathBuf, u32, bool)], root: &Path) -> Vec<String> {
    paths
        .iter()
        .map(|(p, _, _)| p.strip_prefix(root).unwrap().display().to_string())
        .collect()
}

#[test]
fn a_run_under_umask_022_leaves_only_private_state() {
    let p = Project::new();
    let out = p.patchbook(&["run", "scripts/touch.rhai"]);
    assert!(
        out.status.success(),
        "run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let state = p.state();
    let all = every_path(&state);
    let seen = names(&all, &state);
    // Each kind of state the issue lists must actually be there to be checked.
    for want in ["runs", "backups", "files", "cache", "audit"] {
        assert!(
            seen.iter().any(|n| n.starts_with(want) || n.contains(want)),
            "no {want} in the state dir: {seen:?}"
        );
    }
    assert!(
        seen.iter().any(|n| n.ends_with(".tar")),
        "no backup archive: {seen:?}"
    );
    assert!(
        seen.iter().any(|n| n.ends_with(".jsonl")),
        "no journal: {seen:?}"
    );
    for (path, mode, is_dir) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(
            *mode,
            want,
            "{} is {mode:04o}, want {want:04o}",
            path.display()
        );
    }
    let audit = p.patchbook(&["audit", "verify"]);
    assert!(audit.status.success());
    assert!(
        !String::from_utf8_lossy(&audit.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
}

#[test]
fn audit_verify_names_each_loose_path_and_keeps_its_exit_code() {
    let p = Project::new();
    let out = p.patchbook(&["run", "scripts/touch.rhai"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = p.state();
    let archive = every_path(&state)
        .into_iter()
        .find(|(p, _, _)| p.extension().is_some_and(|e| e == "tar"))
        .unwrap()
        .0;
    // What an older patchbook (or a careless copy) left: a readable state dir and
    // a world-readable backup.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let audit = p.patchbook(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&audit.stderr);
    assert_eq!(audit.status.code(), Some(0), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(
        warnings
            .iter()
            .any(|l| l.contains(".patchbook is mode 0755") && l.contains("chmod 700")),
        "{err}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains(&format!("{} is mode 0644", name(&archive)))
                && l.contains("chmod 600")),
        "{err}"
    );
}
