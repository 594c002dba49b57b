//! The agent's state and its changes: VIPs, their backends and rings, health, drop rules,
//! and the adoption of a previous agent's pinned maps. Kernel-free: it writes the data
//! plane through [`Dataplane`] and is told what the kernel said of reaching a backend
//! ([`Reach`]); nothing here waits on the network, so a change holds the agent lock only
//! for as long as its map writes take.

mod apply;
mod dataplane;
#[cfg(test)]
mod tests;
mod undo;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_LEASTCONN, BACKEND_F_RESOLVED, Backend,
    MAX_BACKENDS, MAX_FIREWALL_RULES, MAX_VIPS, RING_SLAB_LEN, VIP_F_HASH, VIP_F_LEASTCONN,
    VipAddr, VipMeta,
};
use tokio::{sync::mpsc, task::JoinHandle};

pub use apply::{Change, Plan};
use dataplane::fresh_id;
pub use dataplane::{AllCounters, CounterId, Dataplane, Fake, InUse, Pinned};
pub use undo::Undo;

use crate::{
    config::{BackendConfig, Config, FirewallConfig, VipConfig},
    health::{self, CheckKind, CheckPatch, CheckSpec, Health},
    model::{
        self, Algo, IdPool, L2Path, Mode, Persist, RateLimit, RatePatch, Reach, RingMember,
        RingRegions, Service, SlabAllocator,
    },
};

/// Ring capacity a round-robin VIP starts with; grown when its backends outgrow it.
const INITIAL_RING_CAPACITY: u32 = 64;
/// Slab regions and ids are reused only after this long, so a packet that read the old
/// ring or backend just before a flip never sees them repurposed.
const QUARANTINE: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct BackendState {
    pub addr: IpAddr,
    pub id: u32,
    pub generation: u32,
    pub l2: Option<L2Path>,
    /// Why it cannot take traffic, for `backend list`.
    pub note: Option<String>,
    pub weight: u32,
    pub backup: bool,
    pub drain: bool,
    /// Being deleted gracefully (`lb backend del`): takes no new flows, and is removed
    /// when its flows end or at this unix time (seconds), whichever comes first.
    pub leaving_until: Option<u64>,
    /// Replaces the VIP's check for this backend.
    pub check: Option<CheckSpec>,
    pub health: Health,
}

impl BackendState {
    /// May take new flows.
    pub fn eligible(&self) -> bool {
        self.l2.is_some()
            && self.health.up
            && !self.drain
            && self.leaving_until.is_none()
            && self.weight > 0
    }

    /// `leaving`, `unresolved`, `down`, `draining` or `up`, as `lb backend list` says.
    pub fn state(&self) -> &'static str {
        if self.leaving_until.is_some() {
            "leaving"
        } else if self.l2.is_none() {
            "unresolved"
        } else if !self.health.up {
            "down"
        } else if self.drain {
            "draining"
        } else {
            "up"
        }
    }

    fn config(&self) -> BackendConfig {
        BackendConfig {
            address: self.addr,
            weight: self.weight,
            backup: self.backup,
            drain: self.drain,
            leaving_until: self.leaving_until,
            check: self.check.clone(),
        }
    }
}

/// A backend's running health checker, with what it checks: restarted when that changes.
struct Checker {
    generation: u32,
    addr: IpAddr,
    port: u16,
    spec: CheckSpec,
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct VipState {
    pub service: Service,
    pub id: u32,
    pub algo: Algo,
    pub mode: Mode,
    pub check: CheckSpec,
    pub rate: RateLimit,
    pub persist: Persist,
    pub backends: Vec<BackendState>,
    rings: RingRegions,
    /// What was last written into each of the two regions (empty: not known), so a
    /// rebuild writes only the slots that differ.
    written: [Vec<u32>; 2],
}

impl VipState {
    /// The check a backend runs: its own, else the VIP's.
    pub fn check_of<'a>(&'a self, b: &'a BackendState) -> &'a CheckSpec {
        b.check.as_ref().unwrap_or(&self.check)
    }

    /// Whether a backend is in the ring now: as `rebuild_ring` picks, primaries that can
    /// take flows, else such backups.
    pub fn in_rotation(&self, b: &BackendState) -> bool {
        let primaries = self.backends.iter().any(|b| !b.backup && b.eligible());
        b.eligible() && b.backup != primaries
    }

    /// A copy to go back to, without what was written to the ring regions (the regions
    /// may be written after the copy is taken).
    fn snapshot(&self) -> VipState {
        VipState {
            service: self.service,
            id: self.id,
            algo: self.algo,
            mode: self.mode,
            check: self.check.clone(),
            rate: self.rate,
            persist: self.persist,
            backends: self.backends.clone(),
            rings: self.rings,
            written: Default::default(),
        }
    }

