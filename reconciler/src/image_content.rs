//! What an image's files hold: the sha256 of a libvirt image's `disk`, and of its `kernel`
//! and `initrd` together, written into each VM's resolved configuration after resolving
//! (`ResolvedImage::disk_sha256`, `boot_sha256`). The stamp records them, so a file rebuilt
//! in place under the same path is a change the plan shows ("image content changed": a
//! replace for a disk, whose overlays read only on the disk they were made on; a restart
//! for a kernel or initrd), never silent corruption.
//!
//! Hashed once per file version: a process-wide cache keyed by the file's identity (device,
//! inode, size, modification time; not its change time, which libvirt's relabelling at each
//! VM start moves), so a daemon reads each file once per rebuild and a plan of a thousand
//! VMs on one image reads it once.
//!
//! A digest is left unset for a file fleet cannot read or that is not a regular file: the
//! plan then keeps the digest the stamp has (`plan::with_known_digests`). A replace checks
//! that the new VM can be made before it destroys the old (`Driver::check_create`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::resolve::{Desired, ResolvedImage, VmConfig};
use crate::spec::{HostSpec, ProviderKind};

/// A file version: what changes when its content may have.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn version(meta: &std::fs::Metadata) -> Version {
    use std::os::unix::fs::MetadataExt;
    Version {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    }
}

fn cache() -> &'static Mutex<HashMap<PathBuf, (Version, String)>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, (Version, String)>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The sha256 of the file at `path` (already resolved inside the image root), from the
/// cache while the file is the version hashed.
pub fn file_digest(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let before = version(&meta);
    if let Some((seen, digest)) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(path)
        && *seen == before
    {
        return Some(digest.clone());
    }
    // Never blocks on a FIFO swapped in since the check; read only if still a regular file.
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
            .ok()?
    };
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    // Rewritten while being read: no digest this time, rather than a wrong one.
    if version(&file.metadata().ok()?) != before {
        return None;
    }
    let digest = crate::digest::hex(&hasher.finalize());
    cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.to_owned(), (before, digest.clone()));
    Some(digest)
}

/// `relative` under `root`, when it stays inside it (symlinks resolved), as the driver
/// resolves image files.
fn inside(root: &Path, relative: &str) -> Option<PathBuf> {
    crate::load::relative_path_problem(relative)
        .is_none()
        .then_some(())?;
    let root = std::fs::canonicalize(root).ok()?;
    let real = std::fs::canonicalize(root.join(relative)).ok()?;
    real.starts_with(&root).then_some(real)
}

/// The image's digests, from the files under `root`.
fn digests(image: &ResolvedImage, root: &Path) -> (Option<String>, Option<String>) {
    let of = |p: &Option<String>| p.as_deref().and_then(|p| file_digest(&inside(root, p)?));
    let disk = of(&image.disk);
    let boot = match (&image.kernel, &image.initrd) {
        (None, None) => None,
        (kernel, initrd) => {
            let parts = [
                kernel.as_ref().map(|_| of(kernel)),
                initrd.as_ref().map(|_| of(initrd)),
            ];
            // Both of what the image names, or nothing known.
            if parts.iter().any(|p| matches!(p, Some(None))) {
                None
            } else {
                let joined: Vec<String> = parts.into_iter().flatten().flatten().collect();
                Some(crate::digest::hex(&Sha256::digest(joined.join(":"))))
            }
        }
    };
    (disk, boot)
}

/// Digests by image files, for one `fill`: a thousand VMs on one image read it once.
type Seen =
    HashMap<(Option<String>, Option<String>, Option<String>), (Option<String>, Option<String>)>;

fn fill_config(config: &mut VmConfig, root: &Path, seen: &mut Seen) -> bool {
    let i = &config.image;
    let key = (i.kernel.clone(), i.initrd.clone(), i.disk.clone());
    let (disk, boot) = seen.entry(key).or_insert_with(|| digests(i, root)).clone();
    let image = &mut config.image;
    let changed = image.disk_sha256 != disk || image.boot_sha256 != boot;
    image.disk_sha256 = disk;
    image.boot_sha256 = boot;
    changed
}

/// Fills in the digests of every VM (and fresh pool template) on a libvirt provider, from
/// the host's image root, and their spec hashes after them.
pub fn fill(desired: &mut Desired, host: &HostSpec) {
    let root = Path::new(host.image_root());
    let libvirt: Vec<String> = desired
        .providers
        .iter()
        .filter(|p| p.kind() == ProviderKind::Libvirt)
        .map(|p| p.name().to_owned())
        .collect();
    let on_libvirt = |config: &VmConfig| libvirt.contains(&config.provider);
    let mut seen = Seen::new();
    for vm in desired.vms.values_mut() {
        if on_libvirt(&vm.config) && fill_config(&mut vm.config, root, &mut seen) {
            vm.spec_hash = vm.config.hash();
        }
    }
    for pool in desired.fresh_pools.values_mut() {
        let template = &mut pool.template;
        if on_libvirt(&template.config) && fill_config(&mut template.config, root, &mut seen) {
            template.spec_hash = template.config.hash();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(kernel: Option<&str>, initrd: Option<&str>, disk: Option<&str>) -> ResolvedImage {
        ResolvedImage {
            name: "i".into(),
            kernel: kernel.map(Into::into),
            initrd: initrd.map(Into::into),
            cmdline: None,
            disk: disk.map(Into::into),
            template: None,
            disk_sha256: None,
            boot_sha256: None,
        }
    }

    #[test]
    fn a_file_rebuilt_in_place_has_another_digest_and_one_outside_the_root_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("images");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("base.qcow2"), b"one").expect("write");
        std::fs::write(root.join("vmlinuz"), b"k").expect("write");
        std::fs::write(root.join("initrd.img"), b"i").expect("write");
        std::fs::write(dir.path().join("secret"), b"s").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).expect("symlink");
        // Not a regular file: no digest (and no read that could block).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        assert_eq!(digests(&image(None, None, Some("fifo")), &root).0, None);
        let both = image(Some("vmlinuz"), Some("initrd.img"), Some("base.qcow2"));
        let (disk, boot) = digests(&both, &root);
        assert_eq!(
            disk.as_deref(),
            Some("7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed")
        );
        assert!(boot.is_some());
        // Rebuilt in place: same path, another content (another size, so another version
        // even within one timestamp tick).
        std::fs::write(root.join("base.qcow2"), b"two!").expect("write");
        let (again, boot_again) = digests(&both, &root);
        assert_ne!(again, disk);
        assert_eq!(boot_again, boot);
        // Outside the root, missing, or absolute: no digest (the driver refuses the file).
        for p in ["link", "missing", "/etc/hostname", "../secret"] {
            assert_eq!(digests(&image(None, None, Some(p)), &root).0, None, "{p}");
        }
        // A kernel whose initrd cannot be read: nothing known of the pair.
        assert_eq!(
            digests(&image(Some("vmlinuz"), Some("missing"), None), &root).1,
            None
        );
    }
}
