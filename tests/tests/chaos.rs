//! Chaos: a minute of steady mixed load through two VIPs while everything that may happen
//! to a balancer in production happens to this one, in turn; every request to a backend
//! that stayed up must succeed.
//!
//! The load: new HTTP connections (each from a source port never used before), UDP
//! exchanges (each from a new socket) and long keep-alive HTTP connections, over a TCP
//! round-robin VIP and a UDP Maglev VIP on the same address. Meanwhile: a backend is
//! added, one is drained and undrained, one is health-flapped (its check script fails for
//! a while; its server goes on serving), the agent is restarted cleanly and `kill -9`'d
//! with its configuration file reordered before each start, a random-source SYN flood
//! fills a small flow table several times over, and the added backend is deleted
//! gracefully.
//!
//! What must hold: every new connection and every UDP exchange is answered (every server
//! serves throughout), and no keep-alive connection breaks unless its backend was the
//! health-flapped one (a backend marked down loses its flows, by design). The totals are
//! printed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use lb::config::Config;
use lb_tests::e2e::{Setup, field, name, serial, vip4, wait_backends};
use xtask::{
    testbed::{Config as BedConfig, HTTP_PORT, KeepAlive, Proc, Testbed, VIP4},
    traffic::{Answer, Attempt},
};

/// The whole run; events are placed on this clock (seconds from the start of the load).
const RUN: Duration = Duration::from_secs(60);
/// The flow table is made small so the flood evicts (it sends several times this many).
const MAX_FLOWS: &str = "16384";
const FLOOD_SYNS: &str = "60000";
/// Every this often a new connection, a UDP exchange.
const EVERY: Duration = Duration::from_millis(25);
/// Keep-alive connections at the start, and more once the added backend is in.
const KEEPALIVES: usize = 6;
const FLAPPED: usize = 3;
const ADDED: usize = 4;
const DRAINED: usize = 2;
/// Fresh source ports for the new-connection load (below the ephemeral range).
const FIRST_PORT: u16 = 10_000;

fn udp_vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT)
}

/// An external check that fails while `DIR/down-ADDR` exists: the test flaps a backend's
/// health without stopping its server.
fn write_check_script(dir: &Path) -> String {
    let script = dir.join("check.sh");
    let body = format!("#!/bin/sh\n[ ! -e '{}/down-'\"$1\" ]\n", dir.display());
    std::fs::write(&script, body).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("exec:{}", script.display())
}

/// The configuration file with its VIPs and every VIP's backends in reverse order, and
/// the VIPs of `new` (TOML, as in the file) first: a new agent must give every adopted
/// entry the id it had, whatever the order and whatever is new.
fn reorder_config(path: &Path, new: &str) {
    let mut config = Config::load(path).unwrap_or_else(|e| panic!("{e:#}"));
    config.vips.reverse();
    for vip in &mut config.vips {
        vip.backends.reverse();
    }
    let new = Config::parse(new).unwrap_or_else(|e| panic!("{e:#}"));
    config.vips.splice(0..0, new.vips);
    config.save(path).unwrap_or_else(|e| panic!("{e:#}"));
}

fn agent_args() -> [&'static str; 3] {
    ["--keep-forwarding", "--max-flows", MAX_FLOWS]
}

struct Chaos {
    s: Setup,
    started: Instant,
    log: Vec<String>,
}

