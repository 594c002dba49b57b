//! `lb`: runs the agent (`lb run`) and talks to a running one (every other command).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lb::{
    agent,
    control::{self, Request, Response},
    model::{self, Proto},
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP layer-4 load balancer: agent and control CLI"
)]
struct Cli {
    /// The running agent's control socket.
    #[arg(long, global = true, env = "LB_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: attach XDP, serve the CLI, detach on SIGINT/SIGTERM.
    Run {
        /// Interfaces to attach to (comma-separated).
        #[arg(long, required = true, value_delimiter = ',')]
        iface: Vec<String>,
        /// Configuration file, loaded at start and rewritten after every CLI change.
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
        /// Use generic (SKB) XDP, for drivers without native XDP.
        #[arg(long)]
        generic: bool,
    },
    /// Virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Real servers behind a VIP.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Counters per VIP, backend and pass/drop reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct VipArg {
    /// ADDR:PORT, or [ADDR]:PORT for IPv6.
    vip: String,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
}

#[derive(Subcommand)]
enum VipCommand {
    Add(VipArg),
    Del(VipArg),
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    Add {
        #[command(flatten)]
        vip: VipArg,
        /// The backend's address (it serves on the VIP's port).
        backend: String,
    },
    Del {
        #[command(flatten)]
        vip: VipArg,
        backend: String,
    },
    List {
        /// Only this VIP's backends.
        vip: Option<String>,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the chain of causes.
            eprintln!("lb: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let (request, json) = match cli.command {
        Command::Run {
            iface,
            config,
            generic,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(agent::run(agent::Options {
                ifaces: iface,
                config,
                socket: cli.socket,
                generic,
            }));
        }
        Command::Vip(VipCommand::Add(v)) => (
            Request::VipAdd {
                vip: model::parse_vip_addr(&v.vip)?,
                proto: v.proto,
            },
            false,
        ),
        Command::Vip(VipCommand::Del(v)) => (
            Request::VipDel {
                vip: model::parse_vip_addr(&v.vip)?,
                proto: v.proto,
            },
            false,
        ),
        Command::Vip(VipCommand::List { json }) => (Request::VipList, json),
        Command::Backend(BackendCommand::Add { vip, backend }) => (
            Request::BackendAdd {
                vip: model::parse_vip_addr(&vip.vip)?,
                proto: vip.proto,
                backend: model::parse_backend_addr(&backend)?,
            },
            false,
        ),
        Command::Backend(BackendCommand::Del { vip, backend }) => (
            Request::BackendDel {
                vip: model::parse_vip_addr(&vip.vip)?,
                proto: vip.proto,
                backend: model::parse_backend_addr(&backend)?,
            },
            false,
        ),
        Command::Backend(BackendCommand::List { vip, proto, json }) => {
            let vip = vip.as_deref().map(model::parse_vip_addr).transpose()?;
            (Request::BackendList { vip, proto }, json)
        }
        Command::Stats { json } => (Request::Stats, json),
    };
    let kind = std::mem::discriminant(&request);
    match control::call(&cli.socket, &request)? {
        Response::Error { error } => anyhow::bail!("{error}"),
        Response::Ok { message, data } => {
            if let Some(m) = message {
                println!("{m}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else if kind == std::mem::discriminant(&Request::Stats) {
                print!("{}", lb::table::stats(&data));
            } else if kind == std::mem::discriminant(&Request::VipList) {
                print!("{}", lb::table::vips(&data));
            } else if !data.is_null() {
                print!("{}", lb::table::backends(&data));
            }
        }
    }
    Ok(())
}
