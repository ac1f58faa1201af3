//! Repository upgrades: [`pending_updates`] (a probe: what the host's package
//! repositories offer above what is installed) and [`upgrade`] (a change: move named
//! packages to exact versions from the repositories, reversibly).
//!
//! It owns the reading of apt's simulation, `apt-cache policy`/`madison` and the
//! host's package cache, dnf's `check-update`/`updateinfo`, and the choice of where
//! an upgrade's undo reinstalls each previous version from. It must not install
//! anything it has not first resolved to an exact version and recorded, never runs a
//! bare `apt-get upgrade`, and never refreshes the host's package lists (that is the
//! site's own schedule, or an `exec` the playbook declares).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use super::facts::{facts, PackageManager};
use super::packages::{check_package, check_version, compare, parse_query, Installed};
use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::{Entry, UpgradeNoChange};
use crate::journal::{CachedPackage, PackageBefore, UndoStep};
use crate::transport::Command;

/// Where apt keeps the package files it downloaded.
pub const APT_CACHE: &str = "/var/cache/apt/archives";
/// How long reading the package lists may take (a simulation, a policy query).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One package the repositories offer a newer version of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingUpdate {
    pub package: String,
    pub installed: String,
    pub candidate: String,
    /// The releases offering the candidate, as the package manager names them
    /// (apt: `Label:Suite`; dnf: the repository id).
    pub origin: String,
    /// The candidate comes from a security archive or fixes a security advisory.
    pub security: bool,
}

/// Which version an upgrade moves each package to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The version apt would install now (`apt-cache policy`'s Candidate).
    Candidate,
    /// Exactly this version, which a repository must offer (a downgrade is allowed).
    Version(String),
}

#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    pub to: Target,
    /// Leave packages whose target is not from a security origin.
    pub security_only: bool,
    /// Upgrade even when a previous version could not be reinstalled; the undo is
    /// then a manual step.
    pub irreversible: bool,
    pub timeout: Duration,
}

impl Default for UpgradeOptions {
    fn default() -> Self {
        UpgradeOptions {
            to: Target::Candidate,
            security_only: false,
            irreversible: false,
            timeout: Duration::from_secs(900),
        }
    }
}

/// One package an upgrade changes (a dependency too): `before` or `after` is
/// `None` when it was absent before or is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    pub package: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub origin: String,
}

impl PackageChange {
    fn shown(&self) -> String {
        format!(
            "{} {} → {}",
            self.package,
            self.before.as_deref().unwrap_or("(absent)"),
            self.after.as_deref().unwrap_or("(removed)")
        )
    }
}

/// A requested package the upgrade leaves as it is, and why (journaled with an
/// `upgrade.no_change` record, so its type is the journal's).
pub use crate::journal::entry::Skipped;

/// The input of an `upgrade` step's intent: every package's move, the pinned argv
/// and the undo, recorded before apt runs.
#[derive(Serialize)]
struct UpgradeInput<'a> {
    packages: &'a [PackageChange],
    skipped: &'a [Skipped],
    argv: &'a [String],
    undo: &'a UndoStep,
}

/// The output of an `upgrade` step: each package's version read back afterwards.
#[derive(Serialize)]
struct UpgradeOutput<'a> {
    after: &'a BTreeMap<String, Option<String>>,
    error: &'a Option<String>,
}

/// What an upgrade did, or in `plan` would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upgraded {
    pub changed: Vec<PackageChange>,
    pub skipped: Vec<Skipped>,
    /// `None` when nothing changed.
    pub undo: Option<UndoStep>,
    pub planned: bool,
}

// ---------------------------------------------------------------------------
// Reading apt and dnf output (pure functions).

/// One `Inst`/`Remv` line of `apt-get -s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedStep {
    pub package: String,
    pub before: Option<String>,
    /// `None` for a removal.
    pub after: Option<String>,
    /// `Label:Suite` of the releases offering `after`, comma separated.
    pub release: String,
}

