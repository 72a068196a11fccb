//! Internal snapshots of a workspace's qcow2 volume, with `qemu-img` (libvirt's storage API
//! has no volume snapshots). Only while no running domain has the volume: qemu's image
//! locks refuse `qemu-img` a volume a VM has open, and this module never asks them to
//! yield (no `-U` but for reading the list).

use std::path::Path;
use std::time::SystemTime;

use crate::driver::{DriverError, ErrorKind, SnapshotInfo, SnapshotOp, host_command};

fn flag(op: SnapshotOp) -> &'static str {
    match op {
        SnapshotOp::Create => "-c",
        SnapshotOp::Revert => "-a",
        SnapshotOp::Delete => "-d",
    }
}

fn qemu_img(args: &[&str], path: &Path, what: &str) -> Result<Vec<u8>, DriverError> {
    let output = host_command("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("run qemu-img: {e} (install qemu-utils)"),
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // qemu's image lock: a VM has the volume open (started since the check).
        let kind = if stderr.contains("lock") {
            ErrorKind::Transient
        } else {
            ErrorKind::Permanent
        };
        return Err(DriverError::new(
            kind,
            format!("{what}: qemu-img: {}", stderr.trim()),
        ));
    }
    Ok(output.stdout)
}

/// The volume's snapshots, oldest first.
pub fn list(path: &Path, workspace: &str) -> Result<Vec<SnapshotInfo>, DriverError> {
    let json = qemu_img(
        &["info", "-U", "--output=json"],
        path,
        &format!("list workspace {workspace}'s snapshots"),
    )?;
    parse_list(&json).map_err(|e| {
        DriverError::new(
            ErrorKind::Permanent,
            format!("workspace {workspace}: qemu-img info: {e}"),
        )
    })
}

fn parse_list(json: &[u8]) -> Result<Vec<SnapshotInfo>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(default)]
        snapshots: Vec<Snapshot>,
    }
    #[derive(serde::Deserialize)]
    struct Snapshot {
        name: String,
        #[serde(rename = "date-sec")]
        date_sec: Option<i64>,
        #[serde(rename = "vm-state-size", default)]
        vm_state_size: u64,
    }
    let info: Info = serde_json::from_slice(json)?;
    let mut list: Vec<SnapshotInfo> = info
        .snapshots
        .into_iter()
        .map(|s| SnapshotInfo {
            name: s.name,
            created: s.date_sec,
            description: String::new(),
            with_memory: s.vm_state_size > 0,
        })
        .collect();
    list.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(list)
}

/// Takes, reverts to or deletes `snapshot` of the volume at `path`.
pub fn run(
    path: &Path,
    workspace: &str,
    op: SnapshotOp,
    snapshot: &str,
) -> Result<(), DriverError> {
    if op != SnapshotOp::Create && !list(path, workspace)?.iter().any(|s| s.name == snapshot) {
        return Err(DriverError::new(
            ErrorKind::NotFound,
            format!("workspace {workspace} has no snapshot named {snapshot}"),
        ));
    }
    let what = match op {
        SnapshotOp::Create => format!("snapshot workspace {workspace} as {snapshot}"),
        SnapshotOp::Revert => format!("revert workspace {workspace} to {snapshot}"),
        SnapshotOp::Delete => format!("delete workspace {workspace}'s snapshot {snapshot}"),
    };
    qemu_img(&["snapshot", flag(op), snapshot], path, &what).map(drop)
}

/// The name of fleet's own snapshot taken before `step` at `now`
/// (`fleet-replace-20261204153000`), one not in `taken`.
pub fn auto_name(step: &str, now: SystemTime, taken: &[SnapshotInfo]) -> String {
    let digits: String = crate::time::Timestamp::from(now)
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    let base = format!("fleet-{step}-{digits}");
    let free = |name: &String| !taken.iter().any(|s| &s.name == name);
    std::iter::once(base.clone())
        .chain((2..).map(|n| format!("{base}-{n}")))
        .find(free)
        .expect("an unbounded sequence has a free name")
}

/// fleet's own snapshots beyond the newest `keep`, oldest first: those a policy deletes.
/// Operators' snapshots (names not beginning `fleet-`) are never among them.
pub fn beyond_keep(snapshots: &[SnapshotInfo], keep: u32) -> Vec<String> {
    let own: Vec<&SnapshotInfo> = snapshots
        .iter()
        .filter(|s| s.name.starts_with("fleet-"))
        .collect();
    let extra = own.len().saturating_sub(keep as usize);
    own.iter().take(extra).map(|s| s.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, created: i64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            created: Some(created),
            description: String::new(),
            with_memory: false,
        }
    }

    #[test]
    fn qemu_img_info_lists_snapshots_oldest_first() {
        let json = br#"{"virtual-size": 67108864, "filename": "notes.qcow2", "format": "qcow2",
            "snapshots": [
              {"icount": 0, "vm-state-size": 0, "date-sec": 1796400000, "date-nsec": 0,
               "vm-clock-nsec": 0, "name": "later", "vm-clock-sec": 0, "id": "2"},
              {"vm-state-size": 4096, "date-sec": 1796300000, "date-nsec": 0,
               "vm-clock-nsec": 0, "name": "first", "vm-clock-sec": 0, "id": "1"}]}"#;
        let list = parse_list(json).expect("parses");
        assert_eq!(
            list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["first", "later"]
        );
        assert!(list[0].with_memory && !list[1].with_memory);
        assert!(
            parse_list(br#"{"format": "qcow2"}"#)
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_policy_deletes_only_its_own_oldest_snapshots() {
        let list = [
            snap("fleet-replace-1", 1),
            snap("mine", 2),
            snap("fleet-reset-3", 3),
            snap("fleet-reset-4", 4),
        ];
        assert_eq!(beyond_keep(&list, 2), ["fleet-replace-1"]);
        assert_eq!(beyond_keep(&list, 1), ["fleet-replace-1", "fleet-reset-3"]);
        assert!(beyond_keep(&list, 5).is_empty());
    }

    #[test]
    fn an_automatic_name_is_fleets_own_and_never_taken() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
        let first = auto_name("replace", at, &[]);
        assert_eq!(first, "fleet-replace-20261130005320");
        let second = auto_name("replace", at, &[snap(&first, 1)]);
        assert_eq!(second, "fleet-replace-20261130005320-2");
        // Operators cannot take these names.
        assert!(crate::driver::check_snapshot_name(&first).is_err());
    }
}
