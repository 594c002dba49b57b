//! The fleet test bed's pieces, shared by `tests/src/fleet.rs` and `cargo xtask demo
//! --fleet`: a router namespace in front of the test bed's balancers, and BIRD 2 on each
//! with the shipped configs (`packaging/bird/`), changed only in addresses and logging.
//!
//! ```text
//! client 10.98.0.2 ── 10.98.0.1 router 10.99.0.254 ──┐ bridge 10.99.0.0/24
//!                                  lb 10.99.0.2 ─────┤  (BGP + BFD to the router)
//!                                  lb2 10.99.0.3 ────┤
//!                                  lb3 10.99.0.4 ────┤  (the tests run three, the demo two)
//!                  backends 10.99.0.11, .12 ─────────┘  (answer the client via the router)
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::testbed::{HTTP_PORT, Host, Proc, Testbed, VIP4, run_ok};

/// The agents' `[fleet] route_table`, as in the shipped BIRD config.
pub const ROUTE_TABLE: u32 = 100;
pub const ROUTER_LAN: &str = "10.99.0.254";
const CLIENT_SIDE: &str = "10.98.0.1";
const CLIENT_ADDR: &str = "10.98.0.2";
/// A second VIP address, for "this VIP only".
pub const VIP4B: &str = "10.99.1.2";

const BALANCER_CONF: &str = include_str!("../../packaging/bird/balancer.conf");
const ROUTER_CONF: &str = include_str!("../../packaging/bird/router.conf");
const FRR_CONF: &str = include_str!("../../packaging/frr/frr.conf");
/// Where Debian's frr package puts the daemons.
const FRR_DAEMONS: &str = "/usr/lib/frr";

/// VIP A: 10.99.1.1:80 (Maglev in the fleet configs).
pub fn vip_a() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT)
}

/// VIP B: 10.99.1.2:80 (round robin).
pub fn vip_b() -> SocketAddr {
    SocketAddr::new(VIP4B.parse().expect("an address"), HTTP_PORT)
}

/// The agent's configuration for balancer `n` (0-based): `[fleet] route_table`, VIP A
/// (Maglev) and VIP B (round robin) over `backends`, listed the other way round on the
/// second balancer (Maglev must not care).
pub fn agent_config(n: usize, backends: &[Host]) -> String {
    let mut addrs: Vec<_> = backends.iter().map(|b| b.ipv4).collect();
    if n == 1 {
        addrs.reverse();
    }
    let backend_lines: String = addrs
        .iter()
        .map(|b| format!("[[vip.backend]]\naddress = \"{b}\"\n"))
        .collect();
    format!(
        "[fleet]\nroute_table = {ROUTE_TABLE}\n\n\
         [[vip]]\naddress = \"{}\"\nalgo = \"maglev\"\n{backend_lines}\n\
         [[vip]]\naddress = \"{}\"\n{backend_lines}",
        vip_a(),
        vip_b()
    )
}

/// The port balancers share flows on (`[flow_sync]`).
pub const SYNC_PORT: u16 = 7946;

/// A `[flow_sync]` section for balancer `me` sharing with `peers`, under the key in
/// `key_file`.
pub fn flow_sync_config(me: &Host, peers: &[&Host], key_file: &Path) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"{}:{SYNC_PORT}\"", p.ipv4))
        .collect();
    format!(
        "\n[flow_sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{}]\nkey_file = \"{}\"\n",
        me.ipv4,
        peers.join(", "),
        key_file.display()
    )
}

/// Removes a namespace the test bed does not know of when dropped.
pub struct NetnsGuard(pub String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The router namespace: on the bridge as 10.99.0.254, and the client's only way to the
/// VIPs, over a link of its own (10.98.0.0/24).
pub fn build_router(bed: &Testbed, router: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "add", router]))?;
    let sw = bed.switch.as_str();
    let client = bed.client.ns.as_str();
    bed.ip(router, &["link", "set", "lo", "up"])?;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        // The 5-tuple, as `fib_multipath_hash_policy=1` on a real router. Not policy 1
        // itself: it reuses a hash already on the packet, and here packets come over veths
        // straight from the client's sockets, carrying the socket's hash, which TCP changes
        // (its closing RST, say, could take the other next hop). Policy 3 with these fields
        // hashes the headers only.
        ("net.ipv4.fib_multipath_hash_policy", "3"),
        ("net.ipv4.fib_multipath_hash_fields", "0x0037"),
    ] {
        bed.run_in_ok(router, "sysctl", ["-qw", &format!("{key}={value}")])?;
    }
    bed.ip(
        sw,
        &[
            "link", "add", "p-rt", "type", "veth", "peer", "name", "eth0", "netns", router,
        ],
    )?;
    bed.ip(sw, &["link", "set", "p-rt", "master", "br0", "up"])?;
    bed.ip(
        router,
        &["addr", "add", &format!("{ROUTER_LAN}/24"), "dev", "eth0"],
    )?;
    bed.ip(router, &["link", "set", "eth0", "up"])?;
    bed.ip(
        router,
        &[
            "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", client,
        ],
    )?;
    bed.ip(
        router,
        &["addr", "add", &format!("{CLIENT_SIDE}/24"), "dev", "eth1"],
    )?;
    bed.ip(router, &["link", "set", "eth1", "up"])?;
    bed.ip(
        client,
        &["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth1"],
    )?;
    bed.ip(client, &["link", "set", "eth1", "up"])?;
    // Full checksums from the client (see the test bed notes), forwarded as they are.
    bed.run_in_ok(client, "ethtool", ["-K", "eth1", "tx", "off"])?;
    bed.run_in_ok(router, "ethtool", ["-K", "eth0", "tx", "off"])?;
    for vip in [VIP4.to_string(), VIP4B.to_string()] {
        bed.ip(
            client,
            &["route", "replace", &format!("{vip}/32"), "via", CLIENT_SIDE],
        )?;
    }
    for b in &bed.backends {
        bed.ip(&b.ns, &["addr", "add", &format!("{VIP4B}/32"), "dev", "lo"])?;
        bed.ip(&b.ns, &["route", "add", "10.98.0.0/24", "via", ROUTER_LAN])?;
    }
    Ok(())
}

