//! What `lb status`, `lb vip list`, `lb backend list`, `lb firewall list` and `lb stats` show: typed
//! rows built from the state and its counters, sent as JSON and read back into the same
//! types by the CLI's tables.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{Outcome, Reason};
use serde::{Deserialize, Serialize};

use crate::{
    health::CheckKind,
    kernel::flows::FlowScan,
    model::{Algo, Mode, Proto, Service},
    monitor::status::{AgentInfo, ReasonWindow, Snapshot},
    state::{AllCounters, Dataplane, State},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    pub vip: SocketAddr,
    pub proto: Proto,
    pub algo: Algo,
    /// How packets reach the backends.
    #[serde(default)]
    pub mode: Mode,
    pub check: CheckKind,
    pub rate_limit: u32,
    pub burst: u32,
    /// The VIP's ceiling on new flows per second from all sources; 0 = none.
    #[serde(default)]
    pub max_new_flows: u32,
    #[serde(default)]
    pub new_flow_burst: u32,
    /// Source affinity in seconds (0: none), and new flows that followed it.
    #[serde(default)]
    pub persist: u32,
    #[serde(default)]
    pub persisted_flows: u64,
    pub backends: usize,
    pub active_backends: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: SocketAddr,
    pub proto: Proto,
    pub address: std::net::IpAddr,
    /// `up`, `down`, `draining`, `unresolved` or `leaving`.
    pub state: String,
    /// Leaving (`lb backend del`): removed at the latest at this unix time, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_until: Option<u64>,
    pub weight: u32,
    pub backup: bool,
    /// `primary` or `backup`.
    pub role: String,
    pub drain: bool,
    pub check: CheckKind,
    /// `ok` or `failed`.
    pub last_check: Option<String>,
    pub last_check_detail: Option<String>,
    pub check_latency_us: Option<u64>,
    pub mac: Option<String>,
    pub ifindex: Option<u32>,
    pub note: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Flows pinned to it (from the latest flow-table walk).
    pub flows: u64,
    /// Active flows as least connections counts them (0 unless the VIP is `leastconn`).
    #[serde(default)]
    pub active: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleView {
    pub cidr: ipnet::IpNet,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasonView {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub vips: Vec<VipView>,
    pub backends: Vec<BackendView>,
    /// By reason name.
    pub reasons: BTreeMap<String, ReasonView>,
    pub firewall: Vec<RuleView>,
    /// Flow sharing with peer balancers, while it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_sync: Option<crate::flowsync::StatsView>,
    /// Full NAT's translations (once the agent has swept them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<crate::nat::StatsView>,
}

pub fn vips<D: Dataplane>(state: &State<D>, counters: &AllCounters) -> Vec<VipView> {
    state
        .vips()
        .iter()
        .map(|v| {
            let c = counters.vip(v.id);
            VipView {
                vip: v.service.addr,
                proto: v.service.proto,
                algo: v.algo,
                mode: v.mode,
                check: v.check.check.clone(),
                rate_limit: v.rate.rate_limit,
                burst: v.rate.burst,
                max_new_flows: v.rate.max_new_flows,
                new_flow_burst: v.rate.new_flow_burst,
                persist: v.persist.seconds,
                persisted_flows: counters.persisted(v.id),
                backends: v.backends.len(),
                active_backends: v.backends.iter().filter(|b| b.eligible()).count(),
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            }
        })
        .collect()
}

/// Backends of every VIP, or of `filter`'s.
pub fn backends<D: Dataplane>(
    state: &State<D>,
    filter: Option<&Service>,
    counters: &AllCounters,
    flows: Option<&FlowScan>,
) -> Vec<BackendView> {
    let mut out = Vec::new();
    for v in state
        .vips()
        .iter()
        .filter(|v| filter.is_none_or(|f| *f == v.service))
    {
        for b in &v.backends {
            let c = counters.backend(b.id);
            let last = b.health.last.as_ref();
            out.push(BackendView {
                vip: v.service.addr,
                proto: v.service.proto,
                address: b.addr,
                state: b.state().into(),
                leaving_until: b.leaving_until,
                weight: b.weight,
                backup: b.backup,
                role: if b.backup { "backup" } else { "primary" }.into(),
                drain: b.drain,
                check: v.check_of(b).check.clone(),
                last_check: last.map(|o| if o.ok { "ok" } else { "failed" }.into()),
                last_check_detail: last.map(|o| o.detail.clone()),
                check_latency_us: last.map(|o| o.latency_us),
                mac: b.l2.map(|l| mac_string(&l.dst_mac)),
                ifindex: b.l2.map(|l| l.ifindex),
                note: b.note.clone(),
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                flows: flows.map_or(0, |f| f.backend(b.id, b.generation)),
                active: if v.algo == Algo::Leastconn {
                    counters.active(b.id)
                } else {
                    0
                },
            });
        }
    }
    out
}

pub fn rules<D: Dataplane>(state: &State<D>, counters: &AllCounters) -> Vec<RuleView> {
    state
        .rules()
        .iter()
        .map(|(net, id)| {
            let c = counters.rule(*id);
            RuleView {
                cidr: *net,
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .collect()
}

pub fn stats<D: Dataplane>(
    state: &State<D>,
    counters: &AllCounters,
    flows: Option<&FlowScan>,
) -> StatsView {
    let reasons = Reason::ALL
        .iter()
        .zip(&counters.reasons)
        .map(|(r, c)| {
            let view = ReasonView {
                packets: c.packets,
                bytes: c.bytes,
            };
            (r.name().to_string(), view)
        })
        .collect();
    StatsView {
        vips: vips(state, counters),
        backends: backends(state, None, counters, flows),
        reasons,
        firewall: rules(state, counters),
        flow_sync: crate::flowsync::agent_stats().map(|s| s.view()),
        nat: crate::nat::agent_stats().map(|s| s.view()),
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---- lb status -------------------------------------------------------------------------

/// `lb status` counts drops over this long (or what the agent has sampled, if less).
pub const DROP_WINDOW_SECONDS: f64 = 60.0;

/// The one-screen overview an operator reads first (`lb status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub agent: AgentView,
    pub interfaces: Vec<InterfaceView>,
    pub vips: Vec<VipStatus>,
    pub drops: DropsView,
    pub flow_table: FlowTableView,
    pub fleet: Fleet,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    /// As `lb --version` prints it (with the commit when built from git).
    pub version: String,
    pub pid: u32,
    pub hostname: String,
    /// Unix time it started, seconds.
    pub started: f64,
    pub uptime_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    /// `native` or `generic` XDP.
    pub xdp_mode: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: SocketAddr,
    pub proto: Proto,
    pub algo: Algo,
    pub backends_up: usize,
    pub backends_total: usize,
    /// The backends that are not up, with their state (`down`, `draining`, `unresolved`).
    pub not_up: Vec<BackendState>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    pub address: std::net::IpAddr,
    pub state: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropsView {
    /// Seconds the counts cover: [`DROP_WINDOW_SECONDS`], or less on an agent younger than
    /// that; None until the agent has sampled its counters twice (a second after start).
    pub window_s: Option<f64>,
    pub total: u64,
    /// Drop reasons that counted packets in the window, by name.
    pub by_reason: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowTableView {
    /// None when the flow table could not be walked (the agent logs why).
    pub entries: Option<u64>,
    pub capacity: u64,
}

/// Where the agent stands in a fleet of balancers: on its own (no `[fleet] route_table`),
/// or announcing VIP addresses to routers (`lb fleet status` has the details).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fleet {
    Standalone,
    /// An active-passive pair: no routes, a track file keepalived reads.
    Vrrp {
        /// False after `lb fleet leave`.
        member: bool,
        /// The `fleet` line of `lb status`.
        summary: String,
    },
    Bgp {
        route_table: u32,
        /// False after `lb fleet leave`.
        member: bool,
        announced: Vec<std::net::IpAddr>,
        withheld: Vec<std::net::IpAddr>,
        /// The `fleet` line of `lb status`.
        summary: String,
    },
}

impl Fleet {
    pub fn of(view: &crate::fleet::FleetView) -> Self {
        if view.route_table == 0 {
            return match view.track {
                Some(_) => Fleet::Vrrp {
                    member: view.member,
                    summary: view.summary(),
                },
                None => Fleet::Standalone,
            };
        }
        let (announced, withheld) = view
            .addresses
            .iter()
            .partition::<Vec<_>, _>(|a| a.announced);
        Fleet::Bgp {
            route_table: view.route_table,
            member: view.member,
            announced: announced.iter().map(|a| a.address).collect(),
            withheld: withheld.iter().map(|a| a.address).collect(),
            summary: view.summary(),
        }
    }
}

/// The overview from a snapshot of the state, the latest flow-table walk and the drops of
/// the last minute, for this process at unix time `now`.
pub fn status(
    info: &AgentInfo,
    snapshot: &Snapshot,
    flows: Option<&FlowScan>,
    drops: Option<&ReasonWindow>,
    now: f64,
) -> StatusView {
    let vips = snapshot
        .vips
        .iter()
        .map(|v| VipStatus {
            vip: v.addr,
            proto: v.proto,
            algo: v.algo,
            backends_up: v.backends.iter().filter(|b| b.state == "up").count(),
            backends_total: v.backends.len(),
            not_up: v
                .backends
                .iter()
                .filter(|b| b.state != "up")
                .map(|b| BackendState {
                    address: b.addr,
                    state: b.state.to_string(),
                })
                .collect(),
        })
        .collect();
    let by_reason: BTreeMap<String, u64> = drops
        .map(|w| {
            Reason::ALL
                .iter()
                .zip(&w.packets)
                // A refused SYN is no drop, but it is traffic turned away all the same.
                .filter(|(r, n)| {
                    (r.outcome() == Outcome::Drop || **r == Reason::ResetNoBackend) && **n > 0
                })
                .map(|(r, n)| (r.name().to_string(), *n))
                .collect()
        })
        .unwrap_or_default();
    StatusView {
        agent: AgentView {
            version: crate::service::VERSION.clone(),
            pid: std::process::id(),
            hostname: info.hostname.clone(),
            started: info.started,
            uptime_s: (now - info.started).max(0.0) as u64,
        },
        interfaces: info
            .interfaces
            .iter()
            .map(|name| InterfaceView {
                name: name.clone(),
                xdp_mode: info.attach_mode.to_string(),
            })
            .collect(),
        vips,
        drops: DropsView {
            window_s: drops.map(|w| w.seconds),
            total: by_reason.values().sum(),
            by_reason,
        },
        flow_table: FlowTableView {
            entries: flows.map(|f| f.entries),
            capacity: lb_common::MAX_FLOWS.into(),
        },
        fleet: Fleet::Standalone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::status::{
        Count,
        fixtures::{backend, vip},
    };

    fn info() -> AgentInfo {
        AgentInfo {
            hostname: "lb1".into(),
            version: "0.1.0",
            attach_mode: "generic",
            interfaces: vec!["eth0".into(), "eth1".into()],
            started: 1000.0,
        }
    }

    #[test]
    fn status_counts_backends_up_and_names_the_others() {
        let snapshot = Snapshot {
            time: 1100.0,
            vips: vec![
                vip(
                    "10.99.1.1:80",
                    Proto::Tcp,
                    Algo::Maglev,
                    "tcp",
                    vec![
                        backend("10.99.0.11", "up"),
                        backend("10.99.0.12", "down"),
                        backend("10.99.0.13", "draining"),
                        backend("10.99.0.14", "up"),
                    ],
                ),
                vip("[fd00::1]:53", Proto::Udp, Algo::Rr, "none", vec![]),
            ],
            reasons: vec![Count::default(); Reason::ALL.len()],
            firewall: vec![],
        };
        let flows = FlowScan {
            entries: 42,
            per_backend: Default::default(),
            time: 1100.0,
            took: std::time::Duration::ZERO,
        };
        let mut packets = vec![0; Reason::ALL.len()];
        packets[Reason::Forwarded as usize] = 1_000_000;
        packets[Reason::DropNoBackend as usize] = 7;
        packets[Reason::DropFragment as usize] = 3;
        packets[Reason::PassNotVip as usize] = 9;
        let drops = ReasonWindow {
            seconds: 60.0,
            packets,
        };
        let s = status(&info(), &snapshot, Some(&flows), Some(&drops), 4600.5);

        assert_eq!(s.agent.uptime_s, 3600);
        assert_eq!(s.agent.pid, std::process::id());
        assert_eq!(s.agent.version, *crate::service::VERSION);
        assert_eq!(
            s.interfaces,
            [("eth0", "generic"), ("eth1", "generic")].map(|(n, m)| InterfaceView {
                name: n.into(),
                xdp_mode: m.into()
            })
        );
        let v = &s.vips[0];
        assert_eq!((v.backends_up, v.backends_total), (2, 4));
        assert_eq!(
            v.not_up,
            [("10.99.0.12", "down"), ("10.99.0.13", "draining")].map(|(a, st)| {
                BackendState {
                    address: a.parse().unwrap(),
                    state: st.into(),
                }
            })
        );
        assert_eq!((s.vips[1].backends_up, s.vips[1].backends_total), (0, 0));
        // Only drops: neither forwards nor passes.
        assert_eq!(s.drops.window_s, Some(60.0));
        assert_eq!(s.drops.total, 10);
        assert_eq!(
            s.drops.by_reason,
            BTreeMap::from([
                ("drop_fragment".to_string(), 3),
                ("drop_no_backend".to_string(), 7)
            ])
        );
        assert_eq!(s.flow_table.entries, Some(42));
        assert_eq!(s.fleet, Fleet::Standalone);
        // What the CLI reads back is what the agent built.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["fleet"], "standalone");
        assert_eq!(serde_json::from_value::<StatusView>(json).unwrap(), s);
    }

    #[test]
    fn status_of_a_young_agent_has_no_drop_window_yet() {
        let snapshot = Snapshot::default();
        let s = status(&info(), &snapshot, None, None, 1000.2);
        assert_eq!(s.drops.window_s, None);
        assert_eq!(s.drops.total, 0);
        assert_eq!(s.flow_table.entries, None);
        assert!(s.vips.is_empty());
    }

    /// A VRRP-only balancer (a track file, no route table) is no standalone one: `lb
    /// status` says what keepalived is told.
    #[test]
    fn a_vrrp_member_is_not_standalone() {
        let fleet = crate::fleet::Fleet::new(crate::fleet::FleetConfig {
            track_file: Some("/etc/lb/serving".into()),
            ..Default::default()
        });
        match Fleet::of(&fleet.view()) {
            Fleet::Vrrp { member, summary } => {
                assert!(member);
                assert!(
                    summary.contains("VRRP track file /etc/lb/serving"),
                    "{summary}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
