//! What a lab host has instead of systemd: a small init (PID 1 of the host's PID
//! namespace) that runs sshd and reboots the host on request, a SysV init script
//! for `acme-agent` with a real daemon, a boot id of its own, and a `/run` that a
//! reboot empties.
//!
//! It owns the per-host trees `init.d` (bind-mounted over `/etc/init.d`), `sbin`
//! (over `/usr/local/sbin`, first on root's PATH: the lab's `reboot` and
//! `shutdown`, and the agent daemon), `run` (over `/run`) and the file `boot_id`
//! (over `/proc/sys/kernel/random/boot_id`). It must not touch the machine's own
//! `/etc/init.d`, `/etc/rc?.d`, `/run` or boot id, and starts no process outside a
//! host's namespaces.
//!
//! A reboot: `reboot` (or `shutdown -r`) signals the host's init, which waits a
//! moment so the command's answer gets out, kills every other process of the host
//! (sshd, sessions, daemons), empties `/run`, writes a new boot id, waits
//! [`REBOOT_DELAY`] and starts sshd again on the same port. A host marked with
//! [`Fleet::never_return`] stops at the reboot instead, its whole namespace gone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{quote, write, Fleet, LabError};

/// The SysV service every lab host runs.
pub const AGENT_SERVICE: &str = "acme-agent";
/// The name of the agent's daemon process (`pgrep -x acme-agentd`).
pub const AGENT_DAEMON: &str = "acme-agentd";
/// Present in a host's `/etc/acme`, the agent's next start fails (and the file is
/// consumed by it): a start that fails once, then works again.
pub const FAIL_NEXT_START: &str = "fail-next-start";
/// Present in a host's `/etc/acme`, every start of the agent fails.
pub const FAIL_START: &str = "fail-start";
/// Seconds between a host going down and its sshd answering again.
pub const REBOOT_DELAY: &str = "1";

/// The per-host trees this module adds, relative to the host's folder.
pub(super) const TREES: [&str; 3] = ["init.d", "sbin", "run"];

const INIT_SCRIPT: &str = r#"#!/bin/sh
### BEGIN INIT INFO
# Provides:          acme-agent
# Required-Start:    $remote_fs
# Required-Stop:     $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: ACME monitoring agent (patchbook lab)
### END INIT INFO
PIDFILE=/run/acme-agent.pid
DAEMON=/usr/local/sbin/acme-agentd

case "$1" in
  start)
    # Like many real init scripts, success means "launched": a daemon that dies
    # right after is only seen by a later status.
    start-stop-daemon --start --quiet --oknodo --background --make-pidfile \
      --pidfile "$PIDFILE" --startas "$DAEMON"
    ;;
  stop)
    start-stop-daemon --stop --quiet --oknodo --retry TERM/5/KILL/2 \
      --pidfile "$PIDFILE" --remove-pidfile
    ;;
  restart|force-reload)
    "$0" stop && "$0" start
    ;;
  reload)
    start-stop-daemon --stop --quiet --signal HUP --pidfile "$PIDFILE"
    ;;
  status)
    start-stop-daemon --status --pidfile "$PIDFILE"
    rc=$?
    if [ "$rc" = 0 ]; then echo "acme-agent is running"; else echo "acme-agent is not running"; fi
    exit "$rc"
    ;;
  *)
    echo "Usage: $0 {start|stop|restart|reload|force-reload|status}" >&2
    exit 3
    ;;
esac
"#;

const DAEMON: &str = r#"#!/bin/sh
# acme-agent's daemon in the lab: runs the agent's check every few seconds.
if [ -e /etc/acme/fail-next-start ]; then
  rm -f /etc/acme/fail-next-start
  echo "acme-agentd: bad configuration, exiting" >&2
  exit 1
fi
if [ -e /etc/acme/fail-start ]; then
  echo "acme-agentd: bad configuration, exiting" >&2
  exit 1
fi
nap=
trap 'kill $nap 2>/dev/null; exit 0' TERM INT
trap ':' HUP
while :; do
  /opt/acme/agent.sh --check >/dev/null 2>&1
  sleep 5 &
  nap=$!
  wait $nap
done
"#;

const REBOOT: &str = "#!/bin/sh\n\
# The lab's reboot: asks the host's init (PID 1 of its namespace) to reboot it.\n\
kill -USR1 1\n";

const SHUTDOWN: &str = "#!/bin/sh\n\
# The lab's shutdown: only `shutdown -r` (a reboot) is supported.\n\
for a in \"$@\"; do\n\
\x20 case \"$a\" in -r|--reboot) exec kill -USR1 1 ;; esac\n\
done\n\
echo \"shutdown: lab hosts only reboot (shutdown -r now)\" >&2\n\
exit 1\n";

