//! ICMP to a VIP address, handled deliberately:
//!
//! - echo requests are answered from XDP, so a VIP can be pinged like any address;
//! - errors about a flow (destination unreachable, fragmentation needed / packet too big,
//!   time exceeded) are sent on to the backend that serves the flow: with direct server
//!   return the backends send the big packets, so they are the ones that must learn the
//!   path MTU;
//! - IPv6 neighbour discovery goes to the host, which owns the address on the wire;
//! - everything else is dropped and counted.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{BACKEND_F_IN_USE, FAMILY_V4, FlowKey, Reason, VIP_F_HASH};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{BACKENDS, FLOWS, Packet, addr_from_v6, forward, lookup_vip, pick_from_ring, ptr_at};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

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
    let kind: *const u8 = ptr_at(ctx, pkt.l4).ok_or(Reason::DropTruncatedL4)?;
    let kind = unsafe { *kind };
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
fn swap_macs(ctx: &XdpContext) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropTruncatedL3)?;
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    Ok(())
}

/// Rewrites the ICMP type in place, fixing the checksum (the code byte stays).
#[inline(always)]
fn set_icmp_type(ctx: &XdpContext, pkt: &Packet, from: u8, to: u8) -> Result<(), Reason> {
    let hdr: *mut [u8; 4] = ptr_at(ctx, pkt.l4).ok_or(Reason::DropTruncatedL4)?;
    let hdr = unsafe { &mut *hdr };
    let code = hdr[1];
    let csum = u16::from_be_bytes([hdr[2], hdr[3]]);
    let csum = csum_replace(
        csum,
        u16::from_be_bytes([from, code]),
        u16::from_be_bytes([to, code]),
    );
    hdr[0] = to;
    hdr[2..4].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

#[inline(always)]
fn echo_reply_v4(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::DropTruncatedL3)?;
    let ip = unsafe { &mut *ip };
    // Swapping the addresses leaves the header checksum as it is; the TTL does not.
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new = u16::from_be_bytes([REPLY_TTL, ip.proto]);
    let check = csum_replace(u16::from_be_bytes(ip.check), old, new);
    ip.ttl = REPLY_TTL;
    ip.check = check.to_be_bytes();
    set_icmp_type(ctx, pkt, ICMP_ECHO, ICMP_ECHO_REPLY)?;
    swap_macs(ctx)?;
    Ok((xdp_action::XDP_TX, Reason::IcmpEchoReply))
}

#[inline(always)]
fn echo_reply_v6(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::DropTruncatedL3)?;
    let ip = unsafe { &mut *ip };
    // The ICMPv6 checksum covers the addresses, but swapping them keeps the sum.
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    ip.hop_limit = REPLY_TTL;
    set_icmp_type(ctx, pkt, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)?;
    swap_macs(ctx)?;
    Ok((xdp_action::XDP_TX, Reason::IcmpEchoReply))
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
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).ok_or(Reason::DropIcmpNoFlow)?;
        let ip = unsafe { &*ip };
        flow.proto = ip.proto;
        flow.src[0] = u32::from_ne_bytes(ip.dst_addr);
        flow.dst[0] = u32::from_ne_bytes(ip.src_addr);
        inner + ((ip.vihl & 0x0f) as usize) * 4
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).ok_or(Reason::DropIcmpNoFlow)?;
        let ip = unsafe { &*ip };
        flow.proto = ip.next_hdr;
        flow.src = addr_from_v6(ip.dst_addr);
        flow.dst = addr_from_v6(ip.src_addr);
        inner + Ipv6Hdr::LEN
    };
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::DropIcmpNoFlow)?;
    let ports = unsafe { *ports };
    flow.sport = ports[1];
    flow.dport = ports[0];
    // An error about traffic that did not come from this VIP is not ours to pass on.
    if flow.dst != pkt.flow.dst {
        return Err(Reason::DropIcmpNoFlow);
    }
    Ok(flow)
}

/// Sends an ICMP error on to the backend of the flow it is about: the pinned one, or for a
/// hash-mode VIP the one the hash picks (a flow this balancer never saw, active-active).
/// The flow table is not touched: an error never creates a flow.
#[inline(always)]
fn error_to_backend(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    let flow = quoted_flow(ctx, pkt)?;
    let vip = lookup_vip(&flow).ok_or(Reason::DropIcmpNoFlow)?;
    let backend_id = match FLOWS.get_ptr(&flow) {
        Some(pinned) => unsafe { (*pinned).backend_id },
        None if vip.flags & VIP_F_HASH != 0 => {
            pick_from_ring(&flow, &vip).map_err(|_| Reason::DropIcmpNoFlow)?
        }
        None => return Err(Reason::DropIcmpNoFlow),
    };
    let backend = *BACKENDS.get(backend_id).ok_or(Reason::DropIcmpNoFlow)?;
    if backend.flags & BACKEND_F_IN_USE == 0 {
        return Err(Reason::DropIcmpNoFlow);
    }
    let action = forward(ctx, &backend)?;
    Ok((action, Reason::IcmpErrorForwarded))
}
