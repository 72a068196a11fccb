//! Commands an operator runs in the guest (`fleet exec`, `fleet_agent_protocol::exec`):
//! each session is a process group of its own, as root, with a clean environment, in a
//! pseudo-terminal when the host asks for one. Output goes to the host within its credit;
//! what the host types is written by a thread of the session's own, so a command that
//! does not read its input never stalls the link. Sessions belong to one opening of the
//! link and end with it (`Execs::end_all`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_agent_protocol::exec::{MAX_ARGV_BYTES, MAX_SESSIONS, TermSize, term_name};
use fleet_agent_protocol::stream::{CHUNK_BYTES, Credit, RecvWindow, Take};
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use portable_pty::{CommandBuilder, MasterPty, PtySize, native_pty_system};

use crate::task::{Sink, base64_encode};

/// How long output still read after the command exited is waited for (a background
/// process may hold the output open for ever).
const DRAIN: Duration = Duration::from_secs(1);

/// The environment a session starts with: nothing of the agent's own.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The exec sessions of one opening of the link.
pub struct Execs {
    sink: Sink,
    sessions: Mutex<HashMap<u32, Arc<Session>>>,
}

struct Session {
    /// The output credit the host grants.
    credit: Arc<Credit>,
    /// What the host typed, to the session's writer thread (gone after `eof`).
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Checks the host keeps to the input credit the guest grants.
    input_window: Mutex<RecvWindow>,
    /// The terminal, for resizes (terminal sessions only).
    terminal: Option<Mutex<Box<dyn MasterPty + Send>>>,
    /// The session's process group.
    group: i32,
}

impl Session {
    fn kill(&self) {
        if self.group > 0 {
            let _ = killpg(Pid::from_raw(self.group), Signal::SIGKILL);
        }
        self.credit.close();
    }
}

/// A started command: its output readers, how to wait for it, where its input goes.
struct Started {
    outputs: Vec<(bool, Box<dyn Read + Send>)>,
    input: Box<dyn Write + Send>,
    terminal: Option<Box<dyn MasterPty + Send>>,
    group: i32,
    wait: Box<dyn FnOnce() -> (Option<i32>, Option<i32>) + Send>,
}

