//! The runtime: config + inventory + transports + state directory, wired once per
//! process and shared by every command. It owns the per-host connection cache (one
//! session per host, reused for all of that host's steps) and must not parse
//! arguments or know any Rhai.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::{Config, ConfigError, ConfigSource};
use crate::inventory::{Host, Inventory, InventoryError, TransportKind};
use crate::journal::anchor::{Anchor, Signer, Sink, VerifyKey};
use crate::journal::Secrets;
use crate::transport::local::LocalTransport;
#[cfg(feature = "lab")]
use crate::transport::sim::SimTransport;
use crate::transport::ssh::SshConnector;
use crate::transport::{Connector, Transport, TransportError};

// The controller's login name is the SSH layer's default user as well; it lives
// there so the transport layer needs nothing from this one.
pub use crate::transport::login_name;

/// What the command line says about the environment of a run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub inventories: Vec<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub forks: Option<usize>,
    pub limit: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_keys: bool,
    pub operator: Option<String>,
    /// `--store` / `PATCHBOOK_STORE`: overrides `[store] url`.
    pub store: Option<String>,
    /// The secrets store to use; `None` is the process's ([`Secrets::process`]),
    /// which the binary's log writer reads.
    pub secrets: Option<Secrets>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Anchor(#[from] crate::journal::anchor::AnchorError),
    #[error("`[audit] signing_key` {key} is inside the state directory {state_dir}: anyone who can rewrite the journals could then re-sign them; move it elsewhere (readable by the controller only)")]
    KeyInStateDir { key: PathBuf, state_dir: PathBuf },
}

/// Default parallelism when neither `--forks` nor the config says.
pub const DEFAULT_FORKS: usize = 50;

pub struct Runtime {
    pub config: Config,
    pub inventory: Inventory,
    pub state_dir: PathBuf,
    /// Where run records live: `--store`, else `[store] url`, else the state directory.
    store_url: Option<String>,
    pub forks: usize,
    pub operator: String,
    /// Every value shown as `***`: from the config, the inventory and `secret()`.
    pub secrets: Secrets,
    limit: Option<String>,
    /// Set by `run --retry`: only these hosts, whatever the playbook selects.
    only: Option<std::collections::BTreeSet<String>>,
    ssh: SshConnector,
    sessions: Mutex<HashMap<String, Arc<dyn Transport>>>,
}

impl Runtime {
    pub fn build(opts: &Options) -> Result<Self, RuntimeError> {
        let (config, _) = load_config(opts)?;
        let inventory_paths: Vec<PathBuf> = if opts.inventories.is_empty() {
            config.inventory.iter().map(|p| config.resolve(p)).collect()
        } else {
            opts.inventories.clone()
        };
        let inventory = Inventory::load_with(
            &inventory_paths,
            &crate::inventory::LoadOptions {
                allow_local_hosts: config.allow_local_hosts,
            },
        )?;
        Ok(Runtime::from_parts(config, inventory, opts))
    }

