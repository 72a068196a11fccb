//! The host half of brokered egress: the streams a guest's proxy opens over its agent link
//! (`fleet_agent_protocol::stream`) are read here, checked against the VM's egress rules
//! (`egress`), and dialed by the host itself, so the guest needs no route, no DNS and no
//! network card.
//!
//! One `Broker` per agent link. The link thread hands it the guest's stream messages
//! (`on_guest`, never blocking) and sends what it queued (`outgoing`); each stream has a
//! worker thread that reads the proxy request, asks the rest of the host whether the run
//! may connect (`Host::admit`: its budget, its task's own rules), decides, resolves, dials
//! and copies the guest's bytes upstream; a tunnel or plain request also has a reader
//! thread that copies the upstream's bytes back within the guest's credit. Every stream's
//! buffers are bounded by its window, and a link holds at most `stream::MAX_STREAMS`.
//!
//! Three kinds of request:
//! - a `CONNECT` is a tunnel (TLS, which is what agents and git use);
//! - a plain-HTTP request is checked with its path too, and goes upstream alone
//!   (`Connection: close`, its body and nothing after it), so a second request on the
//!   connection is never sent unchecked;
//! - a request to a brokered API (`/<host>/<path>` at the proxy) gets the API's credential,
//!   written here from the vault and never sent to the guest, and goes over verified TLS;
//!   its answer is metered for tokens (`tokens`).
//!
//! When a stream ends, what it used (`Used`) goes to `Host::used`: the run's
//! `egress.jsonl`, its totals and `/metrics`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fleet_agent_protocol::stream::{self, Credit, RecvWindow, Take};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::agent_link::Waker;
use crate::egress::{self, BadRequest, Credential, Decision, Policy, ProxyKind, Scheme};
use zeroize::Zeroizing;

/// How long dialing an upstream may take (all its addresses together).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to an upstream may block before the stream is given up.
const UPSTREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a brokered API may stay silent (a model thinking before its first token).
const API_READ_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a TLS handshake with a brokered API may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request's body may pause before the request is given up.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a name leads.
pub struct Resolved {
    pub addresses: Vec<SocketAddr>,
    /// The host's administrator pinned these addresses (`egress.hosts` of the host
    /// configuration): they are dialed even when internal.
    pub pinned: bool,
}

/// Resolves a host and port to addresses; the system resolver in production, a table in
/// tests (no traffic may leave the machine).
pub type Resolve = Arc<dyn Fn(&str, u16) -> std::io::Result<Resolved> + Send + Sync>;

/// The system resolver, with the host configuration's pinned names first.
pub fn system_resolver(pinned: BTreeMap<String, IpAddr>) -> Resolve {
    Arc::new(move |host, port| {
        let key = egress::normalize_host(host);
        if let Some(ip) = pinned.get(&key) {
            return Ok(Resolved {
                addresses: vec![SocketAddr::new(*ip, port)],
                pinned: true,
            });
        }
        Ok(Resolved {
            addresses: (host, port).to_socket_addrs()?.collect(),
            pinned: false,
        })
    })
}

/// How the broker reaches upstreams: names, and whom it trusts for TLS. One per daemon.
#[derive(Clone)]
pub struct Upstreams {
    pub resolve: Resolve,
    /// Trust for every API host without its own authorities.
    pub tls: Arc<rustls::ClientConfig>,
    /// Hosts (normalized) whose authorities the host configuration names: trusted alone.
    pub tls_by_host: BTreeMap<String, Arc<rustls::ClientConfig>>,
    /// Internal addresses a rule that names them may reach (`egress.allowInternal`).
    pub allow_internal: Vec<ipnet::IpNet>,
}

