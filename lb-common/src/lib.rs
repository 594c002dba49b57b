//! Types shared by the XDP program and the agent: map keys, map values and limits.
//!
//! Everything here is `#[repr(C)]` plain old data, so the same bytes mean the same thing on
//! both sides of a BPF map. Addresses and ports are kept in network byte order, exactly as
//! they appear in packets, so the data plane compares them without swapping.
#![no_std]

use bytemuck::{Pod, Zeroable};

mod addr;
pub use addr::{addr_from_map, addr_to_map};

/// Most VIPs one balancer serves; also the length of the per-VIP arrays.
pub const MAX_VIPS: u32 = 512;
/// Most backends over all VIPs; a backend id indexes the backend arrays.
pub const MAX_BACKENDS: u32 = 65_536;
/// Entries of the ring slab: every VIP's selection ring lives in one slice of it.
pub const RING_SLAB_LEN: u32 = 1 << 22;
/// Flows the flow table keeps before the least recently used are evicted.
pub const MAX_FLOWS: u32 = 1 << 20;
/// The pinned maps' layout version, recorded beside the pins so a restarted (or upgraded)
/// agent knows what the maps it finds mean. Bump it when a map changes meaning at the same
/// size (a field reused, a flag added to a word that had none), and teach the agent's
/// `kernel::layout` the step; sizes alone are checked without it. 0: no record, the layout
/// up to commit 4fe7cc3 (the same as 1). 2: bit 31 of a flow's generation marks a flow in
/// its handshake (older flows never have it set, so they read as established), and
/// `VipMeta` grew fields at its end (the new-flow ceiling and source affinity; zero means
/// none, so an older VIP entry copied with zeros appended means what it meant).
pub const LAYOUT_VERSION: u32 = 2;

/// Egress interfaces the devmap can hold.
pub const MAX_TX_PORTS: u32 = 64;

/// Slots of `RX_IFACES`: an interface sits at `ifindex % MAX_RX_IFACES`.
pub const MAX_RX_IFACES: u32 = 64;

/// An interface the program is attached to and its own MAC: only frames addressed to it
/// (or to a VRRP virtual MAC) are balanced. A switch floods frames for a MAC it has
/// forgotten (a balancer that died) to every port, and a balancer that forwarded what was
/// not sent to it would hand backends a second copy of the other balancer's packets. A slot
/// holding another interface (two attached interfaces whose indexes share a slot) or none
/// checks nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RxIface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
/// Drop-list rules (CIDRs) over both families; a rule id indexes the hit counters.
pub const MAX_FIREWALL_RULES: u32 = 16_384;
/// Sources whose new-flow rate is tracked at once; the least recently seen are forgotten.
pub const MAX_RATE_SOURCES: u32 = 1 << 18;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An address of either family. IPv4 uses the first word; the rest stay zero so that one
/// key type serves both families without ambiguity (the family byte sits beside it).
pub type Addr = [u32; 4];

/// A virtual service: what clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Words of the VIP address filter (64 bits each).
pub const VIP_ADDR_FILTER_WORDS: u32 = 64;

/// Where an address sits in the VIP address filter: a word index and a bit. The agent sets
/// the bit of every VIP address; a clear bit tells the data plane, with one array read,
/// that a packet is certainly not for a VIP (so host traffic skips the flow table). Two
/// addresses may share a bit: the filter can only say "maybe", never hide a VIP.
#[inline(always)]
pub fn vip_addr_filter_slot(addr: &Addr) -> (u32, u64) {
    let folded =
        addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    let bits = folded.wrapping_mul(0x9e37_79b1) >> 20;
    (bits >> 6, 1 << (bits & 63))
}

/// Words of the drop-list source filter (64 bits each: 65,536 bits).
pub const DROP_FILTER_WORDS: u32 = 1024;
/// The leading bits of a source that pick its drop-filter bit: an IPv4 /16, an IPv6 /32.
const fn drop_filter_key_bits(family: u8) -> u32 {
    if family == FAMILY_V4 { 16 } else { 32 }
}

/// The drop-filter bit of a source's leading `drop_filter_key_bits`, as a number: an IPv4
/// /16 is its own bit; an IPv6 /32 is hashed onto the same bits.
#[inline(always)]
const fn drop_filter_bit(family: u8, key: u32) -> (u32, u64) {
    let bits = if family == FAMILY_V4 {
        key & 0xffff
    } else {
        key.wrapping_mul(0x9e37_79b1) >> 16
    };
    (bits >> 6, 1 << (bits & 63))
}

