//! libvirt domain XML: rendered from a desired VM (with the ownership stamp in fleet's own
//! metadata namespace), and read back into an `ObservedVm`. Pure.

use std::fmt::Write;
use std::path::Path;

use quick_xml::escape::escape;

use crate::observe::{ObservedVm, Stamp};
use crate::resolve::DesiredVm;
use crate::spec::{DomainType, NetworkMode};

/// fleet's XML namespace for the stamp inside `<metadata>`.
pub const STAMP_NS: &str = "urn:fleet:stamp:1";
/// The element prefix libvirt uses for it.
pub const STAMP_PREFIX: &str = "fleet";

/// Files fleet makes for one VM.
#[derive(Clone, Debug)]
pub struct VmFiles<'a> {
    pub console_log: &'a Path,
    pub disk_overlay: Option<&'a Path>,
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    /// The NoCloud seed (an ISO labelled cidata), attached read-only.
    pub seed_iso: Option<&'a Path>,
    /// The libvirt network `network: full` VMs join (see `full_network`).
    pub full_network: &'a str,
    /// The storage pool of the fleet's workspaces, for the VM's mounts.
    pub workspace_pool: &'a str,
}

/// The volume a workspace is in its pool.
pub fn workspace_volume(workspace: &str) -> String {
    format!("{workspace}.qcow2")
}

/// The file of the NoCloud seed a definition attaches (the read-only `vdb` fleet renders).
pub fn seed_path(xml: &str) -> Option<std::path::PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let disk = doc.descendants().find(|n| {
        n.has_tag_name("disk")
            && n.children().any(|c| c.has_tag_name("readonly"))
            && n.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some("vdb"))
    })?;
    let file = disk
        .children()
        .find(|c| c.has_tag_name("source"))?
        .attribute("file")?;
    Some(std::path::PathBuf::from(file))
}

