//! Policy: the drop list (by source, for every IP packet), whether a destination is ours,
//! which service a packet is for, the per-source limit of new flows and the VIP's ceiling.

use core::arch::asm;

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FlowKey, MAX_RX_IFACES, RateKey, Reason, VipAddr, VipKey, VipMeta, drop_filter_slot,
    vip_addr_filter_slot,
};

use crate::{
    count,
    frame::load,
    maps::{
        DROP_FILTER, FIREWALL_STATS, FIREWALL_V4, FIREWALL_V6, RATE_LIMITS, RX_IFACES,
        VIP_ADDR_FILTER, VIP_ADDRS, VIP_NEW_FLOW_TAT, VIPS,
    },
};

/// The drop list, by source address, for every IP packet whoever it is for: the balancer
/// is the first thing packets meet, so it is where the firewall belongs.
#[inline(always)]
pub fn firewall(flow: &FlowKey, frame_len: u64) -> Result<(), Reason> {
    let rule = if flow.family == FAMILY_V4 {
        FIREWALL_V4.get(&Key::new(32, flow.src[0].to_ne_bytes()))
    } else {
        let w = |i: usize| flow.src[i].to_ne_bytes();
        let (a, b, c, d) = (w(0), w(1), w(2), w(3));
        let addr = [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ];
        FIREWALL_V6.get(&Key::new(128, addr))
    };
    match rule {
        Some(&rule_id) => {
            count::packet(&FIREWALL_STATS, rule_id, frame_len);
            Err(Reason::DropFirewall)
        }
        None => Ok(()),
    }
}

/// Whether the frame was sent to this balancer at L2: to the ingress interface's own MAC
/// (`lb_common::RxIface`) or to a VRRP virtual MAC (00:00:5e:00:01:xx IPv4, :02:xx IPv6).
/// An interface the agent has not described is taken on trust.
#[inline(always)]
pub fn addressed_to_us(ctx: &XdpContext) -> bool {
    let ifindex = ctx.ingress_ifindex() as u32;
    let Some(iface) = RX_IFACES.get(ifindex % MAX_RX_IFACES) else {
        return true;
    };
    if iface.ifindex != ifindex {
        return true;
    }
    let (Some(head), Some(tail)) = (load::<u32>(ctx, 0), load::<u16>(ctx, 4)) else {
        return false;
    };
    let [m0, m1, m2, m3, m4, m5] = iface.mac;
    if head == u32::from_ne_bytes([m0, m1, m2, m3]) && tail == u16::from_ne_bytes([m4, m5]) {
        return true;
    }
    let [v4, _] = tail.to_ne_bytes();
    head == u32::from_ne_bytes([0x00, 0x00, 0x5e, 0x00]) && (v4 == 0x01 || v4 == 0x02)
}

/// Whether the source may be in a drop rule: one array read. A clear bit means certainly
/// not (the agent sets the bit of every source a rule covers before it writes the rule), so
/// the packet skips the LPM tries; a set bit sends it to `firewall` before anything else,
/// its flow included, which is how a rule stops the established flows of its sources.
#[inline(always)]
pub fn maybe_listed_source(flow: &FlowKey) -> bool {
    let (word, bit) = drop_filter_slot(flow.family, &flow.src);
    DROP_FILTER.get(word).is_none_or(|w| w & bit != 0)
}

/// Whether the destination may be a VIP address: one array read. A clear bit means
/// certainly not (the agent sets the bit of every VIP address before the address), so
/// traffic for the host skips the flow table; a set bit is confirmed by `vip_address`.
#[inline(always)]
pub fn maybe_vip_address(flow: &FlowKey) -> bool {
    let (word, bit) = vip_addr_filter_slot(&flow.dst);
    VIP_ADDR_FILTER.get(word).is_none_or(|w| w & bit != 0)
}

