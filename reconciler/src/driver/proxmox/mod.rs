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

pub mod client;
mod guest;
pub mod stamp;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

use self::client::{PveClient, Trust};
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
    client: Result<Arc<PveClient>, String>,
    /// Stamps read from descriptions, by VMID, while the VM keeps its name and node.
    stamps: Mutex<HashMap<u64, CachedStamp>>,
    /// Held while allocating a VMID and cloning: fleet's own creates never race each other
    /// for an id or for the template's config lock.
    clone_lock: Mutex<()>,
}

struct CachedStamp {
    name: String,
    node: String,
    stamp: Option<Arc<Stamp>>,
}

/// One VM of `/cluster/resources?type=vm`.
#[derive(Clone, Debug, Deserialize)]
struct Resource {
    #[serde(rename = "type")]
    kind: String,
    vmid: u64,
    #[serde(default)]
    name: Option<String>,
    node: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    template: Option<Value>,
    #[serde(default)]
    tags: Option<String>,
    #[serde(default)]
    maxcpu: Option<f64>,
    #[serde(default)]
    maxmem: Option<u64>,
}

impl Resource {
    fn is_template(&self) -> bool {
        matches!(&self.template, Some(Value::Number(n)) if n.as_u64() == Some(1))
            || matches!(&self.template, Some(Value::String(s)) if s == "1")
    }

