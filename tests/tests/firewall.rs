//! Data-plane fixtures for the firewall and hardening rules (issue 4): drop lists, closed
//! ports, TCP flag sanity, per-source rate limits of new flows, and ICMP to a VIP address.
//! Each case: input bytes, expected action, expected output bytes, the one reason counted.

use std::net::IpAddr;

use etherparse::{IcmpEchoHeader, Icmpv4Type, Icmpv6Type, PacketBuilder};
use lb_common::{PROTO_TCP, PROTO_UDP, Reason, VIP_F_HASH, VipMeta, flow_hash};
use lb_tests::fixtures::*;

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

#[test]
fn drop_lists_drop_their_sources_whoever_the_packets_are_for() {
    let mut fx = four_vips();
    fx.dp.set_firewall_rule(&net("198.51.100.0/24"), 7).unwrap();
    fx.dp.set_firewall_rule(&net("198.51.100.9/32"), 8).unwrap();
    fx.dp
        .set_firewall_rule(&net("2001:db8:bad::/48"), 9)
        .unwrap();
    let fw = Expect::Drop(Reason::DropFirewall);
    let from4 = |src: &str, dst: std::net::SocketAddr| Pkt::tcp(sa(src), dst).build();
    fx.run_all(&[
        Case::new(
            "v4 listed source to a vip",
            from4("198.51.100.1:4000", vip4(80)),
            fw,
        ),
        Case::new(
            "v4 listed source to the host",
            from4("198.51.100.2:4000", sa("10.0.0.11:22")),
            fw,
        ),
        Case::new(
            "v4 longest prefix wins",
            from4("198.51.100.9:4000", vip4(80)),
            fw,
        ),
        Case::new(
            "v6 listed source",
            Pkt::udp(sa("[2001:db8:bad::5]:4000"), vip6(53)).build(),
            fw,
        ),
        Case::new(
            "v6 listed source, icmpv6 to the vip",
            Pkt::icmp(ip("2001:db8:bad:0:1::5"), ip(VIP6)).build(),
            fw,
        ),
        // Neighbours of listed prefixes are untouched.
        Case::new(
            "v4 next to the /24",
            from4("198.51.101.1:4000", vip4(80)),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "v6 next to the /48",
            Pkt::udp(sa("[2001:db8:bae::5]:4000"), vip6(53)).build(),
            Expect::tx(3, 4, true),
        ),
        Case::new(
            "v4 unlisted to the host",
            from4("203.0.113.5:4000", sa("10.0.0.11:22")),
            Expect::Pass(Reason::PassNotVip),
        ),
    ]);
    // Hits are counted per rule, under the most specific one.
    let hits = |id| fx.dp.firewall_counters(id).unwrap().packets;
    assert_eq!((hits(7), hits(8), hits(9)), (2, 1, 2));
}

/// An established flow is looked up before the drop list, so adding a rule must end the
/// flows of the sources it names: their next packet is dropped, while flows of other
/// sources, and of sources an earlier rule already covered, carry on.
#[test]
fn a_rule_added_later_stops_the_established_flows_of_its_sources() {
    let mut fx = four_vips();
    let listed4 = Pkt::tcp(sa("198.51.100.7:4000"), vip4(80));
    let listed6 = Pkt::udp(sa("[2001:db8:bad::5]:4000"), vip6(53));
    let other4 = Pkt::tcp(sa("198.51.101.7:4000"), vip4(80));
    let setup = [
        Case::new("listed v4, first", listed4.build(), Expect::tx(0, 1, true)),
        Case::new("listed v6, first", listed6.build(), Expect::tx(3, 4, true)),
        Case::new("other v4, first", other4.build(), Expect::tx(0, 1, true)),
        Case::new("listed v4, again", listed4.build(), Expect::tx(0, 1, false)),
        Case::new("listed v6, again", listed6.build(), Expect::tx(3, 4, false)),
    ];
    fx.run_all(&setup);
    fx.dp.set_firewall_rule(&net("198.51.100.0/24"), 7).unwrap();
    fx.dp
        .set_firewall_rule(&net("2001:db8:bad::/48"), 9)
        .unwrap();
    let fw = Expect::Drop(Reason::DropFirewall);
    fx.run_all(&[
        Case::new("listed v4, after the rule", listed4.build(), fw),
        Case::new("listed v6, after the rule", listed6.build(), fw),
        Case::new(
            "other v4, after the rule",
            other4.build(),
            Expect::tx(0, 1, false),
        ),
    ]);
    // A narrower rule inside one that already drops changes nothing for anyone else.
    fx.dp.set_firewall_rule(&net("198.51.100.9/32"), 8).unwrap();
    fx.run(&Case::new(
        "other v4, after a covered rule",
        other4.build(),
        Expect::tx(0, 1, false),
    ));
    assert_eq!(fx.dp.firewall_counters(7).unwrap().packets, 1);
    assert_eq!(fx.dp.firewall_counters(9).unwrap().packets, 1);
}

