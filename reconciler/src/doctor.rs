//! `fleet doctor`: is this host ready to run the fleet? Each check says what it found, and
//! a failed or doubtful one says how to fix it; any failure makes the exit code 1.
//! `docs/troubleshooting.md` has a section per check (`Check::title`), which a test keeps
//! in step.
//!
//! Read-only: it opens connections and files, and changes nothing.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::reconcile::Workspace;
use crate::spec::{HostSpec, Provider};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, but worth fixing (slow, nearly full, unknown).
    Warn,
    /// fleet cannot work as configured.
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Which check (one of `CHECKS`).
    pub check: &'static str,
    /// What it was about: a provider, a path.
    pub subject: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check, by the title `docs/troubleshooting.md` gives it a section under.
pub const CHECKS: [&str; 11] = [
    "host configuration",
    "revision",
    "libvirt",
    "qemu",
    "kvm",
    "images",
    "proxmox",
    "clock",
    "age identity",
    "status directory",
    "disk space",
];

/// Below this much free space a filesystem fleet writes to is a warning; below a tenth of
/// it, a failure.
const LOW_SPACE: u64 = 2 << 30;
/// A Proxmox node's clock this far from ours makes TLS and task times misleading.
const MAX_SKEW_SECONDS: i64 = 30;

struct Report(Vec<Finding>);

impl Report {
    fn ok(&mut self, check: &'static str, subject: impl Into<String>, detail: impl Into<String>) {
        self.push(check, subject, Verdict::Ok, detail.into(), None);
    }

    fn warn(
        &mut self,
        check: &'static str,
        subject: impl Into<String>,
        detail: String,
        fix: String,
    ) {
        self.push(check, subject, Verdict::Warn, detail, Some(fix));
    }

    fn fail(
        &mut self,
        check: &'static str,
        subject: impl Into<String>,
        detail: String,
        fix: String,
    ) {
        self.push(check, subject, Verdict::Fail, detail, Some(fix));
    }

    fn push(
        &mut self,
        check: &'static str,
        subject: impl Into<String>,
        verdict: Verdict,
        detail: String,
        fix: Option<String>,
    ) {
        debug_assert!(CHECKS.contains(&check), "{check} is not in CHECKS");
        self.0.push(Finding {
            check,
            subject: subject.into(),
            verdict,
            detail,
            fix,
        });
    }
}

/// Runs every check that applies to this host.
pub fn run(ws: &Workspace) -> Vec<Finding> {
    let mut report = Report(Vec::new());
    let host = match ws.host() {
        Ok(host) => {
            report.ok(
                "host configuration",
                ws.host_config.display().to_string(),
                format!("{} provider(s)", host.providers.len()),
            );
            Some(host)
        }
        Err(e) => {
            report.fail(
                "host configuration",
                ws.host_config.display().to_string(),
                e.to_string(),
                "write it from docs/host.example.yaml, owned by root and writable by nobody else (or pass --host-config)".into(),
            );
            None
        }
    };
    let desired = host
        .as_ref()
        .and_then(|host| revision(ws, host, &mut report));
    let vault = desired.as_ref().map(|d| ws.open_vault(d));
    if let Some(host) = &host {
        providers(host, desired.as_ref(), vault.as_ref(), &mut report);
        images(host, desired.as_ref(), &mut report);
    }
    age_identity(ws, &mut report);
    status_directory(ws, &mut report);
    let mut space: Vec<PathBuf> = vec![ws.status.root().to_path_buf()];
    for provider in host.iter().flat_map(|h| &h.providers) {
        // Another host's disk is its own; fleet's side holds nothing of its VMs.
        if let Provider::Libvirt(l) = provider
            && crate::driver::libvirt::is_local_uri(&l.uri)
        {
            space.push(PathBuf::from(
                l.storage_dir
                    .as_deref()
                    .unwrap_or(crate::driver::libvirt::DEFAULT_STORAGE_ROOT),
            ));
        }
    }
    for path in space {
        disk_space(&path, &mut report);
    }
    report.0
}

