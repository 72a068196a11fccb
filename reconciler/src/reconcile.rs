//! The pipeline wired together: source → load → resolve → observe → plan → apply → status.
//! `fleet plan`, `fleet apply` and `fleet serve` run the same stages from here
//! (`desired`, `drivers_for`, `plan_pass`, `apply_and_record`); it holds no policy of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::apply::{self, ApplyReport, Drivers, Journal, StepResult};
use crate::driver::Driver;
use crate::driver::libvirt::LibvirtDriver;
use crate::driver::proxmox::ProxmoxDriver;
use crate::driver::proxmox::client::TokenError;
use crate::load::{self, Diagnostic};
use crate::observe::Observed;
use crate::plan::{Plan, PlanInputs, Step};
use crate::resolve::{self, Desired};
use crate::source::{self, Snapshot, SourceError};
use crate::spec::{HostSpec, Provider};
use crate::status::{
    self, Event, EventKind, Outcome, ReconcileOutcome, StatusDir, Summary, VmOutcome,
};

/// Where things are.
#[derive(Clone, Debug)]
pub struct Workspace {
    pub repo_root: PathBuf,
    pub fleet_dir: String,
    pub status: StatusDir,
    /// The age identity file that opens secrets, if one is configured.
    pub age_identity: Option<PathBuf>,
    /// The host configuration's file (see `host`).
    pub host_config: PathBuf,
}

impl Workspace {
    /// Reads the host configuration (every command that contacts a provider needs it).
    pub fn host(&self) -> Result<HostSpec, crate::host::HostError> {
        crate::host::read(&self.host_config)
    }

    /// Opens every secret of `desired` with the workspace's identity (nothing when it has
    /// none). Problems are in the vault, per value.
    pub fn open_vault(&self, desired: &Desired) -> crate::secrets::Vault {
        if desired.secrets.is_empty() {
            return crate::secrets::Vault::default();
        }
        let keyring = match &self.age_identity {
            Some(path) => crate::secrets::Keyring::load(path),
            None => Err(crate::secrets::SecretError::NoIdentity),
        };
        if keyring.is_ok() {
            crate::secrets::no_core_dumps();
        }
        let mut vault = crate::secrets::Vault::open(&desired.secrets, keyring.as_ref());
        vault.withhold_copies_of(&desired.provider_credentials);
        vault
    }
}

/// Which revision to read.
#[derive(Clone, Debug)]
pub enum SourceChoice {
    /// The committed tip of HEAD.
    Head,
    Rev(String),
    Worktree,
}

pub fn read_snapshot(ws: &Workspace, choice: &SourceChoice) -> Result<Snapshot, SourceError> {
    match choice {
        SourceChoice::Head => source::from_git(&ws.repo_root, &ws.fleet_dir, None),
        SourceChoice::Rev(rev) => source::from_git(&ws.repo_root, &ws.fleet_dir, Some(rev)),
        SourceChoice::Worktree => source::from_worktree(&ws.repo_root, &ws.fleet_dir),
    }
}

/// Checks a snapshot's signature when the host verifies them (`trust`): refused unless a
/// trusted principal signed its commit; its committed Answers attributed to their signers.
pub fn verify(
    ws: &Workspace,
    verifier: Option<&crate::trust::Verifier>,
    snapshot: &mut Snapshot,
) -> Result<(), crate::trust::Unverified> {
    match verifier {
        Some(v) => v.sign_snapshot(&ws.repo_root, snapshot),
        None => Ok(()),
    }
}

/// The task runs `desired` starts, runs again or cancels, against the recorded runs.
pub fn task_runs(
    ws: &Workspace,
    desired: &crate::resolve::Desired,
) -> Vec<crate::plan::task_runs::TaskRun> {
    use crate::plan::task_runs::{self, RecordedRun};
    let recorded = ws
        .status
        .read_task_records()
        .into_iter()
        .map(|(name, r)| {
            let run = RecordedRun {
                vm: r.vm,
                task_hash: r.task_hash,
                run_hash: r.spec_hash,
                // A pending run is replaced in place, not cancelled.
                active: r.phase.is_active(),
            };
            (name, run)
        })
        .collect();
    task_runs::task_runs(&desired.tasks, &recorded)
}

/// What a planning pass saw and decided, and what it decided from.
pub struct Planned {
    pub observed: Observed,
    pub inputs: PlanInputs,
    pub offers: crate::approvals::Offers,
    pub plan: Plan,
    /// The fresh members the pass wants (`lifecycle::members`).
    pub members: crate::lifecycle::Members,
    /// The desired state the plan was made for, when it is not the revision's as resolved:
    /// with the fresh members added and the placed pools' members on their providers
    /// (`placement`). What was planned, applied and handed to the task book.
    pub effective: Option<Desired>,
}

