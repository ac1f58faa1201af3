//! Soak after the run, on real lab hosts: `patchbook watch` runs a playbook whose
//! rollout policy has a `soak` key (3 minutes of the test clock, run 20 times fast);
//! once the run is over the service samples both patched hosts on schedule. The test
//! then makes one host's log grow error lines: that host ends the soak `regressed`
//! and its owner gets exactly one mail through a real SMTP server; the other host
//! `passed`. The status page lists both, the soak's journal holds the samples, and
//! `audit verify` passes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use patchbook::journal::entry::NotifyRecord;
use patchbook::journal::{read_records, Entry};
use serde_json::Value;
use support::smtp::SmtpSink;
use support::watch::WatchProcess as Watch;
use support::{lab_project, patchbook_in, run_ids, text, Lab};

const PLAYBOOK: &str = r#"
let fresh = artifact(MIRROR + "/acme-agent_1.0.1_all.deb", #{ sha256: SHA_NEW });
let old = artifact(MIRROR + "/acme-agent_1.0.0_all.deb", #{ sha256: SHA_OLD });
rollout(hosts("lab01:lab02"), #{
    parallel: 2,
    soak: #{
        period: "3m", every: "15s", baseline: 1,
        logs: ["/opt/acme-agent.log"],
        thresholds: #{ error_rate: "2x" },
    },
}, |host| {
    let patch = || {
        deploy(host, fresh, #{ rollback_to: old });
        verify(host, "acme-agent", "1.0.1");
    };
    // lab01's soak starts from the baseline its run's monitor() took; lab02's
    // from samples of its own.
    if host.name == "lab01" {
        monitor(host, #{
            window: "30s", interval: "15s", baseline: 2,
            logs: ["/opt/acme-agent.log"], thresholds: #{ error_rate: "2x" },
        }, patch);
    } else {
        patch.call();
    }
});
"#;

/// `patchbook watch` in the project, on the test clock: a 3-minute soak sampled
/// every 15 s takes 9 real seconds, a sample every 0.75 s.
fn start_watch(dir: &std::path::Path) -> Watch {
    let mut cmd = patchbook_in(dir);
    cmd.args(["watch", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("PATCHBOOK_LOG", "info")
        .env("PATCHBOOK_NOW", "2026-12-05T02:00:00Z")
        .env("PATCHBOOK_CLOCK_SPEED", "20");
    Watch::start(cmd)
}

fn row<'a>(status: &'a Value, host: &str) -> Option<&'a Value> {
    status["soak"]
        .as_array()?
        .iter()
        .find(|r| r["host"] == host)
}

