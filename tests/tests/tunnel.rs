//! End to end, tunnel and gue modes: backends two routers away, each in a subnet of its
//! own (`Testbed::add_routed_backends`), running `lb decap`; the balancer wraps the
//! client's packets and sends them to r1's MAC, the backends answer the client directly.
//! The same balancer serves a dsr VIP and a nat VIP beside them: every mode at once.
//! One shared test bed; every connect and read has a timeout, every loop a bound.
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, `socat`, `sha256sum` and the binaries (`cargo
//! xtask test` builds them). When any of it is missing the test fails and says so.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_tests::{e2e::*, stack};
use xtask::testbed::{self, Config, HTTP_PORT, Host, Proc, Testbed, VIP4, VIP6, wait_until};

const GUE_PORT: u16 = 6080;
/// A dsr VIP's port on the same balancer, served by the on-link backend.
const DSR_PORT: u16 = 8080;
/// A nat VIP's port on the same balancer, served by the routed backends as plain servers.
const NAT_PORT: u16 = 8082;
const UPLOAD_PORT: u16 = 9000;
const DOWNLOAD_PORT: u16 = 9001;
/// The long transfers, each way.
const TRANSFER_MB: u64 = 100;

fn or_panic<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Bytes of every frame the balancer's XDP program has seen on its interface: each is
/// counted under exactly one reason, whatever became of it.
fn xdp_bytes(bed: &Testbed, socket: &Path) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&lb_at(bed, socket, &["stats", "--json"])).unwrap();
    let reasons = stats["reasons"]
        .as_object()
        .expect("reasons in lb stats --json");
    reasons.values().map(|r| r["bytes"].as_u64().unwrap()).sum()
}

/// `xtask serve` (HTTP and UDP on port 80), the transfer servers and `lb decap` (last) on
/// routed backend `i`.
fn start_servers(bed: &Testbed, i: usize, b: &Host, data: &Path) -> Vec<Proc> {
    let name = name(i);
    let mut serve = or_panic(bed.spawn_in(
        &b.ns,
        or_panic(bed.bin("xtask")),
        ["serve", "--name", &name, "--port", &HTTP_PORT.to_string()],
    ));
    or_panic(wait_until(Duration::from_secs(10), || {
        anyhow::ensure!(
            serve.try_wait().is_none(),
            "{name} exited:\n{}",
            serve.log()
        );
        Ok(serve.log().contains(&format!("{name} listening")))
    }));
    // Uploads are hashed and the hash sent back; downloads send `data`.
    let upload = or_panic(bed.spawn_in(
        &b.ns,
        "socat",
        [
            format!("TCP6-LISTEN:{UPLOAD_PORT},ipv6only=0,reuseaddr,fork"),
            "EXEC:sha256sum".into(),
        ],
    ));
    let download = or_panic(bed.spawn_in(
        &b.ns,
        "socat",
        [
            format!("TCP6-LISTEN:{DOWNLOAD_PORT},ipv6only=0,reuseaddr,fork"),
            format!("OPEN:{},rdonly", data.display()),
        ],
    ));
    // `lb decap`, stripping IP-in-IP and GUE for both VIPs.
    let mut decap = or_panic(bed.spawn_in(
        &b.ns,
        or_panic(bed.bin("lb")),
        [
            "decap",
            "--iface",
            &b.ifname,
            "--vip",
            &VIP4.to_string(),
            "--vip",
            &VIP6.to_string(),
            "--gue-port",
            &GUE_PORT.to_string(),
            "--interval",
            "0",
        ],
    ));
    or_panic(wait_until(Duration::from_secs(10), || {
        anyhow::ensure!(
            decap.try_wait().is_none(),
            "lb decap exited:\n{}",
            decap.log()
        );
        Ok(decap.log().contains("lb decap: attached"))
    }));
    vec![serve, upload, download, decap]
}

fn config(backends: &[Host], on_link: &Host) -> String {
    // A dsr VIP beside the tunnels: its on-link backend serves, the routed one cannot (dsr
    // rewrites MACs only) and must say so. And a nat VIP, whose routed backends see plain
    // connections from the balancer.
    let mut text = format!(
        "[[vip]]\naddress = \"{VIP4}:{DSR_PORT}\"\n[vip.check]\ncheck = \"none\"\n\
         [[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n\
         [[vip]]\naddress = \"{VIP4}:{NAT_PORT}\"\nmode = \"nat\"\n[vip.check]\ncheck = \"tcp\"\n",
        on_link.ipv4, backends[0].ipv4
    );
    for b in backends {
        text += &format!("[[vip.backend]]\naddress = \"{}\"\n", b.ipv4);
    }
    let vips = [
        (
            SocketAddr::new(VIP4.into(), HTTP_PORT),
            "tcp",
            "tunnel",
            false,
        ),
        (SocketAddr::new(VIP4.into(), HTTP_PORT), "udp", "gue", false),
        (
            SocketAddr::new(VIP4.into(), stack::HTTPS_PORT),
            "tcp",
            "tunnel",
            false,
        ),
        (SocketAddr::new(VIP6.into(), HTTP_PORT), "tcp", "gue", true),
        (
            SocketAddr::new(VIP4.into(), UPLOAD_PORT),
            "tcp",
            "tunnel",
            false,
        ),
        (
            SocketAddr::new(VIP6.into(), UPLOAD_PORT),
            "tcp",
            "tunnel",
            true,
        ),
        (
            SocketAddr::new(VIP4.into(), DOWNLOAD_PORT),
            "tcp",
            "gue",
            false,
        ),
    ];
    for (vip, proto, mode, v6) in vips {
        text += &format!(
            "[[vip]]\naddress = \"{vip}\"\nproto = \"{proto}\"\nmode = \"{mode}\"\n\
             [vip.check]\ncheck = \"none\"\n"
        );
        for b in backends {
            text += &format!("[[vip.backend]]\naddress = \"{}\"\n", b.addr(v6));
        }
    }
    text + &format!("[tunnel]\ngue_port = {GUE_PORT}\n")
}

