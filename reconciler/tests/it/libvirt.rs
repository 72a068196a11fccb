//! Real libvirtd, real QEMU (TCG), real git: the foundation's proof, as one story.
//!
//! Runs when `FLEET_TEST_LIBVIRT=1` (set by `make test` and CI); then a missing libvirtd
//! or guest image fails the test rather than skipping it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Repo, micro_image};

pub const URI: &str = "qemu:///system";

pub fn enabled() -> bool {
    if std::env::var("FLEET_TEST_LIBVIRT").ok().as_deref() == Some("1") {
        true
    } else {
        eprintln!("real libvirt tests skipped: set FLEET_TEST_LIBVIRT=1 (make test does)");
        false
    }
}

pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh")
}

pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn domain_exists(name: &str) -> bool {
    virsh(&["domstate", name]).status.success()
}

/// Removes every domain whose name starts with the test's prefix, even when a test fails.
/// The domains whose names start with `prefix`, running or not, sorted.
pub fn domains(prefix: &str) -> Vec<String> {
    let out = virsh(&["list", "--all", "--name"]);
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

pub struct Cleanup {
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let names = virsh(&["list", "--all", "--name"]);
        for name in String::from_utf8_lossy(&names.stdout).lines() {
            if name.starts_with(&self.prefix) {
                let _ = virsh(&["destroy", name]);
                let _ = virsh(&["undefine", name]);
            }
        }
        // The storage pools of test fleets whose directories, in a temporary directory,
        // went with their repositories (a test's repository is dropped before its
        // cleanup); those of tests still running keep theirs.
        let pools = virsh(&["pool-list", "--all", "--name"]);
        // (virsh pads the names it lists.)
        for pool in String::from_utf8_lossy(&pools.stdout)
            .lines()
            .map(str::trim)
        {
            if !pool.starts_with("fleet-") {
                continue;
            }
            let xml = String::from_utf8_lossy(&virsh(&["pool-dumpxml", pool]).stdout).into_owned();
            let dir = xml
                .split_once("<path>")
                .and_then(|(_, rest)| rest.split_once("</path>"))
                .map(|(path, _)| path.to_owned());
            let temporary = std::env::temp_dir();
            if dir.is_some_and(|d| Path::new(&d).starts_with(&temporary) && !Path::new(&d).exists())
            {
                let _ = virsh(&["pool-destroy", pool]);
                let _ = virsh(&["pool-undefine", pool]);
            }
        }
    }
}

/// A fleet.yaml for real libvirt with the micro image (the test repository's host
/// configuration defines `local` and the image root); `policy` is a YAML flow mapping.
pub fn fleet_yaml_with_policy(fleet: &str, policy: &str) -> String {
    // Fails early, with the fix, when the image was not built.
    let _ = micro_image();
    format!(
        "apiVersion: fleet/v1
kind: Fleet
metadata: {{name: {fleet}}}
spec:
  providers:
    - {{name: local, type: libvirt, domainType: qemu}}
  images:
    - {{name: micro, kernel: vmlinuz, initrd: initrd.img, cmdline: quiet}}
  policy: {policy}
"
    )
}

fn fleet_yaml(fleet: &str) -> String {
    fleet_yaml_with_policy(fleet, "{shutdownTimeout: 15s, stepTimeout: 2m}")
}

pub fn vm_yaml(name: &str, memory: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro, resources: {{memory: {memory}}}}}\n"
    )
}

