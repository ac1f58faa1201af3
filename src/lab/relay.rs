//! Latency for the lab: a TCP relay in front of one host's sshd that holds every
//! byte for half a round-trip time in each direction, and counts the
//! request/response turns it sees. This machine's kernel has no netem, so a
//! userspace relay is how a lab host gets a WAN's round trip.
//!
//! It owns its listening socket, the connections it accepted (each paired with one
//! connection to the target) and the one thread that runs them; dropping it closes
//! all of them. It must not touch the hosts themselves (their sshd, their trees,
//! `lab.json`): the fleet records which relay fronts which host, and
//! [`serve_fleet`] is the body of the relay process `patchbook lab up --rtt` leaves
//! running.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::LabError;

/// The relay process's control socket, in the lab folder.
pub const SOCKET: &str = "relay.sock";
/// What the relay process prints on stdout once every relay listens.
const READY: &str = "ready";
/// The most a single read forwards as one chunk.
const CHUNK: usize = 64 * 1024;

/// What one relay has seen since it started (or was last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Request/response turns: each time bytes from the host follow client bytes
    /// the relay has delivered to it, per connection. What the host sends before it
    /// got anything (its SSH banner) is not a turn.
    pub turns: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Bytes client → host and host → client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Debug, Default)]
struct Counters {
    turns: AtomicU64,
    connections: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Traffic {
        Traffic {
            turns: self.turns.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            bytes_up: self.bytes_up.load(Ordering::SeqCst),
            bytes_down: self.bytes_down.load(Ordering::SeqCst),
        }
    }
    fn reset(&self) {
        for c in [
            &self.turns,
            &self.connections,
            &self.bytes_up,
            &self.bytes_down,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

/// A running relay: connections to [`Relay::addr`] reach the target `rtt` later
/// per round trip. Dropping it stops the relay and closes its connections.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    rtt: Duration,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `target`,
    /// delaying each direction by `rtt / 2`.
    pub fn start(target: SocketAddr, rtt: Duration) -> Result<Relay, LabError> {
        let io = |e| LabError::Relay {
            target,
            message: format!("cannot listen on loopback: {e}"),
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{}", target.port()))
            .spawn(move || {
                // Leaving block_on drops the runtime, and with it every connection.
                runtime.block_on(accept(listener, target, rtt / 2, c, stopped));
            })
            .map_err(io)?;
        Ok(Relay {
            addr,
            target,
            rtt,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn target(&self) -> SocketAddr {
        self.target
    }
    pub fn rtt(&self) -> Duration {
        self.rtt
    }
    pub fn turns(&self) -> u64 {
        self.counters.turns.load(Ordering::SeqCst)
    }
    pub fn traffic(&self) -> Traffic {
        self.counters.snapshot()
    }
    /// Zeroes the counters (between two measured runs over the same relay).
    pub fn reset(&self) {
        self.counters.reset()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    half: Duration,
    counters: Arc<Counters>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                // A failed accept (out of descriptors) drops that client only.
                if let Ok((client, _)) = accepted {
                    counters.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(relay_connection(client, target, half, counters.clone()));
                }
            }
        }
    }
}

/// The last direction bytes arrived from, per connection.
const NONE: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

async fn relay_connection(
    client: tokio::net::TcpStream,
    target: SocketAddr,
    half: Duration,
    counters: Arc<Counters>,
) {
    // A host that refuses is, to the client, a connection closed at once.
    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    // Nagle would add its own delay on top of the one asked for.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let last = Arc::new(AtomicU8::new(NONE));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(
            client_read,
            server_write,
            half,
            UP,
            last.clone(),
            counters.clone()
        ),
        pipe(server_read, client_write, half, DOWN, last, counters),
    );
}

/// Forwards one direction: each chunk leaves `delay` after it arrived, in order.
/// The delay is measured from each chunk's own arrival, so chunks in flight
/// overlap and throughput is not capped at one chunk per delay.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
    direction: u8,
    last: Arc<AtomicU8>,
    counters: Arc<Counters>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let delivered = last.clone();
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let at = Instant::now();
            if n == 0 {
                let _ = tx.send((at, None));
                return;
            }
            if direction == UP {
                counters.bytes_up.fetch_add(n as u64, Ordering::SeqCst);
            } else {
                if last.swap(DOWN, Ordering::SeqCst) == UP {
                    counters.turns.fetch_add(1, Ordering::SeqCst);
                }
                counters.bytes_down.fetch_add(n as u64, Ordering::SeqCst);
            }
            if tx.send((at, Some(buf[..n].to_vec()))).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                    // Client bytes count once the host has them: what the host
                    // sends before that (its banner) answers nothing. No await
                    // between the write and this, so the host's reply cannot be
                    // read first on this single-threaded runtime.
                    if direction == UP {
                        delivered.store(UP, Ordering::SeqCst);
                    }
                }
                None => {
                    // Half-close, as the sender did: the other direction goes on.
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(read, write);
}

/// The relay process of `patchbook lab up --rtt`: one relay per host of the lab in
/// `dir` (in front of its sshd port), then `ready PORT…` (one port per host, in
/// `lab.json` order) on `ready`, then answers `lab turns` on the control socket
/// until it is killed (`lab down`).
pub fn serve_fleet(dir: &Path, rtt: Duration, ready: &mut dyn Write) -> Result<(), LabError> {
    let state = super::read_state(dir)?;
    let relays: Vec<(String, Relay)> = state
        .hosts
        .iter()
        .map(|h| {
            Relay::start(SocketAddr::from(([127, 0, 0, 1], h.port)), rtt)
                .map(|r| (h.name.clone(), r))
        })
        .collect::<Result<_, _>>()?;
    let socket = dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let control = UnixListener::bind(&socket).map_err(LabError::io(&socket))?;
    let ports: Vec<String> = relays
        .iter()
        .map(|(_, r)| r.addr().port().to_string())
        .collect();
    writeln!(ready, "{READY} {}", ports.join(" "))
        .and_then(|()| ready.flush())
        .map_err(LabError::io(Path::new("stdout")))?;
    for conn in control.incoming() {
        // One bad client must not end the relay: its error is its own.
        let Ok(conn) = conn else { continue };
        let _ = answer(conn, &relays);
    }
    Ok(())
}

/// One control request: a line `turns` or `reset` (read, then zero), answered with
/// the JSON map host → [`Traffic`].
fn answer(conn: UnixStream, relays: &[(String, Relay)]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let map: BTreeMap<&str, Traffic> = relays
        .iter()
        .map(|(name, r)| (name.as_str(), r.traffic()))
        .collect();
    if line.trim() == "reset" {
        relays.iter().for_each(|(_, r)| r.reset());
    }
    let mut out = &conn;
    out.write_all(&serde_json::to_vec(&map).unwrap_or_default())?;
    out.flush()
}

/// Asks the relay process of the lab in `dir` what each host's relay has seen;
/// `reset` zeroes the counters after reading them.
pub fn fleet_traffic(dir: &Path, reset: bool) -> Result<BTreeMap<String, Traffic>, LabError> {
    let socket = dir.join(SOCKET);
    let no_relay = |e: std::io::Error| LabError::NoRelay {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut conn = UnixStream::connect(&socket).map_err(no_relay)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(no_relay)?;
    conn.write_all(if reset { b"reset\n" } else { b"turns\n" })
        .map_err(no_relay)?;
    conn.shutdown(std::net::Shutdown::Write).map_err(no_relay)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut conn, &mut text).map_err(no_relay)?;
    serde_json::from_str(&text).map_err(|e| LabError::NoRelay {
        dir: dir.to_path_buf(),
        message: format!("unreadable answer: {e}"),
    })
}

/// Reads the relay process's `ready PORT…` line: one port per host.
pub(super) fn read_ready(line: &str, hosts: usize) -> Option<Vec<u16>> {
    let mut words = line.split_whitespace();
    if words.next()? != READY {
        return None;
    }
    let ports: Vec<u16> = words.map(|w| w.parse().ok()).collect::<Option<_>>()?;
    (ports.len() == hosts).then_some(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    const RTT: Duration = Duration::from_millis(60);

    /// A one-connection-at-a-time server running `script` on each connection.
    fn server(script: fn(TcpStream)) -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                c.set_nodelay(true).unwrap();
                script(c);
            }
        });
        addr
    }

    fn read_exact(c: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        c.read_exact(&mut b).unwrap();
        b
    }

    fn connect(relay: &Relay) -> TcpStream {
        let c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    #[test]
    fn a_ping_pong_takes_one_round_trip() {
        let addr = server(|mut c| {
            while let Ok(4) = c.read(&mut [0; 4]) {
                c.write_all(b"pong").unwrap();
            }
        });
        let relay = Relay::start(addr, RTT).unwrap();
        let mut c = connect(&relay);
        // The connection itself is set up by the relay at once; only data waits.
        c.write_all(b"ping").unwrap();
        assert_eq!(read_exact(&mut c, 4), b"pong");
        for _ in 0..3 {
            let t = std::time::Instant::now();
            c.write_all(b"ping").unwrap();
            assert_eq!(read_exact(&mut c, 4), b"pong");
            let took = t.elapsed();
            assert!(took >= RTT, "a round trip took {took:?}, under {RTT:?}");
            assert!(
                took < RTT * 3,
                "a round trip took {took:?}, over 3 × {RTT:?}"
            );
        }
        assert_eq!(relay.turns(), 4);
    }

    #[test]
    fn turns_count_direction_changes_exactly() {
        // A banner first (the server speaks unprompted: not a turn), then three
        // exchanges, one of them with a request and a reply in two writes each.
        let addr = server(|mut c| {
            c.write_all(b"hello").unwrap();
            assert_eq!(read_exact(&mut c, 1), b"a");
            c.write_all(b"A").unwrap();
            assert_eq!(read_exact(&mut c, 2), b"bc");
            c.write_all(b"B").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(b"C").unwrap();
            assert_eq!(read_exact(&mut c, 1), b"d");
            c.write_all(b"D").unwrap();
            let _ = c.read(&mut [0; 1]);
        });
        let relay = Relay::start(addr, Duration::from_millis(10)).unwrap();
        for round in 1..=2u64 {
            let mut c = connect(&relay);
            assert_eq!(read_exact(&mut c, 5), b"hello");
            c.write_all(b"a").unwrap();
            assert_eq!(read_exact(&mut c, 1), b"A");
            c.write_all(b"b").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(b"c").unwrap();
            assert_eq!(read_exact(&mut c, 2), b"BC");
            c.write_all(b"d").unwrap();
            assert_eq!(read_exact(&mut c, 1), b"D");
            drop(c);
            // The relay sees the close only when it arrives.
            std::thread::sleep(Duration::from_millis(50));
            let t = relay.traffic();
            assert_eq!(t.turns, 3 * round, "{t:?}");
            assert_eq!(t.connections, round);
            assert_eq!(t.bytes_up, 4 * round);
            assert_eq!(t.bytes_down, 9 * round);
        }
        relay.reset();
        assert_eq!(relay.traffic(), Traffic::default());
    }

    #[test]
    fn chunks_in_flight_overlap_and_keep_their_order() {
        // 40 chunks 3 ms apart: each must arrive half an RTT after it left. Were the
        // delay cumulative, the last would arrive 40 half-RTTs late.
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let relay = Relay::start(addr, RTT).unwrap();
        let mut c = connect(&relay);
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut at = Vec::new();
            while got.len() < 40 {
                let mut b = [0u8; 64];
                let n = s.read(&mut b).unwrap();
                assert!(n > 0);
                for &x in &b[..n] {
                    got.push(x);
                    at.push(std::time::Instant::now());
                }
            }
            (got, at)
        });
        let mut sent = Vec::new();
        for i in 0..40u8 {
            sent.push(std::time::Instant::now());
            c.write_all(&[i]).unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        let (got, at) = reader.join().unwrap();
        assert_eq!(got, (0..40).collect::<Vec<u8>>(), "order kept");
        for (i, (s, a)) in sent.iter().zip(&at).enumerate() {
            let one_way = a.duration_since(*s);
            assert!(one_way >= RTT / 2, "chunk {i}: {one_way:?}");
            // Cumulative delays would break this bound from the seventh chunk on.
            assert!(
                one_way < RTT * 3,
                "chunk {i}: {one_way:?} (cumulative delay?)"
            );
        }
    }

    #[test]
    fn half_close_reaches_the_other_side() {
        let addr = server(|mut c| {
            let mut all = Vec::new();
            c.read_to_end(&mut all).unwrap();
            c.write_all(&all).unwrap();
        });
        let relay = Relay::start(addr, Duration::from_millis(10)).unwrap();
        let mut c = connect(&relay);
        c.write_all(b"upload").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"upload");
    }

    #[test]
    fn ready_lines_need_one_port_per_host() {
        assert_eq!(read_ready("ready 100 200\n", 2), Some(vec![100, 200]));
        assert_eq!(read_ready("ready 100\n", 2), None);
        assert_eq!(read_ready("ready 100 x\n", 2), None);
        assert_eq!(read_ready("error\n", 0), None);
    }
}
