//! `cargo xtask demo --nat`: a VIP in `nat` mode in front of two servers that know nothing
//! of the balancer (no VIP, no sysctl, no route), told step by step.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use xtask::testbed::Testbed;

use super::demo::{Story, step, tell};

pub fn run(requests: u32) -> Result<()> {
    super::demo::in_two_backend_bed(true, |bed, vip| show(bed, vip, requests))
}

fn show(bed: &Testbed, vip: SocketAddr, requests: u32) -> Result<()> {
    let story = Story {
        vip_step: "a VIP in nat mode with the two servers",
        vip_args: &["--mode", "nat"],
        requests,
        requests_step: format!("{requests} requests, each on a new connection, to {vip}"),
    };
    tell(bed, vip, story, |lb, _| {
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
        lb(&["stats"])
    })
}