/// Waits until the VM's serial console log (its volume in the fleet's pool) shows the
/// guest's userspace marker more than `since` times.
fn wait_for_userspace(repo: &Repo, fleet: &str, vm: &str, since: usize) -> usize {
    let log = repo.console_log(fleet, vm);
    let marker = format!("userspace reached (vm={vm} ");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let count = text.matches(&marker).count();
        if count > since {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} did not reach userspace; console log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_fleet_on_real_libvirt_from_git_commits() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-story-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{}", std::process::id());
    let [a, b, c, clash] = ["a", "b", "c", "clash"].map(|n| format!("{prefix}{n}"));

    // A foreign domain, defined behind fleet's back, whose name a later commit claims.
    let foreign_xml = format!(
        "<domain type='qemu'><name>{clash}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    );
    let foreign_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(foreign_file.path(), &foreign_xml).expect("write");
    virsh_ok(&["define", foreign_file.path().to_str().expect("utf8")]);
    let foreign_before = virsh_ok(&["dumpxml", &clash]);

    let repo = Repo::new();
    repo.write("fleet/fleet.yaml", fleet_yaml(&fleet));
    for vm in [&a, &b, &c] {
        repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(vm, "192Mi"));
    }
    repo.commit("three VMs");

    // 1. Apply: three domains, each guest reaches userspace.
    let applied = repo.fleet(&["apply", "--auto-approve"]);
    applied.expect_code(0);
    assert!(
        applied.stdout().contains("Plan: 3 to create."),
        "{}",
        applied.stdout()
    );
    for vm in [&a, &b, &c] {
        wait_for_userspace(&repo, &fleet, vm, 0);
        assert_eq!(virsh_ok(&["domstate", vm]).trim(), "running");
        // The guest read its NoCloud seed: the instance id is the domain's UUID.
        let uuid = virsh_ok(&["domuuid", vm]).trim().to_owned();
        let log = std::fs::read_to_string(repo.console_log(&fleet, vm)).expect("console log");
        // (The guest names disks in probe order, so the device name is not checked.)
        assert!(log.contains("fleet-guest: seed cidata on /dev/vd"), "{log}");
        assert!(log.contains(&format!("(instance-id={uuid})")), "{log}");
    }

    // 1b. Each guest's agent says hello over its virtio-serial channel.
    let driver = fleet::driver::libvirt::LibvirtDriver::new(
        &fleet,
        &fleet::spec::LibvirtProvider {
            name: fleet::spec::Name("local".into()),
            uri: URI.into(),
            storage_dir: Some(fleet::spec::HostPath(
                repo.path().join(".fleet/storage").display().to_string(),
            )),
            storage_pool: None,
            full_network: None,
        },
        fleet::spec::DomainType::Qemu,
        micro_image().0.parent().expect("image dir"),
    );
    let mut boot_ids = Vec::new();
    for vm in [&a, &b, &c] {
        use fleet::driver::Driver;
        let endpoint = driver
            .agent_endpoint(vm)
            .expect("endpoint")
            .expect("a running VM has an agent link");
        let mut link = fleet::agent_link::AgentLink::connect(&endpoint).expect("connect");
        match link.hello(Duration::from_secs(60)).expect("hello") {
            fleet_agent_protocol::GuestMessage::Hello { v, boot_id, .. } => {
                assert_eq!(v, fleet_agent_protocol::VERSION);
                assert!(!boot_id.is_empty());
                boot_ids.push(boot_id);
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }
    boot_ids.dedup();
    assert_eq!(boot_ids.len(), 3, "three guests, three boots");

    // The agent runs a command in a terminal inside the guest and reports its output and
    // exit code.
    {
        use fleet::driver::Driver;
        use fleet_agent_protocol::{ExitReason, GuestMessage, HostMessage, VERSION};
        let endpoint = driver.agent_endpoint(&a).expect("endpoint").expect("link");
        let mut link = fleet::agent_link::AgentLink::connect(&endpoint).expect("connect");
        link.send(&HostMessage::RunTask {
            v: VERSION,
            task: "probe".into(),
            boot_id: None,
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo from-$(hostname); exit 7".into(),
            ],
            env: Default::default(),
            cwd: None,
            timeout_secs: Some(30),
            artifacts: Vec::new(),
            prompt_patterns: Vec::new(),
            secret_env: Default::default(),
            secret_files: Vec::new(),
            results: None,
        })
        .expect("send");
        let mut output = String::new();
        let exit = loop {
            match link.next(Duration::from_secs(60)).expect("a message") {
                GuestMessage::Output { task, data, .. } if task == "probe" => {
                    output.push_str(&data)
                }
                GuestMessage::Exit {
                    task, code, reason, ..
                } if task == "probe" => break (code, reason),
                _ => {}
            }
        };
        assert_eq!(exit, (Some(7), ExitReason::Completed), "{output}");
        assert!(output.contains(&format!("from-{a}")), "{output:?}");
    }

    // 2. Converged: the next plan has no changes.
    let again = repo.fleet(&["plan", "--detailed-exitcode"]);
    again.expect_code(0);
    assert!(again.stdout().contains("No changes"), "{}", again.stdout());

    // 3. A VM whose name a foreign domain holds: a reported conflict, never touched.
    repo.write(&format!("fleet/vms/{clash}.yaml"), vm_yaml(&clash, "192Mi"));
    repo.commit("claim a name that is taken");
    let conflict = repo.fleet(&["plan", "--detailed-exitcode"]);
    conflict.expect_code(1);
    assert!(
        conflict.stdout().contains(&format!(
            "!   {clash} on local: a VM named \"{clash}\" already exists and was not made by fleet"
        )),
        "{}",
        conflict.stdout()
    );
    repo.fleet(&["apply", "--auto-approve"]).expect_code(1);
    assert_eq!(
        virsh_ok(&["dumpxml", &clash]),
        foreign_before,
        "the foreign domain is untouched"
    );
    let status =
        std::fs::read_to_string(repo.path().join(format!(".fleet/status/vms/{clash}.yaml")))
            .expect("status of the conflicting VM");
    assert!(status.contains("Conflict"), "{status}");

    // 4. Delete one VM's file: exactly one destroy, and only that domain and its files go.
    repo.remove(&format!("fleet/vms/{clash}.yaml"));
    repo.remove(&format!("fleet/vms/{c}.yaml"));
    repo.commit("drop c");
    let plan: serde_json::Value =
        serde_json::from_str(&repo.fleet(&["plan", "--json"]).stdout()).expect("json");
    let steps = plan["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "{plan:#}");
    assert_eq!(
        (steps[0]["action"].as_str(), steps[0]["vm"].as_str()),
        (Some("destroy"), Some(c.as_str()))
    );
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(!domain_exists(&c), "{c} is gone");
    assert_eq!(
        repo.vm_volumes(&fleet, &c),
        Vec::<String>::new(),
        "its volumes are gone"
    );
    for vm in [&a, &b] {
        assert_eq!(
            virsh_ok(&["domstate", vm]).trim(),
            "running",
            "{vm} untouched"
        );
    }

    // 5. Change a VM's memory: an in-place update that restarts it, with the reason.
    repo.write(&format!("fleet/vms/{a}.yaml"), vm_yaml(&a, "256Mi"));
    repo.commit("more memory for a");
    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout().contains(&format!(
            "update   {a}  on local: memoryMiB 192 → 256 (restarts the running VM)"
        )),
        "{}",
        plan.stdout()
    );
    assert!(
        plan.stdout().contains("-memoryMiB: 192\n+memoryMiB: 256"),
        "the diff shows it: {}",
        plan.stdout()
    );
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(
        virsh_ok(&["dominfo", &a]).contains("262144 KiB"),
        "{}",
        virsh_ok(&["dominfo", &a])
    );
    // The console log is rewritten at each boot: the marker shows the restarted guest.
    wait_for_userspace(&repo, &fleet, &a, 0);
    repo.fleet(&["plan", "--detailed-exitcode"]).expect_code(0);

    // 6. The journal is clean, the foreign domain still untouched.
    let journal =
        std::fs::read_to_string(repo.path().join(".fleet/status/journal.jsonl")).expect("journal");
    assert_eq!(journal, "", "no open intents");
    assert_eq!(virsh_ok(&["dumpxml", &clash]), foreign_before);

    // 7. Emptying the fleet removes what fleet made, and nothing else.
    repo.remove(&format!("fleet/vms/{a}.yaml"));
    repo.remove(&format!("fleet/vms/{b}.yaml"));
    repo.commit("empty");
    crate::approvals::apply_emptying(&repo);
    assert!(!domain_exists(&a) && !domain_exists(&b));
    assert!(domain_exists(&clash), "the foreign domain survives");
}

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The backing file of a qcow2 overlay.
fn backing_file(overlay: &Path) -> String {
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        "-U",
        overlay.to_str().expect("utf8"),
    ]))
    .expect("json");
    info["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn disk_images_get_overlays_and_a_new_base_disk_replaces_the_vm() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-disk-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let fleet_name = format!("it{}disk", std::process::id());
    let repo = Repo::new();
    // An image root of the test's own: the micro kernel and initrd beside two base disks.
    let images = repo.path().join("images");
    let bases = images.join("bases");
    std::fs::create_dir_all(&bases).expect("mkdir");
    let (kernel, initrd) = micro_image();
    std::fs::copy(&kernel, images.join("vmlinuz")).expect("copy kernel");
    std::fs::copy(&initrd, images.join("initrd.img")).expect("copy initrd");
    repo.host_config(&crate::support::host_yaml(
        &[crate::support::local_provider(repo.path())],
        &format!("  imageRoot: '{}'\n", images.display()),
    ));
    for base in ["one", "two"] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            bases.join(format!("{base}.qcow2")).to_str().expect("utf8"),
            "64M",
        ]);
    }
    // A base disk whose backing file lies outside the image root (a host file QEMU would
    // then read for the guest), and one with an external data file.
    let outside = repo.path().join("outside.raw");
    std::fs::write(&outside, vec![0u8; 1 << 20]).expect("outside file");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        outside.to_str().expect("utf8"),
        bases.join("sneaky.qcow2").to_str().expect("utf8"),
    ]);
    let fleet = |disk: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {fleet_name}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img, disk: bases/{disk}.qcow2}}\n  policy: {{shutdownTimeout: 15s}}\n"
        )
    };
    repo.write("fleet/fleet.yaml", fleet("sneaky"));
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!("apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, resources: {{memory: 192Mi, disk: 2Gi}}}}\n"),
    );
    repo.commit("a VM on a base disk that reaches outside the image root");
    let refused = repo.fleet(&["apply", "--auto-approve"]);
    assert_ne!(refused.code(), 0, "{}", refused.stdout());
    let said = format!("{}{}", refused.stdout(), refused.stderr());
    assert!(
        said.contains("sneaky.qcow2: it has a backing file"),
        "{said}"
    );
    assert!(!domain_exists(&vm), "no domain was made");
    repo.write("fleet/fleet.yaml", fleet("one"));
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!("apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, resources: {{memory: 192Mi, disk: 2Gi}}}}\n"),
    );
    repo.commit("a VM on a disk image");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    // The overlay is a volume in the pool, on the base disk shipped there, named by its
    // content.
    let overlay = repo.vm_volume(&fleet_name, &vm, "disk.qcow2");
    let shipped = |base: &str| {
        let digest =
            fleet::image_content::file_digest(&bases.join(format!("{base}.qcow2"))).expect("sha");
        repo.volumes_dir(&fleet_name)
            .join(format!("sha256-{digest}.{fleet_name}.qcow2"))
            .display()
            .to_string()
    };
    let disk_images = || -> Vec<String> {
        crate::support::files_in(&repo.volumes_dir(&fleet_name))
            .into_iter()
            .filter(|f| f.starts_with("sha256-") && f.ends_with(".qcow2"))
            .collect()
    };
    assert_eq!(backing_file(&overlay), shipped("one"));
    assert!(virsh_ok(&["domblklist", &vm]).contains("disk.qcow2"));
    wait_for_userspace(&repo, &fleet_name, &vm, 0);

    repo.write("fleet/fleet.yaml", fleet("two"));
    repo.commit("a new base disk");
    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout().contains(&format!(
            "-/+ replace  {vm}  on local: image.disk changed, which forces replacement (a new base disk needs a new overlay)"
        )),
        "{}",
        plan.stdout()
    );
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert_eq!(backing_file(&overlay), shipped("two"));
    // The first base's volume went with its last VM.
    assert_eq!(disk_images().len(), 1, "{:?}", disk_images());
    wait_for_userspace(&repo, &fleet_name, &vm, 0);
    repo.fleet(&["plan", "--detailed-exitcode"]).expect_code(0);

    // The same base disk rebuilt in place (same path, new content: an image build writes a
    // new file and renames it over the old, which the running VM still has open), with no
    // commit: the overlay on it would read another disk, so the plan replaces the VM.
    let rebuilt = bases.join("two.qcow2.new");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        rebuilt.to_str().expect("utf8"),
        "96M",
    ]);
    std::fs::rename(&rebuilt, bases.join("two.qcow2")).expect("rename over the base");

    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout().contains(&format!(
            "-/+ replace  {vm}  on local: image.diskSha256 changed"
        )) && plan.stdout().contains("image content changed"),
        "{}",
        plan.stdout()
    );
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    repo.fleet(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert_eq!(
        backing_file(&overlay),
        shipped("two"),
        "the rebuilt disk, shipped"
    );
    assert_eq!(disk_images().len(), 1, "{:?}", disk_images());
    // A kernel rebuilt in place restarts the VM instead.
    let mut rebuilt = std::fs::read(images.join("initrd.img")).expect("initrd");
    rebuilt.extend_from_slice(&[0u8; 512]);
    std::fs::write(images.join("initrd.img"), rebuilt).expect("rebuild initrd");

    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout()
            .contains(&format!("~   update   {vm}  on local: image.bootSha256"))
            && plan.stdout().contains("(restarts the running VM)"),
        "{}",
        plan.stdout()
    );

    repo.remove(&format!("fleet/vms/{vm}.yaml"));
    repo.commit("gone");
    crate::approvals::apply_emptying(&repo);
    assert!(!overlay.exists() && !domain_exists(&vm));
    assert_eq!(
        crate::support::files_in(&repo.volumes_dir(&fleet_name)),
        ["logs"],
        "the VM's volumes and the images it used are gone"
    );
    assert_eq!(
        crate::support::files_in(&repo.volumes_dir(&fleet_name).join("logs")),
        Vec::<String>::new(),
        "and its console log"
    );
    assert!(
        bases.join("one.qcow2").exists() && bases.join("two.qcow2").exists(),
        "base disks are never touched"
    );
}

