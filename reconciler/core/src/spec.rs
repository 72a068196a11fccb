//! The fleet format as operators write it (DESIGN §2): one struct per kind, exactly the
//! fields a file may carry. These types are the source of truth for `schema/*.schema.json`
//! (generated with schemars, kept in sync by a test), and every struct denies unknown fields.
//!
//! Nothing here is resolved: `extends` is not merged, defaults are not filled, pools are not
//! expanded. That is `resolve`'s job.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern every object name must match (DNS label).
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Memory and disk sizes: a positive integer with a binary unit.
pub const SIZE_PATTERN: &str = "^[1-9][0-9]{0,9}(Mi|Gi|Ti)$";
/// Durations: a positive integer with a unit.
pub const DURATION_PATTERN: &str = "^[1-9][0-9]{0,8}(ms|s|m|h)$";

/// The object kinds fleet reads, with the schema file each is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Fleet,
    Loadout,
    Vm,
    VmPool,
    Task,
    Answer,
    Secret,
    Workspace,
    /// The host configuration (`/etc/fleet/host.yaml`): never in a repository.
    Host,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Fleet,
        Kind::Loadout,
        Kind::Vm,
        Kind::VmPool,
        Kind::Task,
        Kind::Answer,
        Kind::Secret,
        Kind::Workspace,
        Kind::Host,
    ];

    /// The spelling used in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fleet => "Fleet",
            Kind::Loadout => "Loadout",
            Kind::Vm => "VM",
            Kind::VmPool => "VMPool",
            Kind::Task => "Task",
            Kind::Answer => "Answer",
            Kind::Secret => "Secret",
            Kind::Workspace => "Workspace",
            Kind::Host => "Host",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// File name of this kind's schema under `schema/`.
    pub fn schema_file(self) -> &'static str {
        match self {
            Kind::Fleet => "fleet.schema.json",
            Kind::Loadout => "loadout.schema.json",
            Kind::Vm => "vm.schema.json",
            Kind::VmPool => "vmpool.schema.json",
            Kind::Task => "task.schema.json",
            Kind::Answer => "answer.schema.json",
            Kind::Secret => "secret.schema.json",
            Kind::Workspace => "workspace.schema.json",
            Kind::Host => "host.schema.json",
        }
    }
}

/// An object name: a DNS label (`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(pub String);

impl JsonSchema for Name {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Name".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A lower-case DNS label: letters, digits and '-', at most 63 characters, starting and ending with a letter or digit.",
            "type": "string",
            "pattern": NAME_PATTERN,
        })
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute path on the host (in the host configuration only: a revision names no host
/// path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostPath(pub String);

impl JsonSchema for HostPath {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HostPath".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "an absolute path on the host, for example /var/lib/fleet/images",
            "type": "string",
            "pattern": "^/",
            "maxLength": 4096,
        })
    }
}

impl std::ops::Deref for HostPath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for HostPath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_ref()
    }
}

impl AsRef<std::path::Path> for HostPath {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

/// A memory or disk size such as `512Mi`, `2Gi` or `1Ti`, parsed when read (the schema's
/// pattern bounds it, so every size it accepts parses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Size {
    text: String,
    mib: u64,
}

