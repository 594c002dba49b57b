//! The data plane: one XDP program, a pipeline of small stages, one file each:
//!
//! - `parse`: Ethernet (one optional 802.1Q tag), IPv4/IPv6, TCP/UDP ports and flags;
//! - `select`: the flow's pinned backend (first: an established flow needs nothing else,
//!   nor does a SYN retransmitted during the handshake), or a new one from the VIP's ring;
//! - `policy`: the drop list, whether the frame was sent to this balancer at L2, whether
//!   the destination is a VIP address, which service (VIP) it is for, the per-source limit
//!   of new flows and the VIP's ceiling on them;
//! - `transmit`: MAC rewrite, then XDP_TX or XDP_REDIRECT;
//! - `tunnel`: the outer header of tunnel and gue modes, and ICMP "too big" answers;
//! - `icmp`: echo requests answered, errors about a flow sent on to its backend;
//! - `persist`, `leastconn`: source affinity and least connections, for new flows;
//! - `refuse`: a SYN to a VIP with no backend answered with a RST;
//! - `share`: new flows' pins for the agent to share with peer balancers;
//! - `count`: per-CPU counters; `maps`: every map; `frame`: the only frame memory access;
//! - `nat`, `csum`: full NAT both ways (a VIP in `nat` mode) and incremental checksums.
//!
//! A second program, `decap::lb_decap` (`lb decap`), runs on backends: it strips the
//! tunnels `tunnel` makes.
//!
//! Every packet is counted under exactly one reason (`lb_common::Reason`). Anything not
//! addressed to a VIP and not from a dropped source leaves untouched with XDP_PASS.
#![no_std]
#![no_main]
// See `select::fetch_add`: BPF atomics are written as assembly.
#![feature(asm_experimental_arch)]

mod count;
mod csum;
mod decap;
mod frame;
mod icmp;
mod leastconn;
mod maps;
mod nat;
mod parse;
mod persist;
mod policy;
mod refuse;
mod select;
mod share;
mod transmit;
mod tunnel;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use lb_common::{BACKEND_F_LEASTCONN, BACKEND_F_NAT, Backend, Reason};

use crate::{
    maps::{BACKEND_STATS, REASON_STATS, VIP_STATS},
    parse::Packet,
};

// Inlined into the entry point the macro wraps it in: otherwise it is a BPF-to-BPF call,
// with its own prologue and register saves, on every packet.
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = match process(&ctx) {
        Ok(done) => done,
        Err(reason) => (reason.outcome().stop_action(), reason),
    };
    count::packet(&REASON_STATS, reason as u32, len);
    action
}

/// The XDP action and the reason it is counted under, or the reason of a pass or drop.
///
/// An established flow costs one hash lookup: the flow table is consulted before the VIP
/// tables, which only new flows and traffic that is not balanced need, and the drop list's
/// tries are searched only for a source that the drop filter says may be in a rule; for
/// such a source they come first, so a rule stops its established flows and a listed
/// source's packet costs no flow lookup.
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let mut pkt = parse::ip(ctx)?;
    if policy::maybe_listed_source(&pkt.flow) {
        policy::firewall(&pkt.flow, pkt.len)?;
    }
    // Ports and flags; what is wrong with them matters only for a VIP address (below).
    let transport = parse::transport(ctx, &mut pkt);
    let maybe_vip = policy::maybe_vip_address(&pkt.flow);
    if maybe_vip && !policy::addressed_to_us(ctx) {
        return Err(Reason::PassNotOurMac);
    }
    let balanceable = transport.is_ok() && parse::has_ports(&pkt);
    if maybe_vip
        && balanceable
        && let Some((backend_id, backend)) = select::established(&pkt.flow, pkt.syn)
    {
        if backend.flags & BACKEND_F_LEASTCONN != 0 {
            // SAFETY: a helper without arguments.
            leastconn::seen(ctx, &pkt, unsafe { bpf_ktime_get_ns() });
        }
        return forward(ctx, &pkt, backend.vip_id, backend_id, backend);
    }
    // A NAT backend's answer to the SNAT address: one array read for other host traffic.
    if let Some(done) = nat::reply(ctx, &pkt, transport.is_ok()) {
        return done;
    }
    if !maybe_vip {
        return Err(Reason::PassNotVip);
    }
    let vip = if balanceable {
        policy::service(&pkt.flow)
    } else {
        None
    };
    let Some(vip) = vip else {
        // Not a service: is the address a VIP's at all, and if so what is wrong?
        policy::vip_address(&pkt.flow)?;
        transport?;
        if parse::is_icmp(&pkt) {
            return icmp::handle(ctx, &pkt);
        }
        return Err(Reason::DropClosedPort);
    };
    let (backend_id, backend) = match select::new_flow(&pkt.flow, &vip, pkt.syn) {
        Err(Reason::DropNoBackend) if pkt.syn => return refuse::reset(ctx, &pkt),
        picked => picked?,
    };
    forward(ctx, &pkt, vip.vip_id, backend_id, backend)
}

/// Sends the packet to its backend and counts it under its VIP and backend.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    vip_id: u32,
    backend_id: u32,
    backend: &Backend,
) -> Result<(u32, Reason), Reason> {
    let action = if backend.flags & BACKEND_F_NAT != 0 {
        nat::forward(ctx, pkt, backend_id, backend)?
    } else {
        transmit::forward(ctx, pkt, backend)?
    };
    count::packet(&VIP_STATS, vip_id, pkt.len);
    count::packet(&BACKEND_STATS, backend_id, pkt.len);
    Ok((action, Reason::Forwarded))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
