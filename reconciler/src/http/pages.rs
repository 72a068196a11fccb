//! Server-rendered HTML for the status page (maud escapes every value). No scripts: the
//! page refreshes itself with a meta tag and reads well on a phone.

use std::collections::BTreeMap;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::status::tasks::{PromptRecord, PromptState, TaskRecord};
use crate::status::{StatusDir, Summary, VmStatus};

/// How much of a task's output its page shows.
pub const OUTPUT_TAIL_BYTES: u64 = 64 * 1024;

/// Everything a page shows, read from the status directory at request time.
pub struct Snapshot {
    pub summary: Option<Summary>,
    pub vms: BTreeMap<String, VmStatus>,
    pub plan_text: Option<String>,
    pub plan_json: Option<serde_json::Value>,
    pub tasks: BTreeMap<String, TaskRecord>,
    pub prompts: BTreeMap<String, PromptRecord>,
    /// Held plan steps waiting for an approval.
    pub approvals: Vec<crate::approvals::ApprovalRecord>,
}

impl Snapshot {
    /// Nothing to show (a read that could not run).
    pub fn empty() -> Snapshot {
        Snapshot {
            summary: None,
            vms: BTreeMap::new(),
            plan_text: None,
            plan_json: None,
            tasks: BTreeMap::new(),
            prompts: BTreeMap::new(),
            approvals: Vec::new(),
        }
    }

    pub fn read(status: &StatusDir) -> Snapshot {
        let (plan_text, plan_json) = status.read_plan_files();
        Snapshot {
            summary: status.read_summary(),
            vms: status.read_vms(),
            plan_text,
            plan_json: plan_json.and_then(|b| serde_json::from_slice(&b).ok()),
            tasks: status.read_task_records(),
            prompts: status.read_prompts(),
            approvals: crate::approvals::read_all(status)
                .into_iter()
                .filter(|a| a.state == crate::approvals::ApprovalState::Pending)
                .collect(),
        }
    }

