//! The guest's secret set: the files the host sends with `Secrets`, kept under
//! `SECRETS_DIR` on a tmpfs of their own (never on disk), each mode 0400. A new set replaces
//! the old one: files no longer listed are removed. The set's digest is kept beside the files,
//! so an agent restarted in the same boot tells the host (in its hello) what it holds.
//!
//! Values are decoded into zeroizing buffers and written; the agent keeps no copy.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use fleet_agent_protocol::SecretFile;
use zeroize::Zeroizing;

/// Where the set's digest is kept, inside the directory (never a secret name: names start
/// with a letter, digit, `_` or `-`).
const DIGEST_FILE: &str = ".digest";

pub struct Store {
    dir: PathBuf,
    /// Mount a tmpfs on `dir` when it is not a mount point yet (the real agent; tests write
    /// into a temporary directory).
    mount_tmpfs: bool,
    lock: Mutex<()>,
}

impl Store {
    pub fn new(dir: PathBuf, mount_tmpfs: bool) -> Store {
        Store {
            dir,
            mount_tmpfs,
            lock: Mutex::new(()),
        }
    }

    /// The digest of the set in place, if there is one.
    pub fn digest(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(DIGEST_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// Puts `files` in place and removes every other file; then records `digest`.
    pub fn replace(&self, digest: &str, files: &[SecretFile]) -> Result<(), String> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.prepare()?;
        let mut keep = std::collections::BTreeSet::new();
        for file in files {
            let rel = safe_relative(&file.path)?;
            let value = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(&file.data)
                    .map_err(|e| format!("{}: not base64: {e}", file.path))?,
            );
            let path = self.dir.join(&rel);
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            write_0400(&path, &value).map_err(|e| format!("{}: {e}", file.path))?;
            keep.insert(path);
        }
        remove_others(&self.dir, &keep).map_err(|e| format!("removing old secrets: {e}"))?;
        write_0400(&self.dir.join(DIGEST_FILE), digest.as_bytes())
            .map_err(|e| format!("{DIGEST_FILE}: {e}"))
    }

    /// Reads one value (for a task's environment).
    pub fn read(&self, rel: &str) -> Result<Zeroizing<String>, String> {
        let rel = safe_relative(rel)?;
        let bytes = Zeroizing::new(
            std::fs::read(self.dir.join(&rel))
                .map_err(|e| format!("secret {}: {e}", rel.display()))?,
        );
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| format!("secret {} is not UTF-8 text; use `file:`", rel.display()))?;
        if text.contains('\0') {
            return Err(format!(
                "secret {} holds a NUL byte; use `file:`",
                rel.display()
            ));
        }
        Ok(Zeroizing::new(text.to_owned()))
    }

    /// The directory exists, mode 0700, on its own tmpfs when asked.
    fn prepare(&self) -> Result<(), String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if self.mount_tmpfs && !is_mount_point(&self.dir) {
            use nix::mount::{MsFlags, mount};
            mount(
                Some("fleet-secrets"),
                &self.dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0700,size=16m"),
            )
            .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", self.dir.display()))?;
        }
        Ok(())
    }
}

fn is_mount_point(dir: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata))
    else {
        return false;
    };
    me.dev() != parent.dev()
}

/// A relative path with plain components only.
pub(crate) fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    let plain = !path.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.file_name().is_some_and(|n| n != DIGEST_FILE);
    if plain {
        Ok(p.to_path_buf())
    } else {
        Err(format!("secret path {path:?} is not a plain relative path"))
    }
}

/// Writes the file whole under a temporary name, mode 0400, then renames it into place.
fn write_0400(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("fleet-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Removes every file under `dir` not in `keep` (the digest aside), and emptied directories.
fn remove_others(dir: &Path, keep: &std::collections::BTreeSet<PathBuf>) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if remove_others(&path, keep)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if keep.contains(&path) || path.file_name().is_some_and(|n| n == DIGEST_FILE) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(path: &str, value: &str) -> SecretFile {
        SecretFile {
            path: path.into(),
            data: base64::engine::general_purpose::STANDARD.encode(value),
        }
    }

    #[test]
    fn a_new_set_replaces_the_old_one_with_0400_files() {
        let dir = std::env::temp_dir().join(format!("fleet-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(dir.clone(), false);
        assert_eq!(store.digest(), None);
        store
            .replace("d1", &[file("git/token", "t0k3n"), file(".env/a/k", "v1")])
            .expect("first set");
        assert_eq!(store.digest().as_deref(), Some("d1"));
        let token = dir.join("git/token");
        assert_eq!(std::fs::read_to_string(&token).expect("token"), "t0k3n");
        let mode = std::fs::metadata(&token)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o400);
        assert_eq!(store.read(".env/a/k").expect("env").as_str(), "v1");

        store
            .replace("d2", &[file(".env/a/k", "v2")])
            .expect("second set");
        assert!(!token.exists(), "a file no longer listed is removed");
        assert!(!dir.join("git").exists(), "and its emptied directory");
        assert_eq!(store.read(".env/a/k").expect("env").as_str(), "v2");
        assert_eq!(store.digest().as_deref(), Some("d2"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_outside_the_directory_are_refused() {
        let dir = std::env::temp_dir().join(format!("fleet-secrets-bad-{}", std::process::id()));
        let store = Store::new(dir.clone(), false);
        for bad in ["../etc/passwd", "/etc/shadow", "a/../../b", "", ".digest"] {
            assert!(store.replace("d", &[file(bad, "x")]).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
