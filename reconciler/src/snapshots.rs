//! `fleet snapshot create|list|revert|delete VM [NAME]`: snapshots of fleet's VMs on their
//! hypervisor (libvirt: internal snapshots in the VM's qcow2 overlay, with a running VM's
//! memory; Proxmox: the snapshot API, disks and config).
//!
//! Taking, listing and deleting act at once, through the VM's driver, and are events. A
//! revert changes what runs, so it is a step of a plan like any other: the command writes
//! the request (`status/snapshot-reverts/<vm>.yaml`), the next pass plans
//! `revert VM` (`Reason::RevertAsked`), apply journals and runs it, and the request goes
//! once it ran or failed (ask again). A snapshot lives with the VM's disk: a replace or a reset of the VM, which
//! makes its disk again, loses them.
//!
//! `workspace:NAME` in place of the VM names a workspace (libvirt: internal snapshots in
//! its qcow2 volume). Those are taken, reverted and deleted at once, and only while no VM
//! runs with the workspace: a workspace's revert changes no VM, so there is no step to
//! order, and qemu's image lock keeps a VM from starting on it meanwhile. fleet takes its
//! own (`fleet-replace-…`, `fleet-reset-…`) by a VM's `snapshots:` policy; operators may
//! revert to and delete those, and never name their own so.

use anyhow::{Context, Result, bail};

use crate::driver::{SnapshotInfo, SnapshotOp, check_snapshot_charset, check_snapshot_name};
use crate::reconcile::{Workspace, driver_of_vm, driver_of_workspace};
use crate::status::{Event, EventKind, HostRevert};

/// What `fleet snapshot` acts on: a VM, or `workspace:NAME`.
pub enum Target<'a> {
    Vm(&'a str),
    Workspace(&'a str),
}

impl<'a> Target<'a> {
    pub fn parse(target: &'a str) -> Target<'a> {
        match target.strip_prefix("workspace:") {
            Some(name) => Target::Workspace(name),
            None => Target::Vm(target),
        }
    }
}

/// The events' subject for a workspace (its step name in plans).
fn subject(target: &Target<'_>) -> String {
    match target {
        Target::Vm(vm) => (*vm).to_owned(),
        Target::Workspace(name) => crate::plan::workspace_step_name(name),
    }
}

fn event(ws: &Workspace, kind: EventKind, vm: &str, by: &str, message: String) {
    let event = Event::by_operator(kind, vm, by, message);
    if let Err(e) = ws.status.append_event(&event) {
        eprintln!("fleet snapshot: cannot record the event: {e}");
    }
}

/// A name for a snapshot the operator did not name: `s` and the UTC time.
pub fn default_name(now: std::time::SystemTime) -> String {
    let time = crate::time::Timestamp::from(now).to_string();
    let digits: String = time.chars().filter(char::is_ascii_digit).take(14).collect();
    format!("s{digits}")
}

pub fn create(
    ws: &Workspace,
    target: &Target<'_>,
    name: Option<&str>,
    description: &str,
) -> Result<String> {
    let name = name.map_or_else(|| default_name(std::time::SystemTime::now()), str::to_owned);
    check_snapshot_name(&name).map_err(|e| anyhow::anyhow!(e.message))?;
    let who = crate::hitl::local_user();
    let of = subject(target);
    match target {
        Target::Vm(vm) => driver_of_vm(ws, vm)?.snapshot_create(vm, &name, description),
        Target::Workspace(_) if !description.is_empty() => {
            bail!("a workspace's snapshots hold no description (qcow2 keeps only a name): leave out --description, and say it in the name")
        }
        Target::Workspace(w) => {
            driver_of_workspace(ws, w)?.workspace_snapshot(w, SnapshotOp::Create, &name)
        }
    }
    .with_context(|| format!("cannot snapshot {of}"))?;
    event(
        ws,
        EventKind::SnapshotCreated,
        &of,
        &who,
        format!("{who} took snapshot {name} of {of}"),
    );
    Ok(name)
}

pub fn list(ws: &Workspace, target: &Target<'_>) -> Result<Vec<SnapshotInfo>> {
    Ok(match target {
        Target::Vm(vm) => driver_of_vm(ws, vm)?.snapshots(vm)?,
        Target::Workspace(w) => driver_of_workspace(ws, w)?.workspace_snapshots(w)?,
    })
}

/// The snapshots as a table.
pub fn render(snapshots: &[SnapshotInfo]) -> String {
    if snapshots.is_empty() {
        return "no snapshots\n".to_owned();
    }
    let width = snapshots
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:<20}  {:<6}  DESCRIPTION\n",
        "NAME", "TAKEN", "MEMORY"
    );
    for s in snapshots {
        let taken = s
            .created
            .and_then(|t| u64::try_from(t).ok())
            .map(|t| {
                crate::time::Timestamp::from(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                )
                .to_string()
            })
            .unwrap_or_else(|| "-".into());
        let description = crate::terminal::strip_codes(&s.description);
        out.push_str(&format!(
            "{:<width$}  {:<20}  {:<6}  {}\n",
            s.name,
            taken,
            if s.with_memory { "yes" } else { "no" },
            description.lines().next().unwrap_or_default()
        ));
    }
    out
}

