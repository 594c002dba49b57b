//! `lb fleet status | leave | join`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Subcommand;

use super::FleetView;
use crate::api::protocol::{self as control, Request, Response};

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Which VIP addresses this balancer announces to its routers, and why not the others
    /// (and, in a VRRP pair, what its keepalived track file says).
    #[command(after_help = "Examples:
  lb fleet status
  lb fleet status --json | jq '.addresses[] | select(.announced | not)'")]
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Withdraw every VIP address (maintenance; in a VRRP pair, write 0 into the track
    /// file, so the backup takes the VIPs), keep forwarding what still arrives, and wait
    /// until no packet reaches a VIP any more; then the agent may be stopped. Kept in the
    /// configuration file: a restarted agent stays out until `lb fleet join`.
    #[command(after_help = "Examples:
  lb fleet leave                 then stop the agent: systemctl stop lb@eth0
  lb fleet leave --no-wait")]
    Leave {
        /// Return at once; `lb fleet status` says when traffic has stopped.
        #[arg(long)]
        no_wait: bool,
    },
    /// Announce again the VIP addresses this balancer can serve; in a VRRP pair the track
    /// file says 1 again while it can serve them all (undoes `lb fleet leave`).
    #[command(after_help = "Examples:
  lb fleet join")]
    Join,
}

fn call(socket: &Path, request: &Request) -> Result<(Option<String>, FleetView)> {
    match control::call(socket, request)? {
        Response::Error { error } => bail!("{error}"),
        Response::Ok { message, data } => Ok((
            message,
            serde_json::from_value(data)
                .map_err(|e| anyhow::anyhow!("unreadable answer from the agent: {e}"))?,
        )),
    }
}

pub fn run(socket: &Path, command: FleetCommand) -> Result<()> {
    match command {
        FleetCommand::Status { json } => {
            let (_, view) = call(socket, &Request::FleetStatus)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", render(&view));
            }
        }
        FleetCommand::Join => {
            let (message, _) = call(socket, &Request::FleetJoin)?;
            println!("{}", message.unwrap_or_default());
        }
        FleetCommand::Leave { no_wait } => {
            let (message, view) = call(socket, &Request::FleetLeave)?;
            println!("{}", message.unwrap_or_default());
            if no_wait {
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs(view.grace_s.into());
            println!(
                "waiting for traffic to stop: no packet to any VIP for {} s (at most {} s)",
                view.quiet_s, view.grace_s
            );
            loop {
                let (_, view) = call(socket, &Request::FleetStatus)?;
                if view.member {
                    bail!("joined again while waiting (`lb fleet join`)");
                }
                if view.quiet {
                    println!(
                        "no packet to any VIP for {:.0} s: safe to stop the agent",
                        view.idle_s.unwrap_or(0.0)
                    );
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "VIP traffic still arrives after {} s (last packet {:.1} s ago): the routers may not have withdrawn the routes; `lb fleet status` shows what is announced",
                        view.grace_s,
                        view.idle_s.unwrap_or(0.0)
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Ok(())
}

/// `lb fleet status` for people.
pub fn render(v: &FleetView) -> String {
    let mut out = format!("fleet       {}\n", v.summary());
    if v.route_table == 0 && v.track.is_none() {
        out += "(set route_table (BGP) or track_file (VRRP) in the [fleet] section of the configuration)\n";
        return out;
    }
    out += "\n";
    let rows: Vec<Vec<String>> = v
        .addresses
        .iter()
        .map(|a| {
            vec![
                a.address.to_string(),
                if a.announced { "yes" } else { "no" }.to_string(),
                a.vips
                    .iter()
                    .map(|x| format!("{} {}/{}", x.vip, x.in_rotation, x.total))
                    .collect::<Vec<_>>()
                    .join(", "),
                a.why_not.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out += &crate::cli::table::render(
        &["ADDRESS", "ANNOUNCED", "VIPS (IN ROTATION)", "WHY NOT"],
        rows,
    );
    out
}
