//! Ansible pattern selectors: `all`, `web`, `web:db`, `web,db`, `web:&prod`,
//! `web:!web03`, globs `web*`, `~regex`, subscripts `web[0:2]`.
//!
//! The semantics are `ansible`'s `InventoryManager`: the pattern is split on `,`
//! (or on `:` outside brackets when it is not a plain address), then every plain
//! part is unioned, `&` parts intersect and `!` parts exclude, in that order,
//! wherever they were written. A name that matches nothing selects nothing. The
//! result is in inventory order. This module only reads an [`Inventory`].
use std::collections::HashSet;
use std::sync::OnceLock;

use regex::Regex;

use super::ansible::parse_address;
use super::{Host, Inventory, InventoryError};

pub fn select<'a>(inv: &'a Inventory, pattern: &str) -> Result<Vec<&'a Host>, InventoryError> {
    let parts = split_pattern(pattern);
    let mut regular = Vec::new();
    let mut and = Vec::new();
    let mut not = Vec::new();
    for p in &parts {
        if let Some(rest) = p.strip_prefix('!') {
            not.push(rest);
        } else if let Some(rest) = p.strip_prefix('&') {
            and.push(rest);
        } else {
            regular.push(p.as_str());
        }
    }
    if regular.is_empty() {
        regular.push("all");
    }
    let mut chosen: HashSet<&str> = HashSet::new();
    for p in regular {
        chosen.extend(match_one(inv, p, pattern)?);
    }
    for p in and {
        let that: HashSet<&str> = match_one(inv, p, pattern)?.into_iter().collect();
        chosen.retain(|h| that.contains(h));
    }
    for p in not {
        let that: HashSet<&str> = match_one(inv, p, pattern)?.into_iter().collect();
        chosen.retain(|h| !that.contains(h));
    }
    Ok(inv
        .hosts()
        .iter()
        .filter(|h| chosen.contains(h.name.as_str()))
        .collect())
}