/// The committed revision, resolved against the host: what the image and token checks
/// look at. Not being able to read one is a warning (a new host has none yet).
fn revision(
    ws: &Workspace,
    host: &HostSpec,
    report: &mut Report,
) -> Option<crate::resolve::Desired> {
    let snapshot = match crate::reconcile::read_snapshot(ws, &crate::reconcile::SourceChoice::Head)
    {
        Ok(s) => s,
        Err(e) => {
            report.warn(
                "revision",
                ws.repo_root.display().to_string(),
                format!("no committed revision to check against: {e}"),
                "run fleet doctor in the repository that holds fleet/ (or pass -C DIR)".into(),
            );
            return None;
        }
    };
    match crate::reconcile::desired(&snapshot, host) {
        Ok(desired) => {
            report.ok(
                "revision",
                snapshot.revision.label.clone(),
                format!(
                    "valid: {} VM(s), {} task(s)",
                    desired.vms.len(),
                    desired.tasks.len()
                ),
            );
            Some(desired)
        }
        Err(diags) => {
            report.fail(
                "revision",
                snapshot.revision.label.clone(),
                format!(
                    "{} diagnostic(s), the first: {}",
                    diags.len(),
                    diags.first().map(ToString::to_string).unwrap_or_default()
                ),
                "fleet validate lists them with their fixes".into(),
            );
            None
        }
    }
}

fn providers(
    host: &HostSpec,
    desired: Option<&crate::resolve::Desired>,
    vault: Option<&crate::secrets::Vault>,
    report: &mut Report,
) {
    let mut any_libvirt = false;
    for provider in &host.providers {
        match provider {
            Provider::Libvirt(l) => {
                any_libvirt = true;
                let subject = format!("{} ({})", l.name.0, l.uri);
                match crate::driver::libvirt::LibvirtDriver::versions(&l.uri) {
                    Ok((libvirt, hypervisor)) => report.ok(
                        "libvirt",
                        subject,
                        format!("libvirt {libvirt}, hypervisor {hypervisor}"),
                    ),
                    Err(why) => report.fail(
                        "libvirt",
                        subject,
                        format!("cannot connect: {why}"),
                        "start libvirtd (systemctl start libvirtd, or virtlogd -d && libvirtd -d) and check that fleet's user may use its socket (the libvirt group)".into(),
                    ),
                }
            }
            Provider::Proxmox(x) => {
                let default = crate::secrets::Vault::default();
                let token = crate::reconcile::proxmox_token(&x.token, vault.unwrap_or(&default));
                let driver = crate::driver::proxmox::ProxmoxDriver::new(
                    desired.map_or("doctor", |d| d.fleet.as_str()),
                    x,
                    crate::spec::DomainType::Kvm,
                    token,
                );
                proxmox(&x.name.0, &x.endpoint, &driver, report);
            }
        }
    }
    if any_libvirt {
        qemu_and_kvm(report);
    }
}

fn proxmox(
    name: &str,
    endpoint: &str,
    driver: &crate::driver::proxmox::ProxmoxDriver,
    report: &mut Report,
) {
    let subject = format!("{name} ({endpoint})");
    let health = match driver.health() {
        Ok(h) => h,
        Err(e) => {
            report.fail(
                "proxmox",
                subject,
                format!("cannot reach it with its token: {e}"),
                "check the endpoint, the CA (caFile) and the token (docs/proxmox.md)".into(),
            );
            return;
        }
    };
    if health.missing.is_empty() {
        report.ok(
            "proxmox",
            subject.clone(),
            format!(
                "PVE {}, the token holds every privilege fleet needs",
                health.version
            ),
        );
    } else {
        report.fail(
            "proxmox",
            subject.clone(),
            format!(
                "PVE {}, the token lacks {}",
                health.version,
                health.missing.join(", ")
            ),
            format!(
                "grant them to fleet's role: pveum role modify Fleet -append 1 -privs \"{}\"",
                health.missing.join(" ")
            ),
        );
    }
    match health.skew {
        Ok(skew) if skew.abs() <= MAX_SKEW_SECONDS => {
            report.ok("clock", subject, format!("{skew:+} s from this host"))
        }
        Ok(skew) => report.warn(
            "clock",
            subject,
            format!("the cluster's clock is {skew:+} s from this host's"),
            "run NTP (chrony, systemd-timesyncd) on this host and the nodes".into(),
        ),
        Err(why) => report.warn(
            "clock",
            subject,
            format!("cannot read a node's time: {why}"),
            "give the token Sys.Audit on /nodes to let fleet doctor compare clocks".into(),
        ),
    }
}

fn qemu_and_kvm(report: &mut Report) {
    match std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => report.ok(
            "qemu",
            "qemu-system-x86_64",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        _ => report.fail(
            "qemu",
            "qemu-system-x86_64",
            "not found or not runnable".into(),
            "apt-get install qemu-system-x86 (make deps)".into(),
        ),
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => report.ok("kvm", "/dev/kvm", "available: domainType kvm runs at native speed"),
        Err(e) => report.warn(
            "kvm",
            "/dev/kvm",
            format!("not usable ({e}): only TCG, software emulation, works"),
            "use domainType: qemu in fleet.yaml, or enable virtualisation in the firmware and load kvm_intel or kvm_amd".into(),
        ),
    }
}

