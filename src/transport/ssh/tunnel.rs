//! The way through jump hosts: each bastion's session opens a `direct-tcpip`
//! channel to the next hop, and a relay thread pumps bytes between that channel
//! and one end of a socketpair whose other end carries the next hop's session
//! (libssh2 needs a socket, not a channel, under a session).
//!
//! It owns the bastions' sessions, their channels and the relay threads, and
//! nothing else: no handshake, host-key check or authentication happens here
//! (the caller does them for every hop). A [`Tunnel`] stops and joins its relays
//! when dropped, innermost first, so no relay thread outlives the transport.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ssh2::{BlockDirections, Channel, Session};

/// Bytes a relay holds in each direction before it stops reading that side.
const RELAY_BUFFER: usize = 64 * 1024;
/// Longest a relay sleeps with nothing to do before it looks at its stop flag.
const RELAY_POLL: Duration = Duration::from_millis(10);

/// The socket under a session: a TCP connection for the first hop, a socketpair
/// end fed by a relay for every hop behind a bastion.
#[derive(Debug)]
pub(super) enum Wire {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Wire {
    pub fn try_clone(&self) -> std::io::Result<Wire> {
        Ok(match self {
            Wire::Tcp(s) => Wire::Tcp(s.try_clone()?),
            Wire::Unix(s) => Wire::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Wire::Tcp(s) => s.shutdown(how),
            Wire::Unix(s) => s.shutdown(how),
        }
    }

    /// Hands the socket to a session, which then owns it.
    pub fn attach(self, sess: &mut Session) {
        match self {
            Wire::Tcp(s) => sess.set_tcp_stream(s),
            Wire::Unix(s) => sess.set_tcp_stream(s),
        }
    }
}

impl AsRawFd for Wire {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Wire::Tcp(s) => s.as_raw_fd(),
            Wire::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// One bastion on the way: its authenticated session, a clone of its socket, and
/// the relay that carries the next hop once [`Tunnel::open_next`] has run.
struct Bastion {
    name: String,
    sess: Session,
    sock: Wire,
    relay: Option<Relay>,
}

struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bastions of one host's connection, first hop first.
#[derive(Default)]
pub(super) struct Tunnel {
    bastions: Vec<Bastion>,
}

impl Tunnel {
    /// Adds an authenticated bastion session; the next [`Tunnel::open_next`]
    /// dials from it.
    pub fn push(&mut self, name: &str, sess: Session, sock: Wire) {
        self.bastions.push(Bastion {
            name: name.to_string(),
            sess,
            sock,
            relay: None,
        });
    }

    /// The name of the bastion the next hop is dialled from.
    pub fn last_name(&self) -> Option<&str> {
        self.bastions.last().map(|b| b.name.as_str())
    }

    /// Asks the last bastion to connect to `address:port` and returns the socket
    /// the next session runs over. `timeout` bounds the channel open.
    pub fn open_next(
        &mut self,
        address: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Wire, String> {
        let Some(b) = self.bastions.last_mut() else {
            return Err("no jump host to dial from".into());
        };
        b.sess.set_blocking(true);
        b.sess.set_timeout(super::millis(timeout));
        let channel = b
            .sess
            .channel_direct_tcpip(address, port, None)
            .map_err(|e| {
                format!(
                    "jump host `{}` could not open a connection to {address}:{port} ({e}); \
                     does its sshd allow TCP forwarding (AllowTcpForwarding) and reach that address?",
                    b.name
                )
            })?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
        let upstream = b
            .sock
            .try_clone()
            .map_err(|e| format!("cannot clone the socket of jump host `{}`: {e}", b.name))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sess = b.sess.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ssh-relay-{}", b.name))
            .spawn(move || relay(channel, &sess, theirs, &upstream, &flag))
            .map_err(|e| format!("cannot start the relay thread: {e}"))?;
        b.relay = Some(Relay {
            stop,
            thread: Some(thread),
        });
        Ok(Wire::Unix(ours))
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The innermost relay carries everything behind it: end it first.
        for b in self.bastions.iter_mut().rev() {
            if let Some(r) = &mut b.relay {
                r.end();
            }
        }
    }
}

/// A bounded byte buffer read from one side and written to the other.
struct Pending {
    buf: Vec<u8>,
    len: usize,
}

impl Pending {
    fn new() -> Self {
        Pending {
            buf: vec![0; RELAY_BUFFER],
            len: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn has_room(&self) -> bool {
        self.len < self.buf.len()
    }
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }
    fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }
}

/// Pumps bytes between `local` (the next session's socketpair end) and
/// `channel` until either side closes or `stop` is set. Both sides are
/// non-blocking; when neither moves, it waits on both sockets.
fn relay(
    mut channel: Channel,
    sess: &Session,
    mut local: UnixStream,
    upstream: &Wire,
    stop: &AtomicBool,
) {
    sess.set_blocking(false);
    if local.set_nonblocking(true).is_err() {
        return;
    }
    let mut up = Pending::new();
    let mut down = Pending::new();
    let mut local_closed = false;
    let mut channel_closed = false;
    while !stop.load(Ordering::Relaxed) {
        let mut moved = false;
        if !local_closed && up.has_room() {
            match local.read(up.spare()) {
                Ok(0) => local_closed = true,
                Ok(n) => {
                    up.len += n;
                    moved = true;
                }
                Err(e) if again(&e) => {}
                Err(_) => local_closed = true,
            }
        }
        if !up.is_empty() {
            match channel.write(up.data()) {
                Ok(n) => {
                    up.consume(n);
                    moved |= n > 0;
                }
                Err(e) if again(&e) => {}
                Err(_) => break,
            }
        }
        if !channel_closed && down.has_room() {
            match channel.read(down.spare()) {
                Ok(0) => channel_closed = channel.eof(),
                Ok(n) => {
                    down.len += n;
                    moved = true;
                }
                Err(e) if again(&e) => {}
                Err(_) => channel_closed = true,
            }
        }
        if !down.is_empty() {
            match local.write(down.data()) {
                Ok(n) => {
                    down.consume(n);
                    moved |= n > 0;
                }
                Err(e) if again(&e) => {}
                Err(_) => break,
            }
        }
        // Either side closing ends the relay once what it sent is passed on.
        if (local_closed && up.is_empty()) || (channel_closed && down.is_empty()) {
            break;
        }
        if !moved {
            wait(&local, &up, &down, upstream, sess);
        }
    }
    let _ = channel.send_eof();
    let _ = channel.close();
    let _ = local.shutdown(Shutdown::Both);
}

fn again(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Waits at most [`RELAY_POLL`] for either socket to be ready in a direction
/// the relay can use.
fn wait(local: &UnixStream, up: &Pending, down: &Pending, upstream: &Wire, sess: &Session) {
    let mut local_events = 0;
    if up.has_room() {
        local_events |= libc::POLLIN;
    }
    if !down.is_empty() {
        local_events |= libc::POLLOUT;
    }
    // With no room for the channel's data, a readable socket is no news.
    let mut upstream_events = if down.has_room() { libc::POLLIN } else { 0 };
    if matches!(
        sess.block_directions(),
        BlockDirections::Outbound | BlockDirections::Both
    ) {
        upstream_events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: local.as_raw_fd(),
            events: local_events,
            revents: 0,
        },
        libc::pollfd {
            fd: upstream.as_raw_fd(),
            events: upstream_events,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds on sockets this relay holds, for a bounded time.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            i32::try_from(RELAY_POLL.as_millis()).unwrap_or(i32::MAX),
        );
    }
}
