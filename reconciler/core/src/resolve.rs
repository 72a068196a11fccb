//! Loaded objects → the desired state: loadout `extends` merged (depth-first, left to right;
//! scalars: last wins; lists of strings: union without duplicates; maps: deep merge),
//! defaults filled, pools expanded. Each VM gets a stable content hash of its configuration.
//!
//! Architecture invariant: pure and infallible. Everything that could fail was checked by
//! `load`; a reference that does not resolve here is a bug, handled by falling back to
//! defaults rather than panicking.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::load::LoadedFleet;
use crate::snapshot::Revision;
use crate::spec::pool_member_names;
use crate::spec::{
    AgentKind, AgentSpec, ArmoredValue, DomainType, GuestFile, GuestUser, HostSpec, LoadoutSpec,
    NetworkMode, OnDeadline, PowerState, Provider, ProviderKind, Repository, Resources, SecretRef,
    TaskSpec, VmSpec,
};

pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
pub const DEFAULT_DISK_MIB: u64 = 10 * 1024;
pub const DEFAULT_MAX_PARALLEL: u32 = 4;
pub const DEFAULT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
pub const DEFAULT_RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
pub const DEFAULT_RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);
pub const DEFAULT_TASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
pub const DEFAULT_PROMPT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The fully resolved desired state of one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub fleet: String,
    pub revision: Revision,
    pub providers: Vec<DesiredProvider>,
    pub policy: ResolvedPolicy,
    /// By VM name.
    pub vms: BTreeMap<String, DesiredVm>,
    /// By task name.
    pub tasks: BTreeMap<String, DesiredTask>,
    /// Committed answers to prompts, by prompt id.
    pub answers: BTreeMap<String, CommittedAnswer>,
    /// Committed approvals of held plan steps, by approval id.
    pub approvals: BTreeMap<String, CommittedApproval>,
    /// Whose committed answers and approvals count.
    pub approvers: Approvers,
    /// Secrets by name, still encrypted.
    pub secrets: BTreeMap<String, DesiredSecret>,
    /// (secret, key) of every provider API token the host configuration keeps as a Secret,
    /// whether this revision uses that provider or not: never delivered to a guest, and no
    /// other secret holding the same value is either.
    pub provider_credentials: Vec<(String, String)>,
    /// The egress policy of each brokered VM (`network.mode: brokered`), by VM name. Not
    /// part of a VM's configuration: the host's broker applies a change at once, without
    /// touching the VM.
    pub egress: BTreeMap<String, crate::egress::Policy>,
    /// Egress a VM's loadout declares although the VM's network mode (set by the loadout
    /// it extends, or by the VM) is not brokered: it has no effect, and the plan warns.
    pub egress_unused: Vec<String>,
    /// The pools that make fresh members for task runs (`lifecycle`), by pool name.
    pub fresh_pools: BTreeMap<String, crate::lifecycle::FreshPool>,
    /// The leases of declared VMs and pool replicas (`lease`), by VM name. Not part of a
    /// VM's configuration: a lease changes when the VM lives, not what it is.
    pub leases: BTreeMap<String, crate::lease::Lease>,
    /// `idle.stopAfter` of declared VMs and pool replicas (`idle`), by VM name.
    pub idle: BTreeMap<String, std::time::Duration>,
    /// `policy.quota`, in order.
    pub quotas: Vec<ResolvedQuota>,
    /// Workspaces (`fleet/workspaces/`), by name.
    pub workspaces: BTreeMap<String, DesiredWorkspace>,
    /// Pools spread over providers (`placement`), by pool name.
    pub placements: BTreeMap<String, crate::placement::PoolPlacement>,
    /// Pool members that wait for a provider this pass, and why (`placement::place`): left
    /// out of `vms`, reported by the plan.
    pub unplaced: BTreeMap<String, String>,
}

/// A workspace as the revision wants it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredWorkspace {
    pub name: String,
    pub provider: String,
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
    pub label: String,
    /// The VM that mounts it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub source: String,
}

/// A workspace as a VM mounts it: part of the VM's configuration (and stamp), so a change
/// of where, or of the workspace's size, is a change of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedMount {
    pub name: String,
    pub mount_path: String,
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
    pub label: String,
}

/// A quota (`policy.quota`): which VMs it counts, its caps, and where it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedQuota {
    pub pool: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub vms: Option<u32>,
    pub memory_mib: Option<u64>,
    /// The fleet file, and the rule's place in it, for its diagnostics.
    pub source: String,
    pub pos: crate::load::yaml::Pos,
    pub index: usize,
}

impl ResolvedQuota {
    /// Whether it counts a VM with these labels, of this pool.
    fn counts(&self, labels: &BTreeMap<String, String>, pool: Option<&str>) -> bool {
        match &self.pool {
            Some(p) => pool == Some(p.as_str()),
            None => self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }

    fn what(&self) -> String {
        match &self.pool {
            Some(pool) => format!("pool {pool}"),
            None => {
                let labels: Vec<String> = self
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("labels {}", labels.join(","))
            }
        }
    }
}

/// A provider as a revision uses it: how the host reaches it (from the host configuration)
/// and how the revision runs VMs there.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredProvider {
    pub host: Provider,
    pub domain_type: DomainType,
}

impl DesiredProvider {
    pub fn name(&self) -> &str {
        &self.host.name().0
    }
    pub fn kind(&self) -> ProviderKind {
        self.host.kind()
    }
}

/// A Secret as committed: its values stay age ciphertext until `secrets::Vault` opens them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSecret {
    pub name: String,
    pub data: BTreeMap<String, ArmoredValue>,
    pub source: String,
}

/// A task as fleet runs it: the command line expanded, the environment merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTask {
    pub name: String,
    /// The VM it runs in. A fresh task's (`fresh`) is the pool's name until the task book
    /// gives its run a member, then the member's.
    pub vm: String,
    /// `vm: {pool, fresh: true}`: each run gets a member of its own.
    pub fresh: Option<FreshTarget>,
    pub argv: Vec<String>,
    /// The coding agent `argv` runs, when the task names one (what a plan shows of it).
    pub agent: Option<AgentSpec>,
    /// The VM's loadout environment, then the task's own.
    pub env: BTreeMap<String, String>,
    pub repository: Option<Repository>,
    /// Who commits in the checkout of `repository` are by (`git.author`, or a default
    /// naming the task).
    pub git_author: crate::spec::GitIdentity,
    /// Where the commits a run makes go (`results.push`, its URL defaulted).
    pub results_push: Option<PushTarget>,
    pub timeout: std::time::Duration,
    pub artifacts: Vec<String>,
    pub prompt_patterns: Vec<String>,
    pub prompt_deadline: std::time::Duration,
    pub on_deadline: OnDeadline,
    /// Answers may hold control characters (`prompts.allowControl`).
    pub allow_control: bool,
    pub rerun: u32,
    /// The loadout's secret variables, then the task's own references (a task's reference
    /// replaces the loadout's for the same variable).
    pub secrets: Vec<SecretRef>,
    /// What narrows the loadout's egress for this task (`TaskSpec::egress`): not part of
    /// `spec_hash`, so a change applies to the running run.
    pub egress: Option<crate::egress::Narrowing>,
    /// sha256 of the canonical JSON of the task's spec (`rerun` included, `egress` not).
    /// The task book
    /// identifies a run by this and the keyed hashes of the task's secret values (the shell's
    /// `Vault::bind`), so a new spec or a changed value is a new run.
    pub spec_hash: String,
    pub source: String,
}

/// Where a fresh task's runs get their members, and how long a member outlives its run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreshTarget {
    pub pool: String,
    pub keep_for: std::time::Duration,
}

/// A results push: the URL (the loader checked it against the host's `pushes`) and the
/// branch (`None`: `fleet/<task>/<run>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTarget {
    pub url: String,
    pub branch: Option<String>,
    pub credentials: Option<crate::spec::RepositoryCredentials>,
}

/// An operator's committed answer (`fleet/hitl/<id>.yaml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedAnswer {
    pub response: String,
    pub source: String,
    /// Who signed the commit that last changed the file, when the host verifies.
    pub signer: Option<String>,
}

/// An operator's committed approval of held plan steps (`fleet/hitl/<id>.yaml`, `approve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedApproval {
    /// The approval digest it names.
    pub digest: String,
    pub source: String,
    /// Who signed the commit that last changed the file, when the host verifies.
    pub signer: Option<String>,
}

