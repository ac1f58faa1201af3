//! The launchers under `deploy/`, read as their engines read them: the Kubernetes
//! manifests parsed as YAML, the Nomad job spec parsed as HCL2, the Dockerfile
//! line by line. Each must name the one image, the store URL's secret, the
//! engine's index variable in the worker id, the worker command, the SSH key and
//! known_hosts from the engine's secrets at the paths its `patchbook.toml` reads
//! (checked by the real config loader), and N workers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use saphyr_parser::{Event, Parser, ScalarStyle};
use serde_json::{Map, Value};

/// Workers the specs start.
const N: u64 = 4;
/// The image every spec runs: the Dockerfile's, tagged with this version.
fn image() -> String {
    format!(
        "registry.example.com/patchbook:{}",
        env!("CARGO_PKG_VERSION")
    )
}
/// The flags `patchbook worker` takes.
const WORKER_FLAGS: &[&str] = &["--store", "--zone", "--id", "--lease"];
/// Global flags every subcommand takes (`src/cli/mod.rs`, `Global`).
const GLOBAL_FLAGS: &[&str] = &["--config", "--state-dir", "--store"];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap()
}

// ---------------------------------------------------------------- YAML

/// Every document of a YAML stream as JSON. Plain scalars are typed as
/// Kubernetes (YAML 1.2 core schema) types them: integers, booleans, null.
fn yaml_documents(text: &str) -> Vec<Value> {
    let mut events = Parser::new_from_str(text).map(|e| e.unwrap().0);
    let mut docs = Vec::new();
    while let Some(event) = events.next() {
        match event {
            Event::DocumentStart(_) => {
                let first = events.next().unwrap();
                docs.push(yaml_node(first, &mut events));
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    docs
}

fn yaml_node<'a>(event: Event<'a>, events: &mut impl Iterator<Item = Event<'a>>) -> Value {
    match event {
        Event::Scalar(v, style, _, tag) => {
            assert!(tag.is_none(), "no tags in deploy/ YAML: {v}");
            if style != ScalarStyle::Plain {
                return Value::String(v.to_string());
            }
            match v.as_ref() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "null" | "~" | "" => Value::Null,
                s => s
                    .parse::<i64>()
                    .map_or_else(|_| Value::String(s.to_string()), Value::from),
            }
        }
        Event::SequenceStart(..) => {
            let mut items = Vec::new();
            loop {
                match events.next().unwrap() {
                    Event::SequenceEnd => return Value::Array(items),
                    e => items.push(yaml_node(e, events)),
                }
            }
        }
        Event::MappingStart(..) => {
            let mut map = Map::new();
            loop {
                match events.next().unwrap() {
                    Event::MappingEnd => return Value::Object(map),
                    Event::Scalar(k, ..) => {
                        let v = events.next().unwrap();
                        let value = yaml_node(v, events);
                        assert!(map.insert(k.to_string(), value).is_none(), "key {k} twice");
                    }
                    e => panic!("a mapping key that is not a scalar: {e:?}"),
                }
            }
        }
        e => panic!("no anchors or aliases in deploy/ YAML: {e:?}"),
    }
}

/// The one document of `file` of this kind and name.
fn k8s_object(file: &str, kind: &str, name: &str) -> Value {
    yaml_documents(&read(file))
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{file}: no {kind} {name}"))
}

/// A container's args with `$(VAR)` replaced as the kubelet expands them.
fn expand(args: &Value, vars: &[(&str, &str)]) -> Vec<String> {
    args.as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_string();
            for (k, v) in vars {
                a = a.replace(&format!("$({k})"), v);
            }
            assert!(!a.contains("$("), "an unexpanded variable in {a}");
            a
        })
        .collect()
}

/// `--flag value` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Loads a `patchbook.toml` text with patchbook's own config loader.
fn load_config(text: &str) -> patchbook::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patchbook.toml");
    std::fs::write(&path, text).unwrap();
    patchbook::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Every flag in `args` (after the subcommand) is one the subcommand or the
/// global options take.
fn assert_known_flags(args: &[String], own: &[&str]) {
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            own.contains(&a.as_str()) || GLOBAL_FLAGS.contains(&a.as_str()),
            "{a} is not a flag of `patchbook {}`: {args:?}",
            args[0]
        );
    }
}

