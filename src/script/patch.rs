//! Registration of the patch primitives: facts, installed, needing, version
//! comparison, artifact, backup/restore, deploy, verify, health, http_check,
//! service_active, rollback, notify and secret, with the `Artifact` and `Backup`
//! types they hand back.
//!
//! Each function is a thin adapter over a typed primitive: it checks the Rhai
//! arguments (refusing hostile package names, versions, paths, unit names and argv
//! words before any command runs), asks the [`Session`] for the host's context, and
//! turns the result into Rhai values. Every error is a runtime error at the call
//! position that names the host and the step. In `plan` mode, steps that change a
//! host (or run arbitrary commands on it) record a planned action and hand back a
//! placeholder. Nothing here talks to a transport or the journal except through the
//! session; it must not decide policy.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{Array, Dynamic, Engine, EvalAltResult, FuncRegistration, Map, NativeCallContext};

use super::register::{ScriptHost, EXEC_OPTION_KEYS, PROBE_OPTION_KEYS};
use crate::inventory::{Host, TransportKind};
use crate::journal::entry::{Entry, HttpCheckRecord};
use crate::journal::UndoStep;
use crate::primitives::artifact::{fetch_recorded, Artifact, ArtifactSpec};
use crate::primitives::backup::BackupHandle;
use crate::primitives::deploy::{DeployOptions, Method};
use crate::primitives::health::{HealthCheck, HttpCheck};
use crate::primitives::notify::Severity;
use crate::primitives::{cut, version, HostCtx, Mode, PrimitiveError};
use crate::run::Session;

pub(super) type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Longest argv word accepted from a playbook. Real arguments are far shorter; the
/// cap keeps megabyte strings away from command lines and error messages.
pub const MAX_WORD: usize = 8 * 1024;
/// Longest path accepted for backup.
const MAX_PATH: usize = 4096;
/// Characters that mean something to a shell. No transport ever hands argv to a
/// shell unquoted, but a path or unit name holding them is refused outright: the
/// rule is "neither executed nor accepted".
const SHELL_META: &str = ";&|$`<>(){}*?!\"'\\";
/// The longest a single command may run when no call deadline is tighter.
const MAX_COMMAND: Duration = Duration::from_secs(600);

/// An artifact as scripts see it: a verified file in the controller's cache.
#[derive(Debug, Clone)]
pub struct ScriptArtifact(pub Arc<Artifact>);

/// A backup as scripts see it: an archive on the controller with its manifest.
#[derive(Debug, Clone)]
pub struct ScriptBackup(pub Arc<BackupHandle>);

pub(super) fn fail<T>(ctx: &NativeCallContext, message: impl Into<String>) -> RhaiResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        ctx.call_position(),
    )))
}

pub(super) fn session<'a>(
    ctx: &NativeCallContext,
    s: &'a Option<Arc<Session>>,
    what: &str,
) -> RhaiResult<&'a Arc<Session>> {
    match s {
        Some(s) => Ok(s),
        None => fail(
            ctx,
            format!(
                "{what}() needs a run: it cannot run while modules are being compiled (call it from inside a function or from the playbook), nor outside `patchbook run`/`plan`"
            ),
        ),
    }
}

/// The message of a primitive's error, always starting with the host and naming the step.
pub(super) fn host_message(host: &str, step: &str, e: &PrimitiveError) -> String {
    let text = e.to_string();
    if text.starts_with(&format!("{host}:")) || text.starts_with(&format!("{host} ")) {
        text
    } else if text.starts_with(&format!("{step}:")) || text.starts_with(&format!("{step} ")) {
        format!("{host}: {text}")
    } else {
        format!("{host}: {step}: {text}")
    }
}

/// The earlier of two deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The wall-clock end of the script call in progress on this thread, if any.
pub(super) fn call_deadline() -> Option<Instant> {
    super::engine::remaining().map(|r| Instant::now() + r)
}

/// Runs `f` with the host's context; commands get at most the time left to the
/// host (rollout deadline) and to the script call.
pub(super) fn with_host<R>(
    s: &Session,
    host: &Host,
    call: Option<Instant>,
    f: impl FnOnce(&HostCtx) -> Result<R, PrimitiveError>,
) -> Result<R, PrimitiveError> {
    s.with_host(host, |hc| {
        let hc = HostCtx {
            host: hc.host,
            transport: hc.transport,
            run: hc.run,
            deadline: earliest(hc.deadline, call),
        };
        f(&hc)
    })
}

pub(super) fn on_host<R>(
    ctx: &NativeCallContext,
    s: &Session,
    host: &ScriptHost,
    step: &str,
    f: impl FnOnce(&HostCtx) -> Result<R, PrimitiveError>,
) -> RhaiResult<R> {
    match with_host(s, &host.0, call_deadline(), f) {
        Ok(r) => Ok(r),
        Err(e) => fail(ctx, host_message(host.name(), step, &e)),
    }
}

fn planning(s: &Session) -> bool {
    s.run.mode == Mode::Plan
}

/// Records a planned action that belongs to no host (a notification).
fn plan_on_controller(s: &Session, step: &str, detail: String) {
    let mut host = Host::new(crate::primitives::context::CONTROLLER);
    host.transport = TransportKind::Local;
    let transport =
        crate::transport::local::LocalTransport::new(crate::primitives::context::CONTROLLER);
    let hc = HostCtx {
        host: &host,
        transport: &transport,
        run: &s.run,
        deadline: None,
    };
    hc.plan(step, detail, "unknown");
}

/// "`where_`: refused `what` "value": reason", where `where_` names host and step.
pub(super) fn refused(where_: &str, what: &str, value: &str, reason: &str) -> String {
    format!("{where_}: refused {what} {:?}: {reason}", cut(value, 80))
}

/// A package name either package manager would accept; the primitive checks it
/// again against the host's own grammar once the facts are known.
pub(super) fn check_package_arg(
    ctx: &NativeCallContext,
    where_: &str,
    pkg: &str,
) -> RhaiResult<()> {
    if version::valid_deb_package(pkg) || version::valid_rpm_name(pkg) {
        return Ok(());
    }
    let reason = version::check_deb_package(pkg)
        .err()
        .map(|e| e.reason)
        .unwrap_or_default();
    fail(
        ctx,
        refused(
            where_,
            "package name",
            pkg,
            &format!("not a valid dpkg or rpm package name ({reason})"),
        ),
    )
}

