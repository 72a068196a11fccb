//! `fleet-bench`: the performance goals of the foundation, measured side by side in one run.
//!
//! 1. plan: load + resolve + plan + render of a generated 10,000-VM fleet (one VMPool)
//!    against an observed state of the same size; prints wall time and peak RSS next to the
//!    targets (1 s, 300 MB).
//! 2. observe (needs libvirtd, `--libvirt`): a no-op plan of 1,000 fleet VMs on
//!    qemu:///system; prints the libvirt calls it made and its time next to the time of the
//!    same bare libvirt calls made directly, and the ratio (fleet's overhead). Then the same
//!    for 100 fleet VMs on a host that also holds 1,000 foreign domains (`--foreign-vms`),
//!    next to reading every domain's definition.
//!
//! 3. daemon (needs libvirtd, `--daemon`): commit-to-first-apply-step latency of
//!    `fleet serve` over 20 commits (median, p95); a no-op reconcile of 1,000 VMs served from
//!    the event-fed cache next to the one bare list call it needs; the daemon's idle CPU and
//!    RSS over 60 s with 100 stopped VMs and 10 running ones whose agents are connected.
//!
//! 4. broker: brokered egress in one process (`broker_bench`): a 64 MiB download through a
//!    tunnel and short requests, each next to the same made directly on the host.
//!
//! 5. egress on a real VM (needs libvirtd and the micro image, `--egress`,
//!    `vm_egress_bench`): a download through a brokered VM's proxy next to a plain copy over
//!    the same kind of virtio-serial port, and the time of a short request in the guest.
//!
//! 6. results (`--results`, `results_bench`; the VM half needs libvirtd and the micro
//!    image): a run's 10 MiB change checked and pushed on the host alone, and end to end
//!    from a real VM's last line of output to the pushed branch.
//!
//! 7. source (`--source`, `source_bench`; libvirt's test driver): push-to-apply latency of
//!    a followed remote with polling next to `fleet reconcile`, and an idle poll's cost.
//!
//! 8. upload (needs libvirtd, `--upload`, `upload_bench`): the first use of a base disk of
//!    `--upload-mib` MiB (default 256) on a provider, shipped into the fleet's storage pool,
//!    next to `virsh vol-upload` of the same file.
//!
//! 9. two hosts (needs libvirtd, `--two-hosts`, `two_host_bench`): a no-op reconcile of
//!    `--two-host-vms` (default 1,000) defined VMs, half on qemu:///system and half on a
//!    second libvirtd reached over qemu+ssh (`second_host`), next to the bare calls it needs
//!    on both hosts at once.
//!
//! Every bench that makes domains on qemu:///system stamps them with a fleet name of its own
//! and removes exactly those (`OwnDomains`), on every path; the run then fails, naming them,
//! unless the host's domains are the same as before it (`same_domains`).
//!
//! Usage: fleet-bench [--vms N] [--libvirt] [--libvirt-vms N] [--foreign-vms N] [--daemon] [--idle-seconds N]
//!        [--skip-latency] [--skip-noop] [--skip-idle] [--egress] [--egress-mib N]
//!        [--results] [--source] [--upload] [--upload-mib N] [--two-hosts]
//!        [--two-host-vms N] [--only-broker] [--only-egress] [--only-results]
//!        [--only-source] [--only-upload] [--only-two-hosts]

#![allow(clippy::disallowed_methods)] // a tool writes scratch files freely

#[path = "../broker_bench.rs"]
mod broker_bench;
#[path = "../results_bench.rs"]
mod results_bench;
#[allow(dead_code)] // shared with fleet-crash and the tests, which use all of it
#[path = "../second_host.rs"]
mod second_host;
#[path = "../source_bench.rs"]
mod source_bench;
#[path = "../two_host_bench.rs"]
mod two_host_bench;
#[path = "../upload_bench.rs"]
mod upload_bench;
#[path = "../vm_egress_bench.rs"]
mod vm_egress_bench;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet::apply::Drivers;
use fleet::driver::Driver;
use fleet::driver::libvirt::LibvirtDriver;
use fleet::observe::{Observed, ObservedHost, ObservedVm, Stamp};
use fleet::source::{Revision, Snapshot, SourceFile};
use fleet::spec::{HostSpec, LibvirtProvider, Name};

