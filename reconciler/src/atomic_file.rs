//! Files written so that a crash leaves the old content or the new, never half: a temp file
//! beside the target, fsync, rename, fsync of the directory. Status files, the journal's
//! compaction, seeds and snippets all go through here.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename,
/// fsync of the directory.
/// The file is `fsguard::FILE_MODE` (0640) and a missing directory is made 0750: what fleet
/// records is for fleet and the operators' group. Renaming over a symlink replaces the link,
/// never what it points at.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::fsguard::create_private_dirs(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(crate::fsguard::FILE_MODE))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
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
/// vanish under it). Returns the paths removed.
pub fn remove_left_temp_files(
    dir: &Path,
    name_prefix: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
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
        if entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}
