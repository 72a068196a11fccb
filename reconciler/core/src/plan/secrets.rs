//! What a revision changes about secret values, in words, without a value: compared by keyed
//! fingerprints (`secrets::Vault::fingerprint`) against those fleet last delivered
//! (`status/secrets.yaml`), with what each change forces (a task's new run, a delivery to a
//! VM's agent). Pure.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::resolve::Desired;

/// One value as the daemon last saw it: its fingerprint (none when it could not be opened).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretSeen {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub source: String,
}

/// `status/secrets.yaml`: by `<secret>/<key>`.
pub type SecretsSeen = BTreeMap<String, SecretSeen>;

/// One value of this revision, as the vault opened it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueNow {
    /// Opened; its keyed fingerprint.
    Opened(String),
    /// Not opened, and why (naming the file and key).
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SecretChangeKind {
    Added,
    ValueChanged,
    Removed,
    /// It cannot be opened with this host's identity (the reason names file and key).
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretChange {
    /// `<secret>/<key>`.
    pub value: String,
    pub change: SecretChangeKind,
    /// What it forces, in words ("task t runs again", "re-delivered to the agent of vm").
    pub forces: Vec<String>,
}

/// The changes from `seen` to the revision's values (`now`, by `<secret>/<key>`).
pub fn changes(
    desired: &Desired,
    now: &BTreeMap<String, ValueNow>,
    seen: &SecretsSeen,
) -> Vec<SecretChange> {
    let mut out = Vec::new();
    let ids: BTreeSet<&String> = now.keys().chain(seen.keys()).collect();
    for id in ids {
        let change = match (now.get(id), seen.get(id)) {
            (Some(ValueNow::Unreadable(why)), _) => SecretChangeKind::Unreadable(why.clone()),
            (Some(ValueNow::Opened(_)), None) => SecretChangeKind::Added,
            (Some(ValueNow::Opened(fp)), Some(old))
                if old.fingerprint.as_deref() != Some(fp.as_str()) =>
            {
                SecretChangeKind::ValueChanged
            }
            (Some(ValueNow::Opened(_)), Some(_)) => continue,
            (None, Some(_)) => SecretChangeKind::Removed,
            (None, None) => continue,
        };
        out.push(SecretChange {
            forces: forces(desired, id, &change),
            value: id.clone(),
            change,
        });
    }
    out
}

fn forces(desired: &Desired, id: &str, change: &SecretChangeKind) -> Vec<String> {
    let uses = |refs: &[crate::spec::SecretRef]| {
        refs.iter()
            .any(|r| format!("{}/{}", r.secret.0, r.key.0) == id)
    };
    let mut out = Vec::new();
    for task in desired.tasks.values().filter(|t| uses(&t.secrets)) {
        out.push(match change {
            SecretChangeKind::Unreadable(_) => format!("task {} waits", task.name),
            SecretChangeKind::Removed => continue,
            _ => format!("task {} runs again", task.name),
        });
    }
    for vm in desired.vms.values().filter(|vm| uses(&vm.secrets)) {
        out.push(match change {
            SecretChangeKind::Removed => format!("removed from the agent of {}", vm.name),
            SecretChangeKind::Unreadable(_) => format!("not delivered to {}", vm.name),
            _ => format!("delivered again to the agent of {}", vm.name),
        });
    }
    out
}

/// The human lines of a change.
pub fn line(change: &SecretChange) -> String {
    let (symbol, what) = match &change.change {
        SecretChangeKind::Added => ("+", "new".to_owned()),
        SecretChangeKind::ValueChanged => ("~", "secret value changed".to_owned()),
        SecretChangeKind::Removed => ("-", "removed".to_owned()),
        SecretChangeKind::Unreadable(why) => ("!", format!("cannot be opened: {why}")),
    };
    let forces = if change.forces.is_empty() {
        String::new()
    } else {
        format!(" → {}", change.forces.join("; "))
    };
    format!("  {symbol:<3} {}: {what}{forces}", change.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_value_shows_as_changed_with_its_task_and_no_value() {
        let desired = crate::resolve::tests_support::desired_with_task_secret(
            "-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----".into(),
        );
        let seen = SecretsSeen::from([
            (
                "s/k".to_owned(),
                SecretSeen {
                    fingerprint: Some("aaaa".into()),
                    source: "fleet/secrets/s.yaml".into(),
                },
            ),
            (
                "old/k".to_owned(),
                SecretSeen {
                    fingerprint: Some("cccc".into()),
                    source: "fleet/secrets/old.yaml".into(),
                },
            ),
        ]);
        let now = BTreeMap::from([
            ("s/k".to_owned(), ValueNow::Opened("bbbb".to_owned())),
            (
                "n/k".to_owned(),
                ValueNow::Unreadable("fleet/secrets/n.yaml key k: tampered".to_owned()),
            ),
        ]);
        let lines: Vec<String> = changes(&desired, &now, &seen).iter().map(line).collect();
        assert_eq!(
            lines,
            [
                "  !   n/k: cannot be opened: fleet/secrets/n.yaml key k: tampered",
                "  -   old/k: removed",
                "  ~   s/k: secret value changed → task t runs again",
            ]
        );
        let same = BTreeMap::from([("s/k".to_owned(), ValueNow::Opened("aaaa".to_owned()))]);
        let seen_one = SecretsSeen::from([("s/k".to_owned(), seen["s/k"].clone())]);
        assert!(changes(&desired, &same, &seen_one).is_empty());
    }
}
