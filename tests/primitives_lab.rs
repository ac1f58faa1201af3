//! Issue 4's acceptance on the lab fleet: real sshd hosts, real dpkg, the real
//! acme-agent packages, and a real journal behind a script session.
//!
//! - good patch 1.0.0 -> 1.0.1 on 10 hosts through `patch::debian`: backup taken and
//!   verified, deploy, verify, health;
//! - bad patch 1.0.2 (failing postinst) on 3 hosts: deploy fails, `rollback(host)`
//!   brings dpkg back to 1.0.0, a second rollback changes nothing;
//! - a staged file changed on the host between upload and install is caught;
//! - backup archives with `../` or absolute names are refused on restore.
//!
//! One fleet of 15 hosts is shared; each test works on its own hosts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchbook::journal::{BackupRef, Journal, Record, RunHeader};
use patchbook::lab::{deb, Fleet};
use patchbook::primitives::artifact::{fetch, Artifact, ArtifactSpec};
use patchbook::primitives::deploy::{deploy_with_hook, DeployOptions};
use patchbook::primitives::{Mode, RunCtx};
use patchbook::run::Session;
use patchbook::runtime::{Options, Runtime};
use patchbook::script::{Compiler, Limits, ScriptRun};
use sha2::Digest;

const HOSTS: usize = 15;

fn fleet() -> &'static Fleet {
    support::shared_fleet(HOSTS)
}

fn names(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("lab{i:02}")).collect()
}

/// One run against the lab: the lab's own patchbook.toml (inventory, SSH keys,
/// known_hosts, the package mirror as trusted source), a fresh state directory and
/// journal, and a run engine bound to the session.
struct LabRun {
    _state: tempfile::TempDir,
    session: Arc<Session>,
    journal: Arc<Journal>,
    run: ScriptRun,
}

impl LabRun {
    fn new(f: &Fleet) -> LabRun {
        let state = tempfile::tempdir().unwrap();
        let opts = Options {
            config: Some(f.dir().join("patchbook.toml")),
            state_dir: Some(state.path().to_path_buf()),
            operator: Some("tester".into()),
            forks: Some(10),
            ..Options::default()
        };
        let rt = Arc::new(Runtime::build(&opts).unwrap_or_else(|e| panic!("{e}")));
        let header = RunHeader::new(
            PathBuf::from("<lab>"),
            "0".repeat(64),
            BTreeMap::new(),
            "0".repeat(64),
            serde_json::Value::Null,
        );
        let journal = Arc::new(Journal::begin(state.path(), "r1", "tester", &header).unwrap());
        let session = Arc::new(Session::new(
            rt,
            RunCtx::new(
                "r1",
                state.path().to_path_buf(),
                Some(journal.clone()),
                Mode::Apply,
            ),
        ));
        let run = ScriptRun::with_session(&Limits::default(), session.clone());
        LabRun {
            _state: state,
            session,
            journal,
            run,
        }
    }

    fn json(&self, src: &str) -> serde_json::Value {
        let compiler = Compiler::new(Limits::default(), vec![PathBuf::from("stdlib")]);
        let pb = compiler
            .compile_source("<lab>", src, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        match self.run.run(&pb) {
            Ok(v) => patchbook::script::to_json(&v),
            Err(e) => panic!("script failed:\n{e}"),
        }
    }

    fn records(&self, kind: &str) -> Vec<Record> {
        self.journal
            .records()
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == kind)
            .collect()
    }