    fn has_tag(&self, tag: &str) -> bool {
        self.tags
            .as_deref()
            .is_some_and(|t| split_tags(t).any(|t| t == tag))
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

fn split_tags(tags: &str) -> impl Iterator<Item = &str> {
    tags.split([';', ',', ' ']).filter(|t| !t.is_empty())
}

/// A fleet VM located and proven: where it is, its config and the config's digest.
struct OwnedVm {
    vmid: u64,
    node: String,
    running: bool,
    config: BTreeMap<String, Value>,
    digest: String,
}

impl OwnedVm {
    fn path(&self) -> String {
        format!("/nodes/{}/qemu/{}", self.node, self.vmid)
    }

    fn value(&self, key: &str) -> Option<String> {
        self.config.get(key).map(value_text)
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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
        token: Result<SecretString, String>,
    ) -> ProxmoxDriver {
        let trust = if provider.insecure_skip_verify {
            Ok(Trust::Insecure)
        } else if let Some(ca) = &provider.ca_file {
            let path = Path::new(ca);
            std::fs::read(path)
                .map(Trust::CaPem)
                .map_err(|e| format!("read CA file {}: {e}", path.display()))
        } else {
            Ok(Trust::System)
        };
        let client = token.and_then(|secret| {
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
            client: client
                .map(Arc::new)
                .map_err(|e| format!("provider {}: {e}", provider.name.0)),
            stamps: Mutex::new(HashMap::new()),
            clone_lock: Mutex::new(()),
        }
    }

    fn client(&self) -> Result<&Arc<PveClient>, DriverError> {
        self.client
            .as_ref()
            .map_err(|e| DriverError::new(ErrorKind::Permanent, e.clone()))
    }

    fn resources(&self) -> Result<Vec<Resource>, DriverError> {
        let all: Vec<Resource> = self
            .client()?
            .get("/cluster/resources", &[("type", "vm".into())])?;
        Ok(all.into_iter().filter(|r| r.kind == "qemu").collect())
    }

    fn read_config(
        &self,
        node: &str,
        vmid: u64,
    ) -> Result<(BTreeMap<String, Value>, String), DriverError> {
        let mut config: BTreeMap<String, Value> = self
            .client()?
            .get(&format!("/nodes/{node}/qemu/{vmid}/config"), &[])?;
        let digest = config
            .remove("digest")
            .map(|d| value_text(&d))
            .unwrap_or_default();
        Ok((config, digest))
    }

    fn stamp_of(&self, config: &BTreeMap<String, Value>) -> Option<Stamp> {
        config
            .get("description")
            .and_then(|d| stamp::parse(&value_text(d)))
    }

    fn is_ours(&self, stamp: &Stamp, name: &str) -> bool {
        stamp.fleet == self.fleet && stamp.name == name
    }

    /// The VM `name` if it carries this fleet's stamp for `name`, checked on a fresh read
    /// of its config. A VM of that name without the stamp is refused as foreign.
    fn owned(&self, name: &str) -> Result<Option<OwnedVm>, DriverError> {
        let candidates: Vec<Resource> = self
            .resources()?
            .into_iter()
            .filter(|r| r.name() == name && !r.is_template())
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        for r in &candidates {
            let (config, digest) = match self.read_config(&r.node, r.vmid) {
                Ok(read) => read,
                // Gone between the listing and the read.
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if self
                .stamp_of(&config)
                .is_some_and(|s| self.is_ours(&s, name))
            {
                return Ok(Some(OwnedVm {
                    vmid: r.vmid,
                    node: r.node.clone(),
                    running: r.status == "running",
                    config,
                    digest,
                }));
            }
        }
        Err(DriverError::new(
            ErrorKind::Conflict,
            format!(
                "VM {name:?} on {} (VMID {}) is not fleet {:?}'s; refusing to touch it",
                self.provider,
                candidates
                    .iter()
                    .map(|r| r.vmid.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.fleet
            ),
        ))
    }

    fn require_owned(&self, name: &str) -> Result<OwnedVm, DriverError> {
        self.owned(name)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::NotFound,
                format!("VM {name:?} does not exist on {}", self.provider),
            )
        })
    }

    /// Runs an asynchronous call and waits for its task.
    fn task(&self, node: &str, upid: String) -> Result<(), DriverError> {
        self.client()?.await_task(node, &upid, TASK_DEADLINE)
    }

    fn remember(&self, vmid: u64, name: &str, node: &str, stamp: Option<Stamp>) {
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                vmid,
                CachedStamp {
                    name: name.to_owned(),
                    node: node.to_owned(),
                    stamp: stamp.map(Arc::new),
                },
            );
    }

    fn forget(&self, vmid: u64) {
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vmid);
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
            let result = started.and_then(|upid| self.task(&template.node, upid));
            match result {
                Ok(()) => return Ok(newid),
                // Another creator took the VMID between nextid and clone.
                Err(e) if e.kind == ErrorKind::Conflict && attempt < VMID_ATTEMPTS => {
                    tracing::info!(vm = %vm.name, vmid = newid, "VMID taken meanwhile; trying the next one: {e}");
                }
                Err(e) if !full && e.message.contains("Linked clone feature is not supported") => {
                    tracing::info!(vm = %vm.name, "storage cannot make linked clones; making a full clone on {}", self.storage);
                    full = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The `net0` value for `vm`, keeping the card's MAC address; `None`: no card.
    fn net0(&self, vm: &DesiredVm, current: Option<&str>) -> Result<Option<String>, DriverError> {
        let mac = current.and_then(|c| {
            c.split(',')
                .find_map(|part| part.strip_prefix("virtio=").map(str::to_owned))
        });
        let model = match mac {
            Some(mac) => format!("virtio={mac}"),
            None => "virtio".to_owned(),
        };
        match vm.config.network {
            NetworkMode::Isolated => Ok(None),
            NetworkMode::Full => Ok(Some(format!("{model},bridge={}", self.bridge))),
            NetworkMode::Allowlist => Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "VM {}: network mode allowlist is not supported on Proxmox yet; use isolated or full",
                    vm.name
                ),
            )),
        }
    }