/// Where a source address sits in the drop-list source filter: a word index and a bit. The
/// agent sets the bit of every source a drop rule covers (`drop_filter_mark`) before it
/// writes the rule; a clear bit tells the data plane, with one array read, that the source
/// is in no rule, so its packets skip the LPM tries and an established flow is one hash
/// lookup. A set bit sends the packet to the tries first, before its flow.
#[inline(always)]
pub fn drop_filter_slot(family: u8, src: &Addr) -> (u32, u64) {
    let top = u32::from_be(src[0]);
    drop_filter_bit(family, top >> (32 - drop_filter_key_bits(family)))
}

/// Sets in `words` the bit of every source the rule `addr/prefix_len` covers (`addr` as in
/// a flow key). A rule shorter than the filter's key covers one bit per key it spans; one
/// spanning more than 65,536 keys (an IPv6 rule shorter than /16) sets every bit.
pub fn drop_filter_mark(
    words: &mut [u64; DROP_FILTER_WORDS as usize],
    family: u8,
    addr: &Addr,
    prefix_len: u32,
) {
    let key_bits = drop_filter_key_bits(family);
    let key = u32::from_be(addr[0]) >> (32 - key_bits);
    let span = key_bits.saturating_sub(prefix_len);
    if span > 16 {
        words.fill(!0);
        return;
    }
    let first = if span == 0 {
        key
    } else {
        key & !((1u32 << span) - 1)
    };
    for i in 0..1u32 << span {
        let (word, bit) = drop_filter_bit(family, first | i);
        words[word as usize] |= bit;
    }
}

/// A VIP's address alone: packets to it are ours to judge even when no service matches
/// (fragments, options, extension headers are dropped rather than handed to the host).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipAddr {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Where a VIP's current selection ring lives, swapped whole on every change so the data
/// plane never reads a half-written ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipMeta {
    /// Index of this VIP in the per-VIP arrays (counters, round robin cursors).
    pub vip_id: u32,
    /// First slab entry of the ring in use.
    pub ring_off: u32,
    /// Entries in the ring; 0 means no backend can take new flows.
    pub ring_len: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Per-source new-flow limit as a GCRA: one new flow per `rate_interval_ns`, with
    /// bursts up to `rate_burst_ns / rate_interval_ns + 1`; 0 means no limit.
    pub rate_interval_ns: u64,
    pub rate_burst_ns: u64,
    /// Ceiling on new flows to this VIP from all sources together (checked after the
    /// per-source limit), as a GCRA shared by every CPU (its state: `VIP_NEW_FLOW_TAT`):
    /// one new flow per `new_flow_interval_ns`, bursts up to `new_flow_burst_ns /
    /// new_flow_interval_ns + 1`; 0 means no ceiling.
    pub new_flow_interval_ns: u64,
    pub new_flow_burst_ns: u64,
    // Fields are appended (zero means off), so older pinned entries copy with zeros
    // appended (`LAYOUT_VERSION`).
    // -- source affinity (see `PersistValue`) --
    /// How long a client stays with its backend after its last new flow, in ns; 0 = no
    /// affinity.
    pub persist_ns: u64,
    /// The bits of an IPv6 source that make one client (its /64 by default), network
    /// order; an IPv4 client is its whole address.
    pub persist_mask6: Addr,
}

/// New flows take ring entries by hash of the 5-tuple (Maglev) instead of in turn.
pub const VIP_F_HASH: u32 = 1;
/// Least connections: the ring holds (backend id, weight) pairs, one per backend, and a
/// new flow goes to the one with the fewest active flows per weight (`BACKEND_ACTIVE`).
pub const VIP_F_LEASTCONN: u32 = 1 << 1;
/// Most backends a least-connections VIP compares for a new flow: a window of the ring that
/// rotates with each new flow. The verifier walks the bounded loop once per iteration on
/// every path that reaches it, so each backend compared costs about 5,400 verified
/// instructions: 64 took 390,000 of the 1,000,000 the kernel allows, 16 take about 160,000
/// (`lb-bench` prints the count).
pub const MAX_LEASTCONN_BACKENDS: u32 = 16;
/// Sources whose backend affinity is remembered at once, over all VIPs.
pub const MAX_PERSIST_SOURCES: u32 = 1 << 18;
/// Flows of least-connections VIPs counted as active at once.
pub const MAX_ACTIVE_FLOWS: u32 = 1 << 18;

