//! Deploy: upload an artifact, re-hash it on the host, install it with the host's
//! package manager, and record the version before and after together with the undo
//! step that reverses it. The undo step is decided before anything is installed, so
//! the rollback plan exists before the deployment does.

use std::collections::HashMap;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::artifact::Artifact;
use super::backup::private_tmpdir;
use super::facts::{facts, PackageManager};
use super::packages::{check_package, installed, parse_query, Installed};
use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{DeployInput, DeployOutput};
use crate::journal::UndoStep;

/// A step payload as the `Value` the journal's step API takes; these types have
/// no map with non-string keys, so this cannot fail.
use crate::transport::Command;

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

/// Longest a host waits for another host's reading of the package fields.
const FIELDS_WAIT: Duration = Duration::from_secs(30);

static FIELDS: LazyLock<FieldsCache> = LazyLock::new(|| FieldsCache {
    known: Mutex::new(HashMap::new()),
    settled: Condvar::new(),
});

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
) -> Result<(String, String, Option<Installed>), PrimitiveError> {
    let (known, claim) = match FIELDS.get_or_claim((artifact.sha256.clone(), pm.as_str())) {
        Ok(fields) => (Some(fields), None),
        Err(claim) => (None, Some(claim)),
    };
    let name_arg = known.as_ref().map(|(n, _)| n.as_str()).unwrap_or("");
    let cmd = Command::script(stage_script(pm), "patchbook-fields", &[file, name_arg]);
    let out = ctx
        .transport
        .run(&cmd.timeout(ctx.timeout(Duration::from_secs(60))))?;
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
    let query = match pm {
        PackageManager::Rpm => "rpm -q --qf '%{EPOCH}:%{VERSION}-%{RELEASE}\\n' -- \"$name\"",
        _ => "dpkg-query -W '-f=${db:Status-Abbrev}\\t${Version}\\n' -- \"$name\"",
    };
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

/// Exit code `checked_install` uses for a file changed after upload.
pub const CHANGED_AFTER_UPLOAD: i32 = 97;

pub fn deploy(
    ctx: &HostCtx,
    artifact: &Artifact,
    opts: &DeployOptions,
) -> Result<Deployed, PrimitiveError> {
    deploy_with_hook(ctx, artifact, opts, &|_| {})
}

/// [`deploy`], with a hook called between upload and install (tests use it to
/// tamper with the staged file).
pub fn deploy_with_hook(
    ctx: &HostCtx,
    artifact: &Artifact,
    opts: &DeployOptions,
    before_install: &dyn Fn(&str),
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
    let tmp = private_tmpdir(ctx, "deploy")?;
    let remote = format!("{tmp}/{file_name}");
    let (result, cleaned) = deploy_staged(ctx, pm, artifact, opts, &tmp, &remote, before_install);
    if cleaned {
        return result;
    }
    let _ = ctx
        .transport
        .run(&Command::new(["rm", "-rf", "--", &tmp]).timeout(Duration::from_secs(60)));
    result
}

/// The deploy after the staging folder exists. Also says whether the install
/// command already removed the folder.
fn deploy_staged(
    ctx: &HostCtx,
    pm: PackageManager,
    artifact: &Artifact,
    opts: &DeployOptions,
    dir: &str,
    remote: &str,
    before_install: &dyn Fn(&str),
) -> (Result<Deployed, PrimitiveError>, bool) {
    let prepared = ctx
        .transport
        .put_new(&artifact.path, remote, 0o600)
        .map_err(PrimitiveError::from)
        .and_then(|_| check_staged(ctx, pm, remote, artifact));
    let (package, version, before) = match prepared {
        Ok(p) => p,
        Err(e) => return (Err(e), false),
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
        &checked_install(pm, &artifact.sha256, remote, &package, dir, &install)
            .timeout(ctx.timeout(opts.timeout)),
    );
    let cleaned = out.is_ok();
    // Whatever happened, the host's real state is read back and recorded: from the
    // install command itself, or by asking again when it did not finish.
    let after = match &out {
        Ok(o) if o.code != CHANGED_AFTER_UPLOAD => {
            let text = o.stdout_str();
            text.rsplit_once(&format!("{AFTER}\n"))
                .and_then(|(_, q)| parse_query(pm, q))
                .map(|i| i.version)
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

/// The install's own output, without the package query appended after it.
fn without_after(o: &crate::transport::Output) -> crate::transport::Output {
    let mut o = o.clone();
    let text = o.stdout_str();
    if let Some((before, _)) = text.rsplit_once(&format!("\n{AFTER}\n")) {
        o.stdout = before.as_bytes().to_vec();
    }
    o
}

/// On a resumed run: the same artifact's deploy on this host, from the journal.
/// A completed one is returned as it was recorded, and the host is not touched
/// again, unless it has since been undone. An intent without an outcome (the controller died in between) is checked
/// on the host first: if the package is there at the intended version, the step is
/// completed in the journal; otherwise it is closed as not applied and deployed
/// again.
fn earlier_deploy(ctx: &HostCtx, artifact: &Artifact) -> Result<Option<Deployed>, PrimitiveError> {
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
}
