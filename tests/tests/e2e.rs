//! End to end: the `lb` agent in a namespace test bed (see `xtask::testbed`), real TCP
//! connections from a client through the VIP to HTTP backends that answer directly.
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, and the binaries `target/<profile>/{lb,xtask}`
//! (`cargo xtask test` builds them first). When any of it is missing the tests fail and say
//! what is missing; they never skip.
//!
//! The tests run one at a time (see `lb_tests::e2e::serial`), each in a test bed of its own.
//! Every connect and read has a timeout, every loop a bound.

use std::{collections::BTreeSet, time::Duration};

use lb_tests::e2e::*;
use xtask::testbed;

/// New connections over two backends split exactly; a backend added at runtime takes its
/// share of new connections and a removed one gets none, while a keep-alive connection to
/// another backend goes on being answered by that backend throughout.
#[test]
fn balances_and_follows_runtime_changes() {
    let _serial = serial();
    let s = Setup::serving(3, &[1, 2]);

    let tally = s.requests(vip4(), 200);
    assert_split(&tally, &[(1, 100), (2, 100)]);
    for b in s.backend_list() {
        assert_eq!(number(&b, "new_flows"), 100, "agent's new-flow count: {b}");
    }

    // One long-lived connection, a request every 100 ms.
    let (keepalive, kept) =
        s.pinned_keepalive(vip4(), Duration::from_millis(100), Duration::from_secs(40));
    let kept_index = index_of(&kept);

    // Backend 3 joins: new connections go round all three.
    s.lb(&["backend", "add", &vip4().to_string(), &s.backend(3, false)]);
    s.wait_all_up();
    let tally = s.requests(vip4(), 30);
    assert_split(&tally, &[(1, 10), (2, 10), (3, 10)]);

    // The other of the first two is removed at once: it gets nothing more.
    let removed = if kept_index == 1 { 2 } else { 1 };
    s.lb(&[
        "backend",
        "del",
        &vip4().to_string(),
        &s.backend(removed, false),
        "--now",
    ]);
    let listed = s.listed_addresses();
    assert!(
        !listed.contains(&s.backend(removed, false)),
        "deleted backend still listed: {listed:?}"
    );
    let tally = s.requests(vip4(), 20);
    let remaining: Vec<(usize, u32)> = [1, 2, 3]
        .into_iter()
        .filter(|&i| i != removed)
        .map(|i| (i, 10))
        .collect();
    assert_split(&tally, &remaining);
    assert_eq!(tally.count(&name(removed)), 0);

    // The keep-alive connection saw all of it and was always answered by its backend.
    let before = keepalive.answers().len();
    keepalive
        .wait_answers(before + 5, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let answers = keepalive.stop();
    assert!(
        answers.len() >= before + 5,
        "keep-alive answers stopped after the changes: {answers:?}"
    );
    assert_all_from(&answers, &kept, "through the changes");
}

/// The agent writes its config back; stopped with SIGTERM and started again with the same
/// file, it serves the same VIP over the same backends.
#[test]
fn config_survives_restart() {
    let _serial = serial();
    let mut s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    let config = std::fs::read_to_string(&s.config).expect("the agent wrote its config file");
    for i in [1, 2] {
        assert!(
            config.contains(&s.backend(i, false)),
            "config lacks backend {i}:\n{config}"
        );
    }

    let status = s
        .agent
        .stop(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        status.success(),
        "agent exit on SIGTERM: {status}\n{}",
        s.agent.proc.log()
    );
    // Nobody answers on the socket now.
    s.lb_fails(&["vip", "list"]);

    s.agent = s
        .bed
        .start_agent(&s.config, &s.socket)
        .unwrap_or_else(|e| panic!("{e:#}"));
    s.wait_all_up();
    let listed: BTreeSet<(String, String)> = s
        .backend_list()
        .iter()
        .map(|b| (field(b, "vip"), field(b, "address")))
        .collect();
    let want: BTreeSet<(String, String)> = [1, 2]
        .into_iter()
        .map(|i| (vip4().to_string(), s.backend(i, false)))
        .collect();
    assert_eq!(listed, want, "backends after restart");

    let tally = s.requests(vip4(), 20);
    assert_split(&tally, &[(1, 10), (2, 10)]);
}

/// An IPv6 VIP with IPv6 backends balances like an IPv4 one.
#[test]
fn ipv6_vip_balances() {
    let _serial = serial();
    let s = Setup::new(2);
    s.configure(vip6(), &[1, 2]);
    s.wait_all_up();
    let tally = s.requests(vip6(), 20);
    assert_split(&tally, &[(1, 10), (2, 10)]);
}

/// Malformed or impossible changes are refused with one line on stderr and a non-zero
/// exit, and change neither the running state, nor the config file, nor the traffic.
#[test]
fn bad_input_changes_nothing() {
    let _serial = serial();
    let s = Setup::serving(2, &[1, 2]);
    let state = s.backend_set();
    let config = std::fs::read_to_string(&s.config).expect("config file");
    let vip = vip4().to_string();
    let b1 = s.backend(1, false);

    let bad: &[&[&str]] = &[
        &["backend", "add", &vip, "not-an-address"],
        &["backend", "add", &vip, "10.99.0.300"],
        &["backend", "add", &vip, "10.99.0.13:80"],
        &["backend", "add", "10.99.9.9:80", &b1],
        &["backend", "add", "10.99.1.1", &b1],
        &["backend", "add", &vip, &b1],
        &["backend", "del", &vip, "10.99.0.99"],
        &["vip", "add", "10.99.1.1"],
        &["vip", "add", "[fd00:99:1::1:80"],
    ];
    for args in bad {
        let message = s.lb_fails(args);
        eprintln!("lb {} -> {message}", args.join(" "));
        assert_eq!(
            s.backend_set(),
            state,
            "state changed by `lb {}`",
            args.join(" ")
        );
        let now = std::fs::read_to_string(&s.config).expect("config file");
        assert_eq!(
            now,
            config,
            "config file changed by `lb {}`",
            args.join(" ")
        );
    }

    let tally = s.requests(vip4(), 20);
    assert_split(&tally, &[(1, 10), (2, 10)]);
}

/// With no agent behind the socket, every CLI command says so on one line.
#[test]
fn cli_without_agent_fails_clearly() {
    let _serial = serial();
    let lb = testbed::bin_dir().expect("binary dir").join("lb");
    assert!(
        lb.is_file(),
        "{} not found: build the binaries first (`cargo xtask test` does)",
        lb.display()
    );
    let dir = std::env::temp_dir().join(format!("lb-e2e-noagent-{}", std::process::id()));
    let socket = dir.join("lb.sock");
    for args in [
        &["vip", "list"][..],
        &["backend", "add", "10.99.1.1:80", "10.99.0.11"],
        &["stats"],
    ] {
        let mut cmd = std::process::Command::new(&lb);
        cmd.args(args).arg("--socket").arg(&socket);
        let out = testbed::run_with_timeout(&mut cmd, Duration::from_secs(10)).expect("run lb");
        let message = one_line_error(&format!("lb {}", args.join(" ")), &out);
        assert!(
            message.contains(&socket.display().to_string()) || message.contains("agent"),
            "the error should name the socket or say no agent runs: {message}"
        );
    }
}
