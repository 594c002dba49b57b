//! Full NAT (`mode = "nat"`): backends see connections from the balancer's SNAT address
//! and answer it, so they need no VIP, no sysctl and no route.
//!
//! - forward: a client's packet gets destination = backend and source = the SNAT address
//!   with a port this flow was given (`allocate`);
//! - reply: a backend's packet to the SNAT address and port gets source = VIP and
//!   destination = client, and leaves toward the client's next hop from the kernel's FIB;
//! - ICMP errors about a translated flow are translated too, outer and quoted headers,
//!   both ways, so path MTU discovery works through the balancer.
//!
//! The translations live in two plain hash maps (never LRU: the kernel must never evict
//! one half of a pair): `NAT_FWD` by the client's flow, `NAT_REV` by the backend's answer.
//! A new flow first claims its port by inserting the reverse entry with BPF_NOEXIST, then
//! writes the forward one; the agent (lb-userspace/src/nat) expires both together and
//! removes a reverse entry whose forward one points elsewhere (a flow moved to another
//! backend, or two CPUs racing on a flow's first packets).
//!
//! The entry points and the larger steps are functions of their own (BPF-to-BPF calls),
//! not inlined: each has its own 512-byte stack, which the program as one function would
//! exceed.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns},
    programs::XdpContext,
};
use lb_common::{
    Addr, BACKEND_F_RESOLVED, Backend, FAMILY_V4, FlowKey, NAT_F_FIN, NAT_F_RST, NAT_PORT_PROBES,
    NAT_SNAT_V4, NAT_SNAT_V6, NAT_STAT_ALLOCATED, NAT_STAT_COLLISIONS, NAT_STAT_EXHAUSTED,
    NAT_TOUCH_NS, NatEntry, NatSnat, PROTO_TCP, PROTO_UDP, Reason, flow_hash, nat_reverse_key, xdp,
};

use crate::{
    csum::{self, Delta},
    frame::{load, store},
    maps::{NAT_FWD, NAT_REV, NAT_SCRATCH, NAT_SNAT, NAT_STATS, TX_PORTS},
    parse::{self, Packet, TCP_FIN, TCP_RST, TCP_SYN},
    transmit,
};

const EEXIST: i32 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Type, code, checksum and four bytes that depend on the type.
const ICMP_HLEN: usize = 8;

/// Translates a client's packet for a NAT backend and sends it there.
#[inline(never)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
) -> Result<u32, Reason> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let seen = closing_flags(ctx, pkt);
    let mut to = FlowKey::default();
    let known = match NAT_FWD.get_ptr_mut(&pkt.flow) {
        // SAFETY: a hash element stays valid for the rest of the run (RCU); only whole
        // words are written, by `touch`.
        Some(entry) => unsafe {
            let entry = &mut *entry;
            let same =
                entry.backend_id == backend_id && entry.backend_generation == backend.generation;
            if same {
                touch(entry, now, seen, pkt.syn);
                to = entry.to;
            }
            same
        },
        None => false,
    };
    if !known {
        allocate(&pkt.flow, backend_id, backend, seen, &mut to)?;
    }
    rewrite(ctx, pkt, &to)?;
    transmit::forward_as_is(ctx, backend)
}

