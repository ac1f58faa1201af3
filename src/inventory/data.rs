//! The inventory as its sources state it, before precedence is applied: groups
//! with their direct hosts, children and vars, and hosts with their own vars.
//!
//! Every loader (native TOML, Ansible INI and YAML) feeds one [`RawInventory`], so
//! several `-i` files merge the way `ansible-inventory` merges them. [`RawInventory::finish`]
//! then applies Ansible's reconciliation (implicit `all` and `ungrouped`) and variable
//! precedence and yields the [`Inventory`] the rest of patchbook sees. It must not
//! parse any file format itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Become, Criticality, Group, Host, Inventory, InventoryError, TransportKind};

pub(crate) type Vars = BTreeMap<String, Value>;

#[derive(Debug, Clone)]
pub(crate) struct RawGroup {
    pub name: String,
    pub hosts: Vec<String>,
    pub children: Vec<String>,
    pub parents: Vec<String>,
    pub vars: Vars,
    /// `ansible_group_priority`: breaks ties between groups at the same depth.
    pub priority: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct RawHost {
    pub name: String,
    pub vars: Vars,
    /// Groups the host was put in directly, in the order it happened.
    pub groups: Vec<String>,
    /// The file that first named the host, for error messages.
    pub source: PathBuf,
}

/// Groups and hosts in creation order, like Ansible's `InventoryData`.
#[derive(Debug, Clone)]
pub(crate) struct RawInventory {
    groups: Vec<RawGroup>,
    group_index: HashMap<String, usize>,
    hosts: Vec<RawHost>,
    host_index: HashMap<String, usize>,
    sources: Vec<PathBuf>,
    current: PathBuf,
    /// Whether Ansible-format files may declare `ansible_connection=local`.
    pub allow_local_from_ansible: bool,
}

impl Default for RawInventory {
    fn default() -> Self {
        let mut raw = RawInventory {
            groups: Vec::new(),
            group_index: HashMap::new(),
            hosts: Vec::new(),
            host_index: HashMap::new(),
            sources: Vec::new(),
            current: PathBuf::new(),
            allow_local_from_ansible: false,
        };
        raw.add_group("all");
        raw.add_group("ungrouped");
        // Cannot fail: both groups were just created and hold no other relation.
        let _ = raw.add_child("all", "ungrouped");
        raw
    }
}

impl RawInventory {
    /// Starts reading another source file; hosts first named from here on record it.
    pub fn begin_source(&mut self, path: &Path) {
        self.current = path.to_path_buf();
        self.sources.push(path.to_path_buf());
    }

    pub fn has_group(&self, name: &str) -> bool {
        self.group_index.contains_key(name)
    }

    pub fn add_group(&mut self, name: &str) {
        if !self.group_index.contains_key(name) {
            self.group_index.insert(name.to_string(), self.groups.len());
            self.groups.push(RawGroup {
                name: name.to_string(),
                hosts: Vec::new(),
                children: Vec::new(),
                parents: Vec::new(),
                vars: Vars::new(),
                priority: 1,
            });
        }
    }

    fn group_mut(&mut self, name: &str) -> &mut RawGroup {
        self.add_group(name);
        let i = self.group_index[name];
        &mut self.groups[i]
    }

    fn group(&self, name: &str) -> Option<&RawGroup> {
        self.group_index.get(name).map(|&i| &self.groups[i])
    }

    /// Adds a host (once) and puts it in `group`. A port given on a later mention
    /// is ignored, as Ansible ignores it.
    pub fn add_host(&mut self, name: &str, group: Option<&str>, port: Option<u64>) {
        if !self.host_index.contains_key(name) {
            let mut vars = Vars::new();
            if let Some(p) = port.filter(|p| *p != 0) {
                vars.insert("ansible_port".into(), Value::from(p));
            }
            self.host_index.insert(name.to_string(), self.hosts.len());
            self.hosts.push(RawHost {
                name: name.to_string(),
                vars,
                groups: Vec::new(),
                source: self.current.clone(),
            });
        }
        if let Some(g) = group {
            let grp = self.group_mut(g);
            if !grp.hosts.iter().any(|h| h == name) {
                grp.hosts.push(name.to_string());
                let i = self.host_index[name];
                self.hosts[i].groups.push(g.to_string());
            }
        }
    }

