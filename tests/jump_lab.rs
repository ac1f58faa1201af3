//! Hosts reachable only through two bastions (`Fleet::start_behind_bastions`):
//! the targets listen on the loopback of a network namespace that only
//! `bastion2` shares, and `bastion2` is reached through `bastion1`. Runs patch
//! them hop by hop with strict host keys at every hop; a wrong bastion key is
//! refused before the target is touched; an ssh client config with `Host`
//! patterns drives a run whose inventory holds bare names.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use patchbook::lab::{DpkgDb, Fleet, PkgDb, Tie};
use patchbook::transport::ssh::SshConnector;
use patchbook::transport::{Command, Transport};

/// lab01-lab02: the patch runs; lab03: the wrong bastion key; lab04-lab05: the
/// ssh config run. Each test keeps to its own hosts, so they run in parallel.
const TARGETS: usize = 5;

fn fleet() -> &'static Fleet {
    support::shared_fleet_by(|d| {
        Fleet::start_behind_bastions(
            &[PkgDb::Dpkg; TARGETS],
            d,
            Tie::ToStartingThread,
            DpkgDb::Machine,
        )
    })
}

const PATCH: &str = r#"
let good = artifact(`${param("mirror")}/acme-agent_1.0.1_all.deb`, #{ sha256: param("sha_new") });
let previous = artifact(`${param("mirror")}/acme-agent_1.0.0_all.deb`, #{ sha256: param("sha_old") });
rollout(hosts("all"), #{ waves: ["100%"] }, |host| {
    deploy(host, good, #{ rollback_to: previous });
    verify(host, "acme-agent", "1.0.1");
});
"#;

fn port(name: &str) -> u16 {
    fleet().host(name).expect("lab host").port
}

fn unreachable_from_here(address: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{address}:{port}").parse().expect("address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

fn version(host: &str) -> Option<String> {
    fleet()
        .installed_version(host, "acme-agent")
        .expect("dpkg status")
}

/// Runs the patch playbook in `dir` with `args` before `run`.
fn run_patch(dir: &Path, args: &[&str]) -> std::process::Output {
    let playbook = dir.join("patch.rhai");
    std::fs::write(&playbook, PATCH).expect("playbook");
    support::patchbook_in(dir)
        .args(args)
        .arg("run")
        .arg(&playbook)
        .args(support::patch_params(fleet()))
        .output()
        .expect("patchbook runs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The lab's known_hosts with `bastion`'s key replaced by `lab01`'s.
fn known_hosts_with_wrong_key_for(bastion: &str, into: &Path) {
    let f = fleet();
    let kh = std::fs::read_to_string(f.known_hosts()).expect("known_hosts");
    let b = f.host(bastion).expect("bastion");
    let prefix = format!("[{}]:{} ", b.address, b.port);
    let other = format!("[127.0.0.1]:{} ", port("lab01"));
    let other_key = kh
        .lines()
        .find_map(|l| l.strip_prefix(&other))
        .expect("lab01 entry")
        .to_string();
    let replaced: Vec<String> = kh
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}{other_key}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(
        replaced
            .iter()
            .any(|l| l == &format!("{prefix}{other_key}")),
        "no entry for {bastion} in {kh}"
    );
    std::fs::write(into, replaced.join("\n") + "\n").expect("write known_hosts");
}

#[test]
fn hosts_behind_two_bastions_are_unreachable_directly_and_patched_through_them() {
    let f = fleet();
    for target in ["lab01", "lab02"] {
        assert_eq!(f.host(target).unwrap().jump, ["bastion1", "bastion2"]);
        assert!(
            unreachable_from_here("127.0.0.1", port(target)),
            "{target} answers on this machine's loopback"
        );
    }
    // bastion2 is not on this machine's loopback either: only its veth address.
    let b2 = f.host("bastion2").unwrap();
    assert!(unreachable_from_here("127.0.0.1", b2.port));
    assert_ne!(b2.address, "127.0.0.1");
    let known_before = std::fs::read(f.known_hosts()).unwrap();

    // lab01 from the native inventory (`jump = [...]`), lab02 from the Ansible
    // INI one (`ansible_ssh_common_args='-J bastion1,bastion2'`).
    let dir = support::lab_project(f, "jump-run-", "");
    let out = run_patch(dir.path(), &["--limit", "lab01"]);
    assert!(out.status.success(), "{}", text(&out));
    let ini = f.dir().join("inventory.ini");
    let out = run_patch(
        dir.path(),
        &["-i", ini.to_str().unwrap(), "--limit", "lab02"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("ignored"),
        "the lab's INI inventory warned: {}",
        text(&out)
    );

    assert_eq!(version("lab01").as_deref(), Some("1.0.1"));
    assert_eq!(version("lab02").as_deref(), Some("1.0.1"));
    for bastion in ["bastion1", "bastion2"] {
        assert_eq!(version(bastion).as_deref(), Some("1.0.0"), "{bastion}");
    }
    // Strict at every hop: nothing was learnt or added on the way.
    assert_eq!(std::fs::read(f.known_hosts()).unwrap(), known_before);
}

#[test]
fn a_wrong_bastion_key_is_refused_naming_the_bastion_and_the_target_is_untouched() {
    let f = fleet();
    let before = support::host_fingerprint(f, "lab03");
    let dir = support::lab_project(f, "jump-badkey-", "");
    let bad = dir.path().join("known_hosts");
    known_hosts_with_wrong_key_for("bastion2", &bad);
    let config = dir.path().join("patchbook.toml");
    let settings = std::fs::read_to_string(&config).unwrap().replace(
        &format!("known_hosts = \"{}\"", f.known_hosts().display()),
        &format!("known_hosts = \"{}\"", bad.display()),
    );
    std::fs::write(&config, settings).unwrap();

    let out = run_patch(dir.path(), &["--limit", "lab03"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("jump host `bastion2`"), "{all}");
    assert!(all.contains("HOST KEY CHANGED"), "{all}");
    assert_eq!(version("lab03").as_deref(), Some("1.0.0"));
    assert_eq!(support::host_fingerprint(f, "lab03"), before);
}

#[test]
fn the_transport_checks_every_hop_and_leaves_no_relay_behind() {
    let f = fleet();
    let lab03 = f
        .inventory_hosts()
        .into_iter()
        .find(|h| h.name == "lab03")
        .unwrap();
    assert_eq!(lab03.jump.len(), 2);
    let conn = SshConnector::new(f.known_hosts()).identity(f.identity());
    {
        let t = conn.connect_ssh(&lab03).expect("through both bastions");
        let out = t.run(&Command::new(["cat", "/etc/hostname"])).unwrap();
        assert!(out.success());
        assert!(relay_threads() >= 2, "no relay threads while connected");
    }
    let dir = tempfile::tempdir().unwrap();
    for bastion in ["bastion1", "bastion2"] {
        let bad = dir.path().join(format!("kh-{bastion}"));
        known_hosts_with_wrong_key_for(bastion, &bad);
        let err = SshConnector::new(&bad)
            .identity(f.identity())
            .connect_ssh(&lab03)
            .err()
            .expect("a wrong bastion key is refused")
            .to_string();
        assert!(err.starts_with("lab03: host key check failed"), "{err}");
        assert!(err.contains(&format!("jump host `{bastion}`")), "{err}");
        assert!(err.contains("HOST KEY CHANGED"), "{err}");
    }
    // Every relay ended with its transport (or with the refused connection).
    assert_eq!(relay_threads(), 0);
}

/// Threads of this process named by the tunnel's relays.
fn relay_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("ssh-relay"))
        .count()
}

#[test]
fn an_ssh_config_with_host_patterns_drives_a_run_of_bare_names() {
    let f = fleet();
    let dir = tempfile::Builder::new()
        .prefix("jump-sshconfig-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let d = dir.path();
    std::fs::write(d.join("names.ini"), "[app]\nlab04\nlab05\n").unwrap();
    let b1 = f.host("bastion1").unwrap();
    let b2 = f.host("bastion2").unwrap();
    std::fs::write(
        d.join("ssh_config"),
        format!(
            "# bastions by alias\n\
             Host hop1\n  HostName 127.0.0.1\n  Port {}\n\
             Host hop2\n  HostName {}\n  Port {}\n\
             Host lab04\n  Port {}\n\
             Host lab05\n  Port {}\n\
             Host lab0? !lab01\n  HostName 127.0.0.1\n  ProxyJump hop1,hop2\n\
             Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n\
             \x20 UserKnownHostsFile {}\n  ConnectTimeout 10\n",
            b1.port,
            b2.address,
            b2.port,
            port("lab04"),
            port("lab05"),
            f.identity().display(),
            f.known_hosts().display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("patchbook.toml"),
        format!(
            "stdlib = \"{}/stdlib\"\ninventory = [\"names.ini\"]\n\
             trusted_sources = [\"{}\"]\n\n[ssh]\nconfig = \"ssh_config\"\n",
            env!("CARGO_MANIFEST_DIR"),
            f.dir().join("debs").display()
        ),
    )
    .unwrap();

    let out = run_patch(d, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(version("lab04").as_deref(), Some("1.0.1"));
    assert_eq!(version("lab05").as_deref(), Some("1.0.1"));
}
