//! The trust boundary between a commit and the host (docs/security.md): what a committer or
//! a pull request can make fleet do on the host. Each test is one finding of the security
//! review, shown to fail on the code before the host configuration existed.

use std::path::Path;

use crate::support::{Repo, host_yaml, set_mode, test_driver_provider};

const VM: &str =
    "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: micro}\n";

fn fleet_yaml(provider: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: trust}}\nspec:\n  providers:\n    - {provider}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img}}\n"
    )
}

/// A repository whose host configuration puts `local` on libvirt's in-process test driver.
fn test_driver_repo() -> Repo {
    let repo = Repo::new();
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], ""));
    repo
}

#[test]
fn a_committed_connection_is_refused_and_never_opened() {
    let repo = test_driver_repo();
    // C1: libvirt's ext transport runs `command=`; fleet plan on a pull request used to run
    // it as root. C1 again: test:///FILE printed a host file's first line into the plan.
    let marker = repo.path().join("pwned");
    let hook = repo.path().join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\ntouch {}\n", marker.display())).expect("hook");
    set_mode(&hook, 0o755);
    // C2: a committed endpoint and token source; a listener stands in for the attacker.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let token = repo.path().join("token");
    std::fs::write(&token, "canary-token\n").expect("token");
    set_mode(&token, 0o600);
    for provider in [
        format!(
            "{{name: local, type: libvirt, uri: 'qemu+ext:///system?command={}'}}",
            hook.display()
        ),
        "{name: local, type: libvirt, uri: 'test:///etc/passwd'}".to_owned(),
        "{name: local, type: libvirt, uri: 'qemu+tcp://127.0.0.1/system'}".to_owned(),
        "{name: local, type: libvirt, storageDir: /}".to_owned(),
        format!(
            "{{name: local, type: proxmox, endpoint: 'https://127.0.0.1:{port}', node: pve1, insecureSkipVerify: true, token: {{id: 'a@pve!b', file: '{}'}}}}",
            token.display()
        ),
        "{name: local, type: proxmox, endpoint: 'https://127.0.0.1:1', node: pve1, token: {id: 'a@pve!b', env: HOME}}".to_owned(),
    ] {
        repo.write("fleet/fleet.yaml", fleet_yaml(&provider))
            .write("fleet/vms/a.yaml", VM);
        repo.commit("a provider of the committer's choosing");
        for command in [&["validate"][..], &["plan"], &["plan", "--worktree"]] {
            let out = repo.fleet(command);
            out.expect_code(1);
            let said = format!("{}{}", out.stdout(), out.stderr());
            assert!(
                said.contains("belongs in the host configuration, not the repository"),
                "{command:?} with {provider}: {said}"
            );
            assert!(!said.contains("root:"), "a host file leaked: {said}");
        }
    }
    assert!(!marker.exists(), "the committed command ran");
    assert!(
        listener.accept().is_err(),
        "the committed endpoint was contacted"
    );
}

#[test]
fn a_revision_cannot_name_what_the_host_does_not_define() {
    let repo = test_driver_repo();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: prod, type: libvirt}"),
    )
    .write(
        "fleet/vms/a.yaml",
        VM.replace("provider: local", "provider: prod"),
    );
    repo.commit("a provider the host does not have");
    let out = repo.fleet(&["plan"]);
    out.expect_code(1);
    assert!(
        out.stderr().contains(
            "fleet/fleet.yaml:6:14: error: spec.providers[0].name: the host configuration has no provider \"prod\" (it defines: local)"
        ),
        "{}",
        out.stderr()
    );
}

#[test]
fn the_host_configuration_must_belong_to_the_host() {
    let repo = test_driver_repo();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}"),
    )
    .write("fleet/vms/a.yaml", VM);
    repo.commit("one VM");
    repo.fleet(&["plan"]).expect_code(0);
    // Writable by others: anyone could point `local` elsewhere.
    set_mode(&repo.host_config_path(), 0o666);
    let out = repo.fleet(&["plan"]);
    out.expect_code(1);
    assert!(out.stderr().contains("chmod go-w"), "{}", out.stderr());
    set_mode(&repo.host_config_path(), 0o644);
    // Missing: plan refuses, validate checks the repository alone and says so.
    std::fs::remove_file(repo.host_config_path()).expect("remove");
    let out = repo.fleet(&["plan"]);
    out.expect_code(1);
    assert!(
        out.stderr().contains("no host configuration at"),
        "{}",
        out.stderr()
    );
    let out = repo.fleet(&["validate"]);
    out.expect_code(0);
    assert!(
        out.stderr().contains("checking the repository alone"),
        "{}",
        out.stderr()
    );
}

