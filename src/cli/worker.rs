//! `patchbook worker`: joins a rollout a coordinator shares through the PostgreSQL
//! store and runs the hosts it claims, until the run is finished or halted. It
//! builds the worker's own runtime (config, inventory, transports) from its
//! project folder, compiles the run's playbook from the path the coordinator
//! stored (refusing another version of it), and runs it with the run's --param
//! values; the playbook's `rollout()` hands its per-host work to
//! [`crate::run::fleet::serve`]. It must not decide anything about the run:
//! waves, the budget and the window are the coordinator's and the store's.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::run::{engine_for, forward_stop_signals, journal_err, read_param_references};
use super::{Cli, CliError};
use crate::journal::fleet::Phase;
use crate::journal::{Journal, Store};
use crate::primitives::{Mode, RunCtx};
use crate::rollout::Clock;
use crate::run::{fleet, FleetRole, RunControl, Session, WorkerSpec};
use crate::runtime::Runtime;
use crate::script::Compiler;

/// What `patchbook worker` was given.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub zone: Option<String>,
    pub id: Option<String>,
    pub lease: String,
    pub run: Option<String>,
    pub wait: String,
}

fn duration(flag: &str, text: &str) -> Result<std::time::Duration, CliError> {
    crate::config::parse_duration(text)
        .map_err(|e| CliError::Usage(format!("{flag} {text}: {e}")))
        .and_then(|d| {
            if d.is_zero() && flag == "--lease" {
                Err(CliError::Usage("--lease must be longer than 0s".into()))
            } else {
                Ok(d)
            }
        })
}

pub fn worker(cli: &Cli, args: &WorkerArgs) -> Result<ExitCode, CliError> {
    let lease = duration("--lease", &args.lease)?;
    let wait = duration("--wait", &args.wait)?;
    let rt = Runtime::build(&cli.options())?;
    rt.ensure_state_dir()?;
    let store = rt.store().map_err(journal_err)?;
    let Store::Postgres { url, .. } = &store else {
        return Err(CliError::Usage(
            "a worker takes hosts from a run shared through the PostgreSQL store: give it with --store postgres://… (or PATCHBOOK_STORE, or [store] url)".into(),
        ));
    };
    let url = url.clone();
    let fleet_err = |e: fleet::FleetError| CliError::Other(e.to_string());
    let stop = Arc::new(AtomicBool::new(false));
    forward_stop_signals(stop.clone());
    let run = match &args.run {
        Some(r) => r.clone(),
        None => match fleet::find_running(&url, wait, &stop).map_err(fleet_err)? {
            Some(r) => r,
            None => {
                eprintln!(
                    "patchbook: worker: no shared run is running in the store; nothing to do"
                );
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let Some(ctl) = fleet::control_of(&url, &run).map_err(fleet_err)? else {
        return Err(CliError::Other(
            fleet::FleetError::NotShared { run }.to_string(),
        ));
    };
    if ctl.phase != Phase::Running {
        eprintln!("patchbook: worker: run {run} is over; nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    let id = args.id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            crate::journal::lock::hostname(),
            std::process::id()
        )
    });
    let pb = Compiler::from_config(&rt.config).compile_file(Path::new(&ctl.playbook))?;
    if pb.sha256 != ctl.playbook_sha256 {
        return Err(CliError::Usage(format!(
            "{} has sha256 {} here, run {run} runs {}: a worker runs exactly the coordinator's playbook; give this worker the same project folder",
            ctl.playbook, pb.sha256, ctl.playbook_sha256
        )));
    }
    let vars = read_param_references(&ctl.params, &rt.secrets)?;
    let journal = Journal::join_in(&store, &run, &rt.operator).map_err(journal_err)?;
    let rt = Arc::new(rt);
    let journal = Arc::new(journal.with_secrets(rt.secrets.clone()));
    let ctx = RunCtx::new(
        run.clone(),
        rt.state_dir.clone(),
        Some(journal.clone()),
        Mode::Apply,
    )
    .with_playbook(ctl.playbook.clone());
    let session = Arc::new(Session::new(rt.clone(), ctx));
    let clock = Clock::from_env().map_err(|e| CliError::Usage(e.to_string()))?;
    let sink: crate::run::EventSink = Arc::new(|_, _| {});
    let control = Arc::new(
        RunControl::new(session, clock, sink)
            .with_vars(vars)
            .with_given_params(ctl.params.clone())
            .with_stop(stop)
            .with_fleet(FleetRole::Worker(WorkerSpec {
                url,
                id: id.clone(),
                zone: args.zone.clone(),
                lease,
            })),
    );
    if !cli.global.quiet {
        eprintln!(
            "patchbook: worker {id} on run {run}{}",
            args.zone
                .as_deref()
                .map(|z| format!(", zone {z}"))
                .unwrap_or_default()
        );
    }
    let script = engine_for(&control, &pb);
    let result = script.run(&pb);
    control.finish();
    let _ = journal.flush();
    if control.fleet_over() {
        if !cli.global.quiet {
            eprintln!("patchbook: worker {id}: run {run} is over");
        }
        return Ok(ExitCode::SUCCESS);
    }
    match result {
        Err(e) => Err(e.into()),
        Ok(_) => Err(CliError::Usage(format!(
            "{} ran to its end without a rollout(): a worker runs the hosts of a rollout; check the playbook",
            ctl.playbook
        ))),
    }
}

/// `patchbook stop RUN`: halts a shared run in the store.
pub fn stop(cli: &Cli, run: &str) -> Result<ExitCode, CliError> {
    let rt = Runtime::build(&cli.options())?;
    let store = rt.store().map_err(journal_err)?;
    let Store::Postgres { url, .. } = &store else {
        return Err(CliError::Usage(
            "`patchbook stop` halts a run shared through the PostgreSQL store: give it with --store postgres://…; a run on this machine stops with Ctrl-C or SIGTERM to its controller".into(),
        ));
    };
    let fleet_err = |e: fleet::FleetError| CliError::Other(e.to_string());
    match fleet::halt(url, run).map_err(fleet_err)? {
        None => Err(CliError::Other(
            fleet::FleetError::NotShared {
                run: run.to_string(),
            }
            .to_string(),
        )),
        Some(true) => {
            println!("run {run} halted: no host starts any more; hosts in flight finish, failed ones are rolled back");
            Ok(ExitCode::SUCCESS)
        }
        Some(false) => {
            println!("run {run} was already over; nothing to stop");
            Ok(ExitCode::SUCCESS)
        }
    }
}
