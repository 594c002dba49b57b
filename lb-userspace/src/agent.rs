//! The agent: owns the loaded data plane, turns VIP/backend changes into map writes, keeps
//! backend MACs current from the kernel, runs health checks, serves the control socket, and
//! writes every accepted change back to the configuration file.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, Backend, MAX_BACKENDS,
    MAX_FIREWALL_RULES, MAX_VIPS, RING_SLAB_LEN, Reason, VIP_F_HASH, VipAddr, VipMeta,
};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, mpsc},
    task::JoinHandle,
};

use crate::{
    config::{BackendConfig, Config, FirewallConfig, VipConfig},
    control::{self, Request, Response},
    datapath::{CounterId, Datapath},
    health::{self, CheckKind, CheckPatch, CheckSpec, Health},
    model::{self, Algo, IdPool, RateLimit, RingMember, RingRegions, Service, SlabAllocator},
    monitor::{self, FlowCounts},
    netif::{L2Path, Netif, Unresolved},
    status::{self, BackendSnapshot, LastCheck, Snapshot, VipSnapshot},
};

/// Ring capacity a round-robin VIP starts with; grown when its backends outgrow it.
const INITIAL_RING_CAPACITY: u32 = 64;
/// How long `backend add` waits for the kernel to resolve the backend's MAC before
/// answering, so traffic can flow the moment the command returns.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);
/// Slab regions and ids are reused only after this long, so a packet that read the old
/// ring or backend just before a flip never sees them repurposed.
const QUARANTINE: Duration = Duration::from_millis(500);
/// How often unresolved backends are retried; resolved ones are re-checked every
/// `FULL_REFRESH_TICKS` ticks (MAC or interface changes).
const REFRESH_TICK: Duration = Duration::from_millis(250);
const FULL_REFRESH_TICKS: u32 = 20;

pub struct Options {
    pub ifaces: Vec<String>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub generic: bool,
    /// bpffs directory for maps and attachments; None runs unpinned.
    pub pin_dir: Option<PathBuf>,
    /// On a clean stop, leave the program attached and forwarding.
    pub keep_forwarding: bool,
    /// Where to serve /metrics and the status page; None: nowhere.
    pub metrics: Option<std::net::SocketAddr>,
}

struct BackendState {
    addr: IpAddr,
    id: u32,
    generation: u32,
    l2: Option<L2Path>,
    /// Why it cannot take traffic, for `backend list`.
    note: Option<String>,
    weight: u32,
    backup: bool,
    drain: bool,
    /// Replaces the VIP's check for this backend.
    check: Option<CheckSpec>,
    health: Health,
    checker: Option<JoinHandle<()>>,
}

impl BackendState {
    /// May take new flows.
    fn eligible(&self) -> bool {
        self.l2.is_some() && self.health.up && !self.drain && self.weight > 0
    }

    fn state(&self) -> &'static str {
        if self.l2.is_none() {
            "unresolved"
        } else if !self.health.up {
            "down"
        } else if self.drain {
            "draining"
        } else {
            "up"
        }
    }
}

impl Drop for BackendState {
    fn drop(&mut self) {
        if let Some(c) = self.checker.take() {
            c.abort();
        }
    }
}

struct VipState {
    service: Service,
    id: u32,
    algo: Algo,
    check: CheckSpec,
    rate: RateLimit,
    backends: Vec<BackendState>,
    rings: RingRegions,
    ring_len: u32,
}

enum Retired {
    Rings(RingRegions),
    Extent(u32, u32),
    VipId(u32),
    BackendId(u32),
    RuleId(u32),
}

/// What an earlier agent left in pinned maps, looked up while re-applying the config.
#[derive(Default)]
struct Adoption {
    vips: HashMap<lb_common::VipKey, VipMeta>,
    backends: HashMap<(u32, IpAddr), (u32, Backend)>,
    rules: HashMap<IpNet, u32>,
}

pub struct Agent {
    datapath: Datapath,
    netif: Netif,
    config_path: PathBuf,
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
    reports: mpsc::Sender<health::Report>,
    adoption: Adoption,
    /// While the configuration is applied at start, rings are built once at the end: an
    /// earlier agent's program may still be forwarding with the pinned maps meanwhile.
    defer_rings: bool,
    /// Cached flow-table walks (monitoring, `lb stats`); set by `run`.
    flow_counts: Option<Arc<FlowCounts>>,
}

impl Agent {
    fn new(
        datapath: Datapath,
        netif: Netif,
        config_path: PathBuf,
        reports: mpsc::Sender<health::Report>,
    ) -> Self {
        Self {
            datapath,
            netif,
            config_path,
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
            adoption: Adoption::default(),
            defer_rings: false,
            flow_counts: None,
        }
    }

