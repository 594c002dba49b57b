//! Full NAT in the data plane: the compiled XDP program run by the kernel on crafted frames
//! (BPF_PROG_TEST_RUN), forward and reply, IPv4 and IPv6, TCP and UDP, ICMP errors both
//! ways, port allocation, exhaustion and expiry.
//!
//! Every expected frame is built afresh by etherparse with the translated addresses and
//! ports, so its checksums are computed from scratch, independently of the data plane's
//! incremental updates, and compared byte for byte.
//!
//! The reply path asks the kernel's FIB for the client's next hop, so each test runs in a
//! namespace of its own (`with_veth_in_netns`) with routes and neighbours to the clients
//! (`lb_tests::nat::client_routes`).

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    PacketBuilder, icmpv4::DestUnreachableHeader as Unreach4,
    icmpv6::DestUnreachableCode as Unreach6,
};
use lb::{
    datapath::Datapath,
    nat::sweep::{Timeouts, sweep},
};
use lb_common::{
    BACKEND_F_NAT, FAMILY_V4, FAMILY_V6, NatSnat, PROTO_TCP, PROTO_UDP, Reason, flow_hash,
};
use lb_tests::{
    fixtures::*,
    nat::{LB_VETH_MAC, ROUTER_MAC, client_routes},
};

const SNAT4: &str = "10.1.0.254";
const SNAT6: &str = "fd01::fe";
const PORT_FIRST: u16 = 1024;
const PORT_LAST: u16 = 32767;

/// Backends 1 (10.1.0.1) and 2 (fd01::2) of NAT VIPs VIP4:80/tcp (id 0), VIP4:53/udp
/// (id 1), VIP6:443/tcp (id 2), VIP6:53/udp (id 3); SNAT addresses set for both families.
fn nat_vips(veth: u32, ports: (u16, u16)) -> Fixture {
    client_routes();
    let mut fx = Fixture::with_datapath(Datapath::load().expect("loading the program (root)"));
    fx.dp.add_tx_port(veth).unwrap();
    fx.backend(1, ip("10.1.0.1"), TEST_RUN_IFINDEX);
    fx.backend(2, ip("fd01::2"), TEST_RUN_IFINDEX);
    for id in [1, 2] {
        fx.update_backend(id, |b| b.flags |= BACKEND_F_NAT);
    }
    fx.vip(vip4(80), PROTO_TCP, 0, 0, &[1]);
    fx.vip(vip4(53), PROTO_UDP, 1, 8, &[1]);
    fx.vip(vip6(443), PROTO_TCP, 2, 16, &[2]);
    fx.vip(vip6(53), PROTO_UDP, 3, 24, &[2]);
    for (family, snat) in [(FAMILY_V4, SNAT4), (FAMILY_V6, SNAT6)] {
        let snat = NatSnat {
            addr: addr(ip(snat)),
            port_first: ports.0,
            port_last: ports.1,
            _pad: 0,
        };
        fx.dp.set_nat_snat(family, &snat).unwrap();
    }
    fx
}

fn snat_of(client: SocketAddr) -> IpAddr {
    ip(if client.is_ipv4() { SNAT4 } else { SNAT6 })
}

fn backend_of(client: SocketAddr) -> IpAddr {
    ip(if client.is_ipv4() {
        "10.1.0.1"
    } else {
        "fd01::2"
    })
}

/// The port a new flow's first probe takes (the data plane's rule: from where the flow
/// hashes to in the range).
fn first_port(client: SocketAddr, vip: SocketAddr, proto: u8, ports: (u16, u16)) -> u16 {
    let span = u32::from(ports.1 - ports.0) + 1;
    ports.0 + (flow_hash(&flow_key(client, vip, proto)) % span) as u16
}

