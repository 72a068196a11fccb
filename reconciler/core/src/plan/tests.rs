//! The planner as a pure function: desired YAML + observed data in, rendered plan out.

use expect_test::{Expect, expect};
use serde_json::Value;

use super::*;
use crate::observe::{ObservedHost, Stamp};
use crate::snapshot::{Snapshot, SourceFile};

const FLEET: &str = "apiVersion: fleet/v1
kind: Fleet
metadata: {name: lab}
spec:
  providers:
    - {name: local, type: libvirt, domainType: qemu}
  images:
    - {name: micro, kernel: build/image/vmlinuz, initrd: build/image/initrd.img}
    - {name: deb, disk: debian.qcow2}
";

fn vm(name: &str, extra: &str) -> (String, String) {
    (
        format!("fleet/vms/{name}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec:\n  provider: local\n  image: micro\n{extra}"
        ),
    )
}

/// Plans with nothing but the desired and observed state.
fn plan(desired: &Desired, observed: &Observed) -> Plan {
    super::plan(desired, observed, &PlanInputs::default())
}

fn plan_with_history(desired: &Desired, observed: &Observed, history: &History) -> Plan {
    let inputs = PlanInputs {
        history: history.clone(),
        ..PlanInputs::default()
    };
    super::plan(desired, observed, &inputs)
}

fn desired(files: &[(String, String)]) -> Desired {
    desired_from(FLEET, files)
}

/// The fleet `fleet_yaml` with `files` beside it, loaded and resolved.
fn desired_from(fleet_yaml: &str, files: &[(String, String)]) -> Desired {
    let mut all = vec![SourceFile {
        path: "fleet/fleet.yaml".into(),
        bytes: fleet_yaml.as_bytes().to_vec(),
    }];
    all.extend(files.iter().map(|(p, t)| SourceFile {
        path: p.clone(),
        bytes: t.as_bytes().to_vec(),
    }));
    let snapshot = Snapshot {
        revision: Revision {
            id: "c0ffee0000000000000000000000000000000000".into(),
            label: "main@c0ffee000000".into(),
            signed_by: None,
        },
        fleet_dir: "fleet".into(),
        files: all,
        signers: Default::default(),
    };
    let host = crate::resolve::tests_support::test_host();
    let loaded = crate::load::load(&snapshot, Some(&host)).unwrap_or_else(|d| panic!("{d:#?}"));
    crate::resolve::resolve(&loaded, &host)
}

/// An observed VM exactly as `d` describes it (as if applied at revision "a1").
fn applied(d: &DesiredVm, running: bool) -> ObservedVm {
    ObservedVm {
        name: d.name.clone(),
        uuid: format!("uuid-{}", d.name),
        running,
        cpus: d.config.cpus,
        memory_mib: d.config.memory_mib,
        stamp: Some(std::sync::Arc::new(Stamp {
            fleet: "lab".into(),
            name: d.name.clone(),
            spec_hash: d.spec_hash.clone(),
            revision: "a1a1a1a1a1a1a1a1".into(),
            protect: d.config.protect,
            config: Some(d.config.clone()),
            created: None,
            adopted: false,
        })),
    }
}

fn foreign(name: &str) -> ObservedVm {
    ObservedVm {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        running: true,
        cpus: 1,
        memory_mib: 256,
        stamp: None,
    }
}

fn observed(vms: Vec<ObservedVm>) -> Observed {
    let mut vms = vms;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Observed {
        hosts: [(
            "local".to_owned(),
            ObservedHost {
                vms: vms.into_iter().map(std::sync::Arc::new).collect(),
                ..Default::default()
            },
        )]
        .into(),
        unreachable: Default::default(),
    }
}

fn check(desired: &Desired, observed: &Observed, expect: Expect) -> Plan {
    let plan = plan(desired, observed);
    let text = render::text(&plan);
    // The digest changes with any byte of the plan; snapshots show it as a placeholder.
    expect.assert_eq(&text.replace(&plan.digest, "[DIGEST]"));
    plan
}

#[test]
fn empty_host_creates_everything() {
    let d = desired(&[
        vm("a", ""),
        vm("b", "  resources: {memory: 1Gi, cpus: 2}\n"),
    ]);
    let p = check(
        &d,
        &observed(vec![]),
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            Plan: 2 to create.

              +   create   a  on local: not found on the provider
              +   create   b  on local: not found on the provider

            Resolved spec changes:
            --- a (applied)
            +++ a (desired)
            @@ -0,0 +1,10 @@
            +provider: local
            +domainType: qemu
            +image:
            +  name: micro
            +  kernel: build/image/vmlinuz
            +  initrd: build/image/initrd.img
            +cpus: 1
            +memoryMiB: 512
            +network: isolated
            +protect: false
            --- b (applied)
            +++ b (desired)
            @@ -0,0 +1,10 @@
            +provider: local
            +domainType: qemu
            +image:
            +  name: micro
            +  kernel: build/image/vmlinuz
            +  initrd: build/image/initrd.img
            +cpus: 2
            +memoryMiB: 1024
            +network: isolated
            +protect: false

            Plan digest: [DIGEST]
        "#]],
    );
    assert_eq!(p.digest, p.compute_digest());
}

#[test]
fn converged_fleet_has_no_steps() {
    let d = desired(&[vm("a", ""), vm("b", "  state: stopped\n")]);
    let o = observed(vec![
        applied(&d.vms["a"], true),
        applied(&d.vms["b"], false),
    ]);
    let p = check(
        &d,
        &o,
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            No changes: every VM matches its spec.

            Plan digest: [DIGEST]
        "#]],
    );
    assert!(!p.has_changes());
}

#[test]
fn removed_vm_is_destroyed_and_foreign_vms_are_left_alone() {
    let before = desired(&[vm("a", ""), vm("gone", "")]);
    let after = desired(&[vm("a", "")]);
    let o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&before.vms["gone"], true),
        foreign("someone-elses"),
    ]);
    check(
        &after,
        &o,
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            Plan: 1 to destroy.

              -   destroy  gone  on local: removed from fleet/ (last applied at a1a1a1a1a1a1)

            Resolved spec changes:
            --- gone (applied)
            +++ gone (desired)
            @@ -1,10 +0,0 @@
            -provider: local
            -domainType: qemu
            -image:
            -  name: micro
            -  kernel: build/image/vmlinuz
            -  initrd: build/image/initrd.img
            -cpus: 1
            -memoryMiB: 512
            -network: isolated
            -protect: false

            Plan digest: [DIGEST]
        "#]],
    );
}

#[test]
fn memory_change_updates_in_place_with_a_restart() {
    let before = desired(&[vm("a", ""), vm("b", "  state: stopped\n")]);
    let after = desired(&[
        vm("a", "  resources: {memory: 1Gi}\n"),
        vm("b", "  state: stopped\n  resources: {cpus: 2}\n"),
    ]);
    let o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&before.vms["b"], false),
    ]);
    let p = check(
        &after,
        &o,
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            Plan: 2 to update.

              ~   update   a  on local: memoryMiB 512 → 1024 (restarts the running VM)
              ~   update   b  on local: cpus 1 → 2

            Resolved spec changes:
            --- a (applied)
            +++ a (desired)
            @@ -5,6 +5,6 @@
               kernel: build/image/vmlinuz
               initrd: build/image/initrd.img
             cpus: 1
            -memoryMiB: 512
            +memoryMiB: 1024
             network: isolated
             protect: false
            --- b (applied)
            +++ b (desired)
            @@ -4,7 +4,7 @@
               name: micro
               kernel: build/image/vmlinuz
               initrd: build/image/initrd.img
            -cpus: 1
            +cpus: 2
             memoryMiB: 512
             network: isolated
             protect: false

            Plan digest: [DIGEST]
        "#]],
    );
    assert!(p.steps[0].restart() && !p.steps[1].restart());
}

