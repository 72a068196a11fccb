//! Pools spread over providers (`placement: {providers, strategy}` on a VMPool).
//!
//! A member's provider is decided once and then kept. Resolve gives every member its
//! template's provider for the time being. `apply_record` then sets the provider the status
//! directory records for it (`placement.yaml`, written by apply before the step that makes
//! the member). After observing, `place` decides for each member not recorded:
//!
//! 1. found (with this fleet's stamp) on one of the pool's providers: there;
//! 2. any of the pool's providers could not be observed: it waits (the member could be
//!    there), and the plan says why;
//! 3. otherwise by the strategy, among the providers with room for it: `spread`, the one
//!    holding the fewest of the pool's members (ties go to the earlier in the list);
//!    `pack`, the first in the list. No provider with room: it waits.
//!
//! Invariants: a recorded or found member never moves, so adding a provider or a member
//! moves none; a member whose provider cannot be observed is never made elsewhere; the
//! same inputs give the same placement.

use std::collections::{BTreeMap, BTreeSet};

use crate::observe::{Capacity, Observed};
use crate::resolve::{Desired, DesiredVm};
use crate::spec::{PlacementStrategy, PowerState};

/// A pool's placement as the revision says it, and which of its members have a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPlacement {
    pub providers: Vec<String>,
    pub strategy: PlacementStrategy,
    /// The replicas, in order.
    pub members: Vec<String>,
    /// Members whose provider is decided (recorded, or placed by `place`).
    pub placed: BTreeSet<String>,
}

/// Where each placed member runs, as the status directory records it: member → provider.
pub type Record = BTreeMap<String, String>;

/// Sets the provider of each member `record` places on a provider its pool still lists.
pub fn apply_record(desired: &mut Desired, record: &Record) {
    let Desired {
        placements, vms, ..
    } = desired;
    for pool in placements.values_mut() {
        for member in &pool.members {
            let Some(provider) = record.get(member) else {
                continue;
            };
            if pool.providers.contains(provider)
                && let Some(vm) = vms.get_mut(member)
            {
                set_provider(vm, provider);
                pool.placed.insert(member.clone());
            }
        }
    }
}

/// The record of every placed member of `desired` (what apply writes before it runs).
pub fn record_of(desired: &Desired) -> Record {
    desired
        .placements
        .values()
        .flat_map(|pool| pool.placed.iter())
        .filter_map(|member| {
            let vm = desired.vms.get(member)?;
            Some((member.clone(), vm.config.provider.clone()))
        })
        .collect()
}

