//! A no-op reconcile of a fleet spread over two libvirt hosts: this machine's libvirtd and
//! a second one reached over `qemu+ssh://` (`second_host`). fleet observes both providers
//! at once and plans; the bare calls it needs (`bare_observe` on each host) are made the
//! same way, both hosts at once, over connections of their own. Prints both times and the
//! ratio (goal ≤ 1.5).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fleet::apply::Drivers;
use fleet::driver::Driver;
use fleet::source::Snapshot;
use fleet::spec::{HostPath, LibvirtProvider, Name};

use crate::second_host::{SECOND_HOST_STORAGE, SecondHost};
use crate::{OwnDomains, bare_observe, bench_snapshot, define_stopped, ms};

/// The fleet's name: its own, so its domains and pools are told from any other's.
const FLEET: &str = "bench-two-hosts";

pub fn bench_two_hosts(vms: usize) -> anyhow::Result<()> {
    let repo_root = std::env::current_dir()?;
    let kernel = repo_root.join("build/image/vmlinuz");
    anyhow::ensure!(
        kernel.is_file(),
        "{} is missing: run `make image`",
        kernel.display()
    );
    let image_root = kernel.parent().expect("image dir").to_owned();
    let scratch = tempfile::Builder::new()
        .prefix("fleet-bench-two-")
        .tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let t = Instant::now();
    let far_host = SecondHost::start()?;
    println!(
        "two hosts: started a second libvirtd, reached over qemu+ssh, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let provider = |name: &str, uri: &str, storage: String| LibvirtProvider {
        name: Name(name.into()),
        uri: uri.into(),
        storage_dir: Some(HostPath(storage)),
        storage_pool: None,
        full_network: None,
    };
    let local_storage = scratch.path().join("storage");
    let providers = [
        provider(
            "local",
            "qemu:///system",
            local_storage.to_string_lossy().into_owned(),
        ),
        provider("far", &far_host.uri, SECOND_HOST_STORAGE.into()),
    ];
    let host = fleet::load::load_host(
        "bench host",
        host_yaml(&image_root.to_string_lossy(), &providers).as_bytes(),
    )
    .map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let desired =
        fleet::reconcile::desired(&snapshot(vms), &host).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    // Dropped before the second host (declared after it): its domains go while it runs.
    let owners = providers
        .iter()
        .map(|p| {
            Ok((
                p.name.0.clone(),
                OwnDomains::claim_on(FLEET, p, &image_root)?,
            ))
        })
        .collect::<anyhow::Result<BTreeMap<String, OwnDomains>>>()?;

    // Inside, so a create that fails midway is cleaned up too.
    let result = (|| -> anyhow::Result<()> {
        let t = Instant::now();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let defining: Vec<_> = owners
                .iter()
                .map(|(name, owner)| {
                    let desired = &desired;
                    scope.spawn(move || define_stopped(&owner.driver, desired, name))
                })
                .collect();
            for handle in defining {
                handle.join().expect("define thread")?;
            }
            Ok(())
        })?;
        println!(
            "two hosts: defined {vms} stopped VMs, half on each host, in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let drivers: Drivers = owners
            .iter()
            .map(|(name, owner)| (name.clone(), owner.driver.clone() as Arc<dyn Driver>))
            .collect();
        let runtime = tokio::runtime::Runtime::new()?;
        let bare_conns = providers
            .iter()
            .map(|p| virt::connect::Connect::open(Some(&p.uri)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut fleet_times = Vec::new();
        let mut bare_times = Vec::new();
        let mut calls = 0;
        for _ in 0..5 {
            let before: u64 = owners.values().map(|o| o.driver.calls()).sum();
            let t = Instant::now();
            let observed = runtime.block_on(fleet::reconcile::observe(&drivers));
            let plan = fleet::plan::plan(&desired, &observed, &Default::default());
            fleet_times.push(t.elapsed());
            calls = owners.values().map(|o| o.driver.calls()).sum::<u64>() - before;
            anyhow::ensure!(
                !plan.has_changes(),
                "the no-op plan has {} steps: {:?}",
                plan.steps().len(),
                plan.steps().first()
            );

            let t = Instant::now();
            std::thread::scope(|scope| -> anyhow::Result<()> {
                let reading: Vec<_> = bare_conns
                    .iter()
                    .map(|conn| scope.spawn(move || bare_observe(conn, FLEET)))
                    .collect();
                for handle in reading {
                    handle.join().expect("bare thread")?;
                }
                Ok(())
            })?;
            bare_times.push(t.elapsed());
        }
        fleet_times.sort();
        bare_times.sort();
        let (f, b) = (fleet_times[2], bare_times[2]);
        println!(
            "two hosts: no-op reconcile of {vms} VMs over two hosts (one over qemu+ssh) made {calls} libvirt calls; median of 5: fleet {:.0} ms, bare calls on both hosts at once {:.0} ms, ratio {:.2} (target <= 1.5)",
            ms(f),
            ms(b),
            f.as_secs_f64() / b.as_secs_f64()
        );
        Ok(())
    })();

    let t = Instant::now();
    let removed = owners
        .values()
        .map(OwnDomains::remove)
        .collect::<anyhow::Result<Vec<()>>>();
    if removed.is_ok() {
        println!(
            "two hosts: removed the {vms} VMs in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    drop(owners);
    drop(far_host);
    result.and(removed.map(drop))
}

fn host_yaml(image_root: &str, providers: &[LibvirtProvider]) -> String {
    let listed: String = providers
        .iter()
        .map(|p| {
            format!(
                "    - {{name: {}, type: libvirt, uri: '{}', storageDir: '{}'}}\n",
                p.name.0,
                p.uri,
                p.storage_dir.as_ref().map_or("", |d| d.0.as_str())
            )
        })
        .collect();
    format!(
        "apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n{listed}  imageRoot: '{image_root}'\n  limits: {{maxVms: 100000, maxCpus: 1000000, maxMemory: 100Ti, minInterval: 1s}}\n"
    )
}

/// Two pools, one per host, of half the VMs each.
fn snapshot(vms: usize) -> Snapshot {
    let fleet = format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {FLEET}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n    - {{name: far, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz}}\n"
    );
    let pool = |name: &str, provider: &str, replicas: usize| {
        (
            format!("fleet/vms/{name}.yaml"),
            format!(
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  template:\n    spec: {{provider: {provider}, image: micro, state: stopped, resources: {{memory: 64Mi}}}}\n"
            ),
        )
    };
    bench_snapshot(
        "c",
        vec![
            ("fleet/fleet.yaml".into(), fleet),
            pool("here", "local", vms / 2),
            pool("there", "far", vms - vms / 2),
        ],
    )
}
