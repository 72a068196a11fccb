//! Approvals as files. When a plan holds steps (`plan::guard`), fleet writes
//! `status/hitl/approval-<12 hex>.yaml` (the held steps, why each waits, the plan text and the
//! digest an approval must name) and applies everything else meanwhile. A committed
//! `fleet/hitl/<id>.yaml` (`kind: Answer`, `spec.approve: DIGEST`) or the host file
//! `status/hitl/<id>.answer` holding the digest releases exactly those steps; an approval that
//! names another digest is refused and noted on the record.
//!
//! Invariant: held steps run only when an approval names the digest of exactly the steps the
//! current plan holds; the approved record is what survives a restart between approving and
//! applying.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::ids::ApprovalId;
use crate::plan::{Plan, render};
use crate::resolve::Desired;
use crate::status::{Event, StatusDir, timestamp, write_atomic};

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
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<String>,
    /// Approvals that were refused (another digest), with where they came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

fn path(status: &StatusDir, id: &str) -> std::path::PathBuf {
    status.hitl_dir().join(format!("{id}.yaml"))
}

fn read(status: &StatusDir, id: &str) -> Option<ApprovalRecord> {
    let text = std::fs::read_to_string(path(status, id)).ok()?;
    serde_saphyr::from_str(&text).ok()
}

fn write(status: &StatusDir, record: &ApprovalRecord) -> std::io::Result<()> {
    crate::fsguard::create_private_dirs(&status.hitl_dir())?;
    let text = serde_saphyr::to_string(record).expect("an approval record serialises");
    write_atomic(&path(status, &record.id), text.as_bytes())
}

fn event(status: &StatusDir, desired: &Desired, kind: &str, message: String) {
    let _ = status.append_event(&Event::fleet(
        kind,
        Some(desired.revision.id.clone()),
        message,
    ));
}

/// Writes or updates the approval file of `plan`'s held steps and releases them into its
/// steps when they are approved. Records of approvals no plan holds any more are withdrawn.
pub fn settle(status: &StatusDir, desired: &Desired, plan: &mut Plan) {
    let current = plan.approval_id().map(|id| id.to_string());
    withdraw_others(status, desired, current.as_deref());
    let (Some(id), Some(digest)) = (current, plan.approval_digest.clone()) else {
        return;
    };
    let mut record = match read(status, &id) {
        Some(r) if r.plan_digest == digest => r,
        _ => {
            let record = ApprovalRecord {
                id: id.clone(),
                kind: "approval".into(),
                plan_digest: digest.clone(),
                revision: desired.revision.id.clone(),
                state: ApprovalState::Pending,
                steps: plan
                    .held
                    .iter()
                    .map(|h| {
                        format!(
                            "{} {} on {}: {}",
                            h.step.action.as_str(),
                            h.step.vm,
                            h.step.provider,
                            h.why.join("; ")
                        )
                    })
                    .collect(),
                plan: render::text(plan),
                created: timestamp(SystemTime::now()),
                approved_by: None,
                approved_at: None,
                refused: Vec::new(),
            };
            event(
                status,
                desired,
                "approval.requested",
                format!(
                    "{} step(s) wait for approval {id} (spec.approve: {digest})",
                    plan.held.len()
                ),
            );
            record
        }
    };
    let before = record.clone();
    if record.state != ApprovalState::Approved {
        let mut offered: Vec<(String, String)> = Vec::new();
        if let Some(committed) = desired.approvals.get(&id) {
            offered.push((
                committed.digest.clone(),
                format!("commit {} ({})", desired.revision.short(), committed.source),
            ));
        }
        let answer_file = status.hitl_dir().join(format!("{id}.answer"));
        if let Some(read) = crate::status::read_answer_file(&answer_file) {
            match read {
                Ok(text) => offered.push((text.trim().to_owned(), "host file".to_owned())),
                Err(why) => tracing::warn!("{}: refused: {why}", answer_file.display()),
            }
            // Read once, accepted or not: the file is kept as `<id>.answer.read`.
            let _ = std::fs::rename(
                &answer_file,
                status.hitl_dir().join(format!("{id}.answer.read")),
            );
        }
        for (named, by) in offered {
            if named == digest {
                record.state = ApprovalState::Approved;
                record.approved_by = Some(by.clone());
                record.approved_at = Some(timestamp(SystemTime::now()));
                event(
                    status,
                    desired,
                    "approval.approved",
                    format!("{id} approved by {by}"),
                );
                break;
            }
            let note = format!("{by} names digest {named:?}, not this plan's {digest}");
            if !record.refused.contains(&note) {
                event(status, desired, "approval.refused", format!("{id}: {note}"));
                record.refused.push(note);
            }
        }
    }
    if record != before || !path(status, &id).exists() {
        let _ = write(status, &record);
    }
    if record.state == ApprovalState::Approved {
        plan.approve(&digest);
    }
}

/// Every approval record, oldest first.
pub fn read_all(status: &StatusDir) -> Vec<ApprovalRecord> {
    let Ok(entries) = std::fs::read_dir(status.hitl_dir()) else {
        return Vec::new();
    };
    let mut records: Vec<ApprovalRecord> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_suffix(".yaml")?;
            ApprovalId::parse(id).and_then(|_| read(status, id))
        })
        .collect();
    records.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    records
}

/// `fleet hitl answer approval-… DIGEST`: writes the host answer file for a pending approval
/// when it names the digest of its held steps.
pub fn answer(status: &StatusDir, id: &str, digest: &str) -> anyhow::Result<()> {
    let Some(record) = read(status, id) else {
        anyhow::bail!("no approval {id}; `fleet hitl list` shows the pending ones");
    };
    if record.state != ApprovalState::Pending {
        anyhow::bail!("approval {id} is {:?}, not pending", record.state);
    }
    if digest != record.plan_digest {
        anyhow::bail!(
            "{digest:?} is not the digest of the steps {id} holds; read them in {} and pass its planDigest",
            path(status, id).display()
        );
    }
    write_atomic(
        &status.hitl_dir().join(format!("{id}.answer")),
        format!("{digest}\n").as_bytes(),
    )?;
    Ok(())
}

/// Pending approval records other than `keep` are withdrawn: their steps are no longer held.
fn withdraw_others(status: &StatusDir, desired: &Desired, keep: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(status.hitl_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".yaml"))
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
                "approval.withdrawn",
                format!("{id}: the plan no longer holds these steps"),
            );
        }
    }
}