    fn vip_index(&self, service: &Service) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| v.service == *service)
            .ok_or_else(|| anyhow!("no VIP {service}"))
    }

    fn backend_index(&self, service: &Service, addr: IpAddr) -> Result<(usize, usize)> {
        let vi = self.vip_index(service)?;
        let bi = self.vips[vi]
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| anyhow!("backend {addr} does not serve VIP {service}"))?;
        Ok((vi, bi))
    }

    // ---- adopting pinned state -------------------------------------------------------

    /// Reads what a previous agent left in the pinned maps. Ids and generations found there
    /// are kept for the same VIPs and backends, so pinned flows stay valid; the rings the
    /// data plane reads now are fenced off until every VIP has flipped to a new one.
    fn prepare_adoption(&mut self) {
        for (id, b) in self.datapath.backend_entries() {
            self.backend_ids.seed(id, b.generation);
            if b.flags & BACKEND_F_IN_USE != 0 {
                let addr = model::addr_from_map(b.addr, b.family);
                self.adoption.backends.insert((b.vip_id, addr), (id, b));
            }
        }
        self.adoption.rules = self.datapath.firewall_entries().into_iter().collect();
        for (key, meta) in self.datapath.vip_entries() {
            if meta.ring_len > 0 && self.slab.reserve(meta.ring_off, meta.ring_len) {
                self.retired.push((
                    Instant::now(),
                    Retired::Extent(meta.ring_off, meta.ring_len),
                ));
            }
            self.adoption.vips.insert(key, meta);
        }
    }

    /// After the config is applied: whatever pinned state it did not claim is removed.
    fn finish_adoption(&mut self) -> Result<()> {
        let adoption = std::mem::take(&mut self.adoption);
        for key in adoption.vips.keys() {
            if !self.vips.iter().any(|v| v.service.key() == *key) {
                self.datapath.del_vip(key)?;
            }
        }
        for net in adoption.rules.keys() {
            self.datapath.del_firewall_rule(net)?;
        }
        for (id, b) in adoption.backends.values() {
            self.datapath.set_backend(
                *id,
                &Backend {
                    generation: b.generation,
                    ..Default::default()
                },
            )?;
        }
        for addr in self.datapath.vip_addr_entries() {
            if !self.vip_addr_refs.contains_key(&addr) {
                self.datapath.del_vip_addr(&addr)?;
            }
        }
        Ok(())
    }

    // ---- changes ---------------------------------------------------------------------

    pub fn add_vip(
        &mut self,
        service: Service,
        algo: Algo,
        check: CheckSpec,
        rate: RateLimit,
    ) -> Result<()> {
        if self.vip_index(&service).is_ok() {
            bail!("VIP {service} already exists");
        }
        check.validate()?;
        rate.validate()?;
        let adopted = self.adoption.vips.get(&service.key()).copied();
        let id = match adopted {
            Some(meta) if self.vip_ids.adopt(meta.vip_id, 1) => meta.vip_id,
            _ => {
                let (id, _) = self
                    .vip_ids
                    .take()
                    .ok_or_else(|| anyhow!("VIP table full ({MAX_VIPS})"))?;
                self.datapath.reset_counters(CounterId::Vip(id))?;
                id
            }
        };
        let Some(rings) = RingRegions::alloc(&mut self.slab, ring_capacity(algo, 0)) else {
            self.vip_ids.give_back(id);
            bail!("ring slab full: remove unused VIPs first");
        };
        let addr_key = service.addr_key();
        let refs = self.vip_addr_refs.entry(addr_key).or_insert(0);
        if *refs == 0 {
            self.datapath.set_vip_addr(&addr_key)?;
        }
        *refs += 1;
        self.vips.push(VipState {
            service,
            id,
            algo,
            check,
            rate,
            backends: Vec::new(),
            rings,
            ring_len: 0,
        });
        self.rebuild_ring(self.vips.len() - 1)
    }

    pub fn set_vip(
        &mut self,
        service: &Service,
        algo: Option<Algo>,
        patch: &CheckPatch,
        rate_limit: Option<u32>,
        burst: Option<u32>,
    ) -> Result<()> {
        let vi = self.vip_index(service)?;
        let check = patch.apply(&self.vips[vi].check)?;
        let rate = match (rate_limit, burst) {
            (None, None) => self.vips[vi].rate,
            (Some(r), b) => RateLimit::new(r, b),
            (None, Some(b)) => RateLimit {
                burst: b,
                ..self.vips[vi].rate
            },
        };
        rate.validate()?;
        let vip = &mut self.vips[vi];
        let check_changed = check != vip.check;
        vip.check = check;
        vip.rate = rate;
        if let Some(algo) = algo {
            vip.algo = algo;
        }
        if check_changed {
            for bi in 0..self.vips[vi].backends.len() {
                if self.vips[vi].backends[bi].check.is_none() {
                    self.restart_checker(vi, bi)?;
                }
            }
        }
        self.rebuild_ring(vi)
    }

    pub fn del_vip(&mut self, service: &Service) -> Result<()> {
        let index = self.vip_index(service)?;
        self.datapath.del_vip(&service.key())?;
        let vip = self.vips.remove(index);
        let addr_key = service.addr_key();
        if let Some(refs) = self.vip_addr_refs.get_mut(&addr_key) {
            *refs -= 1;
            if *refs == 0 {
                self.vip_addr_refs.remove(&addr_key);
                self.datapath.del_vip_addr(&addr_key)?;
            }
        }
        let now = Instant::now();
        for b in &vip.backends {
            self.datapath.set_backend(
                b.id,
                &Backend {
                    generation: b.generation,
                    ..Default::default()
                },
            )?;
            self.retired.push((now, Retired::BackendId(b.id)));
        }
        self.retired.push((now, Retired::Rings(vip.rings)));
        self.retired.push((now, Retired::VipId(vip.id)));
        Ok(())
    }

    /// Adds a backend, with what the kernel said of reaching it (see `resolve`).
    pub fn add_backend(
        &mut self,
        service: &Service,
        config: &BackendConfig,
        (l2, note): (Option<L2Path>, Option<String>),
    ) -> Result<()> {
        let BackendConfig {
            address: addr,
            weight,
            backup,
            drain,
            ref check,
        } = *config;
        let vi = self.vip_index(service)?;
        self.validate_new_backend(vi, config)?;
        let vip_id = self.vips[vi].id;
        // An adopted backend that had lost KEEP_FLOWS was down when the previous agent
        // stopped (only failed health checks clear the flag).
        let (id, generation, was_down) = match self.adoption.backends.remove(&(vip_id, addr)) {
            Some((id, b)) if self.backend_ids.adopt(id, b.generation) => {
                (id, b.generation, b.flags & BACKEND_F_KEEP_FLOWS == 0)
            }
            _ => {
                let taken = self.backend_ids.take();
                let (id, generation) =
                    taken.ok_or_else(|| anyhow!("backend table full ({MAX_BACKENDS})"))?;
                self.datapath.reset_counters(CounterId::Backend(id))?;
                (id, generation, false)
            }
        };
        self.vips[vi].backends.push(BackendState {
            addr,
            id,
            generation,
            l2,
            note,
            weight,
            backup,
            drain,
            check: check.clone(),
            health: Health::default(),
            checker: None,
        });
        let bi = self.vips[vi].backends.len() - 1;
        self.restart_checker(vi, bi)?;
        // A restart keeps a backend that was down out of rotation until `rise` good checks
        // (unless it has no check any more, which would leave it down for good), instead of
        // sending new flows to a dead backend until `fall` checks find out again.
        let b = &mut self.vips[vi].backends[bi];
        if was_down && b.checker.is_some() {
            b.health.up = false;
        }
        self.write_backend(vi, bi)?;
        self.rebuild_ring(vi)
    }

    fn validate_new_backend(&self, vi: usize, config: &BackendConfig) -> Result<()> {
        let (service, addr) = (&self.vips[vi].service, config.address);
        config.validate(service)?;
        if self.vips[vi].backends.iter().any(|b| b.addr == addr) {
            bail!("backend {addr} already serves VIP {service}");
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
        let check = if patch.is_empty() {
            None
        } else {
            let vip = &self.vips[vi];
            Some(patch.apply(vip.backends[bi].check.as_ref().unwrap_or(&vip.check))?)
        };
        let b = &mut self.vips[vi].backends[bi];
        if let Some(w) = weight {
            b.weight = w;
        }
        if let Some(backup) = backup {
            b.backup = backup;
        }
        if check.is_some() {
            b.check = check;
            self.restart_checker(vi, bi)?;
        }
        self.rebuild_ring(vi)
    }

    pub fn drain_backend(&mut self, service: &Service, addr: IpAddr, drain: bool) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        self.vips[vi].backends[bi].drain = drain;
        self.write_backend(vi, bi)?;
        self.rebuild_ring(vi)
    }

    pub fn del_backend(&mut self, service: &Service, addr: IpAddr) -> Result<()> {
        let (vi, bi) = self.backend_index(service, addr)?;
        let backend = self.vips[vi].backends.remove(bi);
        // Out of the ring first, so no new flow picks it while it is being cleared; its
        // pinned flows then find it not in use and are re-balanced.
        self.rebuild_ring(vi)?;
        self.datapath.set_backend(
            backend.id,
            &Backend {
                generation: backend.generation,
                ..Default::default()
            },
        )?;
        self.retired
            .push((Instant::now(), Retired::BackendId(backend.id)));
        Ok(())
    }

    /// The backend's L2 path, waiting up to `wait` for the kernel to resolve it; or a note
    /// saying why it cannot take traffic yet.
    async fn resolve(
        &self,
        addr: IpAddr,
        wait: Duration,
    ) -> Result<(Option<L2Path>, Option<String>)> {
        Ok(match self.netif.resolve_within(addr, wait).await? {
            Ok(l2) => (Some(l2), None),
            Err(Unresolved::NotOnLink(why)) => (
                None,
                Some(format!(
                    "{why}: direct server return needs backends on a local link"
                )),
            ),
            Err(Unresolved::NoNeighbour { ifindex }) => (
                None,
                Some(format!(
                    "MAC address not resolved yet (interface {ifindex})"
                )),
            ),
        })
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
        if b.health.up {
            entry.flags |= BACKEND_F_KEEP_FLOWS;
        }
        if let Some(l2) = b.l2 {
            if !self.tx_ports.contains(&l2.ifindex) {
                self.datapath.add_tx_port(l2.ifindex)?;
                self.tx_ports.push(l2.ifindex);
            }
            entry.ifindex = l2.ifindex;
            entry.mac = l2.dst_mac;
            entry.src_mac = l2.src_mac;
            entry.flags |= BACKEND_F_RESOLVED;
        }
        self.datapath.set_backend(b.id, &entry)
    }

    fn restart_checker(&mut self, vi: usize, bi: usize) -> Result<()> {
        let vip = &self.vips[vi];
        let spec = vip.backends[bi]
            .check
            .clone()
            .unwrap_or_else(|| vip.check.clone());
        let port = vip.service.addr.port();
        let b = &mut self.vips[vi].backends[bi];
        if let Some(c) = b.checker.take() {
            c.abort();
        }
        let was_up = b.health.up;
        b.health = Health::default();
        if spec.check != CheckKind::None {
            b.checker = Some(health::spawn_checker(
                b.id,
                b.generation,
                b.addr,
                port,
                spec,
                self.reports.clone(),
            ));
        }
        if !was_up {
            self.write_backend(vi, bi)?;
        }
        Ok(())
    }

    /// Applies a health check result; a backend that changes between up and down is
    /// rewritten and its VIP's ring rebuilt.
    fn on_report(&mut self, report: health::Report) -> Result<()> {
        let found = self.vips.iter().enumerate().find_map(|(vi, v)| {
            v.backends
                .iter()
                .position(|b| b.id == report.backend_id && b.generation == report.generation)
                .map(|bi| (vi, bi))
        });
        let Some((vi, bi)) = found else { return Ok(()) };
        let vip = &mut self.vips[vi];
        let spec = vip.backends[bi].check.as_ref().unwrap_or(&vip.check);
        if spec.check == CheckKind::None {
            return Ok(()); // a result still in flight from a checker that was stopped
        }
        let (rise, fall) = (spec.rise, spec.fall);
        let service = vip.service;
        let b = &mut vip.backends[bi];
        let detail = report.outcome.detail.clone();
        if b.health.record(report.outcome, rise, fall) {
            log::warn!(
                "backend {} of {service} is {} ({detail})",
                b.addr,
                if b.health.up { "UP" } else { "DOWN" }
            );
            self.write_backend(vi, bi)?;
            self.rebuild_ring(vi)?;
        }
        Ok(())
    }

    /// Builds the VIP's ring from the backends that can take new flows (primaries, or the
    /// backups while no primary can), writes it into the region the data plane is not
    /// reading, then flips the VIP to it with one map update.
    fn rebuild_ring(&mut self, index: usize) -> Result<()> {
        if self.defer_rings {
            return Ok(());
        }
        let vip = &self.vips[index];
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
        };
        let len = ring.len() as u32;
        let mut rings = vip.rings;
        if len > rings.capacity {
            let grown = RingRegions::alloc(&mut self.slab, ring_capacity(vip.algo, len))
                .ok_or_else(|| anyhow!("ring slab full"))?;
            self.retired.push((Instant::now(), Retired::Rings(rings)));
            rings = RingRegions { active: 1, ..grown };
        }
        let off = rings.inactive_off();
        self.datapath.write_ring(off, &ring)?;
        let (rate_interval_ns, rate_burst_ns) = vip.rate.gcra_ns();
        let meta = VipMeta {
            vip_id: vip.id,
            ring_off: off,
            ring_len: len,
            flags,
            rate_interval_ns,
            rate_burst_ns,
        };
        self.datapath.set_vip(&vip.service.key(), &meta)?;
        rings.active = 1 - rings.active;
        let vip = &mut self.vips[index];
        vip.rings = rings;
        vip.ring_len = len;
        Ok(())
    }

    /// Re-resolves backends (all of them, or only the unresolved) and updates the data plane
    /// where the kernel's answer changed; releases quarantined ids and ring regions.
    async fn refresh(&mut self, all: bool) -> Result<()> {
        for vi in 0..self.vips.len() {
            let mut changed_ring = false;
            for bi in 0..self.vips[vi].backends.len() {
                let (addr, old) = {
                    let b = &self.vips[vi].backends[bi];
                    (b.addr, b.l2)
                };
                if old.is_some() && !all {
                    continue;
                }
                let (l2, note) = self.resolve(addr, Duration::ZERO).await?;
                let b = &mut self.vips[vi].backends[bi];
                b.note = note;
                if l2 != old {
                    b.l2 = l2;
                    self.write_backend(vi, bi)?;
                    changed_ring |= l2.is_some() != old.is_some();
                    let what = if l2.is_some() {
                        "resolved"
                    } else {
                        "lost its neighbour entry"
                    };
                    log::info!("backend {addr}: {what}");
                }
            }
            if changed_ring {
                self.rebuild_ring(vi)?;
            }
        }
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
        Ok(())
    }

    // ---- firewall --------------------------------------------------------------------

    /// Drops every packet from `net` from now on.
    pub fn add_rule(&mut self, net: IpNet) -> Result<()> {
        model::check_cidr(&net)?;
        if self.rules.iter().any(|(n, _)| *n == net) {
            bail!("{net} is already in the drop list");
        }
        let id = match self.adoption.rules.remove(&net) {
            Some(id) if self.rule_ids.adopt(id, 1) => id,
            _ => {
                let (id, _) = self
                    .rule_ids
                    .take()
                    .ok_or_else(|| anyhow!("drop list full ({MAX_FIREWALL_RULES} rules)"))?;
                self.datapath.reset_counters(CounterId::FirewallRule(id))?;
                id
            }
        };
        self.datapath.set_firewall_rule(&net, id)?;
        self.rules.push((net, id));
        Ok(())
    }

    pub fn del_rule(&mut self, net: IpNet) -> Result<()> {
        let pos = self
            .rules
            .iter()
            .position(|(n, _)| *n == net)
            .ok_or_else(|| anyhow!("{net} is not in the drop list"))?;
        let (_, id) = self.rules.remove(pos);
        self.datapath.del_firewall_rule(&net)?;
        self.retired.push((Instant::now(), Retired::RuleId(id)));
        Ok(())
    }

    fn rule_list(&self) -> Result<serde_json::Value> {
        let mut out = Vec::new();
        for (net, id) in &self.rules {
            let c = self.datapath.firewall_counters(*id)?;
            out.push(json!({"cidr": net.to_string(), "packets": c.packets, "bytes": c.bytes}));
        }
        Ok(out.into())
    }

    // ---- configuration ---------------------------------------------------------------

    fn config(&self) -> Config {
        Config {
            vips: self
                .vips
                .iter()
                .map(|v| VipConfig {
                    address: v.service.addr,
                    proto: v.service.proto,
                    algo: v.algo,
                    check: v.check.clone(),
                    rate_limit: v.rate.rate_limit,
                    burst: v.rate.burst,
                    backends: v
                        .backends
                        .iter()
                        .map(|b| BackendConfig {
                            address: b.addr,
                            weight: b.weight,
                            backup: b.backup,
                            drain: b.drain,
                            check: b.check.clone(),
                        })
                        .collect(),
                })
                .collect(),
            firewall: FirewallConfig {
                drop: self.rules.iter().map(|(net, _)| *net).collect(),
            },
        }
    }

    async fn apply_config(&mut self, config: &Config) -> Result<()> {
        // Ask the kernel about every backend first and give it a moment to answer, so
        // backends are written complete (after a restart the neighbours are known already).
        let deadline = Instant::now() + RESOLVE_WAIT;
        let mut resolved = HashMap::new();
        for addr in config
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .map(|b| b.address)
        {
            if !resolved.contains_key(&addr) {
                resolved.insert(addr, self.resolve(addr, Duration::ZERO).await?);
            }
        }
        while Instant::now() < deadline && resolved.values().any(|(l2, _)| l2.is_none()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for (addr, r) in resolved.iter_mut().filter(|(_, (l2, _))| l2.is_none()) {
                *r = self.resolve(*addr, Duration::ZERO).await?;
            }
        }
        self.defer_rings = true;
        let applied = async {
            for net in &config.firewall.drop {
                self.add_rule(*net)?;
            }
            for vc in &config.vips {
                let service = Service::new(vc.address, vc.proto)?;
                self.add_vip(service, vc.algo, vc.check.clone(), vc.rate())?;
                for bc in &vc.backends {
                    self.add_backend(&service, bc, resolved[&bc.address].clone())
                        .with_context(|| format!("VIP {service}"))?;
                }
            }
            anyhow::Ok(())
        }
        .await;
        self.defer_rings = false;
        applied?;
        for vi in 0..self.vips.len() {
            self.rebuild_ring(vi)?;
        }
        Ok(())
    }

    // ---- requests --------------------------------------------------------------------

    pub async fn handle(&mut self, request: Request) -> Response {
        let mutates = !matches!(
            request,
            Request::VipList | Request::BackendList { .. } | Request::Stats | Request::FirewallList
        );
        let result = self.dispatch(request).await;
        match result {
            Ok(response) if mutates => match self.config().save(&self.config_path) {
                Ok(()) => response,
                Err(e) => Response::Error {
                    error: format!("applied, but the configuration was not saved: {e:#}"),
                },
            },
            Ok(response) => response,
            Err(e) => Response::Error {
                error: format!("{e:#}"),
            },
        }
    }

    async fn dispatch(&mut self, request: Request) -> Result<Response> {
        Ok(match request {
            Request::VipAdd {
                vip,
                proto,
                algo,
                check,
                rate_limit,
                burst,
            } => {
                let service = Service::new(vip, proto)?;
                let check = check.apply(&CheckSpec::default())?;
                let rate = RateLimit::new(rate_limit.unwrap_or(0), burst);
                self.add_vip(service, algo.unwrap_or_default(), check, rate)?;
                Response::message(format!("added VIP {service}"))
            }
            Request::VipSet {
                vip,
                proto,
                algo,
                check,
                rate_limit,
                burst,
            } => {
                let service = Service { addr: vip, proto };
                self.set_vip(&service, algo, &check, rate_limit, burst)?;
                Response::message(format!("updated VIP {service}"))
            }
            Request::VipDel { vip, proto } => {
                let service = Service { addr: vip, proto };
                self.del_vip(&service)?;
                Response::message(format!("removed VIP {service}"))
            }
            Request::BackendAdd {
                vip,
                proto,
                backend,
                weight,
                backup,
                check,
            } => {
                let service = Service { addr: vip, proto };
                let vi = self.vip_index(&service)?;
                let config = BackendConfig {
                    address: backend,
                    weight: weight.unwrap_or(1),
                    backup: backup.unwrap_or(false),
                    drain: false,
                    check: if check.is_empty() {
                        None
                    } else {
                        Some(check.apply(&self.vips[vi].check)?)
                    },
                };
                // Validate before waiting on the kernel: a refused command answers at once.
                self.validate_new_backend(vi, &config)?;
                let resolution = self.resolve(backend, RESOLVE_WAIT).await?;
                let note = resolution.1.clone();
                self.add_backend(&service, &config, resolution)?;
                Response::message(match note {
                    None => format!("added backend {backend} to VIP {service}"),
                    Some(n) => format!(
                        "added backend {backend} to VIP {service}; no traffic until resolved: {n}"
                    ),
                })
            }
            Request::BackendSet {
                vip,
                proto,
                backend,
                weight,
                backup,
                check,
            } => {
                let service = Service { addr: vip, proto };
                self.set_backend(&service, backend, weight, backup, &check)?;
                Response::message(format!("updated backend {backend} of VIP {service}"))
            }
            Request::BackendDrain {
                vip,
                proto,
                backend,
                drain,
            } => {
                let service = Service { addr: vip, proto };
                self.drain_backend(&service, backend, drain)?;
                let (vi, bi) = self.backend_index(&service, backend)?;
                let id = self.vips[vi].backends[bi].id;
                let flows = self
                    .datapath
                    .flows_per_backend()
                    .get(&id)
                    .copied()
                    .unwrap_or(0);
                Response::message(if drain {
                    format!("draining backend {backend} of VIP {service}: {flows} flows remain")
                } else {
                    format!("backend {backend} of VIP {service} takes new flows again")
                })
            }
            Request::BackendDel {
                vip,
                proto,
                backend,
            } => {
                let service = Service { addr: vip, proto };
                self.del_backend(&service, backend)?;
                Response::message(format!("removed backend {backend} from VIP {service}"))
            }
            Request::VipList => Response::data(self.vip_list()?),
            Request::BackendList { vip, proto } => {
                let filter = vip.map(|addr| Service { addr, proto });
                if let Some(f) = &filter {
                    self.vip_index(f)?;
                }
                Response::data(self.backend_list(filter.as_ref())?)
            }
            Request::Stats => Response::data(self.stats()?),
            Request::FirewallAdd { cidr } => {
                self.add_rule(cidr)?;
                Response::message(format!("dropping packets from {cidr}"))
            }
            Request::FirewallDel { cidr } => {
                self.del_rule(cidr)?;
                Response::message(format!("no longer dropping packets from {cidr}"))
            }
            Request::FirewallList => Response::data(self.rule_list()?),
        })
    }

    fn vip_list(&self) -> Result<serde_json::Value> {
        let mut out = Vec::new();
        for v in &self.vips {
            let c = self.datapath.vip_counters(v.id)?;
            out.push(json!({
                "vip": v.service.addr.to_string(),
                "proto": v.service.proto,
                "algo": v.algo,
                "check": v.check.check,
                "rate_limit": v.rate.rate_limit,
                "burst": v.rate.burst,
                "backends": v.backends.len(),
                "active_backends": v.backends.iter().filter(|b| b.eligible()).count(),
                "packets": c.packets,
                "bytes": c.bytes,
                "new_flows": c.new_flows,
            }));
        }
        Ok(out.into())
    }

    fn backend_list(&self, filter: Option<&Service>) -> Result<serde_json::Value> {
        self.backend_list_with(filter, &self.datapath.flows_per_backend())
    }

    /// Like `backend_list`, with the flows per backend id given.
    fn backend_list_with(
        &self,
        filter: Option<&Service>,
        flows: &HashMap<u32, u64>,
    ) -> Result<serde_json::Value> {
        let mut out = Vec::new();
        for v in self
            .vips
            .iter()
            .filter(|v| filter.is_none_or(|f| *f == v.service))
        {
            for b in &v.backends {
                let c = self.datapath.backend_counters(b.id)?;
                let last = b.health.last.as_ref();
                out.push(json!({
                    "vip": v.service.addr.to_string(),
                    "proto": v.service.proto,
                    "address": b.addr.to_string(),
                    "state": b.state(),
                    "weight": b.weight,
                    "backup": b.backup,
                    "role": if b.backup { "backup" } else { "primary" },
                    "drain": b.drain,
                    "check": b.check.as_ref().unwrap_or(&v.check).check,
                    "last_check": last.map(|o| if o.ok { "ok" } else { "failed" }),
                    "last_check_detail": last.map(|o| o.detail.clone()),
                    "check_latency_us": last.map(|o| o.latency_us),
                    "mac": b.l2.map(|l| mac_string(&l.dst_mac)),
                    "ifindex": b.l2.map(|l| l.ifindex),
                    "note": b.note,
                    "packets": c.packets,
                    "bytes": c.bytes,
                    "new_flows": c.new_flows,
                    "flows": flows.get(&b.id).copied().unwrap_or(0),
                }));
            }
        }
        Ok(out.into())
    }

    fn stats(&self) -> Result<serde_json::Value> {
        let reasons = self.datapath.reason_counters()?;
        let mut by_reason = serde_json::Map::new();
        for (r, c) in Reason::ALL.iter().zip(&reasons) {
            by_reason.insert(
                r.name().into(),
                json!({"packets": c.packets, "bytes": c.bytes}),
            );
        }
        // Flows from the cached walk (`serve` renews it outside the lock when it is old):
        // `lb stats --watch` asks every second, and a walk of a full table takes a while.
        let cached = self.flow_counts.as_ref().and_then(|f| f.latest());
        let backends = match cached {
            Some(scan) => {
                let flows = self
                    .vips
                    .iter()
                    .flat_map(|v| &v.backends)
                    .map(|b| (b.id, scan.per_backend.get(&(b.id, b.generation)).copied()))
                    .map(|(id, n)| (id, n.unwrap_or(0)))
                    .collect();
                self.backend_list_with(None, &flows)?
            }
            None => self.backend_list(None)?,
        };
        Ok(json!({
            "vips": self.vip_list()?,
            "backends": backends,
            "reasons": by_reason,
            "firewall": self.rule_list()?,
        }))
    }

    /// State and counters for monitoring: no flow-table walk, so cheap under the lock.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut vips = Vec::with_capacity(self.vips.len());
        for v in &self.vips {
            // As `rebuild_ring` picks: primaries that can take flows, else such backups.
            let primaries = v.backends.iter().any(|b| !b.backup && b.eligible());
            let mut backends = Vec::with_capacity(v.backends.len());
            for b in &v.backends {
                backends.push(BackendSnapshot {
                    addr: b.addr,
                    id: b.id,
                    generation: b.generation,
                    state: b.state(),
                    healthy: b.health.up,
                    weight: b.weight,
                    backup: b.backup,
                    drain: b.drain,
                    in_rotation: b.eligible() && b.backup != primaries,
                    check: b.check.as_ref().unwrap_or(&v.check).check.to_string(),
                    last_check: b.health.last.as_ref().map(|o| LastCheck {
                        ok: o.ok,
                        latency_us: o.latency_us,
                        detail: o.detail.clone(),
                    }),
                    note: b.note.clone(),
                    counters: self.datapath.backend_counters(b.id)?.into(),
                });
            }
            vips.push(VipSnapshot {
                addr: v.service.addr,
                proto: v.service.proto,
                algo: v.algo,
                check: v.check.check.to_string(),
                counters: self.datapath.vip_counters(v.id)?.into(),
                backends,
            });
        }
        let reasons = self.datapath.reason_counters()?;
        let mut firewall = Vec::with_capacity(self.rules.len());
        for (net, id) in &self.rules {
            let counters = self.datapath.firewall_counters(*id)?.into();
            firewall.push(status::RuleSnapshot {
                cidr: net.to_string(),
                counters,
            });
        }
        Ok(Snapshot {
            time: status::unix_now(),
            vips,
            reasons: reasons.into_iter().map(Into::into).collect(),
            firewall,
        })
    }
}

