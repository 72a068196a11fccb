//! `plan(desired, observed, inputs) -> Plan`: what apply must do, and why.
//!
//! A plan is data: a list of steps (one per VM at most), the steps held for an approval or
//! deferred by a backoff, the conflicts fleet refuses to touch, the revision and
//! observed-state digest it was made from, and its own digest. It is finished when it is
//! made: everything that decides it (history, secret changes, approvals given, backoffs) is
//! an input, its digest is computed once, and nothing edits it afterwards. It is rendered
//! (`render`), saved (`Plan::read_saved`), checked for staleness (`Plan::check_fresh`) and
//! walked by apply, which never re-decides.
//!
//! Architecture invariant: pure. No I/O, no clock, no randomness.

pub mod fields;
pub mod guard;
pub mod render;
pub mod secrets;
pub mod task_runs;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::spec::Action;
pub use fields::{FieldChange, FieldEffect, VmField};

use crate::digest::hex;
use crate::ids::ApprovalId;
use crate::lease::{LeaseExpiry, LeaseRecord};
use crate::observe::{Observed, ObservedVm};
use crate::resolve::{Desired, DesiredVm, ResolvedPolicy, VmConfig};
use crate::snapshot::Revision;
use crate::spec::PowerState;
use crate::time::Timestamp;

/// Version 2 added `deferred` and `approved`; start and stop steps no longer carry the
/// configurations they do not use, `reason` follows a step's action data, and field changes
/// are listed in `VmField` order.
pub const FORMAT_VERSION: u32 = 2;

/// Why a step exists. For people: apply never branches on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Reason {
    /// The VM is in fleet/ but not on its provider.
    NotFound,
    /// The configuration matches; the power state does not.
    PowerState { want: PowerState },
    /// Fields changed that can change in place.
    SpecChanged { fields: Vec<VmField> },
    /// A field changed that cannot change in place.
    ReplaceForced { field: VmField, why: String },
    /// A VM `fleet adopt` brought under management changed: fleet did not make its disks
    /// or definition, so it is made again from its image (its old disk stays on the host).
    AdoptedChanged { fields: Vec<VmField> },
    /// The stamp's copy of the applied configuration is unreadable; rewrite it.
    StampUnreadable,
    /// fleet's create of this VM stopped before the VM got its configuration (its stamp
    /// names no spec yet); the create is run again and finishes it.
    CreateUnfinished,
    /// fleet made this VM but it is no longer in fleet/.
    RemovedFromFleet,
    /// Reality moved away from the applied spec (see the plan's `drift`); the step puts it back.
    Drifted { what: String },
    /// A fresh member of a pool (`lifecycle`): made for a task run, or kept warm for one.
    FreshMember { pool: String },
    /// A fresh member no run holds any longer, beyond the pool's warm ones. Not held by
    /// `policy.approve` nor counted against `maxDestroysPerApply`: fleet made it for one run.
    FreshMemberReleased { pool: String },
    /// The VM has been idle since `since` (`idle`; `None`: it never did anything fleet
    /// saw): it is stopped until a task run is due on it.
    Idle { since: Option<Timestamp> },
    /// A task run is due on a VM stopped for idleness: it is started for it.
    Woken { task: String },
    /// A run of `task` waits on a VM with `reset: beforeEachTask` that ran something since
    /// it was made or last reset.
    ResetBeforeRun { task: String },
    /// The host asked for the VM to go back to `snapshot` (`fleet snapshot revert`).
    RevertAsked { snapshot: String, by: String },
    /// The VM's lease (`lease`) ended at `ended`: it is stopped or destroyed as it says.
    LeaseEnded {
        ended: Timestamp,
        #[serde(rename = "onExpiry")]
        on_expiry: LeaseExpiry,
    },
}

/// A VM kept stopped for idleness until a task run is due on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdleVm {
    pub vm: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
}

/// A VM whose lease has ended: stopped or gone until a renewal (a changed
/// `lease.renewals`, or `fleet lease renew`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseEnded {
    pub vm: String,
    pub provider: String,
    pub ended: Timestamp,
    pub on_expiry: LeaseExpiry,
}

/// Where reality differs from what fleet applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub vm: String,
    pub provider: String,
    /// What differs, in words.
    pub what: String,
    /// Whether the plan heals it (`policy.selfHeal`).
    pub healed: bool,
}

/// What the last apply left, as the status files remember it: the VMs that existed then and
/// the power state their spec wanted. A VM missing now, or stopped while its spec wanted it
/// running, moved behind fleet's back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub applied: BTreeMap<String, PowerState>,
}

/// Everything planning takes besides the desired and observed state, gathered by the shell
/// before it plans.
#[derive(Clone, Debug, Default)]
pub struct PlanInputs {
    /// What the last apply left; drift is judged against it.
    pub history: History,
    /// The revision's secret changes (`secrets::changes`).
    pub secrets: Vec<secrets::SecretChange>,
    /// VMs whose steps wait, with why (a failed step's backoff). Their steps are planned and
    /// shown as deferred, never silently left out.
    pub deferred: BTreeMap<String, String>,
    /// Approval digests someone gave (committed Answers, host answer files, recorded
    /// approvals). Held steps run when their approval digest is among them.
    pub approved: BTreeSet<String>,
    /// The time of the pass: leases are judged against it (`None`: leases never end, as
    /// for a plan of a revision alone).
    pub now: Option<Timestamp>,
    /// What fleet remembers of each VM's lease (`lease::advance`), by VM name.
    pub leases: BTreeMap<String, LeaseRecord>,
    /// What each VM with an `idle` rule did (`idle::Activity`), by VM name; a VM without
    /// an entry is never judged idle.
    pub activity: BTreeMap<String, crate::idle::Activity>,
    /// VMs with `reset: beforeEachTask` a reset is due for (`reset::due`), with the task
    /// whose run waits.
    pub resets: BTreeMap<String, String>,
    /// Reverts to a snapshot the host asked for (`fleet snapshot revert`), by VM name.
    pub reverts: BTreeMap<String, RevertRequest>,
}

