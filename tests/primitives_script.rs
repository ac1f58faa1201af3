//! The patch primitives as playbooks call them: through a `ScriptRun` bound to a
//! session with a real journal, over local-transport hosts. Covers return shapes,
//! errors at the call position naming host and step, journaling, plan mode,
//! secrets, and the hostile corpus (nothing executes, input refused before any
//! command runs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod world;

use std::sync::Arc;

use patchbook::inventory::Host;
use patchbook::primitives::Mode;
use patchbook::script::Compiler;
use rhai::{Array, Dynamic};
use world::{local_dpkg_version, tiny_deb, World};

fn apply(names: &[&str]) -> World {
    World::new(names, Mode::Apply, |_, _| {})
}

#[test]
fn facts_installed_and_needing_read_the_package_database() {
    let w = apply(&["h1", "h2", "h3"]);
    let dpkg = local_dpkg_version("dpkg");
    let v = w.json(
        r#"
        let h = hosts("h1")[0];
        #{
            facts: facts(h),
            dpkg: installed(h, "dpkg"),
            absent: installed(h, "no-such-package-xyz"),
            all_need: hosts("local").needing("dpkg", "999:1").map(|h| h.name),
            none_need: needing(hosts("local"), "dpkg", "0.1"),
            absent_need: hosts("local").needing("no-such-package-xyz", "1.0"),
        }
        "#,
    );
    assert_eq!(v["facts"]["package_manager"], "dpkg");
    assert!(!v["facts"]["kernel"].as_str().unwrap().is_empty());
    assert!(!v["facts"]["arch"].as_str().unwrap().is_empty());
    assert_eq!(v["dpkg"], dpkg.as_str());
    assert!(v["absent"].is_null());
    assert_eq!(v["all_need"], serde_json::json!(["h1", "h2", "h3"]));
    assert_eq!(v["none_need"], serde_json::json!([]));
    assert_eq!(v["absent_need"], serde_json::json!([]));
}

#[test]
fn needing_leaves_out_a_host_it_cannot_reach_and_journals_it_unreachable() {
    let mut hosts = world::local_hosts(&["h1", "h2"]);
    let mut dead = Host::new("dead1");
    dead.address = "127.0.0.1".into();
    dead.port = 1;
    dead.groups = vec!["local".into()];
    hosts.push(dead);
    let w = World::with_hosts(hosts, Mode::Apply, |_, _| {});
    // The rest are asked and kept; the dead host is neither an error nor kept.
    let v = w.json("let t = hosts(\"local\");\nt.needing(\"dpkg\", \"999:1\").map(|h| h.name)");
    assert_eq!(v, serde_json::json!(["h1", "h2"]));
    w.journal.flush().unwrap();
    let records = w.records("host.unreachable");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].host.as_deref(), Some("dead1"));
    match records[0].entry().unwrap() {
        patchbook::journal::entry::Entry::HostUnreachable(u) => {
            assert_eq!(u.step, "needing");
            assert!(u.reason.contains("cannot connect"), "{}", u.reason);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn version_compares_are_pure_and_refuse_garbage_with_a_position() {
    let w = apply(&["h1"]);
    let v = w.json(
        r#"[version_cmp("1:1.0", "2.0"), version_cmp("1.0~rc1", "1.0"), version_cmp("1.0-1", "1.0-1"),
            rpm_version_cmp("1.0-1", "1.0-2"), rpm_version_cmp("2.0^1", "2.0"), rpm_version_cmp("1.0~b", "1.0")]"#,
    );
    assert_eq!(v, serde_json::json!([1, -1, 0, -1, 1, -1]));
    let err = w.err("let a = 1;\nversion_cmp(\"1.0; rm -rf /\", \"1.0\")");
    assert!(
        err.contains("version_cmp") && err.contains("not valid"),
        "{err}"
    );
    assert!(err.contains("<test>:2:1"), "{err}");
    // No session needed: they work while a module loads too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    std::fs::write(
        dir.path().join("x/v.rhai"),
        "export const ORDER = version_cmp(\"1.0\", \"1.1\");\n",
    )
    .unwrap();
    Compiler::new(world::limits(), vec![dir.path().to_path_buf()])
        .compile_source("<test>", "import \"x/v\" as v;", &[])
        .unwrap();
}

