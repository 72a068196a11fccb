//! Human in the loop: what an answer may contain, and the host-side conveniences
//! (`fleet hitl list`, `fleet hitl answer`). Prompts are recorded by the task runner
//! (`tasks`) in `status/hitl/<id>.yaml`; answers come from a committed
//! `fleet/hitl/<id>.yaml` (kind Answer) or from `status/hitl/<id>.answer` on the host.

use anyhow::{Context, Result, bail};

use crate::status::StatusDir;
use crate::status::tasks::{PromptRecord, PromptState};

/// Longest answer accepted, in bytes.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// Why an answer may not be typed into a terminal, if it may not. Control characters
/// (escape sequences, Ctrl-C, a second line) would let an answer do more than answer.
pub fn answer_problem(answer: &str) -> Option<String> {
    answer_problem_allowing(answer, false)
}

/// As `answer_problem`, for a prompt whose task allows control characters in answers
/// (`prompts.allowControl`): then only the length is checked.
pub fn answer_problem_allowing(answer: &str, allow_control: bool) -> Option<String> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Some(format!(
            "the answer is {} bytes; answers are at most {MAX_ANSWER_BYTES}",
            answer.len()
        ));
    }
    if let Some(c) = answer
        .chars()
        .find(|c| c.is_control())
        .filter(|_| !allow_control)
    {
        return Some(format!(
            "the answer contains the control character U+{:04X}; answers are one line of plain text (Enter is added)",
            c as u32
        ));
    }
    None
}

/// An answer file's text: one line; a single trailing newline is the editor's, not the
/// operator's.
pub fn answer_from_file(text: &str) -> &str {
    text.strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text)
}

/// `fleet hitl list`: prompts, pending first.
pub fn list(status: &StatusDir, all: bool) -> String {
    let mut prompts: Vec<PromptRecord> = status.read_prompts().into_values().collect();
    prompts.sort_by(|a, b| {
        (a.state != PromptState::Pending, &a.created, &a.id).cmp(&(
            b.state != PromptState::Pending,
            &b.created,
            &b.id,
        ))
    });
    let mut out = String::new();
    for a in crate::approvals::read_all(status)
        .iter()
        .filter(|a| all || a.state == crate::approvals::ApprovalState::Pending)
    {
        out.push_str(
            &format!(
                "{}  {:?}  approval of {} held step(s)  since {}\n",
                a.id,
                a.state,
                a.steps.len(),
                a.created
            )
            .to_lowercase(),
        );
        for step in &a.steps {
            out.push_str(&format!("    {step}\n"));
        }
        out.push_str(&format!(
            "    approve: fleet hitl answer {} {}\n",
            a.id, a.plan_digest
        ));
    }
    for p in prompts
        .iter()
        .filter(|p| all || p.state == PromptState::Pending)
    {
        let state = match p.state {
            PromptState::Pending if p.overdue => "pending (overdue)",
            PromptState::Pending => "pending",
            PromptState::Answered => "answered",
            PromptState::Withdrawn => "withdrawn",
            PromptState::Expired => "expired",
        };
        // The prompt's text comes from the guest: one plain line, whatever it sent.
        out.push_str(&format!(
            "{}  {state}  task {} on {}  since {}  deadline {}\n    {}\n",
            p.id,
            p.task,
            p.vm,
            p.created,
            p.deadline,
            crate::terminal::one_line(&p.text, 300)
        ));
        if let Some(by) = &p.answered_by {
            out.push_str(&format!("    answered by {by}\n"));
        }
    }
    if out.is_empty() {
        out = if all {
            "no prompts\n".into()
        } else {
            "no pending prompts\n".into()
        };
    }
    out
}

/// `fleet hitl answer ID TEXT`: writes the host-side answer file for a pending prompt.
pub fn answer(status: &StatusDir, id: &str, text: &str) -> Result<()> {
    let valid_id = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid_id {
        bail!("{id:?} is not a prompt id; `fleet hitl list` shows them");
    }
    if id.starts_with(crate::approvals::PREFIX) {
        return crate::approvals::answer(status, id, text.trim());
    }
    let prompt = status
        .read_prompt(id)
        .with_context(|| format!("no prompt {id}; `fleet hitl list` shows the pending ones"))?;
    match prompt.state {
        PromptState::Pending => {}
        PromptState::Answered => bail!(
            "prompt {id} was already answered by {}; a prompt takes one answer",
            prompt.answered_by.as_deref().unwrap_or("someone")
        ),
        PromptState::Withdrawn => bail!("prompt {id} was withdrawn: the task went on without it"),
        PromptState::Expired => bail!("prompt {id} expired: its deadline passed"),
    }
    if let Some(problem) = answer_problem_allowing(text, prompt.allow_control) {
        bail!("{problem}");
    }
    let path = status.answer_path(id);
    if path.exists() {
        bail!(
            "{} already holds an answer that fleet has not taken yet",
            path.display()
        );
    }
    crate::status::write_atomic(&path, format!("{text}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_one_line_of_plain_text() {
        assert_eq!(answer_problem("yes"), None);
        assert_eq!(answer_problem("ja, gerne — 🙂"), None);
        assert!(answer_problem("y\nrm -rf /").is_some());
        assert!(answer_problem("\u{1b}[2J").is_some());
        assert!(answer_problem("\u{3}").is_some());
        assert!(answer_problem(&"y".repeat(MAX_ANSWER_BYTES + 1)).is_some());
        // A task that allows control characters gets them; the length still counts.
        assert_eq!(answer_problem_allowing("\u{1b}[A", true), None);
        assert!(answer_problem_allowing(&"y".repeat(MAX_ANSWER_BYTES + 1), true).is_some());
        assert_eq!(answer_from_file("y\n"), "y");
        assert_eq!(answer_from_file("y\r\n"), "y");
        assert_eq!(answer_from_file("y\n\n"), "y\n");
    }
}