    fn config(&self) -> VipConfig {
        VipConfig {
            address: self.service.addr,
            proto: self.service.proto,
            algo: self.algo,
            mode: self.mode,
            check: self.check.clone(),
            rate_limit: self.rate.rate_limit,
            burst: self.rate.burst,
            max_new_flows: self.rate.max_new_flows,
            new_flow_burst: self.rate.new_flow_burst,
            persist: self.persist.seconds,
            persist_prefix6: self.persist.prefix6,
            backends: self.backends.iter().map(BackendState::config).collect(),
        }
    }
}

#[derive(Clone)]
enum Retired {
    Rings(RingRegions),
    Extent(u32, u32),
    VipId(u32),
    BackendId(u32),
    RuleId(u32),
}

/// What an earlier agent left in pinned maps, looked up while the configuration is applied.
#[derive(Clone, Default)]
struct Adoption {
    /// Entries not claimed yet, their ids reserved.
    vips: HashMap<lb_common::VipKey, VipMeta>,
    backends: HashMap<(u32, IpAddr), (u32, Backend)>,
    rules: HashMap<IpNet, u32>,
    vip_addrs: Vec<VipAddr>,
    /// Entries whose id another entry held already (damaged maps): removed unless the
    /// configuration claims them, which then gives them new ids.
    stray_vips: Vec<lb_common::VipKey>,
    stray_rules: Vec<IpNet>,
}

pub struct State<D> {
    dp: D,
    vips: Vec<VipState>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    slab: SlabAllocator,
    vip_addr_refs: HashMap<VipAddr, usize>,
    /// Drop-list rules in the order they were added, with their counter ids.
    rules: Vec<(IpNet, u32)>,
    rule_ids: IdPool,
    tx_ports: Vec<u32>,
    retired: Vec<(Instant, Retired)>,
    /// Where health checkers send results; None runs no checkers (unit tests).
    reports: Option<mpsc::Sender<health::Report>>,
    /// By backend id; started and stopped only once a change is made (`change`), so an
    /// undone change leaves the checkers as they were.
    checkers: HashMap<u32, Checker>,
    adoption: Adoption,
    /// Bumped by every change, so configuration writes can be put in order.
    version: u64,
    /// The `[flow_sync]` section, kept so the configuration file is written back with it.
    pub flow_sync: Option<crate::flowsync::FlowSyncConfig>,
}

impl<D: Dataplane> State<D> {
    pub fn new(dp: D, reports: Option<mpsc::Sender<health::Report>>) -> Self {
        Self {
            dp,
            vips: Vec::new(),
            vip_ids: IdPool::new(MAX_VIPS),
            backend_ids: IdPool::new(MAX_BACKENDS),
            slab: SlabAllocator::new(RING_SLAB_LEN),
            vip_addr_refs: HashMap::new(),
            rules: Vec::new(),
            rule_ids: IdPool::new(MAX_FIREWALL_RULES),
            tx_ports: Vec::new(),
            retired: Vec::new(),
            reports,
            checkers: HashMap::new(),
            adoption: Adoption::default(),
            version: 0,
            flow_sync: None,
        }
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// The counters of every VIP, backend and drop rule there is, and every reason's.
    pub fn counters(&self) -> Result<AllCounters> {
        let next = |ids: &mut dyn Iterator<Item = u32>| ids.max().map_or(0, |id| id + 1);
        self.dp.counters(InUse {
            vips: next(&mut self.vips.iter().map(|v| v.id)),
            backends: next(&mut self.vips.iter().flat_map(|v| &v.backends).map(|b| b.id)),
            rules: next(&mut self.rules.iter().map(|(_, id)| *id)),
        })
    }

    pub fn vips(&self) -> &[VipState] {
        &self.vips
    }

    pub fn rules(&self) -> &[(IpNet, u32)] {
        &self.rules
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn vip_index(&self, service: &Service) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| v.service == *service)
            .ok_or_else(|| {
                anyhow!("no VIP {service}: `lb vip list` shows the VIPs, `lb vip add` adds one")
            })
    }

    fn backend_index(&self, service: &Service, addr: IpAddr) -> Result<(usize, usize)> {
        let vi = self.vip_index(service)?;
        let bi = self.vips[vi]
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| anyhow!("backend {addr} does not serve VIP {service}: `lb backend list` shows its backends"))?;
        Ok((vi, bi))
    }

    /// The backend `addr` of `service`.
    pub fn backend(&self, service: &Service, addr: IpAddr) -> Result<&BackendState> {
        let (vi, bi) = self.backend_index(service, addr)?;
        Ok(&self.vips[vi].backends[bi])
    }

    /// The VIP `service`.
    pub fn vip(&self, service: &Service) -> Result<&VipState> {
        Ok(&self.vips[self.vip_index(service)?])
    }

    // ---- adopting pinned state -------------------------------------------------------

