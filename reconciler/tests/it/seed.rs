//! Generated cloud-init user-data passes `cloud-init schema` (Debian's cloud-init). Runs with
//! `FLEET_TEST_LIBVIRT=1` (make test, CI), where cloud-init must be installed.

use std::process::Command;

use fleet::source::{Revision, Snapshot, SourceFile};

fn example_fleet_with(extra: &[(&str, &str)]) -> fleet::resolve::Desired {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut snapshot =
        fleet::source::from_worktree(&root, "fleet").expect("read the example fleet");
    snapshot.files.extend(extra.iter().map(|(p, t)| SourceFile {
        path: (*p).into(),
        bytes: t.as_bytes().to_vec(),
    }));
    let snapshot = Snapshot {
        revision: Revision {
            id: "t".into(),
            label: "t".into(),
            signed_by: None,
        },
        ..snapshot
    };
    let host = fleet::load::load_host(
        "docs/host.example.yaml",
        &std::fs::read(root.join("docs/host.example.yaml"))
            .expect("the example host configuration"),
    )
    .unwrap_or_else(|d| panic!("{d:#?}"));
    fleet::reconcile::desired(&snapshot, &host).unwrap_or_else(|d| panic!("{d:#?}"))
}

#[test]
fn rendered_user_data_passes_cloud_init_schema() {
    if std::env::var("FLEET_TEST_LIBVIRT").ok().as_deref() != Some("1") {
        eprintln!("cloud-init schema check skipped: set FLEET_TEST_LIBVIRT=1 (make test does)");
        return;
    }
    let desired = example_fleet_with(&[(
        "fleet/vms/web.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: web}\nspec: {provider: local, image: micro, loadout: agent-dev, network: {mode: full}}\n",
    )]);
    let dir = tempfile::tempdir().expect("tempdir");
    for vm in desired.vms.values() {
        let seed = fleet::seed::render(vm, "00000000-0000-0000-0000-000000000000");
        let path = dir.path().join(format!("{}-user-data", vm.name));
        std::fs::write(&path, &seed.user_data).expect("write");
        let out = Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&path)
            .output()
            .expect("run cloud-init (apt-get install cloud-init)");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Deprecated keys stop working in a later cloud-init: fail on them now.
        assert!(
            !report.to_lowercase().contains("deprecat"),
            "{}: cloud-init schema warns:\n{}\n{report}",
            vm.name,
            seed.user_data
        );
        assert!(
            out.status.success(),
            "{}: cloud-init schema rejected:\n{}\n{}{}",
            vm.name,
            seed.user_data,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        desired.vms.values().any(|vm| !vm.config.files.is_empty()),
        "a VM with write_files was checked"
    );
    assert!(
        desired.vms.values().any(|vm| !vm.config.users.is_empty()),
        "a VM with users was checked"
    );
}
