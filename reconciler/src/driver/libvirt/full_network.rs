//! The network of `network: full` VMs: a libvirt NAT network, and a firewall table that
//! keeps its guests off the host itself.
//!
//! QEMU's user networking (slirp) maps the gateway to the host's 127.0.0.1, so every guest
//! could read fleet's page and any other loopback service; passt cannot be told otherwise by
//! Debian 12's libvirt. Here guests sit on a bridge with NAT to the outside, and an nftables
//! table (`inet fleet_guard`) rejects every packet that arrives from the bridge for the host
//! itself, whatever its destination address (the bridge's, another interface's, one added
//! later), except DHCP and DNS to the network's own dnsmasq. It is its own table on its own
//! input hook, so libvirt re-adding its iptables rules never reorders it away, and it is
//! applied before any full VM starts: no guard, no start.

use std::io::Write;
use std::process::Stdio;

use virt::connect::Connect;

use crate::driver::{DriverError, ErrorKind};
use crate::spec::FullNetwork;

pub const DEFAULT_NAME: &str = "fleet-full";
pub const DEFAULT_BRIDGE: &str = "virbr-fleet";
pub const DEFAULT_ADDRESS: &str = "192.168.150.1/24";
/// The nftables table, one per host (the rules name the bridge).
pub const GUARD_TABLE: &str = "fleet_guard";

/// The network as the host configuration says, with defaults filled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedNetwork {
    pub name: String,
    pub bridge: String,
    pub host_ip: std::net::Ipv4Addr,
    pub prefix: u8,
}

/// A `fullNetwork.address` that is not an IPv4 network fleet can hand out addresses in.
#[derive(Debug, thiserror::Error)]
#[error(
    "fullNetwork.address {address:?}: {problem}; write it as IPv4/PREFIX with a prefix from 8 to 30, such as {DEFAULT_ADDRESS}"
)]
pub struct BadAddress {
    address: String,
    problem: String,
}

impl GuardedNetwork {
    pub fn from_spec(spec: Option<&FullNetwork>) -> Result<GuardedNetwork, BadAddress> {
        let address = spec
            .and_then(|s| s.address.as_deref())
            .unwrap_or(DEFAULT_ADDRESS);
        let bad = |problem: String| BadAddress {
            address: address.to_owned(),
            problem,
        };
        let (ip, prefix) = address
            .split_once('/')
            .ok_or_else(|| bad("no /PREFIX".into()))?;
        let host_ip = ip.parse().map_err(|e| bad(format!("{e}")))?;
        let prefix: u8 = prefix.parse().map_err(|e| bad(format!("{e}")))?;
        // A narrower network has no address for a guest; a wider one is not a LAN.
        if !(8..=30).contains(&prefix) {
            return Err(bad(format!("prefix {prefix}")));
        }
        Ok(GuardedNetwork {
            name: spec
                .and_then(|s| s.name.clone())
                .unwrap_or_else(|| DEFAULT_NAME.to_owned()),
            bridge: spec
                .and_then(|s| s.bridge.clone())
                .unwrap_or_else(|| DEFAULT_BRIDGE.to_owned()),
            host_ip,
            prefix,
        })
    }

    fn netmask(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }

    /// DHCP hands out the subnet's addresses from the host's plus one to the last but one.
    fn dhcp_range(&self) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
        let mask = u32::from(self.netmask());
        let net = u32::from(self.host_ip) & mask;
        let broadcast = net | !mask;
        (
            std::net::Ipv4Addr::from(u32::from(self.host_ip) + 1),
            std::net::Ipv4Addr::from(broadcast - 1),
        )
    }

    /// The libvirt network: NAT forward, the guests isolated from each other, no IPv6.
    pub fn network_xml(&self) -> String {
        let (first, last) = self.dhcp_range();
        format!(
            "<network>\n  <name>{name}</name>\n  <forward mode='nat'/>\n  <bridge name='{bridge}' stp='off' delay='0'/>\n  <port isolated='yes'/>\n  <ip address='{ip}' netmask='{mask}'>\n    <dhcp><range start='{first}' end='{last}'/></dhcp>\n  </ip>\n</network>\n",
            name = self.name,
            bridge = self.bridge,
            ip = self.host_ip,
            mask = self.netmask(),
        )
    }

    /// The nftables ruleset, as one `nft -f` transaction that replaces the table.
    pub fn guard_ruleset(&self) -> String {
        format!(
            "table inet {GUARD_TABLE}\ndelete table inet {GUARD_TABLE}\ntable inet {GUARD_TABLE} {{\n  chain input {{\n    type filter hook input priority filter - 10; policy accept;\n    iifname \"{bridge}\" jump from_guests\n  }}\n  chain from_guests {{\n    meta nfproto ipv4 udp sport 68 udp dport 67 accept\n    ip daddr {ip} udp dport 53 accept\n    ip daddr {ip} tcp dport 53 accept\n    meta l4proto tcp counter reject with tcp reset\n    counter reject with icmpx type admin-prohibited\n  }}\n}}\n",
            bridge = self.bridge,
            ip = self.host_ip,
        )
    }

    /// Applies the guard, then makes sure the network is defined, running and started with
    /// libvirtd. A network of that name fleet did not define (another bridge) is refused.
    pub fn ensure(&self, conn: &Connect) -> Result<(), DriverError> {
        self.apply_guard()?;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DriverError::new(
                ErrorKind::Permanent,
                format!("network {} for network: full: {what}: {e}", self.name),
            )
        };
        let network = match conn.lookup_network_by_name(&self.name) {
            Ok(n) => {
                let bridge = n.bridge_name().map_err(|e| fail("read", &e))?;
                if bridge != self.bridge {
                    return Err(DriverError::new(
                        ErrorKind::Conflict,
                        format!(
                            "libvirt network {} exists on bridge {bridge}, not {}: it is not the guarded network fleet makes; name another in fullNetwork",
                            self.name, self.bridge
                        ),
                    ));
                }
                n
            }
            Err(_) => conn
                .define_network_xml(&self.network_xml())
                .map_err(|e| fail("define", &e))?,
        };
        if !network.is_active().map_err(|e| fail("state", &e))? {
            network.create().map_err(|e| fail("start", &e))?;
        }
        if !network.autostart().unwrap_or(true) {
            let _ = network.set_autostart(true);
        }
        Ok(())
    }

    /// Applies (or applies again: it does not survive a firewall reload on the host) the
    /// guard, replacing the table in one transaction.
    pub fn apply_guard(&self) -> Result<(), DriverError> {
        let refuse = |why: String| {
            DriverError::new(
                ErrorKind::Permanent,
                format!(
                    "cannot guard the host from network: full guests ({why}); no such VM is started without it"
                ),
            )
        };
        let mut child = crate::driver::host_command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| refuse(format!("run nft: {e}; install nftables")))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(self.guard_ruleset().as_bytes())
            .map_err(|e| refuse(format!("nft: {e}")))?;
        let output = child
            .wait_with_output()
            .map_err(|e| refuse(format!("nft: {e}")))?;
        if !output.status.success() {
            return Err(refuse(format!(
                "nft: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_make_a_nat_network_and_a_guard_on_its_bridge() {
        let net = GuardedNetwork::from_spec(None).expect("defaults");
        let xml = net.network_xml();
        assert!(xml.contains("<forward mode='nat'/>"), "{xml}");
        assert!(xml.contains("<bridge name='virbr-fleet'"), "{xml}");
        assert!(
            xml.contains("<range start='192.168.150.2' end='192.168.150.254'/>"),
            "{xml}"
        );
        let rules = net.guard_ruleset();
        assert!(
            rules.contains("iifname \"virbr-fleet\" jump from_guests"),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr 192.168.150.1 udp dport 53 accept"),
            "{rules}"
        );
        assert!(
            rules.contains("reject with icmpx type admin-prohibited"),
            "{rules}"
        );
    }

    #[test]
    /// The host schema allows prefixes 16 to 29 only; the driver does not rely on it.
    fn an_address_without_room_for_guests_is_refused_not_a_panic() {
        for address in [
            "10.0.0.1/0",
            "10.0.0.1/31",
            "10.0.0.1/33",
            "10.0.0.1",
            "x/24",
        ] {
            let spec = FullNetwork {
                name: None,
                bridge: None,
                address: Some(address.into()),
            };
            let why = GuardedNetwork::from_spec(Some(&spec))
                .expect_err(address)
                .to_string();
            assert!(why.contains("IPv4/PREFIX"), "{why}");
        }
    }
}
