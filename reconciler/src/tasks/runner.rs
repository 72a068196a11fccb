//! The part of the task book each VM's agent link drives: dispatch, re-attach, cancel,
//! answers and deadlines (`tick`), and recording what the guest sends (`receive`).
//! The decisions are `BookState`'s; `TaskBook`'s methods of the same names are the
//! executor's entries (see `tasks`). They return the messages to send; the link thread
//! sends them and reports back with `sent`, so "delivered" is only ever recorded for what
//! reached the link.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use fleet_agent_protocol::{ExitReason, GuestMessage, HostMessage, VERSION};

use super::{BookState, DecidedAt, HostFiles, TaskBook, limits};
use crate::answer::answer_problem;
use crate::hitl::answer_and_author;
use crate::ids::ApprovalId;
use crate::resolve::DesiredTask;
use crate::spec::{OnDeadline, Repository};
use crate::status::tasks::{
    PromptKind, PromptRecord, PromptState, RepositoryAt, TaskPhase, TaskRecord, answer_file_name,
};
use crate::status::{Event, EventKind};

/// Where tasks run in the guest, and where their repository archive is put.
const GUEST_WORK: &str = "/run/fleet/tasks";
const GUEST_STAGE: &str = "/run/fleet/stage";
/// Parts of a put file, in bytes before base64 (the line limit is 1 MiB).
const PUT_PART_BYTES: usize = 512 * 1024;
/// A repository not confirmed stored by then is shipped again.
const STAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Without a watcher on `status/hitl/`, stray host answer files are looked for this often.
pub(super) const ANSWER_SCAN: Duration = Duration::from_millis(500);
/// How long past its timeout a run may go before fleet cancels it itself (the agent enforces
/// the timeout; this is the safety net for an agent that did not), and again before fleet
/// gives up on the run when even the cancel is not answered.
pub(super) const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// One VM's link, as the task book sees it.
pub struct Connection {
    pub vm: String,
    /// The guest's boot, from its last hello; nothing is dispatched before one.
    boot_id: Option<String>,
    /// Tasks re-attached or started on this connection.
    attached: BTreeSet<String>,
    cancel_sent: BTreeSet<String>,
    staging: Option<Staging>,
    /// The digest of the secret set the guest holds (from its hello, then its
    /// `SecretsStored`), and of the last set sent on this connection.
    guest_secrets: Option<String>,
    secrets_sent: Option<String>,
    /// The digest of the workspace set the guest mounted on this connection, and of the
    /// last set sent.
    guest_mounts: Option<String>,
    mounts_sent: Option<String>,
}

struct Staging {
    task: String,
    path: String,
    since: Instant,
}

/// A repository to fetch and ship before the task can start (done outside the book's lock).
pub struct StageJob {
    task: String,
    guest_task: String,
    repository: Repository,
    checkout: super::repo::Checkout,
}

impl Connection {
    pub fn new(vm: &str) -> Connection {
        Connection {
            vm: vm.to_owned(),
            boot_id: None,
            attached: BTreeSet::new(),
            cancel_sent: BTreeSet::new(),
            staging: None,
            guest_secrets: None,
            secrets_sent: None,
            guest_mounts: None,
            mounts_sent: None,
        }
    }

    /// The agent greeted (a new connection, or the guest restarted): everything is looked
    /// at again.
    pub fn greeted(&mut self, boot_id: &str, secrets: Option<&str>) {
        self.boot_id = Some(boot_id.to_owned());
        self.attached.clear();
        self.cancel_sent.clear();
        self.staging = None;
        self.guest_secrets = secrets.map(str::to_owned);
        self.secrets_sent = None;
        // Sent again after every hello: mounting what is mounted is nothing.
        self.guest_mounts = None;
        self.mounts_sent = None;
    }
}

/// `vm_files`: the file targets of the VM's loadout references, which every run of the VM
/// may read beside its own.
fn run_task(
    task: &DesiredTask,
    record: &TaskRecord,
    boot_id: &str,
    vm_files: &[String],
    egress: Option<&crate::egress::Policy>,
) -> HostMessage {
    let mut secret_files: Vec<String> = vm_files.to_vec();
    secret_files.extend(task.secrets.iter().filter_map(|r| r.file.clone()));
    secret_files.sort();
    secret_files.dedup();
    let mut env = task.env.clone();
    env.entry("TERM".into())
        .or_insert_with(|| "xterm-256color".into());
    env.insert("FLEET_TASK".into(), task.name.clone());
    env.insert("FLEET_VM".into(), task.vm.clone());
    if let Some(policy) = egress {
        // Every connection goes through the agent's proxy to the host's broker; the VM has
        // no other way out. APIs whose key the broker adds are reached in plain HTTP at the
        // proxy, with placeholder keys (the task's own settings win).
        for (name, value) in crate::egress::api_environment(&policy.credentials) {
            env.entry(name).or_insert(value);
        }
        let proxy = format!("http://{}", fleet_agent_protocol::stream::PROXY_ADDRESS);
        for name in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            env.insert(name.into(), proxy.clone());
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.insert(name.into(), "localhost,127.0.0.1,::1".into());
        }
    }
    // A run on a checkout sends back what it changed there (`tasks::results`).
    let results = record
        .repository
        .as_ref()
        .map(|at| fleet_agent_protocol::RunResults {
            base: at.commit.clone(),
            branch: format!("fleet/{}", task.name),
            message: format!("fleet: what task {} left in its checkout", task.name),
        });
    HostMessage::RunTask {
        v: VERSION,
        task: record.guest_task(),
        argv: task.argv.clone(),
        boot_id: Some(boot_id.to_owned()),
        env,
        cwd: Some(format!("{GUEST_WORK}/{}", task.name)),
        timeout_secs: Some(task.timeout.as_secs().max(1)),
        artifacts: task.artifacts.clone(),
        prompt_patterns: task.prompt_patterns.clone(),
        secret_env: task
            .secrets
            .iter()
            .filter_map(|r| Some((r.env.clone()?, super::secret_path(r))))
            .collect(),
        secret_files,
        results,
    }
}

impl TaskBook {
    /// What to send now on `conn`, and a repository to stage, if a task needs one (see
    /// `BookState::tick`). The host's answer files are read first, without the lock.
    pub fn tick(&self, conn: &mut Connection) -> (Vec<HostMessage>, Option<StageJob>) {
        let files = self.host_files(&conn.vm);
        let mut state = self.lock();
        state.now = DecidedAt::now();
        state.tick(conn, &files)
    }

