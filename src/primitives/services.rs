//! Services and reboots: `service` (start, stop, restart, reload, enable, disable
//! a unit, and wait until it settles), `reboot` (and wait until the host is back
//! with a new boot id), and the probes `needs_reboot` and
//! `services_needing_restart`.
//!
//! It owns the fixed shell scripts that read and change a unit through
//! `systemctl` where systemd is PID 1 (`/run/systemd/system`) and through SysV
//! (`service`, `/etc/init.d/<name>`, `update-rc.d`) elsewhere; the unit name only
//! ever arrives as a positional parameter. It must not decide policy (what to
//! restart when) nor keep a session of its own: after a reboot it asks the caller
//! for a fresh connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{cut, HostCtx, PrimitiveError};
use crate::config::format_duration;
use crate::journal::UndoStep;
use crate::transport::{Command, Transport, TransportError};

/// How long one status or action command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a unit must show the asked-for state before it counts as settled: a
/// daemon that dies right after its init script said "started" is caught.
const SETTLE_GAP: Duration = Duration::from_millis(500);
/// Between two status reads while a unit settles.
const POLL: Duration = Duration::from_millis(250);
/// Default for how long a unit may take to settle.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);
/// Default for how long a rebooting host may take to answer again.
pub const DEFAULT_REBOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest pause between two attempts to reach a rebooting host.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The state a playbook asks a unit to be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wanted {
    Started,
    Stopped,
    Restarted,
    Reloaded,
}

impl std::str::FromStr for Wanted {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "started" => Ok(Wanted::Started),
            "stopped" => Ok(Wanted::Stopped),
            "restarted" => Ok(Wanted::Restarted),
            "reloaded" => Ok(Wanted::Reloaded),
            other => Err(format!(
                "state {:?} is not one of \"started\", \"stopped\", \"restarted\", \"reloaded\"",
                cut(other, 40)
            )),
        }
    }
}

/// A `service` step as a playbook asks for it.
#[derive(Debug, Clone)]
pub struct ServiceRequest {
    pub unit: String,
    pub state: Option<Wanted>,
    pub enabled: Option<bool>,
    /// How long the unit may take to settle after the action.
    pub timeout: Duration,
}

/// Which init system runs the host's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    Systemd,
    Sysv,
}

/// What the host says about a unit now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitStatus {
    pub init: Init,
    pub active: bool,
    /// Starting, stopping or reloading: not settled yet.
    pub transitional: bool,
    /// `None` where the host cannot say (a static systemd unit, a SysV service
    /// without rc links).
    pub enabled: Option<bool>,
    /// The init system's own word for the state, for messages.
    pub raw: String,
}

/// What a `service` step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceResult {
    pub unit: String,
    pub changed: bool,
    pub planned: bool,
    pub before: Option<UnitStatus>,
    pub after: Option<UnitStatus>,
    /// One line for the operator: what was done, or "no change: …".
    pub detail: String,
}

/// Refuses a unit name that could be read as an option or leave `/etc/init.d`.
pub fn check_unit(step: &str, unit: &str) -> Result<(), PrimitiveError> {
    let reason = if unit.is_empty() || unit.len() > 256 {
        Some("unit names are 1 to 256 characters")
    } else if unit.starts_with('-') {
        Some("unit names do not start with '-' (it would read as an option)")
    } else if unit.starts_with('.') {
        Some("unit names do not start with '.'")
    } else if !unit
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":-_.@".contains(c))
    {
        Some("unit names hold only letters, digits and ':', '-', '_', '.', '@'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(r) => Err(PrimitiveError::Refused {
            step: step.to_string(),
            what: "unit name".into(),
            value: cut(unit, 80),
            reason: r.into(),
        }),
    }
}

/// Prints the init system, then the unit's state and enablement, one per line.
/// systemd: `systemctl show` keys; SysV: the init script's `status` exit code
/// (LSB: 0 running) and whether rc2–5 hold start (S) or kill (K) links.
const STATUS_SCRIPT: &str = r#"u=$1
if [ -d /run/systemd/system ]; then
  echo systemd
  systemctl show -p LoadState -p ActiveState -p UnitFileState -- "$u"
  exit 0
