//! The lab fleet: real OpenSSH sshd hosts on loopback, each in its own mount
//! namespace with its own dpkg database (or rpm database, see [`rpm`]), or behind
//! two bastions in a network namespace of their own (see [`bastion`]), for tests,
//! demos and benchmarks.
//! It is never used by a real run.
//!
//! It owns the lab directory (keys, known_hosts, inventories, debs, per-host state)
//! and exactly the processes it starts, which it records by PID in `lab.json`. It
//! must not touch the machine's own dpkg database, apt state, `/opt`, `/etc/acme`,
//! `/etc/init.d` or `/run`: every host sees per-host copies bind-mounted over them
//! in its private mount namespace, and runs in its own PID namespace so that
//! killing its init ([`init`]) ends every process it spawned.

pub mod apt;
pub mod bastion;
pub mod deb;
pub mod init;
pub mod relay;
pub mod rpm;
pub mod sudo;

pub use relay::{Relay, Traffic};
pub use rpm::{Packaging, PkgDb};
pub use sudo::SudoRule;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inventory::{Criticality, Host};
use crate::transport::quote;

/// Where each host's sshd binary lives (Debian's openssh-server).
pub const SSHD: &str = "/usr/sbin/sshd";
/// Name of the state file `lab down` reads.
pub const STATE_FILE: &str = "lab.json";
/// How long `up` waits for every sshd to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs `{tool}`, which is missing: run `.ci/setup` as root")]
    MissingTool { tool: String },
    #[error("the lab needs root (mount namespaces and sshd); run it as root")]
    NotRoot,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("host {host} did not come up within {timeout:?}; see {log}")]
    Start {
        host: String,
        timeout: Duration,
        log: PathBuf,
    },
    #[error("{path}: not a lab state file ({message}); was `lab up` run with this folder?")]
    State { path: PathBuf, message: String },
    #[error("no lab host named `{0}`")]
    NoSuchHost(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("relay in front of {target}: {message}")]
    Relay { target: SocketAddr, message: String },
    #[error("the lab relay process did not start: {message}; see {log}")]
    RelayStart { message: String, log: PathBuf },
    #[error(
        "no relay answers for the lab in {dir} ({message}); was it started with `lab up --rtt`?"
    )]
    NoRelay { dir: PathBuf, message: String },
}

impl LabError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
        move |source| LabError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One lab host as recorded in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabHost {
    pub name: String,
    pub port: u16,
    /// The host's own folder: sshd config, host key, and the trees bind-mounted
    /// over `/var/lib/dpkg`, `/opt`, `/etc/acme`, `/var/log/dpkg.log`, `/root`,
    /// `/etc/init.d`, `/usr/local/sbin`, `/run`, the boot id (see [`init`]) and
    /// apt's own trees (see [`apt::TREES`]).
    pub dir: PathBuf,
    /// The `unshare` process that created the namespaces.
    pub unshare_pid: i32,
    /// The host's init (PID 1 of its PID namespace, the parent of its sshd; see
    /// [`init`]), as seen from outside.
    pub sshd_pid: i32,
    /// Start times (clock ticks since boot) of the two processes, so a recycled PID
    /// is never killed by mistake.
    pub unshare_start: u64,
    pub sshd_start: u64,
    pub groups: Vec<String>,
    pub criticality: Criticality,
    /// Its package database; an RPM host also gets `/var/lib/rpm` and
    /// `/etc/os-release` of its own (see [`rpm`]).
    #[serde(default)]
    pub pkg: PkgDb,
    /// Where it listens, as its last jump host (or this machine) dials it.
    #[serde(default = "loopback")]
    pub address: String,
    /// The lab hosts to go through to reach it, first hop first (see [`bastion`]).
    #[serde(default)]
    pub jump: Vec<String>,
    /// The port of the relay in front of this host's sshd, when the fleet has a
    /// round-trip time (see [`relay`]): the inventories point here instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_port: Option<u16>,
}

impl LabHost {
    /// The port clients connect to: the relay's when there is one, else sshd's.
    pub fn connect_port(&self) -> u16 {
        self.relay_port.unwrap_or(self.port)
    }
}

fn loopback() -> String {
    "127.0.0.1".into()
}

/// Which network namespace a host's processes live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// This machine's: the host listens on its loopback.
    Shared,
    /// A new one, for the inner bastion ([`bastion`]).
    Own,
    /// The one the process with this PID created.
    Join(i32),
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    hosts: Vec<LabHost>,
    /// The relay process `lab up --rtt` left running, stopped by `lab down`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay: Option<RelayProcess>,
}

/// A relay process in front of every host of a lab (see [`relay::serve_fleet`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RelayProcess {
    pub pid: i32,
    /// Its start time, so a recycled PID is never killed by mistake.
    pub start: u64,
    pub rtt_ms: u64,
}

/// A running lab fleet. Dropping it stops exactly its processes, unless it was
/// [`Fleet::detach`]ed (what `patchbook lab up` does).
#[derive(Debug)]
pub struct Fleet {
    dir: PathBuf,
    hosts: Vec<LabHost>,
    children: Vec<Child>,
    attached: bool,
    /// In-process relays, one per host in host order (see [`Fleet::start_relays`]).
    relays: Vec<Relay>,
    relay_process: Option<RelayProcess>,
    /// How its hosts were started; a revived host is started the same way.
    tie: Tie,
}

/// How the fleet's processes relate to the process that starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tie {
    /// The hosts die with the thread that started them (parent-death signal): no
    /// sshd outlives a test binary, even one that never runs destructors.
    ToStartingThread,
    /// The hosts outlive the starting process, until `lab down`.
    Detached,
}

