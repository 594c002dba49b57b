//! The database and external health checks against the real servers (MariaDB primary and
//! replica with real replication, PostgreSQL), probed from the balancer's namespace of a
//! test bed, and the failover of a write VIP through the balancer. Run as root:
//! `cargo xtask test --test stack`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb::health::CheckSpec;
use lb_tests::{
    e2e::{
        add_checked_vip, backend_list_at, field, lb_at, number, one_line_error, serial,
        wait_backends,
    },
    stack::*,
};
use xtask::testbed::{Config, Testbed, VIP4};

/// Generous bound for a check to change its answer (it is usually the next probe).
const CHANGE: Duration = Duration::from_secs(15);

fn bed(backends: usize) -> Testbed {
    Testbed::new(Config { backends }).unwrap_or_else(|e| panic!("{e:#}"))
}

fn spec(check: &str, credentials: &Path) -> CheckSpec {
    CheckSpec {
        check: check.parse().unwrap(),
        credentials: Some(credentials.to_path_buf()),
        timeout_ms: 3000,
        ..Default::default()
    }
}

fn up(bed: &Testbed, spec: &CheckSpec, target: SocketAddr) -> String {
    probe_from_balancer(bed, spec, target)
        .unwrap_or_else(|e| panic!("{} check of {target} failed: {e:#}", spec.check))
}

