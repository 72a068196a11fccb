//! Crash safety under faults, on real libvirtd (`make crash-test TRIALS=N`).
//!
//! A fleet of up to `--vms` micro VMs (default 20) in a temporary git repository. Each trial
//! commits a random mix of creates, replaces (a loadout whose runcmd changes) and destroys,
//! starts `fleet apply --auto-approve`, and after a random delay kills it with SIGKILL — or,
//! every fourth trial, kills libvirtd and starts it again — then runs `fleet apply` to
//! completion and checks:
//! - duplicates: a VM's stamp on more than one domain, or on a domain of another name;
//! - orphans: storage fleet made (overlays, seed ISOs, console logs: volumes in its pool, or
//!   directories of VMs made before) with no domain of its VM, and image uploads cut short;
//! - converged: the domains are exactly the fleet's VMs, each with the spec hash of its
//!   revision, and a fresh `fleet plan` has no changes;
//! - the journal: no intent left unfinished.
//!
//! Then `--fresh-trials` (default 3) trials of fresh task runs under `fleet serve`: a pool
//! with one warm member, a task that wants a fresh member per run; each trial bumps the
//! task's `rerun`, starts `fleet serve`, kills it with SIGKILL after a random delay, starts
//! it again and waits for the run to succeed, then checks the same duplicates and orphans,
//! and that the run's member is gone, exactly one warm member runs, and `fleet plan` is
//! empty.
//!
//! Then `--workspace-trials` (default 4) trials that move workspaces: three workspaces, each
//! trial attaches, detaches, moves or swaps them between VMs and replaces (snapshotting the
//! workspace first, by the VM's policy) or destroys the VMs holding them, then kills fleet
//! (or libvirtd) mid-apply as above. Right after the fault
//! and again after recovery it checks that no workspace is attached to two domains (saved
//! or running definition), and after recovery that every workspace is the volume it was
//! (same file, never remade) and attached exactly where the revision says.
//!
//! Then `--upload-trials` (default 3) trials that ship images: the image's initrd, in an
//! image root of the trial's own, is rebuilt in place with another length (16 MiB and more),
//! so every VM is updated onto it and the new content is shipped into the fleet's storage
//! pool first; fleet (or libvirtd) is killed within the first 600 ms, mostly mid-upload.
//! After recovery, besides duplicates, orphans and convergence: the pool holds exactly the
//! kernel and initrd the VMs boot from, each with its marker (an upload cut short, or an
//! image no VM uses any more, is an orphan).
//!
//! Ends with one line: `trials=N duplicates=D orphans=O converged=C lost=L`; exits 1 unless
//! D, O and L are 0 and C is N (all trials together). A workspace attached to two domains
//! counts as a duplicate; one lost or remade counts in L. Needs `make image` and a running
//! libvirtd.
//!
//! Usage: fleet-crash [--trials N] [--fresh-trials N] [--workspace-trials N]
//!        [--upload-trials N] [--vms N] [--seed S]

#![allow(clippy::disallowed_methods)] // a tool writes scratch files freely

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

const URI: &str = "qemu:///system";

/// xorshift64*: reproducible from `--seed`, no dependency needed for a test driver.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn virsh(args: &[&str]) -> Result<std::process::Output> {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

