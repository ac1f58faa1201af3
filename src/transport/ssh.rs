//! The SSH transport over ssh2 (libssh2): one session per host, reused for every
//! step, with strict host-key checking, real per-command deadlines, capped
//! capture, a reliable exit status, and uploads re-hashed on the host.
//!
//! A host behind bastions (`jump` in the inventory, or ProxyJump in the ssh
//! client config) is reached hop by hop over direct-tcpip channels from this
//! process (`tunnel`), with its own host-key check and login at every hop.
//!
//! It owns connections and byte movement only. It must not interpret what the
//! commands do, must never add host keys without the explicit opt-in, and never
//! forwards the agent.

pub mod known_hosts;
pub mod ssh_config;
mod tunnel;

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;
use ssh2::{BlockDirections, MethodType, Session};

use self::known_hosts::{KnownHosts, Verdict};
use self::ssh_config::{ClientConfig, HostSettings};
use self::tunnel::{Tunnel, Wire};
use super::{
    fresh_token, quote, Command, Output, Transport, TransportError, Upload, INLINE_INPUT_MAX,
};
use crate::inventory::{Host, JumpHost};

/// Connect timeout when the config names none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single wait of an SFTP transfer or a short helper command.
const IO_WAIT: Duration = Duration::from_secs(60);
/// Longest a single poll sleeps before the deadline is looked at again.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Builds SSH transports from config + CLI defaults.
#[derive(Debug, Clone)]
pub struct SshConnector {
    user: Option<String>,
    identity: Option<PathBuf>,
    known_hosts: PathBuf,
    connect_timeout: Duration,
    become_root: bool,
    accept_new_host_keys: bool,
    /// The ssh client config, or why it could not be read (every connection then
    /// fails with that message rather than silently ignoring the file).
    client_config: Option<Arc<Result<ClientConfig, String>>>,
}

impl SshConnector {
    /// A connector from `[ssh]` alone; relative paths resolve against the config's
    /// folder. The caller lays command-line overrides over it with the builder
    /// methods ([`identity`](Self::identity), [`known_hosts`](Self::known_hosts), …).
    pub fn from_config(config: &crate::config::Config) -> Self {
        let ssh = &config.ssh;
        let known_hosts = ssh
            .known_hosts
            .as_ref()
            .map(|p| config.resolve(p))
            .unwrap_or_else(|| home().join(".ssh/known_hosts"));
        let connect_timeout = ssh
            .connect_timeout
            .as_deref()
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let connector = SshConnector {
            user: ssh.user.clone(),
            identity: ssh.identity.as_ref().map(|p| config.resolve(p)),
            known_hosts,
            connect_timeout,
            become_root: ssh.r#become,
            accept_new_host_keys: false,
            client_config: None,
        };
        match &ssh.config {
            Some(p) => connector.ssh_config(config.resolve(p)),
            None => {
                let default = home().join(".ssh/config");
                if default.is_file() {
                    connector.ssh_config(default)
                } else {
                    connector
                }
            }
        }
    }

    /// A connector checking against `known_hosts`, with every other setting default.
    pub fn new(known_hosts: impl Into<PathBuf>) -> Self {
        SshConnector {
            user: None,
            identity: None,
            known_hosts: known_hosts.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            become_root: false,
            accept_new_host_keys: false,
            client_config: None,
        }
    }

    /// Reads an OpenSSH client config (`Host` blocks) whose settings apply to
    /// every host and jump host where the inventory gives none.
    pub fn ssh_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_config = Some(Arc::new(ClientConfig::load(&path.into(), &home())));
        self
    }

    pub fn identity(mut self, path: impl Into<PathBuf>) -> Self {
        self.identity = Some(path.into());
        self
    }
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_hosts = path.into();
        self
    }
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    pub fn become_root(mut self, on: bool) -> Self {
        self.become_root = on;
        self
    }
    pub fn accept_new_host_keys(mut self, on: bool) -> Self {
        self.accept_new_host_keys = on;
        self
    }

    /// The known_hosts file checked (after defaults and overrides).
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }
    /// How long a connection may take to open (after defaults and overrides).
    pub fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    /// Connects and authenticates now; the concrete type offers test hooks.
    pub fn connect_ssh(&self, host: &Host) -> Result<SshTransport, TransportError> {
        let mut target = self.target_for(host)?;
        target.sudo = self.sudo_for(host, &target.user)?;
        let conn = target.open()?;
        Ok(SshTransport {
            target,
            conn: Mutex::new(Some(conn)),
            sudo_checked: AtomicBool::new(false),
        })
    }

    /// How `host`'s commands become another user: the inventory's become, else
    /// `[ssh] become` (root, no password) unless the inventory turns become off for
    /// the host; none when `login` already is that user.
    /// A password reference is read here, once per connection, and its value is
    /// added to the process's secrets so nothing written shows it.
    fn sudo_for(
        &self,
        host: &crate::inventory::Host,
        login: &str,
    ) -> Result<Option<Sudo>, TransportError> {
        let wanted = match &host.r#become {
            Some(b) => b.clone(),
            None if self.become_root && !host.become_turned_off() => crate::inventory::Become {
                user: "root".into(),
                password: None,
            },
            None => return Ok(None),
        };
        if wanted.user == login {
            return Ok(None);
        }
        let refuse = |reason: String| TransportError::Become {
            host: host.name.clone(),
            user: wanted.user.clone(),
            reason,
        };
        let password = match &wanted.password {
            None => None,
            Some(reference) => {
                let mut found = Vec::new();
                let value = crate::journal::expand(reference, &mut found)
                    .map_err(|e| refuse(format!("the become password: {e}")))?;
                let secrets = crate::journal::Secrets::process();
                for v in &found {
                    secrets.add(v);
                }
                if value.is_empty() || value.contains(['\n', '\r']) {
                    return Err(refuse(format!(
                        "the become password {reference} is empty or spans lines; sudo reads \
                         one line"
                    )));
                }
                Some((Password(value), reference.clone()))
            }
        };
        Ok(Some(Sudo {
            user: wanted.user,
            password,
        }))
    }
}

impl super::Connector for SshConnector {
    fn connect(
        &self,
        host: &crate::inventory::Host,
    ) -> Result<Box<dyn super::Transport>, super::TransportError> {
        Ok(Box::new(self.connect_ssh(host)?))
    }
}

impl SshConnector {
    /// What the client config says for `name`.
    fn lookup(&self, host: &str, name: &str) -> Result<HostSettings, TransportError> {
        match self.client_config.as_deref() {
            None => Ok(HostSettings::default()),
            Some(Ok(c)) => Ok(c.lookup(name)),
            Some(Err(message)) => Err(TransportError::Other {
                host: host.to_string(),
                message: message.clone(),
            }),
        }
    }

    /// The host and its jump hosts as targets. The inventory's values win; the
    /// client config fills what it leaves open; `[ssh]` and the command line
    /// come last. An address or port counts as given when the inventory set
    /// `ansible_host` / `ansible_port` or it differs from the default.
    fn target_for(&self, host: &Host) -> Result<Target, TransportError> {
        let s = self.lookup(&host.name, &host.name)?;
        let address = if host.vars.contains_key("ansible_host") || host.address != host.name {
            host.address.clone()
        } else {
            s.host_name.clone().unwrap_or_else(|| host.address.clone())
        };
        let port = if host.vars.contains_key("ansible_port") || host.port != 22 {
            host.port
        } else {
            s.port.unwrap_or(host.port)
        };
        let chain: Vec<JumpHost> = match (&host.jump, &s.proxy_jump) {
            (given, _) if !given.is_empty() => given.clone(),
            (_, Some(specs)) => specs
                .iter()
                .map(|spec| JumpHost::parse(spec))
                .collect::<Result<_, _>>()
                .map_err(|message| TransportError::Other {
                    host: host.name.clone(),
                    message: format!("ProxyJump in the ssh config: {message}"),
                })?,
            _ => Vec::new(),
        };
        let mut target = self.target(
            &host.name,
            address,
            port,
            host.user.clone(),
            host.identity.clone(),
            s,
        );
        for hop in chain {
            let s = self.lookup(&host.name, &hop.name)?;
            let address = if hop.address == hop.name {
                s.host_name.clone().unwrap_or(hop.address)
            } else {
                hop.address
            };
            let port = hop.port.or(s.port).unwrap_or(22);
            target
                .jump
                .push(self.target(&hop.name, address, port, hop.user, hop.identity, s));
        }
        Ok(target)
    }

