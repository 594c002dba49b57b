//! What monitoring sees of the agent: a [`Snapshot`] of VIPs, backends and counters taken
//! briefly under the agent lock, the flow-table scan, a ring of per-second samples
//! ([`History`]) and the JSON the status page reads (`/api/status`).
//!
//! Everything here is plain data: the HTTP side (`monitor`) and the Prometheus side
//! (`metrics`) never touch the agent or the BPF maps themselves.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use lb_common::{Counters, Reason};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    model::{Algo, Proto},
    state::{Dataplane, State},
};

/// Per-second samples the agent keeps for the status page's chart: ten minutes.
pub const HISTORY_SECONDS: usize = 600;
/// Backends whose rates are kept in the history; past this only VIP and total rates are
/// (a bound on memory: 600 samples of 65,536 backends would be 1.5 GB).
pub const HISTORY_MAX_BACKENDS: usize = 1024;

/// Packets, bytes and new flows, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<Counters> for Count {
    fn from(c: Counters) -> Self {
        Count {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Rates between two counts: packets/s, bits/s, new flows/s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    pub pps: f64,
    pub bps: f64,
    pub new_flows_ps: f64,
}

impl Rate {
    /// A counter that went backwards (its id was given to a new VIP or backend, which
    /// starts at zero) counts as no traffic, not as negative traffic.
    pub fn between(now: &Count, before: &Count, seconds: f64) -> Rate {
        if seconds <= 0.0 {
            return Rate::default();
        }
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
        Rate {
            pps: d(now.packets, before.packets),
            bps: d(now.bytes, before.bytes) * 8.0,
            new_flows_ps: d(now.new_flows, before.new_flows),
        }
    }
}

/// The outcome of a backend's last health check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastCheck {
    pub ok: bool,
    pub latency_us: u64,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendSnapshot {
    pub addr: IpAddr,
    /// Slot in the backend map and its generation: the flow-table scan counts by these.
    pub id: u32,
    pub generation: u32,
    /// `up`, `down`, `draining`, `unresolved` or `leaving` (as `lb backend list` says).
    pub state: &'static str,
    /// Passes its health checks (or has none).
    pub healthy: bool,
    pub weight: u32,
    pub backup: bool,
    pub drain: bool,
    /// In the VIP's selection ring now: takes new flows.
    pub in_rotation: bool,
    pub check: String,
    pub last_check: Option<LastCheck>,
    pub note: Option<String>,
    pub counters: Count,
    /// Active flows as least connections counts them (0 unless the VIP is `leastconn`).
    pub active: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VipSnapshot {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub algo: Algo,
    pub check: String,
    pub counters: Count,
    /// New flows that followed their client's affinity (`--persist`).
    pub persisted: u64,
    pub backends: Vec<BackendSnapshot>,
}

impl VipSnapshot {
    /// `10.99.1.1:80/tcp`: names the VIP in the history and on the status page.
    pub fn key(&self) -> String {
        format!("{}/{}", self.addr, self.proto)
    }

    /// `10.99.1.1:80/tcp 10.99.0.11`
    pub fn backend_key(&self, b: &BackendSnapshot) -> String {
        format!("{} {}", self.key(), b.addr)
    }
}

/// The agent's state and counters at one moment (taken under the agent lock; no flow-table
/// walk, so it is cheap at any size).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Unix time, seconds.
    pub time: f64,
    pub vips: Vec<VipSnapshot>,
    /// Per reason, in `Reason::ALL` order.
    pub reasons: Vec<Count>,
    /// Drop-list rules, in the order they were added.
    pub firewall: Vec<RuleSnapshot>,
}

/// One drop-list rule and its hits.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleSnapshot {
    pub cidr: String,
    pub counters: Count,
}

/// What the agent runs as, for `lb_agent_info` and the page header.
#[derive(Clone, Debug, Serialize)]
pub struct AgentInfo {
    pub hostname: String,
    pub version: &'static str,
    /// `native` or `generic` XDP.
    pub attach_mode: &'static str,
    pub interfaces: Vec<String>,
    /// Unix time the agent started, seconds.
    pub started: f64,
}

pub use crate::kernel::flows::FlowScan;
pub use crate::model::unix_now;

