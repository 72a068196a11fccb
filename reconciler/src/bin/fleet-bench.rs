//! `fleet-bench`: the performance goals of the foundation, measured side by side in one run.
//!
//! 1. plan: load + resolve + plan + render of a generated 10,000-VM fleet (one VMPool)
//!    against an observed state of the same size; prints wall time and peak RSS next to the
//!    targets (1 s, 300 MB).
//! 2. observe (needs libvirtd, `--libvirt`): a no-op plan of 1,000 fleet VMs on
//!    qemu:///system; prints the libvirt calls it made and its time next to the time of the
//!    same bare libvirt calls made directly, and the ratio (fleet's overhead).
//!
//! Usage: fleet-bench [--vms N] [--libvirt] [--libvirt-vms N]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet::apply::Drivers;
use fleet::driver::Driver;
use fleet::driver::libvirt::LibvirtDriver;
use fleet::observe::{Observed, ObservedHost, ObservedVm, Stamp};
use fleet::source::{Revision, Snapshot, SourceFile};
use fleet::spec::{LibvirtProvider, Name};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let number = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let vms = number("--vms", 10_000);
    bench_plan(vms)?;
    if args.iter().any(|a| a == "--libvirt") {
        bench_libvirt_observe(number("--libvirt-vms", 1_000))?;
    } else {
        println!("observe: skipped (pass --libvirt to measure against qemu:///system)");
    }
    Ok(())
}