/// The Kubernetes worker container's args, expanded for index `i`.
fn k8s_worker_args(i: &str) -> Vec<String> {
    let job = k8s_object("kubernetes/workers.yaml", "Job", "patchbook-workers");
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c["command"].is_null(),
        "the image's entrypoint is patchbook"
    );
    expand(
        &c["args"],
        &[
            (
                "PATCHBOOK_STORE",
                "postgres://patchbook@db.example.com/patchbook",
            ),
            ("JOB_COMPLETION_INDEX", i),
        ],
    )
}

#[test]
fn kubernetes_indexed_job_runs_n_workers_against_the_store_secret() {
    let job = k8s_object("kubernetes/workers.yaml", "Job", "patchbook-workers");
    assert_eq!(job["apiVersion"], "batch/v1");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert_eq!(spec["completions"], N, "{spec:#}");
    assert_eq!(spec["parallelism"], N, "{spec:#}");
    // Kubernetes restarts: a pod failure is retried, never given up at once.
    assert!(spec["backoffLimit"].as_u64().unwrap() >= N, "{spec:#}");
    let pod = &spec["template"]["spec"];
    assert!(
        ["OnFailure", "Never"].contains(&pod["restartPolicy"].as_str().unwrap()),
        "{pod:#}"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], image().as_str());

    // The command: `worker --id worker-$(JOB_COMPLETION_INDEX)`; the store URL is
    // in the environment only, never an argument (process listings show those).
    let raw: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(raw[0], "worker", "{raw:?}");
    let pos = |s: &str| raw.iter().position(|a| *a == s).unwrap();
    assert!(
        !raw.iter()
            .any(|a| a.contains("--store") || a.contains("PATCHBOOK_STORE")),
        "{raw:?}"
    );
    assert_eq!(raw[pos("--id") + 1], "worker-$(JOB_COMPLETION_INDEX)");
    let args = k8s_worker_args("3");
    assert_eq!(flag(&args, "--id"), Some("worker-3"));
    assert_known_flags(&args, WORKER_FLAGS);

    // PATCHBOOK_STORE from the Secret; the index from the Job's annotation.
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap().clone();
    let store = var("PATCHBOOK_STORE");
    assert_eq!(
        store["valueFrom"]["secretKeyRef"]["name"],
        "patchbook-store"
    );
    assert_eq!(store["valueFrom"]["secretKeyRef"]["key"], "url");
    assert!(store["value"].is_null(), "the URL is never in the manifest");
    assert_eq!(
        var("JOB_COMPLETION_INDEX")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );

    // Locked down: non-root, read-only root, no privilege escalation.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], dockerfile_uid());
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // What it writes goes to volumes: the state directory and /tmp.
    let state_dir = flag(&args, "--state-dir").unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let writable: Vec<&str> = mounts
        .iter()
        .filter(|m| m["readOnly"] != true)
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        writable.iter().any(|m| state_dir.starts_with(m)),
        "--state-dir {state_dir} is not on a writable volume: {writable:?}"
    );
    assert!(writable.contains(&"/tmp"), "{writable:?}");
}

