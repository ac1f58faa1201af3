//! Registration of primitives and the `Host` type on an engine.
//!
//! Each registered function is a thin adapter: check the Rhai arguments, call the
//! typed primitive, turn its result into Rhai values. Everything that touches the
//! world goes through the [`Runtime`] and is registered volatile, so no optimiser
//! pass can run it at compile time. Nothing here talks to a transport directly.

pub const EXEC_OPTION_KEYS: &[&str] = &["undo", "timeout"];
pub const PROBE_OPTION_KEYS: &[&str] = &["timeout"];

use std::sync::Arc;
use std::time::Duration;

use rhai::{Array, Dynamic, Engine, EvalAltResult, FuncRegistration, Map, NativeCallContext};

use crate::inventory::Host;
use crate::runtime::Runtime;

/// A host as scripts see it: read-only, cheap to clone.
#[derive(Debug, Clone)]
pub struct ScriptHost(pub Arc<Host>);

impl ScriptHost {
    pub fn new(host: Host) -> Self {
        ScriptHost(Arc::new(host))
    }
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

/// The longest a single command may run when no call deadline is tighter.
const MAX_COMMAND: Duration = Duration::from_secs(600);

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(ctx: &NativeCallContext, message: impl Into<String>) -> RhaiResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        ctx.call_position(),
    )))
}

/// The host a call is about, from the call's tag (see [`crate::script::HostClosure`]
/// and [`crate::script::ScriptRun::for_host`]).
pub fn current_host(ctx: &NativeCallContext) -> Option<String> {
    ctx.tag()
        .and_then(|t| t.clone().try_cast::<ScriptHost>())
        .map(|h| h.0.name.clone())
}

fn runtime<'a>(
    ctx: &NativeCallContext,
    rt: &'a Option<Arc<Runtime>>,
    what: &str,
) -> RhaiResult<&'a Arc<Runtime>> {
    match rt {
        Some(rt) => Ok(rt),
        None => fail(
            ctx,
            format!(
                "{what}() cannot run while modules are being compiled; call it from inside a function or from the playbook"
            ),
        ),
    }
}

fn vars_map(host: &Host) -> Map {
    host.vars
        .iter()
        .map(|(k, v)| {
            let value = if host.secret_vars.contains(k) {
                Dynamic::from("***")
            } else {
                rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
            };
            (k.as_str().into(), value)
        })
        .collect()
}

fn strings(items: &[String]) -> Array {
    items.iter().map(|s| Dynamic::from(s.clone())).collect()
}

/// Registers `Host` with its getters.
pub fn register_host_type(engine: &mut Engine) {
    engine
        .register_type_with_name::<ScriptHost>("Host")
        .register_get("name", |h: &mut ScriptHost| h.0.name.clone())
        .register_get("address", |h: &mut ScriptHost| h.0.address.clone())
        .register_get("port", |h: &mut ScriptHost| h.0.port as i64)
        .register_get("user", |h: &mut ScriptHost| match &h.0.user {
            Some(u) => Dynamic::from(u.clone()),
            None => Dynamic::UNIT,
        })
        .register_get("groups", |h: &mut ScriptHost| strings(&h.0.groups))
        .register_get("vars", |h: &mut ScriptHost| vars_map(&h.0))
        .register_get("criticality", |h: &mut ScriptHost| {
            h.0.criticality.as_str().to_string()
        })
        .register_get("owners", |h: &mut ScriptHost| strings(&h.0.owners))
        .register_fn("to_string", |h: &mut ScriptHost| {
            format!("Host({})", h.0.name)
        })
        .register_fn("to_debug", |h: &mut ScriptHost| {
            format!("Host({})", h.0.name)
        })
        .register_fn("==", |a: ScriptHost, b: ScriptHost| a.0.name == b.0.name)
        .register_fn("!=", |a: ScriptHost, b: ScriptHost| a.0.name != b.0.name);
}

fn exec_map(r: crate::primitives::exec::ExecResult) -> Map {
    let mut m = Map::new();
    m.insert("code".into(), (r.code as i64).into());
    m.insert("stdout".into(), r.stdout.into());
    m.insert("stderr".into(), r.stderr.into());
    m.insert("truncated".into(), r.truncated.into());
    m
}

