//! Getting into a VM (libvirt, the micro image, the real agent, `fleet serve`): `fleet exec`
//! through the daemon's agent link, with output, errors, exit codes and input passed
//! through, a large output kept to the link's credit, a terminal under tmux that follows a
//! resize, refusals for VMs fleet does not manage, and events that say who ran what and
//! never what it printed. `fleet console` under tmux shows the guest's shell prompt, types
//! into it and leaves with Ctrl-]; `--follow` prints the log without escape sequences. A VM with a NIC shows the address its agent reports (status file,
//! `fleet status`, the page); one without shows none.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, http, read, wait_until};
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, vm_yaml};
use crate::support::{Repo, fleet_bin};

/// `fleet exec` with `stdin` fed to it: (code, stdout, stderr).
fn exec(repo: &Repo, args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = Command::new(fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .arg("exec")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleet exec");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = feeder.join();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fleet_exec_runs_commands_in_a_guest_over_its_link() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-exec-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}exec", std::process::id()),
            "{shutdownTimeout: 10s}",
        ),
    );
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "256Mi"));
    // A VM with a NIC, on fleet's NAT network: its agent reports the address DHCP gave it.
    let wired = format!("{prefix}b");
    repo.write(
        &format!("fleet/vms/{wired}.yaml"),
        vm_yaml(&wired, "256Mi").replace("image: micro,", "image: micro, network: {mode: full},"),
    );
    repo.commit("two VMs");
    let daemon = Daemon::start(&repo);
    let status = repo.path().join(".fleet/status");
    wait_until("the agent says hello", Duration::from_secs(120), || {
        read(&status.join(format!("vms/{vm}.yaml"))).contains("connected: true")
    });
    wait_until(
        "the wired VM's address shows in its status",
        Duration::from_secs(120),
        || read(&status.join(format!("vms/{wired}.yaml"))).contains("192.168.150."),
    );
    let wired_status = read(&status.join(format!("vms/{wired}.yaml")));
    let address = wired_status
        .split("192.168.150.")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(|host| format!("192.168.150.{host}"))
        .expect("an address");
    assert!(wired_status.contains("mac: 52:54:00:"), "{wired_status}");
    let listed = repo.fleet(&["status"]).stdout();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&wired) && l.contains(&address)),
        "{listed}"
    );
    let (code, page) = http(daemon.port, "GET", &format!("/vms/{wired}"));
    assert_eq!(code, 200);
    assert!(page.contains(&address), "{page}");
    assert!(
        !read(&status.join(format!("vms/{vm}.yaml"))).contains("192.168.150."),
        "an isolated VM has no address"
    );

    // Output, errors and the exit code pass through.
    let (code, out, err) = exec(
        &repo,
        &[&vm, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"],
        b"",
    );
    assert_eq!(code, 3, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "hi\n");
    assert!(err.contains("oops"), "{err}");

    // Input reaches the command, and its end closes the command's input.
    let (code, out, err) = exec(
        &repo,
        &[&vm, "--", "sh", "-c", "cat; echo done"],
        b"typed in\n",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "typed in\ndone\n");

    // More output than the link's window: every byte arrives, in order.
    let total = 3 * 1024 * 1024;
    let (code, out, err) = exec(
        &repo,
        &[
            &vm,
            "--",
            "sh",
            "-c",
            &format!("head -c {total} /dev/zero | tr '\\0' x"),
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), total);
    assert!(out.iter().all(|b| *b == b'x'));

    // A command killed by a signal exits as a shell reports it.
    let (code, _, err) = exec(&repo, &[&vm, "--", "sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(code, 128 + 15, "{err}");
    // A program that does not exist: ssh's 255 and the guest's reason.
    let (code, _, err) = exec(&repo, &[&vm, "--", "/no/such/program"], b"");
    assert_eq!(code, 255);
    assert!(err.contains("cannot start /no/such/program"), "{err}");

    // VMs fleet does not manage are refused before anything is sent.
    let foreign = format!("{prefix}foreign");
    let (code, _, err) = exec(&repo, &[&foreign, "--", "true"], b"");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("fleet does not manage a VM named {foreign}")),
        "{err}"
    );

    // A terminal: typing works, and a resize reaches the guest.
    let session = format!("fleet-exec-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .expect("run tmux (apt-get install tmux)")
    };
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _kill = Kill(&tmux);
    // A 120x30 terminal running `command`.
    let start_in_tmux = |command: &str| {
        let started = tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "120",
            "-y",
            "30",
            command,
        ]);
        assert!(started.status.success(), "{started:?}");
    };
    let command = format!(
        "{} -C {} exec --tty {vm} -- sh; echo exec-exited-$?; sleep 600",
        fleet_bin().display(),
        repo.path().display()
    );
    start_in_tmux(&command);
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();
    let shows = |what: &str, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while !screen().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} on the screen:\n{}",
                screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let keys = |text: &str| {
        assert!(
            tmux(&["send-keys", "-t", &session, "-l", text])
                .status
                .success()
        );
        assert!(
            tmux(&["send-keys", "-t", &session, "Enter"])
                .status
                .success()
        );
    };
    keys("echo $((6 * 7))-answer");
    shows("42-answer", Duration::from_secs(20));
    keys("stty size");
    shows("30 120", Duration::from_secs(20));
    assert!(
        tmux(&["resize-window", "-t", &session, "-x", "100", "-y", "25"])
            .status
            .success()
    );
    // The new size is sent on SIGWINCH; give it a moment to arrive before asking.
    std::thread::sleep(Duration::from_millis(500));
    keys("stty size");
    shows("25 100", Duration::from_secs(20));
    keys("exit 7");
    shows("exec-exited-7", Duration::from_secs(20));
    assert!(tmux(&["kill-session", "-t", &session]).status.success());
    // Ctrl-] ends a terminal session from this side, whatever runs in it.
    let command = format!(
        "{} -C {} exec --tty {vm} -- sleep 1000; echo exec-exited-$?; sleep 600",
        fleet_bin().display(),
        repo.path().display()
    );
    start_in_tmux(&command);
    std::thread::sleep(Duration::from_secs(1));
    assert!(tmux(&["send-keys", "-t", &session, "C-]"]).status.success());
    shows("exec-exited-137", Duration::from_secs(20));
    assert!(tmux(&["kill-session", "-t", &session]).status.success());

    // The serial console: a shell prompt, typing, and Ctrl-] to leave.
    let command = format!(
        "FLEET_HOST_CONFIG={} {} -C {} console {vm}; echo console-exited-$?; sleep 600",
        repo.host_config_path().display(),
        fleet_bin().display(),
        repo.path().display()
    );
    start_in_tmux(&command);
    shows("Connected to the console", Duration::from_secs(20));
    assert!(
        tmux(&["send-keys", "-t", &session, "Enter"])
            .status
            .success()
    );
    shows(&format!("{vm}:/#"), Duration::from_secs(20));
    keys("echo $((6 * 7))-console");
    shows("42-console", Duration::from_secs(20));
    assert!(tmux(&["send-keys", "-t", &session, "C-]"]).status.success());
    shows("console-exited-0", Duration::from_secs(20));
    assert!(
        screen().contains(&format!("left the console of {vm}")),
        "{}",
        screen()
    );
    // Its log, read-only, followed: what was typed shows, escape sequences do not.
    let mut follow = Command::new(fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .args(["console", "--follow", &vm])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fleet console --follow");
    let mut stdout = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("42-console") {
            match std::io::Read::read(&mut stdout, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = reader.join().expect("reader");
    assert!(followed.contains("42-console"), "{followed}");
    assert!(!followed.contains('\u{1b}'), "{followed:?}");
    // A VM fleet does not manage has no console for fleet.
    let refused = repo.fleet(&["console", &foreign]);
    assert_ne!(refused.code(), 0);
    assert!(
        refused
            .stderr()
            .contains(&format!("fleet does not manage a VM named {foreign}")),
        "{}",
        refused.stderr()
    );

    // Each exec is an event: who, which command, how it ended; never its output.
    let events = read(&status.join("events.jsonl"));
    let started: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("\"exec.started\""))
        .collect();
    assert_eq!(started.len(), 7, "{events}");
    assert!(
        started
            .iter()
            .any(|l| l.contains("sh -c 'echo hi; echo oops >&2; exit 3'")
                && l.contains("\"by\":")
                && l.contains(&format!("\"vm\":\"{vm}\""))),
        "{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"exec.ended\"") && l.contains("exited 3")),
        "{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"exec.ended\"") && l.contains("exited 7")),
        "{events}"
    );
    assert!(
        !events.contains("typed in") && !events.contains("42-answer"),
        "{events}"
    );
}

