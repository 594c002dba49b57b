//! Data-plane fixtures: the real XDP program, fed frames through BPF_PROG_TEST_RUN.
//!
//! In the style of Katran's tests, a case is an input frame, the XDP action expected and the
//! frame expected back. A forwarded frame must come back as the input with only the two MACs
//! changed (destination = the backend's, source = the egress interface's); a passed frame
//! byte-identical; a dropped frame is judged by its action alone. Every run must also count
//! exactly one packet under the expected `Reason`, and forwarded packets under their VIP and
//! backend.
//!
//! Maps are configured the way the agent does it: addresses as raw network-order bytes in
//! `[u32; 4]`, ports in network byte order, a VIP address entry beside every VIP, rings of
//! backend ids in the slab.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::{IpAddr, SocketAddr},
    process::Command,
};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, Icmpv6Type, IpHeaders, IpNumber,
    Ipv4Header, Ipv6Extensions, Ipv6Header, PacketBuilder, VlanId, icmpv4::DestUnreachableHeader,
};
use lb::datapath::Datapath;
use lb_common::{
    Addr, BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, Backend, Counters, FAMILY_V4,
    FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, REASON_COUNT, Reason, VipAddr, VipKey, VipMeta, xdp,
};

pub const XDP_ABORTED: u32 = xdp::ABORTED;
pub const XDP_DROP: u32 = xdp::DROP;
pub const XDP_PASS: u32 = xdp::PASS;
pub const XDP_TX: u32 = xdp::TX;
pub const XDP_REDIRECT: u32 = xdp::REDIRECT;

/// BPF_PROG_TEST_RUN always runs XDP as if received on the loopback device of the caller's
/// network namespace, whose index is 1: a backend behind this index is sent with XDP_TX.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// The client's router, as the source MAC of every input frame.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x01];
/// The balancer's own MAC, as the destination MAC of every input frame.
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];

pub const BACKEND_F_ALL: u32 = BACKEND_F_IN_USE | BACKEND_F_RESOLVED | BACKEND_F_KEEP_FLOWS;

/// The backend's MAC in these fixtures: recognisable in a hex dump, unique per id.
pub fn backend_mac(id: u32) -> [u8; 6] {
    let [_, _, hi, lo] = id.to_be_bytes();
    [0x02, 0xbe, 0x00, 0x00, hi, lo]
}

/// The egress interface's MAC in these fixtures.
pub fn egress_mac(ifindex: u32) -> [u8; 6] {
    let [_, _, hi, lo] = ifindex.to_be_bytes();
    [0x02, 0xee, 0x00, 0x00, hi, lo]
}

// ---- addresses and keys, as the agent writes them ------------------------------------------

/// An address as the maps hold it: raw network-order bytes, IPv4 in the first word.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let b = v6.octets();
            [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
        }
    }
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn vip_key(vip: SocketAddr, proto: u8) -> VipKey {
    VipKey {
        addr: addr(vip.ip()),
        port: vip.port().to_be(),
        proto,
        family: family(vip.ip()),
    }
}

pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey {
        src: addr(src.ip()),
        dst: addr(dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: family(dst.ip()),
        _pad: [0; 2],
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s:?}: {e}"))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad address {s:?}: {e}"))
}

// ---- packets ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// Echo request (ICMP or ICMPv6, by the IP family).
    Icmp,
}

/// A frame to build with etherparse: Ethernet (optionally one 802.1Q tag), IPv4 or IPv6,
/// then TCP, UDP or ICMP. The IP header is exposed so cases can set fragment bits, options
/// or IPv6 extension headers before building.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub ip: IpHeaders,
    pub l4: L4,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