    /// Takes in what a previous agent left in the pinned maps. Ids and generations found
    /// there are kept for the same VIPs, backends and drop rules, so pinned flows stay
    /// valid: they are reserved here, before the configuration allocates anything, so an
    /// entry new to it cannot take an adopted one's id whatever the order. The rings the
    /// data plane reads now are fenced off until every VIP has flipped to a new one.
    pub fn prepare_adoption(&mut self, pinned: Pinned) {
        for (id, b) in pinned.backends {
            self.backend_ids.seed(id, b.generation);
            if b.flags & BACKEND_F_IN_USE != 0 && self.backend_ids.adopt(id, b.generation) {
                let addr = model::addr_from_map(b.addr, b.family);
                self.adoption.backends.insert((b.vip_id, addr), (id, b));
            }
        }
        for (net, id) in pinned.rules {
            if self.rule_ids.adopt(id, 1) {
                self.adoption.rules.insert(net, id);
            } else {
                self.adoption.stray_rules.push(net);
            }
        }
        for (key, meta) in pinned.vips {
            if meta.ring_len > 0 && self.slab.reserve(meta.ring_off, meta.ring_len) {
                self.retired.push((
                    Instant::now(),
                    Retired::Extent(meta.ring_off, meta.ring_len),
                ));
            }
            if self.vip_ids.adopt(meta.vip_id, 1) {
                self.adoption.vips.insert(key, meta);
            } else {
                self.adoption.stray_vips.push(key);
            }
        }
        self.adoption.vip_addrs = pinned.vip_addrs;
    }

    /// Whether `service` has an adopted id waiting for it (no free id needed).
    fn adopted_vip(&self, service: &Service) -> bool {
        self.adoption.vips.contains_key(&service.key())
    }

    /// Whether backend `addr` of `service` has an adopted id waiting for it.
    fn adopted_backend(&self, service: &Service, addr: IpAddr) -> bool {
        let vip_id = match self.adoption.vips.get(&service.key()) {
            Some(meta) => meta.vip_id,
            None => match self.vip_index(service) {
                Ok(vi) => self.vips[vi].id,
                Err(_) => return false,
            },
        };
        self.adoption.backends.contains_key(&(vip_id, addr))
    }

    /// Whether drop rule `net` has an adopted id waiting for it.
    fn adopted_rule(&self, net: &IpNet) -> bool {
        self.adoption.rules.contains_key(net)
    }

    /// After the configuration is applied: whatever pinned state it did not claim goes,
    /// and the ids reserved for it are quarantined like any removed entry's.
    pub fn finish_adoption(&mut self) -> Result<()> {
        let adoption = std::mem::take(&mut self.adoption);
        let now = Instant::now();
        for (key, meta) in &adoption.vips {
            self.dp.del_vip(key)?;
            self.retired.push((now, Retired::VipId(meta.vip_id)));
        }
        for key in &adoption.stray_vips {
            if !self.vips.iter().any(|v| v.service.key() == *key) {
                self.dp.del_vip(key)?;
            }
        }
        for (net, id) in &adoption.rules {
            self.dp.del_firewall_rule(net)?;
            self.retired.push((now, Retired::RuleId(*id)));
        }
        for net in &adoption.stray_rules {
            if !self.rules.iter().any(|(n, _)| n == net) {
                self.dp.del_firewall_rule(net)?;
            }
        }
        for (id, b) in adoption.backends.values() {
            self.clear_backend(*id, b.generation)?;
        }
        for addr in &adoption.vip_addrs {
            if !self.vip_addr_refs.contains_key(addr) {
                self.dp.del_vip_addr(addr)?;
            }
        }
        Ok(())
    }

    // ---- changes, as the control socket asks for them ----------------------------------

    pub fn add_vip(
        &mut self,
        service: Service,
        algo: Algo,
        check: CheckSpec,
        rate: RateLimit,
    ) -> Result<()> {
        self.validate_new_vip(&service, &check, &rate)?;
        let vi = self.insert_vip(service, algo, check, rate)?;
        self.rebuild_ring(vi)
    }

    fn validate_new_vip(
        &self,
        service: &Service,
        check: &CheckSpec,
        rate: &RateLimit,
    ) -> Result<()> {
        if self.vip_index(service).is_ok() {
            bail!("VIP {service} already exists: change it with `lb vip set`");
        }
        check.validate()?;
        rate.validate()
    }

    pub fn set_vip(
        &mut self,
        service: &Service,
        algo: Option<Algo>,
        patch: &CheckPatch,
        rate: &RatePatch,
    ) -> Result<()> {
        let vi = self.vip_index(service)?;
        let vip = &self.vips[vi];
        let check = patch.apply(&vip.check)?;
        let rate = rate.apply(&vip.rate);
        rate.validate()?;
        let algo = algo.unwrap_or(vip.algo);
        self.update_vip(vi, algo, check, rate)?;
        self.rebuild_ring(vi)
    }