/// The same packet between other endpoints and MACs (etherparse computes its checksums).
fn moved(pkt: &Pkt, src: SocketAddr, dst: SocketAddr, macs: ([u8; 6], [u8; 6])) -> Pkt {
    let mut out = if pkt.l4 == L4::Tcp {
        Pkt::tcp(src, dst)
    } else {
        Pkt::udp(src, dst)
    };
    out.tcp_flags = pkt.tcp_flags;
    out.payload = pkt.payload.clone();
    out.src_mac = macs.0;
    out.dst_mac = macs.1;
    out
}

/// Runs a frame; checks the action, the frame that comes out (if given) and that exactly
/// one packet was counted, under `reason`. Returns the frame.
fn check(
    fx: &mut Fixture,
    name: &str,
    frame: &[u8],
    action: u32,
    want: Option<&[u8]>,
    reason: Reason,
) -> Vec<u8> {
    let before = fx.reasons();
    let (got, out) = fx.dp.test_run(frame).unwrap();
    assert_eq!(
        got, action,
        "[{name}] XDP action (1 drop, 2 pass, 3 tx, 4 redirect)"
    );
    if let Some(want) = want {
        assert_frame_eq(name, &out, want);
    }
    let after = fx.reasons();
    for r in Reason::ALL {
        let n = after[r as usize].packets - before[r as usize].packets;
        assert_eq!(
            n,
            u64::from(r == reason),
            "[{name}] counted under {}",
            r.name()
        );
    }
    out
}

/// A client's packet, the backend's answer, and what each must become.
fn round_trip(
    fx: &mut Fixture,
    client: SocketAddr,
    vip: SocketAddr,
    pkt: Pkt,
    answer: Pkt,
    ports: (u16, u16),
) {
    let proto = pkt.proto();
    let port = first_port(client, vip, proto, ports);
    let snat = SocketAddr::new(snat_of(client), port);
    let backend = SocketAddr::new(backend_of(client), vip.port());
    let name = format!("{client} -> {vip} {proto}");
    let fwd = moved(
        &pkt,
        snat,
        backend,
        (
            egress_mac(TEST_RUN_IFINDEX),
            backend_mac(if client.is_ipv4() { 1 } else { 2 }),
        ),
    );
    check(
        fx,
        &format!("{name} forward"),
        &pkt.build(),
        XDP_TX,
        Some(&fwd.build()),
        Reason::Forwarded,
    );
    // The tables hold both halves, each pointing at the other.
    let t = fx
        .dp
        .nat_forward(&flow_key(client, vip, proto))
        .expect("forward entry");
    assert_eq!(t.to, flow_key(snat, backend, proto), "[{name}]");
    let r = fx
        .dp
        .nat_reverse(&flow_key(backend, snat, proto))
        .expect("reverse entry");
    assert_eq!(r.to, flow_key(vip, client, proto), "[{name}]");
    // The answer, from the backend to the SNAT address and port.
    let mut from_backend = moved(&answer, backend, snat, (backend_mac(1), LB_MAC));
    from_backend.payload = answer.payload.clone();
    let to_client = moved(&answer, vip, client, (LB_VETH_MAC, ROUTER_MAC));
    check(
        fx,
        &format!("{name} reply"),
        &from_backend.build(),
        XDP_REDIRECT,
        Some(&to_client.build()),
        Reason::NatReply,
    );
    // Established: the same translation again, nothing new allocated.
    check(
        fx,
        &format!("{name} forward again"),
        &pkt.build(),
        XDP_TX,
        Some(&fwd.build()),
        Reason::Forwarded,
    );
}

