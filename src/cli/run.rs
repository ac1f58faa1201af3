//! `run`, `run --resume`, `plan` and `rollback`: the commands that drive a playbook
//! through the journal. The journal is opened (or created) here, handed down, and
//! closed here; the exit code comes from what the journal-backed summaries say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::progress::{self, Style};
use super::terminal::escape_controls as esc;
use super::{Cli, CliError};
use crate::journal::entry::{Entry, HostEndDetail, ParamValue, RunResume, RunRollback};
use crate::journal::lock::{HostClaims, HostHolder};
use crate::journal::state::RunState;
use crate::journal::{Journal, RunHeader};
use crate::primitives::{Mode, RunCtx};
use crate::rollout::{Clock, StopReason, Summary};
use crate::run::{EventSink, FleetRole, RunControl, Session};
use crate::runtime::Runtime;
use crate::script::rollout::register_rollout;
use crate::script::{CompiledPlaybook, Compiler, ScriptRun};

/// Set by SIGTERM or SIGINT; the run stops starting hosts and finishes the rest.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to `stop`: in-flight host steps finish, the journal
/// is written, pending hosts stay pending for `run --resume`.
pub fn forward_stop_signals(stop: Arc<AtomicBool>) {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_stop_signal as *const () as libc::sighandler_t,
        );
    }
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
            eprintln!("patchbook: stopping: hosts in flight finish, the rest stay pending (resume with `patchbook run --resume`)");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
}

/// A new run id: UTC time plus process id, sortable and unique on one controller.
pub fn new_run_id() -> String {
    format!(
        "{}-{:05}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        std::process::id() % 100_000
    )
}

/// This run's claims on hosts, as `--wait` says: refuse at once, or queue behind
/// the holders until the timeout or until `stop` is set (Ctrl-C).
fn host_claims(
    cli: &Cli,
    rt: &Runtime,
    run_id: &str,
    command: &str,
    stop: &Arc<AtomicBool>,
) -> Result<HostClaims, CliError> {
    let claims = HostClaims::new(
        &rt.state_dir,
        HostHolder::new(run_id, &rt.operator, command),
    );
    Ok(match cli.wait_timeout()? {
        None => claims,
        Some(timeout) => {
            let quiet = cli.global.quiet;
            claims
                .waiting(timeout, stop.clone())
                .on_wait(Box::new(move |busy| {
                    if !quiet {
                        // Host and operator names come from files: escaped.
                        eprintln!(
                            "patchbook: waiting (up to {}) for {}",
                            crate::config::format_duration(timeout),
                            esc(&busy.to_string())
                        );
                    }
                }))
        }
    })
}

/// A journal that cannot be written or read stops the command; its own message
/// says which file or database and what to do.
pub(super) fn journal_err(e: crate::journal::JournalError) -> CliError {
    CliError::Other(e.to_string())
}

/// Opens run `run_id`'s journal in the configured store, anchored when signing is
/// configured.
fn begin_journal(rt: &Runtime, run_id: &str, head: &RunHeader) -> Result<Journal, CliError> {
    Journal::begin_in(
        &rt.store().map_err(journal_err)?,
        run_id,
        &rt.operator,
        head,
        rt.anchor()?,
    )
    .map_err(journal_err)
}

fn header(rt: &Runtime, playbook: &Path, pb: &CompiledPlaybook) -> RunHeader {
    RunHeader::new(
        playbook.to_path_buf(),
        pb.sha256.clone(),
        pb.modules
            .iter()
            .map(|(name, _, sha)| (name.clone(), sha.clone()))
            .collect(),
        rt.inventory.content_hash(),
        serde_json::Value::Null,
    )
    .with_config(rt.config.sha256.clone())
}

/// A run engine with every primitive, bound to this run's control.
pub(super) fn engine_for(control: &Arc<RunControl>, pb: &CompiledPlaybook) -> ScriptRun {
    let session = control.session.clone();
    let limits = session.runtime.config.limits.clone();
    let mut run = ScriptRun::with_session(&limits, session);
    register_rollout(
        run.engine_mut(),
        Some(control.clone()),
        Some(Arc::new(pb.clone())),
    );
    crate::watch::schedule::register_schedule_noop(run.engine_mut());
    run.sleep_wakes_on(control.stop.clone());
    run
}

