//! Deploy: upload an artifact, re-hash it on the host, install it with the host's
//! package manager, and record the version before and after together with the undo
//! step that reverses it. The undo step is decided before anything is installed, so
//! the rollback plan exists before the deployment does.

use std::collections::HashMap;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::artifact::Artifact;
use super::backup::{private_tmpdir, staging_dir_name};
use super::facts::{facts, PackageManager};
use super::packages::{
    check_package, check_version, installed, parse_query, query_seen, Installed,
};
use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{DeployInput, DeployOutput};
use crate::journal::UndoStep;

/// A step payload as the `Value` the journal's step API takes; these types have
/// no map with non-string keys, so this cannot fail.
use crate::transport::{Command, Output, INLINE_INPUT_MAX};

/// How a package file is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// The host's own: `dpkg -i` or `rpm -U`.
    Auto,
    Dpkg,
    Apt,
    Rpm,
    Dnf,
    /// An argv from the playbook; the word `{file}` is replaced by the staged path.
    Custom(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub method: Method,
    /// Reinstalled by the undo step, when given.
    pub rollback_to: Option<Artifact>,
    pub timeout: Duration,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            method: Method::Auto,
            rollback_to: None,
            timeout: Duration::from_secs(900),
        }
    }
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployed {
    pub package: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub undo: UndoStep,
}

/// Checks the staged file on the host and reads what the host has of its package
/// now, in one command: every process on the host costs. It prints the file's
/// SHA-256, then (only when `$2`, the package name, is empty) the package name and
/// version read from the file, then the installed package (nothing when it is not
/// installed: `rpm -q` would say so on stdout). The script is fixed;
/// the file and the name arrive as positional parameters.
fn stage_script(pm: PackageManager) -> &'static str {
    match pm {
        PackageManager::Rpm => {
            "f=$1; name=$2; nl='\n'; sha256sum <\"$f\" || exit 98; printf '__PB_FIELDS__\\n'; \
             if [ -z \"$name\" ]; then fields=$(rpm -qp --qf '%{NAME}\\n%{EPOCH}:%{VERSION}-%{RELEASE}' -- \"$f\") || exit 98; \
             printf '%s\\n' \"$fields\"; name=${fields%%\"$nl\"*}; fi; printf '__PB_BEFORE__\\n'; \
             out=$(rpm -q --qf '%{EPOCH}:%{VERSION}-%{RELEASE}\\n' -- \"$name\" 2>/dev/null) && printf '%s\\n' \"$out\"; exit 0"
        }
        _ => {
            "f=$1; name=$2; nl='\n'; sha256sum <\"$f\" || exit 98; printf '__PB_FIELDS__\\n'; \
             if [ -z \"$name\" ]; then fields=$(dpkg-deb '--showformat=${Package}\\n${Version}' -W -- \"$f\") || exit 98; \
             printf '%s\\n' \"$fields\"; name=${fields%%\"$nl\"*}; fi; printf '__PB_BEFORE__\\n'; \
             out=$(dpkg-query -W '-f=${db:Status-Abbrev}\\t${Version}\\n' -- \"$name\" 2>/dev/null) && printf '%s\\n' \"$out\"; exit 0"
        }
    }
}

/// [`stage_script`] for a file that arrives on the command's stdin: it first
/// creates the private staging folder `$3` (`mkdir` fails on anything already
/// there, [`NOT_STAGED`]) and writes the file into it, in the same command.
fn stage_inline_script(pm: PackageManager) -> String {
    format!(
        "umask 077; mkdir -m 700 -- \"$3\" || exit {NOT_STAGED}; cat >\"$1\" || exit {NOT_WRITTEN}; {}",
        stage_script(pm)
    )
}

/// Exit code of the inline scripts when the staging folder could not be created:
/// nothing of this run is on the host, and a folder there is not ours to remove.
const NOT_STAGED: i32 = 95;
/// Exit code of the inline scripts when the upload could not be written or arrived
/// with another hash: the staging folder is removed, nothing was installed.
const NOT_WRITTEN: i32 = 94;
/// Exit code of [`deploy_at_once`]'s script when the package is no longer as this
/// run last saw it (and as the intent recorded it): nothing was installed.
const STATE_CHANGED: i32 = 96;
/// Printed by that script, with [`STATE_CHANGED`], when the state differs: an
/// installer's own exit 96 never prints it.
const CHANGED_LINE: &str = "__PB_CHANGED__";
/// The line after which the at-once script prints the package as it was before.
const BEFORE: &str = "__PB_BEFORE__";

