//! The hypervisor boundary: one small trait, implemented for libvirt (and later Proxmox).
//!
//! Architecture invariant: drivers do, they never decide. Apply tells a driver what to do
//! for one VM; the driver checks ownership again before every mutation (a VM without this
//! fleet's stamp is never modified), and is idempotent: repeating a create finds the VM it
//! already made.

pub mod libvirt;
pub mod proxmox;

use std::time::Duration;

use crate::observe::{ObservedHost, ObservedVm, Stamp};
use crate::resolve::DesiredVm;

/// How apply should treat a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Worth retrying: the connection dropped, the hypervisor was busy.
    Transient,
    /// The VM is not there.
    NotFound,
    /// Another VM holds the name or identity, or the VM is not fleet's.
    Conflict,
    /// Retrying will not help: bad image path, invalid definition.
    Permanent,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DriverError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> DriverError {
        DriverError {
            kind,
            message: message.into(),
        }
    }
}

/// A host program to run for a driver (qemu-img, genisoimage, nft), with an environment of
/// its own: nothing of fleet's (a token in a variable, say) reaches it.
pub fn host_command(program: &str) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C");
    command
}

/// Defence in depth: every name a driver acts on is a DNS label, whatever handed it over.
pub fn check_name(name: &str) -> Result<(), DriverError> {
    static NAME: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(crate::spec::NAME_PATTERN).expect("the name pattern compiles")
    });
    if NAME.is_match(name) {
        Ok(())
    } else {
        Err(DriverError::new(
            ErrorKind::Permanent,
            format!("{name:?} is not a VM name (a lower-case DNS label); refusing to act on it"),
        ))
    }
}

/// One provider. All methods block; apply runs them off the async runtime.
pub trait Driver: Send + Sync {
    /// Every VM on the host with its stamp: one list call plus one read per VM.
    fn observe(&self) -> Result<ObservedHost, DriverError>;

