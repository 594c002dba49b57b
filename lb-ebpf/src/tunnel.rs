//! Tunnel and gue modes: the client's packet, whole, inside an outer IP header to its
//! backend (IPv4 in IPv4, IPv6 in IPv6), so backends may sit behind routers; the backend
//! strips the header (`lb decap`, or the kernel's ipip/fou) and answers the client
//! directly. Gue puts a UDP header between the two ("variant 1" GUE: the UDP payload is
//! the inner IP packet itself), with a source port from the flow's hash, so the backend's
//! NIC spreads flows over its queues.
//!
//! The outer header goes in front of the IP header with `bpf_xdp_adjust_head`; the
//! caller then writes the MACs as for direct server return (the next hop's: a router's
//! for a routed backend). A packet that would no longer fit the egress MTU is turned into
//! an ICMP "fragmentation needed" / ICMPv6 "packet too big" back to its sender, giving the
//! size that fits, instead of vanishing on the wire.

use aya_ebpf::{
    helpers::{bpf_check_mtu, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Addr, BACKEND_F_GUE, Backend, FAMILY_V4, GUE_OVERHEAD, GUE_SPORT_BASE, GUE_SPORT_MASK,
    PROTO_UDP, Reason, TUNNEL_V4_OVERHEAD, TUNNEL_V6_OVERHEAD, flow_hash,
};

use crate::{
    frame::{load, store},
    maps::TUNNEL,
    parse::{PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, Packet},
    refuse::{add_word, fold},
};

const OUTER_TTL: u8 = 64;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// What of the too-big packet its ICMP error quotes: its IP header and the first 8 bytes
/// after it (the ports, and TCP's sequence number), as the sender needs to find the flow.
const QUOTE_V4: usize = 20 + 8;
const QUOTE_V6: usize = 40 + 8;
/// The error's own IP and ICMP headers.
const ERROR_V4: usize = 20 + 8;
const ERROR_V6: usize = 40 + 8;

/// Wraps the packet in `pkt` in its outer header(s) to `backend`; the MACs are the
/// caller's. `Err(TunnelTooBig)`: the frame was turned into the ICMP error to send back.
/// A function of its own in the object (a BPF-to-BPF call), not inlined: it has two
/// callers (forwarding, and ICMP errors sent on to a backend), and inlined twice it would
/// double the program's size for one mode.
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, pkt: &Packet, backend: &Backend) -> Result<(), Reason> {
    let config = TUNNEL.get(0).ok_or(Reason::DropTunnelNoSource)?;
    let v4 = pkt.flow.family == FAMILY_V4;
    let gue = backend.flags & BACKEND_F_GUE != 0;
    let ip_hlen = if v4 {
        TUNNEL_V4_OVERHEAD
    } else {
        TUNNEL_V6_OVERHEAD
    } as usize;
    let overhead = ip_hlen + if gue { GUE_OVERHEAD as usize } else { 0 };
    if (v4 && config.src_v4 == 0) || (!v4 && config.src_v6 == [0; 4]) {
        return Err(Reason::DropTunnelNoSource);
    }
    let mut mtu = 0u32;
    // SAFETY: the helper reads the context and writes `mtu`, a local. A negative answer (an
    // interface that is gone) leaves the redirect to fail and count it.
    let fits = unsafe {
        bpf_check_mtu(
            ctx.ctx as *mut _,
            backend.ifindex,
            &mut mtu,
            overhead as i32,
            0,
        )
    };
    if fits > 0 {
        return Err(too_big(ctx, pkt, mtu.saturating_sub(overhead as u32)));
    }
    let l3 = pkt.l3;
    let inner_len = pkt.ip_end - l3;
    // The flow's hash: GUE's source port and IPv6's flow label, for the network's ECMP and
    // the backend's receive queues.
    let hash = if gue || !v4 { flow_hash(&pkt.flow) } else { 0 };
    // SAFETY: the helper only moves the frame's start within the driver's headroom; every
    // later access is bounds-checked against the new start.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Reason::DropTunnelNoRoom);
    }
    // The EtherType (and a VLAN tag) move to the front as they were: the outer header has
    // the inner packet's family. The MACs are the caller's to write.
    let ethertype: u16 = load(ctx, overhead + 12).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 12, ethertype).ok_or(Reason::DropTruncatedL3)?;
    if l3 > 14 {
        let tag: u32 = load(ctx, overhead + 14).ok_or(Reason::DropTruncatedL3)?;
        store(ctx, 14, tag).ok_or(Reason::DropTruncatedL3)?;
    }
    let inner = l3 + overhead;
    let udp = l3 + ip_hlen;
    let udp_len = (inner_len + GUE_OVERHEAD as usize) as u16;
    let [pl_hi, pl_lo] = udp_len.to_be_bytes();
    let ports = {
        let [s_hi, s_lo] = (GUE_SPORT_BASE | (hash as u16 & GUE_SPORT_MASK)).to_be_bytes();
        let [d0, d1] = config.gue_port.to_ne_bytes();
        u32::from_ne_bytes([s_hi, s_lo, d0, d1])
    };
    let w = |at: usize, v: u32| store(ctx, at, v).ok_or(Reason::DropTruncatedL3);
    if v4 {
        let [_, tos, _, _] = load::<u32>(ctx, inner)
            .ok_or(Reason::DropTruncatedL3)?
            .to_ne_bytes();
        let [frag_hi, _] = load::<u16>(ctx, inner + 6)
            .ok_or(Reason::DropTruncatedL3)?
            .to_ne_bytes();
        let [t_hi, t_lo] = ((inner_len + overhead) as u16).to_be_bytes();
        let proto = if gue { PROTO_UDP } else { PROTO_IPIP };
        let w0 = u32::from_ne_bytes([0x45, tos, t_hi, t_lo]);
        // The inner packet's don't-fragment bit (RFC 2003), no identification needed.
        let w1 = u32::from_ne_bytes([0, 0, frag_hi & 0x40, 0]);
        let (src, dst) = (config.src_v4, backend.addr[0]);
        let sum = add_word(add_word(add_word(add_word(w0, w1), src), dst), 0);
        let sum = add_word(sum, u32::from_ne_bytes([OUTER_TTL, proto, 0, 0]));
        let [c0, c1] = fold(sum).to_ne_bytes();
        w(l3, w0)?;
        w(l3 + 4, w1)?;
        w(l3 + 8, u32::from_ne_bytes([OUTER_TTL, proto, c0, c1]))?;
        w(l3 + 12, src)?;
        w(l3 + 16, dst)?;
        if gue {
            // A zero checksum: allowed for UDP over IPv4, and the inner packet has its own.
            w(udp, ports)?;
            w(udp + 4, u32::from_ne_bytes([pl_hi, pl_lo, 0, 0]))?;
        }
        return Ok(());
    }
    let first = u32::from_be(load::<u32>(ctx, inner).ok_or(Reason::DropTruncatedL3)?);
    let class = (first >> 20) & 0xff;
    let w0 = (0x6000_0000 | (class << 20) | (hash & 0xf_ffff)).to_be();
    let next = if gue { PROTO_UDP } else { PROTO_IPV6 };
    let [p_hi, p_lo] = ((inner_len + overhead - ip_hlen) as u16).to_be_bytes();
    w(l3, w0)?;
    w(l3 + 4, u32::from_ne_bytes([p_hi, p_lo, next, OUTER_TTL]))?;
    let mut sum = write_addrs6(ctx, l3, &config.src_v6, &backend.addr, 0)?;
    if gue {
        let len_word = u32::from_ne_bytes([pl_hi, pl_lo, 0, 0]);
        // UDP over IPv6 needs a checksum over the whole datagram. The inner packet's own
        // transport checksum already makes its segment sum to the complement of its
        // pseudo-header's, so the datagram's sum needs only headers (as the kernel's
        // local checksum offload for tunnels does), not a walk over the payload.
        sum = add_word(sum, (udp_len as u32).to_be());
        sum = add_word(sum, (PROTO_UDP as u32).to_be());
        sum = add_word(add_word(sum, ports), len_word);
        let mut inner_pseudo = 0;
        let mut i = 0;
        while i < 10 {
            let word: u32 = load(ctx, inner + 4 * i).ok_or(Reason::DropTruncatedL3)?;
            sum = add_word(sum, word);
            // Source and destination: words 2..10.
            if i >= 2 {
                inner_pseudo = add_word(inner_pseudo, word);
            }
            i += 1;
        }
        // TCP, UDP and ICMPv6 (the only inner protocols here) all sum a pseudo-header.
        inner_pseudo = add_word(inner_pseudo, ((inner_len - 40) as u32).to_be());
        inner_pseudo = add_word(inner_pseudo, (pkt.flow.proto as u32).to_be());
        sum = add_word(sum, fold(inner_pseudo) as u32);
        let check = match fold(sum) {
            0 => 0xffff,
            c => c,
        };
        let [c0, c1] = check.to_ne_bytes();
        w(udp, ports)?;
        w(udp + 4, u32::from_ne_bytes([pl_hi, pl_lo, c0, c1]))?;
    }
    Ok(())
}

