//! The agent link over the libvirt connection: the guest's virtio-serial channel opened
//! with `virDomainOpenChannel`, so the link needs nothing but the connection fleet already
//! has to the VM's host (a `qemu+ssh://` host as much as the local one), and bridged to one
//! end of a socket pair, so the link reads and waits on a socket as it always has.
//!
//! Two threads per open channel: one carries the guest's bytes to the socket, the other the
//! link's bytes to the guest. Either side ending ends both: a guest side that closes (the
//! VM stopped, the connection broke) shuts the socket, so the link reads its end; a link
//! that is dropped closes its end, and the stream is aborted. A stream left waiting in
//! libvirt after all is ended by the next open of the same channel, which takes it over
//! (`VIR_DOMAIN_CHANNEL_FORCE`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use virt::stream::Stream;

/// How much one read carries: libvirt's stream packets hold 256 KiB at most.
const CHUNK: usize = 64 * 1024;

/// Bridges `stream`, open on VM `vm`'s agent channel, to a socket; returns the link's end.
pub fn bridge(stream: Stream, vm: &str) -> std::io::Result<UnixStream> {
    let (link_end, bridge_end) = UnixStream::pair()?;
    let to_link = bridge_end.try_clone()?;
    let from_guest = stream.clone();
    std::thread::Builder::new()
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
        })?;
    std::thread::Builder::new()
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
            // Ends the other thread's wait for the guest.
            let _ = stream.abort();
        })?;
    Ok(link_end)
}

fn send_all(stream: &Stream, mut data: &[u8]) -> Result<(), virt::error::Error> {
    while !data.is_empty() {
        let sent = stream.send(data)?;
        data = &data[usize::try_from(sent).unwrap_or(0).min(data.len())..];
        if sent <= 0 {
            // A blocking stream sends something or fails; never spin.
            break;
        }
    }
    Ok(())
}