const DEFAULT_PORTS: (u16, u16) = (PORT_FIRST, PORT_LAST);

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_are_translated_both_ways() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        for (client, vip) in [(client4(40000), vip4(80)), (client6(40000), vip6(443))] {
            let syn = Pkt::tcp(client, vip).flags(TCP_SYN).payload(&[]);
            let syn_ack = Pkt::tcp(vip, client).flags(TCP_SYN | TCP_ACK).payload(&[]);
            round_trip(&mut fx, client, vip, syn, syn_ack, DEFAULT_PORTS);
        }
        for (client, vip) in [(client4(40001), vip4(53)), (client6(40001), vip6(53))] {
            let query = Pkt::udp(client, vip).payload(b"a dns query");
            let answer = Pkt::udp(vip, client).payload(&[0x5a; 1200]);
            round_trip(&mut fx, client, vip, query, answer, DEFAULT_PORTS);
        }
        let c = fx.dp.nat_counters().unwrap();
        assert_eq!(c.allocated, 4, "{c:?}");
    });
}

/// IPv4 UDP without a checksum (0) stays without one both ways: an incremental update
/// would turn it into a wrong checksum.
#[test]
fn an_ipv4_udp_checksum_of_zero_stays_zero() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        let (client, vip) = (client4(40002), vip4(53));
        let mut frame = Pkt::udp(client, vip).build();
        let l4 = 14 + 20;
        frame[l4 + 6..l4 + 8].fill(0);
        let out = check(
            &mut fx,
            "no checksum",
            &frame,
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        assert_eq!(out[l4 + 6..l4 + 8], [0, 0]);
        let port = first_port(client, vip, PROTO_UDP, DEFAULT_PORTS);
        let mut want = moved(
            &Pkt::udp(client, vip),
            SocketAddr::new(ip(SNAT4), port),
            SocketAddr::new(ip("10.1.0.1"), 53),
            (egress_mac(1), backend_mac(1)),
        )
        .build();
        want[l4 + 6..l4 + 8].fill(0);
        assert_frame_eq("no checksum", &out, &want);
    });
}