/// A packet to the SNAT address: a backend's answer (or an ICMP error about a translated
/// flow) translated and sent to its client, or `None` when no translation knows it (the
/// host's own traffic, which goes on as if this were not here).
#[inline(always)]
pub fn reply(
    ctx: &XdpContext,
    pkt: &Packet,
    ports_read: bool,
) -> Option<Result<(u32, Reason), Reason>> {
    let snat = snat_of(pkt.flow.family)?;
    if snat.port_last == 0 || !same_addr(&snat.addr, &pkt.flow.dst) || pkt.unbalanceable.is_some() {
        return None;
    }
    let (translated, reason) = if parse::has_ports(pkt) {
        if !ports_read {
            return None;
        }
        (reply_ports(ctx, pkt), Reason::NatReply)
    } else if parse::is_icmp(pkt) {
        (reply_icmp(ctx, pkt), Reason::NatIcmpReply)
    } else {
        return None;
    };
    match translated {
        Ok(()) => Some(to_client(ctx, pkt).map(|action| (action, reason))),
        Err(Reason::PassNotVip) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Translates a backend's TCP/UDP answer; `PassNotVip` when no translation knows it.
/// (Functions that are BPF-to-BPF calls return one register, and call nothing that is not
/// inlined: the stacks of a chain of calls share 512 bytes.)
#[inline(never)]
fn reply_ports(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    let entry = NAT_REV.get_ptr_mut(&pkt.flow).ok_or(Reason::PassNotVip)?;
    // SAFETY: as in `forward`.
    let to = unsafe {
        let entry = &mut *entry;
        // A SYN-ACK answers a new connection (on ports a closed one used, perhaps).
        touch(
            entry,
            bpf_ktime_get_ns(),
            closing_flags(ctx, pkt),
            is_syn(ctx, pkt),
        );
        entry.to
    };
    rewrite(ctx, pkt, &to)
}

/// Translates an ICMP error from the backends' side about a translated flow; `PassNotVip`
/// when it is not one (the host's own business).
#[inline(never)]
fn reply_icmp(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    if !is_icmp_error(ctx, pkt) {
        return Err(Reason::PassNotVip);
    }
    let quote = quoted(ctx, pkt).ok_or(Reason::PassNotVip)?;
    let entry = NAT_REV.get_ptr(&quote.back).ok_or(Reason::PassNotVip)?;
    // SAFETY: copied out at once.
    let to = unsafe { (*entry).to };
    // The client knows only the VIP: the error comes from it, about the packet the client
    // sent.
    translate_icmp(ctx, pkt, &quote, &to)
}

/// An ICMP error from the clients' side about a NAT flow (`flow`, client -> VIP), for its
/// backend: the quote becomes the packet the backend sent (backend -> SNAT address and
/// port), the outer header SNAT address -> backend (an address the backend can answer,
/// unlike a router's on the far side of the balancer).
#[inline(never)]
pub fn icmp_to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    backend: &Backend,
) -> Result<u32, Reason> {
    let entry = NAT_FWD.get_ptr(flow).ok_or(Reason::DropIcmpNoFlow)?;
    // SAFETY: copied out at once.
    let to = unsafe { (*entry).to };
    let quote = quoted(ctx, pkt).ok_or(Reason::DropIcmpNoFlow)?;
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    translate_icmp(ctx, pkt, &quote, &to)?;
    transmit::forward_as_is(ctx, backend)
}

#[inline(always)]
fn snat_of(family: u8) -> Option<&'static NatSnat> {
    NAT_SNAT.get(if family == FAMILY_V4 {
        NAT_SNAT_V4
    } else {
        NAT_SNAT_V6
    })
}

/// Word by word: a slice comparison would be a call to `bcmp`.
#[inline(always)]
fn same_addr(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn stat(slot: u32) {
    if let Some(n) = NAT_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array element is this CPU's alone while the program runs.
        unsafe { *n += 1 };
    }
}

/// Whether a TCP segment carries SYN (a SYN-ACK, from a backend).
#[inline(always)]
fn is_syn(ctx: &XdpContext, pkt: &Packet) -> bool {
    pkt.flow.proto == PROTO_TCP && load::<u8>(ctx, pkt.l4 + 13).is_some_and(|f| f & TCP_SYN != 0)
}

/// `NAT_F_*` for a TCP segment's FIN and RST.
#[inline(always)]
fn closing_flags(ctx: &XdpContext, pkt: &Packet) -> u32 {
    if pkt.flow.proto != PROTO_TCP {
        return 0;
    }
    let flags: u8 = load(ctx, pkt.l4 + 13).unwrap_or(0);
    let mut seen = 0;
    if flags & TCP_FIN != 0 {
        seen |= NAT_F_FIN;
    }
    if flags & TCP_RST != 0 {
        seen |= NAT_F_RST;
    }
    seen
}

