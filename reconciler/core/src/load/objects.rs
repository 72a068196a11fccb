//! Checks of one object on its own: what the schema cannot say (ranges, unique entries,
//! secret targets, task shapes, networks).

use super::*;

/// Checks that need only the object itself.
pub(super) fn check_object(object: &AnyObject, diags: &mut Vec<Diagnostic>) {
    match object {
        AnyObject::Fleet(o) => {
            let spec = &o.doc.spec;
            for (i, quota) in spec.policy.quota.iter().enumerate() {
                let at = format!("/spec/policy/quota/{i}");
                let selectors =
                    usize::from(quota.pool.is_some()) + usize::from(!quota.labels.is_empty());
                if selectors != 1 {
                    diags.push(o.field_error(
                        &at,
                        "counts the VMs of a pool or those with some labels: set exactly one of pool and labels".to_owned(),
                    ));
                }
                if quota.vms.is_none() && quota.memory.is_none() {
                    diags.push(
                        o.field_error(&at, "caps nothing: set vms, memory or both".to_owned()),
                    );
                }
            }
            if let Some(age) = spec
                .policy
                .retention
                .as_ref()
                .and_then(|r| r.finished_task_age.as_ref())
            {
                let range = (std::time::Duration::from_secs(60), A_YEAR);
                let why = "use a duration from 1m to 8784h";
                check_duration(
                    o,
                    "/spec/policy/retention/finishedTaskAge",
                    age,
                    range,
                    why,
                    diags,
                );
            }
            let mut seen = BTreeMap::new();
            for (i, p) in spec.providers.iter().enumerate() {
                unique_in_list(
                    o,
                    &mut seen,
                    p.name.0.as_str(),
                    &format!("/spec/providers/{i}/name"),
                    "provider",
                    diags,
                );
            }
            let mut seen = BTreeMap::new();
            for (i, img) in spec.images.iter().enumerate() {
                let at = format!("/spec/images/{i}");
                unique_in_list(
                    o,
                    &mut seen,
                    &img.name.0,
                    &format!("{at}/name"),
                    "image",
                    diags,
                );
                if img.kernel.is_none() && img.disk.is_none() && img.template.is_none() {
                    diags.push(o.field_error(&at, format!(
                        "image {:?} has neither kernel nor disk nor template; set kernel (and initrd) for direct kernel boot, disk for a qcow2 base image, or template for Proxmox",
                        img.name.0
                    )));
                }
                for (field, value) in [
                    ("kernel", &img.kernel),
                    ("initrd", &img.initrd),
                    ("disk", &img.disk),
                ] {
                    if let Some(problem) = value.as_deref().and_then(relative_path_problem) {
                        diags.push(o.field_error(&format!("{at}/{field}"), format!(
                            "{problem}; image files are named relative to the host's image root (imageRoot in the host configuration)"
                        )));
                    }
                }
                for (field, value) in [("initrd", &img.initrd), ("cmdline", &img.cmdline)] {
                    if value.is_some() && img.kernel.is_none() {
                        diags.push(o.key_error(&format!("{at}/{field}"), format!(
                            "only used with direct kernel boot; set kernel as well or remove {field}"
                        )));
                    }
                }
            }
            for (field, value) in [
                ("reconcileInterval", &spec.policy.reconcile_interval),
                ("stepTimeout", &spec.policy.step_timeout),
                ("shutdownTimeout", &spec.policy.shutdown_timeout),
                ("resyncInterval", &spec.policy.resync_interval),
            ] {
                if let Some(d) = value
                    && d.to_std() > A_WEEK
                {
                    diags.push(o.field_error(
                        &format!("/spec/policy/{field}"),
                        format!(
                            "{:?} is out of range; use a duration up to 168h",
                            d.as_str()
                        ),
                    ));
                }
            }
        }
        AnyObject::Loadout(o) => {
            check_resources(o, "/spec/resources", o.doc.spec.resources.as_ref(), diags);
            check_mounts(o, "/spec", &o.doc.spec.workspaces, diags);
            check_secret_targets(o, "/spec/secrets", &o.doc.spec.secrets, diags);
            if let Some(egress) = &o.doc.spec.egress {
                check_egress(o, egress, diags);
                let mode = o.doc.spec.network.as_ref().map(|n| n.mode);
                if mode.is_some_and(|m| m != NetworkMode::Brokered) {
                    diags.push(o.key_error(
                        "/spec/egress",
                        "egress rules take effect only with network.mode: brokered; set it, or remove them",
                    ));
                }
            }
        }
        AnyObject::Secret(o) => {
            let hosts = o.doc.spec.allowed.iter().flat_map(|a| a.hosts.iter());
            for (i, host) in hosts.enumerate() {
                let (name, port) = crate::egress::allowed_host(host);
                if port.is_none()
                    || !matches!(
                        crate::egress::HostPattern::parse(&name),
                        Ok(crate::egress::HostPattern::Name(_))
                    )
                {
                    diags.push(o.field_error(
                        &format!("/spec/allowed/hosts/{i}"),
                        format!("{host:?} is not an API host; write its exact name, with :port unless it is 443, for example api.anthropic.com"),
                    ));
                }
            }
        }
        AnyObject::Host(o) => host_rules::check_host_object(o, diags),
        AnyObject::Vm(o) => check_vm_spec(o, "/spec", &o.doc.spec, diags),
        AnyObject::Workspace(o) => {
            let size = &o.doc.spec.size;
            let (min, max) = super::WORKSPACE_MIB;
            if size.mib() < min || size.mib() > max {
                diags.push(o.field_error(
                    "/spec/size",
                    format!(
                        "{:?} is out of bounds; a workspace is 16Mi to 16Ti",
                        size.as_str()
                    ),
                ));
            }
        }
        AnyObject::Task(o) => check_task(o, diags),
        AnyObject::Answer(o) => {
            let spec = &o.doc.spec;
            match (&spec.response, &spec.approve) {
                // Control characters depend on the prompt's task: see `check_answer_text`.
                (Some(response), None) => {
                    if let Some(bad) = crate::answer::answer_problem(response, true) {
                        diags.push(o.field_error("/spec/response", bad));
                    }
                }
                (None, Some(_)) => {}
                (Some(_), Some(_)) => diags.push(o.key_error(
                    "/spec/approve",
                    "an Answer either answers a prompt (`response`) or approves held steps (`approve`), not both; remove one",
                )),
                (None, None) => diags.push(o.field_error(
                    "/spec",
                    "say what the answer is: `response: TEXT` for a prompt, or `approve: DIGEST` for an approval",
                )),
            }
        }
        AnyObject::VmPool(o) => {
            let template = &o.doc.spec.template.spec;
            check_vm_spec(o, "/spec/template/spec", template, diags);
            if !template.workspaces.is_empty() {
                diags.push(o.key_error(
                    "/spec/template/spec/workspaces",
                    "a workspace belongs to one VM, and a pool's members would share it; attach workspaces to VMs of their own",
                ));
            }
            // Fresh members live for their runs: a lease or idle rule is for replicas.
            for (field, set) in [
                ("lease", template.lease.is_some()),
                ("idle", template.idle.is_some()),
            ] {
                if set && o.doc.spec.replicas == 0 {
                    diags.push(o.key_error(
                        &format!("/spec/template/spec/{field}"),
                        format!("applies to the pool's replicas, and it has none (fresh members live for their runs); remove {field}, or set replicas"),
                    ));
                }
            }
            let width = pool_width(o.doc.spec.replicas);
            let longest = o.doc.metadata.name.0.len() + 1 + width;
            if longest > 63 {
                diags.push(o.field_error("/metadata/name", format!("VM names made from this pool ({}-{}) would be {longest} characters; names are at most 63, shorten the pool name",
                    o.doc.metadata.name.0, "0".repeat(width))));
            }
        }
    }
}

