//! Tasks on the host: which run is due, what each run's record says, and what the guest
//! reported. `TaskBook` holds every task's record and every prompt, in memory and in the
//! status directory (`tasks/`, `hitl/`), behind one lock: the daemon's pass (`sync`) and
//! each VM's agent link (`daemon::agents`, through `receive` and `tick`) change them only
//! through it, so a record is never written by two hands at once.
//!
//! The book decides, an executor does. `BookState` holds the records and makes every
//! decision from what it is given: a guest message or a tick, the time (`now`, set as the
//! lock is taken) and the host's answer files (`HostFiles`, read before the lock). It reads
//! no file and no clock; it queues what to write (`Effects`: resets, the guest's bytes,
//! records, prompts, events, answer files to move). `TaskBook` is the executor: it takes
//! the lock, sets the time, calls the decision, and makes the effects when it releases the
//! lock (`BookGuard`). Each task a hold touched gets that task's next turn, and a task's
//! effects are made one hold at a time in turn order, so they reach the disk in the order
//! they were decided: a new run's reset never lands after its first output, a record never
//! before the bytes it counts, an older copy never after a newer one. A receive's
//! acknowledgements are sent after its turns are made. A slow write holds up only the holds
//! that wrote the same task after it (a flooding guest slows its own link, and a daemon
//! pass only if that pass changes one of the guest's runs), never another task's writes.
//! `decision_tests` drives `BookState` with no directory, no clock and no sleep.
//!
//! A task runs once per (name, spec hash): `rerun` is part of the spec, so bumping it is a
//! new hash. Each run gets a generation and a run id (sha256 of the spec hash and the
//! generation); the guest knows the run as `<name>-<run>`, and prompts are numbered within
//! it (`<name>-<run>-<n>`), so an answer written for one run never reaches another.
//!
//! Invariants:
//! - A record is `Pending` until its VM's agent greeted, `Staging` while the repository is
//!   shipped, `Running` before `RunTask` is sent (so a crash after sending re-attaches
//!   rather than restarts: the guest ignores a run it knows), and finished only from the
//!   guest's exit or from evidence the run is gone (its VM stopped or rebooted).
//! - Guest messages are recorded in `seq` order, each once; a message is acknowledged only
//!   after it is recorded.

pub mod remote;
pub mod repo;
pub mod results;
pub mod runner;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};

use fleet_agent_protocol::SecretFile;
use secrecy::SecretSlice;

use crate::digest::hex;
use crate::resolve::{CommittedAnswer, Desired, DesiredTask};
use crate::secrets::Vault;
use crate::spec::SecretRef;
use crate::status::tasks::{HostCancel, PromptRecord, PromptState, TaskPhase, TaskRecord};
use crate::status::{Event, EventKind, StatusDir};
use crate::time::Timestamp;

