//! Snapshot → typed fleet objects, or every diagnostic at once.
//!
//! Per file: size cap, UTF-8, YAML (positions kept), JSON Schema, typed deserialisation.
//! Across files: placement of kinds, unique names, references, `extends` cycles, bounds.
//! A revision with any diagnostic loads as nothing: it is never applied, not even in part.
//!
//! Architecture invariant: pure. No I/O, no clock; the snapshot is the whole input.

pub mod diagnostic;
mod host_rules;
pub mod schema;
pub mod yaml;

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

pub use diagnostic::Diagnostic;
use yaml::{Located, Pos};

use crate::ids::PromptId;
use crate::snapshot::{Revision, Snapshot};
use crate::spec::{
    AnswerDocument, FleetDocument, HostDocument, HostSpec, Kind, LoadoutDocument, NetworkMode,
    ProviderKind, Resources, SecretDocument, SecretRef, TaskDocument, VmDocument, VmPoolDocument,
    VmSpec,
};

/// One object and the file it came from.
#[derive(Clone, Debug)]
pub struct Object<T> {
    pub path: String,
    pub tree: Located,
    pub doc: T,
}

/// A revision that passed every check.
#[derive(Clone, Debug)]
pub struct LoadedFleet {
    pub revision: Revision,
    pub fleet: Object<FleetDocument>,
    pub loadouts: BTreeMap<String, Object<LoadoutDocument>>,
    pub vms: BTreeMap<String, Object<VmDocument>>,
    pub pools: BTreeMap<String, Object<VmPoolDocument>>,
    pub tasks: BTreeMap<String, Object<TaskDocument>>,
    /// Committed answers to prompts, by prompt id.
    pub answers: BTreeMap<String, Object<AnswerDocument>>,
    /// Secrets, still encrypted: loading never decrypts anything.
    pub secrets: BTreeMap<String, Object<SecretDocument>>,
}

/// Task names leave room for the prompt ids made from them (`<task>-<run>-<n>`), which
/// must stay DNS labels.
pub const TASK_NAME_MAX: usize = 50;

/// Memory bounds in MiB, and disk bounds in MiB.
pub const MEMORY_MIB: (u64, u64) = (64, 1024 * 1024);
pub const DISK_MIB: (u64, u64) = (1024, 16 * 1024 * 1024);
/// The longest a policy interval, timeout or task may be.
const A_WEEK: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The longest a prompt may wait for its answer.
const A_MONTH: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

enum AnyObject {
    Fleet(Object<FleetDocument>),
    Loadout(Object<LoadoutDocument>),
    Vm(Object<VmDocument>),
    VmPool(Object<VmPoolDocument>),
    Task(Object<TaskDocument>),
    Answer(Object<AnswerDocument>),
    Secret(Object<SecretDocument>),
    Host(Object<HostDocument>),
}

