//! Data-plane fixtures of tunnel and gue modes (lb-ebpf/src/tunnel.rs) and of `lb decap`
//! (lb-ebpf/src/decap.rs): the compiled programs run by the kernel on crafted frames
//! (BPF_PROG_TEST_RUN), maps written through the agent's own code (`Mode::backend_flags`,
//! `TunnelSettings::entry`, `Decap`). Every expected frame is built with etherparse, whose
//! checksums are the independent check of the program's.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN).

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpNumber,
    Ipv4Header, Ipv6FlowLabel, Ipv6Header, UdpHeader, icmpv4::DestUnreachableHeader,
};
use lb::{decap::Decap, model::Mode, tunnel::TunnelSettings};
use lb_common::{Backend, DecapReason, Reason, TunnelConfig, flow_hash};
use lb_tests::fixtures::*;

const SOURCE_V4: &str = "10.0.0.2";
const SOURCE_V6: &str = "fd00::2";
const GUE_PORT: u16 = 7777;

fn settings() -> TunnelSettings {
    TunnelSettings {
        source_v4: Some(SOURCE_V4.parse().unwrap()),
        source_v6: Some(SOURCE_V6.parse().unwrap()),
        gue_port: Some(GUE_PORT),
    }
}

/// `four_vips`, every backend in `mode`, the balancer's tunnel end set as the agent sets it.
fn tunnel_vips(mode: Mode) -> (Fixture, TunnelConfig) {
    let mut fx = four_vips();
    for id in 1..=4 {
        fx.update_backend(id, |b| b.flags |= mode.backend_flags());
    }
    let entry = settings().entry(&[]);
    fx.dp.set_tunnel(&entry).unwrap();
    (fx, entry)
}

fn octets4(ip: &str) -> [u8; 4] {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    }
}

fn octets6(ip: &str) -> [u8; 16] {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V6(a) => a.octets(),
        _ => unreachable!(),
    }
}

fn backend_ip(b: &Backend) -> IpAddr {
    lb_common::addr_from_map(b.addr, b.family)
}

/// What `input` (a frame to a VIP) must leave as, for `backend`: the next hop's MACs, the
/// outer header (and GUE's UDP header), then the client's IP packet unchanged.
fn encapsulated(pkt: &Pkt, backend: &Backend, gue: bool) -> Vec<u8> {
    let input = pkt.build();
    let inner = &input[14..];
    let hash = flow_hash(&pkt.flow_key());
    let sport = 0xc000 | (hash as u16 & 0x3fff);
    let mut out = Vec::new();
    let udp_len = (8 + inner.len()) as u16;
    match backend_ip(backend) {
        IpAddr::V4(dst) => {
            Ethernet2Header {
                source: backend.src_mac,
                destination: backend.mac,
                ether_type: EtherType::IPV4,
            }
            .write(&mut out)
            .unwrap();
            let (client, _) = Ipv4Header::from_slice(inner).unwrap();
            let extra = if gue { 8 } else { 0 };
            let proto = if gue { IpNumber::UDP } else { IpNumber(4) };
            let mut ip = Ipv4Header::new(
                (inner.len() + extra) as u16,
                64,
                proto,
                octets4(SOURCE_V4),
                dst.octets(),
            )
            .unwrap();
            ip.dont_fragment = client.dont_fragment;
            ip.dscp = client.dscp;
            ip.ecn = client.ecn;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut out).unwrap();
            if gue {
                // IPv4 UDP may go without a checksum; the inner packet carries its own.
                let udp = UdpHeader {
                    source_port: sport,
                    destination_port: GUE_PORT,
                    length: udp_len,
                    checksum: 0,
                };
                udp.write(&mut out).unwrap();
            }
        }
        IpAddr::V6(dst) => {
            Ethernet2Header {
                source: backend.src_mac,
                destination: backend.mac,
                ether_type: EtherType::IPV6,
            }
            .write(&mut out)
            .unwrap();
            let (client, _) = Ipv6Header::from_slice(inner).unwrap();
            let ip = Ipv6Header {
                traffic_class: client.traffic_class,
                flow_label: Ipv6FlowLabel::try_new(hash & 0xf_ffff).unwrap(),
                payload_length: if gue { udp_len } else { inner.len() as u16 },
                next_header: if gue { IpNumber::UDP } else { IpNumber::IPV6 },
                hop_limit: 64,
                source: octets6(SOURCE_V6),
                destination: dst.octets(),
            };
            ip.write(&mut out).unwrap();
            if gue {
                UdpHeader::with_ipv6_checksum(sport, GUE_PORT, &ip, inner)
                    .unwrap()
                    .write(&mut out)
                    .unwrap();
            }
        }
    }
    out.extend_from_slice(inner);
    out
}

