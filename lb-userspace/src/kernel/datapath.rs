//! The loaded XDP program and typed access to its maps.
//!
//! Everything the agent writes into the kernel goes through here, so the map layout is
//! known in exactly one place on this side (the other being lb-ebpf).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key as LpmKey},
    programs::{
        TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use ipnet::IpNet;
use lb_common::{
    Backend, Counters, DROP_FILTER_WORDS, FAMILY_V4, FAMILY_V6, FlowKey, FlowValue, MAX_RX_IFACES,
    PROGRAM_NAME, REASON_COUNT, RxIface, VIP_ADDR_FILTER_WORDS, VipAddr, VipKey, VipMeta,
    drop_filter_mark, maps, vip_addr_filter_slot,
};

use super::{batch, layout};

mod affinity;
mod nat;
pub use affinity::{IdleTimeouts, monotonic_ns};
pub use nat::{NatCounters, NatTables};

pub use crate::state::{CounterId, Pinned};

/// The XDP program with its maps, loaded into the kernel (attached or not).
pub struct Datapath {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, VipAddr, u32>,
    vip_addr_filter: Array<MapData, u64>,
    ring_slab: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    // aya reads LRU hash maps through its HashMap type.
    flows: HashMap<MapData, FlowKey, FlowValue>,
    tx_ports: DevMapHash<MapData>,
    vip_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    firewall_v4: LpmTrie<MapData, [u8; 4], u32>,
    firewall_v6: LpmTrie<MapData, [u8; 16], u32>,
    firewall_stats: PerCpuArray<MapData, Counters>,
    drop_filter: Array<MapData, u64>,
    // Source affinity and least connections (see `affinity`).
    persist_stats: PerCpuArray<MapData, u64>,
    active_flows: HashMap<MapData, FlowKey, lb_common::ActiveFlow>,
    backend_active: Array<MapData, u64>,
    // Full NAT (see `nat`).
    nat_snat: Array<MapData, lb_common::NatSnat>,
    nat_fwd: HashMap<MapData, FlowKey, lb_common::NatEntry>,
    nat_rev: HashMap<MapData, FlowKey, lb_common::NatEntry>,
    nat_stats: PerCpuArray<MapData, u64>,
    links: Vec<XdpLinkId>,
    /// Whether the flow table may hold flows: not before the program first runs on maps
    /// this agent created, so rules applied at start skip the walk of an empty table.
    flows_possible: bool,
    /// Set when the maps and links live in bpffs (see `load_pinned`).
    pin_dir: Option<PathBuf>,
    /// The maps were found pinned (an earlier agent's), not created by this one.
    reused_pins: bool,
    /// An upgrade under way: the new maps, pinned here until attached (`finish_upgrade`).
    upgrade: Option<PathBuf>,
}

/// Runs `program` once on `frame` with BPF_PROG_TEST_RUN: the XDP action and the frame as
/// the program left it (room for 256 bytes more: tunnels grow frames).
pub(crate) fn run_once(program: &mut Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// The kernel's SKB mode for `generic` (NICs whose drivers have no native XDP), else the
/// driver's own.
pub(crate) fn xdp_mode(generic: bool) -> XdpMode {
    if generic {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    }
}

/// Every map of the program, for pinning.
const ALL_MAPS: [&str; maps::ALL.len()] = maps::ALL;

/// The embedded object loaded with `loader` (its maps created), and its XDP program
/// `program` through the verifier; `what` names the program in errors.
pub(crate) fn load_object(loader: &mut EbpfLoader<'_>, program: &str, what: &str) -> Result<Ebpf> {
    let mut ebpf = loader
        .load(crate::EBPF_OBJECT)
        .with_context(|| format!("loading {what} (root or CAP_BPF needed)"))?;
    let xdp: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the object"))?
        .try_into()?;
    xdp.load()
        .with_context(|| format!("the kernel verifier rejected {what}"))?;
    Ok(ebpf)
}

/// Takes map `name` out of `ebpf` as the map type `T`.
pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
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
        let mut ebpf = load_object(loader, PROGRAM_NAME, "the XDP program")?;
        Ok(Self {
            vips: take(&mut ebpf, maps::VIPS)?,
            vip_addrs: take(&mut ebpf, maps::VIP_ADDRS)?,
            vip_addr_filter: take(&mut ebpf, maps::VIP_ADDR_FILTER)?,
            ring_slab: take(&mut ebpf, maps::RING_SLAB)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            flows: take(&mut ebpf, maps::FLOWS)?,
            tx_ports: take(&mut ebpf, maps::TX_PORTS)?,
            vip_stats: take(&mut ebpf, maps::VIP_STATS)?,
            backend_stats: take(&mut ebpf, maps::BACKEND_STATS)?,
            reason_stats: take(&mut ebpf, maps::REASON_STATS)?,
            firewall_v4: take(&mut ebpf, maps::FIREWALL_V4)?,
            firewall_v6: take(&mut ebpf, maps::FIREWALL_V6)?,
            firewall_stats: take(&mut ebpf, maps::FIREWALL_STATS)?,
            drop_filter: take(&mut ebpf, maps::DROP_FILTER)?,
            persist_stats: take(&mut ebpf, maps::PERSIST_STATS)?,
            active_flows: take(&mut ebpf, maps::ACTIVE_FLOWS)?,
            backend_active: take(&mut ebpf, maps::BACKEND_ACTIVE)?,
            nat_snat: take(&mut ebpf, maps::NAT_SNAT)?,
            nat_fwd: take(&mut ebpf, maps::NAT_FWD)?,
            nat_rev: take(&mut ebpf, maps::NAT_REV)?,
            nat_stats: take(&mut ebpf, maps::NAT_STATS)?,
            ebpf,
            links: Vec::new(),
            flows_possible: false,
            pin_dir: None,
            reused_pins: false,
            upgrade: None,
        })
    }

    /// The program attached through the link pinned at `pin`, if the pin is there.
    pub fn pinned_link_program(pin: &Path) -> Result<Option<u32>> {
        if !pin.exists() {
            return Ok(None);
        }
        let link = FdLink::from(PinnedLink::from_pin(pin)?);
        Ok(Some(link.info()?.program_id()))
    }

    /// Loads with a flow table of `max_flows` entries (`lb run --max-flows`), unpinned.
    pub fn load_sized(max_flows: u32) -> Result<Self> {
        Self::load_with(EbpfLoader::new().map_max_entries(maps::FLOWS, max_flows))
    }

    /// Loads with every map pinned under `pin_dir/maps`: maps already pinned there (by an
    /// agent that stopped or crashed) are reused with their contents, so flows, counters
    /// and round-robin cursors carry over; missing ones are created and pinned. Pins of
    /// another shape (an older layout, another `max_flows`) are copied into new maps (see
    /// `kernel::layout`), which take over when `finish_upgrade` runs after attaching; pins
    /// this binary cannot read are refused before anything changes.
    pub fn load_pinned(pin_dir: &Path, max_flows: u32) -> Result<Self> {
        let maps_dir = pin_dir.join("maps");
        ensure_bpffs(&maps_dir)?;
        std::fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        layout::discard_next(pin_dir)?;
        let reused_pins = ALL_MAPS.iter().any(|m| maps_dir.join(m).exists());
        if reused_pins {
            layout::check_version(pin_dir)?;
        }
        let mut datapath = match Self::load_pinned_at(&maps_dir, max_flows) {
            Ok(datapath) => datapath,
            Err(e) if reused_pins && layout::is_incompatible_pin(&e) => {
                log::info!(
                    "{}: {e:#}; copying the pinned maps into new ones",
                    pin_dir.display()
                );
                let next = layout::next_dir(pin_dir);
                ensure_bpffs(&next)?;
                let datapath = Self::load_pinned_at(&next, max_flows)
                    .and_then(|dp| {
                        layout::check_copyable(&maps_dir, &next, &ALL_MAPS)?;
                        for name in ALL_MAPS {
                            if maps_dir.join(name).exists() {
                                let n =
                                    layout::copy(&maps_dir.join(name), &next.join(name), false)?;
                                log::debug!("{name}: {n} entries copied");
                            }
                        }
                        Ok(dp)
                    })
                    .inspect_err(|_| {
                        let _ = std::fs::remove_dir_all(&next);
                    })?;
                Self {
                    upgrade: Some(next),
                    ..datapath
                }
            }
            Err(e) => return Err(e),
        };
        if datapath.upgrade.is_none() {
            layout::record(pin_dir)?;
        }
        datapath.pin_dir = Some(pin_dir.to_path_buf());
        datapath.reused_pins = reused_pins;
        // Adopted maps may be in use by the previous agent's program.
        datapath.flows_possible = reused_pins;
        // Pins made before the filter existed have VIP addresses but no filter yet.
        datapath.write_vip_addr_filter()?;
        datapath.write_drop_filter(None)?;
        Ok(datapath)
    }

    fn load_pinned_at(dir: &Path, max_flows: u32) -> Result<Self> {
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, max_flows);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        Self::load_with(&mut loader)
            .with_context(|| format!("loading with maps pinned in {}", dir.display()))
    }

    /// After an upgrade's new maps are attached (see `load_pinned`): copies the flows the
    /// old program made meanwhile, puts the new maps where the old ones were pinned and
    /// records the layout. Nothing to do without an upgrade.
    pub fn finish_upgrade(&mut self) -> Result<()> {
        let (Some(next), Some(pin_dir)) = (self.upgrade.take(), self.pin_dir.clone()) else {
            return Ok(());
        };
        let maps_dir = pin_dir.join("maps");
        let n = layout::copy(&maps_dir.join(maps::FLOWS), &next.join(maps::FLOWS), true)?;
        log::info!("upgraded the pinned maps; {n} flows made during the upgrade copied");
        // NAT translations made meanwhile too, the reverse halves first (as the data plane
        // writes them); maps new in this layout have no pins to copy from.
        for name in [maps::NAT_REV, maps::NAT_FWD] {
            if maps_dir.join(name).exists() {
                layout::copy(&maps_dir.join(name), &next.join(name), true)?;
            }
        }
        let old = pin_dir.join("maps-old");
        std::fs::rename(&maps_dir, &old)
            .with_context(|| format!("moving {}", maps_dir.display()))?;
        std::fs::rename(&next, &maps_dir).with_context(|| format!("moving {}", next.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        layout::record(&pin_dir)
    }

    /// Whether maps came from bpffs with state in them (a restart, not a first start):
    /// any of VIPs, backends, drop rules or VIP addresses, so that state holding only some
    /// of them (drop rules and no VIP, say) is adopted or cleared all the same.
    pub fn adopted_state(&self) -> bool {
        self.reused_pins
            && (self.vips.keys().next().is_some()
                || self.firewall_v4.keys().next().is_some()
                || self.firewall_v6.keys().next().is_some()
                || self.vip_addrs.keys().next().is_some()
                || !self.backend_entries().is_empty())
    }

    fn program(&mut self) -> &mut Xdp {
        // Whoever reaches the program may run it.
        self.flows_possible = true;
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attaches to an interface by name. `generic` selects the kernel's SKB mode, for NICs
    /// whose drivers have no native XDP. With pinning, an attachment pinned by an earlier
    /// agent is switched over to this program in one atomic link update (no packet meets a
    /// detached interface), and a new attachment is pinned so it outlives this process.
    pub fn attach(&mut self, iface: &str, generic: bool) -> Result<()> {
        let mode = xdp_mode(generic);
        let index = super::netif::index(iface)?;
        let link_pin = self.pin_dir.as_ref().map(|d| d.join("links").join(iface));
        if let Some(pin) = link_pin.as_ref().filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(pin)
                .with_context(|| format!("opening the pinned link {}", pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            let id = self
                .program()
                .attach_to_link(link)
                .with_context(|| format!("taking over the XDP attachment of {iface}"))?;
            self.links.push(id);
            return Ok(());
        }
        let id = self
            .program()
            .attach(index, mode)
            .with_context(|| format!("attaching XDP to {iface} ({mode:?} mode)"))?;
        if let Some(pin) = link_pin {
            let link = self.program().take_link(id)?;
            let fd_link = FdLink::try_from(link).map_err(|e| {
                anyhow!("the kernel attached without a BPF link, cannot pin it: {e}")
            })?;
            let pinned = fd_link
                .pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            let id = self.program().attach_to_link(link)?;
            self.links.push(id);
        } else {
            self.links.push(id);
        }
        Ok(())
    }

    /// Interfaces that have a pinned attachment.
    pub fn pinned_ifaces(&self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else {
            return Vec::new();
        };
        std::fs::read_dir(dir.join("links"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the attachment pinned for `iface` (one this agent does not attach any more).
    pub fn unpin_link(&self, iface: &str) -> Result<()> {
        if let Some(dir) = &self.pin_dir {
            let pin = dir.join("links").join(iface);
            let link = PinnedLink::from_pin(&pin)?;
            link.unpin()
                .with_context(|| format!("removing {}", pin.display()))?;
        }
        Ok(())
    }

    /// Detaches from every interface and removes every pin: nothing is left forwarding.
    pub fn detach_all(&mut self) -> Result<()> {
        if let Some(dir) = self.pin_dir.take() {
            // Unpinning first: the links then go when this process lets go of them.
            let _ = std::fs::remove_dir_all(&dir);
        }
        for link in std::mem::take(&mut self.links) {
            self.program().detach(link)?;
        }
        Ok(())
    }

    /// Runs the program once on `frame` with BPF_PROG_TEST_RUN; returns the XDP action and
    /// the frame as the program left it.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(self.program(), frame)
    }

    // ---- configuration maps ----

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).context("writing VIPS")
    }

    pub fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("deleting from VIPS")
    }

    pub fn set_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        // The filter first, so that it covers every address in VIP_ADDRS at every moment.
        let (word, bit) = vip_addr_filter_slot(&addr.addr);
        let old = self
            .vip_addr_filter
            .get(&word, 0)
            .context("reading VIP_ADDR_FILTER")?;
        self.vip_addr_filter
            .set(word, &(old | bit), 0)
            .context("writing VIP_ADDR_FILTER")?;
        self.vip_addrs
            .insert(addr, &1, 0)
            .context("writing VIP_ADDRS")
    }

    pub fn del_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        self.vip_addrs
            .remove(addr)
            .context("deleting from VIP_ADDRS")?;
        self.write_vip_addr_filter()
    }

    /// Rewrites the VIP address filter from VIP_ADDRS: addresses may share a bit, so a
    /// removal recomputes the words rather than clearing one bit.
    fn write_vip_addr_filter(&mut self) -> Result<()> {
        let mut words = [0u64; VIP_ADDR_FILTER_WORDS as usize];
        for addr in self.vip_addrs.keys() {
            let (word, bit) = vip_addr_filter_slot(&addr.context("reading VIP_ADDRS")?.addr);
            words[word as usize] |= bit;
        }
        for (i, want) in (0..).zip(words) {
            if self.vip_addr_filter.get(&i, 0)? != want {
                self.vip_addr_filter
                    .set(i, &want, 0)
                    .context("writing VIP_ADDR_FILTER")?;
            }
        }
        Ok(())
    }

    /// Writes `ring` into the slab starting at `off`, in one batch.
    pub fn write_ring(&mut self, off: u32, ring: &[u32]) -> Result<()> {
        let slots: Vec<u32> = (off..off + ring.len() as u32).collect();
        self.set_ring_slots(&slots, ring)
    }

    /// Writes backend id `ids[i]` into slab slot `slots[i]`, all in one syscall.
    pub fn set_ring_slots(&mut self, slots: &[u32], ids: &[u32]) -> Result<()> {
        let fd = aya::maps::IterableMap::map(&self.ring_slab).fd().as_fd();
        batch::update(fd, slots, ids).context("writing RING_SLAB")
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .context("writing BACKENDS")
    }

    /// Makes `ifindex` a redirect target; idempotent.
    /// Tells the program interface `ifindex`'s own MAC (see `lb_common::RxIface`). Two
    /// interfaces whose indexes share a slot both go unchecked, which is said.
    pub fn set_rx_iface(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::RX_IFACES)
            .ok_or_else(|| anyhow!("map {} missing from the object", maps::RX_IFACES))?;
        let mut slots: Array<&mut MapData, RxIface> = Array::try_from(map)?;
        let slot = ifindex % MAX_RX_IFACES;
        let held = slots.get(&slot, 0)?;
        let entry = if held.ifindex == 0 || held.ifindex == ifindex {
            RxIface {
                ifindex,
                mac,
                _pad: [0; 2],
            }
        } else {
            log::warn!(
                "interfaces {} and {ifindex} share a slot of {}: frames arriving on either \
                 are balanced whatever MAC they were sent to",
                held.ifindex,
                maps::RX_IFACES
            );
            RxIface::default()
        };
        slots
            .set(slot, &entry, 0)
            .with_context(|| format!("writing interface {ifindex}'s MAC"))
    }

    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding interface {ifindex} to TX_PORTS"))
    }

    /// Drops packets from `net` (by source address), counting hits under `rule_id`, and ends
    /// the established flows of its sources: the data plane looks a flow up before the drop
    /// list, so without this they would carry on.
    pub fn set_firewall_rule(&mut self, net: &IpNet, rule_id: u32) -> Result<()> {
        // A lookup keyed by the rule's own prefix finds a rule as wide or wider that holds
        // it: then its sources have no flows left (e.g. rules re-applied at adoption).
        let covered = match net {
            IpNet::V4(n) => self
                .firewall_v4
                .get(&LpmKey::new(n.prefix_len() as u32, n.network().octets()), 0)
                .is_ok(),
            IpNet::V6(n) => self
                .firewall_v6
                .get(&LpmKey::new(n.prefix_len() as u32, n.network().octets()), 0)
                .is_ok(),
        };
        self.write_drop_filter(Some(net))?;
        match net {
            IpNet::V4(n) => self.firewall_v4.insert(
                &LpmKey::new(n.prefix_len() as u32, n.network().octets()),
                &rule_id,
                0,
            ),
            IpNet::V6(n) => self.firewall_v6.insert(
                &LpmKey::new(n.prefix_len() as u32, n.network().octets()),
                &rule_id,
                0,
            ),
        }
        .with_context(|| format!("writing the drop rule {net}"))?;
        if !covered && self.flows_possible {
            // Twice: a packet that passed the drop list just before the rule was written
            // may insert its flow while the first walk runs.
            for _ in 0..2 {
                self.remove_flows_from(net)?;
            }
        }
        Ok(())
    }

    /// Removes every flow whose client address is in `net`.
    fn remove_flows_from(&mut self, net: &IpNet) -> Result<()> {
        let from_net = |k: &FlowKey| {
            let src: std::net::IpAddr = if k.family == FAMILY_V4 {
                std::net::Ipv4Addr::from(k.src[0].to_ne_bytes()).into()
            } else {
                let b = k.src.map(u32::to_ne_bytes).concat();
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")).into()
            };
            net.contains(&src)
        };
        // Collected first: deleting while walking would restart the walk.
        let doomed: Vec<FlowKey> = self.flows.keys().flatten().filter(from_net).collect();
        for key in &doomed {
            // Gone already (evicted, or the data plane replaced it) is as good.
            let _ = self.flows.remove(key);
        }
        Ok(())
    }

    pub fn del_firewall_rule(&mut self, net: &IpNet) -> Result<()> {
        match net {
            IpNet::V4(n) => self
                .firewall_v4
                .remove(&LpmKey::new(n.prefix_len() as u32, n.network().octets())),
            IpNet::V6(n) => self
                .firewall_v6
                .remove(&LpmKey::new(n.prefix_len() as u32, n.network().octets())),
        }
        .with_context(|| format!("deleting the drop rule {net}"))?;
        self.write_drop_filter(None)
    }

    /// Sets the drop filter's bits for the rule `added` (before it is written, so that the
    /// filter covers every rule at every moment), or, given None, rewrites the filter from
    /// the rules in the tries (rules may share a bit, so a removal cannot clear one).
    fn write_drop_filter(&mut self, added: Option<&IpNet>) -> Result<()> {
        let mut words = [0u64; DROP_FILTER_WORDS as usize];
        let rules = match added {
            Some(net) => vec![*net],
            None => self
                .firewall_entries()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        };
        for net in rules {
            let (family, addr) = match net {
                IpNet::V4(n) => (
                    FAMILY_V4,
                    [u32::from_ne_bytes(n.network().octets()), 0, 0, 0],
                ),
                IpNet::V6(n) => {
                    let o = n.network().octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    (FAMILY_V6, [w(0), w(4), w(8), w(12)])
                }
            };
            drop_filter_mark(&mut words, family, &addr, net.prefix_len().into());
        }
        for (i, want) in (0..).zip(words) {
            if added.is_some() && want == 0 {
                continue;
            }
            let old = self.drop_filter.get(&i, 0).context("reading DROP_FILTER")?;
            let new = if added.is_some() { old | want } else { want };
            if new != old {
                self.drop_filter
                    .set(i, &new, 0)
                    .context("writing DROP_FILTER")?;
            }
        }
        Ok(())
    }

    /// Every drop rule in the maps with its id, for adopting pinned state.
    pub fn firewall_entries(&self) -> Vec<(IpNet, u32)> {
        let v4 = self.firewall_v4.iter().flatten().filter_map(|(k, id)| {
            let net = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8).ok()?;
            Some((IpNet::V4(net), id))
        });
        let v6 = self.firewall_v6.iter().flatten().filter_map(|(k, id)| {
            let net = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8).ok()?;
            Some((IpNet::V6(net), id))
        });
        v4.chain(v6).collect()
    }

    pub fn firewall_counters(&self, rule_id: u32) -> Result<Counters> {
        Self::sum(&self.firewall_stats, rule_id)
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

    /// Counters per `lb_common::Reason`, in `Reason::ALL` order: one batched read.
    pub fn reason_counters(&self) -> Result<Vec<Counters>> {
        let mut all = Self::sum_all(&self.reason_stats, REASON_COUNT)?;
        all.resize(REASON_COUNT as usize, Counters::default());
        Ok(all)
    }

    /// Zeroes the counters of a VIP, backend or firewall rule id given to a new one.
    pub fn reset_counters(&mut self, id: CounterId) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero =
            aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus.get() as usize])?;
        match id {
            CounterId::Vip(id) => self.vip_stats.set(id, zero, 0)?,
            CounterId::Backend(id) => self.backend_stats.set(id, zero, 0)?,
            CounterId::FirewallRule(id) => self.firewall_stats.set(id, zero, 0)?,
        }
        Ok(())
    }

    /// Flows currently pinned to each backend id, whatever their generation (walks the
    /// flow table: for tools and tests, not for hot paths).
    pub fn flows_per_backend(&self) -> std::collections::HashMap<u32, u64> {
        let mut counts = std::collections::HashMap::new();
        for ((id, _), n) in super::flows::walk(&self.flows).per_backend {
            *counts.entry(id).or_insert(0) += n;
        }
        counts
    }

    /// Counters of the slots below `upto` of a per-CPU counter array, summed over CPUs,
    /// by index: batched reads (a few thousand slots a syscall), not a syscall per slot.
    fn sum_all(map: &PerCpuArray<MapData, Counters>, upto: u32) -> Result<Vec<Counters>> {
        const CHUNK: usize = 4096;
        if upto == 0 {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
        let fd = aya::maps::IterableMap::map(map).fd().as_fd();
        let chunk = CHUNK.min(upto as usize);
        let rounds = (upto as usize).div_ceil(chunk);
        let mut out = Vec::new();
        batch::lookup::<u32, Counters>(fd, chunk, cpus, rounds, &mut |keys, values| {
            for (i, key) in keys.iter().enumerate() {
                let sum =
                    values[i * cpus..(i + 1) * cpus]
                        .iter()
                        .fold(Counters::default(), |a, c| Counters {
                            packets: a.packets + c.packets,
                            bytes: a.bytes + c.bytes,
                            new_flows: a.new_flows + c.new_flows,
                        });
                let key = *key as usize;
                if out.len() <= key {
                    out.resize(key + 1, Counters::default());
                }
                out[key] = sum;
            }
        })
        .context("reading counters")?;
        Ok(out)
    }

    /// Every pinned entry the adoption of an earlier agent's state looks at.
    pub fn pinned(&self) -> Pinned {
        Pinned {
            vips: self.vip_entries(),
            backends: self.backend_entries(),
            rules: self.firewall_entries(),
            vip_addrs: self.vip_addr_entries(),
        }
    }

    /// A second handle on the flow table (its own file descriptor), so monitoring can walk
    /// it on another thread without holding the agent.
    pub fn flow_table(&self) -> Result<HashMap<MapData, FlowKey, FlowValue>> {
        let fd = aya::maps::IterableMap::map(&self.flows)
            .fd()
            .as_fd()
            .try_clone_to_owned()?;
        let map = aya::maps::Map::from_map_data(MapData::from_fd(fd)?)?;
        Ok(HashMap::try_from(map)?)
    }

    /// Every VIP entry, for adopting pinned state.
    pub fn vip_entries(&self) -> Vec<(VipKey, VipMeta)> {
        self.vips.iter().flatten().collect()
    }

    /// Every backend slot ever used (generation > 0), for adopting pinned state.
    pub fn backend_entries(&self) -> Vec<(u32, Backend)> {
        self.backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.ok().filter(|b| b.generation > 0).map(|b| (i as u32, b)))
            .collect()
    }

    pub fn vip_addr_entries(&self) -> Vec<VipAddr> {
        self.vip_addrs.keys().flatten().collect()
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    /// Pins a flow to a backend as the data plane does for a new flow (one map update per
    /// call): for tools and benchmarks that pre-fill the flow table.
    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        self.flows_possible = true;
        self.flows.insert(key, value, 0).context("writing FLOWS")
    }

    /// The program's file descriptor, for callers that pin or inspect it.
    pub fn program_fd(&mut self) -> Result<std::os::fd::OwnedFd> {
        let fd = self.program().fd()?.as_fd().try_clone_to_owned()?;
        Ok(fd)
    }

    // ---- flow sharing (crate::flowsync) ----

    /// The ring buffer of new flows' pins; it can be taken once.
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        take(&mut self.ebpf, maps::FLOW_EVENTS)
    }

    /// The balancer's end of its tunnels (tunnel and gue modes): outer source addresses
    /// and the GUE port.
    pub fn set_tunnel(&mut self, config: &lb_common::TunnelConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::TUNNEL)
            .ok_or_else(|| anyhow!("map {} missing from the program", maps::TUNNEL))?;
        Array::<_, lb_common::TunnelConfig>::try_from(map)?
            .set(0, config, 0)
            .context("writing TUNNEL")
    }

    /// Whether the data plane writes new flows' pins into the ring buffer.
    pub fn set_flow_sharing(&mut self, on: bool) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::FLOW_SHARE)
            .ok_or_else(|| anyhow!("map {} missing from the program", maps::FLOW_SHARE))?;
        Array::<_, u32>::try_from(map)?
            .set(lb_common::FLOW_SHARE_ON, &u32::from(on), 0)
            .context("writing FLOW_SHARE")
    }

    /// A handle (its own file descriptor) on the per-CPU count of new flows' pins lost to
    /// a full ring buffer, for the flow-sharing task.
    pub fn flow_share_drops(&self) -> Result<PerCpuArray<MapData, u64>> {
        let map = self
            .ebpf
            .map(maps::FLOW_SHARE_DROPS)
            .ok_or_else(|| anyhow!("map {} missing from the program", maps::FLOW_SHARE_DROPS))?;
        let aya::maps::Map::PerCpuArray(data) = map else {
            bail!("map {} is not a per-CPU array", maps::FLOW_SHARE_DROPS);
        };
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(PerCpuArray::try_from(aya::maps::Map::from_map_data(
            MapData::from_fd(fd)?,
        )?)?)
    }
}

