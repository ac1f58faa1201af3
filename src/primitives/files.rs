//! File changes on a host: [`put_file`] (bytes from the controller), [`template`]
//! (a minijinja template rendered on the controller), [`line_in_file`] (Ansible's
//! lineinfile rules) and [`remove_file`], and [`restore_file`], the undo of all four.
//!
//! It owns how a host file is read (content, mode, owner and group, or absence;
//! size-capped), how it is replaced atomically (a temp file in the same folder,
//! owner and mode set, fsynced, renamed over the old one), the controller's store
//! of previous contents (`<state>/files/<sha256>`), the unified diff `plan` shows,
//! and the refusal of hostile paths, links and special files before any command
//! runs. Every command is one of the fixed scripts below with the data as
//! positional parameters. It must not touch anything on a host but the one path a
//! step names (and its temp file beside it), nor any controller file outside the
//! folders it is given, and it must not know Rhai.

use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::artifact::Artifact;
use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{Entry, FileInput, FileOutput, FileUnchanged};
use crate::journal::{redact_str, PreviousFile, UndoStep};
use crate::transport::Command;

/// Largest file a step reads from a host, writes to one or keeps on the
/// controller. Config files are far smaller; anything larger is a package's job.
pub const MAX_FILE: usize = 16 << 20;
/// Longest regular expression `line_in_file` compiles.
pub const MAX_PATTERN: usize = 4096;
/// Compiled size limit of one regular expression (program and lazy DFA each).
const REGEX_SIZE: usize = 1 << 20;
/// Longest a single file command may run when the host's deadline is further off.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Mode of a file a step creates when the playbook gives none.
pub const DEFAULT_MODE: u32 = 0o644;
/// Template instructions one render may spend: a runaway loop ends with an error.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Most characters of a diff a plan shows for one file.
const DIFF_CHARS: usize = 64 * 1024;
/// Characters that mean something to a shell; a path holding one is refused
/// outright, although every path travels as one quoted word.
const SHELL_META: &str = ";&|$`<>(){}*?!\"'\\";

/// Mode, owner and group a written file gets; unset ones keep what the file has
/// (a new file: mode [`DEFAULT_MODE`], the connecting user's owner and group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    pub mode: Option<u32>,
    /// A user name or numeric uid.
    pub owner: Option<String>,
    /// A group name or numeric gid.
    pub group: Option<String>,
    /// A symbolic link at the path is refused unless this is set; then the file it
    /// points to (resolved on the host) is changed and the link is left alone.
    pub follow: bool,
    /// Strings a plan's diff shows as `***` (the run's secrets).
    pub redact: Vec<String>,
}

/// A regular file on a host, as read before a step changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Names as the host reports them (`UNKNOWN` when it has none).
    pub owner: String,
    pub group: String,
}

/// What is at a path on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Absent,
    File(HostFile),
}

/// What a file step did, or in `plan` would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileResult {
    /// The path changed: the one given, or with `follow` the file a link points to.
    pub path: String,
    pub changed: bool,
    pub planned: bool,
    /// "no change: …", the plan's description and diff, or what was done.
    pub detail: String,
}

/// `state` of [`LineRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineState {
    Present,
    Absent,
}

/// A `line_in_file` request, as the playbook gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRule {
    /// Lines it matches are replaced (the last one) or removed (every one).
    pub regexp: Option<String>,
    /// The line wanted; without `regexp`, lines equal to it are the matches.
    pub line: Option<String>,
    pub state: LineState,
    /// A new line goes after the last line matching this, else at the end.
    pub after: Option<String>,
    pub follow: bool,
    pub redact: Vec<String>,
}

/// A [`LineRule`] checked and compiled, before anything reaches a host.
struct CompiledRule {
    regexp: Option<regex::bytes::Regex>,
    line: Option<Vec<u8>>,
    state: LineState,
    after: Option<regex::bytes::Regex>,
}

/// Why a template could not be rendered; raised on the controller, before any host
/// is asked anything.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{name}: {message}; every variable the template uses must be given in `vars` (undefined ones are errors)")]
    Render { name: String, message: String },
    #[error("{name}: `vars` must hold plain values (strings, numbers, booleans, arrays, maps): {message}")]
    Vars { name: String, message: String },
    #[error("{name} renders to {size} bytes; files are at most {MAX_FILE} bytes (use deploy for larger ones)")]
    TooLarge { name: String, size: usize },
}