impl Upstreams {
    /// From the host configuration: its pinned names, and the system's certificate store
    /// with its extra authorities.
    pub fn from_host(egress: &crate::spec::HostEgress) -> anyhow::Result<Upstreams> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("the system's certificate store: {e}");
        }
        let (_, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!("{ignored} certificates of the system's store could not be used");
        }
        for file in &egress.ca_files {
            add_pem_authorities(&mut roots, &file.0)?;
        }
        let mut tls_by_host = BTreeMap::new();
        for (host, file) in &egress.host_ca_files {
            // A key that could never match an API host would fall back to the system's
            // store without a word: refused instead.
            let name = egress::normalize_host(host);
            if name.is_empty() || name.contains(':') || name.parse::<IpAddr>().is_ok() {
                anyhow::bail!(
                    "egress.hostCaFiles: {host:?} is not a host name (credentials name hosts, without a port)"
                );
            }
            let mut own = rustls::RootCertStore::empty();
            add_pem_authorities(&mut own, &file.0)?;
            if tls_by_host
                .insert(name, Arc::new(tls_config(own)?))
                .is_some()
            {
                anyhow::bail!("egress.hostCaFiles names {host:?} twice");
            }
        }
        let allow_internal = egress
            .allow_internal
            .iter()
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "egress.allowInternal: {entry:?} is neither an address nor a CIDR range (10.0.0.0/8)"
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Upstreams {
            allow_internal,
            resolve: system_resolver(
                egress
                    .hosts
                    .iter()
                    .map(|(h, ip)| (egress::normalize_host(h), *ip))
                    .collect(),
            ),
            tls: Arc::new(tls_config(roots)?),
            tls_by_host,
        })
    }

    /// Whether the host configuration lets a rule that names `ip` (an internal address)
    /// reach it.
    pub fn internal_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow_internal.iter().any(|net| net.contains(&ip))
    }

    /// Whom the broker trusts for `host`'s certificate.
    pub fn tls_for(&self, host: &str) -> Arc<rustls::ClientConfig> {
        self.tls_by_host
            .get(&egress::normalize_host(host))
            .unwrap_or(&self.tls)
            .clone()
    }
}

/// Adds every certificate of the PEM file at `path` to `roots`; a file without one is an
/// error (a wrong path should not silently trust nothing more).
fn add_pem_authorities(roots: &mut rustls::RootCertStore, path: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .with_context(|| format!("cannot read the certificate authorities in {path}"))?;
    if certs.is_empty() {
        anyhow::bail!("{path} holds no PEM certificate");
    }
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {path} cannot be used"))?;
    }
    Ok(())
}

/// A TLS client that verifies upstreams against `roots` (ring, TLS 1.2 and 1.3).
pub fn tls_config(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// What the broker asks of the rest of the host, for one VM's link.
pub trait Host: Send + Sync {
    /// The VM's egress policy now (`None`: it has no brokered egress), asked as each stream
    /// opens, so a new revision's rules apply without touching the VM.
    fn policy(&self) -> Option<Arc<Policy>>;
    /// The value of one of the VM's credentials now (wiped when dropped), or why there is
    /// none.
    fn credential(&self, credential: &Credential) -> Result<Zeroizing<Vec<u8>>, String>;
    /// Whether a connection the guest says run `task` made may go ahead (its budget), and
    /// what its task narrows the VM's rules to; or why not (the 429's body).
    fn admit(&self, task: Option<&str>) -> Result<Admitted, String>;
    /// A refused destination, with the request and why (the `egress.denied` event); at
    /// most `DENIED_EVENTS_PER_MINUTE` a minute reach it.
    fn denied(&self, why: String);
    /// What a connection used, once it ended.
    fn used(&self, used: Used);
}

/// A connection the host let go ahead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Its task's own rules (`TaskSpec::egress`): when not empty, a destination must be
    /// allowed by these as well as by the VM's.
    pub narrowed: Vec<egress::Rule>,
}

/// What the broker tells the rest of the host: a refused destination (for the
/// `egress.denied` event), with the stream's request and why.
type OnDenied = Arc<dyn Fn(String) + Send + Sync>;

