//! The identities fleet writes into file names and onto the guest link, formatted and
//! parsed here only. Approvals and prompts share `status/hitl/`, so each id says which it
//! is by its shape, not by a prefix a task's name could also have.
//!
//! - approval: `approval-<first 12 hex of the plan's approval digest>`
//! - guest task: `<task>-<run>` (the name a run has inside its VM)
//! - prompt: `<task>-<run>-<n>` (the n-th prompt of that run)

use std::fmt;

use crate::digest::is_lower_hex;

const APPROVAL_PREFIX: &str = "approval-";
const APPROVAL_DIGEST_CHARS: usize = 12;

/// The id of an approval prompt, made from an approval digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApprovalId(String);

impl ApprovalId {
    /// `None` when the digest is too short or not hex (a hand-edited saved plan).
    pub fn from_digest(digest: &str) -> Option<ApprovalId> {
        let short = digest.get(..APPROVAL_DIGEST_CHARS)?;
        is_lower_hex(short).then(|| ApprovalId(format!("{APPROVAL_PREFIX}{short}")))
    }

    /// Reads an id; `None` for anything that is not exactly an approval id (a prompt of a
    /// task named `approval` is not one).
    pub fn parse(id: &str) -> Option<ApprovalId> {
        let rest = id.strip_prefix(APPROVAL_PREFIX)?;
        (rest.len() == APPROVAL_DIGEST_CHARS && is_lower_hex(rest))
            .then(|| ApprovalId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApprovalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name a run of a task has inside its VM.
pub fn guest_task(task: &str, run: &str) -> String {
    format!("{task}-{run}")
}

/// The n-th prompt of a run of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptId {
    pub task: String,
    pub run: String,
    pub n: u32,
}

impl PromptId {
    /// Reads `<task>-<run>-<n>`; `None` for an approval id or anything else.
    pub fn parse(id: &str) -> Option<PromptId> {
        if ApprovalId::parse(id).is_some() {
            return None;
        }
        let mut parts = id.rsplitn(3, '-');
        let n = parts.next()?.parse().ok()?;
        let run = parts.next()?;
        let task = parts.next()?;
        (!task.is_empty() && !run.is_empty()).then(|| PromptId {
            task: task.to_owned(),
            run: run.to_owned(),
            n,
        })
    }
}

impl fmt::Display for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.task, self.run, self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_ids_are_made_and_read_only_in_their_exact_shape() {
        let id = ApprovalId::from_digest("0123456789abcdef0123").expect("long digest");
        assert_eq!(id.as_str(), "approval-0123456789ab");
        assert_eq!(ApprovalId::parse(id.as_str()), Some(id));
        // A short or non-hex digest (a hand-edited saved plan) makes no id, and no panic.
        assert_eq!(ApprovalId::from_digest("abc"), None);
        assert_eq!(ApprovalId::from_digest("é23456789abcdef"), None);
        assert_eq!(ApprovalId::from_digest("0123456789AB"), None);
        // A prompt of a task named `approval` is a prompt, not an approval.
        assert_eq!(ApprovalId::parse("approval-1a2b3c4d-1"), None);
        assert_eq!(ApprovalId::parse("approval-0123456789abc"), None);
    }

    #[test]
    fn prompt_ids_round_trip_whatever_the_task_is_called() {
        for task in ["build", "approval", "a-b-c", "approval-0123456789ab"] {
            let id = PromptId {
                task: task.to_owned(),
                run: "1a2b3c4d".to_owned(),
                n: 3,
            };
            let text = id.to_string();
            assert_eq!(PromptId::parse(&text), Some(id), "{text}");
            assert_eq!(ApprovalId::parse(&text), None, "{text}");
        }
        assert_eq!(PromptId::parse("approval-0123456789ab"), None);
        assert_eq!(PromptId::parse("build-1a2b-x"), None);
        assert_eq!(PromptId::parse("-1a2b-1"), None);
        assert_eq!(guest_task("build", "1a2b3c4d"), "build-1a2b3c4d");
    }
}
