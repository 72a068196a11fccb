//! Checks across objects: every reference resolves, no `extends` cycles, no name clashes
//! between VMs and pool members, committed answers and secrets used where they may be.

use super::*;

/// Checks across objects: references resolve, no `extends` cycles, no name clashes
/// between VMs and pool members.
pub(super) fn check_references(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    let providers: BTreeSet<&str> = f
        .fleet
        .doc
        .spec
        .providers
        .iter()
        .map(|p| p.name.0.as_str())
        .collect();
    let images: BTreeSet<&str> = f
        .fleet
        .doc
        .spec
        .images
        .iter()
        .map(|i| i.name.0.as_str())
        .collect();
    let loadouts: BTreeSet<&str> = f.loadouts.keys().map(String::as_str).collect();

    for o in f.vms.values() {
        check_placement(f, &o.path, &o.tree, "/spec", &o.doc.spec, diags);
    }
    check_workspaces(f, diags);
    check_pool_placements(f, diags);
    for o in f.pools.values() {
        check_placement(
            f,
            &o.path,
            &o.tree,
            "/spec/template/spec",
            &o.doc.spec.template.spec,
            diags,
        );
    }
    let mut check_ref = |o_path: &str,
                         tree: &Located,
                         pointer: &str,
                         value: &str,
                         kind: &str,
                         defined: &BTreeSet<&str>,
                         where_: &str| {
        if !defined.contains(value) {
            let list = if defined.is_empty() {
                format!("none are defined; add one to {where_}")
            } else {
                format!(
                    "defined: {}",
                    defined.iter().copied().collect::<Vec<_>>().join(", ")
                )
            };
            diags.push(field_error_in(
                o_path,
                tree,
                pointer,
                At::Value,
                format!("no {kind} named {value:?}; {list}"),
            ));
        }
    };

    let vm_specs = f
        .vms
        .values()
        .map(|o| (&o.path, &o.tree, "/spec", &o.doc.spec))
        .chain(f.pools.values().map(|o| {
            (
                &o.path,
                &o.tree,
                "/spec/template/spec",
                &o.doc.spec.template.spec,
            )
        }));
    for (path, tree, at, spec) in vm_specs {
        check_ref(
            path,
            tree,
            &format!("{at}/provider"),
            &spec.provider.0,
            "provider",
            &providers,
            "spec.providers in fleet.yaml",
        );
        check_ref(
            path,
            tree,
            &format!("{at}/image"),
            &spec.image.0,
            "image",
            &images,
            "spec.images in fleet.yaml",
        );
        if let Some(l) = &spec.loadout {
            check_ref(
                path,
                tree,
                &format!("{at}/loadout"),
                &l.0,
                "Loadout",
                &loadouts,
                "fleet/loadouts/",
            );
        }
    }
    for o in f.loadouts.values() {
        for (i, parent) in o.doc.spec.extends.iter().enumerate() {
            check_ref(
                &o.path,
                &o.tree,
                &format!("/spec/extends/{i}"),
                &parent.0,
                "Loadout",
                &loadouts,
                "fleet/loadouts/",
            );
        }
    }

    // extends cycles: report each cycle once, at the entry that closes it, with the whole cycle.
    let mut reported: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    for start in f.loadouts.keys() {
        if !done.contains(start) {
            let mut stack = vec![start.clone()];
            find_cycles(f, &mut stack, &mut done, &mut reported, diags);
        }
    }

    // Pool members must not collide with VMs or with other pools' members.
    let mut owners: BTreeMap<String, (&str, &Located, &str)> = f
        .vms
        .iter()
        .map(|(n, o)| (n.clone(), (o.path.as_str(), &o.tree, "VM")))
        .collect();
    for (pool_name, o) in &f.pools {
        for member in pool_member_names(pool_name, o.doc.spec.replicas) {
            if let Some((other_path, other_tree, what)) = owners.get(&member) {
                let other = other_tree.pos_at_pointer("/metadata/name", false);
                diags.push(o.field_error("/spec/replicas", format!("pool member {member:?} clashes with the {what} defined at {other_path}:{}:{}; rename the pool or that object",
                    other.line, other.column)));
            } else {
                owners.insert(member, (o.path.as_str(), &o.tree, "VMPool member"));
            }
        }
    }

    check_secret_references(f, diags);
    check_credential_references(f, diags);
    check_repository_credentials(f, diags);
    check_answer_text(f, diags);

    // A fresh member's name (`<pool>-f<N>`) is never another object's, and a member is
    // never protected: it goes when its run is over, or members would pile up.
    for pool in fresh_pools(f) {
        if let Some(o) = f.pools.get(pool)
            && o.doc.spec.template.spec.protect
        {
            diags.push(o.field_error(
                "/spec/template/spec/protect",
                format!("pool {pool} makes fresh members for task runs, which go when their run is over; remove protect, or make the long-lived VMs replicas of another pool"),
            ));
        }
        for (name, (path, tree, what)) in &owners {
            if crate::lifecycle::member_seq(pool, name).is_some() {
                diags.push(Diagnostic::new(
                    *path,
                    tree.pos_at_pointer("/metadata/name", false),
                    format!(
                        "metadata.name: the {what} {name:?} has the name of a fresh member of pool {pool:?} (<pool>-f<N>); rename it"
                    ),
                ));
            }
        }
    }

    for (i, quota) in f.fleet.doc.spec.policy.quota.iter().enumerate() {
        if let Some(pool) = &quota.pool
            && !f.pools.contains_key(&pool.0)
        {
            let pools: Vec<&str> = f.pools.keys().map(String::as_str).take(10).collect();
            diags.push(f.fleet.field_error(
                &format!("/spec/policy/quota/{i}/pool"),
                format!(
                    "no VMPool named {:?}; defined: {}",
                    pool.0,
                    if pools.is_empty() {
                        "none".to_owned()
                    } else {
                        pools.join(", ")
                    }
                ),
            ));
        }
    }

    for o in f.tasks.values() {
        if let crate::spec::TaskVm::Fresh(fresh) = &o.doc.spec.vm {
            if !f.pools.contains_key(&fresh.pool.0) {
                let pools: Vec<&str> = f.pools.keys().map(String::as_str).take(10).collect();
                let list = if pools.is_empty() {
                    "none are defined; add one to fleet/pools/".to_owned()
                } else {
                    format!("defined: {}", pools.join(", "))
                };
                diags.push(o.field_error(
                    "/spec/vm/pool",
                    format!("no VMPool named {:?}; {list}", fresh.pool.0),
                ));
            }
            if !fresh.fresh {
                diags.push(o.field_error(
                    "/spec/vm/fresh",
                    "must be true (a task names a pool only to get a fresh member per run; name a member to share one)".to_owned(),
                ));
            }
            continue;
        }
        let vm = o.doc.spec.vm.name();
        if !owners.contains_key(vm) {
            let mut names: Vec<&str> = owners.keys().map(String::as_str).take(10).collect();
            if owners.len() > 10 {
                names.push("…");
            }
            let list = if names.is_empty() {
                "none are defined; add one to fleet/vms/".to_owned()
            } else {
                format!("defined: {}", names.join(", "))
            };
            diags.push(o.field_error("/spec/vm", format!("no VM named {vm:?}; {list}")));
        }
    }
}

