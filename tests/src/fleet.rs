//! A fleet test bed (`tests/fleet.rs`): the namespace test bed of `xtask::testbed` with two
//! balancers, each running `lb` and BIRD 2 with the shipped `packaging/bird/balancer.conf`,
//! and a router namespace running BIRD with the shipped `packaging/bird/router.conf` and
//! kernel ECMP hashing the 5-tuple. The client reaches the VIPs through the router only:
//!
//! ```text
//! client 10.98.0.2 ── 10.98.0.1 router 10.99.0.254 ──┐ bridge 10.99.0.0/24
//!                                  lb 10.99.0.2 ─────┤  (BGP + BFD to the router)
//!                                  lb2 10.99.0.3 ────┤
//!                  backends 10.99.0.11, .12 ─────────┘  (answer the client via the router)
//! ```
//!
//! Every helper panics with the full error: these are test helpers.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::testbed::{Agent, Config, HTTP_PORT, Host, Proc, Testbed, VIP4, run_ok};

use crate::e2e::lb_at;

/// The agents' `[fleet] route_table`, as in the shipped BIRD config.
pub const ROUTE_TABLE: u32 = 100;
pub const ROUTER_LAN: &str = "10.99.0.254";
const CLIENT_SIDE: &str = "10.98.0.1";
const CLIENT_ADDR: &str = "10.98.0.2";
/// A second VIP address, for "this VIP only".
pub const VIP4B: &str = "10.99.1.2";

/// The shipped configurations: the test runs them, with only addresses and logging
/// changed.
const BALANCER_CONF: &str = include_str!("../../packaging/bird/balancer.conf");
const ROUTER_CONF: &str = include_str!("../../packaging/bird/router.conf");

pub fn vip_a() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT)
}

pub fn vip_b() -> SocketAddr {
    SocketAddr::new(VIP4B.parse().unwrap(), HTTP_PORT)
}

/// One balancer: its host, agent and BIRD.
pub struct Balancer {
    pub agent: Option<Agent>,
    pub bird: Proc,
    pub host: Host,
    pub config: PathBuf,
    pub socket: PathBuf,
}

/// Removes the router namespace, which the test bed does not know of.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Fields drop in order: agents and daemons stop before the namespaces go.
pub struct FleetBed {
    pub balancers: Vec<Balancer>,
    pub router_bird: Proc,
    pub servers: Vec<Proc>,
    /// The router's namespace.
    pub router: String,
    _router_ns: NetnsGuard,
    pub bed: Testbed,
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

impl FleetBed {
    /// Two balancers announcing VIP A (10.99.1.1:80, Maglev) and VIP B (10.99.1.2:80,
    /// round robin), both over both backends (added in different orders on the two
    /// balancers); waits until the router has both next hops for both.
    pub fn new() -> FleetBed {
        let mut bed = ok(Testbed::new(Config { backends: 2 }));
        let lb2 = ok(bed.add_balancer());
        let servers = ok(bed.start_backends());
        let router = format!("{}-rt", bed.prefix);
        let router_ns = NetnsGuard(router.clone());
        ok(build_router(&bed, &router));
        let conf = bed.dir().join("bird-router.conf");
        ok(std::fs::write(&conf, router_conf()).map_err(Into::into));
        let router_bird = ok(bird(&bed, &router, &conf, "router"));
        let mut fleet = FleetBed {
            balancers: Vec::new(),
            router_bird,
            servers,
            router,
            _router_ns: router_ns,
            bed,
        };
        let lb1 = fleet.bed.lb.clone();
        for (n, host) in [lb1, lb2].into_iter().enumerate() {
            let b = fleet.start_balancer(n, host);
            fleet.balancers.push(b);
        }
        fleet.wait_next_hops(vip_a().ip(), 2);
        fleet.wait_next_hops(vip_b().ip(), 2);
        fleet
    }

    fn start_balancer(&self, n: usize, host: Host) -> Balancer {
        let bed = &self.bed;
        let config = bed.dir().join(format!("lb{}.toml", n + 1));
        // The second balancer lists the backends the other way round.
        let mut backends = bed.backends.iter().map(|b| b.ipv4).collect::<Vec<_>>();
        if n == 1 {
            backends.reverse();
        }
        let backend_lines: String = backends
            .iter()
            .map(|b| format!("[[vip.backend]]\naddress = \"{b}\"\n"))
            .collect();
        let text = format!(
            "[fleet]\nroute_table = {ROUTE_TABLE}\n\n\
             [[vip]]\naddress = \"{}\"\nalgo = \"maglev\"\n{backend_lines}\n\
             [[vip]]\naddress = \"{}\"\n{backend_lines}",
            vip_a(),
            vip_b()
        );
        ok(std::fs::write(&config, text).map_err(Into::into));
        let socket = bed.dir().join(format!("lb{}.sock", n + 1));
        let agent = ok(bed.start_agent_on(&host, &config, &socket, &[]));
        let conf = bed.dir().join(format!("bird-lb{}.conf", n + 1));
        ok(std::fs::write(&conf, balancer_conf(&host)).map_err(Into::into));
        let bird = ok(bird(bed, &host.ns, &conf, &format!("lb{}", n + 1)));
        Balancer {
            agent: Some(agent),
            bird,
            host,
            config,
            socket,
        }
    }

    /// `lb ARGS` against balancer `n` (0-based).
    pub fn lb(&self, n: usize, args: &[&str]) -> String {
        lb_at(&self.bed, &self.balancers[n].socket, args)
    }

