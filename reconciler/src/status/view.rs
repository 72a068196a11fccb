//! What the status files say about each VM, derived from the desired state, a fresh
//! observation and apply's outcomes (conditions, phases, counts), and what the planner
//! takes back from them (`history`). Pure functions of their inputs.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::*;

/// What apply learned about each VM, for its status file.
#[derive(Clone, Debug, Default)]
pub struct VmOutcome {
    pub error: Option<String>,
    pub conflict: Option<String>,
    /// Drift found this pass, and whether the plan healed it.
    pub drift: Option<(String, bool)>,
    /// It is in a crash loop: the evidence.
    pub crash_loop: Option<String>,
    /// Its lease, as the pass judged it.
    pub lease: Option<super::LeaseStatus>,
    /// Kept stopped for idleness (`idle`): since when (`None` inside: never seen doing
    /// anything).
    pub idle: Option<Option<crate::time::Timestamp>>,
}

/// Builds every VM's status from the desired state, a fresh observation and apply's
/// outcomes. Pure.
pub fn vm_statuses(
    desired: &Desired,
    observed: &crate::observe::Observed,
    outcomes: &BTreeMap<String, VmOutcome>,
    agents: &BTreeMap<String, AgentStatus>,
    previous: &BTreeMap<String, VmStatus>,
    now: SystemTime,
) -> BTreeMap<String, VmStatus> {
    let mut out = BTreeMap::new();
    for vm in desired.vms.values() {
        let provider = &vm.config.provider;
        let found: Option<&ObservedVm> = observed.find(provider, &vm.name);
        let owned = found.filter(|f| f.owned_by(&desired.fleet));
        let outcome = outcomes.get(&vm.name).cloned().unwrap_or_default();
        let mut conditions = Vec::new();
        if let Some((what, healed)) = &outcome.drift {
            conditions.push(Condition {
                kind: ConditionKind::Drifted,
                // Healed drift is recorded as resolved; reported-only drift stays true.
                status: !healed || outcome.error.is_some(),
                reason: if *healed {
                    "Healed".into()
                } else {
                    "SelfHealDisabled".into()
                },
                message: what.clone(),
            });
        }
        if let Some(evidence) = &outcome.crash_loop {
            conditions.push(Condition {
                kind: ConditionKind::CrashLooping,
                status: true,
                reason: "StoppedOnItsOwn".into(),
                message: evidence.clone(),
            });
        }
        if let Some(message) = &outcome.conflict {
            conditions.push(Condition {
                kind: ConditionKind::Conflict,
                status: true,
                reason: "NameTakenByForeignVM".into(),
                message: message.clone(),
            });
        }
        let unobserved = observed.unreachable.get(provider);
        if let Some(why) = unobserved {
            conditions.push(Condition {
                kind: ConditionKind::ProviderObserved,
                status: false,
                reason: "ObserveFailed".into(),
                message: format!("provider {provider}: {why}"),
            });
        }
        let phase = match (owned, &outcome.error, &outcome.conflict) {
            (_, _, Some(_)) => Phase::Failed,
            // A step of this pass failed (its provider may have gone after).
            (_, Some(_), _) => Phase::Failed,
            _ if unobserved.is_some() => Phase::Unknown,
            (None, None, None) => Phase::Pending,
            (Some(f), None, None) if f.running => Phase::Running,
            (Some(_), None, None) => Phase::Stopped,
        };
        let agent = agents.get(&vm.name).cloned();
        if let Some(a) = &agent {
            conditions.push(Condition {
                kind: ConditionKind::AgentConnected,
                status: a.connected,
                reason: if a.connected {
                    "Hello".into()
                } else {
                    "LinkLost".into()
                },
                message: format!("fleet-agent {} (boot {})", a.agent_version, a.boot_id),
            });
        }
        let lease_ended = outcome
            .lease
            .as_ref()
            .is_some_and(|l| l.ends.system_time() <= now);
        let before = previous.get(&vm.name);
        let was_running = before
            .and_then(|b| b.observed.as_ref())
            .is_some_and(|o| o.running);
        // A pass that did not see it (its provider unreachable) knows nothing of a start.
        let unseen = before.is_some_and(|b| b.observed.is_none());
        let started = match owned {
            Some(f) if f.running && (was_running || unseen) => {
                before.and_then(|b| b.started).or(Some(now.into()))
            }
            Some(f) if f.running => Some(now.into()),
            _ => before.and_then(|b| b.started),
        };
        if let Some(f) = owned {
            let in_sync = f
                .stamp
                .as_ref()
                .is_some_and(|s| s.spec_hash == vm.spec_hash);
            let state_ok = f.running == (vm.state == PowerState::Running);
            conditions.push(Condition {
                kind: ConditionKind::Ready,
                status: in_sync
                    && state_ok
                    && outcome.error.is_none()
                    && !lease_ended
                    && outcome.idle.is_none(),
                reason: if lease_ended {
                    "LeaseEnded".into()
                } else if outcome.idle.is_some() && !f.running {
                    "Idle".into()
                } else if !in_sync {
                    "SpecNotApplied".into()
                } else if !state_ok {
                    "PowerStateDiffers".into()
                } else {
                    "Converged".into()
                },
                message: format!(
                    "spec {}, {}",
                    if in_sync { "applied" } else { "not applied" },
                    match (f.running, &outcome.idle) {
                        (true, _) => "running".to_owned(),
                        (false, Some(Some(since))) => format!("stopped: idle since {since}"),
                        (false, Some(None)) => "stopped: idle".to_owned(),
                        (false, None) => "stopped".to_owned(),
                    }
                ),
            });
        }
        out.insert(
            vm.name.clone(),
            VmStatus {
                name: vm.name.clone(),
                provider: provider.clone(),
                phase,
                desired_state: vm.state,
                observed: owned.map(|f| ObservedResources {
                    uuid: f.uuid.clone(),
                    running: f.running,
                    cpus: f.cpus,
                    memory_mib: f.memory_mib,
                }),
                spec_hash: vm.spec_hash.clone(),
                applied_revision: owned
                    .and_then(|f| f.stamp.as_ref())
                    .map(|s| s.revision.clone()),
                source: vm.source.clone(),
                agent,
                conditions,
                lease: outcome.lease.clone(),
                started,
                last_error: outcome.error.clone(),
                updated: Some(now.into()),
            },
        );
    }
    out
}

