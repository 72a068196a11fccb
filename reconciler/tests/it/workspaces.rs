//! Workspaces on real libvirt under `fleet serve` (the micro image, the real agent): a task
//! writes into a workspace; the VM is replaced, then destroyed and made again, and a later
//! task reads the file back. Deleting the Workspace's file waits for an approval; the
//! approved destroy removes its volume and only it (a volume fleet did not make, in the
//! same pool, is untouched). The VM's `snapshots:` policy snapshots the workspace before
//! the replace; once no VM runs with it, `fleet snapshot revert workspace:notes` brings
//! back what the replace snapshot held.

use std::time::Duration;

use crate::approvals::held_approval;
use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, virsh};
use crate::support::Repo;
use crate::tasks::{Status, task_yaml};

fn vm_yaml(name: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec:\n  provider: local\n  image: micro\n  loadout: base\n  resources: {{memory: 256Mi}}\n  workspaces: [{{name: notes, mountPath: /workspace}}]\n  snapshots: {{before: [replace], keep: 1}}\n"
    )
}

fn loadout(runcmd: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: base}}\nspec: {{runcmd: ['{runcmd}']}}\n"
    )
}

fn volumes(pool: &str) -> String {
    String::from_utf8_lossy(&virsh(&["vol-list", pool]).stdout).into_owned()
}