    /// `lb fleet status --json` of balancer `n`.
    pub fn fleet_status(&self, n: usize) -> Value {
        let out = self.lb(n, &["fleet", "status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Whether balancer `n` says it announces `addr`, and why not if it does not.
    pub fn announced(&self, n: usize, addr: IpAddr) -> (bool, Option<String>) {
        let status = self.fleet_status(n);
        let entry = status["addresses"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| e["address"].as_str() == Some(&addr.to_string()))
            })
            .unwrap_or_else(|| panic!("{addr} not in `lb fleet status`: {status}"));
        (
            entry["announced"].as_bool().unwrap_or(false),
            entry["why_not"].as_str().map(String::from),
        )
    }

    /// The next hops of the router's route to `addr` (empty: no route).
    pub fn next_hops(&self, addr: IpAddr) -> Vec<IpAddr> {
        let out = ok(self.bed.run_in_ok(
            &self.router,
            "ip",
            ["-j", "route", "show", &format!("{addr}/32")],
        ));
        let routes: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let mut hops: Vec<IpAddr> = Vec::new();
        for r in routes.as_array().into_iter().flatten() {
            if let Some(gw) = r["gateway"].as_str() {
                hops.push(gw.parse().unwrap());
            }
            for nh in r["nexthops"].as_array().into_iter().flatten() {
                if let Some(gw) = nh["gateway"].as_str() {
                    hops.push(gw.parse().unwrap());
                }
            }
        }
        hops.sort();
        hops
    }

    /// Waits (at most 15 s) until the router's route to `addr` has `count` next hops;
    /// returns how long that took.
    pub fn wait_next_hops(&self, addr: IpAddr, count: usize) -> Duration {
        let start = Instant::now();
        loop {
            let hops = self.next_hops(addr);
            if hops.len() == count {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the router's route to {addr} has next hops {hops:?}, not {count}, after 15 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address of balancer `n` on the segment.
    pub fn addr(&self, n: usize) -> IpAddr {
        self.balancers[n].host.ipv4.into()
    }

    /// New flows balancer `n` counted for `vip`.
    pub fn new_flows(&self, n: usize, vip: SocketAddr) -> u64 {
        let out = self.lb(n, &["vip", "list", "--json"]);
        let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        list.as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vip"].as_str() == Some(&vip.to_string()))
            .and_then(|v| v["new_flows"].as_u64())
            .unwrap_or_else(|| panic!("no {vip} in `lb vip list --json`: {out}"))
    }

    /// The host routes in balancer `n`'s fleet table.
    pub fn table_routes(&self, n: usize) -> String {
        ok(self.bed.run_in_ok(
            &self.balancers[n].host.ns,
            "ip",
            ["route", "show", "table", &ROUTE_TABLE.to_string()],
        ))
    }

    /// Starts balancer `n`'s agent again (after it was killed or stopped).
    pub fn restart_agent(&mut self, n: usize) {
        let b = &self.balancers[n];
        let agent = ok(self.bed.start_agent_on(&b.host, &b.config, &b.socket, &[]));
        self.balancers[n].agent = Some(agent);
    }

    pub fn agent(&mut self, n: usize) -> &mut Agent {
        self.balancers[n]
            .agent
            .as_mut()
            .expect("the agent is running")
    }

    /// Agent and BIRD logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("router BIRD:\n{}\n", tail(&self.router_bird.log()));
        for (i, b) in self.balancers.iter().enumerate() {
            out += &format!("lb{} BIRD:\n{}\n", i + 1, tail(&b.bird.log()));
            if let Some(a) = &b.agent {
                out += &format!("lb{} agent:\n{}\n", i + 1, tail(&a.proc.log()));
            }
        }
        out
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(3000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// The router namespace: on the bridge as 10.99.0.254, and the client's only way to the
/// VIPs, over a link of its own (10.98.0.0/24).
fn build_router(bed: &Testbed, router: &str) -> anyhow::Result<()> {
    run_ok(std::process::Command::new("ip").args(["netns", "add", router]))?;
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
fn balancer_conf(host: &Host) -> String {
    let conf = BALANCER_CONF
        .replace("log syslog all;", "log stderr all;")
        .replace("router id 10.99.0.2;", &format!("router id {};", host.ipv4))
        .replace("local 10.99.0.2 as", &format!("local {} as", host.ipv4))
        .replace("fd00:99::2", &host.ipv6.to_string());
    assert!(conf.contains(&format!("kernel table {ROUTE_TABLE};")));
    conf
}

/// The shipped router config: its two balancers are the test bed's.
fn router_conf() -> String {
    let conf = ROUTER_CONF.replace("log syslog all;", "log stderr all;");
    assert!(conf.contains("neighbor 10.99.0.2 as") && conf.contains("neighbor 10.99.0.3 as"));
    conf
}

/// BIRD in the foreground in `ns`, its control socket beside its config.
fn bird(bed: &Testbed, ns: &str, conf: &std::path::Path, name: &str) -> anyhow::Result<Proc> {
    if xtask::testbed::find_in_path("bird").is_none() {
        anyhow::bail!("bird (BIRD 2) is not installed: run ./x.sh setup, or apt install bird2");
    }
    let ctl = bed.dir().join(format!("bird-{name}.ctl"));
    let conf = conf.to_string_lossy().into_owned();
    let ctl = ctl.to_string_lossy().into_owned();
    bed.spawn_in(ns, "bird", ["-f", "-c", &conf, "-s", &ctl])
}
