//! Running tasks: each in its own pseudo-terminal and session (so it sees a terminal, as
//! coding agents expect, and its whole process tree is one group), output streamed as chunks
//! numbered from 1, input typed into the terminal, and timeout or cancel ending the whole
//! group.
//!
//! Every output chunk and the exit get the task's next sequence number and stay in its
//! outbox until the host acknowledges them; after the host greets again (a reconnect), the
//! outboxes are sent again, so nothing is lost and the host drops repeats by `seq`. A task
//! whose outbox holds more than 8 MiB waits (its terminal fills, so it blocks on output)
//! until the host catches up.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_agent_protocol::{ExitReason, GuestMessage, VERSION};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use portable_pty::{CommandBuilder, PtySize, native_pty_system};

/// Where a task's messages go (the agent link).
pub type Sink = Arc<dyn Fn(GuestMessage) + Send + Sync>;

/// What the host asked to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub task: String,
    pub argv: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
}

/// Unacknowledged output above this makes the task wait.
const OUTBOX_CAP_BYTES: usize = 8 * 1024 * 1024;

struct Handle {
    writer: Box<dyn Write + Send>,
    cancelled: Arc<AtomicBool>,
}

/// A task, running or finished, whose messages are not all acknowledged yet.
struct TaskState {
    /// `None` once the task has ended.
    handle: Option<Handle>,
    next_seq: u64,
    outbox: VecDeque<(u64, GuestMessage)>,
    outbox_bytes: usize,
}

/// The tasks the host has not finished with, by name.
#[derive(Default)]
pub struct Tasks {
    tasks: Mutex<HashMap<String, TaskState>>,
    /// The current link; replaced when the port is opened again.
    sink: Mutex<Option<Sink>>,
}