/// The drop filter sends a packet to the drop list before its flow only when its source's
/// bit (an IPv4 /16, a hashed IPv6 /32) is set: a rule wider than a bit sets all of its
/// bits, an IPv6 rule wider than /16 sets every bit (unlisted flows still go on), and
/// removing a rule keeps the bits another rule needs.
#[test]
fn drop_rules_of_any_width_stop_flows_and_removed_ones_let_them_go() {
    let mut fx = four_vips();
    let wide4 = Pkt::tcp(sa("172.31.200.7:4000"), vip4(80));
    let gone4 = Pkt::tcp(sa("192.168.1.7:4000"), vip4(80));
    let twin4 = Pkt::tcp(sa("192.168.2.7:4000"), vip4(80));
    let wide6 = Pkt::udp(sa("[3fff:fff::5]:4000"), vip6(53));
    let other6 = Pkt::udp(sa("[2001:db8::5]:4000"), vip6(53));
    fx.run_all(&[
        Case::new("wide v4, first", wide4.build(), Expect::tx(0, 1, true)),
        Case::new("gone v4, first", gone4.build(), Expect::tx(0, 1, true)),
        Case::new("twin v4, first", twin4.build(), Expect::tx(0, 1, true)),
        Case::new("wide v6, first", wide6.build(), Expect::tx(3, 4, true)),
        Case::new("other v6, first", other6.build(), Expect::tx(3, 4, true)),
    ]);
    fx.dp.set_firewall_rule(&net("172.16.0.0/12"), 1).unwrap();
    fx.dp.set_firewall_rule(&net("192.168.1.0/24"), 2).unwrap();
    fx.dp.set_firewall_rule(&net("192.168.2.0/24"), 3).unwrap();
    fx.dp.set_firewall_rule(&net("3ff0::/12"), 4).unwrap();
    let fw = Expect::Drop(Reason::DropFirewall);
    fx.run_all(&[
        Case::new("wide v4, listed", wide4.build(), fw),
        Case::new("gone v4, listed", gone4.build(), fw),
        Case::new("twin v4, listed", twin4.build(), fw),
        Case::new("wide v6, listed", wide6.build(), fw),
        Case::new(
            "other v6 beside a rule wider than /16",
            other6.build(),
            Expect::tx(3, 4, false),
        ),
    ]);
    fx.dp.del_firewall_rule(&net("192.168.1.0/24")).unwrap();
    fx.dp.del_firewall_rule(&net("3ff0::/12")).unwrap();
    fx.run_all(&[
        // Their flows ended with the rule: the next packet makes a new one.
        Case::new(
            "gone v4, rule removed",
            gone4.build(),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "wide v6, rule removed",
            wide6.build(),
            Expect::tx(3, 4, true),
        ),
        Case::new("twin v4, its rule kept", twin4.build(), fw),
        Case::new("wide v4, its rule kept", wide4.build(), fw),
    ]);
    let hits = |id| fx.dp.firewall_counters(id).unwrap().packets;
    assert_eq!((hits(1), hits(2), hits(3), hits(4)), (2, 1, 2, 1));
}

#[test]
fn a_vip_address_answers_only_on_its_services() {
    let mut fx = four_vips();
    let closed = Expect::Drop(Reason::DropClosedPort);
    // etherparse writes the protocol its builder was given, so patch it afterwards.
    let mut gre = Pkt::tcp(client4(4000), vip4(80)).build();
    gre[14 + 9] = 47;
    fix_ipv4_checksum(&mut gre);
    fx.run_all(&Case::each(
        closed,
        [
            (
                "v4 other tcp port",
                Pkt::tcp(client4(4000), vip4(81)).build(),
            ),
            (
                "v4 udp to the tcp port",
                Pkt::udp(client4(4000), vip4(80)).build(),
            ),
            (
                "v4 tcp to the udp port",
                Pkt::tcp(client4(4000), vip4(53)).build(),
            ),
            (
                "v6 other udp port",
                Pkt::udp(client6(4000), vip6(54)).build(),
            ),
            (
                "v6 udp to the tcp port",
                Pkt::udp(client6(4000), vip6(443)).build(),
            ),
            ("v4 gre to the vip address", gre),
            (
                "vlan, v4 other port",
                Pkt::tcp(client4(4000), vip4(8080)).vlan(100).build(),
            ),
        ],
    ));
    fx.run_all(&[
        // The same ports on an address that is no VIP are the host's business.
        Case::new(
            "other address, any port",
            Pkt::tcp(client4(4000), sa("10.0.0.11:81")).build(),
            Expect::Pass(Reason::PassNotVip),
        ),
    ]);
    let mut no_next = Pkt::udp(client6(4000), vip6(53)).build();
    no_next[14 + 6] = 59;
    fx.run(&Case::new("v6 no next header to the vip", no_next, closed));
}