impl Size {
    /// The size in MiB.
    pub fn mib(&self) -> u64 {
        self.mib
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Text that is not a size or duration fleet can hold (the schema's patterns keep it from
/// a loaded revision; this is for other callers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

impl std::str::FromStr for Size {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Size, ParseError> {
        let (digits, factor) = [("Mi", 1), ("Gi", 1024), ("Ti", 1024 * 1024)]
            .into_iter()
            .find_map(|(unit, factor)| Some((s.strip_suffix(unit)?, factor)))
            .ok_or_else(|| {
                ParseError(format!(
                    "{s:?} is not a size; use Mi, Gi or Ti (512Mi, 2Gi)"
                ))
            })?;
        let mib = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .ok_or_else(|| ParseError(format!("{s:?} is not a size fleet can hold")))?;
        Ok(Size {
            text: s.to_owned(),
            mib,
        })
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Size {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size with a binary unit: Mi, Gi or Ti (for example 512Mi or 2Gi).",
            "type": "string",
            "pattern": SIZE_PATTERN,
        })
    }
}

/// A duration such as `30s`, `5m` or `2h`.
/// Parsed when read (the schema's pattern bounds it, so every duration it accepts parses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

impl Duration {
    pub fn to_std(&self) -> std::time::Duration {
        self.value
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::str::FromStr for Duration {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Duration, ParseError> {
        let value = humantime::parse_duration(s)
            .map_err(|e| ParseError(format!("{s:?} is not a duration (30s, 5m, 2h): {e}")))?;
        Ok(Duration {
            text: s.to_owned(),
            value,
        })
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: a whole number with a unit ms, s, m or h (for example 30s or 5m).",
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

/// `apiVersion: fleet/v1`, the only version so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "fleet/v1")]
    V1,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: Name,
    /// Free-form labels, shown in status and copied onto the VM's stamp.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

macro_rules! document {
    ($(#[$doc:meta])* $doc_name:ident, $kind_enum:ident, $kind_str:literal, $spec:ty) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        pub enum $kind_enum {
            #[serde(rename = $kind_str)]
            Kind,
        }

        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        pub struct $doc_name {
            pub api_version: ApiVersion,
            pub kind: $kind_enum,
            pub metadata: Metadata,
            pub spec: $spec,
        }
    };
}

document!(
    /// `kind: Fleet` — `fleet/fleet.yaml`: the hosts, the images and the policy.
    FleetDocument, FleetKind, "Fleet", FleetSpec
);
document!(
    /// `kind: Loadout` — a reusable bundle of resources and guest configuration.
    LoadoutDocument, LoadoutKind, "Loadout", LoadoutSpec
);
document!(
    /// `kind: VM` — one virtual machine.
    VmDocument, VmKind, "VM", VmSpec
);
document!(
    /// `kind: VMPool` — `replicas` VMs named `<name>-01`, `<name>-02`, … from one template.
    VmPoolDocument, VmPoolKind, "VMPool", VmPoolSpec
);

document!(
    /// `kind: Task` — work for one VM: a command or a coding agent, run once per spec.
    TaskDocument, TaskKind, "Task", TaskSpec
);
document!(
    /// `kind: Answer` — `fleet/hitl/<id>.yaml`: an operator's answer to the prompt `<id>`.
    AnswerDocument, AnswerKind, "Answer", AnswerSpec
);
document!(
    /// `kind: Secret` — `fleet/secrets/<name>.yaml`: values encrypted with age, keys in the
    /// clear. `fleet secret set` writes these files.
    SecretDocument, SecretKind, "Secret", SecretSpec
);

document!(
    /// `kind: Workspace` — `fleet/workspaces/<name>.yaml`: a persistent volume on a provider
    /// that outlives the VMs it is attached to (`workspaces:` in a VM).
    WorkspaceDocument, WorkspaceKind, "Workspace", WorkspaceSpec
);

/// A named volume: made once, grown in place, kept when its VM is replaced, made again or
/// destroyed; deleting its file is a destroy that always waits for an approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Name of a provider in fleet.yaml (the VM it is attached to runs there too).
    pub provider: Name,
    /// Its size (16Mi to 16Ti). It may grow; shrinking is refused.
    pub size: Size,
    /// The filesystem's label when the guest makes it (default: the workspace's name, cut
    /// to 16 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<FsLabel>,
}

/// An ext filesystem label: letters, digits, `-` and `_`, at most 16.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct FsLabel(#[schemars(regex(pattern = "^[A-Za-z0-9_-]{1,16}$"))] pub String);

/// A workspace attached to a VM, and where the guest mounts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkspaceMount {
    /// Name of a Workspace.
    pub name: Name,
    /// An absolute path in the guest, not `/` and not under the system's own directories
    /// (`/proc`, `/sys`, `/dev`, `/run`, `/boot`, `/etc`, `/bin`, `/sbin`, `/lib`, `/usr`).
    pub mount_path: MountPath,
}

/// Why `path` cannot be a workspace's mount path, if it cannot: it must be absolute and
/// plain (no `.` or `..` part, no empty part), and leave the guest's own directories alone.
pub fn mount_path_problem(path: &str) -> Option<String> {
    const SYSTEM: [&str; 11] = [
        "proc", "sys", "dev", "run", "boot", "etc", "bin", "sbin", "lib", "lib64", "usr",
    ];
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    if !path.starts_with('/') || parts.is_empty() || parts == [""] {
        return Some(format!(
            "{path:?} cannot be a mount path: use an absolute directory other than /, such as /workspace"
        ));
    }
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Some(format!(
            "{path:?} is not a plain path (no empty, . or .. parts); write it as /workspace/repo"
        ));
    }
    if SYSTEM.contains(&parts[0]) {
        return Some(format!(
            "{path:?} is in /{}, which the guest's system owns; mount workspaces elsewhere, such as /workspace",
            parts[0]
        ));
    }
    // Directories any user may write to: a task could put a link where the mount goes.
    let shared = [["tmp", ""], ["var", "tmp"], ["var", "run"], ["var", "lock"]];
    if shared
        .iter()
        .any(|[a, b]| parts[0] == *a && (b.is_empty() || parts.get(1) == Some(b)))
    {
        return Some(format!(
            "{path:?} is in a directory every user of the guest may write to; mount workspaces elsewhere, such as /workspace"
        ));
    }
    None
}

/// An absolute guest path: `/` and letters, digits, `.`, `_`, `-`, at most 255 bytes.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct MountPath(#[schemars(regex(pattern = "^/[A-Za-z0-9._/-]{1,254}$"))] pub String);

/// The values of one secret, each encrypted on its own so keys can change independently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretSpec {
    /// Who may receive its values. A reference from anything not listed is refused when
    /// the revision is loaded; without `allowed` the Secret goes to no guest at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<SecretAllowed>,
    /// Each key (in the clear) and its value, ASCII-armored age ciphertext.
    #[schemars(length(min = 1))]
    pub data: BTreeMap<SecretKey, ArmoredValue>,
}

/// The loadouts, VMs (a pool's name covers its members) and tasks a Secret may go to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretAllowed {
    /// Loadouts that may reference it (its values then reach every VM using them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loadouts: Vec<Name>,
    /// VMs or pools whose tasks may reference it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<Name>,
    /// Tasks that may reference it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Name>,
    /// API hosts (`name`, or `name:port` unless 443) the host's broker may send its values
    /// to, for the loadouts listed (`egress.credentials`). Such a Secret never goes into a
    /// guest: a `secrets:` reference to it is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// A key of a Secret: letters, digits, `_`, `.` and `-`, at most 64 characters.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct SecretKey(#[schemars(regex(pattern = "^[A-Za-z0-9_.-]{1,64}$"))] pub String);

/// An age X25519 recipient, `age1` and 58 Bech32 characters (from `age-keygen -y`).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct AgeRecipient(#[schemars(regex(pattern = "^age1[02-9ac-hj-np-z]{58}$"))] pub String);

/// An ASCII-armored age file (`age --armor`): never a value in the clear.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct ArmoredValue(
    #[schemars(
        regex(
            pattern = "^-----BEGIN AGE ENCRYPTED FILE-----\\r?\\n[A-Za-z0-9+/=\\r\\n]+-----END AGE ENCRYPTED FILE-----\\s*$"
        ),
        length(max = 65536)
    )]
    pub String,
);

impl SecretRef {
    /// Where the value goes: `env NAME` or `file PATH` (one reference per target).
    pub fn target(&self) -> String {
        match (&self.env, &self.file) {
            (Some(env), _) => format!("env {env}"),
            (None, Some(file)) => format!("file {file}"),
            (None, None) => String::new(),
        }
    }
}

impl std::fmt::Debug for ArmoredValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArmoredValue(..)")
    }
}

/// Where a task finds one secret value in the guest: `env` (an environment variable of the
/// task) or `file` (under `/run/fleet/secrets`, mode 0400). Exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name (`fleet/secrets/<name>.yaml`).
    pub secret: Name,
    /// One key of its `data`.
    pub key: SecretKey,
    /// An environment variable name, for example `ANTHROPIC_API_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$"))]
    pub env: Option<String>,
    /// A relative path under `/run/fleet/secrets`, for example `git/token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}){0,7}$"
    ))]
    pub file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FleetSpec {
    /// The hosts VMs run on, by the names the host configuration gives them.
    #[schemars(length(min = 1))]
    pub providers: Vec<ProviderRef>,
    /// Boot images VMs may use.
    #[serde(default)]
    pub images: Vec<Image>,
    #[serde(default)]
    pub policy: Policy,
}

