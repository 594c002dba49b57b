//! The maps of full NAT (`mode = "nat"`): each family's SNAT address and ports, the
//! translation tables, and the data plane's allocation counters. The sweeper that expires
//! translations lives in `crate::nat`; it walks the tables through handles of its own
//! (`nat_tables`), off the agent lock.

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{
    FAMILY_V4, FlowKey, NAT_SNAT_V4, NAT_SNAT_V6, NAT_STAT_ALLOCATED, NAT_STAT_COLLISIONS,
    NAT_STAT_EXHAUSTED, NatEntry, NatSnat,
};

use super::{Datapath, batch};

/// The data plane's NAT allocation counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatCounters {
    /// Translations made (one port each).
    pub allocated: u64,
    /// Ports found taken while allocating (a probe moved on).
    pub collisions: u64,
    /// New flows that found no free port (each also counted as a drop).
    pub exhausted: u64,
}

/// Both translation tables, through file descriptors of their own.
pub struct NatTables {
    pub fwd: HashMap<MapData, FlowKey, NatEntry>,
    pub rev: HashMap<MapData, FlowKey, NatEntry>,
}

impl NatTables {
    /// Every entry of one table, a few thousand a syscall.
    pub fn read(map: &HashMap<MapData, FlowKey, NatEntry>) -> Result<Vec<(FlowKey, NatEntry)>> {
        const CHUNK: usize = 4096;
        let fd = aya::maps::IterableMap::map(map).fd().as_fd();
        let rounds = (lb_common::MAX_NAT_FLOWS as usize).div_ceil(CHUNK) + 2;
        let mut out = Vec::new();
        batch::lookup::<FlowKey, NatEntry>(fd, CHUNK, 1, rounds, &mut |keys, values| {
            out.extend(keys.iter().copied().zip(values.iter().copied()));
        })
        .context("reading a NAT table")?;
        Ok(out)
    }
}

fn clone_hash(
    map: &HashMap<MapData, FlowKey, NatEntry>,
) -> Result<HashMap<MapData, FlowKey, NatEntry>> {
    let fd = aya::maps::IterableMap::map(map)
        .fd()
        .as_fd()
        .try_clone_to_owned()?;
    let map = aya::maps::Map::from_map_data(MapData::from_fd(fd)?)?;
    Ok(HashMap::try_from(map)?)
}

impl Datapath {
    /// The SNAT address and ports of `family`'s new NAT flows (`port_last` 0: none).
    pub fn set_nat_snat(&mut self, family: u8, snat: &NatSnat) -> Result<()> {
        let index = if family == FAMILY_V4 {
            NAT_SNAT_V4
        } else {
            NAT_SNAT_V6
        };
        self.nat_snat
            .set(index, snat, 0)
            .context("writing NAT_SNAT")
    }

    pub fn nat_snat(&self, family: u8) -> Result<NatSnat> {
        let index = if family == FAMILY_V4 {
            NAT_SNAT_V4
        } else {
            NAT_SNAT_V6
        };
        Ok(self.nat_snat.get(&index, 0)?)
    }

    pub fn nat_counters(&self) -> Result<NatCounters> {
        let sum = |slot: u32| -> Result<u64> { Ok(self.nat_stats.get(&slot, 0)?.iter().sum()) };
        Ok(NatCounters {
            allocated: sum(NAT_STAT_ALLOCATED)?,
            collisions: sum(NAT_STAT_COLLISIONS)?,
            exhausted: sum(NAT_STAT_EXHAUSTED)?,
        })
    }

    /// Handles of their own on both translation tables, for the sweeper.
    pub fn nat_tables(&self) -> Result<NatTables> {
        Ok(NatTables {
            fwd: clone_hash(&self.nat_fwd)?,
            rev: clone_hash(&self.nat_rev)?,
        })
    }

    /// The translation of a client's flow (tools and tests).
    pub fn nat_forward(&self, client: &FlowKey) -> Option<NatEntry> {
        self.nat_fwd.get(client, 0).ok()
    }

    /// The translation of a backend's answer (tools and tests).
    pub fn nat_reverse(&self, answer: &FlowKey) -> Option<NatEntry> {
        self.nat_rev.get(answer, 0).ok()
    }
}
