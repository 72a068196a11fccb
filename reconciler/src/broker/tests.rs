//! The broker driven as a link thread drives it, against upstreams on loopback.

use std::net::TcpListener;
use std::time::Instant;

use super::*;
use crate::egress::{HostPattern, Rule};

fn rule(host: &str, ports: &[u16]) -> Rule {
    Rule {
        host: HostPattern::parse(host).expect("a pattern"),
        ports: ports.to_vec(),
        path_prefixes: Vec::new(),
        source: "fleet/loadouts/agent.yaml:9".into(),
    }
}

/// A resolver with a fixed table (no lookup leaves the machine); `pinned` says whether
/// its answers count as the host configuration's.
fn table_with(entries: &[(&str, &str)], pinned: bool) -> Resolve {
    let entries: Vec<(String, std::net::IpAddr)> = entries
        .iter()
        .map(|(n, ip)| ((*n).to_owned(), ip.parse().expect("ip")))
        .collect();
    Arc::new(move |host, port| {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(Resolved {
                addresses: vec![SocketAddr::new(ip, port)],
                pinned: false,
            });
        }
        Ok(Resolved {
            addresses: entries
                .iter()
                .filter(|(n, _)| n == host)
                .map(|(_, ip)| SocketAddr::new(*ip, port))
                .collect(),
            pinned,
        })
    })
}

fn table(entries: &[(&str, &str)]) -> Resolve {
    table_with(entries, false)
}

fn system() -> Resolve {
    system_resolver(BTreeMap::new())
}

fn upstreams(resolve: Resolve, roots: rustls::RootCertStore) -> Upstreams {
    Upstreams {
        resolve,
        tls: Arc::new(tls_config(roots).expect("tls")),
        tls_by_host: BTreeMap::new(),
        // The tests' upstreams are on loopback, as a host's administrator could allow.
        allow_internal: vec!["127.0.0.0/8".parse().expect("net")],
    }
}

type CredentialValue = Arc<dyn Fn(&Credential) -> Result<Zeroizing<Vec<u8>>, String> + Send + Sync>;

/// The host as a test plays it: a fixed policy and credential, everything it is told kept.
struct TestHost {
    policy: Option<Arc<Policy>>,
    credential: CredentialValue,
    /// Why connections are refused for their budget, when they are.
    over_budget: Mutex<Option<String>>,
    /// The task's own rules, when it narrows the VM's.
    narrowed: Mutex<Vec<Rule>>,
    denied: Arc<Mutex<Vec<String>>>,
    used: Arc<Mutex<Vec<Used>>>,
}

impl Host for TestHost {
    fn policy(&self) -> Option<Arc<Policy>> {
        self.policy.clone()
    }
    fn credential(&self, credential: &Credential) -> Result<Zeroizing<Vec<u8>>, String> {
        (self.credential)(credential)
    }
    fn admit(&self, _task: Option<&str>) -> Result<Admitted, String> {
        match self.over_budget.lock().expect("lock").clone() {
            Some(why) => Err(why),
            None => Ok(Admitted {
                narrowed: self.narrowed.lock().expect("lock").clone(),
            }),
        }
    }
    fn denied(&self, why: String) {
        self.denied.lock().expect("lock").push(why);
    }
    fn used(&self, used: Used) {
        self.used.lock().expect("lock").push(used);
    }
}

struct Guest {
    broker: Broker,
    host: Arc<TestHost>,
    denied: Arc<Mutex<Vec<String>>>,
    /// What each finished connection reported.
    used: Arc<Mutex<Vec<Used>>>,
}

impl Guest {
    fn new(rules: Option<Vec<Rule>>, resolve: Resolve) -> Guest {
        let policy = rules.map(|rules| Policy {
            rules,
            ..Policy::default()
        });
        Guest::with(
            policy,
            upstreams(resolve, rustls::RootCertStore::empty()),
            Arc::new(|_| Err("no credentials here".into())),
        )
    }

