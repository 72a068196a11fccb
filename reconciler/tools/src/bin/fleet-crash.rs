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
//! Then `--remote-trials` (default 3) trials on two hosts: a second libvirtd in a mount
//! namespace of its own, reached over `qemu+ssh://` (`second_host`), becomes the provider
//! `far` of VMs of their own, booted from an image of their own. Each trial creates,
//! replaces and destroys some of them and rebuilds that image in place (so it is shipped to
//! the far host again), then kills fleet or the far host's libvirtd (SIGKILL): two trials in
//! three the moment an upload is seen under way (a volume without its marker, waiting at
//! most 10 s), the third within 1.5 s. One upload trial in three strikes at an upload's
//! start too.
//! After recovery: no VM stamped on two domains (on either host), none on the wrong host,
//! no volume without its domain and no image cut short or unused in either host's pool,
//! and convergence. (Console logs of gone VMs stay on a remote host, as documented.)
//!
//! Ends with one line: `trials=N duplicates=D orphans=O converged=C lost=L`; exits 1 unless
//! D, O and L are 0 and C is N (all trials together). A workspace attached to two domains
//! counts as a duplicate; one lost or remade counts in L. Needs `make image` and a running
//! libvirtd, and for the remote trials `unshare`, `nsenter`, `sshd` and `ssh-keygen`
//! (`make deps`).
//!
//! Usage: fleet-crash [--trials N] [--fresh-trials N] [--workspace-trials N]
//!        [--upload-trials N] [--remote-trials N] [--vms N] [--seed S]

#![allow(clippy::disallowed_methods)] // a tool writes scratch files freely

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

#[path = "../second_host.rs"]
mod second_host;

const URI: &str = "qemu:///system";

/// The remote trials' VM slots on the far host: `<fleet>-r1` and on.
const FAR_SLOTS: u64 = 6;

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
    virsh_on(URI, args)
}

fn virsh_on(uri: &str, args: &[&str]) -> Result<std::process::Output> {
    run(Command::new("virsh").arg("-c").arg(uri).args(args))
}

/// A libvirt host the trials make VMs on, as fleet-crash reaches it.
struct Host {
    /// The provider's name in the fleet.
    provider: &'static str,
    uri: String,
    /// The fleet's storage directory on that host, seen from here.
    storage: PathBuf,
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
    /// The remote trials' second host (provider `far`).
    far: Option<second_host::SecondHost>,
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
                    "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: {provider}, image: {image}, loadout: v{variant}, resources: {{memory: 128Mi}}{mounts}}}\n",
                    provider = self.provider_of(vm),
                    image = if self.provider_of(vm) == "far" {
                        "far-micro"
                    } else {
                        "micro"
                    },
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
        if self.fresh.is_none() {
            let _ = std::fs::remove_file(self.repo.join("fleet/tasks/job.yaml"));
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

    /// The remote trials' VMs are on `far`, every other on `local`.
    fn provider_of(&self, vm: &str) -> &'static str {
        if vm.starts_with(&format!("{}-r", self.name)) {
            "far"
        } else {
            "local"
        }
    }

