//! Brokered egress, measured in one process: the host's broker driven the way an agent link
//! drives it, every message through its wire form (a JSON line, base64 data) and the
//! guest's credit, against the same transfer made directly on the host. What this leaves
//! out is the channel itself (virtio-serial or the Proxmox relay), which carries the same
//! lines either way.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use fleet::broker::{Admitted, Broker, Host, Outbox, Upstreams, Used};
use fleet::egress::{Credential, HostPattern, Policy, Rule};
use fleet_agent_protocol::stream::RecvWindow;
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

/// A VM whose loadout allows one upstream.
struct BenchHost {
    policy: Arc<Policy>,
}

impl Host for BenchHost {
    fn policy(&self) -> Option<Arc<Policy>> {
        Some(self.policy.clone())
    }
    fn credential(&self, _: &Credential) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        Err("no credentials in this bench".into())
    }
    fn admit(&self, _: Option<&str>) -> Result<Admitted, String> {
        Ok(Admitted::default())
    }
    fn denied(&self, _: String) {}
    fn used(&self, _: Used) {}
}

/// An upstream on loopback: for each connection, reads one byte, then sends `bytes` bytes
/// and closes.
fn upstream(bytes: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let block = vec![b'x'; 64 * 1024];
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut one = [0u8; 1];
            if conn.read_exact(&mut one).is_err() {
                continue;
            }
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len());
                if conn.write_all(&block[..n]).is_err() {
                    break;
                }
                left -= n;
            }
        }
    });
    port
}

fn direct(port: u16) -> (Duration, usize) {
    let started = Instant::now();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.write_all(b"g").expect("write");
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    (started.elapsed(), got)
}

/// One connection through the broker, as the guest's proxy makes it: returns the time and
/// the bytes the guest received after the tunnel's 200.
fn brokered(broker: &mut Broker, stream: u32, port: u16) -> (Duration, usize) {
    let started = Instant::now();
    let send = |broker: &mut Broker, message: GuestMessage| {
        // Through the wire form, as the link carries it.
        let line = message.to_line();
        broker.on_guest(&GuestMessage::from_line(&line).expect("a guest line"));
    };
    send(
        broker,
        GuestMessage::StreamOpen {
            v: VERSION,
            stream,
            task: None,
        },
    );
    let connect = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\ng");
    send(
        broker,
        GuestMessage::StreamData {
            v: VERSION,
            stream,
            data: base64::engine::general_purpose::STANDARD.encode(connect),
        },
    );
    let mut window = RecvWindow::default();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The link thread waits on the outbox's waker; polling briefly stands in for it.
        let messages = broker.outgoing();
        if messages.is_empty() {
            assert!(Instant::now() < deadline, "the broker stopped answering");
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        for message in messages {
            let line = message.to_line();
            match HostMessage::from_line(&line).expect("a host line") {
                HostMessage::StreamData { data, .. } => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64");
                    window.received(bytes.len()).expect("within credit");
                    got += bytes.len();
                    if let Some(grant) = window.consumed(bytes.len()) {
                        send(
                            broker,
                            GuestMessage::StreamCredit {
                                v: VERSION,
                                stream,
                                bytes: grant,
                            },
                        );
                    }
                }
                HostMessage::StreamClose { .. } => {
                    send(
                        broker,
                        GuestMessage::StreamClose {
                            v: VERSION,
                            stream,
                            error: None,
                        },
                    );
                    let established = b"HTTP/1.1 200 Connection established\r\n\r\n".len();
                    return (started.elapsed(), got.saturating_sub(established));
                }
                _ => {}
            }
        }
    }
}

/// Prints throughput (a 64 MiB download) and time per short request, brokered and direct.
pub fn bench_broker() -> anyhow::Result<()> {
    const TOTAL: usize = 64 * 1024 * 1024;
    let big = upstream(TOTAL);
    let small = upstream(1);
    let rule = |port: u16| Rule {
        host: HostPattern::parse("127.0.0.1").expect("an address"),
        ports: vec![port],
        path_prefixes: Vec::new(),
        source: "bench".into(),
    };
    let host = Arc::new(BenchHost {
        policy: Arc::new(Policy {
            rules: vec![rule(big), rule(small)],
            ..Policy::default()
        }),
    });
    // The bench's upstreams listen on loopback, which the broker dials only where the host
    // allows internal addresses.
    let upstreams = Upstreams::from_host(&fleet::spec::HostEgress {
        allow_internal: vec!["127.0.0.1".into()],
        ..fleet::spec::HostEgress::default()
    })?;
    let mut broker = Broker::new(host, upstreams, Outbox::new(None));

    let (direct_time, direct_bytes) = direct(big);
    let (broker_time, broker_bytes) = brokered(&mut broker, 1, big);
    anyhow::ensure!(
        direct_bytes == TOTAL && broker_bytes == TOTAL,
        "short transfer: {direct_bytes} direct, {broker_bytes} brokered"
    );
    let mib_s = |d: Duration| TOTAL as f64 / (1024.0 * 1024.0) / d.as_secs_f64();
    println!(
        "broker: 64 MiB through a tunnel: {:.0} MiB/s brokered (wire form and credit included, no channel), {:.0} MiB/s direct on the host (ratio {:.2}; the goal, 0.70 of the raw channel's throughput, is measured against the channel, not this)",
        mib_s(broker_time),
        mib_s(direct_time),
        mib_s(broker_time) / mib_s(direct_time)
    );

    const REQUESTS: u32 = 200;
    let mut direct_total = Duration::ZERO;
    let mut broker_total = Duration::ZERO;
    for i in 0..REQUESTS {
        direct_total += direct(small).0;
        broker_total += brokered(&mut broker, 100 + i, small).0;
    }
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(REQUESTS);
    println!(
        "broker: a short request (connect, 1 byte each way) over {REQUESTS}: {:.2} ms brokered, {:.2} ms direct (added {:.2} ms; goal <= 5 ms)",
        per(broker_total),
        per(direct_total),
        per(broker_total) - per(direct_total)
    );
    Ok(())
}
