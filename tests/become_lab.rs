//! Become on real lab hosts: a non-root login user who becomes root with sudo and
//! a password read from a secret reference (`${env:NAME}`). The patch job works
//! as root (the package lands in the host's own dpkg database, a file written
//! through a command's stdin is root's); a wrong password fails that host with
//! sudo's own words; the password, right or wrong, reaches no output and no file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use patchbook::lab::{Fleet, SudoRule};

const RIGHT: &str = "Sudo-c4n4ry-pw 'x$y";
const WRONG: &str = "Wr0ng-c4n4ry-pw";
const USER: &str = "deploy";

/// The patch job, plus a file written through a command's stdin (its own SSH
/// channel under sudo) and a look at who the commands run as.
const PLAYBOOK: &str = r#"
import "patch/debian" as deb;
let patch = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{ waves: ["100%"], max_failed: 5 }, |host| {
    let who = probe(host, ["id", "-un"]).stdout;
    who.trim();
    log(`${host.name} runs as ${who}`);
    if who != "root" { throw `${host.name} runs as ${who}`; }
    put_file(host, "note.txt", "/etc/acme/become-note", #{ mode: "0640" });
    deb::patch(host, patch, "acme-agent", "1.0.1", #{
        backup: ["/etc/acme", "/opt/acme"],
        rollback_to: previous,
        health: ["/opt/acme/agent.sh", "--check"],
    });
});
"#;

fn fleet() -> &'static Fleet {
    static USERS: std::sync::Once = std::sync::Once::new();
    let fleet = support::shared_fleet(3);
    USERS.call_once(|| {
        for (h, rule) in [
            ("lab01", SudoRule::Password),
            ("lab02", SudoRule::Password),
            ("lab03", SudoRule::NoPassword),
        ] {
            fleet
                .add_sudo_user(h, USER, RIGHT, rule)
                .unwrap_or_else(|e| panic!("{h}: {e}"));
        }
    });
    fleet
}

use support::text;

/// The password in every form something could write it: as is, JSON-escaped,
/// base64 and hex.
fn encodings(secret: &str) -> Vec<String> {
    let json = serde_json::to_string(secret).unwrap();
    vec![
        secret.to_string(),
        json.trim_matches('"').to_string(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        hex::encode(secret),
    ]
}

fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if std::fs::read(&p)
            .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .unwrap_or(false)
        {
            hits.push(p);
        }
    }
    hits
}

/// A project whose Ansible inventory logs in as `deploy` and becomes root with
/// the password in `$LAB_BECOME_PW` (group vars, so precedence is exercised).
fn project(fleet: &Fleet, hosts: &[&str]) -> tempfile::TempDir {
    let dir = support::lab_project(fleet, "become-", "playbooks = \"{dir}\"\n");
    let id = fleet.identity();
    let mut ini = String::from("[sudoers]\n");
    for name in hosts {
        let h = fleet.host(name).unwrap();
        ini.push_str(&format!(
            "{name} ansible_host=127.0.0.1 ansible_port={} ansible_user={USER} \
             ansible_ssh_private_key_file={}\n",
            h.port,
            id.display()
        ));
    }
    ini.push_str(
        "\n[sudoers:vars]\nansible_become=yes\nansible_become_method=sudo\n\
         ansible_become_password=${env:LAB_BECOME_PW}\n",
    );
    std::fs::write(dir.path().join("hosts.ini"), ini).unwrap();
    std::fs::write(dir.path().join("patch.rhai"), PLAYBOOK).unwrap();
    std::fs::write(dir.path().join("note.txt"), "written as root\n").unwrap();
    dir
}

fn run(fleet: &Fleet, dir: &Path, password: &str, extra: &[&str]) -> Output {
    support::patchbook_in(dir)
        .args(extra)
        .arg("-i")
        .arg(dir.join("hosts.ini"))
        .arg("run")
        .arg(dir.join("patch.rhai"))
        .args(support::patch_params(fleet))
        .env("LAB_BECOME_PW", password)
        .output()
        .unwrap()
}

fn assert_nowhere(secret: &str, outputs: &str, dir: &Path) {
    for form in encodings(secret) {
        assert!(
            !outputs.contains(&form),
            "the password ({form}) reached stdout or stderr"
        );
        let leaks = files_containing(&dir.join("state"), &form);
        assert!(leaks.is_empty(), "the password ({form}) is in {leaks:?}");
    }
}

#[test]
fn a_non_root_login_becomes_root_with_a_sudo_password_and_patches() {
    let fleet = fleet();
    fleet.reseed("lab01").unwrap();
    let dir = project(fleet, &["lab01"]);
    let mut outputs = String::new();
    let out = run(fleet, dir.path(), RIGHT, &["-vv"]);
    outputs.push_str(&text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(outputs.contains("lab01 runs as root"), "{outputs}");
    // Installed by root into lab01's own dpkg database.
    assert_eq!(
        fleet.installed_version("lab01", "acme-agent").unwrap(),
        Some("1.0.1".into())
    );
    // The file that went through stdin (a channel of its own, behind the gate) is
    // root's and holds exactly what was sent: no password line before it.
    let note = fleet
        .host("lab01")
        .unwrap()
        .dir
        .join("etc-acme/become-note");
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "written as root\n");
    assert_eq!(std::fs::metadata(&note).unwrap().uid(), 0);
    let report = support::patchbook_in(dir.path())
        .args(["report", "last", "--format", "json"])
        .output()
        .unwrap();
    outputs.push_str(&text(&report));
    assert!(report.status.success(), "{}", text(&report));
    assert_nowhere(RIGHT, &outputs, dir.path());
}