/// The SNAT port range is shared by a backend's flows: when every port is taken a new
/// flow is dropped and counted, and an expired translation frees its port.
#[test]
fn ports_run_out_with_a_counted_drop_and_expiry_frees_them() {
    with_veth_in_netns(|veth| {
        let ports = (2000, 2001);
        let mut fx = nat_vips(veth, ports);
        let flow = |p| {
            Pkt::tcp(client4(p), vip4(80))
                .flags(TCP_SYN)
                .payload(&[])
                .build()
        };
        check(
            &mut fx,
            "first",
            &flow(41000),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        check(
            &mut fx,
            "second",
            &flow(41001),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        check(
            &mut fx,
            "third",
            &flow(41002),
            XDP_DROP,
            None,
            Reason::DropNatPortsExhausted,
        );
        let c = fx.dp.nat_counters().unwrap();
        assert_eq!((c.allocated, c.exhausted), (2, 1), "{c:?}");
        assert!(
            c.collisions >= 16,
            "every probe of the third flow collided: {c:?}"
        );
        // The other backend (another address) has its own ports.
        let v6 = Pkt::tcp(client6(41000), vip6(443))
            .flags(TCP_SYN)
            .payload(&[])
            .build();
        check(
            &mut fx,
            "ipv6 backend",
            &v6,
            XDP_TX,
            None,
            Reason::Forwarded,
        );

        // A sweep now keeps everything; one past the established timeout removes both
        // halves of every translation.
        let mut tables = fx.dp.nat_tables().unwrap();
        let t = Timeouts::default();
        let now = lb::datapath::monotonic_ns();
        let kept = sweep(&mut tables, now, &t).unwrap();
        assert_eq!((kept.live, kept.expired, kept.orphans), (3, 0, 0));
        let later = now + (t.tcp.as_nanos() as u64) + 2_000_000_000;
        let gone = sweep(&mut tables, later, &t).unwrap();
        assert_eq!((gone.live, gone.expired, gone.orphans), (0, 3, 0));
        assert!(
            fx.dp
                .nat_forward(&flow_key(client4(41000), vip4(80), PROTO_TCP))
                .is_none()
        );
        check(
            &mut fx,
            "third, after expiry",
            &flow(41002),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
    });
}

/// A closed connection expires soon (FIN both ways, or a RST), an open one does not.
#[test]
fn closed_connections_expire_soon() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        let (open, closed, reset) = (client4(42000), client4(42001), client4(42002));
        for c in [open, closed, reset] {
            let syn = Pkt::tcp(c, vip4(80)).flags(TCP_SYN).payload(&[]).build();
            check(&mut fx, "syn", &syn, XDP_TX, None, Reason::Forwarded);
        }
        let from_backend = |c: SocketAddr, flags| {
            let port = first_port(c, vip4(80), PROTO_TCP, DEFAULT_PORTS);
            Pkt::tcp(
                SocketAddr::new(ip("10.1.0.1"), 80),
                SocketAddr::new(ip(SNAT4), port),
            )
            .flags(flags)
            .build()
        };
        let fin = Pkt::tcp(closed, vip4(80)).flags(TCP_FIN | TCP_ACK).build();
        check(&mut fx, "client fin", &fin, XDP_TX, None, Reason::Forwarded);
        check(
            &mut fx,
            "backend fin",
            &from_backend(closed, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            None,
            Reason::NatReply,
        );
        check(
            &mut fx,
            "backend rst",
            &from_backend(reset, TCP_RST),
            XDP_REDIRECT,
            None,
            Reason::NatReply,
        );
        let mut tables = fx.dp.nat_tables().unwrap();
        let t = Timeouts::default();
        let soon = lb::datapath::monotonic_ns() + t.tcp_closed.as_nanos() as u64 + 2_000_000_000;
        let swept = sweep(&mut tables, soon, &t).unwrap();
        assert_eq!((swept.live, swept.expired), (1, 2));
        assert!(
            fx.dp
                .nat_forward(&flow_key(open, vip4(80), PROTO_TCP))
                .is_some()
        );
        for c in [closed, reset] {
            assert!(
                fx.dp
                    .nat_forward(&flow_key(c, vip4(80), PROTO_TCP))
                    .is_none(),
                "{c}"
            );
        }
    });
}

/// A reply whose client has no route is dropped and counted; one whose next hop has no
/// neighbour entry yet goes to the host translated (which resolves the neighbour); the
/// host's own traffic to the SNAT address passes untouched.
#[test]
fn replies_without_a_next_hop_and_host_traffic() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        let snat_port = |c| first_port(c, vip4(80), PROTO_TCP, DEFAULT_PORTS);
        for (c, reason, action) in [
            (
                SocketAddr::new(ip("203.0.113.9"), 43000),
                Reason::DropNatNoRoute,
                XDP_DROP,
            ),
            (
                SocketAddr::new(ip("198.51.100.9"), 43000),
                Reason::PassNatNoNeigh,
                XDP_PASS,
            ),
        ] {
            let syn = Pkt::tcp(c, vip4(80)).flags(TCP_SYN).payload(&[]);
            check(
                &mut fx,
                "syn",
                &syn.build(),
                XDP_TX,
                None,
                Reason::Forwarded,
            );
            let answer = Pkt::tcp(
                SocketAddr::new(ip("10.1.0.1"), 80),
                SocketAddr::new(ip(SNAT4), snat_port(c)),
            )
            .flags(TCP_SYN | TCP_ACK)
            .payload(&[]);
            let out = check(
                &mut fx,
                reason.name(),
                &answer.build(),
                action,
                None,
                reason,
            );
            if action == XDP_PASS {
                // Only the addresses and ports change: the host picks the MACs.
                let want = moved(&answer, vip4(80), c, (answer.src_mac, answer.dst_mac));
                assert_frame_eq("passed translated", &out, &want.build());
            }
        }
        // The host's own connection from the SNAT address (a health check's answer).
        let host = Pkt::tcp(
            SocketAddr::new(ip("10.1.0.1"), 80),
            SocketAddr::new(ip(SNAT4), 45000),
        )
        .build();
        check(
            &mut fx,
            "host traffic",
            &host,
            XDP_PASS,
            Some(&host),
            Reason::PassNotVip,
        );
    });
}