/// The flags whose benches make domains on qemu:///system.
const ON_LIBVIRT: [&str; 8] = [
    "--libvirt",
    "--daemon",
    "--egress",
    "--results",
    "--two-hosts",
    "--only-egress",
    "--only-results",
    "--only-two-hosts",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !ON_LIBVIRT.iter().any(|flag| args.iter().any(|a| a == flag)) {
        return run(&args);
    }
    // A benchmark leaves the host as it found it, whatever it measured: checked after every
    // run, failed or not, so a cleanup that did not work fails `make bench`.
    let before = domain_names()?;
    let result = run(&args);
    if let Err(changed) = domain_names().and_then(|after| same_domains(&before, &after)) {
        if let Err(e) = &result {
            eprintln!("fleet-bench: {e:#}");
        }
        return Err(changed);
    }
    result
}

/// The names of the domains defined on qemu:///system, running or not.
fn domain_names() -> anyhow::Result<BTreeSet<String>> {
    let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
    let names: BTreeSet<String> = conn
        .list_all_domains(0)?
        .iter()
        .map(virt::domain::Domain::name)
        .collect::<Result<_, _>>()?;
    Ok(names)
}

/// Fails, naming them, when domains defined after the benchmarks were not before (left
/// behind) or the other way round (removed by a bench that should not have touched them).
fn same_domains(before: &BTreeSet<String>, after: &BTreeSet<String>) -> anyhow::Result<()> {
    let left: Vec<&str> = after.difference(before).map(String::as_str).collect();
    let gone: Vec<&str> = before.difference(after).map(String::as_str).collect();
    let mut changes = Vec::new();
    if !left.is_empty() {
        changes.push(format!(
            "{} domain(s) left defined: {}",
            left.len(),
            left.join(", ")
        ));
    }
    if !gone.is_empty() {
        changes.push(format!(
            "{} domain(s) defined before are gone: {}",
            gone.len(),
            gone.join(", ")
        ));
    }
    anyhow::ensure!(
        changes.is_empty(),
        "the benchmarks did not leave qemu:///system as they found it: {}",
        changes.join("; ")
    );
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let number = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let vms = number("--vms", 10_000);
    if args.iter().any(|a| a == "--only-broker") {
        return broker_bench::bench_broker();
    }
    let egress_mib = number("--egress-mib", 32) as u64;
    if args.iter().any(|a| a == "--only-results") {
        return results_bench::bench_results();
    }
    if args.iter().any(|a| a == "--only-upload") {
        return upload_bench::bench_upload(number("--upload-mib", 256));
    }
    let two_host_vms = number("--two-host-vms", 1_000);
    if args.iter().any(|a| a == "--only-two-hosts") {
        return two_host_bench::bench_two_hosts(two_host_vms);
    }
    if args.iter().any(|a| a == "--only-source") {
        return source_bench::bench_source(20);
    }
    if args.iter().any(|a| a == "--only-egress") {
        vm_egress_bench::bench_vm_egress(egress_mib)?;
        return broker_bench::bench_broker();
    }
    bench_plan(vms)?;
    if args.iter().any(|a| a == "--libvirt") {
        bench_libvirt_observe(number("--libvirt-vms", 1_000), 0)?;
        bench_libvirt_observe(100, number("--foreign-vms", 1_000))?;
    } else {
        println!("observe: skipped (pass --libvirt to measure against qemu:///system)");
    }
    if args.iter().any(|a| a == "--daemon") {
        if !args.iter().any(|a| a == "--skip-latency") {
            bench_commit_latency(20)?;
        }
        if !args.iter().any(|a| a == "--skip-noop") {
            bench_cached_noop(1_000)?;
        }
        if !args.iter().any(|a| a == "--skip-idle") {
            bench_idle(100, 10, number("--idle-seconds", 60) as u64)?;
        }
    } else {
        println!("daemon: skipped (pass --daemon to measure fleet serve)");
    }
    if args.iter().any(|a| a == "--egress") {
        vm_egress_bench::bench_vm_egress(egress_mib)?;
    } else {
        println!("egress on a VM: skipped (pass --egress to measure a brokered VM)");
    }
    if args.iter().any(|a| a == "--results") {
        results_bench::bench_results()?;
    } else {
        println!("results: skipped (pass --results to measure a run's change coming back)");
    }
    if args.iter().any(|a| a == "--upload") {
        upload_bench::bench_upload(number("--upload-mib", 256))?;
    } else {
        println!("upload: skipped (pass --upload to measure shipping an image to a host)");
    }
    if args.iter().any(|a| a == "--two-hosts") {
        two_host_bench::bench_two_hosts(two_host_vms)?;
    } else {
        println!("two hosts: skipped (pass --two-hosts to measure a fleet over two hosts)");
    }
    if args.iter().any(|a| a == "--source") {
        source_bench::bench_source(20)?;
    } else {
        println!("source: skipped (pass --source to measure following a remote)");
    }
    broker_bench::bench_broker()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The domains stamped with one bench's fleet name on qemu:///system: those the bench made.
/// Removed when dropped, on every path (a measurement that fails midway must leave the host
/// as it found it too), and only they: the driver's destroy refuses a domain stamped
/// otherwise. No fleet apply: emptying the fleet is held by the destroy-everything guard,
/// rightly, and a revision that no longer loads would leave everything behind.
struct OwnDomains {
    fleet: String,
    /// The provider's host, whose fleet pool goes with the domains.
    uri: String,
    driver: Arc<LibvirtDriver>,
}

impl OwnDomains {
    /// The libvirt driver of fleet `name` on qemu:///system, with its storage under
    /// `storage` as its host configuration says.
    fn claim(
        name: &str,
        storage: &std::path::Path,
        image_root: &std::path::Path,
    ) -> anyhow::Result<OwnDomains> {
        let provider = LibvirtProvider {
            name: Name("local".into()),
            uri: "qemu:///system".into(),
            storage_dir: Some(fleet::spec::HostPath(
                storage.to_string_lossy().into_owned(),
            )),
            storage_pool: None,
            full_network: None,
        };
        OwnDomains::claim_on(name, &provider, image_root)
    }

    /// The libvirt driver of fleet `name` on `provider`. Refused while domains already
    /// carry that name (an earlier run's, or someone else's): removing them at the end would
    /// touch domains this run did not make.
    fn claim_on(
        name: &str,
        provider: &LibvirtProvider,
        image_root: &std::path::Path,
    ) -> anyhow::Result<OwnDomains> {
        let driver = LibvirtDriver::new(name, provider, fleet::spec::DomainType::Qemu, image_root);
        let already = stamped(&driver, name)?;
        anyhow::ensure!(
            already.is_empty(),
            "{} domain(s) on {} already carry fleet {name}'s stamp: {}; the bench removes only the domains it makes, so remove these first (virsh destroy, virsh undefine)",
            already.len(),
            provider.uri,
            already.join(", ")
        );
        Ok(OwnDomains {
            fleet: name.to_owned(),
            uri: provider.uri.clone(),
            driver: Arc::new(driver),
        })
    }

    /// The fleet's default storage pool goes too, once its domains are gone (its directory
    /// is the bench's to remove).
    fn remove_pool(&self) -> anyhow::Result<()> {
        let conn = virt::connect::Connect::open(Some(&self.uri))?;
        if let Ok(pool) = conn.lookup_storage_pool_by_name(&format!("fleet-{}", self.fleet)) {
            if pool.is_active()? {
                pool.destroy()?;
            }
            pool.undefine()?;
        }
        Ok(())
    }

    /// Destroys them now (powered off at once: a bench's VM holds nothing worth a graceful
    /// shutdown), with their disks and seeds. Idempotent.
    fn remove(&self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        // Looked at again after each round: a `fleet serve` killed mid-create can have its
        // definition land after the first look.
        for _ in 0..3 {
            let names = stamped(&self.driver, &self.fleet)?;
            if names.is_empty() {
                return self.remove_pool();
            }
            failed = names
                .iter()
                .filter_map(|vm| {
                    let destroyed = self.driver.destroy(vm, Duration::ZERO);
                    destroyed.err().map(|e| format!("destroy {vm}: {e}"))
                })
                .collect();
        }
        let left = stamped(&self.driver, &self.fleet)?;
        if left.is_empty() {
            return self.remove_pool();
        }
        if failed.is_empty() {
            // The last round removed them all: something made them again.
            failed.push("made again after each removal".into());
        }
        anyhow::bail!(
            "{} domain(s) of fleet {} are still defined: {} ({})",
            left.len(),
            self.fleet,
            left.join(", "),
            failed.join("; ")
        )
    }
}

impl Drop for OwnDomains {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// The domains on the driver's host whose stamp names `fleet`, and each its own name.
fn stamped(driver: &LibvirtDriver, fleet: &str) -> anyhow::Result<Vec<String>> {
    Ok(driver
        .observe()?
        .vms
        .iter()
        .filter(|vm| vm.owned_by(fleet))
        .map(|vm| vm.name.clone())
        .collect())
}

/// A scratch git repository with a fleet of stopped VMs (defined, not booted).
struct ScratchFleet {
    /// Held to be dropped, before `dir` (fields drop in order): the domains go while their
    /// files are still there for the driver to remove.
    _domains: OwnDomains,
    dir: tempfile::TempDir,
}

impl ScratchFleet {
    fn new(fleet: &str) -> anyhow::Result<ScratchFleet> {
        let dir = tempfile::Builder::new().prefix("fleet-bench-").tempdir()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let kernel = std::env::current_dir()?.join("build/image/vmlinuz");
        anyhow::ensure!(
            kernel.is_file(),
            "{} is missing: run `make image`",
            kernel.display()
        );
        let image_root = kernel.parent().expect("image dir");
        let storage = dir.path().join(".fleet/storage");
        let domains = OwnDomains::claim(fleet, &storage, image_root)?;
        let me = ScratchFleet {
            _domains: domains,
            dir,
        };
        me.git(&["init", "-q", "-b", "main"])?;
        me.git(&["config", "user.name", "bench"])?;
        me.git(&["config", "user.email", "bench@fleet.invalid"])?;
        me.write(
            "fleet/fleet.yaml",
            &format!("apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {fleet}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img}}\n  policy: {{overcommit: {{cpu: 32}}}}\n"),
        )?;
        std::fs::write(
            me.host_config(),
            bench_host_yaml(&image_root.to_string_lossy(), &storage.to_string_lossy()),
        )?;
        Ok(me)
    }
    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
    /// Beside the repository's files, outside `fleet/`, as a host's would be.
    fn host_config(&self) -> std::path::PathBuf {
        self.path().join("host.yaml")
    }
    fn write(&self, rel: &str, text: &str) -> anyhow::Result<()> {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        Ok(std::fs::write(p, text)?)
    }
    fn vm(&self, name: &str) -> anyhow::Result<()> {
        self.write(
            &format!("fleet/vms/{name}.yaml"),
            &format!("apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro, state: stopped, resources: {{memory: 64Mi}}}}\n"),
        )
    }
    fn pool(&self, name: &str, replicas: usize) -> anyhow::Result<()> {
        self.pool_in_state(name, replicas, "stopped", "64Mi")
    }
    fn pool_in_state(
        &self,
        name: &str,
        replicas: usize,
        state: &str,
        memory: &str,
    ) -> anyhow::Result<()> {
        self.write(
            &format!("fleet/vms/{name}.yaml"),
            &format!("apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  template:\n    spec: {{provider: local, image: micro, state: {state}, resources: {{memory: {memory}}}}}\n"),
        )
    }
    fn git(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(self.path())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
    fn commit(&self, message: &str) -> anyhow::Result<()> {
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "-m", message])
    }
    fn fleet(&self, args: &[&str]) -> anyhow::Result<String> {
        let fleet = std::env::current_exe()?.with_file_name("fleet");
        let out = std::process::Command::new(fleet)
            .arg("-C")
            .arg(self.path())
            .args(args)
            .env("FLEET_HOST_CONFIG", self.host_config())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "fleet {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    fn apply(&self) -> anyhow::Result<()> {
        self.fleet(&["apply", "--auto-approve"]).map(|_| ())
    }
    /// `fleet serve` on the scratch fleet, stopped when the returned value is dropped (on
    /// every path: a daemon left behind would fight the next run over the same VMs). Held
    /// in a variable declared after the scratch fleet, so it is stopped before the fleet's
    /// domains are removed (it would make them again).
    fn serve(&self) -> anyhow::Result<Serving> {
        let fleet = std::env::current_exe()?.with_file_name("fleet");
        Ok(std::process::Command::new(fleet)
            .arg("-C")
            .arg(self.path())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("FLEET_HOST_CONFIG", self.host_config())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Serving)?)
    }
    fn events(&self) -> String {
        std::fs::read_to_string(self.path().join(".fleet/status/events.jsonl")).unwrap_or_default()
    }
}