/// Runs `pkt` through the balancer and checks the frame that leaves, its action and that it
/// is counted as forwarded under its VIP; returns the frame.
fn check_encapsulated(fx: &mut Fixture, name: &str, pkt: &Pkt, id: u32, gue: bool) -> Vec<u8> {
    let before = fx.reasons()[Reason::Forwarded as usize];
    let (action, out) = fx.dp.test_run(&pkt.build()).unwrap();
    assert_eq!(action, XDP_TX, "[{name}] action");
    let backend = fx.backends()[&id];
    assert_frame_eq(name, &out, &encapsulated(pkt, &backend, gue));
    let after = fx.reasons()[Reason::Forwarded as usize];
    assert_eq!(after.packets - before.packets, 1, "[{name}] forwarded");
    out
}

fn cases() -> Vec<(&'static str, Pkt, u32)> {
    vec![
        ("ipv4 tcp", Pkt::tcp(client4(40000), vip4(80)), 1),
        (
            "ipv4 udp, 1400 bytes",
            Pkt::udp(client4(40001), vip4(53)).payload(&[0xa5; 1372]),
            2,
        ),
        ("ipv6 tcp", Pkt::tcp(client6(40000), vip6(443)), 3),
        (
            "ipv6 udp, odd length",
            Pkt::udp(client6(40001), vip6(53)).payload(&[0x5a; 333]),
            4,
        ),
        (
            "ipv6 tcp syn, no payload",
            Pkt::tcp(client6(40002), vip6(443))
                .flags(TCP_SYN)
                .payload(&[]),
            3,
        ),
    ]
}

#[test]
fn tunnel_mode_wraps_the_packet_in_ip_in_ip_to_the_backend() {
    let (mut fx, _) = tunnel_vips(Mode::Tunnel);
    for (name, pkt, id) in cases() {
        check_encapsulated(&mut fx, name, &pkt, id, false);
        // The flow's second packet goes the same way.
        check_encapsulated(&mut fx, name, &pkt, id, false);
    }
}

#[test]
fn gue_mode_adds_udp_to_the_gue_port_from_a_port_of_the_flow() {
    let (mut fx, _) = tunnel_vips(Mode::Gue);
    for (name, pkt, id) in cases() {
        check_encapsulated(&mut fx, name, &pkt, id, true);
    }
    // Flows of one client spread over outer source ports (a NIC's receive hash spreads
    // them over queues).
    let ports: std::collections::HashSet<u16> = (0..16)
        .map(|i| {
            let pkt = Pkt::udp(client4(41000 + i), vip4(53));
            let out = check_encapsulated(&mut fx, "spread", &pkt, 2, true);
            u16::from_be_bytes([out[34], out[35]])
        })
        .collect();
    assert!(ports.len() > 12, "16 flows, {} source ports", ports.len());
}

/// Routed backends: the frame goes to the router's MAC (the agent's resolution puts the
/// gateway's MAC in the backend entry) while the outer destination is the backend.
#[test]
fn a_routed_backend_gets_the_routers_mac_and_its_own_address() {
    let (mut fx, _) = tunnel_vips(Mode::Tunnel);
    let router = [0x02, 0x0e, 0x0e, 0, 0, 1];
    fx.update_backend(1, |b| b.mac = router);
    let pkt = Pkt::tcp(client4(40000), vip4(80));
    let out = check_encapsulated(&mut fx, "routed", &pkt, 1, false);
    assert_eq!(out[0..6], router);
    assert_eq!(out[14 + 16..14 + 20], octets4("10.1.0.1"));
}

