//! Brokered egress on a real VM (libvirt, QEMU under TCG), next to the physical limit of its
//! channel:
//!
//! - raw: a domain of the bench's own with a second virtio-serial port, to which the micro
//!   image's init copies zeros (`fleet.bench.channel=MIB` on its command line) with nothing
//!   in between: no agent, no framing, no broker;
//! - brokered: a fleet VM with `network: brokered` whose task downloads the same amount
//!   from an upstream on the host's loopback through the agent's proxy, the agent link and
//!   the broker, timed inside the guest; then short requests, one connection each.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;

use crate::ScratchFleet;

const BENCH_PORT: &str = "org.fleet.bench.0";
const SHORT_REQUESTS: u32 = 20;

pub fn bench_vm_egress(mib: u64) -> anyhow::Result<()> {
    let raw = raw_channel(mib)?;
    let Brokered {
        mib_s: brokered,
        per_request_ms,
        loopback_mib_s: loopback,
    } = brokered(mib)?;
    println!(
        "egress on libvirt (TCG): {mib} MiB: {raw:.1} MiB/s raw over the VM's virtio-serial port, {brokered:.1} MiB/s brokered (ratio {:.2}; goal >= 0.70)",
        brokered / raw
    );
    println!(
        "egress on libvirt (TCG): {mib} MiB copied over the guest's own loopback TCP, no link or broker (the hop a proxy in the guest adds): {loopback:.1} MiB/s; brokered is {:.2} of it",
        brokered / loopback
    );
    println!(
        "egress on libvirt (TCG): a short request through the broker, timed in the guest (wget started, connected, answered): {per_request_ms:.1} ms over {SHORT_REQUESTS} (the broker's own share is the in-process figure below)"
    );
    Ok(())
}

/// MiB/s of a plain copy from the guest to the host over a virtio-serial port.
fn raw_channel(mib: u64) -> anyhow::Result<f64> {
    let image = std::env::current_dir()?.join("build/image");
    let name = format!("fleet-bench-channel-{}", std::process::id());
    let xml = format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>256</memory>\n  <vcpu>2</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0 fleet.bench.channel={mib}</cmdline></os>\n  <features><acpi/></features>\n  <devices>\n    <serial type='pty'><target port='0'/></serial>\n    <channel type='unix'><source mode='bind'/><target type='virtio' name='{BENCH_PORT}'/></channel>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
        image.join("vmlinuz").display(),
        image.join("initrd.img").display(),
    );
    let conn = Connect::open(Some("qemu:///system"))?;
    let domain = conn.create_domain_xml(&xml, 0)?;
    // A transient domain: destroying it removes it.
    struct Gone(Domain);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = self.0.destroy();
        }
    }
    let domain = Gone(domain);
    let live = domain.0.xml_desc(0)?;
    let socket = channel_socket(&live)
        .ok_or_else(|| anyhow::anyhow!("the bench domain's channel has no socket:\n{live}"))?;
    let mut port = UnixStream::connect(&socket)?;
    // The guest reads one byte, then writes: knock until the zeros come (the byte is lost
    // while the guest's init has not opened the port yet).
    port.set_read_timeout(Some(Duration::from_millis(200)))?;
    let total = (mib * 1024 * 1024) as usize;
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bench guest never wrote to its port"
        );
        port.write_all(b"!")?;
        match port.read(&mut buf) {
            Ok(n) if n > 0 => break n,
            _ => continue,
        }
    };
    let started = Instant::now();
    port.set_read_timeout(Some(Duration::from_secs(30)))?;
    while got < total {
        let n = port.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the channel closed after {got} bytes");
        got += n;
    }
    Ok(mib as f64 / started.elapsed().as_secs_f64())
}

/// The host side of the channel named `BENCH_PORT` in a live domain's XML.
fn channel_socket(xml: &str) -> Option<String> {
    xml.split("<channel ").skip(1).find_map(|channel| {
        let channel = channel.split("</channel>").next()?;
        if !channel.contains(&format!("name='{BENCH_PORT}'")) {
            return None;
        }
        let path = channel.split("path='").nth(1)?.split('\'').next()?;
        Some(path.to_owned())
    })
}

