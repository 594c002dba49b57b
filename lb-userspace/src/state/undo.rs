//! Changes as all or nothing. A change runs against the state's memory and the maps step
//! by step; should a step fail (or, later, the configuration file not be written), the
//! memory goes back to a copy taken before it and the maps are rewritten from that copy.
//!
//! The maps are not read back: what the data plane should hold follows from the memory,
//! so going back rewrites every restored backend and ring, removes what the change added,
//! and quarantines the ids and ring regions the change took (a packet may have seen them).
//! What the kernel and the health checks said in the meantime (paths, health) is kept.

use std::{collections::HashMap, time::Instant};

use anyhow::{Result, anyhow};
use ipnet::IpNet;
use lb_common::{Backend, VipAddr};

use super::{Adoption, BackendState, Dataplane, Retired, State, VipState};
use crate::{
    health::CheckSpec,
    model::{IdPool, SlabAllocator},
};

/// The state's memory before a change.
pub struct Undo {
    vips: Vec<VipState>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    slab: SlabAllocator,
    vip_addr_refs: HashMap<VipAddr, usize>,
    rules: Vec<(IpNet, u32)>,
    rule_ids: IdPool,
    retired: Vec<(Instant, Retired)>,
    adoption: Adoption,
}

impl<D: Dataplane> State<D> {
    /// Makes one change, all of it or nothing: on an error the state and the maps are as
    /// they were. On success, health checkers follow the change, and the returned [`Undo`]
    /// takes it back (the configuration file could not be written).
    pub fn change<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, Undo)> {
        let undo = self.snapshot();
        match f(self) {
            Ok(value) => {
                self.sync_checkers();
                Ok((value, undo))
            }
            Err(e) => match self.undo(undo) {
                Ok(()) => Err(e),
                Err(u) => Err(anyhow!("{e:#}; undoing the change failed too: {u:#}")),
            },
        }
    }

    fn snapshot(&self) -> Undo {
        Undo {
            vips: self.vips.iter().map(VipState::snapshot).collect(),
            vip_ids: self.vip_ids.clone(),
            backend_ids: self.backend_ids.clone(),
            slab: self.slab.clone(),
            vip_addr_refs: self.vip_addr_refs.clone(),
            rules: self.rules.clone(),
            rule_ids: self.rule_ids.clone(),
            retired: self.retired.clone(),
            adoption: self.adoption.clone(),
        }
    }

    /// Goes back to the memory in `undo` and rewrites the maps to match; every write is
    /// tried, the first error is returned.
    pub fn undo(&mut self, undo: Undo) -> Result<()> {
        let now = Instant::now();
        let changed_vips = std::mem::replace(&mut self.vips, undo.vips);
        let changed_rules = std::mem::replace(&mut self.rules, undo.rules);
        let changed_addrs = std::mem::replace(&mut self.vip_addr_refs, undo.vip_addr_refs);
        self.vip_ids = undo.vip_ids;
        self.backend_ids = undo.backend_ids;
        self.slab = undo.slab;
        self.rule_ids = undo.rule_ids;
        self.retired = undo.retired;
        self.adoption = undo.adoption;
        self.version += 1;

        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };

        // What the change took that the restored memory does not hold: quarantined.
        let mut cleared = Vec::new();
        for v in &changed_vips {
            let restored = self.vips.iter().find(|r| r.service == v.service);
            if restored.is_none_or(|r| r.id != v.id) && self.vip_ids.adopt(v.id, 1) {
                self.retired.push((now, Retired::VipId(v.id)));
            }
            let same_rings = |r: &VipState| r.rings.offs == v.rings.offs;
            if !self.vips.iter().any(same_rings) && self.reserve_rings(v) {
                self.retired.push((now, Retired::Rings(v.rings)));
            }
            for b in &v.backends {
                let kept = self
                    .vips
                    .iter()
                    .flat_map(|r| &r.backends)
                    .any(|r| r.id == b.id);
                if !kept {
                    if self.backend_ids.adopt(b.id, b.generation) {
                        self.retired.push((now, Retired::BackendId(b.id)));
                    }
                    cleared.push((b.id, b.generation));
                }
            }
        }
        for (net, id) in &changed_rules {
            if !self.rules.iter().any(|(n, _)| n == net) {
                note(self.dp.del_firewall_rule(net));
                if self.rule_ids.adopt(*id, 1) {
                    self.retired.push((now, Retired::RuleId(*id)));
                }
            }
        }
        for (net, id) in self.rules.clone() {
            if !changed_rules.iter().any(|(n, _)| *n == net) {
                note(self.dp.set_firewall_rule(&net, id));
            }
        }

        // What the kernel and the checks said meanwhile stays; the regions a VIP kept
        // stay as the data plane reads them now.
        let mut changed_vips = changed_vips;
        for r in &mut self.vips {
            let Some(v) = changed_vips.iter_mut().find(|v| v.service == r.service) else {
                continue;
            };
            if r.rings.offs == v.rings.offs {
                r.rings.active = v.rings.active;
                r.written = std::mem::take(&mut v.written);
            }
            let vip_check = r.check.clone();
            for b in &mut r.backends {
                let Some(c) = v.backends.iter().find(|c| c.id == b.id) else {
                    continue;
                };
                b.l2 = c.l2;
                b.note = c.note.clone();
                let check_of = |x: &BackendState, vip: &CheckSpec| {
                    x.check.clone().unwrap_or_else(|| vip.clone())
                };
                if check_of(b, &vip_check) == check_of(c, &v.check) {
                    b.health = c.health.clone();
                }
            }
        }

        for addr in self.vip_addr_refs.keys() {
            if !changed_addrs.contains_key(addr) {
                note(self.dp.set_vip_addr(addr));
            }
        }
        for vi in 0..self.vips.len() {
            for bi in 0..self.vips[vi].backends.len() {
                note(self.write_backend(vi, bi));
            }
            note(self.rebuild_ring(vi));
        }
        for (id, generation) in cleared {
            let entry = Backend {
                generation,
                ..Default::default()
            };
            note(self.dp.set_backend(id, &entry));
        }
        for v in &changed_vips {
            if !self.vips.iter().any(|r| r.service == v.service) {
                note(self.dp.del_vip(&v.service.key()));
            }
        }
        for addr in changed_addrs.keys() {
            if !self.vip_addr_refs.contains_key(addr) {
                note(self.dp.del_vip_addr(addr));
            }
        }
        self.sync_checkers();
        first.map_or(Ok(()), Err)
    }

    /// Takes a VIP's two ring regions out of the free space again.
    fn reserve_rings(&mut self, v: &VipState) -> bool {
        let [a, b] = v.rings.offs;
        let cap = v.rings.capacity;
        if !self.slab.reserve(a, cap) {
            return false;
        }
        if !self.slab.reserve(b, cap) {
            self.slab.release(a, cap);
            return false;
        }
        true
    }
}