/// The backend a client source (`RateKey`, its address masked to one client) was last sent
/// to at a VIP with affinity, and when it last opened a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PersistValue {
    pub backend_id: u32,
    pub backend_generation: u32,
    pub last_seen_ns: u64,
}

/// A flow of a least-connections VIP that counts as active on its backend: from its first
/// packet until the client's FIN or RST (the data plane removes it and decrements the
/// backend's count) or until it is idle for long (the agent's walk removes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ActiveFlow {
    pub backend_id: u32,
    pub backend_generation: u32,
    pub last_seen_ns: u64,
}

/// Whose new flows a rate limit counts, and whose backend affinity is remembered: one
/// source address (for affinity, an IPv6 source masked to its prefix) at one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RateKey {
    pub addr: Addr,
    pub vip_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The 5-tuple of a flow, as seen arriving from the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The backend a flow is pinned to. The generation guards against a backend id being
/// reused for another server after the one the flow was pinned to was removed. Its top
/// bit is `FLOW_F_HANDSHAKE`, so compare generations through `FlowValue::generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowValue {
    pub backend_id: u32,
    pub backend_generation: u32,
}

/// Set in `FlowValue::backend_generation` of a flow a TCP SYN opened, until the flow's
/// first packet that is not a SYN: a SYN that finds it set is a retransmission of the
/// handshake and keeps its backend; a SYN that finds it clear reuses the ports of a
/// connection past its handshake and is balanced afresh. Stolen from the generation,
/// which keeps the value's 8 bytes (and pinned flow tables) as they were.
pub const FLOW_F_HANDSHAKE: u32 = 1 << 31;
/// The bits of a generation: the agent hands out generations below 2^31.
pub const GENERATION_MASK: u32 = !FLOW_F_HANDSHAKE;

impl FlowValue {
    /// The backend's generation the flow was pinned at, without the handshake bit.
    #[inline(always)]
    pub const fn generation(&self) -> u32 {
        self.backend_generation & GENERATION_MASK
    }

    /// Whether the flow was opened by a SYN and has seen no other packet yet.
    #[inline(always)]
    pub const fn in_handshake(&self) -> bool {
        self.backend_generation & FLOW_F_HANDSHAKE != 0
    }
}

/// A real server as the data plane needs it: where to send frames and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr: Addr,
    /// Bumped each time the id is given to another server.
    /// Below 2^31 (`GENERATION_MASK`): flows keep a bit beside it.
    pub generation: u32,
    /// The VIP this backend serves, so a restarted agent can adopt the pinned maps.
    pub vip_id: u32,
    /// Egress interface (from the kernel's FIB), 0 while unknown.
    pub ifindex: u32,
    /// Destination MAC (from the kernel's neighbour table).
    pub mac: [u8; 6],
    /// Source MAC: the egress interface's own.
    pub src_mac: [u8; 6],
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The id is in use by a configured backend.
pub const BACKEND_F_IN_USE: u32 = 1;
/// `mac`, `src_mac` and `ifindex` are valid.
pub const BACKEND_F_RESOLVED: u32 = 1 << 1;
/// Established flows may stay (set while the backend is up, also while it drains or has
/// weight 0; cleared when its health checks fail, so its flows move on their next packet).
pub const BACKEND_F_KEEP_FLOWS: u32 = 1 << 2;
/// Serves a least-connections VIP: its flows' client FIN/RST and last packet are noted.
pub const BACKEND_F_LEASTCONN: u32 = 1 << 3;

/// Forwarding mode bits, set from the backend's VIP (the established path reads no VIP).
/// Full NAT: destination to the backend, source to the balancer's SNAT address and port.
pub const BACKEND_F_NAT: u32 = 1 << 4;
/// Encapsulated in an outer IP header to the backend (IPIP / IPv6-in-IPv6).
pub const BACKEND_F_TUNNEL: u32 = 1 << 5;
/// With `BACKEND_F_TUNNEL`: the inner packet goes in GUE (UDP) instead of bare IP-in-IP.
pub const BACKEND_F_GUE: u32 = 1 << 6;

