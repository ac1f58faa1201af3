//! Registration of the file primitives: `put_file`, `template`, `line_in_file` and
//! `remove_file`, each a change (plan shows a diff; run journals the intent with
//! its undo before writing).
//!
//! Each function is a thin adapter over [`crate::primitives::files`]: it checks the
//! Rhai arguments and option maps (unknown keys, types), resolves a controller
//! source only under the playbook and library folders of `patchbook.toml`, renders
//! templates before any host is asked anything, and turns the result into a map.
//! It must not read or write host files itself, nor decide what changes.

use std::path::PathBuf;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, FuncRegistration, Map, NativeCallContext};

use super::patch::{fail, no_unknown_keys, on_host, opt_str, session, ScriptArtifact};
use super::register::ScriptHost;
use crate::primitives::files::{self, FileOptions, FileResult, LineRule, LineState};
use crate::run::Session;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Keys of `put_file(host, source, dest, #{ … })` and
/// `template(host, path, dest, vars, #{ … })`; `patchbook check` reads the same list.
pub const FILE_OPTION_KEYS: &[&str] = &["mode", "owner", "group", "follow"];
/// Keys of `line_in_file(host, path, #{ … })`.
pub const LINE_IN_FILE_OPTION_KEYS: &[&str] = &["regexp", "line", "state", "after", "follow"];
/// Keys of `remove_file(host, path, #{ … })`.
pub const REMOVE_FILE_OPTION_KEYS: &[&str] = &["follow"];

fn opt_bool(m: &Map, key: &str) -> Result<bool, String> {
    match m.get(key) {
        None => Ok(false),
        Some(v) if v.is_unit() => Ok(false),
        Some(v) => v
            .as_bool()
            .map_err(|ty| format!("`{key}` must be true or false, got {ty}")),
    }
}

fn file_options(s: &Session, opts: &Map) -> Result<FileOptions, String> {
    no_unknown_keys(opts, FILE_OPTION_KEYS)?;
    let mode = match opts.get("mode") {
        None => None,
        Some(v) if v.is_unit() => None,
        Some(v) if v.is_string() => Some(files::parse_mode(&v.to_string())?),
        Some(v) => {
            return Err(format!(
                "`mode` must be a string of octal digits like \"0644\", got {} (a number reads ambiguously)",
                v.type_name()
            ))
        }
    };
    Ok(FileOptions {
        mode,
        owner: opt_str(opts, "owner")?,
        group: opt_str(opts, "group")?,
        follow: opt_bool(opts, "follow")?,
        redact: s.secrets(),
    })
}

fn line_rule(s: &Session, opts: &Map) -> Result<LineRule, String> {
    no_unknown_keys(opts, LINE_IN_FILE_OPTION_KEYS)?;
    let state = match opt_str(opts, "state")?.as_deref() {
        None | Some("present") => LineState::Present,
        Some("absent") => LineState::Absent,
        Some(other) => {
            return Err(format!(
                "`state` is \"present\" or \"absent\", not {:?}",
                crate::primitives::cut(other, 40)
            ))
        }
    };
    Ok(LineRule {
        regexp: opt_str(opts, "regexp")?,
        line: opt_str(opts, "line")?,
        state,
        after: opt_str(opts, "after")?,
        follow: opt_bool(opts, "follow")?,
        redact: s.secrets(),
    })
}

/// The folders a controller source may come from: the playbook folder, then the
/// library folders, as `patchbook.toml` configures them.
fn source_roots(s: &Session) -> Vec<PathBuf> {
    let c = &s.runtime.config;
    let mut roots = vec![c.playbook_dir()];
    roots.extend(c.library_dirs());
    roots
}

fn result_map(r: FileResult) -> Map {
    let mut m = Map::new();
    m.insert("path".into(), r.path.into());
    m.insert("changed".into(), r.changed.into());
    m.insert("planned".into(), r.planned.into());
    m.insert("detail".into(), r.detail.into());
    m
}

