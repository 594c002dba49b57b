//! The small interface through which the agent's state writes the data plane: the kernel's
//! BPF maps in production (`kernel::datapath`), a fake in unit tests.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use ipnet::IpNet;
use lb_common::{Backend, Counters, VipAddr, VipKey, VipMeta};

use crate::model::IdPool;

/// Which per-CPU counters `reset_counters` zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterId {
    Vip(u32),
    Backend(u32),
    FirewallRule(u32),
}

/// An unused id and its generation from `pool`, with its counters zeroed for what takes
/// it; `full` is the error when the pool has none left.
pub(super) fn fresh_id(
    dp: &mut impl Dataplane,
    pool: &mut IdPool,
    counters: fn(u32) -> CounterId,
    full: impl FnOnce() -> anyhow::Error,
) -> Result<(u32, u32)> {
    let (id, generation) = pool.take().ok_or_else(full)?;
    dp.reset_counters(counters(id))?;
    Ok((id, generation))
}

/// Every counter, by id (VIPs, backends, drop rules) and by reason (`Reason::ALL` order).
#[derive(Clone, Debug, Default)]
pub struct AllCounters {
    pub vips: Vec<Counters>,
    pub backends: Vec<Counters>,
    pub rules: Vec<Counters>,
    pub reasons: Vec<Counters>,
    /// Per VIP id: new flows that followed their client's affinity.
    pub persisted: Vec<u64>,
    /// Per backend id: active flows (least connections).
    pub active: Vec<u64>,
}

impl AllCounters {
    pub fn vip(&self, id: u32) -> Counters {
        self.vips.get(id as usize).copied().unwrap_or_default()
    }
    pub fn backend(&self, id: u32) -> Counters {
        self.backends.get(id as usize).copied().unwrap_or_default()
    }
    pub fn rule(&self, id: u32) -> Counters {
        self.rules.get(id as usize).copied().unwrap_or_default()
    }
    pub fn persisted(&self, vip_id: u32) -> u64 {
        self.persisted.get(vip_id as usize).copied().unwrap_or(0)
    }
    pub fn active(&self, backend_id: u32) -> u64 {
        self.active.get(backend_id as usize).copied().unwrap_or(0)
    }
}

/// One past the highest id in use of each kind: how much of each counter array to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InUse {
    pub vips: u32,
    pub backends: u32,
    pub rules: u32,
}

/// What an earlier agent left in pinned maps.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    pub vips: Vec<(VipKey, VipMeta)>,
    /// Every backend slot ever used (generation > 0).
    pub backends: Vec<(u32, Backend)>,
    pub rules: Vec<(IpNet, u32)>,
    pub vip_addrs: Vec<VipAddr>,
}

pub trait Dataplane {
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()>;
    fn del_vip(&mut self, key: &VipKey) -> Result<()>;
    fn set_vip_addr(&mut self, addr: &VipAddr) -> Result<()>;
    fn del_vip_addr(&mut self, addr: &VipAddr) -> Result<()>;
    /// Writes backend id `ids[i]` into ring slab slot `slots[i]`, all at once.
    fn set_ring_slots(&mut self, slots: &[u32], ids: &[u32]) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Makes `ifindex` a redirect target; idempotent.
    fn add_tx_port(&mut self, ifindex: u32) -> Result<()>;
    fn set_firewall_rule(&mut self, net: &IpNet, rule_id: u32) -> Result<()>;
    fn del_firewall_rule(&mut self, net: &IpNet) -> Result<()>;
    fn reset_counters(&mut self, id: CounterId) -> Result<()>;
    /// The counters of the ids below `in_use`'s, and every reason's.
    fn counters(&self, in_use: InUse) -> Result<AllCounters>;
}

/// A data plane in memory, for unit tests: what the maps would hold.
#[derive(Debug, Default)]
pub struct Fake {
    pub vips: HashMap<VipKey, VipMeta>,
    pub vip_addrs: HashSet<VipAddr>,
    pub slab: HashMap<u32, u32>,
    pub backends: HashMap<u32, Backend>,
    pub tx_ports: HashSet<u32>,
    pub rules: HashMap<IpNet, u32>,
    pub resets: Vec<CounterId>,
    /// Ring slots written so far (incremental writes keep this small).
    pub slot_writes: usize,
    pub counters: AllCounters,
    /// Map writes (calls that change something) so far.
    pub writes: usize,
    /// The write with this number (1-based, counted in `writes`) fails, as a full or
    /// broken map would.
    pub fail_at: Option<usize>,
}

impl Fake {
    /// The ring the data plane reads for `key` now.
    pub fn ring(&self, key: &VipKey) -> Vec<u32> {
        let Some(meta) = self.vips.get(key) else {
            return Vec::new();
        };
        (meta.ring_off..meta.ring_off + meta.ring_len)
            .map(|slot| self.slab.get(&slot).copied().unwrap_or(u32::MAX))
            .collect()
    }

    /// Counts one write; fails it if it is the one `fail_at` names.
    fn write(&mut self) -> Result<()> {
        self.writes += 1;
        if self.fail_at == Some(self.writes) {
            anyhow::bail!("write {} failed (test)", self.writes);
        }
        Ok(())
    }
}

impl Dataplane for Fake {
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.write()?;
        self.vips.insert(*key, *meta);
        Ok(())
    }
    fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        self.write()?;
        self.vips.remove(key);
        Ok(())
    }
    fn set_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        self.write()?;
        self.vip_addrs.insert(*addr);
        Ok(())
    }
    fn del_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        self.write()?;
        self.vip_addrs.remove(addr);
        Ok(())
    }
    fn set_ring_slots(&mut self, slots: &[u32], ids: &[u32]) -> Result<()> {
        self.write()?;
        for (s, id) in slots.iter().zip(ids) {
            self.slab.insert(*s, *id);
        }
        self.slot_writes += slots.len();
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.write()?;
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.write()?;
        self.tx_ports.insert(ifindex);
        Ok(())
    }
    fn set_firewall_rule(&mut self, net: &IpNet, rule_id: u32) -> Result<()> {
        self.write()?;
        self.rules.insert(*net, rule_id);
        Ok(())
    }
    fn del_firewall_rule(&mut self, net: &IpNet) -> Result<()> {
        self.write()?;
        self.rules.remove(net);
        Ok(())
    }
    fn reset_counters(&mut self, id: CounterId) -> Result<()> {
        self.write()?;
        self.resets.push(id);
        Ok(())
    }
    fn counters(&self, _: InUse) -> Result<AllCounters> {
        Ok(self.counters.clone())
    }
}