/// A provider the host configuration defines. How to reach it (URI, endpoint, credentials,
/// storage) is the host's business; a revision only names it and picks how VMs run there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderRef {
    /// A provider of the host configuration.
    pub name: Name,
    /// What the host configuration says it is: `libvirt` or `proxmox`.
    #[serde(rename = "type")]
    pub kind: ProviderKind,
    /// `kvm` (hardware acceleration, default) or `qemu` (software emulation, TCG).
    #[serde(default)]
    pub domain_type: DomainType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Libvirt,
    Proxmox,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Libvirt => "libvirt",
            ProviderKind::Proxmox => "proxmox",
        }
    }
}

/// A host (or cluster) VMs run on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Provider {
    Libvirt(LibvirtProvider),
    Proxmox(Box<ProxmoxProvider>),
}

impl Provider {
    pub fn name(&self) -> &Name {
        match self {
            Provider::Libvirt(p) => &p.name,
            Provider::Proxmox(p) => &p.name,
        }
    }

    pub fn kind(&self) -> ProviderKind {
        match self {
            Provider::Libvirt(_) => ProviderKind::Libvirt,
            Provider::Proxmox(_) => ProviderKind::Proxmox,
        }
    }
}

/// A Proxmox VE cluster (one or several nodes) reached over its HTTPS API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxmoxProvider {
    pub name: Name,
    /// The API's base address, for example `https://pve1.example.org:8006`.
    #[schemars(regex(pattern = "^https://[^/\\s]+/?$"))]
    pub endpoint: String,
    /// The node VMs are created on unless a VM names its own `node`.
    #[schemars(regex(pattern = "^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$"))]
    pub node: String,
    /// The API token fleet authenticates with.
    pub token: ProxmoxToken,
    /// A PEM file with the CA that signed the API's certificate, when the system's trust
    /// store does not have it. An absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<HostPath>,
    /// Accept any certificate. Dangerous: plans and the status page say it is on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Storage for full clones and the cloud-init drive; default `local-lvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_.-]{0,63}$"))]
    pub storage: Option<String>,
    /// Bridge of each VM's network card; default `vmbr0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_.-]{0,15}$"))]
    pub bridge: Option<String>,
    /// Where fleet writes cloud-init user-data snippets (they never hold secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snippets: Option<ProxmoxSnippets>,
}

/// Where the API token comes from: exactly one of `secret`, `file` and `env`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxmoxToken {
    /// The token's id, `user@realm!tokenname`.
    #[schemars(regex(pattern = "^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+![A-Za-z][A-Za-z0-9._-]*$"))]
    pub id: String,
    /// The token's secret from a Secret in the fleet's `fleet/secrets/`. That Secret is
    /// then a provider credential: no loadout or task may take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<TokenSecretRef>,
    /// A file on the host holding the token's secret (mode 0600). An absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<HostPath>,
    /// An environment variable of fleet's process holding the token's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$"))]
    pub env: Option<String>,
}

/// One value of a Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenSecretRef {
    pub secret: Name,
    pub key: SecretKey,
}

/// A snippet storage fleet can write to directly: the node's own directory when fleet runs
/// on the node, or a shared mount (the PVE API cannot upload snippets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxmoxSnippets {
    /// The PVE storage id, with content type `snippets`, for example `local`.
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_.-]{0,63}$"))]
    pub storage: String,
    /// That storage's `snippets` directory as fleet's host sees it, for example
    /// `/var/lib/vz/snippets`. An absolute path.
    pub dir: HostPath,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LibvirtProvider {
    pub name: Name,
    /// A libvirt connection URI with its scheme, for example `qemu:///system` or
    /// `qemu+ssh://fleet@host/system` (never an alias from libvirt.conf: fleet tells from
    /// the URI whether the host is its own)
    #[schemars(
        length(min = 1),
        regex(pattern = "^[A-Za-z][A-Za-z0-9+.-]*://"),
        description = "a libvirt connection URI with its scheme, for example `qemu:///system` or `qemu+ssh://fleet@host/system` (not an alias from libvirt.conf: fleet tells from the URI whether the host is its own)"
    )]
    pub uri: String,
    /// Where, on the libvirt host, fleet's storage pool keeps its VMs' volumes (overlays,
    /// seeds, the images they are made from; console logs in its `logs/`) when fleet
    /// defines the pool: `<storageDir>/<fleet>/.volumes`. An absolute path; default `/var/lib/fleet/storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_dir: Option<HostPath>,
    /// The libvirt storage pool of this fleet's VM volumes on the host. Default
    /// `fleet-<fleet>`, a directory pool fleet defines (in `storageDir`) when it is missing;
    /// a pool named here that exists is used as it is, and must keep its volumes in a
    /// directory (types `dir`, `fs`, `netfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"))]
    pub storage_pool: Option<String>,
    /// The libvirt network VMs with `network: full` join: NAT to the outside, and a
    /// firewall table that drops everything they send to this host but DHCP (and DNS to
    /// the network's own dnsmasq). Default: `fleet-full` on bridge `virbr-fleet`,
    /// 192.168.150.1/24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_network: Option<FullNetwork>,
}

impl LibvirtProvider {
    /// Whether `uri` reaches a libvirtd on this machine (a socket path, no host part).
    pub fn is_local_uri(uri: &str) -> bool {
        uri.split_once("://")
            .is_none_or(|(_, rest)| rest.starts_with('/'))
    }
}

/// A NAT network for `network: full` VMs, guarded so they cannot reach the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FullNetwork {
    /// The libvirt network's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"))]
    pub name: Option<String>,
    /// Its bridge (at most 15 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub bridge: Option<String>,
    /// The host's address on it with the prefix length, for example `192.168.150.1/24`:
    /// guests get addresses from the rest of that subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]{1,3}\\.){3}[0-9]{1,3}/(1[6-9]|2[0-9])$"))]
    pub address: Option<String>,
}

