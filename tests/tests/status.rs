//! `lb status` against a real agent in the namespace test bed: the overview (text and
//! `--json`) names the agent process, its interface and XDP mode, each VIP's backends up
//! out of all with the ones that are not, the drops of the last minute by reason, and the
//! flow table's use.
//!
//! Needs what `tests/e2e.rs` needs (root, `ip`, `nsenter`, `ethtool`, the built `lb` and
//! `xtask`); fails and says what is missing, never skips.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::e2e::*;
use serde_json::Value;
use xtask::testbed::VIP4;

/// One VIP with a backend up, one draining and one down, and a second VIP with no backends
/// that clients try anyway: `lb status` says exactly that, in both forms.
#[test]
fn status_shows_agent_vips_drops_and_flows() {
    let _serial = serial();
    let mut s = Setup::new(3);
    let vip = vip4().to_string();
    add_checked_vip(|a| s.lb(a), &vip, "tcp", 200, 1, 1);
    for i in 1..=3 {
        s.lb(&["backend", "add", &vip, &s.backend(i, false)]);
    }
    s.wait_all_up();
    let (b2, b3) = (s.backend(2, false), s.backend(3, false));
    s.lb(&["backend", "drain", &vip, &b2]);
    s.servers[2].kill();
    wait_backends(&s.bed, &s.socket, "backend 3 down", |l| {
        l.iter()
            .any(|b| field(b, "address") == b3 && field(b, "state") == "down")
    });

    // Answered connections (all to backend 1), and SYNs to a VIP with no backend: refused.
    let tally = s.requests(vip4(), 10);
    assert_split(&tally, &[(1, 10)]);
    let empty = SocketAddr::new(VIP4.into(), 8081);
    s.lb(&["vip", "add", &empty.to_string()]);
    let refused = s.bed.requests(empty, 2).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(refused.errors.len(), 2, "a VIP without backends answered");

    // The agent samples its counters once a second: the drops show within a few.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status: Value = serde_json::from_str(&s.lb(&["status", "--json"]))
            .unwrap_or_else(|e| panic!("lb status --json: {e}"));
        if status["drops"]["by_reason"]["reset_no_backend"].as_u64() >= Some(2) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no reset_no_backend refusals in `lb status` after 10 s: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };

    let pid = s.agent.proc.pid();
    assert_eq!(status["agent"]["pid"], pid, "{status:#}");
    assert!(
        status["agent"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(env!("CARGO_PKG_VERSION"))),
        "{status:#}"
    );
    let ifname = &s.bed.lb.ifname;
    assert_eq!(
        status["interfaces"],
        serde_json::json!([{"name": ifname, "xdp_mode": "native"}])
    );
    let vips = status["vips"].as_array().expect("vips");
    assert_eq!(vips.len(), 2, "{status:#}");
    let by_vip = |v: &str| -> &Value {
        vips.iter()
            .find(|x| x["vip"] == v)
            .unwrap_or_else(|| panic!("no VIP {v} in {status:#}"))
    };
    let main = by_vip(&vip);
    assert_eq!(
        (
            main["backends_up"].as_u64(),
            main["backends_total"].as_u64()
        ),
        (Some(1), Some(3))
    );
    assert_eq!(
        main["not_up"],
        serde_json::json!([
            {"address": b2, "state": "draining"},
            {"address": b3, "state": "down"},
        ])
    );
    assert_eq!(by_vip(&empty.to_string())["backends_total"], 0);
    let window = status["drops"]["window_s"].as_f64().expect("a drop window");
    assert!(window > 0.0 && window <= 60.0, "{status:#}");
    assert!(number(&status["drops"], "total") >= 2, "{status:#}");
    // Ten answered connections are ten flows (the LRU table keeps them a while).
    let entries = number(&status["flow_table"], "entries");
    assert!((10..1000).contains(&entries), "{status:#}");
    assert_eq!(status["flow_table"]["capacity"], 1 << 20);
    assert_eq!(status["fleet"], "standalone");

    // The same, for people.
    let text = s.lb(&["status"]);
    let line = |start: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{start} ")))
            .unwrap_or_else(|| panic!("no {start:?} line in `lb status`:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        line("agent").contains(&format!(", pid {pid}, up ")),
        "{text}"
    );
    assert_eq!(
        line("interfaces"),
        format!("interfaces {ifname} (native XDP)")
    );
    assert_eq!(
        line(&vip),
        format!("{vip} tcp rr 1/3 {b2} draining, {b3} down")
    );
    assert_eq!(line(&empty.to_string()), format!("{empty} tcp rr 0/0 -"));
    assert!(line("drops").contains("reset_no_backend"), "{text}");
    assert!(line("flow table").starts_with("flow table "), "{text}");
    assert_eq!(line("fleet"), "fleet standalone");
}
