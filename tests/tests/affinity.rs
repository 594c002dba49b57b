//! Data-plane fixtures for source affinity (`--persist`), least connections
//! (`--algo leastconn`) and the RST that refuses a SYN to a VIP with no backend: the real
//! XDP program run on crafted frames (BPF_PROG_TEST_RUN), each frame checked byte for byte
//! and every packet counted under its one reason (see `lb_tests::fixtures`).
//!
//! Needs root. Every test loads its own program, so maps and cursors start fresh.

use std::{net::SocketAddr, time::Duration};

use etherparse::{PacketBuilder, VlanId};
use lb_common::{
    BACKEND_F_KEEP_FLOWS, BACKEND_F_LEASTCONN, FAMILY_V4, FlowKey, PROTO_TCP, Reason, VIP_F_HASH,
    VIP_F_LEASTCONN, VipMeta, flow_hash,
};
use lb_tests::fixtures::*;

const MINUTE_NS: u64 = 60_000_000_000;

/// A /64 mask as `VipMeta::persist_mask6` holds it.
fn mask64() -> [u32; 4] {
    [u32::MAX, u32::MAX, 0, 0]
}

/// Backends 1, 2, 3 (IPv4) and 4, 5, 6 (IPv6), all behind the test-run ingress.
fn six_backends() -> Fixture {
    let mut fx = Fixture::new();
    fx.backends4(3);
    for id in 4..=6 {
        fx.backend(id, ip(&format!("fd01::{id}")), TEST_RUN_IFINDEX);
    }
    fx
}

fn persist_meta(vip_id: u32, ring_off: u32, persist_ns: u64, flags: u32) -> VipMeta {
    VipMeta {
        vip_id,
        ring_off,
        flags,
        persist_ns,
        persist_mask6: mask64(),
        ..Default::default()
    }
}

fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    Pkt::tcp(src, dst).flags(TCP_SYN).build()
}

