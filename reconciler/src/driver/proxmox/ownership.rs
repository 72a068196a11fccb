//! Which VMs are fleet's: the tag `fleet-<fleet>` indexes them (one `/cluster/resources`
//! call), the stamp line in the description proves it (read once per VMID and cached while
//! the VM keeps its name and node). Every mutation first locates the VM by name and checks
//! its stamp (`owned`), so a VMID fleet once used and PVE gave to another VM is never touched.

use super::*;

pub(super) struct CachedStamp {
    pub(super) name: String,
    pub(super) node: String,
    pub(super) stamp: Option<Arc<Stamp>>,
}

/// One VM of `/cluster/resources?type=vm`.
#[derive(Clone, Debug, Deserialize)]
pub(super) struct Resource {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) vmid: u64,
    #[serde(default)]
    pub(super) name: Option<String>,
    pub(super) node: String,
    #[serde(default)]
    pub(super) status: String,
    #[serde(default)]
    pub(super) template: Option<Value>,
    #[serde(default)]
    pub(super) tags: Option<String>,
    #[serde(default)]
    pub(super) maxcpu: Option<f64>,
    #[serde(default)]
    pub(super) maxmem: Option<u64>,
}

impl Resource {
    pub(super) fn is_template(&self) -> bool {
        matches!(&self.template, Some(Value::Number(n)) if n.as_u64() == Some(1))
            || matches!(&self.template, Some(Value::String(s)) if s == "1")
    }

    pub(super) fn has_tag(&self, tag: &str) -> bool {
        self.tags
            .as_deref()
            .is_some_and(|t| split_tags(t).any(|t| t == tag))
    }

    pub(super) fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

pub(super) fn split_tags(tags: &str) -> impl Iterator<Item = &str> {
    tags.split([';', ',', ' ']).filter(|t| !t.is_empty())
}

/// A fleet VM located and proven: where it is, its config and the config's digest.
pub(super) struct OwnedVm {
    pub(super) vmid: u64,
    pub(super) node: String,
    pub(super) running: bool,
    pub(super) config: BTreeMap<String, Value>,
    pub(super) digest: String,
}

impl OwnedVm {
    pub(super) fn path(&self) -> String {
        format!("/nodes/{}/qemu/{}", self.node, self.vmid)
    }

    pub(super) fn value(&self, key: &str) -> Option<String> {
        self.config.get(key).map(value_text)
    }
}

pub(super) fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn fleet_tag(fleet: &str) -> String {
    format!("fleet-{}", fleet.to_ascii_lowercase())
}

impl ProxmoxDriver {
    pub(super) fn resources(&self) -> Result<Vec<Resource>, DriverError> {
        let all: Vec<Resource> = self
            .client()?
            .get("/cluster/resources", &[("type", "vm".into())])?;
        Ok(all.into_iter().filter(|r| r.kind == "qemu").collect())
    }

    pub(super) fn read_config(
        &self,
        node: &str,
        vmid: u64,
    ) -> Result<(BTreeMap<String, Value>, String), DriverError> {
        let mut config: BTreeMap<String, Value> = self
            .client()?
            .get(&format!("/nodes/{node}/qemu/{vmid}/config"), &[])?;
        let digest = config
            .remove("digest")
            .map(|d| value_text(&d))
            .unwrap_or_default();
        Ok((config, digest))
    }

    pub(super) fn stamp_of(&self, config: &BTreeMap<String, Value>) -> Option<Stamp> {
        config
            .get("description")
            .and_then(|d| stamp::parse(&value_text(d)))
    }

    pub(super) fn is_ours(&self, stamp: &Stamp, name: &str) -> bool {
        stamp.fleet == self.fleet && stamp.name == name
    }

    /// The VM `name` if it carries this fleet's stamp for `name`, checked on a fresh read
    /// of its config. A VM of that name without the stamp is refused as foreign.
    pub(super) fn owned(&self, name: &str) -> Result<Option<OwnedVm>, DriverError> {
        let candidates: Vec<Resource> = self
            .resources()?
            .into_iter()
            .filter(|r| r.name() == name && !r.is_template())
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        for r in &candidates {
            let (config, digest) = match self.read_config(&r.node, r.vmid) {
                Ok(read) => read,
                // Gone between the listing and the read.
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if self
                .stamp_of(&config)
                .is_some_and(|s| self.is_ours(&s, name))
            {
                return Ok(Some(OwnedVm {
                    vmid: r.vmid,
                    node: r.node.clone(),
                    running: r.status == "running",
                    config,
                    digest,
                }));
            }
        }
        Err(DriverError::new(
            ErrorKind::Conflict,
            format!(
                "VM {name:?} on {} (VMID {}) is not fleet {:?}'s; refusing to touch it",
                self.provider,
                candidates
                    .iter()
                    .map(|r| r.vmid.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.fleet
            ),
        ))
    }

    pub(super) fn require_owned(&self, name: &str) -> Result<OwnedVm, DriverError> {
        self.owned(name)?.ok_or_else(|| {
            DriverError::new(
                ErrorKind::NotFound,
                format!("VM {name:?} does not exist on {}", self.provider),
            )
        })
    }

    pub(super) fn remember(&self, vmid: u64, name: &str, node: &str, stamp: Option<Stamp>) {
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                vmid,
                CachedStamp {
                    name: name.to_owned(),
                    node: node.to_owned(),
                    stamp: stamp.map(Arc::new),
                },
            );
    }

    pub(super) fn forget(&self, vmid: u64) {
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vmid);
    }
}