impl Planned {
    /// The desired state the plan was made for.
    pub fn desired<'a>(&'a self, desired: &'a Desired) -> &'a Desired {
        self.effective.as_ref().unwrap_or(desired)
    }
}

/// The fresh runs the status directory records (for the commands; the daemon asks its
/// task book).
pub fn recorded_fresh_runs(ws: &Workspace) -> Vec<crate::lifecycle::FreshRun> {
    ws.status
        .read_task_records()
        .values()
        .flat_map(crate::status::tasks::TaskRecord::fresh_runs)
        .collect()
}

/// Observes, gathers every input of the plan (what the status directory says was applied,
/// secret fingerprints, approvals on offer, and the VMs the caller defers) and plans: the
/// one planning sequence `fleet plan`, `fleet apply` and `fleet serve` share. It writes
/// nothing (`fleet plan` runs it on untrusted pull requests); `record_approvals` does, for
/// the passes that apply.
pub async fn plan_pass(
    ws: &Workspace,
    desired: &Desired,
    drivers: &Drivers,
    vault: &crate::secrets::Vault,
    deferred: BTreeMap<String, String>,
    fresh_runs: &[crate::lifecycle::FreshRun],
) -> Planned {
    let resolved = desired;
    // Placed pools' members go where the status directory records them, or are placed
    // now (`placement`).
    let mut placed = None;
    let record = ws.status.read_placement();
    if !desired.placements.is_empty() {
        let mut recorded = desired.clone();
        crate::placement::apply_record(&mut recorded, &record);
        placed = Some(recorded);
    }
    let observed = observe_for(drivers, placed.as_ref().unwrap_or(desired)).await;
    if let Some(recorded) = &placed {
        // Room is asked only of the observed providers of pools with members to place.
        let asked: std::collections::BTreeSet<String> = recorded
            .placements
            .values()
            .filter(|p| p.placed.len() < p.members.len())
            .flat_map(|p| p.providers.iter())
            .filter(|p| observed.hosts.contains_key(*p))
            .cloned()
            .collect();
        let capacities = capacities_within(drivers, &asked, CAPACITY_DEADLINE).await;
        if let Some(now_placed) = crate::placement::place(recorded, &record, &observed, &capacities)
        {
            placed = Some(now_placed);
        }
    }
    let desired = placed.as_ref().unwrap_or(desired);
    let now = crate::time::Timestamp::from(SystemTime::now());
    // Held members outlive their pool: looked at while any run holds one.
    let (members, with_fresh) = if desired.fresh_pools.is_empty()
        && !fresh_runs
            .iter()
            .any(|r| r.member.is_some() && r.holds(now))
    {
        Default::default()
    } else {
        let members = crate::lifecycle::members(desired, fresh_runs, &observed, now);
        let with = members.add_to(desired);
        (members, Some(with))
    };
    let effective = with_fresh.or(placed);
    let desired = effective.as_ref().unwrap_or(resolved);
    let offers = crate::approvals::gather(&ws.status, desired);
    let leases = lease_records(ws, desired, &observed, now);
    let inputs = PlanInputs {
        now: Some(now),
        leases,
        activity: activity(ws, desired, &observed, now),
        resets: resets_due(ws, desired),
        reverts: ws
            .status
            .read_reverts()
            .into_iter()
            .map(|(vm, r)| {
                let request = crate::plan::RevertRequest {
                    snapshot: r.snapshot,
                    by: r.by,
                };
                (vm, request)
            })
            .collect(),
        history: status::history(&ws.status.read_vms()),
        secrets: crate::plan::secrets::changes(
            desired,
            &vault.by_id(),
            &ws.status.read_secrets_seen(),
        ),
        deferred,
        approved: offers.digests(),
    };
    let plan = crate::plan::plan(desired, &observed, &inputs);
    Planned {
        observed,
        inputs,
        offers,
        plan,
        members,
        effective,
    }
}

/// Records what the pass decided from: what its plan holds or released (see
/// `approvals::record`) and the leases as it counted them (a renewal is counted once).
pub fn record_decisions(ws: &Workspace, desired: &Desired, planned: &Planned) {
    let desired = planned.desired(desired);
    crate::approvals::record(&ws.status, desired, &planned.plan, &planned.offers);
    if let Err(e) = ws.status.write_leases(&planned.inputs.leases) {
        tracing::error!("cannot record leases: {e}");
    }
}