fn snapshot(vms: usize, kernel: &str, state: &str) -> Snapshot {
    let fleet = format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: bench}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, uri: 'qemu:///system', domainType: qemu, storageDir: .fleet/bench-storage}}\n  images:\n    - {{name: micro, kernel: '{kernel}'}}\n"
    );
    let pool = format!(
        "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: bench}}\nspec:\n  replicas: {vms}\n  template:\n    spec: {{provider: local, image: micro, state: {state}, resources: {{memory: 128Mi}}}}\n"
    );
    Snapshot {
        revision: Revision {
            id: "b".repeat(40),
            label: "bench".into(),
        },
        fleet_dir: "fleet".into(),
        files: vec![
            SourceFile {
                path: "fleet/fleet.yaml".into(),
                bytes: fleet.into_bytes(),
            },
            SourceFile {
                path: "fleet/vms/bench.yaml".into(),
                bytes: pool.into_bytes(),
            },
        ],
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bench_plan(vms: usize) -> anyhow::Result<()> {
    let snap = snapshot(vms, "/boot/vmlinuz", "running");
    // Observed: every VM applied as desired, except one in a hundred with older memory, so
    // the plan has real work to render.
    let desired = fleet::reconcile::desired(&snap).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let observed_vms: Vec<ObservedVm> = desired
        .vms
        .values()
        .enumerate()
        .map(|(i, vm)| {
            let mut config = vm.config.clone();
            if i % 100 == 0 {
                config.memory_mib = 64;
            }
            ObservedVm {
                name: vm.name.clone(),
                uuid: String::new(),
                running: true,
                cpus: config.cpus,
                memory_mib: config.memory_mib,
                stamp: Some(Stamp {
                    fleet: "bench".into(),
                    name: vm.name.clone(),
                    spec_hash: config.hash(),
                    revision: "a".repeat(40),
                    protect: false,
                    config: Some(config),
                }),
            }
        })
        .collect();
    let observed = Observed {
        hosts: BTreeMap::from([("local".to_owned(), ObservedHost { vms: observed_vms })]),
        unreachable: BTreeMap::new(),
    };
    drop(desired);

    let started = Instant::now();
    let desired = fleet::reconcile::desired(&snap).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let loaded = started.elapsed();
    let plan = fleet::plan::plan(&desired, &observed);
    let planned = started.elapsed();
    let text = fleet::plan::render::text(&plan);
    let json = fleet::plan::render::json(&plan);
    let total = started.elapsed();
    let rss = peak_rss_mib();
    println!(
        "plan: {vms} VMs, {} steps: load+resolve {:.0} ms, plan {:.0} ms, render {:.0} ms ({} KiB text, {} KiB json)",
        plan.steps.len(),
        ms(loaded),
        ms(planned - loaded),
        ms(total - planned),
        text.len() / 1024,
        json.len() / 1024
    );
    println!(
        "plan: wall {:.0} ms (target 1000 ms, ratio {:.2}); peak RSS {:.0} MiB (target 300 MB = 286 MiB, ratio {:.2})",
        ms(total),
        ms(total) / 1000.0,
        rss,
        rss / 286.1
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn bench_libvirt_observe(vms: usize) -> anyhow::Result<()> {
    let repo_root = std::env::current_dir()?;
    let kernel = repo_root.join("build/image/vmlinuz");
    anyhow::ensure!(
        kernel.is_file(),
        "{} is missing: run `make image`",
        kernel.display()
    );
    let snap = snapshot(vms, &kernel.to_string_lossy(), "stopped");
    let desired = fleet::reconcile::desired(&snap).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let provider = LibvirtProvider {
        name: Name("local".into()),
        uri: "qemu:///system".into(),
        domain_type: fleet::spec::DomainType::Qemu,
        storage_dir: Some(".fleet/bench-storage".into()),
    };
    let driver = Arc::new(LibvirtDriver::new("bench", &provider, &repo_root));

    // Define the fleet's VMs (stopped: the bench measures observation, not boots).
    let t = Instant::now();
    for vm in desired.vms.values() {
        let stamp = Stamp {
            fleet: "bench".into(),
            name: vm.name.clone(),
            spec_hash: vm.spec_hash.clone(),
            revision: desired.revision.id.clone(),
            protect: false,
            config: Some(vm.config.clone()),
        };
        driver
            .create(vm, &stamp)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", vm.name))?;
    }
    println!(
        "observe: defined {vms} stopped VMs in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let result = (|| -> anyhow::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        let drivers: Drivers =
            BTreeMap::from([("local".to_owned(), driver.clone() as Arc<dyn Driver>)]);
        let mut fleet_times = Vec::new();
        let mut bare_times = Vec::new();
        let mut calls = 0;
        let mut on_host = 0;
        for _ in 0..5 {
            let before = driver.calls();
            let t = Instant::now();
            let observed = runtime.block_on(fleet::reconcile::observe(&drivers));
            let plan = fleet::plan::plan(&desired, &observed);
            fleet_times.push(t.elapsed());
            calls = driver.calls() - before;
            anyhow::ensure!(
                !plan.has_changes(),
                "the no-op plan has {} steps",
                plan.steps.len()
            );

            let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
            let t = Instant::now();
            let domains = conn.list_all_domains(0)?;
            for d in &domains {
                let _ = d.xml_desc(0)?;
            }
            bare_times.push(t.elapsed());
            on_host = domains.len();
        }
        fleet_times.sort();
        bare_times.sort();
        let (f, b) = (fleet_times[2], bare_times[2]);
        println!(
            "observe: no-op plan of {vms} VMs made {calls} libvirt calls (1 list + 1 read for each of the {on_host} domains on the host); median of 5: fleet {:.0} ms, bare calls {:.0} ms, ratio {:.2}",
            ms(f),
            ms(b),
            f.as_secs_f64() / b.as_secs_f64()
        );
        Ok(())
    })();

    let t = Instant::now();
    for vm in desired.vms.values() {
        if let Err(e) = driver.destroy(&vm.name, Duration::from_secs(5)) {
            eprintln!("cleanup: destroy {}: {e}", vm.name);
        }
    }
    let _ = std::fs::remove_dir_all(repo_root.join(".fleet/bench-storage"));
    println!(
        "observe: removed the {vms} VMs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    result
}
