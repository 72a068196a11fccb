//! Running tasks: each in its own pseudo-terminal and session (so it sees a terminal, as
//! coding agents expect, and its whole process tree is one group), output streamed as chunks
//! numbered from 1, input typed into the terminal, and timeout or cancel ending the whole
//! group.
//!
//! Every output chunk and the exit go through the task's `Outbox` (sequence numbers, kept
//! until acknowledged, sent again after a reconnect); a task whose outbox is full waits
//! (its terminal fills, so it blocks on output) until the host catches up.
//!
//! While a task runs, its output also feeds a screen model (`prompt::Detector`); when the
//! terminal has been quiet for `QUIET` and its last lines read as a question, a `Prompt`
//! goes out (once per quiet spell). Answers carry the prompt's id and are typed at most
//! once. When the process ends, files matching its artifact globs are sent before the exit.
//!
//! Each task started leaves a marker in the state directory (`/run/fleet-agent`, a tmpfs:
//! it lasts as long as the boot). A task the host asks for again after this agent
//! restarted is not run a second time: it is reported `Lost`.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_agent_protocol::{ExitReason, GuestMessage, VERSION};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use portable_pty::{CommandBuilder, PtySize, native_pty_system};

use crate::outbox::Outbox;
use crate::prompt::{self, Detector};

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
    pub artifacts: Vec<String>,
    pub prompt_patterns: Vec<String>,
    /// Why the task cannot start (a secret it needs is missing); it then exits at once.
    pub start_error: Option<String>,
    /// The secret files (relative to the store) this run may read.
    pub secret_files: Vec<String>,
    /// Whether (and how) the run's changes to its checkout go back as a bundle.
    pub results: Option<fleet_agent_protocol::RunResults>,
}

/// Output must pause this long before the screen is scored for a prompt.
const QUIET: Duration = Duration::from_millis(400);
/// Artifacts are sent in parts of this many bytes (before base64).
const ARTIFACT_PART_BYTES: usize = 192 * 1024;
/// At most this much of a task's artifacts is sent; the rest is reported, not sent.
const ARTIFACT_CAP_BYTES: u64 = 64 * 1024 * 1024;

struct Handle {
    writer: Box<dyn Write + Send>,
    cancelled: Arc<AtomicBool>,
    /// The task's screen: an answer typed ends its prompt (the same question asked again
    /// is a new prompt).
    screen: Arc<Mutex<Screen>>,
}

/// A task, running or finished, whose messages are not all acknowledged yet.
struct TaskState {
    /// `None` once the task has ended.
    handle: Option<Handle>,
    outbox: Outbox,
    /// Prompts whose answer has been typed.
    answered: HashSet<String>,
    /// The user an isolated run runs as, while it runs.
    uid: Option<u32>,
}

impl TaskState {
    fn new() -> TaskState {
        TaskState {
            handle: None,
            outbox: Outbox::default(),
            answered: HashSet::new(),
            uid: None,
        }
    }
}

/// How tasks are isolated from each other: the agent's own executable (which `launch`es
/// each run as its own user) and the secret store runs get their files from.
#[derive(Clone, Debug)]
pub struct Isolation {
    pub agent: PathBuf,
    pub store: PathBuf,
}

/// The task's screen and whether it changed since it was last scored.
struct Screen {
    detector: Detector,
    last_output: Instant,
    unscored: bool,
    /// The question of the last prompt sent, while the screen still shows it.
    asked: Option<String>,
    /// The `seq` of the first `Prompt` that asked it: an answer to that one or a later
    /// one is to this question; an answer to an earlier one is not.
    asked_since: u64,
}

/// The tasks the host has not finished with, by name.
#[derive(Default)]
pub struct Tasks {
    tasks: Mutex<HashMap<String, TaskState>>,
    /// The current link; replaced when the port is opened again.
    sink: Mutex<Option<Sink>>,
    /// Where markers of started tasks are kept (none in unit tests).
    state_dir: Option<PathBuf>,
    /// Set when the agent runs as root: each run as its own user (see `isolate`).
    isolation: Option<Isolation>,
}

impl Tasks {
    pub fn with_state_dir(dir: PathBuf) -> Tasks {
        Tasks {
            state_dir: Some(dir),
            ..Tasks::default()
        }
    }

