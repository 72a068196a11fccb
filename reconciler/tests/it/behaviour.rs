//! One plan/apply behaviour suite, run against both drivers: real libvirt (QEMU TCG) and
//! Proxmox (fakepve). The same scenarios must give the same plans, line for line.

use serde_json::json;

use crate::support::{Repo, host_yaml};

/// A provider named `host` of one kind (the repository's host configuration defines it),
/// and a way to make a VM fleet does not own.
trait Backend {
    fn provider_yaml(&self) -> String;
    fn image_yaml(&self) -> String;
    fn make_foreign(&mut self, name: &str);
    fn foreign_untouched(&mut self, name: &str) -> bool;
}

struct Libvirt {
    foreign_xml: std::collections::BTreeMap<String, String>,
}

impl Backend for Libvirt {
    fn provider_yaml(&self) -> String {
        "{name: host, type: libvirt, domainType: qemu}".into()
    }
    fn image_yaml(&self) -> String {
        "{name: micro, kernel: vmlinuz, initrd: initrd.img, cmdline: quiet}".into()
    }
    fn make_foreign(&mut self, name: &str) {
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
        );
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &xml).expect("write");
        crate::libvirt::virsh_ok(&["define", file.path().to_str().expect("utf8")]);
        self.foreign_xml.insert(
            name.to_owned(),
            crate::libvirt::virsh_ok(&["dumpxml", name]),
        );
    }
    fn foreign_untouched(&mut self, name: &str) -> bool {
        crate::libvirt::virsh_ok(&["dumpxml", name]) == self.foreign_xml[name]
    }
}

struct Proxmox {
    pve: crate::pve::FakePve,
    foreign: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Backend for Proxmox {
    fn provider_yaml(&self) -> String {
        "{name: host, type: proxmox}".into()
    }
    fn image_yaml(&self) -> String {
        "{name: micro, template: debian-tmpl}".into()
    }
    fn make_foreign(&mut self, name: &str) {
        let vmid = 700 + self.foreign.len() as u64;
        let vm = self
            .pve
            .control(json!({"op": "add_vm", "vmid": vmid, "name": name,
            "status": "stopped", "config": {"cores": 1, "memory": 64}}));
        self.foreign.insert(name.to_owned(), vm);
    }
    fn foreign_untouched(&mut self, name: &str) -> bool {
        self.pve.vm_named(name).as_ref() == Some(&self.foreign[name])
    }
}

/// The step, conflict and drift lines of `fleet plan`, with the run's VM prefix removed.
fn plan_lines(repo: &Repo, prefix: &str) -> Vec<String> {
    let revision = regex::Regex::new("[0-9a-f]{12}").expect("regex");
    let out = repo.fleet(&["plan"]).stdout();
    out.lines()
        .filter(|l| {
            let t = l.trim_start();
            l.starts_with("  ")
                && !t.is_empty()
                && "+-~>!<".contains(&t[..1])
                && !t.starts_with("+++")
                && !t.starts_with("---")
        })
        .map(|l| {
            let l = revision
                .replace_all(&l.replace(prefix, ""), "<rev>")
                .into_owned();
            l.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .chain(
            out.lines()
                .filter(|l| l.starts_with("Plan:") || l.starts_with("No changes"))
                .map(str::to_owned),
        )
        .collect()
}

/// Runs the scenarios; returns each step's plan.
fn scenarios(
    backend: &mut dyn Backend,
    repo: &Repo,
    fleet: &str,
    prefix: &str,
) -> Vec<Vec<String>> {
    let fleet_yaml = format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: {fleet}}}\nspec:\n  providers:\n    - {}\n  images:\n    - {}\n  policy: {{shutdownTimeout: 5s, stepTimeout: 2m}}\n",
        backend.provider_yaml().trim_end(),
        backend.image_yaml()
    );
    let vm = |name: &str, resources: &str, spec: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {prefix}{name}}}\nspec: {{provider: host, image: micro, resources: {{memory: 128Mi{resources}}}{spec}}}\n"
        )
    };
    let mut plans = Vec::new();
    let step = |repo: &Repo, plans: &mut Vec<Vec<String>>, apply: bool| {
        let mut lines = plan_lines(repo, prefix);
        if apply {
            // The exit code is part of the behaviour (a conflict is not a success).
            let out = repo.fleet(&["apply", "--auto-approve"]);
            assert!(
                (0..=2).contains(&out.code()),
                "apply: {}\n{}",
                out.stdout(),
                out.stderr()
            );
            if out.code() != 0 {
                // Shown when the comparison below fails: why this driver's apply did.
                eprintln!("apply exited {}: {}", out.code(), out.stderr());
            }
            lines.push(format!("apply exited {}", out.code()));
        }
        plans.push(lines);
    };
    repo.write("fleet/fleet.yaml", fleet_yaml);
    repo.write(&format!("fleet/vms/{prefix}x.yaml"), vm("x", "", ""));
    repo.write(
        &format!("fleet/vms/{prefix}y.yaml"),
        vm("y", "", ", state: stopped"),
    );
    repo.commit("x and y");
    step(repo, &mut plans, true);
    step(repo, &mut plans, false);
    repo.write(
        &format!("fleet/vms/{prefix}x.yaml"),
        vm("x", ", cpus: 2", ""),
    );
    repo.commit("x: 2 CPUs");
    step(repo, &mut plans, true);
    repo.remove(&format!("fleet/vms/{prefix}y.yaml"));
    repo.commit("drop y");
    step(repo, &mut plans, true);
    backend.make_foreign(&format!("{prefix}z"));
    repo.write(&format!("fleet/vms/{prefix}z.yaml"), vm("z", "", ""));
    repo.commit("claim z");
    step(repo, &mut plans, true);
    assert!(
        backend.foreign_untouched(&format!("{prefix}z")),
        "the foreign VM was changed"
    );
    repo.remove(&format!("fleet/vms/{prefix}z.yaml"));
    repo.remove(&format!("fleet/vms/{prefix}x.yaml"));
    repo.commit("empty");
    step(repo, &mut plans, false);
    plans
}

