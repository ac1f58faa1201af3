//! The inventory: hosts, groups, vars, criticality, owners and dependencies.
//!
//! It owns loading (native TOML, Ansible INI and YAML), variable precedence,
//! selector expressions and the dependency graph. It must not know how hosts are
//! reached: a [`Host`] carries an address and a transport kind, nothing more.

pub mod ansible;
mod data;
pub mod graph;
pub mod jump;
mod literal;
pub mod native;
pub mod select;
mod yaml;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use jump::JumpHost;

/// The most host-to-host dependencies (`depends_on` with groups expanded) an
/// inventory may have: a web tier of 50,000 hosts depending on 100 database hosts
/// is 5,000,000.
pub const MAX_DEPENDENCY_EDGES: u64 = 10_000_000;

/// How much it hurts when a host goes down; `order: "criticality"` patches low first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

impl Criticality {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// How a host is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Ssh,
    Local,
    /// Benchmark-only: answers at once with a configured latency.
    Sim,
}

/// How a host's commands run as another user: `ansible_become`,
/// `ansible_become_user` and `ansible_become_password` (native: `become`,
/// `become_user`, `become_password`). The method is always sudo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Become {
    /// The user commands run as; default `root`.
    pub user: String,
    /// A secret reference as written (`${env:NAME}` or `${file:PATH}`), never a
    /// password: the transport reads it when it connects. `None`: sudo needs no
    /// password (NOPASSWD) or the login user is already `user`.
    pub password: Option<String>,
}

/// One host as the rest of patchbook sees it: every var already merged with
/// Ansible's precedence (host over child group over parent group over `all`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// DNS name or IP to connect to (`ansible_host`), defaults to `name`.
    pub address: String,
    /// `ansible_port`, default 22.
    pub port: u16,
    /// `ansible_user`; `None` means the config default or the login name.
    pub user: Option<String>,
    /// Every group the host belongs to, directly or through `children`,
    /// excluding the implicit `all`.
    pub groups: Vec<String>,
    /// Merged vars, including the `ansible_*` ones as written.
    pub vars: BTreeMap<String, Value>,
    pub criticality: Criticality,
    /// Contacts to tell about this host (names or e-mail addresses).
    pub owners: Vec<String>,
    /// Host or group names this host depends on.
    pub depends_on: Vec<String>,
    pub transport: TransportKind,
    /// `ansible_ssh_private_key_file` or the native `identity` key.
    pub identity: Option<PathBuf>,
    /// Names of vars whose values are secret and must be shown as `***`.
    pub secret_vars: Vec<String>,
    /// Bastions to dial through, first hop first: the `jump` var (native `jump`
    /// key) or `ProxyJump` / `-J` in `ansible_ssh_common_args`.
    #[serde(default)]
    pub jump: Vec<JumpHost>,
    /// Run commands as another user through sudo; `None`: as the login user
    /// (or root through `[ssh] become`).
    #[serde(default, rename = "become")]
    pub r#become: Option<Become>,
}

impl Host {
    /// The inventory says `ansible_become=false` (or `become = false`) for this
    /// host: it wins over a global `[ssh] become`, as a host var wins in Ansible.
    pub fn become_turned_off(&self) -> bool {
        self.vars.get("ansible_become").and_then(data::parse_bool) == Some(false)
    }

    /// A host with defaults, reachable over SSH at its own name.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Host {
            address: name.clone(),
            name,
            port: 22,
            user: None,
            groups: Vec::new(),
            vars: BTreeMap::new(),
            criticality: Criticality::default(),
            owners: Vec::new(),
            depends_on: Vec::new(),
            transport: TransportKind::Ssh,
            identity: None,
            secret_vars: Vec::new(),
            jump: Vec::new(),
            r#become: None,
        }
    }

    pub fn in_group(&self, group: &str) -> bool {
        group == "all" || self.groups.iter().any(|g| g == group)
    }
}

