//! The Proxmox VE driver.
//!
//! Identity: PVE VM name = VM name. Ownership: the tag `fleet-<fleet>` marks fleet's VMs
//! so that one `/cluster/resources?type=vm` call per pass finds them, and a stamp line in
//! the VM's description proves it (a tag alone never makes a VM fleet's: anyone can set
//! one). The stamp is written by the clone call itself, so a VM fleet made is stamped from
//! its first moment, even if fleet dies before the next call.
//!
//! VMIDs are never identity: every mutation looks the VM up by name, reads its config and
//! checks the stamp right before acting, so a VMID fleet once used and PVE gave to someone
//! else is never touched. New VMIDs come from `/cluster/nextid`; a clone that finds its
//! VMID taken (another creator won the race) tries the next one.
//!
//! Here: the `Driver` implementation, clone and power. `ownership` (tags, stamps, the stamp
//! cache), `config` (digest-guarded config writes, PVE values), `snippets` (cloud-init
//! files), `client` (the HTTP API, and `PveCondition`: the only place PVE's wording is
//! read), `stamp` (the description line), `guest` (the agent link over qemu-guest-agent).
//! How it all works, step by step: `docs/proxmox.md`.

pub mod client;
mod config;
mod console;
mod guest;
mod ownership;
mod snippets;
pub mod stamp;

pub use ownership::fleet_tag;
use ownership::{CachedStamp, OwnedVm, Resource, split_tags, value_text};
use snippets::needs_user_data;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

use self::client::{ClientError, PveClient, PveCondition, TokenError, Trust};
use super::{Driver, DriverError, ErrorKind};
use crate::observe::{ObservedHost, ObservedVm, Stamp};
use crate::resolve::DesiredVm;
use crate::spec::{DomainType, NetworkMode, PowerState, ProxmoxProvider};

/// How long fleet waits for one PVE task (clone, start, destroy…) before giving up on it.
const TASK_DEADLINE: Duration = Duration::from_secs(300);
/// How many VMIDs a create tries when other creators keep taking them.
const VMID_ATTEMPTS: u32 = 16;
const DEFAULT_STORAGE: &str = "local-lvm";
const DEFAULT_BRIDGE: &str = "vmbr0";
/// Disk keys in the order PVE boots from them.
const BOOT_DISKS: [&str; 4] = ["scsi0", "virtio0", "sata0", "ide0"];

pub struct ProxmoxDriver {
    provider: String,
    fleet: String,
    tag: String,
    default_node: String,
    storage: String,
    bridge: String,
    domain_type: DomainType,
    /// `(storage id, directory)` of the snippet storage, when configured.
    snippets: Option<(String, PathBuf)>,
    /// The client, or why there is none (every call then fails saying so).
    client: Result<Arc<PveClient>, ClientError>,
    /// Stamps read from descriptions, by VMID, while the VM keeps its name and node.
    stamps: Mutex<HashMap<u64, CachedStamp>>,
    /// Held while allocating a VMID and cloning: fleet's own creates never race each other
    /// for an id or for the template's config lock.
    clone_lock: Mutex<()>,
}