/// The shipped balancer config for `host`.
pub fn balancer_conf(host: &Host) -> String {
    let conf = BALANCER_CONF
        .replace("log syslog all;", "log stderr all;")
        .replace("router id 10.99.0.2;", &format!("router id {};", host.ipv4))
        .replace("local 10.99.0.2 as", &format!("local {} as", host.ipv4))
        .replace("fd00:99::2", &host.ipv6.to_string());
    assert!(conf.contains(&format!("kernel table {ROUTE_TABLE};")));
    conf
}

/// The shipped router config: its three balancers are the test bed's (lb, lb2, lb3).
pub fn router_conf() -> String {
    let conf = ROUTER_CONF.replace("log syslog all;", "log stderr all;");
    for lb in ["10.99.0.2", "10.99.0.3", "10.99.0.4"] {
        assert!(
            conf.contains(&format!("neighbor {lb} as")),
            "packaging/bird/router.conf has no neighbor {lb}"
        );
    }
    conf
}

/// The shipped FRR config for `host`.
pub fn frr_conf(host: &Host) -> String {
    let conf = FRR_CONF.replace(
        "bgp router-id 10.99.0.2",
        &format!("bgp router-id {}", host.ipv4),
    );
    assert!(conf.contains(&format!("ip import-table {ROUTE_TABLE}\n")));
    assert!(conf.contains(&format!("neighbor {ROUTER_LAN} remote-as")));
    assert!(conf.contains(&format!(" peer {ROUTER_LAN}\n")));
    conf
}

/// FRR in the foreground in `ns`: zebra, bfdd and bgpd, each reading the shipped config
/// for `host`, with the config, sockets and pid files in a directory of their own under
/// the test bed's (FRR's daemons drop root for the `frr` user, which must reach it).
pub fn frr(bed: &Testbed, ns: &str, host: &Host, name: &str) -> Result<Vec<Proc>> {
    use std::os::unix::fs::PermissionsExt as _;
    if !Path::new(FRR_DAEMONS).join("bgpd").is_file() {
        bail!("FRR is not installed: run ./x.sh setup, or apt install frr");
    }
    let dir = bed.dir().join(format!("frr-{name}"));
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))
    };
    // Others may pass through the test bed's directory, not list it.
    mode(bed.dir(), 0o711)?;
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    mode(&dir, 0o777)?;
    let conf = dir.join("frr.conf");
    std::fs::write(&conf, frr_conf(host)).with_context(|| format!("writing {}", conf.display()))?;
    mode(&conf, 0o644)?;
    let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
    let zserv = dir.join("zserv.api");
    let mut procs = Vec::new();
    for daemon in ["zebra", "bfdd", "bgpd"] {
        let mut args = vec![
            "-f".to_string(),
            path("frr.conf"),
            "-i".into(),
            path(&format!("{daemon}.pid")),
            "-z".into(),
            path("zserv.api"),
            "--vty_socket".into(),
            path(""),
            "-u".into(),
            "frr".into(),
            "-g".into(),
            "frr".into(),
            "--log".into(),
            "stdout".into(),
        ];
        if daemon == "bfdd" {
            args.extend(["--bfdctl".into(), path("bfdd.sock")]);
        }
        let mut proc = bed.spawn_in(ns, Path::new(FRR_DAEMONS).join(daemon), &args)?;
        if daemon == "zebra" {
            // bfdd and bgpd connect to zebra's socket at start.
            crate::testbed::wait_until(std::time::Duration::from_secs(10), || {
                if let Some(status) = proc.try_wait() {
                    bail!("zebra exited with {status}:\n{}", proc.log());
                }
                Ok(zserv.exists())
            })
            .context("waiting for zebra's socket")?;
        }
        procs.push(proc);
    }
    Ok(procs)
}

/// BIRD in the foreground in `ns`, its control socket beside its config.
pub fn bird(bed: &Testbed, ns: &str, conf: &Path, name: &str) -> Result<Proc> {
    if crate::testbed::find_in_path("bird").is_none() {
        bail!("bird (BIRD 2) is not installed: run ./x.sh setup, or apt install bird2");
    }
    let ctl = bed.dir().join(format!("bird-{name}.ctl"));
    let conf = conf.to_string_lossy().into_owned();
    let ctl = ctl.to_string_lossy().into_owned();
    bed.spawn_in(ns, "bird", ["-f", "-c", &conf, "-s", &ctl])
}

/// The next hops of the router's route to `addr`, sorted (empty: no route).
pub fn next_hops(bed: &Testbed, router: &str, addr: IpAddr) -> Result<Vec<IpAddr>> {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    let out = bed.run_in_ok(
        router,
        "ip",
        ["-j", "route", "show", &format!("{addr}/{len}")],
    )?;
    let routes: serde_json::Value = serde_json::from_str(&out)?;
    let mut hops: Vec<IpAddr> = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        let gateways = std::iter::once(&r["gateway"]).chain(
            r["nexthops"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| &n["gateway"]),
        );
        for gw in gateways.filter_map(|g| g.as_str()) {
            hops.push(gw.parse()?);
        }
    }
    hops.sort();
    Ok(hops)
}
