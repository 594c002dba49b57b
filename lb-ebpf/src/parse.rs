//! Parse: Ethernet (one optional 802.1Q tag), IPv4/IPv6, TCP/UDP ports and flags. No map is
//! read here; every judgement that needs one is the caller's.

use aya_ebpf::programs::XdpContext;
use lb_common::{Addr, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};

use crate::frame::load;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv4 in IP and IPv6 in IP: the inner packets of tunnels (`tunnel`, `decap`).
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// IPv4 "more fragments" flag and fragment offset, as one mask over the flags word.
const IP_MF_OFFSET: u16 = 0x3fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IP packet whose header is sane: what the rest of the pipeline needs, nothing more.
pub struct Packet {
    /// Addresses, protocol and family; the ports once `transport` has read them.
    pub flow: FlowKey,
    /// Frame length, for the byte counters.
    pub len: u64,
    pub l3: usize,
    /// Where the transport header starts (past a 20-byte IPv4 header or the IPv6 header).
    pub l4: usize,
    /// Where the IP packet ends (Ethernet padding may follow).
    pub ip_end: usize,
    /// Why this packet cannot be balanced even if it is for a VIP (fragment, options,
    /// extension header, a protocol no VIP serves), if it cannot.
    pub unbalanceable: Option<Reason>,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
}

/// The frame up to and including the IP header: the header is checked the way the kernel's
/// receive path would (so dropping here never drops anything the host would have accepted).
#[inline(always)]
pub fn ip(ctx: &XdpContext) -> Result<Packet, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let mut ether_type = u16::from_be(load::<u16>(ctx, 12).ok_or(Reason::DropTruncatedL3)?);
    let mut l3 = ETH_HLEN;
    if ether_type == ETH_P_8021Q {
        // The inner EtherType sits in the last two bytes of the tag.
        ether_type = u16::from_be(load::<u16>(ctx, ETH_HLEN + 2).ok_or(Reason::DropTruncatedL3)?);
        l3 += VLAN_HLEN;
    }
    let mut pkt = Packet {
        flow: FlowKey::default(),
        len: frame_len as u64,
        l3,
        l4: 0,
        ip_end: 0,
        unbalanceable: None,
        syn: false,
    };
    match ether_type {
        ETH_P_IP => ipv4(ctx, &mut pkt, frame_len)?,
        ETH_P_IPV6 => ipv6(ctx, &mut pkt, frame_len)?,
        _ => return Err(Reason::PassNotIp),
    }
    Ok(pkt)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, pkt: &mut Packet, frame_len: usize) -> Result<(), Reason> {
    let l3 = pkt.l3;
    // Version/IHL, TOS and total length; then flags/fragment offset, TTL and protocol.
    let [vihl, _tos, len_hi, len_lo] = load::<u32>(ctx, l3)
        .ok_or(Reason::DropTruncatedL3)?
        .to_ne_bytes();
    let [frag_hi, frag_lo, _ttl, proto] = load::<u32>(ctx, l3 + 6)
        .ok_or(Reason::DropTruncatedL3)?
        .to_ne_bytes();
    let src: u32 = load(ctx, l3 + 12).ok_or(Reason::DropTruncatedL3)?;
    let dst: u32 = load(ctx, l3 + 16).ok_or(Reason::DropTruncatedL3)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if vihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl || l3 + tot_len > frame_len {
        return Err(Reason::DropBadIpHeader);
    }
    pkt.flow.family = FAMILY_V4;
    pkt.flow.proto = proto;
    pkt.flow.src[0] = src;
    pkt.flow.dst[0] = dst;
    pkt.l4 = l3 + IPV4_HLEN;
    pkt.ip_end = l3 + tot_len;
    pkt.unbalanceable = if u16::from_be_bytes([frag_hi, frag_lo]) & IP_MF_OFFSET != 0 {
        Some(Reason::DropFragment)
    } else if ihl != IPV4_HLEN {
        Some(Reason::DropIpOptions)
    } else if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        Some(Reason::DropClosedPort)
    } else {
        None
    };
    Ok(())
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, pkt: &mut Packet, frame_len: usize) -> Result<(), Reason> {
    let l3 = pkt.l3;
    // Version/class/flow label, payload length, next header and hop limit.
    let vcf: u8 = load(ctx, l3).ok_or(Reason::DropTruncatedL3)?;
    let [len_hi, len_lo, next_hdr, _hops] = load::<u32>(ctx, l3 + 4)
        .ok_or(Reason::DropTruncatedL3)?
        .to_ne_bytes();
    pkt.flow.src = load_addr6(ctx, l3 + 8).ok_or(Reason::DropTruncatedL3)?;
    pkt.flow.dst = load_addr6(ctx, l3 + 24).ok_or(Reason::DropTruncatedL3)?;
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if vcf >> 4 != 6 || l3 + IPV6_HLEN + payload_len > frame_len {
        return Err(Reason::DropBadIpHeader);
    }
    pkt.flow.family = FAMILY_V6;
    pkt.flow.proto = next_hdr;
    pkt.l4 = l3 + IPV6_HLEN;
    pkt.ip_end = l3 + IPV6_HLEN + payload_len;
    pkt.unbalanceable = match next_hdr {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => None,
        // Extension headers: hop-by-hop, routing, fragment, ESP, AH, destination options,
        // mobility, HIP, shim6.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => Some(Reason::DropIpv6ExtHeader),
        _ => Some(Reason::DropClosedPort),
    };
    Ok(())
}

