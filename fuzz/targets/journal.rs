//! The journal reader and `audit verify`. The input is a run file, then a NUL
//! byte, then the audit index. Its first byte picks a mode: bit 0 re-chains both
//! files (every parseable line gets the right `prev` and `hash`), so that the
//! checks behind the hash chain are reached too; bit 1 verifies against a fixed
//! verify key, and with re-chaining signs each index entry with it. Reading and
//! verifying must never panic, and a re-chained run must not read as tampered for
//! a broken chain.
use patchbook::journal::anchor::Signer;
use patchbook::journal::audit::{self, VerifyOptions};
use patchbook::journal::index::{IndexEntry, INDEX_FILE};
use patchbook::journal::{read_records, Record, GENESIS};

const RUN: &str = "20260101T000000Z-fuzz";

/// Gives each line that parses as `T` the chain `fix` computes; other lines stay.
fn rechain<T: serde::de::DeserializeOwned + serde::Serialize>(
    text: &str,
    mut fix: impl FnMut(&mut T),
) -> String {
    let mut out = String::new();
    for line in text.lines() {
        match serde_json::from_str::<T>(line) {
            Ok(mut item) => {
                fix(&mut item);
                out.push_str(&serde_json::to_string(&item).unwrap());
            }
            Err(_) => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn main() {
    let signer = Signer::from_seed([7; 32]);
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let (run, index) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        // Unchanged files keep the name their first record gives the run, so the
        // index and the file refer to each other as in a real state directory.
        let named = String::from_utf8_lossy(run)
            .lines()
            .find_map(|l| serde_json::from_str::<Record>(l).ok())
            .map(|r| r.run)
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let name = match &named {
            Some(n) if mode & 1 == 0 => n.as_str(),
            _ => RUN,
        };
        let run_path = runs.join(format!("{name}.jsonl"));
        if mode & 1 == 1 {
            let mut prev = GENESIS.to_string();
            let run_text = rechain::<Record>(&String::from_utf8_lossy(run), |r| {
                r.run = RUN.into();
                r.prev = prev.clone();
                r.hash = r.compute_hash();
                prev = r.hash.clone();
            });
            let mut prev = GENESIS.to_string();
            let index_text = rechain::<IndexEntry>(&String::from_utf8_lossy(index), |e| {
                e.run = RUN.into();
                e.prev = prev.clone();
                e.hash = e.compute_hash();
                if mode & 2 == 2 {
                    e.sig = Some(signer.sign_index(&e.hash));
                }
                prev = e.hash.clone();
            });
            std::fs::write(&run_path, run_text).unwrap();
            std::fs::write(dir.path().join(INDEX_FILE), index_text).unwrap();
        } else {
            std::fs::write(&run_path, run).unwrap();
            if !index.is_empty() {
                std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
            }
        }
        if let Ok(records) = read_records(&run_path) {
            for r in &records {
                let _ = r.entry();
                let _ = r.compute_hash();
            }
        }
        let opts = VerifyOptions {
            key: (mode & 2 == 2).then(|| signer.verify_key()),
            ..VerifyOptions::default()
        };
        if let Ok(report) = audit::verify_with(dir.path(), None, &opts) {
            let _ = report.intact();
            let _ = report.run(name);
        }
        let _ = audit::verify_with(dir.path(), Some(name), &opts);
    });
}
