//! The agent: owns the loaded data plane, turns VIP/backend changes into map writes, keeps
//! backend MACs current from the kernel, serves the control socket, and writes every
//! accepted change back to the configuration file.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, Backend, MAX_BACKENDS, MAX_VIPS,
    RING_SLAB_LEN, Reason, VipAddr, VipMeta,
};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{
    config::{BackendConfig, Config, VipConfig},
    control::{self, Request, Response},
    datapath::Datapath,
    model::{self, IdPool, RingRegions, Service, SlabAllocator},
    netif::{L2Path, Netif, Unresolved},
};

/// Ring capacity a new VIP starts with; grown (re-allocated) when its backends outgrow it.
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
}

struct BackendState {
    addr: IpAddr,
    id: u32,
    generation: u32,
    l2: Option<L2Path>,
    /// Why it cannot take traffic yet, for `backend list`.
    note: Option<String>,
}

struct VipState {
    service: Service,
    id: u32,
    backends: Vec<BackendState>,
    rings: RingRegions,
    ring_len: u32,
}

enum Retired {
    Rings(RingRegions),
    VipId(u32),
    BackendId(u32),
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
    tx_ports: Vec<u32>,
    retired: Vec<(Instant, Retired)>,
}

impl Agent {
    fn new(datapath: Datapath, netif: Netif, config_path: PathBuf) -> Self {
        Self {
            datapath,
            netif,
            config_path,
            vips: Vec::new(),
            vip_ids: IdPool::new(MAX_VIPS),
            backend_ids: IdPool::new(MAX_BACKENDS),
            slab: SlabAllocator::new(RING_SLAB_LEN),
            vip_addr_refs: HashMap::new(),
            tx_ports: Vec::new(),
            retired: Vec::new(),
        }
    }

    fn vip(&self, service: &Service) -> Result<&VipState> {
        self.vips
            .iter()
            .find(|v| v.service == *service)
            .ok_or_else(|| anyhow!("no VIP {service}"))
    }

