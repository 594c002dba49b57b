//! Every map of the program. Names, key and value types, and sizes come from lb-common,
//! which the agent reads too.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    ActiveFlow, Backend, Counters, DROP_FILTER_WORDS, FLOW_EVENTS_BYTES, FlowKey, FlowValue,
    MAX_ACTIVE_FLOWS, MAX_BACKENDS, MAX_FIREWALL_RULES, MAX_FLOWS, MAX_PERSIST_SOURCES,
    MAX_RATE_SOURCES, MAX_RX_IFACES, MAX_TX_PORTS, MAX_VIPS, PersistValue, REASON_COUNT,
    RING_SLAB_LEN, RateKey, RxIface, VIP_ADDR_FILTER_WORDS, VipAddr, VipKey, VipMeta,
};
use lb_common::{DECAP_REASON_COUNT, MAX_DECAP_VIPS, TunnelConfig};
use lb_common::{MAX_NAT_FLOWS, NAT_STATS_LEN, NatEntry, NatSnat};

#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
pub static VIP_ADDRS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
pub static VIP_ADDR_FILTER: Array<u64> = Array::with_max_entries(VIP_ADDR_FILTER_WORDS, 0);
#[map]
pub static RING_SLAB: Array<u32> = Array::with_max_entries(RING_SLAB_LEN, 0);
#[map]
pub static RR_CURSOR: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
#[map]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub static REASON_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
#[map]
pub static FIREWALL_V4: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(MAX_FIREWALL_RULES, BPF_F_NO_PREALLOC);
#[map]
pub static FIREWALL_V6: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(MAX_FIREWALL_RULES, BPF_F_NO_PREALLOC);
#[map]
pub static DROP_FILTER: Array<u64> = Array::with_max_entries(DROP_FILTER_WORDS, 0);
#[map]
pub static FIREWALL_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_FIREWALL_RULES, 0);
#[map]
pub static RATE_LIMITS: LruHashMap<RateKey, u64> =
    LruHashMap::with_max_entries(MAX_RATE_SOURCES, 0);
/// Per VIP, the theoretical arrival time of its next new flow under its ceiling (see
/// `policy::vip_ceiling`); shared by every CPU, updated with compare-and-exchange.
#[map]
pub static VIP_NEW_FLOW_TAT: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);
// Source affinity and least connections.
#[map]
pub static PERSIST: LruHashMap<RateKey, PersistValue> =
    LruHashMap::with_max_entries(MAX_PERSIST_SOURCES, 0);
/// Per VIP: new flows that followed a client's affinity.
#[map]
pub static PERSIST_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
pub static ACTIVE_FLOWS: LruHashMap<FlowKey, ActiveFlow> =
    LruHashMap::with_max_entries(MAX_ACTIVE_FLOWS, 0);
/// Per backend: active flows (least connections), shared by all CPUs (atomic adds).
#[map]
pub static BACKEND_ACTIVE: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

// Flow sharing (share.rs): new flows' pins for the agent, whether to write them, and how
// many a full ring lost.
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);
#[map]
pub static FLOW_SHARE: Array<u32> = Array::with_max_entries(1, 0);
#[map]
pub static FLOW_SHARE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The attached interfaces' own MACs (`lb_common::RxIface`).
#[map]
pub static RX_IFACES: Array<RxIface> = Array::with_max_entries(MAX_RX_IFACES, 0);
// Tunnel and gue modes (tunnel.rs): the balancer's end of its tunnels.
#[map]
pub static TUNNEL: Array<TunnelConfig> = Array::with_max_entries(1, 0);

// The decapsulation program (decap.rs, `lb decap`): its VIPs, GUE port and counters.
#[map]
pub static DECAP_VIPS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);
#[map]
pub static DECAP_GUE_PORT: Array<u32> = Array::with_max_entries(1, 0);
#[map]
pub static DECAP_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);
// Full NAT (nat.rs): the SNAT address and ports per family, the translations (plain hash
// maps: the kernel never evicts one half of a pair; the agent expires both), counters.
#[map]
pub static NAT_SNAT: Array<NatSnat> = Array::with_max_entries(2, 0);
#[map]
pub static NAT_FWD: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(MAX_NAT_FLOWS, BPF_F_NO_PREALLOC);
#[map]
pub static NAT_REV: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(MAX_NAT_FLOWS, BPF_F_NO_PREALLOC);
#[map]
pub static NAT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NAT_STATS_LEN, 0);
/// Where a new translation's entry is built (too big for the stack); not pinned.
#[map]
pub static NAT_SCRATCH: PerCpuArray<NatEntry> = PerCpuArray::with_max_entries(1, 0);