    fn target(
        &self,
        name: &str,
        address: String,
        port: u16,
        user: Option<String>,
        identity: Option<PathBuf>,
        s: HostSettings,
    ) -> Target {
        Target {
            name: name.to_string(),
            address,
            port,
            user: user
                .or(s.user)
                .or_else(|| self.user.clone())
                .unwrap_or_else(super::login_name),
            identity: identity.or(s.identity).or_else(|| self.identity.clone()),
            identities_only: s.identities_only.unwrap_or(false),
            known_hosts: s.known_hosts.unwrap_or_else(|| self.known_hosts.clone()),
            connect_timeout: s.connect_timeout.unwrap_or(self.connect_timeout),
            jump: Vec::new(),
            settings: self.clone(),
            sudo: None,
        }
    }
}

/// Everything needed to (re)open one host's session.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    address: String,
    port: u16,
    user: String,
    identity: Option<PathBuf>,
    /// IdentitiesOnly: with no identity given, the agent is not asked.
    identities_only: bool,
    known_hosts: PathBuf,
    connect_timeout: Duration,
    /// The bastions to go through, first hop first (empty for a direct host).
    jump: Vec<Target>,
    settings: SshConnector,
    /// Commands run through sudo as this user; `None`: as the login user.
    sudo: Option<Sudo>,
}

/// How commands become another user on one host. sudo runs them as `user`; with a
/// password, sudo reads it from its stdin (`sudo -S`), never from argv.
#[derive(Debug, Clone)]
struct Sudo {
    user: String,
    /// The value and the reference it was read from (for messages).
    password: Option<(Password, String)>,
}

/// A sudo password. Its `Debug` shows `***`, so no log of a connector shows it.
#[derive(Clone)]
struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// One open session and the socket under it.
struct Conn {
    sess: Session,
    /// A clone of the session's socket: polled while waiting, shut down to stop a
    /// command at its deadline.
    sock: Wire,
    sftp: Option<ssh2::Sftp>,
    /// The session shell: one `sh` per host that runs the commands in turn.
    shell: Option<ssh2::Channel>,
    /// The session shell's process id, which is also its process group (sshd
    /// starts every session in a session of its own): what a deadline kills.
    shell_pid: Option<u32>,
    /// Set when the session can no longer be trusted; it is dropped after the call.
    broken: bool,
    /// The jump hosts under the session; last, so it is dropped after it.
    _tunnel: Tunnel,
}

/// One host's SSH transport. The session sits behind a mutex: libssh2 sessions
/// are one lock anyway, and the runtime gives each host to one worker at a time.
pub struct SshTransport {
    target: Target,
    conn: Mutex<Option<Conn>>,
    /// Set once sudo agreed to run commands (see [`SshTransport::check_sudo`]).
    sudo_checked: AtomicBool,
}