    /// Brings the config of an owned VM to the spec: only keys that differ are sent, with
    /// the digest of the config they were compared with. A concurrent edit makes PVE refuse
    /// the write ("checksum mismatch"); the next pass observes again and re-plans.
    fn write_config(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        owned: &OwnedVm,
    ) -> Result<(), DriverError> {
        let mut wanted: Vec<(&str, String)> = vec![
            ("cores", vm.config.cpus.to_string()),
            ("sockets", "1".into()),
            ("memory", vm.config.memory_mib.to_string()),
            ("description", stamp::render(stamp)),
            ("tags", self.tag.clone()),
            // qemu-guest-agent: how fleet reaches the guest on Proxmox.
            ("agent", "1".into()),
            (
                "kvm",
                if self.domain_type == DomainType::Qemu {
                    "0"
                } else {
                    "1"
                }
                .into(),
            ),
        ];
        let mut delete = Vec::new();
        match self.net0(vm, owned.value("net0").as_deref())? {
            Some(net0) => wanted.push(("net0", net0)),
            None => {
                if owned.config.contains_key("net0") {
                    delete.push("net0");
                }
            }
        }
        if let Some((storage, _)) = &self.snippets {
            wanted.push((
                "cicustom",
                format!("user={storage}:snippets/{}", self.snippet_name(&vm.name)),
            ));
            if !has_cloudinit_drive(&owned.config) {
                wanted.push(("ide2", format!("{}:cloudinit", self.storage)));
            }
        } else if needs_user_data(vm) {
            return Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "VM {}: its loadout sets packages, files, runcmd or users, which need a cloud-init snippet; set snippets on provider {}",
                    vm.name, self.provider
                ),
            ));
        }
        let mut form: Vec<(&str, String)> = wanted
            .into_iter()
            .filter(|(key, value)| !same_value(key, owned.value(key).as_deref(), value))
            .collect();
        if !delete.is_empty() {
            form.push(("delete", delete.join(",")));
        }
        if form.is_empty() {
            return Ok(());
        }
        form.push(("digest", owned.digest.clone()));
        self.client()?
            .put::<Value>(&format!("{}/config", owned.path()), &form)
            .map_err(|e| {
                if e.message.contains("checksum mismatch") {
                    DriverError::new(
                        ErrorKind::Conflict,
                        format!(
                            "VM {} changed on {} while fleet was updating it (config digest mismatch); nothing was written, the next pass plans again",
                            vm.name, self.provider
                        ),
                    )
                } else {
                    e
                }
            })?;
        Ok(())
    }

    /// Grows the boot disk to the spec's size (never shrinks it); returns the VM as it is
    /// afterwards (a resize changes its config, and so the digest the next write needs).
    fn resize_disk(&self, vm: &DesiredVm, owned: OwnedVm) -> Result<OwnedVm, DriverError> {
        let Some(want_mib) = vm.config.disk_mib else {
            return Ok(owned);
        };
        let Some((key, current_mib)) = boot_disk(&owned.config) else {
            return Ok(owned);
        };
        if current_mib.is_some_and(|c| c >= want_mib) {
            return Ok(owned);
        }
        let upid: String = self.client()?.put(
            &format!("{}/resize", owned.path()),
            &[("disk", key), ("size", format!("{want_mib}M"))],
        )?;
        self.task(&owned.node, upid)?;
        self.require_owned(&vm.name)
    }

    fn power_on(&self, owned: &OwnedVm) -> Result<(), DriverError> {
        if owned.running {
            return Ok(());
        }
        let upid: String = self
            .client()?
            .post(&format!("{}/status/start", owned.path()), &[])?;
        match self.task(&owned.node, upid) {
            Err(e) if e.message.contains("already running") => Ok(()),
            other => other,
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
            Err(e) if e.message.contains("not running") => Ok(()),
            Err(e) => {
                tracing::info!(
                    vmid = owned.vmid,
                    "graceful shutdown did not finish within {grace:?} ({e}); stopping hard"
                );
                let upid: String = client.post(&format!("{}/status/stop", owned.path()), &[])?;
                match self.task(&owned.node, upid) {
                    Err(e) if e.message.contains("not running") => Ok(()),
                    other => other,
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

    // ---------------------------------------------------------------- snippets

    /// `fleet.<fleet>.<vm>.yaml`: fleet and VM names never hold a dot, so no two fleets'
    /// VMs share a snippet, even in one snippet directory.
    fn snippet_name(&self, vm: &str) -> String {
        format!("{}{vm}.yaml", self.snippet_prefix())
    }

    fn snippet_prefix(&self) -> String {
        format!("fleet.{}.", self.fleet)
    }

    /// Where releases before the dotted names put the VM's snippet. Not unique: fleet `a`
    /// with VM `b-c` and fleet `a-b` with VM `c` both got `fleet-a-b-c.yaml`, so such a file
    /// is only ever removed when its marker names this fleet and VM.
    fn legacy_snippet_name(&self, vm: &str) -> String {
        format!("{}{vm}.yaml", self.legacy_snippet_prefix())
    }

    fn legacy_snippet_prefix(&self) -> String {
        format!("fleet-{}-", self.fleet)
    }

    /// Writes the VM's cloud-init user-data snippet. It holds no secret: secret values only
    /// travel over the agent link.
    fn write_snippet(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let Some((_, dir)) = &self.snippets else {
            return Ok(());
        };
        let seed = crate::seed::render(vm, &format!("{}-{}", self.fleet, vm.name));
        // cloud-init wants `#cloud-config` on the first line; fleet's marker follows it.
        let body = seed
            .user_data
            .strip_prefix("#cloud-config")
            .unwrap_or(&seed.user_data);
        let text = format!(
            "#cloud-config\n{}\n{}",
            stamp::snippet_marker(&self.fleet, &vm.name),
            body.trim_start_matches('\n')
        );
        let path = dir.join(self.snippet_name(&vm.name));
        // Never overwrite a file that is not this VM's snippet: it is someone else's.
        if let Ok(existing) = std::fs::read_to_string(&path)
            && !stamp::snippet_is(&existing, &self.fleet, &vm.name)
        {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "{} exists and is not fleet's snippet for {}/{} (its second line is not `{}`); fleet will not overwrite it: move it out of the snippet directory",
                    path.display(),
                    self.fleet,
                    vm.name,
                    stamp::snippet_marker(&self.fleet, &vm.name)
                ),
            ));
        }
        crate::status::write_atomic(&path, text.as_bytes()).map_err(|e| {
            DriverError::new(
                ErrorKind::Transient,
                format!("write snippet {}: {e}", path.display()),
            )
        })
    }

    /// Removes the VM's snippet, under its name and under its legacy name, where the file's
    /// marker line says it is this fleet's snippet for this VM.
    fn remove_snippet(&self, name: &str) -> Result<(), DriverError> {
        let Some((_, dir)) = &self.snippets else {
            return Ok(());
        };
        for file in [self.snippet_name(name), self.legacy_snippet_name(name)] {
            self.remove_if_marked(&dir.join(file), name)?;
        }
        Ok(())
    }

    /// Removes the VM's snippet under its legacy name, once its config points at the new
    /// one.
    fn drop_legacy_snippet(&self, name: &str) -> Result<(), DriverError> {
        if let Some((_, dir)) = &self.snippets {
            self.remove_if_marked(&dir.join(self.legacy_snippet_name(name)), name)?;
        }
        Ok(())
    }

    /// Removes `path` if its marker says it is this fleet's snippet for `vm`; says whether
    /// it did.
    fn remove_if_marked(&self, path: &std::path::Path, vm: &str) -> Result<bool, DriverError> {
        match std::fs::read_to_string(path) {
            Ok(text) if stamp::snippet_is(&text, &self.fleet, vm) => {
                std::fs::remove_file(path).map(|()| true).map_err(|e| {
                    DriverError::new(
                        ErrorKind::Transient,
                        format!("remove snippet {}: {e}", path.display()),
                    )
                })
            }
            _ => Ok(false),
        }
    }

    /// Removes fleet's snippets whose VM no longer exists (a crash between a destroy and
    /// its cleanup, or a VM deleted by hand), and the temp files of snippet writes a kill
    /// interrupted. Works from what is on disk and in the cluster, not from memory.
    fn sweep_snippets(&self, host: &ObservedHost) -> Vec<String> {
        let Some((_, dir)) = &self.snippets else {
            return Vec::new();
        };
        let mut removed: Vec<String> =
            crate::status::remove_left_temp_files(dir, &self.snippet_prefix(), |_| false)
                .iter()
                .map(|p| {
                    format!(
                        "removed {}, a snippet write that was interrupted",
                        p.display()
                    )
                })
                .collect();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return removed;
        };
        let prefixes = [self.snippet_prefix(), self.legacy_snippet_prefix()];
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(vm) = prefixes.iter().find_map(|prefix| {
                file.strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(".yaml"))
            }) else {
                continue;
            };
            let alive = host
                .vms
                .iter()
                .any(|o| o.name == vm && o.owned_by(&self.fleet));
            if alive {
                continue;
            }
            // A file without this fleet's marker for `vm` is not its snippet, and stays.
            match self.remove_if_marked(&entry.path(), vm) {
                Ok(true) => removed.push(format!(
                    "removed the snippet of {vm}, whose VM no longer exists"
                )),
                Ok(false) => {}
                Err(e) => tracing::warn!("snippet sweep: {e}"),
            }
        }
        removed
    }
}