/// The package query in the install scripts, reading the package named `$name`.
fn query_line(pm: PackageManager) -> &'static str {
    match pm {
        PackageManager::Rpm => "rpm -q --qf '%{EPOCH}:%{VERSION}-%{RELEASE}\\n' -- \"$name\"",
        _ => "dpkg-query -W '-f=${db:Status-Abbrev}\\t${Version}\\n' -- \"$name\"",
    }
}

/// The whole deploy in ONE command, for a file that arrives on stdin: create the
/// staging folder, write the file, check its hash, check that the package is
/// still as `$5` says (the query's output this run saw, which the intent recorded
/// as the version before), and only then install, read the package back and
/// remove the folder. The script is fixed; data arrives as positional parameters.
///
/// With `$6` = `0` the package is read back only when the install failed: a
/// `dpkg -i` of the file that exits 0 has installed exactly the file's version,
/// the script prints [`AS_INSTALLED`] instead, and the host is spared one
/// `dpkg-query` (about 6 ms of host CPU on a 750-package database). `verify`
/// still asks the database on its own.
#[allow(clippy::too_many_arguments)]
fn at_once_command(
    pm: PackageManager,
    sha256: &str,
    file: &str,
    package: &str,
    dir: &str,
    seen: &str,
    read_back: bool,
    install: &[String],
) -> Command {
    let query = query_line(pm);
    let script = format!(
        "sha=$1; f=$2; name=$3; dir=$4; want=$5; back=$6; shift 6; umask 077; \
         mkdir -m 700 -- \"$dir\" || exit {NOT_STAGED}; \
         cat >\"$f\" || {{ rm -rf -- \"$dir\"; exit {NOT_WRITTEN}; }}; \
         h=$(sha256sum <\"$f\") && [ \"${{h%% *}}\" = \"$sha\" ] || \
         {{ echo \"patchbook: the upload to $f arrived as sha256 ${{h%% *}}, not $sha; not installed\" >&2; rm -rf -- \"$dir\"; exit {NOT_WRITTEN}; }}; \
         out=$({query} 2>/dev/null) || out=; printf '{BEFORE}\\n%s\\n' \"$out\"; \
         [ \"$out\" = \"$want\" ] || {{ printf '{CHANGED_LINE}\\n'; rm -rf -- \"$dir\"; exit {STATE_CHANGED}; }}; \
         \"$@\"; rc=$?; printf '\\n{AFTER}\\n'; \
         if [ $rc -eq 0 ] && [ \"$back\" = 0 ]; then printf '{AS_INSTALLED}\\n'; \
         else out=$({query} 2>/dev/null) && printf '%s\\n' \"$out\"; fi; \
         rm -rf -- \"$dir\"; exit $rc"
    );
    let back = if read_back { "1" } else { "0" };
    let mut args = vec![sha256, file, package, dir, seen, back];
    args.extend(install.iter().map(String::as_str));
    Command::script(&script, "patchbook-deploy", &args)
}

/// Package files' name and version, by SHA-256 and package manager. They are a
/// function of the file's bytes, which every host checks against that hash, so one
/// host reads them and the others are spared the `dpkg-deb`. Hosts that need them
/// while that reading runs wait for it (a fleet reaches this step all at once),
/// for at most [`FIELDS_WAIT`], and read them themselves if it fails.
struct FieldsCache {
    /// `None` while one host is reading them.
    known: Mutex<HashMap<FieldsKey, Option<(String, String)>>>,
    settled: Condvar,
}

type FieldsKey = (String, &'static str);
/// A package file's name and version.
type Fields = (String, String);

/// Longest a host waits for another host's reading of the package fields.
const FIELDS_WAIT: Duration = Duration::from_secs(30);

static FIELDS: LazyLock<FieldsCache> = LazyLock::new(|| FieldsCache {
    known: Mutex::new(HashMap::new()),
    settled: Condvar::new(),
});

/// The package file's name and version without asking a host: known from an
/// earlier host, or read once on the controller when it has the package manager's
/// tool (`dpkg-deb`, `rpm`). `None` when neither can say; a host then reads them.
fn known_fields(artifact: &Artifact, pm: PackageManager) -> Option<(String, String)> {
    let key = (artifact.sha256.clone(), pm.as_str());
    if let Some(Some(fields)) = FIELDS
        .known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return Some(fields.clone());
    }
    // One reading per file: hosts that need it meanwhile wait for that one.
    static READ_HERE: LazyLock<Mutex<HashMap<FieldsKey, Option<Fields>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut read = READ_HERE.lock().unwrap_or_else(|p| p.into_inner());
    read.entry(key)
        .or_insert_with(|| read_fields_here(artifact, pm))
        .clone()
}

