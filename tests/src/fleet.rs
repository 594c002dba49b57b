//! A fleet test bed (`tests/fleet.rs`): the namespace test bed of `xtask::testbed` with two
//! balancers, each running `lb` and BIRD 2 with the shipped `packaging/bird/balancer.conf`,
//! and a router namespace running BIRD with the shipped `packaging/bird/router.conf` and
//! kernel ECMP hashing the 5-tuple; the client reaches the VIPs through the router only
//! (the pieces and a picture: `xtask::fleet`).
//!
//! Every helper panics with the full error: these are test helpers.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
pub use xtask::fleet::{ROUTE_TABLE, VIP4B, vip_a, vip_b};
use xtask::{
    fleet::{NetnsGuard, agent_config, balancer_conf, bird, build_router, router_conf},
    testbed::{Agent, Config, Host, Proc, Testbed},
};

use crate::e2e::lb_at;

/// One balancer: its host, agent and BIRD.
pub struct Balancer {
    pub agent: Option<Agent>,
    pub bird: Proc,
    pub host: Host,
    pub config: PathBuf,
    pub socket: PathBuf,
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
    pub fn start() -> FleetBed {
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
        ok(std::fs::write(&config, agent_config(n, &bed.backends)).map_err(Into::into));
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
        ok(xtask::fleet::next_hops(&self.bed, &self.router, addr))
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