fi
echo sysv
s=${u%.service}
if [ ! -x "/etc/init.d/$s" ]; then echo missing; exit 0; fi
"/etc/init.d/$s" status >/dev/null 2>&1
echo "status=$?"
e=unknown
for f in /etc/rc2.d/K[0-9][0-9]"$s" /etc/rc3.d/K[0-9][0-9]"$s" /etc/rc4.d/K[0-9][0-9]"$s" /etc/rc5.d/K[0-9][0-9]"$s"; do [ -e "$f" ] && e=disabled; done
for f in /etc/rc2.d/S[0-9][0-9]"$s" /etc/rc3.d/S[0-9][0-9]"$s" /etc/rc4.d/S[0-9][0-9]"$s" /etc/rc5.d/S[0-9][0-9]"$s"; do [ -e "$f" ] && e=enabled; done
echo "enabled=$e"
"#;

/// Runs one action on a unit: `start`, `stop`, `restart`, `reload`, `enable`,
/// `disable`. The action is one of those fixed words; the unit is `$1`.
const ACTION_SCRIPT: &str = r#"u=$1; a=$2
if [ -d /run/systemd/system ]; then exec systemctl "$a" -- "$u"; fi
s=${u%.service}
case "$a" in
  enable|disable)
    if [ "$a" = enable ] && ! ls /etc/rc[0-6S].d/[SK][0-9][0-9]"$s" >/dev/null 2>&1; then
      update-rc.d "$s" defaults || exit $?
    fi
    exec update-rc.d "$s" "$a" ;;
esac
if command -v service >/dev/null 2>&1; then exec service "$s" "$a"; fi
exec "/etc/init.d/$s" "$a"
"#;

fn status_from(text: &str) -> Result<Option<UnitStatus>, String> {
    let mut lines = text.lines();
    let init = lines.next().unwrap_or_default().trim();
    match init {
        "systemd" => {
            let mut load = "";
            let mut active = "";
            let mut file = "";
            for l in lines {
                if let Some((k, v)) = l.split_once('=') {
                    match k.trim() {
                        "LoadState" => load = v.trim(),
                        "ActiveState" => active = v.trim(),
                        "UnitFileState" => file = v.trim(),
                        _ => {}
                    }
                }
            }
            if load == "not-found" {
                return Ok(None);
            }
            let enabled = match file {
                "enabled" | "enabled-runtime" => Some(true),
                "disabled" | "masked" | "masked-runtime" => Some(false),
                _ => None,
            };
            Ok(Some(UnitStatus {
                init: Init::Systemd,
                active: matches!(active, "active" | "reloading" | "refreshing"),
                transitional: matches!(
                    active,
                    "activating" | "deactivating" | "reloading" | "refreshing"
                ),
                enabled,
                raw: active.to_string(),
            }))
        }
        "sysv" => {
            let mut code = None;
            let mut enabled = None;
            for l in lines {
                if l.trim() == "missing" {
                    return Ok(None);
                }
                if let Some(c) = l.strip_prefix("status=") {
                    code = c.trim().parse::<i32>().ok();
                }
                if let Some(e) = l.strip_prefix("enabled=") {
                    enabled = match e.trim() {
                        "enabled" => Some(true),
                        "disabled" => Some(false),
                        _ => None,
                    };
                }
            }
            let code = code.ok_or_else(|| format!("unreadable status: {}", cut(text, 200)))?;
            Ok(Some(UnitStatus {
                init: Init::Sysv,
                active: code == 0,
                transitional: false,
                enabled,
                raw: match code {
                    0 => "running".into(),
                    3 => "not running".into(),
                    1 => "dead (pid file left)".into(),
                    c => format!("status exit {c}"),
                },
            }))
        }
        _ => Err(format!("unreadable status: {}", cut(text, 200))),
    }
}

/// The unit's state now. A probe: it runs in `plan` too.
pub fn unit_status(ctx: &HostCtx, unit: &str) -> Result<UnitStatus, PrimitiveError> {
    check_unit("service", unit)?;
    let out = ctx.transport.run(
        &Command::script(STATUS_SCRIPT, "patchbook-service-status", &[unit])
            .timeout(ctx.timeout(COMMAND_TIMEOUT)),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            "service: read status",
            &out,
        ));
    }
    match status_from(&out.stdout_str()) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(PrimitiveError::step(
            ctx.name(),
            "service",
            format!(
                "there is no service {unit:?} (no systemd unit, no /etc/init.d/{}); check the name with `systemctl list-units` or `ls /etc/init.d`",
                unit.trim_end_matches(".service")
            ),
        )),
        Err(e) => Err(PrimitiveError::step(ctx.name(), "service", e)),
    }
}

