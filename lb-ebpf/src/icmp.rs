//! ICMP to a VIP address, handled deliberately:
//!
//! - echo requests are answered from XDP, so a VIP can be pinged like any address;
//! - errors about a flow (destination unreachable, fragmentation needed / packet too big,
//!   time exceeded) are sent on to the backend that serves the flow: with direct server
//!   return the backends send the big packets, so they are the ones that must learn the
//!   path MTU;
//! - IPv6 neighbour discovery goes to the host, which owns the address on the wire;
//! - everything else is dropped and counted.

use aya_ebpf::programs::XdpContext;
use lb_common::{BACKEND_F_IN_USE, BACKEND_F_NAT, FAMILY_V4, FlowKey, Reason, VIP_F_HASH, xdp};

use crate::{
    frame::{load, store},
    maps::{BACKENDS, FLOWS},
    parse::{Packet, load_addr6},
    policy, select, transmit,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Router solicitation .. redirect: neighbour discovery.
const ICMPV6_NDP_FIRST: u8 = 133;
const ICMPV6_NDP_LAST: u8 = 137;
/// Type, code, checksum, and four bytes that depend on the type.
const ICMP_HLEN: usize = 8;
/// A reply leaves with a fresh hop count, not what was left of the request's.
const REPLY_TTL: u8 = 64;

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    if pkt.l4 + ICMP_HLEN > pkt.ip_end {
        return Err(Reason::DropTruncatedL4);
    }
    let kind: u8 = load(ctx, pkt.l4).ok_or(Reason::DropTruncatedL4)?;
    if pkt.flow.family == FAMILY_V4 {
        match kind {
            ICMP_ECHO => echo_reply_v4(ctx, pkt),
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => error_to_backend(ctx, pkt),
            _ => Err(Reason::DropIcmp),
        }
    } else {
        match kind {
            ICMPV6_ECHO_REQUEST => echo_reply_v6(ctx, pkt),
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED => {
                error_to_backend(ctx, pkt)
            }
            ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST => Err(Reason::PassNotVip),
            _ => Err(Reason::DropIcmp),
        }
    }
}

/// RFC 1624 incremental checksum update for one 16-bit word changing from `old` to `new`.
#[inline(always)]
fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!csum as u32) + (!old as u32 & 0xffff) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Back out of the interface it came in on: swap the MACs.
#[inline(always)]
pub(crate) fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let d0: u32 = load(ctx, 0)?;
    let d1: u16 = load(ctx, 4)?;
    let s0: u32 = load(ctx, 6)?;
    let s1: u16 = load(ctx, 10)?;
    store(ctx, 0, s0)?;
    store(ctx, 4, s1)?;
    store(ctx, 6, d0)?;
    store(ctx, 10, d1)
}

/// Swaps the `WORDS`-word source and destination addresses at `src` and after it.
#[inline(always)]
fn swap_addrs<const WORDS: usize>(ctx: &XdpContext, src: usize) -> Option<()> {
    let mut i = 0;
    while i < WORDS {
        let a: u32 = load(ctx, src + 4 * i)?;
        let b: u32 = load(ctx, src + 4 * (WORDS + i))?;
        store(ctx, src + 4 * i, b)?;
        store(ctx, src + 4 * (WORDS + i), a)?;
        i += 1;
    }
    Some(())
}

/// Rewrites the ICMP type in place, fixing the checksum (the code byte stays).
#[inline(always)]
fn set_icmp_type(ctx: &XdpContext, pkt: &Packet, from: u8, to: u8) -> Result<(), Reason> {
    let [_, code, c0, c1] = load::<u32>(ctx, pkt.l4)
        .ok_or(Reason::DropTruncatedL4)?
        .to_ne_bytes();
    let csum = csum_replace(
        u16::from_be_bytes([c0, c1]),
        u16::from_be_bytes([from, code]),
        u16::from_be_bytes([to, code]),
    );
    let [c0, c1] = csum.to_be_bytes();
    store(ctx, pkt.l4, u32::from_ne_bytes([to, code, c0, c1])).ok_or(Reason::DropTruncatedL4)
}

#[inline(always)]
fn echo_reply_v4(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    // Swapping the addresses leaves the header checksum as it is; the TTL does not.
    swap_addrs::<1>(ctx, pkt.l3 + 12).ok_or(Reason::DropTruncatedL3)?;
    let [ttl, proto, c0, c1] = load::<u32>(ctx, pkt.l3 + 8)
        .ok_or(Reason::DropTruncatedL3)?
        .to_ne_bytes();
    let check = csum_replace(
        u16::from_be_bytes([c0, c1]),
        u16::from_be_bytes([ttl, proto]),
        u16::from_be_bytes([REPLY_TTL, proto]),
    );
    let [c0, c1] = check.to_be_bytes();
    store(
        ctx,
        pkt.l3 + 8,
        u32::from_ne_bytes([REPLY_TTL, proto, c0, c1]),
    )
    .ok_or(Reason::DropTruncatedL3)?;
    set_icmp_type(ctx, pkt, ICMP_ECHO, ICMP_ECHO_REPLY)?;
    swap_macs(ctx).ok_or(Reason::DropTruncatedL3)?;
    Ok((xdp::TX, Reason::IcmpEchoReply))
}

