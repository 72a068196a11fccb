//! The status directory: summary.yaml, plan.txt, plan.json, vms/<name>.yaml, the task and
//! prompt records (`status::tasks`) and the append-only events.jsonl. Records are written
//! atomically (`atomic_file`), so a reader never sees half a file; task output and artifacts
//! are written at offsets and cut back to what their record accounts for.
//!
//! `StatusDir` knows every path in it. Besides this module, `approvals` writes approval
//! records and the task book moves host answer files, each through those paths and under
//! the status lock. Nothing here holds a secret.

mod event;
pub mod lock;
pub mod tasks;
mod tree;
mod view;

pub use crate::atomic_file::write_atomic;
pub use crate::time::timestamp;
pub use event::{Event, EventKind};
pub use view::{VmOutcome, counts, history, vm_statuses};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

use crate::observe::ObservedVm;
use crate::plan::{Plan, render};
use crate::resolve::Desired;
use crate::source::Revision;
use crate::spec::PowerState;

/// Why a host answer file is not read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerFileRefused {
    #[error("cannot be read safely ({0}); a symlink is never followed")]
    Unsafe(std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("owned by uid {0}, who may not answer")]
    Owner(u32),
    #[error("{0} bytes; an answer is one line of at most 4 KiB")]
    TooLarge(u64),
    #[error("cannot be read: {0}")]
    Unreadable(std::io::Error),
}

/// The longest host answer file read: an answer is one line of at most 4 KiB.
pub const ANSWER_FILE_BYTES: u64 = 4096 + 2;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub fleet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_applied: Option<Revision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_refused: Option<RefusedRevision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<ReconcileOutcome>,
    /// When a pass last applied a change (a plan with steps), kept across restarts.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub last_applied: Option<Timestamp>,
    pub counts: Counts,
    /// Why nothing is applied: `policy.suspend`, or `fleet suspend` on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
    /// The followed remote (host `source`), when fleet serve follows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceState>,
}

/// The followed remote as the last fetch saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceState {
    pub url: String,
    pub branch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tip: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub fetched: Option<Timestamp>,
    /// Why the last fetch failed, while it keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The host's suspension (`fleet suspend`): `status/suspended` holds who and why.
impl StatusDir {
    pub fn suspended_path(&self) -> PathBuf {
        self.root.join("suspended")
    }

    /// Why the host suspended fleet, if it did. A file that cannot be read suspends too:
    /// an emergency stop must not be lifted by a permission gone wrong.
    pub fn host_suspension(&self) -> Option<String> {
        match self.read_file("suspended") {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!("status/suspended is there but cannot be read: {e}")),
        }
    }

    /// Records (or, with `None`, lifts) the host's suspension. `fleet serve` writes the
    /// event when it sees the change (and its notification sinks hear of it).
    pub fn set_host_suspension(&self, reason: Option<&str>) -> std::io::Result<()> {
        self.ensure()?;
        match reason {
            Some(reason) => self.write_file("suspended", format!("{reason}\n").as_bytes()),
            None => match std::fs::remove_file(self.suspended_path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RefusedRevision {
    pub revision: Revision,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub at: Option<Timestamp>,
    /// `path:line:column: error: message` lines.
    pub diagnostics: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileOutcome {
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
    pub plan_digest: String,
    pub steps: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub conflicts: usize,
    pub outcome: Outcome,
}

/// How a reconcile ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every step ran and nothing conflicts.
    Converged,
    /// Some steps failed, or some VMs conflict.
    Partial,
    /// Every step failed.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Converged => "converged",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a VM's condition is about.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ConditionKind {
    Ready,
    Drifted,
    Conflict,
    AgentConnected,
    /// It keeps stopping on its own, and its restarts back off.
    CrashLooping,
    /// Whether the last pass could observe its provider (false: the provider could not be
    /// reached or read; what the VM does is unknown, and nothing was planned for it).
    ProviderObserved,
}

impl std::fmt::Display for ConditionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub vms: usize,
    pub running: usize,
    pub stopped: usize,
    pub pending: usize,
    pub failed: usize,
    pub conflicts: usize,
    #[serde(default)]
    pub drifted: usize,
    /// On a provider the last pass could not observe.
    #[serde(default)]
    pub unknown: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Stopped,
    Failed,
    /// Its provider could not be observed: fleet does not know what it does.
    Unknown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Stopped => "Stopped",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionKind,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    pub name: String,
    pub provider: String,
    pub phase: Phase,
    pub desired_state: PowerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedResources>,
    pub spec_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<String>,
    pub source: String,
    /// The guest agent, when the daemon follows this VM's agent link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Its lease (`lease`), as the last pass judged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseStatus>,
    /// When a pass last saw it start running (kept while it is stopped): where its idle
    /// time counts from when no task run is more recent (`idle`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub started: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub updated: Option<Timestamp>,
}

/// A VM's lease: when it began and ends, and what its end does.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    pub started: Timestamp,
    pub ends: Timestamp,
    pub on_expiry: crate::lease::LeaseExpiry,
    /// What `fleet lease renew` gives without `--for`: the lease's `ttl`, in seconds.
    pub ttl_seconds: u64,
}

impl LeaseStatus {
    /// `1h 12m left (then stop)` or `ended 12m ago: stopped until renewed`, at `now`.
    pub fn describe(&self, now: std::time::SystemTime) -> String {
        let ends = self.ends.system_time();
        let minutes = |d: std::time::Duration| {
            // To the second under a minute, else to the minute: "12m", not "12m 3s".
            let secs = if d.as_secs() < 60 {
                d.as_secs()
            } else {
                d.as_secs() / 60 * 60
            };
            humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
        };
        match ends.duration_since(now) {
            Ok(left) if !left.is_zero() => format!(
                "lease: {} left (then {})",
                minutes(left),
                self.on_expiry.as_str()
            ),
            _ => {
                let ago = now.duration_since(ends).unwrap_or_default();
                let what = match self.on_expiry {
                    crate::lease::LeaseExpiry::Stop => "stopped",
                    crate::lease::LeaseExpiry::Destroy => "destroyed",
                };
                format!("lease ended {} ago: {what} until renewed", minutes(ago))
            }
        }
    }
}

/// A revert to a snapshot asked for from the host (`fleet snapshot revert`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostRevert {
    pub vm: String,
    pub snapshot: String,
    pub by: String,
    #[serde(default, deserialize_with = "crate::time::lenient_option")]
    pub asked: Option<Timestamp>,
}

