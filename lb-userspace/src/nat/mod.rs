//! The agent's side of full NAT (`mode = "nat"`; the data plane is lb-ebpf/src/nat.rs):
//! each family's SNAT address (configured, or the source address the kernel would use
//! toward a NAT backend) written into the data plane, and the sweeper that expires
//! translations ([`sweep`]). Its counts are in `lb stats` and the metrics.
//!
//! ```toml
//! [nat]
//! snat_v4 = "10.0.0.2"     # default: the egress interface's address toward a backend
//! snat_v6 = "fd00::2"
//! port_first = 1024        # the SNAT ports (default 1024-32767: below Linux's
//! port_last = 32767        # ephemeral range, so the host's own connections never collide)
//! ```

pub mod sweep;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use futures::TryStreamExt as _;
use lb_common::{FAMILY_V4, FAMILY_V6, NatSnat};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use serde::{Deserialize, Serialize};

use crate::{api::Agent, kernel::datapath::monotonic_ns, model::Mode};

pub use sweep::{Swept, Timeouts};

/// `[nat]` in the configuration file; read at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_v6: Option<Ipv6Addr>,
    #[serde(default = "default_port_first")]
    pub port_first: u16,
    #[serde(default = "default_port_last")]
    pub port_last: u16,
}

fn default_port_first() -> u16 {
    1024
}

/// Below Linux's default ephemeral range (32768-60999): the health checks and the host's
/// own connections from the same address never take a port a translation holds.
fn default_port_last() -> u16 {
    32767
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            snat_v4: None,
            snat_v6: None,
            port_first: default_port_first(),
            port_last: default_port_last(),
        }
    }
}

impl NatConfig {
    pub fn validate(&self) -> Result<()> {
        if self.port_first == 0 || self.port_first > self.port_last {
            bail!(
                "[nat] ports {}-{}: the first must be at least 1 and not above the last",
                self.port_first,
                self.port_last
            );
        }
        Ok(())
    }

    fn snat(&self, addr: IpAddr) -> NatSnat {
        NatSnat {
            addr: lb_common::addr_to_map(addr).0,
            port_first: self.port_first,
            port_last: self.port_last,
            _pad: 0,
        }
    }
}

/// What the sweeper saw last and the data plane's allocation counters as of then, for
/// `lb stats` and the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Translations in the tables at the last sweep.
    pub entries: AtomicU64,
    pub expired: AtomicU64,
    pub orphans: AtomicU64,
    pub allocated: AtomicU64,
    pub collisions: AtomicU64,
    pub exhausted: AtomicU64,
}

/// `nat` in `lb stats --json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// Translations (flows) in the tables at the last sweep.
    pub entries: u64,
    /// Translations made, each with its SNAT port.
    pub allocated: u64,
    /// Ports found taken while allocating.
    pub collisions: u64,
    /// New flows that found no free port (also `drop_nat_ports_exhausted`).
    pub exhausted: u64,
    /// Translations removed idle, and lone halves removed.
    pub expired: u64,
    pub orphans: u64,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        StatsView {
            entries: self.entries.load(Relaxed),
            allocated: self.allocated.load(Relaxed),
            collisions: self.collisions.load(Relaxed),
            exhausted: self.exhausted.load(Relaxed),
            expired: self.expired.load(Relaxed),
            orphans: self.orphans.load(Relaxed),
        }
    }
}

impl StatsView {
    /// One line for `lb stats`.
    pub fn summary(&self) -> String {
        format!(
            "NAT: {} translations; {} allocated, {} port collisions, {} exhausted; {} expired, {} orphans removed",
            self.entries,
            self.allocated,
            self.collisions,
            self.exhausted,
            self.expired,
            self.orphans
        )
    }
}

static AGENT_STATS: OnceLock<Arc<Stats>> = OnceLock::new();

/// The running agent's NAT counts (none before its first sweep).
pub fn agent_stats() -> Option<&'static Arc<Stats>> {
    AGENT_STATS.get()
}