/// Asks this machine's `dpkg-deb` or `rpm` for a package file's name and version.
fn read_fields_here(artifact: &Artifact, pm: PackageManager) -> Option<(String, String)> {
    let mut cmd = match pm {
        PackageManager::Rpm => {
            let mut c = std::process::Command::new("rpm");
            c.args([
                "-qp",
                "--qf",
                "%{NAME}\\n%{EPOCH}:%{VERSION}-%{RELEASE}",
                "--",
            ]);
            c
        }
        PackageManager::Dpkg => {
            let mut c = std::process::Command::new("dpkg-deb");
            c.args(["--showformat=${Package}\\n${Version}", "-W", "--"]);
            c
        }
        PackageManager::Unknown => return None,
    };
    let out = cmd
        .arg(&artifact.path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let name = lines.next()?.trim().to_string();
    let version = lines.next()?.trim();
    let version = version
        .strip_prefix("(none):")
        .unwrap_or(version)
        .to_string();
    check_package("deploy", pm, &name).ok()?;
    check_version("deploy", pm, &version).ok()?;
    Some((name, version))
}

/// The duty to read a package file's fields and publish them. Dropped without
/// [`FieldsClaim::publish`] (the reading failed), it lets a waiting host take over.
struct FieldsClaim {
    key: FieldsKey,
    /// False for a host that gave up waiting and reads without the claim.
    owner: bool,
}

impl FieldsCache {
    /// The fields when known, or a claim to read them.
    fn get_or_claim(&'static self, key: FieldsKey) -> Result<(String, String), FieldsClaim> {
        let deadline = std::time::Instant::now() + FIELDS_WAIT;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match known.get(&key) {
                Some(Some(fields)) => return Ok(fields.clone()),
                Some(None) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(FieldsClaim { key, owner: false });
                    }
                    known = self
                        .settled
                        .wait_timeout(known, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    known.insert(key.clone(), None);
                    return Err(FieldsClaim { key, owner: true });
                }
            }
        }
    }
}

impl FieldsClaim {
    fn publish(self, fields: (String, String)) {
        FIELDS
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.key.clone(), Some(fields));
        FIELDS.settled.notify_all();
    }
}

impl Drop for FieldsClaim {
    fn drop(&mut self) {
        let mut known = FIELDS.known.lock().unwrap_or_else(|p| p.into_inner());
        if self.owner && matches!(known.get(&self.key), Some(None)) {
            known.remove(&self.key);
            drop(known);
            FIELDS.settled.notify_all();
        }
    }
}

/// What the staged file hashes to on the host, its package name and version, and
/// the installed package before.
fn check_staged(
    ctx: &HostCtx,
    pm: PackageManager,
    file: &str,
    artifact: &Artifact,
    upload: Option<(&[u8], &str)>,
    exit: &mut Option<i32>,
) -> Result<(String, String, Option<Installed>), PrimitiveError> {
    let (known, claim) = match known_fields(artifact, pm) {
        Some(fields) => (Some(fields), None),
        None => match FIELDS.get_or_claim((artifact.sha256.clone(), pm.as_str())) {
            Ok(fields) => (Some(fields), None),
            Err(claim) => (None, Some(claim)),
        },
    };
    let name_arg = known.as_ref().map(|(n, _)| n.as_str()).unwrap_or("");
    let cmd = match upload {
        Some((bytes, dir)) => Command::script(
            &stage_inline_script(pm),
            "patchbook-stage",
            &[file, name_arg, dir],
        )
        .stdin(bytes.to_vec()),
        None => Command::script(stage_script(pm), "patchbook-fields", &[file, name_arg]),
    };
    let out = ctx
        .transport
        .run(&cmd.timeout(ctx.timeout(Duration::from_secs(60))))?;
    *exit = Some(out.code);
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            "deploy: check the staged file",
            &out,
        ));
    }
    let text = out.stdout_str();
    let (hash_line, rest) = text.split_once("__PB_FIELDS__\n").unwrap_or((&text, ""));
    let (fields, before) = rest.split_once("__PB_BEFORE__\n").unwrap_or((rest, ""));
    let found = hash_line.split_whitespace().next().unwrap_or_default();
    if found != artifact.sha256 {
        return Err(PrimitiveError::step(
            ctx.name(),
            "deploy",
            format!(
                "uploaded {file} hashes to {found} on the host, expected {}",
                artifact.sha256
            ),
        ));
    }
    let (name, version) = match known {
        Some(k) => k,
        None => {
            let mut lines = fields.lines();
            let name = lines.next().unwrap_or_default().trim().to_string();
            let version = lines.next().unwrap_or_default().trim();
            let version = version
                .strip_prefix("(none):")
                .unwrap_or(version)
                .to_string();
            check_package("deploy", pm, &name)?;
            if let Some(claim) = claim {
                claim.publish((name.clone(), version.clone()));
            }
            (name, version)
        }
    };
    Ok((name, version, parse_query(pm, before)))
}

