//! A fleet test bed (`tests/fleet.rs`): the namespace test bed of `xtask::testbed` with three
//! balancers, each running `lb` (sharing flows with the other two) and a routing daemon:
//! BIRD 2 with the shipped `packaging/bird/balancer.conf` on lb1 and lb2, FRR with the
//! shipped `packaging/frr/frr.conf` on lb3 (the same contract, the other daemon),
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
    fleet::{
        NetnsGuard, agent_config, balancer_conf, bird, build_router, flow_sync_config, frr,
        router_conf,
    },
    testbed::{Agent, Config, Host, Load, Proc, Testbed, monotonic_us},
    traffic::{Answer, Attempt},
};

use crate::{e2e::lb_at, flowsync::write_key};

/// Balancers in the bed.
/// A new connection this often under steady load, from source ports nothing else used.
pub const LOAD_EVERY: Duration = Duration::from_millis(20);

/// Milliseconds, for the measurements the tests print.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub const BALANCERS: usize = 3;
/// The balancer (0-based) running FRR instead of BIRD: lb3.
pub const FRR_BALANCER: usize = 2;

/// One balancer: its host, agent and BIRD.
pub struct Balancer {
    pub agent: Option<Agent>,
    /// BIRD, or FRR's zebra, bfdd and bgpd.
    pub daemon: Vec<Proc>,
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
    /// Three balancers announcing VIP A (10.99.1.1:80, Maglev) and VIP B (10.99.1.2:80,
    /// round robin), both over both backends (added in different orders on lb1 and lb2),
    /// each sharing its flows with the other two; waits until the router has every next
    /// hop for both.
    pub fn start() -> FleetBed {
        let begun = Instant::now();
        let mut bed = ok(Testbed::new(Config { backends: 2 }));
        for _ in 1..BALANCERS {
            ok(bed.add_balancer());
        }
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
        let key = fleet.bed.dir().join("fleet.key");
        write_key(&key, "a shared key of the test fleet, 32+ bytes long");
        let hosts: Vec<Host> = std::iter::once(fleet.bed.lb.clone())
            .chain(fleet.bed.extra_balancers.iter().cloned())
            .collect();
        // One after the other, from this thread: the test bed's processes die with the
        // thread that started them.
        for (n, host) in hosts.iter().enumerate() {
            let peers: Vec<&Host> = hosts.iter().filter(|h| h.ns != host.ns).collect();
            let sharing = flow_sync_config(host, &peers, &key);
            let b = fleet.start_balancer(n, host.clone(), &sharing);
            fleet.balancers.push(b);
        }
        let last_bird = Instant::now();
        fleet.wait_next_hops(vip_a().ip(), BALANCERS);
        fleet.wait_next_hops(vip_b().ip(), BALANCERS);
        println!(
            "fleet bed: the router had all {BALANCERS} next hops for both VIPs {:.0} ms after \
             the last balancer's routing daemon started ({:.1} s to build the bed)",
            last_bird.elapsed().as_secs_f64() * 1000.0,
            begun.elapsed().as_secs_f64()
        );
        fleet
    }

    /// The addresses of every balancer but `n`.
    pub fn others(&self, n: usize) -> Vec<IpAddr> {
        (0..self.balancers.len())
            .filter(|&i| i != n)
            .map(|i| self.addr(i))
            .collect()
    }

    /// The addresses of every balancer.
    pub fn all(&self) -> Vec<IpAddr> {
        (0..self.balancers.len()).map(|i| self.addr(i)).collect()
    }

    fn start_balancer(&self, n: usize, host: Host, sharing: &str) -> Balancer {
        let bed = &self.bed;
        let config = bed.dir().join(format!("lb{}.toml", n + 1));
        let text = agent_config(n, &bed.backends) + sharing;
        ok(std::fs::write(&config, text).map_err(Into::into));
        let socket = bed.dir().join(format!("lb{}.sock", n + 1));
        let agent = ok(bed.start_agent_on(&host, &config, &socket, &[]));
        let name = format!("lb{}", n + 1);
        let daemon = if n == FRR_BALANCER {
            ok(frr(bed, &host.ns, &host, &name))
        } else {
            let conf = bed.dir().join(format!("bird-{name}.conf"));
            ok(std::fs::write(&conf, balancer_conf(&host)).map_err(Into::into));
            vec![ok(bird(bed, &host.ns, &conf, &name))]
        };
        Balancer {
            agent: Some(agent),
            daemon,
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
            for d in &b.daemon {
                // "nsenter --net=NS PROGRAM ARGS"
                let program = d.label().split_whitespace().nth(2).unwrap_or("daemon");
                let name = program.rsplit('/').next().unwrap_or(program);
                out += &format!("lb{} {name}:\n{}\n", i + 1, tail(&d.log()));
            }
            if let Some(a) = &b.agent {
                out += &format!("lb{} agent:\n{}\n", i + 1, tail(&a.proc.log()));
            }
        }
        out
    }
}