pub struct TaskBook {
    status: StatusDir,
    repo_root: PathBuf,
    cache_dir: PathBuf,
    /// The host's settings for fetching repositories over https and ssh.
    git: crate::spec::HostGit,
    /// This binary: git's credential helper when fetching over https.
    fleet_exe: PathBuf,
    state: Mutex<BookState>,
    /// Changes the daemon's watcher saw in `status/hitl/` (see `answer_files_changed`).
    answer_file_changes: AtomicU64,
    /// Whether a watcher reports them; without one the directory is polled.
    answer_files_watched: AtomicBool,
    /// The last look for stray answer files: the watcher's change count then, and when.
    stray_scan: Mutex<Option<(u64, Instant)>>,
    /// Each task's last turn whose effects are made (`Pending::turn`): a task's effects are
    /// made one hold at a time, in the order the holds decided them.
    made: Mutex<HashMap<String, u64>>,
    made_changed: Condvar,
    /// Called when the daemon should plan again (`on_plan_again`), after the records are
    /// written.
    plan_again: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

#[derive(Default)]
struct BookState {
    desired: BTreeMap<String, DesiredTask>,
    /// Each brokered VM's egress policy (`broker`), by VM name.
    egress: BTreeMap<String, Arc<crate::egress::Policy>>,
    /// Connections admitted under a budget and not yet ended, by run (task name).
    egress_open: BTreeMap<String, u64>,
    /// Each desired task's run hash and hold, from the vault's values (`Vault::bind`).
    bound: BTreeMap<String, crate::secrets::BoundTask>,
    answers: BTreeMap<String, CommittedAnswer>,
    /// Whose committed answers count.
    approvers: crate::resolve::Approvers,
    /// fleet is suspended: no run starts.
    suspended: bool,
    /// The VMs with `reset: beforeEachTask`, and whether each was used (a run dispatched
    /// to it) since it was made or last reset: set when a run is dispatched, and read again
    /// by `TaskBook::sync` from the VM's mark on disk (`status/used/<vm>`, which apply
    /// clears) or a run under way on it.
    used_since_reset: BTreeMap<String, bool>,
    /// The VMs with an `idle` rule: a run made or ended on one is planned for at once (a
    /// stopped one is woken, a free one's idle time counts from then).
    idle: BTreeSet<String>,
    /// The pools that make fresh members, and what the last pass left of them to hand out.
    fresh_pools: BTreeMap<String, crate::lifecycle::FreshPool>,
    members: crate::lifecycle::Members,
    /// The commit the desired tasks come from.
    revision: Option<String>,
    records: BTreeMap<String, TaskRecord>,
    prompts: BTreeMap<String, PromptRecord>,
    /// Each VM's loadout secret references.
    vm_secrets: BTreeMap<String, Vec<SecretRef>>,
    /// Each VM's workspaces to mount, and the set's digest.
    vm_mounts: BTreeMap<String, (String, Vec<fleet_agent_protocol::Mount>)>,
    /// The opened secret values, replaced by each `sync` with the tasks bound to them.
    vault: Arc<Vault>,
    /// Committed answers already reported as going nowhere (by id and file).
    reported_answers: BTreeSet<(String, String)>,
    /// What the book decided to write, made when the lock is released (see `BookGuard`).
    effects: Effects,
    /// Runs that ended with a results bundle the host has not checked yet
    /// (`TaskBook::collect_results`, after the lock).
    results_due: Vec<(String, String)>,
    /// Each task's holds that queued effects so far: each gets the task's next turn.
    turns: HashMap<String, u64>,
    /// The time of the decision being made: set by each entry of `TaskBook` as it takes
    /// the lock, so the decisions themselves never read a clock.
    now: DecidedAt,
}

/// When a decision is made (`BookState::now`): the wall clock, for what records say and
/// for deadlines people set, and a monotonic instant, for waits a clock step must not
/// stretch or cut. The epoch until an entry sets it.
#[derive(Clone, Copy)]
struct DecidedAt {
    wall: SystemTime,
    mono: Instant,
}

impl DecidedAt {
    fn now() -> DecidedAt {
        DecidedAt {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

impl Default for DecidedAt {
    fn default() -> DecidedAt {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        DecidedAt {
            wall: SystemTime::UNIX_EPOCH,
            mono: *START.get_or_init(Instant::now),
        }
    }
}

/// What a link's tick decides from that lives in `status/hitl/`, read by the executor
/// before it takes the lock (`TaskBook::host_files`).
#[derive(Default)]
struct HostFiles {
    /// `status/hitl/`, to name files in notes.
    dir: PathBuf,
    /// The host answer file of each of the VM's open prompts that has one: its text, or
    /// why it was refused.
    answers: BTreeMap<String, Result<String, crate::status::AnswerFileRefused>>,
    /// Every name in `status/hitl/`, when a look for stray answer files is due.
    strays: Option<Vec<String>>,
    /// The host's cancels of the VM's runs (`status/task-cancels/`).
    cancels: BTreeMap<String, HostCancel>,
}

/// Writes decided under the book's lock and made without it. They are made per task, in
/// the order the holds decided them (`Turns`), and within a hold in the order listed: one
/// task's slow disk holds up only later writes of the same task, never another task's, a
/// VM's link, or the daemon.
#[derive(Default)]
struct Effects {
    /// Runs whose output and artifacts are emptied for a new run, before anything else.
    resets: Vec<String>,
    /// Guest output to write (run, offset, bytes) and artifact parts (run, path, offset,
    /// bytes), synced before the records that count them are written.
    output: Vec<(String, u64, Vec<u8>)>,
    artifacts: Vec<(String, String, u64, Vec<u8>)>,
    /// Connection lines for a run's `egress.jsonl` (written before the record counting
    /// them).
    egress: Vec<(String, Vec<u8>)>,
    /// Tasks whose turn the hold must wait for even with nothing of theirs to write: it
    /// acknowledges their guest messages, which earlier holds may still be writing.
    barrier: BTreeSet<String>,
    records: BTreeSet<String>,
    prompts: BTreeSet<String>,
    events: Vec<Event>,
    /// Host answer files (names in `hitl/`) to move aside (`Some(to)`) or remove (`None`),
    /// after the records and prompts that say what became of them are written.
    moves: Vec<(String, Option<String>)>,
    /// VMs just given a run: marked used on disk after the run's record is written and
    /// before the guest hears (`BookState::mark_used`).
    used: Vec<String>,
    /// The daemon plans again once the records saying so are written
    /// (`TaskBook::on_plan_again`): a fresh run was given a member or let its member go, or
    /// a run was made or ended on a VM that resets before each run or has an idle rule.
    plan_again: bool,
}

/// The effects of one hold of the lock for one task (or, under the key "", for the fleet
/// as a whole), with the copies to write, and its turn among that task's holds.
#[derive(Default)]
struct Pending {
    turn: u64,
    reset: bool,
    output: Vec<(u64, Vec<u8>)>,
    artifacts: Vec<(String, u64, Vec<u8>)>,
    egress: Vec<u8>,
    record: Option<TaskRecord>,
    prompts: Vec<PromptRecord>,
    events: Vec<Event>,
    moves: Vec<(String, Option<String>)>,
}

/// Output the disk refused: of which run, where the refused part began, and why.
struct LostOutput {
    run: Option<String>,
    at: u64,
    error: std::io::Error,
}

/// The book's lock: when it is released, what the holder decided is written (after the
/// release, before the holder goes on).
struct BookGuard<'a> {
    book: &'a TaskBook,
    state: Option<MutexGuard<'a, BookState>>,
}

impl std::ops::Deref for BookGuard<'_> {
    type Target = BookState;
    fn deref(&self) -> &BookState {
        self.state.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for BookGuard<'_> {
    fn deref_mut(&mut self) -> &mut BookState {
        self.state.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for BookGuard<'_> {
    fn drop(&mut self) {
        let plan_again = self
            .state
            .as_deref_mut()
            .is_some_and(|s| std::mem::take(&mut s.effects.plan_again));
        let used = self
            .state
            .as_deref_mut()
            .map(|s| std::mem::take(&mut s.effects.used))
            .unwrap_or_default();
        let pending = self
            .state
            .as_deref_mut()
            .map(BookState::take_effects)
            .unwrap_or_default();
        self.state = None;
        self.book.flush(pending);
        // After the run's record (a pass reading the mark then finds the run under way,
        // never a used VM with a run waiting), before the guest hears (the caller sends).
        // The book itself remembers in memory; the mark is for the plan and a restart.
        for vm in used {
            if let Err(e) = self.book.status.mark_used(&vm) {
                tracing::error!(vm, "cannot mark the VM used on disk: {e}");
            }
        }
        if plan_again {
            let notify = self
                .book
                .plan_again
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(notify) = notify.as_ref() {
                notify();
            }
        }
    }
}

impl BookState {
    /// Whether a run may be dispatched to `vm` now: always, unless it resets before each
    /// run and was used since its last reset, or runs one now (`reset::may_dispatch`).
    fn may_dispatch_on(&self, vm: &str) -> bool {
        self.used_since_reset.get(vm).is_none_or(|used| {
            let runs = crate::status::tasks::reset_facts(self.records.values(), vm);
            crate::reset::may_dispatch(&runs, *used)
        })
    }

    /// A run is being dispatched to `vm`: it is used from now on. Every VM is marked, not
    /// only those the book knows to reset: a revision that just turned `reset` on may not
    /// have reached the book yet.
    fn mark_used(&mut self, vm: &str) {
        if let Some(used) = self.used_since_reset.get_mut(vm) {
            *used = true;
        }
        self.effects.used.push(vm.to_owned());
    }

    fn record_changed(&mut self, name: &str) {
        self.effects.records.insert(name.to_owned());
    }

    fn prompt_changed(&mut self, id: &str) {
        self.effects.prompts.insert(id.to_owned());
    }

    /// What this hold decided, by task, each with that task's next turn.
    fn take_effects(&mut self) -> BTreeMap<String, Pending> {
        let effects = std::mem::take(&mut self.effects);
        let mut by_task: BTreeMap<String, Pending> = BTreeMap::new();
        for task in effects.barrier {
            by_task.entry(task).or_default();
        }
        for task in effects.resets {
            by_task.entry(task).or_default().reset = true;
        }
        for (task, at, data) in effects.output {
            by_task.entry(task).or_default().output.push((at, data));
        }
        for (task, path, offset, data) in effects.artifacts {
            by_task
                .entry(task)
                .or_default()
                .artifacts
                .push((path, offset, data));
        }
        for (task, line) in effects.egress {
            by_task
                .entry(task)
                .or_default()
                .egress
                .extend_from_slice(&line);
        }
        for name in effects.records {
            if let Some(record) = self.records.get(&name) {
                by_task.entry(name).or_default().record = Some(record.clone());
            }
        }
        for id in effects.prompts {
            if let Some(prompt) = self.prompts.get(&id) {
                by_task
                    .entry(prompt.task.clone())
                    .or_default()
                    .prompts
                    .push(prompt.clone());
            }
        }
        for event in effects.events {
            by_task
                .entry(event.task.clone().unwrap_or_default())
                .or_default()
                .events
                .push(event);
        }
        for (file, to) in effects.moves {
            // After the prompt record that says what became of it: its task's turn.
            let task = file
                .strip_suffix(".answer")
                .and_then(|id| self.prompts.get(id))
                .map(|p| p.task.clone())
                .unwrap_or_default();
            by_task.entry(task).or_default().moves.push((file, to));
        }
        for (task, pending) in &mut by_task {
            let turn = self.turns.entry(task.clone()).or_default();
            *turn += 1;
            pending.turn = *turn;
        }
        by_task
    }

    /// Queues output of run `name`, at `at`.
    fn write_output(&mut self, name: &str, at: u64, data: &[u8]) {
        self.effects
            .output
            .push((name.to_owned(), at, data.to_vec()));
    }

    /// Queues an artifact part of run `name`.
    fn write_artifact(&mut self, name: &str, path: &str, offset: u64, data: Vec<u8>) {
        self.effects
            .artifacts
            .push((name.to_owned(), path.to_owned(), offset, data));
    }
}

impl BookState {
    /// What identifies a run of `task` (see `Vault::bind`).
    fn run_hash<'a>(&'a self, task: &'a DesiredTask) -> &'a str {
        self.bound
            .get(&task.name)
            .map_or(task.spec_hash.as_str(), |b| b.run_hash.as_str())
    }

    /// Why `task` cannot run now, if it cannot.
    fn held(&self, task: &DesiredTask) -> Option<&str> {
        self.bound.get(&task.name)?.held.as_deref()
    }

    /// The decision's time, as records hold it.
    fn stamp(&self) -> Option<Timestamp> {
        Some(self.now.wall.into())
    }
}

/// What one VM's guest should hold under `SECRETS_DIR`, and its digest (over paths and
/// fingerprints, never values). Values are encoded only when the set is sent.
struct SecretSet<'a> {
    digest: String,
    values: BTreeMap<String, &'a SecretSlice<u8>>,
}

impl SecretSet<'_> {
    fn files(&self) -> Vec<SecretFile> {
        use base64::Engine;
        use secrecy::ExposeSecret;
        self.values
            .iter()
            .map(|(path, value)| SecretFile {
                path: path.clone(),
                data: base64::engine::general_purpose::STANDARD.encode(value.expose_secret()),
            })
            .collect()
    }
}

/// What the host keeps of one run, whatever the guest sends: a guest may replace its agent
/// and send anything, and the honest agent's own limits are no defence. Memory held per
/// run is bounded by the prompt limits (at most `PROMPTS` prompts of `PROMPT_TEXT_BYTES`
/// plus `PROMPT_SCREEN_LINES` lines of `PROMPT_LINE_BYTES`), disk by the byte limits.
pub mod limits {
    /// Output kept in `output.log`; the rest is acknowledged and dropped, and the status
    /// says the output was truncated.
    pub const OUTPUT_BYTES: u64 = 64 * 1024 * 1024;
    /// Artifact bytes, over all of a run's artifacts.
    pub const ARTIFACT_BYTES: u64 = 256 * 1024 * 1024;
    /// Artifacts per run, and the longest artifact path.
    pub const ARTIFACTS: usize = 1000;
    pub const ARTIFACT_PATH_BYTES: usize = 1024;
    /// Prompts per run; later ones are dropped (the task keeps running).
    pub const PROMPTS: u32 = 100;
    /// A prompt's text, and the screen context kept with it.
    pub const PROMPT_TEXT_BYTES: usize = 4096;
    pub const PROMPT_SCREEN_LINES: usize = 40;
    pub const PROMPT_LINE_BYTES: usize = 512;
    /// Connections logged in a run's `egress.jsonl` (about 200 bytes each); later ones are
    /// counted in its totals only.
    pub const EGRESS_LINES: u64 = 20_000;
}

/// Where a reference's value lives in the guest, relative to `SECRETS_DIR`: its `file`, or
/// for an environment variable a file the agent reads when it starts the task.
fn secret_path(r: &SecretRef) -> String {
    match &r.file {
        Some(file) => file.clone(),
        None => format!(".env/{}/{}", r.secret.0, r.key.0),
    }
}

/// The file targets of the VM's loadout references: every run of the VM may read them.
fn vm_secret_files(state: &BookState, vm: &str) -> Vec<String> {
    state
        .vm_secrets
        .get(vm)
        .into_iter()
        .flatten()
        .filter_map(|r| r.file.clone())
        .collect()
}

/// The VM's set: its loadout's references and those of the tasks that target it, each value
/// the vault could open (the others hold their tasks back).
fn secret_set<'a>(state: &'a BookState, vm: &str) -> SecretSet<'a> {
    let refs = state.vm_secrets.get(vm).into_iter().flatten().chain(
        state
            .desired
            .values()
            .filter(|t| t.vm == vm)
            .flat_map(|t| &t.secrets),
    );
    let mut by_path: BTreeMap<String, (&str, &SecretSlice<u8>)> = BTreeMap::new();
    for r in refs {
        let (Some(value), Some(fingerprint)) = (
            state.vault.value(&r.secret.0, &r.key.0),
            state.vault.fingerprint(&r.secret.0, &r.key.0),
        ) else {
            continue;
        };
        by_path
            .entry(secret_path(r))
            .or_insert((fingerprint, value));
    }
    let mut digest = Sha256::new();
    for (path, (fingerprint, _)) in &by_path {
        digest.update(format!("{path}\0{fingerprint}\0").as_bytes());
    }
    SecretSet {
        digest: hex(&digest.finalize())[..16].to_owned(),
        values: by_path.into_iter().map(|(p, (_, v))| (p, v)).collect(),
    }
}