/// Why `pattern` selects no host, in words for an error: each part written as a
/// plain name that is neither a host nor a group, with the nearest host and group
/// names (did you mean), or each glob or regex that matches no name.
pub fn why_empty(inv: &Inventory, pattern: &str) -> String {
    let names: Vec<&str> = inv
        .groups()
        .keys()
        .map(String::as_str)
        .chain(inv.hosts().iter().map(|h| h.name.as_str()))
        .chain(std::iter::once("all"))
        .collect();
    let mut reasons = Vec::new();
    for part in split_pattern(pattern) {
        let bare = part.trim_start_matches(['!', '&']);
        // An excluded part that names nothing removes nothing: it is not why.
        if part.starts_with('!') {
            continue;
        }
        let (expr, _) = split_subscript(bare);
        if names.contains(&expr.as_str()) {
            continue;
        }
        let special = expr.starts_with('~') || expr.contains(['*', '?', '[']);
        if special {
            let matches = compile(&expr).is_ok_and(|re| names.iter().any(|n| re.is_match(n)));
            if !matches {
                reasons.push(format!("`{bare}` matches no host or group name"));
            }
            continue;
        }
        let near = crate::config::suggest::nearest(&expr, names.iter().copied(), 3);
        let hint = match near.as_slice() {
            [] => String::new(),
            [one] => format!(" (did you mean `{one}`?)"),
            more => format!(
                " (did you mean {}?)",
                more.iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        reasons.push(format!("`{expr}` is neither a host nor a group{hint}"));
    }
    if reasons.is_empty() {
        "its parts name hosts or groups, but no host is selected by all of them together"
            .to_string()
    } else {
        reasons.join("; ")
    }
}

/// `split_host_pattern`: commas always separate; colons separate unless the whole
/// pattern reads as one address (`host:22`, `::1`, `web[1:3]`).
fn split_pattern(pattern: &str) -> Vec<String> {
    static COLON_PARTS: OnceLock<Regex> = OnceLock::new();
    let parts: Vec<String> = if pattern.contains(',') {
        pattern.split(',').map(String::from).collect()
    } else if parse_address(pattern).is_some() {
        vec![pattern.to_string()]
    } else {
        let re = COLON_PARTS.get_or_init(|| {
            Regex::new(r"(?:[^\s:\[\]]|\[[^\]]*\])+").unwrap_or_else(|e| panic!("{e}"))
        });
        re.find_iter(pattern)
            .map(|m| m.as_str().to_string())
            .collect()
    };
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Hosts one part selects: an exact host name, else groups whose name matches
/// (with all their descendants' hosts), plus hosts whose name matches when the part
/// is a regex or glob or matched no group.
fn match_one<'a>(
    inv: &'a Inventory,
    part: &str,
    whole: &str,
) -> Result<Vec<&'a str>, InventoryError> {
    // `all` is every host, even in an inventory that also has a host of that name
    // (found by fuzzing: `select("all")` picked that one host).
    if part == "all" {
        return Ok(group_hosts(inv, "all"));
    }
    if let Some(h) = inv.host(part) {
        return Ok(vec![h.name.as_str()]);
    }
    let (expr, subscript) = split_subscript(part);
    let matcher = compile(&expr).map_err(|message| InventoryError::Selector {
        selector: whole.to_string(),
        message,
    })?;
    let mut results: Vec<&str> = Vec::new();
    let mut matched_group = false;
    for name in inv.groups().keys() {
        if matcher.is_match(name) {
            matched_group = true;
            results.extend(group_hosts(inv, name));
        }
    }
    let special = expr.starts_with('~') || expr.contains(['.', '?', '*', '[']);
    if !matched_group || special {
        results.extend(
            inv.hosts()
                .iter()
                .filter(|h| matcher.is_match(&h.name))
                .map(|h| h.name.as_str()),
        );
    }
    let mut seen = HashSet::new();
    results.retain(|h| seen.insert(*h));
    match subscript {
        None => Ok(results),
        Some(_) if results.is_empty() => Ok(results),
        Some((start, end)) => {
            let len = i64::try_from(results.len()).unwrap_or(i64::MAX);
            // Every index below is clamped to 0..=len first, so it fits a usize.
            let at = |i: i64| usize::try_from(i).unwrap_or(0);
            let idx = |i: i64| if i < 0 { len + i } else { i };
            let out_of_range = || InventoryError::Selector {
                selector: whole.to_string(),
                message: format!("no hosts matched the subscripted pattern `{part}`"),
            };
            match end {
                None => {
                    let i = idx(start);
                    if i < 0 || i >= len {
                        return Err(out_of_range());
                    }
                    Ok(vec![results[at(i)]])
                }
                Some(end) => {
                    let s = at(idx(start).clamp(0, len));
                    let e = if end == -1 { len - 1 } else { end };
                    let e = at((e + 1).clamp(0, len));
                    Ok(results.get(s..e.max(s)).unwrap_or_default().to_vec())
                }
            }
        }
    }
}

type Subscript = (i64, Option<i64>);

/// `web[0]`, `web[1:3]`, `web[2:]`; regexes never carry a subscript.
fn split_subscript(part: &str) -> (String, Option<Subscript>) {
    static RE: OnceLock<Regex> = OnceLock::new();
    if part.starts_with('~') {
        return (part.to_string(), None);
    }
    let re = RE.get_or_init(|| {
        Regex::new(r"^(.+)\[(?:(-?[0-9]+)|([0-9]+)([:-])([0-9]*))\]$")
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let Some(m) = re.captures(part) else {
        return (part.to_string(), None);
    };
    let base = m[1].to_string();
    if let Some(i) = m.get(2).and_then(|i| i.as_str().parse().ok()) {
        return (base, Some((i, None)));
    }
    let start = m.get(3).and_then(|s| s.as_str().parse().ok()).unwrap_or(0);
    let end = m.get(5).and_then(|e| e.as_str().parse().ok()).unwrap_or(-1);
    (base, Some((start, Some(end))))
}

/// Every host of a group and its descendants, own hosts first, then children
/// breadth-first, as Ansible lists them.
fn group_hosts<'a>(inv: &'a Inventory, group: &str) -> Vec<&'a str> {
    if group == "all" {
        return inv.hosts().iter().map(|h| h.name.as_str()).collect();
    }
    let mut order: Vec<&str> = vec![group];
    let mut i = 0;
    while i < order.len() {
        if let Some(g) = inv.groups().get(order[i]) {
            for c in &g.children {
                if !order.contains(&c.as_str()) {
                    order.push(c);
                }
            }
        }
        i += 1;
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for g in order {
        if let Some(g) = inv.groups().get(g) {
            for h in &g.hosts {
                if let Some(host) = inv.host(h) {
                    if seen.insert(host.name.as_str()) {
                        out.push(host.name.as_str());
                    }
                }
            }
        }
    }
    out
}

/// A `~regex` (matched from the start, as Python's `re.match`) or an fnmatch glob
/// (matching the whole name).
fn compile(expr: &str) -> Result<Regex, String> {
    if let Some(re) = expr.strip_prefix('~') {
        return Regex::new(&format!("^(?:{re})"))
            .map_err(|e| format!("invalid regular expression `{re}`: {e}"));
    }
    Regex::new(&glob_to_regex(expr)).map_err(|e| format!("invalid pattern `{expr}`: {e}"))
}

/// Python's `fnmatch.translate`: `*`, `?`, `[seq]`, `[!seq]`; an unclosed `[` is literal.
fn glob_to_regex(glob: &str) -> String {
    let chars: Vec<char> = glob.chars().collect();
    let mut out = String::from("^(?s:");
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                let mut j = i;
                if j < chars.len() && chars[j] == '!' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == ']' {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    out.push_str(r"\[");
                } else {
                    let mut body: String = chars[i..j].iter().collect();
                    i = j + 1;
                    let negate = body.starts_with('!');
                    if negate {
                        body.remove(0);
                    }
                    let escaped: String = body
                        .chars()
                        .map(|ch| match ch {
                            '\\' | '[' | '&' | '~' | '|' => format!("\\{ch}"),
                            '^' if !negate => "\\^".to_string(),
                            other => other.to_string(),
                        })
                        .collect();
                    if escaped.is_empty() {
                        out.push_str(if negate { "." } else { "[^\\s\\S]" });
                    } else if negate {
                        out.push_str(&format!("[^{escaped}]"));
                    } else {
                        out.push_str(&format!("[{escaped}]"));
                    }
                }
            }
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push_str(")$");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_split_like_ansible() {
        assert_eq!(split_pattern("web:&prod"), vec!["web", "&prod"]);
        assert_eq!(split_pattern("web, db"), vec!["web", "db"]);
        assert_eq!(split_pattern("web[1:3]"), vec!["web[1:3]"]);
        assert_eq!(split_pattern("a:!b:&c"), vec!["a", "!b", "&c"]);
    }

    #[test]
    fn an_empty_selection_says_why_and_what_was_meant() {
        let inv = crate::inventory::native::parse(
            std::path::Path::new("inv.toml"),
            "[hosts.web01]\ngroups = [\"web\"]\n[hosts.db01]\ngroups = [\"db\"]\n",
        )
        .unwrap();
        let why = why_empty(&inv, "wbe");
        assert!(
            why.contains("`wbe` is neither a host nor a group (did you mean `web`?)"),
            "{why}"
        );
        let why = why_empty(&inv, "web:&db");
        assert!(why.contains("no host is selected by all of them"), "{why}");
        let why = why_empty(&inv, "zz*:!nothing");
        assert_eq!(why, "`zz*` matches no host or group name");
    }

    #[test]
    fn globs_translate() {
        let re = Regex::new(&glob_to_regex("db-?")).unwrap();
        assert!(re.is_match("db-a") && !re.is_match("db-ab"));
        let re = Regex::new(&glob_to_regex("web[!1]*")).unwrap();
        assert!(re.is_match("web2x") && !re.is_match("web1"));
    }
}