/// Decides the provider of each member not placed yet (see the module docs), or why it
/// waits (`Desired::unplaced`; such a member is left out of the returned desired state).
/// `None` when every member is placed already.
pub fn place(
    desired: &Desired,
    observed: &Observed,
    capacities: &BTreeMap<String, Capacity>,
) -> Option<Desired> {
    if desired
        .placements
        .values()
        .all(|p| p.placed.len() == p.members.len())
    {
        return None;
    }
    let undecided: BTreeSet<&str> = desired
        .placements
        .values()
        .flat_map(|p| p.members.iter().filter(|m| !p.placed.contains(*m)))
        .map(String::as_str)
        .collect();
    // What each provider runs already: memory and vCPUs of the running VMs whose provider
    // is decided.
    let mut used: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for vm in desired.vms.values() {
        if vm.state == PowerState::Running && !undecided.contains(vm.name.as_str()) {
            let entry = used.entry(vm.config.provider.clone()).or_default();
            entry.0 += vm.config.memory_mib;
            entry.1 += u64::from(vm.config.cpus);
        }
    }
    let mut out = desired.clone();
    for (pool_name, pool) in &desired.placements {
        let mut held: BTreeMap<&str, usize> =
            pool.providers.iter().map(|p| (p.as_str(), 0)).collect();
        for member in &pool.placed {
            if let Some(vm) = desired.vms.get(member)
                && let Some(n) = held.get_mut(vm.config.provider.as_str())
            {
                *n += 1;
            }
        }
        for member in pool.members.iter().filter(|m| !pool.placed.contains(*m)) {
            let Some(vm) = desired.vms.get(member) else {
                continue;
            };
            let found = pool.providers.iter().find(|p| {
                observed
                    .find(p, member)
                    .is_some_and(|o| o.owned_by(&desired.fleet))
            });
            let unseen = pool
                .providers
                .iter()
                .find(|p| !observed.hosts.contains_key(*p));
            let choice = match (found, unseen) {
                (Some(provider), _) => Ok(provider.as_str()),
                (None, Some(provider)) => Err(format!(
                    "provider {provider} of pool {pool_name} could not be observed, and the member could be there: it is placed once every provider of the pool answers, so that it is never made twice"
                )),
                (None, None) => choose(desired, pool, &held, &used, capacities, vm)
                    .ok_or_else(|| {
                        format!(
                            "no provider of pool {pool_name} ({}) has room for another {} MiB and {} vCPU(s) (policy.overcommit applied)",
                            pool.providers.join(", "),
                            vm.config.memory_mib,
                            vm.config.cpus
                        )
                    }),
            };
            match choice {
                Ok(provider) => {
                    if let Some(placed) = out.vms.get_mut(member) {
                        set_provider(placed, provider);
                    }
                    if let Some(p) = out.placements.get_mut(pool_name) {
                        p.placed.insert(member.clone());
                    }
                    if let Some(n) = held.get_mut(provider) {
                        *n += 1;
                    }
                    if vm.state == PowerState::Running {
                        let entry = used.entry(provider.to_owned()).or_default();
                        entry.0 += vm.config.memory_mib;
                        entry.1 += u64::from(vm.config.cpus);
                    }
                }
                Err(why) => {
                    out.vms.remove(member);
                    out.unplaced.insert(member.clone(), why);
                }
            }
        }
    }
    Some(out)
}

/// The provider the strategy picks for `vm` among those with room, if any has.
fn choose<'a>(
    desired: &Desired,
    pool: &'a PoolPlacement,
    held: &BTreeMap<&str, usize>,
    used: &BTreeMap<String, (u64, u64)>,
    capacities: &BTreeMap<String, Capacity>,
    vm: &DesiredVm,
) -> Option<&'a str> {
    let (memory_ratio, cpu_ratio) = desired.policy.overcommit;
    let has_room = |provider: &str| {
        if vm.state != PowerState::Running {
            return true;
        }
        // A provider that cannot say what it holds is not judged.
        let Some(capacity) = capacities.get(provider) else {
            return true;
        };
        let (memory, cpus) = used.get(provider).copied().unwrap_or_default();
        let memory_cap = (capacity.memory_mib as f64 * memory_ratio) as u64;
        let cpu_cap = (f64::from(capacity.cpus) * cpu_ratio) as u64;
        memory + vm.config.memory_mib <= memory_cap && cpus + u64::from(vm.config.cpus) <= cpu_cap
    };
    let mut candidates = pool
        .providers
        .iter()
        .enumerate()
        .filter(|(_, p)| has_room(p));
    match pool.strategy {
        PlacementStrategy::Pack => candidates.next().map(|(_, p)| p.as_str()),
        PlacementStrategy::Spread => candidates
            .min_by_key(|(i, p)| (held.get(p.as_str()).copied().unwrap_or(0), *i))
            .map(|(_, p)| p.as_str()),
    }
}