#[test]
fn patch_primitives_refuse_to_run_while_a_module_loads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    for (name, call) in [
        ("a", "artifact(\"https://x\", #{})"),
        ("n", "notify(\"ops\", \"hi\")"),
        ("s", "secret(\"x\")"),
        ("h", "http_check(\"http://127.0.0.1:9/\")"),
    ] {
        std::fs::write(
            dir.path().join(format!("x/{name}.rhai")),
            format!("let x = {call};\n"),
        )
        .unwrap();
        let err = Compiler::new(world::limits(), vec![dir.path().to_path_buf()])
            .compile_source("<test>", &format!("import \"x/{name}\" as m;"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs a run") && err.contains("while modules are being compiled"),
            "{name}: {err}"
        );
    }
}

#[test]
fn artifacts_come_from_trusted_sources_with_every_check_journaled() {
    let w = apply(&["h1"]);
    let (path, sha) = w.mirror_file("fix_1.0_all.deb", b"not really a deb");
    let v = w.json(&format!(
        r#"let a = artifact("{}", #{{ sha256: "{sha}", size: 16 }});
           #{{ url: a.url, sha256: a.sha256, size: a.size, path: a.path, signed: a.signature_checked, text: `${{a}}` }}"#,
        path.display()
    ));
    assert_eq!(v["sha256"], sha.as_str());
    assert_eq!(v["size"], 16);
    assert!(v["path"].as_str().unwrap().ends_with(&sha), "{v}");
    assert_eq!(v["signed"], false);
    assert!(v["text"].as_str().unwrap().starts_with("Artifact("));
    let recs = w.records("artifact");
    assert!(recs
        .iter()
        .any(|r| r.data["what"] == "source" && r.data["ok"] == true));
    assert!(
        recs.iter()
            .any(|r| r.data["what"] == "download" && r.data["ok"] == true),
        "{recs:?}"
    );

    // A wrong checksum fails the call (and so the run) and is journaled as failed.
    let err = w.err(&format!(
        "let a = artifact(\"{}\", #{{ sha256: \"{}\" }});",
        path.display(),
        "ab".repeat(32)
    ));
    assert!(
        err.contains("SHA-256 mismatch") && err.contains("no host was touched"),
        "{err}"
    );
    assert!(w.records("artifact").iter().any(|r| r.data["ok"] == false));

    // Untrusted: refused, nothing fetched.
    let err = w.err(&format!(
        "artifact(\"/etc/passwd\", #{{ sha256: \"{sha}\" }})"
    ));
    assert!(err.contains("not under any trusted_sources"), "{err}");
    let err = w.err(&format!(
        "artifact(\"{}\", #{{ sha: \"{sha}\" }})",
        path.display()
    ));
    assert!(err.contains("unknown option `sha`"), "{err}");
}

