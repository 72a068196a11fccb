//! Clean resets (`reset: beforeEachTask` on a VM or its loadout): before each task run but
//! the first after the VM was made or last reset, the VM returns to the state it was made in
//! (libvirt: a new overlay on the same base disk and a fresh boot; Proxmox: a rollback to
//! the snapshot fleet took when it made the VM), and its secrets are delivered again when
//! its agent says hello. Runs on such a VM go one at a time.
//!
//! A VM is used once a run is dispatched to it: the task book marks it (`status/used/<vm>`)
//! after the run's record and before the run reaches the guest, and apply clears the mark
//! when a reset, create, replace or destroy of the VM has run. The plan resets a used VM when a run waits on it and none is
//! under way (`Reason::ResetBeforeRun`); the task book dispatches a run only to an unused
//! VM with none under way (`may_dispatch`). Both read the same mark, so they agree without
//! talking, and a crash anywhere costs at most one reset more, never a run on a used disk.
//!
//! Architecture invariant: pure.

/// A run on the VM, as far as resets go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFacts {
    pub task: String,
    pub state: RunState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Waits to be dispatched.
    Pending,
    /// Staging, running or waiting for input.
    Active,
    Finished,
}

/// The task whose run a reset is due for: one waits, none is under way, and the VM was
/// used (`used`: a run was dispatched to it since it was made or last reset).
pub fn due(runs: &[RunFacts], used: bool) -> Option<&str> {
    if !used || runs.iter().any(|r| r.state == RunState::Active) {
        return None;
    }
    runs.iter()
        .find(|r| r.state == RunState::Pending)
        .map(|r| r.task.as_str())
}

/// Whether a waiting run may be dispatched to the VM now: nothing under way and nothing
/// dispatched since it was made or last reset.
pub fn may_dispatch(runs: &[RunFacts], used: bool) -> bool {
    !used && !runs.iter().any(|r| r.state == RunState::Active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(task: &str, state: RunState) -> RunFacts {
        RunFacts {
            task: task.into(),
            state,
        }
    }

    #[test]
    fn a_used_vm_is_reset_before_the_next_run_and_runs_go_one_at_a_time() {
        // A VM made and never used takes its first run as it is.
        let first = [run("a", RunState::Pending)];
        assert!(may_dispatch(&first, false));
        assert_eq!(due(&first, false), None);
        // While a run is under way, nothing else is dispatched and nothing is reset.
        let busy = [run("a", RunState::Active), run("b", RunState::Pending)];
        assert!(!may_dispatch(&busy, true));
        assert_eq!(due(&busy, true), None);
        // Once it ended, b waits for a reset; the same task run again does too (the
        // mark is the VM's, not a run's).
        let after = [run("a", RunState::Finished), run("b", RunState::Pending)];
        assert!(!may_dispatch(&after, true));
        assert_eq!(due(&after, true), Some("b"));
        let again = [run("a", RunState::Pending)];
        assert_eq!(due(&again, true), Some("a"));
        // Reset (the mark cleared): b may go, and no second reset is due.
        assert!(may_dispatch(&after, false));
        assert_eq!(due(&after, false), None);
        // Nothing waits: nothing to reset.
        assert_eq!(due(&[run("a", RunState::Finished)], true), None);
    }
}