/// A NAT flow with no SNAT address of its family is dropped and counted.
#[test]
fn without_a_snat_address_new_flows_are_dropped() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        fx.dp.set_nat_snat(FAMILY_V6, &NatSnat::default()).unwrap();
        let syn = Pkt::tcp(client6(44000), vip6(443))
            .flags(TCP_SYN)
            .payload(&[])
            .build();
        check(
            &mut fx,
            "no snat",
            &syn,
            XDP_DROP,
            None,
            Reason::DropNatNoSnat,
        );
    });
}

// ---- ICMP errors ----

/// An ICMP error frame: outer `src` -> `dst`, quoting the packet `quote_src` ->
/// `quote_dst` (its IP header and `quote_l4` bytes of TCP/UDP, whose checksum etherparse
/// computes over the whole original packet). Fragmentation needed / packet too big.
fn icmp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    quote_src: SocketAddr,
    quote_dst: SocketAddr,
    proto: u8,
    quote_l4: usize,
) -> Vec<u8> {
    let ip_hdr = ip_headers(quote_src.ip(), quote_dst.ip(), proto);
    let mut quoted = Vec::new();
    let b = PacketBuilder::ip(ip_hdr);
    if proto == PROTO_TCP {
        b.tcp(quote_src.port(), quote_dst.port(), 7, 1000)
            .ack(9)
            .write(&mut quoted, &[0x42; 1400])
            .unwrap();
    } else {
        b.udp(quote_src.port(), quote_dst.port())
            .write(&mut quoted, &[0x42; 1400])
            .unwrap();
    }
    quoted.truncate(if src.is_ipv4() { 20 } else { 40 } + quote_l4);
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                Unreach4::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut out, &quoted),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6(if proto == PROTO_TCP {
                etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 }
            } else {
                etherparse::Icmpv6Type::DestinationUnreachable(Unreach6::Port)
            })
            .write(&mut out, &quoted),
        _ => unreachable!(),
    }
    .unwrap();
    out
}

