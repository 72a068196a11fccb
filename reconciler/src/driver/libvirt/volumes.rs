//! A VM's storage as volumes of a libvirt storage pool, so that fleet reaches a host, local
//! or remote, through its libvirt connection alone: no file of a VM is written on fleet's
//! side, and no image file needs to be on the host.
//!
//! **The pool** is the provider's `storagePool` (default `fleet-<fleet>`). When it is
//! missing fleet defines it as a directory pool at `<storageDir>/<fleet>/.volumes` on the
//! host; a change finds it started (built first, should a kill have cut the build short)
//! and autostarted. A pool of the default name in another directory is not fleet's: every
//! change stops with a conflict naming it. A pool the host configuration names and that
//! exists is used wherever its directory is, if it keeps its volumes in one (the console
//! log is a path QEMU's log daemon writes).
//!
//! **Names are the stamp** (volumes carry no metadata). A VM's volumes are
//! `<vm>.<uuid>.disk.qcow2` (the overlay) and `<vm>.<uuid>.seed.iso` (the NoCloud seed),
//! where the UUID is the domain's, derived from fleet and VM: another fleet's or nobody's
//! volume never has it. An image file's content is `sha256-<digest>.<fleet>.<ext>`
//! (`qcow2`, `kernel`, `initrd`), shared by the fleet's VMs in the pool; no VM name is that
//! long, so the two kinds never meet, and fleets sharing a pool never share (or remove)
//! each other's images. fleet never touches a volume of any other name.
//!
//! **Images are shipped once per content.** An image volume is complete only once its
//! marker `<volume>.ok` exists, made after the upload once the file read is found still
//! the version its digest was taken of (`image_content` hashes a file again whenever its
//! version changes), so what was sent is what the name says. An upload a kill cut short
//! has no marker; the next ship removes it and uploads again, so a VM is never made on
//! half an image. A base disk must be a qcow2 of its own: a backing file or an external
//! data file would name a file on the host (`check_header`, on the bytes sent). Shipping
//! comes before a create (`Driver::check_create`), outside the step's deadline.
//!
//! **Console logs are no volumes.** The guest writes every byte of its log, and libvirt
//! reads the header of each volume when it refreshes a pool (as libvirtd does when it
//! starts), opening as root the backing file a qcow2 header names: a log in the pool would
//! let a guest make the host's libvirtd open a path of its choosing (a FIFO, a device).
//! So logs go to `logs/` in the pool's directory (made as a directory volume), where
//! libvirt never looks: `<vm>.<uuid>.console.log` and the log daemon's rotations. fleet
//! reads and removes them on its own host; on another host they cannot be reached through
//! libvirt, and stay when their VM goes (`fleet console` works; `--follow` does not).
//!
//! **Tidy** (`tidy_volumes`: when a process opens its journal, and at the end of an apply
//! pass that destroyed or shipped something, never while a step on the same VMs' host
//! still runs): the volumes (and local logs) of this fleet's VMs that have no domain go
//! (what a create that failed left), then every image volume of the fleet that no overlay
//! in the pool backs onto and none of its domains (their definitions, running or saved,
//! and their snapshots) boots from, its marker first, unless this process shipped or used
//! it within the hour (a create failing pass after pass would upload it each time). A read
//! that fails keeps every image. A VM's own volumes go with the VM (`remove_volumes`, by
//! destroy and by settle after a crash). fleet never refreshes the pool: every volume it
//! keeps there is made through libvirt, which knows it.
//!
//! A seed is rewritten by removing and uploading it, not atomically: a kill between the
//! two leaves the domain's old definition and stamp (the definition is saved last), so the
//! next plan runs the update again and writes the seed whole.
//!
//! The test driver (`test:///`) has no streams: its volumes are made and removed, but
//! nothing is uploaded or downloaded (nothing boots there either).

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use quick_xml::escape::escape;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::{LibvirtDriver, domain_uuid};
use crate::driver::{DriverError, ErrorKind};

/// The parts of a VM's storage, after `<vm>.<uuid>.`.
pub const DISK: &str = "disk.qcow2";
pub const SEED: &str = "seed.iso";
pub const CONSOLE_LOG: &str = "console.log";

/// Uploads go in pieces of this size.
const CHUNK: usize = 4 << 20;

/// The directory of the console logs in the pool's directory (a directory volume).
pub const LOGS: &str = "logs";

