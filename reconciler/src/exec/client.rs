//! `fleet exec`: connects to the daemon's exec socket, passes standard input up (within
//! the guest's credit) and the guest's output down, and exits as the command did (its
//! code, 128 + the signal that killed it, or 255 when it could not run, as ssh does).
//! With `--tty` the operator's terminal is raw for the session (and restored on SIGTERM
//! or SIGHUP too), its size follows SIGWINCH, and Ctrl-] ends the session from this side
//! (as it leaves `fleet console`), whatever the guest does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use fleet_agent_protocol::exec::TermSize;
use fleet_agent_protocol::stream::{CHUNK_BYTES, Credit, Take};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use super::Request;
use crate::status::StatusDir;

/// What exits the client when the command could not run (as ssh does).
const COULD_NOT_RUN: u8 = 255;

type Writer = Arc<Mutex<UnixStream>>;

fn send(writer: &Writer, message: &HostMessage) -> std::io::Result<()> {
    writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .write_all(message.to_line().as_bytes())
}

/// Runs `argv` in `vm` through the daemon serving `status`; the exit code to leave with.
pub fn run(status: &StatusDir, vm: &str, argv: Vec<String>, tty: bool) -> anyhow::Result<u8> {
    crate::reconcile::managed_vm(status, vm)?;
    if tty && !crate::tty::is_terminal() {
        bail!("--tty needs a terminal on standard input; leave it out to pipe input");
    }
    let path = super::server::socket_path(status.root());
    let conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach fleet serve at {}: exec goes through the agent links it holds, so it must be running for this status directory (systemctl start fleet)",
            path.display()
        )
    })?;
    let request = Request {
        vm: vm.to_owned(),
        argv,
        tty: if tty {
            Some(crate::tty::size().unwrap_or(TermSize { rows: 24, cols: 80 }))
        } else {
            None
        },
        term: tty.then(|| std::env::var("TERM").ok()).flatten(),
        operator: std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .ok(),
    };
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    {
        let mut line = serde_json::to_string(&request)?;
        line.push('\n');
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(line.as_bytes())?;
    }
    let raw = if tty {
        Some(crate::tty::RawTerminal::enter()?)
    } else {
        None
    };
    let credit = Arc::new(Credit::default());
    {
        let (writer, credit) = (writer.clone(), credit.clone());
        std::thread::spawn(move || pass_input(&writer, &credit, tty));
    }
    if tty {
        let writer = writer.clone();
        crate::tty::on_resize(move |size| {
            let resize = HostMessage::ExecResize {
                v: VERSION,
                exec: 0,
                size,
            };
            let _ = send(&writer, &resize);
        })?;
    }
    let ended = pass_output(conn, &writer, &credit);
    credit.close();
    // The terminal first: what is said after it reads as plain lines.
    drop(raw);
    let (code, said) = ended?;
    if let Some(said) = said {
        eprintln!("fleet exec: {said}");
    }
    Ok(code)
}

/// Standard input to the session, within the guest's credit; its end closes the
/// command's input (a terminal's end of file is a byte the guest's terminal reads).
fn pass_input(writer: &Writer, credit: &Credit, tty: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let read = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Ctrl-] on a terminal: what came before it goes, then the session ends.
        let (typed, escaped) = match tty {
            true => crate::tty::split_at_escape(&buf[..read]),
            false => (&buf[..read], false),
        };
        let n = typed.len();
        let mut sent = 0;
        while sent < n {
            match credit.take(n - sent, Duration::from_secs(3600)) {
                Take::Bytes(k) => {
                    let message = HostMessage::ExecInput {
                        v: VERSION,
                        exec: 0,
                        data: base64::engine::general_purpose::STANDARD
                            .encode(&buf[sent..sent + k]),
                        eof: false,
                    };
                    if send(writer, &message).is_err() {
                        return;
                    }
                    sent += k;
                }
                Take::Stalled => {}
                Take::Closed => return,
            }
        }
        if escaped {
            let _ = send(
                writer,
                &HostMessage::ExecKill {
                    v: VERSION,
                    exec: 0,
                },
            );
            return;
        }
    }
    if !tty {
        let _ = send(
            writer,
            &HostMessage::ExecInput {
                v: VERSION,
                exec: 0,
                data: String::new(),
                eof: true,
            },
        );
    }
}

/// The guest's output to ours, each chunk reported back once written (the guest's credit);
/// returns the exit code and what to tell the operator (once the terminal is restored).
fn pass_output(
    conn: UnixStream,
    writer: &Writer,
    credit: &Credit,
) -> anyhow::Result<(u8, Option<String>)> {
    let mut lines = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            let why = "the session ended without an exit status (did fleet serve stop?)";
            return Ok((COULD_NOT_RUN, Some(why.to_owned())));
        }
        let message = GuestMessage::from_line(&line).map_err(anyhow::Error::msg)?;
        match message {
            GuestMessage::ExecOutput { stderr, data, .. } => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .context("output that is not base64")?;
                let written = if stderr {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&bytes).and_then(|()| err.flush())
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes).and_then(|()| out.flush())
                };
                // Output nobody reads any more (a closed pipe) ends the session.
                if written.is_err() {
                    return Ok((COULD_NOT_RUN, None));
                }
                let _ = send(
                    writer,
                    &HostMessage::ExecCredit {
                        v: VERSION,
                        exec: 0,
                        bytes: bytes.len() as u64,
                    },
                );
            }
            GuestMessage::ExecCredit { bytes, .. } => {
                let _ = credit.grant(bytes);
            }
            GuestMessage::ExecExit {
                code,
                signal,
                error,
                ..
            } => {
                return Ok(match (code, signal, error) {
                    // The guest's words, or the daemon's about it: one plain line.
                    (_, _, Some(e)) => (COULD_NOT_RUN, Some(crate::terminal::one_line(&e, 300))),
                    (_, Some(s), _) => (128u8.saturating_add(u8::try_from(s).unwrap_or(127)), None),
                    (Some(c), _, _) => (u8::try_from(c & 0xff).unwrap_or(COULD_NOT_RUN), None),
                    _ => (COULD_NOT_RUN, None),
                });
            }
            _ => {}
        }
    }
}