    fn artifact(&self, f: &Fleet, version: &str) -> Artifact {
        let path = f.deb(version);
        let bytes = std::fs::read(&path).unwrap();
        let spec = ArtifactSpec {
            url: path.display().to_string(),
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            size: Some(bytes.len() as u64),
            signature: None,
        };
        fetch(&spec, &self.session.artifacts).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn sha256_hex(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// What dpkg on the host itself says, through the host's own namespace.
fn dpkg_status(f: &Fleet, host: &str) -> String {
    let out = f
        .exec_in(
            host,
            &[
                "dpkg-query",
                "-W",
                "-f=${db:Status-Abbrev}${Version}",
                deb::PACKAGE,
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).replace(' ', "")
}

fn rhai_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[test]
fn good_patch_on_ten_hosts_backs_up_deploys_verifies_and_checks_health() {
    let f = fleet();
    let lab = LabRun::new(f);
    let hosts = names(1..=10);
    let good = f.deb(deb::GOOD_VERSION);
    let v = lab.json(&format!(
        r#"
        import "patch/debian" as deb;
        let fix = artifact("{good}", #{{ sha256: "{sha}" }});
        let wanted = {list};
        let targets = hosts("all").filter(|h| wanted.contains(h.name)).needing("acme-agent", "1.0.1");
        let out = [];
        for h in targets {{
            let r = deb::patch(h, fix, "acme-agent", "1.0.1", #{{
                backup: ["/etc/acme", "/opt/acme"],
                health: ["/opt/acme/agent.sh", "--check"],
                health_options: #{{ expect_stdout: "1.0.1 ok", retries: 2, delay: "500ms" }},
            }});
            out.push(#{{ host: r.host, backup: r.backup.id, archive: r.backup.archive,
                         sha: r.backup.sha256, paths: r.backup.paths, deploy: r.deploy,
                         version: r.version, health: r.health }});
        }}
        #{{ patched: out, still_needing: hosts("all").filter(|h| wanted.contains(h.name)).needing("acme-agent", "1.0.1").len() }}
        "#,
        good = good.display(),
        sha = sha256_hex(&good),
        list = rhai_list(&hosts),
    ));
    let patched = v["patched"].as_array().unwrap();
    assert_eq!(patched.len(), 10, "{v}");
    assert_eq!(v["still_needing"], 0);
    for r in patched {
        let host = r["host"].as_str().unwrap();
        assert!(hosts.iter().any(|h| h == host));
        // The backup is on the controller, and its bytes match the manifest.
        assert_eq!(r["backup"], "b001");
        let archive = PathBuf::from(r["archive"].as_str().unwrap());
        assert!(archive.starts_with(lab.session.run.state_dir.join("backups")));
        assert_eq!(sha256_hex(&archive), r["sha"].as_str().unwrap());
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(archive.with_extension("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["sha256"], r["sha"]);
        let mut entries: Vec<String> = tar::Archive::new(std::fs::File::open(&archive).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        entries.sort();
        assert!(
            entries.iter().any(|e| e == "etc/acme/agent.conf"),
            "{entries:?}"
        );
        assert!(
            entries.iter().any(|e| e == "opt/acme/VERSION"),
            "{entries:?}"
        );
        assert_eq!(r["deploy"]["pkg"], "acme-agent");
        assert_eq!(r["deploy"]["before"], "1.0.0");
        assert_eq!(r["deploy"]["after"], "1.0.1");
        assert_eq!(r["version"], "1.0.1");
        assert_eq!(r["health"], "acme-agent 1.0.1 ok\n");
        assert_eq!(dpkg_status(f, host), "ii1.0.1");
    }
    // Everything is in the journal: 10 backups, 10 ok deploys, 10 ok verifies and
    // health checks, and the artifact's checks.
    assert_eq!(lab.records("backup").len(), 10);
    let deploys: Vec<Record> = lab
        .records("step.outcome")
        .into_iter()
        .filter(|r| r.data["step"] == "deploy")
        .collect();
    assert_eq!(deploys.len(), 10);
    assert!(deploys.iter().all(|r| r.data["ok"] == true));
    assert!(lab.records("verify").iter().all(|r| r.data["ok"] == true));
    assert_eq!(lab.records("verify").len(), 10);
    assert_eq!(lab.records("health").len(), 10);
    assert!(lab.records("artifact").iter().all(|r| r.data["ok"] == true));
    // The hosts outside the run were not touched.
    assert_eq!(dpkg_status(f, "lab11"), "ii1.0.0");
}

#[test]
fn bad_patch_fails_and_rollback_restores_the_previous_version_once() {
    let f = fleet();
    let lab = LabRun::new(f);
    let hosts = names(11..=13);
    let bad = f.deb(deb::BAD_VERSION);
    let base = f.deb(deb::BASE_VERSION);
    let v = lab.json(&format!(
        r#"
        import "patch/debian" as deb;
        let fix = artifact("{bad}", #{{ sha256: "{bad_sha}" }});
        let previous = artifact("{base}", #{{ sha256: "{base_sha}" }});
        let wanted = {list};
        let out = [];
        for h in hosts("all").filter(|h| wanted.contains(h.name)) {{
            let error = "";
            try {{
                deb::patch(h, fix, "acme-agent", "1.0.2", #{{
                    backup: ["/etc/acme"], rollback_to: previous,
                    health: ["/opt/acme/agent.sh", "--check"],
                }});
            }} catch (e) {{
                error = `${{e}}`;
            }}
            let first = rollback(h);
            let second = rollback(h);
            out.push(#{{ host: h.name, error: error, first: first, second: second,
                         installed: installed(h, "acme-agent") }});
        }}
        out
        "#,
        bad = bad.display(),
        bad_sha = sha256_hex(&bad),
        base = base.display(),
        base_sha = sha256_hex(&base),
        list = rhai_list(&hosts),
    ));
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let host = r["host"].as_str().unwrap();
        let error = r["error"].as_str().unwrap();
        assert!(error.contains(&format!("{host}: deploy failed")), "{error}");
        assert!(
            error.contains("postinst failed"),
            "the host's output is quoted: {error}"
        );
        assert_eq!(
            r["first"]["undone"],
            serde_json::json!(["reinstall acme-agent 1.0.0"])
        );
        assert_eq!(r["second"]["undone"], serde_json::json!([]));
        assert_eq!(r["second"]["manual"], serde_json::json!([]));
        assert_eq!(r["installed"], "1.0.0");
        assert_eq!(dpkg_status(f, host), "ii1.0.0");
        assert_eq!(
            f.installed_version(host, deb::PACKAGE).unwrap().as_deref(),
            Some("1.0.0")
        );
    }
    // One undo step per host was applied, and the second rollbacks added none.
    let undos: Vec<Record> = lab
        .records("step.intent")
        .into_iter()
        .filter(|r| r.data.get("undoes").is_some_and(|u| !u.is_null()))
        .collect();
    assert_eq!(undos.len(), 3, "{undos:?}");
    let failed: Vec<Record> = lab
        .records("step.outcome")
        .into_iter()
        .filter(|r| r.data["step"] == "deploy")
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|r| r.data["ok"] == false));
    // A failed install is read back from the host: the package as dpkg left it
    // (unpacked, its postinst failed), not the version the file holds.
    for r in &failed {
        assert_eq!(r.data["output"]["after"], "1.0.2", "{r:?}");
    }
    // The journal still reads as that: a new rollback now would do nothing.
    let again = lab.json(&format!(
        "let wanted = {};\nhosts(\"all\").filter(|h| wanted.contains(h.name)).map(|h| rollback(h).undone.len())",
        rhai_list(&hosts)
    ));
    assert_eq!(again, serde_json::json!([0, 0, 0]));
}

