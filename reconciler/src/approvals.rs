//! Approvals as files. When a plan holds steps (`plan::guard`), fleet writes
//! `status/hitl/approval-<12 hex>.yaml` (the held steps, why each waits, the plan text and the
//! digest an approval must name) and applies everything else meanwhile. A committed
//! `fleet/hitl/<id>.yaml` (`kind: Answer`, `spec.approve: DIGEST`) or the host file
//! `status/hitl/<id>.answer` holding the digest releases exactly those steps; an approval that
//! names another digest is refused and noted on the record.
//!
//! Offers are gathered before planning (`gather`) and are an input of the plan, which
//! releases held steps only when an offer names their digest; the record is written after
//! (`record`).
//!
//! Invariant: held steps run only when an approval names the digest of exactly the steps the
//! current plan holds; the approved record is what survives a restart between approving and
//! applying.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

use crate::ids::ApprovalId;
use crate::plan::guard::HeldStep;
use crate::plan::{Plan, render};
use crate::resolve::Desired;
use crate::status::{Event, EventKind, StatusDir};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    Pending,
    Approved,
    /// The plan no longer holds these steps (the revision changed them).
    Withdrawn,
}

/// `status/hitl/<id>.yaml` for held steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    pub id: String,
    /// Always `approval`: tells these files from task prompts.
    pub kind: String,
    /// What an approval must name.
    pub plan_digest: String,
    pub revision: String,
    pub state: ApprovalState,
    /// The held steps, one line each with why it waits.
    pub steps: Vec<String>,
    /// The whole plan, as `fleet plan` prints it.
    pub plan: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub created: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::time::lenient_option"
    )]
    pub approved_at: Option<Timestamp>,
    /// Approvals that were refused (another digest), with where they came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

fn path(status: &StatusDir, id: &str) -> std::path::PathBuf {
    status.hitl_dir().join(format!("{id}.yaml"))
}

fn read(status: &StatusDir, id: &str) -> Option<ApprovalRecord> {
    let text = status.read_hitl_file(&format!("{id}.yaml")).ok()?;
    serde_saphyr::from_str(&text).ok()
}

fn write(status: &StatusDir, record: &ApprovalRecord) -> std::io::Result<()> {
    let text = serde_saphyr::to_string(record).expect("an approval record serialises");
    status.write_hitl_file(&format!("{}.yaml", record.id), text.as_bytes())
}

fn event(status: &StatusDir, desired: &Desired, kind: EventKind, message: String) {
    let _ = status.append_event(&Event::fleet(
        kind,
        Some(desired.revision.id.clone()),
        message,
    ));
}

/// An approval offered: the digest it names and who offered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub digest: String,
    pub by: OfferedBy,
    /// Why it does not count although it names a digest: its commit is not signed by an
    /// approver (host `trust`).
    pub refused: Option<String>,
}

/// Every approval on offer before a plan is made, by approval id: committed Answers,
/// host answer files, and approvals already recorded. Gathering reads and never writes.
#[derive(Clone, Debug, Default)]
pub struct Offers {
    by_id: std::collections::BTreeMap<String, Vec<Offer>>,
    recorded: BTreeSet<String>,
    /// Host answer files refused unread (a symlink, a FIFO, too big), by approval id.
    unreadable: std::collections::BTreeMap<String, String>,
}

impl Offers {
    /// The digests the planner may treat as approved: those recorded as approved, and those
    /// offered under the approval id their own digest makes (an Answer or host file for one
    /// approval never releases another's steps).
    pub fn digests(&self) -> BTreeSet<String> {
        let offered = self.by_id.iter().flat_map(|(id, offers)| {
            offers
                .iter()
                .filter(move |o| {
                    o.refused.is_none()
                        && ApprovalId::from_digest(&o.digest).is_some_and(|own| own.as_str() == id)
                })
                .map(|o| o.digest.clone())
        });
        self.recorded.iter().cloned().chain(offered).collect()
    }
}