#[test]
fn image_disk_change_forces_replace_and_names_the_field() {
    let before = desired(&[vm("a", "")]);
    let after = desired(&[(
        "fleet/vms/a.yaml".into(),
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: deb}\n".into(),
    )]);
    let o = observed(vec![applied(&before.vms["a"], true)]);
    let p = plan(&after, &o);
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].action(), Action::Replace);
    assert_eq!(
        render::reason_text(&p.steps[0]),
        "image.disk changed, which forces replacement (a new base disk needs a new overlay)"
    );
}

#[test]
fn a_new_loadout_user_forces_replace_because_cloud_init_runs_once() {
    let loadout = |users: &str| {
        (
            "fleet/loadouts/dev.yaml".to_owned(),
            format!("apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: dev}}\nspec:\n{users}"),
        )
    };
    let before = desired(&[
        vm("a", "  loadout: dev\n"),
        loadout("  runcmd: [\"true\"]\n"),
    ]);
    let after = desired(&[
        vm("a", "  loadout: dev\n"),
        loadout("  runcmd: [\"true\"]\n  users: [{name: agent}]\n"),
    ]);
    let o = observed(vec![applied(&before.vms["a"], true)]);
    let p = plan(&after, &o);
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].action(), Action::Replace);
    assert_eq!(
        render::reason_text(&p.steps[0]),
        "users changed, which forces replacement (cloud-init applies it only at first boot)"
    );
}

#[test]
fn a_create_that_stopped_before_configuring_its_vm_is_run_again() {
    let d = desired(&[vm("a", ""), vm("b", "")]);
    // The stamp a Proxmox clone carries until its config is written: no spec yet.
    let mut unfinished = applied(&d.vms["a"], false);
    unfinished.cpus = 4; // the template's, not the spec's
    unfinished.stamp = Some(std::sync::Arc::new(Stamp {
        spec_hash: String::new(),
        config: None,
        ..(**unfinished.stamp.as_ref().expect("stamp")).clone()
    }));
    let o = observed(vec![unfinished, applied(&d.vms["b"], true)]);
    let plan = check(
        &d,
        &o,
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            Plan: 1 to create.

              +   create   a  on local: an earlier create stopped before configuring it; finishing it

            Resolved spec changes:
            --- a (applied)
            +++ a (desired)
            @@ -0,0 +1,10 @@
            +provider: local
            +domainType: qemu
            +image:
            +  name: micro
            +  kernel: build/image/vmlinuz
            +  initrd: build/image/initrd.img
            +cpus: 1
            +memoryMiB: 512
            +network: isolated
            +protect: false

            Plan digest: [DIGEST]
        "#]],
    );
    assert!(
        plan.drift.is_empty(),
        "fleet's own unfinished work is not drift"
    );
}

#[test]
fn power_state_changes_start_and_stop() {
    let d = desired(&[vm("a", ""), vm("b", "  state: stopped\n")]);
    let o = observed(vec![
        applied(&d.vms["a"], false),
        applied(&d.vms["b"], true),
    ]);
    check(
        &d,
        &o,
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            Plan: 1 to start, 1 to stop.

              >   start    a  on local: spec wants it running
              .   stop     b  on local: spec wants it stopped

            Plan digest: [DIGEST]
        "#]],
    );
}

#[test]
fn name_clash_with_a_foreign_vm_is_a_conflict_not_a_step() {
    let d = desired(&[vm("clash", "")]);
    let p = check(
        &d,
        &observed(vec![foreign("clash")]),
        expect![[r#"
            fleet lab at main@c0ffee000000 (c0ffee000000)
            No changes: every VM matches its spec.

            Conflicts (fleet does not touch these VMs):
              !   clash on local: a VM named "clash" already exists and was not made by fleet; fleet will not touch it. Rename the VM in fleet/, or remove the other VM yourself

            Plan digest: [DIGEST]
        "#]],
    );
    assert!(p.steps.is_empty());
    assert_eq!(p.conflicts.len(), 1);
}

#[test]
fn another_fleets_vm_is_foreign() {
    let d = desired(&[vm("a", "")]);
    let mut theirs = applied(&d.vms["a"], true);
    if let Some(s) = theirs.stamp.as_mut() {
        std::sync::Arc::make_mut(s).fleet = "other".into();
    }
    let p = plan(&d, &observed(vec![theirs]));
    assert!(p.steps.is_empty());
    assert!(
        p.conflicts[0]
            .message
            .contains("belongs to fleet \"other\"")
    );
}

#[test]
fn unreachable_provider_plans_nothing_for_its_vms() {
    let d = desired(&[vm("a", "")]);
    let o = Observed {
        hosts: Default::default(),
        unreachable: [("local".to_owned(), "connection refused".to_owned())].into(),
    };
    let p = plan(&d, &o);
    assert!(p.steps.is_empty(), "never create what cannot be observed");
    assert_eq!(p.errors.len(), 1);
}

#[test]
fn plans_are_deterministic_and_digests_detect_edits() {
    let d = desired(&[vm("a", ""), vm("b", "")]);
    let o = observed(vec![]);
    let (p1, p2) = (plan(&d, &o), plan(&d, &o));
    assert_eq!(p1, p2);
    let mut edited = p1.clone();
    edited.steps.pop();
    assert_ne!(edited.digest, edited.compute_digest());
}

#[test]
fn planning_after_applying_the_plan_yields_no_steps() {
    let d = desired(&[
        vm("a", ""),
        vm("b", "  state: stopped\n"),
        vm("c", "  resources: {memory: 2Gi}\n"),
    ]);
    let p = plan(&d, &observed(vec![]));
    // Apply the plan in the model: every step leaves its VM as desired.
    let after: Vec<ObservedVm> = p
        .steps
        .iter()
        .filter_map(|s| s.desired())
        .map(|vm| applied(vm, vm.state == PowerState::Running))
        .collect();
    assert!(!plan(&d, &observed(after)).has_changes());
}

fn history(entries: &[(&str, PowerState)]) -> History {
    History {
        applied: entries.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect(),
    }
}

#[test]
fn a_resized_definition_is_drift_and_is_healed_in_place() {
    let d = desired(&[vm("a", "")]);
    let mut found = applied(&d.vms["a"], true);
    found.memory_mib = 200; // virsh setmem --config behind fleet's back
    let p = plan_with_history(
        &d,
        &observed(vec![found]),
        &history(&[("a", PowerState::Running)]),
    );
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].action(), Action::Update);
    assert!(!p.steps[0].restart());
    assert_eq!(
        render::reason_text(&p.steps[0]),
        "drift: memory is 200 MiB, the applied spec says 512 MiB"
    );
    assert_eq!(p.drift.len(), 1);
    assert!(p.drift[0].healed);
}