pub(super) fn check_version_arg(ctx: &NativeCallContext, where_: &str, v: &str) -> RhaiResult<()> {
    if version::valid_deb_version(v) || version::valid_rpm_version(v) {
        return Ok(());
    }
    let reason = version::check_deb_version(v)
        .err()
        .map(|e| e.reason)
        .unwrap_or_default();
    fail(
        ctx,
        refused(
            where_,
            "version",
            v,
            &format!("not a valid dpkg or rpm version ({reason})"),
        ),
    )
}

/// The strings of an array, refusing anything that is not one.
pub(super) fn strings(
    ctx: &NativeCallContext,
    host: &str,
    step: &str,
    what: &str,
    a: Array,
) -> RhaiResult<Vec<String>> {
    let mut out = Vec::with_capacity(a.len());
    for (i, v) in a.into_iter().enumerate() {
        match v.into_immutable_string() {
            Ok(s) => out.push(s.to_string()),
            Err(ty) => {
                return fail(
                    ctx,
                    format!("{host}: {step}: {what}[{i}] is {ty}, not a string"),
                )
            }
        }
    }
    Ok(out)
}

/// Why an argv from a playbook is refused, if it is: empty, a program word that is
/// not a plain path or name, a NUL (no command line can carry one) or an oversized word.
pub fn argv_problem(argv: &[String]) -> Option<String> {
    let Some(program) = argv.first() else {
        return Some("argv is empty; give the program and its arguments, e.g. [\"systemctl\", \"is-active\", \"nginx\"]".into());
    };
    if program.is_empty()
        || program.starts_with('-')
        || !program
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._+-".contains(c))
    {
        return Some(format!(
            "the program {:?} must be a plain path or name (letters, digits, '/', '.', '_', '+', '-', not starting with '-')",
            cut(program, 80)
        ));
    }
    for (i, w) in argv.iter().enumerate() {
        if w.contains('\0') {
            return Some(format!(
                "argv[{i}] contains NUL, which no command line can carry"
            ));
        }
        if w.len() > MAX_WORD {
            return Some(format!(
                "argv[{i}] is {} bytes; words are at most {MAX_WORD} bytes",
                w.len()
            ));
        }
    }
    None
}

pub(super) fn argv_arg(
    ctx: &NativeCallContext,
    host: &str,
    step: &str,
    argv: Array,
) -> RhaiResult<Vec<String>> {
    let words = strings(ctx, host, step, "argv", argv)?;
    match argv_problem(&words) {
        None => Ok(words),
        Some(p) => fail(ctx, format!("{host}: {step}: refused argv: {p}")),
    }
}

/// Why a backup path is refused before it reaches the primitive, if it is.
pub fn path_problem(p: &str) -> Option<&'static str> {
    if p.len() > MAX_PATH {
        return Some("paths are at most 4096 bytes");
    }
    if p.chars().any(|c| c.is_control()) {
        return Some("paths have no control characters (newline, NUL, …)");
    }
    if !p.starts_with('/') {
        return Some("backup paths must be absolute");
    }
    if p.split('/').any(|c| c.starts_with('-')) {
        return Some("no part of a backup path may start with '-' (it would read as an option)");
    }
    if p.chars().any(|c| SHELL_META.contains(c)) {
        return Some(
            "paths with shell metacharacters (; & | $ ` < > ( ) { } * ? ! quotes \\) are refused",
        );
    }
    None
}

/// A systemd unit name: letters, digits and `:-_.@\`, not starting with `-`.
pub fn unit_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 256 {
        return Some("unit names are 1 to 256 characters");
    }
    if name.starts_with('-') {
        return Some("unit names do not start with '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c))
    {
        return Some("unit names hold only letters, digits and ':', '-', '_', '.', '@', '\\'");
    }
    None
}

pub(super) fn opt_str(m: &Map, key: &str) -> Result<Option<String>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .clone()
            .into_immutable_string()
            .map(|s| Some(s.to_string()))
            .map_err(|ty| format!("`{key}` must be a string, got {ty}")),
    }
}

fn opt_int(m: &Map, key: &str) -> Result<Option<i64>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .as_int()
            .map(Some)
            .map_err(|ty| format!("`{key}` must be an integer, got {ty}")),
    }
}

/// A duration option: `"2s"`, `"1m30s"`, `"500ms"`, or a number of seconds.
pub(super) fn opt_duration(m: &Map, key: &str) -> Result<Option<Duration>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => {
            if let Ok(n) = v.as_int() {
                return u64::try_from(n)
                    .map(|n| Some(Duration::from_secs(n)))
                    .map_err(|_| format!("`{key}` must not be negative"));
            }
            match v.clone().into_immutable_string() {
                Ok(s) => crate::config::parse_duration(&s)
                    .map(Some)
                    .map_err(|e| format!("`{key}`: {e}")),
                Err(ty) => Err(format!(
                    "`{key}` must be a duration like \"2s\" or a number of seconds, got {ty}"
                )),
            }
        }
    }
}

/// Keys of `artifact(url, #{ … })`; `patchbook check` reads the same list.
pub const ARTIFACT_OPTION_KEYS: &[&str] = &["sha256", "size", "signature"];
/// Keys of `deploy(host, artifact, #{ … })`.
pub const DEPLOY_OPTION_KEYS: &[&str] = &["method", "rollback_to", "timeout"];
/// Keys of `health(host, argv, #{ … })`.
pub const HEALTH_OPTION_KEYS: &[&str] = &[
    "expect_code",
    "expect_stdout",
    "retries",
    "delay",
    "timeout",
];
/// Keys of `http_check(url, #{ … })`.
pub const HTTP_CHECK_OPTION_KEYS: &[&str] = &["status", "contains", "timeout"];
/// Keys of `notify(to, message, #{ … })`.
pub const NOTIFY_OPTION_KEYS: &[&str] = &["severity"];