#[test]
fn kubernetes_mounts_the_ssh_secret_read_only_where_patchbook_toml_reads_it() {
    for (file, name) in [
        ("kubernetes/workers.yaml", "patchbook-workers"),
        ("kubernetes/coordinator.yaml", "patchbook-coordinator"),
    ] {
        let job = k8s_object(file, "Job", name);
        let pod = &job["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["image"], image().as_str(), "{file}");
        let args = expand(
            &c["args"],
            &[
                ("PATCHBOOK_STORE", "postgres://db/p"),
                ("JOB_COMPLETION_INDEX", "0"),
            ],
        );
        let config_path = flag(&args, "--config").unwrap();

        // The config file is the ConfigMap's key, mounted where --config says.
        let mount_of = |volume: &str| {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume)
                .unwrap_or_else(|| panic!("{file}: no mount of {volume}"))
                .clone()
        };
        let volume = |name: &str| {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap()
                .clone()
        };
        let cm_volume = volume("config");
        let cm_name = cm_volume["configMap"]["name"].as_str().unwrap();
        let cm = k8s_object("kubernetes/config.yaml", "ConfigMap", cm_name);
        let toml_text = cm["data"]["patchbook.toml"].as_str().unwrap();
        assert_eq!(
            format!(
                "{}/patchbook.toml",
                mount_of("config")["mountPath"].as_str().unwrap()
            ),
            config_path
        );
        let config = load_config(toml_text);

        // The key and known_hosts: one Secret, mode 0400, mounted read-only, at
        // the paths the config names.
        let ssh = volume("ssh");
        assert_eq!(ssh["secret"]["secretName"], "patchbook-ssh");
        assert_eq!(ssh["secret"]["defaultMode"], 0o400, "{file}");
        let ssh_mount = mount_of("ssh");
        assert_eq!(ssh_mount["readOnly"], true, "{file}");
        let dir = Path::new(ssh_mount["mountPath"].as_str().unwrap());
        let items: Vec<&str> = ssh["secret"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["path"].as_str().unwrap())
            .collect();
        let identity = config.ssh.identity.clone().unwrap();
        let known_hosts = config.ssh.known_hosts.clone().unwrap();
        for path in [&identity, &known_hosts] {
            assert_eq!(path.parent().unwrap(), dir, "{file}: {}", path.display());
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(items.contains(&name), "{file}: {name} not in {items:?}");
        }
        assert!(identity.ends_with("id_ed25519") && known_hosts.ends_with("known_hosts"));

        // The inventory and playbooks: the fleet ConfigMap, read-only.
        let fleet = mount_of("fleet");
        assert_eq!(fleet["readOnly"], true);
        let fleet_dir = Path::new(fleet["mountPath"].as_str().unwrap());
        assert!(config.inventory.iter().all(|i| i.starts_with(fleet_dir)));
        assert_eq!(config.playbook_dir(), fleet_dir);
    }
}

#[test]
fn kubernetes_coordinator_runs_the_playbook_with_external_workers() {
    let job = k8s_object(
        "kubernetes/coordinator.yaml",
        "Job",
        "patchbook-coordinator",
    );
    let spec = &job["spec"];
    assert_eq!(spec["completions"], 1);
    assert!(spec["backoffLimit"].as_u64().unwrap() > 0);
    let c = &spec["template"]["spec"]["containers"][0];
    let args = expand(&c["args"], &[("PATCHBOOK_STORE", "postgres://db/p")]);
    assert_eq!(args[0], "run");
    assert!(args[1].ends_with(".rhai"), "{args:?}");
    assert_eq!(flag(&args, "--workers"), Some("external"));
    assert!(
        !args
            .iter()
            .any(|a| a.contains("--store") || a.contains("postgres://")),
        "{args:?}"
    );
    let env = c["env"].as_array().unwrap();
    let store = env.iter().find(|e| e["name"] == "PATCHBOOK_STORE").unwrap();
    assert_eq!(
        store["valueFrom"]["secretKeyRef"]["name"],
        "patchbook-store"
    );
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"], true,
        "{c:#}"
    );
}

// ---------------------------------------------------------------- HCL

const NOMAD: &str = "nomad/patchbook-workers.nomad.hcl";

fn blocks<'a>(body: &'a hcl::Body, ident: &str) -> Vec<&'a hcl::Block> {
    body.blocks().filter(|b| b.identifier() == ident).collect()
}

fn one_block<'a>(body: &'a hcl::Body, ident: &str) -> &'a hcl::Block {
    let found = blocks(body, ident);
    assert_eq!(found.len(), 1, "one `{ident}` block");
    found[0]
}

fn attr<'a>(body: &'a hcl::Body, key: &str) -> &'a hcl::Expression {
    body.attributes()
        .find(|a| a.key() == key)
        .map(hcl::Attribute::expr)
        .unwrap_or_else(|| panic!("no attribute {key}"))
}