impl Execs {
    pub fn new(sink: Sink) -> Arc<Execs> {
        Arc::new(Execs {
            sink,
            sessions: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session(&self, exec: u32) -> Option<Arc<Session>> {
        self.lock().get(&exec).cloned()
    }

    fn exit(&self, exec: u32, code: Option<i32>, signal: Option<i32>, error: Option<String>) {
        (self.sink)(GuestMessage::ExecExit {
            v: VERSION,
            exec,
            code,
            signal,
            error,
        });
    }

    /// Serves one of the host's exec messages.
    pub fn handle(self: &Arc<Self>, message: HostMessage) {
        match message {
            HostMessage::Exec {
                exec,
                argv,
                tty,
                term,
                ..
            } => self.start(exec, &argv, tty, term.as_deref()),
            HostMessage::ExecInput {
                exec, data, eof, ..
            } => {
                let Some(session) = self.session(exec) else {
                    return;
                };
                use base64::Engine;
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
                    return self.refuse(exec, &session, "input that is not base64");
                };
                let within = session
                    .input_window
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .received(bytes.len());
                if let Err(e) = within {
                    return self.refuse(exec, &session, &format!("input past its credit: {e}"));
                }
                let mut input = session.input.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = input.as_ref()
                    && !bytes.is_empty()
                {
                    let _ = tx.send(bytes);
                }
                if eof {
                    *input = None;
                }
            }
            HostMessage::ExecResize { exec, size, .. } => {
                if let Some(session) = self.session(exec)
                    && let Some(terminal) = &session.terminal
                {
                    let terminal = terminal.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = terminal.resize(pty_size(size));
                }
            }
            HostMessage::ExecCredit { exec, bytes, .. } => {
                if let Some(session) = self.session(exec)
                    && let Err(e) = session.credit.grant(bytes)
                {
                    self.refuse(exec, &session, &format!("output credit: {e}"));
                }
            }
            HostMessage::ExecKill { exec, .. } => {
                if let Some(session) = self.session(exec) {
                    session.kill();
                }
            }
            _ => {}
        }
    }

    /// The host broke the session's protocol: it ends.
    fn refuse(&self, exec: u32, session: &Session, why: &str) {
        eprintln!("fleet-agent: exec {exec}: the host sent {why}; ending the session");
        session.kill();
    }

    /// Every session ends (the link they belong to is gone).
    pub fn end_all(&self) {
        let sessions: Vec<Arc<Session>> = self.lock().drain().map(|(_, s)| s).collect();
        for session in sessions {
            session.kill();
        }
    }

    fn start(
        self: &Arc<Self>,
        exec: u32,
        argv: &[String],
        tty: Option<TermSize>,
        term: Option<&str>,
    ) {
        let refusal = {
            let sessions = self.lock();
            if sessions.contains_key(&exec) {
                Some(format!("session {exec} is already open"))
            } else if sessions.len() >= MAX_SESSIONS {
                Some(format!(
                    "{MAX_SESSIONS} sessions are open on this VM already; end one first"
                ))
            } else if argv.is_empty() {
                Some("no command".to_owned())
            } else if argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
                Some(format!("a command line longer than {MAX_ARGV_BYTES} bytes"))
            } else {
                None
            }
        };
        if let Some(error) = refusal {
            return self.exit(exec, None, None, Some(error));
        }
        let started = match tty {
            Some(size) => spawn_in_terminal(argv, size, term_name(term)),
            None => spawn_piped(argv),
        };
        let started = match started {
            Ok(s) => s,
            Err(e) => return self.exit(exec, None, None, Some(e)),
        };
        let (input_tx, input_rx) = mpsc::channel::<Vec<u8>>();
        let session = Arc::new(Session {
            credit: Arc::new(Credit::default()),
            input: Mutex::new(Some(input_tx)),
            input_window: Mutex::default(),
            terminal: started.terminal.map(Mutex::new),
            group: started.group,
        });
        self.lock().insert(exec, session.clone());
        {
            let (execs, session) = (self.clone(), session.clone());
            let mut input = started.input;
            std::thread::spawn(move || {
                for bytes in input_rx {
                    if input
                        .write_all(&bytes)
                        .and_then(|()| input.flush())
                        .is_err()
                    {
                        break;
                    }
                    let grant = session
                        .input_window
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .consumed(bytes.len());
                    if let Some(bytes) = grant {
                        (execs.sink)(GuestMessage::ExecCredit {
                            v: VERSION,
                            exec,
                            bytes,
                        });
                    }
                }
                // A terminal's writer stays open until the session ends (dropping it
                // types an end of file); a pipe closes here.
            });
        }
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let readers = started.outputs.len();
        for (stderr, reader) in started.outputs {
            let (execs, credit, done) = (self.clone(), session.credit.clone(), done_tx.clone());
            std::thread::spawn(move || {
                execs.send_output(exec, stderr, reader, &credit);
                let _ = done.send(());
            });
        }
        drop(done_tx);
        let (execs, wait) = (self.clone(), started.wait);
        std::thread::spawn(move || {
            let (code, signal) = wait();
            let deadline = Instant::now() + DRAIN;
            for _ in 0..readers {
                let left = deadline.saturating_duration_since(Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            // Whatever still holds the output open is ended with the session.
            let ours = {
                let mut sessions = execs.lock();
                let ours = sessions
                    .get(&exec)
                    .is_some_and(|s| Arc::ptr_eq(s, &session));
                if ours {
                    sessions.remove(&exec);
                }
                ours
            };
            session.kill();
            if ours {
                execs.exit(exec, code, signal, None);
            }
        });
    }

    /// Copies one output of a session to the host, within the credit it grants.
    fn send_output(
        &self,
        exec: u32,
        stderr: bool,
        mut reader: Box<dyn Read + Send>,
        credit: &Credit,
    ) {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            // EIO once the last process holding a terminal is gone: the end of the output.
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut sent = 0;
            while sent < n {
                match credit.take(n - sent, Duration::from_secs(60)) {
                    Take::Bytes(k) => {
                        (self.sink)(GuestMessage::ExecOutput {
                            v: VERSION,
                            exec,
                            stderr,
                            data: base64_encode(&buf[sent..sent + k]),
                        });
                        sent += k;
                    }
                    // The operator's terminal is slow or paused: the command waits.
                    Take::Stalled => {}
                    Take::Closed => return,
                }
            }
        }
    }
}

fn pty_size(size: TermSize) -> PtySize {
    PtySize {
        rows: size.rows.max(1),
        cols: size.cols.max(1),
        pixel_width: 0,
        pixel_height: 0,
    }
}

/// The directory a session starts in.
fn home() -> &'static str {
    if std::path::Path::new("/root").is_dir() {
        "/root"
    } else {
        "/"
    }
}

fn base_env() -> [(&'static str, &'static str); 5] {
    [
        ("PATH", PATH),
        ("HOME", home()),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("LANG", "C.UTF-8"),
    ]
}

fn spawn_in_terminal(argv: &[String], size: TermSize, term: &str) -> Result<Started, String> {
    let pty = native_pty_system()
        .openpty(pty_size(size))
        .map_err(|e| format!("cannot open a terminal: {e}"))?;
    let mut command = CommandBuilder::new(&argv[0]);
    command.args(&argv[1..]);
    command.env_clear();
    for (k, v) in base_env() {
        command.env(k, v);
    }
    command.env("TERM", term);
    command.cwd(home());
    let mut child = pty
        .slave
        .spawn_command(command)
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    // The terminal's other end belongs to the command now.
    drop(pty.slave);
    // The command leads its own session: its process id is its group's.
    let group = child.process_id().map_or(0, |p| p as i32);
    let (reader, writer) = match (pty.master.try_clone_reader(), pty.master.take_writer()) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            let _ = child.kill();
            return Err(format!("cannot attach to the terminal: {e}"));
        }
    };
    Ok(Started {
        outputs: vec![(false, reader)],
        input: writer,
        terminal: Some(pty.master),
        group,
        wait: Box::new(move || match child.wait() {
            Ok(status) => (
                Some(i32::try_from(status.exit_code()).unwrap_or(i32::MAX)),
                None,
            ),
            Err(_) => (None, None),
        }),
    })
}

