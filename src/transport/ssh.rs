//! The SSH transport over ssh2 (libssh2).
use serde::Deserialize;
use std::path::PathBuf;

/// `[ssh]` in `patchbook.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub user: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub r#become: bool,
}

/// Builds SSH transports from config + CLI defaults.
pub struct SshConnector {}

impl SshConnector {
    pub fn from_config(_config: &crate::config::Config, _opts: &crate::runtime::Options) -> Self {
        SshConnector {}
    }
}

impl super::Connector for SshConnector {
    fn connect(
        &self,
        host: &crate::inventory::Host,
    ) -> Result<Box<dyn super::Transport>, super::TransportError> {
        Err(super::TransportError::Other {
            host: host.name.clone(),
            message: "ssh transport not built yet".into(),
        })
    }
}
