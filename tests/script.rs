//! The script layer end to end: sandbox limits, module resolution, error rendering
//! (snapshots), primitives over local-transport hosts, and the `eval`, `exec`,
//! `check` and `run` verbs through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbook::config::Config;
use patchbook::inventory::{Host, Inventory, TransportKind};
use patchbook::runtime::{Options, Runtime};
use patchbook::script::{
    run_per_host, run_per_host_in, CompiledPlaybook, Compiler, HostClosure, Limits, ScriptError,
    ScriptHost, ScriptRun, HOST_VAR,
};
use rhai::{Array, Dynamic, FnPtr, NativeCallContext};

const FIXTURES: &str = "tests/fixtures/script";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_patchbook"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Limits small enough that runaway scripts stop within a second in a debug build.
fn small_limits() -> Limits {
    Limits {
        max_operations: 500_000,
        max_array_size: 10_000,
        max_memory_mb: 64,
        ..Limits::default()
    }
}

fn fixture_compiler() -> Compiler {
    Compiler::new(
        small_limits(),
        vec![
            PathBuf::from(FIXTURES).join("stdlib"),
            PathBuf::from(FIXTURES).join("acme"),
        ],
    )
}

fn local_hosts(names: &[&str]) -> Vec<Host> {
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

fn local_runtime(names: &[&str]) -> Arc<Runtime> {
    let inv = Inventory::from_parts(local_hosts(names), BTreeMap::new(), Vec::new());
    let mut cfg = Config::defaults_in(Path::new(FIXTURES));
    cfg.limits = small_limits();
    Arc::new(Runtime::from_parts(cfg, inv, &Options::default()))
}

fn script_err(r: Result<impl std::fmt::Debug, ScriptError>) -> String {
    match r {
        Ok(v) => panic!("expected a script error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn eval_str(run: &ScriptRun, compiler: &Compiler, src: &str) -> Result<Dynamic, ScriptError> {
    let pb = compiler.compile_source("<test>", src, &[])?;
    run.run(&pb)
}

// ---------- sandbox ----------

const BOMBS: &[(&str, &str, &str)] = &[
    ("infinite loop", "loop {}", "Too many operations"),
    (
        "deep recursion",
        "fn f(n) { if n == 0 { 0 } else { 1 + f(n - 1) } } f(1000000)",
        "Stack overflow",
    ),
    (
        "string doubling",
        r#"let s = "x"; loop { s += s; }"#,
        "Length of string too large",
    ),
    (
        "200,000-entry map",
        "let m = #{}; for i in 0..200000 { m[i.to_string()] = i; }",
        "Size of object map too large",
    ),
    (
        "200,000-entry nested map",
        "let m = #{ inner: #{} }; for i in 0..200000 { m.inner[`k${i}`] = i; }",
        "Size of object map too large",
    ),
    ("eval", r#"eval("1 + 1")"#, "'eval' is disabled"),
    (
        "array growth",
        "let a = []; for i in 0..200000 { a.push(i); }",
        "Size of array",
    ),
    // Dropping a value nested a million deep used to overflow the stack and abort.
    (
        "closures capturing closures",
        "let f = || 0; for i in 0..1000000 { let g = f; f = || g; } 1",
        "nests deeper than 1000 levels",
    ),
    // Each turn copies what `f` holds twice over: quadratic or doubling work in
    // one operation, never seen by Rhai's own size checks.
    (
        "a function pointer curried with itself",
        "let f = || 0; for i in 0..100000 { f = f.curry(f); } 1",
        "more than 1000 curried values",
    ),
    (
        "a long curry chain",
        "let f = |x| x; for i in 0..1000000 { f = f.curry(i); } 1",
        "more than 1000 curried values",
    ),
    (
        "function pointers curried with an array of themselves",
        "let f = || 0; for i in 0..100000 { f = f.curry([f, f]); } 1",
        "more than 1000 curried values",
    ),
    (
        "arrays of function pointers curried with the array",
        "let f = || 0; let a = []; for i in 0..100000 { a = [f.curry(a), f.curry(a)]; } 1",
        "too large",
    ),
    (
        "maps of function pointers curried with the map",
        "let f = || 0; let m = #{}; for i in 0..100000 { m = #{ a: f.curry(m), b: f.curry(m) }; } 1",
        "too large",
    ),
    (
        "maps in maps",
        "let m = #{}; for i in 0..1000000 { m = #{ x: m }; } 1",
        // Each turn copies the whole chain: the work ends it before its depth does.
        "Too many operations",
    ),
    // Each value is within its size limit; together they would exhaust memory.
    (
        "closures capturing big strings",
        "let big = \"x\"; for i in 0..19 { big += big; } let fs = []; for i in 0..5000 { let s = big + i; fs.push(|| s); } fs.len()",
        "limits.max_memory_mb",
    ),
    (
        "curried big strings",
        "let big = \"x\"; for i in 0..19 { big += big; } let f = |a, b| a; let fs = []; for i in 0..5000 { fs.push(f.curry(big + i)); } fs.len()",
        "limits.max_memory_mb",
    ),
    (
        "a map of big strings",
        "let big = \"x\"; for i in 0..19 { big += big; } let m = #{}; for i in 0..5000 { m[`k${i}`] = big + i; } m.len()",
        "limits.max_memory_mb",
    ),
    // Each turn copies the whole nest: the work ends it before its size or depth.
    (
        "arrays in arrays",
        "let a = []; for i in 0..1000000 { a = [a]; } 1",
        "Too many operations",
    ),
];

#[test]
fn every_bomb_ends_with_a_clear_error_and_the_process_goes_on() {
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), None);
    for (what, src, expect) in BOMBS {
        let err = script_err(eval_str(&run, &compiler, src));
        assert!(err.contains(expect), "{what}: {err}");
        assert!(err.contains("<test>:1:"), "{what} has no position: {err}");
        // The same process, the same run: the next call works.
        let v = eval_str(&run, &compiler, "40 + 2").expect("call after a bomb");
        assert_eq!(v.as_int().unwrap(), 42, "{what}");
    }
}

/// A bomb that does its damage inside single operations (a copy of a growing
/// value) must still end in bounded time: the acceptance bound for every class.
#[test]
fn every_bomb_ends_within_seconds_under_the_default_limits() {
    let compiler = Compiler::new(Limits::default(), vec![]);
    let run = ScriptRun::new(&Limits::default(), None);
    // The bombs that copy or nest growing values; the others are plain loops
    // that the default operation limit lets run for its full count.
    let copying = [
        "closures capturing closures",
        "a function pointer curried with itself",
        "a long curry chain",
        "function pointers curried with an array of themselves",
        "arrays of function pointers curried with the array",
        "maps of function pointers curried with the map",
        "maps in maps",
        "arrays in arrays",
    ];
    for (what, src, _) in BOMBS.iter().filter(|(w, ..)| copying.contains(w)) {
        let t0 = Instant::now();
        let err = script_err(eval_str(&run, &compiler, src));
        // Each ends in a second or two; the margin is for a debug build on a
        // CI machine whose two cores also run other test binaries and the fuzz
        // build (one took 10.4 s there). A bomb that does not end still fails.
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} took {:?}: {err}",
            t0.elapsed()
        );
    }
}