/// The tag that marks fleet's VMs (PVE tags: lower case, digits, `-_+.`).
pub fn fleet_tag(fleet: &str) -> String {
    format!("fleet-{}", fleet.to_ascii_lowercase())
}

fn needs_user_data(vm: &DesiredVm) -> bool {
    let c = &vm.config;
    !(c.packages.is_empty() && c.files.is_empty() && c.runcmd.is_empty() && c.users.is_empty())
}

fn has_cloudinit_drive(config: &BTreeMap<String, Value>) -> bool {
    config
        .values()
        .any(|v| value_text(v).contains(":cloudinit"))
}

/// Whether a config value already says what fleet would write.
fn same_value(key: &str, current: Option<&str>, wanted: &str) -> bool {
    let Some(current) = current else {
        // PVE's default for `kvm` is on: writing it anyway would need VM.Config.HWType for
        // nothing (only `domainType: qemu` has to send it).
        return key == "kvm" && wanted == "1";
    };
    match key {
        "tags" => {
            let mut a: Vec<&str> = split_tags(current).collect();
            let mut b: Vec<&str> = split_tags(wanted).collect();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        }
        "agent" | "kvm" => {
            current
                .split(',')
                .next()
                .map(|v| v.trim_start_matches("enabled="))
                == Some(wanted)
        }
        "description" => current.trim_end() == wanted.trim_end(),
        _ => current == wanted,
    }
}

