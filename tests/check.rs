//! `patchbook check` through the real binary: every broken playbook under
//! tests/fixtures/check/ fails with the problem its first line promises, the
//! repository's own playbooks and stdlib check clean, a missing configured folder
//! is an error, and a playbook using every option key passes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use patchbook::script::lint::OPTION_MAPS;

const FIXTURES: &str = "tests/fixtures/check";

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A temp dir with a patchbook.toml: the repository's stdlib, the fixture
/// library folder, and `extra` lines.
fn project(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    let config = format!(
        "stdlib = {:?}\nlibraries = [{:?}]\n{extra}",
        repo("stdlib"),
        repo(FIXTURES).join("lib"),
    );
    std::fs::write(dir.path().join("patchbook.toml"), config).unwrap();
    dir
}

fn check(dir: &Path, args: &[&Path]) -> (Option<i32>, String, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(dir)
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `// expect: [FILE ]LINE:COL MESSAGE`, FILE relative to the fixture folder.
struct Expect {
    file: PathBuf,
    line_col: String,
    message: String,
}

fn expectation(fixture: &Path) -> Expect {
    let text = std::fs::read_to_string(fixture).unwrap();
    let first = text.lines().next().unwrap_or("");
    let rest = first
        .strip_prefix("// expect: ")
        .unwrap_or_else(|| panic!("{}: no `// expect:` line", fixture.display()));
    let (file, rest) = match rest.split_once(' ') {
        Some((f, r)) if f.ends_with(".rhai") => (repo(FIXTURES).join(f), r),
        _ => (fixture.to_path_buf(), rest),
    };
    let (line_col, message) = rest.split_once(' ').unwrap();
    Expect {
        file,
        line_col: line_col.to_string(),
        message: message.to_string(),
    }
}

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(FIXTURES))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_broken_fixture_fails_where_and_how_it_says() {
    let dir = project("");
    let files = fixtures();
    assert!(files.len() >= 20, "only {} fixtures", files.len());
    let mut wrong = Vec::new();
    for f in &files {
        let want = expectation(f);
        let (code, _, stderr) = check(dir.path(), &[f]);
        // The message and the place belong to the same error: the `-->` line
        // follows the `error:` line.
        let at = format!("--> {}:{}", want.file.display(), want.line_col);
        let lines: Vec<&str> = stderr.lines().collect();
        let found = lines.windows(2).any(|w| {
            w[0].starts_with("error: ") && w[0].contains(&want.message) && w[1].trim_start() == at
        });
        if code != Some(2) || !found {
            wrong.push(format!(
                "{}: exit {code:?}, wanted `{}` at {at}\n{stderr}",
                f.display(),
                want.message
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_module_problem_is_reported_once_at_the_module() {
    let dir = project("");
    let a = repo(FIXTURES).join("library_module.rhai");
    let module = repo(FIXTURES).join("lib/checklib/faulty.rhai");
    // The module is imported by the playbook and also named itself.
    let (code, _, stderr) = check(dir.path(), &[&a, &module]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.matches("unknown function `bakup`").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains(" 5 |     bakup(host"), "{stderr}");
    assert!(stderr.contains("1 problems; 1 of 2 files"), "{stderr}");
}

#[test]
fn every_problem_of_every_file_is_printed() {
    let dir = project("");
    let f = dir.path().join("scripts/many.rhai");
    std::fs::write(
        &f,
        "let h = hosts(\"web\")[0];\nbakup(h, []);\ndeploy(h);\nwindow(\"x\", #{ bufer: 1 });\n",
    )
    .unwrap();
    let good = dir.path().join("scripts/good.rhai");
    std::fs::write(&good, "log(\"fine\");\n").unwrap();
    let (code, _, stderr) = check(dir.path(), &[&f, &good]);
    assert_eq!(code, Some(2), "{stderr}");
    for at in ["many.rhai:2:1", "many.rhai:3:1", "many.rhai:4:16"] {
        assert!(stderr.contains(at), "{at}: {stderr}");
    }
    assert!(!stderr.contains("good.rhai"), "{stderr}");
    assert!(stderr.contains("3 problems; 1 of 2 files"), "{stderr}");
}

#[test]
fn the_repository_playbooks_and_stdlib_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patchbook.toml"),
        format!(
            "stdlib = {:?}\nplaybooks = {:?}\n",
            repo("stdlib"),
            repo("scripts")
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = check(dir.path(), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let n = std::fs::read_dir(repo("scripts")).unwrap().count();
    assert!(n >= 3, "scripts/ has {n} files");
    // Every playbook and every stdlib module was looked at.
    let checked: usize = stdout
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(checked >= n + 6, "{stdout}");
}

#[test]
fn a_missing_configured_folder_is_an_error_naming_it() {
    let dir = project("");
    std::fs::write(
        dir.path().join("patchbook.toml"),
        format!(
            "stdlib = {:?}\nlibraries = [\"org-lib\"]\nplaybooks = \"plays\"\n",
            repo("stdlib")
        ),
    )
    .unwrap();
    let (code, _, stderr) = check(dir.path(), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    for key in ["libraries", "playbooks"] {
        assert!(stderr.contains(&format!("the `{key}` folder")), "{stderr}");
    }
    assert!(stderr.contains("org-lib does not exist"), "{stderr}");
    assert!(stderr.contains("plays does not exist"), "{stderr}");
    assert!(!stderr.contains("`stdlib` folder"), "{stderr}");

    // Explicit paths do not look at the configured folders.
    let f = dir.path().join("ok.rhai");
    std::fs::write(&f, "log(\"fine\");\n").unwrap();
    let (code, stdout, stderr) = check(dir.path(), &[&f]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("1 files compiled cleanly"), "{stdout}");
}

#[test]
fn a_playbook_using_every_option_key_passes() {
    // Built from the same table the checker reads, so a key added to a primitive
    // is covered here without editing this test.
    let mut src = String::from("let x = ();\n");
    for o in OPTION_MAPS {
        let keys: Vec<String> = o.keys.iter().map(|k| format!("{k}: ()")).collect();
        let args: Vec<String> = (0..o.arity)
            .map(|i| {
                if i == o.index {
                    format!("#{{ {} }}", keys.join(", "))
                } else {
                    "x".to_string()
                }
            })
            .collect();
        src.push_str(&format!("{}({});\n", o.function, args.join(", ")));
    }
    for f in [
        "deploy",
        "rollout",
        "artifact",
        "window",
        "notify",
        "health",
        "http_check",
        "exec",
    ] {
        assert!(
            src.contains(&format!("\n{f}(")),
            "{f} has no option map:\n{src}"
        );
    }
    assert!(
        src.contains("max_failed: ()") && src.contains("rollback_to: ()"),
        "{src}"
    );
    let dir = project("");
    let f = dir.path().join("scripts/all_options.rhai");
    std::fs::write(&f, &src).unwrap();
    let (code, _, stderr) = check(dir.path(), &[&f]);
    assert_eq!(code, Some(0), "{src}\n{stderr}");

    // The same playbook with one key misspelt fails: the test above can fail.
    std::fs::write(&f, src.replace("max_failed: ()", "max_failde: ()")).unwrap();
    let (code, _, stderr) = check(dir.path(), &[&f]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("did you mean `max_failed`"), "{stderr}");

    // The unreachable budget is a key `check` knows.
    assert!(src.contains("max_unreachable: ()"), "{src}");
    std::fs::write(&f, src.replace("max_unreachable: ()", "max_unreachble: ()")).unwrap();
    let (code, _, stderr) = check(dir.path(), &[&f]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("did you mean `max_unreachable`"),
        "{stderr}"
    );
}

#[test]
fn window_refuses_at_run_time_the_keys_check_refuses() {
    let dir = project("");
    let bad = dir.path().join("w.rhai");
    std::fs::write(
        &bad,
        "window(\"Sat 02:00-06:00 UTC\", #{ bufer: \"30m\" });\n",
    )
    .unwrap();
    let plan = |f: &Path| {
        Command::new(env!("CARGO_BIN_EXE_patchbook"))
            .current_dir(dir.path())
            .arg("plan")
            .arg(f)
            .output()
            .unwrap()
    };
    let out = plan(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("window: unknown option `bufer`"),
        "{stderr}"
    );
    let good = dir.path().join("ok.rhai");
    std::fs::write(
        &good,
        "window(\"Sat 02:00-06:00 UTC\", #{ buffer: \"30m\" });\n",
    )
    .unwrap();
    let out = plan(&good);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