    fn with(policy: Option<Policy>, upstreams: Upstreams, credential: CredentialValue) -> Guest {
        let host = Arc::new(TestHost {
            policy: policy.map(Arc::new),
            credential,
            over_budget: Mutex::default(),
            narrowed: Mutex::default(),
            denied: Arc::default(),
            used: Arc::default(),
        });
        Guest {
            broker: Broker::new(host.clone(), upstreams, Outbox::new(None)),
            denied: host.denied.clone(),
            used: host.used.clone(),
            host,
        }
    }

    fn send(&mut self, message: GuestMessage) {
        self.broker.on_guest(&message);
    }

    /// Opens `stream` (naming no task) and sends its first bytes, as the guest's proxy does
    /// for a new connection.
    fn open(&mut self, stream: u32, first: &[u8]) {
        self.send(GuestMessage::StreamOpen {
            v: VERSION,
            stream,
            task: None,
        });
        self.data(stream, first);
    }

    fn data(&mut self, stream: u32, bytes: &[u8]) {
        self.send(GuestMessage::StreamData {
            v: VERSION,
            stream,
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        });
    }

    /// What the host sent on `stream` until it closed it (or `wait` passed): the bytes,
    /// and the close's error.
    fn read_until_closed(&mut self, stream: u32, wait: Duration) -> (Vec<u8>, Option<String>) {
        let deadline = Instant::now() + wait;
        let mut bytes = Vec::new();
        while Instant::now() < deadline {
            for message in self.broker.outgoing() {
                match message {
                    HostMessage::StreamData {
                        stream: s, data, ..
                    } if s == stream => bytes.extend(
                        base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .expect("b64"),
                    ),
                    HostMessage::StreamClose {
                        stream: s, error, ..
                    } if s == stream => {
                        return (bytes, error);
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (bytes, Some("still open".into()))
    }

    /// The bytes the host sent on `stream` until `want` of them arrived (or 10 s passed).
    fn read(&mut self, stream: u32, want: usize) -> Vec<u8> {
        self.read_for(stream, want, Duration::from_secs(10))
    }

    fn read_for(&mut self, stream: u32, want: usize, wait: Duration) -> Vec<u8> {
        let deadline = Instant::now() + wait;
        let mut bytes = Vec::new();
        while bytes.len() < want && Instant::now() < deadline {
            for message in self.broker.outgoing() {
                if let HostMessage::StreamData {
                    stream: s, data, ..
                } = message
                    && s == stream
                {
                    bytes.extend(
                        base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .expect("b64"),
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bytes
    }
}

/// An upstream that answers every connection with what it is sent, upper-cased.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_vm_without_brokered_egress_has_every_stream_refused() {
    let mut guest = Guest::new(None, system());
    guest.send(GuestMessage::StreamOpen {
        v: VERSION,
        stream: 1,
        task: None,
    });
    let (_, error) = guest.read_until_closed(1, Duration::from_secs(5));
    assert_eq!(error.as_deref(), Some("this VM has no brokered egress"));
}

#[test]
fn an_allowed_connect_is_tunnelled_both_ways() {
    let port = upstream();
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    guest.open(
        3,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhello").as_bytes(),
    );
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let got = guest.read(3, established.len() + 5);
    assert_eq!(&got[..established.len()], established);
    assert_eq!(
        &got[established.len()..],
        b"HELLO",
        "the bytes after the head went up"
    );
    guest.data(3, b" again");
    assert_eq!(guest.read(3, 6), b" AGAIN");
    guest.send(GuestMessage::StreamClose {
        v: VERSION,
        stream: 3,
        error: None,
    });
}

impl Guest {
    /// What finished connections reported, once `n` of them have (or 5 s passed).
    fn used(&self, n: usize) -> Vec<Used> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used.lock().expect("lock").len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.used.lock().expect("lock").clone()
    }
}

#[test]
fn every_connection_reports_what_it_used_and_for_which_task() {
    let port = upstream();
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    let open = |guest: &mut Guest, stream: u32| {
        guest.send(GuestMessage::StreamOpen {
            v: VERSION,
            stream,
            task: Some("build-0123abcd".into()),
        });
    };
    open(&mut guest, 1);
    guest.data(
        1,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhello").as_bytes(),
    );
    assert_eq!(guest.read(1, 44).len(), 44);
    guest.send(GuestMessage::StreamClose {
        v: VERSION,
        stream: 1,
        error: None,
    });
    open(&mut guest, 2);
    guest.data(2, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n");
    guest.read_until_closed(2, Duration::from_secs(5));
    let used = guest.used(2);
    assert_eq!(used.len(), 2, "{used:?}");
    let tunnel = used
        .iter()
        .find(|u| u.destination == format!("CONNECT 127.0.0.1:{port}"))
        .expect("the tunnel");
    assert_eq!(tunnel.task.as_deref(), Some("build-0123abcd"));
    assert_eq!(tunnel.rule.as_deref(), Some("fleet/loadouts/agent.yaml:9"));
    assert_eq!(tunnel.status, Some(200));
    assert_eq!((tunnel.bytes_up, tunnel.bytes_down), (5, 44));
    let refused = used
        .iter()
        .find(|u| u.destination == "CONNECT pypi.org:443")
        .expect("the refusal");
    assert_eq!((refused.rule.as_deref(), refused.status), (None, Some(403)));
    // A stream that never asked for anything reports nothing.
    open(&mut guest, 3);
    guest.send(GuestMessage::StreamClose {
        v: VERSION,
        stream: 3,
        error: None,
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(guest.used.lock().expect("lock").len(), 2);
}

#[test]
fn a_destination_no_rule_allows_gets_a_403_naming_the_fix() {
    let port = upstream();
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    guest.open(5, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n");
    let (body, _) = guest.read_until_closed(5, Duration::from_secs(5));
    let body = String::from_utf8(body).expect("text");
    assert!(body.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{body}");
    assert!(
        body.contains("add `{host: pypi.org, ports: [443]}` to egress.allow"),
        "{body}"
    );
    let denied = guest.denied.lock().expect("lock").clone();
    assert_eq!(denied.len(), 1);
    assert!(denied[0].starts_with("CONNECT pypi.org:443"), "{denied:?}");
}

#[test]
fn a_public_name_resolving_to_loopback_is_refused() {
    let port = upstream();
    let mut guest = Guest::new(
        Some(vec![rule("api.example.test", &[port])]),
        table(&[("api.example.test", "127.0.0.1")]),
    );
    guest.open(
        7,
        format!("CONNECT api.example.test:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    );
    let (body, _) = guest.read_until_closed(7, Duration::from_secs(5));
    let body = String::from_utf8(body).expect("text");
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");
    assert!(body.contains("internal address"), "{body}");
}

#[test]
fn a_rule_naming_an_internal_address_reaches_it_only_where_the_host_allows() {
    let port = upstream();
    let open = |allow_internal: Vec<ipnet::IpNet>| {
        let mut upstreams = upstreams(table(&[]), rustls::RootCertStore::empty());
        upstreams.allow_internal = allow_internal;
        let mut guest = Guest::with(
            Some(Policy {
                rules: vec![rule("127.0.0.1", &[port])],
                ..Policy::default()
            }),
            upstreams,
            Arc::new(|_| Err("no credentials here".into())),
        );
        guest.open(
            1,
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        );
        let (body, _) = guest.read_until_closed(1, Duration::from_secs(5));
        String::from_utf8(body).expect("text")
    };
    // The committed rule names the address, but the host's administrator allowed no
    // internal address: refused, and the answer says who can change that.
    let body = open(Vec::new());
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");
    assert!(body.contains("egress.allowInternal"), "{body}");
    // Allowed elsewhere inside only: still refused.
    let body = open(vec!["10.0.0.0/8".parse().expect("net")]);
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");
    // Allowed: the tunnel opens.
    let body = open(vec!["127.0.0.1/32".parse().expect("net")]);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

#[test]
fn garbage_gets_a_400_and_too_many_streams_are_refused() {
    let mut guest = Guest::new(Some(Vec::new()), system());
    // A head that never ends: refused once it passes the limit, not buffered forever.
    guest.open(9, &vec![b'a'; egress::MAX_HEAD_BYTES + 1]);
    let (body, _) = guest.read_until_closed(9, Duration::from_secs(5));
    let body = String::from_utf8(body).expect("text");
    assert!(body.starts_with("HTTP/1.1 400 Bad Request"), "{body}");
    // Bytes past the guest's credit end the stream at once (the link thread checks them).
    guest.open(10, &vec![b'a'; stream::CHUNK_BYTES + 1]);
    let (_, error) = guest.read_until_closed(10, Duration::from_secs(5));
    assert_eq!(error.as_deref(), Some("a malformed StreamData"));
    for id in 100..100 + stream::MAX_STREAMS as u32 + 1 {
        guest.send(GuestMessage::StreamOpen {
            v: VERSION,
            stream: id,
            task: None,
        });
    }
    let last = 100 + stream::MAX_STREAMS as u32;
    let (_, error) = guest.read_until_closed(last, Duration::from_secs(5));
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("connections at once")),
        "{error:?}"
    );
}

#[test]
fn a_large_download_waits_for_the_guests_credit() {
    // An upstream that sends 1 MiB as soon as it is connected.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.write_all(&vec![b'x'; 1 << 20]);
        }
    });
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    guest.open(
        11,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    );
    // Without credit back, exactly one window reaches the guest, and no more.
    let window = stream::WINDOW_BYTES as usize;
    let first = guest.read(11, window);
    let more = guest.read_for(11, 1, Duration::from_millis(300));
    assert_eq!(first.len() + more.len(), window, "one window, then nothing");
    // Half a window of credit lets half a window more through.
    let half = stream::WINDOW_BYTES / 2;
    guest.send(GuestMessage::StreamCredit {
        v: VERSION,
        stream: 11,
        bytes: half,
    });
    assert_eq!(guest.read(11, half as usize).len(), half as usize);
}

#[test]
fn a_stream_closed_while_its_reader_waits_for_credit_ends_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.write_all(&vec![b'x'; 1 << 20]);
            std::thread::sleep(Duration::from_secs(30));
        }
    });
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    guest.open(
        12,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    );
    let window = stream::WINDOW_BYTES as usize;
    assert_eq!(guest.read(12, window).len(), window);
    assert_eq!(
        guest.broker.live.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The reader waits for credit that never comes; the guest closes instead. Its threads
    // end now, not when the reader's minute runs out, and free the stream's slot.
    guest.send(GuestMessage::StreamClose {
        v: VERSION,
        stream: 12,
        error: None,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while guest.broker.live.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "the stream's threads still run");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An HTTP upstream that answers each request with its request line and Host header,
/// and records whatever else the connection carried after the head.
fn http_upstream() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let extra = Arc::new(Mutex::new(Vec::new()));
    let seen = extra.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&got).into_owned();
            let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            seen.lock()
                .expect("lock")
                .extend_from_slice(rest.as_bytes());
            let line = head.lines().next().unwrap_or_default();
            let host = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("host:"))
                .unwrap_or_default();
            let body = format!("{line}\n{host}\n");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (port, extra)
}

#[test]
fn a_plain_request_goes_upstream_alone_and_only_under_its_paths() {
    let (port, extra) = http_upstream();
    let rules = vec![Rule {
        path_prefixes: vec!["/ok/".into()],
        ..rule("127.0.0.1", &[port])
    }];
    let mut guest = Guest::new(Some(rules), system());
    guest.open(20, format!(
            "POST http://127.0.0.1:{port}/ok/x HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 4\r\n\r\nbodyGET /admin HTTP/1.1\r\n\r\n"
        )
        .as_bytes());
    let (answer, _) = guest.read_until_closed(20, Duration::from_secs(5));
    let answer = String::from_utf8(answer).expect("text");
    assert!(answer.contains("POST /ok/x HTTP/1.1"), "{answer}");
    assert!(
        answer.contains(&format!("Host: 127.0.0.1:{port}")),
        "{answer}"
    );
    assert_eq!(
        extra.lock().expect("lock").as_slice(),
        b"body",
        "the body went up, the smuggled second request did not"
    );

    guest.open(
        21,
        format!("GET http://127.0.0.1:{port}/admin HTTP/1.1\r\n\r\n").as_bytes(),
    );
    let (answer, _) = guest.read_until_closed(21, Duration::from_secs(5));
    let answer = String::from_utf8(answer).expect("text");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("allows the paths [\"/ok/\"], not /admin"),
        "{answer}"
    );

    // A tunnel would carry any path: the path-limited rule does not allow one.
    guest.open(
        22,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    );
    let (answer, _) = guest.read_until_closed(22, Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 403"));
}

/// A test authority, and an API on loopback serving `name` over TLS with a certificate it
/// signed: each request (head and body, as text) goes to `seen`, and is answered `answer`.
struct TlsApi {
    port: u16,
    roots: rustls::RootCertStore,
    /// The authority, as a host configuration's PEM file holds it.
    ca_pem: String,
    seen: std::sync::mpsc::Receiver<String>,
}

fn tls_api(name: &str, answer: &'static str) -> TlsApi {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let ca_pem = ca.pem();
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let Ok(conn) = rustls::ServerConnection::new(server.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let complete = |got: &[u8]| {
                let text = String::from_utf8_lossy(got);
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    return false;
                };
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                body.len() >= len
            };
            while !complete(&got) {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            if got.is_empty() {
                continue;
            }
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            let _ = tls.write_all(reply.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    TlsApi {
        port,
        roots,
        ca_pem,
        seen,
    }
}

fn credential(host: &str, port: u16, header: &str, scheme: Scheme) -> Credential {
    Credential {
        host: host.into(),
        port,
        header: header.into(),
        scheme,
        secret: "model".into(),
        key: "api_key".into(),
        source: "loadout agent egress.credentials[0]".into(),
    }
}

/// A guest whose policy has `credentials`, reaching the API through a resolver that
/// pins `api.example.test` to loopback (as the host configuration's `egress.hosts` does).
fn credentialed_guest(credentials: Vec<Credential>, roots: rustls::RootCertStore) -> Guest {
    credentialed_guest_with(
        credentials,
        table_with(&[("api.example.test", "127.0.0.1")], true),
        roots,
        b"sk-real-1234",
    )
}

/// The same with a resolver of the test's and the credential's value.
fn credentialed_guest_with(
    credentials: Vec<Credential>,
    resolve: Resolve,
    roots: rustls::RootCertStore,
    value: &'static [u8],
) -> Guest {
    Guest::with(
        Some(Policy {
            credentials,
            ..Policy::default()
        }),
        upstreams(resolve, roots),
        Arc::new(move |c: &Credential| {
            assert_eq!((c.secret.as_str(), c.key.as_str()), ("model", "api_key"));
            Ok(Zeroizing::new(value.to_vec()))
        }),
    )
}

fn request_to_api(guest: &mut Guest, stream: u32, request: &[u8]) -> (String, Option<String>) {
    guest.open(stream, request);
    let (bytes, error) = guest.read_until_closed(stream, Duration::from_secs(10));
    (String::from_utf8_lossy(&bytes).into_owned(), error)
}

#[test]
fn a_request_to_a_brokered_api_carries_the_real_key_and_never_the_guests() {
    let api = tls_api("api.example.test", "{\"ok\":true}");
    let mut guest = credentialed_guest(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        api.roots.clone(),
    );
    let (answer, error) = request_to_api(
        &mut guest,
        1,
        b"POST /api.example.test/v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nx-api-key: placeholder\r\nAuthorization: Bearer guessed\r\nContent-Length: 11\r\n\r\n{\"hi\":true}",
    );
    assert_eq!(error, None);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("{\"ok\":true}"), "{answer}");
    let seen = api
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(
        seen.starts_with("POST /v1/messages?beta=true HTTP/1.1\r\n"),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("\r\nHost: api.example.test:{}\r\n", api.port)),
        "{seen}"
    );
    assert!(seen.contains("\r\nx-api-key: sk-real-1234\r\n"), "{seen}");
    assert!(!seen.contains("placeholder"), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("authorization"),
        "{seen}"
    );
    assert!(seen.ends_with("\r\n\r\n{\"hi\":true}"), "{seen}");
    let used = guest.used(1);
    assert_eq!(used[0].status, Some(200), "the API's status: {used:?}");
    assert_eq!(
        used[0].rule.as_deref(),
        Some("loadout agent egress.credentials[0]")
    );
    assert_eq!(used[0].bytes_down, answer.len() as u64);
}

#[test]
fn bearer_and_basic_credentials_are_written_as_their_schemes_say() {
    for (scheme, expected) in [
        (
            Scheme::Bearer,
            "authorization: Bearer sk-real-1234".to_owned(),
        ),
        (
            Scheme::Basic {
                username: "x-access-token".into(),
            },
            format!(
                "authorization: Basic {}",
                base64::engine::general_purpose::STANDARD.encode("x-access-token:sk-real-1234")
            ),
        ),
    ] {
        let api = tls_api("api.example.test", "fine");
        let mut guest = credentialed_guest(
            vec![credential(
                "api.example.test",
                api.port,
                "authorization",
                scheme,
            )],
            api.roots.clone(),
        );
        let (answer, _) = request_to_api(
            &mut guest,
            1,
            b"GET /api.example.test/info.git/refs HTTP/1.1\r\nauthorization: Basic Z3Vlc3M=\r\n\r\n",
        );
        assert!(answer.ends_with("fine"), "{answer}");
        let seen = api
            .seen
            .recv_timeout(Duration::from_secs(5))
            .expect("a request");
        assert!(seen.contains(&format!("\r\n{expected}\r\n")), "{seen}");
        assert_eq!(seen.matches("authorization").count(), 1, "{seen}");
    }
}

#[test]
fn an_api_without_a_credential_or_with_a_certificate_the_host_does_not_trust_is_refused() {
    let api = tls_api("api.example.test", "fine");
    // No credential for the host named in the path: 403, and the denial is an event.
    let mut guest = credentialed_guest(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        api.roots.clone(),
    );
    let (answer, _) = request_to_api(&mut guest, 1, b"GET /api.other.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("egress.credentials"), "{answer}");
    assert_eq!(guest.denied.lock().expect("lock").len(), 1);

    // A certificate from an authority the host does not trust: 502, and nothing (the key
    // least of all) was sent.
    let mut guest = credentialed_guest(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        rustls::RootCertStore::empty(),
    );
    let (answer, _) = request_to_api(&mut guest, 2, b"GET /api.example.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("TLS"), "{answer}");
    assert!(api.seen.recv_timeout(Duration::from_millis(500)).is_err());
}

#[test]
fn a_hosts_own_authority_is_trusted_for_that_name_alone() {
    let api = tls_api("api.example.test", "fine");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("registry-ca.pem");
    std::fs::write(&ca_file, &api.ca_pem).expect("write");
    let host_egress = |name: &str| crate::spec::HostEgress {
        hosts: BTreeMap::from([(
            "api.example.test".to_owned(),
            "127.0.0.1".parse().expect("ip"),
        )]),
        host_ca_files: BTreeMap::from([(
            name.to_owned(),
            crate::spec::HostPath(ca_file.to_string_lossy().into_owned()),
        )]),
        ..Default::default()
    };
    let guest_trusting = |name: &str| {
        Guest::with(
            Some(Policy {
                credentials: vec![credential(
                    "api.example.test",
                    api.port,
                    "x-api-key",
                    Scheme::Plain,
                )],
                ..Policy::default()
            }),
            Upstreams::from_host(&host_egress(name)).expect("upstreams"),
            Arc::new(|_: &Credential| Ok(Zeroizing::new(b"sk-real-1234".to_vec()))),
        )
    };
    // The authority named for this host: its certificate is trusted.
    let mut guest = guest_trusting("API.example.test");
    let (answer, _) = request_to_api(&mut guest, 1, b"GET /api.example.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("fine"), "{answer}");
    // The same authority named for another host only: not trusted here.
    let mut guest = guest_trusting("registry.example.test");
    let (answer, _) = request_to_api(&mut guest, 2, b"GET /api.example.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("TLS"), "{answer}");
    // A key that names no host (a port, an address) is refused, not ignored.
    for key in ["api.example.test:443", "127.0.0.1"] {
        let error = Upstreams::from_host(&host_egress(key))
            .err()
            .expect("refused");
        assert!(error.to_string().contains("not a host name"), "{error:#}");
    }
    // A file that holds no certificate is an error when the daemon starts, not silence.
    std::fs::write(&ca_file, "not a certificate").expect("write");
    let error = Upstreams::from_host(&host_egress("api.example.test"))
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("no PEM certificate"),
        "{error:#}"
    );
}

#[test]
fn a_brokered_api_whose_name_resolves_inside_is_refused_unless_the_host_pins_it() {
    let api = tls_api("api.example.test", "fine");
    let mut guest = credentialed_guest_with(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        // Resolved by "DNS" (not pinned) to loopback.
        table(&[("api.example.test", "127.0.0.1")]),
        api.roots.clone(),
        b"sk-real-1234",
    );
    let (answer, _) = request_to_api(&mut guest, 1, b"GET /api.example.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("internal address"), "{answer}");
    assert!(api.seen.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn a_credential_value_that_could_end_its_header_is_never_sent() {
    let api = tls_api("api.example.test", "fine");
    let mut guest = credentialed_guest_with(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        table_with(&[("api.example.test", "127.0.0.1")], true),
        api.roots.clone(),
        b"sk-1\r\nx-evil: 1",
    );
    let (answer, _) = request_to_api(&mut guest, 1, b"GET /api.example.test/v1 HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("visible ASCII"), "{answer}");
    assert!(api.seen.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn a_brokered_apis_answer_is_read_for_its_tokens_uncompressed() {
    let api = tls_api(
        "api.example.test",
        r#"{"usage":{"input_tokens":30,"cache_read_input_tokens":70,"output_tokens":12}}"#,
    );
    let mut guest = credentialed_guest(
        vec![credential(
            "api.example.test",
            api.port,
            "x-api-key",
            Scheme::Plain,
        )],
        api.roots.clone(),
    );
    let (answer, _) = request_to_api(
        &mut guest,
        1,
        b"POST /api.example.test/v1/messages HTTP/1.1\r\nAccept-Encoding: gzip, br\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(answer.contains("output_tokens"), "{answer}");
    let seen = api
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(
        !seen.to_ascii_lowercase().contains("accept-encoding"),
        "{seen}"
    );
    let used = guest.used(1);
    assert_eq!(
        used[0].tokens,
        Some(crate::tokens::Metered {
            tokens: crate::tokens::Tokens {
                input: 100,
                output: 12
            },
            unreadable: None,
        })
    );
}

#[test]
fn a_run_over_its_budget_gets_429_and_nothing_is_dialed() {
    let port = upstream();
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port])]), system());
    *guest.host.over_budget.lock().expect("lock") =
        Some("task t has used 5 connections of its budget of 5".into());
    guest.send(GuestMessage::StreamOpen {
        v: VERSION,
        stream: 1,
        task: Some("t-0123abcd".into()),
    });
    guest.data(
        1,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhello").as_bytes(),
    );
    let (body, _) = guest.read_until_closed(1, Duration::from_secs(5));
    let body = String::from_utf8(body).expect("text");
    assert!(body.starts_with("HTTP/1.1 429 Too Many Requests"), "{body}");
    assert!(body.contains("of its budget of 5"), "{body}");
    assert!(!body.contains("HELLO"), "{body}");
    let used = guest.used(1);
    assert_eq!(
        (used[0].status, used[0].rule.as_deref(), used[0].bytes_up),
        (Some(429), None, 0)
    );
}

#[test]
fn a_task_that_narrows_its_vms_rules_reaches_only_what_both_allow() {
    let (port, other) = (upstream(), upstream());
    let mut guest = Guest::new(Some(vec![rule("127.0.0.1", &[port, other])]), system());
    *guest.host.narrowed.lock().expect("lock") = vec![Rule {
        source: "task build egress.allow[0]".into(),
        ..rule("127.0.0.1", &[port])
    }];
    let connect = |guest: &mut Guest, stream: u32, to: u16| {
        guest.send(GuestMessage::StreamOpen {
            v: VERSION,
            stream,
            task: Some("build-0123abcd".into()),
        });
        guest.data(
            stream,
            format!("CONNECT 127.0.0.1:{to} HTTP/1.1\r\n\r\n").as_bytes(),
        );
    };
    connect(&mut guest, 1, port);
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    assert_eq!(guest.read(1, established.len()), established);
    connect(&mut guest, 2, other);
    let (body, _) = guest.read_until_closed(2, Duration::from_secs(5));
    let body = String::from_utf8(body).expect("text");
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");
    assert!(
        body.contains("the task narrows its VM's egress") && body.contains("in the task's file"),
        "{body}"
    );
}

#[test]
fn a_flooding_guest_gets_its_own_streams_refused_and_another_vm_goes_on() {
    let port = upstream();
    let rules = || Some(vec![rule("127.0.0.1", &[port])]);
    let mut flooding = Guest::new(rules(), system());
    let mut other = Guest::new(rules(), system());
    // A thousand tunnels opened at once, none of them ever read.
    for stream in 0..1000 {
        flooding.send(GuestMessage::StreamOpen {
            v: VERSION,
            stream,
            task: None,
        });
        flooding.data(
            stream,
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nping").as_bytes(),
        );
    }
    let refused = flooding
        .broker
        .outgoing()
        .into_iter()
        .filter(|m| {
            matches!(m, HostMessage::StreamClose { error: Some(e), .. }
                if e.contains("more than 64 connections at once"))
        })
        .count();
    assert_eq!(refused, 1000 - stream::MAX_STREAMS, "beyond the cap");
    assert!(
        flooding
            .broker
            .live
            .load(std::sync::atomic::Ordering::Relaxed)
            <= stream::MAX_STREAMS
    );
    // Another VM's link is its own broker: its tunnel works as if nothing happened.
    other.open(
        1,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhello").as_bytes(),
    );
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let got = other.read(1, established.len() + 5);
    assert_eq!(&got[established.len()..], b"HELLO");
}

#[test]
fn the_proxy_address_tasks_are_given_is_the_one_the_agent_listens_on() {
    assert_eq!(
        crate::egress::PROXY_HOST_PORT,
        fleet_agent_protocol::stream::PROXY_ADDRESS
    );
}
