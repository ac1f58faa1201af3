//! `patchbook.toml`: the project's settings, read once by the runtime.
//!
//! It owns the file's shape as plain data (every section's type, with its serde
//! defaults), the resolution of relative paths against the config file's folder,
//! and the one duration grammar settings and playbooks share. It is the bottom
//! layer: it imports no other module of the crate, so every layer can read it.
//! Behaviour stays with the layer that uses a section, which converts the plain
//! settings into its own types (`ArtifactSettings::from_config`,
//! `SshConnector::from_config`, `Compiler::from_config`) or gives them methods
//! (`NotifyConfig::check` in `primitives::notify`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod notify;
pub mod origin;
pub mod suggest;

pub use notify::NotifyConfig;
pub use origin::ConfigSource;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Org library folders searched by `import`, after `stdlib/`.
    #[serde(default)]
    pub libraries: Vec<PathBuf>,
    /// The standard library folder; default `stdlib` beside the config when that
    /// folder exists, else the stdlib built into the binary.
    #[serde(default)]
    pub stdlib: Option<PathBuf>,
    /// The playbook folder; default `scripts`.
    #[serde(default)]
    pub playbooks: Option<PathBuf>,
    /// Inventory files used when no `-i` is given.
    #[serde(default)]
    pub inventory: Vec<PathBuf>,
    /// Lets Ansible-format inventories (INI, YAML) declare `ansible_connection=local`
    /// hosts, whose steps run on this controller. Off by default: such a line in an
    /// imported inventory would otherwise patch the controller itself.
    #[serde(default)]
    pub allow_local_hosts: bool,
    /// Default parallelism (`--forks` overrides).
    #[serde(default)]
    pub forks: Option<usize>,
    /// URL prefixes (https) and local directories artifacts may come from.
    #[serde(default)]
    pub trusted_sources: Vec<String>,
    /// Hosts (names) and `http(s)://` URL prefixes `http_check` may query besides
    /// the inventory's own hosts.
    #[serde(default)]
    pub http_check_allow: Vec<String>,
    /// `[artifacts]`: download attempts, cache folder, pinned minisign keys.
    #[serde(default)]
    pub artifacts: ArtifactConfig,
    /// `[limits]`: the script sandbox's limits.
    #[serde(default)]
    pub limits: Limits,
    /// `[ssh]`: defaults for SSH hosts; command-line options override them.
    #[serde(default)]
    pub ssh: SshConfig,
    /// `[notify]`: channels, contacts and automatic notifications.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// `[backup]`: how much a backup may write to the controller's disk.
    #[serde(default)]
    pub backup: BackupConfig,
    /// `[audit]`: the key that signs the journals' anchors, and the one that checks them.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[advisories]`: the advisory feeds `exposure` and `advisories()` read.
    #[serde(default)]
    pub advisories: AdvisoriesConfig,
    /// `[store]`: where run records live (default: files in the state directory).
    #[serde(default)]
    pub store: StoreConfig,
    /// Folder this config was read from; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// SHA-256 of the file's bytes; `None` for built-in defaults. A run records it
    /// so a resume under another config (other trusted sources or keys) is refused.
    #[serde(skip)]
    pub sha256: Option<String>,
}

/// The `[artifacts]` section. `primitives::artifact::ArtifactSettings` fills in
/// the defaults and resolves the cache folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactConfig {
    /// Downloads tried before a checksum or size mismatch fails the run (default 3).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Cache folder; default `<state_dir>/cache/artifacts`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Minisign public keys (the base64 `RW…` line). When any is set, every artifact
    /// needs a signature made by one of them.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// HTTP connect and read timeout in seconds (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Sandbox limits, `[limits]` in `patchbook.toml`, applied by the script layer
/// (re-exported as `script::Limits`). Every one is set: Rhai's own defaults are
/// "unlimited".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_function_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    pub max_variables: usize,
    pub max_modules: usize,
    /// Wall-clock deadline for one call into a script, in seconds.
    pub deadline_secs: u64,
    /// Most memory one call into a script may hold (everything its values keep
    /// alive: captured closures, curried arguments, blobs), in MiB.
    pub max_memory_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 50_000_000,
            max_call_levels: 64,
            max_expr_depth: 64,
            max_function_expr_depth: 32,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_variables: 1_000,
            max_modules: 100,
            deadline_secs: 3600,
            max_memory_mb: 512,
        }
    }
}

/// `[backup]` in `patchbook.toml`: sizes as `"1GiB"`, `"512MiB"`, `"10G"` or a
/// number of bytes. `primitives::backup::BackupLimits::from_config` fills in the
/// defaults (1 GiB per host, 10 GiB per run, 256 MiB kept free).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Most bytes the backups of one host may take in one run.
    #[serde(default)]
    pub max_per_host: Option<ByteSize>,
    /// Most bytes all backups of one run may take.
    #[serde(default)]
    pub max_per_run: Option<ByteSize>,
    /// Free space the state directory's filesystem keeps: a backup does not start
    /// below it, and stops when streaming would go below it.
    #[serde(default)]
    pub min_free: Option<ByteSize>,
}

/// `[audit]` in `patchbook.toml`. Relative paths resolve against the config's folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A raw 32-byte Ed25519 seed file, outside the state directory: signs every
    /// audit index entry, checkpoint and run close.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// `ssh-ed25519 AAAA…`, or a file holding it: `audit verify` requires every
    /// signature to verify with it. Default: the signing key's own public half.
    #[serde(default)]
    pub verify_key: Option<String>,
    /// Also send each signed index entry to the local syslog (`logger`).
    #[serde(default)]
    pub syslog: bool,
}