impl Pkt {
    fn new(src: SocketAddr, dst: SocketAddr, l4: L4) -> Self {
        // etherparse's builder writes the protocol of the L4 header it is given (`build`).
        let ip = ip_headers(src.ip(), dst.ip(), PROTO_TCP);
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlan: None,
            ip,
            l4,
            sport: src.port(),
            dport: dst.port(),
            payload: b"fixture payload".to_vec(),
            tcp_flags: TCP_ACK | TCP_PSH,
        }
    }

    /// TCP flags (`TCP_*` bits); a data segment of an established connection (ACK PSH)
    /// unless set.
    pub fn flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(src, dst, L4::Tcp)
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(src, dst, L4::Udp)
    }

    pub fn icmp(src: IpAddr, dst: IpAddr) -> Self {
        Self::new(SocketAddr::new(src, 0), SocketAddr::new(dst, 0), L4::Icmp)
    }

    /// The echo reply the data plane must make of this echo request, built afresh by
    /// etherparse (so its checksums are computed, not patched): MACs and addresses swapped,
    /// TTL or hop limit 64, type "echo reply", identifier, sequence and payload kept.
    pub fn echo_reply(&self) -> Vec<u8> {
        let mut ip = self.ip.clone();
        match &mut ip {
            IpHeaders::Ipv4(h, _) => {
                std::mem::swap(&mut h.source, &mut h.destination);
                h.time_to_live = 64;
            }
            IpHeaders::Ipv6(h, _) => {
                std::mem::swap(&mut h.source, &mut h.destination);
                h.hop_limit = 64;
            }
        }
        let v4 = matches!(ip, IpHeaders::Ipv4(..));
        let eth = PacketBuilder::ethernet2(self.dst_mac, self.src_mac);
        let ip = match self.vlan {
            Some(vid) => eth.single_vlan(VlanId::try_new(vid).unwrap()).ip(ip),
            None => eth.ip(ip),
        };
        let mut out = Vec::new();
        if v4 {
            ip.icmpv4_echo_reply(7, 1).write(&mut out, &self.payload)
        } else {
            ip.icmpv6_echo_reply(7, 1).write(&mut out, &self.payload)
        }
        .expect("etherparse writes the frame");
        out
    }

    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid);
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Changes the IPv4 header (fragment bits, options) before building.
    pub fn with_ipv4(mut self, f: impl FnOnce(&mut Ipv4Header)) -> Self {
        match &mut self.ip {
            IpHeaders::Ipv4(h, _) => f(h),
            IpHeaders::Ipv6(..) => panic!("not an IPv4 packet"),
        }
        self
    }

    /// Adds IPv6 extension headers; etherparse chains the next-header fields.
    pub fn with_ipv6_exts(mut self, exts: Ipv6Extensions) -> Self {
        match &mut self.ip {
            IpHeaders::Ipv6(_, e) => *e = exts,
            IpHeaders::Ipv4(..) => panic!("not an IPv6 packet"),
        }
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp => PROTO_TCP,
            L4::Udp => PROTO_UDP,
            L4::Icmp => panic!("ICMP has no flow key"),
        }
    }

    fn src_ip(&self) -> IpAddr {
        match &self.ip {
            IpHeaders::Ipv4(h, _) => h.source.into(),
            IpHeaders::Ipv6(h, _) => h.source.into(),
        }
    }

    fn dst_ip(&self) -> IpAddr {
        match &self.ip {
            IpHeaders::Ipv4(h, _) => h.destination.into(),
            IpHeaders::Ipv6(h, _) => h.destination.into(),
        }
    }

    /// The flow key the data plane should derive from this packet.
    pub fn flow_key(&self) -> FlowKey {
        flow_key(
            SocketAddr::new(self.src_ip(), self.sport),
            SocketAddr::new(self.dst_ip(), self.dport),
            self.proto(),
        )
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match self.vlan {
            Some(vid) => eth
                .single_vlan(VlanId::try_new(vid).unwrap())
                .ip(self.ip.clone()),
            None => eth.ip(self.ip.clone()),
        };
        let mut out = Vec::new();
        let v4 = matches!(self.ip, IpHeaders::Ipv4(..));
        match self.l4 {
            L4::Tcp => {
                let mut tcp = ip.tcp(self.sport, self.dport, 0x1234_5678, 64240);
                let f = self.tcp_flags;
                for (bit, set) in [
                    (TCP_FIN, 0),
                    (TCP_SYN, 1),
                    (TCP_RST, 2),
                    (TCP_PSH, 3),
                    (TCP_URG, 5),
                ] {
                    if f & bit != 0 {
                        tcp = match set {
                            0 => tcp.fin(),
                            1 => tcp.syn(),
                            2 => tcp.rst(),
                            3 => tcp.psh(),
                            _ => tcp.urg(0),
                        };
                    }
                }
                if f & TCP_ACK != 0 {
                    tcp = tcp.ack(0x0bad_cafe);
                }
                tcp.write(&mut out, &self.payload)
            }
            L4::Udp => ip
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload),
            L4::Icmp if v4 => ip.icmpv4_echo_request(7, 1).write(&mut out, &self.payload),
            L4::Icmp => ip.icmpv6_echo_request(7, 1).write(&mut out, &self.payload),
        }
        .expect("etherparse writes the frame");
        out
    }
}

