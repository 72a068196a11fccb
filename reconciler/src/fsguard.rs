//! File-system rules for what fleet trusts and writes: a file (or directory) fleet reads its
//! orders from, or writes its records to, must belong to root or fleet's own user and be
//! writable by nobody else, all the way up; what fleet makes itself is private to it and the
//! operators' group.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a path may not be trusted; each names the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is owned by uid {uid}, neither root nor fleet's user (uid {me}); `chown root {}`",
        path.display(),
        path.display()
    )]
    Owner { path: PathBuf, uid: u32, me: u32 },
    #[error(
        "{} (mode {mode:04o}) can be written by users other than its owner; `chmod go-w {}`",
        path.display(),
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// Files fleet writes under its status directory: owner read-write, group read.
pub const FILE_MODE: u32 = 0o640;
/// Directories fleet makes there: owner all, group read and enter.
pub const DIR_MODE: u32 = 0o750;

/// Makes `path` and its missing parents with `DIR_MODE` (existing ones are left as they are).
pub fn create_private_dirs(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// `path` and every directory above it: owned by root or by the user fleet runs as, and
/// writable by nobody else (a directory others may write is accepted only with the sticky
/// bit, like `/tmp`, where they cannot replace what they do not own). Parts that do not
/// exist yet are fleet's to make and are not checked. The error names the path and the fix.
pub fn check_owned_chain(path: &Path) -> Result<(), GuardError> {
    let absolute = std::path::absolute(path).map_err(|source| GuardError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_ancestors(&absolute)?;
    // And where the links among them lead: `/etc/fleet` may be a link to a directory
    // another user can write.
    let existing = absolute
        .ancestors()
        .find(|p| std::fs::symlink_metadata(p).is_ok())
        .unwrap_or(Path::new("/"));
    if let Ok(real) = std::fs::canonicalize(existing)
        && real != existing
    {
        check_ancestors(&real)?;
    }
    Ok(())
}

fn check_ancestors(absolute: &Path) -> Result<(), GuardError> {
    for part in absolute.ancestors() {
        let meta = match std::fs::symlink_metadata(part) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(GuardError::Io {
                    path: part.to_owned(),
                    source,
                });
            }
        };
        check_owner_and_mode(part, &meta)?;
    }
    Ok(())
}

/// Owned by root or fleet's user, and writable by no one else (sticky directories aside).
fn check_owner_and_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), GuardError> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(GuardError::Owner {
            path: path.to_owned(),
            uid: meta.uid(),
            me,
        });
    }
    let writable_by_others = meta.mode() & 0o022 != 0;
    let sticky_dir = meta.is_dir() && meta.mode() & 0o1000 != 0;
    if writable_by_others && !sticky_dir && !meta.file_type().is_symlink() {
        return Err(GuardError::Writable {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}
