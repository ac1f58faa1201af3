//! Ansible INI and YAML inventories, and the `ansible-inventory --list` JSON shape.
//!
//! The loaders follow `ansible-core`'s `ini` and `yaml` inventory plugins line by line
//! (section rules, pending `:children`, host ranges, `host:port`, value typing), so
//! that `patchbook inventory list --json` prints what `ansible-inventory --list`
//! prints. They only fill a `RawInventory`; precedence lives in `data`.
use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::{json, Map, Value};

use super::data::RawInventory;
use super::literal::{ini_value, shlex_split};
use super::yaml::{self, Yaml};
use super::{Inventory, InventoryError};

/// Parses one INI inventory on its own.
pub fn parse_ini(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    let mut raw = RawInventory::default();
    raw.begin_source(path);
    load_ini_into(&mut raw, path, text)?;
    raw.finish()
}

/// Parses one YAML inventory on its own.
pub fn parse_yaml(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    let mut raw = RawInventory::default();
    raw.begin_source(path);
    load_yaml_into(&mut raw, path, text)?;
    raw.finish()
}

struct Pending {
    line: usize,
    vars_only: bool,
    parents: Vec<String>,
}

fn section_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$").unwrap_or_else(|e| panic!("{e}"))
    })
}

fn groupname_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^([^:\]\s]+)\s*(?:#.*)?$").unwrap_or_else(|e| panic!("{e}")))
}

pub(crate) fn load_ini_into(
    raw: &mut RawInventory,
    path: &Path,
    text: &str,
) -> Result<(), InventoryError> {
    let syntax = |line: usize, message: String| InventoryError::Syntax {
        path: path.to_path_buf(),
        line,
        column: 1,
        message,
    };
    // Group names that a `:children` or `:vars` section used before defining them.
    let mut pending: Vec<(String, Pending)> = Vec::new();
    let mut group = "ungrouped".to_string();
    let mut state = "hosts".to_string();
    for (idx, full) in text.lines().enumerate() {
        let lineno = idx + 1;
        let line = full.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(m) = section_re().captures(line) {
            group = m[1].to_string();
            state = m.get(2).map_or("hosts", |s| s.as_str()).to_string();
            if !["hosts", "children", "vars"].contains(&state.as_str()) {
                return Err(syntax(
                    lineno,
                    format!(
                        "section [{group}:{state}] has unknown type `{state}`; use :children or :vars"
                    ),
                ));
            }
            if !raw.has_group(&group) {
                if state == "vars" && !pending.iter().any(|(n, _)| *n == group) {
                    pending.push((
                        group.clone(),
                        Pending {
                            line: lineno,
                            vars_only: true,
                            parents: Vec::new(),
                        },
                    ));
                }
                raw.add_group(&group);
            }
            if state != "vars" {
                if let Some(pos) = pending.iter().position(|(n, _)| *n == group) {
                    if pending[pos].1.vars_only {
                        pending.remove(pos);
                    } else {
                        add_pending_children(raw, &group, &mut pending)
                            .map_err(|m| syntax(lineno, m))?;
                    }
                }
            }
            continue;
        }
        if line.starts_with('[') && !line.contains(']') {
            return Err(syntax(
                lineno,
                format!("section header `{line}` is missing its closing `]`"),
            ));
        }
        if line.starts_with('[') && line.ends_with(']') {
            return Err(syntax(
                lineno,
                format!(
                    "invalid section entry `{line}`; a section is [group], [group:children] or \
                     [group:vars] with no spaces"
                ),
            ));
        }
        match state.as_str() {
            "hosts" => {
                let tokens = shlex_split(line)
                    .map_err(|e| syntax(lineno, format!("cannot split host line: {e}")))?;
                let Some((pattern, rest)) = tokens.split_first() else {
                    continue;
                };
                let (names, port) = expand_host_pattern(pattern).map_err(|m| syntax(lineno, m))?;
                let mut vars = Vec::new();
                for t in rest {
                    let Some((k, v)) = t.split_once('=') else {
                        return Err(syntax(
                            lineno,
                            format!("expected key=value host variable, got `{t}`"),
                        ));
                    };
                    vars.push((k.to_string(), ini_value(v)));
                }
                let last = names.len().saturating_sub(1);
                for (i, name) in names.into_iter().enumerate() {
                    if name.is_empty() {
                        return Err(syntax(lineno, "empty host name".into()));
                    }
                    raw.add_host(&name, Some(&group), port);
                    // The last (most often the only) name takes the vars as they are.
                    let vars = if i == last {
                        std::mem::take(&mut vars)
                    } else {
                        vars.clone()
                    };
                    raw.set_host_vars(&name, vars);
                }
            }
            "vars" => {
                let Some((k, v)) = line.split_once('=') else {
                    return Err(syntax(
                        lineno,
                        format!("expected key=value in [{group}:vars], got `{line}`"),
                    ));
                };
                raw.set_group_var(&group, k.trim(), ini_value(v.trim()));
            }
            _ => {
                let Some(m) = groupname_re().captures(line) else {
                    return Err(syntax(
                        lineno,
                        format!(
                            "expected a group name in [{group}:children], got `{line}`; \
                             hosts belong in [{group}]"
                        ),
                    ));
                };
                let child = m[1].to_string();
                if !raw.has_group(&child) {
                    if let Some((_, p)) = pending.iter_mut().find(|(n, _)| *n == child) {
                        p.parents.push(group.clone());
                    } else {
                        pending.push((
                            child,
                            Pending {
                                line: lineno,
                                vars_only: false,
                                parents: vec![group.clone()],
                            },
                        ));
                    }
                } else {
                    raw.add_child(&group, &child)
                        .map_err(|m| syntax(lineno, m))?;
                }
            }
        }
    }
    if let Some((name, p)) = pending.first() {
        let message = if p.vars_only {
            format!("section [{name}:vars] is for group `{name}`, which is never defined; add a [{name}] section")
        } else {
            format!(
                "section [{}:children] includes group `{name}`, which is never defined; add a [{name}] section",
                p.parents.last().map(String::as_str).unwrap_or("?")
            )
        };
        return Err(syntax(p.line, message));
    }
    Ok(())
}