fn git(repo: &Path, args: &[&str]) -> Result<()> {
    let out = run(Command::new("git").arg("-C").arg(repo).args(args))?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The fleet as the trials change it: VM name → loadout variant.
struct Fleet {
    repo: PathBuf,
    name: String,
    vms: BTreeMap<String, u32>,
    /// The fresh trials' pool and task, with the task's `rerun`.
    fresh: Option<u32>,
    /// The workspace trials' workspaces: name → the VM it is attached to, if any.
    workspaces: BTreeMap<String, Option<String>>,
}

impl Fleet {
    fn write(&self) -> Result<()> {
        let dir = self.repo.join("fleet/vms");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        for (vm, variant) in &self.vms {
            let mounts = match self.workspace_of(vm) {
                // Replaces snapshot it first: the policy runs under the faults too.
                Some(ws) => format!(
                    ", workspaces: [{{name: {ws}, mountPath: /workspace}}], snapshots: {{before: [replace], keep: 2}}"
                ),
                None => String::new(),
            };
            std::fs::write(
                dir.join(format!("{vm}.yaml")),
                format!(
                    "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, loadout: v{variant}, resources: {{memory: 128Mi}}{mounts}}}\n"
                ),
            )?;
        }
        if !self.workspaces.is_empty() {
            let dir = self.repo.join("fleet/workspaces");
            std::fs::create_dir_all(&dir)?;
            for ws in self.workspaces.keys() {
                std::fs::write(
                    dir.join(format!("{ws}.yaml")),
                    format!(
                        "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {{name: {ws}}}\nspec: {{provider: local, size: 64Mi}}\n"
                    ),
                )?;
            }
        }
        if let Some(rerun) = self.fresh {
            std::fs::write(
                dir.join("pool.yaml"),
                format!(
                    "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {}}}\nspec:\n  replicas: 0\n  fresh: {{warm: 1, max: 2}}\n  template:\n    spec: {{provider: local, image: micro, resources: {{memory: 128Mi}}}}\n",
                    self.pool()
                ),
            )?;
            std::fs::create_dir_all(self.repo.join("fleet/tasks"))?;
            std::fs::write(
                self.repo.join("fleet/tasks/job.yaml"),
                format!(
                    "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: job}}\nspec:\n  vm: {{pool: {}, fresh: true}}\n  command: [sh, -c, 'echo run {rerun} in $FLEET_VM; sleep 1']\n  rerun: {rerun}\n",
                    self.pool()
                ),
            )?;
        }
        git(&self.repo, &["add", "-A"])?;
        git(
            &self.repo,
            &["commit", "-q", "--allow-empty", "-m", "trial"],
        )
    }

    /// The workspace attached to `vm` (a VM holds at most one in these trials).
    fn workspace_of(&self, vm: &str) -> Option<&str> {
        self.workspaces
            .iter()
            .find(|(_, holder)| holder.as_deref() == Some(vm))
            .map(|(ws, _)| ws.as_str())
    }

    /// Where libvirt keeps a workspace's volume (fleet's pool for the fleet).
    fn workspace_volume(&self, ws: &str) -> PathBuf {
        self.repo
            .join(".fleet/storage")
            .join(&self.name)
            .join(".workspaces")
            .join(format!("{ws}.qcow2"))
    }

    fn pool(&self) -> String {
        format!("{}-p", self.name)
    }

    fn fleet(&self) -> Command {
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = Command::new(exe.with_file_name("fleet"));
        cmd.arg("-C")
            .arg(&self.repo)
            .env("FLEET_HOST_CONFIG", self.host_config());
        cmd
    }

    /// The trial's host configuration, beside the repository's files (outside `fleet/`).
    fn host_config(&self) -> std::path::PathBuf {
        self.repo.join("host.yaml")
    }

    fn domains(&self) -> Result<Vec<String>> {
        let out = virsh(&["list", "--all", "--name"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|n| n.starts_with(&format!("{}-", self.name)))
            .map(str::to_owned)
            .collect())
    }
}

fn setup(vms: usize, rng: &mut Rng) -> Result<Fleet> {
    let root = std::env::current_dir()?;
    let (kernel, initrd) = (
        root.join("build/image/vmlinuz"),
        root.join("build/image/initrd.img"),
    );
    if !kernel.exists() || !initrd.exists() {
        bail!("no micro image under build/image; run make image");
    }
    let repo = std::env::temp_dir().join(format!("fleet-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(repo.join("fleet/loadouts"))?;
    // qemu runs as its own user and writes console logs under the repository.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755))?;
    let name = format!("crash{}", std::process::id());
    std::fs::write(
        repo.join("fleet/fleet.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {name}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: micro, kernel: vmlinuz, initrd: initrd.img, cmdline: quiet}}\n  policy: {{maxParallel: 4, shutdownTimeout: 2s, maxDestroysPerApply: 1000, overcommit: {{cpu: 32}}}}\n"
        ),
    )?;
    std::fs::write(
        repo.join("host.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {{name: local, type: libvirt, uri: '{URI}', storageDir: '{}'}}\n  imageRoot: '{}'\n",
            repo.join(".fleet/storage").display(),
            root.join("build/image").display()
        ),
    )?;
    for v in [1, 2] {
        std::fs::write(
            repo.join(format!("fleet/loadouts/v{v}.yaml")),
            format!(
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: v{v}}}\nspec:\n  runcmd: [\"echo variant {v}\"]\n"
            ),
        )?;
    }
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["config", "user.name", "fleet-crash"])?;
    git(&repo, &["config", "user.email", "crash@fleet.invalid"])?;
    let vms = (1..=vms)
        .filter(|_| rng.below(4) != 0)
        .map(|i| (format!("{name}-{i:02}"), 1))
        .collect();
    let fleet = Fleet {
        repo,
        name,
        vms,
        fresh: None,
        workspaces: BTreeMap::new(),
    };
    fleet.write()?;
    Ok(fleet)
}

/// A random mix of creates, replaces and destroys; at least one VM stays.
fn mutate(fleet: &mut Fleet, slots: usize, rng: &mut Rng) {
    let changes = 2 + rng.below(6);
    for _ in 0..changes {
        let slot = format!("{}-{:02}", fleet.name, 1 + rng.below(slots as u64));
        match (fleet.vms.get(&slot).copied(), rng.below(3)) {
            (None, _) => {
                fleet.vms.insert(slot, 1 + (rng.below(2) as u32));
            }
            (Some(v), 0 | 1) => {
                fleet.vms.insert(slot, 3 - v);
            }
            (Some(_), _) if fleet.vms.len() > 1 => {
                fleet.vms.remove(&slot);
            }
            _ => {}
        }
    }
}

/// Moves the workspaces about: each is attached to a VM holding none, swapped with another
/// workspace's VM, detached, has its VM replaced or destroyed, or goes to a new VM. A VM
/// holds at most one workspace, and receives at most one per trial.
fn mutate_workspaces(fleet: &mut Fleet, slots: usize, rng: &mut Rng) {
    let held: BTreeSet<String> = fleet.workspaces.values().flatten().cloned().collect();
    let mut targeted = BTreeSet::new();
    let names: Vec<String> = fleet.workspaces.keys().cloned().collect();
    for ws in names {
        let holder = fleet.workspaces[&ws].clone();
        // Attaching and replacing weigh twice: detaching is what most other moves do too.
        match rng.below(8) {
            7 => {
                // Two VMs trade workspaces in one commit: each lets go first, then takes.
                let other = fleet
                    .workspaces
                    .iter()
                    .filter(|(name, h)| **name != ws && h.is_some())
                    .map(|(name, h)| (name.clone(), h.clone().unwrap_or_default()))
                    .find(|(_, h)| !targeted.contains(h));
                if let (Some(mine), Some((other, theirs))) = (holder.clone(), other)
                    && !targeted.contains(&mine)
                {
                    targeted.insert(mine.clone());
                    targeted.insert(theirs.clone());
                    fleet.workspaces.insert(ws, Some(theirs));
                    fleet.workspaces.insert(other, Some(mine));
                }
            }
            0 | 1 => {
                let free: Vec<String> = fleet
                    .vms
                    .keys()
                    .filter(|vm| !held.contains(*vm) && !targeted.contains(*vm))
                    .cloned()
                    .collect();
                if !free.is_empty() {
                    let to = free[rng.below(free.len() as u64) as usize].clone();
                    targeted.insert(to.clone());
                    fleet.workspaces.insert(ws, Some(to));
                }
            }
            2 => {
                fleet.workspaces.insert(ws, None);
            }
            3 | 4 => {
                if let Some(vm) = holder
                    && let Some(variant) = fleet.vms.get_mut(&vm)
                {
                    *variant = 3 - *variant;
                }
            }
            5 => {
                if let Some(vm) = holder
                    && fleet.vms.len() > 1
                    && !targeted.contains(&vm)
                {
                    fleet.vms.remove(&vm);
                    fleet.workspaces.insert(ws, None);
                }
            }
            _ => {
                let slot = format!("{}-{:02}", fleet.name, 1 + rng.below(slots as u64));
                if !fleet.vms.contains_key(&slot) {
                    fleet.vms.insert(slot.clone(), 1 + (rng.below(2) as u32));
                    targeted.insert(slot.clone());
                    fleet.workspaces.insert(ws, Some(slot));
                }
            }
        }
    }
}

/// The fleet's domains whose definitions (saved or running) attach each workspace.
fn workspace_holders(fleet: &Fleet) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in fleet.domains()? {
        let saved = virsh(&["dumpxml", "--inactive", &d])?;
        let running = virsh(&["dumpxml", &d])?;
        for ws in fleet.workspaces.keys() {
            // A workspace disk is a volume of fleet's pool: `<source pool=… volume='ws1.qcow2'/>`.
            let path = format!("volume='{ws}.qcow2'");
            if [&saved.stdout, &running.stdout]
                .iter()
                .any(|xml| String::from_utf8_lossy(xml).contains(&path))
            {
                holders.entry(ws.clone()).or_default().insert(d.clone());
            }
        }
    }
    Ok(holders)
}

