//! Keeps the fleet routing table equal to [`super::decide`]'s answer: one host route per
//! announced VIP address (`VIP/32 dev lo`, `VIP/128 dev lo`), which the routing daemon
//! `learn`s and exports over BGP. The table is the agent's alone: whatever else is in it
//! is removed. With `[fleet] track_file` it also keeps keepalived's track file equal to
//! [`super::track::serving`] of the same answer.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::task::JoinHandle;

use super::{VipServing, decide, track};
use crate::api::Agent;

/// How often the announcer looks at the state: the delay between a VIP losing its last
/// backend (or a leave) and its route leaving the table.
pub const TICK: Duration = Duration::from_millis(100);
/// The table is read back from the kernel this often (in ticks), to undo outside changes.
const RESYNC_TICKS: u32 = 50;
/// Whether the program is still attached is asked this often (in ticks).
const ATTACH_CHECK_TICKS: u32 = 10;

/// The fleet routing table over rtnetlink.
pub struct RouteTable {
    handle: Handle,
    table: u32,
    lo: u32,
}

impl RouteTable {
    pub fn open(table: u32) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        let lo = crate::kernel::netif::index("lo")?;
        Ok(Self { handle, table, lo })
    }

    fn message(&self, addr: IpAddr) -> Result<RouteMessage> {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, len)
            .map_err(|e| anyhow!("{e}"))?
            .output_interface(self.lo)
            .table_id(self.table)
            .protocol(RouteProtocol::Static)
            .scope(RouteScope::Link)
            .build())
    }

    /// The host routes in the table now.
    pub async fn list(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let mut dump = self.handle.route().get(query).execute();
            while let Some(route) = dump
                .try_next()
                .await
                .with_context(|| format!("reading routing table {}", self.table))?
            {
                let table = route
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(route.header.table.into());
                if table != self.table {
                    continue;
                }
                let dst = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let Some(dst) = dst {
                    out.insert(dst);
                }
            }
        }
        Ok(out)
    }

    pub async fn announce(&self, addr: IpAddr) -> Result<()> {
        self.handle
            .route()
            .add(self.message(addr)?)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route for {addr} to table {}", self.table))
    }

    /// Removes the route; one already gone is no error.
    pub async fn withdraw(&self, addr: IpAddr) -> Result<()> {
        match self.handle.route().del(self.message(addr)?).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!("removing the route for {addr} from table {}", self.table)
            }),
        }
    }
}

/// Starts the announcer when the configuration names a route table or a track file.
pub fn start(agent: Arc<Agent>) -> Option<JoinHandle<()>> {
    let config = agent.fleet.config();
    config.active().then(|| {
        tokio::spawn(run(
            agent,
            config.route_table,
            config.track_file.map(track::TrackFile::new),
        ))
    })
}