fn add_pending_children(
    raw: &mut RawInventory,
    group: &str,
    pending: &mut Vec<(String, Pending)>,
) -> Result<(), String> {
    let Some(pos) = pending.iter().position(|(n, _)| n == group) else {
        return Ok(());
    };
    let parents = pending[pos].1.parents.clone();
    for parent in parents {
        raw.add_child(&parent, group)?;
        if pending.iter().any(|(n, p)| *n == parent && !p.vars_only) {
            add_pending_children(raw, &parent, pending)?;
        }
    }
    pending.retain(|(n, _)| n != group);
    Ok(())
}

/// Ansible's `parse_address(…, allow_ranges=True)`: `(host, port)` when the text is a
/// host name, IPv4 or IPv6 address (ranges allowed) with an optional port.
pub(crate) fn parse_address(address: &str) -> Option<(String, Option<u64>)> {
    struct Res {
        bracketed: Regex,
        hostport: Regex,
        ipv4: Regex,
        ipv6: Regex,
        label: Regex,
    }
    static RES: OnceLock<Res> = OnceLock::new();
    let res = RES.get_or_init(|| {
        let numeric = r"\[(?:[0-9]+:[0-9]+)(?::[0-9]+)?\]";
        let hexr = r"\[(?:[0-9a-f]+:[0-9a-f]+)(?::[0-9]+)?\]";
        let alnum = r"\[(?:[a-z]:[a-z]|[0-9]+:[0-9]+)(?::[0-9]+)?\]";
        let i6 = format!(r"(?:[0-9a-f]{{1,4}}|{hexr})");
        let i4 = format!(r"(?:[01]?[0-9]{{1,2}}|2[0-4][0-9]|25[0-5]|{numeric})");
        let ipv6 = format!(
            r"(?i)^((?:{0}:){{7}}{0}|(?:{0}:){{1,6}}:|(?:{0}:)(?::{0}){{1,6}}|(?:{0}:){{2}}(?::{0}){{1,5}}|(?:{0}:){{3}}(?::{0}){{1,4}}|(?:{0}:){{4}}(?::{0}){{1,3}}|(?:{0}:){{5}}(?::{0}){{1,2}}|(?:{0}:){{6}}(?::{0})|:(?::{0}){{1,6}}|{0}?::|(?:0:){{6}}(?:{0}\.){{3}}{0}|::(?:ffff:)?(?:{0}\.){{3}}{0}|(?:0:){{5}}ffff:(?:{0}\.){{3}}{0})$",
            i6
        );
        let build = |s: &str| Regex::new(s).unwrap_or_else(|e| panic!("{e}"));
        Res {
            bracketed: build(r"^\[(.+)\]:([0-9]+)$"),
            hostport: build(r"^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$"),
            ipv4: build(&format!(r"(?i)^(?:{i4}\.){{3}}{i4}$")),
            ipv6: build(&ipv6),
            label: build(&format!(r"(?i)^(?:\w|{alnum})(?:[\w-]|{alnum})*$")),
        }
    });
    let mut addr = address.to_string();
    let mut port = None;
    for re in [&res.bracketed, &res.hostport] {
        if let Some(m) = re.captures(&addr) {
            port = Some(m[2].parse::<u64>().ok()?);
            addr = m[1].to_string();
        }
    }
    let hostname = !addr.is_empty()
        && addr
            .split('.')
            .all(|l| res.label.is_match(l) && !l.ends_with('_') && !l.ends_with('-'));
    if res.ipv4.is_match(&addr) || res.ipv6.is_match(&addr) || hostname {
        Some((addr, port))
    } else {
        None
    }
}