impl Chaos {
    fn at(&mut self, second: u64, what: &str) {
        let due = self.started + Duration::from_secs(second);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.log.push(format!(
            "{:5.1} s  {what}",
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn both_vips(&self, args: &[&str]) {
        let (tcp, udp) = (vip4().to_string(), udp_vip().to_string());
        let mut a: Vec<&str> = args.to_vec();
        a.insert(2, &tcp);
        self.s.lb(&a);
        let mut a: Vec<&str> = args.to_vec();
        a.insert(2, &udp);
        a.extend(["--proto", "udp"]);
        self.s.lb(&a);
    }

    fn restart(&mut self, kill: bool, new: &str) {
        if kill {
            self.s.agent.proc.kill();
        } else {
            self.s
                .agent
                .stop(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        reorder_config(&self.s.config, new);
        self.s.agent = self
            .s
            .bed
            .start_agent_on(
                &self.s.bed.lb,
                &self.s.config,
                &self.s.socket,
                &agent_args(),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn keepalives(bed: &Testbed, n: usize, max: Duration) -> Vec<KeepAlive> {
    (0..n)
        .map(|_| {
            bed.keepalive(vip4(), Duration::from_millis(200), max)
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect()
}

#[test]
fn a_minute_of_chaos_breaks_no_connection_to_a_backend_that_stayed_up() {
    let _serial = serial();
    let bed = Testbed::new(BedConfig { backends: 4 }).unwrap_or_else(|e| panic!("{e:#}"));
    let servers = bed.start_backends().unwrap_or_else(|e| panic!("{e:#}"));
    let config = bed.dir().join("lb.toml");
    let socket = bed.dir().join("lb.sock");
    let agent = bed
        .start_agent_on(&bed.lb, &config, &socket, &agent_args())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let s = Setup {
        agent,
        servers,
        config,
        socket,
        bed,
    };
    let check = write_check_script(s.bed.dir());
    let (tcp, udp) = (vip4().to_string(), udp_vip().to_string());
    let checked = [
        "--check",
        &check,
        "--interval",
        "200",
        "--fall",
        "2",
        "--rise",
        "2",
    ];
    s.lb(&[&["vip", "add", &tcp][..], &checked].concat());
    s.lb(&[
        &["vip", "add", &udp, "--proto", "udp", "--algo", "maglev"][..],
        &checked,
    ]
    .concat());
    for i in 1..=3 {
        let b = s.backend(i, false);
        s.lb(&["backend", "add", &tcp, &b]);
        s.lb(&["backend", "add", &udp, &b, "--proto", "udp"]);
    }
    s.wait_all_up();

    let max = RUN + Duration::from_secs(5);
    let load = s
        .bed
        .load(vip4(), EVERY, RUN, Some(FIRST_PORT))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let udp_load = s
        .bed
        .load_udp(udp_vip(), EVERY, RUN)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut kept = keepalives(&s.bed, KEEPALIVES, max);
    let mut c = Chaos {
        s,
        started: Instant::now(),
        log: Vec::new(),
    };
    let down_file =
        c.s.bed
            .dir()
            .join(format!("down-{}", c.s.backend(FLAPPED, false)));
    let added = c.s.backend(ADDED, false);
    let drained = c.s.backend(DRAINED, false);

    c.at(3, "backend 4 added to both VIPs");
    c.both_vips(&["backend", "add", &added]);
    c.at(5, "more keep-alive connections");
    kept.extend(keepalives(&c.s.bed, KEEPALIVES, max));
    c.at(8, "backend 3's check starts failing");
    std::fs::write(&down_file, "").unwrap();
    c.at(12, "backend 3's check passes again");
    std::fs::remove_file(&down_file).unwrap();
    c.at(15, "backend 2 drained");
    c.both_vips(&["backend", "drain", &drained]);
    c.at(18, "backend 2 undrained");
    c.both_vips(&["backend", "undrain", &drained]);
    c.at(21, "agent stopped, config reordered, agent started");
    c.restart(false, "");
    c.at(
        28,
        "agent killed (-9), config reordered with a new VIP first, agent started",
    );
    let new_vip = format!(
        "[[vip]]\naddress = \"[{}]:{HTTP_PORT}\"\n\n[[vip.backend]]\naddress = \"{}\"\n\n\
         [[vip.backend]]\naddress = \"{}\"\n",
        xtask::testbed::VIP6,
        c.s.backend(1, true),
        c.s.backend(2, true)
    );
    c.restart(true, &new_vip);
    c.at(34, "random-source SYN flood starts");
    let vip_addr = VIP4.to_string();
    let mut flood: Proc =
        c.s.bed
            .spawn_in(
                &c.s.bed.client.ns,
                "timeout",
                [
                    "20",
                    "hping3",
                    "-q",
                    "-S",
                    "--rand-source",
                    "-i",
                    "u300",
                    "-c",
                    FLOOD_SYNS,
                    "-p",
                    "80",
                    &vip_addr,
                ],
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
    c.at(40, "backend 4 deleted gracefully (30 s grace)");
    c.both_vips(&["backend", "del", &added, "--grace", "30"]);
    wait_backends(&c.s.bed, &c.s.socket, "backend 4 leaving", |list| {
        list.iter()
            .filter(|b| field(b, "address") == added)
            .all(|b| field(b, "state") == "leaving")
    });
    c.at(46, "backend 3's check fails again, then passes");
    std::fs::write(&down_file, "").unwrap();
    c.at(50, "backend 3's check passes");
    std::fs::remove_file(&down_file).unwrap();
    c.at(RUN.as_secs(), "load ends");
    flood.kill();

    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    let exchanges = udp_load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    let answers: Vec<Vec<Answer>> = kept.into_iter().map(KeepAlive::stop).collect();
    let stats = c.s.lb(&["stats"]);

    let report = Report::new(&attempts, &exchanges, &answers);
    println!("{}\n{report}\n{stats}", c.log.join("\n"));
    let failed_new: Vec<&Attempt> = attempts.iter().filter(|a| a.is_err()).collect();
    let failed_udp: Vec<&Attempt> = exchanges.iter().filter(|a| a.is_err()).collect();
    assert!(
        failed_new.is_empty() && failed_udp.is_empty() && report.broken_kept.is_empty(),
        "requests failed: {} new connections (first: {:?}), {} UDP exchanges (first: {:?}), \
         keep-alives on backends that stayed up: {:?}\n{report}\nevents:\n{}\nagent log:\n{}",
        failed_new.len(),
        failed_new.first().map(|a| a.to_string()),
        failed_udp.len(),
        failed_udp.first().map(|a| a.to_string()),
        report.broken_kept,
        c.log.join("\n"),
        c.s.agent.proc.log()
    );
    // The load really ran through all of it, over every backend.
    assert!(
        attempts.len() as u128 >= RUN.as_millis() / EVERY.as_millis() * 9 / 10,
        "only {} new connections in {RUN:?}",
        attempts.len()
    );
    for i in 1..=4 {
        assert!(
            report.new_by_backend.contains_key(&name(i)),
            "backend {i} got no new connection: {report}"
        );
    }
}

/// What the load saw, in totals.
struct Report {
    new_by_backend: BTreeMap<String, usize>,
    new_total: usize,
    udp_total: usize,
    udp_by_backend: BTreeMap<String, usize>,
    kept_requests: usize,
    kept_on_flapped: usize,
    /// Keep-alive connections that broke although their backend stayed up.
    broken_kept: Vec<String>,
}

impl Report {
    fn new(attempts: &[Attempt], exchanges: &[Attempt], kept: &[Vec<Answer>]) -> Report {
        let by_backend = |a: &[Attempt]| {
            let mut m = BTreeMap::new();
            for b in a.iter().filter_map(Attempt::backend) {
                *m.entry(b.to_string()).or_insert(0) += 1;
            }
            m
        };
        let mut report = Report {
            new_by_backend: by_backend(attempts),
            new_total: attempts.len(),
            udp_total: exchanges.len(),
            udp_by_backend: by_backend(exchanges),
            kept_requests: 0,
            kept_on_flapped: 0,
            broken_kept: Vec::new(),
        };
        for answers in kept {
            let backend = answers.iter().find_map(|a| match a {
                Answer::Ok { backend, .. } => Some(backend.clone()),
                Answer::Err { .. } => None,
            });
            report.kept_requests += answers.len();
            let on_flapped = backend.as_deref() == Some(name(FLAPPED).as_str());
            report.kept_on_flapped += usize::from(on_flapped);
            if let Some(Answer::Err { seq, message }) = answers.last()
                && !on_flapped
            {
                report.broken_kept.push(format!(
                    "{} after {seq} requests: {message}",
                    backend.as_deref().unwrap_or("no backend")
                ));
            }
        }
        report
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "new connections: {} ({:?}); UDP exchanges: {} ({:?}); keep-alive requests: {} \
             ({} connections on the flapped backend)",
            self.new_total,
            self.new_by_backend,
            self.udp_total,
            self.udp_by_backend,
            self.kept_requests,
            self.kept_on_flapped
        )
    }
}