/// The `Inst` and `Remv` lines of an `apt-get -s` run (with `LC_ALL=C`); every
/// other line is apt talking.
pub fn parse_simulation(text: &str) -> Vec<SimulatedStep> {
    let mut steps = Vec::new();
    for line in text.lines() {
        let (removal, rest) = if let Some(r) = line.strip_prefix("Inst ") {
            (false, r)
        } else if let Some(r) = line.strip_prefix("Remv ") {
            (true, r)
        } else {
            continue;
        };
        let (package, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut before = None;
        if let Some(r) = rest.strip_prefix('[') {
            if let Some((v, r)) = r.split_once(']') {
                before = Some(v.to_string());
                rest = r.trim_start();
            }
        }
        if removal {
            steps.push(SimulatedStep {
                package: package.to_string(),
                before,
                after: None,
                release: String::new(),
            });
            continue;
        }
        // `(VERSION RELEASES [ARCH])`, possibly followed by `[]` markers.
        let Some(inner) = rest.strip_prefix('(') else {
            continue;
        };
        let Some(close) = inner.find(')') else {
            continue;
        };
        let inner = &inner[..close];
        let (version, rels) = inner.split_once(' ').unwrap_or((inner, ""));
        let rels = match rels.rfind(" [") {
            Some(i) => &rels[..i],
            None if rels.starts_with('[') => "",
            None => rels,
        };
        steps.push(SimulatedStep {
            package: package.to_string(),
            before,
            after: Some(version.to_string()),
            release: rels.trim().to_string(),
        });
    }
    steps
}

/// apt's "X is already the newest version (V)." lines: package → version.
pub fn parse_already_newest(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (pkg, rest) = l.split_once(" is already the newest version (")?;
            let v = rest.strip_suffix(").")?;
            Some((pkg.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// `apt-cache madison` lines: (package, version) pairs offered by a repository.
pub fn parse_madison(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split('|').map(str::trim);
            let pkg = parts.next()?;
            let ver = parts.next()?;
            parts.next()?;
            (!pkg.is_empty() && !ver.is_empty()).then(|| (pkg.to_string(), ver.to_string()))
        })
        .collect()
}

/// `Installed:` and `Candidate:` of a one-package `apt-cache policy`.
pub fn parse_policy(text: &str) -> (Option<String>, Option<String>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .filter(|v| v != "(none)" && !v.is_empty())
    };
    (field("Installed:"), field("Candidate:"))
}

/// Whether a release description names a security archive: Debian's
/// `bookworm-security` suite or `Debian-Security` label, Ubuntu's `jammy-security`.
pub fn is_security_release(release: &str) -> bool {
    release.to_ascii_lowercase().contains("security")
}

/// `dnf check-update` output: (name.arch, version, repository). Long names wrap
/// onto a line of their own; the "Obsoleting Packages" section is not an update.
pub fn parse_dnf_check_update(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut carried: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("Obsoleting Packages") {
            break;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let words: Vec<String> = match (carried.take(), words.as_slice()) {
            (Some(name), [v, repo]) => vec![name, v.to_string(), repo.to_string()],
            (_, [name]) if name.contains('.') && !line.starts_with(' ') => {
                carried = Some(name.to_string());
                continue;
            }
            (_, ws) => ws.iter().map(|w| w.to_string()).collect(),
        };
        if let [name, version, repo] = words.as_slice() {
            let plausible = name.contains('.')
                && version.chars().next().is_some_and(|c| c.is_ascii_digit())
                && !name.ends_with(':');
            if plausible {
                out.push((name.clone(), version.clone(), repo.clone()));
            }
        }
    }
    out
}

/// `dnf updateinfo list --security` output: the package names the advisories fix.
pub fn parse_dnf_security(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let [_, severity, nevra] = words.as_slice() else {
                return None;
            };
            if !severity.to_ascii_lowercase().contains("sec") {
                return None;
            }
            // name-[epoch:]version-release.arch
            let (nevr, _arch) = nevra.rsplit_once('.')?;
            let (nev, _release) = nevr.rsplit_once('-')?;
            let (name, _version) = nev.rsplit_once('-')?;
            Some(name.to_string())
        })
        .collect()
}

/// `rpm -qa --qf '%{NAME}.%{ARCH}\t%{EPOCH}:%{VERSION}-%{RELEASE}\n'` lines.
fn parse_rpm_installed(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (name, v) = l.split_once('\t')?;
            let v = v.trim();
            let v = v.strip_prefix("(none):").unwrap_or(v);
            Some((name.to_string(), v.to_string()))
        })
        .collect()
}

/// dnf writes the epoch only when it is not 0; rpm's query always does.
fn without_zero_epoch(v: &str) -> &str {
    v.strip_prefix("0:").unwrap_or(v)
}

// ---------------------------------------------------------------------------
// Commands.

fn words(ws: &[&str]) -> Vec<String> {
    ws.iter().map(|w| w.to_string()).collect()
}

/// The apt words every apt call starts with: the C locale so its output parses.
fn apt(program: &str) -> Vec<String> {
    words(&["env", "LC_ALL=C", program])
}