async fn run(agent: Arc<Agent>, table: u32, mut track: Option<track::TrackFile>) {
    let routes = if table == 0 {
        None
    } else {
        match RouteTable::open(table) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("fleet: announcing nothing: {e:#}");
                return;
            }
        }
    };
    // A previous agent's routes are taken over as they are: kept if still right.
    let mut present = BTreeSet::new();
    if let Some(routes) = &routes {
        present = routes.list().await.unwrap_or_else(|e| {
            log::warn!("fleet: {e:#}");
            BTreeSet::new()
        });
        log::info!(
            "fleet: announcing VIP addresses in routing table {table} ({} there already)",
            present.len()
        );
    }
    let mut detached = Vec::new();
    for n in 0u32.. {
        if n % ATTACH_CHECK_TICKS == 0 {
            detached = detached_ifaces(&agent).await;
        }
        if let Some(routes) = &routes
            && n > 0
            && n % RESYNC_TICKS == 0
        {
            match routes.list().await {
                Ok(p) => present = p,
                Err(e) => log::warn!("fleet: {e:#}"),
            }
        }
        let counting = agent.fleet.counting();
        let (vips, packets) = {
            let state = agent.state.lock().await;
            let vips: Vec<VipServing> = state.vips().iter().map(VipServing::of).collect();
            let packets = if counting {
                state
                    .counters()
                    .map(|c| c.vips.iter().map(|v| v.packets).sum::<u64>())
                    .ok()
            } else {
                None
            };
            (vips, packets)
        };
        if let Some(p) = packets {
            agent.fleet.count(p);
        }
        let decision = decide(&vips, agent.fleet.config().left, &detached);
        if let Some(track) = &mut track {
            let serving = track::serving(&decision);
            match track.set(serving) {
                Ok(true) => log::info!(
                    "fleet: VRRP track file says {}",
                    if serving {
                        "1: serving every VIP address"
                    } else {
                        "0: cannot serve every VIP address"
                    }
                ),
                Ok(false) => {}
                // Tried again next tick; keepalived keeps the last value meanwhile.
                Err(e) => log::warn!("fleet: {e:#}"),
            }
        }
        if let Some(routes) = &routes {
            sync_routes(routes, &decision, &mut present).await;
        }
        let written = track.as_ref().and_then(|t| t.written());
        agent.fleet.record(vips, decision, present.clone(), written);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = agent.fleet.wake.notified() => {}
        }
    }
}

/// Adds and removes host routes until the table holds the addresses `decision` serves;
/// `present` is what it holds.
async fn sync_routes(
    routes: &RouteTable,
    decision: &std::collections::BTreeMap<IpAddr, super::WhyNot>,
    present: &mut BTreeSet<IpAddr>,
) {
    let want: BTreeSet<IpAddr> = decision
        .iter()
        .filter(|(_, why)| why.is_none())
        .map(|(a, _)| *a)
        .collect();
    for addr in want.difference(&present.clone()) {
        match routes.announce(*addr).await {
            Ok(()) => {
                log::info!("fleet: announcing {addr}");
                present.insert(*addr);
            }
            Err(e) => log::warn!("fleet: {e:#}"),
        }
    }
    for addr in present.clone().difference(&want) {
        match routes.withdraw(*addr).await {
            Ok(()) => {
                let why = decision
                    .get(addr)
                    .and_then(|w| w.clone())
                    .unwrap_or_else(|| "no VIP on it".into());
                log::info!("fleet: withdrawing {addr}: {why}");
                present.remove(addr);
            }
            Err(e) => log::warn!("fleet: {e:#}"),
        }
    }
}

/// The configured interfaces without an XDP program attached.
async fn detached_ifaces(agent: &Agent) -> Vec<String> {
    let mut out = Vec::new();
    for iface in &agent.info.interfaces {
        let attached = match crate::kernel::netif::index(iface) {
            Ok(i) => matches!(agent.netif.xdp_prog_id(i).await, Ok(Some(_))),
            Err(_) => false,
        };
        if !attached {
            out.push(iface.clone());
        }
    }
    out
}

/// On a clean stop: every route out of the table, so the routers stop sending here, and
/// `0` in the track file, so keepalived hands the VIPs to the backup.
pub async fn withdraw_all(agent: &Agent) {
    let config = agent.fleet.config();
    if let Some(path) = &config.track_file {
        match track::write(path, false) {
            Ok(()) => log::info!("fleet: VRRP track file says 0: stopping"),
            Err(e) => log::error!("fleet: on stop: {e:#}"),
        }
    }
    let table = config.route_table;
    if table == 0 {
        return;
    }
    let result = async {
        let routes = RouteTable::open(table)?;
        let present = routes.list().await?;
        for addr in &present {
            routes.withdraw(*addr).await?;
        }
        anyhow::Ok(present.len())
    }
    .await;
    match result {
        Ok(n) => log::info!("fleet: withdrew {n} VIP addresses from routing table {table}"),
        Err(e) => log::error!("fleet: withdrawing on stop: {e:#}"),
    }
}
