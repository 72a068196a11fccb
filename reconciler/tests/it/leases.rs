//! Leases on real libvirt: at a lease's end `fleet serve` stops its VM (`onExpiry: stop`)
//! or destroys it and its files (`destroy`), keeps it so, and brings it back on a renewal
//! from the host (`fleet lease renew`) or from a commit (`lease.renewals`).

use std::time::{Duration, Instant};

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, domains, enabled, fleet_yaml_with_policy, virsh};
use crate::support::Repo;

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
    let listed = repo.fleet(&["status"]);
    assert!(
        listed.stdout().contains("left (then stop)"),
        "{}",
        listed.stdout()
    );

    // At the end: one stopped, the other destroyed with its files.
    wait_until("the leases end", Duration::from_secs(90), || {
        state(&stop) == "shut off" && domains(&prefix) == [stop.clone()]
    });
    let ended = made.elapsed();
    eprintln!("leases of 20 s ended after {ended:?}");
    assert!(ended >= Duration::from_secs(20), "ended early: {ended:?}");
    assert!(!repo.vm_dir(&fleet, &gone).exists(), "its files are gone");
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