/// Packet and byte counters, kept per CPU and summed by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// What the data plane did with the packets counted under a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent on to a backend (XDP_TX or XDP_REDIRECT).
    Forward,
    /// Answered from XDP (XDP_TX back to the sender).
    Reply,
    /// Handed to the host's stack untouched (XDP_PASS).
    Pass,
    /// Dropped (XDP_DROP).
    Drop,
}

/// Declares `Reason` from one list, so the enum, its names, its outcomes, `Reason::ALL` and
/// `REASON_COUNT` cannot disagree.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, $outcome:ident;)*) => {
        /// Why a packet was forwarded, answered, passed to the kernel or dropped. The index
        /// into the reason counters: every packet is counted under exactly one.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in counter-index order.
            pub const ALL: [Reason; REASON_COUNT as usize] = [$(Reason::$variant,)*];

            /// Stable name used in the CLI, JSON and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            /// What the data plane did with packets counted under this reason.
            pub const fn outcome(self) -> Outcome {
                match self {
                    $(Reason::$variant => Outcome::$outcome,)*
                }
            }
        }

        /// Entries of the reason counters.
        pub const REASON_COUNT: u32 = [$(stringify!($variant),)*].len() as u32;
    };
}

reasons! {
    /// Forwarded to a backend (XDP_TX or XDP_REDIRECT).
    Forwarded = "forwarded", Forward;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): the host's business.
    PassNotIp = "pass_not_ip", Pass;
    /// IP traffic not addressed to a configured VIP.
    PassNotVip = "pass_not_vip", Pass;
    /// The chosen backend's neighbour is not resolved yet.
    PassNoNeigh = "pass_no_neigh", Pass;
    /// The frame ends inside the Ethernet, VLAN or IP header.
    DropTruncatedL3 = "drop_truncated_l3", Drop;
    /// The IP packet (or the frame) ends inside the TCP or UDP header of a packet to a VIP
    /// address.
    DropTruncatedL4 = "drop_truncated_l4", Drop;
    /// Impossible IP header: bad version, IHL below 5, lengths past the frame.
    DropBadIpHeader = "drop_bad_ip_header", Drop;
    /// IPv4 fragment to a VIP address: it cannot be tied to a flow.
    DropFragment = "drop_fragment", Drop;
    /// IPv4 options on a packet to a VIP.
    DropIpOptions = "drop_ip_options", Drop;
    /// IPv6 extension header (or other next header) to a VIP address.
    DropIpv6ExtHeader = "drop_ipv6_ext_header", Drop;
    /// The VIP has no backend that can take a new flow.
    DropNoBackend = "drop_no_backend", Drop;
    /// Redirect to the egress interface failed.
    DropRedirectFailed = "drop_redirect_failed", Drop;
    /// The source address is in the drop list.
    DropFirewall = "drop_firewall", Drop;
    /// To a VIP address, but no service on that port and protocol.
    DropClosedPort = "drop_closed_port", Drop;
    /// TCP without any flag, or SYN with FIN or RST: scans and junk, never a real flow.
    DropBadTcpFlags = "drop_bad_tcp_flags", Drop;
    /// The source opens new flows to this VIP faster than its rate limit allows.
    DropRateLimited = "drop_rate_limited", Drop;
    /// ICMP to a VIP address that is neither an echo request nor an error about a flow.
    DropIcmp = "drop_icmp", Drop;
    /// An ICMP error about a flow this balancer does not know, or whose pinned backend no
    /// longer keeps it (gone, failed, or its id given to another server): the server that
    /// sent the quoted packet is not there to learn from it.
    DropIcmpNoFlow = "drop_icmp_no_flow", Drop;
    /// An ICMP echo request to a VIP address, answered from XDP (XDP_TX).
    IcmpEchoReply = "icmp_echo_reply", Reply;
    /// An ICMP error (e.g. fragmentation needed) about a flow, sent on to its backend so path
    /// MTU discovery works end to end.
    IcmpErrorForwarded = "icmp_error_forwarded", Forward;
    /// New flows to this VIP from all sources together come faster than its ceiling
    /// (`--max-new-flows`) allows. New reasons go last, so older counters keep their index.
    DropVipRateLimited = "drop_vip_rate_limited", Drop;
    /// A TCP SYN to a VIP with no backend in rotation, answered with a RST (XDP_TX) so the
    /// client fails at once instead of waiting for its connect timeout.
    ResetNoBackend = "reset_no_backend", Reply;
    /// To a VIP address (or one the VIP address filter cannot tell from one), but the frame
    /// was addressed at L2 to another host (flooded by a switch that forgot where a dead
    /// balancer was): handed to the host, which ignores it.
    PassNotOurMac = "pass_not_our_mac", Pass;
    // -- tunnel and gue modes (lb-ebpf/src/tunnel.rs) --
    /// A packet for a tunnel backend that would exceed the egress MTU once encapsulated,
    /// answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" (XDP_TX) giving
    /// the MTU that fits, so the client's path MTU discovery shrinks its packets.
    TunnelTooBig = "tunnel_too_big", Reply;
    /// No outer source address for the packet's family (`[tunnel] source_v4/source_v6`
    /// unset and none found on the interface): it cannot be encapsulated.
    DropTunnelNoSource = "drop_tunnel_no_source", Drop;
    /// The driver gave no room for the outer header (`bpf_xdp_adjust_head` failed).
    DropTunnelNoRoom = "drop_tunnel_no_room", Drop;
    // -- full NAT (`mode = "nat"`) --
    /// A backend's answer to a NAT flow, translated back (source = VIP, destination =
    /// client) and sent to the client's next hop from the kernel's FIB.
    NatReply = "nat_reply", Forward;
    /// An ICMP error about a NAT flow from the backends' side (the backend, or a router
    /// before it), translated (outer and quoted headers) and sent to the client.
    NatIcmpReply = "nat_icmp_reply", Forward;
    /// A NAT reply translated, but the client's next hop has no neighbour entry yet: handed
    /// to the host, which routes it (and resolves the neighbour).
    PassNatNoNeigh = "pass_nat_no_neigh", Pass;
    /// A NAT reply the kernel's FIB cannot route to its client (no route, or forwarding
    /// disabled on the interface it came in on).
    DropNatNoRoute = "drop_nat_no_route", Drop;
    /// A new NAT flow found no free SNAT port toward its backend within the probes allowed.
    DropNatPortsExhausted = "drop_nat_ports_exhausted", Drop;
    /// A new NAT flow found the translation tables full.
    DropNatTableFull = "drop_nat_table_full", Drop;
    /// A new NAT flow, but the balancer has no SNAT address of the flow's family yet.
    DropNatNoSnat = "drop_nat_no_snat", Drop;
}

