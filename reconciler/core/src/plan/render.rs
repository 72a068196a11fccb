//! One `Plan`, two printers: `text` for people (a line per step with its reason, then a
//! unified diff of each changed VM's resolved configuration) and `json` for machines.
//! Pure functions of the plan.

use std::fmt::Write;

use serde_json::Value;

use super::{Action, Change, Plan, Reason, Step};
use crate::resolve::VmConfig;
use crate::spec::SnapshotBefore;

/// The human form.
pub fn text(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet {} at {} ({})",
        plan.fleet,
        plan.revision.label,
        short_id(&plan.revision.id)
    );
    for w in &plan.warnings {
        let _ = writeln!(out, "WARNING: {w}");
    }
    if !plan.has_changes() && plan.deferred.is_empty() {
        let _ = writeln!(out, "No changes: every VM matches its spec.");
    } else if plan.steps.is_empty() && plan.held.is_empty() {
        let _ = writeln!(out, "Plan: nothing runs in this pass; every step waits.");
    } else if plan.steps.is_empty() {
        let _ = writeln!(out, "Plan: nothing runs without an approval.");
    } else {
        let counts = step_counts(plan);
        let _ = writeln!(out, "Plan: {}.", counts.join(", "));
        let _ = writeln!(out);
        let width = plan.steps.iter().map(|s| s.vm.len()).max().unwrap_or(0);
        for step in &plan.steps {
            step_line(&mut out, step, width, &reason_text(step));
        }
    }
    if let (Some(id), Some(digest)) = (plan.approval_id(), &plan.approval_digest) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Held for approval ({id}; approve with fleet/hitl/{id}.yaml, spec.approve: \"{digest}\"):"
        );
        for held in &plan.held {
            step_line(&mut out, &held.step, 0, &held.why.join("; "));
        }
    }
    if let (Some(id), Some(approved)) = (plan.approval_id(), &plan.approved) {
        let _ = writeln!(out);
        let _ = writeln!(out, "Approved ({id}; its steps are in the plan above):");
        for line in &approved.steps {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !plan.deferred.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Deferred (planned again when the wait is over):");
        for d in &plan.deferred {
            step_line(&mut out, &d.step, 0, &d.why);
        }
    }
    if !plan.leases_ended.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Leases ended (renew with a change of lease.renewals, or fleet lease renew VM):"
        );
        for l in &plan.leases_ended {
            let what = match l.on_expiry {
                super::LeaseExpiry::Stop => "kept stopped",
                super::LeaseExpiry::Destroy => "destroyed, not made again",
            };
            let _ = writeln!(
                out,
                "  x   {} on {}: ended at {}; {what} until renewed",
                l.vm, l.provider, l.ended
            );
        }
    }
    if !plan.idle.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Idle (kept stopped until a task run is due on them):");
        for i in &plan.idle {
            let since = i
                .since
                .map_or("with no task run or start seen".to_owned(), |t| {
                    format!("since {t}")
                });
            let _ = writeln!(out, "  z   {} on {}: idle {since}", i.vm, i.provider);
        }
    }
    if !plan.conflicts.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Conflicts (fleet does not touch these VMs):");
        for c in &plan.conflicts {
            let _ = writeln!(out, "  !   {} on {}: {}", c.vm, c.provider, c.message);
        }
    }
    if !plan.drift.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Drift (reality differs from the applied spec):");
        for d in &plan.drift {
            let fix = if d.healed {
                "healed by this plan"
            } else {
                "reported only (policy.selfHeal: false)"
            };
            let _ = writeln!(out, "  ~   {} on {}: {}; {fix}", d.vm, d.provider, d.what);
        }
    }
    if !plan.errors.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Errors:");
        for e in &plan.errors {
            let _ = writeln!(out, "  !   {e}");
        }
    }
    if !plan.secrets.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Secrets (compared by keyed fingerprint; values are never shown):"
        );
        for change in &plan.secrets {
            let _ = writeln!(out, "{}", super::secrets::line(change));
        }
    }
    let diffs: Vec<String> = plan.steps.iter().filter_map(step_diff).collect();
    if !diffs.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Resolved spec changes:");
        for d in diffs {
            out.push_str(&d);
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Plan digest: {}", plan.digest);
    out
}

