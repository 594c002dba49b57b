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
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteType},
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
    /// No usable route or interface: no route, a blackhole or unreachable route, a local
    /// address, an interface without an Ethernet address. One backend's problem, said in
    /// its note; the others are resolved all the same.
    Unreachable(String),
    /// No usable neighbour entry: being resolved (`failed` false: none yet, or one being
    /// probed), or the kernel gave up on it (`failed`: the backend did not answer).
    NoNeighbour { ifindex: u32, failed: bool },
}

impl From<std::result::Result<L2Path, Unresolved>> for Reach {
    fn from(r: std::result::Result<L2Path, Unresolved>) -> Self {
        let unresolved = |note: String| Reach {
            note: Some(note),
            ..Default::default()
        };
        match r {
            Ok(l2) => Reach {
                l2: Some(l2),
                ..Default::default()
            },
            Err(Unresolved::Unreachable(why)) => unresolved(why),
            Err(Unresolved::NoNeighbour {
                ifindex,
                failed: false,
            }) => Reach {
                note: Some(format!("MAC address being resolved (interface {ifindex})")),
                resolving_on: Some(ifindex),
                ..Default::default()
            },
            Err(Unresolved::NoNeighbour {
                ifindex,
                failed: true,
            }) => unresolved(format!(
                "MAC address not resolved: no answer to ARP/ND (interface {ifindex})"
            )),
        }
    }
}

/// The kernel's route to a backend: its egress interface and, for a routed backend, the
/// gateway (the next hop whose MAC frames go to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    pub via: Option<IpAddr>,
}

