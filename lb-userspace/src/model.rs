//! The domain model, free of kernel calls: services (VIPs), address conversions into map
//! keys, id pools, the ring slab and how selection rings are built. Everything here is
//! unit-tested without BPF.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use anyhow::{Result, bail};
use lb_common::{PROTO_TCP, PROTO_UDP, VipAddr, VipKey};
use serde::{Deserialize, Serialize};

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// How a VIP picks the backend of a new flow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Weighted round robin, in turn over the backends (the default).
    #[default]
    Rr,
    /// Weighted Maglev consistent hashing of the 5-tuple: balancers with the same backends
    /// agree on every flow without sharing state.
    Maglev,
    /// Least connections: the backend with the fewest active flows per weight (long
    /// sessions such as database connections).
    Leastconn,
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algo::Rr => "rr",
            Algo::Maglev => "maglev",
            Algo::Leastconn => "leastconn",
        })
    }
}

/// How a VIP's packets reach its backends and how the answers come back.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Direct server return at L2 (the default): only the MACs change; backends sit on the
    /// balancer's segment, hold the VIP on loopback and answer clients directly.
    #[default]
    Dsr,
    /// Full NAT: backends see connections from the balancer's SNAT address and answer it;
    /// the balancer translates both ways. Backends need no change at all.
    Nat,
    /// IP-in-IP tunnel to routed backends, which decapsulate (`lb decap`) and answer
    /// clients directly.
    Tunnel,
    /// As `tunnel`, wrapped in GUE (UDP), so backend NICs spread flows by outer port.
    Gue,
}

impl Mode {
    /// Whether backends may sit behind a router (reached through a gateway's MAC).
    pub fn routed_backends(self) -> bool {
        self != Mode::Dsr
    }

    /// The backend entry flags that tell the data plane how to send to the backend.
    pub fn backend_flags(self) -> u32 {
        match self {
            Mode::Dsr => 0,
            Mode::Nat => lb_common::BACKEND_F_NAT,
            Mode::Tunnel => lb_common::BACKEND_F_TUNNEL,
            Mode::Gue => lb_common::BACKEND_F_TUNNEL | lb_common::BACKEND_F_GUE,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
            Mode::Tunnel => "tunnel",
            Mode::Gue => "gue",
        })
    }
}

/// Largest weight a backend can have (HAProxy allows 256; a little headroom is harmless).
pub const MAX_WEIGHT: u32 = 1000;

pub fn check_weight(weight: u32) -> Result<()> {
    if weight > MAX_WEIGHT {
        bail!("weight {weight} out of range 0..{MAX_WEIGHT}");
    }
    Ok(())
}

/// The limits on new flows to a VIP (SYN and UDP floods): `rate_limit` new flows per
/// second per source address, with bursts of up to `burst`; and a ceiling for all sources
/// together, `max_new_flows` a second with bursts of up to `new_flow_burst`, which holds
/// when a flood comes from more sources than any per-source limit can tell apart. 0 means
/// no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_limit: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub burst: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_new_flows: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub new_flow_burst: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// GCRA parameters of `rate` new flows a second with bursts of up to `burst`: the emission
/// interval and the tolerance, in nanoseconds; (0, 0) for no limit.
fn gcra_ns(rate: u32, burst: u32) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let interval = (1_000_000_000 / rate as u64).max(1);
    (interval, (burst.max(1) as u64 - 1) * interval)
}

/// One rate and its burst, checked the same way for the per-source limit and the ceiling.
fn validate_rate(rate: u32, burst: u32, what: &str, burst_what: &str) -> Result<()> {
    if rate > RateLimit::MAX_RATE {
        bail!("{what} {rate} out of range 0..{}", RateLimit::MAX_RATE);
    }
    if rate > 0 && (burst == 0 || burst > RateLimit::MAX_RATE) {
        bail!(
            "{burst_what} {burst} out of range 1..{}",
            RateLimit::MAX_RATE
        );
    }
    if rate == 0 && burst != 0 {
        bail!("a {burst_what} needs a {what} above 0");
    }
    Ok(())
}