fn install_argv(method: &Method, pm: PackageManager, file: &str) -> Vec<String> {
    let words: Vec<&str> = match (method, pm) {
        (Method::Custom(argv), _) => {
            return argv
                .iter()
                .map(|w| {
                    if w == "{file}" {
                        file.to_string()
                    } else {
                        w.clone()
                    }
                })
                .collect()
        }
        (Method::Dpkg, _)
        | (Method::Auto, PackageManager::Dpkg)
        | (Method::Auto, PackageManager::Unknown) => {
            vec!["dpkg", "-i", "--", file]
        }
        (Method::Apt, _) => vec!["apt-get", "install", "-y", "--allow-downgrades", file],
        // `--replacepkgs`: like `dpkg -i`, installing the version already there
        // reinstalls it; plain `rpm -U` refuses with "already installed".
        (Method::Rpm, _) | (Method::Auto, PackageManager::Rpm) => {
            vec!["rpm", "-U", "--oldpackage", "--replacepkgs", "--", file]
        }
        (Method::Dnf, _) => vec!["dnf", "install", "-y", file],
    };
    words.into_iter().map(str::to_string).collect()
}

/// Checks the staged file's hash, installs it, reads the package back and removes
/// the staging folder, in ONE command: nothing can change the file between the
/// on-host check and the install, and no further process is started on the host.
/// The script is fixed; data arrives as positional parameters, never spliced in.
fn checked_install(
    pm: PackageManager,
    sha256: &str,
    file: &str,
    package: &str,
    dir: &str,
    install: &[String],
) -> Command {
    let query = query_line(pm);
    let script = format!(
        "sha=$1; f=$2; name=$3; dir=$4; shift 4; \
         h=$(sha256sum <\"$f\") && [ \"${{h%% *}}\" = \"$sha\" ] || \
         {{ echo \"patchbook: $f changed on the host after upload (sha256 mismatch); not installed\" >&2; rm -rf -- \"$dir\"; exit {CHANGED_AFTER_UPLOAD}; }}; \
         \"$@\"; rc=$?; printf '\\n{AFTER}\\n'; out=$({query} 2>/dev/null) && printf '%s\\n' \"$out\"; \
         rm -rf -- \"$dir\"; exit $rc"
    );
    let mut args = vec![sha256, file, package, dir];
    args.extend(install.iter().map(String::as_str));
    Command::script(&script, "patchbook-install", &args)
}

/// The line after which `checked_install` prints the package as installed now.
const AFTER: &str = "__PB_AFTER__";
/// Printed after [`AFTER`] instead of a package query when the install of the
/// file succeeded and was not read back: the package is at the file's version.
const AS_INSTALLED: &str = "__PB_AS_INSTALLED__";

/// Exit code `checked_install` uses for a file changed after upload.
pub const CHANGED_AFTER_UPLOAD: i32 = 97;

pub fn deploy(
    ctx: &HostCtx,
    artifact: &Artifact,
    opts: &DeployOptions,
) -> Result<Deployed, PrimitiveError> {
    deploy_inner(ctx, artifact, opts, None)
}

/// [`deploy`], with a hook called between upload and install (tests use it to
/// tamper with the staged file). Upload and install are then always two commands.
pub fn deploy_with_hook(
    ctx: &HostCtx,
    artifact: &Artifact,
    opts: &DeployOptions,
    before_install: &dyn Fn(&str),
) -> Result<Deployed, PrimitiveError> {
    deploy_inner(ctx, artifact, opts, Some(before_install))
}

