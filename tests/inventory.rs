//! Inventory loading, Ansible compatibility, selectors and dependency checks.
//!
//! Every inventory under tests/inventories/ that Ansible can read is compared with
//! the real `ansible-inventory --list` (from `target/ci-venv`, installed by
//! `.ci/setup`), as parsed JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbook::inventory::{ansible, Criticality, Inventory, InventoryError, TransportKind};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inventories")
}

fn ansible_inventory() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/ansible-inventory");
    if local.exists() {
        return local;
    }
    if let Some(venv) = std::env::var_os("PATCHBOOK_VENV") {
        let p = PathBuf::from(venv).join("bin/ansible-inventory");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "ansible-inventory not found in target/ci-venv or $PATCHBOOK_VENV; run `bash .ci/setup` \
         (it installs ansible-core into target/ci-venv)"
    );
}

/// What the real Ansible prints for `file`, run with its state in a temp dir.
fn ansible_list(file: &Path) -> Value {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(ansible_inventory())
        .arg("-i")
        .arg(file)
        .arg("--list")
        .env("ANSIBLE_HOME", home.path())
        .env("ANSIBLE_LOCAL_TEMP", home.path().join("tmp"))
        .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "1")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ansible-inventory failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    python_json(&out.stdout)
}

/// Python's `json` prints non-finite floats as bare `Infinity`, `-Infinity` and
/// `NaN`, which JSON lacks; patchbook prints them as those words in strings.
/// Quotes the bare words (outside strings) so both read as the same JSON.
fn python_json(bytes: &[u8]) -> Value {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(word) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|w| rest.starts_with(w))
            {
                out.push_str(&format!("\"{word}\""));
                rest = &rest[word.len()..];
                continue;
            }
        }
        if in_string && escaped {
            escaped = false;
        } else if in_string && c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = !in_string;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).unwrap()
}

