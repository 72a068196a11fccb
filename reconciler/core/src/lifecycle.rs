//! Fresh members: VMs a pool makes for one task run each (a task with
//! `vm: {pool: NAME, fresh: true}`), and the warm ones it keeps booted for the next run.
//!
//! Which members should exist follows from the runs the status directory records, the
//! pools' settings and what the providers report, so it survives a crash of fleet like the
//! rest of the plan: a member is named `<pool>-f<N>` when a run is given it (recorded in
//! the run's record before anything is created) or when the plan adds a warm one (the name
//! then exists on the provider from the create's first step), and a number once seen is
//! never handed out again while a record or a VM still shows it. So a crash never makes a
//! second member for a run, and a member no run holds is destroyed by the next plan.
//!
//! Architecture invariant: pure. The clock is an argument.

use std::collections::{BTreeMap, BTreeSet};

use crate::observe::Observed;
use crate::resolve::{Desired, DesiredVm};
use crate::time::Timestamp;

/// Runs holding a member at once when the pool does not say (`fresh.max`).
pub const DEFAULT_MAX: u32 = 4;

/// The name of a pool's fresh member number `seq`.
pub fn member_name(pool: &str, seq: u64) -> String {
    format!("{pool}-f{seq}")
}

/// The number of `name` when it is one of `pool`'s fresh members (`<pool>-f<N>`, N written
/// without leading zeros).
pub fn member_seq(pool: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(pool)?.strip_prefix("-f")?;
    // At most 9 digits: numbers never overflow, whatever names are in sight.
    let canonical = (1..=9).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

/// A pool that makes fresh members, as a revision sets it.
#[derive(Clone, Debug, PartialEq)]
pub struct FreshPool {
    /// Runs that may hold a member at once.
    pub max: u32,
    /// Idle members kept booted.
    pub warm: u32,
    /// What every member is: the pool's template resolved (`config.fresh` set). Its name is
    /// the pool's; `instance` names a member.
    pub template: DesiredVm,
    /// A brokered template's egress policy, each member's.
    pub egress: Option<crate::egress::Policy>,
}

impl FreshPool {
    pub fn instance(&self, name: &str) -> DesiredVm {
        DesiredVm {
            name: name.to_owned(),
            ..self.template.clone()
        }
    }
}

/// A fresh run as the status directory records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreshRun {
    pub task: String,
    pub pool: String,
    /// The member it was given; `None` while it waits for one.
    pub member: Option<String>,
    /// When the run ended (`None`: it has not).
    pub finished: Option<Timestamp>,
    /// How long its member outlives it (`keepFor`).
    pub keep_for: std::time::Duration,
}

impl FreshRun {
    /// Whether the run still needs its member at `now`.
    pub fn holds(&self, now: Timestamp) -> bool {
        match self.finished {
            None => true,
            Some(end) => now.system_time() < end.system_time() + self.keep_for,
        }
    }

    /// Whether the run counts against its pool's `max`: it holds a member (kept ones
    /// included, so `max + warm` bounds the pool's members).
    fn counts(&self, now: Timestamp) -> bool {
        self.member.is_some() && self.holds(now)
    }
}

/// The members a pass wants, and what the task book needs to give members to new runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Members {
    /// Every member that should exist: held by a run, or warm.
    pub vms: Vec<DesiredVm>,
    /// Per pool: the warm members no run holds, those already running first.
    pub idle: BTreeMap<String, Vec<String>>,
    /// Per pool: the next member number never seen.
    pub next: BTreeMap<String, u64>,
}

impl Members {
    /// `desired` with the members added (a member never replaces a declared VM: the loader
    /// refuses declared names of the member form).
    pub fn add_to(&self, desired: &Desired) -> Desired {
        let mut with = desired.clone();
        for vm in &self.vms {
            if with.vms.contains_key(&vm.name) {
                continue;
            }
            let pool = vm
                .config
                .pool
                .as_deref()
                .and_then(|p| desired.fresh_pools.get(p));
            if let Some(policy) = pool.and_then(|p| p.egress.clone()) {
                with.egress.insert(vm.name.clone(), policy);
            }
            with.vms.insert(vm.name.clone(), vm.clone());
        }
        with
    }
}

