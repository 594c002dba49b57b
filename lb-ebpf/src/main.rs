//! The data plane: one XDP program, a pipeline of small stages, one file each:
//!
//! - `parse`: Ethernet (one optional 802.1Q tag), IPv4/IPv6, TCP/UDP ports and flags;
//! - `policy`: the drop list, whether the destination is a VIP address, which service
//!   (VIP) it is for, the per-source limit of new flows;
//! - `select`: the flow's pinned backend, or a new one from the VIP's ring;
//! - `transmit`: MAC rewrite, then XDP_TX or XDP_REDIRECT;
//! - `icmp`: echo requests answered, errors about a flow sent on to its backend;
//! - `count`: per-CPU counters; `maps`: every map; `frame`: the only frame memory access.
//!
//! Every packet is counted under exactly one reason (`lb_common::Reason`). Anything not
//! addressed to a VIP and not from a dropped source leaves untouched with XDP_PASS.
#![no_std]
#![no_main]
// See `select::fetch_add`: BPF atomics are written as assembly.
#![feature(asm_experimental_arch)]

mod count;
mod frame;
mod icmp;
mod maps;
mod parse;
mod policy;
mod select;
mod transmit;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::Reason;

use crate::maps::{BACKEND_STATS, REASON_STATS, VIP_STATS};

#[xdp]
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
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let mut pkt = parse::ip(ctx)?;
    policy::firewall(&pkt.flow, pkt.len)?;
    policy::vip_address(&pkt.flow)?;
    parse::transport(ctx, &mut pkt)?;
    if pkt.flow.proto == parse::PROTO_ICMP || pkt.flow.proto == parse::PROTO_ICMPV6 {
        return icmp::handle(ctx, &pkt);
    }
    let vip = policy::service(&pkt.flow).ok_or(Reason::DropClosedPort)?;
    let (backend_id, backend) = select::backend(&pkt.flow, &vip, pkt.syn)?;
    let action = transmit::forward(ctx, &backend)?;
    count::packet(&VIP_STATS, vip.vip_id, pkt.len);
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