    /// Keeps up what fleet set up on the host for its VMs and a host restart or reload may
    /// have undone (libvirt: the guard of `network: full` guests). Run by every apply and
    /// daemon pass, never by `plan`.
    fn maintain(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Checks, read-only, that the host can run VMs the way this driver makes them (libvirt:
    /// QEMU's user can reach the storage directory). A failure makes the provider unusable
    /// for the pass: the plan says why and plans none of its VMs, rather than every start
    /// failing with the hypervisor's own words.
    fn preflight(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// What the host has (memory and CPUs), when the driver can tell; read-only.
    fn capacity(&self) -> Result<Option<crate::observe::Capacity>, DriverError> {
        Ok(None)
    }

    /// Makes the VM (files, definition with `stamp`) and starts it when the spec says running.
    /// Idempotent: a VM already made by this fleet under this name is brought to the spec
    /// (stopping it, within `grace`, if the spec says stopped).
    fn create(&self, vm: &DesiredVm, stamp: &Stamp, grace: Duration) -> Result<(), DriverError>;

    fn start(&self, name: &str) -> Result<(), DriverError>;

    /// Whether `vm` could be made now, as far as can be told without making it (its image's
    /// files), outside the step's deadline: a replace asks before it destroys the VM it
    /// replaces, and a create before it creates. A driver may ready what the VM will need
    /// here, never the VM itself (libvirt ships the image's files to the host's pool).
    fn check_create(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let _ = vm;
        Ok(())
    }

    /// Graceful shutdown, then power off once `grace` has passed.
    fn stop(&self, name: &str, grace: Duration) -> Result<(), DriverError>;

    /// Rewrites the definition and stamp in place; with `restart`, a running VM is stopped
    /// (gracefully, within `grace`) and started again so the change takes effect. Leaves the
    /// VM in the spec's power state.
    fn update(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        restart: bool,
        grace: Duration,
    ) -> Result<(), DriverError>;

    /// Stops the VM, removes its definition and every file fleet made for it.
    fn destroy(&self, name: &str, grace: Duration) -> Result<(), DriverError>;

    /// Returns the VM to the state it was made in (`reset: beforeEachTask`) and starts it:
    /// whatever its guest wrote is gone. Powered off at once: nothing in it is kept.
    fn reset(&self, vm: &DesiredVm) -> Result<(), DriverError>;

    /// After a crash: if no VM `name` exists, removes the files a half-finished create or
    /// destroy left behind. Never touches a VM that exists.
    fn settle(&self, name: &str) -> Result<(), DriverError>;

    /// One VM, whoever made it, with all `observe` reports of this fleet's own VMs (its
    /// vCPUs and memory too, which `observe` may leave out of a foreign VM's report):
    /// `fleet adopt` describes a foreign VM from it.
    fn observe_vm(&self, name: &str) -> Result<Option<ObservedVm>, DriverError> {
        Ok(self
            .observe()?
            .vms
            .into_iter()
            .find(|v| v.name == name)
            .map(|v| (*v).clone()))
    }

    /// `fleet adopt --approve`: writes `stamp` onto `name`, a VM no fleet made (it carries
    /// no stamp at all), changing nothing else about it. Refused with a conflict when it
    /// carries any stamp.
    fn adopt(&self, name: &str, stamp: &Stamp) -> Result<(), DriverError> {
        let _ = stamp;
        Err(DriverError::new(
            ErrorKind::Permanent,
            format!("adopting {name}: this provider's driver cannot adopt VMs yet (libvirt can)"),
        ))
    }

    /// Hypervisor calls made so far (for benchmarks and tests of the O(hosts) promise).
    fn calls(&self) -> u64;

    /// Starts following the host's VM events in the background. From then on `observe` may
    /// answer from a cache that events keep fresh; `on_change` hears the VM name of every
    /// event, or `None` when the event stream broke (the cache is dropped then, and rebuilt
    /// once the stream is back). Drivers without events keep the default: no cache.
    fn watch(&self, on_change: ChangeCallback) -> Result<(), DriverError> {
        let _ = on_change;
        Ok(())
    }

    /// Stops following events (and whatever process follows them for the driver).
    fn unwatch(&self) {}

    /// Forgets cached observations, so the next `observe` reads every VM again. For changes
    /// the hypervisor sends no event for.
    fn resync(&self) {}

    /// The stamp of the VM `name` if it is this fleet's, read directly: for a VM that
    /// observation showed without one. Drivers whose observation reads every VM's stamp keep
    /// the default.
    fn stamp_by_name(&self, name: &str) -> Result<Option<std::sync::Arc<Stamp>>, DriverError> {
        let _ = name;
        Ok(None)
    }

    /// Removes what a killed apply left on the host outside any VM (files fleet wrote for
    /// VMs that no longer exist, half-written temp files). Called only by a process holding
    /// the status lock, after the journal's open intents are settled, so no other writer of
    /// this fleet is at work. Returns what it removed, for the event log.
    fn tidy(&self) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }

    /// Where the host side of a running VM's agent link is, if it has one.
    fn agent_endpoint(&self, name: &str) -> Result<Option<AgentEndpoint>, DriverError> {
        let _ = name;
        Ok(None)
    }

    /// The serial console of this fleet's running VM `name` (`fleet console`); `force`
    /// takes it from another client that holds it.
    fn console(&self, name: &str, force: bool) -> Result<Box<dyn Console>, DriverError> {
        let _ = (name, force);
        Err(DriverError::new(
            ErrorKind::Permanent,
            "this provider's driver has no interactive console yet",
        ))
    }

    /// This fleet's VM `name`'s snapshots, oldest first.
    fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, DriverError> {
        let _ = name;
        Err(no_snapshots())
    }

    /// Takes snapshot `snapshot` of this fleet's VM `name` (a running VM's memory too,
    /// where the hypervisor can).
    fn snapshot_create(
        &self,
        name: &str,
        snapshot: &str,
        description: &str,
    ) -> Result<(), DriverError> {
        let _ = (name, snapshot, description);
        Err(no_snapshots())
    }

    /// Returns this fleet's VM `name` to `snapshot`.
    fn snapshot_revert(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        let _ = (name, snapshot);
        Err(no_snapshots())
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        let _ = (name, snapshot);
        Err(no_snapshots())
    }

    /// This fleet's workspace `workspace`'s snapshots, oldest first.
    fn workspace_snapshots(&self, workspace: &str) -> Result<Vec<SnapshotInfo>, DriverError> {
        let _ = workspace;
        Err(no_workspaces())
    }

    /// Takes, reverts to or deletes `snapshot` of this fleet's workspace `workspace`, only
    /// while no running VM has it.
    fn workspace_snapshot(
        &self,
        workspace: &str,
        op: SnapshotOp,
        snapshot: &str,
    ) -> Result<(), DriverError> {
        let _ = (workspace, op, snapshot);
        Err(no_workspaces())
    }

    /// Before `step` of this fleet's VM `vm` (its `snapshots:` policy): stops the VM
    /// (gracefully, within `grace`) if it runs, snapshots each of its workspaces that
    /// exists, and deletes fleet's own snapshots of them beyond the newest `keep`. Returns
    /// the snapshots taken, as `workspace/snapshot`.
    fn snapshot_workspaces(
        &self,
        vm: &DesiredVm,
        step: crate::spec::SnapshotBefore,
        keep: u32,
        grace: Duration,
    ) -> Result<Vec<String>, DriverError> {
        let _ = (vm, step, keep, grace);
        Err(no_workspaces())
    }

    /// Deletes this fleet's workspace `name` (its volume), refused while a VM attaches it.
    fn destroy_workspace(&self, name: &str) -> Result<(), DriverError> {
        let _ = name;
        Err(no_workspaces())
    }

    /// At most `max` bytes of this fleet's VM `name`'s serial console log from byte `from`,
    /// with the log's length now (a log shorter than before was started again); `None`
    /// when the provider keeps no log fleet can read. Read through the driver, so it works
    /// for a VM on another host as for one on this machine.
    fn console_log(
        &self,
        name: &str,
        from: u64,
        max: usize,
    ) -> Result<Option<ConsoleLogChunk>, DriverError> {
        let _ = (name, from, max);
        Ok(None)
    }

    /// Removes what fleet keeps on the host for VMs and that the pass's steps left unused
    /// (libvirt: image volumes whose last VM went, what a failed create left). Run at the
    /// end of each apply or daemon pass that ran steps, by the process holding the status
    /// lock, once `apply::run` has returned; never by `plan`. Returns what it removed, for
    /// the event log.
    fn release_unused(&self) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }
}

/// A piece of a VM's console log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleLogChunk {
    /// The log's length when it was read.
    pub len: u64,
    /// Its bytes from the offset asked.
    pub bytes: Vec<u8>,
}