/// Refuses a key of an option map that is not in `known`: a misspelt option
/// silently falling back to its default is how a run does the wrong thing.
pub(crate) fn no_unknown_keys(m: &Map, known: &[&str]) -> Result<(), String> {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            return Err(format!(
                "unknown option `{k}`; known options: {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

pub(super) fn opt_string(v: Option<String>) -> Dynamic {
    v.map(Dynamic::from).unwrap_or(Dynamic::UNIT)
}

fn facts_map(f: &crate::primitives::facts::Facts) -> Map {
    let mut m = Map::new();
    m.insert("os_id".into(), f.os_id.clone().into());
    m.insert("os_version".into(), f.os_version.clone().into());
    m.insert(
        "os_like".into(),
        Dynamic::from_array(f.os_like.iter().map(|s| Dynamic::from(s.clone())).collect()),
    );
    m.insert(
        "package_manager".into(),
        f.package_manager.as_str().to_string().into(),
    );
    m.insert("arch".into(), f.arch.clone().into());
    m.insert("kernel".into(), f.kernel.clone().into());
    m
}

fn cmp_int(o: Ordering) -> i64 {
    match o {
        Ordering::Less => -1,
        Ordering::Equal => 0,
        Ordering::Greater => 1,
    }
}

/// A property of a custom type: name, Rhai type, doc comment, getter.
type Getter<T> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&mut T) -> Dynamic,
);

/// Registers `Artifact` and `Backup` with their getters.
pub fn register_patch_types(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptArtifact>("Artifact");
    engine.register_type_with_name::<ScriptBackup>("Backup");
    let getters: [Getter<ScriptArtifact>; 5] = [
        (
            "url",
            "String",
            "/// Where the artifact was fetched from, as the playbook gave it.",
            |a| a.0.url.clone().into(),
        ),
        (
            "sha256",
            "String",
            "/// The verified SHA-256 of the file, lowercase hex.",
            |a| a.0.sha256.clone().into(),
        ),
        (
            "size",
            "int",
            "/// The verified size of the file in bytes.",
            |a| i64::try_from(a.0.bytes).unwrap_or(i64::MAX).into(),
        ),
        (
            "path",
            "String",
            "/// The file in the controller's content-addressed cache.",
            |a| a.0.path.display().to_string().into(),
        ),
        (
            "signature_checked",
            "bool",
            "/// True when a minisign signature was checked against a pinned key.",
            |a| a.0.signature_checked.into(),
        ),
    ];
    for (name, ty, doc, get) in getters {
        FuncRegistration::new_getter(name)
            .with_params_info(["artifact: &mut Artifact", ty])
            .with_comments([doc])
            .register_into_engine(engine, get);
    }
    let getters: [Getter<ScriptBackup>; 7] = [
        (
            "id",
            "String",
            "/// The backup's id within its host and run, e.g. `b001`.",
            |b| b.0.id.clone().into(),
        ),
        (
            "host",
            "String",
            "/// The host the backup was taken from.",
            |b| b.0.host.clone().into(),
        ),
        (
            "sha256",
            "String",
            "/// SHA-256 of the archive, as written in its manifest.",
            |b| b.0.sha256.clone().into(),
        ),
        (
            "archive",
            "String",
            "/// The archive on the controller (never on the host).",
            |b| b.0.archive.display().to_string().into(),
        ),
        ("size", "int", "/// Size of the archive in bytes.", |b| {
            i64::try_from(b.0.size).unwrap_or(i64::MAX).into()
        }),
        (
            "paths",
            "Array",
            "/// The host paths the archive holds, as given.",
            |b| Dynamic::from_array(b.0.paths.iter().map(|p| Dynamic::from(p.clone())).collect()),
        ),
        (
            "missing",
            "Array",
            "/// Paths that did not exist on the host when the backup was taken.",
            |b| {
                Dynamic::from_array(
                    b.0.missing
                        .iter()
                        .map(|p| Dynamic::from(p.clone()))
                        .collect(),
                )
            },
        ),
    ];
    for (name, ty, doc, get) in getters {
        FuncRegistration::new_getter(name)
            .with_params_info(["backup: &mut Backup", ty])
            .with_comments([doc])
            .register_into_engine(engine, get);
    }
    engine
        .register_fn("to_string", |a: &mut ScriptArtifact| {
            format!("Artifact({} sha256:{})", a.0.url, a.0.sha256)
        })
        .register_fn("to_debug", |a: &mut ScriptArtifact| {
            format!("Artifact({} sha256:{})", a.0.url, a.0.sha256)
        })
        .register_fn("to_string", |b: &mut ScriptBackup| {
            format!("Backup({} {})", b.0.host, b.0.id)
        })
        .register_fn("to_debug", |b: &mut ScriptBackup| {
            format!("Backup({} {})", b.0.host, b.0.id)
        });
}

/// Registers the patch primitives. With no session (while modules load at compile
/// time, or for `patchbook docs`) they exist, so playbooks check and editors complete,
/// but refuse to run; the pure version comparisons work everywhere.
pub fn register_patch(engine: &mut Engine, session: Option<Arc<Session>>) {
    register_patch_types(engine);
    register_versions(engine);
    register_reads(engine, &session);
    register_artifact(engine, &session);
    register_backup(engine, &session);
    register_deploy(engine, &session);
    register_checks(engine, &session);
    register_rollback(engine, &session);
    register_notify(engine, &session);
    register_commands(engine, &session);
    super::files::register_files(engine, &session);
    super::services::register_services(engine, &session);
    super::upgrade::register_upgrade(engine, &session);
    super::advisory::register_advisory(engine, &session);
}

/// `#{ undo, timeout }` of exec/shell, or `#{ timeout }` of probe.
fn command_options(
    ctx: &NativeCallContext,
    host: &str,
    step: &str,
    opts: &Map,
    known: &[&str],
) -> RhaiResult<(Option<UndoStep>, Duration)> {
    let bad = |m: String| fail::<(Option<UndoStep>, Duration)>(ctx, format!("{host}: {step}: {m}"));
    if let Err(e) = no_unknown_keys(opts, known) {
        return bad(e);
    }
    let timeout = match opt_duration(opts, "timeout") {
        Ok(t) => t.unwrap_or(MAX_COMMAND).min(MAX_COMMAND),
        Err(e) => return bad(e),
    };
    let undo = match opts.get("undo") {
        None => None,
        Some(v) if v.is_unit() => None,
        Some(v) if v.is_string() => Some(UndoStep::Command {
            argv: vec!["sh".to_string(), "-c".to_string(), v.to_string()],
        }),
        Some(v) => {
            if let Some(b) = v.clone().try_cast::<ScriptBackup>() {
                if b.0.host != host {
                    return bad(format!(
                        "the undo backup {} was taken from {}, not from this host",
                        b.0.id, b.0.host
                    ));
                }
                Some(UndoStep::Restore {
                    backups: vec![b.0.as_ref_for_undo()],
                })
            } else if let Some(a) = v.clone().try_cast::<Array>() {
                Some(UndoStep::Command {
                    argv: argv_arg(ctx, host, &format!("{step} undo"), a)?,
                })
            } else {
                return bad(format!(
                    "`undo` is an argv (array of strings), a shell line or a backup, got {}",
                    v.type_name()
                ));
            }
        }
    };
    Ok((undo, timeout))
}

fn do_change(
    ctx: &NativeCallContext,
    s: &Session,
    host: &ScriptHost,
    argv: Vec<String>,
    raw_shell: bool,
    opts: &Map,
) -> RhaiResult<Map> {
    let step = if raw_shell { "shell" } else { "exec" };
    let (undo, timeout) = command_options(ctx, host.name(), step, opts, EXEC_OPTION_KEYS)?;
    let change = crate::primitives::exec::Change {
        argv,
        raw_shell,
        undo,
        timeout,
    };
    if raw_shell {
        tracing::warn!(target: "patchbook::script", host = %host.name(), raw_shell = true, script = %change.shown(), "raw shell");
    } else {
        tracing::info!(target: "patchbook::script", host = %host.name(), argv = %change.shown(), "exec");
    }
    let r = on_host(ctx, s, host, step, |hc| {
        crate::primitives::exec::change(hc, &change)
    })?;
    Ok(exec_map(r))
}

fn exec_map(r: crate::primitives::exec::ExecResult) -> Map {
    let mut m = Map::new();
    m.insert("code".into(), (r.code as i64).into());
    m.insert("stdout".into(), r.stdout.into());
    m.insert("stderr".into(), r.stderr.into());
    m.insert("truncated".into(), r.truncated.into());
    m.insert("planned".into(), r.planned.into());
    m
}

fn register_commands(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    let exec_fn = move |ctx: NativeCallContext,
                        host: ScriptHost,
                        argv: Array,
                        opts: Map|
          -> RhaiResult<Map> {
        let s = session(&ctx, &s, "exec")?;
        let argv = argv_arg(&ctx, host.name(), "exec", argv)?;
        do_change(&ctx, s, &host, argv, false, &opts)
    };
    let e2 = exec_fn.clone();
    FuncRegistration::new("exec")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "Map"])
        .with_comments(["/// A change: runs argv on the host, journaled (intent before, exit code and output\n/// digests after); `plan` shows it and runs nothing. Returns\n/// `#{ code, stdout, stderr, truncated, planned }`; a non-zero code is not an error.\n/// With no undo, a rollback of the host says it is not fully reverted. To read only,\n/// use probe(host, argv)."])
        .register_into_engine(engine, move |ctx: NativeCallContext, host: ScriptHost, argv: Array| e2(ctx, host, argv, Map::new()));
    FuncRegistration::new("exec")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "opts: Map", "Map"])
        .with_comments(["/// exec with options: `#{ undo: [argv] | \"shell line\" | backup, timeout: \"30s\" }`;\n/// the undo is recorded before the command runs and reverses it on rollback\n/// (a backup is restored)."])
        .register_into_engine(engine, exec_fn);

    let s = session_.clone();
    let shell_fn = move |ctx: NativeCallContext,
                         host: ScriptHost,
                         script: &str,
                         opts: Map|
          -> RhaiResult<Map> {
        let s = session(&ctx, &s, "shell")?;
        if script.contains('\0') || script.len() > MAX_WORD {
            return fail(
                &ctx,
                format!(
                    "{}: shell: refused: a shell line has no NUL and is at most {MAX_WORD} bytes",
                    host.name()
                ),
            );
        }
        let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        do_change(&ctx, s, &host, argv, true, &opts)
    };
    let s2 = shell_fn.clone();
    FuncRegistration::new("shell")
        .with_volatility(true)
        .with_params_info(["host: Host", "script: &str", "Map"])
        .with_comments(["/// A change: runs a raw shell line as `sh -c`, journaled and marked raw shell. Prefer\n/// exec(host, argv)."])
        .register_into_engine(engine, move |ctx: NativeCallContext, host: ScriptHost, script: &str| s2(ctx, host, script, Map::new()));
    FuncRegistration::new("shell")
        .with_volatility(true)
        .with_params_info(["host: Host", "script: &str", "opts: Map", "Map"])
        .with_comments([
            "/// shell with options: `#{ undo: [argv] | \"shell line\" | backup, timeout: \"30s\" }`.",
        ])
        .register_into_engine(engine, shell_fn);

    let s = session_.clone();
    let probe_fn = move |ctx: NativeCallContext,
                         host: ScriptHost,
                         argv: Array,
                         opts: Map|
          -> RhaiResult<Map> {
        let s = session(&ctx, &s, "probe")?;
        let argv = argv_arg(&ctx, host.name(), "probe", argv)?;
        let (_, timeout) = command_options(&ctx, host.name(), "probe", &opts, PROBE_OPTION_KEYS)?;
        let r = on_host(&ctx, s, &host, "probe", |hc| {
            crate::primitives::exec::probe(hc, &argv, timeout)
        })?;
        Ok(exec_map(r))
    };
    let p2 = probe_fn.clone();
    FuncRegistration::new("probe")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "Map"])
        .with_comments(["/// A probe: runs argv on the host to read something, in `plan` as in `run`, not\n/// journaled; returns `#{ code, stdout, stderr, truncated, planned }`. The command must\n/// change nothing: anything that does is exec()."])
        .register_into_engine(engine, move |ctx: NativeCallContext, host: ScriptHost, argv: Array| p2(ctx, host, argv, Map::new()));
    FuncRegistration::new("probe")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "opts: Map", "Map"])
        .with_comments(["/// probe with options: `#{ timeout: \"30s\" }`."])
        .register_into_engine(engine, probe_fn);
}