/// Rhai counts `let b = a` as one operation whatever `a` holds. A loop of
/// copies of a 9,000-item array stayed under 1,000,000 operations while it ran
/// for minutes; the copies' work counts now, so the limit ends it.
#[test]
fn copying_counts_against_the_operation_limit() {
    let limits = Limits {
        max_operations: 1_000_000,
        deadline_secs: 20,
        ..Limits::default()
    };
    let compiler = Compiler::new(limits.clone(), vec![]);
    let run = ScriptRun::new(&limits, None);
    let t0 = Instant::now();
    let err = script_err(eval_str(
        &run,
        &compiler,
        "let a = []; for i in 0..9000 { a.push(i); } for i in 0..150000 { let b = a; } 1",
    ));
    assert!(err.contains("Too many operations"), "{err}");
    assert!(err.contains("limits.max_operations"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // Cheap operations are not charged for more than they are: a loop of 100,000
    // small steps stays well within the same limit.
    let v = eval_str(
        &run,
        &compiler,
        "let s = 0; for i in 0..100000 { s += i; } s",
    )
    .unwrap();
    assert_eq!(v.as_int().unwrap(), 4_999_950_000);
}

#[test]
fn limit_errors_are_marked_as_limits() {
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), None);
    for (what, src, _) in &BOMBS[..5] {
        let e = eval_str(&run, &compiler, src).unwrap_err();
        let d = e.diagnostic().expect("a diagnostic");
        assert!(d.limit, "{what} not marked as a limit: {e}");
        assert!(
            d.help.as_deref().unwrap_or("").contains("limits."),
            "{what}: {e}"
        );
    }
}