/// `patchbook exec SELECTOR SNIPPET`: an ad-hoc run. It gets a run id and a journal
/// like `run`: every change is journaled with its undo, backups are kept, and
/// `patchbook rollback RUN` reverses it. Hosts run `--forks` at a time; a failed
/// host is not rolled back automatically (say so, and how).
pub fn exec(cli: &Cli, selector: &str, snippet: &str) -> Result<ExitCode, CliError> {
    use crate::script::{run_per_host_in, to_json, HOST_VAR};
    let rt = Arc::new(Runtime::build(&cli.options())?);
    // An empty match is an error there, naming the selector and the --limit.
    let hosts = rt.targets(selector)?;
    let pb = Compiler::from_config(&rt.config).compile_source("<exec>", snippet, &[HOST_VAR])?;
    rt.ensure_state_dir()?;
    let run_id = new_run_id();
    // Every host is claimed before the journal exists: a refused exec leaves nothing.
    // Ctrl-C while waiting ends the process, and the kernel lets go of what it held.
    let claims = Arc::new(host_claims(
        cli,
        &rt,
        &run_id,
        "exec",
        &Arc::new(AtomicBool::new(false)),
    )?);
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    claims.claim(&names).map_err(journal_err)?;
    let mut head = header(&rt, Path::new("<exec>"), &pb);
    head.ad_hoc = Some(crate::journal::AdHoc {
        selector: selector.to_string(),
        snippet: snippet.to_string(),
    });
    let journal = Arc::new(begin_journal(&rt, &run_id, &head)?.with_secrets(rt.secrets.clone()));
    let ctx = RunCtx::new(
        run_id.clone(),
        rt.state_dir.clone(),
        Some(journal.clone()),
        Mode::Apply,
    )
    .with_playbook("<exec>")
    // `claims` itself is held until the journal is closed.
    .with_claims(claims.clone());
    let session = Arc::new(Session::new(rt.clone(), ctx));
    let style = Style::pick(cli.global.json, cli.global.quiet);
    if style != Style::Json && style != Style::Quiet {
        eprintln!(
            "patchbook: run {run_id} (exec on `{selector}`), journal {}",
            journal.path().display()
        );
    }
    let limits = rt.config.limits.clone();
    let outcomes: Vec<(
        String,
        Result<serde_json::Value, crate::script::ScriptError>,
    )> = run_per_host_in(&pb, &hosts, session.clone(), &limits, rt.forks)
        .into_iter()
        .map(|r| (r.host, r.result.map(|v| to_json(&v))))
        .collect();
    // A host that could not be connected to is unreachable, not failed.
    let mut unreachable: Vec<String> = Vec::new();
    for (host, result) in &outcomes {
        match (result, session.take_lost(host)) {
            (Err(_), Some(reason)) => {
                journal
                    .append_entry(
                        Some(host),
                        &Entry::HostUnreachable(crate::journal::entry::HostUnreachable {
                            step: "exec".into(),
                            reason,
                        }),
                    )
                    .map_err(journal_err)?;
                unreachable.push(host.clone());
            }
            _ => {
                let detail = HostEndDetail {
                    reason: result.as_ref().err().map(|e| e.to_string()),
                    ..Default::default()
                };
                journal
                    .host_finished(host, result.is_ok(), detail)
                    .map_err(journal_err)?;
            }
        }
    }
    drop(session);
    if let Ok(j) = Arc::try_unwrap(journal) {
        signed_head_notice(&j.close().map_err(journal_err)?);
    }
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count() - unreachable.len();
    if cli.global.json {
        for (host, result) in &outcomes {
            let line = match result {
                Ok(v) => serde_json::json!({"run": run_id, "host": host, "ok": true, "value": v}),
                Err(e) => {
                    serde_json::json!({"run": run_id, "host": host, "ok": false, "unreachable": unreachable.contains(host), "error": e.to_string()})
                }
            };
            println!("{line}");
        }
    } else {
        // Host names and output come from the inventory and the hosts: escaped.
        let outcomes: Vec<(String, Result<String, String>, &str)> = outcomes
            .iter()
            .map(|(h, r)| {
                (
                    esc(h).into_owned(),
                    match r {
                        Ok(v) => Ok(esc(&super::show(v)).into_owned()),
                        Err(e) => Err(esc(&e.to_string()).into_owned()),
                    },
                    if unreachable.contains(h) {
                        "UNREACHABLE"
                    } else {
                        "FAILED"
                    },
                )
            })
            .collect();
        let width = outcomes
            .iter()
            .map(|(h, _, _)| h.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        println!("{:<width$}  {:<6}  RESULT", "HOST", "STATUS");
        for (host, result, bad) in &outcomes {
            match result {
                Ok(v) => println!("{:<width$}  {:<6}  {}", host, "ok", v),
                Err(text) => {
                    let mut lines = text.lines();
                    println!(
                        "{:<width$}  {:<6}  {}",
                        host,
                        bad,
                        lines.next().unwrap_or("")
                    );
                    for l in lines {
                        println!("{:<width$}  {:<6}  {l}", "", "");
                    }
                }
            }
        }
    }
    if !unreachable.is_empty() {
        eprintln!(
            "{} of {} hosts unreachable: {}",
            unreachable.len(),
            outcomes.len(),
            esc(&unreachable.join(", "))
        );
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} hosts failed; `patchbook rollback {run_id} --hosts HOST` reverses what the run changed on a host",
            outcomes.len()
        );
    }
    if failed > 0 || !unreachable.is_empty() {
        return Ok(ExitCode::from(1));
    }
    if style != Style::Json && style != Style::Quiet {
        eprintln!("patchbook: run {run_id} done; `patchbook rollback {run_id}` reverses it, `patchbook report {run_id}` shows it");
    }
    Ok(ExitCode::SUCCESS)
}

