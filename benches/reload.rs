//! Reload latency: a file saved → the new generation live, over 200 edits cycling
//! through the three save styles (in-place write, rename-over, vim's backup dance),
//! with the watcher's real debounce and quiet period. Prints p50, p99 and max.
//! Goal: p99 under 300 ms. Run with `cargo bench --bench reload`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbook::script::Compiler;
use patchbook::watch::{spawn_reloader, FileWatch, Inputs, ScriptLauncher, Service, WatchTiming};

const EDITS: usize = 200;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let scripts = dir.path().join("scripts");
    let stdlib = dir.path().join("stdlib/patch");
    std::fs::create_dir_all(&scripts).expect("scripts");
    std::fs::create_dir_all(&stdlib).expect("stdlib");
    std::fs::write(stdlib.join("util.rhai"), "fn twice(x) { x * 2 }\n").expect("module");
    // A realistic set: ten playbooks importing one module.
    for i in 0..10 {
        std::fs::write(
            scripts.join(format!("p{i}.rhai")),
            format!("import \"patch/util\" as u;\nlet x = u::twice({i});\nx\n"),
        )
        .expect("playbook");
    }
    let inputs = Inputs {
        playbook_dir: scripts.clone(),
        compiler: Compiler::new(Default::default(), vec![dir.path().join("stdlib")]),
    };
    let svc = Service::new(
        inputs.clone(),
        Arc::new(ScriptLauncher::new(Default::default())),
        patchbook::rollout::Clock::system(),
    );
    svc.reload(true);
    let timing = WatchTiming::default();
    let watch = FileWatch::start(&inputs.folders(), false, timing).expect("watch");
    let reloader = spawn_reloader(svc.clone(), watch, false).expect("reloader");

    let file = scripts.join("p0.rhai");
    let mut latencies = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let before = svc.live().map(|g| g.number).unwrap_or(0);
        let text = format!("import \"patch/util\" as u;\n// edit {i}\nlet x = u::twice({i});\nx\n");
        let t0 = Instant::now();
        match i % 3 {
            0 => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&file)
                    .expect("open");
                f.write_all(text.as_bytes()).expect("write");
            }
            1 => {
                let tmp = scripts.join(".p0.rhai.tmp");
                std::fs::write(&tmp, &text).expect("tmp");
                std::fs::rename(&tmp, &file).expect("rename");
            }
            _ => {
                let backup = scripts.join("p0.rhai~");
                std::fs::rename(&file, &backup).expect("backup");
                std::fs::write(&file, &text).expect("write");
                std::fs::remove_file(&backup).expect("remove backup");
            }
        }
        loop {
            if svc.live().map(|g| g.number).unwrap_or(0) > before {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                panic!("edit {i} did not go live within 5 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(t0.elapsed());
        // Let the next edit be a separate save, as an editor's would be.
        std::thread::sleep(Duration::from_millis(20));
    }
    svc.shutdown();
    let _ = reloader.join();
    latencies.sort();
    // A rank between 1 and len: `as` from a small non-negative float is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "reload latency over {EDITS} edits (debounce {} ms + quiet {} ms): p50 {} ms, p99 {} ms, max {} ms",
        timing.debounce.as_millis(),
        timing.quiet.as_millis(),
        pct(0.50).as_millis(),
        pct(0.99).as_millis(),
        latencies.last().map(|d| d.as_millis()).unwrap_or(0),
    );
}