fn down(bed: &Testbed, spec: &CheckSpec, target: SocketAddr) -> String {
    match probe_from_balancer(bed, spec, target) {
        Ok(s) => panic!(
            "{} check of {target} passed ({s}); expected down",
            spec.check
        ),
        Err(e) => format!("{e:#}"),
    }
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// A MariaDB primary and its replica, replicating.
fn replicated_pair(bed: &Testbed) -> (Mariadb, Mariadb) {
    let (primary, replica) = ok(mariadb_pair(bed, true));
    (primary, replica.expect("a replica"))
}

/// A credentials file for the check user with its real password, with file mode `mode`.
fn check_user_credentials(bed: &Testbed, name: &str, mode: u32) -> PathBuf {
    ok(credentials_file(
        bed,
        name,
        CHECK_USER,
        CHECK_PASSWORD,
        None,
        mode,
    ))
}

#[test]
fn mysql_check_logs_in_with_the_check_user() {
    let _serial = serial();
    let bed = bed(1);
    let (mut primary, _) = ok(mariadb_pair(&bed, false));
    let (good, wrong) = good_and_wrong_credentials(&bed, None);
    let target = primary.addr();

    let detail = up(&bed, &spec("mysql", &good), target);
    assert!(detail.contains("login ok"), "{detail}");
    let v6 = SocketAddr::new(primary.host.ipv6.into(), MYSQL_PORT);
    let detail = up(&bed, &spec("mysql", &good), v6);
    assert!(detail.contains("login ok"), "{detail}");
    let err = down(&bed, &spec("mysql", &wrong), target);
    assert!(err.contains("Access denied"), "{err}");
    // Something that is not MySQL on the port: the greeting fails.
    let err = down(
        &bed,
        &spec("mysql", &good),
        SocketAddr::new(target.ip(), PGSQL_PORT),
    );
    assert!(err.contains("login"), "{err}");

    primary.kill();
    let err = down(&bed, &spec("mysql", &good), target);
    assert!(err.contains("login"), "{err}");
}

#[test]
fn mysql_role_checks_follow_read_only() {
    let _serial = serial();
    let bed = bed(2);
    let (primary, replica) = replicated_pair(&bed);
    let creds = check_user_credentials(&bed, "creds", 0o600);
    let (writer, reader) = (spec("mysql-primary", &creds), spec("mysql-replica", &creds));

    assert_eq!(up(&bed, &writer, primary.addr()), "writable (read_only=0)");
    assert!(down(&bed, &writer, replica.addr()).contains("not a primary"));
    assert!(down(&bed, &reader, primary.addr()).contains("not a replica"));
    assert_eq!(up(&bed, &reader, replica.addr()), "read-only (read_only=1)");

    // The operator's promotion and demotion, as an orchestrator would do them.
    ok(primary.sql("SET GLOBAL read_only = 1"));
    ok(replica.sql("STOP REPLICA; SET GLOBAL read_only = 0"));
    assert!(down(&bed, &writer, primary.addr()).contains("not a primary"));
    assert_eq!(up(&bed, &writer, replica.addr()), "writable (read_only=0)");
    assert_eq!(up(&bed, &reader, primary.addr()), "read-only (read_only=1)");
    assert!(down(&bed, &reader, replica.addr()).contains("not a replica"));
}

#[test]
fn mysql_replica_check_limits_replication_lag() {
    let _serial = serial();
    let bed = bed(2);
    let (primary, replica) = replicated_pair(&bed);
    let creds = check_user_credentials(&bed, "creds", 0o600);
    let lagged = CheckSpec {
        max_lag_s: Some(1),
        ..spec("mysql-replica", &creds)
    };
    let target = replica.addr();
    let detail = up(&bed, &lagged, target);
    assert_eq!(detail, "read-only, replication lag 0 s");

    // A session holding the global read lock stalls the replica's SQL thread on the next
    // event, so its lag grows with the clock.
    let mut lock =
        ok(replica.sql_background(&bed, "FLUSH TABLES WITH READ LOCK; SELECT SLEEP(60)"));
    ok(wait_for_lock(&replica));
    ok(primary.sql("INSERT INTO app.t VALUES (1, 'lagging')"));
    let detail = ok(wait_probe(&bed, &lagged, target, false, CHANGE));
    assert!(detail.contains("over the limit of 1 s"), "{detail}");
    // Without a limit the same replica is up: lag is the only reason.
    up(&bed, &spec("mysql-replica", &creds), target);

    lock.kill();
    ok(wait_probe(&bed, &lagged, target, true, CHANGE));
    ok(wait_replicated(&primary, &replica));

    ok(replica.sql("STOP REPLICA"));
    let detail = down(&bed, &lagged, target);
    assert!(detail.contains("replication not running"), "{detail}");
}

/// Waits until a session of `server` holds the global read lock.
fn wait_for_lock(server: &Mariadb) -> anyhow::Result<()> {
    xtask::testbed::wait_until(Duration::from_secs(10), || {
        Ok(server
            .sql("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP%'")?
            .trim()
            != "0")
    })
}

#[test]
fn pgsql_check_logs_in_with_the_check_user() {
    let _serial = serial();
    let bed = bed(1);
    let mut pg = ok(start_postgres(&bed, &bed.backends[0]));
    let db = Some("postgres");
    let (good, wrong) = good_and_wrong_credentials(&bed, db);
    let target = pg.addr();

    let detail = up(&bed, &spec("pgsql", &good), target);
    assert!(detail.starts_with("login ok (PostgreSQL "), "{detail}");
    let v6 = SocketAddr::new(pg.host.ipv6.into(), PGSQL_PORT);
    let detail = up(&bed, &spec("pgsql", &good), v6);
    assert!(detail.starts_with("login ok (PostgreSQL "), "{detail}");
    let err = down(&bed, &spec("pgsql", &wrong), target);
    assert!(err.contains("password authentication failed"), "{err}");

    ok(pg.stop());
    let err = down(&bed, &spec("pgsql", &good), target);
    assert!(err.contains("login"), "{err}");
}

/// The database's read VIP, beside the write VIP (the test bed's `VIP4`) on port 3306.
const READ_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 1, 2);

/// State of the backend at `address` under VIP `vip`, from `lb backend list --json`.
fn state(list: &[serde_json::Value], vip: &str, address: &str) -> String {
    list.iter()
        .find(|b| field(b, "vip") == vip && field(b, "address") == address)
        .map(|b| field(b, "state"))
        .unwrap_or_else(|| panic!("no backend {address} of {vip} in {list:#?}"))
}

