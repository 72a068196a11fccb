//! Idle stop and wake (`idle: {stopAfter: 30m}` on a VM or a pool's template). A VM with no
//! task run under way or due, no prompt waiting, and nothing started or ended for
//! `stopAfter` is stopped (`Reason::Idle`) and kept stopped: `state: running` in git then
//! means "allowed to run". When a task run is due on it, the plan starts it again
//! (`Reason::Woken`) and the task book dispatches the run once its agent says hello.
//!
//! What the VM did is gathered by the shell (`Activity`: the task runs the status directory
//! records and the revision starts, and when a pass last saw the VM start); the decision
//! is made here, with the time as an argument.
//!
//! Architecture invariant: pure. The clock is an argument.

use std::time::Duration;

use crate::time::Timestamp;

/// The shortest `stopAfter`: a VM stopped sooner would not have booted.
pub const MIN_STOP_AFTER: Duration = Duration::from_secs(10);

/// What a VM did, as far as idleness goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// A task whose run on the VM is under way, waits for input, or is due (pending, or
    /// started by the revision being planned): the VM is busy.
    pub busy: Option<String>,
    /// When it last did something: started running, or a run on it was made, started or
    /// ended.
    pub last: Option<Timestamp>,
}

/// What idleness makes of a VM that is allowed to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not idle (yet).
    Awake,
    /// A run is due or under way on it: it runs (`task` wakes it when stopped).
    Busy { task: String },
    /// Idle since `since` (its last activity plus `stopAfter`): stopped, and kept so.
    Idle { since: Option<Timestamp> },
}

pub fn verdict(stop_after: Duration, activity: &Activity, now: Timestamp) -> Verdict {
    if let Some(task) = &activity.busy {
        return Verdict::Busy { task: task.clone() };
    }
    match activity.last {
        // Never seen running nor used (a create whose start failed, a VM git just let
        // run): it gets its start, and its idle time counts from there.
        None => Verdict::Awake,
        Some(last) if now.system_time() < last.system_time() + stop_after => Verdict::Awake,
        Some(last) => Verdict::Idle {
            since: Some(Timestamp::from(last.system_time() + stop_after)),
        },
    }
}

/// When to look again, after `now`: the soonest time one of these VMs becomes idle. A busy
/// VM has none: the end of its run is planned for when it comes (the task book asks).
pub fn next_idle<'a>(
    vms: impl IntoIterator<Item = (Duration, &'a Activity)>,
    now: Timestamp,
) -> Option<Timestamp> {
    vms.into_iter()
        .filter(|(_, a)| a.busy.is_none())
        .filter_map(|(after, a)| Some(Timestamp::from(a.last?.system_time() + after)))
        .filter(|t| *t > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs))
    }

    #[test]
    fn a_vm_is_idle_stop_after_its_last_activity_unless_a_run_is_due() {
        let after = Duration::from_secs(60);
        let quiet = Activity {
            busy: None,
            last: Some(t(100)),
        };
        assert_eq!(verdict(after, &quiet, t(159)), Verdict::Awake);
        assert_eq!(
            verdict(after, &quiet, t(160)),
            Verdict::Idle {
                since: Some(t(160))
            }
        );
        let due = Activity {
            busy: Some("build".into()),
            ..quiet.clone()
        };
        assert_eq!(
            verdict(after, &due, t(1000)),
            Verdict::Busy {
                task: "build".into()
            }
        );
        // Never seen running nor used: it gets its start first.
        assert_eq!(verdict(after, &Activity::default(), t(0)), Verdict::Awake);
        assert_eq!(
            next_idle([(after, &quiet), (after, &due)], t(120)),
            Some(t(160))
        );
        assert_eq!(next_idle([(after, &quiet)], t(160)), None);
        assert_eq!(next_idle([(after, &due)], t(160)), None);
    }
}
