//! Workspaces (`HostMessage::Mounts`): each a disk the host attached, known by its serial.
//! A blank disk (its first MiB zeros) gets a filesystem (`mke2fs`: ext2 from busybox,
//! ext2 or ext4 from e2fsprogs, all mounted by the kernel's ext4 driver), its top directory
//! mode 1777 so that every task's user may write there; a disk holding anything else is
//! never formatted. Then it is mounted at its path, made if missing (`nosuid,nodev`). Mounting what is already mounted there is
//! nothing, so the host may send the set after every hello.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use fleet_agent_protocol::Mount;

/// One `Mounts` at a time: two must never race to make a filesystem.
static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Mounts each of `mounts`; what went wrong, one line per workspace.
pub fn apply(mounts: &[Mount]) -> Vec<String> {
    let _one = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
    mounts
        .iter()
        .filter_map(|m| mount_one(m).err().map(|e| format!("{}: {e}", m.path)))
        .collect()
}

/// How much of a disk must read as zeros before a filesystem is made on it: a disk with
/// anything else on it (another filesystem, a partition table, encrypted data) is never
/// formatted.
const BLANK_BYTES: usize = 1024 * 1024;

fn mount_one(m: &Mount) -> Result<(), String> {
    if !m.path.starts_with('/') || m.path.split('/').any(|p| p == ".." || p == ".") {
        return Err("not an absolute, plain path".into());
    }
    let dev = device_with_serial(Path::new("/sys/block"), &m.serial)
        .ok_or_else(|| format!("no disk with serial {} (is it attached?)", m.serial))?;
    no_links_on_the_way(Path::new(&m.path))?;
    match mounted_at(&m.path) {
        Some(found) if Path::new(&found) == dev => return Ok(()),
        Some(found) => {
            return Err(format!(
                "{found} is mounted there already; the workspace is not mounted over it"
            ));
        }
        None => {}
    }
    let fresh = match has_ext_filesystem(&dev) {
        Ok(true) => false,
        Ok(false) if is_blank(&dev).unwrap_or(false) => true,
        Ok(false) => {
            return Err(format!(
                "{} holds data that is not an ext filesystem; fleet formats only a blank disk",
                dev.display()
            ));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", dev.display())),
    };
    if fresh {
        let made = std::process::Command::new("mke2fs")
            .args(["-q", "-L", &m.label])
            .arg(&dev)
            .output()
            .map_err(|e| format!("cannot run mke2fs: {e}"))?;
        if !made.status.success() {
            return Err(format!(
                "mke2fs failed: {}",
                String::from_utf8_lossy(&made.stderr).trim()
            ));
        }
    }
    std::fs::create_dir_all(&m.path).map_err(|e| format!("cannot make the directory: {e}"))?;
    no_links_on_the_way(Path::new(&m.path))?;
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(&dev),
        Path::new(&m.path),
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount {}: {e}", dev.display()))?;
    if fresh {
        // A new filesystem's top is open to every task's user, as /tmp is (an isolating
        // agent runs each task as a user of its own); later changes of its mode are the
        // guest's.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&m.path, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| format!("cannot open the workspace to tasks: {e}"))?;
    } else {
        // A grown volume: the filesystem follows where the guest can (resize2fs).
        let _ = std::process::Command::new("resize2fs")
            .arg(&dev)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

/// Refuses a path any of whose existing parts is a symbolic link (a task could have put one
/// there to turn the mount, or the chmod after it, elsewhere).
fn no_links_on_the_way(path: &Path) -> Result<(), String> {
    let mut at = std::path::PathBuf::from("/");
    for part in path.components().skip(1) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link; not mounting there",
                    at.display()
                ));
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Whether the first `BLANK_BYTES` of `dev` are zeros.
fn is_blank(dev: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(dev)?;
    let mut buf = vec![0u8; BLANK_BYTES];
    let mut read = 0;
    while read < buf.len() {
        match file.read(&mut buf[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(buf[..read].iter().all(|b| *b == 0))
}

/// The `/dev` node of the block device whose serial is `serial`.
fn device_with_serial(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim() == serial {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// What is mounted at `path`, from `/proc/mounts`.
fn mounted_at(path: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut fields = l.split_whitespace();
        let (dev, at) = (fields.next()?, fields.next()?);
        (at == path.trim_end_matches('/')).then(|| dev.to_owned())
    })
}

/// Whether `dev` holds an ext2/3/4 filesystem (its superblock's magic, 0xEF53 at 1080).
fn has_ext_filesystem(dev: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(dev)?;
    file.seek(SeekFrom::Start(1080))?;
    let mut magic = [0u8; 2];
    file.read_exact(&mut magic)?;
    Ok(magic == [0x53, 0xEF])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_found_by_its_serial_and_an_ext_magic_is_read() {
        let dir = tempfile_dir("mounts");
        for (disk, serial) in [("vda", ""), ("vdc", "fws0123456789abcdef")] {
            std::fs::create_dir_all(dir.join(disk)).expect("mkdir");
            std::fs::write(dir.join(disk).join("serial"), format!("{serial}\n")).expect("serial");
        }
        assert_eq!(
            device_with_serial(&dir, "fws0123456789abcdef"),
            Some(PathBuf::from("/dev/vdc"))
        );
        assert_eq!(device_with_serial(&dir, "other"), None);
        let image = dir.join("image");
        let mut bytes = vec![0u8; 4096];
        std::fs::write(&image, &bytes).expect("blank");
        assert!(!has_ext_filesystem(&image).expect("read"));
        bytes[1080] = 0x53;
        bytes[1081] = 0xEF;
        std::fs::write(&image, &bytes).expect("ext");
        assert!(has_ext_filesystem(&image).expect("read"));
        let refused = apply(&[Mount {
            serial: "x".into(),
            path: "/workspace/../etc".into(),
            label: "w".into(),
        }]);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("plain path"), "{refused:?}");
        assert!(
            is_blank(&dir.join("image")).is_ok_and(|b| !b),
            "it holds the magic"
        );
        std::fs::write(dir.join("zeros"), vec![0u8; 8192]).expect("zeros");
        assert!(is_blank(&dir.join("zeros")).expect("read"));
        std::os::unix::fs::symlink("/etc", dir.join("link")).expect("link");
        assert!(no_links_on_the_way(&dir.join("link").join("x")).is_err());
        assert!(no_links_on_the_way(&dir.join("plain")).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn tempfile_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleet-agent-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }
}