/// The state and its counters now, for monitoring: no flow-table walk, and the counters
/// in one batched read per map, so it is cheap under the lock at any size.
pub fn snapshot<D: Dataplane>(state: &State<D>) -> anyhow::Result<Snapshot> {
    let counters = state.counters()?;
    let vips = state
        .vips()
        .iter()
        .map(|v| VipSnapshot {
            addr: v.service.addr,
            proto: v.service.proto,
            algo: v.algo,
            check: v.check.check.to_string(),
            counters: counters.vip(v.id).into(),
            persisted: counters.persisted(v.id),
            backends: v
                .backends
                .iter()
                .map(|b| BackendSnapshot {
                    addr: b.addr,
                    id: b.id,
                    generation: b.generation,
                    state: b.state(),
                    healthy: b.health.up,
                    weight: b.weight,
                    backup: b.backup,
                    drain: b.drain,
                    in_rotation: v.in_rotation(b),
                    check: v.check_of(b).check.to_string(),
                    last_check: b.health.last.as_ref().map(|o| LastCheck {
                        ok: o.ok,
                        latency_us: o.latency_us,
                        detail: o.detail.clone(),
                    }),
                    note: b.note.clone(),
                    counters: counters.backend(b.id).into(),
                    active: if v.algo == Algo::Leastconn {
                        counters.active(b.id)
                    } else {
                        0
                    },
                })
                .collect(),
        })
        .collect();
    let firewall = state
        .rules()
        .iter()
        .map(|(net, id)| RuleSnapshot {
            cidr: net.to_string(),
            counters: counters.rule(*id).into(),
        })
        .collect();
    Ok(Snapshot {
        time: unix_now(),
        vips,
        reasons: counters.reasons.iter().copied().map(Into::into).collect(),
        firewall,
    })
}

/// This host's name (of its UTS namespace).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// `forward`, `reply`, `pass` or `drop`: what the data plane did with packets of this
/// reason.
pub fn action(reason: Reason) -> &'static str {
    match reason.outcome() {
        lb_common::Outcome::Forward => "forward",
        lb_common::Outcome::Reply => "reply",
        lb_common::Outcome::Pass => "pass",
        lb_common::Outcome::Drop => "drop",
    }
}

/// Keys of the series one sample holds, shared by consecutive samples while the
/// configuration does not change.
#[derive(Debug, PartialEq)]
struct Keys {
    vips: Vec<String>,
    backends: Vec<String>,
}

impl Keys {
    fn of(s: &Snapshot) -> Keys {
        Keys {
            vips: s.vips.iter().map(VipSnapshot::key).collect(),
            backends: s
                .vips
                .iter()
                .flat_map(|v| v.backends.iter().map(|b| v.backend_key(b)))
                .take(HISTORY_MAX_BACKENDS)
                .collect(),
        }
    }
}

#[derive(Debug)]
struct Sample {
    time: f64,
    keys: Arc<Keys>,
    vips: Vec<Count>,
    backends: Vec<Count>,
    /// Summed by action, in `ACTIONS` order.
    actions: [Count; 4],
    /// Packets per reason, in `Reason::ALL` order (`lb status`: drops by reason over the
    /// last minute).
    reasons: Vec<u64>,
}

const ACTIONS: [&str; 4] = ["forward", "pass", "drop", "reply"];

impl Sample {
    fn of(s: &Snapshot, keys: Arc<Keys>) -> Sample {
        let mut actions = [Count::default(); 4];
        for (r, c) in Reason::ALL.iter().zip(&s.reasons) {
            let Some(i) = ACTIONS.iter().position(|a| *a == action(*r)) else {
                continue; // an action without a chart line is not a forward
            };
            let a = &mut actions[i];
            a.packets += c.packets;
            a.bytes += c.bytes;
        }
        Sample {
            time: s.time,
            vips: s.vips.iter().map(|v| v.counters).collect(),
            backends: s
                .vips
                .iter()
                .flat_map(|v| v.backends.iter().map(|b| b.counters))
                .take(keys.backends.len())
                .collect(),
            keys,
            actions,
            reasons: s.reasons.iter().map(|c| c.packets).collect(),
        }
    }
}

/// Packets per reason over the last `seconds` of the history (or less, when the agent has
/// not sampled that long).
#[derive(Clone, Debug, PartialEq)]
pub struct ReasonWindow {
    /// The span the counts cover, seconds.
    pub seconds: f64,
    /// In `Reason::ALL` order.
    pub packets: Vec<u64>,
}

/// The last [`HISTORY_SECONDS`] snapshots, reduced to counters, and the latest two whole.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    latest: Option<Arc<Snapshot>>,
    previous: Option<Arc<Snapshot>>,
}

