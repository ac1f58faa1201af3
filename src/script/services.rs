//! Registration of the service and reboot primitives: `service`, `reboot`,
//! `needs_reboot` and `services_needing_restart`.
//!
//! Each function checks its Rhai arguments (unit names, option keys, the `ready`
//! argv) before any command runs, and hands a typed request to
//! [`crate::primitives::services`]. For `reboot` it also hands over the one thing a
//! primitive cannot do itself: dropping the host's cached session and connecting
//! again. It must not talk to a transport or the journal except through the
//! session, nor decide policy.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FuncRegistration, Map, NativeCallContext};

use super::patch::{
    argv_arg, fail, no_unknown_keys, on_host, opt_duration, opt_str, refused, session,
    unit_problem, RhaiResult,
};
use super::register::ScriptHost;
use crate::primitives::services::{
    RebootOptions, ServiceRequest, UnitStatus, Wanted, DEFAULT_SETTLE,
};
use crate::run::Session;

/// Keys of `service(host, unit, #{ … })`; `patchbook check` reads the same list.
pub const SERVICE_OPTION_KEYS: &[&str] = &["state", "enabled", "timeout"];
/// Keys of `reboot(host, #{ … })`.
pub const REBOOT_OPTION_KEYS: &[&str] = &["timeout", "ready"];

fn service_request(unit: &str, opts: &Map) -> Result<ServiceRequest, String> {
    no_unknown_keys(opts, SERVICE_OPTION_KEYS)?;
    let state = match opt_str(opts, "state")? {
        None => None,
        Some(s) => Some(s.parse::<Wanted>()?),
    };
    let enabled = match opts.get("enabled") {
        None => None,
        Some(v) if v.is_unit() => None,
        Some(v) => Some(
            v.as_bool()
                .map_err(|ty| format!("`enabled` must be true or false, got {ty}"))?,
        ),
    };
    Ok(ServiceRequest {
        unit: unit.to_string(),
        state,
        enabled,
        timeout: opt_duration(opts, "timeout")?.unwrap_or(DEFAULT_SETTLE),
    })
}

fn status_into(m: &mut Map, s: Option<&UnitStatus>) {
    m.insert(
        "active".into(),
        s.map(|s| Dynamic::from(s.active)).unwrap_or(Dynamic::UNIT),
    );
    m.insert(
        "enabled".into(),
        s.and_then(|s| s.enabled)
            .map(Dynamic::from)
            .unwrap_or(Dynamic::UNIT),
    );
}

fn do_service(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    unit: &str,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "service")?;
    let where_ = format!("{}: service", host.name());
    if let Some(p) = unit_problem(unit) {
        return fail(ctx, refused(&where_, "unit name", unit, p));
    }
    let req = match service_request(unit, &opts) {
        Ok(r) => r,
        Err(e) => return fail(ctx, format!("{where_} {unit}: {e}")),
    };
    let r = on_host(ctx, s, &host, "service", |hc| {
        crate::primitives::services::service(hc, &req)
    })?;
    let mut m = Map::new();
    m.insert("unit".into(), r.unit.into());
    m.insert("changed".into(), r.changed.into());
    m.insert("planned".into(), r.planned.into());
    m.insert("detail".into(), r.detail.into());
    status_into(&mut m, r.after.as_ref().or(r.before.as_ref()));
    Ok(m)
}

fn reboot_options(ctx: &NativeCallContext, host: &str, opts: &Map) -> RhaiResult<RebootOptions> {
    let bad = |m: String| fail::<RebootOptions>(ctx, format!("{host}: reboot: {m}"));
    if let Err(e) = no_unknown_keys(opts, REBOOT_OPTION_KEYS) {
        return bad(e);
    }
    let mut o = RebootOptions::default();
    match opt_duration(opts, "timeout") {
        Ok(Some(d)) if d.is_zero() => return bad("`timeout` must be more than 0s".into()),
        Ok(Some(d)) => o.timeout = d,
        Ok(None) => {}
        Err(e) => return bad(e),
    }
    if let Some(v) = opts.get("ready").filter(|v| !v.is_unit()) {
        let ty = v.type_name();
        match v.clone().try_cast::<Array>() {
            Some(a) => o.ready = Some(argv_arg(ctx, host, "reboot ready", a)?),
            None => {
                return bad(format!(
                    "`ready` must be an argv (array of strings), got {ty}"
                ))
            }
        }
    }
    Ok(o)
}