/// How long the run has been going at `now`, from its record's `started`.
fn running_for(record: &TaskRecord, now: SystemTime) -> Option<std::time::Duration> {
    let started = record.started?.system_time();
    now.duration_since(started).ok()
}

fn run_id(spec_hash: &str, generation: u32) -> String {
    hex(&Sha256::digest(format!("{spec_hash}/{generation}")))[..8].to_owned()
}

impl TaskBook {
    /// How repositories over https and ssh are reached (the host configuration's `git`).
    pub fn with_git(mut self, git: crate::spec::HostGit) -> TaskBook {
        self.git = git;
        self
    }

    /// Reads the records and prompts the status directory holds.
    pub fn open(status: StatusDir, repo_root: PathBuf) -> TaskBook {
        let mut state = BookState {
            records: status.read_task_records(),
            prompts: status.read_prompts(),
            ..BookState::default()
        };
        // A run that ended with a bundle fleet did not get to check (it was killed between
        // the exit and the check): checked at the first sync.
        state.results_due = state
            .records
            .values()
            .filter(|r| {
                !r.phase.is_active()
                    && r.phase != TaskPhase::Pending
                    && r.repository.is_some()
                    && r.results.is_none()
                    && r.artifacts
                        .iter()
                        .any(|a| a == fleet_agent_protocol::RESULTS_ARTIFACT)
            })
            .map(|r| (r.name.clone(), r.run.clone()))
            .collect();
        // Output written after the last record a killed fleet made is cut back: the guest
        // sends it again, so the log has no repeats.
        for record in state.records.values().filter(|r| r.phase.is_active()) {
            if let Err(e) = status.cut_task_output(&record.name, record.output_bytes) {
                tracing::warn!(task = %record.name, "cannot cut the output back: {e}");
            }
        }
        let cache_dir = repo_root.join(".fleet").join("cache").join("repos");
        TaskBook {
            status,
            repo_root,
            cache_dir,
            git: crate::spec::HostGit::default(),
            fleet_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fleet")),
            state: Mutex::new(state),
            answer_file_changes: AtomicU64::new(0),
            answer_files_watched: AtomicBool::new(false),
            stray_scan: Mutex::default(),
            made: Mutex::default(),
            made_changed: Condvar::new(),
            plan_again: Mutex::default(),
        }
    }

