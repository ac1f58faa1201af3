//! Registration of the repository upgrade primitives: `pending_updates` (a probe)
//! and `upgrade` (a change), adapters over [`crate::primitives::upgrade`].
//!
//! It checks the Rhai arguments and option maps (refusing hostile package names and
//! versions before any command runs) and turns results into Rhai maps. It must not
//! decide which versions are installed or how they are undone: the primitive does.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FuncRegistration, Map, NativeCallContext};

use super::patch::{
    check_package_arg, check_version_arg, fail, no_unknown_keys, on_host, opt_duration, opt_str,
    opt_string, session, strings,
};
use super::register::ScriptHost;
use crate::primitives::upgrade::{PendingUpdate, Target, UpgradeOptions, Upgraded};
use crate::run::Session;

type RhaiResult<T> = Result<T, Box<rhai::EvalAltResult>>;

/// Keys of `pending_updates(host, #{ … })`; `patchbook check` reads the same list.
pub const PENDING_UPDATES_OPTION_KEYS: &[&str] = &["security_only"];
/// Keys of `upgrade(host, pkgs, #{ … })`.
pub const UPGRADE_OPTION_KEYS: &[&str] = &["to", "security_only", "irreversible", "timeout"];

fn opt_bool(m: &Map, key: &str) -> Result<bool, String> {
    match m.get(key) {
        None => Ok(false),
        Some(v) if v.is_unit() => Ok(false),
        Some(v) => v
            .as_bool()
            .map_err(|ty| format!("`{key}` must be true or false, got {ty}")),
    }
}

fn pending_map(u: PendingUpdate) -> Dynamic {
    let mut m = Map::new();
    m.insert("package".into(), u.package.into());
    m.insert("installed".into(), u.installed.into());
    m.insert("candidate".into(), u.candidate.into());
    m.insert("origin".into(), u.origin.into());
    m.insert("security".into(), u.security.into());
    m.into()
}

fn upgraded_map(u: Upgraded) -> Map {
    let changed: Array = u
        .changed
        .into_iter()
        .map(|c| {
            let mut m = Map::new();
            m.insert("package".into(), c.package.into());
            m.insert("before".into(), opt_string(c.before));
            m.insert("after".into(), opt_string(c.after));
            m.insert("origin".into(), c.origin.into());
            m.into()
        })
        .collect();
    let skipped: Array = u
        .skipped
        .into_iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("package".into(), s.package.into());
            m.insert("reason".into(), s.reason.into());
            m.into()
        })
        .collect();
    let mut m = Map::new();
    m.insert("changed".into(), changed.into());
    m.insert("skipped".into(), skipped.into());
    m.insert(
        "undo".into(),
        opt_string(u.undo.as_ref().map(crate::primitives::undo::describe)),
    );
    m.insert("planned".into(), u.planned.into());
    m
}

fn do_pending(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    opts: Map,
) -> RhaiResult<Array> {
    let s = session(ctx, s, "pending_updates")?;
    let parsed = no_unknown_keys(&opts, PENDING_UPDATES_OPTION_KEYS)
        .and_then(|()| opt_bool(&opts, "security_only"));
    let security_only = match parsed {
        Ok(b) => b,
        Err(e) => return fail(ctx, format!("{}: pending_updates: {e}", host.name())),
    };
    let list = on_host(ctx, s, &host, "pending_updates", |hc| {
        crate::primitives::upgrade::pending_updates(hc, security_only)
    })?;
    Ok(list.into_iter().map(pending_map).collect())
}

fn upgrade_options(ctx: &NativeCallContext, host: &str, opts: &Map) -> RhaiResult<UpgradeOptions> {
    let where_ = format!("{host}: upgrade");
    let parsed = (|| -> Result<UpgradeOptions, String> {
        no_unknown_keys(opts, UPGRADE_OPTION_KEYS)?;
        let mut o = UpgradeOptions::default();
        match opt_str(opts, "to")?.as_deref() {
            None | Some("candidate") => {}
            Some(v) => o.to = Target::Version(v.to_string()),
        }
        o.security_only = opt_bool(opts, "security_only")?;
        o.irreversible = opt_bool(opts, "irreversible")?;
        if let Some(t) = opt_duration(opts, "timeout")? {
            o.timeout = t;
        }
        Ok(o)
    })();
    match parsed {
        Ok(o) => {
            if let Target::Version(v) = &o.to {
                check_version_arg(ctx, &where_, v)?;
            }
            Ok(o)
        }
        Err(e) => fail(ctx, format!("{where_}: {e}")),
    }
}

