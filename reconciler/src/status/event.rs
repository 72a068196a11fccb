//! `events.jsonl`: what happened, one JSON object per line, appended. Every event is made
//! by a constructor here and stamped with the time it is made; its kind is an `EventKind`,
//! whose wire names (`step.started`) are what operators grep for.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

use crate::plan::{Action, Step};

/// Defines `EventKind` and `EventKind::ALL` from one list, so the list is always whole.
macro_rules! event_kinds {
    ($($kind:ident = $name:literal,)*) => {
        /// Every kind of event fleet writes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum EventKind {
            $(#[serde(rename = $name)] $kind,)*
        }

        impl EventKind {
            /// Every kind (`fleet events --kind`).
            pub const ALL: &[EventKind] = &[$(EventKind::$kind,)*];

            /// Its wire name (`step.started`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$kind => $name,)*
                }
            }
        }
    };
}

event_kinds! {
    StepStarted = "step.started",
    StepSucceeded = "step.succeeded",
    StepFailed = "step.failed",
    ApplyFinished = "apply.finished",
    VmDrifted = "vm.drifted",
    VmCrashLooping = "vm.crash_looping",
    VmAdopted = "vm.adopted",
    RevisionRefused = "revision.refused",
    JournalRecovered = "journal.recovered",
    HostTidied = "host.tidied",
    SecretError = "secret.error",
    ApprovalRequested = "approval.requested",
    ApprovalApproved = "approval.approved",
    ApprovalRefused = "approval.refused",
    ApprovalWithdrawn = "approval.withdrawn",
    TaskPending = "task.pending",
    TaskStarted = "task.started",
    TaskFinished = "task.finished",
    TaskTimeout = "task.timeout",
    TaskLimit = "task.limit",
    TaskOutputTruncated = "task.output.truncated",
    HitlPrompt = "hitl.prompt",
    HitlAnswered = "hitl.answered",
    HitlAnswerRefused = "hitl.answer_refused",
    HitlAnswerIgnored = "hitl.answer_ignored",
    HitlOverdue = "hitl.overdue",
    HitlExpired = "hitl.expired",
    EgressDenied = "egress.denied",
    SourceFetched = "source.fetched",
    SourceFetchFailed = "source.fetch_failed",
    SourceRewound = "source.rewound",
    Suspended = "fleet.suspended",
    Resumed = "fleet.resumed",
    WebhookRefused = "webhook.refused",
    PreviewPlanned = "preview.planned",
    ExecStarted = "exec.started",
    ExecEnded = "exec.ended",
    SnapshotCreated = "snapshot.created",
    SnapshotDeleted = "snapshot.deleted",
    SnapshotRevertAsked = "snapshot.revert_asked",
    SnapshotReverted = "snapshot.reverted",
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub time: Timestamp,
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Who did it, when a person on the host did (`fleet exec`, `fleet snapshot`: the user,
    /// and who they said they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub message: String,
}

impl Event {
    /// An event of the fleet as a whole (no VM, task or provider), stamped now.
    pub fn fleet(kind: EventKind, revision: Option<String>, message: String) -> Event {
        Event {
            time: SystemTime::now().into(),
            kind,
            vm: None,
            task: None,
            provider: None,
            action: None,
            revision,
            by: None,
            message,
        }
    }

    /// An event of one VM on its provider.
    pub fn vm(kind: EventKind, vm: &str, provider: &str, revision: &str, message: String) -> Event {
        Event {
            vm: Some(vm.to_owned()),
            provider: Some(provider.to_owned()),
            ..Event::fleet(kind, Some(revision.to_owned()), message)
        }
    }

    /// An event of a plan's step.
    pub fn step(kind: EventKind, step: &Step, revision: &str, message: String) -> Event {
        Event {
            action: Some(step.action()),
            ..Event::vm(kind, &step.vm, &step.provider, revision, message)
        }
    }

    /// An event of a task (in its VM, when known).
    pub fn task(
        kind: EventKind,
        task: Option<&str>,
        vm: Option<&str>,
        revision: Option<String>,
        message: String,
    ) -> Event {
        Event {
            task: task.map(str::to_owned),
            vm: vm.map(str::to_owned),
            ..Event::fleet(kind, revision, message)
        }
    }

    /// An event of one VM that an operator on the host caused (`fleet exec`, `fleet
    /// snapshot`), naming them.
    pub fn by_operator(kind: EventKind, vm: &str, by: &str, message: String) -> Event {
        Event {
            vm: Some(vm.to_owned()),
            by: Some(by.to_owned()),
            ..Event::fleet(kind, None, message)
        }
    }

    /// An event of a provider's host (a tidy), or of none (the journal).
    pub fn host(kind: EventKind, provider: Option<String>, message: String) -> Event {
        Event {
            provider,
            ..Event::fleet(kind, None, message)
        }
    }

    /// The same event, stamped at `time` instead of now.
    pub fn at(self, time: SystemTime) -> Event {
        Event {
            time: time.into(),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_wire_names() {
        let event = Event::task(
            EventKind::TaskOutputTruncated,
            Some("build"),
            Some("a"),
            None,
            "m".into(),
        );
        let json = serde_json::to_string(&event).expect("json");
        assert!(
            json.contains(r#""type":"task.output.truncated","vm":"a","task":"build""#),
            "{json}"
        );
    }
}