fn run_action(ctx: &HostCtx, unit: &str, action: &str) -> Result<(), PrimitiveError> {
    let out = ctx.transport.run(
        &Command::script(ACTION_SCRIPT, "patchbook-service", &[unit, action])
            .timeout(ctx.timeout(COMMAND_TIMEOUT)),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            &format!("service: {action} {unit}"),
            &out,
        ));
    }
    Ok(())
}

/// Polls the unit until it is (or is not) active, settled, and seen so twice
/// [`SETTLE_GAP`] apart; fails with the last status at the deadline.
fn settle(
    ctx: &HostCtx,
    unit: &str,
    want_active: bool,
    timeout: Duration,
) -> Result<UnitStatus, PrimitiveError> {
    let started = Instant::now();
    let limit = ctx.timeout(timeout).max(SETTLE_GAP);
    let mut seen_since: Option<Instant> = None;
    loop {
        let st = unit_status(ctx, unit)?;
        if st.active == want_active && !st.transitional {
            match seen_since {
                Some(t) if t.elapsed() >= SETTLE_GAP => return Ok(st),
                Some(_) => {}
                None => seen_since = Some(Instant::now()),
            }
        } else {
            seen_since = None;
        }
        if started.elapsed() >= limit {
            return Err(PrimitiveError::step(
                ctx.name(),
                "service",
                format!(
                    "{unit} did not {} within {}: it is {}; see the service's own log on the host",
                    if want_active { "become active" } else { "stop" },
                    format_duration(limit),
                    st.raw
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// The actions that take the unit from `now` to what is asked, in order.
fn actions(req: &ServiceRequest, now: &UnitStatus) -> Vec<&'static str> {
    let mut a = Vec::new();
    match req.state {
        Some(Wanted::Started) if !now.active => a.push("start"),
        Some(Wanted::Stopped) if now.active => a.push("stop"),
        Some(Wanted::Restarted) => a.push("restart"),
        Some(Wanted::Reloaded) => a.push(if now.active { "reload" } else { "start" }),
        _ => {}
    }
    match req.enabled {
        Some(true) if now.enabled != Some(true) => a.push("enable"),
        Some(false) if now.enabled != Some(false) => a.push("disable"),
        _ => {}
    }
    a
}

fn shown(s: &UnitStatus) -> String {
    let enabled = match s.enabled {
        Some(true) => ", enabled",
        Some(false) => ", disabled",
        None => "",
    };
    format!("{}{enabled}", if s.active { "active" } else { "inactive" })
}

/// Brings a unit to the asked state. In `plan`, reads the unit's state and says
/// what it would do, or "no change". Otherwise, when anything must change, writes
/// the intent (with the undo: the state found) before acting, waits until the unit
/// settles, and writes the outcome. Already in the asked state: nothing is written
/// to the host or the journal.
pub fn service(ctx: &HostCtx, req: &ServiceRequest) -> Result<ServiceResult, PrimitiveError> {
    check_unit("service", &req.unit)?;
    if req.state.is_none() && req.enabled.is_none() {
        return Err(PrimitiveError::step(
            ctx.name(),
            "service",
            "say what to do: #{ state: \"started\" | \"stopped\" | \"restarted\" | \"reloaded\" } and/or #{ enabled: true | false }",
        ));
    }
    let unit = req.unit.as_str();
    let before = unit_status(ctx, unit)?;
    let todo = actions(req, &before);
    if todo.is_empty() {
        let detail = format!("no change: {unit} is already {}", shown(&before));
        if ctx.planning() {
            ctx.plan_check("service", detail.clone(), "ok");
        }
        return Ok(ServiceResult {
            unit: req.unit.clone(),
            changed: false,
            planned: ctx.planning(),
            before: Some(before.clone()),
            after: Some(before),
            detail,
        });
    }
    let undo = UndoStep::Service {
        unit: req.unit.clone(),
        was_active: before.active,
        was_enabled: if req.enabled.is_some() {
            before.enabled
        } else {
            None
        },
        restarted: matches!(req.state, Some(Wanted::Restarted | Wanted::Reloaded)),
    };
    let detail = format!("{} {unit} (now {})", todo.join(" and "), shown(&before));
    if ctx.planning() {
        ctx.plan(
            "service",
            format!("would {detail}; undo: {}", describe_undo(&undo)),
            "unknown",
        );
        return Ok(ServiceResult {
            unit: req.unit.clone(),
            changed: true,
            planned: true,
            before: Some(before),
            after: None,
            detail: format!("would {detail}"),
        });
    }
    if ctx.run.journal.is_none() {
        return Err(PrimitiveError::Refused {
            step: format!("{}: service", ctx.name()),
            what: "unit".into(),
            value: req.unit.clone(),
            reason: "changing a service needs a journal; run it in `patchbook exec SELECTOR SNIPPET` or a playbook".into(),
        });
    }
    let intent = ctx.intent(
        "service",
        &ServiceInput {
            unit,
            init: &before.init,
            state: &req.state,
            enabled: req.enabled,
            before: &before,
            actions: &todo,
            undo: &undo,
        },
    )?;
    let result = (|| {
        for a in &todo {
            run_action(ctx, unit, a)?;
        }
        let after = match req.state {
            Some(Wanted::Stopped) => settle(ctx, unit, false, req.timeout)?,
            Some(_) => settle(ctx, unit, true, req.timeout)?,
            None => unit_status(ctx, unit)?,
        };
        if let Some(e) = req.enabled {
            if after.enabled != Some(e) {
                return Err(PrimitiveError::step(
                    ctx.name(),
                    "service",
                    format!(
                        "{unit} is still {} after {}",
                        if e { "not enabled" } else { "enabled" },
                        if e { "enable" } else { "disable" }
                    ),
                ));
            }
        }
        Ok(after)
    })();
    match result {
        Ok(after) => {
            ctx.outcome(
                "service",
                intent,
                true,
                &ServiceOutput {
                    unit,
                    after: Some(&after),
                    error: None,
                },
                Some(undo),
            )?;
            Ok(ServiceResult {
                unit: req.unit.clone(),
                changed: true,
                planned: false,
                before: Some(before),
                after: Some(after),
                detail,
            })
        }
        Err(e) => {
            // Whatever state the unit is in now, the undo brings back the one found.
            ctx.outcome(
                "service",
                intent,
                false,
                &ServiceOutput {
                    unit,
                    after: None,
                    error: Some(e.to_string()),
                },
                Some(undo),
            )?;
            Err(e)
        }
    }
}

/// The input of a `service` step's intent: the state found, what will be done,
/// and the undo, recorded before acting.
#[derive(Serialize)]
struct ServiceInput<'a, I: Serialize, W: Serialize, S: Serialize, A: Serialize> {
    unit: &'a str,
    init: &'a I,
    state: &'a W,
    enabled: Option<bool>,
    before: &'a S,
    actions: &'a A,
    undo: &'a UndoStep,
}

/// The output of a `service` step.
#[derive(Serialize)]
struct ServiceOutput<'a> {
    unit: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<&'a UnitStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The input of a `reboot` step's intent: the boot id it must see change.
#[derive(Serialize)]
struct RebootInput<'a, R: Serialize> {
    boot_id: &'a str,
    timeout: &'a str,
    ready: &'a R,
}

/// The output of a `reboot` step.
#[derive(Serialize)]
struct RebootOutput<'a> {
    boot_id_before: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id_after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    took_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Describes a [`UndoStep::Service`] for reports and plans.
pub fn describe_undo(undo: &UndoStep) -> String {
    let UndoStep::Service {
        unit,
        was_active,
        was_enabled,
        restarted,
    } = undo
    else {
        return String::new();
    };
    let mut s = if *restarted && *was_active {
        format!("make {unit} active again (a restart or reload cannot be undone)")
    } else if *was_active {
        format!("start {unit}")
    } else {
        format!("stop {unit}")
    };
    match was_enabled {
        Some(true) => s.push_str(", enable it"),
        Some(false) => s.push_str(", disable it"),
        None => {}
    }
    s
}

/// Applies a [`UndoStep::Service`]: brings the unit back to active or inactive
/// (and enabled or disabled, when that was recorded), then waits until it settles.
pub fn restore_state(
    ctx: &HostCtx,
    unit: &str,
    was_active: bool,
    was_enabled: Option<bool>,
) -> Result<(), PrimitiveError> {
    let req = ServiceRequest {
        unit: unit.to_string(),
        state: Some(if was_active {
            Wanted::Started
        } else {
            Wanted::Stopped
        }),
        enabled: was_enabled,
        timeout: DEFAULT_SETTLE,
    };
    let now = unit_status(ctx, unit)?;
    for a in actions(&req, &now) {
        run_action(ctx, unit, a)?;
    }
    settle(ctx, unit, was_active, DEFAULT_SETTLE)?;
    Ok(())
}

/// What `needs_reboot` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebootNeed {
    pub needed: bool,
    pub reasons: Vec<String>,
}

/// Reads `/var/run/reboot-required` (and its package list), the running kernel,
/// the installed kernels (`/boot/vmlinuz-*`, else rpm's `kernel`/`kernel-core`),
/// and `needs-restarting -r` where present. Mostly shell builtins.
const NEEDS_REBOOT_SCRIPT: &str = r#"if [ -e /var/run/reboot-required ]; then
  echo F
  if [ -r /var/run/reboot-required.pkgs ]; then
    while IFS= read -r p; do echo "P $p"; done < /var/run/reboot-required.pkgs
  fi
fi
read -r k < /proc/sys/kernel/osrelease && echo "K $k"
found=
for f in /boot/vmlinuz-*; do [ -e "$f" ] && { echo "V ${f#/boot/vmlinuz-}"; found=1; }; done
# Only a host with a system rpm database: elsewhere (Debian's rpm) a query would
# create ~/.rpmdb, and a probe writes nothing.
if [ -z "$found" ] && command -v rpm >/dev/null 2>&1 && \
   { [ -e /var/lib/rpm/rpmdb.sqlite ] || [ -e /var/lib/rpm/Packages ] || [ -e /var/lib/rpm/Packages.db ]; }; then
  rpm --dbpath /var/lib/rpm -q --qf 'V %{VERSION}-%{RELEASE}.%{ARCH}\n' kernel-core kernel 2>/dev/null | grep '^V '
fi
if command -v needs-restarting >/dev/null 2>&1; then
  out=$(needs-restarting -r 2>&1); rc=$?
  echo "N $rc"
  printf '%s\n' "$out" | while IFS= read -r l; do [ -n "$l" ] && echo "R $l"; done
fi
exit 0
"#;

/// Whether the host needs a reboot, and why. A probe: runs in `plan` too.
pub fn needs_reboot(ctx: &HostCtx) -> Result<RebootNeed, PrimitiveError> {
    let out = ctx.transport.run(
        &Command::script(NEEDS_REBOOT_SCRIPT, "patchbook-needs-reboot", &[])
            .timeout(ctx.timeout(COMMAND_TIMEOUT)),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), "needs_reboot", &out));
    }
    Ok(reboot_need(&out.stdout_str()))
}