#[inline(always)]
fn echo_reply_v6(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    // The ICMPv6 checksum covers the addresses, but swapping them keeps the sum.
    swap_addrs::<4>(ctx, pkt.l3 + 8).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, pkt.l3 + 7, REPLY_TTL).ok_or(Reason::DropTruncatedL3)?;
    set_icmp_type(ctx, pkt, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)?;
    swap_macs(ctx).ok_or(Reason::DropTruncatedL3)?;
    Ok((xdp::TX, Reason::IcmpEchoReply))
}

/// The flow an ICMP error is about: the quoted packet is one a backend sent (VIP to
/// client), so the flow as the balancer knows it is the quote reversed.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, pkt: &Packet) -> Result<FlowKey, Reason> {
    let inner = pkt.l4 + ICMP_HLEN;
    let mut flow = FlowKey {
        family: pkt.flow.family,
        ..Default::default()
    };
    let l4 = if pkt.flow.family == FAMILY_V4 {
        let vihl: u8 = load(ctx, inner).ok_or(Reason::DropIcmpNoFlow)?;
        flow.proto = load(ctx, inner + 9).ok_or(Reason::DropIcmpNoFlow)?;
        flow.src[0] = load(ctx, inner + 16).ok_or(Reason::DropIcmpNoFlow)?;
        flow.dst[0] = load(ctx, inner + 12).ok_or(Reason::DropIcmpNoFlow)?;
        inner + ((vihl & 0x0f) as usize) * 4
    } else {
        flow.proto = load(ctx, inner + 6).ok_or(Reason::DropIcmpNoFlow)?;
        flow.src = load_addr6(ctx, inner + 24).ok_or(Reason::DropIcmpNoFlow)?;
        flow.dst = load_addr6(ctx, inner + 8).ok_or(Reason::DropIcmpNoFlow)?;
        inner + 40
    };
    let [s0, s1, d0, d1] = load::<u32>(ctx, l4)
        .ok_or(Reason::DropIcmpNoFlow)?
        .to_ne_bytes();
    flow.sport = u16::from_ne_bytes([d0, d1]);
    flow.dport = u16::from_ne_bytes([s0, s1]);
    // An error about traffic that did not come from this VIP is not ours to pass on.
    if flow.dst != pkt.flow.dst {
        return Err(Reason::DropIcmpNoFlow);
    }
    Ok(flow)
}

/// Sends an ICMP error on to the backend of the flow it is about: the pinned one if it
/// still keeps the flow (the checks an established packet gets, so an error never reaches
/// a server that took over a reused backend id), or for a hash-mode VIP without the flow
/// the one the hash picks (a flow this balancer never saw, active-active). A flow pinned to
/// a backend that no longer keeps it is dropped, not re-balanced: the server that sent
/// the quoted packet is gone. The flow table is not touched: an error never creates a flow
/// nor ends a handshake.
#[inline(always)]
fn error_to_backend(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    let flow = quoted_flow(ctx, pkt)?;
    let vip = policy::service(&flow).ok_or(Reason::DropIcmpNoFlow)?;
    let backend = match FLOWS.get_ptr(&flow) {
        Some(pinned) => {
            // SAFETY: copied out at once; an LRU element stays valid for the rest of the run.
            let pinned = unsafe { *pinned };
            select::pinned_backend(&pinned).ok_or(Reason::DropIcmpNoFlow)?
        }
        None if vip.flags & VIP_F_HASH != 0 => {
            let id = select::pick_from_ring(&flow, &vip).map_err(|_| Reason::DropIcmpNoFlow)?;
            let backend = BACKENDS.get(id).ok_or(Reason::DropIcmpNoFlow)?;
            if backend.flags & BACKEND_F_IN_USE == 0 {
                return Err(Reason::DropIcmpNoFlow);
            }
            backend
        }
        None => return Err(Reason::DropIcmpNoFlow),
    };
    let action = if backend.flags & BACKEND_F_NAT != 0 {
        crate::nat::icmp_to_backend(ctx, pkt, &flow, backend)?
    } else {
        transmit::forward(ctx, pkt, backend)?
    };
    Ok((action, Reason::IcmpErrorForwarded))
}