/// A group as written in the source, for graphs and the Ansible-compatible listing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    /// Hosts listed directly in this group, in source order.
    pub hosts: Vec<String>,
    pub children: Vec<String>,
    pub vars: BTreeMap<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax or schema error at a position in an inventory file.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: host `{host}` has ansible_connection=local, which runs its steps on this controller; remove it, or set `allow_local_hosts = true` in patchbook.toml if that is intended")]
    LocalNotAllowed { path: PathBuf, host: String },
    #[error("dependency cycle in depends_on: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("bad selector `{selector}`: {message}")]
    Selector { selector: String, message: String },
    /// A selector, or the `--limit`, selected no host.
    #[error("{what} `{selector}` matched no host ({}): {reason}; `patchbook inventory list` shows the hosts and groups", limit.as_ref().map_or_else(|| "no --limit in force".to_string(), |l| format!("--limit `{l}` in force")))]
    NoMatch {
        /// `selector` or `--limit`.
        what: &'static str,
        selector: String,
        /// The `--limit` narrowing the selector, when one is in force.
        limit: Option<String>,
        reason: String,
    },
    #[error("host `{host}` depends on `{target}`, which is neither a host nor a group; add it to the inventory or correct depends_on")]
    UnknownDependency { host: String, target: String },
    #[error("depends_on expands to {edges} host-to-host dependencies (host `{host}` alone has {of_host}); at most {MAX_DEPENDENCY_EDGES} are checked: depend on a smaller group or on named hosts")]
    TooManyDependencies {
        edges: u64,
        host: String,
        of_host: u64,
    },
}

/// Something in an inventory patchbook read but does not act on (an unknown
/// `ansible_*` var, an ssh option it does not apply). Loading logs each as a
/// warning; [`Inventory::warnings`] keeps them for callers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryWarning {
    pub host: String,
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for InventoryWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host `{}`: {}: {}", self.host, self.key, self.message)
    }
}

/// What the operator's config allows an inventory file to declare.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// `allow_local_hosts` in patchbook.toml: Ansible-format hosts may use
    /// `ansible_connection=local`.
    pub allow_local_hosts: bool,
}

/// Every host and group from all inventory sources, in source order.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    hosts: Vec<Host>,
    /// Host name to its place in `hosts`: selectors and dependency checks look
    /// names up once per host, which a scan made quadratic.
    by_name: HashMap<String, usize>,
    /// Group name to the places in `hosts` of its members (a host's `groups`,
    /// `all` left out), in inventory order.
    members: HashMap<String, Vec<usize>>,
    groups: BTreeMap<String, Group>,
    sources: Vec<PathBuf>,
    warnings: Vec<InventoryWarning>,
}