fn at(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// Which backend a frame was sent to (by the destination MAC the fixture gives each id),
/// for runs whose choice the test reads rather than predicts.
fn backend_of(out: &[u8]) -> u32 {
    assert_eq!(
        &out[0..4],
        &[0x02, 0xbe, 0, 0],
        "not sent to a backend: {out:02x?}"
    );
    u32::from(u16::from_be_bytes([out[4], out[5]]))
}

// ---- source affinity ---------------------------------------------------------------------------

#[test]
fn a_clients_connections_all_go_to_its_first_backend_and_other_clients_still_spread() {
    let mut fx = six_backends();
    fx.vip_with_meta(
        vip4(443),
        PROTO_TCP,
        &[1, 2, 3],
        persist_meta(0, 0, MINUTE_NS, 0),
    );
    // Round robin from a fresh cursor: the first client takes backend 1, the next ones 2, 3.
    for port in 1000..1020 {
        fx.run(&Case::new(
            format!("client A, connection from port {port}"),
            syn(at("192.0.2.1", port), vip4(443)),
            Expect::tx(0, 1, true),
        ));
    }
    for (client, backend) in [("192.0.2.2", 2), ("192.0.2.3", 3), ("192.0.2.4", 1)] {
        for port in [2000, 2001] {
            fx.run(&Case::new(
                format!("client {client}, port {port}"),
                syn(at(client, port), vip4(443)),
                Expect::tx(0, backend, true),
            ));
        }
    }
    // 19 + 3 second connections followed their client's first.
    assert_eq!(fx.dp.persisted_flows(1).unwrap(), vec![22]);
}

#[test]
fn an_ipv6_client_is_its_64_prefix() {
    let mut fx = six_backends();
    fx.vip_with_meta(
        vip6(443),
        PROTO_TCP,
        &[4, 5, 6],
        persist_meta(2, 0, MINUTE_NS, 0),
    );
    let cases = [
        ("2001:db8:0:1::1", 4),
        ("2001:db8:0:1::2", 4),
        ("2001:db8:0:1:ffff::9", 4),
        ("2001:db8:0:2::1", 5),
        ("2001:db8:0:2::77", 5),
    ];
    for (i, (client, backend)) in cases.into_iter().enumerate() {
        fx.run(&Case::new(
            client,
            syn(at(client, 3000 + i as u16), vip6(443)),
            Expect::tx(2, backend, true),
        ));
    }
    // With a /128 prefix every address is a client of its own.
    let mut fx = six_backends();
    let meta = VipMeta {
        persist_mask6: [u32::MAX; 4],
        ..persist_meta(2, 0, MINUTE_NS, 0)
    };
    fx.vip_with_meta(vip6(443), PROTO_TCP, &[4, 5, 6], meta);
    for (i, (client, backend)) in [("2001:db8::1", 4), ("2001:db8::2", 5)]
        .into_iter()
        .enumerate()
    {
        fx.run(&Case::new(
            format!("/128: {client}"),
            syn(at(client, 3000 + i as u16), vip6(443)),
            Expect::tx(2, backend, true),
        ));
    }
}

#[test]
fn a_draining_backend_keeps_its_clients_and_a_failed_one_loses_them() {
    let mut fx = six_backends();
    let meta = persist_meta(0, 0, MINUTE_NS, 0);
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[1, 2], meta);
    let client = |port| syn(at("192.0.2.1", port), vip4(443));
    fx.run(&Case::new(
        "bound to 1",
        client(1000),
        Expect::tx(0, 1, true),
    ));
    // Drained (out of the ring, still keeping flows): the client stays.
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[2], meta);
    fx.run(&Case::new(
        "draining: stays",
        client(1001),
        Expect::tx(0, 1, true),
    ));
    // Even with no backend in rotation at all, a bound client is still served.
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[], meta);
    fx.run(&Case::new(
        "empty ring: stays",
        client(1002),
        Expect::tx(0, 1, true),
    ));
    // Failed (keeps no flows): the client moves, and stays where it moved.
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[2], meta);
    fx.update_backend(1, |b| b.flags &= !BACKEND_F_KEEP_FLOWS);
    fx.run(&Case::new(
        "failed: moves",
        client(1003),
        Expect::tx(0, 2, true),
    ));
    fx.update_backend(1, |b| b.flags |= BACKEND_F_KEEP_FLOWS);
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[1, 2], meta);
    fx.run(&Case::new(
        "back up: stays on 2",
        client(1004),
        Expect::tx(0, 2, true),
    ));
    // A backend id given to another server (a new generation) binds nobody.
    fx.update_backend(2, |b| b.generation += 1);
    fx.run(&Case::new(
        "reused id: balanced afresh",
        client(1005),
        Expect::tx(0, 1, true),
    ));
}

#[test]
fn affinity_ends_persist_after_the_clients_last_new_flow() {
    let mut fx = six_backends();
    // 50 ms, so the test can outwait it: only a lower bound on time is relied on.
    let meta = persist_meta(0, 0, 50_000_000, 0);
    fx.vip_with_meta(vip4(443), PROTO_TCP, &[1, 2], meta);
    let client = |port| syn(at("192.0.2.1", port), vip4(443));
    fx.run(&Case::new("first", client(1000), Expect::tx(0, 1, true)));
    std::thread::sleep(Duration::from_millis(200));
    // Forgotten: round robin's next turn.
    fx.run(&Case::new(
        "after expiry",
        client(1001),
        Expect::tx(0, 2, true),
    ));
    assert_eq!(fx.dp.persisted_flows(1).unwrap(), vec![0]);
}

