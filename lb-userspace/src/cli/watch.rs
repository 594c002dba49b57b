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
use serde_json::Value;

use crate::api::protocol::{self as control, Request, Response};

const EVERY: Duration = Duration::from_secs(1);

/// Polls and redraws until interrupted, or `count` times.
pub fn run(socket: &Path, count: Option<u64>) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, Value)> = None;
    let mut next = Instant::now();
    for n in 1.. {
        let data = match control::call(socket, &Request::Stats)? {
            Response::Ok { data, .. } => data,
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

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

fn s(v: &Value, field: &str) -> String {
    match &v[field] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
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

/// Rates of one item from its counters now and before.
fn rates(now: &Value, before: Option<&Value>, seconds: f64) -> [String; 3] {
    let Some(before) = before.filter(|_| seconds > 0.0) else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let r =
        |f: &str, scale: f64| si(u(now, f).saturating_sub(u(before, f)) as f64 * scale / seconds);
    [r("packets", 1.0), r("bytes", 8.0), r("new_flows", 1.0)]
}

fn index(items: &Value, key: impl Fn(&Value) -> String) -> HashMap<String, &Value> {
    items
        .as_array()
        .map(|a| a.iter().map(|i| (key(i), i)).collect())
        .unwrap_or_default()
}

fn vip_key(v: &Value) -> String {
    format!("{}/{}", s(v, "vip"), s(v, "proto"))
}

fn backend_key(b: &Value) -> String {
    format!("{} {}", vip_key(b), s(b, "address"))
}

/// One screen: the `stats` answer `data`, with rates against `since` = (seconds, the
/// answer before) when there is one.
pub fn render(data: &Value, since: Option<(f64, &Value)>) -> String {
    let seconds = since.map_or(0.0, |(s, _)| s);
    let before = since.map(|(_, d)| d);
    let old_vips = before
        .map(|d| index(&d["vips"], vip_key))
        .unwrap_or_default();
    let old_backends = before
        .map(|d| index(&d["backends"], backend_key))
        .unwrap_or_default();

    let mut out = format!(
        "lb stats --watch: rates over the last {}, Ctrl-C to stop\n\n",
        if since.is_some() {
            format!("{seconds:.1} s")
        } else {
            "second (from the next refresh on)".to_string()
        }
    );
    let vips = data["vips"].as_array().cloned().unwrap_or_default();
    let rows = vips
        .iter()
        .map(|v| {
            let [pps, bps, nfps] = rates(v, old_vips.get(&vip_key(v)).copied(), seconds);
            vec![
                s(v, "vip"),
                s(v, "proto"),
                format!("{}/{}", u(v, "active_backends"), u(v, "backends")),
                pps,
                bps,
                nfps,
                u(v, "packets").to_string(),
                u(v, "new_flows").to_string(),
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
    let backends = data["backends"].as_array().cloned().unwrap_or_default();
    let rows = backends
        .iter()
        .map(|b| {
            let [pps, bps, nfps] = rates(b, old_backends.get(&backend_key(b)).copied(), seconds);
            vec![
                s(b, "vip"),
                s(b, "address"),
                s(b, "state"),
                s(b, "role"),
                s(b, "weight"),
                pps,
                bps,
                nfps,
                s(b, "flows"),
                u(b, "packets").to_string(),
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
    let rows = lb_common::Reason::ALL
        .iter()
        .filter_map(|r| {
            let now = &data["reasons"][r.name()];
            if u(now, "packets") == 0 {
                return None;
            }
            let old = before.map(|d| &d["reasons"][r.name()]);
            let [pps, bps, _] = rates(now, old, seconds);
            Some(vec![
                r.name().to_string(),
                pps,
                bps,
                u(now, "packets").to_string(),
            ])
        })
        .collect();
    out += &super::table::render(&["REASON", "PKT/S", "BIT/S", "PACKETS"], rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats(packets: u64, flows: u64) -> Value {
        json!({
            "vips": [{"vip": "10.99.1.1:80", "proto": "tcp", "backends": 2, "active_backends": 2,
                      "packets": packets, "bytes": packets * 125, "new_flows": flows}],
            "backends": [
                {"vip": "10.99.1.1:80", "proto": "tcp", "address": "10.99.0.11", "state": "up",
                 "role": "primary", "weight": 1, "packets": packets, "bytes": packets * 125,
                 "new_flows": flows, "flows": flows},
                {"vip": "10.99.1.1:80", "proto": "tcp", "address": "10.99.0.12", "state": "draining",
                 "role": "primary", "weight": 1, "packets": 7, "bytes": 700, "new_flows": 1, "flows": 1}
            ],
            "reasons": {"forwarded": {"packets": packets + 7, "bytes": 0},
                        "drop_no_backend": {"packets": 0, "bytes": 0}}
        })
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
