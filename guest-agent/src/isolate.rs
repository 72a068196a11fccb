//! Each run on its own: when the agent runs as root, a task runs as a user of its own (no
//! name, no groups), in a mount namespace where `SECRETS_DIR` shows only the secret files
//! that run may read. Another task of the same VM can then neither read those files nor
//! signal or trace it; the VM-wide store stays root's.
//!
//! The agent prepares the run (`Run::prepare`: a user id free among its live runs, the
//! run's copy of its secret files, its directory handed to that user) and starts
//! `fleet-agent launch UID DIR -- ARGV…` in the task's terminal; `launch` enters a new
//! mount namespace, binds DIR over `SECRETS_DIR`, drops to UID and execs ARGV, so the task
//! keeps the terminal and session the agent gave it. When the run ends, its copy goes.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where each run's copy of its secret files lives (a tmpfs: `/run`).
pub const RUNS_DIR: &str = "/run/fleet/runs";
/// Task user ids are taken from here up (no account has them).
pub const FIRST_UID: u32 = 61000;
pub const UIDS: u32 = 4000;

/// One isolated run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub uid: u32,
    /// The run's copy of its secret files, bound over `SECRETS_DIR` for it.
    pub secrets: PathBuf,
    /// The run's `HOME`, empty at its start and gone at its end: what tools keep there
    /// (an agent CLI's settings, shell snapshots, caches) stays out of the checkout, so it
    /// is never committed with the run's results.
    pub home: PathBuf,
}

/// Whether tasks are isolated: only an agent running as root can give them users of their
/// own (an agent under test as a plain user runs them as itself).
pub fn enabled() -> bool {
    nix::unistd::geteuid().is_root()
}

/// User ids in the task range that some process still has (a run's leftovers, which
/// `reap` should have ended): never given to a new run.
pub fn busy_uids() -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut uids: Vec<u32> = procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|uid| uid.parse().ok())
        })
        .filter(|uid| (FIRST_UID..FIRST_UID + UIDS).contains(uid))
        .collect();
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// Ends every process left with the run's user id: a task's background children outlive
/// its exit otherwise, and could wait for the next run given that id. Runs `fleet-agent
/// reap UID`, which takes the id and signals all of its processes.
pub fn reap(agent: &Path, uid: u32) {
    let _ = std::process::Command::new(agent)
        .args(["reap", &uid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// `fleet-agent reap UID`: becomes UID and sends SIGKILL to every process of it (but
/// itself). Returns only on failure.
pub fn reap_as(args: &[String]) -> Result<(), String> {
    let [uid] = args else {
        return Err("usage: fleet-agent reap UID".into());
    };
    let uid: u32 = uid
        .parse()
        .map_err(|_| format!("{uid:?} is not a user id"))?;
    if !(FIRST_UID..FIRST_UID + UIDS).contains(&uid) {
        return Err(format!("{uid} is not a task user id"));
    }
    nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)))
        .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)))
        .map_err(|e| format!("cannot become user {uid}: {e}"))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!("kill: {e}")),
    }
}

/// A user id for `task` that no live run holds: from a hash of the name, then the next free.
pub fn pick_uid(task: &str, taken: &[u32]) -> u32 {
    let hash = task.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start = (hash % u64::from(UIDS)) as u32;
    (0..UIDS)
        .map(|i| FIRST_UID + (start + i) % UIDS)
        .find(|uid| !taken.contains(uid))
        .unwrap_or(FIRST_UID + start)
}

