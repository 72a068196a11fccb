//! The libvirt driver.
//!
//! Identity: domain name = VM name, domain UUID = UUIDv5(UUIDv5(ROOT, fleet), VM name), the
//! ownership stamp in `<metadata>` under fleet's namespace. Files fleet makes for a VM live in
//! `<storage dir>/<vm>/` next to an `owner.json` marker; only directories whose marker names
//! this fleet and VM are ever removed.

pub mod domain_xml;
pub mod reach;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::{ChangeCallback, Driver, DriverError, ErrorKind};
use crate::observe::{ObservedHost, ObservedVm, Stamp};
use crate::resolve::DesiredVm;
use crate::spec::{LibvirtProvider, PowerState};

/// Root namespace for fleet's deterministic domain UUIDs.
const UUID_ROOT: uuid::Uuid = uuid::uuid!("5e1f3c0a-6b1d-4f57-9a3e-0c2f7d9b8e41");
const OWNER_MARKER: &str = "owner.json";

/// The domain UUID of VM `name` in fleet `fleet`.
pub fn domain_uuid(fleet: &str, name: &str) -> uuid::Uuid {
    let fleet_ns = uuid::Uuid::new_v5(&UUID_ROOT, fleet.as_bytes());
    uuid::Uuid::new_v5(&fleet_ns, name.as_bytes())
}

/// What `owner.json` says: which fleet's VM a storage directory belongs to.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct OwnerMarker {
    fleet: String,
    vm: String,
    uuid: String,
}

pub struct LibvirtDriver {
    provider: String,
    uri: String,
    fleet: String,
    repo_root: PathBuf,
    storage_dir: PathBuf,
    domain_type: crate::spec::DomainType,
    /// Who QEMU runs as (read once from the host's capabilities; `None` inside: no DAC).
    qemu_user: std::sync::OnceLock<Option<reach::QemuUser>>,
    conn: Mutex<Option<Connect>>,
    calls: AtomicU64,
    /// Observations kept fresh by the event watcher (shared with its thread).
    cache: Arc<Mutex<ObservationCache>>,
    /// The `virsh event` process while one runs, and whether to stop following events.
    events: Arc<EventStream>,
}

#[derive(Default)]
struct EventStream {
    child: Mutex<Option<std::process::Child>>,
    stopping: std::sync::atomic::AtomicBool,
}

impl EventStream {
    /// Ends the `virsh event` process, if one runs.
    fn kill_child(&self) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What `observe` may reuse: each domain's parsed definition, by name, while no event
/// said it changed. Enabled only while an event stream is connected.
#[derive(Default)]
struct ObservationCache {
    enabled: bool,
    /// name → (uuid, observation).
    entries: HashMap<String, (uuid::Uuid, Arc<ObservedVm>)>,
}

impl ObservationCache {
    fn forget(&mut self, name: Option<&str>) {
        match name {
            Some(n) => {
                self.entries.remove(n);
            }
            None => self.entries.clear(),
        }
    }
}

impl LibvirtDriver {
    /// Connects lazily: the first call opens the connection, and a dropped connection (a
    /// restarted libvirtd) is reopened on the next call.
    pub fn new(fleet: &str, provider: &LibvirtProvider, repo_root: &Path) -> LibvirtDriver {
        let storage_dir = match &provider.storage_dir {
            Some(dir) => repo_root.join(dir),
            None => PathBuf::from("/var/lib/fleet").join(fleet),
        };
        virt::error::clear_error_callback();
        LibvirtDriver {
            provider: provider.name.0.clone(),
            uri: provider.uri.clone(),
            fleet: fleet.to_owned(),
            repo_root: repo_root.to_owned(),
            storage_dir,
            domain_type: provider.domain_type,
            qemu_user: std::sync::OnceLock::new(),
            conn: Mutex::new(None),
            calls: AtomicU64::new(0),
            cache: Arc::new(Mutex::new(ObservationCache::default())),
            events: Arc::new(EventStream::default()),
        }
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.storage_dir.join(name)
    }