    /// Fetches the job's repository (without the lock) and returns the parts to put into
    /// the guest. A fetch that fails fails the run.
    pub fn stage(&self, conn: &mut Connection, job: StageJob) -> Vec<HostMessage> {
        let fetched = self
            .repository_credential(&job.repository)
            .and_then(|credential| {
                super::repo::fetch_archive(
                    &self.cache_dir,
                    &self.repo_root,
                    &job.repository,
                    &job.checkout,
                    &super::repo::Access {
                        credential: credential.as_ref(),
                        git: &self.git,
                        fleet: &self.fleet_exe,
                    },
                )
            });
        let mut state = self.lock();
        state.now = DecidedAt::now();
        state.staged(conn, job, fetched)
    }

    /// The value of a repository's `credentials`, from the vault (a copy wiped on drop).
    fn repository_credential(
        &self,
        repository: &Repository,
    ) -> Result<Option<super::remote::Credential>, super::repo::RepoError> {
        self.git_credential(&repository.url, repository.credentials.as_ref())
    }

    /// The value of the credential `c` for `url`, from the vault.
    fn git_credential(
        &self,
        url: &str,
        c: Option<&crate::spec::RepositoryCredentials>,
    ) -> Result<Option<super::remote::Credential>, super::repo::RepoError> {
        use secrecy::ExposeSecret;
        let Some(c) = c else {
            return Ok(None);
        };
        let state = self.lock();
        match state.vault.value(&c.secret.0, &c.key.0) {
            Some(value) => Ok(Some(super::remote::Credential {
                username: c.username.clone(),
                secret: zeroize::Zeroizing::new(value.expose_secret().to_vec()),
            })),
            None => Err(super::repo::RepoError::Credential {
                url: url.to_owned(),
                problem: state.vault.problem(&c.secret.0, &c.key.0).map_or_else(
                    || format!("secret {}/{} is not defined", c.secret.0, c.key.0),
                    str::to_owned,
                ),
            }),
        }
    }

    /// Records what the guest sent; returns the acknowledgements (and a `RunTask` when a
    /// staged repository was confirmed) once what they acknowledge is on disk: the output
    /// and artifacts are written and synced after the lock is released (so other VMs'
    /// links and the daemon are not held up by this one's disk), in this hold's turn,
    /// which comes after every earlier hold's.
    pub fn receive(&self, conn: &mut Connection, messages: Vec<GuestMessage>) -> Vec<HostMessage> {
        let mut state = self.lock();
        state.now = DecidedAt::now();
        let out = state.receive(conn, messages);
        let due = std::mem::take(&mut state.results_due);
        drop(state);
        // The bundles are on disk now (the hold's effects are made when it ends).
        for (name, run) in due {
            self.collect_results(&name, &run);
        }
        out
    }

    /// Checks the bundle a run sent back, without the lock (`tasks::results`, in a child
    /// process under limits): the change goes into `changes.patch`, a summary (or why it
    /// was refused) into the run's record, and the commits where `results.push` says.
    /// Only the run that sent it, and once: a new run or a second exit changes nothing.
    pub(super) fn collect_results(&self, name: &str, run: &str) {
        use crate::status::tasks::RunChanges;
        let (at, push) = {
            let state = self.lock();
            let Some(record) = state.records.get(name).filter(|r| r.run == run) else {
                return;
            };
            let Some(at) = record.repository.clone() else {
                return;
            };
            let push = state.desired.get(name).and_then(|t| t.results_push.clone());
            (at, push)
        };
        let collected = (|| -> Result<RunChanges, String> {
            let bundle = self
                .status
                .read_artifact(
                    name,
                    fleet_agent_protocol::RESULTS_ARTIFACT,
                    super::results::MAX_BUNDLE_BYTES as u64,
                )
                .map_err(|e| format!("cannot read the run's bundle: {e}"))?;
            let cache = super::repo::open_cache(&self.cache_dir, &self.repo_root, &at.url)
                .map_err(|e| e.to_string())?;
            let push = match push {
                Some(target) => Some(super::results::PushTo {
                    url: super::repo::push_url(&self.repo_root, &target.url)
                        .map_err(|e| e.to_string())?,
                    credential: self
                        .git_credential(&target.url, target.credentials.as_ref())
                        .map_err(|e| e.to_string())?
                        .map(|c| super::results::PushCredential::new(c.username, &c.secret)),
                    branch: target
                        .branch
                        .unwrap_or_else(|| format!("fleet/{name}/{run}")),
                }),
                None => None,
            };
            let request = super::results::CheckRequest {
                cache_dir: cache,
                base: at.commit.clone(),
                branch: format!("fleet/{name}"),
                push,
                git: self.git.clone(),
            };
            let program = std::env::current_exe()
                .map_err(|e| format!("cannot find fleet's own program: {e}"))?;
            let checked = super::results::check_isolated(&program, &request, &bundle)?;
            if checked.changes.refused.is_none() {
                self.status
                    .write_changes_patch(name, checked.patch.as_bytes())
                    .map_err(|e| format!("cannot write changes.patch: {e}"))?;
            }
            Ok(checked.changes)
        })();
        let changes = collected.unwrap_or_else(|why| RunChanges {
            refused: Some(why),
            ..RunChanges::default()
        });
        let mut state = self.lock();
        state.now = DecidedAt::now();
        if state.records.get(name).is_some_and(|r| r.run == run) {
            state.update(name, |r| r.results = Some(changes));
        }
    }

    /// The link wrote these messages: answers among them are delivered.
    pub fn sent(&self, messages: &[HostMessage]) {
        self.lock().sent(messages);
    }
}