/// A VM's revert is asked for (the snapshot must exist now; the next pass runs it); a
/// workspace's is done at once. Returns whether it was done.
pub fn revert(ws: &Workspace, target: &Target<'_>, name: &str) -> Result<bool> {
    match target {
        Target::Vm(vm) => ask_revert(ws, vm, name).map(|()| false),
        Target::Workspace(w) => {
            workspace_op(ws, w, SnapshotOp::Revert, name)?;
            Ok(true)
        }
    }
}

/// A workspace's revert or delete, at once, with its event.
fn workspace_op(ws: &Workspace, workspace: &str, op: SnapshotOp, name: &str) -> Result<()> {
    check_snapshot_charset(name).map_err(|e| anyhow::anyhow!(e.message))?;
    let of = subject(&Target::Workspace(workspace));
    let who = crate::hitl::local_user();
    driver_of_workspace(ws, workspace)?
        .workspace_snapshot(workspace, op, name)
        .with_context(|| format!("cannot use {of}'s snapshot {name}"))?;
    let (kind, what) = match op {
        SnapshotOp::Revert => (EventKind::SnapshotReverted, "reverted"),
        _ => (EventKind::SnapshotDeleted, "deleted"),
    };
    let message = match op {
        SnapshotOp::Revert => format!("{who} {what} {of} to snapshot {name}"),
        _ => format!("{who} {what} snapshot {name} of {of}"),
    };
    event(ws, kind, &of, &who, message);
    Ok(())
}

fn ask_revert(ws: &Workspace, vm: &str, name: &str) -> Result<()> {
    check_snapshot_name(name).map_err(|e| anyhow::anyhow!(e.message))?;
    let driver = driver_of_vm(ws, vm)?;
    if !driver.snapshots(vm)?.iter().any(|s| s.name == name) {
        bail!("{vm} has no snapshot named {name} (fleet snapshot list {vm} shows its snapshots)");
    }
    let who = crate::hitl::local_user();
    ws.status.write_revert(&HostRevert {
        vm: vm.to_owned(),
        snapshot: name.to_owned(),
        by: who.clone(),
        asked: Some(std::time::SystemTime::now().into()),
    })?;
    event(
        ws,
        EventKind::SnapshotRevertAsked,
        vm,
        &who,
        format!("{who} asked for {vm} to go back to snapshot {name}"),
    );
    Ok(())
}

pub fn delete(ws: &Workspace, target: &Target<'_>, name: &str) -> Result<()> {
    let vm = match target {
        Target::Vm(vm) => *vm,
        Target::Workspace(w) => return workspace_op(ws, w, SnapshotOp::Delete, name),
    };
    check_snapshot_name(name).map_err(|e| anyhow::anyhow!(e.message))?;
    let driver = driver_of_vm(ws, vm)?;
    let who = crate::hitl::local_user();
    driver
        .snapshot_delete(vm, name)
        .with_context(|| format!("cannot delete {vm}'s snapshot {name}"))?;
    event(
        ws,
        EventKind::SnapshotDeleted,
        vm,
        &who,
        format!("{who} deleted snapshot {name} of {vm}"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnamed_snapshot_is_named_by_its_time_and_the_name_is_valid() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
        let name = default_name(at);
        assert_eq!(name, "s20261130005320");
        check_snapshot_name(&name).expect("a valid name");
        for bad in [
            "fleet-clean",
            "../x",
            "a",
            "1abc",
            "with space",
            &"x".repeat(41),
        ] {
            assert!(check_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