/// What each VM with an `idle` rule did (`idle::Activity`): the task runs the status
/// directory records on it and those the revision starts there, and when a pass last saw
/// it start (now, for one running that no pass saw running: it just started, as far as
/// fleet knows).
fn activity(
    ws: &Workspace,
    desired: &Desired,
    observed: &Observed,
    now: crate::time::Timestamp,
) -> BTreeMap<String, crate::idle::Activity> {
    use crate::plan::task_runs::RunChange;
    use crate::status::tasks::TaskPhase;
    if desired.idle.is_empty() {
        return BTreeMap::new();
    }
    let records = ws.status.read_task_records();
    let vms = ws.status.read_vms();
    let due = task_runs(ws, desired);
    desired
        .idle
        .keys()
        .map(|name| {
            let seen = vms.get(name);
            let seen_running = seen
                .and_then(|v| v.observed.as_ref())
                .is_some_and(|o| o.running);
            let running = desired.vms.get(name).is_some_and(|vm| {
                observed
                    .find(&vm.config.provider, name)
                    .is_some_and(|f| f.running)
            });
            // A pass that could not see the VM (its provider unreachable) knows nothing
            // of a start: the last known one stands.
            let unseen = seen.is_some_and(|v| v.observed.is_none());
            let started = match seen.and_then(|v| v.started) {
                Some(started) if seen_running || !running || unseen => Some(started),
                _ if running => Some(now),
                _ => None,
            };
            let mut activity = crate::idle::Activity {
                busy: None,
                last: started,
            };
            for r in records.values().filter(|r| &r.vm == name) {
                if r.phase == TaskPhase::Pending || r.phase.is_active() {
                    activity.busy = Some(r.name.clone());
                }
                let times = [r.created, r.started, r.finished].into_iter().flatten();
                activity.last = activity.last.into_iter().chain(times).max();
            }
            if let Some(run) = due
                .iter()
                .find(|r| !r.fresh && &r.vm == name && r.change != RunChange::Cancel)
            {
                activity.busy = Some(run.task.clone());
            }
            (name.clone(), activity)
        })
        .collect()
}

/// The VMs with `reset: beforeEachTask` a reset is due for (`reset::due`), with the task
/// whose run waits.
fn resets_due(ws: &Workspace, desired: &Desired) -> BTreeMap<String, String> {
    if !desired.vms.values().any(|vm| vm.config.reset) {
        return BTreeMap::new();
    }
    // The marks before the records: the task book writes a run's record, then its VM's
    // mark, so a mark seen here has its run's record on disk (a run under way is never
    // taken for one waiting on a used VM).
    let used: BTreeMap<&str, bool> = desired
        .vms
        .values()
        .filter(|vm| vm.config.reset)
        .map(|vm| (vm.name.as_str(), ws.status.is_used(&vm.name)))
        .collect();
    let records = ws.status.read_task_records();
    used.into_iter()
        .filter_map(|(vm, used)| {
            let runs = crate::status::tasks::reset_facts(records.values(), vm);
            let task = crate::reset::due(&runs, used)?;
            Some((vm.to_owned(), task.to_owned()))
        })
        .collect()
}

/// Each leased VM's record after this pass (`lease::advance`): from what the status
/// directory remembers, what the provider shows and the host's renewal.
fn lease_records(
    ws: &Workspace,
    desired: &Desired,
    observed: &Observed,
    now: crate::time::Timestamp,
) -> BTreeMap<String, crate::lease::LeaseRecord> {
    let previous = ws.status.read_leases();
    // A VM still in the revision keeps its record while its lease is taken away, so a
    // lease put back is the same lease, renewals included.
    let kept = previous
        .iter()
        .filter(|(name, _)| desired.vms.contains_key(*name) && !desired.leases.contains_key(*name))
        .map(|(name, record)| (name.clone(), record.clone()));
    let leased = desired.leases.iter().filter_map(|(name, lease)| {
        let vm = desired.vms.get(name)?;
        let seen = match observed.find(&vm.config.provider, name) {
            Some(found) if found.owned_by(&desired.fleet) => crate::lease::Seen::Present {
                created: found.stamp.as_ref().and_then(|s| s.created),
            },
            // Another's VM under the name: fleet's lease has nothing to count.
            Some(_) => return None,
            None => crate::lease::Seen::Absent,
        };
        let host = ws.status.read_host_renewal(name);
        let record = crate::lease::advance(lease, previous.get(name), seen, host.as_ref(), now)?;
        Some((name.clone(), record))
    });
    kept.chain(leased).collect()
}