/// The default `policy.overcommit`: memory as the host has it, CPUs four times over.
pub const DEFAULT_OVERCOMMIT: (f64, f64) = (1.0, 4.0);

/// Why the running VMs of `desired` would not fit the hosts, by what each provider's host
/// has (`capacities`; a provider missing there is not checked) and `policy.overcommit`.
pub fn capacity_problems(
    desired: &Desired,
    capacities: &BTreeMap<String, crate::observe::Capacity>,
) -> Vec<String> {
    let (memory_ratio, cpu_ratio) = desired.policy.overcommit;
    let mut problems = Vec::new();
    // A placed pool's member is counted where it is placed; one not placed yet is counted
    // against its pool's providers together (below).
    let undecided: std::collections::BTreeSet<&str> = desired
        .placements
        .values()
        .flat_map(|p| p.members.iter().filter(|m| !p.placed.contains(*m)))
        .map(String::as_str)
        .collect();
    for (provider, capacity) in capacities {
        let running = desired.vms.values().filter(|vm| {
            vm.config.provider == *provider
                && vm.state == crate::spec::PowerState::Running
                && !undecided.contains(vm.name.as_str())
        });
        let (memory, cpus, count) = running.fold((0u64, 0u64, 0usize), |(m, c, n), vm| {
            (
                m + vm.config.memory_mib,
                c + u64::from(vm.config.cpus),
                n + 1,
            )
        });
        // A fresh pool may run `max` held members and `warm` idle ones at once.
        let (memory, cpus, count) = desired
            .fresh_pools
            .values()
            .filter(|p| p.template.config.provider == *provider)
            .fold((memory, cpus, count), |(m, c, n), p| {
                let members = u64::from(p.max) + u64::from(p.warm);
                (
                    m + members * p.template.config.memory_mib,
                    c + members * u64::from(p.template.config.cpus),
                    n + members as usize,
                )
            });
        let counted = if desired
            .fresh_pools
            .values()
            .any(|p| p.template.config.provider == *provider)
        {
            " (fresh pools counted at fresh.max + fresh.warm)"
        } else {
            ""
        };
        let memory_cap = (capacity.memory_mib as f64 * memory_ratio) as u64;
        let cpu_cap = (f64::from(capacity.cpus) * cpu_ratio) as u64;
        if memory > memory_cap {
            problems.push(format!(
                "provider {provider}: its {count} running VMs{counted} ask for {memory} MiB of memory; the host has {} MiB and policy.overcommit.memory is {memory_ratio}, so at most {memory_cap} MiB: stop or shrink VMs, or raise policy.overcommit.memory",
                capacity.memory_mib
            ));
        }
        if cpus > cpu_cap {
            problems.push(format!(
                "provider {provider}: its {count} running VMs{counted} ask for {cpus} CPUs; the host has {} and policy.overcommit.cpu is {cpu_ratio}, so at most {cpu_cap}: stop or shrink VMs, or raise policy.overcommit.cpu",
                capacity.cpus
            ));
        }
    }
    for (pool, placement) in &desired.placements {
        let waiting: Vec<&DesiredVm> = placement
            .members
            .iter()
            .filter(|m| !placement.placed.contains(*m))
            .filter_map(|m| desired.vms.get(m))
            .filter(|vm| vm.state == crate::spec::PowerState::Running)
            .collect();
        // Judged only when every provider of the pool says what it holds.
        let Some(caps) = placement
            .providers
            .iter()
            .map(|p| capacities.get(p))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        if waiting.is_empty() {
            continue;
        }
        let memory_cap: u64 = caps
            .iter()
            .map(|c| (c.memory_mib as f64 * memory_ratio) as u64)
            .sum();
        let cpu_cap: u64 = caps
            .iter()
            .map(|c| (f64::from(c.cpus) * cpu_ratio) as u64)
            .sum();
        let (memory, cpus) = desired
            .vms
            .values()
            .filter(|vm| {
                vm.state == crate::spec::PowerState::Running
                    && placement.providers.contains(&vm.config.provider)
                    && !undecided.contains(vm.name.as_str())
            })
            .chain(waiting.iter().copied())
            .fold((0u64, 0u64), |(m, c), vm| {
                (m + vm.config.memory_mib, c + u64::from(vm.config.cpus))
            });
        if memory > memory_cap || cpus > cpu_cap {
            problems.push(format!(
                "pool {pool}: with its {} member(s) not placed yet, the running VMs of its providers ({}) ask for {memory} MiB and {cpus} CPUs; together they have room for {memory_cap} MiB and {cpu_cap} CPUs (policy.overcommit applied): fewer replicas, smaller VMs, or more providers",
                waiting.len(),
                placement.providers.join(", ")
            ));
        }
    }
    problems
}

/// Whose committed answers and approvals count (the host's `trust`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Approvers {
    /// The host verifies no signatures: a committed answer counts as the commit's.
    #[default]
    Unverified,
    /// Only an answer whose last change is signed by one of these principals counts; by
    /// any verified signer when the list is empty.
    Signers(Vec<String>),
}

impl Approvers {
    pub fn from_host(trust: &crate::spec::HostTrust) -> Approvers {
        if trust.verifies() {
            Approvers::Signers(trust.approvers.clone())
        } else {
            Approvers::Unverified
        }
    }

    /// Why an answer whose last change `signer` signed does not count, if it does not.
    pub fn refusal(&self, signer: Option<&str>) -> Option<String> {
        match (self, signer) {
            (Approvers::Unverified, _) => None,
            (Approvers::Signers(_), None) => Some(
                "no trusted signature is on the commit that last changed it (along first parents: a file a merge brings in is the merge's); sign that commit with git commit -S (a shallow clone credits no one)"
                    .into(),
            ),
            (Approvers::Signers(list), Some(who)) if list.is_empty() || list.iter().any(|a| a == who) => None,
            (Approvers::Signers(_), Some(who)) => Some(format!(
                "signed by {who}, who is not an approver (host trust.approvers)"
            )),
        }
    }

    /// How an answer's origin reads in a record: `commit <c> (<file>)`, and its signer.
    pub fn attribute(revision: &Revision, source: &str, signer: Option<&str>) -> String {
        match signer {
            Some(who) => format!("{who} (commit {}, {source})", revision.short()),
            None => format!("commit {} ({source})", revision.short()),
        }
    }
}

/// The command line of a coding agent run non-interactively, as today's CLIs take it
/// (Claude Code 2.1, Codex 0.171, checked against their `--help`; Gemini CLI and aider by
/// their documentation). The VM is the sandbox, so each may act without asking: a
/// permission question nobody can answer would only stall the run. Claude Code streams
/// its events as JSON lines (its plain output comes only at the end); the prompt follows
/// `--`, so one that starts with `-` is never read as a flag.
pub fn agent_command(agent: &AgentSpec) -> Vec<String> {
    if agent.interactive {
        return interactive_agent_command(agent);
    }
    let words = |w: &[&str]| w.iter().map(|w| (*w).to_owned()).collect::<Vec<String>>();
    let mut argv = match agent.kind {
        AgentKind::Claude => words(&[
            "claude",
            "--print",
            "--dangerously-skip-permissions",
            "--output-format",
            "stream-json",
            "--verbose",
            "--no-session-persistence",
        ]),
        AgentKind::Codex => words(&[
            "codex",
            "exec",
            "--dangerously-bypass-approvals-and-sandbox",
            "--skip-git-repo-check",
        ]),
        AgentKind::Gemini => words(&["gemini", "--yolo"]),
        AgentKind::Aider => words(&["aider", "--yes-always"]),
    };
    if let Some(model) = &agent.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    match agent.kind {
        // aider takes its one-shot prompt as an option's value.
        AgentKind::Aider => argv.extend(["--message".to_owned(), agent.prompt.clone()]),
        AgentKind::Gemini => argv.extend(["--prompt".to_owned(), agent.prompt.clone()]),
        AgentKind::Claude | AgentKind::Codex => {
            argv.extend(["--".to_owned(), agent.prompt.clone()])
        }
    }
    argv
}