/// An exclusive lock (flock) on a pin directory, held for the agent's life: a second agent
/// on the same directory would adopt and then remove the first one's state.
pub struct PinLock(#[allow(dead_code)] std::os::fd::OwnedFd);

impl PinLock {
    /// Locks `dir` (creating it, on bpffs) or fails with one line naming the holder's PID.
    pub fn take(dir: &Path) -> Result<Self> {
        use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
        ensure_bpffs(dir)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("locking {}: {err}", dir.display());
            }
            let holder = lock_holder(dir).map_or("unknown".into(), |pid| pid.to_string());
            bail!(
                "another agent (PID {holder}) runs on {}: stop it first, or give this one \
                 another --pin-dir",
                dir.display()
            );
        }
        Ok(Self(file.into()))
    }
}

/// The PID holding a flock on `path`, from /proc/locks (`N: FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE ...`).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (as bpftool does), and checks
/// that `dir` will be on a bpffs.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out-pointer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: constant NUL-terminated strings.
        if unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            bail!(
                "mounting bpffs on /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    Ok(())
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

/// The kernel's data plane behind the agent state's interface.
impl crate::state::Dataplane for Datapath {
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        Datapath::set_vip(self, key, meta)
    }
    fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        Datapath::del_vip(self, key)
    }
    fn set_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        Datapath::set_vip_addr(self, addr)
    }
    fn del_vip_addr(&mut self, addr: &VipAddr) -> Result<()> {
        Datapath::del_vip_addr(self, addr)
    }
    fn set_ring_slots(&mut self, slots: &[u32], ids: &[u32]) -> Result<()> {
        Datapath::set_ring_slots(self, slots, ids)
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        Datapath::set_backend(self, id, backend)
    }
    fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        Datapath::add_tx_port(self, ifindex)
    }
    fn set_firewall_rule(&mut self, net: &IpNet, rule_id: u32) -> Result<()> {
        Datapath::set_firewall_rule(self, net, rule_id)
    }
    fn del_firewall_rule(&mut self, net: &IpNet) -> Result<()> {
        Datapath::del_firewall_rule(self, net)
    }
    fn reset_counters(&mut self, id: CounterId) -> Result<()> {
        Datapath::reset_counters(self, id)
    }
    fn counters(&self, in_use: crate::state::InUse) -> Result<crate::state::AllCounters> {
        Ok(crate::state::AllCounters {
            vips: Self::sum_all(&self.vip_stats, in_use.vips)?,
            backends: Self::sum_all(&self.backend_stats, in_use.backends)?,
            rules: Self::sum_all(&self.firewall_stats, in_use.rules)?,
            reasons: self.reason_counters()?,
            persisted: self.persisted_flows(in_use.vips)?,
            active: self.active_flows(in_use.backends)?,
        })
    }
}