/// A Maglev VIP's ring is always the full table; round robin grows as needed.
fn ring_capacity(algo: Algo, len: u32) -> u32 {
    match algo {
        Algo::Maglev => model::MAGLEV_TABLE_SIZE,
        Algo::Rr => len.max(INITIAL_RING_CAPACITY).next_power_of_two(),
    }
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---- running ---------------------------------------------------------------------------

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<()> {
    if opts.ifaces.is_empty() {
        bail!("no interface given: --iface IF[,IF...]");
    }
    for iface in &opts.ifaces {
        crate::netif::index(iface)?;
    }
    let config = Config::load(&opts.config)?;
    let listener = bind_socket(&opts.socket)?;
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(monitor::bind(addr).await?),
        None => None,
    };

    let netif = Netif::new()?;
    let datapath = match &opts.pin_dir {
        Some(dir) => {
            discard_stale_pins(dir, &netif).await?;
            Datapath::load_pinned(dir)?
        }
        None => Datapath::load()?,
    };
    let restarted = datapath.adopted_state();
    let (reports_tx, mut reports_rx) = mpsc::channel(1024);
    let mut agent = Agent::new(datapath, netif, opts.config.clone(), reports_tx);
    if restarted {
        agent.prepare_adoption();
    }
    agent
        .apply_config(&config)
        .await
        .map_err(|e| anyhow!("{}: {e:#}", opts.config.display()))?;
    agent.finish_adoption()?;
    // Attach only once the maps hold the configuration: a pinned attachment is switched to
    // this program atomically, a new one starts forwarding with complete state.
    for iface in &opts.ifaces {
        agent.datapath.attach(iface, opts.generic)?;
        let index = crate::netif::index(iface)?;
        agent.datapath.add_tx_port(index)?;
        agent.tx_ports.push(index);
    }
    for stale in agent.datapath.pinned_ifaces() {
        if !opts.ifaces.contains(&stale) {
            log::info!("detaching from {stale}, which is no longer configured");
            agent.datapath.unpin_link(&stale)?;
        }
    }
    log::info!(
        "{} {} ({} mode); {} VIPs; control socket {}",
        if restarted {
            "took over"
        } else {
            "attached to"
        },
        opts.ifaces.join(","),
        if opts.generic { "generic" } else { "native" },
        agent.vips.len(),
        opts.socket.display()
    );
    let flow_counts = Arc::new(FlowCounts::new(agent.datapath.flow_table()?));
    agent.flow_counts = Some(flow_counts.clone());
    let agent = Arc::new(Mutex::new(agent));
    let monitoring = match metrics_listener {
        Some(l) => {
            log::info!("metrics and status page on http://{}/", l.local_addr()?);
            let info = status::AgentInfo {
                hostname: status::hostname(),
                version: env!("CARGO_PKG_VERSION"),
                attach_mode: if opts.generic { "generic" } else { "native" },
                interfaces: opts.ifaces.clone(),
                started: status::unix_now(),
            };
            monitor::start(l, agent.clone(), flow_counts, info)
        }
        None => Vec::new(),
    };
    let watchdog = crate::service::spawn_watchdog(agent.clone());
    crate::service::ready(&format!("forwarding on {}", opts.ifaces.join(",")));

    let refresher = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_TICK);
            for n in 0u32.. {
                tick.tick().await;
                if let Err(e) = agent
                    .lock()
                    .await
                    .refresh(n % FULL_REFRESH_TICKS == 0)
                    .await
                {
                    log::warn!("neighbour refresh: {e:#}");
                }
            }
        })
    };
    let health = {
        let agent = agent.clone();
        tokio::spawn(async move {
            while let Some(report) = reports_rx.recv().await {
                if let Err(e) = agent.lock().await.on_report(report) {
                    log::warn!("applying a health check result: {e:#}");
                }
            }
        })
    };

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, agent).await {
                            log::debug!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => log::warn!("accept on the control socket: {e}"),
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => crate::service::reload(async {
                Config::load(&opts.config)?;
                Ok(format!("{} is valid; re-applying it at runtime is not built yet", opts.config.display()))
            }).await,
        }
    }
    crate::service::stopping();
    watchdog.inspect(JoinHandle::abort);
    refresher.abort();
    health.abort();
    for task in monitoring {
        task.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    let mut agent = agent.lock().await;
    for vip in &mut agent.vips {
        for b in &mut vip.backends {
            if let Some(c) = b.checker.take() {
                c.abort();
            }
        }
    }
    if opts.keep_forwarding && opts.pin_dir.is_some() {
        log::info!("stopping; the data plane keeps forwarding with the pinned state");
    } else {
        agent.datapath.detach_all()?;
        log::info!("detached; bye");
    }
    Ok(())
}