/// Notes a packet in one direction: its FIN/RST, and the time at most once a second (a
/// write per packet would bounce the entry's cache line between CPUs). A SYN on a closed
/// translation is a new connection reusing the ports: it starts with no flags.
#[inline(always)]
fn touch(entry: &mut NatEntry, now: u64, seen: u32, syn: bool) {
    if syn && entry.flags != 0 {
        entry.flags = 0;
    }
    if seen & !entry.flags != 0 {
        entry.flags |= seen;
    }
    if now.wrapping_sub(entry.last_seen_ns) > NAT_TOUCH_NS {
        entry.last_seen_ns = now;
    }
}

/// A new translation for `flow` to `backend`: a SNAT port from a start the flow hashes
/// to, the first of `NAT_PORT_PROBES` that is free toward this backend's address and
/// port (claimed by inserting the reverse entry with BPF_NOEXIST), then the forward entry.
/// Leaves in `to` what the client's packets become.
#[inline(always)]
fn allocate(
    flow: &FlowKey,
    backend_id: u32,
    backend: &Backend,
    seen: u32,
    to: &mut FlowKey,
) -> Result<(), Reason> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let snat = snat_of(flow.family).ok_or(Reason::DropNatNoSnat)?;
    if snat.port_last == 0 || snat.port_last < snat.port_first {
        return Err(Reason::DropNatNoSnat);
    }
    let span = u32::from(snat.port_last - snat.port_first) + 1;
    // The entries are built in per-CPU scratch memory: the stack is too small for them.
    let entry = NAT_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropNatTableFull)?;
    // SAFETY: a per-CPU array element is this CPU's alone while the program runs.
    let entry = unsafe { &mut *entry };
    entry.to = nat_reverse_key(flow);
    entry.backend_id = backend_id;
    entry.backend_generation = backend.generation;
    entry.last_seen_ns = now;
    entry.flags = 0;
    let mut rev_key = FlowKey {
        src: backend.addr,
        dst: snat.addr,
        sport: flow.dport,
        dport: 0,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let start = flow_hash(flow);
    for i in 0..NAT_PORT_PROBES {
        let port = u32::from(snat.port_first) + start.wrapping_add(i) % span;
        rev_key.dport = (port as u16).to_be();
        match NAT_REV.insert(&rev_key, entry, BPF_NOEXIST as u64) {
            Ok(()) => {
                *to = nat_reverse_key(&rev_key);
                entry.to = *to;
                entry.flags = seen;
                if NAT_FWD.insert(flow, entry, BPF_ANY as u64).is_err() {
                    // Never one half without the other.
                    let _ = NAT_REV.remove(&rev_key);
                    return Err(Reason::DropNatTableFull);
                }
                stat(NAT_STAT_ALLOCATED);
                return Ok(());
            }
            Err(e) if e == -EEXIST => stat(NAT_STAT_COLLISIONS),
            Err(_) => return Err(Reason::DropNatTableFull),
        }
    }
    stat(NAT_STAT_EXHAUSTED);
    Err(Reason::DropNatPortsExhausted)
}

/// Writes `src`/`dst` over the IP addresses of the header at `l3`; returns the change for
/// the checksums that cover them. IPv4's header checksum is updated here.
#[inline(always)]
fn set_addrs(
    ctx: &XdpContext,
    l3: usize,
    family: u8,
    old: (&Addr, &Addr),
    new: (&Addr, &Addr),
) -> Result<Delta, Reason> {
    let mut d = Delta::default();
    if family == FAMILY_V4 {
        d = d.word(old.0[0], new.0[0]).word(old.1[0], new.1[0]);
        store(ctx, l3 + 12, new.0[0]).ok_or(Reason::DropTruncatedL3)?;
        store(ctx, l3 + 16, new.1[0]).ok_or(Reason::DropTruncatedL3)?;
        csum::update(ctx, l3 + 10, d).ok_or(Reason::DropTruncatedL3)?;
    } else {
        let mut i = 0;
        while i < 4 {
            d = d.word(old.0[i], new.0[i]).word(old.1[i], new.1[i]);
            store(ctx, l3 + 8 + 4 * i, new.0[i]).ok_or(Reason::DropTruncatedL3)?;
            store(ctx, l3 + 24 + 4 * i, new.1[i]).ok_or(Reason::DropTruncatedL3)?;
            i += 1;
        }
    }
    Ok(d)
}