#[test]
fn deadline_stops_a_loop_that_the_operation_limit_would_not() {
    let limits = Limits {
        max_operations: 0, // unlimited: only the clock can stop it
        deadline_secs: 1,
        ..Limits::default()
    };
    let compiler = Compiler::new(limits.clone(), vec![]);
    let run = ScriptRun::new(&limits, None);
    let started = Instant::now();
    let err = script_err(eval_str(&run, &compiler, "let i = 0; loop { i += 1; }"));
    assert!(err.contains("deadline"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn cancel_flag_stops_a_running_script() {
    let limits = Limits {
        max_operations: 0,
        ..Limits::default()
    };
    let compiler = Compiler::new(limits.clone(), vec![]);
    let run = ScriptRun::new(&limits, None);
    let flag = run.cancel_flag();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::Relaxed);
    });
    let err = script_err(eval_str(&run, &compiler, "loop {}"));
    stopper.join().unwrap();
    assert!(err.contains("cancelled"), "{err}");
}

#[test]
fn one_hosts_runaway_snippet_leaves_the_others_alone() {
    let rt = local_runtime(&["h1", "h2", "h3", "h4"]);
    let pb = fixture_compiler()
        .compile_source(
            "<exec>",
            r#"if host.name == "h2" { loop {} } else { probe(host, ["echo", host.name]).stdout }"#,
            &[HOST_VAR],
        )
        .unwrap();
    let hosts = rt.targets("all").unwrap();
    let results = run_per_host(&pb, &hosts, rt.clone(), &small_limits(), 4);
    assert_eq!(results.len(), 4);
    for r in &results {
        match (r.host.as_str(), &r.result) {
            ("h2", Err(e)) => assert!(e.to_string().contains("Too many operations"), "{e}"),
            ("h2", Ok(v)) => panic!("h2 should have hit the limit, got {v}"),
            (h, Ok(v)) => assert_eq!(v.clone().into_string().unwrap(), format!("{h}\n")),
            (h, Err(e)) => panic!("{h} failed: {e}"),
        }
    }
}

#[test]
fn deep_recursion_on_a_worker_thread_is_an_error_not_a_crash() {
    let rt = local_runtime(&["h1", "h2"]);
    let pb = fixture_compiler()
        .compile_source(
            "<exec>",
            "fn f(n) { if n == 0 { 0 } else { 1 + f(n - 1) } } f(1000000)",
            &[HOST_VAR],
        )
        .unwrap();
    let hosts = rt.targets("all").unwrap();
    // Default limits: the depth that a real configuration uses.
    let results = run_per_host(&pb, &hosts, rt.clone(), &Limits::default(), 2);
    for r in results {
        let e = r.result.unwrap_err().to_string();
        assert!(e.contains("Stack overflow"), "{e}");
    }
}

// ---------- primitives ----------