/// The libvirt networks a definition's interfaces join (`<interface type='network'>`).
pub fn joined_networks(xml: &str) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    doc.descendants()
        .filter(|n| n.has_tag_name("interface") && n.attribute("type") == Some("network"))
        .map(|n| {
            n.children()
                .find(|c| c.has_tag_name("source"))
                .and_then(|c| c.attribute("network"))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The stamp as an element: inside a domain definition (`in_definition`) prefixed and with
/// its namespace declared; for `virDomainSetMetadata`, bare, since libvirt puts its own
/// prefix (`STAMP_PREFIX`) on the element and every child (a prefixed element would come
/// out as `fleet:fleet:vm`, which is nobody's stamp).
pub fn stamp_element(stamp: &Stamp, in_definition: bool) -> String {
    let config = stamp
        .config
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("VmConfig is JSON"))
        .unwrap_or_default();
    let (ns, p) = if in_definition {
        (
            format!(" xmlns:{STAMP_PREFIX}=\"{STAMP_NS}\""),
            format!("{STAMP_PREFIX}:"),
        )
    } else {
        (String::new(), String::new())
    };
    let created = stamp
        .created
        .map(|t| format!("<{p}created>{t}</{p}created>"))
        .unwrap_or_default();
    let adopted = if stamp.adopted {
        format!("<{p}adopted>true</{p}adopted>")
    } else {
        String::new()
    };
    format!(
        "<{p}vm{ns}><{p}fleet>{}</{p}fleet><{p}name>{}</{p}name><{p}specHash>{}</{p}specHash><{p}revision>{}</{p}revision><{p}protect>{}</{p}protect>{created}{adopted}<{p}config>{}</{p}config></{p}vm>",
        escape(stamp.fleet.as_str()),
        escape(stamp.name.as_str()),
        escape(stamp.spec_hash.as_str()),
        escape(stamp.revision.as_str()),
        stamp.protect,
        escape(config.as_str()),
    )
}

/// The full domain definition.
pub fn render(vm: &DesiredVm, uuid: &uuid::Uuid, stamp: &Stamp, files: &VmFiles<'_>) -> String {
    let c = &vm.config;
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", c.domain_type.as_str());
    let _ = writeln!(x, "  <name>{}</name>", escape(vm.name.as_str()));
    let _ = writeln!(x, "  <uuid>{uuid}</uuid>");
    let _ = writeln!(
        x,
        "  <title>{}</title>",
        escape(format!("fleet {}: {}", stamp.fleet, vm.name).as_str())
    );
    let _ = writeln!(x, "  <metadata>{}</metadata>", stamp_element(stamp, true));
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", c.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", c.cpus);
    // Under TCG, every instruction set QEMU emulates: QEMU's default model lacks AVX2,
    // and programs built for today's CPUs (Claude Code's native binary) die of an illegal
    // instruction without it.
    if c.domain_type == DomainType::Qemu {
        x.push_str("  <cpu mode='maximum' check='none'/>\n");
    }
    x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
    if let Some(kernel) = files.kernel {
        let _ = writeln!(
            x,
            "    <kernel>{}</kernel>",
            escape(kernel.to_string_lossy().as_ref())
        );
        if let Some(initrd) = files.initrd {
            let _ = writeln!(
                x,
                "    <initrd>{}</initrd>",
                escape(initrd.to_string_lossy().as_ref())
            );
        }
        let mut cmdline = format!("console=ttyS0 fleet.vm={}", vm.name);
        if let Some(extra) = &c.image.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(cmdline.as_str()));
    } else {
        x.push_str("    <boot dev='hd'/>\n");
    }
    x.push_str("  </os>\n  <features><acpi/></features>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    if let Some(disk) = files.disk_overlay {
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            escape(disk.to_string_lossy().as_ref())
        );
    }
    // Workspaces after the VM's own disks (vdc onwards), each known in the guest by its
    // serial (`resolve::workspace_serial`), whatever name the guest gives it.
    for (i, mount) in c.workspaces.iter().enumerate() {
        let letter = char::from(b'c' + u8::try_from(i).unwrap_or(0).min(23));
        let _ = writeln!(
            x,
            "    <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{}' volume='{}'/><target dev='vd{letter}' bus='virtio'/><serial>{}</serial></disk>",
            escape(files.workspace_pool),
            escape(workspace_volume(&mount.name).as_str()),
            crate::resolve::workspace_serial(&mount.name)
        );
    }
    if let Some(seed) = files.seed_iso {
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/><readonly/></disk>",
            escape(seed.to_string_lossy().as_ref())
        );
    }
    match c.network {
        NetworkMode::Isolated | NetworkMode::Brokered => {}
        // Never QEMU's user networking: its gateway is the host's loopback.
        NetworkMode::Full => {
            let _ = writeln!(
                x,
                "    <interface type='network'><source network='{}'/><model type='virtio'/></interface>",
                escape(files.full_network)
            );
        }
    }
    let _ = writeln!(
        x,
        "    <serial type='pty'><log file='{}' append='off'/><target port='0'/></serial>",
        escape(files.console_log.to_string_lossy().as_ref())
    );
    x.push_str("    <console type='pty'><target type='serial' port='0'/></console>\n");
    // The agent link. No path: libvirt makes the socket in its own directory, where QEMU
    // (running as its own user) may create it; `agent_socket` reads it back (a local
    // host), or fleet opens the channel through libvirt (a remote one).
    let _ = writeln!(
        x,
        "    <channel type='unix'><source mode='bind'/><target type='virtio' name='{}'/></channel>",
        fleet_agent_protocol::PORT_NAME
    );
    x.push_str("    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// Why a domain's XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("unreadable domain XML: {0}")]
    Unreadable(#[from] roxmltree::Error),
    #[error("domain XML without <name>")]
    NoName,
}

/// Reads what fleet needs from a domain's XML (live XML for running domains).
pub fn parse(xml: &str) -> Result<ObservedVm, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let child_text = |parent: roxmltree::Node<'_, '_>, name: &str| {
        parent
            .children()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .map(str::trim)
            .map(str::to_owned)
    };
    let name = child_text(root, "name").ok_or(DomainXmlError::NoName)?;
    let uuid = child_text(root, "uuid").unwrap_or_default();
    // libvirt adds id='N' to active domains only.
    let running = root.attribute("id").is_some_and(|id| id != "-1");
    let cpus = child_text(root, "vcpu")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let memory_mib = root
        .children()
        .find(|n| n.has_tag_name("currentMemory"))
        .or_else(|| root.children().find(|n| n.has_tag_name("memory")))
        .map(|n| {
            let value: u64 = n.text().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
            to_mib(value, n.attribute("unit").unwrap_or("KiB"))
        })
        .unwrap_or(0);
    let stamp = root
        .children()
        .find(|n| n.has_tag_name("metadata"))
        .and_then(|m| m.children().find(|n| n.has_tag_name((STAMP_NS, "vm"))))
        .and_then(|s| parse_stamp(s));
    Ok(ObservedVm {
        name,
        uuid,
        running,
        cpus,
        memory_mib,
        stamp: stamp.map(std::sync::Arc::new),
    })
}