/// `apt-get -s …`: a simulation that writes nothing, not even apt's planner log
/// (`/var/log/apt/eipp.log.xz`, which apt 2 writes on every solver run).
fn apt_simulation() -> Vec<String> {
    let mut argv = apt("apt-get");
    argv.extend(words(&["-s", "-q", "-o", "Dir::Log::Planner=/dev/null"]));
    argv
}

fn run_read(ctx: &HostCtx, step: &str, cmd: Command) -> Result<String, PrimitiveError> {
    let out = ctx.transport.run(&cmd.timeout(ctx.timeout(READ_TIMEOUT)))?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), step, &out));
    }
    Ok(out.stdout_str())
}

/// The package name without a `:arch` qualifier.
fn base_name(pkg: &str) -> &str {
    pkg.split_once(':').map(|(n, _)| n).unwrap_or(pkg)
}

/// Refuses a package name from apt's output or the journal before it is used in a
/// command: apt prints `name[:arch]`.
fn check_apt_name(step: &str, pm: PackageManager, pkg: &str) -> Result<(), PrimitiveError> {
    check_package(step, pm, base_name(pkg))?;
    match pkg.split_once(':') {
        Some((_, arch))
            if arch.is_empty()
                || !arch
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Err(PrimitiveError::Refused {
                step: step.to_string(),
                what: "package name".into(),
                value: cut(pkg, 80),
                reason: "the architecture after ':' is not a plain word".into(),
            })
        }
        _ => Ok(()),
    }
}

/// Lists the upgradable packages: apt's `dist-upgrade` simulation (every package
/// with a newer candidate, even one that needs new dependencies), or dnf's
/// `check-update` and security advisories. Reads only; the package lists are used
/// as they are.
pub fn pending_updates(
    ctx: &HostCtx,
    security_only: bool,
) -> Result<Vec<PendingUpdate>, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    let mut list = match pm {
        PackageManager::Rpm => pending_dnf(ctx)?,
        _ => {
            let mut argv = apt_simulation();
            argv.push("dist-upgrade".into());
            let text = run_read(ctx, "pending_updates", Command::new(argv))?;
            parse_simulation(&text)
                .into_iter()
                .filter_map(|s| {
                    Some(PendingUpdate {
                        installed: s.before?,
                        candidate: s.after?,
                        security: is_security_release(&s.release),
                        origin: s.release,
                        package: s.package,
                    })
                })
                .collect()
        }
    };
    if security_only {
        list.retain(|u| u.security);
    }
    list.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(list)
}

/// dnf's view, in one command: updates, security advisories, installed versions.
fn pending_dnf(ctx: &HostCtx) -> Result<Vec<PendingUpdate>, PrimitiveError> {
    // check-update exits 100 when updates exist, 0 when none, 1 on error.
    let script = "dnf -q check-update; rc=$?; [ $rc = 0 ] || [ $rc = 100 ] || exit $rc; \
                  printf '__PB_SECURITY__\\n'; dnf -q updateinfo list --security 2>/dev/null; \
                  printf '__PB_INSTALLED__\\n'; \
                  rpm -qa --qf '%{NAME}.%{ARCH}\\t%{EPOCH}:%{VERSION}-%{RELEASE}\\n'";
    let text = run_read(
        ctx,
        "pending_updates",
        Command::script(script, "patchbook-pending", &[]),
    )?;
    let (updates, rest) = text.split_once("__PB_SECURITY__\n").unwrap_or((&text, ""));
    let (security, installed) = rest.split_once("__PB_INSTALLED__\n").unwrap_or((rest, ""));
    let security = parse_dnf_security(security);
    let installed = parse_rpm_installed(installed);
    Ok(parse_dnf_check_update(updates)
        .into_iter()
        .map(|(name_arch, candidate, repo)| {
            let name = name_arch
                .rsplit_once('.')
                .map(|(n, _)| n)
                .unwrap_or(&name_arch)
                .to_string();
            PendingUpdate {
                installed: installed
                    .get(&name_arch)
                    .map(|v| without_zero_epoch(v).to_string())
                    .unwrap_or_default(),
                security: security.contains(&name) || is_security_release(&repo),
                candidate,
                origin: repo,
                package: name,
            }
        })
        .collect())
}

