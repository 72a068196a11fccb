//! The guest half of brokered egress: an HTTP proxy on the guest's loopback
//! (`stream::PROXY_ADDRESS`) that decides nothing. Each connection a task makes becomes a
//! stream over the agent link (`StreamOpen`, then `StreamData` both ways within credit);
//! the host's broker reads the request, applies the VM's rules and dials. A VM without a
//! network card reaches only what the host allows, and this side can be replaced by a
//! hostile guest without gaining anything.
//!
//! Streams belong to one opening of the link (`set_sink`): when it closes, they close.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fleet_agent_protocol::stream::{self, Credit, RecvWindow, Take};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

/// Where this side's messages go: the current opening of the link.
pub type Sink = Arc<dyn Fn(GuestMessage) + Send + Sync>;

/// The task a user id runs, if any (see `Tasks::task_of_uid`).
pub type Owner = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Names the task behind a connection, from its socket's user.
    owner: Option<Owner>,
    sink: Mutex<Option<Sink>>,
    streams: Mutex<HashMap<u32, Stream>>,
    next: AtomicU32,
}

struct Stream {
    socket: TcpStream,
    /// Bytes for the client, written by the stream's writer thread.
    to_client: Sender<Vec<u8>>,
    recv: Arc<Mutex<RecvWindow>>,
    send: Arc<Credit>,
}

impl Proxy {
    /// Listens on `address` and serves connections for as long as the agent runs.
    pub fn start(address: &str, owner: Option<Owner>) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(address)?;
        let proxy = Proxy {
            inner: Arc::new(Inner {
                owner,
                ..Inner::default()
            }),
        };
        let serving = proxy.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                serving.accept(conn);
            }
        });
        Ok(proxy)
    }

    /// The link opened (`Some`) or closed (`None`, every stream closes with it).
    pub fn set_sink(&self, sink: Option<Sink>) {
        *self.inner.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
        let closed: Vec<Stream> = self.streams().drain().map(|(_, s)| s).collect();
        for stream in closed {
            stream.send.close();
            let _ = stream.socket.shutdown(Shutdown::Both);
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Stream>> {
        self.inner.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sink(&self) -> Option<Sink> {
        self.inner
            .sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn accept(&self, conn: TcpStream) {
        let Some(sink) = self.sink() else {
            return; // No link: the client sees its connection closed.
        };
        if self.streams().len() >= stream::MAX_STREAMS {
            return;
        }
        let task = self.inner.owner.as_ref().and_then(|owner| {
            let (client, proxy) = (conn.peer_addr().ok()?, conn.local_addr().ok()?);
            owner(socket_uid(client, proxy)?)
        });
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (Ok(reader), Ok(mut writer)) = (conn.try_clone(), conn.try_clone()) else {
            return;
        };
        let (to_client, from_host) = channel::<Vec<u8>>();
        let recv = Arc::new(Mutex::new(RecvWindow::default()));
        let send = Arc::new(Credit::default());
        self.streams().insert(
            id,
            Stream {
                socket: conn,
                to_client,
                recv: recv.clone(),
                send: send.clone(),
            },
        );
        sink(GuestMessage::StreamOpen {
            v: VERSION,
            stream: id,
            task,
        });
        // The host's bytes to the client; credit goes back as they are written.
        {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for bytes in from_host {
                    if writer.write_all(&bytes).is_err() {
                        break;
                    }
                    let grant = recv
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .consumed(bytes.len());
                    if let Some(bytes) = grant {
                        sink(GuestMessage::StreamCredit {
                            v: VERSION,
                            stream: id,
                            bytes,
                        });
                    }
                }
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
        // The client's bytes to the host, within the host's credit.
        let proxy = self.clone();
        std::thread::spawn(move || {
            client_to_host(id, reader, &send, &sink);
            if proxy.streams().remove(&id).is_some() {
                sink(GuestMessage::StreamClose {
                    v: VERSION,
                    stream: id,
                    error: None,
                });
            }
        });
    }

    /// A stream message from the host (others are not the proxy's).
    pub fn handle(&self, message: &HostMessage) {
        match message {
            HostMessage::StreamData { stream, data, .. } => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(data);
                let mut streams = self.streams();
                let Some(s) = streams.get(stream) else {
                    return;
                };
                let fits = bytes.as_ref().is_ok_and(|b| {
                    s.recv
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .received(b.len())
                        .is_ok()
                });
                match bytes {
                    Ok(bytes) if fits => {
                        let _ = s.to_client.send(bytes);
                    }
                    _ => {
                        if let Some(s) = streams.remove(stream) {
                            let _ = s.socket.shutdown(Shutdown::Both);
                        }
                    }
                }
            }
            HostMessage::StreamCredit { stream, bytes, .. } => {
                if let Some(s) = self.streams().get(stream) {
                    let _ = s.send.grant(*bytes);
                }
            }
            HostMessage::StreamClose { stream, .. } => {
                // The host is done: what it sent is still written to the client (the
                // writer thread drains its queue), then both ends close. Acknowledged, so
                // the host forgets the stream too.
                let removed = self.streams().remove(stream);
                if let Some(s) = removed {
                    let _ = s.socket.shutdown(Shutdown::Read);
                    s.send.close();
                    if let Some(sink) = self.sink() {
                        sink(GuestMessage::StreamClose {
                            v: VERSION,
                            stream: *stream,
                            error: None,
                        });
                    }
                }
            }
            _ => {}
        }
    }
}

/// The user that owns the client end of a loopback connection to the proxy: the line of
/// `/proc/net/tcp` whose local address is the client's and remote the proxy's, or of
/// `/proc/net/tcp6` for a client on an IPv6 socket (addresses mapped, `::ffff:127.0.0.1`).
fn socket_uid(client: std::net::SocketAddr, proxy: std::net::SocketAddr) -> Option<u32> {
    let (std::net::SocketAddr::V4(client), std::net::SocketAddr::V4(proxy)) = (client, proxy)
    else {
        return None;
    };
    // The kernel prints each 32-bit word of an address in the machine's byte order, and
    // the port as a number.
    let words = |octets: &[u8]| -> String {
        octets
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    };
    let v4 = |a: std::net::SocketAddrV4| format!("{}:{:04X}", words(&a.ip().octets()), a.port());
    let v6 = |a: std::net::SocketAddrV4| {
        format!(
            "{}:{:04X}",
            words(&a.ip().to_ipv6_mapped().octets()),
            a.port()
        )
    };
    [
        ("/proc/net/tcp", v4(client), v4(proxy)),
        ("/proc/net/tcp6", v6(client), v6(proxy)),
    ]
    .into_iter()
    .find_map(|(table, local, remote)| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
                .then(|| fields.get(7)?.parse().ok())
                .flatten()
        })
    })
}

