//! Task and prompt records in the status directory: `tasks/<name>.yaml` with the task's
//! output in `tasks/<name>/output.log` and its artifacts in `tasks/<name>/artifacts/`, and
//! `hitl/<id>.yaml` for each prompt.
//!
//! The output log and the record move together: `outputBytes` in the record is the log's
//! length after the last output chunk the record counts (`seq`). A log found longer than
//! that when the task book opens (fleet stopped between appending and recording) is cut
//! back (`cut_task_output`), and the guest sends the chunks after `seq` again, so the log
//! is complete, in order, and has no repeats.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{StatusDir, yaml};
use crate::ids::ApprovalId;
use crate::time::Timestamp;

/// A cancel of one run from the host: a file of its own (`task-cancels/<task>.yaml`), so
/// the command and a running `fleet serve` never write the same file. It names the run, so
/// it never reaches a later one: the committed task file still decides what runs next.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostCancel {
    pub run: String,
    pub by: String,
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskPhase {
    Pending,
    Staging,
    Running,
    WaitingForInput,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl TaskPhase {
    pub const ALL: [TaskPhase; 8] = [
        TaskPhase::Pending,
        TaskPhase::Staging,
        TaskPhase::Running,
        TaskPhase::WaitingForInput,
        TaskPhase::Succeeded,
        TaskPhase::Failed,
        TaskPhase::TimedOut,
        TaskPhase::Cancelled,
    ];

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::TimedOut | TaskPhase::Cancelled
        )
    }

    /// Started in the guest (or being staged there) and not finished.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskPhase::Staging | TaskPhase::Running | TaskPhase::WaitingForInput
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Pending => "Pending",
            TaskPhase::Staging => "Staging",
            TaskPhase::Running => "Running",
            TaskPhase::WaitingForInput => "WaitingForInput",
            TaskPhase::Succeeded => "Succeeded",
            TaskPhase::Failed => "Failed",
            TaskPhase::TimedOut => "TimedOut",
            TaskPhase::Cancelled => "Cancelled",
        }
    }
}

/// What a run's connections through the broker used: the sums of its `egress.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressUse {
    pub connections: u64,
    /// Connections the broker refused (no rule or credential allowed them, or the budget
    /// was spent); their bytes are not counted.
    pub refused: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Model tokens the brokered APIs reported, input (cache reads and writes included)
    /// and output.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_in: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_out: u64,
    /// Answers of brokered APIs whose usage could not be read in full (their tokens up to
    /// the problem are counted; under a token budget each one reaches the limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_unread: u64,
    /// Times a human allowed more (`PromptKind::Budget`), and what in all, beyond the
    /// budget.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub grants: u32,
    #[serde(default, skip_serializing_if = "is_nothing")]
    pub granted: crate::egress::Granted,
    /// The budget prompt waiting for an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_prompt: Option<String>,
    /// A budget prompt was answered no: the run's connections stay refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_refused: bool,
    /// Connections past `tasks::limits::EGRESS_LINES`, counted here but not logged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_logged: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_nothing(granted: &crate::egress::Granted) -> bool {
    *granted == crate::egress::Granted::default()
}

/// One connection, as a line of `tasks/<name>/egress.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressLine {
    pub time: Timestamp,
    pub destination: String,
    /// Where the rule or credential that allowed it was written; absent when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// For a brokered API: the tokens its answer reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
    /// For a brokered API whose answer's usage could not be read: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_unread: Option<String>,
    pub millis: u64,
}

