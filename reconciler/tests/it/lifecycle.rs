//! A VM's life under `fleet serve` on real libvirt. Leases: at a lease's end its VM is
//! stopped (`onExpiry: stop`) or destroyed with its files (`destroy`), kept so, and brought
//! back by a renewal from the host (`fleet lease renew`) or a commit (`lease.renewals`).
//! Idle stop: a VM with no run for `stopAfter` is stopped, and a task due on it wakes it.
//! Clean resets: a VM with `reset: beforeEachTask` loses what one run wrote before the next
//! and has its secrets again.

use std::time::{Duration, Instant};

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, domains, enabled, fleet_yaml_with_policy, virsh};
use crate::support::Repo;
use crate::tasks::{Status, task_yaml};

fn leased_vm(name: &str, lease: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec:\n  provider: local\n  image: micro\n  resources: {{memory: 192Mi}}\n  lease: {lease}\n"
    )
}

fn state(vm: &str) -> String {
    String::from_utf8_lossy(&virsh(&["domstate", vm]).stdout)
        .trim()
        .to_owned()
}

#[test]
fn a_lease_stops_or_destroys_its_vm_at_its_end_and_a_renewal_brings_it_back() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-lease-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("it{}lease", std::process::id());
    let (stop, gone) = (format!("{prefix}s"), format!("{prefix}d"));
    let repo = Repo::new();
    // The periodic pass is far away: the daemon wakes for the lease's end itself.
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(&fleet, "{shutdownTimeout: 5s, reconcileInterval: 10m}"),
    )
    .write(
        &format!("fleet/vms/{stop}.yaml"),
        leased_vm(&stop, "{ttl: 20s}"),
    )
    .write(
        &format!("fleet/vms/{gone}.yaml"),
        leased_vm(&gone, "{ttl: 20s, onExpiry: destroy}"),
    );
    repo.commit("two leased VMs");
    let made = Instant::now();
    let daemon = Daemon::start(&repo);
    let status = repo.path().join(".fleet/status");
    wait_until("both VMs run", Duration::from_secs(60), || {
        state(&stop) == "running" && state(&gone) == "running"
    });
    // The status is written once the pass that made them has observed them again.
    wait_until(
        "fleet status shows the time left",
        Duration::from_secs(15),
        || {
            repo.fleet(&["status"])
                .stdout()
                .contains("left (then stop)")
        },
    );

    // At the end: one stopped, the other destroyed with its files.
    wait_until("the leases end", Duration::from_secs(90), || {
        state(&stop) == "shut off" && domains(&prefix) == [stop.clone()]
    });
    let ended = made.elapsed();
    eprintln!("leases of 20 s ended after {ended:?}");
    assert!(ended >= Duration::from_secs(20), "ended early: {ended:?}");
    assert_eq!(
        repo.vm_volumes(&fleet, &gone),
        Vec::<String>::new(),
        "its volumes are gone"
    );
    let events = read(&status.join("events.jsonl"));
    assert!(events.contains("its lease ended at"), "{events}");
    wait_until(
        "the status says the lease ended",
        Duration::from_secs(10),
        || {
            let vm = read(&status.join("vms").join(format!("{stop}.yaml")));
            vm.contains("LeaseEnded") && vm.contains("ends:")
        },
    );
    // Kept so: a pass later nothing was started or made again.
    repo.fleet(&["reconcile"]).expect_code(0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&stop), "shut off");
    assert_eq!(domains(&prefix), std::slice::from_ref(&stop));
    let listed = repo.fleet(&["status"]);
    assert!(
        listed.stdout().contains("ago: stopped until renewed"),
        "{}",
        listed.stdout()
    );

    // A renewal from the host starts the stopped one; a commit renews the other, which is
    // made again.
    let renewed = repo.fleet(&["lease", "renew", &stop, "--for", "10m"]);
    renewed.expect_code(0);
    assert!(renewed.stdout().contains("ends at"), "{}", renewed.stdout());
    repo.write(
        &format!("fleet/vms/{gone}.yaml"),
        leased_vm(&gone, "{ttl: 20s, onExpiry: destroy, renewals: 1}"),
    );
    repo.commit("renew the destroyed one");
    wait_until("both run again", Duration::from_secs(60), || {
        state(&stop) == "running" && state(&gone) == "running"
    });
    // Past its first end, each stays up for its renewal (20 s from the commit for one).
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(&stop), "running");
    assert_eq!(state(&gone), "running");
    let refused = repo.fleet(&["lease", "renew", &format!("{prefix}none")]);
    assert_ne!(refused.code(), 0);
    assert!(
        refused.stderr().contains("no status for VM"),
        "{}",
        refused.stderr()
    );
    drop(daemon);
}