/// Each reference names exactly one place (`env` or `file`), and no two references of one
/// list name the same place.
fn check_secret_targets<T>(
    o: &Object<T>,
    at: &str,
    refs: &[SecretRef],
    diags: &mut Vec<Diagnostic>,
) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, r) in refs.iter().enumerate() {
        let pointer = format!("{at}/{i}");
        let target = match (&r.env, &r.file) {
            (Some(_), Some(_)) => {
                diags.push(o.key_error(
                    &format!("{pointer}/file"),
                    "a secret reference sets either `env` or `file`, not both; remove one",
                ));
                continue;
            }
            (None, None) => {
                diags.push(o.field_error(
                    &pointer,
                    "say where the value goes: `env: VAR` (an environment variable) or `file: PATH` (under /run/fleet/secrets)",
                ));
                continue;
            }
            (Some(env), None) => format!("env {env}"),
            // The schema's pattern keeps paths plain and relative (no `.` or `..`).
            (None, Some(file)) => format!("file {file}"),
        };
        if let Some(first) = seen.insert(target.clone(), i) {
            diags.push(o.field_error(
                &pointer,
                format!(
                    "{target} is already set by {}[{first}]; each variable or file takes one secret",
                    diagnostic::field_path(at)
                ),
            ));
        }
    }
}