/// Loads and checks a snapshot. With the host configuration, every rule of the host is
/// checked too (providers it defines, image paths, repositories, intervals, quotas are
/// checked after resolving); without it, only what the repository says on its own.
pub fn load(snapshot: &Snapshot, host: Option<&HostSpec>) -> Result<LoadedFleet, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut objects = Vec::new();
    for file in &snapshot.files {
        let Some(rel) = file.path.strip_prefix(&format!("{}/", snapshot.fleet_dir)) else {
            continue;
        };
        if !(rel.ends_with(".yaml") || rel.ends_with(".yml")) {
            continue; // READMEs and the like are not fleet objects.
        }
        let expected = match expected_kinds(rel) {
            Ok(kinds) => kinds,
            Err(message) => {
                diags.push(Diagnostic::new(&file.path, Pos::START, message));
                continue;
            }
        };
        if let Some(obj) = load_file(&file.path, rel, expected, &file.bytes, &mut diags) {
            objects.push(obj);
        }
    }

    let fleet_path = format!("{}/fleet.yaml", snapshot.fleet_dir);
    let mut fleet = None;
    let mut loadouts = BTreeMap::new();
    let mut vms = BTreeMap::new();
    let mut pools = BTreeMap::new();
    let mut tasks = BTreeMap::new();
    let mut answers = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for obj in objects {
        match obj {
            AnyObject::Fleet(o) => fleet = Some(o),
            AnyObject::Loadout(o) => insert_unique(
                &mut loadouts,
                o,
                "Loadout",
                |d| &d.metadata.name.0,
                &mut diags,
            ),
            AnyObject::Vm(o) => {
                insert_unique(&mut vms, o, "VM", |d| &d.metadata.name.0, &mut diags)
            }
            AnyObject::VmPool(o) => {
                insert_unique(&mut pools, o, "VMPool", |d| &d.metadata.name.0, &mut diags)
            }
            AnyObject::Task(o) => {
                insert_unique(&mut tasks, o, "Task", |d| &d.metadata.name.0, &mut diags)
            }
            AnyObject::Answer(o) => insert_unique(
                &mut answers,
                o,
                "Answer",
                |d| &d.metadata.name.0,
                &mut diags,
            ),
            AnyObject::Secret(o) => insert_unique(
                &mut secrets,
                o,
                "Secret",
                |d| &d.metadata.name.0,
                &mut diags,
            ),
            // Never expected under the fleet directory: load_file refused it already.
            AnyObject::Host(_) => {}
        }
    }
    let Some(fleet) = fleet else {
        let present = snapshot.files.iter().any(|f| f.path == fleet_path);
        if !present {
            diags.push(Diagnostic::new(
                &fleet_path,
                Pos::START,
                format!(
                    "missing {fleet_path}: every revision needs one object of kind Fleet there (providers, images, policy)"
                ),
            ));
        }
        return Err(sorted(diags));
    };

    let loaded = LoadedFleet {
        revision: snapshot.revision.clone(),
        fleet,
        loadouts,
        vms,
        pools,
        tasks,
        answers,
        secrets,
    };
    check_references(&loaded, &mut diags);
    if let Some(host) = host {
        host_rules::check(&loaded, host, &mut diags);
    }
    if diags.is_empty() {
        Ok(loaded)
    } else {
        Err(sorted(diags))
    }
}

/// Parses and checks the host configuration (`kind: Host`), with diagnostics naming `path`.
pub fn load_host(path: &str, bytes: &[u8]) -> Result<HostSpec, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let object = load_file(path, path, &[Kind::Host], bytes, &mut diags);
    match object {
        Some(AnyObject::Host(o)) if diags.is_empty() => Ok(o.doc.spec),
        _ => Err(sorted(diags)),
    }
}

fn sorted(mut diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diags.sort();
    diags.dedup();
    diags
}

fn insert_unique<T>(
    map: &mut BTreeMap<String, Object<T>>,
    obj: Object<T>,
    kind: &str,
    name_of: impl Fn(&T) -> &String,
    diags: &mut Vec<Diagnostic>,
) {
    let name = name_of(&obj.doc).clone();
    if let Some(first) = map.get(&name) {
        let first_pos = first.tree.pos_at_pointer("/metadata/name", false);
        diags.push(Diagnostic::new(
            &obj.path,
            obj.tree.pos_at_pointer("/metadata/name", false),
            format!(
                "metadata.name: {kind} {name:?} is already defined at {}:{}:{}; names must be unique, rename one of them",
                first.path, first_pos.line, first_pos.column
            ),
        ));
    } else {
        map.insert(name, obj);
    }
}

/// Which kinds may live where under `fleet/`.
fn expected_kinds(rel: &str) -> Result<&'static [Kind], String> {
    if rel == "fleet.yaml" {
        return Ok(&[Kind::Fleet]);
    }
    match rel.split('/').next() {
        Some("loadouts") if rel.contains('/') => Ok(&[Kind::Loadout]),
        Some("vms") if rel.contains('/') => Ok(&[Kind::Vm, Kind::VmPool]),
        Some("tasks") if rel.contains('/') => Ok(&[Kind::Task]),
        Some("hitl") if rel.contains('/') => Ok(&[Kind::Answer]),
        Some("secrets") if rel.contains('/') => Ok(&[Kind::Secret]),
        _ => Err(
            "unexpected file: fleet objects live in fleet.yaml, loadouts/, vms/, tasks/, secrets/ and hitl/; move or remove it"
                .to_owned(),
        ),
    }
}

