//! End to end, the firewall and hardening (issue 4), in the namespace test bed: a dropped
//! CIDR gets nothing through while other clients are served; a SYN flood from one source
//! does not stop another client; TLS passes through the VIP untouched and `tls` checks see
//! the TLS backends; the VIP answers ping; the control socket refuses non-root callers; a
//! broken config file is refused with its line.
//!
//! Uses public tools inside the test bed's namespaces only: curl, hping3, openssl, ping,
//! setpriv (x.sh installs them). Every command has a timeout, every flood a time bound.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::e2e::*;
use serde_json::Value;
use xtask::testbed::{HTTP_PORT, Proc, VIP4, run_with_timeout};

/// A second address of the client host, for "another client" on the same segment.
const OTHER_CLIENT: &str = "10.99.0.3";

fn run_in(s: &Setup, ns: &str, program: &str, args: &[&str]) -> std::process::Output {
    s.bed
        .run_in(ns, program, args)
        .unwrap_or_else(|e| panic!("{program}: {e:#}"))
}

/// One HTTP GET through the VIP from `source` with curl; the body, or None on failure.
fn curl_from(s: &Setup, source: &str) -> Option<String> {
    let url = format!("http://{VIP4}:{HTTP_PORT}/");
    let out = run_in(
        s,
        &s.bed.client.ns,
        "curl",
        &["-s", "-m", "2", "--interface", source, &url],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn stats(s: &Setup) -> Value {
    serde_json::from_str(&s.lb(&["stats", "--json"])).expect("stats --json is JSON")
}

fn reason(s: &Setup, name: &str) -> u64 {
    stats(s)["reasons"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reason {name}"))
}

#[test]
fn a_dropped_cidr_gets_nothing_through_while_others_are_served() {
    let _serial = serial();
    let s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    s.bed
        .ip(
            &s.bed.client.ns,
            &["addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", "eth0"],
        )
        .unwrap();
    assert!(
        curl_from(&s, OTHER_CLIENT).is_some(),
        "the other client is served before the rule"
    );

    s.lb(&["firewall", "add", &format!("{OTHER_CLIENT}/32")]);
    for _ in 0..3 {
        assert_eq!(
            curl_from(&s, OTHER_CLIENT),
            None,
            "a dropped source got an answer"
        );
    }
    let tally = s.requests(vip4(), 20);
    assert_split(&tally, &[(1, 10), (2, 10)]);

    let rules: Value = serde_json::from_str(&s.lb(&["firewall", "list", "--json"])).unwrap();
    assert_eq!(rules[0]["cidr"], format!("{OTHER_CLIENT}/32"));
    assert!(
        rules[0]["packets"].as_u64().unwrap() >= 3,
        "hits counted: {rules}"
    );
    assert!(reason(&s, "drop_firewall") >= 3);
    // The rule is in the config file, and removing it lets the source in again.
    let config = std::fs::read_to_string(&s.config).unwrap();
    assert!(
        config.contains(&format!("\"{OTHER_CLIENT}/32\"")),
        "{config}"
    );
    s.lb(&["firewall", "del", &format!("{OTHER_CLIENT}/32")]);
    assert!(
        curl_from(&s, OTHER_CLIENT).is_some(),
        "served again after the rule went"
    );
}

#[test]
fn a_syn_flood_from_one_source_does_not_stop_another_client() {
    let _serial = serial();
    let s = Setup::new(2);
    let v = vip4().to_string();
    s.lb(&["vip", "add", &v, "--rate-limit", "50", "--burst", "50"]);
    for i in 1..=2 {
        s.lb(&["backend", "add", &v, &s.backend(i, false)]);
    }
    s.bed
        .ip(
            &s.bed.client.ns,
            &["addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", "eth0"],
        )
        .unwrap();
    // SYNs as fast as hping3 can, from one source with a new port each time: every one a
    // new flow. Bounded by timeout(1), and killed by PID at the end of the test anyway.
    let vip = VIP4.to_string();
    let mut flood: Proc = s
        .bed
        .spawn_in(
            &s.bed.client.ns,
            "timeout",
            [
                "6",
                "hping3",
                "--flood",
                "-q",
                "-S",
                "-p",
                "80",
                "-a",
                OTHER_CLIENT,
                &vip,
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    // Every one answered (`requests` fails on any error). The split is not exact: the
    // flood's admitted SYNs take round-robin turns too.
    let tally = s.requests(vip4(), 20);
    assert_eq!(tally.counts.values().sum::<u32>(), 20, "{tally:?}");
    let during = started.elapsed();
    let limited = reason(&s, "drop_rate_limited");
    flood.kill();
    assert!(
        limited > 1000,
        "the flood was hardly limited: {limited} drops"
    );
    println!("20 requests during the flood took {during:?}; {limited} flood SYNs dropped");
}

fn openssl(args: &[&str]) {
    run_ok(
        &format!("openssl {args:?}"),
        std::process::Command::new("openssl").args(args),
        Duration::from_secs(20),
    );
}

/// A test CA and a server certificate it signed for the VIP and both backends' addresses,
/// made now with openssl: (CA, certificate, key).
fn make_certificate(s: &Setup) -> (String, String, String) {
    let path = |name: &str| s.bed.dir().join(name).display().to_string();
    let (ca, ca_key, csr, cert, key, ext) = (
        path("ca.pem"),
        path("ca.key"),
        path("tls.csr"),
        path("tls.pem"),
        path("tls.key"),
        path("tls.ext"),
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=lb test CA",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=lb test backend",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        ]
        .concat(),
    );
    let san = format!(
        "subjectAltName=IP:{VIP4},IP:{},IP:{}\nbasicConstraints=CA:FALSE\n",
        s.backend(1, false),
        s.backend(2, false)
    );
    std::fs::write(&ext, san).unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (ca, cert, key)
}

#[test]
fn tls_passes_through_untouched_and_tls_checks_see_the_backends() {
    let _serial = serial();
    let s = Setup::new(2);
    let (ca, cert, key) = make_certificate(&s);
    let mut tls_servers: Vec<Proc> = (1..=2)
        .map(|i| {
            let ns = s.bed.backends[i - 1].ns.clone();
            s.bed
                .spawn_in(
                    &ns,
                    "openssl",
                    [
                        "s_server", "-accept", "443", "-cert", &cert, "-key", &key, "-www",
                        "-quiet",
                    ],
                )
                .unwrap()
        })
        .collect();
    let tls_vip = SocketAddr::new(IpAddr::V4(VIP4), 443).to_string();
    add_checked_vip(|a| s.lb(a), &tls_vip, "tls", 200, 1, 2);
    for i in 1..=2 {
        s.lb(&["backend", "add", &tls_vip, &s.backend(i, false)]);
    }
    // Backends start up (as HAProxy's do); wait for checks to have run and passed.
    let checked_up = |list: &[Value]| {
        let tls: Vec<&Value> = list
            .iter()
            .filter(|b| b["vip"] == "10.99.1.1:443")
            .collect();
        tls.len() == 2
            && tls
                .iter()
                .all(|b| b["state"] == "up" && b["last_check"] == "ok")
    };
    wait_backends(&s.bed, &s.socket, "TLS backends checked up", checked_up);
    let list = s.backend_list();
    for b in list.iter().filter(|b| b["vip"] == "10.99.1.1:443") {
        assert_eq!(b["last_check"], "ok", "{b}");
        assert!(field(b, "last_check_detail").contains("TLS"), "{b}");
    }

    // The client verifies the backends' certificate through the VIP: the balancer neither
    // terminates nor touches TLS.
    for _ in 0..4 {
        let out = run_in(
            &s,
            &s.bed.client.ns,
            "timeout",
            &[
                "5",
                "openssl",
                "s_client",
                "-connect",
                &tls_vip,
                "-CAfile",
                &ca,
                "-verify_return_error",
                "-brief",
            ],
        );
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Verification: OK"),
            "s_client: {text}"
        );
    }

    // Checks that verify against the CA pass too; a backend whose TLS server stops is down.
    s.lb(&["vip", "set", &tls_vip, "--tls-ca", &ca]);
    wait_backends(&s.bed, &s.socket, "verified TLS backends up", checked_up);
    tls_servers[0].kill();
    wait_backends(&s.bed, &s.socket, "backend 1 down", |list| {
        list.iter().any(|b| {
            b["vip"] == "10.99.1.1:443" && b["address"] == "10.99.0.11" && b["state"] == "down"
        })
    });
    // A tls check against a plain HTTP port fails: it is a real handshake, not a connect.
    s.lb(&[
        "vip",
        "add",
        &vip4().to_string(),
        "--check",
        "tls",
        "--interval",
        "200",
        "--fall",
        "2",
    ]);
    s.lb(&["backend", "add", &vip4().to_string(), &s.backend(2, false)]);
    wait_backends(
        &s.bed,
        &s.socket,
        "plain HTTP backend down under a tls check",
        |list| {
            list.iter()
                .any(|b| b["vip"] == "10.99.1.1:80" && b["state"] == "down")
        },
    );
}

#[test]
fn the_vip_answers_ping_from_xdp() {
    let _serial = serial();
    let s = Setup::new(1);
    s.configure(vip4(), &[1]);
    let before = reason(&s, "icmp_echo_reply");
    let out = run_in(
        &s,
        &s.bed.client.ns,
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", &VIP4.to_string()],
    );
    assert!(
        out.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(reason(&s, "icmp_echo_reply") - before, 3);
}

#[test]
fn the_control_socket_refuses_non_root_callers() {
    let _serial = serial();
    let s = Setup::new(1);
    let lb = s.bed.bin("lb").unwrap();
    let out = run_with_timeout(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&lb)
            .args(["vip", "list", "--socket"])
            .arg(&s.socket),
        Duration::from_secs(10),
    )
    .unwrap();
    let line = one_line_error("lb vip list as nobody", &out);
    assert!(line.contains("permission denied"), "{line}");
    // Root still gets in.
    s.lb(&["vip", "list"]);
}

#[test]
fn a_broken_config_file_is_refused_with_its_line() {
    let _serial = serial();
    let s = Setup::new(1);
    let bad = s.bed.dir().join("bad.toml");
    std::fs::write(
        &bad,
        "[[vip]]\naddress = \"10.99.1.1:80\"\n\n[[vip.backend]]\naddress = \"10.99.0.11\"\n[[vip.backend]]\naddress = \"10.99.0.11\"\n",
    )
    .unwrap();
    let lb = s.bed.bin("lb").unwrap();
    let socket = s.bed.dir().join("other.sock");
    let ns = s.bed.lb.ns.clone();
    let out = s
        .bed
        .run_in(
            &ns,
            lb,
            [
                "run",
                "--iface",
                "eth0",
                "--no-pin",
                "--config",
                &bad.display().to_string(),
                "--socket",
                &socket.display().to_string(),
            ],
        )
        .unwrap();
    let line = one_line_error("lb run with a broken config", &out);
    assert!(
        line.contains("bad.toml: line 7:") && line.contains("listed twice"),
        "{line}"
    );
    // The running agent was not disturbed.
    s.lb(&["vip", "list"]);
}