fn do_reboot(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "reboot")?;
    let o = reboot_options(ctx, host.name(), &opts)?;
    let target = host.0.clone();
    let r = on_host(ctx, s, &host, "reboot", |hc| {
        let reconnect = || {
            s.runtime.forget(&target.name);
            s.runtime.transport(&target)
        };
        crate::primitives::services::reboot(hc, &o, &reconnect)
    })?;
    let mut m = Map::new();
    m.insert("planned".into(), r.planned.into());
    m.insert("boot_id_before".into(), r.boot_id_before.into());
    m.insert("boot_id_after".into(), r.boot_id_after.into());
    m.insert(
        "took_ms".into(),
        i64::try_from(r.took.as_millis()).unwrap_or(i64::MAX).into(),
    );
    Ok(m)
}

/// Registers the service and reboot primitives.
pub fn register_services(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    let s = session_.clone();
    FuncRegistration::new("service")
        .with_volatility(true)
        .with_params_info(["host: Host", "unit: &str", "options: Map", "Map"])
        .with_comments(["/// A change: brings a service to `#{ state: \"started\" | \"stopped\" | \"restarted\" |\n/// \"reloaded\", enabled?: bool, timeout?: \"30s\" }` through systemctl where systemd runs,\n/// else SysV (`service`, /etc/init.d, update-rc.d), then waits until it settles\n/// (`timeout`) and fails if it did not reach the state. The state found first is the\n/// undo. Already there: nothing is done. Returns\n/// `#{ unit, changed, planned, detail, active, enabled }`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, unit: &str, opts: Map| -> RhaiResult<Map> {
                do_service(&ctx, &s, host, unit, opts)
            },
        );

    const REBOOT: &str = "/// A change: reboots the host (`systemctl reboot`, else `shutdown -r now`, else\n/// `reboot`) and waits until SSH answers with a new boot id, then runs `ready` until it\n/// passes. Fails with \"did not return within …\". Nothing to undo. Returns\n/// `#{ planned, boot_id_before, boot_id_after, took_ms }`.";
    let s = session_.clone();
    FuncRegistration::new("reboot")
        .with_volatility(true)
        .with_params_info(["host: Host", "Map"])
        .with_comments([REBOOT])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Map> {
                do_reboot(&ctx, &s, host, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("reboot")
        .with_volatility(true)
        .with_params_info(["host: Host", "options: Map", "Map"])
        .with_comments([&format!(
            "{REBOOT}\n/// Options: `timeout` (default \"5m\"), `ready` (an argv)."
        )])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, opts: Map| -> RhaiResult<Map> {
                do_reboot(&ctx, &s, host, opts)
            },
        );

    let s = session_.clone();
    FuncRegistration::new("needs_reboot")
        .with_volatility(true)
        .with_params_info(["host: Host", "Map"])
        .with_comments(["/// A probe: `#{ needed, reasons }` from /var/run/reboot-required, the running kernel\n/// against the newest installed one, and `needs-restarting -r` where present."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Map> {
                let s = session(&ctx, &s, "needs_reboot")?;
                let r = on_host(&ctx, s, &host, "needs_reboot", crate::primitives::services::needs_reboot)?;
                let mut m = Map::new();
                m.insert("needed".into(), r.needed.into());
                m.insert(
                    "reasons".into(),
                    Dynamic::from_array(r.reasons.into_iter().map(Dynamic::from).collect()),
                );
                Ok(m)
            },
        );

    let s = session_.clone();
    FuncRegistration::new("services_needing_restart")
        .with_volatility(true)
        .with_params_info(["host: Host", "Array"])
        .with_comments(["/// A probe: what still runs replaced code, as unit names where known, else process\n/// names: `needrestart -b`, else `needs-restarting -s`, else processes mapping deleted\n/// libraries or binaries."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Array> {
                let s = session(&ctx, &s, "services_needing_restart")?;
                let names = on_host(
                    &ctx,
                    s,
                    &host,
                    "services_needing_restart",
                    crate::primitives::services::services_needing_restart,
                )?;
                Ok(names.into_iter().map(Dynamic::from).collect())
            },
        );
}
