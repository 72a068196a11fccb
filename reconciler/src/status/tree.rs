//! How the status directory's files are reached: through a handle on the directory, never
//! by path. cap-std resolves every path beneath the handle (`openat2` with
//! `RESOLVE_BENEATH` on Linux), so nothing, not a `..` nor a link, leads out of it, and the
//! last component is never followed when it is a link. `StatusDir::ensure` already refuses
//! a directory others can write; this is the second wall: a link planted inside (by
//! anyone, or by a bug) is refused rather than written through.

use std::io::Read;
use std::path::Path;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, OpenOptions, OpenOptionsExt};

/// The status directory, opened (it must exist).
pub(super) fn open(root: &Path) -> std::io::Result<Dir> {
    Dir::open_ambient_dir(root, cap_std::ambient_authority())
}

/// Makes `relative` and its missing parents under `dir`, each `fsguard::DIR_MODE`.
pub(super) fn create_dirs(dir: &Dir, relative: &Path) -> std::io::Result<()> {
    if relative.as_os_str().is_empty() {
        return Ok(());
    }
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(crate::fsguard::DIR_MODE);
    dir.create_dir_with(relative, &builder)
}

/// Opens `relative` with `options`, never following a link at its end; a file it creates
/// is `fsguard::FILE_MODE`.
pub(super) fn open_file(
    dir: &Dir,
    relative: &Path,
    options: &mut OpenOptions,
) -> std::io::Result<std::fs::File> {
    options
        .follow(FollowSymlinks::No)
        .mode(crate::fsguard::FILE_MODE);
    dir.open_with(relative, options)
        .map(cap_std::fs::File::into_std)
}

/// Reads `relative` as text, never through a link.
pub(super) fn read_to_string(dir: &Dir, relative: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    open_file(dir, relative, OpenOptions::new().read(true))?.read_to_string(&mut text)?;
    Ok(text)
}

/// Removes `relative` (a file, or a link, never what it points at); gone already is fine.
pub(super) fn remove_file(dir: &Dir, relative: &Path) -> std::io::Result<()> {
    match dir.remove_file(relative) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
