//! The host half of brokered egress: the streams a guest's proxy opens over its agent link
//! (`fleet_agent_protocol::stream`) are read here, checked against the VM's egress rules
//! (`egress`), and dialed by the host itself, so the guest needs no route, no DNS and no
//! network card.
//!
//! One `Broker` per agent link. The link thread hands it the guest's stream messages
//! (`on_guest`, never blocking) and sends what it queued (`outgoing`); each stream has a
//! worker thread that reads the proxy request, decides, resolves, dials and then copies
//! the guest's bytes upstream, and a reader thread that copies the upstream's bytes back
//! within the guest's credit. Every stream's buffers are bounded by its window, and a link
//! holds at most `stream::MAX_STREAMS`.
//!
//! This first slice tunnels `CONNECT` only (TLS, which is what agents and git use); a
//! plain-HTTP request is refused with a 403 saying so.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine;
use fleet_agent_protocol::stream::{self, RecvWindow, SendWindow};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::agent_link::Waker;
use crate::egress::{self, BadRequest, Decision, ProxyKind, Rule};

/// How long dialing an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves a host and port to addresses; the system resolver in production, a table in
/// tests (no traffic may leave the machine).
pub type Resolve = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

/// The system resolver.
pub fn system_resolver() -> Resolve {
    Arc::new(|host, port| Ok((host, port).to_socket_addrs()?.collect()))
}

/// The VM's egress rules as they are now (`None`: it has no brokered egress), asked for
/// as each stream opens, so a new revision's rules apply without touching the VM.
pub type Rules = Arc<dyn Fn() -> Option<Arc<[Rule]>> + Send + Sync>;

/// What the broker tells the rest of the host: a refused destination (for the
/// `egress.denied` event), with the stream's request and why.
pub type OnDenied = Arc<dyn Fn(String) + Send + Sync>;

/// Messages for the guest, queued by stream threads and sent by the link thread.
#[derive(Clone, Default)]
pub struct Outbox {
    queue: Arc<Mutex<VecDeque<HostMessage>>>,
    waker: Option<Waker>,
}

impl Outbox {
    pub fn new(waker: Option<Waker>) -> Outbox {
        Outbox {
            queue: Arc::default(),
            waker,
        }
    }

    fn push(&self, message: HostMessage) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(message);
        if let Some(waker) = &self.waker {
            waker.wake();
        }
    }

    /// Everything queued so far.
    pub fn take(&self) -> Vec<HostMessage> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    fn data(&self, stream: u32, bytes: &[u8]) {
        self.push(HostMessage::StreamData {
            v: VERSION,
            stream,
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        });
    }

    fn close(&self, stream: u32, error: Option<String>) {
        self.push(HostMessage::StreamClose {
            v: VERSION,
            stream,
            error,
        });
    }
}

/// What the link thread passes a stream's worker.
enum Inbound {
    Data(Vec<u8>),
    Credit(u64),
    Close,
}

struct StreamHandle {
    inbound: Sender<Inbound>,
    /// The guest's credit on this stream: checked by the link thread as bytes arrive,
    /// returned by the worker as it writes them upstream.
    recv: Arc<Mutex<RecvWindow>>,
}

/// One link's streams.
pub struct Broker {
    /// The VM's rules now; `None` when it has no brokered egress (every stream is refused).
    rules: Rules,
    resolve: Resolve,
    on_denied: OnDenied,
    streams: HashMap<u32, StreamHandle>,
    outbox: Outbox,
}

impl Broker {
    pub fn new(rules: Rules, resolve: Resolve, on_denied: OnDenied, outbox: Outbox) -> Broker {
        Broker {
            rules,
            resolve,
            on_denied,
            streams: HashMap::new(),
            outbox,
        }
    }

    /// What the link thread sends next.
    pub fn outgoing(&self) -> Vec<HostMessage> {
        self.outbox.take()
    }