fn set_provider(vm: &mut DesiredVm, provider: &str) {
    if vm.config.provider != provider {
        vm.config.provider = provider.to_owned();
        vm.spec_hash = vm.config.hash();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{ObservedHost, ObservedVm, Stamp};
    use crate::snapshot::{Snapshot, SourceFile};

    /// Pool `p` of `replicas` (256 MiB, 1 vCPU each) placed over `providers` of the three
    /// libvirt providers `local`, `far` and `third`.
    fn desired(replicas: u32, providers: &str, strategy: &str) -> Desired {
        let host = crate::load::load_host(
            "host.yaml",
            b"apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {name: local, type: libvirt, uri: 'test:///default'}\n    - {name: far, type: libvirt, uri: 'test:///default'}\n    - {name: third, type: libvirt, uri: 'test:///default'}\n",
        )
        .unwrap_or_else(|d| panic!("{d:#?}"));
        let files = [
            ("fleet/fleet.yaml", "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: [{name: local, type: libvirt}, {name: far, type: libvirt}, {name: third, type: libvirt}]\n  images: [{name: micro, kernel: k, initrd: i}]\n".to_owned()),
            ("fleet/vms/p.yaml", format!("apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: p}}\nspec:\n  replicas: {replicas}\n  placement: {{providers: [{providers}], strategy: {strategy}}}\n  template:\n    spec: {{provider: local, image: micro, resources: {{cpus: 1, memory: 256Mi}}}}\n")),
        ];
        let snapshot = Snapshot {
            revision: crate::snapshot::Revision {
                id: "0".repeat(40),
                label: "t".into(),
                signed_by: None,
            },
            fleet_dir: "fleet".into(),
            files: files
                .iter()
                .map(|(p, t)| SourceFile {
                    path: (*p).into(),
                    bytes: t.as_bytes().to_vec(),
                })
                .collect(),
            signers: Default::default(),
        };
        let loaded = crate::load::load(&snapshot, Some(&host)).unwrap_or_else(|d| panic!("{d:#?}"));
        crate::resolve::resolve(&loaded, &host)
    }

    /// Every provider observed, empty, but those in `down`.
    fn observed(down: &[&str]) -> Observed {
        let mut observed = Observed::default();
        for p in ["local", "far", "third"] {
            if down.contains(&p) {
                observed.unreachable.insert(p.into(), "refused".into());
            } else {
                observed.hosts.insert(p.into(), ObservedHost::default());
            }
        }
        observed
    }

    fn providers(desired: &Desired) -> Vec<(String, String)> {
        desired
            .vms
            .values()
            .map(|vm| (vm.name.clone(), vm.config.provider.clone()))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    fn capacity(memory_mib: u64) -> Capacity {
        Capacity {
            memory_mib,
            cpus: 64,
        }
    }

    #[test]
    fn spread_alternates_and_every_placed_member_is_recorded_with_its_hash() {
        let d = desired(4, "local, far", "spread");
        let placed = place(&d, &observed(&[]), &BTreeMap::new()).expect("placed");
        assert_eq!(
            providers(&placed),
            pairs(&[
                ("p-01", "local"),
                ("p-02", "far"),
                ("p-03", "local"),
                ("p-04", "far")
            ])
        );
        assert!(placed.unplaced.is_empty());
        let far = &placed.vms["p-02"];
        assert_eq!(far.spec_hash, far.config.hash());
        assert_ne!(far.spec_hash, d.vms["p-02"].spec_hash);
        assert_eq!(record_of(&placed).len(), 4);
        // Once recorded, nothing is left to place, and the same inputs give the same answer.
        let mut again = desired(4, "local, far", "spread");
        apply_record(&mut again, &record_of(&placed));
        assert!(place(&again, &observed(&[]), &BTreeMap::new()).is_none());
        assert_eq!(providers(&again), providers(&placed));
    }

    #[test]
    fn adding_members_or_providers_moves_no_placed_member() {
        let record: Record = pairs(&[("p-01", "far"), ("p-02", "far")])
            .into_iter()
            .collect();
        // Two more members: they go where the pool has fewest, the first two stay.
        let mut d = desired(4, "local, far", "spread");
        apply_record(&mut d, &record);
        let placed = place(&d, &observed(&[]), &BTreeMap::new()).expect("placed");
        assert_eq!(
            providers(&placed),
            pairs(&[
                ("p-01", "far"),
                ("p-02", "far"),
                ("p-03", "local"),
                ("p-04", "local")
            ])
        );
        // A third provider and two more members: the new members go there.
        let mut d = desired(6, "local, far, third", "spread");
        apply_record(&mut d, &record_of(&placed));
        let placed = place(&d, &observed(&[]), &BTreeMap::new()).expect("placed");
        assert_eq!(
            providers(&placed)[..4],
            pairs(&[
                ("p-01", "far"),
                ("p-02", "far"),
                ("p-03", "local"),
                ("p-04", "local")
            ])[..]
        );
        assert_eq!(placed.vms["p-05"].config.provider, "third");
        assert_eq!(placed.vms["p-06"].config.provider, "third");
    }

    #[test]
    fn a_member_found_on_a_provider_stays_there_and_one_that_may_be_unseen_waits() {
        // Made before its record was kept (or the record was lost): found on far.
        let mut found = observed(&[]);
        let stamp = Stamp {
            fleet: "lab".into(),
            name: "p-01".into(),
            spec_hash: String::new(),
            revision: String::new(),
            protect: false,
            config: None,
            created: None,
            adopted: false,
        };
        found.hosts.get_mut("far").expect("far").vms.push(
            ObservedVm {
                name: "p-01".into(),
                uuid: String::new(),
                running: true,
                cpus: 1,
                memory_mib: 256,
                stamp: Some(stamp.into()),
            }
            .into(),
        );
        let d = desired(2, "local, far", "spread");
        let placed = place(&d, &found, &BTreeMap::new()).expect("placed");
        assert_eq!(
            providers(&placed),
            pairs(&[("p-01", "far"), ("p-02", "local")])
        );

        // far cannot be observed: the recorded member keeps it, unknown; a new one waits.
        let mut d = desired(2, "local, far", "spread");
        apply_record(&mut d, &[("p-01".to_owned(), "far".to_owned())].into());
        let placed = place(&d, &observed(&["far"]), &BTreeMap::new()).expect("placed");
        assert_eq!(providers(&placed), pairs(&[("p-01", "far")]));
        let why = &placed.unplaced["p-02"];
        assert!(
            why.contains("provider far of pool p could not be observed"),
            "{why}"
        );
        assert!(!record_of(&placed).contains_key("p-02"));
    }

    #[test]
    fn pack_fills_providers_in_order_and_a_full_fleet_waits() {
        let d = desired(4, "local, far", "pack");
        let room = BTreeMap::from([
            ("local".to_owned(), capacity(600)),
            ("far".to_owned(), capacity(600)),
        ]);
        let placed = place(&d, &observed(&[]), &room).expect("placed");
        assert_eq!(
            providers(&placed),
            pairs(&[
                ("p-01", "local"),
                ("p-02", "local"),
                ("p-03", "far"),
                ("p-04", "far")
            ])
        );
        // Room for three in all: the fourth waits, and says why.
        let room = BTreeMap::from([
            ("local".to_owned(), capacity(600)),
            ("far".to_owned(), capacity(300)),
        ]);
        let placed = place(&d, &observed(&[]), &room).expect("placed");
        assert_eq!(placed.vms.len(), 3);
        let why = &placed.unplaced["p-04"];
        assert!(
            why.contains("no provider of pool p (local, far) has room for another 256 MiB"),
            "{why}"
        );
        // Spread skips a full provider too.
        let d = desired(3, "local, far", "spread");
        let room = BTreeMap::from([("far".to_owned(), capacity(200))]);
        let placed = place(&d, &observed(&[]), &room).expect("placed");
        assert!(placed.vms.values().all(|vm| vm.config.provider == "local"));
    }

    #[test]
    fn a_record_naming_a_provider_the_pool_no_longer_lists_is_not_followed() {
        let mut d = desired(1, "local", "spread");
        apply_record(&mut d, &[("p-01".to_owned(), "far".to_owned())].into());
        assert!(d.placements["p"].placed.is_empty());
        let placed = place(&d, &observed(&[]), &BTreeMap::new()).expect("placed");
        assert_eq!(placed.vms["p-01"].config.provider, "local");
    }
}
