//! `fleet exec VM -- CMD…`: a command in a guest, over its agent link (so isolated and
//! brokered VMs, which have no network, are reachable too).
//!
//! The link belongs to `fleet serve` (QEMU accepts one client per port), so the command
//! goes through it: the client connects to the daemon's socket `<status>/exec/exec.sock`
//! (in a 0700 directory, and the daemon checks the peer is its own user or root: exec needs
//! the status directory owner's permissions), sends a `Request`, then speaks the link's own
//! exec messages (`fleet_agent_protocol::exec`): `HostMessage::ExecInput`, `ExecResize`,
//! `ExecCredit`, `ExecKill` up, `GuestMessage::ExecOutput`, `ExecCredit`, `ExecExit`
//! down, one JSON line each. The daemon names the session on the link, checks the guest
//! keeps to its credit (`link`), and records who ran what, never its output
//! (`exec.started`, `exec.ended` events).
//!
//! - `link`: a link thread's sessions, between the daemon's socket and the guest.
//! - `server`: the daemon's socket.
//! - `client`: the `fleet exec` command.

pub mod client;
pub mod link;
pub mod server;

use fleet_agent_protocol::exec::TermSize;
use serde::{Deserialize, Serialize};

/// The socket's name, in the status directory's `exec/` (see `server::socket_path`).
pub const SOCKET: &str = "exec.sock";

/// What a client asks for, its first line on the daemon's socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub vm: String,
    pub argv: Vec<String>,
    /// A terminal of this size (`--tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TermSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// The operator the client runs for, as it says (`SUDO_USER` or `USER`): recorded
    /// beside the socket peer's own user, which the daemon checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// A command line as an operator would type it, for events and messages.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_read_as_typed() {
        let argv: Vec<String> = ["sh", "-c", "echo hi; exit 3", "it's"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(shell_words(&argv), r#"sh -c 'echo hi; exit 3' 'it'\''s'"#);
    }
}