impl ProxmoxDriver {
    /// No network traffic here: the client connects on the first call. `token` is the API
    /// token's secret, or why it could not be had (every call then fails with that).
    /// `provider` comes from the host configuration (its paths are absolute); `domain_type`
    /// from the revision.
    pub fn new(
        fleet: &str,
        provider: &ProxmoxProvider,
        domain_type: DomainType,
        token: Result<SecretString, TokenError>,
    ) -> ProxmoxDriver {
        let trust = if provider.insecure_skip_verify {
            Ok(Trust::Insecure)
        } else if let Some(ca) = &provider.ca_file {
            let path = Path::new(ca);
            std::fs::read(path)
                .map(Trust::CaPem)
                .map_err(|source| ClientError::CaFile {
                    path: path.to_owned(),
                    source,
                })
        } else {
            Ok(Trust::System)
        };
        let client = token.map_err(ClientError::from).and_then(|secret| {
            PveClient::new(&provider.endpoint, &provider.token.id, &secret, trust?)
        });
        ProxmoxDriver {
            provider: provider.name.0.clone(),
            fleet: fleet.to_owned(),
            tag: fleet_tag(fleet),
            default_node: provider.node.clone(),
            storage: provider
                .storage
                .clone()
                .unwrap_or_else(|| DEFAULT_STORAGE.to_owned()),
            bridge: provider
                .bridge
                .clone()
                .unwrap_or_else(|| DEFAULT_BRIDGE.to_owned()),
            domain_type,
            snippets: provider
                .snippets
                .as_ref()
                .map(|s| (s.storage.clone(), PathBuf::from(&s.dir))),
            client: client.map(Arc::new),
            stamps: Mutex::new(HashMap::new()),
            clone_lock: Mutex::new(()),
        }
    }

