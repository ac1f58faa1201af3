//! A run's world for script tests: local-transport hosts, a state directory, a real
//! journal, a session and a run engine with every primitive bound to it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchbook::config::Config;
use patchbook::inventory::{Host, Inventory, TransportKind};
use patchbook::journal::{Journal, Record, RunHeader};
use patchbook::primitives::{Mode, RunCtx};
use patchbook::run::Session;
use patchbook::runtime::{Options, Runtime};
use patchbook::script::{Compiler, Limits, ScriptError, ScriptRun};
use rhai::Dynamic;

pub struct World {
    pub dir: tempfile::TempDir,
    pub session: Arc<Session>,
    pub journal: Arc<Journal>,
    pub run: ScriptRun,
    pub compiler: Compiler,
}

pub fn limits() -> Limits {
    Limits {
        max_operations: 5_000_000,
        deadline_secs: 120,
        ..Limits::default()
    }
}

pub fn local_hosts(names: &[&str]) -> Vec<Host> {
    names
        .iter()
        .map(|n| {
            let mut h = Host::new(*n);
            h.transport = TransportKind::Local;
            h.groups = vec!["local".into()];
            h
        })
        .collect()
}

/// The folder artifacts may come from in a world (`trusted_sources`).
pub fn trusted(dir: &Path) -> PathBuf {
    dir.join("mirror")
}

impl World {
    /// A world of local-transport hosts; `tune` adjusts the config (notify channels…).
    pub fn new(names: &[&str], mode: Mode, tune: impl FnOnce(&mut Config, &Path)) -> World {
        Self::with_hosts(local_hosts(names), mode, tune)
    }

    pub fn with_hosts(
        hosts: Vec<Host>,
        mode: Mode,
        tune: impl FnOnce(&mut Config, &Path),
    ) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let mirror = trusted(dir.path());
        std::fs::create_dir_all(&mirror).unwrap();
        let mut cfg = Config::defaults_in(dir.path());
        cfg.trusted_sources = vec![mirror.display().to_string()];
        cfg.limits = limits();
        tune(&mut cfg, dir.path());
        let inv = Inventory::from_parts(hosts, BTreeMap::new(), Vec::new());
        let opts = Options {
            state_dir: Some(state.clone()),
            operator: Some("tester".into()),
            ..Options::default()
        };
        let rt = Arc::new(Runtime::from_parts(cfg, inv, &opts));
        let header = RunHeader::new(
            PathBuf::from("<test>"),
            "0".repeat(64),
            BTreeMap::new(),
            "0".repeat(64),
            serde_json::Value::Null,
        );
        let journal = Arc::new(Journal::begin(&state, "r1", "tester", &header).expect("journal"));
        let session = Arc::new(Session::new(
            rt,
            RunCtx::new("r1", state, Some(journal.clone()), mode),
        ));
        let run = ScriptRun::with_session(&limits(), session.clone());
        let compiler = Compiler::new(limits(), vec![PathBuf::from("stdlib")]);
        World {
            dir,
            session,
            journal,
            run,
            compiler,
        }
    }

    pub fn eval(&self, src: &str) -> Result<Dynamic, ScriptError> {
        let pb = self.compiler.compile_source("<test>", src, &[])?;
        self.run.run(&pb)
    }

    pub fn json(&self, src: &str) -> serde_json::Value {
        match self.eval(src) {
            Ok(v) => patchbook::script::to_json(&v),
            Err(e) => panic!("script failed:\n{e}"),
        }
    }

    pub fn err(&self, src: &str) -> String {
        match self.eval(src) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    pub fn records(&self, kind: &str) -> Vec<Record> {
        self.journal
            .records()
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == kind)
            .collect()
    }

    /// Puts `bytes` into the trusted mirror; returns its path and SHA-256.
    pub fn mirror_file(&self, name: &str, bytes: &[u8]) -> (PathBuf, String) {
        use sha2::Digest;
        let p = trusted(self.dir.path()).join(name);
        std::fs::write(&p, bytes).unwrap();
        (p, hex::encode(sha2::Sha256::digest(bytes)))
    }
}

/// Fails (never skips) when a tool the test needs is missing.
pub fn require_tool(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is missing: run `.ci/setup` as root");
}

/// Builds a tiny real .deb (no maintainer scripts, one file under /usr/share/doc)
/// with dpkg-deb; returns its bytes.
pub fn tiny_deb(dir: &Path, name: &str, version: &str) -> Vec<u8> {
    require_tool("dpkg-deb");
    let root = dir.join(format!("deb-{name}-{version}"));
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join(format!("usr/share/doc/{name}"))).unwrap();
    std::fs::write(
        root.join(format!("usr/share/doc/{name}/README")),
        format!("{name} {version}\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.com>\nDescription: test package\n"
        ),
    )
    .unwrap();
    let out = dir.join(format!("{name}_{version}_all.deb"));
    let st = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&root)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "dpkg-deb: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(out).unwrap()
}

/// The version dpkg reports for an installed package on this machine.
pub fn local_dpkg_version(pkg: &str) -> String {
    require_tool("dpkg-query");
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}