/// The guest agent of a VM, as the daemon's link to it last saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub connected: bool,
    pub agent_version: String,
    /// Changes at every boot of the guest.
    pub boot_id: String,
    /// When the agent last said hello.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub since: Option<Timestamp>,
    /// The guest's network interfaces and addresses, as its agent last reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<GuestInterface>,
}

impl VmStatus {
    /// The addresses its agent reported that an operator can reach it at.
    pub fn reachable_addresses(&self) -> Vec<&str> {
        self.agent
            .as_ref()
            .map(AgentStatus::reachable_addresses)
            .unwrap_or_default()
    }
}

impl AgentStatus {
    /// The addresses the guest reported that an operator can reach it at (link-local ones
    /// left out).
    pub fn reachable_addresses(&self) -> Vec<&str> {
        self.interfaces
            .iter()
            .flat_map(|i| &i.addresses)
            .map(String::as_str)
            .filter(|a| !a.starts_with("fe80:") && !a.starts_with("169.254."))
            .collect()
    }
}

/// A network interface of a guest, as its agent reported it, checked: a guest may send
/// anything, and what is kept is at most `MAX_INTERFACES` interfaces of `MAX_ADDRESSES`
/// addresses each, with a plain name, a MAC in its usual form and parsed addresses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GuestInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl GuestInterface {
    pub const MAX_INTERFACES: usize = 16;
    pub const MAX_ADDRESSES: usize = 16;

    /// What of the guest's report is kept: interfaces whose name is a plain interface name
    /// (at most 15 characters, as Linux allows), addresses that parse (written canonically),
    /// a MAC only in `aa:bb:cc:dd:ee:ff` form.
    pub fn from_guest(reported: &[fleet_agent_protocol::Interface]) -> Vec<GuestInterface> {
        reported
            .iter()
            .filter(|i| {
                !i.name.is_empty()
                    && i.name.len() <= 15
                    && i.name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            })
            .take(Self::MAX_INTERFACES)
            .map(|i| GuestInterface {
                name: i.name.clone(),
                mac: i.mac.as_ref().filter(|m| plain_mac(m)).cloned(),
                addresses: i
                    .addresses
                    .iter()
                    .filter_map(|a| {
                        a.parse::<ipnet::IpNet>()
                            .map(|n| n.to_string())
                            .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| ip.to_string()))
                            .ok()
                    })
                    .take(Self::MAX_ADDRESSES)
                    .collect(),
            })
            .collect()
    }
}

fn plain_mac(mac: &str) -> bool {
    mac.len() == 17
        && mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedResources {
    pub uuid: String,
    pub running: bool,
    pub cpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

/// The status directory.
#[derive(Clone, Debug)]
pub struct StatusDir {
    root: PathBuf,
    /// Told of every event appended (`notify`), when `fleet serve` sends them on.
    listener: Option<EventListener>,
    /// When the logs (`append_line`) start a new file, shared by every clone.
    rotation: std::sync::Arc<LogRotation>,
}

/// `policy.retention`'s log size and file count: a log past `bytes` becomes `NAME.1` (and
/// `.1` becomes `.2`, … up to `files`) before a line is appended.
#[derive(Debug)]
struct LogRotation {
    bytes: std::sync::atomic::AtomicU64,
    files: std::sync::atomic::AtomicU32,
    /// Set by this process (`fleet serve`, from the policy); otherwise what it last wrote
    /// to `ROTATION_FILE` is used.
    set: std::sync::atomic::AtomicBool,
}

impl Default for LogRotation {
    fn default() -> LogRotation {
        let defaults = crate::resolve::ResolvedRetention::default();
        LogRotation {
            bytes: defaults.log_bytes.into(),
            files: defaults.log_files.into(),
            set: false.into(),
        }
    }
}

/// The rotation `fleet serve` follows, for other fleet processes writing the same logs.
const ROTATION_FILE: &str = "log-rotation.json";

/// How long an append waits for a log's lock before appending without it.
const LOG_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An exclusive flock on `file` (through a duplicate of its descriptor, which shares the
/// lock), or `None` when it cannot be had within `LOG_LOCK_WAIT`.
fn lock_log(file: &std::fs::File) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let deadline = std::time::Instant::now() + LOG_LOCK_WAIT;
    loop {
        match nix::fcntl::Flock::lock(
            file.try_clone()?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(lock) => return Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::warn!(
                    "a log's lock is held elsewhere for over {LOG_LOCK_WAIT:?}; appending without it"
                );
                return Ok(None);
            }
            Err((_, errno)) => return Err(errno.into()),
        }
    }
}

/// Appends and rotations of this process, one at a time: two writers past the size must
/// not both rotate.
static APPENDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What `StatusDir::append_event` tells of each event, after it is written.
#[derive(Clone)]
pub struct EventListener(pub std::sync::Arc<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for EventListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventListener")
    }
}