fn register_versions(engine: &mut Engine) {
    FuncRegistration::new("version_cmp")
        .with_purity(true)
        .with_params_info(["a: &str", "b: &str", "int"])
        .with_comments(["/// Compares two Debian versions as `dpkg --compare-versions` does (epoch,\n/// upstream, revision; `~` sorts before everything): -1, 0 or 1."])
        .register_into_engine(
            engine,
            |ctx: NativeCallContext, a: &str, b: &str| -> RhaiResult<i64> {
                for v in [a, b] {
                    if let Err(e) = version::check_deb_version(v) {
                        return fail(&ctx, format!("version_cmp: {e}"));
                    }
                }
                Ok(cmp_int(version::dpkg_cmp(a, b)))
            },
        );
    FuncRegistration::new("rpm_version_cmp")
        .with_purity(true)
        .with_params_info(["a: &str", "b: &str", "int"])
        .with_comments(["/// Compares two rpm versions `[epoch:]version[-release]` by rpm's rules\n/// (`rpmvercmp`, `~` and `^` included): -1, 0 or 1."])
        .register_into_engine(
            engine,
            |ctx: NativeCallContext, a: &str, b: &str| -> RhaiResult<i64> {
                for v in [a, b] {
                    if let Err(e) = version::check_rpm_version(v) {
                        return fail(&ctx, format!("rpm_version_cmp: {e}"));
                    }
                }
                Ok(cmp_int(version::rpm_cmp(a, b)))
            },
        );
}