    /// Runs each task as a user of its own, seeing only its secret files.
    pub fn isolated(self, isolation: Isolation) -> Tasks {
        Tasks {
            isolation: Some(isolation),
            ..self
        }
    }

    /// Records that `task` started in this boot; false when it already had.
    fn first_start(&self, task: &str) -> bool {
        let Some(dir) = &self.state_dir else {
            return true;
        };
        let marker = dir.join("started").join(task);
        if marker.exists() {
            return false;
        }
        let _ = std::fs::create_dir_all(dir.join("started"));
        let _ = std::fs::write(&marker, b"");
        true
    }

    /// The task whose run runs as `uid` now (runs are isolated by user).
    pub fn task_of_uid(&self, uid: u32) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, state)| state.uid == Some(uid))
            .map(|(name, _)| name.clone())
    }

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
        self.lock().insert(spec.task.clone(), TaskState::new());
        let ended = |why: String, reason: ExitReason| {
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
                reason,
            });
            self.finished(&task);
        };
        let failed = |why: String| ended(why, ExitReason::FailedToStart);
        if !valid_task_name(&spec.task) {
            return failed(format!("{:?} is not a valid task name", spec.task));
        }
        if let Some(why) = &spec.start_error {
            return failed(why.clone());
        }
        if !self.first_start(&spec.task) {
            return ended(
                "this task started before the agent restarted; its end is unknown".into(),
                ExitReason::Lost,
            );
        }
        let detector = match Detector::new(&spec.prompt_patterns) {
            Ok(d) => d,
            Err(e) => return failed(e),
        };
        let Some((program, args)) = spec.argv.split_first() else {
            return failed("empty command".into());
        };
        if let Some(cwd) = &spec.cwd
            && let Err(e) = std::fs::create_dir_all(cwd)
        {
            return failed(format!("cannot make the directory {cwd}: {e}"));
        }
        let pty = match native_pty_system().openpty(PtySize {
            rows: prompt::ROWS,
            cols: prompt::COLS,
            pixel_width: 0,
            pixel_height: 0,
        }) {
            Ok(pty) => pty,
            Err(e) => return failed(format!("cannot open a terminal: {e}")),
        };
        let isolated = match &self.isolation {
            None => None,
            Some(iso) => {
                let mut taken: Vec<u32> = self.lock().values().filter_map(|s| s.uid).collect();
                taken.extend(crate::isolate::busy_uids());
                let uid = crate::isolate::pick_uid(&spec.task, &taken);
                match crate::isolate::Run::prepare(
                    &spec.task,
                    uid,
                    &iso.store,
                    &spec.secret_files,
                    spec.cwd.as_deref().map(Path::new),
                ) {
                    Ok(run) => Some((iso.agent.clone(), run)),
                    Err(e) => return failed(format!("cannot give the run a user of its own: {e}")),
                }
            }
        };
        let argv: Vec<String> = match &isolated {
            Some((agent, run)) => run.wrap(agent, &spec.argv),
            None => std::iter::once(program.clone())
                .chain(args.iter().cloned())
                .collect(),
        };
        let mut command = CommandBuilder::new(&argv[0]);
        command.args(&argv[1..]);
        for (k, v) in &spec.env {
            command.env(k, v);
        }
        if let Some((_, run)) = &isolated {
            command.env("HOME", &run.home);
            if let Some(state) = self.lock().get_mut(&spec.task) {
                state.uid = Some(run.uid);
            }
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
        let screen = Arc::new(Mutex::new(Screen {
            detector,
            last_output: Instant::now(),
            unscored: false,
            asked: None,
            asked_since: 0,
        }));
        if let Some(state) = self.lock().get_mut(&spec.task) {
            state.handle = Some(Handle {
                writer,
                cancelled: cancelled.clone(),
                screen: screen.clone(),
            });
        }

        let output = {
            let (tasks, task, screen) = (self.clone(), spec.task.clone(), screen.clone());
            std::thread::spawn(move || stream_output(reader, &task, &tasks, &screen))
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
                tasks.score_screen(&spec.task, &screen);
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
            if let (Some(dir), Some(results)) = (&spec.cwd, &spec.results) {
                tasks.send_results(&task, Path::new(dir), results);
            }
            if let Some(dir) = &spec.cwd {
                tasks.send_artifacts(&task, Path::new(dir), &spec.artifacts);
            }
            // What the run wrote is on disk before the host hears it ended: a workspace
            // keeps it whatever happens to the VM next (a replace, a hard stop).
            nix::unistd::sync();
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

    /// Sends a prompt when the screen has been quiet long enough and reads as a question.
    fn score_screen(&self, task: &str, screen: &Mutex<Screen>) {
        let found = {
            let mut screen = screen.lock().unwrap_or_else(|p| p.into_inner());
            if !screen.unscored || screen.last_output.elapsed() < QUIET {
                return;
            }
            screen.unscored = false;
            screen.detector.detect()
        };
        if let Some(found) = found {
            let before = screen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .asked
                .clone();
            let same = before.as_ref() == Some(&found.text);
            match before {
                // Still the menu the host has (an interface redrew it): nothing new. A
                // plain question is sent again: the same text may be asked anew, and the
                // host ignores it while the first is pending.
                Some(_) if same && !found.options.is_empty() => return,
                Some(_) if same => {}
                // Another question took its place (an agent's dialog over its input box):
                // the host withdraws the first before it hears the second.
                // (Unless the output loop withdrew it first.)
                Some(old) => self.emit_if(
                    task,
                    || screen.lock().unwrap_or_else(|p| p.into_inner()).asked == Some(old),
                    |seq| GuestMessage::PromptGone {
                        v: VERSION,
                        task: task.to_owned(),
                        seq,
                    },
                ),
                None => {}
            }
            // What is asked changes with the message's number, under the lock an answer
            // takes (the tasks', then the screen's), so no answer sees one without the other.
            self.emit(task, |seq| {
                let mut screen = screen.lock().unwrap_or_else(|p| p.into_inner());
                screen.asked = Some(found.text.clone());
                if !same {
                    screen.asked_since = seq;
                }
                GuestMessage::Prompt {
                    v: VERSION,
                    task: task.to_owned(),
                    seq,
                    text: found.text,
                    screen: found.screen,
                    options: found.options,
                }
            });
        }
    }

    /// Commits what the run left in its checkout and sends the commits after the base as
    /// the artifact `RESULTS_ARTIFACT`; what went wrong is a line of the task's output.
    fn send_results(&self, task: &str, dir: &Path, results: &fleet_agent_protocol::RunResults) {
        let uid = self.lock().get(task).and_then(|s| s.uid);
        // What the run left running goes first: nothing of it may change the checkout
        // while it is committed, or outlive the run inside git's hooks.
        if let (Some(uid), Some(iso)) = (uid, &self.isolation) {
            crate::isolate::reap(&iso.agent, uid);
        }
        match crate::results::bundle(dir, results, uid) {
            Ok(Some(bytes)) => self.send_parts(
                task,
                fleet_agent_protocol::RESULTS_ARTIFACT,
                &mut bytes.as_slice(),
            ),
            Ok(None) => self.note(task, "the run changed nothing in its checkout"),
            Err(e) => self.note(task, &format!("cannot send the run's results: {e}")),
        }
    }

    /// Sends the files under `dir` that match `globs`, in parts, up to `ARTIFACT_CAP_BYTES`.
    fn send_artifacts(&self, task: &str, dir: &Path, globs: &[String]) {
        let mut budget = ARTIFACT_CAP_BYTES;
        for (relative, path) in artifact_files(dir, globs) {
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            if size > budget {
                self.note(task, &format!("artifact {relative} ({size} bytes) is over the {ARTIFACT_CAP_BYTES}-byte limit; not sent"));
                continue;
            }
            budget -= size;
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    self.note(task, &format!("cannot read artifact {relative}: {e}"));
                    continue;
                }
            };
            self.send_parts(task, &relative, &mut file);
        }
    }

    /// Sends what `reader` holds as the artifact `relative`, in parts, each when the task's
    /// outbox has room.
    fn send_parts(&self, task: &str, relative: &str, reader: &mut impl Read) {
        let mut offset = 0u64;
        let mut part = vec![0u8; ARTIFACT_PART_BYTES];
        loop {
            while self.must_wait(task) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let n = match read_full(reader, &mut part) {
                Ok(n) => n,
                Err(e) => {
                    self.note(task, &format!("cannot read artifact {relative}: {e}"));
                    break;
                }
            };
            let last = n < part.len();
            self.emit(task, |seq| GuestMessage::Artifact {
                v: VERSION,
                task: task.to_owned(),
                seq,
                path: relative.to_owned(),
                offset,
                data: base64_encode(&part[..n]),
                last,
            });
            offset += n as u64;
            if last {
                break;
            }
        }
    }

    /// A line of the agent's own in the task's output.
    fn note(&self, task: &str, text: &str) {
        self.emit(task, |seq| GuestMessage::Output {
            v: VERSION,
            task: task.to_owned(),
            seq,
            data: format!("fleet-agent: {text}\r\n"),
        });
    }

    /// Gives `task`'s next message its sequence number, keeps it until acknowledged, and
    /// sends it on the current link (best effort: a resend follows the next greeting).
    fn emit(&self, task: &str, make: impl FnOnce(u64) -> GuestMessage) {
        self.emit_if(task, || true, make);
    }

    /// Emits the message only if `still` holds, decided under the lock that numbers
    /// messages (the one an answer takes first), so nothing comes between.
    fn emit_if(
        &self,
        task: &str,
        still: impl FnOnce() -> bool,
        make: impl FnOnce(u64) -> GuestMessage,
    ) {
        let message = {
            let mut all = self.lock();
            let Some(state) = all.get_mut(task) else {
                return;
            };
            if !still() {
                return;
            }
            state.outbox.push(make)
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
        let uid = {
            let mut all = self.lock();
            let Some(state) = all.get_mut(task) else {
                return;
            };
            state.handle = None;
            let uid = state.uid.take();
            if state.outbox.is_empty() {
                all.remove(task);
            }
            uid
        };
        // What the run left running goes with it, and so does its copy of its secrets.
        if let Some(uid) = uid {
            if let Some(iso) = &self.isolation {
                crate::isolate::reap(&iso.agent, uid);
            }
            crate::isolate::Run::cleanup(task);
        }
    }

    /// The host has `task`'s messages up to `seq`.
    pub fn ack(&self, task: &str, seq: u64) {
        let mut all = self.lock();
        let Some(state) = all.get_mut(task) else {
            return;
        };
        state.outbox.ack(seq);
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
                .flat_map(|n| all[*n].outbox.pending().cloned())
                .collect()
        };
        for message in &pending {
            self.send(message);
        }
    }

    /// Whether `task` must wait for the host to acknowledge what it sent.
    fn must_wait(&self, task: &str) -> bool {
        self.lock().get(task).is_some_and(|s| s.outbox.is_full())
    }

    /// Types `data` into the task's terminal; the answer to `prompt` only the first time,
    /// and only while the question of the guest's `Prompt` number `prompt_seq` is still
    /// the one asked. False when no such task runs, the prompt was answered already, or
    /// its question has left the screen or been replaced.
    pub fn input(
        &self,
        task: &str,
        data: &str,
        prompt: Option<&str>,
        prompt_seq: Option<u64>,
    ) -> bool {
        let mut all = self.lock();
        let Some(state) = all.get_mut(task) else {
            return false;
        };
        let Some(handle) = state.handle.as_mut() else {
            return false;
        };
        if let Some(seq) = prompt_seq {
            let screen = handle.screen.lock().unwrap_or_else(|p| p.into_inner());
            if screen.asked.is_none() || seq < screen.asked_since {
                return false;
            }
        }
        if let Some(id) = prompt
            && !state.answered.insert(id.to_owned())
        {
            return false;
        }
        let typed = handle
            .writer
            .write_all(data.as_bytes())
            .and_then(|()| handle.writer.flush())
            .is_ok();
        if typed && prompt.is_some() {
            handle
                .screen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .asked = None;
        }
        typed
    }

    /// Ends the task's whole process group. A task this agent does not know ends at once:
    /// `Cancelled` if it never started in this boot (so a later `RunTask` for it is not
    /// run), `Lost` if it started before the agent restarted; either way the host hears
    /// an exit. False when nothing was running.
    pub fn cancel(&self, task: &str) -> bool {
        let known = self.lock().get(task).map(|s| s.handle.is_some());
        match known {
            Some(true) => {
                if let Some(handle) = self.lock().get(task).and_then(|s| s.handle.as_ref()) {
                    handle.cancelled.store(true, Ordering::Relaxed);
                }
                true
            }
            // Ended, its exit not yet acknowledged: the host will get it.
            Some(false) => false,
            None => {
                if !valid_task_name(task) {
                    return false;
                }
                let reason = if self.first_start(task) {
                    ExitReason::Cancelled
                } else {
                    ExitReason::Lost
                };
                self.lock().insert(task.to_owned(), TaskState::new());
                self.emit(task, |seq| GuestMessage::Exit {
                    v: VERSION,
                    task: task.to_owned(),
                    seq,
                    code: None,
                    reason,
                });
                self.finished(task);
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskState>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kill_group(group: i32) {
    if group > 0 {
        let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
}

/// Task names become file names in the guest.
fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Regular files under `dir` matching any of `globs` (relative to `dir`), each once, as
/// (path relative to `dir`, full path). Nothing outside `dir` is matched.
fn artifact_files(dir: &Path, globs: &[String]) -> Vec<(String, PathBuf)> {
    let mut found = std::collections::BTreeMap::new();
    for pattern in globs {
        if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
            continue;
        }
        let full = format!(
            "{}/{pattern}",
            glob::Pattern::escape(&dir.to_string_lossy())
        );
        let Ok(paths) = glob::glob(&full) else {
            continue;
        };
        for path in paths.flatten() {
            let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
            if let (true, Ok(relative)) = (is_file, path.strip_prefix(dir)) {
                found.insert(relative.to_string_lossy().into_owned(), path.clone());
            }
        }
    }
    found.into_iter().collect()
}

fn read_full(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Sends the terminal's output as numbered chunks of whole UTF-8 characters (a character
/// split across two reads waits for its rest), and feeds the screen model.
fn stream_output(
    mut reader: Box<dyn Read + Send>,
    task: &str,
    tasks: &Tasks,
    screen: &Mutex<Screen>,
) {
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
        while tasks.must_wait(task) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // EIO once the last process holding the terminal is gone: the end of the output.
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let gone = {
            let mut screen = screen.lock().unwrap_or_else(|p| p.into_inner());
            screen.detector.feed(&buf[..n]);
            screen.last_output = Instant::now();
            screen.unscored = true;
            screen.asked.clone().filter(|q| !screen.detector.shows(q))
        };
        pending.extend_from_slice(&buf[..n]);
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        if valid > 0 {
            chunk(String::from_utf8_lossy(&pending[..valid]).into_owned());
            pending.drain(..valid);
        }
        // After the output that took the question off the screen, and only if no new
        // question was sent meanwhile (it would be withdrawn in the old one's place).
        if let Some(question) = gone {
            let still_asked = || {
                let mut screen = screen.lock().unwrap_or_else(|p| p.into_inner());
                let still = screen.asked.as_ref() == Some(&question);
                if still {
                    screen.asked = None;
                }
                still
            };
            tasks.emit_if(task, still_asked, |seq| GuestMessage::PromptGone {
                v: VERSION,
                task: task.to_owned(),
                seq,
            });
        }
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
            secret_files: Vec::new(),
            results: None,
            task: "t".into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: [("GREETING".to_owned(), "hi".to_owned())].into(),
            cwd: None,
            timeout,
            artifacts: Vec::new(),
            prompt_patterns: Vec::new(),
            start_error: None,
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
                GuestMessage::Prompt { seq, .. } | GuestMessage::Artifact { seq, .. } => {
                    seqs.push(seq)
                }
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
        assert!(tasks.input("t", "abc\n", None, None));
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
        // The exit is sent just before the task is marked finished: wait for the mark.
        let marked = Instant::now() + Duration::from_secs(2);
        while tasks.cancel("t") && Instant::now() < marked {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!tasks.cancel("t"), "a finished task is gone");

        // A task the agent never saw is reported cancelled and is not run afterwards.
        let (sink, rx) = channel_sink();
        let tasks = Arc::new(Tasks::default());
        tasks.set_sink(sink);
        assert!(!tasks.cancel("never"));
        match rx.recv_timeout(Duration::from_secs(5)).expect("an exit") {
            GuestMessage::Exit { task, reason, .. } => {
                assert_eq!((task.as_str(), reason), ("never", ExitReason::Cancelled))
            }
            other => panic!("unexpected {other:?}"),
        }
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
    fn a_question_is_reported_once_and_answered_once() {
        let (tasks, rx) = run(
            &["sh", "-c", "printf 'Continue? (y/n) '; read x; echo got:$x"],
            None,
        );
        let prompt = loop {
            match rx.recv_timeout(Duration::from_secs(10)).expect("a prompt") {
                GuestMessage::Prompt {
                    text, screen, seq, ..
                } => break (text, screen, seq),
                GuestMessage::Output { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(prompt.0, "Continue? (y/n)");
        assert_eq!(prompt.1, vec!["Continue? (y/n)"]);
        assert!(tasks.input("t", "y\r", Some("p-1"), Some(prompt.2)));
        assert!(
            !tasks.input("t", "y\r", Some("p-1"), Some(prompt.2)),
            "the same answer twice"
        );
        let (out, code, ..) = collect(&rx);
        assert!(out.contains("got:y"), "{out:?}");
        assert!(!out.contains("got:yy"), "{out:?}");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn an_answer_to_a_question_that_was_replaced_is_not_typed() {
        // The first question is cleared from the screen and another asked in its place,
        // as an agent's dialog gives way to the next: an answer to the first, in flight
        // meanwhile, must not answer the second.
        let (tasks, rx) = run(
            &[
                "sh",
                "-c",
                "printf 'Delete the cache? (y/n) '; sleep 2; printf '\\033[2J\\033[HDelete the repository? (y/n) '; read x; echo got:$x",
            ],
            None,
        );
        let mut asked = Vec::new();
        while asked.len() < 2 {
            match rx.recv_timeout(Duration::from_secs(10)).expect("prompts") {
                GuestMessage::Prompt { text, seq, .. } => asked.push((text, seq)),
                GuestMessage::Output { .. } | GuestMessage::PromptGone { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(asked[0].0, "Delete the cache? (y/n)");
        assert_eq!(asked[1].0, "Delete the repository? (y/n)");
        assert!(
            !tasks.input("t", "y\r", Some("p-1"), Some(asked[0].1)),
            "the first question's answer reached the second"
        );
        assert!(tasks.input("t", "n\r", Some("p-2"), Some(asked[1].1)));
        let (out, code, ..) = collect(&rx);
        assert!(out.contains("got:n"), "{out:?}");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn artifacts_matching_the_globs_come_back_before_the_exit() {
        let dir = tempdir("artifacts");
        let (sink, rx) = channel_sink();
        let tasks = Arc::new(Tasks::default());
        tasks.set_sink(sink);
        let mut spec = spec(
            &[
                "sh",
                "-c",
                "mkdir -p out/deep; echo a > out/a.txt; echo b > out/deep/b.log; echo c > c.txt",
            ],
            None,
        );
        spec.cwd = Some(dir.display().to_string());
        spec.artifacts = vec!["out/**/*".into(), "../*".into(), "missing/*".into()];
        tasks.start(spec);
        let mut files = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).expect("a message") {
                GuestMessage::Artifact {
                    path,
                    offset,
                    data,
                    last,
                    ..
                } => {
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64");
                    files.push((path, offset, String::from_utf8(bytes).expect("utf-8"), last));
                }
                GuestMessage::Exit { code, .. } => {
                    assert_eq!(code, Some(0));
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(
            files,
            vec![
                ("out/a.txt".into(), 0, "a\n".into(), true),
                ("out/deep/b.log".into(), 0, "b\n".into(), true),
            ]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_task_asked_for_again_after_an_agent_restart_is_not_run_twice() {
        let state = tempdir("state");
        let marker = state.join("ran");
        let script = format!("echo x >> {}", marker.display());
        let run_once = |tasks: Arc<Tasks>| {
            let (sink, rx) = channel_sink();
            tasks.set_sink(sink);
            tasks.start(spec(&["sh", "-c", &script], None));
            collect(&rx)
        };
        let first = Arc::new(Tasks::with_state_dir(state.clone()));
        let (_, code, reason, _) = run_once(first);
        assert_eq!((code, reason), (Some(0), ExitReason::Completed));
        // A new agent process (same boot): the marker says it ran.
        let second = Arc::new(Tasks::with_state_dir(state.clone()));
        let (out, code, reason, _) = run_once(second);
        assert_eq!((code, reason), (None, ExitReason::Lost), "{out}");
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "x\n");
        std::fs::remove_dir_all(&state).expect("cleanup");
    }

    fn tempdir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleet-agent-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn a_missing_program_fails_to_start() {
        let (_tasks, rx) = run(&["/nonexistent/program"], None);
        let (out, code, reason, _) = collect(&rx);
        assert_eq!((code, reason), (None, ExitReason::FailedToStart), "{out}");
    }
}
