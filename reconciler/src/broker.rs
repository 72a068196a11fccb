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
//! A `CONNECT` is a tunnel (TLS, which is what agents and git use). A plain-HTTP request
//! is checked with its path too, and goes upstream alone (`Connection: close`, its body and
//! nothing after it), so a second request on the connection is never sent unchecked.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fleet_agent_protocol::stream::{self, Credit, RecvWindow, Take};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::agent_link::Waker;
use crate::egress::{self, BadRequest, Decision, ProxyKind, Rule};

/// How long dialing an upstream may take (all its addresses together).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to an upstream may block before the stream is given up.
const UPSTREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// What the link thread passes a stream's worker: the guest's bytes (bounded by the
/// credit the link thread checks) or the end.
enum Inbound {
    Data(Vec<u8>),
    Close,
}

type SharedCredit = Arc<Credit>;

struct StreamHandle {
    inbound: Sender<Inbound>,
    /// The guest's credit on this stream: checked by the link thread as bytes arrive,
    /// returned by the worker as it writes them upstream.
    recv: Arc<Mutex<RecvWindow>>,
    credit: SharedCredit,
}

/// The most `egress.denied` events one link writes a minute; the rest are counted, and
/// the count is said with the next one (a guest cannot flood the event log).
const DENIED_EVENTS_PER_MINUTE: usize = 10;