fn do_put_file(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    source: Dynamic,
    dest: &str,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "put_file")?;
    let o = match file_options(s, &opts) {
        Ok(o) => o,
        Err(e) => return fail(ctx, format!("{}: put_file: {e}", host.name())),
    };
    let where_ = format!("{}: put_file", host.name());
    let bytes = if let Some(a) = source.clone().try_cast::<ScriptArtifact>() {
        files::artifact_bytes(&where_, &a.0)
    } else if source.is_string() {
        files::controller_file(&where_, &source.to_string(), &source_roots(s)).map(|(_, b)| b)
    } else {
        return fail(
            ctx,
            format!(
                "{where_}: `source` is an Artifact from artifact(…) or the path of a file in the playbook or a library folder, got {}",
                source.type_name()
            ),
        );
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => return fail(ctx, e.to_string()),
    };
    let r = on_host(ctx, s, &host, "put_file", |hc| {
        files::put_content(hc, "put_file", bytes, dest, &o)
    })?;
    Ok(result_map(r))
}

fn do_template(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    path: &str,
    dest: &str,
    vars: Map,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "template")?;
    let where_ = format!("{}: template", host.name());
    let o = match file_options(s, &opts) {
        Ok(o) => o,
        Err(e) => return fail(ctx, format!("{where_}: {e}")),
    };
    let source = match files::controller_file(&where_, path, &source_roots(s)) {
        Ok((_, bytes)) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => return fail(ctx, format!("{where_}: {path} is not UTF-8 text")),
        },
        Err(e) => return fail(ctx, e.to_string()),
    };
    let vars: serde_json::Value = match rhai::serde::from_dynamic(&Dynamic::from_map(vars)) {
        Ok(v) => v,
        Err(e) => {
            let e = files::TemplateError::Vars {
                name: path.to_string(),
                message: e.to_string(),
            };
            return fail(ctx, format!("{where_}: {e}"));
        }
    };
    // Rendered before the host is asked anything: a template error touches no host.
    let bytes = match files::render(path, &source, &vars) {
        Ok(b) => b,
        Err(e) => return fail(ctx, format!("{where_}: {e}")),
    };
    let r = on_host(ctx, s, &host, "template", |hc| {
        files::put_content(hc, "template", bytes, dest, &o)
    })?;
    Ok(result_map(r))
}

fn do_remove_file(
    ctx: &NativeCallContext,
    s: &Option<Arc<Session>>,
    host: ScriptHost,
    path: &str,
    opts: Map,
) -> RhaiResult<Map> {
    let s = session(ctx, s, "remove_file")?;
    let follow = match no_unknown_keys(&opts, REMOVE_FILE_OPTION_KEYS)
        .and_then(|()| opt_bool(&opts, "follow"))
    {
        Ok(f) => f,
        Err(e) => return fail(ctx, format!("{}: remove_file: {e}", host.name())),
    };
    let redact = s.secrets();
    let r = on_host(ctx, s, &host, "remove_file", |hc| {
        files::remove_file(hc, path, follow, &redact)
    })?;
    Ok(result_map(r))
}

const RESULT: &str = "/// Returns `#{ path, changed, planned, detail }`: `changed` is false when the host\n/// already was as asked (\"no change: …\", nothing written, nothing journaled).";

