//! Apply walks a plan's steps; it never re-decides.
//!
//! Steps run with bounded concurrency (the policy's `maxParallel`), each under a deadline,
//! with retries and exponential backoff on transient errors. Every step touches one VM, so
//! a failing VM never blocks the others. Each driver call is journaled first (intent,
//! fsync) and its outcome after; `recover` resolves what a crash left open.
//!
//! # Guarantees
//! - Only the plan's steps run, each at most once per apply (plus retries of the same call).
//! - A step's failure is recorded in its result and never cancels other steps.
//! - Before a driver call, its intent is durable in the journal.

pub mod journal;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::driver::{Driver, DriverError, ErrorKind};
use crate::observe::Stamp;
use crate::plan::{Action, Change, Plan, Step};
use crate::resolve::DesiredVm;
use crate::spec::SnapshotBefore;
pub use journal::Journal;

/// How many times a transient failure is tried in all.
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// The drivers of a fleet, by provider name.
pub type Drivers = BTreeMap<String, Arc<dyn Driver>>;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub vm: String,
    pub provider: String,
    pub action: Action,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    pub millis: u128,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplyReport {
    pub results: Vec<StepResult>,
}

impl ApplyReport {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.ok).count()
    }
}

/// Something that wants to hear about step progress (status files, the terminal).
pub trait Observer: Send + Sync {
    fn step_started(&self, step: &Step);
    fn step_finished(&self, step: &Step, result: &StepResult);
}

/// Runs every step of `plan`.
pub async fn run(
    plan: &Plan,
    drivers: &Drivers,
    journal: Arc<Journal>,
    observer: Arc<dyn Observer>,
) -> ApplyReport {
    let permits = Arc::new(Semaphore::new(plan.policy().max_parallel.max(1) as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, step) in plan.steps().iter().enumerate() {
        let Some(driver) = drivers.get(&step.provider).cloned() else {
            continue;
        };
        let step = step.clone();
        let permits = permits.clone();
        let journal = journal.clone();
        let observer = observer.clone();
        let revision = plan.revision().id.clone();
        let fleet = plan.fleet().to_owned();
        let policy = plan.policy().clone();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            observer.step_started(&step);
            let started = Instant::now();
            let ctx = StepContext {
                driver,
                journal,
                fleet,
                revision,
                grace: policy.shutdown_timeout,
                timeout: policy.step_timeout,
            };
            let (outcome, attempts) = run_step(&ctx, &step).await;
            let result = StepResult {
                vm: step.vm.clone(),
                provider: step.provider.clone(),
                action: step.action(),
                ok: outcome.is_ok(),
                error: outcome.err().map(|e| e.message),
                attempts,
                millis: started.elapsed().as_millis(),
            };
            observer.step_finished(&step, &result);
            (index, result)
        });
    }
    let mut results: Vec<(usize, StepResult)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            Err(e) => tracing::error!("an apply step panicked: {e}"),
        }
    }
    results.sort_by_key(|(i, _)| *i);
    ApplyReport {
        results: results.into_iter().map(|(_, r)| r).collect(),
    }
}

struct StepContext {
    driver: Arc<dyn Driver>,
    journal: Arc<Journal>,
    fleet: String,
    revision: String,
    grace: Duration,
    timeout: Duration,
}

/// The stamp a create or update writes. `created` is now: drivers keep the VM's own
/// (`Stamp::over`) when it already has one, so only a new VM starts a new lease.
fn stamp_for(fleet: &str, revision: &str, vm: &DesiredVm) -> Stamp {
    Stamp {
        fleet: fleet.to_owned(),
        name: vm.name.clone(),
        spec_hash: vm.spec_hash.clone(),
        revision: revision.to_owned(),
        protect: vm.config.protect,
        config: Some(vm.config.clone()),
        created: Some(crate::time::Timestamp::from(std::time::SystemTime::now())),
        adopted: false,
    }
}

/// One driver call, with what it needs.
#[derive(Clone)]
enum DriverCall {
    Create(DesiredVm),
    Update {
        vm: DesiredVm,
        restart: bool,
    },
    Start,
    Stop,
    Destroy,
    Reset(DesiredVm),
    Revert(String),
    DestroyWorkspace(String),
    /// The VM's `snapshots:` policy, before its replace or reset (journaled as that step).
    SnapshotWorkspaces {
        vm: DesiredVm,
        before: SnapshotBefore,
        keep: u32,
    },
}

