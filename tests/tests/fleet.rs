//! End to end, a fleet of two balancers behind a router (`lb_tests::fleet`): each runs
//! `lb` with `[fleet] route_table = 100` and BIRD 2 with the shipped balancer config; the
//! router runs BIRD with the shipped router config and kernel ECMP. Real BGP, BFD and
//! TCP connections from the client through the router.
//!
//! Convergence times are measured and printed (`-- --nocapture`), never asserted: each
//! wait has a generous bound, and BENCHMARKS.md ("Fleet") reports the figures.
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, `bird` (Debian's bird2, installed by ./x.sh),
//! and the binaries `target/<profile>/{lb,xtask}` (`cargo xtask test` builds them).

use std::time::Duration;

use lb_tests::{e2e::serial, fleet::*};
use xtask::{testbed::monotonic_us, traffic::Answer};

/// A new connection this often under steady load, from source ports nothing else used.
const LOAD_EVERY: Duration = Duration::from_millis(20);
const LOAD_MAX: Duration = Duration::from_secs(40);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The router's route to each VIP address has one next hop per balancer, each balancer
/// says it announces both, and new flows are spread over both balancers.
#[test]
fn both_balancers_announce_and_carry_new_flows() {
    let _serial = serial();
    let fleet = FleetBed::start();
    let both = vec![fleet.addr(0), fleet.addr(1)];
    for vip in [vip_a(), vip_b()] {
        assert_eq!(fleet.next_hops(vip.ip()), both, "next hops of {vip}");
        for n in 0..2 {
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
    let (one, two) = (fleet.new_flows(0, vip_a()), fleet.new_flows(1, vip_a()));
    assert_eq!(
        one + two,
        40,
        "every connection is one new flow on one balancer"
    );
    assert!(
        one > 0 && two > 0,
        "ECMP spreads flows over both balancers: lb1 {one}, lb2 {two}"
    );
}

/// A balancer's link goes down: the router's route loses that next hop (BFD), and
/// long-lived connections on the Maglev VIP that went through it carry on through the
/// other balancer, on the same backend, without an error.
#[test]
fn a_dead_balancer_loses_its_next_hop_and_maglev_connections_continue() {
    let _serial = serial();
    let fleet = FleetBed::start();
    // Keep-alive connections until at least one goes through each balancer (ECMP hashes
    // the ports, which the kernel picks).
    let mut conns = Vec::new();
    for _ in 0..16 {
        let before = fleet.new_flows(0, vip_a());
        let k = fleet
            .bed
            .keepalive(vip_a(), Duration::from_millis(50), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let first = k
            .wait_answers(2, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let backend = match &first[0] {
            Answer::Ok { backend, .. } => backend.clone(),
            Answer::Err { message, .. } => panic!("keep-alive failed at once: {message}"),
        };
        let via_lb1 = fleet.new_flows(0, vip_a()) > before;
        conns.push((k, backend, via_lb1));
        if conns.iter().any(|c| c.2) && conns.iter().any(|c| !c.2) {
            break;
        }
    }
    assert!(
        conns.iter().any(|c| c.2),
        "no connection of {} went through lb1",
        conns.len()
    );

    // New connections meanwhile: those sent to lb1 before the router notices fail; how
    // many, and for how long, is measured (BENCHMARKS.md, Fleet), not asserted.
    let load = fleet
        .bed
        .load(vip_a(), LOAD_EVERY, LOAD_MAX, Some(26_000))
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    let down_at = monotonic_us();
    let lb1 = fleet.balancers[0].host.ns.clone();
    fleet
        .bed
        .ip(&lb1, &["link", "set", "eth0", "down"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let converged = fleet.wait_next_hops(vip_a().ip(), 1);
    assert_eq!(fleet.next_hops(vip_a().ip()), vec![fleet.addr(1)]);
    println!(
        "link down on lb1: the router's route lost its next hop after {:.0} ms",
        ms(converged)
    );
    // Every connection answers again after the switch.
    std::thread::sleep(Duration::from_secs(2));
    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    let failed: Vec<_> = attempts.iter().filter(|a| a.is_err()).collect();
    let window = failed
        .iter()
        .map(|a| a.start_us.saturating_sub(down_at))
        .max()
        .unwrap_or(0);
    println!(
        "new connections: {} of {} failed, the last started {:.0} ms after the link went down",
        failed.len(),
        attempts.len(),
        window as f64 / 1000.0
    );
    assert!(
        attempts.iter().rev().take(25).all(|a| !a.is_err()),
        "new connections still fail 1.5 s after the router dropped lb1"
    );
    for (k, backend, via_lb1) in conns {
        let answers = k.stop();
        let later: Vec<&Answer> = answers
            .iter()
            .filter(|a| matches!(a, Answer::Ok { seq, .. } if *seq > 2))
            .collect();
        for a in &answers {
            match a {
                Answer::Ok { backend: b, seq } => assert_eq!(
                    b,
                    &backend,
                    "request {seq} of a connection {} lb1 moved to another backend",
                    if via_lb1 { "through" } else { "not through" }
                ),
                Answer::Err { seq, message } => panic!(
                    "request {seq} of a connection {} lb1 failed after the link went down \
                     ({:.0} ms ago): {message}",
                    if via_lb1 { "through" } else { "not through" },
                    (monotonic_us() - down_at) as f64 / 1000.0
                ),
            }
        }
        assert!(
            later.len() >= 10,
            "a connection stopped answering: {} answers in all",
            answers.len()
        );
    }
}

/// Every backend of VIP B goes down on lb1's health checks: lb1 withdraws VIP B's address
/// and only that one; it announces it again when they come back.
#[test]
fn all_backends_down_on_one_balancer_withdraws_that_vip_only() {
    let _serial = serial();
    let fleet = FleetBed::start();
    let b = vip_b().to_string();
    fleet.lb(
        0,
        &[
            "vip",
            "set",
            &b,
            "--check",
            "exec:/bin/false",
            "--interval",
            "200",
            "--fall",
            "1",
        ],
    );
    let took = fleet.wait_next_hops(vip_b().ip(), 1);
    println!(
        "VIP B down on lb1's checks: withdrawn from the router after {:.0} ms",
        ms(took)
    );
    assert_eq!(fleet.next_hops(vip_b().ip()), vec![fleet.addr(1)]);
    assert_eq!(
        fleet.next_hops(vip_a().ip()),
        vec![fleet.addr(0), fleet.addr(1)],
        "VIP A stays announced by both"
    );
    let (announced, why) = fleet.announced(0, vip_b().ip());
    assert!(!announced, "lb1 still says it announces VIP B");
    assert_eq!(why.as_deref(), Some("no backend in rotation (0 of 2 up)"));
    assert!(!fleet.table_routes(0).contains(VIP4B));

    fleet.lb(0, &["vip", "set", &b, "--check", "none"]);
    fleet.wait_next_hops(vip_b().ip(), 2);
}

/// `kill -9` of lb1's agent under steady load: nothing is withdrawn (the route stays in
/// its table, the router keeps both next hops), no connection fails, and the restarted
/// agent takes the announcement over.
#[test]
fn kill_9_of_an_agent_withdraws_nothing_and_the_restart_reannounces() {
    let _serial = serial();
    let mut fleet = FleetBed::start();
    let load = fleet
        .bed
        .load(vip_a(), LOAD_EVERY, LOAD_MAX, Some(24_000))
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    fleet.agent(0).proc.kill();
    fleet.balancers[0].agent = None;
    // For three seconds (the BGP hold time) the route stays everywhere.
    for _ in 0..30 {
        assert_eq!(
            fleet.next_hops(vip_a().ip()),
            vec![fleet.addr(0), fleet.addr(1)],
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
    let failed: Vec<String> = attempts
        .iter()
        .filter(|a| a.is_err())
        .map(|a| a.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        attempts.len()
    );
    assert_eq!(
        fleet.next_hops(vip_a().ip()),
        vec![fleet.addr(0), fleet.addr(1)]
    );
}

/// `lb fleet leave` under steady load withdraws every VIP address and returns once no
/// traffic arrives; the agent restarted after it stays out; `lb fleet join` brings it
/// back. Not one connection fails.
#[test]
fn graceful_leave_and_join_under_load_fail_no_request() {
    let _serial = serial();
    let mut fleet = FleetBed::start();
    let load = fleet
        .bed
        .load(vip_a(), LOAD_EVERY, LOAD_MAX, Some(25_000))
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let out = fleet.lb(0, &["fleet", "leave"]);
    println!(
        "lb fleet leave returned after {:.0} ms",
        ms(started.elapsed())
    );
    assert!(out.contains("safe to stop the agent"), "{out}");
    for vip in [vip_a(), vip_b()] {
        assert_eq!(fleet.next_hops(vip.ip()), vec![fleet.addr(1)], "{vip}");
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
    assert_eq!(fleet.next_hops(vip_a().ip()), vec![fleet.addr(1)]);

    fleet.lb(0, &["fleet", "join"]);
    let took = fleet.wait_next_hops(vip_a().ip(), 2);
    println!(
        "lb fleet join: both next hops again after {:.0} ms",
        ms(took)
    );
    std::thread::sleep(Duration::from_millis(500));
    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    let failed: Vec<String> = attempts
        .iter()
        .filter(|a| a.is_err())
        .map(|a| a.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        attempts.len()
    );
}