/// The engine a run builds, with no session behind it: every name a playbook may
/// call is registered exactly as for a run, and nothing can act. `patchbook check`
/// resolves calls against it, so it can never disagree with `run` about a name.
pub fn check_engine(limits: &crate::script::Limits) -> ScriptRun {
    let mut run = ScriptRun::new(limits, None);
    register_rollout(run.engine_mut(), None, None);
    crate::watch::schedule::register_schedule_noop(run.engine_mut());
    run
}

/// Tells the operator the signed head a run's close left in the audit index: kept
/// outside the state directory, its seq lets `audit verify --expect-at-least`
/// catch a later cut of the index's tail. Nothing without a signing key.
fn signed_head_notice(closed: &crate::journal::index::IndexEntry) {
    if closed.sig.is_some() {
        eprintln!(
            "patchbook: run {} closed, {} records; signed audit index entry {} (head {}); `patchbook audit verify --expect-at-least {}` shows nothing after it was cut",
            closed.run,
            closed.at_seq,
            closed.seq,
            closed.at_hash.get(..16).unwrap_or(&closed.at_hash),
            closed.seq
        );
    }
}

/// What a run needs besides its playbook and journal.
pub struct Execution {
    pub clock: Clock,
    pub sink: EventSink,
    /// Set to stop starting new hosts; hosts in flight finish.
    pub stop: Arc<AtomicBool>,
    /// `--param` values as the playbook reads them (secret references read).
    pub vars: BTreeMap<String, String>,
    /// The hosts the run holds; its rollouts claim their targets through it.
    pub claims: HostClaims,
    /// `--param` values as given, journaled as `run.params` (references kept).
    pub given: BTreeMap<String, String>,
    /// `--workers external`: the rollout is shared with `patchbook worker`s.
    pub fleet: Option<FleetRole>,
}

/// Runs a compiled playbook against a journal that is already open, then closes
/// the journal. Shared by `run`, `run --resume` and the `watch` service, so every
/// run goes through the same session, rollout glue and notifications.
pub fn execute(
    rt: &Arc<Runtime>,
    pb: &CompiledPlaybook,
    journal: Journal,
    playbook: &str,
    ex: Execution,
) -> (
    Result<rhai::Dynamic, crate::script::ScriptError>,
    Vec<Summary>,
) {
    let run_id = journal.run().to_string();
    let journal = Arc::new(journal.with_secrets(rt.secrets.clone()));
    // Held here until the journal is closed: a run queued behind this one starts
    // only once this run's record is complete.
    let claims = Arc::new(ex.claims);
    let ctx = RunCtx::new(
        run_id.clone(),
        rt.state_dir.clone(),
        Some(journal.clone()),
        Mode::Apply,
    )
    .with_playbook(playbook.to_string())
    .with_claims(claims.clone());
    let session = Arc::new(Session::new(rt.clone(), ctx));
    let mut control = RunControl::new(session.clone(), ex.clock, ex.sink)
        .with_vars(ex.vars)
        .with_given_params(ex.given)
        .with_stop(ex.stop);
    if let Some(role) = ex.fleet {
        control = control.with_fleet(role);
    }
    let control = Arc::new(control);
    let script = engine_for(&control, pb);
    let result = script.run(pb);
    // A playbook without a rollout still leaves its params for a resume.
    control.record_params();
    let summaries = control.summaries();
    finish_notice(&control, &summaries, &run_id);
    drop(script);
    drop(control);
    drop(session);
    match Arc::try_unwrap(journal) {
        Ok(j) => match j.close() {
            Err(e) => tracing::error!(error = %e, "cannot close the journal"),
            Ok(closed) => signed_head_notice(&closed),
        },
        Err(_) => {
            tracing::warn!("journal still in use at exit; it stays open (audit reports it as open)")
        }
    }
    drop(claims);
    (result, summaries)
}

/// What a run header keeps of the `--param` values: their digests, never the values.
fn param_digests(run: &str, vars: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.clone(), crate::journal::param_digest(run, k, v)))
        .collect()
}

/// `NAME=VALUE` words from `--param`.
pub fn parse_vars(words: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CliError::Usage(format!(
                "--param takes NAME=VALUE, not `{w}`"
            ))),
        })
        .collect()
}