/// A transfer run in the client's namespace through socat; returns the SHA-256 it printed.
fn client_sha(bed: &Testbed, script: &str) -> String {
    let out = or_panic(bed.run_in_ok(&bed.client.ns, "sh", ["-c", script]));
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no hash from {script:?}: {out:?}"))
        .to_string()
}

#[test]
fn routed_backends_behind_tunnels_answer_clients_directly() {
    let _serial = serial();
    for tool in ["socat", "sha256sum"] {
        assert!(
            testbed::find_in_path(tool).is_some(),
            "{tool} not found: install it (./x.sh installs the test dependencies)"
        );
    }
    let mut bed = or_panic(Testbed::new(Config { backends: 1 }));
    let backends = or_panic(bed.add_routed_backends(2));
    let data = bed.dir().join("data");
    or_panic(bed.run_in_ok(
        &bed.client.ns,
        "sh",
        [
            "-c",
            &format!(
                "head -c {}M /dev/urandom > {} && chmod 644 {}",
                TRANSFER_MB,
                data.display(),
                data.display()
            ),
        ],
    ));
    let want = client_sha(&bed, &format!("sha256sum {}", data.display()));
    let mut servers: Vec<Proc> = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| start_servers(&bed, i + 1, b, &data))
        .collect();
    let on_link = bed.backends[0].clone();
    let mut nat_servers = Vec::new();
    let mut dsr_server = or_panic(bed.spawn_in(
        &on_link.ns,
        or_panic(bed.bin("xtask")),
        ["serve", "--name", &name(3), "--port", &DSR_PORT.to_string()],
    ));
    or_panic(wait_until(Duration::from_secs(10), || {
        anyhow::ensure!(dsr_server.try_wait().is_none(), "{}", dsr_server.log());
        Ok(dsr_server.log().contains("listening"))
    }));
    // The nat VIP's servers on the routed backends (sending frames, not 64 KB segments, as
    // real NICs do), and a balancer that forwards (a NAT answer's FIB lookup needs it).
    for (i, b) in backends.iter().enumerate() {
        or_panic(bed.run_in_ok(&b.ns, "ethtool", ["-K", b.ifname.as_str(), "tx", "off"]));
        let mut serve = or_panic(bed.spawn_in(
            &b.ns,
            or_panic(bed.bin("xtask")),
            [
                "serve",
                "--name",
                &name(i + 1),
                "--port",
                &NAT_PORT.to_string(),
            ],
        ));
        or_panic(wait_until(Duration::from_secs(10), || {
            anyhow::ensure!(serve.try_wait().is_none(), "{}", serve.log());
            Ok(serve.log().contains("listening"))
        }));
        nat_servers.push(serve);
    }
    or_panic(bed.run_in_ok(
        &bed.lb.ns,
        "sysctl",
        ["-qw", "net.ipv4.conf.all.forwarding=1"],
    ));
    let config_path = bed.dir().join("lb.toml");
    std::fs::write(&config_path, config(&backends, &on_link)).unwrap();
    let socket = bed.dir().join("lb.sock");
    let _agent = or_panic(bed.start_agent(&config_path, &socket));
    // Routed backends resolve to r1's MAC and come up, except for the dsr VIP.
    let dsr_vip = SocketAddr::new(VIP4.into(), DSR_PORT);
    let refused = |b: &serde_json::Value| {
        field(b, "vip") == dsr_vip.to_string()
            && field(b, "address") == backends[0].ipv4.to_string()
    };
    wait_backends(&bed, &socket, "every usable backend up", |list| {
        list.len() == 18
            && list
                .iter()
                .all(|b| field(b, "state") == if refused(b) { "unresolved" } else { "up" })
    });
    let list = backend_list_at(&bed, &socket);
    let note = field(list.iter().find(|b| refused(b)).unwrap(), "note");
    assert!(note.contains("routed via 10.99.0.254"), "{note}");

    // 200 connections split evenly, over IP-in-IP (IPv4) and GUE (IPv6).
    for vip in [vip4(), vip6()] {
        let tally = or_panic(bed.requests(vip, 200));
        assert_split(&tally, &[(1, 100), (2, 100)]);
    }

    // The dsr VIP on the same balancer goes on working beside them, and so does the nat
    // VIP: its answers come back through the balancer, translated.
    let tally = or_panic(bed.requests(dsr_vip, 20));
    assert_split(&tally, &[(3, 20)]);
    let nat_vip = SocketAddr::new(VIP4.into(), NAT_PORT);
    let tally = or_panic(bed.requests(nat_vip, 20));
    assert_split(&tally, &[(1, 10), (2, 10)]);

    // TLS through the tunnel to nginx on both backends, the certificate checked.
    let tls = or_panic(stack::make_tls(bed.dir(), VIP4.into()));
    let _nginx: Vec<Proc> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| or_panic(stack::start_nginx(&bed, b, &format!("b{}", i + 1), &tls)))
        .collect();
    let tls_vip = SocketAddr::new(VIP4.into(), stack::HTTPS_PORT);
    let bodies: Vec<String> = (0..4)
        .map(|_| {
            or_panic(stack::https_get(
                &bed,
                tls_vip,
                &tls.ca,
                bed.client.ipv4.into(),
            ))
        })
        .collect();
    for name in ["backend b1", "backend b2"] {
        assert!(bodies.iter().any(|b| b == name), "{bodies:?}");
    }

    // UDP request/response over GUE: every datagram answered by a backend.
    let load = or_panic(bed.load_udp(
        SocketAddr::new(VIP4.into(), HTTP_PORT),
        Duration::from_millis(10),
        Duration::from_secs(20),
    ));
    or_panic(wait_until(Duration::from_secs(10), || {
        Ok(load.attempts().len() >= 50)
    }));
    let attempts = or_panic(load.finish());
    assert!(attempts.len() >= 50, "{} UDP exchanges", attempts.len());
    let failed: Vec<_> = attempts.iter().filter(|a| a.is_err()).collect();
    assert!(failed.is_empty(), "UDP exchanges failed: {failed:?}");

    // A long upload through the tunnel arrives intact, both families: full-size segments
    // no longer fit once wrapped, so the client learns the smaller path MTU from the
    // balancer's ICMP answers on the way.
    for vip in [VIP4.to_string(), format!("[{VIP6}]")] {
        let got = client_sha(
            &bed,
            &format!(
                "socat -t 30 -T 60 OPEN:{},rdonly!!STDOUT TCP:{vip}:{UPLOAD_PORT}",
                data.display()
            ),
        );
        assert_eq!(
            got, want,
            "upload of {TRANSFER_MB} MB to {vip} hashed differently"
        );
    }

    // A long download: every byte comes straight from the backend, not via the balancer.
    let before_download = xdp_bytes(&bed, &socket);
    let got = client_sha(
        &bed,
        &format!("socat -T 60 -u TCP:{VIP4}:{DOWNLOAD_PORT} STDOUT | sha256sum"),
    );
    assert_eq!(got, want, "download of {TRANSFER_MB} MB hashed differently");
    let through_lb = xdp_bytes(&bed, &socket) - before_download;
    assert!(
        through_lb < TRANSFER_MB * 1_000_000 / 10,
        "{through_lb} bytes reached the balancer during a {TRANSFER_MB} MB download: \
         the replies crossed it"
    );

    // The balancer forwarded, answered too-big packets, and dropped nothing for want of
    // a source or room; the backends' lb decap stripped what came.
    let stats: serde_json::Value =
        serde_json::from_str(&lb_at(&bed, &socket, &["stats", "--json"])).unwrap();
    let reason = |name: &str| stats["reasons"][name]["packets"].as_u64().unwrap_or(0);
    assert!(reason("forwarded") > 0, "{stats}");
    assert!(reason("nat_reply") > 0, "the nat VIP's answers: {stats}");
    assert!(reason("tunnel_too_big") > 0, "no too-big answer: {stats}");
    assert_eq!(reason("drop_tunnel_no_source"), 0, "{stats}");
    assert_eq!(reason("drop_tunnel_no_room"), 0, "{stats}");
    assert!(
        through_lb > 0,
        "the client's acknowledgements go through the balancer"
    );

    // Stopped, each `lb decap` says what it stripped: both backends took their share.
    for decap in servers.iter_mut().skip(3).step_by(4) {
        or_panic(decap.signal(libc::SIGTERM));
        let status = decap.wait_timeout(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "lb decap did not stop cleanly ({status:?}):\n{}",
            decap.log()
        );
        let log = decap.log();
        let stripped: u64 = log
            .split("stopped; decapsulated ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no final counters from lb decap:\n{log}"));
        assert!(
            stripped > 1000,
            "lb decap stripped {stripped} packets:\n{log}"
        );
    }
}
