//! The guest half of the relayed link (`fleet-agent relay` and `fleet-agent exchange`); the
//! protocol is described in `fleet_agent_protocol::relay`.
//!
//! The agent itself runs unchanged: it reads host bytes from one pipe and writes its messages
//! into another, as it would use the virtio-serial port. The relay moves bytes between those
//! pipes and the exchanges that arrive on its socket, one exchange at a time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_agent_protocol::VERSION;
use fleet_agent_protocol::relay::{
    self, MAX_REPLY_BYTES, MAX_WAIT_MS, MAX_WIRE_BYTES, Reply, Request,
};

/// Guest bytes held for the host at most; beyond this the agent's writes wait, as they do
/// on a virtio-serial port nobody reads.
const OUT_CAP: usize = 8 * 1024 * 1024;
/// How long one exchange may take to arrive or be answered on the socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Relay {
    boot_id: String,
    state: Mutex<State>,
    /// Signalled when guest bytes arrive or the host acknowledges some.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    session: Option<String>,
    /// Host bytes passed to the agent in this session.
    received: u64,
    /// Whether the last host byte passed to the agent ended a line.
    inbound_mid_line: bool,
    /// Guest bytes not yet acknowledged; `out_base` is the stream position of the first.
    out: VecDeque<u8>,
    out_base: u64,
    /// Stream position where the line the agent is writing began.
    line_start: u64,
    /// Drop guest bytes up to the next newline: a new session began while the host had
    /// seen part of that line.
    skip_line: bool,
}

impl State {
    fn out_end(&self) -> u64 {
        self.out_base + self.out.len() as u64
    }

    /// A new host link: both streams start again at 0. Whole lines waiting for the old host
    /// are dropped (the agent answers the new host's greeting and sends its outboxes again);
    /// a line the agent is still writing is kept, unless the old host saw part of it.
    fn new_session(&mut self, session: String) {
        if self.out_base > self.line_start {
            self.out.clear();
            self.skip_line = true;
        } else {
            let whole_lines = (self.line_start - self.out_base) as usize;
            self.out.drain(..whole_lines.min(self.out.len()));
        }
        self.out_base = 0;
        self.line_start = 0;
        self.received = 0;
        self.session = Some(session);
    }

    fn ack(&mut self, acked: u64) {
        let done = acked.min(self.out_end()).saturating_sub(self.out_base) as usize;
        self.out.drain(..done);
        self.out_base += done as u64;
    }

    fn push(&mut self, mut bytes: &[u8]) {
        if self.skip_line {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    bytes = &bytes[end + 1..];
                    self.skip_line = false;
                }
                None => return,
            }
        }
        if let Some(last) = bytes.iter().rposition(|&b| b == b'\n') {
            self.line_start = self.out_end() + last as u64 + 1;
        }
        self.out.extend(bytes);
    }
}