impl DriverCall {
    fn action(&self) -> Action {
        match self {
            DriverCall::Create(_) => Action::Create,
            DriverCall::Update { .. } => Action::Update,
            DriverCall::Start => Action::Start,
            DriverCall::Stop => Action::Stop,
            DriverCall::Destroy => Action::Destroy,
            DriverCall::Reset(_) => Action::Reset,
            DriverCall::Revert(_) => Action::Revert,
            DriverCall::DestroyWorkspace(_) => Action::DestroyWorkspace,
            DriverCall::SnapshotWorkspaces { before, .. } => match before {
                SnapshotBefore::Replace => Action::Replace,
                SnapshotBefore::Reset => Action::Reset,
            },
        }
    }
}

/// `Driver::check_create`, outside the step's deadline (it may ship an image to a host).
async fn check_create(ctx: &StepContext, desired: &DesiredVm) -> Result<(), DriverError> {
    let driver = ctx.driver.clone();
    let vm = desired.clone();
    match tokio::task::spawn_blocking(move || driver.check_create(&vm)).await {
        Ok(result) => result,
        Err(join) => Err(DriverError::new(
            ErrorKind::Permanent,
            format!("driver call failed: {join}"),
        )),
    }
}

/// Runs one step; returns its outcome and how many attempts its calls took in all.
async fn run_step(ctx: &StepContext, step: &Step) -> (Result<(), DriverError>, u32) {
    match &step.change {
        Change::Create { desired } => {
            if let Err(e) = check_create(ctx, desired).await {
                return (Err(e), 1);
            }
            call(ctx, step, DriverCall::Create(desired.clone())).await
        }
        Change::Update {
            desired, restart, ..
        } => {
            let update = DriverCall::Update {
                vm: desired.clone(),
                restart: *restart,
            };
            call(ctx, step, update).await
        }
        Change::Start => call(ctx, step, DriverCall::Start).await,
        Change::Stop => call(ctx, step, DriverCall::Stop).await,
        Change::Destroy { .. } => call(ctx, step, DriverCall::Destroy).await,
        Change::Reset { desired } => {
            let (snapshots, a1) = snapshot_first(ctx, step, desired, SnapshotBefore::Reset).await;
            if snapshots.is_err() {
                return (snapshots, a1);
            }
            let (reset, a2) = call(ctx, step, DriverCall::Reset(desired.clone())).await;
            (reset, a1 + a2)
        }
        Change::Revert { snapshot } => call(ctx, step, DriverCall::Revert(snapshot.clone())).await,
        Change::DestroyWorkspace { workspace, .. } => {
            call(ctx, step, DriverCall::DestroyWorkspace(workspace.clone())).await
        }
        Change::Replace { desired, .. } => {
            // The new VM must be makeable before the old one goes (a base disk half
            // written, gone or reaching outside the image root would lose the VM).
            if let Err(e) = check_create(ctx, desired).await {
                return (Err(e), 1);
            }
            let (snapshots, a0) = snapshot_first(ctx, step, desired, SnapshotBefore::Replace).await;
            if snapshots.is_err() {
                return (snapshots, a0);
            }
            let (destroyed, a1) = call(ctx, step, DriverCall::Destroy).await;
            if destroyed.is_err() {
                return (destroyed, a0 + a1);
            }
            let (created, a2) = call(ctx, step, DriverCall::Create(desired.clone())).await;
            (created, a0 + a1 + a2)
        }
    }
}

/// The snapshots a VM's policy takes of its workspaces before a replace or reset; nothing
/// when it has no policy for that step. A snapshot that cannot be taken fails the step:
/// what the policy keeps is worth more than the step's speed.
async fn snapshot_first(
    ctx: &StepContext,
    step: &Step,
    desired: &DesiredVm,
    before: SnapshotBefore,
) -> (Result<(), DriverError>, u32) {
    let Some(keep) = desired.config.snapshot_before(before) else {
        return (Ok(()), 0);
    };
    let snapshot = DriverCall::SnapshotWorkspaces {
        vm: desired.clone(),
        before,
        keep,
    };
    call(ctx, step, snapshot).await
}