/// Where VM `vm`'s console log is in a pool whose directory is `dir`.
pub fn console_log_in(dir: &Path, fleet: &str, vm: &str) -> PathBuf {
    dir.join(LOGS)
        .join(format!("{}.{CONSOLE_LOG}", vm_prefix(fleet, vm)))
}

/// At most `max` bytes of the log file at `path` (on this machine) from `from`, with its
/// length; `None` when there is none.
pub fn read_local_log(
    path: &Path,
    from: u64,
    max: usize,
) -> Result<Option<crate::driver::ConsoleLogChunk>, DriverError> {
    use std::io::Seek;
    let fail = |e: std::io::Error| {
        DriverError::new(
            ErrorKind::Transient,
            format!("read {}: {e}", path.display()),
        )
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e)),
    };
    let len = file.metadata().map_err(fail)?.len();
    let mut bytes = Vec::new();
    if from < len {
        file.seek(std::io::SeekFrom::Start(from)).map_err(fail)?;
        file.take((len - from).min(max as u64))
            .read_to_end(&mut bytes)
            .map_err(fail)?;
    }
    Ok(Some(crate::driver::ConsoleLogChunk { len, bytes }))
}

/// Removes the console log of the VM whose volumes are named `<prefix>.` from the pool
/// directory `dir` on this machine, with the log daemon's rotations (`.1`, `.2`, …).
fn remove_local_logs(dir: &Path, prefix: &str) -> Result<(), DriverError> {
    let logs = dir.join(LOGS);
    let Ok(entries) = std::fs::read_dir(&logs) else {
        return Ok(());
    };
    let log = format!("{prefix}.{CONSOLE_LOG}");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rotated = name
            .strip_prefix(&format!("{log}."))
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if name == log || rotated {
            match std::fs::remove_file(entry.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DriverError::new(
                        ErrorKind::Transient,
                        format!("remove {}: {e}", entry.path().display()),
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The prefix of VM `name`'s volumes in fleet `fleet`: the name and the domain's UUID.
pub fn vm_prefix(fleet: &str, name: &str) -> String {
    format!("{name}.{}", domain_uuid(fleet, name))
}

/// The VM (of fleet `fleet`) whose volume `volume` is, when it is one of fleet's names.
pub fn owner_of_volume(fleet: &str, volume: &str) -> Option<String> {
    let (vm, rest) = volume.split_once('.')?;
    crate::driver::check_name(vm).ok()?;
    let (uuid, part) = rest.split_once('.')?;
    if uuid != domain_uuid(fleet, vm).to_string() {
        return None;
    }
    [DISK, SEED].contains(&part).then(|| vm.to_owned())
}

/// An image file fleet ships to hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFile {
    Disk,
    Kernel,
    Initrd,
}

impl ImageFile {
    const ALL: [ImageFile; 3] = [ImageFile::Disk, ImageFile::Kernel, ImageFile::Initrd];

    fn extension(self) -> &'static str {
        match self {
            ImageFile::Disk => "qcow2",
            ImageFile::Kernel => "kernel",
            ImageFile::Initrd => "initrd",
        }
    }

    /// The image's field that names it.
    pub fn field(self) -> &'static str {
        match self {
            ImageFile::Disk => "disk",
            ImageFile::Kernel => "kernel",
            ImageFile::Initrd => "initrd",
        }
    }
}

/// The volume of an image file's content, in fleet `fleet`.
pub fn image_volume(fleet: &str, digest: &str, file: ImageFile) -> String {
    format!("sha256-{digest}.{fleet}.{}", file.extension())
}

/// The marker of a complete image volume.
fn done_marker(volume: &str) -> String {
    format!("{volume}.ok")
}

/// The image volume of fleet `fleet` that `name` is (itself, or the one it is the marker
/// of), when it is one.
fn image_of<'a>(fleet: &str, name: &'a str) -> Option<&'a str> {
    let volume = name.strip_suffix(".ok").unwrap_or(name);
    let (hex, rest) = volume.strip_prefix("sha256-")?.split_once('.')?;
    let (owner, extension) = rest.split_once('.')?;
    let is_hex = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let known = ImageFile::ALL.iter().any(|f| f.extension() == extension);
    (is_hex && owner == fleet && known).then_some(volume)
}

/// What a qcow2 header must hold for the checks (up to the incompatible features).
const HEADER: usize = 80;

/// A check of a file's first `HEADER` bytes.
type HeaderCheck = fn(&[u8]) -> Result<(), String>;

