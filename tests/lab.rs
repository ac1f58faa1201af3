//! The lab fleet itself: namespace isolation and exact process ownership.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::time::Duration;

use patchbook::lab::deb;
use support::{alive, patchbook, Lab};

fn run_ok(lab: &Lab, host: &str, argv: &[&str]) -> String {
    let out = lab.exec_in(host, argv).unwrap();
    assert!(
        out.status.success(),
        "{host}: {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dpkg_and_opt_changes_stay_inside_one_host() {
    let lab = Lab::start(3);
    // By default a host carries a copy of this machine's dpkg database.
    let own = std::fs::read_to_string("/var/lib/dpkg/status").unwrap();
    let copy = std::fs::read_to_string(lab.hosts()[0].dir.join("dpkg/status")).unwrap();
    let count = |s: &str| s.lines().filter(|l| l.starts_with("Package: ")).count();
    assert_eq!(
        count(&copy),
        count(&own) + 1,
        "the machine's packages plus acme-agent"
    );
    for h in lab.hosts() {
        assert_eq!(
            lab.installed_version(&h.name, deb::PACKAGE)
                .unwrap()
                .as_deref(),
            Some("1.0.0")
        );
    }
    let good = lab.deb(deb::GOOD_VERSION);
    run_ok(&lab, "lab01", &["dpkg", "-i", good.to_str().unwrap()]);

    assert_eq!(
        lab.installed_version("lab01", deb::PACKAGE)
            .unwrap()
            .as_deref(),
        Some("1.0.1")
    );
    assert_eq!(
        lab.installed_version("lab02", deb::PACKAGE)
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    // What the hosts themselves say, through their own namespaces.
    let q = ["dpkg-query", "-W", "-f=${Version}", deb::PACKAGE];
    assert_eq!(run_ok(&lab, "lab01", &q), "1.0.1");
    assert_eq!(run_ok(&lab, "lab02", &q), "1.0.0");
    assert_eq!(
        run_ok(&lab, "lab01", &["/opt/acme/agent.sh", "--check"]),
        "acme-agent 1.0.1 ok\n"
    );
    assert_eq!(
        run_ok(&lab, "lab03", &["cat", "/opt/acme/VERSION"]),
        "1.0.0\n"
    );
    run_ok(&lab, "lab02", &["touch", "/opt/only-on-lab02"]);
    assert!(
        lab.exec_in("lab03", &["test", "-e", "/opt/only-on-lab02"])
            .unwrap()
            .status
            .code()
            == Some(1)
    );

    // The real machine sees none of it.
    let real = std::process::Command::new("dpkg-query")
        .args(["-W", deb::PACKAGE])
        .output()
        .unwrap();
    assert!(
        !real.status.success(),
        "acme-agent leaked onto the real machine"
    );
    assert!(!std::path::Path::new("/opt/acme").exists());
    assert!(!std::path::Path::new("/opt/only-on-lab02").exists());
    assert!(!std::path::Path::new("/etc/acme/agent.conf").exists());

    // Each host keeps its own dpkg log.
    let log1 = lab.dpkg_log("lab01").unwrap();
    assert_eq!(
        log1.lines()
            .filter(|l| l.contains(" upgrade acme-agent"))
            .count(),
        1,
        "{log1}"
    );
    assert_eq!(lab.dpkg_log("lab02").unwrap(), "");

    // The bad patch fails in its postinst.
    let bad = lab
        .exec_in(
            "lab03",
            &["dpkg", "-i", lab.deb(deb::BAD_VERSION).to_str().unwrap()],
        )
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("postinst"));

    // Reseeding puts a host back to 1.0.0 with a fresh log.
    lab.reseed("lab01").unwrap();
    assert_eq!(run_ok(&lab, "lab01", &q), "1.0.0");
    assert_eq!(lab.dpkg_log("lab01").unwrap(), "");
}

#[test]
fn lab_writes_keys_known_hosts_and_inventories() {
    let lab = Lab::start(5);
    let d = lab.dir();
    for f in [
        "id_ed25519",
        "id_ed25519.pub",
        "known_hosts",
        "inventory.toml",
        "inventory.ini",
        "patchbook.toml",
        "lab.json",
    ] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    let kh = std::fs::read_to_string(d.join("known_hosts")).unwrap();
    for h in lab.hosts() {
        assert!(kh.contains(&format!("[127.0.0.1]:{} ssh-ed25519 ", h.port)));
    }
    let ini = std::fs::read_to_string(d.join("inventory.ini")).unwrap();
    assert!(ini.contains("[pilot]\nlab01\nlab02\n"), "{ini}");
    assert!(ini.contains("ansible_ssh_private_key_file="), "{ini}");
    let toml: toml::Value =
        toml::from_str(&std::fs::read_to_string(d.join("inventory.toml")).unwrap()).unwrap();
    let h1 = &toml["hosts"]["lab01"];
    assert_eq!(h1["port"].as_integer(), Some(lab.hosts()[0].port as i64));
    assert_eq!(h1["criticality"].as_str(), Some("low"));
    let crits: std::collections::BTreeSet<_> = toml["hosts"]
        .as_table()
        .unwrap()
        .values()
        .map(|h| h["criticality"].as_str().unwrap().to_string())
        .collect();
    assert!(crits.len() >= 3, "{crits:?}");
    let cfg = patchbook::config::Config::load(&d.join("patchbook.toml")).unwrap();
    assert_eq!(
        cfg.ssh.known_hosts.as_deref(),
        Some(d.join("known_hosts").canonicalize().unwrap().as_path())
    );
}

#[test]
fn cli_lab_down_stops_exactly_its_processes() {
    support::require_lab();
    let dir = tempfile::Builder::new()
        .prefix("cli-lab-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let up = patchbook([
        "lab",
        "up",
        "3",
        dir.path().to_str().unwrap(),
        "--dpkg-db",
        "minimal",
    ]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // `--dpkg-db minimal`: each host's database holds acme-agent 1.0.0 and nothing else.
    let status = std::fs::read_to_string(dir.path().join("hosts/lab02/dpkg/status")).unwrap();
    let packages: Vec<&str> = status
        .lines()
        .filter_map(|l| l.strip_prefix("Package: "))
        .collect();
    assert_eq!(packages, [deb::PACKAGE]);
    assert!(status.contains("Version: 1.0.0\n"), "{status}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("lab.json")).unwrap())
            .unwrap();
    let pids: Vec<i32> = state["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| {
            [
                i32::try_from(h["sshd_pid"].as_i64().unwrap()).unwrap(),
                i32::try_from(h["unshare_pid"].as_i64().unwrap()).unwrap(),
            ]
        })
        .collect();
    assert_eq!(pids.len(), 6);
    assert!(pids.iter().all(|p| alive(*p)), "the hosts outlive `lab up`");
    // A bystander sshd-like process that the lab did not start must survive.
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let down = patchbook(["lab", "down", dir.path().to_str().unwrap()]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    for p in &pids {
        assert!(!alive(*p), "pid {p} still alive after lab down");
    }
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "lab down killed a process it did not start"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(!dir.path().join("lab.json").exists());
    // A second down has nothing to stop and says so.
    let again = patchbook(["lab", "down", dir.path().to_str().unwrap()]);
    assert!(!again.status.success());
}

#[test]
fn dropping_a_fleet_stops_its_hosts() {
    let lab = Lab::start(2);
    let pids: Vec<i32> = lab
        .hosts()
        .iter()
        .flat_map(|h| [h.sshd_pid, h.unshare_pid])
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(lab);
    for p in &pids {
        assert!(!alive(*p), "pid {p} survived the fleet");
    }
}

/// `patchbook --json exec all SNIPPET` against the lab's own settings: exit code,
/// one JSON value per host, stderr.
fn exec_json(
    dir: &std::path::Path,
    snippet: &str,
) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let cfg = dir.join("patchbook.toml");
    let out = patchbook([
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "exec",
        "all",
        snippet,
    ]);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        out.status.code(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VERSION: &str = r#"probe(host, ["dpkg-query", "-W", "-f=${Version}", "acme-agent"]).stdout"#;

#[test]
fn a_relay_puts_its_rtt_before_a_real_sshd_with_strict_host_keys() {
    let mut lab = Lab::start(1);
    let rtt = Duration::from_millis(50);
    lab.fleet.start_relays(rtt).unwrap();
    let h = lab.hosts()[0].clone();
    let relay_port = h.relay_port.expect("a relay port");
    assert_ne!(relay_port, h.port);
    assert_eq!(lab.inventory_hosts()[0].port, relay_port);
    let inventory = std::fs::read_to_string(lab.dir().join("inventory.toml")).unwrap();
    assert!(
        inventory.contains(&format!("port = {relay_port}\n")),
        "{inventory}"
    );

    let t = std::time::Instant::now();
    let (code, lines, err) = exec_json(lab.dir(), VERSION);
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(lines[0]["value"], "1.0.0", "{lines:?}");
    let traffic = lab.traffic();
    assert_eq!(traffic.len(), 1);
    let (name, seen) = &traffic[0];
    assert_eq!(name, "lab01");
    assert!(seen.connections >= 1, "{seen:?}");
    // Key exchange, auth, a channel and its command are round trips of their own.
    assert!(seen.turns >= 4, "{seen:?}");
    assert!(took >= rtt * 4, "an exec over a {rtt:?} link took {took:?}");

    // The host key is checked under the relay's address: without its line, the
    // same key under sshd's own port does not let the connection through.
    let kh = lab.known_hosts();
    let known = std::fs::read_to_string(&kh).unwrap();
    let direct_only: String = known
        .lines()
        .filter(|l| !l.starts_with(&format!("[127.0.0.1]:{relay_port} ")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(direct_only.contains(&format!("[127.0.0.1]:{} ", h.port)));
    std::fs::write(&kh, direct_only).unwrap();
    let (code, lines, err) = exec_json(lab.dir(), VERSION);
    assert_ne!(code, Some(0), "{lines:?}");
    let said = format!("{lines:?} {err}").to_lowercase();
    assert!(
        said.contains("host key") || said.contains("known_hosts"),
        "{said}"
    );
}

#[test]
fn cli_lab_up_with_rtt_relays_every_host_and_lab_down_stops_the_relay() {
    support::require_lab();
    let dir = tempfile::Builder::new()
        .prefix("cli-lab-rtt-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let d = dir.path().to_str().unwrap();
    // A failed assertion must not leave the relay and hosts running.
    struct Down<'a>(&'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = patchbook::lab::down(self.0);
        }
    }
    let _down = Down(dir.path());
    let up = patchbook(["lab", "up", "2", d, "--dpkg-db", "minimal", "--rtt", "30ms"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("lab.json")).unwrap())
            .unwrap();
    let relay_pid = i32::try_from(state["relay"]["pid"].as_i64().expect("relay recorded")).unwrap();
    assert_eq!(state["relay"]["rtt_ms"], 30);
    assert!(alive(relay_pid), "the relay outlives `lab up`");
    let inventory = std::fs::read_to_string(dir.path().join("inventory.toml")).unwrap();
    for h in state["hosts"].as_array().unwrap() {
        let relay_port = h["relay_port"].as_u64().expect("relay port");
        assert!(
            inventory.contains(&format!("port = {relay_port}\n")),
            "{inventory}"
        );
        assert!(
            !inventory.contains(&format!("port = {}\n", h["port"])),
            "{inventory}"
        );
    }

    let (code, lines, err) = exec_json(dir.path(), VERSION);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(lines.len(), 2);
    let turns = |args: &[&str]| -> serde_json::Value {
        let out = patchbook([&["lab", "turns", d][..], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let seen = turns(&["--json", "--reset"]);
    for host in ["lab01", "lab02"] {
        assert!(seen[host]["turns"].as_u64().unwrap() >= 4, "{seen}");
        assert!(seen[host]["connections"].as_u64().unwrap() >= 1, "{seen}");
    }
    let zeroed = turns(&["--json"]);
    assert_eq!(zeroed["lab01"]["turns"], 0, "{zeroed}");

    let down = patchbook(["lab", "down", d]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(!alive(relay_pid), "lab down left the relay running");
    assert!(!dir.path().join("relay.sock").exists());
    let after = patchbook(["lab", "turns", d]);
    assert!(!after.status.success());
}
