//! RPM hosts for real: lab hosts with their own rpm database in `/var/lib/rpm` and
//! an os-release that says RHEL, patched with real `rpmbuild`-built RPMs through
//! `deploy` (`rpm -U`), `verify` (`rpm -q`), rollback and `stdlib/patch/rhel.rhai`.
//! Every result is read back from the controller side with
//! `rpm -q --dbpath <host's database>`, never from patchbook's own report.
//!
//! One shared fleet: lab01–lab06 and lab24 are dpkg hosts, the others RPM hosts;
//! each test works on hosts of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use patchbook::journal::read_records;
use patchbook::lab::{Fleet, PkgDb};

const DPKG_HOSTS: usize = 6;
const HOSTS: usize = 26;

fn fleet() -> &'static Fleet {
    let kinds: Vec<PkgDb> = (1..=HOSTS)
        .map(|i| {
            if i <= DPKG_HOSTS || i == 24 {
                PkgDb::Dpkg
            } else {
                PkgDb::Rpm
            }
        })
        .collect();
    support::shared_fleet_of(&kinds)
}

/// `lab{a}` to `lab{b}`, both included.
fn names(a: usize, b: usize) -> Vec<String> {
    (a..=b).map(|i| format!("lab{i:02}")).collect()
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// acme-agent's `VERSION-RELEASE` in the host's own rpm database, by `rpm -q`.
fn rpm_version(host: &str) -> Option<String> {
    fleet()
        .rpm_installed_version(host, "acme-agent")
        .unwrap_or_else(|e| panic!("{host}: {e}"))
}

/// What the host's `/opt/acme/VERSION` says, read from the controller side.
fn payload_version(host: &str) -> String {
    let p = fleet().host(host).unwrap().dir.join("opt/acme/VERSION");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// A folder with the lab's settings, the repository's stdlib and its own state.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let f = fleet();
        let lab = std::fs::read_to_string(f.dir().join("patchbook.toml")).unwrap();
        assert!(
            lab.contains(&f.dir().join("rpms").display().to_string()),
            "the lab trusts its RPM folder:\n{lab}"
        );
        Project {
            dir: support::lab_project(f, "rpm-lab-", ""),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = support::patchbook_in(self.dir.path());
        cmd.args(args);
        cmd
    }

    /// `plan` or `run` of `body` over `targets`, with every lab package's path and
    /// SHA-256 as parameters.
    fn playbook(&self, verb: &str, body: &str, targets: &[String]) -> Output {
        let f = fleet();
        let pb = self.path("play.rhai");
        std::fs::write(&pb, body).unwrap();
        let mut params = vec![format!("targets={}", targets.join(","))];
        for v in ["1.0.0", "1.0.1", "1.0.2"] {
            params.push(format!("rpm_{v}={}", f.rpm(v).display()));
            params.push(format!("rpm_sha_{v}={}", sha(&f.rpm(v))));
            params.push(format!("deb_{v}={}", f.deb(v).display()));
            params.push(format!("deb_sha_{v}={}", sha(&f.deb(v))));
        }
        let mut cmd = self.command(&[verb, pb.to_str().unwrap()]);
        for p in params {
            cmd.arg("--param").arg(p);
        }
        cmd.output().expect("patchbook runs")
    }

    /// The runs in the state folder, oldest first.
    fn runs(&self) -> Vec<String> {
        support::run_ids(&self.path("state"))
    }

    /// Each deploy intent of a run as (host, argv).
    fn deploy_argvs(&self, run: &str) -> Vec<(String, Vec<String>)> {
        let path = self.path("state/runs").join(format!("{run}.jsonl"));
        read_records(&path)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == "step.intent" && r.data["step"] == "deploy")
            .map(|r| {
                let argv = r.data["input"]["argv"]
                    .as_array()
                    .unwrap_or_else(|| panic!("deploy intent without argv: {}", r.data))
                    .iter()
                    .map(|w| w.as_str().unwrap().to_string())
                    .collect();
                (r.host.unwrap(), argv)
            })
            .collect()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The standard RHEL patch of every target below 1.0.1: pilot first, then waves.
const GOOD_RPM_PATCH: &str = r#"
import "patch/rhel" as rhel;
let fix = artifact(param("rpm_1.0.1"), #{ sha256: param("rpm_sha_1.0.1") });
let previous = artifact(param("rpm_1.0.0"), #{ sha256: param("rpm_sha_1.0.0") });
let targets = hosts(param("targets")).needing("acme-agent", "1.0.1-1");
rollout(targets, #{ pilot: 1, waves: ["50%", "100%"] }, |host| {
    if !rhel::is_rhel(host) { throw `${host.name} is not an RPM host`; }
    if !rhel::needs(host, "acme-agent", "1.0.1-1") { throw `${host.name} does not need the fix`; }
    rhel::patch(host, fix, "acme-agent", "1.0.1-1", #{
        backup: ["/etc/acme"],
        rollback_to: previous,
        health: ["/opt/acme/agent.sh", "--check"],
    });
});
"#;

#[test]
fn the_good_patch_reaches_five_rpm_hosts_and_a_fresh_process_rolls_it_back() {
    let hosts = names(13, 17);
    let p = Project::new();
    for h in &hosts {
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.0-1"), "{h}");
    }

    let out = p.playbook("run", GOOD_RPM_PATCH, &hosts);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for h in &hosts {
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.1-1"), "{h}");
        assert_eq!(payload_version(h), "1.0.1", "{h}");
        // The rpm path, not dpkg's: the host's dpkg database stayed empty.
        assert_eq!(fleet().installed_version(h, "acme-agent").unwrap(), None);
    }
    let run = p.runs().pop().unwrap();
    let deploys = p.deploy_argvs(&run);
    assert_eq!(deploys.len(), hosts.len(), "{deploys:?}");
    for (h, argv) in &deploys {
        assert!(hosts.contains(h), "{h}");
        assert_eq!(argv[..4], ["rpm", "-U", "--oldpackage", "--replacepkgs"]);
    }

    // A second run finds nothing needing the fix and touches no host.
    let before: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(fleet(), h))
        .collect();
    let out = p.playbook("run", GOOD_RPM_PATCH, &hosts);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again = p.runs().pop().unwrap();
    assert_ne!(again, run);
    assert!(p.deploy_argvs(&again).is_empty());
    let after: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(fleet(), h))
        .collect();
    assert_eq!(after, before, "a run with nothing to do changed a host");

    // A fresh process reverses the first run from its journal alone.
    let out = p.command(&["rollback", &run]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for h in &hosts {
        assert!(
            text(&out).contains(&format!("{h}: rolled back: reinstall acme-agent 1.0.0-1")),
            "{}",
            text(&out)
        );
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.0-1"), "{h}");
        assert_eq!(payload_version(h), "1.0.0", "{h}");
    }
    let out = p.command(&["rollback", &run]).output().unwrap();
    assert!(
        text(&out).contains("nothing left to undo"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_bad_patch_is_rolled_back_on_its_host_and_no_other_host_is_touched() {
    // lab18 (the pilot) and lab20 get the good patch, lab19 the bad one; lab21 is
    // in no rollout.
    let targets = names(18, 20);
    let p = Project::new();
    let bystander = support::host_fingerprint(fleet(), "lab21");
    let out = p.playbook(
        "run",
        r#"
import "patch/rhel" as rhel;
let good = artifact(param("rpm_1.0.1"), #{ sha256: param("rpm_sha_1.0.1") });
let bad = artifact(param("rpm_1.0.2"), #{ sha256: param("rpm_sha_1.0.2") });
let previous = artifact(param("rpm_1.0.0"), #{ sha256: param("rpm_sha_1.0.0") });
rollout(hosts(param("targets")), #{ pilot: hosts("lab18"), max_failed: 1, parallel: 1 }, |host| {
    let is_bad = host.name == "lab19";
    let fix = if is_bad { bad } else { good };
    let version = if is_bad { "1.0.2-1" } else { "1.0.1-1" };
    rhel::patch(host, fix, "acme-agent", version, #{
        rollback_to: previous,
        health: ["/opt/acme/agent.sh", "--check"],
    });
});
"#,
        &targets,
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("service did not start"), "{all}");
    assert_eq!(rpm_version("lab19").as_deref(), Some("1.0.0-1"));
    assert_eq!(payload_version("lab19"), "1.0.0");
    let check = fleet()
        .exec_in("lab19", &["/opt/acme/agent.sh", "--check"])
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    for h in ["lab18", "lab20"] {
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.1-1"), "{h}");
        assert_eq!(payload_version(h), "1.0.1", "{h}");
    }
    assert_eq!(support::host_fingerprint(fleet(), "lab21"), bystander);

    // The journal: rpm took 1.0.2 (its failing %post is only a warning to rpm),
    // the health check failed, and only lab19 was rolled back.
    let run = p.runs().pop().unwrap();
    let records = read_records(&p.path("state/runs").join(format!("{run}.jsonl"))).unwrap();
    let bad_deploy = records
        .iter()
        .find(|r| {
            r.kind == "step.outcome"
                && r.host.as_deref() == Some("lab19")
                && r.data["output"]["after"] == "1.0.2-1"
        })
        .unwrap_or_else(|| panic!("no outcome of the 1.0.2 deploy on lab19"));
    assert_eq!(bad_deploy.data["ok"], true, "{}", bad_deploy.data);
    let rolled_back: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == "host.rollback")
        .filter_map(|r| r.host.as_deref())
        .collect();
    assert_eq!(rolled_back, ["lab19"]);
}

#[test]
fn one_rollout_over_a_mixed_fleet_takes_each_hosts_own_path() {
    let hosts = names(1, 12);
    let (dpkg, rpm) = hosts.split_at(DPKG_HOSTS);
    let p = Project::new();
    let out = p.playbook(
        "run",
        r#"
import "patch/debian" as deb;
import "patch/rhel" as rhel;
let deb_fix = artifact(param("deb_1.0.1"), #{ sha256: param("deb_sha_1.0.1") });
let deb_previous = artifact(param("deb_1.0.0"), #{ sha256: param("deb_sha_1.0.0") });
let rpm_fix = artifact(param("rpm_1.0.1"), #{ sha256: param("rpm_sha_1.0.1") });
let rpm_previous = artifact(param("rpm_1.0.0"), #{ sha256: param("rpm_sha_1.0.0") });
let health = ["/opt/acme/agent.sh", "--check"];
let targets = hosts(param("targets")).needing("acme-agent", "1.0.1");
if targets.len() != 12 { throw `expected 12 hosts needing the fix, got ${targets.len()}`; }
rollout(targets, #{ pilot: hosts("pilot"), waves: ["50%", "100%"], order: "criticality" }, |host| {
    let pm = facts(host).package_manager;
    if pm == "rpm" {
        rhel::patch(host, rpm_fix, "acme-agent", "1.0.1-1", #{ rollback_to: rpm_previous, health: health });
    } else if pm == "dpkg" {
        deb::patch(host, deb_fix, "acme-agent", "1.0.1", #{ rollback_to: deb_previous, health: health });
    } else {
        throw `${host.name}: unknown package manager ${pm}`;
    }
});
"#,
        &hosts,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let f = fleet();
    for h in dpkg {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.1"),
            "{h}"
        );
        assert!(
            !f.host(h).unwrap().dir.join("rpm").exists(),
            "{h} has no rpm database"
        );
        assert_eq!(payload_version(h), "1.0.1", "{h}");
    }
    for h in rpm {
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.1-1"), "{h}");
        assert_eq!(f.installed_version(h, "acme-agent").unwrap(), None, "{h}");
        assert_eq!(payload_version(h), "1.0.1", "{h}");
    }
    let run = p.runs().pop().unwrap();
    let deploys = p.deploy_argvs(&run);
    assert_eq!(deploys.len(), 12, "{deploys:?}");
    for (h, argv) in &deploys {
        let expected = if dpkg.contains(h) { "dpkg" } else { "rpm" };
        assert_eq!(argv[0], expected, "{h}: {argv:?}");
    }

    // A fresh process returns every host to 1.0.0, each with its own tool.
    let out = p.command(&["rollback", &run]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for h in dpkg {
        assert_eq!(
            f.installed_version(h, "acme-agent").unwrap().as_deref(),
            Some("1.0.0"),
            "{h}"
        );
    }
    for h in rpm {
        assert_eq!(rpm_version(h).as_deref(), Some("1.0.0-1"), "{h}");
        assert_eq!(payload_version(h), "1.0.0", "{h}");
    }
}

#[test]
fn facts_see_rhel_with_rpm_on_rpm_hosts_and_debian_with_dpkg_on_the_others() {
    let p = Project::new();
    let out = p
        .command(&["--json", "exec", "lab24,lab25", "facts(host)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut seen = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(host) = v["host"].as_str() {
            seen.insert(host.to_string(), v["value"].clone());
        }
    }
    assert_eq!(seen["lab24"]["package_manager"], "dpkg", "{seen:?}");
    assert_eq!(seen["lab24"]["os_id"], "debian", "{seen:?}");
    assert_eq!(seen["lab25"]["package_manager"], "rpm", "{seen:?}");
    assert_eq!(seen["lab25"]["os_id"], "rhel", "{seen:?}");
    assert_eq!(seen["lab25"]["os_like"], serde_json::json!(["fedora"]));
    // The machine's own os-release is not the host's.
    let own = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(!own.contains("ID=\"rhel\""), "{own}");
}

#[test]
fn plan_leaves_rpm_hosts_byte_identical() {
    let hosts = names(22, 23);
    let p = Project::new();
    let before: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(fleet(), h))
        .collect();
    assert!(
        before.iter().all(|f| f.contains("\nrpm/rpmdb.sqlite ")),
        "the fingerprint covers the rpm database"
    );
    let out = p.playbook("plan", GOOD_RPM_PATCH, &hosts);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let after: Vec<String> = hosts
        .iter()
        .map(|h| support::host_fingerprint(fleet(), h))
        .collect();
    assert_eq!(after, before, "plan changed an RPM host:\n{all}");
    assert!(!p.path("state/runs").exists(), "plan wrote a journal");
    for h in &hosts {
        assert!(all.contains(&format!("{h}: would change")), "{all}");
    }
    assert!(all.contains("rpm -U --oldpackage --replacepkgs"), "{all}");
    assert!(all.contains("2 host(s) would change"), "{all}");
}

#[test]
fn deploying_the_installed_version_reinstalls_it_as_dpkg_does() {
    let f = fleet();
    let p = Project::new();
    // Damage the installed payload; only a real reinstall puts it back.
    let agent = f.host("lab26").unwrap().dir.join("opt/acme/agent.sh");
    let good = std::fs::read(&agent).unwrap();
    std::fs::write(&agent, "#!/bin/sh\nexit 3\n").unwrap();
    let out = p
        .command(&[
            "--json",
            "exec",
            "lab26",
            &format!(
                r#"let a = artifact("{}", #{{ sha256: "{}" }}); deploy(host, a)"#,
                f.rpm("1.0.0").display(),
                sha(&f.rpm("1.0.0"))
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["value"]["before"], "1.0.0-1", "{line}");
    assert_eq!(line["value"]["after"], "1.0.0-1", "{line}");
    assert_eq!(
        std::fs::read(&agent).unwrap(),
        good,
        "the payload was reinstalled"
    );
    assert_eq!(rpm_version("lab26").as_deref(), Some("1.0.0-1"));
}
