//! Where the settings come from: which `patchbook.toml` a command uses, and on
//! which line of it each key is written.
//!
//! It owns config discovery (walking up from a folder to the first
//! `patchbook.toml`, as git and cargo do) and the key-to-line map `patchbook
//! config` shows beside each value. It must not decide any setting's value; that
//! stays with [`super::Config`] and the layers that read it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The config file's name, looked for in a folder and each of its parents.
pub const FILE_NAME: &str = "patchbook.toml";

/// How the config in use was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Named with `--config`.
    Flag(PathBuf),
    /// Found by walking up from `from` (the current folder).
    Found { path: PathBuf, from: PathBuf },
    /// No `patchbook.toml` in `from` or any parent: every default, paths relative
    /// to `from`.
    Defaults { from: PathBuf },
}

impl ConfigSource {
    /// The file read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Flag(p) | ConfigSource::Found { path: p, .. } => Some(p),
            ConfigSource::Defaults { .. } => None,
        }
    }
}

/// The first `patchbook.toml` in `start` or one of its parents. A run from a
/// subfolder of a project thus uses the project's settings and inventory instead
/// of silently running with none.
pub fn discover(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(FILE_NAME))
        .find(|p| p.is_file())
}

/// Chooses the config: `--config` when given, else the first `patchbook.toml`
/// from `cwd` upwards, else none.
pub fn locate(flag: Option<&Path>, cwd: &Path) -> ConfigSource {
    match flag {
        Some(p) => ConfigSource::Flag(p.to_path_buf()),
        None => match discover(cwd) {
            Some(path) => ConfigSource::Found {
                path,
                from: cwd.to_path_buf(),
            },
            None => ConfigSource::Defaults {
                from: cwd.to_path_buf(),
            },
        },
    }
}

/// The 1-based line of every key of a TOML text, by dotted path (`forks`,
/// `ssh.user`, `notify.channels.hook.url`). Keys inside an inline table or a
/// multi-line array are not listed: [`line_of`] gives them their parent's line.
/// The text is expected to have parsed already; this only finds positions.
pub fn key_lines(text: &str) -> BTreeMap<String, usize> {
    let mut lines = BTreeMap::new();
    let mut table: Vec<String> = Vec::new();
    // Open brackets and braces of a value that spans lines, and whether a
    // multi-line string is open: their lines hold no keys.
    let mut depth = 0i32;
    let mut in_multiline: Option<&str> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(close) = in_multiline {
            if raw.contains(close) {
                in_multiline = None;
            }
            continue;
        }
        if depth > 0 {
            depth += bracket_balance(raw);
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let end = header.find(']').unwrap_or(header.len());
            table = split_key(&header[..end]);
            lines.entry(table.join(".")).or_insert(n);
            continue;
        }
        let Some(eq) = find_unquoted(line, '=') else {
            continue;
        };
        let mut path = table.clone();
        path.extend(split_key(&line[..eq]));
        lines.entry(path.join(".")).or_insert(n);
        let value = &line[eq + 1..];
        for quote in ["\"\"\"", "'''"] {
            if value.matches(quote).count() % 2 == 1 {
                in_multiline = Some(quote);
            }
        }
        depth += bracket_balance(value);
    }
    lines
}

/// The line of `key`, or of its nearest parent that has one.
pub fn line_of(lines: &BTreeMap<String, usize>, key: &str) -> Option<usize> {
    let mut k = key;
    loop {
        if let Some(n) = lines.get(k) {
            return Some(*n);
        }
        k = &k[..k.rfind('.')?];
    }
}

/// `a."b.c" . d` as `["a", "b.c", "d"]`.
fn split_key(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, '.') => parts.push(std::mem::take(&mut cur).trim().to_string()),
            (None, c) => cur.push(c),
        }
    }
    parts.push(cur.trim().to_string());
    parts
}

/// Position of `needle` outside quoted strings.
fn find_unquoted(s: &str, needle: char) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c == needle => return Some(i),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}

/// Opened minus closed `[`/`{` outside strings and comments.
fn bracket_balance(s: &str) -> i32 {
    let mut quote: Option<char> = None;
    let mut n = 0;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => break,
            (None, '[' | '{') => n += 1,
            (None, ']' | '}') => n -= 1,
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_on_their_lines_through_tables_and_multiline_values() {
        let text = "# settings\nforks = 8\ntrusted_sources = [\n  \"https://a/?x=1\",\n  \"/srv\",\n]\n\n[ssh]\nuser = \"deploy\" # login\n\"known_hosts\" = \"kh\"\n\n[notify.channels.hook]\ntype = \"webhook\"\nurl = \"${env:HOOK}\"\n[limits]\nmax_operations = 5\nartifacts.attempts = 2\n";
        toml::from_str::<toml::Value>(text).unwrap();
        let lines = key_lines(text);
        assert_eq!(lines.get("forks"), Some(&2));
        assert_eq!(lines.get("trusted_sources"), Some(&3));
        assert_eq!(lines.get("ssh.user"), Some(&9));
        assert_eq!(lines.get("ssh.known_hosts"), Some(&10));
        assert_eq!(lines.get("notify.channels.hook.url"), Some(&14));
        assert_eq!(lines.get("limits.artifacts.attempts"), Some(&17));
        assert!(!lines.keys().any(|k| k.contains("x=1") || k.contains("srv")));
        assert_eq!(line_of(&lines, "notify.channels.hook.headers.x"), Some(12));
        assert_eq!(line_of(&lines, "nothing.here"), None);
    }

    #[test]
    fn discovery_walks_up_to_the_nearest_config() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(
            locate(None, &deep),
            ConfigSource::Defaults { from: deep.clone() }
        );
        std::fs::write(d.path().join(FILE_NAME), "").unwrap();
        std::fs::write(d.path().join("a").join(FILE_NAME), "").unwrap();
        assert_eq!(discover(&deep), Some(d.path().join("a").join(FILE_NAME)));
        let flag = d.path().join("other.toml");
        assert_eq!(locate(Some(&flag), &deep), ConfigSource::Flag(flag.clone()));
    }
}