/// Loads and resolves a snapshot under the host's rules: every diagnostic at once, the
/// host's limits included; then what its image files hold (a file rebuilt in place is a
/// change of the VMs on it).
pub fn desired(snapshot: &Snapshot, host: &HostSpec) -> Result<Desired, Vec<Diagnostic>> {
    let mut desired = checked(snapshot, host)?;
    crate::image_content::fill(&mut desired, host);
    Ok(desired)
}

/// `desired` without reading image files: what `fleet validate` checks.
pub fn checked(snapshot: &Snapshot, host: &HostSpec) -> Result<Desired, Vec<Diagnostic>> {
    let loaded = load::load(snapshot, Some(host))?;
    let desired = resolve::resolve(&loaded, host);
    let over = resolve::check(&desired, host);
    if over.is_empty() {
        Ok(desired)
    } else {
        Err(over)
    }
}

/// The status of `vm`, a VM fleet manages, or why there is none: the commands that reach
/// into one VM (`exec`, `console`, `snapshot`) refuse any other.
pub fn managed_vm(status: &StatusDir, vm: &str) -> anyhow::Result<status::VmStatus> {
    crate::driver::check_name(vm).map_err(|e| anyhow::anyhow!(e.message))?;
    status.read_vms().remove(vm).ok_or_else(|| {
        anyhow::anyhow!(
            "fleet does not manage a VM named {vm} (no status for it in {}); fleet only acts on VMs it made",
            status.root().display()
        )
    })
}

/// The driver of the provider fleet's status says `vm` runs on (`fleet console`,
/// `fleet snapshot`): refused for a VM fleet keeps no status of.
pub fn driver_of_vm(ws: &Workspace, vm: &str) -> anyhow::Result<Arc<dyn Driver>> {
    let status = managed_vm(&ws.status, vm)?;
    let (_, drivers) = committed_drivers(ws)?;
    drivers.get(&status.provider).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{vm} runs on provider {:?}, which the committed revision no longer has",
            status.provider
        )
    })
}

/// The driver of the provider the committed revision keeps workspace `name` on.
pub fn driver_of_workspace(ws: &Workspace, name: &str) -> anyhow::Result<Arc<dyn Driver>> {
    let (desired, drivers) = committed_drivers(ws)?;
    let workspace = desired.workspaces.get(name).ok_or_else(|| {
        anyhow::anyhow!(
            "the committed revision has no Workspace named {name:?} (fleet/workspaces/)"
        )
    })?;
    drivers.get(&workspace.provider).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "workspace {name} lives on provider {:?}, which has no driver",
            workspace.provider
        )
    })
}

/// The committed revision's desired state and its providers' drivers.
fn committed_drivers(ws: &Workspace) -> anyhow::Result<(Desired, Drivers)> {
    let host = ws.host()?;
    let snapshot = read_snapshot(ws, &SourceChoice::Head)?;
    let desired = desired(&snapshot, &host).map_err(|diags| {
        anyhow::anyhow!(
            "the committed revision does not validate ({} diagnostic(s); fleet validate lists them)",
            diags.len()
        )
    })?;
    let vault = ws.open_vault(&desired);
    let drivers = drivers_for(&desired, &host, &vault);
    Ok((desired, drivers))
}

/// One driver per provider of the revision, each made from the host configuration's
/// definition of it. `vault` opens API tokens kept as Secrets.
pub fn drivers_for(desired: &Desired, host: &HostSpec, vault: &crate::secrets::Vault) -> Drivers {
    let image_root = Path::new(host.image_root());
    desired
        .providers
        .iter()
        .map(|p| {
            let driver: Arc<dyn Driver> = match &p.host {
                Provider::Libvirt(l) => Arc::new(LibvirtDriver::new(
                    &desired.fleet,
                    l,
                    p.domain_type,
                    image_root,
                )),
                Provider::Proxmox(x) => Arc::new(ProxmoxDriver::new(
                    &desired.fleet,
                    x,
                    p.domain_type,
                    proxmox_token(&x.token, vault),
                )),
            };
            (p.name().to_owned(), driver)
        })
        .collect()
}

/// Why the running VMs of `desired` would not fit their hosts (`policy.overcommit`), asked
/// of each provider's host now; a provider that cannot tell is not checked. Placed pools'
/// members count where `record` (the status directory's `placement.yaml`) puts them.
pub fn capacity_problems(
    desired: &Desired,
    host: &HostSpec,
    vault: &crate::secrets::Vault,
    record: &crate::placement::Record,
) -> Vec<String> {
    // The revision's own values: a Proxmox token kept as a Secret opens the API too.
    let drivers = drivers_for(desired, host, vault);
    let capacities = capacities(&drivers);
    if desired.placements.is_empty() {
        return resolve::capacity_problems(desired, &capacities);
    }
    let mut recorded = desired.clone();
    crate::placement::apply_record(&mut recorded, record);
    resolve::capacity_problems(&recorded, &capacities)
}