/// What each host's dpkg database starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DpkgDb {
    /// A copy of this machine's database (hundreds of packages): every `dpkg -i`
    /// and `dpkg-query` pays what it pays on a real server.
    #[default]
    Machine,
    /// A fresh database holding acme-agent alone: the package manager's own cost
    /// drops to a few milliseconds, so what a tool adds around it shows.
    Minimal,
}

impl std::str::FromStr for DpkgDb {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "machine" => Ok(DpkgDb::Machine),
            "minimal" => Ok(DpkgDb::Minimal),
            other => Err(format!(
                "unknown dpkg database {other:?}: use machine or minimal"
            )),
        }
    }
}

impl Fleet {
    /// Starts `n` hosts in `dir`, tied to the calling thread (see [`Tie`]).
    pub fn up(n: usize, dir: &Path) -> Result<Fleet, LabError> {
        Fleet::start(n, dir, Tie::ToStartingThread)
    }

    /// Starts `n` hosts in `dir` (created if missing) and waits until each accepts
    /// connections.
    pub fn start(n: usize, dir: &Path, tie: Tie) -> Result<Fleet, LabError> {
        Fleet::start_with(n, dir, tie, DpkgDb::Machine)
    }

    /// [`Fleet::start`] with the hosts' dpkg databases starting as `db`.
    pub fn start_with(n: usize, dir: &Path, tie: Tie, db: DpkgDb) -> Result<Fleet, LabError> {
        Fleet::start_mixed(&vec![PkgDb::Dpkg; n], dir, tie, db)
    }

    /// Starts one host per entry of `kinds`, each with that package database, in
    /// one fleet: host `i` is `lab{i+1:02}` and is in the inventory group `dpkg` or
    /// `rpm`. dpkg hosts' databases start as `db`.
    pub fn start_mixed(
        kinds: &[PkgDb],
        dir: &Path,
        tie: Tie,
        db: DpkgDb,
    ) -> Result<Fleet, LabError> {
        Fleet::start_layout(kinds, dir, tie, db, false)
    }

    /// [`Fleet::start_mixed`] with the hosts (`lab01`…) where only `bastion2` can
    /// reach them, and the two bastions (dpkg hosts, group `bastion`, the only
    /// ones that allow TCP forwarding): `bastion1` on loopback, `bastion2`
    /// reachable from this machine only at its veth address (see [`bastion`]).
    /// The inventories give every target `jump = ["bastion1", "bastion2"]`.
    pub fn start_behind_bastions(
        kinds: &[PkgDb],
        dir: &Path,
        tie: Tie,
        db: DpkgDb,
    ) -> Result<Fleet, LabError> {
        Fleet::start_layout(kinds, dir, tie, db, true)
    }