/// What the last apply left, from the status files: VMs that existed and the power state
/// their spec wanted. The planner judges drift against it.
pub fn history(vms: &BTreeMap<String, VmStatus>) -> crate::plan::History {
    crate::plan::History {
        applied: vms
            .values()
            .filter_map(|vm| {
                // Applied running means seen running: a VM whose start failed was never
                // running, so finding it stopped is not drift.
                let seen = vm.observed.as_ref()?;
                let state = if seen.running {
                    vm.desired_state
                } else {
                    PowerState::Stopped
                };
                Some((vm.name.clone(), state))
            })
            .collect(),
    }
}

pub fn counts(vms: &BTreeMap<String, VmStatus>) -> Counts {
    let mut c = Counts {
        vms: vms.len(),
        ..Counts::default()
    };
    for vm in vms.values() {
        match vm.phase {
            Phase::Running => c.running += 1,
            Phase::Stopped => c.stopped += 1,
            Phase::Pending => c.pending += 1,
            Phase::Failed => c.failed += 1,
            Phase::Unknown => c.unknown += 1,
        }
        if vm
            .conditions
            .iter()
            .any(|k| k.kind == ConditionKind::Conflict)
        {
            c.conflicts += 1;
        }
        if vm
            .conditions
            .iter()
            .any(|k| k.kind == ConditionKind::Drifted && k.status)
        {
            c.drifted += 1;
        }
    }
    c
}

#[cfg(test)]
mod history_tests {
    use super::*;

    fn status(name: &str, desired: PowerState, running: Option<bool>) -> VmStatus {
        VmStatus {
            name: name.into(),
            provider: "local".into(),
            phase: Phase::Stopped,
            desired_state: desired,
            observed: running.map(|running| ObservedResources {
                uuid: String::new(),
                running,
                cpus: 1,
                memory_mib: 128,
            }),
            spec_hash: String::new(),
            applied_revision: None,
            source: String::new(),
            agent: None,
            conditions: Vec::new(),
            lease: None,
            started: None,
            last_error: None,
            updated: None,
        }
    }

    #[test]
    fn a_vm_never_seen_running_was_not_applied_running() {
        let vms: BTreeMap<String, VmStatus> = [
            status("ran", PowerState::Running, Some(true)),
            status("failed-to-start", PowerState::Running, Some(false)),
            status("never-made", PowerState::Running, None),
        ]
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
        let h = history(&vms);
        assert_eq!(h.applied.get("ran"), Some(&PowerState::Running));
        assert_eq!(h.applied.get("failed-to-start"), Some(&PowerState::Stopped));
        assert_eq!(h.applied.get("never-made"), None);
    }
}