#[test]
fn without_an_outer_source_the_packet_is_dropped_and_counted() {
    let mut fx = four_vips();
    fx.update_backend(1, |b| b.flags |= Mode::Tunnel.backend_flags());
    // No address of that family: the agent found none and none was configured.
    let entry = TunnelSettings {
        source_v6: Some(SOURCE_V6.parse().unwrap()),
        ..Default::default()
    }
    .entry(&[]);
    fx.dp.set_tunnel(&entry).unwrap();
    fx.run(&Case::new(
        "no ipv4 source",
        Pkt::tcp(client4(40000), vip4(80)).build(),
        Expect::Drop(Reason::DropTunnelNoSource),
    ));
}

/// The ICMP error the balancer must answer a too-big `pkt` with, giving `mtu`.
fn too_big_answer(pkt: &Pkt, mtu: u16) -> Vec<u8> {
    let input = pkt.build();
    let mut out = Vec::new();
    let v4 = matches!(pkt.ip, etherparse::IpHeaders::Ipv4(..));
    Ethernet2Header {
        source: LB_MAC,
        destination: CLIENT_MAC,
        ether_type: if v4 { EtherType::IPV4 } else { EtherType::IPV6 },
    }
    .write(&mut out)
    .unwrap();
    if v4 {
        let quote = &input[14..14 + 28];
        let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        });
        let icmp = Icmpv4Header::with_checksum(kind, quote);
        let mut ip = Ipv4Header::new(
            (8 + quote.len()) as u16,
            64,
            IpNumber::ICMP,
            octets4(VIP4),
            octets4("192.0.2.1"),
        )
        .unwrap();
        ip.dont_fragment = false;
        ip.header_checksum = ip.calc_header_checksum();
        ip.write(&mut out).unwrap();
        icmp.write(&mut out).unwrap();
        out.extend_from_slice(quote);
    } else {
        let quote = &input[14..14 + 48];
        let (src, dst) = (octets6(VIP6), octets6("2001:db8::1"));
        let icmp = Icmpv6Header::with_checksum(
            Icmpv6Type::PacketTooBig { mtu: mtu as u32 },
            src,
            dst,
            quote,
        )
        .unwrap();
        Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (8 + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: src,
            destination: dst,
        }
        .write(&mut out)
        .unwrap();
        icmp.write(&mut out).unwrap();
        out.extend_from_slice(quote);
    }
    out
}

/// A packet that would not fit the egress MTU once wrapped is answered with ICMP
/// "fragmentation needed" / "packet too big" giving the MTU minus the outer header, back to
/// the client (XDP_TX), counted under its own reason; one that fits exactly is forwarded.
#[test]
fn a_packet_too_big_for_the_tunnel_is_answered_with_the_mtu_that_fits() {
    with_veth_in_netns(|egress| {
        let status = std::process::Command::new("ip")
            .args(["link", "set", "lbt0", "mtu", "1300"])
            .status()
            .expect("running ip link set");
        assert!(status.success(), "setting the MTU of lbt0: {status}");
        for (mode, v4_overhead, v6_overhead) in [(Mode::Tunnel, 20, 40), (Mode::Gue, 28, 48)] {
            let (mut fx, _) = tunnel_vips(mode);
            // Backends behind the veth: what fits is forwarded by redirect.
            for id in 1..=4 {
                fx.update_backend(id, |b| {
                    b.ifindex = egress;
                    b.src_mac = egress_mac(egress);
                });
            }
            fx.dp.add_tx_port(egress).unwrap();
            for (name, client, vip, id, overhead, headers) in [
                ("ipv4", client4(40000), vip4(53), 2, v4_overhead, 28),
                ("ipv6", client6(40000), vip6(53), 4, v6_overhead, 48),
            ] {
                let fits = 1300 - overhead;
                let name = format!("{mode} {name}");
                let big = Pkt::udp(client, vip).payload(&vec![7; fits + 1 - headers]);
                fx.run(&Case::answered(
                    format!("{name}, one byte too big"),
                    big.build(),
                    too_big_answer(&big, fits as u16),
                    Reason::TunnelTooBig,
                ));
                let exact = Pkt::udp(client, vip).payload(&vec![7; fits - headers]);
                let before = fx.reasons()[Reason::Forwarded as usize].packets;
                let (action, out) = fx.dp.test_run(&exact.build()).unwrap();
                assert_eq!(action, XDP_REDIRECT, "[{name}] exactly fits");
                let backend = fx.backends()[&id];
                assert_frame_eq(
                    &name,
                    &out,
                    &encapsulated(&exact, &backend, mode == Mode::Gue),
                );
                assert_eq!(fx.reasons()[Reason::Forwarded as usize].packets, before + 1);
            }
        }
    });
}