/// `tasks/<name>.yaml`: the latest run of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub name: String,
    pub vm: String,
    /// Counts the runs of this task; each new spec hash or `rerun` starts a new one.
    pub generation: u32,
    /// Identifies this run: 8 hex digits of sha256(spec hash, generation).
    pub run: String,
    pub spec_hash: String,
    /// The spec hash of the task alone (`spec_hash` adds its secret values' keyed hashes
    /// when it has secrets): what `fleet plan` compares a revision's task with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_hash: Option<String>,
    pub rerun: u32,
    pub phase: TaskPhase,
    /// Why it is in this phase, in words (waiting for what, failed how).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The file that declares it, and the revision that started this run.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub created: Option<Timestamp>,
    /// A start time that does not parse reads as none: it only serves the host's own
    /// timeout check (the agent enforces timeouts too), while the record it sits in is
    /// what keeps a run from running twice, so the record is never dropped for it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub started: Option<Timestamp>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub finished: Option<Timestamp>,
    /// The boot of the guest it runs in; a different boot means the run was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryAt>,
    /// What the run changed in its checkout, once the host checked the guest's bundle
    /// (`tasks::results`); `changes.patch` beside the record shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<RunChanges>,
    /// The last message from the guest recorded (output, prompt, artifact or exit).
    #[serde(default)]
    pub seq: u64,
    /// The length of output.log that `seq` accounts for.
    #[serde(default)]
    pub output_bytes: u64,
    /// Set once the run's output reached the host's cap (`tasks::limits::OUTPUT_BYTES`):
    /// what came after was acknowledged and dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// Artifact bytes stored for this run (bounded by `tasks::limits::ARTIFACT_BYTES`).
    #[serde(default)]
    pub artifact_bytes: u64,
    /// Artifact files begun for this run (a first part, at offset 0), finished or not
    /// (bounded by `tasks::limits::ARTIFACTS`).
    #[serde(default)]
    pub artifact_files: u32,
    /// What the host refused of the guest's messages for this run, once per kind: the
    /// status says so rather than silently losing it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// What this run's connections through the broker used (brokered VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressUse>,
    /// Prompts seen in this run; the next one is numbered `prompts + 1`.
    #[serde(default)]
    pub prompts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Set when fleet cancels the run for a reason that makes it a failure (a prompt's
    /// deadline passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_on_cancel: Option<String>,
    /// Who cancelled the run from the host (`fleet task cancel`): it is being stopped, and
    /// ends `Cancelled` saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
    /// Set when fleet cancelled the run because it outlived its timeout and the agent had not
    /// ended it: the run then ends `TimedOut`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_timeout: bool,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub updated: Option<Timestamp>,
    /// A fresh run (`vm: {pool, fresh: true}`): its pool and how long its member outlives
    /// it. `vm` is the member it was given, empty while it waits for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh: Option<FreshRecord>,
    /// Members earlier runs of this task were given, until when each is held: a member a
    /// run had is never warm again, and its `keepFor` outlives the next run's start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_members: Vec<EarlierMember>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EarlierMember {
    pub pool: String,
    pub name: String,
    pub until: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FreshRecord {
    pub pool: String,
    pub keep_for_secs: u64,
}

impl TaskRecord {
    /// The run as `lifecycle` reads it, when it is a fresh run.
    pub fn fresh_run(&self) -> Option<crate::lifecycle::FreshRun> {
        let fresh = self.fresh.as_ref()?;
        Some(crate::lifecycle::FreshRun {
            task: self.name.clone(),
            pool: fresh.pool.clone(),
            member: (!self.vm.is_empty()).then(|| self.vm.clone()),
            // A finished run whose end time was lost ended long ago.
            finished: match self.phase.is_finished() {
                true => Some(
                    self.finished
                        .unwrap_or(Timestamp::from(std::time::UNIX_EPOCH)),
                ),
                false => None,
            },
            keep_for: std::time::Duration::from_secs(fresh.keep_for_secs),
        })
    }

    /// This run as `reset` sees it.
    pub fn reset_facts(&self) -> crate::reset::RunFacts {
        use crate::reset::RunState;
        crate::reset::RunFacts {
            task: self.name.clone(),
            state: if self.phase == TaskPhase::Pending {
                RunState::Pending
            } else if self.phase.is_active() {
                RunState::Active
            } else {
                RunState::Finished
            },
        }
    }

    /// This run's member and the earlier runs' (each an ended run held until its time).
    pub fn fresh_runs(&self) -> impl Iterator<Item = crate::lifecycle::FreshRun> + '_ {
        let earlier = self
            .earlier_members
            .iter()
            .map(|m| crate::lifecycle::FreshRun {
                task: self.name.clone(),
                pool: m.pool.clone(),
                member: Some(m.name.clone()),
                finished: Some(m.until),
                keep_for: std::time::Duration::ZERO,
            });
        self.fresh_run().into_iter().chain(earlier)
    }

    /// The task's name in the guest: unique per run, so the guest never confuses runs.
    pub fn guest_task(&self) -> String {
        crate::ids::guest_task(&self.name, &self.run)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryAt {
    pub url: String,
    pub commit: String,
}

/// What a run changed in its checkout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunChanges {
    /// The branch's tip after the run (a commit in the host's repository cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    pub commits: usize,
    pub files_changed: usize,
    pub insertions: usize,
    pub deletions: usize,
    /// `changes.patch` stops at its size limit (the counts above are whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub patch_truncated: bool,
    /// Why the guest's bundle was refused (nothing of it was used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Where the commits were pushed (`URL BRANCH`), or why the push failed (the bundle
    /// stays in the run's artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PromptState {
    Pending,
    Answered,
    /// The task went on (or ended) without an answer.
    Withdrawn,
    /// The deadline passed and the task's policy failed it.
    Expired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PromptKind {
    /// A question on the task's terminal: the answer is typed into it.
    Input,
    /// The run spent its egress budget: `yes` allows as much again, anything else keeps
    /// its connections refused.
    Budget,
}

/// `hitl/<id>.yaml`: one prompt waiting for (or given) a human's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptRecord {
    pub id: String,
    pub kind: PromptKind,
    /// Its task accepts control characters in answers (`prompts.allowControl`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_control: bool,
    pub task: String,
    pub vm: String,
    /// The line that read as a question.
    pub text: String,
    /// The last lines of the task's screen.
    pub context: Vec<String>,
    /// The choices of a menu under the question, in order: an answer is one of their
    /// numbers or labels (`1`, `yes`), and its number is what the task is sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// The guest's number for the question (its `Prompt`'s `seq`), sent with the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_seq: Option<u64>,
    pub created: Timestamp,
    pub deadline: Timestamp,
    pub state: PromptState,
    /// Set once the deadline passed while the prompt kept waiting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overdue: bool,
    /// The answer typed (answers are not secret: they are committed or written on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Who answered: `commit <id> (<file>)` or `host file <path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub answered_at: Option<Timestamp>,
    /// The answer was typed into the task's terminal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delivered: bool,
    /// Answers that were not delivered, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

impl StatusDir {
    /// The host's cancel of `task`'s run (`fleet task cancel`), if any; one that cannot
    /// be read is none.
    pub fn read_task_cancel(&self, task: &str) -> Option<HostCancel> {
        crate::driver::check_name(task).ok()?;
        self.read_file(&format!("task-cancels/{task}.yaml"))
            .ok()
            .and_then(|text| serde_saphyr::from_str(&text).ok())
    }

    pub fn write_task_cancel(&self, task: &str, cancel: &HostCancel) -> std::io::Result<()> {
        crate::driver::check_name(task).map_err(|e| std::io::Error::other(e.message))?;
        self.ensure()?;
        self.write_file(
            &format!("task-cancels/{task}.yaml"),
            yaml(cancel).as_bytes(),
        )
    }

    pub fn hitl_dir(&self) -> PathBuf {
        self.root.join("hitl")
    }

    /// Where a task's output log is, for readers (`fleet task logs`, the tests).
    pub fn task_output_path(&self, task: &str) -> PathBuf {
        self.root.join(output_log(task))
    }

    pub fn read_task_records(&self) -> BTreeMap<String, TaskRecord> {
        self.read_all("tasks", |r: &TaskRecord| r.name.clone())
    }

    /// Removes everything of a task's last run: its record, output, artifacts, its
    /// prompts' records and answer files, and a host cancel (retention pruning).
    pub fn remove_task(&self, task: &str, prompts: &[String]) -> std::io::Result<()> {
        crate::driver::check_name(task).map_err(|e| std::io::Error::other(e.message))?;
        let root = self.tree_to_write()?;
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        gone(root.remove_dir_all(Path::new("tasks").join(task)))?;
        for id in prompts {
            gone(root.remove_file(format!("hitl/{id}.yaml")))?;
            gone(root.remove_file(format!("hitl/{}", answer_file_name(id))))?;
        }
        gone(root.remove_file(format!("task-cancels/{task}.yaml")))?;
        // The record last: while it is there, a crash leaves the run listed, never a
        // record-less run's files.
        gone(root.remove_file(format!("tasks/{task}.yaml")))
    }

    pub fn write_task_record(&self, record: &TaskRecord) -> std::io::Result<()> {
        self.write_file(
            &format!("tasks/{}.yaml", record.name),
            yaml(record).as_bytes(),
        )
    }

    /// Task prompts (approval records share the directory and are left out).
    pub fn read_prompts(&self) -> BTreeMap<String, PromptRecord> {
        self.read_all_but(
            "hitl",
            |stem| ApprovalId::parse(stem).is_some(),
            |r: &PromptRecord| r.id.clone(),
        )
    }

    pub fn read_prompt(&self, id: &str) -> Option<PromptRecord> {
        let text = self.read_file(&format!("hitl/{id}.yaml")).ok()?;
        serde_saphyr::from_str(&text).ok()
    }

    pub fn write_prompt(&self, prompt: &PromptRecord) -> std::io::Result<()> {
        self.write_file(&format!("hitl/{}.yaml", prompt.id), yaml(prompt).as_bytes())
    }

    /// The host-side answer file of a prompt.
    pub fn answer_path(&self, id: &str) -> PathBuf {
        self.hitl_dir().join(answer_file_name(id))
    }

    /// Renames (or with `to: None` removes) a file in `hitl/`: host answer files taken or
    /// refused.
    pub fn move_hitl_file(&self, from: &str, to: Option<&str>) -> std::io::Result<()> {
        let hitl = self.tree()?.open_dir("hitl")?;
        match to {
            Some(to) => hitl.rename(from, &hitl, to),
            None => super::tree::remove_file(&hitl, Path::new(from)),
        }
    }

    /// Reads `hitl/<name>` (a record: never through a link).
    pub fn read_hitl_file(&self, name: &str) -> std::io::Result<String> {
        self.read_file(&format!("hitl/{name}"))
    }

    /// Writes `hitl/<name>` atomically (making `hitl/`).
    pub fn write_hitl_file(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.write_file(&format!("hitl/{name}"), bytes)
    }

    /// Whether `hitl/<name>` exists (a link counts: it is there, and is not followed).
    pub fn hitl_file_exists(&self, name: &str) -> bool {
        self.tree()
            .is_ok_and(|root| root.symlink_metadata(format!("hitl/{name}")).is_ok())
    }

    /// The names of the files in `hitl/` (empty when there is none).
    pub fn hitl_file_names(&self) -> Vec<String> {
        let Ok(dir) = self.tree().and_then(|root| root.open_dir("hitl")) else {
            return Vec::new();
        };
        let Ok(entries) = dir.entries() else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Appends connection lines (`EgressLine`, one JSON object a line) to the task's
    /// `egress.jsonl`, and makes them durable.
    pub fn append_task_egress(&self, task: &str, lines: &[u8]) -> std::io::Result<()> {
        let mut file = super::tree::open_file(
            &self.tree_to_write()?,
            &Path::new("tasks").join(task).join("egress.jsonl"),
            cap_std::fs::OpenOptions::new().create(true).append(true),
        )?;
        std::io::Write::write_all(&mut file, lines)?;
        file.sync_data()
    }

    /// Empties the task's output log and artifacts for a new run.
    pub fn reset_task_files(&self, task: &str) -> std::io::Result<()> {
        let root = self.tree_to_write()?;
        let dir = Path::new("tasks").join(task);
        match root.remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        super::tree::create_dirs(&root, &dir)?;
        super::tree::open_file(
            &root,
            &output_log(task),
            cap_std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
        )?
        .sync_all()
    }

    /// Cuts a run's output log back to `len`, the length its record accounts for: what a
    /// killed fleet appended after its last record is sent again by the guest.
    pub fn cut_task_output(&self, task: &str, len: u64) -> std::io::Result<()> {
        let file = match super::tree::open_file(
            &self.tree()?,
            &output_log(task),
            cap_std::fs::OpenOptions::new().write(true),
        ) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() > len {
            file.set_len(len)?;
            file.sync_all()?;
        }
        Ok(())
    }

    /// Writes output at `at` (the length the record accounted for when it was decided).
    /// Not synced: the task book syncs a hold's output once (`sync_task_output`) before it
    /// writes the record that counts it and acknowledges it.
    pub fn write_task_output(&self, task: &str, at: u64, data: &[u8]) -> std::io::Result<()> {
        let root = self.tree_to_write()?;
        write_at(&root, &output_log(task), at, data, None)
    }

    /// Makes what was written to an artifact durable (`relative` was checked when written).
    pub fn sync_artifact(&self, task: &str, relative: &str) -> std::io::Result<()> {
        super::tree::open_file(
            &self.tree()?,
            &Path::new("tasks")
                .join(task)
                .join("artifacts")
                .join(relative),
            cap_std::fs::OpenOptions::new().write(true),
        )?
        .sync_data()
    }

    /// How long a task's output log is now (0 when it has none).
    pub fn task_output_len(&self, task: &str) -> std::io::Result<u64> {
        match super::tree::open_file(
            &self.tree()?,
            &output_log(task),
            cap_std::fs::OpenOptions::new().read(true),
        ) {
            Ok(file) => Ok(file.metadata()?.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Makes what was written to a task's output durable.
    pub fn sync_task_output(&self, task: &str) -> std::io::Result<()> {
        match super::tree::open_file(
            &self.tree()?,
            &output_log(task),
            cap_std::fs::OpenOptions::new().write(true),
        ) {
            Ok(file) => file.sync_data(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes part of an artifact at `offset` (synced per batch: `sync_artifact`). `relative` must stay
    /// inside the artifacts directory, and `offset` may not be past the end of what is
    /// there (no holes: a guest cannot make a sparse file of any size); anything else is
    /// refused. The first part (offset 0) starts the file afresh.
    pub fn write_artifact_part(
        &self,
        task: &str,
        relative: &str,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<()> {
        let safe = !relative.is_empty()
            && Path::new(relative)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(std::io::Error::other(format!(
                "artifact path {relative:?} leaves the artifacts directory"
            )));
        }
        let root = self.tree_to_write()?;
        let path = Path::new("tasks")
            .join(task)
            .join("artifacts")
            .join(relative);
        let before = if offset == 0 {
            0
        } else {
            root.symlink_metadata(&path).map_or(0, |m| m.len())
        };
        if offset > before {
            return Err(std::io::Error::other(format!(
                "artifact {relative:?}: part at offset {offset} leaves a hole after {before} bytes"
            )));
        }
        write_at(&root, &path, offset, data, (offset == 0).then_some(0))
    }

    /// A task's artifact, whole, if it is at most `max` bytes.
    pub fn read_artifact(&self, task: &str, relative: &str, max: u64) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let path = Path::new("tasks")
            .join(task)
            .join("artifacts")
            .join(relative);
        let file = super::tree::open_file(
            &self.tree()?,
            &path,
            cap_std::fs::OpenOptions::new().read(true),
        )?;
        let mut bytes = Vec::new();
        file.take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(std::io::Error::other(format!(
                "artifact {relative:?} is larger than {max} bytes"
            )));
        }
        Ok(bytes)
    }

    /// `status/tasks/NAME/changes.patch`: what the task's run changed in its checkout.
    pub fn write_changes_patch(&self, task: &str, patch: &[u8]) -> std::io::Result<()> {
        self.write_file(&format!("tasks/{task}/changes.patch"), patch)
    }

    /// The last `max` bytes of a task's output (from a character boundary).
    pub fn task_output_tail(&self, task: &str, max: u64) -> Option<String> {
        use std::io::Read;
        let mut file = super::tree::open_file(
            &self.tree().ok()?,
            &output_log(task),
            cap_std::fs::OpenOptions::new().read(true),
        )
        .ok()?;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Some(if len > max {
            text.trim_start_matches('\u{FFFD}').to_owned()
        } else {
            text
        })
    }
}

/// A task's output log, relative to the status directory.
fn output_log(task: &str) -> PathBuf {
    Path::new("tasks").join(task).join("output.log")
}

/// The host answer file of a prompt, in `hitl/`.
pub fn answer_file_name(id: &str) -> String {
    format!("{id}.answer")
}

/// Writes `data` at `offset` in `relative` under `root` (making the file and its directory
/// if needed), after cutting the file to `cut_to` bytes when given, .
/// Never through a symlink: a guest's bytes must not land in a file a link points at.
fn write_at(
    root: &cap_std::fs::Dir,
    relative: &Path,
    offset: u64,
    data: &[u8],
    cut_to: Option<u64>,
) -> std::io::Result<()> {
    if let Some(dir) = relative.parent() {
        super::tree::create_dirs(root, dir)?;
    }
    let mut file = super::tree::open_file(
        root,
        relative,
        cap_std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false),
    )?;
    if let Some(len) = cut_to
        && file.metadata()?.len() != len
    {
        file.set_len(len)?;
    }
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

/// The runs on `vm` among `records`, as `reset` sees them.
pub fn reset_facts<'a>(
    records: impl IntoIterator<Item = &'a TaskRecord>,
    vm: &str,
) -> Vec<crate::reset::RunFacts> {
    records
        .into_iter()
        .filter(|r| r.vm == vm)
        .map(TaskRecord::reset_facts)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt whose deadline is not a time (a hand edit) is an unreadable record, left
    /// alone: never a deadline that has long passed (which would cancel its run).
    #[test]
    fn a_prompt_with_a_corrupt_deadline_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        crate::fsguard::create_private_dirs(&status.hitl_dir()).expect("dirs");
        let good = "id: build-1a2b3c4d-1\nkind: input\ntask: build\nvm: a\ntext: ok?\ncontext: []\ncreated: 2026-11-29T10:00:00Z\ndeadline: 2026-11-29T11:00:00Z\nstate: pending\n";
        std::fs::write(status.hitl_dir().join("build-1a2b3c4d-1.yaml"), good).expect("write");
        let bad = good
            .replace("-1\n", "-2\n")
            .replace("deadline: 2026-11-29T11:00:00Z", "deadline: tomorrow");
        std::fs::write(status.hitl_dir().join("build-1a2b3c4d-2.yaml"), bad).expect("write");
        let prompts = status.read_prompts();
        assert_eq!(
            prompts.keys().collect::<Vec<_>>(),
            ["build-1a2b3c4d-1"],
            "{prompts:?}"
        );
    }

    #[test]
    fn output_is_cut_back_to_what_the_record_accounts_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path());
        status.reset_task_files("t").expect("reset");
        status.write_task_output("t", 0, b"one\n").expect("write");
        // Written but never recorded (fleet stopped before the record was written)...
        status
            .write_task_output("t", 4, b"two, and more\n")
            .expect("write");
        // ... so the book cuts it back to its record when it opens, and the guest sends
        // the rest again.
        status.cut_task_output("t", 4).expect("cut");
        status.write_task_output("t", 4, b"two\n").expect("write");
        let log = std::fs::read_to_string(status.task_output_path("t")).expect("log");
        assert_eq!(log, "one\ntwo\n");
        assert_eq!(status.task_output_tail("t", 4).as_deref(), Some("two\n"));
    }

    #[test]
    fn artifacts_stay_inside_their_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path());
        status
            .write_artifact_part("t", "out/a.txt", 0, b"a")
            .expect("write");
        status
            .write_artifact_part("t", "out/a.txt", 1, b"b")
            .expect("write");
        let written = dir.path().join("tasks/t/artifacts/out/a.txt");
        assert_eq!(std::fs::read_to_string(written).expect("read"), "ab");
        for bad in ["../x", "/etc/x", "a/../../x", ""] {
            assert!(
                status.write_artifact_part("t", bad, 0, b"x").is_err(),
                "{bad}"
            );
        }
    }
}