    fn start_layout(
        targets: &[PkgDb],
        dir: &Path,
        tie: Tie,
        db: DpkgDb,
        bastions: bool,
    ) -> Result<Fleet, LabError> {
        let lead = if bastions { 2 } else { 0 };
        let mut kinds = vec![PkgDb::Dpkg; lead];
        kinds.extend_from_slice(targets);
        let kinds = &kinds[..];
        let n = kinds.len();
        let has_rpm = kinds.contains(&PkgDb::Rpm);
        preflight()?;
        if has_rpm {
            rpm::preflight()?;
        }
        std::fs::create_dir_all(dir).map_err(LabError::io(dir))?;
        let dir = std::fs::canonicalize(dir).map_err(LabError::io(dir))?;
        let hosts_dir = dir.join("hosts");
        std::fs::create_dir_all(&hosts_dir).map_err(LabError::io(&hosts_dir))?;
        let mut names: Vec<String> = Vec::new();
        if bastions {
            names.extend([bastion::OUTER.to_string(), bastion::INNER.to_string()]);
        }
        names.extend((1..=targets.len()).map(host_name));
        for name in &names {
            let h = hosts_dir.join(name);
            let _ = std::fs::remove_dir_all(&h);
            std::fs::create_dir_all(&h).map_err(LabError::io(&h))?;
        }

        // Every key at once: ssh-keygen processes run in parallel.
        let mut keygens = vec![spawn_keygen(
            &dir.join("id_ed25519"),
            "patchbook-lab-controller",
        )?];
        for name in &names {
            keygens.push(spawn_keygen(
                &hosts_dir.join(name).join("ssh_host_ed25519_key"),
                name,
            )?);
        }
        deb::build_acme_agent(&dir.join("debs"))?;
        if kinds.contains(&PkgDb::Dpkg) {
            build_template(&dir, db)?;
        }
        if has_rpm {
            rpm::build_template(&dir)?;
        }
        for (mut child, what) in keygens {
            wait_tool(&mut child, &what)?;
        }
        let pubkey = dir.join("id_ed25519.pub");
        std::fs::copy(&pubkey, dir.join("authorized_keys")).map_err(LabError::io(&pubkey))?;

        let items: Vec<(usize, String)> = names.iter().cloned().enumerate().collect();
        let template = dir.join("template");
        let rpm_template = dir.join(rpm::TEMPLATE);
        crate::rollout::pool::map_bounded(&items, 4, |(i, name)| match kinds[*i] {
            PkgDb::Dpkg => seed_host(&template, &hosts_dir.join(name)),
            PkgDb::Rpm => rpm::seed_host(&rpm_template, &hosts_dir.join(name)),
        })
        .into_iter()
        .collect::<Result<Vec<()>, LabError>>()?;

        let penalties = supports_option("PerSourcePenalties no");
        let mut fleet = Fleet {
            dir: dir.clone(),
            hosts: Vec::new(),
            children: Vec::new(),
            attached: true,
            relays: Vec::new(),
            relay_process: None,
            tie,
        };
        // Held until each host's sshd is about to bind (see `free_ports`).
        let mut reserved = free_ports(n)?;
        let ports: Vec<u16> = reserved.iter().map(|(_, p)| *p).collect();
        let mut pending = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let hdir = hosts_dir.join(name);
            // The inner bastion listens on every address of its namespace: the
            // veth one is added after sshd starts.
            let listen = if bastions && i == 1 {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            };
            write_sshd_config(&dir, &hdir, listen, ports[i], penalties, i < lead)?;
            pending.push((i, name.clone(), hdir, ports[i]));
        }
        validate_configs(&pending)?;
        // The PID whose network namespace holds bastion2 and the targets.
        let mut inner_ns = None;
        for (i, name, hdir, port) in &pending {
            let net = match *i {
                _ if !bastions => Net::Shared,
                0 => Net::Shared,
                1 => Net::Own,
                _ => inner_ns.map_or(Net::Shared, Net::Join),
            };
            let jump = match net {
                Net::Shared => Vec::new(),
                Net::Own => vec![bastion::OUTER.to_string()],
                Net::Join(_) => vec![bastion::OUTER.to_string(), bastion::INNER.to_string()],
            };
            let (groups, criticality) = if *i < lead {
                (vec![bastion::GROUP.to_string()], Criticality::Low)
            } else {
                let (mut g, c) = placement(*i - lead, n - lead);
                g.push(kinds[*i].as_str().to_string());
                (g, c)
            };
            reserved[*i].0.take();
            let child = spawn_host(hdir, tie, kinds[*i], net)?;
            let pid = child.id().cast_signed();
            fleet.children.push(child);
            fleet.hosts.push(LabHost {
                name: name.clone(),
                port: *port,
                dir: hdir.clone(),
                unshare_pid: pid,
                sshd_pid: 0,
                unshare_start: start_time(pid).unwrap_or(0),
                sshd_start: 0,
                groups,
                criticality,
                pkg: kinds[*i],
                address: loopback(),
                jump,
                relay_port: None,
            });
            if net == Net::Own {
                // Linked once the host is recorded, so a failure still stops it.
                let outside = bastion::link(pid)?;
                inner_ns = Some(pid);
                if let Some(h) = fleet.hosts.last_mut() {
                    h.address = outside;
                }
            }
        }
        fleet.wait_ready()?;
        fleet.write_files()?;
        if tie == Tie::Detached {
            fleet.attached = false;
        }
        Ok(fleet)
    }

    /// Waits until every sshd accepts, and learns each sshd's outer PID. A host
    /// whose sshd lost its port to another process is started again on a fresh
    /// one (see `free_ports`).
    fn wait_ready(&mut self) -> Result<(), LabError> {
        let started = Instant::now();
        let mut ready = vec![false; self.hosts.len()];
        let mut restarts = vec![0usize; self.hosts.len()];
        while ready.iter().any(|r| !r) {
            for i in 0..self.hosts.len() {
                if ready[i] {
                    continue;
                }
                let h = &self.hosts[i];
                // A host behind a bastion is not dialled from here: its sshd writes
                // its PID file once it listens.
                let up = if h.jump.is_empty() {
                    let addr = SocketAddr::from(([127, 0, 0, 1], h.port));
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                } else {
                    std::fs::metadata(h.dir.join("sshd.pid")).is_ok_and(|m| m.len() > 0)
                };
                if up {
                    ready[i] = true;
                    continue;
                }
                let exited = self.children[i].try_wait().ok().flatten().is_some();
                if exited
                    && h.jump.is_empty()
                    && restarts[i] < PORT_RESTARTS
                    && lost_its_port(&h.dir.join("sshd.log"))
                {
                    restarts[i] += 1;
                    self.restart_on_fresh_port(i)?;
                    continue;
                }
                if exited || started.elapsed() > START_DEADLINE {
                    return Err(LabError::Start {
                        host: h.name.clone(),
                        timeout: START_DEADLINE,
                        log: h.dir.join("sshd.log"),
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let children = children_by_parent();
        for h in &mut self.hosts {
            let kid = children
                .get(&h.unshare_pid)
                .and_then(|k| k.first().copied())
                .ok_or_else(|| LabError::Start {
                    host: h.name.clone(),
                    timeout: START_DEADLINE,
                    log: h.dir.join("sshd.log"),
                })?;
            h.sshd_pid = kid;
            h.sshd_start = start_time(kid).unwrap_or(0);
        }
        Ok(())
    }

    /// Starts host `i` (on this machine's loopback) again with a new port in its
    /// sshd_config, after its sshd found the old one taken.
    fn restart_on_fresh_port(&mut self, i: usize) -> Result<(), LabError> {
        let mut fresh = free_ports(1)?;
        let Some((listener, port)) = fresh.pop() else {
            return Err(LabError::Unsupported("no free loopback port".into()));
        };
        let h = &self.hosts[i];
        let cfg_path = h.dir.join("sshd_config");
        let cfg = std::fs::read_to_string(&cfg_path).map_err(LabError::io(&cfg_path))?;
        let old = format!(":{}\n", h.port);
        let cfg = cfg.replacen(&old, &format!(":{port}\n"), 1);
        write(&cfg_path, &cfg)?;
        drop(listener);
        let child = spawn_host(&h.dir, self.tie, h.pkg, Net::Shared)?;
        let pid = child.id().cast_signed();
        let mut old_child = std::mem::replace(&mut self.children[i], child);
        let _ = old_child.wait();
        let h = &mut self.hosts[i];
        h.port = port;
        h.unshare_pid = pid;
        h.unshare_start = start_time(pid).unwrap_or(0);
        Ok(())
    }

    /// Writes keys' companions: known_hosts, inventories, patchbook.toml, lab.json.
    fn write_files(&self) -> Result<(), LabError> {
        let d = &self.dir;
        let mut known = String::new();
        for h in &self.hosts {
            let p = h.dir.join("ssh_host_ed25519_key.pub");
            let key = std::fs::read_to_string(&p).map_err(LabError::io(&p))?;
            let mut parts = key.split_whitespace();
            let (kind, blob) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            // A relayed host is checked under the address patchbook dials, the
            // relay's; sshd's own port stays listed for direct access.
            for port in std::iter::once(h.port).chain(h.relay_port) {
                let _ = writeln!(known, "[{}]:{port} {kind} {blob}", h.address);
            }
        }
        write(&d.join("known_hosts"), &known)?;
        let identity = d.join("id_ed25519");
        let id = identity.display();

        let mut toml = String::from("# patchbook lab inventory (written by `patchbook lab up`)\n");
        for h in &self.hosts {
            let groups: Vec<String> = h.groups.iter().map(|g| format!("{g:?}")).collect();
            let _ = write!(
                toml,
                "\n[hosts.{}]\naddress = \"{}\"\nport = {}\nuser = \"root\"\n\
                 identity = \"{id}\"\ngroups = [{}]\ncriticality = \"{}\"\n\
                 owner = [\"ops@example.com\"]\n",
                h.name,
                h.address,
                h.connect_port(),
                groups.join(", "),
                h.criticality.as_str()
            );
            if !h.jump.is_empty() {
                let jump: Vec<String> = h.jump.iter().map(|j| format!("{j:?}")).collect();
                let _ = writeln!(toml, "jump = [{}]", jump.join(", "));
            }
        }
        write(&d.join("inventory.toml"), &toml)?;

        let mut ini = String::from("# patchbook lab inventory, Ansible INI\n");
        for h in &self.hosts {
            let jump = if h.jump.is_empty() {
                String::new()
            } else {
                format!(" ansible_ssh_common_args='-J {}'", h.jump.join(","))
            };
            let _ = writeln!(
                ini,
                "{} ansible_host={} ansible_port={} ansible_user=root \
                 ansible_ssh_private_key_file={id} criticality={}{jump}",
                h.name,
                h.address,
                h.connect_port(),
                h.criticality.as_str()
            );
        }
        for group in ["pilot", "web", "db", "dpkg", "rpm", bastion::GROUP] {
            let _ = writeln!(ini, "\n[{group}]");
            for h in self
                .hosts
                .iter()
                .filter(|h| h.groups.iter().any(|g| g == group))
            {
                let _ = writeln!(ini, "{}", h.name);
            }
        }
        write(&d.join("inventory.ini"), &ini)?;

        write(
            &d.join("patchbook.toml"),
            &format!(
                "# patchbook settings for the lab fleet in this folder\n\
                 inventory = [\"inventory.toml\"]\n\
                 # the lab's packages are an offline mirror patches may come from\n\
                 trusted_sources = [\"{}\"{}]\n\n[ssh]\nuser = \"root\"\n\
                 identity = \"{id}\"\nknown_hosts = \"{}\"\n",
                d.join("debs").display(),
                if self.hosts.iter().any(|h| h.pkg == PkgDb::Rpm) {
                    format!(", \"{}\"", d.join(rpm::RPMS_DIR).display())
                } else {
                    String::new()
                },
                d.join("known_hosts").display()
            ),
        )?;
        let state = State {
            hosts: self.hosts.clone(),
            relay: self.relay_process.clone(),
        };
        let json = serde_json::to_string_pretty(&state).unwrap_or_default();
        write(&d.join(STATE_FILE), &json)
    }

    /// Keeps the hosts running after this value is dropped (until `lab down`).
    /// In-process relays (see [`Fleet::start_relays`]) still end with this value.
    pub fn detach(mut self) {
        self.attached = false;
        self.children.clear();
    }

    /// Puts a relay with round-trip time `rtt` in front of every host, in this
    /// process: the inventories, known_hosts and [`Fleet::inventory_hosts`] point
    /// at the relays from then on. The relays end with this value.
    pub fn start_relays(&mut self, rtt: Duration) -> Result<(), LabError> {
        self.relays = self
            .hosts
            .iter()
            .map(|h| Relay::start(SocketAddr::from(([127, 0, 0, 1], h.port)), rtt))
            .collect::<Result<_, _>>()?;
        for (h, r) in self.hosts.iter_mut().zip(&self.relays) {
            h.relay_port = Some(r.addr().port());
        }
        self.write_files()
    }

    /// Starts `relay_process` (the current program's `lab relay` verb, which runs
    /// [`relay::serve_fleet`]) detached, waits for its ports and routes every host
    /// through them, recording the process in `lab.json` for `lab down`.
    pub fn start_relay_process(
        &mut self,
        mut relay_process: std::process::Command,
        rtt: Duration,
    ) -> Result<(), LabError> {
        let log = self.dir.join("relay.log");
        let log_file = std::fs::File::create(&log).map_err(LabError::io(&log))?;
        relay_process
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // SAFETY: only setsid, async-signal-safe, between fork and exec.
        unsafe {
            relay_process.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let failed = |message: String| LabError::RelayStart {
            message,
            log: log.clone(),
        };
        let mut child = relay_process
            .spawn()
            .map_err(|e| failed(format!("cannot start it: {e}")))?;
        let pid = child.id().cast_signed();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            // Its end of the pipe closes when it exits, so this never hangs on a
            // relay that died.
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        let Some(ports) = relay::read_ready(&line, self.hosts.len()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("it said {:?}", line.trim())));
        };
        self.relay_process = Some(RelayProcess {
            pid,
            start: start_time(pid).unwrap_or(0),
            rtt_ms: u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX),
        });
        for (h, port) in self.hosts.iter_mut().zip(ports) {
            h.relay_port = Some(port);
        }
        self.write_files()
    }

    /// What each host's in-process relay has seen, in host order (empty without
    /// [`Fleet::start_relays`]).
    pub fn traffic(&self) -> Vec<(String, Traffic)> {
        self.hosts
            .iter()
            .zip(&self.relays)
            .map(|(h, r)| (h.name.clone(), r.traffic()))
            .collect()
    }

    /// Zeroes every in-process relay's counters.
    pub fn reset_traffic(&self) {
        self.relays.iter().for_each(Relay::reset);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }
    pub fn identity(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    pub fn deb(&self, version: &str) -> PathBuf {
        self.dir.join("debs").join(deb::file_name(version))
    }

    pub fn host(&self, name: &str) -> Result<&LabHost, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::NoSuchHost(name.to_string()))
    }

    /// The lab hosts as inventory hosts (what `inventory.toml` describes).
    pub fn inventory_hosts(&self) -> Vec<Host> {
        self.hosts
            .iter()
            .map(|h| {
                let mut host = Host::new(h.name.clone());
                host.address = h.address.clone();
                host.port = h.connect_port();
                host.jump = h
                    .jump
                    .iter()
                    .filter_map(|j| self.host(j).ok())
                    .map(|b| crate::inventory::JumpHost {
                        name: b.name.clone(),
                        address: b.address.clone(),
                        port: Some(b.connect_port()),
                        user: Some("root".into()),
                        identity: Some(self.identity()),
                    })
                    .collect();
                host.user = Some("root".into());
                host.identity = Some(self.identity());
                host.groups = h.groups.clone();
                host.criticality = h.criticality;
                host.owners = vec!["ops@example.com".into()];
                host
            })
            .collect()
    }

    /// Kills one host's sshd, and with it everything in its PID namespace: the
    /// host is dead from then on.
    pub fn kill_host(&self, name: &str) -> Result<(), LabError> {
        let h = self.host(name)?;
        kill_checked(h.sshd_pid, h.sshd_start);
        wait_gone(h.sshd_pid, Duration::from_secs(5));
        Ok(())
    }

    /// Starts a host again after [`Fleet::kill_host`] (or a reboot it did not come
    /// back from): new namespaces over the same folder, so it keeps its keys, port
    /// and package database. Returns once its sshd accepts connections.
    pub fn revive_host(&mut self, name: &str) -> Result<(), LabError> {
        let i = self
            .hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| LabError::NoSuchHost(name.to_string()))?;
        let old = self.hosts[i].clone();
        for (pid, start) in [
            (old.sshd_pid, old.sshd_start),
            (old.unshare_pid, old.unshare_start),
        ] {
            if kill_checked(pid, start) {
                wait_gone(pid, Duration::from_secs(5));
            }
        }
        if !old.jump.is_empty() {
            return Err(LabError::Unsupported(format!(
                "{name} sits behind bastions; reviving such a host is not supported: start a new lab"
            )));
        }
        let mut child = spawn_host(&old.dir, self.tie, old.pkg, Net::Shared)?;
        let pid = child.id().cast_signed();
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], old.port));
        let failed = |h: &LabHost| LabError::Start {
            host: h.name.clone(),
            timeout: START_DEADLINE,
            log: h.dir.join("sshd.log"),
        };
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || started.elapsed() > START_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(&old));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(init) = children_by_parent()
            .get(&pid)
            .and_then(|k| k.first().copied())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(&old));
        };
        let h = &mut self.hosts[i];
        h.unshare_pid = pid;
        h.unshare_start = start_time(pid).unwrap_or(0);
        h.sshd_pid = init;
        h.sshd_start = start_time(init).unwrap_or(0);
        match self.children.get_mut(i) {
            Some(slot) => {
                let _ = slot.wait();
                *slot = child;
            }
            None => self.children.push(child),
        }
        self.write_files()
    }

    /// Runs argv inside the host's mount namespace, from the controller side.
    pub fn exec_in(&self, name: &str, argv: &[&str]) -> Result<std::process::Output, LabError> {
        let h = self.host(name)?;
        std::process::Command::new("nsenter")
            .arg("-t")
            .arg(h.sshd_pid.to_string())
            .args(["-m", "--"])
            .args(argv)
            .output()
            .map_err(|e| LabError::Tool {
                tool: "nsenter".into(),
                status: "did not start".into(),
                stderr: e.to_string(),
            })
    }

    /// The version of `package` in the host's dpkg status, read from its own copy.
    pub fn installed_version(&self, name: &str, package: &str) -> Result<Option<String>, LabError> {
        let p = self.host(name)?.dir.join("dpkg/status");
        let text = std::fs::read_to_string(&p).map_err(LabError::io(&p))?;
        Ok(status_version(&text, package))
    }

    /// The host's own `/var/log/dpkg.log`.
    pub fn dpkg_log(&self, name: &str) -> Result<String, LabError> {
        let p = self.host(name)?.dir.join("dpkg.log");
        std::fs::read_to_string(&p).map_err(LabError::io(&p))
    }

    /// Puts the host back to its start state: acme-agent 1.0.0, fresh dpkg log.
    pub fn reseed(&self, name: &str) -> Result<(), LabError> {
        let h = self.host(name)?;
        match h.pkg {
            PkgDb::Dpkg => seed_host(&self.dir.join("template"), &h.dir),
            PkgDb::Rpm => rpm::seed_host(&self.dir.join(rpm::TEMPLATE), &h.dir),
        }
    }

    /// Stops every process this fleet started, exactly by PID.
    pub fn down(mut self) -> Vec<i32> {
        self.stop()
    }

    fn stop(&mut self) -> Vec<i32> {
        self.relays.clear();
        let mut killed = stop_relay(&self.dir, self.relay_process.take());
        killed.extend(stop_hosts(&self.hosts));
        for c in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
        let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
        self.attached = false;
        killed
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.attached {
            self.stop();
        }
    }
}

