//! `cargo xtask demo`: the balancer at work in a throw-away test bed, told step by step.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use xtask::{
    testbed::{self, Config, HTTP_PORT, Testbed, VIP4},
    traffic::Tally,
};

pub fn run(requests: u32) -> Result<()> {
    in_two_backend_bed(false, |bed, vip| show(bed, vip, requests))
}

/// Builds what the demo runs, makes a test bed with two backends (plain servers for full
/// NAT when `plain`, else prepared for direct server return), says who is who, runs `show`
/// in it and tears it down, whatever `show` did.
pub(super) fn in_two_backend_bed(
    plain: bool,
    show: impl FnOnce(&Testbed, SocketAddr) -> Result<()>,
) -> Result<()> {
    testbed::check_environment().context("the demo builds a namespace test bed")?;
    step("building the agent and the test bed helpers");
    super::cargo(&["build", "-p", "lb-userspace", "-p", "xtask"])?;
    // Ctrl-C (or SIGTERM) from here on still removes the namespaces and processes.
    testbed::teardown_on_signal()?;

    step("creating the test bed");
    let bed = Testbed::new(Config { backends: 2 })?;
    if plain {
        bed.plain_backends_for_nat()?;
    }
    let vip = SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT);
    println!("  one L2 segment (bridge in namespace {}):", bed.switch);
    println!(
        "    client   {:<16} {:<12} routes {VIP4} via the balancer",
        bed.client.ns, bed.client.ipv4
    );
    println!(
        "    balancer {:<16} {:<12} XDP on {}{}",
        bed.lb.ns,
        bed.lb.ipv4,
        bed.lb.ifname,
        if plain { ", forwarding on" } else { "" }
    );
    for (i, b) in bed.backends.iter().enumerate() {
        let role = if plain {
            "a plain server (no VIP, no sysctl)".to_string()
        } else {
            format!("holds {VIP4} on lo")
        };
        println!(
            "    backend  {:<16} {:<12} {role}, serves \"backend-{}\"",
            b.ns,
            b.ipv4,
            i + 1
        );
    }
    let result = show(&bed, vip);
    step("tearing the test bed down");
    drop(bed);
    result?;
    println!("\ndone.");
    Ok(())
}

/// `demo --stack`: the classic stack on the real servers (`tests/src/bin/demo_stack.rs`,
/// which shares the stack tests' helpers for nginx and MariaDB).
pub fn stack() -> Result<()> {
    testbed::check_environment().context("the demo builds a namespace test bed")?;
    step("building the agent and the test bed helpers");
    super::cargo(&["build", "-p", "lb-userspace", "-p", "xtask"])?;
    super::cargo(&["run", "-q", "-p", "lb-tests", "--bin", "demo_stack"])
}

fn show(bed: &Testbed, vip: SocketAddr, requests: u32) -> Result<()> {
    let story = Story {
        vip_step: "configuring a VIP with two backends",
        vip_args: &[],
        requests,
        requests_step: format!(
            "sending {requests} requests, each on a new connection, from the client to {vip}"
        ),
    };
    tell(bed, vip, story, |lb, tally| {
        println!("  per backend: {:?}", tally.counts);
        step("what the agent counted");
        lb(&["backend", "list"])?;
        lb(&["stats"])
    })
}

/// What a two-backend demo says in its own words (see [`tell`]).
pub(super) struct Story<'a> {
    /// The step that adds the VIP, and what `lb vip add VIP --proto tcp` gets besides.
    pub vip_step: &'a str,
    pub vip_args: &'a [&'a str],
    /// How many requests the client sends, and the step that sends them.
    pub requests: u32,
    pub requests_step: String,
}

/// The part of the story every two-backend demo tells: the backends and the agent
/// started, a VIP with both backends, the requests sent and where each went; then what
/// only this demo shows (`middle`, given `lb` commands that print as typed), and the
/// agent stopped. An error if a request failed, so the demo's exit status says so.
pub(super) fn tell(
    bed: &Testbed,
    vip: SocketAddr,
    story: Story<'_>,
    middle: impl FnOnce(&dyn Fn(&[&str]) -> Result<()>, &Tally) -> Result<()>,
) -> Result<()> {
    step("starting the backends");
    let _backends = bed.start_backends()?;
    step("starting the agent: lb run --iface eth0 (in the balancer namespace)");
    let config = bed.dir().join("lb.toml");
    let socket = bed.dir().join("lb.sock");
    let mut agent = bed.start_agent(&config, &socket)?;
    let lb = |args: &[&str]| -> Result<()> {
        println!("$ lb {}", args.join(" "));
        print!("{}", indent(&bed.lb_cli_ok(&socket, args)?));
        Ok(())
    };
    step(story.vip_step);
    let vip_s = vip.to_string();
    lb(&[&["vip", "add", &vip_s, "--proto", "tcp"], story.vip_args].concat())?;
    for b in &bed.backends {
        lb(&["backend", "add", &vip_s, &b.ipv4.to_string()])?;
    }
    lb(&["vip", "list"])?;

    step(&story.requests_step);
    let requests = story.requests;
    let tally = bed.requests(vip, requests)?;
    for (i, name) in tally.sequence.iter().enumerate() {
        println!("  request {:>3} -> {name}", i + 1);
    }
    for e in &tally.errors {
        println!("  FAILED: {e}");
    }
    middle(&lb, &tally)?;
    step("stopping the agent (SIGTERM)");
    println!("  agent exited: {}", agent.stop(Duration::from_secs(10))?);
    if !tally.errors.is_empty() {
        bail!("{} of {requests} requests failed", tally.errors.len());
    }
    Ok(())
}

pub(super) fn step(what: &str) {
    println!("\n== {what}");
}

pub(super) fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `xtask up`: the configured test bed, held for a person (or a debugger) to look at.
pub fn up(hold: Duration) -> Result<()> {
    testbed::check_environment()?;
    testbed::teardown_on_signal()?;
    let bed = Testbed::new(Config { backends: 2 })?;
    let _backends = bed.start_backends()?;
    let config = bed.dir().join("lb.toml");
    let socket = bed.dir().join("lb.sock");
    let _agent = bed.start_agent(&config, &socket)?;
    let vip6 = SocketAddr::new(IpAddr::V6(testbed::VIP6), HTTP_PORT).to_string();
    let vip4 = SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT).to_string();
    bed.lb_cli_ok(&socket, ["vip", "add", vip4.as_str()])?;
    bed.lb_cli_ok(&socket, ["vip", "add", vip6.as_str()])?;
    for b in &bed.backends {
        bed.lb_cli_ok(
            &socket,
            ["backend", "add", vip4.as_str(), &b.ipv4.to_string()],
        )?;
        bed.lb_cli_ok(
            &socket,
            ["backend", "add", vip6.as_str(), &b.ipv6.to_string()],
        )?;
    }
    println!(
        "namespaces: {} {} {} {}",
        bed.switch,
        bed.client.ns,
        bed.lb.ns,
        bed.backends
            .iter()
            .map(|b| b.ns.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "socket: {}\nconfig: {}\nlogs: {}",
        socket.display(),
        config.display(),
        bed.dir().display()
    );
    println!(
        "e.g.  nsenter --net=/run/netns/{} curl -s http://{vip4}/",
        bed.client.ns
    );
    println!("holding for {hold:?} (Ctrl-C tears down)");
    std::thread::sleep(hold);
    Ok(())
}