/// A literal or template string, as written (`${…}` left for Nomad).
fn text(e: &hcl::Expression) -> String {
    match e {
        hcl::Expression::String(s) => s.clone(),
        hcl::Expression::TemplateExpr(t) => t.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

/// `var.NAME` resolved to the variable's default.
fn value<'a>(body: &'a hcl::Body, e: &'a hcl::Expression) -> &'a hcl::Expression {
    let hcl::Expression::Traversal(t) = e else {
        return e;
    };
    let hcl::Expression::Variable(v) = &t.expr else {
        panic!("not var.NAME: {e:?}")
    };
    assert_eq!(v.as_str(), "var");
    let [hcl::expr::TraversalOperator::GetAttr(name)] = t.operators.as_slice() else {
        panic!("not var.NAME: {e:?}")
    };
    let var = blocks(body, "variable")
        .into_iter()
        .find(|b| b.labels().first().map(hcl::BlockLabel::as_str) == Some(name.as_str()))
        .unwrap_or_else(|| panic!("no variable {name}"));
    attr(var.body(), "default")
}

/// The Nomad worker task's args, with Nomad's `${VAR}` replaced for allocation `i`.
fn nomad_worker_args(i: &str) -> Vec<String> {
    let spec = hcl::parse(&read(NOMAD)).unwrap();
    let job = one_block(&spec, "job");
    let task = one_block(one_block(job.body(), "group").body(), "task");
    let hcl::Expression::Array(args) = attr(one_block(task.body(), "config").body(), "args") else {
        panic!("args is not a list")
    };
    args.iter()
        .map(|a| {
            text(a)
                .replace(
                    "${PATCHBOOK_STORE}",
                    "postgres://patchbook@db.example.com/patchbook",
                )
                .replace("${NOMAD_ALLOC_INDEX}", i)
                .replace("${NOMAD_TASK_DIR}", "/local")
                .replace("${NOMAD_ALLOC_DIR}", "/alloc")
        })
        .inspect(|a| assert!(!a.contains("${"), "an unexpanded variable in {a}"))
        .collect()
}

#[test]
fn nomad_batch_job_runs_n_workers_with_the_store_and_key_from_variables() {
    let spec = hcl::parse(&read(NOMAD)).unwrap();
    let job = one_block(&spec, "job");
    assert_eq!(job.labels()[0].as_str(), "patchbook-workers");
    assert_eq!(text(attr(job.body(), "type")), "batch");
    let group = one_block(job.body(), "group");
    let count = value(&spec, attr(group.body(), "count"));
    assert_eq!(
        *count,
        hcl::Expression::Number(N.into()),
        "count = N workers"
    );
    // Nomad restarts a failed task and reschedules a lost allocation.
    for stanza in ["restart", "reschedule"] {
        let b = one_block(group.body(), stanza);
        let hcl::Expression::Number(n) = attr(b.body(), "attempts") else {
            panic!("{stanza} attempts")
        };
        assert!(n.as_u64().unwrap() > 0, "{stanza}");
    }
    let task = one_block(group.body(), "task");
    assert_eq!(text(attr(task.body(), "driver")), "docker");
    assert_eq!(
        text(attr(task.body(), "user")),
        dockerfile_uid().to_string(),
        "runs as the image's user"
    );
    let config = one_block(task.body(), "config");
    assert_eq!(
        text(value(&spec, attr(config.body(), "image"))),
        image(),
        "the image"
    );
    assert_eq!(
        *attr(config.body(), "readonly_rootfs"),
        hcl::Expression::Bool(true)
    );

    // The command: `worker --id worker-${NOMAD_ALLOC_INDEX}`; the store URL only in
    // the environment.
    let hcl::Expression::Array(raw) = attr(config.body(), "args") else {
        panic!("args")
    };
    let raw: Vec<String> = raw.iter().map(text).collect();
    assert_eq!(raw[0], "worker");
    assert!(
        !raw.iter()
            .any(|a| a.contains("--store") || a.contains("PATCHBOOK_STORE")),
        "{raw:?}"
    );
    assert_eq!(flag(&raw, "--id"), Some("worker-${NOMAD_ALLOC_INDEX}"));
    let args = nomad_worker_args("2");
    assert_eq!(flag(&args, "--id"), Some("worker-2"));
    assert_known_flags(&args, WORKER_FLAGS);

    // Templates: the store URL into the environment, the key and known_hosts
    // into the task's secrets/ (0400), patchbook.toml pointing at them.
    let templates: Vec<(String, String, &hcl::Body)> = blocks(task.body(), "template")
        .into_iter()
        .map(|t| {
            (
                text(attr(t.body(), "destination")),
                text(attr(t.body(), "data")),
                t.body(),
            )
        })
        .collect();
    let template = |dest: &str| {
        templates
            .iter()
            .find(|(d, ..)| d == dest)
            .unwrap_or_else(|| panic!("no template for {dest}"))
    };
    let (_, store, store_body) = template("secrets/store.env");
    assert!(
        store.contains("PATCHBOOK_STORE={{") && store.contains("nomadVar"),
        "{store}"
    );
    assert_eq!(*attr(store_body, "env"), hcl::Expression::Bool(true));
    let (_, toml_text, _) = template("local/patchbook.toml");
    assert_eq!(flag(&args, "--config"), Some("/local/patchbook.toml"));
    let cfg = load_config(toml_text);
    for (path, key) in [
        (cfg.ssh.identity.clone().unwrap(), ".ssh_key"),
        (cfg.ssh.known_hosts.clone().unwrap(), ".known_hosts"),
    ] {
        // The task's secrets/ folder is /secrets in the container.
        let inside = path.strip_prefix("/").unwrap().display().to_string();
        let (_, data, body) = template(&inside);
        assert!(data.contains("nomadVar") && data.contains(key), "{data}");
        assert_eq!(text(attr(body, "perms")), "0400", "{inside}");
    }
}

// ---------------------------------------------------------------- Dockerfile

/// The Dockerfile's instructions: (INSTRUCTION, rest), comments and blank lines
/// dropped, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let (ins, rest) = pending.split_once(' ').unwrap();
        out.push((ins.to_uppercase(), rest.trim().to_string()));
        pending.clear();
    }
    out
}