/// `kind: Host` — `/etc/fleet/host.yaml` (or `--host-config`, `FLEET_HOST_CONFIG`): what the
/// host's administrator allows. Everything that names a host resource or a credential lives
/// here, never in a repository: a revision names providers and images, and may only ask for
/// what this file allows. fleet reads it only when root (or fleet's own user) owns it and
/// nobody else can write it or a directory above it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostDocument {
    pub api_version: ApiVersion,
    pub kind: HostKind,
    pub spec: HostSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HostKind {
    #[serde(rename = "Host")]
    Kind,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostSpec {
    /// The providers revisions may name, with how to reach them.
    #[serde(default)]
    pub providers: Vec<Provider>,
    /// Image files (`kernel`, `initrd`, `disk`) resolve under this directory, and nowhere
    /// else. An absolute path; default `/var/lib/fleet/images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<HostPath>,
    /// Task repositories a revision may fetch: URL patterns where `*` stands for any run of
    /// characters but `/` and `**` for any run at all (`https://git.example.org/team/*`).
    /// Paths inside the fleet's own repository are always allowed; nothing else is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<RepositoryPattern>,
    /// Repositories a task's results may be pushed to (`results.push`), as patterns like
    /// `repositories`. None unless listed: fetching from a repository does not allow
    /// writing to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pushes: Vec<RepositoryPattern>,
    /// age recipients `fleet secret set | rotate` encrypt to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<AgeRecipient>,
    #[serde(default)]
    pub limits: HostLimits,
    /// How the broker of brokered VMs reaches upstreams.
    #[serde(default, skip_serializing_if = "HostEgress::is_empty")]
    pub egress: HostEgress,
    /// How fleet reaches task repositories over https and ssh.
    #[serde(default, skip_serializing_if = "HostGit::is_empty")]
    pub git: HostGit,
    /// Whose signed commits fleet applies, and whose may approve and answer.
    #[serde(default, skip_serializing_if = "HostTrust::is_empty")]
    pub trust: HostTrust,
    /// The repository `fleet serve` follows, when it is not the local one: fleet keeps a
    /// bare mirror of it and fetches its branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<HostSource>,
    /// Where `fleet serve` sends events as they happen: webhooks and host commands. The
    /// host's to name, never a revision's (a revision could point them anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<HostNotify>,
}

/// One notification sink: a webhook (`url`) or a host command (`exec`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostNotify {
    /// Its name in the delivery log.
    pub name: String,
    /// An `https://` URL (or `http://` on loopback) each event is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `json` (the event; default) or `slack` (`{"text": …}`, for Slack-compatible hooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<NotifyFormat>,
    /// A file (mode 0600) with the key of the `X-Fleet-Signature-256: sha256=<HMAC-SHA256
    /// of the body>` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<HostPath>,
    /// Certificate authorities (PEM) for the URL instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<HostPath>,
    /// A host command (argv, no shell) run for each event, the event's JSON on stdin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// The event kinds sent (`revision.refused`, `step.failed`, …). Default: what needs a
    /// person: applied and refused revisions, failed steps, drift, prompts and approvals
    /// waiting, finished tasks, planned previews, suspension.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    Json,
    Slack,
}

/// A remote repository to follow (`fleet serve` fetches its branch into a mirror of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostSource {
    /// `https://`, `ssh://` or `file://`.
    #[schemars(regex(pattern = r"^(https|ssh|file)://"))]
    pub url: String,
    /// The branch applied. Default `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// How often the remote's branch is compared with the mirror's (one round trip when
    /// nothing changed). Default 15s; `fleet reconcile` and the webhook fetch at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<Duration>,
    /// A file (mode 0600) holding the https token or the ssh deploy key (OpenSSH private
    /// key) fleet fetches with. Never from the repository itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<HostPath>,
    /// The https user sent with the token. Default `fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Refs fleet also fetches and plans read-only, publishing each plan under
    /// `status/previews/` (`refs/pull/*/head`, `refs/heads/proposed/*`): at most one `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preview_refs: Vec<String>,
}

/// Signed commits. With trust roots, a revision is applied only when its commit carries
/// a signature they verify, and a committed Answer counts only when the commit that last
/// changed it does (and, with `approvers`, by one of them). The revision cannot turn
/// this off: it is the host's to decide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostTrust {
    /// An OpenSSH allowed-signers file (`ssh-keygen -Y verify` format: principals, then
    /// a key), for commits signed with `gpg.format=ssh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_signers: Option<HostPath>,
    /// An OpenPGP keyring (`gpg --export KEY... > FILE`) of the keys whose signatures
    /// are trusted; a key's principal is the email of the user id that signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openpgp_keyring: Option<HostPath>,
    /// The principals who may approve held steps and answer prompts by committing an
    /// Answer. Empty: any allowed signer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
}

impl HostTrust {
    pub fn is_empty(&self) -> bool {
        *self == HostTrust::default()
    }

    /// Whether the host verifies signatures at all.
    pub fn verifies(&self) -> bool {
        self.allowed_signers.is_some() || self.openpgp_keyring.is_some()
    }
}

/// The host's side of fetching repositories over the network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostGit {
    /// The ssh host keys fleet trusts (an OpenSSH `known_hosts` file, as `ssh-keyscan`
    /// prints). Without it no `ssh://` repository is fetched: a server's key is never
    /// trusted on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<HostPath>,
    /// A PEM file of the certificate authorities trusted for `https://` repositories
    /// instead of the system's store (an internal git server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<HostPath>,
}

impl HostGit {
    pub fn is_empty(&self) -> bool {
        self.known_hosts.is_none() && self.ca_file.is_none()
    }
}

/// The host's side of brokered egress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostEgress {
    /// Names the broker resolves to the address given here instead of asking DNS (an
    /// internal registry, a split horizon, a test upstream). An address pinned here is
    /// dialed even when internal: the administrator named it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, std::net::IpAddr>,
    /// PEM files of certificate authorities the broker trusts for upstream TLS besides the
    /// system's store. Absolute paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_files: Vec<HostPath>,
    /// A PEM file of certificate authorities per credentialed API host (an internal
    /// registry with its own CA): for that name the broker trusts these alone, not the
    /// system's store nor `caFiles`, and no other name is trusted through them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_ca_files: BTreeMap<String, HostPath>,
    /// Internal addresses (loopback, private, link-local, this host's own), each an address
    /// or a CIDR range, that a committed rule naming them may reach. Without an entry, no
    /// rule reaches inside whatever it names: a committer must never reach the host's own
    /// services or its network through a guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_internal: Vec<String>,
}