#[test]
fn an_interrupted_create_is_recovered_without_a_duplicate() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-crash-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{}crash", std::process::id());
    let (made, half) = (format!("{prefix}made"), format!("{prefix}half"));
    let repo = Repo::new();
    repo.write("fleet/fleet.yaml", fleet_yaml(&fleet));
    repo.write(&format!("fleet/vms/{made}.yaml"), vm_yaml(&made, "192Mi"));
    repo.commit("one VM");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let uuid_before = virsh_ok(&["domuuid", &made]);

    // Simulate fleet killed in the middle of three creates: one whose domain was defined (the
    // journal never got its outcome), one that had only made its directory, and one killed
    // while writing its owner marker, for a VM the new revision no longer has.
    let dropped = format!("{prefix}dropped");
    repo.write(&format!("fleet/vms/{half}.yaml"), vm_yaml(&half, "192Mi"));
    repo.commit("a second VM");
    let journal = repo.path().join(".fleet/status/journal.jsonl");
    let intent = |op: u32, vm: &str| {
        format!(
            "{{\"record\":\"intent\",\"op\":{op},\"provider\":\"local\",\"vm\":\"{vm}\",\"action\":\"create\",\"revision\":\"x\",\"time\":\"t\"}}\n"
        )
    };
    let intents = intent(1, &made) + &intent(2, &half) + &intent(3, &dropped);
    std::fs::write(&journal, intents).expect("journal");
    let marker_cut_short = repo.vm_dir(&fleet, &dropped);
    std::fs::create_dir_all(&marker_cut_short).expect("mkdir");
    std::fs::write(marker_cut_short.join(".owner.json.tmp-Q1w2E3"), b"{\"fle").expect("temp");
    let leftover = repo.vm_dir(&fleet, &half);
    std::fs::create_dir_all(&leftover).expect("mkdir");
    std::fs::write(
        leftover.join("owner.json"),
        format!("{{\"fleet\":\"{fleet}\",\"vm\":\"{half}\",\"uuid\":\"u\"}}"),
    )
    .expect("marker");
    std::fs::write(leftover.join("disk.qcow2"), b"half-written").expect("leftover");

    let out = repo.fleet(&["apply", "--auto-approve"]);
    out.expect_code(0);
    assert!(
        out.stderr()
            .contains(&format!("journal: recovered interrupted create of {half}")),
        "{}",
        out.stderr()
    );
    assert!(
        out.stdout().contains("Plan: 1 to create."),
        "only the missing VM is created: {}",
        out.stdout()
    );
    assert_eq!(
        virsh_ok(&["domuuid", &made]),
        uuid_before,
        "the VM made before the crash is kept, not duplicated"
    );
    assert!(
        !leftover.join("disk.qcow2").exists(),
        "the half-made file was cleared"
    );
    assert!(
        !marker_cut_short.exists(),
        "a directory holding only a cut-short marker write is removed"
    );
    let names = virsh_ok(&["list", "--all", "--name"]);
    assert_eq!(
        names.lines().filter(|n| n.starts_with(&prefix)).count(),
        2,
        "{names}"
    );
    assert_eq!(
        std::fs::read_to_string(&journal).expect("journal"),
        "",
        "the journal is clean"
    );

    repo.remove(&format!("fleet/vms/{made}.yaml"));
    repo.remove(&format!("fleet/vms/{half}.yaml"));
    repo.commit("empty");
    crate::approvals::apply_emptying(&repo);
}

