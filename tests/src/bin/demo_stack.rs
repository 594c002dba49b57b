//! `./x.sh demo --stack`: the classic stack on the real servers, told step by step, in a
//! throw-away namespace test bed: two nginx servers serving HTTPS behind a web VIP with
//! source affinity, a MariaDB primary and its replica behind a write VIP (`mysql-primary`)
//! and a read VIP (least connections), configured with one `lb apply`; then a primary
//! failover: the primary dies, the write VIP empties and refuses clients at once, the
//! replica is promoted and the write VIP follows it.
//!
//! Built on the test helpers (`lb_tests::stack`), so the demo and `tests/tests/stack.rs`
//! run the servers the same way.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::stack::*;
use xtask::testbed::{self, Config, Testbed, VIP4, wait_until};

const READ_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
const SECOND_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);

fn main() -> Result<()> {
    testbed::check_environment().context("the demo builds a namespace test bed")?;
    testbed::teardown_on_signal()?;
    let started = Instant::now();
    step("creating the test bed: a client, the balancer, 4 backends (2 web, 2 database)");
    let bed = Testbed::new(Config { backends: 4 })?;
    let result = show(&bed);
    step("tearing the test bed down");
    drop(bed);
    result?;
    println!("\ndone in {} s.", started.elapsed().as_secs());
    Ok(())
}

fn show(bed: &Testbed) -> Result<()> {
    let web = SocketAddr::new(VIP4.into(), HTTPS_PORT);
    let write = SocketAddr::new(VIP4.into(), MYSQL_PORT);
    let read = SocketAddr::new(READ_VIP.into(), MYSQL_PORT);
    let (db1, db2, web1, web2) = (
        &bed.backends[0],
        &bed.backends[1],
        &bed.backends[2],
        &bed.backends[3],
    );

    step("making a CA and the site's certificate (openssl), starting nginx on two backends");
    let tls = make_tls(bed.dir(), web.ip())?;
    let _nginx = [
        start_nginx(bed, web1, "web-1", &tls)?,
        start_nginx(bed, web2, "web-2", &tls)?,
    ];
    println!("  nginx web-1 on {}, web-2 on {}", web1.ipv4, web2.ipv4);

    step("starting MariaDB: a primary and a replica replicating from it");
    let (mut primary, replica) = mariadb_pair(bed, true)?;
    let replica = replica.context("a replica")?;
    println!(
        "  primary (server 1) on {}, replica (server 2, read-only) on {}",
        primary.host.ipv4, replica.host.ipv4
    );
    add_vip_address(bed, READ_VIP)?;
    bed.ip(
        &bed.client.ns,
        &[
            "addr",
            "add",
            &format!("{SECOND_CLIENT}/24"),
            "dev",
            &bed.client.ifname,
        ],
    )?;
    let creds = credentials_file(
        bed,
        "db-check.toml",
        CHECK_USER,
        CHECK_PASSWORD,
        None,
        0o600,
    )?;

    step("starting the agent, and applying the classic stack's configuration");
    let (config, socket) = (bed.dir().join("lb.toml"), bed.dir().join("lb.sock"));
    let _agent = bed.start_agent(&config, &socket)?;
    let stack = bed.dir().join("stack.toml");
    std::fs::write(&stack, stack_config(web, write, read, &creds, bed))?;
    println!("{}", indent(&std::fs::read_to_string(&stack)?));
    let lb = |args: &[&str]| -> Result<String> {
        println!("$ lb {}", args.join(" "));
        let out = bed.lb_cli_ok(&socket, args)?;
        print!("{}", indent(&out));
        Ok(out)
    };
    lb(&["apply", "-f", &stack.display().to_string()])?;
    let quiet = |args: &[&str]| bed.lb_cli_ok(&socket, args);
    wait_states(
        &quiet,
        "every backend checked",
        &[
            (web, web1.ipv4, "up"),
            (web, web2.ipv4, "up"),
            (write, db1.ipv4, "up"),
            (write, db2.ipv4, "down"),
            (read, db1.ipv4, "up"),
            (read, db2.ipv4, "up"),
        ],
    )?;
    lb(&["vip", "list"])?;
    lb(&["backend", "list"])?;

    step(
        "HTTPS through the web VIP, certificate verified by curl --cacert; 5 connections from each of two clients",
    );
    for from in [IpAddr::from(bed.client.ipv4), IpAddr::from(SECOND_CLIENT)] {
        let answers: Vec<String> = (0..5)
            .map(|_| https_get(bed, web, &tls.ca, from))
            .collect::<Result<_>>()?;
        println!("  client {from}: {}", answers.join(", "));
        if answers.iter().any(|a| *a != answers[0]) {
            bail!("client {from} was spread over backends despite --persist");
        }
    }

    step("a write through the write VIP, read back from the replica through the read VIP");
    let wrote = client_sql(
        bed,
        write,
        "INSERT INTO app.t VALUES (1, 'hello'); SELECT @@server_id",
    )?;
    println!("  wrote on server {}", wrote.trim());
    wait_replicated(&primary, &replica)?;
    for _ in 0..2 {
        let row = client_sql(bed, read, "SELECT @@server_id, v FROM app.t WHERE id = 1")?;
        println!("  read from server {}", row.trim().replace('\t', ": "));
    }

    step("failover: the primary dies (SIGKILL)");
    primary.kill();
    let killed = Instant::now();
    wait_states(
        &quiet,
        "the write VIP empty",
        &[(write, db1.ipv4, "down"), (write, db2.ipv4, "down")],
    )?;
    println!(
        "  the write VIP has no backend {} ms after the crash",
        killed.elapsed().as_millis()
    );
    let asked = Instant::now();
    let err = client_sql(bed, write, "SELECT 1").expect_err("the write VIP has no backend");
    println!(
        "  a client is refused at once ({} ms, a RST from the balancer): {err:#}",
        asked.elapsed().as_millis()
    );

    step("the operator promotes the replica: STOP REPLICA; SET GLOBAL read_only = 0");
    replica.sql("STOP REPLICA; SET GLOBAL read_only = 0")?;
    let promoted = Instant::now();
    wait_states(
        &quiet,
        "the write VIP on the replica",
        &[(write, db2.ipv4, "up")],
    )?;
    println!(
        "  the write VIP follows {} ms after the promotion, with no lb command",
        promoted.elapsed().as_millis()
    );
    let wrote = client_sql(
        bed,
        write,
        "INSERT INTO app.t VALUES (2, 'after'); SELECT @@server_id",
    )?;
    println!("  wrote on server {}", wrote.trim());

    step("what the balancer counted");
    lb(&["backend", "list"])?;
    let stats: serde_json::Value = serde_json::from_str(&quiet(&["stats", "--json"])?)?;
    for reason in ["forwarded", "reset_no_backend", "drop_no_backend"] {
        println!(
            "  {reason}: {} packets",
            stats["reasons"][reason]["packets"]
        );
    }
    Ok(())
}

