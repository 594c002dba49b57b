//! `lb status`: the agent's [`StatusView`] on one screen, read back from the same JSON
//! `--json` prints.

use crate::api::views::{Fleet, StatusView};

/// `3725` -> "1h 02m 05s".
fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

pub fn render(s: &StatusView) -> String {
    let a = &s.agent;
    let mut out = format!(
        "agent       lb {}, pid {}, up {}, host {}\n",
        a.version,
        a.pid,
        duration(a.uptime_s),
        a.hostname
    );
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({} XDP)", i.name, i.xdp_mode))
        .collect();
    out += &format!("interfaces  {}\n", ifaces.join(", "));
    let capacity = s.flow_table.capacity;
    out += &match s.flow_table.entries {
        Some(n) => format!(
            "flow table  {n} of {capacity} entries ({:.1}%)\n",
            n as f64 * 100.0 / capacity.max(1) as f64
        ),
        None => format!("flow table  unknown (walk failed; see the agent's log) of {capacity}\n"),
    };
    out += &match s.drops.window_s {
        None => "drops       not sampled yet (the agent samples once a second)\n".to_string(),
        Some(w) if s.drops.total == 0 => format!("drops       none in the last {w:.0} s\n"),
        Some(w) => {
            let reasons: Vec<String> = s
                .drops
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            format!(
                "drops       {} in the last {w:.0} s: {}\n",
                s.drops.total,
                reasons.join(", ")
            )
        }
    };
    out += &match &s.fleet {
        Fleet::Standalone => "fleet       standalone\n".to_string(),
        Fleet::Bgp { summary, .. } | Fleet::Vrrp { summary, .. } => {
            format!("fleet       {summary}\n")
        }
    };
    out += "\n";
    if s.vips.is_empty() {
        out += "no VIPs (add one with `lb vip add ADDR:PORT`, or `lb apply -f FILE`)\n";
        return out;
    }
    let rows = s
        .vips
        .iter()
        .map(|v| {
            let not_up: Vec<String> = v
                .not_up
                .iter()
                .map(|b| format!("{} {}", b.address, b.state))
                .collect();
            vec![
                v.vip.to_string(),
                v.proto.to_string(),
                v.algo.to_string(),
                format!("{}/{}", v.backends_up, v.backends_total),
                if not_up.is_empty() {
                    "-".into()
                } else {
                    not_up.join(", ")
                },
            ]
        })
        .collect();
    out += &super::table::render(&["VIP", "PROTO", "ALGO", "UP", "NOT UP"], rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::views::*;

    fn view() -> StatusView {
        serde_json::from_value(serde_json::json!({
            "agent": {"version": "0.1.0 (commit abc)", "pid": 42, "hostname": "lb1",
                      "started": 0.0, "uptime_s": 3725},
            "interfaces": [{"name": "eth0", "xdp_mode": "native"}],
            "vips": [
                {"vip": "10.99.1.1:80", "proto": "tcp", "algo": "rr", "backends_up": 1,
                 "backends_total": 3, "not_up": [
                     {"address": "10.99.0.12", "state": "down"},
                     {"address": "10.99.0.13", "state": "draining"}]},
                {"vip": "[fd00::1]:53", "proto": "udp", "algo": "maglev", "backends_up": 2,
                 "backends_total": 2, "not_up": []}
            ],
            "drops": {"window_s": 60.0, "total": 12,
                      "by_reason": {"drop_fragment": 2, "drop_no_backend": 10}},
            "flow_table": {"entries": 1024, "capacity": 1048576},
            "fleet": "standalone"
        }))
        .unwrap()
    }

    #[test]
    fn one_screen() {
        let screen = render(&view());
        let line = |start: &str| {
            screen
                .lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} line in\n{screen}"))
                .to_string()
        };
        assert_eq!(
            line("agent"),
            "agent       lb 0.1.0 (commit abc), pid 42, up 1h 02m 05s, host lb1"
        );
        assert_eq!(line("interfaces"), "interfaces  eth0 (native XDP)");
        assert_eq!(
            line("flow table"),
            "flow table  1024 of 1048576 entries (0.1%)"
        );
        assert_eq!(
            line("drops"),
            "drops       12 in the last 60 s: drop_fragment 2, drop_no_backend 10"
        );
        assert_eq!(line("fleet"), "fleet       standalone");
        assert_eq!(
            line("10.99.1.1:80"),
            "10.99.1.1:80  tcp    rr      1/3  10.99.0.12 down, 10.99.0.13 draining"
        );
        assert_eq!(line("[fd00::1]:53"), "[fd00::1]:53  udp    maglev  2/2  -");
    }

    #[test]
    fn quiet_and_empty() {
        let mut v = view();
        v.vips.clear();
        v.drops = DropsView {
            window_s: Some(8.0),
            total: 0,
            by_reason: Default::default(),
        };
        let screen = render(&v);
        assert!(
            screen.contains("drops       none in the last 8 s\n"),
            "{screen}"
        );
        assert!(
            screen.contains("no VIPs (add one with `lb vip add"),
            "{screen}"
        );
        v.drops.window_s = None;
        assert!(render(&v).contains("drops       not sampled yet"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 05s");
        assert_eq!(duration(90061), "1d 01h 01m");
    }
}
