//! A VM's PVE config: what fleet writes (only the keys that differ, with the digest of the
//! config they were compared with, so a concurrent edit is refused rather than overwritten),
//! the boot disk's size, and how PVE's values read.

use super::*;

impl ProxmoxDriver {
    /// The `net0` value for `vm`, keeping the card's MAC address; `None`: no card.
    pub(super) fn net0(
        &self,
        vm: &DesiredVm,
        current: Option<&str>,
    ) -> Result<Option<String>, DriverError> {
        let mac = current.and_then(|c| {
            c.split(',')
                .find_map(|part| part.strip_prefix("virtio=").map(str::to_owned))
        });
        let model = match mac {
            Some(mac) => format!("virtio={mac}"),
            None => "virtio".to_owned(),
        };
        match vm.config.network {
            NetworkMode::Isolated | NetworkMode::Brokered => Ok(None),
            NetworkMode::Full => Ok(Some(format!("{model},bridge={}", self.bridge))),
        }
    }

    /// Brings the config of an owned VM to the spec: only keys that differ are sent, with
    /// the digest of the config they were compared with. A concurrent edit makes PVE refuse
    /// the write ("checksum mismatch"); the next pass observes again and re-plans.
    pub(super) fn write_config(
        &self,
        vm: &DesiredVm,
        stamp: &Stamp,
        owned: &OwnedVm,
    ) -> Result<(), DriverError> {
        let mut wanted: Vec<(&str, String)> = vec![
            ("cores", vm.config.cpus.to_string()),
            ("sockets", "1".into()),
            ("memory", vm.config.memory_mib.to_string()),
            ("description", stamp::render(stamp)),
            ("tags", self.tag.clone()),
            // qemu-guest-agent: how fleet reaches the guest on Proxmox.
            ("agent", "1".into()),
            (
                "kvm",
                if self.domain_type == DomainType::Qemu {
                    "0"
                } else {
                    "1"
                }
                .into(),
            ),
        ];
        let mut delete = Vec::new();
        match self.net0(vm, owned.value("net0").as_deref())? {
            Some(net0) => wanted.push(("net0", net0)),
            None => {
                if owned.config.contains_key("net0") {
                    delete.push("net0");
                }
            }
        }
        if let Some((storage, _)) = &self.snippets {
            wanted.push((
                "cicustom",
                format!("user={storage}:snippets/{}", self.snippet_name(&vm.name)),
            ));
            if !has_cloudinit_drive(&owned.config) {
                wanted.push(("ide2", format!("{}:cloudinit", self.storage)));
            }
        } else if needs_user_data(vm) {
            return Err(DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "VM {}: its loadout sets packages, files, runcmd or users, which need a cloud-init snippet; set snippets on provider {}",
                    vm.name, self.provider
                ),
            ));
        }
        let mut form: Vec<(&str, String)> = wanted
            .into_iter()
            .filter(|(key, value)| !same_value(key, owned.value(key).as_deref(), value))
            .collect();
        if !delete.is_empty() {
            form.push(("delete", delete.join(",")));
        }
        if form.is_empty() {
            return Ok(());
        }
        form.push(("digest", owned.digest.clone()));
        self.client()?
            .put::<Value>(&format!("{}/config", owned.path()), &form)
            .map_err(|e| {
                if e.condition == PveCondition::DigestMismatch {
                    DriverError::new(
                        ErrorKind::Conflict,
                        format!(
                            "VM {} changed on {} while fleet was updating it (config digest mismatch); nothing was written, the next pass plans again",
                            vm.name, self.provider
                        ),
                    )
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    /// Grows the boot disk to the spec's size (never shrinks it); returns the VM as it is
    /// afterwards (a resize changes its config, and so the digest the next write needs).
    pub(super) fn resize_disk(
        &self,
        vm: &DesiredVm,
        owned: OwnedVm,
    ) -> Result<OwnedVm, DriverError> {
        let Some(want_mib) = vm.config.disk_mib else {
            return Ok(owned);
        };
        let Some((key, current_mib)) = boot_disk(&owned.config) else {
            return Ok(owned);
        };
        if current_mib.is_some_and(|c| c >= want_mib) {
            return Ok(owned);
        }
        let upid: String = self.client()?.put(
            &format!("{}/resize", owned.path()),
            &[("disk", key), ("size", format!("{want_mib}M"))],
        )?;
        self.task(&owned.node, upid)?;
        self.require_owned(&vm.name)
    }
}

pub(super) fn has_cloudinit_drive(config: &BTreeMap<String, Value>) -> bool {
    config
        .values()
        .any(|v| value_text(v).contains(":cloudinit"))
}

/// Whether a config value already says what fleet would write.
pub(super) fn same_value(key: &str, current: Option<&str>, wanted: &str) -> bool {
    let Some(current) = current else {
        // PVE's default for `kvm` is on: writing it anyway would need VM.Config.HWType for
        // nothing (only `domainType: qemu` has to send it).
        return key == "kvm" && wanted == "1";
    };
    match key {
        "tags" => {
            let mut a: Vec<&str> = split_tags(current).collect();
            let mut b: Vec<&str> = split_tags(wanted).collect();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        }
        "agent" | "kvm" => {
            current
                .split(',')
                .next()
                .map(|v| v.trim_start_matches("enabled="))
                == Some(wanted)
        }
        "description" => current.trim_end() == wanted.trim_end(),
        _ => current == wanted,
    }
}

/// The boot disk's key and size in MiB (when its `size=` says).
pub(super) fn boot_disk(config: &BTreeMap<String, Value>) -> Option<(String, Option<u64>)> {
    BOOT_DISKS.iter().find_map(|key| {
        let value = value_text(config.get(*key)?);
        if value.contains("media=cdrom") {
            return None;
        }
        let size = value
            .split(',')
            .find_map(|p| p.strip_prefix("size="))
            .and_then(size_mib);
        Some(((*key).to_owned(), size))
    })
}

/// `32G`, `512M`, `1T`, `2048K` in MiB.
pub(super) fn size_mib(text: &str) -> Option<u64> {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let n: f64 = number.parse().ok()?;
    let mib = match unit {
        "K" => n / 1024.0,
        "M" => n,
        "G" | "" => n * 1024.0,
        "T" => n * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(mib.ceil() as u64)
}