/// The machine form (`super::FORMAT_VERSION`).
pub fn json(plan: &Plan) -> String {
    serde_json::to_string_pretty(plan).expect("Plan serialises to JSON") + "\n"
}

/// "2 to create, 1 to destroy": how many steps of each kind the plan runs.
fn step_counts(plan: &Plan) -> Vec<String> {
    [
        Action::Create,
        Action::Start,
        Action::Stop,
        Action::Update,
        Action::Replace,
        Action::Destroy,
        Action::Reset,
        Action::Revert,
        Action::DestroyWorkspace,
    ]
    .into_iter()
    .filter_map(|a| {
        let n = plan.count(a);
        (n > 0).then(|| format!("{n} to {}", a.as_str()))
    })
    .collect()
}

/// One step as a line: symbol, action, VM (padded to `width`), provider, and why.
fn step_line(out: &mut String, step: &Step, width: usize, why: &str) {
    let _ = writeln!(
        out,
        "  {:<3} {:<8} {:<width$}  on {}: {why}",
        symbol(step.action()),
        step.action().as_str(),
        step.vm,
        step.provider,
    );
}

fn symbol(action: Action) -> &'static str {
    match action {
        Action::Create => "+",
        Action::Start => ">",
        Action::Stop => ".",
        Action::Update => "~",
        Action::Replace => "-/+",
        Action::Destroy => "-",
        Action::Reset => "*",
        Action::Revert => "<",
        Action::DestroyWorkspace => "-",
    }
}

fn short_id(id: &str) -> &str {
    &id[..id
        .len()
        .min(if id.starts_with("worktree:") { 21 } else { 12 })]
}

/// The reason in words.
pub fn reason_text(step: &Step) -> String {
    let why = why_text(step);
    // The VM's `snapshots:` policy acts first: say so where the step is shown.
    let before = match &step.change {
        Change::Replace { desired, .. } => Some((desired, SnapshotBefore::Replace)),
        Change::Reset { desired } => Some((desired, SnapshotBefore::Reset)),
        _ => None,
    };
    match before.and_then(|(vm, before)| Some((vm, vm.config.snapshot_before(before)?))) {
        Some((vm, keep)) => {
            let names: Vec<&str> = vm
                .config
                .workspaces
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            format!(
                "{why}; snapshots workspace(s) {} first (keeps {keep})",
                names.join(", ")
            )
        }
        None => why,
    }
}