/// The source and destination ports as the one word they occupy.
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let [s0, s1] = sport.to_ne_bytes();
    let [d0, d1] = dport.to_ne_bytes();
    u32::from_ne_bytes([s0, s1, d0, d1])
}

/// Rewrites a TCP/UDP packet's addresses and ports to `to`, with its checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, to: &FlowKey) -> Result<(), Reason> {
    let f = &pkt.flow;
    let addrs = set_addrs(ctx, pkt.l3, f.family, (&f.src, &f.dst), (&to.src, &to.dst))?;
    let (old, new) = (ports_word(f.sport, f.dport), ports_word(to.sport, to.dport));
    store(ctx, pkt.l4, new).ok_or(Reason::DropTruncatedL4)?;
    let d = addrs.word(old, new);
    if f.proto == PROTO_TCP {
        csum::update(ctx, pkt.l4 + 16, d)
    } else {
        csum::update_udp(ctx, pkt.l4 + 6, d)
    }
    .ok_or(Reason::DropTruncatedL4)?;
    Ok(())
}

/// Sends a translated packet (now VIP -> client, as its header says) to the next hop the
/// kernel's FIB gives for the client: XDP_TX back out of the interface it came in on, else a redirect.
/// Without a neighbour entry the packet goes to the host, translated, which routes it and
/// resolves the neighbour.
#[inline(never)]
fn to_client(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Reason> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid input (plain integers and unions
    // of them).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = pkt.flow.proto;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    let l3 = pkt.l3;
    if pkt.flow.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = load(ctx, l3 + 12).ok_or(Reason::DropTruncatedL3)?;
        fib.__bindgen_anon_4.ipv4_dst = load(ctx, l3 + 16).ok_or(Reason::DropTruncatedL3)?;
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src =
            parse::load_addr6(ctx, l3 + 8).ok_or(Reason::DropTruncatedL3)?;
        fib.__bindgen_anon_4.ipv6_dst =
            parse::load_addr6(ctx, l3 + 24).ok_or(Reason::DropTruncatedL3)?;
    }
    // SAFETY: the context is the program's, the parameters a valid struct of the size
    // given, on this stack for the call.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Err(Reason::PassNatNoNeigh);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Reason::DropNatNoRoute);
    }
    // SAFETY: a successful lookup fills the MACs (the union's other member is for input).
    let (smac, dmac) = unsafe {
        let m = fib.__bindgen_anon_6.__bindgen_anon_2;
        (m.smac, m.dmac)
    };
    let [d0, d1, d2, d3, d4, d5] = dmac;
    let [s0, s1, s2, s3, s4, s5] = smac;
    store(ctx, 10, u16::from_ne_bytes([s4, s5])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 0, u32::from_ne_bytes([d0, d1, d2, d3])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 4, u16::from_ne_bytes([d4, d5])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 6, u32::from_ne_bytes([s0, s1, s2, s3])).ok_or(Reason::DropTruncatedL3)?;
    if fib.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(xdp::TX);
    }
    match TX_PORTS.redirect(fib.ifindex, 0) {
        Ok(xdp::REDIRECT) => Ok(xdp::REDIRECT),
        _ => Err(Reason::DropRedirectFailed),
    }
}

// ---- ICMP errors ----

/// Whether an ICMP packet is an error that quotes a packet (destination unreachable,
/// packet too big, time exceeded).
#[inline(always)]
fn is_icmp_error(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.l4 + ICMP_HLEN > pkt.ip_end {
        return false;
    }
    let Some(kind) = load::<u8>(ctx, pkt.l4) else {
        return false;
    };
    if pkt.flow.family == FAMILY_V4 {
        kind == 3 || kind == 11
    } else {
        (1..=3).contains(&kind)
    }
}

/// The packet an ICMP error quotes, and where its headers are. Only a plain IP header (no
/// IPv4 options, no IPv6 extension) with TCP or UDP ports inside the quote is
/// translatable.
struct Quote {
    /// The quoted packet reversed: the flow its answers belong to, which is how the
    /// translation tables know it (the quoted source is `back.dst`, and so on).
    back: FlowKey,
    /// Where the quoted IP header starts.
    l3: usize,
    /// Where the quoted TCP/UDP header starts.
    l4: usize,
}