/// Workspaces attached to two domains at once, as duplicates.
fn attached_twice(fleet: &Fleet, when: &str, f: &mut Findings) -> Result<()> {
    for (ws, domains) in workspace_holders(fleet)? {
        if domains.len() > 1 {
            f.duplicates += domains.len() - 1;
            f.notes
                .push(format!("{when}: workspace {ws} is attached to {domains:?}"));
        }
    }
    Ok(())
}

/// A volume file's identity: its inode and birth time (a file deleted and made again may
/// get the same inode, never the same birth time).
type FileId = (u64, Option<SystemTime>);

/// Each workspace's volume by identity: a workspace lost, or remade empty, has none or
/// another. A workspace is made with the first VM that mounts it, so one no VM mounted
/// yet has none.
fn workspace_ids(fleet: &Fleet) -> BTreeMap<String, Option<FileId>> {
    use std::os::unix::fs::MetadataExt;
    fleet
        .workspaces
        .keys()
        .map(|ws| {
            let id = std::fs::metadata(fleet.workspace_volume(ws))
                .ok()
                .map(|m| (m.ino(), m.created().ok()));
            (ws.clone(), id)
        })
        .collect()
}

/// After recovery: every workspace made so far is the volume it was (its identity the
/// first seen, kept in `first`), and attached where the revision says.
fn workspaces_kept(
    fleet: &Fleet,
    first: &mut BTreeMap<String, FileId>,
    f: &mut Findings,
) -> Result<usize> {
    let mut lost = 0;
    for (ws, id) in workspace_ids(fleet) {
        match (first.get(&ws), id) {
            (None, Some(id)) => {
                first.insert(ws, id);
            }
            (None, None) => {}
            (Some(was), now) if now.as_ref() != Some(was) => {
                lost += 1;
                f.notes
                    .push(format!("workspace {ws}: volume {now:?}, first {was:?}"));
            }
            (Some(_), _) => {}
        }
    }
    let holders = workspace_holders(fleet)?;
    for (ws, want) in &fleet.workspaces {
        let have = holders.get(ws).cloned().unwrap_or_default();
        let want: BTreeSet<String> = want.iter().cloned().collect();
        if have != want {
            f.converged = false;
            f.notes.push(format!(
                "workspace {ws} is attached to {have:?}, and the revision says {want:?}"
            ));
        }
    }
    Ok(lost)
}

