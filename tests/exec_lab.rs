//! `patchbook exec` over SSH on a 20-host lab: every host answers through strict
//! host-key checking, and a dead host fails alone (reported unreachable) with exit
//! code 1.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use serde_json::Value;

fn exec_json(lab: &support::Lab, snippet: &str) -> (Option<i32>, Vec<Value>, String) {
    let cfg = lab.dir().join("patchbook.toml");
    let out = support::patchbook([
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "exec",
        "all",
        snippet,
    ]);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        out.status.code(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_reads_the_version_from_every_host_and_a_dead_host_fails_alone() {
    let lab = support::Lab::start(20);
    let snippet = r#"probe(host, ["dpkg-query", "-W", "-f=${Version}", "acme-agent"]).stdout"#;
    let (code, lines, err) = exec_json(&lab, snippet);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(lines.len(), 20);
    for l in &lines {
        assert_eq!(l["ok"], true, "{l}");
        assert_eq!(l["value"], "1.0.0", "{l}");
    }

    lab.kill_host("lab07").unwrap();
    let (code, lines, err) = exec_json(&lab, snippet);
    assert_eq!(code, Some(1), "{err}");
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] == false).collect();
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert_eq!(failed[0]["host"], "lab07");
    // Dead, not failing: told apart from a host whose command failed.
    assert_eq!(failed[0]["unreachable"], true, "{lines:?}");
    assert!(err.contains("1 of 20 hosts unreachable: lab07"), "{err}");
    assert_eq!(lines.iter().filter(|l| l["value"] == "1.0.0").count(), 19);
}