fn do_upgrade(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    pkgs: Array,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "upgrade")?;
    let pkgs = strings(ctx, host.name(), "upgrade", "pkgs", pkgs)?;
    let where_ = format!("{}: upgrade", host.name());
    for p in &pkgs {
        check_package_arg(ctx, &where_, p)?;
    }
    let o = upgrade_options(ctx, host.name(), &opts)?;
    tracing::info!(target: "patchbook::script", host = %host.name(), packages = %pkgs.join(" "), "upgrade");
    let u = on_host(ctx, s, &host, "upgrade", |hc| {
        crate::primitives::upgrade::upgrade(hc, &pkgs, &o)
    })?;
    Ok(upgraded_map(u))
}

/// Registers `pending_updates` and `upgrade`. Without a session they exist (for
/// `check` and `docs`) but refuse to run.
pub fn register_upgrade(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    const PENDING: &str = "/// A probe: the packages the host's repositories offer a newer version of, as\n/// `#{ package, installed, candidate, origin, security }` maps (read `u[\"package\"]`:\n/// `package` is a reserved word in Rhai). apt: `apt-get -s dist-upgrade` in the C\n/// locale; rpm hosts: `dnf check-update` and `dnf updateinfo --security`. Uses the\n/// package lists as they are; runs in `plan` too.";
    let s = session_.clone();
    FuncRegistration::new("pending_updates")
        .with_volatility(true)
        .with_params_info(["host: Host", "Array"])
        .with_comments([PENDING])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost| -> RhaiResult<Array> {
                do_pending(&ctx, &s, host, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("pending_updates")
        .with_volatility(true)
        .with_params_info(["host: Host", "options: Map", "Array"])
        .with_comments([&format!(
            "{PENDING}\n/// Options: `security_only` (true: only updates from a security origin)."
        )])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, opts: Map| -> RhaiResult<Array> {
                do_pending(&ctx, &s, host, opts)
            },
        );

    const UPGRADE: &str = "/// A change: moves installed `pkgs` to exact versions from the host's repositories\n/// (apt hosts). Every version is resolved first (dependencies included) and the\n/// versions before go to the journal with the undo BEFORE anything is installed; then\n/// `apt-get install pkg=version` only, never a bare upgrade. The undo reinstalls each\n/// previous version from the repository or the host's package cache; when one is\n/// not obtainable the upgrade is refused before acting. Packages already at the\n/// target are skipped (a second run changes nothing). `plan` shows\n/// \"pkg before → after\" and runs nothing. Returns `#{ changed: [#{ package, before,\n/// after, origin }], skipped: [#{ package, reason }], undo, planned }`.";
    let s = session_.clone();
    FuncRegistration::new("upgrade")
        .with_volatility(true)
        .with_params_info(["host: Host", "pkgs: Array", "Map"])
        .with_comments([UPGRADE])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, pkgs: Array| -> RhaiResult<Map> {
                do_upgrade(&ctx, &s, host, pkgs, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("upgrade")
        .with_volatility(true)
        .with_params_info(["host: Host", "pkgs: Array", "options: Map", "Map"])
        .with_comments([&format!("{UPGRADE}\n/// Options: `to` (\"candidate\", the default, or a version every named package\n/// moves to), `security_only` (skip packages whose target is not from a security\n/// origin), `irreversible` (true: upgrade even when a previous version cannot be\n/// reinstalled; the undo is then a manual step), `timeout` (e.g. \"15m\").")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  pkgs: Array,
                  opts: Map|
                  -> RhaiResult<Map> { do_upgrade(&ctx, &s, host, pkgs, opts) },
        );
}