#[test]
fn hosts_probe_and_getters_work_on_local_hosts() {
    let rt = local_runtime(&["h1", "h2", "h3"]);
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), Some(rt));
    let v = eval_str(
        &run,
        &compiler,
        r#"
        let out = [];
        for h in hosts("all") {
            let r = probe(h, ["uname", "-r"]);
            let s = probe(h, ["sh", "-c", "echo $((6 * 7)); exit 3"]);
            out.push(#{ name: h.name, port: h.port, groups: h.groups, crit: h.criticality,
                        code: r.code, kernel: r.stdout, shell: s.stdout, shell_code: s.code,
                        truncated: r.truncated });
        }
        out
        "#,
    )
    .unwrap();
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    let kernel = String::from_utf8(uname.stdout).unwrap();
    let json = patchbook::script::to_json(&v);
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    for (i, entry) in arr.iter().enumerate() {
        assert_eq!(entry["name"], format!("h{}", i + 1));
        assert_eq!(entry["port"], 22);
        assert_eq!(entry["groups"], serde_json::json!(["local"]));
        assert_eq!(entry["crit"], "medium");
        assert_eq!(entry["code"], 0);
        assert_eq!(entry["kernel"], kernel.as_str());
        assert_eq!(entry["shell"], "42\n");
        assert_eq!(entry["shell_code"], 3);
        assert_eq!(entry["truncated"], false);
    }
}

#[test]
fn exec_refuses_a_non_string_argv_with_a_position() {
    let rt = local_runtime(&["h1"]);
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), Some(rt));
    let err = script_err(eval_str(
        &run,
        &compiler,
        "let h = hosts(\"h1\")[0];\nexec(h, [\"echo\", 42])",
    ));
    assert!(err.contains("argv[1] is i64, not a string"), "{err}");
    assert!(err.contains("<test>:2:1"), "{err}");
}

#[test]
fn primitives_refuse_to_run_while_a_module_loads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    std::fs::write(
        dir.path().join("x/eager.rhai"),
        "let all = hosts(\"all\");\n",
    )
    .unwrap();
    let compiler = Compiler::new(small_limits(), vec![dir.path().to_path_buf()]);
    let err = script_err(compiler.compile_source("<test>", "import \"x/eager\" as e;", &[]));
    assert!(
        err.contains("cannot run while modules are being compiled"),
        "{err}"
    );
    assert!(err.contains("in module `x/eager`"), "{err}");
}

/// A stand-in for the rollout layer: calls a closure once per host from worker
/// threads through [`HostClosure`], the way `rollout(…)` will.
fn register_each_host(run: &mut ScriptRun) {
    let budget = run.budget();
    run.engine_mut().register_fn(
        "each_host",
        move |ctx: NativeCallContext, hosts: Array, f: FnPtr| -> Array {
            let hosts: Vec<ScriptHost> = hosts
                .into_iter()
                .map(|h| h.try_cast::<ScriptHost>().unwrap())
                .collect();
            let closure = HostClosure::from_context(&ctx, f);
            let engine = ctx.engine();
            patchbook::rollout::pool::map_bounded(&hosts, 3, |h| {
                match closure.call(engine, h.clone(), budget, None) {
                    Ok(v) => v,
                    Err(e) => Dynamic::from(format!("error: {e}")),
                }
            })
        },
    );
    run.engine_mut()
        .register_fn("tagged_host", |ctx: NativeCallContext| {
            patchbook::script::register::current_host(&ctx).unwrap_or_default()
        });
}

#[test]
fn a_closure_runs_per_host_on_workers_with_imports_and_the_host_tag() {
    let rt = local_runtime(&["h1", "h2", "h3", "h4", "h5"]);
    let pb = fixture_compiler()
        .compile_source(
            "<test>",
            r#"
            import "acme/contacts" as contacts;
            let suffix = "!";
            each_host(hosts("all"), |h| {
                if h.name == "h3" { loop {} }
                `${tagged_host()}:${contacts::owners()[0]}:${probe(h, ["echo", h.name]).stdout.len()}${suffix}`
            })
            "#,
            &[],
        )
        .unwrap();
    let mut run = ScriptRun::new(&small_limits(), Some(rt));
    register_each_host(&mut run);
    let out = run.run(&pb).unwrap();
    let out: Vec<String> = out
        .into_array()
        .unwrap()
        .into_iter()
        .map(|v| v.into_string().unwrap())
        .collect();
    assert_eq!(out[0], "h1:ops@example.com:3!");
    assert!(out[2].contains("Too many operations"), "{}", out[2]);
    assert_eq!(out[4], "h5:ops@example.com:3!");
}

