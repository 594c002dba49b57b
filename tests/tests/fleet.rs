//! End to end, a fleet of three balancers behind a router (`lb_tests::fleet`): each runs
//! `lb` with `[fleet] route_table = 100` and `[flow_sync]` to the other two, and a routing
//! daemon with its shipped config: BIRD 2 on lb1 and lb2, FRR on lb3; the router runs BIRD
//! with the shipped router config and kernel ECMP. Real BGP, BFD and TCP connections from
//! the client through the router.
//!
//! Convergence times are measured and printed (`-- --nocapture`), never asserted: each
//! wait has a generous bound, and BENCHMARKS.md ("Fleet") reports the figures.
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, `bird` and FRR (Debian's bird2 and frr,
//! installed by ./x.sh), and the binaries `target/<profile>/{lb,xtask}` (`cargo xtask
//! test` builds them).

use std::time::Duration;

use lb_tests::{
    e2e::{first_backend, serial},
    fleet::*,
};

const LOAD_MAX: Duration = Duration::from_secs(40);

/// The router's route to each VIP address has one next hop per balancer, each balancer
/// says it announces both, and new flows are spread over every balancer.
#[test]
fn every_balancer_announces_and_carries_new_flows() {
    let _serial = serial();
    let fleet = FleetBed::start();
    for vip in [vip_a(), vip_b()] {
        assert_eq!(fleet.next_hops(vip.ip()), fleet.all(), "next hops of {vip}");
        for n in 0..BALANCERS {
            assert_eq!(fleet.announced(n, vip.ip()), (true, None), "lb{}", n + 1);
        }
    }
    let status = fleet.lb(0, &["status"]);
    assert!(
        status.contains("fleet       member (table 100): announcing 2 of 2 VIP addresses"),
        "{status}"
    );
    let tally = fleet
        .bed
        .requests_from(vip_a(), 40, 20_000)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(tally.errors.is_empty(), "failed: {:?}", tally.errors);
    let flows: Vec<u64> = (0..BALANCERS)
        .map(|n| fleet.new_flows(n, vip_a()))
        .collect();
    assert_eq!(
        flows.iter().sum::<u64>(),
        40,
        "every connection is one new flow on one balancer: {flows:?}"
    );
    assert!(
        flows.iter().all(|&f| f > 0),
        "ECMP spreads flows over every balancer: {flows:?}"
    );
}

/// A balancer dies (its switch port stops forwarding: a dead box, seen from the network;
/// see `freeze`): the router's route loses that next hop (BFD), and
/// long-lived connections that went through it carry on through the other balancers, on
/// the same backend, without an error: on the Maglev VIP (every balancer builds the same
/// table) and on the round-robin VIP (lb1 shared its pins).
#[test]
fn a_dead_balancer_loses_its_next_hop_and_its_connections_continue() {
    let _serial = serial();
    let fleet = FleetBed::start();
    // Keep-alive connections (ECMP hashes the ports, which the kernel picks) until, on the
    // Maglev VIP, one went through lb1 and one did not, and on the round-robin VIP two went
    // through lb1 (lb1's round robin put them on different backends).
    let mut conns = Vec::new();
    for (vip, through_lb1, others) in [(vip_a(), 1, 1), (vip_b(), 2, 0)] {
        let mut opened = Vec::new();
        for _ in 0..30 {
            let before = fleet.new_flows(0, vip);
            let k = fleet
                .bed
                .keepalive(vip, Duration::from_millis(50), Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e:#}"));
            let first = k
                .wait_answers(2, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{e:#}"));
            let backend = first_backend(&first);
            let via_lb1 = fleet.new_flows(0, vip) > before;
            // Only what the test needs is kept open.
            let wanted = if via_lb1 { through_lb1 } else { others };
            if opened
                .iter()
                .filter(|c: &&Conn| c.via_lb1 == via_lb1)
                .count()
                < wanted
            {
                opened.push(Conn {
                    vip,
                    keepalive: k,
                    backend,
                    via_lb1,
                });
            }
            if opened.len() == through_lb1 + others {
                break;
            }
        }
        assert_eq!(
            opened.iter().filter(|c| c.via_lb1).count(),
            through_lb1,
            "not enough connections on {vip} went through lb1"
        );
        conns.extend(opened);
    }

    // New connections meanwhile: those sent to lb1 before the router notices fail; how
    // many, and for how long, is measured (BENCHMARKS.md, Fleet), not asserted.
    let load = steady_load(&fleet.bed, vip_a(), LOAD_MAX, 26_000);
    let lb1 = &fleet.balancers[0].host;
    let (attempts, down_at) = freeze_under_load(&fleet.bed, lb1, load, "lb1 dead", || {
        let converged = fleet.wait_next_hops(vip_a().ip(), BALANCERS - 1);
        assert_eq!(fleet.next_hops(vip_a().ip()), fleet.others(0));
        println!(
            "lb1 dead: the router's route lost its next hop after {:.0} ms",
            ms(converged)
        );
    });
    // Every connection answers again after the switch.
    assert_answering_again(&attempts, "the router dropped lb1", "");
    for c in conns {
        let answers = c.keepalive.stop();
        let how = format!(
            "a connection on {} {} lb1",
            c.vip,
            if c.via_lb1 { "through" } else { "not through" }
        );
        assert_carried_on(&answers, &c.backend, &how, ("lb1 died", down_at), || {
            fleet.logs()
        });
    }
}

/// A long-lived connection of the dead-balancer test.
struct Conn {
    vip: std::net::SocketAddr,
    keepalive: xtask::testbed::KeepAlive,
    backend: String,
    via_lb1: bool,
}

/// Every backend of VIP B goes down on lb3's health checks: lb3 withdraws VIP B's address
/// and only that one; it announces it again when they come back. lb3 runs FRR, so this is
/// also FRR following the agent's table both ways.
#[test]
fn all_backends_down_on_one_balancer_withdraws_that_vip_only() {
    let _serial = serial();
    let fleet = FleetBed::start();
    let n = FRR_BALANCER;
    let b = vip_b().to_string();
    fleet.lb(n, &failing_check(&b));
    let took = fleet.wait_next_hops(vip_b().ip(), BALANCERS - 1);
    println!(
        "VIP B down on lb3's checks: withdrawn from the router (FRR) after {:.0} ms",
        ms(took)
    );
    assert_eq!(fleet.next_hops(vip_b().ip()), fleet.others(n));
    assert_eq!(
        fleet.next_hops(vip_a().ip()),
        fleet.all(),
        "VIP A stays announced by every balancer"
    );
    let (announced, why) = fleet.announced(n, vip_b().ip());
    assert!(!announced, "lb3 still says it announces VIP B");
    assert_eq!(why.as_deref(), Some("no backend in rotation (0 of 2 up)"));
    assert!(!fleet.table_routes(n).contains(VIP4B));

    fleet.lb(n, &["vip", "set", &b, "--check", "none"]);
    let back = fleet.wait_next_hops(vip_b().ip(), BALANCERS);
    println!(
        "VIP B back on lb3's checks: announced again (FRR) after {:.0} ms",
        ms(back)
    );
}

/// `kill -9` of lb1's agent under steady load: nothing is withdrawn (the route stays in
/// its table, the router keeps every next hop), no connection fails, and the restarted
/// agent takes the announcement over.
#[test]
fn kill_9_of_an_agent_withdraws_nothing_and_the_restart_reannounces() {
    let _serial = serial();
    let mut fleet = FleetBed::start();
    let load = steady_load(&fleet.bed, vip_a(), LOAD_MAX, 24_000);
    fleet.agent(0).proc.kill();
    fleet.balancers[0].agent = None;
    // For three seconds (the BGP hold time) the route stays everywhere.
    for _ in 0..30 {
        assert_eq!(
            fleet.next_hops(vip_a().ip()),
            fleet.all(),
            "the router lost lb1 after its agent was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fleet.table_routes(0).contains(&vip_a().ip().to_string()));
    fleet.restart_agent(0);
    let takeover = "fleet: announcing VIP addresses in routing table 100 (2 there already)";
    xtask::testbed::wait_until(Duration::from_secs(5), || {
        Ok(fleet.agent(0).proc.log().contains(takeover))
    })
    .unwrap_or_else(|e| panic!("the new agent did not take over the routes it found: {e:#}"));
    assert_eq!(fleet.announced(0, vip_a().ip()), (true, None));
    std::thread::sleep(Duration::from_millis(500));
    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    assert_none_failed(&attempts, "");
    assert_eq!(fleet.next_hops(vip_a().ip()), fleet.all());
}

/// `lb fleet leave` under steady load withdraws every VIP address and returns once no
/// traffic arrives; the agent restarted after it stays out; `lb fleet join` brings it
/// back. Not one connection fails.
#[test]
fn graceful_leave_and_join_under_load_fail_no_request() {
    let _serial = serial();
    let mut fleet = FleetBed::start();
    let load = steady_load(&fleet.bed, vip_a(), LOAD_MAX, 25_000);
    timed_leave("", || fleet.lb(0, &["fleet", "leave"]));
    for vip in [vip_a(), vip_b()] {
        assert_eq!(fleet.next_hops(vip.ip()), fleet.others(0), "{vip}");
    }
    // Stopped and started again: still out of the fleet (the leave is in its config).
    fleet
        .agent(0)
        .stop(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    fleet.balancers[0].agent = None;
    fleet.restart_agent(0);
    let status = fleet.fleet_status(0);
    assert_eq!(status["member"], false, "{status}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fleet.next_hops(vip_a().ip()), fleet.others(0));

    fleet.lb(0, &["fleet", "join"]);
    let took = fleet.wait_next_hops(vip_a().ip(), BALANCERS);
    println!(
        "lb fleet join: every next hop again after {:.0} ms",
        ms(took)
    );
    std::thread::sleep(Duration::from_millis(500));
    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    assert_none_failed(&attempts, "");
}
