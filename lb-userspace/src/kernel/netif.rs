//! What the kernel knows about reaching a backend: egress interface (FIB), the backend's MAC
//! (neighbour table) and the interface's own MAC. Read over rtnetlink, in the agent's
//! network namespace (sysfs may show another one under `nsenter`).

use std::{collections::HashMap, ffi::CString, net::IpAddr};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAttribute, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Interface index by name; a one-line error when it does not exist.
pub fn index(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| anyhow!("bad interface name {name:?}"))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface named {name}"),
        i => Ok(i),
    }
}

pub use crate::model::{L2Path, Reach};

/// Why a backend cannot be reached at L2 (yet).
#[derive(Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// The route goes through a gateway: direct server return needs backends on-link.
    NotOnLink(String),
    /// No usable neighbour entry yet (being resolved, or failed).
    NoNeighbour { ifindex: u32 },
}

impl From<std::result::Result<L2Path, Unresolved>> for Reach {
    fn from(r: std::result::Result<L2Path, Unresolved>) -> Self {
        match r {
            Ok(l2) => Reach {
                l2: Some(l2),
                note: None,
            },
            Err(Unresolved::NotOnLink(why)) => Reach {
                l2: None,
                note: Some(format!(
                    "{why}: direct server return needs backends on a local link"
                )),
            },
            Err(Unresolved::NoNeighbour { ifindex }) => Reach {
                l2: None,
                note: Some(format!(
                    "MAC address not resolved yet (interface {ifindex})"
                )),
            },
        }
    }
}

/// What the kernel said of reaching one backend.
pub type Resolved = std::result::Result<L2Path, Unresolved>;

/// Route lookups in flight at once while resolving many backends: netlink requests are
/// answered in order, so pipelining hides the round trips.
const ROUTE_LOOKUPS_IN_FLIGHT: usize = 128;
/// Up to this many backends are looked up one `RTM_GETNEIGH` each; more, with one dump.
const FEW_ADDRESSES: usize = 16;

/// Talks rtnetlink; one per agent.
pub struct Netif {
    handle: Handle,
}

impl Netif {
    /// Opens a netlink connection; its I/O runs on the current tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The egress interface for `addr`, if it is directly connected.
    pub async fn route(&self, addr: IpAddr) -> Result<std::result::Result<u32, Unresolved>> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, prefix)
            .map_err(|e| anyhow!("{e}"))?
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        let Some(route) = routes
            .try_next()
            .await
            .with_context(|| format!("no route to {addr}"))?
        else {
            bail!("no route to {addr}");
        };
        match route.header.kind {
            RouteType::Unicast => {}
            RouteType::Local => bail!("{addr} is an address of this host, not a backend"),
            kind => bail!("{addr} is not a unicast destination ({kind:?})"),
        }
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(gw) => {
                    return Ok(Err(Unresolved::NotOnLink(format!(
                        "{addr} is routed via {gw:?}"
                    ))));
                }
                _ => {}
            }
        }
        oif.map(Ok)
            .ok_or_else(|| anyhow!("route to {addr} has no output interface"))
    }

    /// The MAC address of interface `ifindex`.
    pub async fn link_mac(&self, ifindex: u32) -> Result<[u8; 6]> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await?
            .ok_or_else(|| anyhow!("interface {ifindex} vanished"))?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => mac.as_slice().try_into().ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("interface {ifindex} has no Ethernet address"))
    }

    /// The id of the XDP program attached to `ifindex`, if any.
    pub async fn xdp_prog_id(&self, ifindex: u32) -> Result<Option<u32>> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await?
            .ok_or_else(|| anyhow!("interface {ifindex} vanished"))?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The neighbour entry for `addr` on `ifindex`, if the kernel has a usable one: one
    /// `RTM_GETNEIGH` for that address (Linux 5.0), not a dump of the whole table.
    pub async fn neighbour(&self, ifindex: u32, addr: IpAddr) -> Result<Option<[u8; 6]>> {
        let mut message = NeighbourMessage::default();
        message.header.ifindex = ifindex;
        message.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message
            .attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(message));
        request.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut answers = handle
            .request(request)
            .map_err(|e| anyhow!("asking for the neighbour {addr}: {e}"))?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                    return Ok(usable_neighbour(&n).map(|(_, _, mac)| mac));
                }
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(None),
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => return Ok(None),
                NetlinkPayload::Error(e) => bail!("asking for the neighbour {addr}: {e}"),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Every usable neighbour entry, from one dump of the table.
    pub async fn neighbours(&self) -> Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let mut out = HashMap::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(n) = dump.try_next().await? {
            if let Some((ifindex, addr, mac)) = usable_neighbour(&n) {
                out.insert((ifindex, addr), mac);
            }
        }
        Ok(out)
    }

    /// Resolves many backends at once: one neighbour dump, one link query per interface
    /// and the route lookups pipelined. What the kernel does not know yet it is asked to
    /// resolve (see `provoke_resolution`), so a later pass finds it.
    pub async fn resolve_many(&self, addrs: &[IpAddr]) -> Result<HashMap<IpAddr, Resolved>> {
        use futures::StreamExt as _;
        if addrs.is_empty() {
            return Ok(HashMap::new());
        }
        // A dump costs the whole table; a few addresses are cheaper asked one by one.
        let neighbours = if addrs.len() > FEW_ADDRESSES {
            Some(self.neighbours().await?)
        } else {
            None
        };
        let routes: Vec<(IpAddr, Result<std::result::Result<u32, Unresolved>>)> =
            futures::stream::iter(addrs.iter().copied())
                .map(|addr| async move { (addr, self.route(addr).await) })
                .buffer_unordered(ROUTE_LOOKUPS_IN_FLIGHT)
                .collect()
                .await;
        let mut links: HashMap<u32, [u8; 6]> = HashMap::new();
        let mut out = HashMap::with_capacity(addrs.len());
        for (addr, route) in routes {
            let ifindex = match route? {
                Ok(i) => i,
                Err(why) => {
                    out.insert(addr, Err(why));
                    continue;
                }
            };
            let src_mac = match links.get(&ifindex) {
                Some(mac) => *mac,
                None => {
                    let mac = self.link_mac(ifindex).await?;
                    links.insert(ifindex, mac);
                    mac
                }
            };
            let dst_mac = match &neighbours {
                Some(all) => all.get(&(ifindex, addr)).copied(),
                None => self.neighbour(ifindex, addr).await?,
            };
            let reach = match dst_mac {
                Some(dst_mac) => Ok(L2Path {
                    ifindex,
                    src_mac,
                    dst_mac,
                }),
                None => {
                    provoke_resolution(addr);
                    Err(Unresolved::NoNeighbour { ifindex })
                }
            };
            out.insert(addr, reach);
        }
        Ok(out)
    }
}

/// The kernel resolves a neighbour when it has something to send to it. One empty UDP
/// datagram to the discard port is the least intrusive such thing: no connection, no
/// payload, and the backend answers at most with an ICMP error.
fn provoke_resolution(addr: IpAddr) {
    let bind: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    if let Ok(sock) = std::net::UdpSocket::bind(bind) {
        let _ = sock.send_to(&[], (addr, 9));
    }
}

/// Interface, address and MAC of a neighbour entry the data plane can use.
fn usable_neighbour(n: &NeighbourMessage) -> Option<(u32, IpAddr, [u8; 6])> {
    let usable = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut dst = None;
    let mut lladdr = None;
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                dst = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                dst = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => {
                lladdr = <[u8; 6]>::try_from(mac.as_slice()).ok()
            }
            _ => {}
        }
    }
    Some((n.header.ifindex, dst?, lladdr?))
}