/// Only a VIP's packets are ours to judge further; the host handles the rest as ever.
#[inline(always)]
pub fn vip_address(flow: &FlowKey) -> Result<(), Reason> {
    let key = VipAddr {
        addr: flow.dst,
        family: flow.family,
        _pad: [0; 3],
    };
    match VIP_ADDRS.get_ptr(&key) {
        Some(_) => Ok(()),
        None => Err(Reason::PassNotVip),
    }
}

/// The service a packet to a VIP address is for: only a VIP's own ports are open.
#[inline(always)]
pub fn service(flow: &FlowKey) -> Option<VipMeta> {
    let key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: the agent replaces a VIP's entry whole (one map update), and the value is
    // copied out at once.
    VIPS.get_ptr(&key).map(|meta| unsafe { *meta })
}

/// Per-source limit of new flows, as a generic cell rate algorithm: one timestamp per
/// source (the theoretical arrival time of its next new flow), no timer, no refill loop.
/// Checked only when a flow is new, so established flows never pay for it.
#[inline(always)]
pub fn rate_limit(flow: &FlowKey, vip: &VipMeta) -> Result<(), Reason> {
    if vip.rate_interval_ns == 0 {
        return Ok(());
    }
    let key = RateKey {
        addr: flow.src,
        vip_id: vip.vip_id,
        family: flow.family,
        _pad: [0; 3],
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match RATE_LIMITS.get_ptr_mut(&key) {
        Some(tat) => {
            // SAFETY: an LRU element stays valid for the rest of the run (RCU).
            let tat = unsafe { &mut *tat };
            let due = if *tat > now { *tat } else { now };
            if due - now > vip.rate_burst_ns {
                return Err(Reason::DropRateLimited);
            }
            // Two CPUs racing here may both pass: a limit off by one, never a lost packet.
            *tat = due + vip.rate_interval_ns;
        }
        None => {
            let _ = RATE_LIMITS.insert(&key, &(now + vip.rate_interval_ns), 0);
        }
    }
    Ok(())
}

/// The VIP's ceiling on new flows from all sources together, checked after the per-source
/// limit, so that a flood from random sources (each within its own limit) costs the
/// backends at most this many new flows a second. A GCRA like `rate_limit`, with its one
/// timestamp per VIP shared by every CPU: over the ceiling a packet only reads it, so a
/// flood bounces off a cache line that changes at most at the ceiling's rate; a flow let in
/// moves it with one compare-and-exchange.
#[inline(always)]
pub fn vip_ceiling(vip: &VipMeta) -> Result<(), Reason> {
    if vip.new_flow_interval_ns == 0 {
        return Ok(());
    }
    let tat = VIP_NEW_FLOW_TAT
        .get_ptr_mut(vip.vip_id)
        .ok_or(Reason::DropVipRateLimited)?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: an array element, valid for the map's lifetime and 8-byte aligned, so the
    // load is one instruction and sees a whole value.
    let mut seen = unsafe { core::ptr::read_volatile(tat) };
    // Another CPU may move the timestamp between the read and the exchange: try again
    // with what it wrote, once; losing twice in a row means flows arrive as fast as CPUs
    // can take them, and the flow is refused (the ceiling errs on the backends' side).
    for _ in 0..2 {
        let due = if seen > now { seen } else { now };
        if due - now > vip.new_flow_burst_ns {
            return Err(Reason::DropVipRateLimited);
        }
        // SAFETY: as above; the exchange is atomic.
        let found = unsafe { cmpxchg(tat, seen, due + vip.new_flow_interval_ns) };
        if found == seen {
            return Ok(());
        }
        seen = found;
    }
    Err(Reason::DropVipRateLimited)
}

/// Atomic compare-and-exchange: stores `new` at `ptr` if it holds `expected`, and returns
/// what it held. Written as assembly for the reason `select::fetch_add` gives; the
/// instruction takes the expected value in r0 and leaves the old one there.
///
/// # Safety
/// `ptr` must point to a u64 in map memory.
#[inline(always)]
unsafe fn cmpxchg(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let mut old = expected;
    unsafe {
        asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("r0") old,
            options(nostack),
        );
    }
    old
}