// Checked at compile time: the counters are indexed by discriminant, so `ALL` must hold
// exactly `REASON_COUNT` reasons, each at its own index, and the counter map (indexed up to
// `REASON_COUNT`) must have room for the largest discriminant.
const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i, "Reason::ALL out of order");
        i += 1;
    }
    assert!(Reason::ALL.len() == REASON_COUNT as usize);
    assert!(core::mem::size_of::<Reason>() == 4);
};

/// XDP actions (the kernel's `enum xdp_action`), for the program and for whoever runs it.
pub mod xdp {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

impl Outcome {
    /// The XDP action of a packet stopped with this outcome on its way to a backend:
    /// passes go to the host's stack, answers (the frame turned into the answer, e.g.
    /// `TunnelTooBig`) back out, everything else is dropped.
    pub const fn stop_action(self) -> u32 {
        match self {
            Outcome::Pass => xdp::PASS,
            Outcome::Reply => xdp::TX,
            _ => xdp::DROP,
        }
    }
}

/// Map names, shared so the loader looks up exactly what the program defines.
pub mod maps {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_ADDR_FILTER: &str = "VIP_ADDR_FILTER";
    pub const DROP_FILTER: &str = "DROP_FILTER";
    pub const RING_SLAB: &str = "RING_SLAB";
    pub const RR_CURSOR: &str = "RR_CURSOR";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const FIREWALL_V4: &str = "FIREWALL_V4";
    pub const FIREWALL_V6: &str = "FIREWALL_V6";
    pub const FIREWALL_STATS: &str = "FIREWALL_STATS";
    pub const RATE_LIMITS: &str = "RATE_LIMITS";
    pub const VIP_NEW_FLOW_TAT: &str = "VIP_NEW_FLOW_TAT";
    pub const PERSIST: &str = "PERSIST";
    pub const PERSIST_STATS: &str = "PERSIST_STATS";
    pub const ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
    pub const BACKEND_ACTIVE: &str = "BACKEND_ACTIVE";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const FLOW_SHARE: &str = "FLOW_SHARE";
    pub const FLOW_SHARE_DROPS: &str = "FLOW_SHARE_DROPS";
    pub const RX_IFACES: &str = "RX_IFACES";
    pub const TUNNEL: &str = "TUNNEL";
    // The decapsulation program's (`lb decap`): never pinned, never in `ALL`.
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const DECAP_GUE_PORT: &str = "DECAP_GUE_PORT";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    // Full NAT (see `NatEntry`).
    pub const NAT_SNAT: &str = "NAT_SNAT";
    pub const NAT_FWD: &str = "NAT_FWD";
    pub const NAT_REV: &str = "NAT_REV";
    pub const NAT_STATS: &str = "NAT_STATS";