impl StatusDir {
    pub fn new(root: impl Into<PathBuf>) -> StatusDir {
        StatusDir {
            root: root.into(),
            listener: None,
            rotation: Default::default(),
        }
    }

    /// Logs start a new file past `bytes`, keeping `files` older ones: for every clone of
    /// this directory, and (through `log-rotation.json`, written when it changes) for every
    /// other fleet process writing it.
    pub fn set_log_rotation(&self, bytes: u64, files: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let (bytes, files) = (bytes.max(1), files.max(1));
        let before = (
            self.rotation.bytes.swap(bytes, Relaxed),
            self.rotation.files.swap(files, Relaxed),
        );
        // Written the first time this process sets it and when it changes: not read back
        // on every pass.
        let first = !self.rotation.set.swap(true, Relaxed);
        if first || before != (bytes, files) {
            let settings = serde_json::json!({"bytes": bytes, "files": files});
            let _ = self.write_file(ROTATION_FILE, settings.to_string().as_bytes());
        }
    }

    /// `(bytes, files)`: as set in this process, or as the daemon last wrote them, or the
    /// defaults.
    fn rotation(&self, dir: &cap_std::fs::Dir) -> (u64, u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let own = (
            self.rotation.bytes.load(Relaxed),
            self.rotation.files.load(Relaxed),
        );
        if self.rotation.set.load(Relaxed) {
            return own;
        }
        tree::read_to_string(dir, Path::new(ROTATION_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                let bytes = v["bytes"].as_u64().filter(|b| *b > 0)?;
                let files = u32::try_from(v["files"].as_u64()?)
                    .ok()
                    .filter(|f| (1..=100).contains(f))?;
                Some((bytes, files))
            })
            .unwrap_or(own)
    }

    /// `name`, then `name.1`, … `name.N`: what is there of a log, newest first.
    pub fn log_files(&self, name: &str, files: u32) -> Vec<String> {
        std::iter::once(name.to_owned())
            .chain((1..=files).map(|i| format!("{name}.{i}")))
            .collect()
    }

    /// Shifts `name.K` to `name.K+1` (the last one goes) and `name` to `name.1`.
    fn rotate(&self, dir: &cap_std::fs::Dir, name: &str, files: u32) -> std::io::Result<()> {
        let names = self.log_files(name, files);
        if let Some(last) = names.last() {
            match dir.remove_file(last) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for pair in names.windows(2).rev() {
            match dir.rename(&pair[0], dir, &pair[1]) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// This directory, telling `listener` of each event appended through it (or a clone).
    pub fn with_listener(mut self, listener: EventListener) -> StatusDir {
        self.listener = Some(listener);
        self
    }

    /// Appends one JSON line to `name` (a log under the directory), ending a line a killed
    /// writer left torn first.
    pub fn append_line(&self, name: &str, value: &impl Serialize) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let _one_at_a_time = APPENDING.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.tree_to_write()?;
        let (limit, files) = self.rotation(&dir);
        // Other processes append too (a one-shot `fleet apply`, `fleet hitl answer`): an
        // exclusive flock on the log covers the size check, a rotation and the append. A
        // lock won on a file another process has since rotated away is let go and the
        // log's new file locked instead. A lock not had within `LOG_LOCK_WAIT` (someone
        // who may read the log holds it) is done without: the line is appended, unrotated.
        let open = || {
            tree::open_file(
                &dir,
                Path::new(name),
                cap_std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(true),
            )
        };
        let (mut f, mut lock) = loop {
            let file = open()?;
            let Some(lock) = lock_log(&file)? else {
                break (file, None);
            };
            let current = {
                use cap_fs_ext::OsMetadataExt;
                match dir.symlink_metadata(name) {
                    Ok(m) => (m.dev(), m.ino()),
                    // Rotated away, the new file not made yet: open it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            };
            let held = file.metadata()?;
            if (held.dev(), held.ino()) == current {
                break (file, Some(lock));
            }
        };
        let mut len = f.metadata()?.len();
        if lock.is_some() && len > 0 && len.saturating_add(line.len() as u64) > limit {
            match self.rotate(&dir, name, files) {
                Ok(()) => {
                    // Still holding the old file's lock: a writer waiting on it will find
                    // it gone and come to the new one.
                    f = open()?;
                    lock = lock_log(&f)?;
                    len = f.metadata()?.len();
                }
                // The line goes into the file it has; the next append tries again.
                Err(e) => tracing::warn!("cannot rotate {name}: {e}"),
            }
        }
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8];
            f.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        f.write_all(&line)?;
        f.sync_data()?;
        drop(lock);
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn journal_path(&self) -> PathBuf {
        self.root.join("journal.jsonl")
    }

    /// Creates the directory, with `.gitignore` files so status never lands in a commit.
    /// Makes the status directory (0750) and checks that it can be trusted: it and every
    /// directory above it belong to root or fleet's user and nobody else can write them.
    /// Otherwise anyone who could would swap a file fleet writes for a link to a host file.
    pub fn ensure(&self) -> std::io::Result<()> {
        crate::fsguard::check_owned_chain(&self.root).map_err(|why| {
            std::io::Error::other(format!(
                "refusing the status directory {}: {why}",
                self.root.display()
            ))
        })?;
        // Directories above it are not fleet's records (the storage of VMs may live beside
        // it): only the status directory itself is made private.
        if let Some(parent) = self.root.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::fsguard::create_private_dirs(&self.root.join("vms"))?;
        // An older fleet made it world-readable: what the guests wrote is no one else's.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::symlink_metadata(&self.root)
                && meta.is_dir()
                && meta.permissions().mode() & 0o007 != 0
            {
                std::fs::set_permissions(
                    &self.root,
                    std::fs::Permissions::from_mode(crate::fsguard::DIR_MODE),
                )?;
            }
        }
        if self.tree()?.symlink_metadata(".gitignore").is_err() {
            self.write_file(".gitignore", b"*\n")?;
        }
        if let Some(parent) = self.root.parent()
            && parent.file_name().is_some_and(|n| n == ".fleet")
        {
            let ignore = parent.join(".gitignore");
            if !ignore.exists() {
                write_atomic(&ignore, b"*\n")?;
            }
        }
        Ok(())
    }

    /// The directory's handle: every file below is reached through it (`tree`).
    fn tree(&self) -> std::io::Result<cap_std::fs::Dir> {
        tree::open(&self.root)
    }

    /// The handle, for a writer: the directory is made (0750) when missing.
    fn tree_to_write(&self) -> std::io::Result<cap_std::fs::Dir> {
        match tree::open(&self.root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::fsguard::create_private_dirs(&self.root)?;
                tree::open(&self.root)
            }
            opened => opened,
        }
    }

    fn read_file(&self, relative: &str) -> std::io::Result<String> {
        tree::read_to_string(&self.tree()?, Path::new(relative))
    }

    /// Writes `relative` atomically, making its directories (0750) first.
    fn write_file(&self, relative: &str, bytes: &[u8]) -> std::io::Result<()> {
        let relative = Path::new(relative);
        let (Some(parent), Some(name)) = (relative.parent(), relative.file_name()) else {
            return Err(std::io::Error::other(format!(
                "{} names no file",
                relative.display()
            )));
        };
        let root = self.tree_to_write()?;
        tree::create_dirs(&root, parent)?;
        let dir = if parent.as_os_str().is_empty() {
            root
        } else {
            root.open_dir(parent)?
        };
        crate::atomic_file::write_atomic_in(&dir, Path::new(name), bytes)
    }

    /// Every `*.yaml` in the directory `relative` that parses as a `T`, by `key`.
    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        relative: &str,
        key: impl Fn(&T) -> String,
    ) -> BTreeMap<String, T> {
        self.read_all_but(relative, |_| false, key)
    }

    /// As `read_all`, leaving out the files whose name (without `.yaml`) `skip` picks:
    /// records of another kind that share the directory.
    fn read_all_but<T: serde::de::DeserializeOwned>(
        &self,
        relative: &str,
        skip: impl Fn(&str) -> bool,
        key: impl Fn(&T) -> String,
    ) -> BTreeMap<String, T> {
        let mut out = BTreeMap::new();
        let Ok(dir) = self.tree().and_then(|root| root.open_dir(relative)) else {
            return out;
        };
        let Ok(entries) = dir.entries() else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = Path::new(&name);
            let stem = name
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if name.extension().is_some_and(|e| e == "yaml")
                && !skip(stem)
                && let Ok(text) = tree::read_to_string(&dir, name)
            {
                match serde_saphyr::from_str::<T>(&text) {
                    Ok(record) => {
                        out.insert(key(&record), record);
                    }
                    Err(e) => tracing::warn!(
                        "{}: unreadable, left alone: {e}",
                        self.root.join(relative).join(name).display()
                    ),
                }
            }
        }
        out
    }