impl RateLimit {
    /// Most new flows per second one can ask for (per source, or as a VIP's ceiling).
    pub const MAX_RATE: u32 = 10_000_000;

    /// With a rate given and no burst, the burst is one second's worth.
    pub fn new(rate_limit: u32, burst: Option<u32>) -> Self {
        Self {
            rate_limit,
            burst: burst.unwrap_or(if rate_limit > 0 { rate_limit } else { 0 }),
            ..Self::default()
        }
    }

    /// These limits with the ceiling for all sources together set to `max_new_flows` a
    /// second; with no burst given, one second's worth.
    pub fn with_ceiling(self, max_new_flows: u32, burst: Option<u32>) -> Self {
        Self {
            max_new_flows,
            new_flow_burst: burst.unwrap_or(max_new_flows),
            ..self
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_rate(self.rate_limit, self.burst, "rate limit", "burst")?;
        validate_rate(
            self.max_new_flows,
            self.new_flow_burst,
            "ceiling (max new flows)",
            "new-flow burst",
        )
    }

    /// The data plane's form of the per-source limit (see `lb_common::VipMeta`): emission
    /// interval and tolerance.
    pub fn gcra_ns(&self) -> (u64, u64) {
        gcra_ns(self.rate_limit, self.burst)
    }

    /// The data plane's form of the VIP's ceiling, as `gcra_ns`.
    pub fn ceiling_gcra_ns(&self) -> (u64, u64) {
        gcra_ns(self.max_new_flows, self.new_flow_burst)
    }
}

/// What `lb vip add` and `lb vip set` give of a VIP's limits on new flows: what is absent
/// keeps its value (set) or stays 0 (add). A rate given without its burst takes one
/// second's worth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RatePatch {
    pub rate_limit: Option<u32>,
    pub burst: Option<u32>,
    pub max_new_flows: Option<u32>,
    pub new_flow_burst: Option<u32>,
}

impl RatePatch {
    pub fn apply(&self, current: &RateLimit) -> RateLimit {
        let rate = match (self.rate_limit, self.burst) {
            (None, None) => *current,
            (Some(r), b) => RateLimit {
                rate_limit: r,
                burst: b.unwrap_or(r),
                ..*current
            },
            (None, Some(b)) => RateLimit {
                burst: b,
                ..*current
            },
        };
        match (self.max_new_flows, self.new_flow_burst) {
            (None, None) => rate,
            (Some(m), b) => rate.with_ceiling(m, b),
            (None, Some(b)) => RateLimit {
                new_flow_burst: b,
                ..rate
            },
        }
    }
}

/// Source affinity (`--persist`): a client's new flows go to the backend of its earlier
/// ones, while that backend keeps flows and for `seconds` after the client's last new flow;
/// 0 means none. An IPv6 client is its source's `/prefix6`, an IPv4 one its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Persist {
    pub seconds: u32,
    pub prefix6: u8,
}

impl Default for Persist {
    fn default() -> Self {
        Self {
            seconds: 0,
            prefix6: Self::DEFAULT_PREFIX6,
        }
    }
}

impl Persist {
    pub const DEFAULT_PREFIX6: u8 = 64;
    /// A day: longer than any session kept in a server's memory.
    pub const MAX_SECONDS: u32 = 86_400;