// ---- lb decap --------------------------------------------------------------------------------

fn decap_counts(d: &Decap) -> Vec<u64> {
    d.counters().unwrap().iter().map(|c| c.packets).collect()
}

/// The frame `lb decap` must pass up for an encapsulated `outer`: its Ethernet header with
/// the inner family's EtherType, then the client's IP packet as it left the client.
fn stripped(outer: &[u8], client_frame: &[u8]) -> Vec<u8> {
    let mut want = outer[0..12].to_vec();
    want.extend_from_slice(&client_frame[12..]);
    want
}

#[test]
fn decap_strips_tunnels_to_its_vips_and_passes_everything_else_untouched() {
    let mut decap = Decap::load(Some(GUE_PORT)).expect("loading lb decap (run as root)");
    decap.add_vip(VIP4.parse().unwrap()).unwrap();
    decap.add_vip(VIP6.parse().unwrap()).unwrap();
    let mut expected = vec![0u64; DecapReason::ALL.len()];
    for mode in [Mode::Tunnel, Mode::Gue] {
        let (mut fx, _) = tunnel_vips(mode);
        for (name, pkt, id) in cases() {
            let outer = check_encapsulated(&mut fx, name, &pkt, id, mode == Mode::Gue);
            let (action, out) = decap.test_run(&outer).unwrap();
            assert_eq!(action, XDP_PASS, "[decap {mode} {name}]");
            assert_frame_eq(
                &format!("decap {mode} {name}"),
                &out,
                &stripped(&outer, &pkt.build()),
            );
            expected[DecapReason::Decapsulated as usize] += 1;
            assert_eq!(decap_counts(&decap), expected, "[decap {mode} {name}]");
        }
    }

    // A tunnel to an address that is not one of its VIPs, a plain packet, GUE on another
    // port: all passed as they came.
    let (mut fx, _) = tunnel_vips(Mode::Tunnel);
    let other_vip = SocketAddr::new(ip("10.0.0.11"), 80);
    let other = Pkt::tcp(client4(40000), other_vip);
    fx.vip(other_vip, lb_common::PROTO_TCP, 4, 64, &[1]);
    let outer = check_encapsulated(&mut fx, "other vip", &other, 1, false);
    let (mut gue_fx, mut entry) = tunnel_vips(Mode::Gue);
    entry.gue_port = 7778u16.to_be();
    gue_fx.dp.set_tunnel(&entry).unwrap();
    let (_, other_port) = gue_fx
        .dp
        .test_run(&Pkt::udp(client4(40000), vip4(53)).build())
        .unwrap();
    for (name, frame, reason) in [
        ("not its vip", outer, DecapReason::PassNotVip),
        (
            "plain tcp to the vip",
            Pkt::tcp(client4(40000), vip4(80)).build(),
            DecapReason::PassNotTunnel,
        ),
        (
            "gue on another port",
            other_port,
            DecapReason::PassNotTunnel,
        ),
    ] {
        let (action, out) = decap.test_run(&frame).unwrap();
        assert_eq!(action, XDP_PASS, "[decap {name}]");
        assert_frame_eq(&format!("decap {name}"), &out, &frame);
        expected[reason as usize] += 1;
        assert_eq!(decap_counts(&decap), expected, "[decap {name}]");
    }
}