/// Copies what the client sends to the host, within the host's credit; returns at the
/// client's end (or when the stream is closed under it).
fn client_to_host(id: u32, mut client: TcpStream, send: &Credit, sink: &Sink) {
    let mut buf = vec![0u8; stream::CHUNK_BYTES];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut at = 0;
        while at < n {
            let Take::Bytes(allowed) = send.take(n - at, Duration::from_secs(60)) else {
                return; // Closed, or a host that took nothing for a minute.
            };
            sink(GuestMessage::StreamData {
                v: VERSION,
                stream: id,
                data: base64::engine::general_purpose::STANDARD.encode(&buf[at..at + allowed]),
            });
            at += allowed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;

    fn proxy_with_sink() -> (Proxy, String, Receiver<GuestMessage>) {
        proxy_owned_by(None)
    }

    fn proxy_owned_by(owner: Option<Owner>) -> (Proxy, String, Receiver<GuestMessage>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let proxy = Proxy::start(&address, owner).expect("listen");
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        proxy.set_sink(Some(Arc::new(move |m| {
            let _ = tx.lock().expect("lock").send(m);
        })));
        (proxy, address, rx)
    }

    fn next(rx: &Receiver<GuestMessage>) -> GuestMessage {
        rx.recv_timeout(Duration::from_secs(5)).expect("a message")
    }

    #[test]
    fn a_stream_names_the_task_whose_user_opened_it() {
        let me = nix::unistd::getuid().as_raw();
        let owner: Owner = Arc::new(move |uid| (uid == me).then(|| "build-3".to_owned()));
        let (_proxy, address, rx) = proxy_owned_by(Some(owner));
        let _client = TcpStream::connect(&address).expect("connect");
        let GuestMessage::StreamOpen { task, .. } = next(&rx) else {
            panic!("a stream opens");
        };
        assert_eq!(task.as_deref(), Some("build-3"));
    }

    #[test]
    fn a_client_on_an_ipv6_socket_is_named_too() {
        let me = nix::unistd::getuid().as_raw();
        let owner: Owner = Arc::new(move |uid| (uid == me).then(|| "build-6".to_owned()));
        let (_proxy, address, rx) = proxy_owned_by(Some(owner));
        let port = address.rsplit(':').next().expect("port");
        let Ok(_client) = TcpStream::connect(format!("[::ffff:127.0.0.1]:{port}")) else {
            return; // No IPv6 here: nothing to check.
        };
        let GuestMessage::StreamOpen { task, .. } = next(&rx) else {
            panic!("a stream opens");
        };
        assert_eq!(task.as_deref(), Some("build-6"));
    }

    #[test]
    fn a_connection_becomes_a_stream_both_ways() {
        let (proxy, address, rx) = proxy_with_sink();
        let mut client = TcpStream::connect(&address).expect("connect");
        let GuestMessage::StreamOpen { stream: id, .. } = next(&rx) else {
            panic!("a stream opens");
        };
        client
            .write_all(b"CONNECT a.example.com:443 HTTP/1.1\r\n\r\n")
            .expect("write");
        let GuestMessage::StreamData { stream, data, .. } = next(&rx) else {
            panic!("the request goes to the host");
        };
        assert_eq!(stream, id);
        let sent = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("b64");
        assert!(sent.starts_with(b"CONNECT a.example.com:443"));
        proxy.handle(&HostMessage::StreamData {
            v: VERSION,
            stream: id,
            data: base64::engine::general_purpose::STANDARD.encode(b"HTTP/1.1 200 OK\r\n\r\n"),
        });
        let mut answer = [0u8; 19];
        client.read_exact(&mut answer).expect("read");
        assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n\r\n");
        // The host closes: the client sees the end, and the close is acknowledged.
        proxy.handle(&HostMessage::StreamClose {
            v: VERSION,
            stream: id,
            error: None,
        });
        assert!(matches!(next(&rx), GuestMessage::StreamClose { stream, .. } if stream == id));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("the end");
        assert!(rest.is_empty());
    }

    #[test]
    fn a_client_sends_no_more_than_the_hosts_credit() {
        let (proxy, address, rx) = proxy_with_sink();
        let mut client = TcpStream::connect(&address).expect("connect");
        let GuestMessage::StreamOpen { stream: id, .. } = next(&rx) else {
            panic!("a stream opens");
        };
        let upload = vec![b'u'; (stream::WINDOW_BYTES * 2) as usize];
        std::thread::spawn(move || {
            let _ = client.write_all(&upload);
            std::thread::sleep(Duration::from_secs(2));
        });
        let mut received = 0usize;
        while let Ok(GuestMessage::StreamData { data, .. }) =
            rx.recv_timeout(Duration::from_millis(500))
        {
            received += base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("b64")
                .len();
        }
        assert_eq!(
            received as u64,
            stream::WINDOW_BYTES,
            "one window without credit"
        );
        proxy.handle(&HostMessage::StreamCredit {
            v: VERSION,
            stream: id,
            bytes: stream::WINDOW_BYTES / 2,
        });
        let mut more = 0usize;
        while let Ok(GuestMessage::StreamData { data, .. }) =
            rx.recv_timeout(Duration::from_millis(500))
        {
            more += base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("b64")
                .len();
        }
        assert_eq!(more as u64, stream::WINDOW_BYTES / 2);
    }

    #[test]
    fn without_a_link_connections_are_closed() {
        let (proxy, address, _rx) = proxy_with_sink();
        proxy.set_sink(None);
        let mut client = TcpStream::connect(&address).expect("connect");
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).expect("closed"), 0);
    }
}