/// How often translations are swept and the SNAT addresses looked at.
const TICK: Duration = Duration::from_secs(2);

/// Writes each family's SNAT address into the data plane: the configured one, else the
/// source address the kernel picks toward the first NAT backend of the family. A family
/// with neither keeps none (its new NAT flows are dropped, counted as `drop_nat_no_snat`).
/// Run at start, after every change (so a new NAT VIP's first flows find it) and every
/// `TICK` (a route that changed).
pub async fn refresh_snat(agent: &Agent) -> Result<()> {
    let config = &agent.nat;
    let backends: Vec<IpAddr> = {
        let state = agent.state.lock().await;
        state
            .vips()
            .iter()
            .filter(|v| v.mode == Mode::Nat)
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect()
    };
    if backends.is_empty() && config.snat_v4.is_none() && config.snat_v6.is_none() {
        return Ok(()); // no NAT here: nothing to look up
    }
    for family in [FAMILY_V4, FAMILY_V6] {
        let configured = match family {
            FAMILY_V4 => config.snat_v4.map(IpAddr::from),
            _ => config.snat_v6.map(IpAddr::from),
        };
        let addr = match configured {
            Some(a) => Some(a),
            None => {
                let toward = backends
                    .iter()
                    .find(|b| b.is_ipv4() == (family == FAMILY_V4));
                match toward {
                    Some(b) => source_toward(*b).await?,
                    None => None,
                }
            }
        };
        let want = addr.map(|a| config.snat(a)).unwrap_or_default();
        let mut state = agent.state.lock().await;
        let dp = state.dataplane_mut();
        if dp.nat_snat(family)? != want {
            if let Some(a) = addr {
                log::info!(
                    "NAT: SNAT address {a}, ports {}-{}",
                    want.port_first,
                    want.port_last
                );
            }
            dp.set_nat_snat(family, &want)?;
        }
    }
    Ok(())
}

/// The source address the kernel would give a connection to `dst` (the route's preferred
/// source), if it routes there at all.
async fn source_toward(dst: IpAddr) -> Result<Option<IpAddr>> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let prefix = if dst.is_ipv4() { 32 } else { 128 };
    let msg = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .map_err(|e| anyhow!("{e}"))?
        .build();
    let found = handle.route().get(msg).execute().try_next().await;
    task.abort();
    let Ok(Some(route)) = found else {
        return Ok(None);
    };
    Ok(route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    }))
}

/// Every `TICK`: the SNAT addresses, then a sweep of the translation tables (through
/// handles of its own: the agent's lock is not held while walking).
pub async fn run(agent: Arc<Agent>) {
    let stats = AGENT_STATS.get_or_init(Default::default).clone();
    let tables = agent.state.lock().await.dataplane().nat_tables();
    let mut tables = match tables {
        Ok(t) => t,
        Err(e) => {
            log::warn!("NAT: no handle on the translation tables: {e:#}");
            return;
        }
    };
    let timeouts = Timeouts::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = refresh_snat(&agent).await {
            log::warn!("NAT: SNAT address: {e:#}");
        }
        match agent.state.lock().await.dataplane().nat_counters() {
            Ok(c) => {
                stats.allocated.store(c.allocated, Relaxed);
                stats.collisions.store(c.collisions, Relaxed);
                stats.exhausted.store(c.exhausted, Relaxed);
            }
            Err(e) => log::warn!("NAT: reading counters: {e:#}"),
        }
        let swept =
            tokio::task::block_in_place(|| sweep::sweep(&mut tables, monotonic_ns(), &timeouts));
        match swept {
            Ok(s) => {
                stats.entries.store(s.live, Relaxed);
                stats.expired.fetch_add(s.expired, Relaxed);
                stats.orphans.fetch_add(s.orphans, Relaxed);
            }
            Err(e) => log::warn!("NAT: sweeping translations: {e:#}"),
        }
    }
}