    /// The last plan's warnings (a provider that skips TLS verification).
    fn warnings(&self) -> Vec<&str> {
        self.plan_json
            .as_ref()
            .and_then(|p| p.get("warnings"))
            .and_then(|w| w.as_array())
            .map(|w| w.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default()
    }

    pub fn pending_prompts(&self) -> impl Iterator<Item = &PromptRecord> {
        self.prompts
            .values()
            .filter(|p| p.state == PromptState::Pending)
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:0.8rem;line-height:1.4;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:0.92rem}td,th{text-align:left;padding:0.3rem 0.4rem;border-bottom:1px solid #eee;vertical-align:top}
.scroll{overflow-x:auto}pre{background:#f6f6f6;padding:0.6rem;overflow-x:auto;font-size:0.8rem}
.Running{color:#17692e}.Failed{color:#b00020}.Pending,.Stopped{color:#8a6d00}.Unknown{color:#666}.bad{color:#b00020}.muted{color:#666}
dl{display:grid;grid-template-columns:max-content 1fr;gap:0.2rem 0.8rem}dt{font-weight:600}";

fn page(title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content="5";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
    .into_string()
}

pub fn overview(s: &Snapshot) -> String {
    let fleet = s
        .summary
        .as_ref()
        .map(|x| x.fleet.as_str())
        .unwrap_or("fleet");
    let body = html! {
        h1 { "fleet " (fleet) }
        @for w in s.warnings() {
            p.bad { strong { "Warning: " } (w) }
        }
        dl {
            dt { "Revision applied" }
            dd { (s.summary.as_ref().and_then(|x| x.revision_applied.as_ref()).map(|r| r.label.as_str()).unwrap_or("none yet")) }
            @if let Some(why) = s.summary.as_ref().and_then(|x| x.suspended.as_ref()) {
                dt.bad { "Suspended" }
                dd { span.bad { "nothing is applied: " } (why) }
            }
            @if let Some(source) = s.summary.as_ref().and_then(|x| x.source.as_ref()) {
                dt { "Source" }
                dd {
                    (source.url) " " (source.branch)
                    @if let Some(tip) = &source.tip { " at " (&tip[..tip.len().min(12)]) }
                    ", fetched " (crate::time::shown(source.fetched))
                    @if let Some(error) = &source.error { br; span.bad { "fetch failing: " (error) } }
                }
            }
            @if let Some(refused) = s.summary.as_ref().and_then(|x| x.revision_refused.as_ref()) {
                dt.bad { "Revision refused" }
                dd {
                    span.bad { (refused.revision.label) } " at " (crate::time::shown(refused.at))
                    pre { @for d in &refused.diagnostics { (d) "\n" } }
                }
            }
            @if let Some(r) = s.summary.as_ref().and_then(|x| x.last_reconcile.as_ref()) {
                dt { "Last reconcile" }
                dd { (crate::time::shown(r.finished)) ": " (r.outcome) " (" (r.steps) " steps, " (r.failed) " failed, " (r.conflicts) " conflicts)" }
            }
        }
        h2 { "VMs (" (s.vms.len()) ")" }
        div.scroll {
            table {
                thead { tr { th { "Name" } th { "Phase" } th { "Provider" } th { "CPUs" } th { "Memory" } th { "Agent" } th { "Addresses" } th { "Conditions" } } }
                tbody {
                    @for vm in s.vms.values() {
                        tr {
                            td { a href={ "/vms/" (vm.name) } { (vm.name) } }
                            td class=(format!("{:?}", vm.phase)) { (format!("{:?}", vm.phase)) }
                            td { (vm.provider) }
                            td { (vm.observed.as_ref().map(|o| o.cpus.to_string()).unwrap_or_else(|| "-".into())) }
                            td { (vm.observed.as_ref().map(|o| format!("{} MiB", o.memory_mib)).unwrap_or_else(|| "-".into())) }
                            td { (agent_text(vm)) }
                            td { (reachable_addresses(vm)) }
                            td { (conditions_text(vm)) }
                        }
                    }
                }
            }
        }
        @for a in &s.approvals {
            h2.bad { "Held for approval: " code { (a.id) } }
            ul { @for step in &a.steps { li { (step) } } }
            p.muted {
                "Approve with a committed fleet/hitl/" (a.id) ".yaml (kind: Answer, spec.approve: \"" (a.plan_digest)
                "\") or, on the host, fleet hitl answer " (a.id) " " (a.plan_digest) "."
            }
        }
        @let pending: Vec<&PromptRecord> = s.pending_prompts().collect();
        @if !pending.is_empty() {
            h2.bad { "Waiting for a human (" (pending.len()) ")" }
            div.scroll {
                table {
                    thead { tr { th { "Prompt" } th { "Task" } th { "Question" } th { "Deadline" } } }
                    tbody {
                        @for p in &pending {
                            tr {
                                td { code { (p.id) } }
                                td { a href={ "/tasks/" (p.task) } { (p.task) } " on " (p.vm) }
                                td { (p.text) }
                                td { (p.deadline) @if p.overdue { " " span.bad { "overdue" } } }
                            }
                        }
                    }
                }
            }
            p.muted { "Answer with a committed fleet/hitl/ID.yaml (kind: Answer) or, on the host, fleet hitl answer ID TEXT." }
        }
        @if !s.tasks.is_empty() {
            h2 { "Tasks (" (s.tasks.len()) ")" }
            div.scroll {
                table {
                    thead { tr { th { "Name" } th { "Phase" } th { "VM" } th { "Exit" } th { "Detail" } } }
                    tbody {
                        @for t in s.tasks.values() {
                            tr {
                                td { a href={ "/tasks/" (t.name) } { (t.name) } }
                                td class=(t.phase.as_str()) { (t.phase.as_str()) }
                                td { (t.vm) }
                                td { (t.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into())) }
                                td.muted { (t.message.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Latest plan" }
        pre { (s.plan_text.as_deref().unwrap_or("no plan yet")) }
    };
    page(&format!("fleet {fleet}"), body)
}

pub fn vm(s: &Snapshot, vm: &VmStatus) -> String {
    let body = html! {
        p { a href="/" { "← fleet" } }
        h1 { (vm.name) " " span class=(format!("{:?}", vm.phase)) { (format!("{:?}", vm.phase)) } }
        dl {
            dt { "Provider" } dd { (vm.provider) }
            dt { "Desired state" } dd { (vm.desired_state.as_str()) }
            dt { "Spec hash" } dd { code { (vm.spec_hash) } }
            dt { "Applied revision" } dd { (vm.applied_revision.as_deref().unwrap_or("-")) }
            dt { "Defined in" } dd { (vm.source) }
            @if let Some(o) = &vm.observed {
                dt { "Observed" } dd { (if o.running { "running" } else { "stopped" }) ", " (o.cpus) " vCPUs, " (o.memory_mib) " MiB, UUID " (o.uuid) }
            }
            @if let Some(a) = &vm.agent {
                dt { "Agent" } dd { (agent_text(vm)) ", boot " (a.boot_id) ", hello at " (crate::time::shown(a.since)) }
                @if !a.interfaces.is_empty() {
                    dt { "Addresses" } dd { (addresses_text(a)) }
                }
            }
            @if let Some(l) = &vm.lease {
                dt { "Lease" } dd { (l.describe(std::time::SystemTime::now())) "; began " (l.started) ", ends " (l.ends) }
            }
            @if let Some(e) = &vm.last_error { dt.bad { "Last error" } dd.bad { (e) } }
            dt { "Updated" } dd { (crate::time::shown(vm.updated)) }
        }
        h2 { "Conditions" }
        ul { @for c in &vm.conditions { li { b { (c.kind) } " " (c.status) " (" (c.reason) "): " (c.message) } } }
        @if let Some(step) = s.plan_json.as_ref().and_then(|p| p["steps"].as_array()).and_then(|steps| steps.iter().find(|st| st["vm"] == vm.name.as_str())) {
            h2 { "In the latest plan" }
            pre { (serde_json::to_string_pretty(step).unwrap_or_default()) }
        }
    };
    page(&format!("{} · fleet", vm.name), body)
}

pub fn task(s: &Snapshot, t: &TaskRecord, output: Option<&str>) -> String {
    let prompts: Vec<&PromptRecord> = s.prompts.values().filter(|p| p.task == t.name).collect();
    let body = html! {
        p { a href="/" { "← fleet" } }
        h1 { (t.name) " " span class=(t.phase.as_str()) { (t.phase.as_str()) } }
        dl {
            dt { "VM" } dd { a href={ "/vms/" (t.vm) } { (t.vm) } }
            dt { "Run" } dd { code { (t.run) } " (generation " (t.generation) ", rerun " (t.rerun) ")" }
            @if let Some(m) = &t.message { dt { "Detail" } dd { (m) } }
            @if let Some(c) = t.exit_code { dt { "Exit code" } dd { (c) } }
            dt { "Defined in" } dd { (t.source) }
            @if let Some(r) = &t.repository { dt { "Repository" } dd { (r.url) " at " code { (r.commit) } } }
            dt { "Created" } dd { (crate::time::shown(t.created)) }
            @if let Some(x) = &t.started { dt { "Started" } dd { (x) } }
            @if let Some(x) = &t.finished { dt { "Finished" } dd { (x) } }
            @if !t.artifacts.is_empty() { dt { "Artifacts" } dd { @for a in &t.artifacts { code { (a) } " " } } }
            @if let Some(e) = &t.egress { dt { "Egress" } dd { (egress_text(e)) } }
            @if let Some(c) = &t.results { dt { "Changes" } dd { (changes_text(c)) } }
        }
        @if !prompts.is_empty() {
            h2 { "Prompts" }
            ul {
                @for p in &prompts {
                    li {
                        code { (p.id) } " " b { (format!("{:?}", p.state).to_lowercase()) } ": " (p.text)
                        @if let Some(by) = &p.answered_by { span.muted { " — answered by " (by) } }
                    }
                }
            }
        }
        h2 { "Output (last " (OUTPUT_TAIL_BYTES / 1024) " KiB)" }
        pre { (output.map(crate::terminal::strip_codes).unwrap_or_else(|| "no output yet".into())) }
    };
    page(&format!("{} · fleet", t.name), body)
}

/// What a run changed in its checkout, in one line: "2 commits, 3 files changed, +10 -2,
/// head 1a2b3c4d5e6f; pushed to URL BRANCH" (the patch is `changes.patch` in the task's
/// status directory).
fn changes_text(c: &crate::status::tasks::RunChanges) -> String {
    if let Some(why) = &c.refused {
        return format!("refused: {why}");
    }
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut text = format!(
        "{}, {}, +{} -{}",
        plural(c.commits, "commit", "commits"),
        plural(c.files_changed, "file changed", "files changed"),
        c.insertions,
        c.deletions
    );
    if let Some(head) = &c.head {
        text += &format!(", head {}", &head[..head.len().min(12)]);
    }
    if let Some(to) = &c.pushed {
        text += &format!("; pushed to {to}");
    } else if let Some(e) = &c.push_error {
        text += &format!("; {e}");
    }
    text
}

/// A run's brokered egress in one line: "12 connections (1 refused), 3.1 KiB up, 2.0 MiB
/// down, 1200 tokens in, 300 out".
fn egress_text(e: &crate::status::tasks::EgressUse) -> String {
    let size = |bytes: u64| {
        let mut value = bytes as f64;
        for unit in ["B", "KiB", "MiB", "GiB"] {
            if value < 1024.0 || unit == "GiB" {
                return if unit == "B" {
                    format!("{bytes} B")
                } else {
                    format!("{value:.1} {unit}")
                };
            }
            value /= 1024.0;
        }
        unreachable!("the loop returns at GiB")
    };
    let mut text = format!(
        "{} connections ({} refused), {} up, {} down",
        e.connections,
        e.refused,
        size(e.bytes_up),
        size(e.bytes_down)
    );
    if e.tokens_in + e.tokens_out > 0 {
        text += &format!(", {} tokens in, {} out", e.tokens_in, e.tokens_out);
    }
    if let Some(id) = &e.budget_prompt {
        text += &format!("; budget spent, prompt {id} waits");
    } else if e.budget_refused {
        text += "; budget spent, more was declined";
    }
    text
}

/// The addresses an operator can reach the guest at, or `-`.
fn reachable_addresses(vm: &VmStatus) -> String {
    let addresses = vm.reachable_addresses();
    if addresses.is_empty() {
        "-".to_owned()
    } else {
        addresses.join(", ")
    }
}

/// The guest's addresses by interface: `eth0 192.168.150.23/24 (52:54:00:…)`.
fn addresses_text(agent: &crate::status::AgentStatus) -> String {
    agent
        .interfaces
        .iter()
        .map(|i| {
            let mac = i
                .mac
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            match i.addresses.is_empty() {
                true => format!("{}: no address{mac}", i.name),
                false => format!("{} {}{mac}", i.name, i.addresses.join(", ")),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn agent_text(vm: &VmStatus) -> String {
    match &vm.agent {
        Some(a) if a.connected => format!("fleet-agent {}", a.agent_version),
        Some(_) => "link lost".to_owned(),
        None => "-".to_owned(),
    }
}

fn conditions_text(vm: &VmStatus) -> String {
    let mut parts: Vec<String> = vm
        .conditions
        .iter()
        .map(|c| format!("{}={} ({})", c.kind, c.status, c.reason))
        .collect();
    if let Some(lease) = &vm.lease {
        parts.push(lease.describe(std::time::SystemTime::now()));
    }
    if let Some(e) = &vm.last_error {
        parts.push(format!("error: {e}"));
    }
    parts.join("; ")
}