// ---------- modules ----------

#[test]
fn compiled_playbook_records_hashes_and_never_reads_the_disk_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("lib/org")).unwrap();
    let module = dir.path().join("lib/org/m.rhai");
    std::fs::write(&module, "fn answer() { 42 }\n").unwrap();
    let book = dir.path().join("book.rhai");
    let src = "import \"org/m\" as m;\nm::answer()\n";
    std::fs::write(&book, src).unwrap();
    let compiler = Compiler::new(small_limits(), vec![dir.path().join("lib")]);
    let pb: CompiledPlaybook = compiler.compile_file(&book).unwrap();
    assert_eq!(
        pb.sha256,
        patchbook::script::resolver::sha256_hex(src.as_bytes())
    );
    assert_eq!(pb.modules.len(), 1);
    assert_eq!(pb.modules[0].0, "org/m");
    assert_eq!(pb.modules[0].1, module);
    assert_eq!(
        pb.modules[0].2,
        patchbook::script::resolver::sha256_hex(b"fn answer() { 42 }\n")
    );
    // Change and then remove the module: the compiled version keeps its own copy.
    std::fs::write(&module, "fn answer() { 0 }\n").unwrap();
    let run = ScriptRun::new(&small_limits(), None);
    assert_eq!(run.run(&pb).unwrap().as_int().unwrap(), 42);
    std::fs::remove_file(&module).unwrap();
    assert_eq!(run.run(&pb).unwrap().as_int().unwrap(), 42);
    // A fresh compile sees the disk as it is now.
    let err = script_err(compiler.compile_file(&book));
    assert!(err.contains("Module not found: org/m"), "{err}");
}

#[test]
fn stdlib_comes_before_libraries() {
    let dir = tempfile::tempdir().unwrap();
    for (root, v) in [("std", 1), ("lib", 2)] {
        std::fs::create_dir_all(dir.path().join(root).join("p")).unwrap();
        std::fs::write(
            dir.path().join(root).join("p/m.rhai"),
            format!("fn v() {{ {v} }}"),
        )
        .unwrap();
    }
    let compiler = Compiler::new(
        small_limits(),
        vec![dir.path().join("std"), dir.path().join("lib")],
    );
    let pb = compiler
        .compile_source("<test>", "import \"p/m\" as m; m::v()", &[])
        .unwrap();
    let run = ScriptRun::new(&small_limits(), None);
    assert_eq!(run.run(&pb).unwrap().as_int().unwrap(), 1);
}

#[test]
fn dynamic_imports_are_refused_at_run_time() {
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), None);
    let err = script_err(eval_str(
        &run,
        &compiler,
        "let p = \"acme/contacts\";\nimport p as c;",
    ));
    assert!(err.contains("not part of the compiled playbook"), "{err}");
    assert!(err.contains("<test>:2:8"), "{err}");
}

// ---------- diagnostics (snapshots) ----------

fn render(playbook: &str) -> String {
    let path = PathBuf::from(FIXTURES).join("playbooks").join(playbook);
    let compiler = fixture_compiler();
    let pb = match compiler.compile_file(&path) {
        Ok(pb) => pb,
        Err(e) => return format!("error: {e}"),
    };
    let run = ScriptRun::new(&small_limits(), None);
    format!("error: {}", script_err(run.run(&pb)))
}

#[test]
fn snapshot_syntax_error() {
    insta::assert_snapshot!("syntax_error", render("syntax.rhai"));
}