#[test]
fn with_self_heal_off_drift_is_only_reported() {
    let mut d = desired(&[vm("a", ""), vm("b", ""), vm("c", "")]);
    d.policy.self_heal = false;
    let mut resized = applied(&d.vms["a"], true);
    resized.cpus = 3;
    let stopped = applied(&d.vms["b"], false);
    let h = history(&[
        ("a", PowerState::Running),
        ("b", PowerState::Running),
        ("c", PowerState::Running),
    ]);
    let p = plan_with_history(&d, &observed(vec![resized, stopped]), &h);
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    let what: Vec<(&str, &str, bool)> = p
        .drift
        .iter()
        .map(|d| (d.vm.as_str(), d.what.as_str(), d.healed))
        .collect();
    assert_eq!(
        what,
        [
            ("a", "vCPUs are 3, the applied spec says 1", false),
            ("b", "the VM was stopped outside fleet", false),
            ("c", "the VM is gone: it was removed outside fleet", false),
        ]
    );
}

#[test]
fn stopped_and_missing_vms_are_drift_only_when_they_were_applied_running() {
    let d = desired(&[vm("a", ""), vm("b", ""), vm("c", "")]);
    let o = observed(vec![
        applied(&d.vms["a"], false),
        applied(&d.vms["b"], false),
    ]);
    // b's previous spec wanted it stopped: starting it now is a change, not drift.
    let p = plan_with_history(
        &d,
        &o,
        &history(&[
            ("a", PowerState::Running),
            ("b", PowerState::Stopped),
            ("c", PowerState::Running),
        ]),
    );
    let reasons = step_lines(&p);
    assert_eq!(
        reasons,
        [
            "start a: drift: the VM was stopped outside fleet",
            "start b: spec wants it running",
            "create c: drift: the VM was removed outside fleet; recreating it",
        ]
    );
}

#[test]
fn a_spec_change_runs_even_when_self_heal_is_off() {
    let before = desired(&[vm("a", "")]);
    let mut after = desired(&[vm("a", "  resources: {cpus: 2}\n")]);
    after.policy.self_heal = false;
    let mut found = applied(&before.vms["a"], true);
    found.memory_mib = 300;
    let p = plan_with_history(
        &after,
        &observed(vec![found]),
        &history(&[("a", PowerState::Running)]),
    );
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].action(), Action::Update);
    assert!(
        p.drift[0].healed,
        "the update rewrites the whole definition"
    );
}

fn desired_with_policy(policy: &str, files: &[(String, String)]) -> Desired {
    desired_from(
        &FLEET.replace("  images:", &format!("  policy: {policy}\n  images:")),
        files,
    )
}

fn held_lines(p: &Plan) -> Vec<String> {
    p.held
        .iter()
        .map(|h| {
            format!(
                "{} {}: {}",
                h.step.action().as_str(),
                h.step.vm,
                h.why.join("; ")
            )
        })
        .collect()
}

#[test]
fn a_protected_vm_deleted_from_fleet_is_held_until_its_digest_is_approved() {
    let before = desired(&[vm("a", ""), vm("keep", "  protect: true\n")]);
    let after = desired(&[vm("a", "")]);
    let o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&before.vms["keep"], true),
    ]);
    let p = plan(&after, &o);
    assert!(p.steps.is_empty());
    assert_eq!(
        held_lines(&p),
        [
            "destroy keep: keep is protected (recorded in its stamp): set protect: false and apply that first, or approve"
        ]
    );
    let digest = p.approval_digest.clone().expect("a digest");
    assert_eq!(
        p.approval_id().map(|id| id.to_string()),
        Some(format!("approval-{}", &digest[..12]))
    );
    assert!(render::text(&p).contains(&format!("spec.approve: \"{digest}\"")));
    assert_eq!(
        plan(&after, &o).approval_digest.as_deref(),
        Some(digest.as_str()),
        "the same held steps, the same digest"
    );
    let given = |digest: &str| PlanInputs {
        approved: [digest.to_owned()].into(),
        ..PlanInputs::default()
    };
    let other = super::plan(&after, &o, &given(&"0".repeat(64)));
    assert_eq!(other, p, "another digest releases nothing");
    let released = super::plan(&after, &o, &given(&digest));
    assert_eq!(released.steps.len(), 1);
    assert!(released.held.is_empty() && released.approval_digest.is_none());
    let approved = released.approved.as_ref().expect("approved");
    assert_eq!(approved.digest, digest);
    assert_eq!(
        approved.steps,
        p.held.iter().map(guard::HeldStep::line).collect::<Vec<_>>()
    );
    assert_eq!(released.approval_id(), p.approval_id(), "the same approval");
    assert_eq!(released.digest, released.compute_digest());
    assert!(
        render::text(&released).contains(&format!("Approved ({};", p.approval_id().expect("id")))
    );
}

/// A VM in backoff keeps its step in the plan, as deferred with why; the digest covers it.
#[test]
fn a_deferred_vm_is_in_the_plan_with_its_reason() {
    let d = desired(&[vm("a", ""), vm("b", "")]);
    let o = observed(vec![]);
    let inputs = PlanInputs {
        deferred: [(
            "a".to_owned(),
            "its last step failed; next try in 4s".to_owned(),
        )]
        .into(),
        ..PlanInputs::default()
    };
    let p = super::plan(&d, &o, &inputs);
    assert_eq!(
        p.steps.iter().map(|s| s.vm.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(p.deferred.len(), 1);
    assert_eq!(
        (p.deferred[0].step.vm.as_str(), p.deferred[0].step.action()),
        ("a", Action::Create)
    );
    assert!(p.has_changes(), "b is created");
    assert_ne!(
        p.digest,
        plan(&d, &o).digest,
        "the digest says what is deferred"
    );
    assert_eq!(p.digest, p.compute_digest());
    let text = render::text(&p);
    assert!(
        text.contains("Deferred (planned again when the wait is over):\n  +   create   a  on local: its last step failed; next try in 4s"),
        "{text}"
    );
}

/// A saved plan is read back only when it is a whole, unedited plan of this format; a short
/// approval digest (hand-edited, digest recomputed) is a clear error, never a panic.
#[test]
fn saved_plans_are_read_back_whole_or_refused_with_why() {
    let before = desired(&[vm("keep", "  protect: true\n")]);
    let o = observed(vec![applied(&before.vms["keep"], true)]);
    let p = plan(&desired(&[vm("other", "")]), &o);
    assert!(p.approval_digest.is_some());
    let json = render::json(&p);
    assert_eq!(Plan::read_saved(&json).expect("reads back"), p);
    assert!(matches!(
        Plan::read_saved("{}"),
        Err(SavedPlanError::NotAPlan(_))
    ));

    let mut edited = p.clone();
    edited.steps.clear();
    assert!(matches!(
        Plan::read_saved(&render::json(&edited)),
        Err(SavedPlanError::Edited)
    ));

    let mut short = p.clone();
    short.approval_digest = Some("abc".into());
    short.digest = short.compute_digest();
    let err = Plan::read_saved(&render::json(&short)).expect_err("short digest");
    assert!(
        err.to_string()
            .contains("\"abc\", which is not a sha256 digest"),
        "{err}"
    );

    let mut old = p.clone();
    old.format_version = 1;
    old.digest = old.compute_digest();
    assert!(matches!(
        Plan::read_saved(&render::json(&old)),
        Err(SavedPlanError::Format { found: 1 })
    ));

    assert_eq!(p.check_fresh(&p), Ok(()));
    assert_eq!(short.check_fresh(&p), Err(Stale::Work));
}

#[test]
fn every_destroy_of_a_plan_over_the_cap_and_approved_kinds_wait() {
    let before = desired(&[vm("a", ""), vm("b", ""), vm("c", ""), vm("d", "")]);
    let o = observed(
        ["a", "b", "c", "d"]
            .iter()
            .map(|n| applied(&before.vms[*n], true))
            .collect(),
    );
    let after = desired_with_policy("{maxDestroysPerApply: 1}", &[vm("d", "")]);
    let p = plan(&after, &o);
    assert!(
        p.steps.is_empty(),
        "a mass destroy is not spread over applies"
    );
    assert_eq!(
        held_lines(&p),
        [
            "destroy a: this plan destroys 3 VMs, more than policy.maxDestroysPerApply (1)",
            "destroy b: this plan destroys 3 VMs, more than policy.maxDestroysPerApply (1)",
            "destroy c: this plan destroys 3 VMs, more than policy.maxDestroysPerApply (1)",
        ]
    );
    let one = desired_with_policy(
        "{maxDestroysPerApply: 1}",
        &[vm("b", ""), vm("c", ""), vm("d", "")],
    );
    assert_eq!(
        plan(&one, &o).steps.len(),
        1,
        "within the cap, destroys run"
    );

    let replaced = desired_with_policy(
        "{approve: [replace]}",
        &[
            vm("a", ""),
            vm("b", ""),
            vm("c", ""),
            (
                "fleet/vms/d.yaml".into(),
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: d}\nspec: {provider: local, image: deb}\n".into(),
            ),
        ],
    );
    assert_eq!(
        held_lines(&plan(&replaced, &o)),
        ["replace d: policy.approve lists replace"]
    );
}

#[test]
fn a_revision_that_empties_a_provider_is_held_whatever_the_cap() {
    let before = desired(&[vm("a", ""), vm("b", "")]);
    let o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&before.vms["b"], true),
        foreign("not-ours"),
    ]);
    let empty = desired_with_policy("{maxDestroysPerApply: 100}", &[]);
    let p = plan(&empty, &o);
    assert!(p.steps.is_empty());
    assert_eq!(p.held.len(), 2);
    assert!(
        p.held[0]
            .why
            .iter()
            .any(|w| w.contains("destroys every VM fleet runs on provider local")),
        "{:?}",
        p.held
    );
}