/// What Claude Code's first start asks once per user and directory (its onboarding, the
/// folder's trust, whether to use the API key in the environment), answered beforehand in
/// the run's own empty `HOME`: the run's questions are the agent's about its work. The key
/// approved is the brokered placeholder, by its last 20 characters, as Claude Code keeps it.
fn claude_first_start() -> String {
    let placeholder = crate::egress::PLACEHOLDER_KEY;
    let suffix = &placeholder[placeholder.len().saturating_sub(20)..];
    format!(
        "printf '{{\"hasCompletedOnboarding\":true,\"theme\":\"dark\",\"customApiKeyResponses\":{{\"approved\":[\"{suffix}\"],\"rejected\":[]}},\"projects\":{{\"%s\":{{\"hasTrustDialogAccepted\":true,\"hasCompletedProjectOnboarding\":true}}}}}}' \"$PWD\" > \"$HOME/.claude.json\"; exec \"$@\""
    )
}

/// The agent's own terminal interface, started on the prompt: it asks before it acts.
fn interactive_agent_command(agent: &AgentSpec) -> Vec<String> {
    let mut argv: Vec<String> = match agent.kind {
        AgentKind::Claude => vec![
            "sh".into(),
            "-c".into(),
            claude_first_start(),
            "sh".into(),
            "claude".into(),
            // Its default is now to decide permissions itself ("auto"): asked, it asks.
            "--permission-mode".into(),
            "default".into(),
        ],
        AgentKind::Codex => vec!["codex".into()],
        AgentKind::Gemini => vec!["gemini".into()],
        // Refused by the loader: aider's interface starts without a prompt.
        AgentKind::Aider => vec!["aider".into()],
    };
    if let Some(model) = &agent.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    match agent.kind {
        // In the option's own word, so a prompt that starts with `-` is never a flag.
        AgentKind::Gemini => argv.push(format!("--prompt-interactive={}", agent.prompt)),
        AgentKind::Aider => {}
        AgentKind::Claude | AgentKind::Codex => {
            argv.extend(["--".to_owned(), agent.prompt.clone()])
        }
    }
    argv
}

fn resolve_task(name: &str, spec: &TaskSpec, vm: Option<&DesiredVm>, source: &str) -> DesiredTask {
    let argv = match (&spec.command, &spec.agent) {
        (Some(command), _) => command.clone(),
        (None, Some(agent)) => agent_command(agent),
        (None, None) => Vec::new(),
    };
    let mut env = vm.map(|vm| vm.config.env.clone()).unwrap_or_default();
    env.extend(spec.env.clone());
    // The loadout's variables are given to the task; its files belong to the VM (delivered
    // with the VM's set), so only the variables are part of what the task runs with.
    let loadout_secrets: Vec<SecretRef> = vm
        .map(|vm| {
            vm.secrets
                .iter()
                .filter(|r| r.env.is_some())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let secrets = merge_keyed(loadout_secrets, &spec.secrets, SecretRef::target);
    let prompts = spec.prompts.clone().unwrap_or_default();
    let hashed = TaskSpec {
        egress: None,
        ..spec.clone()
    };
    let json = serde_json::to_vec(&hashed).expect("TaskSpec serialises to JSON");
    let egress = spec.egress.as_ref().map(|e| crate::egress::Narrowing {
        rules: egress_rules(&format!("task {name}"), &e.allow),
        budget: e.budget.as_ref().map(budget),
    });
    DesiredTask {
        name: name.to_owned(),
        vm: spec.vm.name().to_owned(),
        fresh: match &spec.vm {
            crate::spec::TaskVm::Fresh(f) => Some(FreshTarget {
                pool: f.pool.0.clone(),
                keep_for: f
                    .keep_for
                    .as_ref()
                    .map_or(std::time::Duration::ZERO, |d| d.to_std()),
            }),
            crate::spec::TaskVm::Named(_) => None,
        },
        argv,
        agent: spec.agent.clone(),
        env,
        repository: spec.repository.clone(),
        git_author: spec
            .git
            .as_ref()
            .map(|g| g.author.clone())
            .unwrap_or_else(|| crate::spec::GitIdentity {
                name: format!("fleet task {name}"),
                email: format!("{name}@fleet.invalid"),
            }),
        results_push: spec
            .results
            .as_ref()
            .and_then(|r| r.push.as_ref())
            .and_then(|p| {
                let own = spec.repository.as_ref();
                Some(match &p.url {
                    Some(url) => PushTarget {
                        url: url.clone(),
                        branch: p.branch.clone(),
                        credentials: p.credentials.clone(),
                    },
                    // The task's own repository, with its credential unless one is named.
                    None => PushTarget {
                        url: own?.url.clone(),
                        branch: p.branch.clone(),
                        credentials: p.credentials.clone().or_else(|| own?.credentials.clone()),
                    },
                })
            }),
        timeout: duration_or(&spec.timeout, DEFAULT_TASK_TIMEOUT),
        artifacts: spec.artifacts.clone(),
        prompt_patterns: prompts.patterns,
        prompt_deadline: duration_or(&prompts.deadline, DEFAULT_PROMPT_DEADLINE),
        on_deadline: prompts.on_deadline,
        allow_control: prompts.allow_control,
        rerun: spec.rerun,
        secrets,
        egress,
        spec_hash: hex(&Sha256::digest(json)),
        source: source.to_owned(),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPolicy {
    pub max_parallel: u32,
    #[serde(with = "humantime_serde_secs")]
    pub step_timeout: std::time::Duration,
    #[serde(with = "humantime_serde_secs")]
    pub shutdown_timeout: std::time::Duration,
    #[serde(with = "humantime_serde_secs")]
    pub reconcile_interval: std::time::Duration,
    #[serde(with = "humantime_serde_secs")]
    pub resync_interval: std::time::Duration,
    pub self_heal: bool,
    /// Destroys beyond this many in one apply wait for an approval.
    #[serde(default = "default_max_destroys")]
    pub max_destroys_per_apply: u32,
    /// Step kinds that wait for an approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approve: Vec<crate::spec::Action>,
    /// A tip that does not descend from the revision in force may be applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_rollback: bool,
    /// Nothing is applied while set (`policy.suspend`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// How far running VMs may exceed a host's memory and CPUs (`policy.overcommit`).
    #[serde(
        default = "default_overcommit",
        skip_serializing_if = "is_default_overcommit"
    )]
    pub overcommit: (f64, f64),
    /// What the status directory keeps (`policy.retention`); not part of any plan.
    #[serde(skip)]
    pub retention: ResolvedRetention,
}

/// `policy.retention` with its defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedRetention {
    pub finished_tasks: u32,
    pub finished_task_age: std::time::Duration,
    pub log_bytes: u64,
    pub log_files: u32,
}

impl Default for ResolvedRetention {
    fn default() -> ResolvedRetention {
        ResolvedRetention {
            finished_tasks: 100,
            finished_task_age: std::time::Duration::from_secs(30 * 24 * 3600),
            log_bytes: 16 << 20,
            log_files: 5,
        }
    }
}

impl ResolvedRetention {
    fn from_spec(spec: Option<&crate::spec::Retention>) -> ResolvedRetention {
        let default = ResolvedRetention::default();
        let Some(spec) = spec else {
            return default;
        };
        ResolvedRetention {
            finished_tasks: spec.finished_tasks.unwrap_or(default.finished_tasks),
            finished_task_age: spec
                .finished_task_age
                .as_ref()
                .map_or(default.finished_task_age, |d| d.to_std()),
            log_bytes: spec
                .log_size
                .as_ref()
                .map_or(default.log_bytes, |s| s.mib().saturating_mul(1 << 20)),
            log_files: spec.log_files.unwrap_or(default.log_files),
        }
    }
}

fn default_overcommit() -> (f64, f64) {
    DEFAULT_OVERCOMMIT
}

fn is_default_overcommit(o: &(f64, f64)) -> bool {
    *o == DEFAULT_OVERCOMMIT
}

pub const DEFAULT_MAX_DESTROYS_PER_APPLY: u32 = 5;

fn default_max_destroys() -> u32 {
    DEFAULT_MAX_DESTROYS_PER_APPLY
}

mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// One VM as fleet wants it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredVm {
    pub name: String,
    /// Power state; not part of the configuration hash (starting a VM is not an update).
    pub state: PowerState,
    /// The loadout's secret references: delivered over the agent link, never part of the
    /// VM's definition (so not in `config` nor its hash).
    pub secrets: Vec<SecretRef>,
    pub config: VmConfig,
    /// sha256 of the canonical JSON of `config`.
    pub spec_hash: String,
    /// The file that declares it (a VM file or the pool's file).
    pub source: String,
}

