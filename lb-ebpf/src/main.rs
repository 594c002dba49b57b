//! The data plane: one XDP program, a pipeline of small steps.
//!
//! parse (Ethernet, 802.1Q, IPv4/IPv6, TCP/UDP) -> vip lookup -> flow lookup or backend
//! selection -> MAC rewrite -> XDP_TX / XDP_REDIRECT, and every packet is counted under
//! exactly one reason. Anything not addressed to a VIP leaves untouched with XDP_PASS.
#![no_std]
#![no_main]
// See `fetch_add`: BPF atomics are written as assembly.
#![feature(asm_experimental_arch)]

use core::{arch::asm, mem::size_of};

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Addr, BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, Backend, Counters, FAMILY_V4,
    FAMILY_V6, FlowKey, FlowValue, MAX_BACKENDS, MAX_FLOWS, MAX_TX_PORTS, MAX_VIPS, PROTO_TCP,
    PROTO_UDP, REASON_COUNT, RING_SLAB_LEN, Reason, VIP_F_HASH, VipAddr, VipKey, VipMeta,
    flow_hash,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

#[map]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static VIP_ADDRS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static RING_SLAB: Array<u32> = Array::with_max_entries(RING_SLAB_LEN, 0);
#[map]
static RR_CURSOR: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
#[map]
static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static REASON_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
/// IPv4 "more fragments" flag and fragment offset, as one mask over the flags word.
const IP_MF_OFFSET: u16 = 0x3fff;

/// A parsed packet: what the rest of the pipeline needs, nothing more.
struct Packet {
    flow: FlowKey,
    len: u64,
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = match process(&ctx) {
        Ok(action) => (action, Reason::Forwarded),
        Err(reason) => (verdict(reason), reason),
    };
    count(&REASON_STATS, reason as u32, len, false);
    action
}

/// Passes go to the host's stack, drops are dropped: the reason alone decides.
#[inline(always)]
fn verdict(reason: Reason) -> u32 {
    match reason {
        Reason::PassNotIp | Reason::PassNotVip | Reason::PassNoNeigh => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<u32, Reason> {
    let pkt = parse(ctx)?;
    let vip = lookup_vip(&pkt.flow)?;
    let (backend_id, backend) = select_backend(&pkt.flow, &vip)?;
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    rewrite_macs(ctx, &backend)?;
    let action = transmit(ctx, &backend)?;
    count(&VIP_STATS, vip.vip_id, pkt.len, false);
    count(&BACKEND_STATS, backend_id, pkt.len, false);
    Ok(action)
}

// ---- parse -------------------------------------------------------------------------------

/// A pointer to a `T` at `offset` bytes into the frame, if the frame holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let (ether_type, l3) = parse_eth(ctx)?;
    let frame_len = ctx.data_end() - ctx.data();
    let mut flow = FlowKey::default();
    let (l4, ip_end) = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3, frame_len, &mut flow)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3, frame_len, &mut flow)?,
        _ => return Err(Reason::PassNotIp),
    };
    parse_ports(ctx, l4, ip_end, &mut flow)?;
    Ok(Packet {
        flow,
        len: frame_len as u64,
    })
}

/// The EtherType and the offset of the L3 header, past at most one 802.1Q tag.
#[inline(always)]
fn parse_eth(ctx: &XdpContext) -> Result<(u16, usize), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropTruncatedL3)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_8021Q {
        return Ok((ether_type, EthHdr::LEN));
    }
    // The inner EtherType sits in the last two bytes of the tag.
    let inner: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + 2).ok_or(Reason::DropTruncatedL3)?;
    Ok((
        u16::from_be_bytes(unsafe { *inner }),
        EthHdr::LEN + VLAN_HLEN,
    ))
}

/// Checks the IPv4 header the way the kernel's receive path would (so dropping here never
/// drops anything the host would have accepted), fills the addresses and protocol, and
/// returns the L4 offset and where the IP packet ends (Ethernet padding may follow).
#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    l3: usize,
    frame_len: usize,
    flow: &mut FlowKey,
) -> Result<(usize, usize), Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::DropTruncatedL3)?;
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > frame_len {
        return Err(Reason::DropBadIpHeader);
    }
    flow.family = FAMILY_V4;
    flow.proto = ip.proto;
    flow.src[0] = u32::from_ne_bytes(ip.src_addr);
    flow.dst[0] = u32::from_ne_bytes(ip.dst_addr);
    // Only a VIP's packets are ours to judge further; the host handles the rest as ever.
    require_vip_addr(flow)?;
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Err(Reason::DropFragment);
    }
    if ihl != Ipv4Hdr::LEN {
        return Err(Reason::DropIpOptions);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err(Reason::PassNotVip);
    }
    Ok((l3 + Ipv4Hdr::LEN, l3 + tot_len))
}