/// Errors from either side about a NAT flow reach the other side translated: the outer
/// header and the quoted one (addresses, ports, the quote's IP and TCP/UDP checksums), with
/// the ICMP checksum; for TCP the quote holds the TCP checksum (28 bytes), for UDP the
/// minimal 8.
#[test]
fn icmp_errors_are_translated_both_ways() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        let router = |c: SocketAddr| {
            ip(if c.is_ipv4() {
                "192.0.2.254"
            } else {
                "2001:db8::fe"
            })
        };
        let cases = [
            (client4(46000), vip4(80), PROTO_TCP, 28),
            (client6(46000), vip6(443), PROTO_TCP, 28),
            (client4(46001), vip4(53), PROTO_UDP, 8),
            (client6(46001), vip6(53), PROTO_UDP, 8),
        ];
        for (client, vip, proto, quote_l4) in cases {
            let first = if proto == PROTO_TCP {
                Pkt::tcp(client, vip).flags(TCP_SYN)
            } else {
                Pkt::udp(client, vip)
            };
            check(
                &mut fx,
                "first",
                &first.build(),
                XDP_TX,
                None,
                Reason::Forwarded,
            );
            let port = first_port(client, vip, proto, DEFAULT_PORTS);
            let snat = SocketAddr::new(snat_of(client), port);
            let backend = SocketAddr::new(backend_of(client), vip.port());
            let bmac = backend_mac(if client.is_ipv4() { 1 } else { 2 });
            let name = format!("{client} {proto}");

            // From the clients' side (a router on the path to the client, about the
            // answer VIP -> client): to the backend, about its own packet.
            let frame = icmp_frame(
                (ROUTER_MAC, LB_MAC),
                router(client),
                vip.ip(),
                vip,
                client,
                proto,
                quote_l4,
            );
            let want = icmp_frame(
                (egress_mac(1), bmac),
                snat.ip(),
                backend.ip(),
                backend,
                snat,
                proto,
                quote_l4,
            );
            check(
                &mut fx,
                &format!("{name} to the backend"),
                &frame,
                XDP_TX,
                Some(&want),
                Reason::IcmpErrorForwarded,
            );

            // From the backends' side (the backend itself, about the balancer's packet
            // SNAT -> backend): to the client, from the VIP, about the client's packet.
            let frame = icmp_frame(
                (bmac, LB_MAC),
                backend.ip(),
                snat.ip(),
                snat,
                backend,
                proto,
                quote_l4,
            );
            let want = icmp_frame(
                (LB_VETH_MAC, ROUTER_MAC),
                vip.ip(),
                client.ip(),
                client,
                vip,
                proto,
                quote_l4,
            );
            check(
                &mut fx,
                &format!("{name} to the client"),
                &frame,
                XDP_REDIRECT,
                Some(&want),
                Reason::NatIcmpReply,
            );
        }
        // An error about a connection no translation knows is the host's.
        let stray = icmp_frame(
            (ROUTER_MAC, LB_MAC),
            ip("10.1.0.1"),
            ip(SNAT4),
            SocketAddr::new(ip(SNAT4), 45000),
            SocketAddr::new(ip("10.1.0.1"), 80),
            PROTO_TCP,
            8,
        );
        check(
            &mut fx,
            "stray error",
            &stray,
            XDP_PASS,
            Some(&stray),
            Reason::PassNotVip,
        );
    });
}

/// A new connection reusing a closed one's ports (its SYN, the backend's SYN-ACK) starts
/// with no FIN noted either way, so it gets an open connection's idle time, not a closed
/// one's.
#[test]
fn a_new_connection_on_closed_ports_starts_afresh() {
    with_veth_in_netns(|veth| {
        let mut fx = nat_vips(veth, DEFAULT_PORTS);
        let (client, vip) = (client4(47000), vip4(80));
        let port = first_port(client, vip, PROTO_TCP, DEFAULT_PORTS);
        let backend = SocketAddr::new(ip("10.1.0.1"), 80);
        let snat = SocketAddr::new(ip(SNAT4), port);
        let to_vip = |flags| Pkt::tcp(client, vip).flags(flags).payload(&[]).build();
        let to_snat = |flags| Pkt::tcp(backend, snat).flags(flags).payload(&[]).build();
        check(
            &mut fx,
            "syn",
            &to_vip(TCP_SYN),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        check(
            &mut fx,
            "client fin",
            &to_vip(TCP_FIN | TCP_ACK),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        let fin = to_snat(TCP_FIN | TCP_ACK);
        check(
            &mut fx,
            "backend fin",
            &fin,
            XDP_REDIRECT,
            None,
            Reason::NatReply,
        );
        let flags = |fx: &Fixture| {
            let f = fx
                .dp
                .nat_forward(&flow_key(client, vip, PROTO_TCP))
                .unwrap();
            let r = fx
                .dp
                .nat_reverse(&flow_key(backend, snat, PROTO_TCP))
                .unwrap();
            (f.flags, r.flags)
        };
        assert_ne!(flags(&fx), (0, 0), "the close is noted");
        check(
            &mut fx,
            "new syn",
            &to_vip(TCP_SYN),
            XDP_TX,
            None,
            Reason::Forwarded,
        );
        let syn_ack = to_snat(TCP_SYN | TCP_ACK);
        check(
            &mut fx,
            "new syn-ack",
            &syn_ack,
            XDP_REDIRECT,
            None,
            Reason::NatReply,
        );
        assert_eq!(flags(&fx), (0, 0), "a new connection on the same ports");
    });
}