/// A running `fleet serve`, killed when dropped.
struct Serving(std::process::Child);

impl Serving {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench_commit_latency(commits: usize) -> anyhow::Result<()> {
    let scratch = ScratchFleet::new("benchlatency")?;
    scratch.vm("lat-00")?;
    scratch.commit("first")?;
    let daemon = scratch.serve()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scratch.events().contains("\"vm\":\"lat-00\"") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "fleet serve did not apply the first commit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut latencies = Vec::new();
    for i in 1..=commits {
        let name = format!("lat-{i:02}");
        scratch.vm(&name)?;
        scratch.commit(&name)?;
        let committed = Instant::now();
        let marker = format!("\"type\":\"step.started\",\"vm\":\"{name}\"");
        let deadline = committed + Duration::from_secs(30);
        while !scratch.events().contains(&marker) {
            anyhow::ensure!(Instant::now() < deadline, "no step for {name} within 30 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(committed.elapsed());
    }
    drop(daemon);
    latencies.sort();
    println!(
        "daemon: commit to first apply step over {commits} commits: median {:.0} ms, p95 {:.0} ms (target p95 <= 1000 ms, ratio {:.2}; Flux polls every 60 s, Argo CD every 120-180 s)",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.95)),
        ms(percentile(&latencies, 0.95)) / 1000.0
    );
    Ok(())
}

fn bench_cached_noop(vms: usize) -> anyhow::Result<()> {
    let scratch = ScratchFleet::new("benchnoop")?;
    scratch.pool("noop", vms)?;
    scratch.commit("pool")?;
    scratch.apply()?;
    let snapshot = fleet::source::from_git(scratch.path(), "fleet", None)?;
    let host = fleet::host::read(&scratch.host_config())?;
    let desired =
        fleet::reconcile::desired(&snapshot, &host).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let drivers = fleet::reconcile::drivers_for(&desired, &host, &fleet::secrets::Vault::default());
    let driver = drivers["local"].clone();
    driver.watch(Arc::new(|_| {}))?;
    let runtime = tokio::runtime::Runtime::new()?;
    // Wait until the event stream is up and the cache is filled.
    std::thread::sleep(Duration::from_millis(500));
    runtime.block_on(fleet::reconcile::observe(&drivers));
    let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
    let (mut fleet_times, mut bare_times, mut calls) = (Vec::new(), Vec::new(), 0);
    let mut observe_times = Vec::new();
    for _ in 0..11 {
        // The bare minimum any client does with a list: each domain's name, UUID and id
        // (all three come with the list; libvirt answers them without a call).
        let t = Instant::now();
        let domains = conn.list_all_domains(0)?;
        let mut running = 0;
        for d in &domains {
            let _ = (d.name()?, d.uuid()?);
            running += usize::from(d.id().is_some());
        }
        // Releasing the listed domains is part of the work (fleet's observe does it too).
        drop(domains);
        bare_times.push(t.elapsed());
        std::hint::black_box(running);
        let before = driver.calls();
        let t = Instant::now();
        let observed = runtime.block_on(fleet::reconcile::observe(&drivers));
        observe_times.push(t.elapsed());
        let plan = fleet::plan::plan(&desired, &observed, &Default::default());
        fleet_times.push(t.elapsed());
        calls = driver.calls() - before;
        anyhow::ensure!(
            !plan.has_changes(),
            "the no-op plan has {} steps",
            plan.steps().len()
        );
    }
    fleet_times.sort();
    bare_times.sort();
    observe_times.sort();
    let (f, b) = (fleet_times[5], bare_times[5]);
    println!(
        "daemon: no-op reconcile of {vms} VMs from the event-fed cache: {calls} libvirt call(s), median {:.1} ms (observe {:.1} ms), next to the bare list call (with each domain's name, UUID and id read, and the list freed) {:.1} ms: ratio {:.2} (target <= 1.5)",
        ms(f),
        ms(observe_times[5]),
        ms(b),
        f.as_secs_f64() / b.as_secs_f64()
    );
    Ok(())
}

/// utime + stime of a process and its children still running, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    for p in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after_comm.split_whitespace().collect();
            total += fields
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            total += fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(&pid.to_string(), "VmRSS")
}