/// An HTTP upstream on loopback: `/big` is `bytes` zeros, anything else two bytes.
fn upstream(bytes: u64) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let big = head.starts_with(b"GET /big ");
                let len = if big { bytes } else { 2 };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                if conn.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                let block = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    if conn.write_all(&block[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    Ok(port)
}

/// What the brokered task measured, by the guest's clock.
struct Brokered {
    /// A download through the broker.
    mib_s: f64,
    /// One short request, a connection each.
    per_request_ms: f64,
    /// The same bytes copied from one guest process to another over the guest's own
    /// loopback TCP (busybox nc to nc): the hop any proxy inside the guest adds, with no
    /// link, agent or broker.
    loopback_mib_s: f64,
}

fn brokered(mib: u64) -> anyhow::Result<Brokered> {
    let port = upstream(mib * 1024 * 1024)?;
    let scratch = ScratchFleet::new(&format!("benchegress{}", std::process::id()))?;
    scratch.write(
        "fleet/loadouts/agent.yaml",
        &format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: agent}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    allow:\n      - {{host: '127.0.0.1', ports: [{port}]}}\n"
        ),
    )?;
    // The upstream plays the outside on loopback, which rules reach only where the host
    // configuration allows.
    let host = std::fs::read_to_string(scratch.host_config())?;
    std::fs::write(
        scratch.host_config(),
        format!("{host}  egress:\n    allowInternal: ['127.0.0.1']\n"),
    )?;
    scratch.write(
        "fleet/vms/egress.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: egress}\nspec: {provider: local, image: micro, loadout: agent, resources: {memory: 256Mi, cpus: 2}}\n",
    )?;
    // Times from the guest's /proc/uptime (10 ms steps), printed as `took NAME SECONDS`.
    let script = format!(
        "unset NO_PROXY no_proxy; now() {{ cut -d' ' -f1 /proc/uptime; }}; a=$(now); busybox wget -q -O - http://127.0.0.1:{port}/big | busybox wc -c; b=$(now); for i in $(seq {SHORT_REQUESTS}); do busybox wget -q -O /dev/null http://127.0.0.1:{port}/small; done; c=$(now); busybox dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | busybox nc -l -p 9009 & sleep 1; d=$(now); busybox nc 127.0.0.1 9009 | busybox wc -c; e=$(now); echo took big $a $b; echo took short $b $c; echo took loopback $d $e",
        blocks = mib * 16
    );
    scratch.write(
        "fleet/tasks/download.yaml",
        &format!(
            "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: download}}\nspec:\n  vm: egress\n  timeout: 30m\n  command: [sh, -c, {}]\n",
            serde_json::to_string(&script)?
        ),
    )?;
    scratch.commit("a brokered download")?;
    let _daemon = scratch.serve()?;
    let output = scratch
        .path()
        .join(".fleet/status/tasks/download/output.log");
    let deadline = Instant::now() + Duration::from_secs(1800);
    let text = loop {
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        if text.contains("took loopback") {
            break text;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the download task never finished: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    anyhow::ensure!(
        text.contains(&(mib * 1024 * 1024).to_string()),
        "the download came short: {text}"
    );
    let took = |what: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("took {what} ")))
            .ok_or_else(|| anyhow::anyhow!("no time for {what}: {text}"))?;
        let mut times = line.split(' ').map(str::parse::<f64>);
        match (times.next(), times.next()) {
            (Some(Ok(a)), Some(Ok(b))) => Ok(b - a),
            _ => anyhow::bail!("unreadable time for {what}: {line}"),
        }
    };
    Ok(Brokered {
        mib_s: mib as f64 / took("big")?,
        per_request_ms: took("short")? * 1000.0 / f64::from(SHORT_REQUESTS),
        loopback_mib_s: mib as f64 / took("loopback")?,
    })
}