/// A revert of a VM to one of its snapshots, asked for from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertRequest {
    pub snapshot: String,
    /// Who asked (the host user, and who they said they were).
    pub by: String,
}

/// A step that waits before it may run; it is planned again when its wait is over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deferred {
    pub step: Step,
    pub why: String,
}

/// Held steps an approval released: the digest it named and the steps, one line each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    pub digest: String,
    pub steps: Vec<String>,
}

/// One thing apply does to one VM, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The VM the step acts on, or for a workspace's destroy `workspace:<name>`
    /// (`workspace_step_name`: never a VM's name, which is a DNS label).
    pub vm: String,
    pub provider: String,
    /// The action (`action` in JSON) with exactly the data it needs.
    #[serde(flatten)]
    pub change: Change,
    pub reason: Reason,
}

/// What a step does. `desired` is the VM as it should be after the step; `applied` the
/// configuration last applied and `applied_revision` the revision that applied it, both
/// from the stamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "action",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub enum Change {
    Create {
        desired: DesiredVm,
    },
    Start,
    Stop,
    Update {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changes: Vec<FieldChange>,
        /// The running VM is restarted for the change to take effect.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
        desired: DesiredVm,
        /// `None` when the stamp's copy is unreadable (the update rewrites it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied: Option<VmConfig>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied_revision: Option<String>,
    },
    Replace {
        changes: Vec<FieldChange>,
        desired: DesiredVm,
        applied: VmConfig,
        applied_revision: String,
    },
    Destroy {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied: Option<VmConfig>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied_revision: Option<String>,
    },
    /// Back to the state it was made in, and booted (`reset`).
    Reset {
        desired: DesiredVm,
    },
    /// Back to one of its snapshots (`fleet snapshot revert`).
    Revert {
        snapshot: String,
    },
    /// A workspace's volume is deleted (the step's `vm` is `workspace:<name>`).
    DestroyWorkspace {
        workspace: String,
        /// The volume's identity as observed (`ObservedWorkspace::identity`): part of the
        /// approval's digest, so an approval never carries over to another volume.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        identity: String,
    },
}

impl Step {
    pub fn action(&self) -> Action {
        match self.change {
            Change::Create { .. } => Action::Create,
            Change::Start => Action::Start,
            Change::Stop => Action::Stop,
            Change::Update { .. } => Action::Update,
            Change::Replace { .. } => Action::Replace,
            Change::Destroy { .. } => Action::Destroy,
            Change::Reset { .. } => Action::Reset,
            Change::Revert { .. } => Action::Revert,
            Change::DestroyWorkspace { .. } => Action::DestroyWorkspace,
        }
    }

    /// The VM as it should be after the step (create, update, replace).
    pub fn desired(&self) -> Option<&DesiredVm> {
        match &self.change {
            Change::Create { desired }
            | Change::Update { desired, .. }
            | Change::Replace { desired, .. }
            | Change::Reset { desired } => Some(desired),
            Change::Start
            | Change::Stop
            | Change::Destroy { .. }
            | Change::Revert { .. }
            | Change::DestroyWorkspace { .. } => None,
        }
    }

    /// The configuration last applied, when the step acts on it (update, replace, destroy).
    pub fn applied(&self) -> Option<&VmConfig> {
        match &self.change {
            Change::Update { applied, .. } | Change::Destroy { applied, .. } => applied.as_ref(),
            Change::Replace { applied, .. } => Some(applied),
            Change::Create { .. }
            | Change::Start
            | Change::Stop
            | Change::Reset { .. }
            | Change::Revert { .. }
            | Change::DestroyWorkspace { .. } => None,
        }
    }

    pub fn applied_revision(&self) -> Option<&str> {
        match &self.change {
            Change::Update {
                applied_revision, ..
            }
            | Change::Destroy {
                applied_revision, ..
            } => applied_revision.as_deref(),
            Change::Replace {
                applied_revision, ..
            } => Some(applied_revision),
            Change::Create { .. }
            | Change::Start
            | Change::Stop
            | Change::Reset { .. }
            | Change::Revert { .. }
            | Change::DestroyWorkspace { .. } => None,
        }
    }

    /// The fields that differ (update, replace).
    pub fn changes(&self) -> &[FieldChange] {
        match &self.change {
            Change::Update { changes, .. } | Change::Replace { changes, .. } => changes,
            Change::Create { .. }
            | Change::Start
            | Change::Stop
            | Change::Destroy { .. }
            | Change::Reset { .. }
            | Change::Revert { .. }
            | Change::DestroyWorkspace { .. } => &[],
        }
    }

    /// Whether the update restarts the running VM.
    pub fn restart(&self) -> bool {
        matches!(self.change, Change::Update { restart: true, .. })
    }
}

/// A VM fleet wants but will not touch: another VM holds its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub vm: String,
    pub provider: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub(crate) format_version: u32,
    pub(crate) fleet: String,
    pub(crate) revision: Revision,
    pub(crate) observed_digest: String,
    pub(crate) policy: ResolvedPolicy,
    pub(crate) steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) conflicts: Vec<Conflict>,
    /// Drift found, healed by a step or (with `selfHeal: false`) only reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) drift: Vec<Drift>,
    /// Problems that keep part of the fleet from being planned (an unreachable provider).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) errors: Vec<String>,
    /// Steps that wait for an approval (see `guard`); apply never runs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) held: Vec<guard::HeldStep>,
    /// What an approval of the held steps names (sha256 over them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) approval_digest: Option<String>,
    /// The approval that released held steps into `steps`, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) approved: Option<Approved>,
    /// Steps that wait for their VM's backoff; apply does not run them in this pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) deferred: Vec<Deferred>,
    /// Secret values added, changed, removed or unreadable since fleet last delivered them
    /// (by keyed fingerprint; never a value), with what each forces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) secrets: Vec<secrets::SecretChange>,
    /// Things an operator must know about the revision itself: a provider that accepts
    /// any TLS certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) warnings: Vec<String>,
    /// VMs whose lease has ended, stopped or destroyed (by this plan or before it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) leases_ended: Vec<LeaseEnded>,
    /// VMs kept stopped because they are idle (`idle`), stopped by this plan or before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) idle: Vec<IdleVm>,
    /// sha256 over everything above; approvals name it.
    pub(crate) digest: String,
}

