//! The libvirt driver, over the virt crate (libvirt's own C client, wrapped safely; fleet
//! itself has no unsafe code).
//!
//! **Drivers do, never decide.** The planner chose the step; the driver only carries it out.
//! Before every mutation it checks the VM name against the name rule again (`check_name`: a
//! saved plan or a bug must not turn a name into a path elsewhere) and reads the domain's stamp
//! afresh, refusing with `ErrorKind::Conflict` unless it is this fleet's stamp for this VM.
//! fleet never modifies, stops or removes a domain it did not make.
//!
//! Identity: domain name = VM name, domain UUID = UUIDv5(UUIDv5(ROOT, fleet), VM name), the
//! ownership stamp in `<metadata>` under fleet's namespace (`urn:fleet:stamp:1`). The stamp
//! holds fleet, VM name, spec hash, revision, `protect` and the applied `VmConfig` as JSON, so
//! the planner can diff the applied config field by field from the domain XML alone.
//! `domain_xml` renders the definition and reads it back into an `ObservedVm`; it is pure.
//! Because name and UUID are deterministic, a create run again after a crash finds the domain
//! it made. `create` is idempotent: a domain of that name with this fleet's stamp is brought
//! to the spec (definition and seed rewritten, the running domain's live stamp updated, power
//! state set), and a UUID held by a domain of another name is a conflict.
//!
//! Observe is one `list_all_domains` call. Name, UUID and id come with each listed domain
//! (whether it runs is whether it has an id: no call). Each domain the cache cannot answer
//! costs one more call: a domain with the UUID fleet gives that name, its persistent
//! definition (`xml_desc(INACTIVE)`), which gives the stamp, memory and vCPUs together; any
//! other, its stamp alone (`virDomainGetMetadata`, refused at once for a domain without
//! one), so a host's foreign domains cost fleet a small call each, never their definitions
//! (`observe_one`). The persistent definition is what the next boot uses and where
//! `virsh setmem --config` and `virsh edit` leave their changes, so that drift is seen.
//!
//! Events: the virt crate does not wrap `virConnectDomainEventRegisterAny` and fleet forbids
//! unsafe code, so libvirt's own client holds the subscription. `watch` starts a thread that
//! runs `virsh event --all --loop`; each event line names a domain, whose cached definition
//! is dropped, and wakes the daemon with that name. The cache is used only while the stream
//! is connected. When the stream breaks (libvirtd restarted) the cache is emptied and
//! switched off, the daemon is told anything may have changed, and the stream is reopened a
//! second later. `resync` empties the cache for changes libvirt sends no event for
//! (`virsh setmem --config` is one).
//!
//! Storage goes through libvirt (`volumes`): a VM's overlay, NoCloud seed (genisoimage in a
//! private temp directory, uploaded) and console log are volumes of the fleet's storage pool
//! on the host, named with the domain's UUID, and the image files they are made from are
//! shipped to the pool once per content (sha256). So fleet needs nothing but the libvirt
//! connection to a host, and no image file on it. Image files resolve only under the host's
//! image root on fleet's side, through every symlink; a base disk must be a qcow2 of its own
//! (no backing file, no external data file: they would name files on the host).
//!
//! VMs made before storage went through libvirt keep their directory,
//! `<storage dir>/<fleet>/<vm>/` (`Storage::Directory`, recognised by fleet's `owner.json`
//! marker in it, on fleet's own host only) until they are replaced: an update rewrites its
//! seed there, a reset its overlay (with `qemu-img`, on the image root's base disk, whose
//! backing chain must stay under the root), and a destroy removes only the files fleet
//! makes there (`seed.iso`, `disk.qcow2`, `console.log` and its rotations, a seed staging
//! directory), the marker last, then the directory with `rmdir`: anything else found in it
//! stays, and so does the directory. fleet never makes such a directory any more. QEMU runs
//! as its own user and libvirt relabels the files it hands over but never their parent
//! directories, so `reach` checks up front that QEMU's user can enter the storage directory
//! on fleet's own host (`preflight`) and read a directory VM's image files, naming the
//! directory, the user and the fix, instead of every start failing with QEMU's bare
//! "Permission denied".
//!
//! Networks: isolated and brokered VMs get no network card.
//! `network: full` VMs join the NAT network of `full_network`, never QEMU's user networking,
//! whose gateway is the host's loopback. Such a VM is started only once the nftables guard
//! and the network are up, only when fleet runs on the libvirt host itself (a `qemu:///`
//! URI), and only on today's guarded network. `maintain` applies the guard again while the
//! network runs, since a firewall reload on the host removes it.
//!
//! Every domain has the virtio-serial channel `org.fleet.agent.0` with no socket path:
//! libvirt makes the socket where QEMU may create it. `agent_endpoint` checks the stamp;
//! on fleet's own host it reads the socket's path from the live XML
//! (`AgentEndpoint::UnixSocket`: the kernel holds back a guest that floods it, and the link
//! outlives a restart of libvirtd); on a remote host it opens the channel through a libvirt
//! connection of the link's own (`channel`), so the link reaches that VM as a local one.
//!
//! Stop: ACPI shutdown, pressed again every 2 s (a guest still booting misses the first
//! press), then power-off once the grace has passed. Destroy: stop, undefine (with managed
//! save, snapshot metadata and NVRAM), remove the VM's volumes (and directory); a destroy
//! that finds no domain finishes the removal. `settle`, after a crash, removes the storage
//! of a VM with no domain and leaves an existing domain to the next observation.
//!
//! The connection is opened by the first call. A connection-level error (libvirtd
//! restarted) drops it and is `ErrorKind::Transient`, so apply retries and the next call
//! reconnects. `calls` counts libvirt calls, for the benchmarks and the tests that count
//! them.

pub mod channel;
pub mod domain_xml;
pub mod full_network;
pub mod reach;
mod volume_snapshots;
pub mod volumes;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// The files fleet makes in a VM's directory besides its owner marker (libvirt's log daemon
/// writes the console log and its rotations, `console.log.N`). Nothing else there is
/// fleet's to remove.
const VM_FILES: [&str; 3] = ["seed.iso", "disk.qcow2", "console.log"];
/// Where VM directories go when the host configuration names no `storageDir`.
pub const DEFAULT_STORAGE_ROOT: &str = "/var/lib/fleet/storage";

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
    /// Image files resolve under it (the host configuration's `imageRoot`).
    image_root: PathBuf,
    /// `<storageDir>/<fleet>` on the host: the default pool's directory is in it (and, on
    /// fleet's own host, the directories of VMs made before volumes).
    storage_dir: PathBuf,
    /// The host configuration's `storagePool`, when it names one.
    storage_pool: Option<String>,
    /// Whether something may have left an image volume unused since the last tidy.
    tidy_due: AtomicBool,
    /// Held while the storage pool is defined, so parallel creates define it once.
    pool_definition: Mutex<()>,
    /// One lock per image volume, held while it is shipped, so parallel creates upload it
    /// once.
    shipping: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// When this process last shipped or found each image volume: tidy keeps one for an
    /// hour after, so a create that fails pass after pass does not upload it every time.
    shipped_at: Mutex<HashMap<String, Instant>>,
    domain_type: crate::spec::DomainType,
    /// The guarded network of `network: full` VMs (or why the host configuration's is wrong).
    full_network: Result<full_network::GuardedNetwork, full_network::BadAddress>,
    /// Who QEMU runs as (read once from the host's capabilities; `None` inside: no DAC).
    qemu_user: std::sync::OnceLock<Option<reach::QemuUser>>,
    conn: Mutex<Option<Connect>>,
    /// When a remote host may be tried again after a failed connect.
    backoff: Mutex<ConnectBackoff>,
    calls: AtomicU64,
    /// Observations kept fresh by the event watcher (shared with its thread).
    cache: Arc<Mutex<ObservationCache>>,
    /// The `virsh event` process while one runs, and whether to stop following events.
    events: Arc<EventStream>,
}

/// Keepalive probes on every connection: every 5 s; libvirt closes the connection when 3
/// more go unanswered (about 20 s of silence).
pub(crate) const KEEPALIVE: (i32, u32) = (5, 3);

/// Failed connects to a remote host wait 1 s, doubling to 30 s, before the next try, so an
/// unreachable host (an ssh connect that hangs until its timeout) costs each pass nothing.
/// A local socket fails at once and is tried every time: a restarted libvirtd is used as
/// soon as it is back.
#[derive(Default)]
struct ConnectBackoff {
    failures: u32,
    next_try: Option<(std::time::Instant, String)>,
}

impl ConnectBackoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    /// How long until the next try, and why the last one failed, while it must wait.
    fn waiting(&self, now: std::time::Instant) -> Option<(Duration, &str)> {
        let (at, why) = self.next_try.as_ref()?;
        (now < *at).then(|| (*at - now, why.as_str()))
    }

    fn failed(&mut self, now: std::time::Instant, why: String) {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(Self::MAX);
        self.failures += 1;
        self.next_try = Some((now + wait, why));
    }

    fn succeeded(&mut self) {
        *self = ConnectBackoff::default();
    }
}

/// Observation reads a host's domains on at most this many threads (`observe_all`), one
/// per this many domains.
pub const OBSERVE_READERS: usize = 4;
pub const OBSERVE_PER_READER: usize = 64;

/// Whether `uri` reaches a libvirtd on this machine (no host part): nothing to wait for.
pub fn is_local_uri(uri: &str) -> bool {
    LibvirtProvider::is_local_uri(uri)
}