/// `[store]` in `patchbook.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://USER@HOST/DB` keeps runs and their journal records in
    /// PostgreSQL; unset (or `file`) keeps them as files in the state directory.
    /// `--store` and `PATCHBOOK_STORE` override it.
    #[serde(default)]
    pub url: Option<String>,
}

/// `[advisories]` in `patchbook.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvisoriesConfig {
    /// Feed URLs or paths (each under `trusted_sources`); `URL#sha256=HEX` pins
    /// the digest.
    #[serde(default)]
    pub feeds: Vec<String>,
    /// When `patchbook watch` scans the fleet against the feeds, in the syntax of
    /// a playbook's `schedule()`: `"Sat 02:00 UTC"`, or a cron expression followed
    /// by its zone, `"0 2 * * 6 UTC"`. No scan when absent.
    #[serde(default)]
    pub scan: Option<String>,
    /// The least severity of a newly open CVE that mails the host's owners
    /// (`negligible`, `low`, `medium`, `high`, `critical`); default `high`.
    #[serde(default)]
    pub notify_min_severity: Option<String>,
    /// Which hosts the scheduled scan reads (an inventory selector); default `all`.
    #[serde(default)]
    pub scan_hosts: Option<String>,
}

/// A size in bytes, written in `patchbook.toml` as a number or a string with a
/// unit (see [`parse_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Sizes in settings: `1GiB`, `512MiB`, `64KiB`, `10G`, `500M`, `4096`, `2B`. Units
/// are binary (`G` = `GiB` = 2^30); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad =
        || format!("`{s}` is not a size; write e.g. \"1GiB\", \"512MiB\" or a number of bytes");
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let shift = match t[digits..].trim() {
        "" | "B" => 0,
        "K" | "KiB" | "KB" | "k" => 10,
        "M" | "MiB" | "MB" => 20,
        "G" | "GiB" | "GB" => 30,
        "T" | "TiB" | "TB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is larger than this controller can count"))
}

/// `[ssh]` in `patchbook.toml`. `transport::ssh::SshConnector::from_config` turns
/// it into connection settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub user: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    /// An OpenSSH client config to read (`Host` blocks: HostName, Port, User,
    /// IdentityFile, ProxyJump, …); default `~/.ssh/config` when it exists.
    pub config: Option<PathBuf>,
    #[serde(default)]
    pub r#become: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// Reads a config file. Relative paths inside it are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        cfg.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            text.as_bytes(),
        )));
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// The config a command uses: `--config` when given, else the first
    /// `patchbook.toml` from `cwd` upwards, else every default with paths relative
    /// to `cwd`. Also says which of the three it was.
    pub fn locate(flag: Option<&Path>, cwd: &Path) -> Result<(Self, ConfigSource), ConfigError> {
        let source = origin::locate(flag, cwd);
        let config = match source.path() {
            Some(p) => Config::load(p)?,
            None => Config::defaults_in(cwd),
        };
        Ok((config, source))
    }

    /// Config for a folder with no `patchbook.toml`: every default.
    pub fn defaults_in(dir: &Path) -> Self {
        Config {
            base_dir: dir.to_path_buf(),
            ..Config::default()
        }
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The stdlib folder: the configured one (even when missing, so a typo is
    /// reported, not papered over), else `stdlib` beside the config if it exists.
    /// `None`: imports use the stdlib built into the binary.
    pub fn stdlib_folder(&self) -> Option<PathBuf> {
        match &self.stdlib {
            Some(p) => Some(self.resolve(p)),
            None => Some(self.resolve(Path::new("stdlib"))).filter(|d| d.is_dir()),
        }
    }

    pub fn playbook_dir(&self) -> PathBuf {
        self.resolve(self.playbooks.as_deref().unwrap_or(Path::new("scripts")))
    }

    pub fn library_dirs(&self) -> Vec<PathBuf> {
        self.libraries.iter().map(|p| self.resolve(p)).collect()
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Durations in settings and playbooks, one grammar everywhere. Parses `500ms`, `30s`, `2m`, `1h30m`, `1d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; write e.g. \"30s\", \"2m\" or \"1h30m\"".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("`{s}` is not a duration; write e.g. \"30s\", \"2m\" or \"1h30m\"");
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// The inverse of [`parse_duration`] for whole seconds: `1h30m`, `2m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            format!("{}ms", d.as_millis())
        };
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size(" 512MiB "), Ok(512 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        for bad in ["", "GiB", "1.5G", "-1", "1 parsec", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_backup_section_reads_sizes_as_numbers_or_strings() {
        let c: Config =
            toml::from_str("[backup]\nmax_per_host = \"2MiB\"\nmin_free = 1024\n").unwrap();
        assert_eq!(c.backup.max_per_host, Some(ByteSize(2 << 20)));
        assert_eq!(c.backup.max_per_run, None);
        assert_eq!(c.backup.min_free, Some(ByteSize(1024)));
        let err = toml::from_str::<Config>("[backup]\nmax_per_run = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a size"), "{err}");
        assert!(toml::from_str::<Config>("[backup]\nmax = 1\n").is_err());
    }
}
