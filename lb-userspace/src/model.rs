//! The domain model, free of kernel calls: services (VIPs), address conversions into map
//! keys, id pools, the ring slab and how selection rings are built. Everything here is
//! unit-tested without BPF.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use anyhow::{Result, bail};
use lb_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipAddr, VipKey};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[derive(Serialize, Deserialize, clap::ValueEnum)]
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
        VipKey { addr, port: self.addr.port().to_be(), proto: self.proto.number(), family }
    }

    pub fn addr_key(&self) -> VipAddr {
        let (addr, family) = addr_to_map(self.addr.ip());
        VipAddr { addr, family, _pad: [0; 3] }
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
        Err(_) => bail!("malformed backend address {s:?}"),
    }
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

/// The map representation of an address: raw network-order bytes in `u32` words, IPv4 in
/// the first word.
pub fn addr_to_map(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// Hands out small integer ids (VIP and backend slots in the BPF arrays), reusing freed
/// ones, and counts how often each was handed out so stale references can be recognised.
#[derive(Debug)]
pub struct IdPool {
    capacity: u32,
    next: u32,
    free: Vec<u32>,
    generations: Vec<u32>,
}

impl IdPool {
    pub fn new(capacity: u32) -> Self {
        Self { capacity, next: 0, free: Vec::new(), generations: Vec::new() }
    }

    /// A free id and its new generation (1 on first use).
    pub fn take(&mut self) -> Option<(u32, u32)> {
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < self.capacity => {
                self.next += 1;
                self.generations.push(0);
                self.next - 1
            }
            None => return None,
        };
        let generation = &mut self.generations[id as usize];
        *generation = generation.wrapping_add(1).max(1);
        Some((id, *generation))
    }

    pub fn give_back(&mut self, id: u32) {
        debug_assert!(!self.free.contains(&id));
        self.free.push(id);
    }
}

/// First-fit allocator over the ring slab (`lb_common::RING_SLAB_LEN` entries).
#[derive(Debug)]
pub struct SlabAllocator {
    /// Free extents as (offset, length), sorted by offset, never adjacent.
    free: Vec<(u32, u32)>,
}

impl SlabAllocator {
    pub fn new(len: u32) -> Self {
        Self { free: vec![(0, len)] }
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
        Some(Self { offs: [a, b], capacity, active: 0 })
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

/// The round-robin ring: each backend that may take new flows once, in the order they were
/// added, so consecutive new flows go to consecutive backends.
pub fn round_robin_ring(eligible_ids: &[u32]) -> Vec<u32> {
    eligible_ids.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_parsing_accepts_both_families_and_rejects_junk() {
        assert_eq!(parse_vip_addr("10.0.0.1:80").unwrap().port(), 80);
        assert!(parse_vip_addr("[fd00::1]:443").unwrap().is_ipv6());
        for bad in ["10.0.0.1", "10.0.0.1:", "10.0.0.1:99999", "fd00::1:80", "x:80", ""] {
            let err = parse_vip_addr(bad).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(parse_vip_addr("10.0.0.1").unwrap_err().to_string().contains("no port"));
        let any = parse_vip_addr("0.0.0.0:80").unwrap();
        assert!(Service::new(any, Proto::Tcp).is_err());
        let zero = parse_vip_addr("10.0.0.1:0").unwrap();
        assert!(Service::new(zero, Proto::Tcp).is_err());
    }

    #[test]
    fn backend_parsing() {
        assert!(parse_backend_addr("10.0.0.2").is_ok());
        assert!(parse_backend_addr("fd00::2").is_ok());
        assert!(parse_backend_addr("10.0.0.2:80").unwrap_err().to_string().contains("port"));
        assert!(parse_backend_addr("10.0.0.300").is_err());
    }

    #[test]
    fn map_keys_hold_network_order_bytes() {
        let svc = Service::new("10.1.2.3:80".parse().unwrap(), Proto::Udp).unwrap();
        let key = svc.key();
        assert_eq!(key.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!((key.proto, key.family), (PROTO_UDP, FAMILY_V4));
        let (a6, f6) = addr_to_map("fd00::1".parse().unwrap());
        assert_eq!(f6, FAMILY_V6);
        assert_eq!(a6[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(a6[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn ids_are_reused_with_a_new_generation() {
        let mut pool = IdPool::new(2);
        assert_eq!(pool.take(), Some((0, 1)));
        assert_eq!(pool.take(), Some((1, 1)));
        assert_eq!(pool.take(), None);
        pool.give_back(0);
        assert_eq!(pool.take(), Some((0, 2)));
    }

    #[test]
    fn slab_merges_free_extents() {
        let mut slab = SlabAllocator::new(100);
        let a = RingRegions::alloc(&mut slab, 10).unwrap();
        let b = RingRegions::alloc(&mut slab, 20).unwrap();
        assert_eq!(a.offs, [0, 10]);
        assert_eq!(b.offs, [20, 40]);
        assert!(RingRegions::alloc(&mut slab, 21).is_none(), "40 left, 42 asked");
        a.release(&mut slab);
        b.release(&mut slab);
        assert_eq!(slab.free, vec![(0, 100)]);
    }
}