/// True when the host has `pkg` installed and its repositories offer a newer
/// version (what `needing(pkg, "candidate")` asks).
pub fn candidate_newer(ctx: &HostCtx, pkg: &str) -> Result<bool, PrimitiveError> {
    let pm = facts(ctx)?.package_manager;
    check_package("needing", pm, pkg)?;
    match pm {
        PackageManager::Rpm => Ok(pending_dnf(ctx)?.iter().any(|u| u.package == pkg)),
        _ => {
            let mut argv = apt("apt-cache");
            argv.extend(words(&["policy", "--", pkg]));
            let text = run_read(ctx, "needing", Command::new(argv))?;
            Ok(match parse_policy(&text) {
                (Some(i), Some(c)) => compare(pm, &c, &i) == std::cmp::Ordering::Greater,
                _ => false,
            })
        }
    }
}

/// `apt-get -s install` of `args`; its output, or apt's own error.
fn simulate(ctx: &HostCtx, args: &[String]) -> Result<String, PrimitiveError> {
    let mut argv = apt_simulation();
    argv.extend(words(&["--allow-downgrades", "install", "--"]));
    argv.extend(args.iter().cloned());
    run_read(ctx, "upgrade: resolve versions", Command::new(argv))
}

/// What the host can reinstall each previous version from: the versions its
/// repositories offer, and the package files in its cache (checked by reading the
/// file's own fields), in one command.
fn obtainable(ctx: &HostCtx, names: &[&str]) -> Result<Obtainable, PrimitiveError> {
    // Package names are checked before they get here, so `"$p"_*.deb` globs only
    // inside the cache.
    let script = format!(
        "LC_ALL=C apt-cache madison -- \"$@\" 2>/dev/null; printf '__PB_CACHE__\\n'; \
         for p; do p=${{p%%:*}}; for f in {APT_CACHE}/\"$p\"_*.deb; do [ -f \"$f\" ] || continue; \
         s=$(sha256sum < \"$f\") || continue; \
         fv=$(dpkg-deb -W '--showformat=${{Package}}\\t${{Version}}' -- \"$f\" 2>/dev/null) || continue; \
         printf '%s\\t%s\\t%s\\n' \"${{s%% *}}\" \"$fv\" \"$f\"; done; done; exit 0"
    );
    let text = run_read(
        ctx,
        "upgrade: find previous versions",
        Command::script(&script, "patchbook-obtainable", names),
    )?;
    let (madison, cache) = text.split_once("__PB_CACHE__\n").unwrap_or((&text, ""));
    let cached = cache
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, '\t');
            Some(CachedFile {
                sha256: f.next()?.to_string(),
                package: f.next()?.to_string(),
                version: f.next()?.to_string(),
                path: f.next()?.to_string(),
            })
        })
        .filter(|c| !c.path.chars().any(char::is_control) && c.path.starts_with(APT_CACHE))
        .collect();
    Ok((parse_madison(madison), cached))
}

/// (package, version) pairs the repositories offer, and the cache's package files.
type Obtainable = (Vec<(String, String)>, Vec<CachedFile>);

#[derive(Debug, Clone)]
struct CachedFile {
    package: String,
    version: String,
    sha256: String,
    path: String,
}

/// The installed state of `names`, in one `dpkg-query`.
fn installed_many(
    ctx: &HostCtx,
    step: &str,
    names: &[&str],
) -> Result<HashMap<String, Installed>, PrimitiveError> {
    let mut argv = words(&[
        "dpkg-query",
        "-W",
        "-f=${Package}\\t${db:Status-Abbrev}\\t${Version}\\n",
        "--",
    ]);
    argv.extend(names.iter().map(|n| base_name(n).to_string()));
    // Exit 1 when a name is unknown; the known ones are still printed.
    let out = ctx
        .transport
        .run(&Command::new(argv).timeout(ctx.timeout(READ_TIMEOUT)))?;
    if out.code > 1 {
        return Err(PrimitiveError::failed(ctx.name(), step, &out));
    }
    Ok(out
        .stdout_str()
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once('\t')?;
            Some((name.to_string(), parse_query(PackageManager::Dpkg, rest)?))
        })
        .collect())
}