/// A repository under a directory QEMU's user cannot enter (a checkout under `/root`, a
/// `mktemp -d`): plan and apply say so up front, naming the directory, QEMU's user and the
/// fix; nothing is defined, nothing is retried, and nothing is called drift.
#[test]
fn storage_out_of_qemus_reach_is_a_clear_error_not_drift() {
    if !enabled() {
        return;
    }
    let prefix = "itreach";
    let _cleanup = Cleanup {
        prefix: prefix.into(),
    };
    let repo = Repo::new();
    crate::support::set_mode(repo.path(), 0o700);
    let name = format!("{prefix}-a");
    repo.write("fleet/fleet.yaml", fleet_yaml(prefix))
        .write("fleet/vms/a.yaml", vm_yaml(&name, "128Mi"));
    repo.commit("a VM whose storage QEMU cannot reach");

    let plan = repo.fleet(&["plan"]);
    let text = format!("{}{}", plan.stdout(), plan.stderr());
    let private = repo.path().display().to_string();
    assert!(
        text.contains(&format!("cannot enter {private} (mode 0700")),
        "{text}"
    );
    assert!(text.contains("QEMU runs as libvirt-qemu"), "{text}");
    assert!(text.contains(&format!("chmod o+x {private}")), "{text}");
    assert!(!text.contains("to create"), "nothing is planned: {text}");

    for _ in 0..2 {
        let apply = repo.fleet(&["apply", "--auto-approve"]);
        assert_ne!(apply.code(), 0, "{}", apply.stdout());
    }
    assert!(!domain_exists(&name), "no domain was defined");
    let events =
        std::fs::read_to_string(repo.path().join(".fleet/status/events.jsonl")).unwrap_or_default();
    assert!(!events.contains("vm.drifted"), "{events}");
    assert!(!events.contains("outside fleet"), "{events}");
    assert!(
        !events.contains("step.failed"),
        "no step was tried: {events}"
    );

    // Once QEMU may enter, the same revision converges.
    crate::support::set_mode(repo.path(), 0o711);
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(domain_exists(&name));
    repo.remove("fleet/vms/a.yaml");
    repo.commit("gone");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
}