/// Everything that defines a VM except its power state. This is what the ownership stamp
/// records, and what plans compare field by field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    pub provider: String,
    pub domain_type: DomainType,
    pub image: ResolvedImage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Proxmox: the node it was placed on by its spec (`None`: the provider's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub cpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Only for images with a disk.
    #[serde(rename = "diskMiB", default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    pub network: NetworkMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<GuestFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<GuestUser>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub protect: bool,
    /// A member made for task runs (`<pool>-f<N>`, see `lifecycle`): recorded in the stamp,
    /// so its destroy once no run holds it is known for what it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// `reset: beforeEachTask`: the VM returns to the state it was made in before each task
    /// run (see `reset`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// The workspaces it mounts, in the order its file lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<ResolvedMount>,
    /// Snapshots of its workspaces fleet takes before its risky steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<crate::spec::SnapshotPolicy>,
}

impl VmConfig {
    /// The workspaces to snapshot before `step` (replace or reset), by the VM's policy.
    pub fn snapshot_before(&self, step: crate::spec::SnapshotBefore) -> Option<u32> {
        let policy = self.snapshots.as_ref()?;
        (policy.before.contains(&step) && !self.workspaces.is_empty()).then_some(policy.keep)
    }
}

/// An image as a VM uses it. Paths are as written in fleet.yaml (relative ones resolve
/// against the repository root when applied), so moving the checkout changes no hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedImage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Proxmox: the template VM it is cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The sha256 of `disk`'s content, filled in on the host (`image_content`): a base disk
    /// rebuilt in place is a change of the VM, never silent corruption of its overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_sha256: Option<String>,
    /// The sha256 of `kernel`'s and `initrd`'s content, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_sha256: Option<String>,
}

impl VmConfig {
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("VmConfig serialises to JSON");
        hex(&Sha256::digest(json))
    }
}

/// Resolves a loaded revision.
pub fn resolve(loaded: &LoadedFleet, host: &HostSpec) -> Desired {
    let spec = &loaded.fleet.doc.spec;
    let policy = ResolvedPolicy {
        max_parallel: spec.policy.max_parallel.unwrap_or(DEFAULT_MAX_PARALLEL),
        step_timeout: duration_or(&spec.policy.step_timeout, DEFAULT_STEP_TIMEOUT),
        shutdown_timeout: duration_or(&spec.policy.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT),
        reconcile_interval: duration_or(
            &spec.policy.reconcile_interval,
            DEFAULT_RECONCILE_INTERVAL,
        ),
        resync_interval: duration_or(&spec.policy.resync_interval, DEFAULT_RESYNC_INTERVAL),
        self_heal: spec.policy.self_heal.unwrap_or(true),
        max_destroys_per_apply: spec
            .policy
            .max_destroys_per_apply
            .unwrap_or(DEFAULT_MAX_DESTROYS_PER_APPLY),
        approve: spec.policy.approve.clone(),
        allow_rollback: spec.policy.allow_rollback.unwrap_or(false),
        suspend: spec.policy.suspend.unwrap_or(false),
        overcommit: (
            spec.policy
                .overcommit
                .as_ref()
                .and_then(|o| o.memory)
                .unwrap_or(DEFAULT_OVERCOMMIT.0),
            spec.policy
                .overcommit
                .as_ref()
                .and_then(|o| o.cpu)
                .unwrap_or(DEFAULT_OVERCOMMIT.1),
        ),
        retention: ResolvedRetention::from_spec(spec.policy.retention.as_ref()),
    };
    let mut merged_loadouts: BTreeMap<String, LoadoutSpec> = BTreeMap::new();
    let mut vms = BTreeMap::new();
    for (name, o) in &loaded.vms {
        let vm = resolve_vm(
            loaded,
            &mut merged_loadouts,
            name,
            &o.doc.metadata.labels,
            &o.doc.spec,
            None,
            &o.path,
        );
        vms.insert(name.clone(), vm);
    }
    let fresh_names = crate::load::refs::fresh_pools(loaded);
    let mut fresh_pools = BTreeMap::new();
    for (pool, o) in &loaded.pools {
        let labels = o
            .doc
            .spec
            .template
            .metadata
            .as_ref()
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        let mut labels_with_pool = o.doc.metadata.labels.clone();
        labels_with_pool.extend(labels);
        for member in pool_member_names(pool, o.doc.spec.replicas) {
            let vm = resolve_vm(
                loaded,
                &mut merged_loadouts,
                &member,
                &labels_with_pool,
                &o.doc.spec.template.spec,
                Some(pool),
                &o.path,
            );
            vms.insert(member, vm);
        }
        if fresh_names.contains(pool.as_str()) {
            let mut template = resolve_vm(
                loaded,
                &mut merged_loadouts,
                pool,
                &labels_with_pool,
                &o.doc.spec.template.spec,
                Some(pool),
                &o.path,
            );
            template.config.fresh = true;
            // Made for runs: a member runs while a run holds it, whatever the template says.
            template.state = PowerState::Running;
            template.spec_hash = template.config.hash();
            let settings = o.doc.spec.fresh.clone().unwrap_or_default();
            let fresh = crate::lifecycle::FreshPool {
                max: settings.max.unwrap_or(crate::lifecycle::DEFAULT_MAX),
                warm: settings.warm.unwrap_or(0),
                template,
                egress: None,
            };
            fresh_pools.insert(pool.clone(), fresh);
        }
    }
    let egress_of = |vm: &DesiredVm| {
        vm.config
            .loadout
            .as_ref()
            .and_then(|l| Some((l, merged_loadouts.get(l)?.egress.as_ref()?)))
            .map(|(l, e)| egress_policy(l, e))
            .unwrap_or_default()
    };
    for pool in fresh_pools.values_mut() {
        if pool.template.config.network == NetworkMode::Brokered {
            pool.egress = Some(egress_of(&pool.template));
        }
    }
    let egress = vms
        .values()
        .filter(|vm| vm.config.network == NetworkMode::Brokered)
        .map(|vm| {
            let policy = vm
                .config
                .loadout
                .as_ref()
                .and_then(|l| Some((l, merged_loadouts.get(l)?.egress.as_ref()?)))
                .map(|(l, e)| egress_policy(l, e))
                .unwrap_or_default();
            (vm.name.clone(), policy)
        })
        .collect();
    let egress_unused = vms
        .values()
        .filter(|vm| vm.config.network != NetworkMode::Brokered)
        .filter_map(|vm| {
            let loadout = vm.config.loadout.as_ref()?;
            merged_loadouts.get(loadout)?.egress.as_ref()?;
            Some(format!(
                "VM {} uses loadout {loadout}, whose egress rules take effect only with network.mode: brokered, and its mode is {}",
                vm.name,
                serde_json::to_value(vm.config.network)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ))
        })
        .collect();
    let tasks = loaded
        .tasks
        .iter()
        .map(|(name, o)| {
            let vm = match &o.doc.spec.vm {
                crate::spec::TaskVm::Named(n) => vms.get(&n.0),
                crate::spec::TaskVm::Fresh(f) => fresh_pools.get(&f.pool.0).map(|p| &p.template),
            };
            (name.clone(), resolve_task(name, &o.doc.spec, vm, &o.path))
        })
        .collect();
    let answers = loaded
        .answers
        .iter()
        .filter_map(|(id, o)| {
            let answer = CommittedAnswer {
                response: o.doc.spec.response.clone()?,
                source: o.path.clone(),
                signer: loaded.signers.get(&o.path).cloned(),
            };
            Some((id.clone(), answer))
        })
        .collect();
    let approvals = loaded
        .answers
        .iter()
        .filter_map(|(id, o)| {
            let approval = CommittedApproval {
                digest: o.doc.spec.approve.clone()?,
                source: o.path.clone(),
                signer: loaded.signers.get(&o.path).cloned(),
            };
            Some((id.clone(), approval))
        })
        .collect();
    let secrets = loaded
        .secrets
        .iter()
        .map(|(name, o)| {
            let secret = DesiredSecret {
                name: name.clone(),
                data: o
                    .doc
                    .spec
                    .data
                    .iter()
                    .map(|(k, v)| (k.0.clone(), v.clone()))
                    .collect(),
                source: o.path.clone(),
            };
            (name.clone(), secret)
        })
        .collect();
    Desired {
        fleet: loaded.fleet.doc.metadata.name.0.clone(),
        revision: loaded.revision.clone(),
        providers: spec
            .providers
            .iter()
            .filter_map(|p| {
                Some(DesiredProvider {
                    host: host.provider(&p.name.0)?.clone(),
                    domain_type: p.domain_type,
                })
            })
            .collect(),
        policy,
        vms,
        tasks,
        answers,
        approvals,
        approvers: Approvers::from_host(&host.trust),
        secrets,
        egress,
        egress_unused,
        fresh_pools,
        placements: loaded
            .pools
            .iter()
            .filter_map(|(pool, o)| {
                let placement = o.doc.spec.placement.as_ref()?;
                Some((
                    pool.clone(),
                    crate::placement::PoolPlacement {
                        providers: placement.providers.iter().map(|p| p.0.clone()).collect(),
                        strategy: placement.strategy.unwrap_or_default(),
                        members: pool_member_names(pool, o.doc.spec.replicas).collect(),
                        placed: Default::default(),
                    },
                ))
            })
            .collect(),
        unplaced: BTreeMap::new(),
        leases: per_vm(loaded, |spec| spec.lease.as_ref().map(Into::into)),
        idle: per_vm(loaded, |spec| Some(spec.idle.as_ref()?.stop_after.to_std())),
        workspaces: loaded
            .workspaces
            .values()
            .map(|o| {
                let name = o.doc.metadata.name.0.clone();
                let vm = loaded
                    .vms
                    .values()
                    .find(|v| {
                        crate::load::vm_mounts(loaded, &v.doc.spec)
                            .iter()
                            .any(|m| m.mount.name.0 == name)
                    })
                    .map(|v| v.doc.metadata.name.0.clone());
                let workspace = DesiredWorkspace {
                    provider: o.doc.spec.provider.0.clone(),
                    size_mib: o.doc.spec.size.mib(),
                    label: workspace_label(&o.doc),
                    vm,
                    source: o.path.clone(),
                    name: name.clone(),
                };
                (name, workspace)
            })
            .collect(),
        quotas: spec
            .policy
            .quota
            .iter()
            .enumerate()
            .map(|(index, q)| ResolvedQuota {
                pool: q.pool.as_ref().map(|p| p.0.clone()),
                labels: q.labels.clone(),
                vms: q.vms,
                memory_mib: q.memory.as_ref().map(crate::spec::Size::mib),
                source: loaded.fleet.path.clone(),
                pos: loaded
                    .fleet
                    .tree
                    .pos_at_pointer(&format!("/spec/policy/quota/{index}"), false),
                index,
            })
            .collect(),
        provider_credentials: host
            .providers
            .iter()
            .filter_map(|p| match p {
                Provider::Proxmox(x) => x.token.secret.as_ref(),
                Provider::Libvirt(_) => None,
            })
            .map(|r| (r.secret.0.clone(), r.key.0.clone()))
            .collect(),
    }
}