/// One journaled driver operation, with a deadline per attempt and retries on transient
/// errors.
async fn call(ctx: &StepContext, step: &Step, what: DriverCall) -> (Result<(), DriverError>, u32) {
    let action = what.action();
    let op = match ctx
        .journal
        .intent(&step.provider, &step.vm, action, &ctx.revision)
    {
        Ok(op) => op,
        Err(e) => {
            // Without a durable intent the call must not run.
            return (
                Err(DriverError::new(
                    ErrorKind::Permanent,
                    format!("cannot write the journal: {e}"),
                )),
                0,
            );
        }
    };
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let driver = ctx.driver.clone();
        let (name, grace, what) = (step.vm.clone(), ctx.grace, what.clone());
        let (fleet, revision) = (ctx.fleet.clone(), ctx.revision.clone());
        let work = tokio::task::spawn_blocking(move || match what {
            DriverCall::Create(vm) => driver.create(&vm, &stamp_for(&fleet, &revision, &vm), grace),
            DriverCall::Update { vm, restart } => {
                driver.update(&vm, &stamp_for(&fleet, &revision, &vm), restart, grace)
            }
            DriverCall::Start => driver.start(&name),
            DriverCall::Stop => driver.stop(&name, grace),
            DriverCall::Destroy => driver.destroy(&name, grace),
            DriverCall::Reset(vm) => driver.reset(&vm),
            DriverCall::Revert(snapshot) => driver.snapshot_revert(&name, &snapshot),
            DriverCall::DestroyWorkspace(workspace) => driver.destroy_workspace(&workspace),
            DriverCall::SnapshotWorkspaces { vm, before, keep } => {
                // A reset powers off at once (nothing in the VM is kept but its
                // workspaces, which its agent synced when its last run ended).
                let grace = match before {
                    SnapshotBefore::Replace => grace,
                    SnapshotBefore::Reset => Duration::ZERO,
                };
                driver
                    .snapshot_workspaces(&vm, before, keep, grace)
                    .map(|taken| {
                        tracing::info!(vm = %vm.name, "took {} before {}", taken.join(", "), before.as_str());
                    })
            }
        });
        let outcome = match tokio::time::timeout(ctx.timeout, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(DriverError::new(
                ErrorKind::Permanent,
                format!("driver call failed: {join}"),
            )),
            Err(_) => Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "{} of {} did not finish within the step deadline of {}",
                    action.as_str(),
                    step.vm,
                    humantime::format_duration(ctx.timeout)
                ),
            )),
        };
        match outcome {
            Err(e) if e.kind == ErrorKind::Transient && attempt < ATTEMPTS => {
                tracing::warn!(vm = %step.vm, action = action.as_str(), attempt, "transient error, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            other => break other,
        }
    };
    let message = match &result {
        Ok(()) => format!("{} {}", action.as_str(), step.vm),
        Err(e) => e.message.clone(),
    };
    if let Err(e) = ctx.journal.outcome(op, result.is_ok(), &message) {
        tracing::error!("cannot write the journal outcome of {}: {e}", step.vm);
    }
    (result, attempt)
}