/// How long placement waits for the providers to say what they hold.
const CAPACITY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the providers `names` can run, asked at once; one that cannot tell within `limit`
/// is left out (placement then gives it no member).
async fn capacities_within(
    drivers: &Drivers,
    names: &std::collections::BTreeSet<String>,
    limit: std::time::Duration,
) -> BTreeMap<String, crate::observe::Capacity> {
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        if let Some(driver) = drivers.get(name) {
            let (name, driver) = (name.clone(), driver.clone());
            tasks.spawn_blocking(move || (name, driver.capacity()));
        }
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = BTreeMap::new();
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        if let Ok((name, Ok(Some(capacity)))) = joined {
            out.insert(name, capacity);
        }
    }
    // The calls still under way finish on their own threads, unread.
    tasks.detach_all();
    out
}

/// What each provider's host can run, asked now; a provider that cannot tell is left out.
pub fn capacities(drivers: &Drivers) -> BTreeMap<String, crate::observe::Capacity> {
    // Asked on threads of their own: a driver's calls block (Proxmox's client runs its own
    // runtime), and callers may be on the async runtime.
    std::thread::scope(|scope| {
        let asked: Vec<_> = drivers
            .iter()
            .map(|(name, driver)| (name, scope.spawn(|| driver.capacity())))
            .collect();
        asked
            .into_iter()
            .filter_map(|(name, answer)| match answer.join() {
                Ok(Ok(Some(capacity))) => Some((name.clone(), capacity)),
                _ => None,
            })
            .collect()
    })
}

/// What identifies the credentials drivers were made with: the daemon makes new drivers
/// when it changes (a rotated token), not only when the providers' specs do.
pub fn credentials_digest(desired: &Desired, vault: &crate::secrets::Vault) -> String {
    let mut parts = Vec::new();
    for p in &desired.providers {
        if let Provider::Proxmox(x) = &p.host
            && let Some(r) = &x.token.secret
        {
            parts.push(format!(
                "{}/{}={}",
                r.secret.0,
                r.key.0,
                vault.fingerprint(&r.secret.0, &r.key.0).unwrap_or("-")
            ));
        }
    }
    parts.join(";")
}

/// The API token's secret from wherever the host configuration says it is.
pub fn proxmox_token(
    token: &crate::spec::ProxmoxToken,
    vault: &crate::secrets::Vault,
) -> Result<secrecy::SecretString, TokenError> {
    use secrecy::ExposeSecret;
    let text = if let Some(r) = &token.secret {
        let value = vault.value(&r.secret.0, &r.key.0).ok_or_else(|| {
            match vault.problem(&r.secret.0, &r.key.0) {
                Some(problem) => TokenError::Secret(problem.to_owned()),
                None => TokenError::NotInRevision {
                    secret: r.secret.0.clone(),
                    key: r.key.0.clone(),
                },
            }
        })?;
        String::from_utf8(value.expose_secret().to_vec()).map_err(|_| TokenError::NotUtf8)?
    } else if let Some(file) = &token.file {
        let path = Path::new(file);
        crate::secrets::check_private_file(path)?;
        std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?
    } else if let Some(var) = &token.env {
        std::env::var(var).map_err(|_| TokenError::Env(var.clone()))?
    } else {
        return Err(TokenError::Unset);
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(TokenError::Empty);
    }
    crate::secrets::no_core_dumps();
    Ok(secrecy::SecretString::from(trimmed.to_owned()))
}

/// How long a provider may take to be observed before the pass goes on without it (its
/// VMs unknown): a host whose connect hangs must not hold up the others.
pub const OBSERVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Observes every provider at once; a provider that cannot be observed, or not within
/// `OBSERVE_DEADLINE`, is recorded as unreachable (and the planner plans nothing for its
/// VMs).
pub async fn observe(drivers: &Drivers) -> Observed {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, driver) in drivers {
        let (name, driver) = (name.clone(), driver.clone());
        tasks.spawn_blocking(move || (name, driver.preflight().and_then(|()| driver.observe())));
    }
    let mut observed = Observed::default();
    let mut waiting: std::collections::BTreeSet<&String> = drivers.keys().collect();
    let deadline = tokio::time::Instant::now() + OBSERVE_DEADLINE;
    loop {
        let joined = match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(joined)) => joined,
            Ok(None) => break,
            Err(_) => {
                for name in waiting {
                    observed.unreachable.insert(
                        name.clone(),
                        format!("did not answer within {} s", OBSERVE_DEADLINE.as_secs()),
                    );
                }
                // The calls still under way finish on their own threads, unread.
                tasks.detach_all();
                break;
            }
        };
        match joined {
            Ok((name, Ok(host))) => {
                waiting.remove(&name);
                observed.hosts.insert(name, host);
            }
            Ok((name, Err(e))) => {
                waiting.remove(&name);
                observed.unreachable.insert(name, e.message);
            }
            Err(e) => tracing::error!("observing a provider panicked: {e}"),
        }
    }
    observed
}