/// Refuses a base disk that is not a qcow2 of its own, from the file's header: a backing
/// file or an external data file would name a file on the host for QEMU to open.
pub fn check_base_header(path: &Path) -> Result<(), String> {
    let mut header = Vec::with_capacity(HEADER);
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER as u64).read_to_end(&mut header))
        .map_err(|e| e.to_string())?;
    check_header(&header)
}

/// `check_base_header` on a file's first bytes (at least `HEADER` of them, if it has them).
fn check_header(header: &[u8]) -> Result<(), String> {
    let read = header.len();
    let word = |at: usize| {
        header
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    };
    if read < 72 || header[..4] != *b"QFI\xfb" {
        return Err("a base disk must be qcow2".to_owned());
    }
    if word(8) != 0 {
        return Err(
            "it has a backing file; make it a disk of its own (qemu-img convert -O qcow2)"
                .to_owned(),
        );
    }
    let version = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // Incompatible feature bit 2: the data lives in an external file. A version 3 header
    // too short to say is no qcow2 QEMU would open either.
    if version >= 3 && read < HEADER {
        return Err("a base disk must be qcow2 (its header is cut short)".to_owned());
    }
    if version >= 3 && word(72) & 0b100 != 0 {
        return Err("a qcow2 with an external data file is not accepted".to_owned());
    }
    Ok(())
}

/// Reads from `source` into `piece` until it holds `want` bytes or the source ends.
fn read_up_to(source: &mut dyn Read, piece: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    while piece.len() < want {
        let before = piece.len();
        match source.take((want - before) as u64).read_to_end(piece) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What identifies a file's content version: device, inode, size and modification time.
fn version_of(meta: &std::fs::Metadata) -> (u64, u64, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// The XML of a new volume.
fn volume_xml(name: &str, capacity: u64, format: &str, mode: u32) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity><allocation unit='bytes'>0</allocation><target><format type='{format}'/><permissions><mode>{mode:04o}</mode></permissions></target></volume>",
        escape(name)
    )
}

/// The type of a pool and the directory it keeps its volumes in, from its definition.
fn pool_directory(xml: &str) -> Option<(String, PathBuf)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    let path = root
        .children()
        .find(|n| n.has_tag_name("target"))?
        .children()
        .find(|n| n.has_tag_name("path"))?
        .text()?
        .trim();
    Some((root.attribute("type")?.to_owned(), PathBuf::from(path)))
}

/// The file a volume's definition names as its backing store.
fn backing_file(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let path = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("backingStore"))?
        .children()
        .find(|n| n.has_tag_name("path"))?
        .text()?;
    Some(path.trim().to_owned())
}

/// The fleet's storage pool on a host, active, with the directory of its volumes.
pub struct VmPool {
    pub pool: StoragePool,
    pub dir: PathBuf,
}

impl VmPool {
    /// Where volume `name` is on the host.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl LibvirtDriver {
    fn vm_pool_name(&self) -> String {
        self.storage_pool
            .clone()
            .unwrap_or_else(|| format!("fleet-{}", self.fleet))
    }

    /// The pool, active. With `make`, a missing pool is defined, built and started, and an
    /// inactive one started; without, either is `None` (observing never starts anything).
    pub(super) fn vm_pool(&self, make: bool) -> Result<Option<VmPool>, DriverError> {
        // One maker at a time in this process (parallel creates define and start it once).
        let _making = make.then(|| {
            self.pool_definition
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        });
        let name = self.vm_pool_name();
        let default_dir = self.storage_dir.join(".volumes");
        let found = match self.call("find the storage pool", |c| {
            c.lookup_storage_pool_by_name(&name)
        }) {
            Ok(pool) => Some(pool),
            Err(e) if e.kind == ErrorKind::Transient => return Err(e),
            Err(_) => None,
        };
        let pool = match found {
            Some(pool) => pool,
            None if !make => return Ok(None),
            None => {
                let xml = format!(
                    "<pool type='dir'><name>{}</name><target><path>{}</path><permissions><mode>0711</mode></permissions></target></pool>",
                    escape(name.as_str()),
                    escape(default_dir.to_string_lossy().as_ref())
                );
                // Built when started (below).
                self.call("define the storage pool", |c| {
                    c.define_storage_pool_xml(&xml, 0)
                })?
            }
        };
        self.checked_pool(pool, &name, &default_dir, make)
    }