    /// This with what `lb vip add/set` gives changed.
    pub fn patched(self, seconds: Option<u32>, prefix6: Option<u8>) -> Self {
        Self {
            seconds: seconds.unwrap_or(self.seconds),
            prefix6: prefix6.unwrap_or(self.prefix6),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.seconds > Self::MAX_SECONDS {
            bail!(
                "persist {} s out of range 0..{}",
                self.seconds,
                Self::MAX_SECONDS
            );
        }
        if self.prefix6 == 0 || self.prefix6 > 128 {
            bail!("IPv6 persist prefix /{} out of range 1..128", self.prefix6);
        }
        Ok(())
    }

    /// The data plane's form (see `lb_common::VipMeta`): nanoseconds and the IPv6 mask as
    /// network-order words.
    pub fn meta(&self) -> (u64, [u32; 4]) {
        let bits = u128::MAX
            .checked_shl(128 - self.prefix6 as u32)
            .unwrap_or(0);
        let b = bits.to_be_bytes();
        let mask = [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
        (self.seconds as u64 * 1_000_000_000, mask)
    }
}

/// A virtual service: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Service {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl Service {
    pub fn new(addr: SocketAddr, proto: Proto) -> Result<Self> {
        if addr.port() == 0 {
            bail!("VIP {addr}: port 0 is not a service port");
        }
        check_unicast(addr.ip(), "VIP")?;
        Ok(Self { addr, proto })
    }

    pub fn key(&self) -> VipKey {
        let (addr, family) = addr_to_map(self.addr.ip());
        VipKey {
            addr,
            port: self.addr.port().to_be(),
            proto: self.proto.number(),
            family,
        }
    }

    pub fn addr_key(&self) -> VipAddr {
        let (addr, family) = addr_to_map(self.addr.ip());
        VipAddr {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// `ADDR:PORT` or `[ADDR6]:PORT`, with a readable error.
pub fn parse_vip_addr(s: &str) -> Result<SocketAddr> {
    match SocketAddr::from_str(s) {
        Ok(a) => Ok(a),
        Err(_) if IpAddr::from_str(s).is_ok() => {
            bail!("VIP {s:?} has no port: write ADDR:PORT, or [ADDR]:PORT for IPv6")
        }
        Err(_) => bail!("malformed VIP {s:?}: expected ADDR:PORT, or [ADDR]:PORT for IPv6"),
    }
}

/// A backend address: a plain unicast IP of the VIP's family.
pub fn parse_backend_addr(s: &str) -> Result<IpAddr> {
    match IpAddr::from_str(s) {
        Ok(a) => Ok(a),
        Err(_) if SocketAddr::from_str(s).is_ok() => bail!(
            "backend {s:?} has a port: backends are plain addresses and serve on the VIP's port"
        ),
        Err(_) => bail!(
            "malformed backend address {s:?}: write a plain IPv4 or IPv6 address, e.g. 192.0.2.11"
        ),
    }
}

/// A drop-list entry: `ADDR/LEN`, or a bare address for just that host.
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet> {
    let net = match s.parse::<ipnet::IpNet>() {
        Ok(net) => net,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => ipnet::IpNet::from(ip),
            Err(_) => bail!("malformed CIDR {s:?}: expected ADDR/LEN, e.g. 203.0.113.0/24"),
        },
    };
    check_cidr(&net)?;
    Ok(net)
}

/// A drop rule must name its network, not a host in it (`10.1.2.3/8` is most likely a
/// typo, and which it was is the user's call).
pub fn check_cidr(net: &ipnet::IpNet) -> Result<()> {
    if net.trunc() != *net {
        bail!("drop rule {net} has host bits set; write {}", net.trunc());
    }
    Ok(())
}

pub fn check_unicast(ip: IpAddr, what: &str) -> Result<()> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("{what} {ip} is not a usable unicast address");
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            bail!("{what} {ip} is not a usable unicast address");
        }
    }
    Ok(())
}

/// Address packing lives with the map types, where the data plane's side is described too.
pub use lb_common::{addr_from_map, addr_to_map};

/// Unix time now, seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How to put a frame on the wire for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Path {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The router the backend is reached through (`dst_mac` is the router's), or `None`
    /// for a backend on the link itself. Only modes that take routed backends use such a
    /// path (`Mode::routed_backends`).
    pub via: Option<IpAddr>,
}