/// What `patchbook -i FILE inventory list --json` prints.
fn patchbook_list(file: &Path) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(dir.path())
        .arg("-i")
        .arg(file)
        .args(["inventory", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patchbook failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ansible_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "toml"))
        .collect();
    files.sort();
    files
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn list_json_equals_ansible_inventory_on_every_fixture() {
    let files = ansible_fixtures();
    assert!(files.len() >= 15, "only {} Ansible fixtures", files.len());
    let mut through_binary = 0;
    for (i, file) in files.iter().enumerate() {
        let expected = ansible_list(file);
        // Every other file goes through the built binary, the rest through the library.
        let ours = if i % 2 == 0 {
            through_binary += 1;
            patchbook_list(file)
        } else {
            ansible::to_list_json(&Inventory::load(std::slice::from_ref(file)).unwrap())
        };
        assert_eq!(
            ours,
            expected,
            "{}: patchbook\n{}\nansible\n{}",
            file.display(),
            serde_json::to_string_pretty(&ours).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        );
    }
    assert!(through_binary >= 8);
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn yaml_scalars_are_typed_as_yaml_1_1_like_ansible() {
    let file = fixtures().join("22-yaml11-scalars.yml");
    let expected = ansible_list(&file);
    let ours = patchbook_list(&file);
    assert_eq!(ours, expected);
    let vars = &ours["_meta"]["hostvars"];
    // The host measured in the issue: YAML 1.2 typing got all five wrong.
    assert_eq!(
        vars["measured"],
        json!({"enabled": true, "legacy": true, "mode": 420, "ratio": "1e3", "when": 750,
               "from_all": true})
    );
    let spot = [
        ("b1", "yes_title", json!(true)),
        ("b1", "off_upper", json!(false)),
        ("b1", "y_alone", json!("y")),
        ("b1", "quoted_single", json!("yes")),
        ("b1", "tagged_bool", json!(false)),
        ("b1", "literal_block", json!("yes\n")),
        ("i1", "hex", json!(31)),
        ("i1", "binary", json!(5)),
        ("i1", "sexagesimal_long", json!(685_230)),
        ("i1", "not_octal", json!("0789")),
        ("i1", "quoted_octal", json!("0644")),
        ("f1", "exp_no_dot", json!("1e3")),
        ("f1", "exp_plus", json!(1000.0)),
        ("f1", "inf_minus", json!("-Infinity")),
        ("f1", "nan", json!("NaN")),
        ("n1", "null_title", json!(null)),
        ("n1", "quoted_null", json!("null")),
        ("t1", "date", json!("2001-12-14")),
        ("t1", "canonical", json!("2001-12-15T02:59:43.100000+00:00")),
        ("t1", "quoted_datetime", json!("2001-12-15T02:59:43.1Z")),
        ("m1", "merged_list", json!({"a": 1, "b": 2, "c": 4})),
    ];
    for (host, var, want) in spot {
        assert_eq!(vars[host][var], want, "{host}.{var}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn a_yaml_key_written_twice_warns_and_the_last_value_wins_as_in_ansible() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dup.yml");
    std::fs::write(
        &file,
        "all:\n  hosts:\n    h1:\n      <<: {a: 0, b: 0}\n      a: 1\n      a: 2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .arg("-i")
        .arg(&file)
        .args(["inventory", "list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ours, ansible_list(&file));
    assert_eq!(ours["_meta"]["hostvars"]["h1"], json!({"a": 2, "b": 0}));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Overriding a merged key is what merging is for: one warning, for the repeat.
    assert_eq!(stderr.matches("appears twice").count(), 1, "{stderr}");
    // With --json the log line is JSON too, so the quotes around the key come escaped.
    assert!(stderr.contains("dup.yml:6:7: key "), "{stderr}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn two_inventories_merge_like_ansible() {
    let a = fixtures().join("03-children-of-children.ini");
    let b = fixtures().join("11-basic.yml");
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(ansible_inventory())
        .args([
            "-i".as_ref(),
            a.as_os_str(),
            "-i".as_ref(),
            b.as_os_str(),
            "--list".as_ref(),
        ])
        .env("ANSIBLE_HOME", home.path())
        .env("ANSIBLE_LOCAL_TEMP", home.path().join("tmp"))
        .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "1")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = ansible::to_list_json(&Inventory::load(&[a, b]).unwrap());
    assert_eq!(ours, expected);
}

#[test]
fn ini_values_typed_and_precedence_applied() {
    let inv = Inventory::load(&[fixtures().join("04-precedence.ini")]).unwrap();
    let web01 = inv.host("web01").unwrap();
    let web02 = inv.host("web02").unwrap();
    assert_eq!(web01.vars["level"], "host");
    assert_eq!(web02.vars["level"], "web");
    assert_eq!(web02.vars["region_only"], "eu");
    assert_eq!(web02.vars["only_all"], 1);
    // alpha, web and zulu sit at depth 1, 2 and 1: web is deepest, zulu beats alpha.
    assert_eq!(web02.vars["shared"], "web");
    assert_eq!(web02.vars["sibling"], "zulu");
    assert_eq!(web02.groups, vec!["alpha", "region", "web", "zulu"]);

    let q = Inventory::load(&[fixtures().join("08-quoted-values.ini")]).unwrap();
    let h1 = q.host("host1").unwrap();
    assert_eq!(h1.vars["a"], 1);
    assert_eq!(h1.vars["b"], "yes");
    assert_eq!(h1.vars["c"], "quoted string");
    assert_eq!(h1.vars["i"], "010");
    assert_eq!(h1.vars["j"], serde_json::json!([1, 2, "x"]));
}

#[test]
fn ansible_connection_vars_become_host_fields() {
    let inv = Inventory::load(&[fixtures().join("10-ports.ini")]).unwrap();
    let gamma = inv.host("gamma").unwrap();
    assert_eq!(gamma.address, "192.0.2.10");
    assert_eq!(gamma.port, 2201);
    assert_eq!(gamma.user.as_deref(), Some("ops"));
    assert_eq!(gamma.identity.as_deref(), Some(Path::new("/keys/ops")));
    assert_eq!(gamma.vars["ansible_host"], "192.0.2.10");
    assert_eq!(inv.host("alpha").unwrap().port, 2222);
    assert_eq!(inv.host("web2.example.com").unwrap().port, 8022);
    assert_eq!(inv.host("mail").map(|h| h.port), None);
}

#[test]
fn native_toml_hosts_keep_file_order_and_typed_fields() {
    let inv = Inventory::load(&[fixtures().join("18-native.toml")]).unwrap();
    let names: Vec<&str> = inv.hosts().iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, vec!["web01", "db01", "local", "web-eu-1"]);
    let web01 = inv.host("web01").unwrap();
    assert_eq!((web01.address.as_str(), web01.port), ("127.0.0.1", 2201));
    assert_eq!(web01.criticality, Criticality::Low);
    assert_eq!(web01.owners, vec!["ops@example.com"]);
    assert_eq!(web01.vars["http_port"], 80);
    assert_eq!(web01.groups, vec!["pilot", "web"]);
    let db01 = inv.host("db01").unwrap();
    assert_eq!(db01.criticality, Criticality::Critical);
    assert_eq!(db01.owners, vec!["dba@example.com"]);
    assert_eq!(db01.user.as_deref(), Some("root"));
    assert_eq!(db01.secret_vars, vec!["db_password"]);
    assert_eq!(inv.host("local").unwrap().transport, TransportKind::Local);
    assert_eq!(inv.host("web-eu-1").unwrap().groups, vec!["web", "web_eu"]);
    assert_eq!(inv.dependencies_of(web01), vec!["db01"]);
    // Secrets never reach the listing.
    let listed = ansible::to_list_json(&inv);
    assert_eq!(listed["_meta"]["hostvars"]["db01"]["db_password"], "***");
    assert_eq!(listed["web"]["children"], serde_json::json!(["web_eu"]));
}

#[test]
fn criticality_may_come_from_group_vars() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.ini");
    std::fs::write(
        &f,
        "[db]\ndb1\ndb2 criticality=low\n[db:vars]\ncriticality=high\n",
    )
    .unwrap();
    let inv = Inventory::load(&[f]).unwrap();
    assert_eq!(inv.host("db1").unwrap().criticality, Criticality::High);
    assert_eq!(inv.host("db2").unwrap().criticality, Criticality::Low);
}

#[test]
fn become_comes_from_host_and_group_vars_in_every_format() {
    use patchbook::inventory::Become;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("b.yml");
    std::fs::write(
        &yaml,
        "all:\n  children:\n    web:\n      vars:\n        ansible_become: true\n        \
         ansible_become_pass: \"${file:/etc/pb/web-sudo}\"\n      hosts:\n        w1: {}\n        \
         w2: { ansible_become_user: app }\n        w3: { ansible_become: false }\n    db:\n      \
         hosts:\n        d1: {}\n",
    )
    .unwrap();
    let toml = dir.path().join("n.toml");
    std::fs::write(
        &toml,
        "[hosts.n1]\nbecome = true\nbecome_password = \"${env:N1_SUDO}\"\n\
         [hosts.n2]\ngroups = [\"ops\"]\n[groups.ops]\nvars = { ansible_become = \"yes\" }\n",
    )
    .unwrap();
    let inv = Inventory::load(&[yaml, toml]).unwrap();
    let become_of = |h: &str| inv.host(h).unwrap().r#become.clone();
    let web = |user: &str| {
        Some(Become {
            user: user.into(),
            password: Some("${file:/etc/pb/web-sudo}".into()),
        })
    };
    assert_eq!(become_of("w1"), web("root"));
    assert_eq!(become_of("w2"), web("app"));
    assert_eq!(become_of("w3"), None);
    assert_eq!(become_of("d1"), None);
    assert_eq!(
        become_of("n1"),
        Some(Become {
            user: "root".into(),
            password: Some("${env:N1_SUDO}".into()),
        })
    );
    assert_eq!(
        become_of("n2"),
        Some(Become {
            user: "root".into(),
            password: None,
        })
    );
}

#[test]
fn become_problems_name_the_host_and_key_and_never_the_password() {
    let m = load_err(
        "m.ini",
        "h1 ansible_become=true ansible_become_method=doas\n",
    );
    assert!(
        m.contains("host `h1`: ansible_become_method=doas is not supported"),
        "{m}"
    );
    let m = load_err(
        "p.ini",
        "h2 ansible_become=true ansible_become_password=hunter2-plain\n",
    );
    assert!(
        m.contains("host `h2`: ansible_become_password must be a secret reference"),
        "{m}"
    );
    assert!(!m.contains("hunter2-plain"), "{m}");
    let m = load_err(
        "t.toml",
        "[hosts.h3]\nbecome = true\nbecome_password = \"{{ vault_pw }}\"\n",
    );
    assert!(m.contains("host `h3`") && !m.contains("vault_pw"), "{m}");
    let m = load_err("f.ini", "h4 ansible_become=maybe\n");
    assert!(m.contains("ansible_become must be true or false"), "{m}");
}

fn load_err(name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    std::fs::write(&f, text).unwrap();
    let err = Inventory::load(std::slice::from_ref(&f)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&f.display().to_string()), "{msg}");
    msg
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn yaml_values_ansible_cannot_construct_are_errors_in_both() {
    for (value, says) in [
        ("0x_", "not an integer"),
        ("2001-02-30", "day does not exist"),
        ("2001-12-14 25:00:00", "time does not exist"),
        ("=", "quote it"),
    ] {
        let text = format!("all:\n  hosts:\n    h1:\n      v: {value}\n");
        let m = load_err("v.yml", &text);
        assert!(m.contains("v.yml:4:") && m.contains(says), "{value}: {m}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.yml");
        std::fs::write(&file, &text).unwrap();
        let out = Command::new(ansible_inventory())
            .arg("-i")
            .arg(&file)
            .arg("--list")
            .env("ANSIBLE_HOME", dir.path())
            .env("ANSIBLE_LOCAL_TEMP", dir.path().join("tmp"))
            .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "1")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "ansible-inventory read `{value}`");
    }
}

#[test]
fn malformed_inventories_name_file_and_line() {
    let m = load_err("a.toml", "[hosts.a]\naddress = \"x\"\nport = \"twenty\"\n");
    assert!(m.contains("a.toml:3:8:"), "{m}");
    let m = load_err("b.toml", "[hosts.a]\ncolour = 1\n");
    assert!(
        m.contains("b.toml:2:1:") && m.contains("unknown field `colour`"),
        "{m}"
    );
    let m = load_err("c.toml", "[hosts.a]\ncriticality = \"severe\"\n");
    assert!(m.contains("c.toml:2:15:"), "{m}");
    let m = load_err("d.ini", "[web]\nweb01\n[web:children\nx\n");
    assert!(m.contains("d.ini:3:1:") && m.contains("closing `]`"), "{m}");
    let m = load_err("e.ini", "[web]\nweb[3:1]\n");
    assert!(m.contains("e.ini:2:1:") && m.contains("web[3:1]"), "{m}");
    let m = load_err("f.ini", "[web]\nw1\n[g:children]\nweb01 ansible_host=x\n");
    assert!(
        m.contains("f.ini:4:1:") && m.contains("expected a group name"),
        "{m}"
    );
    let m = load_err("g.ini", "[web]\nw1 novalue\n");
    assert!(m.contains("g.ini:2:1:") && m.contains("key=value"), "{m}");
    let m = load_err("h.ini", "[prod:children]\nweb\n");
    assert!(m.contains("h.ini:2:1:") && m.contains("`web`"), "{m}");
    let m = load_err("i.ini", "[web]\nw1 a=\"open\n");
    assert!(
        m.contains("i.ini:2:1:") && m.contains("closing quotation"),
        "{m}"
    );
    let m = load_err("j.yml", "all:\n  hosts:\n    a:\n   b: 1\n");
    assert!(m.contains("j.yml:4:"), "{m}");
    let m = load_err("k.yaml", "all:\n  hosts: [a, b]\n");
    assert!(
        m.contains("k.yaml") && m.contains("`hosts` must be a mapping"),
        "{m}"
    );
}

#[test]
fn dependency_cycle_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cycle.toml");
    std::fs::write(
        &f,
        "[hosts.a]\ndepends_on = [\"b\"]\n[hosts.b]\ndepends_on = [\"dbs\"]\n\
         [hosts.c]\ngroups = [\"dbs\"]\ndepends_on = \"a\"\n",
    )
    .unwrap();
    let err = Inventory::load(&[f]).unwrap_err();
    assert!(matches!(err, InventoryError::Cycle { .. }), "{err}");
    assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");
}