#[test]
fn both_drivers_plan_and_apply_alike() {
    if !crate::libvirt::enabled() || !crate::pve::enabled() {
        return;
    }
    let prefix = format!("bh{}-", std::process::id());
    let _cleanup = crate::libvirt::Cleanup {
        prefix: prefix.clone(),
    };
    let fleet = format!("bh{}", std::process::id());

    let libvirt_repo = Repo::new();
    libvirt_repo.host_config(&host_yaml(
        &[format!(
            "{{name: host, type: libvirt, uri: '{}', storageDir: '{}'}}",
            crate::libvirt::URI,
            libvirt_repo.path().join(".fleet/storage").display()
        )],
        "",
    ));
    let mut libvirt = Libvirt {
        foreign_xml: Default::default(),
    };
    let on_libvirt = scenarios(&mut libvirt, &libvirt_repo, &fleet, &prefix);

    let mut pve = crate::pve::FakePve::start();
    let schema = pve.schema();
    // The token file and snippet directory live in `pve_fleet`'s host directory, and its
    // host configuration defines the provider `host`.
    let pve_fleet = crate::proxmox::PveFleet::new(&pve, &fleet, "{}");
    let mut proxmox = Proxmox {
        pve,
        foreign: Default::default(),
    };
    let on_proxmox = scenarios(&mut proxmox, &pve_fleet.repo, &fleet, &prefix);
    crate::proxmox::checked_wire(&mut proxmox.pve, &schema);

    for (i, (l, p)) in on_libvirt.iter().zip(&on_proxmox).enumerate() {
        assert_eq!(
            l, p,
            "scenario step {i}: libvirt and Proxmox plan differently"
        );
    }
    let expected: Vec<Vec<&str>> = vec![
        vec![
            "+ create x on host: not found on the provider",
            "+ create y on host: not found on the provider",
            "Plan: 2 to create.",
            "apply exited 0",
        ],
        vec!["No changes: every VM matches its spec."],
        vec![
            "~ update x on host: cpus 1 → 2 (restarts the running VM)",
            "Plan: 1 to update.",
            "apply exited 0",
        ],
        vec![
            "- destroy y on host: removed from fleet/ (last applied at <rev>)",
            "Plan: 1 to destroy.",
            "apply exited 0",
        ],
        vec![
            "! z on host: a VM named \"z\" already exists and was not made by fleet; fleet will not touch it. Rename the VM in fleet/, or remove the other VM yourself",
            "No changes: every VM matches its spec.",
            "apply exited 1",
        ],
        vec![
            "- destroy x on host: this revision destroys every VM fleet runs on provider host (was fleet/ emptied by mistake?)",
            "Plan: nothing runs without an approval.",
        ],
    ];
    assert_eq!(on_libvirt, expected);
    assert_eq!(on_proxmox, expected);
}