/// Registers `put_file`, `template`, `line_in_file` and `remove_file`. With no
/// session they exist (for `check` and `docs`) but refuse to run.
pub fn register_files(engine: &mut Engine, session_: &Option<Arc<Session>>) {
    const PUT: &str = "/// A change: puts a file on the host. `source` is an Artifact (from artifact(…)) or the\n/// path of a controller file in the playbook folder or a library folder (no `..`).\n/// Written atomically: a temp file in the same folder gets owner and mode, is fsynced\n/// and renamed over `dest`. The previous content, mode and owner are kept on the\n/// controller first, so rollback restores them exactly (or removes a new file).\n/// `plan` shows a unified diff.";
    const FILE_OPTS: &str = "/// Options: `mode` (\"0644\"; default: the file's own, 0644 for a new file), `owner`,\n/// `group` (names or ids; default: unchanged), `follow` (true: a symbolic link at\n/// `dest` is followed and the file it points to is changed; without it a link is\n/// refused). Folders, devices and other special files are always refused.";
    let s = session_.clone();
    FuncRegistration::new("put_file")
        .with_volatility(true)
        .with_params_info(["host: Host", "source: ?", "dest: &str", "Map"])
        .with_comments([&format!("{PUT}\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  source: Dynamic,
                  dest: &str|
                  -> RhaiResult<Map> {
                do_put_file(&ctx, &s, host, source, dest, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("put_file")
        .with_volatility(true)
        .with_params_info([
            "host: Host",
            "source: ?",
            "dest: &str",
            "options: Map",
            "Map",
        ])
        .with_comments([&format!("{PUT}\n{FILE_OPTS}\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  source: Dynamic,
                  dest: &str,
                  opts: Map|
                  -> RhaiResult<Map> {
                do_put_file(&ctx, &s, host, source, dest, opts)
            },
        );

    const TEMPLATE: &str = "/// A change: renders the template at `path` (in the playbook folder or a library\n/// folder) with `vars` on the controller (minijinja: `{{ name }}`, `{% if %}`,\n/// `{% for %}`, filters; no include or import; an undefined variable is an error,\n/// raised before the host is asked anything) and puts the result at `dest` like\n/// put_file.";
    let s = session_.clone();
    FuncRegistration::new("template")
        .with_volatility(true)
        .with_params_info(["host: Host", "path: &str", "dest: &str", "vars: Map", "Map"])
        .with_comments([&format!("{TEMPLATE}\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  path: &str,
                  dest: &str,
                  vars: Map|
                  -> RhaiResult<Map> {
                do_template(&ctx, &s, host, path, dest, vars, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("template")
        .with_volatility(true)
        .with_params_info([
            "host: Host",
            "path: &str",
            "dest: &str",
            "vars: Map",
            "options: Map",
            "Map",
        ])
        .with_comments([&format!("{TEMPLATE}\n{FILE_OPTS}\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext,
                  host: ScriptHost,
                  path: &str,
                  dest: &str,
                  vars: Map,
                  opts: Map|
                  -> RhaiResult<Map> {
                do_template(&ctx, &s, host, path, dest, vars, opts)
            },
        );

    let s = session_.clone();
    FuncRegistration::new("line_in_file")
        .with_volatility(true)
        .with_params_info(["host: Host", "path: &str", "options: Map", "Map"])
        .with_comments([&format!("/// A change: Ansible's lineinfile. `#{{ line, regexp?, state?, after?, follow? }}`:\n/// state \"present\" (default) replaces the last line matching `regexp` with `line`;\n/// with no match, a file already holding `line` is left alone, else `line` goes after\n/// the last line matching `after`, or at the end. State \"absent\" removes every line\n/// matching `regexp` (or equal to `line`). Regular expressions are Rust `regex`\n/// syntax, at most 4096 bytes. The file must exist for \"present\" and keeps its mode\n/// and owner; written atomically and reversed exactly like put_file.\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, path: &str, opts: Map| -> RhaiResult<Map> {
                let s = session(&ctx, &s, "line_in_file")?;
                let rule = match line_rule(s, &opts) {
                    Ok(r) => r,
                    Err(e) => return fail(&ctx, format!("{}: line_in_file: {e}", host.name())),
                };
                let r = on_host(&ctx, s, &host, "line_in_file", |hc| {
                    files::line_in_file(hc, path, &rule)
                })?;
                Ok(result_map(r))
            },
        );

    const REMOVE: &str = "/// A change: removes a regular file; its content, mode and owner are kept on the\n/// controller first, so rollback puts it back exactly. A missing file is no change.";
    let s = session_.clone();
    FuncRegistration::new("remove_file")
        .with_volatility(true)
        .with_params_info(["host: Host", "path: &str", "Map"])
        .with_comments([&format!("{REMOVE}\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, path: &str| -> RhaiResult<Map> {
                do_remove_file(&ctx, &s, host, path, Map::new())
            },
        );
    let s = session_.clone();
    FuncRegistration::new("remove_file")
        .with_volatility(true)
        .with_params_info(["host: Host", "path: &str", "options: Map", "Map"])
        .with_comments([&format!("{REMOVE}\n/// Options: `follow` (true: remove the file a symbolic link points to; without it a\n/// link is refused).\n{RESULT}")])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, host: ScriptHost, path: &str, opts: Map| -> RhaiResult<Map> {
                do_remove_file(&ctx, &s, host, path, opts)
            },
        );
}
