//! The agent link to a VM on a remote libvirt host: the guest's virtio-serial channel
//! opened with `virDomainOpenChannel`, so the link needs nothing but a libvirt connection
//! to the VM's host (`qemu+ssh://`), and bridged to one end of a socket pair, so the link
//! reads and waits on a socket as it does on fleet's own host.
//!
//! Each channel has a connection of its own. libvirtd stops reading a client whose stream
//! packets wait for a guest that does not read, and libvirt's client queues what a guest
//! sends without bound while nobody takes it: on a shared connection one guest could stall
//! every call fleet makes to that host, or fill fleet's memory. Here it stalls only its own
//! link, and the bridge ends the channel (closing its connection, and so the queue) when
//! the link does not take the guest's bytes within `STALL`.
//!
//! Two threads per channel: one carries the guest's bytes to the socket, the other the
//! link's bytes to the guest. Either side ending ends both: a guest side that closes (the
//! VM stopped, the connection broke) shuts the socket, so the link reads its end; a link
//! that is dropped closes its end, and the stream is aborted and its connection closed. A
//! stream libvirtd still holds for an earlier link is taken over by the next open
//! (`VIR_DOMAIN_CHANNEL_FORCE`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use std::time::Duration;

use virt::connect::Connect;
use virt::stream::Stream;

/// How much one read carries: libvirt's stream packets hold 256 KiB at most.
const CHUNK: usize = 64 * 1024;

/// How long the link may leave the guest's bytes untaken before the channel is ended.
const STALL: Duration = Duration::from_secs(5);

/// Opens VM `vm`'s agent channel on the host at `uri`, on a connection of its own, and
/// bridges it to a socket; returns the link's end. `uuid` is the domain the caller found
/// to be fleet's: a domain of that name with another UUID is refused.
pub fn open(uri: &str, vm: &str, uuid: uuid::Uuid) -> Result<UnixStream, String> {
    let conn = Connect::open(Some(uri)).map_err(|e| e.message().to_owned())?;
    if let Err(e) = conn.set_keep_alive(super::KEEPALIVE.0, super::KEEPALIVE.1) {
        tracing::warn!(vm, "no keepalive on the agent channel: {}", e.message());
    }
    let dom = conn
        .lookup_domain_by_name(vm)
        .map_err(|e| e.message().to_owned())?;
    if dom.uuid().map_err(|e| e.message().to_owned())? != uuid {
        return Err(format!("{vm} was made again meanwhile"));
    }
    let stream = Stream::new(&conn, 0).map_err(|e| e.message().to_owned())?;
    dom.open_channel(
        Some(fleet_agent_protocol::PORT_NAME),
        &stream,
        virt::sys::VIR_DOMAIN_CHANNEL_FORCE,
    )
    .map_err(|e| e.message().to_owned())?;
    bridge(conn, stream, vm).map_err(|e| format!("bridge: {e}"))
}

/// Bridges `stream` (on `conn`, which it closes when done) to a socket pair.
fn bridge(conn: Connect, stream: Stream, vm: &str) -> std::io::Result<UnixStream> {
    let (link_end, bridge_end) = UnixStream::pair()?;
    let to_link = bridge_end.try_clone()?;
    to_link.set_write_timeout(Some(STALL))?;
    let from_guest = stream.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("channel-in-{vm}"))
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            // 0: the guest's side closed; an error: aborted, or the connection broke.
            while let Ok(n @ 1..) = from_guest.recv(&mut buf) {
                if (&to_link).write_all(&buf[..n.unsigned_abs()]).is_err() {
                    break;
                }
            }
            let _ = to_link.shutdown(Shutdown::Both);
        });
    if let Err(e) = spawned {
        let _ = stream.abort();
        return Err(e);
    }
    let aborting = stream.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("channel-out-{vm}"))
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match (&bridge_end).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if send_all(&stream, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = bridge_end.shutdown(Shutdown::Both);
            // Ends the other thread's wait for the guest, then the connection.
            let _ = stream.abort();
            drop(conn);
        });
    if let Err(e) = spawned {
        let _ = aborting.abort();
        return Err(e);
    }
    Ok(link_end)
}

/// Sends all of `data`; a blocking stream sends something or fails.
pub(super) fn send_all(stream: &Stream, mut data: &[u8]) -> Result<(), String> {
    while !data.is_empty() {
        let sent = stream.send(data).map_err(|e| e.message().to_owned())?;
        match usize::try_from(sent) {
            Ok(n @ 1..) => data = &data[n.min(data.len())..],
            _ => return Err(format!("the stream took {sent} bytes")),
        }
    }
    Ok(())
}