#[test]
fn impossible_tcp_flags_are_dropped_and_real_ones_forwarded() {
    let mut fx = four_vips();
    let bad = Expect::Drop(Reason::DropBadTcpFlags);
    let seg = |port: u16, flags: u8| Pkt::tcp(client4(port), vip4(80)).flags(flags).build();
    fx.run_all(&Case::each(
        bad,
        [
            ("no flags at all", seg(5000, 0)),
            ("syn fin", seg(5001, TCP_SYN | TCP_FIN)),
            ("syn rst", seg(5002, TCP_SYN | TCP_RST)),
            (
                "xmas: fin psh urg syn",
                seg(5003, TCP_FIN | TCP_PSH | TCP_URG | TCP_SYN),
            ),
            (
                "v6 syn fin",
                Pkt::tcp(client6(5004), vip6(443))
                    .flags(TCP_SYN | TCP_FIN)
                    .build(),
            ),
        ],
    ));
    fx.run_all(&Case::each(
        Expect::tx(0, 1, true),
        [
            ("syn", seg(5010, TCP_SYN)),
            ("syn ack", seg(5011, TCP_SYN | TCP_ACK)),
            ("fin ack", seg(5012, TCP_FIN | TCP_ACK)),
            ("rst alone", seg(5013, TCP_RST)),
            ("ack", seg(5014, TCP_ACK)),
        ],
    ));
}

#[test]
fn new_flows_are_rate_limited_per_source_and_established_ones_are_not() {
    let mut fx = Fixture::new();
    fx.backend(1, ip("10.1.0.1"), TEST_RUN_IFINDEX);
    // One new flow per 10 s per source, bursts of 3: the test runs well inside 10 s.
    let meta = VipMeta {
        vip_id: 0,
        rate_interval_ns: 10_000_000_000,
        rate_burst_ns: 2 * 10_000_000_000,
        ..Default::default()
    };
    fx.vip_with_meta(vip4(80), PROTO_TCP, &[1], meta);
    let from =
        |src: &str, port: u16| Pkt::tcp(sa(&format!("{src}:{port}")), vip4(80)).flags(TCP_SYN);
    let limited = Expect::Drop(Reason::DropRateLimited);
    fx.run_all(&[
        Case::new(
            "a: new flow 1",
            from("192.0.2.1", 1).build(),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "a: new flow 2",
            from("192.0.2.1", 2).build(),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "a: new flow 3",
            from("192.0.2.1", 3).build(),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "a: new flow 4, over the burst",
            from("192.0.2.1", 4).build(),
            limited,
        ),
        Case::new(
            "a: new flow 5, still over",
            from("192.0.2.1", 5).build(),
            limited,
        ),
        // The flows it already has keep working: only new ones are counted.
        Case::new(
            "a: flow 1 again",
            from("192.0.2.1", 1).flags(TCP_ACK).build(),
            Expect::tx(0, 1, false),
        ),
        // Another source has its own allowance.
        Case::new(
            "b: new flow 1",
            from("192.0.2.2", 1).build(),
            Expect::tx(0, 1, true),
        ),
        Case::new(
            "b: new flow 2",
            from("192.0.2.2", 2).build(),
            Expect::tx(0, 1, true),
        ),
    ]);
    // A limited packet pinned nothing: flow 4 is not in the table.
    let key = flow_key(sa("192.0.2.1:4"), vip4(80), PROTO_TCP);
    assert_eq!(fx.dp.flow(&key), None);
}

#[test]
fn echo_requests_to_a_vip_are_answered_from_xdp() {
    let mut fx = four_vips();
    let v4 = Pkt::icmp(ip("192.0.2.1"), ip(VIP4));
    let v6 = Pkt::icmp(ip("2001:db8::1"), ip(VIP6));
    let v4_vlan = Pkt::icmp(ip("192.0.2.1"), ip(VIP4)).vlan(42);
    let v4_ttl = Pkt::icmp(ip("192.0.2.1"), ip(VIP4)).with_ipv4(|h| h.time_to_live = 3);
    fx.run_all(&[
        Case::answered(
            "icmp echo",
            v4.build(),
            v4.echo_reply(),
            Reason::IcmpEchoReply,
        ),
        Case::answered(
            "icmpv6 echo",
            v6.build(),
            v6.echo_reply(),
            Reason::IcmpEchoReply,
        ),
        Case::answered(
            "vlan icmp echo",
            v4_vlan.build(),
            v4_vlan.echo_reply(),
            Reason::IcmpEchoReply,
        ),
        Case::answered(
            "low ttl echo",
            v4_ttl.build(),
            v4_ttl.echo_reply(),
            Reason::IcmpEchoReply,
        ),
        // Echo to an address that is no VIP is the host's to answer.
        Case::new(
            "icmp echo to the host",
            Pkt::icmp(ip("192.0.2.1"), ip("10.0.0.11")).build(),
            Expect::Pass(Reason::PassNotVip),
        ),
    ]);
}

