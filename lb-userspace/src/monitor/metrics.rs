//! Prometheus metrics (`GET /metrics`), in the OpenMetrics text format written by the
//! Prometheus project's `prometheus-client` crate.
//!
//! A scrape takes a [`Snapshot`] under the agent lock (cheap: no flow-table walk), then
//! runs every function of [`COLLECTORS`] on it outside the lock; each writes one or more
//! metric families into [`Families`], which are then encoded. **Adding a family is one
//! function** `fn(&Scrape, &mut Families) -> Result<()>` listed in `COLLECTORS` (its data
//! comes from the snapshot: a new kind of data is a field of `Snapshot`, filled in
//! `Agent::snapshot`). For example:
//!
//! ```text
//! fn firewall(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
//!     let hits = out.counter("lb_firewall_rule_hits", "Packets that matched the firewall rule");
//!     for rule in &s.snapshot.firewall_rules {
//!         hits.sample(labels([("rule", rule.name.clone())]), rule.hits);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Names follow Prometheus conventions: everything starts with `lb_`; a counter named
//! `lb_x` is exposed as `lb_x_total`; sizes are bytes and times seconds, with the unit in
//! the name; labels are `vip` (`10.99.1.1:80`, `[fd00:99:1::1]:80`), `proto`, `backend`,
//! `state`, `action` and `reason`.

use anyhow::Result;
use lb_common::Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::status::{AgentInfo, BackendSnapshot, FlowScan, Snapshot, VipSnapshot, action};

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything a collector may read.
pub struct Scrape<'a> {
    pub snapshot: &'a Snapshot,
    /// The latest flow-table walk (at most a few seconds old), if one has finished.
    pub flows: Option<&'a FlowScan>,
    pub info: &'a AgentInfo,
    /// What the agent announces to its routers (`crate::fleet`).
    pub fleet: &'a crate::fleet::FleetView,
}