/// Idle: `vms` stopped VMs and `running` running ones whose agents are connected (each with
/// its link thread), nothing to do.
fn bench_idle(vms: usize, running: usize, seconds: u64) -> anyhow::Result<()> {
    let scratch = ScratchFleet::new("benchidle")?;
    scratch.pool("idle", vms)?;
    if running > 0 {
        scratch.pool_in_state("run", running, "running", "128Mi")?;
    }
    scratch.commit("pool")?;
    let daemon = scratch.serve()?;
    let pid = daemon.id();
    let deadline = Instant::now() + Duration::from_secs(240);
    let connected = || {
        (1..=running)
            .filter(|i| {
                let file = scratch
                    .path()
                    .join(format!(".fleet/status/vms/run-{i:02}.yaml"));
                std::fs::read_to_string(file).is_ok_and(|t| t.contains("connected: true"))
            })
            .count()
    };
    while !scratch.events().contains("\"type\":\"apply.finished\"") || connected() < running {
        anyhow::ensure!(
            Instant::now() < deadline,
            "fleet serve did not converge with every agent connected (applied: {}, agents connected: {} of {running})",
            scratch.events().contains("\"type\":\"apply.finished\""),
            connected()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(seconds));
    let (elapsed, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid));
    let cpu_percent = (c1 - c0) as f64 / ticks_per_second / elapsed * 100.0;
    let rss = rss_mib(pid);
    drop(daemon);
    println!(
        "daemon: idle with {vms} stopped VMs and {running} running ones (agents connected) over {seconds} s: CPU {cpu_percent:.2} % (target < 0.5 %, ratio {:.2}), RSS {rss:.0} MiB (target < 60 MB = 57 MiB, ratio {:.2})",
        cpu_percent / 0.5,
        rss / 57.2
    );
    Ok(())
}