fn load_file(
    path: &str,
    rel: &str,
    expected: &[Kind],
    bytes: &[u8],
    diags: &mut Vec<Diagnostic>,
) -> Option<AnyObject> {
    if bytes.len() > yaml::MAX_FILE_BYTES {
        diags.push(Diagnostic::new(
            path,
            Pos::START,
            format!(
                "file is larger than {} KiB; fleet objects are small, split it or remove what does not belong",
                yaml::MAX_FILE_BYTES / 1024
            ),
        ));
        return None;
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count() as u64
                + 1;
            diags.push(Diagnostic::new(
                path,
                Pos { line, column },
                "file is not valid UTF-8; save it as UTF-8 text",
            ));
            return None;
        }
    };
    let tree = match yaml::parse(text) {
        Ok(t) => t,
        Err(e) => {
            diags.push(Diagnostic::new(path, e.pos, e.message));
            return None;
        }
    };
    if !matches!(tree.node, yaml::Node::Map(_)) {
        diags.push(Diagnostic::new(
            path,
            tree.pos,
            "the document must be a mapping with apiVersion, kind, metadata and spec",
        ));
        return None;
    }
    let kind_names = expected
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let kind = match tree.get("kind") {
        None => {
            diags.push(Diagnostic::new(
                path,
                tree.pos,
                format!("missing required field `kind`; a file here holds kind {kind_names}"),
            ));
            return None;
        }
        Some(k) => match k.as_str().and_then(Kind::parse) {
            Some(kind) if expected.contains(&kind) => kind,
            Some(kind) => {
                diags.push(Diagnostic::new(
                    path,
                    k.pos,
                    format!(
                        "kind: {} does not belong in {rel}; a file here holds kind {kind_names}",
                        kind.as_str()
                    ),
                ));
                return None;
            }
            None => {
                diags.push(Diagnostic::new(
                    path,
                    k.pos,
                    format!(
                        "kind: {} is not a fleet kind; valid here: {kind_names}",
                        k.to_json()
                    ),
                ));
                return None;
            }
        },
    };
    let value = tree.to_json();
    let violations = schema::validate(kind, &value);
    if !violations.is_empty() {
        for v in violations {
            diags.push(Diagnostic::new(
                path,
                tree.pos_at_pointer(&v.pointer, v.at_key),
                v.message,
            ));
        }
        return None;
    }
    let object = match kind {
        Kind::Fleet => typed(path, tree, value, diags).map(AnyObject::Fleet),
        Kind::Loadout => typed(path, tree, value, diags).map(AnyObject::Loadout),
        Kind::Vm => typed(path, tree, value, diags).map(AnyObject::Vm),
        Kind::VmPool => typed(path, tree, value, diags).map(AnyObject::VmPool),
        Kind::Task => typed(path, tree, value, diags).map(AnyObject::Task),
        Kind::Answer => typed(path, tree, value, diags).map(AnyObject::Answer),
        Kind::Secret => typed(path, tree, value, diags).map(AnyObject::Secret),
        Kind::Host => typed(path, tree, value, diags).map(AnyObject::Host),
    }?;
    check_object(&object, diags);
    Some(object)
}

fn typed<T: DeserializeOwned>(
    path: &str,
    tree: Located,
    value: serde_json::Value,
    diags: &mut Vec<Diagnostic>,
) -> Option<Object<T>> {
    match serde_json::from_value::<T>(value) {
        Ok(doc) => Some(Object {
            path: path.to_owned(),
            tree,
            doc,
        }),
        Err(e) => {
            // The schema is generated from these types, so this means they drifted apart.
            diags.push(Diagnostic::new(
                path,
                tree.pos,
                format!("internal error: the schema accepted this file but fleet could not read it ({e}); please report it"),
            ));
            None
        }
    }
}

/// Why `path` is not a plain relative path (absolute, empty, `.` or `..` parts, a
/// backslash), if it is not one. Such a path is checked again against the real directory
/// where it is used: this is the lexical half.
pub fn relative_path_problem(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        Some("an absolute path")
    } else if path.contains('\\') || path.contains('\0') {
        Some("a backslash or NUL in a path")
    } else if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        Some("empty, `.` or `..` parts in a path")
    } else {
        None
    }
}

