//! The operator's terminal, for the commands that connect it to a guest (`fleet exec
//! --tty`, `fleet console`): raw mode (restored however the command ends), its size and
//! its changes, and the byte that leaves. Not `terminal`, which makes guest text safe.

use anyhow::Context;
use fleet_agent_protocol::exec::TermSize;

/// The byte that leaves a guest's terminal from this side: Ctrl-] (as with `virsh console`).
pub const ESCAPE: u8 = 0x1d;

/// Whether standard input is a terminal.
pub fn is_terminal() -> bool {
    rustix::termios::isatty(std::io::stdin())
}

/// The operator's terminal in raw mode, restored when dropped, or by SIGTERM or SIGHUP
/// (which then end the process).
pub struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    pub fn enter() -> anyhow::Result<RawTerminal> {
        let stdin = std::io::stdin();
        let saved =
            rustix::termios::tcgetattr(&stdin).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        let restore = saved.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = rustix::termios::tcsetattr(
                    std::io::stdin(),
                    rustix::termios::OptionalActions::Now,
                    &restore,
                );
                std::process::exit(128 + signal);
            }
        });
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The terminal's size, if standard output or input is a terminal that has one.
pub fn size() -> Option<TermSize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(TermSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// Calls `changed` with the new size at every SIGWINCH, on a thread of its own, for the
/// life of the process.
pub fn on_resize(changed: impl Fn(TermSize) + Send + 'static) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if let Some(size) = size() {
                changed(size);
            }
        }
    });
    Ok(())
}

/// What was typed before the escape byte, and whether it came.
pub fn split_at_escape(typed: &[u8]) -> (&[u8], bool) {
    match typed.iter().position(|b| *b == ESCAPE) {
        Some(at) => (&typed[..at], true),
        None => (typed, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_comes_before_the_escape_goes_and_the_rest_is_dropped() {
        assert_eq!(split_at_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_at_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_escape(b"\x1d"), (&b""[..], true));
    }
}