/// The last 3,000 bytes or so of a daemon's log, for a failure message.
pub(crate) fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(3000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// A connection slower than this was held up (a SYN retransmitted, 1 s at first).
pub const HELD_UP: Duration = Duration::from_millis(500);

/// What steady load saw from `since_us` (the monotonic clock of `Attempt::start_us`) on:
/// how many attempts failed or were held up, and until when, for the test output and
/// BENCHMARKS.md.
pub fn disruption(attempts: &[xtask::traffic::Attempt], since_us: u64) -> String {
    let after: Vec<_> = attempts.iter().filter(|a| a.start_us >= since_us).collect();
    let failed = after.iter().filter(|a| a.is_err()).count();
    let hit: Vec<_> = after
        .iter()
        .filter(|a| a.is_err() || a.latency_us >= HELD_UP.as_micros() as u64)
        .collect();
    let last = hit.iter().map(|a| a.start_us - since_us).max();
    let slowest = hit.iter().map(|a| a.latency_us).max().unwrap_or(0);
    match last {
        None => format!(
            "{} new connections after it: none failed or took {} ms or more",
            after.len(),
            HELD_UP.as_millis()
        ),
        Some(last) => format!(
            "{} new connections after it: {failed} failed, {} took {} ms or more (slowest \
             {:.0} ms); the last of those started {:.0} ms after it",
            after.len(),
            hit.len() - failed,
            HELD_UP.as_millis(),
            slowest as f64 / 1000.0,
            last as f64 / 1000.0
        ),
    }
}

/// Steady load on `vip`: a new connection every [`LOAD_EVERY`] for at most `max`, attempt n
/// from source port `first_port + n`, given half a second to get going.
pub fn steady_load(bed: &Testbed, vip: SocketAddr, max: Duration, first_port: u16) -> Load {
    let load = ok(bed.load(vip, LOAD_EVERY, max, Some(first_port)));
    std::thread::sleep(Duration::from_millis(500));
    load
}

/// The attempts that failed, for an assertion's message.
fn failed(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .filter(|a| a.is_err())
        .map(|a| a.to_string())
        .collect()
}

/// Asserts that not one of `attempts` failed; `logs` go with the failure.
pub fn assert_none_failed(attempts: &[Attempt], logs: &str) {
    let failed = failed(attempts);
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}\n{logs}",
        failed.len(),
        attempts.len()
    );
}

/// Freezes `host` while `load` runs; `takeover` waits for the others to take its traffic
/// over (and prints how long that took). After two more seconds of load: its attempts, and
/// when the freeze was; how they fared is printed under `what`.
pub fn freeze_under_load(
    bed: &Testbed,
    host: &Host,
    load: Load,
    what: &str,
    takeover: impl FnOnce(),
) -> (Vec<Attempt>, u64) {
    let down_at = monotonic_us();
    freeze(bed, host);
    takeover();
    std::thread::sleep(Duration::from_secs(2));
    let attempts = ok(load.finish());
    println!("{what}: {}", disruption(&attempts, down_at));
    (attempts, down_at)
}

/// New connections answer again once the takeover is done: the last 25 of `attempts` (the
/// last half second of a load that ran 2 s past it) all succeeded. `after` says what the
/// takeover was; `logs` go with a failure.
pub fn assert_answering_again(attempts: &[Attempt], after: &str, logs: &str) {
    let failed = failed(attempts);
    assert!(
        attempts.iter().rev().take(25).all(|a| !a.is_err()),
        "new connections still fail 1.5 s after {after}: {failed:?}\n{logs}"
    );
}

/// A long-lived connection (`how`) carried on through a takeover that began at `down_us`
/// (`event` says what it was): every one of its `answers` came from `backend`, none failed,
/// and at least 10 came after its first few. `logs` go with a failed request.
pub fn assert_carried_on(
    answers: &[Answer],
    backend: &str,
    how: &str,
    (event, down_us): (&str, u64),
    logs: impl Fn() -> String,
) {
    for a in answers {
        match a {
            Answer::Ok { backend: b, seq } => {
                assert_eq!(
                    b, backend,
                    "request {seq} of {how} moved to another backend"
                )
            }
            Answer::Err { seq, message } => panic!(
                "request {seq} of {how} failed {:.0} ms after {event}: {message}\n{}",
                (monotonic_us() - down_us) as f64 / 1000.0,
                logs()
            ),
        }
    }
    let later = answers
        .iter()
        .filter(|a| matches!(a, Answer::Ok { seq, .. } if *seq > 2))
        .count();
    assert!(
        later >= 10,
        "{how} stopped answering: {} answers in all",
        answers.len()
    );
}

/// `lb fleet leave` run by `leave`: prints how long it took (`what` names the balancer),
/// asserts it said the agent may now be stopped.
pub fn timed_leave(what: &str, leave: impl FnOnce() -> String) {
    let started = Instant::now();
    let out = leave();
    println!(
        "lb fleet leave{what} returned after {:.0} ms",
        ms(started.elapsed())
    );
    assert!(out.contains("safe to stop the agent"), "{out}");
}

/// `lb vip set VIP` with a check every backend fails (`exec:/bin/false`, every 200 ms,
/// down at the first failure).
pub fn failing_check(vip: &str) -> [&str; 9] {
    [
        "vip",
        "set",
        vip,
        "--check",
        "exec:/bin/false",
        "--interval",
        "200",
        "--fall",
        "1",
    ]
}

/// Makes `host` a dead box whose link stays up: its switch port forwards nothing either
/// way from now on. Unlike its link going down, this keeps the switch's entry for its MAC
/// address: a flushed entry would flood the frames still sent to it to every port, and the
/// other balancers' programs would forward them, hiding what the routers (or VRRP) do.
pub fn freeze(bed: &Testbed, host: &Host) {
    ok(bed.run_in_ok(
        &bed.switch,
        "bridge",
        ["link", "set", "dev", &host.switch_port, "state", "0"],
    ));
}