/// `fleet adopt`: a domain fleet did not make gets a VM file that validates, the domain
/// untouched; once the file is committed, `--approve` stamps it and the plan is empty; a
/// change of its file then remakes it (an adopted VM's disks are not fleet's to edit),
/// held by `protect`.
#[test]
fn a_foreign_domain_is_adopted_only_when_approved() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-adopt-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let legacy = format!("{prefix}legacy");
    let xml = format!(
        "<domain type='qemu'><name>{legacy}</name><memory unit='MiB'>128</memory><vcpu>2</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &xml).expect("write");
    virsh_ok(&["define", file.path().to_str().expect("utf8")]);
    let before = virsh_ok(&["dumpxml", "--inactive", &legacy]);

    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml(&format!("it{}adopt", std::process::id())),
    );
    repo.commit("a fleet with no VM yet");
    // Another fleet's or a missing domain is refused.
    repo.fleet(&["adopt", "local", &format!("{prefix}none")])
        .expect_code(1);

    let proposed = repo.fleet(&["adopt", "local", &legacy]);
    proposed.expect_code(0);
    assert!(
        proposed
            .stdout()
            .contains("fleet would change nothing about it"),
        "{}",
        proposed.stdout()
    );
    let written = std::fs::read_to_string(repo.path().join(format!("fleet/vms/{legacy}.yaml")))
        .expect("the VM file");
    assert!(
        written.contains("resources: {cpus: 2, memory: 128Mi}"),
        "{written}"
    );
    assert!(written.contains("state: stopped") && written.contains("protect: true"));
    repo.fleet(&["validate", "--worktree"]).expect_code(0);
    assert_eq!(
        virsh_ok(&["dumpxml", "--inactive", &legacy]),
        before,
        "untouched before approval"
    );
    // Approving before the file is committed is refused, and touches nothing.
    repo.fleet(&["adopt", "local", &legacy, "--approve"])
        .expect_code(1);
    assert_eq!(virsh_ok(&["dumpxml", "--inactive", &legacy]), before);
    // A committed file that would stamp it unprotected is refused.
    repo.write(
        &format!("fleet/vms/{legacy}.yaml"),
        written.replace("protect: true", "protect: false"),
    );
    repo.commit("adopt legacy, unprotected");
    let unprotected = repo.fleet(&["adopt", "local", &legacy, "--approve"]);
    unprotected.expect_code(1);
    assert!(
        unprotected.stderr().contains("protect: true"),
        "{}",
        unprotected.stderr()
    );
    assert_eq!(virsh_ok(&["dumpxml", "--inactive", &legacy]), before);
    repo.write(&format!("fleet/vms/{legacy}.yaml"), &written);
    repo.commit("adopt legacy");
    let approved = repo.fleet(&["adopt", "local", &legacy, "--approve"]);
    approved.expect_code(0);
    let stamped = virsh_ok(&["dumpxml", "--inactive", &legacy]);
    assert!(
        stamped.contains("<fleet:adopted>true</fleet:adopted>"),
        "{stamped}"
    );
    // The event made `.fleet` private (0750); this test keeps VM storage under it, where
    // QEMU's user must pass.
    crate::support::set_mode(&repo.path().join(".fleet"), 0o755);
    repo.fleet(&["plan", "--detailed-exitcode"]).expect_code(0);
    assert!(repo.fleet(&["events"]).stdout().contains("adopted by"));
    // Adopted already: a second adopt says so.
    repo.fleet(&["adopt", "local", &legacy]).expect_code(1);

    // A change remakes it from its image, and protect holds that for an approval.
    repo.write(
        &format!("fleet/vms/{legacy}.yaml"),
        written.replace("memory: 128Mi", "memory: 192Mi"),
    );
    repo.commit("more memory");
    let plan = repo.fleet(&["plan"]).stdout();
    assert!(
        plan.contains(&format!("replace  {legacy}")) && plan.contains("is protected"),
        "{plan}"
    );
    let applied = repo.fleet(&["apply", "--auto-approve"]);
    assert!(
        virsh_ok(&["dumpxml", "--inactive", &legacy])
            .contains("<fleet:adopted>true</fleet:adopted>"),
        "held, not replaced: {}",
        applied.stdout()
    );
}
