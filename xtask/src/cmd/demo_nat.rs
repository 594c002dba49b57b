//! `cargo xtask demo --nat`: a VIP in `nat` mode in front of two servers that know nothing
//! of the balancer (no VIP, no sysctl, no route), told step by step.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use xtask::testbed::Testbed;

use super::demo::{indent, step};

pub fn run(requests: u32) -> Result<()> {
    super::demo::in_two_backend_bed(true, |bed, vip| show(bed, vip, requests))
}

fn show(bed: &Testbed, vip: SocketAddr, requests: u32) -> Result<()> {
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
    step("a VIP in nat mode with the two servers");
    let vip_s = vip.to_string();
    lb(&["vip", "add", &vip_s, "--proto", "tcp", "--mode", "nat"])?;
    for b in &bed.backends {
        lb(&["backend", "add", &vip_s, &b.ipv4.to_string()])?;
    }
    lb(&["vip", "list"])?;

    step(&format!(
        "{requests} requests, each on a new connection, to {vip}"
    ));
    let tally = bed.requests(vip, requests)?;
    for (i, name) in tally.sequence.iter().enumerate() {
        println!("  request {:>3} -> {name}", i + 1);
    }
    for e in &tally.errors {
        println!("  FAILED: {e}");
    }
    step("what a backend saw: connections from the balancer's address");
    let b1 = &bed.backends[0];
    let seen = bed.run_in_ok(&b1.ns, "ss", ["-Htn", "state", "time-wait"])?;
    for line in seen.lines().take(3) {
        println!(
            "  {}",
            line.split_whitespace().collect::<Vec<_>>().join("  ")
        );
    }
    step("what the agent counted (see the NAT line and nat_reply)");
    // The NAT line appears after the agent's first sweep (every 2 s).
    std::thread::sleep(Duration::from_secs(3));
    lb(&["stats"])?;
    step("stopping the agent (SIGTERM)");
    println!("  agent exited: {}", agent.stop(Duration::from_secs(10))?);
    if !tally.errors.is_empty() {
        bail!("{} of {requests} requests failed", tally.errors.len());
    }
    Ok(())
}