fn refused(step: &str, what: &str, value: &str, reason: impl Into<String>) -> PrimitiveError {
    PrimitiveError::Refused {
        step: step.to_string(),
        what: what.to_string(),
        value: cut(value, 80),
        reason: reason.into(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Refuses a host path before it reaches a command: absolute, at most 4096 bytes,
/// no control characters, no `.` or `..` parts, no part starting with `-`, no
/// shell metacharacters, and naming a file rather than `/` or a folder.
pub fn check_path(step: &str, p: &str) -> Result<(), PrimitiveError> {
    let refuse = |reason: &str| Err(refused(step, "path", p, reason));
    if p.is_empty() || p.len() > 4096 {
        return refuse("file paths are 1 to 4096 bytes");
    }
    if p.chars().any(|c| c.is_control()) {
        return refuse("paths have no control characters (newline, NUL, …)");
    }
    if !p.starts_with('/') {
        return refuse("file paths must be absolute");
    }
    if p.ends_with('/') {
        return refuse("the path ends with '/', which names a folder; give the file's path");
    }
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        return refuse("`/` is not a file");
    }
    if parts.iter().any(|s| *s == "." || *s == "..") {
        return refuse("`.` and `..` are not allowed in file paths; give the path plainly");
    }
    if parts.iter().any(|s| s.starts_with('-')) {
        return refuse("no part of a file path may start with '-' (it would read as an option)");
    }
    if p.chars().any(|c| SHELL_META.contains(c)) {
        return refuse(
            "paths with shell metacharacters (; & | $ ` < > ( ) { } * ? ! quotes \\) are refused",
        );
    }
    Ok(())
}

/// Refuses an owner or group that is neither a plain account name nor a number.
pub fn check_account(step: &str, what: &str, v: &str) -> Result<(), PrimitiveError> {
    let name_ok = v.len() <= 32
        && v.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && v.trim_end_matches('$')
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    let id_ok = !v.is_empty() && v.len() <= 10 && v.chars().all(|c| c.is_ascii_digit());
    if name_ok || id_ok {
        Ok(())
    } else {
        Err(refused(
            step,
            what,
            v,
            "give an account name (letters, digits, '_', '.', '-', starting with a letter or '_') or a numeric id",
        ))
    }
}

fn check_options(step: &str, o: &FileOptions) -> Result<(), PrimitiveError> {
    if let Some(m) = o.mode {
        if m > 0o7777 {
            return Err(refused(
                step,
                "mode",
                &format!("{m:o}"),
                "modes are at most 07777",
            ));
        }
    }
    if let Some(u) = &o.owner {
        check_account(step, "owner", u)?;
    }
    if let Some(g) = &o.group {
        check_account(step, "group", g)?;
    }
    Ok(())
}

/// A mode as the playbook writes it: three or four octal digits (`"0644"`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let ok = (3..=4).contains(&s.len()) && s.chars().all(|c| ('0'..='7').contains(&c));
    match ok.then(|| u32::from_str_radix(s, 8).ok()).flatten() {
        Some(m) => Ok(m),
        None => Err(format!(
            "mode {:?} is not three or four octal digits like \"0644\"",
            cut(s, 20)
        )),
    }
}

// ----- controller side -----------------------------------------------------------

/// A controller file a playbook names as a source: a path relative to one of
/// `roots` (the playbook and library folders, tried in order) or an absolute path
/// inside one. `..` is refused outright, and a path whose real location (links
/// resolved) is outside every root is refused too. Returns its real path and bytes.
pub fn controller_file(
    step: &str,
    given: &str,
    roots: &[PathBuf],
) -> Result<(PathBuf, Vec<u8>), PrimitiveError> {
    let refuse = |reason: String| Err(refused(step, "controller file", given, reason));
    if given.is_empty() || given.len() > 4096 || given.chars().any(|c| c.is_control()) {
        return refuse("controller paths are 1 to 4096 bytes without control characters".into());
    }
    let p = Path::new(given);
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return refuse(
            "`..` is not allowed: name the file inside the playbook or a library folder".into(),
        );
    }
    let real_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let shown_roots = roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if real_roots.is_empty() {
        return refuse(format!(
            "none of the folders files may come from exists ({shown_roots}); set `playbooks` or `libraries` in patchbook.toml"
        ));
    }
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        roots.iter().map(|r| r.join(p)).collect()
    };
    for c in candidates {
        let Ok(real) = std::fs::canonicalize(&c) else {
            continue;
        };
        if !real_roots.iter().any(|r| real.starts_with(r)) {
            return refuse(format!(
                "it is {}, outside the playbook and library folders ({shown_roots})",
                real.display()
            ));
        }
        let meta = std::fs::metadata(&real).map_err(|source| PrimitiveError::Io {
            context: format!("{step}: read {}", real.display()),
            source,
        })?;
        if !meta.is_file() {
            return refuse(format!("{} is not a regular file", real.display()));
        }
        if meta.len() > MAX_FILE as u64 {
            return refuse(format!(
                "it is {} bytes; files are at most {MAX_FILE} bytes (use deploy for larger ones)",
                meta.len()
            ));
        }
        let bytes = std::fs::read(&real).map_err(|source| PrimitiveError::Io {
            context: format!("{step}: read {}", real.display()),
            source,
        })?;
        return Ok((real, bytes));
    }
    refuse(format!(
        "no such file under the playbook and library folders ({shown_roots})"
    ))
}

