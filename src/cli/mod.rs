//! The command line: argument parsing, exit codes and terminal output.
//!
//! It turns arguments into calls on the runtime and the layers below, and renders
//! what comes back. It must not know how anything is done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

pub mod config;
pub mod exposure;
pub mod init;
pub mod progress;
pub mod run;
pub mod terminal;
pub mod worker;

use crate::runtime::{Options, Runtime, RuntimeError};

const EXIT_CODES: &str = "\
Exit codes:
  0  all good
  1  some hosts failed or were unreachable (the others succeeded)
  2  usage, config, inventory or script error, including a script stopped by a sandbox limit,
     a selector or --limit that matches no host, and hosts another run holds";

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
    /// Config file (default: the first patchbook.toml in the current folder or a parent).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// State directory for journals, backups and the artifact cache.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Where runs and their journal records live: `postgres://USER@HOST/DB`, or
    /// `file` for the state directory (default: `[store] url`, else `file`).
    #[arg(
        long,
        global = true,
        env = "PATCHBOOK_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub store: Option<String>,
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
    /// When another run holds some of the hosts, wait for them (up to DURATION,
    /// default 1h: `--wait` or `--wait=30m`) instead of refusing.
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1h"
    )]
    pub wait: Option<String>,
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
    /// Run a playbook, journaled; or continue a stopped or crashed run.
    Run {
        /// The playbook (with --resume: taken from the journal when omitted).
        playbook: Option<PathBuf>,
        /// Continue run RUN: finished hosts are not touched again, open steps are
        /// checked on the host first, pending hosts run.
        #[arg(long, value_name = "RUN", conflicts_with = "retry")]
        resume: Option<String>,
        /// Start a new run on exactly the hosts that failed or were unreachable
        /// in run RUN, with RUN's playbook and --param values.
        #[arg(long, value_name = "RUN")]
        retry: Option<String>,
        /// A value the playbook reads with `param("NAME")`; repeatable. With
        /// --resume or --retry, overrides the value the run recorded.
        #[arg(short = 'e', long = "param", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// `external`: this process coordinates (plans the waves, writes the host
        /// claims, opens each wave, keeps the budget and the window) and
        /// `patchbook worker` processes run the hosts. Needs a PostgreSQL --store.
        #[arg(long, value_name = "MODE", value_parser = ["external"])]
        workers: Option<String>,
    },
    /// Run hosts of a rollout a coordinator (`run --workers external`) shares
    /// through the PostgreSQL store, until that run is finished or halted.
    ///
    /// The worker reads the run's playbook path and --param values from the
    /// store and compiles the playbook from its own project folder (same file,
    /// same SHA-256), with its own config and inventory.
    Worker {
        /// Only hosts whose inventory var `zone` is Z (and hosts with no zone).
        #[arg(long, value_name = "Z")]
        zone: Option<String>,
        /// This worker's name in claims and records (default: HOSTNAME-PID).
        #[arg(long, value_name = "NAME")]
        id: Option<String>,
        /// How long a claimed host stays this worker's without a renewal; a
        /// worker that dies loses its hosts after this long.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        lease: String,
        /// Work on this run (default: the oldest running shared run).
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
        /// How long to wait for a shared run to start.
        #[arg(long, value_name = "DURATION", default_value = "10m")]
        wait: String,
    },
    /// Halt a run shared with workers (`run --workers external`): no host starts
    /// any more, hosts in flight finish (a failed one is rolled back), and every
    /// worker exits within one lease period. Needs the PostgreSQL --store.
    Stop { run: String },
    /// Show the waves and what each host would do, changing nothing.
    Plan {
        playbook: PathBuf,
        /// A value the playbook reads with `param("NAME")`; repeatable.
        #[arg(short = 'e', long = "param", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
    /// Reverse a finished or crashed run from its journal, in reverse deployment order.
    Rollback {
        run: String,
        /// Only these hosts (a selector).
        #[arg(long)]
        hosts: Option<String>,
    },
    /// Compile every playbook and library and report all errors.
    Check {
        /// Files or folders (default: the playbook folder, stdlib and libraries).
        paths: Vec<PathBuf>,
    },
    /// Run a Rhai snippet once per selected host, with `host` bound, as a journaled
    /// run: backups and changes are recorded, `patchbook rollback RUN` reverses them.
    Exec { selector: String, snippet: String },
    /// Evaluate Rhai with no hosts and print the result as JSON.
    Eval {
        snippet: Option<String>,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Print the settings in force and where each comes from (file and line,
    /// command-line flag, or default).
    ///
    /// Every key of patchbook.toml, with its default and meaning, is in the
    /// README's "Every key" section (installed by the .deb as
    /// /usr/share/doc/patchbook/README.md).
    Config,
    /// Inspect the inventory.
    #[command(subcommand)]
    Inventory(InventoryVerb),
    /// Start and stop a lab fleet of real sshd hosts on this machine (needs root).
    #[cfg(feature = "lab")]
    #[command(subcommand)]
    Lab(LabVerb),
    /// Check the journals' hash chains and the audit index.
    #[command(subcommand)]
    Audit(AuditVerb),
    /// Hot-reload playbooks and libraries, start scheduled and triggered runs,
    /// and serve a read-only status page. Stops cleanly on SIGTERM.
    Watch(WatchArgs),
    /// Ask the running `patchbook watch` to start a playbook now.
    Trigger {
        /// Playbook name under the playbook folder (`nightly`), or its file.
        playbook: String,
        /// Control socket (default: control.sock in the state dir).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// A value the playbook reads with `param("NAME")`; repeatable.
        #[arg(short = 'e', long = "param", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
    /// Write Rhai definition files (.d.rhai) of every primitive for editor completion.
    Docs {
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a project in DIR (default: the current folder): a commented
    /// patchbook.toml, an example inventory and a first playbook. Never overwrites.
    Init {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Print a shell completion script: `patchbook completions bash > /etc/bash_completion.d/patchbook`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `patchbook man > patchbook.1; man ./patchbook.1`.
    /// With `--dir DIR`, write one page per command instead (patchbook.1,
    /// patchbook-run.1, patchbook-inventory-list.1, …).
    Man {
        /// Folder to write every command's page into
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Render a run's report from its journal: summary, counts, hosts, tests.
    Report {
        /// Run id, or `last` for the most recently started run.
        run: String,
        /// md, json or html (one self-contained file with a wave timeline).
        #[arg(long, default_value = "md", value_parser = parse_format)]
        format: crate::report::Format,
        /// Write the report to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The compliance evidence instead: the advisory feeds the run read and
        /// every CVE it closed, with the version verified on the host.
        #[arg(long)]
        compliance: bool,
    },
    /// Which hosts are vulnerable to which CVEs: the hosts' installed packages,
    /// read live, against the advisory feeds (OSV, Debian Security Tracker, CSAF
    /// VEX). Per CVE and per host; CVEs with no fix yet apart; a host whose
    /// release no feed describes is "not covered". Each live scan is journaled as
    /// a run of its own; `--from-last-scan` renders the newest one again.
    Exposure {
        /// Which hosts (default: all).
        #[arg(default_value = "all")]
        selector: String,
        /// A feed URL or path under trusted_sources, `URL#sha256=HEX` to pin it;
        /// repeatable (default: `[advisories] feeds` in patchbook.toml).
        #[arg(long = "feed", value_name = "URL")]
        feeds: Vec<String>,
        /// table, json or html.
        #[arg(long, default_value = "table")]
        format: crate::report::exposure::ExposureFormat,
        /// Write to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Render the newest recorded scan (by `exposure` or the `watch` service's
        /// `[advisories] scan`) without contacting any host.
        #[arg(long)]
        from_last_scan: bool,
    },
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Serve the status page on this address, e.g. 127.0.0.1:8080 (port 0 picks one).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Allow --listen on a non-loopback address (the page shows files, hashes and errors).
    #[arg(long)]
    pub public_status: bool,
    /// Poll for changes instead of inotify (network filesystems).
    #[arg(long)]
    pub poll: bool,
    /// Control socket (default: control.sock in the state dir).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

fn parse_format(s: &str) -> Result<crate::report::Format, String> {
    s.parse()
        .map_err(|e: crate::report::ReportError| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum AuditVerb {
    /// Verify every run's chain (or one run's) against itself and the audit index.
    ///
    /// Prints one line per run: OK (closed, intact), OPEN (not closed yet: in
    /// progress, or stopped or crashed; its chain is intact) or TAMPERED with the
    /// first problem and the last good seq; then one line for the audit index.
    #[command(after_help = "\
Any path in the state directory that group or others may read, write or enter
is named on stderr as `warning: PATH is mode 0644, readable by other users; run
`chmod 600 PATH``; such warnings do not change the exit code.

With `[audit] verify_key` (or `signing_key`) in patchbook.toml, every index entry
and every run's close must carry a valid signature of that key. Without one, a
writer of the state directory can re-hash a run and re-chain the index unseen.

Exit codes:
  0  every run is intact or open, and the audit index is sound
  1  tampering or damage detected: a run or the index is TAMPERED
  2  the state directory cannot be read, a key cannot be read, or no such run")]
    Verify {
        /// One run id (default: every run in the state directory and the index).
        run: Option<String>,
        /// The index must reach at least entry N: the last signed entry seen
        /// elsewhere (printed at each run's close, or sent to syslog).
        #[arg(long, value_name = "N")]
        expect_at_least: Option<u64>,
    },
    /// Print the verify key (`ssh-ed25519 AAAA…`) of `[audit] signing_key`, to put
    /// in the verifiers' `[audit] verify_key`.
    Key,
}

#[derive(Debug, Subcommand)]
pub enum InventoryVerb {
    /// Print every host; with --json, the structure `ansible-inventory --list` prints.
    List,
    /// Print the group tree and dependency edges.
    Graph,
}

#[cfg(feature = "lab")]
#[derive(Debug, Subcommand)]
pub enum LabVerb {
    /// Start N hosts; writes keys, known_hosts and inventories into DIR.
    Up {
        count: usize,
        dir: PathBuf,
        /// What each host's dpkg database starts as: `machine` (a copy of this
        /// machine's) or `minimal` (acme-agent alone)
        #[arg(long, default_value = "machine")]
        dpkg_db: crate::lab::DpkgDb,
        /// Package database of the hosts: `dpkg`, `rpm` (RHEL-like hosts with
        /// their own /var/lib/rpm) or `mixed` (first half dpkg, the rest rpm)
        #[arg(long, default_value = "dpkg")]
        pkg: crate::lab::Packaging,
        /// Put the hosts where only a second bastion can reach them, behind a
        /// first one: adds hosts `bastion1` and `bastion2`, and the inventories
        /// give every host `jump = ["bastion1", "bastion2"]`
        #[arg(long)]
        bastions: bool,
        /// Round-trip time to every host (e.g. `50ms`): a relay process in front
        /// of each sshd holds each direction for half of it and counts turns
        /// (`lab turns`); the inventories point at the relays
        #[arg(long, value_parser = crate::config::parse_duration)]
        rtt: Option<std::time::Duration>,
    },
    /// Stop exactly the processes `lab up` started in DIR.
    Down { dir: PathBuf },
    /// Print the request/response turns and connections each host's relay has
    /// seen (a lab started with `--rtt`).
    Turns {
        dir: PathBuf,
        /// Zero the counters after printing them
        #[arg(long)]
        reset: bool,
        /// Print the JSON map host -> {turns, connections, bytes_up, bytes_down}
        #[arg(long)]
        json: bool,
    },
    /// The relay process `lab up --rtt` starts (not for direct use).
    #[command(hide = true)]
    Relay {
        dir: PathBuf,
        #[arg(long, value_parser = crate::config::parse_duration)]
        rtt: std::time::Duration,
    },
}

/// Everything that can end a command early. Each variant's message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error(transparent)]
    Script(#[from] crate::script::ScriptError),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
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
    /// How long to wait for busy hosts: `None` refuses at once.
    pub fn wait_timeout(&self) -> Result<Option<std::time::Duration>, CliError> {
        self.global
            .wait
            .as_deref()
            .map(|w| {
                crate::config::parse_duration(w)
                    .map_err(|e| CliError::Usage(format!("--wait: {e}")))
            })
            .transpose()
    }

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
            store: g.store.clone(),
            // The store the binary's log writer and error messages read.
            secrets: Some(crate::journal::Secrets::process()),
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match &cli.command {
        Verb::Inventory(v) => inventory(&cli, v),
        Verb::Config => config::show(&cli),
        Verb::Stop { run } => worker::stop(&cli, run),
        Verb::Worker {
            zone,
            id,
            lease,
            run,
            wait,
        } => worker::worker(
            &cli,
            &worker::WorkerArgs {
                zone: zone.clone(),
                id: id.clone(),
                lease: lease.clone(),
                run: run.clone(),
                wait: wait.clone(),
            },
        ),
        Verb::Run {
            playbook,
            resume,
            retry,
            vars,
            workers,
        } => run::run(
            &cli,
            playbook.as_deref(),
            match (resume, retry) {
                (Some(r), _) => run::Start::Resume(r),
                (None, Some(r)) => run::Start::Retry(r),
                (None, None) => run::Start::New,
            },
            &run::parse_vars(vars)?,
            workers.is_some(),
        ),
        Verb::Plan { playbook, vars } => run::plan(&cli, playbook, &run::parse_vars(vars)?),
        Verb::Rollback { run, hosts } => run::rollback(&cli, run, hosts.as_deref()),
        Verb::Check { paths } => check(&cli, paths),
        Verb::Exec { selector, snippet } => run::exec(&cli, selector, snippet),
        Verb::Eval { snippet, file } => eval(&cli, snippet.as_deref(), file.as_deref()),
        #[cfg(feature = "lab")]
        Verb::Lab(v) => lab(v),
        Verb::Audit(AuditVerb::Verify {
            run,
            expect_at_least,
        }) => audit_verify(&cli, run.as_deref(), *expect_at_least),
        Verb::Audit(AuditVerb::Key) => audit_key(&cli),
        Verb::Report {
            run,
            format,
            out,
            compliance,
        } => report(&cli, run, *format, out.as_deref(), *compliance),
        Verb::Exposure {
            selector,
            feeds,
            format,
            out,
            from_last_scan,
        } => exposure::exposure(
            &cli,
            selector,
            feeds,
            *format,
            out.as_deref(),
            *from_last_scan,
        ),
        Verb::Docs { out } => docs(&cli, out),
        Verb::Init { dir } => init::init(dir, cli.global.quiet),
        Verb::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "patchbook", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Verb::Man { dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            match dir {
                Some(dir) => std::fs::create_dir_all(dir)
                    .and_then(|()| clap_mangen::generate_to(command, dir))
                    .map_err(|e| {
                        CliError::Other(format!(
                            "man: cannot write the pages into {}: {e}",
                            dir.display()
                        ))
                    })?,
                None => clap_mangen::Man::new(command)
                    .render(&mut std::io::stdout())
                    .map_err(|e| CliError::Other(format!("man: cannot write the page: {e}")))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Watch(args) => watch(&cli, args),
        Verb::Trigger {
            playbook,
            socket,
            vars,
        } => trigger(&cli, playbook, socket.as_deref(), &run::parse_vars(vars)?),
    }
}

#[cfg(feature = "lab")]
fn lab(verb: &LabVerb) -> Result<ExitCode, CliError> {
    match verb {
        LabVerb::Up {
            count,
            dir,
            dpkg_db,
            pkg,
            bastions,
            rtt,
        } => {
            let started = std::time::Instant::now();
            if *bastions && rtt.is_some() {
                return Err(CliError::Usage(
                    "lab up: --rtt relays sit on this machine's loopback and cannot reach hosts behind --bastions; use one or the other".into(),
                ));
            }
            let start = if *bastions {
                crate::lab::Fleet::start_behind_bastions
            } else {
                crate::lab::Fleet::start_mixed
            };
            let mut fleet = start(&pkg.kinds(*count), dir, crate::lab::Tie::Detached, *dpkg_db)
                .map_err(|e| CliError::Other(format!("lab up: {e}")))?;
            if let Some(rtt) = rtt {
                let relayed = std::env::current_exe()
                    .map_err(|e| CliError::Other(format!("lab up: own program: {e}")))
                    .and_then(|exe| {
                        let mut cmd = std::process::Command::new(exe);
                        cmd.args(["lab", "relay"])
                            .arg(fleet.dir())
                            .arg("--rtt")
                            .arg(format!("{}ms", rtt.as_millis()));
                        fleet
                            .start_relay_process(cmd, *rtt)
                            .map_err(|e| CliError::Other(format!("lab up: {e}")))
                    });
                if let Err(e) = relayed {
                    fleet.down();
                    return Err(e);
                }
            }
            for h in fleet.hosts() {
                let via = if h.jump.is_empty() {
                    String::new()
                } else {
                    format!(" via {}", h.jump.join(","))
                };
                println!(
                    "{:<8} {:>15}:{:<5} sshd pid {:<7} {:<9} {}{via}",
                    h.name,
                    h.address,
                    h.connect_port(),
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
            if let Some(rtt) = rtt {
                eprintln!(
                    "lab: every host {rtt:?} away through a relay; turns per host: \
                     `patchbook lab turns {d}`"
                );
            }
            fleet.detach();
            Ok(ExitCode::SUCCESS)
        }
        LabVerb::Down { dir } => {
            let killed =
                crate::lab::down(dir).map_err(|e| CliError::Other(format!("lab down: {e}")))?;
            eprintln!("lab: stopped {} processes", killed.len());
            Ok(ExitCode::SUCCESS)
        }
        LabVerb::Turns { dir, reset, json } => {
            let traffic = crate::lab::relay::fleet_traffic(dir, *reset)
                .map_err(|e| CliError::Other(format!("lab turns: {e}")))?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&traffic).unwrap_or_default()
                );
            } else {
                for (host, t) in &traffic {
                    println!(
                        "{host:<6} turns {:<6} connections {:<4} up {} B  down {} B",
                        t.turns, t.connections, t.bytes_up, t.bytes_down
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabVerb::Relay { dir, rtt } => {
            crate::lab::relay::serve_fleet(dir, *rtt, &mut std::io::stdout())
                .map_err(|e| CliError::Other(format!("lab relay: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A rendered report to `--out` (its path printed unless quiet) or to stdout.
fn deliver(cli: &Cli, text: &str, out: Option<&Path>) -> Result<(), CliError> {
    match out {
        Some(path) => {
            crate::report::write_file(path, text)?;
            if !cli.global.quiet {
                println!("{}", path.display());
            }
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// `patchbook report`: rendered from the journal on disk, to stdout or a file.
fn report(
    cli: &Cli,
    run: &str,
    format: crate::report::Format,
    out: Option<&Path>,
    compliance: bool,
) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    let text = if compliance {
        let c = crate::report::exposure::compliance_in(
            &rt.store().map_err(crate::report::ReportError::from)?,
            run,
        )?;
        crate::report::exposure::render_compliance(&c, format)
    } else {
        crate::report::render_in(
            &rt.store().map_err(crate::report::ReportError::from)?,
            run,
            format,
        )?
    };
    deliver(cli, &text, out)?;
    Ok(ExitCode::SUCCESS)
}

/// `patchbook docs`: definition files for editors; needs no inventory.
fn docs(cli: &Cli, out: &Path) -> Result<ExitCode, CliError> {
    let (config, _) = crate::runtime::load_config(&cli.options()).map_err(RuntimeError::from)?;
    let limits = config.limits;
    let files =
        crate::script::docs::write(out, &limits).map_err(|e| CliError::Other(e.to_string()))?;
    if !cli.global.quiet {
        for f in &files {
            println!("{}", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `patchbook watch`: runs until SIGTERM.
fn watch(cli: &Cli, args: &WatchArgs) -> Result<ExitCode, CliError> {
    use crate::watch::{Inputs, ServeOptions, Service, WatchTiming};
    let rt = Runtime::build(&cli.options())?;
    rt.ensure_state_dir()?;
    let clock = crate::rollout::Clock::from_env().map_err(|e| CliError::Usage(e.to_string()))?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| rt.state_dir.join("control.sock"));
    let inputs = Inputs::from_config(&rt.config);
    let scan_plan = crate::watch::scan::ScanPlan::from_config(&rt.config.advisories)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let rt = Arc::new(rt);
    let launcher = run::RolloutLauncher::new(rt.clone());
    let service = Service::new(inputs, Arc::new(launcher), clock);
    if let Some(plan) = scan_plan {
        println!("advisory scan: {}", plan.schedule);
        crate::watch::scan::start(&service, rt, plan)
            .map_err(|e| CliError::Other(format!("cannot start the advisory scan: {e}")))?;
    }
    let opts = ServeOptions {
        listen: args.listen,
        public_status: args.public_status,
        poll: args.poll,
        socket,
        timing: WatchTiming::default(),
        tick: std::time::Duration::from_millis(50),
    };
    crate::watch::serve(service, &opts).map_err(|e| CliError::Other(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

/// `patchbook trigger`: one request on the control socket; prints the answer.
fn trigger(
    cli: &Cli,
    playbook: &str,
    socket: Option<&Path>,
    vars: &BTreeMap<String, String>,
) -> Result<ExitCode, CliError> {
    let socket = match socket {
        Some(s) => s.to_path_buf(),
        None => Runtime::build(&cli.options())?
            .state_dir
            .join("control.sock"),
    };
    // The service resolves paths from its own folder: send files as absolute paths.
    let name = match std::fs::canonicalize(playbook) {
        Ok(p) if p.is_file() => p.display().to_string(),
        _ => playbook.to_string(),
    };
    let req = serde_json::json!({"op": "trigger", "playbook": name, "params": vars});
    let answer = crate::watch::control::request(&socket, &req)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let ok = answer.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
    if cli.global.json {
        println!("{answer}");
    } else if ok {
        println!(
            "started run {} on generation {}",
            answer.get("run").and_then(|v| v.as_str()).unwrap_or("?"),
            answer
                .get("generation")
                .map(|v| v.to_string())
                .unwrap_or_default()
        );
    } else {
        eprintln!(
            "refused: {}",
            answer
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("no reason given")
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn audit_key(cli: &Cli) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    match rt.anchor()? {
        Some(a) => {
            println!("{}", a.signer.verify_key().to_openssh());
            Ok(ExitCode::SUCCESS)
        }
        None => Err(CliError::Usage(
            "no `[audit] signing_key` in patchbook.toml: make a seed with `head -c 32 /dev/urandom > FILE` outside the state directory and name it there".into(),
        )),
    }
}

fn audit_verify(
    cli: &Cli,
    run: Option<&str>,
    expect_at_least: Option<u64>,
) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    let opts = crate::journal::audit::VerifyOptions {
        key: rt.verify_key()?,
        expect_at_least,
    };
    let store = rt.store().map_err(|e| CliError::Other(e.to_string()))?;
    let report = crate::journal::audit::verify_in(&store, run, &opts)
        .map_err(|e| CliError::Other(e.to_string()))?;
    match &opts.key {
        Some(k) => eprintln!("audit: signatures checked with {}", k.fingerprint()),
        None => eprintln!(
            "note: no `[audit] verify_key`: the chains are checked, but anyone who can write the state directory can re-hash a run and re-chain the index unseen"
        ),
    }
    for r in &report.runs {
        if cli.global.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            println!("{r}");
        }
    }
    if cli.global.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({"index": report.index})).unwrap_or_default()
        );
    } else {
        println!("{}", report.index);
    }
    // Loose modes leak backups and journals to other users but say nothing about
    // integrity: a warning per path on stderr, and the exit code stays the
    // integrity verdict that scripts already rely on.
    for loose in crate::journal::private::loose_paths(&rt.state_dir) {
        eprintln!("warning: {loose}");
    }
    Ok(if report.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn inventory(cli: &Cli, verb: &InventoryVerb) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    let levels = || {
        let store = rt.store().map_err(crate::report::ReportError::from);
        store
            .and_then(|s| crate::report::patch_levels_in(&s))
            .unwrap_or_else(|e| {
                tracing::warn!("patch levels left out: {e}");
                Default::default()
            })
    };
    match verb {
        InventoryVerb::List if cli.global.json => {
            let mut v = crate::inventory::ansible::to_list_json(&rt.inventory);
            add_patch_levels(&mut v, &levels());
            add_open_cves(&mut v, &exposure::open_counts(&rt.state_dir));
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        InventoryVerb::List => print!(
            "{}",
            with_open_cves(
                with_patch_levels(
                    &crate::inventory::graph::table(&rt.inventory),
                    &rt.inventory,
                    &levels()
                ),
                &rt.inventory,
                &exposure::open_counts(&rt.state_dir)
            )
        ),
        InventoryVerb::Graph => print!("{}", crate::inventory::graph::render(&rt.inventory)),
    }
    // The process ends next: freeing a large fleet's hosts one by one took a tenth
    // of the listing's time, and the memory goes back to the system either way.
    let mut rt = rt;
    std::mem::forget(std::mem::take(&mut rt.inventory));
    Ok(ExitCode::SUCCESS)
}

/// Puts each scanned host's open CVE counts under
/// `_meta.hostvars.<host>.patchbook_open_cves`, only when a scan was kept.
fn add_open_cves(
    list: &mut serde_json::Value,
    counts: &std::collections::BTreeMap<String, (u64, u64, bool)>,
) {
    let Some(hostvars) = list
        .pointer_mut("/_meta/hostvars")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    for (host, (fixable, no_fix, covered)) in counts {
        if let Some(vars) = hostvars
            .entry(host.clone())
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
        {
            vars.insert(
                "patchbook_open_cves".into(),
                serde_json::json!({"fixable": fixable, "no_fix": no_fix, "covered": covered}),
            );
        }
    }
}

/// Puts each host's verified versions under
/// `_meta.hostvars.<host>.patchbook_patch_levels`, only for hosts that have some, so
/// the structure stays exactly `ansible-inventory --list`'s when no run verified anything.
fn add_patch_levels(list: &mut serde_json::Value, levels: &crate::report::PatchLevels) {
    let Some(hostvars) = list
        .pointer_mut("/_meta/hostvars")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    for (host, packages) in levels.iter().filter(|(_, p)| !p.is_empty()) {
        let versions: serde_json::Map<String, serde_json::Value> = packages
            .iter()
            .map(|(pkg, level)| (pkg.clone(), level.version.clone().into()))
            .collect();
        let vars = hostvars
            .entry(host.clone())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(vars) = vars.as_object_mut() {
            vars.insert("patchbook_patch_levels".into(), versions.into());
        }
    }
}

/// The host table with a PATCH LEVELS column: `pkg=version` per verified package,
/// `-` for hosts no run has verified. The table's lines are the header and then one
/// per host, in inventory order.
fn with_patch_levels(
    table: &str,
    inv: &crate::inventory::Inventory,
    levels: &crate::report::PatchLevels,
) -> String {
    let lines: Vec<&str> = table.lines().collect();
    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let column = std::iter::once("PATCH LEVELS".to_string()).chain(
        inv.hosts()
            .iter()
            .map(|h| crate::report::levels::summary(levels.get(&h.name))),
    );
    let mut out = String::new();
    for (line, cell) in lines.iter().zip(column) {
        let pad = width - line.chars().count();
        out.push_str(&format!("{line}{}  {cell}\n", " ".repeat(pad)));
    }
    out
}

/// Adds the OPEN CVES column from the latest `exposure` scan, when there is one.
fn with_open_cves(
    table: String,
    inv: &crate::inventory::Inventory,
    counts: &std::collections::BTreeMap<String, (u64, u64, bool)>,
) -> String {
    if counts.is_empty() {
        return table;
    }
    let lines: Vec<&str> = table.lines().collect();
    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let column = std::iter::once("OPEN CVES".to_string()).chain(
        inv.hosts()
            .iter()
            .map(|h| exposure::open_cell(counts.get(&h.name))),
    );
    let mut out = String::new();
    for (line, cell) in lines.iter().zip(column) {
        let pad = width - line.chars().count();
        out.push_str(&format!("{line}{}  {cell}\n", " ".repeat(pad)));
    }
    out
}

/// `patchbook eval`: no hosts needed; prints the value as JSON.
fn eval(cli: &Cli, snippet: Option<&str>, file: Option<&Path>) -> Result<ExitCode, CliError> {
    use crate::script::{to_json, Compiler, ScriptRun};
    let rt = Runtime::build(&cli.options())?;
    let compiler = Compiler::from_config(&rt.config);
    let pb = match (snippet, file) {
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "give either a snippet or -f FILE, not both".into(),
            ))
        }
        (Some(text), None) => compiler.compile_source("<eval>", text, &[])?,
        (None, Some(path)) => compiler.compile_file(path)?,
        (None, None) => {
            return Err(CliError::Usage(
                "nothing to evaluate: give a snippet (patchbook eval '1 + 2') or -f FILE.rhai"
                    .into(),
            ))
        }
    };
    let limits = rt.config.limits.clone();
    let run = ScriptRun::new(&limits, Some(Arc::new(rt)));
    let value = run.run(&pb)?;
    println!("{}", to_json(&value));
    Ok(ExitCode::SUCCESS)
}

/// A value for the result table: strings bare and trimmed, everything else JSON.
pub(crate) fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.trim_end().to_string(),
        other => other.to_string(),
    }
}

/// `patchbook check`: compile every playbook and module, check each against the
/// engine a run uses (unknown functions, arities, option keys), report every
/// problem of every file.
fn check(cli: &Cli, paths: &[PathBuf]) -> Result<ExitCode, CliError> {
    use crate::script::lint::Checker;
    use crate::script::{Compiler, Diagnostic};
    let rt = Runtime::build(&cli.options())?;
    let compiler = Compiler::from_config(&rt.config);
    let explicit = !paths.is_empty();
    // Each root with the patchbook.toml key that names it (none for explicit paths).
    let roots: Vec<(Option<&str>, PathBuf)> = if explicit {
        paths.iter().map(|p| (None, p.clone())).collect()
    } else {
        let mut r = vec![(Some("playbooks"), rt.config.playbook_dir())];
        r.extend(rt.config.stdlib_folder().map(|d| (Some("stdlib"), d)));
        r.extend(
            rt.config
                .library_dirs()
                .into_iter()
                .map(|d| (Some("libraries"), d)),
        );
        r
    };
    let mut problems: Vec<Diagnostic> = Vec::new();
    let mut files = Vec::new();
    for (key, root) in &roots {
        if root.is_dir() {
            collect_rhai(root, &mut files)
                .map_err(|e| CliError::Other(format!("cannot list {}: {e}", root.display())))?;
        } else if root.is_file() {
            files.push(root.clone());
        } else if let Some(key) = key {
            // A configured folder that is gone would otherwise check as "0 files, clean".
            problems.push(Diagnostic {
                message: format!("the `{key}` folder {} does not exist", root.display()),
                location: None,
                frames: Vec::new(),
                help: Some(format!(
                    "`{key}` in patchbook.toml names it; create the folder or fix the setting"
                )),
                limit: false,
            });
        } else {
            return Err(CliError::Usage(format!(
                "{} does not exist",
                root.display()
            )));
        }
    }
    if !explicit && compiler.builtin_stdlib() {
        files.extend(
            crate::script::builtin::builtin_modules()
                .into_iter()
                .map(|(name, _)| crate::script::builtin::builtin_path(&name)),
        );
    }
    files.dedup();
    let engine = run::check_engine(&rt.config.limits);
    let checker = Checker::new(engine.engine(), &rt.config.limits);
    let mut seen = std::collections::HashSet::new();
    let mut failed = std::collections::BTreeSet::new();
    for f in &files {
        match compiler.compile_file(f) {
            Ok(pb) => {
                let found = checker.check_tree(&compiler, &pb, &mut seen);
                if found.is_empty() {
                    tracing::info!(file = %f.display(), sha256 = %pb.sha256, "ok");
                }
                for d in found {
                    let file = d.location.as_ref().map(|l| l.file.clone());
                    failed.insert(file.unwrap_or_else(|| f.display().to_string()));
                    problems.push(d);
                }
            }
            Err(e) => {
                failed.insert(f.display().to_string());
                match e {
                    crate::script::ScriptError::Script(d) => problems.push(*d),
                    other => problems.push(Diagnostic {
                        message: other.to_string(),
                        location: None,
                        frames: Vec::new(),
                        help: None,
                        limit: false,
                    }),
                }
            }
        }
    }
    for p in &problems {
        eprintln!("error: {p}\n");
    }
    if !problems.is_empty() {
        eprintln!(
            "{} problems; {} of {} files failed to check",
            problems.len(),
            failed.len(),
            files.len()
        );
        return Ok(ExitCode::from(2));
    }
    if !cli.global.quiet {
        println!("{} files compiled cleanly", files.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Every `.rhai` file under `dir`, sorted, skipping hidden entries (editor swap files).
fn collect_rhai(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            collect_rhai(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "rhai") {
            out.push(p);
        }
    }
    Ok(())
}