    /// The hosts the fleet has VMs on: `local`, and `far` once the remote trials began.
    fn hosts(&self) -> Vec<Host> {
        let mut hosts = vec![Host {
            provider: "local",
            uri: URI.to_owned(),
            storage: self.repo.join(".fleet/storage").join(&self.name),
        }];
        if let Some(far) = &self.far {
            hosts.push(Host {
                provider: "far",
                uri: far.uri.clone(),
                storage: far.storage().join(&self.name),
            });
        }
        hosts
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

    /// The fleet's domains on this machine's libvirtd.
    fn domains(&self) -> Result<Vec<String>> {
        self.domains_on(URI)
    }

    /// The domains on the libvirtd at `uri` whose names are the fleet's.
    fn domains_on(&self, uri: &str) -> Result<Vec<String>> {
        let out = virsh_on(uri, &["list", "--all", "--name"])?;
        anyhow::ensure!(
            out.status.success(),
            "virsh list on {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
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
        far: None,
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

/// The fault a trial injects.
#[derive(Clone, Copy)]
enum Fault {
    /// SIGKILL to fleet.
    Fleet,
    /// SIGKILL to this machine's libvirtd, then started again.
    Libvirtd,
    /// SIGKILL to the far host's libvirtd, then started again.
    FarLibvirtd,
}

impl Fault {
    /// A libvirtd fault when `libvirtd`, else fleet's.
    fn libvirtd_if(libvirtd: bool) -> Fault {
        if libvirtd {
            Fault::Libvirtd
        } else {
            Fault::Fleet
        }
    }

    /// For a trial's report line.
    fn describe(self) -> &'static str {
        match self {
            Fault::Fleet => "fleet killed",
            Fault::Libvirtd => "libvirtd killed",
            Fault::FarLibvirtd => "the far host's libvirtd killed",
        }
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

/// One apply interrupted by `fault` after `delay`. Returns whether fleet was still applying
/// when it hit.
fn interrupted_apply(fleet: &Fleet, fault: Fault, delay: Duration) -> Result<bool> {
    interrupted_apply_at(fleet, fault, Strike::After(delay)).map(|(mid_apply, _)| mid_apply)
}

/// When a fault strikes.
#[derive(Clone, Copy, Debug)]
enum Strike {
    /// This long after the apply started.
    After(Duration),
    /// As soon as an image upload is seen under way on any host (a volume without its
    /// marker), or at the latest after this long.
    AtUpload(Duration),
}

impl Strike {
    /// For a trial's report line, with whether an upload was seen.
    fn describe(self, upload_seen: bool) -> String {
        match self {
            Strike::After(delay) => format!("after {delay:?}"),
            Strike::AtUpload(_) if upload_seen => "at an upload's start".into(),
            Strike::AtUpload(longest) => format!("with no upload seen (waited {longest:?})"),
        }
    }
}

/// `interrupted_apply`, striking at `strike`; whether fleet was still applying when it hit,
/// and for `Strike::AtUpload` whether an upload was seen (or the longest wait ran out).
fn interrupted_apply_at(fleet: &Fleet, fault: Fault, strike: Strike) -> Result<(bool, bool)> {
    let mut child = fleet
        .fleet()
        .args(["apply", "--auto-approve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut upload_seen = false;
    match strike {
        Strike::After(delay) => std::thread::sleep(delay),
        Strike::AtUpload(longest) => {
            let deadline = Instant::now() + longest;
            while Instant::now() < deadline && child.try_wait()?.is_none() {
                if cut_short_on(fleet) > 0 {
                    upload_seen = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    let mid_apply = child.try_wait()?.is_none();
    let struck = strike_with(fleet, fault, &mut child);
    if struck.is_err() {
        // No apply outlives a trial that failed (or its cleanup).
        let _ = child.kill();
    }
    // After a libvirtd fault, fleet goes on applying: how it copes is part of the trial.
    let _ = child.wait();
    struck.map(|()| (mid_apply, upload_seen))
}

/// Injects `fault` while `child` (fleet) applies.
fn strike_with(fleet: &Fleet, fault: Fault, child: &mut std::process::Child) -> Result<()> {
    match fault {
        Fault::Fleet => {
            let _ = child.kill();
        }
        Fault::Libvirtd => {
            // By its pid file: the far host's libvirtd is a process of the same name.
            let pid = std::fs::read_to_string("/run/libvirtd.pid").unwrap_or_default();
            anyhow::ensure!(!pid.trim().is_empty(), "libvirtd has no /run/libvirtd.pid");
            let _ = run(Command::new("kill").args(["-9", pid.trim()]));
            std::thread::sleep(Duration::from_millis(300));
            run(Command::new("libvirtd").arg("-d"))?;
            wait_for_libvirtd()?;
        }
        Fault::FarLibvirtd => {
            let far = fleet.far.as_ref().context("no far host")?;
            far.kill_libvirtd(true)?;
            std::thread::sleep(Duration::from_millis(300));
            far.start_libvirtd()?;
        }
    }
    Ok(())
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
    /// Domains on a host other than their VM's provider.
    misplaced: usize,
    converged: bool,
    notes: Vec<String>,
}

/// What the upload and remote trials add up, and print as they go.
#[derive(Default)]
struct ShipTally {
    duplicates: usize,
    orphans: usize,
    converged: usize,
    uploads_cut_short: usize,
    extra_passes: usize,
}

impl ShipTally {
    /// Counts one trial's findings and prints its line (`said`, then the counts) and notes.
    fn add(&mut self, said: String, f: Findings) {
        self.duplicates += f.duplicates;
        self.orphans += f.orphans;
        self.converged += usize::from(f.converged);
        eprintln!(
            "{said}; duplicates {} orphans {} converged {}",
            f.duplicates, f.orphans, f.converged
        );
        for note in f.notes {
            eprintln!("  {note}");
        }
    }

    /// Prints the `kind` trials' summary; returns duplicates, orphans and converged trials.
    fn finish(self, kind: &str) -> (usize, usize, usize) {
        eprintln!(
            "{kind} trials: {} upload(s) cut short by a fault, all recovered; {} recovery pass(es) more than one",
            self.uploads_cut_short, self.extra_passes
        );
        (self.duplicates, self.orphans, self.converged)
    }
}

/// Duplicates, VMs on the wrong host and orphans among the fleet's domains on every host;
/// the domains.
fn integrity(fleet: &Fleet, f: &mut Findings) -> Result<BTreeSet<String>> {
    let mut stamped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut domain_set = BTreeSet::new();
    for host in fleet.hosts() {
        let domains = fleet.domains_on(&host.uri)?;
        for d in &domains {
            let xml = virsh_on(&host.uri, &["dumpxml", "--inactive", d])?;
            let vm =
                fleet::driver::libvirt::domain_xml::parse(&String::from_utf8_lossy(&xml.stdout))
                    .map_err(anyhow::Error::msg)?;
            if let Some(stamp) = &vm.stamp {
                stamped
                    .entry(stamp.name.clone())
                    .or_default()
                    .push(format!("{d} on {}", host.provider));
            }
            if fleet.provider_of(d) != host.provider {
                f.misplaced += 1;
                f.notes.push(format!(
                    "{d} is on {} and belongs on {}",
                    host.provider,
                    fleet.provider_of(d)
                ));
            }
        }
        let here: BTreeSet<String> = domains.into_iter().collect();
        storage_orphans(fleet, &host, &here, f);
        domain_set.extend(here);
    }
    for (vm, holders) in &stamped {
        let elsewhere = |h: &String| h.split_once(" on ").is_none_or(|(d, _)| d != vm);
        if holders.len() > 1 || holders.iter().any(elsewhere) {
            f.duplicates += holders.len().saturating_sub(1).max(1);
            f.notes.push(format!("{vm} is stamped on {holders:?}"));
        }
    }
    Ok(domain_set)
}

/// What fleet made on `host` for VMs without a domain there (`domains`): directories of VMs
/// made before volumes, volumes, console logs (this machine's only: a remote host keeps
/// those of gone VMs, as documented), and image uploads cut short.
fn storage_orphans(fleet: &Fleet, host: &Host, domains: &BTreeSet<String>, f: &mut Findings) {
    let on_disk: BTreeSet<String> = std::fs::read_dir(&host.storage)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    for orphan in on_disk.difference(domains) {
        f.orphans += 1;
        f.notes.push(format!(
            "storage of {orphan} on {} without a domain",
            host.provider
        ));
    }
    let volumes = pool_files(host);
    if host.provider == "local" {
        for log in std::fs::read_dir(host.storage.join(".volumes/logs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = log.file_name().to_string_lossy().into_owned();
            let vm = name.split_once('.').map(|(vm, _)| vm.to_owned());
            if vm.is_some_and(|vm| !domains.contains(&vm)) {
                f.orphans += 1;
                f.notes.push(format!("console log {name} without a domain"));
            }
        }
    }
    for volume in &volumes {
        let vm = fleet::driver::libvirt::volumes::owner_of_volume(&fleet.name, volume);
        if vm.as_ref().is_some_and(|vm| !domains.contains(vm)) {
            f.orphans += 1;
            f.notes.push(format!(
                "volume {volume} on {} without a domain",
                host.provider
            ));
        }
    }
    for image in cut_short(&volumes) {
        f.orphans += 1;
        f.notes.push(format!(
            "image volume {image} on {} cut short",
            host.provider
        ));
    }
}

/// The files in `host`'s fleet pool.
fn pool_files(host: &Host) -> BTreeSet<String> {
    std::fs::read_dir(host.storage.join(".volumes"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The image volumes among `volumes` without their marker: uploads cut short.
fn cut_short(volumes: &BTreeSet<String>) -> Vec<&String> {
    volumes
        .iter()
        .filter(|n| n.starts_with("sha256-") && !n.ends_with(".ok"))
        .filter(|n| !volumes.contains(&format!("{n}.ok")))
        .collect()
}

fn check(fleet: &Fleet) -> Result<Findings> {
    let mut f = Findings::default();
    let domain_set = integrity(fleet, &mut f)?;
    let want: BTreeSet<String> = fleet.vms.keys().cloned().collect();
    let plan = run(fleet.fleet().args(["plan", "--detailed-exitcode"]))?;
    let journal =
        std::fs::read_to_string(fleet.repo.join(".fleet/status/journal.jsonl")).unwrap_or_default();
    let open = open_intents(&journal);
    f.converged =
        domain_set == want && f.misplaced == 0 && plan.status.code() == Some(0) && open == 0;
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
        let fault = Fault::libvirtd_if(trial % 2 == 0);
        let delay = Duration::from_millis(rng.below(3000));
        let mut f = Findings::default();
        let mid_apply = interrupted_apply(fleet, fault, delay)?;
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
            fault.describe(),
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

/// The trials' own image root (the micro image copied, so it can be rebuilt in place), made
/// once and named in the host configuration.
fn private_image_root(fleet: &Fleet) -> Result<PathBuf> {
    let root = std::env::current_dir()?.join("build/image");
    let images = fleet.repo.join("images");
    if !images.exists() {
        std::fs::create_dir_all(&images)?;
        for file in ["vmlinuz", "initrd.img"] {
            std::fs::copy(root.join(file), images.join(file))?;
        }
        let host = std::fs::read_to_string(fleet.host_config())?
            .replace(&root.display().to_string(), &images.display().to_string());
        std::fs::write(fleet.host_config(), host)?;
    }
    Ok(images)
}

/// Rebuilds `file` in the image root in place from `original`: zero padding after the
/// archive, as the kernel's unpacker allows, 16 MiB and more, a length of its own each
/// `trial`, so a content of its own. Returns its size in MiB.
fn rebuild_initrd(images: &Path, file: &str, original: &[u8], trial: usize) -> Result<usize> {
    let mut rebuilt = original.to_vec();
    rebuilt.resize(original.len() + (16 << 20) + trial * 4096, 0);
    let staged = images.join(format!("{file}.new"));
    std::fs::write(&staged, &rebuilt)?;
    std::fs::rename(&staged, images.join(file))?;
    Ok(rebuilt.len() >> 20)
}

/// `recover`, then again while the plan has steps, at most twice: a restart the fault
/// interrupted can need one more pass. Returns the passes more than one, counted and shown
/// (`label` names the trial), never hidden.
fn recover_counting_passes(fleet: &Fleet, label: &str) -> Result<usize> {
    recover(fleet)?;
    let mut extra = 0;
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
        eprintln!("  {label}: another pass needed after recovery: {left:?}");
        extra += 1;
        recover(fleet)?;
    }
    Ok(extra)
}

/// The upload trials (see the top): returns duplicates, orphans and converged trials.
fn upload_trials(fleet: &Fleet, trials: usize, rng: &mut Rng) -> Result<(usize, usize, usize)> {
    let images = private_image_root(fleet)?;
    let original = std::fs::read(std::env::current_dir()?.join("build/image/initrd.img"))?;
    let mut tally = ShipTally::default();
    for trial in 1..=trials {
        let mib = rebuild_initrd(&images, "initrd.img", &original, trial)?;
        let fault = Fault::libvirtd_if(trial % 2 == 0);
        let delay = Duration::from_millis(rng.below(600));
        let strike = if trial % 3 == 1 {
            Strike::AtUpload(Duration::from_secs(5))
        } else {
            Strike::After(delay)
        };
        let (mid_apply, upload_seen) = interrupted_apply_at(fleet, fault, strike)?;
        // What the fault left: an image volume without its marker is an upload it cut short.
        let cut_short = cut_short_on(fleet);
        tally.uploads_cut_short += cut_short;
        tally.extra_passes += recover_counting_passes(fleet, &format!("upload trial {trial}"))?;
        let mut f = check(fleet)?;
        images_in_use(fleet, &mut f)?;
        let said = format!(
            "upload trial {trial}: {} VMs onto a {mib} MiB initrd, {} {} ({}, {cut_short} upload(s) cut short)",
            fleet.vms.len(),
            fault.describe(),
            strike.describe(upload_seen),
            when(mid_apply)
        );
        tally.add(said, f);
    }
    Ok(tally.finish("upload"))
}

/// The remote trials (see the top): returns duplicates, orphans and converged trials.
fn remote_trials(fleet: &mut Fleet, trials: usize, rng: &mut Rng) -> Result<(usize, usize, usize)> {
    if trials == 0 {
        return Ok((0, 0, 0));
    }
    let images = private_image_root(fleet)?;
    let original = std::fs::read(std::env::current_dir()?.join("build/image/initrd.img"))?;
    std::fs::copy(images.join("initrd.img"), images.join("far-initrd.img"))?;
    let far = second_host::SecondHost::start()?;
    // The far host as a provider, its VMs booting from an image of their own.
    let host = std::fs::read_to_string(fleet.host_config())?.replace(
        "  imageRoot:",
        &format!(
            "    - {{name: far, type: libvirt, uri: '{}', storageDir: '{}'}}\n  imageRoot:",
            far.uri,
            second_host::SECOND_HOST_STORAGE
        ),
    );
    std::fs::write(fleet.host_config(), host)?;
    let fleet_yaml = fleet.repo.join("fleet/fleet.yaml");
    let declared = std::fs::read_to_string(&fleet_yaml)?
        .replace(
            "  images:\n",
            "    - {name: far, type: libvirt, domainType: qemu}\n  images:\n    - {name: far-micro, kernel: vmlinuz, initrd: far-initrd.img, cmdline: quiet}\n",
        );
    std::fs::write(&fleet_yaml, declared)?;
    fleet.far = Some(far);
    for i in 1..=FAR_SLOTS {
        if rng.below(3) != 0 {
            fleet.vms.insert(format!("{}-r{i}", fleet.name), 1);
        }
    }
    fleet.write()?;
    recover(fleet).context("the apply that makes the far host's VMs")?;
    let mut tally = ShipTally::default();
    for trial in 1..=trials {
        mutate_far(fleet, rng);
        fleet.write()?;
        let mib = rebuild_initrd(&images, "far-initrd.img", &original, 100 + trial)?;
        let fault = if trial % 2 == 0 {
            Fault::FarLibvirtd
        } else {
            Fault::Fleet
        };
        let strike = if trial % 3 == 0 {
            Strike::After(Duration::from_millis(rng.below(1500)))
        } else {
            Strike::AtUpload(Duration::from_secs(10))
        };
        let (mid_apply, upload_seen) = interrupted_apply_at(fleet, fault, strike)?;
        let cut_short = cut_short_on(fleet);
        tally.uploads_cut_short += cut_short;
        tally.extra_passes += recover_counting_passes(fleet, &format!("remote trial {trial}"))?;
        let mut f = check(fleet)?;
        images_in_use(fleet, &mut f)?;
        let on_far = fleet
            .vms
            .keys()
            .filter(|vm| fleet.provider_of(vm) == "far")
            .count();
        let said = format!(
            "remote trial {trial}: {on_far} VMs on the far host onto a {mib} MiB initrd, {} {} ({}, {cut_short} upload(s) cut short)",
            fault.describe(),
            strike.describe(upload_seen),
            when(mid_apply)
        );
        tally.add(said, f);
    }
    Ok(tally.finish("remote"))
}

/// Creates, replaces and destroys some of the far host's VMs; at least one stays.
fn mutate_far(fleet: &mut Fleet, rng: &mut Rng) {
    for _ in 0..1 + rng.below(3) {
        let slot = format!("{}-r{}", fleet.name, 1 + rng.below(FAR_SLOTS));
        match fleet.vms.get(&slot).copied() {
            None => {
                fleet.vms.insert(slot, 1);
            }
            Some(variant) if rng.below(2) == 0 => {
                fleet.vms.insert(slot, 3 - variant);
            }
            Some(_) => {
                let on_far = fleet.vms.keys().filter(|vm| fleet.provider_of(vm) == "far");
                if on_far.count() > 1 {
                    fleet.vms.remove(&slot);
                }
            }
        }
    }
}

/// Image uploads cut short on the fleet's hosts, as a fault left them.
fn cut_short_on(fleet: &Fleet) -> usize {
    fleet
        .hosts()
        .iter()
        .map(|host| cut_short(&pool_files(host)).len())
        .sum()
}

/// The fleet's image volumes are exactly those its domains boot from, each complete: any
/// other (an upload cut short, one no VM uses) is an orphan.
fn images_in_use(fleet: &Fleet, f: &mut Findings) -> Result<()> {
    for host in fleet.hosts() {
        // The volumes' names (the domain names a path on its own host).
        let mut used = BTreeSet::new();
        for d in fleet.domains_on(&host.uri)? {
            let xml = virsh_on(&host.uri, &["dumpxml", "--inactive", &d])?;
            let xml = String::from_utf8_lossy(&xml.stdout);
            for tag in ["kernel", "initrd"] {
                if let Some(name) = xml
                    .split_once(&format!("<{tag}>"))
                    .and_then(|(_, rest)| rest.split_once(&format!("</{tag}>")))
                    .and_then(|(path, _)| path.rsplit_once('/'))
                    .map(|(_, name)| name.to_owned())
                {
                    used.insert(name);
                }
            }
        }
        let volumes = pool_files(&host);
        // The checker's own view: the pool it reads is where the domains' images are.
        if let Some(missing) = used.iter().find(|name| !volumes.contains(*name)) {
            bail!(
                "a domain on {} boots from {missing}, which is not in {}",
                host.provider,
                host.storage.join(".volumes").display()
            );
        }
        let images = volumes
            .iter()
            .filter(|n| n.starts_with("sha256-") && !n.ends_with(".ok"));
        for image in images {
            if !used.contains(image) {
                f.orphans += 1;
                f.notes.push(format!(
                    "image volume {image} on {}: no VM boots from it",
                    host.provider
                ));
            } else if !volumes.contains(&format!("{image}.ok")) {
                f.orphans += 1;
                f.notes.push(format!(
                    "image volume {image} on {}: in use without its marker",
                    host.provider
                ));
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let trials = arg("--trials").unwrap_or(10) as usize;
    let upload_trials_n = arg("--upload-trials").unwrap_or(3) as usize;
    let remote_trials_n = arg("--remote-trials").unwrap_or(3) as usize;
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
            let fault = Fault::libvirtd_if(trial % 4 == 0);
            let delay = Duration::from_millis(rng.below(2500));
            let mid_apply = interrupted_apply(&fleet, fault, delay)?;
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
                fault.describe(),
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
        // Without the fresh pool: its warm member is a domain no VM file names.
        fleet.fresh = None;
        let remote = remote_trials(&mut fleet, remote_trials_n, &mut rng)?;
        duplicates += remote.0;
        orphans += remote.1;
        converged += remote.2;
        Ok((duplicates, orphans, converged, lost))
    })();
    cleanup(&fleet);
    let (duplicates, orphans, converged, lost) = result?;
    let trials =
        trials + fresh_trials as usize + workspace_trials_n + upload_trials_n + remote_trials_n;
    println!(
        "trials={trials} duplicates={duplicates} orphans={orphans} converged={converged} lost={lost}"
    );
    // The far host goes now: `exit` runs no destructors.
    drop(fleet);
    if duplicates > 0 || orphans > 0 || lost > 0 || converged != trials {
        std::process::exit(1);
    }
    Ok(())
}
