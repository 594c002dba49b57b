//! Balancers in a fleet behind routers: which VIP addresses this balancer announces, and
//! graceful leave and join.
//!
//! The contract with the routing daemon (BIRD, FRR) needs no code in the daemon: the agent
//! keeps one host route per VIP address it can serve in a kernel routing table of its own
//! (`[fleet] route_table`), and the daemon exports that table over BGP. A VIP address is
//! announced while the data plane is attached, the agent runs, the balancer has not left
//! the fleet, and at least one VIP on that address has a backend in rotation. A clean stop
//! withdraws everything; a `kill -9` withdraws nothing (the pinned program keeps
//! forwarding, and the next agent takes the routes over as they are).
//!
//! Active-passive pairs without BGP (VRRP by keepalived) use the same rule: the agent
//! writes whether it can serve into a file keepalived tracks (`[fleet] track_file`,
//! [`track`]), and a master that cannot serve hands the VIPs to its backup.
//!
//! [`decide`] is the whole rule, kernel-free; [`announce`] keeps the routing table (and the
//! track file) equal to its answer; [`cli`] is `lb fleet`.

pub mod announce;
pub mod cli;
pub mod track;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::{model::Service, state::VipState};

/// The `[fleet]` section of the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Kernel routing table holding one host route per announced VIP address; 0 (the
    /// default): no announcements, the balancer stands alone.
    #[serde(default)]
    pub route_table: u32,
    /// Set by `lb fleet leave`, cleared by `lb fleet join`: nothing is announced.
    #[serde(default, skip_serializing_if = "is_false")]
    pub left: bool,
    /// After `lb fleet leave`: how long it waits for traffic to stop, seconds.
    #[serde(default = "default_grace", skip_serializing_if = "is_default_grace")]
    pub grace_s: u32,
    /// No packet to any VIP for this long, seconds, after a leave: no traffic arrives any
    /// more, the agent may be stopped.
    #[serde(default = "default_quiet", skip_serializing_if = "is_default_quiet")]
    pub quiet_s: u32,
    /// For a VRRP pair: a file holding `1` while this balancer can serve every VIP
    /// address and `0` otherwise, which keepalived tracks (`track_file`) to set the
    /// priority. None (the default): no file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_file: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            route_table: 0,
            left: false,
            grace_s: default_grace(),
            quiet_s: default_quiet(),
            track_file: None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn default_grace() -> u32 {
    60
}
fn is_default_grace(v: &u32) -> bool {
    *v == default_grace()
}
fn default_quiet() -> u32 {
    3
}
fn is_default_quiet(v: &u32) -> bool {
    *v == default_quiet()
}

/// Tables the kernel uses itself: announcing there would route VIPs on this host.
const RESERVED_TABLES: [u32; 3] = [253, 254, 255];

impl FleetConfig {
    pub fn validate(&self) -> Result<()> {
        if RESERVED_TABLES.contains(&self.route_table) {
            bail!(
                "fleet: route_table {} is one of the kernel's own tables (default 253, main 254, local 255): pick a dedicated one, e.g. 100",
                self.route_table
            );
        }
        if self.quiet_s == 0 || self.grace_s < self.quiet_s {
            bail!(
                "fleet: quiet_s must be at least 1 and grace_s ({}) at least quiet_s ({})",
                self.grace_s,
                self.quiet_s
            );
        }
        if let Some(path) = &self.track_file
            && (!path.is_absolute() || path.file_name().is_none())
        {
            bail!(
                "fleet: track_file {} must be an absolute path to a file, e.g. /etc/lb/serving",
                path.display()
            );
        }
        Ok(())
    }

    pub fn announcing(&self) -> bool {
        self.route_table != 0
    }

    /// Announcing routes or feeding keepalived: leave and join mean something.
    pub fn active(&self) -> bool {
        self.announcing() || self.track_file.is_some()
    }
}

/// What [`decide`] needs of one VIP.
#[derive(Clone, Debug, PartialEq)]
pub struct VipServing {
    pub service: Service,
    pub in_rotation: usize,
    pub total: usize,
}

impl VipServing {
    pub fn of(v: &VipState) -> Self {
        Self {
            service: v.service,
            in_rotation: v.backends.iter().filter(|b| v.in_rotation(b)).count(),
            total: v.backends.len(),
        }
    }
}

/// Why a VIP address is not announced; None: it is.
pub type WhyNot = Option<String>;