#[test]
fn a_workspace_outlives_its_vm_and_goes_only_when_approved() {
    if !enabled() {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("it{pid}-ws-");
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{pid}ws");
    let pool = format!("fleet-ws-{fleet}");
    struct DropPool(String);
    impl Drop for DropPool {
        fn drop(&mut self) {
            for vol in ["notes.qcow2", "foreign.raw"] {
                let _ = virsh(&["vol-delete", vol, "--pool", &self.0]);
            }
            let _ = virsh(&["pool-destroy", &self.0]);
            let _ = virsh(&["pool-undefine", &self.0]);
        }
    }
    let _pool = DropPool(pool.clone());
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(&fleet, "{shutdownTimeout: 10s, reconcileInterval: 30s}"),
    );
    repo.write(
        "fleet/workspaces/notes.yaml",
        "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: notes}\nspec: {provider: local, size: 64Mi}\n",
    );
    repo.write("fleet/loadouts/base.yaml", loadout("true"));
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm));
    // Another VM stays throughout, so removing the first never empties the provider (a
    // destroy that would is held for an approval of its own).
    repo.write(
        &format!("fleet/vms/{prefix}keep.yaml"),
        crate::libvirt::vm_yaml(&format!("{prefix}keep"), "128Mi"),
    );
    repo.write(
        "fleet/tasks/write.yaml",
        task_yaml(
            "write",
            &vm,
            "  command: [sh, -c, 'echo kept-across-vms > /workspace/f && grep \" /workspace \" /proc/mounts']\n",
        ),
    );
    repo.commit("a VM with a workspace, and a task writing into it");
    let daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("write", "Succeeded", Duration::from_secs(120));
    assert!(
        status.output("write").contains("/workspace"),
        "{}",
        status.output("write")
    );
    assert!(volumes(&pool).contains("notes.qcow2"), "{}", volumes(&pool));
    // The guest made an ext filesystem on it (its superblock's magic, 0xEF53 at 1080).
    let path =
        String::from_utf8_lossy(&virsh(&["vol-path", "notes.qcow2", "--pool", &pool]).stdout)
            .trim()
            .to_owned();
    let raw = repo.path().join("notes.raw");
    crate::libvirt::qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        &path,
        raw.to_str().expect("utf8"),
    ]);
    let bytes = std::fs::read(&raw).expect("raw");
    assert_eq!(&bytes[1080..1082], &[0x53, 0xEF], "an ext filesystem");
    assert!(
        bytes.windows(15).any(|w| w == b"kept-across-vms"),
        "the file's content is on the volume"
    );
    // A volume fleet did not make, in fleet's pool: never touched.
    let made = virsh(&["vol-create-as", &pool, "foreign.raw", "1M"]);
    assert!(made.status.success(), "{made:?}");

    // Replaced (a loadout change cloud-init applies at first boot only).
    repo.write("fleet/loadouts/base.yaml", loadout("echo again"));
    repo.commit("a new first-boot command: the VM is made again");
    let events = repo.path().join(".fleet/status/events.jsonl");
    let replaced = || {
        read(&events).lines().any(|l| {
            l.contains("\"step.succeeded\"")
                && l.contains("\"action\":\"replace\"")
                && l.contains(&vm)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !replaced() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replace did not run: {}\nfleet serve's log:\n{}\nplan: {}",
            read(&events),
            daemon.log.lock().unwrap_or_else(|p| p.into_inner()),
            {
                let plan = repo.fleet(&["plan"]);
                plan.stdout() + &plan.stderr()
            }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The step said what its policy does first, and took one snapshot of the workspace
    // once the old VM was down.
    assert!(
        read(&events).lines().any(|l| l.contains("\"step.started\"")
            && l.contains("snapshots workspace(s) notes first (keeps 1)")),
        "{}",
        read(&events)
    );
    let listed = repo.fleet(&["snapshot", "list", "workspace:notes"]);
    listed.expect_code(0);
    let before_replace = listed
        .stdout()
        .split_whitespace()
        .find(|w| w.starts_with("fleet-replace-"))
        .unwrap_or_else(|| panic!("a replace snapshot: {}", listed.stdout()))
        .to_owned();
    // While its VM runs, a workspace's snapshots are refused, with what to do instead.
    let refused = repo.fleet(&["snapshot", "create", "workspace:notes", "mine"]);
    assert!(
        refused.code() != 0 && refused.stderr().contains("in use by"),
        "{}",
        refused.stderr()
    );
    for (target, why) in [
        ("workspace:nothere", "no Workspace named"),
        ("workspace:../notes", "no Workspace named"),
    ] {
        let bad = repo.fleet(&["snapshot", "list", target]);
        assert!(
            bad.code() != 0 && bad.stderr().contains(why),
            "{target}: {}",
            bad.stderr()
        );
    }
    // The new VM's task adds a file (a file of its own: each task runs as a user of its
    // own, and the workspace's top directory is sticky).
    repo.write(
        "fleet/tasks/change.yaml",
        task_yaml(
            "change",
            &vm,
            "  command: [sh, -c, 'echo changed-after-replace > /workspace/g']\n",
        ),
    );
    repo.commit("a task changes the workspace's file");
    status.wait_phase("change", "Succeeded", Duration::from_secs(120));
    // Destroyed, then made again.
    repo.remove(&format!("fleet/vms/{vm}.yaml"));
    repo.remove("fleet/tasks/write.yaml");
    repo.remove("fleet/tasks/change.yaml");
    repo.commit("the VM goes");
    wait_until("the VM is destroyed", Duration::from_secs(120), || {
        !String::from_utf8_lossy(&virsh(&["list", "--all", "--name"]).stdout).contains(&vm)
    });
    assert!(
        volumes(&pool).contains("notes.qcow2"),
        "the workspace stays: {}",
        volumes(&pool)
    );
    // No VM runs with it now: an operator's snapshot, a revert to the policy's, a delete.
    repo.fleet(&["snapshot", "create", "workspace:notes", "mine"])
        .expect_code(0);
    repo.fleet(&["snapshot", "revert", "workspace:notes", &before_replace])
        .expect_code(0);
    repo.fleet(&["snapshot", "delete", "workspace:notes", "mine"])
        .expect_code(0);
    let listed = repo
        .fleet(&["snapshot", "list", "workspace:notes"])
        .stdout();
    assert!(
        listed.contains(&before_replace) && !listed.contains("mine"),
        "{listed}"
    );
    let events_text = read(&events);
    assert!(
        events_text.contains("\"snapshot.reverted\"") && events_text.contains("workspace:notes"),
        "{events_text}"
    );
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm));
    repo.write(
        "fleet/tasks/read.yaml",
        task_yaml(
            "read",
            &vm,
            "  command: [sh, -c, 'grep \" /workspace \" /proc/mounts; ls -la /workspace; cat /workspace/f; test -e /workspace/g && echo g-is-there || echo g-is-gone']\n",
        ),
    );
    repo.commit("the VM again, and a task reading the workspace");
    wait_until("read ends", Duration::from_secs(120), || {
        matches!(
            status.phase("read").as_deref(),
            Some("Succeeded" | "Failed")
        )
    });
    // What the replace snapshot held, not what the later task wrote.
    assert!(
        status.output("read").contains("kept-across-vms")
            && status.output("read").contains("g-is-gone"),
        "{}",
        status.output("read")
    );

    // The Workspace's file goes (and its VM): the VM is destroyed, the workspace waits.
    repo.remove(&format!("fleet/vms/{vm}.yaml"));
    repo.remove("fleet/tasks/read.yaml");
    repo.remove("fleet/workspaces/notes.yaml");
    repo.commit("the VM and its workspace go");
    wait_until(
        "the VM is destroyed again",
        Duration::from_secs(120),
        || !String::from_utf8_lossy(&virsh(&["list", "--all", "--name"]).stdout).contains(&vm),
    );
    let plan = repo.fleet(&["plan"]);
    assert!(
        plan.stdout().contains("destroyWorkspace workspace:notes")
            && plan.stdout().contains("always waits for an approval"),
        "{}",
        plan.stdout()
    );
    assert!(
        volumes(&pool).contains("notes.qcow2"),
        "held: {}",
        volumes(&pool)
    );
    let (id, digest) = held_approval(&plan.stdout());
    // The daemon offers it once a pass of its own has planned it.
    wait_until(
        "the daemon offers the approval",
        Duration::from_secs(60),
        || repo.fleet(&["hitl", "list"]).stdout().contains(&id),
    );
    repo.fleet(&["hitl", "answer", &id, &digest]).expect_code(0);
    wait_until(
        "the approved destroy removes the volume",
        Duration::from_secs(60),
        || !volumes(&pool).contains("notes.qcow2"),
    );
    assert!(
        volumes(&pool).contains("foreign.raw"),
        "only its own: {}",
        volumes(&pool)
    );
}