#[test]
fn backup_restore_and_a_deploy_rolled_back_from_the_journal() {
    let w = apply(&["h1"]);
    let data = w.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("agent.conf"), "interval = 60\n").unwrap();
    let deb = tiny_deb(w.dir.path(), "pb-noop", "1.0");
    let (deb_path, sha) = w.mirror_file("pb-noop_1.0_all.deb", &deb);
    let dpkg = local_dpkg_version("dpkg");
    let marker = w.dir.path().join("installed-by-custom-method");
    let v = w.json(&format!(
        r#"
        let h = hosts("h1")[0];
        let fix = artifact("{deb}", #{{ sha256: "{sha}" }});
        let b = backup(h, ["{data}", "{data}/missing"]);
        let d = deploy(h, fix, #{{ method: ["cp", "--", "{{file}}", "{marker}"] }});
        #{{ id: b.id, host: b.host, sha: b.sha256, archive: b.archive, paths: b.paths,
            missing: b.missing, size: b.size, deploy: d, verify: verify(h, "dpkg", "{dpkg}") }}
        "#,
        deb = deb_path.display(),
        data = data.display(),
        marker = marker.display(),
    ));
    assert_eq!(v["id"], "b001");
    assert_eq!(v["host"], "h1");
    assert_eq!(
        v["missing"],
        serde_json::json!([format!("{}/missing", data.display())])
    );
    let archive = std::path::PathBuf::from(v["archive"].as_str().unwrap());
    assert!(
        archive.starts_with(w.dir.path().join("state/backups")),
        "{archive:?}"
    );
    assert!(v["size"].as_i64().unwrap() > 0);
    assert_eq!(v["deploy"]["pkg"], "pb-noop");
    assert!(v["deploy"]["before"].is_null());
    assert_eq!(v["deploy"]["planned"], false);
    assert_eq!(v["deploy"]["undo"], "restore backup b001");
    assert_eq!(v["verify"], dpkg.as_str());
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        deb,
        "the custom method ran on the staged file"
    );

    // The host changes; rollback restores the backup from the journal, once.
    std::fs::write(data.join("agent.conf"), "broken\n").unwrap();
    let r = w.json("rollback(hosts(\"h1\")[0])");
    assert_eq!(r["undone"], serde_json::json!(["restore backup b001"]));
    assert_eq!(
        std::fs::read_to_string(data.join("agent.conf")).unwrap(),
        "interval = 60\n"
    );
    let intents = w.records("step.intent").len();
    let again = w.json("rollback(hosts(\"h1\")[0])");
    assert_eq!(again["undone"], serde_json::json!([]));
    assert_eq!(
        w.records("step.intent").len(),
        intents,
        "a second rollback did nothing"
    );

    // verify fails with both versions, naming host and step, at the call.
    let err = w.err("let h = hosts(\"h1\")[0];\nverify(h, \"dpkg\", \"0.0.1\")");
    assert!(
        err.contains("h1: verify failed: dpkg is") && err.contains("expected 0.0.1"),
        "{err}"
    );
    assert!(err.contains("<test>:2:1"), "{err}");
}

#[test]
fn restore_refuses_a_backup_of_another_host() {
    let w = apply(&["h1", "h2"]);
    let data = w.dir.path().join("d2");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "x").unwrap();
    let err = w.err(&format!(
        "let b = backup(hosts(\"h1\")[0], [\"{}\"]);\nrestore(hosts(\"h2\")[0], b)",
        data.display()
    ));
    assert!(
        err.contains("h2: restore: backup b001 was taken from h1"),
        "{err}"
    );
}