/// What the kernel said of reaching a backend: its L2 path, or a note saying why it cannot
/// take traffic (yet), for `backend list`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    pub l2: Option<L2Path>,
    pub note: Option<String>,
    /// The kernel is resolving the backend's MAC on this interface right now (its
    /// neighbour entry went away or is being probed): a backend that had one keeps
    /// forwarding to the last known MAC meanwhile, rather than handing its flows to the
    /// host.
    pub resolving_on: Option<u32>,
}

impl Reach {
    /// What the kernel's answer means for a backend of a VIP in `mode`: a routed path
    /// where the mode takes one; for direct server return, which rewrites MACs only, a
    /// backend behind a router cannot be reached and says why.
    pub fn for_mode(&self, mode: Mode) -> Reach {
        match self.l2 {
            Some(L2Path { via: Some(gw), .. }) if !mode.routed_backends() => Reach {
                note: Some(routed_note(gw)),
                ..Default::default()
            },
            _ => self.clone(),
        }
    }
}

/// Why a routed backend cannot serve a VIP in dsr mode, and what to do about it.
pub fn routed_note(gw: IpAddr) -> String {
    format!(
        "routed via {gw}: direct server return needs backends on a local link \
         (modes tunnel, gue and nat take routed backends)"
    )
}

/// The path to use for a backend that had `last` when the kernel says `now`: the new one,
/// or the last known one while the kernel re-resolves the MAC on the same interface.
pub fn keep_last_mac(last: Option<L2Path>, now: &Reach) -> Option<L2Path> {
    match (now.l2, last, now.resolving_on) {
        (None, Some(last), Some(ifindex)) if last.ifindex == ifindex => Some(last),
        (l2, ..) => l2,
    }
}

/// Hands out small integer ids (VIP and backend slots in the BPF arrays), reusing freed
/// ones, and counts how often each was handed out so stale references can be recognised.
#[derive(Clone, Debug)]
pub struct IdPool {
    /// Free ids, lowest last so they are handed out in order.
    free: Vec<u32>,
    generations: Vec<u32>,
}

impl IdPool {
    pub fn new(capacity: u32) -> Self {
        Self {
            free: (0..capacity).rev().collect(),
            generations: vec![0; capacity as usize],
        }
    }

    /// A free id and its new generation (1 on first use; below 2^31, as flows keep a bit
    /// beside it: `lb_common::GENERATION_MASK`).
    pub fn take(&mut self) -> Option<(u32, u32)> {
        let id = self.free.pop()?;
        let generation = &mut self.generations[id as usize];
        *generation = (generation.wrapping_add(1) & lb_common::GENERATION_MASK).max(1);
        Some((id, *generation))
    }

    /// Takes exactly `id` at `generation`: a restarted agent adopting what the pinned maps
    /// say. False when the id is out of range or already taken.
    pub fn adopt(&mut self, id: u32, generation: u32) -> bool {
        let Some(pos) = self.free.iter().position(|&f| f == id) else {
            return false;
        };
        self.free.remove(pos);
        self.generations[id as usize] = generation;
        true
    }

    /// Remembers that `id` was last handed out at `generation` (by an earlier agent), so
    /// the next `take` of it moves past every generation a pinned flow may still carry.
    pub fn seed(&mut self, id: u32, generation: u32) {
        if let Some(g) = self.generations.get_mut(id as usize) {
            *g = (*g).max(generation);
        }
    }

    /// Ids free to take now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn give_back(&mut self, id: u32) {
        debug_assert!(!self.free.contains(&id));
        self.free.push(id);
    }
}

/// First-fit allocator over the ring slab (`lb_common::RING_SLAB_LEN` entries).
#[derive(Clone, Debug)]
pub struct SlabAllocator {
    /// Free extents as (offset, length), sorted by offset, never adjacent.
    free: Vec<(u32, u32)>,
}

