//! The host side of the agent link, speaking `fleet-agent-protocol` over either transport:
//! - a connection to a VM's virtio-serial port: on fleet's own host the unix socket libvirt
//!   binds, on a remote host the channel opened through libvirt and bridged to a socket
//!   (`driver::libvirt::channel`). QEMU accepts one client per port at a time; the guest's
//!   writes wait while no client is connected, so nothing the agent sent before the host
//!   connected is lost (over a remote channel, bytes in flight when it breaks are; the
//!   protocol resends task output);
//! - relayed exchanges (Proxmox: qemu-guest-agent `exec`), two byte streams numbered by
//!   offset as `fleet_agent_protocol::relay` describes, polled while quiet.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::driver::AgentEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the agent link: {0}")]
    Connect(std::io::Error),
    #[error("the agent link closed")]
    Closed,
    #[error("no hello from the agent within {0:?}")]
    Timeout(Duration),
    #[error("the agent speaks protocol version {0}, this fleet speaks {VERSION}")]
    Version(u32),
    #[error("agent link: {0}")]
    Protocol(String),
    #[error("agent link: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent link relay: {0}")]
    Relay(String),
}

/// An open link to one VM's agent.
pub struct AgentLink {
    transport: Transport,
    /// Ends a wait for the guest early when the host has news (see `Waker`).
    woken_by: Option<WakeSignal>,
}

/// Wakes a link that waits for its guest: the host has something for it (a new revision's
/// tasks, an answer). A link then needs no timer but for real deadlines.
#[derive(Clone)]
pub struct Waker(std::sync::Arc<UnixStream>);

/// The link's end of a `Waker`.
pub struct WakeSignal(UnixStream);

impl Waker {
    /// A waker and the signal it raises.
    pub fn pair() -> std::io::Result<(Waker, WakeSignal)> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok((Waker(std::sync::Arc::new(tx)), WakeSignal(rx)))
    }

    /// Whether both are the same waker (not merely for the same VM).
    pub fn same(&self, other: &Waker) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    /// Raises the signal; a signal already raised stays one (a full buffer is fine).
    pub fn wake(&self) {
        use std::io::Write;
        let _ = (&*self.0).write(&[1]);
    }
}

impl WakeSignal {
    /// Waits at most `timeout` for the signal; true when it was raised (and is lowered
    /// again). With every waker gone it cannot be raised: the wait is a plain sleep.
    fn wait(&mut self, timeout: Duration) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let millis = poll_millis(timeout);
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        let raised = matches!(poll(&mut fds, PollTimeout::from(millis)), Ok(n) if n > 0);
        if raised && !self.drain() {
            // End of file: nobody can wake this link any more; sleep out the wait.
            std::thread::sleep(timeout);
            return false;
        }
        raised
    }

    /// Lowers the signal (reads whatever wakes are pending); false once every waker is
    /// gone (end of file), when the signal can never be raised again.
    fn drain(&self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match (&self.0).read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    }
}

/// `timeout` as poll's milliseconds, rounded up: a wait under a millisecond must not become
/// a poll that returns at once (a spin until the deadline).
fn poll_millis(timeout: Duration) -> u16 {
    let millis = timeout.as_micros().div_ceil(1000);
    u16::try_from(millis).unwrap_or(u16::MAX)
}

enum Transport {
    Socket(SocketLink),
    Relayed(RelayedLink),
}