pub type Collect = fn(&Scrape<'_>, &mut Families) -> Result<()>;

/// Every metric family, in exposition order.
pub const COLLECTORS: &[Collect] = &[
    agent, vips, backends, datapath, flow_table, firewall, fleet, flow_sync, nat,
];

pub type Labels = Vec<(&'static str, String)>;

/// Labels from pairs: `labels([("vip", v), ("proto", p)])`.
pub fn labels<const N: usize>(pairs: [(&'static str, String); N]) -> Labels {
    pairs.into()
}

/// A sample's value.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

/// One metric family: name, help, type, unit and its samples.
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    unit: Option<Unit>,
    samples: Vec<(Labels, Value)>,
}

impl Family {
    /// The unit, which the name must end with (`lb_vip_bytes` takes `Unit::Bytes`).
    pub fn unit(&mut self, unit: Unit) -> &mut Self {
        debug_assert!(
            self.name.ends_with(&format!("_{}", unit.as_str())),
            "{} does not end with its unit",
            self.name
        );
        self.unit = Some(unit);
        self
    }

    pub fn sample(&mut self, labels: Labels, value: impl Into<Value>) -> &mut Self {
        self.samples.push((labels, value.into()));
        self
    }
}

/// The metric families of one scrape.
#[derive(Debug, Default)]
pub struct Families(Vec<Family>);

impl Families {
    fn add(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        debug_assert!(name.starts_with("lb_") && !name.ends_with("_total"));
        self.0.push(Family {
            name,
            help,
            kind,
            unit: None,
            samples: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }

    /// A counter family; `lb_x` is exposed as `lb_x_total`.
    pub fn counter(&mut self, name: &'static str, help: &'static str) -> &mut Family {
        self.add(name, help, MetricType::Counter)
    }

    pub fn gauge(&mut self, name: &'static str, help: &'static str) -> &mut Family {
        self.add(name, help, MetricType::Gauge)
    }

    /// Exposed names (`_total` included), for documentation checks.
    pub fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|f| match f.kind {
                MetricType::Counter => format!("{}_total", f.name),
                _ => f.name.to_string(),
            })
            .collect()
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            // prometheus-client appends the unit to the name itself.
            let name = match &f.unit {
                Some(u) => f
                    .name
                    .strip_suffix(&format!("_{}", u.as_str()))
                    .unwrap_or(f.name),
                None => f.name,
            };
            let mut metric = encoder.encode_descriptor(name, f.help, f.unit.as_ref(), f.kind)?;
            if let [(labels, value)] = &f.samples[..]
                && labels.is_empty()
            {
                // A family of one sample without labels: `name value`, not `name{} value`.
                encode_value(f.kind, *value, metric)?;
                continue;
            }
            for (labels, value) in &f.samples {
                encode_value(f.kind, *value, metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    value: Value,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (MetricType::Counter, Value::Int(v)) => ConstCounter::new(v).encode(encoder),
        (MetricType::Counter, Value::Float(v)) => ConstCounter::new(v).encode(encoder),
        (_, Value::Int(v)) => ConstGauge::new(v as i64).encode(encoder),
        (_, Value::Float(v)) => ConstGauge::new(v).encode(encoder),
    }
}

/// Runs every collector (one that fails is left out and logged) and encodes the result.
pub fn render(scrape: &Scrape<'_>) -> String {
    let mut families = Families::default();
    for collect in COLLECTORS {
        if let Err(e) = collect(scrape, &mut families) {
            log::warn!("metrics: {e:#}");
        }
    }
    encode(families)
}

pub fn encode(families: Families) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(families));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

// ---- collectors ------------------------------------------------------------------------

fn vip_labels(v: &VipSnapshot) -> Labels {
    labels([("vip", v.addr.to_string()), ("proto", v.proto.to_string())])
}

fn backend_labels(v: &VipSnapshot, b: &BackendSnapshot) -> Labels {
    let mut l = vip_labels(v);
    l.push(("backend", b.addr.to_string()));
    l
}

fn agent(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let i = s.info;
    out.gauge(
        "lb_agent_info",
        "The running agent: version, XDP attach mode and interfaces (always 1)",
    )
    .sample(
        labels([
            ("version", i.version.to_string()),
            ("attach_mode", i.attach_mode.to_string()),
            ("interfaces", i.interfaces.join(",")),
        ]),
        1u64,
    );
    out.gauge("lb_agent_start_time_seconds", "Unix time the agent started")
        .unit(Unit::Seconds)
        .sample(Labels::new(), i.started);
    out.gauge("lb_vips", "Configured VIPs")
        .sample(Labels::new(), s.snapshot.vips.len());
    Ok(())
}

fn vips(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let vips = &s.snapshot.vips;
    let each = |family: &mut Family, f: &dyn Fn(&VipSnapshot) -> u64| {
        for v in vips {
            family.sample(vip_labels(v), f(v));
        }
    };
    each(
        out.counter("lb_vip_packets", "Packets forwarded to the VIP's backends"),
        &|v| v.counters.packets,
    );
    each(
        out.counter("lb_vip_bytes", "Bytes forwarded to the VIP's backends")
            .unit(Unit::Bytes),
        &|v| v.counters.bytes,
    );
    each(
        out.counter("lb_vip_new_flows", "Flows the VIP balanced to a backend"),
        &|v| v.counters.new_flows,
    );
    each(
        out.counter(
            "lb_vip_persisted_flows",
            "New flows that went to their client's backend by source affinity (--persist)",
        ),
        &|v| v.persisted,
    );
    if let Some(flows) = s.flows {
        let f = out.gauge(
            "lb_vip_active_flows",
            "Flow-table entries pinned to the VIP's backends (live flows and finished ones not yet evicted)",
        );
        for v in vips {
            f.sample(
                vip_labels(v),
                v.backends
                    .iter()
                    .map(|b| flows.backend(b.id, b.generation))
                    .sum::<u64>(),
            );
        }
    }
    let f = out.gauge(
        "lb_vip_backends",
        "The VIP's backends by state (up, down, draining, unresolved, leaving)",
    );
    for v in vips {
        for state in ["up", "down", "draining", "unresolved", "leaving"] {
            let mut l = vip_labels(v);
            l.push(("state", state.into()));
            f.sample(l, v.backends.iter().filter(|b| b.state == state).count());
        }
    }
    let f = out.gauge(
        "lb_vip_backends_in_rotation",
        "Backends that take the VIP's new flows now (0: new flows are dropped)",
    );
    for v in vips {
        f.sample(
            vip_labels(v),
            v.backends.iter().filter(|b| b.in_rotation).count(),
        );
    }
    Ok(())
}

fn backends(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let all: Vec<(&VipSnapshot, &BackendSnapshot)> = s
        .snapshot
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(move |b| (v, b)))
        .collect();
    let each = |family: &mut Family, f: &dyn Fn(&BackendSnapshot) -> Option<Value>| {
        for (v, b) in &all {
            if let Some(value) = f(b) {
                family.sample(backend_labels(v, b), value);
            }
        }
    };
    each(
        out.counter("lb_backend_packets", "Packets forwarded to the backend"),
        &|b| Some(b.counters.packets.into()),
    );
    each(
        out.counter("lb_backend_bytes", "Bytes forwarded to the backend")
            .unit(Unit::Bytes),
        &|b| Some(b.counters.bytes.into()),
    );
    each(
        out.counter("lb_backend_new_flows", "New flows balanced to the backend"),
        &|b| Some(b.counters.new_flows.into()),
    );
    each(
        out.gauge(
            "lb_backend_leastconn_active",
            "Active flows as least connections counts them: first packet to the client's FIN/RST or an idle timeout (0 unless the VIP is leastconn)",
        ),
        &|b| Some(b.active.into()),
    );
    if let Some(flows) = s.flows {
        each(
            out.gauge(
                "lb_backend_active_flows",
                "Flow-table entries pinned to the backend (live flows and finished ones not yet evicted)",
            ),
            &|b| Some(flows.backend(b.id, b.generation).into()),
        );
    }
    each(
        out.gauge(
            "lb_backend_up",
            "1 while the backend passes its health checks (or has none), else 0",
        ),
        &|b| Some(b.healthy.into()),
    );
    let state = out.gauge(
        "lb_backend_state",
        "1 for the backend's state (up, down, draining, unresolved, leaving), 0 for the others",
    );
    for (v, b) in &all {
        for st in ["up", "down", "draining", "unresolved", "leaving"] {
            let mut l = backend_labels(v, b);
            l.push(("state", st.into()));
            state.sample(l, b.state == st);
        }
    }
    each(
        out.gauge(
            "lb_backend_in_rotation",
            "1 while the backend takes new flows (in the VIP's selection ring)",
        ),
        &|b| Some(b.in_rotation.into()),
    );
    each(
        out.gauge("lb_backend_weight", "The backend's weight"),
        &|b| Some(b.weight.into()),
    );
    each(
        out.gauge(
            "lb_backend_backup",
            "1 for a backup backend, 0 for a primary",
        ),
        &|b| Some(b.backup.into()),
    );
    each(
        out.gauge("lb_backend_draining", "1 while the backend is drained"),
        &|b| Some(b.drain.into()),
    );
    each(
        out.gauge(
            "lb_backend_check_success",
            "1 if the backend's last health check passed, 0 if it failed (absent before the first)",
        ),
        &|b| b.last_check.as_ref().map(|c| c.ok.into()),
    );
    each(
        out.gauge(
            "lb_backend_check_latency_seconds",
            "How long the backend's last health check took",
        )
        .unit(Unit::Seconds),
        &|b| {
            b.last_check
                .as_ref()
                .map(|c| (c.latency_us as f64 / 1e6).into())
        },
    );
    Ok(())
}

fn datapath(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let reasons = || Reason::ALL.iter().zip(&s.snapshot.reasons);
    let l = |r: Reason| {
        labels([
            ("action", action(r).to_string()),
            ("reason", r.name().to_string()),
        ])
    };
    let f = out.counter(
        "lb_packets",
        "Packets the XDP program handled, by what it did (forward, pass, drop) and why",
    );
    for (r, c) in reasons() {
        f.sample(l(*r), c.packets);
    }
    let f = out
        .counter(
            "lb_bytes",
            "Bytes the XDP program handled, by what it did (forward, pass, drop) and why",
        )
        .unit(Unit::Bytes);
    for (r, c) in reasons() {
        f.sample(l(*r), c.bytes);
    }
    Ok(())
}

fn firewall(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let rules = &s.snapshot.firewall;
    let hits = out.counter(
        "lb_firewall_rule_hits",
        "Packets dropped by each drop-list rule",
    );
    for rule in rules {
        hits.sample(labels([("cidr", rule.cidr.clone())]), rule.counters.packets);
    }
    let bytes = out
        .counter(
            "lb_firewall_rule_bytes",
            "Bytes dropped by each drop-list rule",
        )
        .unit(Unit::Bytes);
    for rule in rules {
        bytes.sample(labels([("cidr", rule.cidr.clone())]), rule.counters.bytes);
    }
    out.gauge("lb_firewall_rules", "Rules in the drop list")
        .sample(Labels::new(), rules.len());
    Ok(())
}

/// Only on a balancer that announces (`[fleet] route_table`) or tells keepalived
/// (`[fleet] track_file`).
fn fleet(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let f = s.fleet;
    if let Some(track) = &f.track
        && let Some(serving) = track.serving
    {
        out.gauge(
            "lb_fleet_vrrp_serving",
            "What the VRRP track file says: 1 while this balancer can serve, 0 otherwise",
        )
        .sample(Labels::new(), serving);
    }
    if f.route_table == 0 {
        return Ok(());
    }
    out.gauge(
        "lb_fleet_member",
        "1 while in the fleet, 0 after `lb fleet leave`",
    )
    .sample(Labels::new(), f.member);
    let announced = out.gauge(
        "lb_fleet_announced",
        "1 while the VIP address's route is in the fleet routing table (announced to the routers)",
    );
    for a in &f.addresses {
        announced.sample(labels([("address", a.address.to_string())]), a.announced);
    }
    Ok(())
}

fn flow_table(s: &Scrape<'_>, out: &mut Families) -> Result<()> {
    out.gauge(
        "lb_flow_table_capacity",
        "Flows the flow table holds before the least recently used are evicted",
    )
    .sample(Labels::new(), lb_common::MAX_FLOWS);
    if let Some(flows) = s.flows {
        out.gauge(
            "lb_flow_table_entries",
            "Entries in the flow table at the last walk",
        )
        .sample(Labels::new(), flows.entries);
        out.gauge(
            "lb_flow_table_scan_timestamp_seconds",
            "Unix time of the flow-table walk the flow gauges come from",
        )
        .unit(Unit::Seconds)
        .sample(Labels::new(), flows.time);
        out.gauge(
            "lb_flow_table_scan_duration_seconds",
            "How long that walk took",
        )
        .unit(Unit::Seconds)
        .sample(Labels::new(), flows.took.as_secs_f64());
    }
    Ok(())
}

/// Full NAT (`crate::nat`): zeros until the agent's first sweep.
fn nat(_: &Scrape<'_>, out: &mut Families) -> Result<()> {
    let s = crate::nat::agent_stats()
        .map(|s| s.view())
        .unwrap_or_default();
    out.gauge(
        "lb_nat_translations",
        "NAT translations (flows) in the tables",
    )
    .sample(Labels::new(), s.entries);
    out.counter(
        "lb_nat_allocations",
        "NAT translations made, each with its SNAT port",
    )
    .sample(Labels::new(), s.allocated);
    out.counter(
        "lb_nat_port_collisions",
        "SNAT ports found taken while allocating",
    )
    .sample(Labels::new(), s.collisions);
    out.counter(
        "lb_nat_ports_exhausted",
        "New NAT flows dropped: no free SNAT port toward their backend",
    )
    .sample(Labels::new(), s.exhausted);
    out.counter(
        "lb_nat_expired",
        "NAT translations removed after their idle time",
    )
    .sample(Labels::new(), s.expired);
    Ok(())
}

/// Flow sharing with peer balancers (`crate::flowsync`); zero while it is off.
fn flow_sync(_: &Scrape<'_>, out: &mut Families) -> Result<()> {
    use crate::flowsync::{directory::Skip, sync::Rejected};
    use std::sync::atomic::Ordering::Relaxed;
    let zero = crate::flowsync::Stats::default();
    let s = crate::flowsync::agent_stats().map_or(&zero, |s| &**s);
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    out.gauge("lb_flowsync_peers", "Peer balancers flows are shared with")
        .sample(Labels::new(), n(&s.peers));
    out.counter(
        "lb_flowsync_events",
        "New flows read from the data plane's ring buffer to be shared",
    )
    .sample(Labels::new(), n(&s.events));
    out.counter(
        "lb_flowsync_ring_drops",
        "New flows not shared: the ring buffer was full",
    )
    .sample(Labels::new(), n(&s.ring_drops));
    out.counter(
        "lb_flowsync_pins_sent",
        "Flow pins sent to peers (one per peer)",
    )
    .sample(Labels::new(), n(&s.sent));
    out.counter(
        "lb_flowsync_send_errors",
        "Datagrams to peers that could not be sent",
    )
    .sample(Labels::new(), n(&s.send_errors));
    out.counter(
        "lb_flowsync_pins_received",
        "Flow pins in peers' accepted batches",
    )
    .sample(Labels::new(), n(&s.received));
    out.counter(
        "lb_flowsync_pins_installed",
        "Peers' flow pins installed in the flow table",
    )
    .sample(Labels::new(), n(&s.installed));
    let skipped = out.counter(
        "lb_flowsync_pins_skipped",
        "Peers' flow pins not installed, by reason",
    );
    for why in Skip::ALL {
        skipped.sample(
            labels([("reason", why.name().to_string())]),
            n(&s.skipped[why as usize]),
        );
    }
    let rejected = out.counter(
        "lb_flowsync_messages_rejected",
        "Datagrams refused whole (unknown peer, malformed, bad MAC, replayed, stale)",
    );
    for why in Rejected::ALL {
        rejected.sample(
            labels([("reason", why.name().to_string())]),
            n(&s.rejected[why as usize]),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Algo, Proto},
        monitor::status::{
            Count, LastCheck,
            fixtures::{backend, vip},
        },
    };
    use std::time::Duration;

    fn scrape_text(flows: bool) -> (String, Vec<String>) {
        let b = |addr: &str, id, state, backup, n| BackendSnapshot {
            id,
            weight: 2,
            backup,
            in_rotation: state == "up" && !backup,
            last_check: Some(LastCheck {
                ok: state != "down",
                latency_us: 1500,
                detail: "connected".into(),
            }),
            counters: Count {
                packets: n,
                bytes: n * 60,
                new_flows: n / 5,
            },
            ..backend(addr, state)
        };
        let snapshot = Snapshot {
            time: 1.0,
            vips: vec![
                VipSnapshot {
                    counters: Count {
                        packets: 30,
                        bytes: 1800,
                        new_flows: 6,
                    },
                    ..vip(
                        "10.99.1.1:80",
                        Proto::Tcp,
                        Algo::Rr,
                        "tcp",
                        vec![
                            b("10.99.0.11", 1, "up", false, 10),
                            b("10.99.0.12", 2, "draining", false, 20),
                            b("10.99.0.13", 3, "up", true, 0),
                        ],
                    )
                },
                vip(
                    "[fd00:99:1::1]:53",
                    Proto::Udp,
                    Algo::Maglev,
                    "none",
                    vec![b("fd00:99::11", 4, "down", false, 0)],
                ),
            ],
            reasons: (0..Reason::ALL.len() as u64)
                .map(|i| Count {
                    packets: i,
                    bytes: i * 100,
                    new_flows: 0,
                })
                .collect(),
            firewall: vec![crate::monitor::status::RuleSnapshot {
                cidr: "198.51.100.0/24".into(),
                counters: Count {
                    packets: 7,
                    bytes: 420,
                    new_flows: 0,
                },
            }],
        };
        let info = AgentInfo {
            hostname: "lb1".into(),
            version: "9.9.9",
            attach_mode: "generic",
            interfaces: vec!["eth0".into(), "eth1".into()],
            started: 1700000000.5,
        };
        let scan = FlowScan {
            entries: 12,
            per_backend: [((1, 1), 4), ((2, 1), 8), ((2, 7), 100)].into(),
            time: 1.0,
            took: Duration::from_millis(3),
        };
        let fleet = crate::fleet::FleetView {
            route_table: 100,
            member: true,
            addresses: vec![crate::fleet::AddressView {
                address: "10.99.1.1".parse().unwrap(),
                announced: true,
                why_not: None,
                vips: Vec::new(),
            }],
            idle_s: None,
            quiet: false,
            grace_s: 60,
            quiet_s: 3,
            track: Some(crate::fleet::TrackView {
                file: "/etc/lb/serving".into(),
                serving: Some(true),
            }),
        };
        let s = Scrape {
            snapshot: &snapshot,
            flows: flows.then_some(&scan),
            info: &info,
            fleet: &fleet,
        };
        let mut families = Families::default();
        for c in COLLECTORS {
            c(&s, &mut families).unwrap();
        }
        let names = families.names();
        (encode(families), names)
    }

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn families_and_samples() {
        let (text, _) = scrape_text(true);
        let v = r#"vip="10.99.1.1:80",proto="tcp""#;
        has(&text, "lb_fleet_member 1");
        has(&text, r#"lb_fleet_announced{address="10.99.1.1"} 1"#);
        has(&text, "lb_fleet_vrrp_serving 1");
        has(&text, "# TYPE lb_vip_packets counter");
        has(&text, &format!("lb_vip_packets_total{{{v}}} 30"));
        has(&text, "# UNIT lb_vip_bytes bytes");
        has(&text, &format!("lb_vip_bytes_total{{{v}}} 1800"));
        has(&text, &format!("lb_vip_new_flows_total{{{v}}} 6"));
        // Flows of generation 7 belong to an earlier backend in slot 2, not this one.
        has(&text, &format!("lb_vip_active_flows{{{v}}} 12"));
        has(&text, &format!("lb_vip_backends{{{v},state=\"up\"}} 2"));
        has(
            &text,
            &format!("lb_vip_backends{{{v},state=\"draining\"}} 1"),
        );
        has(&text, &format!("lb_vip_backends_in_rotation{{{v}}} 1"));
        has(
            &text,
            r#"lb_vip_backends{vip="[fd00:99:1::1]:53",proto="udp",state="down"} 1"#,
        );
        let b = format!(r#"{v},backend="10.99.0.12""#);
        has(&text, &format!("lb_backend_packets_total{{{b}}} 20"));
        has(&text, &format!("lb_backend_bytes_total{{{b}}} 1200"));
        has(&text, &format!("lb_backend_new_flows_total{{{b}}} 4"));
        has(&text, &format!("lb_backend_active_flows{{{b}}} 8"));
        has(
            &text,
            &format!("lb_backend_state{{{b},state=\"draining\"}} 1"),
        );
        has(&text, &format!("lb_backend_state{{{b},state=\"up\"}} 0"));
        has(&text, &format!("lb_backend_draining{{{b}}} 1"));
        has(&text, &format!("lb_backend_weight{{{b}}} 2"));
        has(&text, &format!("lb_backend_check_success{{{b}}} 1"));
        has(
            &text,
            &format!("lb_backend_check_latency_seconds{{{b}}} 0.0015"),
        );
        has(
            &text,
            r#"lb_backend_up{vip="[fd00:99:1::1]:53",proto="udp",backend="fd00:99::11"} 0"#,
        );
        has(
            &text,
            r#"lb_backend_backup{vip="10.99.1.1:80",proto="tcp",backend="10.99.0.13"} 1"#,
        );
        has(
            &text,
            r#"lb_packets_total{action="drop",reason="drop_no_backend"} 10"#,
        );
        has(
            &text,
            r#"lb_bytes_total{action="pass",reason="pass_not_vip"} 200"#,
        );
        has(
            &text,
            r#"lb_packets_total{action="forward",reason="forwarded"} 0"#,
        );
        // The VIP's ceiling on new flows is a reason like any other.
        has(
            &text,
            &format!(
                r#"lb_packets_total{{action="drop",reason="drop_vip_rate_limited"}} {}"#,
                Reason::DropVipRateLimited as u32
            ),
        );
        has(&text, "lb_flow_table_entries 12");
        has(&text, "lb_flow_table_capacity 1048576");
        has(
            &text,
            r#"lb_agent_info{version="9.9.9",attach_mode="generic",interfaces="eth0,eth1"} 1"#,
        );
        has(&text, "lb_agent_start_time_seconds 1700000000.5");
        has(&text, "lb_vips 2");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn flow_gauges_only_once_the_table_was_walked() {
        let (text, _) = scrape_text(false);
        assert!(!text.contains("lb_backend_active_flows"), "{text}");
        assert!(!text.contains("lb_flow_table_entries"), "{text}");
        has(&text, "lb_flow_table_capacity 1048576");
    }

    /// Every exposed family is in the README's metrics table, and nothing else is.
    #[test]
    fn readme_lists_every_family() {
        let readme = include_str!("../../../README.md");
        let (_, names) = scrape_text(true);
        let listed: std::collections::BTreeSet<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `lb_"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let exposed: std::collections::BTreeSet<String> =
            names.iter().map(|n| n["lb_".len()..].to_string()).collect();
        let listed: std::collections::BTreeSet<String> =
            listed.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            exposed, listed,
            "README metrics table (lines starting \"| `lb_\") vs exposed families"
        );
    }
}
