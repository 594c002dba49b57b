//! Full NAT end to end: backends that know nothing of the balancer (no VIP on loopback,
//! the kernel's default ARP sysctls, no route change) behind VIPs in `nat` mode, in the
//! namespace test bed. One bed for the whole test (it is the slow part): new connections
//! split evenly, IPv6, UDP, TLS through to nginx, a 100 MB transfer arriving intact from a
//! backend on a routed subnet, and a connection that outlives an agent restart (the
//! translations are pinned and adopted).
//!
//! Needs root and what `./x.sh` installs (nginx, openssl, curl); fails and says what is
//! missing, never skips.

use std::{net::SocketAddr, time::Duration};

use lb_tests::{e2e::*, stack};
use xtask::{
    testbed::{VIP4, run_ok},
    traffic::Answer,
};

/// Backend 1 gets an address on another subnet (10.98.0.11), which the balancer reaches
/// through backend 3 acting as a router: a backend one router away. Returns the address.
fn route_backend_1_via_3(s: &Setup) -> String {
    let (b1, b3) = (&s.bed.backends[0], &s.bed.backends[2]);
    let ip = |ns: &str, args: &[&str]| s.bed.ip(ns, args).unwrap_or_else(|e| panic!("{e:#}"));
    ip(&b1.ns, &["addr", "add", "10.98.0.11/32", "dev", "lo"]);
    s.bed
        .run_in_ok(&b3.ns, "sysctl", ["-qw", "net.ipv4.conf.all.forwarding=1"])
        .unwrap();
    ip(
        &b3.ns,
        &["route", "add", "10.98.0.11/32", "via", &b1.ipv4.to_string()],
    );
    ip(
        &s.bed.lb.ns,
        &["route", "add", "10.98.0.0/24", "via", &b3.ipv4.to_string()],
    );
    "10.98.0.11".into()
}

fn nat_vip(s: &Setup, vip: SocketAddr, proto: &str, backends: &[usize]) {
    let v = vip.to_string();
    s.lb(&["vip", "add", &v, "--proto", proto, "--mode", "nat"]);
    for &i in backends {
        s.lb(&[
            "backend",
            "add",
            &v,
            "--proto",
            proto,
            &s.backend(i, vip.is_ipv6()),
        ]);
    }
}