    /// Sets a VIP's source affinity (`lb vip add/set --persist`).
    pub fn set_persist(&mut self, service: &Service, persist: Persist) -> Result<()> {
        persist.validate()?;
        let vi = self.vip_index(service)?;
        if self.vips[vi].persist != persist {
            self.vips[vi].persist = persist;
            self.version += 1;
            self.rebuild_ring(vi)?;
        }
        Ok(())
    }

    /// Sets how a VIP's packets reach its backends (`lb vip add/set --mode`): every
    /// backend entry carries the mode, so the established path needs no VIP lookup.
    pub fn set_mode(&mut self, service: &Service, mode: Mode) -> Result<()> {
        let vi = self.vip_index(service)?;
        if self.vips[vi].mode != mode {
            self.vips[vi].mode = mode;
            self.version += 1;
            let mut changed_ring = false;
            for bi in 0..self.vips[vi].backends.len() {
                // A routed path is no path in a mode that rewrites MACs only; a routed
                // backend refused so far is resolved again by the next pass
                // (`reach_targets`), now that its VIP takes it.
                let b = &mut self.vips[vi].backends[bi];
                if let Some(l2) = b.l2
                    && l2.via.is_some()
                {
                    let r = Reach {
                        l2: Some(l2),
                        ..Default::default()
                    }
                    .for_mode(mode);
                    if r.l2.is_none() {
                        (b.l2, b.note) = (None, r.note);
                        changed_ring = true;
                    }
                }
                self.write_backend(vi, bi)?;
            }
            if changed_ring {
                self.rebuild_ring(vi)?;
            }
        }
        Ok(())
    }

    pub fn del_vip(&mut self, service: &Service) -> Result<()> {
        let vi = self.vip_index(service)?;
        self.remove_vip(vi)
    }

    /// Adds a backend, with what the kernel said of reaching it.
    pub fn add_backend(
        &mut self,
        service: &Service,
        config: &BackendConfig,
        reach: Reach,
    ) -> Result<()> {
        let vi = self.vip_index(service)?;
        self.validate_new_backend(vi, config)?;
        self.insert_backend(vi, config, reach)?;
        self.rebuild_ring(vi)
    }

    /// Checks a backend could be added to `service`, before anything is changed (and
    /// before waiting on the kernel to resolve it).
    pub fn check_new_backend(&self, service: &Service, config: &BackendConfig) -> Result<()> {
        self.validate_new_backend(self.vip_index(service)?, config)
    }

    fn validate_new_backend(&self, vi: usize, config: &BackendConfig) -> Result<()> {
        let (service, addr) = (&self.vips[vi].service, config.address);
        config.validate(service)?;
        match self.vips[vi].backends.iter().find(|b| b.addr == addr) {
            Some(b) if b.leaving_until.is_some() => bail!(
                "backend {addr} is leaving VIP {service}: wait until it is gone, or remove it at once with `lb backend del --now`"
            ),
            Some(_) => bail!(
                "backend {addr} already serves VIP {service}: change it with `lb backend set`"
            ),
            None => {}
        }
        Ok(())
    }