fn reboot_need(text: &str) -> RebootNeed {
    let mut reasons = Vec::new();
    let mut flagged = false;
    let mut pkgs = Vec::new();
    let mut running = None;
    let mut kernels: Vec<String> = Vec::new();
    let mut nr_code = None;
    let mut nr_lines = Vec::new();
    for l in text.lines() {
        let (tag, rest) = l.split_once(' ').unwrap_or((l, ""));
        match tag {
            "F" => flagged = true,
            "P" => pkgs.push(rest.trim().to_string()),
            "K" => running = Some(rest.trim().to_string()),
            "V" => kernels.push(rest.trim().to_string()),
            "N" => nr_code = rest.trim().parse::<i32>().ok(),
            "R" => nr_lines.push(rest.trim().to_string()),
            _ => {}
        }
    }
    if flagged {
        pkgs.retain(|p| !p.is_empty());
        pkgs.dedup();
        reasons.push(if pkgs.is_empty() {
            "/var/run/reboot-required exists".to_string()
        } else {
            format!(
                "/var/run/reboot-required exists (packages: {})",
                pkgs.join(", ")
            )
        });
    }
    if let Some(run) = &running {
        let newest = kernels
            .iter()
            .max_by(|a, b| super::version::dpkg_cmp(a, b))
            .cloned();
        if let Some(newest) = newest {
            if super::version::dpkg_cmp(&newest, run) == std::cmp::Ordering::Greater {
                reasons.push(format!("running kernel {run}, newest installed {newest}"));
            }
        }
    }
    if nr_code == Some(1) {
        let why = nr_lines
            .iter()
            .find(|l| !l.is_empty())
            .cloned()
            .unwrap_or_else(|| "reboot is required".into());
        reasons.push(format!("needs-restarting -r: {}", cut(&why, 300)));
    }
    RebootNeed {
        needed: !reasons.is_empty(),
        reasons,
    }
}