/// Changes `field`, and nothing else, in `c`.
fn change(field: VmField, c: &mut VmConfig) {
    let some = |v: &Option<String>| Some(format!("{}-changed", v.as_deref().unwrap_or("x")));
    match field {
        VmField::Provider => c.provider.push_str("-2"),
        VmField::DomainType => {
            c.domain_type = match c.domain_type {
                crate::spec::DomainType::Kvm => crate::spec::DomainType::Qemu,
                crate::spec::DomainType::Qemu => crate::spec::DomainType::Kvm,
            }
        }
        VmField::ImageName => c.image.name.push_str("-2"),
        VmField::ImageKernel => c.image.kernel = some(&c.image.kernel),
        VmField::ImageInitrd => c.image.initrd = some(&c.image.initrd),
        VmField::ImageCmdline => c.image.cmdline = some(&c.image.cmdline),
        VmField::ImageDisk => c.image.disk = some(&c.image.disk),
        VmField::ImageDiskContent => c.image.disk_sha256 = some(&c.image.disk_sha256),
        VmField::ImageBootContent => c.image.boot_sha256 = some(&c.image.boot_sha256),
        VmField::ImageTemplate => c.image.template = some(&c.image.template),
        VmField::Loadout => c.loadout = some(&c.loadout),
        VmField::Pool => c.pool = some(&c.pool),
        VmField::Node => c.node = some(&c.node),
        VmField::Cpus => c.cpus += 1,
        VmField::MemoryMib => c.memory_mib += 64,
        VmField::DiskMib => c.disk_mib = Some(c.disk_mib.unwrap_or(1024) + 1024),
        VmField::Network => {
            c.network = match c.network {
                crate::spec::NetworkMode::Full => crate::spec::NetworkMode::Isolated,
                _ => crate::spec::NetworkMode::Full,
            }
        }
        VmField::Packages => c.packages.push("git".into()),
        VmField::Files => c
            .files
            .push(serde_json::from_str(r#"{"path":"/etc/motd","content":"hi"}"#).expect("file")),
        VmField::Runcmd => c.runcmd.push("true".into()),
        VmField::Users => c
            .users
            .push(serde_json::from_str(r#"{"name":"dev"}"#).expect("user")),
        VmField::Env => {
            c.env.insert("A".into(), "1".into());
        }
        VmField::Labels => {
            c.labels.insert("team".into(), "infra".into());
        }
        VmField::Protect => c.protect = !c.protect,
        VmField::Fresh => c.fresh = !c.fresh,
        VmField::Reset => c.reset = !c.reset,
        VmField::Workspaces => c.workspaces.push(crate::resolve::ResolvedMount {
            name: "notes".into(),
            mount_path: "/workspace".into(),
            size_mib: 64,
            label: "notes".into(),
        }),
        VmField::Snapshots => {
            c.snapshots = Some(crate::spec::SnapshotPolicy {
                before: vec![crate::spec::SnapshotBefore::Replace],
                keep: 3,
            });
        }
    }
}

/// For every field of a VM's configuration, changing only that field gives exactly the
/// step its declared effect says: a replace naming it, an update that restarts the running
/// VM, or an update in place.
#[test]
fn every_field_changes_a_running_vm_as_its_effect_declares() {
    let mut before = desired(&[vm("a", "")]);
    // Content digests as the host fills them in (a first one only rewrites the stamp).
    let a = before.vms.get_mut("a").expect("a");
    a.config.image.disk_sha256 = Some("d0".into());
    a.config.image.boot_sha256 = Some("b0".into());
    a.spec_hash = a.config.hash();
    let found = applied(&before.vms["a"], true);
    for field in VmField::ALL {
        let mut after = before.vms["a"].clone();
        change(field, &mut after.config);
        after.spec_hash = after.config.hash();
        // The decision for a VM fleet owns; a whole plan would also judge the provider move.
        let step = super::step_for_owned(&after, &found).expect("a step");
        assert_eq!(
            step.changes().iter().map(|c| c.field).collect::<Vec<_>>(),
            [field],
            "changing {field} changes only {field}"
        );
        match field.effect() {
            FieldEffect::Replace(why) => {
                assert_eq!(step.action(), Action::Replace, "{field}");
                assert_eq!(
                    step.reason,
                    Reason::ReplaceForced {
                        field,
                        why: why.to_owned()
                    }
                );
            }
            FieldEffect::NeedsRestart => {
                assert_eq!(
                    (step.action(), step.restart()),
                    (Action::Update, true),
                    "{field}"
                );
            }
            FieldEffect::InPlace => {
                assert_eq!(
                    (step.action(), step.restart()),
                    (Action::Update, false),
                    "{field}"
                );
            }
        }
    }
}

/// A field's name in plans is its key in the stamp's JSON: a `serde(rename)` that drifts
/// from `VmField` fails here.
#[test]
fn field_names_are_the_configuration_keys() {
    let mut config = desired(&[vm("a", "")]).vms["a"].config.clone();
    for field in VmField::ALL {
        change(field, &mut config);
    }
    let json = serde_json::to_value(&config).expect("json");
    let mut keys: Vec<String> = Vec::new();
    for (key, value) in json.as_object().expect("object") {
        match (key.as_str(), value) {
            ("image", Value::Object(image)) => {
                keys.extend(image.keys().map(|k| format!("image.{k}")));
            }
            _ => keys.push(key.clone()),
        }
    }
    keys.sort();
    let mut names: Vec<String> = VmField::ALL.iter().map(|f| f.name().to_owned()).collect();
    names.sort();
    assert_eq!(keys, names);
    for field in VmField::ALL {
        assert_eq!(
            serde_json::to_value(field).expect("json"),
            Value::String(field.name().to_owned())
        );
    }
}

#[test]
fn the_markdown_plan_is_a_pull_request_comment_nothing_committed_can_inject_into() {
    use super::task_runs::{RunChange, TaskRun};
    let before = desired(&[vm("keep", "  protect: true\n")]);
    let after = desired(&[vm("a", "")]);
    let o = observed(vec![applied(&before.vms["keep"], true)]);
    let p = plan(&after, &o);
    let runs = vec![TaskRun {
        task: "hello".into(),
        vm: "a".into(),
        fresh: false,
        change: RunChange::Start,
        command: "claude agent: [click](https://x.invalid) @team <img src=x> | `rm`\n# heading"
            .into(),
        repository: Some("https://git.example.org/app@main".into()),
        branch: Some("fleet/hello".into()),
    }];
    let digest = p.approval_digest.clone().expect("held");
    let text = render::markdown(&p, &runs)
        .replace(&p.digest, "[DIGEST]")
        .replace(&digest, "[APPROVAL]")
        .replace(&digest[..12], "[ID]")
        .replace('\u{200b}', "[ZWSP]");
    expect![[r####"
        ### fleet plan: lab at `c0ffee000000`

        **1 to create · 1 held for approval · 1 task run(s) to start**

        | | action | VM | provider | why |
        |---|---|---|---|---|
        | `+` | create | a | local | not found on the provider |

        #### Held for approval

        Approve by committing `fleet/hitl/approval-[ID].yaml` with `spec.approve: "[APPROVAL]"` (or `fleet hitl answer approval-[ID] [APPROVAL]` on the host).

        | | action | VM | provider | why |
        |---|---|---|---|---|
        | `-` | destroy | keep | local | keep is protected \(recorded in its stamp\): set protect: false and apply that first, or approve |

        #### Task runs

        - `+` start task **hello** on VM **a**: claude agent: \[click\]\(https://x\.invalid\) @[ZWSP]team &lt;img src=x\> \| \`rm\` \# heading (on https://git\.example\.org/app@[ZWSP]main, as fleet/hello in the guest)

        <details><summary>create a</summary>

        ```diff
        --- a (applied)
        +++ a (desired)
        @@ -0,0 +1,10 @@
        +provider: local
        +domainType: qemu
        +image:
        +  name: micro
        +  kernel: build/image/vmlinuz
        +  initrd: build/image/initrd.img
        +cpus: 1
        +memoryMiB: 512
        +network: isolated
        +protect: false
        ```

        </details>

        <sub>plan digest `[DIGEST]`</sub>
    "####]].assert_eq(&text);
    // Nothing committed became a link, an image, a mention or a tag.
    for made in ["](https", "<img", "@team", "\n# heading"] {
        assert!(!text.contains(made), "{made:?} in:\n{text}");
    }
}

#[test]
fn markdown_text_is_inert_math_and_invisible_characters_included() {
    assert_eq!(render::md("$x$ \u{202e}gpj.exe"), "\\$x\\$ gpj\\.exe");
    assert_eq!(render::md("a\u{200b}b\u{feff}"), "ab");
    assert_eq!(render::md("<img> [l](u)"), "&lt;img\\> \\[l\\]\\(u\\)");
}

/// A pool whose tasks get fresh members, under `policy`.
fn fresh_pool(policy: &str) -> Desired {
    desired_with_policy(
        policy,
        &[
            (
                "fleet/vms/sandbox.yaml".into(),
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: sandbox}\nspec:\n  replicas: 0\n  fresh: {warm: 1}\n  template:\n    spec: {provider: local, image: micro}\n".into(),
            ),
        ],
    )
}

#[test]
fn fresh_members_are_made_and_let_go_without_an_approval_unless_protected() {
    let d = fresh_pool("{approve: [destroy], maxDestroysPerApply: 1}");
    let pool = &d.fresh_pools["sandbox"];
    let members = ["sandbox-f1", "sandbox-f2", "sandbox-f3", "sandbox-f4"];
    let o = observed(
        members
            .iter()
            .map(|n| applied(&pool.instance(n), true))
            .collect(),
    );
    let wanted = crate::lifecycle::members(
        &d,
        &[],
        &o,
        crate::time::Timestamp::from(std::time::UNIX_EPOCH),
    );
    let p = plan(&wanted.add_to(&d), &o);
    assert!(p.held.is_empty(), "{:?}", held_lines(&p));
    assert_eq!(
        step_lines(&p),
        [
            "destroy sandbox-f2: a fresh member of pool sandbox that no task run holds any longer",
            "destroy sandbox-f3: a fresh member of pool sandbox that no task run holds any longer",
            "destroy sandbox-f4: a fresh member of pool sandbox that no task run holds any longer",
        ]
    );
    // Nothing observed yet: the warm member is made, with its reason.
    let empty = observed(Vec::new());
    let wanted = crate::lifecycle::members(
        &d,
        &[],
        &empty,
        crate::time::Timestamp::from(std::time::UNIX_EPOCH),
    );
    assert_eq!(
        step_lines(&plan(&wanted.add_to(&d), &empty)),
        ["create sandbox-f1: a fresh member of pool sandbox, for a task run or kept warm for one"]
    );
    // A protected member is still held.
    let mut protected = applied(&pool.instance("sandbox-f2"), true);
    if let Some(stamp) = protected.stamp.as_mut() {
        std::sync::Arc::make_mut(stamp).protect = true;
    }
    let o = observed(vec![applied(&pool.instance("sandbox-f1"), true), protected]);
    let p = plan(&d.clone(), &o);
    assert_eq!(p.held.len(), 1, "{:?}", held_lines(&p));
    // A declared VM's destroy is still held by the policy.
    let before = desired(&[vm("a", "")]);
    let o = observed(vec![applied(&before.vms["a"], true)]);
    let held = held_lines(&plan(&d, &o));
    assert!(
        held[0].starts_with("destroy a: policy.approve lists destroy"),
        "{held:?}"
    );
}

fn step_lines(p: &Plan) -> Vec<String> {
    p.steps
        .iter()
        .map(|s| {
            format!(
                "{} {}: {}",
                s.action().as_str(),
                s.vm,
                render::reason_text(s)
            )
        })
        .collect()
}

/// A plan of `d` against `vms` with lease records, at `now` (seconds on the test clock).
fn lease_plan(
    d: &Desired,
    vms: Vec<ObservedVm>,
    records: &[(&str, LeaseRecord)],
    now: u64,
) -> Plan {
    let inputs = PlanInputs {
        now: Some(at(now)),
        leases: records
            .iter()
            .map(|(n, r)| ((*n).to_owned(), r.clone()))
            .collect(),
        ..PlanInputs::default()
    };
    super::plan(d, &observed(vms), &inputs)
}

fn at(secs: u64) -> Timestamp {
    Timestamp::from(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + secs))
}

fn created_at(mut vm: ObservedVm, secs: u64) -> ObservedVm {
    let stamp = vm.stamp.as_ref().expect("stamped");
    vm.stamp = Some(std::sync::Arc::new(Stamp {
        created: Some(at(secs)),
        ..(**stamp).clone()
    }));
    vm
}

#[test]
fn a_lease_stops_or_destroys_its_vm_at_its_end_and_keeps_it_so_until_renewed() {
    let d = desired(&[
        vm("a", "  lease: {ttl: 60s}\n"),
        vm("b", "  lease: {ttl: 60s, onExpiry: destroy}\n"),
        vm("c", ""),
    ]);
    let vms = || {
        vec![
            created_at(applied(&d.vms["a"], true), 100),
            created_at(applied(&d.vms["b"], true), 100),
            applied(&d.vms["c"], true),
        ]
    };
    // Before the end: nothing to do.
    assert!(!lease_plan(&d, vms(), &[], 159).has_changes());
    // Without a clock (a plan of a revision alone) leases never end.
    assert!(!plan(&d, &observed(vms())).has_changes());
    let p = lease_plan(&d, vms(), &[], 160);
    assert_eq!(
        step_lines(&p),
        [
            "stop a: its lease ended at 2027-01-15T08:02:40Z (onExpiry: stop)",
            "destroy b: its lease ended at 2027-01-15T08:02:40Z (onExpiry: destroy)",
        ]
    );
    assert!(render::text(&p).contains("Leases ended"));
    // Once stopped and gone, they stay so: nothing is started or made again.
    let after = vec![
        created_at(applied(&d.vms["a"], false), 100),
        applied(&d.vms["c"], true),
    ];
    let record = LeaseRecord {
        started: at(100),
        renewals: 0,
        renewed: None,
    };
    let records = [("a", record.clone()), ("b", record.clone())];
    let p = lease_plan(&d, after.clone(), &records, 500);
    assert!(!p.has_changes(), "{}", render::text(&p));
    assert_eq!(
        p.leases_ended()
            .iter()
            .map(|l| l.vm.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    // A renewal brings both back: a is started, b made again.
    let renewed = LeaseRecord {
        renewed: Some(crate::lease::Renewal {
            at: at(490),
            until: at(600),
            by: "commit".into(),
        }),
        ..record
    };
    let records = [("a", renewed.clone()), ("b", renewed)];
    let p = lease_plan(&d, after, &records, 500);
    assert_eq!(
        step_lines(&p),
        [
            "start a: spec wants it running",
            "create b: not found on the provider"
        ]
    );
}

#[test]
fn a_destroy_at_a_leases_end_is_held_by_protection_and_approval_like_any() {
    let d = desired_with_policy(
        "{approve: [destroy]}",
        &[vm(
            "a",
            "  protect: true\n  lease: {ttl: 60s, onExpiry: destroy}\n",
        )],
    );
    let p = lease_plan(&d, vec![created_at(applied(&d.vms["a"], true), 0)], &[], 61);
    // Meanwhile it is stopped: its lease is over either way.
    assert_eq!(
        step_lines(&p),
        ["stop a: its lease ended at 2027-01-15T08:01:00Z (onExpiry: destroy)"]
    );
    assert_eq!(
        held_lines(&p),
        [
            "destroy a: a is protected (recorded in its stamp): set protect: false and apply that first, or approve; policy.approve lists destroy"
        ]
    );
}

#[test]
fn an_idle_vm_is_stopped_kept_so_and_woken_by_a_run_due_on_it() {
    let d = desired(&[
        vm("a", "  idle: {stopAfter: 60s}\n"),
        vm("b", "  idle: {stopAfter: 60s}\n"),
        vm("c", "  idle: {stopAfter: 60s}\n  state: stopped\n"),
    ]);
    let quiet = |last: u64| crate::idle::Activity {
        busy: None,
        last: Some(at(last)),
    };
    let with = |vms: Vec<ObservedVm>, a: crate::idle::Activity, now: u64| {
        let inputs = PlanInputs {
            now: Some(at(now)),
            activity: [
                ("a".to_owned(), a),
                ("b".to_owned(), quiet(now)),
                ("c".to_owned(), quiet(0)),
            ]
            .into(),
            ..PlanInputs::default()
        };
        super::plan(&d, &observed(vms), &inputs)
    };
    let running = || {
        vec![
            applied(&d.vms["a"], true),
            applied(&d.vms["b"], true),
            applied(&d.vms["c"], false),
        ]
    };
    assert!(!with(running(), quiet(100), 159).has_changes());
    let p = with(running(), quiet(100), 160);
    assert_eq!(step_lines(&p), ["stop a: idle since 2027-01-15T08:02:40Z"]);
    assert!(render::text(&p).contains("Idle (kept stopped"));
    // Stopped, it stays so while nothing is due; a run due wakes it.
    let stopped = || {
        vec![
            applied(&d.vms["a"], false),
            applied(&d.vms["b"], true),
            applied(&d.vms["c"], false),
        ]
    };
    let p = with(stopped(), quiet(100), 500);
    assert!(!p.has_changes(), "{}", render::text(&p));
    assert_eq!(p.idle().len(), 1);
    let due = crate::idle::Activity {
        busy: Some("build".into()),
        last: Some(at(100)),
    };
    let p = with(stopped(), due, 500);
    assert_eq!(step_lines(&p), ["start a: task build has a run due on it"]);
    // Without what the VM did, idleness decides nothing.
    let p = super::plan(&d, &observed(stopped()), &PlanInputs::default());
    assert_eq!(step_lines(&p), ["start a: spec wants it running"]);
}

#[test]
fn a_lease_ends_whatever_the_drift_policy_and_the_record_outlives_a_replace() {
    let d = desired_with_policy("{selfHeal: false}", &[vm("a", "  lease: {ttl: 60s}\n")]);
    let mut resized = created_at(applied(&d.vms["a"], true), 0);
    resized.memory_mib += 64; // drift, only reported under selfHeal: false
    let p = lease_plan(&d, vec![resized], &[], 61);
    assert_eq!(
        step_lines(&p),
        ["stop a: its lease ended at 2027-01-15T08:01:00Z (onExpiry: stop)"]
    );
    assert!(
        !p.drift()[0].healed,
        "the stop does not heal the memory drift"
    );
    // A VM made later (a replace) under the same record keeps the lease's end.
    let record = LeaseRecord {
        started: at(0),
        renewals: 0,
        renewed: None,
    };
    let replaced = created_at(applied(&d.vms["a"], false), 50);
    let p = lease_plan(&d, vec![replaced], &[("a", record)], 61);
    assert!(!p.has_changes(), "{}", render::text(&p));
    assert_eq!(p.leases_ended().len(), 1);
}

/// A VM `fleet adopt` stamped is never edited in place: a change that would update any
/// other VM remakes it from its image, saying why.
#[test]
fn a_change_to_an_adopted_vm_remakes_it() {
    let before = desired(&[vm("a", "")]);
    let after = desired(&[vm("a", "  resources: {memory: 1Gi}\n")]);
    let mut found = applied(&before.vms["a"], true);
    let mut stamp = (**found.stamp.as_ref().expect("stamp")).clone();
    stamp.adopted = true;
    found.stamp = Some(std::sync::Arc::new(stamp));
    let p = plan(&after, &observed(vec![found]));
    let [step] = p.steps() else {
        panic!("one step: {:?}", p.steps());
    };
    assert_eq!(step.action(), Action::Replace);
    assert_eq!(
        step.reason,
        Reason::AdoptedChanged {
            fields: vec![VmField::MemoryMib]
        }
    );
    assert!(render::reason_text(step).contains("adopted VM"));
}

/// A saved plan goes stale when what it is about changes, not when another VM on the same
/// host comes or goes.
#[test]
fn the_observed_digest_covers_only_what_the_plan_is_about() {
    let d = desired(&[vm("a", "")]);
    let mine = applied(&d.vms["a"], true);
    let before = plan(&d, &observed(vec![mine.clone()]));
    let with_stranger = plan(&d, &observed(vec![mine.clone(), foreign("someone-else")]));
    assert_eq!(before.observed_digest(), with_stranger.observed_digest());
    let mut stopped = mine;
    stopped.running = false;
    assert_ne!(
        before.observed_digest(),
        plan(&d, &observed(vec![stopped])).observed_digest()
    );
    let clash = plan(&d, &observed(vec![foreign("a")]));
    assert_ne!(before.observed_digest(), clash.observed_digest());
}

/// Drift in an adopted VM's resources is reported, never healed in place (its definition
/// is not fleet's to rewrite); a VM fleet made is healed.
#[test]
fn drift_on_an_adopted_vm_is_reported_not_healed() {
    let d = desired(&[vm("a", "")]);
    let mut found = applied(&d.vms["a"], true);
    found.memory_mib += 256;
    let healed = plan(&d, &observed(vec![found.clone()]));
    assert_eq!(healed.steps().len(), 1, "{:?}", healed.steps());
    let mut stamp = (**found.stamp.as_ref().expect("stamp")).clone();
    stamp.adopted = true;
    found.stamp = Some(std::sync::Arc::new(stamp));
    let p = plan(&d, &observed(vec![found]));
    assert!(p.steps().is_empty(), "{:?}", p.steps());
    assert_eq!(p.drift().len(), 1);
    assert!(!p.drift()[0].healed);
}

/// A revert the host asked for is a step of its own, before a power step and after a
/// change of configuration (which runs first; the revert waits for a later pass).
#[test]
fn a_revert_from_the_host_is_planned_as_its_own_step() {
    let before = desired(&[vm("a", ""), vm("b", "")]);
    let after = desired(&[vm("a", ""), vm("b", "  resources: {memory: 1Gi}\n")]);
    // `a` is stopped outside fleet: the revert comes instead of the start.
    let o = observed(vec![
        applied(&before.vms["a"], false),
        applied(&before.vms["b"], true),
    ]);
    let asked = |snapshot: &str| RevertRequest {
        snapshot: snapshot.to_owned(),
        by: "alice".to_owned(),
    };
    let inputs = PlanInputs {
        reverts: [
            ("a".to_owned(), asked("before-upgrade")),
            ("b".to_owned(), asked("s1")),
        ]
        .into_iter()
        .collect(),
        ..PlanInputs::default()
    };
    let p = super::plan(&after, &o, &inputs);
    let text = render::text(&p);
    assert!(
        text.contains(
            "<   revert   a  on local: back to its snapshot before-upgrade, as alice asked (fleet snapshot revert)"
        ),
        "{text}"
    );
    assert!(text.contains("~   update   b"), "{text}");
    assert_eq!(p.steps.len(), 2, "{text}");
    assert!(
        matches!(&p.steps[0].change, Change::Revert { snapshot } if snapshot == "before-upgrade")
    );
    assert_eq!(p.count(Action::Revert), 1);
}

/// A workspace whose file is gone is destroyed only with an approval, and not while a VM
/// attaches it; a workspace never shrinks (a conflict, no step).
#[test]
fn workspaces_are_destroyed_only_when_approved_and_let_go_and_never_shrink() {
    let ws = |name: &str, size: &str| {
        (
            format!("fleet/workspaces/{name}.yaml"),
            format!(
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {{name: {name}}}\nspec: {{provider: local, size: {size}}}\n"
            ),
        )
    };
    let before = desired(&[
        vm(
            "a",
            "  workspaces: [{name: notes, mountPath: /workspace}]\n",
        ),
        ws("notes", "2Gi"),
    ]);
    let found = |name: &str, mib: u64, attached: &[&str]| crate::observe::ObservedWorkspace {
        name: name.into(),
        size_mib: mib,
        attached_to: attached.iter().map(|s| (*s).to_owned()).collect(),
        identity: format!("{name}-1"),
    };
    let mut o = observed(vec![applied(&before.vms["a"], true)]);
    let host = o.hosts.get_mut("local").expect("local");
    host.workspaces = vec![
        found("notes", 2048, &["a"]),
        found("old", 64, &[]),
        found("kept", 64, &["gone"]),
    ];

    // Smaller than it is: refused, and `a` gets no step.
    let smaller = desired(&[
        vm(
            "a",
            "  workspaces: [{name: notes, mountPath: /workspace}]\n",
        ),
        ws("notes", "1Gi"),
    ]);
    let p = super::plan(&smaller, &o, &PlanInputs::default());
    assert!(
        p.conflicts
            .iter()
            .any(|c| c.vm == "a" && c.message.contains("only grows")),
        "{:?}",
        p.conflicts
    );
    assert!(p.steps.iter().all(|s| s.vm != "a"), "{:?}", p.steps);

    // `old` and `kept` are not in the revision: both held; `kept` also waits for `gone`.
    let p = super::plan(&before, &o, &PlanInputs::default());
    let held: Vec<&str> = p.held.iter().map(|h| h.step.vm.as_str()).collect();
    assert_eq!(held, ["workspace:kept", "workspace:old"], "{:?}", p.held);
    assert!(
        p.held[0]
            .why
            .iter()
            .any(|w| w.contains("always waits for an approval"))
    );
    let digest = p.approval_digest.clone().expect("an approval digest");
    let approved = PlanInputs {
        approved: [digest].into_iter().collect(),
        ..PlanInputs::default()
    };
    let p = super::plan(&before, &o, &approved);
    let run: Vec<&str> = p.steps.iter().map(|s| s.vm.as_str()).collect();
    assert_eq!(run, ["workspace:old"], "{p:?}");
    assert_eq!(p.deferred.len(), 1);
    assert!(
        p.deferred[0].why.contains("VM gone still attaches it"),
        "{:?}",
        p.deferred
    );
    assert!(
        render::text(&p).contains("destroyWorkspace workspace:old"),
        "{}",
        render::text(&p)
    );
}

/// Two VMs swapping workspaces in one commit: each first lets go of its old one (an update
/// without the one the other still holds), then takes the new one on the next pass.
#[test]
fn vms_swapping_workspaces_let_go_first_and_never_wait_for_each_other() {
    let ws = |name: &str| {
        (
            format!("fleet/workspaces/{name}.yaml"),
            format!(
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {{name: {name}}}\nspec: {{provider: local, size: 1Gi}}\n"
            ),
        )
    };
    let mounting = |vm_name: &str, ws_name: &str| {
        vm(
            vm_name,
            &format!("  workspaces: [{{name: {ws_name}, mountPath: /workspace}}]\n"),
        )
    };
    let before = desired(&[
        mounting("a", "one"),
        mounting("b", "two"),
        ws("one"),
        ws("two"),
    ]);
    let after = desired(&[
        mounting("a", "two"),
        mounting("b", "one"),
        ws("one"),
        ws("two"),
    ]);
    let found = |name: &str, attached: &[&str]| crate::observe::ObservedWorkspace {
        name: name.into(),
        size_mib: 1024,
        attached_to: attached.iter().map(|s| (*s).to_owned()).collect(),
        identity: format!("{name}-1"),
    };
    let mut o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&before.vms["b"], true),
    ]);
    o.hosts.get_mut("local").expect("local").workspaces =
        vec![found("one", &["a"]), found("two", &["b"])];
    let p = super::plan(&after, &o, &PlanInputs::default());
    assert!(p.deferred.is_empty(), "nothing waits: {:?}", p.deferred);
    assert_eq!(p.steps.len(), 2, "{p:?}");
    for step in &p.steps {
        let Change::Update {
            desired, restart, ..
        } = &step.change
        else {
            panic!("an update: {step:?}");
        };
        assert!(desired.config.workspaces.is_empty(), "{step:?}");
        assert!(*restart, "a running VM restarts to let go");
    }

    // Both let go: the next pass gives each its new workspace.
    let lets_go = |step: &Step| match &step.change {
        Change::Update { desired, .. } => applied(desired, true),
        other => panic!("an update: {other:?}"),
    };
    let mut o = observed(p.steps.iter().map(lets_go).collect());
    o.hosts.get_mut("local").expect("local").workspaces =
        vec![found("one", &[]), found("two", &[])];
    let p = super::plan(&after, &o, &PlanInputs::default());
    assert!(p.deferred.is_empty(), "{:?}", p.deferred);
    let mounts: Vec<(&str, &str)> = p
        .steps
        .iter()
        .filter_map(|s| match &s.change {
            Change::Update { desired, .. } => Some((
                s.vm.as_str(),
                desired.config.workspaces.first()?.name.as_str(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(mounts, [("a", "two"), ("b", "one")], "{p:?}");

    // A VM that only takes a workspace (lets go of none) still waits for it.
    let only_takes = desired(&[mounting("a", "one"), vm("b", ""), ws("one"), ws("two")]);
    let mut o = observed(vec![
        applied(&before.vms["a"], true),
        applied(&desired(&[vm("b", "")]).vms["b"], true),
    ]);
    o.hosts.get_mut("local").expect("local").workspaces =
        vec![found("one", &["a"]), found("two", &[])];
    let moved = desired(&[vm("a", ""), mounting("b", "one"), ws("one"), ws("two")]);
    let p = super::plan(&moved, &o, &PlanInputs::default());
    assert_eq!(
        p.deferred
            .iter()
            .map(|d| d.step.vm.as_str())
            .collect::<Vec<_>>(),
        ["b"],
        "{p:?}"
    );
    let _ = only_takes;
}

/// An image's content digest a stamp lacks (written before fleet recorded them) is no step
/// of its own; a digest that changes replaces the VM (a disk) or restarts it (kernel and
/// initrd), with the reason in words.
#[test]
fn an_image_rebuilt_in_place_is_a_change_and_a_first_digest_is_not() {
    let before = desired(&[vm("a", "")]);
    let found = applied(&before.vms["a"], true);
    let mut after = before.vms["a"].clone();
    after.config.image.disk_sha256 = Some("d1".into());
    after.config.image.boot_sha256 = Some("b1".into());
    after.spec_hash = after.config.hash();
    assert_eq!(super::step_for_owned(&after, &found), None);
    // With another change, the update records them.
    let mut more = after.clone();
    more.config.labels.insert("team".into(), "infra".into());
    more.spec_hash = more.config.hash();
    let step = super::step_for_owned(&more, &found).expect("a step");
    assert_eq!(step.action(), Action::Update, "{step:?}");
    assert!(!step.restart(), "{step:?}");
    assert!(
        matches!(&step.change, Change::Update { desired, .. } if desired.config.image.disk_sha256.as_deref() == Some("d1"))
    );

    let found = applied(&after, true);
    let mut rebuilt = after.clone();
    rebuilt.config.image.disk_sha256 = Some("d2".into());
    rebuilt.spec_hash = rebuilt.config.hash();
    let step = super::step_for_owned(&rebuilt, &found).expect("a step");
    assert_eq!(step.action(), Action::Replace, "{step:?}");
    assert!(
        render::reason_text(&step).contains("image content changed"),
        "{}",
        render::reason_text(&step)
    );
    // A base disk fleet cannot read now (gone, unreadable, being written): no step, and
    // the stamp keeps the digest a later rebuild is compared with.
    let mut unreadable = after.clone();
    unreadable.config.image.disk_sha256 = None;
    unreadable.config.image.boot_sha256 = None;
    unreadable.spec_hash = unreadable.config.hash();
    assert_eq!(super::step_for_owned(&unreadable, &found), None);
    // An adopted VM's disks were never made from the image: its content is no change.
    let mut adopted = applied(&after, true);
    let stamp = std::sync::Arc::make_mut(adopted.stamp.as_mut().expect("stamp"));
    stamp.adopted = true;
    assert_eq!(super::step_for_owned(&rebuilt, &adopted), None);
    let mut new_kernel = after.clone();
    new_kernel.config.image.boot_sha256 = Some("b2".into());
    new_kernel.spec_hash = new_kernel.config.hash();
    let step = super::step_for_owned(&new_kernel, &found).expect("a step");
    assert_eq!(step.action(), Action::Update, "{step:?}");
    assert!(step.restart(), "{step:?}");
}

/// A workspace smaller than the stamp says (a grow that did not finish) is healed like
/// drift: an update that restarts the running VM, which grows it while down.
#[test]
fn a_grow_that_did_not_finish_is_planned_again() {
    let desired = desired(&[
        vm(
            "a",
            "  workspaces: [{name: notes, mountPath: /workspace}]\n",
        ),
        (
            "fleet/workspaces/notes.yaml".to_owned(),
            "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: notes}\nspec: {provider: local, size: 2Gi}\n".to_owned(),
        ),
    ]);
    let mut o = observed(vec![applied(&desired.vms["a"], true)]);
    o.hosts.get_mut("local").expect("local").workspaces = vec![crate::observe::ObservedWorkspace {
        name: "notes".into(),
        size_mib: 1024,
        attached_to: vec!["a".into()],
        identity: "notes-1".into(),
    }];
    let p = super::plan(&desired, &o, &PlanInputs::default());
    assert_eq!(p.steps.len(), 1, "{p:?}");
    assert!(p.steps[0].restart(), "{:?}", p.steps[0]);
    assert!(
        render::reason_text(&p.steps[0]).contains("a grow did not finish"),
        "{}",
        render::reason_text(&p.steps[0])
    );
    // Grown: nothing to do.
    o.hosts.get_mut("local").expect("local").workspaces[0].size_mib = 2048;
    assert!(
        super::plan(&desired, &o, &PlanInputs::default())
            .steps
            .is_empty()
    );
}

/// A stamp without a boot digest but with a disk one: a rebuilt disk is still a replace.
#[test]
fn a_new_digest_never_hides_a_changed_one() {
    let mut applied_vm = desired(&[vm("a", "")]).vms["a"].clone();
    applied_vm.config.image.disk_sha256 = Some("d1".into());
    applied_vm.spec_hash = applied_vm.config.hash();
    let found = applied(&applied_vm, true);
    let mut rebuilt = applied_vm.clone();
    rebuilt.config.image.disk_sha256 = Some("d2".into());
    rebuilt.config.image.boot_sha256 = Some("b1".into());
    rebuilt.spec_hash = rebuilt.config.hash();
    let step = super::step_for_owned(&rebuilt, &found).expect("a step");
    assert_eq!(step.action(), Action::Replace, "{step:?}");
}
