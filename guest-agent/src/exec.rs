//! Commands an operator runs in the guest (`fleet exec`, `fleet_agent_protocol::exec`):
//! each session is a process group of its own (a terminal session, a session of its own),
//! as root, with a clean environment, in a pseudo-terminal when the host asks for one.
//! Output goes to the host within its credit; what the host types is written by a thread
//! of the session's own, so a command that does not read its input never stalls the link.
//! Sessions belong to one opening of the link and end with it, or when the host greets
//! again (`Execs::end_all`).
//!
//! Ending a session kills every process of its group (or terminal session: a shell's jobs
//! are groups of their own), found in `/proc`, while the leader is a zombie not yet reaped
//! (`waitid` with `WNOWAIT`), so its id cannot have been reused by then.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The `PATH` a session starts with (see `base_env`: nothing of the agent's own
/// environment reaches a session).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The exec sessions of one opening of the link.
pub struct Execs {
    sink: Sink,
    sessions: Mutex<HashMap<u32, Arc<Session>>>,
}

struct Session {
    /// The output credit the host grants.
    credit: Arc<Credit>,
    /// What the host typed, to the session's writer thread (gone after `eof` or the end).
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Checks the host keeps to the input credit the guest grants.
    input_window: Arc<Mutex<RecvWindow>>,
    /// The terminal, for resizes (terminal sessions only).
    terminal: Option<Mutex<Box<dyn MasterPty + Send>>>,
    /// The command's process id: its group's id and, with a terminal, its session's.
    leader: i32,
}

impl Session {
    /// Kills what the session started and lets go of its input.
    fn kill(&self) {
        kill_members(self.leader, self.terminal.is_some());
        self.credit.close();
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// SIGKILL to every process in `leader`'s process group and, with `by_session`, its
/// session (a shell's jobs are groups of their own).
fn kill_members(leader: i32, by_session: bool) {
    if leader <= 0 {
        return;
    }
    let _ = killpg(Pid::from_raw(leader), Signal::SIGKILL);
    if !by_session {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's name (which may hold spaces and parentheses): state, ppid,
        // pgrp, session.
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|s| s.parse::<i32>().ok());
        if session == Some(leader) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Waits for `pid` to end without reaping it (its ids stay taken until it is reaped):
/// its exit code, or the signal that ended it.
fn wait_unreaped(pid: i32) -> (Option<i32>, Option<i32>) {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    loop {
        match waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Exited(_, code)) => return (Some(code), None),
            Ok(WaitStatus::Signaled(_, signal, _)) => return (None, Some(signal as i32)),
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return (None, None),
        }
    }
}

/// Which of a command's outputs a reader copies (a terminal's is all `Stdout`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A started command: its output readers, where its input goes, and how to reap it.
struct Started {
    outputs: Vec<(Stream, Box<dyn Read + Send>)>,
    input: Box<dyn Write + Send>,
    terminal: Option<Box<dyn MasterPty + Send>>,
    leader: i32,
    reap: Box<dyn FnOnce() + Send>,
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