    /// Reads the host answer file `file_name` in `hitl/`, which anyone who may answer can
    /// write, so it is read warily: never through a symlink (a root-only file would be
    /// typed into a guest), never blocking (a FIFO would hang every link), only a regular
    /// file owned by root, fleet's user or the owner of the hitl directory, and at most
    /// `ANSWER_FILE_BYTES`. `None` when there is no such file, or it is still empty (a
    /// shell's `echo yes > f` creates the file before it writes the line, and a reader in
    /// between must not take "" for the answer); `Some(Err(why))` when there is one that
    /// is refused.
    pub fn read_answer_file(&self, file_name: &str) -> Option<Result<String, AnswerFileRefused>> {
        use cap_std::fs::OpenOptionsExt;
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let hitl = match self.tree().and_then(|root| root.open_dir("hitl")) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(Err(AnswerFileRefused::Unsafe(e))),
        };
        let file = match tree::open_file(
            &hitl,
            Path::new(file_name),
            cap_std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK),
        ) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(Err(AnswerFileRefused::Unsafe(e))),
        };
        let result = (|| {
            let meta = file.metadata().map_err(AnswerFileRefused::Unreadable)?;
            if !meta.file_type().is_file() {
                return Err(AnswerFileRefused::NotRegular);
            }
            let me = nix::unistd::geteuid().as_raw();
            let dir_owner = hitl
                .dir_metadata()
                .ok()
                .map(|m| cap_std::fs::MetadataExt::uid(&m));
            if meta.uid() != 0 && meta.uid() != me && Some(meta.uid()) != dir_owner {
                return Err(AnswerFileRefused::Owner(meta.uid()));
            }
            if meta.len() > ANSWER_FILE_BYTES {
                return Err(AnswerFileRefused::TooLarge(meta.len()));
            }
            let mut text = String::new();
            file.take(ANSWER_FILE_BYTES)
                .read_to_string(&mut text)
                .map_err(AnswerFileRefused::Unreadable)?;
            Ok(text)
        })();
        match result {
            Ok(text) if text.is_empty() => None,
            other => Some(other),
        }
    }

    pub fn append_event(&self, event: &Event) -> std::io::Result<()> {
        self.append_line("events.jsonl", event)?;
        if let Some(listener) = &self.listener {
            (listener.0)(event);
        }
        Ok(())
    }

    /// The event log, for reading (`fleet events`); never through a link.
    pub fn open_events(&self) -> std::io::Result<std::fs::File> {
        tree::open_file(
            &self.tree()?,
            Path::new("events.jsonl"),
            cap_std::fs::OpenOptions::new().read(true),
        )
    }

    /// The event log's older files (rotated by size), oldest first; the current file is
    /// `open_events`.
    pub fn open_rotated_events(&self) -> Vec<std::fs::File> {
        let Ok(dir) = self.tree() else {
            return Vec::new();
        };
        // Up to the first gap: this process may not know the policy's file count.
        let mut files: Vec<std::fs::File> = (1..=100)
            .map_while(|i| {
                tree::open_file(
                    &dir,
                    Path::new(&format!("events.jsonl.{i}")),
                    cap_std::fs::OpenOptions::new().read(true),
                )
                .ok()
            })
            .collect();
        files.reverse();
        files
    }

    pub fn read_summary(&self) -> Option<Summary> {
        let text = self.read_file("summary.yaml").ok()?;
        serde_saphyr::from_str(&text).ok()
    }

    pub fn write_summary(&self, summary: &Summary) -> std::io::Result<()> {
        self.write_file("summary.yaml", yaml(summary).as_bytes())
    }

    pub fn write_plan(&self, plan: &Plan) -> std::io::Result<()> {
        self.write_file("plan.txt", render::text(plan).as_bytes())?;
        self.write_file("plan.json", render::json(plan).as_bytes())
    }

    /// Records the revision in force (the last one loaded) and whether it allows a tip
    /// that does not descend from it (`in-force.json`): what the rollback check of the
    /// next `fleet serve` starts from, whether or not that revision was applied yet.
    pub fn write_in_force(&self, commit: &str, allow_rollback: bool) -> std::io::Result<()> {
        let json = serde_json::json!({ "revision": commit, "allowRollback": allow_rollback });
        self.write_file("in-force.json", json.to_string().as_bytes())
    }

    /// What `write_in_force` recorded.
    pub fn read_in_force(&self) -> Option<(String, bool)> {
        let json: serde_json::Value =
            serde_json::from_str(&self.read_file("in-force.json").ok()?).ok()?;
        Some((
            json.get("revision")?.as_str()?.to_owned(),
            json.get("allowRollback")?.as_bool()?,
        ))
    }

    /// Publishes the plan of a preview ref at `commit` (`previews/<slug>/plan.md`,
    /// `plan.json`, and `commit` last, so a plan is never taken as made for a commit it
    /// was not made for).
    pub fn write_preview(
        &self,
        slug: &str,
        commit: &str,
        markdown: &str,
        json: &str,
    ) -> std::io::Result<()> {
        self.write_file(&format!("previews/{slug}/plan.md"), markdown.as_bytes())?;
        self.write_file(&format!("previews/{slug}/plan.json"), json.as_bytes())?;
        self.write_file(&format!("previews/{slug}/commit"), commit.as_bytes())
    }

    /// The commit the preview `slug` was last planned at.
    pub fn preview_commit(&self, slug: &str) -> Option<String> {
        self.read_file(&format!("previews/{slug}/commit")).ok()
    }

    /// The plan last written (`plan.txt`, `plan.json`), for the page.
    pub fn read_plan_files(&self) -> (Option<String>, Option<Vec<u8>>) {
        let text = self.read_file("plan.txt").ok();
        let json = self.read_file("plan.json").ok().map(String::into_bytes);
        (text, json)
    }

    /// The secret fingerprints fleet last delivered from (`secrets.yaml`; never values).
    pub fn read_secrets_seen(&self) -> crate::plan::secrets::SecretsSeen {
        self.read_file("secrets.yaml")
            .ok()
            .and_then(|text| serde_saphyr::from_str(&text).ok())
            .unwrap_or_default()
    }

    pub fn write_secrets_seen(
        &self,
        seen: &crate::plan::secrets::SecretsSeen,
    ) -> std::io::Result<()> {
        if *seen == self.read_secrets_seen() {
            return Ok(());
        }
        self.write_file("secrets.yaml", yaml(seen).as_bytes())
    }

    /// Where each member of a placed pool runs (`placement::Record`, `placement.yaml`);
    /// empty when there is none. One that cannot be read or parsed is logged and taken as
    /// empty: placement then goes by what it observes, and a member whose pool has a
    /// provider it cannot see waits, so none is made twice.
    pub fn read_placement(&self) -> crate::placement::Record {
        self.try_read_placement().unwrap_or_else(|e| {
            tracing::error!("{e}");
            Default::default()
        })
    }

    fn try_read_placement(&self) -> Result<crate::placement::Record, String> {
        match self.read_file("placement.yaml") {
            Ok(text) => serde_saphyr::from_str(&text)
                .map_err(|e| format!("placement.yaml in the status directory is unreadable: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(format!("placement.yaml in the status directory: {e}")),
        }
    }

    /// Records `record`, unless it is recorded already. A record that cannot be read is
    /// left as it is, for the operator to mend or remove: overwriting it would forget
    /// members on providers fleet cannot see now.
    pub fn write_placement(&self, record: &crate::placement::Record) -> std::io::Result<()> {
        match self.try_read_placement() {
            Ok(current) if current == *record => Ok(()),
            Ok(_) => self.write_file("placement.yaml", yaml(record).as_bytes()),
            Err(e) => {
                tracing::error!("{e}; it is left as it is: mend or remove it");
                Ok(())
            }
        }
    }

    /// What fleet remembers of each VM's lease (`leases.yaml`; see `lease`).
    pub fn read_leases(&self) -> BTreeMap<String, crate::lease::LeaseRecord> {
        self.read_file("leases.yaml")
            .ok()
            .and_then(|text| serde_saphyr::from_str(&text).ok())
            .unwrap_or_default()
    }

    pub fn write_leases(
        &self,
        leases: &BTreeMap<String, crate::lease::LeaseRecord>,
    ) -> std::io::Result<()> {
        if *leases == self.read_leases() {
            return Ok(());
        }
        self.write_file("leases.yaml", yaml(leases).as_bytes())
    }

    /// The renewal of `vm`'s lease given from the host (`lease-renewals/<vm>.yaml`, written
    /// by `fleet lease renew`; a file of its own, so the command and a running fleet serve
    /// never overwrite each other's).
    pub fn read_host_renewal(&self, vm: &str) -> Option<crate::lease::Renewal> {
        crate::driver::check_name(vm).ok()?;
        self.read_file(&format!("lease-renewals/{vm}.yaml"))
            .ok()
            .and_then(|text| serde_saphyr::from_str(&text).ok())
    }

    pub fn write_host_renewal(
        &self,
        vm: &str,
        renewal: &crate::lease::Renewal,
    ) -> std::io::Result<()> {
        crate::driver::check_name(vm).map_err(|e| std::io::Error::other(e.message))?;
        self.ensure()?;
        self.write_file(
            &format!("lease-renewals/{vm}.yaml"),
            yaml(renewal).as_bytes(),
        )
    }

    /// The reverts to a snapshot the host asked for (`snapshot-reverts/<vm>.yaml`, written
    /// by `fleet snapshot revert`, removed once the revert ran or failed), by VM.
    pub fn read_reverts(&self) -> BTreeMap<String, HostRevert> {
        self.read_all("snapshot-reverts", |r: &HostRevert| r.vm.clone())
            .into_iter()
            .filter(|(vm, _)| crate::driver::check_name(vm).is_ok())
            .collect()
    }

    pub fn write_revert(&self, revert: &HostRevert) -> std::io::Result<()> {
        crate::driver::check_name(&revert.vm).map_err(|e| std::io::Error::other(e.message))?;
        self.ensure()?;
        self.write_file(
            &format!("snapshot-reverts/{}.yaml", revert.vm),
            yaml(revert).as_bytes(),
        )
    }

    /// The revert of `vm` to `snapshot` ran or failed: its request goes (unless a newer one, to
    /// another snapshot, replaced it meanwhile).
    pub fn clear_revert(&self, vm: &str, snapshot: &str) -> std::io::Result<()> {
        if self
            .read_reverts()
            .get(vm)
            .is_none_or(|r| r.snapshot != snapshot)
        {
            return Ok(());
        }
        match self
            .tree_to_write()?
            .remove_file(format!("snapshot-reverts/{vm}.yaml"))
        {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether a run was dispatched to `vm` since it was made or last reset (`reset`;
    /// `used/<vm>`, marked by the task book after the run's record and before the run
    /// reaches the guest, cleared by apply once a reset, create, replace or destroy of the
    /// VM has run). A mark that cannot be read
    /// counts as there: one reset too many, never a run on a used disk.
    pub fn is_used(&self, vm: &str) -> bool {
        if crate::driver::check_name(vm).is_err() {
            return true;
        }
        match self.read_file(&format!("used/{vm}")) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    }

    pub fn mark_used(&self, vm: &str) -> std::io::Result<()> {
        crate::driver::check_name(vm).map_err(|e| std::io::Error::other(e.message))?;
        self.write_file(
            &format!("used/{vm}"),
            b"a run was dispatched since its last reset\n",
        )
    }

    pub fn clear_used(&self, vm: &str) -> std::io::Result<()> {
        crate::driver::check_name(vm).map_err(|e| std::io::Error::other(e.message))?;
        tree::remove_file(&self.tree_to_write()?, &Path::new("used").join(vm))
    }

    pub fn read_vms(&self) -> BTreeMap<String, VmStatus> {
        self.read_all("vms", |vm: &VmStatus| vm.name.clone())
    }

    /// Rewrites `vms/` to hold exactly `vms`; a file whose content is unchanged (but for
    /// its `updated` time) is left as it is.
    pub fn write_vms(&self, vms: &BTreeMap<String, VmStatus>) -> std::io::Result<()> {
        let existing = self.read_vms();
        for vm in vms.values() {
            let unchanged = existing.get(&vm.name).is_some_and(|old| {
                VmStatus {
                    updated: old.updated,
                    ..vm.clone()
                } == *old
            });
            if !unchanged {
                self.write_file(&format!("vms/{}.yaml", vm.name), yaml(vm).as_bytes())?;
            }
        }
        let dir = self.tree_to_write()?;
        tree::create_dirs(&dir, Path::new("vms"))?;
        for entry in dir.read_dir("vms")?.flatten() {
            let name = entry.file_name();
            let name = Path::new(&name);
            let stem = name
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if name.extension().is_some_and(|e| e == "yaml") && !vms.contains_key(stem) {
                tree::remove_file(&dir, &Path::new("vms").join(name))?;
            }
        }
        Ok(())
    }

    /// Records a revision that failed validation; the last good one stays in force.
    pub fn record_refused(
        &self,
        fleet_hint: &str,
        revision: &Revision,
        reasons: &[String],
        now: SystemTime,
    ) -> std::io::Result<()> {
        self.ensure()?;
        let mut summary = self.read_summary().unwrap_or_default();
        if summary.fleet.is_empty() {
            summary.fleet = fleet_hint.to_owned();
        }
        summary.revision_refused = Some(RefusedRevision {
            revision: revision.clone(),
            at: Some(now.into()),
            diagnostics: reasons.to_vec(),
        });
        self.write_summary(&summary)?;
        let message = format!(
            "revision {} refused: {}{}; the last good revision stays in force",
            revision.label,
            reasons.first().map_or("", String::as_str),
            match reasons.len() {
                0 | 1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        );
        self.append_event(
            &Event::fleet(
                EventKind::RevisionRefused,
                Some(revision.id.clone()),
                message,
            )
            .at(now),
        )
    }
}

pub(crate) fn yaml<T: Serialize>(value: &T) -> String {
    serde_saphyr::to_string(value).expect("status values serialise to YAML")
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use fleet_agent_protocol::Interface;

    fn reported(name: &str, mac: Option<&str>, addresses: &[&str]) -> Interface {
        Interface {
            name: name.to_owned(),
            mac: mac.map(str::to_owned),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// A guest's report is kept only as far as it is plain: names, MACs and addresses that
    /// parse, a bounded number of each.
    #[test]
    fn what_a_guest_reports_is_checked_and_bounded() {
        let many: Vec<String> = (0..40).map(|i| format!("10.0.0.{i}/24")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut report = vec![
            reported(
                "eth0",
                Some("52:54:00:ab:cd:ef"),
                &[
                    "192.168.150.23/24",
                    "fe80::5054:ff:feab:cdef/64",
                    "not-an-address",
                    "10.1.2.3",
                ],
            ),
            reported("eth1\u{1b}[2J", None, &["10.9.9.9/8"]),
            reported("eth2", Some("<script>"), &many),
            reported("", None, &[]),
        ];
        report.extend((0..40).map(|i| reported(&format!("dummy{i}"), None, &[])));
        let kept = GuestInterface::from_guest(&report);
        assert_eq!(kept.len(), GuestInterface::MAX_INTERFACES);
        assert_eq!(
            kept[0],
            GuestInterface {
                name: "eth0".into(),
                mac: Some("52:54:00:ab:cd:ef".into()),
                addresses: vec![
                    "192.168.150.23/24".into(),
                    "fe80::5054:ff:feab:cdef/64".into(),
                    "10.1.2.3".into()
                ],
            }
        );
        assert_eq!(kept[1].name, "eth2", "a name with an escape is dropped");
        assert_eq!(kept[1].mac, None);
        assert_eq!(kept[1].addresses.len(), GuestInterface::MAX_ADDRESSES);
        let agent = AgentStatus {
            connected: true,
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
            since: None,
            interfaces: kept,
        };
        assert_eq!(
            agent.reachable_addresses()[..2],
            ["192.168.150.23/24", "10.1.2.3"]
        );
    }
}

#[cfg(test)]
mod placement_record_tests {
    use super::*;

    #[test]
    fn a_placement_record_is_kept_and_one_that_cannot_be_read_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path());
        assert!(status.read_placement().is_empty());
        let record: crate::placement::Record = [("p-01".to_owned(), "far".to_owned())].into();
        status.write_placement(&record).expect("write");
        assert_eq!(status.read_placement(), record);
        // Unreadable: taken as empty, and left as it is.
        std::fs::write(dir.path().join("placement.yaml"), "p-01: [far").expect("write");
        assert!(status.read_placement().is_empty());
        status
            .write_placement(&Default::default())
            .expect("no error");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("placement.yaml")).expect("read"),
            "p-01: [far"
        );
    }
}

#[cfg(test)]
mod answer_file_tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn answer_files_are_read_only_when_plain_small_and_not_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path());
        let read_answer_file = |path: &Path| {
            let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
            status.read_answer_file(name)
        };
        assert!(read_answer_file(&dir.path().join("hitl/x.answer")).is_none());
        crate::fsguard::create_private_dirs(&status.hitl_dir()).expect("hitl");
        let path = |name: &str| status.hitl_dir().join(name);
        assert!(read_answer_file(&path("missing.answer")).is_none());

        std::fs::write(path("good.answer"), "yes\n").expect("write");
        assert_eq!(
            read_answer_file(&path("good.answer")).map(|r| r.ok()),
            Some(Some("yes\n".to_owned()))
        );
        // Created and not yet written: no answer yet, and not an empty one.
        std::fs::write(path("empty.answer"), "").expect("write");
        assert!(read_answer_file(&path("empty.answer")).is_none());

        std::fs::write(path("big.answer"), "y".repeat(1 << 20)).expect("write");
        let why = read_answer_file(&path("big.answer"))
            .expect("there")
            .expect_err("too big")
            .to_string();
        assert!(why.contains("at most 4 KiB"), "{why}");

        // A secret of the host, linked as an answer: never read through the link.
        std::os::unix::fs::symlink("/etc/shadow", path("link.answer")).expect("symlink");
        let why = read_answer_file(&path("link.answer"))
            .expect("there")
            .expect_err("symlink")
            .to_string();
        assert!(why.contains("symlink"), "{why}");

        // /dev/zero would exhaust memory, a FIFO would block: neither is a regular file.
        std::os::unix::fs::symlink("/dev/zero", path("zero.answer")).expect("symlink");
        assert!(matches!(
            read_answer_file(&path("zero.answer")),
            Some(Err(_))
        ));
        let fifo = path("fifo.answer");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let started = std::time::Instant::now();
        let why = read_answer_file(&fifo)
            .expect("there")
            .expect_err("a FIFO")
            .to_string();
        assert!(why.contains("not a regular file"), "{why}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "did not block"
        );
    }
}

#[cfg(test)]
mod hygiene_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_status_directory_is_private_and_never_writes_through_a_link() {
        let top = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let status = StatusDir::new(top.path().join(".fleet/status"));
        status.ensure().expect("a trusted place");
        assert_eq!(mode(status.root()), 0o750);
        assert_eq!(mode(&status.root().join("vms")), 0o750);
        write_atomic(&status.root().join("summary.yaml"), b"x").expect("write");
        assert_eq!(mode(&status.root().join("summary.yaml")), 0o640);

        // A link where events.jsonl goes, to a file someone wants written: refused, the
        // target untouched.
        let target = top.path().join("victim");
        std::fs::write(&target, b"before").expect("victim");
        std::os::unix::fs::symlink(&target, status.root().join("events.jsonl")).expect("link");
        let event = Event::fleet(EventKind::SecretError, None, "$(reboot)".into());
        assert!(status.append_event(&event).is_err());
        // And where a task's output goes.
        status.reset_task_files("t").expect("task files");
        let output = status.task_output_path("t");
        std::fs::remove_file(&output).expect("rm");
        std::os::unix::fs::symlink(&target, &output).expect("link");
        assert!(status.write_task_output("t", 0, b"guest bytes").is_err());
        assert_eq!(std::fs::read(&target).expect("victim"), b"before");

        // A directory on the way swapped for a link out of the status directory: nothing
        // is written through it either (every path is resolved beneath the directory).
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        let task_dir = status.root().join("tasks/u");
        status.reset_task_files("u").expect("task files");
        std::fs::remove_dir_all(&task_dir).expect("rm");
        std::os::unix::fs::symlink(&elsewhere, &task_dir).expect("link");
        assert!(status.write_task_output("u", 0, b"guest bytes").is_err());
        assert!(
            status
                .write_artifact_part("u", "out/a.txt", 0, b"guest bytes")
                .is_err()
        );
        std::fs::remove_file(&task_dir).expect("rm link");
        std::os::unix::fs::symlink(&elsewhere, status.root().join("hitl")).expect("link");
        let prompt = status.write_hitl_file("p.yaml", b"guest text");
        assert!(prompt.is_err(), "written through hitl -> elsewhere");
        assert_eq!(
            std::fs::read_dir(&elsewhere).expect("ls").count(),
            0,
            "nothing landed outside"
        );

        // Under a directory anyone may write (and not sticky): refused, naming it.
        let open = top.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let why = StatusDir::new(open.join("status"))
            .ensure()
            .expect_err("a directory others can write")
            .to_string();
        assert!(why.contains("chmod go-w"), "{why}");
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use std::io::Read as _;

    fn event(i: usize) -> Event {
        Event::fleet(
            EventKind::ApplyFinished,
            None,
            format!("event number {i:04}"),
        )
    }

    fn messages(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Event>(l).ok())
            .map(|e| e.message)
            .collect()
    }

    /// Past the size a log starts a new file; the newest lines are all kept, in order,
    /// across the current file and the rotated ones, and no more files than the policy's.
    #[test]
    fn logs_rotate_by_size_keeping_the_newest_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        status.set_log_rotation(1000, 2);
        for i in 0..60 {
            status.append_event(&event(i)).expect("append");
        }
        let root = dir.path().join("status");
        assert!(root.join("events.jsonl.2").exists());
        assert!(!root.join("events.jsonl.3").exists());
        for name in ["events.jsonl", "events.jsonl.1", "events.jsonl.2"] {
            let len = std::fs::metadata(root.join(name)).expect("file").len();
            assert!(len <= 1000, "{name}: {len} bytes");
        }
        let mut all = String::new();
        for mut file in status.open_rotated_events() {
            file.read_to_string(&mut all).expect("read");
        }
        status
            .open_events()
            .expect("current")
            .read_to_string(&mut all)
            .expect("read");
        let kept = messages(&all);
        let newest: Vec<String> = (60 - kept.len()..60)
            .map(|i| format!("event number {i:04}"))
            .collect();
        assert_eq!(kept, newest, "the newest events, each once, in order");
        assert!(kept.len() >= 10, "{} kept", kept.len());
    }

    /// Another fleet process (a one-shot command, its own `StatusDir`) rotates as the
    /// daemon's policy says, read from the directory, not by the defaults.
    #[test]
    fn other_processes_rotate_by_the_daemons_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = StatusDir::new(dir.path().join("status"));
        daemon.set_log_rotation(800, 1);
        let command = StatusDir::new(dir.path().join("status"));
        for i in 0..40 {
            command.append_event(&event(i)).expect("append");
        }
        let root = dir.path().join("status");
        assert!(root.join("events.jsonl.1").exists());
        assert!(
            !root.join("events.jsonl.2").exists(),
            "one older file, as set"
        );
        let len = std::fs::metadata(root.join("events.jsonl"))
            .expect("file")
            .len();
        assert!(len <= 800, "{len}");
    }

    /// `fleet events --follow` goes on in the new file after a rotation, missing nothing.
    #[test]
    fn a_followed_log_carries_on_across_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        status.set_log_rotation(600, 3);
        status.append_event(&event(0)).expect("append");
        let reopen = {
            let status = status.clone();
            move || status.open_events()
        };
        let mut log = crate::events::RotatingLog::new(status.open_events().expect("open"), reopen);
        let mut seen = String::new();
        for i in 1..12 {
            status.append_event(&event(i)).expect("append");
            let mut chunk = String::new();
            log.read_to_string(&mut chunk).expect("read");
            seen.push_str(&chunk);
        }
        assert!(dir.path().join("status/events.jsonl.1").exists());
        let expected: Vec<String> = (0..12).map(|i| format!("event number {i:04}")).collect();
        assert_eq!(messages(&seen), expected);
    }
}
