//! Commands an operator runs in a guest (`fleet exec`): the host opens a session
//! (`HostMessage::Exec`), types into it (`ExecInput`), resizes its terminal (`ExecResize`),
//! and ends it (`ExecKill`); the guest sends its output (`GuestMessage::ExecOutput`) and,
//! last, how it ended (`ExecExit`).
//!
//! Both directions keep to the credit of `stream`: the guest sends at most a window of
//! output before the host grants more (`HostMessage::ExecCredit`, once the operator's
//! terminal took it), and the host types at most a window before the guest grants more
//! (`GuestMessage::ExecCredit`, once the command read it). Sessions do not survive a
//! reconnect of the link: the guest ends them when the link goes.

use serde::{Deserialize, Serialize};

/// The most sessions one link holds open at once; more are refused.
pub const MAX_SESSIONS: usize = 8;

/// The longest command line (its arguments together, in bytes) a session may start.
pub const MAX_ARGV_BYTES: usize = 64 * 1024;

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// A value of `TERM` the guest accepts (the host passes the operator's): a short name of
/// letters, digits and `-`, `.`, `+`, `_`; anything else is `xterm-256color`.
pub fn term_name(requested: Option<&str>) -> &str {
    match requested {
        Some(t)
            if !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.+_".contains(&b)) =>
        {
            t
        }
        _ => "xterm-256color",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_terminal_names_pass() {
        assert_eq!(term_name(Some("screen-256color")), "screen-256color");
        assert_eq!(term_name(Some("xterm\u{1b}]0;x")), "xterm-256color");
        assert_eq!(term_name(Some("")), "xterm-256color");
        assert_eq!(term_name(None), "xterm-256color");
    }
}