fn deploy_inner(
    ctx: &HostCtx,
    artifact: &Artifact,
    opts: &DeployOptions,
    before_install: Option<&dyn Fn(&str)>,
) -> Result<Deployed, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    let file_name = artifact
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".into());
    let install_words = install_argv(&opts.method, pm, "<staged file>");
    if ctx.planning() {
        ctx.plan(
            "deploy",
            format!(
                "upload {} (sha256 {}), then `{}`",
                artifact.url,
                &artifact.sha256,
                install_words.join(" ")
            ),
            "unknown",
        );
        return Ok(Deployed {
            package: String::new(),
            before: None,
            after: None,
            undo: UndoStep::Manual {
                reason: "plan".into(),
            },
        });
    }
    if let Some(done) = earlier_deploy(ctx, artifact)? {
        return Ok(done);
    }
    // A small file travels inside the command that uses it: no SFTP round trips.
    let inline = if artifact.bytes <= INLINE_INPUT_MAX as u64 {
        Some(artifact_bytes(ctx, artifact)?)
    } else {
        None
    };
    if let (Some(bytes), None) = (&inline, before_install) {
        if let Some(done) = deploy_at_once(ctx, pm, artifact, opts, bytes, &file_name)? {
            return Ok(done);
        }
    }
    let tmp = match inline {
        Some(_) => staging_dir_name(ctx),
        None => private_tmpdir(ctx, "deploy")?,
    };
    let remote = format!("{tmp}/{file_name}");
    let upload = inline.as_deref().map(|b| (b, tmp.as_str()));
    let hook: &dyn Fn(&str) = before_install.unwrap_or(&|_| {});
    let (result, cleaned) = deploy_staged(ctx, pm, artifact, opts, &remote, upload, hook);
    if cleaned {
        return result;
    }
    let _ = ctx
        .transport
        .run(&Command::new(["rm", "-rf", "--", &tmp]).timeout(Duration::from_secs(60)));
    result
}

/// The artifact's bytes, checked against its SHA-256 once more: the host checks
/// what it receives against that hash, so a file changed here fails there anyway,
/// but a clear error here says where.
fn artifact_bytes(ctx: &HostCtx, artifact: &Artifact) -> Result<Vec<u8>, PrimitiveError> {
    use sha2::Digest;
    let bytes = std::fs::read(&artifact.path).map_err(|e| {
        PrimitiveError::step(
            ctx.name(),
            "deploy",
            format!("cannot read {}: {e}", artifact.path.display()),
        )
    })?;
    let found = hex::encode(sha2::Sha256::digest(&bytes));
    if found != artifact.sha256 {
        return Err(PrimitiveError::step(
            ctx.name(),
            "deploy",
            format!(
                "{} changed on the controller since it was checked (sha256 {found}, expected {}); fetch it again",
                artifact.path.display(),
                artifact.sha256
            ),
        ));
    }
    Ok(bytes)
}

/// The deploy as one command ([`at_once_command`]), when everything the intent
/// must hold is known before the host is asked: the package's name and version
/// (from the file, read here or by an earlier host) and the version before (what
/// this run's last query of the package on this host printed). The intent, with
/// the undo step, is recorded first; the command then acts only if the package is
/// still as recorded. `None` when it cannot be used, or when the package had
/// changed (nothing was installed; that intent is closed as not applied): the
/// caller then deploys in two commands.
fn deploy_at_once(
    ctx: &HostCtx,
    pm: PackageManager,
    artifact: &Artifact,
    opts: &DeployOptions,
    bytes: &[u8],
    file_name: &str,
) -> Result<Option<Deployed>, PrimitiveError> {
    let Some((package, version)) = known_fields(artifact, pm) else {
        return Ok(None);
    };
    // Only dpkg's own `dpkg -i` of the file is known to leave exactly the file's
    // version installed when it exits 0; anything else is read back.
    let read_back = !matches!(
        (&opts.method, pm),
        (Method::Dpkg | Method::Auto, PackageManager::Dpkg)
    );
    let Some(seen) = ctx.run.package_seen(ctx.name(), &package) else {
        return Ok(None);
    };
    let before = parse_query(pm, &seen).map(|i| i.version);
    let undo = undo_for(ctx, &package, before.as_deref(), opts)?;
    let dir = staging_dir_name(ctx);
    let remote = format!("{dir}/{file_name}");
    let install = install_argv(&opts.method, pm, &remote);
    let input = DeployInput {
        artifact: artifact.url.clone(),
        sha256: artifact.sha256.clone(),
        package: package.clone(),
        from: before.clone(),
        to: version.clone(),
        argv: install.clone(),
        undo: Some(undo.clone()),
    };
    let intent = ctx.intent("deploy", &input)?;
    let out = ctx.transport.run(
        &at_once_command(
            pm,
            &artifact.sha256,
            &remote,
            &package,
            &dir,
            &seen,
            read_back,
            &install,
        )
        .stdin(bytes.to_vec())
        .timeout(ctx.timeout(opts.timeout)),
    );
    let ran = out.as_ref().is_ok_and(|o| o.stdout_str().contains(AFTER));
    if let (false, Ok(o)) = (ran, out.as_ref()) {
        let text = o.stdout_str();
        let now = text
            .split_once(&format!("{BEFORE}\n"))
            .and_then(|(_, rest)| rest.lines().next())
            .unwrap_or_default()
            .to_string();
        let changed = o.code == STATE_CHANGED && text.contains(CHANGED_LINE);
        let error = if changed {
            format!(
                "{package} changed on the host since this run read it ({:?}, now {:?}); nothing installed, deploying in two steps",
                seen, now
            )
        } else {
            format!(
                "not installed: the upload did not arrive ({}): {}",
                o.code,
                cut(o.stderr_str().trim(), 500)
            )
        };
        ctx.outcome(
            "deploy",
            intent,
            false,
            &DeployOutput {
                package: package.clone(),
                from: before.clone(),
                after: parse_query(pm, &now).map(|i| i.version),
                error: Some(error.clone()),
                resumed: None,
            },
            Some(undo),
        )?;
        if changed {
            ctx.run.saw_package(ctx.name(), &package, now);
            return Ok(None);
        }
        if o.code != NOT_STAGED {
            let _ = ctx
                .transport
                .run(&Command::new(["rm", "-rf", "--", &dir]).timeout(Duration::from_secs(60)));
        }
        return Err(PrimitiveError::step(ctx.name(), "deploy", error));
    }
    let installed_as = Installed {
        version,
        status: "ii".into(),
    };
    let (result, _) = finish(
        ctx,
        pm,
        &package,
        before,
        undo,
        intent,
        &remote,
        out,
        Some(&installed_as),
    );
    result.map(Some)
}