/// The rule: which VIP addresses to announce, and why not the others. `detached` names
/// the interfaces the program is not attached to.
pub fn decide(vips: &[VipServing], left: bool, detached: &[String]) -> BTreeMap<IpAddr, WhyNot> {
    let mut out: BTreeMap<IpAddr, WhyNot> = BTreeMap::new();
    for v in vips {
        let addr = v.service.addr.ip();
        let why = if left {
            Some("left the fleet (`lb fleet join` to announce again)".to_string())
        } else if !detached.is_empty() {
            Some(format!("data plane not attached to {}", detached.join(",")))
        } else if v.in_rotation == 0 {
            Some(format!("no backend in rotation (0 of {} up)", v.total))
        } else {
            None
        };
        // An address is served when any of its VIPs is.
        match out.get_mut(&addr) {
            Some(slot) if slot.is_none() => {}
            Some(slot) => {
                if why.is_none() {
                    *slot = None;
                }
            }
            None => {
                out.insert(addr, why);
            }
        }
    }
    out
}

/// What `lb fleet status` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    /// 0: no announcements (standalone).
    pub route_table: u32,
    /// False after `lb fleet leave`.
    pub member: bool,
    pub addresses: Vec<AddressView>,
    /// After a leave: seconds since a packet last reached a VIP (since the leave, at most).
    pub idle_s: Option<f64>,
    /// After a leave: no packet to any VIP for `quiet_s`; the agent may be stopped.
    pub quiet: bool,
    pub grace_s: u32,
    pub quiet_s: u32,
    /// The VRRP track file, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<TrackView>,
}

