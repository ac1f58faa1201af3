//! The controller watching itself: its CPU time, memory, open network sockets,
//! I/O and TCP traffic, read from `/proc/self` and the kernel's per-connection
//! counters (`TCP_INFO` on each of this process's sockets) and journaled as `controller.usage` samples during
//! a rollout (at its start, at most every few seconds on its events, and at its
//! end), so the report can say what a run cost the machine that drove it.
//!
//! It reads only this process; it must not sample hosts (that is `monitor()`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::journal::entry::ControllerUsage;

/// The least real time between two samples taken on rollout events.
pub const EVERY: Duration = Duration::from_secs(5);

/// Reads this process's usage now; `None` where `/proc` is missing.
pub fn read(at: DateTime<Utc>) -> Option<ControllerUsage> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: utime is the 14th
    // field of the line, so the 12th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let jiffies = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let cpu_seconds = (jiffies(11)? + jiffies(12)?) / ticks;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let sockets = open_sockets();
    let traffic = traffic(&sockets);
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let io_bytes = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ControllerUsage {
        at,
        cpu_seconds,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
        sockets: u64::try_from(sockets.len()).unwrap_or(u64::MAX),
        read_bytes: io_bytes("rchar:"),
        written_bytes: io_bytes("wchar:"),
        bytes_sent: traffic.sent,
        bytes_received: traffic.received,
        connections: traffic.connections,
    })
}

/// This process's open sockets: (descriptor, socket inode).
fn open_sockets() -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse::<i32>().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

/// The kernel's counters of one TCP connection; `None` for a socket that is not
/// TCP (Unix sockets, UDP) or was closed since the directory was read.
fn tcp_info(fd: i32) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `info` is valid for writes of `len` bytes and the kernel writes at
    // most `len`; a descriptor closed or reused meanwhile yields an error or
    // another socket's counters, never memory unsafety.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

/// TCP bytes since the start and connections open now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Traffic {
    sent: u64,
    received: u64,
    connections: u64,
}

/// What earlier reads saw: the kernel forgets a connection's counters when it
/// closes, so the last figures seen of each are kept here and a closed one's are
/// moved into `closed`. One per process, as the counters are.
#[derive(Default)]
struct Ledger {
    open: BTreeMap<u64, (u64, u64)>,
    closed: (u64, u64),
}

/// `TCP_ESTABLISHED` of the kernel's `tcp_states.h` (libc does not export it).
const TCP_ESTABLISHED: u8 = 1;

static LEDGER: Mutex<Option<Ledger>> = Mutex::new(None);

fn traffic(sockets: &[(i32, u64)]) -> Traffic {
    let mut now: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut connections = 0u64;
    for (fd, inode) in sockets {
        let Some(info) = tcp_info(*fd) else { continue };
        if info.tcpi_state == TCP_ESTABLISHED {
            connections += 1;
        }
        now.insert(*inode, (info.tcpi_bytes_acked, info.tcpi_bytes_received));
    }
    let mut guard = LEDGER.lock().unwrap_or_else(|p| p.into_inner());
    let ledger = guard.get_or_insert_with(Ledger::default);
    for (inode, (sent, received)) in &ledger.open {
        if !now.contains_key(inode) {
            ledger.closed.0 = ledger.closed.0.saturating_add(*sent);
            ledger.closed.1 = ledger.closed.1.saturating_add(*received);
        }
    }
    let (mut sent, mut received) = ledger.closed;
    for (s, r) in now.values() {
        sent = sent.saturating_add(*s);
        received = received.saturating_add(*r);
    }
    ledger.open = now;
    Traffic {
        sent,
        received,
        connections,
    }
}

/// Paces samples taken on events: one now and then, not one per host.
#[derive(Debug, Default)]
pub struct Pace {
    last: Mutex<Option<Instant>>,
}

impl Pace {
    /// Whether a sample is due: always when `force`, else when [`EVERY`] passed.
    pub fn due(&self, force: bool) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let due = force || last.is_none_or(|t| t.elapsed() >= EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let u = read(Utc::now()).unwrap();
        assert!(u.rss_kib > 0 && u.peak_rss_kib >= u.rss_kib, "{u:?}");
        assert!(u.threads >= 1, "{u:?}");
        let pace = Pace::default();
        assert!(pace.due(false));
        assert!(!pace.due(false));
        assert!(pace.due(true));
    }

    /// A real loopback connection: its bytes show up on both ends, and stay
    /// counted after it closes.
    #[test]
    fn counts_tcp_bytes_and_connections() {
        use std::io::{Read, Write};
        let before = read(Utc::now()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[7u8; 10_000]).unwrap();
        let mut buf = vec![0u8; 10_000];
        server.read_exact(&mut buf).unwrap();
        let open = read(Utc::now()).unwrap();
        // Both ends are this process: sent and received each grow by the payload.
        assert!(open.bytes_sent >= before.bytes_sent + 10_000, "{open:?}");
        assert!(
            open.bytes_received >= before.bytes_received + 10_000,
            "{open:?}"
        );
        assert!(open.connections >= 2, "{open:?}");
        drop((client, server, listener));
        let closed = read(Utc::now()).unwrap();
        assert!(closed.bytes_sent >= open.bytes_sent, "{closed:?}");
        assert!(closed.bytes_received >= open.bytes_received, "{closed:?}");
    }
}