/// A committed answer holds control characters only when the task of its prompt (the id is
/// `<task>-<run>-<n>`) allows them (`prompts.allowControl`).
fn check_answer_text(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    for (id, o) in &f.answers {
        let Some(response) = &o.doc.spec.response else {
            continue;
        };
        let task = PromptId::parse(id).map(|p| p.task).unwrap_or_default();
        let allowed = f
            .tasks
            .get(&task)
            .is_some_and(|t| t.doc.spec.prompts.as_ref().is_some_and(|p| p.allow_control));
        if let Some(bad) = crate::answer::answer_problem(response, allowed) {
            diags.push(o.field_error("/spec/response", bad));
        }
    }
}

/// A VM's image must suit its provider's kind, and only Proxmox VMs name a node.
fn check_placement(
    f: &LoadedFleet,
    path: &str,
    tree: &Located,
    at: &str,
    spec: &VmSpec,
    diags: &mut Vec<Diagnostic>,
) {
    let fleet = &f.fleet.doc.spec;
    let Some(provider) = fleet.providers.iter().find(|p| p.name == spec.provider) else {
        return;
    };
    let image = fleet.images.iter().find(|i| i.name == spec.image);
    let proxmox = provider.kind == ProviderKind::Proxmox;
    if let Some(image) = image {
        if proxmox && image.template.is_none() {
            diags.push(field_error_in(
                path,
                tree,
                &format!("{at}/image"),
                At::Value,
                format!(
                    "image {:?} has no template, and VMs on Proxmox provider {:?} are cloned from one; set template on the image in fleet.yaml",
                    image.name.0, provider.name.0
                ),
            ));
        }
        if !proxmox && image.kernel.is_none() && image.disk.is_none() {
            diags.push(field_error_in(
                path,
                tree,
                &format!("{at}/image"),
                At::Value,
                format!(
                    "image {:?} has only a Proxmox template, and provider {:?} is libvirt; set kernel or disk on the image",
                    image.name.0, provider.name.0
                ),
            ));
        }
    }
    if !proxmox && spec.node.is_some() {
        diags.push(field_error_in(
            path,
            tree,
            &format!("{at}/node"),
            At::Key,
            format!(
                "only Proxmox providers have nodes, and {:?} is libvirt; remove node",
                provider.name.0
            ),
        ));
    }
}