/// `lab down DIR`: stops exactly the processes recorded in DIR's state file.
/// Returns the PIDs it signalled.
pub fn down(dir: &Path) -> Result<Vec<i32>, LabError> {
    let path = dir.join(STATE_FILE);
    let state = read_state(dir)?;
    let mut killed = stop_relay(dir, state.relay);
    killed.extend(stop_hosts(&state.hosts));
    std::fs::remove_file(&path).map_err(LabError::io(&path))?;
    Ok(killed)
}

fn read_state(dir: &Path) -> Result<State, LabError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(LabError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| LabError::State {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// Stops a lab's relay process, if it has one, and removes its control socket.
fn stop_relay(dir: &Path, relay: Option<RelayProcess>) -> Vec<i32> {
    let Some(r) = relay else { return Vec::new() };
    let _ = std::fs::remove_file(dir.join(relay::SOCKET));
    if kill_checked(r.pid, r.start) {
        wait_gone(r.pid, Duration::from_secs(5));
        vec![r.pid]
    } else {
        Vec::new()
    }
}

fn stop_hosts(hosts: &[LabHost]) -> Vec<i32> {
    let mut killed = Vec::new();
    for h in hosts {
        if kill_checked(h.sshd_pid, h.sshd_start) {
            killed.push(h.sshd_pid);
        }
        if kill_checked(h.unshare_pid, h.unshare_start) {
            killed.push(h.unshare_pid);
        }
    }
    for pid in &killed {
        wait_gone(*pid, Duration::from_secs(5));
    }
    killed
}

/// SIGKILLs `pid` only if it is still the process started at `start`.
fn kill_checked(pid: i32, start: u64) -> bool {
    if pid <= 1 || start_time(pid) != Some(start) {
        return false;
    }
    // SAFETY: kill(2) on a PID we started, checked against its start time.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

fn wait_gone(pid: i32, timeout: Duration) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // A zombie is gone for every purpose but its parent's wait.
            Ok(s) if stat_field(&s, 3).as_deref() != Some("Z") => {}
            _ => return,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
fn stat_field(stat: &str, n: usize) -> Option<String> {
    // The command name (field 2) may hold spaces and parentheses: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// Start time of a process in clock ticks since boot, or None when it is gone.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&s, 22)?.parse().ok()
}

/// Parent PID → children, from one scan of /proc.
fn children_by_parent() -> HashMap<i32, Vec<i32>> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(ppid) = stat_field(&s, 4).and_then(|p| p.parse().ok()) {
                    map.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    map
}

/// The version of `package` in a dpkg status file, if it is installed.
pub fn status_version(status: &str, package: &str) -> Option<String> {
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if field("Package:").as_deref() == Some(package) {
            let installed = field("Status:").is_some_and(|s| !s.ends_with("not-installed"));
            return if installed { field("Version:") } else { None };
        }
    }
    None
}

fn host_name(i: usize) -> String {
    format!("lab{i:02}")
}

/// Groups and criticality of host `i` (0-based) of `n`: the first two are the
/// low-criticality pilot, every third host is a database.
fn placement(i: usize, _n: usize) -> (Vec<String>, Criticality) {
    let mut groups = Vec::new();
    if i < 2 {
        groups.push("pilot".to_string());
    }
    groups.push(
        if (i + 1).is_multiple_of(3) {
            "db"
        } else {
            "web"
        }
        .to_string(),
    );
    let criticality = if i < 2 {
        Criticality::Low
    } else {
        [
            Criticality::Medium,
            Criticality::High,
            Criticality::Low,
            Criticality::Critical,
        ][i % 4]
    };
    (groups, criticality)
}

fn preflight() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    for tool in [
        SSHD,
        "unshare",
        "nsenter",
        "ssh-keygen",
        "dpkg",
        "dpkg-deb",
        "mount",
    ] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            which(tool)
        };
        if !found {
            return Err(LabError::MissingTool { tool: tool.into() });
        }
    }
    // sshd's privilege separation needs this folder; Debian's service creates it.
    let _ = std::fs::create_dir_all("/run/sshd");
    // Mount points for the per-host trees must exist on the real filesystem.
    let _ = std::fs::create_dir_all("/etc/acme");
    apt::mount_points();
    if !Path::new("/var/log/dpkg.log").exists() {
        let _ = std::fs::write("/var/log/dpkg.log", "");
    }
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(LabError::io(path))
}