impl Run {
    /// Copies `files` (relative to `store`) into the run's own directory, owned by `uid` and
    /// readable by it alone, and hands `cwd` (and what is in it) to `uid`.
    pub fn prepare(
        task: &str,
        uid: u32,
        store: &Path,
        files: &[String],
        cwd: Option<&Path>,
    ) -> Result<Run, String> {
        let runs = Path::new(RUNS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(runs)
            .map_err(|e| format!("{}: {e}", runs.display()))?;
        // The run's user must pass through the directories above its own (`/run/fleet`
        // may have been made private by the secret store): enter, never list.
        for dir in [runs.parent(), store.parent(), cwd.and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            allow_passage(dir)?;
        }
        let dir = runs.join(task);
        let _ = std::fs::remove_dir_all(&dir);
        let secrets = dir.join("secrets");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&secrets)
            .map_err(|e| format!("{}: {e}", secrets.display()))?;
        for rel in files {
            let from = crate::secrets::safe_relative(rel).map(|r| store.join(r))?;
            let to = secrets.join(crate::secrets::safe_relative(rel)?);
            if let Some(parent) = to.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            // A file the set does not hold (yet) is simply not there for the run.
            if std::fs::copy(&from, &to).is_ok() {
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400))
                    .map_err(|e| format!("{}: {e}", to.display()))?;
            }
        }
        let home = dir.join("home");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&home)
            .map_err(|e| format!("{}: {e}", home.display()))?;
        hand_over(&dir, uid)?;
        if let Some(cwd) = cwd {
            hand_over(cwd, uid)?;
        }
        Ok(Run { uid, secrets, home })
    }

    /// Removes the run's copy of its secrets.
    pub fn cleanup(task: &str) {
        let _ = std::fs::remove_dir_all(Path::new(RUNS_DIR).join(task));
    }

    /// The command line that starts `argv` as this run.
    pub fn wrap(&self, agent: &Path, argv: &[String]) -> Vec<String> {
        let mut wrapped = vec![
            agent.display().to_string(),
            "launch".into(),
            self.uid.to_string(),
            self.secrets.display().to_string(),
            "--".into(),
        ];
        wrapped.extend(argv.iter().cloned());
        wrapped
    }
}

/// Lets anyone enter `dir` (but not list it), when it exists.
fn allow_passage(dir: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o011),
        )
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Gives `path` and everything under it to `uid` (never following a link).
fn hand_over(path: &Path, uid: u32) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
            hand_over(&entry.path(), uid)?;
        }
    }
    Ok(())
}

/// `fleet-agent launch UID DIR -- ARGV…`: the first moments of an isolated task, run as
/// root in the task's terminal. Returns only on failure.
pub fn launch(args: &[String]) -> String {
    use nix::mount::{MsFlags, mount};
    use std::os::unix::process::CommandExt;
    let (uid, dir, argv) = match args {
        [uid, dir, dash, argv @ ..] if dash == "--" && !argv.is_empty() => (uid, dir, argv),
        _ => return "usage: fleet-agent launch UID DIR -- COMMAND [ARG…]".into(),
    };
    let Ok(uid) = uid.parse::<u32>() else {
        return format!("{uid:?} is not a user id");
    };
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        return format!("cannot enter a mount namespace of its own: {e}");
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        return format!("cannot make the mounts private: {e}");
    }
    let store = Path::new(fleet_agent_protocol::SECRETS_DIR);
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(store)
    {
        return format!("{}: {e}", store.display());
    }
    if let Err(e) = mount(
        Some(Path::new(dir)),
        store,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        return format!("cannot show the run its secrets: {e}");
    }
    let id = nix::unistd::Uid::from_raw(uid);
    let gid = nix::unistd::Gid::from_raw(uid);
    if let Err(e) = nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setgid(gid))
        .and_then(|()| nix::unistd::setuid(id))
    {
        return format!("cannot become user {uid}: {e}");
    }
    let error = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    format!("cannot start {}: {error}", argv[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_runs_never_share_a_user() {
        let a = pick_uid("build-0a1b2c3d", &[]);
        assert!((FIRST_UID..FIRST_UID + UIDS).contains(&a));
        assert_eq!(pick_uid("build-0a1b2c3d", &[]), a, "stable for a name");
        let b = pick_uid("build-0a1b2c3d", &[a]);
        assert_ne!(a, b);
        let all: Vec<u32> = (FIRST_UID..FIRST_UID + UIDS).filter(|u| *u != a).collect();
        assert_eq!(pick_uid("x", &all), a, "the one left");
    }
}
