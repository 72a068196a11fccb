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

/// `qemu-img snapshot` takes no `-f`: the format is forced with `--image-opts` instead
/// (a comma in the path doubled, as QEMU's option syntax escapes it).
fn qcow2_opts(path: &Path) -> std::ffi::OsString {
    let mut opts = std::ffi::OsString::from("driver=qcow2,file.driver=file,file.filename=");
    opts.push(path.to_string_lossy().replace(',', ",,"));
    opts
}

fn qemu_img(
    args: &[&str],
    target: impl AsRef<std::ffi::OsStr>,
    what: &str,
) -> Result<Vec<u8>, DriverError> {
    let output = host_command("qemu-img")
        .args(args)
        .arg(target)
        .output()
        .map_err(|e| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("run qemu-img: {e} (install qemu-utils)"),
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // qemu's image lock (`Failed to get "write" lock`): a VM has the volume open,
        // started since the check.
        let kind = if stderr.contains("Failed to get") && stderr.contains(" lock") {
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
        &["info", "-U", "-f", "qcow2", "--output=json"],
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
    // qcow2 keeps snapshot ids unique, not names: a second of one name would make a later
    // revert or delete of it take whichever comes first.
    let exists = list(path, workspace)?.iter().any(|s| s.name == snapshot);
    match (op, exists) {
        (SnapshotOp::Create, true) => {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "workspace {workspace} has a snapshot named {snapshot} already; choose another name"
                ),
            ));
        }
        (SnapshotOp::Revert | SnapshotOp::Delete, false) => {
            return Err(DriverError::new(
                ErrorKind::NotFound,
                format!("workspace {workspace} has no snapshot named {snapshot}"),
            ));
        }
        _ => {}
    }
    let what = match op {
        SnapshotOp::Create => format!("snapshot workspace {workspace} as {snapshot}"),
        SnapshotOp::Revert => format!("revert workspace {workspace} to {snapshot}"),
        SnapshotOp::Delete => format!("delete workspace {workspace}'s snapshot {snapshot}"),
    };
    qemu_img(
        &["snapshot", "--image-opts", flag(op), snapshot],
        qcow2_opts(path),
        &what,
    )
    .map(drop)
}

/// Whether fleet's user (its effective ids: `qemu-img` runs as them) may write the volume.
/// Checked before a policy's VM goes down, when no VM runs with the volume (libvirt gives
/// it to qemu's user while one does), so a volume it cannot snapshot fails the step with
/// the VM up.
pub fn check_writable(path: &Path, workspace: &str) -> Result<(), DriverError> {
    use rustix::fs::{Access, AtFlags, CWD, accessat};
    accessat(
        CWD,
        path,
        Access::READ_OK | Access::WRITE_OK,
        AtFlags::EACCESS,
    )
    .map_err(|e| {
        DriverError::new(
            ErrorKind::Permanent,
            format!(
                "workspace {workspace}'s volume {} is not writable by fleet's user ({e}): chown it to that user (volumes fleet makes are), or remove the VM's snapshots policy",
                path.display()
            ),
        )
    })
}

/// A policy's snapshot of the volume before `step`, unless the newest of its own for that
/// step already holds what the volume holds (a retried or repeated step: nothing wrote
/// the volume since). fleet's own for that step beyond the newest `keep` are deleted
/// first, so the snapshot is the volume's last write however long the deletes take.
/// Returns the snapshot taken, as `workspace/name`.
pub fn take_for(
    path: &Path,
    workspace: &str,
    step: &str,
    keep: u32,
) -> Result<Option<String>, DriverError> {
    let before = list(path, workspace)?;
    let prefix = format!("fleet-{step}-");
    let changed = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64);
    if already_held(&before, &prefix, changed) {
        return Ok(None);
    }
    // Room for the one about to be taken.
    for old in beyond_keep(&before, &prefix, keep.saturating_sub(1)) {
        run(path, workspace, SnapshotOp::Delete, &old)?;
    }
    let name = auto_name(step, SystemTime::now(), &before);
    run(path, workspace, SnapshotOp::Create, &name)?;
    Ok(Some(format!("{workspace}/{name}")))
}

/// Whether the newest snapshot named `prefix…` was the last write of the volume, last
/// changed at `changed` (seconds; the snapshot's own write lands within a second or two of
/// its time).
fn already_held(snapshots: &[SnapshotInfo], prefix: &str, changed: Option<i64>) -> bool {
    let newest = snapshots
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .filter_map(|s| s.created)
        .max();
    matches!((newest, changed), (Some(taken), Some(changed)) if changed <= taken + 2)
}

/// The name of fleet's own snapshot taken before `step` at `now`
/// (`fleet-replace-20261204153000`), one not in `taken`.
fn auto_name(step: &str, now: SystemTime, taken: &[SnapshotInfo]) -> String {
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

/// fleet's own snapshots for one step (names beginning `prefix`, `fleet-<step>-`) beyond
/// the newest `keep`, oldest first: those a policy deletes. Operators' snapshots, and
/// fleet's for the other step, are never among them.
fn beyond_keep(snapshots: &[SnapshotInfo], prefix: &str, keep: u32) -> Vec<String> {
    debug_assert!(prefix.starts_with("fleet-"));
    let own: Vec<&SnapshotInfo> = snapshots
        .iter()
        .filter(|s| s.name.starts_with(prefix))
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
    fn image_options_force_qcow2_and_escape_commas() {
        assert_eq!(
            qcow2_opts(Path::new("/srv/a,b/notes.qcow2")),
            "driver=qcow2,file.driver=file,file.filename=/srv/a,,b/notes.qcow2"
        );
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
    fn a_policy_deletes_only_its_own_oldest_snapshots_for_its_step() {
        let list = [
            snap("fleet-replace-1", 1),
            snap("mine", 2),
            snap("fleet-reset-3", 3),
            snap("fleet-reset-4", 4),
            snap("fleet-reset-5", 5),
        ];
        assert_eq!(beyond_keep(&list, "fleet-reset-", 2), ["fleet-reset-3"]);
        assert_eq!(
            beyond_keep(&list, "fleet-reset-", 1),
            ["fleet-reset-3", "fleet-reset-4"]
        );
        assert!(beyond_keep(&list, "fleet-replace-", 1).is_empty());
        assert!(beyond_keep(&list, "fleet-reset-", 5).is_empty());
    }

    #[test]
    fn a_step_run_again_takes_no_second_snapshot_of_an_unchanged_volume() {
        let list = [snap("fleet-reset-a", 100), snap("mine", 500)];
        // Written last by the snapshot itself: held already.
        assert!(already_held(&list, "fleet-reset-", Some(101)));
        // Written since (a run wrote it, or an operator's snapshot came after): a new one.
        assert!(!already_held(&list, "fleet-reset-", Some(500)));
        // None for this step yet, or no time to compare: take one.
        assert!(!already_held(&list, "fleet-replace-", Some(101)));
        assert!(!already_held(&list, "fleet-reset-", None));
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