/// Host names and port for one INI host pattern (`web[01:03].example.com:2222`).
pub(crate) fn expand_host_pattern(pattern: &str) -> Result<(Vec<String>, Option<u64>), String> {
    // Without a `:` there is no port to split off, and parse_address gives the
    // pattern back whatever it is: its regexes were a tenth of loading a big fleet.
    let (name, port) = if pattern.contains(':') {
        parse_address(pattern).unwrap_or_else(|| (pattern.to_string(), None))
    } else {
        (pattern.to_string(), None)
    };
    if pattern.trim().ends_with(':') && port.is_none() {
        return Err(format!(
            "invalid host pattern `{pattern}`: a trailing `:` must be followed by a port"
        ));
    }
    let names = if name.contains('[') {
        expand_range(&name)?
    } else {
        vec![name]
    };
    if names.iter().any(|n| n.trim() == "---") {
        return Err(format!(
            "invalid host pattern `{pattern}`: `---` is a sign this is a YAML file; name it .yml"
        ));
    }
    Ok((names, port))
}

/// The most host names one pattern may expand to. Ansible has no bound, so
/// `web[1:99999999]` in a two-line file used to exhaust memory; 100,000 is the
/// fleet size patchbook is built for, and a larger fleet is several patterns.
pub const MAX_RANGE_HOSTS: usize = 100_000;

/// `expand_hostname_range`: `[01:10]`, `[a:f]`, `[1:10:2]`, nested left to right,
/// at most [`MAX_RANGE_HOSTS`] names in all.
pub(crate) fn expand_range(line: &str) -> Result<Vec<String>, String> {
    const LETTERS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let bad = |why: &str| format!("bad host range in `{line}`: {why}");
    let replaced = line.replacen('[', "|", 1).replacen(']', "|", 1);
    let parts: Vec<&str> = replaced.split('|').collect();
    let [head, range, tail] = parts[..] else {
        return Err(bad("expected one [begin:end] or [begin:end:step]"));
    };
    let bounds: Vec<&str> = range.split(':').collect();
    if bounds.len() != 2 && bounds.len() != 3 {
        return Err(bad("a range is [begin:end] or [begin:end:step]"));
    }
    let beg = if bounds[0].is_empty() { "0" } else { bounds[0] };
    let end = bounds[1];
    if end.is_empty() {
        return Err(bad("the range needs an end value"));
    }
    let step: i64 = match bounds.get(2) {
        None => 1,
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| bad("the step must be a whole number"))?,
    };
    let step = match usize::try_from(step) {
        Ok(s) if s > 0 => s,
        _ => return Err(bad("the step must be 1 or more")),
    };
    let width = (beg.starts_with('0') && beg.len() > 1).then_some(beg.len());
    if let Some(w) = width {
        if end.len() != w {
            return Err(bad("begin and end must have the same number of digits"));
        }
    }
    let items: Vec<String> = match (LETTERS.find(beg), LETTERS.find(end)) {
        (Some(b), Some(e)) => {
            if b > e {
                return Err(bad("begin must not come after end"));
            }
            LETTERS[b..=e]
                .chars()
                .step_by(step)
                .map(String::from)
                .collect()
        }
        _ => {
            let b: i64 = beg
                .trim()
                .parse()
                .map_err(|_| bad("begin and end must be numbers or single letters"))?;
            let e: i64 = end
                .trim()
                .parse()
                .map_err(|_| bad("begin and end must be numbers or single letters"))?;
            if b > e {
                // Ansible silently yields no host here; that is always a typo.
                return Err(bad("begin must not be greater than end"));
            }
            // Count before building anything: the bound must hold before memory is spent.
            let count =
                (i128::from(e) - i128::from(b)) / i128::try_from(step).unwrap_or(i128::MAX) + 1;
            if count > MAX_RANGE_HOSTS as i128 {
                return Err(too_many(line, count));
            }
            (b..=e)
                .step_by(step)
                .map(|n| match width {
                    Some(w) if n < 0 => format!("-{:0>w$}", -n, w = w - 1),
                    Some(w) => format!("{n:0>w$}"),
                    None => n.to_string(),
                })
                .collect()
        }
    };
    let mut out = Vec::new();
    for item in items {
        let name = format!("{head}{item}{tail}");
        if name.contains('[') {
            out.extend(expand_range(&name)?);
        } else {
            out.push(name);
        }
        // Nested ranges multiply: stop as soon as the product passes the bound.
        if out.len() > MAX_RANGE_HOSTS {
            return Err(too_many(line, out.len() as i128));
        }
    }
    Ok(out)
}