/// The fault a trial injected, for its report line.
fn fault(kill_libvirtd: bool) -> &'static str {
    if kill_libvirtd {
        "libvirtd killed"
    } else {
        "fleet killed"
    }
}

/// Whether the fault hit during the apply, for a trial's report line.
fn when(mid_apply: bool) -> &'static str {
    if mid_apply {
        "mid-apply"
    } else {
        "apply had ended"
    }
}

fn wait_for_libvirtd() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if virsh(&["version"]).is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("libvirtd did not come back")
}

/// One apply interrupted by a fault: SIGKILL to fleet, or libvirtd killed and restarted.
/// Returns whether fleet was still applying when the fault hit.
fn interrupted_apply(fleet: &Fleet, kill_libvirtd: bool, delay: Duration) -> Result<bool> {
    let mut child = fleet
        .fleet()
        .args(["apply", "--auto-approve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(delay);
    let mid_apply = child.try_wait()?.is_none();
    if kill_libvirtd {
        let _ = run(Command::new("pkill").args(["-9", "-x", "libvirtd"]));
        std::thread::sleep(Duration::from_millis(300));
        run(Command::new("libvirtd").arg("-d"))?;
        wait_for_libvirtd()?;
    } else {
        let _ = child.kill();
    }
    let _ = child.wait();
    Ok(mid_apply)
}

/// `fleet apply` until it succeeds (a restarted libvirtd may fail the first steps).
fn recover(fleet: &Fleet) -> Result<()> {
    let mut last = String::new();
    for _ in 0..4 {
        let out = run(fleet.fleet().args(["apply", "--auto-approve"]))?;
        if out.status.success() {
            if std::env::var_os("FLEET_CRASH_VERBOSE").is_some() {
                eprintln!(
                    "recovery:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("fleet apply did not succeed after the fault:\n{last}")
}

/// `recover`, again while the plan has steps: a VM that receives a workspace another VM
/// let go of in the same apply waits for the next pass (one `fleet apply` each here).
fn recover_moves(fleet: &Fleet) -> Result<()> {
    for _ in 0..3 {
        recover(fleet)?;
        let plan = run(fleet.fleet().args(["plan", "--detailed-exitcode"]))?;
        if plan.status.code() == Some(0) {
            break;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Findings {
    duplicates: usize,
    orphans: usize,
    converged: bool,
    notes: Vec<String>,
}

/// Duplicates and orphans among the fleet's domains; the domains.
fn integrity(fleet: &Fleet, f: &mut Findings) -> Result<BTreeSet<String>> {
    let domains = fleet.domains()?;
    let mut stamped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &domains {
        let xml = virsh(&["dumpxml", "--inactive", d])?;
        let vm = fleet::driver::libvirt::domain_xml::parse(&String::from_utf8_lossy(&xml.stdout))
            .map_err(anyhow::Error::msg)?;
        if let Some(stamp) = &vm.stamp {
            stamped
                .entry(stamp.name.clone())
                .or_default()
                .push(d.clone());
        }
    }
    for (vm, holders) in &stamped {
        if holders.len() > 1 || holders.iter().any(|h| h != vm) {
            f.duplicates += holders.len().saturating_sub(1).max(1);
            f.notes.push(format!("{vm} is stamped on {holders:?}"));
        }
    }
    let storage = fleet.repo.join(".fleet/storage").join(&fleet.name);
    let on_disk: BTreeSet<String> = std::fs::read_dir(&storage)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    let domain_set: BTreeSet<String> = domains.iter().cloned().collect();
    for orphan in on_disk.difference(&domain_set) {
        f.orphans += 1;
        f.notes
            .push(format!("storage of {orphan} without a domain"));
    }
    // The pool's volumes: a VM's without its domain, or an image upload cut short (no
    // marker) that recovery left behind.
    let volumes: BTreeSet<String> = std::fs::read_dir(storage.join(".volumes"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Console logs (no volumes) of VMs without a domain.
    for log in std::fs::read_dir(storage.join(".volumes/logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = log.file_name().to_string_lossy().into_owned();
        let vm = name.split_once('.').map(|(vm, _)| vm.to_owned());
        if vm.is_some_and(|vm| !domain_set.contains(&vm)) {
            f.orphans += 1;
            f.notes.push(format!("console log {name} without a domain"));
        }
    }
    for volume in &volumes {
        let vm = fleet::driver::libvirt::volumes::owner_of_volume(&fleet.name, volume);
        if vm.as_ref().is_some_and(|vm| !domain_set.contains(vm)) {
            f.orphans += 1;
            f.notes.push(format!("volume {volume} without a domain"));
        }
        let image = volume.starts_with("sha256-") && !volume.ends_with(".ok");
        if image && !volumes.contains(&format!("{volume}.ok")) {
            f.orphans += 1;
            f.notes.push(format!("image volume {volume} cut short"));
        }
    }
    Ok(domain_set)
}

fn check(fleet: &Fleet) -> Result<Findings> {
    let mut f = Findings::default();
    let domain_set = integrity(fleet, &mut f)?;
    let want: BTreeSet<String> = fleet.vms.keys().cloned().collect();
    let plan = run(fleet.fleet().args(["plan", "--detailed-exitcode"]))?;
    let journal =
        std::fs::read_to_string(fleet.repo.join(".fleet/status/journal.jsonl")).unwrap_or_default();
    let open = open_intents(&journal);
    f.converged = domain_set == want && plan.status.code() == Some(0) && open == 0;
    if !f.converged {
        // The plan's steps and errors say what is left.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&plan.stdout),
            String::from_utf8_lossy(&plan.stderr)
        );
        let left: Vec<&str> = said
            .lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("   ") || l.contains("error"))
            .take(6)
            .collect();
        f.notes.push(format!(
            "not converged: domains {:?} vs fleet {:?}; plan exit {:?}; {open} open intent(s); {left:?}",
            domain_set.symmetric_difference(&want).collect::<Vec<_>>(),
            want.len(),
            plan.status.code()
        ));
    }
    Ok(f)
}

/// `fleet serve` on the trial's repository, its output dropped.
fn serve(fleet: &Fleet) -> Result<std::process::Child> {
    Ok(fleet
        .fleet()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// A top-level scalar of a status YAML file.
fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim().trim_matches('\'').to_owned())
}

/// One fresh trial: a new run of the task, `fleet serve` killed `delay` after it starts and
/// started again; then the run must succeed on a member that is gone afterwards, with one
/// warm member left and nothing else to do.
fn fresh_trial(fleet: &Fleet, rerun: u32, delay: Duration) -> Result<Findings> {
    let mut daemon = serve(fleet)?;
    std::thread::sleep(delay);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mut daemon = serve(fleet)?;
    let record_path = fleet.repo.join(".fleet/status/tasks/job.yaml");
    let members = || -> Result<Vec<String>> {
        let prefix = format!("{}-f", fleet.pool());
        Ok(fleet
            .domains()?
            .into_iter()
            .filter(|d| d.starts_with(&prefix))
            .collect())
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut settled = false;
    while Instant::now() < deadline {
        let record = std::fs::read_to_string(&record_path).unwrap_or_default();
        let done = status_field(&record, "rerun") == Some(rerun.to_string())
            && status_field(&record, "phase").as_deref() == Some("Succeeded");
        let member = status_field(&record, "vm").unwrap_or_default();
        let now = members()?;
        if done && now.len() == 1 && !now.contains(&member) {
            settled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mut f = Findings::default();
    integrity(fleet, &mut f)?;
    let plan = run(fleet.fleet().args(["plan", "--detailed-exitcode"]))?;
    let journal =
        std::fs::read_to_string(fleet.repo.join(".fleet/status/journal.jsonl")).unwrap_or_default();
    let open = open_intents(&journal);
    f.converged = settled && plan.status.code() == Some(0) && open == 0;
    if !f.converged {
        let record = std::fs::read_to_string(&record_path).unwrap_or_default();
        f.notes.push(format!(
            "not converged: settled {settled}, members {:?}, plan exit {:?}, {open} open intent(s); record:\n{record}",
            members()?,
            plan.status.code()
        ));
    }
    Ok(f)
}

/// Intents in the journal without an outcome.
fn open_intents(journal: &str) -> usize {
    let mut open = BTreeSet::new();
    for line in journal.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let op = v["op"].as_u64().unwrap_or(0);
        match v["record"].as_str() {
            Some("intent") => {
                open.insert(op);
            }
            Some("outcome") => {
                open.remove(&op);
            }
            _ => {}
        }
    }
    open.len()
}

/// The workspace trials (see the top): returns duplicates, orphans, converged trials and
/// workspaces lost.
fn workspace_trials(
    fleet: &mut Fleet,
    trials: usize,
    slots: usize,
    rng: &mut Rng,
) -> Result<(usize, usize, usize, usize)> {
    if trials == 0 {
        return Ok((0, 0, 0, 0));
    }
    let vms: Vec<String> = fleet.vms.keys().cloned().collect();
    for (i, ws) in ["ws1", "ws2", "ws3"].into_iter().enumerate() {
        fleet.workspaces.insert(ws.to_owned(), vms.get(i).cloned());
    }
    fleet.write()?;
    recover_moves(fleet).context("the apply that makes the workspaces")?;
    let mut first: BTreeMap<String, FileId> = BTreeMap::new();
    let mut ignored = Findings::default();
    workspaces_kept(fleet, &mut first, &mut ignored)?;
    let (mut duplicates, mut orphans, mut converged, mut lost) = (0, 0, 0, 0);
    for trial in 1..=trials {
        mutate_workspaces(fleet, slots, rng);
        fleet.write()?;
        let kill_libvirtd = trial % 2 == 0;
        let delay = Duration::from_millis(rng.below(3000));
        let mut f = Findings::default();
        let mid_apply = interrupted_apply(fleet, kill_libvirtd, delay)?;
        attached_twice(fleet, "after the fault", &mut f)?;
        recover_moves(fleet)?;
        let mut after = check(fleet)?;
        attached_twice(fleet, "after recovery", &mut after)?;
        let gone = workspaces_kept(fleet, &mut first, &mut after)?;
        f.duplicates += after.duplicates;
        f.orphans += after.orphans;
        f.notes.append(&mut after.notes);
        duplicates += f.duplicates;
        orphans += f.orphans;
        lost += gone;
        converged += usize::from(after.converged);
        eprintln!(
            "workspace trial {trial}: {:?}, {} after {delay:?} ({}); duplicates {} orphans {} lost {gone} converged {}",
            fleet.workspaces,
            fault(kill_libvirtd),
            when(mid_apply),
            f.duplicates,
            f.orphans,
            after.converged
        );
        for note in f.notes {
            eprintln!("  {note}");
        }
    }
    Ok((duplicates, orphans, converged, lost))
}

fn cleanup(fleet: &Fleet) {
    for d in fleet.domains().unwrap_or_default() {
        let _ = virsh(&["destroy", &d]);
        let _ = virsh(&["undefine", &d]);
    }
    for pool in [
        format!("fleet-ws-{}", fleet.name),
        format!("fleet-{}", fleet.name),
    ] {
        let _ = virsh(&["pool-destroy", &pool]);
        let _ = virsh(&["pool-undefine", &pool]);
    }
    let _ = std::fs::remove_dir_all(&fleet.repo);
}

/// The upload trials (see the top): returns duplicates, orphans and converged trials.
fn upload_trials(fleet: &Fleet, trials: usize, rng: &mut Rng) -> Result<(usize, usize, usize)> {
    // An image root of the trials' own: the micro image copied, then rebuilt in place.
    let root = std::env::current_dir()?.join("build/image");
    let images = fleet.repo.join("images");
    std::fs::create_dir_all(&images)?;
    for file in ["vmlinuz", "initrd.img"] {
        std::fs::copy(root.join(file), images.join(file))?;
    }
    let host = std::fs::read_to_string(fleet.host_config())?
        .replace(&root.display().to_string(), &images.display().to_string());
    std::fs::write(fleet.host_config(), host)?;
    let original = std::fs::read(root.join("initrd.img"))?;
    let (mut duplicates, mut orphans, mut converged) = (0, 0, 0);
    let (mut uploads_cut_short, mut extra_passes) = (0, 0);
    for trial in 1..=trials {
        // Zero padding after the archive, as the kernel's unpacker allows; a length of its
        // own each trial, so a content of its own.
        let mut rebuilt = original.clone();
        rebuilt.resize(original.len() + (16 << 20) + trial * 4096, 0);
        let staged = images.join("initrd.img.new");
        std::fs::write(&staged, &rebuilt)?;
        std::fs::rename(&staged, images.join("initrd.img"))?;
        let kill_libvirtd = trial % 2 == 0;
        let delay = Duration::from_millis(rng.below(600));
        let mid_apply = interrupted_apply(fleet, kill_libvirtd, delay)?;
        // What the fault left: an image volume without its marker is an upload it cut short.
        let pool = fleet
            .repo
            .join(".fleet/storage")
            .join(&fleet.name)
            .join(".volumes");
        let names: BTreeSet<String> = std::fs::read_dir(&pool)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let cut_short = names
            .iter()
            .filter(|n| n.starts_with("sha256-") && !n.ends_with(".ok"))
            .filter(|n| !names.contains(&format!("{n}.ok")))
            .count();
        uploads_cut_short += cut_short;
        recover(fleet)?;
        // A restart the fault interrupted can need one more pass (see the note printed):
        // counted and shown, never hidden.
        for _ in 0..2 {
            let plan = run(fleet.fleet().args(["plan", "--detailed-exitcode"]))?;
            if plan.status.code() == Some(0) {
                break;
            }
            let left: Vec<String> = String::from_utf8_lossy(&plan.stdout)
                .lines()
                .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
                .map(|l| l.trim().to_owned())
                .take(4)
                .collect();
            eprintln!("  upload trial {trial}: another pass needed after recovery: {left:?}");
            extra_passes += 1;
            recover(fleet)?;
        }
        let mut f = check(fleet)?;
        images_in_use(fleet, &mut f)?;
        duplicates += f.duplicates;
        orphans += f.orphans;
        converged += usize::from(f.converged);
        eprintln!(
            "upload trial {trial}: {} VMs onto a {} MiB initrd, {} after {delay:?} ({}, {cut_short} upload(s) cut short); duplicates {} orphans {} converged {}",
            fleet.vms.len(),
            rebuilt.len() >> 20,
            fault(kill_libvirtd),
            when(mid_apply),
            f.duplicates,
            f.orphans,
            f.converged
        );
        for note in f.notes {
            eprintln!("  {note}");
        }
    }
    eprintln!(
        "upload trials: {uploads_cut_short} upload(s) cut short by a fault, all recovered; {extra_passes} recovery pass(es) more than one"
    );
    Ok((duplicates, orphans, converged))
}

/// The fleet's image volumes are exactly those its domains boot from, each complete: any
/// other (an upload cut short, one no VM uses) is an orphan.
fn images_in_use(fleet: &Fleet, f: &mut Findings) -> Result<()> {
    let pool = fleet
        .repo
        .join(".fleet/storage")
        .join(&fleet.name)
        .join(".volumes");
    let mut used = BTreeSet::new();
    for d in fleet.domains()? {
        let xml =
            String::from_utf8_lossy(&virsh(&["dumpxml", "--inactive", &d])?.stdout).into_owned();
        for tag in ["kernel", "initrd"] {
            if let Some(path) = xml
                .split_once(&format!("<{tag}>"))
                .and_then(|(_, rest)| rest.split_once(&format!("</{tag}>")))
                .map(|(path, _)| path.to_owned())
            {
                used.insert(path);
            }
        }
    }
    let images: Vec<String> = std::fs::read_dir(&pool)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sha256-") && !n.ends_with(".ok"))
        .collect();
    for image in &images {
        let path = pool.join(image).display().to_string();
        if !used.contains(&path) {
            f.orphans += 1;
            f.notes
                .push(format!("image volume {image}: no VM boots from it"));
        } else if !pool.join(format!("{image}.ok")).exists() {
            f.orphans += 1;
            f.notes
                .push(format!("image volume {image}: in use without its marker"));
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let trials = arg("--trials").unwrap_or(10) as usize;
    let upload_trials_n = arg("--upload-trials").unwrap_or(3) as usize;
    let fresh_trials = arg("--fresh-trials").unwrap_or(3) as u32;
    let workspace_trials_n = arg("--workspace-trials").unwrap_or(4) as usize;
    let slots = arg("--vms").unwrap_or(20) as usize;
    let seed = arg("--seed").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("fleet-crash: {trials} trial(s) over up to {slots} VMs, seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut fleet = setup(slots, &mut rng)?;
    let result = (|| -> Result<(usize, usize, usize, usize)> {
        recover(&fleet).context("the first apply")?;
        let (mut duplicates, mut orphans, mut converged) = (0, 0, 0);
        for trial in 1..=trials {
            mutate(&mut fleet, slots, &mut rng);
            fleet.write()?;
            let kill_libvirtd = trial % 4 == 0;
            let delay = Duration::from_millis(rng.below(2500));
            let mid_apply = interrupted_apply(&fleet, kill_libvirtd, delay)?;
            let journal = fleet.repo.join(".fleet/status/journal.jsonl");
            let left_open = open_intents(&std::fs::read_to_string(&journal).unwrap_or_default());
            recover(&fleet)?;
            let f = check(&fleet)?;
            duplicates += f.duplicates;
            orphans += f.orphans;
            converged += usize::from(f.converged);
            eprintln!(
                "trial {trial}: {} VMs, {} after {delay:?} ({}, {left_open} intent(s) left open); duplicates {} orphans {} converged {}",
                fleet.vms.len(),
                fault(kill_libvirtd),
                when(mid_apply),
                f.duplicates,
                f.orphans,
                f.converged
            );
            for note in f.notes {
                eprintln!("  {note}");
            }
        }
        let ws_trials = workspace_trials(&mut fleet, workspace_trials_n, slots, &mut rng)?;
        duplicates += ws_trials.0;
        orphans += ws_trials.1;
        converged += ws_trials.2;
        let lost = ws_trials.3;
        let uploads = upload_trials(&fleet, upload_trials_n, &mut rng)?;
        duplicates += uploads.0;
        orphans += uploads.1;
        converged += uploads.2;
        for rerun in 1..=fresh_trials {
            fleet.fresh = Some(rerun);
            fleet.write()?;
            let delay = Duration::from_millis(rng.below(4000));
            let f = fresh_trial(&fleet, rerun, delay)?;
            duplicates += f.duplicates;
            orphans += f.orphans;
            converged += usize::from(f.converged);
            eprintln!(
                "fresh trial {rerun}: fleet serve killed after {delay:?}; duplicates {} orphans {} converged {}",
                f.duplicates, f.orphans, f.converged
            );
            for note in f.notes {
                eprintln!("  {note}");
            }
        }
        Ok((duplicates, orphans, converged, lost))
    })();
    cleanup(&fleet);
    let (duplicates, orphans, converged, lost) = result?;
    let trials = trials + fresh_trials as usize + workspace_trials_n + upload_trials_n;
    println!(
        "trials={trials} duplicates={duplicates} orphans={orphans} converged={converged} lost={lost}"
    );
    if duplicates > 0 || orphans > 0 || lost > 0 || converged != trials {
        std::process::exit(1);
    }
    Ok(())
}