impl Inventory {
    /// An inventory built in code. Groups named in a host's `groups` but missing
    /// from `groups` are created with that host as a direct member, so selectors see
    /// the same membership as for a loaded inventory.
    pub fn from_parts(
        hosts: Vec<Host>,
        mut groups: BTreeMap<String, Group>,
        sources: Vec<PathBuf>,
    ) -> Self {
        let given: HashSet<String> = groups.keys().cloned().collect();
        // Groups made here, with the members they already have: a code-built fleet
        // of 100,000 hosts in one group must not scan the group once per host.
        let mut made: HashMap<String, HashSet<String>> = HashMap::new();
        for h in &hosts {
            for g in &h.groups {
                if given.contains(g) {
                    continue;
                }
                let entry = groups.entry(g.clone()).or_insert_with(|| Group {
                    name: g.clone(),
                    ..Group::default()
                });
                if made.entry(g.clone()).or_default().insert(h.name.clone()) {
                    entry.hosts.push(h.name.clone());
                }
            }
        }
        groups.entry("all".into()).or_insert_with(|| Group {
            name: "all".into(),
            hosts: hosts.iter().map(|h| h.name.clone()).collect(),
            ..Group::default()
        });
        let mut by_name = HashMap::with_capacity(hosts.len());
        let mut members: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, h) in hosts.iter().enumerate() {
            // The first host of a name is the one `host()` always found.
            by_name.entry(h.name.clone()).or_insert(i);
            for g in &h.groups {
                members.entry(g.clone()).or_default().push(i);
            }
        }
        Inventory {
            hosts,
            by_name,
            members,
            groups,
            sources,
            warnings: Vec::new(),
        }
    }

    /// Loads and merges inventory files; the format is chosen by extension
    /// (`.toml` native, `.yml`/`.yaml`/`.json` Ansible YAML, anything else Ansible INI).
    /// Several files merge into one inventory as `ansible-inventory -i A -i B` merges them.
    ///
    /// An Ansible-format host with `ansible_connection=local` is refused; see
    /// [`Inventory::load_with`].
    pub fn load(paths: &[PathBuf]) -> Result<Self, InventoryError> {
        Inventory::load_with(paths, &LoadOptions::default())
    }

    /// [`Inventory::load`] with the config's choices applied.
    pub fn load_with(paths: &[PathBuf], opts: &LoadOptions) -> Result<Self, InventoryError> {
        let mut raw = data::RawInventory::default();
        raw.allow_local_from_ansible = opts.allow_local_hosts;
        for path in paths {
            load_into(&mut raw, path)?;
        }
        let merged = raw.finish()?;
        merged.check_dependencies()?;
        Ok(merged)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn groups(&self) -> &BTreeMap<String, Group> {
        &self.groups
    }

    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    /// What loading warned about, in host order.
    pub fn warnings(&self) -> &[InventoryWarning] {
        &self.warnings
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.by_name.get(name).map(|&i| &self.hosts[i])
    }

    /// Hosts matching an Ansible-style pattern, in inventory order.
    pub fn select(&self, pattern: &str) -> Result<Vec<&Host>, InventoryError> {
        select::select(self, pattern)
    }

    /// Names of the hosts `host` depends on, groups expanded.
    pub fn dependencies_of(&self, host: &Host) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for target in &host.depends_on {
            if self.host(target).is_some() {
                out.push(target.clone());
                seen.insert(target);
                continue;
            }
            let in_group: Box<dyn Iterator<Item = &Host>> = if target == "all" {
                Box::new(self.hosts.iter())
            } else {
                Box::new(
                    self.members
                        .get(target)
                        .into_iter()
                        .flatten()
                        .map(|&i| &self.hosts[i]),
                )
            };
            for h in in_group {
                if h.name != host.name && seen.insert(&h.name) {
                    out.push(h.name.clone());
                }
            }
        }
        out
    }

    /// Refuses unknown dependency targets and cycles, naming the cycle.
    pub fn check_dependencies(&self) -> Result<(), InventoryError> {
        for h in &self.hosts {
            for t in &h.depends_on {
                if self.host(t).is_none() && !self.groups.contains_key(t) && t != "all" {
                    return Err(InventoryError::UnknownDependency {
                        host: h.name.clone(),
                        target: t.clone(),
                    });
                }
            }
        }
        // Group targets multiply: `depends_on = "all"` on 100,000 hosts is ten
        // billion edges. Count before building any of them.
        let mut edges = 0u64;
        let mut widest = (0u64, "");
        for h in &self.hosts {
            let of_host: u64 = h
                .depends_on
                .iter()
                .map(|t| match (self.host(t), t.as_str()) {
                    (Some(_), _) => 1,
                    (None, "all") => self.hosts.len() as u64,
                    (None, _) => self.members.get(t).map_or(0, |m| m.len() as u64),
                })
                .sum();
            edges = edges.saturating_add(of_host);
            if of_host > widest.0 {
                widest = (of_host, &h.name);
            }
        }
        if edges > MAX_DEPENDENCY_EDGES {
            return Err(InventoryError::TooManyDependencies {
                edges,
                host: widest.1.to_string(),
                of_host: widest.0,
            });
        }
        // Depth-first search with colours; the stack gives the cycle's path.
        let index: BTreeMap<&str, usize> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        let edges: Vec<Vec<usize>> = self
            .hosts
            .iter()
            .map(|h| {
                self.dependencies_of(h)
                    .iter()
                    .filter_map(|n| index.get(n.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut colour = vec![0u8; self.hosts.len()];
        let mut stack: Vec<usize> = Vec::new();
        fn visit(
            v: usize,
            edges: &[Vec<usize>],
            colour: &mut [u8],
            stack: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            colour[v] = 1;
            stack.push(v);
            for &w in &edges[v] {
                if colour[w] == 1 {
                    let start = stack.iter().position(|&x| x == w).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(w);
                    return Some(cycle);
                }
                if colour[w] == 0 {
                    if let Some(c) = visit(w, edges, colour, stack) {
                        return Some(c);
                    }
                }
            }
            stack.pop();
            colour[v] = 2;
            None
        }
        for v in 0..self.hosts.len() {
            if colour[v] == 0 {
                if let Some(cycle) = visit(v, &edges, &mut colour, &mut stack) {
                    return Err(InventoryError::Cycle {
                        cycle: cycle
                            .into_iter()
                            .map(|i| self.hosts[i].name.clone())
                            .collect(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The SHA-256 of the inventory's source files, in order, for the journal.
    pub fn content_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in &self.sources {
            h.update(p.to_string_lossy().as_bytes());
            h.update([0]);
            if let Ok(bytes) = std::fs::read(p) {
                h.update(&bytes);
            }
            h.update([0]);
        }
        hex::encode(h.finalize())
    }
}

fn load_into(raw: &mut data::RawInventory, path: &Path) -> Result<(), InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    raw.begin_source(path);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "toml" => native::load_into(raw, path, &text),
        "yml" | "yaml" | "json" => ansible::load_yaml_into(raw, path, &text),
        _ => ansible::load_ini_into(raw, path, &text),
    }
}