/// One link's streams.
pub struct Broker {
    /// The VM's rules now; `None` when it has no brokered egress (every stream is refused).
    rules: Rules,
    resolve: Resolve,
    on_denied: OnDenied,
    streams: HashMap<u32, StreamHandle>,
    outbox: Outbox,
    /// Streams whose threads still run, closed or not: what `MAX_STREAMS` bounds.
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Broker {
    pub fn new(rules: Rules, resolve: Resolve, on_denied: OnDenied, outbox: Outbox) -> Broker {
        Broker {
            rules,
            resolve,
            on_denied: limit_denials(on_denied),
            streams: HashMap::new(),
            outbox,
            live: Arc::default(),
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
                    Ok(b) if !b.is_empty() && b.len() <= stream::CHUNK_BYTES => b,
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
                let Some(handle) = self.streams.get(stream) else {
                    return;
                };
                if let Err(e) = handle.credit.grant(*bytes) {
                    self.fail(*stream, format!("flow control: {e}"));
                }
            }
            GuestMessage::StreamClose { stream, .. } => {
                if let Some(handle) = self.streams.remove(stream) {
                    handle.credit.close();
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
        let live = self.live.load(std::sync::atomic::Ordering::Relaxed);
        if self.streams.len() >= stream::MAX_STREAMS || live >= stream::MAX_STREAMS {
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
        let credit: SharedCredit = Arc::default();
        let worker = Worker {
            id,
            ended: inbound.clone(),
            rules,
            resolve: self.resolve.clone(),
            on_denied: self.on_denied.clone(),
            outbox: self.outbox.clone(),
            recv: recv.clone(),
            send: credit.clone(),
        };
        let live = self.live.clone();
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("egress-{id}"))
            .spawn(move || {
                // Counted down however the worker ends (a panic included).
                struct Live(Arc<std::sync::atomic::AtomicUsize>);
                impl Drop for Live {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let _live = Live(live);
                worker.run(rx);
            });
        if spawned.is_err() {
            self.live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return self.outbox.close(
                id,
                Some("the host cannot take another connection now".into()),
            );
        }
        self.streams.insert(
            id,
            StreamHandle {
                inbound,
                recv,
                credit,
            },
        );
    }

    /// Ends a stream the guest misused.
    fn fail(&mut self, id: u32, why: String) {
        if let Some(handle) = self.streams.remove(&id) {
            handle.credit.close();
            let _ = handle.inbound.send(Inbound::Close);
        }
        self.outbox.close(id, Some(why));
    }
}

impl Drop for Broker {
    /// The link is gone: every stream ends with it.
    fn drop(&mut self) {
        for (_, handle) in self.streams.drain() {
            handle.credit.close();
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
    /// Credit to send to the guest, shared with the link thread and the reader.
    send: SharedCredit,
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
                Ok(Inbound::Close) | Err(_) => return,
            }
        };
        let (what, path) = match &request.kind {
            ProxyKind::Connect => (format!("CONNECT {}:{}", request.host, request.port), None),
            ProxyKind::Http { path, .. } => (
                format!("http://{}:{}{}", request.host, request.port, path),
                Some(path.as_str()),
            ),
        };
        let what: String = what.chars().take(300).collect();
        let rule = match egress::decide(&self.rules, &request.host, request.port, path) {
            Decision::Allowed { rule } => &self.rules[rule],
            Decision::Refused(refusal) => {
                let text = format!("{}; to allow it, {}", refusal.why, refusal.fix);
                (self.on_denied)(format!("{what}: {text}"));
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
            (self.on_denied)(format!("{what}: {text}"));
            return self.respond(403, "Forbidden", &text, None);
        }
        let upstream = match dial(&addresses) {
            Ok(s) => s,
            Err(e) => {
                return self.respond(502, "Bad Gateway", &format!("cannot connect: {e}"), None);
            }
        };
        // A connection to one of the host's own addresses (its public one, a bridge's) is
        // one the kernel answers from that same address: the host's own services are
        // never reached, whatever name led there, unless a rule names the address.
        if let (Ok(local), Ok(peer)) = (upstream.local_addr(), upstream.peer_addr())
            && local.ip() == peer.ip()
            && rule.host != egress::HostPattern::Address(peer.ip())
        {
            let _ = upstream.shutdown(std::net::Shutdown::Both);
            let text = format!(
                "{} is an address of this host, and the rule does not name it",
                peer.ip()
            );
            (self.on_denied)(format!("{what}: {text}"));
            return self.respond(403, "Forbidden", &text, None);
        }
        let _ = upstream.set_nodelay(true);
        let _ = upstream.set_write_timeout(Some(UPSTREAM_WRITE_TIMEOUT));
        let mut writer = upstream;
        let Ok(reader) = writer.try_clone() else {
            return self
                .outbox
                .close(self.id, Some("cannot copy the connection".into()));
        };
        // What may still go upstream after the head: a tunnel anything, a plain request
        // its body and no more (one request per connection, the one that was checked).
        let mut left = match &request.kind {
            ProxyKind::Connect => {
                self.send_to_guest(b"HTTP/1.1 200 Connection established\r\n\r\n");
                u64::MAX
            }
            ProxyKind::Http {
                head: upstream_head,
                body_len,
                ..
            } => {
                if writer.write_all(upstream_head).is_err() {
                    return self.outbox.close(self.id, None);
                }
                *body_len
            }
        };
        let after_head = &head[request.head_len..];
        let first = &after_head[..after_head
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX))];
        if writer.write_all(first).is_err() {
            return self.outbox.close(self.id, None);
        }
        left -= first.len() as u64;
        let reading = {
            let (id, outbox, send) = (self.id, self.outbox.clone(), self.send.clone());
            let ended = self.ended.clone();
            std::thread::Builder::new()
                .name(format!("egress-{id}-in"))
                .spawn(move || {
                    upstream_to_guest(id, reader, &outbox, &send);
                    let _ = ended.send(Inbound::Close);
                })
        };
        let Ok(reading) = reading else {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return self.outbox.close(
                self.id,
                Some("the host cannot take another connection now".into()),
            );
        };
        while let Ok(Inbound::Data(bytes)) = rx.recv() {
            let n = bytes.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            if writer.write_all(&bytes[..n]).is_err() {
                break;
            }
            left -= n as u64;
            // Bytes past a plain request's body are dropped, but still count as passed on.
            self.consumed(bytes.len());
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
        // A reader waiting for credit sees the end at once.
        self.send.close();
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

    /// Sends `bytes` to the guest within its credit (small replies fit the first window).
    fn send_to_guest(&self, bytes: &[u8]) {
        let n = match self.send.take(bytes.len(), Duration::ZERO) {
            Take::Bytes(n) => n,
            Take::Closed | Take::Stalled => 0,
        };
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
/// stream. Returns at once when the stream is closed, whatever it was waiting for.
fn upstream_to_guest(id: u32, mut upstream: TcpStream, outbox: &Outbox, credit: &Credit) {
    let mut buf = vec![0u8; stream::CHUNK_BYTES];
    loop {
        let n = match upstream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut at = 0;
        while at < n {
            match credit.take(n - at, Duration::from_secs(60)) {
                Take::Bytes(allowed) => {
                    outbox.data(id, &buf[at..at + allowed]);
                    at += allowed;
                }
                Take::Closed => return,
                // A guest that takes nothing for a minute: the stream is dropped.
                Take::Stalled => {
                    let _ = upstream.shutdown(std::net::Shutdown::Both);
                    return outbox.close(id, Some("the guest stopped reading".into()));
                }
            }
        }
    }
    outbox.close(id, None);
}

/// Dials the checked addresses in turn within one `CONNECT_TIMEOUT`.
fn dial(addresses: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last = std::io::Error::other("no address");
    for address in addresses {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(address, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// At most `DENIED_EVENTS_PER_MINUTE` refusals a minute reach `on_denied`; the next one
/// after a quiet spell says how many were left out.
fn limit_denials(on_denied: OnDenied) -> OnDenied {
    let window = Mutex::new((std::time::Instant::now(), 0usize, 0usize));
    Arc::new(move |why: String| {
        let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
        let (since, sent, dropped) = &mut *w;
        if since.elapsed() >= Duration::from_secs(60) {
            *since = std::time::Instant::now();
            *sent = 0;
        }
        if *sent >= DENIED_EVENTS_PER_MINUTE {
            *dropped += 1;
            return;
        }
        *sent += 1;
        let why: String = why.chars().take(512).collect();
        let note = std::mem::take(dropped);
        drop(w);
        if note > 0 {
            on_denied(format!(
                "{why} (and {note} more refusal(s) not recorded one by one)"
            ));
        } else {
            on_denied(why);
        }
    })
}

#[cfg(test)]
mod tests;