/// What the agent tells keepalived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackView {
    pub file: PathBuf,
    /// What the file says (None: not written yet, or the last write failed).
    pub serving: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AddressView {
    pub address: IpAddr,
    /// The host route is in the table now.
    pub announced: bool,
    /// Why it should not be announced; None: it should.
    pub why_not: Option<String>,
    /// The VIPs on this address, with their backends in rotation.
    pub vips: Vec<VipOnAddress>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipOnAddress {
    pub vip: String,
    pub in_rotation: usize,
    pub total: usize,
}

/// The agent's fleet state: its configuration and what the announcer last did.
pub struct Fleet {
    inner: Mutex<Inner>,
    /// Wakes the announcer at once after leave or join.
    pub wake: tokio::sync::Notify,
}

struct Inner {
    config: FleetConfig,
    vips: Vec<VipServing>,
    decision: BTreeMap<IpAddr, WhyNot>,
    announced: std::collections::BTreeSet<IpAddr>,
    /// What the track file says (see [`track::TrackFile::written`]).
    track_serving: Option<bool>,
    /// Since the leave: VIP packets last counted, and when they last changed.
    traffic: Option<(u64, Instant)>,
}

impl Fleet {
    pub fn new(config: FleetConfig) -> Self {
        let traffic = config.left.then(|| (0, Instant::now()));
        Self {
            inner: Mutex::new(Inner {
                config,
                vips: Vec::new(),
                decision: BTreeMap::new(),
                announced: Default::default(),
                track_serving: None,
                traffic,
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `[fleet]` section as it stands (saved with the rest of the configuration).
    pub fn config(&self) -> FleetConfig {
        self.lock().config.clone()
    }

    /// Leave (`member` false) or join. Returns whether anything changed.
    pub fn set_member(&self, member: bool) -> Result<bool> {
        let mut inner = self.lock();
        if !inner.config.active() {
            bail!(
                "this balancer announces nothing: set `route_table` (BGP) or `track_file` (VRRP) in the [fleet] section of its configuration file (see README, Fleet)"
            );
        }
        if inner.config.left != member {
            return Ok(false);
        }
        inner.config.left = !member;
        inner.traffic = (!member).then(|| (0, Instant::now()));
        drop(inner);
        self.wake.notify_one();
        Ok(true)
    }

    /// After the announcer's pass: what it decided and what the table holds.
    fn record(
        &self,
        vips: Vec<VipServing>,
        decision: BTreeMap<IpAddr, WhyNot>,
        announced: std::collections::BTreeSet<IpAddr>,
        track_serving: Option<bool>,
    ) {
        let mut inner = self.lock();
        inner.vips = vips;
        inner.decision = decision;
        inner.announced = announced;
        inner.track_serving = track_serving;
    }

    /// Whether VIP packets are being counted (after a leave).
    fn counting(&self) -> bool {
        self.lock().traffic.is_some()
    }

    /// The sum of every VIP's packet counter, after a leave.
    fn count(&self, packets: u64) {
        let mut inner = self.lock();
        if let Some((last, at)) = &mut inner.traffic
            && *last != packets
        {
            *last = packets;
            *at = Instant::now();
        }
    }

    pub fn view(&self) -> FleetView {
        let inner = self.lock();
        let idle = inner.traffic.map(|(_, at)| at.elapsed());
        FleetView {
            route_table: inner.config.route_table,
            member: !inner.config.left,
            addresses: inner
                .decision
                .iter()
                .map(|(addr, why)| AddressView {
                    address: *addr,
                    announced: inner.announced.contains(addr),
                    why_not: why.clone(),
                    vips: inner
                        .vips
                        .iter()
                        .filter(|v| v.service.addr.ip() == *addr)
                        .map(|v| VipOnAddress {
                            vip: v.service.to_string(),
                            in_rotation: v.in_rotation,
                            total: v.total,
                        })
                        .collect(),
                })
                .collect(),
            idle_s: idle.map(|d| d.as_secs_f64()),
            quiet: idle.is_some_and(|d| d >= Duration::from_secs(inner.config.quiet_s.into())),
            grace_s: inner.config.grace_s,
            quiet_s: inner.config.quiet_s,
            track: inner.config.track_file.as_ref().map(|file| TrackView {
                file: file.clone(),
                serving: inner.track_serving,
            }),
        }
    }
}

impl FleetView {
    /// One line for `lb status`.
    pub fn summary(&self) -> String {
        let track = self.track.as_ref().map(|t| {
            format!(
                "VRRP track file {}: {}",
                t.file.display(),
                match t.serving {
                    Some(true) => "1 (serving)",
                    Some(false) => "0 (cannot serve)",
                    None => "not written",
                }
            )
        });
        if self.route_table == 0 {
            return match track {
                Some(t) if !self.member => format!("left: {t}"),
                Some(t) => t,
                None => "standalone".into(),
            };
        }
        let with_track = |line: String| match &track {
            Some(t) => format!("{line}; {t}"),
            None => line,
        };
        let announced = self.addresses.iter().filter(|a| a.announced).count();
        if !self.member {
            let idle = self.idle_s.unwrap_or(0.0);
            return with_track(format!(
                "left (table {}): {announced} VIP addresses announced; {}",
                self.route_table,
                if self.quiet {
                    format!("no VIP traffic for {idle:.0} s, safe to stop")
                } else {
                    format!("VIP traffic {idle:.0} s ago, still forwarding")
                }
            ));
        }
        let withheld: Vec<String> = self
            .addresses
            .iter()
            .filter_map(|a| a.why_not.as_ref().map(|w| format!("{} {w}", a.address)))
            .collect();
        let mut line = format!(
            "member (table {}): announcing {announced} of {} VIP addresses",
            self.route_table,
            self.addresses.len()
        );
        if !withheld.is_empty() {
            line += &format!("; withheld: {}", withheld.join(", "));
        }
        with_track(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn vip(addr: &str, in_rotation: usize, total: usize) -> VipServing {
        VipServing {
            service: Service {
                addr: addr.parse().unwrap(),
                proto: Proto::Tcp,
            },
            in_rotation,
            total,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_is_announced_while_one_of_its_vips_has_a_backend_in_rotation() {
        let vips = [
            vip("10.0.0.1:80", 1, 2),
            vip("10.0.0.1:443", 0, 2),
            vip("10.0.0.2:80", 0, 3),
            vip("[fd00::1]:80", 2, 2),
        ];
        let d = decide(&vips, false, &[]);
        assert_eq!(d[&ip("10.0.0.1")], None);
        assert_eq!(d[&ip("fd00::1")], None);
        assert_eq!(
            d[&ip("10.0.0.2")].as_deref(),
            Some("no backend in rotation (0 of 3 up)")
        );
        // The order of the VIPs does not matter.
        let mut reversed = vips.to_vec();
        reversed.reverse();
        assert_eq!(decide(&reversed, false, &[]), d);
    }

    #[test]
    fn nothing_is_announced_after_a_leave_or_without_the_data_plane() {
        let vips = [vip("10.0.0.1:80", 1, 1)];
        let d = decide(&vips, true, &[]);
        assert!(d[&ip("10.0.0.1")].as_deref().unwrap().contains("left"));
        let d = decide(&vips, false, &["eth0".into()]);
        assert!(
            d[&ip("10.0.0.1")]
                .as_deref()
                .unwrap()
                .contains("not attached to eth0")
        );
        assert!(decide(&[], false, &[]).is_empty());
    }

    #[test]
    fn leave_and_join_need_a_route_table_and_count_traffic_after_a_leave() {
        let standalone = Fleet::new(FleetConfig::default());
        assert!(standalone.set_member(false).is_err());
        assert_eq!(standalone.view().summary(), "standalone");

        let fleet = Fleet::new(FleetConfig {
            route_table: 100,
            ..Default::default()
        });
        assert!(!fleet.counting());
        assert!(fleet.set_member(false).unwrap());
        assert!(
            !fleet.set_member(false).unwrap(),
            "leaving twice changes nothing"
        );
        assert!(fleet.config().left);
        assert!(fleet.counting());
        fleet.count(10);
        let v = fleet.view();
        assert!(!v.member && !v.quiet && v.idle_s.unwrap() < 1.0);
        assert!(fleet.set_member(true).unwrap());
        assert!(!fleet.config().left && !fleet.counting());
        // A VRRP balancer (no route table) leaves and joins too: its track file says 0.
        let vrrp = Fleet::new(FleetConfig {
            track_file: Some("/etc/lb/serving".into()),
            ..Default::default()
        });
        assert!(vrrp.set_member(false).unwrap());
        assert_eq!(
            vrrp.view().summary(),
            "left: VRRP track file /etc/lb/serving: not written"
        );
    }

    /// Two balancers of a fleet, backends added in different orders (so with different
    /// local ids), send every Maglev slot, hence every flow, to the same backend address:
    /// a connection that moves from one balancer to the other keeps its backend.
    #[test]
    fn balancers_with_backends_added_in_different_orders_build_the_same_maglev_table() {
        use crate::{
            config::BackendConfig,
            health::CheckSpec,
            model::{Algo, L2Path, RateLimit, Reach},
            state::{Fake, State},
        };
        let service = Service {
            addr: "10.0.0.1:80".parse().unwrap(),
            proto: Proto::Tcp,
        };
        let build = |order: &[u8], first_extra: bool| {
            let mut s = State::new(Fake::default(), None);
            s.add_vip(
                service,
                Algo::Maglev,
                CheckSpec::default(),
                RateLimit::default(),
            )
            .unwrap();
            let mut add = |last: u8| {
                let config = BackendConfig {
                    address: IpAddr::from([10, 0, 1, last]),
                    weight: 1,
                    backup: false,
                    drain: false,
                    check: None,
                    leaving_until: None,
                };
                let reach = Reach {
                    l2: Some(L2Path {
                        ifindex: 2,
                        src_mac: [2, 0, 0, 0, 0, 1],
                        dst_mac: [2, 0, 0, 0, 1, last],
                        via: None,
                    }),
                    note: None,
                    resolving_on: None,
                };
                s.add_backend(&service, &config, reach).unwrap();
            };
            // One balancer saw a backend come and go first: its ids are shifted.
            if first_extra {
                add(99);
            }
            for &last in order {
                add(last);
            }
            if first_extra {
                s.del_backend(&service, IpAddr::from([10, 0, 1, 99]))
                    .unwrap();
            }
            let vip = s.vip(&service).unwrap();
            let by_id: std::collections::HashMap<u32, IpAddr> =
                vip.backends.iter().map(|b| (b.id, b.addr)).collect();
            s.dataplane()
                .ring(&service.key())
                .iter()
                .map(|id| by_id[id])
                .collect::<Vec<IpAddr>>()
        };
        let one = build(&[1, 2, 3, 4, 5], false);
        let other = build(&[4, 2, 5, 1, 3], true);
        assert_eq!(one.len(), crate::model::MAGLEV_TABLE_SIZE as usize);
        assert!(one == other, "the two balancers' Maglev tables differ");
    }

    #[test]
    fn reserved_tables_and_bad_timers_are_refused() {
        for table in RESERVED_TABLES {
            let c = FleetConfig {
                route_table: table,
                ..Default::default()
            };
            assert!(c.validate().is_err());
        }
        let c = FleetConfig {
            route_table: 100,
            grace_s: 1,
            quiet_s: 2,
            left: false,
            track_file: None,
        };
        assert!(c.validate().is_err());
        for bad in ["serving", "/"] {
            let c = FleetConfig {
                track_file: Some(bad.into()),
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(FleetConfig::default().validate().is_ok());
    }
}