    /// A runtime over a config and inventory already in memory (embedding, tests).
    pub fn from_parts(config: Config, inventory: Inventory, opts: &Options) -> Self {
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| config.resolve(Path::new(".patchbook")));
        let forks = opts.forks.or(config.forks).unwrap_or(DEFAULT_FORKS).max(1);
        let operator = opts.operator.clone().unwrap_or_else(login_name);
        let ssh = ssh_connector(&config, opts);
        let secrets = opts.secrets.clone().unwrap_or_else(Secrets::process);
        for secret in configured_secrets(&config, &inventory) {
            secrets.add(&secret);
        }
        let store_url = opts.store.clone().or_else(|| config.store.url.clone());
        Runtime {
            config,
            inventory,
            state_dir,
            store_url,
            forks,
            operator,
            secrets,
            limit: opts.limit.clone(),
            only: None,
            ssh,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Narrows every selection of this runtime to `hosts` (on top of `--limit`):
    /// `run --retry` works on exactly the hosts the earlier run did not patch.
    pub fn restrict_to(&mut self, hosts: impl IntoIterator<Item = String>) {
        self.only = Some(hosts.into_iter().collect());
    }

    /// Hosts matching `selector`, narrowed by `--limit`, in inventory order. Nothing
    /// matched is an error ([`InventoryError::NoMatch`]) naming the selector, the
    /// `--limit` and the nearest names: a typo must not read as "nothing to do".
    pub fn targets(&self, selector: &str) -> Result<Vec<Host>, InventoryError> {
        self.targets_with(selector, false)
    }

    /// Fails when `--limit` matches no host at all: a command checks this before it
    /// starts a journal, so a mistyped limit leaves no run behind.
    pub fn check_limit(&self) -> Result<(), InventoryError> {
        match &self.limit {
            Some(limit) if self.inventory.select(limit)?.is_empty() => {
                Err(InventoryError::NoMatch {
                    what: "--limit",
                    selector: limit.clone(),
                    limit: None,
                    reason: crate::inventory::select::why_empty(&self.inventory, limit),
                })
            }
            _ => Ok(()),
        }
    }

    /// [`Runtime::targets`]; with `allow_empty`, a selector that matches no host
    /// is an empty list. A `--limit` that matches no host at all is an error
    /// either way: it is the operator's, not the playbook's, to allow.
    pub fn targets_with(
        &self,
        selector: &str,
        allow_empty: bool,
    ) -> Result<Vec<Host>, InventoryError> {
        if self.inventory.sources().is_empty() {
            // Said on every selection, not once: a run from the wrong folder must
            // not look like a fleet with nothing to do.
            let why = match &self.config.sha256 {
                None => format!(
                    "no {} in {} or any parent",
                    crate::config::origin::FILE_NAME,
                    self.config.base_dir.display()
                ),
                Some(_) => format!(
                    "{} sets no `inventory`",
                    self.config
                        .base_dir
                        .join(crate::config::origin::FILE_NAME)
                        .display()
                ),
            };
            tracing::warn!(
                "no inventory: no -i given and {why}; selecting `{selector}` finds no host"
            );
        }
        let selected = self.inventory.select(selector)?;
        let found = selected.len();
        let mut hosts: Vec<Host> = selected.into_iter().cloned().collect();
        if let Some(limit) = &self.limit {
            let allowed: std::collections::HashSet<&str> = self
                .inventory
                .select(limit)?
                .iter()
                .map(|h| h.name.as_str())
                .collect();
            if allowed.is_empty() {
                self.check_limit()?;
            }
            hosts.retain(|h| allowed.contains(h.name.as_str()));
        }
        if hosts.is_empty() && !allow_empty {
            let reason = if found > 0 {
                format!("its {found} host(s) are all outside the --limit")
            } else {
                crate::inventory::select::why_empty(&self.inventory, selector)
            };
            return Err(InventoryError::NoMatch {
                what: "selector",
                selector: selector.to_string(),
                limit: self.limit.clone(),
                reason,
            });
        }
        if let Some(only) = &self.only {
            hosts.retain(|h| only.contains(&h.name));
        }
        Ok(hosts)
    }

    /// The host's transport, connecting on first use and reusing it after.
    pub fn transport(&self, host: &Host) -> Result<Arc<dyn Transport>, TransportError> {
        if let Some(t) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host.name)
        {
            return Ok(t.clone());
        }
        // Connect outside the lock: connections to different hosts run in parallel.
        let t: Arc<dyn Transport> =
            match host.transport {
                TransportKind::Local => Arc::new(LocalTransport::new(host.name.clone())),
                TransportKind::Ssh => Arc::from(self.ssh.connect(host)?),
                // Benchmark-only pretend host; see `transport::sim`.
                #[cfg(feature = "lab")]
                TransportKind::Sim => Arc::new(SimTransport::for_host(host)?),
                #[cfg(not(feature = "lab"))]
                TransportKind::Sim => return Err(TransportError::Other {
                    host: host.name.clone(),
                    message:
                        "transport \"sim\" is a benchmark transport this binary was built without; \
                              build with `cargo build --features lab` to use it"
                            .into(),
                }),
            };
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.name.clone(), t.clone());
        Ok(t)
    }

    /// Drops a host's cached session (after a connection error), so the next step
    /// reconnects instead of reusing a dead session.
    pub fn forget(&self, host: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
    }

    /// The key journals sign with (`[audit] signing_key`), read afresh so it is
    /// held in memory only while a run needs it; `None` without one.
    pub fn anchor(&self) -> Result<Option<Anchor>, RuntimeError> {
        let Some(path) = &self.config.audit.signing_key else {
            return Ok(None);
        };
        let path = self.config.resolve(path);
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if real(&path).starts_with(real(&self.state_dir)) {
            return Err(RuntimeError::KeyInStateDir {
                key: path,
                state_dir: self.state_dir.clone(),
            });
        }
        let sink = if self.config.audit.syslog {
            Sink::Syslog
        } else {
            Sink::None
        };
        Ok(Some(Anchor {
            signer: Signer::from_seed_file(&path)?,
            sink,
        }))
    }

    /// The key `audit verify` checks signatures with: `[audit] verify_key`, else
    /// the public half of `[audit] signing_key`; `None` without either.
    pub fn verify_key(&self) -> Result<Option<VerifyKey>, RuntimeError> {
        if let Some(spec) = &self.config.audit.verify_key {
            return Ok(Some(VerifyKey::load(spec, &self.config.base_dir)?));
        }
        Ok(self.anchor()?.map(|a| a.signer.verify_key()))
    }

    /// The store of this runtime's runs: PostgreSQL when `--store` or `[store] url`
    /// names one, else the run files of the state directory.
    pub fn store(&self) -> Result<crate::journal::Store, crate::journal::JournalError> {
        crate::journal::Store::from_url(&self.state_dir, self.store_url.as_deref())
    }

    pub fn ensure_state_dir(&self) -> Result<(), RuntimeError> {
        crate::journal::private::create_dir_all(&self.state_dir).map_err(|source| {
            RuntimeError::StateDir {
                path: self.state_dir.clone(),
                source,
            }
        })
    }
}

