//! `lb`: runs the agent (`lb run`) and talks to a running one (every other command).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use lb::{
    agent,
    control::{self, Request, Response},
    health::{self, CheckKind, CheckPatch},
    model::{self, Algo, Proto},
};

#[derive(Parser)]
#[command(
    name = "lb",
    version = lb::service::VERSION.as_str(),
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
        /// bpffs directory where maps and attachments are pinned, so a restarted or
        /// crashed agent is taken over without dropping flows. Default: /sys/fs/bpf/lb/
        /// followed by this network namespace's inode number.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Keep nothing in bpffs: the data plane lives and dies with this process.
        #[arg(long, conflicts_with_all = ["pin_dir", "keep_forwarding"])]
        no_pin: bool,
        /// On SIGINT/SIGTERM leave the program attached and forwarding (for upgrades); by
        /// default a clean stop detaches it and removes the pins.
        #[arg(long)]
        keep_forwarding: bool,
        /// Serve Prometheus metrics (/metrics) and the status page (/) on ADDR:PORT
        /// ([ADDR]:PORT for IPv6), or `off`.
        #[arg(long, value_name = "ADDR:PORT|off", default_value = lb::monitor::DEFAULT_LISTEN)]
        metrics: lb::monitor::Listen,
    },
    /// Virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Real servers behind a VIP.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Drop list: packets from these sources are dropped before anything else.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Counters per VIP, backend and pass/drop reason.
    Stats {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Live view: rates (packets/s, bits/s, new flows/s) redrawn every second.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after N refreshes.
        #[arg(long, requires = "watch", value_name = "N")]
        count: Option<u64>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (lb.1, lb-run.1, ...) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// Health check settings (HAProxy's meaning).
#[derive(Args, Default)]
struct CheckArgs {
    /// none, tcp (connect), http:/PATH (GET, status in --expect) or tls (handshake).
    #[arg(long, value_parser = clap::value_parser!(CheckKind))]
    check: Option<CheckKind>,
    /// Milliseconds between checks.
    #[arg(long)]
    interval: Option<u64>,
    /// Milliseconds a check may take.
    #[arg(long)]
    timeout: Option<u64>,
    /// Consecutive good checks that bring a backend up.
    #[arg(long)]
    rise: Option<u32>,
    /// Consecutive failed checks that take a backend down.
    #[arg(long)]
    fall: Option<u32>,
    /// HTTP statuses that pass, e.g. 200-399.
    #[arg(long, value_parser = health::parse_expect)]
    expect: Option<[u16; 2]>,
    /// Verify TLS certificates against this CA (PEM); not verified otherwise.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

impl CheckArgs {
    fn patch(self) -> CheckPatch {
        CheckPatch {
            check: self.check,
            interval_ms: self.interval,
            timeout_ms: self.timeout,
            rise: self.rise,
            fall: self.fall,
            expect: self.expect,
            tls_ca: self.tls_ca.map(|p| std::path::absolute(&p).unwrap_or(p)),
        }
    }
}

#[derive(Args)]
struct VipSettings {
    #[command(flatten)]
    vip: VipArg,
    /// rr: weighted round robin; maglev: consistent hashing for balancer fleets.
    #[arg(long, value_enum)]
    algo: Option<Algo>,
    #[command(flatten)]
    check: CheckArgs,
    /// Most new flows per second one source may open (SYN/UDP floods); 0 removes the limit.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// New flows a source may open at once above the rate (default: one second's worth).
    #[arg(long, requires = "rate_limit")]
    burst: Option<u32>,
}

#[derive(Args)]
struct BackendArg {
    #[command(flatten)]
    vip: VipArg,
    /// The backend's address (it serves on the VIP's port).
    backend: String,
}

#[derive(Args)]
struct VipArg {
    /// ADDR:PORT, or [ADDR]:PORT for IPv6.
    vip: String,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
}

#[derive(Subcommand)]
enum FirewallCommand {
    /// Drop every packet from CIDR (IPv4 or IPv6, e.g. 203.0.113.0/24, 2001:db8::/32).
    Add {
        cidr: String,
    },
    Del {
        cidr: String,
    },
    /// Rules with their hit counters.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    Add(VipSettings),
    /// Change a VIP's algorithm or health check; the rest stays.
    Set(VipSettings),
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
        target: BackendArg,
        /// Share of new flows relative to the other backends (0 = none), default 1.
        #[arg(long)]
        weight: Option<u32>,
        /// Takes new flows only while no primary backend can (active-passive).
        #[arg(long)]
        backup: bool,
        /// Health check settings that replace the VIP's for this backend.
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Change a backend's weight, role or check override.
    Set {
        #[command(flatten)]
        target: BackendArg,
        #[arg(long)]
        weight: Option<u32>,
        /// Make it a backup (true) or a primary (false).
        #[arg(long)]
        backup: Option<bool>,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Maintenance: no new flows, established flows continue.
    Drain(BackendArg),
    /// End maintenance: takes new flows again.
    Undrain(BackendArg),
    Del(BackendArg),
    List {
        /// Only this VIP's backends.
        vip: Option<String>,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[arg(long)]
        json: bool,
    },
}

impl BackendArg {
    fn parse(&self) -> Result<(std::net::SocketAddr, Proto, std::net::IpAddr)> {
        let vip = model::parse_vip_addr(&self.vip.vip)?;
        Ok((
            vip,
            self.vip.proto,
            model::parse_backend_addr(&self.backend)?,
        ))
    }
}

/// One pin directory per network namespace, so agents in different namespaces (balancer
/// test beds, containers) never share maps, and a restart in the same one finds its own.
fn default_pin_dir() -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata("/proc/self/ns/net")?.ino();
    Ok(PathBuf::from(format!("/sys/fs/bpf/lb/netns-{netns}")))
}

fn main() -> ExitCode {
    lb::service::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the chain of causes.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("{}lb: {line}", lb::service::error_prefix());
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
            pin_dir,
            no_pin,
            keep_forwarding,
            metrics,
        } => {
            let pin_dir = match (no_pin, pin_dir) {
                (true, _) => None,
                (false, Some(dir)) => Some(dir),
                (false, None) => Some(default_pin_dir()?),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(agent::run(agent::Options {
                ifaces: iface,
                config,
                socket: cli.socket,
                generic,
                pin_dir,
                keep_forwarding,
                metrics: metrics.0,
            }));
        }
        Command::Completions { shell } => return lb::manual::completions(Cli::command(), shell),
        Command::Man { dir } => return lb::manual::man_pages(Cli::command(), &dir),
        Command::Vip(VipCommand::Add(v)) => (
            Request::VipAdd {
                vip: model::parse_vip_addr(&v.vip.vip)?,
                proto: v.vip.proto,
                algo: v.algo,
                check: v.check.patch(),
                rate_limit: v.rate_limit,
                burst: v.burst,
            },
            false,
        ),
        Command::Vip(VipCommand::Set(v)) => (
            Request::VipSet {
                vip: model::parse_vip_addr(&v.vip.vip)?,
                proto: v.vip.proto,
                algo: v.algo,
                check: v.check.patch(),
                rate_limit: v.rate_limit,
                burst: v.burst,
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
        Command::Backend(BackendCommand::Add {
            target,
            weight,
            backup,
            check,
        }) => {
            let (vip, proto, backend) = target.parse()?;
            let backup = Some(backup);
            let check = check.patch();
            (
                Request::BackendAdd {
                    vip,
                    proto,
                    backend,
                    weight,
                    backup,
                    check,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::Set {
            target,
            weight,
            backup,
            check,
        }) => {
            let (vip, proto, backend) = target.parse()?;
            let check = check.patch();
            (
                Request::BackendSet {
                    vip,
                    proto,
                    backend,
                    weight,
                    backup,
                    check,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::Drain(target)) => {
            let (vip, proto, backend) = target.parse()?;
            (
                Request::BackendDrain {
                    vip,
                    proto,
                    backend,
                    drain: true,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::Undrain(target)) => {
            let (vip, proto, backend) = target.parse()?;
            (
                Request::BackendDrain {
                    vip,
                    proto,
                    backend,
                    drain: false,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::Del(target)) => {
            let (vip, proto, backend) = target.parse()?;
            (
                Request::BackendDel {
                    vip,
                    proto,
                    backend,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::List { vip, proto, json }) => {
            let vip = vip.as_deref().map(model::parse_vip_addr).transpose()?;
            (Request::BackendList { vip, proto }, json)
        }
        Command::Stats {
            watch: true, count, ..
        } => return lb::watch::run(&cli.socket, count),
        Command::Stats { json, .. } => (Request::Stats, json),
        Command::Firewall(FirewallCommand::Add { cidr }) => (
            Request::FirewallAdd {
                cidr: model::parse_cidr(&cidr)?,
            },
            false,
        ),
        Command::Firewall(FirewallCommand::Del { cidr }) => (
            Request::FirewallDel {
                cidr: model::parse_cidr(&cidr)?,
            },
            false,
        ),
        Command::Firewall(FirewallCommand::List { json }) => (Request::FirewallList, json),
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
            } else if kind == std::mem::discriminant(&Request::FirewallList) {
                print!("{}", lb::table::firewall(&data));
            } else if !data.is_null() {
                print!("{}", lb::table::backends(&data));
            }
        }
    }
    Ok(())
}