#[test]
fn an_idle_vm_stops_after_its_window_and_a_new_task_wakes_it_and_runs() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-idle-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}idle", std::process::id()),
            "{shutdownTimeout: 5s, reconcileInterval: 10m}",
        ),
    )
    .write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec:\n  provider: local\n  image: micro\n  resources: {{memory: 192Mi}}\n  idle: {{stopAfter: 15s}}\n"
        ),
    )
    .write(
        "fleet/tasks/first.yaml",
        task_yaml("first", &vm, "  command: [sh, -c, 'echo first']\n"),
    );
    repo.commit("an idle-stopping VM and a task");
    let daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("first", "Succeeded", Duration::from_secs(90));
    let finished = Instant::now();
    assert_eq!(state(&vm), "running");

    // 15 s after its run ended, with nothing else to do, it is stopped; the daemon wakes
    // for it (the periodic pass is 10 minutes away).
    wait_until("the idle VM is stopped", Duration::from_secs(60), || {
        state(&vm) == "shut off"
    });
    let idle_after = finished.elapsed();
    eprintln!("stopped {idle_after:?} after its run ended");
    assert!(idle_after >= Duration::from_secs(14), "{idle_after:?}");
    let vm_status = repo.path().join(format!(".fleet/status/vms/{vm}.yaml"));
    wait_until("its status says idle", Duration::from_secs(10), || {
        read(&vm_status).contains("stopped: idle since")
    });
    let events = read(&repo.path().join(".fleet/status/events.jsonl"));
    assert!(events.contains("idle since"), "{events}");
    // It stays stopped: `running` in git means allowed to run.
    repo.fleet(&["reconcile"]).expect_code(0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&vm), "shut off");

    // A new task wakes it and runs.
    repo.write(
        "fleet/tasks/second.yaml",
        task_yaml("second", &vm, "  command: [sh, -c, 'echo second']\n"),
    );
    repo.commit("a second task");
    status.wait_phase("second", "Succeeded", Duration::from_secs(90));
    assert!(status.output("second").contains("second"));
    let events = read(&repo.path().join(".fleet/status/events.jsonl"));
    assert!(
        events.contains("task second has a run due on it"),
        "{events}"
    );
    drop(daemon);
}

#[test]
fn a_vm_that_resets_before_each_run_loses_what_a_run_wrote_and_keeps_its_secrets() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-reset-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = crate::secrets::age_identity(keys.path(), "age.key");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}reset", std::process::id()),
            "{shutdownTimeout: 5s, reconcileInterval: 10m}",
        ),
    );
    repo.add_host_config(&format!("  recipients: [{recipient}]\n"));
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, loadout: clean, resources: {{memory: 192Mi}}}}\n"
        ),
    )
    .write(
        "fleet/loadouts/clean.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: clean}\nspec:\n  reset: beforeEachTask\n  secrets: [{secret: key, key: value, file: vm/key}]\n",
    );
    crate::secrets::secret_set(&repo, "key", "value", "s3cret-value");
    repo.allow_secret("key", "{loadouts: [clean]}");
    let probe = "  command: [sh, -c, 'test -e /tmp/mark && echo dirty || echo clean; echo one > /tmp/mark; echo key=$(tr a-z A-Z < /run/fleet/secrets/vm/key); echo boot=$(cat /proc/sys/kernel/random/boot_id)']\n";
    repo.write("fleet/tasks/one.yaml", task_yaml("one", &vm, probe))
        .write("fleet/tasks/two.yaml", task_yaml("two", &vm, probe));
    repo.commit("a VM that resets before each run, and two runs");
    let identity = identity.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &identity)], &[]);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("one", "Succeeded", Duration::from_secs(90));
    status.wait_phase("two", "Succeeded", Duration::from_secs(90));
    let boot = |task: &str| {
        status
            .output(task)
            .lines()
            .find_map(|l| l.trim().strip_prefix("boot=").map(str::to_owned))
            .unwrap_or_default()
    };
    for task in ["one", "two"] {
        let out = status.output(task);
        assert!(out.contains("clean"), "{task} ran on a clean VM: {out}");
        assert!(!out.contains("dirty"), "{task}: {out}");
        // Shown changed: output never carries a secret's value as it is.
        assert!(
            out.contains("key=S3CRET-VALUE"),
            "{task} has its secret: {out}"
        );
    }
    assert_ne!(boot("one"), boot("two"), "the second run is on a new boot");
    let events = read(&repo.path().join(".fleet/status/events.jsonl"));
    assert!(events.contains("reset: beforeEachTask"), "{events}");
    assert_eq!(
        events.matches(&format!("reset {vm} done")).count(),
        1,
        "one reset, between the two runs (the first ran on the VM as made): {events}"
    );
    // A third run, committed later, gets its own reset too.
    repo.write("fleet/tasks/three.yaml", task_yaml("three", &vm, probe));
    repo.commit("a third run");
    status.wait_phase("three", "Succeeded", Duration::from_secs(90));
    assert!(
        status.output("three").contains("clean"),
        "{}",
        status.output("three")
    );
    assert_ne!(boot("two"), boot("three"));
    drop(daemon);
}