fn spawn_piped(argv: &[String]) -> Result<Started, String> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, Stdio};
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(base_env())
        .current_dir(home())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    let group = i32::try_from(child.id()).unwrap_or(0);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        return Err("cannot attach to the command's input and output".to_owned());
    };
    Ok(Started {
        outputs: vec![(false, Box::new(stdout)), (true, Box::new(stderr))],
        input: Box::new(stdin),
        terminal: None,
        group,
        wait: Box::new(move || match child.wait() {
            Ok(status) => (status.code(), status.signal()),
            Err(_) => (None, None),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execs() -> (Arc<Execs>, mpsc::Receiver<GuestMessage>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: Sink = Arc::new(move |m| {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(m);
        });
        (Execs::new(sink), rx)
    }

    fn start(execs: &Arc<Execs>, exec: u32, argv: &[&str], tty: Option<TermSize>) {
        execs.handle(HostMessage::Exec {
            v: VERSION,
            exec,
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            tty,
            term: None,
        });
    }

    fn input(execs: &Arc<Execs>, exec: u32, data: &[u8], eof: bool) {
        execs.handle(HostMessage::ExecInput {
            v: VERSION,
            exec,
            data: base64_encode(data),
            eof,
        });
    }

    /// Output by stream, and the exit, for session `exec`.
    fn collect(rx: &mpsc::Receiver<GuestMessage>, exec: u32) -> (String, String, GuestMessage) {
        use base64::Engine;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let message = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the session ends");
            match message {
                GuestMessage::ExecOutput {
                    exec: e,
                    stderr,
                    data,
                    ..
                } if e == exec => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64");
                    if stderr { &mut err } else { &mut out }.extend(bytes);
                }
                GuestMessage::ExecExit { exec: e, .. } if e == exec => {
                    return (
                        String::from_utf8_lossy(&out).into_owned(),
                        String::from_utf8_lossy(&err).into_owned(),
                        message,
                    );
                }
                _ => {}
            }
        }
    }

    #[test]
    fn output_streams_and_the_exit_code_come_back() {
        let (execs, rx) = execs();
        start(
            &execs,
            1,
            &["sh", "-c", "echo hi; echo oops >&2; exit 3"],
            None,
        );
        let (out, err, exit) = collect(&rx, 1);
        assert_eq!((out.as_str(), err.as_str()), ("hi\n", "oops\n"));
        assert!(
            matches!(
                exit,
                GuestMessage::ExecExit {
                    code: Some(3),
                    signal: None,
                    error: None,
                    ..
                }
            ),
            "{exit:?}"
        );
    }

    #[test]
    fn input_reaches_the_command_and_its_end_closes_it() {
        let (execs, rx) = execs();
        start(&execs, 2, &["sh", "-c", "cat; echo done"], None);
        input(&execs, 2, b"typed\n", false);
        input(&execs, 2, b"", true);
        let (out, _, exit) = collect(&rx, 2);
        assert_eq!(out, "typed\ndone\n");
        assert!(matches!(exit, GuestMessage::ExecExit { code: Some(0), .. }));
    }

    #[test]
    fn a_terminal_session_has_the_size_asked_and_follows_a_resize() {
        let (execs, rx) = execs();
        let size = TermSize {
            rows: 30,
            cols: 100,
        };
        start(
            &execs,
            3,
            &["sh", "-c", "stty size; read x; stty size"],
            Some(size),
        );
        // The first size is printed before the resize is sent.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("30 100") {
            assert!(
                Instant::now() < deadline,
                "{}",
                String::from_utf8_lossy(&seen)
            );
            if let Ok(GuestMessage::ExecOutput { data, .. }) =
                rx.recv_timeout(Duration::from_secs(1))
            {
                use base64::Engine;
                seen.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64"),
                );
            }
        }
        execs.handle(HostMessage::ExecResize {
            v: VERSION,
            exec: 3,
            size: TermSize { rows: 12, cols: 40 },
        });
        input(&execs, 3, b"\r", false);
        let (out, _, exit) = collect(&rx, 3);
        assert!(out.contains("12 40"), "{out:?}");
        assert!(matches!(exit, GuestMessage::ExecExit { code: Some(0), .. }));
    }

    #[test]
    fn a_kill_ends_the_whole_group_and_the_session_says_how() {
        let (execs, rx) = execs();
        start(&execs, 4, &["sh", "-c", "sleep 1000 & sleep 1000"], None);
        std::thread::sleep(Duration::from_millis(200));
        execs.handle(HostMessage::ExecKill {
            v: VERSION,
            exec: 4,
        });
        let (_, _, exit) = collect(&rx, 4);
        assert!(
            matches!(
                exit,
                GuestMessage::ExecExit {
                    signal: Some(9),
                    ..
                }
            ),
            "{exit:?}"
        );
    }

    #[test]
    fn refusals_come_back_as_an_exit_with_the_reason() {
        let (execs, rx) = execs();
        start(&execs, 5, &[], None);
        let (_, _, exit) = collect(&rx, 5);
        assert!(
            matches!(&exit, GuestMessage::ExecExit { error: Some(e), .. } if e.contains("no command")),
            "{exit:?}"
        );
        start(&execs, 6, &["/nonexistent/program"], None);
        let (_, _, exit) = collect(&rx, 6);
        assert!(
            matches!(&exit, GuestMessage::ExecExit { error: Some(e), .. } if e.contains("cannot start")),
            "{exit:?}"
        );
        for exec in 10..10 + MAX_SESSIONS as u32 {
            start(&execs, exec, &["sleep", "1000"], None);
        }
        start(&execs, 99, &["true"], None);
        let (_, _, exit) = collect(&rx, 99);
        assert!(
            matches!(&exit, GuestMessage::ExecExit { error: Some(e), .. } if e.contains("sessions are open")),
            "{exit:?}"
        );
        execs.end_all();
    }

    /// Output stops at the credit the host granted and goes on when it grants more.
    #[test]
    fn output_waits_for_the_hosts_credit() {
        use fleet_agent_protocol::stream::WINDOW_BYTES;
        let (execs, rx) = execs();
        let total = 3 * WINDOW_BYTES;
        start(
            &execs,
            7,
            &["sh", "-c", &format!("head -c {total} /dev/zero")],
            None,
        );
        let mut received = 0u64;
        let count = |m: GuestMessage| match m {
            GuestMessage::ExecOutput { data, .. } => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64")
                    .len() as u64
            }
            _ => 0,
        };
        while let Ok(m) = rx.recv_timeout(Duration::from_millis(500)) {
            received += count(m);
        }
        assert_eq!(received, WINDOW_BYTES, "one window, then it waits");
        while received < total {
            execs.handle(HostMessage::ExecCredit {
                v: VERSION,
                exec: 7,
                bytes: WINDOW_BYTES,
            });
            let before = received;
            while let Ok(m) = rx.recv_timeout(Duration::from_millis(500)) {
                if matches!(m, GuestMessage::ExecExit { .. }) {
                    break;
                }
                received += count(m);
            }
            assert!(received > before, "a grant lets more through");
        }
        assert_eq!(received, total);
    }
}
