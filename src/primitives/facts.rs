//! Facts about a host: OS, package manager, architecture, kernel. Gathered with one
//! command per host per run and cached in the [`RunCtx`](super::RunCtx), because
//! every further exec channel is a new process on the host.

use serde::Serialize;

use super::{HostCtx, PrimitiveError};
use crate::transport::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    Dpkg,
    Rpm,
    Unknown,
}

impl PackageManager {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dpkg => "dpkg",
            Self::Rpm => "rpm",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub os_id: String,
    pub os_version: String,
    pub os_like: Vec<String>,
    pub package_manager: PackageManager,
    pub arch: String,
    pub kernel: String,
}

/// A fixed probe, not built from any script data, so it may be a shell string.
/// Shell builtins read the files, so on Linux the host starts no process at all;
/// `uname` is the fallback where `/proc/sys/kernel` lacks the answer.
const PROBE: &str = "[ -r /etc/os-release ] && while IFS= read -r l || [ -n \"$l\" ]; \
do printf '%s\\n' \"$l\"; done </etc/os-release; k=; a=; \
[ -r /proc/sys/kernel/osrelease ] && read -r k </proc/sys/kernel/osrelease; \
[ -r /proc/sys/kernel/arch ] && read -r a </proc/sys/kernel/arch; \
[ -n \"$k\" ] || k=$(uname -r); [ -n \"$a\" ] || a=$(uname -m); \
echo \"__kernel=$k\"; echo \"__arch=$a\"; \
command -v dpkg-query >/dev/null 2>&1 && echo __pm=dpkg; \
command -v rpm >/dev/null 2>&1 && echo __pm=rpm; true";

pub fn facts(ctx: &HostCtx) -> Result<Facts, PrimitiveError> {
    if let Some(f) = ctx.run.cached_facts(ctx.name()) {
        return Ok(f);
    }
    let cmd = Command::script(PROBE, "patchbook-facts", &[])
        .timeout(ctx.timeout(std::time::Duration::from_secs(60)));
    let out = ctx.transport.run(&cmd)?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), "facts", &out));
    }
    let f = parse(&out.stdout_str());
    ctx.run.cache_facts(ctx.name(), f.clone());
    Ok(f)
}

/// Parses the probe's output. The package manager follows the OS family when the
/// host has both (a Debian host may carry `rpm` as a tool).
pub fn parse(text: &str) -> Facts {
    let mut f = Facts {
        os_id: String::new(),
        os_version: String::new(),
        os_like: Vec::new(),
        package_manager: PackageManager::Unknown,
        arch: String::new(),
        kernel: String::new(),
    };
    let mut has = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "ID" => f.os_id = v,
            "VERSION_ID" => f.os_version = v,
            "ID_LIKE" => f.os_like = v.split_whitespace().map(str::to_string).collect(),
            "__arch" => f.arch = v,
            "__kernel" => f.kernel = v,
            "__pm" => has.push(v),
            _ => {}
        }
    }
    let family: Vec<&str> = std::iter::once(f.os_id.as_str())
        .chain(f.os_like.iter().map(String::as_str))
        .collect();
    let debian_like = family.iter().any(|x| matches!(*x, "debian" | "ubuntu"));
    let rpm_like = family.iter().any(|x| {
        matches!(
            *x,
            "rhel" | "fedora" | "centos" | "suse" | "opensuse" | "rocky" | "almalinux" | "amzn"
        )
    });
    let has_dpkg = has.iter().any(|x| x == "dpkg");
    let has_rpm = has.iter().any(|x| x == "rpm");
    f.package_manager = match (debian_like, rpm_like) {
        (true, _) if has_dpkg => PackageManager::Dpkg,
        (_, true) if has_rpm => PackageManager::Rpm,
        _ if has_dpkg => PackageManager::Dpkg,
        _ if has_rpm => PackageManager::Rpm,
        _ => PackageManager::Unknown,
    };
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    // Here rather than in `transport::sim`: the transport layer must not import
    // the primitives that read its output.
    #[cfg(feature = "lab")]
    #[test]
    fn the_sim_transport_answers_the_probe_as_debian_with_dpkg() {
        use crate::transport::{sim::SimTransport, Transport as _};
        let t = SimTransport::for_host(&crate::inventory::Host::new("s1")).unwrap();
        let out = t
            .run(&Command::new(["sh", "-c", "cat /etc/os-release; echo"]))
            .unwrap();
        assert_eq!(
            parse(&out.stdout_str()).package_manager,
            PackageManager::Dpkg
        );
    }

    #[test]
    fn debian_with_rpm_tool_uses_dpkg() {
        let f = parse(
            "ID=debian\nVERSION_ID=\"12\"\n__arch=x86_64\n__kernel=6.1.0\n__pm=dpkg\n__pm=rpm\n",
        );
        assert_eq!(f.os_id, "debian");
        assert_eq!(f.os_version, "12");
        assert_eq!(f.package_manager, PackageManager::Dpkg);
        assert_eq!(f.arch, "x86_64");
    }

    #[test]
    fn the_probe_reads_this_machine_through_a_real_shell() {
        let out = std::process::Command::new("sh")
            .args(["-c", PROBE])
            .output()
            .unwrap();
        assert!(out.status.success());
        let f = parse(&String::from_utf8_lossy(&out.stdout));
        let uname = |flag: &str| {
            let o = std::process::Command::new("uname")
                .arg(flag)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        assert_eq!((f.kernel, f.arch), (uname("-r"), uname("-m")));
        let os = std::fs::read_to_string("/etc/os-release").unwrap();
        assert!(os.contains(&format!("ID={}", f.os_id)), "{}", f.os_id);
    }

    #[test]
    fn rocky_uses_rpm() {
        let f = parse("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n__pm=rpm\n");
        assert_eq!(f.package_manager, PackageManager::Rpm);
        assert_eq!(f.os_like, ["rhel", "centos", "fedora"]);
    }
}