/// An ARP request, built with etherparse, optionally 802.1Q tagged.
pub fn arp_request(sender: [u8; 4], target: [u8; 4], vlan: Option<u16>) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &sender,
        &[0; 6],
        &target,
    )
    .unwrap();
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6]);
    let mut out = Vec::new();
    match vlan {
        Some(vid) => eth
            .single_vlan(VlanId::try_new(vid).unwrap())
            .arp(arp)
            .write(&mut out),
        None => eth.arp(arp).write(&mut out),
    }
    .unwrap();
    out
}

/// An ICMP error from a router on the path (`from`) about a packet a backend sent for the
/// flow client -> VIP: the quote is the backend's packet, VIP -> client (fragmentation
/// needed over IPv4, packet too big over IPv6).
pub fn icmp_error(from: IpAddr, client: SocketAddr, vip: SocketAddr, proto: u8) -> Vec<u8> {
    let mut quoted = Vec::new();
    let b = PacketBuilder::ip(ip_headers(vip.ip(), client.ip(), proto));
    if proto == PROTO_TCP {
        b.tcp(vip.port(), client.port(), 1, 1000)
            .write(&mut quoted, &[0; 64])
            .unwrap();
    } else {
        b.udp(vip.port(), client.port())
            .write(&mut quoted, &[0; 64])
            .unwrap();
    }
    // Routers quote the IP header and at least eight bytes of what follows.
    let l3 = if vip.is_ipv4() { 20 } else { 40 };
    quoted.truncate(l3 + 8);
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let mut out = Vec::new();
    match (from, vip.ip()) {
        (IpAddr::V4(f), IpAddr::V4(v)) => eth
            .ipv4(f.octets(), v.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut out, &quoted),
        (IpAddr::V6(f), IpAddr::V6(v)) => eth
            .ipv6(f.octets(), v.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1400 })
            .write(&mut out, &quoted),
        _ => panic!("mixed address families: {from} -> {vip}"),
    }
    .unwrap();
    out
}

/// A plain IP header `src` -> `dst` carrying `proto` (TTL 64), for etherparse to build on.
pub fn ip_headers(src: IpAddr, dst: IpAddr, proto: u8) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
            Ipv4Header::new(0, 64, IpNumber(proto), s.octets(), d.octets()).unwrap(),
            Default::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                next_header: IpNumber(proto),
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Default::default()
            },
            Default::default(),
        ),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// Where the L3 header starts: after the Ethernet header and at most one 802.1Q tag.
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// Rewrites the IPv4 header checksum after a deliberate patch, so that the frame is wrong in
/// exactly the one way the case means (the data plane does not check it anyway).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let l3 = l3_offset(frame);
    // A deliberately impossible IHL still gets a checksum over the fixed 20 bytes.
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    let ihl = if ihl < 20 || l3 + ihl > frame.len() {
        20
    } else {
        ihl
    };
    frame[l3 + 10..l3 + 12].fill(0);
    let mut sum = 0u32;
    for c in frame[l3..l3 + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[l3 + 10..l3 + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Cuts an IP packet to `l4_len` bytes of L4 header and fixes the IP length fields to match,
/// so the packet is consistent but its TCP/UDP header is incomplete.
pub fn cut_l4(mut frame: Vec<u8>, l4_len: usize) -> Vec<u8> {
    let l3 = l3_offset(&frame);
    let version = frame[l3] >> 4;
    let l3_len = if version == 4 { 20 } else { 40 };
    frame.truncate(l3 + l3_len + l4_len);
    if version == 4 {
        let tot_len = (l3_len + l4_len) as u16;
        frame[l3 + 2..l3 + 4].copy_from_slice(&tot_len.to_be_bytes());
        fix_ipv4_checksum(&mut frame);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    frame
}

// ---- expectations ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Forwarded to `backend` with `action` (XDP_TX or XDP_REDIRECT), counted under
    /// `vip_id`; `new_flow` when the packet had to pick a backend from the ring.
    Forward {
        action: u32,
        vip_id: u32,
        backend: u32,
        new_flow: bool,
    },
    /// XDP_PASS, frame untouched.
    Pass(Reason),
    /// XDP_DROP.
    Drop(Reason),
    /// XDP_TX of a frame the program wrote itself (an echo reply): the case's `answer`.
    Answer(Reason),
    /// An ICMP error sent on to `backend` with only the MACs changed; no VIP or backend
    /// counter moves (an error is not traffic of the flow).
    ForwardIcmp { action: u32, backend: u32 },
}

impl Expect {
    pub fn tx(vip_id: u32, backend: u32, new_flow: bool) -> Self {
        Expect::Forward {
            action: XDP_TX,
            vip_id,
            backend,
            new_flow,
        }
    }

    pub fn redirect(vip_id: u32, backend: u32, new_flow: bool) -> Self {
        Expect::Forward {
            action: XDP_REDIRECT,
            vip_id,
            backend,
            new_flow,
        }
    }

    pub fn reason(&self) -> Reason {
        match *self {
            Expect::Forward { .. } => Reason::Forwarded,
            Expect::Pass(r) | Expect::Drop(r) | Expect::Answer(r) => r,
            Expect::ForwardIcmp { .. } => Reason::IcmpErrorForwarded,
        }
    }

    pub fn action(&self) -> u32 {
        match *self {
            Expect::Forward { action, .. } | Expect::ForwardIcmp { action, .. } => action,
            Expect::Pass(_) => XDP_PASS,
            Expect::Drop(_) => XDP_DROP,
            Expect::Answer(_) => XDP_TX,
        }
    }
}

/// One fixture: a named input frame and what must become of it.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub frame: Vec<u8>,
    pub expect: Expect,
    /// For `Expect::Answer`: the frame the program must send back.
    pub answer: Option<Vec<u8>>,
}

impl Case {
    pub fn new(name: impl Into<String>, frame: Vec<u8>, expect: Expect) -> Self {
        Self {
            name: name.into(),
            frame,
            expect,
            answer: None,
        }
    }

    /// One case a `(name, frame)` row, every one expecting `expect`: a table of frames the
    /// program must treat alike.
    pub fn each<'a>(
        expect: Expect,
        rows: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
    ) -> Vec<Case> {
        rows.into_iter()
            .map(|(name, frame)| Case::new(name, frame, expect))
            .collect()
    }

    /// A frame the program must answer itself with `answer` (XDP_TX), counted as `reason`.
    pub fn answered(
        name: impl Into<String>,
        frame: Vec<u8>,
        answer: Vec<u8>,
        reason: Reason,
    ) -> Self {
        Self {
            name: name.into(),
            frame,
            expect: Expect::Answer(reason),
            answer: Some(answer),
        }
    }
}