#[test]
fn a_host_that_regresses_during_its_soak_is_reported_to_its_owner_once() {
    let lab = Lab::start(2);
    let smtp = SmtpSink::start(None);
    let project = lab_project(&lab, "soak-", "");
    let dir = project.path();

    // lab02 has an owner of its own, so the mail shows whose host regressed.
    let inventory = std::fs::read_to_string(lab.dir().join("inventory.toml")).unwrap();
    let (head, tail) = inventory.split_once("[hosts.lab02]").unwrap();
    let inventory = format!(
        "{head}[hosts.lab02]{}",
        tail.replacen("ops@example.com", "lab02-owner@example.com", 1)
    );
    std::fs::write(dir.join("inventory.toml"), inventory).unwrap();
    let config = std::fs::read_to_string(dir.join("patchbook.toml"))
        .unwrap()
        .replace(
            &lab.dir().join("inventory.toml").display().to_string(),
            &dir.join("inventory.toml").display().to_string(),
        );
    std::fs::write(
        dir.join("patchbook.toml"),
        format!(
            "{config}\n[notify]\ncontacts_channel = \"mail\"\nretries = 1\nbackoff = \"20ms\"\n\
             [notify.channels.mail]\ntype = \"smtp\"\nserver = \"127.0.0.1\"\nport = {}\n\
             starttls = false\nfrom = \"patchbook@example.com\"\n",
            smtp.port
        ),
    )
    .unwrap();

    // The service passes no --param: the playbook carries its values.
    let sha = |v: &str| {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(lab.deb(v)).unwrap()))
    };
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(
        dir.join("scripts/soak.rhai"),
        PLAYBOOK
            .replace(
                "MIRROR",
                &format!("{:?}", lab.dir().join("debs").display().to_string()),
            )
            .replace("SHA_NEW", &format!("{:?}", sha("1.0.1")))
            .replace("SHA_OLD", &format!("{:?}", sha("1.0.0"))),
    )
    .unwrap();

    let mut watch = start_watch(dir);
    let t0 = Instant::now();
    loop {
        let out = patchbook_in(dir)
            .args(["trigger", "soak"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "trigger: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Both hosts are soaking and judged against their baseline; then lab02's
    // application starts logging errors.
    watch.wait_status(Duration::from_secs(60), "both hosts soaking", |s| {
        ["lab01", "lab02"]
            .iter()
            .all(|h| row(s, h).is_some_and(|r| r["samples"].as_u64() >= Some(1)))
    });
    let log = lab.host("lab02").unwrap().dir.join("opt/acme-agent.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    for _ in 0..5 {
        writeln!(f, "ERROR acme-agent: cannot bind 0.0.0.0:8443").unwrap();
    }
    drop(f);

    // lab02 shows `regressed` as soon as it is seen, lab01 `soaking` until the
    // period is over.
    let status = watch.wait_status(Duration::from_secs(30), "both soaks over", |s| {
        s["soak"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|r| r["verdict"] != "soaking"))
    });
    let (r1, r2) = (
        row(&status, "lab01").unwrap(),
        row(&status, "lab02").unwrap(),
    );
    assert_eq!(r1["verdict"], "passed", "{status:#}");
    assert_eq!(r2["verdict"], "regressed", "{status:#}");
    assert!(
        r2["regressions"][0]
            .as_str()
            .unwrap()
            .starts_with("error_rate"),
        "{status:#}"
    );
    assert_eq!(r1["run"], r2["run"]);
    assert!(
        r1["until"].is_string() && r1["samples"].as_u64() >= Some(3),
        "{status:#}"
    );
    let page = watch.get("/");
    assert!(page.contains("Hosts under soak"), "{page}");

    // Exactly one mail, to lab02's owner.
    let mails = smtp.wait_for(1);
    std::thread::sleep(Duration::from_millis(300));
    let mails_now = smtp.mails();
    assert_eq!(mails_now.len(), 1, "{mails:#?}");
    let m = &mails_now[0];
    assert_eq!(m.rcpt_tos, ["lab02-owner@example.com"]);
    assert!(m.subject.contains("lab02 regressed"), "{}", m.subject);
    assert!(m.body.contains("error_rate"), "{}", m.body);

    watch.stop();

    // The run planned the soak; the soak's own journal holds its samples and
    // verdicts, and the delivery.
    let state = dir.join("state");
    let run = r1["run"].as_str().unwrap();
    let run_records = read_records(&state.join("runs").join(format!("{run}.jsonl"))).unwrap();
    let planned: Vec<_> = run_records
        .iter()
        .filter_map(|r| match r.entry().unwrap() {
            Entry::SoakPlanned(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0].hosts.len(), 2, "{planned:?}");
    assert_eq!(planned[0].period_seconds, 180.0);
    assert_eq!(planned[0].every_seconds, 15.0);
    let soak_id = format!("{run}-soak");
    assert!(run_ids(&state).contains(&soak_id), "{:?}", run_ids(&state));
    let records = read_records(&state.join("runs").join(format!("{soak_id}.jsonl"))).unwrap();
    let mut samples = std::collections::BTreeMap::<String, usize>::new();
    let mut ended = std::collections::BTreeMap::new();
    let mut started = 0;
    let mut delivered = Vec::new();
    for r in &records {
        match r.entry().unwrap() {
            Entry::MonitorSample(s) if s.phase == "soak" => {
                *samples.entry(r.host.clone().unwrap()).or_default() += 1;
            }
            Entry::SoakStarted(s) => {
                assert_eq!(s.run, run);
                assert_eq!(s.baseline["error_rate"], 0.0, "{s:?}");
                let want = if r.host.as_deref() == Some("lab01") {
                    "run"
                } else {
                    "soak"
                };
                assert_eq!(s.baseline_from, want, "{:?}: {s:?}", r.host);
                started += 1;
            }
            Entry::SoakEnded(e) => {
                ended.insert(r.host.clone().unwrap(), e);
            }
            Entry::Notify(n) => delivered.push(n),
            _ => {}
        }
    }
    assert_eq!(started, 2);
    for h in ["lab01", "lab02"] {
        assert!(
            samples.get(h).copied().unwrap_or(0) >= 3,
            "{h}: {samples:?}"
        );
        assert_eq!(ended[h].samples, samples[h] as u64, "{h}");
    }
    assert_eq!(ended["lab01"].verdict, "passed");
    // The healthy host was watched for the whole period of the test clock.
    let until: chrono::DateTime<chrono::Utc> = r1["until"].as_str().unwrap().parse().unwrap();
    assert!(
        ended["lab01"].at >= until,
        "{:?} before {until}",
        ended["lab01"].at
    );
    assert_eq!(ended["lab02"].verdict, "regressed");
    assert_eq!(
        records.last().unwrap().kind,
        "run.close",
        "the soak journal is closed"
    );
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    match &delivered[0] {
        NotifyRecord::Delivery(d) => {
            assert!(d.ok, "{d:?}");
            assert_eq!(d.to, "lab02-owner@example.com");
        }
        other => panic!("{other:?}"),
    }

    let out = patchbook_in(dir)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&soak_id), "{}", text(&out));
}