impl HostEgress {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.ca_files.is_empty()
            && self.host_ca_files.is_empty()
            && self.allow_internal.is_empty()
    }
}

/// A URL pattern for task repositories.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct RepositoryPattern(
    #[schemars(
        regex(pattern = "^(https|ssh|git|file)://[^\\s]+$"),
        length(max = 1024)
    )]
    pub String,
);

/// What one fleet may ask of the host, in total.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostLimits {
    /// Most VMs (pool members included). Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_vms: Option<u32>,
    /// Most vCPUs over all VMs. Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000000))]
    pub max_cpus: Option<u64>,
    /// Most memory over all VMs. Default 256Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<Size>,
    /// The shortest `reconcileInterval` and `resyncInterval` a revision may set. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval: Option<Duration>,
}

impl HostLimits {
    pub const DEFAULT_MAX_VMS: u32 = 100;
    pub const DEFAULT_MAX_CPUS: u64 = 256;
    pub const DEFAULT_MAX_MEMORY_MIB: u64 = 256 * 1024;
    pub const DEFAULT_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn max_vms(&self) -> u32 {
        self.max_vms.unwrap_or(Self::DEFAULT_MAX_VMS)
    }
    pub fn max_cpus(&self) -> u64 {
        self.max_cpus.unwrap_or(Self::DEFAULT_MAX_CPUS)
    }
    pub fn max_memory_mib(&self) -> u64 {
        self.max_memory
            .as_ref()
            .map_or(Self::DEFAULT_MAX_MEMORY_MIB, Size::mib)
    }
    pub fn min_interval(&self) -> std::time::Duration {
        self.min_interval
            .as_ref()
            .map_or(Self::DEFAULT_MIN_INTERVAL, Duration::to_std)
    }
}

impl HostSpec {
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name().0 == name)
    }

    /// The image root; `/var/lib/fleet/images` unless set.
    pub fn image_root(&self) -> &str {
        self.image_root
            .as_deref()
            .unwrap_or("/var/lib/fleet/images")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    #[default]
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// A boot image: a kernel and initrd for direct kernel boot, a qcow2 base disk that each VM
/// gets a copy-on-write overlay of, or both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Image {
    pub name: Name,
    /// Kernel for direct kernel boot: a path under the host's image root
    /// (`imageRoot` in the host configuration), relative and without `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initial ramdisk for direct kernel boot; needs `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Extra kernel command line; fleet always adds `console=ttyS0` and `fleet.vm=<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// qcow2 base disk, under the host's image root like `kernel`; each VM boots from its own
    /// overlay of it. Every file of its backing chain must lie under the image root too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Proxmox providers: the name of the template VM each VM is cloned from (linked clone
    /// where the storage allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$"))]
    pub template: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// How often the daemon reconciles when nothing triggers it. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_interval: Option<Duration>,
    /// How many steps apply runs at once. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_parallel: Option<u32>,
    /// Deadline for one step (create, start, update, ...). Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_timeout: Option<Duration>,
    /// How long a graceful shutdown may take before the VM is powered off. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<Duration>,
    /// Heal drift (a VM stopped, removed or resized behind fleet's back) by putting it back.
    /// `false` only reports it. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_heal: Option<bool>,
    /// How often the daemon re-reads every VM's definition, for changes the hypervisor sends
    /// no event for (such as `virsh setmem --config`). Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_interval: Option<Duration>,
    /// Most VMs one apply may destroy; destroys beyond it wait for an approval. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100000))]
    pub max_destroys_per_apply: Option<u32>,
    /// Step kinds that wait for a human's approval (`fleet/hitl/<id>.yaml` with `approve`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approve: Vec<Action>,
    /// Apply a branch tip that does not descend from the revision in force (a force-push,
    /// a reset). The revision in force decides, not the new one. Default false: such a tip
    /// is refused and reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_rollback: Option<bool>,
    /// Make no change to any VM: observe, report drift and plan, but apply nothing (tasks
    /// already running go on). `fleet suspend` does the same from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// How far the running VMs of a revision may exceed a provider's memory and CPUs (a
    /// libvirt host's own figures, or a Proxmox cluster's online nodes together, read when
    /// a revision is loaded). Default memory 1.0, CPU 4.0; a revision asking for more is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overcommit: Option<Overcommit>,
    /// Caps on the VMs of a pool, or of the VMs carrying some labels: a revision over one
    /// is refused, naming the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota: Vec<Quota>,
    /// What fleet keeps of its own records in the status directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// How much of its history fleet keeps; `fleet serve` prunes the rest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// Finished runs of tasks no longer in the revision (record, output, artifacts,
    /// prompts): the newest this many are kept. Default 100. A task still in the revision
    /// keeps its record whatever its age: it is what stops the task running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100000))]
    pub finished_tasks: Option<u32>,
    /// ... and none that finished longer ago than this. Default 720h (30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_task_age: Option<Duration>,
    /// `events.jsonl` and `notifications.jsonl` start a new file past this size (the old
    /// one becomes `.1`, `.1` becomes `.2`, …). Default 16Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_size: Option<Size>,
    /// Older files kept of each log. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub log_files: Option<u32>,
}

/// One quota: which VMs it counts (`pool` or `labels`, exactly one) and its caps (at least
/// one of `vms` and `memory`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Quota {
    /// A VMPool: its replicas, and its fresh members counted at `fresh.max + fresh.warm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Name>,
    /// Labels a VM carries (its own, or its pool's and template's): every VM with all of
    /// them, fresh pools' members included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Most VMs, in any state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub vms: Option<u32>,
    /// Most memory of those that run (`state: running`), such as 32Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
}

/// Ratios of what running VMs may ask to what a host has.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Overcommit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 100.0))]
    pub memory: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 100.0))]
    pub cpu: Option<f64>,
}