/// What one connection used, reported when it ends (for the task's `egress.jsonl` and its
/// totals).
#[derive(Clone, Debug)]
pub struct Used {
    /// The guest task the guest said opened it (its word; the book checks it is the VM's).
    pub task: Option<String>,
    /// What was asked for: `CONNECT host:port`, a URL, or `METHOD https://api/path`.
    pub destination: String,
    /// Where the rule or credential that allowed it was written; `None` when refused.
    pub rule: Option<String>,
    /// The broker's own answer (403, 502, ...), the upstream's status for plain HTTP and
    /// brokered APIs, 200 for an established tunnel.
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// For a brokered API: the tokens its answer reported (as far as it could be read),
    /// and why not all of it could be read, if it could not.
    pub tokens: Option<crate::tokens::Metered>,
    /// The host admitted it (`Host::admit`): it counted against the run's budget while
    /// open.
    pub admitted: bool,
    pub started: std::time::SystemTime,
    pub duration: Duration,
}

impl Used {
    /// A rule or credential allowed it (the broker did not refuse it).
    pub fn allowed(&self) -> bool {
        self.rule.is_some()
    }
}

/// A connection's use so far, shared by its worker and reader threads.
struct Usage {
    task: Option<String>,
    started: (std::time::SystemTime, std::time::Instant),
    destination: Mutex<String>,
    rule: Mutex<Option<String>>,
    status: Mutex<Option<u16>>,
    /// Whether the first bytes to the guest are an HTTP response whose status to read.
    answered_upstream: std::sync::atomic::AtomicBool,
    up: std::sync::atomic::AtomicU64,
    down: std::sync::atomic::AtomicU64,
    /// Reads a brokered API's answer for its token usage.
    meter: Mutex<Option<crate::tokens::ResponseMeter>>,
    admitted: std::sync::atomic::AtomicBool,
    /// The first bytes of an upstream's answer, until its status code is read.
    status_line: Mutex<Vec<u8>>,
    host: Arc<dyn Host>,
}

impl Usage {
    fn up(&self, n: usize) {
        self.up
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// `bytes` went to the guest; the first of an upstream's answer carry its status.
    fn down(&self, bytes: &[u8]) {
        if let Some(meter) = lock(&self.meter).as_mut() {
            meter.feed(bytes);
        }
        let before = self
            .down
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // `HTTP/1.1 200`: the first 12 bytes, however the guest's credit splits them.
        if before < 12
            && self
                .answered_upstream
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            let mut line = lock(&self.status_line);
            let wanted = 12usize.saturating_sub(line.len());
            line.extend_from_slice(&bytes[..bytes.len().min(wanted)]);
            if line.len() >= 12 {
                *lock(&self.status) = line
                    .strip_prefix(b"HTTP/1.")
                    .and_then(|rest| rest.get(2..5))
                    .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok());
            }
        }
    }

    fn set<T>(&self, field: &Mutex<T>, value: T) {
        *lock(field) = value;
    }
}