#[test]
fn image_files_never_leave_the_image_root() {
    let repo = test_driver_repo();
    let images = repo.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    // H3: a symlink inside the root that leads out of it (here to a file of the host).
    std::os::unix::fs::symlink("/etc/hostname", images.join("vmlinuz")).expect("symlink");
    std::fs::write(images.join("initrd.img"), b"initrd").expect("initrd");
    repo.host_config(&host_yaml(
        &[test_driver_provider(&repo)],
        &format!("  imageRoot: '{}'\n", images.display()),
    ));
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}"),
    )
    .write("fleet/vms/a.yaml", VM);
    repo.commit("a kernel that is a host file");
    let out = repo.fleet(&["apply", "--auto-approve"]);
    out.expect_code(1);
    let said = format!("{}{}", out.stdout(), out.stderr());
    assert!(
        said.contains("resolves to /etc/hostname, outside the image root"),
        "{said}"
    );
    // And the lexical half, before anything is contacted.
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}")
            .replace("kernel: vmlinuz", "kernel: ../../etc/hostname"),
    );
    repo.commit("a kernel above the root");
    let out = repo.fleet(&["validate"]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("spec.images[0].kernel: empty, `.` or `..` parts in a path"),
        "{}",
        out.stderr()
    );
}

#[test]
fn a_tampered_saved_plan_is_refused_and_changes_nothing() {
    let repo = test_driver_repo();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}"),
    )
    .write("fleet/vms/a.yaml", VM);
    repo.commit("one VM");
    let planfile = repo.path().join("plan.json");
    repo.fleet(&["plan", "--out", planfile.to_str().expect("utf8")])
        .expect_code(0);

    // H5: the step's VM renamed to a path, and the (unkeyed) digest recomputed, as anyone
    // with the plan file can.
    let text = std::fs::read_to_string(&planfile).expect("plan");
    let mut forged: serde_json::Value = serde_json::from_str(&text).expect("a plan");
    let step = &mut forged["steps"][0];
    assert!(
        step["desired"]["name"].is_string(),
        "a create carries its VM: {text}"
    );
    step["desired"]["name"] = "../escaped-by-plan".into();
    step["vm"] = "../escaped-by-plan".into();
    let plan: fleet::plan::Plan = serde_json::from_value(forged).expect("still a plan");
    let mut forged = serde_json::to_value(&plan).expect("json");
    forged["digest"] = plan.compute_digest().into();
    let plan: fleet::plan::Plan = serde_json::from_value(forged).expect("still a plan");
    assert_eq!(
        plan.digest(),
        plan.compute_digest(),
        "the forger's digest checks out"
    );
    std::fs::write(
        &planfile,
        serde_json::to_string_pretty(&plan).expect("json"),
    )
    .expect("write");

    let out = repo.fleet(&["apply", "--auto-approve", planfile.to_str().expect("utf8")]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("the saved plan does not match what fleet plans now"),
        "{}",
        out.stderr()
    );
    assert!(!out.stdout().contains("escaped"), "{}", out.stdout());
    let escaped: Vec<_> = walk(repo.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("escaped"))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");

    // An untouched saved plan still applies.
    repo.fleet(&["plan", "--out", planfile.to_str().expect("utf8")])
        .expect_code(0);
    repo.fleet(&["apply", "--auto-approve", planfile.to_str().expect("utf8")])
        .expect_code(0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn secrets_are_encrypted_only_to_recipients_the_host_names() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (mine, my_recipient) = crate::secrets::age_identity(keys.path(), "mine.key");
    let (theirs, their_recipient) = crate::secrets::age_identity(keys.path(), "theirs.key");
    let repo = test_driver_repo();
    repo.add_host_config(&format!("  recipients: [{my_recipient}]\n"));
    // M6: a merged commit lists the attacker as a recipient.
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}").replace(
            "  images:",
            &format!("  policy: {{recipients: [{their_recipient}]}}\n  images:"),
        ),
    );
    repo.commit("an extra recipient");
    let out = repo.fleet(&["validate"]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("spec.policy.recipients: belongs in the host configuration"),
        "{}",
        out.stderr()
    );
    crate::secrets::secret_set(&repo, "api", "token", "the-value");
    let armored =
        std::fs::read_to_string(repo.path().join("fleet/secrets/api.yaml")).expect("secret file");
    let block = armored_block(&armored);
    let open = |identity: &Path| {
        let keyring = fleet::secrets::Keyring::load(identity).expect("keyring");
        fleet::secrets::decrypt(&block, &keyring).is_ok()
    };
    assert!(open(&mine), "the host's recipient can read it");
    assert!(!open(&theirs), "the committed recipient cannot");

    // A recipient given on the command line that the host does not list needs a yes.
    let before = std::fs::read(repo.path().join("fleet/secrets/api.yaml")).expect("read");
    let out = std::process::Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .args(["secret", "rotate", "--recipient", &their_recipient])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .env("FLEET_AGE_IDENTITY", &mine)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("fleet secret rotate");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("+ {their_recipient}")), "{stderr}");
    assert!(stderr.contains("pass --yes"), "{stderr}");
    assert_eq!(
        std::fs::read(repo.path().join("fleet/secrets/api.yaml")).expect("read"),
        before,
        "nothing was re-encrypted"
    );
}

