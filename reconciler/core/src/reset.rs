//! Clean resets (`reset: beforeEachTask` on a VM or its loadout): before each task run but
//! the first after the VM was made or last reset, the VM returns to the state it was made in
//! (libvirt: a new overlay on the same base disk and a fresh boot; Proxmox: a rollback to
//! the snapshot fleet took when it made the VM), and its secrets are delivered again when
//! its agent says hello. Runs on such a VM go one at a time.
//!
//! A VM is used once a run reached it after its last reset (or since it was made). The
//! plan resets a used VM when a run waits on it and none is under way
//! (`Reason::ResetBeforeRun`); the task book dispatches a run only to an unused VM
//! (`may_dispatch`), so the two agree without talking: both read the same records and the
//! time of the VM's last reset, which apply records once a reset has run.
//!
//! Architecture invariant: pure.

use crate::time::Timestamp;

/// A run on the VM, as far as resets go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFacts {
    pub task: String,
    pub state: RunState,
    /// When it started in the guest, if it did.
    pub started: Option<Timestamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Waits to be dispatched.
    Pending,
    /// Staging, running or waiting for input.
    Active,
    Finished,
}

/// Whether a run reached the VM since its last reset (`None`: never reset, so since it was
/// made; a run of an earlier VM of that name costs one reset more, never one less).
pub fn used(runs: &[RunFacts], last_reset: Option<Timestamp>) -> bool {
    runs.iter().any(|r| {
        r.state == RunState::Active
            || r.started
                .is_some_and(|started| last_reset.is_none_or(|reset| started >= reset))
    })
}

/// The task whose run a reset is due for: one waits, none is under way, and the VM was
/// used since its last reset.
pub fn due(runs: &[RunFacts], last_reset: Option<Timestamp>) -> Option<&str> {
    if runs.iter().any(|r| r.state == RunState::Active) || !used(runs, last_reset) {
        return None;
    }
    runs.iter()
        .find(|r| r.state == RunState::Pending)
        .map(|r| r.task.as_str())
}

/// Whether a waiting run may be dispatched to the VM now: nothing under way and nothing
/// run since its last reset.
pub fn may_dispatch(runs: &[RunFacts], last_reset: Option<Timestamp>) -> bool {
    !used(runs, last_reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + secs),
        )
    }

    fn run(task: &str, state: RunState, started: Option<u64>) -> RunFacts {
        RunFacts {
            task: task.into(),
            state,
            started: started.map(t),
        }
    }

    #[test]
    fn a_used_vm_is_reset_before_the_next_run_and_runs_go_one_at_a_time() {
        // A VM made and never used takes its first run as it is.
        let first = [run("a", RunState::Pending, None)];
        assert!(may_dispatch(&first, None));
        assert_eq!(due(&first, None), None);
        // While a run is under way, nothing else is dispatched and nothing is reset.
        let busy = [
            run("a", RunState::Active, Some(10)),
            run("b", RunState::Pending, None),
        ];
        assert!(!may_dispatch(&busy, None));
        assert_eq!(due(&busy, None), None);
        // Once it ended, b waits for a reset.
        let after = [
            run("a", RunState::Finished, Some(10)),
            run("b", RunState::Pending, None),
        ];
        assert!(!may_dispatch(&after, None));
        assert_eq!(due(&after, None), Some("b"));
        // Reset at 20: b may go, and no second reset is due.
        assert!(may_dispatch(&after, Some(t(20))));
        assert_eq!(due(&after, Some(t(20))), None);
        // A run started in the second of the reset counts as after it: one reset too many
        // at worst, never a run on a used disk.
        let same_second = [
            run("b", RunState::Finished, Some(20)),
            run("c", RunState::Pending, None),
        ];
        assert_eq!(due(&same_second, Some(t(20))), Some("c"));
        // Nothing waits: nothing to reset.
        assert_eq!(due(&[run("a", RunState::Finished, Some(10))], None), None);
    }
}