/// The argv that installs exactly `pinned` (`pkg=version` words).
fn install_argv(pinned: &[String], purge: bool) -> Vec<String> {
    let mut argv = words(&[
        "env",
        "LC_ALL=C",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--allow-downgrades",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]);
    if purge {
        argv.push("--purge".into());
    }
    argv.push("--".into());
    argv.extend(pinned.iter().cloned());
    argv
}

// ---------------------------------------------------------------------------
// The change.

/// Moves `packages` to exact versions from the host's repositories. It resolves
/// every version first (apt's simulation, dependencies included), finds where each
/// previous version could be reinstalled from, refuses when one could not (unless
/// `irreversible`), writes the intent with the undo, installs the pinned versions
/// only, and reads every package back. Packages already at their target, not
/// installed, or (with `security_only`) offered only by a non-security release are
/// skipped; when nothing is left, nothing is written anywhere but a note.
pub fn upgrade(
    ctx: &HostCtx,
    packages: &[String],
    opts: &UpgradeOptions,
) -> Result<Upgraded, PrimitiveError> {
    let step = "upgrade";
    let pm = facts(ctx)?.package_manager;
    if pm == PackageManager::Rpm {
        return Err(PrimitiveError::step(
            ctx.name(),
            step,
            "repository upgrades are implemented for apt hosts only; on rpm hosts deploy a pinned package file with deploy(host, artifact, #{ rollback_to })",
        ));
    }
    if packages.is_empty() {
        return Err(PrimitiveError::step(
            ctx.name(),
            step,
            "no packages given; name them, e.g. upgrade(host, [\"openssl\"], #{ to: \"candidate\" })",
        ));
    }
    let mut requested: Vec<&str> = Vec::new();
    for p in packages {
        check_apt_name(step, pm, p)?;
        if !requested.contains(&p.as_str()) {
            requested.push(p);
        }
    }
    if let Target::Version(v) = &opts.to {
        check_version(step, pm, v)?;
    }
    let pin = |p: &str, v: &str| format!("{p}={v}");
    let first: Vec<String> = match &opts.to {
        Target::Candidate => requested.iter().map(|p| p.to_string()).collect(),
        Target::Version(v) => requested.iter().map(|p| pin(p, v)).collect(),
    };
    let text = simulate(ctx, &first)?;
    let mut sim = parse_simulation(&text);
    let newest = parse_already_newest(&text);

    let mut keep: Vec<(&str, String)> = Vec::new();
    let mut skipped = Vec::new();
    for p in &requested {
        let line = sim.iter().find(|s| s.package == *p && s.after.is_some());
        let reason = match line {
            None => Some(match newest.get(*p) {
                Some(v) => format!("no change: {p} is at {v}, the target"),
                None => format!("no change: {p} is already at the target"),
            }),
            Some(s) if s.before.is_none() => Some(format!(
                "not installed; upgrade installs nothing new ({p} {} is offered)",
                s.after.as_deref().unwrap_or("?")
            )),
            Some(s) if opts.security_only && !is_security_release(&s.release) => Some(format!(
                "{p} {} comes from {}, not a security origin (security_only)",
                s.after.as_deref().unwrap_or("?"),
                if s.release.is_empty() {
                    "an unnamed release"
                } else {
                    &s.release
                }
            )),
            Some(s) => {
                keep.push((p, s.after.clone().unwrap_or_default()));
                None
            }
        };
        if let Some(reason) = reason {
            skipped.push(Skipped {
                package: p.to_string(),
                reason,
            });
        }
    }
    let pinned: Vec<String> = keep.iter().map(|(p, v)| pin(p, v)).collect();
    let with_inst = requested
        .iter()
        .filter(|p| sim.iter().any(|s| s.package == **p && s.after.is_some()))
        .count();
    if !keep.is_empty() && keep.len() < with_inst {
        // What was left out may have pulled in dependencies: resolve the rest alone.
        sim = parse_simulation(&simulate(ctx, &pinned)?);
    }

    if keep.is_empty() {
        let summary = skipped
            .iter()
            .map(|s| s.reason.clone())
            .collect::<Vec<_>>()
            .join("; ");
        if ctx.planning() {
            ctx.plan_check(step, format!("no change: {summary}"), "ok");
        } else {
            ctx.record(
                step,
                Entry::UpgradeNoChange(UpgradeNoChange {
                    skipped: skipped.clone(),
                }),
            )?;
        }
        return Ok(Upgraded {
            changed: Vec::new(),
            skipped,
            undo: None,
            planned: ctx.planning(),
        });
    }

    let changed: Vec<PackageChange> = sim
        .iter()
        .map(|s| PackageChange {
            package: s.package.clone(),
            before: s.before.clone(),
            after: s.after.clone(),
            origin: s.release.clone(),
        })
        .collect();
    for c in &changed {
        check_apt_name(step, pm, &c.package)?;
        for v in [&c.before, &c.after].into_iter().flatten() {
            check_version(step, pm, v)?;
        }
    }
    let undo = undo_for(ctx, pm, &changed, opts.irreversible)?;
    let shown = changed
        .iter()
        .map(|c| {
            if c.origin.is_empty() {
                c.shown()
            } else {
                format!("{} ({})", c.shown(), c.origin)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    if ctx.planning() {
        for s in &skipped {
            ctx.plan_check(step, s.reason.clone(), "ok");
        }
        ctx.plan(
            step,
            format!("{shown}; undo: {}", super::undo::describe(&undo)),
            "unknown",
        );
        return Ok(Upgraded {
            changed,
            skipped,
            undo: Some(undo),
            planned: true,
        });
    }
    if ctx.run.journal.is_none() {
        return Err(PrimitiveError::Refused {
            step: format!("{}: {step}", ctx.name()),
            what: "upgrade".into(),
            value: cut(&shown, 200),
            reason: "it changes the host, and this evaluation keeps no journal; run it from a playbook or `patchbook exec`".into(),
        });
    }

    let argv = install_argv(&pinned, false);
    let intent = ctx.intent(
        step,
        &UpgradeInput {
            packages: &changed,
            skipped: &skipped,
            argv: &argv,
            undo: &undo,
        },
    )?;
    let out = ctx
        .transport
        .run(&Command::new(argv.clone()).timeout(ctx.timeout(opts.timeout)));
    // Whatever apt said, the host's real state is read back and recorded.
    let names: Vec<&str> = changed.iter().map(|c| c.package.as_str()).collect();
    let now = installed_many(ctx, step, &names);
    let after: BTreeMap<String, Option<String>> = match &now {
        Ok(now) => changed
            .iter()
            .map(|c| {
                let v = now
                    .get(base_name(&c.package))
                    .filter(|i| i.healthy())
                    .map(|i| i.version.clone());
                (c.package.clone(), v)
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let mismatched: Vec<String> = changed
        .iter()
        .filter(|c| after.get(&c.package) != Some(&c.after))
        .map(|c| {
            format!(
                "{} is {}, expected {}",
                c.package,
                after
                    .get(&c.package)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "not installed".into()),
                c.after.as_deref().unwrap_or("removed")
            )
        })
        .collect();
    let error = match (&out, &now) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(o), _) if !o.success() => Some(PrimitiveError::failed(ctx.name(), step, o).to_string()),
        (_, Err(e)) => Some(format!("cannot read the packages back: {e}")),
        _ if !mismatched.is_empty() => {
            Some(format!("apt-get succeeded but {}", mismatched.join(", ")))
        }
        _ => None,
    };
    ctx.outcome(
        step,
        intent,
        error.is_none(),
        &UpgradeOutput {
            after: &after,
            error: &error,
        },
        Some(undo.clone()),
    )?;
    match (out, error) {
        (Err(e), _) => Err(e.into()),
        (Ok(o), Some(_)) if !o.success() => Err(PrimitiveError::failed(ctx.name(), step, &o)),
        (Ok(_), Some(e)) => Err(PrimitiveError::step(ctx.name(), step, e)),
        (Ok(_), None) => Ok(Upgraded {
            changed,
            skipped,
            undo: Some(undo),
            planned: false,
        }),
    }
}

/// The undo of an upgrade, decided before it acts: every previous version from
/// the repository if it still offers it, else from the host's package cache; new
/// packages purged. A previous version that neither has refuses the upgrade, or
/// with `irreversible` makes the undo a manual step that says why.
fn undo_for(
    ctx: &HostCtx,
    pm: PackageManager,
    changed: &[PackageChange],
    irreversible: bool,
) -> Result<UndoStep, PrimitiveError> {
    let names: Vec<&str> = changed
        .iter()
        .filter(|c| c.before.is_some())
        .map(|c| c.package.as_str())
        .collect();
    let (offered, cached) = if names.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        obtainable(ctx, &names)?
    };
    let mut versions = Vec::new();
    let mut lost = Vec::new();
    for c in changed {
        let Some(before) = &c.before else {
            versions.push(PackageBefore {
                package: c.package.clone(),
                version: None,
                cached: None,
            });
            continue;
        };
        let same = |p: &str, v: &str| {
            base_name(p) == base_name(&c.package) && compare(pm, v, before).is_eq()
        };
        if offered.iter().any(|(p, v)| same(p, v)) {
            versions.push(PackageBefore {
                package: c.package.clone(),
                version: Some(before.clone()),
                cached: None,
            });
        } else if let Some(f) = cached.iter().find(|f| same(&f.package, &f.version)) {
            versions.push(PackageBefore {
                package: c.package.clone(),
                version: Some(before.clone()),
                cached: Some(CachedPackage {
                    path: f.path.clone(),
                    sha256: f.sha256.clone(),
                }),
            });
        } else {
            lost.push(format!("{} {before}", c.package));
        }
    }
    if lost.is_empty() {
        return Ok(UndoStep::Packages { versions });
    }
    let why = format!(
        "{} cannot be reinstalled: no repository of the host offers it any more and {APT_CACHE} holds no copy",
        lost.join(", ")
    );
    if irreversible {
        return Ok(UndoStep::Manual {
            reason: format!(
                "upgrade marked irreversible: {why}; reinstall the previous version by hand"
            ),
        });
    }
    Err(PrimitiveError::step(
        ctx.name(),
        "upgrade",
        format!(
            "refused before changing anything: {why}, so this upgrade could not be undone. \
             Put that version back in the repository or the host's package cache, or pass \
             #{{ irreversible: true }} to upgrade without a way back"
        ),
    ))
}

/// Short text of an undo's package list, for [`super::undo::describe`].
pub fn describe_versions(versions: &[PackageBefore]) -> String {
    versions
        .iter()
        .map(|v| match (&v.version, &v.cached) {
            (None, _) => format!("purge {}", v.package),
            (Some(ver), None) => format!("reinstall {} {ver}", v.package),
            (Some(ver), Some(c)) => format!("reinstall {} {ver} from {}", v.package, c.path),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies an upgrade's undo: checks every cached file's SHA-256 on the host,
/// installs the previous versions (and purges what was new) in one apt-get, then
/// reads each package back.
pub fn restore_versions(ctx: &HostCtx, versions: &[PackageBefore]) -> Result<(), PrimitiveError> {
    let step = "rollback";
    let pm = facts(ctx)?.package_manager;
    let mut args = Vec::new();
    let mut cached = Vec::new();
    let mut purge = false;
    for v in versions {
        check_apt_name(step, pm, &v.package)?;
        match (&v.version, &v.cached) {
            (None, _) => {
                purge = true;
                args.push(format!("{}-", v.package));
            }
            (Some(ver), c) => {
                check_version(step, pm, ver)?;
                match c {
                    Some(c) => {
                        if !c.path.starts_with(&format!("{APT_CACHE}/"))
                            || c.path.chars().any(char::is_control)
                            || c.path.contains("/../")
                        {
                            return Err(PrimitiveError::Refused {
                                step: step.into(),
                                what: "cached package path".into(),
                                value: cut(&c.path, 200),
                                reason: format!("undo files are taken only from {APT_CACHE}"),
                            });
                        }
                        cached.push(c);
                        args.push(c.path.clone());
                    }
                    None => args.push(format!("{}={ver}", v.package)),
                }
            }
        }
    }
    if !cached.is_empty() {
        let mut argv = words(&["sha256sum", "--"]);
        argv.extend(cached.iter().map(|c| c.path.clone()));
        let text = run_read(ctx, "rollback: check cached packages", Command::new(argv))?;
        for c in &cached {
            let ok = text.lines().any(|l| {
                l.split_once("  ")
                    .is_some_and(|(h, p)| h == c.sha256 && p == c.path)
            });
            if !ok {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    step,
                    format!(
                        "{} no longer hashes to {} as when the upgrade recorded it; not installed. Reinstall that version by hand",
                        c.path, c.sha256
                    ),
                ));
            }
        }
    }
    let out = ctx.transport.run(
        &Command::new(install_argv(&args, purge)).timeout(ctx.timeout(Duration::from_secs(900))),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), step, &out));
    }
    let names: Vec<&str> = versions.iter().map(|v| v.package.as_str()).collect();
    let now = installed_many(ctx, step, &names)?;
    let wrong: Vec<String> = versions
        .iter()
        .filter_map(|v| {
            let found = now
                .get(base_name(&v.package))
                .filter(|i| i.healthy())
                .map(|i| i.version.clone());
            (found != v.version).then(|| {
                format!(
                    "{} is {}, expected {}",
                    v.package,
                    found.unwrap_or_else(|| "not installed".into()),
                    v.version.as_deref().unwrap_or("absent")
                )
            })
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(PrimitiveError::step(
            ctx.name(),
            step,
            format!("after reinstalling: {}", wrong.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lines_give_before_after_and_release() {
        let text = "NOTE: This is only a simulation!\n\
            Inst acme-agent [1.0.0] (1.0.1 Debian-Security:bookworm-security [all])\n\
            Inst libfoo2 (2.1-1 Debian:12.5/stable, Debian-Security:12/stable-security [amd64]) []\n\
            Inst libc6:i386 [2.36-9] (2.36-9+deb12u4 Debian-Security:12/stable-security [i386])\n\
            Remv oldpkg [0.9]\n\
            Conf acme-agent (1.0.1 Debian-Security:bookworm-security [all])\n";
        let s = parse_simulation(text);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[0],
            SimulatedStep {
                package: "acme-agent".into(),
                before: Some("1.0.0".into()),
                after: Some("1.0.1".into()),
                release: "Debian-Security:bookworm-security".into(),
            }
        );
        assert_eq!(s[1].before, None);
        assert_eq!(
            s[1].release,
            "Debian:12.5/stable, Debian-Security:12/stable-security"
        );
        assert_eq!(s[2].package, "libc6:i386");
        assert_eq!(s[3].after, None);
        assert_eq!(s[3].before.as_deref(), Some("0.9"));
        assert!(is_security_release(&s[0].release));
        assert!(!is_security_release("Debian:12.5/stable"));
    }

    #[test]
    fn madison_policy_and_already_newest() {
        let m = "acme-agent |      1.0.1 | file:/r bookworm-security/main all Packages\n\
                 acme-agent |      1.0.0 | file:/r bookworm-security/main all Packages\n";
        assert_eq!(
            parse_madison(m),
            vec![
                ("acme-agent".to_string(), "1.0.1".to_string()),
                ("acme-agent".to_string(), "1.0.0".to_string())
            ]
        );
        let p = "acme-agent:\n  Installed: 1.0.0\n  Candidate: 1.0.1\n  Version table:\n";
        assert_eq!(
            parse_policy(p),
            (Some("1.0.0".into()), Some("1.0.1".into()))
        );
        let p = "x:\n  Installed: (none)\n  Candidate: 2\n";
        assert_eq!(parse_policy(p), (None, Some("2".into())));
        let n = parse_already_newest("acme-agent is already the newest version (1.0.1).\n");
        assert_eq!(n.get("acme-agent").map(String::as_str), Some("1.0.1"));
    }

    #[test]
    fn dnf_updates_wrap_and_stop_at_obsoletes() {
        let text = "\nopenssl.x86_64            1:3.0.7-25.el9_3        baseos\n\
            a-very-long-package-name-that-wraps.noarch\n\
            \x20                         2.0-1.el9               appstream\n\
            Last metadata expiration check: 0:01:02 ago on Mon.\n\
            Obsoleting Packages\n\
            grub2-tools.x86_64        1:2.06-70.el9           baseos\n";
        let u = parse_dnf_check_update(text);
        assert_eq!(
            u,
            vec![
                (
                    "openssl.x86_64".to_string(),
                    "1:3.0.7-25.el9_3".to_string(),
                    "baseos".to_string()
                ),
                (
                    "a-very-long-package-name-that-wraps.noarch".to_string(),
                    "2.0-1.el9".to_string(),
                    "appstream".to_string()
                ),
            ]
        );
        let sec = parse_dnf_security(
            "RHSA-2024:1234 Important/Sec. openssl-1:3.0.7-25.el9_3.x86_64\n\
             RHBA-2024:1 bugfix other-1.0-1.noarch\n",
        );
        assert_eq!(sec, vec!["openssl".to_string()]);
        let i = parse_rpm_installed("openssl.x86_64\t1:3.0.7-24.el9\nbash.x86_64\t(none):5.1-6\n");
        assert_eq!(i.get("bash.x86_64").map(String::as_str), Some("5.1-6"));
    }

    #[test]
    fn install_argv_pins_and_is_noninteractive() {
        let a = install_argv(&["acme-agent=1.0.1".into()], false);
        assert!(a.contains(&"DEBIAN_FRONTEND=noninteractive".to_string()));
        assert!(a.contains(&"--allow-downgrades".to_string()));
        assert_eq!(a.last().map(String::as_str), Some("acme-agent=1.0.1"));
        assert!(!a.iter().any(|w| w == "upgrade"));
        assert!(install_argv(&["x-".into()], true).contains(&"--purge".to_string()));
    }

    #[test]
    fn arch_qualified_names_are_checked() {
        assert!(check_apt_name("t", PackageManager::Dpkg, "libc6:i386").is_ok());
        assert!(check_apt_name("t", PackageManager::Dpkg, "libc6:").is_err());
        assert!(check_apt_name("t", PackageManager::Dpkg, "-x").is_err());
        assert!(check_apt_name("t", PackageManager::Dpkg, "a:b;c").is_err());
    }
}
