//! A hostile guest against a real `fleet serve`: a VM whose agent is replaced by a script
//! speaking the protocol badly on purpose (`tests/hostile/agent.sh`: another VM's run
//! injected into, boot-id churn, floods of output, prompts and artifacts, a giant offset, a
//! link that stops reading). The other VM's run is untouched, the host stays within its
//! stated bounds, and the daemon keeps serving the other VM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, enabled};
use crate::support::{Repo, host_yaml, local_provider, micro_image};
use crate::tasks::{Status, field, task_yaml};

fn workspace() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An image root with the micro kernel, its initrd and one whose agent is the hostile script.
fn images(dir: &Path) {
    let (kernel, initrd) = micro_image();
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(&kernel, dir.join("vmlinuz")).expect("kernel");
    std::fs::copy(&initrd, dir.join("initrd.img")).expect("initrd");
    let built = dir.join("hostile-build");
    let out = Command::new(workspace().join("guest-agent/image/build-micro.sh"))
        .arg(&built)
        .env(
            "FLEET_AGENT_BIN",
            workspace().join("reconciler/tests/hostile/agent.sh"),
        )
        .output()
        .expect("build-micro.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(built.join("initrd.img"), dir.join("hostile.img")).expect("hostile initrd");
}

fn fleet_yaml(fleet: &str, victim_run: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {fleet}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img, cmdline: quiet}}\n    - {{name: hostile, kernel: vmlinuz, initrd: hostile.img, cmdline: 'quiet fleet.victim={victim_run}'}}\n  policy: {{shutdownTimeout: 5s, reconcileInterval: 30s}}\n"
    )
}

fn vm(name: &str, image: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: {image}, resources: {{memory: 256Mi}}}}\n"
    )
}

fn peak_rss_mib(pid: u32) -> f64 {
    read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[test]
fn a_hostile_guest_reaches_no_other_vm_and_stays_within_the_hosts_bounds() {
    if !enabled() {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("it{pid}-hostile-");
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{pid}hostile");
    let (victim_vm, hostile_vm) = (format!("{prefix}victim"), format!("{prefix}evil"));
    let repo = Repo::new();
    let image_root = repo.path().join("images");
    images(&image_root);
    repo.host_config(&host_yaml(
        &[local_provider(repo.path())],
        &format!("  imageRoot: '{}'\n", image_root.display()),
    ));
    repo.write("fleet/fleet.yaml", fleet_yaml(&fleet, "none"))
        .write(
            &format!("fleet/vms/{victim_vm}.yaml"),
            vm(&victim_vm, "micro"),
        )
        .write(
            "fleet/tasks/victim.yaml",
            task_yaml(
                "victim",
                &victim_vm,
                "  command: [sh, -c, 'sleep 40; echo victim-done']\n  artifacts: ['*.bin']\n",
            ),
        );
    repo.commit("the victim VM and its task");
    let daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("victim", "Running", Duration::from_secs(120));
    let run = field(&status.task("victim"), "run").expect("the victim's run id");
    let victim_run = format!("victim-{run}");

    // The hostile VM learns the victim's run name (from its kernel command line here; from
    // a leak in a real attack) and gets a task of its own.
    repo.write("fleet/fleet.yaml", fleet_yaml(&fleet, &victim_run))
        .write(
            &format!("fleet/vms/{hostile_vm}.yaml"),
            vm(&hostile_vm, "hostile"),
        )
        .write(
            "fleet/tasks/own.yaml",
            task_yaml("own", &hostile_vm, "  command: [sleep, '600']\n"),
        );
    repo.commit("a hostile VM");
    let console = repo.console_log(&fleet, &hostile_vm);
    wait_until("the hostile agent floods", Duration::from_secs(180), || {
        read(&console).contains("hostile: output flood sent")
    });

    // Meanwhile the daemon serves the victim's VM: a new task there runs at once.
    let asked = Instant::now();
    repo.write(
        "fleet/tasks/latency.yaml",
        task_yaml("latency", &victim_vm, "  command: [echo, fast]\n"),
    );
    repo.commit("a task on the victim VM during the attack");
    status.wait_phase("latency", "Succeeded", Duration::from_secs(120));
    let latency = asked.elapsed();
    wait_until(
        "the hostile agent is done",
        Duration::from_secs(300),
        || read(&console).contains("hostile: done"),
    );
    status.wait_phase("victim", "Succeeded", Duration::from_secs(120));
    let peak = peak_rss_mib(daemon.child.id());
    let log = daemon.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(daemon);
    eprintln!(
        "hostile guest: a task on the other VM took {latency:?} during the attack; fleet serve peaked at {peak:.0} MiB"
    );

    // The victim's run is its own: its output, no forged prompt, artifact or exit.
    let victim_output = status.output("victim");
    assert!(victim_output.contains("victim-done"), "{victim_output}");
    assert!(!victim_output.contains("injected"), "{victim_output}");
    assert!(status.prompts("victim").is_empty(), "no forged prompt");
    let victim_artifacts = repo.path().join(".fleet/status/tasks/victim/artifacts");
    assert!(!victim_artifacts.join("evil.bin").exists());
    assert_eq!(
        field(&status.task("victim"), "exitCode").as_deref(),
        Some("0")
    );

    // Its own run is bounded: 64 MiB of output, 1000 artifact files, no sparse file, 100
    // prompts; and it was said.
    let own_dir = repo.path().join(".fleet/status/tasks/own");
    let output_len = std::fs::metadata(own_dir.join("output.log"))
        .expect("output")
        .len();
    assert!(output_len <= 64 * 1024 * 1024, "{output_len} bytes kept");
    let own = status.task("own");
    assert!(own.contains("outputTruncated: true"), "{own}");
    assert!(own.contains("artifacts: more than 1000 artifacts"), "{own}");
    let files = std::fs::read_dir(own_dir.join("artifacts/many"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(files <= 1000, "{files} artifact files");
    let sparse = std::fs::metadata(own_dir.join("artifacts/sparse.bin")).map_or(0, |m| m.len());
    assert!(sparse < 1024, "a sparse file of {sparse} bytes");
    assert!(status.prompts("own").len() <= 100);
    assert!(
        log.contains("treating it as misbehaving"),
        "boot-id churn is reported"
    );
    assert!(peak < 512.0, "fleet serve peaked at {peak:.0} MiB");
    assert!(latency < Duration::from_secs(60), "{latency:?}");

    for name in [&victim_vm, &hostile_vm] {
        repo.remove(&format!("fleet/vms/{name}.yaml"));
    }
    repo.remove("fleet/tasks/victim.yaml")
        .remove("fleet/tasks/own.yaml")
        .remove("fleet/tasks/latency.yaml");
    repo.commit("empty");
    crate::approvals::apply_emptying(&repo);
}
