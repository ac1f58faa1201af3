//! The native TOML inventory format.
//!
//! ```toml
//! [hosts.web01]
//! address = "127.0.0.1"
//! port = 2201
//! groups = ["web", "pilot"]
//! criticality = "low"
//! owner = ["ops@example.com"]
//! depends_on = ["db"]
//! jump = ["bastion", "ops@gw.example:2222"]   # ProxyJump, first hop first
//! transport = "ssh"            # or "local", "sim"
//! identity = "keys/id_ed25519"
//! vars = { role = "frontend", db_password = "hunter2" }
//! secret_vars = ["db_password"]
//! become = true                # run commands through sudo
//! become_user = "root"         # the default
//! become_password = "${env:WEB_SUDO_PASSWORD}"   # a secret reference, or ${file:PATH}
//!
//! [groups.web]
//! vars = { http_port = 80, criticality = "medium" }
//! children = ["web_eu"]
//! ```
//!
//! The typed keys become the vars Ansible would use (`address` is `ansible_host`,
//! `port` `ansible_port`, `user` `ansible_user`, `identity`
//! `ansible_ssh_private_key_file`, `transport` `ansible_connection`, `become*`
//! `ansible_become*`), and
//! `criticality`, `owner`, `depends_on`, `jump` and `secret_vars` stay vars of those names,
//! so group vars can set them too and the precedence rules are the same for every
//! format. Hosts keep file order. This module only reads TOML into a `RawInventory`.
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::data::RawInventory;
use super::{Criticality, Inventory, InventoryError, TransportKind};

/// Parses one native inventory on its own.
pub fn parse(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    let mut raw = RawInventory::default();
    raw.begin_source(path);
    load_into(&mut raw, path, text)?;
    raw.finish()
}

/// A table whose entries keep the order they have in the file.
struct Ordered<T>(Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeFile {
    #[serde(default)]
    hosts: Ordered<NativeHost>,
    #[serde(default)]
    groups: Ordered<NativeGroup>,
}

/// A string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_value(self) -> Value {
        match self {
            OneOrMany::One(s) => Value::from(vec![s]),
            OneOrMany::Many(v) => Value::from(v),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeHost {
    address: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    vars: Ordered<toml::Value>,
    criticality: Option<Criticality>,
    owner: Option<OneOrMany>,
    depends_on: Option<OneOrMany>,
    transport: Option<TransportKind>,
    identity: Option<PathBuf>,
    #[serde(default)]
    secret_vars: Vec<String>,
    jump: Option<OneOrMany>,
    #[serde(rename = "become")]
    become_: Option<bool>,
    become_user: Option<String>,
    become_method: Option<String>,
    become_password: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeGroup {
    #[serde(default)]
    vars: Ordered<toml::Value>,
    #[serde(default)]
    children: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    secret_vars: Vec<String>,
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

pub(crate) fn load_into(
    raw: &mut RawInventory,
    path: &Path,
    text: &str,
) -> Result<(), InventoryError> {
    let file: NativeFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| crate::config::line_col(text, s.start))
            .unwrap_or((1, 1));
        InventoryError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().replace('\n', "; "),
        }
    })?;
    let invalid = |message: String| InventoryError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    // An empty name selects nothing by name and reads as "every host" where a
    // selector is built from it (found by fuzzing): refused, naming where it is.
    let blank = |what: &str| invalid(format!("{what} has an empty name; give it one"));
    for (name, g) in &file.groups.0 {
        if name.trim().is_empty() {
            return Err(blank("a group"));
        }
        if g.children
            .iter()
            .chain(&g.hosts)
            .any(|n| n.trim().is_empty())
        {
            return Err(blank(&format!("a child or host of group `{name}`")));
        }
    }
    for (name, h) in &file.hosts.0 {
        if name.trim().is_empty() {
            return Err(blank("a host"));
        }
        if h.groups.iter().any(|g| g.trim().is_empty()) {
            return Err(blank(&format!("a group of host `{name}`")));
        }
    }
    // Groups first, so `children` exist before hosts join them; host order is
    // what the hosts table says.
    for (name, g) in &file.groups.0 {
        raw.add_group(name);
        for child in &g.children {
            raw.add_child(name, child).map_err(|m| invalid(m.clone()))?;
        }
    }
    for (name, h) in file.hosts.0 {
        raw.add_host(&name, None, None);
        for g in &h.groups {
            raw.add_host(&name, Some(g), None);
        }
        for (k, v) in h.vars.0 {
            raw.set_host_var(&name, &k, toml_to_json(v));
        }
        let typed: [(&str, Option<Value>); 10] = [
            ("ansible_host", h.address.map(Value::from)),
            ("ansible_port", h.port.map(Value::from)),
            ("ansible_user", h.user.map(Value::from)),
            (
                "ansible_ssh_private_key_file",
                h.identity
                    .map(|p| Value::from(p.to_string_lossy().into_owned())),
            ),
            (
                "ansible_connection",
                h.transport.map(|t| {
                    Value::from(match t {
                        TransportKind::Ssh => "ssh",
                        TransportKind::Local => "local",
                        TransportKind::Sim => "sim",
                    })
                }),
            ),
            (
                "criticality",
                h.criticality.map(|c| Value::from(c.as_str())),
            ),
            ("owner", h.owner.map(OneOrMany::into_value)),
            ("depends_on", h.depends_on.map(OneOrMany::into_value)),
            ("jump", h.jump.map(OneOrMany::into_value)),
            (
                "secret_vars",
                (!h.secret_vars.is_empty()).then(|| Value::from(h.secret_vars)),
            ),
        ];
        let become_keys = [
            ("ansible_become", h.become_.map(Value::from)),
            ("ansible_become_user", h.become_user.map(Value::from)),
            ("ansible_become_method", h.become_method.map(Value::from)),
            (
                "ansible_become_password",
                h.become_password.map(Value::from),
            ),
        ];
        for (k, v) in typed.into_iter().chain(become_keys) {
            if let Some(v) = v {
                raw.set_host_var(&name, k, v);
            }
        }
    }
    for (name, g) in file.groups.0 {
        for host in &g.hosts {
            raw.add_host(host, Some(&name), None);
        }
        for (k, v) in g.vars.0 {
            raw.set_group_var(&name, &k, toml_to_json(v));
        }
        if !g.secret_vars.is_empty() {
            raw.set_group_var(&name, "secret_vars", Value::from(g.secret_vars));
        }
    }
    Ok(())
}