    pub fn set_host_var(&mut self, host: &str, key: &str, value: Value) {
        if let Some(&i) = self.host_index.get(host) {
            self.hosts[i].vars.insert(key.to_string(), value);
        }
    }

    pub fn set_group_var(&mut self, group: &str, key: &str, value: Value) {
        let g = self.group_mut(group);
        if key == "ansible_group_priority" {
            if let Some(p) = value_as_i64(&value) {
                g.priority = p;
            }
        } else {
            g.vars.insert(key.to_string(), value);
        }
    }

    fn ancestors(&self, name: &str) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut todo: Vec<String> = self
            .group(name)
            .map(|g| g.parents.clone())
            .unwrap_or_default();
        while let Some(g) = todo.pop() {
            if seen.insert(g.clone()) {
                if let Some(grp) = self.group(&g) {
                    todo.extend(grp.parents.iter().cloned());
                }
            }
        }
        seen
    }

    /// Makes `child` a child group of `parent`; refuses a loop with a message
    /// naming both groups.
    pub fn add_child(&mut self, parent: &str, child: &str) -> Result<(), String> {
        if parent == child {
            return Err(format!("group `{parent}` cannot be a child of itself"));
        }
        self.add_group(parent);
        self.add_group(child);
        if self.group_mut(parent).children.iter().any(|c| c == child) {
            return Ok(());
        }
        if self.ancestors(parent).contains(child) {
            return Err(format!(
                "adding group `{child}` as a child of `{parent}` creates a loop; \
                 remove one of the two `children` entries"
            ));
        }
        self.group_mut(parent).children.push(child.to_string());
        let c = self.group_mut(child);
        if !c.parents.iter().any(|p| p == parent) {
            c.parents.push(parent.to_string());
        }
        Ok(())
    }

    /// Longest path from `all`, which is how Ansible ranks groups for precedence.
    fn depths(&self) -> HashMap<String, usize> {
        let mut depth: HashMap<String, usize> = HashMap::new();
        fn visit(raw: &RawInventory, name: &str, d: usize, depth: &mut HashMap<String, usize>) {
            if depth.get(name).is_some_and(|&old| old >= d) {
                return;
            }
            depth.insert(name.to_string(), d);
            if let Some(g) = raw.group(name) {
                for c in &g.children {
                    visit(raw, c, d + 1, depth);
                }
            }
        }
        visit(self, "all", 0, &mut depth);
        depth
    }

    /// Applies Ansible's reconciliation and precedence and builds the inventory.
    pub fn finish(mut self) -> Result<Inventory, InventoryError> {
        // Every group without a parent hangs under `all`, in creation order.
        let orphans: Vec<String> = self
            .groups
            .iter()
            .filter(|g| g.name != "all" && g.parents.is_empty())
            .map(|g| g.name.clone())
            .collect();
        for g in orphans {
            self.add_child("all", &g)
                .map_err(|message| InventoryError::Invalid {
                    path: self.current.clone(),
                    message,
                })?;
        }

        // `ungrouped` holds exactly the hosts that are in no other group.
        let host_names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for name in &host_names {
            let all_groups = self.host_groups(name);
            let others = all_groups.iter().any(|g| g != "all" && g != "ungrouped");
            let direct = &self.hosts[self.host_index[name]].groups;
            if direct.iter().any(|g| g == "ungrouped") {
                if others {
                    self.group_mut("ungrouped").hosts.retain(|h| h != name);
                    let i = self.host_index[name];
                    self.hosts[i].groups.retain(|g| g != "ungrouped");
                }
            } else if !others {
                self.add_host(name, Some("ungrouped"), None);
            }
        }

        let depth = self.depths();
        let all_vars = self
            .group("all")
            .map(|g| g.vars.clone())
            .unwrap_or_default();
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for raw in &self.hosts {
            let mut groups: Vec<&RawGroup> = self
                .host_groups(&raw.name)
                .iter()
                .filter(|g| g.as_str() != "all")
                .filter_map(|g| self.group(g))
                .collect();
            groups.sort_by(|a, b| {
                let da = depth.get(&a.name).copied().unwrap_or(0);
                let db = depth.get(&b.name).copied().unwrap_or(0);
                (da, a.priority, &a.name).cmp(&(db, b.priority, &b.name))
            });
            let mut vars = all_vars.clone();
            for g in &groups {
                vars.extend(g.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            vars.extend(raw.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
            let mut names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
            names.sort();
            let host = host_from_vars(&raw.name, names, vars, &raw.source)?;
            // An Ansible inventory is often copied in from elsewhere, and its
            // `ansible_connection=local` makes every host primitive act on this
            // controller, as the user running patchbook. Only the operator's own
            // config may allow that; a native `transport = "local"` is already
            // an explicit patchbook declaration.
            if host.transport == TransportKind::Local
                && !self.allow_local_from_ansible
                && !is_native(&raw.source)
            {
                return Err(InventoryError::LocalNotAllowed {
                    path: raw.source.clone(),
                    host: raw.name.clone(),
                });
            }
            hosts.push(host);
        }

        let groups: BTreeMap<String, Group> = self
            .groups
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    Group {
                        name: g.name.clone(),
                        hosts: g.hosts.clone(),
                        children: g.children.clone(),
                        vars: g.vars.clone(),
                    },
                )
            })
            .collect();
        Ok(Inventory::from_parts(hosts, groups, self.sources))
    }

