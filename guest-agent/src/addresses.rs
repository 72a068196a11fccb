//! The guest's network interfaces and addresses (`GuestMessage::Addresses`), read with
//! `getifaddrs`: loopback left out, sorted, so two reads compare equal when nothing changed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fleet_agent_protocol::Interface;
use nix::net::if_::InterfaceFlags;

/// The interfaces now, by name.
pub fn read() -> Vec<Interface> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut interfaces: BTreeMap<String, Interface> = BTreeMap::new();
    for entry in all {
        if entry.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
            continue;
        }
        let interface = interfaces
            .entry(entry.interface_name.clone())
            .or_insert_with(|| Interface {
                name: entry.interface_name.clone(),
                mac: None,
                addresses: Vec::new(),
            });
        let Some(address) = entry.address else {
            continue;
        };
        if let Some(link) = address.as_link_addr() {
            if let Some(mac) = link.addr().filter(|m| m.iter().any(|b| *b != 0)) {
                interface.mac = Some(
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
            continue;
        }
        let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        let prefix =
            entry.netmask.and_then(
                |mask| match (mask.as_sockaddr_in(), mask.as_sockaddr_in6()) {
                    (Some(m), _) => Some(u32::from(m.ip()).count_ones()),
                    (_, Some(m)) => Some(u128::from(m.ip()).count_ones()),
                    _ => None,
                },
            );
        interface.addresses.push(match prefix {
            Some(p) => format!("{ip}/{p}"),
            None => ip.to_string(),
        });
    }
    let mut interfaces: Vec<Interface> = interfaces.into_values().collect();
    for interface in &mut interfaces {
        interface.addresses.sort();
    }
    interfaces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_left_out_and_reads_are_stable() {
        let first = read();
        assert!(first.iter().all(|i| i.name != "lo"), "{first:?}");
        assert!(
            first
                .iter()
                .flat_map(|i| &i.addresses)
                .all(|a| !a.starts_with("127.")),
            "{first:?}"
        );
        assert_eq!(read(), first);
    }
}