impl Tasks {
    /// Sends through `sink` from now on.
    pub fn set_sink(&self, sink: Sink) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Starts a task. A task of the same name the host has not finished with is left alone
    /// (the host asked twice).
    pub fn start(self: &Arc<Self>, spec: RunSpec) {
        if self.lock().contains_key(&spec.task) {
            return;
        }
        self.lock().insert(
            spec.task.clone(),
            TaskState {
                handle: None,
                next_seq: 1,
                outbox: VecDeque::new(),
                outbox_bytes: 0,
            },
        );
        let failed = |why: String| {
            let task = spec.task.clone();
            self.emit(&task, |seq| GuestMessage::Output {
                v: VERSION,
                task: task.clone(),
                seq,
                data: format!("fleet-agent: {why}\r\n"),
            });
            self.emit(&task, |seq| GuestMessage::Exit {
                v: VERSION,
                task: task.clone(),
                seq,
                code: None,
                reason: ExitReason::FailedToStart,
            });
            self.finished(&task);
        };
        let Some((program, args)) = spec.argv.split_first() else {
            return failed("empty command".into());
        };
        let pty = match native_pty_system().openpty(PtySize {
            rows: 40,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        }) {
            Ok(pty) => pty,
            Err(e) => return failed(format!("cannot open a terminal: {e}")),
        };
        let mut command = CommandBuilder::new(program);
        command.args(args);
        for (k, v) in &spec.env {
            command.env(k, v);
        }
        if let Some(cwd) = &spec.cwd {
            command.cwd(cwd);
        }
        let mut child = match pty.slave.spawn_command(command) {
            Ok(child) => child,
            Err(e) => return failed(format!("cannot start {program}: {e}")),
        };
        // The terminal's other end belongs to the child now.
        drop(pty.slave);
        let (reader, writer) = match (pty.master.try_clone_reader(), pty.master.take_writer()) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                let _ = child.kill();
                return failed("cannot attach to the terminal".into());
            }
        };
        // The child leads its own session: its process id is its group's id.
        let group = child.process_id().map_or(0, |p| p as i32);
        let cancelled = Arc::new(AtomicBool::new(false));
        if let Some(state) = self.lock().get_mut(&spec.task) {
            state.handle = Some(Handle {
                writer,
                cancelled: cancelled.clone(),
            });
        }

        let output = {
            let (tasks, task) = (self.clone(), spec.task.clone());
            std::thread::spawn(move || stream_output(reader, &task, &tasks))
        };
        let tasks = self.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut reason = ExitReason::Completed;
            let code = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break i32::try_from(status.exit_code()).ok(),
                    Ok(None) => {}
                    Err(_) => break None,
                }
                if cancelled.load(Ordering::Relaxed) && reason == ExitReason::Completed {
                    reason = ExitReason::Cancelled;
                    kill_group(group);
                } else if spec.timeout.is_some_and(|t| started.elapsed() >= t)
                    && reason == ExitReason::Completed
                {
                    reason = ExitReason::TimedOut;
                    kill_group(group);
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if reason != ExitReason::Completed {
                // Whatever the killed leader left behind goes too.
                kill_group(group);
            }
            // Keep the master open until everything the task wrote has been read.
            let _ = output.join();
            drop(pty.master);
            let code = if reason == ExitReason::Completed {
                code
            } else {
                None
            };
            let task = spec.task.clone();
            tasks.emit(&task, |seq| GuestMessage::Exit {
                v: VERSION,
                task: task.clone(),
                seq,
                code,
                reason,
            });
            tasks.finished(&task);
        });
    }

    /// Gives `task`'s next message its sequence number, keeps it until acknowledged, and
    /// sends it on the current link (best effort: a resend follows the next greeting).
    fn emit(&self, task: &str, make: impl FnOnce(u64) -> GuestMessage) {
        let message = {
            let mut all = self.lock();
            let Some(state) = all.get_mut(task) else {
                return;
            };
            let seq = state.next_seq;
            state.next_seq += 1;
            let message = make(seq);
            state.outbox_bytes += message_bytes(&message);
            state.outbox.push_back((seq, message.clone()));
            message
        };
        self.send(&message);
    }

    fn send(&self, message: &GuestMessage) {
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(sink) = sink {
            sink(message.clone());
        }
    }

    /// The task has ended: it is forgotten once its last message is acknowledged.
    fn finished(&self, task: &str) {
        let mut all = self.lock();
        if let Some(state) = all.get_mut(task) {
            state.handle = None;
            if state.outbox.is_empty() {
                all.remove(task);
            }
        }
    }

    /// The host has `task`'s messages up to `seq`.
    pub fn ack(&self, task: &str, seq: u64) {
        let mut all = self.lock();
        let Some(state) = all.get_mut(task) else {
            return;
        };
        while state.outbox.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, m)) = state.outbox.pop_front() {
                state.outbox_bytes -= message_bytes(&m);
            }
        }
        if state.handle.is_none() && state.outbox.is_empty() {
            all.remove(task);
        }
    }

    /// Sends every unacknowledged message again, in order (after the host greets).
    pub fn resend(&self) {
        let pending: Vec<GuestMessage> = {
            let all = self.lock();
            let mut names: Vec<&String> = all.keys().collect();
            names.sort();
            names
                .iter()
                .flat_map(|n| all[*n].outbox.iter().map(|(_, m)| m.clone()))
                .collect()
        };
        for message in &pending {
            self.send(message);
        }
    }

    /// Unacknowledged output of `task`, in bytes.
    fn backlog(&self, task: &str) -> usize {
        self.lock().get(task).map_or(0, |s| s.outbox_bytes)
    }

    /// Types `data` into the task's terminal. False when no such task runs.
    pub fn input(&self, task: &str, data: &str) -> bool {
        match self.lock().get_mut(task).and_then(|s| s.handle.as_mut()) {
            Some(handle) => handle
                .writer
                .write_all(data.as_bytes())
                .and_then(|()| handle.writer.flush())
                .is_ok(),
            None => false,
        }
    }

    /// Ends the task's whole process group. False when no such task runs.
    pub fn cancel(&self, task: &str) -> bool {
        match self.lock().get(task).and_then(|s| s.handle.as_ref()) {
            Some(handle) => {
                handle.cancelled.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskState>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn message_bytes(message: &GuestMessage) -> usize {
    match message {
        GuestMessage::Output { data, .. } => data.len(),
        _ => 64,
    }
}

fn kill_group(group: i32) {
    if group > 0 {
        let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
}

/// Sends the terminal's output as numbered chunks of whole UTF-8 characters (a character
/// split across two reads waits for its rest).
fn stream_output(mut reader: Box<dyn Read + Send>, task: &str, tasks: &Tasks) {
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    let chunk = |data: String| {
        tasks.emit(task, |seq| GuestMessage::Output {
            v: VERSION,
            task: task.to_owned(),
            seq,
            data,
        })
    };
    loop {
        // Back-pressure: the task waits while the host is far behind.
        while tasks.backlog(task) > OUTBOX_CAP_BYTES {
            std::thread::sleep(Duration::from_millis(50));
        }
        // EIO once the last process holding the terminal is gone: the end of the output.
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        if valid == 0 {
            continue;
        }
        chunk(String::from_utf8_lossy(&pending[..valid]).into_owned());
        pending.drain(..valid);
    }
    if !pending.is_empty() {
        chunk(String::from_utf8_lossy(&pending).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn channel_sink() -> (Sink, mpsc::Receiver<GuestMessage>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: Sink = Arc::new(move |m| {
            let _ = tx.lock().expect("lock").send(m);
        });
        (sink, rx)
    }

    fn spec(argv: &[&str], timeout: Option<Duration>) -> RunSpec {
        RunSpec {
            task: "t".into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: [("GREETING".to_owned(), "hi".to_owned())].into(),
            cwd: None,
            timeout,
        }
    }

    fn run(argv: &[&str], timeout: Option<Duration>) -> (Arc<Tasks>, mpsc::Receiver<GuestMessage>) {
        let (sink, rx) = channel_sink();
        let tasks = Arc::new(Tasks::default());
        tasks.set_sink(sink);
        tasks.start(spec(argv, timeout));
        (tasks, rx)
    }

    /// Everything until the exit: (output, exit code, reason, sequence numbers).
    fn collect(rx: &mpsc::Receiver<GuestMessage>) -> (String, Option<i32>, ExitReason, Vec<u64>) {
        let (mut out, mut seqs) = (String::new(), Vec::new());
        loop {
            match rx.recv_timeout(Duration::from_secs(20)).expect("a message") {
                GuestMessage::Output { seq, data, .. } => {
                    seqs.push(seq);
                    out.push_str(&data);
                }
                GuestMessage::Exit { code, reason, .. } => return (out, code, reason, seqs),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn output_and_exit_code_in_a_terminal() {
        let (_tasks, rx) = run(
            &["sh", "-c", "echo $GREETING; [ -t 1 ] && echo tty; exit 3"],
            None,
        );
        let (out, code, reason, seqs) = collect(&rx);
        assert!(out.contains("hi\r\n"), "{out:?}");
        assert!(out.contains("tty"), "runs in a terminal: {out:?}");
        assert_eq!((code, reason), (Some(3), ExitReason::Completed));
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn input_reaches_the_terminal() {
        let (tasks, rx) = run(&["sh", "-c", "read x; echo got:$x"], None);
        std::thread::sleep(Duration::from_millis(300));
        assert!(tasks.input("t", "abc\n"));
        let (out, code, ..) = collect(&rx);
        assert!(out.contains("got:abc"), "{out:?}");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let pid_file = std::env::temp_dir().join(format!("fleet-agent-bg-{}", std::process::id()));
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pid_file.display());
        let started = Instant::now();
        let (_tasks, rx) = run(&["sh", "-c", &script], Some(Duration::from_millis(500)));
        let (_, code, reason, _) = collect(&rx);
        assert_eq!((code, reason), (None, ExitReason::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(10));
        let background = std::fs::read_to_string(&pid_file)
            .expect("the background pid")
            .trim()
            .to_owned();
        std::fs::remove_file(&pid_file).expect("cleanup");
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{background}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "the background child survived: {stat}"
        );
    }

    #[test]
    fn cancel_ends_the_task() {
        let (tasks, rx) = run(&["sleep", "30"], None);
        std::thread::sleep(Duration::from_millis(200));
        assert!(tasks.cancel("t"));
        let (_, code, reason, _) = collect(&rx);
        assert_eq!((code, reason), (None, ExitReason::Cancelled));
        assert!(!tasks.cancel("t"), "a finished task is gone");
    }

    #[test]
    fn output_from_while_the_link_was_down_is_resent_until_acknowledged() {
        let tasks = Arc::new(Tasks::default());
        // The link is down: everything sent is lost.
        tasks.set_sink(Arc::new(|_| {}));
        tasks.start(spec(&["sh", "-c", "echo one; echo two"], None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tasks.lock().get("t").is_none_or(|s| s.handle.is_some()) {
            assert!(Instant::now() < deadline, "the task did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The host reconnects and greets: it gets everything, in order.
        let (sink, rx) = channel_sink();
        tasks.set_sink(sink);
        tasks.resend();
        let (out, code, reason, seqs) = collect(&rx);
        assert!(out.contains("one") && out.contains("two"), "{out:?}");
        assert_eq!((code, reason), (Some(0), ExitReason::Completed));
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        // Acknowledged up to the exit: nothing is sent again, and the task is forgotten.
        tasks.ack("t", seqs.len() as u64 + 1);
        tasks.resend();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(tasks.lock().is_empty());
    }

    #[test]
    fn a_partial_ack_keeps_the_rest() {
        let (tasks, rx) = run(&["sh", "-c", "echo one; sleep 0.2; echo two"], None);
        let (_, _, _, seqs) = collect(&rx);
        assert!(seqs.len() >= 2, "{seqs:?}");
        tasks.ack("t", 1);
        tasks.resend();
        let mut again = Vec::new();
        while let Ok(m) = rx.recv_timeout(Duration::from_millis(300)) {
            again.push(match m {
                GuestMessage::Output { seq, .. } | GuestMessage::Exit { seq, .. } => seq,
                other => panic!("unexpected {other:?}"),
            });
        }
        assert_eq!(
            again,
            (2..=seqs.len() as u64 + 1).collect::<Vec<_>>(),
            "everything after seq 1, exit included"
        );
    }

    #[test]
    fn a_missing_program_fails_to_start() {
        let (_tasks, rx) = run(&["/nonexistent/program"], None);
        let (out, code, reason, _) = collect(&rx);
        assert_eq!((code, reason), (None, ExitReason::FailedToStart), "{out}");
    }
}