impl SlabAllocator {
    pub fn new(len: u32) -> Self {
        Self {
            free: vec![(0, len)],
        }
    }

    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (off, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (off + len, l - len);
        }
        Some(off)
    }

    /// Carves exactly `[off, off+len)` out of the free space, if all of it is free.
    pub fn reserve(&mut self, off: u32, len: u32) -> bool {
        let Some(i) = self
            .free
            .iter()
            .position(|&(o, l)| o <= off && off + len <= o + l)
        else {
            return false;
        };
        let (o, l) = self.free.remove(i);
        if off + len < o + l {
            self.free.insert(i, (off + len, o + l - off - len));
        }
        if o < off {
            self.free.insert(i, (o, off - o));
        }
        true
    }

    pub fn release(&mut self, off: u32, len: u32) {
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        // Merge with the right neighbour, then the left one.
        if i + 1 < self.free.len() && off + len == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == off {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// Two slab regions of equal capacity: the data plane reads one while the agent writes the
/// other, then one map update flips them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingRegions {
    pub offs: [u32; 2],
    pub capacity: u32,
    pub active: usize,
}

impl RingRegions {
    pub fn alloc(slab: &mut SlabAllocator, capacity: u32) -> Option<Self> {
        let a = slab.alloc(capacity)?;
        let Some(b) = slab.alloc(capacity) else {
            slab.release(a, capacity);
            return None;
        };
        Some(Self {
            offs: [a, b],
            capacity,
            active: 0,
        })
    }

    pub fn release(self, slab: &mut SlabAllocator) {
        for off in self.offs {
            slab.release(off, self.capacity);
        }
    }

    pub fn inactive_off(&self) -> u32 {
        self.offs[1 - self.active]
    }
}

/// Longest round-robin ring; weights whose reduced sum is larger are scaled down to fit.
pub const MAX_RR_RING: u32 = 4096;

/// A backend as ring builders see it: its id in the data plane, its weight, and (Maglev)
/// its address, which decides its place in the table identically on every balancer.
#[derive(Clone, Copy, Debug)]
pub struct RingMember {
    pub id: u32,
    pub weight: u32,
    pub addr: IpAddr,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weighted round-robin ring: new flows take its entries in turn. The picks of each
/// backend are spread evenly over one period of the weights reduced by their gcd: its
/// k-th pick sits at (k + 1/2) / weight of the period, so weights 3:1 give A A B A, not
/// A A A B. Sorting those places is O(n log n) in the ring's length, whatever the number
/// of backends.
pub fn round_robin_ring(members: &[RingMember]) -> Vec<u32> {
    let members: Vec<RingMember> = members.iter().copied().filter(|m| m.weight > 0).collect();
    if members.is_empty() {
        return Vec::new();
    }
    let g = members.iter().fold(0, |g, m| gcd(g, m.weight));
    let mut weights: Vec<u64> = members.iter().map(|m| (m.weight / g) as u64).collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_RR_RING as u64 {
        // Keep proportions as far as the ring length allows; nobody drops to zero.
        weights = weights
            .iter()
            .map(|w| (w * MAX_RR_RING as u64 / total).max(1))
            .collect();
    }
    // (2k + 1, 2w): the place (k + 1/2) / w as a fraction; ties go to the earlier backend.
    let mut places: Vec<(u64, u64, usize)> =
        Vec::with_capacity(weights.iter().sum::<u64>() as usize);
    for (i, &w) in weights.iter().enumerate() {
        places.extend((0..w).map(|k| (2 * k + 1, 2 * w, i)));
    }
    places.sort_unstable_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)).then(a.2.cmp(&b.2)));
    places.into_iter().map(|(_, _, i)| members[i].id).collect()
}