/// How a run was asked for: afresh, continuing one, or retrying one's hosts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    New,
    /// `--resume RUN`: the same run goes on.
    Resume(&'a str),
    /// `--retry RUN`: a new run on RUN's failed and unreachable hosts.
    Retry(&'a str),
}

/// The `--param` values a resume or retry works with: those `earlier` recorded,
/// overridden or added to by the ones given now. Every difference is said on
/// stderr (values as recorded: plain values and secret references, never a value
/// that was marked secret). A value recorded as secret must be given again.
fn reuse_params(
    earlier: &str,
    state: &RunState,
    given: &BTreeMap<String, String>,
    secrets: &crate::journal::Secrets,
    say: bool,
) -> Result<BTreeMap<String, String>, CliError> {
    let Some(recorded) = &state.params else {
        return Ok(given.clone());
    };
    let shown = |v: &str| esc(&secrets.redact_str(v)).into_owned();
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, was) in recorded {
        let kept = match was {
            ParamValue::Plain(v) | ParamValue::Reference(v) => Some(v),
            ParamValue::Secret => None,
        };
        match (given.get(name), kept) {
            (Some(now), Some(was)) => {
                if say && now != was {
                    eprintln!(
                        "patchbook: --param {} overrides the value run {earlier} used: {} then, {} now",
                        esc(name),
                        shown(was),
                        shown(now)
                    );
                }
                out.insert(name.clone(), now.clone());
            }
            (Some(now), None) => {
                // Only its salted digest is on record: enough to tell it changed.
                let digest = state
                    .header
                    .as_ref()
                    .and_then(|h| h.params.as_ref())
                    .and_then(|p| p.get(name));
                let differs = !crate::run::control::is_secret_reference(now)
                    && digest
                        .is_some_and(|d| *d != crate::journal::param_digest(earlier, name, now));
                if say && differs {
                    eprintln!(
                        "patchbook: --param {} differs from the value run {earlier} used (a secret: not shown)",
                        esc(name)
                    );
                }
                out.insert(name.clone(), now.clone());
            }
            (None, Some(was)) => {
                out.insert(name.clone(), was.clone());
            }
            (None, None) => missing.push(name.clone()),
        }
    }
    for (name, now) in given {
        if !recorded.contains_key(name) {
            if say {
                eprintln!(
                    "patchbook: --param {} is new: run {earlier} ran without it",
                    esc(name)
                );
            }
            out.insert(name.clone(), now.clone());
        }
    }
    if !missing.is_empty() {
        let list = missing
            .iter()
            .map(|n| format!("--param {n}=VALUE"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(CliError::Usage(format!(
            "run {earlier} marked {} secret, so the journal did not keep {}: give {} again ({list}), or pass secrets as references (--param NAME='${{env:VAR}}') so the journal keeps the reference",
            missing.join(", "),
            if missing.len() == 1 { "its value" } else { "their values" },
            if missing.len() == 1 { "it" } else { "them" },
        )));
    }
    Ok(out)
}

/// Reads every `--param` given as a secret reference (`${env:NAME}`,
/// `${file:PATH}`); what it reads is a secret from then on.
pub(super) fn read_param_references(
    given: &BTreeMap<String, String>,
    secrets: &crate::journal::Secrets,
) -> Result<BTreeMap<String, String>, CliError> {
    given
        .iter()
        .map(|(name, value)| {
            if !crate::run::control::is_secret_reference(value) {
                return Ok((name.clone(), value.clone()));
            }
            let mut found = Vec::new();
            let read = crate::primitives::notify::expand(value, &mut found)
                .map_err(|e| CliError::Usage(format!("--param {name}: {e}")))?;
            secrets.add(&read);
            Ok((name.clone(), read))
        })
        .collect()
}

/// `patchbook run PLAYBOOK`, `run --resume RUN` and `run --retry RUN`.
pub fn run(
    cli: &Cli,
    playbook: Option<&Path>,
    start: Start<'_>,
    given: &BTreeMap<String, String>,
    external_workers: bool,
) -> Result<ExitCode, CliError> {
    let mut rt = Runtime::build(&cli.options())?;
    rt.check_limit()?;
    rt.ensure_state_dir()?;
    let fleet = if external_workers {
        match rt.store().map_err(journal_err)? {
            crate::journal::Store::Postgres { url, .. } => Some(FleetRole::Coordinator { url }),
            crate::journal::Store::File { .. } => {
                return Err(CliError::Usage(
                    "--workers external shares the run with workers through the PostgreSQL store: give it with --store postgres://… (or PATCHBOOK_STORE, or [store] url)".into(),
                ))
            }
        }
    } else {
        None
    };
    let style = Style::pick(cli.global.json, cli.global.quiet);
    let say = style != Style::Json && style != Style::Quiet;
    let mut resumed: Option<Journal> = None;
    let (earlier, state) = match start {
        Start::New => (None, None),
        Start::Resume(id) => {
            let journal = Journal::open_in(
                &rt.store().map_err(journal_err)?,
                id,
                &rt.operator,
                rt.anchor()?,
            )
            .map_err(journal_err)?;
            let state = journal.state().map_err(journal_err)?;
            resumed = Some(journal);
            (Some(id), Some(state))
        }
        Start::Retry(id) => (
            Some(id),
            Some(RunState::load_in(&rt.store().map_err(journal_err)?, id).map_err(journal_err)?),
        ),
    };
    let raw = match (earlier, &state) {
        (Some(id), Some(st)) => reuse_params(id, st, given, &rt.secrets, say)?,
        _ => given.clone(),
    };
    let vars = read_param_references(&raw, &rt.secrets)?;
    let header_of = |id: &str, st: &RunState| -> Result<RunHeader, CliError> {
        st.header.clone().ok_or_else(|| {
            if st.hosts.is_empty() {
                // The controller stopped between creating the journal and writing
                // its header: nothing ran, so there is nothing to pick up.
                CliError::Other(format!(
                    "run {id} never began: its controller stopped before the run.start record, and the journal names no host, so no host was touched; start a new run with `patchbook run PLAYBOOK`"
                ))
            } else {
                CliError::Other(format!(
                    "run {id} has no run.start record; it cannot be resumed or retried"
                ))
            }
        })
    };
    if let (Start::Retry(id), Some(st)) = (start, &state) {
        let hosts: Vec<String> = st.retry_hosts().into_iter().map(str::to_string).collect();
        if hosts.is_empty() {
            println!("run {id} has no failed or unreachable host: nothing to retry");
            return Ok(ExitCode::SUCCESS);
        }
        if say {
            eprintln!(
                "patchbook: retrying the {} failed or unreachable host(s) of run {id}: {}",
                hosts.len(),
                esc(&hosts.join(", "))
            );
        }
        rt.restrict_to(hosts);
    }
    let rt = Arc::new(rt);
    let (run_id, journal, playbook, pb) = match (start, resumed, &state) {
        (Start::Resume(run_id), Some(journal), Some(st)) => {
            let h = header_of(run_id, st)?;
            let path = playbook
                .map(Path::to_path_buf)
                .unwrap_or(h.playbook.clone());
            let pb = Compiler::from_config(&rt.config).compile_file(&path)?;
            if pb.sha256 != h.playbook_sha256 {
                return Err(CliError::Usage(format!(
                    "{} changed since run {run_id} started (sha256 {} then, {} now); resume needs the same playbook: restore it, or start a new run",
                    path.display(),
                    h.playbook_sha256,
                    pb.sha256
                )));
            }
            let mut now = header(&rt, &path, &pb);
            // With the values on record, a difference was said above and the
            // resume goes on with it; without them, the digests must match.
            if st.params.is_none() {
                now.params = Some(param_digests(run_id, &vars));
            }
            h.check_resume(run_id, &now)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            journal
                .append_entry(
                    None,
                    &Entry::RunResume(RunResume {
                        operator: rt.operator.clone(),
                    }),
                )
                .map_err(journal_err)?;
            (run_id.to_string(), journal, path, pb)
        }
        (Start::Retry(of), _, Some(st)) => {
            let h = header_of(of, st)?;
            let path = playbook
                .map(Path::to_path_buf)
                .unwrap_or(h.playbook.clone());
            let pb = Compiler::from_config(&rt.config).compile_file(&path)?;
            if say && pb.sha256 != h.playbook_sha256 {
                eprintln!(
                    "patchbook: {} changed since run {of} (sha256 {} then, {} now); the retry runs it as it is now",
                    path.display(),
                    h.playbook_sha256,
                    pb.sha256
                );
            }
            let run_id = new_run_id();
            let mut head = header(&rt, &path, &pb);
            head.params = Some(param_digests(&run_id, &vars));
            head.retry_of = Some(of.to_string());
            let journal = begin_journal(&rt, &run_id, &head)?;
            (run_id, journal, path, pb)
        }
        _ => {
            let Some(path) = playbook else {
                return Err(CliError::Usage(
                    "name a playbook, or --resume RUN, or --retry RUN".into(),
                ));
            };
            let pb = Compiler::from_config(&rt.config).compile_file(path)?;
            let run_id = new_run_id();
            let mut head = header(&rt, path, &pb);
            head.params = Some(param_digests(&run_id, &vars));
            let journal = begin_journal(&rt, &run_id, &head)?;
            (run_id, journal, path.to_path_buf(), pb)
        }
    };
    if say {
        eprintln!(
            "patchbook: run {run_id} ({}), journal {}",
            playbook.display(),
            journal.path().display()
        );
    }
    let clock = Clock::from_env().map_err(|e| CliError::Usage(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    forward_stop_signals(stop.clone());
    let claims = host_claims(cli, &rt, &run_id, "run", &stop)?;
    // Workers compile the playbook from the path the coordinator stores: one
    // that does not depend on this process's working folder.
    let playbook = if fleet.is_some() {
        std::path::absolute(&playbook).unwrap_or(playbook)
    } else {
        playbook
    };
    let (result, summaries) = execute(
        &rt,
        &pb,
        journal,
        &playbook.display().to_string(),
        Execution {
            clock,
            sink: progress::sink(style, &run_id),
            stop,
            vars,
            claims,
            given: raw,
            fleet,
        },
    );
    let _ = result?;
    // The journal says which hosts of the run could not be connected to, whether
    // a rollout reported them or only a probe met them.
    let unreachable: Vec<String> = rt
        .store()
        .and_then(|store| RunState::unreachable_in(&store, &run_id))
        .unwrap_or_default();
    let failed: usize = summaries
        .iter()
        .map(|s| s.totals.failed + s.totals.rollback_failed)
        .sum::<usize>()
        + unreachable.len();
    let stopped = summaries.iter().any(|s| s.stop != StopReason::Completed);
    if style == Style::Quiet {
        // Quiet drops the chatter, never the bad news: each host that failed or
        // whose rollback failed still gets its line.
        for line in problem_lines(&summaries) {
            eprintln!("patchbook: run {run_id}: {}", esc(&line));
        }
    }
    if say {
        for s in &summaries {
            let t = &s.totals;
            eprintln!(
                "patchbook: run {run_id}: {} targeted, {} done, {} failed, {} unreachable, {} rolled back, {} pending ({}); report: patchbook report {run_id}",
                t.targeted, t.done, t.failed, t.unreachable, t.rolled_back, t.pending, s.stop
            );
        }
    }
    if !cli.global.json {
        // On stdout, even with -q: the hosts the run did not patch, and the way
        // to work on exactly them again.
        let failed_hosts: Vec<String> = summaries
            .iter()
            .flat_map(|s| s.hosts.iter())
            .filter(|h| h.state == crate::rollout::HostStatus::Failed)
            .map(|h| esc(&h.name).into_owned())
            .collect();
        if !unreachable.is_empty() {
            println!("unreachable: {}", esc(&unreachable.join(", ")));
        }
        if !failed_hosts.is_empty() {
            println!("failed: {}", failed_hosts.join(", "));
        }
        if !unreachable.is_empty() || !failed_hosts.is_empty() {
            println!("retry them: patchbook run --retry {run_id}");
        }
    }
    Ok(if failed > 0 || stopped {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line per host that failed, was unreachable or whose rollback failed, and
/// per rollout that stopped early, for `-q`.
fn problem_lines(summaries: &[Summary]) -> Vec<String> {
    let mut lines = Vec::new();
    for s in summaries {
        for h in &s.hosts {
            let reason = h.reason.as_deref().unwrap_or("no reason recorded");
            match h.state {
                crate::journal::entry::HostStatus::Failed => {
                    lines.push(format!("{} failed: {reason}", h.name))
                }
                crate::journal::entry::HostStatus::Unreachable => {
                    lines.push(format!("{} unreachable: {reason}", h.name))
                }
                _ => {}
            }
            if let Some(e) = &h.rollback_error {
                lines.push(format!("{} rollback failed: {e}", h.name));
            }
        }
        if s.stop != StopReason::Completed {
            lines.push(format!("stopped: {}", s.stop));
        }
    }
    lines
}

fn finish_notice(control: &RunControl, summaries: &[crate::rollout::Summary], run_id: &str) {
    use crate::primitives::notify;
    let mut s = notify::RunSummary::default();
    for sum in summaries {
        let t = &sum.totals;
        s.targeted += t.targeted;
        s.patched += t.done;
        s.failed += t.failed;
        s.unreachable += t.unreachable;
        s.rolled_back += t.rolled_back;
        s.pending += t.pending;
    }
    let notice = notify::RunFinished {
        run: run_id.to_string(),
        summary: s,
        report: Some(format!("patchbook report {run_id}")),
        duration: Some(control.elapsed()),
    }
    .notice();
    control.notify(notice, Vec::new());
    // Every queued notice is delivered and journaled before the journal closes.
    control.finish();
}

/// `patchbook plan PLAYBOOK`: the same script with every mutating primitive
/// recording instead of acting; prints the waves and each host's actions.
pub fn plan(
    cli: &Cli,
    playbook: &Path,
    vars: &BTreeMap<String, String>,
) -> Result<ExitCode, CliError> {
    let rt = Arc::new(Runtime::build(&cli.options())?);
    rt.check_limit()?;
    let pb = Compiler::from_config(&rt.config).compile_file(playbook)?;
    let ctx = RunCtx::new("plan", rt.state_dir.clone(), None, Mode::Plan)
        .with_playbook(playbook.display().to_string());
    let session = Arc::new(Session::new(rt.clone(), ctx));
    let clock = Clock::from_env().map_err(|e| CliError::Usage(e.to_string()))?;
    let control = Arc::new(
        RunControl::new(session.clone(), clock, Arc::new(|_, _| {})).with_vars(vars.clone()),
    );
    let script = engine_for(&control, &pb);
    let _ = script.run(&pb)?;
    let verdicts = plan_verdicts(&control.host_plans(), session.run.planned());
    // Notices are planned on the controller, which is no host of the fleet.
    let hosts = || {
        verdicts
            .iter()
            .filter(|v| v.host != crate::primitives::context::CONTROLLER)
    };
    let would_change = hosts().filter(|v| v.verdict == "would change").count();
    let unchanged = hosts().filter(|v| v.verdict == "would not change").count();
    let unplannable = hosts().filter(|v| v.error.is_some()).count();
    if cli.global.json {
        let v = serde_json::json!({
            "plans": control.plans(),
            "hosts": verdicts,
            "would_change": would_change,
            "would_not_change": unchanged,
            "could_not_plan": unplannable,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        // One write for the whole plan: a line per write was a tenth of a
        // 10,000-host plan's time.
        let mut out = String::new();
        if let Some(w) = control.window() {
            let now = control.clock.now();
            let _ = writeln!(
                out,
                "window: {} ({})",
                w.spec(),
                if w.contains(now) {
                    "open now"
                } else {
                    "closed now"
                }
            );
        }
        for p in control.plans() {
            let _ = writeln!(out, "{}", esc(&p.to_string()));
        }
        for v in &verdicts {
            let _ = writeln!(out, "{}: {}", esc(&v.host), esc(v.verdict));
            for a in &v.actions {
                let what = if a.change { "" } else { " (check, not run)" };
                // A diff's lines are indented under their step.
                let detail = esc(&a.detail).replace('\n', "\n      ");
                let _ = writeln!(
                    out,
                    "  {:<10} {:<8} {detail}{what}",
                    esc(&a.step.to_string()),
                    esc(&a.result.to_string())
                );
            }
            if let Some(e) = &v.error {
                for (i, line) in esc(e).lines().enumerate() {
                    let _ = writeln!(out, "  {} {line}", if i == 0 { "error:" } else { "      " });
                }
            }
        }
        let _ = writeln!(
            out,
            "{would_change} host(s) would change, {unchanged} would not change, {unplannable} could not be planned"
        );
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| CliError::Other(format!("writing the plan to standard output: {e}")))?;
    }
    Ok(if unplannable > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One host's line in `plan`: what it would do, or why it could not be planned.
#[derive(Debug, serde::Serialize)]
struct PlanVerdict {
    host: String,
    verdict: &'static str,
    actions: Vec<crate::primitives::PlannedAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Groups the planned actions by host, in the order the rollouts planned the hosts
/// (hosts that only appear in actions outside a rollout come after). Hosts run in
/// parallel, so a lookup table keeps this linear in the number of hosts.
fn plan_verdicts(
    hosts: &[crate::run::HostPlan],
    actions: Vec<crate::primitives::PlannedAction>,
) -> Vec<PlanVerdict> {
    let mut out: Vec<PlanVerdict> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut slot = |out: &mut Vec<PlanVerdict>, host: &str| -> usize {
        *at.entry(host.to_string()).or_insert_with(|| {
            out.push(PlanVerdict {
                host: host.to_string(),
                verdict: "would not change",
                actions: Vec::new(),
                error: None,
            });
            out.len() - 1
        })
    };
    for h in hosts {
        let i = slot(&mut out, &h.host);
        if h.error.is_some() {
            out[i].error = h.error.clone();
        }
    }
    for a in actions {
        let i = slot(&mut out, &a.host);
        out[i].actions.push(a);
    }
    for v in &mut out {
        v.verdict = if v.error.is_some() {
            "could not be planned"
        } else if v.actions.iter().any(|a| a.change) {
            "would change"
        } else {
            "would not change"
        };
    }
    out
}

/// `patchbook rollback RUN [--hosts SELECTOR]`: reverses a run from its journal
/// alone, in reverse deployment order, verifying each host.
pub fn rollback(cli: &Cli, run_id: &str, hosts: Option<&str>) -> Result<ExitCode, CliError> {
    let rt = Arc::new(Runtime::build(&cli.options())?);
    // A selector that matches no host is an error before the run is reopened: a
    // typo must not read as "nothing to reverse".
    let allowed: Option<Vec<String>> = match hosts {
        Some(sel) => Some(rt.targets(sel)?.into_iter().map(|h| h.name).collect()),
        None => None,
    };
    let journal = Arc::new(
        Journal::open_in(
            &rt.store().map_err(journal_err)?,
            run_id,
            &rt.operator,
            rt.anchor()?,
        )
        .map_err(journal_err)?,
    );
    let state = journal.state().map_err(journal_err)?;
    let order: Vec<String> = state
        .rollback_order()
        .into_iter()
        .filter(|h| allowed.as_ref().is_none_or(|a| a.iter().any(|x| x == h)))
        .map(str::to_string)
        .collect();
    // The hosts to reverse are claimed before the journal says a rollback began:
    // a refused rollback writes nothing. Ctrl-C while waiting ends the process.
    let claims = Arc::new(host_claims(
        cli,
        &rt,
        run_id,
        "rollback",
        &Arc::new(AtomicBool::new(false)),
    )?);
    claims.claim(&order).map_err(journal_err)?;
    journal
        .append_entry(
            None,
            &Entry::RunRollback(RunRollback {
                hosts: hosts.map(str::to_string),
                operator: rt.operator.clone(),
            }),
        )
        .map_err(journal_err)?;
    let ctx = RunCtx::new(
        run_id,
        rt.state_dir.clone(),
        Some(journal.clone()),
        Mode::Apply,
    )
    // `claims` itself is held until the journal is closed.
    .with_claims(claims.clone());
    let session = Session::new(rt.clone(), ctx);
    let mut failed = 0;
    for name in &order {
        let Some(host) = rt.inventory.host(name) else {
            eprintln!("{name}: not in the inventory any more; roll it back by hand (its undo steps are in the journal)");
            failed += 1;
            continue;
        };
        let r = session.with_host(host, crate::primitives::undo::rollback);
        let (ok, line) = match &r {
            Ok(rep) if rep.manual.is_empty() && rep.undone.is_empty() => {
                (true, "nothing left to undo".to_string())
            }
            Ok(rep) if rep.manual.is_empty() => {
                (true, format!("rolled back: {}", rep.undone.join(", ")))
            }
            Ok(rep) => (false, format!("NOT FULLY REVERTED: {}", rep.partial())),
            Err(e) => (false, format!("ROLLBACK FAILED: {e}")),
        };
        let _ = journal.host_rolled_back(
            name,
            ok,
            HostEndDetail {
                detail: Some(line.clone()),
                command: Some("rollback".into()),
                ..Default::default()
            },
        );
        if !ok {
            failed += 1;
        }
        println!("{}: {}", esc(name), esc(&line));
    }
    if order.is_empty() {
        println!("run {run_id}: no host has a change to reverse");
    }
    drop(session);
    if let Ok(j) = Arc::try_unwrap(journal) {
        if let Ok(closed) = j.close() {
            signed_head_notice(&closed);
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Starts `watch`'s runs the same way `patchbook run` does: journal header with
/// the pinned generation's hashes, session, rollout, notifications.
pub struct RolloutLauncher {
    rt: Arc<Runtime>,
}

impl RolloutLauncher {
    pub fn new(rt: Arc<Runtime>) -> Self {
        RolloutLauncher { rt }
    }
}

impl crate::watch::Launcher for RolloutLauncher {
    fn runtime(&self) -> Option<Arc<Runtime>> {
        Some(self.rt.clone())
    }

    fn launch(
        &self,
        req: &crate::watch::LaunchRequest,
        progress: &dyn Fn(crate::watch::ProgressCounts),
        stop: Arc<AtomicBool>,
    ) -> Result<crate::watch::LaunchResult, String> {
        use crate::watch::ProgressCounts;
        let rt = &self.rt;
        let pb = &req.playbook;
        let mut head = header(rt, &pb.path, pb);
        head.params = Some(param_digests(&req.run_id, &req.params));
        let anchor = rt.anchor().map_err(|e| e.to_string())?;
        let store = rt.store().map_err(|e| e.to_string())?;
        let journal = Journal::begin_in(&store, &req.run_id, &rt.operator, &head, anchor)
            .map_err(|e| e.to_string())?;
        if let Some(tap) = &req.tap {
            let _ = journal.set_tap(tap.clone());
        }
        progress(ProgressCounts::default());
        let (tx, rx) = std::sync::mpsc::channel::<ProgressCounts>();
        let counts = std::sync::Mutex::new(ProgressCounts::default());
        let sink: EventSink = Arc::new(move |_, e: &crate::rollout::RolloutEvent| {
            use crate::rollout::RolloutEvent as E;
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            match e {
                E::RunStarted { targets, .. } => {
                    c.targeted += targets;
                    c.pending += targets;
                }
                E::HostStarted { .. } => {
                    c.in_progress += 1;
                    c.pending = c.pending.saturating_sub(1);
                }
                E::HostDone { .. } => {
                    c.in_progress = c.in_progress.saturating_sub(1);
                    c.done += 1;
                }
                E::HostFailed { .. } => {
                    c.in_progress = c.in_progress.saturating_sub(1);
                    c.failed += 1;
                }
                // Wave 0 before any host started: a host a probe left out.
                E::HostUnreachable { .. } if c.in_progress == 0 && c.done + c.failed == 0 => {
                    c.targeted += 1;
                    c.unreachable += 1;
                }
                E::HostUnreachable { .. } => {
                    c.in_progress = c.in_progress.saturating_sub(1);
                    c.unreachable += 1;
                }
                _ => return,
            }
            let _ = tx.send(*c);
        });
        let clock = Clock::from_env().map_err(|e| e.to_string())?;
        // Nobody sits at the service to wait: a run whose hosts are busy is
        // refused, and its result and journal (`run.refused`) name the holder.
        let claims = HostClaims::new(
            &rt.state_dir,
            HostHolder::new(&req.run_id, &rt.operator, "watch"),
        );
        let ex = Execution {
            clock,
            sink,
            stop,
            vars: req.params.clone(),
            claims,
            given: req.params.clone(),
            fleet: None,
        };
        let playbook = pb.path.display().to_string();
        let (result, summaries) = std::thread::scope(|s| {
            let worker = s.spawn(|| execute(rt, pb, journal, &playbook, ex));
            for c in rx.iter() {
                progress(c);
            }
            worker.join().map_err(|_| "the run panicked".to_string())
        })?;
        let failed: usize = summaries
            .iter()
            .map(|s| s.totals.failed + s.totals.unreachable + s.totals.rollback_failed)
            .sum();
        let stopped = summaries.iter().any(|s| s.stop != StopReason::Completed);
        let summary = match &result {
            Err(e) => format!("script error: {}", crate::journal::scrub(&e.to_string())),
            Ok(_) => summaries
                .iter()
                .map(|s| {
                    let t = &s.totals;
                    format!(
                        "{} targeted, {} done, {} failed, {} unreachable, {} pending",
                        t.targeted, t.done, t.failed, t.unreachable, t.pending
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        };
        Ok(crate::watch::LaunchResult {
            run_id: req.run_id.clone(),
            ok: result.is_ok() && failed == 0 && !stopped,
            summary,
        })
    }
}