/// A pool's `placement` names libvirt providers of fleet.yaml, its template's provider
/// among them, and makes no fresh members (a fresh member is made where its template says).
fn check_pool_placements(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    let providers = &f.fleet.doc.spec.providers;
    for (pool, o) in &f.pools {
        let Some(placement) = &o.doc.spec.placement else {
            continue;
        };
        for (i, name) in placement.providers.iter().enumerate() {
            let pointer = format!("/spec/placement/providers/{i}");
            match providers.iter().find(|p| &p.name == name) {
                None => diags.push(o.field_error(
                    &pointer,
                    format!(
                        "no provider named {:?}; name one of spec.providers in fleet.yaml",
                        name.0
                    ),
                )),
                Some(p) if p.kind == ProviderKind::Proxmox => diags.push(o.field_error(
                    &pointer,
                    format!(
                        "{:?} is a Proxmox provider, and placement spreads pools over libvirt providers for now; list libvirt providers only",
                        name.0
                    ),
                )),
                Some(_) => {}
            }
        }
        let home = &o.doc.spec.template.spec.provider;
        if !placement.providers.contains(home) {
            diags.push(o.field_error(
                "/spec/template/spec/provider",
                format!(
                    "pool {pool} is placed over {}, and its template's provider {:?} is not one of them; add it to spec.placement.providers or name one of those",
                    placement
                        .providers
                        .iter()
                        .map(|p| p.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    home.0
                ),
            ));
        }
        if fresh_pools(f).contains(pool.as_str()) {
            diags.push(o.field_error(
                "/spec/placement",
                format!(
                    "pool {pool} makes fresh members for task runs, which are made on its template's provider; remove placement, or make the fresh members in a pool of their own"
                ),
            ));
        }
    }
}

/// Each VM's workspaces exist, live on its provider (a libvirt one, for now), and no
/// workspace is attached to two VMs.
fn check_workspaces(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    let providers = &f.fleet.doc.spec.providers;
    for o in f.workspaces.values() {
        let provider = &o.doc.spec.provider;
        match providers.iter().find(|p| &p.name == provider) {
            None => diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/provider",
                At::Value,
                format!(
                    "no provider named {:?}; name one of spec.providers in fleet.yaml",
                    provider.0
                ),
            )),
            Some(p) if p.kind == ProviderKind::Proxmox => diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/provider",
                At::Value,
                format!(
                    "{:?} is a Proxmox provider, and workspaces live on libvirt providers for now; use a libvirt provider",
                    provider.0
                ),
            )),
            Some(_) => {}
        }
    }
    let mut attached: BTreeMap<&str, &str> = BTreeMap::new();
    // A loadout's mount of a missing workspace, told once however many VMs use it.
    let mut missing_told = BTreeSet::new();
    for o in f.vms.values() {
        let vm = o.doc.metadata.name.0.as_str();
        let mounts = super::vm_mounts(f, &o.doc.spec);
        // Where a mount is written: the VM's file, or its loadout's (naming the VM).
        let at = |m: &super::VmMount<'_>, field: &str, message: String| match m.loadout {
            None => field_error_in(
                &o.path,
                &o.tree,
                &format!("/spec/workspaces/{}/{field}", m.index),
                At::Value,
                message,
            ),
            Some(loadout) => {
                let l = &f.loadouts[loadout];
                field_error_in(
                    &l.path,
                    &l.tree,
                    &format!("/spec/workspaces/{}/{field}", m.index),
                    At::Value,
                    format!("(for VM {vm:?}) {message}"),
                )
            }
        };
        if mounts.is_empty() && o.doc.spec.snapshots.is_some() {
            diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/snapshots",
                At::Value,
                "snapshots are of the VM's workspaces, and it has none: add workspaces, or remove snapshots",
            ));
        }
        if mounts.len() > super::WORKSPACES_PER_VM
            && o.doc.spec.workspaces.len() <= super::WORKSPACES_PER_VM
        {
            diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/loadout",
                At::Value,
                format!(
                    "with its loadout's, the VM mounts {} workspaces, and a VM mounts at most {}; mount fewer",
                    mounts.len(),
                    super::WORKSPACES_PER_VM
                ),
            ));
        }
        let mut mine = BTreeSet::new();
        for (i, m) in mounts.iter().enumerate() {
            let name = m.mount.name.0.as_str();
            if !mine.insert(name) {
                diags.push(at(
                    m,
                    "name",
                    format!("workspace {name:?} is mounted twice in this VM; mount it once"),
                ));
                continue;
            }
            // Paths of a loadout's mounts against the VM's own (each list alone is checked
            // with its file).
            let path = m.mount.mount_path.0.trim_end_matches('/');
            if let Some(other) = mounts[..i].iter().find(|p| {
                p.loadout != m.loadout && {
                    let q = p.mount.mount_path.0.trim_end_matches('/');
                    q == path
                        || q.starts_with(&format!("{path}/"))
                        || path.starts_with(&format!("{q}/"))
                }
            }) {
                diags.push(at(
                    m,
                    "mountPath",
                    format!(
                        "{:?} and workspace {:?}'s {:?} (from {}) are the same or nest; mount them side by side",
                        m.mount.mount_path.0,
                        other.mount.name.0,
                        other.mount.mount_path.0,
                        other.loadout.map_or_else(|| "the VM".to_owned(), |l| format!("loadout {l:?}"))
                    ),
                ));
            }
            let Some(workspace) = f.workspaces.get(name) else {
                let own_vm = if m.loadout.is_some() { "" } else { vm };
                if missing_told.insert((m.loadout, own_vm, m.index)) {
                    let mut diag = at(
                        m,
                        "name",
                        format!(
                            "no Workspace named {name:?}; add fleet/workspaces/{name}.yaml, or remove the mount"
                        ),
                    );
                    if m.loadout.is_some() {
                        diag.message = diag.message.replacen(&format!("(for VM {vm:?}) "), "", 1);
                    }
                    diags.push(diag);
                }
                continue;
            };
            if workspace.doc.spec.provider != o.doc.spec.provider {
                diags.push(at(
                    m,
                    "name",
                    format!(
                        "workspace {name:?} lives on provider {:?} and this VM runs on {:?}; a workspace is attached on its own provider",
                        workspace.doc.spec.provider.0, o.doc.spec.provider.0
                    ),
                ));
            }
            if let Some(first) = attached.insert(name, vm)
                && first != vm
            {
                let fix = match m.loadout {
                    None => String::new(),
                    Some(l) => format!(
                        " (loadout {l:?} mounts it: use that loadout in one VM only, or mount the workspace in the VM's own file)"
                    ),
                };
                diags.push(at(
                    m,
                    "name",
                    format!(
                        "workspace {name:?} is attached to VM {first:?} already; a workspace belongs to one VM at a time{fix}"
                    ),
                ));
            }
        }
    }
    // A pool's members would share its loadout's workspaces, and so have none for a
    // snapshots policy.
    for o in f.pools.values() {
        let template = &o.doc.spec.template.spec;
        if template.snapshots.is_some() {
            diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/template/spec/snapshots",
                At::Value,
                "snapshots are of a VM's workspaces, and a pool's members have none: remove snapshots",
            ));
        }
        if let Some(loadout) = &template.loadout
            && let Some(m) = super::vm_mounts(f, template)
                .iter()
                .find(|m| m.loadout.is_some())
        {
            diags.push(field_error_in(
                &o.path,
                &o.tree,
                "/spec/template/spec/loadout",
                At::Value,
                format!(
                    "loadout {:?} mounts workspace {:?} (from loadout {:?}), and a pool's members would share it; give the pool a loadout without workspaces",
                    loadout.0,
                    m.mount.name.0,
                    m.loadout.unwrap_or_default()
                ),
            ));
        }
    }
}

