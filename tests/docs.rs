//! `patchbook docs --out DIR`: the definition files name every function a run's
//! engine registers, and every primitive carries its doc comment, so a primitive
//! cannot go missing from editor completion.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::BTreeSet;
use std::process::Command;

use patchbook::script::docs::{run_engine, PRIMITIVES_FILE};
use patchbook::script::Limits;

/// The primitives a playbook is promised (README, DESIGN): none may disappear.
const PRIMITIVES: &[&str] = &[
    "hosts",
    "exec",
    "shell",
    "log",
    "facts",
    "installed",
    "needing",
    "version_cmp",
    "rpm_version_cmp",
    "artifact",
    "backup",
    "restore",
    "deploy",
    "verify",
    "health",
    "http_check",
    "service_active",
    "rollback",
    "notify",
    "secret",
    "rollout",
    "window",
    "param",
    "pending_updates",
    "upgrade",
    "probe",
    "put_file",
    "template",
    "line_in_file",
    "remove_file",
    "service",
    "reboot",
    "needs_reboot",
    "services_needing_restart",
];

/// `(name as written in a definition file, is a property getter)` of every function
/// registered directly on a run engine (the standard library comes from packages
/// and is not listed).
fn registered() -> BTreeSet<(String, bool)> {
    let run = run_engine(&Limits::default());
    run.engine()
        .gen_fn_signatures(false)
        .into_iter()
        .map(|sig| {
            let name = sig.split('(').next().unwrap().trim().to_string();
            match name.strip_prefix("get$") {
                Some(prop) => (prop.to_string(), true),
                None => (name, false),
            }
        })
        .collect()
}

fn generate() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .args(["docs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patchbook docs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains(PRIMITIVES_FILE), "{listed}");
    let text = std::fs::read_to_string(dir.path().join(PRIMITIVES_FILE)).unwrap();
    (dir, text)
}

#[test]
fn definitions_name_every_registered_function() {
    let (dir, text) = generate();
    let names = registered();
    assert!(names.len() > PRIMITIVES.len(), "{names:?}");
    for p in PRIMITIVES {
        assert!(
            names.contains(&(p.to_string(), false)),
            "{p} is not registered on a run engine"
        );
    }
    for (name, getter) in &names {
        // Operators and reserved words (`var`) are written as `op`.
        let needles = if *getter {
            vec![format!("fn get {name}(")]
        } else {
            vec![format!("fn {name}("), format!("op {name}(")]
        };
        assert!(
            needles.iter().any(|n| text.contains(n)),
            "{name} is missing from {PRIMITIVES_FILE}"
        );
    }
    for ty in ["Host", "Artifact", "Backup"] {
        assert!(
            text.contains(&format!(": {ty}")),
            "custom type {ty} is not in the definitions"
        );
    }
    // Editors also get the builtins.
    assert!(dir.path().join("__builtin__.d.rhai").exists());
}

#[test]
fn every_primitive_has_a_doc_comment() {
    let (_dir, text) = generate();
    let lines: Vec<&str> = text.lines().collect();
    let documented = |needle: &str| -> Vec<bool> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(needle))
            .map(|(i, _)| i > 0 && lines[i - 1].starts_with("///"))
            .collect()
    };
    for p in PRIMITIVES {
        let mut found = documented(&format!("fn {p}("));
        found.extend(documented(&format!("op {p}(")));
        assert!(!found.is_empty(), "fn {p} is not in the definitions");
        assert!(
            found.iter().all(|d| *d),
            "an overload of {p} has no doc comment"
        );
    }
    for getter in ["url", "sha256", "path", "archive", "paths", "id"] {
        let found = documented(&format!("fn get {getter}("));
        assert!(
            !found.is_empty() && found.iter().all(|d| *d),
            "getter {getter} has no doc comment"
        );
    }
    // Comments carry content, not just a marker.
    let deploy = text
        .find("fn deploy(host: Host, artifact: Artifact) ")
        .unwrap();
    assert!(text[..deploy].contains("re-hashes it there"));
}