#[test]
fn unknown_dependency_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dep.toml");
    std::fs::write(&f, "[hosts.a]\ndepends_on = [\"nowhere\"]\n").unwrap();
    let err = Inventory::load(&[f]).unwrap_err();
    assert!(
        matches!(&err, InventoryError::UnknownDependency { host, target } if host == "a" && target == "nowhere"),
        "{err}"
    );
}

fn names(inv: &Inventory, pattern: &str) -> Vec<String> {
    inv.select(pattern)
        .unwrap()
        .into_iter()
        .map(|h| h.name.clone())
        .collect()
}

fn selector_inventory() -> Inventory {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sel.ini");
    std::fs::write(
        &f,
        "solo\n[web]\nweb01\nweb02\nweb03\n[db]\ndb-a\ndb-b\ndb-cc\n\
         [prod]\nweb01\nweb03\ndb-a\n[eu:children]\nweb\n",
    )
    .unwrap();
    Inventory::load(&[f]).unwrap()
}

#[test]
fn selectors_follow_ansible_patterns() {
    let inv = selector_inventory();
    let all = vec!["solo", "web01", "web02", "web03", "db-a", "db-b", "db-cc"];
    assert_eq!(names(&inv, "all"), all);
    assert_eq!(names(&inv, "*"), all);
    assert_eq!(names(&inv, "web"), vec!["web01", "web02", "web03"]);
    assert_eq!(names(&inv, "eu"), vec!["web01", "web02", "web03"]);
    // Union keeps inventory order whatever order the parts were written in.
    assert_eq!(
        names(&inv, "db:web"),
        vec!["web01", "web02", "web03", "db-a", "db-b", "db-cc"]
    );
    assert_eq!(
        names(&inv, "db,solo"),
        vec!["solo", "db-a", "db-b", "db-cc"]
    );
    assert_eq!(names(&inv, "web:&prod"), vec!["web01", "web03"]);
    assert_eq!(names(&inv, "web:!web03"), vec!["web01", "web02"]);
    // `!` and `&` apply after every union, wherever they are written.
    assert_eq!(names(&inv, "!web03:web"), vec!["web01", "web02"]);
    assert_eq!(names(&inv, "&prod:web:db"), vec!["web01", "web03", "db-a"]);
    assert_eq!(names(&inv, "!prod"), vec!["solo", "web02", "db-b", "db-cc"]);
    assert_eq!(names(&inv, "web0*"), vec!["web01", "web02", "web03"]);
    assert_eq!(names(&inv, "db-?"), vec!["db-a", "db-b"]);
    assert_eq!(names(&inv, "~db-(a|cc)"), vec!["db-a", "db-cc"]);
    assert_eq!(names(&inv, "~web0[12]"), vec!["web01", "web02"]);
    assert_eq!(names(&inv, "web02"), vec!["web02"]);
    assert_eq!(names(&inv, "ungrouped"), vec!["solo"]);
    assert_eq!(names(&inv, "web[0:1]"), vec!["web01", "web02"]);
    assert_eq!(names(&inv, "web[-1]"), vec!["web03"]);
    assert!(names(&inv, "nosuchgroup").is_empty());
    assert_eq!(names(&inv, "nosuchgroup:solo"), vec!["solo"]);
}

