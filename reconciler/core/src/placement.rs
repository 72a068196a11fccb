//! Pools spread over providers (`placement: {providers, strategy}` on a VMPool).
//!
//! A member's provider is decided once and then kept. Resolve gives every member its
//! template's provider for the time being. `apply_record` then sets the provider the status
//! directory records for it (`placement.yaml`, written by apply before the step that makes
//! the member). After observing, `place` decides for each member not recorded:
//!
//! 1. found (with this fleet's stamp) on one of the pool's providers: there;
//! 2. any of the pool's providers, or the provider the record names when the pool no
//!    longer lists it, could not be observed: it waits (the member could be there), and
//!    the plan says why;
//! 3. otherwise by the strategy, among the providers with room for it (node info with
//!    `policy.overcommit`, less what the revision runs there; a provider that cannot say
//!    has none) and no VM of its name fleet did not make: `spread`, the one holding the
//!    fewest of the pool's members (ties go to the earlier in the list); `pack`, the first
//!    in the list. None: it waits.
//!
//! A recorded member found on another of its pool's providers, once the recorded one
//! answered without it, is where it was found. A member's domain type is its provider's.
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
    let members: Vec<(String, String)> = desired
        .placements
        .values()
        .flat_map(|pool| {
            pool.members.iter().filter_map(|member| {
                let provider = record.get(member)?;
                pool.providers
                    .contains(provider)
                    .then(|| (member.clone(), provider.clone()))
            })
        })
        .collect();
    for (member, provider) in members {
        set_provider(desired, &member, &provider);
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
/// waits (`Desired::unplaced`; such a member is left out of the returned desired state),
/// and moves the record of a member found on another of its pool's providers than the
/// one recorded, once the recorded one answered without it. `None`: nothing to change.
/// `record` is what `apply_record` was given (a member recorded on a provider its pool no
/// longer lists waits while that provider cannot be observed).
pub fn place(
    desired: &Desired,
    record: &Record,
    observed: &Observed,
    capacities: &BTreeMap<String, Capacity>,
) -> Option<Desired> {
    if desired.placements.is_empty() {
        return None;
    }
    let undecided: BTreeSet<&str> = desired
        .placements
        .values()
        .flat_map(|p| p.members.iter().filter(|m| !p.placed.contains(*m)))
        .map(String::as_str)
        .collect();
    let mut used = used_by_decided(desired, &undecided);
    let owned = |provider: &str, member: &str| {
        observed
            .find(provider, member)
            .is_some_and(|o| o.owned_by(&desired.fleet))
    };
    let mut out = desired.clone();
    let mut changed = !undecided.is_empty();
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
        for member in &pool.members {
            let Some(vm) = desired.vms.get(member) else {
                continue;
            };
            let found = pool.providers.iter().find(|p| owned(p, member));
            if pool.placed.contains(member) {
                // Recorded on a provider that answered without it, and found on another
                // of the pool's: it is where it was found (not made a second time).
                let recorded = vm.config.provider.as_str();
                if let Some(found) = found
                    && found != recorded
                    && observed.hosts.contains_key(recorded)
                    && !owned(recorded, member)
                {
                    set_provider(&mut out, member, found);
                    changed = true;
                }
                continue;
            }
            let unseen = pool
                .providers
                .iter()
                .map(String::as_str)
                // A provider of the revision the pool no longer lists, recorded as the
                // member's: it may still run it.
                .chain(
                    record
                        .get(member)
                        .map(String::as_str)
                        .filter(|p| desired.providers.iter().any(|d| d.name() == *p)),
                )
                .find(|p| !observed.hosts.contains_key(*p));
            let choice = match (found, unseen) {
                (Some(provider), _) => Ok(provider.as_str()),
                (None, Some(provider)) => Err(format!(
                    "provider {provider} of pool {pool_name} could not be observed, and the member could be there: it is placed once every provider of the pool answers, so that it is never made twice"
                )),
                (None, None) => {
                    choose(desired, pool, &held, &used, capacities, observed, vm).ok_or_else(|| {
                        format!(
                            "no provider of pool {pool_name} ({}) has room for another {} MiB and {} vCPU(s) (policy.overcommit applied), or each holds a VM of that name fleet did not make",
                            pool.providers.join(", "),
                            vm.config.memory_mib,
                            vm.config.cpus
                        )
                    })
                }
            };
            match choice {
                Ok(provider) => {
                    set_provider(&mut out, member, provider);
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
    changed.then_some(out)
}

/// What each provider runs already: memory and vCPUs of the running VMs whose provider is
/// decided, and the fresh pools' reservations (`fresh.max + fresh.warm` members).
fn used_by_decided(desired: &Desired, undecided: &BTreeSet<&str>) -> BTreeMap<String, (u64, u64)> {
    let mut used: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for vm in desired.vms.values() {
        if vm.state == PowerState::Running && !undecided.contains(vm.name.as_str()) {
            let entry = used.entry(vm.config.provider.clone()).or_default();
            entry.0 += vm.config.memory_mib;
            entry.1 += u64::from(vm.config.cpus);
        }
    }
    for pool in desired.fresh_pools.values() {
        let members = u64::from(pool.max) + u64::from(pool.warm);
        let entry = used
            .entry(pool.template.config.provider.clone())
            .or_default();
        entry.0 += members * pool.template.config.memory_mib;
        entry.1 += members * u64::from(pool.template.config.cpus);
    }
    used
}

/// The provider the strategy picks for `vm` among those with room for it (a provider that
/// cannot say what it holds has none) and no VM of its name that fleet did not make.
fn choose<'a>(
    desired: &Desired,
    pool: &'a PoolPlacement,
    held: &BTreeMap<&str, usize>,
    used: &BTreeMap<String, (u64, u64)>,
    capacities: &BTreeMap<String, Capacity>,
    observed: &Observed,
    vm: &DesiredVm,
) -> Option<&'a str> {
    let (memory_ratio, cpu_ratio) = desired.policy.overcommit;
    let has_room = |provider: &str| {
        let Some(capacity) = capacities.get(provider) else {
            return false;
        };
        if vm.state != PowerState::Running {
            return true;
        }
        let (memory, cpus) = used.get(provider).copied().unwrap_or_default();
        let memory_cap = (capacity.memory_mib as f64 * memory_ratio) as u64;
        let cpu_cap = (f64::from(capacity.cpus) * cpu_ratio) as u64;
        memory + vm.config.memory_mib <= memory_cap && cpus + u64::from(vm.config.cpus) <= cpu_cap
    };
    let name_free = |provider: &str| observed.find(provider, &vm.name).is_none();
    let mut candidates = pool
        .providers
        .iter()
        .enumerate()
        .filter(|(_, p)| has_room(p) && name_free(p));
    match pool.strategy {
        PlacementStrategy::Pack => candidates.next().map(|(_, p)| p.as_str()),
        PlacementStrategy::Spread => candidates
            .min_by_key(|(i, p)| (held.get(p.as_str()).copied().unwrap_or(0), *i))
            .map(|(_, p)| p.as_str()),
    }
}

/// Puts member `name` on `provider` (with that provider's domain type) and marks it placed.
fn set_provider(desired: &mut Desired, name: &str, provider: &str) {
    let domain_type = desired
        .providers
        .iter()
        .find(|p| p.name() == provider)
        .map(|p| p.domain_type);
    if let Some(vm) = desired.vms.get_mut(name) {
        vm.config.provider = provider.to_owned();
        if let Some(domain_type) = domain_type {
            vm.config.domain_type = domain_type;
        }
        vm.spec_hash = vm.config.hash();
    }
    if let Some(pool) = desired
        .placements
        .values_mut()
        .find(|p| p.members.iter().any(|m| m == name))
    {
        pool.placed.insert(name.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{ObservedHost, ObservedVm, Stamp};

    /// Pool `p` of `replicas` (256 MiB, 1 vCPU each) placed over `providers` of the three
    /// libvirt providers `local`, `far` and `third`.
    fn desired(replicas: u32, providers: &str, strategy: &str) -> Desired {
        let host = crate::load::load_host(
            "host.yaml",
            b"apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {name: local, type: libvirt, uri: 'test:///default'}\n    - {name: far, type: libvirt, uri: 'test:///default'}\n    - {name: third, type: libvirt, uri: 'test:///default'}\n",
        )
        .unwrap_or_else(|d| panic!("{d:#?}"));
        let files = [
            ("fleet/fleet.yaml", "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: [{name: local, type: libvirt}, {name: far, type: libvirt}, {name: third, type: libvirt, domainType: kvm}]\n  images: [{name: micro, kernel: k, initrd: i}]\n".to_owned()),
            ("fleet/vms/p.yaml", format!("apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: p}}\nspec:\n  replicas: {replicas}\n  placement: {{providers: [{providers}], strategy: {strategy}}}\n  template:\n    spec: {{provider: local, image: micro, resources: {{cpus: 1, memory: 256Mi}}}}\n")),
        ];
        let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        crate::resolve::tests_support::desired_under(&host, &files)
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

    /// Room for everything on every provider.
    fn roomy() -> BTreeMap<String, Capacity> {
        ["local", "far", "third"]
            .into_iter()
            .map(|p| (p.to_owned(), capacity(1 << 20)))
            .collect()
    }

    #[test]
    fn spread_alternates_and_every_placed_member_is_recorded_with_its_hash() {
        let d = desired(4, "local, far", "spread");
        let placed = place(&d, &Record::new(), &observed(&[]), &roomy()).expect("placed");
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
        assert!(place(&again, &Record::new(), &observed(&[]), &roomy()).is_none());
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
        let placed = place(&d, &Record::new(), &observed(&[]), &roomy()).expect("placed");
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
        let placed = place(&d, &Record::new(), &observed(&[]), &roomy()).expect("placed");
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
        // Made as its provider makes VMs.
        assert_eq!(
            placed.vms["p-05"].config.domain_type,
            crate::spec::DomainType::Kvm
        );
        assert_eq!(
            placed.vms["p-01"].config.domain_type,
            crate::spec::DomainType::default()
        );
    }

    #[test]
    fn a_member_found_on_a_provider_stays_there_and_one_that_may_be_unseen_waits() {
        // Made before its record was kept (or the record was lost): found on far.
        let mut found = observed(&[]);
        found
            .hosts
            .get_mut("far")
            .expect("far")
            .vms
            .push(owned_vm("p-01"));
        let d = desired(2, "local, far", "spread");
        let placed = place(&d, &Record::new(), &found, &roomy()).expect("placed");
        assert_eq!(
            providers(&placed),
            pairs(&[("p-01", "far"), ("p-02", "local")])
        );

        // far cannot be observed: the recorded member keeps it, unknown; a new one waits.
        let mut d = desired(2, "local, far", "spread");
        apply_record(&mut d, &[("p-01".to_owned(), "far".to_owned())].into());
        let placed = place(&d, &Record::new(), &observed(&["far"]), &roomy()).expect("placed");
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
        let placed = place(&d, &Record::new(), &observed(&[]), &room).expect("placed");
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
        let placed = place(&d, &Record::new(), &observed(&[]), &room).expect("placed");
        assert_eq!(placed.vms.len(), 3);
        let why = &placed.unplaced["p-04"];
        assert!(
            why.contains("no provider of pool p (local, far) has room for another 256 MiB"),
            "{why}"
        );
        // Spread skips a full provider too.
        let d = desired(3, "local, far", "spread");
        let mut room = roomy();
        room.insert("far".to_owned(), capacity(200));
        let placed = place(&d, &Record::new(), &observed(&[]), &room).expect("placed");
        assert!(placed.vms.values().all(|vm| vm.config.provider == "local"));
    }

    fn owned_vm(name: &str) -> std::sync::Arc<ObservedVm> {
        ObservedVm {
            name: name.into(),
            uuid: String::new(),
            running: true,
            cpus: 1,
            memory_mib: 256,
            stamp: Some(
                Stamp {
                    fleet: "lab".into(),
                    name: name.into(),
                    spec_hash: String::new(),
                    revision: String::new(),
                    protect: false,
                    config: None,
                    created: None,
                    adopted: false,
                }
                .into(),
            ),
        }
        .into()
    }

    #[test]
    fn a_recorded_member_found_elsewhere_is_where_it_was_found() {
        let record: Record = pairs(&[("p-01", "far")]).into_iter().collect();
        let mut d = desired(1, "local, far", "spread");
        apply_record(&mut d, &record);
        let mut seen = observed(&[]);
        seen.hosts
            .get_mut("local")
            .expect("local")
            .vms
            .push(owned_vm("p-01"));
        let placed = place(&d, &record, &seen, &roomy()).expect("moved");
        assert_eq!(placed.vms["p-01"].config.provider, "local");
        assert_eq!(record_of(&placed)["p-01"], "local");
        // While far cannot be observed, the record stands.
        let mut unseen = seen.clone();
        unseen.hosts.remove("far");
        assert!(place(&d, &record, &unseen, &roomy()).is_none());
    }

    #[test]
    fn a_provider_holding_the_name_of_a_vm_fleet_did_not_make_is_passed_over() {
        let d = desired(1, "local, far", "spread");
        let mut seen = observed(&[]);
        let mut foreign = (*owned_vm("p-01")).clone();
        foreign.stamp = None;
        seen.hosts
            .get_mut("local")
            .expect("local")
            .vms
            .push(foreign.into());
        let placed = place(&d, &Record::new(), &seen, &roomy()).expect("placed");
        assert_eq!(placed.vms["p-01"].config.provider, "far");
    }

    #[test]
    fn a_member_recorded_on_a_provider_no_longer_listed_waits_while_it_is_unseen() {
        let record: Record = pairs(&[("p-01", "far")]).into_iter().collect();
        let mut d = desired(1, "local", "spread");
        apply_record(&mut d, &record);
        let placed = place(&d, &record, &observed(&["far"]), &roomy()).expect("placed");
        assert!(placed.vms.is_empty());
        assert!(placed.unplaced["p-01"].contains("provider far"));
    }

    #[test]
    fn the_capacity_check_counts_placed_members_where_they_are_and_the_rest_per_pool() {
        let room = BTreeMap::from([
            ("local".to_owned(), capacity(600)),
            ("far".to_owned(), capacity(600)),
        ]);
        // Four of 256 MiB fit two hosts of 600 MiB, two on each, though not on one.
        let d = desired(4, "local, far", "spread");
        assert_eq!(
            crate::resolve::capacity_problems(&d, &room),
            Vec::<String>::new()
        );
        // Five do not, and the check says so before any is placed.
        let d = desired(5, "local, far", "spread");
        let problems = crate::resolve::capacity_problems(&d, &room);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("pool p: with its 5 member(s) not placed yet"),
            "{problems:?}"
        );
        // Placed members count on their host: three recorded on local do not fit it.
        let mut d = desired(3, "local, far", "spread");
        let record: Record = pairs(&[("p-01", "local"), ("p-02", "local"), ("p-03", "local")])
            .into_iter()
            .collect();
        apply_record(&mut d, &record);
        let problems = crate::resolve::capacity_problems(&d, &room);
        assert!(
            problems.iter().any(|p| p.starts_with("provider local:")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_record_naming_a_provider_the_pool_no_longer_lists_is_not_followed() {
        let mut d = desired(1, "local", "spread");
        apply_record(&mut d, &[("p-01".to_owned(), "far".to_owned())].into());
        assert!(d.placements["p"].placed.is_empty());
        let placed = place(&d, &Record::new(), &observed(&[]), &roomy()).expect("placed");
        assert_eq!(placed.vms["p-01"].config.provider, "local");
    }
}