    /// What to call when the daemon should plan again: a fresh run got a member or let one
    /// go, or a run was made or ended on a VM that resets before each run or has an idle
    /// rule (its reset, wake or idle time follows from it).
    pub fn on_plan_again(&self, notify: impl Fn() + Send + Sync + 'static) {
        *self.plan_again.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(notify));
    }

    /// The fresh runs the book records, for `lifecycle::members`.
    pub fn fresh_runs(&self) -> Vec<crate::lifecycle::FreshRun> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .records
            .values()
            .flat_map(TaskRecord::fresh_runs)
            .collect()
    }

    /// Makes what a holder of the lock decided, without the lock: for each task it touched,
    /// when that task's turn comes (one hold at a time, in the order the holds decided), so
    /// a new run's reset never lands after its first output, a record never before the bytes
    /// it counts, an older copy never after a newer one. Tasks wait only for their own
    /// earlier writes. Within a task: reset, the guest's bytes (synced), record, prompts,
    /// events, then answer files moved.
    fn flush(&self, pending: BTreeMap<String, Pending>) {
        // Whatever happens below (a panic included), every turn this hold took is marked
        // made in its order, so no later hold of these tasks waits forever.
        struct Unmade<'a> {
            book: &'a TaskBook,
            left: Vec<(String, u64)>,
        }
        impl Drop for Unmade<'_> {
            fn drop(&mut self) {
                for (task, turn) in self.left.drain(..) {
                    self.book.wait_turn(&task, turn);
                    self.book.mark_made(&task, turn);
                }
            }
        }
        let mut unmade = Unmade {
            book: self,
            left: pending.iter().map(|(t, p)| (t.clone(), p.turn)).collect(),
        };
        for (task, part) in pending {
            let turn = part.turn;
            self.wait_turn(&task, turn);
            let lost = self.make(&task, part);
            self.mark_made(&task, turn);
            unmade.left.retain(|(t, _)| *t != task);
            if let Some(lost) = lost {
                self.output_lost(&task, lost);
            }
        }
    }

    /// Waits until every earlier turn of `task` is made.
    fn wait_turn(&self, task: &str, turn: u64) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        while made.get(task).copied().unwrap_or_default() + 1 < turn {
            made = self
                .made_changed
                .wait(made)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn mark_made(&self, task: &str, turn: u64) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let last = made.entry(task.to_owned()).or_default();
        *last = (*last).max(turn);
        self.made_changed.notify_all();
    }

    /// Makes one task's part of a hold; returns the output the disk refused, if any.
    fn make(&self, task: &str, part: Pending) -> Option<LostOutput> {
        let Pending {
            turn: _,
            reset,
            output,
            artifacts,
            egress,
            mut record,
            prompts,
            events,
            moves,
        } = part;
        if reset && let Err(e) = self.status.reset_task_files(task) {
            tracing::warn!(task, "cannot reset the task's output: {e}");
        }
        let mut lost = None;
        // Never past the log's end: a part lost by an earlier hold (cut back, and decided
        // before that hold found out) would leave a hole.
        let mut end = match output.first() {
            Some(_) => self.status.task_output_len(task).unwrap_or(0),
            None => 0,
        };
        for (at, data) in &output {
            if *at > end {
                lost = Some((end, std::io::Error::other("an earlier part was lost")));
                break;
            }
            if let Err(error) = self.status.write_task_output(task, *at, data) {
                lost = Some((*at, error));
                break;
            }
            end = at + data.len() as u64;
        }
        if !output.is_empty()
            && lost.is_none()
            && let Err(error) = self.status.sync_task_output(task)
        {
            lost = Some((output[0].0, error));
        }
        let lost = lost.map(|(at, error)| {
            // The log holds what it held before the refused part; the record written now
            // says so, so no crash leaves a record counting bytes the log lacks.
            if let Err(e) = self.status.cut_task_output(task, at) {
                tracing::warn!(task, "cannot cut the output back: {e}");
            }
            if let Some(record) = &mut record {
                record.output_bytes = record.output_bytes.min(at);
                record.output_truncated = true;
            }
            LostOutput {
                run: record.as_ref().map(|r| r.run.clone()),
                at,
                error,
            }
        });
        let mut written = BTreeSet::new();
        for (path, offset, data) in &artifacts {
            match self.status.write_artifact_part(task, path, *offset, data) {
                Ok(()) => {
                    written.insert(path);
                }
                Err(e) => tracing::warn!(task, "artifact {path}: {e}"),
            }
        }
        for path in written {
            if let Err(e) = self.status.sync_artifact(task, path) {
                tracing::warn!(task, "cannot sync artifact {path}: {e}");
            }
        }
        if !egress.is_empty()
            && let Err(e) = self.status.append_task_egress(task, &egress)
        {
            tracing::warn!(task, "cannot log the run's connections: {e}");
        }
        if let Some(record) = record
            && let Err(e) = self.status.write_task_record(&record)
        {
            tracing::error!(task = %record.name, "cannot write the task's status: {e}");
        }
        for prompt in prompts {
            if let Err(e) = self.status.write_prompt(&prompt) {
                tracing::error!(prompt = %prompt.id, "cannot write the prompt: {e}");
            }
        }
        for event in events {
            if let Err(e) = self.status.append_event(&event) {
                tracing::error!("cannot append an event: {e}");
            }
        }
        for (from, to) in moves {
            if let Err(e) = self.status.move_hitl_file(&from, to.as_deref()) {
                tracing::warn!("cannot move the answer file {from}: {e}");
            }
        }
        lost
    }

    /// Output the disk refused is gone (the guest has moved on): the run's record says the
    /// log is truncated where the refused part began, and the rest of the run's output is
    /// dropped, so the log never has a hole. Only the run that lost it: a new run of the
    /// task made meanwhile keeps its own output.
    fn output_lost(&self, task: &str, lost: LostOutput) {
        let mut state = self.lock();
        let Some(record) = state
            .records
            .get(task)
            .filter(|r| Some(&r.run) == lost.run.as_ref())
            .cloned()
        else {
            return;
        };
        let LostOutput { at, error, .. } = lost;
        tracing::error!(task, "cannot write the task's output: {error}");
        state.update(task, |r| {
            r.output_bytes = r.output_bytes.min(at);
            r.output_truncated = true;
        });
        state.event(
            &record,
            EventKind::TaskOutputTruncated,
            format!("output of {task} could not be written ({error}); the rest is dropped"),
        );
    }

    /// Something changed in `status/hitl/` (the daemon's watcher calls this): the next tick
    /// of any link looks for answer files nobody asked for.
    pub fn answer_files_changed(&self) {
        self.answer_file_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A watcher reports changes to `status/hitl/` from now on, so the book stops polling it.
    pub fn watching_answer_files(&self) {
        self.answer_files_watched.store(true, Ordering::Relaxed);
        self.answer_files_changed();
    }

    /// Whether to look for stray answer files now: after a reported change, or (with no
    /// watcher) `ANSWER_SCAN` after the last look. One look serves every VM's link.
    fn stray_scan_due(&self) -> bool {
        let changes = self.answer_file_changes.load(Ordering::Relaxed);
        let mut last = self.stray_scan.lock().unwrap_or_else(|p| p.into_inner());
        let due = match *last {
            None => true,
            Some((seen, _)) if self.answer_files_watched.load(Ordering::Relaxed) => seen != changes,
            Some((_, at)) => at.elapsed() >= runner::ANSWER_SCAN,
        };
        if due {
            *last = Some((changes, Instant::now()));
        }
        due
    }

    /// What the decisions of a link's tick read from `status/hitl/`, read before the lock
    /// is taken: the answer files of the VM's open prompts, and (when a look is due) the
    /// names of every file there.
    fn host_files(&self, vm: &str) -> HostFiles {
        let open: Vec<String> = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prompts
            .values()
            .filter(|p| p.vm == vm && p.state == PromptState::Pending)
            .map(|p| p.id.clone())
            .collect();
        let cancels = self.host_cancels(Some(vm));
        let answers = open
            .into_iter()
            .filter_map(|id| {
                let read = self
                    .status
                    .read_answer_file(&crate::status::tasks::answer_file_name(&id))?;
                Some((id, read))
            })
            .collect();
        HostFiles {
            dir: self.status.hitl_dir(),
            answers,
            strays: self.stray_scan_due().then(|| self.status.hitl_file_names()),
            cancels,
        }
    }

    /// The host's cancels (`fleet task cancel`) of runs not yet ended or being stopped, on
    /// `vm` or anywhere; read without the lock.
    fn host_cancels(&self, vm: Option<&str>) -> BTreeMap<String, HostCancel> {
        let open: Vec<String> = self
            .lock()
            .records
            .values()
            .filter(|r| vm.is_none_or(|vm| r.vm == vm))
            .filter(|r| !r.phase.is_finished() && r.cancelled_by.is_none())
            .map(|r| r.name.clone())
            .collect();
        open.into_iter()
            .filter_map(|task| {
                let cancel = self.status.read_task_cancel(&task)?;
                Some((task, cancel))
            })
            .collect()
    }

    /// Prunes finished runs of tasks no longer in the revision, per `policy.retention`:
    /// the newest `finished_tasks` of those within `finished_task_age` stay. A run that
    /// ended less than 10 s ago stays whatever the policy (its last writes may still be on
    /// their way to disk). Returns the tasks removed.
    pub fn prune(
        &self,
        retention: crate::resolve::ResolvedRetention,
        now: std::time::SystemTime,
    ) -> Vec<String> {
        let doomed: Vec<(String, Vec<String>)> = {
            let mut state = self.lock();
            // Before its first revision the book knows no task: every record would look gone.
            if state.revision.is_none() {
                return Vec::new();
            }
            let mut gone: Vec<(&TaskRecord, std::time::SystemTime)> = state
                .records
                .values()
                .filter(|r| r.phase.is_finished() && !state.desired.contains_key(&r.name))
                .map(|r| {
                    let ended = r
                        .finished
                        .map_or(std::time::UNIX_EPOCH, |t| t.system_time());
                    (r, ended)
                })
                .collect();
            gone.sort_by_key(|g| std::cmp::Reverse(g.1));
            let settled = |ended: std::time::SystemTime| {
                now.duration_since(ended)
                    .is_ok_and(|age| age >= std::time::Duration::from_secs(10))
            };
            let names: Vec<String> = gone
                .iter()
                .enumerate()
                .filter(|(i, (_, ended))| {
                    let too_many = *i >= retention.finished_tasks as usize;
                    let too_old = now
                        .duration_since(*ended)
                        .is_ok_and(|age| age > retention.finished_task_age);
                    (too_many || too_old) && settled(*ended)
                })
                .map(|(_, (r, _))| r.name.clone())
                .collect();
            names
                .into_iter()
                .map(|name| {
                    state.records.remove(&name);
                    let prompts: Vec<String> = state
                        .prompts
                        .values()
                        .filter(|p| p.task == name)
                        .map(|p| p.id.clone())
                        .collect();
                    for id in &prompts {
                        state.prompts.remove(id);
                    }
                    (name, prompts)
                })
                .collect()
        };
        let mut removed = Vec::new();
        for (task, prompts) in doomed {
            match self.status.remove_task(&task, &prompts) {
                Ok(()) => removed.push(task),
                Err(e) => tracing::warn!(task, "pruning its finished run: {e}"),
            }
        }
        removed
    }

    /// Stops (or lets again) every run from starting, for `fleet suspend` and
    /// `policy.suspend`; runs under way go on.
    pub fn set_suspended(&self, suspended: bool) {
        self.lock().suspended = suspended;
    }

    /// What the pass left of the fresh pools to give new runs (`lifecycle::members`): the
    /// next `sync` hands them out.
    pub fn set_members(&self, members: &crate::lifecycle::Members) {
        self.lock().members = members.clone();
    }

    /// Takes a new desired state and the secret values opened for it, together: tasks are
    /// bound to the values they will be given, and the values change only with the binding
    /// (see `BookState::sync`).
    pub fn sync(&self, desired: &Desired, vault: Arc<Vault>, running: &BTreeSet<String>) {
        let cancels = self.host_cancels(None);
        let mut state = self.lock();
        state.now = DecidedAt::now();
        state.apply_host_cancels(&cancels);
        // Read under the lock: used when the mark says so, or a run is under way on it (its
        // mark may be on its way to disk; a mark is written right after its run's record).
        let used = desired
            .vms
            .values()
            .filter(|vm| vm.config.reset)
            .map(|vm| {
                let running = state
                    .records
                    .values()
                    .any(|r| r.vm == vm.name && r.phase.is_active());
                (vm.name.clone(), running || self.status.is_used(&vm.name))
            })
            .collect();
        state.used_since_reset = used;
        state.idle = desired.idle.keys().cloned().collect();
        state.now = DecidedAt::now();
        state.vault = vault;
        state.sync(desired, running);
        // Results a killed fleet had not checked yet (queued by `open`), now that the
        // tasks' pushes are known.
        let due = std::mem::take(&mut state.results_due);
        drop(state);
        for (name, run) in due {
            self.collect_results(&name, &run);
        }
    }

    fn lock(&self) -> BookGuard<'_> {
        BookGuard {
            book: self,
            state: Some(self.state.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// The egress policy of `vm` now, or `None` when it has no brokered egress.
    pub fn egress_policy(&self, vm: &str) -> Option<Arc<crate::egress::Policy>> {
        self.lock().egress.get(vm).cloned()
    }

    /// The value of `credential` (of `vm`'s policy now), for the broker to write upstream;
    /// or why there is none. It never leaves the host's memory, and is wiped when dropped.
    pub fn egress_credential(
        &self,
        vm: &str,
        credential: &crate::egress::Credential,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        use secrecy::ExposeSecret;
        let state = self.lock();
        let current = state
            .egress
            .get(vm)
            .is_some_and(|p| p.credentials.contains(credential));
        if !current {
            return Err("the VM's egress credentials changed".into());
        }
        match state.vault.value(&credential.secret, &credential.key) {
            Some(value) => Ok(zeroize::Zeroizing::new(value.expose_secret().to_vec())),
            None => Err(state
                .vault
                .problem(&credential.secret, &credential.key)
                .map_or_else(
                    || {
                        format!(
                            "secret {}/{} is not defined",
                            credential.secret, credential.key
                        )
                    },
                    str::to_owned,
                )),
        }
    }

    /// Whether a connection `vm`'s guest says run `guest_task` made may go ahead: its run's
    /// budget (`BookState::egress_admit`).
    pub fn egress_admit(
        &self,
        vm: &str,
        guest_task: Option<&str>,
    ) -> Result<crate::broker::Admitted, String> {
        let mut state = self.lock();
        state.now = DecidedAt::now();
        state.egress_admit(vm, guest_task)
    }

    /// A connection of `vm`'s ended: it goes into the run of the task the guest named (if
    /// that is a run of this VM's), its `egress.jsonl` and its totals.
    pub fn egress_used(&self, vm: &str, used: crate::broker::Used) {
        let mut state = self.lock();
        state.now = DecidedAt::now();
        state.egress_used(vm, used);
    }

    /// The broker refused a destination of `vm`'s: an `egress.denied` event.
    pub fn egress_denied(&self, vm: &str, message: String) {
        let mut state = self.lock();
        let revision = state.revision.clone();
        state.effects.events.push(Event::task(
            EventKind::EgressDenied,
            None,
            Some(vm),
            revision,
            format!("{vm}: {message}"),
        ));
    }

    pub fn records(&self) -> BTreeMap<String, TaskRecord> {
        self.lock().records.clone()
    }

    pub fn prompts(&self) -> BTreeMap<String, PromptRecord> {
        self.lock().prompts.clone()
    }
}

/// One VM's side of the book, as its link's broker asks for it.
pub struct VmEgress {
    pub book: Arc<TaskBook>,
    pub vm: String,
    /// Where connections are counted for `/metrics`, when there is a page.
    pub metrics: Option<Arc<crate::http::metrics::Metrics>>,
}

impl crate::broker::Host for VmEgress {
    fn policy(&self) -> Option<Arc<crate::egress::Policy>> {
        self.book.egress_policy(&self.vm)
    }
    fn credential(
        &self,
        credential: &crate::egress::Credential,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        self.book.egress_credential(&self.vm, credential)
    }
    fn admit(&self, task: Option<&str>) -> Result<crate::broker::Admitted, String> {
        self.book.egress_admit(&self.vm, task)
    }
    fn denied(&self, why: String) {
        self.book.egress_denied(&self.vm, why);
    }
    fn used(&self, used: crate::broker::Used) {
        if let Some(metrics) = &self.metrics {
            metrics.count_egress(&self.vm, &used);
        }
        self.book.egress_used(&self.vm, used);
    }
}

impl BookState {
    /// The run of `vm` the guest calls `guest_task`, and whether it is still running.
    fn run_named(&self, vm: &str, guest_task: &str) -> Option<(String, bool)> {
        self.records
            .values()
            .find(|r| r.vm == vm && r.guest_task() == guest_task)
            .map(|r| (r.name.clone(), r.phase.is_active()))
    }

    /// What run `name` has used as its budget counts it: its finished connections, those
    /// admitted and still open, bytes, tokens and unread answers.
    fn spent(&self, name: &str) -> crate::egress::Spent {
        let sums = self.records[name].egress.clone().unwrap_or_default();
        let open = self.egress_open.get(name).copied().unwrap_or(0);
        crate::egress::Spent {
            connections: (sums.connections - sums.refused).saturating_add(open),
            bytes: sums.bytes_up.saturating_add(sums.bytes_down),
            tokens: sums.tokens_in.saturating_add(sums.tokens_out),
            unread: sums.tokens_unread,
        }
    }

    /// The budget of run `name` of `vm`: its loadout's, narrowed by its task's.
    fn budget_of(&self, vm: &str, name: &str) -> Option<crate::egress::Budget> {
        crate::egress::Budget::narrowed(
            self.egress.get(vm).and_then(|p| p.budget),
            self.desired
                .get(name)
                .and_then(|t| t.egress.as_ref())
                .and_then(|n| n.budget),
        )
    }

    /// A connection may go ahead unless its run's budget is spent, or a budget applies and
    /// it names no running run of the VM. The first refusal of a spent run asks a human,
    /// with a budget prompt, whether to allow more. An admitted connection counts against
    /// the connection budget while it is open, and is checked against its task's own
    /// rules too (a connection that names no run is held to the VM's rules only: a task's
    /// rules narrow what an honest agent does, the VM's bound what any process can).
    fn egress_admit(
        &mut self,
        vm: &str,
        guest_task: Option<&str>,
    ) -> Result<crate::broker::Admitted, String> {
        let run = guest_task
            .and_then(|t| self.run_named(vm, t))
            .filter(|(_, running)| *running)
            .map(|(name, _)| name);
        let admitted = crate::broker::Admitted {
            narrowed: run
                .as_ref()
                .and_then(|name| self.desired.get(name))
                .and_then(|t| t.egress.as_ref())
                .map(|n| n.rules.clone())
                .unwrap_or_default(),
        };
        let budget = match &run {
            Some(name) => self.budget_of(vm, name),
            None => self.egress.get(vm).and_then(|p| p.budget),
        };
        let Some(budget) = budget else {
            return Ok(admitted);
        };
        let Some(name) = run else {
            return Err(format!(
                "the runs of VM {vm} have an egress budget, and this connection names none of them that runs (the agent names a run by the user its process runs as)"
            ));
        };
        let sums = self.records[&name].egress.clone().unwrap_or_default();
        let Some(over) = budget.exhausted(self.spent(&name), sums.granted) else {
            *self.egress_open.entry(name).or_default() += 1;
            return Ok(admitted);
        };
        let used = over.describe(&name);
        if sums.budget_refused {
            return Err(format!("{used}; a human declined to allow more"));
        }
        match sums
            .budget_prompt
            .or_else(|| self.ask_for_budget(&name, &used, &over))
        {
            Some(id) => Err(format!(
                "{used}; answer prompt {id} with yes to allow {}",
                over.offer()
            )),
            None => Err(format!(
                "{used}; the run has had {} prompts, the most it may",
                limits::PROMPTS
            )),
        }
    }

    /// Records a new pending prompt of `record`'s run (counted in its `prompts`), with the
    /// deadline its task gives, and its event; returns its id. The caller checks
    /// `limits::PROMPTS` and says what the prompt holds up.
    fn raise_prompt(
        &mut self,
        record: &TaskRecord,
        kind: crate::status::tasks::PromptKind,
        text: String,
        context: Vec<String>,
        options: Vec<String>,
    ) -> String {
        let n = record.prompts + 1;
        let id = crate::ids::PromptId {
            task: record.name.clone(),
            run: record.run.clone(),
            n,
        }
        .to_string();
        let task = self.desired.get(&record.name);
        let deadline = task.map_or(crate::resolve::DEFAULT_PROMPT_DEADLINE, |t| {
            t.prompt_deadline
        });
        let prompt = PromptRecord {
            id: id.clone(),
            kind,
            // Only what is typed into the task's terminal may hold control characters.
            allow_control: kind == crate::status::tasks::PromptKind::Input
                && task.is_some_and(|t| t.allow_control),
            task: record.name.clone(),
            vm: record.vm.clone(),
            text: text.clone(),
            context,
            options,
            guest_seq: None,
            created: self.now.wall.into(),
            deadline: (self.now.wall + deadline).into(),
            state: PromptState::Pending,
            overdue: false,
            response: None,
            answered_by: None,
            answered_at: None,
            delivered: false,
            refused: Vec::new(),
        };
        self.prompts.insert(id.clone(), prompt);
        self.prompt_changed(&id);
        self.update(&record.name, |r| r.prompts = n);
        self.event(
            record,
            EventKind::HitlPrompt,
            format!("prompt {id} waits for an answer: {text}"),
        );
        id
    }

    /// Raises the budget prompt of run `name`; returns its id, or `None` when the run has
    /// had `limits::PROMPTS` prompts already.
    fn ask_for_budget(
        &mut self,
        name: &str,
        used: &str,
        over: &crate::egress::Exhausted,
    ) -> Option<String> {
        let record = self.records[name].clone();
        if record.prompts >= limits::PROMPTS {
            return None;
        }
        let text = format!("{used}; allow {}? (yes/no)", over.offer());
        // Its deadline is shown, never enforced: the run's connections are refused while it
        // waits, and its own timeout still applies.
        let id = self.raise_prompt(
            &record,
            crate::status::tasks::PromptKind::Budget,
            text,
            Vec::new(),
            Vec::new(),
        );
        self.update(name, |r| {
            r.egress.get_or_insert_with(Default::default).budget_prompt = Some(id.clone());
        });
        Some(id)
    }

    /// A connection ended: it counts for the run it names if that run is still running,
    /// or was when the connection was admitted.
    fn egress_used(&mut self, vm: &str, used: crate::broker::Used) {
        let named = used.task.as_deref().and_then(|t| self.run_named(vm, t));
        let Some((name, _)) = named.filter(|(_, running)| *running || used.admitted) else {
            tracing::debug!(vm, "a connection named no running task of this VM's");
            return;
        };
        if used.admitted
            && let Some(open) = self.egress_open.get_mut(&name)
        {
            *open = open.saturating_sub(1);
        }
        let used_allowed = used.allowed();
        let tokens = used.tokens.map(|m| m.tokens);
        let unread = used.tokens.and_then(|m| m.unreadable);
        let line = crate::status::tasks::EgressLine {
            time: used.started.into(),
            destination: used.destination,
            rule: used.rule,
            status: used.status,
            bytes_up: used.bytes_up,
            bytes_down: used.bytes_down,
            tokens_in: tokens.map(|t| t.input),
            tokens_out: tokens.map(|t| t.output),
            tokens_unread: unread.map(str::to_owned),
            millis: u64::try_from(used.duration.as_millis()).unwrap_or(u64::MAX),
        };
        let mut logged = true;
        self.update(&name, |r| {
            let sums = r.egress.get_or_insert_with(Default::default);
            logged = sums.connections < limits::EGRESS_LINES;
            sums.connections = sums.connections.saturating_add(1);
            sums.not_logged += u64::from(!logged);
            // What the broker refused (no rule, or over budget) moved only its answer, and
            // counts against no budget.
            if !used_allowed {
                sums.refused += 1;
                return;
            }
            sums.bytes_up = sums.bytes_up.saturating_add(line.bytes_up);
            sums.bytes_down = sums.bytes_down.saturating_add(line.bytes_down);
            sums.tokens_in = sums.tokens_in.saturating_add(line.tokens_in.unwrap_or(0));
            sums.tokens_out = sums.tokens_out.saturating_add(line.tokens_out.unwrap_or(0));
            sums.tokens_unread += u64::from(line.tokens_unread.is_some());
        });
        if logged {
            let mut bytes = serde_json::to_vec(&line).expect("an egress line is JSON");
            bytes.push(b'\n');
            self.effects.egress.push((name, bytes));
        }
    }

    /// Takes a new desired state: new runs become `Pending`, runs that cannot go on are
    /// finished. `running` are the VMs that run now. Runs on running VMs whose task was
    /// removed or changed are cancelled by that VM's runner.
    fn sync(&mut self, desired: &Desired, running: &BTreeSet<String>) {
        self.desired = desired.tasks.clone();
        self.fresh_pools = desired.fresh_pools.clone();
        self.place_fresh_tasks();
        self.egress = desired
            .egress
            .iter()
            .map(|(vm, policy)| (vm.clone(), Arc::new(policy.clone())))
            .collect();
        self.bound = self.vault.bind(&self.desired);
        self.vm_mounts = desired
            .vms
            .values()
            .filter(|vm| !vm.config.workspaces.is_empty())
            .map(|vm| {
                let mounts: Vec<fleet_agent_protocol::Mount> = vm
                    .config
                    .workspaces
                    .iter()
                    .map(|m| fleet_agent_protocol::Mount {
                        serial: crate::resolve::workspace_serial(&m.name),
                        path: m.mount_path.clone(),
                        label: m.label.clone(),
                    })
                    .collect();
                let digest = crate::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                    serde_json::to_vec(&mounts).unwrap_or_default(),
                ));
                (vm.name.clone(), (digest, mounts))
            })
            .collect();
        self.vm_secrets = desired
            .vms
            .values()
            .filter(|vm| !vm.secrets.is_empty())
            .map(|vm| (vm.name.clone(), vm.secrets.clone()))
            .collect();
        self.answers = desired.answers.clone();
        self.approvers = desired.approvers.clone();
        self.revision = Some(desired.revision.id.clone());
        self.report_undeliverable_answers();
        let names: BTreeSet<String> = self
            .records
            .keys()
            .chain(self.desired.keys())
            .cloned()
            .collect();
        for name in names {
            let want = self.desired.get(&name).cloned();
            let record = self.records.get(&name).cloned();
            match (want, record) {
                (Some(task), None) => self.new_run(&task, 1, running),
                // A task whose secret cannot be opened has no reliable hash: its run stays
                // as it is (a finished run is not redone, a pending one says why it waits).
                (Some(task), Some(r))
                    if self.held(&task).is_some() && r.spec_hash != self.run_hash(&task) =>
                {
                    if r.phase == TaskPhase::Pending {
                        let message = waiting_message(&task, self.held(&task), running);
                        if r.message.as_deref() != Some(&message) {
                            self.update(&name, |r| r.message = Some(message));
                        }
                    }
                }
                // A run that never started takes the new spec in place.
                (Some(task), Some(r))
                    if r.spec_hash != self.run_hash(&task) && r.phase == TaskPhase::Pending =>
                {
                    self.new_run(&task, r.generation, running);
                }
                (Some(task), Some(r)) if r.spec_hash != self.run_hash(&task) => {
                    if r.phase.is_active() && running.contains(&r.vm) {
                        continue; // The runner cancels it; the new run follows.
                    }
                    if !r.phase.is_finished() {
                        self.finish(
                            &name,
                            TaskPhase::Cancelled,
                            None,
                            "its spec changed before it finished",
                        );
                    }
                    self.new_run(&task, r.generation + 1, running);
                }
                (Some(task), Some(r)) => {
                    if r.phase.is_active() && !running.contains(&r.vm) {
                        self.finish(
                            &name,
                            TaskPhase::Failed,
                            None,
                            &format!(
                                "VM {} stopped while the task ran; bump rerun to run it again",
                                r.vm
                            ),
                        );
                    } else if r.phase.is_active()
                        && running_for(&r, self.now.wall)
                            .is_some_and(|t| t > task.timeout + 2 * runner::HOST_TIMEOUT_GRACE)
                    {
                        // The link thread cancels overdue runs; this catches runs whose
                        // agent is not even connected.
                        self.finish(&name,
                            TaskPhase::TimedOut,
                            None,
                            "ran past its timeout while its agent was unreachable; fleet stopped tracking it",
                        );
                    } else if r.phase == TaskPhase::Pending
                        // A fresh run waiting for a member: `assign_waiting_members` says why.
                        && !(r.fresh.is_some() && r.vm.is_empty() && self.held(&task).is_none())
                    {
                        let message = waiting_message(&task, self.held(&task), running);
                        if r.message.as_deref() != Some(&message) {
                            self.update(&name, |r| r.message = Some(message));
                        }
                    }
                }
                (None, Some(r)) => {
                    let gone = r.phase == TaskPhase::Pending
                        || (r.phase.is_active() && !running.contains(&r.vm));
                    if gone {
                        self.finish(
                            &name,
                            TaskPhase::Cancelled,
                            None,
                            "its task file was removed",
                        );
                    }
                }
                (None, None) => {}
            }
        }
        self.assign_waiting_members();
        self.place_fresh_tasks();
    }

    /// Points each fresh task at the member its current run holds (or its pool's name while
    /// the run waits for one), so everything that matches a task to a VM's link sees it.
    fn place_fresh_tasks(&mut self) {
        for task in self.desired.values_mut() {
            let Some(fresh) = &task.fresh else { continue };
            task.vm = self
                .records
                .get(&task.name)
                .filter(|r| r.fresh.is_some() && !r.vm.is_empty())
                .map_or_else(|| fresh.pool.clone(), |r| r.vm.clone());
        }
    }

    /// A member for a new fresh run: an idle warm one, a new one, or why it waits.
    fn member_for(&mut self, pool: &str) -> Result<String, String> {
        let Some(settings) = self.fresh_pools.get(pool) else {
            return Err(format!(
                "waiting for pool {pool}, which this revision does not define"
            ));
        };
        let runs: Vec<crate::lifecycle::FreshRun> = self
            .records
            .values()
            .flat_map(TaskRecord::fresh_runs)
            .collect();
        let idle = self.members.idle.entry(pool.to_owned()).or_default();
        // Never a member a record still names (a kept or ended run's).
        idle.retain(|m| !runs.iter().any(|r| r.member.as_deref() == Some(m)));
        let seen = runs
            .iter()
            .filter_map(|r| crate::lifecycle::member_seq(pool, r.member.as_deref()?))
            .max()
            .map_or(1, |s| s + 1);
        let next = self.members.next.entry(pool.to_owned()).or_insert(1);
        *next = (*next).max(seen);
        let now = Timestamp::from(self.now.wall);
        crate::lifecycle::assign(pool, settings, &runs, idle, next, now)
    }

    /// Fresh runs waiting for a member get one, oldest first, as places free up.
    fn assign_waiting_members(&mut self) {
        if self.suspended {
            return;
        }
        let mut waiting: Vec<(Option<Timestamp>, String, String)> = self
            .records
            .values()
            .filter(|r| r.phase == TaskPhase::Pending && r.vm.is_empty())
            // A run that cannot start (a secret that does not open) takes no place.
            .filter(|r| {
                self.desired
                    .get(&r.name)
                    .is_none_or(|t| self.held(t).is_none())
            })
            .filter_map(|r| Some((r.created, r.name.clone(), r.fresh.as_ref()?.pool.clone())))
            .collect();
        waiting.sort();
        for (_, name, pool) in waiting {
            match self.member_for(&pool) {
                Ok(member) => {
                    let message = format!("waiting for VM {member} to run");
                    self.update(&name, |r| {
                        r.vm = member;
                        r.message = Some(message);
                    });
                    self.effects.plan_again = true;
                    if let Some(r) = self.records.get(&name).cloned() {
                        let text = format!(
                            "run {} of task {} was given the fresh member {}",
                            r.run, r.name, r.vm
                        );
                        self.event(&r, EventKind::TaskPending, text);
                    }
                }
                Err(why) => {
                    if self
                        .records
                        .get(&name)
                        .is_some_and(|r| r.message.as_deref() != Some(&why))
                    {
                        self.update(&name, |r| r.message = Some(why));
                    }
                }
            }
        }
    }

    fn new_run(&mut self, task: &DesiredTask, generation: u32, running: &BTreeSet<String>) {
        let time = self.stamp();
        // A fresh run waits (`vm` empty) until `assign_waiting_members` gives it a member;
        // a pending run taking a new spec keeps the member it was given.
        let previous = self.records.get(&task.name);
        let kept = previous.filter(|r| {
            r.phase == TaskPhase::Pending
                && r.fresh.as_ref().map(|f| &f.pool) == task.fresh.as_ref().map(|f| &f.pool)
        });
        let vm = match (&task.fresh, kept) {
            (Some(_), Some(r)) => r.vm.clone(),
            (Some(_), None) => String::new(),
            (None, _) => task.vm.clone(),
        };
        let earlier_members = earlier_members(previous, kept.is_some(), self.now.wall);
        let record = TaskRecord {
            name: task.name.clone(),
            vm,
            fresh: task
                .fresh
                .as_ref()
                .map(|f| crate::status::tasks::FreshRecord {
                    pool: f.pool.clone(),
                    keep_for_secs: f.keep_for.as_secs(),
                }),
            earlier_members,
            generation,
            run: run_id(self.run_hash(task), generation),
            spec_hash: self.run_hash(task).to_owned(),
            task_hash: Some(task.spec_hash.clone()),
            rerun: task.rerun,
            phase: TaskPhase::Pending,
            message: Some(waiting_message(task, self.held(task), running)),
            source: task.source.clone(),
            revision: self.revision.clone(),
            created: time,
            started: None,
            finished: None,
            boot_id: None,
            exit_code: None,
            repository: None,
            results: None,
            seq: 0,
            output_bytes: 0,
            output_truncated: false,
            artifact_bytes: 0,
            artifact_files: 0,
            refused: Vec::new(),
            egress: None,
            prompts: 0,
            pending_prompt: None,
            artifacts: Vec::new(),
            fail_on_cancel: None,
            cancelled_by: None,
            host_timeout: false,
            updated: time,
        };
        self.effects.resets.push(task.name.clone());
        if self.used_since_reset.contains_key(&record.vm) || self.idle.contains(&record.vm) {
            self.effects.plan_again = true;
        }
        self.event(
            &record,
            EventKind::TaskPending,
            format!(
                "run {} of task {} is due on {}",
                record.run, record.name, record.vm
            ),
        );
        self.records.insert(task.name.clone(), record);
        self.record_changed(&task.name);
    }

    /// Changes a record and writes it.
    fn update(&mut self, name: &str, change: impl FnOnce(&mut TaskRecord)) {
        let at = self.stamp();
        if let Some(record) = self.records.get_mut(name) {
            change(record);
            record.updated = at;
            self.record_changed(name);
        }
    }

    /// Ends a run: its phase, exit code and why; a pending prompt is withdrawn.
    /// Cancels from the host (`fleet task cancel`): a run that has not started ends at once;
    /// one under way is marked, and its link stops it (`tick`), ending it `Cancelled`.
    fn apply_host_cancels(&mut self, cancels: &BTreeMap<String, HostCancel>) {
        for (task, cancel) in cancels {
            let Some(record) = self.records.get(task) else {
                continue;
            };
            if record.run != cancel.run
                || record.phase.is_finished()
                || record.cancelled_by.is_some()
            {
                continue;
            }
            let by = format!("{} at {}", cancel.by, cancel.at);
            if record.phase == TaskPhase::Pending {
                self.finish(
                    task,
                    TaskPhase::Cancelled,
                    None,
                    &format!("cancelled from the host by {by}"),
                );
            } else {
                self.update(task, |r| r.cancelled_by = Some(by));
            }
        }
    }

    fn finish(&mut self, name: &str, phase: TaskPhase, exit_code: Option<i32>, message: &str) {
        let Some(record) = self.records.get(name).cloned() else {
            return;
        };
        let budget_prompt = record
            .egress
            .as_ref()
            .and_then(|e| e.budget_prompt.as_ref());
        for id in record.pending_prompt.iter().chain(budget_prompt) {
            self.set_prompt(id, |p| p.state = PromptState::Withdrawn);
        }
        let finished = self.stamp();
        if (record.fresh.is_some() && !record.vm.is_empty())
            || self.used_since_reset.contains_key(&record.vm)
            || self.idle.contains(&record.vm)
        {
            self.effects.plan_again = true;
        }
        self.update(name, |r| {
            r.phase = phase;
            r.exit_code = exit_code;
            r.message = Some(message.to_owned());
            r.finished = finished;
            r.pending_prompt = None;
            if let Some(egress) = &mut r.egress {
                egress.budget_prompt = None;
            }
        });
        if let Some(r) = self.records.get(name).cloned() {
            self.event(
                &r,
                EventKind::TaskFinished,
                format!("task {name} {}: {message}", phase.as_str()),
            );
        }
    }

    fn set_prompt(&mut self, id: &str, change: impl FnOnce(&mut PromptRecord)) {
        if let Some(prompt) = self.prompts.get_mut(id) {
            change(prompt);
            self.prompt_changed(id);
        }
    }

    /// A committed answer for a prompt that does not exist, or that someone else already
    /// answered, is reported (once) and never delivered.
    fn report_undeliverable_answers(&mut self) {
        let answers: Vec<(String, CommittedAnswer)> = self
            .answers
            .iter()
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        for (id, answer) in answers {
            let why = match self.prompts.get(&id) {
                None => format!(
                    "{} answers {id}, which is no prompt fleet knows; it is not delivered",
                    answer.source
                ),
                Some(p)
                    if p.state != PromptState::Pending
                        && !p
                            .answered_by
                            .as_deref()
                            .is_some_and(|by| by.contains(&answer.source)) =>
                {
                    format!(
                        "{} answers {id}, which is {}; it is not delivered",
                        answer.source,
                        match &p.answered_by {
                            Some(by) => format!("already answered by {by}"),
                            None => format!("{:?}", p.state).to_lowercase(),
                        }
                    )
                }
                Some(_) => continue,
            };
            if !self
                .reported_answers
                .insert((id.clone(), answer.source.clone()))
            {
                continue;
            }
            if self.prompts.contains_key(&id) {
                self.set_prompt(&id, |p| {
                    if !p.refused.contains(&why) {
                        p.refused.push(why.clone());
                    }
                });
            }
            let event = Event::fleet(EventKind::HitlAnswerIgnored, self.revision.clone(), why);
            self.effects.events.push(event);
        }
    }

    fn event(&mut self, record: &TaskRecord, kind: EventKind, message: String) {
        let event = Event::task(
            kind,
            Some(&record.name),
            Some(&record.vm),
            record.revision.clone(),
            message,
        );
        self.effects.events.push(event);
    }
}