/// The config the command line points at (see [`Config::locate`]): `--config`,
/// else the nearest `patchbook.toml` from the current folder upwards.
pub fn load_config(opts: &Options) -> Result<(Config, ConfigSource), ConfigError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    Config::locate(opts.config.as_deref(), &cwd)
}

/// The SSH connector from `[ssh]`, with the command line's options over it: an
/// `--identity` or `--known-hosts` given there wins over the config's.
pub fn ssh_connector(config: &Config, opts: &Options) -> SshConnector {
    let mut ssh = SshConnector::from_config(config).accept_new_host_keys(opts.accept_new_host_keys);
    if let Some(identity) = &opts.identity {
        ssh = ssh.identity(identity.clone());
    }
    if let Some(known_hosts) = &opts.known_hosts {
        ssh = ssh.known_hosts(known_hosts.clone());
    }
    ssh
}

/// Values the config and inventory mark secret: notification credentials, become
/// passwords and the values of each host's `secret_vars`.
pub fn configured_secrets(config: &Config, inventory: &Inventory) -> Vec<String> {
    let mut out = config.notify.secrets();
    for h in inventory.hosts() {
        // Become passwords are references in the inventory; their values (when
        // they can be read now) are hidden from the start, before any connection.
        if let Some(reference) = h.r#become.as_ref().and_then(|b| b.password.as_ref()) {
            let _ = crate::journal::expand(reference, &mut out);
        }
        for name in &h.secret_vars {
            if let Some(v) = h.vars.get(name) {
                out.push(match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing selected is an error naming the selector, the --limit and what was
    /// meant; `allow_empty` lets a selector come back empty but never a --limit
    /// that matches no host at all.
    #[test]
    fn empty_selections_are_errors_unless_allowed() {
        let inv = crate::inventory::native::parse(
            Path::new("inv.toml"),
            "[hosts.web01]\ngroups = [\"web\"]\n[hosts.db01]\ngroups = [\"db\"]\n",
        )
        .unwrap();
        let config = Config::defaults_in(Path::new("."));
        let with_limit = |limit: Option<&str>| {
            let opts = Options {
                limit: limit.map(str::to_string),
                secrets: Some(Secrets::new()),
                ..Options::default()
            };
            Runtime::from_parts(config.clone(), inv.clone(), &opts)
        };
        let rt = with_limit(None);
        let e = rt.targets("dbb").unwrap_err().to_string();
        assert!(e.starts_with("selector `dbb` matched no host (no --limit in force): `dbb` is neither a host nor a group (did you mean `db`?)"), "{e}");
        assert!(rt.targets_with("dbb", true).unwrap().is_empty());
        let rt = with_limit(Some("web"));
        let e = rt.targets("db").unwrap_err().to_string();
        assert!(
            e.contains("(--limit `web` in force): its 1 host(s) are all outside the --limit"),
            "{e}"
        );
        assert!(rt.targets_with("db", true).unwrap().is_empty());
        let rt = with_limit(Some("wbe01"));
        for allow in [false, true] {
            let e = rt.targets_with("all", allow).unwrap_err().to_string();
            assert!(e.starts_with("--limit `wbe01` matched no host"), "{e}");
            assert!(e.contains("did you mean `web01`?"), "{e}");
        }
        assert!(rt.check_limit().is_err());
    }

    /// `--identity` and `--known-hosts` win over `[ssh]`; what they leave unset
    /// comes from the config, resolved against its folder.
    #[test]
    fn command_line_ssh_options_override_the_config() {
        let mut config = Config::defaults_in(Path::new("/etc/pb"));
        config.ssh.identity = Some(PathBuf::from("keys/config_id"));
        config.ssh.known_hosts = Some(PathBuf::from("config_known_hosts"));
        let shown = |opts: &Options| format!("{:?}", ssh_connector(&config, opts));

        let from_config = shown(&Options::default());
        assert!(
            from_config.contains("/etc/pb/keys/config_id"),
            "{from_config}"
        );
        assert!(
            from_config.contains("/etc/pb/config_known_hosts"),
            "{from_config}"
        );
        assert!(
            from_config.contains("accept_new_host_keys: false"),
            "{from_config}"
        );

        let opts = Options {
            identity: Some(PathBuf::from("/cli/id")),
            known_hosts: Some(PathBuf::from("/cli/known_hosts")),
            accept_new_host_keys: true,
            ..Options::default()
        };
        let overridden = shown(&opts);
        assert!(overridden.contains("/cli/id"), "{overridden}");
        assert!(overridden.contains("/cli/known_hosts"), "{overridden}");
        assert!(!overridden.contains("config_"), "{overridden}");
        assert!(
            overridden.contains("accept_new_host_keys: true"),
            "{overridden}"
        );
    }
}