/// Maglev table size: prime, and large against the number of backends so each backend's
/// share is even to within a fraction of a percent.
pub const MAGLEV_TABLE_SIZE: u32 = 65_537;

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // fnv's low bits mix poorly; finish with a multiply-xorshift.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The Maglev lookup table (Eisenbud et al., NSDI 2016) of `size` entries (a prime). Each
/// backend walks its own permutation of the table, derived from its address only, and the
/// backends take turns claiming free entries, `weight` claims per turn. Two balancers with
/// the same backends build the same table, and removing a backend moves little more than
/// the flows that were on it.
pub fn maglev_ring(members: &[RingMember], size: u32) -> Vec<u32> {
    let mut members: Vec<RingMember> = members.iter().copied().filter(|m| m.weight > 0).collect();
    if members.is_empty() {
        return Vec::new();
    }
    // Turn order must not depend on the order backends were added in.
    members.sort_by_key(|m| m.addr);
    let m = size as u64;
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let key = match b.addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            (
                fnv1a(&key, 0) % m,
                fnv1a(&key, 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (i, member) in members.iter().enumerate() {
            for _ in 0..member.weight {
                let (offset, skip) = perms[i];
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = member.id;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use lb_common::FAMILY_V4;

    use super::*;

    /// Each mode tells the data plane something different, and only DSR needs backends
    /// on-link.
    #[test]
    fn modes_have_distinct_backend_flags() {
        let modes = [Mode::Dsr, Mode::Nat, Mode::Tunnel, Mode::Gue];
        for (i, a) in modes.iter().enumerate() {
            for b in &modes[i + 1..] {
                assert_ne!(a.backend_flags(), b.backend_flags(), "{a} and {b}");
            }
            assert_eq!(a.routed_backends(), *a != Mode::Dsr, "{a}");
        }
    }

    #[test]
    fn vip_parsing_accepts_both_families_and_rejects_junk() {
        assert_eq!(parse_vip_addr("10.0.0.1:80").unwrap().port(), 80);
        assert!(parse_vip_addr("[fd00::1]:443").unwrap().is_ipv6());
        for bad in [
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:99999",
            "fd00::1:80",
            "x:80",
            "",
        ] {
            let err = parse_vip_addr(bad).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(
            parse_vip_addr("10.0.0.1")
                .unwrap_err()
                .to_string()
                .contains("no port")
        );
        let any = parse_vip_addr("0.0.0.0:80").unwrap();
        assert!(Service::new(any, Proto::Tcp).is_err());
        let zero = parse_vip_addr("10.0.0.1:0").unwrap();
        assert!(Service::new(zero, Proto::Tcp).is_err());
    }

    #[test]
    fn persistence_becomes_nanoseconds_and_a_network_order_mask() {
        let p = Persist {
            seconds: 300,
            prefix6: 64,
        };
        let (ns, mask) = p.meta();
        assert_eq!(ns, 300_000_000_000);
        let bytes: Vec<u8> = mask.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [[0xff; 8], [0; 8]].concat());
        let (_, mask) = Persist { prefix6: 52, ..p }.meta();
        let bytes: Vec<u8> = mask.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes[..8], [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0, 0]);
        let (_, mask) = Persist { prefix6: 128, ..p }.meta();
        assert_eq!(mask, [u32::MAX; 4]);
        assert!(Persist { prefix6: 0, ..p }.validate().is_err());
        assert!(Persist { prefix6: 129, ..p }.validate().is_err());
        assert!(
            Persist {
                seconds: Persist::MAX_SECONDS + 1,
                ..p
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn rate_limits_become_gcra_parameters() {
        assert_eq!(RateLimit::new(0, None).gcra_ns(), (0, 0));
        let r = RateLimit::new(100, None);
        assert_eq!(r.burst, 100);
        assert_eq!(r.gcra_ns(), (10_000_000, 990_000_000));
        assert_eq!(RateLimit::new(10, Some(1)).gcra_ns(), (100_000_000, 0));
        assert!(RateLimit::new(10, Some(0)).validate().is_err());
        assert!(
            RateLimit {
                rate_limit: 0,
                burst: 5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RateLimit::new(RateLimit::MAX_RATE + 1, None)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn a_vip_ceiling_becomes_gcra_parameters_and_is_validated_like_a_rate_limit() {
        let r = RateLimit::new(10, None).with_ceiling(1000, None);
        assert_eq!(r.new_flow_burst, 1000);
        assert_eq!(r.ceiling_gcra_ns(), (1_000_000, 999_000_000));
        assert_eq!(r.gcra_ns(), (100_000_000, 900_000_000));
        assert_eq!(RateLimit::default().ceiling_gcra_ns(), (0, 0));
        assert!(r.validate().is_ok());
        let no_rate = RateLimit {
            new_flow_burst: 5,
            ..Default::default()
        };
        assert!(
            no_rate
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max new flows")
        );
        assert!(
            RateLimit::default()
                .with_ceiling(10, Some(0))
                .validate()
                .is_err()
        );
        assert!(
            RateLimit::default()
                .with_ceiling(RateLimit::MAX_RATE + 1, None)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn a_rate_patch_changes_what_it_gives_and_keeps_the_rest() {
        let current = RateLimit::new(10, Some(20)).with_ceiling(1000, Some(50));
        assert_eq!(RatePatch::default().apply(&current), current);
        let ceiling = RatePatch {
            max_new_flows: Some(500),
            ..Default::default()
        };
        assert_eq!(
            ceiling.apply(&current),
            RateLimit::new(10, Some(20)).with_ceiling(500, None)
        );
        let off = RatePatch {
            max_new_flows: Some(0),
            ..Default::default()
        };
        assert_eq!(off.apply(&current), RateLimit::new(10, Some(20)));
        let per_source = RatePatch {
            rate_limit: Some(5),
            ..Default::default()
        };
        assert_eq!(
            per_source.apply(&current),
            RateLimit::new(5, None).with_ceiling(1000, Some(50))
        );
        let burst_only = RatePatch {
            new_flow_burst: Some(7),
            ..Default::default()
        };
        assert_eq!(burst_only.apply(&current).new_flow_burst, 7);
        assert_eq!(burst_only.apply(&current).max_new_flows, 1000);
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(
            parse_cidr("10.1.0.0/8")
                .unwrap_err()
                .to_string()
                .contains("10.0.0.0/8")
        );
        for bad in ["10.0.0.0/33", "10.0.0/8", "", "x/8", "2001:db8::/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_parsing() {
        assert!(parse_backend_addr("10.0.0.2").is_ok());
        assert!(parse_backend_addr("fd00::2").is_ok());
        assert!(
            parse_backend_addr("10.0.0.2:80")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
        assert!(parse_backend_addr("10.0.0.300").is_err());
    }

    #[test]
    fn map_keys_hold_network_order_bytes() {
        let svc = Service::new("10.1.2.3:80".parse().unwrap(), Proto::Udp).unwrap();
        let key = svc.key();
        assert_eq!(key.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!((key.proto, key.family), (PROTO_UDP, FAMILY_V4));
        // The address words themselves: lb_common::addr's tests.
    }

    #[test]
    fn ids_are_reused_with_a_new_generation() {
        let mut pool = IdPool::new(2);
        assert_eq!(pool.take(), Some((0, 1)));
        assert_eq!(pool.take(), Some((1, 1)));
        assert_eq!(pool.take(), None);
        pool.give_back(0);
        assert_eq!(pool.take(), Some((0, 2)));

        let mut pool = IdPool::new(4);
        assert!(pool.adopt(2, 7));
        assert!(!pool.adopt(2, 7), "taken already");
        pool.seed(0, 5);
        assert_eq!(pool.take(), Some((0, 6)), "past the seeded generation");
        assert_eq!(pool.take(), Some((1, 1)));
        assert_eq!(pool.take(), Some((3, 1)));
        // Generations stay below the flow table's handshake bit: past it, they wrap to 1.
        pool.give_back(0);
        pool.seed(0, lb_common::GENERATION_MASK);
        assert_eq!(pool.take(), Some((0, 1)));
    }

    fn member(id: u32, weight: u32) -> RingMember {
        RingMember {
            id,
            weight,
            addr: IpAddr::from([10, 0, 0, id as u8 + 1]),
        }
    }

    #[test]
    fn round_robin_interleaves_weights() {
        assert_eq!(round_robin_ring(&[member(0, 1), member(1, 1)]), vec![0, 1]);
        assert_eq!(
            round_robin_ring(&[member(0, 3), member(1, 1)]),
            vec![0, 0, 1, 0]
        );
        assert_eq!(
            round_robin_ring(&[member(0, 30), member(1, 10)]),
            vec![0, 0, 1, 0]
        );
        assert_eq!(round_robin_ring(&[member(0, 0), member(1, 5)]), vec![1]);
        assert!(round_robin_ring(&[member(0, 0)]).is_empty());
        let ring = round_robin_ring(&[member(0, 2), member(1, 3), member(2, 5)]);
        assert_eq!(ring.len(), 10);
        for (id, want) in [(0, 2), (1, 3), (2, 5)] {
            assert_eq!(ring.iter().filter(|&&x| x == id).count(), want);
        }
    }

    #[test]
    fn round_robin_caps_huge_weight_sums() {
        let ring = round_robin_ring(&[member(0, 9_999), member(1, 1), member(2, 10_000)]);
        assert!(ring.len() as u32 <= MAX_RR_RING + 3);
        assert!(ring.contains(&1), "a tiny weight still gets flows");
    }

    #[test]
    fn maglev_is_balanced_weighted_and_order_independent() {
        let members: Vec<_> = (0..10).map(|i| member(i, 1)).collect();
        let table = maglev_ring(&members, 65_537);
        for id in 0..10 {
            let share = table.iter().filter(|&&x| x == id).count() as f64 / 65_537.0;
            assert!((share - 0.1).abs() < 0.01, "backend {id} share {share}");
        }
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(maglev_ring(&reversed, 65_537), table);

        let weighted = maglev_ring(&[member(0, 3), member(1, 1)], 4_099);
        let share = weighted.iter().filter(|&&x| x == 0).count() as f64 / 4_099.0;
        assert!((share - 0.75).abs() < 0.01, "weight 3 of 4 got {share}");
    }

    /// The bound: removing 1 of 10 backends moves at most 1/10 + 2% of flows.
    #[test]
    fn maglev_removal_moves_few_flows() {
        let members: Vec<_> = (0..10).map(|i| member(i, 1)).collect();
        let before = maglev_ring(&members, MAGLEV_TABLE_SIZE);
        let after = maglev_ring(&members[..9], MAGLEV_TABLE_SIZE);
        let flows = 200_000u32;
        let mut moved = 0;
        for f in 0..flows {
            let key = lb_common::FlowKey {
                src: [f.to_be(), 0, 0, 0],
                dst: [0x0a00_0001, 0, 0, 0],
                sport: (f % 50_000) as u16,
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            let slot = (lb_common::flow_hash(&key) % MAGLEV_TABLE_SIZE) as usize;
            if before[slot] != after[slot] {
                moved += 1;
            }
        }
        let fraction = moved as f64 / flows as f64;
        assert!(fraction <= 0.1 + 0.02, "moved {fraction}");
        assert!(
            fraction >= 0.09,
            "at least the removed backend's flows move: {fraction}"
        );
    }

    #[test]
    fn slab_merges_free_extents() {
        let mut slab = SlabAllocator::new(100);
        let a = RingRegions::alloc(&mut slab, 10).unwrap();
        let b = RingRegions::alloc(&mut slab, 20).unwrap();
        assert_eq!(a.offs, [0, 10]);
        assert_eq!(b.offs, [20, 40]);
        assert!(
            RingRegions::alloc(&mut slab, 21).is_none(),
            "40 left, 42 asked"
        );
        a.release(&mut slab);
        b.release(&mut slab);
        assert_eq!(slab.free, vec![(0, 100)]);
        assert!(slab.reserve(30, 10));
        assert!(!slab.reserve(35, 10));
        assert_eq!(slab.free, vec![(0, 30), (40, 60)]);
        assert_eq!(slab.alloc(40), Some(40));
        slab.release(30, 10);
        assert_eq!(slab.free, vec![(0, 40), (80, 20)]);
    }
}