/// Whether `vm` is a fresh member of `pool` that this fleet made: its stamp says so, not
/// only its name.
pub fn is_member_of(vm: &crate::observe::ObservedVm, fleet: &str, pool: &str) -> bool {
    vm.owned_by(fleet)
        && member_seq(pool, &vm.name).is_some()
        && vm
            .stamp
            .as_ref()
            .and_then(|s| s.config.as_ref())
            .is_some_and(|c| c.fresh && c.pool.as_deref() == Some(pool))
}

/// The members `desired`'s pools should have at `now`: each run's that still holds one,
/// then, per pool, `warm` idle members (those that exist first, lowest numbers first; new
/// ones numbered past everything seen).
///
/// A held member stays where and as it was made (found on any provider by its stamp), so a
/// template change, a pool moved to another provider or a pool removed never replaces or
/// destroys a member under its run. An ended run's member (kept for `keepFor`) is held
/// only while it exists: it is never made again.
pub fn members(
    desired: &Desired,
    runs: &[FreshRun],
    observed: &Observed,
    now: Timestamp,
) -> Members {
    let mut out = Members::default();
    let find_member = |pool: &str, name: &str| {
        observed
            .hosts
            .values()
            .flat_map(|h| h.vms.iter())
            .find(|vm| vm.name == name && is_member_of(vm, &desired.fleet, pool))
    };
    // Held members of pools this revision no longer makes fresh members in: kept as they
    // are until their runs let them go.
    for run in runs
        .iter()
        .filter(|r| !desired.fresh_pools.contains_key(&r.pool))
    {
        let Some(name) = run.member.as_deref().filter(|_| run.holds(now)) else {
            continue;
        };
        if let Some(made) = find_member(&run.pool, name).and_then(|vm| as_made(vm)) {
            out.vms.push(made);
        }
    }
    for (pool_name, pool) in &desired.fresh_pools {
        let runs_here: Vec<&FreshRun> = runs.iter().filter(|r| &r.pool == pool_name).collect();
        for run in runs_here.iter().filter(|r| r.holds(now)) {
            let Some(name) = run.member.as_deref() else {
                continue;
            };
            match find_member(pool_name, name) {
                // A held member keeps what it was made with: a template change is for the
                // members made after it, never a replace under a run.
                Some(vm) => out.vms.push(match as_made(vm) {
                    Some(made) => DesiredVm {
                        config: made.config,
                        spec_hash: made.spec_hash,
                        ..pool.instance(name)
                    },
                    None => pool.instance(name),
                }),
                None if run.finished.is_none() => out.vms.push(pool.instance(name)),
                None => {}
            }
        }
        // Idle candidates: this pool's members on its provider, by number.
        let mut existing: Vec<(u64, &str, bool)> = observed
            .hosts
            .get(&pool.template.config.provider)
            .into_iter()
            .flat_map(|h| h.vms.iter())
            .filter(|vm| is_member_of(vm, &desired.fleet, pool_name))
            .filter_map(|vm| {
                Some((
                    member_seq(pool_name, &vm.name)?,
                    vm.name.as_str(),
                    vm.running,
                ))
            })
            .collect();
        existing.sort();
        // Every number in sight, whoever's VM bears it, is taken.
        let seen = observed
            .hosts
            .values()
            .flat_map(|h| h.vms.iter())
            .filter_map(|vm| member_seq(pool_name, &vm.name))
            .chain(
                runs.iter()
                    .filter_map(|r| member_seq(pool_name, r.member.as_deref()?)),
            )
            .max();
        let mut next = seen.map_or(1, |s| s + 1);
        // A member a run was given is that run's: never warm again, whatever became of it.
        let given: BTreeSet<&str> = runs.iter().filter_map(|r| r.member.as_deref()).collect();
        let mut idle: Vec<(bool, u64, String)> = existing
            .iter()
            .filter(|(_, name, _)| !given.contains(name))
            .take(pool.warm as usize)
            .map(|(seq, name, running)| (!running, *seq, (*name).to_owned()))
            .collect();
        while idle.len() < pool.warm as usize {
            idle.push((true, next, member_name(pool_name, next)));
            next += 1;
        }
        idle.sort();
        let idle: Vec<String> = idle.into_iter().map(|(.., name)| name).collect();
        out.vms.extend(idle.iter().map(|name| pool.instance(name)));
        out.idle.insert(pool_name.clone(), idle);
        out.next.insert(pool_name.clone(), next);
    }
    out
}