/// A kind of plan step, as `policy.approve` names it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "StepKind")]
pub enum Action {
    Create,
    Start,
    Stop,
    Update,
    Replace,
    Destroy,
    /// Return a VM to the state it was made in (`reset: beforeEachTask`).
    Reset,
    /// Return a VM to one of its snapshots (`fleet snapshot revert`).
    Revert,
    /// Delete a workspace (its file was removed): always held for an approval.
    DestroyWorkspace,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Destroy => "destroy",
            Action::Reset => "reset",
            Action::Revert => "revert",
            Action::DestroyWorkspace => "destroyWorkspace",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// Virtual CPUs, 1 to 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub cpus: Option<u32>,
    /// Memory, 64Mi to 1Ti.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    /// Size of the VM's disk overlay (disk images only), 1Gi to 16Ti.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Size>,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network device at all; the guest talks to the host over virtio-serial only.
    #[default]
    Isolated,
    /// Outbound network through the host: a libvirt NAT network (a Proxmox bridge), with
    /// on libvirt the host's own addresses fenced off by fleet's nftables guard.
    Full,
    /// No network device: the agent's proxy carries the tasks' connections to the host,
    /// which dials only what the loadout's `egress.allow` names.
    Brokered,
}

/// What the tasks of a brokered VM (`network.mode: brokered`) may reach, through the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Egress {
    /// Destinations allowed; every other one is refused with a 403 that names the rule to
    /// add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressAllow>,
    /// API keys the broker adds to requests on the host, so they never enter the VM. A
    /// task reaches such an API in plain HTTP at `http://127.0.0.1:3128/<host>/...` (fleet
    /// sets the base-URL variables of the agents it knows); the broker replaces whatever
    /// credential the request carries with the real one and forwards it over verified TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<EgressCredential>,
    /// What each task run may use through the broker. A connection that opens past it gets
    /// 429 and a prompt asks a human to allow more. Checked as connections open: those
    /// already open finish, so a run can go past its bytes and tokens by what they move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<EgressBudget>,
}

/// Limits on one task run's brokered egress; each is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressBudget {
    /// Connections (tunnels and requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub connections: Option<u64>,
    /// Bytes moved, both ways together (`500Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Size>,
    /// Model tokens, input and output, that brokered APIs reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
}

/// One API's credential, added by the broker (`egress.credentials`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressCredential {
    /// The API's host name (`api.anthropic.com`): exact, no wildcard.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Its HTTPS port (default 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<EgressPort>,
    /// The header that carries the credential (default `authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9-]{1,64}$"))]
    pub header: Option<String>,
    /// How the value is written: `bearer` (`Bearer VALUE`, the default for
    /// `authorization`), `basic` (`Basic base64(username:VALUE)`, for git hosts), or
    /// `plain` (the value as it is, the default for any other header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<CredentialScheme>,
    /// The user name of `basic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9._@+-]{1,128}$"))]
    pub username: Option<String>,
    /// The value: one key of a Secret whose `allowed.hosts` lists this host.
    pub secret: CredentialSecret,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CredentialScheme {
    Plain,
    Bearer,
    Basic,
}

/// A Secret's key, taken by the host's broker (never sent to a guest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CredentialSecret {
    pub secret: Name,
    pub key: SecretKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressAllow {
    /// A host name (`api.example.com`), every name below a domain (`*.example.com`), or
    /// an IP address. An internal address (loopback, private, link-local) is reached only
    /// when a rule names it as an address.
    #[schemars(length(min = 1, max = 255))]
    pub host: String,
    /// Ports allowed (default 443).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EgressPort>,
    /// For plain HTTP only: path prefixes allowed (default: any). A rule with paths never
    /// allows a tunnel (`CONNECT`), which carries any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A TCP port, 1 to 65535.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct EgressPort(#[schemars(range(min = 1, max = 65535))] pub u16);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    pub mode: NetworkMode,
}

/// A file cloud-init writes into the guest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GuestFile {
    /// Absolute path in the guest.
    #[schemars(regex(pattern = "^/"), length(max = 4096))]
    pub path: String,
    pub content: String,
    /// Octal permission bits, for example "0644".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^0?[0-7]{3}$"))]
    pub mode: Option<String>,
}

/// A user account cloud-init creates at first boot. Its password is always locked: people
/// reach the VM with keys, tasks reach it over the agent link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GuestUser {
    /// A POSIX login name: lowercase letters, digits, `_` and `-`, at most 32 characters.
    #[schemars(regex(pattern = "^[a-z_][a-z0-9_-]{0,31}$"))]
    pub name: String,
    /// Supplementary groups, for example `[docker]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<UnixName>,
    /// Login shell, an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^/[^\\s]*$"), length(max = 4096))]
    pub shell: Option<String>,
    /// One single-line sudoers rule, for example `ALL=(ALL) NOPASSWD:ALL`; no sudo without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[^\\n\\r]+$"), length(max = 1024))]
    pub sudo: Option<String>,
    /// OpenSSH public keys (one per entry) allowed to log in as this user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<SshPublicKey>,
}

/// A POSIX user or group name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct UnixName(#[schemars(regex(pattern = "^[a-z_][a-z0-9_-]{0,31}$"))] pub String);

/// One OpenSSH public key line: `TYPE BASE64 [COMMENT]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct SshPublicKey(
    #[schemars(
        regex(
            pattern = "^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\\.com) [A-Za-z0-9+/]+=* ?[^\\n\\r]*$"
        ),
        length(max = 16384)
    )]
    pub String,
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadoutSpec {
    /// Loadouts merged first, depth-first, left to right; this loadout's own fields win.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extends: Vec<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// For `network.mode: brokered`: what its tasks may reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// Packages cloud-init installs at first boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<GuestFile>,
    /// Commands cloud-init runs at first boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<String>,
    /// Accounts cloud-init creates, besides the image's default user. Keyed by name: a later
    /// loadout's user replaces an earlier one of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<GuestUser>,
    /// Secret values for the VM (files) and its tasks (variables), over the agent link only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    /// Environment for tasks run in the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `beforeEachTask`: its VMs return to the state they were made in before each task run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<Reset>,
    /// Workspaces its VM mounts, keyed by name (a later loadout's, then the VM's own, win).
    /// A workspace belongs to one VM: a loadout that mounts one serves one VM, and no pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<WorkspaceMount>,
}