#[test]
fn snapshot_undefined_variable_at_compile_time() {
    insta::assert_snapshot!("undefined_variable", render("undefined.rhai"));
}

#[test]
fn snapshot_runtime_error_through_functions_and_modules() {
    insta::assert_snapshot!("call_chain", render("chain.rhai"));
}

#[test]
fn snapshot_syntax_error_in_an_imported_module() {
    insta::assert_snapshot!("module_syntax_error", render("imports_broken.rhai"));
}

#[test]
fn snapshot_missing_import_names_paths_searched() {
    insta::assert_snapshot!("missing_import", render("missing.rhai"));
}

#[test]
fn snapshot_import_escape_refused() {
    insta::assert_snapshot!("import_escape", render("escape.rhai"));
}

#[test]
fn snapshot_sandbox_limit() {
    let compiler = fixture_compiler();
    let run = ScriptRun::new(&small_limits(), None);
    let src = "fn spin() {\n    loop {\n        let x = 1;\n    }\n}\n\nspin();\n";
    let err = script_err(eval_str(&run, &compiler, src));
    insta::assert_snapshot!("operation_limit", format!("error: {err}"));
}

// ---------- CLI ----------

#[test]
fn cli_eval_prints_json() {
    let out = bin().args(["eval", "1 + 2"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "3\n");

    let out = bin()
        .args(["eval", r#"#{ a: [1, "two", true, ()], b: 1.5 }"#])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"a": [1, "two", true, null], "b": 1.5})
    );
}

#[test]
fn cli_eval_file_and_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("calc.rhai");
    std::fs::write(&f, "let a = 20;\nlet b = a +;\n").unwrap();
    let out = bin().arg("eval").arg("-f").arg(&f).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:12", f.display())),
        "{stderr}"
    );
    assert!(stderr.contains(" 2 | let b = a +;"), "{stderr}");

    std::fs::write(&f, "let a = 20;\na * 2 + 2\n").unwrap();
    let out = bin().arg("eval").arg("-f").arg(&f).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "42\n");
}

#[test]
fn cli_sandbox_bombs_exit_2_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patchbook.toml"),
        "[limits]\nmax_operations = 500000\nmax_array_size = 10000\nmax_memory_mb = 64\n",
    )
    .unwrap();
    for (what, src, expect) in BOMBS {
        let out = bin()
            .current_dir(dir.path())
            .args(["eval", src])
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(expect), "{what}: {stderr}");
    }
}

