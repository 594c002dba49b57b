//! `lb decap`, on a backend: a second XDP program in the same object that strips the
//! outer header the balancer's tunnel and gue modes add (IPv4 in IPv4, IPv6 in IPv6, GUE
//! on the configured UDP port) from packets whose inner destination is one of its VIPs,
//! and passes the inner packet up to the host's stack, where the VIP sits on loopback.
//! Everything else passes untouched. Every packet is counted under one `DecapReason`.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext};
use lb_common::{DecapReason, FAMILY_V4, FAMILY_V6, PROTO_UDP, Reason, VipAddr, xdp};

use crate::{
    count,
    frame::{load, store},
    maps::{DECAP_GUE_PORT, DECAP_STATS, DECAP_VIPS},
    parse::{self, ETH_P_IP, ETH_P_IPV6, PROTO_IPIP, PROTO_IPV6, load_addr6},
};

const UDP_HLEN: usize = 8;

// Inlined into the macro's entry point, as `lb_xdp` is.
#[xdp]
#[inline(always)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let reason = decapsulate(&ctx);
    count::packet(&DECAP_STATS, reason as u32, len);
    xdp::PASS
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> DecapReason {
    let Ok(outer) = parse::ip(ctx) else {
        return DecapReason::PassNotTunnel;
    };
    // Fragments, IPv4 options and IPv6 extension headers are the kernel's to deal with
    // (a protocol the balancer serves no VIP with is what a tunnel is, here).
    if matches!(outer.unbalanceable, Some(r) if r != Reason::DropClosedPort) {
        return DecapReason::PassNotTunnel;
    }
    let inner = match outer.flow.proto {
        PROTO_IPIP if outer.flow.family == FAMILY_V4 => outer.l4,
        PROTO_IPV6 if outer.flow.family == FAMILY_V6 => outer.l4,
        PROTO_UDP if is_gue_port(ctx, outer.l4) => outer.l4 + UDP_HLEN,
        _ => return DecapReason::PassNotTunnel,
    };
    let Some(version) = load::<u8>(ctx, inner).map(|v| v >> 4) else {
        return DecapReason::PassMalformed;
    };
    let mut vip = VipAddr::default();
    let ethertype = match version {
        4 => {
            let Some(dst) = load::<u32>(ctx, inner + 16) else {
                return DecapReason::PassMalformed;
            };
            vip.addr[0] = dst;
            vip.family = FAMILY_V4;
            ETH_P_IP
        }
        6 => {
            let Some(dst) = load_addr6(ctx, inner + 24) else {
                return DecapReason::PassMalformed;
            };
            vip.addr = dst;
            vip.family = FAMILY_V6;
            ETH_P_IPV6
        }
        _ => return DecapReason::PassMalformed,
    };
    // SAFETY: a lookup; the value is not read.
    if unsafe { DECAP_VIPS.get(&vip) }.is_none() {
        return DecapReason::PassNotVip;
    }
    match strip(ctx, outer.l3, inner - outer.l3, ethertype) {
        Some(()) => DecapReason::Decapsulated,
        None => DecapReason::PassMalformed,
    }
}

/// Whether the UDP datagram at `l4` is to the configured GUE port.
#[inline(always)]
fn is_gue_port(ctx: &XdpContext, l4: usize) -> bool {
    let port = DECAP_GUE_PORT.get(0).copied().unwrap_or(0) as u16;
    port != 0 && load::<u16>(ctx, l4 + 2) == Some(port)
}

/// Moves the Ethernet header (and a VLAN tag) `outer` bytes on, over the outer header,
/// with the inner packet's EtherType, and starts the frame there.
#[inline(always)]
fn strip(ctx: &XdpContext, l3: usize, outer: usize, ethertype: u16) -> Option<()> {
    let macs: [u32; 3] = [load(ctx, 0)?, load(ctx, 4)?, load(ctx, 8)?];
    let tag: u32 = load(ctx, 12)?;
    let mut i = 0;
    while i < 3 {
        store(ctx, outer + 4 * i, macs[i])?;
        i += 1;
    }
    if l3 > 14 {
        // The 802.1Q tag: its TPID and TCI stay, the EtherType after it changes.
        store(ctx, outer + 12, tag)?;
    }
    store(ctx, outer + l3 - 2, ethertype.to_be())?;
    // SAFETY: the helper only moves the frame's start forward within the frame (`outer`
    // bytes of header were read above); nothing reads the frame after it here.
    match unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } {
        0 => Some(()),
        _ => None,
    }
}