/// How long one write to a guest's socket may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentLink {
    pub fn connect(endpoint: &AgentEndpoint) -> Result<AgentLink, LinkError> {
        let socket = |stream: UnixStream| {
            // A guest that stops reading must not pin this link's thread forever: a write
            // that cannot finish in time ends the link (it is opened again).
            stream
                .set_write_timeout(Some(WRITE_TIMEOUT))
                .map_err(LinkError::Connect)?;
            Ok::<_, LinkError>(Transport::Socket(SocketLink {
                reader: BufReader::new(stream),
                partial: Vec::new(),
            }))
        };
        let transport = match endpoint {
            AgentEndpoint::UnixSocket(path) => {
                socket(UnixStream::connect(path).map_err(LinkError::Connect)?)?
            }
            AgentEndpoint::Connected(stream) => {
                socket(stream.try_clone().map_err(LinkError::Connect)?)?
            }
            AgentEndpoint::Relayed(exchange) => {
                Transport::Relayed(RelayedLink::open(exchange.clone())?)
            }
        };
        Ok(AgentLink {
            transport,
            woken_by: None,
        })
    }

    /// Lets `signal` end this link's waits early: a socket link's wait for the guest, a
    /// relayed link's pause between exchanges (its next exchange is then made at once).
    pub fn wake_on(&mut self, signal: WakeSignal) {
        self.woken_by = Some(signal);
    }

    /// Greets the agent, which answers with its hello (also after either side restarted).
    pub fn greet(&mut self) -> Result<(), LinkError> {
        self.send(&HostMessage::Hello { v: VERSION })
    }

    pub fn send(&mut self, message: &HostMessage) -> Result<(), LinkError> {
        // A `Secrets` line carries values (base64): wiped when it is dropped.
        let line = zeroize::Zeroizing::new(message.to_line());
        match &mut self.transport {
            Transport::Socket(link) => {
                use std::io::Write;
                let mut stream = link.reader.get_ref();
                stream.write_all(line.as_bytes())?;
                Ok(stream.flush()?)
            }
            Transport::Relayed(link) => link.send(line.as_bytes()),
        }
    }

    /// The next message, waiting at most `timeout`. A line cut by the timeout is kept and
    /// completed by the next call.
    /// A raised wake signal ends the wait early as a timeout.
    pub fn next(&mut self, timeout: Duration) -> Result<GuestMessage, LinkError> {
        let line = match &mut self.transport {
            Transport::Socket(link) => {
                match link.ready(self.woken_by.as_ref(), timeout)? {
                    Ready::Guest => {}
                    Ready::Woken | Ready::Timeout => return Err(LinkError::Timeout(timeout)),
                    // No waker is left: wait on the guest alone from now on (never spin).
                    Ready::WakerGone => {
                        self.woken_by = None;
                        return Err(LinkError::Timeout(timeout));
                    }
                }
                link.next_line(timeout)?
            }
            Transport::Relayed(link) => link.next_line(timeout, self.woken_by.as_mut())?,
        };
        let line = String::from_utf8(line)
            .map_err(|_| LinkError::Protocol("a line that is not UTF-8".into()))?;
        let message = GuestMessage::from_line(&line).map_err(LinkError::Protocol)?;
        if message.version() != VERSION {
            return Err(LinkError::Version(message.version()));
        }
        Ok(message)
    }

    /// Waits for the agent's hello (skipping heartbeats), at most `timeout` in all.
    pub fn hello(&mut self, timeout: Duration) -> Result<GuestMessage, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            let message = self.next(left)?;
            if matches!(message, GuestMessage::Hello { .. }) {
                return Ok(message);
            }
        }
    }
}

/// What ended a wait on a socket link.
enum Ready {
    /// The guest sent something (or the socket closed: the read reports it).
    Guest,
    Woken,
    Timeout,
    /// Every `Waker` of the link's signal is gone.
    WakerGone,
}

/// The link over a unix socket bound to the VM's virtio-serial port.
struct SocketLink {
    reader: BufReader<UnixStream>,
    /// The start of a line whose end has not arrived yet (a read timed out in its middle).
    partial: Vec<u8>,
}