/// Checks that need only the object itself.
fn check_object(object: &AnyObject, diags: &mut Vec<Diagnostic>) {
    match object {
        AnyObject::Fleet(o) => {
            let spec = &o.doc.spec;
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
                    diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&at, false), format!(
                        "spec.images[{i}]: image {:?} has neither kernel nor disk nor template; set kernel (and initrd) for direct kernel boot, disk for a qcow2 base image, or template for Proxmox",
                        img.name.0
                    )));
                }
                for (field, value) in [
                    ("kernel", &img.kernel),
                    ("initrd", &img.initrd),
                    ("disk", &img.disk),
                ] {
                    if let Some(problem) = value.as_deref().and_then(relative_path_problem) {
                        diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&format!("{at}/{field}"), false), format!(
                            "spec.images[{i}].{field}: {problem}; image files are named relative to the host's image root (imageRoot in the host configuration)"
                        )));
                    }
                }
                for (field, value) in [("initrd", &img.initrd), ("cmdline", &img.cmdline)] {
                    if value.is_some() && img.kernel.is_none() {
                        diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&format!("{at}/{field}"), true), format!(
                            "spec.images[{i}].{field}: only used with direct kernel boot; set kernel as well or remove {field}"
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
                    diags.push(Diagnostic::new(
                        &o.path,
                        o.tree
                            .pos_at_pointer(&format!("/spec/policy/{field}"), false),
                        format!(
                            "spec.policy.{field}: {:?} is out of range; use a duration up to 168h",
                            d.as_str()
                        ),
                    ));
                }
            }
        }
        AnyObject::Loadout(o) => {
            check_resources(o, "/spec/resources", o.doc.spec.resources.as_ref(), diags);
            check_network(
                o,
                "/spec/network",
                o.doc.spec.network.as_ref().map(|n| n.mode),
                diags,
            );
            check_secret_targets(o, "/spec/secrets", &o.doc.spec.secrets, diags);
        }
        AnyObject::Secret(_) => {}
        AnyObject::Host(o) => host_rules::check_host_object(o, diags),
        AnyObject::Vm(o) => check_vm_spec(o, "/spec", &o.doc.spec, diags),
        AnyObject::Task(o) => check_task(o, diags),
        AnyObject::Answer(o) => {
            let spec = &o.doc.spec;
            match (&spec.response, &spec.approve) {
                // Control characters depend on the prompt's task: see `check_answer_text`.
                (Some(response), None) => {
                    if let Some(bad) = crate::answer::answer_problem(response, true) {
                        diags.push(Diagnostic::new(
                            &o.path,
                            o.tree.pos_at_pointer("/spec/response", false),
                            format!("spec.response: {bad}"),
                        ));
                    }
                }
                (None, Some(_)) => {}
                (Some(_), Some(_)) => diags.push(Diagnostic::new(
                    &o.path,
                    o.tree.pos_at_pointer("/spec/approve", true),
                    "spec.approve: an Answer either answers a prompt (`response`) or approves held steps (`approve`), not both; remove one".to_owned(),
                )),
                (None, None) => diags.push(Diagnostic::new(
                    &o.path,
                    o.tree.pos_at_pointer("/spec", false),
                    "spec: say what the answer is: `response: TEXT` for a prompt, or `approve: DIGEST` for an approval".to_owned(),
                )),
            }
        }
        AnyObject::VmPool(o) => {
            check_vm_spec(o, "/spec/template/spec", &o.doc.spec.template.spec, diags);
            let width = pool_width(o.doc.spec.replicas);
            let longest = o.doc.metadata.name.0.len() + 1 + width;
            if longest > 63 {
                diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer("/metadata/name", false), format!(
                    "metadata.name: VM names made from this pool ({}-{}) would be {longest} characters; names are at most 63, shorten the pool name",
                    o.doc.metadata.name.0, "0".repeat(width)
                )));
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
                diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&format!("{pointer}/file"), true), format!(
                    "{}.file: a secret reference sets either `env` or `file`, not both; remove one",
                    diagnostic::field_path(&pointer)
                )));
                continue;
            }
            (None, None) => {
                diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&pointer, false), format!(
                    "{}: say where the value goes: `env: VAR` (an environment variable) or `file: PATH` (under /run/fleet/secrets)",
                    diagnostic::field_path(&pointer)
                )));
                continue;
            }
            (Some(env), None) => format!("env {env}"),
            // The schema's pattern keeps paths plain and relative (no `.` or `..`).
            (None, Some(file)) => format!("file {file}"),
        };
        if let Some(first) = seen.insert(target.clone(), i) {
            diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer(&pointer, false), format!(
                "{}: {target} is already set by {}[{first}]; each variable or file takes one secret",
                diagnostic::field_path(&pointer),
                diagnostic::field_path(at)
            )));
        }
    }
}

