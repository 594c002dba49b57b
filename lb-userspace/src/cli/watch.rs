//! `lb stats --watch`: asks the agent for its counters once a second over the control
//! socket and redraws a table of rates (packets/s, bits/s, new flows/s) per VIP, backend
//! and pass/drop reason, computed from the counters' change since the last poll.

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::api::{
    protocol::{self as control, Request, Response},
    views::{BackendView, StatsView, VipView},
};

const EVERY: Duration = Duration::from_secs(1);

/// Polls and redraws until interrupted, or `count` times.
pub fn run(socket: &Path, count: Option<u64>) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, StatsView)> = None;
    let mut next = Instant::now();
    for n in 1.. {
        let data: StatsView = match control::call(socket, &Request::Stats)? {
            Response::Ok { data, .. } => serde_json::from_value(data)
                .map_err(|e| anyhow::anyhow!("unreadable answer from the agent: {e}"))?,
            Response::Error { error } => bail!("{error}"),
        };
        let now = Instant::now();
        let since = previous
            .as_ref()
            .map(|(t, d)| ((now - *t).as_secs_f64(), d));
        let screen = render(&data, since);
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, clear: a redraw in place.
            write!(out, "\x1b[H\x1b[2J")?;
        } else if n > 1 {
            writeln!(out)?;
        }
        write!(out, "{screen}")?;
        out.flush()?;
        drop(out);
        previous = Some((now, data));
        if count.is_some_and(|c| n >= c) {
            break;
        }
        next += EVERY;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(())
}

/// Packets, bytes and new flows of one row, now or before.
#[derive(Clone, Copy, Default)]
struct Counts {
    packets: u64,
    bytes: u64,
    new_flows: u64,
}

/// Rates of one item from its counters now and before.
fn rates(now: Counts, before: Option<Counts>, seconds: f64) -> [String; 3] {
    let Some(before) = before.filter(|_| seconds > 0.0) else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let r = |n: u64, b: u64, scale: f64| si(n.saturating_sub(b) as f64 * scale / seconds);
    [
        r(now.packets, before.packets, 1.0),
        r(now.bytes, before.bytes, 8.0),
        r(now.new_flows, before.new_flows, 1.0),
    ]
}

/// A row whose counters become rates: the name that finds it again in the answer before,
/// and its counts.
trait Counted {
    fn key(&self) -> String;
    fn counts(&self) -> Counts;
}

impl Counted for VipView {
    fn key(&self) -> String {
        format!("{}/{}", self.vip, self.proto)
    }
    fn counts(&self) -> Counts {
        Counts {
            packets: self.packets,
            bytes: self.bytes,
            new_flows: self.new_flows,
        }
    }
}

impl Counted for BackendView {
    fn key(&self) -> String {
        format!("{}/{} {}", self.vip, self.proto, self.address)
    }
    fn counts(&self) -> Counts {
        Counts {
            packets: self.packets,
            bytes: self.bytes,
            new_flows: self.new_flows,
        }
    }
}

/// Each of `rows` with its rates against the same row `before` (`-` where it was not).
fn with_rates<'a, T: Counted>(
    rows: &'a [T],
    before: Option<&[T]>,
    seconds: f64,
) -> impl Iterator<Item = (&'a T, [String; 3])> {
    let old: HashMap<String, Counts> = before
        .into_iter()
        .flatten()
        .map(|r| (r.key(), r.counts()))
        .collect();
    rows.iter().map(move |r| {
        let rates = rates(r.counts(), old.get(&r.key()).copied(), seconds);
        (r, rates)
    })
}