/// A plan of exactly `steps` under `policy`, for tests of apply that need a plan no
/// revision would make (a stuck VM beside a broken one).
#[cfg(any(test, feature = "test-support"))]
impl Plan {
    pub fn of_steps(policy: ResolvedPolicy, steps: Vec<Step>) -> Plan {
        let mut plan = Plan {
            format_version: FORMAT_VERSION,
            fleet: "lab".into(),
            revision: Revision {
                id: "r".into(),
                label: "r".into(),
                signed_by: None,
            },
            observed_digest: String::new(),
            policy,
            steps,
            conflicts: Vec::new(),
            drift: Vec::new(),
            errors: Vec::new(),
            held: Vec::new(),
            approval_digest: None,
            approved: None,
            deferred: Vec::new(),
            secrets: Vec::new(),
            warnings: Vec::new(),
            leases_ended: Vec::new(),
            idle: Vec::new(),
            digest: String::new(),
        };
        plan.digest = plan.compute_digest();
        plan
    }
}

/// Read access: a plan is made by `plan` (or read back by `Plan::read_saved`) and never
/// edited after, so its digest covers what apply does.
impl Plan {
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    pub fn revision(&self) -> &Revision {
        &self.revision
    }

    pub fn observed_digest(&self) -> &str {
        &self.observed_digest
    }

    pub fn policy(&self) -> &ResolvedPolicy {
        &self.policy
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    pub fn drift(&self) -> &[Drift] {
        &self.drift
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    pub fn held(&self) -> &[guard::HeldStep] {
        &self.held
    }

    pub fn approval_digest(&self) -> Option<&str> {
        self.approval_digest.as_deref()
    }

    pub fn approved(&self) -> Option<&Approved> {
        self.approved.as_ref()
    }

    pub fn deferred(&self) -> &[Deferred] {
        &self.deferred
    }

    pub fn secrets(&self) -> &[secrets::SecretChange] {
        &self.secrets
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn leases_ended(&self) -> &[LeaseEnded] {
        &self.leases_ended
    }

    pub fn idle(&self) -> &[IdleVm] {
        &self.idle
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl Plan {
    /// Whether apply has anything to run or to hold. Deferred steps are not changes of this
    /// pass: a pass whose only steps wait for a backoff is a no-op (no apply, no event).
    pub fn has_changes(&self) -> bool {
        !self.steps.is_empty() || !self.held.is_empty()
    }

    /// The id of the approval that holds this plan's held steps, or that released them.
    pub fn approval_id(&self) -> Option<ApprovalId> {
        self.approval_digest
            .as_deref()
            .or(self.approved.as_ref().map(|a| a.digest.as_str()))
            .and_then(ApprovalId::from_digest)
    }

    pub fn count(&self, action: Action) -> usize {
        self.steps.iter().filter(|s| s.action() == action).count()
    }

    pub fn compute_digest(&self) -> String {
        let mut copy = self.clone();
        copy.digest = String::new();
        let json = serde_json::to_vec(&copy).expect("Plan serialises to JSON");
        hex(&Sha256::digest(json))
    }

    /// Reads a plan saved with `fleet plan -out`: refused when it is not a plan, has another
    /// format, was edited (its digest does not match; the digest has no key, so this catches
    /// accidents, and `check_fresh` the rest), or names an approval digest that is not one.
    pub fn read_saved(json: &str) -> Result<Plan, SavedPlanError> {
        let plan: Plan = serde_json::from_str(json).map_err(SavedPlanError::NotAPlan)?;
        if plan.format_version != FORMAT_VERSION {
            return Err(SavedPlanError::Format {
                found: plan.format_version,
            });
        }
        if plan.digest != plan.compute_digest() {
            return Err(SavedPlanError::Edited);
        }
        let approved = plan.approved.as_ref().map(|a| &a.digest);
        for digest in plan.approval_digest.iter().chain(approved) {
            if digest.len() != 64 || !crate::digest::is_lower_hex(digest) {
                return Err(SavedPlanError::ApprovalDigest(digest.clone()));
            }
        }
        Ok(plan)
    }

    /// Whether this saved plan still describes what `fresh` (planned again now) does: the
    /// same revision, the same observations, and the same work. Planning is deterministic,
    /// so a saved plan nobody edited always matches a fresh one of the same inputs, and an
    /// edited one never does, whatever digest it carries.
    pub fn check_fresh(&self, fresh: &Plan) -> Result<(), Stale> {
        if self.revision.id != fresh.revision.id {
            return Err(Stale::Revision {
                saved: self.revision.label.clone(),
                current: fresh.revision.label.clone(),
            });
        }
        if self.observed_digest != fresh.observed_digest {
            return Err(Stale::Observed);
        }
        if self.compute_digest() != fresh.compute_digest() {
            return Err(Stale::Work);
        }
        Ok(())
    }
}

/// Why a saved plan cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SavedPlanError {
    #[error("is not a fleet plan: {0}")]
    NotAPlan(serde_json::Error),
    #[error("has plan format {found}, this fleet reads format {FORMAT_VERSION}; make a new plan")]
    Format { found: u32 },
    #[error("was edited after it was made (its digest does not match); make a new plan")]
    Edited,
    #[error(
        "names the approval digest {0:?}, which is not a sha256 digest (64 lower-case hex digits); make a new plan"
    )]
    ApprovalDigest(String),
}

/// Why a saved plan no longer describes what apply would do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error(
        "stale plan: it was made from revision {saved} but the current revision is {current}; make a new plan"
    )]
    Revision { saved: String, current: String },
    #[error(
        "stale plan: the VMs changed since it was made (observed state digest differs); make a new plan"
    )]
    Observed,
    #[error(
        "the saved plan does not match what fleet plans now for the same revision and VMs (its steps, held steps or approvals differ: it was edited or made by another fleet); nothing was applied; make a new plan"
    )]
    Work,
}