fn too_many(line: &str, count: i128) -> String {
    let shown = if count > MAX_RANGE_HOSTS as i128 {
        format!("more than {MAX_RANGE_HOSTS}")
    } else {
        count.to_string()
    };
    format!(
        "host range in `{line}` expands to {shown} hosts; one pattern may expand to at most \
         {MAX_RANGE_HOSTS}: check the bounds for a typo, or split the fleet into several patterns"
    )
}

pub(crate) fn load_yaml_into(
    raw: &mut RawInventory,
    path: &Path,
    text: &str,
) -> Result<(), InventoryError> {
    // Ansible's loader tries JSON first, whatever the extension, and YAML only when
    // that fails: `1e3` is a float in JSON and a string in YAML 1.1.
    let doc = match serde_json::from_str::<Value>(text) {
        Ok(json) => Yaml::from_json(json),
        Err(_) => {
            let (doc, warnings) = yaml::parse(text).map_err(|e| InventoryError::Syntax {
                path: path.to_path_buf(),
                line: e.line,
                column: e.column,
                message: e.message,
            })?;
            for w in warnings {
                tracing::warn!("{}:{}:{}: {}", path.display(), w.line, w.column, w.message);
            }
            doc
        }
    };
    let invalid = |message: String| InventoryError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let top = match doc {
        Yaml::Map(m) if !m.is_empty() => m,
        Yaml::Scalar(Value::Null) | Yaml::Map(_) => {
            return Err(invalid("the YAML inventory is empty".into()))
        }
        _ => {
            return Err(invalid(
                "a YAML inventory is a mapping of group names, usually starting with `all:`".into(),
            ))
        }
    };
    if top
        .iter()
        .any(|(k, _)| matches!(k, Yaml::Scalar(Value::String(s)) if s == "plugin"))
    {
        return Err(invalid(
            "this is an inventory plugin configuration, not a YAML inventory".into(),
        ));
    }
    for (name, data) in top {
        yaml_group(raw, path, &name, data)?;
    }
    Ok(())
}

fn yaml_key(path: &Path, key: &Yaml, what: &str) -> Result<String, InventoryError> {
    match key {
        Yaml::Scalar(Value::String(s)) => Ok(s.clone()),
        other => Err(InventoryError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "{what} `{}` must be a string; enclose it in quotation marks (unquoted, YAML 1.1 \
                 reads numbers, yes/no/on/off, null and dates as such)",
                yaml_to_json(other)
            ),
        }),
    }
}

