//! Guard for DESIGN.md rule 3: journal records are read through the typed
//! `journal::Entry`, never by string keys or kind-string comparisons.
//!
//! A text scan of the readers' sources (their test modules excluded, where building
//! odd records by hand is the point). The patterns are the ways a record used to be
//! read before it was typed; a line that really needs one of them belongs in
//! `src/journal/entry.rs`, next to the record type.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::path::{Path, PathBuf};

/// Folders and files whose code reads journal records.
const READERS: &[&str] = &[
    "src/report",
    "src/journal/state.rs",
    "src/journal/audit.rs",
    "src/cli",
    "src/watch",
    "src/primitives",
    "src/run",
    "src/script",
];

/// Record-reading patterns that bypass the types.
const FORBIDDEN: &[&str] = &[
    ".data.get(",
    "data.get(\"",
    ".data[",
    ".kind == ",
    ".kind != ",
    "kind.as_str()",
    "r.kind ==",
    "rec.kind ==",
];

/// A kind constant used to pick records: a match arm or a comparison.
fn matches_on_kind_constant(line: &str) -> bool {
    let t = line.trim_start();
    line.contains("kind::") && (line.contains("=>") || line.contains("==") || t.starts_with('|'))
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            rust_files(&p, out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The file's code before its `#[cfg(test)]` module.
fn code_without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn readers_use_typed_entries_not_string_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for r in READERS {
        rust_files(&root.join(r), &mut files);
    }
    assert!(files.len() > 10, "the scan found too few files: {files:?}");
    let mut hits = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in code_without_tests(&text).lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for p in FORBIDDEN {
                if line.contains(p) {
                    hits.push(format!("{rel}:{}: `{p}` in {}", n + 1, line.trim()));
                }
            }
            if matches_on_kind_constant(line) {
                hits.push(format!("{rel}:{}: kind constant in {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "journal records read by string key or kind string; match on `journal::Entry` \
         (`record.entry()`) instead:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_crate_writes_records_only_as_typed_entries() {
    // Outside the journal, a record is written through `append_entry`/`note_entry`
    // (or a typed helper such as `host_finished`), never as a kind string and a
    // JSON value.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut hits = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("src/journal/") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in code_without_tests(&text).lines().enumerate() {
            for p in [".note(", "j.append(", "journal.append("] {
                if line.contains(p) {
                    hits.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "records written untyped; use Journal::append_entry / note_entry:\n{}",
        hits.join("\n")
    );
}

#[test]
fn every_written_kind_is_a_typed_entry() {
    // Kinds the crate writes by name anywhere (the script layer still does) must
    // all be typed, so readers never meet them as `Entry::Unknown`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let kinds = patchbook::journal::Entry::KINDS;
    let mut untyped = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let code = code_without_tests(&text);
        for call in [".note(", ".append(", "c.record(", "self.record("] {
            for (i, _) in code.match_indices(call) {
                // The kind is the first string literal among the call's first
                // arguments: `j.note(host, "kind", data)`.
                let rest = &code[i + call.len()..];
                let head = &rest[..rest.len().min(120)];
                let Some(open) = head.find('"') else { continue };
                let Some(len) = head[open + 1..].find('"') else {
                    continue;
                };
                let kind = &head[open + 1..open + 1 + len];
                let before = &head[..open];
                // Only the first or second argument: a literal further in is data.
                if before.matches(',').count() > 1 || before.contains('(') {
                    continue;
                }
                if !kind.is_empty() && !kinds.contains(&kind) {
                    untyped.push(format!("{}: `{kind}`", f.display()));
                }
            }
        }
    }
    assert!(
        untyped.is_empty(),
        "kinds written without an `Entry` variant; add one in src/journal/entry.rs:\n{}",
        untyped.join("\n")
    );
}