/// Computes the plan. Deterministic: the same inputs give the same plan and digest.
pub fn plan(desired: &Desired, observed: &Observed, inputs: &PlanInputs) -> Plan {
    let history = &inputs.history;
    let mut steps = Vec::new();
    let mut conflicts = Vec::new();
    let mut errors = Vec::new();
    let mut drift = Vec::new();
    let mut leases_ended = Vec::new();
    let mut idle = Vec::new();
    let heal = desired.policy.self_heal;

    for (provider, why) in &observed.unreachable {
        errors.push(format!(
            "provider {provider} cannot be used: {why}; its VMs are not planned"
        ));
    }
    for (vm, why) in &desired.unplaced {
        errors.push(format!("VM {vm} waits for a provider: {why}"));
    }

    // One index instead of a scan per VM: planning stays linear in the fleet's size.
    let index: std::collections::HashMap<(&str, &str), &ObservedVm> = observed
        .hosts
        .iter()
        .flat_map(|(provider, host)| {
            host.vms
                .iter()
                .map(move |vm| ((provider.as_str(), vm.name.as_str()), &**vm))
        })
        .collect();
    for vm in desired.vms.values() {
        let provider = &vm.config.provider;
        if !observed.hosts.contains_key(provider) {
            continue; // unreachable: never create what we cannot see
        }
        let found = index.get(&(provider.as_str(), vm.name.as_str())).copied();
        // Why a VM git wants running is kept stopped (its lease ended, or it is idle), or
        // started (a run woke it): the reason its power step gives.
        let (mut kept_stopped, mut woken) = (None, None);
        match power_override(desired, inputs, vm, found) {
            PowerOverride::None => {}
            PowerOverride::NotMade(ended) => {
                leases_ended.push(ended);
                continue;
            }
            PowerOverride::Destroyed(ended, found) => {
                steps.push(destroy(provider, found, lease_reason(&ended)));
                leases_ended.push(ended);
                continue;
            }
            PowerOverride::LeaseEnded(ended) => {
                kept_stopped = Some(lease_reason(&ended));
                leases_ended.push(ended);
            }
            PowerOverride::Idle(since) => {
                idle.push(IdleVm {
                    vm: vm.name.clone(),
                    provider: provider.clone(),
                    since,
                });
                kept_stopped = Some(Reason::Idle { since });
            }
            PowerOverride::Woken(task) => woken = Some(Reason::Woken { task }),
        }
        let kept_stopped_vm;
        let vm = match kept_stopped {
            Some(_) => {
                kept_stopped_vm = DesiredVm {
                    state: PowerState::Stopped,
                    ..vm.clone()
                };
                &kept_stopped_vm
            }
            None => vm,
        };
        match found {
            None if history.applied.contains_key(&vm.name) => {
                drift.push(Drift {
                    vm: vm.name.clone(),
                    provider: provider.clone(),
                    what: "the VM is gone: it was removed outside fleet".into(),
                    healed: heal,
                });
                if heal {
                    steps.push(Step {
                        vm: vm.name.clone(),
                        provider: provider.clone(),
                        change: Change::Create {
                            desired: vm.clone(),
                        },
                        reason: Reason::Drifted {
                            what: "the VM was removed outside fleet; recreating it".into(),
                        },
                    });
                }
            }
            None => steps.push(Step {
                vm: vm.name.clone(),
                provider: provider.clone(),
                change: Change::Create {
                    desired: vm.clone(),
                },
                reason: match (&vm.config.pool, vm.config.fresh) {
                    (Some(pool), true) => Reason::FreshMember { pool: pool.clone() },
                    _ => Reason::NotFound,
                },
            }),
            Some(found) if !found.owned_by(&desired.fleet) => {
                conflicts.push(Conflict {
                    vm: vm.name.clone(),
                    provider: provider.clone(),
                    message: conflict_message(&desired.fleet, found),
                });
            }
            Some(found) => {
                let found_drift = owned_drift(vm, found, history);
                // A power step a lease or idleness asks for says so (and runs whatever
                // the drift policy).
                let mut overridden = false;
                let step = step_for_owned(vm, found).map(|mut step| {
                    let why = match step.action() {
                        Action::Stop => &kept_stopped,
                        Action::Start => &woken,
                        _ => &None,
                    };
                    if let Some(why) = why {
                        step.reason = why.clone();
                        overridden = true;
                    }
                    step
                });
                // A run waits on a used VM that resets before each run: the reset (which
                // boots it) comes before anything but a change of its configuration.
                let step = match (inputs.resets.get(&vm.name), step) {
                    (
                        Some(task),
                        None
                        | Some(Step {
                            change: Change::Start,
                            ..
                        }),
                    ) if vm.config.reset && vm.state == PowerState::Running => {
                        overridden = true;
                        Some(Step {
                            vm: vm.name.clone(),
                            provider: provider.clone(),
                            change: Change::Reset {
                                desired: vm.clone(),
                            },
                            reason: Reason::ResetBeforeRun { task: task.clone() },
                        })
                    }
                    (_, step) => step,
                };
                // A revert the host asked for comes before a power step the spec asks for
                // (it sets the power state itself); a change of configuration goes first,
                // and a lease's or idleness's stop too, and the revert after them.
                let step = match (inputs.reverts.get(&vm.name), step) {
                    (
                        Some(revert),
                        None
                        | Some(Step {
                            change: Change::Start | Change::Stop,
                            reason: Reason::PowerState { .. },
                            ..
                        }),
                    ) => {
                        overridden = true;
                        Some(Step {
                            vm: vm.name.clone(),
                            provider: provider.clone(),
                            change: Change::Revert {
                                snapshot: revert.snapshot.clone(),
                            },
                            reason: Reason::RevertAsked {
                                snapshot: revert.snapshot.clone(),
                                by: revert.by.clone(),
                            },
                        })
                    }
                    (_, step) => step,
                };
                match (found_drift, step) {
                    (None, step) => steps.extend(step),
                    (Some(what), step) => {
                        // A step the spec itself asks for runs whatever the policy; a step
                        // that only heals drift runs when self-healing is on.
                        let heals_only = !overridden
                            && step.as_ref().is_none_or(|s| {
                                matches!(s.reason, Reason::PowerState { .. })
                                    || s.changes().is_empty()
                            });
                        // An adopted VM's definition is not fleet's to rewrite: drift in
                        // its resources is reported, never healed in place.
                        let adopted = found.stamp.as_ref().is_some_and(|s| s.adopted);
                        let heals_resources = heal && !adopted;
                        drift.push(Drift {
                            vm: vm.name.clone(),
                            provider: provider.clone(),
                            what: what.clone(),
                            healed: if step.is_none() {
                                heals_resources
                            } else {
                                heal || (!heals_only && !overridden)
                            },
                        });
                        match step {
                            Some(step) if !heals_only => steps.push(step),
                            Some(mut step) if heal => {
                                step.reason = Reason::Drifted { what };
                                steps.push(step);
                            }
                            None if heals_resources => steps.push(heal_resources(
                                vm,
                                found,
                                what,
                                observes_running_config(desired, provider),
                            )),
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    for (provider, host) in &observed.hosts {
        for found in &host.vms {
            if !found.owned_by(&desired.fleet) {
                continue;
            }
            let wanted_here = desired
                .vms
                .get(&found.name)
                .is_some_and(|vm| &vm.config.provider == provider);
            if !wanted_here {
                let applied = found.stamp.as_ref().and_then(|s| s.config.as_ref());
                // Released without an approval only by a pool this revision still makes
                // fresh members in, on this provider; anything else goes the usual way.
                let released = applied
                    .filter(|c| c.fresh)
                    .and_then(|c| c.pool.clone())
                    .filter(|pool| {
                        desired.fresh_pools.get(pool).is_some_and(|p| {
                            &p.template.config.provider == provider
                                && crate::lifecycle::is_member_of(found, &desired.fleet, pool)
                        })
                    });
                let reason = match released {
                    Some(pool) => Reason::FreshMemberReleased { pool },
                    None => Reason::RemovedFromFleet,
                };
                steps.push(destroy(provider, found, reason));
            }
        }
    }

    let mut waiting = workspace_steps(desired, observed, &mut steps, &mut conflicts);
    steps.sort_by(|a, b| (&a.vm, &a.provider).cmp(&(&b.vm, &b.provider)));
    let (mut steps, mut held) = guard::hold(desired, observed, steps);
    let mut approval_digest = guard::approval_digest(&held);
    let mut approved = None;
    if let Some(digest) = approval_digest.take_if(|d| inputs.approved.contains(d)) {
        let lines = held.iter().map(guard::HeldStep::line).collect();
        steps.extend(std::mem::take(&mut held).into_iter().map(|h| h.step));
        steps.sort_by(|a, b| (&a.vm, &a.provider).cmp(&(&b.vm, &b.provider)));
        approved = Some(Approved {
            digest,
            steps: lines,
        });
    }
    // A destroy at a lease's end that waits for an approval stops the VM meanwhile: the
    // lease is over either way.
    for held in held
        .iter()
        .filter(|_| !desired.policy.approve.contains(&Action::Stop))
    {
        let waits = matches!(held.step.reason, Reason::LeaseEnded { .. })
            && held.step.action() == Action::Destroy
            && index
                .get(&(held.step.provider.as_str(), held.step.vm.as_str()))
                .is_some_and(|vm| vm.running);
        if waits {
            steps.push(Step {
                change: Change::Stop,
                ..held.step.clone()
            });
        }
    }
    steps.sort_by(|a, b| (&a.vm, &a.provider).cmp(&(&b.vm, &b.provider)));
    let (deferred, steps): (Vec<Step>, Vec<Step>) = steps
        .into_iter()
        .partition(|s| inputs.deferred.contains_key(&s.vm));
    let (waits, steps): (Vec<Step>, Vec<Step>) =
        steps.into_iter().partition(|s| waiting.contains_key(&s.vm));
    let deferred = deferred
        .into_iter()
        .map(|step| Deferred {
            why: inputs.deferred[&step.vm].clone(),
            step,
        })
        .chain(waits.into_iter().map(|step| Deferred {
            why: waiting.remove(&step.vm).unwrap_or_default(),
            step,
        }))
        .collect();
    let mut plan = Plan {
        format_version: FORMAT_VERSION,
        fleet: desired.fleet.clone(),
        revision: desired.revision.clone(),
        observed_digest: observed.digest(&desired.fleet, |name| desired.vms.contains_key(name)),
        policy: desired.policy.clone(),
        steps,
        conflicts,
        drift,
        errors,
        held,
        approval_digest,
        approved,
        deferred,
        secrets: inputs.secrets.clone(),
        warnings: warnings(desired),
        leases_ended,
        idle,
        digest: String::new(),
    };
    plan.digest = plan.compute_digest();
    plan
}

/// A destroy of an owned VM, with what its stamp says was applied.
fn destroy(provider: &str, found: &ObservedVm, reason: Reason) -> Step {
    let stamp = found.stamp.as_ref();
    Step {
        vm: found.name.clone(),
        provider: provider.to_owned(),
        change: Change::Destroy {
            applied: stamp.and_then(|s| s.config.clone()),
            applied_revision: stamp.map(|s| s.revision.clone()),
        },
        reason,
    }
}

/// What a VM's lease or idleness makes of what git asks for it.
enum PowerOverride<'a> {
    None,
    /// Its lease ended and it is not on its provider: not made again until a renewal.
    NotMade(LeaseEnded),
    /// Its lease ended with `onExpiry: destroy`.
    Destroyed(LeaseEnded, &'a ObservedVm),
    /// Its lease ended with `onExpiry: stop`: kept stopped.
    LeaseEnded(LeaseEnded),
    /// Idle since then: kept stopped.
    Idle(Option<Timestamp>),
    /// A run of this task is due on it: it runs.
    Woken(String),
}

fn power_override<'a>(
    desired: &Desired,
    inputs: &PlanInputs,
    vm: &DesiredVm,
    found: Option<&'a ObservedVm>,
) -> PowerOverride<'a> {
    let owned = found.filter(|f| f.owned_by(&desired.fleet));
    if let Some(ended) = lease_ended(desired, inputs, vm, found) {
        return match (found, owned) {
            (None, _) => PowerOverride::NotMade(ended),
            (_, Some(found)) if ended.on_expiry == LeaseExpiry::Destroy => {
                PowerOverride::Destroyed(ended, found)
            }
            (_, Some(_)) => PowerOverride::LeaseEnded(ended),
            // Another's VM under its name: the conflict is planned as usual.
            _ => PowerOverride::None,
        };
    }
    match owned.and_then(|_| idle_verdict(desired, inputs, vm)) {
        Some(crate::idle::Verdict::Idle { since }) => PowerOverride::Idle(since),
        Some(crate::idle::Verdict::Busy { task }) => PowerOverride::Woken(task),
        Some(crate::idle::Verdict::Awake) | None => PowerOverride::None,
    }
}

/// The VM's lease, when it has one that ended by the pass's time.
fn lease_ended(
    desired: &Desired,
    inputs: &PlanInputs,
    vm: &DesiredVm,
    found: Option<&ObservedVm>,
) -> Option<LeaseEnded> {
    let lease = desired.leases.get(&vm.name)?;
    let now = inputs.now?;
    // As `lease::states` judges it.
    let created = found
        .filter(|f| f.owned_by(&desired.fleet))
        .and_then(|f| f.stamp.as_ref()?.created);
    let state = crate::lease::state(lease, inputs.leases.get(&vm.name), created)?;
    state.ended(now).then(|| LeaseEnded {
        vm: vm.name.clone(),
        provider: vm.config.provider.clone(),
        ended: state.ends,
        on_expiry: state.on_expiry,
    })
}

/// What idleness makes of a VM git wants running, when it has an `idle` rule and the
/// shell said what it did.
fn idle_verdict(
    desired: &Desired,
    inputs: &PlanInputs,
    vm: &DesiredVm,
) -> Option<crate::idle::Verdict> {
    if vm.state != PowerState::Running {
        return None;
    }
    let stop_after = desired.idle.get(&vm.name)?;
    let activity = inputs.activity.get(&vm.name)?;
    Some(crate::idle::verdict(*stop_after, activity, inputs.now?))
}

fn lease_reason(ended: &LeaseEnded) -> Reason {
    Reason::LeaseEnded {
        ended: ended.ended,
        on_expiry: ended.on_expiry,
    }
}

/// What `Plan::warnings` says of a revision: providers that trust any certificate, and
/// egress rules that can have no effect.
pub fn warnings(desired: &Desired) -> Vec<String> {
    let insecure = desired.providers.iter().filter_map(|p| match &p.host {
        crate::spec::Provider::Proxmox(x) if x.insecure_skip_verify => Some(format!(
            "provider {} accepts any TLS certificate (insecureSkipVerify: true): anyone on the path to {} can read its API token and act as the cluster; set caFile instead",
            x.name.0, x.endpoint
        )),
        _ => None,
    });
    let unbrokered_tasks = desired
        .tasks
        .values()
        .filter(|t| t.egress.is_some() && !desired.egress.contains_key(&t.vm))
        .map(|t| {
            format!(
                "task {} ({}) narrows its VM's egress, but VM {} is not brokered (network.mode: brokered): its rules have no effect",
                t.name, t.source, t.vm
            )
        });
    insecure
        .chain(desired.egress_unused.iter().cloned())
        .chain(unbrokered_tasks)
        .collect()
}

/// How an owned VM differs from what fleet applied to it, if it does: its definition's
/// vCPUs or memory were changed, or it stopped although its applied spec wanted it running.
fn owned_drift(vm: &DesiredVm, found: &ObservedVm, history: &History) -> Option<String> {
    let applied = found.stamp.as_ref()?.config.as_ref()?;
    let mut what = Vec::new();
    if found.memory_mib != applied.memory_mib {
        what.push(format!(
            "memory is {} MiB, the applied spec says {} MiB",
            found.memory_mib, applied.memory_mib
        ));
    }
    if found.cpus != applied.cpus {
        what.push(format!(
            "vCPUs are {}, the applied spec says {}",
            found.cpus, applied.cpus
        ));
    }
    let wanted_running = history.applied.get(&vm.name) == Some(&PowerState::Running);
    if !found.running && wanted_running && vm.state == PowerState::Running {
        what.push("the VM was stopped outside fleet".to_owned());
    }
    (!what.is_empty()).then(|| what.join("; "))
}

/// Whether a provider's observations show what its VMs run with (Proxmox: the current
/// config, CPUs and memory changing only at boot) rather than what their next boot uses
/// (libvirt: the persistent definition).
fn observes_running_config(desired: &Desired, provider: &str) -> bool {
    desired
        .providers
        .iter()
        .any(|p| p.name() == provider && p.kind() == crate::spec::ProviderKind::Proxmox)
}

/// An update that rewrites a drifted definition with the desired spec. Where observations
/// show the definition the next boot uses (libvirt), no restart: the running VM still has
/// what fleet gave it. Where they show what the VM runs with (Proxmox), the drift is in
/// the running VM, so a running VM restarts to be healed.
fn heal_resources(vm: &DesiredVm, found: &ObservedVm, what: String, running_config: bool) -> Step {
    let mut changes = Vec::new();
    if found.memory_mib != vm.config.memory_mib {
        changes.push(FieldChange {
            field: VmField::MemoryMib,
            from: found.memory_mib.into(),
            to: vm.config.memory_mib.into(),
        });
    }
    if found.cpus != vm.config.cpus {
        changes.push(FieldChange {
            field: VmField::Cpus,
            from: found.cpus.into(),
            to: vm.config.cpus.into(),
        });
    }
    let stamp = found.stamp.as_ref();
    Step {
        vm: vm.name.clone(),
        provider: vm.config.provider.clone(),
        change: Change::Update {
            changes,
            restart: running_config && found.running,
            desired: vm.clone(),
            applied: stamp.and_then(|s| s.config.clone()),
            applied_revision: stamp.map(|s| s.revision.clone()),
        },
        reason: Reason::Drifted { what },
    }
}

fn conflict_message(fleet: &str, found: &ObservedVm) -> String {
    match &found.stamp {
        Some(s) if s.fleet != fleet => format!(
            "a VM named {:?} already exists and belongs to fleet {:?}; fleet {fleet:?} will not touch it. Rename the VM in fleet/, or remove it from the other fleet",
            found.name, s.fleet
        ),
        Some(s) => format!(
            "a VM named {:?} carries fleet {fleet:?}'s stamp for VM {:?}; fleet will not touch it. Rename it back with virsh domrename, or remove it",
            found.name, s.name
        ),
        None => format!(
            "a VM named {:?} already exists and was not made by fleet; fleet will not touch it. Rename the VM in fleet/, or remove the other VM yourself",
            found.name
        ),
    }
}

/// Whether `desired` differs from `applied` only by image digests the stamp lacks (written
/// before fleet recorded them): no step of its own; the VM's next change records them.
fn only_new_digests(desired: &VmConfig, applied: &VmConfig) -> bool {
    let (want, had) = (&desired.image, &applied.image);
    let new_disk = had.disk_sha256.is_none() && want.disk_sha256.is_some();
    let new_boot = had.boot_sha256.is_none() && want.boot_sha256.is_some();
    if !new_disk && !new_boot {
        return false;
    }
    let mut masked = desired.clone();
    if new_disk {
        masked.image.disk_sha256 = None;
    }
    if new_boot {
        masked.image.boot_sha256 = None;
    }
    &masked == applied
}

/// `vm` with the image digests this host cannot read now taken from what was applied (same
/// files): an unknown digest says nothing changed, and must not erase the record a later
/// rebuild is compared with.
fn with_known_digests<'a>(
    vm: &'a DesiredVm,
    applied: Option<&VmConfig>,
) -> std::borrow::Cow<'a, DesiredVm> {
    let (want, Some(had)) = (&vm.config.image, applied.map(|c| &c.image)) else {
        return std::borrow::Cow::Borrowed(vm);
    };
    let same_files =
        (&want.kernel, &want.initrd, &want.disk) == (&had.kernel, &had.initrd, &had.disk);
    let disk = want.disk_sha256.is_none() && had.disk_sha256.is_some();
    let boot = want.boot_sha256.is_none() && had.boot_sha256.is_some();
    if !same_files || !(disk || boot) {
        return std::borrow::Cow::Borrowed(vm);
    }
    let mut known = vm.clone();
    if disk {
        known.config.image.disk_sha256.clone_from(&had.disk_sha256);
    }
    if boot {
        known.config.image.boot_sha256.clone_from(&had.boot_sha256);
    }
    known.spec_hash = known.config.hash();
    std::borrow::Cow::Owned(known)
}

fn step_for_owned(vm: &DesiredVm, found: &ObservedVm) -> Option<Step> {
    let stamp = found.stamp.as_ref()?;
    let known = with_known_digests(vm, stamp.config.as_ref());
    let vm = &*known;
    let step = |change: Change, reason: Reason| Step {
        vm: vm.name.clone(),
        provider: vm.config.provider.clone(),
        change,
        reason,
    };
    if stamp.spec_hash.is_empty() {
        let create = Change::Create {
            desired: vm.clone(),
        };
        return Some(step(create, Reason::CreateUnfinished));
    }
    let want_running = vm.state == PowerState::Running;
    // The common case, checked before anything is copied: nothing to do.
    if stamp.spec_hash == vm.spec_hash
        && stamp.config.as_ref() == Some(&vm.config)
        && found.running == want_running
    {
        return None;
    }
    if found.running == want_running
        && stamp
            .config
            .as_ref()
            .is_some_and(|applied| only_new_digests(&vm.config, applied))
    {
        return None;
    }
    let Some(applied) = &stamp.config else {
        let rewrite = Change::Update {
            changes: Vec::new(),
            restart: found.running && want_running,
            desired: vm.clone(),
            applied: None,
            applied_revision: Some(stamp.revision.clone()),
        };
        return Some(step(rewrite, Reason::StampUnreadable));
    };
    if stamp.spec_hash == vm.spec_hash && applied == &vm.config {
        let power = if want_running {
            Change::Start
        } else {
            Change::Stop
        };
        return Some(step(power, Reason::PowerState { want: vm.state }));
    }
    let mut changes = fields::diff(applied, &vm.config);
    // An adopted VM's definition and disks are not fleet's to edit: any change remakes it.
    // Its disks were never made from the image, so what the image's files hold is none of
    // its business.
    if stamp.adopted {
        changes.retain(|c| !c.field.is_image_content());
        if changes.is_empty() {
            return None;
        }
        let replace = Change::Replace {
            changes: changes.clone(),
            desired: vm.clone(),
            applied: applied.clone(),
            applied_revision: stamp.revision.clone(),
        };
        let fields = changes.iter().map(|c| c.field).collect();
        return Some(step(replace, Reason::AdoptedChanged { fields }));
    }
    if let Some((field, why)) = changes.iter().find_map(|c| match c.effect() {
        FieldEffect::Replace(why) => Some((c.field, why)),
        _ => None,
    }) {
        let replace = Change::Replace {
            changes,
            desired: vm.clone(),
            applied: applied.clone(),
            applied_revision: stamp.revision.clone(),
        };
        let why = why.to_owned();
        return Some(step(replace, Reason::ReplaceForced { field, why }));
    }
    let reason = Reason::SpecChanged {
        fields: changes.iter().map(|c| c.field).collect(),
    };
    let restart = found.running
        && want_running
        && changes
            .iter()
            .any(|c| c.effect() == FieldEffect::NeedsRestart);
    let update = Change::Update {
        changes,
        restart,
        desired: vm.clone(),
        applied: Some(applied.clone()),
        applied_revision: Some(stamp.revision.clone()),
    };
    Some(step(update, reason))
}

/// The step name of a workspace (`workspace:<name>`): never a VM's, since VM names are
/// DNS labels.
pub fn workspace_step_name(workspace: &str) -> String {
    format!("workspace:{workspace}")
}

/// Workspaces' part of the plan: a destroy (held by the guard, always) for each of this
/// fleet's workspaces the revision no longer has, waiting while a VM still attaches it; a
/// VM whose workspace would shrink is a conflict, not a step; a VM that mounts a workspace
/// another VM still attaches waits for it to be let go. Returns the steps that wait, and why.
fn workspace_steps(
    desired: &Desired,
    observed: &Observed,
    steps: &mut Vec<Step>,
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<String, String> {
    let mut waiting = BTreeMap::new();
    for (provider, host) in &observed.hosts {
        for found in &host.workspaces {
            let wanted = desired
                .workspaces
                .get(&found.name)
                .is_some_and(|w| &w.provider == provider);
            if wanted {
                continue;
            }
            let step = Step {
                vm: workspace_step_name(&found.name),
                provider: provider.clone(),
                change: Change::DestroyWorkspace {
                    workspace: found.name.clone(),
                    identity: found.identity.clone(),
                },
                reason: Reason::RemovedFromFleet,
            };
            if let Some(vm) = found.attached_to.first() {
                waiting.insert(
                    step.vm.clone(),
                    format!("VM {vm} still attaches it; it is destroyed once no VM does"),
                );
            }
            steps.push(step);
        }
    }
    for vm in desired.vms.values() {
        let Some(host) = observed.hosts.get(&vm.config.provider) else {
            continue;
        };
        for mount in &vm.config.workspaces {
            let Some(found) = host.workspaces.iter().find(|w| w.name == mount.name) else {
                continue;
            };
            if mount.size_mib < found.size_mib {
                conflicts.push(Conflict {
                    vm: vm.name.clone(),
                    provider: vm.config.provider.clone(),
                    message: format!(
                        "workspace {} is {} MiB and the revision asks for {} MiB: a workspace only grows (its data would not fit); keep its size",
                        mount.name, found.size_mib, mount.size_mib
                    ),
                });
                steps.retain(|s| s.vm != vm.name);
            }
            // Smaller than its stamp says (a grow that did not finish: a crash after the
            // definition was saved, or a VM started meanwhile): healed like drift, grown
            // once the VM is down.
            if mount.size_mib > found.size_mib
                && found.attached_to.iter().all(|a| *a == vm.name)
                && !steps.iter().any(|s| s.vm == vm.name)
                && let Some(owned) = host
                    .vms
                    .iter()
                    .find(|v| v.name == vm.name && v.owned_by(&desired.fleet))
                && let Some(stamp) = &owned.stamp
            {
                steps.push(Step {
                    vm: vm.name.clone(),
                    provider: vm.config.provider.clone(),
                    change: Change::Update {
                        changes: Vec::new(),
                        restart: owned.running && vm.state == PowerState::Running,
                        desired: vm.clone(),
                        applied: stamp.config.clone(),
                        applied_revision: Some(stamp.revision.clone()),
                    },
                    reason: Reason::Drifted {
                        what: format!(
                            "workspace {} is {} MiB and its spec says {} MiB: a grow did not finish; it grows while the VM is down",
                            mount.name, found.size_mib, mount.size_mib
                        ),
                    },
                });
            }
            if let Some(other) = found.attached_to.iter().find(|a| **a != vm.name) {
                waiting.insert(
                    vm.name.clone(),
                    format!(
                        "workspace {} is still attached to VM {other}; it moves once {other} lets it go",
                        mount.name
                    ),
                );
            }
        }
    }
    // A VM that waits for a workspace and lets go of another goes ahead without the one it
    // waits for: two VMs swapping workspaces in one commit would otherwise wait for each
    // other for ever. It takes the one it waits for on a later pass.
    for step in steps.iter_mut() {
        if waiting.contains_key(&step.vm)
            && let Some(partial) = let_go_first(step, observed)
        {
            *step = partial;
            waiting.remove(&step.vm);
        }
    }
    waiting
}

/// `step` (an update or replace of a VM that lets go of a workspace) without the mounts
/// another VM still attaches; `None` when it is no such step.
fn let_go_first(step: &Step, observed: &Observed) -> Option<Step> {
    let (desired, applied) = match &step.change {
        Change::Update {
            desired,
            applied: Some(applied),
            ..
        }
        | Change::Replace {
            desired, applied, ..
        } => (desired, applied),
        _ => return None,
    };
    let lets_go = applied
        .workspaces
        .iter()
        .any(|a| !desired.config.workspaces.iter().any(|d| d.name == a.name));
    if !lets_go {
        return None;
    }
    let host = observed.hosts.get(&step.provider)?;
    let held_elsewhere = |name: &str| {
        host.workspaces
            .iter()
            .any(|w| w.name == name && w.attached_to.iter().any(|a| *a != step.vm))
    };
    let mut partial = desired.clone();
    partial
        .config
        .workspaces
        .retain(|m| !held_elsewhere(&m.name));
    partial.spec_hash = partial.config.hash();
    let changes = fields::diff(applied, &partial.config);
    let change = match &step.change {
        Change::Update {
            restart,
            applied_revision,
            ..
        } => Change::Update {
            changes,
            restart: *restart,
            desired: partial,
            applied: Some(applied.clone()),
            applied_revision: applied_revision.clone(),
        },
        Change::Replace {
            applied_revision, ..
        } => Change::Replace {
            changes,
            desired: partial,
            applied: applied.clone(),
            applied_revision: applied_revision.clone(),
        },
        _ => return None,
    };
    Some(Step {
        change,
        ..step.clone()
    })
}

#[cfg(test)]
mod tests;
