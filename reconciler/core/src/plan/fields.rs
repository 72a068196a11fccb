//! The fields of a VM's configuration, each with what changing it takes. A plan compares
//! configurations field by field (`diff`), and the strongest effect among the changed fields
//! decides the step: replace, update with a restart, or update in place.
//!
//! Invariant: every field of `VmConfig` (and of its image) is a `VmField` with a declared
//! effect. `every_field_is_named` destructures both structs without `..`, so a new field does
//! not compile until it is named here, and `effect` is an exhaustive match.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resolve::{ResolvedImage, VmConfig};

/// How a changed field can be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldEffect {
    /// Rewrites the stamp and definition only.
    InPlace,
    /// Takes effect when the VM boots again.
    NeedsRestart,
    /// Cannot change on an existing VM; the reason, in words.
    Replace(&'static str),
}

/// One field of `VmConfig`, by the name plans and stamps use for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VmField {
    #[serde(rename = "provider")]
    Provider,
    #[serde(rename = "domainType")]
    DomainType,
    #[serde(rename = "image.name")]
    ImageName,
    #[serde(rename = "image.kernel")]
    ImageKernel,
    #[serde(rename = "image.initrd")]
    ImageInitrd,
    #[serde(rename = "image.cmdline")]
    ImageCmdline,
    #[serde(rename = "image.disk")]
    ImageDisk,
    #[serde(rename = "image.diskSha256")]
    ImageDiskContent,
    #[serde(rename = "image.bootSha256")]
    ImageBootContent,
    #[serde(rename = "image.template")]
    ImageTemplate,
    #[serde(rename = "loadout")]
    Loadout,
    #[serde(rename = "pool")]
    Pool,
    #[serde(rename = "node")]
    Node,
    #[serde(rename = "cpus")]
    Cpus,
    #[serde(rename = "memoryMiB")]
    MemoryMib,
    #[serde(rename = "diskMiB")]
    DiskMib,
    #[serde(rename = "network")]
    Network,
    #[serde(rename = "packages")]
    Packages,
    #[serde(rename = "files")]
    Files,
    #[serde(rename = "runcmd")]
    Runcmd,
    #[serde(rename = "users")]
    Users,
    #[serde(rename = "env")]
    Env,
    #[serde(rename = "labels")]
    Labels,
    #[serde(rename = "protect")]
    Protect,
    #[serde(rename = "fresh")]
    Fresh,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "workspaces")]
    Workspaces,
    #[serde(rename = "snapshots")]
    Snapshots,
}

impl VmField {
    /// Every field, in the order plans list changes.
    pub const ALL: [VmField; 28] = [
        VmField::Provider,
        VmField::DomainType,
        VmField::ImageName,
        VmField::ImageKernel,
        VmField::ImageInitrd,
        VmField::ImageCmdline,
        VmField::ImageDisk,
        VmField::ImageDiskContent,
        VmField::ImageBootContent,
        VmField::ImageTemplate,
        VmField::Loadout,
        VmField::Pool,
        VmField::Node,
        VmField::Cpus,
        VmField::MemoryMib,
        VmField::DiskMib,
        VmField::Network,
        VmField::Packages,
        VmField::Files,
        VmField::Runcmd,
        VmField::Users,
        VmField::Env,
        VmField::Labels,
        VmField::Protect,
        VmField::Fresh,
        VmField::Reset,
        VmField::Workspaces,
        VmField::Snapshots,
    ];

    /// What changing the field on an existing VM takes.
    pub fn effect(self) -> FieldEffect {
        use FieldEffect::{InPlace, NeedsRestart, Replace};
        match self {
            VmField::Provider => Replace("a VM cannot move between providers in place"),
            VmField::ImageDisk => Replace("a new base disk needs a new overlay"),
            VmField::ImageDiskContent => Replace(
                "image content changed: the base disk was rebuilt in place, and an overlay reads only on the disk it was made on",
            ),
            VmField::ImageTemplate => Replace("a VM is cloned from its template when made"),
            VmField::Node => Replace("a VM moves to another node by being made there again"),
            VmField::Fresh => Replace("a fresh member is made for a task run, never converted"),
            VmField::Reset => Replace("the state a reset returns to is taken when the VM is made"),
            VmField::DiskMib => Replace("the disk overlay is sized when the VM is created"),
            VmField::Packages | VmField::Files | VmField::Runcmd | VmField::Users => {
                Replace("cloud-init applies it only at first boot")
            }
            VmField::Cpus
            | VmField::MemoryMib
            | VmField::DomainType
            | VmField::Network
            | VmField::ImageKernel
            | VmField::ImageInitrd
            | VmField::ImageBootContent
            | VmField::ImageCmdline => NeedsRestart,
            // Attached, detached or grown while the VM is down; mounted at its next boot.
            VmField::Workspaces => NeedsRestart,
            VmField::ImageName
            | VmField::Loadout
            | VmField::Pool
            | VmField::Env
            | VmField::Labels
            | VmField::Protect
            | VmField::Snapshots => InPlace,
        }
    }

    /// A digest of what an image's files hold (filled in on the host, not written in git).
    pub fn is_image_content(self) -> bool {
        matches!(self, VmField::ImageDiskContent | VmField::ImageBootContent)
    }