/// One screen: the `stats` answer `data`, with rates against `since` = (seconds, the
/// answer before) when there is one.
pub fn render(data: &StatsView, since: Option<(f64, &StatsView)>) -> String {
    let seconds = since.map_or(0.0, |(s, _)| s);
    let before = since.map(|(_, d)| d);

    let mut out = format!(
        "lb stats --watch: rates over the last {}, Ctrl-C to stop\n\n",
        if since.is_some() {
            format!("{seconds:.1} s")
        } else {
            "second (from the next refresh on)".to_string()
        }
    );
    let rows = with_rates(&data.vips, before.map(|d| &d.vips[..]), seconds)
        .map(|(v, [pps, bps, nfps])| {
            vec![
                v.vip.to_string(),
                v.proto.to_string(),
                format!("{}/{}", v.active_backends, v.backends),
                pps,
                bps,
                nfps,
                v.packets.to_string(),
                v.new_flows.to_string(),
            ]
        })
        .collect();
    out += &super::table::render(
        &[
            "VIP",
            "PROTO",
            "ACTIVE",
            "PKT/S",
            "BIT/S",
            "NEW/S",
            "PACKETS",
            "NEW FLOWS",
        ],
        rows,
    );
    out += "\n";
    let rows = with_rates(&data.backends, before.map(|d| &d.backends[..]), seconds)
        .map(|(b, [pps, bps, nfps])| {
            vec![
                b.vip.to_string(),
                b.address.to_string(),
                b.state.clone(),
                b.role.clone(),
                b.weight.to_string(),
                pps,
                bps,
                nfps,
                b.flows.to_string(),
                b.packets.to_string(),
            ]
        })
        .collect();
    out += &super::table::render(
        &[
            "VIP", "BACKEND", "STATE", "ROLE", "WEIGHT", "PKT/S", "BIT/S", "NEW/S", "FLOWS",
            "PACKETS",
        ],
        rows,
    );
    out += "\n";
    // Reasons that saw packets, in the data plane's order.
    let reason = |d: &StatsView, name: &str| {
        d.reasons.get(name).map(|c| Counts {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: 0,
        })
    };
    let rows = lb_common::Reason::ALL
        .iter()
        .filter_map(|r| {
            let now = reason(data, r.name()).filter(|c| c.packets > 0)?;
            let old = before.and_then(|d| reason(d, r.name()));
            let [pps, bps, _] = rates(now, old, seconds);
            Some(vec![
                r.name().to_string(),
                pps,
                bps,
                now.packets.to_string(),
            ])
        })
        .collect();
    out += &super::table::render(&["REASON", "PKT/S", "BIT/S", "PACKETS"], rows);
    out
}

/// 1234567 -> "1.23M"; plain below 1000.
pub fn si(v: f64) -> String {
    let (v, unit) = match v.abs() {
        x if x >= 1e9 => (v / 1e9, "G"),
        x if x >= 1e6 => (v / 1e6, "M"),
        x if x >= 1e3 => (v / 1e3, "k"),
        _ => return format!("{}", v.round()),
    };
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats(packets: u64, flows: u64) -> StatsView {
        let backend = |address: &str, state: &str, packets: u64, bytes: u64, flows: u64| {
            json!({"vip": "10.99.1.1:80", "proto": "tcp", "address": address, "state": state,
                   "role": "primary", "weight": 1, "backup": false, "drain": state == "draining",
                   "check": "none", "last_check": null, "last_check_detail": null,
                   "check_latency_us": null, "mac": null, "ifindex": null, "note": null,
                   "packets": packets, "bytes": bytes, "new_flows": flows, "flows": flows})
        };
        serde_json::from_value(json!({
            "vips": [{"vip": "10.99.1.1:80", "proto": "tcp", "algo": "rr", "check": "none",
                      "rate_limit": 0, "burst": 0, "backends": 2, "active_backends": 2,
                      "packets": packets, "bytes": packets * 125, "new_flows": flows}],
            "backends": [
                backend("10.99.0.11", "up", packets, packets * 125, flows),
                backend("10.99.0.12", "draining", 7, 700, 1),
            ],
            "reasons": {"forwarded": {"packets": packets + 7, "bytes": 0},
                        "drop_no_backend": {"packets": 0, "bytes": 0}},
            "firewall": []
        }))
        .expect("a stats view")
    }

    fn row<'a>(screen: &'a str, starts: &str) -> Vec<&'a str> {
        screen
            .lines()
            .find(|l| l.starts_with(starts))
            .unwrap_or_else(|| panic!("no line {starts:?} in\n{screen}"))
            .split_whitespace()
            .collect()
    }

    #[test]
    fn rates_from_counter_deltas() {
        let before = stats(1000, 10);
        let now = stats(3000, 30);
        let screen = render(&now, Some((2.0, &before)));
        // 2000 packets and 250 kB (2 Mbit) in 2 s; 20 new flows.
        assert_eq!(
            row(&screen, "10.99.1.1:80  tcp"),
            [
                "10.99.1.1:80",
                "tcp",
                "2/2",
                "1.00k",
                "1.00M",
                "10",
                "3000",
                "30"
            ]
        );
        let b2 = row(&screen, "10.99.1.1:80  10.99.0.12");
        assert_eq!(b2[2..8], ["draining", "primary", "1", "0", "0", "0"]);
        assert_eq!(row(&screen, "forwarded")[1], "1.00k");
        assert!(!screen.contains("drop_no_backend"), "{screen}");
    }

    #[test]
    fn first_screen_has_no_rates_yet() {
        let screen = render(&stats(5, 1), None);
        assert_eq!(row(&screen, "10.99.1.1:80  tcp")[3], "-");
    }

    #[test]
    fn si_units() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1234.0), "1.23k");
        assert_eq!(si(45_600_000.0), "45.6M");
        assert_eq!(si(987_000_000_000.0), "987G");
    }
}