/// The deploy after the staging folder exists (or, with `upload`, the file and the
/// folder it is written to). Also says whether the install command already removed
/// the folder.
fn deploy_staged(
    ctx: &HostCtx,
    pm: PackageManager,
    artifact: &Artifact,
    opts: &DeployOptions,
    remote: &str,
    upload: Option<(&[u8], &str)>,
    before_install: &dyn Fn(&str),
) -> (Result<Deployed, PrimitiveError>, bool) {
    let mut exit = None;
    let prepared = match upload {
        Some(_) => check_staged(ctx, pm, remote, artifact, upload, &mut exit),
        None => ctx
            .transport
            .put_new(&artifact.path, remote, 0o600)
            .map_err(PrimitiveError::from)
            .and_then(|_| check_staged(ctx, pm, remote, artifact, None, &mut exit)),
    };
    let (package, version, before) = match prepared {
        Ok(p) => p,
        // A folder this command could not create is not ours to remove.
        Err(e) => return (Err(e), upload.is_some() && exit == Some(NOT_STAGED)),
    };
    let dir = match upload {
        Some((_, dir)) => dir.to_string(),
        None => remote
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default(),
    };
    let before = before.map(|i| i.version);
    let undo = match undo_for(ctx, &package, before.as_deref(), opts) {
        Ok(u) => u,
        Err(e) => return (Err(e), false),
    };
    let install = install_argv(&opts.method, pm, remote);
    let input = DeployInput {
        artifact: artifact.url.clone(),
        sha256: artifact.sha256.clone(),
        package: package.clone(),
        from: before.clone(),
        to: version.clone(),
        argv: install.clone(),
        undo: Some(undo.clone()),
    };
    let intent = match ctx.intent("deploy", &input) {
        Ok(i) => i,
        Err(e) => return (Err(e), false),
    };
    before_install(remote);
    let out = ctx.transport.run(
        &checked_install(pm, &artifact.sha256, remote, &package, &dir, &install)
            .timeout(ctx.timeout(opts.timeout)),
    );
    finish(ctx, pm, &package, before, undo, intent, remote, out, None)
}