/// Lists what runs old code: `needrestart -b` (batch mode, list only) where
/// installed, else `needs-restarting -s`, else every process with an executable
/// mapping of a deleted file (a replaced library or binary), by its systemd unit
/// where it has one, else by its process name.
const NEEDING_RESTART_SCRIPT: &str = r#"if command -v needrestart >/dev/null 2>&1; then
  echo "M needrestart"
  needrestart -b -r l 2>/dev/null
  exit 0
fi
if command -v needs-restarting >/dev/null 2>&1; then
  echo "M needs-restarting"
  needs-restarting -s 2>/dev/null | while IFS= read -r l; do echo "S $l"; done
  exit 0
fi
echo "M maps"
re='^[0-9a-f]+-[0-9a-f]+ ..x. [^ ]+ [^ ]+ [0-9]+ +/.* \(deleted\)$'
skip='^[^ ]+ [^ ]+ [^ ]+ [^ ]+ [0-9]+ +/(memfd:|dev/shm/|SYSV)'
for m in $(grep -l -E "$re" /proc/[0-9]*/maps 2>/dev/null); do
  p=${m#/proc/}; p=${p%/maps}
  grep -E "$re" "$m" 2>/dev/null | grep -q -v -E "$skip" || continue
  c=; read -r c < "/proc/$p/comm" 2>/dev/null
  u=
  if [ -r "/proc/$p/cgroup" ]; then
    while IFS= read -r g; do
      case "$g" in *.service) u=${g##*/} ;; esac
    done < "/proc/$p/cgroup"
  fi
  echo "P $p $c $u"
done
exit 0
"#;

/// What runs old code after an upgrade and should be restarted: unit names where
/// known, else process names; sorted, each once. A probe: runs in `plan` too.
pub fn services_needing_restart(ctx: &HostCtx) -> Result<Vec<String>, PrimitiveError> {
    let out = ctx.transport.run(
        &Command::script(NEEDING_RESTART_SCRIPT, "patchbook-needing-restart", &[])
            .timeout(ctx.timeout(COMMAND_TIMEOUT)),
    )?;
    if !out.success() {
        return Err(PrimitiveError::failed(
            ctx.name(),
            "services_needing_restart",
            &out,
        ));
    }
    Ok(needing_restart(&out.stdout_str()))
}

fn needing_restart(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for l in text.lines() {
        if let Some(svc) = l.strip_prefix("NEEDRESTART-SVC:") {
            names.push(svc.trim().to_string());
        } else if let Some(s) = l.strip_prefix("S ") {
            names.push(s.trim().to_string());
        } else if let Some(p) = l.strip_prefix("P ") {
            let mut f = p.split_whitespace();
            let _pid = f.next();
            let comm = f.next().unwrap_or_default();
            let unit = f.next().unwrap_or_default();
            let name = if unit.is_empty() { comm } else { unit };
            names.push(name.to_string());
        }
    }
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

/// Options of `reboot(host, #{ … })`.
#[derive(Debug, Clone)]
pub struct RebootOptions {
    /// How long the host may take to go down and answer again (with a new boot id).
    pub timeout: Duration,
    /// Run on the host once it is back, until it exits 0 (within the timeout).
    pub ready: Option<Vec<String>>,
}

impl Default for RebootOptions {
    fn default() -> Self {
        RebootOptions {
            timeout: DEFAULT_REBOOT_TIMEOUT,
            ready: None,
        }
    }
}

/// What a reboot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rebooted {
    pub planned: bool,
    pub boot_id_before: String,
    pub boot_id_after: String,
    /// From the reboot command to the host answering with a new boot id (and
    /// passing `ready`).
    pub took: Duration,
}

const BOOT_ID_SCRIPT: &str =
    "read -r b < /proc/sys/kernel/random/boot_id || exit 1; printf '%s\\n' \"$b\"";

/// systemd's reboot where systemd is PID 1, else `shutdown -r now`, else `reboot`.
const REBOOT_SCRIPT: &str = r#"if [ -d /run/systemd/system ]; then exec systemctl reboot; fi
if command -v shutdown >/dev/null 2>&1; then exec shutdown -r now; fi
exec reboot
"#;

fn boot_id(t: &dyn Transport, timeout: Duration) -> Result<String, PrimitiveError> {
    let out = t.run(&Command::script(BOOT_ID_SCRIPT, "patchbook-boot-id", &[]).timeout(timeout))?;
    let id = out.stdout_str().trim().to_string();
    if !out.success() || id.is_empty() {
        return Err(PrimitiveError::failed(
            t.host(),
            "reboot: read boot id",
            &out,
        ));
    }
    Ok(id)
}

/// A fresh connection to the host, its old cached session dropped first.
pub type Reconnect<'a> = dyn Fn() -> Result<Arc<dyn Transport>, TransportError> + 'a;

/// Reboots the host and waits until it is back: records the boot id in the intent,
/// asks the host to reboot, then reconnects with backoff until SSH answers AND the
/// boot id differs (a host that still answers with the old one has not gone down
/// yet: success is never reported before it did), then runs `ready` until it
/// passes. A reboot leaves nothing to reverse, so no undo is recorded.
pub fn reboot(
    ctx: &HostCtx,
    opts: &RebootOptions,
    reconnect: &Reconnect,
) -> Result<Rebooted, PrimitiveError> {
    let within = format_duration(opts.timeout);
    if ctx.planning() {
        let ready = match &opts.ready {
            Some(argv) => format!(
                ", then `{}` until it passes",
                crate::transport::quote::argv(argv)
            ),
            None => String::new(),
        };
        ctx.plan(
            "reboot",
            format!("would reboot the host and wait up to {within} for it to return with a new boot id{ready}"),
            "unknown",
        );
        return Ok(Rebooted {
            planned: true,
            boot_id_before: String::new(),
            boot_id_after: String::new(),
            took: Duration::ZERO,
        });
    }
    if ctx.run.journal.is_none() {
        return Err(PrimitiveError::Refused {
            step: format!("{}: reboot", ctx.name()),
            what: "reboot of".into(),
            value: ctx.name().to_string(),
            reason: "a reboot needs a journal; run it in `patchbook exec SELECTOR SNIPPET` or a playbook".into(),
        });
    }
    let before = boot_id(ctx.transport, ctx.timeout(COMMAND_TIMEOUT))?;
    let intent = ctx.intent(
        "reboot",
        &RebootInput {
            boot_id: &before,
            timeout: &within,
            ready: &opts.ready,
        },
    )?;
    let started = Instant::now();
    let result = reboot_and_wait(ctx, opts, reconnect, &before, started);
    let data = match &result {
        Ok(r) => RebootOutput {
            boot_id_before: &before,
            boot_id_after: Some(&r.boot_id_after),
            took_ms: Some(u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX)),
            error: None,
        },
        Err(e) => RebootOutput {
            boot_id_before: &before,
            boot_id_after: None,
            took_ms: None,
            error: Some(e.to_string()),
        },
    };
    ctx.outcome("reboot", intent, result.is_ok(), &data, None)?;
    result
}