pub(crate) fn run_tool(cmd: &mut std::process::Command, tool: &str) -> Result<(), LabError> {
    let out = cmd.output().map_err(|e| LabError::Tool {
        tool: tool.into(),
        status: "did not start".into(),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Tool {
            tool: tool.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn spawn_keygen(path: &Path, comment: &str) -> Result<(Child, String), LabError> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let child = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| LabError::MissingTool {
            tool: "ssh-keygen".into(),
        })?;
    Ok((child, format!("ssh-keygen {}", path.display())))
}

fn wait_tool(child: &mut Child, what: &str) -> Result<(), LabError> {
    let status = child.wait().map_err(|e| LabError::Tool {
        tool: what.into(),
        status: "lost".into(),
        stderr: e.to_string(),
    })?;
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    Err(LabError::Tool {
        tool: what.into(),
        status: status.to_string(),
        stderr,
    })
}

/// The per-host trees every host starts from: a dpkg admin folder (see [`DpkgDb`])
/// with acme-agent 1.0.0 installed into it, and the `/opt`, `/etc/acme` it left.
fn build_template(dir: &Path, db: DpkgDb) -> Result<(), LabError> {
    let t = dir.join("template");
    let _ = std::fs::remove_dir_all(&t);
    for sub in ["dpkg", "opt", "etc-acme"] {
        std::fs::create_dir_all(t.join(sub)).map_err(LabError::io(&t))?;
    }
    seed_home(&t.join("root"))?;
    init::seed_init(&t)?;
    apt::seed(&t)?;
    write(&t.join("dpkg.log"), "")?;
    match db {
        DpkgDb::Machine => copy_dpkg_admin(Path::new("/var/lib/dpkg"), &t.join("dpkg"))?,
        DpkgDb::Minimal => empty_dpkg_admin(&t.join("dpkg"))?,
    }
    let deb = dir.join("debs").join(deb::file_name(deb::BASE_VERSION));
    let script = format!(
        "{} && dpkg -i {} >/dev/null",
        bind_mounts(&t),
        quote::word(&deb.to_string_lossy())
    );
    run_tool(
        std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(script),
        "dpkg -i acme-agent 1.0.0 (lab template)",
    )?;
    // The template's own install is not an event on any host.
    write(&t.join("dpkg.log"), "")
}

/// The mount commands that put a host's trees in place of the real ones.
fn bind_mounts(hdir: &Path) -> String {
    let q = |s: &str| quote::word(&hdir.join(s).to_string_lossy());
    format!(
        "mount --bind {} /var/lib/dpkg && mount --bind {} /opt && \
         mount --bind {} /etc/acme && mount --bind {} /var/log/dpkg.log && \
         mount --bind {} /root && mount --bind {} /etc/init.d && \
         mount --bind {} /usr/local/sbin && mount --bind {} /run",
        q("dpkg"),
        q("opt"),
        q("etc-acme"),
        q("dpkg.log"),
        q("root"),
        q("init.d"),
        q("sbin"),
        q("run")
    ) + apt::bind_mounts(hdir).as_str()
}

/// Copies a dpkg admin folder. The big, never-rewritten-in-place file lists under
/// `info/` are hard-linked when on the same filesystem (dpkg replaces them by rename).
fn copy_dpkg_admin(src: &Path, dst: &Path) -> Result<(), LabError> {
    for sub in ["info", "updates", "triggers", "parts", "alternatives"] {
        std::fs::create_dir_all(dst.join(sub)).map_err(LabError::io(dst))?;
    }
    for f in ["status", "available", "diversions", "statoverride", "arch"] {
        let s = src.join(f);
        if s.exists() {
            std::fs::copy(&s, dst.join(f)).map_err(LabError::io(&s))?;
        }
    }
    for sub in ["triggers", "alternatives"] {
        copy_flat(&src.join(sub), &dst.join(sub), false)?;
    }
    copy_flat(&src.join("info"), &dst.join("info"), true)
}

/// A dpkg admin folder with no package in it.
fn empty_dpkg_admin(dst: &Path) -> Result<(), LabError> {
    for sub in ["info", "updates", "triggers", "parts", "alternatives"] {
        std::fs::create_dir_all(dst.join(sub)).map_err(LabError::io(dst))?;
    }
    for f in ["status", "available"] {
        write(&dst.join(f), "")?;
    }
    Ok(())
}

/// Copies the regular files of one folder; `link` hard-links instead where it can.
fn copy_flat(src: &Path, dst: &Path, link: bool) -> Result<(), LabError> {
    let Ok(rd) = std::fs::read_dir(src) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let from = e.path();
        if !from.is_file() {
            continue;
        }
        let to = dst.join(e.file_name());
        let name = e.file_name().to_string_lossy().into_owned();
        let acme = name.starts_with("acme-agent.");
        if link && !acme && std::fs::hard_link(&from, &to).is_ok() {
            continue;
        }
        std::fs::copy(&from, &to).map_err(LabError::io(&from))?;
    }
    Ok(())
}

/// Puts a host's trees into the template's state. The folders themselves stay
/// (they are mount sources of a running host); only their contents are replaced.
fn seed_host(template: &Path, hdir: &Path) -> Result<(), LabError> {
    for sub in ["dpkg", "opt", "etc-acme"] {
        let d = hdir.join(sub);
        std::fs::create_dir_all(&d).map_err(LabError::io(&d))?;
        clear_dir(&d)?;
    }
    copy_dpkg_admin(&template.join("dpkg"), &hdir.join("dpkg"))?;
    copy_tree(&template.join("opt"), &hdir.join("opt"))?;
    copy_tree(&template.join("etc-acme"), &hdir.join("etc-acme"))?;
    seed_home(&hdir.join("root"))?;
    init::seed_init(hdir)?;
    apt::seed(hdir)?;
    // Truncate in place: the file is a mount source too.
    write(&hdir.join("dpkg.log"), "")
}

/// A host's own `/root`: the controller's home (its shell start-up files, tool
/// shims) never leaks into a host, and every command starts a plain shell.
fn seed_home(home: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(home).map_err(LabError::io(home))?;
    write(&home.join(".bashrc"), "# lab host: plain shell\n")?;
    write(&home.join(".profile"), "# lab host: plain shell\n")
}

fn clear_dir(d: &Path) -> Result<(), LabError> {
    for e in std::fs::read_dir(d).map_err(LabError::io(d))?.flatten() {
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(LabError::io(&p))?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), LabError> {
    run_tool(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(src.join("."))
            .arg(dst),
        "cp -a",
    )
}

/// How often one host is started again after losing its port.
const PORT_RESTARTS: usize = 5;

/// Asks the OS for `n` distinct free loopback ports, each held by a listener
/// until the caller drops it right before sshd binds the port.
///
/// sshd can neither be handed a bound socket nor pick its own port (it refuses
/// `Port 0`), so a port has to be released before sshd binds it. Another process
/// may take it in that moment; `wait_ready` sees sshd's bind failure in its log
/// ([`lost_its_port`]) and starts the host again on a fresh port.
fn free_ports(n: usize) -> Result<Vec<(Option<TcpListener>, u16)>, LabError> {
    (0..n)
        .map(|_| {
            let l =
                TcpListener::bind("127.0.0.1:0").map_err(LabError::io(Path::new("127.0.0.1:0")))?;
            let port = l
                .local_addr()
                .map_err(LabError::io(Path::new("127.0.0.1:0")))?
                .port();
            Ok((Some(l), port))
        })
        .collect()
}

/// Whether sshd's log says it could not bind its address (the port was taken).
fn lost_its_port(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| {
        t.contains("Address already in use") || t.contains("Cannot bind any address")
    })
}

/// Whether this sshd knows a config option (newer OpenSSH adds penalties that
/// would lock out loopback after the refused-host-key tests).
fn supports_option(option: &str) -> bool {
    std::process::Command::new(SSHD)
        .args(["-t", "-f", "/dev/null", "-o"])
        .arg(option)
        .args(["-o", "HostKey=/nonexistent"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stderr).contains("Bad configuration option"))
        .unwrap_or(false)
}

/// `forwarding`: the host is a bastion and opens direct-tcpip channels.
fn write_sshd_config(
    dir: &Path,
    hdir: &Path,
    listen: &str,
    port: u16,
    penalties: bool,
    forwarding: bool,
) -> Result<(), LabError> {
    let mut cfg = format!(
        "# lab host sshd config (written by `patchbook lab up`)\n\
         ListenAddress {listen}:{port}\n\
         HostKey {hk}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {ak} .ssh/authorized_keys\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         UsePAM no\n\
         StrictModes no\n\
         UseDNS no\n\
         AllowAgentForwarding no\n\
         AllowTcpForwarding {forward}\n\
         X11Forwarding no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         MaxStartups 1000\n\
         MaxSessions 1000\n\
         MaxAuthTries 20\n\
         LoginGraceTime 60\n\
         LogLevel ERROR\n\
         Subsystem sftp internal-sftp\n",
        hk = hdir.join("ssh_host_ed25519_key").display(),
        pid = hdir.join("sshd.pid").display(),
        ak = dir.join("authorized_keys").display(),
        forward = if forwarding { "local" } else { "no" },
    );
    if penalties {
        cfg.push_str("PerSourcePenalties no\n");
    }
    write(&hdir.join("sshd_config"), &cfg)
}

fn validate_configs(pending: &[(usize, String, PathBuf, u16)]) -> Result<(), LabError> {
    let mut checks = Vec::new();
    for (_, name, hdir, _) in pending {
        let child = std::process::Command::new(SSHD)
            .arg("-t")
            .arg("-f")
            .arg(hdir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|_| LabError::MissingTool { tool: SSHD.into() })?;
        checks.push((child, format!("sshd -t ({name})")));
    }
    for (mut child, what) in checks {
        wait_tool(&mut child, &what)?;
    }
    Ok(())
}

fn spawn_host(hdir: &Path, tie: Tie, pkg: PkgDb, net: Net) -> Result<Child, LabError> {
    let mounts = match pkg {
        PkgDb::Dpkg => bind_mounts(hdir),
        PkgDb::Rpm => format!("{} && {}", bind_mounts(hdir), rpm::bind_mounts(hdir)),
    };
    let script = init::init_script(hdir, &mounts, SSHD);
    let log = hdir.join("sshd.log");
    let log_file = std::fs::File::create(&log).map_err(LabError::io(&log))?;
    let mut cmd = match net {
        Net::Join(pid) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net={}", bastion::netns_path(pid)))
                .arg("unshare");
            c
        }
        Net::Shared | Net::Own => std::process::Command::new("unshare"),
    };
    if net == Net::Own {
        cmd.arg("--net");
    }
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--propagation",
        "private",
        "sh",
        "-c",
    ])
    .arg(script)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log_file);
    let tied = tie == Tie::ToStartingThread;
    // SAFETY: only async-signal-safe calls (setsid, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if tied {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|_| LabError::MissingTool {
        tool: "unshare".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_version_reads_installed_packages_only() {
        let status = "Package: a\nStatus: install ok installed\nVersion: 1.0\n\n\
                      Package: acme-agent\nStatus: install ok installed\nVersion: 1.0.1\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 2\n\n\
                      Package: old\nStatus: purge ok not-installed\nVersion: 3\n";
        assert_eq!(
            status_version(status, "acme-agent").as_deref(),
            Some("1.0.1")
        );
        assert_eq!(status_version(status, "old"), None);
        assert_eq!(status_version(status, "missing"), None);
    }

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let s = "42 (a b) c) S 7 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0";
        assert_eq!(stat_field(s, 3).as_deref(), Some("S"));
        assert_eq!(stat_field(s, 4).as_deref(), Some("7"));
        assert_eq!(stat_field(s, 22).as_deref(), Some("12345"));
    }

    #[test]
    fn placement_gives_a_low_pilot_and_every_criticality() {
        let all: Vec<_> = (0..8).map(|i| placement(i, 8)).collect();
        assert!(all[0].0.contains(&"pilot".to_string()));
        assert_eq!(all[0].1, Criticality::Low);
        assert!(!all[2].0.contains(&"pilot".to_string()));
        for c in [
            Criticality::Medium,
            Criticality::High,
            Criticality::Critical,
        ] {
            assert!(all.iter().any(|(_, k)| *k == c));
        }
        assert!(all.iter().any(|(g, _)| g.contains(&"db".to_string())));
    }
}
