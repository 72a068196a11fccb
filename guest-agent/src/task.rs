//! Running tasks: each in its own pseudo-terminal and session (so it sees a terminal, as
//! coding agents expect, and its whole process tree is one group), output streamed as chunks
//! numbered from 1, input typed into the terminal, and timeout or cancel ending the whole
//! group.
//!
//! Not here yet: keeping unacknowledged output to resend after the link comes back.

use std::collections::HashMap;
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

struct Handle {
    writer: Box<dyn Write + Send>,
    cancelled: Arc<AtomicBool>,
}

/// The tasks running now, by name.
#[derive(Default)]
pub struct Tasks {
    running: Mutex<HashMap<String, Handle>>,
}

impl Tasks {
    /// Starts a task; its output and exit go to `sink`. A task of the same name that still
    /// runs is left alone (the host asked twice).
    pub fn start(self: &Arc<Self>, spec: RunSpec, sink: Sink) {
        if self.lock().contains_key(&spec.task) {
            return;
        }
        let failed = |why: String| {
            sink(GuestMessage::Output {
                v: VERSION,
                task: spec.task.clone(),
                seq: 1,
                data: format!("fleet-agent: {why}\r\n"),
            });
            sink(GuestMessage::Exit {
                v: VERSION,
                task: spec.task.clone(),
                code: None,
                reason: ExitReason::FailedToStart,
            });
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
        self.lock().insert(
            spec.task.clone(),
            Handle {
                writer,
                cancelled: cancelled.clone(),
            },
        );

        let output = {
            let (sink, task) = (sink.clone(), spec.task.clone());
            std::thread::spawn(move || stream_output(reader, &task, &sink))
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
            drop(tasks.lock().remove(&spec.task));
            let _ = output.join();
            drop(pty.master);
            let code = if reason == ExitReason::Completed {
                code
            } else {
                None
            };
            sink(GuestMessage::Exit {
                v: VERSION,
                task: spec.task.clone(),
                code,
                reason,
            });
        });
    }

    /// Types `data` into the task's terminal. False when no such task runs.
    pub fn input(&self, task: &str, data: &str) -> bool {
        match self.lock().get_mut(task) {
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
        match self.lock().get(task) {
            Some(handle) => {
                handle.cancelled.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kill_group(group: i32) {
    if group > 0 {
        let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
}

/// Sends the terminal's output as numbered chunks of whole UTF-8 characters (a character
/// split across two reads waits for its rest).
fn stream_output(mut reader: Box<dyn Read + Send>, task: &str, sink: &Sink) {
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    let mut seq = 0;
    loop {
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
        let data = String::from_utf8_lossy(&pending[..valid]).into_owned();
        pending.drain(..valid);
        seq += 1;
        sink(GuestMessage::Output {
            v: VERSION,
            task: task.to_owned(),
            seq,
            data,
        });
    }
    if !pending.is_empty() {
        seq += 1;
        sink(GuestMessage::Output {
            v: VERSION,
            task: task.to_owned(),
            seq,
            data: String::from_utf8_lossy(&pending).into_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn run(argv: &[&str], timeout: Option<Duration>) -> (Arc<Tasks>, mpsc::Receiver<GuestMessage>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: Sink = Arc::new(move |m| {
            let _ = tx.lock().expect("lock").send(m);
        });
        let tasks = Arc::new(Tasks::default());
        tasks.start(
            RunSpec {
                task: "t".into(),
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                env: [("GREETING".to_owned(), "hi".to_owned())].into(),
                cwd: None,
                timeout,
            },
            sink,
        );
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
    fn a_missing_program_fails_to_start() {
        let (_tasks, rx) = run(&["/nonexistent/program"], None);
        let (out, code, reason, _) = collect(&rx);
        assert_eq!((code, reason), (None, ExitReason::FailedToStart), "{out}");
    }
}