impl Drop for Conn {
    /// Leaves without waiting for an answer: freeing the session shell's channel on a
    /// live socket would close it politely and wait a round trip for the host's
    /// close, on every host at the end of every run. sshd ends the session, and the
    /// shell with it, when the connection goes.
    fn drop(&mut self) {
        if !self.broken {
            self.sess.set_blocking(false);
            let _ = self
                .sess
                .disconnect(Some(ssh2::DisconnectCode::ByApplication), "done", None);
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Conn {
    /// The session's SFTP channel, started on first use, in blocking mode with the
    /// transfer wait as timeout. A failure to start it breaks the session.
    fn sftp(&mut self, host: &str) -> Result<&ssh2::Sftp, TransportError> {
        self.sess.set_blocking(true);
        self.sess.set_timeout(millis(IO_WAIT));
        if self.sftp.is_none() {
            match self.sess.sftp() {
                Ok(s) => self.sftp = Some(s),
                Err(e) => {
                    self.broken = true;
                    return Err(TransportError::Ssh {
                        host: host.to_string(),
                        context: "start sftp".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        self.sftp.as_ref().ok_or_else(|| TransportError::Other {
            host: host.to_string(),
            message: "no sftp channel".into(),
        })
    }
}

impl Target {
    fn err_ssh(&self, context: &str, e: impl std::fmt::Display) -> TransportError {
        TransportError::Ssh {
            host: self.name.clone(),
            context: context.to_string(),
            message: e.to_string(),
        }
    }

    fn open(&self) -> Result<Conn, TransportError> {
        let span = tracing::info_span!("ssh.connect", host = %self.name, address = %self.address, port = self.port, jumps = self.jump.len());
        let _g = span.enter();
        let started = Instant::now();
        let mut tunnel = Tunnel::default();
        for hop in &self.jump {
            let wire = self
                .reach(&mut tunnel, hop)
                .map_err(|e| self.through(hop, e))?;
            let (sess, sock) = hop.establish(wire).map_err(|e| self.through(hop, e))?;
            tunnel.push(&hop.name, sess, sock);
        }
        let wire = self.reach(&mut tunnel, self)?;
        let (sess, sock) = self.establish(wire)?;
        tracing::debug!(host = %self.name, elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "connected");
        Ok(Conn {
            sess,
            sock,
            sftp: None,
            shell: None,
            shell_pid: None,
            broken: false,
            _tunnel: tunnel,
        })
    }

    fn connect_err(&self, reason: String) -> TransportError {
        TransportError::Connect {
            host: self.name.clone(),
            address: format!("{}:{}", self.address, self.port),
            reason,
        }
    }

    /// A socket to `hop`: a TCP connection from here, or through the tunnel's
    /// last bastion when there is one.
    fn reach(&self, tunnel: &mut Tunnel, hop: &Target) -> Result<Wire, TransportError> {
        if tunnel.last_name().is_some() {
            return tunnel
                .open_next(&hop.address, hop.port, hop.connect_timeout)
                .map_err(|reason| hop.connect_err(reason));
        }
        hop.dial().map(Wire::Tcp)
    }

    /// A jump host's failure as this host's: the host named is the target (the
    /// run counts it there), the message names the bastion.
    fn through(&self, hop: &Target, e: TransportError) -> TransportError {
        let at = format!(
            "jump host `{}` ({}:{}) on the way",
            hop.name, hop.address, hop.port
        );
        match e {
            TransportError::HostKey { reason, .. } => TransportError::HostKey {
                host: self.name.clone(),
                reason: format!("{at}: {reason}"),
            },
            TransportError::Auth { user, reason, .. } => TransportError::Auth {
                host: self.name.clone(),
                user,
                reason: format!("{at}: {reason}"),
            },
            TransportError::Connect {
                address, reason, ..
            } => TransportError::Connect {
                host: self.name.clone(),
                address,
                reason: format!("{at}: {reason}"),
            },
            other => TransportError::Connect {
                host: self.name.clone(),
                address: format!("{}:{}", hop.address, hop.port),
                reason: format!("{at}: {other}"),
            },
        }
    }

    fn dial(&self) -> Result<TcpStream, TransportError> {
        let addrs: Vec<_> = (self.address.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| self.connect_err(format!("cannot resolve: {e}")))?
            .collect();
        let mut last = String::from("no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.connect_timeout) {
                Ok(t) => {
                    let _ = t.set_nodelay(true);
                    return Ok(t);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(self.connect_err(format!("{last} (timeout {:?})", self.connect_timeout)))
    }

    /// Handshake, host-key check and login over `wire`; returns the session and
    /// a clone of its socket.
    fn establish(&self, wire: Wire) -> Result<(Session, Wire), TransportError> {
        let sock = wire
            .try_clone()
            .map_err(|e| self.connect_err(format!("cannot clone socket: {e}")))?;
        let known = KnownHosts::load(&self.known_hosts).map_err(|e| TransportError::HostKey {
            host: self.name.clone(),
            reason: format!(
                "cannot read known_hosts {}: {e}",
                self.known_hosts.display()
            ),
        })?;
        for skipped in &known.skipped {
            tracing::warn!(host = %self.name, "known_hosts line skipped: {skipped}");
        }
        let mut sess = Session::new().map_err(|e| self.err_ssh("new session", e))?;
        wire.attach(&mut sess);
        sess.set_timeout(millis(self.connect_timeout));
        let recorded = known.recorded_types(&self.address, self.port);
        if !recorded.is_empty() {
            // Offer only what is recorded, so a host that also has another key type
            // is not mistaken for one whose key changed.
            let methods = known_hosts::host_key_methods(&recorded);
            if let Err(e) = sess.method_pref(MethodType::HostKey, &methods) {
                tracing::warn!(host = %self.name, "host key preference {methods} not taken: {e}");
            }
        }
        sess.handshake()
            .map_err(|e| self.connect_err(format!("SSH handshake failed: {e}")))?;
        self.check_host_key(&sess, &known)?;
        self.authenticate(&sess)?;
        Ok((sess, sock))
    }

    fn check_host_key(&self, sess: &Session, known: &KnownHosts) -> Result<(), TransportError> {
        let (blob, _) = sess.host_key().ok_or_else(|| TransportError::HostKey {
            host: self.name.clone(),
            reason: "the server presented no host key".into(),
        })?;
        let blob = blob.to_vec();
        let key_type = known_hosts::blob_type(&blob).unwrap_or_else(|| "unknown".into());
        let fp = known_hosts::fingerprint(&blob);
        let file = known.path().display().to_string();
        let pattern = known_hosts::host_pattern(&self.address, self.port);
        let refuse = |reason: String| TransportError::HostKey {
            host: self.name.clone(),
            reason,
        };
        match known.check(&self.address, self.port, &blob) {
            Verdict::Match => Ok(()),
            Verdict::Revoked { line } => Err(refuse(format!(
                "the {key_type} key {fp} of {pattern} is marked @revoked at {file}:{line}; \
                 do not connect until the host has a new key"
            ))),
            Verdict::Changed { line } => Err(refuse(format!(
                "HOST KEY CHANGED for {pattern}: it offers {key_type} {fp}, which differs from the key \
                 recorded at {file}:{line}. Someone may be intercepting the connection, or the host \
                 was reinstalled. Verify the new fingerprint with the host's owner; if the change is \
                 expected, remove the old entry with `ssh-keygen -R '{pattern}' -f {file}` and add \
                 the new one (--accept-new-host-keys never replaces a changed key)"
            ))),
            Verdict::Unknown if self.settings.accept_new_host_keys => {
                KnownHosts::append(&self.known_hosts, &self.address, self.port, &key_type, &blob)
                    .map_err(|e| refuse(format!("cannot record the new key in {file}: {e}")))?;
                tracing::warn!(host = %self.name, key_type = %key_type, fingerprint = %fp,
                    "accepted new host key for {pattern} and appended it to {file}");
                Ok(())
            }
            Verdict::Unknown => Err(refuse(format!(
                "{pattern} is not in {file} (unknown host); it offers {key_type} {fp}. \
                 Check that fingerprint with the host's owner, then add it with \
                 `ssh-keyscan -p {port} {addr} >> {file}`, or pass --accept-new-host-keys \
                 to record new hosts on first contact",
                port = self.port,
                addr = self.address
            ))),
        }
    }

    fn authenticate(&self, sess: &Session) -> Result<(), TransportError> {
        let user = &self.user;
        let auth_err = |reason: String| TransportError::Auth {
            host: self.name.clone(),
            user: user.clone(),
            reason,
        };
        if let Some(id) = &self.identity {
            if !id.is_file() {
                return Err(auth_err(format!(
                    "identity file {} does not exist; fix the inventory's identity / \
                     ansible_ssh_private_key_file, --identity or [ssh].identity",
                    id.display()
                )));
            }
            return pubkey_auth(sess, user, id).map_err(|e| {
                auth_err(format!(
                    "key {} was refused ({e}); is {}.pub in the user's authorized_keys on the host?",
                    id.display(),
                    id.display()
                ))
            });
        }
        let mut tried = Vec::new();
        if !self.identities_only && std::env::var_os("SSH_AUTH_SOCK").is_some() {
            match sess.userauth_agent(user) {
                Ok(()) => return Ok(()),
                Err(e) => tried.push(format!("agent: {e}")),
            }
        }
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home().join(".ssh").join(name);
            if p.is_file() {
                match pubkey_auth(sess, user, &p) {
                    Ok(()) => return Ok(()),
                    Err(e) => tried.push(format!("{}: {e}", p.display())),
                }
            }
        }
        Err(auth_err(if tried.is_empty() {
            "no SSH agent and no ~/.ssh/id_* key; pass --identity FILE or set [ssh].identity".into()
        } else {
            format!(
                "tried {}; pass --identity FILE or load the key into the agent",
                tried.join("; ")
            )
        }))
    }
}

/// Public-key authentication with `private`. With `KEY.pub` beside it, libssh2 reads
/// the public half from there instead of deriving it from the private key, which
/// costs a second private-key decode on every connection; a `.pub` that does not
/// match is not fatal, the key is then tried alone.
fn pubkey_auth(sess: &Session, user: &str, private: &Path) -> Result<(), ssh2::Error> {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    let public = PathBuf::from(name);
    if public.is_file()
        && sess
            .userauth_pubkey_file(user, Some(&public), private, None)
            .is_ok()
    {
        return Ok(());
    }
    sess.userauth_pubkey_file(user, None, private, None)
}

fn is_eagain(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(-37)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis().max(1)).unwrap_or(u32::MAX)
}

/// Waits (at most `max`) until the socket is ready in the direction libssh2 is blocked on.
fn wait_socket(conn: &Conn, max: Duration) {
    let events = match conn.sess.block_directions() {
        // libssh2 is not waiting on the socket: what it needs (an EOF, the exit
        // status, the close) may already sit in its own buffer, where poll(2) cannot
        // see it. Yield briefly instead of sleeping a whole slice.
        BlockDirections::None => {
            std::thread::sleep(Duration::from_micros(200));
            return;
        }
        BlockDirections::Inbound => libc::POLLIN,
        BlockDirections::Outbound => libc::POLLOUT,
        BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
    };
    let mut pfd = libc::pollfd {
        fd: conn.sock.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a socket we own, for a bounded time.
    unsafe {
        libc::poll(
            &mut pfd,
            1,
            i32::try_from(max.as_millis()).unwrap_or(i32::MAX),
        );
    }
}

/// A fresh marker for one command's exit sentinel.
fn sentinel_marker() -> String {
    format!("__PATCHBOOK_EXIT_{}:", fresh_token())
}

/// The shell code that follows every command: its exit status behind a fresh
/// marker, on stdout and on stderr. The marker ends each stream's share of the
/// command; the SSH exit-status message alone cannot tell "0" from "no status
/// sent", the sentinel can.
fn sentinel_code(marker: &str) -> String {
    format!(
        "__pb_s=$?; printf '\\n{marker}%d\\n' \"$__pb_s\"; printf '\\n{marker}%d\\n' \"$__pb_s\" >&2"
    )
}

/// The line a session shell reads for one command. The subshell keeps the
/// command from changing the shell's own state (a `cd`, an `exit`), and stdin
/// comes from /dev/null so the command cannot eat the shell's next lines.
fn shell_line(argv: &[String], marker: &str) -> String {
    format!(
        "( {} ) </dev/null; {}\n",
        quote::argv(argv),
        sentinel_code(marker)
    )
}

/// The exec request that starts a session shell with its first command's line
/// (a [`shell_line`], [`inline_line`] or [`fed_line`]): `/bin/sh` runs it, not the
/// login shell, then becomes the shell that reads the next lines from stdin.
fn starting_line(first: &str) -> String {
    format!(
        "exec /bin/sh -c {}",
        quote::word(&format!("{first}exec /bin/sh"))
    )
}

/// The line for an inline script (`sh -c SCRIPT NAME ARGS…`, see
/// [`Command::script`]): the subshell itself runs the script, with the arguments
/// as its positional parameters, so the host starts no further shell.
fn inline_line(argv: &[String], marker: &str) -> Option<String> {
    let [sh, c, script, _name, args @ ..] = argv else {
        return None;
    };
    if sh != "sh" || c != "-c" {
        return None;
    }
    Some(format!(
        "( set -- {}\n{script}\n) </dev/null; {}\n",
        quote::argv(args),
        sentinel_code(marker)
    ))
}

/// Longest first command sent with the exec request that starts the session
/// shell: far below what an SSH packet and one argument of the host's login shell
/// may hold.
const EXEC_LINE_MAX: usize = 16 * 1024;

/// A session-shell line whose command reads `input` on its stdin: the bytes go
/// base64-encoded in a here-document in the same write as the command, decoded by
/// the host's `base64 -d`. `line` is a [`shell_line`] or [`inline_line`]; its
/// `</dev/null` becomes the decoder's pipe. Without `base64` on the host the
/// command does not run (exit 127): it must never see empty input in place of its
/// data.
fn fed_line(line: &str, input: &[u8], marker: &str) -> Option<String> {
    use base64::Engine;
    let (command, _) = line.rsplit_once(" </dev/null; ")?;
    let end = format!("__PB_INPUT_{}", fresh_token());
    let encoded = base64::engine::general_purpose::STANDARD.encode(input);
    let mut body = String::with_capacity(encoded.len() + encoded.len() / 76 + 256);
    for chunk in encoded.as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        body.push('\n');
    }
    Some(format!(
        "__pb_in() {{ base64 -d <<'{end}'\n{body}{end}\n}}\n\
         if command -v base64 >/dev/null 2>&1; then __pb_in | {command}; \
         else echo 'patchbook: base64 is missing on the host; the command did not run' >&2; (exit 127); fi; {}\n",
        sentinel_code(marker)
    ))
}

/// The exec line of a channel of its own, for a command that reads stdin.
fn channel_line(argv: &[String], marker: &str) -> String {
    format!(
        "{}; {}; exit \"$__pb_s\"",
        quote::argv(argv),
        sentinel_code(marker)
    )
}

/// Splits one output stream of a command at its exit sentinel: passes the
/// command's bytes on as they come, holding back only what could be the start of
/// the sentinel, so a 200 MB stream never sits in memory.
struct Framer {
    needle: Vec<u8>,
    pending: Vec<u8>,
    /// Set once the sentinel line was read: the exit status it carried.
    code: Option<Option<i32>>,
}

impl Framer {
    fn new(marker: &str) -> Self {
        Framer {
            needle: format!("\n{marker}").into_bytes(),
            pending: Vec::new(),
            code: None,
        }
    }

    fn done(&self) -> bool {
        self.code.is_some()
    }

    fn push(
        &mut self,
        bytes: &[u8],
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if self.done() {
            // Written after the command's sentinel: a background process of an
            // earlier command. It belongs to no command; drop it.
            tracing::debug!(
                bytes = bytes.len(),
                "output after the exit sentinel dropped"
            );
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        if let Some(at) = memchr::memmem::find(&self.pending, &self.needle) {
            out(&self.pending[..at])?;
            self.pending.drain(..at);
            let rest = &self.pending[self.needle.len()..];
            if let Some(nl) = memchr::memchr(b'\n', rest) {
                let code = std::str::from_utf8(&rest[..nl])
                    .ok()
                    .and_then(|s| s.parse().ok());
                self.code = Some(code);
                self.pending.clear();
            }
            return Ok(());
        }
        let flush = self.pending.len().saturating_sub(self.needle.len());
        if flush > 0 {
            out(&self.pending[..flush])?;
            self.pending.drain(..flush);
        }
        Ok(())
    }

    /// At the end of the stream without a sentinel: what was held back is output.
    fn finish(&mut self, out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        if !self.done() && !self.pending.is_empty() {
            out(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The exit status, when the sentinel arrived and carried one.
    fn code(&self) -> Option<i32> {
        self.code.flatten()
    }
}

/// The first line a fresh shell prints: its process id (`echo $$` before it
/// becomes the shell that runs the command). Strips that line off the output.
#[derive(Default)]
struct Leader {
    /// Still waiting for the line.
    expected: bool,
    line: Vec<u8>,
    pid: Option<u32>,
}

impl Leader {
    fn expecting() -> Self {
        Leader {
            expected: true,
            ..Leader::default()
        }
    }

    /// The part of `bytes` that is output of the command.
    fn take<'b>(&mut self, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        if !self.expected {
            return Cow::Borrowed(bytes);
        }
        let Some(nl) = memchr::memchr(b'\n', bytes) else {
            self.line.extend_from_slice(bytes);
            // A pid is a few digits; anything longer is no pid line, but output.
            if self.line.len() > 32 {
                self.expected = false;
                return Cow::Owned(std::mem::take(&mut self.line));
            }
            return Cow::Borrowed(&[]);
        };
        self.line.extend_from_slice(&bytes[..nl]);
        self.expected = false;
        self.pid = std::str::from_utf8(&self.line)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            // Never 0 or 1: `kill -1` is every process the user may signal.
            .filter(|pid| *pid > 1);
        Cow::Borrowed(&bytes[nl + 1..])
    }
}

/// The exec line that makes a channel print its shell's pid and then run `line`.
fn with_leader(line: &str) -> String {
    format!("echo $$; {line}")
}

/// How long killing a command's process group on the host may take at most,
/// the one second between TERM and KILL included.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// TERM to the group, a second's grace, then KILL (`$1`: the group id).
/// No `--`: dash's `kill` takes none, and a negative id after the signal is a
/// process group in every POSIX shell.
const KILL_GROUP: &str =
    "kill -TERM -\"$1\" 2>/dev/null || exit 0; sleep 1; kill -KILL -\"$1\" 2>/dev/null; exit 0";

/// Keeps up to `cap` bytes; counts what it drops.
struct Capture {
    kept: Vec<u8>,
    cap: usize,
    dropped: bool,
}

impl Capture {
    fn new(cap: usize) -> Self {
        Capture {
            kept: Vec::new(),
            cap,
            dropped: false,
        }
    }
    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        if bytes.len() > room {
            self.dropped = true;
        }
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

enum Sink<'a> {
    Capture(Capture),
    Stream(&'a mut dyn Write),
}

impl Sink<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Capture(c) => {
                c.push(bytes);
                Ok(())
            }
            Sink::Stream(w) => w.write_all(bytes),
        }
    }
}

/// How a command's channel is driven to its end.
enum Mode<'a> {
    /// A line for the session shell; done when both streams carried the sentinel.
    Shell { line: &'a [u8] },
    /// A channel of its own: stdin is fed and closed; done at end of both streams.
    Channel { stdin: &'a [u8] },
}

/// Why driving a channel stopped short.
enum Stop {
    Deadline,
    Sink(std::io::Error),
    Ssh(&'static str, String),
}

/// Moves bytes between one channel and the command's sinks until `mode` says the
/// command is over, or the deadline passes.
fn drive(
    conn: &Conn,
    ch: &mut ssh2::Channel,
    mode: Mode<'_>,
    deadline: Instant,
    leader: &mut Leader,
    out: (&mut Framer, &mut Sink<'_>),
    err: (&mut Framer, &mut Capture),
) -> Result<(), Stop> {
    let (out_framer, stdout) = out;
    let (err_framer, stderr) = err;
    let (input, shell) = match mode {
        Mode::Shell { line } => (line, true),
        Mode::Channel { stdin } => (stdin, false),
    };
    let mut written = 0usize;
    let mut eof_sent = shell;
    let mut buf = vec![0u8; 32 * 1024];
    let (mut out_eof, mut err_eof) = (false, false);
    loop {
        let mut progress = false;
        if written < input.len() {
            match ch.write(&input[written..]) {
                Ok(n) => {
                    written += n;
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Stop::Ssh("write stdin", e.to_string())),
            }
        }
        if !eof_sent && written >= input.len() {
            match ch.send_eof() {
                Ok(()) => eof_sent = true,
                Err(e) if is_eagain(&e) => {}
                Err(e) => return Err(Stop::Ssh("send eof", e.to_string())),
            }
        }
        if !out_eof {
            match ch.read(&mut buf) {
                Ok(0) => out_eof = ch.eof(),
                Ok(n) => {
                    progress = true;
                    let rest = leader.take(&buf[..n]);
                    out_framer
                        .push(&rest, &mut |b| stdout.write(b))
                        .map_err(Stop::Sink)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Stop::Ssh("read stdout", e.to_string())),
            }
        }
        if !err_eof {
            match ch.stderr().read(&mut buf) {
                Ok(0) => err_eof = ch.eof(),
                Ok(n) => {
                    progress = true;
                    err_framer
                        .push(&buf[..n], &mut |b| {
                            stderr.push(b);
                            Ok(())
                        })
                        .map_err(Stop::Sink)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Stop::Ssh("read stderr", e.to_string())),
            }
        }
        let framed = out_framer.done() && err_framer.done();
        if (shell && framed) || (out_eof && err_eof) {
            out_framer
                .finish(&mut |b| stdout.write(b))
                .map_err(Stop::Sink)?;
            err_framer
                .finish(&mut |b| {
                    stderr.push(b);
                    Ok(())
                })
                .map_err(Stop::Sink)?;
            return Ok(());
        }
        if !progress {
            let now = Instant::now();
            if now >= deadline {
                return Err(Stop::Deadline);
            }
            wait_socket(conn, (deadline - now).min(POLL_SLICE));
        }
    }
}

/// Waits for the host to close a channel whose streams ended.
fn close_channel(conn: &Conn, ch: &mut ssh2::Channel, deadline: Instant) -> Result<(), Stop> {
    loop {
        match ch.wait_close() {
            Ok(()) => return Ok(()),
            Err(e) if is_eagain(&e) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Stop::Deadline);
                }
                wait_socket(conn, (deadline - now).min(POLL_SLICE));
            }
            Err(e) => return Err(Stop::Ssh("close channel", e.to_string())),
        }
    }
}

impl SshTransport {
    /// Runs `f` on the session, reconnecting first if the last one broke; drops
    /// the session afterwards if `f` marked it broken.
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.target.open()?);
        }
        let conn = guard.as_mut().ok_or_else(|| TransportError::Other {
            host: self.target.name.clone(),
            message: "no session".into(),
        })?;
        let r = f(conn);
        if conn.broken {
            let _ = conn.sock.shutdown(Shutdown::Both);
            *guard = None;
        }
        r
    }

    fn sudo(&self) -> Option<&Sudo> {
        self.target.sudo.as_ref()
    }

    /// What goes over the wire for `cmd`.
    ///
    /// Without become, the argv as it is. With become and no password, behind
    /// `sudo -n -u USER --`: sudo fails at once instead of waiting for a password.
    ///
    /// With a password, sudo reads it from its stdin (`sudo -S -p ''`), so it never
    /// appears in any argv on the host (where `ps` shows it to every user) nor in
    /// anything patchbook writes. sudo reads its password one byte at a time, and
    /// reads it only when it asks for one: with a still-valid ticket or a NOPASSWD
    /// rule it reads nothing, and the password would become the command's input.
    /// So the input is `PASSWORD\n GATE\n DATA`, and sudo runs a small root shell
    /// ([`SUDO_GATE`]) that drops every line up to the fresh `GATE` token before it
    /// execs the command on what follows: the command sees exactly its own input,
    /// whichever way sudo went. A command of the session shell has no input of its
    /// own; the two lines come from the shell's `printf` builtin (no process, no
    /// argv). A command with stdin has its channel: the lines go first on it.
    ///
    /// A wrong password would make sudo read the gate and then the command's data
    /// as further attempts; [`SshTransport::check_sudo`] rules that out first.
    /// Per-command passwords (rather than one `sudo -v` and `sudo -n` after) do not
    /// depend on sudo's ticket: its lifetime (`timestamp_timeout`) and scope
    /// (per tty, or per parent process without one) differ from host to host.
    fn wire<'a>(sudo: Option<&Sudo>, cmd: &'a Command, marker: &str) -> CommandWire<'a> {
        // Small input rides in the session shell's line (see [`fed_line`]).
        let fed = |shell: String, exec: String| {
            let input = cmd.stdin.as_deref();
            match input
                .filter(|i| i.len() <= INLINE_INPUT_MAX)
                .and_then(|i| fed_line(&shell, i, marker))
            {
                Some(line) => CommandWire {
                    shell: line,
                    exec,
                    stdin: None,
                    public: true,
                },
                None => CommandWire {
                    shell,
                    exec,
                    stdin: input.map(Cow::Borrowed),
                    public: true,
                },
            }
        };
        let Some(sudo) = sudo else {
            let shell = cmd
                .inline
                .then(|| inline_line(&cmd.argv, marker))
                .flatten()
                .unwrap_or_else(|| shell_line(&cmd.argv, marker));
            return fed(shell, channel_line(&cmd.argv, marker));
        };
        // Under sudo a script needs its own shell: it cannot run inline.
        let Some((password, _)) = &sudo.password else {
            let argv = sudo_argv(&["-n"], &sudo.user, &cmd.argv);
            return fed(shell_line(&argv, marker), channel_line(&argv, marker));
        };
        let gate = format!("__PATCHBOOK_BECOME_{}", fresh_token());
        let mut gated = sv(&["sh", "-c", SUDO_GATE, &gate]);
        gated.extend(cmd.argv.iter().cloned());
        let argv = sudo_argv(&["-S", "-p", ""], &sudo.user, &gated);
        let shell = format!(
            "( printf '%s\\n' {} {gate} | {} ) </dev/null; {}\n",
            quote::word(&password.0),
            quote::argv(&argv),
            sentinel_code(marker)
        );
        let stdin = cmd.stdin.as_deref().map(|data| {
            let mut bytes = format!("{}\n{gate}\n", password.0).into_bytes();
            bytes.extend_from_slice(data);
            Cow::Owned(bytes)
        });
        CommandWire {
            shell,
            exec: channel_line(&argv, marker),
            stdin,
            public: false,
        }
    }

    /// Asks sudo once per transport, before the first command, whether it will run
    /// commands as the become user, so that a refusal fails the host with sudo's
    /// own words instead of as some command's odd exit. With a password, `-k`
    /// makes sudo ask for it even if a ticket is still valid, so a wrong password
    /// fails here, before any command's input could be read as a password attempt;
    /// a NOPASSWD rule passes without asking. Without one, `sudo -n` fails at once
    /// where sudo would want a password.
    fn check_sudo(&self) -> Result<(), TransportError> {
        let Some(sudo) = self.sudo() else {
            return Ok(());
        };
        if self.sudo_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let marker = sentinel_marker();
        let shell = match &sudo.password {
            Some((password, _)) => format!(
                "( printf '%s\\n' {} | {} ) </dev/null; {}\n",
                quote::word(&password.0),
                quote::argv(&sudo_argv(
                    &["-S", "-k", "-p", ""],
                    &sudo.user,
                    &sv(&["true"])
                )),
                sentinel_code(&marker)
            ),
            None => shell_line(&sudo_argv(&["-n"], &sudo.user, &sv(&["true"])), &marker),
        };
        let wire = CommandWire {
            shell,
            exec: String::new(),
            stdin: None,
            public: sudo.password.is_none(),
        };
        let cap = 64 * 1024;
        let out = self.exec_wire(
            &format!("sudo -u {} true", sudo.user),
            IO_WAIT,
            cap,
            &marker,
            wire,
            Sink::Capture(Capture::new(cap)),
        )?;
        if out.success() {
            self.sudo_checked.store(true, Ordering::Release);
            return Ok(());
        }
        let said = out
            .stderr_str()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(crate::journal::scrub)
            .collect::<Vec<_>>()
            .join("; ");
        let login = &self.target.user;
        let reason = match &sudo.password {
            _ if out.code == 127 => format!(
                "sudo is not installed on the host ({said}); install it, or log in as {} instead",
                sudo.user
            ),
            Some((_, reference)) => format!(
                "sudo refused (exit {}): {said}; check that {reference} holds the sudo password \
                 of {login} on this host and that sudoers lets {login} run commands as {}",
                out.code, sudo.user
            ),
            None => format!(
                "sudo -n refused (exit {}): {said}; sudo wants a password of {login} here: give \
                 the host ansible_become_password=${{env:NAME}}, or a NOPASSWD sudoers rule",
                out.code
            ),
        };
        Err(TransportError::Become {
            host: self.target.name.clone(),
            user: sudo.user.clone(),
            reason,
        })
    }

    /// Runs one command. A command without stdin goes to the session's shell, one
    /// `sh` per host that runs every step in turn: each further command then costs
    /// the host one fork, not a channel, a session process and a login shell. A
    /// command with stdin gets a channel of its own, whose end of input is real.
    fn exec(&self, cmd: &Command, stdout: Sink<'_>) -> Result<Output, TransportError> {
        if cmd.argv.is_empty() {
            return Err(TransportError::Other {
                host: self.target.name.clone(),
                message: "empty argv".into(),
            });
        }
        self.check_sudo()?;
        let marker = sentinel_marker();
        let wire = Self::wire(self.sudo(), cmd, &marker);
        self.exec_wire(
            &quote::argv(&cmd.argv),
            cmd.timeout,
            cmd.output_cap,
            &marker,
            wire,
            stdout,
        )
    }

    /// Sends `wire` and drives it to its end. `shown` names the command in logs
    /// and errors: it never holds what `wire` adds (sudo, a password).
    fn exec_wire(
        &self,
        shown: &str,
        timeout: Duration,
        output_cap: usize,
        marker: &str,
        wire: CommandWire<'_>,
        mut stdout: Sink<'_>,
    ) -> Result<Output, TransportError> {
        let host = self.target.name.clone();
        let shown = shown.to_string();
        let span = tracing::info_span!("ssh.command", host = %host, command = %shown);
        let _g = span.enter();
        let deadline = Instant::now() + timeout;
        let in_shell = wire.stdin.is_none();
        self.with_conn(|conn| {
            let fail = |conn: &mut Conn, context: &str, message: String| {
                conn.broken = true;
                TransportError::Ssh {
                    host: host.clone(),
                    context: context.to_string(),
                    message,
                }
            };
            conn.sess.set_blocking(true);
            let remaining = deadline.saturating_duration_since(Instant::now());
            conn.sess.set_timeout(millis(remaining.min(IO_WAIT)));
            // Set when the command went with the request that started the shell.
            let mut sent = false;
            // A fresh channel first prints its shell's pid: the process group a
            // deadline kills on the host.
            let mut leader = Leader::default();
            let opened = match conn.shell.take() {
                Some(ch) if in_shell => Ok(ch),
                _ => conn.sess.channel_session().and_then(|mut ch| {
                    leader = Leader::expecting();
                    let public = wire.public && wire.shell.len() <= EXEC_LINE_MAX;
                    let line = match (in_shell, public) {
                        // A plain POSIX shell (whatever the login shell is) runs this
                        // first command, then becomes the shell that reads the next
                        // ones, one line each, from the channel's stdin: the command's
                        // answer comes with the shell's start, not one round trip after.
                        (true, true) => {
                            sent = true;
                            with_leader(&starting_line(&wire.shell))
                        }
                        (true, false) => with_leader("exec /bin/sh"),
                        (false, _) => with_leader(&wire.exec),
                    };
                    ch.exec(&line).map(|()| ch)
                }),
            };
            if in_shell && leader.expected {
                // A new session shell: the old one's pid means nothing any more.
                conn.shell_pid = None;
            }
            let mut ch = match opened {
                Ok(ch) => ch,
                Err(e) => return Err(fail(conn, "open channel", e.to_string())),
            };
            let mode = match &wire.stdin {
                None => Mode::Shell {
                    line: if sent { &[] } else { wire.shell.as_bytes() },
                },
                Some(bytes) => Mode::Channel { stdin: bytes },
            };
            let mut out_framer = Framer::new(marker);
            let mut err_framer = Framer::new(marker);
            let mut stderr = Capture::new(output_cap);
            conn.sess.set_blocking(false);
            let driven = drive(
                conn,
                &mut ch,
                mode,
                deadline,
                &mut leader,
                (&mut out_framer, &mut stdout),
                (&mut err_framer, &mut stderr),
            );
            if in_shell && leader.pid.is_some() {
                conn.shell_pid = leader.pid;
            }
            // The session shell is kept for the next command only when this one
            // ended cleanly behind both sentinels.
            let mut keep_shell = false;
            let result = match driven {
                Err(Stop::Deadline) => {
                    // The command (and whatever it started) would go on running on
                    // the host after its session is gone: end its process group
                    // first, through the session while it still answers.
                    let group = if in_shell { conn.shell_pid } else { leader.pid };
                    if let Some(group) = group {
                        self.kill_group(conn, group);
                    }
                    conn.broken = true;
                    Err(TransportError::Deadline {
                        host: host.clone(),
                        command: shown.clone(),
                        timeout,
                    })
                }
                Err(Stop::Sink(source)) => {
                    conn.broken = true;
                    Err(TransportError::Io {
                        host: host.clone(),
                        context: "write command output".into(),
                        source,
                    })
                }
                Err(Stop::Ssh(context, message)) => Err(fail(conn, context, message)),
                Ok(()) if in_shell && out_framer.done() && err_framer.done() => {
                    keep_shell = true;
                    out_framer
                        .code()
                        .ok_or_else(|| TransportError::NoExitStatus {
                            host: host.clone(),
                            command: shown.clone(),
                        })
                }
                Ok(()) => {
                    // The channel ended: a command's own channel always does; the
                    // session shell only when the command killed it. The exit signal
                    // tells a killed shell from a finished one.
                    let closed =
                        close_channel(conn, &mut ch, deadline).map_err(|stop| match stop {
                            Stop::Deadline => TransportError::Deadline {
                                host: host.clone(),
                                command: shown.clone(),
                                timeout,
                            },
                            Stop::Sink(source) => TransportError::Io {
                                host: host.clone(),
                                context: "close channel".into(),
                                source,
                            },
                            Stop::Ssh(context, message) => TransportError::Ssh {
                                host: host.clone(),
                                context: context.to_string(),
                                message,
                            },
                        });
                    if let Err(e) = closed {
                        conn.broken = true;
                        Err(e)
                    } else {
                        let signal = ch.exit_signal().ok().and_then(|s| s.exit_signal);
                        if let Some(sig) = &signal {
                            tracing::warn!(host = %host, "remote shell ended by signal {sig}");
                        }
                        match (signal, out_framer.code().or(err_framer.code())) {
                            (None, Some(code)) if !in_shell => Ok(code),
                            _ => Err(TransportError::NoExitStatus {
                                host: host.clone(),
                                command: shown.clone(),
                            }),
                        }
                    }
                }
            };
            if conn.broken {
                // Before the channel is freed: freeing it on a live socket would wait
                // for the host to confirm the close, past the deadline.
                let _ = conn.sock.shutdown(Shutdown::Both);
            }
            conn.sess.set_blocking(true);
            if keep_shell {
                conn.shell = Some(ch);
            } else {
                drop(ch);
            }
            let code = result?;
            let (stdout_bytes, out_dropped) = match stdout {
                Sink::Capture(c) => (c.kept, c.dropped),
                Sink::Stream(_) => (Vec::new(), false),
            };
            tracing::debug!(host = %host, code, "command finished");
            Ok(Output {
                code,
                stdout: stdout_bytes,
                stderr: stderr.kept,
                truncated: out_dropped || stderr.dropped,
            })
        })
    }

    /// Kills process group `group` on the host over a channel of its own (as the
    /// become user, when there is one), within [`KILL_WAIT`]. Best effort: a
    /// session that no longer answers is closed by the caller anyway.
    fn kill_group(&self, conn: &mut Conn, group: u32) {
        let host = &self.target.name;
        let cmd = Command::new(sv(&[
            "sh",
            "-c",
            KILL_GROUP,
            "patchbook-kill",
            &group.to_string(),
        ]))
        // Input of its own: with a sudo password, it goes first on the channel.
        .stdin(Vec::new());
        let marker = sentinel_marker();
        let wire = Self::wire(self.sudo(), &cmd, &marker);
        let deadline = Instant::now() + KILL_WAIT;
        conn.sess.set_blocking(true);
        conn.sess.set_timeout(millis(KILL_WAIT));
        let opened = conn
            .sess
            .channel_session()
            .and_then(|mut ch| ch.exec(&wire.exec).map(|()| ch));
        conn.sess.set_blocking(false);
        let mut ch = match opened {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(host = %host, group, "cannot open a channel to end the command's processes: {e}");
                return;
            }
        };
        let stdin = wire.stdin.as_deref().unwrap_or_default();
        let (mut out_framer, mut err_framer) = (Framer::new(&marker), Framer::new(&marker));
        let mut out = Sink::Capture(Capture::new(4096));
        let mut err = Capture::new(4096);
        let ended = drive(
            conn,
            &mut ch,
            Mode::Channel { stdin },
            deadline,
            &mut Leader::default(),
            (&mut out_framer, &mut out),
            (&mut err_framer, &mut err),
        );
        match ended {
            Ok(()) => {
                tracing::info!(host = %host, group, "ended the command's processes on the host")
            }
            Err(_) => {
                tracing::warn!(host = %host, group, "the host did not confirm the end of the command's processes")
            }
        }
    }

    /// Runs a short helper command, failing unless it exits 0.
    fn helper(&self, argv: Vec<String>, what: &str) -> Result<Output, TransportError> {
        let out = self.run(&Command::new(argv).timeout(IO_WAIT))?;
        if out.success() {
            Ok(out)
        } else {
            Err(TransportError::Other {
                host: self.target.name.clone(),
                message: format!("{what} failed ({}): {}", out.code, out.stderr_str().trim()),
            })
        }
    }

    /// Re-hashes `remote` on the host with `sha256sum` and compares with `sent`.
    pub fn verify_remote(
        &self,
        remote: &str,
        sent: &str,
        size: u64,
    ) -> Result<Upload, TransportError> {
        let out = self.helper(sv(&["sha256sum", "--", remote]), "sha256sum")?;
        self.compare_hash(remote, sent, size, &out)
    }

    fn compare_hash(
        &self,
        remote: &str,
        sent: &str,
        size: u64,
        out: &Output,
    ) -> Result<Upload, TransportError> {
        let found = out
            .stdout_str()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        if found != sent {
            return Err(TransportError::UploadCorrupt {
                host: self.target.name.clone(),
                remote: remote.to_string(),
                sent: sent.to_string(),
                found,
            });
        }
        Ok(Upload {
            remote_path: remote.to_string(),
            size,
            sha256: found,
        })
    }

    /// Writes `local` to `path` on the host over SFTP with `flags` and `mode`, hashing
    /// what is sent and asking the host to fsync the file. Returns the size, the
    /// SHA-256 sent, and whether the fsync was done (an SFTP server without the
    /// fsync@openssh.com extension cannot).
    fn sftp_write(
        &self,
        local: &Path,
        path: &str,
        flags: ssh2::OpenFlags,
        mode: u32,
    ) -> Result<(u64, String, bool), TransportError> {
        let host = self.target.name.clone();
        let mut src = std::fs::File::open(local).map_err(|source| TransportError::Io {
            host: host.clone(),
            context: format!("open {}", local.display()),
            source,
        })?;
        self.with_conn(|conn| {
            let fail = |conn: &mut Conn, context: String, e: &dyn std::fmt::Display| {
                conn.broken = true;
                TransportError::Ssh {
                    host: host.clone(),
                    context,
                    message: e.to_string(),
                }
            };
            let sftp = conn.sftp(&host)?;
            let opened = sftp.open_mode(
                Path::new(path),
                flags,
                // At most 0o7777: fits an i32.
                i32::try_from(mode & 0o7777).unwrap_or(0o600),
                ssh2::OpenType::File,
            );
            let mut file = match opened {
                Ok(f) => f,
                Err(e) => {
                    // A refusal to create the file (permissions, no folder, already
                    // there) leaves the session fine.
                    return Err(TransportError::Ssh {
                        host: host.clone(),
                        context: format!("create {path}"),
                        message: e.to_string(),
                    });
                }
            };
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        return Err(TransportError::Io {
                            host: host.clone(),
                            context: format!("read {}", local.display()),
                            source: e,
                        })
                    }
                };
                hasher.update(&buf[..n]);
                if let Err(e) = file.write_all(&buf[..n]) {
                    return Err(fail(conn, format!("write {path}"), &e));
                }
                size += n as u64;
            }
            let synced = file.fsync().is_ok();
            drop(file);
            Ok((size, hex::encode(hasher.finalize()), synced))
        })
    }

    /// [`Transport::put`] with a hook run after the file is in place and before it
    /// is re-hashed: tests use it to change the file on the host in between.
    pub fn put_with_hook(
        &self,
        local: &Path,
        remote: &str,
        mode: u32,
        before_hash: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Upload, TransportError> {
        let span = tracing::info_span!("ssh.put", host = %self.target.name, remote = %remote);
        let _g = span.enter();
        let tmp = super::staging_name(remote).to_string_lossy().into_owned();
        let (size, sent, synced) = self.sftp_write(
            local,
            &tmp,
            ssh2::OpenFlags::WRITE | ssh2::OpenFlags::CREATE | ssh2::OpenFlags::TRUNCATE,
            0o600,
        )?;
        if !synced {
            self.helper(sv(&["sync", "--", &tmp]), "sync")?;
        }
        let mode = format!("{:o}", mode & 0o7777);
        // OpenSSH's SFTP server cannot rename over a file, hence `mv -f`.
        let place = "mv -f -- \"$1\" \"$2\" && chmod \"$3\" -- \"$2\"";
        let Some(hook) = before_hash else {
            // One process on the host: move, chmod and re-hash together.
            let script = format!("{place} && sha256sum -- \"$2\"");
            let out = self.helper(
                sv(&["sh", "-c", &script, "sh", &tmp, remote, &mode]),
                "move upload into place and re-hash it",
            )?;
            return self.compare_hash(remote, &sent, size, &out);
        };
        self.helper(
            sv(&["sh", "-c", place, "sh", &tmp, remote, &mode]),
            "move upload into place",
        )?;
        hook(remote);
        self.verify_remote(remote, &sent, size)
    }
}