impl Route {
    /// The address whose neighbour entry gives the next hop's MAC.
    pub fn next_hop(&self, addr: IpAddr) -> IpAddr {
        self.via.unwrap_or(addr)
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

    /// The egress interface for `addr` and the gateway it is routed through, if any (whose
    /// neighbour entry then gives the next hop's MAC). An address the kernel cannot route
    /// (no route, blackhole, unreachable, local) is that backend's problem (`Unresolved`);
    /// an error is netlink failing.
    pub async fn route(&self, addr: IpAddr) -> Result<std::result::Result<Route, Unresolved>> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, prefix)
            .map_err(|e| anyhow!("{e}"))?
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        let unreachable = |why: String| Ok(Err(Unresolved::Unreachable(why)));
        let route = match routes.try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return unreachable(format!("no route to {addr}")),
            // The kernel answers a lookup it cannot route with an error (ENETUNREACH,
            // EINVAL for a blackhole, EHOSTUNREACH, EACCES for prohibit).
            Err(rtnetlink::Error::NetlinkError(e)) => {
                let why = match -e.raw_code() {
                    libc::EINVAL => "a blackhole route".to_string(),
                    libc::ENETUNREACH => "no route".to_string(),
                    libc::EHOSTUNREACH => "an unreachable route".to_string(),
                    libc::EACCES => "a prohibit route".to_string(),
                    _ => format!("{e}"),
                };
                return unreachable(format!("{addr} cannot be reached: {why}"));
            }
            Err(e) => return Err(e).with_context(|| format!("looking up the route to {addr}")),
        };
        match route.header.kind {
            RouteType::Unicast => {}
            RouteType::Local => {
                return unreachable(format!("{addr} is an address of this host, not a backend"));
            }
            kind => {
                return unreachable(format!(
                    "{addr} is not a unicast destination (route type {kind:?})"
                ));
            }
        }
        let mut oif = None;
        let mut via = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => via = Some(IpAddr::V4(*gw)),
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => via = Some(IpAddr::V6(*gw)),
                RouteAttribute::Gateway(other) => {
                    return unreachable(format!("{addr} is routed via {other:?}, not an IP"));
                }
                _ => {}
            }
        }
        match oif {
            Some(ifindex) => Ok(Ok(Route { ifindex, via })),
            None => unreachable(format!("the route to {addr} has no output interface")),
        }
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

    /// The neighbour entry for `addr` on `ifindex`: one `RTM_GETNEIGH` for that address
    /// (Linux 5.0), not a dump of the whole table.
    pub async fn neighbour(&self, ifindex: u32, addr: IpAddr) -> Result<Neighbour> {
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
                    return Ok(Neighbour::of(&n).1);
                }
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(Neighbour::Absent),
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => {
                    return Ok(Neighbour::Absent);
                }
                NetlinkPayload::Error(e) => bail!("asking for the neighbour {addr}: {e}"),
                _ => {}
            }
        }
        Ok(Neighbour::Absent)
    }

    /// Every neighbour entry, from one dump of the table.
    pub async fn neighbours(&self) -> Result<HashMap<(u32, IpAddr), Neighbour>> {
        let mut out = HashMap::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(n) = dump.try_next().await? {
            if let (Some(key), entry) = Neighbour::of(&n) {
                out.insert(key, entry);
            }
        }
        Ok(out)
    }

    /// Makes the kernel keep the neighbour entry of a backend in use resolved by itself
    /// (NTF_EXT_MANAGED, Linux 5.16): XDP traffic never confirms an entry, so without
    /// this it goes stale and may be garbage-collected, and the backend would look
    /// unresolved while its flows run fine. The entry keeps its MAC while it is re-probed.
    pub async fn keep_neighbour(&self, ifindex: u32, addr: IpAddr, mac: [u8; 6]) -> Result<()> {
        let mut request = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .link_layer_address(&mac)
            // Stale with its MAC: usable at once; being managed, it is probed right away.
            .state(NeighbourState::Stale)
            .replace();
        request
            .message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        request
            .execute()
            .await
            .with_context(|| format!("marking the neighbour entry of {addr} managed"))
    }

    /// Resolves many backends at once: one neighbour dump, one link query per interface
    /// and the route lookups pipelined. What the kernel does not know yet it is asked to
    /// resolve (see `provoke_resolution`), so a later pass finds it; resolved entries not
    /// managed by the kernel yet are made so (see `keep_neighbour`). One backend's problem
    /// (no route, an interface without a MAC) is its own answer, never the whole pass's
    /// failure; an error here is netlink itself failing.
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
        let routes: Vec<(IpAddr, Result<std::result::Result<Route, Unresolved>>)> =
            futures::stream::iter(addrs.iter().copied())
                .map(|addr| async move { (addr, self.route(addr).await) })
                .buffer_unordered(ROUTE_LOOKUPS_IN_FLIGHT)
                .collect()
                .await;
        let mut links: HashMap<u32, std::result::Result<[u8; 6], String>> = HashMap::new();
        let mut out = HashMap::with_capacity(addrs.len());
        for (addr, route) in routes {
            let route = match route? {
                Ok(r) => r,
                Err(why) => {
                    out.insert(addr, Err(why));
                    continue;
                }
            };
            let (ifindex, next_hop) = (route.ifindex, route.next_hop(addr));
            if !links.contains_key(&ifindex) {
                let mac = self.link_mac(ifindex).await.map_err(|e| format!("{e:#}"));
                links.insert(ifindex, mac);
            }
            let src_mac = match &links[&ifindex] {
                Ok(mac) => *mac,
                Err(why) => {
                    let why = format!("{addr} is reached through {why}");
                    out.insert(addr, Err(Unresolved::Unreachable(why)));
                    continue;
                }
            };
            let neighbour = match &neighbours {
                Some(all) => all
                    .get(&(ifindex, next_hop))
                    .copied()
                    .unwrap_or(Neighbour::Absent),
                None => self.neighbour(ifindex, next_hop).await?,
            };
            let reach = match neighbour {
                Neighbour::Usable { mac, managed } => {
                    if !managed && let Err(e) = self.keep_neighbour(ifindex, next_hop, mac).await {
                        log::debug!("{e:#}");
                    }
                    Ok(L2Path {
                        ifindex,
                        src_mac,
                        dst_mac: mac,
                        via: route.via,
                    })
                }
                Neighbour::Absent | Neighbour::Failed => {
                    // Sent to the backend, the datagram makes the kernel resolve the next
                    // hop, whichever it is (a link-local gateway has no usable address here).
                    provoke_resolution(addr);
                    Err(Unresolved::NoNeighbour {
                        ifindex,
                        failed: neighbour == Neighbour::Failed,
                    })
                }
            };
            out.insert(addr, reach);
        }
        Ok(out)
    }
}

/// What the neighbour table holds for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbour {
    /// A MAC the data plane can use; `managed`: the kernel keeps it resolved.
    Usable { mac: [u8; 6], managed: bool },
    /// The kernel tried and the backend did not answer.
    Failed,
    /// No entry, or one still being resolved (no MAC yet).
    Absent,
}

impl Neighbour {
    /// The entry's interface and address, and what it says.
    fn of(n: &NeighbourMessage) -> (Option<(u32, IpAddr)>, Neighbour) {
        let mut dst = None;
        let mut lladdr = None;
        let mut managed = false;
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
                NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
                _ => {}
            }
        }
        let usable = matches!(
            n.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        let entry = match (usable, lladdr) {
            (true, Some(mac)) => Neighbour::Usable {
                mac,
                // Permanent and static entries need no keeping.
                managed: managed
                    || matches!(
                        n.header.state,
                        NeighbourState::Permanent | NeighbourState::Noarp
                    ),
            },
            _ if n.header.state == NeighbourState::Failed => Neighbour::Failed,
            _ => Neighbour::Absent,
        };
        (dst.map(|d| (n.header.ifindex, d)), entry)
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