impl Drop for Usage {
    /// The connection ended (both threads are done with it): reported, unless it never
    /// asked for anything.
    fn drop(&mut self) {
        let destination = std::mem::take(&mut *lock(&self.destination));
        if destination.is_empty() {
            return;
        }
        self.host.used(Used {
            task: self.task.take(),
            destination,
            rule: lock(&self.rule).take(),
            status: *lock(&self.status),
            bytes_up: *self.up.get_mut(),
            bytes_down: *self.down.get_mut(),
            tokens: lock(&self.meter)
                .take()
                .map(crate::tokens::ResponseMeter::finish),
            admitted: *self.admitted.get_mut(),
            started: self.started.0,
            duration: self.started.1.elapsed(),
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
    host: Arc<dyn Host>,
    upstreams: Upstreams,
    /// `host.denied`, at most `DENIED_EVENTS_PER_MINUTE` a minute.
    on_denied: OnDenied,
    streams: HashMap<u32, StreamHandle>,
    outbox: Outbox,
    /// Streams whose threads still run, closed or not: what `MAX_STREAMS` bounds.
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Broker {
    pub fn new(host: Arc<dyn Host>, upstreams: Upstreams, outbox: Outbox) -> Broker {
        let on_denied = {
            let host = host.clone();
            limit_denials(Arc::new(move |why| host.denied(why)))
        };
        Broker {
            host,
            upstreams,
            on_denied,
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
            GuestMessage::StreamOpen { stream, task, .. } => self.open(*stream, task.clone()),
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

    fn open(&mut self, id: u32, task: Option<String>) {
        let Some(policy) = self.host.policy() else {
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
            policy,
            host: self.host.clone(),
            upstreams: self.upstreams.clone(),
            on_denied: self.on_denied.clone(),
            outbox: self.outbox.clone(),
            recv: recv.clone(),
            send: credit.clone(),
            usage: Arc::new(Usage {
                // A name no task could have is never believed.
                task: task.filter(|t| t.len() <= 128),
                started: (std::time::SystemTime::now(), std::time::Instant::now()),
                destination: Mutex::default(),
                rule: Mutex::default(),
                status: Mutex::default(),
                answered_upstream: std::sync::atomic::AtomicBool::new(false),
                up: std::sync::atomic::AtomicU64::new(0),
                down: std::sync::atomic::AtomicU64::new(0),
                meter: Mutex::default(),
                admitted: std::sync::atomic::AtomicBool::new(false),
                status_line: Mutex::default(),
                host: self.host.clone(),
            }),
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
    policy: Arc<Policy>,
    host: Arc<dyn Host>,
    upstreams: Upstreams,
    on_denied: OnDenied,
    outbox: Outbox,
    recv: Arc<Mutex<RecvWindow>>,
    /// Credit to send to the guest, shared with the link thread and the reader.
    send: SharedCredit,
    /// What the connection used, reported when the last thread lets it go.
    usage: Arc<Usage>,
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
                            self.usage
                                .set(&self.usage.destination, "a malformed request".into());
                            return self.respond(400, "Bad Request", &why);
                        }
                    }
                }
                Ok(Inbound::Close) | Err(_) => return,
            }
        };
        let what = request.describe();
        self.usage.set(&self.usage.destination, what.clone());
        let admitted = match self.host.admit(self.usage.task.as_deref()) {
            Ok(admitted) => admitted,
            Err(why) => return self.respond(429, "Too Many Requests", &why),
        };
        self.usage
            .admitted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let path = match &request.kind {
            ProxyKind::Connect => None,
            ProxyKind::Http { path, .. } => Some(path.as_str()),
            ProxyKind::Credentialed { .. } => {
                return self.to_api(&request, &head[request.head_len..], what, &admitted, rx);
            }
        };
        let rules = &self.policy.rules;
        let rule = match egress::decide(rules, &request.host, request.port, path) {
            Decision::Allowed { rule } => {
                self.usage
                    .set(&self.usage.rule, Some(rules[rule].source.clone()));
                &rules[rule]
            }
            Decision::Refused(refusal) => {
                let text = format!("{}; to allow it, {}", refusal.why, refusal.fix);
                return self.refuse(&what, &text);
            }
        };
        if let Err(text) = narrowed_to(&admitted, &request.host, request.port, path) {
            self.usage.set(&self.usage.rule, None);
            return self.refuse(&what, &text);
        }
        let Some(upstream) = self.connect(rule, &request.host, request.port, &what) else {
            return;
        };
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
                self.usage.set(&self.usage.status, Some(200));
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
                self.usage.up(upstream_head.len());
                self.usage
                    .answered_upstream
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                *body_len
            }
            // Went to `to_api` above.
            ProxyKind::Credentialed { .. } => return,
        };
        let after_head = &head[request.head_len..];
        let first = &after_head[..after_head
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX))];
        if writer.write_all(first).is_err() {
            return self.outbox.close(self.id, None);
        }
        self.usage.up(first.len());
        left -= first.len() as u64;
        let reading = {
            let (id, outbox, send) = (self.id, self.outbox.clone(), self.send.clone());
            let (ended, usage) = (self.ended.clone(), self.usage.clone());
            std::thread::Builder::new()
                .name(format!("egress-{id}-in"))
                .spawn(move || {
                    upstream_to_guest(id, reader, &outbox, &send, &usage);
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
            self.usage.up(n);
            left -= n as u64;
            // Bytes past a plain request's body are dropped, but still count as passed on.
            self.consumed(bytes.len());
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
        // A reader waiting for credit sees the end at once.
        self.send.close();
        let _ = reading.join();
    }

    /// Resolves and dials `host:port` as `rule` allows, or answers the guest why not.
    fn connect(&self, rule: &egress::Rule, host: &str, port: u16, what: &str) -> Option<TcpStream> {
        let host = host.trim_matches(['[', ']']);
        let resolved = match (self.upstreams.resolve)(host, port) {
            Ok(r) if !r.addresses.is_empty() => r,
            Ok(_) => {
                self.respond(502, "Bad Gateway", "the name has no address");
                return None;
            }
            Err(e) => {
                self.respond(502, "Bad Gateway", &format!("cannot resolve: {e}"));
                return None;
            }
        };
        let ips: Vec<_> = resolved.addresses.iter().map(SocketAddr::ip).collect();
        if !resolved.pinned
            && let Err(refusal) = egress::check_resolved(rule, &ips)
        {
            let text = format!("{}; {}", refusal.why, refusal.fix);
            self.refuse(what, &text);
            return None;
        }
        // A rule may name an internal address; the host's administrator decides whether
        // any rule may reach it.
        if !resolved.pinned
            && let Some(ip) = ips
                .iter()
                .find(|ip| egress::is_internal(ip) && !self.upstreams.internal_allowed(**ip))
        {
            self.refuse(what, &internal_refused(*ip));
            return None;
        }
        let upstream = match dial(&resolved.addresses) {
            Ok(s) => s,
            Err(e) => {
                self.respond(502, "Bad Gateway", &format!("cannot connect: {e}"));
                return None;
            }
        };
        // A connection to one of the host's own addresses (its public one, a bridge's) is
        // one the kernel answers from that same address: the host's own services are
        // never reached, whatever name led there, unless a rule or the host pins the
        // address.
        if let (Ok(local), Ok(peer)) = (upstream.local_addr(), upstream.peer_addr())
            && local.ip() == peer.ip()
            && !resolved.pinned
        {
            let text = if rule.host != egress::HostPattern::Address(peer.ip()) {
                Some(format!(
                    "{} is an address of this host, and the rule does not name it",
                    peer.ip()
                ))
            } else if !self.upstreams.internal_allowed(peer.ip()) {
                Some(internal_refused(peer.ip()))
            } else {
                None
            };
            if let Some(text) = text {
                let _ = upstream.shutdown(std::net::Shutdown::Both);
                self.refuse(what, &text);
                return None;
            }
        }
        let _ = upstream.set_nodelay(true);
        Some(upstream)
    }

    /// A request to a brokered API: its credential is written on the host, the request
    /// goes over verified TLS, and the answer comes back to the guest in plain HTTP.
    /// `after_head` is what the guest sent past the head (the start of its body).
    fn to_api(
        &self,
        request: &egress::ProxyRequest,
        after_head: &[u8],
        what: String,
        admitted: &Admitted,
        rx: Receiver<Inbound>,
    ) {
        let ProxyKind::Credentialed {
            method,
            path,
            headers,
            body_len,
        } = &request.kind
        else {
            return;
        };
        let Some(credential) = self.policy.credential(&request.host) else {
            // (Refused: no rule to name.)
            let shown: String = request.host.chars().take(64).collect();
            let text = format!(
                "no egress credential is for {shown:?}; add `{{host: {shown}, secret: {{secret: NAME, key: KEY}}}}` to egress.credentials, or send the request to the proxy as a proxy (absolute URL or CONNECT)"
            );
            return self.refuse(&what, &text);
        };
        self.usage
            .set(&self.usage.rule, Some(credential.source.clone()));
        if let Some(why) = egress::path_problem(path) {
            return self.respond(400, "Bad Request", &format!("the path {why}"));
        }
        if let Err(text) = narrowed_to(admitted, &credential.host, credential.port, Some(path)) {
            self.usage.set(&self.usage.rule, None);
            return self.refuse(&what, &text);
        }
        let value = match self.host.credential(credential) {
            Ok(v) if egress::value_fits_header(&v) => v,
            Ok(_) => {
                let text = format!(
                    "the credential at {} holds bytes a header cannot carry (only visible ASCII)",
                    credential.source
                );
                return self.respond(503, "Service Unavailable", &text);
            }
            Err(why) => {
                let text = format!(
                    "the credential at {} cannot be used: {why}",
                    credential.source
                );
                return self.respond(503, "Service Unavailable", &text);
            }
        };
        let header_value: Zeroizing<Vec<u8>> = Zeroizing::new(match &credential.scheme {
            Scheme::Plain => value.to_vec(),
            Scheme::Bearer => [b"Bearer ".as_slice(), &value].concat(),
            Scheme::Basic { username } => {
                let pair = Zeroizing::new([username.as_bytes(), b":", &value].concat());
                let encoded =
                    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
                // Should an API echo it, the encoded form is kept out of logs and output too.
                crate::secrets::redact::register(encoded.as_bytes());
                [b"Basic ".as_slice(), encoded.as_bytes()].concat()
            }
        });
        drop(value);
        let Some(tcp) = self.connect(
            &credential.as_rule(),
            &credential.host,
            credential.port,
            &what,
        ) else {
            return;
        };
        let _ = tcp.set_write_timeout(Some(UPSTREAM_WRITE_TIMEOUT));
        let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let Ok(name) = rustls::pki_types::ServerName::try_from(credential.host.clone()) else {
            return self.respond(502, "Bad Gateway", "the API's host is not a TLS name");
        };
        let mut tls =
            match rustls::ClientConnection::new(self.upstreams.tls_for(&credential.host), name) {
                Ok(c) => c,
                Err(e) => return self.respond(502, "Bad Gateway", &format!("TLS: {e}")),
            };
        // The handshake first, within its own deadline: nothing is written to an API whose
        // certificate the host does not trust.
        let mut tcp = tcp;
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut tcp) {
                return self.respond(502, "Bad Gateway", &tls_problem(&e));
            }
        }
        let _ = tcp.set_read_timeout(Some(API_READ_TIMEOUT));
        let mut upstream = rustls::StreamOwned::new(tls, tcp);
        let head = Zeroizing::new(egress::credentialed_head(
            method,
            path,
            headers,
            *body_len,
            credential,
            &header_value,
        ));
        drop(header_value);
        // The head, then exactly the body's length of what the guest sends.
        let mut left = *body_len;
        let first = &after_head[..after_head
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX))];
        let sent = upstream
            .write_all(&head)
            .and_then(|()| upstream.write_all(first));
        self.usage.up(head.len() + first.len());
        drop(head);
        if let Err(e) = sent {
            return self.respond(502, "Bad Gateway", &tls_problem(&e));
        }
        left -= first.len() as u64;
        while left > 0 {
            match rx.recv_timeout(BODY_IDLE_TIMEOUT) {
                Ok(Inbound::Data(bytes)) => {
                    let n = bytes.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if let Err(e) = upstream.write_all(&bytes[..n]) {
                        return self.respond(502, "Bad Gateway", &tls_problem(&e));
                    }
                    self.usage.up(n);
                    left -= n as u64;
                    self.consumed(bytes.len());
                }
                Ok(Inbound::Close) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let text = "the request's body stopped coming";
                    return self.respond(408, "Request Timeout", text);
                }
            }
        }
        if let Err(e) = upstream.flush() {
            return self.respond(502, "Bad Gateway", &tls_problem(&e));
        }
        // The answer, within the guest's credit, until the API closes (the request said
        // `Connection: close`). Some servers close without TLS's close_notify: that ends
        // the answer too.
        self.usage
            .answered_upstream
            .store(true, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.usage.meter) = Some(crate::tokens::ResponseMeter::new());
        match copy_to_guest(
            self.id,
            &mut upstream,
            &self.outbox,
            &self.send,
            &self.usage,
        ) {
            Copied::Ended | Copied::Failed { sent: true, .. } => self.outbox.close(self.id, None),
            Copied::Failed { error, .. } if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.outbox.close(self.id, None);
            }
            Copied::Failed { error, .. } => {
                self.respond(502, "Bad Gateway", &tls_problem(&error));
            }
            Copied::GuestClosed => {}
            Copied::GuestStalled => self
                .outbox
                .close(self.id, Some("the guest stopped reading".into())),
        }
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
        self.usage.down(&bytes[..n]);
        self.outbox.data(self.id, &bytes[..n]);
    }

    /// An HTTP answer from the broker itself, then the end of the stream.
    fn respond(&self, code: u16, reason: &str, body: &str) {
        self.usage.set(&self.usage.status, Some(code));
        let body = format!("fleet egress: {body}\n");
        let reply = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.send_to_guest(reply.as_bytes());
        self.outbox.close(self.id, None);
    }

    /// A destination refused by a rule (or the lack of one): the `egress.denied` event and
    /// the 403, both saying why and how to allow it.
    fn refuse(&self, what: &str, why: &str) {
        (self.on_denied)(format!("{what}: {why}"));
        self.respond(403, "Forbidden", why);
    }
}