/// Every reference names a Secret and one of its keys, and the Secret allows it (see
/// `check_secret_allowed`). Nothing is decrypted.
fn check_secret_references(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    let uses = f
        .loadouts
        .values()
        .map(|o| {
            (
                &o.path,
                &o.tree,
                &o.doc.spec.secrets,
                SecretUser::Loadout(&o.doc.metadata.name.0),
            )
        })
        .chain(f.tasks.values().map(|o| {
            (
                &o.path,
                &o.tree,
                &o.doc.spec.secrets,
                SecretUser::Task {
                    task: &o.doc.metadata.name.0,
                    vm: o.doc.spec.vm.name(),
                },
            )
        }));
    for (path, tree, refs, user) in uses {
        for (i, r) in refs.iter().enumerate() {
            let Some(secret) = f.secrets.get(&r.secret.0) else {
                let defined: Vec<&str> = f.secrets.keys().map(String::as_str).collect();
                let list = if defined.is_empty() {
                    "none are defined; create one with `fleet secret set NAME KEY`".to_owned()
                } else {
                    format!("defined: {}", defined.join(", "))
                };
                diags.push(field_error_in(
                    path,
                    tree,
                    &format!("/spec/secrets/{i}/secret"),
                    At::Value,
                    format!("no Secret named {:?}; {list}", r.secret.0),
                ));
                continue;
            };
            if secret
                .doc
                .spec
                .allowed
                .as_ref()
                .is_some_and(|a| !a.hosts.is_empty())
            {
                diags.push(field_error_in(
                    path,
                    tree,
                    &format!("/spec/secrets/{i}/secret"),
                    At::Value,
                    format!(
                        "Secret {:?} ({}) lists allowed.hosts: its values go only to those APIs, through the host's broker, never into a guest; use it in egress.credentials",
                        r.secret.0, secret.path
                    ),
                ));
                continue;
            }
            if let Some(refusal) = user.refused_by(f, &secret.doc.spec) {
                diags.push(field_error_in(
                    path,
                    tree,
                    &format!("/spec/secrets/{i}/secret"),
                    At::Value,
                    format!("Secret {:?} ({}) {refusal}", r.secret.0, secret.path),
                ));
            }
            if !secret.doc.spec.data.contains_key(&r.key) {
                let keys: Vec<&str> = secret.doc.spec.data.keys().map(|k| k.0.as_str()).collect();
                diags.push(field_error_in(
                    path,
                    tree,
                    &format!("/spec/secrets/{i}/key"),
                    At::Value,
                    format!(
                        "Secret {:?} ({}) has no key {:?}; its keys: {}",
                        r.secret.0,
                        secret.path,
                        r.key.0,
                        keys.join(", ")
                    ),
                ));
            }
        }
    }
}