#[inline(always)]
fn parse_ipv6(
    ctx: &XdpContext,
    l3: usize,
    frame_len: usize,
    flow: &mut FlowKey,
) -> Result<(usize, usize), Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::DropTruncatedL3)?;
    let ip = unsafe { &*ip };
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    if ip.vcf[0] >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload_len > frame_len {
        return Err(Reason::DropBadIpHeader);
    }
    flow.family = FAMILY_V6;
    flow.proto = ip.next_hdr;
    flow.src = addr_from_v6(ip.src_addr);
    flow.dst = addr_from_v6(ip.dst_addr);
    require_vip_addr(flow)?;
    match ip.next_hdr {
        PROTO_TCP | PROTO_UDP => Ok((l3 + Ipv6Hdr::LEN, l3 + Ipv6Hdr::LEN + payload_len)),
        // ICMPv6 (neighbour discovery, errors) and "no next header" belong to the host.
        58 | 59 => Err(Reason::PassNotVip),
        _ => Err(Reason::DropIpv6ExtHeader),
    }
}

#[inline(always)]
fn addr_from_v6(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn require_vip_addr(flow: &FlowKey) -> Result<(), Reason> {
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

/// Source and destination ports sit in the first four bytes of both TCP and UDP. The whole
/// minimal header must lie inside the IP packet, not merely inside the frame: Ethernet
/// padding after a cut-short packet is no header.
#[inline(always)]
fn parse_ports(
    ctx: &XdpContext,
    l4: usize,
    ip_end: usize,
    flow: &mut FlowKey,
) -> Result<(), Reason> {
    let min_len = if flow.proto == PROTO_TCP { 20 } else { 8 };
    if l4 + min_len > ip_end || ctx.data() + l4 + min_len > ctx.data_end() {
        return Err(Reason::DropTruncatedL4);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::DropTruncatedL4)?;
    let ports = unsafe { *ports };
    flow.sport = ports[0];
    flow.dport = ports[1];
    Ok(())
}

// ---- lookup and select -------------------------------------------------------------------

#[inline(always)]
fn lookup_vip(flow: &FlowKey) -> Result<VipMeta, Reason> {
    let key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    match VIPS.get_ptr(&key) {
        Some(meta) => Ok(unsafe { *meta }),
        None => Err(Reason::PassNotVip),
    }
}

/// The flow's pinned backend while that backend still keeps flows; otherwise a new one from
/// the VIP's ring, remembered in the flow table.
#[inline(always)]
fn select_backend(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend), Reason> {
    if let Some(pinned) = FLOWS.get_ptr(flow) {
        let pinned = unsafe { *pinned };
        if let Some(backend) = BACKENDS.get(pinned.backend_id) {
            let keep = BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS;
            if backend.flags & keep == keep && backend.generation == pinned.backend_generation {
                return Ok((pinned.backend_id, *backend));
            }
        }
    }
    let backend_id = pick_from_ring(flow, vip)?;
    let backend = *BACKENDS.get(backend_id).ok_or(Reason::DropNoBackend)?;
    if backend.flags & BACKEND_F_IN_USE == 0 {
        return Err(Reason::DropNoBackend);
    }
    let pinned = FlowValue {
        backend_id,
        backend_generation: backend.generation,
    };
    // A full table evicts the least recently used flow; insert cannot fail otherwise.
    let _ = FLOWS.insert(flow, &pinned, 0);
    count(&VIP_STATS, vip.vip_id, 0, true);
    count(&BACKEND_STATS, backend_id, 0, true);
    Ok((backend_id, backend))
}

/// Round robin takes ring entries in turn (one shared cursor per VIP, so the order holds
/// across CPUs); hash mode takes the entry the flow hashes to (Maglev).
#[inline(always)]
fn pick_from_ring(flow: &FlowKey, vip: &VipMeta) -> Result<u32, Reason> {
    if vip.ring_len == 0 {
        return Err(Reason::DropNoBackend);
    }
    let slot = if vip.flags & VIP_F_HASH != 0 {
        flow_hash(flow) % vip.ring_len
    } else {
        let cursor = RR_CURSOR
            .get_ptr_mut(vip.vip_id)
            .ok_or(Reason::DropNoBackend)?;
        let turn = unsafe { fetch_add(cursor, 1) };
        (turn % vip.ring_len as u64) as u32
    };
    RING_SLAB
        .get(vip.ring_off + slot)
        .copied()
        .ok_or(Reason::DropNoBackend)
}

/// Atomic fetch-and-add. rustc hands bpf-linker the "generic" CPU, for which LLVM refuses
/// to use the old value of an atomic add, although every kernel this runs on (5.12+) has
/// the BPF_FETCH instruction; aya-build owns the rustflags, so the instruction is spelled
/// out here instead.
#[inline(always)]
unsafe fn fetch_add(ptr: *mut u64, value: u64) -> u64 {
    let mut old = value;
    unsafe {
        asm!(
            "{old} = atomic_fetch_add((u64 *)({ptr} + 0), {old})",
            ptr = in(reg) ptr,
            old = inout(reg) old,
            options(nostack),
        );
    }
    old
}

// ---- rewrite and transmit ----------------------------------------------------------------

/// Direct server return at L2: only the MACs change, so no checksum needs touching.
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, backend: &Backend) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropTruncatedL3)?;
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = backend.src_mac;
    }
    Ok(())
}

#[inline(always)]
fn transmit(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(xdp_action::XDP_TX);
    }
    match TX_PORTS.redirect(backend.ifindex, 0) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => Ok(action),
        _ => Err(Reason::DropRedirectFailed),
    }
}

// ---- count -------------------------------------------------------------------------------

#[inline(always)]
fn count(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        let c = unsafe { &mut *c };
        if new_flow {
            c.new_flows += 1;
        } else {
            c.packets += 1;
            c.bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
