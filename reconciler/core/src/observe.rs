//! What the hypervisors really run, as plain data that drivers fill in and the planner reads.
//! Nothing here names libvirt: a domain is an `ObservedVm`, its fleet metadata a `Stamp`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::resolve::VmConfig;

/// The ownership stamp fleet writes onto every VM it creates (DESIGN §3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    /// The Fleet object's name: VMs of another fleet are foreign.
    pub fleet: String,
    /// The VM's name in fleet/.
    pub name: String,
    pub spec_hash: String,
    /// The commit (or worktree digest) that last applied it.
    pub revision: String,
    /// Kept in the stamp so that deleting the VM's file cannot bypass it.
    pub protect: bool,
    /// The configuration last applied; `None` when the stamp's copy could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// When fleet created the VM (its lease starts then); kept by every later write of the
    /// stamp. `None` on VMs made before stamps recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<crate::time::Timestamp>,
    /// Brought under management by `fleet adopt` rather than made by fleet: its disks and
    /// definition are not fleet's, so a change of it remakes it rather than editing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

impl Stamp {
    /// This stamp, written over `earlier` (the VM's stamp now): the VM keeps its creation
    /// time (none, for a VM made before stamps recorded it: a rewrite is not a creation).
    pub fn over(&self, earlier: Option<&Stamp>) -> Stamp {
        Stamp {
            created: earlier.map_or(self.created, |e| e.created),
            // An adopted VM stays adopted however its stamp is rewritten.
            adopted: self.adopted || earlier.is_some_and(|e| e.adopted),
            ..self.clone()
        }
    }
}

/// One VM (domain) on a host, fleet's or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedVm {
    /// The hypervisor's name for it.
    pub name: String,
    pub uuid: String,
    pub running: bool,
    /// vCPUs and memory: 0 when the driver did not read them (libvirt reads only the stamp
    /// of a domain that is not this fleet's; `Driver::observe_vm` reads them).
    pub cpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// `None`: not made by any fleet. Shared, so cached observations are cheap to hand out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<std::sync::Arc<Stamp>>,
}

impl ObservedVm {
    /// True when the VM carries this fleet's stamp for a VM of the same name.
    pub fn owned_by(&self, fleet: &str) -> bool {
        self.stamp
            .as_ref()
            .is_some_and(|s| s.fleet == fleet && s.name == self.name)
    }
}

/// What a provider's host can run: its memory and CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub memory_mib: u64,
    pub cpus: u32,
}

/// One provider's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedHost {
    /// Sorted by name. Shared, so a driver can hand out cached observations without copying.
    pub vms: Vec<std::sync::Arc<ObservedVm>>,
    /// This fleet's workspaces on the provider (volumes it made), sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<ObservedWorkspace>,
}

/// A workspace fleet made on a provider, as found there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedWorkspace {
    pub name: String,
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
    /// The VMs whose definitions attach it (one, or none; two only if something outside
    /// fleet attached it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_to: Vec<String>,
    /// What tells this volume from another of the same name (libvirt: its change time):
    /// an approval to destroy it is for this one only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// Every provider's view at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observed {
    /// By provider name. A provider missing here could not be observed.
    pub hosts: BTreeMap<String, ObservedHost>,
    /// Providers that could not be observed, with why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreachable: BTreeMap<String, String>,
}

impl Observed {
    /// A digest of everything the planner looks at; a saved plan records it and is refused
    /// when the world has moved on.
    ///
    /// Each VM contributes its identity, power state, resources and stamp fields; a stamp's
    /// config is covered by its spec hash, so it is not serialised again (this runs on every
    /// daemon pass).
    ///
    /// Only the VMs the plan is about count: `fleet`'s own and those named `concerned`. A
    /// foreign VM coming or going elsewhere on the host (another team's, another test's) does
    /// not make a saved plan stale.
    pub fn digest(&self, fleet: &str, concerned: impl Fn(&str) -> bool) -> String {
        let mut h = Sha256::new();
        for (provider, host) in &self.hosts {
            h.update(provider.as_bytes());
            h.update([0xff]);
            let relevant = host.vms.iter().filter(|vm| {
                concerned(&vm.name) || vm.stamp.as_ref().is_some_and(|s| s.fleet == fleet)
            });
            for vm in relevant {
                for part in [vm.name.as_str(), vm.uuid.as_str()] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
                h.update([u8::from(vm.running)]);
                h.update(vm.cpus.to_le_bytes());
                h.update(vm.memory_mib.to_le_bytes());
                match &vm.stamp {
                    None => h.update([0]),
                    Some(s) => {
                        h.update([1, u8::from(s.protect), u8::from(s.config.is_some())]);
                        for part in [&s.fleet, &s.name, &s.spec_hash, &s.revision] {
                            h.update(part.as_bytes());
                            h.update([0]);
                        }
                    }
                }
            }
        }
        for (provider, why) in &self.unreachable {
            h.update(provider.as_bytes());
            h.update([0]);
            h.update(why.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())
    }

    pub fn find(&self, provider: &str, name: &str) -> Option<&ObservedVm> {
        let host = self.hosts.get(provider)?;
        host.vms.iter().map(|vm| &**vm).find(|vm| vm.name == name)
    }
}