impl Relay {
    pub fn new(boot_id: String) -> Relay {
        Relay {
            boot_id,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collects what the agent writes, holding it until a host acknowledges it.
    pub fn pump(&self, mut from_agent: impl Read) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_agent.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut state = self.lock();
            while state.out.len() >= OUT_CAP {
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.push(&buf[..n]);
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Answers exchanges, one at a time, until the socket fails.
    pub fn serve(&self, listener: &UnixListener, mut to_agent: impl Write) -> std::io::Error {
        loop {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => return e,
            };
            let answer = read_request(&mut stream)
                .map(|(request, bytes)| self.exchange(request, &bytes, &mut to_agent));
            let wire = match answer {
                Ok(Ok((reply, bytes))) => relay::encode(&reply, &bytes),
                Ok(Err(e)) => return e,
                Err(problem) => relay::encode(
                    &Reply {
                        v: VERSION,
                        session: String::new(),
                        boot_id: self.boot_id.clone(),
                        received: 0,
                        offset: 0,
                        error: Some(problem),
                    },
                    &[],
                ),
            };
            // The host may have given up on this exchange; it asks again.
            let _ = stream.write_all(wire.as_bytes());
        }
    }

    /// One exchange: takes the host's bytes it has not had yet, drops what the host
    /// acknowledged, and answers with what the host has not seen (waiting up to the
    /// request's `wait_ms` when there is nothing yet). An error means the agent is gone.
    fn exchange(
        &self,
        request: Request,
        bytes: &[u8],
        to_agent: &mut impl Write,
    ) -> std::io::Result<(Reply, Vec<u8>)> {
        let mut state = self.lock();
        let refuse = |state: &State, why: String| Reply {
            v: VERSION,
            session: request.session.clone(),
            boot_id: self.boot_id.clone(),
            received: state.received,
            offset: state.out_base,
            error: Some(why),
        };
        if request.v != VERSION {
            let why = format!("protocol version {} (this agent: {VERSION})", request.v);
            return Ok((refuse(&state, why), Vec::new()));
        }
        if request.boot_id.as_ref().is_some_and(|b| *b != self.boot_id) {
            let why = format!(
                "these bytes are for boot {}, this guest is boot {}",
                request.boot_id.as_deref().unwrap_or_default(),
                self.boot_id
            );
            return Ok((refuse(&state, why), Vec::new()));
        }
        if request.boot_id.is_none() && !bytes.is_empty() {
            let why = "bytes without the boot they are for".to_owned();
            return Ok((refuse(&state, why), Vec::new()));
        }
        // A line the old host left unfinished is ended, so the agent drops it whole.
        let mut cut_line = false;
        if state.session.as_deref() != Some(request.session.as_str()) {
            cut_line = std::mem::take(&mut state.inbound_mid_line);
            state.new_session(request.session.clone());
        }
        state.ack(request.acked);
        // Bytes before `received` arrived in an earlier exchange; a gap (`offset` beyond
        // `received`) takes nothing, and the reply tells the host where to resume.
        let new = if request.offset <= state.received {
            let seen = (state.received - request.offset) as usize;
            bytes.get(seen..).unwrap_or_default()
        } else {
            &[]
        };
        state.received += new.len() as u64;
        if let Some(&last) = new.last() {
            state.inbound_mid_line = last != b'\n';
        }
        drop(state);
        // Outside the lock: the agent may be slow to read, and the pump must go on.
        if cut_line {
            to_agent.write_all(b"\n")?;
        }
        to_agent.write_all(new)?;
        to_agent.flush()?;
        self.changed.notify_all();

        let mut state = self.lock();
        let wait = Duration::from_millis(request.wait_ms.min(MAX_WAIT_MS));
        let until = Instant::now() + wait;
        while state.out.is_empty() && state.session.as_deref() == Some(request.session.as_str()) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if state.session.as_deref() != Some(request.session.as_str()) {
            let why = "another host link took over".to_owned();
            return Ok((refuse(&state, why), Vec::new()));
        }
        let send: Vec<u8> = state.out.iter().take(MAX_REPLY_BYTES).copied().collect();
        let reply = Reply {
            v: VERSION,
            session: request.session,
            boot_id: self.boot_id.clone(),
            received: state.received,
            offset: state.out_base,
            error: None,
        };
        Ok((reply, send))
    }
}

fn read_request(stream: &mut UnixStream) -> Result<(Request, Vec<u8>), String> {
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SOCKET_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut wire = String::new();
    stream
        .take(MAX_WIRE_BYTES as u64 + 1)
        .read_to_string(&mut wire)
        .map_err(|e| format!("reading the request: {e}"))?;
    relay::decode(&wire)
}

/// Binds the relay's socket, for root only (qemu-guest-agent runs as root).
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A socket left by an earlier run of the relay.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// `fleet-agent exchange`: stdin to the relay, the relay's answer to stdout.
pub fn exchange(socket: &Path) -> Result<(), String> {
    let mut request = Vec::new();
    std::io::stdin()
        .take(MAX_WIRE_BYTES as u64 + 1)
        .read_to_end(&mut request)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "{}: {e} (is `fleet-agent relay` running?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&request)
        .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut reply = Vec::new();
    stream
        .take(MAX_WIRE_BYTES as u64 + 1)
        .read_to_end(&mut reply)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if reply.is_empty() {
        return Err("the relay closed without an answer".into());
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(session: &str, offset: u64, acked: u64) -> Request {
        Request {
            v: VERSION,
            session: session.into(),
            boot_id: Some("boot-1".into()),
            offset,
            acked,
            wait_ms: 0,
        }
    }

    #[test]
    fn bytes_cross_once_in_order_whatever_is_repeated() {
        let relay = Relay::new("boot-1".into());
        let mut agent_in = Vec::new();
        relay
            .exchange(request("s", 0, 0), b"", &mut agent_in)
            .expect("exchange");
        relay.lock().push(b"hello\nwor");
        let (reply, bytes) = relay
            .exchange(request("s", 0, 0), b"abc", &mut agent_in)
            .expect("exchange");
        assert_eq!((reply.received, reply.offset), (3, 0));
        assert_eq!(bytes, b"hello\nwor");
        // The same request again (its reply was lost): nothing is taken twice.
        let (reply, _) = relay
            .exchange(request("s", 0, 0), b"abc", &mut agent_in)
            .expect("exchange");
        assert_eq!(reply.received, 3);
        // Overlapping bytes: only the new part is taken; the ack drops what the host has.
        relay.lock().push(b"ld\n");
        let (reply, bytes) = relay
            .exchange(request("s", 1, 6), b"bcdef", &mut agent_in)
            .expect("exchange");
        assert_eq!((reply.received, reply.offset), (6, 6));
        assert_eq!(bytes, b"world\n");
        assert_eq!(agent_in, b"abcdef");
        // A gap takes nothing and says where to resume.
        let (reply, _) = relay
            .exchange(request("s", 9, 12), b"xyz", &mut agent_in)
            .expect("exchange");
        assert_eq!(reply.received, 6);
        assert_eq!(agent_in, b"abcdef");
    }

    #[test]
    fn a_new_session_starts_on_whole_lines() {
        let relay = Relay::new("boot-1".into());
        let mut agent_in = Vec::new();
        relay.lock().push(b"old line\npart");
        relay
            .exchange(request("a", 0, 0), b"half a li", &mut agent_in)
            .expect("exchange");
        // The old host saw "old line\npa" (acked 11); a new host comes.
        relay
            .exchange(request("a", 9, 11), b"", &mut agent_in)
            .expect("exchange");
        let (reply, bytes) = relay
            .exchange(request("b", 0, 0), b"greet\n", &mut agent_in)
            .expect("exchange");
        assert_eq!((reply.received, reply.offset), (6, 0));
        assert!(bytes.is_empty(), "{bytes:?}");
        // The old host's unfinished line is ended before the new host's bytes.
        assert_eq!(agent_in, b"half a li\ngreet\n");
        // The rest of the line the old host saw part of is dropped; the next line arrives.
        relay.lock().push(b"ial\nnext\n");
        let (_, bytes) = relay
            .exchange(request("b", 6, 0), b"", &mut agent_in)
            .expect("exchange");
        assert_eq!(bytes, b"next\n");
    }

    #[test]
    fn another_boot_takes_nothing() {
        let relay = Relay::new("boot-2".into());
        let mut agent_in = Vec::new();
        let (reply, _) = relay
            .exchange(request("s", 0, 0), b"secret\n", &mut agent_in)
            .expect("exchange");
        assert!(reply.error.is_some_and(|e| e.contains("boot-1")));
        assert!(agent_in.is_empty());
        // The first exchange of a session names no boot, and so may carry no bytes.
        let mut first = request("s", 0, 0);
        first.boot_id = None;
        let (reply, _) = relay
            .exchange(first.clone(), b"x", &mut agent_in)
            .expect("exchange");
        assert!(reply.error.is_some());
        let (reply, _) = relay.exchange(first, b"", &mut agent_in).expect("exchange");
        assert_eq!((reply.error, reply.boot_id.as_str()), (None, "boot-2"));
    }
}