impl SocketLink {
    /// Waits until the guest has sent something, `timeout` passes or `wake` is raised (the
    /// signal is lowered). Bytes already buffered are ready at once.
    fn ready(&self, wake: Option<&WakeSignal>, timeout: Duration) -> Result<Ready, LinkError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let Some(wake) = wake else {
            return Ok(Ready::Guest);
        };
        if !self.reader.buffer().is_empty() {
            return Ok(Ready::Guest);
        }
        let millis = poll_millis(timeout);
        let mut fds = [
            PollFd::new(self.reader.get_ref().as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.0.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let has = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        // A closed or broken socket reads as ready: the read that follows reports it.
        if has(&fds[0]) {
            return Ok(Ready::Guest);
        }
        if has(&fds[1]) {
            return Ok(if wake.drain() {
                Ready::Woken
            } else {
                Ready::WakerGone
            });
        }
        Ok(Ready::Timeout)
    }

    fn next_line(&mut self, timeout: Duration) -> Result<Vec<u8>, LinkError> {
        // A zero timeout asks for what has arrived; the socket takes no zero (it means
        // "block"), and one millisecond finishes a line already on its way.
        let timeout = timeout.max(Duration::from_millis(1));
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let limit = fleet_agent_protocol::MAX_LINE_BYTES as u64 + 1;
        let room = limit.saturating_sub(self.partial.len() as u64);
        let read = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.partial);
        match read {
            Ok(0) if self.partial.is_empty() => Err(LinkError::Closed),
            Ok(_) if !self.partial.ends_with(b"\n") => {
                if self.partial.len() as u64 >= limit {
                    return Err(too_long());
                }
                Err(LinkError::Closed)
            }
            Ok(_) => Ok(std::mem::take(&mut self.partial)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(LinkError::Timeout(timeout))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn too_long() -> LinkError {
    LinkError::Protocol(format!(
        "a line longer than {} bytes",
        fleet_agent_protocol::MAX_LINE_BYTES
    ))
}

/// Exchanges while bytes flow follow each other at once; a quiet link is asked again after
/// a pause that doubles from the first to the last of these.
const RELAY_IDLE_FIRST: Duration = Duration::from_millis(100);
const RELAY_IDLE_MAX: Duration = Duration::from_secs(2);
/// How long the guest may hold an exchange that carries bytes, so its answer to them comes
/// back in the same exchange.
const RELAY_ANSWER_WAIT_MS: u64 = 100;
/// Host bytes buffered at most before `send` waits for the guest to take some.
const RELAY_OUTGOING_CAP: usize = 1024 * 1024;
/// Tries of one exchange that fails transiently before the link counts as lost.
const RELAY_ATTEMPTS: u32 = 4;
/// How long `send` waits for the guest to take bytes before the link counts as lost.
const RELAY_STALL: Duration = Duration::from_secs(35);

/// The link relayed through exchanges (`fleet_agent_protocol::relay`): two byte streams
/// numbered by offset, so a failed or repeated exchange loses and repeats nothing.
struct RelayedLink {
    exchange: std::sync::Arc<dyn crate::driver::GuestExchange>,
    session: String,
    /// The guest boot this link talks to; another boot refuses its bytes.
    boot_id: String,
    /// Host bytes the guest has not confirmed; `confirmed` is the stream position of the first.
    outgoing: VecDeque<u8>,
    confirmed: u64,
    /// Guest bytes received in all, and those not yet cut into lines.
    acked: u64,
    incoming: Vec<u8>,
    /// Where the next line starts in `incoming`: lines are taken by moving it, and what was
    /// read is dropped only once it is half the buffer, so taking lines costs linear time
    /// however many short lines a reply holds.
    read_from: usize,
    idle: Duration,
    next_exchange: Instant,
}

impl RelayedLink {
    /// Opens a session: the first exchange carries no bytes and learns the guest's boot.
    fn open(
        exchange: std::sync::Arc<dyn crate::driver::GuestExchange>,
    ) -> Result<RelayedLink, LinkError> {
        let mut link = RelayedLink {
            exchange,
            session: session_id(),
            boot_id: String::new(),
            outgoing: VecDeque::new(),
            confirmed: 0,
            acked: 0,
            incoming: Vec::new(),
            read_from: 0,
            idle: Duration::ZERO,
            next_exchange: Instant::now(),
        };
        link.exchange(0)?;
        Ok(link)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.outgoing.extend(bytes);
        self.next_exchange = Instant::now();
        // A guest that takes nothing holds the sender back, as a full socket would.
        let since = Instant::now();
        while self.outgoing.len() > RELAY_OUTGOING_CAP {
            if !self.exchange(RELAY_ANSWER_WAIT_MS)? {
                if since.elapsed() > RELAY_STALL {
                    return Err(LinkError::Timeout(RELAY_STALL));
                }
                std::thread::sleep(RELAY_IDLE_FIRST);
            }
        }
        Ok(())
    }

    /// The next line, exchanging as the idle backoff says; between exchanges the wait
    /// ends early when `wake` is raised (a timeout, as on a socket link).
    fn next_line(
        &mut self,
        timeout: Duration,
        mut wake: Option<&mut WakeSignal>,
    ) -> Result<Vec<u8>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.incoming[self.read_from..]
                .iter()
                .position(|&b| b == b'\n')
            {
                let end = self.read_from + at + 1;
                let line = self.incoming[self.read_from..end].to_vec();
                self.read_from = end;
                if self.read_from * 2 > self.incoming.len() {
                    self.incoming.drain(..self.read_from);
                    self.read_from = 0;
                }
                return Ok(line);
            }
            if self.incoming.len() - self.read_from > fleet_agent_protocol::MAX_LINE_BYTES {
                return Err(too_long());
            }
            let now = Instant::now();
            if now >= self.next_exchange {
                let wait = if self.outgoing.is_empty() {
                    0
                } else {
                    RELAY_ANSWER_WAIT_MS
                };
                let moved = self.exchange(wait)?;
                self.idle = if moved {
                    Duration::ZERO
                } else {
                    (self.idle * 2).clamp(RELAY_IDLE_FIRST, RELAY_IDLE_MAX)
                };
                self.next_exchange = Instant::now() + self.idle;
                continue;
            }
            if now >= deadline {
                return Err(LinkError::Timeout(timeout));
            }
            let pause = self.next_exchange.min(deadline) - now;
            match wake.as_deref_mut() {
                Some(signal) => {
                    if signal.wait(pause) {
                        // The host has news: exchange now, whatever the idle backoff said.
                        self.next_exchange = Instant::now();
                        self.idle = Duration::ZERO;
                        return Err(LinkError::Timeout(timeout));
                    }
                }
                None => std::thread::sleep(pause),
            }
        }
    }

    /// One exchange: sends what the guest has not confirmed (as much as one request takes)
    /// and acknowledges what arrived. Returns whether any byte moved.
    fn exchange(&mut self, wait_ms: u64) -> Result<bool, LinkError> {
        use fleet_agent_protocol::relay::{self, MAX_REQUEST_BYTES, Reply, Request};
        // Both copies of the host's bytes (raw and encoded) are wiped when dropped.
        let chunk: zeroize::Zeroizing<Vec<u8>> =
            zeroize::Zeroizing::new(if self.boot_id.is_empty() {
                Vec::new()
            } else {
                self.outgoing
                    .iter()
                    .take(MAX_REQUEST_BYTES)
                    .copied()
                    .collect()
            });
        let request = Request {
            v: VERSION,
            session: self.session.clone(),
            boot_id: (!self.boot_id.is_empty()).then(|| self.boot_id.clone()),
            offset: self.confirmed,
            acked: self.acked,
            wait_ms,
        };
        // The same request can be sent again whether or not the guest saw it (the offsets
        // make it idempotent), so a transient failure costs a retry, not the link.
        let wire = zeroize::Zeroizing::new(relay::encode(&request, &chunk));
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            match self.exchange.exchange(&wire) {
                Ok(answer) => break answer,
                Err(e)
                    if e.kind == crate::driver::ErrorKind::Transient
                        && attempt < RELAY_ATTEMPTS =>
                {
                    tracing::debug!("relayed exchange failed, sending it again: {}", e.message);
                    std::thread::sleep(RELAY_IDLE_FIRST * attempt);
                }
                Err(e) => return Err(LinkError::Relay(e.to_string())),
            }
        };
        let (reply, bytes) = relay::decode::<Reply>(&answer).map_err(LinkError::Protocol)?;
        if let Some(why) = reply.error {
            return Err(LinkError::Protocol(format!(
                "the guest refused an exchange: {why}"
            )));
        }
        if reply.session != self.session {
            return Err(LinkError::Closed);
        }
        if self.boot_id.is_empty() {
            self.boot_id = reply.boot_id;
        } else if reply.boot_id != self.boot_id {
            return Err(LinkError::Closed);
        }
        let end = self.confirmed + chunk.len() as u64;
        if reply.received < self.confirmed || reply.received > end {
            return Err(LinkError::Protocol(format!(
                "the guest has {} of the host's bytes, expected {}..={end}",
                reply.received, self.confirmed
            )));
        }
        let taken = (reply.received - self.confirmed) as usize;
        // Wiped before the queue lets the slots go: they may hold secret values.
        self.outgoing.range_mut(..taken).for_each(|b| *b = 0);
        self.outgoing.drain(..taken);
        self.confirmed = reply.received;
        if reply.offset > self.acked {
            return Err(LinkError::Protocol(format!(
                "the guest skipped its bytes {}..{}",
                self.acked, reply.offset
            )));
        }
        let seen = (self.acked - reply.offset) as usize;
        let new = bytes.get(seen..).unwrap_or_default();
        self.incoming.extend_from_slice(new);
        self.acked += new.len() as u64;
        Ok(taken > 0 || !new.is_empty())
    }
}

/// A name for a new relayed session, unique enough that two host links never share one.
fn session_id() -> String {
    use sha2::Digest as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}:{}:{}",
        std::process::id(),
        now.as_nanos(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    crate::digest::hex(&sha2::Sha256::digest(seed.as_bytes()))[..32].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_agent_protocol::relay::{self, Reply, Request};

    /// A guest that takes every byte and never has any to send.
    struct QuietGuest;

    impl crate::driver::GuestExchange for QuietGuest {
        fn exchange(&self, request: &str) -> Result<String, crate::driver::DriverError> {
            let (request, bytes) = relay::decode::<Request>(request).map_err(|e| {
                crate::driver::DriverError::new(crate::driver::ErrorKind::Permanent, e)
            })?;
            let reply = Reply {
                v: VERSION,
                session: request.session,
                boot_id: "boot-1".into(),
                received: request.offset + bytes.len() as u64,
                offset: request.acked,
                error: None,
            };
            Ok(relay::encode(&reply, &[]))
        }

        fn describe(&self) -> String {
            "a quiet guest".into()
        }
    }

    #[test]
    fn a_relayed_link_is_woken_between_exchanges() {
        let endpoint = AgentEndpoint::Relayed(std::sync::Arc::new(QuietGuest));
        let mut link = AgentLink::connect(&endpoint).expect("a session");
        let (waker, signal) = Waker::pair().expect("a waker");
        link.wake_on(signal);
        // Raised before the wait: the link's first pause ends at once, where it would
        // otherwise sit out the whole wait (nothing comes from this guest).
        waker.wake();
        let started = Instant::now();
        let waited = link.next(Duration::from_secs(30));
        assert!(matches!(waited, Err(LinkError::Timeout(_))), "{waited:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "woken, not timed out: {:?}",
            started.elapsed()
        );
    }
}
