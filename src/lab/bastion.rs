//! The bastion topology ([`super::Fleet::start_behind_bastions`]): `bastion1` on
//! loopback like any lab host; `bastion2` in a network namespace of its own,
//! joined to this machine's by one veth pair (so only it has an address the
//! outside can route to); and the target hosts in that same namespace listening
//! on its loopback, which nothing outside the namespace can reach. A run gets to
//! them through `bastion1 -> bastion2 -> host`.
//!
//! It owns that namespace's links: loopback up, the veth pair and its two
//! addresses. The namespace lives exactly as long as the processes in it, and
//! the veth pair goes with it, so stopping the hosts by PID leaves nothing
//! behind. It must not change any other interface, route or namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{run_tool, LabError};

/// Name of the first (outer) bastion.
pub const OUTER: &str = "bastion1";
/// Name of the second bastion, the only way into the hosts' namespace.
pub const INNER: &str = "bastion2";
/// The inventory group of both bastions.
pub const GROUP: &str = "bastion";

/// `/proc/PID/ns/net` of the namespace `pid` created.
pub(super) fn netns_path(pid: i32) -> String {
    format!("/proc/{pid}/ns/net")
}

/// Waits until `pid` (an `unshare --net`) is in a network namespace other than
/// this process's: configuring it earlier would change the machine's own.
fn wait_own_netns(pid: i32) -> Result<(), LabError> {
    let ours = std::fs::read_link("/proc/self/ns/net")
        .map_err(LabError::io(Path::new("/proc/self/ns/net")))?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let theirs = std::fs::read_link(netns_path(pid)).ok();
        if theirs.as_ref().is_some_and(|t| *t != ours) {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(LabError::Tool {
                tool: "unshare --net".into(),
                status: "no namespace".into(),
                stderr: format!("process {pid} did not enter a network namespace of its own"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Brings up loopback in `pid`'s namespace and links it to this machine's with
/// a veth pair; returns the namespace side's address (where `bastion2` listens).
/// Names and the /30 subnet derive from the PID, so concurrent labs differ.
pub(super) fn link(pid: i32) -> Result<String, LabError> {
    wait_own_netns(pid)?;
    let k = pid.unsigned_abs();
    let net = format!(
        "10.{}.{}.{}",
        64 + (k >> 14) % 64,
        (k >> 6) & 0xff,
        (k & 0x3f) * 4
    );
    let base: Vec<u32> = net.split('.').filter_map(|o| o.parse().ok()).collect();
    let host = |n: u32| format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + n);
    let (outside, inside) = (format!("pbj{pid}o"), format!("pbj{pid}i"));
    let ns = netns_path(pid);
    let ip = |args: &[&str]| run_tool(std::process::Command::new("ip").args(args), "ip");
    let ip_in = |args: &[&str]| {
        run_tool(
            std::process::Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .arg("ip")
                .args(args),
            "nsenter ip",
        )
    };
    ip_in(&["link", "set", "lo", "up"])?;
    ip(&[
        "link",
        "add",
        &outside,
        "type",
        "veth",
        "peer",
        "name",
        &inside,
        "netns",
        &pid.to_string(),
    ])?;
    ip(&["addr", "add", &format!("{}/30", host(1)), "dev", &outside])?;
    ip(&["link", "set", &outside, "up"])?;
    ip_in(&["addr", "add", &format!("{}/30", host(2)), "dev", &inside])?;
    ip_in(&["link", "set", &inside, "up"])?;
    Ok(host(2))
}