#[test]
fn weights_still_place_new_clients() {
    let mut fx = six_backends();
    // Weight 2:1 as the agent's ring gives it.
    fx.vip_with_meta(
        vip4(443),
        PROTO_TCP,
        &[1, 2, 1],
        persist_meta(0, 0, MINUTE_NS, 0),
    );
    for (i, backend) in [1, 2, 1, 1, 2, 1].into_iter().enumerate() {
        let client = format!("192.0.2.{}", 10 + i);
        for port in [5000, 5001] {
            fx.run(&Case::new(
                format!("{client}:{port}"),
                syn(at(&client, port), vip4(443)),
                Expect::tx(0, backend, true),
            ));
        }
    }
}

/// On a Maglev VIP with affinity a client's place is the hash of its source alone: a second
/// balancer (fresh maps) that never saw the client sends every one of its connections to
/// the same backend as the first.
#[test]
fn maglev_with_affinity_places_a_client_by_its_source_alone() {
    let ring: Vec<u32> = (0..31).map(|i| 1 + i % 3).collect();
    let meta = persist_meta(0, 0, MINUTE_NS, VIP_F_HASH);
    let mut balancers = [six_backends(), six_backends()];
    for fx in &mut balancers {
        fx.vip_with_meta(vip4(443), PROTO_TCP, &ring, meta);
    }
    for client in ["192.0.2.1", "192.0.2.2", "198.51.100.7", "203.0.113.200"] {
        let source = FlowKey {
            src: addr(ip(client)),
            family: FAMILY_V4,
            ..Default::default()
        };
        let backend = ring[(flow_hash(&source) % ring.len() as u32) as usize];
        for (b, fx) in balancers.iter_mut().enumerate() {
            for port in [40000, 40001, 50123] {
                fx.run(&Case::new(
                    format!("balancer {b}, {client}:{port}"),
                    syn(at(client, port), vip4(443)),
                    Expect::tx(0, backend, true),
                ));
            }
        }
    }
}

// ---- least connections -------------------------------------------------------------------------

/// A least-connections ring: (id, weight) pairs.
fn lc_ring(members: &[(u32, u32)]) -> Vec<u32> {
    members.iter().flat_map(|(id, w)| [*id, *w]).collect()
}

fn lc_meta() -> VipMeta {
    VipMeta {
        vip_id: 0,
        ring_off: 0,
        flags: VIP_F_LEASTCONN,
        ..Default::default()
    }
}

/// Backends 1 to 3 as the agent writes them for a least-connections VIP: flagged, so their
/// established packets are watched for the client's FIN or RST.
fn leastconn_backends() -> Fixture {
    let mut fx = six_backends();
    for id in 1..=3 {
        fx.update_backend(id, |b| b.flags |= BACKEND_F_LEASTCONN);
    }
    fx
}

fn active(fx: &Fixture) -> Vec<u64> {
    fx.dp.active_flows(4).unwrap()[1..].to_vec()
}