/// The frame a forwarded packet must leave as: the input with only the MACs rewritten.
pub fn forwarded_frame(input: &[u8], backend: &Backend) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&backend.mac);
    out[6..12].copy_from_slice(&backend.src_mac);
    out
}

/// Panics with the offsets and bytes that differ, rather than two long byte arrays.
pub fn assert_frame_eq(name: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let diffs: Vec<String> = (0..got.len().max(want.len()))
        .filter(|&i| got.get(i) != want.get(i))
        .take(16)
        .map(|i| format!("@{i}: got {:02x?} want {:02x?}", got.get(i), want.get(i)))
        .collect();
    panic!(
        "[{name}] output frame differs (len got {} want {}): {}",
        got.len(),
        want.len(),
        diffs.join(", ")
    );
}

// ---- the standard test addresses -------------------------------------------------------------

pub const VIP4: &str = "10.0.0.10";
pub const VIP6: &str = "fd00::10";

pub fn client4(port: u16) -> SocketAddr {
    SocketAddr::new(ip("192.0.2.1"), port)
}

pub fn client6(port: u16) -> SocketAddr {
    SocketAddr::new(ip("2001:db8::1"), port)
}

pub fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(ip(VIP4), port)
}

pub fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(ip(VIP6), port)
}

/// Backends 1, 2 (IPv4) and 3, 4 (IPv6), all behind the ingress interface; VIP ids 0:
/// VIP4:80/tcp -> [1], 1: VIP4:53/udp -> [2], 2: VIP6:443/tcp -> [3], 3: VIP6:53/udp -> [4].
pub fn four_vips() -> Fixture {
    let mut fx = Fixture::new();
    fx.backend(1, ip("10.1.0.1"), TEST_RUN_IFINDEX);
    fx.backend(2, ip("10.1.0.2"), TEST_RUN_IFINDEX);
    fx.backend(3, ip("fd01::3"), TEST_RUN_IFINDEX);
    fx.backend(4, ip("fd01::4"), TEST_RUN_IFINDEX);
    fx.vip(vip4(80), PROTO_TCP, 0, 0, &[1]);
    fx.vip(vip4(53), PROTO_UDP, 1, 16, &[2]);
    fx.vip(vip6(443), PROTO_TCP, 2, 32, &[3]);
    fx.vip(vip6(53), PROTO_UDP, 3, 48, &[4]);
    fx
}