fn armored_block(file: &str) -> String {
    let start = file
        .find("-----BEGIN AGE ENCRYPTED FILE-----")
        .expect("armor");
    let end = file.find("-----END AGE ENCRYPTED FILE-----").expect("end")
        + "-----END AGE ENCRYPTED FILE-----".len();
    file[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// M7: a blob of 1 GiB of zeros compresses to about a MiB of git object; fleet learns its size
/// from the object header and never inflates it.
#[test]
fn a_git_blob_bomb_is_refused_without_inflating_it() {
    let repo = test_driver_repo();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}"),
    );
    let big = repo.path().join("fleet/vms/big.yaml");
    std::fs::create_dir_all(big.parent().expect("parent")).expect("mkdir");
    let file = std::fs::File::create(&big).expect("create");
    file.set_len(1 << 30).expect("a sparse 1 GiB file");
    drop(file);
    repo.commit("a bomb");
    std::fs::remove_file(&big).expect("the worktree copy is not needed");
    // Python measures the peak RSS of its child, fleet.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import resource, subprocess, sys\nr = subprocess.run(sys.argv[1:], capture_output=True, text=True)\nsys.stderr.write(r.stderr)\nprint(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
        ])
        .arg(crate::support::fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .arg("validate")
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut fields = stdout.split_whitespace();
    let code: i32 = fields
        .next()
        .and_then(|c| c.parse().ok())
        .expect("exit code");
    let peak_kib: u64 = fields
        .next()
        .and_then(|c| c.parse().ok())
        .expect("peak RSS");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("fleet/vms/big.yaml:1:1: error: file is larger than 1024 KiB"),
        "{stderr}"
    );
    assert!(
        peak_kib < 128 * 1024,
        "fleet validate peaked at {peak_kib} KiB: the blob was inflated"
    );
}