impl BookState {
    /// What to send now; and a repository to stage, if a task needs one.
    pub(super) fn tick(
        &mut self,
        conn: &mut Connection,
        files: &HostFiles,
    ) -> (Vec<HostMessage>, Option<StageJob>) {
        let mut out = Vec::new();
        self.apply_host_cancels(&files.cancels);
        let Some(boot) = conn.boot_id.clone() else {
            return (out, None);
        };
        // A new run as soon as the previous one of a changed task has ended, without
        // waiting for the daemon's next pass (not while suspended).
        let renewed: Vec<(DesiredTask, u32)> = self
            .desired
            .values()
            // A fresh task's next run gets a member of its own from the daemon's pass.
            .filter(|t| t.vm == conn.vm && t.fresh.is_none() && !self.suspended)
            .filter_map(|t| match self.records.get(&t.name) {
                None => Some((t.clone(), 1)),
                Some(r)
                    if r.spec_hash != self.run_hash(t)
                        && r.phase.is_finished()
                        && self.held(t).is_none() =>
                {
                    Some((t.clone(), r.generation + 1))
                }
                Some(_) => None,
            })
            .collect();
        for (task, generation) in renewed {
            self.new_run(&task, generation, &BTreeSet::from([conn.vm.clone()]));
        }
        let ours: Vec<String> = self
            .records
            .values()
            .filter(|r| r.vm == conn.vm)
            .map(|r| r.name.clone())
            .collect();

        for name in &ours {
            let record = self.records[name].clone();
            // A run cancelled from the host is not current: it is stopped like one whose
            // file changed.
            let current = record.cancelled_by.is_none()
                && self
                    .desired
                    .get(name)
                    .is_some_and(|t| self.run_hash(t) == record.spec_hash && t.vm == conn.vm);
            let staging_this = conn.staging.as_ref().is_some_and(|s| &s.task == name);
            if record.phase.is_active() && !conn.attached.contains(name) && !staging_this {
                // Re-attach after a reconnect, or find the run gone with its boot. A run
                // started just as the VM rebooted (before the link noticed) may never have
                // reached the guest; nothing tells the two apart, so neither is run again
                // unasked.
                if record.boot_id.as_deref() != Some(boot.as_str()) {
                    self.finish(name,
                        TaskPhase::Failed,
                        None,
                        &format!(
                            "VM {} restarted after the task was started on it (boot {} → {boot}), so it may not have run to its end; bump rerun to run it again",
                            conn.vm,
                            record.boot_id.as_deref().unwrap_or("unknown")
                        ),
                    );
                    continue;
                }
                if record.phase == TaskPhase::Staging {
                    match &record.cancelled_by {
                        Some(by) => self.finish(
                            name,
                            TaskPhase::Cancelled,
                            None,
                            &format!("cancelled from the host by {by} before it started"),
                        ),
                        None => self.update(name, |r| r.phase = TaskPhase::Pending),
                    }
                    continue;
                }
                conn.attached.insert(name.clone());
                // Marked again: a fleet killed between the run's record and its mark left
                // none, and the run is on the VM all the same.
                self.mark_used(&conn.vm);
                match self.desired.get(name).filter(|_| current) {
                    Some(task) => out.push(run_task(
                        task,
                        &record,
                        &boot,
                        &super::vm_secret_files(self, &conn.vm),
                        self.egress.get(&conn.vm).map(|p| &**p),
                    )),
                    None => {
                        conn.cancel_sent.insert(record.guest_task());
                        out.push(HostMessage::Cancel {
                            v: VERSION,
                            task: record.guest_task(),
                        });
                    }
                }
                continue;
            }
            if record.phase.is_active() && !current {
                if staging_this {
                    conn.staging = None;
                    let why = match &record.cancelled_by {
                        Some(by) => format!("cancelled from the host by {by} before it started"),
                        None => "its task file was removed or changed before it started".into(),
                    };
                    self.finish(name, TaskPhase::Cancelled, None, &why);
                } else if conn.cancel_sent.insert(record.guest_task()) {
                    out.push(HostMessage::Cancel {
                        v: VERSION,
                        task: record.guest_task(),
                    });
                }
            }
        }

        self.enforce_timeouts(conn, &mut out);
        // A VM that resets before each run, used and with no run under way, is sent no
        // secret: whatever the last run left in it would hear the next run's values. They
        // go once the book knows it was reset (the pass's sync after the reset).
        let used_and_free = self.used_since_reset.get(&conn.vm) == Some(&true)
            && !ours
                .iter()
                .any(|n| self.records.get(n).is_some_and(|r| r.phase.is_active()));
        let secrets_ready = !used_and_free && self.deliver_secrets(conn, &mut out);
        let mounts_ready = self.deliver_mounts(conn, &mut out);
        self.answer_prompts(conn, files, &mut out);
        if let Some(names) = &files.strays {
            self.refuse_stray_answers(files, names);
        }

        // Start the next due task, one a tick, one staging at a time; none while fleet is
        // suspended (runs under way go on).
        if conn.staging.is_none() && !self.suspended && self.may_dispatch_on(&conn.vm) {
            let due = ours.iter().find(|name| {
                let r = &self.records[*name];
                r.phase == TaskPhase::Pending
                    && self.desired.get(*name).is_some_and(|t| {
                        self.run_hash(t) == r.spec_hash
                            && self.held(t).is_none()
                            && (t.secrets.is_empty() || secrets_ready)
                            && mounts_ready
                    })
            });
            if let Some(name) = due.cloned() {
                let task = self.desired[&name].clone();
                let guest_task = self.records[&name].guest_task();
                self.mark_used(&conn.vm);
                if let Some(repository) = task.repository.clone() {
                    self.update(&name, |r| {
                        r.phase = TaskPhase::Staging;
                        r.boot_id = Some(boot.clone());
                        r.message = Some(format!("shipping {} to the guest", repository.url));
                    });
                    conn.staging = Some(Staging {
                        task: name.clone(),
                        path: format!("{GUEST_STAGE}/{guest_task}.tar"),
                        since: self.now.mono,
                    });
                    return (
                        out,
                        Some(StageJob {
                            checkout: super::repo::Checkout {
                                branch: format!("fleet/{name}"),
                                author: task.git_author.clone(),
                            },
                            task: name,
                            guest_task,
                            repository,
                        }),
                    );
                }
                self.start(conn, &name, &boot, &mut out);
            }
        }
        if let Some(staging) = &conn.staging
            && self.now.mono.saturating_duration_since(staging.since) > STAGE_TIMEOUT
        {
            let name = staging.task.clone();
            conn.staging = None;
            self.update(&name, |r| {
                r.phase = TaskPhase::Pending;
                r.message =
                    Some("the guest did not confirm the repository; shipping it again".into());
            });
        }
        (out, None)
    }

    /// Whether the host cancelled the run (`fleet task cancel`) before it started; if so it
    /// is ended, `Cancelled`, here.
    fn cancelled_before_start(&mut self, name: &str) -> bool {
        let Some(by) = self.records.get(name).and_then(|r| r.cancelled_by.clone()) else {
            return false;
        };
        self.finish(
            name,
            TaskPhase::Cancelled,
            None,
            &format!("cancelled from the host by {by} before it started"),
        );
        true
    }