fn dockerfile_uid() -> u64 {
    let user = dockerfile()
        .into_iter()
        .rfind(|(i, _)| i == "USER")
        .unwrap()
        .1;
    user.split(':').next().unwrap().parse().unwrap()
}

#[test]
fn dockerfile_builds_the_release_binary_in_one_stage_and_runs_it_on_debian_slim() {
    let ins = dockerfile();
    let froms: Vec<&str> = ins
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    let build_stage = froms[0].split_whitespace().collect::<Vec<_>>();
    assert_eq!(&build_stage[1..], ["AS", "build"], "{froms:?}");
    assert!(
        froms[1].starts_with("debian:") && froms[1].ends_with("-slim"),
        "{froms:?}"
    );
    assert!(ins
        .iter()
        .any(|(i, r)| i == "RUN" && r.contains("cargo build --release --locked")));
    assert!(ins.iter().any(|(i, r)| i == "COPY"
        && r.starts_with("--from=build ")
        && r.contains("target/release/patchbook /usr/bin/patchbook")));
    assert!(dockerfile_uid() > 0, "runs as an unprivileged user");
    let entry = ins.iter().find(|(i, _)| i == "ENTRYPOINT").unwrap();
    assert_eq!(entry.1, r#"["/usr/bin/patchbook"]"#);
    // The tag the README builds is the image the specs run.
    assert!(read("Dockerfile").contains(&format!("-t {} .", image())));
    // The build context leaves target/ out.
    let ignore = read("Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

// ---------------------------------------------------------------- the real parser

/// The command lines in the specs, as each engine expands them: patchbook's own
/// argument parser must accept them, and `patchbook worker --help` must exist.
#[test]
fn the_specs_command_lines_are_accepted_by_patchbook_itself() {
    use clap::Parser as _;
    let bin = env!("CARGO_BIN_EXE_patchbook");
    let out = Command::new(bin)
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for f in WORKER_FLAGS {
        assert!(
            help.contains(f),
            "`patchbook worker --help` lacks {f}: {help}"
        );
    }
    let coordinator = k8s_object(
        "kubernetes/coordinator.yaml",
        "Job",
        "patchbook-coordinator",
    );
    let coordinator = expand(
        &coordinator["spec"]["template"]["spec"]["containers"][0]["args"],
        &[("PATCHBOOK_STORE", "postgres://db/p")],
    );
    for args in [k8s_worker_args("0"), nomad_worker_args("1"), coordinator] {
        if let Err(e) = patchbook::cli::Cli::try_parse_from(
            std::iter::once("patchbook".into()).chain(args.clone()),
        ) {
            panic!("patchbook refuses {args:?}: {e}");
        }
    }
}
