//! Steps that wait for a human. A destroy or replace of a VM whose stamp says `protect`
//! (so deleting or editing its file cannot lift the protection), a step kind listed in
//! `policy.approve`, all destroys of a plan with more than `policy.maxDestroysPerApply`, and a
//! revision that would
//! destroy every VM fleet runs on a provider (`fleet/` emptied by mistake) are held: apply
//! never runs them until an approval names the held steps' digest. Pure.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Action, Step};
use crate::digest::hex;
use crate::observe::Observed;
use crate::resolve::Desired;

/// A step and every reason it waits for an approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldStep {
    pub step: Step,
    pub why: Vec<String>,
}

impl HeldStep {
    /// `destroy web-1 on local: why; why`: how approval records and plans list it.
    pub fn line(&self) -> String {
        format!(
            "{} {} on {}: {}",
            self.step.action().as_str(),
            self.step.vm,
            self.step.provider,
            self.why.join("; ")
        )
    }
}

fn released(step: &Step) -> bool {
    matches!(step.reason, super::Reason::FreshMemberReleased { .. })
}

/// Splits `steps` into those that may run and those held for an approval.
pub fn hold(
    desired: &Desired,
    observed: &Observed,
    steps: Vec<Step>,
) -> (Vec<Step>, Vec<HeldStep>) {
    let policy = &desired.policy;
    let protected = |step: &Step| {
        observed
            .hosts
            .get(&step.provider)
            .and_then(|h| h.vms.iter().find(|vm| vm.name == step.vm))
            .and_then(|vm| vm.stamp.as_ref())
            .is_some_and(|stamp| stamp.protect)
    };
    // Providers on which fleet runs VMs but the revision wants none.
    let emptied: BTreeSet<&str> = observed
        .hosts
        .iter()
        .filter(|(provider, host)| {
            host.vms.iter().any(|vm| vm.owned_by(&desired.fleet))
                // Fresh members do not count: a warm pool must not hide an emptied fleet/.
                && !desired
                    .vms
                    .values()
                    .any(|vm| &vm.config.provider == *provider && !vm.config.fresh)
        })
        .map(|(provider, _)| provider.as_str())
        .collect();

    let mut reasons: Vec<Vec<String>> = steps
        .iter()
        .map(|step| {
            let mut why = Vec::new();
            let dangerous = matches!(step.action(), Action::Destroy | Action::Replace);
            if dangerous && protected(step) {
                why.push(format!(
                    "{} is protected (recorded in its stamp): set protect: false and apply that first, or approve",
                    step.vm
                ));
            }
            // A fresh member is made for one run and goes when no run holds it: that is
            // what the pool asked for, so only its protection holds it.
            if released(step) {
                return why;
            }
            if step.action() == Action::DestroyWorkspace {
                why.push(
                    "a workspace's destroy always waits for an approval: its data goes with it"
                        .to_owned(),
                );
            }
            if policy.approve.contains(&step.action()) {
                why.push(format!("policy.approve lists {}", step.action().as_str()));
            }
            if step.action() == Action::Destroy && emptied.contains(step.provider.as_str()) {
                why.push(format!(
                    "this revision destroys every VM fleet runs on provider {} (was fleet/ emptied by mistake?)",
                    step.provider
                ));
            }
            why
        })
        .collect();
    // Over the cap, every destroy waits: running the first few would only spread a mass
    // destroy over several applies (the daemon applies again within a second).
    let destroys = steps
        .iter()
        .zip(&reasons)
        .filter(|(s, why)| s.action() == Action::Destroy && why.is_empty() && !released(s))
        .count();
    if destroys > policy.max_destroys_per_apply as usize {
        for (step, why) in steps.iter().zip(reasons.iter_mut()) {
            if step.action() == Action::Destroy && why.is_empty() && !released(step) {
                why.push(format!(
                    "this plan destroys {destroys} VMs, more than policy.maxDestroysPerApply ({})",
                    policy.max_destroys_per_apply
                ));
            }
        }
    }
    let mut run = Vec::new();
    let mut held = Vec::new();
    for (step, why) in steps.into_iter().zip(reasons) {
        if why.is_empty() {
            run.push(step);
        } else {
            held.push(HeldStep { step, why });
        }
    }
    (run, held)
}

/// What an approval names: a digest of the held steps (VM, provider, action, and the spec they
/// act on), not of the revision, so committing the approval itself does not change it.
pub fn approval_digest(held: &[HeldStep]) -> Option<String> {
    if held.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    for s in held {
        let applied = s.step.applied().map(|c| c.hash()).unwrap_or_default();
        let wanted = match &s.step.change {
            super::Change::DestroyWorkspace { identity, .. } => identity.clone(),
            _ => s
                .step
                .desired()
                .map(|d| d.spec_hash.clone())
                .unwrap_or_default(),
        };
        h.update(
            format!(
                "{}\0{}\0{}\0{applied}\0{wanted}\n",
                s.step.provider,
                s.step.vm,
                s.step.action().as_str()
            )
            .as_bytes(),
        );
    }
    Some(hex(&h.finalize()))
}