    fn client(&self) -> Result<&Arc<PveClient>, DriverError> {
        self.client.as_ref().map_err(|e| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("provider {}: {e}", self.provider),
            )
        })
    }

    /// Runs an asynchronous call and waits for its task.
    fn task(&self, node: &str, upid: String) -> Result<(), DriverError> {
        Ok(self.client()?.await_task(node, &upid, TASK_DEADLINE)?)
    }

    /// The template VM `template` is cloned from: the one on `node` if there is one, else
    /// any (PVE then clones across nodes, which needs shared storage).
    fn find_template(&self, template: &str, node: &str) -> Result<Resource, DriverError> {
        let mut found: Vec<Resource> = self
            .resources()?
            .into_iter()
            .filter(|r| r.is_template() && r.name() == template)
            .collect();
        found.sort_by_key(|r| (r.node != node, r.vmid));
        found.into_iter().next().ok_or_else(|| {
            DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "no template VM named {template:?} on {} (make one with `qm template`, or fix the image's template)",
                    self.provider
                ),
            )
        })
    }

    /// Clones the template into a fresh VMID, stamped by the clone itself. Returns the VMID.
    fn clone_template(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        template: &Resource,
        node: &str,
    ) -> Result<u64, DriverError> {
        let client = self.client()?;
        let _serial = self.clone_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut full = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let newid: Value = client.get("/cluster/nextid", &[])?;
            let newid = value_text(&newid).parse::<u64>().map_err(|_| {
                DriverError::new(ErrorKind::Permanent, format!("nextid answered {newid}"))
            })?;
            // The clone is fleet's from its first moment, but its stamp names no spec yet:
            // one create that dies before the config write leaves a VM the next plan finishes,
            // not one that claims a configuration it never got.
            let unfinished = Stamp {
                spec_hash: String::new(),
                config: None,
                ..stamp.clone()
            };
            let mut form = vec![
                ("newid", newid.to_string()),
                ("name", vm.name.clone()),
                ("description", stamp::render(&unfinished)),
            ];
            if node != template.node {
                form.push(("target", node.to_owned()));
            }
            if full {
                form.push(("full", "1".into()));
                form.push(("storage", self.storage.clone()));
            }
            let path = format!("/nodes/{}/qemu/{}/clone", template.node, template.vmid);
            let started = client.post::<String>(&path, &form);
            let result =
                started.and_then(|upid| client.await_task(&template.node, &upid, TASK_DEADLINE));
            match result {
                Ok(()) => return Ok(newid),
                // Another creator took the VMID between nextid and clone.
                Err(e) if e.kind == ErrorKind::Conflict && attempt < VMID_ATTEMPTS => {
                    tracing::info!(vm = %vm.name, vmid = newid, "VMID taken meanwhile; trying the next one: {e}");
                }
                Err(e) if !full && e.condition == PveCondition::LinkedCloneUnsupported => {
                    tracing::info!(vm = %vm.name, "storage cannot make linked clones; making a full clone on {}", self.storage);
                    full = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn power_on(&self, owned: &OwnedVm) -> Result<(), DriverError> {
        if owned.running {
            return Ok(());
        }
        let client = self.client()?;
        let upid: String = client.post(&format!("{}/status/start", owned.path()), &[])?;
        match client.await_task(&owned.node, &upid, TASK_DEADLINE) {
            Err(e) if e.condition == PveCondition::AlreadyRunning => Ok(()),
            other => Ok(other?),
        }
    }

    /// ACPI shutdown with PVE's own timeout set to `grace`; a guest that does not power off
    /// in time is stopped hard.
    fn power_off(&self, owned: &OwnedVm, grace: Duration) -> Result<(), DriverError> {
        if !owned.running {
            return Ok(());
        }
        let client = self.client()?;
        let secs = grace.as_secs().max(1);
        let shutdown = client
            .post::<String>(
                &format!("{}/status/shutdown", owned.path()),
                &[("timeout", secs.to_string())],
            )
            .and_then(|upid| {
                client.await_task(&owned.node, &upid, grace + Duration::from_secs(30))
            });
        match shutdown {
            Ok(()) => Ok(()),
            Err(e) if e.condition == PveCondition::NotRunning => Ok(()),
            Err(e) => {
                tracing::info!(
                    vmid = owned.vmid,
                    "graceful shutdown did not finish within {grace:?} ({e}); stopping hard"
                );
                let upid: String = client.post(&format!("{}/status/stop", owned.path()), &[])?;
                match client.await_task(&owned.node, &upid, TASK_DEADLINE) {
                    Err(e) if e.condition == PveCondition::NotRunning => Ok(()),
                    other => Ok(other?),
                }
            }
        }
    }

    /// Brings `owned` (as last read; config writes do not change its power) to the spec's
    /// power state.
    fn ensure_power(
        &self,
        vm: &DesiredVm,
        owned: &OwnedVm,
        grace: Duration,
    ) -> Result<(), DriverError> {
        match vm.state {
            PowerState::Running => self.power_on(owned),
            PowerState::Stopped => self.power_off(owned, grace),
        }
    }
}

/// The snapshot a VM with `reset: beforeEachTask` returns to, taken when it was made.
const CLEAN_SNAPSHOT: &str = "fleet-clean";

/// The privileges fleet's token needs, as `docs/proxmox.md` lists them for its role (a test
/// keeps the two the same); `fleet doctor` compares the token's own with these.
pub const REQUIRED_PRIVILEGES: [&str; 15] = [
    "VM.Audit",
    "VM.Allocate",
    "VM.Clone",
    "VM.PowerMgmt",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Options",
    "VM.Config.HWType",
    "VM.Config.Network",
    "VM.Config.Disk",
    "VM.Config.Cloudinit",
    "VM.Config.CDROM",
    "VM.GuestAgent.Unrestricted",
    "Datastore.AllocateSpace",
    "SDN.Use",
];

/// What `fleet doctor` learns of a cluster through the provider's token.
#[derive(Debug)]
pub struct PveHealth {
    pub version: String,
    /// `REQUIRED_PRIVILEGES` the token holds on no path.
    pub missing: Vec<&'static str>,
    /// The first online node's clock minus this host's, in seconds, or why it is unknown.
    pub skew: Result<i64, String>,
}

impl ProxmoxDriver {
    /// Asks the cluster its version, the token's privileges (`/access/permissions`) and a
    /// node's time. Reads only.
    pub fn health(&self) -> Result<PveHealth, DriverError> {
        let client = self.client()?;
        let version: Value = client.get("/version", &[])?;
        let held: BTreeMap<String, BTreeMap<String, Value>> =
            client.get("/access/permissions", &[])?;
        let privileges: std::collections::BTreeSet<&str> = held
            .values()
            .flat_map(|privs| privs.keys().map(String::as_str))
            .collect();
        let missing = REQUIRED_PRIVILEGES
            .into_iter()
            .filter(|p| !privileges.contains(p))
            .collect();
        let skew = (|| -> Result<i64, String> {
            let nodes: Vec<Value> = client.get("/nodes", &[]).map_err(|e| e.to_string())?;
            let node = nodes
                .iter()
                .find(|n| n["status"] == "online")
                .and_then(|n| n["node"].as_str())
                .ok_or("no node is online")?;
            let time: Value = client
                .get(
                    &format!("/nodes/{}/time", client::encode_segment(node)),
                    &[],
                )
                .map_err(|e| e.to_string())?;
            let theirs = time["time"]
                .as_i64()
                .ok_or_else(|| format!("node {node} gave no time"))?;
            let ours = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            Ok(theirs - ours)
        })();
        Ok(PveHealth {
            version: value_text(&version["version"]),
            missing,
            skew,
        })
    }
}

impl ProxmoxDriver {
    /// Takes `CLEAN_SNAPSHOT` of `owned` unless it has one (a create run again).
    fn take_clean_snapshot(&self, owned: &OwnedVm) -> Result<(), DriverError> {
        let client = self.client()?;
        let snapshots: Vec<Value> = client.get(&format!("{}/snapshot", owned.path()), &[])?;
        let taken = snapshots
            .iter()
            .any(|s| s.get("name").and_then(Value::as_str) == Some(CLEAN_SNAPSHOT));
        if taken {
            return Ok(());
        }
        let upid: String = client.post(
            &format!("{}/snapshot", owned.path()),
            &[
                ("snapname", CLEAN_SNAPSHOT.to_owned()),
                (
                    "description",
                    "fleet: the state reset: beforeEachTask returns to".to_owned(),
                ),
            ],
        )?;
        self.task(&owned.node, upid)
    }
}

impl Driver for ProxmoxDriver {
    /// The cluster's online nodes together (`GET /nodes`: `maxmem`, `maxcpu`); `None` when a
    /// node's figures are not shown (a token without `Sys.Audit` sees none).
    fn capacity(&self) -> Result<Option<crate::observe::Capacity>, DriverError> {
        let nodes: Vec<Value> = self.client()?.get("/nodes", &[])?;
        let mut total = crate::observe::Capacity {
            memory_mib: 0,
            cpus: 0,
        };
        for node in nodes
            .iter()
            .filter(|n| n.get("status").and_then(Value::as_str) == Some("online"))
        {
            let (Some(memory), Some(cpus)) = (
                node.get("maxmem").and_then(Value::as_u64),
                node.get("maxcpu").and_then(Value::as_u64),
            ) else {
                return Ok(None);
            };
            total.memory_mib = total.memory_mib.saturating_add(memory / (1024 * 1024));
            total.cpus = total
                .cpus
                .saturating_add(u32::try_from(cpus).unwrap_or(u32::MAX));
        }
        Ok((total.cpus > 0).then_some(total))
    }

    fn observe(&self) -> Result<ObservedHost, DriverError> {
        let resources = self.resources()?;
        let mut vms = Vec::with_capacity(resources.len());
        for r in resources.iter().filter(|r| !r.is_template()) {
            let stamp = if r.has_tag(&self.tag) {
                let cached = {
                    let cache = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
                    cache
                        .get(&r.vmid)
                        .filter(|c| c.name == r.name() && c.node == r.node)
                        .map(|c| c.stamp.clone())
                };
                match cached {
                    Some(stamp) => stamp,
                    None => match self.read_config(&r.node, r.vmid) {
                        Ok((config, _)) => {
                            let stamp = self.stamp_of(&config);
                            self.remember(r.vmid, r.name(), &r.node, stamp.clone());
                            stamp.map(Arc::new)
                        }
                        // Deleted between the two calls: the next pass will not list it.
                        Err(e) if e.kind == ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    },
                }
            } else {
                None
            };
            vms.push(Arc::new(ObservedVm {
                name: r.name().to_owned(),
                uuid: format!("{}/{}", r.node, r.vmid),
                running: r.status == "running",
                cpus: r.maxcpu.unwrap_or(0.0) as u32,
                memory_mib: r.maxmem.unwrap_or(0) / (1024 * 1024),
                stamp,
            }));
        }
        vms.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        Ok(ObservedHost {
            vms,
            ..Default::default()
        })
    }

    fn create(&self, vm: &DesiredVm, stamp: &Stamp, grace: Duration) -> Result<(), DriverError> {
        super::check_name(&vm.name)?;
        self.write_snippet(vm)?;
        // Idempotent: a VM this fleet already made under this name (an earlier attempt that
        // died after its clone) is finished rather than made twice.
        let owned = match self.owned(&vm.name)? {
            Some(owned) => owned,
            None => {
                let template_name = vm.config.image.template.as_deref().ok_or_else(|| {
                    DriverError::new(
                        ErrorKind::Permanent,
                        format!(
                            "image {} has no template; Proxmox VMs are cloned from one",
                            vm.config.image.name
                        ),
                    )
                })?;
                let node = vm
                    .config
                    .node
                    .clone()
                    .unwrap_or_else(|| self.default_node.clone());
                let template = self.find_template(template_name, &node)?;
                self.clone_template(vm, stamp, &template, &node)?;
                self.require_owned(&vm.name)?
            }
        };
        // The stamp with the spec goes last but for the power state, in the same write as
        // the config it describes: whatever a crash interrupts before it is done again.
        let stamp = &stamp.over(self.stamp_of(&owned.config).as_ref());
        let mut owned = self.resize_disk(vm, owned)?;
        if vm.config.reset {
            // Before its first boot, and before the stamp that says the create is done: a
            // VM that resets is never made without the state it returns to.
            self.take_clean_snapshot(&owned)?;
            owned = self.require_owned(&vm.name)?;
        }
        self.write_config(vm, stamp, &owned)?;
        self.drop_legacy_snippet(&vm.name)?;
        self.remember(owned.vmid, &vm.name, &owned.node, Some(stamp.clone()));
        self.ensure_power(vm, &owned, grace)
    }

    fn reset(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        super::check_name(&vm.name)?;
        let owned = self.require_owned(&vm.name)?;
        let stamp = self.stamp_of(&owned.config).ok_or_else(|| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("{}: its stamp is unreadable; not reset", vm.name),
            )
        })?;
        let client = self.client()?;
        if owned.running {
            // Nothing in it is kept: stopped hard, no shutdown to wait for.
            let upid: String = client.post(&format!("{}/status/stop", owned.path()), &[])?;
            match client.await_task(&owned.node, &upid, TASK_DEADLINE) {
                Err(e) if e.condition == PveCondition::NotRunning => {}
                other => other?,
            }
        }
        let upid: String = client.post(
            &format!("{}/snapshot/{CLEAN_SNAPSHOT}/rollback", owned.path()),
            &[],
        )?;
        self.task(&owned.node, upid)?;
        // The rollback also put back the disk and config of that moment: the spec's disk
        // size, config and stamp of now go back on before it boots.
        let owned = self.require_owned(&vm.name)?;
        let owned = self.resize_disk(vm, owned)?;
        self.write_config(vm, &stamp, &owned)?;
        let owned = self.require_owned(&vm.name)?;
        self.power_on(&owned)
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        let owned = self.require_owned(name)?;
        self.power_on(&owned)
    }

    fn console(&self, name: &str, force: bool) -> Result<Box<dyn super::Console>, DriverError> {
        // A termproxy session is one client's; PVE gives each its own: nothing to take over.
        let _ = force;
        super::check_name(name)?;
        let owned = self.require_owned(name)?;
        if !owned.running {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!("{name} is not running: its console opens once it runs"),
            ));
        }
        Ok(Box::new(console::open(self.client()?, &owned.path())?))
    }

    fn snapshots(&self, name: &str) -> Result<Vec<super::SnapshotInfo>, DriverError> {
        super::check_name(name)?;
        let owned = self.require_owned(name)?;
        let listed: Vec<Value> = self
            .client()?
            .get(&format!("{}/snapshot", owned.path()), &[])?;
        let mut infos: Vec<super::SnapshotInfo> = listed
            .iter()
            // PVE lists where the VM is now as a snapshot named "current".
            .filter(|s| s["name"].as_str().is_some_and(|n| n != "current"))
            .map(|s| super::SnapshotInfo {
                name: value_text(&s["name"]),
                created: s["snaptime"].as_i64(),
                description: s["description"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                with_memory: s["vmstate"].as_i64() == Some(1) || s["vmstate"] == true,
            })
            .collect();
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
        let owned = self.require_owned(name)?;
        let upid: String = self.client()?.post(
            &format!("{}/snapshot", owned.path()),
            &[
                ("snapname", snapshot.to_owned()),
                ("description", description.to_owned()),
            ],
        )?;
        self.task(&owned.node, upid)
    }

    /// Rolls back to `snapshot` (its disks and config; PVE stops the VM for it) and boots
    /// the VM again if it ran. The next pass brings its configuration back to the revision.
    fn snapshot_revert(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        super::check_snapshot_name(snapshot)?;
        let owned = self.require_owned(name)?;
        let was_running = owned.running;
        let client = self.client()?;
        if was_running {
            let upid: String = client.post(&format!("{}/status/stop", owned.path()), &[])?;
            match client.await_task(&owned.node, &upid, TASK_DEADLINE) {
                Err(e) if e.condition == PveCondition::NotRunning => {}
                other => other?,
            }
        }
        let upid: String = client.post(
            &format!(
                "{}/snapshot/{}/rollback",
                owned.path(),
                client::encode_segment(snapshot)
            ),
            &[],
        )?;
        self.task(&owned.node, upid)?;
        if was_running {
            let owned = self.require_owned(name)?;
            self.power_on(&owned)?;
        }
        Ok(())
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        super::check_snapshot_name(snapshot)?;
        let owned = self.require_owned(name)?;
        let upid: String = self.client()?.delete(
            &format!(
                "{}/snapshot/{}",
                owned.path(),
                client::encode_segment(snapshot)
            ),
            &[],
        )?;
        self.task(&owned.node, upid)
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        super::check_name(name)?;
        let owned = self.require_owned(name)?;
        self.power_off(&owned, grace)
    }

    fn update(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        restart: bool,
        grace: Duration,
    ) -> Result<(), DriverError> {
        super::check_name(&vm.name)?;
        let mut owned = self.require_owned(&vm.name)?;
        if restart && owned.running {
            self.power_off(&owned, grace)?;
            // Fresh digest for the config write: stopping changed the VM's state.
            owned = self.require_owned(&vm.name)?;
        }
        self.write_snippet(vm)?;
        let stamp = &stamp.over(self.stamp_of(&owned.config).as_ref());
        let owned = self.resize_disk(vm, owned)?;
        self.write_config(vm, stamp, &owned)?;
        self.drop_legacy_snippet(&vm.name)?;
        self.remember(owned.vmid, &vm.name, &owned.node, Some(stamp.clone()));
        self.ensure_power(vm, &owned, grace)
    }

    fn destroy(&self, name: &str, grace: Duration) -> Result<(), DriverError> {
        super::check_name(name)?;
        let Some(owned) = self.owned(name)? else {
            return self.remove_snippet(name);
        };
        self.power_off(&owned, grace)?;
        // Only ever for a VM whose stamp was just checked: purge drops it from backup jobs,
        // replication and HA as well.
        let upid: String = self.client()?.delete(
            &owned.path(),
            &[
                ("purge", "1".into()),
                ("destroy-unreferenced-disks", "1".into()),
            ],
        )?;
        match self.task(&owned.node, upid) {
            Err(e) if e.kind == ErrorKind::NotFound => {}
            other => other?,
        }
        self.forget(owned.vmid);
        self.remove_snippet(name)
    }

    fn settle(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        // A create that died between its clone and its config left a stamped VM without
        // the tag that observation finds fleet's VMs by: tag it, and planning takes over.
        match self.owned(name) {
            Ok(Some(owned)) => {
                let tagged = owned
                    .value("tags")
                    .is_some_and(|t| split_tags(&t).any(|t| t == self.tag));
                if !tagged {
                    let mut tags: Vec<String> = owned
                        .value("tags")
                        .map(|t| split_tags(&t).map(str::to_owned).collect())
                        .unwrap_or_default();
                    tags.push(self.tag.clone());
                    self.client()?.put::<Value>(
                        &format!("{}/config", owned.path()),
                        &[("tags", tags.join(";")), ("digest", owned.digest.clone())],
                    )?;
                }
                Ok(())
            }
            Ok(None) => self.remove_snippet(name),
            // A foreign VM of that name: nothing of fleet's to settle.
            Err(e) if e.kind == ErrorKind::Conflict => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn calls(&self) -> u64 {
        self.client.as_ref().map_or(0, |c| c.calls())
    }

    fn tidy(&self) -> Result<Vec<String>, DriverError> {
        if self.snippets.is_none() {
            return Ok(Vec::new());
        }
        let host = self.observe()?;
        Ok(self.sweep_snippets(&host))
    }

    /// Observation finds fleet's VMs by their tag; a create that stopped between its clone
    /// and its config write left one with the stamp but without the tag.
    fn stamp_by_name(&self, name: &str) -> Result<Option<Arc<Stamp>>, DriverError> {
        match self.owned(name) {
            Ok(Some(vm)) => Ok(self.stamp_of(&vm.config).map(Arc::new)),
            Ok(None) => Ok(None),
            Err(e) if e.kind == ErrorKind::Conflict => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link relayed by qemu-guest-agent, pinned to the VMID that carries this fleet's
    /// stamp for `name` right now (a VMID PVE later gives another VM fails the link's boot
    /// check, and the next link checks the stamp again).
    fn agent_endpoint(&self, name: &str) -> Result<Option<super::AgentEndpoint>, DriverError> {
        let Some(vm) = self.owned(name)? else {
            return Ok(None);
        };
        if !vm.running {
            return Ok(None);
        }
        Ok(Some(super::AgentEndpoint::Relayed(Arc::new(
            guest::QemuGuestAgent {
                client: self.client()?.clone(),
                node: vm.node,
                vmid: vm.vmid,
                name: name.to_owned(),
            },
        ))))
    }

    fn resync(&self) {
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::config::{boot_disk, same_value, size_mib};
    use super::*;

    #[test]
    fn sizes_read_as_mib() {
        assert_eq!(size_mib("2G"), Some(2048));
        assert_eq!(size_mib("512M"), Some(512));
        assert_eq!(size_mib("1T"), Some(1024 * 1024));
        assert_eq!(size_mib("10"), Some(10240));
        assert_eq!(size_mib("x"), None);
    }

    #[test]
    fn boot_disk_skips_cdroms() {
        let config: BTreeMap<String, Value> = serde_json::from_str(
            r#"{"ide0":"local:iso/x.iso,media=cdrom","scsi0":"local-lvm:vm-100-disk-0,size=2G"}"#,
        )
        .expect("json");
        assert_eq!(boot_disk(&config), Some(("scsi0".into(), Some(2048))));
    }

    #[test]
    fn unchanged_values_are_not_sent() {
        assert!(same_value("tags", Some("b;fleet-demo"), "fleet-demo;b"));
        assert!(!same_value("tags", Some("b"), "fleet-demo"));
        assert!(same_value(
            "agent",
            Some("enabled=1,fstrim_cloned_disks=1"),
            "1"
        ));
        assert!(same_value("memory", Some("512"), "512"));
        assert!(!same_value("memory", None, "512"));
    }

    #[test]
    fn tags_are_valid_pve_tags() {
        let tag = fleet_tag("Demo-1");
        assert_eq!(tag, "fleet-demo-1");
        assert!(
            tag.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_+.".contains(c))
        );
    }
}