/// Records how an install command ended and turns it into the step's result. Also
/// says whether the command removed the staging folder (it does when it ran).
#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &HostCtx,
    pm: PackageManager,
    package: &str,
    before: Option<String>,
    undo: UndoStep,
    intent: Option<crate::journal::StepId>,
    remote: &str,
    out: Result<Output, crate::transport::TransportError>,
    installed_as: Option<&Installed>,
) -> (Result<Deployed, PrimitiveError>, bool) {
    let package = package.to_string();
    let cleaned = out.is_ok();
    // Whatever happened, the host's real state is read back and recorded: from the
    // install command itself, or by asking again when it did not finish.
    let after = match &out {
        Ok(o) if o.code != CHANGED_AFTER_UPLOAD => {
            let text = o.stdout_str();
            let read = text.rsplit_once(&format!("{AFTER}\n")).map(|(_, q)| q);
            // Not read back: the install of the file succeeded, so the package
            // is what the file holds, as the query would print it.
            let as_installed = installed_as
                .filter(|_| read.is_some_and(|q| q.trim_end() == AS_INSTALLED))
                .map(|i| format!("{} \t{}", i.status, i.version));
            let read = as_installed.as_deref().or(read);
            if let Some(q) = read {
                ctx.run
                    .saw_package(ctx.name(), &package, query_seen(!q.is_empty(), q));
            }
            read.and_then(|q| parse_query(pm, q)).map(|i| i.version)
        }
        _ => installed(ctx, &package).ok().flatten().map(|i| i.version),
    };
    let (ok, error) = match &out {
        Ok(o) if o.success() => (true, None),
        Ok(o) if o.code == CHANGED_AFTER_UPLOAD => (
            false,
            Some(format!(
                "{remote} changed on the host after upload (sha256 mismatch); not installed"
            )),
        ),
        Ok(o) => (
            false,
            Some(PrimitiveError::failed(ctx.name(), "deploy", &without_after(o)).to_string()),
        ),
        Err(e) => (false, Some(e.to_string())),
    };
    if let Err(e) = ctx.outcome(
        "deploy",
        intent,
        ok,
        &DeployOutput {
            package: package.clone(),
            from: before.clone(),
            after: after.clone(),
            error,
            resumed: None,
        },
        Some(undo.clone()),
    ) {
        return (Err(e), cleaned);
    }
    let result = match out {
        Ok(o) if o.success() => Ok(Deployed {
            package,
            before,
            after,
            undo,
        }),
        Ok(o) if o.code == CHANGED_AFTER_UPLOAD => Err(PrimitiveError::step(
            ctx.name(),
            "deploy",
            format!(
                "{remote} changed on the host after upload (sha256 mismatch); not installed: {}",
                cut(o.stderr_str().trim(), 500)
            ),
        )),
        Ok(o) => Err(PrimitiveError::failed(
            ctx.name(),
            "deploy",
            &without_after(&o),
        )),
        Err(e) => Err(e.into()),
    };
    (result, cleaned)
}

/// The install's own output, without the package queries printed around it.
fn without_after(o: &Output) -> Output {
    let mut o = o.clone();
    let mut text = o.stdout_str();
    if let Some((_, rest)) = text.split_once(&format!("{BEFORE}\n")) {
        text = rest
            .split_once('\n')
            .map(|(_, r)| r)
            .unwrap_or("")
            .to_string();
    }
    if let Some((before, _)) = text.rsplit_once(&format!("\n{AFTER}\n")) {
        text = before.to_string();
    }
    o.stdout = text.into_bytes();
    o
}