/// Observes every provider for a revision: `observe`, then a second look at each VM that
/// holds the name of one of the revision's VMs and looks foreign. A driver whose observation
/// finds VMs by an index (Proxmox: fleet's tag) can miss one of its own that a create left
/// before it was indexed; `Driver::stamp_by_name` reads its stamp, so it is planned as
/// fleet's (and the create finished) instead of reported as a conflict forever. Read-only.
pub async fn observe_for(drivers: &Drivers, desired: &Desired) -> Observed {
    let mut observed = observe(drivers).await;
    let mut tasks = tokio::task::JoinSet::new();
    for vm in desired.vms.values() {
        let provider = &vm.config.provider;
        let (Some(host), Some(driver)) = (observed.hosts.get(provider), drivers.get(provider))
        else {
            continue;
        };
        // Only a name held by one VM: of two, planning keeps to the one it can prove is
        // fleet's, and reports the other.
        let mut holders = host.vms.iter().filter(|found| found.name == vm.name);
        let clash = match (holders.next(), holders.next()) {
            (Some(only), None) => !only.owned_by(&desired.fleet),
            _ => false,
        };
        if clash {
            let (provider, name, driver) = (provider.clone(), vm.name.clone(), driver.clone());
            tasks.spawn_blocking(move || {
                let stamp = driver.stamp_by_name(&name);
                (provider, name, stamp)
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((provider, name, Ok(Some(stamp)))) = joined else {
            continue;
        };
        if stamp.fleet != desired.fleet || stamp.name != name {
            continue;
        }
        if let Some(host) = observed.hosts.get_mut(&provider)
            && let Some(found) = host.vms.iter_mut().find(|f| f.name == name)
        {
            let mut claimed = (**found).clone();
            claimed.stamp = Some(stamp);
            *found = std::sync::Arc::new(claimed);
        }
    }
    observed
}

/// Writes step progress as events, and optionally as lines on stderr.
pub struct StatusObserver {
    pub status: StatusDir,
    pub revision: String,
    /// `fleet apply`'s spinners or heartbeats and step outcomes; none for `fleet serve`.
    pub progress: Option<Arc<crate::progress::Progress>>,
}

impl apply::Observer for StatusObserver {
    fn step_started(&self, step: &Step) {
        if let Some(progress) = &self.progress {
            progress.started(step);
        }
        let _ = self.status.append_event(&Event::step(
            EventKind::StepStarted,
            step,
            &self.revision,
            format!(
                "{} {}: {}",
                step.action().as_str(),
                step.vm,
                crate::plan::render::reason_text(step)
            ),
        ));
    }

    fn step_finished(&self, step: &Step, result: &StepResult) {
        // A VM reset, made or made again is clean: the task book may dispatch to it (`reset`).
        let clean = matches!(
            step.action(),
            crate::plan::Action::Reset
                | crate::plan::Action::Create
                | crate::plan::Action::Replace
                | crate::plan::Action::Destroy
        );
        if result.ok
            && clean
            && let Err(e) = self.status.clear_used(&step.vm)
        {
            tracing::error!(vm = step.vm, "cannot record that it is clean: {e}");
        }
        // A revert is tried once per request (apply retries what is worth retrying
        // within the step): one that ran, or failed, is not asked for again, so a
        // snapshot that is gone never holds the VM's other steps back. (A crash before
        // this line reverts once more, to the same snapshot.)
        if let crate::plan::Change::Revert { snapshot } = &step.change
            && let Err(e) = self.status.clear_revert(&step.vm, snapshot)
        {
            tracing::error!(vm = step.vm, "cannot remove the revert's request: {e}");
        }
        let (kind, message) = match &result.error {
            None => (
                EventKind::StepSucceeded,
                format!(
                    "{} {} done in {} ms",
                    step.action().as_str(),
                    step.vm,
                    result.millis
                ),
            ),
            Some(e) => (
                EventKind::StepFailed,
                format!(
                    "{} {} failed after {} attempt(s): {e}",
                    step.action().as_str(),
                    step.vm,
                    result.attempts
                ),
            ),
        };
        if let Some(progress) = &self.progress {
            progress.finished(step, &message);
        }
        let _ = self
            .status
            .append_event(&Event::step(kind, step, &self.revision, message));
    }
}

/// What an apply did, for the caller to print.
pub struct Applied {
    pub report: ApplyReport,
    pub summary: Summary,
    /// Every VM's status as written.
    pub vms: BTreeMap<String, status::VmStatus>,
    /// Providers the last observation could not reach: what their VMs do is unknown, not
    /// stopped.
    pub unreachable: std::collections::BTreeSet<String>,
}

/// Opens the journal, resolves what an interrupted apply left open, and lets each driver
/// tidy what such an apply left on its host. The caller holds the status lock. Returns
/// the journal and one line per thing done, each saying where it came from
/// (`journal: …`, `tidy <provider>: …`), for the caller to print; each is also an event.
pub async fn open_journal(
    ws: &Workspace,
    drivers: &Drivers,
) -> std::io::Result<(Arc<Journal>, Vec<String>)> {
    ws.status.ensure()?;
    let journal = Arc::new(Journal::open(&ws.status.journal_path())?);
    let mut events: Vec<(Option<String>, String)> = apply::recover(&journal, drivers)
        .await?
        .into_iter()
        .map(|note| (None, note))
        .collect();
    for (provider, note) in tidy_each(drivers, |d| d.tidy()).await {
        events.push((Some(provider), note));
    }
    let mut lines = Vec::new();
    for (provider, message) in events {
        let (kind, line) = match &provider {
            None => (EventKind::JournalRecovered, format!("journal: {message}")),
            Some(p) => (EventKind::HostTidied, format!("tidy {p}: {message}")),
        };
        ws.status
            .append_event(&Event::host(kind, provider, message))?;
        lines.push(line);
    }
    Ok((journal, lines))
}

/// What one reconcile pass works from: the revision's desired state, the plan made from
/// it, the observation the plan was made against, and what the agents last said.
pub struct Pass<'a> {
    pub desired: &'a Desired,
    pub plan: &'a Plan,
    pub observed: &'a Observed,
    pub agents: &'a BTreeMap<String, status::AgentStatus>,
    /// VMs in a crash loop, with the evidence (`fleet serve` keeps count).
    pub crash_loops: &'a BTreeMap<String, String>,
    /// What the pass remembered of each lease (its plan's input).
    pub leases: &'a BTreeMap<String, crate::lease::LeaseRecord>,
}

/// Runs one of the drivers' tidy steps on each driver, off the async runtime: what each
/// removed, by provider (a failure is one note).
async fn tidy_each(
    drivers: &Drivers,
    tidy: fn(&dyn crate::driver::Driver) -> Result<Vec<String>, crate::driver::DriverError>,
) -> Vec<(String, String)> {
    let mut notes = Vec::new();
    for (provider, driver) in drivers {
        let driver = driver.clone();
        let done = tokio::task::spawn_blocking(move || tidy(driver.as_ref()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|tidied| tidied.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| vec![format!("could not tidy: {e}")]);
        notes.extend(done.into_iter().map(|n| (provider.clone(), n)));
    }
    notes
}

/// Lets each driver remove what the pass's steps left unused on its host (no step runs
/// now); each removal is an event.
async fn release_unused(ws: &Workspace, drivers: &Drivers) -> std::io::Result<()> {
    for (provider, note) in tidy_each(drivers, |d| d.release_unused()).await {
        ws.status
            .append_event(&Event::host(EventKind::HostTidied, Some(provider), note))?;
    }
    Ok(())
}

/// Runs `plan`, then observes again and writes every status file.
pub async fn apply_and_record(
    ws: &Workspace,
    pass: Pass<'_>,
    drivers: &Drivers,
    journal: Arc<Journal>,
    print_progress: bool,
) -> std::io::Result<Applied> {
    let Pass {
        desired,
        plan,
        observed: observed_before,
        agents,
        crash_loops,
        leases,
    } = pass;
    let started = SystemTime::now();
    for (provider, driver) in drivers {
        let driver = driver.clone();
        match tokio::task::spawn_blocking(move || driver.maintain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(provider, "{e}"),
            Err(e) => tracing::error!(provider, "maintenance panicked: {e}"),
        }
    }
    // Where placed pools' members go is recorded before any of them is made there, so a
    // crash never makes one twice (and emptied once no pool is placed).
    ws.status
        .write_placement(&crate::placement::record_of(desired))?;
    let previous = ws.status.read_summary().unwrap_or_default();
    let plan_changed = previous
        .last_reconcile
        .as_ref()
        .is_none_or(|r| r.plan_digest != plan.digest());
    if plan.has_changes() || plan_changed {
        ws.status.write_plan(plan)?;
    }
    // Drift is reported before anything heals it.
    for d in plan.drift() {
        let fix = if d.healed {
            "healing it"
        } else {
            "reported only (policy.selfHeal: false)"
        };
        ws.status.append_event(&Event::vm(
            EventKind::VmDrifted,
            &d.vm,
            &d.provider,
            &plan.revision().id,
            format!("{}: {}; {fix}", d.vm, d.what),
        ))?;
    }
    // A no-op pass (the daemon's usual case) neither calls the drivers again nor grows the
    // event log; only status files whose content changed are rewritten.
    let (report, after) = if plan.has_changes() {
        let observer = Arc::new(StatusObserver {
            status: ws.status.clone(),
            revision: plan.revision().id.clone(),
            progress: print_progress.then(crate::progress::Progress::on_stderr),
        });
        let report = apply::run(plan, drivers, journal.clone(), observer).await;
        journal.compact()?;
        release_unused(ws, drivers).await?;
        (report, observe(drivers).await)
    } else {
        (ApplyReport::default(), observed_before.clone())
    };
    let unreachable = after.unreachable.keys().cloned().collect();
    let mut outcomes: BTreeMap<String, VmOutcome> = BTreeMap::new();
    for r in &report.results {
        if let Some(e) = &r.error {
            outcomes.entry(r.vm.clone()).or_default().error = Some(e.clone());
        }
    }
    for c in plan.conflicts() {
        outcomes.entry(c.vm.clone()).or_default().conflict = Some(c.message.clone());
    }
    for d in plan.drift() {
        outcomes.entry(d.vm.clone()).or_default().drift = Some((d.what.clone(), d.healed));
    }
    for (vm, evidence) in crash_loops {
        outcomes.entry(vm.clone()).or_default().crash_loop = Some(evidence.clone());
    }
    for (vm, state) in crate::lease::states(desired, &after, leases) {
        let ttl_seconds = desired.leases.get(&vm).map_or(0, |l| l.ttl.as_secs());
        outcomes.entry(vm).or_default().lease = Some(status::LeaseStatus {
            started: state.started,
            ends: state.ends,
            on_expiry: state.on_expiry,
            ttl_seconds,
        });
    }
    for i in plan.idle() {
        outcomes.entry(i.vm.clone()).or_default().idle = Some(i.since);
    }
    let finished = SystemTime::now();
    let before = ws.status.read_vms();
    let vms = status::vm_statuses(desired, &after, &outcomes, agents, &before, finished);
    ws.status.write_vms(&vms)?;
    let failed = report.failed();
    let settled = plan.conflicts().is_empty() && plan.errors().is_empty();
    let outcome = if failed == 0 && settled {
        Outcome::Converged
    } else if failed < report.results.len() || report.results.is_empty() {
        Outcome::Partial
    } else {
        Outcome::Failed
    };
    let mut summary = previous;
    summary.fleet = desired.fleet.clone();
    summary.revision_applied = Some(plan.revision().clone());
    if summary
        .revision_refused
        .as_ref()
        .is_some_and(|r| r.revision.id == plan.revision().id)
    {
        summary.revision_refused = None;
    }
    summary.last_reconcile = Some(ReconcileOutcome {
        started: Some(started.into()),
        finished: Some(finished.into()),
        plan_digest: plan.digest().to_owned(),
        steps: report.results.len(),
        succeeded: report.results.len() - failed,
        failed,
        conflicts: plan.conflicts().len(),
        outcome,
    });
    // A change was applied when a step succeeded (a plan of held or failed steps changed
    // nothing).
    if report.results.iter().any(|r| r.ok) {
        summary.last_applied = Some(finished.into());
    }
    summary.counts = status::counts(&vms);
    ws.status.write_summary(&summary)?;
    if !plan.has_changes() {
        return Ok(Applied {
            report,
            summary,
            vms,
            unreachable,
        });
    }
    let message = format!(
        "applied {}: {} step(s), {failed} failed, {} conflict(s): {outcome}",
        plan.revision().label,
        report.results.len(),
        plan.conflicts().len()
    );
    ws.status.append_event(
        &Event::fleet(
            EventKind::ApplyFinished,
            Some(plan.revision().id.clone()),
            message,
        )
        .at(finished),
    )?;
    Ok(Applied {
        report,
        summary,
        vms,
        unreachable,
    })
}