/// Gathers the approvals on offer: recorded approvals, committed Answers and host answer
/// files. Nothing is moved or written here (`fleet plan` gathers too); `record` takes the
/// host file of the approval the plan holds.
pub fn gather(status: &StatusDir, desired: &Desired) -> Offers {
    let mut offers = Offers::default();
    for record in read_all(status) {
        if record.state == ApprovalState::Approved {
            offers.recorded.insert(record.plan_digest);
        }
    }
    for (id, committed) in &desired.approvals {
        let signer = committed.signer.as_deref();
        offers.by_id.entry(id.clone()).or_default().push(Offer {
            digest: committed.digest.clone(),
            by: OfferedBy::Commit(crate::resolve::Approvers::attribute(
                &desired.revision,
                &committed.source,
                signer,
            )),
            // Without the commit: one note per file, however many revisions repeat it.
            refused: desired
                .approvers
                .refusal(signer)
                .map(|why| format!("{}: {why}", committed.source)),
        });
    }
    for name in status.hitl_file_names() {
        let Some(id) = name.strip_suffix(".answer").and_then(ApprovalId::parse) else {
            continue;
        };
        match status.read_answer_file(&name) {
            None => {}
            Some(Ok(text)) => {
                let (digest, author) = crate::hitl::answer_and_author(&text);
                offers.by_id.entry(id.to_string()).or_default().push(Offer {
                    digest: digest.trim().to_owned(),
                    by: OfferedBy::HostFile(author.map(str::to_owned)),
                    refused: None,
                })
            }
            Some(Err(why)) => {
                offers.unreadable.insert(id.to_string(), why.to_string());
            }
        }
    }
    offers
}

/// Who offered an approval: a commit (which, and the Answer's file) or the host's answer
/// file `status/hitl/<id>.answer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfferedBy {
    Commit(String),
    /// With who wrote it, when `fleet hitl answer` did.
    HostFile(Option<String>),
}

impl std::fmt::Display for OfferedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OfferedBy::Commit(which) => f.write_str(which),
            OfferedBy::HostFile(None) => f.write_str("host file"),
            OfferedBy::HostFile(Some(who)) => write!(f, "{who} (host file)"),
        }
    }
}

/// After planning: writes or updates the approval record of the steps `plan` holds (or
/// released), notes offers that name another digest, takes the host answer file of that
/// approval (kept as `<id>.answer.read`, accepted or not), and withdraws pending records no
/// plan holds any more. A withdrawn record whose steps are held again is pending again.
pub fn record(status: &StatusDir, desired: &Desired, plan: &Plan, offers: &Offers) {
    let current = plan.approval_id();
    withdraw_others(status, desired, current.as_ref().map(ApprovalId::as_str));
    let Some(id) = current else {
        return;
    };
    let (digest, steps) = match (plan.approval_digest(), plan.approved()) {
        (Some(digest), _) => (
            digest.to_owned(),
            plan.held().iter().map(HeldStep::line).collect::<Vec<_>>(),
        ),
        (None, Some(approved)) => (approved.digest.clone(), approved.steps.clone()),
        (None, None) => return,
    };
    let id = id.to_string();
    let answer_file = status.hitl_dir().join(format!("{id}.answer"));
    if let Some(why) = offers.unreadable.get(&id) {
        tracing::warn!("{}: refused: {why}", answer_file.display());
    }
    // Read once, accepted or not: the file is kept as `<id>.answer.read`. Only a file that
    // was gathered (one written since waits for the next pass).
    let gathered = offers.unreadable.contains_key(&id)
        || offers
            .by_id
            .get(&id)
            .is_some_and(|o| o.iter().any(|o| matches!(o.by, OfferedBy::HostFile(_))));
    if gathered
        && let Err(e) =
            status.move_hitl_file(&format!("{id}.answer"), Some(&format!("{id}.answer.read")))
    {
        tracing::warn!("cannot move {} aside: {e}", answer_file.display());
    }
    let mut record = match read(status, &id) {
        Some(mut r) if r.plan_digest == digest => {
            if r.state == ApprovalState::Withdrawn {
                r.state = ApprovalState::Pending;
            }
            r
        }
        _ => {
            event(
                status,
                desired,
                EventKind::ApprovalRequested,
                format!(
                    "{} step(s) wait for approval {id} (spec.approve: {digest})",
                    steps.len()
                ),
            );
            ApprovalRecord {
                id: id.clone(),
                kind: "approval".into(),
                plan_digest: digest.clone(),
                revision: desired.revision.id.clone(),
                state: ApprovalState::Pending,
                steps,
                plan: render::text(plan),
                created: Some(SystemTime::now().into()),
                approved_by: None,
                approved_at: None,
                refused: Vec::new(),
            }
        }
    };
    let before = record.clone();
    if record.state != ApprovalState::Approved {
        for offer in offers.by_id.get(&id).into_iter().flatten() {
            if let Some(why) = &offer.refused {
                let note = format!("refused: {why}");
                if !record.refused.contains(&note) {
                    event(
                        status,
                        desired,
                        EventKind::ApprovalRefused,
                        format!("{id}: {note}"),
                    );
                    record.refused.push(note);
                }
                continue;
            }
            if offer.digest == digest {
                record.state = ApprovalState::Approved;
                record.approved_by = Some(offer.by.to_string());
                record.approved_at = Some(SystemTime::now().into());
                event(
                    status,
                    desired,
                    EventKind::ApprovalApproved,
                    format!("{id} approved by {}", offer.by),
                );
                break;
            }
            let note = format!(
                "{} names digest {:?}, not this plan's {digest}",
                offer.by, offer.digest
            );
            if !record.refused.contains(&note) {
                event(
                    status,
                    desired,
                    EventKind::ApprovalRefused,
                    format!("{id}: {note}"),
                );
                record.refused.push(note);
            }
        }
    }
    if record != before || !status.hitl_file_exists(&format!("{id}.yaml")) {
        let _ = write(status, &record);
    }
}