/// The root shell sudo runs in front of a command when a password is fed on stdin
/// (see [`SshTransport::wire`]): drops input lines up to the gate token (`$0`),
/// then becomes the command on the rest of the input.
const SUDO_GATE: &str = "while IFS= read -r l; do [ \"$l\" = \"$0\" ] && exec \"$@\"; done; \
    echo 'patchbook: the input gate never arrived' >&2; exit 125";

/// What goes over the wire for one command (see [`SshTransport::wire`]): the line
/// for the session shell, the exec line of a channel of its own, and, for a
/// command with input, that channel's stdin.
struct CommandWire<'a> {
    shell: String,
    exec: String,
    stdin: Option<Cow<'a, [u8]>>,
    /// The shell line holds no secret, so it may go in the exec request that
    /// starts the session shell (where the host's `ps` shows it).
    public: bool,
}

/// `sudo FLAGS -u USER -- ARGV`.
fn sudo_argv(flags: &[&str], user: &str, argv: &[String]) -> Vec<String> {
    let mut v = sv(&["sudo"]);
    v.extend(sv(flags));
    v.extend(sv(&["-u", user, "--"]));
    v.extend(argv.iter().cloned());
    v
}

fn sv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

impl Transport for SshTransport {
    fn host(&self) -> &str {
        &self.target.name
    }