/// A host configuration for the benchmarks: room for every VM they make.
fn bench_host_yaml(image_root: &str, storage: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {{name: local, type: libvirt, uri: 'qemu:///system', storageDir: '{storage}'}}\n  imageRoot: '{image_root}'\n  limits: {{maxVms: 100000, maxCpus: 1000000, maxMemory: 100Ti, minInterval: 1s}}\n"
    )
}

fn bench_host(image_root: &str, storage: &str) -> anyhow::Result<HostSpec> {
    fleet::load::load_host(
        "bench host",
        bench_host_yaml(image_root, storage).as_bytes(),
    )
    .map_err(|d| anyhow::anyhow!("{d:?}"))
}

fn snapshot(vms: usize, state: &str) -> Snapshot {
    let fleet = "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: bench}\nspec:\n  providers:\n    - {name: local, type: libvirt, domainType: qemu}\n  images:\n    - {name: micro, kernel: vmlinuz}\n".to_owned();
    let pool = format!(
        "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: bench}}\nspec:\n  replicas: {vms}\n  template:\n    spec: {{provider: local, image: micro, state: {state}, resources: {{memory: 128Mi}}}}\n"
    );
    bench_snapshot(
        "b",
        vec![
            ("fleet/fleet.yaml".into(), fleet),
            ("fleet/vms/bench.yaml".into(), pool),
        ],
    )
}

