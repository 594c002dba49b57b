//! Flow sharing between two balancers: a live TCP connection on a round-robin VIP moves
//! from lb1 to lb2 (the client's next hop changes, as when a router's ECMP moves the flow)
//! and stays on its backend because lb1 shared its pin; without sharing the same move
//! lands the connection on the other backend, which resets it.

use std::time::{Duration, Instant};

use lb_tests::{
    e2e::{number, serial, vip4},
    flowsync::Pair,
};
use xtask::traffic::Answer;

/// Starts a keep-alive connection through lb1, makes lb2's round robin point away from its
/// backend, moves the client's route to lb2, and returns (the backend, answers after the
/// move, lb2's packets to that backend meanwhile).
fn move_connection(pair: &Pair, share: bool) -> (String, Vec<Answer>, u64) {
    let bed = &pair.bed;
    let keepalive = bed
        .keepalive(vip4(), Duration::from_millis(100), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let first = keepalive
        .wait_answers(3, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let Answer::Ok { backend: kept, .. } = first[0].clone() else {
        panic!("the keep-alive connection failed at once: {first:?}");
    };
    if share {
        let stats = pair.wait_installed(&pair.lb2, 1);
        println!("flowsync: lb2 installed lb1's pins: {}", stats["flow_sync"]);
    }

    // New connections through lb2 (source ports routed to it) until one lands on `kept`:
    // lb2's next new flow then goes to the other backend.
    const PRIME_PORT: u16 = 21_000;
    pair.route_ports_via(PRIME_PORT, 8, &pair.lb2.host);
    let mut primed = false;
    for port in PRIME_PORT..PRIME_PORT + 8 {
        let t = bed
            .requests_from(vip4(), 1, port)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(t.errors.is_empty(), "priming lb2: {t:?}");
        if t.counts.contains_key(&kept) {
            primed = true;
            break;
        }
    }
    assert!(primed, "no connection through lb2 reached {kept}");
    // Only the keep-alive connection goes through lb2 from here on.
    let backend_packets = |p: &Pair| -> u64 {
        let stats = p.stats(&p.lb2);
        stats["backends"]
            .as_array()
            .map(|bs| bs.iter().map(|b| number(b, "packets")).sum())
            .unwrap_or(0)
    };
    let before = backend_packets(pair);

    bed.route_vips_via(&pair.lb2.host)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let moved_at = keepalive.answers().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answers = keepalive.answers();
        let after = &answers[moved_at.min(answers.len())..];
        let failed = after.iter().any(|a| matches!(a, Answer::Err { .. }));
        if failed || after.len() >= 15 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let answers = keepalive.stop();
    let after = answers[moved_at.min(answers.len())..].to_vec();
    let through_lb2 = backend_packets(pair) - before;
    (kept, after, through_lb2)
}

#[test]
fn a_shared_pin_keeps_a_moved_connection_on_its_backend() {
    let _serial = serial();
    let pair = Pair::new(true);
    let (kept, after, through_lb2) = move_connection(&pair, true);
    println!(
        "flowsync: after the move, {} answers, all from {kept}?; lb2 forwarded {through_lb2} packets",
        after.len()
    );
    assert!(
        after.len() >= 10,
        "too few answers after the move: {after:?}"
    );
    for a in &after {
        match a {
            Answer::Ok { backend, .. } => assert_eq!(backend, &kept, "{after:?}"),
            Answer::Err { seq, message } => panic!(
                "request {seq} failed after the move: {message}\nlogs:\n{}",
                pair.bed.logs(4000)
            ),
        }
    }
    assert!(
        through_lb2 >= 10,
        "the connection did not go through lb2 ({through_lb2} packets)"
    );
}

/// The control: the same move without sharing breaks the connection (lb2 balances it
/// afresh, onto the other backend, which resets it).
#[test]
fn without_sharing_the_same_move_breaks_the_connection() {
    let _serial = serial();
    let pair = Pair::new(false);
    let (kept, after, _) = move_connection(&pair, false);
    println!("flowsync (off): after the move: {after:?}");
    assert!(
        after.iter().any(|a| match a {
            Answer::Err { .. } => true,
            Answer::Ok { backend, .. } => backend != &kept,
        }),
        "without sharing the moved connection should break, yet: {after:?}"
    );
    assert!(
        pair.stats(&pair.lb2).get("flow_sync").is_none(),
        "lb2 shares flows although its config has no [flow_sync]"
    );
}