/// Backends 1 to `n` (10.1.0.1 to 10.1.0.n) behind the ingress interface, and VIP id 0:
/// VIP4:80/tcp, round robin over [1, .., n] at slab offset 0.
pub fn one_vip_over(n: u32) -> Fixture {
    let mut fx = Fixture::new();
    fx.backends4(n);
    let ring: Vec<u32> = (1..=n).collect();
    fx.vip(vip4(80), PROTO_TCP, 0, 0, &ring);
    fx
}

// ---- the fixture ------------------------------------------------------------------------------

/// One loaded program with fresh maps, and the backends configured into it (to know what a
/// forwarded frame must look like).
pub struct Fixture {
    pub dp: Datapath,
    backends: BTreeMap<u32, Backend>,
    /// The VIP whose ring each backend was put in, as the agent records it in the backend.
    vip_of: BTreeMap<u32, u32>,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_datapath(
            Datapath::load().expect("loading the XDP program (run the tests as root)"),
        )
    }

    /// A fixture around a program loaded by the caller (e.g. with smaller maps). Input
    /// frames are sent to `LB_MAC`, the test-run ingress's own MAC.
    pub fn with_datapath(mut dp: Datapath) -> Self {
        dp.set_rx_iface(TEST_RUN_IFINDEX, LB_MAC)
            .expect("writing the test-run ingress's MAC");
        Self {
            dp,
            backends: BTreeMap::new(),
            vip_of: BTreeMap::new(),
        }
    }

    /// A round-robin VIP whose ring is `ring` at `ring_off` in the slab.
    pub fn vip(&mut self, vip: SocketAddr, proto: u8, vip_id: u32, ring_off: u32, ring: &[u32]) {
        self.vip_with_flags(vip, proto, vip_id, ring_off, ring, 0);
    }

    pub fn vip_with_flags(
        &mut self,
        vip: SocketAddr,
        proto: u8,
        vip_id: u32,
        ring_off: u32,
        ring: &[u32],
        flags: u32,
    ) {
        let meta = VipMeta {
            vip_id,
            ring_off,
            flags,
            ..Default::default()
        };
        self.vip_with_meta(vip, proto, ring, meta);
    }

    /// A VIP with every `VipMeta` field given (rate limits); `ring_len` comes from `ring`.
    pub fn vip_with_meta(&mut self, vip: SocketAddr, proto: u8, ring: &[u32], meta: VipMeta) {
        let key = vip_key(vip, proto);
        let vaddr = VipAddr {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        };
        self.dp.set_vip_addr(&vaddr).unwrap();
        for &id in ring {
            self.vip_of.insert(id, meta.vip_id);
            if let Some(&b) = self.backends.get(&id) {
                self.set_backend(id, b);
            }
        }
        self.dp.write_ring(meta.ring_off, ring).unwrap();
        let meta = VipMeta {
            ring_len: ring.len() as u32,
            ..meta
        };
        self.dp.set_vip(&key, &meta).unwrap();
    }

    /// Backends 1 to `n` at 10.1.0.1 to 10.1.0.n, behind the ingress interface.
    pub fn backends4(&mut self, n: u32) {
        for id in 1..=n {
            self.backend(id, ip(&format!("10.1.0.{id}")), TEST_RUN_IFINDEX);
        }
    }

    /// A resolved, in-use backend reached through `ifindex`, generation 1.
    pub fn backend(&mut self, id: u32, ip: IpAddr, ifindex: u32) -> Backend {
        let b = Backend {
            addr: addr(ip),
            generation: 1,
            // Set from the ring the backend is put in (`set_backend`): established packets
            // are counted under it.
            vip_id: 0,
            ifindex,
            mac: backend_mac(id),
            src_mac: egress_mac(ifindex),
            flags: BACKEND_F_ALL,
            family: family(ip),
            _pad: [0; 3],
        };
        self.set_backend(id, b);
        b
    }

    pub fn set_backend(&mut self, id: u32, mut b: Backend) {
        if let Some(&vip_id) = self.vip_of.get(&id) {
            b.vip_id = vip_id;
        }
        self.dp.set_backend(id, &b).unwrap();
        self.backends.insert(id, b);
    }

    /// Changes a configured backend in place (flags, generation, MAC).
    pub fn update_backend(&mut self, id: u32, f: impl FnOnce(&mut Backend)) {
        let mut b = self.backends[&id];
        f(&mut b);
        self.set_backend(id, b);
    }

    pub fn backends(&self) -> &BTreeMap<u32, Backend> {
        &self.backends
    }

    pub fn reasons(&self) -> Vec<Counters> {
        let r = self.dp.reason_counters().unwrap();
        assert_eq!(r.len(), REASON_COUNT as usize);
        r
    }

    /// Runs one case and checks action, output frame and counters. Returns the output frame.
    pub fn run(&mut self, case: &Case) -> Vec<u8> {
        let name = case.name.as_str();
        let len = case.frame.len() as u64;
        let reasons_before = self.reasons();
        let fwd_before = match case.expect {
            Expect::Forward {
                vip_id, backend, ..
            } => Some((
                self.dp.vip_counters(vip_id).unwrap(),
                self.dp.backend_counters(backend).unwrap(),
            )),
            _ => None,
        };

        let (action, out) = self
            .dp
            .test_run(&case.frame)
            .unwrap_or_else(|e| panic!("[{name}] BPF_PROG_TEST_RUN failed: {e:#}"));

        assert_eq!(
            action,
            case.expect.action(),
            "[{name}] XDP action (0 aborted, 1 drop, 2 pass, 3 tx, 4 redirect); expected {:?}",
            case.expect
        );
        match case.expect {
            Expect::Forward {
                vip_id,
                backend,
                new_flow,
                ..
            } => {
                let b = self
                    .backends
                    .get(&backend)
                    .expect("expected backend is configured");
                assert_frame_eq(name, &out, &forwarded_frame(&case.frame, b));
                let (vip_before, be_before) = fwd_before.unwrap();
                let want = |before: Counters| Counters {
                    packets: before.packets + 1,
                    bytes: before.bytes + len,
                    new_flows: before.new_flows + u64::from(new_flow),
                };
                let vip_after = self.dp.vip_counters(vip_id).unwrap();
                assert_eq!(
                    vip_after,
                    want(vip_before),
                    "[{name}] VIP {vip_id} counters"
                );
                let be_after = self.dp.backend_counters(backend).unwrap();
                assert_eq!(
                    be_after,
                    want(be_before),
                    "[{name}] backend {backend} counters"
                );
            }
            Expect::Pass(_) => assert_frame_eq(name, &out, &case.frame),
            Expect::Drop(_) => {}
            Expect::Answer(_) => {
                let answer = case
                    .answer
                    .as_ref()
                    .expect("an Answer case carries its answer");
                assert_frame_eq(name, &out, answer);
            }
            Expect::ForwardIcmp { backend, .. } => {
                let b = self
                    .backends
                    .get(&backend)
                    .expect("expected backend is configured");
                assert_frame_eq(name, &out, &forwarded_frame(&case.frame, b));
            }
        }

        let reasons_after = self.reasons();
        let expected = case.expect.reason();
        for r in Reason::ALL {
            let (b, a) = (reasons_before[r as usize], reasons_after[r as usize]);
            let (packets, bytes) = if r == expected { (1, len) } else { (0, 0) };
            assert_eq!(
                (a.packets - b.packets, a.bytes - b.bytes),
                (packets, bytes),
                "[{name}] reason counter {} (expected the packet under {})",
                r.name(),
                expected.name()
            );
        }
        out
    }

    pub fn run_all(&mut self, cases: &[Case]) {
        for case in cases {
            self.run(case);
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

// ---- a throwaway network namespace -----------------------------------------------------------

/// Runs `f` on a new thread that lives in a fresh network namespace holding a veth pair, and
/// passes it the index of one end. The namespace (and the pair) goes away with the thread.
///
/// XDP_REDIRECT needs a devmap entry, and the kernel only accepts interfaces that exist in
/// the caller's namespace; test-run's own ingress is loopback (index 1), so the target has
/// to be another interface. Creating it in a private namespace leaves the host alone.
pub fn with_veth_in_netns<R: Send>(f: impl FnOnce(u32) -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall; affects only this thread (and its children).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            }
            // A child forked from this thread starts in its namespace.
            let status = Command::new("ip")
                .args([
                    "link", "add", "lbt0", "type", "veth", "peer", "name", "lbt1",
                ])
                .status()
                .expect("running `ip link add` (iproute2 needed)");
            assert!(status.success(), "ip link add veth failed: {status}");
            let name = CString::new("lbt0").unwrap();
            // SAFETY: valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "lbt0 not found in the new namespace");
            assert_ne!(ifindex, TEST_RUN_IFINDEX);
            f(ifindex)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}