fn check_task(o: &Object<TaskDocument>, diags: &mut Vec<Diagnostic>) {
    let spec = &o.doc.spec;
    check_secret_targets(o, "/spec/secrets", &spec.secrets, diags);
    let mut say = |pointer: &str, at_key: bool, message: String| {
        diags.push(Diagnostic::new(
            &o.path,
            o.tree.pos_at_pointer(pointer, at_key),
            message,
        ))
    };
    let name = &o.doc.metadata.name.0;
    if name.len() > TASK_NAME_MAX {
        say(
            "/metadata/name",
            false,
            format!(
                "metadata.name: task names are at most {TASK_NAME_MAX} characters (this one has {}), so the prompt ids made from them stay valid names; shorten it",
                name.len()
            ),
        );
    }
    match (&spec.command, &spec.agent) {
        (Some(_), Some(_)) => say(
            "/spec/agent",
            true,
            "spec.agent: a task runs either `command` or `agent`, not both; remove one".into(),
        ),
        (None, None) => say(
            "/spec",
            false,
            "spec: a task needs `command` (a program and its arguments) or `agent` (kind and prompt); add one".into(),
        ),
        _ => {}
    }
    if let Some(t) = &spec.timeout
        && t.to_std() > A_WEEK
    {
        say(
            "/spec/timeout",
            false,
            format!(
                "spec.timeout: {:?} is out of range; use a duration up to 168h",
                t.as_str()
            ),
        );
    }
    for (i, glob) in spec.artifacts.iter().enumerate() {
        if glob.is_empty() || glob.starts_with('/') || glob.split('/').any(|c| c == "..") {
            say(
                &format!("/spec/artifacts/{i}"),
                false,
                format!(
                    "spec.artifacts[{i}]: {glob:?} must be a relative glob inside the task's directory (no leading / and no ..)"
                ),
            );
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
                say(
                    &format!("/spec/prompts/patterns/{i}"),
                    false,
                    format!("spec.prompts.patterns[{i}]: not a valid regular expression ({first})"),
                );
            }
        }
        if let Some(d) = &prompts.deadline
            && d.to_std() > A_MONTH
        {
            say(
                "/spec/prompts/deadline",
                false,
                format!(
                    "spec.prompts.deadline: {:?} is out of range; use a duration up to 720h",
                    d.as_str()
                ),
            );
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
    check_network(
        o,
        &format!("{at}/network"),
        spec.network.as_ref().map(|n| n.mode),
        diags,
    );
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
            diags.push(Diagnostic::new(
                &o.path,
                o.tree.pos_at_pointer(&pointer, false),
                format!(
                    "{}: {:?} is out of bounds; {field} must be {what}",
                    diagnostic::field_path(&pointer),
                    size.as_str()
                ),
            ));
        }
    }
}

fn check_network<T>(
    o: &Object<T>,
    at: &str,
    mode: Option<NetworkMode>,
    diags: &mut Vec<Diagnostic>,
) {
    if mode == Some(NetworkMode::Allowlist) {
        let pointer = format!("{at}/mode");
        diags.push(Diagnostic::new(
            &o.path,
            o.tree.pos_at_pointer(&pointer, false),
            format!(
                "{}: allowlist is not supported by the libvirt provider yet; use isolated or full",
                diagnostic::field_path(&pointer)
            ),
        ));
    }
}

fn unique_in_list<T>(
    o: &Object<T>,
    seen: &mut BTreeMap<String, Pos>,
    name: &str,
    pointer: &str,
    what: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let pos = o.tree.pos_at_pointer(pointer, false);
    if let Some(first) = seen.get(name) {
        diags.push(Diagnostic::new(
            &o.path,
            pos,
            format!(
                "{}: {what} {name:?} is already defined at line {}; {what} names must be unique",
                diagnostic::field_path(pointer),
                first.line
            ),
        ));
    } else {
        seen.insert(name.to_owned(), pos);
    }
}

