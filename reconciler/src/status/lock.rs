//! One writer per status directory: an exclusive `flock` on `<status>/lock`, held for the
//! life of the process, with the holder's PID and command written inside. The kernel drops
//! the lock when its holder dies, so a lock file left by a dead process is stale by
//! construction: the next process takes it and says whose it was.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub since: Option<Timestamp>,
}

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct StatusLock {
    file: File,
    path: PathBuf,
    /// The holder a previous, dead process left in the file, if any.
    pub stale: Option<Holder>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{path} is held by PID {pid} ({command}, since {since}); only one fleet process may change a status directory. Stop that process (for `fleet serve`: systemctl stop fleet, or kill {pid}) or use another --status-dir",
        path = .path.display(), pid = .holder.pid, command = .holder.command, since = crate::time::shown(.holder.since)
    )]
    Held { path: PathBuf, holder: Holder },
    #[error("{path} is locked by another process; only one fleet process may change a status directory", path = .path.display())]
    HeldUnknown { path: PathBuf },
    #[error("cannot open the lock {path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StatusLock {
    /// Takes the lock or fails at once (never waits).
    pub fn acquire(status_dir: &Path, command: &str) -> Result<StatusLock, LockError> {
        let path = status_dir.join("lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        crate::fsguard::check_owned_chain(status_dir)
            .map_err(|why| io(std::io::Error::other(format!("refusing it: {why}"))))?;
        if let Some(parent) = status_dir.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        crate::fsguard::create_private_dirs(status_dir).map_err(io)?;
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(crate::fsguard::FILE_MODE)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io)?
        };
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous: Option<Holder> = serde_json::from_str(&previous).ok();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(match previous {
                    Some(holder) => LockError::Held { path, holder },
                    None => LockError::HeldUnknown { path },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let me = Holder {
            pid: std::process::id(),
            command: command.to_owned(),
            since: Some(std::time::SystemTime::now().into()),
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(&serde_json::to_vec(&me).expect("holder is JSON"))
            .map_err(io)?;
        file.sync_data().map_err(io)?;
        let stale = previous.filter(|p| p.pid != me.pid);
        if stale.is_some() {
            // The dead holder may have been killed between a temp file and its rename.
            remove_left_temp_files_under(status_dir, 3);
        }
        Ok(StatusLock { file, path, stale })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who holds the lock of `status_dir` now (`None` when nobody does), without taking it.
    pub fn holder(status_dir: &Path) -> Option<Holder> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(status_dir.join("lock"))
            .ok()?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        match file.try_lock_shared() {
            // Nobody holds it (the shared lock ends when the file is closed).
            Ok(()) => None,
            Err(_) => serde_json::from_str(&text).ok(),
        }
    }
}

/// Removes the temp files a killed holder left in the status directory, `depth` levels
/// down (through directory handles: a link is never entered). Answer files are skipped
/// (`fleet hitl answer` writes them without the lock), and so are task artifacts: they are
/// the guest's files, named as the guest chose.
fn remove_left_temp_files_under(dir: &Path, depth: usize) {
    if let Ok(handle) = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority()) {
        remove_left_temp_files_in(&handle, dir, depth);
    }
}

fn remove_left_temp_files_in(dir: &cap_std::fs::Dir, shown: &Path, depth: usize) {
    for removed in
        crate::atomic_file::remove_left_temp_files(dir, "", |target| target.ends_with(".answer"))
    {
        tracing::info!(
            "removed {}, left by a killed writer",
            shown.join(removed).display()
        );
    }
    if depth == 0 {
        return;
    }
    for entry in dir.entries().into_iter().flatten().flatten() {
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && name != "artifacts"
            && let Ok(sub) = cap_fs_ext::DirExt::open_dir_nofollow(dir, &name)
        {
            remove_left_temp_files_in(&sub, &shown.join(&name), depth - 1);
        }
    }
}

impl Drop for StatusLock {
    fn drop(&mut self) {
        // Clear the holder so nobody reports a released lock as stale, then unlock.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StatusLock::acquire(dir.path(), "fleet serve").expect("first");
        assert!(first.stale.is_none());
        let err = StatusLock::acquire(dir.path(), "fleet apply").expect_err("held");
        let message = err.to_string();
        assert!(
            message.contains(&format!("held by PID {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("fleet serve"), "{message}");
        drop(first);
        let again = StatusLock::acquire(dir.path(), "fleet apply").expect("released");
        assert!(
            again.stale.is_none(),
            "a cleanly released lock is not stale"
        );
    }

    /// Writes the lock file a killed holder leaves (its holder, no lock held).
    fn leave_dead_holder(status_dir: &Path) -> Holder {
        let dead = Holder {
            pid: 999_999_999,
            command: "fleet serve".into(),
            since: None,
        };
        std::fs::write(
            status_dir.join("lock"),
            serde_json::to_vec(&dead).expect("json"),
        )
        .expect("write");
        dead
    }

    #[test]
    fn a_lock_file_left_by_a_dead_process_is_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dead = leave_dead_holder(dir.path());
        let lock = StatusLock::acquire(dir.path(), "fleet apply").expect("stale lock is taken");
        assert_eq!(lock.stale, Some(dead));
    }

    #[test]
    fn a_dead_holders_temp_files_are_removed_but_not_answers_or_real_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vms = dir.path().join("vms");
        let hitl = dir.path().join("hitl");
        let artifacts = dir.path().join("tasks/t/artifacts");
        for d in [&vms, &hitl, &artifacts] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        // What a writer killed before its rename leaves, next to files that must stay.
        let left = [
            dir.path().join(".summary.yaml.tmp-a1B2c3"),
            vms.join(".vm-01.yaml.tmp-Zz9Yy8"),
            dir.path().join("tasks/t/.run.yaml.tmp-Pp0Oo9"),
        ];
        let kept = [
            vms.join("vm-01.yaml"),
            hitl.join(".p-1.answer.tmp-Qq1Ww2"),
            artifacts.join(".build.log.tmp-guest"),
            dir.path().join(".gitignore"),
        ];
        for f in left.iter().chain(&kept) {
            std::fs::write(f, "x").expect("write");
        }
        // A cleanly released lock leaves the directory alone...
        drop(StatusLock::acquire(dir.path(), "fleet apply").expect("first"));
        assert!(left.iter().all(|f| f.exists()));
        // ...a dead holder's leftovers go.
        leave_dead_holder(dir.path());
        let _lock = StatusLock::acquire(dir.path(), "fleet apply").expect("stale lock is taken");
        for f in &left {
            assert!(!f.exists(), "{} is left", f.display());
        }
        for f in &kept {
            assert!(f.exists(), "{} was removed", f.display());
        }
    }
}