    fn run(&self, cmd: &Command) -> Result<Output, TransportError> {
        self.exec(cmd, Sink::Capture(Capture::new(cmd.output_cap)))
    }

    fn run_to_writer(&self, cmd: &Command, sink: &mut dyn Write) -> Result<Output, TransportError> {
        self.exec(cmd, Sink::Stream(sink))
    }

    fn put(&self, local: &Path, remote: &str, mode: u32) -> Result<Upload, TransportError> {
        self.put_with_hook(local, remote, mode, None)
    }

    fn put_new(&self, local: &Path, remote: &str, mode: u32) -> Result<Upload, TransportError> {
        let span = tracing::info_span!("ssh.put_new", host = %self.target.name, remote = %remote);
        let _g = span.enter();
        // EXCLUSIVE: the file must not exist, so nothing already there (a link, a
        // file of someone else's) is written through.
        let (size, sent, synced) = self.sftp_write(
            local,
            remote,
            ssh2::OpenFlags::WRITE | ssh2::OpenFlags::CREATE | ssh2::OpenFlags::EXCLUSIVE,
            mode,
        )?;
        if !synced {
            self.helper(sv(&["sync", "--", remote]), "sync")?;
        }
        Ok(Upload {
            remote_path: remote.to_string(),
            size,
            sha256: sent,
        })
    }

