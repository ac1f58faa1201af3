//! Config discovery and `patchbook config`, through the built binary: run from a
//! subfolder of a project, patchbook finds the project's `patchbook.toml` by
//! walking up (as git and cargo do), and `config` says which file it used and
//! where each value came from.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A project folder: `patchbook.toml` (forks on line 2, the inventory on line 3,
/// `[ssh]` user on line 6) and a one-host inventory, plus `ops/deep/er`.
fn project() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("discovery-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    std::fs::write(
        dir.path().join("patchbook.toml"),
        "# project settings\nforks = 7\ninventory = [\"hosts.toml\"]\n\n[ssh]\nuser = \"deploy\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hosts.toml"),
        "[hosts.web-discovered]\naddress = \"10.9.8.7\"\n",
    )
    .unwrap();
    let sub = dir.path().join("ops/deep/er");
    std::fs::create_dir_all(&sub).unwrap();
    (dir, sub)
}

fn patchbook_at(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("patchbook runs")
}

/// `patchbook config --json` as key -> (value, origin).
fn settings(cwd: &Path, args: &[&str]) -> std::collections::BTreeMap<String, (Value, String)> {
    let mut all = vec!["--json", "config"];
    all.extend_from_slice(args);
    let out = patchbook_at(cwd, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("config --json");
    rows.into_iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                (
                    r["value"].clone(),
                    r["origin"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn a_subfolder_run_uses_the_projects_config_and_inventory() {
    let (dir, sub) = project();
    let out = patchbook_at(&sub, &["inventory", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("web-discovered") && stdout.contains("10.9.8.7"),
        "the project's inventory was not found from {}: {stdout}",
        sub.display()
    );
    // The state directory is the project's, not the subfolder's.
    let s = settings(&sub, &[]);
    let root = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(
        s["state_dir"].0,
        Value::from(root.join(".patchbook").display().to_string())
    );
}

#[test]
fn config_names_the_discovered_file_and_where_each_value_came_from() {
    let (dir, sub) = project();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let file = root.join("patchbook.toml").display().to_string();
    let s = settings(&sub, &[]);
    assert_eq!(s["config"].0, Value::from(file.clone()));
    assert_eq!(
        s["config"].1,
        format!(
            "found from {}",
            std::fs::canonicalize(&sub).unwrap().display()
        )
    );
    assert_eq!(s["forks"], (Value::from(7), format!("{file}:2")));
    assert_eq!(
        s["inventory"],
        (
            Value::from(vec![root.join("hosts.toml").display().to_string()]),
            format!("{file}:3")
        )
    );
    assert_eq!(s["ssh.user"], (Value::from("deploy"), format!("{file}:6")));
    assert_eq!(s["limits.max_operations"].1, "default");
    assert_eq!(s["ssh.become"], (Value::from(false), "default".to_string()));

    // Command-line flags win and say so.
    let s = settings(&sub, &["--forks", "3", "--known-hosts", "/x/known_hosts"]);
    assert_eq!(s["forks"], (Value::from(3), "--forks".to_string()));
    assert_eq!(
        s["ssh.known_hosts"],
        (Value::from("/x/known_hosts"), "--known-hosts".to_string())
    );

    // The text form shows the same: value, then `# origin`.
    let out = patchbook_at(&sub, &["config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let forks = text.lines().find(|l| l.starts_with("forks = ")).unwrap();
    assert!(forks.ends_with(&format!("# {file}:2")), "{text}");
}

#[test]
fn an_explicit_config_beats_discovery() {
    let (dir, sub) = project();
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "forks = 11\n").unwrap();
    let s = settings(&sub, &["--config", other.to_str().unwrap()]);
    assert_eq!(
        s["config"],
        (
            Value::from(other.display().to_string()),
            "--config".to_string()
        )
    );
    assert_eq!(
        s["forks"],
        (Value::from(11), format!("{}:1", other.display()))
    );
    let out = patchbook_at(
        &sub,
        &["--config", other.to_str().unwrap(), "inventory", "list"],
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("web-discovered"),
        "the discovered project's inventory leaked into an explicit config"
    );
}

#[test]
fn without_any_config_every_value_is_a_default_and_says_so() {
    // Outside the repository: no patchbook.toml in this folder or its parents.
    let dir = tempfile::Builder::new()
        .prefix("no-config-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let s = settings(dir.path(), &[]);
    assert_eq!(s["config"].0, Value::Null);
    assert!(
        s["config"].1.starts_with("default: no patchbook.toml in"),
        "{:?}",
        s["config"]
    );
    assert!(s.values().all(|(_, origin)| !origin.contains(".toml:")));
    assert_eq!(s["forks"], (Value::from(50), "default".to_string()));
}

#[test]
fn selecting_hosts_without_any_inventory_says_why() {
    let dir = tempfile::Builder::new()
        .prefix("no-inventory-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let out = patchbook_at(dir.path(), &["exec", "all", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no inventory: no -i given and no patchbook.toml in")
            && stderr.contains("selecting `all` finds no host"),
        "{stderr}"
    );
}