#[test]
fn cli_check_reports_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::create_dir_all(dir.path().join("stdlib/patch")).unwrap();
    std::fs::write(scripts.join("a_bad.rhai"), "let x = ;\n").unwrap();
    std::fs::write(scripts.join("b_good.rhai"), "let x = 1;\n").unwrap();
    std::fs::write(scripts.join("c_bad.rhai"), "let y = 1;\nlet z = y + q;\n").unwrap();
    std::fs::write(dir.path().join("stdlib/patch/m.rhai"), "fn f( {\n").unwrap();
    let out = bin().current_dir(dir.path()).arg("check").output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("scripts/a_bad.rhai:1:9"), "{stderr}");
    assert!(stderr.contains("scripts/c_bad.rhai:2:13"), "{stderr}");
    assert!(stderr.contains("stdlib/patch/m.rhai:1:"), "{stderr}");
    assert!(!stderr.contains("b_good"), "{stderr}");
    assert!(stderr.contains("3 of 4 files failed"), "{stderr}");

    // Explicit paths; a clean set exits 0.
    let out = bin()
        .current_dir(dir.path())
        .args(["check", "scripts/b_good.rhai"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 files compiled cleanly"), "{stdout}");
}

#[test]
fn cli_check_passes_on_the_shipped_scripts_and_stdlib() {
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "scripts", "stdlib"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
}

#[test]
fn cli_run_renders_errors_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("stdlib/patch")).unwrap();
    std::fs::write(
        dir.path().join("stdlib/patch/util.rhai"),
        "fn half(n) {\n    n / zero()\n}\nfn zero() { 0 }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("book.rhai"),
        "import \"patch/util\" as util;\n\nutil::half(10);\n",
    )
    .unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["run", "book.rhai"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Division by zero"), "{stderr}");
    assert!(stderr.contains("stdlib/patch/util.rhai:2:7"), "{stderr}");
    assert!(
        stderr.contains("in call to function `half` (book.rhai:3:7)"),
        "{stderr}"
    );

    std::fs::write(
        dir.path().join("ok.rhai"),
        "import \"patch/util\" as util;\nlet x = util::zero();\n",
    )
    .unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["run", "ok.rhai"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
}

fn toml_inventory(dir: &Path, names: &[&str]) -> PathBuf {
    let mut s = String::new();
    for n in names {
        s.push_str(&format!("[hosts.{n}]\ntransport = \"local\"\n\n"));
    }
    let p = dir.join("inventory.toml");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn cli_exec_uname_on_three_local_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let inv = toml_inventory(dir.path(), &["h1", "h2", "h3"]);
    let out = bin()
        .current_dir(dir.path())
        .arg("-i")
        .arg(&inv)
        .args(["exec", "all", r#"exec(host, ["uname","-r"]).stdout"#])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    let kernel = String::from_utf8(uname.stdout).unwrap();
    for h in ["h1", "h2", "h3"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(h))
            .unwrap_or_else(|| panic!("no row for {h}: {stdout}"));
        assert!(line.contains("ok"), "{line}");
        assert!(line.contains(kernel.trim()), "{line}");
    }
}

#[test]
fn cli_exec_json_lines_and_exit_1_when_one_host_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patchbook.toml"),
        "[limits]\nmax_operations = 500000\n",
    )
    .unwrap();
    let inv = toml_inventory(dir.path(), &["h1", "h2", "h3"]);
    let out = bin()
        .current_dir(dir.path())
        .arg("-i")
        .arg(&inv)
        .args([
            "--json",
            "exec",
            "all",
            r#"if host.name == "h2" { loop {} } else { host.name + "-ok" }"#,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let run = lines[0]["run"].as_str().unwrap().to_string();
    for (l, host) in lines.iter().zip(["h1", "h2", "h3"]) {
        assert_eq!(l["host"], host, "{l}");
        assert_eq!(l["run"], run.as_str(), "one run id for every host: {l}");
    }
    assert_eq!(
        (&lines[0]["ok"], &lines[0]["value"]),
        (&true.into(), &"h1-ok".into())
    );
    assert_eq!(lines[1]["ok"], false);
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("Too many operations"));
    assert_eq!(
        (&lines[2]["ok"], &lines[2]["value"]),
        (&true.into(), &"h3-ok".into())
    );
    // An ad-hoc run is a run: its journal exists and says how each host ended.
    let journal = std::fs::read_to_string(
        dir.path()
            .join(".patchbook/runs")
            .join(format!("{run}.jsonl")),
    )
    .unwrap();
    assert_eq!(
        journal.matches("\"kind\":\"host.finish\"").count(),
        3,
        "{journal}"
    );
    assert!(journal.contains("\"kind\":\"run.close\""), "{journal}");
}

#[test]
fn changes_are_refused_where_no_journal_would_record_them() {
    let rt = local_runtime(&["h1"]);
    let run = ScriptRun::new(&small_limits(), Some(rt));
    for snippet in [
        r#"exec(hosts("all")[0], ["touch", "/tmp/never"])"#,
        r#"shell(hosts("all")[0], "true")"#,
    ] {
        let e = eval_str(&run, &fixture_compiler(), snippet)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("h1") && e.contains("keeps no journal") && e.contains("probe(host, argv)"),
            "{e}"
        );
    }
    let v = eval_str(
        &run,
        &fixture_compiler(),
        r#"probe(hosts("all")[0], ["echo", "read"]).stdout"#,
    )
    .unwrap();
    assert_eq!(v.into_string().unwrap(), "read\n");
}