#[test]
fn a_file_changed_on_the_host_after_upload_is_not_installed() {
    let f = fleet();
    let lab = LabRun::new(f);
    let name = "lab14";
    let host = lab.session.runtime.inventory.host(name).unwrap().clone();
    let good = lab.artifact(f, deb::GOOD_VERSION);
    let tampered = std::sync::Mutex::new(None::<String>);
    let err = lab
        .session
        .with_host(&host, |ctx| {
            deploy_with_hook(ctx, &good, &DeployOptions::default(), &|remote| {
                // Between upload and install, something on the host appends to the
                // staged package.
                let out = f
                    .exec_in(name, &["sh", "-c", "printf x >> \"$1\"", "tamper", remote])
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                *tampered.lock().unwrap() = Some(remote.to_string());
            })
        })
        .unwrap_err()
        .to_string();
    assert!(tampered.lock().unwrap().is_some(), "the hook did not run");
    assert!(err.contains(name), "{err}");
    assert!(
        err.contains("changed on the host after upload (sha256 mismatch); not installed"),
        "{err}"
    );
    assert_eq!(dpkg_status(f, name), "ii1.0.0");
    let outcome = lab
        .records("step.outcome")
        .into_iter()
        .find(|r| r.data["step"] == "deploy")
        .unwrap();
    assert_eq!(outcome.data["ok"], false);
    // The staged folder is gone from the host.
    let staged = tampered.lock().unwrap().clone().unwrap();
    let gone = f.exec_in(name, &["test", "-e", &staged]).unwrap();
    assert!(!gone.status.success(), "{staged} is still on the host");
}

/// A tar archive whose entry names are written raw, as a hostile archive's are.
fn hostile_archive(dir: &Path, entries: &[&str]) -> PathBuf {
    let path = dir.join("hostile.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    for name in entries {
        let body = b"owned\n";
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &body[..]).unwrap();
    }
    b.finish().unwrap();
    path
}

#[test]
fn restore_refuses_archives_with_dotdot_or_absolute_names() {
    let f = fleet();
    let lab = LabRun::new(f);
    let name = "lab15";
    let host = lab.session.runtime.inventory.host(name).unwrap().clone();
    // A real backup and restore round-trip on this host works.
    let v = lab.json(&format!(
        r#"let h = hosts("{name}")[0];
           let b = backup(h, ["/etc/acme"]);
           exec(h, ["sh", "-c", "echo changed > /etc/acme/agent.conf"]);
           restore(h, b);
           exec(h, ["cat", "/etc/acme/agent.conf"]).stdout"#
    ));
    assert_eq!(v, "# acme-agent settings\ninterval = 60\n");

    let tmp = tempfile::tempdir().unwrap();
    for entries in [
        vec!["etc/acme/../../tmp/escaped-dotdot"],
        vec!["/tmp/escaped-absolute"],
        vec!["etc/acme/agent.conf", "../tmp/escaped-parent"],
    ] {
        let archive = hostile_archive(tmp.path(), &entries);
        let handle = BackupRef {
            id: "b999".into(),
            archive: archive.clone(),
            sha256: sha256_hex(&archive),
            paths: vec!["/etc/acme".into()],
        };
        let before = lab.records("step.intent").len();
        let err = lab
            .session
            .with_host(&host, |ctx| {
                patchbook::primitives::backup::restore(ctx, &handle)
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(name) && err.contains("restore") && err.contains("refused"),
            "{entries:?}: {err}"
        );
        assert_eq!(
            lab.records("step.intent").len(),
            before,
            "a refused restore was started"
        );
    }
    for p in [
        "/tmp/escaped-dotdot",
        "/tmp/escaped-absolute",
        "/tmp/escaped-parent",
    ] {
        let out = f.exec_in(name, &["test", "-e", p]).unwrap();
        assert!(!out.status.success(), "{p} was written on the host");
    }
    assert_eq!(dpkg_status(f, name), "ii1.0.0");
}
