//! Backends behind routers, for tunnel and gue VIPs: two routers and backends each in a
//! subnet of its own, so the balancer reaches them only through a gateway and their
//! answers go back to the client without passing the balancer.
//!
//! ```text
//! client, lb ─ bridge (10.99.0.0/24) ─ r1 (.254) ─ 10.98.0.0/30 ─ r2 ─┬─ 10.101.1.0/24 ─ rb1 (.2)
//!                                                                      └─ 10.101.2.0/24 ─ rb2 (.2)
//! ```
//!
//! IPv6 alike: fd00:98::/64 between the routers, fd00:101:N::/64 for backend N. The
//! balancer routes 10.101.0.0/16 (fd00:101::/32) via r1; r2's default route is r1, which
//! is on the client's segment. The backends hold the VIPs on loopback.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};

use super::{HOST_IF, Host, Testbed};

/// The routers' link and the routed backends' subnets.
const R1_LINK4: &str = "10.98.0.1";
const R2_LINK4: &str = "10.98.0.2";
const R1_LINK6: &str = "fd00:98::1";
const R2_LINK6: &str = "fd00:98::2";
const ROUTED4: &str = "10.101.0.0/16";
const ROUTED6: &str = "fd00:101::/32";

impl Testbed {
    /// Adds the routers and `n` (1..=9) routed backends `rb1..`; returns the backends
    /// (their `switch_port` is their link's end on r2). Nothing serves on them yet.
    pub fn add_routed_backends(&mut self, n: usize) -> Result<Vec<Host>> {
        anyhow::ensure!((1..=9).contains(&n), "1 to 9 routed backends, not {n}");
        self.build_routed(n)
            .with_context(|| format!("adding routed backends to {}", self.prefix))
    }

    fn build_routed(&mut self, n: usize) -> Result<Vec<Host>> {
        let r1 = Host::new(&self.prefix, "r1", 254);
        self.add_host(&r1)?;
        let r2 = format!("{}-r2", self.prefix);
        self.add_netns(&r2)?;
        for ns in [r1.ns.as_str(), r2.as_str()] {
            self.sysctl(ns, "net.ipv4.ip_forward", "1")?;
            self.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")?;
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
            self.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")?;
        }
        self.ip(
            &r1.ns,
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "down0", "netns", &r2,
            ],
        )?;
        for (ns, ifname, a4, a6) in [
            (r1.ns.as_str(), "up0", R1_LINK4, R1_LINK6),
            (r2.as_str(), "down0", R2_LINK4, R2_LINK6),
        ] {
            self.address(ns, ifname, (a4, 30), a6)?;
        }
        self.ip(&r1.ns, &["route", "add", ROUTED4, "via", R2_LINK4])?;
        self.ip(&r1.ns, &["-6", "route", "add", ROUTED6, "via", R2_LINK6])?;
        self.ip(&r2, &["route", "add", "default", "via", R1_LINK4])?;
        self.ip(&r2, &["-6", "route", "add", "default", "via", R1_LINK6])?;
        let lb = self.lb.ns.clone();
        self.ip(&lb, &["route", "add", ROUTED4, "via", &r1.ipv4.to_string()])?;
        self.ip(
            &lb,
            &["-6", "route", "add", ROUTED6, "via", &r1.ipv6.to_string()],
        )?;

        let mut backends = Vec::new();
        for i in 1..=n as u8 {
            let b = Host {
                ns: format!("{}-rb{i}", self.prefix),
                ifname: HOST_IF.into(),
                switch_port: format!("rb{i}"),
                ipv4: Ipv4Addr::new(10, 101, i, 2),
                ipv6: Ipv6Addr::new(0xfd00, 0x101, i as u16, 0, 0, 0, 0, 2),
            };
            let (gw4, gw6) = (
                Ipv4Addr::new(10, 101, i, 1),
                Ipv6Addr::new(0xfd00, 0x101, i as u16, 0, 0, 0, 0, 1),
            );
            self.add_netns(&b.ns)?;
            self.sysctl(&b.ns, "net.ipv6.conf.all.accept_dad", "0")?;
            self.sysctl(&b.ns, "net.ipv6.conf.default.accept_dad", "0")?;
            self.sysctl(&b.ns, "net.ipv6.bindv6only", "0")?;
            self.ip(
                &r2,
                &[
                    "link",
                    "add",
                    &b.switch_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &b.ifname,
                    "netns",
                    &b.ns,
                ],
            )?;
            for (ns, ifname, a4, a6) in [
                (r2.as_str(), b.switch_port.as_str(), gw4, gw6),
                (b.ns.as_str(), b.ifname.as_str(), b.ipv4, b.ipv6),
            ] {
                self.address(ns, ifname, (a4, 24), a6)?;
            }
            self.ip(&b.ns, &["route", "add", "default", "via", &gw4.to_string()])?;
            self.ip(
                &b.ns,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
            )?;
            self.hold_vips(&b.ns)?;
            backends.push(b);
        }
        Ok(backends)
    }
}
