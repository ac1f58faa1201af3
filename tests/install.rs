//! What a new admin does with nothing but the binary: a copy of it in an empty
//! folder, far from any checkout, runs `init` and `check` with the stdlib built
//! into it; a configured stdlib folder overrides the built-in one; `completions`
//! and `man` print what shells and man(1) read.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary copied into a fresh temp folder (outside the repository), so
/// nothing beside it can supply a stdlib.
fn lone_binary() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    assert!(
        !dir.path().canonicalize().unwrap().starts_with(&repo),
        "the temp folder must be outside the repository"
    );
    let bin = dir.path().join("patchbook");
    std::fs::copy(env!("CARGO_BIN_EXE_patchbook"), &bin).unwrap();
    (dir, bin)
}

fn run(bin: &Path, cwd: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out: Output = Command::new(bin)
        .current_dir(cwd)
        .args(args)
        .env_remove("PATCHBOOK_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_copied_binary_inits_a_project_that_checks_clean_with_the_built_in_stdlib() {
    let (dir, bin) = lone_binary();
    let (code, out, err) = run(&bin, dir.path(), &["init", "demo"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let demo = dir.path().join("demo");
    for f in [
        "patchbook.toml",
        "inventory.toml",
        "playbooks/patch-package.rhai",
    ] {
        assert!(demo.join(f).is_file(), "init did not write {f}");
        assert!(out.contains(f), "init did not say it wrote {f}: {out}");
    }
    assert!(!demo.join("stdlib").exists());
    let playbook = std::fs::read_to_string(demo.join("playbooks/patch-package.rhai")).unwrap();
    assert!(playbook.contains("import \"patch/debian\" as deb;"));
    // The next three commands.
    assert!(out.contains("cd demo"), "{out}");
    assert!(out.contains("patchbook check"), "{out}");
    assert!(
        out.contains("patchbook plan playbooks/patch-package.rhai"),
        "{out}"
    );

    let (code, out, err) = run(&bin, &demo, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // The playbook plus every built-in module it can import.
    let stdlib_files = glob::glob(concat!(env!("CARGO_MANIFEST_DIR"), "/stdlib/**/*.rhai"))
        .unwrap()
        .count();
    assert!(
        out.contains(&format!("{} files compiled cleanly", stdlib_files + 1)),
        "{out}"
    );

    // `config` names the built-in stdlib as the one in force.
    let (code, out, err) = run(&bin, &demo, &["config"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("stdlib = \"<built-in stdlib>\""), "{out}");

    // Imports of the built-in stdlib keep the resolver's path checks.
    std::fs::write(
        demo.join("playbooks/escape.rhai"),
        "import \"../stdlib/patch/debian\" as deb;\n",
    )
    .unwrap();
    let (code, _, err) = run(&bin, &demo, &["check"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`..` would leave the library folders"),
        "{err}"
    );
    std::fs::remove_file(demo.join("playbooks/escape.rhai")).unwrap();

    // A second init refuses, naming the file, and changes nothing.
    std::fs::write(demo.join("inventory.toml"), "# mine\n").unwrap();
    let (code, _, err) = run(&bin, dir.path(), &["init", "demo"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("demo/patchbook.toml already exists"), "{err}");
    assert_eq!(
        std::fs::read_to_string(demo.join("inventory.toml")).unwrap(),
        "# mine\n"
    );
}

#[test]
fn a_configured_stdlib_folder_overrides_the_built_in_one() {
    let (dir, bin) = lone_binary();
    let project = dir.path().join("p");
    std::fs::create_dir_all(project.join("mine/patch")).unwrap();
    std::fs::create_dir_all(project.join("playbooks")).unwrap();
    std::fs::write(
        project.join("mine/patch/debian.rhai"),
        "// patch/debian, the site's own.\n//\n//\nfn site_only() { 1 }\n",
    )
    .unwrap();
    std::fs::write(
        project.join("playbooks/p.rhai"),
        "import \"patch/debian\" as deb;\ndeb::site_only();\n",
    )
    .unwrap();
    let config = project.join("patchbook.toml");
    std::fs::write(&config, "playbooks = \"playbooks\"\nstdlib = \"mine\"\n").unwrap();
    let (code, out, err) = run(&bin, &project, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("2 files compiled cleanly"), "{out}");

    // Without the setting the built-in patch/debian is used, which has no site_only.
    std::fs::write(&config, "playbooks = \"playbooks\"\n").unwrap();
    std::fs::rename(project.join("mine"), project.join("elsewhere")).unwrap();
    let (code, _, err) = run(&bin, &project, &["check"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("site_only"), "{err}");

    // A `stdlib` folder beside the config is found without the setting.
    std::fs::rename(project.join("elsewhere"), project.join("stdlib")).unwrap();
    let (code, out, err) = run(&bin, &project, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn bash_completion_knows_the_verbs() {
    let (dir, bin) = lone_binary();
    let (code, out, err) = run(&bin, dir.path(), &["completions", "bash"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("complete -F _patchbook"), "{out}");
    for verb in ["run", "rollback", "plan", "init", "completions"] {
        assert!(
            out.contains(&format!("patchbook,{verb})")),
            "bash completion lacks `{verb}`"
        );
    }
    for shell in ["zsh", "fish"] {
        let (code, out, err) = run(&bin, dir.path(), &["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(
            out.contains("rollback"),
            "{shell} completion lacks rollback"
        );
    }
    let (code, _, err) = run(&bin, dir.path(), &["completions", "cmd"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn man_dir_writes_one_page_per_verb() {
    let (dir, bin) = lone_binary();
    let pages = dir.path().join("man");
    let (code, _, err) = run(&bin, dir.path(), &["man", "--dir", pages.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    for (file, title) in [
        ("patchbook.1", ".TH patchbook 1"),
        ("patchbook-run.1", ".TH patchbook-run 1"),
        (
            "patchbook-inventory-list.1",
            ".TH patchbook-inventory-list 1",
        ),
        ("patchbook-config.1", ".TH patchbook-config 1"),
    ] {
        let page = std::fs::read_to_string(pages.join(file)).unwrap_or_default();
        assert!(page.lines().any(|l| l.starts_with(title)), "{file}: {page}");
    }
    // `config` points at the one reference of every key.
    let config = std::fs::read_to_string(pages.join("patchbook-config.1")).unwrap();
    assert!(config.contains("Every key"), "{config}");
}

#[test]
fn man_page_is_roff_naming_the_verbs() {
    let (dir, bin) = lone_binary();
    let (code, out, err) = run(&bin, dir.path(), &["man"]);
    assert_eq!(code, Some(0), "{err}");
    // clap_mangen opens with the portable quote-string definitions (.ie/.el),
    // then the title line; nothing else may come before .TH.
    let first = out
        .lines()
        .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
        .unwrap_or("");
    assert!(first.starts_with(".TH patchbook 1"), "{first}");
    assert!(out.contains(".SH NAME"), "{out}");
    for verb in ["run", "rollback", "plan", "check", "init", "watch"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("patchbook\\-{verb}("))),
            "the page does not name `{verb}`"
        );
    }
}
