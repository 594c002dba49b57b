//! The loaded XDP program and typed access to its maps.
//!
//! Everything the agent writes into the kernel goes through here, so the map layout is
//! known in exactly one place on this side (the other being lb-ebpf).

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    Backend, Counters, FlowKey, FlowValue, PROGRAM_NAME, REASON_COUNT, VipAddr, VipKey, VipMeta,
    maps,
};

/// The XDP program with its maps, loaded into the kernel (attached or not).
pub struct Datapath {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, VipAddr, u32>,
    ring_slab: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    // aya reads LRU hash maps through its HashMap type.
    flows: HashMap<MapData, FlowKey, FlowValue>,
    tx_ports: DevMapHash<MapData>,
    vip_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    links: Vec<XdpLinkId>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the program"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the embedded program and creates its maps; nothing is attached yet.
    pub fn load() -> Result<Self> {
        Self::load_with(&mut EbpfLoader::new())
    }

    /// Loads with a caller-prepared loader (map sizes, pin paths).
    pub fn load_with(loader: &mut EbpfLoader<'_>) -> Result<Self> {
        raise_memlock_limit();
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .context("loading the XDP program into the kernel (root or CAP_BPF needed)")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        Ok(Self {
            vips: take(&mut ebpf, maps::VIPS)?,
            vip_addrs: take(&mut ebpf, maps::VIP_ADDRS)?,
            ring_slab: take(&mut ebpf, maps::RING_SLAB)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            flows: take(&mut ebpf, maps::FLOWS)?,
            tx_ports: take(&mut ebpf, maps::TX_PORTS)?,
            vip_stats: take(&mut ebpf, maps::VIP_STATS)?,
            backend_stats: take(&mut ebpf, maps::BACKEND_STATS)?,
            reason_stats: take(&mut ebpf, maps::REASON_STATS)?,
            ebpf,
            links: Vec::new(),
        })
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attaches to an interface by name. `generic` selects the kernel's SKB mode, for NICs
    /// whose drivers have no native XDP.
    pub fn attach(&mut self, iface: &str, generic: bool) -> Result<()> {
        let mode = if generic {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        let index = crate::netif::index(iface)?;
        let link = self
            .program()
            .attach(index, mode)
            .with_context(|| format!("attaching XDP to {iface} ({mode:?} mode)"))?;
        self.links.push(link);
        Ok(())
    }

    /// Detaches from every interface this instance attached to.
    pub fn detach_all(&mut self) -> Result<()> {
        for link in std::mem::take(&mut self.links) {
            self.program().detach(link)?;
        }
        Ok(())
    }

    /// Runs the program once on `frame` with BPF_PROG_TEST_RUN; returns the XDP action and
    /// the frame as the program left it.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Like `test_run`, returning the kernel-measured run time too (for benchmarks).
    pub fn test_run_timed(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        let result = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((result.return_value, result.duration))
    }

    // ---- configuration maps ----

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).context("writing VIPS")
    }

    pub fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("deleting from VIPS")
    }

    pub fn set_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        self.vip_addrs
            .insert(addr, &1, 0)
            .context("writing VIP_ADDRS")
    }

    pub fn del_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        self.vip_addrs
            .remove(addr)
            .context("deleting from VIP_ADDRS")
    }

    /// Writes `ring` into the slab starting at `off`.
    pub fn write_ring(&mut self, off: u32, ring: &[u32]) -> Result<()> {
        for (i, backend_id) in ring.iter().enumerate() {
            self.ring_slab
                .set(off + i as u32, backend_id, 0)
                .context("writing RING_SLAB")?;
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .context("writing BACKENDS")
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends.get(&id, 0).context("reading BACKENDS")
    }

    /// Makes `ifindex` a redirect target; idempotent.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding interface {ifindex} to TX_PORTS"))
    }

    // ---- counters and flows ----

    fn sum(map: &PerCpuArray<MapData, Counters>, index: u32) -> Result<Counters> {
        let per_cpu = map.get(&index, 0)?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<Counters> {
        Self::sum(&self.vip_stats, vip_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters> {
        Self::sum(&self.backend_stats, backend_id)
    }

    /// Counters per `lb_common::Reason`, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<Counters>> {
        (0..REASON_COUNT)
            .map(|i| Self::sum(&self.reason_stats, i))
            .collect()
    }

    /// Zeroes a VIP's or backend's counters when its id is given to a new one.
    pub fn reset_counters(&mut self, vip_id: Option<u32>, backend_id: Option<u32>) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero =
            || aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus.get() as usize]);
        if let Some(id) = vip_id {
            self.vip_stats.set(id, zero()?, 0)?;
        }
        if let Some(id) = backend_id {
            self.backend_stats.set(id, zero()?, 0)?;
        }
        Ok(())
    }

    /// Flows currently pinned to each backend id (walks the flow table: for the CLI, not
    /// for hot paths).
    pub fn flows_per_backend(&self) -> std::collections::HashMap<u32, u64> {
        let mut counts = std::collections::HashMap::new();
        for (_, value) in self.flows.iter().flatten() {
            *counts.entry(value.backend_id).or_insert(0) += 1;
        }
        counts
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    /// The program's file descriptor, for callers that pin or inspect it.
    pub fn program_fd(&mut self) -> Result<std::os::fd::OwnedFd> {
        let fd = self.program().fd()?.as_fd().try_clone_to_owned()?;
        Ok(fd)
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lifting it is harmless after.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}