/// `policy.retention` under `fleet serve`: the event log past its size starts a new file
/// (the old one kept as `.1`, still read by `fleet events`), and finished runs of tasks
/// gone from the revision are pruned down to the count, the newest kept, while a task
/// still in the revision keeps its record.
#[test]
fn a_tiny_retention_policy_rotates_events_and_prunes_old_task_runs() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-keep-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}keep", std::process::id()),
            "{shutdownTimeout: 5s, reconcileInterval: 3s, retention: {finishedTasks: 1, logSize: 1Mi, logFiles: 2}}",
        ),
    )
    .write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec:\n  provider: local\n  image: micro\n  resources: {{memory: 192Mi}}\n"
        ),
    );
    for task in ["one", "two", "three"] {
        repo.write(
            &format!("fleet/tasks/{task}.yaml"),
            task_yaml(task, &vm, &format!("  command: [sh, -c, 'echo {task}']\n")),
        );
    }
    repo.commit("a VM and three tasks");
    // An event log already past 1 MiB, as a busy fleet's would be.
    let status_dir = repo.path().join(".fleet/status");
    std::fs::create_dir_all(&status_dir).expect("status dir");
    let old = r#"{"time":"2026-01-01T00:00:00Z","type":"apply.finished","revision":"0","message":"an old event"}"#;
    let filler: String =
        std::iter::repeat_n(format!("{old}\n"), (1 << 20) / old.len() + 10).collect();
    std::fs::write(status_dir.join("events.jsonl"), &filler).expect("events");

    let daemon = Daemon::start(&repo);
    let status = Status(status_dir.clone());
    for task in ["one", "two", "three"] {
        status.wait_phase(task, "Succeeded", Duration::from_secs(120));
    }
    // Rotated at the first append: the old events are `.1`, the new file starts small.
    let rotated = read(&status_dir.join("events.jsonl.1"));
    assert!(rotated.starts_with(old), "the old log became .1");
    let current = std::fs::metadata(status_dir.join("events.jsonl"))
        .expect("current")
        .len();
    assert!(current < 1 << 20, "a new file: {current} bytes");
    let events = repo.fleet(&["events"]).stdout();
    assert!(
        events.contains("an old event"),
        "fleet events reads the rotated file"
    );
    assert!(
        events.lines().any(|l| !l.contains("an old event")),
        "and the new one"
    );

    // Two tasks leave the revision: of their finished runs only the newest stays.
    let finished =
        |task: &str| crate::tasks::field(&status.task(task), "finished").unwrap_or_default();
    let ended = [("one", finished("one")), ("two", finished("two"))];
    repo.remove("fleet/tasks/one.yaml")
        .remove("fleet/tasks/two.yaml");
    repo.commit("one and two go");
    let left = || {
        ["one", "two"]
            .into_iter()
            .filter(|t| status_dir.join(format!("tasks/{t}.yaml")).exists())
            .collect::<Vec<_>>()
    };
    wait_until(
        "one removed task's run is pruned",
        Duration::from_secs(60),
        || left().len() == 1,
    );
    let kept = left()[0];
    let (pruned, pruned_end) = ended.iter().find(|(t, _)| *t != kept).expect("the other");
    let kept_end = &ended.iter().find(|(t, _)| *t == kept).expect("kept").1;
    assert!(kept_end >= pruned_end, "the newest is kept: {ended:?}");
    assert!(
        !status_dir.join(format!("tasks/{pruned}")).exists(),
        "its output went too"
    );
    assert!(
        status_dir.join("tasks/three.yaml").exists(),
        "a task in the revision stays"
    );
    drop(daemon);
}

/// `fleet apply` without a terminal: a step still going says so at each heartbeat (10 s;
/// 1 s here, through `FLEET_HEARTBEAT_INTERVAL`, for a stop waiting on its guest).
#[test]
fn a_slow_step_prints_a_heartbeat_without_a_terminal() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-beat-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    let fleet = format!("it{}beat", std::process::id());
    let vm_file = |state: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec:\n  provider: local\n  image: micro\n  state: {state}\n  resources: {{memory: 192Mi}}\n"
        )
    };
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(&fleet, "{shutdownTimeout: 25s}"),
    )
    .write(&format!("fleet/vms/{vm}.yaml"), vm_file("running"));
    repo.commit("a VM");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_file("stopped"));
    repo.commit("stop it");
    let started = Instant::now();
    let stopped = std::process::Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .args(["apply", "--auto-approve"])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .env("FLEET_HEARTBEAT_INTERVAL", "1s")
        .output()
        .expect("fleet apply");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(stopped.status.success(), "{stderr}");
    assert!(
        took >= Duration::from_secs(3),
        "a slow stop: {took:?}\n{stderr}"
    );
    for beat in [1, 2] {
        assert!(
            stderr.contains(&format!("still stopping {vm} ({beat} s)")),
            "{stderr}"
        );
    }
    assert!(stderr.contains(&format!("stop {vm} done in")), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no terminal, no escape sequences: {stderr}"
    );
}