    /// Records the run as started and returns its `RunTask`.
    fn start(&mut self, conn: &mut Connection, name: &str, boot: &str, out: &mut Vec<HostMessage>) {
        let Some(task) = self.desired.get(name).cloned() else {
            return;
        };
        // Cancelled from the host while it was being staged: it never starts.
        if self.cancelled_before_start(name) {
            return;
        }
        let started = self.now.wall;
        self.update(name, |r| {
            r.phase = TaskPhase::Running;
            r.boot_id = Some(boot.to_owned());
            r.started = Some(started.into());
            r.message = None;
        });
        conn.attached.insert(name.to_owned());
        if let Some(record) = self.records.get(name).cloned() {
            out.push(run_task(
                &task,
                &record,
                boot,
                &super::vm_secret_files(self, &conn.vm),
                self.egress.get(&conn.vm).map(|p| &**p),
            ));
            self.event(
                &record,
                EventKind::TaskStarted,
                format!("task {name} started on {}", conn.vm),
            );
        }
    }

    /// Fetches the job's repository and returns the parts to put into the guest. A fetch
    /// that fails fails the run.
    pub(super) fn staged(
        &mut self,
        conn: &mut Connection,
        job: StageJob,
        fetched: Result<super::repo::Archive, super::repo::RepoError>,
    ) -> Vec<HostMessage> {
        let still_staging = conn.staging.as_ref().is_some_and(|s| s.task == job.task);
        if !still_staging {
            return Vec::new();
        }
        if self.cancelled_before_start(&job.task) {
            conn.staging = None;
            return Vec::new();
        }
        let archive = match fetched {
            Ok(a) => a,
            Err(e) => {
                conn.staging = None;
                self.finish(
                    &job.task,
                    TaskPhase::Failed,
                    None,
                    &format!("cannot fetch the repository: {e:#}"),
                );
                return Vec::new();
            }
        };
        self.update(&job.task, |r| {
            r.repository = Some(RepositoryAt {
                url: archive.url.clone(),
                commit: archive.commit.clone(),
            });
        });
        let path = format!("{GUEST_STAGE}/{}.tar", job.guest_task);
        let sha = crate::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&archive.tar));
        let engine = base64::engine::general_purpose::STANDARD;
        let parts: Vec<&[u8]> = if archive.tar.is_empty() {
            vec![&[]]
        } else {
            archive.tar.chunks(PUT_PART_BYTES).collect()
        };
        let last = parts.len() - 1;
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| HostMessage::PutFile {
                v: VERSION,
                path: path.clone(),
                offset: (i * PUT_PART_BYTES) as u64,
                data: engine.encode(part),
                sha256: (i == last).then(|| sha.clone()),
                unpack_into: (i == last).then(|| format!("{GUEST_WORK}/{}", job.task)),
            })
            .collect()
    }

    /// Records what the guest sent and returns the acknowledgements (and a `RunTask` when
    /// a staged repository was confirmed).
    pub(super) fn receive(
        &mut self,
        conn: &mut Connection,
        messages: Vec<GuestMessage>,
    ) -> Vec<HostMessage> {
        let mut out = Vec::new();
        let mut acks: std::collections::BTreeMap<String, u64> = Default::default();
        let mut gap = false;
        for message in messages {
            let (task, seq) = match &message {
                GuestMessage::Stored { path, error, .. } => {
                    let Some(staging) = conn.staging.take_if(|s| &s.path == path) else {
                        continue;
                    };
                    match error {
                        Some(e) => self.finish(
                            &staging.task,
                            TaskPhase::Failed,
                            None,
                            &format!("the guest could not store the repository: {e}"),
                        ),
                        None => {
                            let boot = conn.boot_id.clone().unwrap_or_default();
                            self.start(conn, &staging.task, &boot, &mut out);
                        }
                    }
                    continue;
                }
                GuestMessage::Output { task, seq, .. }
                | GuestMessage::Prompt { task, seq, .. }
                | GuestMessage::PromptGone { task, seq, .. }
                | GuestMessage::Artifact { task, seq, .. }
                | GuestMessage::Exit { task, seq, .. } => (task.clone(), *seq),
                GuestMessage::Mounted { digest, errors, .. } => {
                    if errors.is_empty() {
                        conn.guest_mounts = Some(digest.clone());
                    } else {
                        // Runs wait; the next connection tries again.
                        for e in errors {
                            tracing::warn!(
                                vm = %conn.vm,
                                "a workspace could not be mounted: {}",
                                crate::terminal::one_line(e, 200)
                            );
                        }
                    }
                    continue;
                }
                GuestMessage::SecretsStored { digest, error, .. } => {
                    match error {
                        None => conn.guest_secrets = Some(digest.clone()),
                        // Not sent again on this connection: tasks that need them wait, and
                        // the next connection tries afresh.
                        Some(e) => {
                            tracing::warn!(vm = %conn.vm, "the guest could not store its secrets: {e}")
                        }
                    }
                    continue;
                }
                GuestMessage::Hello { .. }
                | GuestMessage::Heartbeat { .. }
                | GuestMessage::Addresses { .. } => continue,
                // Streams are the broker's (`daemon::agents` routes them there).
                GuestMessage::StreamOpen { .. }
                | GuestMessage::StreamData { .. }
                | GuestMessage::StreamCredit { .. }
                | GuestMessage::StreamClose { .. }
                | GuestMessage::ExecOutput { .. }
                | GuestMessage::ExecCredit { .. }
                | GuestMessage::ExecExit { .. } => continue,
            };
            // Only this link's VM, and its current boot: a guest names runs, and must never
            // reach another VM's (or an earlier boot's) by guessing or learning their names.
            let Some(name) = self
                .records
                .values()
                .find(|r| {
                    r.vm == conn.vm
                        && r.guest_task() == task
                        && (r.boot_id.is_none() || r.boot_id == conn.boot_id)
                })
                .map(|r| r.name.clone())
            else {
                // Not one of this VM's runs (or one fleet no longer tracks): the guest may
                // forget it, and learns nothing about what exists elsewhere.
                acks.insert(task, seq);
                continue;
            };
            // Even the acknowledgement of a message recorded before waits for the task's
            // earlier writes (another link of this VM may still be making them).
            self.effects.barrier.insert(name.clone());
            let recorded = self.records[&name].seq;
            if seq <= recorded {
                acks.insert(task, recorded);
                continue;
            }
            if seq > recorded + 1 {
                gap = true;
                continue;
            }
            self.record(&name, message);
            acks.insert(task, seq);
        }
        // Sent only after the effects are made (`TaskBook::receive`).
        for (task, seq) in acks {
            out.push(HostMessage::Ack {
                v: VERSION,
                task,
                seq,
            });
        }
        if gap {
            // Something went missing on the way: a greeting makes the guest send again
            // everything not acknowledged.
            out.push(HostMessage::Hello { v: VERSION });
        }
        out
    }

    /// Records one message of a run, in order (the caller checked `seq`).
    fn record(&mut self, name: &str, message: GuestMessage) {
        let Some(record) = self.records.get(name).cloned() else {
            return;
        };
        match message {
            GuestMessage::Output { seq, data, .. } => self.record_output(&record, seq, data),
            GuestMessage::Prompt {
                seq,
                text,
                screen,
                options,
                ..
            } => self.record_prompt(&record, seq, &text, &screen, &options),
            GuestMessage::PromptGone { seq, .. } => self.record_prompt_gone(&record, seq),
            GuestMessage::Artifact {
                seq,
                path,
                offset,
                data,
                last,
                ..
            } => self.record_artifact(&record, seq, path, offset, &data, last),
            GuestMessage::Exit {
                seq, code, reason, ..
            } => self.record_exit(&record, seq, code, reason),
            GuestMessage::Hello { .. }
            | GuestMessage::Heartbeat { .. }
            | GuestMessage::Addresses { .. }
            | GuestMessage::Mounted { .. }
            | GuestMessage::Stored { .. }
            | GuestMessage::SecretsStored { .. }
            | GuestMessage::StreamOpen { .. }
            | GuestMessage::StreamData { .. }
            | GuestMessage::StreamCredit { .. }
            | GuestMessage::StreamClose { .. }
            | GuestMessage::ExecOutput { .. }
            | GuestMessage::ExecCredit { .. }
            | GuestMessage::ExecExit { .. } => {}
        }
    }

    /// Output: redacted, kept up to the run's limit, written at the record's length; output
    /// after a prompt withdraws the prompt (the task moved on).
    fn record_output(&mut self, record: &TaskRecord, seq: u64, data: String) {
        let name = record.name.as_str();
        // A value a task prints is blanked before it is stored (a value split across
        // two chunks is not recognised: the redactor is a net, not a guarantee).
        let data = String::from_utf8(crate::secrets::redact::redact(data.as_bytes()))
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        // Once output was cut (the limit, or a disk that refused it), the rest is
        // dropped: the log never has a hole.
        let room = if record.output_truncated {
            0
        } else {
            limits::OUTPUT_BYTES.saturating_sub(record.output_bytes)
        };
        if room < data.len() as u64 {
            // Keep what fits (on a character boundary), then say it was cut.
            let mut keep = room as usize;
            while keep > 0 && !data.is_char_boundary(keep) {
                keep -= 1;
            }
            if keep > 0 {
                self.write_output(name, record.output_bytes, &data.as_bytes()[..keep]);
            }
            let end = record.output_bytes + keep as u64;
            let first = !record.output_truncated;
            self.update(name, |r| {
                r.seq = seq;
                r.output_bytes = end;
                r.output_truncated = true;
            });
            if first {
                self.event(
                    record,
                    EventKind::TaskOutputTruncated,
                    format!(
                        "output of {name} reached {} MiB; the rest is dropped",
                        limits::OUTPUT_BYTES / (1024 * 1024)
                    ),
                );
            }
            return;
        }
        self.write_output(name, record.output_bytes, data.as_bytes());
        let end = record.output_bytes + data.len() as u64;
        // A plain question is over once the task prints on (it went on without an answer);
        // a menu stays while an interface redraws around it, until the guest says it is
        // gone (`PromptGone`).
        let withdraw = record.pending_prompt.clone().filter(|id| {
            !data.trim().is_empty() && self.prompts.get(id).is_some_and(|p| p.options.is_empty())
        });
        if let Some(id) = &withdraw {
            self.set_prompt(id, |p| p.state = PromptState::Withdrawn);
        }
        self.update(name, |r| {
            r.seq = seq;
            r.output_bytes = end;
            if withdraw.is_some() {
                r.pending_prompt = None;
                r.phase = TaskPhase::Running;
            }
        });
    }

    /// A prompt: at most one pending per run and `limits::PROMPTS` in all; its text and
    /// screen redacted and cut; it waits for an answer until its deadline.
    fn record_prompt(
        &mut self,
        record: &TaskRecord,
        seq: u64,
        text: &str,
        screen: &[String],
        options: &[String],
    ) {
        let name = record.name.as_str();
        if record.pending_prompt.is_some() || record.phase.is_finished() {
            self.update(name, |r| r.seq = seq);
            return;
        }
        if record.prompts >= limits::PROMPTS {
            self.refuse(name, seq, "prompts", || {
                format!(
                    "more than {} prompts; later ones are dropped",
                    limits::PROMPTS
                )
            });
            return;
        }
        let redacted = |t: &str| {
            String::from_utf8_lossy(&crate::secrets::redact::redact(t.as_bytes())).into_owned()
        };
        let text = cut(&redacted(text), limits::PROMPT_TEXT_BYTES);
        let screen: Vec<String> = screen
            .iter()
            .rev()
            .take(limits::PROMPT_SCREEN_LINES)
            .rev()
            .map(|l| cut(&redacted(l), limits::PROMPT_LINE_BYTES))
            .collect();
        // A menu's choices, as many as a digit can pick.
        let options: Vec<String> = options
            .iter()
            .take(9)
            .map(|o| cut(&redacted(o), limits::PROMPT_LINE_BYTES))
            .collect();
        let id = self.raise_prompt(record, PromptKind::Input, text, screen, options);
        self.set_prompt(&id, |p| p.guest_seq = Some(seq));
        self.update(name, |r| {
            r.seq = seq;
            r.pending_prompt = Some(id.clone());
            r.phase = TaskPhase::WaitingForInput;
        });
    }

    /// The pending prompt's question left the task's screen unanswered: withdrawn, and
    /// an answer that comes later is not delivered.
    fn record_prompt_gone(&mut self, record: &TaskRecord, seq: u64) {
        if let Some(id) = &record.pending_prompt {
            self.set_prompt(id, |p| p.state = PromptState::Withdrawn);
        }
        self.update(&record.name, |r| {
            r.seq = seq;
            if r.pending_prompt.take().is_some() {
                r.phase = TaskPhase::Running;
            }
        });
    }

    /// An artifact part, within the run's limits (count, path length, bytes).
    fn record_artifact(
        &mut self,
        record: &TaskRecord,
        seq: u64,
        path: String,
        offset: u64,
        data: &str,
        last: bool,
    ) {
        let name = record.name.as_str();
        // Every first part begins a file (finished or not): that is what is counted.
        let new_file = offset == 0;
        let refusal = if path.len() > limits::ARTIFACT_PATH_BYTES {
            Some(format!(
                "an artifact path longer than {} bytes",
                limits::ARTIFACT_PATH_BYTES
            ))
        } else if new_file && record.artifact_files as usize >= limits::ARTIFACTS {
            Some(format!("more than {} artifacts", limits::ARTIFACTS))
        } else {
            // base64: at most 3 bytes per 4 characters.
            let most = (data.len() as u64 / 4 + 1) * 3;
            (record.artifact_bytes + most > limits::ARTIFACT_BYTES).then(|| {
                format!(
                    "more than {} MiB of artifacts",
                    limits::ARTIFACT_BYTES / (1024 * 1024)
                )
            })
        };
        if let Some(why) = refusal {
            self.refuse(name, seq, "artifacts", || {
                format!("{why}; artifact parts past it are dropped")
            });
            return;
        }
        // Every byte received counts against the limit, written over or not: the
        // count needs no look at the disk, and the disk holds no more than it.
        let received = match base64::engine::general_purpose::STANDARD.decode(data.as_bytes()) {
            Ok(bytes) => {
                let len = bytes.len() as u64;
                self.write_artifact(name, &path, offset, bytes);
                len
            }
            Err(e) => {
                tracing::warn!(task = name, "artifact {path}: not base64: {e}");
                0
            }
        };
        self.update(name, |r| {
            r.seq = seq;
            r.artifact_bytes += received;
            if new_file {
                r.artifact_files += 1;
            }
            if last && !r.artifacts.contains(&path) {
                r.artifacts.push(path.clone());
            }
        });
    }

    /// The run's end: its phase and why, from how it exited and what fleet asked of it.
    fn record_exit(
        &mut self,
        record: &TaskRecord,
        seq: u64,
        code: Option<i32>,
        reason: ExitReason,
    ) {
        let name = record.name.as_str();
        let (phase, message) = match reason {
            ExitReason::Completed if code == Some(0) => {
                (TaskPhase::Succeeded, "exited with code 0".to_owned())
            }
            ExitReason::Completed => (
                TaskPhase::Failed,
                match code {
                    Some(c) => format!("exited with code {c}"),
                    None => "ended by a signal".to_owned(),
                },
            ),
            ExitReason::TimedOut => (
                TaskPhase::TimedOut,
                "ran longer than its timeout; its processes were killed".to_owned(),
            ),
            ExitReason::Cancelled if record.host_timeout => (
                TaskPhase::TimedOut,
                "ran past its timeout without the agent ending it; fleet cancelled it".to_owned(),
            ),
            ExitReason::Cancelled if record.cancelled_by.is_some() => (
                TaskPhase::Cancelled,
                format!(
                    "cancelled from the host by {}",
                    record.cancelled_by.as_deref().unwrap_or_default()
                ),
            ),
            ExitReason::Cancelled => match &record.fail_on_cancel {
                Some(why) => (TaskPhase::Failed, why.clone()),
                None => (
                    TaskPhase::Cancelled,
                    "cancelled: its task file was removed or changed".to_owned(),
                ),
            },
            ExitReason::FailedToStart => (
                TaskPhase::Failed,
                "could not be started (see output.log)".to_owned(),
            ),
            ExitReason::Lost => (
                TaskPhase::Failed,
                "the guest agent restarted while it ran; its end is unknown".to_owned(),
            ),
        };
        // Only the exit that ends the run: a guest that says it again changes nothing.
        if !record.phase.is_active() {
            self.update(name, |r| r.seq = seq);
            return;
        }
        self.update(name, |r| r.seq = seq);
        self.finish(name, phase, code, &message);
        let bundled = self.records.get(name).filter(|r| {
            r.repository.is_some()
                && r.artifacts
                    .iter()
                    .any(|a| a == fleet_agent_protocol::RESULTS_ARTIFACT)
        });
        if let Some(r) = bundled {
            self.results_due.push((name.to_owned(), r.run.clone()));
        }
    }

    /// Notes a refused answer on its prompt (once) and as an event, and moves a host answer
    /// file aside (the name, not what it points at), so it is read once.
    fn refuse_answer(
        &mut self,
        record: &crate::status::tasks::TaskRecord,
        prompt: &PromptRecord,
        note: String,
        file: Option<&str>,
    ) {
        if !prompt.refused.contains(&note) {
            self.set_prompt(&prompt.id, |p| p.refused.push(note.clone()));
            self.event(
                record,
                EventKind::HitlAnswerRefused,
                format!("answer to {} refused: {note}", prompt.id),
            );
        }
        if let Some(file) = file {
            self.effects
                .moves
                .push((file.to_owned(), Some(format!("{file}.refused"))));
        }
    }

    /// Drops a message past a host limit: its `seq` counts (so the guest's outbox drains),
    /// and the run's status says what was refused, once per kind.
    fn refuse(&mut self, name: &str, seq: u64, kind: &str, why: impl FnOnce() -> String) {
        let Some(record) = self.records.get(name).cloned() else {
            return;
        };
        let first = !record.refused.iter().any(|r| r.starts_with(kind));
        let message = first.then(|| format!("{kind}: {}", why()));
        self.update(name, |r| {
            r.seq = seq;
            if let Some(m) = &message {
                r.refused.push(m.clone());
            }
        });
        if let Some(m) = message {
            self.event(&record, EventKind::TaskLimit, format!("{name}: {m}"));
        }
    }

    /// The safety net under the agent's own timeout: a run still going `HOST_TIMEOUT_GRACE`
    /// past its timeout is cancelled, and one that outlives a second grace is given up on.
    fn enforce_timeouts(&mut self, conn: &mut Connection, out: &mut Vec<HostMessage>) {
        let overdue: Vec<(String, Duration)> = self
            .records
            .values()
            .filter(|r| r.vm == conn.vm && r.phase.is_active() && conn.attached.contains(&r.name))
            .filter_map(|r| {
                let timeout = self
                    .desired
                    .get(&r.name)
                    .filter(|t| self.run_hash(t) == r.spec_hash)?
                    .timeout;
                let over = super::running_for(r, self.now.wall)?.checked_sub(timeout)?;
                (over > HOST_TIMEOUT_GRACE).then(|| (r.name.clone(), over))
            })
            .collect();
        for (name, over) in overdue {
            let record = self.records[&name].clone();
            if over > 2 * HOST_TIMEOUT_GRACE {
                self.finish(&name,
                    TaskPhase::TimedOut,
                    None,
                    "ran past its timeout and the agent answered neither the timeout nor a cancel; fleet stopped tracking it",
                );
                continue;
            }
            if conn.cancel_sent.insert(record.guest_task()) {
                self.update(&name, |r| r.host_timeout = true);
                self.event(&record,
                    EventKind::TaskTimeout,
                    format!("task {name} ran past its timeout without the agent ending it; fleet cancels it"),
                );
                out.push(HostMessage::Cancel {
                    v: VERSION,
                    task: record.guest_task(),
                });
            }
        }
    }

    /// Sends the VM's workspaces to mount when the guest has not mounted them on this
    /// connection; true once it has (or there are none): runs wait for their workspaces.
    fn deliver_mounts(&mut self, conn: &mut Connection, out: &mut Vec<HostMessage>) -> bool {
        let Some((digest, mounts)) = self.vm_mounts.get(&conn.vm) else {
            return true;
        };
        if conn.guest_mounts.as_deref() == Some(digest.as_str()) {
            return true;
        }
        if conn.mounts_sent.as_deref() != Some(digest.as_str()) {
            conn.mounts_sent = Some(digest.clone());
            out.push(HostMessage::Mounts {
                v: VERSION,
                digest: digest.clone(),
                mounts: mounts.clone(),
            });
        }
        false
    }

    /// Sends the VM's secret set when the guest does not hold it yet; true once it does.
    fn deliver_secrets(&mut self, conn: &mut Connection, out: &mut Vec<HostMessage>) -> bool {
        let set = super::secret_set(self, &conn.vm);
        let held = conn.guest_secrets.as_deref();
        if held == Some(set.digest.as_str()) || (held.is_none() && set.values.is_empty()) {
            return true;
        }
        if conn.secrets_sent.as_deref() != Some(set.digest.as_str()) {
            conn.secrets_sent = Some(set.digest.clone());
            out.push(HostMessage::Secrets {
                v: VERSION,
                files: set.files(),
                digest: set.digest,
            });
        }
        false
    }

    /// The answer to `prompt`: committed, or in a host file (refused and `None` when the
    /// file cannot be read); with who gave it and the host file to remove once used.
    fn answer_to(
        &mut self,
        record: &TaskRecord,
        prompt: &PromptRecord,
        files: &HostFiles,
    ) -> Option<(String, String, Option<String>)> {
        if let Some(a) = self.answers.get(&prompt.id).cloned() {
            let revision = self.revision.as_deref().unwrap_or_default();
            let commit = &revision[..revision.len().min(12)];
            let by = match &a.signer {
                Some(who) => format!("{who} (commit {commit}, {})", a.source),
                None => format!("commit {commit} ({})", a.source),
            };
            match self.approvers.refusal(a.signer.as_deref()) {
                None => return Some((a.response, by, None)),
                // Noted once; a host answer may still come.
                // Without the commit: one note per file, however many revisions repeat it.
                Some(why) => {
                    self.refuse_answer(record, prompt, format!("{}: {why}", a.source), None)
                }
            }
        }
        let host_file = answer_file_name(&prompt.id);
        let shown = files.dir.join(&host_file);
        match files.answers.get(&prompt.id)? {
            Ok(text) => {
                let (answer, author) = answer_and_author(text);
                let by = match author {
                    Some(who) => format!("{who} (host file {})", shown.display()),
                    None => format!("host file {}", shown.display()),
                };
                Some((answer.to_owned(), by, Some(host_file)))
            }
            Err(why) => {
                let note = format!("host file {}: {why}", shown.display());
                self.refuse_answer(record, prompt, note, Some(&host_file));
                None
            }
        }
    }

    /// A budget prompt answered: `yes` allows the run its budget once more, anything else
    /// keeps its connections refused. Nothing is typed into the task.
    fn answer_budget(
        &mut self,
        record: &TaskRecord,
        prompt: &PromptRecord,
        (response, by, file): (String, String, Option<String>),
    ) {
        let allow = matches!(
            response.trim().to_ascii_lowercase().as_str(),
            "yes" | "y" | "allow"
        );
        let answered_at = self.stamp();
        self.set_prompt(&prompt.id, |p| {
            p.state = PromptState::Answered;
            p.response = Some(response.clone());
            p.answered_by = Some(by.clone());
            p.answered_at = answered_at;
            p.delivered = true;
        });
        if let Some(file) = file {
            self.effects.moves.push((file, None));
        }
        let budget = self.budget_of(&record.vm, &record.name);
        let spent = self.spent(&record.name);
        self.update(&record.name, |r| {
            let sums = r.egress.get_or_insert_with(Default::default);
            sums.budget_prompt = None;
            match budget {
                Some(budget) if allow => {
                    sums.grants += 1;
                    sums.granted = budget.grant(spent, sums.granted);
                }
                Some(_) => sums.budget_refused = true,
                // The budget was removed since: nothing is refused, nothing to allow.
                None => {}
            }
        });
        let outcome = match (budget, allow) {
            (None, _) => "it has no budget any more",
            (Some(_), true) => "it may use more",
            (Some(_), false) => "its connections stay refused",
        };
        self.event(
            record,
            EventKind::HitlAnswered,
            format!("prompt {} answered by {by}: {outcome}", prompt.id),
        );
    }

    /// Delivers answers to this VM's pending prompts, and applies their deadlines.
    fn answer_prompts(&mut self, conn: &Connection, files: &HostFiles, out: &mut Vec<HostMessage>) {
        let ids: Vec<String> = self
            .prompts
            .values()
            .filter(|p| p.vm == conn.vm)
            .filter(|p| {
                p.state == PromptState::Pending
                    || (p.state == PromptState::Answered && !p.delivered)
            })
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            let prompt = self.prompts[&id].clone();
            let Some(record) = self.records.get(&prompt.task).cloned() else {
                continue;
            };
            if !record.phase.is_active() {
                continue;
            }
            if prompt.state == PromptState::Answered {
                // Answered but not known to have reached the guest: send it again (the
                // guest types an answer to a prompt at most once).
                let response = prompt.response.as_deref().unwrap_or_default();
                out.push(input(
                    &record.guest_task(),
                    &prompt,
                    &keys(&prompt, response),
                ));
                continue;
            }
            let answer = self.answer_to(&record, &prompt, files);
            if prompt.kind == PromptKind::Budget {
                if let Some(answer) = answer {
                    self.answer_budget(&record, &prompt, answer);
                }
                // A budget prompt waits as long as it takes: the run's connections are
                // refused meanwhile, and the run's own timeout still applies.
                continue;
            }
            if let Some((response, by, file)) = answer {
                let problem = answer_problem(&response, prompt.allow_control).or_else(|| {
                    (!prompt.options.is_empty() && choice(&prompt.options, &response).is_none())
                        .then(|| {
                            let listed: Vec<String> = prompt
                                .options
                                .iter()
                                .enumerate()
                                .map(|(i, o)| format!("{} ({o})", i + 1))
                                .collect();
                            format!(
                                "{response:?} is none of the prompt's options; answer with one of {}",
                                listed.join(", ")
                            )
                        })
                });
                if let Some(problem) = problem {
                    let note = format!("{by}: {problem}");
                    self.refuse_answer(&record, &prompt, note, file.as_deref());
                    continue;
                }
                let answered_at = self.stamp();
                self.set_prompt(&id, |p| {
                    p.state = PromptState::Answered;
                    p.response = Some(response.clone());
                    p.answered_by = Some(by.clone());
                    p.answered_at = answered_at;
                });
                if let Some(file) = file {
                    self.effects.moves.push((file, None));
                }
                self.update(&prompt.task, |r| {
                    r.pending_prompt = None;
                    r.phase = TaskPhase::Running;
                });
                self.event(
                    &record,
                    EventKind::HitlAnswered,
                    format!("prompt {id} answered by {by}"),
                );
                out.push(input(
                    &record.guest_task(),
                    &prompt,
                    &keys(&prompt, &response),
                ));
                continue;
            }
            if self.now.wall < prompt.deadline.system_time() {
                continue;
            }
            let policy = self
                .desired
                .get(&prompt.task)
                .map_or(OnDeadline::Wait, |t| t.on_deadline);
            match policy {
                OnDeadline::Fail => {
                    self.set_prompt(&id, |p| p.state = PromptState::Expired);
                    let why = format!("prompt {id} got no answer by its deadline");
                    self.update(&prompt.task, |r| {
                        r.pending_prompt = None;
                        r.fail_on_cancel = Some(why.clone());
                    });
                    self.event(&record, EventKind::HitlExpired, why);
                    out.push(HostMessage::Cancel {
                        v: VERSION,
                        task: record.guest_task(),
                    });
                }
                OnDeadline::Wait if !prompt.overdue => {
                    self.set_prompt(&id, |p| p.overdue = true);
                    self.event(
                        &record,
                        EventKind::HitlOverdue,
                        format!("prompt {id} is past its deadline and keeps waiting"),
                    );
                }
                OnDeadline::Wait => {}
            }
        }
    }

    /// Host answer files for prompts that are not pending (or do not exist) are refused:
    /// renamed to `<id>.answer.refused`, and noted on the prompt.
    fn refuse_stray_answers(&mut self, files: &HostFiles, names: &[String]) {
        for file in names.iter().cloned() {
            let Some(id) = file
                .strip_suffix(".answer")
                .filter(|id| ApprovalId::parse(id).is_none())
                .map(str::to_owned)
            else {
                continue;
            };
            // Taken or refused already by this hold of the lock (the move is still to come).
            if self.effects.moves.iter().any(|(from, _)| from == &file) {
                continue;
            }
            let why = match self.prompts.get(&id) {
                Some(p) if p.state == PromptState::Pending => continue,
                Some(p) => match p.state {
                    PromptState::Answered => format!(
                        "already answered by {}",
                        p.answered_by.as_deref().unwrap_or("someone")
                    ),
                    PromptState::Withdrawn => "the prompt was withdrawn".into(),
                    _ => "the prompt expired".into(),
                },
                None => "no such prompt".into(),
            };
            let note = format!("host file {}: {why}", files.dir.join(&file).display());
            tracing::warn!("answer refused: {note}");
            // The note is written before the file is moved (effects run in that order):
            // whoever sees the file refused finds why on the prompt.
            if self.prompts.contains_key(&id) {
                self.set_prompt(&id, |p| {
                    if !p.refused.contains(&note) {
                        p.refused.push(note.clone());
                    }
                });
            }
            let refused = format!("{file}.refused");
            let event = Event::task(
                EventKind::HitlAnswerRefused,
                self.prompts.get(&id).map(|p| p.task.as_str()),
                None,
                None,
                format!("answer to {id} refused: {note}"),
            );
            self.effects.moves.push((file, Some(refused)));
            self.effects.events.push(event);
        }
    }

    /// The link wrote these messages: answers among them are delivered.
    pub(super) fn sent(&mut self, messages: &[HostMessage]) {
        for message in messages {
            if let HostMessage::Input {
                prompt: Some(id), ..
            } = message
            {
                self.set_prompt(id, |p| p.delivered = true);
            }
        }
    }
}

