//! The file primitives (`put_file`, `template`, `line_in_file`, `remove_file`) and
//! `stdlib/remediate`, driven through the real binary against a 6-host lab fleet,
//! one host per test: `plan` shows the diff and changes nothing, a run changes the
//! host, a second run changes nothing and journals no intent, and `rollback RUN`
//! from a fresh process leaves the host byte-identical (content, mode and owner of
//! every file it owns, by `support::host_fingerprint`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use patchbook::lab::Fleet;

const HOSTS: usize = 6;

fn fleet() -> &'static Fleet {
    support::shared_fleet(HOSTS)
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Where a host path lives on the controller: the host's own bind-mounted trees.
fn on_host(host: &str, path: &str) -> PathBuf {
    let dir = &fleet().host(host).unwrap().dir;
    for (prefix, tree) in [
        ("/etc/acme/", "etc-acme"),
        ("/opt/", "opt"),
        ("/root/", "root"),
    ] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return dir.join(tree).join(rest);
        }
    }
    panic!("{path} is not a path a lab host owns");
}

fn fingerprint(host: &str) -> String {
    support::host_fingerprint(fleet(), host)
}

/// A folder with the lab's settings, a playbook folder (`scripts/`, the folder file
/// sources may come from), the repo's stdlib and its own state dir.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let dir = support::lab_project(fleet(), "files-", "playbooks = \"{dir}/scripts\"\n");
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        Project { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file into the playbook folder.
    fn script_file(&self, name: &str, body: &str) -> String {
        let p = self.path("scripts").join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    }

    fn patchbook(&self, args: &[&str]) -> Output {
        let f = fleet();
        let mut cmd = support::patchbook_in(self.dir.path());
        cmd.arg("-v").args(args);
        if matches!(args.first(), Some(&"plan") | Some(&"run")) {
            cmd.args([
                "--param",
                &format!("deb={}", f.deb("1.0.1").display()),
                "--param",
                &format!("deb_sha={}", sha(&f.deb("1.0.1"))),
            ]);
        }
        cmd.output().expect("patchbook runs")
    }

    fn runs(&self) -> BTreeSet<String> {
        match std::fs::read_dir(self.path("state/runs")) {
            Err(_) => BTreeSet::new(),
            Ok(rd) => rd
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
                .collect(),
        }
    }

    /// `patchbook run PLAYBOOK`: its output and the id of the run it journaled.
    fn run(&self, playbook: &str) -> (Output, String) {
        let before = self.runs();
        let out = self.patchbook(&["run", playbook]);
        let new: Vec<String> = self.runs().difference(&before).cloned().collect();
        assert_eq!(new.len(), 1, "one new run: {:?}", text(&out));
        (out, new[0].clone())
    }

    /// The `step.intent` records of a run, as (step, input).
    fn intents(&self, run: &str) -> Vec<(String, serde_json::Value)> {
        let text =
            std::fs::read_to_string(self.path("state/runs").join(format!("{run}.jsonl"))).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "step.intent")
            .map(|r| {
                (
                    r["data"]["step"].as_str().unwrap().to_string(),
                    r["data"]["input"].clone(),
                )
            })
            .collect()
    }

    fn plan_ok(&self, playbook: &str) -> String {
        let before = self.runs();
        let out = self.patchbook(&["plan", playbook]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        assert_eq!(self.runs(), before, "plan wrote a journal:\n{stdout}");
        stdout
    }

    fn run_ok(&self, playbook: &str) -> (String, String) {
        let (out, run) = self.run(playbook);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        (run, stderr)
    }

    fn rollback_ok(&self, run: &str, host: &str) {
        let out = self.patchbook(&["rollback", run]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("{host}: rolled back")), "{stdout}");
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn owner_of(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

#[test]
fn put_file_plans_a_diff_writes_once_and_rolls_back_exactly() {
    let host = "lab01";
    let p = Project::new();
    let conf = on_host(host, "/etc/acme/agent.conf");
    // An owner that is not the connecting user: kept by number through the change
    // and the rollback.
    chown(&conf, 1234, 2345);
    let new_conf = "# acme-agent settings\ninterval = 30\ntls = on\n";
    p.script_file("agent.conf", new_conf);
    let pb = p.script_file(
        "put.rhai",
        r#"let h = hosts("lab01")[0];
let deb = artifact(param("deb"), #{ sha256: param("deb_sha") });
print(put_file(h, "agent.conf", "/etc/acme/agent.conf", #{ mode: "0600" }).detail);
print(put_file(h, deb, "/opt/acme/agent.deb", #{ owner: "nobody", group: "nogroup" }).detail);
"#,
    );
    let before = fingerprint(host);

    let plan = p.plan_ok(&pb);
    assert_eq!(fingerprint(host), before, "plan changed the host:\n{plan}");
    for want in [
        "lab01: would change",
        "would write /etc/acme/agent.conf (mode 0644 → 0600)",
        "--- /etc/acme/agent.conf",
        "+++ /etc/acme/agent.conf",
        "-interval = 60",
        "+interval = 30",
        "+tls = on",
        "would write /opt/acme/agent.deb (new file, mode 0644, owner nobody, group nogroup)",
        "binary content: 0 bytes",
    ] {
        assert!(plan.contains(want), "missing {want:?} in:\n{plan}");
    }
    assert!(!plan.contains("-# acme-agent settings"), "{plan}");

    let (run, _) = p.run_ok(&pb);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), new_conf);
    assert_eq!(mode_of(&conf), 0o600);
    assert_eq!(
        owner_of(&conf),
        (1234, 2345),
        "the owner was kept by number"
    );
    let deb = on_host(host, "/opt/acme/agent.deb");
    assert_eq!(sha(&deb), sha(&fleet().deb("1.0.1")));
    assert_eq!(owner_of(&deb), (65534, 65534));
    assert_eq!(mode_of(&deb), 0o644);
    let leftovers: Vec<_> = std::fs::read_dir(conf.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".patchbook"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    let intents = p.intents(&run);
    assert_eq!(intents.len(), 2, "{intents:?}");
    assert!(intents
        .iter()
        .all(|(s, i)| s == "put_file" && i["undo"]["kind"] == "file"));
    // The previous content is on the controller, private, content-addressed.
    let original = b"# acme-agent settings\ninterval = 60\n";
    let kept = p
        .path("state/files")
        .join(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            original,
        )));
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "# acme-agent settings\ninterval = 60\n"
    );
    assert_eq!(mode_of(&kept), 0o600);
    assert_eq!(mode_of(&p.path("state/files")), 0o700);

    let after = fingerprint(host);
    let (again, stderr) = p.run_ok(&pb);
    assert!(p.intents(&again).is_empty(), "{:?}", p.intents(&again));
    assert!(
        stderr.contains("no change: /etc/acme/agent.conf already has this content, mode and owner")
            && stderr.contains("no change: /opt/acme/agent.deb"),
        "{stderr}"
    );
    assert_eq!(fingerprint(host), after, "a second run changed the host");

    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
    assert!(!deb.exists(), "a file that did not exist is removed again");
}

#[test]
fn template_renders_plans_rolls_back_and_an_undefined_variable_touches_nothing() {
    let host = "lab02";
    let p = Project::new();
    p.script_file(
        "agent.conf.j2",
        "# {{ comment }}\ninterval = {{ interval }}\n{% for s in servers %}server = {{ s }}\n{% endfor %}",
    );
    let pb = p.script_file(
        "template.rhai",
        r#"let h = hosts("lab02")[0];
let vars = #{ comment: "managed by patchbook", interval: 15, servers: ["a.example", "b.example"] };
template(h, "agent.conf.j2", "/etc/acme/agent.conf", vars);
template(h, "agent.conf.j2", "/root/agent.conf", vars, #{ mode: "0640" });
"#,
    );
    let before = fingerprint(host);
    let plan = p.plan_ok(&pb);
    assert_eq!(fingerprint(host), before, "plan changed the host:\n{plan}");
    for want in [
        "-# acme-agent settings",
        "+# managed by patchbook",
        "-interval = 60",
        "+interval = 15",
        "+server = b.example",
        "would write /root/agent.conf (new file, mode 0640)",
        "--- /dev/null",
    ] {
        assert!(plan.contains(want), "missing {want:?} in:\n{plan}");
    }

    let (run, _) = p.run_ok(&pb);
    let rendered =
        "# managed by patchbook\ninterval = 15\nserver = a.example\nserver = b.example\n";
    assert_eq!(
        std::fs::read_to_string(on_host(host, "/etc/acme/agent.conf")).unwrap(),
        rendered
    );
    assert_eq!(
        std::fs::read_to_string(on_host(host, "/root/agent.conf")).unwrap(),
        rendered
    );
    assert_eq!(mode_of(&on_host(host, "/root/agent.conf")), 0o640);
    assert_eq!(p.intents(&run).len(), 2);

    let (again, stderr) = p.run_ok(&pb);
    assert!(p.intents(&again).is_empty());
    assert!(stderr.contains("no change: /root/agent.conf"), "{stderr}");

    // An undefined variable fails on the controller: no intent, no host change.
    let changed = fingerprint(host);
    let bad = p.script_file(
        "undefined.rhai",
        r#"let h = hosts("lab02")[0];
template(h, "agent.conf.j2", "/etc/acme/agent.conf", #{ comment: "x", interval: 1 });
"#,
    );
    let (out, failed) = p.run(&bad);
    let (stdout, stderr) = text(&out);
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let all = format!("{stdout}\n{stderr}");
    assert!(
        all.contains("lab02: template: agent.conf.j2") && all.contains("undefined"),
        "{all}"
    );
    assert!(p.intents(&failed).is_empty());
    assert_eq!(fingerprint(host), changed);

    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
}

#[test]
fn line_in_file_follows_lineinfile_rules_and_reverses_each_edit() {
    let host = "lab03";
    let p = Project::new();
    let pb = p.script_file(
        "lines.rhai",
        r#"let h = hosts("lab03")[0];
let f = "/etc/acme/agent.conf";
line_in_file(h, f, #{ regexp: "^interval\\s*=", line: "interval = 15" });
line_in_file(h, f, #{ line: "tls = on", after: "^# acme" });
line_in_file(h, f, #{ regexp: "^#", state: "absent" });
"#,
    );
    let before = fingerprint(host);
    let plan = p.plan_ok(&pb);
    assert_eq!(fingerprint(host), before, "plan changed the host:\n{plan}");
    for want in [
        "-interval = 60",
        "+interval = 15",
        "+tls = on",
        "-# acme-agent settings",
    ] {
        assert!(plan.contains(want), "missing {want:?} in:\n{plan}");
    }

    let (run, _) = p.run_ok(&pb);
    let conf = on_host(host, "/etc/acme/agent.conf");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "tls = on\ninterval = 15\n"
    );
    assert_eq!(mode_of(&conf), 0o644, "the file keeps its mode");
    assert_eq!(p.intents(&run).len(), 3);

    let (again, stderr) = p.run_ok(&pb);
    assert!(p.intents(&again).is_empty(), "{:?}", p.intents(&again));
    assert_eq!(
        stderr.matches("no change: /etc/acme/agent.conf").count(),
        3,
        "{stderr}"
    );
    let plan = p.plan_ok(&pb);
    assert!(plan.contains("lab03: would not change"), "{plan}");

    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
}

#[test]
fn remove_file_keeps_what_it_removed_and_rollback_puts_it_back() {
    let host = "lab04";
    let p = Project::new();
    let conf = on_host(host, "/etc/acme/agent.conf");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown(&conf, 4321, 4321);
    // Larger than one command's default output cap, binary.
    let big = on_host(host, "/opt/big.bin");
    let bytes: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(&big, &bytes).unwrap();
    let pb = p.script_file(
        "remove.rhai",
        r#"let h = hosts("lab04")[0];
print(remove_file(h, "/etc/acme/agent.conf").detail);
print(remove_file(h, "/root/never-there").detail);
print(remove_file(h, "/opt/big.bin").detail);
"#,
    );
    let before = fingerprint(host);
    let plan = p.plan_ok(&pb);
    assert_eq!(fingerprint(host), before);
    for want in [
        "would remove /etc/acme/agent.conf",
        "+++ /dev/null",
        "-interval = 60",
        "no change: /root/never-there does not exist",
    ] {
        assert!(plan.contains(want), "missing {want:?} in:\n{plan}");
    }

    let (run, _) = p.run_ok(&pb);
    assert!(!conf.exists() && !big.exists());
    assert_eq!(p.intents(&run).len(), 2);
    let (again, stderr) = p.run_ok(&pb);
    assert!(p.intents(&again).is_empty());
    assert!(
        stderr.contains("no change: /etc/acme/agent.conf does not exist"),
        "{stderr}"
    );

    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
    assert_eq!(mode_of(&conf), 0o600);
    assert_eq!(owner_of(&conf), (4321, 4321));
    assert!(std::fs::read(&big).unwrap() == bytes);
    std::fs::remove_file(big).unwrap();
}

#[test]
fn links_special_files_and_hostile_inputs_are_refused_before_any_change() {
    let host = "lab05";
    let p = Project::new();
    std::os::unix::fs::symlink("/etc/acme/agent.conf", on_host(host, "/root/conf-link")).unwrap();
    p.script_file("agent.conf", "interval = 5\n");
    p.script_file("agent.j2", "interval = {{ interval }}\n");
    let outside = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let huge = on_host(host, "/root/huge.conf");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let pb = p.script_file(
        "refused.rhai",
        &format!(
            r#"let h = hosts("lab05")[0];
let refused = 0;
let attempts = [
    || put_file(h, "agent.conf", "/root/conf-link"),
    || template(h, "agent.j2", "/root/conf-link", #{{ interval: 1 }}),
    || line_in_file(h, "/root/conf-link", #{{ line: "x = 1" }}),
    || remove_file(h, "/root/conf-link"),
    || put_file(h, "agent.conf", "/opt/acme"),
    || put_file(h, "agent.conf", "/etc/acme/../acme/agent.conf"),
    || put_file(h, "agent.conf", "/etc/acme/-x"),
    || put_file(h, "../agent.conf", "/root/x"),
    || put_file(h, "{outside}", "/root/x"),
    || put_file(h, "/etc/hostname", "/root/x"),
    || put_file(h, "agent.conf", "/root/x", #{{ mode: 0o644 }}),
    || put_file(h, "agent.conf", "/root/x", #{{ owner: "-r" }}),
    || line_in_file(h, "/etc/acme/agent.conf", #{{ regexp: "(", line: "x" }}),
    || line_in_file(h, "/etc/acme/agent.conf", #{{ line: "a\nb" }}),
    || line_in_file(h, "/root/missing.conf", #{{ line: "x = 1" }}),
    || line_in_file(h, "/root/huge.conf", #{{ line: "x = 1" }}),
];
for a in attempts {{
    try {{ a.call(); print("NOT REFUSED"); }} catch (e) {{ refused += 1; print(`REFUSED: ${{e}}`); }}
}}
print(`refused ${{refused}} of ${{attempts.len()}}`);
"#,
            outside = outside.path().display()
        ),
    );
    let before = fingerprint(host);
    let (run, stderr) = p.run_ok(&pb);
    assert!(stderr.contains("refused 16 of 16"), "{stderr}");
    assert!(!stderr.contains("NOT REFUSED"), "{stderr}");
    for want in [
        "it is a symbolic link to \"/etc/acme/agent.conf\"; give #{ follow: true }",
        "not a regular file",
        "`.` and `..` are not allowed",
        "would read as an option",
        "outside the playbook and library folders",
        "`mode` must be a string of octal digits",
        "not a usable regular expression",
        "a line has no newline",
        "does not exist; create it with put_file or template first",
        "/root/huge.conf is 17825792 bytes; file steps handle at most 16777216 bytes",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
    assert!(p.intents(&run).is_empty());
    assert_eq!(fingerprint(host), before, "a refused step changed the host");

    // With follow, the file the link points to changes and the link stays a link.
    let pb = p.script_file(
        "follow.rhai",
        r#"let h = hosts("lab05")[0];
put_file(h, "agent.conf", "/root/conf-link", #{ follow: true });
"#,
    );
    let (run, _) = p.run_ok(&pb);
    assert_eq!(
        std::fs::read_to_string(on_host(host, "/etc/acme/agent.conf")).unwrap(),
        "interval = 5\n"
    );
    let link = on_host(host, "/root/conf-link");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(p.intents(&run)[0].1["path"], "/etc/acme/agent.conf");
    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
    std::fs::remove_file(link).unwrap();
    std::fs::remove_file(huge).unwrap();

    // `check` knows the option keys.
    let typo = p.script_file(
        "typo.rhai",
        "let h = hosts(\"lab05\")[0];\nput_file(h, \"agent.conf\", \"/root/x\", #{ mdoe: \"0644\" });\n",
    );
    let out = p.patchbook(&["check", &typo]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("unknown option `mdoe` of `put_file`"),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn remediate_sets_keys_and_lines_once_and_rolls_back() {
    let host = "lab06";
    let p = Project::new();
    let pb = p.script_file(
        "remediate.rhai",
        r#"import "remediate" as fix;
let h = hosts("lab06")[0];
let f = "/etc/acme/agent.conf";
fix::set_config_key(h, f, "interval", 45);
fix::ensure_line(h, f, "tls = on");
fix::set_config_key(h, f, "log.level", "debug");
let refused = false;
try { fix::set_config_key(h, f, "a b", "x"); } catch (e) { refused = `${e}`.contains("refused key"); }
if !refused { throw "a key with a space was not refused"; }
"#,
    );
    let before = fingerprint(host);
    let plan = p.plan_ok(&pb);
    assert!(
        plan.contains("+interval = 45") && plan.contains("+tls = on"),
        "{plan}"
    );
    assert_eq!(fingerprint(host), before);

    let (run, _) = p.run_ok(&pb);
    assert_eq!(
        std::fs::read_to_string(on_host(host, "/etc/acme/agent.conf")).unwrap(),
        "# acme-agent settings\ninterval = 45\ntls = on\nlog.level = debug\n"
    );
    assert_eq!(p.intents(&run).len(), 3);
    let (again, _) = p.run_ok(&pb);
    assert!(p.intents(&again).is_empty());

    p.rollback_ok(&run, host);
    assert_eq!(fingerprint(host), before);
}

#[test]
fn docs_describe_every_file_primitive_overload() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::patchbook(["docs".as_ref(), "--out".as_ref(), dir.path().as_os_str()]);
    assert!(out.status.success(), "{:?}", text(&out));
    let defs =
        std::fs::read_to_string(dir.path().join(patchbook::script::docs::PRIMITIVES_FILE)).unwrap();
    let lines: Vec<&str> = defs.lines().collect();
    for (name, overloads) in [
        ("put_file", 2),
        ("template", 2),
        ("line_in_file", 1),
        ("remove_file", 2),
    ] {
        let at: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with(&format!("fn {name}(host: Host")))
            .collect();
        assert_eq!(at.len(), overloads, "{name}:\n{defs}");
        for i in at {
            assert!(
                i > 0 && lines[i - 1].starts_with("///"),
                "{} has no doc comment",
                lines[i]
            );
        }
    }
}