#[test]
fn broken_regex_is_a_selector_error() {
    let inv = selector_inventory();
    let err = inv.select("~web(").unwrap_err();
    assert!(matches!(err, InventoryError::Selector { .. }), "{err}");
    assert!(err.to_string().contains("~web("), "{err}");
}

#[test]
fn graph_and_table_through_the_binary() {
    let file = fixtures().join("18-native.toml");
    let dir = tempfile::tempdir().unwrap();
    let run = |verb: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
            .current_dir(dir.path())
            .arg("-i")
            .arg(&file)
            .args(["inventory", verb])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let graph = run("graph");
    assert!(
        graph.contains("  |--@web:\n  |  |--@web_eu:\n  |  |  |--web-eu-1\n  |  |--web01\n"),
        "{graph}"
    );
    assert!(
        graph.contains("dependencies:\n  web01 -> db01\n"),
        "{graph}"
    );
    let table = run("list");
    let db = table.lines().find(|l| l.starts_with("db01")).unwrap();
    assert!(
        db.contains("127.0.0.1:2202") && db.contains("critical"),
        "{table}"
    );
    assert!(db.contains("dba@example.com"), "{table}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs ansible-inventory from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn graph_matches_ansible_inventory_graph() {
    let file = fixtures().join("03-children-of-children.ini");
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(ansible_inventory())
        .arg("-i")
        .arg(&file)
        .arg("--graph")
        .env("ANSIBLE_HOME", home.path())
        .env("ANSIBLE_LOCAL_TEMP", home.path().join("tmp"))
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = String::from_utf8(out.stdout).unwrap();
    let ours = patchbook::inventory::graph::render(&Inventory::load(&[file]).unwrap());
    let tree = ours.split("dependencies:").next().unwrap();
    assert_eq!(tree.trim_end(), expected.trim_end());
}

#[test]
fn connection_settings_patchbook_does_not_act_on_are_warnings_naming_host_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts.ini");
    std::fs::write(
        &file,
        "bastion ansible_host=10.0.0.5\n\
         web1 ansible_ssh_common_args='-o ProxyJump=bastion -o ServerAliveInterval=30' \
         ansible_ssh_pass=hunter2\n\
         web2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patchbook"))
        .current_dir(dir.path())
        .arg("-i")
        .arg(&file)
        .args(["inventory", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("web1") && l.contains("ServerAliveInterval=30")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("web1") && l.contains("ansible_ssh_pass")),
        "{stderr}"
    );
    // A warning names the key, never the value of a var that may be a secret.
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let inv = Inventory::load(&[file]).unwrap();
    assert_eq!(inv.host("web1").unwrap().jump[0].address, "10.0.0.5");
    assert!(inv.host("web2").unwrap().jump.is_empty());
}