    /// Every map of the program (for pinning and adoption).
    pub const ALL: [&str; 30] = [
        VIPS,
        VIP_ADDRS,
        VIP_ADDR_FILTER,
        DROP_FILTER,
        RING_SLAB,
        RR_CURSOR,
        BACKENDS,
        FLOWS,
        TX_PORTS,
        VIP_STATS,
        BACKEND_STATS,
        REASON_STATS,
        FIREWALL_V4,
        FIREWALL_V6,
        FIREWALL_STATS,
        RATE_LIMITS,
        VIP_NEW_FLOW_TAT,
        PERSIST,
        PERSIST_STATS,
        ACTIVE_FLOWS,
        BACKEND_ACTIVE,
        FLOW_EVENTS,
        FLOW_SHARE,
        FLOW_SHARE_DROPS,
        RX_IFACES,
        TUNNEL,
        NAT_SNAT,
        NAT_FWD,
        NAT_REV,
        NAT_STATS,
    ];
}

// ---- Full NAT (`mode = "nat"`: lb-ebpf/src/nat.rs, lb-userspace/src/nat) ----

/// Translations both tables hold at most: one entry each per NAT flow.
pub const MAX_NAT_FLOWS: u32 = 1 << 20;
/// Ports a new NAT flow tries before it counts as exhausted: a bounded loop, and in a
/// range less than half full a free port is nearly always among the first few.
pub const NAT_PORT_PROBES: u32 = 16;
/// `NAT_SNAT` index of each family's SNAT address.
pub const NAT_SNAT_V4: u32 = 0;
pub const NAT_SNAT_V6: u32 = 1;

/// The balancer's SNAT address of one family and the source ports it hands out, first to
/// last (host byte order). `port_last` 0: no SNAT address (new NAT flows are dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatSnat {
    pub addr: Addr,
    pub port_first: u16,
    pub port_last: u16,
    pub _pad: u32,
}

/// One direction of a NAT flow. Keyed in `NAT_FWD` by the client's flow as it arrives
/// (client -> VIP), in `NAT_REV` by the backend's answer as it arrives (backend -> SNAT
/// address and port); `to` is what the packet's addresses and ports become. The two
/// entries are made together (the reverse first, claiming the port) and removed together
/// by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    /// The packet's source, destination and ports after translation (proto and family as
    /// the key's).
    pub to: FlowKey,
    /// The backend the flow was translated to (a flow moved to another backend gets a
    /// new translation).
    pub backend_id: u32,
    pub backend_generation: u32,
    /// Last packet in this direction, `bpf_ktime_get_ns` (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// `NAT_F_*` bits seen in this direction.
    pub flags: u32,
    pub _pad: u32,
}

/// A FIN was seen in this direction.
pub const NAT_F_FIN: u32 = 1;
/// A RST was seen in this direction.
pub const NAT_F_RST: u32 = 1 << 1;
/// How often (at most) a direction's `last_seen_ns` is rewritten.
pub const NAT_TOUCH_NS: u64 = 1_000_000_000;

/// `NAT_STATS` slots (per-CPU counts).
pub const NAT_STAT_ALLOCATED: u32 = 0;
/// Ports tried and found taken while allocating.
pub const NAT_STAT_COLLISIONS: u32 = 1;
pub const NAT_STAT_EXHAUSTED: u32 = 2;
pub const NAT_STATS_LEN: u32 = 4;

/// The reverse key of a translation: the backend's answer as it arrives.
#[inline(always)]
pub fn nat_reverse_key(fwd_to: &FlowKey) -> FlowKey {
    FlowKey {
        src: fwd_to.dst,
        dst: fwd_to.src,
        sport: fwd_to.dport,
        dport: fwd_to.sport,
        proto: fwd_to.proto,
        family: fwd_to.family,
        _pad: [0; 2],
    }
}