/// The XML that asks for a snapshot (internal: in the VM's own qcow2 overlay; with the
/// memory of a running VM).
pub fn snapshot_definition(name: &str, description: &str) -> String {
    format!(
        "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
        escape(name),
        escape(description)
    )
}

/// What `fleet snapshot list` shows of a snapshot's XML.
pub fn snapshot_info(xml: &str) -> Result<crate::driver::SnapshotInfo, crate::driver::DriverError> {
    let unreadable = |e: String| {
        crate::driver::DriverError::new(
            crate::driver::ErrorKind::Permanent,
            format!("unreadable snapshot XML: {e}"),
        )
    };
    let doc = roxmltree::Document::parse(xml).map_err(|e| unreadable(e.to_string()))?;
    let root = doc.root_element();
    let text = |name: &str| {
        root.children()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
    };
    Ok(crate::driver::SnapshotInfo {
        name: text("name").ok_or_else(|| unreadable("no <name>".into()))?,
        created: text("creationTime").and_then(|t| t.parse().ok()),
        description: text("description").unwrap_or_default(),
        // A snapshot of a running domain holds its memory ("running"); one of a stopped
        // domain, or disks alone, does not.
        with_memory: text("state").as_deref() == Some("running"),
    })
}

/// The host-side socket of the agent channel in a running domain's (live) XML.
pub fn agent_socket(xml: &str) -> Option<std::path::PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.descendants()
        .filter(|n| n.has_tag_name("channel"))
        .find(|ch| {
            ch.children().any(|t| {
                t.has_tag_name("target")
                    && t.attribute("name") == Some(fleet_agent_protocol::PORT_NAME)
            })
        })?
        .children()
        .find(|n| n.has_tag_name("source"))?
        .attribute("path")
        .map(std::path::PathBuf::from)
}

/// Reads a stamp element; `None` when required fields are missing (then it is no stamp).
fn parse_stamp(node: roxmltree::Node<'_, '_>) -> Option<Stamp> {
    let field = |name: &str| {
        node.children()
            .find(|n| n.has_tag_name((STAMP_NS, name)))
            .map(|n| n.text().unwrap_or("").to_owned())
    };
    Some(Stamp {
        fleet: field("fleet")?,
        name: field("name")?,
        spec_hash: field("specHash").unwrap_or_default(),
        revision: field("revision").unwrap_or_default(),
        protect: field("protect").is_some_and(|p| p == "true"),
        config: field("config").and_then(|c| serde_json::from_str(&c).ok()),
        created: field("created").and_then(|t| t.parse().ok()),
        adopted: field("adopted").is_some_and(|a| a == "true"),
    })
}