    /// `pool` when it is one fleet may use (see the top), started when `make`.
    fn checked_pool(
        &self,
        pool: StoragePool,
        name: &str,
        default_dir: &Path,
        make: bool,
    ) -> Result<Option<VmPool>, DriverError> {
        let xml = self.call("read the storage pool", |_| pool.xml_desc(0))?;
        let conflict = |why: String| {
            DriverError::new(ErrorKind::Conflict, format!("storage pool {name}: {why}"))
        };
        let Some((kind, dir)) = pool_directory(&xml) else {
            return Err(conflict("its definition names no directory".to_owned()));
        };
        if self.storage_pool.is_none() && dir != default_dir {
            return Err(conflict(format!(
                "it exists and is not fleet's (its directory is {}, not {}); rename it, or name it in the host configuration's storagePool",
                dir.display(),
                default_dir.display()
            )));
        }
        if !["dir", "fs", "netfs"].contains(&kind.as_str()) {
            return Err(conflict(format!(
                "a {kind} pool keeps no files; name a directory pool (dir, fs or netfs)"
            )));
        }
        if !self.call("look at the storage pool", |_| pool.is_active())? {
            if !make {
                return Ok(None);
            }
            // Built first (its directory made if missing): a kill between define and
            // build leaves nothing a later start does not finish. (Not `create` with
            // `WITH_BUILD`, which libvirt's test driver refuses.)
            let _ = self.call("build the storage pool", |_| pool.build(0));
            let started = self.call("start the storage pool", |_| pool.create(0));
            // Another process may have started it meanwhile.
            if started.is_err() && !self.call("look at the storage pool", |_| pool.is_active())? {
                return started.map(|()| None);
            }
        }
        // Up again after the host restarts (a kill may have come before this).
        if make && !pool.autostart().unwrap_or(true) {
            let _ = pool.set_autostart(true);
        }
        Ok(Some(VmPool { pool, dir }))
    }