/// The boot disk's key and size in MiB (when its `size=` says).
fn boot_disk(config: &BTreeMap<String, Value>) -> Option<(String, Option<u64>)> {
    BOOT_DISKS.iter().find_map(|key| {
        let value = value_text(config.get(*key)?);
        if value.contains("media=cdrom") {
            return None;
        }
        let size = value
            .split(',')
            .find_map(|p| p.strip_prefix("size="))
            .and_then(size_mib);
        Some(((*key).to_owned(), size))
    })
}

/// `32G`, `512M`, `1T`, `2048K` in MiB.
fn size_mib(text: &str) -> Option<u64> {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let n: f64 = number.parse().ok()?;
    let mib = match unit {
        "K" => n / 1024.0,
        "M" => n,
        "G" | "" => n * 1024.0,
        "T" => n * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(mib.ceil() as u64)
}

impl Driver for ProxmoxDriver {
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
        Ok(ObservedHost { vms })
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
        let owned = self.resize_disk(vm, owned)?;
        self.write_config(vm, stamp, &owned)?;
        self.drop_legacy_snippet(&vm.name)?;
        self.remember(owned.vmid, &vm.name, &owned.node, Some(stamp.clone()));
        self.ensure_power(vm, &owned, grace)
    }

    fn start(&self, name: &str) -> Result<(), DriverError> {
        super::check_name(name)?;
        let owned = self.require_owned(name)?;
        self.power_on(&owned)
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