/// Every credential of a loadout's `egress.credentials` names a Secret's key, and the
/// Secret lists the credential's host in `allowed.hosts`: whoever writes the Secret decides
/// where its value may be sent, not only whoever writes the loadout.
fn check_credential_references(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    for o in f.loadouts.values() {
        let Some(egress) = &o.doc.spec.egress else {
            continue;
        };
        for (i, c) in egress.credentials.iter().enumerate() {
            let at = format!("/spec/egress/credentials/{i}/secret");
            let error = |field: &str, message: String| {
                field_error_in(
                    &o.path,
                    &o.tree,
                    &format!("{at}/{field}"),
                    At::Value,
                    message,
                )
            };
            let Some(secret) = f.secrets.get(&c.secret.secret.0) else {
                diags.push(error(
                    "secret",
                    format!(
                        "no Secret named {:?}; create one with `fleet secret set {} KEY`",
                        c.secret.secret.0, c.secret.secret.0
                    ),
                ));
                continue;
            };
            if !secret.doc.spec.data.contains_key(&c.secret.key) {
                let keys: Vec<&str> = secret.doc.spec.data.keys().map(|k| k.0.as_str()).collect();
                diags.push(error(
                    "key",
                    format!(
                        "Secret {:?} ({}) has no key {:?}; its keys: {}",
                        c.secret.secret.0,
                        secret.path,
                        c.secret.key.0,
                        keys.join(", ")
                    ),
                ));
            }
            let host = crate::egress::normalize_host(&c.host);
            let port = c.port.map_or(crate::egress::DEFAULT_PORT, |p| p.0);
            let default = crate::spec::SecretAllowed::default();
            let allowed = secret.doc.spec.allowed.as_ref().unwrap_or(&default);
            let to_host = allowed.hosts.iter().any(|entry| {
                let (h, p) = crate::egress::allowed_host(entry);
                h == host && p == Some(port)
            });
            let shown = if port == crate::egress::DEFAULT_PORT {
                host.to_owned()
            } else {
                format!("{host}:{port}")
            };
            if !to_host {
                diags.push(error(
                    "secret",
                    format!(
                        "Secret {:?} ({}) may not be sent to {shown}; add {shown} to the Secret's spec.allowed.hosts",
                        c.secret.secret.0, secret.path
                    ),
                ));
            }
            let loadout = &o.doc.metadata.name.0;
            if !allowed.loadouts.iter().any(|l| &l.0 == loadout) {
                diags.push(error(
                    "secret",
                    format!(
                        "Secret {:?} ({}) does not allow loadout {loadout:?}; add it to the Secret's spec.allowed.loadouts",
                        c.secret.secret.0, secret.path
                    ),
                ));
            }
        }
    }
}