    fn connection(&self) -> Result<Connect, DriverError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let c = Connect::open(Some(&self.uri)).map_err(|e| {
            DriverError::new(
                ErrorKind::Transient,
                format!(
                    "cannot connect to {} ({}): {}",
                    self.provider,
                    self.uri,
                    e.message()
                ),
            )
        })?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs one libvirt call, counting it and classifying its error. A connection-level
    /// failure drops the cached connection so the next call reconnects.
    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error>,
    ) -> Result<T, DriverError> {
        let conn = self.connection()?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        f(&conn).map_err(|e| self.classify(what, &e))
    }

    fn on_domain<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, virt::error::Error>,
    ) -> Result<T, DriverError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        f().map_err(|e| self.classify(what, &e))
    }

    fn classify(&self, what: &str, e: &virt::error::Error) -> DriverError {
        let kind = match e.code() {
            Enum::Known(ErrorNumber::NoDomain) => ErrorKind::NotFound,
            Enum::Known(ErrorNumber::NoConnect | ErrorNumber::Rpc) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                ErrorKind::Transient
            }
            // System errors are transient only when the connection itself broke (libvirtd
            // restarted); a missing file is not worth retrying.
            Enum::Known(ErrorNumber::SystemError) if is_connection_failure(e.message()) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                ErrorKind::Transient
            }
            Enum::Known(ErrorNumber::OperationTimeout | ErrorNumber::AgentUnresponsive) => {
                ErrorKind::Transient
            }
            Enum::Known(ErrorNumber::DomExist) => ErrorKind::Conflict,
            _ => ErrorKind::Permanent,
        };
        DriverError::new(kind, format!("{what}: {}", e.message()))
    }

    fn lookup(&self, name: &str) -> Result<Option<Domain>, DriverError> {
        match self.call(&format!("look up {name}"), |c| {
            c.lookup_domain_by_name(name)
        }) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a domain's persistent definition (what its next boot uses, and where
    /// `virsh setmem --config` and `virsh edit` leave their changes). Whether it runs comes
    /// from its id, which libvirt hands out with the domain (no call).
    fn read(&self, dom: &Domain, name: &str) -> Result<ObservedVm, DriverError> {
        let xml = self.on_domain(&format!("read {name}"), || {
            dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        })?;
        let mut vm = domain_xml::parse(&xml)
            .map_err(|e| DriverError::new(ErrorKind::Permanent, format!("{name}: {e}")))?;
        vm.running = dom.id().is_some();
        Ok(vm)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, ObservationCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalidate(&self, name: &str) {
        self.lock_cache().forget(Some(name));
    }

    /// The domain `name`, if it carries this fleet's stamp for `name`. Checked before every
    /// mutation: fleet never modifies a VM it did not make.
    fn owned(&self, name: &str) -> Result<Option<(Domain, ObservedVm)>, DriverError> {
        let Some(dom) = self.lookup(name)? else {
            return Ok(None);
        };
        let observed = self.read(&dom, name)?;
        if !observed.owned_by(&self.fleet) {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "VM {name:?} on {} is not fleet {:?}'s; refusing to touch it",
                    self.provider, self.fleet
                ),
            ));
        }
        Ok(Some((dom, observed)))
    }

    fn require_owned(&self, name: &str) -> Result<(Domain, ObservedVm), DriverError> {
        self.owned(name)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::NotFound,
                format!("VM {name:?} does not exist on {}", self.provider),
            )
        })
    }

    fn resolve_path(&self, p: &str) -> PathBuf {
        self.repo_root.join(p)
    }

    /// The user QEMU runs as on this host, read once from libvirt's capabilities.
    fn qemu_user(&self) -> Result<Option<&reach::QemuUser>, DriverError> {
        if let Some(user) = self.qemu_user.get() {
            return Ok(user.as_ref());
        }
        let caps = self.call("read host capabilities", |c| c.capabilities())?;
        let user = reach::QemuUser::from_capabilities(&caps, self.domain_type.as_str());
        Ok(self.qemu_user.get_or_init(|| user).as_ref())
    }

    /// Refuses a path QEMU's user cannot reach, naming the directory and the fix.
    fn check_qemu_reach(&self, path: &Path, need: reach::Need) -> Result<(), DriverError> {
        match self.qemu_user()? {
            Some(user) => user
                .check(path, need)
                .map_err(|why| DriverError::new(ErrorKind::Permanent, why)),
            None => Ok(()),
        }
    }

    fn check_image_file(
        &self,
        vm: &DesiredVm,
        field: &str,
        path: &Path,
    ) -> Result<(), DriverError> {
        if !path.is_file() {
            return Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "image {}: {field} {} does not exist (for the example image run `make image`)",
                    vm.config.image.name,
                    path.display()
                ),
            ));
        }
        self.check_qemu_reach(path, reach::Need::Read).map_err(|e| {
            DriverError::new(
                e.kind,
                format!("image {}: {field}: {}", vm.config.image.name, e.message),
            )
        })
    }

    /// The domain XML for `vm`, checking that its image files exist.
    fn definition(&self, vm: &DesiredVm, stamp: &Stamp) -> Result<String, DriverError> {
        let dir = self.vm_dir(&vm.name);
        let kernel = vm
            .config
            .image
            .kernel
            .as_deref()
            .map(|k| self.resolve_path(k));
        let initrd = vm
            .config
            .image
            .initrd
            .as_deref()
            .map(|i| self.resolve_path(i));
        if let Some(k) = &kernel {
            self.check_image_file(vm, "kernel", k)?;
        }
        if let Some(i) = &initrd {
            self.check_image_file(vm, "initrd", i)?;
        }
        let console_log = dir.join("console.log");
        let seed_iso = dir.join("seed.iso");
        let overlay = vm
            .config
            .image
            .disk
            .as_ref()
            .map(|_| dir.join("disk.qcow2"));
        let files = domain_xml::VmFiles {
            console_log: &console_log,
            disk_overlay: overlay.as_deref(),
            kernel: kernel.as_deref(),
            initrd: initrd.as_deref(),
            seed_iso: Some(&seed_iso),
        };
        Ok(domain_xml::render(
            vm,
            &domain_uuid(&self.fleet, &vm.name),
            stamp,
            &files,
        ))
    }

    /// Makes `<storage>/<vm>/` with its owner marker, and the disk overlay when the image
    /// has a disk.
    fn prepare_files(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let dir = self.vm_dir(&vm.name);
        let io = |what: &str, e: std::io::Error| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("{what} {}: {e}", dir.display()),
            )
        };
        std::fs::create_dir_all(&dir).map_err(|e| io("create", e))?;
        // qemu runs as its own user and must reach the console log and overlay.
        set_mode(&dir, 0o755).map_err(|e| io("chmod", e))?;
        let marker = OwnerMarker {
            fleet: self.fleet.clone(),
            vm: vm.name.clone(),
            uuid: domain_uuid(&self.fleet, &vm.name).to_string(),
        };
        let marker_json = serde_json::to_vec_pretty(&marker).expect("marker is JSON");
        crate::status::write_atomic(&dir.join(OWNER_MARKER), &marker_json)
            .map_err(|e| io("write owner marker in", e))?;
        self.write_seed(vm)?;
        if let (Some(base), Some(size_mib)) = (&vm.config.image.disk, vm.config.disk_mib) {
            let base = self.resolve_path(base);
            self.check_image_file(vm, "disk", &base)?;
            let overlay = dir.join("disk.qcow2");
            // No domain uses it (create runs only when none exists): a leftover from an
            // interrupted create is replaced.
            let _ = std::fs::remove_file(&overlay);
            let output = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&base)
                .arg(&overlay)
                .arg(format!("{size_mib}M"))
                .output()
                .map_err(|e| {
                    DriverError::new(
                        ErrorKind::Permanent,
                        format!("run qemu-img: {e} (install qemu-utils)"),
                    )
                })?;
            if !output.status.success() {
                return Err(DriverError::new(
                    ErrorKind::Permanent,
                    format!(
                        "qemu-img create overlay for {}: {}",
                        vm.name,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Renders the VM's NoCloud seed and writes it as `seed.iso` (volume label `cidata`),
    /// replacing the previous one atomically.
    fn write_seed(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let dir = self.vm_dir(&vm.name);
        let seed = crate::seed::render(vm, &domain_uuid(&self.fleet, &vm.name).to_string());
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("seed of {}: {what}: {e}", vm.name),
            )
        };
        let staging = tempfile::Builder::new()
            .prefix(".seed-")
            .tempdir_in(&dir)
            .map_err(|e| fail("staging directory", &e))?;
        for (name, text) in [
            ("user-data", &seed.user_data),
            ("meta-data", &seed.meta_data),
            ("network-config", &seed.network_config),
        ] {
            std::fs::write(staging.path().join(name), text).map_err(|e| fail(name, &e))?;
        }
        let iso = staging.path().join("seed.iso");
        let output = std::process::Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&iso)
            .args(["user-data", "meta-data", "network-config"])
            .current_dir(staging.path())
            .output()
            .map_err(|e| fail("run genisoimage (install genisoimage)", &e))?;
        if !output.status.success() {
            return Err(fail(
                "genisoimage",
                &String::from_utf8_lossy(&output.stderr).trim(),
            ));
        }
        set_mode(&iso, 0o644).map_err(|e| fail("chmod", &e))?;
        std::fs::rename(&iso, dir.join("seed.iso")).map_err(|e| fail("install seed.iso", &e))
    }

    /// Removes `<storage>/<vm>/` if its marker says it is this fleet's VM (or it is empty).
    fn remove_files(&self, name: &str) -> Result<(), DriverError> {
        let dir = self.vm_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        let marker: Option<OwnerMarker> = std::fs::read(dir.join(OWNER_MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let ours = marker.is_some_and(|m| m.fleet == self.fleet && m.vm == name);
        let result = if ours {
            std::fs::remove_dir_all(&dir)
        } else {
            // Not provably ours: remove only an empty directory, after the temp file of a
            // marker write that a kill interrupted (the first thing a create writes here).
            crate::status::remove_left_temp_files(&dir, OWNER_MARKER, |_| false);
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
                other => other,
            }
        };
        result.map_err(|e| {
            DriverError::new(
                ErrorKind::Transient,
                format!("remove {}: {e}", dir.display()),
            )
        })
    }

    fn is_active(&self, dom: &Domain, name: &str) -> Result<bool, DriverError> {
        self.on_domain(&format!("state of {name}"), || dom.is_active())
    }

    fn power_on(&self, dom: &Domain, name: &str) -> Result<(), DriverError> {
        if self.is_active(dom, name)? {
            return Ok(());
        }
        self.on_domain(&format!("start {name}"), || dom.create().map(|_| ()))
    }

    /// ACPI shutdown, repeated every 2 s (a guest still booting misses the first press),
    /// then a hard power-off once `grace` has passed.
    fn power_off(&self, dom: &Domain, name: &str, grace: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + grace;
        let mut next_press = Instant::now();
        while self.is_active(dom, name)? {
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(
                    vm = name,
                    "graceful shutdown took longer than {grace:?}; powering off"
                );
                return match self.on_domain(&format!("power off {name}"), || dom.destroy()) {
                    Err(e) if e.message.contains("not running") => Ok(()),
                    other => other,
                };
            }
            if now >= next_press {
                // Fails harmlessly if the domain stopped in between.
                let _ = self.on_domain(&format!("shut down {name}"), || dom.shutdown());
                next_press = now + Duration::from_secs(2);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn set_live_stamp(&self, dom: &Domain, stamp: &Stamp, name: &str) -> Result<(), DriverError> {
        let element = domain_xml::stamp_element(stamp, false);
        self.on_domain(&format!("update stamp of {name}"), || {
            dom.set_metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some(domain_xml::STAMP_PREFIX),
                Some(domain_xml::STAMP_NS),
                virt::sys::VIR_DOMAIN_AFFECT_LIVE,
            )
        })
    }

    fn define(&self, xml: &str, name: &str) -> Result<Domain, DriverError> {
        self.call(&format!("define {name}"), |c| c.define_domain_xml(xml))
    }

    fn ensure_power(
        &self,
        dom: &Domain,
        vm: &DesiredVm,
        grace: Duration,
    ) -> Result<(), DriverError> {
        match vm.state {
            PowerState::Running => self.power_on(dom, &vm.name),
            PowerState::Stopped => self.power_off(dom, &vm.name, grace),
        }
    }
}

impl Driver for LibvirtDriver {
    /// The storage directory must be reachable for QEMU's user: every start would fail
    /// otherwise, with QEMU's bare "Permission denied".
    fn preflight(&self) -> Result<(), DriverError> {
        self.check_qemu_reach(&self.storage_dir, reach::Need::Enter)
            .map_err(|e| DriverError::new(e.kind, format!("storage directory: {}", e.message)))
    }

    fn observe(&self) -> Result<ObservedHost, DriverError> {
        let domains = self.call("list domains", |c| c.list_all_domains(0))?;
        let mut vms = Vec::with_capacity(domains.len());
        let mut cache = self.lock_cache();
        for dom in &domains {
            // Name, UUID and id come with the listed domain: no calls.
            let name = dom.name().unwrap_or_default();
            let uuid = dom.uuid().unwrap_or_default();
            if cache.enabled
                && let Some((cached_uuid, vm)) = cache.entries.get_mut(&name)
                && *cached_uuid == uuid
            {
                let running = dom.id().is_some();
                if vm.running != running {
                    Arc::make_mut(vm).running = running;
                }
                vms.push(vm.clone());
                continue;
            }
            match self.read(dom, &name) {
                Ok(vm) => {
                    let vm = Arc::new(vm);
                    if cache.enabled {
                        cache.entries.insert(name, (uuid, vm.clone()));
                    }
                    vms.push(vm);
                }
                // Undefined between the list and the read.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Names are unique on a host, so an unstable sort is exact.
        vms.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // Forget domains that are gone (only when there are any: this runs every pass).
        if cache.entries.len() > vms.len() {
            cache.entries.retain(|name, _| {
                vms.binary_search_by(|vm| vm.name.as_str().cmp(name))
                    .is_ok()
            });
        }
        drop(cache);
        Ok(ObservedHost { vms })
    }

    fn watch(&self, on_change: ChangeCallback) -> Result<(), DriverError> {
        let (uri, provider, cache, events) = (
            self.uri.clone(),
            self.provider.clone(),
            self.cache.clone(),
            self.events.clone(),
        );
        std::thread::Builder::new()
            .name(format!("events-{provider}"))
            .spawn(move || follow_events(&uri, &provider, &cache, &events, &on_change))
            .map(|_| ())
            .map_err(|e| {
                DriverError::new(
                    ErrorKind::Permanent,
                    format!("cannot start the event watcher: {e}"),
                )
            })
    }

    fn unwatch(&self) {
        self.events.stopping.store(true, Ordering::Relaxed);
        self.events.kill_child();
    }

    fn resync(&self) {
        self.lock_cache().forget(None);
    }

    fn agent_endpoint(&self, name: &str) -> Result<Option<super::AgentEndpoint>, DriverError> {
        let (dom, _) = self.require_owned(name)?;
        if dom.id().is_none() {
            return Ok(None);
        }
        let live = self.on_domain(&format!("read {name}"), || dom.xml_desc(0))?;
        Ok(domain_xml::agent_socket(&live).map(super::AgentEndpoint::UnixSocket))
    }

    fn create(&self, vm: &DesiredVm, stamp: &Stamp, grace: Duration) -> Result<(), DriverError> {
        self.invalidate(&vm.name);
        if let Some((dom, _)) = self.owned(&vm.name)? {
            // Made before (a retried or interrupted create): bring it to the spec.
            let xml = self.definition(vm, stamp)?;
            std::fs::create_dir_all(self.vm_dir(&vm.name)).map_err(|e| {
                DriverError::new(
                    ErrorKind::Permanent,
                    format!("create the directory of {}: {e}", vm.name),
                )
            })?;
            self.write_seed(vm)?;
            self.define(&xml, &vm.name)?;
            if self.is_active(&dom, &vm.name)? {
                self.set_live_stamp(&dom, stamp, &vm.name)?;
            }
            return self.ensure_power(&dom, vm, grace);
        }
        let uuid = domain_uuid(&self.fleet, &vm.name);
        if let Ok(other) = self.call("look up by uuid", |c| {
            c.lookup_domain_by_uuid_string(&uuid.to_string())
        }) {
            let other_name = other.name().unwrap_or_default();
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "UUID {uuid} of VM {:?} is already used by domain {other_name:?}",
                    vm.name
                ),
            ));
        }
        let xml = self.definition(vm, stamp)?;
        self.prepare_files(vm)?;
        let dom = self.define(&xml, &vm.name)?;
        if vm.state == PowerState::Running {
            self.power_on(&dom, &vm.name)?;
        }
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        self.invalidate(name);
        let (dom, _) = self.require_owned(name)?;
        self.power_on(&dom, name)
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        self.invalidate(name);
        let (dom, _) = self.require_owned(name)?;
        self.power_off(&dom, name, grace)
    }

    fn update(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        restart: bool,
        grace: Duration,
    ) -> Result<(), DriverError> {
        self.invalidate(&vm.name);
        let (dom, _) = self.require_owned(&vm.name)?;
        let xml = self.definition(vm, stamp)?;
        self.write_seed(vm)?;
        self.define(&xml, &vm.name)?;
        if self.is_active(&dom, &vm.name)? {
            if restart {
                self.power_off(&dom, &vm.name, grace)?;
            } else {
                self.set_live_stamp(&dom, stamp, &vm.name)?;
            }
        }
        self.ensure_power(&dom, vm, grace)
    }

    fn destroy(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        self.invalidate(name);
        let Some((dom, _)) = self.owned(name)? else {
            // Already gone: finish what an interrupted destroy started.
            return self.remove_files(name);
        };
        self.power_off(&dom, name, grace)?;
        let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        match self.on_domain(&format!("undefine {name}"), || dom.undefine_flags(flags)) {
            Err(e) if e.kind != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.remove_files(name)
    }

    fn settle(&self, name: &str) -> Result<(), DriverError> {
        if self.lookup(name)?.is_some() {
            return Ok(());
        }
        self.remove_files(name)
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// Follows `virsh event --all --loop` for the host: libvirt's own client holds the event
/// subscription, because the virt crate does not wrap virConnectDomainEventRegisterAny and
/// fleet forbids unsafe code. Every event line names a domain; its cached observation is
/// dropped and `on_change` hears its name. When the stream breaks (libvirtd restarted), the
/// cache is disabled and emptied, `on_change(None)` asks for a full reconcile, and the
/// stream is reopened.
fn follow_events(
    uri: &str,
    provider: &str,
    cache: &Mutex<ObservationCache>,
    events: &EventStream,
    on_change: &ChangeCallback,
) {
    let set_enabled = |enabled: bool| {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        c.enabled = enabled;
        c.forget(None);
    };
    while !events.stopping.load(Ordering::Relaxed) {
        let child = std::process::Command::new("virsh")
            .args(["-q", "-c", uri, "event", "--all", "--loop"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(mut child) => {
                let stdout = child.stdout.take();
                *events.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                if let Some(stdout) = stdout {
                    let mut lines = std::io::BufReader::new(stdout).lines();
                    set_enabled(true);
                    // Whatever happened before the stream opened is unknown.
                    on_change(None);
                    while let Some(Ok(line)) = lines.next() {
                        if let Some(name) = event_domain(&line) {
                            cache
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .forget(Some(name));
                            on_change(Some(name));
                        }
                    }
                }
                events.kill_child();
                if events.stopping.load(Ordering::Relaxed) {
                    break;
                }
                tracing::warn!(
                    provider,
                    "libvirt event stream ended; observing without a cache until it is back"
                );
            }
            Err(e) => tracing::warn!(provider, "cannot run virsh event: {e}"),
        }
        set_enabled(false);
        on_change(None);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The domain an event line of `virsh event` is about:
/// `event 'lifecycle' for domain 'NAME': Stopped Destroyed`.
fn event_domain(line: &str) -> Option<&str> {
    let rest = line.split_once(" for domain '")?.1;
    let end = rest.rfind("': ")?;
    Some(&rest[..end])
}

fn is_connection_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "cannot recv data",
        "cannot write data",
        "connection reset",
        "end of file while reading",
        "broken pipe",
        "failed to connect socket",
        "no connection",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_name_their_domain() {
        assert_eq!(
            event_domain("event 'lifecycle' for domain 'vm-1': Stopped Destroyed"),
            Some("vm-1")
        );
        assert_eq!(
            event_domain(
                "2026-11-23 09:35:06.777+0000: event 'metadata-change' for domain 'a': type element, uri urn:fleet:stamp:1"
            ),
            Some("a")
        );
        assert_eq!(event_domain("event loop ended"), None);
    }

    #[test]
    fn uuids_are_deterministic_and_scoped_by_fleet() {
        assert_eq!(domain_uuid("lab", "a"), domain_uuid("lab", "a"));
        assert_ne!(domain_uuid("lab", "a"), domain_uuid("lab", "b"));
        assert_ne!(domain_uuid("lab", "a"), domain_uuid("other", "a"));
        assert_eq!(domain_uuid("lab", "a").get_version_num(), 5);
    }
}
