//! End to end, an active-passive pair with VRRP (`lb_tests::vrrp`): two balancers on one
//! segment, each running `lb` (with `[fleet] track_file` and `[flow_sync]` to the other)
//! and keepalived with the shipped config; the client ARPs for the VIP and reaches
//! whichever balancer is master. Real keepalived, real VRRP adverts and gratuitous ARP.
//!
//! Takeover times are measured and printed (`-- --nocapture`), never asserted beyond a
//! generous bound; BENCHMARKS.md ("Fleet") reports the figures.
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, `keepalived` (Debian's keepalived, installed by
//! ./x.sh), and the binaries `target/<profile>/{lb,xtask}` (`cargo xtask test` builds them).

use std::time::Duration;

use lb_tests::{
    e2e::{first_backend, serial},
    fleet::{
        assert_answering_again, assert_carried_on, assert_none_failed, failing_check,
        freeze_under_load, ms, steady_load, timed_leave,
    },
    vrrp::*,
};

const LOAD_MAX: Duration = Duration::from_secs(30);
/// Generous: the shipped timers take the VIP over in about a second.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(10);

/// The master freezes under steady load (its switch port stops forwarding, as a hung box
/// whose link stays up: the switch keeps sending it the frames for its MAC address, so
/// only VRRP and the gratuitous ARP move the traffic): the backup takes the VIP over, the
/// long-lived connections on the round-robin VIP carry on through it on their backends
/// (lb1 shared their pins), and new connections succeed again.
#[test]
fn the_backup_takes_over_when_the_master_dies_and_connections_survive() {
    let _serial = serial();
    let pair = VrrpPair::start();
    assert_eq!(pair.track_value(0), "1");
    assert_eq!(pair.track_value(1), "1");
    let status = pair.lb(0, &["fleet", "status"]);
    assert!(status.contains(": 1 (serving)"), "{status}");

    // Two keep-alive connections through lb1, one on each backend (round robin).
    let mut conns = Vec::new();
    for _ in 0..2 {
        let k = pair
            .bed
            .keepalive(vip(), Duration::from_millis(50), Duration::from_secs(25))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let first = k
            .wait_answers(2, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
        conns.push((k, first_backend(&first)));
    }
    assert_ne!(conns[0].1, conns[1].1, "round robin: one on each backend");
    assert_eq!(pair.new_flows(1), 0, "lb2 carried nothing while backup");
    // lb2 has their pins (sent within milliseconds of each SYN).
    xtask::testbed::wait_until(Duration::from_secs(5), || Ok(pair.installed(1) >= 2))
        .unwrap_or_else(|e| panic!("lb2 did not install lb1's pins: {e:#}"));

    let load = steady_load(&pair.bed, vip(), LOAD_MAX, 27_000);
    let lb1 = &pair.members[0].host;
    let (attempts, down_at) = freeze_under_load(&pair.bed, lb1, load, "master frozen", || {
        let took = pair.wait_master(1, TAKEOVER_LIMIT);
        println!(
            "master frozen: the backup held the VIP after {:.0} ms",
            ms(took)
        );
    });
    assert_answering_again(&attempts, "lb2 took the VIP", &pair.logs());
    assert!(pair.new_flows(1) > 0, "lb2 carried no new connection");

    for (k, backend) in conns {
        assert_carried_on(
            &k.stop(),
            &backend,
            "a long-lived connection",
            ("the master froze", down_at),
            || pair.logs(),
        );
    }
}

/// Every backend fails lb1's checks: lb1's agent writes 0 into its track file, keepalived
/// lowers its priority below lb2's, and lb2 takes the VIP over and serves; when the
/// backends pass again, lb1 takes it back (preemption).
#[test]
fn a_master_that_cannot_serve_hands_the_vip_to_the_backup() {
    let _serial = serial();
    let pair = VrrpPair::start();
    let v = vip().to_string();
    pair.lb(0, &failing_check(&v));
    let took = pair.wait_master(1, TAKEOVER_LIMIT);
    println!(
        "every backend down on lb1's checks: lb2 held the VIP after {:.0} ms",
        ms(took)
    );
    xtask::testbed::wait_until(Duration::from_secs(5), || Ok(!pair.holds_vip(0)))
        .unwrap_or_else(|e| panic!("lb1 still holds the VIP: {e:#}\n{}", pair.logs()));
    assert_eq!(pair.track_value(0), "0");
    let status = pair.lb(0, &["fleet", "status"]);
    assert!(
        status.contains(": 0 (cannot serve)") && status.contains("no backend in rotation"),
        "{status}"
    );
    // New connections go to lb2 (the client followed the gratuitous ARP) and succeed.
    let tally = pair
        .bed
        .requests_from(vip(), 10, 28_000)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        tally.errors.is_empty(),
        "failed: {:?}\n{}",
        tally.errors,
        pair.logs()
    );
    assert_eq!(pair.new_flows(1), 10, "lb2 carried the new connections");

    pair.lb(0, &["vip", "set", &v, "--check", "none"]);
    let back = pair.wait_master(0, TAKEOVER_LIMIT);
    println!(
        "lb1's backends back: lb1 held the VIP again after {:.0} ms",
        ms(back)
    );
    assert_eq!(pair.track_value(0), "1");
}

/// `lb fleet leave` on the master under steady load: its track file says 0, the backup
/// takes the VIP over, the command returns once no VIP packet reaches the master, and not
/// one connection fails; `lb fleet join` gives the VIP back to it. A clean stop of the
/// agent then hands the VIP over too (the agent writes 0 as it stops).
#[test]
fn fleet_leave_hands_the_vip_to_the_backup_without_a_failed_request() {
    let _serial = serial();
    let mut pair = VrrpPair::start();
    let load = steady_load(&pair.bed, vip(), LOAD_MAX, 29_000);
    timed_leave(" on the master", || pair.lb(0, &["fleet", "leave"]));
    assert!(pair.holds_vip(1) && !pair.holds_vip(0), "{}", pair.logs());
    assert_eq!(pair.track_value(0), "0");

    pair.lb(0, &["fleet", "join"]);
    let back = pair.wait_master(0, TAKEOVER_LIMIT);
    println!(
        "lb fleet join: lb1 held the VIP again after {:.0} ms",
        ms(back)
    );
    std::thread::sleep(Duration::from_millis(500));
    let attempts = load.finish().unwrap_or_else(|e| panic!("{e:#}"));
    assert_none_failed(&attempts, &pair.logs());
    assert!(pair.new_flows(1) > 0, "lb2 carried no new connection");

    let mut agent = pair.members[0].agent.take().expect("lb1's agent");
    agent
        .stop(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(pair.track_value(0), "0", "lb1's agent stopped cleanly");
    pair.wait_master(1, TAKEOVER_LIMIT);
}