/// A repository's credential goes only where its Secret allows: an `https://` or `ssh://`
/// URL whose host (and port) the Secret's `allowed.hosts` lists, for a task its
/// `allowed.tasks` lists, so a committer cannot point an existing key at a server of
/// theirs without also editing the Secret, which its review shows.
fn check_repository_credentials(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
    for o in f.tasks.values() {
        let repository = o.doc.spec.repository.as_ref();
        if let Some(repo) = repository
            && let Some(c) = &repo.credentials
        {
            check_git_credential(f, o, "/spec/repository/credentials", &repo.url, c, diags);
        }
        let push = o.doc.spec.results.as_ref().and_then(|r| r.push.as_ref());
        if let Some(push) = push
            && let Some(c) = &push.credentials
            && let Some(url) = push.url.as_ref().or(repository.map(|r| &r.url))
        {
            check_git_credential(f, o, "/spec/results/push/credentials", url, c, diags);
        }
    }
}

/// One credential of a task for `url`, at `at`.
fn check_git_credential(
    f: &LoadedFleet,
    o: &Object<crate::spec::TaskDocument>,
    at: &str,
    url: &str,
    c: &crate::spec::RepositoryCredentials,
    diags: &mut Vec<Diagnostic>,
) {
    let endpoint = super::host_rules::Endpoint::parse(url).filter(|e| e.scheme != "git");
    let Some(endpoint) = endpoint else {
        diags.push(o.field_error(
            at,
            format!(
                "credentials are for https:// and ssh:// repositories, and {url:?} is neither; remove credentials"
            ),
        ));
        return;
    };
    let Some(secret) = f.secrets.get(&c.secret.0) else {
        diags.push(o.field_error(
            &format!("{at}/secret"),
            format!(
                "no Secret named {:?}; create one with `fleet secret set {} KEY`",
                c.secret.0, c.secret.0
            ),
        ));
        return;
    };
    if !secret.doc.spec.data.contains_key(&c.key) {
        let keys: Vec<&str> = secret.doc.spec.data.keys().map(|k| k.0.as_str()).collect();
        diags.push(o.field_error(
            &format!("{at}/key"),
            format!(
                "Secret {:?} ({}) has no key {:?}; its keys: {}",
                c.secret.0,
                secret.path,
                c.key.0,
                keys.join(", ")
            ),
        ));
    }
    let default = crate::spec::SecretAllowed::default();
    let allowed = secret.doc.spec.allowed.as_ref().unwrap_or(&default);
    let to_host = allowed.hosts.iter().any(|entry| {
        let (h, p) = crate::egress::allowed_host(entry);
        h == endpoint.host && p == Some(endpoint.port)
    });
    let shown = endpoint.allowed_name();
    if !to_host {
        diags.push(o.field_error(
            &format!("{at}/secret"),
            format!(
                "Secret {:?} ({}) may not be sent to {shown}; add {shown} to the Secret's spec.allowed.hosts",
                c.secret.0, secret.path
            ),
        ));
    }
    let task = &o.doc.metadata.name.0;
    if !allowed.tasks.iter().any(|t| &t.0 == task) {
        diags.push(o.field_error(
            &format!("{at}/secret"),
            format!(
                "Secret {:?} ({}) does not allow task {task:?}; add it to the Secret's spec.allowed.tasks",
                c.secret.0, secret.path
            ),
        ));
    }
}

