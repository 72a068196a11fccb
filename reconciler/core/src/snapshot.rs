//! One revision of a `fleet/` tree, as bytes in memory: what `load` reads. The shell's
//! `source` makes snapshots from git or the working tree.

use serde::{Deserialize, Serialize};

/// Which revision a snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// A commit id, or `worktree:<digest of the files>`.
    pub id: String,
    /// What the operator would call it: `main@1a2b3c4`, or `worktree`.
    pub label: String,
    /// The principal whose signature on the commit the host verified (host `trust`);
    /// `None` when the host verifies none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

impl Revision {
    /// Short form for status lines.
    pub fn short(&self) -> &str {
        if self.id.starts_with("worktree:") {
            &self.id[..self.id.len().min(21)]
        } else {
            &self.id[..self.id.len().min(12)]
        }
    }
}

/// The files of `fleet/` at one revision, with paths relative to the repository root.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub revision: Revision,
    /// The fleet directory, relative to the repository root (`fleet`).
    pub fleet_dir: String,
    /// Sorted by path.
    pub files: Vec<SourceFile>,
    /// For the files an approver must have written (committed Answers), the principal
    /// whose verified signature is on the commit that last changed each, by path. Empty
    /// when the host verifies no signatures; a file absent was changed by no verified one.
    pub signers: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Relative to the repository root, `/`-separated.
    pub path: String,
    pub bytes: Vec<u8>,
}
