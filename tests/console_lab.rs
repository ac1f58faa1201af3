//! The deployment console of `patchbook watch` against a live run on real lab
//! hosts: six sshd hosts patched in three waves with a pause and a gate after
//! each. Headless Chromium loads the status page at two moments of the same run
//! (after the first wave and after the second); each time the counts, the waves
//! and the host lines it renders from the event stream match what the run's
//! journal says at that moment, and the controller's own figures (CPU, memory,
//! bytes sent and received, connections) are there and not zero.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbook::journal::entry::RolloutEvent;
use patchbook::journal::{read_records, Entry};
use serde_json::Value;
use support::watch::WatchProcess as Watch;
use support::{lab_project, patchbook_in, text, Lab};

/// Three waves of two hosts; each wave pauses (12 s unless `--param pause=`), then
/// a closure gate passes.
const FLEET: &str = r#"
rollout(hosts("all"), #{ waves: [2, 2, 2], parallel: 2, pause: param("pause", "12s"), gate: || true }, |h| {
    exec(h, ["sh", "-c", "head -c 20000 /dev/zero | od > /dev/null; true"]);
});
"#;

/// `patchbook watch --listen 127.0.0.1:0` in the project.
fn start_watch(dir: &Path) -> Watch {
    let mut cmd = patchbook_in(dir);
    cmd.args(["watch", "--listen", "127.0.0.1:0"])
        .current_dir(dir);
    Watch::start(cmd)
}

/// Polls the status until `f` holds of its console.
fn wait_console(watch: &Watch, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    watch.wait_status(Duration::from_secs(90), what, |s| f(&s["console"]))["console"].clone()
}

/// What the journal says at one moment.
#[derive(Debug, PartialEq, Default)]
struct FromJournal {
    targeted: usize,
    patched: usize,
    in_progress: usize,
    failed: usize,
    pending: usize,
    /// Host → its last step's name.
    last_step: std::collections::BTreeMap<String, String>,
    gates_passed: usize,
    usage_samples: usize,
}

fn from_journal(path: &Path) -> FromJournal {
    let mut j = FromJournal::default();
    let (mut started, mut ended) = (0, 0);
    for rec in read_records(path).unwrap() {
        match rec.entry().unwrap() {
            Entry::Rollout(RolloutEvent::RunStarted { targets, .. }) => j.targeted += targets,
            Entry::Rollout(RolloutEvent::HostStarted { .. }) => started += 1,
            Entry::Rollout(RolloutEvent::HostDone { .. }) => {
                ended += 1;
                j.patched += 1;
            }
            Entry::Rollout(
                RolloutEvent::HostFailed { .. } | RolloutEvent::HostUnreachable { .. },
            ) => {
                ended += 1;
                j.failed += 1;
            }
            Entry::Rollout(RolloutEvent::GateEvaluated(v)) if v.passed => j.gates_passed += 1,
            Entry::StepIntent(i) => {
                j.last_step.insert(rec.host.clone().unwrap(), i.step);
            }
            Entry::ControllerUsage(_) => j.usage_samples += 1,
            _ => {}
        }
    }
    j.in_progress = started - ended;
    j.pending = j.targeted - started;
    j
}

/// Headless Chromium on `url`, given time to open the page's event stream and
/// draw the first event before the DOM is taken; `?snapshot` ends that stream
/// after it, or the browser would wait for it to go quiet.
fn chromium(url: &str, extra: &[String]) -> String {
    let mut args = vec!["--virtual-time-budget=2000".to_string()];
    args.extend_from_slice(extra);
    support::headless_chromium(url, &args)
}

/// The console's part of the page as drawn (the page's script, which holds the
/// same markup as templates, left out).
fn console_part(page: &str) -> String {
    let from = page
        .find("<div id=\"console\"")
        .unwrap_or_else(|| panic!("no console: {page}"));
    let len = page[from..].find("<h2>").unwrap();
    page[from..from + len].to_string()
}

/// The number inside `<span id="ID">N</span>` or `<span id="ID">…<b>N</b>`.
fn number(dom: &str, id: &str) -> f64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let rest = &dom[at..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    let rest = rest.split_once("<b>").map_or(rest, |(_, r)| r);
    let end = rest.find('<').unwrap();
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("#{id} is not a number: {}", &rest[..end]))
}

/// Each host line's `data-state` and last step, as the page drew them.
fn host_lines(dom: &str) -> Vec<(String, String, String)> {
    dom.split("<span class=\"host ")
        .skip(1)
        .map(|chunk| {
            let attr = |name: &str| {
                let key = format!("{name}=\"");
                let from = chunk.find(&key).unwrap() + key.len();
                chunk[from..from + chunk[from..].find('"').unwrap()].to_string()
            };
            // The next cell is the last step.
            let step = chunk
                .split_once("</span></td><td>")
                .map(|(_, r)| r[..r.find('<').unwrap()].to_string())
                .unwrap();
            (attr("data-host"), attr("data-state"), step)
        })
        .collect()
}

