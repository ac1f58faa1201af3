//! Registration of `hosts`, `log` and the `Host` type on an engine; the commands
//! (`exec`, `shell`, `probe`) and the patch primitives are in [`super::patch`].
//!
//! Each registered function is a thin adapter: check the Rhai arguments, call the
//! typed primitive, turn its result into Rhai values. Everything that touches the
//! world goes through the [`Runtime`] and is registered volatile, so no optimiser
//! pass can run it at compile time. Nothing here talks to a transport directly.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, EvalAltResult, FuncRegistration, Map, NativeCallContext};

use crate::inventory::Host;
use crate::journal::{Entry, LogRecord};
use crate::run::Session;
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

/// Keys of the options map of `exec` and `shell` (`#{ undo, timeout }`).
pub const EXEC_OPTION_KEYS: &[&str] = &["undo", "timeout"];
/// Keys of the options map of `hosts` (`#{ allow_empty }`).
pub const HOSTS_OPTION_KEYS: &[&str] = &["allow_empty"];
/// Keys of the options map of `probe` (`#{ timeout }`).
pub const PROBE_OPTION_KEYS: &[&str] = &["timeout"];

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

/// Registers `hosts` and `log`. With no runtime (while modules load at compile
/// time) `hosts` exists but refuses to run; `log` journals when a session has a
/// journal (`run`, not `plan`).
pub fn register_primitives(
    engine: &mut Engine,
    rt: Option<Arc<Runtime>>,
    session: Option<Arc<Session>>,
) {
    register_host_type(engine);

    let r = rt;
    let hosts_fn = move |ctx: NativeCallContext, selector: &str, opts: Map| -> RhaiResult<Array> {
        let rt = runtime(&ctx, &r, "hosts")?;
        if let Err(e) = super::patch::no_unknown_keys(&opts, HOSTS_OPTION_KEYS) {
            return fail(&ctx, format!("hosts: {e}"));
        }
        let allow_empty = match opts.get("allow_empty").map(|v| v.as_bool()) {
            None => false,
            Some(Ok(b)) => b,
            Some(Err(t)) => {
                return fail(
                    &ctx,
                    format!("hosts: `allow_empty` is true or false, not {t}"),
                )
            }
        };
        match rt.targets_with(selector, allow_empty) {
            Ok(hosts) => Ok(hosts
                .into_iter()
                .map(|h| Dynamic::from(ScriptHost::new(h)))
                .collect()),
            Err(e @ crate::inventory::InventoryError::NoMatch { what: "selector", .. }) => fail(
                &ctx,
                format!(
                    "{e}. When no host is fine here, say so: hosts({selector:?}, #{{ allow_empty: true }})"
                ),
            ),
            Err(e) => fail(&ctx, e.to_string()),
        }
    };
    let h2 = hosts_fn.clone();
    FuncRegistration::new("hosts")
        .with_volatility(true)
        .with_params_info(["selector: &str", "Array"])
        .with_comments(["/// Hosts matching an Ansible-style selector (`web:&prod`, `web*`, `~re`),\n/// narrowed by `--limit`, in inventory order. Matching no host is an error\n/// naming the nearest group and host names."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, selector: &str| h2(ctx, selector, Map::new()),
        );
    FuncRegistration::new("hosts")
        .with_volatility(true)
        .with_params_info(["selector: &str", "opts: Map", "Array"])
        .with_comments(["/// Hosts matching a selector, with options: `#{ allow_empty: true }` returns an\n/// empty array when nothing matches instead of stopping the playbook."])
        .register_into_engine(engine, hosts_fn);

    FuncRegistration::new("log")
        .with_volatility(true)
        .with_params_info(["message", "()"])
        .with_comments(["/// Shows `message` on the terminal (hidden by `-q`) and records it in the run's\n/// journal, with the current host and the playbook line that logged it."])
        .register_into_engine(engine, move |ctx: NativeCallContext, message: Dynamic| {
            let host = current_host(&ctx);
            let pos = ctx.call_position();
            let source = ctx.call_source().unwrap_or("").to_string();
            let line = pos.line().unwrap_or(0);
            let text = message.to_string();
            // The `patchbook::log` target is shown at the default level (see main.rs): a
            // playbook's own messages are part of what the operator asked to see.
            tracing::info!(
                target: "patchbook::log",
                host = host.as_deref(),
                source = %source,
                line = line,
                "{text}"
            );
            if let Some(journal) = session.as_ref().and_then(|s| s.run.journal.as_ref()) {
                let entry = Entry::Log(LogRecord {
                    message: text,
                    source,
                    line,
                });
                if let Err(e) = journal.note_entry(host.as_deref(), &entry) {
                    return fail(&ctx, format!("log: cannot record the message: {e}"));
                }
            }
            Ok(())
        });
}