#[test]
fn icmp_errors_about_a_flow_reach_its_backend() {
    let mut fx = four_vips();
    // The flows exist first: a packet of each went through.
    fx.run(&Case::new(
        "open v4",
        Pkt::tcp(client4(40000), vip4(80)).build(),
        Expect::tx(0, 1, true),
    ));
    fx.run(&Case::new(
        "open v6",
        Pkt::udp(client6(40000), vip6(53)).build(),
        Expect::tx(3, 4, true),
    ));
    let router4 = ip("192.0.2.254");
    let router6 = ip("2001:db8::fe");
    let forwarded = |backend| Expect::ForwardIcmp {
        action: XDP_TX,
        backend,
    };
    let no_flow = Expect::Drop(Reason::DropIcmpNoFlow);
    fx.run_all(&[
        Case::new(
            "frag needed, known v4 flow",
            icmp_error(router4, client4(40000), vip4(80), PROTO_TCP),
            forwarded(1),
        ),
        Case::new(
            "too big, known v6 flow",
            icmp_error(router6, client6(40000), vip6(53), PROTO_UDP),
            forwarded(4),
        ),
        Case::new(
            "frag needed, unknown flow",
            icmp_error(router4, client4(40001), vip4(80), PROTO_TCP),
            no_flow,
        ),
        Case::new(
            "frag needed, closed port",
            icmp_error(router4, client4(40000), vip4(81), PROTO_TCP),
            no_flow,
        ),
    ]);
    // An error never creates a flow.
    assert_eq!(
        fx.dp.flow(&flow_key(client4(40001), vip4(80), PROTO_TCP)),
        None
    );
}

#[test]
fn icmp_errors_for_a_hash_mode_vip_follow_the_hash_without_a_flow() {
    let mut fx = Fixture::new();
    fx.backends4(3);
    let ring = [1, 2, 3, 1, 2, 3, 1];
    fx.vip_with_flags(vip4(80), PROTO_TCP, 0, 0, &ring, VIP_F_HASH);
    let client = client4(41234);
    let want =
        ring[(flow_hash(&flow_key(client, vip4(80), PROTO_TCP)) % ring.len() as u32) as usize];
    fx.run(&Case::new(
        "too big, flow seen by the other balancer only",
        icmp_error(ip("192.0.2.254"), client, vip4(80), PROTO_TCP),
        Expect::ForwardIcmp {
            action: XDP_TX,
            backend: want,
        },
    ));
}

#[test]
fn other_icmp_to_a_vip_is_dropped_and_neighbour_discovery_passed() {
    let mut fx = four_vips();
    let mut timestamp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(ip4("192.0.2.1"), ip4(VIP4), 64)
        .icmpv4(Icmpv4Type::Unknown {
            type_u8: 13,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut timestamp, &[0; 12])
        .unwrap();
    let mut ns = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(ip6("2001:db8::1"), ip6(VIP6), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut ns, &[0; 16])
        .unwrap();
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(ip4("192.0.2.1"), ip4(VIP4), 64)
        .icmpv4(Icmpv4Type::EchoReply(IcmpEchoHeader { id: 1, seq: 1 }))
        .write(&mut reply, &[])
        .unwrap();
    let mut short = Pkt::icmp(ip("192.0.2.1"), ip(VIP4)).payload(&[]).build();
    // IP length says 4 bytes of ICMP: less than its 8-byte header.
    short.truncate(14 + 20 + 4);
    short[14 + 3] = 24;
    fix_ipv4_checksum(&mut short);
    fx.run_all(&[
        Case::new("icmp timestamp", timestamp, Expect::Drop(Reason::DropIcmp)),
        Case::new(
            "unsolicited echo reply",
            reply,
            Expect::Drop(Reason::DropIcmp),
        ),
        Case::new(
            "neighbour solicitation",
            ns,
            Expect::Pass(Reason::PassNotVip),
        ),
        Case::new(
            "icmp cut inside its header",
            short,
            Expect::Drop(Reason::DropTruncatedL4),
        ),
    ]);
}

fn ip4(s: &str) -> [u8; 4] {
    match ip(s) {
        IpAddr::V4(a) => a.octets(),
        _ => panic!("{s} is not IPv4"),
    }
}

fn ip6(s: &str) -> [u8; 16] {
    match ip(s) {
        IpAddr::V6(a) => a.octets(),
        _ => panic!("{s} is not IPv6"),
    }
}