/// Current rates per VIP key, per backend key and per reason.
#[derive(Clone, Debug, Default)]
pub struct Rates {
    pub vips: HashMap<String, Rate>,
    pub backends: HashMap<String, Rate>,
    pub reasons: Vec<Rate>,
}

impl History {
    pub fn push(&mut self, snapshot: Arc<Snapshot>) {
        let keys = Keys::of(&snapshot);
        let keys = match self.samples.back() {
            Some(last) if *last.keys == keys => last.keys.clone(),
            _ => Arc::new(keys),
        };
        self.samples.push_back(Sample::of(&snapshot, keys));
        // One more than the window: N + 1 samples give N rates.
        while self.samples.len() > HISTORY_SECONDS + 1 {
            self.samples.pop_front();
        }
        self.previous = self.latest.replace(snapshot);
    }

    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest.clone()
    }

    /// Packets per reason between the latest sample and the oldest one at most `seconds`
    /// before it; None until there are two samples.
    pub fn reasons_over(&self, seconds: f64) -> Option<ReasonWindow> {
        let now = self.samples.back()?;
        let before = self
            .samples
            .iter()
            .find(|s| now.time - s.time <= seconds)
            .filter(|s| s.time < now.time)?;
        Some(ReasonWindow {
            seconds: now.time - before.time,
            packets: now
                .reasons
                .iter()
                .zip(&before.reasons)
                .map(|(n, b)| n.saturating_sub(*b))
                .collect(),
        })
    }

    /// Rates between the latest two snapshots (zero until there are two).
    pub fn rates(&self) -> Rates {
        let (Some(now), Some(before)) = (&self.latest, &self.previous) else {
            return Rates::default();
        };
        let dt = now.time - before.time;
        let mut old_vips = HashMap::new();
        let mut old_backends = HashMap::new();
        for v in &before.vips {
            old_vips.insert(v.key(), v.counters);
            for b in &v.backends {
                old_backends.insert(v.backend_key(b), b.counters);
            }
        }
        let mut rates = Rates::default();
        for v in &now.vips {
            let key = v.key();
            if let Some(old) = old_vips.get(&key) {
                rates.vips.insert(key, Rate::between(&v.counters, old, dt));
            }
            for b in &v.backends {
                let key = v.backend_key(b);
                if let Some(old) = old_backends.get(&key) {
                    rates
                        .backends
                        .insert(key, Rate::between(&b.counters, old, dt));
                }
            }
        }
        rates.reasons = now
            .reasons
            .iter()
            .zip(&before.reasons)
            .map(|(n, b)| Rate::between(n, b, dt))
            .collect();
        rates
    }

    /// Per-second rate series for the chart, for the samples taken after `since` (unix
    /// seconds; 0 for all): `t` holds each interval's end time, every series one value per
    /// entry of `t` (null where the VIP or backend did not exist).
    pub fn series(&self, since: f64) -> Value {
        let mut t = Vec::new();
        let mut totals: Vec<Vec<Value>> = vec![Vec::new(); 5];
        let mut vips: HashMap<&str, [Vec<Value>; 3]> = HashMap::new();
        let mut backends: HashMap<&str, [Vec<Value>; 2]> = HashMap::new();
        let pairs = self.samples.iter().zip(self.samples.iter().skip(1));
        for (n, (before, now)) in pairs.filter(|(_, now)| now.time > since).enumerate() {
            let dt = now.time - before.time;
            t.push(json!(round3(now.time)));
            let fwd = Rate::between(&now.actions[0], &before.actions[0], dt);
            totals[0].push(json!(round1(fwd.pps)));
            totals[1].push(json!(round1(fwd.bps)));
            for (i, a) in [1, 2, 3].into_iter().enumerate() {
                let r = Rate::between(&now.actions[a], &before.actions[a], dt);
                totals[2 + i].push(json!(round1(r.pps)));
            }
            let at = (n, dt, Arc::ptr_eq(&now.keys, &before.keys));
            let (keys, old) = (&now.keys, &before.keys);
            let now_vips = (&keys.vips[..], &now.vips[..]);
            let before_vips = (&old.vips[..], &before.vips[..]);
            push_rates(&mut vips, now_vips, before_vips, at);
            let now_backends = (&keys.backends[..], &now.backends[..]);
            let before_backends = (&old.backends[..], &before.backends[..]);
            push_rates(&mut backends, now_backends, before_backends, at);
        }
        let [fwd_pps, fwd_bps, pass_pps, drop_pps, reply_pps] =
            <[Vec<Value>; 5]>::try_from(totals).expect("five totals");
        json!({
            "t": t,
            "total": {
                "forwarded_pps": fwd_pps,
                "forwarded_bps": fwd_bps,
                "passed_pps": pass_pps,
                "dropped_pps": drop_pps,
                "replied_pps": reply_pps,
            },
            "vips": vips.into_iter().map(|(k, [pps, bps, nfps])| {
                (k.to_string(), json!({"pps": pps, "bps": bps, "new_flows_ps": nfps}))
            }).collect::<serde_json::Map<_, _>>(),
            "backends": backends.into_iter().map(|(k, [pps, bps])| {
                (k.to_string(), json!({"pps": pps, "bps": bps}))
            }).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Adds interval `n` (of `dt` seconds) to the rate series of each VIP or each backend, by
/// key: `N` series a key (pps, bps, and new flows/s when 3); a key new by now gets nulls
/// for the intervals before, one gone by now a null. `same`: both samples have the same
/// keys, so a key's index is the same in both.
fn push_rates<'k, const N: usize>(
    series: &mut HashMap<&'k str, [Vec<Value>; N]>,
    now: (&'k [String], &[Count]),
    before: (&[String], &[Count]),
    (n, dt, same): (usize, f64, bool),
) {
    for (i, key) in now.0.iter().enumerate() {
        let entry = series
            .entry(key.as_str())
            .or_insert_with(|| std::array::from_fn(|_| vec![Value::Null; n]));
        let j = if same {
            Some(i)
        } else {
            before.0.iter().position(|k| k == key)
        };
        let rate = j.map(|j| Rate::between(&now.1[i], &before.1[j], dt));
        push_rate(entry, rate, N == 3);
    }
    for s in series.values_mut().flat_map(|s| s.iter_mut()) {
        s.resize(n + 1, Value::Null);
    }
}

fn push_rate<const N: usize>(series: &mut [Vec<Value>; N], rate: Option<Rate>, flows: bool) {
    let values = match rate {
        Some(r) if flows => vec![r.pps, r.bps, r.new_flows_ps],
        Some(r) => vec![r.pps, r.bps],
        None => vec![],
    };
    for (i, s) in series.iter_mut().enumerate() {
        s.push(values.get(i).map_or(Value::Null, |v| json!(round1(*v))));
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The body of `/api/status`: agent, flow table, totals, every VIP with its backends and
/// their current rates, and the rate history after `since`.
pub fn status_json(
    info: &AgentInfo,
    snapshot: &Snapshot,
    flows: Option<&FlowScan>,
    history: &History,
    since: f64,
) -> Value {
    let rates = history.rates();
    let rate = |r: Option<&Rate>| {
        let r = r.copied().unwrap_or_default();
        json!({"pps": round1(r.pps), "bps": round1(r.bps), "new_flows_ps": round1(r.new_flows_ps)})
    };
    let vips: Vec<Value> = snapshot
        .vips
        .iter()
        .map(|v| {
            let key = v.key();
            let backends: Vec<Value> = v
                .backends
                .iter()
                .map(|b| {
                    let bkey = v.backend_key(b);
                    json!({
                        "key": bkey,
                        "address": b.addr.to_string(),
                        "state": b.state,
                        "healthy": b.healthy,
                        "role": if b.backup { "backup" } else { "primary" },
                        "weight": b.weight,
                        "backup": b.backup,
                        "drain": b.drain,
                        "in_rotation": b.in_rotation,
                        "check": b.check,
                        "last_check": b.last_check,
                        "note": b.note,
                        "packets": b.counters.packets,
                        "bytes": b.counters.bytes,
                        "new_flows": b.counters.new_flows,
                        "flows": flows.map(|f| f.backend(b.id, b.generation)),
                        "rate": rate(rates.backends.get(&bkey)),
                    })
                })
                .collect();
            json!({
                "key": key,
                "vip": v.addr.to_string(),
                "proto": v.proto,
                "algo": v.algo,
                "check": v.check,
                "packets": v.counters.packets,
                "bytes": v.counters.bytes,
                "new_flows": v.counters.new_flows,
                "flows": flows.map(|f| v.backends.iter().map(|b| f.backend(b.id, b.generation)).sum::<u64>()),
                "backends_in_rotation": v.backends.iter().filter(|b| b.in_rotation).count(),
                "rate": rate(rates.vips.get(&key)),
                "backends": backends,
            })
        })
        .collect();
    let reasons: Vec<Value> = Reason::ALL
        .iter()
        .zip(&snapshot.reasons)
        .enumerate()
        .map(|(i, (r, c))| {
            json!({
                "reason": r.name(),
                "action": action(*r),
                "packets": c.packets,
                "bytes": c.bytes,
                "pps": round1(rates.reasons.get(i).map_or(0.0, |r| r.pps)),
            })
        })
        .collect();
    json!({
        "agent": info,
        "time": round3(snapshot.time),
        "flow_table": {
            "entries": flows.map(|f| f.entries),
            "capacity": lb_common::MAX_FLOWS,
            "scanned_at": flows.map(|f| round3(f.time)),
        },
        "reasons": reasons,
        "vips": vips,
        "history": history.series(since),
    })
}

/// Snapshots for the tests of what is made from them (views, metrics, the web page).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A backend in `state` (`up`, `down`, `draining`, ...) with a TCP check, no result
    /// yet and no counts.
    pub fn backend(addr: &str, state: &'static str) -> BackendSnapshot {
        BackendSnapshot {
            active: 0,
            addr: addr.parse().unwrap(),
            id: 1,
            generation: 1,
            state,
            healthy: state != "down",
            weight: 1,
            backup: false,
            drain: state == "draining",
            in_rotation: state == "up",
            check: "tcp".into(),
            last_check: None,
            note: None,
            counters: Count::default(),
        }
    }

    /// A VIP with `backends` and no counts of its own.
    pub fn vip(
        addr: &str,
        proto: Proto,
        algo: Algo,
        check: &str,
        backends: Vec<BackendSnapshot>,
    ) -> VipSnapshot {
        VipSnapshot {
            persisted: 0,
            addr: addr.parse().unwrap(),
            proto,
            algo,
            check: check.into(),
            counters: Count::default(),
            backends,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(addr: &str, packets: u64) -> BackendSnapshot {
        BackendSnapshot {
            check: "none".into(),
            counters: Count {
                packets,
                bytes: packets * 100,
                new_flows: packets / 10,
            },
            ..fixtures::backend(addr, "up")
        }
    }

    fn snapshot(time: f64, backends: &[(&str, u64)]) -> Arc<Snapshot> {
        let backends: Vec<_> = backends.iter().map(|(a, p)| backend(a, *p)).collect();
        let total = backends.iter().map(|b| b.counters.packets).sum::<u64>();
        let mut reasons = vec![Count::default(); Reason::ALL.len()];
        reasons[0].packets = total;
        reasons[Reason::DropNoBackend as usize].packets = total / 2;
        Arc::new(Snapshot {
            time,
            vips: vec![VipSnapshot {
                counters: Count {
                    packets: total,
                    bytes: total * 100,
                    new_flows: total / 10,
                },
                ..fixtures::vip("10.99.1.1:80", Proto::Tcp, Algo::Rr, "none", backends)
            }],
            reasons,
            firewall: Vec::new(),
        })
    }

    #[test]
    fn rates_come_from_the_latest_two_snapshots() {
        let mut h = History::default();
        h.push(snapshot(100.0, &[("10.0.0.1", 0), ("10.0.0.2", 50)]));
        assert!(h.rates().vips.is_empty());
        h.push(snapshot(102.0, &[("10.0.0.1", 200), ("10.0.0.2", 10)]));
        let r = h.rates();
        let b1 = r.backends["10.99.1.1:80/tcp 10.0.0.1"];
        assert_eq!(b1.pps, 100.0);
        assert_eq!(b1.bps, 100.0 * 100.0 * 8.0);
        assert_eq!(b1.new_flows_ps, 10.0);
        // A counter that went back (a reused id) is no traffic, not negative traffic.
        assert_eq!(r.backends["10.99.1.1:80/tcp 10.0.0.2"].pps, 0.0);
        assert_eq!(r.vips["10.99.1.1:80/tcp"].pps, (210.0 - 50.0) / 2.0);
    }

    /// Echo replies sent from XDP are neither forwards nor passes nor drops.
    #[test]
    fn echo_replies_are_charted_as_replies() {
        let mut h = History::default();
        let with_replies = |time: f64, n: u64| {
            let mut s = (*snapshot(time, &[])).clone();
            s.reasons[Reason::IcmpEchoReply as usize].packets = n;
            Arc::new(s)
        };
        h.push(with_replies(1.0, 0));
        h.push(with_replies(2.0, 7));
        let s = h.series(0.0);
        assert_eq!(s["total"]["forwarded_pps"], json!([0.0]));
        assert_eq!(s["total"]["replied_pps"], json!([7.0]));
    }

    #[test]
    fn series_follow_backends_that_come_and_go() {
        let mut h = History::default();
        h.push(snapshot(1.0, &[("10.0.0.1", 0)]));
        h.push(snapshot(2.0, &[("10.0.0.1", 10)]));
        h.push(snapshot(3.0, &[("10.0.0.1", 30), ("10.0.0.2", 5)]));
        h.push(snapshot(4.0, &[("10.0.0.2", 25)]));
        let s = h.series(0.0);
        assert_eq!(s["t"], json!([2.0, 3.0, 4.0]));
        assert_eq!(
            s["backends"]["10.99.1.1:80/tcp 10.0.0.1"]["pps"],
            json!([10.0, 20.0, null])
        );
        assert_eq!(
            s["backends"]["10.99.1.1:80/tcp 10.0.0.2"]["pps"],
            json!([null, null, 20.0])
        );
        assert_eq!(s["total"]["forwarded_pps"], json!([10.0, 25.0, 0.0]));
        assert_eq!(s["total"]["dropped_pps"], json!([5.0, 12.0, 0.0]));
        // Only what came after `since`.
        let s = h.series(3.0);
        assert_eq!(s["t"], json!([4.0]));
        assert_eq!(
            s["backends"]["10.99.1.1:80/tcp 10.0.0.2"]["pps"],
            json!([20.0])
        );
    }

    #[test]
    fn reasons_over_the_last_minute() {
        let mut h = History::default();
        assert_eq!(h.reasons_over(60.0), None);
        // snapshot(): drop_no_backend is half the packets.
        for i in 0..100u64 {
            h.push(snapshot(i as f64, &[("10.0.0.1", i * 10)]));
        }
        let w = h.reasons_over(60.0).unwrap();
        assert_eq!(w.seconds, 60.0);
        assert_eq!(w.packets[Reason::DropNoBackend as usize], (990 - 390) / 2);
        assert_eq!(w.packets[0], 990 - 390);
        // A young agent: the span it has.
        let mut h = History::default();
        h.push(snapshot(0.0, &[("10.0.0.1", 0)]));
        assert_eq!(h.reasons_over(60.0), None);
        h.push(snapshot(5.0, &[("10.0.0.1", 40)]));
        let w = h.reasons_over(60.0).unwrap();
        assert_eq!(
            (w.seconds, w.packets[Reason::DropNoBackend as usize]),
            (5.0, 20)
        );
    }

    #[test]
    fn history_keeps_ten_minutes() {
        let mut h = History::default();
        for i in 0..(HISTORY_SECONDS + 50) {
            h.push(snapshot(i as f64, &[("10.0.0.1", i as u64)]));
        }
        let s = h.series(0.0);
        assert_eq!(s["t"].as_array().unwrap().len(), HISTORY_SECONDS);
        assert_eq!(s["vips"]["10.99.1.1:80/tcp"]["pps"][0], json!(1.0));
    }

    #[test]
    fn status_has_every_backend_with_rates_and_flows() {
        let mut h = History::default();
        h.push(snapshot(1.0, &[("10.0.0.1", 0), ("10.0.0.2", 0)]));
        let latest = snapshot(2.0, &[("10.0.0.1", 40), ("10.0.0.2", 60)]);
        h.push(latest.clone());
        let info = AgentInfo {
            hostname: "lb1".into(),
            version: "0.1.0",
            attach_mode: "native",
            interfaces: vec!["eth0".into()],
            started: 0.0,
        };
        let flows = FlowScan {
            entries: 7,
            per_backend: [((1, 1), 7)].into(),
            time: 2.0,
            took: std::time::Duration::ZERO,
        };
        let s = status_json(&info, &latest, Some(&flows), &h, 0.0);
        let vip = &s["vips"][0];
        assert_eq!(vip["vip"], "10.99.1.1:80");
        assert_eq!(vip["rate"]["pps"], 100.0);
        assert_eq!(vip["backends"][1]["address"], "10.0.0.2");
        assert_eq!(vip["backends"][1]["rate"]["pps"], 60.0);
        assert_eq!(vip["backends"][1]["state"], "up");
        assert_eq!(vip["backends"][0]["flows"], 7);
        assert_eq!(s["flow_table"]["entries"], 7);
        assert_eq!(s["reasons"][0]["reason"], "forwarded");
        assert_eq!(s["reasons"][0]["pps"], 100.0);
        assert_eq!(s["agent"]["interfaces"][0], "eth0");
    }
}