/// Puts the init trees of a host (or of the template) in place. `/run` keeps what
/// it has: it is a mount source of a running host.
pub(super) fn seed_init(hdir: &Path) -> Result<(), LabError> {
    for sub in TREES {
        let d = hdir.join(sub);
        std::fs::create_dir_all(&d).map_err(LabError::io(&d))?;
    }
    executable(&hdir.join("init.d").join(AGENT_SERVICE), INIT_SCRIPT)?;
    executable(&hdir.join("sbin").join(AGENT_DAEMON), DAEMON)?;
    executable(&hdir.join("sbin/reboot"), REBOOT)?;
    executable(&hdir.join("sbin/shutdown"), SHUTDOWN)?;
    // sshd's privilege separation folder, on the host's own /run.
    let privsep = hdir.join("run/sshd");
    std::fs::create_dir_all(&privsep).map_err(LabError::io(&privsep))?;
    std::fs::set_permissions(&privsep, std::fs::Permissions::from_mode(0o755))
        .map_err(LabError::io(&privsep))?;
    let boot_id = hdir.join("boot_id");
    if !boot_id.exists() {
        write(&boot_id, &format!("{}\n", new_boot_id()))?;
    }
    let _ = std::fs::remove_file(hdir.join("never-return"));
    Ok(())
}

fn executable(path: &Path, text: &str) -> Result<(), LabError> {
    write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(LabError::io(path))
}

/// A random UUID as the kernel writes boot ids.
fn new_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!(
                "{:08x}-0000-4000-8000-{:012x}",
                n & 0xffff_ffff,
                (n >> 32) & 0xffff_ffff_ffff
            )
        })
}

/// The host's init: mounts the host's trees, then runs sshd, and reboots the host
/// whenever `reboot` signals it (SIGUSR1). Run by `sh` as PID 1 of the host's PID
/// namespace, so killing it (what `lab down` does) ends every process of the host,
/// rebooted or not.
pub(super) fn init_script(hdir: &Path, mounts: &str, sshd: &str) -> String {
    let h = quote::word(&hdir.to_string_lossy());
    let cfg = quote::word(&hdir.join("sshd_config").to_string_lossy());
    format!(
        "{mounts} && mount --bind {h}/boot_id /proc/sys/kernel/random/boot_id || exit 1\n\
         h={h}\n\
         reboot=\n\
         trap 'reboot=1' USR1\n\
         while :; do\n\
         \x20 reboot=\n\
         \x20 {sshd} -D -e -f {cfg} &\n\
         \x20 sshd=$!\n\
         \x20 while [ -z \"$reboot\" ] && kill -0 \"$sshd\" 2>/dev/null; do wait \"$sshd\"; done\n\
         \x20 [ -n \"$reboot\" ] || exit 1\n\
         \x20 sleep 0.3\n\
         \x20 kill -9 -1 2>/dev/null\n\
         \x20 wait\n\
         \x20 [ -e \"$h/never-return\" ] && exit 0\n\
         \x20 find /run -mindepth 1 -maxdepth 1 ! -name sshd -exec rm -rf {{}} +\n\
         \x20 cat /proc/sys/kernel/random/uuid > \"$h/boot_id\"\n\
         \x20 sleep {REBOOT_DELAY}\n\
         done\n"
    )
}

impl Fleet {
    /// The host's current boot id, as `/proc/sys/kernel/random/boot_id` shows it
    /// inside the host.
    pub fn boot_id(&self, name: &str) -> Result<String, LabError> {
        let p = self.host(name)?.dir.join("boot_id");
        Ok(std::fs::read_to_string(&p)
            .map_err(LabError::io(&p))?
            .trim()
            .to_string())
    }

    /// From now on the host does not come back from a reboot: at its next reboot
    /// its init ends, and every process of the host with it.
    pub fn never_return(&self, name: &str) -> Result<(), LabError> {
        let p = self.host(name)?.dir.join("never-return");
        write(&p, "")
    }

    /// The PIDs (as the host numbers them) of processes named `comm` on the host.
    pub fn pids_of(&self, name: &str, comm: &str) -> Result<Vec<i32>, LabError> {
        let out = self.exec_in(name, &["pgrep", "-x", comm])?;
        let mut pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Runs `argv` inside the host's mount AND PID namespaces, so what it starts is
    /// one of the host's processes (and dies with the host).
    pub fn exec_in_host(
        &self,
        name: &str,
        argv: &[&str],
    ) -> Result<std::process::Output, LabError> {
        let h = self.host(name)?;
        std::process::Command::new("nsenter")
            .arg("-t")
            .arg(h.sshd_pid.to_string())
            .args(["-m", "-p", "--"])
            .args(argv)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| LabError::Tool {
                tool: "nsenter".into(),
                status: "did not start".into(),
                stderr: e.to_string(),
            })
    }
}