/// A member as its stamp says it was made (`None` when the stamp has no configuration).
fn as_made(vm: &crate::observe::ObservedVm) -> Option<DesiredVm> {
    let stamp = vm.stamp.as_ref().filter(|s| !s.spec_hash.is_empty())?;
    let config = stamp.config.clone()?;
    Some(DesiredVm {
        name: vm.name.clone(),
        state: crate::spec::PowerState::Running,
        secrets: Vec::new(),
        spec_hash: stamp.spec_hash.clone(),
        source: String::new(),
        config,
    })
}

/// What a new run of `pool` gets: an idle warm member (taken off `idle`), a new member
/// numbered `next` (which is then advanced), or why it waits.
pub fn assign(
    pool_name: &str,
    pool: &FreshPool,
    runs: &[FreshRun],
    idle: &mut Vec<String>,
    next: &mut u64,
    now: Timestamp,
) -> Result<String, String> {
    let holding = runs
        .iter()
        .filter(|r| r.pool == pool_name && r.counts(now))
        .count();
    if holding >= pool.max as usize {
        return Err(format!(
            "waiting for a member of pool {pool_name}: {holding} runs hold one, kept ones included (fresh.max is {})",
            pool.max
        ));
    }
    if !idle.is_empty() {
        return Ok(idle.remove(0));
    }
    let name = member_name(pool_name, *next);
    *next += 1;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{ObservedHost, ObservedVm, Stamp};
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> Timestamp {
        Timestamp::from(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn desired(warm: u32, max: u32) -> Desired {
        let pool = format!(
            "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: sandbox}}\nspec:\n  replicas: 0\n  fresh: {{max: {max}, warm: {warm}}}\n  template:\n    spec: {{provider: local, image: micro}}\n"
        );
        crate::resolve::tests_support::desired_of(&[
            (
                "fleet/fleet.yaml",
                "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: [{name: local, type: libvirt}]\n  images: [{name: micro, kernel: k, initrd: i}]\n",
            ),
            ("fleet/vms/sandbox.yaml", &pool),
            (
                "fleet/tasks/t.yaml",
                "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: t}\nspec:\n  vm: {pool: sandbox, fresh: true, keepFor: 1m}\n  command: [\"true\"]\n",
            ),
        ])
    }

    #[test]
    fn a_fresh_task_resolves_to_its_pool_and_the_pool_to_a_template() {
        let d = desired(2, 3);
        let task = &d.tasks["t"];
        assert_eq!(task.vm, "sandbox");
        let fresh = task.fresh.as_ref().expect("fresh");
        assert_eq!(
            (fresh.pool.as_str(), fresh.keep_for.as_secs()),
            ("sandbox", 60)
        );
        let pool = &d.fresh_pools["sandbox"];
        assert_eq!((pool.max, pool.warm), (3, 2));
        assert!(pool.template.config.fresh);
        assert_eq!(pool.template.config.pool.as_deref(), Some("sandbox"));
        assert!(d.vms.is_empty(), "members are not declared VMs");
    }

    fn observed(desired: &Desired, members: &[(&str, bool)]) -> Observed {
        let vms = members
            .iter()
            .map(|(name, running)| {
                let vm = desired.fresh_pools["sandbox"].instance(name);
                Arc::new(ObservedVm {
                    name: (*name).into(),
                    uuid: format!("uuid-{name}"),
                    running: *running,
                    cpus: vm.config.cpus,
                    memory_mib: vm.config.memory_mib,
                    stamp: Some(Arc::new(Stamp {
                        fleet: desired.fleet.clone(),
                        name: (*name).into(),
                        spec_hash: vm.spec_hash.clone(),
                        revision: "r".into(),
                        protect: false,
                        config: Some(vm.config.clone()),
                        created: None,
                        adopted: false,
                    })),
                })
            })
            .collect();
        let provider = desired.fresh_pools["sandbox"]
            .template
            .config
            .provider
            .clone();
        Observed {
            hosts: BTreeMap::from([(
                provider,
                ObservedHost {
                    vms,
                    ..Default::default()
                },
            )]),
            unreachable: BTreeMap::new(),
        }
    }

    fn run(task: &str, member: Option<&str>, finished: Option<u64>, keep: u64) -> FreshRun {
        FreshRun {
            task: task.into(),
            pool: "sandbox".into(),
            member: member.map(Into::into),
            finished: finished.map(at),
            keep_for: Duration::from_secs(keep),
        }
    }

    fn names(m: &Members) -> Vec<&str> {
        m.vms.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn member_names_round_trip_and_nothing_else_is_a_member() {
        assert_eq!(member_seq("sandbox", &member_name("sandbox", 12)), Some(12));
        for other in [
            "sandbox-f1234567890",
            "sandbox-01",
            "sandbox-f",
            "sandbox-f01",
            "sandbox-fx",
            "box-f1",
            "sandbox-f1-a",
        ] {
            assert_eq!(member_seq("sandbox", other), None, "{other}");
        }
        // A pool whose name extends another's: its members are not the shorter pool's.
        assert_eq!(member_seq("sandbox", "sandbox-f-f1"), None);
    }

    #[test]
    fn a_run_holds_its_member_until_it_ends_and_for_keep_for_after() {
        let d = desired(0, 4);
        let o = observed(&d, &[("sandbox-f1", true), ("sandbox-f2", true)]);
        let runs = [
            run("a", Some("sandbox-f1"), None, 0),
            run("b", Some("sandbox-f2"), Some(100), 60),
        ];
        assert_eq!(
            names(&members(&d, &runs, &o, at(150))),
            ["sandbox-f1", "sandbox-f2"]
        );
        // Past keepFor, b's member is no longer wanted: the plan destroys it.
        assert_eq!(names(&members(&d, &runs, &o, at(160))), ["sandbox-f1"]);
        // With a warm member wanted, an ended run's member is not it: a new one is made.
        let d = desired(1, 4);
        let m = members(&d, &runs, &o, at(160));
        assert_eq!(names(&m), ["sandbox-f1", "sandbox-f3"]);
    }

    #[test]
    fn warm_members_fill_up_past_every_number_seen_and_a_taken_one_is_replaced() {
        let d = desired(2, 4);
        let none = observed(&d, &[]);
        let m = members(&d, &[], &none, at(0));
        assert_eq!(names(&m), ["sandbox-f1", "sandbox-f2"]);
        // f1 and f2 exist (f2 booted first); a run took f2; a record names f7.
        let o = observed(&d, &[("sandbox-f1", false), ("sandbox-f2", true)]);
        let runs = [
            run("a", Some("sandbox-f2"), None, 0),
            run("old", Some("sandbox-f7"), Some(0), 0),
        ];
        let m = members(&d, &runs, &o, at(10));
        assert_eq!(names(&m), ["sandbox-f2", "sandbox-f1", "sandbox-f8"]);
        assert_eq!(m.idle["sandbox"], ["sandbox-f1", "sandbox-f8"]);
        assert_eq!(m.next["sandbox"], 9);
        // Running warm members are handed out first.
        let o = observed(&d, &[("sandbox-f1", false), ("sandbox-f2", true)]);
        let m = members(&d, &[], &o, at(10));
        assert_eq!(m.idle["sandbox"], ["sandbox-f2", "sandbox-f1"]);
    }

    #[test]
    fn a_held_member_keeps_its_configuration_when_the_template_changes() {
        let mut d = desired(1, 4);
        let o = observed(&d, &[("sandbox-f1", true), ("sandbox-f2", true)]);
        let pool = d.fresh_pools.get_mut("sandbox").expect("pool");
        pool.template.config.memory_mib = 4096;
        pool.template.spec_hash = pool.template.config.hash();
        let m = members(&d, &[run("a", Some("sandbox-f1"), None, 0)], &o, at(0));
        assert_eq!(m.vms[0].name, "sandbox-f1");
        assert_eq!(m.vms[0].config.memory_mib, 512, "held: as made");
        assert_eq!(m.vms[1].name, "sandbox-f2");
        assert_eq!(
            m.vms[1].config.memory_mib, 4096,
            "idle: replaced to the new template"
        );
    }

    #[test]
    fn only_stamped_members_are_members_and_every_name_in_sight_is_taken() {
        let d = desired(1, 4);
        // f1: a declared VM of this fleet that merely has a member's name; f2: a foreign VM.
        let mut o = observed(&d, &[("sandbox-f1", true), ("sandbox-f2", true)]);
        let host = o.hosts.values_mut().next().expect("host");
        let declared = Arc::make_mut(&mut host.vms[0]);
        if let Some(stamp) = declared.stamp.as_mut() {
            let stamp = Arc::make_mut(stamp);
            if let Some(config) = stamp.config.as_mut() {
                config.fresh = false;
            }
        }
        Arc::make_mut(&mut host.vms[1]).stamp = None;
        let m = members(&d, &[], &o, at(0));
        assert_eq!(
            m.idle["sandbox"],
            ["sandbox-f3"],
            "neither is warm; both numbers are taken"
        );
    }

    #[test]
    fn a_held_member_outlives_its_pool_and_an_ended_runs_gone_member_is_not_made_again() {
        let d = desired(0, 4);
        let o = observed(&d, &[("sandbox-f1", true)]);
        let runs = [
            run("a", Some("sandbox-f1"), None, 0),
            run("b", Some("sandbox-f2"), Some(0), 3600),
        ];
        // b's member is gone (an operator removed it): kept, but never made again.
        assert_eq!(names(&members(&d, &runs, &o, at(10))), ["sandbox-f1"]);
        // The pool is removed while a runs: its member stays, as it was made.
        let mut without = d.clone();
        without.fresh_pools.clear();
        let m = members(&without, &runs, &o, at(10));
        assert_eq!(names(&m), ["sandbox-f1"]);
        assert!(m.vms[0].config.fresh);
        // Once a has ended, nothing holds it.
        let ended = [run("a", Some("sandbox-f1"), Some(5), 0)];
        assert!(members(&without, &ended, &o, at(10)).vms.is_empty());
    }

    #[test]
    fn capacity_counts_a_fresh_pool_at_max_plus_warm() {
        let d = desired(2, 4);
        let host = crate::observe::Capacity {
            memory_mib: 2048,
            cpus: 64,
        };
        let problems =
            crate::resolve::capacity_problems(&d, &BTreeMap::from([("local".to_owned(), host)]));
        assert!(
            problems[0].contains(
                "its 6 running VMs (fresh pools counted at fresh.max + fresh.warm) ask for 3072 MiB"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn members_beyond_warm_that_no_run_holds_are_not_wanted() {
        let d = desired(1, 4);
        let o = observed(
            &d,
            &[
                ("sandbox-f1", true),
                ("sandbox-f2", true),
                ("sandbox-f3", true),
            ],
        );
        assert_eq!(names(&members(&d, &[], &o, at(0))), ["sandbox-f1"]);
    }

    #[test]
    fn assignment_takes_a_warm_member_then_a_new_number_then_waits_at_max() {
        let d = desired(1, 2);
        let pool = &d.fresh_pools["sandbox"];
        let mut idle = vec!["sandbox-f1".to_owned()];
        let mut next = 2;
        let mut runs = Vec::new();
        for task in ["a", "b"] {
            let member =
                assign("sandbox", pool, &runs, &mut idle, &mut next, at(0)).expect("member");
            runs.push(run(task, Some(&member), None, 0));
        }
        assert_eq!(runs[0].member.as_deref(), Some("sandbox-f1"));
        assert_eq!(runs[1].member.as_deref(), Some("sandbox-f2"));
        let why = assign("sandbox", pool, &runs, &mut idle, &mut next, at(0)).expect_err("full");
        assert!(
            why.contains("2 runs hold one, kept ones included (fresh.max is 2)"),
            "{why}"
        );
        // A kept member holds its place until keepFor is over.
        runs[0].finished = Some(at(5));
        runs[0].keep_for = Duration::from_secs(10);
        assert!(assign("sandbox", pool, &runs, &mut idle, &mut next, at(14)).is_err());
        assert_eq!(
            assign("sandbox", pool, &runs, &mut idle, &mut next, at(15)).as_deref(),
            Ok("sandbox-f3")
        );
    }
}