// ---- Flow sharing between balancers (lb-userspace/src/flowsync) ----

/// A flow the data plane has just pinned, on its way to the agent, which shares it with the
/// peer balancers (so a flow that the router moves to a peer keeps its backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowEvent {
    pub flow: FlowKey,
    pub backend_id: u32,
    pub backend_generation: u32,
}

/// Bytes of the ring buffer that carries `FlowEvent`s (a power of two of pages): 2 MiB,
/// 32,768 events of 56 bytes with the kernel's 8-byte record header.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 21;
/// `FLOW_SHARE[0]`: non-zero while the agent shares flows; zero, new flows cost one array
/// read more and nothing is written.
pub const FLOW_SHARE_ON: u32 = 0;

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

// ---- Tunnel and gue modes (lb-ebpf/src/tunnel.rs), decapsulation (lb-ebpf/src/decap.rs) ----

/// The balancer's end of its tunnels (`TUNNEL[0]`, written by the agent at start).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelConfig {
    /// Outer source address of IPv4 tunnels, network order; 0: none.
    pub src_v4: u32,
    /// Outer source address of IPv6 tunnels, as a flow key holds it; all zero: none.
    pub src_v6: Addr,
    /// GUE's UDP destination port, network order.
    pub gue_port: u16,
    pub _pad: [u8; 2],
}

/// The GUE port when none is configured (the one Katran's examples use).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Outer header bytes: IPv4, IPv6, and GUE's UDP header on top.
pub const TUNNEL_V4_OVERHEAD: u32 = 20;
pub const TUNNEL_V6_OVERHEAD: u32 = 40;
pub const GUE_OVERHEAD: u32 = 8;
/// GUE's outer source ports: the top quarter of the port space, picked by flow hash so a
/// backend NIC's receive hashing spreads flows over its queues.
pub const GUE_SPORT_BASE: u16 = 0xc000;
pub const GUE_SPORT_MASK: u16 = 0x3fff;

/// The decapsulation program's name in the object file (`lb decap`).
pub const DECAP_PROGRAM_NAME: &str = "lb_decap";
/// VIP addresses `lb decap` strips tunnels for (`DECAP_VIPS` keys, value unused). Its GUE
/// port is `DECAP_GUE_PORT[0]`, network order in the low 16 bits; 0: GUE not stripped.
pub const MAX_DECAP_VIPS: u32 = 1024;

/// What `lb decap` did with a packet; the index into `DECAP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// Tunnelled to one of its VIPs: outer header stripped, passed up.
    Decapsulated,
    /// Not a tunnel packet (nor GUE on the configured port): passed untouched.
    PassNotTunnel,
    /// A tunnel packet whose inner destination is none of its VIPs: passed untouched.
    PassNotVip,
    /// A tunnel packet too short or odd to be decapsulated: passed untouched.
    PassMalformed,
}

impl DecapReason {
    pub const ALL: [DecapReason; 4] = [
        DecapReason::Decapsulated,
        DecapReason::PassNotTunnel,
        DecapReason::PassNotVip,
        DecapReason::PassMalformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::Decapsulated => "decapsulated",
            DecapReason::PassNotTunnel => "pass_not_tunnel",
            DecapReason::PassNotVip => "pass_not_vip",
            DecapReason::PassMalformed => "pass_malformed",
        }
    }
}

pub const DECAP_REASON_COUNT: u32 = DecapReason::ALL.len() as u32;