    /// Volume `name` of `pool`, when it exists.
    pub(super) fn find_volume(
        &self,
        pool: &StoragePool,
        name: &str,
    ) -> Result<Option<StorageVol>, DriverError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match pool.lookup_storage_vol_by_name(name) {
            Ok(volume) => Ok(Some(volume)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoStorageVolume)) => Ok(None),
            Err(e) => Err(self.classify(&format!("find volume {name}"), &e)),
        }
    }

    /// Removes volume `name` of `pool`, if it is there.
    fn delete_volume_named(&self, pool: &StoragePool, name: &str) -> Result<bool, DriverError> {
        match self.find_volume(pool, name)? {
            Some(volume) => self.delete_volume(&volume, name).map(|()| true),
            None => Ok(false),
        }
    }

    fn delete_volume(&self, volume: &StorageVol, name: &str) -> Result<(), DriverError> {
        match self.on_domain(&format!("remove volume {name}"), || volume.delete(0)) {
            Ok(()) => Ok(()),
            // Gone meanwhile (another pass, a refresh that found the file gone).
            Err(_) if self.find_volume_in(volume, name)?.is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether `volume`'s pool still has a volume called `name`.
    fn find_volume_in(
        &self,
        volume: &StorageVol,
        name: &str,
    ) -> Result<Option<StorageVol>, DriverError> {
        let pool = self.on_domain("find a volume's pool", || volume.lookup_storage_pool())?;
        self.find_volume(&pool, name)
    }

    /// Makes volume `name` in `pool` (none of that name may exist).
    fn make_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        xml: &str,
    ) -> Result<StorageVol, DriverError> {
        self.call(&format!("make volume {name}"), |_| {
            StorageVol::create_xml(pool, xml, 0)
        })
    }

    /// Whether volumes stream here (the test driver's do not).
    fn streams(&self) -> bool {
        !self.uri.starts_with("test:")
    }

    /// Uploads `len` bytes of `source` into `volume`. `first`, when given, checks the first
    /// bytes sent (up to `HEADER`) before any is.
    fn upload(
        &self,
        volume: &StorageVol,
        name: &str,
        source: &mut dyn Read,
        len: u64,
        first: Option<HeaderCheck>,
    ) -> Result<(), DriverError> {
        let fail =
            |why: String| DriverError::new(ErrorKind::Transient, format!("upload {name}: {why}"));
        let conn = self.connection()?;
        let stream = Stream::new(&conn, 0).map_err(|e| fail(e.message().to_owned()))?;
        self.on_domain(&format!("upload {name}"), || {
            volume.upload(&stream, 0, len, 0)
        })?;
        let mut sent = 0u64;
        let result = (|| -> Result<(), DriverError> {
            let mut piece = Vec::with_capacity(CHUNK);
            if let Some(check) = first {
                // What is sent is what was checked, whatever the file became since.
                read_up_to(source, &mut piece, HEADER).map_err(|e| fail(format!("read: {e}")))?;
                check(&piece).map_err(|why| {
                    DriverError::new(ErrorKind::Permanent, format!("{name}: {why}"))
                })?;
            }
            loop {
                if piece.is_empty() {
                    read_up_to(source, &mut piece, CHUNK)
                        .map_err(|e| fail(format!("read: {e}")))?;
                    if piece.is_empty() {
                        return Ok(());
                    }
                }
                if sent + piece.len() as u64 > len {
                    return Err(fail("the file grew while it was sent".to_owned()));
                }
                sent += piece.len() as u64;
                super::channel::send_all(&stream, &piece).map_err(fail)?;
                piece.clear();
            }
        })();
        let result = result.and_then(|()| {
            if sent == len {
                Ok(())
            } else {
                Err(fail("the file shrank while it was sent".to_owned()))
            }
        });
        if let Err(e) = result {
            let _ = stream.abort();
            return Err(e);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        stream
            .finish()
            .map_err(|e| self.classify(&format!("upload {name}"), &e))
    }

    /// The content of image file `local` (resolved under the image root) on the host: its
    /// volume, uploaded unless the pool has it complete. Returns the volume's path there.
    pub(super) fn shipped(
        &self,
        pool: &VmPool,
        image: &str,
        file: ImageFile,
        local: &Path,
    ) -> Result<PathBuf, DriverError> {
        let fail = |kind, why: String| {
            DriverError::new(
                kind,
                format!("image {image}: {} {}: {why}", file.field(), local.display()),
            )
        };
        let digest = crate::image_content::file_digest(local).ok_or_else(|| {
            fail(
                ErrorKind::Permanent,
                "cannot be read (a regular file fleet's user may read)".to_owned(),
            )
        })?;
        let name = image_volume(&self.fleet, &digest, file);
        let marker = done_marker(&name);
        self.shipped_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), std::time::Instant::now());
        // One upload of an image at a time: parallel creates on it wait for the first's.
        let lock = self
            .shipping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone();
        let _shipping = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.find_volume(&pool.pool, &marker)?.is_some() {
            if self.find_volume(&pool.pool, &name)?.is_some() {
                return Ok(pool.path(&name));
            }
            // A marker without its image (removed by hand): shipped again.
            self.delete_volume_named(&pool.pool, &marker)?;
        }
        // Not complete: whatever an interrupted upload left goes first.
        if let Some(partial) = self.find_volume(&pool.pool, &name)? {
            self.delete_volume(&partial, &name)?;
        }
        self.tidy_due.store(true, Ordering::Relaxed);
        let mut source =
            std::fs::File::open(local).map_err(|e| fail(ErrorKind::Permanent, e.to_string()))?;
        let len = source
            .metadata()
            .map_err(|e| fail(ErrorKind::Permanent, e.to_string()))?
            .len();
        // Made raw: the upload writes the file's bytes as they are (a qcow2 stays one).
        let volume = self.make_volume(&pool.pool, &name, &volume_xml(&name, len, "raw", 0o644))?;
        if self.streams() {
            let first: Option<HeaderCheck> = (file == ImageFile::Disk).then_some(check_header);
            let opened = source.metadata().ok().map(|m| version_of(&m));
            let uploaded = self
                .upload(&volume, &name, &mut source, len, first)
                .and_then(|()| {
                    // What was read is the version the digest was taken of: the open file did
                    // not change while it was sent, the path still names it, and its digest
                    // (`image_content` hashes a file again whenever its version changes) is the
                    // one the volume is named by.
                    let read = source.metadata().ok().map(|m| version_of(&m));
                    let named = std::fs::metadata(local).ok().map(|m| version_of(&m));
                    let same_file = opened.is_some() && opened == read && read == named;
                    if same_file
                        && crate::image_content::file_digest(local).as_deref()
                            == Some(digest.as_str())
                    {
                        Ok(())
                    } else {
                        Err(fail(
                        ErrorKind::Transient,
                        "it changed while it was uploaded; it is uploaded again on the next try"
                            .to_owned(),
                    ))
                    }
                });
            if let Err(e) = uploaded {
                let _ = self.delete_volume(&volume, &name);
                return Err(e);
            }
        }
        self.make_volume(&pool.pool, &marker, &volume_xml(&marker, 0, "raw", 0o600))?;
        Ok(pool.path(&name))
    }

    /// Ships file `local` of image `image` (resolved under the image root) to the host's
    /// pool, as a create does first; returns the volume's path there. For the benchmarks.
    pub fn ship(&self, image: &str, file: ImageFile, local: &Path) -> Result<PathBuf, DriverError> {
        let pool = self.pool_made()?;
        self.shipped(&pool, image, file, local)
    }

    /// Writes `bytes` as VM volume `<prefix>.<part>`, in place of any there was (a running
    /// QEMU keeps reading the one it opened, as with a renamed file).
    pub(super) fn write_volume(
        &self,
        pool: &VmPool,
        vm: &str,
        part: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<PathBuf, DriverError> {
        let name = format!("{}.{part}", vm_prefix(&self.fleet, vm));
        if let Some(old) = self.find_volume(&pool.pool, &name)? {
            self.delete_volume(&old, &name)?;
        }
        let len = bytes.len() as u64;
        let volume = self.make_volume(&pool.pool, &name, &volume_xml(&name, len, "raw", mode))?;
        if self.streams() {
            self.upload(&volume, &name, &mut &bytes[..], len, None)?;
        }
        Ok(pool.path(&name))
    }

    /// Where VM `vm`'s console log goes: `logs/` in the pool's directory, made (a directory
    /// volume) when missing. Never a volume itself: the guest writes every byte of it, and
    /// libvirt reads each volume's header when it refreshes a pool, opening (as root) the
    /// backing file a qcow2 header names, so a guest could make the host's libvirtd open a
    /// path of its choosing (a FIFO, a device). libvirt does not look inside a directory.
    pub(super) fn console_log_path(&self, pool: &VmPool, vm: &str) -> Result<PathBuf, DriverError> {
        if self.find_volume(&pool.pool, LOGS)?.is_none() {
            let xml = format!(
                "<volume type='dir'><name>{LOGS}</name><capacity unit='bytes'>0</capacity><target><format type='dir'/><permissions><mode>0711</mode></permissions></target></volume>"
            );
            // Another VM's step, running beside this one, may have made it meanwhile.
            if let Err(e) = self.make_volume(&pool.pool, LOGS, &xml)
                && self.find_volume(&pool.pool, LOGS)?.is_none()
            {
                return Err(e);
            }
        }
        Ok(console_log_in(&pool.dir, &self.fleet, vm))
    }

    /// A new, empty overlay on `base` (a shipped image volume) for VM `vm`, in place of any
    /// there was. Only while no running domain uses it.
    pub(super) fn new_overlay_volume(
        &self,
        pool: &VmPool,
        vm: &str,
        base: &Path,
        size_mib: u64,
    ) -> Result<PathBuf, DriverError> {
        let name = format!("{}.{DISK}", vm_prefix(&self.fleet, vm));
        if let Some(old) = self.find_volume(&pool.pool, &name)? {
            self.delete_volume(&old, &name)?;
        }
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target><backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
            escape(name.as_str()),
            size_mib * 1024 * 1024,
            escape(base.to_string_lossy().as_ref())
        );
        self.make_volume(&pool.pool, &name, &xml)?;
        Ok(pool.path(&name))
    }

    /// Removes VM `vm`'s overlay and seed, and on fleet's own host its console log with
    /// the log daemon's rotations (on another host they stay in `logs/`: libvirt removes
    /// no file that is not a volume).
    pub(super) fn remove_volumes(&self, vm: &str) -> Result<(), DriverError> {
        // Started if it is not: an inactive pool would hide the volumes, not lack them.
        let pool = self.pool_made()?;
        let prefix = vm_prefix(&self.fleet, vm);
        for part in [DISK, SEED] {
            let name = format!("{prefix}.{part}");
            if let Some(volume) = self.find_volume(&pool.pool, &name)? {
                self.delete_volume(&volume, &name)?;
            }
        }
        if super::is_local_uri(&self.uri) {
            remove_local_logs(&pool.dir, &prefix)?;
        }
        self.tidy_due.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `max` bytes at most of VM `vm`'s console log from `from`, and the log's length now:
    /// on fleet's own host only (`console_log_path` says why the log is no volume).
    pub(super) fn read_console_volume(
        &self,
        vm: &str,
        from: u64,
        max: usize,
    ) -> Result<Option<crate::driver::ConsoleLogChunk>, DriverError> {
        if !super::is_local_uri(&self.uri) {
            return Ok(None);
        }
        let Some(pool) = self.vm_pool(false)? else {
            return Ok(None);
        };
        read_local_log(&console_log_in(&pool.dir, &self.fleet, vm), from, max)
    }

    /// Removes what the top of this module says tidy removes; only when something may have
    /// freed one since the last tidy.
    pub(super) fn tidy_volumes(&self) -> Result<Vec<String>, DriverError> {
        // Never under a step still running (one apply gave up on at its deadline).
        if self.any_in_flight() {
            return Ok(Vec::new());
        }
        if !self.tidy_due.swap(false, Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let tidied = self.tidy_now();
        if tidied.is_err() {
            self.tidy_due.store(true, Ordering::Relaxed);
        }
        tidied
    }

    fn tidy_now(&self) -> Result<Vec<String>, DriverError> {
        let mut removed = Vec::new();
        let Some(pool) = self.vm_pool(false)? else {
            return Ok(removed);
        };
        // Never a refresh: every volume fleet keeps is made through libvirt, which knows it.
        let names = self.call("list volumes", |_| pool.pool.list_volumes())?;
        let domains = self.call("list domains", |c| c.list_all_domains(0))?;
        // This fleet's domains: those with the UUID fleet gives their name (no call).
        let ours: Vec<(String, &virt::domain::Domain)> = domains
            .iter()
            .filter_map(|d| {
                let name = d.name().ok()?;
                let uuid = d.uuid().ok()?;
                (crate::driver::check_name(&name).is_ok()
                    && uuid == domain_uuid(&self.fleet, &name))
                .then_some((name, d))
            })
            .collect();
        let with_domain: HashSet<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
        let remove = |name: &str, removed: &mut Vec<String>| -> Result<(), DriverError> {
            if self.delete_volume_named(&pool.pool, name)? {
                removed.push(format!("removed volume {name}: nothing uses it"));
            }
            Ok(())
        };
        // A VM's volumes (and, here, logs) without its domain: what a failed create left.
        let mut kept = Vec::new();
        let mut gone = BTreeSet::new();
        for name in &names {
            match owner_of_volume(&self.fleet, name) {
                Some(vm) if !with_domain.contains(vm.as_str()) => {
                    remove(name, &mut removed)?;
                    gone.insert(vm);
                }
                _ => kept.push(name.as_str()),
            }
        }
        if super::is_local_uri(&self.uri) {
            for vm in gone {
                remove_local_logs(&pool.dir, &vm_prefix(&self.fleet, &vm))?;
            }
        }
        let images: HashSet<&str> = kept
            .iter()
            .filter_map(|n| image_of(&self.fleet, n))
            .collect();
        if images.is_empty() {
            return Ok(removed);
        }
        let mut used: HashSet<String> = HashSet::new();
        // Overlays back onto disks: every volume that may be one counts, fleet's or not
        // (never this fleet's images, seeds or logs, whose headers a guest may have
        // written).
        for name in kept {
            let own_file = image_of(&self.fleet, name).is_some()
                || owner_of_volume(&self.fleet, name).is_some_and(|_| !name.ends_with(DISK));
            if own_file {
                continue;
            }
            let Some(volume) = self.find_volume(&pool.pool, name)? else {
                continue;
            };
            // Any read that fails keeps every image (never removed on a guess).
            let xml = self.on_domain(&format!("read volume {name}"), || volume.xml_desc(0))?;
            if let Some(backing) = backing_file(&xml) {
                used.insert(backing);
            }
        }
        // The fleet's domains boot from kernels and initrds: in their saved definitions, a
        // running one's live definition, and their snapshots (a revert restores one).
        let wanted: Vec<(String, String)> = images
            .iter()
            .map(|i| {
                let path = pool.path(i).to_string_lossy().into_owned();
                let escaped = escape(path.as_str()).into_owned();
                (path, escaped)
            })
            .collect();
        for (name, dom) in &ours {
            let mut definitions = Vec::new();
            let mut flags = vec![virt::sys::VIR_DOMAIN_XML_INACTIVE];
            if dom.id().is_some() {
                flags.push(0);
            }
            for flags in flags {
                match self.on_domain(&format!("read {name}"), || dom.xml_desc(flags)) {
                    Ok(xml) => definitions.push(xml),
                    // Gone since the listing: it boots from nothing.
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            let snapshots = self.on_domain(&format!("list {name}'s snapshots"), || {
                dom.list_all_snapshots(0)
            })?;
            for snapshot in snapshots {
                definitions.push(self.on_domain(&format!("read a snapshot of {name}"), || {
                    snapshot.xml_desc(0)
                })?);
            }
            for xml in &definitions {
                for (path, escaped) in &wanted {
                    if xml.contains(escaped.as_str()) {
                        used.insert(path.clone());
                    }
                }
            }
        }
        let recent = self
            .shipped_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for image in images {
            if used.contains(pool.path(image).to_string_lossy().as_ref()) {
                continue;
            }
            // Shipped or used for a create in the last hour: a create failing pass after
            // pass would otherwise upload it every time.
            if recent
                .get(image)
                .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(3600))
            {
                continue;
            }
            // The marker first: an image cut short of its marker is never used.
            remove(&done_marker(image), &mut removed)?;
            remove(image, &mut removed)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_say_whose_they_are() {
        let prefix = vm_prefix("demo", "web-1");
        assert_eq!(
            owner_of_volume("demo", &format!("{prefix}.disk.qcow2")).as_deref(),
            Some("web-1")
        );
        assert_eq!(
            owner_of_volume("demo", &format!("{prefix}.seed.iso")).as_deref(),
            Some("web-1")
        );
        // A console log is never a volume fleet keeps in the pool.
        assert_eq!(
            owner_of_volume("demo", &format!("{prefix}.console.log")),
            None
        );
        // Another fleet's, an unknown part, a made-up UUID, an image: nobody's.
        assert_eq!(
            owner_of_volume("other", &format!("{prefix}.disk.qcow2")),
            None
        );
        assert_eq!(
            owner_of_volume("demo", &format!("{prefix}.notes.txt")),
            None
        );
        assert_eq!(
            owner_of_volume(
                "demo",
                "web-1.00000000-0000-0000-0000-000000000000.disk.qcow2"
            ),
            None
        );
        let digest = "ab".repeat(32);
        let image = image_volume("demo", &digest, ImageFile::Kernel);
        assert_eq!(owner_of_volume("demo", &image), None);
        assert_eq!(image_of("demo", &image), Some(image.as_str()));
        assert_eq!(
            image_of("demo", &format!("{image}.ok")),
            Some(image.as_str())
        );
        // Another fleet's image, a short digest, an unknown kind: not this fleet's.
        assert_eq!(image_of("other", &image), None);
        assert_eq!(image_of("demo", "sha256-abc.demo.qcow2"), None);
        assert_eq!(image_of("demo", &format!("sha256-{digest}.demo.iso")), None);
    }

    #[test]
    fn a_base_disk_must_be_a_qcow2_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let header = |backing: u64, version: u32, incompatible: u64| {
            let mut h = vec![0u8; 104];
            h[..4].copy_from_slice(b"QFI\xfb");
            h[4..8].copy_from_slice(&version.to_be_bytes());
            h[8..16].copy_from_slice(&backing.to_be_bytes());
            h[72..80].copy_from_slice(&incompatible.to_be_bytes());
            let path = dir
                .path()
                .join(format!("{backing}-{version}-{incompatible}"));
            crate::atomic_file::write_atomic(&path, &h).expect("write");
            path
        };
        assert_eq!(check_base_header(&header(0, 3, 0)), Ok(()));
        assert_eq!(check_base_header(&header(0, 2, 0b100)), Ok(()));
        let backed = check_base_header(&header(512, 3, 0)).expect_err("a backing file");
        assert!(backed.contains("backing file"), "{backed}");
        let external = check_base_header(&header(0, 3, 0b100)).expect_err("an external data file");
        assert!(external.contains("external data file"), "{external}");
        let raw = dir.path().join("raw");
        crate::atomic_file::write_atomic(&raw, &[0u8; 4096]).expect("write");
        assert_eq!(
            check_base_header(&raw),
            Err("a base disk must be qcow2".to_owned())
        );
        // A version 3 header cut short says nothing of its features: refused.
        let mut short = b"QFI\xfb".to_vec();
        short.extend_from_slice(&3u32.to_be_bytes());
        short.resize(75, 0);
        assert!(check_header(&short).is_err());
    }

    #[test]
    fn pool_and_volume_definitions_are_read() {
        let pool =
            "<pool type='dir'><name>p</name><target>\n  <path>/srv/v</path>\n</target></pool>";
        assert_eq!(
            pool_directory(pool),
            Some(("dir".to_owned(), PathBuf::from("/srv/v")))
        );
        let volume = "<volume><name>x</name><backingStore>\n  <path>/srv/v/sha256-a.qcow2</path>\n  <format type='qcow2'/>\n</backingStore></volume>";
        assert_eq!(
            backing_file(volume).as_deref(),
            Some("/srv/v/sha256-a.qcow2")
        );
        assert_eq!(backing_file("<volume><name>x</name></volume>"), None);
    }
}
