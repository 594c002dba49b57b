//! The maps of source affinity and least connections: the per-VIP count of new flows that
//! followed affinity, the per-backend active counts, and the agent's side of "active"
//! (`reconcile_active`).

use std::{collections::HashMap, os::fd::AsFd as _, time::Duration};

use anyhow::{Context as _, Result};
use lb_common::{ActiveFlow, FlowKey, MAX_ACTIVE_FLOWS, PROTO_TCP};

use super::{Datapath, batch};

/// How long a flow of a least-connections VIP stays active without a packet from its client:
/// a TCP connection whose FIN or RST the balancer never saw (the client vanished, or the
/// entry outlived the flow table), a UDP flow (which has no end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
}

impl Default for IdleTimeouts {
    /// An hour for TCP: a pooled database connection may sit quiet that long and is still
    /// a connection the server holds; a minute for UDP.
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(3600),
            udp: Duration::from_secs(60),
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Datapath {
    /// New flows per VIP id below `upto` that followed their client's affinity.
    pub fn persisted_flows(&self, upto: u32) -> Result<Vec<u64>> {
        (0..upto)
            .map(|id| {
                let per_cpu = self.persist_stats.get(&id, 0)?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }

    /// Active flows per backend id below `upto` (least connections), batched.
    pub fn active_flows(&self, upto: u32) -> Result<Vec<u64>> {
        const CHUNK: usize = 4096;
        let mut out = vec![0u64; upto as usize];
        if upto == 0 {
            return Ok(out);
        }
        let fd = aya::maps::IterableMap::map(&self.backend_active)
            .fd()
            .as_fd();
        let rounds = (upto as usize).div_ceil(CHUNK);
        batch::lookup::<u32, u64>(fd, CHUNK, 1, rounds, &mut |keys, values| {
            for (k, v) in keys.iter().zip(values) {
                if let Some(slot) = out.get_mut(*k as usize) {
                    // A count the data plane took below zero reads as none.
                    *slot = if *v > u32::MAX as u64 { 0 } else { *v };
                }
            }
        })
        .context("reading active flow counts")?;
        Ok(out)
    }

    /// The agent's side of least connections: forgets the active flows that have been idle
    /// longer than `idle` or whose backend is gone (another id or generation than in
    /// `backends`, the (id, generation) of every least-connections backend), then sets each
    /// such backend's count to its flows left. Between two calls the data plane keeps the
    /// counts itself (new flows, client FIN/RST); a flow that starts during the walk may be
    /// missed until the next one.
    pub fn reconcile_active(
        &mut self,
        backends: &[(u32, u32)],
        idle: IdleTimeouts,
    ) -> Result<HashMap<u32, u64>> {
        let now = monotonic_ns();
        let current: HashMap<u32, u32> = backends.iter().copied().collect();
        let mut counts: HashMap<u32, u64> = backends.iter().map(|(id, _)| (*id, 0)).collect();
        let mut stale = Vec::new();
        let entries: Vec<(FlowKey, ActiveFlow)> = self
            .active_flows
            .iter()
            .take(MAX_ACTIVE_FLOWS as usize * 2)
            .filter_map(|e| e.ok())
            .collect();
        for (key, flow) in entries {
            let limit = if key.proto == PROTO_TCP {
                idle.tcp
            } else {
                idle.udp
            };
            let idle_for = Duration::from_nanos(now.saturating_sub(flow.last_seen_ns));
            let alive = current.get(&flow.backend_id) == Some(&flow.backend_generation);
            if !alive || idle_for > limit {
                stale.push(key);
            } else {
                *counts.entry(flow.backend_id).or_insert(0) += 1;
            }
        }
        for key in &stale {
            // Gone already (a FIN raced the walk): its count went with it.
            let _ = self.active_flows.remove(key);
        }
        for (id, n) in &counts {
            self.backend_active.set(*id, n, 0)?;
        }
        Ok(counts)
    }
}