    /// A stream message from the guest (others are ignored). Never blocks.
    pub fn on_guest(&mut self, message: &GuestMessage) {
        match message {
            GuestMessage::StreamOpen { stream, .. } => self.open(*stream),
            GuestMessage::StreamData { stream, data, .. } => {
                let Some(handle) = self.streams.get(stream) else {
                    return; // Closed already: the guest learns from our StreamClose.
                };
                let bytes = match base64::engine::general_purpose::STANDARD.decode(data) {
                    Ok(b) if b.len() <= stream::CHUNK_BYTES => b,
                    _ => return self.fail(*stream, "a malformed StreamData".into()),
                };
                let within = handle
                    .recv
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .received(bytes.len());
                match within {
                    Ok(()) => {
                        let _ = handle.inbound.send(Inbound::Data(bytes));
                    }
                    Err(e) => self.fail(*stream, format!("flow control: {e}")),
                }
            }
            GuestMessage::StreamCredit { stream, bytes, .. } => {
                if let Some(handle) = self.streams.get(stream) {
                    let _ = handle.inbound.send(Inbound::Credit(*bytes));
                }
            }
            GuestMessage::StreamClose { stream, .. } => {
                if let Some(handle) = self.streams.remove(stream) {
                    let _ = handle.inbound.send(Inbound::Close);
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, id: u32) {
        let Some(rules) = (self.rules)() else {
            return self
                .outbox
                .close(id, Some("this VM has no brokered egress".into()));
        };
        if self.streams.contains_key(&id) {
            return self.fail(id, format!("stream {id} is open already"));
        }
        if self.streams.len() >= stream::MAX_STREAMS {
            return self.outbox.close(
                id,
                Some(format!(
                    "more than {} connections at once",
                    stream::MAX_STREAMS
                )),
            );
        }
        let (inbound, rx) = channel();
        let recv = Arc::new(Mutex::new(RecvWindow::default()));
        let worker = Worker {
            id,
            ended: inbound.clone(),
            rules,
            resolve: self.resolve.clone(),
            on_denied: self.on_denied.clone(),
            outbox: self.outbox.clone(),
            recv: recv.clone(),
            send: Arc::new((Mutex::new(SendWindow::default()), Condvar::new())),
        };
        std::thread::spawn(move || worker.run(rx));
        self.streams.insert(id, StreamHandle { inbound, recv });
    }

    /// Ends a stream the guest misused.
    fn fail(&mut self, id: u32, why: String) {
        if let Some(handle) = self.streams.remove(&id) {
            let _ = handle.inbound.send(Inbound::Close);
        }
        self.outbox.close(id, Some(why));
    }
}

impl Drop for Broker {
    /// The link is gone: every stream ends with it.
    fn drop(&mut self) {
        for (_, handle) in self.streams.drain() {
            let _ = handle.inbound.send(Inbound::Close);
        }
    }
}

/// One stream's worker.
struct Worker {
    id: u32,
    /// Tells the worker the upstream ended (the reader thread sends `Close`).
    ended: Sender<Inbound>,
    rules: Arc<[Rule]>,
    resolve: Resolve,
    on_denied: OnDenied,
    outbox: Outbox,
    recv: Arc<Mutex<RecvWindow>>,
    /// Credit to send to the guest, shared with the reader thread.
    send: Arc<(Mutex<SendWindow>, Condvar)>,
}

impl Worker {
    fn run(self, rx: Receiver<Inbound>) {
        let mut head = Vec::new();
        let request = loop {
            match rx.recv() {
                Ok(Inbound::Data(bytes)) => {
                    self.consumed(bytes.len());
                    head.extend_from_slice(&bytes);
                    match egress::parse_proxy_request(&head) {
                        Ok(request) => break request,
                        Err(BadRequest::Incomplete) => {}
                        Err(BadRequest::Refused(why)) => {
                            return self.respond(400, "Bad Request", &why, None);
                        }
                    }
                }
                Ok(Inbound::Credit(n)) => self.granted(n),
                Ok(Inbound::Close) | Err(_) => return,
            }
        };
        if !matches!(request.kind, ProxyKind::Connect) {
            return self.respond(
                403,
                "Forbidden",
                "plain HTTP is not brokered yet; use https:// (CONNECT)",
                None,
            );
        }
        let rule = match egress::decide(&self.rules, &request.host, request.port, None) {
            Decision::Allowed { rule } => &self.rules[rule],
            Decision::Refused(refusal) => {
                let text = format!("{}; to allow it, {}", refusal.why, refusal.fix);
                (self.on_denied)(format!("CONNECT {}:{}: {text}", request.host, request.port));
                return self.respond(403, "Forbidden", &text, None);
            }
        };
        let host = request.host.trim_matches(['[', ']']);
        let addresses = match (self.resolve)(host, request.port) {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => return self.respond(502, "Bad Gateway", "the name has no address", None),
            Err(e) => {
                return self.respond(502, "Bad Gateway", &format!("cannot resolve: {e}"), None);
            }
        };
        let ips: Vec<_> = addresses.iter().map(SocketAddr::ip).collect();
        if let Err(refusal) = egress::check_resolved(rule, &ips) {
            let text = format!("{}; {}", refusal.why, refusal.fix);
            (self.on_denied)(format!("CONNECT {}:{}: {text}", request.host, request.port));
            return self.respond(403, "Forbidden", &text, None);
        }
        let upstream = match TcpStream::connect_timeout(&addresses[0], CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                return self.respond(502, "Bad Gateway", &format!("cannot connect: {e}"), None);
            }
        };
        let _ = upstream.set_nodelay(true);
        self.send_to_guest(b"HTTP/1.1 200 Connection established\r\n\r\n");
        let mut writer = upstream;
        let Ok(reader) = writer.try_clone() else {
            return self
                .outbox
                .close(self.id, Some("cannot copy the connection".into()));
        };
        if writer.write_all(&head[request.head_len..]).is_err() {
            return self.outbox.close(self.id, None);
        }
        let reading = {
            let (id, outbox, send) = (self.id, self.outbox.clone(), self.send.clone());
            let ended = self.ended.clone();
            std::thread::spawn(move || {
                upstream_to_guest(id, reader, &outbox, &send);
                let _ = ended.send(Inbound::Close);
            })
        };
        loop {
            match rx.recv() {
                Ok(Inbound::Data(bytes)) => {
                    if writer.write_all(&bytes).is_err() {
                        break;
                    }
                    self.consumed(bytes.len());
                }
                Ok(Inbound::Credit(n)) => self.granted(n),
                Ok(Inbound::Close) | Err(_) => break,
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
        // Wake a reader waiting for credit, so it sees the end.
        self.send.1.notify_all();
        let _ = reading.join();
    }

    /// `n` bytes of the guest's were passed on: grant credit back when a batch is due.
    fn consumed(&self, n: usize) {
        let grant = self
            .recv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .consumed(n);
        if let Some(bytes) = grant {
            self.outbox.push(HostMessage::StreamCredit {
                v: VERSION,
                stream: self.id,
                bytes,
            });
        }
    }

    fn granted(&self, n: u64) {
        let (window, changed) = &*self.send;
        let fair = window.lock().unwrap_or_else(|p| p.into_inner()).granted(n);
        if fair.is_err() {
            self.outbox.close(
                self.id,
                Some("flow control: credit beyond one window".into()),
            );
        }
        changed.notify_all();
    }

    /// Sends `bytes` to the guest within its credit (small replies fit the first window).
    fn send_to_guest(&self, bytes: &[u8]) {
        let (window, _) = &*self.send;
        let mut window = window.lock().unwrap_or_else(|p| p.into_inner());
        let n = window.allowance(bytes.len());
        window.sent(n);
        self.outbox.data(self.id, &bytes[..n]);
    }

    /// An HTTP answer from the broker itself, then the end of the stream.
    fn respond(&self, code: u16, reason: &str, body: &str, error: Option<String>) {
        let body = format!("fleet egress: {body}\n");
        let reply = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.send_to_guest(reply.as_bytes());
        self.outbox.close(self.id, error);
    }
}

/// Copies what the upstream sends to the guest, within the guest's credit, then ends the
/// stream.
fn upstream_to_guest(
    id: u32,
    mut upstream: TcpStream,
    outbox: &Outbox,
    send: &(Mutex<SendWindow>, Condvar),
) {
    let mut buf = vec![0u8; stream::CHUNK_BYTES];
    loop {
        let n = match upstream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut at = 0;
        while at < n {
            let (window, changed) = send;
            let mut window = window.lock().unwrap_or_else(|p| p.into_inner());
            let mut allowed = window.allowance(n - at);
            while allowed == 0 {
                let (next, timeout) = changed
                    .wait_timeout(window, Duration::from_secs(60))
                    .unwrap_or_else(|p| p.into_inner());
                window = next;
                allowed = window.allowance(n - at);
                if allowed == 0 && timeout.timed_out() {
                    // A guest that takes nothing for a minute: the stream is dropped.
                    drop(window);
                    let _ = upstream.shutdown(std::net::Shutdown::Both);
                    return outbox.close(id, Some("the guest stopped reading".into()));
                }
            }
            window.sent(allowed);
            drop(window);
            outbox.data(id, &buf[at..at + allowed]);
            at += allowed;
        }
    }
    outbox.close(id, None);
}

#[cfg(test)]
mod tests;