/// Digits in a pool member's suffix: the width of the replica count, at least 2.
pub fn pool_width(replicas: u32) -> usize {
    replicas.to_string().len().max(2)
}

/// The names of a pool's VMs.
pub fn pool_member_names(pool: &str, replicas: u32) -> impl Iterator<Item = String> + '_ {
    let width = pool_width(replicas);
    (1..=replicas).map(move |i| format!("{pool}-{i:0width$}"))
}

/// Checks across objects: references resolve, no `extends` cycles, no name clashes
/// between VMs and pool members.
fn check_references(f: &LoadedFleet, diags: &mut Vec<Diagnostic>) {
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
            diags.push(Diagnostic::new(
                o_path,
                tree.pos_at_pointer(pointer, false),
                format!(
                    "{}: no {kind} named {value:?}; {list}",
                    diagnostic::field_path(pointer)
                ),
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
                diags.push(Diagnostic::new(&o.path, o.tree.pos_at_pointer("/spec/replicas", false), format!(
                    "spec.replicas: pool member {member:?} clashes with the {what} defined at {other_path}:{}:{}; rename the pool or that object",
                    other.line, other.column
                )));
            } else {
                owners.insert(member, (o.path.as_str(), &o.tree, "VMPool member"));
            }
        }
    }

    check_secret_references(f, diags);
    check_answer_text(f, diags);

    for o in f.tasks.values() {
        let vm = &o.doc.spec.vm.0;
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
            diags.push(Diagnostic::new(
                &o.path,
                o.tree.pos_at_pointer("/spec/vm", false),
                format!("spec.vm: no VM named {vm:?}; {list}"),
            ));
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
            diags.push(Diagnostic::new(
                &o.path,
                o.tree.pos_at_pointer("/spec/response", false),
                format!("spec.response: {bad}"),
            ));
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
            diags.push(Diagnostic::new(
                path,
                tree.pos_at_pointer(&format!("{at}/image"), false),
                format!(
                    "{}: image {:?} has no template, and VMs on Proxmox provider {:?} are cloned from one; set template on the image in fleet.yaml",
                    diagnostic::field_path(&format!("{at}/image")),
                    image.name.0,
                    provider.name.0
                ),
            ));
        }
        if !proxmox && image.kernel.is_none() && image.disk.is_none() {
            diags.push(Diagnostic::new(
                path,
                tree.pos_at_pointer(&format!("{at}/image"), false),
                format!(
                    "{}: image {:?} has only a Proxmox template, and provider {:?} is libvirt; set kernel or disk on the image",
                    diagnostic::field_path(&format!("{at}/image")),
                    image.name.0,
                    provider.name.0
                ),
            ));
        }
    }
    if !proxmox && spec.node.is_some() {
        diags.push(Diagnostic::new(
            path,
            tree.pos_at_pointer(&format!("{at}/node"), true),
            format!(
                "{}: only Proxmox providers have nodes, and {:?} is libvirt; remove node",
                diagnostic::field_path(&format!("{at}/node")),
                provider.name.0
            ),
        ));
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
                    vm: &o.doc.spec.vm.0,
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
                diags.push(Diagnostic::new(
                    path,
                    tree.pos_at_pointer(&format!("/spec/secrets/{i}/secret"), false),
                    format!(
                        "spec.secrets[{i}].secret: no Secret named {:?}; {list}",
                        r.secret.0
                    ),
                ));
                continue;
            };
            if let Some(refusal) = user.refused_by(f, &secret.doc.spec) {
                diags.push(Diagnostic::new(
                    path,
                    tree.pos_at_pointer(&format!("/spec/secrets/{i}/secret"), false),
                    format!(
                        "spec.secrets[{i}].secret: Secret {:?} ({}) {refusal}",
                        r.secret.0, secret.path
                    ),
                ));
            }
            if !secret.doc.spec.data.contains_key(&r.key) {
                let keys: Vec<&str> = secret.doc.spec.data.keys().map(|k| k.0.as_str()).collect();
                diags.push(Diagnostic::new(
                    path,
                    tree.pos_at_pointer(&format!("/spec/secrets/{i}/key"), false),
                    format!(
                        "spec.secrets[{i}].key: Secret {:?} ({}) has no key {:?}; its keys: {}",
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
