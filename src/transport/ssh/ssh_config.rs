//! The OpenSSH client config (`~/.ssh/config`, or `[ssh] config = PATH`), read
//! with the `ssh2-config` crate: `Host` patterns (`*`, `?`, `!negation`), and of
//! their keywords HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump,
//! UserKnownHostsFile and ConnectTimeout. As in OpenSSH the first value found
//! for a keyword wins.
//!
//! It owns reading the file and answering "what does it say for this name"; it
//! must not decide precedence (the inventory's values win, the connector lays
//! them over these) and never dials anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh2_config::{ParseRule, SshConfig};

/// A parsed client config.
#[derive(Debug)]
pub struct ClientConfig {
    path: PathBuf,
    home: PathBuf,
    parsed: SshConfig,
}

/// What the config says for one host name; `None` where it says nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostSettings {
    pub host_name: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// The first IdentityFile (patchbook offers one key per host).
    pub identity: Option<PathBuf>,
    pub identities_only: Option<bool>,
    /// ProxyJump specs, first hop first; empty for `ProxyJump none`.
    pub proxy_jump: Option<Vec<String>>,
    pub known_hosts: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
}

impl ClientConfig {
    /// Reads `path`; `~` in it expands to `home`.
    pub fn load(path: &Path, home: &Path) -> Result<ClientConfig, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read ssh config {}: {e}", path.display()))?;
        let mut reader = std::io::BufReader::new(file);
        let parsed = SshConfig::default()
            .home_dir(home)
            .parse(&mut reader, ParseRule::ALLOW_UNSUPPORTED_FIELDS)
            .map_err(|e| {
                format!(
                    "ssh config {}: {e}; fix the file or point `[ssh] config` elsewhere",
                    path.display()
                )
            })?;
        Ok(ClientConfig {
            path: path.to_path_buf(),
            home: home.to_path_buf(),
            parsed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings for `name` (an inventory host name or a jump spec's host).
    pub fn lookup(&self, name: &str) -> HostSettings {
        let p = self.parsed.query(name);
        // Keywords the crate keeps as raw words: the first word of the first
        // matching block's value.
        let raw = |key: &str| {
            p.unsupported_fields
                .get(key)
                .and_then(|words| words.first())
                .cloned()
        };
        HostSettings {
            host_name: p.host_name.clone(),
            port: p.port,
            user: p.user.clone(),
            identity: p
                .identity_file
                .as_ref()
                .and_then(|ids| ids.first().cloned()),
            identities_only: raw("identitiesonly").map(|v| v.eq_ignore_ascii_case("yes")),
            proxy_jump: p.proxy_jump.as_ref().map(|specs| {
                if specs.len() == 1 && specs[0].eq_ignore_ascii_case("none") {
                    Vec::new()
                } else {
                    specs.clone()
                }
            }),
            known_hosts: raw("userknownhostsfile").map(|f| expand_tilde(&f, &self.home)),
            connect_timeout: p.connect_timeout,
        }
    }
}

fn expand_tilde(path: &str, home: &Path) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if path == "~" => home.to_path_buf(),
        None => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ClientConfig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        std::fs::write(&p, text).unwrap();
        ClientConfig::load(&p, Path::new("/home/ops")).unwrap()
    }

    #[test]
    fn patterns_negation_and_first_value_wins() {
        let c = config(
            "Host db-* !db-legacy\n  HostName 10.0.0.9\n  Port 2200\n  User dba\n\
             Host db-?1\n  Port 9999\n  User other\n  IdentityFile ~/.ssh/db\n\
             Host *\n  User fallback\n  IdentitiesOnly yes\n  ConnectTimeout 7\n\
             \x20 UserKnownHostsFile ~/kh /etc/other\n  ProxyJump ops@gw:22,b2\n",
        );
        let db = c.lookup("db-01");
        assert_eq!(db.host_name.as_deref(), Some("10.0.0.9"));
        assert_eq!((db.port, db.user.as_deref()), (Some(2200), Some("dba")));
        assert_eq!(db.identity, Some(PathBuf::from("/home/ops/.ssh/db")));
        assert_eq!(db.identities_only, Some(true));
        assert_eq!(db.known_hosts, Some(PathBuf::from("/home/ops/kh")));
        assert_eq!(db.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(
            db.proxy_jump,
            Some(vec!["ops@gw:22".to_string(), "b2".to_string()])
        );
        let legacy = c.lookup("db-legacy");
        assert_eq!(legacy.host_name, None);
        assert_eq!(legacy.user.as_deref(), Some("fallback"));
        assert_eq!(c.lookup("web").port, None);
    }

    #[test]
    fn proxyjump_none_means_no_jump() {
        let c = config("Host direct\n  ProxyJump none\nHost *\n  ProxyJump gw\n");
        assert_eq!(c.lookup("direct").proxy_jump, Some(vec![]));
        assert_eq!(c.lookup("x").proxy_jump, Some(vec!["gw".to_string()]));
    }
}