fn check_task(o: &Object<TaskDocument>, diags: &mut Vec<Diagnostic>) {
    let spec = &o.doc.spec;
    check_secret_targets(o, "/spec/secrets", &spec.secrets, diags);
    if let Some(egress) = &spec.egress {
        // The same checks as a loadout's rules, at the same places in the file.
        let rules = crate::spec::Egress {
            allow: egress.allow.clone(),
            ..Default::default()
        };
        check_egress(o, &rules, diags);
    }
    let name = &o.doc.metadata.name.0;
    if name.len() > TASK_NAME_MAX {
        diags.push(o.field_error("/metadata/name", format!("task names are at most {TASK_NAME_MAX} characters (this one has {}), so the prompt ids made from them stay valid names; shorten it",
                name.len())),
        );
    }
    match (&spec.command, &spec.agent) {
        (Some(_), Some(_)) => diags.push(o.key_error("/spec/agent", "a task runs either `command` or `agent`, not both; remove one")),
        (None, None) => diags.push(o.field_error("/spec", "a task needs `command` (a program and its arguments) or `agent` (kind and prompt); add one")),
        _ => {}
    }
    if let Some(agent) = &spec.agent
        && agent.interactive
        && agent.kind == crate::spec::AgentKind::Aider
    {
        diags.push(o.field_error("/spec/agent/interactive", "aider's own interface starts without a prompt, so fleet cannot start it on this one; use claude, codex or gemini, or remove interactive".to_owned()));
    }
    if let Some(t) = &spec.timeout
        && t.to_std() > A_WEEK
    {
        diags.push(o.field_error(
            "/spec/timeout",
            format!(
                "{:?} is out of range; use a duration up to 168h",
                t.as_str()
            ),
        ));
    }
    for (i, glob) in spec.artifacts.iter().enumerate() {
        if glob.is_empty() || glob.starts_with('/') || glob.split('/').any(|c| c == "..") {
            diags.push(o.field_error(&format!("/spec/artifacts/{i}"), format!("{glob:?} must be a relative glob inside the task's directory (no leading / and no ..)")));
        }
    }
    if let Some(prompts) = &spec.prompts {
        for (i, pattern) in prompts.patterns.iter().enumerate() {
            if let Err(e) = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
            {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or_default().trim().to_owned();
                diags.push(o.field_error(
                    &format!("/spec/prompts/patterns/{i}"),
                    format!("not a valid regular expression ({first})"),
                ));
            }
        }
        if let Some(d) = &prompts.deadline
            && d.to_std() > A_MONTH
        {
            diags.push(o.field_error(
                "/spec/prompts/deadline",
                format!(
                    "{:?} is out of range; use a duration up to 720h",
                    d.as_str()
                ),
            ));
        }
    }
}

/// A file's own workspace mounts (a VM's, a pool template's or a loadout's): how many, and
/// each mount path alone and against the others of the list.
fn check_mounts<T>(
    o: &Object<T>,
    at: &str,
    mounts: &[crate::spec::WorkspaceMount],
    diags: &mut Vec<Diagnostic>,
) {
    if mounts.len() > super::WORKSPACES_PER_VM {
        diags.push(o.field_error(
            &format!("{at}/workspaces"),
            format!(
                "{} workspaces; a VM mounts at most {}",
                mounts.len(),
                super::WORKSPACES_PER_VM
            ),
        ));
    }
    let mut paths = std::collections::BTreeSet::new();
    for (i, mount) in mounts.iter().enumerate() {
        let pointer = format!("{at}/workspaces/{i}/mountPath");
        let path = &mount.mount_path.0;
        if let Some(why) = crate::spec::mount_path_problem(path) {
            diags.push(o.field_error(&pointer, why));
        } else if !paths.insert(path.trim_end_matches('/')) {
            diags.push(o.field_error(
                &pointer,
                format!("{path:?} is mounted twice; give each workspace its own path"),
            ));
        } else if let Some(other) = mounts[..i].iter().find(|m| {
            crate::spec::mount_path_problem(&m.mount_path.0).is_none() && {
                let (a, b) = (
                    m.mount_path.0.trim_end_matches('/'),
                    path.trim_end_matches('/'),
                );
                a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
            }
        }) {
            diags.push(o.field_error(
                &pointer,
                format!(
                    "{path:?} and {:?} nest: one workspace would hide part of the other; mount them side by side",
                    other.mount_path.0
                ),
            ));
        }
    }
}

