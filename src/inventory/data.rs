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

use super::jump::{self, JumpHost};
use super::{
    Become, Criticality, Group, Host, Inventory, InventoryError, InventoryWarning, TransportKind,
};

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
        let i = match self.group_index.get(name) {
            Some(&i) => i,
            None => {
                self.add_group(name);
                self.groups.len() - 1
            }
        };
        &mut self.groups[i]
    }

    fn group(&self, name: &str) -> Option<&RawGroup> {
        self.group_index.get(name).map(|&i| &self.groups[i])
    }

    /// Adds a host (once) and puts it in `group`. A port given on a later mention
    /// is ignored, as Ansible ignores it.
    pub fn add_host(&mut self, name: &str, group: Option<&str>, port: Option<u64>) {
        let i = match self.host_index.get(name) {
            Some(&i) => i,
            None => {
                let mut vars = Vars::new();
                if let Some(p) = port.filter(|p| *p != 0) {
                    vars.insert("ansible_port".into(), Value::from(p));
                }
                let i = self.hosts.len();
                self.host_index.insert(name.to_string(), i);
                self.hosts.push(RawHost {
                    name: name.to_string(),
                    vars,
                    groups: Vec::new(),
                    source: self.current.clone(),
                });
                i
            }
        };
        if let Some(g) = group {
            // The host's own short list of groups answers "already a member?": the
            // group's list grows with the fleet, and scanning it made loading quadratic.
            if !self.hosts[i].groups.iter().any(|x| x == g) {
                self.hosts[i].groups.push(g.to_string());
                self.group_mut(g).hosts.push(name.to_string());
            }
        }
    }

    pub fn set_host_var(&mut self, host: &str, key: &str, value: Value) {
        if let Some(&i) = self.host_index.get(host) {
            self.hosts[i].vars.insert(key.to_string(), value);
        }
    }

    /// [`RawInventory::set_host_var`] for several vars, in order.
    pub fn set_host_vars(&mut self, host: &str, vars: Vec<(String, Value)>) {
        if let Some(&i) = self.host_index.get(host) {
            self.hosts[i].vars.extend(vars);
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

        // `ungrouped` holds exactly the hosts that are in no other group. Every
        // group's ancestors are the same for each of its hosts: computed once here.
        let ancestors: HashMap<String, Vec<String>> = self
            .groups
            .iter()
            .map(|g| {
                let mut anc: Vec<String> = self.ancestors(&g.name).into_iter().collect();
                anc.sort();
                (g.name.clone(), anc)
            })
            .collect();
        let mut leave_ungrouped: HashSet<String> = HashSet::new();
        for i in 0..self.hosts.len() {
            let direct = &self.hosts[i].groups;
            // Any direct group other than `ungrouped` is a group besides `all`:
            // every group's ancestors are groups too, and `all` is no host's
            // direct group unless it is written so.
            let others = direct.iter().any(|g| {
                g != "all" && g != "ungrouped"
                    || ancestors
                        .get(g)
                        .is_some_and(|a| a.iter().any(|x| x != "all" && x != "ungrouped"))
            });
            if direct.iter().any(|g| g == "ungrouped") {
                if others {
                    leave_ungrouped.insert(self.hosts[i].name.clone());
                    self.hosts[i].groups.retain(|g| g != "ungrouped");
                }
            } else if !others {
                let name = self.hosts[i].name.clone();
                self.add_host(&name, Some("ungrouped"), None);
            }
        }
        if !leave_ungrouped.is_empty() {
            self.group_mut("ungrouped")
                .hosts
                .retain(|h| !leave_ungrouped.contains(h));
        }

        let depth = self.depths();
        let all_vars = self
            .group("all")
            .map(|g| g.vars.clone())
            .unwrap_or_default();
        let mut hosts = Vec::with_capacity(self.hosts.len());
        let mut jumps: Vec<Vec<String>> = Vec::with_capacity(self.hosts.len());
        let mut warnings = Vec::new();
        let mut raw_hosts = std::mem::take(&mut self.hosts);
        for raw in &mut raw_hosts {
            // The host's own vars win, so they are the map the rest fills in: each
            // group's var, highest precedence first, only where nothing set it.
            let mut vars = std::mem::take(&mut raw.vars);
            let raw = &*raw;
            let mut groups: Vec<&RawGroup> = host_groups(raw, &ancestors)
                .iter()
                .filter(|g| **g != "all")
                .filter_map(|g| self.group(g))
                .collect();
            groups.sort_by(|a, b| {
                let da = depth.get(&a.name).copied().unwrap_or(0);
                let db = depth.get(&b.name).copied().unwrap_or(0);
                (da, a.priority, &a.name).cmp(&(db, b.priority, &b.name))
            });
            for layer in groups.iter().rev().map(|g| &g.vars).chain([&all_vars]) {
                for (k, v) in layer {
                    if !vars.contains_key(k) {
                        vars.insert(k.clone(), v.clone());
                    }
                }
            }
            let mut names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
            names.sort();
            let host = host_from_vars(&raw.name, names, vars, &raw.source)?;
            jumps.push(jump_specs(&host, &raw.source, &mut warnings)?);
            warn_unknown_vars(&host, &mut warnings);
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
        self.hosts = raw_hosts;

        let by_name: HashMap<&str, usize> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        for (i, specs) in jumps.iter().enumerate() {
            let chain = resolve_jumps(&hosts, &by_name, &jumps, specs, &mut vec![i]).map_err(
                |message| InventoryError::Invalid {
                    path: self.hosts[i].source.clone(),
                    message: format!("host `{}`: {message}", hosts[i].name),
                },
            )?;
            hosts[i].jump = chain;
        }
        for w in &warnings {
            tracing::warn!(host = %w.host, key = %w.key, "inventory: {}", w.message);
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
        let mut inventory = Inventory::from_parts(hosts, groups, self.sources);
        inventory.warnings = warnings;
        Ok(inventory)
    }
}

/// Names of every group the host is in, directly or through ancestors, `all`
/// included; `ancestors` holds each group's ancestors, sorted.
fn host_groups<'a>(host: &'a RawHost, ancestors: &'a HashMap<String, Vec<String>>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for g in &host.groups {
        for a in ancestors.get(g).into_iter().flatten() {
            if !out.contains(&a.as_str()) {
                out.push(a);
            }
        }
        if !out.contains(&g.as_str()) {
            out.push(g);
        }
    }
    out
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

/// The `ansible_*` vars patchbook acts on. `ansible_group_priority` never reaches
/// a host's vars; the `ansible_become*` ones are read by the become support.
const KNOWN_ANSIBLE_VARS: &[&str] = &[
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_ssh_private_key_file",
    "ansible_connection",
    "ansible_ssh_common_args",
    "ansible_ssh_extra_args",
    "ansible_become",
    "ansible_become_user",
    "ansible_become_method",
    "ansible_become_password",
    "ansible_become_pass",
];

/// An `ansible_*` var patchbook does not know is a connection setting it would
/// otherwise drop without a word (a password, an interpreter, a proxy).
fn warn_unknown_vars(host: &Host, warnings: &mut Vec<InventoryWarning>) {
    for key in host.vars.keys() {
        if key.starts_with("ansible_") && !KNOWN_ANSIBLE_VARS.contains(&key.as_str()) {
            warnings.push(InventoryWarning {
                host: host.name.clone(),
                key: key.clone(),
                message: "patchbook does not use this connection var; it is ignored".into(),
            });
        }
    }
}

/// The host's jump specs as written: the `jump` var (native `jump` key) wins over
/// a `ProxyJump` in `ansible_ssh_common_args` / `ansible_ssh_extra_args`. Every
/// other ssh option there is a warning.
fn jump_specs(
    host: &Host,
    source: &Path,
    warnings: &mut Vec<InventoryWarning>,
) -> Result<Vec<String>, InventoryError> {
    let bad = |message: String| InventoryError::Invalid {
        path: source.to_path_buf(),
        message: format!("host `{}`: {message}", host.name),
    };
    let mut from_args = None;
    for key in ["ansible_ssh_common_args", "ansible_ssh_extra_args"] {
        let Some(v) = host.vars.get(key) else {
            continue;
        };
        let text =
            value_as_string(v).ok_or_else(|| bad(format!("{key} must be a string, got {v}")))?;
        let args = jump::parse_ssh_args(&text).map_err(|e| bad(format!("{key}: {e}")))?;
        for (option, written) in args.ignored {
            warnings.push(InventoryWarning {
                host: host.name.clone(),
                key: format!("{key} {option}"),
                message: format!("patchbook does not apply `{written}`; it is ignored"),
            });
        }
        if args.jump.is_some() {
            from_args = args.jump;
        }
    }
    match host.vars.get("jump") {
        Some(v) => string_list(v).ok_or_else(|| {
            bad(format!(
                "jump must be a host name or a list of them, got {v}"
            ))
        }),
        None => Ok(from_args.unwrap_or_default()),
    }
}

/// Turns jump specs into hops. A spec whose host part names an inventory host
/// takes that host's address, port, user and identity (the spec's own user and
/// port win), and that host's own jumps come first, as OpenSSH chains them.
fn resolve_jumps(
    hosts: &[Host],
    by_name: &HashMap<&str, usize>,
    specs: &[Vec<String>],
    chain_specs: &[String],
    seen: &mut Vec<usize>,
) -> Result<Vec<JumpHost>, String> {
    let mut chain = Vec::new();
    for spec in chain_specs {
        let mut hop = JumpHost::parse(spec)?;
        if let Some(&j) = by_name.get(hop.name.as_str()) {
            if seen.contains(&j) {
                let names: Vec<&str> = seen.iter().map(|&k| hosts[k].name.as_str()).collect();
                return Err(format!(
                    "jump hosts loop: {} -> {}; remove one of the `jump` entries",
                    names.join(" -> "),
                    hosts[j].name
                ));
            }
            seen.push(j);
            chain.extend(resolve_jumps(hosts, by_name, specs, &specs[j], seen)?);
            seen.pop();
            let h = &hosts[j];
            hop.address = h.address.clone();
            hop.port = hop
                .port
                .or(h.vars.contains_key("ansible_port").then_some(h.port));
            hop.user = hop.user.or_else(|| h.user.clone());
            hop.identity = h.identity.clone();
        }
        chain.push(hop);
    }
    Ok(chain)
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
pub(crate) fn parse_bool(v: &Value) -> Option<bool> {
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

    #[test]
    fn proxyjump_in_common_args_resolves_inventory_bastions_and_warns_on_the_rest() {
        let ini = "bastion ansible_host=10.0.0.5 ansible_port=2222 ansible_user=ops \
                   ansible_ssh_private_key_file=/keys/ops\n\
                   web1 ansible_ssh_common_args='-o ProxyJump=bastion,admin@gw2:2200 \
                   -o StrictHostKeyChecking=no' ansible_python_interpreter=/usr/bin/python3\n\
                   web2 ansible_ssh_common_args='-J root@bastion'\n";
        let inv = super::super::ansible::parse_ini(Path::new("hosts.ini"), ini).unwrap();
        let web1 = inv.host("web1").unwrap();
        assert_eq!(
            web1.jump,
            vec![
                JumpHost {
                    name: "bastion".into(),
                    address: "10.0.0.5".into(),
                    port: Some(2222),
                    user: Some("ops".into()),
                    identity: Some(PathBuf::from("/keys/ops")),
                },
                JumpHost {
                    name: "gw2".into(),
                    address: "gw2".into(),
                    port: Some(2200),
                    user: Some("admin".into()),
                    identity: None,
                },
            ]
        );
        // The spec's own user wins over the inventory host's.
        let web2 = inv.host("web2").unwrap();
        assert_eq!(web2.jump[0].user.as_deref(), Some("root"));
        assert_eq!(web2.jump[0].address, "10.0.0.5");
        let warned: Vec<(&str, &str)> = inv
            .warnings()
            .iter()
            .map(|w| (w.host.as_str(), w.key.as_str()))
            .collect();
        assert_eq!(
            warned,
            [
                ("web1", "ansible_ssh_common_args -o StrictHostKeyChecking"),
                ("web1", "ansible_python_interpreter"),
            ]
        );
        assert!(inv.warnings()[0]
            .to_string()
            .contains("StrictHostKeyChecking=no"));
        assert!(inv.host("bastion").unwrap().jump.is_empty());
    }

    #[test]
    fn native_jump_chains_through_the_bastions_own_jumps_and_refuses_loops() {
        let toml = r#"
[hosts.b1]
address = "127.0.0.1"
port = 2201
[hosts.b2]
address = "10.9.0.2"
jump = "b1"
[hosts.app]
jump = ["b2"]
"#;
        let inv = super::super::native::parse(Path::new("i.toml"), toml).unwrap();
        let names: Vec<(&str, Option<u16>)> = inv
            .host("app")
            .unwrap()
            .jump
            .iter()
            .map(|h| (h.address.as_str(), h.port))
            .collect();
        assert_eq!(names, [("127.0.0.1", Some(2201)), ("10.9.0.2", None)]);
        assert!(inv.warnings().is_empty());
        let looped = "[hosts.a]\njump = \"b\"\n[hosts.b]\njump = \"a\"\n";
        let err = super::super::native::parse(Path::new("i.toml"), looped)
            .unwrap_err()
            .to_string();
        assert!(err.contains("jump hosts loop"), "{err}");
    }
}