fn no_workspaces() -> DriverError {
    DriverError::new(
        ErrorKind::Permanent,
        "this provider's driver keeps no workspaces",
    )
}

/// What to do with one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    Create,
    Revert,
    Delete,
}

fn no_snapshots() -> DriverError {
    DriverError::new(
        ErrorKind::Permanent,
        "this provider's driver takes no snapshots",
    )
}

/// A console shared (with a keepalive thread, say) is a console.
impl<C: Console + ?Sized> Console for std::sync::Arc<C> {
    fn recv(&self, buf: &mut [u8]) -> Result<usize, DriverError> {
        (**self).recv(buf)
    }

    fn send(&self, data: &[u8]) -> Result<(), DriverError> {
        (**self).send(data)
    }

    fn resize(&self, cols: u16, rows: u16) -> Result<(), DriverError> {
        (**self).resize(cols, rows)
    }
}

/// A snapshot of a VM, as its hypervisor lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub name: String,
    /// Seconds since the epoch, when the hypervisor says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// It holds the running VM's memory: a revert resumes it where it was.
    pub with_memory: bool,
}

/// Whether `name` may name a snapshot an operator makes: 2 to 40 letters, digits, `-` and
/// `_`, starting with a letter (what Proxmox accepts too), and not beginning `fleet-`,
/// which fleet keeps for its own (`fleet-clean`).
pub fn check_snapshot_name(name: &str) -> Result<(), DriverError> {
    check_snapshot_charset(name)?;
    if name.starts_with("fleet-") {
        return Err(DriverError::new(
            ErrorKind::Permanent,
            format!("{name:?}: snapshot names beginning 'fleet-' are fleet's own; choose another"),
        ));
    }
    Ok(())
}

/// Whether `name` is a snapshot name at all (fleet's own included): 2 to 40 letters, digits,
/// `-` and `_`, starting with a letter.
pub fn check_snapshot_charset(name: &str) -> Result<(), DriverError> {
    let plain = (2..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain {
        return Err(DriverError::new(
            ErrorKind::Permanent,
            format!(
                "{name:?} cannot name a snapshot: use 2 to 40 letters, digits, '-' and '_', starting with a letter"
            ),
        ));
    }
    Ok(())
}

/// An interactive serial console of a running VM.
pub trait Console: Send + Sync {
    /// Waits for the console's output; `Ok(0)` once it closed (the VM stopped, or another
    /// client took the console).
    fn recv(&self, buf: &mut [u8]) -> Result<usize, DriverError>;
    /// Types `data` into the console.
    fn send(&self, data: &[u8]) -> Result<(), DriverError>;
    /// The operator's terminal is now `cols` by `rows` (a serial line has no size: most
    /// consoles ignore it).
    fn resize(&self, cols: u16, rows: u16) -> Result<(), DriverError> {
        let _ = (cols, rows);
        Ok(())
    }
}

/// The host side of a VM's agent link.
#[derive(Clone)]
pub enum AgentEndpoint {
    /// A unix socket bound to the VM's virtio-serial port (libvirt on fleet's own host).
    UnixSocket(std::path::PathBuf),
    /// A socket already connected to the VM's virtio-serial port (libvirt on a remote
    /// host: the channel opened through a libvirt connection of its own,
    /// `driver::libvirt::channel`). One link takes it.
    Connected(std::sync::Arc<std::os::unix::net::UnixStream>),
    /// Exchanges relayed by the hypervisor's own guest agent (Proxmox: qemu-guest-agent),
    /// see `fleet_agent_protocol::relay`.
    Relayed(std::sync::Arc<dyn GuestExchange>),
}

impl std::fmt::Debug for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::UnixSocket(path) => write!(f, "UnixSocket({})", path.display()),
            AgentEndpoint::Connected(_) => write!(f, "Connected"),
            AgentEndpoint::Relayed(exchange) => write!(f, "Relayed({})", exchange.describe()),
        }
    }
}

/// Runs one relayed exchange in a VM: `fleet-agent exchange` in the guest, with `request`
/// on its stdin; returns its stdout.
pub trait GuestExchange: Send + Sync {
    fn exchange(&self, request: &str) -> Result<String, DriverError>;
    /// Which VM, for messages.
    fn describe(&self) -> String;
}

/// Told about changes on a host: a VM's name, or `None` for "anything may have changed".
pub type ChangeCallback = std::sync::Arc<dyn Fn(Option<&str>) + Send + Sync>;