/// An IPv6 address as four words in network byte order, as the maps hold it.
#[inline(always)]
pub fn load_addr6(ctx: &XdpContext, offset: usize) -> Option<Addr> {
    Some([
        load(ctx, offset)?,
        load(ctx, offset + 4)?,
        load(ctx, offset + 8)?,
        load(ctx, offset + 12)?,
    ])
}

/// TCP or UDP: a packet with ports, that a service can take.
#[inline(always)]
pub fn has_ports(pkt: &Packet) -> bool {
    pkt.flow.proto == PROTO_TCP || pkt.flow.proto == PROTO_UDP
}

#[inline(always)]
pub fn is_icmp(pkt: &Packet) -> bool {
    pkt.flow.proto == PROTO_ICMP || pkt.flow.proto == PROTO_ICMPV6
}

/// For a packet to a VIP address: refuses what cannot be balanced, then reads the ports
/// (and for TCP the flags). Source and destination ports sit in the first four bytes of
/// both TCP and UDP. The whole minimal header must lie inside the IP packet, not merely
/// inside the frame: Ethernet padding after a cut-short packet is no header.
#[inline(always)]
pub fn transport(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Reason> {
    if let Some(reason) = pkt.unbalanceable {
        return Err(reason);
    }
    let proto = pkt.flow.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(());
    }
    let min_len = if proto == PROTO_TCP { 20 } else { 8 };
    if pkt.l4 + min_len > pkt.ip_end {
        return Err(Reason::DropTruncatedL4);
    }
    // Inside the IP packet means inside the frame (checked by `ip`): these loads only fail
    // for the verifier's eyes.
    let [s0, s1, d0, d1] = load::<u32>(ctx, pkt.l4)
        .ok_or(Reason::DropTruncatedL4)?
        .to_ne_bytes();
    pkt.flow.sport = u16::from_ne_bytes([s0, s1]);
    pkt.flow.dport = u16::from_ne_bytes([d0, d1]);
    if proto == PROTO_TCP {
        let flags: u8 = load(ctx, pkt.l4 + 13).ok_or(Reason::DropTruncatedL4)?;
        check_tcp_flags(flags)?;
        pkt.syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    }
    Ok(())
}

/// No real connection sends a segment without flags (a "null scan"), nor SYN together with
/// FIN or RST (scans, fingerprinting, and stack-confusion tricks).
#[inline(always)]
fn check_tcp_flags(flags: u8) -> Result<(), Reason> {
    let invalid = flags & 0x3f == 0 || (flags & TCP_SYN != 0 && flags & (TCP_FIN | TCP_RST) != 0);
    if invalid {
        Err(Reason::DropBadTcpFlags)
    } else {
        Ok(())
    }
}