#[test]
fn health_and_service_active_check_and_report_what_the_host_printed() {
    let w = apply(&["h1"]);
    let v = w.json(
        r#"let h = hosts("h1")[0];
           [health(h, ["echo", "agent ok"]),
            health(h, ["sh", "-c", "echo degraded; exit 3"], #{ expect_code: 3, expect_stdout: "degraded" })]"#,
    );
    assert_eq!(v, serde_json::json!(["agent ok\n", "degraded\n"]));
    let counter = w.dir.path().join("attempts");
    let err = w.err(&format!(
        "let h = hosts(\"h1\")[0];\nhealth(h, [\"sh\", \"-c\", \"echo x >> {}; echo sick >&2; exit 1\"], #{{ retries: 2, delay: \"10ms\" }})",
        counter.display()
    ));
    assert!(
        err.contains("h1: health:") && err.contains("3 attempt(s)") && err.contains("sick"),
        "{err}"
    );
    assert!(err.contains("<test>:2:1"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        3
    );
    let err = w.err("health(hosts(\"h1\")[0], [\"true\"], #{ delay: \"soon\" })");
    assert!(
        err.contains("`delay`") && err.contains("not a duration"),
        "{err}"
    );
    let recs = w.records("health");
    assert!(recs.iter().any(|r| r.data["ok"] == true));
    assert!(recs.iter().any(|r| r.data["ok"] == false));

    // service_active: a bool where systemd runs, otherwise an error naming systemctl.
    match w.eval("service_active(hosts(\"h1\")[0], \"patchbook-no-such.service\")") {
        Ok(v) => assert!(!v.as_bool().unwrap()),
        Err(e) => assert!(e.to_string().contains("systemctl"), "{e}"),
    }
}

#[test]
fn http_check_runs_from_the_controller() {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let server = Arc::new(server);
    let s = server.clone();
    let worker = std::thread::spawn(move || {
        for req in s.incoming_requests() {
            let (code, body) = match req.url() {
                "/health" => (200, "all systems ok"),
                _ => (404, "nope"),
            };
            let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(code));
        }
    });
    // The test server is no inventory host: the config allows its URL prefix.
    let base = format!("http://127.0.0.1:{port}");
    let allow = format!("{base}/");
    let w = World::new(&["h1"], Mode::Apply, |c, _| {
        c.http_check_allow = vec![allow]
    });
    let v = w.json(&format!(
        r#"[http_check("{base}/health"), http_check("{base}/missing", #{{ status: 404 }}),
            http_check("{base}/health", #{{ contains: "ok", timeout: 5 }})]"#
    ));
    assert_eq!(v, serde_json::json!([200, 404, 200]));
    let err = w.err(&format!(
        "http_check(\"{base}/health\", #{{ contains: \"degraded\" }})"
    ));
    assert!(err.contains("body does not contain"), "{err}");
    let err = w.err(&format!("http_check(\"{base}/missing\")"));
    assert!(err.contains("status 404, expected 200"), "{err}");
    assert_eq!(w.records("http_check").len(), 5);
    server.unblock();
    worker.join().unwrap();
}

#[test]
fn http_check_refuses_urls_outside_the_inventory_and_allowlist() {
    // Nothing listens on these: a refusal must come before any request.
    let w = World::new(&["h1"], Mode::Apply, |c, _| {
        c.http_check_allow = vec!["http://127.0.0.4:9/ok/".into(), "127.0.0.3".into()]
    });
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9/admin",
        "http://127.0.0.3@169.254.169.254/",
        "http://127.0.0.4:9/okay",
        "http://127.0.0.4:9/other/",
        "file:///etc/passwd",
    ] {
        let err = w.err(&format!("http_check(\"{url}\", #{{ contains: \"x\" }})"));
        assert!(
            err.contains("http_check_allow") || err.contains("only http:// and https://"),
            "{url}: {err}"
        );
    }
    // Allowlisted names and prefixes pass the check and fail only on the network.
    for url in ["http://127.0.0.3:9/", "http://127.0.0.4:9/ok/x"] {
        let err = w.err(&format!("http_check(\"{url}\", #{{ timeout: 2 }})"));
        assert!(!err.contains("http_check_allow"), "{url}: {err}");
    }
}

#[test]
fn notify_delivers_journals_and_redacts_secrets_but_never_fails_the_script() {
    let out_holder = std::sync::Mutex::new(None);
    let w = World::new(&["h1"], Mode::Apply, |cfg, dir| {
        let out = dir.join("notices.txt");
        *out_holder.lock().unwrap() = Some(out.clone());
        cfg.notify = toml::from_str(&format!(
            r#"
            retries = 0
            [channels.ops]
            type = "command"
            argv = ["sh", "-c", "cat >> {}"]
            [channels.broken]
            type = "command"
            argv = ["false"]
            "#,
            out.display()
        ))
        .unwrap();
    });
    let out = out_holder.lock().unwrap().clone().unwrap();
    let v = w.json(
        r#"
        let token = secret("hunter2-token");
        let sent = notify(["ops", "broken"], `deploying with ${token}`, #{ severity: "warning" });
        health(hosts("h1")[0], ["echo", token]);
        sent
        "#,
    );
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["to"], "ops");
    assert_eq!(arr[0]["ok"], true);
    assert_eq!(arr[1]["to"], "broken");
    assert_eq!(arr[1]["ok"], false);
    let delivered = std::fs::read_to_string(&out).unwrap();
    assert!(delivered.contains("deploying with ***"), "{delivered}");
    assert!(!delivered.contains("hunter2"), "{delivered}");
    assert_eq!(w.records("notify").len(), 2);
    let journal = std::fs::read_to_string(w.journal.path()).unwrap();
    assert!(!journal.contains("hunter2"), "the journal shows the secret");
    assert!(journal.contains("***"));
    let err = w.err("notify(\"ops\", \"x\", #{ severity: \"meh\" })");
    assert!(err.contains("unknown severity"), "{err}");
}

#[test]
fn plan_mode_records_instead_of_acting_and_returns_placeholders() {
    let w = World::new(&["h1"], Mode::Plan, |cfg, dir| {
        cfg.notify = toml::from_str(&format!(
            "[channels.ops]\ntype = \"command\"\nargv = [\"sh\", \"-c\", \"cat >> {}\"]\n",
            dir.join("sent").display()
        ))
        .unwrap();
    });
    let deb = tiny_deb(w.dir.path(), "pb-noop", "1.0");
    let (deb_path, sha) = w.mirror_file("pb-noop_1.0_all.deb", &deb);
    let marker = w.dir.path().join("should-not-exist");
    let data = w.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let v = w.json(&format!(
        r#"
        let h = hosts("h1")[0];
        let fix = artifact("{}", #{{ sha256: "{sha}" }});
        let b = backup(h, ["{}"]);
        #{{
            backup: b.id,
            deploy: deploy(h, fix, #{{ method: ["touch", "{{file}}", "{}"] }}),
            verify: verify(h, "pb-noop", "1.0"),
            health: health(h, ["touch", "{}"]),
            notify: notify("ops", "planned"),
            rollback: rollback(h),
            installed: installed(h, "dpkg") != (),
        }}
        "#,
        deb_path.display(),
        data.display(),
        marker.display(),
        marker.display(),
    ));
    assert_eq!(v["backup"], "planned");
    assert_eq!(v["deploy"]["planned"], true);
    assert_eq!(v["deploy"]["result"], "unknown");
    assert_eq!(v["verify"], "1.0");
    assert_eq!(v["health"], "");
    assert_eq!(v["notify"], serde_json::json!([]));
    assert_eq!(v["installed"], true, "reads still read in a plan");
    assert!(
        !marker.exists(),
        "a plan ran a command that changes the host"
    );
    assert!(
        !w.dir.path().join("sent").exists(),
        "a plan sent a notification"
    );
    let steps: Vec<String> = w
        .session
        .run
        .planned()
        .into_iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, ["backup", "deploy", "verify", "health", "notify"]);
    assert!(w.records("step.intent").is_empty());
}

// ---------- the hostile corpus ----------

fn canary(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("pwned")
}

/// Strings that would run `touch <canary>` if any reached a shell, or that no
/// argument may be: separators, substitutions, newlines, NUL, option injection,
/// and a 64 KiB string.
fn corpus(canary: &std::path::Path) -> Vec<String> {
    let c = canary.display();
    vec![
        format!("; touch {c}"),
        format!("x;touch {c}"),
        format!("$(touch {c})"),
        format!("`touch {c}`"),
        format!("x\ntouch {c}"),
        format!("x\0touch {c}"),
        format!("--checkpoint-action=exec=touch {c}"),
        format!("-oProxyCommand=touch {c}"),
        format!("{}; touch {c}", "a".repeat(64 * 1024)),
        format!("1.0|touch {c}"),
        format!("1.0&&touch {c}"),
        format!("1.0>{c}"),
    ]
}

#[test]
fn hostile_corpus_is_refused_before_any_command_runs_and_nothing_executes() {
    let w = apply(&["h1"]);
    let pwned = canary(w.dir.path());
    let (art, sha) = w.mirror_file("fix.deb", b"bytes");
    let bad: Array = corpus(&pwned).into_iter().map(Dynamic::from).collect();
    let n = bad.len();
    let mut run = patchbook::script::ScriptRun::with_session(&world::limits(), w.session.clone());
    run.engine_mut().register_fn("corpus", move || bad.clone());
    let pb = w
        .compiler
        .compile_source(
            "<hostile>",
            &format!(
                r#"
                fn attempt(f) {{ let r = "ACCEPTED"; try {{ f.call(); }} catch (e) {{ r = `${{e}}`; }} r }}
                let h = hosts("h1")[0];
                let a = artifact("{}", #{{ sha256: "{sha}" }});
                let out = [];
                for b in corpus() {{
                    out.push([
                        attempt(|| installed(h, b)),
                        attempt(|| verify(h, b, "1.0")),
                        attempt(|| verify(h, "dpkg", b)),
                        attempt(|| needing([h], b, "1.0")),
                        attempt(|| needing([h], "dpkg", b)),
                        attempt(|| service_active(h, b)),
                        attempt(|| backup(h, [b])),
                        attempt(|| backup(h, ["/tmp/" + b])),
                        attempt(|| health(h, [b])),
                        attempt(|| health(h, ["/bin/" + b])),
                        attempt(|| deploy(h, a, #{{ method: b }})),
                        attempt(|| deploy(h, a, #{{ method: [b, "{{file}}"] }})),
                        attempt(|| version_cmp(b, "1.0")),
                        attempt(|| rpm_version_cmp("1.0", b)),
                    ]);
                }}
                out
                "#,
                art.display()
            ),
            &[],
        )
        .unwrap();
    let out = run.run(&pb).unwrap();
    let rows = patchbook::script::to_json(&out);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        for (j, cell) in row.as_array().unwrap().iter().enumerate() {
            let text = cell
                .as_str()
                .unwrap_or_else(|| panic!("corpus[{i}] #{j}: {cell}"));
            assert_ne!(text, "ACCEPTED", "corpus[{i}] was accepted by call #{j}");
            assert!(
                text.contains("refused") || text.contains("not valid"),
                "corpus[{i}] call #{j}: {}",
                patchbook::primitives::cut(text, 300)
            );
        }
    }
    // Every host primitive reads the facts first; none got that far.
    assert!(
        w.session.run.cached_facts("h1").is_none(),
        "a command ran on the host"
    );
    assert!(w.records("step.intent").is_empty());
    assert!(w.records("backup").is_empty() && w.records("health").is_empty());
    assert!(!w.dir.path().join("state/backups").exists(), "a backup ran");
    assert!(!pwned.exists(), "the canary was created");

    // As data words of an argv the same strings are passed verbatim, never
    // interpreted: echo prints them and nothing else runs. NUL and oversized words
    // cannot be argv words and are refused.
    let pb = w
        .compiler
        .compile_source(
            "<hostile-data>",
            r#"
            let h = hosts("h1")[0];
            let out = [];
            for b in corpus() {
                let r = "";
                try { r = health(h, ["printf", "%s", b]); } catch (e) { r = `REFUSED ${e}`; }
                out.push(r);
            }
            out
            "#,
            &[],
        )
        .unwrap();
    let out = patchbook::script::to_json(&run.run(&pb).unwrap());
    for (i, (got, sent)) in out
        .as_array()
        .unwrap()
        .iter()
        .zip(corpus(&pwned))
        .enumerate()
    {
        let got = got.as_str().unwrap_or_else(|| panic!("corpus[{i}]: {got}"));
        if sent.contains('\0') || sent.len() > patchbook::script::patch::MAX_WORD {
            assert!(
                got.starts_with("REFUSED") && got.contains("refused argv"),
                "corpus[{i}]: {}",
                patchbook::primitives::cut(got, 200)
            );
        } else {
            assert_eq!(got, sent, "corpus[{i}] was not passed verbatim");
        }
    }
    assert!(!pwned.exists(), "the canary was created");
}
