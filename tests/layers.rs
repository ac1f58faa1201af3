//! The layer guard: no import circle among the top-level modules of `src/`.
//!
//! Every `src/**/*.rs` file belongs to one top-level module (`src/foo.rs` and
//! `src/foo/**` to `foo`; `lib.rs` and `main.rs` to none). The scan collects the
//! modules each file names through `crate::x`, `use crate::{x, y::z}` groups and
//! `super::…` paths that climb to the crate root, with comments and string literals
//! blanked first, and fails on any cycle in the resulting graph, printing it as
//! `a → b → c → a` with one file:line per edge. It also holds the layer table in
//! `src/lib.rs`'s doc comment to the code: every module has a row, and a module
//! names only modules in rows below its own.
//!
//! It is a text scan on purpose: std only, no parser dependency, and fast enough
//! to run with every `cargo test`. It reads the sources only and must not use the
//! crate's own types, so the guard never depends on what it guards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where one edge was seen first: file (relative to the crate root) and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Site {
    file: String,
    line: usize,
}

/// Module → module it names → first place it does so.
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

// ---------------------------------------------------------------------------
// Blanking comments and literals

/// `text` with every comment, string literal and char literal replaced by spaces.
/// Newlines stay, so line numbers still match the file. Handles nested block
/// comments, escapes, raw strings (`r#"…"#`), byte strings and lifetimes (which
/// are not char literals).
fn blank(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let n = c.len();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    // Pushes a blanked run, keeping the newlines.
    let blank_run = |out: &mut String, run: &[char]| {
        for &ch in run {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < n {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        // Line comment (`//`, `///`, `//!`): up to the newline.
        if ch == '/' && next == Some('/') {
            let end = (i..n).find(|&j| c[j] == '\n').unwrap_or(n);
            blank_run(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        // Block comment, nested as Rust allows.
        if ch == '/' && next == Some('*') {
            let mut depth = 0usize;
            let mut j = i;
            while j < n {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            let end = j.min(n);
            blank_run(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        let starts_token = i == 0 || !ident(c[i - 1]);
        // Raw strings: `r"…"`, `r#"…"#`, `br#"…"#`; no escapes inside.
        if starts_token && (ch == 'r' || (ch == 'b' && next == Some('r'))) {
            let mut j = if ch == 'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while j < n && c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            if j < n && c[j] == '"' {
                let mut k = j + 1;
                let end = loop {
                    if k >= n {
                        break n;
                    }
                    if c[k] == '"' && (0..hashes).all(|h| c.get(k + 1 + h) == Some(&'#')) {
                        break k + 1 + hashes;
                    }
                    k += 1;
                };
                blank_run(&mut out, &c[i..end]);
                i = end;
                continue;
            }
        }
        // Ordinary and byte strings (a `b` prefix is an identifier char and has
        // already been copied).
        if ch == '"' {
            let mut k = i + 1;
            while k < n && c[k] != '"' {
                k += if c[k] == '\\' { 2 } else { 1 };
            }
            let end = (k + 1).min(n);
            blank_run(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        // Char literals; a quote followed by an identifier and no closing quote
        // is a lifetime or a label and stays.
        if ch == '\'' {
            let end = if next == Some('\\') {
                // Skip the escaped char itself: `'\''` ends at the third quote.
                (i + 3..n).find(|&k| c[k] == '\'').map(|k| k + 1)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            if let Some(end) = end {
                blank_run(&mut out, &c[i..end]);
                i = end;
                continue;
            }
        }
        out.push(ch);
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Tokens and paths

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Open,
    Close,
    Comma,
    Semi,
    Other,
}

/// Tokens of blanked text, each with its 1-based line.
fn tokens(text: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' {
            // `r#type` is a raw identifier: the name is `type`.
            if ch == 'r'
                && c.get(i + 1) == Some(&'#')
                && c.get(i + 2).is_some_and(|d| d.is_alphabetic() || *d == '_')
            {
                i += 2;
            }
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(c[start..i].iter().collect()), line));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((
                match ch {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    ';' => Tok::Semi,
                    _ => Tok::Other,
                },
                line,
            ));
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// The first segments of the items of a `{ … }` use group whose `{` is at
/// `open`: `{a::b, c, d::{e, f}}` gives `a`, `c`, `d` with their lines.
fn group_heads(toks: &[(Tok, usize)], open: usize) -> Vec<(String, usize)> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_item_start = true;
    for (tok, line) in &toks[open..] {
        match tok {
            Tok::Open => {
                depth += 1;
                if depth == 1 {
                    at_item_start = true;
                }
            }
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            Tok::Comma if depth == 1 => at_item_start = true,
            Tok::Semi => break,
            Tok::Ident(name) if depth == 1 && at_item_start => {
                heads.push((name.clone(), *line));
                at_item_start = false;
            }
            _ => {
                if depth == 1 {
                    at_item_start = false;
                }
            }
        }
    }
    heads
}

/// The top-level modules one file names, with the line of each mention.
///
/// `depth` is how deep the file's own module sits below the crate root: 1 for
/// `src/foo.rs` and `src/foo/mod.rs`, 2 for `src/foo/bar.rs`, and so on. Inline
/// `mod name { … }` blocks add to it, so `super::` inside `mod tests` of
/// `src/foo.rs` stays in `foo` while `super::x` at the top of `src/foo.rs` means
/// the crate's module `x`.
fn references(text: &str, depth: usize) -> Vec<(String, usize)> {
    let toks = tokens(&blank(text));
    let mut found = Vec::new();
    // Brace depths at which an inline module body opened.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Open => {
                braces += 1;
                let is_mod_body = i >= 2
                    && ident(toks.get(i - 2)) == Some("mod")
                    && ident(toks.get(i - 1)).is_some();
                if is_mod_body {
                    inline_mods.push(braces);
                }
            }
            Tok::Close => {
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
                braces = braces.saturating_sub(1);
            }
            Tok::Ident(w) if w == "crate" || w == "super" => {
                // A path segment only counts at the start of a path: `a::super`
                // cannot occur, and `x::crate` neither.
                let after_path = i > 0 && toks[i - 1].0 == Tok::Path;
                let mut j = i;
                let mut climbs = 0;
                let mut to_root = w == "crate";
                if w == "super" {
                    while ident(toks.get(j)) == Some("super")
                        && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Path)
                    {
                        climbs += 1;
                        j += 2;
                    }
                    to_root = climbs > 0 && climbs >= depth + inline_mods.len();
                    // `super::` past the root is a compile error; no need to judge it.
                    j = j.saturating_sub(1);
                } else {
                    j += 1;
                }
                // `j` is now at the `::` after the last `crate`/`super` (if any).
                if to_root && !after_path && toks.get(j).map(|t| &t.0) == Some(&Tok::Path) {
                    match toks.get(j + 1) {
                        Some((Tok::Ident(name), line)) => found.push((name.clone(), *line)),
                        Some((Tok::Open, _)) => found.extend(group_heads(&toks, j + 1)),
                        _ => {}
                    }
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

// ---------------------------------------------------------------------------
// The graph

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module of a file below `src/` and how deep the file's module sits,
/// or `None` for the crate roots.
fn module_of(rel: &Path) -> Option<(String, usize)> {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let first = parts.first()?;
    if parts.len() == 1 {
        if first == "lib.rs" || first == "main.rs" {
            return None;
        }
        return Some((first.trim_end_matches(".rs").to_string(), 1));
    }
    let last = parts.last()?;
    // `src/foo/mod.rs` is `foo` itself; `src/foo/bar.rs` is `foo::bar`;
    // `src/foo/bar/mod.rs` is `foo::bar` too.
    let depth = if last == "mod.rs" {
        parts.len() - 1
    } else {
        parts.len()
    };
    Some((first.clone(), depth))
}

/// Builds the graph from `(module, depth, file, text)` entries.
fn graph_of(files: &[(String, usize, String, String)]) -> Graph {
    let modules: BTreeSet<&str> = files.iter().map(|f| f.0.as_str()).collect();
    let mut graph: Graph = BTreeMap::new();
    for (module, depth, file, text) in files {
        let edges = graph.entry(module.clone()).or_default();
        for (target, line) in references(text, *depth) {
            if target != *module && modules.contains(target.as_str()) {
                edges.entry(target).or_insert_with(|| Site {
                    file: file.clone(),
                    line,
                });
            }
        }
    }
    graph
}

fn crate_graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        let rel = path.strip_prefix(&src).expect("below src");
        let Some((module, depth)) = module_of(rel) else {
            continue;
        };
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        files.push((module, depth, shown, text));
    }
    graph_of(&files)
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// A shortest cycle through `start` inside `comp`, found breadth-first, as
/// `[start, …, start]`.
fn cycle_through(graph: &Graph, comp: &[String], start: &str) -> Vec<String> {
    let inside: BTreeSet<&str> = comp.iter().map(String::as_str).collect();
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    path.push(at.to_string());
                    at = came_from[at];
                }
                path.push(start.to_string());
                path.reverse();
                return path;
            }
            if !came_from.contains_key(w) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    vec![start.to_string()]
}

/// The failure text for the circles in `graph`, or `None` when there are none.
/// Each entangled group shows a shortest cycle through each of its modules (the
/// same cycle once), so every edge to cut is in view.
fn describe_circles(graph: &Graph) -> Option<String> {
    let comps = circles(graph);
    if comps.is_empty() {
        return None;
    }
    let mut msg = String::from("import circles among the top-level modules of src/:\n");
    for comp in comps {
        msg.push_str(&format!("\n  entangled: {}\n", comp.join(", ")));
        let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
        for start in &comp {
            let cycle = cycle_through(graph, &comp, start);
            // The same cycle seen from another module: compare a canonical rotation.
            let ring = &cycle[..cycle.len() - 1];
            let least = (0..ring.len()).min_by_key(|&k| &ring[k]).unwrap_or(0);
            let canon: Vec<String> = ring[least..]
                .iter()
                .chain(&ring[..least])
                .cloned()
                .collect();
            if !seen.insert(canon) {
                continue;
            }
            msg.push_str(&format!("\n  {}\n", cycle.join(" → ")));
            for pair in cycle.windows(2) {
                let site = &graph[&pair[0]][&pair[1]];
                msg.push_str(&format!(
                    "    {} → {}: {}:{}\n",
                    pair[0], pair[1], site.file, site.line
                ));
            }
        }
    }
    msg.push_str(
        "\nMove the shared type down to the lower module, or pass it in, so one direction remains.\n",
    );
    Some(msg)
}

/// The modules of the layer table in `lib.rs`'s doc comment, highest first: the
/// rows that start with ``//! | [`name`]``.
fn table_order(lib_rs: &str) -> Vec<String> {
    lib_rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("//! | [`"))
        .filter_map(|rest| rest.split_once("`]").map(|(name, _)| name.to_string()))
        .collect()
}

/// Edges that point up the table (or name a module without a row), as text.
fn against_table(graph: &Graph, order: &[String]) -> Vec<String> {
    let row = |m: &str| order.iter().position(|o| o == m);
    let mut bad = Vec::new();
    for m in graph.keys() {
        if row(m).is_none() {
            bad.push(format!("{m} has no row in the table"));
        }
    }
    for (from, edges) in graph {
        for (to, site) in edges {
            if let (Some(a), Some(b)) = (row(from), row(to)) {
                if a >= b {
                    bad.push(format!(
                        "{from} → {to} points up the table: {}:{}",
                        site.file, site.line
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn no_import_circle_among_top_level_modules() {
    let graph = crate_graph();
    assert!(
        graph.len() > 5,
        "the scan found only {:?}; is it reading src/?",
        graph.keys().collect::<Vec<_>>()
    );
    // The graph itself, for whoever runs this with --nocapture.
    for (from, edges) in &graph {
        let to: Vec<&str> = edges.keys().map(String::as_str).collect();
        println!("{from} → {}", to.join(", "));
    }
    if let Some(msg) = describe_circles(&graph) {
        panic!("{msg}");
    }
}

#[test]
fn lib_rs_layer_table_matches_the_imports() {
    let lib_rs = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let text = std::fs::read_to_string(&lib_rs).expect("src/lib.rs");
    let order = table_order(&text);
    let bad = against_table(&crate_graph(), &order);
    assert!(
        bad.is_empty(),
        "the layer table in src/lib.rs ({}) does not match the code:\n  {}\n\
         Add the module's row, or move the row (or the import) so that every module \
         names only modules below it.",
        order.join(" > "),
        bad.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The scanner itself, so the guard can fail

fn names(text: &str, depth: usize) -> Vec<String> {
    let mut v: Vec<String> = references(text, depth).into_iter().map(|r| r.0).collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn scanner_reads_grouped_multi_line_use() {
    let text = "use std::fmt;\nuse crate::{\n    config::{Config, ConfigError},\n    journal,\n    transport::{self, ssh::SshConnector},\n};\n";
    assert_eq!(names(text, 1), ["config", "journal", "transport"]);
    let lines: Vec<usize> = references(text, 1).into_iter().map(|r| r.1).collect();
    assert_eq!(lines, [3, 4, 5]);
}

#[test]
fn scanner_reads_paths_in_code() {
    let text = "fn f() -> crate::journal::Journal {\n    let x = crate::runtime::login_name();\n    g::<crate::inventory::Host>(x)\n}\n";
    assert_eq!(names(text, 2), ["inventory", "journal", "runtime"]);
    assert_eq!(references(text, 2)[1], ("runtime".to_string(), 2));
}

#[test]
fn scanner_ignores_comments_and_literals() {
    let text = r####"
// use crate::runtime::Runtime;
/// See [`crate::watch::Service`].
//! crate::report
/* use crate::cli; /* nested crate::lab */ still crate::rollout */
let s = "crate::script::x";
let r = r#"use crate::primitives; "quoted" "#;
let c = '"'; let q = '\''; fn f<'a>(x: &'a str) -> &'a str { x }
let b = b"crate::journal";
use crate::inventory::Host;
"####;
    assert_eq!(names(text, 1), ["inventory"]);
    assert_eq!(references(text, 1)[0].1, 10);
}

#[test]
fn scanner_resolves_super_by_depth() {
    // Directly under src/, `super` is the crate root.
    assert_eq!(names("use super::config::Config;", 1), ["config"]);
    assert_eq!(
        names("use super::{journal, config};", 1),
        ["config", "journal"]
    );
    // Inside `mod tests` of such a file, `super` is the file's own module...
    assert!(names("mod tests { use super::*; use super::config; }", 1).is_empty());
    // ...and `super::super` climbs out again.
    assert_eq!(
        names("mod tests { use super::super::journal; }", 1),
        ["journal"]
    );
    // One level down, `super` is the parent module, not the root.
    assert!(names("use super::quote;", 2).is_empty());
    assert_eq!(
        names("use super::super::inventory::Host;", 2),
        ["inventory"]
    );
    // After an inline module closes, depth is back.
    assert_eq!(
        names("mod a { fn f() {} }\nuse super::report;", 1),
        ["report"]
    );
}

#[test]
fn cycle_is_reported_with_sites() {
    let files = vec![
        ("a".into(), 1, "src/a.rs".into(), "use crate::b::X;".into()),
        (
            "b".into(),
            1,
            "src/b.rs".into(),
            "\nfn f() { crate::c::g() }".into(),
        ),
        (
            "c".into(),
            1,
            "src/c.rs".into(),
            "use crate::{\n  a,\n};".into(),
        ),
        ("d".into(), 1, "src/d.rs".into(), "use crate::a;".into()),
    ];
    let graph = graph_of(&files);
    let msg = describe_circles(&graph).expect("a → b → c → a is a circle");
    assert!(msg.contains("a → b → c → a"), "{msg}");
    assert!(msg.contains("a → b: src/a.rs:1"), "{msg}");
    assert!(msg.contains("b → c: src/b.rs:2"), "{msg}");
    assert!(msg.contains("c → a: src/c.rs:2"), "{msg}");
    assert!(!msg.contains("d →") && !msg.contains("→ d"), "{msg}");

    let acyclic = graph_of(&files[..2]);
    assert!(describe_circles(&acyclic).is_none());
}

#[test]
fn module_of_maps_files_to_top_level_modules() {
    assert_eq!(module_of(Path::new("lib.rs")), None);
    assert_eq!(module_of(Path::new("main.rs")), None);
    assert_eq!(
        module_of(Path::new("config.rs")),
        Some(("config".into(), 1))
    );
    assert_eq!(
        module_of(Path::new("script/mod.rs")),
        Some(("script".into(), 1))
    );
    assert_eq!(
        module_of(Path::new("script/patch.rs")),
        Some(("script".into(), 2))
    );
    assert_eq!(
        module_of(Path::new("transport/ssh/known_hosts.rs")),
        Some(("transport".into(), 3))
    );
}

#[test]
fn table_check_reads_rows_and_flags_upward_edges() {
    let lib_rs = "//! | module | owns |\n//! |---|---|\n//! | [`a`] | top |\n//! | [`b`]   | bottom |\npub mod a;\n";
    let order = table_order(lib_rs);
    assert_eq!(order, ["a", "b"]);
    let down = graph_of(&[("a".into(), 1, "src/a.rs".into(), "use crate::b;".into())]);
    assert!(against_table(&down, &order).is_empty());
    let files = [
        ("b".into(), 1, "src/b.rs".into(), "use crate::a;".into()),
        ("c".into(), 1, "src/c.rs".into(), String::new()),
        ("a".into(), 1, "src/a.rs".into(), String::new()),
    ];
    let bad = against_table(&graph_of(&files), &order);
    assert_eq!(
        bad,
        [
            "c has no row in the table",
            "b → a points up the table: src/b.rs:1"
        ]
    );
}
