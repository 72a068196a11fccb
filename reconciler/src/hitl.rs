//! Human in the loop: the host-side conveniences
//! (`fleet hitl list`, `fleet hitl answer`). Prompts are recorded by the task runner
//! (`tasks`) in `status/hitl/<id>.yaml`; answers come from a committed
//! `fleet/hitl/<id>.yaml` (kind Answer) or from `status/hitl/<id>.answer` on the host.

use crate::answer::answer_problem;
use crate::ids::ApprovalId;
use crate::status::StatusDir;
use crate::status::tasks::{PromptRecord, PromptState};

/// The line `fleet hitl answer` ends an answer file with: who wrote it.
const BY_MARKER: &str = "# answered by ";

/// An answer file's text and who wrote it: `fleet hitl answer` adds a last line naming the
/// local user; a file written by hand has none.
pub fn answer_and_author(text: &str) -> (&str, Option<&str>) {
    if let Some(body) = text.strip_suffix('\n')
        && let Some((answer, last)) = body.rsplit_once('\n')
        && let Some(who) = last.strip_prefix(BY_MARKER)
        && plain_name(who)
    {
        return (answer, Some(who));
    }
    (answer_from_file(text), None)
}

/// An answer file's text: one line; a single trailing newline is the editor's, not the
/// operator's.
pub fn answer_from_file(text: &str) -> &str {
    text.strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text)
}

/// Whether `who` is a name a record may show: letters, digits, `._-()` and spaces,
/// nothing that could reorder or hide text, at most 80 characters.
fn plain_name(who: &str) -> bool {
    !who.is_empty()
        && who.len() <= 80
        && who
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-() ".contains(c))
}