    /// Names of every group the host is in, directly or through ancestors, `all` included.
    fn host_groups(&self, host: &str) -> Vec<String> {
        let Some(&i) = self.host_index.get(host) else {
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for g in &self.hosts[i].groups {
            let mut anc: Vec<String> = self.ancestors(g).into_iter().collect();
            anc.sort();
            for a in anc {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            if !out.contains(g) {
                out.push(g.clone());
            }
        }
        out
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn value_as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A string or a list of strings, as `owner` and `depends_on` may be written.
fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::String(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
        Value::Array(items) => items.iter().map(value_as_string).collect(),
        _ => None,
    }
}

/// Whether `path` is a native (TOML) inventory, by the same rule `Inventory::load` uses.
fn is_native(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("toml")
}

/// Turns merged vars into the typed [`Host`]; the vars stay as they are.
fn host_from_vars(
    name: &str,
    groups: Vec<String>,
    vars: Vars,
    source: &Path,
) -> Result<Host, InventoryError> {
    let bad = |message: String| InventoryError::Invalid {
        path: source.to_path_buf(),
        message: format!("host `{name}`: {message}"),
    };
    let mut host = Host::new(name);
    host.groups = groups;
    if let Some(v) = vars.get("ansible_host") {
        host.address = value_as_string(v)
            .ok_or_else(|| bad(format!("ansible_host must be a string, got {v}")))?;
    }
    if let Some(v) = vars.get("ansible_port") {
        host.port = value_as_i64(v)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                bad(format!(
                    "ansible_port must be a port number 1-65535, got {v}"
                ))
            })?;
    }
    if let Some(v) = vars.get("ansible_user") {
        host.user = value_as_string(v);
    }
    if let Some(v) = vars.get("ansible_ssh_private_key_file") {
        host.identity = value_as_string(v).map(PathBuf::from);
    }
    if let Some(v) = vars.get("ansible_connection") {
        host.transport = match value_as_string(v).as_deref() {
            Some("local") => TransportKind::Local,
            Some("sim") => TransportKind::Sim,
            Some("ssh" | "paramiko" | "smart") => TransportKind::Ssh,
            _ => {
                return Err(bad(format!(
                    "transport (ansible_connection) must be ssh, local or sim, got {v}"
                )))
            }
        };
    }
    if let Some(v) = vars.get("criticality") {
        host.criticality = value_as_string(v)
            .and_then(|s| Criticality::parse(&s))
            .ok_or_else(|| {
                bad(format!(
                    "criticality must be one of low, medium, high, critical, got {v}"
                ))
            })?;
    }
    if let Some(v) = vars.get("owner").or_else(|| vars.get("owners")) {
        host.owners = string_list(v).ok_or_else(|| {
            bad(format!(
                "owner must be a string or a list of strings, got {v}"
            ))
        })?;
    }
    if let Some(v) = vars.get("depends_on") {
        host.depends_on = string_list(v).ok_or_else(|| {
            bad(format!(
                "depends_on must be a host or group name or a list of them, got {v}"
            ))
        })?;
    }
    if let Some(v) = vars.get("secret_vars") {
        host.secret_vars = string_list(v)
            .ok_or_else(|| bad(format!("secret_vars must be a list of var names, got {v}")))?;
    }
    host.r#become = become_from_vars(&vars).map_err(bad)?;
    host.vars = vars;
    Ok(host)
}

/// Become password vars, Ansible's current names first.
const BECOME_PASSWORD_VARS: [&str; 3] = [
    "ansible_become_password",
    "ansible_become_pass",
    "ansible_sudo_pass",
];

/// `ansible_become*` as a [`Become`]. Only sudo is supported: another method is an
/// error naming the key, never a silent run as the login user. A password must be
/// a secret reference; the error never repeats the value, which may be a real
/// password pasted into the inventory.
fn become_from_vars(vars: &Vars) -> Result<Option<Become>, String> {
    if let Some(v) = vars.get("ansible_become_method") {
        match value_as_string(v).as_deref() {
            Some("sudo") => {}
            _ => {
                return Err(format!(
                    "ansible_become_method={} is not supported: patchbook becomes another user \
                     with sudo only; set ansible_become_method=sudo or remove the key",
                    value_as_string(v).unwrap_or_else(|| v.to_string())
                ))
            }
        }
    }
    let on = match vars.get("ansible_become") {
        None => false,
        Some(v) => {
            parse_bool(v).ok_or_else(|| format!("ansible_become must be true or false, got {v}"))?
        }
    };
    if !on {
        return Ok(None);
    }
    let user = match vars.get("ansible_become_user") {
        None => "root".to_string(),
        Some(v) => value_as_string(v)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| format!("ansible_become_user must be a user name, got {v}"))?,
    };
    let mut password = None;
    for key in BECOME_PASSWORD_VARS {
        let Some(v) = vars.get(key) else { continue };
        let text = value_as_string(v).unwrap_or_default();
        if !is_secret_reference(&text) {
            return Err(format!(
                "{key} must be a secret reference, ${{env:NAME}} or ${{file:PATH}} (its value \
                 is not shown); a password written into the inventory is readable by everyone \
                 who can read the inventory"
            ));
        }
        password = Some(text);
        break;
    }
    Ok(Some(Become { user, password }))
}

