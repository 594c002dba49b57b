//! The data plane: one XDP program, a pipeline of small steps.
//!
//! parse (Ethernet, 802.1Q, IPv4/IPv6, TCP/UDP) -> firewall -> vip lookup -> flow lookup
//! or backend selection (rate-limited) -> MAC rewrite -> XDP_TX / XDP_REDIRECT, and every
//! packet is counted under exactly one reason. ICMP to a VIP address is answered (echo) or
//! sent on to the flow's backend (errors) in `icmp`. Anything not addressed to a VIP and not
//! from a dropped source leaves untouched with XDP_PASS.
#![no_std]
#![no_main]
// See `fetch_add`: BPF atomics are written as assembly.
#![feature(asm_experimental_arch)]

mod icmp;

use core::{arch::asm, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    Addr, BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, Backend, Counters, FAMILY_V4,
    FAMILY_V6, FlowKey, FlowValue, MAX_BACKENDS, MAX_FIREWALL_RULES, MAX_FLOWS, MAX_RATE_SOURCES,
    MAX_TX_PORTS, MAX_VIPS, PROTO_TCP, PROTO_UDP, REASON_COUNT, RING_SLAB_LEN, RateKey, Reason,
    VIP_F_HASH, VipAddr, VipKey, VipMeta, flow_hash,
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
#[map]
static FIREWALL_V4: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(MAX_FIREWALL_RULES, BPF_F_NO_PREALLOC);
#[map]
static FIREWALL_V6: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(MAX_FIREWALL_RULES, BPF_F_NO_PREALLOC);
#[map]
static FIREWALL_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_FIREWALL_RULES, 0);
#[map]
static RATE_LIMITS: LruHashMap<RateKey, u64> = LruHashMap::with_max_entries(MAX_RATE_SOURCES, 0);

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
    l3: usize,
    l4: usize,
    /// Where the IP packet ends (Ethernet padding may follow).
    ip_end: usize,
    /// A TCP SYN without ACK: the first packet of a new connection.
    syn: bool,
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = match process(&ctx) {
        Ok(done) => done,
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

/// The XDP action and the reason it is counted under, or the reason of a pass or drop.
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let pkt = parse(ctx)?;
    if pkt.flow.proto == icmp::PROTO_ICMP || pkt.flow.proto == icmp::PROTO_ICMPV6 {
        return icmp::handle(ctx, &pkt);
    }
    // Only a VIP's own ports are open on its address.
    let vip = lookup_vip(&pkt.flow).ok_or(Reason::DropClosedPort)?;
    let (backend_id, backend) = select_backend(&pkt.flow, &vip, pkt.syn)?;
    let action = forward(ctx, &backend)?;
    count(&VIP_STATS, vip.vip_id, pkt.len, false);
    count(&BACKEND_STATS, backend_id, pkt.len, false);
    Ok((action, Reason::Forwarded))
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
    let mut syn = false;
    if flow.proto == PROTO_TCP || flow.proto == PROTO_UDP {
        syn = parse_ports(ctx, l4, ip_end, &mut flow)?;
    }
    Ok(Packet {
        flow,
        len: frame_len as u64,
        l3,
        l4,
        ip_end,
        syn,
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
    firewall(flow, frame_len)?;
    // Only a VIP's packets are ours to judge further; the host handles the rest as ever.
    require_vip_addr(flow)?;
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Err(Reason::DropFragment);
    }
    if ihl != Ipv4Hdr::LEN {
        return Err(Reason::DropIpOptions);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != icmp::PROTO_ICMP {
        return Err(Reason::DropClosedPort);
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
    firewall(flow, frame_len)?;
    require_vip_addr(flow)?;
    match ip.next_hdr {
        PROTO_TCP | PROTO_UDP | icmp::PROTO_ICMPV6 => {
            Ok((l3 + Ipv6Hdr::LEN, l3 + Ipv6Hdr::LEN + payload_len))
        }
        // Extension headers: hop-by-hop, routing, fragment, ESP, AH, destination options,
        // mobility, HIP, shim6.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => Err(Reason::DropIpv6ExtHeader),
        _ => Err(Reason::DropClosedPort),
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

/// The drop list, by source address, for every IP packet whoever it is for: the balancer
/// is the first thing packets meet, so it is where the firewall belongs.
#[inline(always)]
fn firewall(flow: &FlowKey, frame_len: usize) -> Result<(), Reason> {
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
            count(&FIREWALL_STATS, rule_id, frame_len as u64, false);
            Err(Reason::DropFirewall)
        }
        None => Ok(()),
    }
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
) -> Result<bool, Reason> {
    let min_len = if flow.proto == PROTO_TCP { 20 } else { 8 };
    if l4 + min_len > ip_end || ctx.data() + l4 + min_len > ctx.data_end() {
        return Err(Reason::DropTruncatedL4);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::DropTruncatedL4)?;
    let ports = unsafe { *ports };
    flow.sport = ports[0];
    flow.dport = ports[1];
    if flow.proto != PROTO_TCP {
        return Ok(false);
    }
    let flags: *const u8 = ptr_at(ctx, l4 + 13).ok_or(Reason::DropTruncatedL4)?;
    let flags = unsafe { *flags };
    check_tcp_flags(flags)?;
    Ok(flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

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

// ---- lookup and select -------------------------------------------------------------------

#[inline(always)]
fn lookup_vip(flow: &FlowKey) -> Option<VipMeta> {
    let key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    VIPS.get_ptr(&key).map(|meta| unsafe { *meta })
}

/// The flow's pinned backend while that backend still keeps flows; otherwise a new one from
/// the VIP's ring, remembered in the flow table. A TCP SYN is a new connection even when
/// its 5-tuple is still in the table (a client reusing a source port): it is balanced
/// afresh, so it never lands on a backend that drains or left the ring since.
#[inline(always)]
fn select_backend(flow: &FlowKey, vip: &VipMeta, syn: bool) -> Result<(u32, Backend), Reason> {
    if let Some(pinned) = FLOWS.get_ptr(flow).filter(|_| !syn) {
        let pinned = unsafe { *pinned };
        if let Some(backend) = BACKENDS.get(pinned.backend_id) {
            let keep = BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS;
            if backend.flags & keep == keep && backend.generation == pinned.backend_generation {
                return Ok((pinned.backend_id, *backend));
            }
        }
    }
    rate_limit(flow, vip)?;
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

/// Per-source limit of new flows, as a generic cell rate algorithm: one timestamp per
/// source (the theoretical arrival time of its next new flow), no timer, no refill loop.
/// Checked only when a flow is new, so established flows never pay for it.
#[inline(always)]
fn rate_limit(flow: &FlowKey, vip: &VipMeta) -> Result<(), Reason> {
    if vip.rate_interval_ns == 0 {
        return Ok(());
    }
    let key = RateKey {
        addr: flow.src,
        vip_id: vip.vip_id,
        family: flow.family,
        _pad: [0; 3],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match RATE_LIMITS.get_ptr_mut(&key) {
        Some(tat) => {
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

/// Sends the frame to `backend`, or hands it to the host while its MAC is unknown.
#[inline(always)]
fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    rewrite_macs(ctx, backend)?;
    transmit(ctx, backend)
}

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