#[test]
fn a_wrong_sudo_password_fails_that_host_clearly_and_leaks_nothing() {
    let fleet = fleet();
    fleet.reseed("lab02").unwrap();
    let dir = project(fleet, &["lab02"]);
    let out = run(fleet, dir.path(), WRONG, &["-vv"]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(1), "{outputs}");
    assert!(
        outputs.contains("lab02: cannot become root with sudo: sudo refused"),
        "{outputs}"
    );
    assert!(outputs.contains("${env:LAB_BECOME_PW}"), "{outputs}");
    // Nothing ran as root: the package is where it was.
    assert_eq!(
        fleet.installed_version("lab02", "acme-agent").unwrap(),
        Some("1.0.0".into())
    );
    assert!(!fleet
        .host("lab02")
        .unwrap()
        .dir
        .join("etc-acme/become-note")
        .exists());
    assert_nowhere(WRONG, &outputs, dir.path());
    assert_nowhere(RIGHT, &outputs, dir.path());
}

#[test]
fn a_become_password_written_in_the_inventory_is_refused_without_showing_it() {
    let fleet = fleet();
    let dir = project(fleet, &["lab01"]);
    let inv = dir.path().join("hosts.ini");
    let text_ini = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("${env:LAB_BECOME_PW}", WRONG);
    std::fs::write(&inv, text_ini).unwrap();
    let out = run(fleet, dir.path(), RIGHT, &[]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(2), "{outputs}");
    assert!(
        outputs.contains("ansible_become_password must be a secret reference"),
        "{outputs}"
    );
    assert!(!outputs.contains(WRONG), "{outputs}");

    // Another method is an error naming the host and the key, not a silent run.
    let su = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("ansible_become_method=sudo", "ansible_become_method=su");
    std::fs::write(&inv, su).unwrap();
    let out = run(fleet, dir.path(), RIGHT, &[]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(2), "{outputs}");
    assert!(
        outputs.contains("host `lab01`: ansible_become_method=su is not supported"),
        "{outputs}"
    );
}

#[test]
fn without_a_password_prompt_the_password_line_never_reaches_a_command() {
    // lab03's sudoers rule is NOPASSWD: sudo reads no password, so the password
    // line fed on stdin is left for the gate, which must drop it.
    let fleet = fleet();
    fleet.reseed("lab03").unwrap();
    let dir = project(fleet, &["lab03"]);
    let out = run(fleet, dir.path(), RIGHT, &[]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(0), "{outputs}");
    let note = fleet
        .host("lab03")
        .unwrap()
        .dir
        .join("etc-acme/become-note");
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "written as root\n");
    assert_eq!(
        fleet.installed_version("lab03", "acme-agent").unwrap(),
        Some("1.0.1".into())
    );
    assert_nowhere(RIGHT, &outputs, dir.path());

    // The global `[ssh] become`: every host as root through `sudo -n`, no password.
    fleet.reseed("lab03").unwrap();
    assert!(!note.exists(), "reseed leaves the note");
    global_become_only(dir.path());
    let out = run(fleet, dir.path(), RIGHT, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::metadata(&note).unwrap().uid(), 0);
    assert_eq!(
        fleet.installed_version("lab03", "acme-agent").unwrap(),
        Some("1.0.1".into())
    );
}

/// Drops the inventory's become vars and sets `[ssh] become = true` instead.
fn global_become_only(dir: &Path) {
    let inv = dir.join("hosts.ini");
    let plain: String = std::fs::read_to_string(&inv)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("ansible_become"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&inv, plain).unwrap();
    let config = dir.join("patchbook.toml");
    let settings = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[ssh]\n", "[ssh]\nbecome = true\n");
    std::fs::write(&config, settings).unwrap();
}

#[test]
fn the_global_become_where_sudo_wants_a_password_fails_the_host_saying_so() {
    let fleet = fleet();
    let dir = project(fleet, &["lab02"]);
    global_become_only(dir.path());
    let out = run(fleet, dir.path(), RIGHT, &[]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(1), "{outputs}");
    assert!(
        outputs.contains("lab02: cannot become root with sudo: sudo -n refused")
            && outputs.contains("sudo wants a password of deploy here"),
        "{outputs}"
    );
    assert_eq!(
        fleet.installed_version("lab02", "acme-agent").unwrap(),
        Some("1.0.0".into())
    );

    // `ansible_become=false` in the inventory wins over the global `[ssh] become`,
    // as a host var wins in Ansible: the host runs as its login user, no sudo.
    let inv = dir.path().join("hosts.ini");
    let mut ini = std::fs::read_to_string(&inv).unwrap();
    ini.push_str("\n[sudoers:vars]\nansible_become=false\n");
    std::fs::write(&inv, ini).unwrap();
    let out = run(fleet, dir.path(), RIGHT, &[]);
    let outputs = text(&out);
    assert_eq!(out.status.code(), Some(1), "{outputs}");
    assert!(!outputs.contains("cannot become root"), "{outputs}");
    assert!(outputs.contains("lab02 runs as deploy"), "{outputs}");
}
