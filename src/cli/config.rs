//! `patchbook config`: the settings a command would use, each with where it came
//! from (`FILE:LINE`, a command-line flag, or `default`).
//!
//! It owns only the listing. Values are those the layers themselves compute
//! (`ArtifactSettings::from_config`, `BackupLimits::from_config`,
//! `SshConnector::from_config`); it must not decide any default of its own beyond
//! naming the ones those layers leave implicit (the login name, the agent).

use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};

use super::{Cli, CliError};
use crate::config::{origin, Config, ConfigSource};
use crate::runtime::RuntimeError;

/// One resolved setting.
struct Row {
    key: String,
    value: Value,
    origin: String,
}

/// What the config file says, for telling file values from defaults.
struct FileValues {
    path: String,
    tree: Option<toml::Value>,
    lines: std::collections::BTreeMap<String, usize>,
}

impl FileValues {
    fn read(source: &ConfigSource) -> FileValues {
        let Some(path) = source.path() else {
            return FileValues {
                path: String::new(),
                tree: None,
                lines: Default::default(),
            };
        };
        // Already parsed once by `Config::load`; a failure here cannot happen for
        // a config that loaded, and would only cost the line numbers.
        let text = std::fs::read_to_string(path).unwrap_or_default();
        FileValues {
            path: path.display().to_string(),
            tree: toml::from_str(&text).ok(),
            lines: origin::key_lines(&text),
        }
    }

    /// `FILE:LINE` when the file sets `key`.
    fn origin(&self, key: &str) -> Option<String> {
        let mut node = self.tree.as_ref()?;
        for part in key.split('.') {
            node = node.as_table()?.get(part)?;
        }
        let line = origin::line_of(&self.lines, key).unwrap_or(1);
        Some(format!("{}:{line}", self.path))
    }
}

