//! The agent link relayed through a hypervisor's guest agent (Proxmox: qemu-guest-agent's
//! `exec`), for VMs that have no virtio-serial port of fleet's own.
//!
//! The link is still one byte stream each way carrying the newline-delimited messages of
//! this crate; the relay only moves it in *exchanges*. Each exchange runs
//! `fleet-agent exchange` in the guest with a request on its stdin and reads the reply from
//! its stdout. `fleet-agent relay`, the long-running agent, answers it through
//! [`RELAY_SOCKET`].
//!
//! An exchange can fail anywhere (the API call, the guest agent, the guest), so both streams
//! are numbered by byte offset, as TCP numbers them:
//! - the request carries host bytes starting at `offset`, and acknowledges (`acked`) the guest
//!   bytes the host has;
//! - the reply says how many host bytes the guest has in all (`received`) and carries the
//!   guest bytes that start at `offset` and are not acknowledged yet.
//!
//! A repeated or lost exchange therefore neither duplicates nor drops a byte.
//!
//! A host link is a *session*, named by the host. A new session starts both streams at 0. It
//! is the same as reopening the virtio-serial port: the host greets, and the agent answers
//! and sends its outboxes again.
//!
//! The request names the guest boot it expects (`bootId`, learned from the first reply). A
//! guest with another boot id takes nothing from it and answers with an error. So nothing
//! meant for one VM reaches another that was given its VMID, and nothing meant for one boot
//! reaches the next.
//!
//! On the wire, each request and each reply is one line of JSON (the header), then one line
//! of base64 (the bytes, possibly none). Both are plain ASCII, as the API's `input-data` and
//! `out-data` strings need.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Where `fleet-agent relay` listens in the guest (root only).
pub const RELAY_SOCKET: &str = "/run/fleet-agent/relay.sock";

/// Host bytes one request carries at most. Proxmox takes up to 65,536 characters of
/// `input-data`: this much, base64-encoded, plus the header fits.
pub const MAX_REQUEST_BYTES: usize = 45 * 1024;

/// Guest bytes one reply carries at most.
pub const MAX_REPLY_BYTES: usize = 256 * 1024;

/// The longest a request or reply may be on the wire (base64 of the bytes, and the header).
pub const MAX_WIRE_BYTES: usize = MAX_REPLY_BYTES / 3 * 4 + 8 * 1024;

/// How long the guest holds a request open, at most, waiting for bytes to answer with.
pub const MAX_WAIT_MS: u64 = 2_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    /// Names the host's link; a new one restarts both streams.
    pub session: String,
    /// The guest boot these bytes are for; `None` only on the first exchange of a session,
    /// which carries no bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Position in the host stream of the first byte carried.
    pub offset: u64,
    /// Guest bytes the host has received, in all.
    pub acked: u64,
    /// How long the guest may wait for bytes to send when it has none.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reply {
    pub v: u32,
    pub session: String,
    pub boot_id: String,
    /// Host bytes the guest has received, in all.
    pub received: u64,
    /// Position in the guest stream of the first byte carried.
    pub offset: u64,
    /// Why the request was refused (nothing of it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The wire form: the header line, then the bytes in base64 on one line.
pub fn encode<H: Serialize>(header: &H, bytes: &[u8]) -> String {
    let mut out = serde_json::to_string(header).unwrap_or_default();
    out.push('\n');
    out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
    out.push('\n');
    out
}

/// Reads the wire form back.
pub fn decode<H: for<'de> Deserialize<'de>>(wire: &str) -> Result<(H, Vec<u8>), String> {
    if wire.len() > MAX_WIRE_BYTES {
        return Err(format!(
            "a relay message of {} bytes (at most {MAX_WIRE_BYTES})",
            wire.len()
        ));
    }
    let (head, body) = wire
        .split_once('\n')
        .ok_or_else(|| "a relay message without its header line".to_owned())?;
    let header = serde_json::from_str(head).map_err(|e| format!("a relay header: {e}"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body.trim_end())
        .map_err(|e| format!("relay bytes: {e}"))?;
    Ok((header, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_junk() {
        let request = Request {
            v: crate::VERSION,
            session: "s1".into(),
            boot_id: Some("b".into()),
            offset: 7,
            acked: 9,
            wait_ms: 50,
        };
        let bytes = b"{\"type\":\"hello\"}\n{\"type\":".to_vec();
        let wire = encode(&request, &bytes);
        assert!(wire.is_ascii());
        assert_eq!(decode::<Request>(&wire), Ok((request, bytes)));
        assert!(decode::<Request>("no header").is_err());
        assert!(decode::<Request>("{\"v\":1}\n").is_err());
        assert!(decode::<Reply>(&"x".repeat(MAX_WIRE_BYTES + 1)).is_err());
    }

    #[test]
    fn a_full_request_fits_proxmox_input_data() {
        let request = Request {
            v: crate::VERSION,
            session: "0123456789abcdef0123456789abcdef".into(),
            boot_id: Some("01234567-89ab-cdef-0123-456789abcdef".into()),
            offset: u64::MAX,
            acked: u64::MAX,
            wait_ms: MAX_WAIT_MS,
        };
        let wire = encode(&request, &[0xff; MAX_REQUEST_BYTES]);
        assert!(wire.len() <= 65_536, "{} characters", wire.len());
    }
}
