//! `lb decap`: the backend's end of tunnel and gue VIPs. Attaches the object's second
//! program (`lb_decap`, lb-ebpf/src/decap.rs) to an interface, tells it its VIPs and GUE
//! port, and prints its counters: a line per interval and the totals when stopped
//! (SIGINT/SIGTERM detach it). The VIPs must be on the backend's loopback, as for direct
//! server return: the inner packet is passed up to the host's stack, which answers the
//! client from the VIP.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::{Counters, DECAP_PROGRAM_NAME, DECAP_REASON_COUNT, DecapReason, VipAddr, maps};

/// The decapsulation program with its maps, loaded (attached or not).
pub struct Decap {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipAddr, u32>,
    stats: PerCpuArray<MapData, Counters>,
}

use crate::kernel::datapath::{load_object, take};

impl Decap {
    /// Loads the program; `gue_port` `None` leaves GUE packets alone.
    pub fn load(gue_port: Option<u16>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        // The object's maps are all created at load; the balancer's are not used here, so
        // they are made tiny (the flow table alone would take tens of MB). The ring buffer
        // keeps its size: it must be a multiple of the page size.
        for name in maps::ALL {
            if name != maps::FLOW_EVENTS {
                loader.map_max_entries(name, 64);
            }
        }
        let mut ebpf = load_object(&mut loader, DECAP_PROGRAM_NAME, "the decapsulation program")?;
        let mut port: Array<MapData, u32> = take(&mut ebpf, maps::DECAP_GUE_PORT)?;
        port.set(0, &u32::from(gue_port.unwrap_or(0).to_be()), 0)
            .context("writing DECAP_GUE_PORT")?;
        Ok(Self {
            vips: take(&mut ebpf, maps::DECAP_VIPS)?,
            stats: take(&mut ebpf, maps::DECAP_STATS)?,
            ebpf,
        })
    }

    /// Strips tunnels whose inner destination is `vip`.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<()> {
        let (addr, family) = lb_common::addr_to_map(vip);
        let key = VipAddr {
            addr,
            family,
            _pad: [0; 3],
        };
        self.vips.insert(&key, &0, 0).context("writing DECAP_VIPS")
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(DECAP_PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attaches to `iface` (generic/SKB mode with `generic`) until this is dropped.
    pub fn attach(&mut self, iface: &str, generic: bool) -> Result<()> {
        let mode = crate::kernel::datapath::xdp_mode(generic);
        let index = crate::kernel::netif::index(iface)?;
        self.program()
            .attach(index, mode)
            .with_context(|| format!("attaching the decapsulation program to {iface}"))?;
        Ok(())
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN): the XDP action and the frame
    /// as it left.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        crate::kernel::datapath::run_once(self.program(), frame)
    }

    /// Packets and bytes per `DecapReason`, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counters>> {
        (0..DECAP_REASON_COUNT)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0).context("reading DECAP_STATS")?;
                Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                    new_flows: 0,
                }))
            })
            .collect()
    }
}

/// One line of counters: `decapsulated 12 packets 1.5 KB, pass_not_tunnel 3 ...`.
pub fn counters_line(counters: &[Counters]) -> String {
    DecapReason::ALL
        .iter()
        .zip(counters)
        .map(|(r, c)| format!("{} {} ({} bytes)", r.name(), c.packets, c.bytes))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `lb decap`'s options.
pub struct Options {
    pub iface: String,
    pub vips: Vec<IpAddr>,
    /// Strip GUE on this port too (`--gue-port`; `None`: only IP-in-IP).
    pub gue_port: Option<u16>,
    pub generic: bool,
    /// How often to print the counters; `None`: only at exit.
    pub interval: Option<Duration>,
}

/// Runs `lb decap` in the foreground until SIGINT/SIGTERM, which detach it.
pub async fn run(opts: Options) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut decap = Decap::load(opts.gue_port)?;
    for vip in &opts.vips {
        decap.add_vip(*vip)?;
    }
    decap.attach(&opts.iface, opts.generic)?;
    let gue = opts
        .gue_port
        .map_or(String::new(), |p| format!(", GUE on port {p}"));
    println!(
        "lb decap: attached to {} for {} VIP(s){gue}",
        opts.iface,
        opts.vips.len()
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let period = opts.interval.unwrap_or(Duration::from_secs(86_400));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick(), if opts.interval.is_some() => {
                println!("lb decap: {}", counters_line(&decap.counters()?));
            }
        }
    }
    println!("lb decap: stopped; {}", counters_line(&decap.counters()?));
    // Dropping the program detaches it.
    drop(decap);
    Ok(())
}