/// The checks that need the resolved fleet (pools expanded, loadouts merged): the host's
/// limits, and secret files no two references of one VM deliver differently.
pub fn check(desired: &Desired, host: &HostSpec) -> Vec<crate::load::Diagnostic> {
    let mut diags = check_limits(desired, host);
    diags.extend(check_secret_files(desired));
    diags.extend(check_quotas(desired));
    diags.extend(check_remote_providers(desired, host));
    diags
}

/// What needs fleet on the libvirt host itself, refused here (not at the first step) for a
/// VM, or a pool member wherever placement may put it, on a provider the host configuration
/// reaches at another host:
/// - `network: full`: the nftables guard that keeps such a VM off the host's own addresses
///   is applied where fleet runs;
/// - a `snapshots:` policy: workspace snapshots are taken with `qemu-img` (libvirt's
///   storage API has none), which fleet runs on its own host only.
pub fn check_remote_providers(desired: &Desired, host: &HostSpec) -> Vec<crate::load::Diagnostic> {
    let remote: BTreeMap<&str, &str> = host
        .providers
        .iter()
        .filter_map(|p| match p {
            crate::spec::Provider::Libvirt(l)
                if !crate::spec::LibvirtProvider::is_local_uri(&l.uri) =>
            {
                Some((l.name.0.as_str(), l.uri.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut diags = Vec::new();
    let vms = desired
        .vms
        .values()
        .chain(desired.fresh_pools.values().map(|p| &p.template));
    for vm in vms {
        let pool = vm.config.pool.as_deref();
        let mut providers = vec![vm.config.provider.as_str()];
        if let Some(placed) = pool.and_then(|p| desired.placements.get(p)) {
            providers.extend(placed.providers.iter().map(String::as_str));
        }
        let Some((provider, uri)) = providers.into_iter().find_map(|p| remote.get_key_value(p))
        else {
            continue;
        };
        let mut refuse = |what: String| {
            diags.push(crate::load::Diagnostic::new(
                &vm.source,
                crate::load::yaml::Pos::START,
                format!("VM {}: {what}", vm.name),
            ));
        };
        if vm.config.network == crate::spec::NetworkMode::Full {
            refuse(format!(
                "network: full needs fleet on the libvirt host itself (the guard that keeps such a VM off the host's addresses is applied where fleet runs), and provider {provider} is reached at {uri}; use network: brokered, or a provider on this host"
            ));
        }
        if vm.config.snapshots.is_some() {
            refuse(format!(
                "a snapshots: policy needs fleet on the libvirt host itself (workspace snapshots are taken with qemu-img where fleet runs; libvirt's storage API has none), and provider {provider} is reached at {uri}; drop the policy, or use a provider on this host"
            ));
        }
    }
    diags.sort();
    diags.dedup();
    diags
}

/// Each quota against the VMs it counts: declared VMs and replicas (memory of those that
/// run), and each fresh pool at `fresh.max + fresh.warm` members, all running.
pub fn check_quotas(desired: &Desired) -> Vec<crate::load::Diagnostic> {
    let mut diags = Vec::new();
    for q in &desired.quotas {
        let (mut vms, mut memory) = (0u64, 0u64);
        for vm in desired.vms.values().filter(|vm| !vm.config.fresh) {
            if q.counts(&vm.config.labels, vm.config.pool.as_deref()) {
                vms += 1;
                if vm.state == PowerState::Running {
                    memory += vm.config.memory_mib;
                }
            }
        }
        let mut fresh = false;
        for (name, pool) in &desired.fresh_pools {
            if q.counts(&pool.template.config.labels, Some(name)) {
                let members = u64::from(pool.max) + u64::from(pool.warm);
                vms += members;
                memory += members * pool.template.config.memory_mib;
                fresh = true;
            }
        }
        let counted = if fresh {
            " (fresh pools counted at fresh.max + fresh.warm)"
        } else {
            ""
        };
        let field = format!("spec.policy.quota[{}] ({})", q.index, q.what());
        if let Some(cap) = q.vms.filter(|cap| vms > u64::from(*cap)) {
            diags.push(crate::load::Diagnostic::new(
                &q.source,
                q.pos,
                format!("{field}: the revision has {vms} such VMs{counted}, the quota allows {cap}: remove some, or raise vms"),
            ));
        }
        if let Some(cap) = q.memory_mib.filter(|cap| memory > *cap) {
            diags.push(crate::load::Diagnostic::new(
                &q.source,
                q.pos,
                format!("{field}: its running VMs{counted} ask for {memory} MiB of memory, the quota allows {cap} MiB: stop or shrink some, or raise memory"),
            ));
        }
    }
    diags
}

/// In one VM, a file under `/run/fleet/secrets` holds one value: a loadout and a task (or
/// two tasks) naming the same file with different secrets would leave which one the guest
/// gets to chance. Reported at the later file, naming both.
pub fn check_secret_files(desired: &Desired) -> Vec<crate::load::Diagnostic> {
    let mut diags = Vec::new();
    for vm in desired.vms.values() {
        let uses = std::iter::once((vm.source.as_str(), &vm.secrets)).chain(
            desired
                .tasks
                .values()
                .filter(|t| t.vm == vm.name)
                .map(|t| (t.source.as_str(), &t.secrets)),
        );
        let mut by_file: BTreeMap<&str, (&str, &str, &str)> = BTreeMap::new();
        for (source, refs) in uses {
            for r in refs {
                let Some(file) = r.file.as_deref() else {
                    continue;
                };
                match by_file.get(file) {
                    None => {
                        by_file.insert(file, (&r.secret.0, &r.key.0, source));
                    }
                    Some((secret, key, first)) if (*secret, *key) != (&r.secret.0, &r.key.0) => {
                        diags.push(crate::load::Diagnostic::new(
                            source,
                            crate::load::yaml::Pos::START,
                            format!(
                                "VM {}: secret file {file} is {}/{} here but {secret}/{key} in {first}; one path holds one value, use another file name",
                                vm.name, r.secret.0, r.key.0
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
    }
    diags.sort();
    diags.dedup();
    diags
}

/// What a revision asks of the host in total, against the host's limits: VMs (pool
/// members included), vCPUs and memory. Each excess is one diagnostic, at the file of the
/// VM or pool whose addition crossed the limit.
pub fn check_limits(desired: &Desired, host: &HostSpec) -> Vec<crate::load::Diagnostic> {
    let limits = &host.limits;
    let mut diags = Vec::new();
    let (mut vms, mut cpus, mut memory) = (0u64, 0u64, 0u64);
    let (mut vms_over, mut cpus_over, mut memory_over) = (false, false, false);
    for vm in desired.vms.values() {
        vms += 1;
        cpus += u64::from(vm.config.cpus);
        memory += vm.config.memory_mib;
        let mut over = |flag: &mut bool, what: String| {
            if !*flag {
                *flag = true;
                diags.push(crate::load::Diagnostic::new(
                    &vm.source,
                    crate::load::yaml::Pos::START,
                    format!("{what} (the host configuration's limits); ask the host's administrator to raise it, or ask for less"),
                ));
            }
        };
        if vms > u64::from(limits.max_vms()) {
            over(
                &mut vms_over,
                format!(
                    "VM {}: this revision asks for more than {} VMs, limits.maxVms",
                    vm.name,
                    limits.max_vms()
                ),
            );
        }
        if cpus > limits.max_cpus() {
            over(
                &mut cpus_over,
                format!(
                    "VM {}: this revision asks for more than {} vCPUs in total, limits.maxCpus",
                    vm.name,
                    limits.max_cpus()
                ),
            );
        }
        if memory > limits.max_memory_mib() {
            over(
                &mut memory_over,
                format!(
                    "VM {}: this revision asks for more than {} MiB of memory in total, limits.maxMemory",
                    vm.name,
                    limits.max_memory_mib()
                ),
            );
        }
    }
    diags
}

fn duration_or(
    d: &Option<crate::spec::Duration>,
    default: std::time::Duration,
) -> std::time::Duration {
    d.as_ref().map_or(default, |d| d.to_std())
}

/// What `of` takes from each declared VM's and pool replica's spec, by VM name (fresh
/// members have none: they live for their runs).
fn per_vm<T: Clone>(
    loaded: &LoadedFleet,
    of: impl Fn(&VmSpec) -> Option<T>,
) -> BTreeMap<String, T> {
    let declared = loaded
        .vms
        .iter()
        .filter_map(|(name, o)| Some((name.clone(), of(&o.doc.spec)?)));
    let replicas = loaded.pools.iter().flat_map(|(pool, o)| {
        let value = of(&o.doc.spec.template.spec);
        pool_member_names(pool, o.doc.spec.replicas)
            .filter_map(move |member| Some((member, value.clone()?)))
    });
    declared.chain(replicas).collect()
}

#[allow(clippy::too_many_arguments)]
/// The serial a workspace's disk carries, by which the guest finds it: `fws` and 16 hex
/// digits of its name's SHA-256 (a virtio disk's serial is at most 20 bytes).
pub fn workspace_serial(name: &str) -> String {
    use sha2::Digest;
    let digest = crate::digest::hex(&sha2::Sha256::digest(name.as_bytes()));
    format!("fws{}", &digest[..16])
}

/// A workspace's filesystem label: its own, or its name cut to 16 characters.
fn workspace_label(doc: &crate::spec::WorkspaceDocument) -> String {
    match &doc.spec.label {
        Some(label) => label.0.clone(),
        None => doc.metadata.name.0.chars().take(16).collect(),
    }
}

fn resolve_vm(
    loaded: &LoadedFleet,
    merged_loadouts: &mut BTreeMap<String, LoadoutSpec>,
    name: &str,
    labels: &BTreeMap<String, String>,
    spec: &VmSpec,
    pool: Option<&str>,
    source: &str,
) -> DesiredVm {
    let fleet_spec = &loaded.fleet.doc.spec;
    let loadout = spec
        .loadout
        .as_ref()
        .map(|l| merged_loadout(loaded, merged_loadouts, &l.0))
        .unwrap_or_default();
    let resources = merge_resources(loadout.resources.clone(), spec.resources.clone());
    let image = fleet_spec
        .images
        .iter()
        .find(|i| i.name == spec.image)
        .map(|i| ResolvedImage {
            name: i.name.0.clone(),
            kernel: i.kernel.clone(),
            initrd: i.initrd.clone(),
            cmdline: i.cmdline.clone(),
            disk: i.disk.clone(),
            template: i.template.clone(),
            disk_sha256: None,
            boot_sha256: None,
        })
        .unwrap_or(ResolvedImage {
            name: spec.image.0.clone(),
            kernel: None,
            initrd: None,
            cmdline: None,
            disk: None,
            template: None,
            disk_sha256: None,
            boot_sha256: None,
        });
    let domain_type = fleet_spec
        .providers
        .iter()
        .find(|p| p.name == spec.provider)
        .map(|p| p.domain_type)
        .unwrap_or_default();
    let disk_mib = image.disk.as_ref().or(image.template.as_ref()).map(|_| {
        resources
            .disk
            .as_ref()
            .map_or(DEFAULT_DISK_MIB, |d| d.mib())
    });
    let secrets = loadout.secrets.clone();
    let config = VmConfig {
        provider: spec.provider.0.clone(),
        domain_type,
        image,
        loadout: spec.loadout.as_ref().map(|l| l.0.clone()),
        pool: pool.map(str::to_owned),
        node: spec.node.clone(),
        cpus: resources.cpus.unwrap_or(DEFAULT_CPUS),
        memory_mib: resources
            .memory
            .as_ref()
            .map_or(DEFAULT_MEMORY_MIB, |m| m.mib()),
        disk_mib,
        network: spec
            .network
            .as_ref()
            .or(loadout.network.as_ref())
            .map(|n| n.mode)
            .unwrap_or_default(),
        packages: loadout.packages,
        files: loadout.files,
        runcmd: loadout.runcmd,
        users: loadout.users,
        env: loadout.env,
        labels: labels.clone(),
        protect: spec.protect,
        fresh: false,
        reset: spec.reset.or(loadout.reset).is_some(),
        workspaces: crate::load::vm_mounts(loaded, spec)
            .into_iter()
            .filter_map(|m| {
                let m = m.mount;
                let w = loaded.workspaces.get(&m.name.0)?;
                Some(ResolvedMount {
                    name: m.name.0.clone(),
                    mount_path: m.mount_path.0.trim_end_matches('/').to_owned(),
                    size_mib: w.doc.spec.size.mib(),
                    label: workspace_label(&w.doc),
                })
            })
            .collect(),
        snapshots: spec.snapshots.clone(),
    };
    DesiredVm {
        name: name.to_owned(),
        state: spec.state,
        secrets,
        spec_hash: config.hash(),
        config,
        source: source.to_owned(),
    }
}

/// A loadout's `egress`, as the broker checks it (the loader refused what does not parse).
fn egress_policy(loadout: &str, egress: &crate::spec::Egress) -> crate::egress::Policy {
    use crate::egress::{Credential, DEFAULT_PORT, Scheme};
    use crate::spec::CredentialScheme;
    let credentials = egress
        .credentials
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let header = c
                .header
                .as_deref()
                .unwrap_or("authorization")
                .to_ascii_lowercase();
            Credential {
                host: crate::egress::normalize_host(&c.host),
                port: c.port.map_or(DEFAULT_PORT, |p| p.0),
                scheme: match c.scheme {
                    Some(CredentialScheme::Plain) => Scheme::Plain,
                    Some(CredentialScheme::Bearer) => Scheme::Bearer,
                    Some(CredentialScheme::Basic) => Scheme::Basic {
                        username: c.username.clone().unwrap_or_default(),
                    },
                    None => Credential::default_scheme(&header),
                },
                header,
                secret: c.secret.secret.0.clone(),
                key: c.secret.key.0.clone(),
                source: format!("loadout {loadout} egress.credentials[{i}]"),
            }
        })
        .collect();
    crate::egress::Policy {
        rules: egress_rules(&format!("loadout {loadout}"), &egress.allow),
        credentials,
        budget: egress.budget.as_ref().map(budget),
    }
}

fn budget(b: &crate::spec::EgressBudget) -> crate::egress::Budget {
    crate::egress::Budget {
        connections: b.connections,
        bytes: b
            .bytes
            .as_ref()
            .map(|s| s.mib().saturating_mul(1024 * 1024)),
        tokens: b.tokens,
    }
}

/// `allow` rules as the broker checks them; `owner` (`loadout agent`, `task build`) names
/// where they were written.
fn egress_rules(owner: &str, allow: &[crate::spec::EgressAllow]) -> Vec<crate::egress::Rule> {
    allow
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            Some(crate::egress::Rule {
                host: crate::egress::HostPattern::parse(&a.host).ok()?,
                ports: a.ports.iter().map(|p| p.0).collect(),
                path_prefixes: a.paths.clone(),
                source: format!("{owner} egress.allow[{i}]"),
            })
        })
        .collect()
}

/// A loadout with its `extends` chain merged in, memoised.
fn merged_loadout(
    loaded: &LoadedFleet,
    memo: &mut BTreeMap<String, LoadoutSpec>,
    name: &str,
) -> LoadoutSpec {
    if let Some(done) = memo.get(name) {
        return done.clone();
    }
    // Cycles were refused by `load`; the depth guard keeps a bug from recursing forever.
    let merged = merge_chain(loaded, memo, name, 0);
    memo.insert(name.to_owned(), merged.clone());
    merged
}

fn merge_chain(
    loaded: &LoadedFleet,
    memo: &mut BTreeMap<String, LoadoutSpec>,
    name: &str,
    depth: usize,
) -> LoadoutSpec {
    let Some(o) = loaded.loadouts.get(name) else {
        return LoadoutSpec::default();
    };
    let own = &o.doc.spec;
    let mut acc = LoadoutSpec::default();
    if depth < 64 {
        for parent in &own.extends {
            let p = match memo.get(&parent.0) {
                Some(p) => p.clone(),
                None => merge_chain(loaded, memo, &parent.0, depth + 1),
            };
            acc = merge(acc, &p);
        }
    }
    let mut merged = merge(acc, own);
    merged.extends.clear();
    merged
}

/// Merges `over` onto `base`: scalars last wins, string lists union, maps deep merge.
pub fn merge(base: LoadoutSpec, over: &LoadoutSpec) -> LoadoutSpec {
    LoadoutSpec {
        extends: Vec::new(),
        resources: Some(merge_resources(base.resources, over.resources.clone())),
        network: over.network.clone().or(base.network),
        egress: over.egress.clone().or(base.egress),
        reset: over.reset.or(base.reset),
        packages: union(base.packages, &over.packages),
        files: merge_keyed(base.files, &over.files, |f| f.path.clone()),
        runcmd: union(base.runcmd, &over.runcmd),
        users: merge_keyed(base.users, &over.users, |u| u.name.clone()),
        secrets: merge_keyed(base.secrets, &over.secrets, SecretRef::target),
        env: {
            let mut env = base.env;
            env.extend(over.env.clone());
            env
        },
        workspaces: merge_keyed(base.workspaces, &over.workspaces, |m| m.name.clone()),
    }
}

fn merge_resources(base: Option<Resources>, over: Option<Resources>) -> Resources {
    let base = base.unwrap_or_default();
    let over = over.unwrap_or_default();
    Resources {
        cpus: over.cpus.or(base.cpus),
        memory: over.memory.or(base.memory),
        disk: over.disk.or(base.disk),
    }
}

fn union(mut base: Vec<String>, over: &[String]) -> Vec<String> {
    for item in over {
        if !base.contains(item) {
            base.push(item.clone());
        }
    }
    base
}

/// Merges lists whose entries are keyed (files by path, users by name): a later loadout's
/// entry replaces an earlier one with the same key, in place; new keys are appended.
fn merge_keyed<T: Clone, K: PartialEq>(
    mut base: Vec<T>,
    over: &[T],
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    for item in over {
        match base.iter_mut().find(|b| key(b) == key(item)) {
            Some(existing) => *existing = item.clone(),
            None => base.push(item.clone()),
        }
    }
    base
}

/// A small resolved VM for unit tests: `edit` adjusts its configuration, the hash follows.
#[cfg(any(test, feature = "test-support"))]
pub fn example_vm(name: &str, edit: impl FnOnce(&mut VmConfig)) -> DesiredVm {
    let mut config = VmConfig {
        provider: "local".into(),
        domain_type: DomainType::Qemu,
        image: ResolvedImage {
            name: "micro".into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            disk: None,
            template: None,
            disk_sha256: None,
            boot_sha256: None,
        },
        loadout: None,
        pool: None,
        node: None,
        cpus: 1,
        memory_mib: 128,
        disk_mib: None,
        network: NetworkMode::Isolated,
        packages: vec![],
        files: vec![],
        runcmd: vec![],
        users: vec![],
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        protect: false,
        fresh: false,
        reset: false,
        workspaces: vec![],
        snapshots: None,
    };
    edit(&mut config);
    DesiredVm {
        name: name.into(),
        state: PowerState::Running,
        secrets: Vec::new(),
        spec_hash: config.hash(),
        config,
        source: String::new(),
    }
}

#[cfg(any(test, feature = "test-support"))]
pub mod tests_support {
    use super::*;
    use crate::snapshot::{Snapshot, SourceFile};

    /// A fleet with one VM, one Secret `s` (key `k` holding `armored`) and a task `t` that
    /// takes it as `$TOKEN`.
    pub fn desired_with_task_secret(armored: String) -> Desired {
        let indented: String = armored.lines().map(|l| format!("      {l}\n")).collect();
        let files = [
            ("fleet/fleet.yaml", "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: [{name: local, type: libvirt}]\n  images: [{name: micro, kernel: k, initrd: i}]\n".to_owned()),
            ("fleet/vms/a.yaml", "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: micro}\n".to_owned()),
            ("fleet/tasks/t.yaml", "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: t}\nspec:\n  vm: a\n  command: [env]\n  secrets: [{secret: s, key: k, env: TOKEN}]\n".to_owned()),
            ("fleet/secrets/s.yaml", format!("apiVersion: fleet/v1\nkind: Secret\nmetadata: {{name: s}}\nspec:\n  allowed: {{tasks: [t]}}\n  data:\n    k: |\n{indented}")),
        ];
        let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        desired_of(&files)
    }

    /// `files` (paths under `fleet/`, with `fleet.yaml`) loaded under `test_host` and
    /// resolved.
    pub fn desired_of(files: &[(&str, &str)]) -> Desired {
        desired_under(&test_host(), files)
    }

    /// `files` loaded under `host` and resolved.
    pub fn desired_under(host: &HostSpec, files: &[(&str, &str)]) -> Desired {
        let snapshot = Snapshot {
            revision: Revision {
                id: "0".repeat(40),
                label: "t".into(),
                signed_by: None,
            },
            fleet_dir: "fleet".into(),
            files: files
                .iter()
                .map(|(p, t)| SourceFile {
                    path: (*p).into(),
                    bytes: t.as_bytes().to_vec(),
                })
                .collect(),
            signers: Default::default(),
        };
        let loaded = crate::load::load(&snapshot, Some(host)).unwrap_or_else(|d| panic!("{d:#?}"));
        resolve(&loaded, host)
    }

    /// A host with one libvirt provider `local` on libvirt's test driver.
    pub fn test_host() -> HostSpec {
        crate::load::load_host(
            "host.yaml",
            b"apiVersion: fleet/v1\nkind: Host\nspec:\n  providers: [{name: local, type: libvirt, uri: 'test:///default'}]\n",
        )
        .unwrap_or_else(|d| panic!("{d:#?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Network;

    #[test]
    fn network_full_or_a_snapshot_policy_on_a_remote_libvirt_host_is_refused_before_apply() {
        let host = crate::load::load_host(
            "host.yaml",
            b"apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {name: local, type: libvirt, uri: 'qemu:///system'}\n    - {name: far, type: libvirt, uri: 'qemu+ssh://fleet@far/system'}\n",
        )
        .unwrap_or_else(|d| panic!("{d:#?}"));
        let fleet = "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: [{name: local, type: libvirt}, {name: far, type: libvirt}]\n  images: [{name: micro, kernel: k, initrd: i}]\n";
        let vm = |name: &str, provider: &str, network: &str| {
            format!(
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: {provider}, image: micro, network: {{mode: {network}}}}}\n"
            )
        };
        let (here, there, quiet) = (
            vm("here", "local", "full"),
            vm("there", "far", "full"),
            vm("quiet", "far", "brokered"),
        );
        let workspace = |name: &str, provider: &str| {
            format!(
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {{name: {name}}}\nspec: {{provider: {provider}, size: 64Mi}}\n"
            )
        };
        let keeper = |name: &str, provider: &str, ws: &str| {
            format!(
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: {provider}, image: micro, workspaces: [{{name: {ws}, mountPath: /workspace}}], snapshots: {{before: [replace], keep: 2}}}}\n"
            )
        };
        let desired = tests_support::desired_under(
            &host,
            &[
                ("fleet/fleet.yaml", fleet),
                ("fleet/vms/here.yaml", &here),
                ("fleet/vms/there.yaml", &there),
                ("fleet/vms/quiet.yaml", &quiet),
                ("fleet/workspaces/near.yaml", &workspace("near", "local")),
                ("fleet/workspaces/away.yaml", &workspace("away", "far")),
                ("fleet/vms/kept.yaml", &keeper("kept", "local", "near")),
                ("fleet/vms/lost.yaml", &keeper("lost", "far", "away")),
            ],
        );
        let diags = check_remote_providers(&desired, &host);
        let said: Vec<String> = diags.iter().map(ToString::to_string).collect();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(
            said[0].starts_with("fleet/vms/lost.yaml:1:1: error: VM lost: a snapshots: policy")
                && said[0].contains("provider far is reached at qemu+ssh://fleet@far/system"),
            "{said:#?}"
        );
        assert!(
            said[1].starts_with("fleet/vms/there.yaml:1:1: error: VM there: network: full")
                && said[1].contains("provider far is reached at qemu+ssh://fleet@far/system"),
            "{said:#?}"
        );
    }

    #[test]
    fn each_agent_runs_without_asking_and_its_prompt_is_never_a_flag() {
        let run = |kind, model: Option<&str>| {
            agent_command(&AgentSpec {
                kind,
                prompt: "--fix the tests".into(),
                model: model.map(str::to_owned),
                interactive: false,
            })
            .join(" ")
        };
        assert_eq!(
            run(AgentKind::Claude, Some("sonnet")),
            "claude --print --dangerously-skip-permissions --output-format stream-json --verbose --no-session-persistence --model sonnet -- --fix the tests"
        );
        assert_eq!(
            run(AgentKind::Codex, None),
            "codex exec --dangerously-bypass-approvals-and-sandbox --skip-git-repo-check -- --fix the tests"
        );
        assert_eq!(
            run(AgentKind::Gemini, Some("gemini-2.5-pro")),
            "gemini --yolo --model gemini-2.5-pro --prompt --fix the tests"
        );
        assert_eq!(
            run(AgentKind::Aider, None),
            "aider --yes-always --message --fix the tests"
        );
    }

    #[test]
    fn an_interactive_agent_runs_its_own_interface_on_the_prompt() {
        let argv = |kind| {
            agent_command(&AgentSpec {
                kind,
                prompt: "--fix the tests".into(),
                model: Some("m".into()),
                interactive: true,
            })
        };
        // Claude Code's first-start questions are answered in the run's HOME first; the
        // command itself follows the script as its arguments, never inside it.
        let claude = argv(AgentKind::Claude);
        assert_eq!(claude[..2], ["sh", "-c"]);
        assert!(
            claude[2].contains("\"hasCompletedOnboarding\":true"),
            "{}",
            claude[2]
        );
        assert!(claude[2].contains("\"approved\":[\"brokered-placeholder\"]"));
        assert!(claude[2].ends_with("exec \"$@\""));
        assert_eq!(
            claude[3..],
            [
                "sh",
                "claude",
                "--permission-mode",
                "default",
                "--model",
                "m",
                "--",
                "--fix the tests"
            ]
        );
        assert_eq!(
            argv(AgentKind::Codex).join(" "),
            "codex --model m -- --fix the tests"
        );
        assert_eq!(
            argv(AgentKind::Gemini).join(" "),
            "gemini --model m --prompt-interactive=--fix the tests"
        );
    }

    fn loadout(extends: &[&str], packages: &[&str], memory: Option<&str>) -> LoadoutSpec {
        LoadoutSpec {
            extends: extends
                .iter()
                .map(|e| crate::spec::Name((*e).into()))
                .collect(),
            resources: memory.map(|m| Resources {
                memory: Some(m.parse().expect("a size")),
                ..Resources::default()
            }),
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            ..LoadoutSpec::default()
        }
    }

    #[test]
    fn a_tasks_egress_is_not_part_of_its_run() {
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "vm": "box",
            "command": ["true"],
        }))
        .expect("a task");
        let narrowed = TaskSpec {
            egress: Some(crate::spec::TaskEgress {
                allow: vec![crate::spec::EgressAllow {
                    host: "api.example.com".into(),
                    ports: Vec::new(),
                    paths: Vec::new(),
                }],
                budget: None,
            }),
            ..spec.clone()
        };
        let (plain, narrowed) = (
            resolve_task("t", &spec, None, "fleet/tasks/t.yaml"),
            resolve_task("t", &narrowed, None, "fleet/tasks/t.yaml"),
        );
        assert_eq!(
            plain.spec_hash, narrowed.spec_hash,
            "no new run for new rules"
        );
        let rules = narrowed.egress.expect("narrowed").rules;
        assert_eq!(rules[0].source, "task t egress.allow[0]");
    }

    #[test]
    fn merge_is_last_wins_for_scalars_and_union_for_lists() {
        let base = LoadoutSpec {
            network: Some(Network {
                mode: NetworkMode::Full,
            }),
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "1".into())]),
            ..loadout(&[], &["git", "curl"], Some("1Gi"))
        };
        let over = LoadoutSpec {
            env: BTreeMap::from([("B".into(), "2".into())]),
            ..loadout(&[], &["curl", "ripgrep"], Some("2Gi"))
        };
        let m = merge(base, &over);
        assert_eq!(m.packages, ["git", "curl", "ripgrep"]);
        assert_eq!(
            m.resources
                .and_then(|r| r.memory)
                .map(|s| s.as_str().to_owned()),
            Some("2Gi".into())
        );
        assert_eq!(m.network.map(|n| n.mode), Some(NetworkMode::Full));
        assert_eq!(
            m.env,
            BTreeMap::from([("A".into(), "1".into()), ("B".into(), "2".into())])
        );
    }

    #[test]
    fn users_merge_by_name_in_place() {
        let user = |name: &str, shell: &str| GuestUser {
            name: name.into(),
            groups: vec![],
            shell: Some(shell.into()),
            sudo: None,
            ssh_authorized_keys: vec![],
        };
        let base = LoadoutSpec {
            users: vec![user("agent", "/bin/sh"), user("ops", "/bin/sh")],
            ..LoadoutSpec::default()
        };
        let over = LoadoutSpec {
            users: vec![user("agent", "/bin/bash"), user("extra", "/bin/sh")],
            ..LoadoutSpec::default()
        };
        let m = merge(base, &over);
        let got: Vec<(&str, Option<&str>)> = m
            .users
            .iter()
            .map(|u| (u.name.as_str(), u.shell.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("agent", Some("/bin/bash")),
                ("ops", Some("/bin/sh")),
                ("extra", Some("/bin/sh"))
            ]
        );
    }
}