/// Turns the frame into an ICMP error telling its sender that `mtu` bytes fit, back out of
/// the interface it came in on. The reason it is counted under, whatever happened.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> Reason {
    match answer_too_big(ctx, pkt, mtu) {
        Ok(()) => Reason::TunnelTooBig,
        Err(reason) => reason,
    }
}

#[inline(always)]
fn answer_too_big(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> Result<(), Reason> {
    let v4 = pkt.flow.family == FAMILY_V4;
    let (quote, grow) = if v4 {
        (QUOTE_V4, ERROR_V4)
    } else {
        (QUOTE_V6, ERROR_V6)
    };
    let l3 = pkt.l3;
    // Cut to the quote, then room in front for the error's headers: the quote lands right
    // after them, the old Ethernet header just before it.
    let frame_len = ctx.data_end() - ctx.data();
    // SAFETY: both helpers only move the frame's ends; every later access is
    // bounds-checked against the new ones.
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, (l3 + quote) as i32 - frame_len as i32) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) != 0
        {
            return Err(Reason::DropTunnelNoRoom);
        }
    }
    // Back where it came from: the old MACs swapped, EtherType (and VLAN tag) as they were.
    let d0: u32 = load(ctx, grow).ok_or(Reason::DropTruncatedL3)?;
    let d1: u16 = load(ctx, grow + 4).ok_or(Reason::DropTruncatedL3)?;
    let s0: u32 = load(ctx, grow + 6).ok_or(Reason::DropTruncatedL3)?;
    let s1: u16 = load(ctx, grow + 10).ok_or(Reason::DropTruncatedL3)?;
    let ethertype: u16 = load(ctx, grow + 12).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 0, s0).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 4, s1).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 6, d0).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 10, d1).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 12, ethertype).ok_or(Reason::DropTruncatedL3)?;
    if l3 > 14 {
        let tag: u32 = load(ctx, grow + 14).ok_or(Reason::DropTruncatedL3)?;
        store(ctx, 14, tag).ok_or(Reason::DropTruncatedL3)?;
    }
    // From the VIP the packet was for, to its sender.
    let (src, dst) = (pkt.flow.dst, pkt.flow.src);
    let icmp = l3 + grow - 8;
    let w = |at: usize, v: u32| store(ctx, at, v).ok_or(Reason::DropTruncatedL3);
    let mut sum = 0;
    let mut i = 0;
    while i < quote / 4 {
        let word: u32 = load(ctx, icmp + 8 + 4 * i).ok_or(Reason::DropTruncatedL3)?;
        sum = add_word(sum, word);
        i += 1;
    }
    let [m0, m1, m2, m3] = mtu.to_be_bytes();
    if v4 {
        let [t_hi, t_lo] = ((ERROR_V4 + QUOTE_V4) as u16).to_be_bytes();
        let w0 = u32::from_ne_bytes([0x45, 0, t_hi, t_lo]);
        let w2 = u32::from_ne_bytes([OUTER_TTL, PROTO_ICMP, 0, 0]);
        let header = add_word(add_word(add_word(add_word(w0, w2), src[0]), dst[0]), 0);
        let [c0, c1] = fold(header).to_ne_bytes();
        w(l3, w0)?;
        w(l3 + 4, 0)?;
        w(l3 + 8, u32::from_ne_bytes([OUTER_TTL, PROTO_ICMP, c0, c1]))?;
        w(l3 + 12, src[0])?;
        w(l3 + 16, dst[0])?;
        let kind = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
        let next_hop_mtu = u32::from_ne_bytes([0, 0, m2, m3]);
        sum = add_word(add_word(sum, kind), next_hop_mtu);
        let [c0, c1] = fold(sum).to_ne_bytes();
        w(
            icmp,
            u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, c0, c1]),
        )?;
        w(icmp + 4, next_hop_mtu)?;
        return Ok(());
    }
    let plen = (8 + QUOTE_V6) as u32;
    let [p_hi, p_lo] = (plen as u16).to_be_bytes();
    w(l3, 0x6000_0000u32.to_be())?;
    w(
        l3 + 4,
        u32::from_ne_bytes([p_hi, p_lo, PROTO_ICMPV6, OUTER_TTL]),
    )?;
    sum = write_addrs6(ctx, l3, &src, &dst, sum)?;
    let kind = u32::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0, 0, 0]);
    let mtu_word = u32::from_ne_bytes([m0, m1, m2, m3]);
    sum = add_word(sum, plen.to_be());
    sum = add_word(sum, (PROTO_ICMPV6 as u32).to_be());
    sum = add_word(add_word(sum, kind), mtu_word);
    let [c0, c1] = fold(sum).to_ne_bytes();
    w(icmp, u32::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0, c0, c1]))?;
    w(icmp + 4, mtu_word)
}

/// Writes the source and destination addresses of the IPv6 header at `l3` and adds them
/// to `sum`: the pseudo-header's share of an outer UDP or ICMPv6 checksum.
#[inline(always)]
fn write_addrs6(
    ctx: &XdpContext,
    l3: usize,
    src: &Addr,
    dst: &Addr,
    mut sum: u32,
) -> Result<u32, Reason> {
    let mut i = 0;
    while i < 4 {
        store(ctx, l3 + 8 + 4 * i, src[i]).ok_or(Reason::DropTruncatedL3)?;
        store(ctx, l3 + 24 + 4 * i, dst[i]).ok_or(Reason::DropTruncatedL3)?;
        sum = add_word(add_word(sum, src[i]), dst[i]);
        i += 1;
    }
    Ok(sum)
}