    /// The field's name in plans (`memoryMiB`, `image.disk`).
    pub fn name(self) -> &'static str {
        match self {
            VmField::Provider => "provider",
            VmField::DomainType => "domainType",
            VmField::ImageName => "image.name",
            VmField::ImageKernel => "image.kernel",
            VmField::ImageInitrd => "image.initrd",
            VmField::ImageCmdline => "image.cmdline",
            VmField::ImageDisk => "image.disk",
            VmField::ImageDiskContent => "image.diskSha256",
            VmField::ImageBootContent => "image.bootSha256",
            VmField::ImageTemplate => "image.template",
            VmField::Loadout => "loadout",
            VmField::Pool => "pool",
            VmField::Node => "node",
            VmField::Cpus => "cpus",
            VmField::MemoryMib => "memoryMiB",
            VmField::DiskMib => "diskMiB",
            VmField::Network => "network",
            VmField::Packages => "packages",
            VmField::Files => "files",
            VmField::Runcmd => "runcmd",
            VmField::Users => "users",
            VmField::Env => "env",
            VmField::Labels => "labels",
            VmField::Protect => "protect",
            VmField::Fresh => "fresh",
            VmField::Reset => "reset",
            VmField::Workspaces => "workspaces",
            VmField::Snapshots => "snapshots",
        }
    }

    /// The field's value in `config`, as it appears in plans (`null` when unset).
    fn value(self, config: &VmConfig) -> Value {
        fn json<T: Serialize>(v: &T) -> Value {
            serde_json::to_value(v).expect("VM config fields are plain data and serialise")
        }
        let c = config;
        let i = &config.image;
        let value = match self {
            VmField::Provider => json(&c.provider),
            VmField::DomainType => json(&c.domain_type),
            VmField::ImageName => json(&i.name),
            VmField::ImageKernel => json(&i.kernel),
            VmField::ImageInitrd => json(&i.initrd),
            VmField::ImageCmdline => json(&i.cmdline),
            VmField::ImageDisk => json(&i.disk),
            VmField::ImageDiskContent => json(&i.disk_sha256),
            VmField::ImageBootContent => json(&i.boot_sha256),
            VmField::ImageTemplate => json(&i.template),
            VmField::Loadout => json(&c.loadout),
            VmField::Pool => json(&c.pool),
            VmField::Node => json(&c.node),
            VmField::Cpus => json(&c.cpus),
            VmField::MemoryMib => json(&c.memory_mib),
            VmField::DiskMib => json(&c.disk_mib),
            VmField::Network => json(&c.network),
            VmField::Packages => json(&c.packages),
            VmField::Files => json(&c.files),
            VmField::Runcmd => json(&c.runcmd),
            VmField::Users => json(&c.users),
            VmField::Env => json(&c.env),
            VmField::Labels => json(&c.labels),
            VmField::Protect => json(&c.protect),
            VmField::Fresh => json(&c.fresh),
            VmField::Reset => json(&c.reset),
            VmField::Workspaces => json(&c.workspaces),
            VmField::Snapshots => json(&c.snapshots),
        };
        // An empty list or map is as unset as `None`: stamps leave all three out.
        match value {
            Value::Array(a) if a.is_empty() => Value::Null,
            Value::Object(o) if o.is_empty() => Value::Null,
            v => v,
        }
    }
}

impl std::fmt::Display for VmField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One field that differs between the applied and the desired configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: VmField,
    pub from: Value,
    pub to: Value,
}

impl FieldChange {
    /// What this change takes: its field's effect, but an image's content digest recorded
    /// for the first time (a stamp written before fleet recorded them, or a file it could
    /// not read then) only rewrites the stamp: nothing is known to have changed. (A digest
    /// fleet cannot read now is taken from the stamp before comparing: see
    /// `plan::with_known_digests`.)
    pub fn effect(&self) -> FieldEffect {
        match self.field {
            field if field.is_image_content() && (self.from.is_null() || self.to.is_null()) => {
                FieldEffect::InPlace
            }
            field => field.effect(),
        }
    }
}

/// The fields that differ, in `VmField::ALL`'s order.
pub fn diff(applied: &VmConfig, desired: &VmConfig) -> Vec<FieldChange> {
    VmField::ALL
        .into_iter()
        .filter_map(|field| {
            let (from, to) = (field.value(applied), field.value(desired));
            (from != to).then_some(FieldChange { field, from, to })
        })
        .collect()
}

/// Names every field of `VmConfig` and `ResolvedImage`: adding one breaks this until it is
/// also a `VmField` (and so has an effect).
const _: fn(&VmConfig) = every_field_is_named;
fn every_field_is_named(config: &VmConfig) {
    let VmConfig {
        provider: _,
        domain_type: _,
        image,
        loadout: _,
        pool: _,
        node: _,
        cpus: _,
        memory_mib: _,
        disk_mib: _,
        network: _,
        packages: _,
        files: _,
        runcmd: _,
        users: _,
        env: _,
        labels: _,
        protect: _,
        fresh: _,
        reset: _,
        workspaces: _,
        snapshots: _,
    } = config;
    let ResolvedImage {
        name: _,
        kernel: _,
        initrd: _,
        cmdline: _,
        disk: _,
        template: _,
        disk_sha256: _,
        boot_sha256: _,
    } = image;
}
