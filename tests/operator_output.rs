//! What the operator sees and what the journal keeps, on a real run through the
//! local transport: `log()` lines shown by default and journaled, `-q` keeping the
//! failures, no colour codes in a pipe, and a failure inside a library naming the
//! library's file; hosts sharing a closure's captured variables without
//! contending for them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::process::{Command, Output};

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("lib")).unwrap();
        std::fs::write(
            p.join("patchbook.toml"),
            "inventory = [\"hosts.toml\"]\nstdlib = \"lib\"\nallow_local_hosts = true\n",
        )
        .unwrap();
        std::fs::write(
            p.join("hosts.toml"),
            "[hosts.h1]\ntransport = \"local\"\ngroups = [\"web\"]\n\
             [hosts.h2]\ntransport = \"local\"\ngroups = [\"web\"]\n",
        )
        .unwrap();
        std::fs::write(
            p.join("lib/checks.rhai"),
            "fn must_be_h1(host) {\n    let who = host.name;\n    if who != \"h1\" { throw `not h1: ${who}`; }\n}\n",
        )
        .unwrap();
        Project { dir }
    }

    fn file(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_patchbook"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PATCHBOOK_LOG")
            .env_remove("NO_COLOR")
            .output()
            .unwrap()
    }

    fn journals(&self) -> String {
        let runs = self.dir.path().join(".patchbook/runs");
        let mut all = String::new();
        for e in std::fs::read_dir(&runs).unwrap() {
            let path = e.unwrap().path();
            if path.extension().and_then(|x| x.to_str()) == Some("jsonl") {
                all.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
        all
    }
}

const LOGGING: &str = r#"
log("checking the web tier");
rollout(hosts("web"), #{ max_failed: 5 }, |host| {
    log(`visiting ${host.name}`);
});
"#;

#[test]
fn log_lines_are_shown_by_default_hidden_by_quiet_and_always_journaled() {
    let p = Project::new();
    p.file("pb.rhai", LOGGING);
    let out = p.run(&["run", "pb.rhai"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checking the web tier"), "{err}");
    assert!(err.contains("visiting h2"), "{err}");
    // stderr is a pipe here: no colour codes.
    assert!(!err.contains('\u{1b}'), "escape codes in a pipe: {err:?}");

    let out = p.run(&["-q", "run", "pb.rhai"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("visiting"), "-q shows log lines: {err}");

    let journals = p.journals();
    let logs: Vec<serde_json::Value> = journals
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "log")
        .collect();
    // Two runs, three messages each, `-q` or not.
    assert_eq!(logs.len(), 6, "{journals}");
    let h1 = logs
        .iter()
        .find(|r| r["host"] == "h1")
        .expect("a log record on h1");
    assert_eq!(h1["data"]["message"], "visiting h1");
    assert_eq!(h1["data"]["source"], "pb.rhai");
    assert_eq!(h1["data"]["line"], 4);
}

#[test]
fn quiet_still_names_every_failed_host() {
    let p = Project::new();
    p.file(
        "pb.rhai",
        "import \"checks\" as c;\nrollout(hosts(\"web\"), #{ max_failed: 5 }, |host| { c::must_be_h1(host); });\n",
    );
    let out = p.run(&["-q", "run", "pb.rhai"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("h2 failed: not h1: h2"), "{err}");
    assert!(!err.contains("h1 failed"), "{err}");
}

#[test]
fn a_host_failing_inside_a_library_names_the_library_file_and_line() {
    let p = Project::new();
    p.file(
        "pb.rhai",
        "import \"checks\" as c;\nrollout(hosts(\"web\"), #{ max_failed: 5 }, |host| { c::must_be_h1(host); });\n",
    );
    let out = p.run(&["run", "pb.rhai"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let finish = p
        .journals()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["kind"] == "host.finish" && r["host"] == "h2")
        .expect("h2's end");
    let reason = finish["data"]["detail"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("lib/checks.rhai:3:"), "{reason}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lib/checks.rhai:3:"), "{err}");
}

#[test]
fn a_stop_reason_reads_as_words_in_the_summary_and_the_report() {
    let p = Project::new();
    p.file(
        "pb.rhai",
        "rollout(hosts(\"web\"), #{ max_failed: 0, parallel: 1 }, |host| { if host.name == \"h1\" { throw \"broken\"; } });\n",
    );
    let out = p.run(&["run", "pb.rhai"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failure budget spent: 1 failed, 0 allowed"),
        "{err}"
    );
    assert!(!err.contains("BudgetExhausted"), "{err}");
    let run = err
        .split_whitespace()
        .skip_while(|w| *w != "run")
        .nth(1)
        .expect("patchbook: run RUN")
        .trim_end_matches(':')
        .to_string();
    let md = p.run(&["report", &run]);
    let md = String::from_utf8_lossy(&md.stdout);
    let stop = md
        .lines()
        .find(|l| l.contains("Stop"))
        .unwrap_or_else(|| panic!("a stop line: {md}"));
    assert!(stop.contains("failure budget spent"), "{stop}");
    assert!(!stop.contains('{'), "{stop}");
}

#[test]
fn rollback_with_a_selector_that_matches_nothing_is_an_error_and_writes_nothing() {
    let p = Project::new();
    p.file("pb.rhai", LOGGING);
    let out = p.run(&["run", "pb.rhai"]);
    assert!(out.status.success(), "{out:?}");
    let before = p.journals();
    let run = serde_json::from_str::<serde_json::Value>(before.lines().next().unwrap()).unwrap()
        ["run"]
        .as_str()
        .unwrap()
        .to_string();
    let out = p.run(&["rollback", &run, "--hosts", "wbe"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wbe") && err.contains("web"), "{err}");
    assert_eq!(
        p.journals(),
        before,
        "a refused rollback wrote to the journal"
    );
}

/// Rhai keeps a captured variable in one locked cell and fails a call that waits
/// over ~50 ms for it ("Data race detected"): three hosts each calling a method on
/// the same captured value for a second failed two of them. Each host's call now
/// has its own copy, so all three pass, and what one writes stays its own.
#[test]
fn hosts_calling_a_method_on_a_captured_variable_at_once_all_pass() {
    let p = Project::new();
    p.file(
        "hosts.toml",
        "[hosts.h1]\ntransport = \"local\"\ngroups = [\"web\"]\n\
         [hosts.h2]\ntransport = \"local\"\ngroups = [\"web\"]\n\
         [hosts.h3]\ntransport = \"local\"\ngroups = [\"web\"]\n",
    );
    p.file(
        "pb.rhai",
        r#"
let pause = 1;
let seen = [];
rollout(hosts("web"), #{ max_failed: 0, parallel: 3 }, |host| {
    pause.sleep();
    seen.push(host.name);
    log(`${host.name} saw ${seen.len()}`);
});
log(`after the rollout: ${seen.len()}`);
"#,
    );
    let out = p.run(&["run", "pb.rhai"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("Data race"), "{err}");
    for h in ["h1", "h2", "h3"] {
        assert!(err.contains(&format!("{h} saw 1")), "{err}");
    }
    assert!(err.contains("after the rollout: 0"), "{err}");
}