/// This thread's CPU time: other work on a loaded machine does not count, so the
/// comparison below holds on a busy CI host.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap(),
        u32::try_from(ts.tv_nsec).unwrap(),
    )
}

/// Every host in one big group and in `ungrouped`'s place, a jump host and a
/// group dependency on every host, then a selector: the shapes that were quadratic
/// (a 100,000-host INI took 24 s). Eight times the hosts must cost well under
/// sixty-four times the CPU; timing itself is left to `benches/inventory.sh`.
#[test]
fn loading_and_selecting_grow_linearly_with_the_fleet() {
    fn cost(n: usize) -> std::time::Duration {
        // Hosts before any section land in `ungrouped`.
        let mut ini = String::from("bastion ansible_host=10.9.9.9\n");
        for i in 0..n / 4 {
            ini.push_str(&format!("u{i:06}\n"));
        }
        ini.push_str("[db]\ndb1\n[fleet]\n");
        for i in 0..n {
            ini.push_str(&format!(
                "h{i:06} ansible_host=10.0.{}.{}\n",
                i >> 8 & 255,
                i & 255
            ));
        }
        ini.push_str("[fleet:vars]\njump=bastion\ndepends_on=db\n");
        let mut best = std::time::Duration::MAX;
        for _ in 0..3 {
            let t0 = thread_cpu();
            let inv = ansible::parse_ini(Path::new("big.ini"), &ini).unwrap();
            let chosen = inv.select("fleet:!h000001").unwrap();
            assert_eq!(chosen.len(), n - 1);
            inv.check_dependencies().unwrap();
            assert_eq!(inv.host("h000000").unwrap().jump[0].address, "10.9.9.9");
            best = best.min(thread_cpu() - t0);
        }
        best
    }
    let small = cost(4_000);
    let large = cost(32_000);
    let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
    eprintln!("4,000 hosts: {small:?}; 32,000 hosts: {large:?}; ratio {ratio:.1}");
    assert!(
        ratio < 24.0,
        "8x the hosts cost {ratio:.1}x the CPU ({small:?} -> {large:?}): something is quadratic"
    );
}