/// `${env:NAME}` or `${file:PATH}`, the whole value.
fn is_secret_reference(s: &str) -> bool {
    let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) else {
        return false;
    };
    match inner.split_once(':') {
        Some(("env" | "file", rest)) => !rest.is_empty() && !rest.contains('}'),
        _ => false,
    }
}

/// Ansible's booleans: `true`, `yes`, `1`, `on` and their opposites, any case.
fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "on" | "y" => Some(true),
            "false" | "no" | "0" | "off" | "n" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deeper_group_wins_and_siblings_go_alphabetically() {
        let mut raw = RawInventory::default();
        raw.add_group("prod");
        raw.add_group("web");
        raw.add_group("b_side");
        raw.add_group("a_side");
        raw.add_child("prod", "web").unwrap();
        raw.add_host("h", Some("web"), None);
        raw.add_host("h", Some("a_side"), None);
        raw.add_host("h", Some("b_side"), None);
        raw.set_group_var("all", "x", Value::from("all"));
        raw.set_group_var("prod", "x", Value::from("prod"));
        raw.set_group_var("web", "x", Value::from("web"));
        raw.set_group_var("a_side", "y", Value::from("a"));
        raw.set_group_var("b_side", "y", Value::from("b"));
        raw.set_group_var("prod", "z", Value::from("prod"));
        let inv = raw.finish().unwrap();
        let h = inv.host("h").unwrap();
        assert_eq!(h.vars["x"], "web");
        assert_eq!(h.vars["y"], "b");
        assert_eq!(h.vars["z"], "prod");
        assert_eq!(h.groups, vec!["a_side", "b_side", "prod", "web"]);
    }

    #[test]
    fn priority_beats_name_at_same_depth() {
        let mut raw = RawInventory::default();
        raw.add_host("h", Some("a"), None);
        raw.add_host("h", Some("b"), None);
        raw.set_group_var("a", "v", Value::from("a"));
        raw.set_group_var("b", "v", Value::from("b"));
        raw.set_group_var("a", "ansible_group_priority", Value::from(5));
        let inv = raw.finish().unwrap();
        assert_eq!(inv.host("h").unwrap().vars["v"], "a");
    }

    #[test]
    fn group_loop_is_refused() {
        let mut raw = RawInventory::default();
        raw.add_child("a", "b").unwrap();
        let err = raw.add_child("b", "a").unwrap_err();
        assert!(err.contains("loop"), "{err}");
    }
}