/// Who runs this command on the host, for records: the user `sudo` ran it for (as root or
/// as fleet's user), or the real user's name (its uid when it has none).
pub fn local_user() -> String {
    let uid = nix::unistd::getuid();
    let through_sudo = std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
        .is_some_and(|sudo_uid| sudo_uid != uid.as_raw());
    if through_sudo
        && let Ok(user) = std::env::var("SUDO_USER")
        && !user.contains(' ')
        && plain_name(&user)
    {
        return format!("{user} (through sudo)");
    }
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

/// What `fleet hitl list -o json|yaml` prints: the status files' own records, pending
/// ones only unless `all`.
#[derive(serde::Serialize)]
pub struct Waiting {
    pub prompts: Vec<PromptRecord>,
    pub approvals: Vec<crate::approvals::ApprovalRecord>,
}

pub fn records(status: &StatusDir, all: bool) -> Waiting {
    Waiting {
        prompts: status
            .read_prompts()
            .into_values()
            .filter(|p| all || p.state == PromptState::Pending)
            .collect(),
        approvals: crate::approvals::read_all(status)
            .into_iter()
            .filter(|a| all || a.state == crate::approvals::ApprovalState::Pending)
            .collect(),
    }
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
                crate::time::shown(a.created)
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
        for (i, option) in p.options.iter().enumerate() {
            out.push_str(&format!(
                "    {}. {}\n",
                i + 1,
                crate::terminal::one_line(option, 120)
            ));
        }
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

/// Why an answer was not written.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("{0:?} is not a prompt id; `fleet hitl list` shows them")]
    NotAnId(String),
    #[error("no prompt {0}; `fleet hitl list` shows the pending ones")]
    NoPrompt(String),
    #[error("prompt {id} was already answered by {by}; a prompt takes one answer")]
    Answered { id: String, by: String },
    #[error("prompt {0} was withdrawn: the task went on without it")]
    Withdrawn(String),
    #[error("prompt {0} expired: its deadline passed")]
    Expired(String),
    #[error(transparent)]
    Approval(#[from] crate::approvals::ApprovalRefused),
    /// The answer itself may not be typed (see `answer::answer_problem`).
    #[error("{0}")]
    Refused(String),
    #[error("{} already holds an answer that fleet has not taken yet", .0.display())]
    Waiting(std::path::PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// `fleet hitl answer ID TEXT`: writes the host-side answer file for a pending prompt (or,
/// for an approval id, approves its held steps when TEXT is their digest).
pub fn answer(status: &StatusDir, id: &str, text: &str) -> Result<(), AnswerError> {
    let valid_id = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid_id {
        return Err(AnswerError::NotAnId(id.to_owned()));
    }
    if ApprovalId::parse(id).is_some() {
        return Ok(crate::approvals::answer(status, id, text.trim())?);
    }
    let prompt = status
        .read_prompt(id)
        .ok_or_else(|| AnswerError::NoPrompt(id.to_owned()))?;
    match prompt.state {
        PromptState::Pending => {}
        PromptState::Answered => {
            return Err(AnswerError::Answered {
                id: id.to_owned(),
                by: prompt.answered_by.unwrap_or_else(|| "someone".into()),
            });
        }
        PromptState::Withdrawn => return Err(AnswerError::Withdrawn(id.to_owned())),
        PromptState::Expired => return Err(AnswerError::Expired(id.to_owned())),
    }
    if let Some(problem) = answer_problem(text, prompt.allow_control) {
        return Err(AnswerError::Refused(problem));
    }
    let path = status.answer_path(id);
    let name = crate::status::tasks::answer_file_name(id);
    if status.hitl_file_exists(&name) {
        return Err(AnswerError::Waiting(path));
    }
    status
        .write_hitl_file(
            &name,
            format!("{text}\n{BY_MARKER}{}\n", local_user()).as_bytes(),
        )
        .map_err(|source| AnswerError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_file_may_name_who_wrote_it() {
        assert_eq!(
            answer_and_author("yes\n# answered by alice\n"),
            ("yes", Some("alice"))
        );
        assert_eq!(answer_and_author("yes\n"), ("yes", None));
        assert_eq!(
            answer_and_author("# answered by x\n"),
            ("# answered by x", None)
        );
    }

    #[test]
    fn an_answer_file_loses_one_line_end() {
        assert_eq!(answer_from_file("y\n"), "y");
        assert_eq!(answer_from_file("y\r\n"), "y");
        assert_eq!(answer_from_file("y\n\n"), "y\n");
    }
}

#[cfg(test)]
mod routing {
    use super::*;
    use crate::status::tasks::PromptKind;

    fn prompt(id: &str, task: &str) -> PromptRecord {
        PromptRecord {
            id: id.into(),
            allow_control: false,
            kind: PromptKind::Input,
            task: task.into(),
            vm: "a".into(),
            text: "Deploy? (y/n)".into(),
            context: Vec::new(),
            options: Vec::new(),
            guest_seq: None,
            created: "2026-11-29T10:00:00Z".parse().expect("time"),
            deadline: "2026-11-30T10:00:00Z".parse().expect("time"),
            state: PromptState::Pending,
            overdue: false,
            response: None,
            answered_by: None,
            answered_at: None,
            delivered: false,
            refused: Vec::new(),
        }
    }

    /// A Task may be called `approval`: its prompts (`approval-<run>-<n>`) are prompts,
    /// listed and answered as such, never taken for approvals of held steps.
    #[test]
    fn a_task_named_approval_has_its_prompts_listed_and_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        let id = "approval-1a2b3c4d-1";
        status
            .write_prompt(&prompt(id, "approval"))
            .expect("prompt");

        assert!(status.read_prompts().contains_key(id));
        assert!(
            list(&status, false).contains(id),
            "{}",
            list(&status, false)
        );
        answer(&status, id, "y").expect("answered as a prompt");
        let written = std::fs::read_to_string(status.answer_path(id)).expect("answer file");
        assert_eq!(
            answer_and_author(&written),
            ("y", Some(local_user().as_str())),
            "{written:?}"
        );
    }
}
