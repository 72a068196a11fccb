//! `fleet console VM`: the VM's serial console, interactive, left with Ctrl-] (as with
//! `virsh console`); `--follow` tails the console's log read-only, its escape sequences
//! dropped. Only VMs fleet manages: the VM must have a status file and carry this fleet's
//! stamp (the driver checks before it opens anything).
//!
//! The console is the hypervisor's, not the agent link: it works with no agent, no
//! `fleet serve`, and on a guest that hangs before its agent starts.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::driver::Console;
use crate::reconcile::{self, Workspace};

/// How much of the log `--follow` shows before what comes next.
const TAIL_BYTES: u64 = 16 * 1024;
/// What one read of the log takes at most.
const READ_BYTES: usize = 1 << 20;

/// The interactive console; returns when the operator leaves it or it closes.
pub fn interactive(ws: &Workspace, vm: &str, force: bool) -> Result<()> {
    let driver = reconcile::driver_of_vm(ws, vm)?;
    let console: Arc<dyn Console> = Arc::from(driver.console(vm, force)?);
    let terminal = crate::tty::is_terminal();
    eprint!("Connected to the console of {vm}; leave with Ctrl-]\r\n");
    let raw = if terminal {
        Some(crate::tty::RawTerminal::enter()?)
    } else {
        None
    };
    if terminal {
        // The console's terminal follows the operator's (where it has a size at all).
        if let Some(size) = crate::tty::size() {
            let _ = console.resize(size.cols, size.rows);
        }
        let console = console.clone();
        crate::tty::on_resize(move |size| {
            let _ = console.resize(size.cols, size.rows);
        })?;
    }
    let closed = Arc::new(AtomicBool::new(false));
    {
        let (console, closed) = (console.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut out = std::io::stdout();
            while let Ok(n) = console.recv(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
            closed.store(true, Ordering::Relaxed);
        });
    }
    let why = type_into(console.as_ref(), &closed);
    drop(raw);
    eprint!("\r\n{why} the console of {vm}\r\n");
    Ok(())
}

/// Passes what the operator types to the console until the escape, the end of input, or
/// the console closing; says which.
fn type_into(console: &dyn Console, closed: &AtomicBool) -> &'static str {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut buf = vec![0u8; 4096];
    loop {
        if closed.load(Ordering::Relaxed) {
            return "lost";
        }
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return "left",
        }
        let n = match stdin.lock().read(&mut buf) {
            Ok(0) | Err(_) => return "left",
            Ok(n) => n,
        };
        let (typed, leave) = crate::tty::split_at_escape(&buf[..n]);
        if !typed.is_empty() && console.send(typed).is_err() {
            return "lost";
        }
        if leave {
            return "left";
        }
    }
}

/// Prints the end of the console's log, then what is written to it, each line without its
/// escape sequences, until interrupted. A log that shrinks was started again (a boot).
/// Where fleet can read no log (a remote libvirt host keeps it on the host), what the
/// console prints from now on (`follow_live`).
pub fn follow(ws: &Workspace, vm: &str) -> Result<()> {
    let driver = reconcile::driver_of_vm(ws, vm)?;
    let read = |from: u64| -> Result<Option<crate::driver::ConsoleLogChunk>> {
        driver
            .console_log(vm, from, READ_BYTES)
            .with_context(|| format!("cannot read {vm}'s console log"))
    };
    // Asked from past any end: only its length.
    let Some(end) = read(u64::MAX)? else {
        return follow_live(driver.as_ref(), vm);
    };
    let read = |from: u64| -> Result<crate::driver::ConsoleLogChunk> {
        read(from)?.with_context(|| format!("{vm}'s console log is gone"))
    };
    let mut offset = end.len.saturating_sub(TAIL_BYTES);
    let mut partial: Vec<u8> = Vec::new();
    let mut first = offset > 0;
    let mut out = std::io::stdout();
    loop {
        let mut chunk = read(offset)?;
        if chunk.len < offset {
            // Started again (a boot): from its beginning.
            offset = 0;
            partial.clear();
            chunk = read(0)?;
        }
        if !chunk.bytes.is_empty() {
            offset += chunk.bytes.len() as u64;
            partial.extend_from_slice(&chunk.bytes);
            // The first read starts mid-log: its first, partial line is dropped.
            if std::mem::take(&mut first) {
                let cut = partial
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                partial.drain(..cut);
            }
            print_lines(&mut partial, &mut out)?;
            if offset < chunk.len {
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `follow` where the log stays on the VM's host: the console itself, through the
/// provider's connection, read and never written, from now on (its history stays on the
/// host). It takes no console from an operator (libvirt refuses while one is connected, and
/// says so); an operator's `fleet console --force` takes it from this.
fn follow_live(driver: &dyn crate::driver::Driver, vm: &str) -> Result<()> {
    let console = driver.console(vm, false).with_context(|| {
        format!("{vm}'s console log stays on its host, and its console could not be followed")
    })?;
    eprintln!(
        "{vm}'s console log stays on its host: following what its console prints from now on"
    );
    let mut out = std::io::stdout();
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = console
            .recv(&mut buf)
            .with_context(|| format!("following {vm}'s console"))?;
        if n == 0 {
            if !partial.is_empty() {
                let text = crate::terminal::strip_codes(&String::from_utf8_lossy(&partial));
                writeln!(out, "{text}")?;
            }
            eprintln!("{vm}'s console closed (the VM stopped, or an operator took it)");
            return Ok(());
        }
        partial.extend_from_slice(&buf[..n]);
        print_lines(&mut partial, &mut out)?;
        // A line is never held without end: a guest that prints no newline is shown too.
        if partial.len() > READ_LINE_MAX {
            let text = crate::terminal::strip_codes(&String::from_utf8_lossy(&partial));
            out.write_all(text.as_bytes())?;
            out.flush()?;
            partial.clear();
        }
    }
}

/// Prints the whole lines at the start of `partial` without their escape sequences,
/// leaving the unfinished last one.
fn print_lines(partial: &mut Vec<u8>, out: &mut impl Write) -> std::io::Result<()> {
    while let Some(end) = partial.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = partial.drain(..=end).collect();
        let text = crate::terminal::strip_codes(&String::from_utf8_lossy(&line));
        out.write_all(text.as_bytes())?;
    }
    out.flush()
}

/// The longest line `follow_live` holds back waiting for its end.
const READ_LINE_MAX: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_are_printed_without_escape_sequences_and_the_rest_waits() {
        let mut partial = b"\x1b[1mone\x1b[0m\ntwo\nthr".to_vec();
        let mut out = Vec::new();
        print_lines(&mut partial, &mut out).expect("print");
        assert_eq!(String::from_utf8_lossy(&out), "one\ntwo\n");
        assert_eq!(partial, b"thr");
    }
}
