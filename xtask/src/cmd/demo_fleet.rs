//! `cargo xtask demo --fleet`: two balancers behind a router (BGP + ECMP with BIRD 2),
//! sharing new connections; then one dies under steady load and no request fails.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use xtask::{
    fleet::{
        NetnsGuard, agent_config, balancer_conf, bird, build_router, next_hops, router_conf, vip_a,
    },
    testbed::{self, Config, Testbed, monotonic_us},
};

pub fn run() -> Result<()> {
    testbed::check_environment().context("the demo builds a namespace test bed")?;
    if testbed::find_in_path("bird").is_none() {
        bail!("bird (BIRD 2) is not installed: run ./x.sh setup, or apt install bird2");
    }
    step("building the agent and the test bed helpers");
    super::cargo(&["build", "-p", "lb-userspace", "-p", "xtask"])?;
    testbed::teardown_on_signal()?;

    step("creating the test bed: a client, a router, two balancers, two backends");
    let mut bed = Testbed::new(Config { backends: 2 })?;
    let lb2 = bed.add_balancer()?;
    let router = format!("{}-rt", bed.prefix);
    let guard = NetnsGuard(router.clone());
    let result = show(&bed, &router, [bed.lb.clone(), lb2]);
    step("tearing the test bed down");
    drop(bed);
    drop(guard);
    result?;
    println!("\ndone.");
    Ok(())
}

fn show(bed: &Testbed, router: &str, balancers: [testbed::Host; 2]) -> Result<()> {
    let _backends = bed.start_backends()?;
    build_router(bed, router)?;
    println!(
        "  client {} → router {router} (BIRD, ECMP) → balancers {} and {} (lb + BIRD each) → backends",
        bed.client.ns, balancers[0].ns, balancers[1].ns
    );
    let conf = bed.dir().join("bird-router.conf");
    std::fs::write(&conf, router_conf())?;
    let _router_bird = bird(bed, router, &conf, "router")?;

    step(
        "starting lb and BIRD on both balancers ([fleet] route_table = 100, VIP 10.99.1.1:80 Maglev)",
    );
    let mut agents = Vec::new();
    let mut birds = Vec::new();
    let mut sockets = Vec::new();
    for (n, host) in balancers.iter().enumerate() {
        let config = bed.dir().join(format!("lb{}.toml", n + 1));
        std::fs::write(&config, agent_config(n, &bed.backends))?;
        let socket = bed.dir().join(format!("lb{}.sock", n + 1));
        agents.push(bed.start_agent_on(host, &config, &socket, &[])?);
        let conf = bed.dir().join(format!("bird-lb{}.conf", n + 1));
        std::fs::write(&conf, balancer_conf(host))?;
        birds.push(bird(bed, &host.ns, &conf, &format!("lb{}", n + 1))?);
        sockets.push(socket);
    }
    let vip = vip_a();
    wait_hops(bed, router, 2)?;
    println!("$ ip route show {} (in the router)", vip.ip());
    print!(
        "{}",
        indent(&bed.run_in_ok(router, "ip", ["route", "show", &vip.ip().to_string()])?)
    );
    println!("$ lb fleet status (on {})", balancers[0].ns);
    print!(
        "{}",
        indent(&bed.lb_cli_ok(&sockets[0], ["fleet", "status"])?)
    );

    step("40 new connections from the client: the router spreads them over both balancers");
    let tally = bed.requests_from(vip, 40, 21_000)?;
    if !tally.errors.is_empty() {
        bail!(
            "{} connections failed: {:?}",
            tally.errors.len(),
            tally.errors
        );
    }
    for (n, socket) in sockets.iter().enumerate() {
        println!("$ lb vip list (on {})", balancers[n].ns);
        print!("{}", indent(&bed.lb_cli_ok(socket, ["vip", "list"])?));
    }

    step(&format!(
        "steady load (a new connection every 20 ms) and a long-lived connection; then {} dies (link down)",
        balancers[0].ns
    ));
    let load = bed.load(
        vip,
        Duration::from_millis(20),
        Duration::from_secs(30),
        Some(22_000),
    )?;
    let keepalive = bed.keepalive(vip, Duration::from_millis(100), Duration::from_secs(30))?;
    keepalive.wait_answers(3, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(1));
    let down = monotonic_us();
    bed.ip(&balancers[0].ns, &["link", "set", "eth0", "down"])?;
    let took = wait_hops(bed, router, 1)?;
    println!(
        "  the router dropped {} after {:.0} ms (BFD)",
        balancers[0].ipv4,
        took.as_secs_f64() * 1000.0
    );
    print!(
        "{}",
        indent(&bed.run_in_ok(router, "ip", ["route", "show", &vip.ip().to_string()])?)
    );
    std::thread::sleep(Duration::from_secs(2));
    let attempts = load.finish()?;
    let answers = keepalive.stop();
    let failed = attempts.iter().filter(|a| a.is_err()).count();
    let ka_failed = answers
        .iter()
        .filter(|a| matches!(a, xtask::traffic::Answer::Err { .. }))
        .count();
    println!(
        "  new connections: {} made, {failed} failed; the long-lived connection: {} requests, {ka_failed} failed ({:.1} s since the link went down)",
        attempts.len(),
        answers.len(),
        (monotonic_us() - down) as f64 / 1e6
    );
    if failed + ka_failed > 0 {
        bail!("requests failed while a balancer died");
    }
    Ok(())
}

/// Waits (at most 15 s) until the router's route to the VIP has `count` next hops.
fn wait_hops(bed: &Testbed, router: &str, count: usize) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let hops = next_hops(bed, router, vip_a().ip())?;
        if hops.len() == count {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the router's route has next hops {hops:?}, not {count}, after 15 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
