//! Every stdlib module, run: patch/debian (full sequence on a local host with a real
//! .deb and a non-installing method, plus its helpers), patch/rhel (refuses a dpkg
//! host before touching it; its helpers), rollout/policies (each policy parses as a
//! rollout policy), notify/templates, and checks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod world;

use std::path::PathBuf;
use std::sync::Arc;

use patchbook::primitives::Mode;
use patchbook::rollout::policy::Policy;
use patchbook::script::{Compiler, Limits};
use world::{local_dpkg_version, tiny_deb, World};

fn apply() -> World {
    World::new(&["h1", "h2"], Mode::Apply, |_, _| {})
}

#[test]
fn every_stdlib_module_opens_with_a_comment_block_and_compiles() {
    let compiler = Compiler::new(Limits::default(), vec![PathBuf::from("stdlib")]);
    let mut seen = Vec::new();
    for entry in glob::glob("stdlib/**/*.rhai").unwrap() {
        let path = entry.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let head: Vec<&str> = text.lines().take(3).collect();
        assert!(
            head.len() == 3 && head.iter().all(|l| l.starts_with("//")),
            "{} must open with a comment block saying what it is for",
            path.display()
        );
        let name = path
            .strip_prefix("stdlib")
            .unwrap()
            .with_extension("")
            .display()
            .to_string();
        compiler
            .compile_source("<test>", &format!("import \"{name}\" as m;"), &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        seen.push(name);
    }
    for m in [
        "patch/debian",
        "patch/rhel",
        "rollout/policies",
        "notify/templates",
        "checks",
    ] {
        assert!(seen.iter().any(|s| s == m), "stdlib/{m}.rhai is missing");
    }
}

#[test]
fn patch_debian_runs_the_whole_sequence_and_its_helpers() {
    let w = apply();
    let data = w.dir.path().join("etc-acme");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("agent.conf"), "interval = 60\n").unwrap();
    let deb = tiny_deb(w.dir.path(), "pb-noop", "1.0");
    let (deb_path, sha) = w.mirror_file("pb-noop_1.0_all.deb", &deb);
    let dpkg = local_dpkg_version("dpkg");
    let staged = w.dir.path().join("staged-copy");
    // The method copies the staged file instead of installing it, so the sequence
    // runs for real without changing this machine's package database; `verify`
    // checks a package that is installed (dpkg itself).
    let v = w.json(&format!(
        r#"
        import "patch/debian" as deb;
        let h = hosts("h1")[0];
        let fix = artifact("{deb}", #{{ sha256: "{sha}" }});
        let r = deb::patch(h, fix, "dpkg", "{dpkg}", #{{
            backup: ["{data}"],
            method: ["cp", "--", "{{file}}", "{staged}"],
            health: ["cat", "{data}/agent.conf"],
            health_options: #{{ expect_stdout: "interval" }},
        }});
        #{{
            result: r,
            backup_id: r.backup.id,
            is_debian: deb::is_debian(h),
            version: deb::installed_version(h, "dpkg"),
            absent: deb::installed_version(h, "no-such-package-xyz"),
            needs_new: deb::needs(h, "dpkg", "999:1"),
            needs_old: deb::needs(h, "dpkg", "0.1"),
            kernel: deb::kernel(h),
        }}
        "#,
        deb = deb_path.display(),
        data = data.display(),
        staged = staged.display(),
    ));
    let r = &v["result"];
    assert_eq!(r["host"], "h1");
    assert_eq!(r["pkg"], "dpkg");
    assert_eq!(v["backup_id"], "b001");
    assert_eq!(r["deploy"]["pkg"], "pb-noop");
    assert_eq!(r["deploy"]["undo"], "restore backup b001");
    assert_eq!(r["version"], dpkg.as_str());
    assert_eq!(r["health"], "interval = 60\n");
    assert_eq!(std::fs::read(&staged).unwrap(), deb);
    assert_eq!(v["is_debian"], true);
    assert_eq!(v["version"], dpkg.as_str());
    assert_eq!(v["absent"], "");
    assert_eq!(v["needs_new"], true);
    assert_eq!(v["needs_old"], false);
    assert!(!v["kernel"].as_str().unwrap().is_empty());
    // The journal holds the backup, the deploy's intent and outcome, verify, health.
    assert_eq!(w.records("backup").len(), 1);
    assert_eq!(w.records("verify").len(), 1);
    assert_eq!(w.records("health").len(), 1);
    assert!(!w.records("step.intent").is_empty());

    // A failing health check fails the sequence, naming host and step.
    let err = w.err(&format!(
        r#"import "patch/debian" as deb;
           let fix = artifact("{}", #{{ sha256: "{sha}" }});
           deb::patch(hosts("h2")[0], fix, "dpkg", "{dpkg}", #{{ method: ["true", "{{file}}"], health: ["false"] }})"#,
        deb_path.display()
    ));
    assert!(err.contains("h2: health:"), "{err}");
    let err = w.err(&format!(
        r#"import "patch/debian" as deb;
           let fix = artifact("{}", #{{ sha256: "{sha}" }});
           deb::patch(hosts("h2")[0], fix, "dpkg", "{dpkg}", #{{ backups: ["/etc"] }})"#,
        deb_path.display()
    ));
    assert!(err.contains("unknown option \"backups\""), "{err}");
}

#[test]
fn patch_rhel_refuses_a_dpkg_host_before_touching_it() {
    let w = apply();
    let (path, sha) = w.mirror_file("fix.rpm", b"x");
    let err = w.err(&format!(
        r#"import "patch/rhel" as rhel;
           let fix = artifact("{}", #{{ sha256: "{sha}" }});
           rhel::patch(hosts("h1")[0], fix, "acme-agent", "1.0.1-1", #{{ backup: ["/etc/acme"] }})"#,
        path.display()
    ));
    assert!(
        err.contains("h1: patch/rhel: this host uses dpkg, not rpm"),
        "{err}"
    );
    assert!(w.records("backup").is_empty() && w.records("step.intent").is_empty());
    let v = w.json(
        r#"import "patch/rhel" as rhel;
           let h = hosts("h1")[0];
           [rhel::is_rhel(h), rhel::older("1.0-1", "1.0-2"), rhel::older("2:1.0", "1:9.9"),
            rhel::older("1.0~rc1", "1.0"), rhel::needs(h, "no-such-package-xyz", "1.0")]"#,
    );
    assert_eq!(v, serde_json::json!([false, true, false, true, false]));
}

#[test]
fn rollout_policies_are_valid_rollout_policies() {
    let w = apply();
    let v = w.json(
        r#"import "rollout/policies" as p;
           #{ canary: p::canary(), conservative: p::conservative(), emergency: p::emergency(),
              tuned: p::tuned(p::canary(), #{ pause: "1h", max_failed: 2 }) }"#,
    );
    for name in ["canary", "conservative", "emergency", "tuned"] {
        Policy::from_value(&v[name]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(v["canary"]["pilot"], 1);
    assert_eq!(v["conservative"]["max_failed"], 0);
    assert_eq!(v["conservative"]["rollback"], "all");
    assert_eq!(v["emergency"]["waves"], serde_json::json!(["5%", "100%"]));
    assert_eq!(v["tuned"]["pause"], "1h");
    assert_eq!(v["tuned"]["max_failed"], 2);
    assert_eq!(v["tuned"]["waves"], v["canary"]["waves"]);
}

#[test]
fn notify_templates_build_messages() {
    let w = World::new(
        &[
            "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "w10", "w11", "w12",
        ],
        Mode::Apply,
        |_, _| {},
    );
    let v = w.json(
        r#"import "notify/templates" as t;
           let all = hosts("all");
           #{ start: t::run_start("acme-agent 1.0.1", all, "Sat 02:00-06:00"),
              one: t::run_start("x", ["db1"], "now"),
              failure: t::failure(all[0], "deploy", "w1: deploy failed (exit 1): postinst\nmore"),
              done_ok: t::done("acme-agent 1.0.1", #{ patched: 12 }),
              done_bad: t::done("acme-agent 1.0.1", #{ patched: 9, failed: 3, rolled_back: 3 }) }"#,
    );
    let start = v["start"].as_str().unwrap();
    assert!(
        start.starts_with("Patching 12 hosts: acme-agent 1.0.1\n"),
        "{start}"
    );
    assert!(start.contains("Window: Sat 02:00-06:00"), "{start}");
    assert!(
        start.contains("w1, w2") && start.contains("and 2 more"),
        "{start}"
    );
    assert!(!start.contains("w11"), "{start}");
    assert!(v["one"].as_str().unwrap().starts_with("Patching 1 host: x"));
    let failure = v["failure"].as_str().unwrap();
    assert!(failure.starts_with("FAILED on w1: deploy\n"), "{failure}");
    assert!(
        failure.contains("postinst") && !failure.contains("more"),
        "{failure}"
    );
    assert!(v["done_ok"]
        .as_str()
        .unwrap()
        .starts_with("Done: acme-agent 1.0.1\nPatched: 12, failed: 0"));
    let bad = v["done_bad"].as_str().unwrap();
    assert!(
        bad.starts_with("Done with 3 failed: acme-agent 1.0.1"),
        "{bad}"
    );
    assert!(bad.contains("rolled back: 3"), "{bad}");
}

#[test]
fn checks_measure_real_hosts_and_endpoints() {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let s = server.clone();
    let worker = std::thread::spawn(move || {
        for req in s.incoming_requests() {
            let code = if req.url() == "/up" { 200 } else { 503 };
            let _ = req.respond(tiny_http::Response::from_string("x").with_status_code(code));
        }
    });
    // The test server is no inventory host: the config allows it.
    let w = World::new(&["h1", "h2"], Mode::Apply, |c, _| {
        c.http_check_allow = vec![format!("http://127.0.0.1:{port}/")]
    });
    let agent = w.dir.path().join("agent.sh");
    std::fs::write(&agent, "#!/bin/sh\necho \"acme-agent 1.0.1 ok\"\n").unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let v = w.json(&format!(
        r#"import "checks" as c;
           let h = hosts("h1")[0];
           #{{ agent_default: c::agent_ok(h), agent: c::agent_ok(h, ["{agent}"]),
              agent_broken: c::agent_ok(h, ["false"]),
              disk_any: c::disk_free_ok(h, "/", 0), disk_impossible: c::disk_free_ok(h, "/", 101),
              disk_missing: c::disk_free_ok(h, "/no/such/path", 0),
              load_high: c::load_ok(h, 100000.0), load_negative: c::load_ok(h, -1.0),
              mem_any: c::memory_ok(h, 0), mem_impossible: c::memory_ok(h, 101),
              http_up: c::http_ok("http://127.0.0.1:{port}/up"),
              http_down: c::http_ok("http://127.0.0.1:{port}/down"),
              required: c::require(h, true, "fine") }}"#,
        agent = agent.display()
    ));
    let expect = serde_json::json!({
        "agent_default": std::path::Path::new("/opt/acme/agent.sh").exists(),
        "agent": true, "agent_broken": false,
        "disk_any": true, "disk_impossible": false, "disk_missing": false,
        "load_high": true, "load_negative": false,
        "mem_any": true, "mem_impossible": false,
        "http_up": true, "http_down": false, "required": true,
    });
    for (k, want) in expect.as_object().unwrap() {
        assert_eq!(&v[k], want, "{k}");
    }
    let err = w.err(
        "import \"checks\" as c;\nlet h = hosts(\"h2\")[0];\nc::require(h, c::disk_free_ok(h, \"/\", 101), \"101% free on /\")",
    );
    assert!(err.contains("h2: check failed: 101% free on /"), "{err}");
    server.unblock();
    worker.join().unwrap();
}