/// What takes a Secret: a loadout (for every VM using it) or a task (in its VM).
enum SecretUser<'a> {
    Loadout(&'a str),
    Task { task: &'a str, vm: &'a str },
}

impl SecretUser<'_> {
    /// Why the Secret's `allowed` does not cover this user, if it does not.
    fn refused_by(&self, f: &LoadedFleet, spec: &crate::spec::SecretSpec) -> Option<String> {
        let default = crate::spec::SecretAllowed::default();
        let allowed = spec.allowed.as_ref().unwrap_or(&default);
        let listed = |names: &[crate::spec::Name], name: &str| names.iter().any(|n| n.0 == name);
        match *self {
            SecretUser::Loadout(name) if listed(&allowed.loadouts, name) => None,
            SecretUser::Loadout(name) => Some(format!(
                "does not allow loadout {name:?}; add it to the Secret's spec.allowed.loadouts"
            )),
            SecretUser::Task { task, vm } => {
                let pool = f
                    .pools
                    .iter()
                    .find(|(pool, o)| pool_member_names(pool, o.doc.spec.replicas).any(|m| m == vm))
                    .map(|(pool, _)| pool.as_str());
                let ok = listed(&allowed.tasks, task)
                    || listed(&allowed.vms, vm)
                    || pool.is_some_and(|p| listed(&allowed.vms, p));
                (!ok).then(|| format!(
                    "does not allow task {task:?} (in VM {vm:?}); add the task to the Secret's spec.allowed.tasks or its VM to spec.allowed.vms"
                ))
            }
        }
    }
}

fn find_cycles(
    f: &LoadedFleet,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    reported: &mut BTreeSet<Vec<String>>,
    diags: &mut Vec<Diagnostic>,
) {
    let current = stack.last().cloned().unwrap_or_default();
    let Some(o) = f.loadouts.get(&current) else {
        return;
    };
    for (i, parent) in o.doc.spec.extends.iter().enumerate() {
        let parent = &parent.0;
        if let Some(at) = stack.iter().position(|n| n == parent) {
            let cycle: Vec<String> = stack[at..].to_vec();
            // Canonical form (rotation starting at the smallest name) to report once.
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| *n)
                .map_or(0, |(i, _)| i);
            let canonical: Vec<String> =
                cycle[min..].iter().chain(&cycle[..min]).cloned().collect();
            if reported.insert(canonical) {
                let text = cycle
                    .iter()
                    .chain(std::iter::once(parent))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" → ");
                diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&format!("/spec/extends/{i}"), false), format!(
                    "spec.extends: cycle {text}; a loadout cannot extend itself, directly or through others"
                )));
            }
        } else if f.loadouts.contains_key(parent) && !done.contains(parent) && stack.len() < 256 {
            stack.push(parent.clone());
            find_cycles(f, stack, done, reported, diags);
            stack.pop();
        }
    }
    done.insert(current);
}

/// The pools whose fresh members may exist: those with a `fresh` section and those a task
/// asks for a fresh member of.
pub(crate) fn fresh_pools(f: &LoadedFleet) -> std::collections::BTreeSet<&str> {
    let asked = f.tasks.values().filter_map(|o| match &o.doc.spec.vm {
        crate::spec::TaskVm::Fresh(fresh) => Some(fresh.pool.0.as_str()),
        crate::spec::TaskVm::Named(_) => None,
    });
    f.pools
        .iter()
        .filter(|(_, o)| o.doc.spec.fresh.is_some())
        .map(|(name, _)| name.as_str())
        .chain(asked)
        .collect()
}
