//! Snapshot → typed fleet objects, or every diagnostic at once.
//!
//! Per file: size cap, UTF-8, YAML (positions kept), JSON Schema, typed deserialisation.
//! Across files: placement of kinds, unique names, references, `extends` cycles, bounds.
//! A revision with any diagnostic loads as nothing: it is never applied, not even in part.
//!
//! Architecture invariant: pure. No I/O, no clock; the snapshot is the whole input.

pub mod diagnostic;
mod file;
mod host_rules;
mod objects;
pub(crate) mod refs;
pub mod schema;
pub mod yaml;

pub use file::relative_path_problem;
use file::{expected_kinds, load_file};
pub use host_rules::{Endpoint, url_has_password};
use objects::unique_in_list;
use refs::check_references;

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

pub use diagnostic::Diagnostic;
use yaml::{Located, Pos};

use crate::ids::PromptId;
use crate::snapshot::{Revision, Snapshot};
use crate::spec::{
    AnswerDocument, FleetDocument, HostDocument, HostSpec, Kind, LoadoutDocument, NetworkMode,
    ProviderKind, Resources, SecretDocument, SecretRef, TaskDocument, VmDocument, VmPoolDocument,
    VmSpec, WorkspaceDocument, pool_member_names, pool_width,
};

/// One object and the file it came from.
#[derive(Clone, Debug)]
pub struct Object<T> {
    pub path: String,
    pub tree: Located,
    pub doc: T,
}

impl<T> Object<T> {
    /// A problem with the value at `pointer` (a JSON pointer such as `/spec/vm`); the message
    /// is prefixed with the field's path (`spec.vm: …`), so every message names its field
    /// the same way.
    fn field_error(&self, pointer: &str, message: impl std::fmt::Display) -> Diagnostic {
        field_error_in(&self.path, &self.tree, pointer, At::Value, message)
    }

    /// The same, located at the field's key rather than its value (for a field that should
    /// not be there at all).
    fn key_error(&self, pointer: &str, message: impl std::fmt::Display) -> Diagnostic {
        field_error_in(&self.path, &self.tree, pointer, At::Key, message)
    }
}

/// Where in a field a diagnostic points: at its value, or at its key (a field that should
/// not be there at all).
#[derive(Clone, Copy)]
enum At {
    Value,
    Key,
}

/// `Object::field_error` for code that holds a file's path and tree but not its object.
fn field_error_in(
    path: &str,
    tree: &Located,
    pointer: &str,
    at: At,
    message: impl std::fmt::Display,
) -> Diagnostic {
    Diagnostic::new(
        path,
        tree.pos_at_pointer(pointer, matches!(at, At::Key)),
        format!("{}: {message}", diagnostic::field_path(pointer)),
    )
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
    pub workspaces: BTreeMap<String, Object<WorkspaceDocument>>,
    /// Who signed the commit that last changed each Answer (`Snapshot::signers`).
    pub signers: BTreeMap<String, String>,
}

/// A workspace a VM mounts, and the file that says so.
pub struct VmMount<'a> {
    pub mount: &'a crate::spec::WorkspaceMount,
    /// `None`: the VM's (or pool template's) own; `Some(name)`: loadout `name`'s.
    pub loadout: Option<&'a str>,
    /// Its index in that file's `workspaces` list.
    pub index: usize,
}

/// The workspaces a VM with `spec` mounts: its loadout chain's (`extends` depth-first, left
/// to right, then the loadout itself), then its own; keyed by workspace name, the later
/// mount of a name replacing the earlier in place, as loadouts merge.
pub fn vm_mounts<'a>(f: &'a LoadedFleet, spec: &'a crate::spec::VmSpec) -> Vec<VmMount<'a>> {
    fn chain<'a>(f: &'a LoadedFleet, name: &'a str, depth: usize, out: &mut Vec<&'a str>) {
        let Some(o) = f.loadouts.get(name) else {
            return;
        };
        // Cycles were refused; the guard keeps a bug from recursing for ever.
        if depth < 64 {
            for parent in &o.doc.spec.extends {
                chain(f, &parent.0, depth + 1, out);
            }
        }
        out.push(name);
    }
    let mut names = Vec::new();
    if let Some(loadout) = &spec.loadout {
        chain(f, &loadout.0, 0, &mut names);
    }
    let from_loadouts = names.into_iter().flat_map(|name| {
        let mounts = &f.loadouts[name].doc.spec.workspaces;
        mounts
            .iter()
            .enumerate()
            .map(move |(index, mount)| VmMount {
                mount,
                loadout: Some(name),
                index,
            })
    });
    let own = spec
        .workspaces
        .iter()
        .enumerate()
        .map(|(index, mount)| VmMount {
            mount,
            loadout: None,
            index,
        });
    let mut mounts: Vec<VmMount<'a>> = Vec::new();
    for m in from_loadouts.chain(own) {
        match mounts.iter_mut().find(|k| k.mount.name == m.mount.name) {
            // The VM's own list may name one twice: that is an error of its own, kept.
            Some(k) if !(k.loadout.is_none() && m.loadout.is_none()) => *k = m,
            _ => mounts.push(m),
        }
    }
    mounts
}

/// Task names leave room for the prompt ids made from them (`<task>-<run>-<n>`), which
/// must stay DNS labels.
pub const TASK_NAME_MAX: usize = 50;

/// A workspace's size bounds in MiB.
pub const WORKSPACE_MIB: (u64, u64) = (16, 16 * 1024 * 1024);
/// The most workspaces one VM mounts.
pub const WORKSPACES_PER_VM: usize = 8;

/// Memory bounds in MiB, and disk bounds in MiB.
pub const MEMORY_MIB: (u64, u64) = (64, 1024 * 1024);
pub const DISK_MIB: (u64, u64) = (1024, 16 * 1024 * 1024);
/// The longest a policy interval, timeout or task may be.
const A_WEEK: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The longest a prompt may wait for its answer.
const A_MONTH: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// The longest a lease (or a renewal from the host) may last.
pub const A_YEAR: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

enum AnyObject {
    Fleet(Object<FleetDocument>),
    Loadout(Object<LoadoutDocument>),
    Vm(Object<VmDocument>),
    VmPool(Object<VmPoolDocument>),
    /// Boxed: a task is the largest document by far.
    Task(Box<Object<TaskDocument>>),
    Answer(Object<AnswerDocument>),
    Secret(Object<SecretDocument>),
    Workspace(Object<WorkspaceDocument>),
    /// Boxed: the host configuration is large too.
    Host(Box<Object<HostDocument>>),
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
        let Some(expected) = expected_kinds(rel) else {
            diags.push(Diagnostic::new(&file.path, Pos::START, file::MISPLACED));
            continue;
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
    let mut workspaces = BTreeMap::new();
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
                insert_unique(&mut tasks, *o, "Task", |d| &d.metadata.name.0, &mut diags)
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
            AnyObject::Workspace(o) => insert_unique(
                &mut workspaces,
                o,
                "Workspace",
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
        workspaces,
        signers: snapshot.signers.clone(),
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
        Some(AnyObject::Host(o)) if diags.is_empty() => Ok(o.doc.spec.clone()),
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
        diags.push(obj.field_error("/metadata/name", format!("{kind} {name:?} is already defined at {}:{}:{}; names must be unique, rename one of them",
                first.path, first_pos.line, first_pos.column)));
    } else {
        map.insert(name, obj);
    }
}