    /// Over SFTP: `mkdir` of a name the controller picks at random fails if
    /// anything is there already, which is what `mktemp -d` guarantees too, without
    /// starting a process on the host.
    fn private_dir(&self, tag: &str) -> Result<String, TransportError> {
        let host = self.target.name.clone();
        self.with_conn(|conn| {
            let sftp = conn.sftp(&host)?;
            let mut last = String::new();
            for _ in 0..5 {
                let dir = format!("/tmp/patchbook.{tag}.{}", fresh_token());
                match sftp.mkdir(Path::new(&dir), 0o700) {
                    Ok(()) => return Ok(dir),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(TransportError::Ssh {
                host: host.clone(),
                context: "create a private folder under /tmp".into(),
                message: last,
            })
        })
    }

    fn get(&self, remote: &str, local: &Path) -> Result<u64, TransportError> {
        let host = self.target.name.clone();
        let span = tracing::info_span!("ssh.get", host = %host, remote = %remote);
        let _g = span.enter();
        self.with_conn(|conn| {
            let sftp = conn.sftp(&host)?;
            let mut file = sftp
                .open(Path::new(remote))
                .map_err(|e| TransportError::Ssh {
                    host: host.clone(),
                    context: format!("open {remote}"),
                    message: e.to_string(),
                })?;
            // A download is a copy of a host's file on the controller: owner-only.
            let mut out = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(local)
            }
            .map_err(|e| TransportError::Io {
                host: host.clone(),
                context: format!("create {}", local.display()),
                source: e,
            })?;
            let n = std::io::copy(&mut file, &mut out).map_err(|e| TransportError::Io {
                host: host.clone(),
                context: format!("download {remote}"),
                source: e,
            })?;
            out.sync_all().map_err(|e| TransportError::Io {
                host: host.clone(),
                context: format!("fsync {}", local.display()),
                source: e,
            })?;
            Ok(n)
        })
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// `10`, `10s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` to a framer in chunks of `step`, collecting its output.
    fn frame(marker: &str, bytes: &[u8], step: usize) -> (Vec<u8>, Option<i32>, bool) {
        let mut f = Framer::new(marker);
        let mut got = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            f.push(chunk, &mut |b| {
                got.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        }
        f.finish(&mut |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        (got, f.code(), f.done())
    }

    #[test]
    fn session_shell_lines_frame_each_command_through_a_real_shell() {
        let marker = sentinel_marker();
        let second = sentinel_marker();
        // Two commands on one shell: the first prints without a final newline and
        // tries to change the shell's state; the second must see none of it.
        let script = format!(
            "{}{}",
            shell_line(
                &sv(&["sh", "-c", "printf out; printf 'no newline' >&2; exit 7"]),
                &marker
            ),
            shell_line(&sv(&["cd", "/nonexistent-dir"]), &second),
        );
        let out = std::process::Command::new("sh")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        for step in [1, 7, 4096] {
            let (o, code, done) = frame(&marker, &out.stdout, step);
            assert_eq!((o.as_slice(), code, done), (&b"out"[..], Some(7), true));
            let (e, code, _) = frame(&marker, &out.stderr, step);
            assert_eq!((e.as_slice(), code), (&b"no newline"[..], Some(7)));
        }
        let rest = String::from_utf8_lossy(&out.stdout);
        assert!(rest.contains(&format!("\n{second}")), "{rest}");
        assert!(
            !rest.contains(&format!("{second}0")),
            "cd to a missing dir failed: {rest}"
        );
    }

    #[test]
    fn a_shell_started_with_its_first_command_reads_the_next_from_stdin() {
        let first = sentinel_marker();
        let second = sentinel_marker();
        let cmd = Command::script("printf '%s' \"$1\"; exit 6", "t", &["it's $HOME"]);
        let exec = starting_line(&SshTransport::wire(None, &cmd, &first).shell);
        // The login shell only runs `exec /bin/sh -c WORD`.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&exec)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                let next = shell_line(&sv(&["echo", "next"]), &second);
                child.stdin.take().unwrap().write_all(next.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let (o, code, _) = frame(&first, &out.stdout, 7);
        assert_eq!((o.as_slice(), code), (&b"it's $HOME"[..], Some(6)));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("next\n\n{second}0")), "{text}");
    }

    #[test]
    fn an_inline_script_runs_in_the_shell_with_its_arguments() {
        let marker = sentinel_marker();
        let cmd = Command::script(
            "printf '%s|' \"$@\"; exit 5",
            "patchbook-test",
            &["a b", "$(id)", "it's"],
        );
        let line = inline_line(&cmd.argv, &marker).unwrap();
        let out = std::process::Command::new("sh")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(line.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let (o, code, _) = frame(&marker, &out.stdout, 3);
        assert_eq!((o.as_slice(), code), (&b"a b|$(id)|it's|"[..], Some(5)));
        assert!(inline_line(&sv(&["bash", "-c", "x"]), &marker).is_none());
    }

    #[test]
    fn a_channel_line_exits_with_the_command_status() {
        let marker = sentinel_marker();
        let line = channel_line(&sv(&["sh", "-c", "cat; exit 3"]), &marker);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        let (o, code, _) = frame(&marker, &out.stdout, 3);
        assert_eq!((o.len(), code), (0, Some(3)));
    }

    /// Runs `sh -c line` (or `sh` reading `line`) with a stand-in `sudo` first on
    /// PATH: it reads one password line when `asks` (as sudo does when it
    /// prompts) and fails unless it is `want`, then runs what follows `--`.
    fn with_fake_sudo(asks: bool, want: &str, wire: &CommandWire<'_>) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("sudo");
        std::fs::write(
            &fake,
            "#!/bin/sh\nif [ -n \"$FAKE_ASKS\" ]; then IFS= read -r pw; \
             [ \"$pw\" = \"$FAKE_WANTS\" ] || exit 1; fi\n\
             while [ \"$1\" != -- ]; do shift; done; shift; exec \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut sh = std::process::Command::new("sh");
        let input = match &wire.stdin {
            Some(bytes) => {
                sh.arg("-c").arg(&wire.exec);
                bytes.to_vec()
            }
            None => wire.shell.clone().into_bytes(),
        };
        if asks {
            sh.env("FAKE_ASKS", "1");
        }
        let mut child = sh
            .env("PATH", path)
            .env("FAKE_WANTS", want)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    }

    #[test]
    fn a_sudo_password_goes_to_sudo_on_stdin_and_never_to_the_command() {
        let pw = "p w'x $(id) \\";
        let sudo = Sudo {
            user: "root".into(),
            password: Some((Password(pw.into()), "${env:PW}".into())),
        };
        assert_eq!(format!("{sudo:?}").matches(pw).count(), 0, "{sudo:?}");
        for asks in [true, false] {
            // A command with input: its own channel, the password first on it.
            let marker = sentinel_marker();
            let cmd = Command::new(["sh", "-c", "cat; echo end"]).stdin(b"data\nmore".to_vec());
            let wire = SshTransport::wire(Some(&sudo), &cmd, &marker);
            assert!(!wire.exec.contains(pw), "password in the exec line");
            let out = with_fake_sudo(asks, pw, &wire);
            let (o, code, _) = frame(&marker, &out.stdout, 4096);
            assert_eq!(
                (String::from_utf8_lossy(&o).as_ref(), code),
                ("data\nmoreend\n", Some(0)),
                "asks={asks}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // A command of the session shell: no input of its own at all.
            let marker = sentinel_marker();
            let cmd = Command::new(["sh", "-c", "cat; echo end"]);
            let wire = SshTransport::wire(Some(&sudo), &cmd, &marker);
            let out = with_fake_sudo(asks, pw, &wire);
            let (o, code, _) = frame(&marker, &out.stdout, 4096);
            assert_eq!(
                (o.as_slice(), code),
                (&b"end\n"[..], Some(0)),
                "asks={asks}"
            );
        }
        // Without a password: `sudo -n`, and the command's input untouched.
        let sudo = Sudo {
            user: "app".into(),
            password: None,
        };
        let cmd = Command::new(["sh", "-c", "cat; exit 4"]).stdin(b"x\0y".to_vec());
        let marker = sentinel_marker();
        let wire = SshTransport::wire(Some(&sudo), &cmd, &marker);
        assert!(
            wire.exec.starts_with("sudo -n -u app -- sh -c"),
            "{}",
            wire.exec
        );
        // Small input rides in the session shell's line, behind sudo -n.
        assert_eq!(wire.stdin, None);
        assert!(wire.shell.contains("sudo -n -u app --"), "{}", wire.shell);
        let out = with_fake_sudo(false, "", &wire);
        let (o, code, _) = frame(&marker, &out.stdout, 4096);
        assert_eq!((o.as_slice(), code), (&b"x\0y"[..], Some(4)));
    }

    #[test]
    fn input_rides_in_the_session_shell_line_byte_for_byte() {
        // Every byte value, NULs and newlines included, and a size past one line.
        let input: Vec<u8> = (0..5000u32).map(|i| i.to_le_bytes()[0]).collect();
        let first = sentinel_marker();
        let second = sentinel_marker();
        let script =
            Command::script("cat; printf '|%s' \"$@\"; exit 3", "t", &["a b"]).stdin(input.clone());
        let lines = format!(
            "{}{}",
            SshTransport::wire(None, &script, &first).shell,
            shell_line(&sv(&["echo", "next"]), &second)
        );
        assert_eq!(SshTransport::wire(None, &script, &first).stdin, None);
        let out = std::process::Command::new("sh")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(lines.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let (o, code, _) = frame(&first, &out.stdout, 4096);
        let mut want = input.clone();
        want.extend_from_slice(b"|a b");
        assert_eq!((o, code), (want, Some(3)));
        // The shell reads on after it: the next command runs.
        assert!(String::from_utf8_lossy(&out.stdout).contains("next"));
        // Too much input for a line: a channel of its own.
        let big = Command::new(["cat"]).stdin(vec![b'x'; INLINE_INPUT_MAX + 1]);
        let wire = SshTransport::wire(None, &big, &first);
        assert_eq!(wire.stdin.map(|s| s.len()), Some(INLINE_INPUT_MAX + 1));
    }

    #[test]
    fn a_fresh_channels_pid_line_is_taken_off_its_output() {
        let feed = |chunks: &[&[u8]]| {
            let mut l = Leader::expecting();
            let mut out = Vec::new();
            for c in chunks {
                out.extend_from_slice(&l.take(c));
            }
            (l.pid, out)
        };
        assert_eq!(feed(&[b"4711\nhello"]), (Some(4711), b"hello".to_vec()));
        assert_eq!(
            feed(&[b"47", b"11", b"\nhel", b"lo"]),
            (Some(4711), b"hello".to_vec())
        );
        // Never a group that is every process.
        assert_eq!(feed(&[b"1\nx"]).0, None);
        // A login banner without a newline is output, not swallowed.
        let banner = [b'='; 40];
        let (pid, out) = feed(&[&banner[..20], &banner[20..]]);
        assert_eq!((pid, out.len()), (None, 40));
        // A reused shell prints no pid line.
        let mut l = Leader::default();
        assert_eq!(&*l.take(b"12\n"), b"12\n");
    }

    #[test]
    fn a_missing_sentinel_is_not_a_zero() {
        let marker = sentinel_marker();
        let (o, code, done) = frame(&marker, b"some output\n", 4);
        assert_eq!(
            (o.as_slice(), code, done),
            (&b"some output\n"[..], None, false)
        );
        // Another command's marker is just output.
        let other = sentinel_marker();
        assert_ne!(marker, other);
        let text = format!("\n{other}0\n");
        let (o, code, _) = frame(&marker, text.as_bytes(), 5);
        assert_eq!((o, code), (text.into_bytes(), None));
        // A sentinel line without a number carries no status.
        let (_, code, done) = frame(&marker, format!("x\n{marker}\n").as_bytes(), 2);
        assert_eq!((code, done), (None, true));
    }

    #[test]
    fn capture_keeps_the_cap_and_notes_drops() {
        let mut c = Capture::new(5);
        c.push(b"abc");
        c.push(b"defg");
        assert_eq!(c.kept, b"abcde");
        assert!(c.dropped);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
    }
}
