//! `fleet adopt PROVIDER VM [--image NAME] [--approve]`: brings a VM fleet did not make
//! under management, never on its own.
//!
//! Without `--approve` it writes the VM's file (`fleet/vms/<vm>.yaml`: provider, image, CPUs,
//! memory and power state as the hypervisor reports them, `protect: true`) and says what
//! fleet would change once it is adopted; the VM itself is not touched. With `--approve`,
//! once that file is committed, it stamps the VM as this fleet's, marked adopted: from then
//! on fleet manages its power state and notices drift, and a change of its file remakes it
//! from its image (fleet did not make its disks, so it never edits them), held for an
//! approval by `protect`.

use anyhow::{Context, Result, bail};

use crate::observe::{ObservedVm, Stamp};
use crate::reconcile::{self, SourceChoice, Workspace};
use crate::spec::PowerState;

pub struct Request<'a> {
    pub provider: &'a str,
    pub vm: &'a str,
    /// The image fleet would remake it from; default: the revision's only image.
    pub image: Option<&'a str>,
    pub approve: bool,
}

/// Runs the request; returns what to print.
pub fn run(ws: &Workspace, request: &Request<'_>) -> Result<String> {
    crate::driver::check_name(request.vm).map_err(|e| anyhow::anyhow!(e.message))?;
    let host = ws.host()?;
    let mut snapshot = reconcile::read_snapshot(ws, &SourceChoice::Head)?;
    if request.approve {
        // What is stamped comes from the commit: signed as the host requires, as for apply.
        let verifier = crate::trust::Verifier::new(&host.trust);
        reconcile::verify(ws, verifier.as_ref(), &mut snapshot)?;
        if let Some(why) = ws.status.host_suspension() {
            bail!(
                "fleet is suspended from the host ({why}): nothing is adopted until `fleet resume`"
            );
        }
    }
    let desired = reconcile::desired(&snapshot, &host).map_err(|diags| {
        anyhow::anyhow!(
            "the committed revision does not validate ({} diagnostic(s); fleet validate lists them): adopt adds to a valid one",
            diags.len()
        )
    })?;
    let vault = ws.open_vault(&desired);
    let drivers = reconcile::drivers_for(&desired, &host, &vault);
    let driver = drivers.get(request.provider).with_context(|| {
        format!(
            "provider {:?} is not in the revision's fleet.yaml (it has: {})",
            request.provider,
            drivers.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let found = driver
        .observe_vm(request.vm)?
        .with_context(|| format!("no VM {:?} on provider {}", request.vm, request.provider))?;
    if let Some(stamp) = &found.stamp {
        if found.owned_by(&desired.fleet) {
            bail!(
                "{} is already fleet {}'s: nothing to adopt",
                request.vm,
                desired.fleet
            );
        }
        bail!(
            "{} carries fleet {:?}'s stamp: only a VM no fleet made can be adopted",
            request.vm,
            stamp.fleet
        );
    }
    if request.approve {
        approve(ws, &desired, driver.as_ref(), request, &found)
    } else {
        propose(ws, &snapshot, &desired, request, &found)
    }
}

/// Writes the VM's file and says what adopting it would change.
fn propose(
    ws: &Workspace,
    snapshot: &crate::snapshot::Snapshot,
    desired: &crate::resolve::Desired,
    request: &Request<'_>,
    found: &ObservedVm,
) -> Result<String> {
    let images: Vec<String> = crate::load::load(snapshot, None)
        .map(|l| {
            l.fleet
                .doc
                .spec
                .images
                .iter()
                .map(|i| i.name.0.clone())
                .collect()
        })
        .unwrap_or_default();
    let image = match (request.image, images.as_slice()) {
        (Some(image), _) if images.iter().any(|i| i == image) => image.to_owned(),
        (Some(image), _) => bail!(
            "no image {image:?} in fleet.yaml (it has: {})",
            images.join(", ")
        ),
        (None, [only]) => only.clone(),
        (None, _) => bail!(
            "say which image fleet would remake it from: --image NAME (fleet.yaml has: {})",
            images.join(", ")
        ),
    };
    let relative = format!("{}/vms/{}.yaml", ws.fleet_dir, request.vm);
    let path = ws.repo_root.join(&relative);
    if path.exists() {
        bail!("{relative} exists already: adopt writes a new file, never over one");
    }
    let state = if found.running { "running" } else { "stopped" };
    let text = format!(
        "# yaml-language-server: $schema=../../schema/vm.schema.json\n\
         # Adopted with `fleet adopt {provider} {vm}`: fleet did not make this VM. Its disks and\n\
         # definition stay as they are; fleet manages its power state and notices drift. A change\n\
         # to this file remakes it from image {image} (the old disk stays on the host), and\n\
         # protect holds that, or its destroy, for an approval.\n\
         apiVersion: fleet/v1\n\
         kind: VM\n\
         metadata:\n  name: {vm}\n\
         spec:\n  provider: {provider}\n  image: {image}\n  state: {state}\n  protect: true\n  \
         resources: {{cpus: {cpus}, memory: {memory}Mi}}\n",
        provider = request.provider,
        vm = request.vm,
        cpus = found.cpus,
        memory = found.memory_mib,
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::atomic_file::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {relative}"))?;
    // The file must validate with the rest of the working tree, or it is taken back.
    let checked = reconcile::read_snapshot(ws, &SourceChoice::Worktree)
        .map_err(anyhow::Error::from)
        .and_then(|s| {
            reconcile::desired(&s, &ws.host()?).map_err(|diags| {
                anyhow::anyhow!(
                    "{}",
                    diags
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
        });
    let worktree = match checked {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            bail!("the VM cannot be described as a fleet VM: {e}");
        }
    };
    let changes = worktree
        .vms
        .get(request.vm)
        .map(|vm| differences(vm, found))
        .unwrap_or_default();
    let mut out = format!(
        "wrote {relative} from what {} reports of {}\n",
        request.provider, request.vm
    );
    if changes.is_empty() {
        out.push_str("once adopted, fleet would change nothing about it\n");
    } else {
        out.push_str("once adopted, fleet would change:\n");
        for change in &changes {
            out.push_str(&format!("  {change}\n"));
        }
    }
    out.push_str(&format!(
        "{} is untouched. Review and commit the file, then `fleet adopt {} {} --approve` stamps it as fleet {}'s; until then fleet reports it as a conflict and never touches it.\n",
        request.vm, request.provider, request.vm, desired.fleet
    ));
    Ok(out)
}

/// What fleet would change about `found` to make it `vm`.
fn differences(vm: &crate::resolve::DesiredVm, found: &ObservedVm) -> Vec<String> {
    let mut changes = Vec::new();
    if vm.config.cpus != found.cpus {
        changes.push(format!("CPUs {} → {}", found.cpus, vm.config.cpus));
    }
    if vm.config.memory_mib != found.memory_mib {
        changes.push(format!(
            "memory {} MiB → {} MiB",
            found.memory_mib, vm.config.memory_mib
        ));
    }
    if (vm.state == PowerState::Running) != found.running {
        changes.push(format!("power state → {:?}", vm.state).to_lowercase());
    }
    changes
}

/// Stamps the VM, once its committed file describes it as it is.
fn approve(
    ws: &Workspace,
    desired: &crate::resolve::Desired,
    driver: &dyn crate::driver::Driver,
    request: &Request<'_>,
    found: &ObservedVm,
) -> Result<String> {
    let Some(vm) = desired.vms.get(request.vm) else {
        bail!(
            "the committed revision has no VM {}: run `fleet adopt {} {}` and commit the file it writes first",
            request.vm,
            request.provider,
            request.vm
        );
    };
    if vm.config.provider != request.provider {
        bail!(
            "the committed file puts {} on provider {}, not {}",
            request.vm,
            vm.config.provider,
            request.provider
        );
    }
    if desired.policy.suspend {
        bail!(
            "{} sets policy.suspend: nothing is adopted",
            desired.revision.label
        );
    }
    // Only what `fleet adopt` writes: a VM fleet did not make must stay protected, and is
    // never reset, pooled or given a network fleet would have to build.
    let c = &vm.config;
    let unlike = [
        (!c.protect, "protect: true"),
        (c.reset, "no reset"),
        (c.pool.is_some() || c.fresh, "no pool"),
        (
            c.network != crate::spec::NetworkMode::Isolated,
            "no network",
        ),
    ];
    if let Some((_, wanted)) = unlike.iter().find(|(differs, _)| *differs) {
        bail!(
            "the committed file of {} must say {wanted}, as `fleet adopt` writes it: an adopted VM is stamped only as fleet describes it",
            request.vm
        );
    }
    let changes = differences(vm, found);
    if !changes.is_empty() {
        bail!(
            "the committed file does not describe {} as it is ({}): adopting is not changing; make the file match, or adopt first and change it afterwards",
            request.vm,
            changes.join("; ")
        );
    }
    let stamp = Stamp {
        fleet: desired.fleet.clone(),
        name: vm.name.clone(),
        spec_hash: vm.spec_hash.clone(),
        revision: desired.revision.id.clone(),
        protect: vm.config.protect,
        config: Some(vm.config.clone()),
        created: Some(crate::time::Timestamp::from(std::time::SystemTime::now())),
        adopted: true,
    };
    driver.adopt(&vm.name, &stamp)?;
    let who = crate::hitl::local_user();
    let _ = ws.status.append_event(&crate::status::Event::vm(
        crate::status::EventKind::VmAdopted,
        &vm.name,
        &vm.config.provider,
        &desired.revision.id,
        format!(
            "{} adopted by {who}: stamped as fleet {}'s",
            vm.name, desired.fleet
        ),
    ));
    Ok(format!(
        "{} is now fleet {}'s (adopted): `fleet plan` shows nothing to do for it\n",
        vm.name, desired.fleet
    ))
}