    pub fn set_backend(
        &mut self,
        service: &Service,
        addr: IpAddr,
        weight: Option<u32>,
        backup: Option<bool>,
        patch: &CheckPatch,
    ) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        if let Some(w) = weight {
            model::check_weight(w)?;
        }
        let vip = &self.vips[vi];
        let b = &vip.backends[bi];
        let check = if patch.is_empty() {
            b.check.clone()
        } else {
            Some(patch.apply(vip.check_of(b))?)
        };
        let config = BackendConfig {
            address: addr,
            weight: weight.unwrap_or(b.weight),
            backup: backup.unwrap_or(b.backup),
            drain: b.drain,
            leaving_until: b.leaving_until,
            check,
        };
        self.update_backend(vi, bi, &config)?;
        self.rebuild_ring(vi)
    }

    pub fn drain_backend(&mut self, service: &Service, addr: IpAddr, drain: bool) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        let config = BackendConfig {
            drain,
            ..self.vips[vi].backends[bi].config()
        };
        self.update_backend(vi, bi, &config)?;
        self.rebuild_ring(vi)
    }

    /// Deletes a backend gracefully: no new flows from now on; `remove_departed` removes
    /// it when its flows end or at `until` (unix seconds).
    pub fn leave_backend(&mut self, service: &Service, addr: IpAddr, until: u64) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        let config = BackendConfig {
            leaving_until: Some(until),
            ..self.vips[vi].backends[bi].config()
        };
        self.update_backend(vi, bi, &config)?;
        self.rebuild_ring(vi)
    }

    /// The backends leaving (see `leave_backend`): VIP, address, id and generation, and
    /// whether they are due to go whatever their flows (the time is up, or they are down
    /// or unresolved, so their flows move anyway).
    pub fn leaving(&self, now: u64) -> Vec<(Service, IpAddr, (u32, u32), bool)> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (v, b)))
            .filter_map(|(v, b)| {
                let until = b.leaving_until?;
                let due = until <= now || !b.health.up || b.l2.is_none();
                Some((v.service, b.addr, (b.id, b.generation), due))
            })
            .collect()
    }

    pub fn del_backend(&mut self, service: &Service, addr: IpAddr) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        let backend = self.vips[vi].backends.remove(bi);
        self.version += 1;
        // Out of the ring first, so no new flow picks it while it is being cleared; its
        // pinned flows then find it not in use and are re-balanced.
        self.rebuild_ring(vi)?;
        self.clear_backend(backend.id, backend.generation)
    }

    // ---- the building blocks of every change -----------------------------------------

    /// A new VIP with no ring yet (`rebuild_ring` makes it).
    fn insert_vip(
        &mut self,
        service: Service,
        algo: Algo,
        check: CheckSpec,
        rate: RateLimit,
    ) -> Result<usize> {
        // Adopted ids were reserved by `prepare_adoption`.
        let adopted = self.adoption.vips.remove(&service.key());
        let id = match adopted {
            Some(meta) => meta.vip_id,
            None => {
                let full = || anyhow!("VIP table full ({MAX_VIPS})");
                fresh_id(&mut self.dp, &mut self.vip_ids, CounterId::Vip, full)?.0
            }
        };
        let Some(rings) = RingRegions::alloc(&mut self.slab, ring_capacity(algo, 0)) else {
            match adopted {
                Some(meta) => drop(self.adoption.vips.insert(service.key(), meta)),
                None => self.vip_ids.give_back(id),
            }
            bail!("ring slab full: remove unused VIPs first");
        };
        let addr_key = service.addr_key();
        let refs = self.vip_addr_refs.entry(addr_key).or_insert(0);
        if *refs == 0 {
            self.dp.set_vip_addr(&addr_key)?;
        }
        *refs += 1;
        self.vips.push(VipState {
            service,
            id,
            algo,
            mode: Mode::default(),
            check,
            rate,
            persist: Persist::default(),
            backends: Vec::new(),
            rings,
            written: Default::default(),
        });
        self.version += 1;
        Ok(self.vips.len() - 1)
    }

    /// New settings for a VIP (the ring is rebuilt by the caller). A changed check
    /// restarts the checkers of the backends that use it.
    fn update_vip(
        &mut self,
        vi: usize,
        algo: Algo,
        check: CheckSpec,
        rate: RateLimit,
    ) -> Result<()> {
        let vip = &mut self.vips[vi];
        let check_changed = check != vip.check;
        let leastconn_changed = (algo == Algo::Leastconn) != (vip.algo == Algo::Leastconn);
        vip.check = check;
        vip.rate = rate;
        vip.algo = algo;
        self.version += 1;
        if leastconn_changed {
            for bi in 0..self.vips[vi].backends.len() {
                self.write_backend(vi, bi)?;
            }
        }
        if check_changed {
            for bi in 0..self.vips[vi].backends.len() {
                if self.vips[vi].backends[bi].check.is_none() && self.restart_health(vi, bi) {
                    self.write_backend(vi, bi)?;
                }
            }
        }
        Ok(())
    }

    fn remove_vip(&mut self, vi: usize) -> Result<()> {
        let service = self.vips[vi].service;
        self.dp.del_vip(&service.key())?;
        let vip = self.vips.remove(vi);
        self.version += 1;
        let addr_key = service.addr_key();
        if let Some(refs) = self.vip_addr_refs.get_mut(&addr_key) {
            *refs -= 1;
            if *refs == 0 {
                self.vip_addr_refs.remove(&addr_key);
                self.dp.del_vip_addr(&addr_key)?;
            }
        }
        let now = Instant::now();
        for b in &vip.backends {
            self.clear_backend(b.id, b.generation)?;
        }
        self.retired.push((now, Retired::Rings(vip.rings)));
        self.retired.push((now, Retired::VipId(vip.id)));
        Ok(())
    }

    /// A new backend of VIP `vi`, written to the data plane but not yet in its ring.
    fn insert_backend(&mut self, vi: usize, config: &BackendConfig, reach: Reach) -> Result<()> {
        let vip_id = self.vips[vi].id;
        let addr = config.address;
        // An adopted backend that had lost KEEP_FLOWS was down when the previous agent
        // stopped (only failed health checks clear the flag).
        let mut reach = reach.for_mode(self.vips[vi].mode);
        let (id, generation, was_down) = match self.adoption.backends.remove(&(vip_id, addr)) {
            Some((id, b)) => {
                // Its MAC being re-resolved (the neighbour entry aged out while no agent
                // ran): its flows keep going to the MAC the data plane has.
                let pinned = (b.flags & BACKEND_F_RESOLVED != 0).then_some(L2Path {
                    ifindex: b.ifindex,
                    src_mac: b.src_mac,
                    dst_mac: b.mac,
                    // Whether through a router or not, the MAC is what frames go to.
                    via: None,
                });
                if reach.l2.is_none() && model::keep_last_mac(pinned, &reach).is_some() {
                    reach.l2 = pinned;
                }
                (id, b.generation, b.flags & BACKEND_F_KEEP_FLOWS == 0)
            }
            None => {
                let full = || anyhow!("backend table full ({MAX_BACKENDS})");
                let ids = &mut self.backend_ids;
                let (id, generation) = fresh_id(&mut self.dp, ids, CounterId::Backend, full)?;
                (id, generation, false)
            }
        };
        self.vips[vi].backends.push(BackendState {
            addr,
            id,
            generation,
            l2: reach.l2,
            note: reach.note,
            weight: config.weight,
            backup: config.backup,
            drain: config.drain,
            leaving_until: config.leaving_until,
            check: config.check.clone(),
            health: Health::restarted(!was_down),
        });
        self.version += 1;
        let bi = self.vips[vi].backends.len() - 1;
        // A restart keeps a backend that was down out of rotation until `rise` good checks
        // instead of sending new flows to a dead backend until `fall` checks find out again.
        self.restart_health(vi, bi);
        self.write_backend(vi, bi)
    }

    /// New settings for a backend; its id, flows and health stay unless its check changed.
    fn update_backend(&mut self, vi: usize, bi: usize, config: &BackendConfig) -> Result<()> {
        model::check_weight(config.weight)?;
        if let Some(c) = &config.check {
            c.validate()?;
        }
        let b = &mut self.vips[vi].backends[bi];
        b.weight = config.weight;
        b.backup = config.backup;
        b.drain = config.drain;
        b.leaving_until = config.leaving_until;
        let check_changed = b.check != config.check;
        b.check = config.check.clone();
        self.version += 1;
        if check_changed {
            self.restart_health(vi, bi);
        }
        self.write_backend(vi, bi)
    }

    /// Marks a removed backend's slot unused (its flows are re-balanced) and quarantines
    /// the id.
    fn clear_backend(&mut self, id: u32, generation: u32) -> Result<()> {
        self.dp.set_backend(
            id,
            &Backend {
                generation,
                ..Default::default()
            },
        )?;
        self.retired.push((Instant::now(), Retired::BackendId(id)));
        Ok(())
    }

    /// Writes a backend's entry from its state. A backend that is down loses
    /// KEEP_FLOWS, so its flows move to a live backend on their next packet; one that
    /// drains keeps them.
    fn write_backend(&mut self, vi: usize, bi: usize) -> Result<()> {
        let vip_id = self.vips[vi].id;
        let b = &self.vips[vi].backends[bi];
        let (addr, family) = model::addr_to_map(b.addr);
        let mut entry = Backend {
            addr,
            family,
            vip_id,
            generation: b.generation,
            flags: BACKEND_F_IN_USE,
            ..Default::default()
        };
        if self.vips[vi].algo == Algo::Leastconn {
            entry.flags |= BACKEND_F_LEASTCONN;
        }
        entry.flags |= self.vips[vi].mode.backend_flags();
        if b.health.up {
            entry.flags |= BACKEND_F_KEEP_FLOWS;
        }
        if let Some(l2) = b.l2 {
            if !self.tx_ports.contains(&l2.ifindex) {
                self.dp.add_tx_port(l2.ifindex)?;
                self.tx_ports.push(l2.ifindex);
            }
            entry.ifindex = l2.ifindex;
            entry.mac = l2.dst_mac;
            entry.src_mac = l2.src_mac;
            entry.flags |= BACKEND_F_RESOLVED;
        }
        self.dp.set_backend(b.id, &entry)
    }

    /// An interface the program is attached to: a redirect target.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        if !self.tx_ports.contains(&ifindex) {
            self.dp.add_tx_port(ifindex)?;
            self.tx_ports.push(ifindex);
        }
        Ok(())
    }

    /// Health counted afresh under a changed check: up or down as before (a down backend
    /// needs `rise` good checks of the new one), except that with no check at all it is up,
    /// as nothing would ever bring it back. True when it came up.
    fn restart_health(&mut self, vi: usize, bi: usize) -> bool {
        let vip = &self.vips[vi];
        let unchecked = vip.check_of(&vip.backends[bi]).check == CheckKind::None;
        let b = &mut self.vips[vi].backends[bi];
        let was_up = b.health.up;
        b.health = Health::restarted(was_up || unchecked);
        !was_up && b.health.up
    }

    /// Starts the checkers a change asked for and stops those it made obsolete: a backend
    /// checks what `check_of` says, tagged with its id and generation.
    fn sync_checkers(&mut self) {
        let Some(reports) = &self.reports else {
            return;
        };
        let mut wanted = HashSet::new();
        for vip in &self.vips {
            let port = vip.service.addr.port();
            for b in &vip.backends {
                let spec = vip.check_of(b);
                if spec.check == CheckKind::None {
                    continue;
                }
                wanted.insert(b.id);
                let current = self.checkers.get(&b.id).is_some_and(|c| {
                    c.generation == b.generation
                        && c.addr == b.addr
                        && c.port == port
                        && c.spec == *spec
                });
                if !current {
                    let task = health::spawn_checker(
                        b.id,
                        b.generation,
                        b.addr,
                        port,
                        spec.clone(),
                        reports.clone(),
                    );
                    let checker = Checker {
                        generation: b.generation,
                        addr: b.addr,
                        port,
                        spec: spec.clone(),
                        task,
                    };
                    self.checkers.insert(b.id, checker);
                }
            }
        }
        self.checkers.retain(|id, _| wanted.contains(id));
    }

    /// Stops every health checker (the agent is stopping).
    pub fn stop_checkers(&mut self) {
        self.checkers.clear();
    }

    /// Applies a health check result; a backend that changes between up and down is
    /// rewritten and its VIP's ring rebuilt. True when it changed.
    pub fn on_report(&mut self, report: health::Report) -> Result<bool> {
        let found = self.vips.iter().enumerate().find_map(|(vi, v)| {
            v.backends
                .iter()
                .position(|b| b.id == report.backend_id && b.generation == report.generation)
                .map(|bi| (vi, bi))
        });
        let Some((vi, bi)) = found else {
            return Ok(false);
        };
        let vip = &mut self.vips[vi];
        let spec = vip.check_of(&vip.backends[bi]);
        if spec.check == CheckKind::None {
            return Ok(false); // a result still in flight from a checker that was stopped
        }
        let (rise, fall) = (spec.rise, spec.fall);
        let service = vip.service;
        let b = &mut vip.backends[bi];
        let detail = report.outcome.detail.clone();
        if !b.health.record(report.outcome, rise, fall) {
            return Ok(false);
        }
        log::warn!(
            "backend {} of {service} is {} ({detail})",
            b.addr,
            if b.health.up { "UP" } else { "DOWN" }
        );
        self.write_backend(vi, bi)?;
        self.rebuild_ring(vi)?;
        Ok(true)
    }

    /// Builds the VIP's ring from the backends that can take new flows (primaries, or the
    /// backups while no primary can), writes the slots that differ from what the region
    /// the data plane is not reading holds, then flips the VIP to it with one map update.
    fn rebuild_ring(&mut self, vi: usize) -> Result<()> {
        let vip = &self.vips[vi];
        let members = |backup: bool| -> Vec<RingMember> {
            vip.backends
                .iter()
                .filter(|b| b.backup == backup && b.eligible())
                .map(|b| RingMember {
                    id: b.id,
                    weight: b.weight,
                    addr: b.addr,
                })
                .collect()
        };
        let mut eligible = members(false);
        if eligible.is_empty() {
            eligible = members(true);
        }
        let (ring, flags) = match vip.algo {
            Algo::Rr => (model::round_robin_ring(&eligible), 0),
            Algo::Maglev => (
                model::maglev_ring(&eligible, model::MAGLEV_TABLE_SIZE),
                VIP_F_HASH,
            ),
            Algo::Leastconn => (leastconn_ring(&eligible), VIP_F_LEASTCONN),
        };
        let len = ring.len() as u32;
        let mut rings = vip.rings;
        if len > rings.capacity {
            let fresh = RingRegions::alloc(&mut self.slab, ring_capacity(vip.algo, len))
                .ok_or_else(|| anyhow!("ring slab full"))?;
            self.retired.push((Instant::now(), Retired::Rings(rings)));
            rings = RingRegions { active: 1, ..fresh };
            self.vips[vi].written = Default::default();
        }
        let vip = &mut self.vips[vi];
        let inactive = 1 - rings.active;
        let off = rings.offs[inactive];
        let old = std::mem::take(&mut vip.written[inactive]);
        let (mut slots, mut ids) = (Vec::new(), Vec::new());
        for (i, id) in ring.iter().enumerate() {
            if old.get(i) != Some(id) {
                slots.push(off + i as u32);
                ids.push(*id);
            }
        }
        // `written` stays empty (unknown) should the write fail half-way.
        self.dp.set_ring_slots(&slots, &ids)?;
        let (rate_interval_ns, rate_burst_ns) = vip.rate.gcra_ns();
        let (new_flow_interval_ns, new_flow_burst_ns) = vip.rate.ceiling_gcra_ns();
        let (persist_ns, persist_mask6) = vip.persist.meta();
        let meta = VipMeta {
            vip_id: vip.id,
            ring_off: off,
            ring_len: len,
            flags,
            persist_ns,
            persist_mask6,
            rate_interval_ns,
            rate_burst_ns,
            new_flow_interval_ns,
            new_flow_burst_ns,
        };
        vip.written[inactive] = ring;
        self.dp.set_vip(&vip.service.key(), &meta)?;
        rings.active = inactive;
        vip.rings = rings;
        Ok(())
    }

    // ---- what the kernel says of reaching backends -------------------------------------

    /// Backend addresses to ask the kernel about: all of them, or those not resolved yet
    /// (or being re-resolved: those have a note).
    pub fn reach_targets(&self, all: bool) -> Vec<IpAddr> {
        let mut seen = HashSet::new();
        self.vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter(|b| all || b.l2.is_none() || b.note.is_some())
            .map(|b| b.addr)
            .filter(|a| seen.insert(*a))
            .collect()
    }

    /// Takes in what the kernel said of reaching backends (see `reach_targets`), rewriting
    /// the backends whose path changed and the rings of VIPs where one came or went.
    pub fn apply_reach(&mut self, reach: &HashMap<IpAddr, Reach>) -> Result<()> {
        for vi in 0..self.vips.len() {
            let mut changed_ring = false;
            let mode = self.vips[vi].mode;
            for bi in 0..self.vips[vi].backends.len() {
                let b = &mut self.vips[vi].backends[bi];
                let Some(r) = reach.get(&b.addr) else {
                    continue;
                };
                let r = &r.for_mode(mode);
                let l2 = model::keep_last_mac(b.l2, r);
                b.note = r.note.clone();
                if l2.is_some() && r.l2.is_none() {
                    b.note = r
                        .note
                        .as_ref()
                        .map(|n| format!("{n}; forwarding to the last known MAC"));
                }
                if l2 == b.l2 {
                    continue;
                }
                let old = std::mem::replace(&mut b.l2, l2);
                let what = if l2.is_some() {
                    "resolved"
                } else {
                    "lost its neighbour entry"
                };
                log::info!("backend {}: {what}", b.addr);
                changed_ring |= l2.is_some() != old.is_some();
                self.write_backend(vi, bi)?;
            }
            if changed_ring {
                self.rebuild_ring(vi)?;
            }
        }
        Ok(())
    }

    /// Releases ids and ring regions whose quarantine is over.
    pub fn release_retired(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(t, _)| now - *t >= QUARANTINE);
        self.retired = keep;
        for (_, r) in due {
            match r {
                Retired::Rings(rings) => rings.release(&mut self.slab),
                Retired::Extent(off, len) => self.slab.release(off, len),
                Retired::VipId(id) => self.vip_ids.give_back(id),
                Retired::BackendId(id) => self.backend_ids.give_back(id),
                Retired::RuleId(id) => self.rule_ids.give_back(id),
            }
        }
    }

    // ---- firewall --------------------------------------------------------------------

    /// Drops every packet from `net` from now on.
    pub fn add_rule(&mut self, net: IpNet) -> Result<()> {
        model::check_cidr(&net)?;
        if self.rules.iter().any(|(n, _)| *n == net) {
            bail!("{net} is already in the drop list (`lb firewall list` shows the rules)");
        }
        let id = match self.adoption.rules.remove(&net) {
            Some(id) => id,
            None => {
                let full = || anyhow!("drop list full ({MAX_FIREWALL_RULES} rules)");
                fresh_id(
                    &mut self.dp,
                    &mut self.rule_ids,
                    CounterId::FirewallRule,
                    full,
                )?
                .0
            }
        };
        self.dp.set_firewall_rule(&net, id)?;
        self.rules.push((net, id));
        self.version += 1;
        Ok(())
    }

    pub fn del_rule(&mut self, net: IpNet) -> Result<()> {
        let pos = self
            .rules
            .iter()
            .position(|(n, _)| *n == net)
            .ok_or_else(|| {
                anyhow!("{net} is not in the drop list: `lb firewall list` shows the rules")
            })?;
        let (_, id) = self.rules.remove(pos);
        self.dp.del_firewall_rule(&net)?;
        self.retired.push((Instant::now(), Retired::RuleId(id)));
        self.version += 1;
        Ok(())
    }

    // ---- configuration ---------------------------------------------------------------

    /// The running state as a configuration file says it.
    pub fn config(&self) -> Config {
        Config {
            vips: self.vips.iter().map(VipState::config).collect(),
            firewall: FirewallConfig {
                drop: self.rules.iter().map(|(net, _)| *net).collect(),
            },
            flow_sync: self.flow_sync.clone(),
            ..Default::default()
        }
    }
}

/// A Maglev VIP's ring is always the full table; round robin grows as needed.
fn ring_capacity(algo: Algo, len: u32) -> u32 {
    match algo {
        Algo::Maglev => model::MAGLEV_TABLE_SIZE,
        Algo::Rr | Algo::Leastconn => len.max(INITIAL_RING_CAPACITY).next_power_of_two(),
    }
}

/// A least-connections ring: (backend id, weight) pairs, one per backend that can take new
/// flows, all of them (the data plane compares a rotating window of them per new flow).
fn leastconn_ring(members: &[RingMember]) -> Vec<u32> {
    let members = members.iter().filter(|m| m.weight > 0);
    members.flat_map(|m| [m.id, m.weight]).collect()
}