fn to_mib(value: u64, unit: &str) -> u64 {
    match unit {
        "b" | "bytes" => value / (1024 * 1024),
        "KiB" | "k" | "K" => value / 1024,
        "MiB" | "M" | "m" => value,
        "GiB" | "G" | "g" => value * 1024,
        "TiB" | "T" | "t" => value * 1024 * 1024,
        "KB" => value * 1000 / (1024 * 1024),
        "MB" => value * 1_000_000 / (1024 * 1024),
        "GB" => value * 1_000_000_000 / (1024 * 1024),
        _ => value / 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredVm {
        crate::resolve::example_vm("vm-1", |c| {
            c.image.kernel = Some("k".into());
            c.image.initrd = Some("i".into());
            c.image.cmdline = Some("quiet".into());
            c.cpus = 2;
            c.memory_mib = 768;
            c.runcmd = vec!["echo <&>".into()];
            c.protect = true;
        })
    }

    #[test]
    fn rendered_xml_reads_back_with_its_stamp() {
        let vm = desired();
        let stamp = Stamp {
            fleet: "lab".into(),
            name: vm.name.clone(),
            spec_hash: vm.spec_hash.clone(),
            revision: "abc".into(),
            protect: true,
            config: Some(vm.config.clone()),
            created: Some("2026-12-03T10:00:00Z".parse().expect("a time")),
            adopted: false,
        };
        let files = VmFiles {
            console_log: Path::new("/s/vm-1/console.log"),
            disk_overlay: None,
            kernel: Some(Path::new("/img/vmlinuz")),
            initrd: Some(Path::new("/img/initrd.img")),
            seed_iso: Some(Path::new("/s/vm-1/seed.iso")),
            full_network: "fleet-full",
            workspace_pool: "fleet-ws-test",
        };
        let uuid = uuid::Uuid::nil();
        let xml = render(&vm, &uuid, &stamp, &files);
        let observed = parse(&xml).expect("parses");
        assert_eq!(observed.name, "vm-1");
        assert!(!observed.running);
        assert_eq!((observed.cpus, observed.memory_mib), (2, 768));
        assert_eq!(observed.stamp.as_deref(), Some(&stamp));
        assert!(xml.contains("<cmdline>console=ttyS0 fleet.vm=vm-1 quiet</cmdline>"));
        // Under TCG the guest gets every instruction set QEMU emulates (AVX2 included).
        assert_eq!(vm.config.domain_type, DomainType::Qemu);
        assert!(xml.contains("<cpu mode='maximum' check='none'/>"), "{xml}");
        let mut kvm = desired();
        kvm.config.domain_type = DomainType::Kvm;
        assert!(!render(&kvm, &uuid, &stamp, &files).contains("<cpu "));
        // Where the VM's storage is, read back from its definition.
        assert_eq!(
            seed_path(&xml),
            Some(std::path::PathBuf::from("/s/vm-1/seed.iso"))
        );
        assert_eq!(seed_path("<domain/>"), None);
    }

    #[test]
    fn the_agent_socket_is_read_from_live_xml() {
        let xml = "<domain><devices><channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-1-a/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel><channel type='unix'><source mode='bind' path='/run/x/org.fleet.agent.0'/><target type='virtio' name='org.fleet.agent.0' state='connected'/></channel></devices></domain>";
        assert_eq!(
            agent_socket(xml),
            Some(std::path::PathBuf::from("/run/x/org.fleet.agent.0"))
        );
        assert_eq!(agent_socket("<domain/>"), None);
    }

    #[test]
    fn a_domain_without_stamp_is_foreign() {
        let xml = "<domain type='qemu' id='3'><name>x</name><uuid>u</uuid><memory unit='KiB'>262144</memory><vcpu>1</vcpu></domain>";
        let o = parse(xml).expect("parses");
        assert!(o.running && o.stamp.is_none());
        assert_eq!(o.memory_mib, 256);
    }

    #[test]
    fn a_stamp_in_another_namespace_is_not_fleets() {
        let xml = "<domain type='qemu'><name>x</name><metadata><f:vm xmlns:f='urn:other'><f:fleet>lab</f:fleet><f:name>x</f:name></f:vm></metadata></domain>";
        assert!(parse(xml).expect("parses").stamp.is_none());
    }
}