/// C3: fleet's storage is volumes of its own names in its pool. A directory where a VM's
/// files went before (not fleet's) and volumes fleet did not make, in the same pool (other
/// names, a VM's name with another UUID, a part fleet never makes), are never claimed,
/// chmodded or removed, while VMs are made and removed beside them.
#[test]
fn storage_fleet_did_not_make_is_never_taken() {
    if !crate::libvirt::enabled() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let prefix = format!("it{}-own-", std::process::id());
    let _cleanup = crate::libvirt::Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{}own", std::process::id());
    let [a, b] = ["a", "b"].map(|n| format!("{prefix}{n}"));
    let stopped = |name: &str| {
        crate::libvirt::vm_yaml(name, "128Mi")
            .replace("image: micro,", "image: micro, state: stopped,")
    };
    let repo = Repo::new();
    // Someone's directory where VM a's would have gone: private, holding data.
    let theirs = repo.vm_dir(&fleet, &a);
    std::fs::create_dir_all(&theirs).expect("mkdir");
    set_mode(&theirs, 0o700);
    std::fs::write(theirs.join("data.txt"), b"precious").expect("data");
    // Someone's volumes in fleet's pool, before fleet defines it.
    let pool = repo.volumes_dir(&fleet);
    std::fs::create_dir_all(&pool).expect("mkdir");
    let uuid = fleet::driver::libvirt::domain_uuid(&fleet, &a);
    let foreign = [
        "data.qcow2".to_owned(),
        format!("{a}.00000000-0000-0000-0000-000000000000.disk.qcow2"),
        format!("{a}.{uuid}.notes.txt"),
        format!(
            "{b}.{}.seed.iso",
            fleet::driver::libvirt::domain_uuid("other", &b)
        ),
    ];
    for name in &foreign {
        std::fs::write(pool.join(name), b"theirs").expect("foreign volume");
    }
    repo.write(
        "fleet/fleet.yaml",
        crate::libvirt::fleet_yaml_with_policy(&fleet, "{shutdownTimeout: 5s}"),
    );
    for vm in [&a, &b] {
        repo.write(&format!("fleet/vms/{vm}.yaml"), stopped(vm));
    }
    repo.commit("two stopped VMs, one where a directory already is");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let domains = crate::libvirt::virsh_ok(&["list", "--all", "--name"]);
    assert!(domains.lines().any(|d| d == a), "{domains}");
    assert!(domains.lines().any(|d| d == b), "{domains}");
    assert_eq!(
        repo.vm_volumes(&fleet, &a),
        [
            format!("{a}.{uuid}.notes.txt"),
            format!("{a}.{uuid}.seed.iso")
        ],
        "a's own volume beside the one fleet never makes"
    );
    // The console log, which the guest writes, is no volume: libvirt would read its header
    // (and open the backing file a guest-made qcow2 header names) when it refreshes the pool.
    // It goes to `logs/` (the VMs are stopped: the log daemon has written none yet).
    assert!(pool.join("logs").is_dir());
    assert!(
        !crate::support::files_in(&pool)
            .iter()
            .any(|f| f.contains("console"))
    );

    assert!(
        crate::support::files_in(&pool)
            .iter()
            .any(|f| f.starts_with("sha256-") && f.ends_with(".kernel.ok")),
        "the image was shipped into the pool"
    );
    // A rotation of b's console log (the log daemon's): fleet's, so it goes with b.
    let rotated = format!("{}.1", repo.console_log(&fleet, &b).display());
    std::fs::write(&rotated, b"old boot").expect("rotation");

    repo.remove(&format!("fleet/vms/{a}.yaml"))
        .remove(&format!("fleet/vms/{b}.yaml"));
    repo.commit("a and b go");
    crate::approvals::apply_emptying(&repo);
    let domains = crate::libvirt::virsh_ok(&["list", "--all", "--name"]);
    assert!(
        !domains.lines().any(|d| d.starts_with(&prefix)),
        "{domains}"
    );
    // fleet's VM volumes, the rotation and the images no VM uses any more are gone;
    // everything else stays.
    let mut expected = foreign.to_vec();
    expected.push("logs".to_owned());
    expected.sort();
    assert_eq!(
        crate::support::files_in(&pool),
        expected,
        "only fleet's own volumes were removed"
    );
    assert_eq!(
        crate::support::files_in(&pool.join("logs")),
        Vec::<String>::new(),
        "b's log and its rotation went with it"
    );
    for name in &foreign {
        assert_eq!(std::fs::read(pool.join(name)).expect("foreign"), b"theirs");
    }
    let mode = std::fs::metadata(&theirs)
        .expect("still there")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "not chmodded");
    assert_eq!(
        std::fs::read(theirs.join("data.txt")).expect("data"),
        b"precious"
    );
    assert!(!theirs.join("owner.json").exists(), "not claimed");
}

/// Capacity (`policy.overcommit`): a revision whose running VMs ask for more memory than
/// the host has is refused before anything of it is applied, with the host's figures.
#[test]
fn a_revision_that_does_not_fit_its_host_is_refused() {
    let repo = test_driver_repo();
    // libvirt's test driver has 3 GiB and 16 CPUs.
    let vm = |name: &str, memory: &str, state: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro, state: {state}, resources: {{memory: {memory}}}}}\n"
        )
    };
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml("{name: local, type: libvirt}"),
    )
    .write("fleet/vms/a.yaml", vm("a", "2Gi", "running"))
    .write("fleet/vms/b.yaml", vm("b", "2Gi", "running"));
    repo.commit("4 GiB of running VMs on a 3 GiB host");
    for command in [&["plan"][..], &["apply", "--auto-approve"]] {
        let run = repo.fleet(command);
        run.expect_code(1);
        assert!(
            run.stderr()
                .contains("its 2 running VMs ask for 4096 MiB of memory; the host has 3072 MiB"),
            "{command:?}: {}",
            run.stderr()
        );
    }
    // Stopped VMs take nothing; and an operator may allow overcommitting memory.
    repo.write("fleet/vms/b.yaml", vm("b", "2Gi", "stopped"));
    repo.commit("one of them stopped");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    repo.write("fleet/vms/b.yaml", vm("b", "2Gi", "running"))
        .write(
            "fleet/fleet.yaml",
            fleet_yaml("{name: local, type: libvirt}") + "  policy: {overcommit: {memory: 1.5}}\n",
        );
    repo.commit("memory overcommitted on purpose");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
}