/// The server ids that answered `count` reads of row `id` through `vip` (each a new
/// connection), and whether each saw the row.
fn reads(bed: &Testbed, vip: SocketAddr, id: u32, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            ok(client_sql(
                bed,
                vip,
                &format!("SELECT @@server_id, (SELECT v FROM app.t WHERE id = {id})"),
            ))
            .trim()
            .to_string()
        })
        .collect()
}

#[test]
fn write_vip_follows_the_primary_through_a_failover() {
    let _serial = serial();
    let bed = bed(2);
    let (mut primary, replica) = replicated_pair(&bed);
    ok(add_vip_address(&bed, READ_VIP));
    let creds = check_user_credentials(&bed, "creds", 0o600);
    let readable = check_user_credentials(&bed, "open", 0o644);
    let (config, socket) = (bed.dir().join("lb.toml"), bed.dir().join("lb.sock"));
    let agent = ok(bed.start_agent(&config, &socket));
    let lb = |args: &[&str]| lb_at(&bed, &socket, args);
    let write = SocketAddr::new(VIP4.into(), MYSQL_PORT);
    let read = SocketAddr::new(READ_VIP.into(), MYSQL_PORT);
    let (w, r) = (write.to_string(), read.to_string());
    let (p, s) = (primary.host.ipv4.to_string(), replica.host.ipv4.to_string());

    // Check credentials others can read are refused, with one line naming the file.
    let out = ok(bed.lb_cli(
        &socket,
        [
            "vip",
            "add",
            &w,
            "--check",
            "mysql-primary",
            "--credentials",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([readable.display().to_string()]),
    ));
    let err = one_line_error("lb vip add (readable credentials)", &out);
    assert!(err.contains("chmod 600") && err.contains("open"), "{err}");

    let creds = creds.display().to_string();
    let timing = [
        "--interval",
        "300",
        "--timeout",
        "1000",
        "--rise",
        "2",
        "--fall",
        "2",
    ];
    for (vip, check) in [(&w, "mysql-primary"), (&r, "mysql")] {
        let mut args = vec!["vip", "add", vip, "--check", check, "--credentials", &creds];
        args.extend(timing);
        lb(&args);
        lb(&["backend", "add", vip, &p]);
        lb(&["backend", "add", vip, &s]);
    }
    let roles = |want: [(&str, &str, &str); 4]| {
        wait_backends(&bed, &socket, &format!("{want:?}"), |list| {
            want.iter()
                .all(|(vip, addr, st)| state(list, vip, addr) == *st)
        })
    };
    roles([
        (&w, &p, "up"),
        (&w, &s, "down"),
        (&r, &p, "up"),
        (&r, &s, "up"),
    ]);

    // Writes through the write VIP reach the primary and are read back from the replica
    // through the read VIP (round robin over both).
    let wrote = ok(client_sql(
        &bed,
        write,
        "INSERT INTO app.t VALUES (1, 'before'); SELECT @@server_id",
    ));
    assert_eq!(
        wrote.trim(),
        "1",
        "the write VIP answered from server {wrote}"
    );
    ok(wait_replicated(&primary, &replica));
    // Each read is a new connection from an ephemeral port: round robin gives 2 and 2
    // unless the kernel hands out a port again whose flow the balancer still pins, so
    // only "both servers answered, with the row" is asserted.
    let mut seen = reads(&bed, read, 1, 4);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["1\tbefore", "2\tbefore"]);

    // The primary dies: the write VIP has no backend left in rotation, and a client's
    // connection is refused at once (a RST from the balancer, counted), not sent to the
    // read-only replica and not left to time out.
    primary.kill();
    let killed = Instant::now();
    roles([
        (&w, &p, "down"),
        (&w, &s, "down"),
        (&r, &p, "down"),
        (&r, &s, "up"),
    ]);
    let out_of_rotation = killed.elapsed();
    let err = client_sql(&bed, write, "SELECT 1").expect_err("the write VIP has no backend");
    assert!(format!("{err:#}").contains("Can't connect"), "{err:#}");
    let stats: serde_json::Value =
        serde_json::from_str(&lb(&["stats", "--json"])).expect("stats JSON");
    assert!(
        number(&stats["reasons"]["reset_no_backend"], "packets") > 0,
        "{stats:#}"
    );
    // Reads go on from the replica.
    assert_eq!(reads(&bed, read, 1, 2), ["2\tbefore", "2\tbefore"]);

    // The operator promotes the replica; the write VIP follows with no `lb` command.
    ok(replica.sql("STOP REPLICA; SET GLOBAL read_only = 0"));
    let promoted = Instant::now();
    roles([
        (&w, &p, "down"),
        (&w, &s, "up"),
        (&r, &p, "down"),
        (&r, &s, "up"),
    ]);
    let followed = promoted.elapsed();
    // Informational (timings are not pass/fail here): interval 300 ms, fall 2, rise 2, so
    // about 600-900 ms each, plus the 50 ms polling of `lb backend list`.
    println!(
        "failover: primary out of rotation {} ms after it died; the write VIP followed the \
         promoted replica {} ms after the promotion (interval 300 ms, fall 2, rise 2)",
        out_of_rotation.as_millis(),
        followed.as_millis()
    );

    let wrote = ok(client_sql(
        &bed,
        write,
        "INSERT INTO app.t VALUES (2, 'after'); SELECT @@server_id",
    ));
    assert_eq!(
        wrote.trim(),
        "2",
        "the write VIP answered from server {wrote}"
    );
    assert_eq!(reads(&bed, read, 2, 2), ["2\tafter", "2\tafter"]);
    drop(agent);
}