/// When a VM returns to the state it was made in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Reset {
    /// Before each task run but the first after it was made (or last reset): one run at a
    /// time, each on a clean disk, its secrets delivered again.
    BeforeEachTask,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    #[default]
    Running,
    Stopped,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Stopped => "stopped",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmSpec {
    /// Name of a provider in fleet.yaml (and in the host configuration).
    pub provider: Name,
    /// Name of an image in fleet.yaml.
    pub image: Name,
    /// Proxmox providers: the cluster node the VM runs on (default: the provider's `node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$"))]
    pub node: Option<String>,
    /// Name of a Loadout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadout: Option<Name>,
    /// Overrides the loadout's resources field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Overrides the loadout's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// `running` (default) or `stopped`.
    #[serde(default)]
    pub state: PowerState,
    /// Recorded in the VM's ownership stamp; a protected VM is never destroyed or replaced
    /// without an approval, even after its file is deleted.
    #[serde(default)]
    pub protect: bool,
    /// How long the VM may live: from its creation (recorded in its stamp) or its last
    /// renewal, then stopped or destroyed. Not for fresh members, which live for their runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// Stop the VM when it has been idle this long, and start it again when a task run is
    /// due on it: `state: running` then means "allowed to run". Not for fresh members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Idle>,
    /// Workspaces attached to the VM and mounted at boot (at most 8). A workspace belongs
    /// to one VM at a time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<WorkspaceMount>,
    /// Snapshots of the VM's workspaces that fleet takes by itself before the VM's risky
    /// steps, keeping the newest `keep` of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotPolicy>,
    /// Overrides the loadout's `reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<Reset>,
}

/// `snapshots: {before: [replace, reset], keep: 5}`: before each such step of the VM, once
/// it is down, fleet snapshots each of its workspaces (`fleet-replace-<time>`,
/// `fleet-reset-<time>`) and deletes the oldest of its own beyond `keep`. Operators' own
/// snapshots are never counted or deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotPolicy {
    /// The steps a snapshot is taken before.
    #[schemars(length(min = 1), extend("uniqueItems" = true))]
    pub before: Vec<SnapshotBefore>,
    /// How many of fleet's own snapshots each workspace keeps (1 to 50).
    #[schemars(range(min = 1, max = 50))]
    pub keep: u32,
}

/// A VM step a snapshot policy acts before.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotBefore {
    /// The VM is made again (a new image, a first-boot change).
    Replace,
    /// The VM returns to the state it was made in (`reset: beforeEachTask`).
    Reset,
}

impl SnapshotBefore {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotBefore::Replace => "replace",
            SnapshotBefore::Reset => "reset",
        }
    }
}

/// `idle: {stopAfter: 30m}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Idle {
    /// How long with no task run under way or due, no prompt waiting and no run starting
    /// or ending, counted from the VM's start or its last such activity (10s to 168h).
    pub stop_after: Duration,
}

/// `lease: {ttl: 8h, onExpiry: stop}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Lease {
    /// How long the VM lives from its creation, or from a renewal (at least 10s).
    pub ttl: Duration,
    /// What happens when it ends: `stop` (default; a renewal starts it again) or `destroy`
    /// (held by protection, `policy.approve` and `maxDestroysPerApply` like any destroy; a
    /// renewal makes it again).
    #[serde(default)]
    pub on_expiry: LeaseExpiry,
    /// A counter: a commit that changes it renews the lease for `ttl` from the moment fleet
    /// sees the change (`fleet lease renew VM` does the same from the host).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a lease's end does to its VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LeaseExpiry {
    #[default]
    Stop,
    Destroy,
}

impl LeaseExpiry {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseExpiry::Stop => "stop",
            LeaseExpiry::Destroy => "destroy",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    pub spec: VmSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmPoolSpec {
    /// How many VMs: `<name>-01` … `<name>-NN`, zero-padded to the width of the count (at least 2).
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: u32,
    pub template: VmTemplate,
    /// Members made for one task run each (tasks with `vm: {pool: NAME, fresh: true}`),
    /// named `<name>-f<N>`, beside the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh: Option<FreshPool>,
    /// Spread the replicas over several libvirt providers. Each member is given a provider
    /// once and keeps it: adding a provider or a member never moves one, and a member on a
    /// provider fleet cannot reach is left alone (never made elsewhere). The template's
    /// `provider` must be one of `providers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Where a pool's replicas run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// The libvirt providers (of fleet.yaml) members may run on, in order of preference.
    #[schemars(length(min = 1, max = 64), extend("uniqueItems" = true))]
    pub providers: Vec<Name>,
    /// `spread` (default): a new member goes to the provider holding the fewest of the
    /// pool's members; `pack`: to the first provider, in the list's order, with room for
    /// it. Room is the provider's memory and CPUs (`policy.overcommit` applied) less what
    /// the revision runs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<PlacementStrategy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PlacementStrategy {
    #[default]
    Spread,
    Pack,
}

/// How a pool serves tasks that want a fresh VM each run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FreshPool {
    /// At most this many runs hold a member at once (default 4); later runs wait, pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: Option<u32>,
    /// Members kept booted and idle (default 0), so a run starts without waiting for a
    /// boot; one handed to a run is replaced in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub warm: Option<u32>,
}

/// Where a task runs: a VM (or pool member) by name, or a fresh member of a pool per run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TaskVm {
    Named(Name),
    Fresh(FreshVm),
}

impl TaskVm {
    /// The VM's or the pool's name.
    pub fn name(&self) -> &str {
        match self {
            TaskVm::Named(n) => &n.0,
            TaskVm::Fresh(f) => &f.pool.0,
        }
    }
}