fn check_vm_spec<T>(o: &Object<T>, at: &str, spec: &VmSpec, diags: &mut Vec<Diagnostic>) {
    check_resources(
        o,
        &format!("{at}/resources"),
        spec.resources.as_ref(),
        diags,
    );
    check_mounts(o, at, &spec.workspaces, diags);
    if let Some(lease) = &spec.lease {
        let why = "a lease lasts from 10s to 8784h (a year)";
        let range = (crate::lease::MIN_TTL, A_YEAR);
        check_duration(o, &format!("{at}/lease/ttl"), &lease.ttl, range, why, diags);
    }
    if let Some(idle) = &spec.idle {
        let why = "use a duration from 10s to 168h";
        let range = (crate::idle::MIN_STOP_AFTER, A_WEEK);
        check_duration(
            o,
            &format!("{at}/idle/stopAfter"),
            &idle.stop_after,
            range,
            why,
            diags,
        );
    }
}

/// A duration at `pointer` within `(min, max)`, or a diagnostic saying `why` not.
fn check_duration<T>(
    o: &Object<T>,
    pointer: &str,
    value: &crate::spec::Duration,
    (min, max): (std::time::Duration, std::time::Duration),
    why: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let d = value.to_std();
    if d < min || d > max {
        diags.push(o.field_error(
            pointer,
            format!("{:?} is out of range; {why}", value.as_str()),
        ));
    }
}

fn check_resources<T>(
    o: &Object<T>,
    at: &str,
    resources: Option<&Resources>,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(r) = resources else { return };
    for (field, size, (min, max), what) in [
        ("memory", &r.memory, MEMORY_MIB, "64Mi to 1Ti"),
        ("disk", &r.disk, DISK_MIB, "1Gi to 16Ti"),
    ] {
        if let Some(size) = size
            && (size.mib() < min || size.mib() > max)
        {
            let pointer = format!("{at}/{field}");
            diags.push(o.field_error(
                &pointer,
                format!(
                    "{:?} is out of bounds; {field} must be {what}",
                    size.as_str()
                ),
            ));
        }
    }
}

/// Each rule's host is a name, `*.domain` or address; each path one a prefix check reads
/// as the upstream does.
fn check_egress<T>(o: &Object<T>, egress: &crate::spec::Egress, diags: &mut Vec<Diagnostic>) {
    for (i, rule) in egress.allow.iter().enumerate() {
        if let Err(why) = crate::egress::HostPattern::parse(&rule.host) {
            diags.push(o.field_error(&format!("/spec/egress/allow/{i}/host"), why));
        }
        for (j, path) in rule.paths.iter().enumerate() {
            if let Some(why) = crate::egress::path_problem(path) {
                diags.push(o.field_error(
                    &format!("/spec/egress/allow/{i}/paths/{j}"),
                    format!("{path:?} {why}; write a plain prefix such as /repos/team/"),
                ));
            }
        }
    }
    let mut hosts = BTreeMap::new();
    for (i, c) in egress.credentials.iter().enumerate() {
        let at = |field: &str| format!("/spec/egress/credentials/{i}/{field}");
        match crate::egress::HostPattern::parse(&c.host) {
            Ok(crate::egress::HostPattern::Below(_) | crate::egress::HostPattern::Address(_)) => {
                diags.push(o.field_error(
                    &at("host"),
                    format!(
                        "{:?}: a credential is for one API host name (its TLS certificate names it); write its exact name",
                        c.host
                    ),
                ));
            }
            Err(why) => diags.push(o.field_error(&at("host"), why)),
            Ok(_) => unique_in_list(
                o,
                &mut hosts,
                &crate::egress::normalize_host(&c.host),
                &at("host"),
                "credential host",
                diags,
            ),
        }
        if let Some(header) = &c.header
            && !crate::egress::CREDENTIAL_HEADERS.contains(&header.to_ascii_lowercase().as_str())
        {
            diags.push(o.field_error(
                &at("header"),
                format!(
                    "{header:?} cannot carry a credential (a server might echo it back); use one of {}",
                    crate::egress::CREDENTIAL_HEADERS.join(", ")
                ),
            ));
        }
        let basic = c.scheme == Some(crate::spec::CredentialScheme::Basic);
        match (basic, &c.username) {
            (true, None) => diags.push(o.key_error(
                &format!("/spec/egress/credentials/{i}"),
                "scheme basic needs a username (for example x-access-token for a git host's token)",
            )),
            (false, Some(_)) => diags.push(o.field_error(
                &at("username"),
                "a username is used only with scheme: basic; set that, or remove it",
            )),
            _ => {}
        }
    }
}

pub(super) fn unique_in_list<T>(
    o: &Object<T>,
    seen: &mut BTreeMap<String, Pos>,
    name: &str,
    pointer: &str,
    what: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let pos = o.tree.pos_at_pointer(pointer, false);
    if let Some(first) = seen.get(name) {
        diags.push(o.field_error(
            pointer,
            format!(
                "{what} {name:?} is already defined at line {}; {what} names must be unique",
                first.line
            ),
        ));
    } else {
        seen.insert(name.to_owned(), pos);
    }
}