/// How a copy to the guest ended.
enum Copied {
    /// The upstream ended its side.
    Ended,
    /// Reading the upstream failed; `sent` says whether any byte had reached the guest.
    Failed { error: std::io::Error, sent: bool },
    /// The stream was closed (by the guest, or the link went).
    GuestClosed,
    /// The guest took nothing for a minute.
    GuestStalled,
}

/// Copies what `upstream` sends to the guest, within the guest's credit. Returns at once
/// when the stream is closed, whatever it was waiting for.
fn copy_to_guest(
    id: u32,
    upstream: &mut impl Read,
    outbox: &Outbox,
    credit: &Credit,
    usage: &Usage,
) -> Copied {
    let mut buf = vec![0u8; stream::CHUNK_BYTES];
    let mut sent = false;
    loop {
        let n = match upstream.read(&mut buf) {
            Ok(0) => return Copied::Ended,
            Ok(n) => n,
            Err(error) => return Copied::Failed { error, sent },
        };
        sent = true;
        let mut at = 0;
        while at < n {
            match credit.take(n - at, Duration::from_secs(60)) {
                Take::Bytes(allowed) => {
                    usage.down(&buf[at..at + allowed]);
                    outbox.data(id, &buf[at..at + allowed]);
                    at += allowed;
                }
                Take::Closed => return Copied::GuestClosed,
                Take::Stalled => return Copied::GuestStalled,
            }
        }
    }
}