/// The members earlier runs of a task hold or held, for its new run's record: the
/// previous run's (unless the new run keeps it) until its `keepFor` is over, and the ones
/// its record carried: every one still held, and the latest `EARLIER_MEMBERS` of the
/// others for a day past their time (so a member whose destroy is late is still never
/// taken for a warm one).
fn earlier_members(
    previous: Option<&TaskRecord>,
    kept: bool,
    now: SystemTime,
) -> Vec<crate::status::tasks::EarlierMember> {
    const EARLIER_MEMBERS: usize = 8;
    let Some(previous) = previous else {
        return Vec::new();
    };
    let day_ago = now - std::time::Duration::from_secs(24 * 3600);
    // Held ones are always carried; of those whose time is over, the latest few, for a day.
    let (held, over): (Vec<_>, Vec<_>) = previous
        .earlier_members
        .iter()
        .filter(|m| m.until.system_time() > day_ago)
        .cloned()
        .partition(|m| m.until.system_time() > now);
    let mut earlier = held;
    earlier.extend(over.into_iter().take(EARLIER_MEMBERS));
    if let Some(run) = previous.fresh_run().filter(|_| !kept)
        && let Some(name) = run.member
    {
        // A run that never started leaves its member unused: it holds no place.
        let ended = match previous.phase {
            TaskPhase::Pending => now - run.keep_for,
            _ => run.finished.map_or(now, |t| t.system_time()),
        };
        earlier.insert(
            0,
            crate::status::tasks::EarlierMember {
                pool: run.pool,
                name,
                until: Timestamp::from(ended + run.keep_for),
            },
        );
    }
    earlier
}

fn waiting_message(task: &DesiredTask, held: Option<&str>, running: &BTreeSet<String>) -> String {
    if let Some(held) = held {
        held.to_owned()
    } else if let Some(fresh) = task.fresh.as_ref().filter(|f| f.pool == task.vm) {
        format!("waiting for a fresh member of pool {}", fresh.pool)
    } else if running.contains(&task.vm) {
        format!("waiting for the agent in VM {}", task.vm)
    } else {
        format!("waiting for VM {} to run", task.vm)
    }
}

/// For the tests: the real git in `dir`, with `config` (`key=value` pairs, as `-c`), which
/// must succeed; its output, trimmed.
#[cfg(test)]
fn run_git(dir: &std::path::Path, config: &[&str], args: &[&str]) -> String {
    let mut command = std::process::Command::new("git");
    for pair in config {
        command.args(["-c", pair]);
    }
    let out = command
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[cfg(test)]
mod decision_tests;
#[cfg(test)]
mod tests;