#[inline(always)]
fn quoted(ctx: &XdpContext, pkt: &Packet) -> Option<Quote> {
    let l3 = pkt.l4 + ICMP_HLEN;
    let mut back = FlowKey {
        family: pkt.flow.family,
        ..Default::default()
    };
    let l4 = if pkt.flow.family == FAMILY_V4 {
        if load::<u8>(ctx, l3)? != 0x45 {
            return None;
        }
        back.proto = load(ctx, l3 + 9)?;
        back.dst[0] = load(ctx, l3 + 12)?;
        back.src[0] = load(ctx, l3 + 16)?;
        l3 + 20
    } else {
        back.proto = load(ctx, l3 + 6)?;
        back.dst = parse::load_addr6(ctx, l3 + 8)?;
        back.src = parse::load_addr6(ctx, l3 + 24)?;
        l3 + 40
    };
    if (back.proto != PROTO_TCP && back.proto != PROTO_UDP) || l4 + 4 > pkt.ip_end {
        return None;
    }
    let [s0, s1, d0, d1] = load::<u32>(ctx, l4)?.to_ne_bytes();
    back.dport = u16::from_ne_bytes([s0, s1]);
    back.sport = u16::from_ne_bytes([d0, d1]);
    Some(Quote { back, l3, l4 })
}

/// Rewrites an ICMP error about a translated flow: the outer addresses to `to`'s, the
/// quoted packet to `to` reversed (the quote is a packet going the other way), with every checksum that covers them: the quote's IPv4
/// header and (when quoted) TCP/UDP checksums, the outer IPv4 header's, and the ICMP
/// checksum (over the whole quote, and for ICMPv6 the outer addresses too).
#[inline(always)]
fn translate_icmp(
    ctx: &XdpContext,
    pkt: &Packet,
    quote: &Quote,
    to: &FlowKey,
) -> Result<(), Reason> {
    let q = &quote.back;
    // The quote goes the other way: `to` reversed (read field by field, not copied).
    let (inner_src, inner_dst) = (&to.dst, &to.src);
    let v4 = pkt.flow.family == FAMILY_V4;
    // The quote: its IPv4 header checksum is updated by `set_addrs`, and counts in the
    // ICMP checksum like every other byte of the quote.
    let inner_ip_check: u16 = if v4 {
        load(ctx, quote.l3 + 10).ok_or(Reason::DropIcmpNoFlow)?
    } else {
        0
    };
    let addrs = set_addrs(
        ctx,
        quote.l3,
        q.family,
        (&q.dst, &q.src),
        (inner_src, inner_dst),
    )?;
    let mut icmp = addrs;
    if v4 {
        let now: u16 = load(ctx, quote.l3 + 10).ok_or(Reason::DropIcmpNoFlow)?;
        icmp = icmp.half(inner_ip_check, now);
    }
    let (old, new) = (ports_word(q.dport, q.sport), ports_word(to.dport, to.sport));
    store(ctx, quote.l4, new).ok_or(Reason::DropIcmpNoFlow)?;
    icmp = icmp.word(old, new);
    let l4 = addrs.word(old, new);
    if q.proto == PROTO_TCP && quote.l4 + 18 <= pkt.ip_end {
        let (o, n) = csum::update(ctx, quote.l4 + 16, l4).ok_or(Reason::DropIcmpNoFlow)?;
        icmp = icmp.half(o, n);
    } else if q.proto == PROTO_UDP && quote.l4 + 8 <= pkt.ip_end {
        let (o, n) = csum::update_udp(ctx, quote.l4 + 6, l4).ok_or(Reason::DropIcmpNoFlow)?;
        icmp = icmp.half(o, n);
    }
    let f = &pkt.flow;
    let outer = set_addrs(ctx, pkt.l3, f.family, (&f.src, &f.dst), (&to.src, &to.dst))?;
    if !v4 {
        icmp = icmp.and(outer);
    }
    csum::update(ctx, pkt.l4 + 2, icmp).ok_or(Reason::DropTruncatedL4)?;
    Ok(())
}
