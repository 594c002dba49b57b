//! End to end, the agent across restarts (issue 10): adopted ids whatever the order of the
//! config, one agent per pin directory, pinned state that holds only drop rules, a pinned
//! layout from an older binary, neighbour entries of backends in use, and one unreachable
//! backend beside good ones. Real TCP connections from the client namespace through the
//! VIP, in the namespace test bed of `xtask::testbed` (see `tests/e2e.rs` for the basics).
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, and the binaries `target/<profile>/{lb,xtask}`
//! (`cargo xtask test` builds them first). Every wait has a bound, every loop a count.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::e2e::*;
use serde_json::Value;
use xtask::{
    testbed::{HTTP_PORT, VIP4, run_with_timeout},
    traffic::Answer,
};

/// `kill -9` of the agent, a new config file, and a new agent on the same pins.
fn restart_with(s: &mut Setup, config: &str) {
    s.agent.proc.kill();
    std::fs::write(&s.config, config).unwrap();
    s.agent = s
        .bed
        .start_agent(&s.config, &s.socket)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Every answer of a keep-alive connection must be from `backend`, with no error.
fn assert_all_from(answers: &[Answer], backend: &str, what: &str) {
    assert!(answers.len() >= 5, "{what}: too few answers: {answers:?}");
    for a in answers {
        match a {
            Answer::Ok { backend: b, .. } if b == backend => {}
            other => panic!("{what}: {other:?} (pinned to {backend}); all: {answers:?}"),
        }
    }
}

fn vip_toml(vip: SocketAddr, backends: &[String]) -> String {
    let mut out = format!("[[vip]]\naddress = \"{vip}\"\nproto = \"tcp\"\nalgo = \"rr\"\n");
    for b in backends {
        out += &format!("\n[[vip.backend]]\naddress = \"{b}\"\n");
    }
    out + "\n"
}

/// A restarted agent whose config puts a new VIP with a new backend before the adopted
/// ones keeps the adopted VIP's and backends' ids: established round-robin connections
/// keep their backend (a new id would fail their generation check and re-balance them).
#[test]
fn adopted_ids_survive_a_reordered_config() {
    let _serial = serial();
    let mut s = Setup::new(3);
    s.configure(vip4(), &[1, 2]);
    let (keepalive, backend) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));

    let other = SocketAddr::new(VIP4.into(), HTTP_PORT + 1);
    let config = vip_toml(other, &[s.backend(3, false)])
        + &vip_toml(vip4(), &[s.backend(1, false), s.backend(2, false)]);
    restart_with(&mut s, &config);
    let seen = keepalive.answers().len();
    keepalive
        .wait_answers(seen + 10, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_all_from(&keepalive.stop(), &backend, "across the restart");
    // Both VIPs balance as configured.
    let tally = s.requests_from(vip4(), 10, 21_000);
    assert_split(&tally, &[(1, 5), (2, 5)]);
}

/// A second `lb run` on the same pin directory (another control socket) exits at once with
/// one line naming the first agent's PID, and the first one goes on undisturbed.
#[test]
fn a_second_agent_on_the_same_pins_is_refused() {
    let _serial = serial();
    let s = Setup::new(1);
    s.configure(vip4(), &[1]);
    let mut cmd = s.bed.command_in(&s.bed.lb.ns, s.bed.bin("lb").unwrap());
    cmd.args(["run", "--iface", &s.bed.lb.ifname, "--config"])
        .arg(s.bed.dir().join("second.toml"))
        .arg("--socket")
        .arg(s.bed.dir().join("second.sock"));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20)).unwrap();
    let line = one_line_error("a second lb run", &out);
    let pid = s.agent.proc.pid().to_string();
    assert!(
        line.contains(&format!("PID {pid}")),
        "the error should name the running agent (PID {pid}): {line}"
    );
    assert_eq!(s.backend_set().len(), 1);
    s.requests(vip4(), 5);
}