fn reboot_and_wait(
    ctx: &HostCtx,
    opts: &RebootOptions,
    reconnect: &Reconnect,
    before: &str,
    started: Instant,
) -> Result<Rebooted, PrimitiveError> {
    let limit = ctx.timeout(opts.timeout);
    let deadline = started + limit;
    match ctx.transport.run(
        &Command::script(REBOOT_SCRIPT, "patchbook-reboot", &[])
            .timeout(ctx.timeout(COMMAND_TIMEOUT).min(limit)),
    ) {
        Ok(out) if !out.success() => {
            return Err(PrimitiveError::failed(ctx.name(), "reboot", &out));
        }
        // The host may cut the connection before the command answers: that is the
        // reboot going on, and the boot id will tell.
        Ok(_) | Err(_) => {}
    }
    let mut pause = Duration::from_millis(250);
    let mut last = String::from("no answer yet");
    let back = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(PrimitiveError::step(
                ctx.name(),
                "reboot",
                format!(
                    "did not return within {}: {last} (boot id before: {before}); check the host's console",
                    format_duration(limit)
                ),
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_BACKOFF);
        let t = match reconnect() {
            Ok(t) => t,
            Err(e) => {
                last = format!("last attempt: {e}");
                continue;
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match boot_id(&*t, left.min(Duration::from_secs(30))) {
            Ok(id) if id != before => break (t, id),
            Ok(_) => last = "it still answered with the old boot id".into(),
            Err(e) => last = format!("last attempt: {e}"),
        }
    };
    let (t, after) = back;
    if let Some(argv) = &opts.ready {
        let hc = HostCtx {
            host: ctx.host,
            transport: &*t,
            run: ctx.run,
            deadline: Some(deadline),
        };
        wait_ready(&hc, argv, deadline, &after)?;
    }
    Ok(Rebooted {
        planned: false,
        boot_id_before: before.to_string(),
        boot_id_after: after,
        took: started.elapsed(),
    })
}

fn wait_ready(
    ctx: &HostCtx,
    argv: &[String],
    deadline: Instant,
    boot_id: &str,
) -> Result<(), PrimitiveError> {
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PrimitiveError::step(
                ctx.name(),
                "reboot",
                format!(
                    "came back (boot id {boot_id}) but `{}` did not pass in time: {last}",
                    crate::transport::quote::argv(argv)
                ),
            ));
        }
        match ctx
            .transport
            .run(&Command::new(argv.iter().cloned()).timeout(left))
        {
            Ok(out) if out.success() => return Ok(()),
            Ok(out) => {
                last = format!(
                    "exit {}: {}",
                    out.code,
                    cut(
                        format!("{}{}", out.stderr_str(), out.stdout_str()).trim(),
                        300
                    )
                )
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(1).min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysv_and_systemd_status_read() {
        let s = status_from("sysv\nstatus=0\nenabled=unknown\n")
            .unwrap()
            .unwrap();
        assert!(s.active && s.enabled.is_none() && s.init == Init::Sysv);
        let s = status_from("sysv\nstatus=3\nenabled=enabled\n")
            .unwrap()
            .unwrap();
        assert!(!s.active && s.enabled == Some(true));
        assert_eq!(status_from("sysv\nmissing\n").unwrap(), None);
        let s = status_from(
            "systemd\nLoadState=loaded\nActiveState=activating\nUnitFileState=disabled\n",
        )
        .unwrap()
        .unwrap();
        assert!(s.transitional && !s.active && s.enabled == Some(false));
        assert_eq!(
            status_from("systemd\nLoadState=not-found\nActiveState=inactive\n").unwrap(),
            None
        );
        assert!(status_from("garbage").is_err());
    }

    #[test]
    fn only_what_differs_is_done() {
        let st = |active, enabled| UnitStatus {
            init: Init::Sysv,
            active,
            transitional: false,
            enabled,
            raw: String::new(),
        };
        let req = |state, enabled| ServiceRequest {
            unit: "x".into(),
            state,
            enabled,
            timeout: DEFAULT_SETTLE,
        };
        assert!(actions(&req(Some(Wanted::Started), None), &st(true, None)).is_empty());
        assert_eq!(
            actions(
                &req(Some(Wanted::Started), Some(true)),
                &st(false, Some(false))
            ),
            ["start", "enable"]
        );
        assert_eq!(
            actions(&req(Some(Wanted::Stopped), None), &st(true, None)),
            ["stop"]
        );
        assert_eq!(
            actions(&req(Some(Wanted::Restarted), None), &st(true, None)),
            ["restart"]
        );
        assert_eq!(
            actions(&req(Some(Wanted::Reloaded), None), &st(false, None)),
            ["start"]
        );
    }

    #[test]
    fn unit_names_that_could_mislead_are_refused() {
        for ok in ["acme-agent", "nginx.service", "getty@tty1.service"] {
            assert!(check_unit("service", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-x", "..", ".hidden", "a/b", "a b", "a;b", "$(id)", "a\nb",
        ] {
            assert!(check_unit("service", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reboot_reasons() {
        let r = reboot_need(
            "F\nP linux-image-6.1\nK 6.1.0-12-amd64\nV 6.1.0-12-amd64\nV 6.1.0-13-amd64\n",
        );
        assert!(r.needed);
        assert_eq!(r.reasons.len(), 2, "{r:?}");
        assert!(r.reasons[0].contains("linux-image-6.1"));
        assert!(r.reasons[1].contains("newest installed 6.1.0-13-amd64"));
        let r = reboot_need("K 6.1.0-13-amd64\nV 6.1.0-12-amd64\nV 6.1.0-13-amd64\nN 0\n");
        assert!(!r.needed, "{r:?}");
        let r = reboot_need(
            "K 5.14.0-1\nN 1\nR Core libraries or services have been updated since boot-up:\n",
        );
        assert!(r.needed && r.reasons[0].contains("Core libraries"), "{r:?}");
    }

    #[test]
    fn needing_restart_names_units_then_processes() {
        let n = needing_restart(
            "M maps\nP 12 sleep \nP 40 nginx nginx.service\nP 41 nginx nginx.service\n",
        );
        assert_eq!(n, ["nginx.service", "sleep"]);
        let n =
            needing_restart("M needrestart\nNEEDRESTART-VER: 3.6\nNEEDRESTART-SVC: ssh.service\n");
        assert_eq!(n, ["ssh.service"]);
        let n = needing_restart("M needs-restarting\nS httpd\nS sshd\n");
        assert_eq!(n, ["httpd", "sshd"]);
    }
}