/// Snapshots on a real VM with a disk under `fleet serve`: one taken while a file says
/// "one", the file changed to "two", a revert (a planned, journaled step run by the daemon)
/// brings "one" back, memory included; names fleet keeps, unknown snapshots and VMs fleet
/// does not manage are refused; a delete leaves none.
#[test]
fn a_snapshot_revert_brings_a_running_vm_back() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-snap-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    // Snapshots live in a VM's own qcow2 overlay: the VM boots the micro kernel with a disk.
    let images = repo.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    let (kernel, initrd) = crate::support::micro_image();
    std::fs::copy(&kernel, images.join("vmlinuz")).expect("copy kernel");
    std::fs::copy(&initrd, images.join("initrd.img")).expect("copy initrd");
    crate::libvirt::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        images.join("base.qcow2").to_str().expect("utf8"),
        "64M",
    ]);
    repo.host_config(&crate::support::host_yaml(
        &[crate::support::local_provider(repo.path())],
        &format!("  imageRoot: '{}'\n", images.display()),
    ));
    let fleet = format!("it{}snap", std::process::id());
    repo.write(
        "fleet/fleet.yaml",
        format!("apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {fleet}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img, disk: base.qcow2}}\n  policy: {{shutdownTimeout: 10s}}\n"),
    );
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!("apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, resources: {{memory: 192Mi, disk: 1Gi}}}}\n"),
    );
    repo.commit("a VM with a disk");
    let _daemon = Daemon::start(&repo);
    let status = repo.path().join(".fleet/status");
    wait_until("the agent says hello", Duration::from_secs(120), || {
        read(&status.join(format!("vms/{vm}.yaml"))).contains("connected: true")
    });
    let sh = |script: &str| exec(&repo, &[&vm, "--", "sh", "-c", script], b"");
    assert_eq!(sh("echo one > /tmp/f").0, 0);

    repo.fleet(&[
        "snapshot",
        "create",
        &vm,
        "before-two",
        "--description",
        "f says one",
    ])
    .expect_code(0);
    let listed = repo.fleet(&["snapshot", "list", &vm]).stdout();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("before-two") && l.contains("yes") && l.contains("f says one")),
        "{listed}"
    );
    assert_eq!(sh("echo two > /tmp/f").0, 0);
    assert_eq!(String::from_utf8_lossy(&sh("cat /tmp/f").1), "two\n");

    // Refused: fleet's own names, bad names, an unknown snapshot, a VM fleet does not manage.
    for (args, says) in [
        (
            vec!["snapshot", "create", &vm, "fleet-clean"],
            "fleet's own",
        ),
        (
            vec!["snapshot", "create", &vm, "../x"],
            "cannot name a snapshot",
        ),
        (
            vec!["snapshot", "revert", &vm, "never-taken"],
            "has no snapshot named never-taken",
        ),
        (
            vec!["snapshot", "list", "not-fleets"],
            "fleet does not manage a VM named not-fleets",
        ),
    ] {
        let run = repo.fleet(&args);
        assert_ne!(run.code(), 0, "{args:?}");
        assert!(run.stderr().contains(says), "{args:?}: {}", run.stderr());
    }

    // The revert: asked for, planned and run by the daemon as a step, then forgotten.
    let asked = repo.fleet(&["snapshot", "revert", &vm, "before-two"]);
    asked.expect_code(0);
    assert!(
        asked.stdout().contains("fleet serve runs it now"),
        "{}",
        asked.stdout()
    );
    wait_until("the revert step succeeds", Duration::from_secs(60), || {
        read(&status.join("events.jsonl")).lines().any(|l| {
            l.contains("\"step.succeeded\"")
                && l.contains("\"action\":\"revert\"")
                && l.contains(&vm)
        })
    });
    assert!(!status.join(format!("snapshot-reverts/{vm}.yaml")).exists());
    let events = read(&status.join("events.jsonl"));
    assert!(
        events.contains("\"snapshot.created\"") && events.contains("\"snapshot.revert_asked\""),
        "{events}"
    );
    // The guest is back where the snapshot was: its memory, and so the file, say "one".
    wait_until("the file says one again", Duration::from_secs(60), || {
        String::from_utf8_lossy(&sh("cat /tmp/f").1) == "one\n"
    });

    repo.fleet(&["snapshot", "delete", &vm, "before-two"])
        .expect_code(0);
    let listed = repo.fleet(&["snapshot", "list", &vm]).stdout();
    assert_eq!(listed, "no snapshots\n");
    // Reverted exactly once: no step left to plan.
    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code(), 0, "{}", plan.stdout());
}
