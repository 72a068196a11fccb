//! `fleet wait`: blocks until the status files say what a script waits for (VMs ready, the
//! fleet converged, tasks succeeded), or a timeout passes. It only reads the status
//! directory, so it works beside `fleet serve` or after `fleet apply`.

use std::time::{Duration, Instant};

use crate::status::tasks::TaskPhase;
use crate::status::{ConditionKind, Outcome, StatusDir};

/// What to wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Condition {
    /// Each named VM (every VM, when none is named) has its Ready condition.
    Ready,
    /// The last reconcile converged (and, with names, those VMs are ready).
    Converged,
    /// Each named task's latest run succeeded.
    Succeeded,
}

/// How often the status files are read again.
const POLL: Duration = Duration::from_millis(200);

/// Waits until `condition` holds for `names`; the error says what was still missing (or,
/// for a task that ended otherwise, that it never will).
pub fn wait(
    status: &StatusDir,
    names: &[String],
    condition: Condition,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = check(status, names, condition)?;
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {}: {}",
                humantime::format_duration(timeout),
                missing.join("; ")
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// What is still missing now (empty: done); `Err` when it can no longer happen.
fn check(
    status: &StatusDir,
    names: &[String],
    condition: Condition,
) -> Result<Vec<String>, String> {
    let ready = |missing: &mut Vec<String>| {
        let vms = status.read_vms();
        let wanted: Vec<&String> = if names.is_empty() {
            vms.keys().collect()
        } else {
            names.iter().collect()
        };
        for name in wanted {
            match vms.get(name) {
                None => missing.push(format!("VM {name} has no status yet")),
                Some(vm) => {
                    let is_ready = vm
                        .conditions
                        .iter()
                        .any(|c| c.kind == ConditionKind::Ready && c.status);
                    if !is_ready {
                        missing.push(format!("VM {name} is {:?}, not ready", vm.phase));
                    }
                }
            }
        }
    };
    let mut missing = Vec::new();
    match condition {
        Condition::Ready => ready(&mut missing),
        Condition::Converged => {
            match status.read_summary().and_then(|s| s.last_reconcile) {
                Some(r) if r.outcome == Outcome::Converged => {}
                Some(r) => missing.push(format!("the last reconcile was {:?}", r.outcome)),
                None => missing.push("nothing has been reconciled yet".into()),
            }
            if !names.is_empty() {
                ready(&mut missing);
            }
        }
        Condition::Succeeded => {
            if names.is_empty() {
                return Err("name the tasks to wait for".into());
            }
            let records = status.read_task_records();
            for name in names {
                match records.get(name).map(|r| r.phase) {
                    Some(TaskPhase::Succeeded) => {}
                    Some(phase) if phase.is_finished() => {
                        return Err(format!(
                            "task {name} ended {phase:?}; `fleet task logs {name}` shows why"
                        ));
                    }
                    Some(phase) => missing.push(format!("task {name} is {phase:?}")),
                    None => missing.push(format!("task {name} has not run yet")),
                }
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tasks::TaskRecord;

    fn record(phase: &str) -> TaskRecord {
        serde_saphyr::from_str(&format!(
            "name: build\nvm: web-1\ngeneration: 1\nrun: 0123abcd\nspecHash: h\nrerun: 0\nphase: {phase}\nsource: fleet/tasks/build.yaml\n"
        ))
        .expect("a record")
    }

    #[test]
    fn it_returns_when_a_task_succeeds_fails_fast_when_it_cannot_and_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        status.ensure().expect("ensure");
        let names = ["build".to_owned()];
        let short = Duration::from_millis(300);

        let missing = wait(&status, &names, Condition::Succeeded, short).expect_err("nothing ran");
        assert!(
            missing.contains("timed out") && missing.contains("has not run yet"),
            "{missing}"
        );

        status
            .write_task_record(&record("Running"))
            .expect("record");
        let waiting = std::thread::spawn({
            let status = status.clone();
            let names = names.clone();
            move || {
                wait(
                    &status,
                    &names,
                    Condition::Succeeded,
                    Duration::from_secs(10),
                )
            }
        });
        std::thread::sleep(Duration::from_millis(400));
        status
            .write_task_record(&record("Succeeded"))
            .expect("record");
        assert_eq!(waiting.join().expect("joined"), Ok(()));

        status.write_task_record(&record("Failed")).expect("record");
        let started = Instant::now();
        let never = wait(
            &status,
            &names,
            Condition::Succeeded,
            Duration::from_secs(10),
        )
        .expect_err("failed");
        assert!(never.contains("ended Failed"), "{never}");
        assert!(started.elapsed() < Duration::from_secs(2), "failed fast");

        let unconverged = wait(&status, &[], Condition::Converged, short).expect_err("nothing yet");
        assert!(
            unconverged.contains("nothing has been reconciled yet"),
            "{unconverged}"
        );
    }
}