/// `depends_on` on a group multiplies: on every host of a 5,000-host fleet it is
/// 25 million edges, refused with a count before any is built (at 100,000 hosts it
/// was ten billion, and loading ran out of memory).
#[test]
fn group_dependencies_that_multiply_past_the_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hosts.ini");
    std::fs::write(&path, "[fleet]\nh[1:5000]\n[all:vars]\ndepends_on=all\n").unwrap();
    let err = Inventory::load(std::slice::from_ref(&path)).unwrap_err();
    assert!(
        matches!(
            err,
            InventoryError::TooManyDependencies {
                edges: 25_000_000,
                of_host: 5_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("depend on a smaller group"),
        "{err}"
    );
    // The same shape within the bound loads, and its cycle is still named.
    std::fs::write(&path, "[fleet]\nh[1:50]\n[all:vars]\ndepends_on=fleet\n").unwrap();
    let err = Inventory::load(&[path]).unwrap_err();
    assert!(matches!(err, InventoryError::Cycle { .. }), "{err:?}");
}

/// Found by the `inventory_ini` fuzz target: a host named `all` made the `all`
/// selector pick that one host instead of every host.
#[test]
fn all_selects_every_host_even_beside_a_host_named_all() {
    let ini = "loelnely1\nlonely2 role=spare\n\n[web]\nweb01\nall\n[ungrouped]\nlonely3\n";
    let inv = ansible::parse_ini(Path::new("fuzz.ini"), ini).unwrap();
    let all: Vec<&str> = inv
        .select("all")
        .unwrap()
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(all.len(), inv.hosts().len(), "{all:?}");
    assert_eq!(all.len(), 5, "{all:?}");
}

/// Found by the `inventory_toml` fuzz target: a group named "" was accepted, and a
/// selector built from its name chose every host.
#[test]
fn empty_names_in_a_toml_inventory_are_refused() {
    assert_empty_names_refused(
        "hosts.toml",
        &[
            (
                "[hosts.web01]\ngroups = [\"web\", \"\"]\n",
                "a group of host `web01`",
            ),
            ("[hosts.\"\"]\naddress = \"10.0.0.1\"\n", "a host"),
            ("[groups.\"\"]\nhosts = [\"web01\"]\n", "a group"),
            (
                "[groups.web]\nhosts = [\" \"]\n",
                "a child or host of group `web`",
            ),
        ],
    );
}

/// Found by the `inventory_yaml` fuzz target: a group named "" was accepted, and
/// selecting it by name chose a host that is not its member. Ansible refuses empty
/// group and host names too.
#[test]
fn empty_names_in_a_yaml_inventory_are_refused() {
    assert_empty_names_refused(
        "hosts.yml",
        &[
            (
                "all:\n  children:\n    \"\":\n      hosts:\n        web01:\n",
                "a group",
            ),
            ("\"\":\n  hosts:\n    web01:\n", "a group"),
            ("all:\n  hosts:\n    \" \":\n", "a host of group `all`"),
            (
                "{\"web\": {\"hosts\": {\"\": null}}}",
                "a host of group `web`",
            ),
        ],
    );
}

/// Each inventory `text`, written as `file`, fails to load with an error that names
/// the file, says "empty name" and says `what` had it.
fn assert_empty_names_refused(file: &str, cases: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    for (text, what) in cases {
        std::fs::write(&path, text).unwrap();
        let err = Inventory::load(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(what) && err.contains("empty name"),
            "{text}: {err}"
        );
        assert!(err.contains(file), "{err}");
    }
}