/// `vm: {pool: sandbox, fresh: true}`: each run gets a member of its own, made for it and
/// destroyed when the run has ended (or `keepFor` after, for a look inside).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FreshVm {
    /// A VMPool's name.
    pub pool: Name,
    /// Must be `true`: each run gets a VM of its own.
    #[schemars(extend("const" = true))]
    pub fresh: bool,
    /// How long the member outlives its run (default 0: destroyed once the run ended and
    /// its results are in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_for: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskSpec {
    /// The VM to run in: a VM's or a pool member's name, or `{pool: NAME, fresh: true}`
    /// for a member of that pool made for each run.
    pub vm: TaskVm,
    /// Fetched on the host and unpacked into the task's directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<Repository>,
    /// The program and its arguments, run as given (no shell). Exactly one of `command`
    /// and `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub command: Option<Vec<String>>,
    /// A coding agent run non-interactively on `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
    /// Added to the VM's loadout environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secret values for this task, added to its loadout's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    /// The whole process tree is killed after this long (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Globs relative to the task's directory; matching files are copied to
    /// `status/tasks/<name>/artifacts/` when the task ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Bump to run a finished task again.
    #[serde(default)]
    #[schemars(range(max = 1000000))]
    pub rerun: u32,
    /// How prompts waiting for a human are found and how long they may wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptPolicy>,
    /// Narrows the brokered egress of its VM's loadout for this task's runs: a connection
    /// must be allowed by both (`allow`), and each budget limit is the smaller of the two.
    /// Applied to a running run at once, without running it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<TaskEgress>,
    /// The git checkout of `repository` in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<TaskGit>,
    /// What becomes of the commits a run makes in its checkout (they always come back
    /// to the host, checked, as `changes.patch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<TaskResults>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskResults {
    /// Push them to a branch: the host configuration must allow the URL (`pushes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<ResultsPush>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResultsPush {
    /// Where to (default: the task's repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub url: Option<String>,
    /// The branch (default `fleet/<task>/<run>`); never forced, so a push never
    /// overwrites what is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = BRANCH_PATTERN))]
    pub branch: Option<String>,
    /// What pushing to an `https://` or `ssh://` URL takes (default, when pushing to the
    /// task's own repository: its `repository.credentials`), as there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RepositoryCredentials>,
}

/// What a branch a task names may look like: a ref-like name, never an option, a path
/// out of `refs/heads/` or text a plan could not print as it is.
const BRANCH_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._/-]*$";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskGit {
    /// Author and committer of the commits made in the checkout (default `fleet task
    /// NAME <NAME@fleet.invalid>`).
    pub author: GitIdentity,
}

/// A name and an email address, as git writes them in a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GitIdentity {
    #[schemars(length(min = 1, max = 256), regex(pattern = "^[^<>\\r\\n]+$"))]
    pub name: String,
    #[schemars(length(min = 3, max = 256), regex(pattern = "^[^<>\\s]+@[^<>\\s]+$"))]
    pub email: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskEgress {
    /// Destinations this task's connections may reach, within its loadout's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressAllow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<EgressBudget>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Repository {
    /// A git URL the host configuration allows (`repositories`), or a path inside this
    /// repository (relative, without `..`).
    #[schemars(length(min = 1, max = 4096))]
    pub url: String,
    /// The branch to check out (default: the remote's HEAD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = BRANCH_PATTERN))]
    pub branch: Option<String>,
    /// The commit to check out, pinned: 40 hex digits, on `branch` (else on any branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-f]{40}$"))]
    pub rev: Option<String>,
    /// What fetching an `https://` or `ssh://` URL takes, used on the host only (the guest
    /// gets the fetched files, never the credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RepositoryCredentials>,
}

/// A repository's credential: one key of a Secret whose `allowed.hosts` lists the URL's
/// host (with `:PORT` unless 443) and whose `allowed.tasks` lists the task. For https the
/// value is a password or token (sent as HTTP basic auth); for ssh, an OpenSSH private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RepositoryCredentials {
    pub secret: Name,
    pub key: SecretKey,
    /// The https user name (default: the URL's, else `git`). Unused for ssh, which logs in
    /// as the URL's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9._@+-]{1,128}$"))]
    pub username: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentSpec {
    pub kind: AgentKind,
    #[schemars(length(min = 1, max = 100000))]
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Run the agent's own terminal interface, which asks before it acts: its questions
    /// become prompts (a menu's choices listed) answered by a commit or `fleet hitl
    /// answer`. Claude, Codex and Gemini; default false (the agent acts without asking).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interactive: bool,
}

/// Coding agents fleet knows the non-interactive command line of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    Claude,
    Codex,
    Gemini,
    Aider,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PromptPolicy {
    /// Regular expressions (case-insensitive) that mark a line as a prompt, in addition to
    /// the built-in ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// How long a prompt may wait for an answer (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// What happens when the deadline passes: `wait` (default; the prompt is marked
    /// overdue) or `fail` (the task is cancelled and fails).
    #[serde(default)]
    pub on_deadline: OnDeadline,
    /// Accept answers with control characters and escape sequences (for a program driven by
    /// keys rather than lines). Off by default: an answer is one line of plain text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_control: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    #[default]
    Wait,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnswerSpec {
    /// The text typed into the task's terminal, followed by Enter (answers a prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub response: Option<String>,
    /// the 64-hex digest of the held steps it approves, as their approval file shows it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub approve: Option<String>,
}

/// The JSON Schema of each kind, as generated from the types above.
pub fn schema_for(kind: Kind) -> serde_json::Value {
    let schema = match kind {
        Kind::Fleet => schemars::schema_for!(FleetDocument),
        Kind::Loadout => schemars::schema_for!(LoadoutDocument),
        Kind::Vm => schemars::schema_for!(VmDocument),
        Kind::VmPool => schemars::schema_for!(VmPoolDocument),
        Kind::Task => schemars::schema_for!(TaskDocument),
        Kind::Answer => schemars::schema_for!(AnswerDocument),
        Kind::Secret => schemars::schema_for!(SecretDocument),
        Kind::Workspace => schemars::schema_for!(WorkspaceDocument),
        Kind::Host => schemars::schema_for!(HostDocument),
    };
    serde_json::to_value(schema).expect("a generated schema is plain JSON")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_schemas_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema");
        for kind in Kind::ALL {
            let generated = serde_json::to_string_pretty(&schema_for(kind)).expect("json") + "\n";
            expect_test::expect_file![dir.join(kind.schema_file())].assert_eq(&generated);
        }
    }

    #[test]
    fn sizes_convert_to_mib() {
        let mib = |s: &str| s.parse::<Size>().map(|s| s.mib());
        assert_eq!(mib("512Mi"), Ok(512));
        assert_eq!(mib("2Gi"), Ok(2048));
        assert_eq!(mib("1Ti"), Ok(1024 * 1024));
        assert!(mib("2G").is_err());
        assert!(mib("99999999999999999999Ti").is_err());
        assert!(
            "5m".parse::<Duration>()
                .is_ok_and(|d| d.to_std().as_secs() == 300)
        );
        assert!("soon".parse::<Duration>().is_err());
    }
}