fn register_reads(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    FuncRegistration::new("facts")
        .with_volatility(true)
        .with_params_info(["host: Host", "Map"])
        .with_comments(["/// What the host is: `#{ os_id, os_version, os_like, package_manager, arch, kernel }`;\n/// `package_manager` is \"dpkg\", \"rpm\" or \"unknown\". Gathered once per host per run."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Map> {
                let s = session(&ctx, &s, "facts")?;
                let f = on_host(&ctx, s, &host, "facts", crate::primitives::facts::facts)?;
                Ok(facts_map(&f))
            },
        );

    let s = session_.clone();
    FuncRegistration::new("installed")
        .with_volatility(true)
        .with_params_info(["host: Host", "pkg: &str", "?"])
        .with_comments(["/// The installed version of `pkg` as the package database reports it, or `()`\n/// when the package is absent (or only its configuration remains)."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, pkg: &str| -> RhaiResult<Dynamic> {
                let s = session(&ctx, &s, "installed")?;
                check_package_arg(&ctx, &format!("{}: installed", host.name()), pkg)?;
                let i = on_host(&ctx, s, &host, "installed", |hc| {
                    crate::primitives::packages::installed(hc, pkg)
                })?;
                Ok(opt_string(i.map(|i| i.version)))
            },
        );

    let s = session_.clone();
    FuncRegistration::new("needing")
        .with_volatility(true)
        .with_params_info(["hosts: Array", "pkg: &str", "fixed: &str", "Array"])
        .with_comments(["/// The hosts whose installed `pkg` sorts below `fixed` by their own package\n/// manager's rules; hosts without the package are left out. `fixed` = \"candidate\"\n/// keeps hosts whose repositories offer a newer version than installed. Hosts are asked in\n/// parallel (`--forks`); one that cannot be connected to is left out and reported\n/// unreachable; one whose package manager cannot answer is an error naming it.\n/// Also a method: `hosts(\"web\").needing(\"openssl\", \"3.0.11-1\")`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, hosts: Array, pkg: &str, fixed: &str| -> RhaiResult<Array> {
                let s = session(&ctx, &s, "needing")?;
                let mut targets = Vec::with_capacity(hosts.len());
                for (i, h) in hosts.into_iter().enumerate() {
                    let ty = h.type_name();
                    // An entry of vulnerable(): its host.
                    let h = match h.clone().try_cast::<Map>() {
                        Some(m) => m.get("host").cloned().unwrap_or(h),
                        None => h,
                    };
                    match h.try_cast::<ScriptHost>() {
                        Some(h) => targets.push(h),
                        None => return fail(&ctx, format!("needing: hosts[{i}] is {ty}, not a Host; pass hosts(\"selector\") or what vulnerable() returned")),
                    }
                }
                check_package_arg(&ctx, "needing", pkg)?;
                let candidate = fixed == "candidate";
                if !candidate {
                    check_version_arg(&ctx, "needing", fixed)?;
                }
                let call = call_deadline();
                let answers = crate::rollout::pool::map_bounded(&targets, s.runtime.forks, |h| {
                    with_host(s, &h.0, call, |hc| {
                        if candidate {
                            crate::primitives::upgrade::candidate_newer(hc, pkg)
                        } else {
                            crate::primitives::packages::needs(hc, pkg, fixed)
                        }
                    })
                });
                let mut keep = Array::new();
                let mut errors = Vec::new();
                for (h, a) in targets.into_iter().zip(answers) {
                    match a {
                        Ok(true) => keep.push(Dynamic::from(h)),
                        Ok(false) => {}
                        // A dead host is reported apart and the rest go on; the
                        // rollout counts it against `max_unreachable`.
                        Err(e) if e.is_unreachable() => {
                            s.note_unreachable(h.name(), "needing", &host_message(h.name(), "needing", &e));
                        }
                        Err(e) => errors.push(host_message(h.name(), "needing", &e)),
                    }
                }
                if !errors.is_empty() {
                    return fail(
                        &ctx,
                        format!(
                            "needing({pkg}, {fixed}): {} host(s) could not be asked, so the target list would be incomplete:\n{}",
                            errors.len(),
                            errors.join("\n")
                        ),
                    );
                }
                Ok(keep)
            },
        );

    let s = session_.clone();
    FuncRegistration::new("service_active")
        .with_volatility(true)
        .with_params_info(["host: Host", "name: &str", "bool"])
        .with_comments(["/// Whether the systemd unit `name` is active (`systemctl is-active`). A host\n/// without systemctl is an error, never `false`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, name: &str| -> RhaiResult<bool> {
                let s = session(&ctx, &s, "service_active")?;
                if let Some(p) = unit_problem(name) {
                    return fail(&ctx, refused(&format!("{}: service_active", host.name()), "unit name", name, p));
                }
                on_host(&ctx, s, &host, "service_active", |hc| {
                    crate::primitives::health::service_active(hc, name)
                })
            },
        );

    let s = session_.clone();
    FuncRegistration::new("secret")
        .with_volatility(true)
        .with_params_info(["value: &str", "String"])
        .with_comments(["/// Marks `value` as secret and returns it: from now on the journal, logs and\n/// notifications show `***` in its place."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, value: &str| -> RhaiResult<String> {
                let s = session(&ctx, &s, "secret")?;
                s.add_secret(value);
                Ok(value.to_string())
            },
        );
}

fn artifact_spec(url: &str, opts: &Map) -> Result<ArtifactSpec, String> {
    no_unknown_keys(opts, ARTIFACT_OPTION_KEYS)?;
    let sha256 = opt_str(opts, "sha256")?
        .ok_or_else(|| "`sha256` is required: #{ sha256: \"<64 hex digits>\" }".to_string())?;
    let size = match opt_int(opts, "size")? {
        None => None,
        Some(n) => Some(u64::try_from(n).map_err(|_| "`size` must not be negative".to_string())?),
    };
    Ok(ArtifactSpec {
        url: url.to_string(),
        sha256,
        size,
        signature: opt_str(opts, "signature")?,
    })
}

fn register_artifact(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    FuncRegistration::new("artifact")
        .with_volatility(true)
        .with_params_info(["url: &str", "spec: Map", "Artifact"])
        .with_comments(["/// Fetches a patch file on the controller from a `trusted_sources` entry into the\n/// content-addressed cache, checking `#{ sha256, size?, signature? }` as it streams\n/// (retrying a mismatch, then failing). Every check is journaled. Call it at the top\n/// of a playbook so a bad artifact stops the run before any host is touched."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, url: &str, opts: Map| -> RhaiResult<ScriptArtifact> {
                let s = session(&ctx, &s, "artifact")?;
                let spec = match artifact_spec(url, &opts) {
                    Ok(spec) => spec,
                    Err(e) => return fail(&ctx, format!("artifact {url}: {e}")),
                };
                let mut checks = Vec::new();
                let result = fetch_recorded(&spec, &s.artifacts, &mut checks);
                if let Some(j) = &s.run.journal {
                    for c in &checks {
                        // A check on the controller: durable with the first intent.
                        if let Err(e) = j.note_entry(None, &c.entry(url, &spec.sha256)) {
                            return fail(&ctx, format!("artifact {url}: cannot write the journal, so the artifact is not used: {e}"));
                        }
                    }
                }
                match result {
                    Ok(a) => Ok(ScriptArtifact(Arc::new(a))),
                    Err(e) => fail(&ctx, e.to_string()),
                }
            },
        );
}

fn register_backup(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    FuncRegistration::new("backup")
        .with_volatility(true)
        .with_params_info(["host: Host", "paths: Array", "Backup"])
        .with_comments(["/// Streams a tar of the absolute `paths` from the host into the controller's backup\n/// store, writes its manifest, re-reads and checks it, and journals it; a later\n/// deploy's undo step restores it. Missing paths are listed in `.missing`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, paths: Array| -> RhaiResult<ScriptBackup> {
                let s = session(&ctx, &s, "backup")?;
                let paths = strings(&ctx, host.name(), "backup", "paths", paths)?;
                for p in &paths {
                    if let Some(why) = path_problem(p) {
                        return fail(&ctx, refused(&format!("{}: backup", host.name()), "path", p, why));
                    }
                }
                let h = on_host(&ctx, s, &host, "backup", |hc| {
                    crate::primitives::backup::backup(hc, &paths)
                })?;
                Ok(ScriptBackup(Arc::new(h)))
            },
        );

    let s = session_.clone();
    FuncRegistration::new("restore")
        .with_volatility(true)
        .with_params_info(["host: Host", "backup: Backup", "()"])
        .with_comments(["/// Puts a backup back on its host. Every archive entry is checked on the controller\n/// first: no `..`, no absolute names, no links leaving the root."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, backup: ScriptBackup| -> RhaiResult<()> {
                let s = session(&ctx, &s, "restore")?;
                if backup.0.host != host.name() {
                    return fail(&ctx, format!("{}: restore: backup {} was taken from {}, not from this host", host.name(), backup.0.id, backup.0.host));
                }
                if planning(s) {
                    return on_host(&ctx, s, &host, "restore", |hc| {
                        hc.plan("restore", format!("restore {} ({})", backup.0.id, backup.0.paths.join(", ")), "unknown");
                        Ok(())
                    });
                }
                on_host(&ctx, s, &host, "restore", |hc| {
                    crate::primitives::backup::restore(hc, &backup.0.as_ref_for_undo())
                })
            },
        );
}

fn deploy_options(ctx: &NativeCallContext, host: &str, opts: &Map) -> RhaiResult<DeployOptions> {
    let bad = |m: String| fail::<DeployOptions>(ctx, format!("{host}: deploy: {m}"));
    if let Err(e) = no_unknown_keys(opts, DEPLOY_OPTION_KEYS) {
        return bad(e);
    }
    let mut o = DeployOptions::default();
    if let Some(m) = opts.get("method").filter(|m| !m.is_unit()) {
        o.method = if m.is_array() {
            let argv = argv_arg(
                ctx,
                host,
                "deploy",
                m.clone().into_array().unwrap_or_default(),
            )?;
            if !argv.iter().any(|w| w == "{file}") {
                return bad("a custom method argv must contain the word \"{file}\", replaced by the staged package file".into());
            }
            Method::Custom(argv)
        } else {
            match m.clone().into_immutable_string().as_deref() {
                Ok("dpkg") => Method::Dpkg,
                Ok("apt") => Method::Apt,
                Ok("rpm") => Method::Rpm,
                Ok("dnf") => Method::Dnf,
                Ok("auto") => Method::Auto,
                Ok(other) => {
                    return bad(format!(
                        "refused method {:?}: use \"dpkg\", \"apt\", \"rpm\", \"dnf\" or an argv array with \"{{file}}\"",
                        cut(other, 80)
                    ))
                }
                Err(ty) => return bad(format!("`method` must be a string or an argv array, got {ty}")),
            }
        };
    }
    if let Some(a) = opts.get("rollback_to").filter(|a| !a.is_unit()) {
        let ty = a.type_name();
        match a.clone().try_cast::<ScriptArtifact>() {
            Some(a) => o.rollback_to = Some((*a.0).clone()),
            None => {
                return bad(format!(
                    "`rollback_to` must be an Artifact from artifact(…), got {ty}"
                ))
            }
        }
    }
    match opt_duration(opts, "timeout") {
        Ok(Some(d)) => o.timeout = d,
        Ok(None) => {}
        Err(e) => return bad(e),
    }
    Ok(o)
}

fn do_deploy(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    artifact: ScriptArtifact,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "deploy")?;
    let o = deploy_options(ctx, host.name(), &opts)?;
    let d = on_host(ctx, s, &host, "deploy", |hc| {
        crate::primitives::deploy::deploy(hc, &artifact.0, &o)
    })?;
    let mut m = Map::new();
    if planning(s) {
        m.insert("planned".into(), true.into());
        m.insert("result".into(), "unknown".into());
        m.insert("pkg".into(), Dynamic::UNIT);
        m.insert("before".into(), Dynamic::UNIT);
        m.insert("after".into(), Dynamic::UNIT);
        m.insert("undo".into(), Dynamic::UNIT);
        return Ok(m);
    }
    m.insert("planned".into(), false.into());
    m.insert("pkg".into(), d.package.into());
    m.insert("before".into(), opt_string(d.before));
    m.insert("after".into(), opt_string(d.after));
    m.insert(
        "undo".into(),
        crate::primitives::undo::describe(&d.undo).into(),
    );
    Ok(m)
}

fn register_deploy(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    const DOC: &str = "/// Uploads the artifact to a fresh private folder on the host, re-hashes it there and\n/// installs it in the same command (`dpkg -i` or `rpm -U` by default). The intent, the\n/// versions before and after, and the undo step (reinstall `rollback_to`, else restore\n/// this run's backups, else remove a new package, else manual) go to the journal.\n/// Returns `#{ pkg, before, after, undo, planned }` (`package` is a reserved word in
/// Rhai); in a plan\n/// `#{ planned: true, result: \"unknown\" }`.";
    let s = session_.clone();
    FuncRegistration::new("deploy")
        .with_volatility(true)
        .with_params_info(["host: Host", "artifact: Artifact", "Map"])
        .with_comments([DOC])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  artifact: ScriptArtifact|
                  -> RhaiResult<Map> {
                do_deploy(&ctx, &s, host, artifact, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("deploy")
        .with_volatility(true)
        .with_params_info(["host: Host", "artifact: Artifact", "options: Map", "Map"])
        .with_comments([&format!("{DOC}\n/// Options: `method` (\"dpkg\", \"apt\", \"rpm\", \"dnf\", or an argv array with the word\n/// \"{{file}}\"), `rollback_to` (an Artifact), `timeout` (e.g. \"15m\").")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, artifact: ScriptArtifact, opts: Map| -> RhaiResult<Map> {
                do_deploy(&ctx, &s, host, artifact, opts)
            },
        );

    let s = session_.clone();
    FuncRegistration::new("verify")
        .with_volatility(true)
        .with_params_info(["host: Host", "pkg: &str", "version: &str", "String"])
        .with_comments(["/// Asks the package database (`dpkg-query` / `rpm -q`) directly, never trusting a\n/// deploy's exit code: `pkg` must be fully installed at exactly `version`. Returns the\n/// version found; fails with both versions in the message."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, pkg: &str, v: &str| -> RhaiResult<String> {
                let s = session(&ctx, &s, "verify")?;
                check_package_arg(&ctx, &format!("{}: verify", host.name()), pkg)?;
                check_version_arg(&ctx, &format!("{}: verify", host.name()), v)?;
                on_host(&ctx, s, &host, "verify", |hc| {
                    crate::primitives::packages::verify(hc, pkg, v)
                })
            },
        );
}

fn health_check(ctx: &NativeCallContext, host: &str, opts: &Map) -> RhaiResult<HealthCheck> {
    let bad = |m: String| fail::<HealthCheck>(ctx, format!("{host}: health: {m}"));
    if let Err(e) = no_unknown_keys(opts, HEALTH_OPTION_KEYS) {
        return bad(e);
    }
    let mut c = HealthCheck::default();
    let parsed = (|| -> Result<(), String> {
        if let Some(n) = opt_int(opts, "expect_code")? {
            c.expect_code =
                i32::try_from(n).map_err(|_| "`expect_code` is out of range".to_string())?;
        }
        c.expect_stdout = opt_str(opts, "expect_stdout")?;
        if let Some(n) = opt_int(opts, "retries")? {
            c.retries = u32::try_from(n).map_err(|_| "`retries` must be 0 or more".to_string())?;
        }
        if let Some(d) = opt_duration(opts, "delay")? {
            c.delay = d;
        }
        if let Some(d) = opt_duration(opts, "timeout")? {
            c.timeout = d;
        }
        Ok(())
    })();
    match parsed {
        Ok(()) => Ok(c),
        Err(e) => bad(e),
    }
}

fn do_health(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    argv: Array,
    opts: Map,
) -> RhaiResult<String> {
    let s = session(ctx, s, "health")?;
    let argv = argv_arg(ctx, host.name(), "health", argv)?;
    let check = health_check(ctx, host.name(), &opts)?;
    on_host(ctx, s, &host, "health", |hc| {
        crate::primitives::health::health(hc, &argv, &check)
    })
}

fn http_options(ctx: &NativeCallContext, url: &str, opts: &Map) -> RhaiResult<HttpCheck> {
    let mut c = HttpCheck::default();
    let parsed = (|| -> Result<(), String> {
        no_unknown_keys(opts, HTTP_CHECK_OPTION_KEYS)?;
        if let Some(n) = opt_int(opts, "status")? {
            c.status =
                u16::try_from(n).map_err(|_| "`status` must be an HTTP status code".to_string())?;
        }
        c.contains = opt_str(opts, "contains")?;
        if let Some(d) = opt_duration(opts, "timeout")? {
            c.timeout = d;
        }
        Ok(())
    })();
    match parsed {
        Ok(()) => Ok(c),
        Err(e) => fail(ctx, format!("http_check {url}: {e}")),
    }
}

fn do_http_check(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    url: &str,
    opts: Map,
) -> RhaiResult<i64> {
    let s = session(ctx, s, "http_check")?;
    let check = http_options(ctx, url, &opts)?;
    let rt = &s.runtime;
    let targets = crate::primitives::health::HttpTargets {
        hosts: rt
            .inventory
            .hosts()
            .iter()
            .flat_map(|h| [h.name.clone(), h.address.clone()])
            .collect(),
        allow: rt.config.http_check_allow.clone(),
    };
    let r = crate::primitives::health::http_check(url, &check, &targets);
    if let Some(j) = &s.run.journal {
        let entry = Entry::HttpCheck(HttpCheckRecord {
            url: url.to_string(),
            ok: r.is_ok(),
            error: r.as_ref().err().map(|e| e.to_string()),
        });
        if let Err(e) = j.append_entry(None, &entry) {
            return fail(
                ctx,
                format!("http_check {url}: cannot write the journal: {e}"),
            );
        }
    }
    match r {
        Ok(status) => Ok(status as i64),
        Err(e) => fail(ctx, e.to_string()),
    }
}

fn register_checks(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    const HEALTH: &str = "/// Runs argv (an array of strings, never a shell line) on the host until it exits\n/// with the expected code; returns its stdout. Fails with what the host printed.";
    let s = session_.clone();
    FuncRegistration::new("health")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "String"])
        .with_comments([HEALTH])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, argv: Array| -> RhaiResult<String> {
                do_health(&ctx, &s, host, argv, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("health")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "options: Map", "String"])
        .with_comments([&format!("{HEALTH}\n/// Options: `expect_code` (default 0), `expect_stdout` (a substring), `retries`\n/// (extra attempts, default 0), `delay` between attempts (\"2s\" or seconds, default 1s),\n/// `timeout` per attempt (default 60s).")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, argv: Array, opts: Map| -> RhaiResult<String> {
                do_health(&ctx, &s, host, argv, opts)
            },
        );

    const HTTP: &str = "/// Fetches `url` from the controller (not from a host) and checks the status\n/// (default 200); returns the status code. Journaled.";
    let s = session_.clone();
    FuncRegistration::new("http_check")
        .with_volatility(true)
        .with_params_info(["url: &str", "int"])
        .with_comments([HTTP])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, url: &str| -> RhaiResult<i64> {
                do_http_check(&ctx, &s, url, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("http_check")
        .with_volatility(true)
        .with_params_info(["url: &str", "options: Map", "int"])
        .with_comments([&format!("{HTTP}\n/// Options: `status` (expected code), `contains` (a substring of the body),\n/// `timeout` (\"10s\" or seconds).")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, url: &str, opts: Map| -> RhaiResult<i64> {
                do_http_check(&ctx, &s, url, opts)
            },
        );
}

fn register_rollback(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    FuncRegistration::new("rollback")
        .with_volatility(true)
        .with_params_info(["host: Host", "Map"])
        .with_comments(["/// Runs the host's undo steps for this run from the journal, newest first, verifying\n/// each. Returns `#{ undone: [descriptions], manual: [reasons] }`. A second call finds\n/// nothing left to undo."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Map> {
                let s = session(&ctx, &s, "rollback")?;
                let r = on_host(&ctx, s, &host, "rollback", crate::primitives::undo::rollback)?;
                let list = |v: Vec<String>| Dynamic::from_array(v.into_iter().map(Dynamic::from).collect());
                let mut m = Map::new();
                m.insert("undone".into(), list(r.undone));
                m.insert("manual".into(), list(r.manual));
                Ok(m)
            },
        );
}

fn recipients(ctx: &NativeCallContext, to: Dynamic) -> RhaiResult<Vec<String>> {
    if to.is_string() {
        return Ok(vec![to.to_string()]);
    }
    let ty = to.type_name();
    match to.into_array() {
        Ok(a) => strings(ctx, crate::primitives::context::CONTROLLER, "notify", "to", a),
        Err(_) => fail(ctx, format!("notify: `to` must be a channel or contact name, an e-mail address, or an array of them, got {ty}")),
    }
}

fn do_notify(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    to: Dynamic,
    message: &str,
    opts: Map,
) -> RhaiResult<Array> {
    let s = session(ctx, s, "notify")?;
    let to = recipients(ctx, to)?;
    if let Err(e) = no_unknown_keys(&opts, NOTIFY_OPTION_KEYS) {
        return fail(ctx, format!("notify: {e}"));
    }
    let severity = match opt_str(&opts, "severity") {
        Ok(None) => Severity::default(),
        Ok(Some(v)) => match v.parse::<Severity>() {
            Ok(sev) => sev,
            Err(e) => return fail(ctx, format!("notify: {e}")),
        },
        Err(e) => return fail(ctx, format!("notify: {e}")),
    };
    if planning(s) {
        plan_on_controller(
            s,
            "notify",
            format!(
                "to {}: {}",
                to.join(", "),
                message.lines().next().unwrap_or("")
            ),
        );
        return Ok(Array::new());
    }
    let secrets = s.secrets();
    let deliveries = crate::primitives::notify::notify(
        &s.runtime.config.notify,
        &to,
        message,
        severity,
        &secrets,
    );
    let mut out = Array::with_capacity(deliveries.len());
    for d in deliveries {
        if let Some(j) = &s.run.journal {
            if let Err(e) = j.append_entry(None, &Entry::Notify(d.clone().into())) {
                return fail(ctx, format!("notify: cannot write the journal: {e}"));
            }
        }
        if !d.ok {
            tracing::warn!(target: "patchbook::script", to = %d.to, channel = %d.channel, error = ?d.error, "notification not delivered");
        }
        let mut m = Map::new();
        m.insert("channel".into(), d.channel.into());
        m.insert("to".into(), d.to.into());
        m.insert("ok".into(), d.ok.into());
        m.insert("attempts".into(), (d.attempts as i64).into());
        m.insert("error".into(), opt_string(d.error));
        out.push(m.into());
    }
    Ok(out)
}

fn register_notify(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    const DOC: &str = "/// Tells people: `to` is a channel name, contact, e-mail address, or an array of them\n/// (see `[notify]` in patchbook.toml). Secrets show as `***`. A channel that fails\n/// never fails the script; returns one `#{ channel, to, ok, attempts, error }` per\n/// addressee, each also journaled.";
    let s = session_.clone();
    FuncRegistration::new("notify")
        .with_volatility(true)
        .with_params_info(["to: ?", "message: &str", "Array"])
        .with_comments([DOC])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, to: Dynamic, message: &str| -> RhaiResult<Array> {
                do_notify(&ctx, &s, to, message, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("notify")
        .with_volatility(true)
        .with_params_info(["to: ?", "message: &str", "options: Map", "Array"])
        .with_comments([&format!(
            "{DOC}\n/// Options: `severity` (\"info\", \"warning\" or \"critical\")."
        )])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  to: Dynamic,
                  message: &str,
                  opts: Map|
                  -> RhaiResult<Array> { do_notify(&ctx, &s, to, message, opts) },
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_rules() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(argv_problem(&w(&["/opt/acme/agent", "--check"])).is_none());
        assert!(argv_problem(&w(&["echo", "; rm -rf / $(x) `y`\n"])).is_none());
        assert!(argv_problem(&[]).unwrap().contains("empty"));
        assert!(argv_problem(&w(&["sh;id"])).unwrap().contains("plain path"));
        assert!(argv_problem(&w(&["-x"])).unwrap().contains("plain path"));
        assert!(argv_problem(&w(&["echo", "a\0b"])).unwrap().contains("NUL"));
        assert!(
            argv_problem(&["echo".to_string(), "x".repeat(MAX_WORD + 1)])
                .unwrap()
                .contains("bytes")
        );
    }

    #[test]
    fn path_and_unit_rules() {
        assert!(path_problem("/etc/acme").is_none());
        assert!(path_problem("/etc/My App").is_none());
        for bad in [
            "etc",
            "/x;y",
            "/$(id)",
            "/`id`",
            "/a\nb",
            "/a\0b",
            "-x",
            "/tmp/--x=y",
        ] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
        assert!(unit_problem("nginx.service").is_none());
        assert!(unit_problem("getty@tty1.service").is_none());
        for bad in ["", "-x", "a;b", "a b", "$(id)", "a\nb"] {
            assert!(unit_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn host_messages_name_host_and_step() {
        let e = PrimitiveError::step("web1", "deploy", "boom");
        assert_eq!(host_message("web1", "deploy", &e), "web1: deploy: boom");
        let e = PrimitiveError::Refused {
            step: "installed".into(),
            what: "package name".into(),
            value: "x".into(),
            reason: "bad".into(),
        };
        assert!(host_message("web1", "installed", &e).starts_with("web1: installed: refused"));
        let e = PrimitiveError::Io {
            context: "read".into(),
            source: std::io::Error::other("x"),
        };
        assert!(host_message("web1", "backup", &e).starts_with("web1: backup: read"));
    }
}