fn command_timeout() -> Duration {
    super::engine::remaining()
        .map(|r| r.min(MAX_COMMAND))
        .unwrap_or(MAX_COMMAND)
}

fn run_argv(
    ctx: &NativeCallContext,
    rt: &Runtime,
    host: &ScriptHost,
    argv: &[String],
) -> RhaiResult<Map> {
    let t = match rt.transport(&host.0) {
        Ok(t) => t,
        Err(e) => return fail(ctx, e.to_string()),
    };
    match crate::primitives::exec::exec(&*t, argv, command_timeout()) {
        Ok(r) => Ok(exec_map(r)),
        Err(e) => {
            if matches!(e, crate::primitives::PrimitiveError::Transport { .. }) {
                // A dead session must not be reused by the host's next step.
                rt.forget(host.name());
            }
            fail(ctx, e.to_string())
        }
    }
}

/// Registers `hosts`, `exec`, `shell` and `log`. With no runtime (while modules
/// load at compile time) they exist but refuse to run.
pub fn register_primitives(engine: &mut Engine, rt: Option<Arc<Runtime>>) {
    register_host_type(engine);

    let r = rt.clone();
    FuncRegistration::new("hosts")
        .with_volatility(true)
        .with_params_info(["selector: &str", "Array"])
        .with_comments(["/// Hosts matching an Ansible-style selector (`web:&prod`, `web*`, `~re`),\n/// narrowed by `--limit`, in inventory order."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, selector: &str| -> RhaiResult<Array> {
                let rt = runtime(&ctx, &r, "hosts")?;
                match rt.targets(selector) {
                    Ok(hosts) => Ok(hosts
                        .into_iter()
                        .map(|h| Dynamic::from(ScriptHost::new(h)))
                        .collect()),
                    Err(e) => fail(&ctx, e.to_string()),
                }
            },
        );

    let r = rt.clone();
    FuncRegistration::new("exec")
        .with_volatility(true)
        .with_params_info(["host: Host", "argv: Array", "Map"])
        .with_comments(["/// Runs argv (an array of strings) on the host; returns\n/// `#{ code, stdout, stderr, truncated }`. A non-zero code is not an error."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, argv: Array| -> RhaiResult<Map> {
                let rt = runtime(&ctx, &r, "exec")?;
                let mut words = Vec::with_capacity(argv.len());
                for (i, w) in argv.into_iter().enumerate() {
                    match w.into_immutable_string() {
                        Ok(s) => words.push(s.to_string()),
                        Err(ty) => {
                            return fail(
                                &ctx,
                                format!(
                                    "exec: argv[{i}] is {ty}, not a string; argv is an array of strings, and a raw shell line is shell(host, \"…\")"
                                ),
                            )
                        }
                    }
                }
                tracing::info!(target: "patchbook::script", host = %host.name(), argv = ?words, "exec");
                run_argv(&ctx, rt, &host, &words)
            },
        );

    let r = rt.clone();
    FuncRegistration::new("shell")
        .with_volatility(true)
        .with_params_info(["host: Host", "script: &str", "Map"])
        .with_comments(["/// Runs a raw shell line as `sh -c`; logged as raw shell. Prefer exec(host, argv)."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, script: &str| -> RhaiResult<Map> {
                let rt = runtime(&ctx, &r, "shell")?;
                tracing::warn!(target: "patchbook::script", host = %host.name(), raw_shell = true, script, "raw shell");
                let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
                run_argv(&ctx, rt, &host, &argv)
            },
        );

    FuncRegistration::new("log")
        .with_volatility(true)
        .with_params_info(["message", "()"])
        .with_comments(["/// Emits a structured log event carrying the current host."])
        .register_into_engine(engine, |ctx: NativeCallContext, message: Dynamic| {
            let host = current_host(&ctx).unwrap_or_default();
            let pos = ctx.call_position();
            tracing::info!(
                target: "patchbook::script",
                host = %host,
                source = ctx.call_source().unwrap_or(""),
                line = pos.line().unwrap_or(0),
                "{message}"
            );
        });
}