/// The case: a backend holding 50 long connections gets no new one until the
/// others have caught up with it; a client's FIN frees its connection's place (once, even
/// if the FIN is sent again or a RST follows).
#[test]
fn a_backend_holding_50_connections_gets_no_new_one_until_the_others_catch_up() {
    let mut fx = leastconn_backends();
    // Backend 1 alone first: it takes 50 connections.
    fx.vip_with_meta(vip4(3306), PROTO_TCP, &lc_ring(&[(1, 1)]), lc_meta());
    let conn = |i: u16| Pkt::tcp(at("192.0.2.1", 10_000 + i), vip4(3306));
    for i in 0..50 {
        fx.run(&Case::new(
            format!("to 1 alone: {i}"),
            conn(i).flags(TCP_SYN).build(),
            Expect::tx(0, 1, true),
        ));
    }
    assert_eq!(active(&fx), vec![50, 0, 0]);
    // Backends 2 and 3 join: the next 100 go to them, none to 1.
    fx.vip_with_meta(
        vip4(3306),
        PROTO_TCP,
        &lc_ring(&[(1, 1), (2, 1), (3, 1)]),
        lc_meta(),
    );
    let mut got = [0u32; 4];
    for i in 50..150 {
        let (action, out) = fx.dp.test_run(&conn(i).flags(TCP_SYN).build()).unwrap();
        assert_eq!(action, XDP_TX);
        got[backend_of(&out) as usize] += 1;
    }
    assert_eq!(
        got,
        [0, 0, 50, 50],
        "new connections by backend while 1 holds 50"
    );
    assert_eq!(active(&fx), vec![50, 50, 50]);
    // Caught up: the next three go one to each.
    let mut got = [0u32; 4];
    for i in 150..153 {
        let (_, out) = fx.dp.test_run(&conn(i).flags(TCP_SYN).build()).unwrap();
        got[backend_of(&out) as usize] += 1;
    }
    assert_eq!(got, [0, 1, 1, 1]);
    // Ten of backend 1's clients close (FIN, then the FIN again and a RST: counted once).
    for i in 0..10 {
        let fin = conn(i).flags(TCP_FIN | TCP_ACK).build();
        fx.run(&Case::new(
            format!("FIN {i}"),
            fin.clone(),
            Expect::tx(0, 1, false),
        ));
        fx.run(&Case::new(
            format!("FIN again {i}"),
            fin,
            Expect::tx(0, 1, false),
        ));
        let rst = conn(i).flags(TCP_RST | TCP_ACK).build();
        fx.run(&Case::new(format!("RST {i}"), rst, Expect::tx(0, 1, false)));
    }
    assert_eq!(active(&fx), vec![41, 51, 51]);
    // Data on open connections changes nothing; the next ten go to backend 1.
    fx.run(&Case::new(
        "data",
        conn(20).build(),
        Expect::tx(0, 1, false),
    ));
    for i in 200..210 {
        fx.run(&Case::new(
            format!("refill {i}"),
            conn(i).flags(TCP_SYN).build(),
            Expect::tx(0, 1, true),
        ));
    }
    assert_eq!(active(&fx), vec![51, 51, 51]);
}

/// A VIP with more backends than one pick compares (`MAX_LEASTCONN_BACKENDS`): the window
/// of compared backends rotates over the whole ring, so every backend takes flows; equal
/// ones take turns, one new flow each.
#[test]
fn least_connections_reaches_every_backend_of_a_ring_longer_than_one_pick_compares() {
    let count = lb_common::MAX_LEASTCONN_BACKENDS + 36;
    let mut fx = Fixture::new();
    for id in 1..=count {
        fx.backend(
            id,
            ip(&format!("10.1.{}.{}", id / 200, id % 200 + 1)),
            TEST_RUN_IFINDEX,
        );
        fx.update_backend(id, |b| b.flags |= BACKEND_F_LEASTCONN);
    }
    let pairs: Vec<(u32, u32)> = (1..=count).map(|id| (id, 1)).collect();
    fx.vip_with_meta(vip4(3306), PROTO_TCP, &lc_ring(&pairs), lc_meta());
    let mut got = vec![0u32; count as usize + 1];
    for i in 0..count as u16 {
        let frame = Pkt::tcp(at("192.0.2.1", 10_000 + i), vip4(3306))
            .flags(TCP_SYN)
            .build();
        let (action, out) = fx.dp.test_run(&frame).unwrap();
        assert_eq!(action, XDP_TX);
        got[backend_of(&out) as usize] += 1;
    }
    let missed: Vec<usize> = (1..=count as usize).filter(|&id| got[id] != 1).collect();
    assert!(
        missed.is_empty(),
        "backends without exactly one new flow: {missed:?}"
    );
}

#[test]
fn least_connections_is_relative_to_weight() {
    let mut fx = leastconn_backends();
    fx.vip_with_meta(
        vip4(3306),
        PROTO_TCP,
        &lc_ring(&[(1, 2), (2, 1)]),
        lc_meta(),
    );
    for i in 0..30 {
        let frame = Pkt::tcp(at("192.0.2.1", 10_000 + i), vip4(3306))
            .flags(TCP_SYN)
            .build();
        let (action, _) = fx.dp.test_run(&frame).unwrap();
        assert_eq!(action, XDP_TX);
    }
    assert_eq!(active(&fx)[..2], [20, 10]);
}