fn images(host: &HostSpec, desired: Option<&crate::resolve::Desired>, report: &mut Report) {
    let root = Path::new(host.image_root());
    if let Err(e) = std::fs::read_dir(root) {
        report.fail(
            "images",
            root.display().to_string(),
            format!("the image root cannot be read: {e}"),
            "create it (install -d -m 0755) or set imageRoot in the host configuration".into(),
        );
        return;
    }
    let mut files = std::collections::BTreeSet::new();
    for vm in desired.iter().flat_map(|d| d.vms.values()) {
        let image = &vm.config.image;
        for file in [&image.kernel, &image.initrd, &image.disk]
            .into_iter()
            .flatten()
        {
            files.insert(file.clone());
        }
    }
    let mut unreadable = 0;
    for file in &files {
        let path = root.join(file);
        if let Err(e) = std::fs::File::open(&path).and_then(|mut f| {
            let mut byte = [0u8; 1];
            std::io::Read::read(&mut f, &mut byte)
        }) {
            unreadable += 1;
            report.fail(
                "images",
                path.display().to_string(),
                format!("cannot be read: {e}"),
                format!(
                    "put the image there (make image, then install it under {}) or fix the image's path in fleet.yaml",
                    root.display()
                ),
            );
        }
    }
    if unreadable == 0 {
        report.ok(
            "images",
            root.display().to_string(),
            format!("{} image file(s) of the revision readable", files.len()),
        );
    }
}

fn age_identity(ws: &Workspace, report: &mut Report) {
    let Some(path) = &ws.age_identity else {
        report.ok(
            "age identity",
            "none",
            "no identity configured: revisions with secrets cannot be opened here",
        );
        return;
    };
    let subject = path.display().to_string();
    match crate::secrets::check_private_file(path) {
        Ok(()) => report.ok("age identity", subject, "readable by its owner only"),
        Err(e @ crate::secrets::SecretError::Exposed { .. }) => report.fail(
            "age identity",
            subject.clone(),
            e.to_string(),
            format!("chmod 600 {subject}"),
        ),
        Err(e) => report.fail(
            "age identity",
            subject,
            e.to_string(),
            "create it with age-keygen -o FILE (mode 0600), or point --age-identity elsewhere"
                .into(),
        ),
    }
}

fn status_directory(ws: &Workspace, report: &mut Report) {
    let root = ws.status.root();
    let subject = root.display().to_string();
    if let Err(e) = crate::fsguard::check_owned_chain(root) {
        report.fail(
            "status directory",
            subject,
            e.to_string(),
            "chown it (and the directories above it) to fleet's user, writable by nobody else"
                .into(),
        );
        return;
    }
    match crate::status::lock::StatusLock::holder(root) {
        Some(holder) if std::path::Path::new(&format!("/proc/{}", holder.pid)).exists() => report
            .ok(
                "status directory",
                subject,
                format!("held by {} (PID {})", holder.command, holder.pid),
            ),
        Some(holder) => report.warn(
            "status directory",
            subject,
            format!(
                "its lock names PID {} ({}), which is not running",
                holder.pid, holder.command
            ),
            "nothing to do: the next fleet command takes the stale lock over".into(),
        ),
        None => report.ok("status directory", subject, "owned safely, not locked"),
    }
}

fn disk_space(path: &Path, report: &mut Report) {
    // The nearest existing directory: storage may not be made yet.
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return;
    };
    let subject = path.display().to_string();
    match nix::sys::statvfs::statvfs(existing) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let shown = format!("{} MiB free", free >> 20);
            if free < LOW_SPACE / 10 {
                report.fail(
                    "disk space",
                    subject,
                    shown,
                    "free space on this filesystem, or lower policy.retention".into(),
                );
            } else if free < LOW_SPACE {
                report.warn(
                    "disk space",
                    subject,
                    shown,
                    "free space on this filesystem soon: VM disks and logs grow".into(),
                );
            } else {
                report.ok("disk space", subject, shown);
            }
        }
        Err(e) => report.warn(
            "disk space",
            subject,
            format!("cannot tell: {e}"),
            "check the filesystem by hand (df -h)".into(),
        ),
    }
}

/// The findings as text: one line each, and the fix under a warning or failure.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let mark = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        out.push_str(&format!(
            "{mark}  {:<17} {}: {}\n",
            f.check, f.subject, f.detail
        ));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let failed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    let warned = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .count();
    out.push_str(&format!(
        "\n{failed} problem(s), {warned} warning(s); docs/troubleshooting.md has more on each check\n"
    ));
    out
}