/// nginx on backend 1 serving `dir` over plain HTTP on `port`.
fn start_file_server(s: &Setup, dir: &std::path::Path, port: u16) -> xtask::testbed::Proc {
    let conf = dir.join("files.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/files.pid;\n\
             error_log {d}/files-error.log info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n\
             fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
             server {{\n    listen {port};\n    root {d};\n  }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let b1 = &s.bed.backends[0];
    let mut proc = s
        .bed
        .spawn_in(
            &b1.ns,
            "nginx",
            [
                "-p",
                &dir.display().to_string(),
                "-c",
                &conf.display().to_string(),
                "-e",
                "stderr",
            ],
        )
        .unwrap_or_else(|e| panic!("nginx (./x.sh installs it): {e:#}"));
    xtask::testbed::wait_until(Duration::from_secs(10), || {
        if let Some(status) = proc.try_wait() {
            anyhow::bail!("nginx exited with {status}:\n{}", proc.log());
        }
        let l = s
            .bed
            .run_in(&b1.ns, "ss", ["-Hltn", &format!("sport = :{port}")])?;
        Ok(!l.stdout.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    proc
}

fn sha256(path: &std::path::Path) -> String {
    let out = run_ok(std::process::Command::new("sha256sum").arg(path)).unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn untouched_backends_serve_through_nat() {
    let _serial = serial();
    let mut s = Setup::new(3);
    // Plain servers: no VIP on loopback, the kernel's default ARP sysctls.
    s.bed
        .plain_backends_for_nat()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let routed = route_backend_1_via_3(&s);
    let vip4 = vip4();
    let vip6 = vip6();
    let tls4 = SocketAddr::new(VIP4.into(), stack::HTTPS_PORT);
    let files4 = SocketAddr::new(VIP4.into(), 8080);
    nat_vip(&s, vip4, "tcp", &[1, 2]);
    nat_vip(&s, vip4, "udp", &[1, 2]);
    nat_vip(&s, vip6, "tcp", &[1, 2]);
    nat_vip(&s, tls4, "tcp", &[1, 2]);
    // The file server's backend is backend 1's address on a subnet behind a router.
    s.lb(&[
        "vip",
        "add",
        &files4.to_string(),
        "--proto",
        "tcp",
        "--mode",
        "nat",
    ]);
    s.lb(&["backend", "add", &files4.to_string(), &routed]);

    // TLS: nginx on both backends, the certificate checked by the client.
    let tls = stack::make_tls(s.bed.dir(), VIP4.into()).unwrap();
    let mut servers: Vec<_> = s
        .bed
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| stack::start_nginx(&s.bed, b, &format!("b{}", i + 1), &tls).unwrap())
        .collect();
    let files = s.bed.dir().join("files");
    std::fs::create_dir_all(&files).unwrap();
    run_ok(std::process::Command::new("sh").args([
        "-c",
        &format!("head -c 100000000 /dev/urandom > {}/big", files.display()),
    ]))
    .unwrap();
    servers.push(start_file_server(&s, &files, 8080));
    s.wait_all_up();

    // 200 new connections split evenly, each translated (the backends hold no VIP: without
    // NAT none would be answered).
    let tally = s.requests(vip4, 200);
    assert_split(&tally, &[(1, 100), (2, 100)]);
    let tally = s.requests(vip6, 20);
    assert_split(&tally, &[(1, 10), (2, 10)]);
    // Counted: translations made (as of the agent's last sweep, every 2 s) and replies.
    let mut stats = serde_json::Value::Null;
    xtask::testbed::wait_until(Duration::from_secs(10), || {
        stats = serde_json::from_str(&s.lb(&["stats", "--json"]))?;
        Ok(stats["nat"]["allocated"].as_u64().is_some_and(|n| n >= 220))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {stats}"));
    assert!(
        stats["reasons"]["nat_reply"]["packets"].as_u64().unwrap() >= 220,
        "{stats}"
    );
    // The SNAT address was there from the first flow (set as the VIPs were configured).
    assert_eq!(
        stats["reasons"]["drop_nat_no_snat"]["packets"].as_u64(),
        Some(0),
        "{stats}"
    );

    // UDP: every datagram answered, by both backends in turn.
    let load = s
        .bed
        .load_udp(vip4, Duration::from_millis(50), Duration::from_secs(10))
        .unwrap();
    xtask::testbed::wait_until(Duration::from_secs(10), || Ok(load.attempts().len() >= 10))
        .unwrap_or_else(|e| panic!("{e:#}: {}", load.proc().log()));
    let attempts = load.finish().unwrap();
    assert!(attempts.len() >= 10, "{attempts:?}");
    assert!(attempts.iter().all(|a| !a.is_err()), "{attempts:?}");
    for name in ["backend-1", "backend-2"] {
        assert!(
            attempts.iter().any(|a| a.backend() == Some(name)),
            "{name}: {attempts:?}"
        );
    }

    // TLS through the balancer, answered by both backends.
    let client = s.bed.client.ipv4.into();
    let bodies: Vec<String> = (0..4)
        .map(|_| {
            stack::https_get(&s.bed, tls4, &tls.ca, client).unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    for name in ["backend b1", "backend b2"] {
        assert!(bodies.iter().any(|b| b == name), "{bodies:?}");
    }

    // 100 MB through one translation, intact, to a backend on a routed subnet.
    let got = s.bed.dir().join("got");
    let out = s
        .bed
        .run_in(
            &s.bed.client.ns,
            "curl",
            [
                "--silent",
                "--show-error",
                "--max-time",
                "120",
                "--output",
                &got.display().to_string(),
                &format!("http://{files4}/big"),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256(&got),
        sha256(&files.join("big")),
        "the 100 MB file arrived changed"
    );
    let _ = std::fs::remove_file(&got);

    // A keep-alive connection outlives a restart of the agent: its translation is pinned
    // and adopted, and keeps its SNAT port.
    let (keepalive, backend) =
        s.pinned_keepalive(vip4, Duration::from_millis(100), Duration::from_secs(30));
    s.agent.proc.kill();
    s.agent = s
        .bed
        .start_agent(&s.config, &s.socket)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let before = keepalive.answers().len();
    keepalive
        .wait_answers(before + 10, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let answers = keepalive.stop();
    for a in &answers {
        match a {
            Answer::Ok { backend: b, .. } if *b == backend => {}
            other => panic!("{other:?} (pinned to {backend}); all: {answers:?}"),
        }
    }
    drop(servers);
}
