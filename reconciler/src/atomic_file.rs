//! Files written so that a crash leaves the old content or the new, never half: a temp file
//! beside the target, fsync, rename, fsync of the directory. Status files, the journal's
//! compaction, seeds and snippets all go through here.
//!
//! The work is done relative to a directory handle (`write_atomic_in`): the status
//! directory reaches its files only through its handle (`status::tree`), and the path
//! form (`write_atomic`) opens the parent and hands over.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

/// Writes `bytes` to `path` atomically (see `write_atomic_in`); a missing directory is
/// made 0750.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    crate::fsguard::create_private_dirs(dir)?;
    let dir = Dir::open_ambient_dir(dir, cap_std::ambient_authority())?;
    write_atomic_in(&dir, Path::new(name), bytes)
}

/// Writes `bytes` to `name` in `dir` atomically: a new temp file beside it (never an
/// existing one, never through a link), fsync, rename, fsync of the directory.
/// The file is `fsguard::FILE_MODE` (0640): what fleet records is for fleet and the
/// operators' group. Renaming over a symlink replaces the link, never what it points at.
pub fn write_atomic_in(dir: &Dir, name: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (tmp_name, file) = create_temp(dir, name)?;
    let written = (|| {
        let mut file = file.into_std();
        file.write_all(bytes)?;
        file.sync_all()?;
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(crate::fsguard::FILE_MODE))?;
        dir.rename(&tmp_name, dir, name)
    })();
    if let Err(e) = written {
        let _ = dir.remove_file(&tmp_name);
        return Err(e);
    }
    dir.open(".")?.sync_all()
}

/// A fresh temp file for `name` in `dir` (`O_EXCL`: a planted file or link is never
/// opened), named so `remove_left_temp_files` can tell whose it was.
fn create_temp(dir: &Dir, name: &Path) -> std::io::Result<(PathBuf, cap_std::fs::File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = temp_prefix(name);
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = PathBuf::from(format!(
            "{prefix}{}-{}-{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match dir.open_with(
            &tmp,
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(crate::fsguard::FILE_MODE),
        ) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The name a temp file of `write_atomic` starts with: `.<file name>.tmp-`. Hidden, and it
/// says which file it was for, so what a killed writer left can be told apart and removed
/// by whoever owns that file (`remove_left_temp_files`).
fn temp_prefix(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    format!(".{name}{TEMP_MARK}")
}

const TEMP_MARK: &str = ".tmp-";

/// Removes the temp files `write_atomic` left in `dir` when its process was killed before
/// the rename, for files whose names start with `name_prefix` and for which `keep` says
/// no. Only the single writer of those files may call it (a live writer's temp file would
/// vanish under it). Returns the names removed.
pub fn remove_left_temp_files(
    dir: &Dir,
    name_prefix: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let Ok(entries) = dir.entries() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some((target, _)) = file
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(TEMP_MARK))
        else {
            continue;
        };
        if !target.starts_with(name_prefix) || keep(target) {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_file()) && dir.remove_file(&file).is_ok() {
            removed.push(file);
        }
    }
    removed
}

/// `remove_left_temp_files` for a directory named by its path.
pub fn remove_left_temp_files_at(
    dir: &Path,
    name_prefix: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<PathBuf> {
    let Ok(handle) = Dir::open_ambient_dir(dir, cap_std::ambient_authority()) else {
        return Vec::new();
    };
    remove_left_temp_files(&handle, name_prefix, keep)
        .into_iter()
        .map(|name| dir.join(name))
        .collect()
}