/// `patchbook config`.
pub fn show(cli: &Cli) -> Result<ExitCode, CliError> {
    let opts = cli.options();
    let (config, source) = crate::runtime::load_config(&opts).map_err(RuntimeError::from)?;
    let file = FileValues::read(&source);
    let rows = rows(cli, &config, &file);
    let secrets = config.notify.secrets();
    let redact = |s: &str| crate::journal::redact_str(s, &secrets);
    let (config_value, config_origin) = match &source {
        ConfigSource::Flag(p) => (json!(p.display().to_string()), "--config".to_string()),
        ConfigSource::Found { path, from } => (
            json!(path.display().to_string()),
            format!("found from {}", from.display()),
        ),
        ConfigSource::Defaults { from } => (
            Value::Null,
            format!(
                "default: no {} in {} or any parent",
                origin::FILE_NAME,
                from.display()
            ),
        ),
    };
    if cli.global.json {
        let list: Vec<Value> = std::iter::once(("config".to_string(), config_value, config_origin))
            .chain(rows.into_iter().map(|r| (r.key, r.value, r.origin)))
            .map(|(key, value, origin)| {
                let value = crate::journal::redact_value(value, &secrets);
                json!({"key": key, "value": value, "origin": origin})
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let shown = |v: &Value| match v {
        Value::Null => "(none)".to_string(),
        other => redact(&other.to_string()),
    };
    let mut lines = vec![("config".to_string(), shown(&config_value), config_origin)];
    lines.extend(
        rows.iter()
            .map(|r| (r.key.clone(), shown(&r.value), r.origin.clone())),
    );
    let width = lines
        .iter()
        .map(|(k, v, _)| k.len() + v.len() + 3)
        .max()
        .unwrap_or(0)
        .min(80);
    for (k, v, o) in lines {
        let kv = format!("{k} = {v}");
        println!("{kv:<width$}  # {o}");
    }
    Ok(ExitCode::SUCCESS)
}

fn rows(cli: &Cli, config: &Config, file: &FileValues) -> Vec<Row> {
    let g = &cli.global;
    let mut rows = Vec::new();
    // A value from the command line, else the file, else the default.
    let mut add = |key: &str, value: Value, flag: Option<&str>| {
        let origin = flag
            .map(str::to_string)
            .or_else(|| file.origin(key))
            .unwrap_or_else(|| "default".to_string());
        rows.push(Row {
            key: key.to_string(),
            value,
            origin,
        });
    };
    let path = |p: &Path| json!(p.display().to_string());
    let paths = |ps: &[std::path::PathBuf]| {
        json!(ps
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>())
    };

    let state_dir = g
        .state_dir
        .clone()
        .unwrap_or_else(|| config.resolve(Path::new(".patchbook")));
    add(
        "state_dir",
        path(&state_dir),
        g.state_dir.is_some().then_some("--state-dir"),
    );
    if g.inventory.is_empty() {
        let resolved: Vec<_> = config.inventory.iter().map(|p| config.resolve(p)).collect();
        add("inventory", paths(&resolved), None);
    } else {
        add("inventory", paths(&g.inventory), Some("--inventory"));
    }
    let stdlib = config
        .stdlib_folder()
        .unwrap_or_else(|| Path::new(crate::script::builtin::BUILTIN_ROOT).to_path_buf());
    add("stdlib", path(&stdlib), None);
    add("playbooks", path(&config.playbook_dir()), None);
    add("libraries", paths(&config.library_dirs()), None);
    add("allow_local_hosts", json!(config.allow_local_hosts), None);
    let forks = g
        .forks
        .or(config.forks)
        .unwrap_or(crate::runtime::DEFAULT_FORKS);
    add(
        "forks",
        json!(forks),
        g.forks.is_some().then_some("--forks"),
    );
    add("trusted_sources", json!(config.trusted_sources), None);
    add("http_check_allow", json!(config.http_check_allow), None);

    let artifacts = crate::primitives::artifact::ArtifactSettings::from_config(config, &state_dir);
    add("artifacts.attempts", json!(artifacts.attempts), None);
    add("artifacts.cache_dir", path(&artifacts.cache_dir), None);
    add("artifacts.public_keys", json!(artifacts.public_keys), None);
    add(
        "artifacts.timeout_secs",
        json!(artifacts.timeout.as_secs()),
        None,
    );

    let l = &config.limits;
    for (k, v) in [
        ("max_operations", l.max_operations),
        ("max_call_levels", l.max_call_levels as u64),
        ("max_expr_depth", l.max_expr_depth as u64),
        ("max_function_expr_depth", l.max_function_expr_depth as u64),
        ("max_string_size", l.max_string_size as u64),
        ("max_array_size", l.max_array_size as u64),
        ("max_map_size", l.max_map_size as u64),
        ("max_variables", l.max_variables as u64),
        ("max_modules", l.max_modules as u64),
        ("deadline_secs", l.deadline_secs),
    ] {
        add(&format!("limits.{k}"), json!(v), None);
    }

    let ssh = crate::runtime::ssh_connector(config, &cli.options());
    add(
        "ssh.user",
        json!(config
            .ssh
            .user
            .clone()
            .unwrap_or_else(crate::runtime::login_name)),
        None,
    );
    match (&g.identity, &config.ssh.identity) {
        (Some(id), _) => add("ssh.identity", path(id), Some("--identity")),
        (None, Some(id)) => add("ssh.identity", path(&config.resolve(id)), None),
        (None, None) => add(
            "ssh.identity",
            json!("the SSH agent, then ~/.ssh/id_*"),
            None,
        ),
    }
    add(
        "ssh.known_hosts",
        path(ssh.known_hosts_path()),
        g.known_hosts.is_some().then_some("--known-hosts"),
    );
    add(
        "ssh.connect_timeout",
        json!(crate::config::format_duration(ssh.connect_timeout_value())),
        None,
    );
    add("ssh.become", json!(config.ssh.r#become), None);

    let backup = crate::primitives::backup::BackupLimits::from_config(&config.backup);
    add("backup.max_per_host", json!(backup.max_per_host), None);
    add("backup.max_per_run", json!(backup.max_per_run), None);
    add("backup.min_free", json!(backup.min_free), None);

    let a = &config.audit;
    add(
        "audit.signing_key",
        match &a.signing_key {
            Some(k) => path(&config.resolve(k)),
            None => json!(null),
        },
        None,
    );
    add("audit.verify_key", json!(a.verify_key), None);
    add("audit.syslog", json!(a.syslog), None);
    add("advisories.feeds", json!(config.advisories.feeds), None);
    // Shown without its password: the config may hold one.
    add(
        "store.url",
        json!(config
            .store
            .url
            .as_deref()
            .map(crate::journal::pg::shown_url)),
        None,
    );

    let n = &config.notify;
    add("notify.to", json!(n.to), None);
    add("notify.events", json!(n.events), None);
    add("notify.retries", json!(n.retries), None);
    add(
        "notify.backoff",
        json!(crate::config::format_duration(n.backoff)),
        None,
    );
    add(
        "notify.timeout",
        json!(crate::config::format_duration(n.timeout)),
        None,
    );
    add("notify.contacts_channel", json!(n.contacts_channel), None);
    add("notify.contacts", json!(n.contacts), None);
    // Channels are the operator's own tables: shown as written in the file.
    if let Some(channels) = file
        .tree
        .as_ref()
        .and_then(|t| t.get("notify"))
        .and_then(|t| t.get("channels"))
        .and_then(toml::Value::as_table)
    {
        for (name, table) in channels {
            let key = format!("notify.channels.{name}");
            let value = serde_json::to_value(table).unwrap_or(Value::Null);
            add(&key, value, None);
        }
    }
    rows
}
