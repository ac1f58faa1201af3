//! The command line: argument parsing, exit codes and terminal output.
//!
//! It turns arguments into calls on the runtime and the layers below, and renders
//! what comes back. It must not know how anything is done.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::runtime::{Options, Runtime, RuntimeError};

const EXIT_CODES: &str = "\
Exit codes:
  0  all good
  1  some hosts failed (the others succeeded)
  2  usage, config, inventory or script error, including a script stopped by a sandbox limit";

#[derive(Debug, Parser)]
#[command(name = "patchbook", version, about = "Bulk security patching of server fleets, with Rhai playbooks", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Inventory file (native TOML, Ansible INI or YAML); repeatable.
    #[arg(short = 'i', long = "inventory", global = true)]
    pub inventory: Vec<PathBuf>,
    /// Config file (default: patchbook.toml when present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// State directory for journals, backups and the artifact cache.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// How many hosts are worked on at once (default 50).
    #[arg(long, global = true)]
    pub forks: Option<usize>,
    /// Narrow every host selection further with this selector.
    #[arg(long, global = true)]
    pub limit: Option<String>,
    /// Private key for SSH (default: the agent, then ~/.ssh/id_*).
    #[arg(long, global = true)]
    pub identity: Option<PathBuf>,
    /// known_hosts file checked strictly (default ~/.ssh/known_hosts).
    #[arg(long, global = true)]
    pub known_hosts: Option<PathBuf>,
    /// Accept and record host keys of hosts not yet in known_hosts (changed keys are still refused).
    #[arg(long, global = true)]
    pub accept_new_host_keys: bool,
    /// Name recorded as the operator (default: the login name).
    #[arg(long, global = true)]
    pub operator: Option<String>,
    /// More output (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Machine-readable output: JSON lines on stdout, JSON logs on stderr.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Run a playbook.
    Run { playbook: PathBuf },
    /// Compile every playbook and library and report all errors.
    Check {
        /// Files or folders (default: the playbook folder, stdlib and libraries).
        paths: Vec<PathBuf>,
    },
    /// Run a Rhai snippet once per selected host, with `host` bound.
    Exec { selector: String, snippet: String },
    /// Evaluate Rhai with no hosts and print the result as JSON.
    Eval {
        snippet: Option<String>,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Inspect the inventory.
    #[command(subcommand)]
    Inventory(InventoryVerb),
    /// Start and stop a lab fleet of real sshd hosts on this machine (needs root).
    #[command(subcommand)]
    Lab(LabVerb),
}

#[derive(Debug, Subcommand)]
pub enum InventoryVerb {
    /// Print every host; with --json, the structure `ansible-inventory --list` prints.
    List,
    /// Print the group tree and dependency edges.
    Graph,
}

#[derive(Debug, Subcommand)]
pub enum LabVerb {
    /// Start N hosts; writes keys, known_hosts and inventories into DIR.
    Up { count: usize, dir: PathBuf },
    /// Stop exactly the processes `lab up` started in DIR.
    Down { dir: PathBuf },
}

/// Everything that can end a command early. Each variant's message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(2)
    }
}

impl Cli {
    pub fn options(&self) -> Options {
        let g = &self.global;
        Options {
            config: g.config.clone(),
            inventories: g.inventory.clone(),
            state_dir: g.state_dir.clone(),
            forks: g.forks,
            limit: g.limit.clone(),
            identity: g.identity.clone(),
            known_hosts: g.known_hosts.clone(),
            accept_new_host_keys: g.accept_new_host_keys,
            operator: g.operator.clone(),
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match &cli.command {
        Verb::Inventory(v) => inventory(&cli, v),
        Verb::Run { .. } | Verb::Check { .. } | Verb::Exec { .. } | Verb::Eval { .. } => {
            Err(CliError::Other("not built yet".into()))
        }
        Verb::Lab(v) => lab(v),
    }
}

fn lab(verb: &LabVerb) -> Result<ExitCode, CliError> {
    match verb {
        LabVerb::Up { count, dir } => {
            let started = std::time::Instant::now();
            let fleet = crate::lab::Fleet::start(*count, dir, crate::lab::Tie::Detached)
                .map_err(|e| CliError::Other(format!("lab up: {e}")))?;
            for h in fleet.hosts() {
                println!(
                    "{:<6} 127.0.0.1:{:<5} sshd pid {:<7} {:<9} {}",
                    h.name,
                    h.port,
                    h.sshd_pid,
                    h.criticality.as_str(),
                    h.groups.join(",")
                );
            }
            let d = fleet.dir().display().to_string();
            eprintln!(
                "lab: {} hosts up in {:.1}s; inventory {d}/inventory.toml (Ansible: {d}/inventory.ini), \
                 config {d}/patchbook.toml; stop with `patchbook lab down {d}`",
                fleet.hosts().len(),
                started.elapsed().as_secs_f64()
            );
            fleet.detach();
            Ok(ExitCode::SUCCESS)
        }
        LabVerb::Down { dir } => {
            let killed =
                crate::lab::down(dir).map_err(|e| CliError::Other(format!("lab down: {e}")))?;
            eprintln!("lab: stopped {} processes", killed.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn inventory(cli: &Cli, verb: &InventoryVerb) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    match verb {
        InventoryVerb::List if cli.global.json => {
            let v = crate::inventory::ansible::to_list_json(&rt.inventory);
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        InventoryVerb::List => {
            for h in rt.inventory.hosts() {
                println!(
                    "{:<24} {:<24} {:<9} {}",
                    h.name,
                    format!("{}:{}", h.address, h.port),
                    h.criticality.as_str(),
                    h.groups.join(",")
                );
            }
        }
        InventoryVerb::Graph => print!("{}", crate::inventory::graph::render(&rt.inventory)),
    }
    Ok(ExitCode::SUCCESS)
}