/// A tunnel's upstream half: what the upstream sends goes to the guest, then the stream
/// ends.
fn upstream_to_guest(
    id: u32,
    mut upstream: TcpStream,
    outbox: &Outbox,
    credit: &Credit,
    usage: &Usage,
) {
    match copy_to_guest(id, &mut upstream, outbox, credit, usage) {
        Copied::Ended | Copied::Failed { .. } => outbox.close(id, None),
        Copied::GuestClosed => {}
        Copied::GuestStalled => {
            let _ = upstream.shutdown(std::net::Shutdown::Both);
            outbox.close(id, Some("the guest stopped reading".into()));
        }
    }
}

/// Whether a destination the VM's rules allow is within what the connection's task
/// narrows them to (nothing to check when it narrows nothing); the refusal's text if not.
fn narrowed_to(
    admitted: &Admitted,
    host: &str,
    port: u16,
    path: Option<&str>,
) -> Result<(), String> {
    if admitted.narrowed.is_empty() {
        return Ok(());
    }
    match egress::decide(&admitted.narrowed, host, port, path) {
        Decision::Allowed { .. } => Ok(()),
        Decision::Refused(refusal) => Err(format!(
            "the task narrows its VM's egress, and {}; to allow it, {} in the task's file",
            refusal.why, refusal.fix
        )),
    }
}

/// Why a rule naming an internal address (or one of this host's) does not reach it.
fn internal_refused(ip: IpAddr) -> String {
    format!(
        "{ip} is an internal address (or one of this host's), and the host configuration does not let rules reach it; its administrator can, with egress.allowInternal: ['{ip}']"
    )
}

/// What the guest is told when the API could not be reached over TLS (a certificate the
/// host does not trust, most often).
fn tls_problem(e: &std::io::Error) -> String {
    format!("cannot talk to the API over TLS: {e}")
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
