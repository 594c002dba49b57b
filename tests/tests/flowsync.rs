//! Flow sharing between two balancers: a live TCP connection on a round-robin VIP moves
//! from lb1 to lb2 (the client's next hop changes, as when a router's ECMP moves the flow)
//! and stays on its backend because lb1 shared its pin; without sharing the same move
//! lands the connection on the other backend, which resets it. First, the data plane's
//! part alone (BPF_PROG_TEST_RUN): what it writes into the ring buffer, and when.

use std::time::{Duration, Instant};

use lb_common::{FLOW_EVENTS_BYTES, FlowEvent, Reason, xdp};
use lb_tests::{
    e2e::{number, serial, vip4},
    fixtures::{self, Pkt, TCP_SYN, client4, four_vips},
    flowsync::Pair,
};
use xtask::traffic::Answer;

/// Sharing off: nothing is written. On: one event per new flow (a SYN, also of a known
/// 5-tuple), none for an established packet. A full ring loses events, counted, while every
/// packet is still forwarded.
#[test]
fn the_data_plane_shares_each_new_flow_only_while_sharing_is_on() {
    let mut fx = four_vips();
    let mut ring = fx.dp.take_flow_events().expect("the ring buffer");
    let drops = fx.dp.flow_share_drops().expect("the drop counter");
    let syn = |port| {
        Pkt::tcp(client4(port), fixtures::vip4(80))
            .flags(TCP_SYN)
            .build()
    };
    let events = |ring: &mut aya::maps::RingBuf<_>| {
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.push(bytemuck::pod_read_unaligned::<FlowEvent>(&item));
        }
        out
    };
    let forward = |fx: &mut fixtures::Fixture, frame: &[u8]| {
        let (action, _) = fx.dp.test_run(frame).expect("test run");
        assert_eq!(action, xdp::TX);
    };

    forward(&mut fx, &syn(40_000));
    assert!(events(&mut ring).is_empty(), "sharing is off by default");

    fx.dp.set_flow_sharing(true).unwrap();
    let ack = |port| Pkt::tcp(client4(port), fixtures::vip4(80)).build();
    // 40001 opens, finishes its handshake, and a new connection reuses its ports: two
    // new flows. 40002's SYN retransmitted during its handshake and its later packets are
    // one flow.
    for frame in [
        syn(40_001),
        syn(40_002),
        ack(40_001),
        syn(40_002),
        syn(40_001),
    ] {
        forward(&mut fx, &frame);
    }
    forward(&mut fx, &ack(40_002));
    let got = events(&mut ring);
    let ports: Vec<u16> = got.iter().map(|e| u16::from_be(e.flow.sport)).collect();
    assert_eq!(ports, [40_001, 40_002, 40_001], "{got:?}");
    for e in &got {
        // Opened by a SYN: in its handshake when shared.
        assert_eq!(
            (e.backend_id, e.backend_generation),
            (1, 1 | lb_common::FLOW_F_HANDSHAKE),
            "{e:?}"
        );
        let sent = Pkt::tcp(client4(u16::from_be(e.flow.sport)), fixtures::vip4(80));
        assert_eq!(e.flow, sent.flow_key());
    }

    // Nobody reads the ring: it fills, and the rest are lost and counted.
    let room = FLOW_EVENTS_BYTES as u64 / (size_of::<FlowEvent>() as u64 + 8);
    let forwarded = |fx: &fixtures::Fixture| fx.reasons()[Reason::Forwarded as usize].packets;
    let before = forwarded(&fx);
    let extra = 100;
    for i in 0..room + extra {
        forward(&mut fx, &syn(1 + (i % 60_000) as u16));
    }
    assert_eq!(forwarded(&fx) - before, room + extra);
    let lost: u64 = drops.get(&0, 0).unwrap().iter().sum();
    assert_eq!(lost, extra, "events lost to the full ring");
    assert_eq!(events(&mut ring).len() as u64, room);

    fx.dp.set_flow_sharing(false).unwrap();
    forward(&mut fx, &syn(50_000));
    assert!(events(&mut ring).is_empty());
}

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

    // Counted before the move: the first request after it may fail at once.
    let moved_at = keepalive.answers().len();
    bed.route_vips_via(&pair.lb2.host)
        .unwrap_or_else(|e| panic!("{e:#}"));
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
        "flowsync: after the move, {} answers (expected all from {kept}); lb2 forwarded {through_lb2} packets",
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