/// Hash of a flow's 5-tuple, the same in the data plane and in the agent (Maglev tests and
/// tools predict where a flow lands). A murmur3-style mix: cheap, no tables, no loops the
/// verifier has to bound beyond the fixed ten words.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let words: [u32; 10] = bytemuck::cast(*k);
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 10 {
        let mut w = words[i].wrapping_mul(0xcc9e_2d51);
        w = w.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= w;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C) Pod types with no padding holes the kernel could
    // misread (checked by bytemuck's derive).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipAddr {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for PersistValue {}
    unsafe impl aya::Pod for ActiveFlow {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for RxIface {}
    unsafe impl aya::Pod for TunnelConfig {}
    unsafe impl aya::Pod for NatSnat {}
    unsafe impl aya::Pod for NatEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
    }

    #[test]
    fn names_say_what_the_outcome_is() {
        for r in Reason::ALL {
            let prefix = match r.outcome() {
                Outcome::Pass => "pass_",
                Outcome::Drop => "drop_",
                Outcome::Forward | Outcome::Reply => "",
            };
            assert!(r.name().starts_with(prefix), "{}", r.name());
        }
    }

    #[test]
    fn the_vip_address_filter_slot_is_in_range_and_spreads() {
        let mut seen = [0u64; VIP_ADDR_FILTER_WORDS as usize];
        for i in 0..64u32 {
            let (word, bit) = vip_addr_filter_slot(&[u32::from_be(0x0a00_0000 + i), 0, 0, 0]);
            assert!(word < VIP_ADDR_FILTER_WORDS && bit.count_ones() == 1);
            seen[word as usize] |= bit;
        }
        let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
        assert!(
            distinct > 48,
            "64 neighbouring addresses share too many bits: {distinct}"
        );
    }

    /// Every source a rule covers finds its bit set: sampled at the rule's edges and inside.
    #[test]
    fn the_drop_filter_covers_every_source_of_a_rule() {
        let v4 = |a: u32| [a.to_be(), 0, 0, 0];
        let v6 = |a: u32| [a.to_be(), 0x1234_5678, 0, 1];
        let cases: [(u8, fn(u32) -> Addr, u32, u32); 8] = [
            (FAMILY_V4, v4, 0xcb00_7100, 24),
            (FAMILY_V4, v4, 0xc633_6409, 32),
            (FAMILY_V4, v4, 0x0a00_0000, 8),
            (FAMILY_V4, v4, 0, 0),
            (FAMILY_V6, v6, 0x2001_0db8, 48),
            (FAMILY_V6, v6, 0x2001_0db8, 32),
            (FAMILY_V6, v6, 0x2001_0000, 20),
            (FAMILY_V6, v6, 0x2000_0000, 3),
        ];
        for (family, addr, net, len) in cases {
            let mut words = [0u64; DROP_FILTER_WORDS as usize];
            drop_filter_mark(&mut words, family, &addr(net), len);
            let host_mask = if len == 0 {
                u32::MAX
            } else {
                (1u64 << (32 - len.min(32))) as u32 - 1
            };
            let last = net | host_mask;
            for src in [
                net,
                last,
                net | (host_mask / 3),
                net | (host_mask & 0x5555_5555),
            ] {
                let (word, bit) = drop_filter_slot(family, &addr(src));
                assert!(word < DROP_FILTER_WORDS && bit.count_ones() == 1);
                assert!(
                    words[word as usize] & bit != 0,
                    "{family} {net:#x}/{len}: {src:#x}"
                );
            }
        }
    }

    /// The filter says "maybe" only near a rule: the bench's 1,001 /24s in five IPv4 /16s set
    /// five bits, and a /48 sets one.
    #[test]
    fn the_drop_filter_stays_sparse() {
        let mut words = [0u64; DROP_FILTER_WORDS as usize];
        for i in 0..1000u32 {
            drop_filter_mark(
                &mut words,
                FAMILY_V4,
                &[(0x6440_0000 + (i << 8)).to_be(), 0, 0, 0],
                24,
            );
        }
        drop_filter_mark(
            &mut words,
            FAMILY_V4,
            &[0xcb00_7100u32.to_be(), 0, 0, 0],
            24,
        );
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 5);
        let (word, bit) = drop_filter_slot(FAMILY_V4, &[0xc000_0201u32.to_be(), 0, 0, 0]);
        assert_eq!(words[word as usize] & bit, 0, "192.0.2.1 is in no rule");
        let mut words = [0u64; DROP_FILTER_WORDS as usize];
        drop_filter_mark(
            &mut words,
            FAMILY_V6,
            &[0x2001_0db8u32.to_be(), 0x0bad_0000u32.to_be(), 0, 0],
            48,
        );
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    }

    #[test]
    fn layouts_have_no_surprises() {
        assert_eq!(core::mem::size_of::<VipKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<Backend>(), 48);
        // Pinned flow tables outlive the agent: the flow value's size never changes.
        assert_eq!(core::mem::size_of::<FlowValue>(), 8);
        assert_eq!(core::mem::size_of::<VipMeta>(), 72);
        assert_eq!(core::mem::size_of::<TunnelConfig>(), 24);
        for (i, r) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
        assert_eq!(core::mem::size_of::<NatEntry>(), 64);
        assert_eq!(core::mem::size_of::<NatSnat>(), 24);
    }
}