/// One moment: the page's DOM and a screenshot, checked against the journal.
fn moment(watch: &Watch, journal: &Path, shot: &PathBuf, patched: usize) -> (String, FromJournal) {
    let url = format!("http://{}/?snapshot", watch.addr);
    let page = chromium(&url, &["--dump-dom".to_string()]);
    std::fs::write(shot.with_extension("html"), &page).unwrap();
    let dom = console_part(&page);
    let j = from_journal(journal);
    assert_eq!(j.patched, patched, "the run moved on: {j:?}");
    // Drawn from the event stream, not from a reload.
    assert!(number_attr(&dom, "data-updates") >= 1, "{dom}");
    for (id, want) in [
        ("c-targeted", j.targeted),
        ("c-patched", j.patched),
        ("c-in_progress", j.in_progress),
        ("c-failed", j.failed),
        ("c-pending", j.pending),
    ] {
        #[allow(clippy::cast_precision_loss)]
        let want = want as f64;
        assert!(
            (number(&dom, id) - want).abs() < f64::EPSILON,
            "#{id}: {j:?}\n{dom}"
        );
    }
    let lines = host_lines(&dom);
    assert_eq!(lines.len(), j.targeted, "{dom}");
    assert_eq!(
        lines.iter().filter(|(_, s, _)| s == "patched").count(),
        j.patched,
        "{dom}"
    );
    assert_eq!(
        lines.iter().filter(|(_, s, _)| s == "pending").count(),
        j.pending,
        "{dom}"
    );
    for (host, _, step) in &lines {
        assert_eq!(
            j.last_step.get(host).map_or("", String::as_str),
            step,
            "{host}'s last step"
        );
    }
    // Waves: three, the finished ones with a passed gate once it answered.
    assert_eq!(dom.matches("<span class=\"wave\"").count(), 3, "{dom}");
    assert_eq!(
        dom.matches("data-state=\"done\"").count(),
        patched / 2,
        "{dom}"
    );
    assert_eq!(
        dom.matches("<span class=\"ok\">passed</span>").count(),
        j.gates_passed,
        "{dom}"
    );
    assert!(dom.contains("pause 12 s"), "the pause timer: {dom}");
    // The controller watched itself: figures present and not zero.
    assert!(j.usage_samples >= 1, "{j:?}");
    for id in [
        "ctl-cpu",
        "ctl-rss",
        "ctl-sent",
        "ctl-received",
        "ctl-connections",
    ] {
        assert!(number(&dom, id) > 0.0, "#{id} is zero: {dom}");
    }
    chromium(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,1400".to_string(),
        ],
    );
    let bytes = std::fs::read(shot).expect("chromium wrote no screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(bytes.len() > 20_000, "screenshot of {} bytes", bytes.len());
    (dom, j)
}

fn number_attr(dom: &str, attr: &str) -> u64 {
    let key = format!("{attr}=\"");
    let from = dom.find(&key).unwrap_or_else(|| panic!("no {attr}: {dom}")) + key.len();
    dom[from..from + dom[from..].find('"').unwrap()]
        .parse()
        .unwrap()
}

#[test]
fn the_console_follows_a_live_run_in_headless_chromium() {
    let lab = Lab::start(6);
    let project = lab_project(&lab, "console-", "");
    let dir = project.path();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(dir.join("scripts/fleet.rhai"), FLEET).unwrap();
    let mut watch = start_watch(dir);
    let out = patchbook_in(dir)
        .args(["trigger", "fleet"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let first = wait_console(&watch, "the run's first record", |c| {
        c["run_id"].is_string()
    });
    let run = first["run_id"].as_str().unwrap().to_string();
    let journal = dir.join("state/runs").join(format!("{run}.jsonl"));

    // Moment 1: the first wave is done and the run pauses before the gate.
    wait_console(&watch, "the pause after the first wave", |c| {
        c["tally"]["patched"] == 2
            && c["waves"][0]["timers"]
                .as_array()
                .is_some_and(|t| !t.is_empty())
    });
    let (dom1, j1) = moment(&watch, &journal, &dir.join("console-1.png"), 2);
    assert_eq!(j1.pending, 4);

    // Moment 2, same run: the second wave is done too.
    wait_console(&watch, "the pause after the second wave", |c| {
        c["tally"]["patched"] == 4
            && c["waves"][1]["timers"]
                .as_array()
                .is_some_and(|t| !t.is_empty())
    });
    let (dom2, j2) = moment(&watch, &journal, &dir.join("console-2.png"), 4);
    assert_eq!(j2.pending, 2);
    assert!(number(&dom2, "ctl-cpu") >= number(&dom1, "ctl-cpu"));
    assert!(
        number(&dom2, "ctl-sent") > number(&dom1, "ctl-sent"),
        "the second wave sent more"
    );
    assert_ne!(host_lines(&dom1), host_lines(&dom2));
    // One run, seen twice.
    let run_attr = format!("data-run=\"{run}\"");
    assert!(dom1.contains(&run_attr) && dom2.contains(&run_attr));

    let done = wait_console(&watch, "the end of the run", |c| c["finished"] == true);
    assert_eq!(done["tally"]["patched"], 6);
    watch.stop();

    // The report sums the run's samples up, network included.
    let out = patchbook_in(dir)
        .args(["report", &run, "--format", "html"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let html = String::from_utf8_lossy(&out.stdout);
    for class in [
        "controller-sent",
        "controller-received",
        "controller-connections",
    ] {
        assert!(number_in_class(&html, class) > 0, "{class}: {html}");
    }

    // The progress line of a plain run carries the same figures.
    let out = patchbook_in(dir)
        .args(["run"])
        .arg(dir.join("scripts/fleet.rhai"))
        .args(["--param", "pause=1s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let progress = String::from_utf8_lossy(&out.stderr);
    let done_line = progress
        .lines()
        .find(|l| l.contains("run done:"))
        .unwrap_or_else(|| panic!("{progress}"));
    assert!(
        done_line.contains("| controller cpu ") && !done_line.contains(" 0 conns"),
        "{done_line}"
    );
}

fn number_in_class(html: &str, class: &str) -> u64 {
    let key = format!("class=\"{class}\">");
    let from = html.find(&key).unwrap_or_else(|| panic!("no {class}")) + key.len();
    html[from..from + html[from..].find('<').unwrap()]
        .parse()
        .unwrap()
}