/// A client reusing a 5-tuple (a new SYN on a counted flow) is one connection, not two.
#[test]
fn a_reopened_five_tuple_is_counted_once() {
    let mut fx = leastconn_backends();
    fx.vip_with_meta(
        vip4(3306),
        PROTO_TCP,
        &lc_ring(&[(1, 1), (2, 1)]),
        lc_meta(),
    );
    let frame = Pkt::tcp(at("192.0.2.1", 10_000), vip4(3306))
        .flags(TCP_SYN)
        .build();
    for _ in 0..3 {
        fx.dp.test_run(&frame).unwrap();
    }
    assert_eq!(active(&fx)[..2].iter().sum::<u64>(), 1, "{:?}", active(&fx));
}

// ---- the refusal -------------------------------------------------------------------------------

/// The RST the data plane must answer a SYN with: built afresh by etherparse (checksums
/// computed, not patched): MACs, addresses and ports swapped, sequence 0, acknowledging the
/// SYN and its payload, no options, TTL 64 and DF.
fn expected_rst(syn: &Pkt, client: SocketAddr, vip: SocketAddr, payload: usize) -> Vec<u8> {
    let ack = 0x1234_5678u32.wrapping_add(1 + payload as u32);
    let eth = PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC);
    let ip = ip_headers(vip.ip(), client.ip(), PROTO_TCP);
    let builder = match syn.vlan {
        Some(vid) => eth.single_vlan(VlanId::try_new(vid).unwrap()).ip(ip),
        None => eth.ip(ip),
    };
    let mut out = Vec::new();
    builder
        .tcp(vip.port(), client.port(), 0, 0)
        .rst()
        .ack(ack)
        .write(&mut out, &[])
        .unwrap();
    out
}

#[test]
fn a_syn_to_a_vip_with_no_backend_is_answered_with_a_rst() {
    let mut fx = six_backends();
    fx.vip(vip4(443), PROTO_TCP, 0, 0, &[]);
    fx.vip(vip6(443), PROTO_TCP, 1, 8, &[]);
    let cases = [
        (client4(40000), vip4(443), None, b"".as_slice()),
        (client4(40001), vip4(443), Some(7), b"".as_slice()),
        (
            client4(40002),
            vip4(443),
            None,
            b"TFO data in the SYN".as_slice(),
        ),
        (client6(40000), vip6(443), None, b"".as_slice()),
        (client6(40001), vip6(443), Some(7), b"x".as_slice()),
    ];
    for (client, vip, vlan, payload) in cases {
        let mut pkt = Pkt::tcp(client, vip).flags(TCP_SYN).payload(payload);
        if let Some(vid) = vlan {
            pkt = pkt.vlan(vid);
        }
        let answer = expected_rst(&pkt, client, vip, payload.len());
        fx.run(&Case::answered(
            format!(
                "SYN {client} -> {vip} vlan {vlan:?}, {} bytes of payload",
                payload.len()
            ),
            pkt.build(),
            answer,
            Reason::ResetNoBackend,
        ));
    }
    // Anything but a SYN is still dropped: a RST is no answer to a RST, nor to data.
    for flags in [TCP_ACK | TCP_PSH, TCP_RST, TCP_FIN | TCP_ACK] {
        fx.run(&Case::new(
            format!("flags {flags:#x}"),
            Pkt::tcp(client4(40003), vip4(443)).flags(flags).build(),
            Expect::Drop(Reason::DropNoBackend),
        ));
    }
    fx.vip(vip4(53), lb_common::PROTO_UDP, 2, 16, &[]);
    fx.run(&Case::new(
        "udp",
        Pkt::udp(client4(40003), vip4(53)).build(),
        Expect::Drop(Reason::DropNoBackend),
    ));
}