fn yaml_group(
    raw: &mut RawInventory,
    path: &Path,
    name: &Yaml,
    data: Yaml,
) -> Result<Option<String>, InventoryError> {
    if !matches!(data, Yaml::Map(_) | Yaml::Scalar(Value::Null)) {
        // Ansible warns and skips a group that is not a mapping.
        return Ok(None);
    }
    let group = yaml_key(path, name, "group name")?;
    // As Ansible ("Invalid empty/false group name provided"): an empty name would
    // read as "every host" where a selector is built from it (found by fuzzing).
    if group.trim().is_empty() {
        return Err(InventoryError::Invalid {
            path: path.to_path_buf(),
            message: "a group has an empty name; give it one".into(),
        });
    }
    raw.add_group(&group);
    let Yaml::Map(map) = data else {
        return Ok(Some(group));
    };
    let invalid = |message: String| InventoryError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    for (key, section) in map {
        let key_name = match yaml_to_json(&key) {
            Value::String(s) => s,
            other => other.to_string(),
        };
        let section = match section {
            Yaml::Scalar(Value::String(s))
                if ["vars", "children", "hosts"].contains(&key_name.as_str()) =>
            {
                Yaml::Map(vec![(
                    Yaml::Scalar(Value::String(s)),
                    Yaml::Scalar(Value::Null),
                )])
            }
            other => other,
        };
        let Yaml::Map(entries) = section else {
            if matches!(key_name.as_str(), "vars" | "children" | "hosts")
                && section != Yaml::Scalar(Value::Null)
            {
                return Err(invalid(format!(
                    "group `{group}`: `{key_name}` must be a mapping, found {}",
                    yaml_kind(&section)
                )));
            }
            continue;
        };
        match key_name.as_str() {
            "vars" => {
                for (k, v) in entries {
                    let k = yaml_key(path, &k, "variable name")?;
                    raw.set_group_var(&group, &k, yaml_to_json(&v));
                }
            }
            "children" => {
                for (k, v) in entries {
                    if let Some(child) = yaml_group(raw, path, &k, v)? {
                        raw.add_child(&group, &child).map_err(invalid)?;
                    }
                }
            }
            "hosts" => {
                for (k, v) in entries {
                    let pattern = yaml_key(path, &k, "host pattern")?;
                    if pattern.trim().is_empty() {
                        return Err(invalid(format!(
                            "a host of group `{group}` has an empty name; give it one"
                        )));
                    }
                    let (names, port) = expand_host_pattern(&pattern)
                        .map_err(|m| invalid(format!("group `{group}`: {m}")))?;
                    let vars = match v {
                        Yaml::Map(m) => m,
                        v if yaml_falsy(&v) => Vec::new(),
                        other => {
                            return Err(invalid(format!(
                                "host `{pattern}` in group `{group}`: host vars must be a mapping, found {}",
                                yaml_kind(&other)
                            )))
                        }
                    };
                    for name in names {
                        raw.add_host(&name, Some(&group), port);
                        for (vk, vv) in &vars {
                            let vk = yaml_key(path, vk, "variable name")?;
                            raw.set_host_var(&name, &vk, yaml_to_json(vv));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some(group))
}

/// Python truthiness, since the plugin reads `host_vars or {}`.
fn yaml_falsy(v: &Yaml) -> bool {
    match v {
        Yaml::Scalar(Value::Null) => true,
        Yaml::Scalar(Value::Bool(b)) => !b,
        Yaml::Scalar(Value::Number(n)) => n.as_f64() == Some(0.0),
        Yaml::Scalar(Value::String(s)) => s.is_empty(),
        Yaml::Scalar(Value::Array(a)) => a.is_empty(),
        Yaml::Scalar(Value::Object(o)) => o.is_empty(),
        Yaml::Seq(s) => s.is_empty(),
        Yaml::Map(m) => m.is_empty(),
    }
}

fn yaml_kind(v: &Yaml) -> &'static str {
    match v {
        Yaml::Scalar(Value::Null) => "nothing",
        Yaml::Scalar(Value::Bool(_)) => "a boolean",
        Yaml::Scalar(Value::Number(_)) => "a number",
        Yaml::Scalar(Value::String(_)) => "a string",
        Yaml::Seq(_) | Yaml::Scalar(Value::Array(_)) => "a list",
        Yaml::Map(_) | Yaml::Scalar(Value::Object(_)) => "a mapping",
    }
}

pub(crate) fn yaml_to_json(v: &Yaml) -> Value {
    match v {
        Yaml::Scalar(s) => s.clone(),
        Yaml::Seq(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match yaml_to_json(k) {
                    Value::String(s) => s,
                    j => j.to_string(),
                };
                out.insert(key, yaml_to_json(v));
            }
            Value::Object(out)
        }
    }
}

/// The structure `ansible-inventory --list` prints: `_meta.hostvars`, and each group
/// with `hosts` and `children`, empty keys and empty groups left out. Values of
/// vars named in a host's `secret_vars` are shown as `***`.
pub fn to_list_json(inv: &Inventory) -> Value {
    let mut out = Map::new();
    let mut seen = std::collections::HashSet::new();
    fn format_group(
        inv: &Inventory,
        name: &str,
        out: &mut Map<String, Value>,
        seen: &mut std::collections::HashSet<String>,
    ) {
        let Some(g) = inv.groups().get(name) else {
            return;
        };
        let mut entry = Map::new();
        if name != "all" && !g.hosts.is_empty() {
            entry.insert("hosts".into(), json!(g.hosts));
        }
        if !g.children.is_empty() {
            entry.insert("children".into(), json!(g.children));
        }
        if !entry.is_empty() {
            out.insert(name.to_string(), Value::Object(entry));
        }
        for child in &g.children {
            if seen.insert(child.clone()) {
                format_group(inv, child, out, seen);
            }
        }
    }
    format_group(inv, "all", &mut out, &mut seen);
    let mut hostvars = Map::new();
    for h in inv.hosts() {
        if h.vars.is_empty() {
            continue;
        }
        let vars: Map<String, Value> = h
            .vars
            .iter()
            .map(|(k, v)| {
                let shown = if h.secret_vars.contains(k) {
                    Value::String("***".into())
                } else {
                    v.clone()
                };
                (k.clone(), shown)
            })
            .collect();
        hostvars.insert(h.name.clone(), Value::Object(vars));
    }
    out.insert(
        "_meta".into(),
        json!({ "hostvars": hostvars, "profile": "inventory_legacy" }),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_pad_step_and_nest() {
        assert_eq!(
            expand_range("web[01:03].x").unwrap(),
            vec!["web01.x", "web02.x", "web03.x"]
        );
        assert_eq!(
            expand_range("s[1:10:3]").unwrap(),
            vec!["s1", "s4", "s7", "s10"]
        );
        assert_eq!(
            expand_range("db-[a:c]").unwrap(),
            vec!["db-a", "db-b", "db-c"]
        );
        assert_eq!(
            expand_range("r[1:2]-[a:b]").unwrap(),
            vec!["r1-a", "r1-b", "r2-a", "r2-b"]
        );
        assert_eq!(expand_range("h[:2]").unwrap(), vec!["h0", "h1", "h2"]);
        assert!(expand_range("web[3:1]").is_err());
        assert!(expand_range("web[01:5]").is_err());
        assert!(expand_range("web[1:]").is_err());
        assert!(expand_range("web[1:3").is_err());
    }

    #[test]
    fn huge_and_nested_ranges_are_bounded() {
        for bad in [
            "web[1:99999999]",
            "web[0:9223372036854775807]",
            "web[-9223372036854775808:9223372036854775807]",
            "r[1:1000]-[1:1000]",
            "r[a:z]-[0:99999]",
        ] {
            let e = expand_range(bad).expect_err(bad);
            assert!(e.contains("at most 100000"), "{e}");
        }
        assert_eq!(expand_range("w[1:100000]").map(|v| v.len()), Ok(100_000));
        assert_eq!(expand_range("w[0:199998:2]").map(|v| v.len()), Ok(100_000));
    }

    #[test]
    fn addresses_split_ports_like_ansible() {
        assert_eq!(parse_address("h:2222"), Some(("h".into(), Some(2222))));
        assert_eq!(
            parse_address("web[1:3]:22"),
            Some(("web[1:3]".into(), Some(22)))
        );
        assert_eq!(parse_address("[::1]:22"), Some(("::1".into(), Some(22))));
        assert_eq!(parse_address("10.0.0.1"), Some(("10.0.0.1".into(), None)));
        assert_eq!(parse_address("bad_"), None);
        assert_eq!(parse_address("web:&prod"), None);
    }
}
