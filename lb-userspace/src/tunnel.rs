//! The balancer's end of the tunnels of tunnel and gue VIPs: the outer source addresses
//! and the GUE port (`[tunnel]` in the configuration file), as the data plane's `TUNNEL`
//! map holds them. A source not configured is the attached interface's own address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use lb_common::{DEFAULT_GUE_PORT, TunnelConfig};
use serde::{Deserialize, Serialize};

/// `[tunnel]`: read at start (a change needs a restart, which is hitless).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSettings {
    /// Outer source of IPv4 tunnels; default: the first attached interface's IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source of IPv6 tunnels; default: that interface's global IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v6: Option<Ipv6Addr>,
    /// The UDP port gue VIPs send to (and `lb decap --gue-port` listens on); default 6080.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

impl TunnelSettings {
    pub fn validate(&self) -> Result<()> {
        if self.gue_port == Some(0) {
            bail!("tunnel gue_port 0: give a UDP port (default {DEFAULT_GUE_PORT})");
        }
        for source in [
            self.source_v4.map(IpAddr::V4),
            self.source_v6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        {
            crate::model::check_unicast(source, "tunnel source")?;
        }
        Ok(())
    }

    /// The data plane's entry: configured sources, else the first usable address of each
    /// family among `iface_addrs` (the attached interface's, in the kernel's order).
    pub fn entry(&self, iface_addrs: &[IpAddr]) -> TunnelConfig {
        let v4 = self.source_v4.or_else(|| {
            iface_addrs.iter().find_map(|a| match a {
                IpAddr::V4(a) if !a.is_loopback() && !a.is_link_local() => Some(*a),
                _ => None,
            })
        });
        let v6 = self.source_v6.or_else(|| {
            iface_addrs.iter().find_map(|a| match a {
                IpAddr::V6(a) if !a.is_loopback() && !a.is_unicast_link_local() => Some(*a),
                _ => None,
            })
        });
        TunnelConfig {
            src_v4: v4.map_or(0, |a| lb_common::addr_to_map(IpAddr::V4(a)).0[0]),
            src_v6: v6.map_or([0; 4], |a| lb_common::addr_to_map(IpAddr::V6(a)).0),
            gue_port: self.gue_port.unwrap_or(DEFAULT_GUE_PORT).to_be(),
            _pad: [0; 2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_sources_win_and_the_interface_fills_the_rest() {
        let iface: Vec<IpAddr> = ["fe80::1", "10.0.0.2", "2001:db8::2", "10.0.0.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let e = TunnelSettings::default().entry(&iface);
        assert_eq!(e.src_v4, u32::from_ne_bytes([10, 0, 0, 2]));
        assert_eq!(
            bytemuck::cast::<_, [u8; 16]>(e.src_v6),
            "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(u16::from_be(e.gue_port), DEFAULT_GUE_PORT);
        let set = TunnelSettings {
            source_v4: Some("192.0.2.9".parse().unwrap()),
            source_v6: None,
            gue_port: Some(9999),
        };
        let e = set.entry(&[]);
        assert_eq!(e.src_v4, u32::from_ne_bytes([192, 0, 2, 9]));
        assert_eq!(e.src_v6, [0; 4], "no IPv6 source: none");
        assert_eq!(e.gue_port, 9999u16.to_be());
        assert!(
            TunnelSettings {
                gue_port: Some(0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