/// libvirt's own event loop, run once per process on a thread of its own: the client
/// library sends keepalive probes and notices a closed connection from it. Registered
/// before the first connection is opened (the first driver made).
fn start_event_loop() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!("libvirt's event loop: {}", e.message());
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!("libvirt's event loop: {}", e.message());
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("libvirt's event loop: {e}");
        }
    });
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
    ///
    /// `provider` comes from the host configuration, `domain_type` from the revision.
    pub fn new(
        fleet: &str,
        provider: &LibvirtProvider,
        domain_type: crate::spec::DomainType,
        image_root: &Path,
    ) -> LibvirtDriver {
        let storage_root = provider
            .storage_dir
            .as_deref()
            .unwrap_or(DEFAULT_STORAGE_ROOT);
        virt::error::clear_error_callback();
        start_event_loop();
        LibvirtDriver {
            provider: provider.name.0.clone(),
            uri: provider.uri.clone(),
            fleet: fleet.to_owned(),
            image_root: image_root.to_owned(),
            storage_dir: Path::new(storage_root).join(fleet),
            storage_pool: provider.storage_pool.clone(),
            // A process's first pass tidies what an earlier one left.
            tidy_due: AtomicBool::new(true),
            pool_definition: Mutex::new(()),
            shipping: Mutex::default(),
            shipped_at: Mutex::default(),
            domain_type,
            full_network: full_network::GuardedNetwork::from_spec(provider.full_network.as_ref()),
            qemu_user: std::sync::OnceLock::new(),
            conn: Mutex::new(None),
            backoff: Mutex::new(ConnectBackoff::default()),
            calls: AtomicU64::new(0),
            cache: Arc::new(Mutex::new(ObservationCache::default())),
            events: Arc::new(EventStream::default()),
        }
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// `<storage>/<fleet>/<name>`. The name is checked again here (a saved plan or a bug
    /// must not turn a name into a path elsewhere).
    fn vm_dir(&self, name: &str) -> Result<PathBuf, DriverError> {
        super::check_name(name)?;
        Ok(self.storage_dir.join(name))
    }

    /// For `fleet doctor`: the daemon's libvirt version and the hypervisor's, as
    /// `(libvirt, hypervisor)` in libvirt's major.minor.micro form, or why `uri` cannot be
    /// reached. Opens a connection of its own (closed when dropped).
    pub fn versions(uri: &str) -> Result<(String, String), String> {
        let c = Connect::open(Some(uri)).map_err(|e| e.message().to_owned())?;
        let dotted = |v: u32| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000);
        c.lib_version()
            .and_then(|lib| Ok((dotted(lib), dotted(c.hyp_version()?))))
            .map_err(|e| e.message().to_owned())
    }

    fn connection(&self) -> Result<Connect, DriverError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A connection keepalive found dead (the host stopped answering) is opened afresh.
        if let Some(c) = guard.as_ref().filter(|c| c.is_alive().unwrap_or(false)) {
            return Ok(c.clone());
        }
        *guard = None;
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((until, why)) = backoff.waiting(std::time::Instant::now()) {
            return Err(DriverError::new(
                ErrorKind::Transient,
                format!(
                    "cannot connect to {} ({}): {why}; next try in {} s",
                    self.provider,
                    self.uri,
                    until.as_secs().max(1)
                ),
            ));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let c = match Connect::open(Some(&self.uri)) {
            Ok(c) => c,
            Err(e) => {
                if !is_local_uri(&self.uri) {
                    backoff.failed(std::time::Instant::now(), e.message().to_owned());
                }
                return Err(DriverError::new(
                    ErrorKind::Transient,
                    format!(
                        "cannot connect to {} ({}): {}",
                        self.provider,
                        self.uri,
                        e.message()
                    ),
                ));
            }
        };
        backoff.succeeded();
        // A host that stops answering is noticed within KEEPALIVE (about 20 s) rather than
        // when TCP gives up, and only its VMs become unknown. The test driver has none.
        if let Err(e) = c.set_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            && !self.uri.starts_with("test:")
        {
            tracing::warn!(provider = %self.provider, "no keepalive: {}", e.message());
        }
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
        // libvirt's event loop notices a connection that closed (libvirtd restarted, the
        // host stopped answering keepalives) before the call does; the call then fails with
        // an error of any code. The connection says what happened.
        let closed = {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let closed = conn
                .as_ref()
                .is_some_and(|c| !c.is_alive().unwrap_or(false));
            if closed {
                *conn = None;
            }
            closed
        };
        if closed {
            return DriverError::new(ErrorKind::Transient, format!("{what}: {}", e.message()));
        }
        let kind = match e.code() {
            Enum::Known(ErrorNumber::NoDomain) => ErrorKind::NotFound,
            Enum::Known(ErrorNumber::NoConnect | ErrorNumber::Rpc) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                ErrorKind::Transient
            }
            // System errors are transient only when the connection itself broke (libvirtd
            // restarted); a missing file is not worth retrying.
            Enum::Known(ErrorNumber::SystemError | ErrorNumber::InternalError)
                if is_connection_failure(e.message()) =>
            {
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

    /// `observe_one` of each domain, on a few threads when there are many: libvirt's client
    /// carries calls from several threads over one connection at once, and libvirtd's
    /// workers answer them side by side (on 2 cores, 1,000 domains in about two thirds of
    /// the time of one call after another).
    #[allow(clippy::type_complexity)]
    fn observe_all(
        &self,
        domains: Vec<(&Domain, String, uuid::Uuid)>,
    ) -> Vec<(String, uuid::Uuid, Result<ObservedVm, DriverError>)> {
        let readers = domains
            .len()
            .div_ceil(OBSERVE_PER_READER)
            .clamp(1, OBSERVE_READERS);
        if readers == 1 {
            return domains
                .into_iter()
                .map(|(dom, name, uuid)| {
                    let read = self.observe_one(dom, &name, uuid);
                    (name, uuid, read)
                })
                .collect();
        }
        let chunk = domains.len().div_ceil(readers);
        let mut domains = domains;
        let mut chunks = Vec::with_capacity(readers);
        while !domains.is_empty() {
            let rest = domains.split_off(chunk.min(domains.len()));
            chunks.push(std::mem::replace(&mut domains, rest));
        }
        std::thread::scope(|scope| {
            let reading: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|(dom, name, uuid)| {
                                let read = self.observe_one(dom, &name, uuid);
                                (name, uuid, read)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            reading
                .into_iter()
                // A reader that panicked: so does the pass (a domain left out would be
                // planned anew).
                .flat_map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// What observe needs of a domain the cache cannot answer: the whole definition of a
    /// domain some fleet made (memory, vCPUs and stamp, which the plan compares), and of a
    /// foreign one only that it has no stamp. A domain with the UUID fleet gives this name
    /// is read whole at once (one call; the stamp in it still decides whose it is). Any
    /// other first has its stamp asked for (`virDomainGetMetadata` for fleet's namespace,
    /// which libvirt refuses at once for a domain without one): a foreign domain costs that
    /// one small call, and one with a stamp (this fleet adopted it and it kept its own
    /// UUID, or another fleet's) one more. A domain whose stamp cannot be asked for that
    /// way (a transient one has no persistent metadata) is read whole.
    fn observe_one(
        &self,
        dom: &Domain,
        name: &str,
        uuid: uuid::Uuid,
    ) -> Result<ObservedVm, DriverError> {
        if uuid == domain_uuid(&self.fleet, name) {
            return self.read(dom, name);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        match dom.metadata(
            virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(domain_xml::STAMP_NS),
            virt::sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            // No element in fleet's namespace: no fleet made it.
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomainMetadata) => Ok(ObservedVm {
                name: name.to_owned(),
                uuid: uuid.hyphenated().to_string(),
                running: dom.id().is_some(),
                cpus: 0,
                memory_mib: 0,
                stamp: None,
            }),
            Err(e) => {
                let error = self.classify(&format!("read {name}'s stamp"), &e);
                match error.kind {
                    ErrorKind::NotFound | ErrorKind::Transient => Err(error),
                    _ => self.read(dom, name),
                }
            }
            // Some fleet's (libvirt hands the element back with its namespace taken off
            // and so rewritten): one parser, the definition's, says whose.
            Ok(_) => self.read(dom, name),
        }
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

    /// The storage pool of this fleet's workspaces: a directory pool fleet defines, in its
    /// storage directory (`.workspaces`, a name no VM's directory can have).
    fn workspace_pool_name(&self) -> String {
        format!("fleet-ws-{}", self.fleet)
    }

    /// The workspace pool, active; made (defined, built, started, autostarted) when
    /// `make` and missing. `None` when it does not exist and need not.
    fn workspace_pool(
        &self,
        make: bool,
    ) -> Result<Option<virt::storage_pool::StoragePool>, DriverError> {
        let name = self.workspace_pool_name();
        let dir = self.storage_dir.join(".workspaces");
        let found = match self.call("find the workspace pool", |c| {
            c.lookup_storage_pool_by_name(&name)
        }) {
            Ok(pool) => Some(pool),
            Err(_) if !make => return Ok(None),
            Err(_) => None,
        };
        let pool = match found {
            Some(pool) => {
                // Only the pool fleet would define: its directory, in fleet's storage.
                let xml = self.call("read the workspace pool", |_| pool.xml_desc(0))?;
                if !xml.contains(&format!("<path>{}</path>", dir.display())) {
                    return Err(DriverError::new(
                        ErrorKind::Conflict,
                        format!(
                            "storage pool {name} exists and is not fleet's (its directory is not {}); rename or remove it",
                            dir.display()
                        ),
                    ));
                }
                pool
            }
            None => {
                let xml = format!(
                    "<pool type='dir'><name>{}</name><target><path>{}</path><permissions><mode>0711</mode></permissions></target></pool>",
                    quick_xml::escape::escape(name.as_str()),
                    quick_xml::escape::escape(dir.to_string_lossy().as_ref())
                );
                let pool = self.call("define the workspace pool", |c| {
                    c.define_storage_pool_xml(&xml, 0)
                })?;
                self.call("build the workspace pool", |_| pool.build(0))?;
                let _ = pool.set_autostart(true);
                pool
            }
        };
        if !self.call("look at the workspace pool", |_| pool.is_active())? {
            // Only a change makes it start: observing reads, never starts anything.
            if !make {
                return Ok(None);
            }
            self.call("start the workspace pool", |_| pool.create(0))?;
        }
        Ok(Some(pool))
    }

    /// Makes the volumes of `vm`'s workspaces that do not exist yet, and, with `grow`,
    /// grows those smaller than the revision asks (only while the VM is down: QEMU holds
    /// an attached image). A volume is never made smaller (the plan refuses that).
    fn ensure_workspaces(&self, vm: &DesiredVm, grow: bool) -> Result<(), DriverError> {
        if vm.config.workspaces.is_empty() {
            return Ok(());
        }
        let Some(pool) = self.workspace_pool(true)? else {
            return Ok(());
        };
        for mount in &vm.config.workspaces {
            let volume = domain_xml::workspace_volume(&mount.name);
            // Never two VMs on one workspace: not while another domain has it, running or
            // defined (whatever its stamp says: a crash can leave a running VM holding a
            // workspace its saved definition let go).
            let holders = self.domains_attaching(&volume, &vm.name)?;
            if !holders.is_empty() {
                return Err(DriverError::new(
                    ErrorKind::Transient,
                    format!(
                        "workspace {} is still attached to {}; {} gets it once that lets it go",
                        mount.name,
                        holders.join(", "),
                        vm.name
                    ),
                ));
            }
            let bytes = mount.size_mib * 1024 * 1024;
            match pool.lookup_storage_vol_by_name(&volume) {
                Ok(found) => {
                    self.check_workspace_volume(&found, &mount.name)?;
                    let capacity = self
                        .call(&format!("read workspace {}", mount.name), |_| found.info())?
                        .capacity;
                    if grow && capacity < bytes {
                        self.call(&format!("grow workspace {}", mount.name), |_| {
                            found.resize(bytes, 0)
                        })?;
                    }
                }
                Err(_) => {
                    // Owned by fleet's own user, not libvirtd's: `qemu-img` takes its
                    // snapshots while it is offline (qemu gets it while a VM runs).
                    let (uid, gid) = (
                        rustix::process::geteuid().as_raw(),
                        rustix::process::getegid().as_raw(),
                    );
                    let xml = format!(
                        "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity><target><format type='qcow2'/><permissions><owner>{uid}</owner><group>{gid}</group><mode>0600</mode></permissions></target></volume>",
                        quick_xml::escape::escape(volume.as_str())
                    );
                    self.call(&format!("make workspace {}", mount.name), |_| {
                        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// This fleet's workspaces on the host: the volumes in its pool named as workspaces
    /// (anything else there is left alone), with the VMs whose stamps attach them.
    fn observe_workspaces(
        &self,
        vms: &[Arc<ObservedVm>],
    ) -> Result<Vec<crate::observe::ObservedWorkspace>, DriverError> {
        let Some(pool) = self.workspace_pool(false)? else {
            return Ok(Vec::new());
        };
        let _ = pool.refresh(0);
        let volumes = self.call("list workspaces", |_| pool.list_all_volumes(0))?;
        let mut found = Vec::new();
        for volume in volumes {
            let Ok(file) = volume.name() else { continue };
            let Some(name) = file.strip_suffix(".qcow2") else {
                continue;
            };
            if super::check_name(name).is_err() {
                continue;
            }
            let capacity = self.call("read a workspace", |_| volume.info())?.capacity;
            let identity = volume
                .xml_desc(0)
                .ok()
                .and_then(|xml| {
                    let at = xml.find("<ctime>")? + "<ctime>".len();
                    let end = xml[at..].find('<')? + at;
                    Some(xml[at..end].trim().to_owned())
                })
                .unwrap_or_default();
            let attached_to = vms
                .iter()
                .filter(|vm| vm.owned_by(&self.fleet))
                .filter(|vm| {
                    vm.stamp
                        .as_ref()
                        .and_then(|s| s.config.as_ref())
                        .is_some_and(|c| c.workspaces.iter().any(|m| m.name == name))
                })
                .map(|vm| vm.name.clone())
                .collect();
            found.push(crate::observe::ObservedWorkspace {
                name: name.to_owned(),
                size_mib: capacity / (1024 * 1024),
                attached_to,
                identity,
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Refuses to snapshot or revert a domain that attaches a workspace (now, or in its
    /// saved definition): an internal snapshot would take the workspace too, and a revert
    /// would roll it back, or attach it again after it moved to another VM.
    fn refuse_with_workspaces(
        &self,
        dom: &Domain,
        name: &str,
        what: &str,
    ) -> Result<(), DriverError> {
        let pool = format!("pool='{}'", self.workspace_pool_name());
        for flags in [0, virt::sys::VIR_DOMAIN_XML_INACTIVE] {
            let xml = self.on_domain(&format!("read {name}"), || dom.xml_desc(flags))?;
            if xml.contains(&pool) {
                return Err(DriverError::new(
                    ErrorKind::Permanent,
                    format!(
                        "{name} has workspaces attached: it is not {what} (a snapshot would hold its workspaces too, and a revert roll them back)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The domains other than `except` that attach `volume` of the workspace pool, in their
    /// running definition or their saved one.
    fn domains_attaching(&self, volume: &str, except: &str) -> Result<Vec<String>, DriverError> {
        self.domains_holding(volume, |dom| {
            if dom.name().is_ok_and(|n| n == except) {
                return vec![];
            }
            let mut flags = vec![virt::sys::VIR_DOMAIN_XML_INACTIVE];
            if dom.id().is_some() {
                flags.push(0);
            }
            flags
        })
    }

    /// The domains (fleet's or not) that have `volume` of the workspace pool in use: running
    /// with it, or saved (`managedsave`) to resume with it, where a change of the volume
    /// would corrupt the guest's filesystem when it resumes.
    fn domains_in_use(&self, volume: &str) -> Result<Vec<String>, DriverError> {
        self.domains_holding(volume, |dom| {
            if dom.id().is_some() {
                vec![0]
            } else if dom.has_managed_save(0).unwrap_or(true) {
                vec![virt::sys::VIR_DOMAIN_XML_INACTIVE]
            } else {
                vec![]
            }
        })
    }

    /// The domains on the host whose definitions, of the kinds `definitions` names for each
    /// (`xml_desc` flags; none skips it), attach `volume` of the workspace pool.
    fn domains_holding(
        &self,
        volume: &str,
        definitions: impl Fn(&Domain) -> Vec<u32>,
    ) -> Result<Vec<String>, DriverError> {
        let (pool, volume) = (
            format!("pool='{}'", self.workspace_pool_name()),
            format!("volume='{volume}'"),
        );
        let domains = self.call("list domains", |c| c.list_all_domains(0))?;
        Ok(domains
            .iter()
            .filter(|dom| {
                definitions(dom).into_iter().any(|flags| {
                    dom.xml_desc(flags)
                        .is_ok_and(|xml| xml.contains(&pool) && xml.contains(&volume))
                })
            })
            .map(|dom| dom.name().unwrap_or_default())
            .collect())
    }

    /// Where workspace `name`'s volume is on the host; `None` when fleet has not made it.
    fn workspace_path(&self, name: &str) -> Result<Option<PathBuf>, DriverError> {
        let Some(pool) = self.workspace_pool(false)? else {
            return Ok(None);
        };
        let volume = domain_xml::workspace_volume(name);
        let Ok(found) = pool.lookup_storage_vol_by_name(&volume) else {
            return Ok(None);
        };
        self.check_workspace_volume(&found, name)?;
        let path = self.call(&format!("find workspace {name}"), |_| found.path())?;
        Ok(Some(PathBuf::from(path)))
    }

    /// The path of workspace `name`'s volume for `qemu-img`, which runs on fleet's own host:
    /// refused for a provider on another host (the plan refuses its `snapshots:` policies),
    /// before any call.
    fn snapshot_path(&self, name: &str) -> Result<PathBuf, DriverError> {
        self.snapshots_here(name)?;
        self.workspace_path(name)?.ok_or_else(|| no_workspace(name))
    }

    fn snapshots_here(&self, name: &str) -> Result<(), DriverError> {
        if is_local_uri(&self.uri) {
            return Ok(());
        }
        Err(DriverError::new(
            ErrorKind::Conflict,
            format!(
                "workspace {name}: snapshots of workspaces are taken with qemu-img on fleet's own host (libvirt's storage API has none), and this provider is reached at {}; take a snapshot of its VM instead (fleet snapshot create VM)",
                self.uri
            ),
        ))
    }

    /// Only what fleet makes: qcow2 with no backing file (a backing file would show the
    /// guest a host file, and `qemu-img` would follow it).
    fn check_workspace_volume(
        &self,
        found: &virt::storage_vol::StorageVol,
        name: &str,
    ) -> Result<(), DriverError> {
        let xml = self.call(&format!("read workspace {name}"), |_| found.xml_desc(0))?;
        // libvirt indents its XML: compared without the whitespace between tags.
        let flat: String = xml.split_whitespace().collect();
        if !flat.contains("<formattype='qcow2'/>") || flat.contains("<backingStore><path>") {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "{} in pool {} is not a volume fleet made (not a plain qcow2); move it away",
                    domain_xml::workspace_volume(name),
                    self.workspace_pool_name()
                ),
            ));
        }
        Ok(())
    }

    /// Drops libvirt's records of `dom`'s snapshots (before its overlay, which holds them,
    /// is made again).
    fn forget_snapshots(&self, dom: &Domain, name: &str) -> Result<(), DriverError> {
        let all = self.on_domain(&format!("list {name}'s snapshots"), || {
            dom.list_all_snapshots(0)
        })?;
        for snapshot in all {
            self.on_domain(&format!("forget a snapshot of {name}"), || {
                snapshot.delete(virt::sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            })?;
        }
        Ok(())
    }

    fn require_owned(&self, name: &str) -> Result<(Domain, ObservedVm), DriverError> {
        self.owned(name)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::NotFound,
                format!("VM {name:?} does not exist on {}", self.provider),
            )
        })
    }

    /// An image file under the image root: the path as written, resolved through every
    /// symlink, must still lie under the (resolved) root.
    fn resolve_path(&self, vm: &DesiredVm, field: &str, p: &str) -> Result<PathBuf, DriverError> {
        let refuse = |why: String| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("image {}: {field} {p:?}: {why}", vm.config.image.name),
            )
        };
        if let Some(problem) = crate::load::relative_path_problem(p) {
            return Err(refuse(problem.to_owned()));
        }
        let root = std::fs::canonicalize(&self.image_root).map_err(|e| {
            refuse(format!(
                "image root {}: {e} (imageRoot in the host configuration; for the example image run `make image`)",
                self.image_root.display()
            ))
        })?;
        let path = self.image_root.join(p);
        let real = std::fs::canonicalize(&path).map_err(|e| {
            refuse(format!(
                "{}: {e} (for the example image run `make image`)",
                path.display()
            ))
        })?;
        if !real.starts_with(&root) {
            return Err(refuse(format!(
                "resolves to {}, outside the image root {}",
                real.display(),
                root.display()
            )));
        }
        Ok(real)
    }

    /// Refuses a base disk whose backing chain or external data file reaches outside the
    /// image root: QEMU would open every file of the chain for the guest.
    fn check_backing_chain(&self, vm: &DesiredVm, base: &Path) -> Result<(), DriverError> {
        let refuse = |why: String| {
            DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "image {}: disk {}: {why}",
                    vm.config.image.name,
                    base.display()
                ),
            )
        };
        let output = super::host_command("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(base)
            .output()
            .map_err(|e| refuse(format!("run qemu-img: {e} (install qemu-utils)")))?;
        if !output.status.success() {
            return Err(refuse(format!(
                "qemu-img info: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let chain: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
            .map_err(|e| refuse(format!("qemu-img info printed no chain: {e}")))?;
        let root = std::fs::canonicalize(&self.image_root)
            .map_err(|e| refuse(format!("image root: {e}")))?;
        for image in &chain {
            if image["format"] != "qcow2" && image["format"] != "raw" {
                return Err(refuse(format!(
                    "{} images are not accepted",
                    image["format"]
                )));
            }
            if !image["format-specific"]["data"]["data-file"].is_null() {
                return Err(refuse(
                    "a qcow2 with an external data file is not accepted".to_owned(),
                ));
            }
            let file = image["filename"].as_str().unwrap_or_default();
            let inside = std::fs::canonicalize(file)
                .map(|real| real.starts_with(&root))
                .unwrap_or(false);
            if !inside {
                return Err(refuse(format!(
                    "its backing chain reaches {file:?}, outside the image root {}",
                    root.display()
                )));
            }
        }
        if chain.first().is_some_and(|i| i["format"] != "qcow2") {
            return Err(refuse("a base disk must be qcow2".to_owned()));
        }
        Ok(())
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
                .map_err(|why| DriverError::new(ErrorKind::Permanent, why.to_string())),
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

    /// The domain XML for `vm`, naming the storage at `paths`.
    fn definition(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        paths: &VmPaths,
    ) -> Result<String, DriverError> {
        let full_network = match (&self.full_network, vm.config.network) {
            (Ok(n), _) => n.name.as_str(),
            (Err(why), crate::spec::NetworkMode::Full) => {
                return Err(DriverError::new(ErrorKind::Permanent, why.to_string()));
            }
            (Err(_), _) => full_network::DEFAULT_NAME,
        };
        let files = domain_xml::VmFiles {
            console_log: &paths.console_log,
            disk_overlay: paths.overlay.as_deref(),
            kernel: paths.kernel.as_deref(),
            initrd: paths.initrd.as_deref(),
            seed_iso: Some(&paths.seed),
            full_network,
            workspace_pool: &self.workspace_pool_name(),
        };
        Ok(domain_xml::render(
            vm,
            &domain_uuid(&self.fleet, &vm.name),
            stamp,
            &files,
        ))
    }

    /// The directory fleet made for VM `name` before storage went through libvirt (on its
    /// own host, with fleet's owner marker), which the VM keeps until it is replaced.
    fn legacy_dir(&self, name: &str) -> Result<Option<PathBuf>, DriverError> {
        let dir = self.vm_dir(name)?;
        Ok((is_local_uri(&self.uri) && self.dir_is_ours(&dir, name)).then_some(dir))
    }

    /// Where the storage of VM `name`, whose domain is `dom`, is: read from the seed its
    /// saved definition names, never guessed. A seed neither in the VM's directory nor in
    /// the pool (the host configuration's `storageDir` or `storagePool` changed since) is a
    /// conflict: fleet never makes a VM a new, empty disk beside the one it has.
    fn storage_of(&self, dom: &Domain, name: &str) -> Result<Storage, DriverError> {
        let xml = self.on_domain(&format!("read {name}"), || {
            dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        })?;
        let seed = domain_xml::seed_path(&xml);
        let dir = self.vm_dir(name)?;
        if seed.as_deref() == Some(dir.join("seed.iso").as_path()) {
            if !self.dir_is_ours(&dir, name) {
                return Err(DriverError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{name}'s files are in {}, which has no owner marker of fleet {:?} (any more); fleet touches no directory it cannot tell it made",
                        dir.display(),
                        self.fleet
                    ),
                ));
            }
            return Ok(Storage::Directory(dir));
        }
        let pool = self.pool_made()?;
        let expected = pool.path(&format!(
            "{}.{}",
            volumes::vm_prefix(&self.fleet, name),
            volumes::SEED
        ));
        if seed.as_deref() == Some(expected.as_path()) {
            return Ok(Storage::Volumes(pool));
        }
        Err(DriverError::new(
            ErrorKind::Conflict,
            format!(
                "{name}'s seed is {}, not where the host configuration keeps its storage ({}): was storageDir or storagePool changed? Change it back; fleet never moves a VM's disk",
                seed.map_or_else(|| "missing".to_owned(), |s| s.display().to_string()),
                expected.display()
            ),
        ))
    }

    fn pool_made(&self) -> Result<volumes::VmPool, DriverError> {
        self.vm_pool(true)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::Transient,
                format!("the storage pool on {} did not start", self.provider),
            )
        })
    }

    /// The image's files on fleet's side, resolved under the image root, each a regular
    /// file, a base disk a qcow2 of its own. Reads only: a replace checks this before it
    /// destroys (`check_create`), and a create before it makes anything.
    fn checked_images(&self, vm: &DesiredVm) -> Result<ImageFiles, DriverError> {
        let image = &vm.config.image;
        let mut found = ImageFiles::default();
        for (file, named, slot) in [
            (volumes::ImageFile::Kernel, &image.kernel, &mut found.kernel),
            (volumes::ImageFile::Initrd, &image.initrd, &mut found.initrd),
            (volumes::ImageFile::Disk, &image.disk, &mut found.disk),
        ] {
            let Some(named) = named else { continue };
            let path = self.resolve_path(vm, file.field(), named)?;
            let refuse = |why: String| {
                DriverError::new(
                    ErrorKind::Permanent,
                    format!(
                        "image {}: {} {}: {why}",
                        image.name,
                        file.field(),
                        path.display()
                    ),
                )
            };
            if !path.is_file() {
                return Err(refuse(
                    "is not a file (for the example image run `make image`)".to_owned(),
                ));
            }
            if file == volumes::ImageFile::Disk {
                volumes::check_base_header(&path).map_err(refuse)?;
                // The content the plan showed, or none: a disk rebuilt since is the next
                // plan's change (a replace it shows), never this one's.
                if let Some(planned) = &image.disk_sha256
                    && crate::image_content::file_digest(&path).as_ref() != Some(planned)
                {
                    return Err(DriverError::new(
                        ErrorKind::Transient,
                        format!(
                            "image {}: disk {}: it changed since the plan; the next plan shows the change",
                            image.name,
                            path.display()
                        ),
                    ));
                }
            }
            *slot = Some(path);
        }
        Ok(found)
    }

    /// Makes what VM `vm`'s definition names and says where it is: its seed written anew;
    /// in the pool, its image files shipped, its console log made, and its overlay made
    /// when `fresh_disk` (a new VM, a reset). A directory VM gets a new overlay only with
    /// `fresh_disk` (a reset).
    fn prepare(
        &self,
        vm: &DesiredVm,
        storage: &Storage,
        fresh_disk: bool,
    ) -> Result<VmPaths, DriverError> {
        let pool = match storage {
            Storage::Directory(dir) => return self.prepare_directory(vm, dir, fresh_disk),
            Storage::Volumes(pool) => pool,
        };
        // Every file is checked before anything is made for the VM.
        let images = self.checked_images(vm)?;
        let ship = |file, local: &Option<PathBuf>| {
            local
                .as_deref()
                .map(|local| self.shipped(pool, &vm.config.image.name, file, local))
                .transpose()
        };
        let kernel = ship(volumes::ImageFile::Kernel, &images.kernel)?;
        let initrd = ship(volumes::ImageFile::Initrd, &images.initrd)?;
        let overlay = match (&images.disk, vm.config.disk_mib) {
            (Some(base), Some(size_mib)) => {
                let name = format!(
                    "{}.{}",
                    volumes::vm_prefix(&self.fleet, &vm.name),
                    volumes::DISK
                );
                if fresh_disk {
                    let base =
                        self.shipped(pool, &vm.config.image.name, volumes::ImageFile::Disk, base)?;
                    Some(self.new_overlay_volume(pool, &vm.name, &base, size_mib)?)
                } else if self.find_volume(&pool.pool, &name)?.is_some() {
                    Some(pool.path(&name))
                } else {
                    // Never an empty disk under a VM that had one.
                    return Err(DriverError::new(
                        ErrorKind::Conflict,
                        format!(
                            "{}'s disk ({name}) is gone from storage pool {}; fleet makes no empty disk under a VM: remove its file to destroy it, or restore the volume",
                            vm.name,
                            pool.dir.display()
                        ),
                    ));
                }
            }
            _ => None,
        };
        let console_log = self.console_log_path(pool, &vm.name)?;
        let staging = tempfile::Builder::new()
            .prefix("fleet-seed-")
            .tempdir()
            .map_err(|e| seed_error(vm, "staging directory", &e))?;
        let iso = self.seed_iso(vm, staging.path())?;
        let bytes = std::fs::read(&iso).map_err(|e| seed_error(vm, "read the ISO", &e))?;
        let seed = self.write_volume(pool, &vm.name, volumes::SEED, &bytes, 0o644)?;
        Ok(VmPaths {
            console_log,
            overlay,
            kernel,
            initrd,
            seed,
        })
    }

    /// `prepare` for a VM in a directory of its own: images named where they are in the
    /// image root (QEMU's user must reach them), the seed rewritten, a new overlay on a
    /// reset.
    fn prepare_directory(
        &self,
        vm: &DesiredVm,
        dir: &Path,
        fresh_disk: bool,
    ) -> Result<VmPaths, DriverError> {
        let image = &vm.config.image;
        let mut boot = [None, None];
        for ((field, named), slot) in [("kernel", &image.kernel), ("initrd", &image.initrd)]
            .into_iter()
            .zip(&mut boot)
        {
            if let Some(named) = named {
                let path = self.resolve_path(vm, field, named)?;
                self.check_image_file(vm, field, &path)?;
                *slot = Some(path);
            }
        }
        let base = if fresh_disk {
            self.checked_base(vm)?
        } else {
            None
        };
        self.write_seed_file(vm, dir)?;
        if let Some((base, size_mib)) = base {
            self.new_overlay(vm, dir, &base, size_mib)?;
        }
        let [kernel, initrd] = boot;
        Ok(VmPaths {
            console_log: dir.join("console.log"),
            overlay: image.disk.as_ref().map(|_| dir.join("disk.qcow2")),
            kernel,
            initrd,
            seed: dir.join("seed.iso"),
        })
    }

    /// A real directory (not a symlink) whose owner marker names this fleet and VM.
    fn dir_is_ours(&self, dir: &Path, name: &str) -> bool {
        let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
        let marker: Option<OwnerMarker> = std::fs::read(dir.join(OWNER_MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        is_dir && marker.is_some_and(|m| m.fleet == self.fleet && m.vm == name)
    }

    /// A directory VM's base disk and overlay size, checked (under the image root, a chain
    /// QEMU may read), when its image has a disk.
    fn checked_base(&self, vm: &DesiredVm) -> Result<Option<(PathBuf, u64)>, DriverError> {
        match (&vm.config.image.disk, vm.config.disk_mib) {
            (Some(base), Some(size_mib)) => {
                let base = self.resolve_path(vm, "disk", base)?;
                self.check_image_file(vm, "disk", &base)?;
                self.check_backing_chain(vm, &base)?;
                Ok(Some((base, size_mib)))
            }
            _ => Ok(None),
        }
    }

    /// A new, empty overlay on `base`, in place of any there was. Only while no running
    /// domain uses it (a create before the domain exists, a reset while it is off).
    fn new_overlay(
        &self,
        vm: &DesiredVm,
        dir: &Path,
        base: &Path,
        size_mib: u64,
    ) -> Result<(), DriverError> {
        let overlay = dir.join("disk.qcow2");
        let _ = std::fs::remove_file(&overlay);
        let output = super::host_command("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
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
        Ok(())
    }

    /// Renders the VM's NoCloud seed as an ISO (volume label `cidata`) in `staging`, a
    /// private directory, and returns its path there.
    fn seed_iso(&self, vm: &DesiredVm, staging: &Path) -> Result<PathBuf, DriverError> {
        let seed = crate::seed::render(vm, &domain_uuid(&self.fleet, &vm.name).to_string());
        for (name, text) in [
            ("user-data", &seed.user_data),
            ("meta-data", &seed.meta_data),
            ("network-config", &seed.network_config),
        ] {
            // A private staging directory that becomes one ISO: nothing reads these files
            // but genisoimage, so they need no atomic rename.
            #[expect(clippy::disallowed_methods, reason = "staging files for genisoimage")]
            std::fs::write(staging.join(name), text).map_err(|e| seed_error(vm, name, &e))?;
        }
        let iso = staging.join("seed.iso");
        let output = super::host_command("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&iso)
            .args(["user-data", "meta-data", "network-config"])
            .current_dir(staging)
            .output()
            .map_err(|e| seed_error(vm, "run genisoimage (install genisoimage)", &e))?;
        if !output.status.success() {
            return Err(seed_error(
                vm,
                "genisoimage",
                &String::from_utf8_lossy(&output.stderr).trim(),
            ));
        }
        Ok(iso)
    }

    /// Writes a directory VM's seed as `seed.iso`, replacing the previous one atomically.
    fn write_seed_file(&self, vm: &DesiredVm, dir: &Path) -> Result<(), DriverError> {
        let staging = tempfile::Builder::new()
            .prefix(".seed-")
            .tempdir_in(dir)
            .map_err(|e| seed_error(vm, "staging directory", &e))?;
        let iso = self.seed_iso(vm, staging.path())?;
        set_mode(&iso, 0o644).map_err(|e| seed_error(vm, "chmod", &e))?;
        std::fs::rename(&iso, dir.join("seed.iso"))
            .map_err(|e| seed_error(vm, "install seed.iso", &e))
    }

    /// Removes what fleet made in the VM's directory, then the directory (`rmdir`): only if
    /// its marker says it is this fleet's VM, or it is empty. Anything else found inside
    /// stays, and with it the directory (a warning says so).
    fn remove_files(&self, name: &str) -> Result<(), DriverError> {
        let dir = self.vm_dir(name)?;
        if std::fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        let fail = |what: &Path, e: std::io::Error| {
            DriverError::new(
                ErrorKind::Transient,
                format!("remove {}: {e}", what.display()),
            )
        };
        if self.dir_is_ours(&dir, name) {
            // The marker goes last: a removal cut short stays recognisably fleet's.
            let mut files: Vec<PathBuf> = VM_FILES.iter().map(|f| dir.join(f)).collect();
            for entry in std::fs::read_dir(&dir)
                .map_err(|e| fail(&dir, e))?
                .flatten()
            {
                let file = entry.file_name().to_string_lossy().into_owned();
                let rotated = file
                    .strip_prefix("console.log.")
                    .is_some_and(|n| n.parse::<u32>().is_ok());
                if rotated {
                    files.push(entry.path());
                } else if file.starts_with(".seed-") && entry.file_type().is_ok_and(|t| t.is_dir())
                {
                    // A seed staging directory a kill left behind (tempfile's, fleet's own).
                    for part in ["user-data", "meta-data", "network-config", "seed.iso"] {
                        let _ = std::fs::remove_file(entry.path().join(part));
                    }
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
            crate::atomic_file::remove_left_temp_files_at(&dir, OWNER_MARKER, |_| false);
            files.push(dir.join(OWNER_MARKER));
            for file in files {
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(fail(&file, e));
                    }
                    _ => {}
                }
            }
        } else {
            // Not provably ours: only the temp file of a marker write that a kill cut short
            // (the first thing a create writes here), then the directory if that leaves it
            // empty.
            crate::atomic_file::remove_left_temp_files_at(&dir, OWNER_MARKER, |_| false);
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                tracing::warn!(
                    vm = name,
                    "{} holds files fleet did not make; fleet removed its own and left the rest",
                    dir.display()
                );
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(&dir, e)),
        }
    }

    /// Whether VM `name` has a disk overlay of its own (where internal snapshots live).
    fn has_overlay(&self, dom: &Domain, name: &str) -> Result<bool, DriverError> {
        match self.storage_of(dom, name)? {
            Storage::Directory(dir) => Ok(dir.join("disk.qcow2").exists()),
            Storage::Volumes(pool) => {
                let overlay = format!(
                    "{}.{}",
                    volumes::vm_prefix(&self.fleet, name),
                    volumes::DISK
                );
                Ok(self.find_volume(&pool.pool, &overlay)?.is_some())
            }
        }
    }

    /// Removes VM `name`'s storage, wherever it is: its volumes, and its directory when it
    /// has one.
    fn remove_storage(&self, name: &str) -> Result<(), DriverError> {
        self.remove_volumes(name)?;
        self.remove_files(name)
    }

    fn is_active(&self, dom: &Domain, name: &str) -> Result<bool, DriverError> {
        self.on_domain(&format!("state of {name}"), || dom.is_active())
    }

    fn power_on(&self, dom: &Domain, name: &str) -> Result<(), DriverError> {
        if self.is_active(dom, name)? {
            return Ok(());
        }
        // A `network: full` VM starts only once its network and the host's guard are up,
        // and only on the guarded network of today's host configuration.
        let xml = self.on_domain(&format!("read {name}"), || {
            dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        })?;
        let joined = domain_xml::joined_networks(&xml);
        if !joined.is_empty() {
            let network = self
                .full_network
                .as_ref()
                .map_err(|why| DriverError::new(ErrorKind::Permanent, why.to_string()))?;
            if let Some(other) = joined.iter().find(|n| **n != network.name) {
                return Err(DriverError::new(
                    ErrorKind::Permanent,
                    format!(
                        "{name} joins network {other:?}, not the guarded network {:?}; it is not started (an update gives it the guarded one)",
                        network.name
                    ),
                ));
            }
            self.ensure_full_network(network)?;
        }
        self.on_domain(&format!("start {name}"), || dom.create().map(|_| ()))
    }

    /// The guard and the network, on this machine only: the firewall that keeps guests off
    /// the host must be the libvirt host's own, and fleet can set it only where it runs.
    fn ensure_full_network(
        &self,
        network: &full_network::GuardedNetwork,
    ) -> Result<(), DriverError> {
        let local = self.uri.starts_with("qemu:///") || self.uri.starts_with("test:///");
        if !local {
            return Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "network: full on {} ({}) needs fleet to run on that host, to guard it from the guests; use isolated there",
                    self.provider, self.uri
                ),
            ));
        }
        if self.uri.starts_with("test:///") {
            return Ok(()); // libvirt's test driver runs no guest.
        }
        let conn = self.connection()?;
        network.ensure(&conn)
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
                    // It stopped by itself meanwhile: asked again, never judged by wording.
                    Err(e) => match self.is_active(dom, name) {
                        Ok(false) => Ok(()),
                        _ => Err(e),
                    },
                    ok => ok,
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

/// The VMs steps are changing now in this process, by host URI, fleet and VM: shared by
/// every driver made for them (`fleet serve` makes new ones when the host configuration
/// changes, while an old one's step may still run).
type Busy = std::collections::HashSet<(String, String, String)>;

fn in_flight() -> std::sync::MutexGuard<'static, Busy> {
    static IN_FLIGHT: std::sync::OnceLock<Mutex<Busy>> = std::sync::OnceLock::new();
    IN_FLIGHT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A step changing one VM. apply gives up on a step at its deadline, but the blocking call
/// runs on: the next step on that VM fails transiently (and is retried) until it ends, so
/// two never change one VM at once, and no tidy of its host runs meanwhile.
struct InFlight {
    key: (String, String, String),
}

impl LibvirtDriver {
    fn begin(&self, name: &str) -> Result<InFlight, DriverError> {
        let key = (self.uri.clone(), self.fleet.clone(), name.to_owned());
        if !in_flight().insert(key.clone()) {
            return Err(DriverError::new(
                ErrorKind::Transient,
                format!(
                    "an earlier step on {name} is still running (its deadline passed); this one waits for it to end"
                ),
            ));
        }
        Ok(InFlight { key })
    }

    /// Whether a step on one of this fleet's VMs on this host runs now.
    fn any_in_flight(&self) -> bool {
        in_flight()
            .iter()
            .any(|(uri, fleet, _)| *uri == self.uri && *fleet == self.fleet)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight().remove(&self.key);
    }
}

/// Where a VM's storage is.
enum Storage {
    /// A directory fleet made in its storage directory, on its own host, before storage
    /// went through libvirt (`owner.json` inside): kept, files and all, until the VM is
    /// replaced.
    Directory(PathBuf),
    /// Volumes in the fleet's storage pool (`volumes`).
    Volumes(volumes::VmPool),
}

/// The host paths a VM's definition names.
struct VmPaths {
    console_log: PathBuf,
    overlay: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    seed: PathBuf,
}

/// An image's files on fleet's side, checked (`checked_images`).
#[derive(Default)]
struct ImageFiles {
    disk: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
}

fn seed_error(vm: &DesiredVm, what: &str, e: &dyn std::fmt::Display) -> DriverError {
    DriverError::new(
        ErrorKind::Permanent,
        format!("seed of {}: {what}: {e}", vm.name),
    )
}

fn no_workspace(name: &str) -> DriverError {
    DriverError::new(
        ErrorKind::NotFound,
        format!(
            "fleet has made no workspace {name} on this provider (the revision's Workspace is made with the first VM that mounts it)"
        ),
    )
}

/// An adopted VM's definition and disks are not fleet's: it is never rewritten or reset
/// (the plan replaces it instead; this guards against a plan that would not).
fn refuse_adopted(found: &ObservedVm, what: &str) -> Result<(), DriverError> {
    if found.stamp.as_ref().is_some_and(|s| s.adopted) {
        return Err(DriverError::new(
            ErrorKind::Conflict,
            format!(
                "{} was adopted (fleet did not make its definition or disks): it is not {what}",
                found.name
            ),
        ));
    }
    Ok(())
}

impl Driver for LibvirtDriver {
    fn adopt(&self, name: &str, stamp: &Stamp) -> Result<(), DriverError> {
        super::check_name(name)?;
        let dom = self.lookup(name)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::NotFound,
                format!("VM {name:?} does not exist on {}", self.provider),
            )
        })?;
        let observed = self.read(&dom, name)?;
        if let Some(theirs) = &observed.stamp {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "VM {name:?} on {} already carries fleet {:?}'s stamp (as {:?}); only a VM no fleet made can be adopted",
                    self.provider, theirs.fleet, theirs.name
                ),
            ));
        }
        let element = domain_xml::stamp_element(stamp, false);
        let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        if observed.running {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        self.on_domain(&format!("stamp {name}"), || {
            dom.set_metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some(domain_xml::STAMP_PREFIX),
                Some(domain_xml::STAMP_NS),
                flags,
            )
        })?;
        self.invalidate(name);
        Ok(())
    }

    /// The guard of `network: full` guests is applied again while their network runs: a
    /// firewall reload on the host (`nft flush ruleset`) removes it, and guests keep running
    /// (and rebooting) without fleet starting them.
    fn maintain(&self) -> Result<(), DriverError> {
        let Ok(network) = &self.full_network else {
            return Ok(());
        };
        if !self.uri.starts_with("qemu:///") {
            return Ok(());
        }
        let active = self
            .call("look up the full network", |c| {
                c.lookup_network_by_name(&network.name)
            })
            .ok()
            .is_some_and(|n| n.is_active().unwrap_or(false));
        if active {
            network.apply_guard()?;
        }
        Ok(())
    }

    /// The storage directory must be reachable for QEMU's user: every start would fail
    /// otherwise, with QEMU's bare "Permission denied".
    fn preflight(&self) -> Result<(), DriverError> {
        // Another host's directories are its administrator's to arrange (docs/remote-hosts.md).
        if !is_local_uri(&self.uri) {
            return Ok(());
        }
        self.check_qemu_reach(&self.storage_dir, reach::Need::Enter)
            .map_err(|e| match e.kind {
                // The host, not the directory: said as it is.
                ErrorKind::Transient => e,
                _ => DriverError::new(e.kind, format!("storage directory: {}", e.message)),
            })
    }

    fn capacity(&self) -> Result<Option<crate::observe::Capacity>, DriverError> {
        let info = self
            .connection()?
            .node_info()
            .map_err(|e| DriverError::new(ErrorKind::Transient, format!("node info: {e}")))?;
        Ok(Some(crate::observe::Capacity {
            memory_mib: info.memory / 1024,
            cpus: info.cpus,
        }))
    }

    fn observe(&self) -> Result<ObservedHost, DriverError> {
        let domains = self.call("list domains", |c| c.list_all_domains(0))?;
        let mut vms = Vec::with_capacity(domains.len());
        let mut cache = self.lock_cache();
        let mut unread = Vec::new();
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
            unread.push((dom, name, uuid));
        }
        for (name, uuid, read) in self.observe_all(unread) {
            match read {
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
        // A pool fleet cannot read hides its workspaces, never its VMs.
        let workspaces = self.observe_workspaces(&vms).unwrap_or_else(|e| {
            tracing::warn!(provider = %self.provider, "workspaces not observed: {e}");
            Vec::new()
        });
        Ok(ObservedHost { vms, workspaces })
    }

    fn observe_vm(&self, name: &str) -> Result<Option<ObservedVm>, DriverError> {
        match self.lookup(name)? {
            Some(dom) => match self.read(&dom, name) {
                Ok(vm) => Ok(Some(vm)),
                Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            None => Ok(None),
        }
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

    fn console(&self, name: &str, force: bool) -> Result<Box<dyn super::Console>, DriverError> {
        let (dom, _) = self.require_owned(name)?;
        if dom.id().is_none() {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!("{name} is not running: its console opens once it runs"),
            ));
        }
        let conn = self.connection()?;
        let stream = self.on_domain(&format!("open a stream for {name}'s console"), || {
            virt::stream::Stream::new(&conn, 0)
        })?;
        let flags = if force {
            virt::sys::VIR_DOMAIN_CONSOLE_FORCE
        } else {
            0
        };
        self.on_domain(&format!("open {name}'s console"), || {
            dom.open_console(None, &stream, flags)
        })
        .map_err(|e| DriverError {
            message: format!(
                "{} (another client may hold it: --force takes it over)",
                e.message
            ),
            ..e
        })?;
        Ok(Box::new(LibvirtConsole(stream)))
    }

    fn snapshots(&self, name: &str) -> Result<Vec<super::SnapshotInfo>, DriverError> {
        super::check_name(name)?;
        let (dom, _) = self.require_owned(name)?;
        let all = self.on_domain(&format!("list {name}'s snapshots"), || {
            dom.list_all_snapshots(0)
        })?;
        let mut infos = Vec::new();
        for snapshot in all {
            let xml = self.on_domain(&format!("read a snapshot of {name}"), || {
                snapshot.xml_desc(0)
            })?;
            infos.push(domain_xml::snapshot_info(&xml)?);
        }
        infos.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(infos)
    }

    fn snapshot_create(
        &self,
        name: &str,
        snapshot: &str,
        description: &str,
    ) -> Result<(), DriverError> {
        super::check_name(name)?;
        super::check_snapshot_name(snapshot)?;
        let (dom, found) = self.require_owned(name)?;
        refuse_adopted(&found, "snapshotted")?;
        self.refuse_with_workspaces(&dom, name, "snapshotted")?;
        // Internal snapshots live in the VM's own overlay: a VM booted from a kernel and
        // initrd alone has none to hold them.
        if !self.has_overlay(&dom, name)? {
            return Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "{name} has no disk of its own (its image has no `disk`): there is nothing to snapshot"
                ),
            ));
        }
        let xml = domain_xml::snapshot_definition(snapshot, description);
        self.on_domain(&format!("snapshot {name} as {snapshot}"), || {
            dom.create_snapshot_xml(&xml, 0)
        })?;
        Ok(())
    }

    fn snapshot_revert(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        super::check_snapshot_name(snapshot)?;
        let _step = self.begin(name)?;
        self.invalidate(name);
        let (dom, found) = self.require_owned(name)?;
        refuse_adopted(&found, "reverted")?;
        self.refuse_with_workspaces(&dom, name, "reverted")?;
        let taken = self.on_domain(&format!("find {name}'s snapshot {snapshot}"), || {
            Domain::lookup_snapshot_by_name(&dom, snapshot, 0)
        })?;
        // The snapshot's definition comes back with it (its stamp included): the next pass
        // brings the configuration back to the revision.
        self.on_domain(&format!("revert {name} to {snapshot}"), || {
            taken.revert(virt::sys::VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
        })
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        super::check_snapshot_name(snapshot)?;
        let (dom, _) = self.require_owned(name)?;
        let taken = self.on_domain(&format!("find {name}'s snapshot {snapshot}"), || {
            Domain::lookup_snapshot_by_name(&dom, snapshot, 0)
        })?;
        self.on_domain(&format!("delete {name}'s snapshot {snapshot}"), || {
            taken.delete(0)
        })
    }

    /// Checks the image's files and ships them to the host's pool ahead of the create,
    /// outside its deadline (a first upload to a remote host may take a while).
    fn check_create(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let images = self.checked_images(vm)?;
        let pool = self.pool_made()?;
        for (file, local) in [
            (volumes::ImageFile::Kernel, &images.kernel),
            (volumes::ImageFile::Initrd, &images.initrd),
            (volumes::ImageFile::Disk, &images.disk),
        ] {
            if let Some(local) = local {
                self.shipped(&pool, &vm.config.image.name, file, local)?;
            }
        }
        Ok(())
    }

    fn workspace_snapshots(
        &self,
        workspace: &str,
    ) -> Result<Vec<super::SnapshotInfo>, DriverError> {
        super::check_name(workspace)?;
        let path = self.snapshot_path(workspace)?;
        volume_snapshots::list(&path, workspace)
    }

    fn workspace_snapshot(
        &self,
        workspace: &str,
        op: super::SnapshotOp,
        snapshot: &str,
    ) -> Result<(), DriverError> {
        super::check_name(workspace)?;
        // Operators take snapshots of their own names; they may revert to or delete fleet's.
        match op {
            super::SnapshotOp::Create => super::check_snapshot_name(snapshot)?,
            _ => super::check_snapshot_charset(snapshot)?,
        }
        let path = self.snapshot_path(workspace)?;
        let running = self.domains_in_use(&domain_xml::workspace_volume(workspace))?;
        if let Some(vm) = running.first() {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "workspace {workspace} is in use by {vm}, which runs (or is saved to resume): its snapshots are taken and reverted while no VM has it in use (stop {vm} with state: stopped, or let its snapshots: policy take one before its next replace or reset)"
                ),
            ));
        }
        volume_snapshots::run(&path, workspace, op, snapshot)
    }

    fn snapshot_workspaces(
        &self,
        vm: &DesiredVm,
        step: crate::spec::SnapshotBefore,
        keep: u32,
        grace: Duration,
    ) -> Result<Vec<String>, DriverError> {
        super::check_name(&vm.name)?;
        let _step = self.begin(&vm.name)?;
        self.invalidate(&vm.name);
        // Gone already (a replace run again): nothing of it to keep.
        let Some((dom, _)) = self.owned(&vm.name)? else {
            return Ok(Vec::new());
        };
        // Everything that can be known before the VM goes down is checked first: a policy
        // that cannot take its snapshots fails the step with the VM still up.
        let mut volumes = Vec::new();
        for mount in &vm.config.workspaces {
            self.snapshots_here(&mount.name)?;
            // Not made yet (it comes with the VM's next definition): nothing to keep.
            let Some(path) = self.workspace_path(&mount.name)? else {
                continue;
            };
            let others: Vec<String> = self
                .domains_in_use(&domain_xml::workspace_volume(&mount.name))?
                .into_iter()
                .filter(|d| *d != vm.name)
                .collect();
            if let Some(other) = others.first() {
                return Err(DriverError::new(
                    ErrorKind::Transient,
                    format!(
                        "workspace {} is in use by {other}: {}'s snapshots policy waits until it is not",
                        mount.name, vm.name
                    ),
                ));
            }
            // Running, the VM has it (libvirt gave it to qemu's user): checked when down.
            if !self.is_active(&dom, &vm.name)? {
                volume_snapshots::check_writable(&path, &mount.name)?;
            }
            volumes.push((mount.name.as_str(), path));
        }
        let was_running = self.is_active(&dom, &vm.name)?;
        self.power_off(&dom, &vm.name, grace)?;
        let taken = volumes
            .iter()
            .map(|(name, path)| volume_snapshots::take_for(path, name, step.as_str(), keep))
            .collect::<Result<Vec<_>, _>>();
        match taken {
            Ok(taken) => Ok(taken.into_iter().flatten().collect()),
            Err(e) => {
                // Up again as it was: the step failed, and the VM is not to go without them.
                if was_running {
                    let _ = self.power_on(&dom, &vm.name);
                }
                Err(e)
            }
        }
    }

    /// Deletes a workspace's volume, never while any domain on the host (fleet's or not)
    /// attaches it.
    fn destroy_workspace(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        let Some(pool) = self.workspace_pool(false)? else {
            return Ok(());
        };
        let volume = domain_xml::workspace_volume(name);
        let Ok(found) = pool.lookup_storage_vol_by_name(&volume) else {
            return Ok(()); // Gone already: a destroy run again.
        };
        let holders = self.domains_attaching(&volume, "")?;
        if !holders.is_empty() {
            return Err(DriverError::new(
                ErrorKind::Transient,
                format!(
                    "workspace {name} is attached to {}; it is destroyed once no domain attaches it",
                    holders.join(", ")
                ),
            ));
        }
        self.call(&format!("delete workspace {name}"), |_| found.delete(0))
    }

    fn console_log(
        &self,
        name: &str,
        from: u64,
        max: usize,
    ) -> Result<Option<super::ConsoleLogChunk>, DriverError> {
        self.require_owned(name)?;
        let Some(dir) = self.legacy_dir(name)? else {
            return self.read_console_volume(name, from, max);
        };
        volumes::read_local_log(&dir.join("console.log"), from, max)
    }

    fn tidy(&self) -> Result<Vec<String>, DriverError> {
        self.tidy_volumes()
    }

    fn release_unused(&self) -> Result<Vec<String>, DriverError> {
        self.tidy_volumes()
    }

    fn agent_endpoint(&self, name: &str) -> Result<Option<super::AgentEndpoint>, DriverError> {
        let (dom, _) = self.require_owned(name)?;
        if dom.id().is_none() {
            return Ok(None);
        }
        if is_local_uri(&self.uri) {
            // QEMU's own socket: the kernel holds back a guest that floods it, and the link
            // outlives a restart of libvirtd.
            let live = self.on_domain(&format!("read {name}"), || dom.xml_desc(0))?;
            return Ok(domain_xml::agent_socket(&live).map(super::AgentEndpoint::UnixSocket));
        }
        let uuid = self.on_domain(&format!("read {name}'s UUID"), || dom.uuid())?;
        let socket = channel::open(&self.uri, name, uuid).map_err(|e| {
            DriverError::new(
                ErrorKind::Transient,
                format!("open {name}'s agent channel: {e}"),
            )
        })?;
        // (`calls` counts the driver's own connection; the channel's is its own.)
        Ok(Some(super::AgentEndpoint::Connected(Arc::new(socket))))
    }

    fn create(&self, vm: &DesiredVm, stamp: &Stamp, grace: Duration) -> Result<(), DriverError> {
        super::check_name(&vm.name)?;
        let _step = self.begin(&vm.name)?;
        self.invalidate(&vm.name);
        if let Some((dom, found)) = self.owned(&vm.name)? {
            // Made before (a retried or interrupted create): bring it to the spec.
            refuse_adopted(&found, "redefined by a create")?;
            let stamp = &stamp.over(found.stamp.as_deref());
            let storage = self.storage_of(&dom, &vm.name)?;
            let paths = self.prepare(vm, &storage, false)?;
            let xml = self.definition(vm, stamp, &paths)?;
            let active = self.is_active(&dom, &vm.name)?;
            self.ensure_workspaces(vm, !active)?;
            self.define(&xml, &vm.name)?;
            if active {
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
        // A new VM's storage is always volumes in the pool. Its overlay is made anew: one
        // found is what a create cut short left (no domain ever ran on it).
        let storage = Storage::Volumes(self.pool_made()?);
        let paths = self.prepare(vm, &storage, true)?;
        let xml = self.definition(vm, stamp, &paths)?;
        // The workspaces before the definition that attaches them.
        self.ensure_workspaces(vm, true)?;
        let dom = self.define(&xml, &vm.name)?;
        if vm.state == PowerState::Running {
            self.power_on(&dom, &vm.name)?;
        }
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        let _step = self.begin(name)?;
        self.invalidate(name);
        let (dom, _) = self.require_owned(name)?;
        self.power_on(&dom, name)
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        super::check_name(name)?;
        let _step = self.begin(name)?;
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
        super::check_name(&vm.name)?;
        let _step = self.begin(&vm.name)?;
        self.invalidate(&vm.name);
        let (dom, found) = self.require_owned(&vm.name)?;
        refuse_adopted(&found, "updated in place")?;
        let stamp = &stamp.over(found.stamp.as_deref());
        // Down before the new definition is saved, never after: a crash between the two
        // then leaves a stopped VM with its old definition, which the next pass updates
        // and starts. The other order left a running VM on a definition it never booted
        // (holding a workspace its saved definition let go), and no plan could see it.
        // New workspaces before anything stops (one another VM still has fails the step
        // with this VM up), and before the definition that attaches them.
        let storage = self.storage_of(&dom, &vm.name)?;
        let paths = self.prepare(vm, &storage, false)?;
        let xml = self.definition(vm, stamp, &paths)?;
        self.ensure_workspaces(vm, false)?;
        // A VM saved to resume (`virsh managedsave`) would resume on the definition in its
        // save image, holding workspaces its new definition lets go (or lacking new ones):
        // when they change, it boots afresh instead.
        let mounts = |c: &crate::resolve::VmConfig| -> Vec<String> {
            c.workspaces.iter().map(|m| m.name.clone()).collect()
        };
        let before = found
            .stamp
            .as_ref()
            .and_then(|s| s.config.as_ref())
            .map(mounts);
        if before.as_ref() != Some(&mounts(&vm.config))
            && !self.is_active(&dom, &vm.name)?
            && dom.has_managed_save(0).unwrap_or(false)
        {
            self.on_domain(&format!("discard {}'s saved state", vm.name), || {
                dom.managed_save_remove(0)
            })?;
        }
        let stopped_here = restart && self.is_active(&dom, &vm.name)?;
        if stopped_here {
            self.power_off(&dom, &vm.name, grace)?;
        }
        let saved = || -> Result<bool, DriverError> {
            let down = !self.is_active(&dom, &vm.name)?;
            // A grown workspace grows only while the VM is down.
            if down {
                self.ensure_workspaces(vm, true)?;
            }
            self.define(&xml, &vm.name)?;
            Ok(down)
        };
        let down = match saved() {
            Ok(down) => down,
            Err(e) => {
                if stopped_here {
                    // Back to what ran before, on the definition it still has.
                    let _ = self.power_on(&dom, &vm.name);
                }
                return Err(e);
            }
        };
        if !down {
            self.set_live_stamp(&dom, stamp, &vm.name)?;
        }
        self.ensure_power(&dom, vm, grace)?;
        // A VM that was running and is to be stopped is down only now: its workspaces grow
        // now (the stamp already records their new size, so no later pass would).
        if !down && !self.is_active(&dom, &vm.name)? {
            self.ensure_workspaces(vm, true)?;
        }
        Ok(())
    }

    fn reset(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        super::check_name(&vm.name)?;
        let _step = self.begin(&vm.name)?;
        self.invalidate(&vm.name);
        let (dom, found) = self.require_owned(&vm.name)?;
        refuse_adopted(&found, "reset")?;
        let storage = self.storage_of(&dom, &vm.name)?;
        // Checked (and shipped) before the VM goes down.
        let base = match &storage {
            Storage::Directory(_) => self.checked_base(vm)?.map(|(base, _)| base),
            Storage::Volumes(pool) => match self.checked_images(vm)?.disk {
                Some(local) => Some(self.shipped(
                    pool,
                    &vm.config.image.name,
                    volumes::ImageFile::Disk,
                    &local,
                )?),
                None => None,
            },
        };
        self.power_off(&dom, &vm.name, Duration::ZERO)?;
        // A disk image gets a new overlay on the same base; a kernel and initrd image has
        // nothing its guest wrote that outlives the power-off.
        if let (Some(base), Some(size_mib)) = (base, vm.config.disk_mib) {
            // The snapshots lived in the old overlay: their records go with it.
            self.forget_snapshots(&dom, &vm.name)?;
            match &storage {
                Storage::Directory(dir) => self.new_overlay(vm, dir, &base, size_mib)?,
                Storage::Volumes(pool) => {
                    self.new_overlay_volume(pool, &vm.name, &base, size_mib)?;
                }
            }
        }
        self.power_on(&dom, &vm.name)
    }

    fn destroy(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        super::check_name(name)?;
        let _step = self.begin(name)?;
        self.invalidate(name);
        let Some((dom, _)) = self.owned(name)? else {
            // Already gone: finish what an interrupted destroy started.
            return self.remove_storage(name);
        };
        self.power_off(&dom, name, grace)?;
        let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        match self.on_domain(&format!("undefine {name}"), || dom.undefine_flags(flags)) {
            Err(e) if e.kind != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.remove_storage(name)
    }

    fn settle(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        if self.lookup(name)?.is_some() {
            return Ok(());
        }
        self.remove_storage(name)
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
        let child = super::host_command("virsh")
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

/// A domain's console as a libvirt stream: one thread may wait in `recv` while another
/// sends (libvirt's client passes the connection between them).
struct LibvirtConsole(virt::stream::Stream);

impl super::Console for LibvirtConsole {
    fn recv(&self, buf: &mut [u8]) -> Result<usize, DriverError> {
        self.0
            .recv(buf)
            .map(|n| usize::try_from(n).unwrap_or(0))
            .map_err(|e| DriverError::new(ErrorKind::Transient, e.message().to_owned()))
    }

    fn send(&self, data: &[u8]) -> Result<(), DriverError> {
        let mut sent = 0;
        while sent < data.len() {
            let n = self
                .0
                .send(&data[sent..])
                .map_err(|e| DriverError::new(ErrorKind::Transient, e.message().to_owned()))?;
            sent += usize::try_from(n).unwrap_or(0).max(1);
        }
        Ok(())
    }
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
        // Closed by keepalive, or by the host, since.
        "client socket is closed",
        "keepalive",
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

    /// Observe reads a foreign domain's stamp alone and the definitions of domains some
    /// fleet made whole (libvirt's test driver on a node file of its own, which shares no
    /// state with any other connection).
    #[test]
    fn observe_reads_only_the_stamp_of_a_domain_no_fleet_made() {
        let stamp = |fleet: &str, name: &str| Stamp {
            fleet: fleet.into(),
            name: name.into(),
            spec_hash: "h".into(),
            revision: "r".into(),
            protect: false,
            config: None,
            created: None,
            adopted: false,
        };
        let domain = |name: &str, uuid: Option<uuid::Uuid>, stamp: Option<Stamp>| {
            let uuid = uuid
                .map(|u| format!("<uuid>{u}</uuid>"))
                .unwrap_or_default();
            let metadata = stamp
                .map(|s| {
                    let element = domain_xml::stamp_element(&s, true);
                    format!("<metadata>{element}</metadata>")
                })
                .unwrap_or_default();
            format!(
                "<domain type='test'><name>{name}</name>{uuid}<memory unit='MiB'>96</memory><vcpu>3</vcpu>{metadata}<os><type>hvm</type></os></domain>"
            )
        };
        let node = tempfile::NamedTempFile::new().expect("node file");
        std::fs::write(
            node.path(),
            [
                "<node>".to_owned(),
                domain("obs-foreign", None, None),
                domain("obs-other", None, Some(stamp("other", "obs-other"))),
                // As an adopted domain: this fleet's stamp, a UUID of its own.
                domain("obs-own", None, Some(stamp("obsfleet", "obs-own"))),
                domain(
                    "obs-made",
                    Some(domain_uuid("obsfleet", "obs-made")),
                    Some(stamp("obsfleet", "obs-made")),
                ),
                "</node>".to_owned(),
            ]
            .concat(),
        )
        .expect("write");
        let driver = LibvirtDriver::new(
            "obsfleet",
            &LibvirtProvider {
                name: crate::spec::Name("local".into()),
                uri: format!("test://{}", node.path().display()),
                storage_dir: None,
                storage_pool: None,
                full_network: None,
            },
            crate::spec::DomainType::Qemu,
            Path::new("/nonexistent"),
        );
        let observed = driver.observe().expect("observe");
        let find = |name: &str| {
            observed
                .vms
                .iter()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!("{name} observed: {observed:?}"))
        };
        let sizes = |vm: &ObservedVm| (vm.cpus, vm.memory_mib);
        assert!(find("obs-own").owned_by("obsfleet"));
        assert!(find("obs-made").owned_by("obsfleet"));
        assert_eq!(sizes(find("obs-own")), (3, 96), "adopted: read whole");
        assert_eq!(sizes(find("obs-made")), (3, 96), "made: read whole");
        let other = find("obs-other");
        assert_eq!(
            other.stamp.as_ref().map(|s| s.fleet.as_str()),
            Some("other")
        );
        assert_eq!(sizes(other), (3, 96), "another fleet's: read whole");
        let foreign = find("obs-foreign");
        assert_eq!((sizes(foreign), &foreign.stamp), ((0, 0), &None));
        // The connection's opening and one list; one definition for the domain with
        // fleet's UUID; a stamp asked for each other domain, and the definitions of the
        // two that have one; the workspace pool's lookup.
        assert_eq!(observed.vms.len(), 4, "{observed:?}");
        assert_eq!(driver.calls(), 1 + 1 + 1 + 3 + 2 + 1, "{observed:?}");
        // fleet adopt reads a foreign domain whole.
        let whole = driver
            .observe_vm("obs-foreign")
            .expect("read")
            .expect("found");
        assert_eq!(sizes(&whole), (3, 96));
        assert_eq!(driver.observe_vm("obs-none").expect("read"), None);
    }

    fn driver_at(uri: &str) -> LibvirtDriver {
        LibvirtDriver::new(
            "lab",
            &LibvirtProvider {
                name: crate::spec::Name("far".into()),
                uri: uri.into(),
                storage_dir: None,
                storage_pool: None,
                full_network: None,
            },
            crate::spec::DomainType::Qemu,
            Path::new("/nonexistent"),
        )
    }

    /// A remote host that cannot be reached is tried again only after a backoff; a local
    /// socket every time.
    #[test]
    fn a_failed_connect_to_a_remote_host_waits_before_the_next_try() {
        // Port 1 on loopback: refused at once.
        let remote = driver_at("qemu+tcp://127.0.0.1:1/system");
        let first = remote.observe().expect_err("refused");
        assert_eq!(first.kind, ErrorKind::Transient);
        assert_eq!(remote.calls(), 1, "one connect tried");
        let second = remote.observe().expect_err("still waiting");
        assert_eq!(second.kind, ErrorKind::Transient);
        assert!(
            second.message.contains("next try in 1 s"),
            "{}",
            second.message
        );
        assert_eq!(remote.calls(), 1, "no connect tried while backing off");

        let local = driver_at("qemu+unix:///system?socket=/nonexistent/libvirt-sock");
        local.observe().expect_err("no socket");
        local.observe().expect_err("no socket");
        assert_eq!(local.calls(), 2, "a local socket is tried every time");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_a_success_clears_it() {
        let now = std::time::Instant::now();
        let mut backoff = ConnectBackoff::default();
        assert!(backoff.waiting(now).is_none());
        let mut waits = Vec::new();
        for _ in 0..8 {
            backoff.failed(now, "refused".into());
            waits.push(backoff.waiting(now).expect("waiting").0.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(backoff.waiting(now + Duration::from_secs(31)).is_none());
        backoff.succeeded();
        assert!(backoff.waiting(now).is_none());
        assert!(is_local_uri("qemu:///system") && is_local_uri("test:///default"));
        assert!(!is_local_uri("qemu+ssh://fleet@host/system"));
    }

    /// `qemu-img` runs on fleet's host only: a remote provider's workspace snapshots are
    /// refused before any connection is made.
    #[test]
    fn workspace_snapshots_on_a_remote_host_are_refused_before_connecting() {
        use crate::driver::{Driver, SnapshotOp};
        let remote = driver_at("qemu+tcp://127.0.0.1:1/system");
        let listed = remote.workspace_snapshots("ws").expect_err("refused");
        let taken = remote
            .workspace_snapshot("ws", SnapshotOp::Create, "before")
            .expect_err("refused");
        for refused in [listed, taken] {
            assert_eq!(refused.kind, ErrorKind::Conflict);
            assert!(
                refused.message.contains("qemu-img on fleet's own host")
                    && refused.message.contains("qemu+tcp://127.0.0.1:1/system"),
                "{}",
                refused.message
            );
        }
        assert_eq!(remote.calls(), 0, "no connection tried");
    }

    #[test]
    fn uuids_are_deterministic_and_scoped_by_fleet() {
        assert_eq!(domain_uuid("lab", "a"), domain_uuid("lab", "a"));
        assert_ne!(domain_uuid("lab", "a"), domain_uuid("lab", "b"));
        assert_ne!(domain_uuid("lab", "a"), domain_uuid("other", "a"));
        assert_eq!(domain_uuid("lab", "a").get_version_num(), 5);
    }
}