/// What the task's terminal is sent for `response`: a menu's choice is its digit alone
/// (a menu takes a key, and an Enter after it would go to whatever comes next); any other
/// answer is typed, then Enter.
fn keys(prompt: &PromptRecord, response: &str) -> String {
    match choice(&prompt.options, response) {
        Some(n) if !prompt.options.is_empty() => n.to_string(),
        _ => format!("{response}\r"),
    }
}

/// The number (from 1) of the option `response` names: its number, its label, or the
/// first label it begins (`yes` for `Yes, and don't ask again`), any case.
fn choice(options: &[String], response: &str) -> Option<usize> {
    let wanted = response.trim().to_lowercase();
    if let Ok(n) = wanted.parse::<usize>() {
        return (1..=options.len()).contains(&n).then_some(n);
    }
    if wanted.is_empty() {
        return None;
    }
    let labels: Vec<String> = options.iter().map(|o| o.to_lowercase()).collect();
    labels
        .iter()
        .position(|l| *l == wanted)
        .or_else(|| {
            labels.iter().position(|l| {
                l.strip_prefix(&wanted)
                    .is_some_and(|rest| !rest.starts_with(char::is_alphanumeric))
            })
        })
        .map(|i| i + 1)
}

fn input(guest_task: &str, prompt: &PromptRecord, data: &str) -> HostMessage {
    HostMessage::Input {
        v: VERSION,
        task: guest_task.to_owned(),
        data: data.to_owned(),
        prompt: Some(prompt.id.clone()),
        prompt_seq: prompt.guest_seq,
    }
}

/// At most `max` bytes of `text`, cut on a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