/// A revision of `files` (path, text) whose id is `id_char` repeated.
fn bench_snapshot(id_char: &str, files: Vec<(String, String)>) -> Snapshot {
    Snapshot {
        revision: Revision {
            id: id_char.repeat(40),
            label: "bench".into(),
            signed_by: None,
        },
        fleet_dir: "fleet".into(),
        files: files
            .into_iter()
            .map(|(path, text)| SourceFile {
                path,
                bytes: text.into_bytes(),
            })
            .collect(),
        signers: Default::default(),
    }
}

/// A memory field (`VmHWM`, `VmRSS`, ...) of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| {
                    l.strip_prefix(field)
                        .is_some_and(|rest| rest.starts_with(':'))
                })
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn peak_rss_mib() -> f64 {
    status_mib("self", "VmHWM")
}

fn bench_plan(vms: usize) -> anyhow::Result<()> {
    let snap = snapshot(vms, "running");
    let host = bench_host("/var/lib/fleet/images", "/var/lib/fleet/storage")?;
    // Observed: every VM applied as desired, except one in a hundred with older memory, so
    // the plan has real work to render.
    let desired = fleet::reconcile::desired(&snap, &host).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let observed_vms: Vec<Arc<ObservedVm>> = desired
        .vms
        .values()
        .enumerate()
        .map(|(i, vm)| {
            let mut config = vm.config.clone();
            if i % 100 == 0 {
                config.memory_mib = 64;
            }
            Arc::new(ObservedVm {
                name: vm.name.clone(),
                uuid: String::new(),
                running: true,
                cpus: config.cpus,
                memory_mib: config.memory_mib,
                stamp: Some(Arc::new(Stamp {
                    fleet: "bench".into(),
                    name: vm.name.clone(),
                    spec_hash: config.hash(),
                    revision: "a".repeat(40),
                    protect: false,
                    config: Some(config),
                    created: None,
                    adopted: false,
                })),
            })
        })
        .collect();
    let observed = Observed {
        hosts: BTreeMap::from([(
            "local".to_owned(),
            ObservedHost {
                vms: observed_vms,
                ..Default::default()
            },
        )]),
        unreachable: BTreeMap::new(),
    };
    drop(desired);

    let started = Instant::now();
    let desired = fleet::reconcile::desired(&snap, &host).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let loaded = started.elapsed();
    let plan = fleet::plan::plan(&desired, &observed, &Default::default());
    let planned = started.elapsed();
    let text = fleet::plan::render::text(&plan);
    let json = fleet::plan::render::json(&plan);
    let total = started.elapsed();
    let rss = peak_rss_mib();
    println!(
        "plan: {vms} VMs, {} steps: load+resolve {:.0} ms, plan {:.0} ms, render {:.0} ms ({} KiB text, {} KiB json)",
        plan.steps().len(),
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

/// Defines `desired`'s VMs on `provider` with `driver`, stopped (the benches measure
/// observation, not boots).
fn define_stopped(
    driver: &LibvirtDriver,
    desired: &fleet::resolve::Desired,
    provider: &str,
) -> anyhow::Result<()> {
    for vm in desired
        .vms
        .values()
        .filter(|vm| vm.config.provider == provider)
    {
        let stamp = Stamp {
            fleet: desired.fleet.clone(),
            name: vm.name.clone(),
            spec_hash: vm.spec_hash.clone(),
            revision: desired.revision.id.clone(),
            protect: false,
            config: Some(vm.config.clone()),
            created: None,
            adopted: false,
        };
        driver
            .create(vm, &stamp, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("create {} on {provider}: {e}", vm.name))?;
    }
    Ok(())
}

/// The bare libvirt calls a no-op observation of `fleet` needs on one host, made the way
/// fleet makes them (the same number of threads over one connection): the list, then each
/// domain with the fleet's UUID for its name read whole, each other asked for fleet's stamp
/// (refused at once without one: that is the answer). Returns the domains on the host.
fn bare_observe(conn: &virt::connect::Connect, fleet: &str) -> anyhow::Result<usize> {
    let domains = conn.list_all_domains(0)?;
    let readers = domains
        .len()
        .div_ceil(fleet::driver::libvirt::OBSERVE_PER_READER)
        .clamp(1, fleet::driver::libvirt::OBSERVE_READERS);
    let chunk = domains.len().div_ceil(readers).max(1);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let reading: Vec<_> = domains
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for d in part {
                        if d.uuid()? == fleet::driver::libvirt::domain_uuid(fleet, &d.name()?) {
                            let _ = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                        } else {
                            let _ = d.metadata(
                                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                                Some(fleet::driver::libvirt::domain_xml::STAMP_NS),
                                virt::sys::VIR_DOMAIN_AFFECT_CONFIG,
                            );
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in reading {
            handle.join().expect("bare reader")?;
        }
        Ok(())
    })?;
    Ok(domains.len())
}

/// Domains no fleet made, defined for a bench (no disk: they are never started) and
/// undefined when dropped, on every path.
struct ForeignDomains(Vec<virt::domain::Domain>);

impl ForeignDomains {
    fn define(count: usize) -> anyhow::Result<ForeignDomains> {
        let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
        let mut made = ForeignDomains(Vec::with_capacity(count));
        for i in 0..count {
            let name = format!("bench-foreign-{}-{i}", std::process::id());
            made.0.push(conn.define_domain_xml(&format!(
                "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><serial type='pty'/><console type='pty'/></devices></domain>"
            ))?);
        }
        Ok(made)
    }
}

impl Drop for ForeignDomains {
    fn drop(&mut self) {
        for dom in &self.0 {
            if let Err(e) = dom.undefine() {
                eprintln!("cleanup: undefine {:?}: {e}", dom.name());
            }
        }
    }
}

/// A no-op plan of `vms` fleet VMs on a host that also holds `foreign` domains no fleet
/// made, next to the bare libvirt calls it needs: the list, each fleet domain's definition,
/// and each foreign domain's stamp (which libvirt refuses at once). With foreign domains it
/// also times reading every domain's definition, which fleet did before it read stamps.
fn bench_libvirt_observe(vms: usize, foreign: usize) -> anyhow::Result<()> {
    let repo_root = std::env::current_dir()?;
    let kernel = repo_root.join("build/image/vmlinuz");
    anyhow::ensure!(
        kernel.is_file(),
        "{} is missing: run `make image`",
        kernel.display()
    );
    let snap = snapshot(vms, "stopped");
    let storage = repo_root.join(".fleet/bench-storage");
    let image_root = kernel.parent().expect("image dir");
    let host = bench_host(&image_root.to_string_lossy(), &storage.to_string_lossy())?;
    let desired = fleet::reconcile::desired(&snap, &host).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let domains = OwnDomains::claim(&desired.fleet, &storage, image_root)?;
    let driver = domains.driver.clone();
    let t = Instant::now();
    let _foreign = ForeignDomains::define(foreign)?;
    if foreign > 0 {
        println!(
            "observe: defined {foreign} foreign domains in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    // Inside, so a create that fails midway is cleaned up too.
    let result = (|| -> anyhow::Result<()> {
        // Define the fleet's VMs (stopped: the bench measures observation, not boots).
        let t = Instant::now();
        define_stopped(&driver, &desired, "local")?;
        println!(
            "observe: defined {vms} stopped VMs in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let runtime = tokio::runtime::Runtime::new()?;
        let drivers: Drivers =
            BTreeMap::from([("local".to_owned(), driver.clone() as Arc<dyn Driver>)]);
        let mut fleet_times = Vec::new();
        let mut bare_times = Vec::new();
        let mut whole_times = Vec::new();
        let mut calls = 0;
        let mut on_host = 0;
        for _ in 0..5 {
            let before = driver.calls();
            let t = Instant::now();
            let observed = runtime.block_on(fleet::reconcile::observe(&drivers));
            let plan = fleet::plan::plan(&desired, &observed, &Default::default());
            fleet_times.push(t.elapsed());
            calls = driver.calls() - before;
            anyhow::ensure!(
                !plan.has_changes(),
                "the no-op plan has {} steps",
                plan.steps().len()
            );

            let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
            let t = Instant::now();
            on_host = bare_observe(&conn, &desired.fleet)?;
            bare_times.push(t.elapsed());

            if foreign > 0 {
                let t = Instant::now();
                for d in &conn.list_all_domains(0)? {
                    let _ = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                }
                whole_times.push(t.elapsed());
            }
        }
        fleet_times.sort();
        bare_times.sort();
        let (f, b) = (fleet_times[2], bare_times[2]);
        println!(
            "observe: no-op plan of {vms} VMs on a host of {on_host} domains ({foreign} foreign) made {calls} libvirt calls (1 list, then each fleet domain's definition or each other domain's stamp); median of 5: fleet {:.0} ms, bare calls {:.0} ms, ratio {:.2} (target <= {})",
            ms(f),
            ms(b),
            f.as_secs_f64() / b.as_secs_f64(),
            if foreign > 0 { "1.2" } else { "1.5" }
        );
        if foreign > 0 {
            whole_times.sort();
            let w = whole_times[2];
            println!(
                "observe: reading every domain's whole definition instead (as fleet did before it read stamps): {:.0} ms, {:.2}x fleet's",
                ms(w),
                w.as_secs_f64() / f.as_secs_f64()
            );
        }
        Ok(())
    })();

    let t = Instant::now();
    let removed = domains.remove();
    if removed.is_ok() {
        // Kept otherwise: the files of domains still defined.
        let _ = std::fs::remove_dir_all(&storage);
        println!(
            "observe: removed the {vms} VMs in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    result.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_domain_left_behind_or_gone_fails_the_run_by_name() {
        let before = names(&["mine", "theirs"]);
        assert!(same_domains(&before, &names(&["theirs", "mine"])).is_ok());

        let left = same_domains(
            &before,
            &names(&["mine", "noop-0001", "theirs", "idle-001"]),
        )
        .expect_err("domains were left behind");
        assert!(
            left.to_string()
                .contains("2 domain(s) left defined: idle-001, noop-0001"),
            "{left}"
        );

        let gone = same_domains(&before, &names(&["mine"])).expect_err("a domain is gone");
        assert!(
            gone.to_string()
                .contains("1 domain(s) defined before are gone: theirs"),
            "{gone}"
        );
    }
}
