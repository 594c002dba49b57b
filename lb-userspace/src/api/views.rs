//! What `lb vip list`, `lb backend list`, `lb firewall list` and `lb stats` show: typed
//! rows built from the state and its counters, sent as JSON and read back into the same
//! types by the CLI's tables.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::Reason;
use serde::{Deserialize, Serialize};

use crate::{
    health::CheckKind,
    kernel::flows::FlowScan,
    model::{Algo, Proto, Service},
    state::{AllCounters, Dataplane, State},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    pub vip: SocketAddr,
    pub proto: Proto,
    pub algo: Algo,
    pub check: CheckKind,
    pub rate_limit: u32,
    pub burst: u32,
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
    /// `up`, `down`, `draining` or `unresolved`.
    pub state: String,
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
                check: v.check.check.clone(),
                rate_limit: v.rate.rate_limit,
                burst: v.rate.burst,
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
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