    fn vip_index(&self, service: &Service) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| v.service == *service)
            .ok_or_else(|| anyhow!("no VIP {service}"))
    }

    // ---- changes ---------------------------------------------------------------------

    pub fn add_vip(&mut self, service: Service) -> Result<()> {
        if self.vip(&service).is_ok() {
            bail!("VIP {service} already exists");
        }
        let (id, _) = self
            .vip_ids
            .take()
            .ok_or_else(|| anyhow!("VIP table full ({MAX_VIPS})"))?;
        let Some(rings) = RingRegions::alloc(&mut self.slab, INITIAL_RING_CAPACITY) else {
            self.vip_ids.give_back(id);
            bail!("ring slab full: remove unused VIPs first");
        };
        self.datapath.reset_counters(Some(id), None)?;
        let addr_key = service.addr_key();
        let refs = self.vip_addr_refs.entry(addr_key).or_insert(0);
        if *refs == 0 {
            self.datapath.set_vip_addr(&addr_key)?;
        }
        *refs += 1;
        let meta = VipMeta {
            vip_id: id,
            ring_off: rings.offs[rings.active],
            ring_len: 0,
            flags: 0,
        };
        self.datapath.set_vip(&service.key(), &meta)?;
        self.vips.push(VipState {
            service,
            id,
            backends: Vec::new(),
            rings,
            ring_len: 0,
        });
        Ok(())
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
        for b in &vip.backends {
            self.clear_backend(b)?;
        }
        let now = Instant::now();
        self.retired.push((now, Retired::Rings(vip.rings)));
        self.retired.push((now, Retired::VipId(vip.id)));
        Ok(())
    }

    /// Adds a backend; waits up to `wait` for its MAC so it can take flows at once.
    /// Returns a note when it cannot take traffic yet.
    pub async fn add_backend(
        &mut self,
        service: &Service,
        addr: IpAddr,
        wait: Duration,
    ) -> Result<Option<String>> {
        model::check_unicast(addr, "backend")?;
        let index = self.vip_index(service)?;
        if addr.is_ipv4() != service.addr.is_ipv4() {
            bail!("backend {addr} is not of the same address family as VIP {service}");
        }
        if self.vips[index].backends.iter().any(|b| b.addr == addr) {
            bail!("backend {addr} already serves VIP {service}");
        }
        let (l2, note) = self.resolve(addr, wait).await?;
        let (id, generation) = self
            .backend_ids
            .take()
            .ok_or_else(|| anyhow!("backend table full ({MAX_BACKENDS})"))?;
        let mut backend = BackendState {
            addr,
            id,
            generation,
            l2: None,
            note: None,
        };
        self.datapath.reset_counters(None, Some(id))?;
        self.write_backend(&mut backend, l2, note.clone())?;
        self.vips[index].backends.push(backend);
        self.rebuild_ring(index)?;
        Ok(note)
    }

    pub fn del_backend(&mut self, service: &Service, addr: IpAddr) -> Result<()> {
        let index = self.vip_index(service)?;
        let pos = self.vips[index]
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| anyhow!("backend {addr} does not serve VIP {service}"))?;
        let backend = self.vips[index].backends.remove(pos);
        // Out of the ring first, so no new flow picks it while it is being cleared.
        self.rebuild_ring(index)?;
        self.clear_backend(&backend)?;
        self.retired
            .push((Instant::now(), Retired::BackendId(backend.id)));
        Ok(())
    }

    /// Flows pinned to a cleared backend find it not in use and are re-balanced.
    fn clear_backend(&mut self, b: &BackendState) -> Result<()> {
        self.datapath.set_backend(
            b.id,
            &Backend {
                generation: b.generation,
                ..Default::default()
            },
        )
    }

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

    /// Writes a backend's entry; an unresolved backend stays in use (pinned flows are passed
    /// to the host and counted) but out of the ring.
    fn write_backend(
        &mut self,
        b: &mut BackendState,
        l2: Option<L2Path>,
        note: Option<String>,
    ) -> Result<()> {
        let (addr, family) = model::addr_to_map(b.addr);
        let mut entry = Backend {
            addr,
            family,
            generation: b.generation,
            flags: BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS,
            ..Default::default()
        };
        if let Some(l2) = l2 {
            if !self.tx_ports.contains(&l2.ifindex) {
                self.datapath.add_tx_port(l2.ifindex)?;
                self.tx_ports.push(l2.ifindex);
            }
            entry.ifindex = l2.ifindex;
            entry.mac = l2.dst_mac;
            entry.src_mac = l2.src_mac;
            entry.flags |= BACKEND_F_RESOLVED;
        }
        self.datapath.set_backend(b.id, &entry)?;
        b.l2 = l2;
        b.note = note;
        Ok(())
    }

    /// Writes the VIP's ring into the region the data plane is not reading, then flips the
    /// VIP to it with one map update.
    fn rebuild_ring(&mut self, index: usize) -> Result<()> {
        let vip = &self.vips[index];
        let eligible: Vec<model::RingMember> = vip
            .backends
            .iter()
            .filter(|b| b.l2.is_some())
            .map(|b| model::RingMember {
                id: b.id,
                weight: 1,
                addr: b.addr,
            })
            .collect();
        let ring = model::round_robin_ring(&eligible);
        let len = ring.len() as u32;
        let mut rings = vip.rings;
        if len > rings.capacity {
            let grown = RingRegions::alloc(&mut self.slab, len.next_power_of_two())
                .ok_or_else(|| anyhow!("ring slab full"))?;
            self.retired.push((Instant::now(), Retired::Rings(rings)));
            rings = RingRegions { active: 1, ..grown };
        }
        let off = rings.inactive_off();
        self.datapath.write_ring(off, &ring)?;
        let meta = VipMeta {
            vip_id: vip.id,
            ring_off: off,
            ring_len: len,
            flags: 0,
        };
        self.datapath.set_vip(&vip.service.key(), &meta)?;
        rings.active = 1 - rings.active;
        let vip = &mut self.vips[index];
        vip.rings = rings;
        vip.ring_len = len;
        Ok(())
    }

    /// Re-resolves backends (all of them, or only the unresolved) and updates the data plane
    /// where the kernel's answer changed.
    async fn refresh(&mut self, all: bool) -> Result<()> {
        for index in 0..self.vips.len() {
            let mut changed_ring = false;
            for bi in 0..self.vips[index].backends.len() {
                let (addr, old) = {
                    let b = &self.vips[index].backends[bi];
                    (b.addr, b.l2)
                };
                if old.is_some() && !all {
                    continue;
                }
                let (l2, note) = self.resolve(addr, Duration::ZERO).await?;
                if l2 != old {
                    let mut b = std::mem::replace(
                        &mut self.vips[index].backends[bi],
                        BackendState {
                            addr,
                            id: 0,
                            generation: 0,
                            l2: None,
                            note: None,
                        },
                    );
                    let result = self.write_backend(&mut b, l2, note);
                    self.vips[index].backends[bi] = b;
                    result?;
                    changed_ring |= l2.is_some() != old.is_some();
                    log::info!(
                        "backend {addr}: {}",
                        if l2.is_some() {
                            "resolved"
                        } else {
                            "lost its neighbour"
                        }
                    );
                } else {
                    self.vips[index].backends[bi].note = note;
                }
            }
            if changed_ring {
                self.rebuild_ring(index)?;
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
                Retired::VipId(id) => self.vip_ids.give_back(id),
                Retired::BackendId(id) => self.backend_ids.give_back(id),
            }
        }
        Ok(())
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
                    backends: v
                        .backends
                        .iter()
                        .map(|b| BackendConfig { address: b.addr })
                        .collect(),
                })
                .collect(),
        }
    }

    async fn apply_config(&mut self, config: &Config) -> Result<()> {
        for vc in &config.vips {
            let service = Service::new(vc.address, vc.proto)?;
            self.add_vip(service)?;
            for bc in &vc.backends {
                self.add_backend(&service, bc.address, Duration::ZERO)
                    .await
                    .with_context(|| format!("VIP {service}"))?;
            }
        }
        // Resolution was asked for above; give the kernel a moment to answer.
        let deadline = Instant::now() + RESOLVE_WAIT;
        while Instant::now() < deadline
            && self
                .vips
                .iter()
                .flat_map(|v| &v.backends)
                .any(|b| b.l2.is_none())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.refresh(false).await?;
        }
        Ok(())
    }

    // ---- requests --------------------------------------------------------------------

    pub async fn handle(&mut self, request: Request) -> Response {
        let mutates = !matches!(
            request,
            Request::VipList | Request::BackendList { .. } | Request::Stats
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
            Request::VipAdd { vip, proto } => {
                let service = Service::new(vip, proto)?;
                self.add_vip(service)?;
                Response::message(format!("added VIP {service}"))
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
            } => {
                let service = Service { addr: vip, proto };
                let note = self.add_backend(&service, backend, RESOLVE_WAIT).await?;
                Response::message(match note {
                    None => format!("added backend {backend} to VIP {service}"),
                    Some(n) => format!(
                        "added backend {backend} to VIP {service}; no traffic until resolved: {n}"
                    ),
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
                    self.vip(f)?;
                }
                Response::data(self.backend_list(filter.as_ref())?)
            }
            Request::Stats => Response::data(self.stats()?),
        })
    }

    fn vip_list(&self) -> Result<serde_json::Value> {
        let mut out = Vec::new();
        for v in &self.vips {
            let c = self.datapath.vip_counters(v.id)?;
            out.push(json!({
                "vip": v.service.addr.to_string(),
                "proto": v.service.proto,
                "backends": v.backends.len(),
                "active_backends": v.ring_len,
                "packets": c.packets,
                "bytes": c.bytes,
                "new_flows": c.new_flows,
            }));
        }
        Ok(out.into())
    }

    fn backend_list(&self, filter: Option<&Service>) -> Result<serde_json::Value> {
        let flows = self.datapath.flows_per_backend();
        let mut out = Vec::new();
        for v in self
            .vips
            .iter()
            .filter(|v| filter.is_none_or(|f| *f == v.service))
        {
            for b in &v.backends {
                let c = self.datapath.backend_counters(b.id)?;
                let generation_flows = flows.get(&b.id).copied().unwrap_or(0);
                out.push(json!({
                    "vip": v.service.addr.to_string(),
                    "proto": v.service.proto,
                    "address": b.addr.to_string(),
                    "state": if b.l2.is_some() { "up" } else { "unresolved" },
                    "mac": b.l2.map(|l| mac_string(&l.dst_mac)),
                    "ifindex": b.l2.map(|l| l.ifindex),
                    "note": b.note,
                    "packets": c.packets,
                    "bytes": c.bytes,
                    "new_flows": c.new_flows,
                    "flows": generation_flows,
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
        Ok(json!({
            "vips": self.vip_list()?,
            "backends": self.backend_list(None)?,
            "reasons": by_reason,
        }))
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

    let mut datapath = Datapath::load()?;
    let mut tx_ports = Vec::new();
    for iface in &opts.ifaces {
        datapath.attach(iface, opts.generic)?;
        let index = crate::netif::index(iface)?;
        datapath.add_tx_port(index)?;
        tx_ports.push(index);
    }
    let mut agent = Agent::new(datapath, Netif::new()?, opts.config.clone());
    agent.tx_ports = tx_ports;
    agent
        .apply_config(&config)
        .await
        .map_err(|e| anyhow!("{}: {e:#}", opts.config.display()))?;
    log::info!(
        "attached to {} ({} mode); {} VIPs; control socket {}",
        opts.ifaces.join(","),
        if opts.generic { "generic" } else { "native" },
        agent.vips.len(),
        opts.socket.display()
    );
    let agent = Arc::new(Mutex::new(agent));

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

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
        }
    }
    refresher.abort();
    let _ = std::fs::remove_file(&opts.socket);
    agent.lock().await.datapath.detach_all()?;
    log::info!("detached; bye");
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
        Ok(request) => agent.lock().await.handle(request).await,
        Err(error) => Response::Error { error },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