/// An artifact's bytes from the controller's cache, hashed again on the way.
pub fn artifact_bytes(step: &str, a: &Artifact) -> Result<Vec<u8>, PrimitiveError> {
    let meta = std::fs::metadata(&a.path).map_err(|source| PrimitiveError::Io {
        context: format!("{step}: read artifact {}", a.path.display()),
        source,
    })?;
    if meta.len() > MAX_FILE as u64 {
        return Err(refused(
            step,
            "artifact",
            &a.url,
            format!(
                "it is {} bytes; files are at most {MAX_FILE} bytes (use deploy for packages)",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(&a.path).map_err(|source| PrimitiveError::Io {
        context: format!("{step}: read artifact {}", a.path.display()),
        source,
    })?;
    let found = sha256_hex(&bytes);
    if found != a.sha256 {
        return Err(refused(
            step,
            "artifact",
            &a.url,
            format!(
                "the cached file {} hashes to {found}, not {}; fetch it again",
                a.path.display(),
                a.sha256
            ),
        ));
    }
    Ok(bytes)
}

/// Renders a template on the controller: no loader (so no include, import or
/// extends can read a file), undefined variables are errors, a fuel limit ends
/// runaway loops, nothing is escaped, and the trailing newline is kept.
pub fn render(
    name: &str,
    source: &str,
    vars: &serde_json::Value,
) -> Result<Vec<u8>, TemplateError> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    if !vars.is_object() {
        return Err(TemplateError::Vars {
            name: name.to_string(),
            message: "`vars` must be a map".into(),
        });
    }
    let out = env
        .render_named_str(name, source, vars)
        .map_err(|e| TemplateError::Render {
            name: name.to_string(),
            message: template_message(&e),
        })?;
    if out.len() > MAX_FILE {
        return Err(TemplateError::TooLarge {
            name: name.to_string(),
            size: out.len(),
        });
    }
    Ok(out.into_bytes())
}

fn template_message(e: &minijinja::Error) -> String {
    let mut m = e.kind().to_string();
    if let Some(d) = e.detail() {
        m = format!("{m}: {d}");
    }
    if let Some(l) = e.line() {
        m = format!("line {l}: {m}");
    }
    m
}

/// Where the controller keeps the previous contents of changed host files.
pub fn store_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("files")
}

/// Keeps `bytes` at `<state>/files/<sha256>` (folder 0700, file 0600, written to a
/// temp name, fsynced and renamed) and returns the hash. Content already kept is
/// not written again.
pub fn keep_previous(state_dir: &Path, bytes: &[u8]) -> Result<String, PrimitiveError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |context: String| move |source| PrimitiveError::Io { context, source };
    let dir = store_dir(state_dir);
    // Also makes a state dir created here 0700 under any umask.
    crate::journal::private::create_dir_all(&dir)
        .map_err(io(format!("create {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", dir.display())))?;
    let sha = sha256_hex(bytes);
    let path = dir.join(&sha);
    if let Ok(existing) = std::fs::read(&path) {
        if sha256_hex(&existing) == sha {
            return Ok(sha);
        }
    }
    let tmp = dir.join(format!(".{sha}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("create {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))?;
    Ok(sha)
}

/// Previous contents back from the store, checked against their hash.
pub fn load_previous(state_dir: &Path, sha256: &str) -> Result<Vec<u8>, PrimitiveError> {
    let ok_name = sha256.len() == 64 && sha256.chars().all(|c| c.is_ascii_hexdigit());
    if !ok_name {
        return Err(refused(
            "rollback",
            "stored file",
            sha256,
            "not a SHA-256; the journal record is damaged",
        ));
    }
    let path = store_dir(state_dir).join(sha256);
    let bytes = std::fs::read(&path).map_err(|source| PrimitiveError::Io {
        context: format!(
            "read the kept previous content {} (was the state folder moved or cleaned?)",
            path.display()
        ),
        source,
    })?;
    let found = sha256_hex(&bytes);
    if found != sha256 {
        return Err(refused(
            "rollback",
            "stored file",
            &path.display().to_string(),
            format!("it hashes to {found}, not {sha256}: it changed since it was kept"),
        ));
    }
    Ok(bytes)
}

// ----- host side -----------------------------------------------------------------

/// Prints what is at `$1`: `link` and its target, `absent`, `nofolder`, `special`,
/// or `file SIZE MODE UID GID OWNER GROUP` and (when SIZE is at most `$2`) the bytes.
const READ_SCRIPT: &str = r#"p=$1; max=$2
if [ -L "$p" ]; then printf 'link\n'; readlink -- "$p"; exit 0; fi
if [ ! -e "$p" ]; then
  d=${p%/*}; [ -n "$d" ] || d=/
  if [ -d "$d" ]; then printf 'absent\n'; else printf 'nofolder\n'; fi
  exit 0
fi
if [ ! -f "$p" ]; then printf 'special\n'; exit 0; fi
s=$(stat -c '%s %a %u %g %U %G' -- "$p") || exit 97
printf 'file %s\n' "$s"
set -- $s
[ "$1" -le "$max" ] || exit 0
cat -- "$p""#;

/// Replaces `$1` with stdin atomically: checks the old file is still what was read
/// (`$5`: its SHA-256, `absent`, or `-` for no check), writes a temp file in the
/// same folder, checks its hash (`$4`), sets owner (`$3`, empty: keep) and mode
/// (`$2`), fsyncs, renames it over `$1` and fsyncs the folder. Prints the new mode,
/// uid and gid.
const WRITE_SCRIPT: &str = r#"dest=$1; mode=$2; own=$3; want=$4; was=$5
d=${dest%/*}; [ -n "$d" ] || d=/
[ -d "$d" ] || { printf 'the folder %s does not exist; create it first\n' "$d" >&2; exit 94; }
if [ -L "$dest" ] || { [ -e "$dest" ] && [ ! -f "$dest" ]; }; then
  printf '%s is not a regular file (any more)\n' "$dest" >&2; exit 93
fi
if [ "$was" != - ]; then
  if [ -e "$dest" ]; then cur=$(sha256sum < "$dest") || exit 92; cur=${cur%% *}; else cur=absent; fi
  [ "$cur" = "$was" ] || { printf '%s changed on the host since it was read; run the step again\n' "$dest" >&2; exit 95; }
fi
tmp=$(mktemp -- "$d/.patchbook.XXXXXXXXXX") || exit 91
if ! cat > "$tmp"; then rm -f -- "$tmp"; exit 91; fi
got=$(sha256sum < "$tmp"); got=${got%% *}
if [ "$got" != "$want" ]; then rm -f -- "$tmp"; printf 'the upload arrived as sha256 %s, not %s\n' "$got" "$want" >&2; exit 96; fi
if [ -n "$own" ] && ! chown -- "$own" "$tmp"; then rm -f -- "$tmp"; exit 90; fi
if ! chmod -- "$mode" "$tmp" || ! sync -- "$tmp"; then rm -f -- "$tmp"; exit 90; fi
if ! mv -f -- "$tmp" "$dest"; then rm -f -- "$tmp"; exit 90; fi
sync -- "$d"
stat -c '%a %u %g' -- "$dest""#;

/// Removes the regular file `$1` if it is still what was read (`$2`: its SHA-256,
/// or `-` for no check) and fsyncs its folder; a missing file is fine.
const REMOVE_SCRIPT: &str = r#"p=$1; was=$2
d=${p%/*}; [ -n "$d" ] || d=/
if [ -L "$p" ] || { [ -e "$p" ] && [ ! -f "$p" ]; }; then printf '%s is not a regular file\n' "$p" >&2; exit 93; fi
[ -e "$p" ] || exit 0
if [ "$was" != - ]; then
  cur=$(sha256sum < "$p") || exit 92; cur=${cur%% *}
  [ "$cur" = "$was" ] || { printf '%s changed on the host since it was read; run the step again\n' "$p" >&2; exit 95; }
fi
rm -f -- "$p" && sync -- "$d""#;

/// What [`read_state`] saw at a path.
enum Seen {
    Link(String),
    Special,
    NoFolder,
    Found(Found),
}

fn read_state(ctx: &HostCtx, step: &str, path: &str) -> Result<Seen, PrimitiveError> {
    let max = MAX_FILE.to_string();
    let cmd = Command::script(READ_SCRIPT, "patchbook-read", &[path, &max])
        .output_cap(MAX_FILE + 4096)
        .timeout(ctx.timeout(STEP_TIMEOUT));
    let out = ctx.transport.run(&cmd)?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            &format!("{step}: read {path}"),
            &out,
        ));
    }
    let (head, rest) = match memchr::memchr(b'\n', &out.stdout) {
        Some(i) => (&out.stdout[..i], &out.stdout[i + 1..]),
        None => (&out.stdout[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head).into_owned();
    let bad = |why: &str| {
        PrimitiveError::step(
            ctx.name(),
            step,
            format!(
                "reading {path} gave an answer it cannot use ({why}): {:?}",
                cut(&head, 200)
            ),
        )
    };
    let mut words = head.split(' ');
    match words.next() {
        Some("link") => {
            let target = String::from_utf8_lossy(rest);
            Ok(Seen::Link(
                target.strip_suffix('\n').unwrap_or(&target).to_string(),
            ))
        }
        Some("absent") => Ok(Seen::Found(Found::Absent)),
        Some("nofolder") => Ok(Seen::NoFolder),
        Some("special") => Ok(Seen::Special),
        Some("file") => {
            let f: Vec<&str> = words.collect();
            if f.len() != 6 {
                return Err(bad("expected size, mode, uid, gid, owner, group"));
            }
            let num =
                |s: &str, radix| u64::from_str_radix(s, radix).map_err(|_| bad("not a number"));
            let size = num(f[0], 10)?;
            if size > MAX_FILE as u64 {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    step,
                    format!(
                        "{path} is {size} bytes; file steps handle at most {MAX_FILE} bytes (use deploy or backup/restore for larger files)"
                    ),
                ));
            }
            if out.truncated || rest.len() as u64 != size {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    step,
                    format!(
                        "{path} changed while it was read ({} bytes read, {size} expected); run the step again",
                        rest.len()
                    ),
                ));
            }
            let id = |s: &str| u32::try_from(num(s, 10)?).map_err(|_| bad("id out of range"));
            Ok(Seen::Found(Found::File(HostFile {
                content: rest.to_vec(),
                mode: u32::try_from(num(f[1], 8)?).map_err(|_| bad("mode out of range"))?,
                uid: id(f[2])?,
                gid: id(f[3])?,
                owner: f[4].to_string(),
                group: f[5].to_string(),
            })))
        }
        _ => Err(bad("unknown kind")),
    }
}

/// The file a step works on and what is there: a link is refused unless `follow`,
/// when the file it points to is read instead; folders and special files always are.
pub fn read_target(
    ctx: &HostCtx,
    step: &str,
    path: &str,
    follow: bool,
) -> Result<(String, Found), PrimitiveError> {
    let mut path = path.to_string();
    let mut followed = false;
    loop {
        match read_state(ctx, step, &path)? {
            Seen::Found(f) => return Ok((path, f)),
            Seen::NoFolder => {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    step,
                    format!("the folder of {path} does not exist; create it first (file steps do not create folders)"),
                ))
            }
            Seen::Special => {
                return Err(refused(
                    &format!("{}: {step}", ctx.name()),
                    "path",
                    &path,
                    "it is not a regular file (a folder, device, socket or pipe); file steps change regular files only",
                ))
            }
            Seen::Link(target) if !follow || followed => {
                let reason = if followed {
                    "the link points to another link; give the final path".to_string()
                } else {
                    format!("it is a symbolic link to {target:?}; give #{{ follow: true }} to change the file it points to, or the real path")
                };
                return Err(refused(&format!("{}: {step}", ctx.name()), "path", &path, reason));
            }
            Seen::Link(_) => {
                let out = ctx.transport.run(
                    &Command::new(["readlink", "-e", "--", &path])
                        .timeout(ctx.timeout(STEP_TIMEOUT)),
                )?;
                if !out.success() {
                    return Err(PrimitiveError::step(
                        ctx.name(),
                        step,
                        format!("{path} is a link to nothing (its target does not exist); give the real path"),
                    ));
                }
                let real = out.stdout_str();
                let real = real.strip_suffix('\n').unwrap_or(&real).to_string();
                check_path(&format!("{}: {step}", ctx.name()), &real)?;
                path = real;
                followed = true;
            }
        }
    }
}

/// What a step wants a file to be.
#[derive(Debug, Clone)]
enum Want {
    Content {
        bytes: Vec<u8>,
        mode: Option<u32>,
        owner: Option<String>,
        group: Option<String>,
    },
    Gone,
}

/// What a step has to do to get from what is there to what it wants.
enum Action {
    Keep(String),
    Write {
        bytes: Vec<u8>,
        mode: u32,
        /// `chown` argument; `None` keeps the new file's owner (the connecting user).
        chown: Option<String>,
        meta: Vec<String>,
    },
    Remove,
}

fn decide(path: &str, found: &Found, want: Want) -> Action {
    match (want, found) {
        (Want::Gone, Found::Absent) => Action::Keep(format!("no change: {path} does not exist")),
        (Want::Gone, Found::File(_)) => Action::Remove,
        (
            Want::Content {
                bytes,
                mode,
                owner,
                group,
            },
            Found::Absent,
        ) => {
            let mode = mode.unwrap_or(DEFAULT_MODE);
            let mut meta = vec![format!("new file, mode {mode:04o}")];
            meta.extend(owner.iter().map(|o| format!("owner {o}")));
            meta.extend(group.iter().map(|g| format!("group {g}")));
            let chown = match (owner, group) {
                (None, None) => None,
                (Some(o), None) => Some(o),
                (None, Some(g)) => Some(format!(":{g}")),
                (Some(o), Some(g)) => Some(format!("{o}:{g}")),
            };
            Action::Write {
                bytes,
                mode,
                chown,
                meta,
            }
        }
        (
            Want::Content {
                bytes,
                mode,
                owner,
                group,
            },
            Found::File(f),
        ) => {
            let mode = mode.unwrap_or(f.mode);
            let is = |want: &Option<String>, name: &str, id: u32| {
                want.as_ref()
                    .is_none_or(|w| w == name || *w == id.to_string())
            };
            let owner_ok = is(&owner, &f.owner, f.uid);
            let group_ok = is(&group, &f.group, f.gid);
            if bytes == f.content && mode == f.mode && owner_ok && group_ok {
                return Action::Keep(format!(
                    "no change: {path} already has this content, mode and owner"
                ));
            }
            let mut meta = Vec::new();
            if mode != f.mode {
                meta.push(format!("mode {:04o} → {mode:04o}", f.mode));
            }
            if !owner_ok {
                meta.push(format!(
                    "owner {} → {}",
                    f.owner,
                    owner.as_deref().unwrap_or("")
                ));
            }
            if !group_ok {
                meta.push(format!(
                    "group {} → {}",
                    f.group,
                    group.as_deref().unwrap_or("")
                ));
            }
            if bytes == f.content {
                meta.push("content unchanged".into());
            }
            // Always chown: the temp file belongs to the connecting user, and an
            // unchanged owner must come back exactly, by number.
            let chown = format!(
                "{}:{}",
                owner.unwrap_or_else(|| f.uid.to_string()),
                group.unwrap_or_else(|| f.gid.to_string())
            );
            Action::Write {
                bytes,
                mode,
                chown: Some(chown),
                meta,
            }
        }
    }
}

/// A unified diff between two contents (either may be missing), or a line saying
/// how binary contents differ.
pub fn diff(path: &str, old: Option<&[u8]>, new: Option<&[u8]>) -> String {
    let (a, b) = (old.unwrap_or(b""), new.unwrap_or(b""));
    if a == b {
        return String::new();
    }
    match (std::str::from_utf8(a), std::str::from_utf8(b)) {
        (Ok(a), Ok(b)) => {
            let from = if old.is_some() { path } else { "/dev/null" };
            let to = if new.is_some() { path } else { "/dev/null" };
            similar::TextDiff::from_lines(a, b)
                .unified_diff()
                .context_radius(3)
                .header(from, to)
                .to_string()
        }
        _ => format!(
            "binary content: {} bytes (sha256 {}) → {} bytes (sha256 {})\n",
            a.len(),
            sha256_hex(a),
            b.len(),
            sha256_hex(b)
        ),
    }
}

/// The one path every file step takes: refuse a bad path, read the host, decide,
/// then say "no change", plan, or journal the intent with its undo, act, and
/// journal the outcome.
fn change_file(
    ctx: &HostCtx,
    step: &str,
    path: &str,
    follow: bool,
    redact: &[String],
    want: impl FnOnce(&Found) -> Result<Want, PrimitiveError>,
) -> Result<FileResult, PrimitiveError> {
    check_path(&format!("{}: {step}", ctx.name()), path)?;
    let (path, found) = read_target(ctx, step, path, follow)?;
    let action = decide(&path, &found, want(&found)?);
    let old = match &found {
        Found::File(f) => Some(f.content.as_slice()),
        Found::Absent => None,
    };
    let (verb, new, meta) = match &action {
        Action::Keep(reason) => {
            if ctx.planning() {
                ctx.plan_check(step, reason.clone(), "ok");
            } else {
                tracing::info!(target: "patchbook::files", host = %ctx.name(), step, path = %path, "{reason}");
                ctx.record(
                    step,
                    Entry::FileUnchanged(FileUnchanged {
                        step: step.to_string(),
                        path: path.clone(),
                    }),
                )?;
            }
            return Ok(FileResult {
                path,
                changed: false,
                planned: ctx.planning(),
                detail: reason.clone(),
            });
        }
        Action::Write { bytes, meta, .. } => ("write", Some(bytes.as_slice()), meta.join(", ")),
        Action::Remove => ("remove", None, String::new()),
    };
    if ctx.planning() {
        let meta = if meta.is_empty() {
            String::new()
        } else {
            format!(" ({meta})")
        };
        let detail = redact_str(
            &format!(
                "would {verb} {path}{meta}\n{}",
                cut(&diff(&path, old, new), DIFF_CHARS)
            ),
            redact,
        );
        let detail = detail.trim_end().to_string();
        ctx.plan(step, detail.clone(), "change");
        return Ok(FileResult {
            path,
            changed: true,
            planned: true,
            detail,
        });
    }
    if ctx.run.journal.is_none() {
        return Err(refused(
            &format!("{}: {step}", ctx.name()),
            "change of",
            &path,
            "it changes the host, and this evaluation keeps no journal; run it in a playbook or `patchbook exec`",
        ));
    }
    // The previous state is kept on the controller before the intent names it, so
    // the undo the intent carries can always be applied.
    let previous = match &found {
        Found::File(f) => Some(PreviousFile {
            sha256: keep_previous(&ctx.run.state_dir, &f.content)?,
            size: f.content.len() as u64,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
        }),
        Found::Absent => None,
    };
    let was = previous
        .as_ref()
        .map(|p| p.sha256.clone())
        .unwrap_or_else(|| "absent".into());
    let undo = UndoStep::File {
        path: path.clone(),
        previous,
    };
    let (input, cmd) = match &action {
        Action::Write {
            bytes, mode, chown, ..
        } => {
            let sha = sha256_hex(bytes);
            let mode_s = format!("{mode:04o}");
            let input = FileInput {
                path: path.clone(),
                action: "write".into(),
                sha256: Some(sha.clone()),
                size: Some(bytes.len()),
                mode: Some(mode_s.clone()),
                chown: chown.clone(),
                undo: undo.clone(),
            };
            let own = chown.clone().unwrap_or_default();
            let cmd = Command::script(
                WRITE_SCRIPT,
                "patchbook-write",
                &[&path, &mode_s, &own, &sha, &was],
            )
            .stdin(bytes.clone());
            (input, cmd)
        }
        _ => {
            let input = FileInput {
                path: path.clone(),
                action: "remove".into(),
                sha256: None,
                size: None,
                mode: None,
                chown: None,
                undo: undo.clone(),
            };
            (
                input,
                Command::script(REMOVE_SCRIPT, "patchbook-remove", &[&path, &was]),
            )
        }
    };
    let intent = ctx.intent(step, &input)?;
    let result = ctx
        .transport
        .run(&cmd.timeout(ctx.timeout(STEP_TIMEOUT)))
        .map_err(PrimitiveError::from)
        .and_then(|out| {
            if out.success() {
                Ok(out.stdout_str().trim().to_string())
            } else {
                Err(PrimitiveError::failed(
                    ctx.name(),
                    &format!("{step} {path}"),
                    &out,
                ))
            }
        });
    ctx.outcome(
        step,
        intent,
        result.is_ok(),
        &FileOutput {
            path: path.clone(),
            after: result.as_ref().ok().cloned(),
            error: result.as_ref().err().map(|e| e.to_string()),
        },
        Some(undo),
    )?;
    result?;
    let done = if verb == "write" {
        format!("wrote {path}")
    } else {
        format!("removed {path}")
    };
    tracing::info!(target: "patchbook::files", host = %ctx.name(), step, path = %path, "{done}");
    Ok(FileResult {
        path,
        changed: true,
        planned: false,
        detail: done,
    })
}

/// Puts `bytes` at `dest` with `opts`' mode, owner and group. Shared by
/// [`put_file`] and [`template`]; `step` names the step in the journal and plan.
pub fn put_content(
    ctx: &HostCtx,
    step: &str,
    bytes: Vec<u8>,
    dest: &str,
    opts: &FileOptions,
) -> Result<FileResult, PrimitiveError> {
    check_options(&format!("{}: {step}", ctx.name()), opts)?;
    if bytes.len() > MAX_FILE {
        return Err(refused(
            &format!("{}: {step}", ctx.name()),
            "content for",
            dest,
            format!(
                "it is {} bytes; files are at most {MAX_FILE} bytes",
                bytes.len()
            ),
        ));
    }
    change_file(ctx, step, dest, opts.follow, &opts.redact, |_| {
        Ok(Want::Content {
            bytes,
            mode: opts.mode,
            owner: opts.owner.clone(),
            group: opts.group.clone(),
        })
    })
}

/// `put_file` with an artifact from the controller's cache as the source.
pub fn put_file(
    ctx: &HostCtx,
    source: &Artifact,
    dest: &str,
    opts: &FileOptions,
) -> Result<FileResult, PrimitiveError> {
    let bytes = artifact_bytes(&format!("{}: put_file", ctx.name()), source)?;
    put_content(ctx, "put_file", bytes, dest, opts)
}

/// Renders `source` (named `name` in errors) with `vars` on the controller, then
/// puts the result at `dest`. A render error touches no host.
pub fn template(
    ctx: &HostCtx,
    name: &str,
    source: &str,
    vars: &serde_json::Value,
    dest: &str,
    opts: &FileOptions,
) -> Result<FileResult, PrimitiveError> {
    let bytes = render(name, source, vars)
        .map_err(|e| PrimitiveError::step(ctx.name(), "template", e.to_string()))?;
    put_content(ctx, "template", bytes, dest, opts)
}

fn compile_pattern(step: &str, what: &str, p: &str) -> Result<regex::bytes::Regex, PrimitiveError> {
    if p.len() > MAX_PATTERN {
        return Err(refused(
            step,
            what,
            p,
            format!("patterns are at most {MAX_PATTERN} bytes"),
        ));
    }
    regex::bytes::RegexBuilder::new(p)
        .size_limit(REGEX_SIZE)
        .dfa_size_limit(REGEX_SIZE)
        .build()
        .map_err(|e| {
            refused(
                step,
                what,
                p,
                format!("not a usable regular expression: {e}"),
            )
        })
}

fn compile_rule(step: &str, rule: &LineRule) -> Result<CompiledRule, PrimitiveError> {
    if let Some(l) = &rule.line {
        if l.contains(['\n', '\r', '\0']) || l.len() > MAX_PATTERN * 16 {
            return Err(refused(
                step,
                "line",
                l,
                "a line has no newline, carriage return or NUL and is at most 64 KiB",
            ));
        }
    }
    if rule.state == LineState::Present && rule.line.is_none() {
        return Err(refused(
            step,
            "state",
            "present",
            "state \"present\" needs `line`: the line the file must hold",
        ));
    }
    if rule.state == LineState::Absent && rule.line.is_none() && rule.regexp.is_none() {
        return Err(refused(
            step,
            "state",
            "absent",
            "state \"absent\" needs `regexp` or `line`: which lines to remove",
        ));
    }
    Ok(CompiledRule {
        regexp: rule
            .regexp
            .as_deref()
            .map(|p| compile_pattern(step, "regexp", p))
            .transpose()?,
        line: rule.line.as_ref().map(|l| l.as_bytes().to_vec()),
        state: rule.state,
        after: rule
            .after
            .as_deref()
            .map(|p| compile_pattern(step, "after", p))
            .transpose()?,
    })
}

/// Lines with their endings; the last may have none.
fn lines_of(c: &[u8]) -> Vec<&[u8]> {
    c.split_inclusive(|b| *b == b'\n').collect()
}

/// A line without its `\n` or `\r\n`.
fn body(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Ansible's lineinfile on bytes. Present: the last line matching `regexp` becomes
/// `line`; with no match, a file already holding `line` is left as it is, else
/// `line` goes after the last line matching `after`, or at the end. Absent: every
/// line matching `regexp` (or equal to `line`) goes.
fn edit_lines(content: &[u8], rule: &CompiledRule) -> Vec<u8> {
    let lines = lines_of(content);
    let matches = |l: &[u8]| match (&rule.regexp, &rule.line) {
        (Some(re), _) => re.is_match(body(l)),
        (None, Some(line)) => body(l) == line.as_slice(),
        (None, None) => false,
    };
    if rule.state == LineState::Absent {
        return lines
            .into_iter()
            .filter(|l| !matches(l))
            .flatten()
            .copied()
            .collect();
    }
    let line = rule.line.clone().unwrap_or_default();
    let mut out: Vec<u8> = Vec::with_capacity(content.len() + line.len() + 2);
    if let Some(i) = rule
        .regexp
        .as_ref()
        .and(lines.iter().rposition(|l| matches(l)))
    {
        for (k, l) in lines.iter().enumerate() {
            if k == i {
                out.extend_from_slice(&line);
                out.extend_from_slice(&l[body(l).len()..]);
            } else {
                out.extend_from_slice(l);
            }
        }
        return out;
    }
    if lines.iter().any(|l| body(l) == line.as_slice()) {
        return content.to_vec();
    }
    let at = rule
        .after
        .as_ref()
        .and_then(|re| lines.iter().rposition(|l| re.is_match(body(l))))
        .map(|i| i + 1)
        .unwrap_or(lines.len());
    for l in &lines[..at] {
        out.extend_from_slice(l);
    }
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(&line);
    out.push(b'\n');
    for l in &lines[at..] {
        out.extend_from_slice(l);
    }
    out
}

/// Makes sure a line is in a file (or lines are not), by Ansible's lineinfile
/// rules; the file must exist for `present`, and keeps its mode and owner.
pub fn line_in_file(
    ctx: &HostCtx,
    path: &str,
    rule: &LineRule,
) -> Result<FileResult, PrimitiveError> {
    let step = "line_in_file";
    let compiled = compile_rule(&format!("{}: {step}", ctx.name()), rule)?;
    let host = ctx.name().to_string();
    change_file(
        ctx,
        step,
        path,
        rule.follow,
        &rule.redact,
        |found| match found {
            Found::Absent if compiled.state == LineState::Absent => Ok(Want::Gone),
            Found::Absent => Err(PrimitiveError::step(
                &host,
                step,
                format!("{path} does not exist; create it with put_file or template first"),
            )),
            Found::File(f) => Ok(Want::Content {
                bytes: edit_lines(&f.content, &compiled),
                mode: None,
                owner: None,
                group: None,
            }),
        },
    )
}

/// Removes a regular file; a file that is not there is "no change".
pub fn remove_file(
    ctx: &HostCtx,
    path: &str,
    follow: bool,
    redact: &[String],
) -> Result<FileResult, PrimitiveError> {
    change_file(ctx, "remove_file", path, follow, redact, |_| Ok(Want::Gone))
}

/// How an undo step that restores a file reads in plans and reports.
pub fn describe_undo(path: &str, previous: Option<&PreviousFile>) -> String {
    match previous {
        None => format!("remove {path} (it did not exist before)"),
        Some(p) => format!(
            "restore {path} ({} bytes, sha256 {}, mode {:04o}, uid {} gid {})",
            p.size,
            &p.sha256[..p.sha256.len().min(12)],
            p.mode,
            p.uid,
            p.gid
        ),
    }
}

/// The undo of a file step: the previous bytes (from the controller's store, hash
/// checked), mode, uid and gid put back atomically, or the file removed when it
/// did not exist before. Checked afterwards against the host.
pub fn restore_file(
    ctx: &HostCtx,
    path: &str,
    previous: Option<&PreviousFile>,
) -> Result<(), PrimitiveError> {
    check_path(&format!("{}: rollback", ctx.name()), path)?;
    let Some(p) = previous else {
        let out = ctx.transport.run(
            &Command::script(REMOVE_SCRIPT, "patchbook-remove", &[path, "-"])
                .timeout(ctx.timeout(STEP_TIMEOUT)),
        )?;
        if !out.success() {
            return Err(PrimitiveError::failed(
                ctx.name(),
                &format!("rollback: remove {path}"),
                &out,
            ));
        }
        return Ok(());
    };
    let bytes = load_previous(&ctx.run.state_dir, &p.sha256)?;
    let mode = format!("{:04o}", p.mode);
    let own = format!("{}:{}", p.uid, p.gid);
    let out = ctx.transport.run(
        &Command::script(
            WRITE_SCRIPT,
            "patchbook-write",
            &[path, &mode, &own, &p.sha256, "-"],
        )
        .stdin(bytes)
        .timeout(ctx.timeout(STEP_TIMEOUT)),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            &format!("rollback: restore {path}"),
            &out,
        ));
    }
    let after = out.stdout_str();
    let want = format!("{:o} {} {}", p.mode, p.uid, p.gid);
    if after.trim() != want {
        return Err(PrimitiveError::step(
            ctx.name(),
            "rollback",
            format!(
                "{path} reads back as mode/uid/gid {:?}, expected {want:?}",
                after.trim()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        regexp: Option<&str>,
        line: Option<&str>,
        state: LineState,
        after: Option<&str>,
    ) -> CompiledRule {
        compile_rule(
            "t",
            &LineRule {
                regexp: regexp.map(String::from),
                line: line.map(String::from),
                state,
                after: after.map(String::from),
                follow: false,
                redact: Vec::new(),
            },
        )
        .unwrap()
    }

    fn edit(c: &str, r: &CompiledRule) -> String {
        String::from_utf8(edit_lines(c.as_bytes(), r)).unwrap()
    }

    #[test]
    fn present_replaces_the_last_match_keeping_its_line_ending() {
        let r = rule(
            Some("^port\\s*="),
            Some("port = 22"),
            LineState::Present,
            None,
        );
        assert_eq!(
            edit("port = 1\na\nport=2\r\nb\n", &r),
            "port = 1\na\nport = 22\r\nb\n"
        );
        assert_eq!(edit("a\nport = 2", &r), "a\nport = 22");
    }

    #[test]
    fn present_inserts_after_the_last_after_match_or_at_the_end() {
        let r = rule(
            Some("^port"),
            Some("port = 22"),
            LineState::Present,
            Some("^\\[main\\]"),
        );
        assert_eq!(
            edit("[main]\nx\n[main]\ny\n", &r),
            "[main]\nx\n[main]\nport = 22\ny\n"
        );
        assert_eq!(edit("a\nb", &r), "a\nb\nport = 22\n");
        assert_eq!(edit("", &r), "port = 22\n");
    }

    #[test]
    fn present_leaves_an_exact_line_alone() {
        let r = rule(Some("^nomatch"), Some("x = 1"), LineState::Present, None);
        assert_eq!(edit("x = 1\n", &r), "x = 1\n");
        let r = rule(None, Some("x = 1"), LineState::Present, None);
        assert_eq!(edit("a\nx = 1\nb\n", &r), "a\nx = 1\nb\n");
        assert_eq!(edit("a\n", &r), "a\nx = 1\n");
    }

    #[test]
    fn absent_removes_every_match() {
        let r = rule(Some("^#"), None, LineState::Absent, None);
        assert_eq!(edit("#a\nb\n#c\nd", &r), "b\nd");
        let r = rule(None, Some("b"), LineState::Absent, None);
        assert_eq!(edit("b\na\nb\n", &r), "a\n");
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad = |regexp: Option<&str>, line: Option<&str>, state| {
            compile_rule(
                "t",
                &LineRule {
                    regexp: regexp.map(String::from),
                    line: line.map(String::from),
                    state,
                    after: None,
                    follow: false,
                    redact: Vec::new(),
                },
            )
            .is_err()
        };
        assert!(bad(Some("("), Some("x"), LineState::Present));
        assert!(bad(None, None, LineState::Present));
        assert!(bad(None, None, LineState::Absent));
        assert!(bad(None, Some("a\nb"), LineState::Present));
        assert!(bad(
            Some(&"a".repeat(MAX_PATTERN + 1)),
            Some("x"),
            LineState::Present
        ));
        // Compiles to far more than the size limit.
        assert!(bad(
            Some("\\w{1000}\\w{1000}\\w{1000}"),
            Some("x"),
            LineState::Present
        ));
    }

    #[test]
    fn path_rules() {
        assert!(check_path("t", "/etc/acme/agent.conf").is_ok());
        for p in [
            "etc/x",
            "/",
            "/etc/",
            "/etc/../x",
            "/etc/./x",
            "/a\nb",
            "/-x",
            "/a;b",
            "/$(id)",
        ] {
            assert!(check_path("t", p).is_err(), "{p:?}");
        }
        assert!(check_account("t", "owner", "www-data").is_ok());
        assert!(check_account("t", "owner", "1000").is_ok());
        for a in ["", "-x", "a b", "root:root", "$(id)"] {
            assert!(check_account("t", "owner", a).is_err(), "{a:?}");
        }
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(
            parse_mode("644x").is_err() && parse_mode("99").is_err() && parse_mode("0888").is_err()
        );
    }

    #[test]
    fn templates_refuse_undefined_variables_and_includes() {
        let vars = serde_json::json!({ "port": 22 });
        assert_eq!(
            render("t", "port = {{ port }}\n", &vars).unwrap(),
            b"port = 22\n"
        );
        let e = render("t", "{{ nope }}", &vars).unwrap_err().to_string();
        assert!(e.contains("undefined"), "{e}");
        assert!(render("t", "{% include 'x' %}", &vars).is_err());
        assert!(render(
            "t",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &vars
        )
        .is_err());
    }

    #[test]
    fn diffs_are_unified() {
        let d = diff("/etc/x", Some(b"a\nb\n"), Some(b"a\nc\n"));
        assert!(
            d.contains("--- /etc/x") && d.contains("-b\n") && d.contains("+c\n"),
            "{d}"
        );
        let d = diff("/etc/x", None, Some(b"new\n"));
        assert!(d.contains("--- /dev/null") && d.contains("+new"), "{d}");
        assert!(diff("/x", Some(&[0xff, 0]), Some(b"a")).starts_with("binary content"));
    }

    #[test]
    fn controller_files_stay_inside_their_folders() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.conf"), "a").unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        let roots = vec![root.path().to_path_buf()];
        assert_eq!(controller_file("t", "a.conf", &roots).unwrap().1, b"a");
        let abs = root.path().join("a.conf").display().to_string();
        assert!(controller_file("t", &abs, &roots).is_ok());
        for bad in ["../x", "link", "missing"] {
            assert!(controller_file("t", bad, &roots).is_err(), "{bad}");
        }
        let out = outside.path().join("secret").display().to_string();
        assert!(controller_file("t", &out, &roots).is_err());
    }
}