/// On a resumed run: the same artifact's deploy on this host, from the journal.
/// A completed one is returned as it was recorded, and the host is not touched
/// again, unless it has since been undone. An intent without an outcome (the controller died in between) is checked
/// on the host first: if the package is there at the intended version, the step is
/// completed in the journal; otherwise it is closed as not applied and deployed
/// again.
fn earlier_deploy(ctx: &HostCtx, artifact: &Artifact) -> Result<Option<Deployed>, PrimitiveError> {
    // Every deploy intent holds its artifact's SHA-256 (hex, written as is): a host
    // whose records never mention it has no earlier deploy of it, and reading its
    // records back (a JSON parse of each, per host) is skipped on a first run.
    if ctx
        .run
        .journal
        .as_ref()
        .is_some_and(|j| !j.host_records_mention(ctx.name(), &artifact.sha256))
    {
        return Ok(None);
    }
    let Some(state) = ctx.journal_state()? else {
        return Ok(None);
    };
    // Steps whose undo has been applied (a rollback rehearsal, a rollback in
    // the same run): what they did is gone from the host.
    let undone: Vec<_> = state
        .steps
        .iter()
        .filter(|s| s.ok() == Some(true))
        .filter_map(|s| s.undoes)
        .collect();
    for step in state.steps.iter().rev() {
        // `deploy_input` is `None` for other steps and for undo steps.
        let Some(input) = step.intent_data.deploy_input() else {
            continue;
        };
        if input.sha256 != artifact.sha256 {
            continue;
        }
        if undone.contains(&step.id) {
            return Ok(None);
        }
        let package = input.package.clone();
        let before = input.from.clone();
        let undo = step.undo.clone().unwrap_or(UndoStep::Manual {
            reason: "no undo recorded".into(),
        });
        match (step.ok(), &step.outcome_data) {
            (Some(true), Some(outcome)) => {
                let after = outcome.deploy_output().and_then(|o| o.after);
                return Ok(Some(Deployed {
                    package,
                    before,
                    after,
                    undo,
                }));
            }
            (None, _) => {
                let to = input.to.clone();
                let now = installed(ctx, &package)?;
                let applied = now.as_ref().is_some_and(|i| i.healthy() && i.version == to);
                let after = now.map(|i| i.version);
                let note = if applied {
                    "verified on the host after a restart: the install had completed"
                } else {
                    "verified on the host after a restart: not applied; deploying again"
                };
                ctx.outcome(
                    "deploy",
                    Some(step.id),
                    applied,
                    &DeployOutput {
                        package: package.clone(),
                        from: before.clone(),
                        after: after.clone(),
                        error: None,
                        resumed: Some(note.to_string()),
                    },
                    Some(undo.clone()),
                )?;
                if applied {
                    return Ok(Some(Deployed {
                        package,
                        before,
                        after,
                        undo,
                    }));
                }
                return Ok(None);
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The undo step, decided before acting: reinstall `rollback_to` (and expect the
/// version that was there before), else restore this run's backups of the host,
/// else remove a package that was not there before, else manual.
fn undo_for(
    ctx: &HostCtx,
    package: &str,
    before: Option<&str>,
    opts: &DeployOptions,
) -> Result<UndoStep, PrimitiveError> {
    if let (Some(a), Some(before)) = (&opts.rollback_to, before) {
        return Ok(UndoStep::Reinstall {
            package: package.to_string(),
            version: before.to_string(),
            artifact_path: a.path.clone(),
            artifact_sha256: a.sha256.clone(),
        });
    }
    let backups = ctx.backups()?;
    if !backups.is_empty() {
        return Ok(UndoStep::Restore { backups });
    }
    if before.is_none() {
        return Ok(UndoStep::Remove {
            package: package.to_string(),
        });
    }
    Ok(UndoStep::Manual {
        reason: format!("{package} was at {} before; no rollback_to artifact and no backup of this host in this run", before.unwrap_or("?")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> FieldsKey {
        (format!("test-{name}"), "dpkg")
    }

    #[test]
    fn hosts_that_need_the_fields_meanwhile_wait_for_one_reading() {
        let Err(claim) = FIELDS.get_or_claim(key("wait")) else {
            panic!("the first host must be asked to read the fields");
        };
        let waiters: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| FIELDS.get_or_claim(key("wait")).ok()))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        claim.publish(("acme-agent".into(), "1.0.1".into()));
        for w in waiters {
            assert_eq!(
                w.join().unwrap(),
                Some(("acme-agent".to_string(), "1.0.1".to_string()))
            );
        }
    }

    #[test]
    fn a_failed_reading_hands_the_claim_to_a_waiting_host() {
        let Err(claim) = FIELDS.get_or_claim(key("fail")) else {
            panic!("the first host must be asked to read the fields");
        };
        let waiter = std::thread::spawn(|| FIELDS.get_or_claim(key("fail")).map(|_| ()));
        std::thread::sleep(Duration::from_millis(50));
        drop(claim);
        let next = waiter.join().unwrap();
        assert!(matches!(next, Err(FieldsClaim { owner: true, .. })));
    }

    /// Runs the at-once script with `sh`, the file on stdin, installing with `install`.
    fn at_once_here(read_back: bool, install: &[&str]) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        let file = stage.join("p.deb");
        let body = b"package bytes";
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
        let install: Vec<String> = install.iter().map(|w| w.to_string()).collect();
        // No such package here, so the query before prints nothing, as `seen` says.
        let cmd = at_once_command(
            PackageManager::Dpkg,
            &sha,
            &file.display().to_string(),
            "patchbook-test-no-such-package",
            &stage.display().to_string(),
            "",
            read_back,
            &install,
        );
        let mut child = std::process::Command::new(&cmd.argv[0])
            .args(&cmd.argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), body).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!stage.exists(), "the staging folder is removed");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn a_good_install_is_not_read_back_unless_asked_and_a_failed_one_always_is() {
        let (code, out) = at_once_here(false, &["true"]);
        assert_eq!(code, 0);
        assert!(
            out.ends_with(&format!("\n{AFTER}\n{AS_INSTALLED}\n")),
            "{out:?}"
        );
        // Asked to read back: the query's output (nothing: no such package here).
        let (code, out) = at_once_here(true, &["true"]);
        assert_eq!(code, 0);
        assert!(out.ends_with(&format!("\n{AFTER}\n")), "{out:?}");
        let (code, out) = at_once_here(false, &["false"]);
        assert_eq!(code, 1);
        assert!(out.ends_with(&format!("\n{AFTER}\n")), "{out:?}");
        assert!(!out.contains(AS_INSTALLED), "{out:?}");
    }
}