    /// Every session ends (the link they belong to is gone, or the host greeted again: a
    /// host that reconnected holds none of them).
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
            input_window: Arc::default(),
            terminal: started.terminal.map(Mutex::new),
            leader: started.leader,
        });
        self.lock().insert(exec, session.clone());
        {
            // The writer holds the window, not the session: it ends when the session
            // lets go of its input (an end of input, a kill, the end of the session).
            let (sink, window) = (self.sink.clone(), session.input_window.clone());
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
                    let grant = window
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .consumed(bytes.len());
                    if let Some(bytes) = grant {
                        sink(GuestMessage::ExecCredit {
                            v: VERSION,
                            exec,
                            bytes,
                        });
                    }
                }
            });
        }
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let readers = started.outputs.len();
        // Readers waiting for the host's credit, not for the command: the drain's clock
        // does not run for them.
        let waiting = Arc::new(AtomicUsize::new(0));
        for (stream, reader) in started.outputs {
            let (execs, credit, done, waiting) = (
                self.clone(),
                session.credit.clone(),
                done_tx.clone(),
                waiting.clone(),
            );
            std::thread::spawn(move || {
                execs.send_output(exec, stream, reader, &credit, &waiting);
                let _ = done.send(());
            });
        }
        drop(done_tx);
        let (execs, leader, reap) = (self.clone(), started.leader, started.reap);
        std::thread::spawn(move || {
            let (code, signal) = wait_unreaped(leader);
            let tick = Duration::from_millis(50);
            let (mut drained, mut finished) = (Duration::ZERO, 0);
            while finished < readers && drained < DRAIN {
                match done_rx.recv_timeout(tick) {
                    Ok(()) => finished += 1,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if waiting.load(Ordering::Relaxed) == 0 {
                            drained += tick;
                        }
                    }
                }
            }
            // Whatever still holds the output open is ended with the session, while the
            // leader is unreaped (its ids cannot be reused yet); then it is reaped.
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
            reap();
            if ours {
                execs.exit(exec, code, signal, None);
            }
        });
    }

    /// Copies one output of a session to the host, within the credit it grants.
    fn send_output(
        &self,
        exec: u32,
        stream: Stream,
        mut reader: Box<dyn Read + Send>,
        credit: &Credit,
        waiting: &AtomicUsize,
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
                waiting.fetch_add(1, Ordering::Relaxed);
                let taken = credit.take(n - sent, Duration::from_secs(60));
                waiting.fetch_sub(1, Ordering::Relaxed);
                match taken {
                    Take::Bytes(k) => {
                        (self.sink)(GuestMessage::ExecOutput {
                            v: VERSION,
                            exec,
                            stderr: stream == Stream::Stderr,
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
    let leader = child.process_id().map_or(0, |p| p as i32);
    let (reader, writer) = match (pty.master.try_clone_reader(), pty.master.take_writer()) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            let _ = child.kill();
            return Err(format!("cannot attach to the terminal: {e}"));
        }
    };
    Ok(Started {
        outputs: vec![(Stream::Stdout, reader)],
        input: writer,
        terminal: Some(pty.master),
        leader,
        reap: Box::new(move || {
            let _ = child.wait();
        }),
    })
}

fn spawn_piped(argv: &[String]) -> Result<Started, String> {
    use std::os::unix::process::CommandExt;
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
    let leader = i32::try_from(child.id()).unwrap_or(0);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        return Err("cannot attach to the command's input and output".to_owned());
    };
    Ok(Started {
        outputs: vec![
            (Stream::Stdout, Box::new(stdout)),
            (Stream::Stderr, Box::new(stderr)),
        ],
        input: Box::new(stdin),
        terminal: None,
        leader,
        reap: Box::new(move || {
            let _ = child.wait();
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
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("30 100") {
            assert!(
                std::time::Instant::now() < deadline,
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

    /// A terminal session killed says so by its signal, and its shell's jobs (process
    /// groups of their own in its session) go with it.
    #[test]
    fn a_killed_terminal_session_ends_its_jobs_and_reports_the_signal() {
        let (execs, rx) = execs();
        let size = TermSize { rows: 24, cols: 80 };
        start(
            &execs,
            8,
            &["sh", "-c", "set -m; sleep 1003 & sleep 1004"],
            Some(size),
        );
        let running = |what: &str| {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).replace('\0', " ").trim() == what
                    })
                })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !running("sleep 1003") {
            assert!(std::time::Instant::now() < deadline, "the job started");
            std::thread::sleep(Duration::from_millis(50));
        }
        execs.handle(HostMessage::ExecKill {
            v: VERSION,
            exec: 8,
        });
        let (_, _, exit) = collect(&rx, 8);
        assert!(
            matches!(
                exit,
                GuestMessage::ExecExit {
                    signal: Some(9),
                    code: None,
                    ..
                }
            ),
            "{exit:?}"
        );
        assert!(
            !running("sleep 1003"),
            "the job in its own group was killed too"
        );
        assert!(!running("sleep 1004"));
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