/// Every approval record, oldest first.
pub fn read_all(status: &StatusDir) -> Vec<ApprovalRecord> {
    let mut records: Vec<ApprovalRecord> = status
        .hitl_file_names()
        .iter()
        .filter_map(|name| {
            let id = name.strip_suffix(".yaml")?;
            ApprovalId::parse(id).and_then(|_| read(status, id))
        })
        .collect();
    records.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    records
}

/// `fleet hitl answer approval-… DIGEST`: writes the host answer file for a pending approval
/// when it names the digest of its held steps.
pub fn answer(status: &StatusDir, id: &str, digest: &str) -> Result<(), ApprovalRefused> {
    let Some(record) = read(status, id) else {
        return Err(ApprovalRefused::NoApproval(id.to_owned()));
    };
    if record.state != ApprovalState::Pending {
        return Err(ApprovalRefused::NotPending {
            id: id.to_owned(),
            state: record.state,
        });
    }
    if digest != record.plan_digest {
        return Err(ApprovalRefused::WrongDigest {
            id: id.to_owned(),
            digest: digest.to_owned(),
            record: path(status, id),
        });
    }
    status
        .write_hitl_file(
            &format!("{id}.answer"),
            format!("{digest}\n# answered by {}\n", crate::hitl::local_user()).as_bytes(),
        )
        .map_err(|source| ApprovalRefused::Write {
            path: status.answer_path(id),
            source,
        })
}

/// Why `fleet hitl answer` does not approve.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalRefused {
    #[error("no approval {0}; `fleet hitl list` shows the pending ones")]
    NoApproval(String),
    #[error("approval {id} is {state:?}, not pending")]
    NotPending { id: String, state: ApprovalState },
    #[error(
        "{digest:?} is not the digest of the steps {id} holds; read them in {} and pass its planDigest",
        record.display()
    )]
    WrongDigest {
        id: String,
        digest: String,
        record: std::path::PathBuf,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Pending approval records other than `keep` are withdrawn: their steps are no longer held.
fn withdraw_others(status: &StatusDir, desired: &Desired, keep: Option<&str>) {
    for name in status.hitl_file_names() {
        let Some(id) = name
            .strip_suffix(".yaml")
            .filter(|n| ApprovalId::parse(n).is_some())
        else {
            continue;
        };
        if Some(id) == keep {
            continue;
        }
        if let Some(mut record) = read(status, id)
            && record.state == ApprovalState::Pending
        {
            record.state = ApprovalState::Withdrawn;
            let _ = write(status, &record);
            event(
                status,
                desired,
                EventKind::ApprovalWithdrawn,
                format!("{id}: the plan no longer holds these steps"),
            );
        }
    }
}