/// The README's "classic stack" configuration, with the test bed's addresses.
fn stack_config(
    web: SocketAddr,
    write: SocketAddr,
    read: SocketAddr,
    creds: &Path,
    bed: &Testbed,
) -> String {
    let b = |i: usize| bed.backends[i].ipv4;
    let creds = creds.display();
    format!(
        r#"# The web tier: TLS passes through; a client's connections stay on one server.
[[vip]]
address = "{web}"
persist = 300

[vip.check]
check = "tls"
interval_ms = 500

[[vip.backend]]
address = "{w1}"

[[vip.backend]]
address = "{w2}"

# Writes: whichever database server is writable.
[[vip]]
address = "{write}"

[vip.check]
check = "mysql-primary"
credentials = "{creds}"
interval_ms = 500
rise = 2
fall = 2

[[vip.backend]]
address = "{d1}"

[[vip.backend]]
address = "{d2}"

# Reads: both servers, least connections.
[[vip]]
address = "{read}"
algo = "leastconn"

[vip.check]
check = "mysql"
credentials = "{creds}"
interval_ms = 500

[[vip.backend]]
address = "{d1}"

[[vip.backend]]
address = "{d2}"
"#,
        w1 = b(2),
        w2 = b(3),
        d1 = b(0),
        d2 = b(1),
    )
}

/// Waits (up to 15 s) until each (VIP, backend) is in the given state.
fn wait_states(
    lb: &dyn Fn(&[&str]) -> Result<String>,
    what: &str,
    want: &[(SocketAddr, Ipv4Addr, &str)],
) -> Result<()> {
    wait_until(Duration::from_secs(15), || {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&lb(&["backend", "list", "--json"])?)?;
        Ok(want.iter().all(|(vip, addr, state)| {
            list.iter().any(|b| {
                b["vip"] == vip.to_string()
                    && b["address"] == addr.to_string()
                    && b["state"] == *state
            })
        }))
    })
    .with_context(|| format!("waiting for {what}"))
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