#[test]
fn exec_check_run_by_the_agent_follows_the_script() {
    let _serial = serial();
    let bed = bed(2);
    let _servers = ok(bed.start_backends());
    let (config, socket) = (bed.dir().join("lb.toml"), bed.dir().join("lb.sock"));
    let _agent = ok(bed.start_agent(&config, &socket));
    // Down while a file named after the backend's address and port exists, as an
    // operator's maintenance flag would be.
    let flags = bed.dir().join("flags");
    std::fs::create_dir(&flags).unwrap();
    let script = bed.dir().join("check.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e {}/\"$1:$LB_BACKEND_PORT\" ] && {{ echo \"flagged $1\" >&2; exit 1; }}\nexit 0\n",
            flags.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let vip = SocketAddr::new(VIP4.into(), xtask::testbed::HTTP_PORT).to_string();
    let check = format!("exec:{}", script.display());
    add_checked_vip(|a| lb_at(&bed, &socket, a), &vip, &check, 200, 1, 1);
    let (b1, b2) = (
        bed.backends[0].ipv4.to_string(),
        bed.backends[1].ipv4.to_string(),
    );
    for b in [&b1, &b2] {
        lb_at(&bed, &socket, &["backend", "add", &vip, b]);
    }
    let states = |want: [(&str, &str); 2]| {
        wait_backends(&bed, &socket, &format!("{want:?}"), |list| {
            want.iter().all(|(addr, st)| state(list, &vip, addr) == *st)
        })
    };
    wait_backends(&bed, &socket, "both checked by the script", |list| {
        list.len() == 2 && list.iter().all(|b| b["last_check_detail"] == "exit 0")
    });
    let flag = flags.join(format!("{b1}:{}", xtask::testbed::HTTP_PORT));
    std::fs::write(&flag, "").unwrap();
    states([(&b1, "down"), (&b2, "up")]);
    let list = backend_list_at(&bed, &socket);
    let detail = list
        .iter()
        .find(|b| field(b, "address") == b1)
        .map(|b| field(b, "last_check_detail"))
        .unwrap();
    assert_eq!(detail, format!("exit 1: flagged {b1}"));
    std::fs::remove_file(&flag).unwrap();
    states([(&b1, "up"), (&b2, "up")]);
}

/// The web tier of the classic stack: two nginx servers with the site's certificate (from
/// a CA made for the test) behind a VIP on 443 with source affinity. TLS passes through the
/// balancer and verifies end to end; one client's 20 connections all reach one server,
/// another client's reach the other; a client of a server that fails moves; without
/// affinity the same client spreads.
#[test]
fn https_through_the_vip_verifies_and_sticks_to_one_backend_per_client() {
    let _serial = serial();
    let bed = bed(2);
    let vip = SocketAddr::new(VIP4.into(), HTTPS_PORT);
    let tls = ok(make_tls(bed.dir(), vip.ip()));
    let mut web: Vec<_> = bed
        .backends
        .iter()
        .enumerate()
        .map(|(i, host)| ok(start_nginx(&bed, host, &(i + 1).to_string(), &tls)))
        .collect();
    // A second client address on the client's segment.
    let (a, b) = (
        std::net::IpAddr::from(bed.client.ipv4),
        std::net::IpAddr::from(std::net::Ipv4Addr::new(10, 99, 0, 3)),
    );
    ok(bed.ip(
        &bed.client.ns,
        &["addr", "add", &format!("{b}/24"), "dev", &bed.client.ifname],
    ));
    let (config, socket) = (bed.dir().join("lb.toml"), bed.dir().join("lb.sock"));
    let _agent = ok(bed.start_agent(&config, &socket));
    let lb = |args: &[&str]| lb_at(&bed, &socket, args);
    let v = vip.to_string();
    lb(&[
        "vip",
        "add",
        &v,
        "--check",
        "tls",
        "--interval",
        "300",
        "--rise",
        "1",
        "--fall",
        "2",
        "--persist",
        "300",
    ]);
    let addrs: Vec<String> = bed.backends.iter().map(|h| h.ipv4.to_string()).collect();
    for addr in &addrs {
        lb(&["backend", "add", &v, addr]);
    }
    wait_backends(&bed, &socket, "both web servers up", |list| {
        list.len() == 2 && list.iter().all(|b| field(b, "state") == "up")
    });

    let get = |from| ok(https_get(&bed, vip, &tls.ca, from));
    let twenty = |from| -> Vec<String> { (0..20).map(|_| get(from)).collect() };
    let from_a = twenty(a);
    assert!(from_a[0].starts_with("backend "), "{from_a:?}");
    assert!(
        from_a.iter().all(|r| *r == from_a[0]),
        "client A spread: {from_a:?}"
    );
    let from_b = twenty(b);
    assert!(
        from_b.iter().all(|r| *r == from_b[0]),
        "client B spread: {from_b:?}"
    );
    assert_ne!(from_a[0], from_b[0], "both clients on one backend");
    let vips: serde_json::Value =
        serde_json::from_str(&lb(&["vip", "list", "--json"])).expect("vip list JSON");
    assert_eq!(vips[0]["persist"], 300, "{vips:#}");
    assert_eq!(vips[0]["persisted_flows"], 38, "{vips:#}");

    // Client A's server fails: A moves to the other one, and stays there.
    let a_server: usize = from_a[0]["backend ".len()..].parse().unwrap();
    web[a_server - 1].kill();
    let failed = &addrs[a_server - 1];
    wait_backends(&bed, &socket, "A's server down", |list| {
        state(list, &v, failed) == "down"
    });
    let moved = (0..5).map(|_| get(a)).collect::<Vec<_>>();
    assert!(
        moved.iter().all(|r| *r == from_b[0]),
        "after the failure: {moved:?}"
    );

    // Without affinity the same client is balanced connection by connection.
    lb(&["vip", "set", &v, "--persist", "0"]);
    web[a_server - 1] = ok(start_nginx(
        &bed,
        &bed.backends[a_server - 1],
        &a_server.to_string(),
        &tls,
    ));
    wait_backends(&bed, &socket, "both web servers up again", |list| {
        list.iter().all(|b| field(b, "state") == "up")
    });
    let mut spread: Vec<String> = (0..4).map(|_| get(a)).collect();
    spread.sort();
    spread.dedup();
    assert_eq!(spread.len(), 2, "round robin without affinity: {spread:?}");
}

/// Least connections with real long-lived MariaDB sessions through a read VIP: a server
/// holding sessions gets no new one until the other has caught up, and sessions the
/// clients close free their places.
#[test]
fn leastconn_sends_new_sessions_to_the_server_with_fewest() {
    let _serial = serial();
    let bed = bed(2);
    let (first, second) = replicated_pair(&bed);
    let creds = check_user_credentials(&bed, "creds", 0o600);
    let (config, socket) = (bed.dir().join("lb.toml"), bed.dir().join("lb.sock"));
    let _agent = ok(bed.start_agent(&config, &socket));
    let lb = |args: &[&str]| lb_at(&bed, &socket, args);
    let read = SocketAddr::new(VIP4.into(), MYSQL_PORT);
    let (r, creds) = (read.to_string(), creds.display().to_string());
    lb(&[
        "vip",
        "add",
        &r,
        "--algo",
        "leastconn",
        "--check",
        "mysql",
        "--credentials",
        &creds,
        "--interval",
        "300",
        "--rise",
        "1",
    ]);
    let (a1, a2) = (first.host.ipv4.to_string(), second.host.ipv4.to_string());
    lb(&["backend", "add", &r, &a1]);
    wait_backends(&bed, &socket, "server 1 up", |l| state(l, &r, &a1) == "up");
    let sessions = |want: (u32, u32)| {
        ok(xtask::testbed::wait_until(CHANGE, || {
            Ok((first.app_sessions()?, second.app_sessions()?) == want)
        }));
    };
    // Server 1 alone takes 6 long sessions.
    let mut on_first: Vec<_> = (0..6)
        .map(|_| ok(client_session(&bed, read, 300)))
        .collect();
    sessions((6, 0));
    // Server 2 joins: the next 6 all go to it, none to the server holding 6.
    lb(&["backend", "add", &r, &a2]);
    wait_backends(&bed, &socket, "server 2 up", |l| state(l, &r, &a2) == "up");
    let mut rest: Vec<_> = (0..6)
        .map(|_| ok(client_session(&bed, read, 300)))
        .collect();
    sessions((6, 6));
    let list = backend_list_at(&bed, &socket);
    for b in &list {
        assert_eq!(number(b, "active"), 6, "{b}");
    }
    // Three of server 1's clients leave (their kernel sends the FIN): the balancer counts
    // 3 there, and the next three sessions all go to server 1, none to server 2.
    for mut p in on_first.drain(..3) {
        p.kill();
    }
    let active = |want: [u64; 2]| {
        wait_backends(&bed, &socket, &format!("active {want:?}"), |l| {
            [&a1, &a2].iter().zip(want).all(|(addr, n)| {
                l.iter()
                    .any(|b| field(b, "address") == **addr && number(b, "active") == n)
            })
        })
    };
    active([3, 6]);
    rest.extend((0..3).map(|_| ok(client_session(&bed, read, 300))));
    active([6, 6]);
    // The closed sessions may still sleep on server 1 (it notices a gone client late).
    ok(xtask::testbed::wait_until(CHANGE, || {
        Ok(first.app_sessions()? >= 6)
    }));
    assert_eq!(ok(second.app_sessions()), 6);
    drop(rest);
}

/// Root-only credential files for the check user: its real password, and a wrong one.
fn good_and_wrong_credentials(bed: &Testbed, db: Option<&str>) -> (PathBuf, PathBuf) {
    let good = ok(credentials_file(
        bed,
        "good",
        CHECK_USER,
        CHECK_PASSWORD,
        db,
        0o600,
    ));
    let wrong = ok(credentials_file(
        bed, "wrong", CHECK_USER, "nope", db, 0o600,
    ));
    (good, wrong)
}