/// A pinned attachment is live when its interface (in this namespace) runs the program the
/// link points at. Pins whose attachments all died with their interfaces (a deleted
/// namespace whose inode number came round again, a NIC that went away) describe nothing
/// that still forwards: they are removed, maps included, and the agent starts afresh.
async fn discard_stale_pins(dir: &Path, netif: &Netif) -> Result<()> {
    let links_dir = dir.join("links");
    let Ok(entries) = std::fs::read_dir(&links_dir) else {
        return Ok(());
    };
    let (mut live, mut dead) = (0, Vec::new());
    for entry in entries.flatten() {
        let pin = entry.path();
        let iface = entry.file_name().to_string_lossy().into_owned();
        let attached = match crate::netif::index(&iface) {
            Ok(index) => netif.xdp_prog_id(index).await?,
            Err(_) => None,
        };
        let linked = Datapath::pinned_link_program(&pin).unwrap_or(None);
        if linked.is_some() && linked == attached {
            live += 1;
        } else {
            dead.push(pin);
        }
    }
    if live == 0 && !dead.is_empty() {
        log::warn!(
            "{}: pinned state of detached interfaces, discarding it",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    } else {
        for pin in dead {
            log::warn!("{}: attachment gone, unpinning", pin.display());
            std::fs::remove_file(&pin)?;
        }
    }
    Ok(())
}

/// Binds the control socket root-only. A socket file left by a crashed agent is replaced;
/// one that answers belongs to a running agent and is an error.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("an agent is already running on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(read.take(control::MAX_REQUEST_BYTES as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    let response = match control::decode_request(&line) {
        Ok(request) => {
            if request == Request::Stats {
                // Renew an old flow-table walk before taking the agent, not while holding it.
                let counts = agent.lock().await.flow_counts.clone();
                if let Some(counts) = counts
                    && let Err(e) = counts.fresh(monitor::FLOW_SCAN_MAX_AGE).await
                {
                    log::warn!("walking the flow table: {e:#}");
                }
            }
            agent.lock().await.handle(request).await
        }
        Err(error) => Response::Error { error },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