/// Resolves intents a crash left open, before anything new is planned: for every VM with an
/// unfinished operation, the driver removes what a half-done create or destroy left behind
/// when no VM exists (a VM that exists is found by the next observation through its
/// deterministic identity and stamp, and planned like any other). Returns what was done.
pub async fn recover(journal: &Journal, drivers: &Drivers) -> std::io::Result<Vec<String>> {
    let open = journal.unfinished()?;
    let mut notes = Vec::new();
    for intent in open {
        let Some(driver) = drivers.get(&intent.provider).cloned() else {
            notes.push(format!(
                "operation {} ({} {} on {}) stays open: provider {} is not in this revision",
                intent.op,
                intent.action.as_str(),
                intent.vm,
                intent.provider,
                intent.provider
            ));
            continue;
        };
        // A workspace's delete is one libvirt call: whether it happened, the next plan sees.
        if intent.action == Action::DestroyWorkspace {
            journal.outcome(
                intent.op,
                true,
                "settled: the next plan sees the workspace or not",
            )?;
            continue;
        }
        let name = intent.vm.clone();
        let settled = tokio::task::spawn_blocking(move || driver.settle(&name)).await;
        match settled {
            Ok(Ok(())) => {
                journal.outcome(intent.op, true, "recovered after an interrupted apply")?;
                notes.push(format!(
                    "recovered interrupted {} of {} on {}",
                    intent.action.as_str(),
                    intent.vm,
                    intent.provider
                ));
            }
            Ok(Err(e)) => notes.push(format!(
                "could not recover {} of {}: {e}",
                intent.action.as_str(),
                intent.vm
            )),
            Err(e) => notes.push(format!(
                "could not recover {} of {}: {e}",
                intent.action.as_str(),
                intent.vm
            )),
        }
    }
    journal.compact()?;
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::observe::ObservedHost;
    use crate::plan::Reason;
    use crate::resolve::ResolvedPolicy;

    /// A driver whose creates fail as told: by VM name, a permanent error, N transient
    /// errors before success, or a hang longer than any deadline.
    #[derive(Default)]
    struct FaultyDriver {
        transient_left: AtomicU32,
        created: Mutex<Vec<String>>,
    }

    impl Driver for FaultyDriver {
        fn observe(&self) -> Result<ObservedHost, DriverError> {
            Ok(ObservedHost::default())
        }
        fn create(&self, vm: &DesiredVm, _: &Stamp, _: Duration) -> Result<(), DriverError> {
            match vm.name.as_str() {
                "broken" => Err(DriverError::new(ErrorKind::Permanent, "bad definition")),
                "flaky" if self.transient_left.fetch_sub(1, Ordering::SeqCst) > 0 => {
                    Err(DriverError::new(ErrorKind::Transient, "connection reset"))
                }
                "stuck" => {
                    std::thread::sleep(Duration::from_secs(3));
                    Ok(())
                }
                _ => {
                    self.created.lock().expect("lock").push(vm.name.clone());
                    Ok(())
                }
            }
        }
        fn start(&self, _: &str) -> Result<(), DriverError> {
            Ok(())
        }
        fn stop(&self, _: &str, _: Duration) -> Result<(), DriverError> {
            Ok(())
        }
        fn update(
            &self,
            _: &DesiredVm,
            _: &Stamp,
            _: bool,
            _: Duration,
        ) -> Result<(), DriverError> {
            Ok(())
        }
        fn destroy(&self, _: &str, _: Duration) -> Result<(), DriverError> {
            Ok(())
        }
        fn reset(&self, _: &DesiredVm) -> Result<(), DriverError> {
            Ok(())
        }
        fn settle(&self, _: &str) -> Result<(), DriverError> {
            Ok(())
        }
        fn calls(&self) -> u64 {
            0
        }
    }

    struct Quiet;
    impl Observer for Quiet {
        fn step_started(&self, _: &Step) {}
        fn step_finished(&self, _: &Step, _: &StepResult) {}
    }

    fn create_step(name: &str) -> Step {
        Step {
            vm: name.into(),
            provider: "local".into(),
            change: Change::Create {
                desired: crate::resolve::example_vm(name, |_| {}),
            },
            reason: Reason::NotFound,
        }
    }

    #[tokio::test]
    async fn failures_stay_with_their_vm_transient_errors_are_retried_and_deadlines_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(&dir.path().join("journal.jsonl")).expect("journal"));
        let driver = Arc::new(FaultyDriver {
            transient_left: AtomicU32::new(2),
            ..Default::default()
        });
        let drivers: Drivers =
            BTreeMap::from([("local".to_owned(), driver.clone() as Arc<dyn Driver>)]);
        let plan = Plan::of_steps(
            ResolvedPolicy {
                max_parallel: 2,
                step_timeout: Duration::from_millis(800),
                shutdown_timeout: Duration::from_secs(1),
                reconcile_interval: Duration::from_secs(60),
                resync_interval: Duration::from_secs(300),
                self_heal: true,
                max_destroys_per_apply: 5,
                approve: Vec::new(),
                allow_rollback: false,
                suspend: false,
                overcommit: crate::resolve::DEFAULT_OVERCOMMIT,
                retention: Default::default(),
            },
            ["broken", "flaky", "ok-1", "stuck", "ok-2"]
                .map(create_step)
                .to_vec(),
        );
        let report = run(&plan, &drivers, journal.clone(), Arc::new(Quiet)).await;
        let by_vm: BTreeMap<&str, &StepResult> =
            report.results.iter().map(|r| (r.vm.as_str(), r)).collect();

        assert!(!by_vm["broken"].ok);
        assert_eq!(
            by_vm["broken"].attempts, 1,
            "a permanent error is not retried"
        );
        assert!(by_vm["flaky"].ok, "{:?}", by_vm["flaky"]);
        assert_eq!(
            by_vm["flaky"].attempts, 3,
            "two transient failures, then success"
        );
        assert!(!by_vm["stuck"].ok);
        assert!(
            by_vm["stuck"]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("did not finish within the step deadline"))
        );
        assert!(
            by_vm["ok-1"].ok && by_vm["ok-2"].ok,
            "other VMs are not held up"
        );
        let mut created = driver.created.lock().expect("lock").clone();
        created.sort();
        assert_eq!(created, ["flaky", "ok-1", "ok-2"]);
        // Every call has its outcome journaled, a timed-out one as failed.
        assert!(journal.unfinished().expect("journal").is_empty());
    }
}