/// Captures every tracing event of this test binary as JSON lines.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn log_carries_the_host_and_shell_is_marked_raw() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("no other test in this binary installs a subscriber");
    let rt = local_runtime(&["h1", "h2"]);
    let pb = fixture_compiler()
        .compile_source(
            "<exec>",
            r#"log(`checking ${host.name}`); shell(host, "true").code"#,
            &[HOST_VAR],
        )
        .unwrap();
    let hosts = rt.targets("all").unwrap();
    let state = tempfile::tempdir().unwrap();
    let header = patchbook::journal::RunHeader::new(
        "<exec>".into(),
        pb.sha256.clone(),
        Default::default(),
        String::new(),
        serde_json::Value::Null,
    );
    let journal = Arc::new(
        patchbook::journal::Journal::begin(state.path(), "raw", "tester", &header).unwrap(),
    );
    let ctx = patchbook::primitives::RunCtx::new(
        "raw",
        state.path().to_path_buf(),
        Some(journal.clone()),
        patchbook::primitives::Mode::Apply,
    );
    let session = Arc::new(patchbook::run::Session::new(rt.clone(), ctx));
    for r in run_per_host_in(&pb, &hosts, session, &small_limits(), 2) {
        assert_eq!(r.result.unwrap().as_int().unwrap(), 0);
    }
    // The raw shell line is a journaled change, marked as such.
    let records = journal.records().unwrap();
    let shells: Vec<_> = records
        .iter()
        .filter(|r| r.kind == "step.intent" && r.data["step"] == "shell")
        .collect();
    assert_eq!(shells.len(), 2, "{records:?}");
    assert!(shells.iter().all(|r| r.data["input"]["raw_shell"] == true));
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for h in ["h1", "h2"] {
        assert!(
            events
                .iter()
                .any(|e| e["fields"]["host"] == h
                    && e["fields"]["message"] == format!("checking {h}")),
            "no log event for {h}: {out}"
        );
        assert!(
            events.iter().any(|e| e["fields"]["host"] == h
                && e["fields"]["raw_shell"] == true
                && e["fields"]["script"] == "true"),
            "no raw shell event for {h}: {out}"
        );
    }
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // `patchbook … | head -1`: the reader goes away after one line.
    let dir = tempfile::tempdir().unwrap();
    // Far more output than a pipe holds, so the writer meets the closed end.
    let names: Vec<String> = (0..5000).map(|i| format!("host{i:05}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let inv = toml_inventory(dir.path(), &names);
    let script = format!(
        "{} -i {} inventory list | head -1; echo \"status ${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_patchbook"),
        inv.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let status = stdout.lines().last().unwrap();
    // Ended by SIGPIPE (128 + 13) like any Unix filter: never a panic (101).
    assert_eq!(status, "status 141", "{stderr}");
}

#[test]
fn sleep_ends_at_the_deadline_and_on_cancel() {
    let limits = Limits {
        deadline_secs: 1,
        ..small_limits()
    };
    let run = ScriptRun::new(&limits, None);
    let t0 = Instant::now();
    let e = eval_str(&run, &fixture_compiler(), "sleep(20); 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("deadline"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A cancel (SIGTERM in `run` and `watch`) wakes a sleeping script too.
    let run = ScriptRun::new(&small_limits(), None);
    let cancel = run.cancel_flag();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.store(true, Ordering::SeqCst);
    });
    let e = eval_str(&run, &fixture_compiler(), "sleep(20.5); 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cancelled"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // A short sleep still sleeps.
    let t0 = Instant::now();
    let v = eval_str(
        &ScriptRun::new(&small_limits(), None),
        &fixture_compiler(),
        "sleep(0.2); 7",
    )
    .unwrap();
    assert_eq!(v.as_int().unwrap(), 7);
    assert!(t0.elapsed() >= Duration::from_millis(200));
}
