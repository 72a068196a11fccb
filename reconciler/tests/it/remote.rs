//! A fleet over this host's libvirtd and a second one reached as a remote host
//! (`second_host`: its own mount namespace, `qemu+ssh://` over loopback).

use std::path::Path;
use std::time::Duration;

#[path = "../../tools/src/second_host.rs"]
pub(crate) mod second_host;

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, enabled, virsh_ok};
use crate::support::{Repo, host_yaml, local_provider, micro_image};
use crate::tasks::{Status, field, task_yaml};
use second_host::{SECOND_HOST_STORAGE as REMOTE_STORAGE, SecondHost};

fn status_of(repo: &Repo, vm: &str) -> String {
    read(&repo.path().join(format!(".fleet/status/vms/{vm}.yaml")))
}

/// A fleet on the local libvirtd and a remote one over `qemu+ssh://`: a pool of 4 placed
/// over both is spread 2 + 2 and boots; a remote member's agent link runs through libvirt
/// (a task asks and is answered); fleet keeps no file of the remote members' agent links.
/// The remote host's libvirtd killed: its members are Unknown and made nowhere else, a new
/// member waits rather than risk a second copy, and a change of a local VM is applied.
/// libvirtd back: the members are found as they were, and the new one is placed.
#[test]
fn a_pool_spread_over_a_remote_host_runs_tasks_and_survives_its_outage() {
    if !enabled() {
        return;
    }
    let _ = micro_image();
    let prefix = format!("it{}-rh-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let (local_vm, pool) = (format!("{prefix}a"), format!("{prefix}p"));
    let member = |n: u32| format!("{pool}-0{n}");
    let remote = SecondHost::start().expect("the second libvirt host");
    let repo = Repo::new();
    repo.host_config(&host_yaml(
        &[
            local_provider(repo.path()),
            format!(
                "{{name: far, type: libvirt, uri: '{}', storageDir: '{REMOTE_STORAGE}'}}",
                remote.uri,
            ),
        ],
        "",
    ));
    let fleet = format!("it{}rh", std::process::id());
    repo.write(
        "fleet/fleet.yaml",
        crate::libvirt::fleet_yaml_with_policy(
            &fleet,
            "{shutdownTimeout: 10s, reconcileInterval: 3s}",
        )
        .replace(
            "    - {name: local, type: libvirt, domainType: qemu}\n",
            "    - {name: local, type: libvirt, domainType: qemu}\n    - {name: far, type: libvirt, domainType: qemu}\n",
        ),
    );
    let vm_yaml = |memory: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {local_vm}}}\nspec: {{provider: local, image: micro, resources: {{memory: {memory}}}}}\n"
        )
    };
    let pool_yaml = |replicas: u32| {
        format!(
            "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {pool}}}\nspec:\n  replicas: {replicas}\n  placement: {{providers: [local, far]}}\n  template:\n    spec: {{provider: local, image: micro, resources: {{memory: 256Mi}}}}\n"
        )
    };
    repo.write(&format!("fleet/vms/{local_vm}.yaml"), vm_yaml("256Mi"));
    repo.write(&format!("fleet/vms/{pool}.yaml"), pool_yaml(4));
    repo.write(
        "fleet/tasks/ask.yaml",
        task_yaml(
            "ask",
            &member(2),
            "  command: [sh, -c, \"printf 'Continue? (y/n) '; read a; echo answer=$a\"]\n",
        ),
    );
    repo.commit("a VM here, a pool over both hosts, a task on a remote member");
    let daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));

    // The task's question comes over the remote member's channel, and the answer goes back.
    wait_until("the remote task asks", Duration::from_secs(240), || {
        !status.prompts("ask").is_empty()
    });
    let prompt = status.prompts("ask")[0].clone();
    repo.fleet(&["hitl", "answer", &prompt, "yes"])
        .expect_code(0);
    status.wait_phase("ask", "Succeeded", Duration::from_secs(60));
    assert!(status.output("ask").contains("answer=yes"));
    // Spread 2 + 2, each member on its own host only, all running.
    let running_on_remote = |vm: &str| {
        String::from_utf8_lossy(&remote.virsh(&["domstate", vm]).expect("virsh").stdout).trim()
            == "running"
    };
    let here = |vm: &str| crate::libvirt::virsh(&["domstate", vm]).status.success();
    for n in [2, 4] {
        assert!(running_on_remote(&member(n)), "{} runs on far", member(n));
        assert!(!here(&member(n)), "{} is not here", member(n));
    }
    for n in [1, 3] {
        wait_until("a local member runs", Duration::from_secs(120), || {
            virsh_ok(&["domstate", &member(n)]).trim() == "running"
        });
        assert!(
            !remote
                .virsh(&["domstate", &member(n)])
                .expect("virsh")
                .status
                .success()
        );
    }
    let recorded = read(&repo.path().join(".fleet/status/placement.yaml"));
    assert!(
        recorded.contains(&format!("{}: far", member(2))),
        "{recorded}"
    );
    // fleet wrote no file for the remote members on its side: their overlays, seeds and
    // console logs are volumes of the remote host's pool, made through libvirt, in a
    // directory only that host's mount namespace has (its /var/lib/libvirt), and their
    // agent links are the libvirt connection.
    assert!(
        !Path::new(REMOTE_STORAGE).exists(),
        "{REMOTE_STORAGE} exists on fleet's side"
    );
    let remote_volumes = remote.storage().join(&fleet).join(".volumes");
    let local_storage = repo.path().join(".fleet/storage").join(&fleet);
    for n in [2, 4] {
        let prefix = format!(
            "{}.",
            fleet::driver::libvirt::volumes::vm_prefix(&fleet, &member(n))
        );
        let theirs: Vec<String> = crate::support::files_in(&remote_volumes)
            .into_iter()
            .filter(|f| f.starts_with(&prefix))
            .collect();
        // (The micro image boots from a kernel and initrd: no overlay.)
        assert_eq!(theirs, [format!("{prefix}seed.iso")]);
        assert_eq!(repo.vm_volumes(&fleet, &member(n)), Vec::<String>::new());
        assert!(!local_storage.join(member(n)).exists());
    }
    // Its console log is on that host, in `logs/` beside the pool's volumes (never a
    // volume: the guest writes it), and fleet does not read it from afar.
    let far_log =
        fleet::driver::libvirt::volumes::console_log_in(&remote_volumes, &fleet, &member(2));
    let text = read(&far_log);
    assert!(
        text.contains(&format!("userspace reached (vm={} ", member(2))),
        "{text}"
    );
    let far = fleet::driver::libvirt::LibvirtDriver::new(
        &fleet,
        &fleet::spec::LibvirtProvider {
            name: fleet::spec::Name("far".into()),
            uri: remote.uri.clone(),
            storage_dir: Some(fleet::spec::HostPath(REMOTE_STORAGE.into())),
            storage_pool: None,
            full_network: None,
        },
        fleet::spec::DomainType::Qemu,
        micro_image().0.parent().expect("image dir"),
    );
    assert_eq!(
        fleet::driver::Driver::console_log(&far, &member(2), 0, 1 << 20).expect("asked"),
        None
    );
    // `fleet console --follow` follows its console through libvirt instead, live.
    let (followed, said) = follow_console_while(&repo, &member(2), || {
        repo.fleet(&[
            "exec",
            &member(2),
            "--",
            "sh",
            "-c",
            "echo far-console-$((6 * 7)) > /dev/console",
        ])
        .expect_code(0);
    });
    assert!(
        followed.contains("far-console-42"),
        "stdout: {followed}\nstderr: {said}"
    );
    assert!(!followed.contains("$((6"), "{followed}");
    // The remote host has the image it boots from, shipped there.
    assert!(
        crate::support::files_in(&remote_volumes)
            .iter()
            .any(|f| f.starts_with("sha256-") && f.ends_with(".initrd.ok")),
        "{:?}",
        crate::support::files_in(&remote_volumes)
    );

    // The remote host's libvirtd goes away: its members are unknown, never made here, a
    // new member waits, and a change of the local VM is applied.
    remote.kill_libvirtd(false).expect("kill its libvirtd");
    repo.write(&format!("fleet/vms/{local_vm}.yaml"), vm_yaml("288Mi"));
    repo.write(&format!("fleet/vms/{pool}.yaml"), pool_yaml(5));
    repo.commit("more memory here, one more member");
    wait_until(
        "the local VM gets its memory",
        Duration::from_secs(120),
        || {
            virsh_ok(&["dumpxml", "--inactive", &local_vm])
                .contains("<memory unit='KiB'>294912</memory>")
        },
    );
    wait_until(
        "the remote members are unknown",
        Duration::from_secs(60),
        || {
            [2, 4].iter().all(|n| {
                field(&status_of(&repo, &member(*n)), "phase").as_deref() == Some("Unknown")
            })
        },
    );
    let far_status = status_of(&repo, &member(2));
    assert!(
        far_status.contains("type: ProviderObserved"),
        "{far_status}"
    );
    let plan = read(&repo.path().join(".fleet/status/plan.txt"));
    assert!(
        plan.contains(&format!("VM {} waits for a provider", member(5))),
        "{plan}"
    );
    for n in [2, 4, 5] {
        assert!(!here(&member(n)), "{} was made here", member(n));
    }

    // Back: the members are found as they were, running all along; the new one is placed
    // (spread: 2 and 2, so the first provider) and made.
    remote.start_libvirtd().expect("start its libvirtd");
    wait_until(
        "the remote members are seen again",
        Duration::from_secs(60),
        || {
            [2, 4].iter().all(|n| {
                field(&status_of(&repo, &member(*n)), "phase").as_deref() == Some("Running")
            })
        },
    );
    wait_until("the new member runs", Duration::from_secs(120), || {
        field(&status_of(&repo, &member(5)), "phase").as_deref() == Some("Running")
    });
    assert!(here(&member(5)));
    drop(daemon);
    repo.fleet(&["plan", "--detailed-exitcode"]).expect_code(0);
    for n in [2, 4] {
        assert!(running_on_remote(&member(n)));
    }
}

/// Runs `fleet console --follow VM` and, once it follows, `poke` every 2 s until it prints
/// `far-console-42` (at most 30 s: a line written while libvirt still connects the stream
/// to the console is not seen); what it printed, and what it said on stderr.
fn follow_console_while(repo: &Repo, vm: &str, poke: impl Fn()) -> (String, String) {
    use std::io::{BufRead, Read};
    let mut follow = std::process::Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .args(["console", "--follow", vm])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleet console --follow");
    let mut stderr = std::io::BufReader::new(follow.stderr.take().expect("stderr"));
    let mut said = String::new();
    stderr.read_line(&mut said).expect("read");
    assert!(
        said.contains("following what its console prints from now on"),
        "{said}"
    );
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let mut stdout = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("far-console-42") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        poke();
        let next = std::time::Instant::now() + Duration::from_secs(2);
        while !reader.is_finished() && std::time::Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = reader.join().expect("reader");
    said.push_str(&rest.join().expect("stderr reader"));
    (followed, said)
}