/// Pinned state holding only drop rules (no VIP) is taken over like any other: a rule the
/// restarted agent's config no longer has stops dropping, and `lb firewall list` shows what
/// the data plane does.
#[test]
fn pinned_drop_rules_alone_are_adopted_or_cleared() {
    let _serial = serial();
    let mut s = Setup::new(1);
    let client = format!("{}/32", s.bed.client.ipv4);
    s.lb(&["firewall", "add", &client]);
    s.lb(&["firewall", "add", "198.51.100.0/24"]);

    restart_with(&mut s, "[firewall]\ndrop = [\"198.51.100.0/24\"]\n");
    let list = s.lb(&["firewall", "list"]);
    assert!(
        list.contains("198.51.100.0/24"),
        "kept rule not listed:\n{list}"
    );
    assert!(
        !list.contains(&client),
        "removed rule still listed:\n{list}"
    );
    s.configure(vip4(), &[1]);
    s.requests(vip4(), 5);
}

/// XDP never confirms a neighbour entry: the agent makes the entries of backends in use
/// kernel-managed, and while one is deleted (again and again, as garbage collection or a
/// flush would) an established connection keeps going to the last known MAC and the
/// backend never shows as unresolved.
#[test]
fn a_flushed_neighbour_entry_breaks_no_connection() {
    let _serial = serial();
    let s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    let neigh = |args: &[&str]| {
        s.bed
            .run_in_ok(&s.bed.lb.ns, "ip", args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    for i in [1, 2] {
        let b = s.backend(i, false);
        let shown = neigh(&["neigh", "show", &b, "dev", "eth0"]);
        assert!(
            shown.contains("managed"),
            "backend {b} not managed: {shown}"
        );
    }
    let (keepalive, backend) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));
    let addr = s
        .bed
        .backends
        .iter()
        .zip(1..)
        .find(|(_, i)| name(*i) == backend)
        .map(|(h, _)| h.ipv4.to_string())
        .expect("the backend answering is one of ours");
    // Longer than a full refresh of every backend (5 s); deleted every 100 ms.
    let until = Instant::now() + Duration::from_secs(7);
    let mut states = Vec::new();
    for _ in 0..200 {
        if Instant::now() >= until {
            break;
        }
        let _ = s
            .bed
            .run_in(&s.bed.lb.ns, "ip", ["neigh", "del", &addr, "dev", "eth0"]);
        let list: Vec<Value> = s.backend_list();
        states.extend(
            list.iter()
                .filter(|b| field(b, "address") == addr)
                .map(|b| field(b, "state")),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers = keepalive.stop();
    assert_all_from(&answers, &backend, "while its neighbour entry was deleted");
    assert!(
        states.iter().all(|st| st == "up"),
        "backend {addr} was not always up: {states:?}"
    );
}

/// A blackhole route to one backend is that backend's note (state unresolved, the reason
/// in `lb backend list`), not a failure of the change, of the periodic refresh or of the
/// next start: the other backend serves.
#[test]
fn a_blackholed_backend_is_its_own_problem() {
    let _serial = serial();
    let mut s = Setup::new(2);
    let bad = s.backend(2, false);
    s.bed
        .ip(
            &s.bed.lb.ns,
            &["route", "add", "blackhole", &format!("{bad}/32")],
        )
        .unwrap();
    s.configure(vip4(), &[1, 2]);
    let check = |s: &Setup| {
        wait_backends(&s.bed, &s.socket, "backend 2 unresolved, 1 up", |list| {
            list.iter().any(|b| {
                field(b, "address") == bad
                    && field(b, "state") == "unresolved"
                    && b.to_string().contains("blackhole")
            }) && list.iter().any(|b| field(b, "state") == "up")
        });
        let tally = s.requests_from(vip4(), 6, 22_000 + s.agent.proc.pid() as u16 % 1000);
        assert_split(&tally, &[(1, 6)]);
    };
    check(&s);
    // Removing the good backend retires its id and ring space: the pass that frees them
    // runs despite the bad one, and adding it back works.
    let good = s.backend(1, false);
    let v = vip4().to_string();
    s.lb(&["backend", "del", &v, &good]);
    s.lb(&["backend", "add", &v, &good]);
    check(&s);
    // And a restart with it in the config starts.
    let config = std::fs::read_to_string(&s.config).unwrap();
    restart_with(&mut s, &config);
    check(&s);
}