fn why_text(step: &Step) -> String {
    match &step.reason {
        Reason::NotFound => "not found on the provider".to_owned(),
        Reason::PowerState { want } => format!("spec wants it {}", want.as_str()),
        Reason::SpecChanged { .. } => {
            let changes = step
                .changes()
                .iter()
                .map(|c| {
                    format!(
                        "{} {} → {}",
                        c.field,
                        value_text(&c.from),
                        value_text(&c.to)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            if step.restart() {
                format!("{changes} (restarts the running VM)")
            } else {
                changes
            }
        }
        Reason::ReplaceForced { field, why } => {
            format!("{field} changed, which forces replacement ({why})")
        }
        Reason::AdoptedChanged { fields } => {
            let changed = if fields.is_empty() {
                "its spec".to_owned()
            } else {
                fields
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "{changed} changed on an adopted VM: fleet did not make its disks, so it is made again from its image (the old disk stays on the host)"
            )
        }
        Reason::CreateUnfinished => {
            "an earlier create stopped before configuring it; finishing it".to_owned()
        }
        Reason::StampUnreadable => {
            "its ownership stamp has no readable configuration; rewriting it".to_owned()
        }
        Reason::Drifted { what } => format!("drift: {what}"),
        Reason::FreshMember { pool } => {
            format!("a fresh member of pool {pool}, for a task run or kept warm for one")
        }
        Reason::FreshMemberReleased { pool } => {
            format!("a fresh member of pool {pool} that no task run holds any longer")
        }
        Reason::Idle { since: Some(since) } => format!("idle since {since}"),
        Reason::Idle { since: None } => "idle: no task run or start seen".to_owned(),
        Reason::Woken { task } => format!("task {task} has a run due on it"),
        Reason::ResetBeforeRun { task } => format!(
            "a run of task {task} waits, and the VM ran something since it was made or last reset (reset: beforeEachTask)"
        ),
        Reason::RevertAsked { snapshot, by } => {
            format!("back to its snapshot {snapshot}, as {by} asked (fleet snapshot revert)")
        }
        Reason::LeaseEnded { ended, on_expiry } => {
            format!(
                "its lease ended at {ended} (onExpiry: {})",
                on_expiry.as_str()
            )
        }
        Reason::RemovedFromFleet => match &step.applied_revision() {
            Some(rev) => format!("removed from fleet/ (last applied at {})", short_id(rev)),
            None => "removed from fleet/".to_owned(),
        },
    }
}

fn value_text(v: &Value) -> String {
    let s = match v {
        Value::Null => "(unset)".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 40 {
        s.chars().take(40).collect::<String>() + "…"
    } else {
        s
    }
}

fn config_yaml(config: Option<&VmConfig>) -> String {
    match config {
        None => String::new(),
        Some(c) => {
            serde_saphyr::to_string(c).unwrap_or_else(|e| format!("# could not render: {e}\n"))
        }
    }
}

fn step_diff(step: &Step) -> Option<String> {
    if matches!(
        step.action(),
        Action::Start | Action::Stop | Action::Reset | Action::Revert
    ) {
        return None;
    }
    let (old, new) = (step.applied(), step.desired().map(|d| &d.config));
    let (old, new) = (config_yaml(old), config_yaml(new));
    if old == new {
        return None;
    }
    let diff = similar::TextDiff::from_lines(&old, &new);
    let rendered = diff
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("{} (applied)", step.vm),
            &format!("{} (desired)", step.vm),
        )
        .to_string();
    Some(rendered)
}

/// The pull-request form: a Markdown comment (summary, steps with reasons, what waits for
/// approval and why, the task runs a merge starts, warnings, and each VM's resolved change
/// folded away). Everything a revision wrote is escaped, so a committed name or value
/// cannot add links, images, mentions or HTML to the comment.
pub fn markdown(plan: &Plan, runs: &[super::task_runs::TaskRun]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### fleet plan: {} at `{}`\n",
        md(&plan.fleet),
        short_id(&plan.revision.id)
    );
    let counts = step_counts(plan);
    let mut summary = if counts.is_empty() {
        vec!["no VM changes".to_owned()]
    } else {
        vec![counts.join(", ")]
    };
    if !plan.held.is_empty() {
        summary.push(format!("{} held for approval", plan.held.len()));
    }
    let starting = runs
        .iter()
        .filter(|r| r.change != super::task_runs::RunChange::Cancel)
        .count();
    if starting > 0 {
        summary.push(format!("{starting} task run(s) to start"));
    }
    if !plan.drift.is_empty() {
        summary.push(format!("{} drifted", plan.drift.len()));
    }
    let _ = writeln!(out, "**{}**\n", summary.join(" · "));
    for w in &plan.warnings {
        let _ = writeln!(out, "> [!WARNING]\n> {}\n", md(w));
    }
    for e in &plan.errors {
        let _ = writeln!(out, "> [!CAUTION]\n> {}\n", md(e));
    }
    let table = |out: &mut String, rows: Vec<(&Step, String)>| {
        let _ = writeln!(
            out,
            "| | action | VM | provider | why |\n|---|---|---|---|---|"
        );
        for (step, why) in rows {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                symbol(step.action()),
                step.action().as_str(),
                md(&step.vm),
                md(&step.provider),
                md(&why)
            );
        }
        out.push('\n');
    };
    if !plan.steps.is_empty() {
        table(
            &mut out,
            plan.steps.iter().map(|s| (s, reason_text(s))).collect(),
        );
    }
    if let (Some(id), Some(digest)) = (plan.approval_id(), &plan.approval_digest) {
        let _ = writeln!(
            out,
            "#### Held for approval\n\nApprove by committing `fleet/hitl/{id}.yaml` with `spec.approve: \"{digest}\"` (or `fleet hitl answer {id} {digest}` on the host).\n"
        );
        table(
            &mut out,
            plan.held
                .iter()
                .map(|h| (&h.step, h.why.join("; ")))
                .collect(),
        );
    }
    if !plan.deferred.is_empty() {
        let _ = writeln!(out, "#### Deferred\n");
        table(
            &mut out,
            plan.deferred
                .iter()
                .map(|d| (&d.step, d.why.clone()))
                .collect(),
        );
    }
    if !runs.is_empty() {
        let _ = writeln!(out, "#### Task runs\n");
        for run in runs {
            let verb = match run.change {
                super::task_runs::RunChange::Start => "start",
                super::task_runs::RunChange::RunAgain => "run again",
                super::task_runs::RunChange::Restart => "restart",
                super::task_runs::RunChange::Cancel => "cancel",
            };
            let _ = write!(
                out,
                "- `{}` {verb} task **{}** on {} **{}**",
                run.change.symbol(),
                md(&run.task),
                if run.fresh {
                    "a fresh member of pool"
                } else {
                    "VM"
                },
                md(&run.vm)
            );
            if !run.command.is_empty() {
                let _ = write!(out, ": {}", md(&run.command));
            }
            if let (Some(repository), Some(branch)) = (&run.repository, &run.branch) {
                let _ = write!(
                    out,
                    " (on {}, as {} in the guest)",
                    md(repository),
                    md(branch)
                );
            }
            out.push('\n');
        }
        out.push('\n');
    }
    let notes: Vec<String> = plan
        .conflicts
        .iter()
        .map(|c| format!("conflict: {} on {}: {}", c.vm, c.provider, c.message))
        .chain(plan.drift.iter().map(|d| {
            let fix = if d.healed {
                "healed by this plan"
            } else {
                "reported only"
            };
            format!("drift: {} on {}: {}; {fix}", d.vm, d.provider, d.what)
        }))
        .chain(plan.secrets.iter().map(super::secrets::line))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "#### Notes\n");
        for note in notes {
            let _ = writeln!(out, "- {}", md(note.trim()));
        }
        out.push('\n');
    }
    for step in &plan.steps {
        if let Some(diff) = step_diff(step) {
            let fence = "`".repeat(longest_run(&diff, '`').max(2) + 1);
            let _ = writeln!(
                out,
                "<details><summary>{} {}</summary>\n\n{fence}diff\n{diff}{fence}\n\n</details>\n",
                step.action().as_str(),
                md(&step.vm)
            );
        }
    }
    let _ = writeln!(out, "<sub>plan digest `{}`</sub>", plan.digest);
    out
}

/// Text a revision wrote, safe in Markdown and in a table cell: its punctuation escaped,
/// line breaks and HTML-significant characters made inert, mentions broken.
pub fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '{' | '}' | '[' | ']' | '(' | ')' | '#' | '+' | '-' | '.'
            | '!' | '|' | '~' | '>' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '&' => out.push_str("&amp;"),
            '@' => out.push_str("@\u{200b}"),
            '\n' | '\r' => out.push(' '),
            // Control characters, and the invisible ones that reorder or hide text.
            c if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}') =>
                {}
            c => out.push(c),
        }
    }
    out
}

/// The longest run of `c` in `text`.
fn longest_run(text: &str, c: char) -> usize {
    text.split(|x| x != c).map(str::len).max().unwrap_or(0)
}
