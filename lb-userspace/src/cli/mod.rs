//! The `lb` command line: clap definitions, the request each command sends, and how the
//! answer is shown (tables in [`table`], `lb status` in [`status`], `stats --watch` in
//! [`watch`]). `lb run` starts the agent ([`crate::run`]). Every command's help ends with
//! examples, which the manual pages carry too.

pub mod status;
pub mod table;
pub mod watch;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::{
    api::protocol::{self as control, BackendSpec, Request, Response, VipSpec},
    health::{self, CheckKind, CheckPatch},
    model::{self, Algo, Mode, Proto},
    state::Plan,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version = crate::service::VERSION.as_str(),
    about = "XDP layer-4 load balancer: agent and control CLI",
    after_help = "Examples:
  lb run --iface eth0                      start the agent (as a service: systemctl start lb@eth0)
  lb status                                what runs, what is up, what was dropped
  lb vip add 10.0.0.10:80 --check http:/healthz
  lb backend add 10.0.0.10:80 192.168.1.11
  lb stats --watch                         live rates"
)]
pub struct Cli {
    /// The running agent's control socket.
    #[arg(long, global = true, env = "LB_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: attach XDP, serve the CLI, detach on SIGINT/SIGTERM.
    #[command(after_help = "Examples:
  lb run --iface eth0
  lb run --iface eth0,eth1 --config /etc/lb/lb.toml --metrics 0.0.0.0:9180
  lb run --iface veth0 --generic --no-pin    (a veth or a NIC without native XDP)")]
    Run {
        /// Interfaces to attach to (comma-separated).
        #[arg(long, required = true, value_delimiter = ',')]
        iface: Vec<String>,
        /// Configuration file: applied at start and on SIGHUP, rewritten after every CLI
        /// change.
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
        #[arg(long, value_name = "ADDR:PORT|off", default_value = crate::monitor::DEFAULT_LISTEN)]
        metrics: crate::monitor::Listen,
        /// Entries of the flow table (connections tracked at once; the least recently
        /// used are evicted when full). Changing it on a restart copies the flows over.
        #[arg(long, value_name = "N", default_value_t = lb_common::MAX_FLOWS,
              value_parser = clap::value_parser!(u32).range(1024..=1 << 28))]
        max_flows: u32,
    },
    /// On a backend of tunnel or gue VIPs: strip the balancer's outer header (IP-in-IP,
    /// IPv6-in-IPv6, GUE) from packets to these VIPs and pass them up; the VIPs must be on
    /// loopback. Runs in the foreground; SIGINT/SIGTERM detach it.
    #[command(after_help = "Examples:
  lb decap --iface eth0 --vip 10.0.0.10 --vip fd00::10
  lb decap --iface eth0 --vip 10.0.0.10 --gue-port          (GUE on 6080 too)
  lb decap --iface eth0 --vip 10.0.0.10 --interval 60       (counters every minute)")]
    Decap {
        /// The interface tunnelled packets arrive on.
        #[arg(long)]
        iface: String,
        /// A VIP address this backend serves (repeat for more).
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<std::net::IpAddr>,
        /// Strip GUE on this UDP port too (without a value: the balancer's default).
        #[arg(long, value_name = "PORT", num_args = 0..=1,
              default_missing_value = "6080")]
        gue_port: Option<u16>,
        /// Use generic (SKB) XDP, for drivers without native XDP.
        #[arg(long)]
        generic: bool,
        /// Print the counters every SECONDS (0: only when stopped).
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        interval: u64,
    },
    /// The overview to read first: agent, interfaces and XDP mode, VIPs with backends up,
    /// drops in the last minute, flow table use.
    #[command(after_help = "Examples:
  lb status
  lb status --json | jq '.vips[] | select(.backends_up < .backends_total)'")]
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Virtual services.
    #[command(
        subcommand,
        after_help = "Examples:
  lb vip add 10.0.0.10:80 --check http:/healthz
  lb vip list"
    )]
    Vip(VipCommand),
    /// Real servers behind a VIP.
    #[command(
        subcommand,
        after_help = "Examples:
  lb backend add 10.0.0.10:80 192.168.1.11
  lb backend drain 10.0.0.10:80 192.168.1.11
  lb backend list 10.0.0.10:80"
    )]
    Backend(BackendCommand),
    /// Drop list: packets from these sources are dropped before anything else.
    #[command(
        subcommand,
        after_help = "Examples:
  lb firewall add 203.0.113.0/24
  lb firewall list"
    )]
    Firewall(FirewallCommand),
    /// Make the running agent's configuration what FILE says: the difference is applied as
    /// one change, and what did not change is not touched. A bad file changes nothing.
    #[command(after_help = "Examples:
  lb apply -f /etc/lb/lb.toml --diff    show what would change
  lb apply -f /etc/lb/lb.toml")]
    Apply {
        /// The configuration file (the format `lb run --config` reads).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only show what would change; apply nothing.
        #[arg(long, visible_alias = "dry-run")]
        diff: bool,
        #[arg(long)]
        json: bool,
    },
    /// Counters per VIP, backend and pass/drop reason.
    #[command(after_help = "Examples:
  lb stats
  lb stats --watch
  lb stats --json | jq .reasons.drop_no_backend")]
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
    /// Balancers in a fleet behind routers (BGP + ECMP): what this one announces, leave
    /// and join.
    #[command(
        subcommand,
        after_help = "Examples:
  lb fleet status
  lb fleet leave                 then stop the agent: systemctl stop lb@eth0
  lb fleet join"
    )]
    Fleet(crate::fleet::cli::FleetCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        hide = true,
        after_help = "Examples:
  lb completions bash > /usr/share/bash-completion/completions/lb"
    )]
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (lb.1, lb-run.1, ...) into DIR.
    #[command(
        hide = true,
        after_help = "Examples:
  lb man /usr/share/man/man1"
    )]
    Man { dir: PathBuf },
}

/// Health check settings (HAProxy's meaning).
#[derive(Args, Default)]
struct CheckArgs {
    /// none, tcp (connect), http:/PATH (GET, status in --expect), tls (handshake), mysql
    /// (login), mysql-primary (writable), mysql-replica (read-only), pgsql (login) or
    /// exec:/PATH (script ADDR PORT exits 0).
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
    /// tls: the name sent (SNI) and verified, for certificates without the IP address.
    #[arg(long)]
    tls_name: Option<String>,
    /// The check user for mysql*/pgsql checks: a TOML file (user, password) only root reads.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// mysql-replica: most replication lag (seconds) that still counts as up.
    #[arg(long)]
    max_lag: Option<u64>,
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
            tls_name: self.tls_name,
            credentials: self
                .credentials
                .map(|p| std::path::absolute(&p).unwrap_or(p)),
            max_lag_s: self.max_lag,
        }
    }
}

#[derive(Args)]
struct VipSettings {
    #[command(flatten)]
    vip: VipArg,
    /// rr: weighted round robin; maglev: consistent hashing for balancer fleets; leastconn:
    /// fewest active connections per weight (long sessions, databases).
    #[arg(long, value_enum)]
    algo: Option<Algo>,
    /// How packets reach the backends: dsr (direct server return, backends on this
    /// segment), nat (full NAT, backends untouched), tunnel or gue (IP-in-IP or GUE to
    /// routed backends running `lb decap`).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    #[command(flatten)]
    check: CheckArgs,
    /// Most new flows per second one source may open (SYN/UDP floods); 0 removes the limit.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// New flows a source may open at once above the rate (default: one second's worth).
    #[arg(long, requires = "rate_limit")]
    burst: Option<u32>,
    /// Most new flows per second the VIP takes from all sources together (checked after
    /// --rate-limit; holds against floods from random sources); 0 removes the ceiling.
    #[arg(long)]
    max_new_flows: Option<u32>,
    /// New flows the VIP takes at once above its ceiling (default: one second's worth).
    #[arg(long, requires = "max_new_flows")]
    new_flow_burst: Option<u32>,
    /// Source affinity: a client's connections go to one backend while it is up and for
    /// SECONDS after the client's last new connection; 0 removes it.
    #[arg(long, value_name = "SECONDS")]
    persist: Option<u32>,
    /// With --persist: an IPv6 client is its source's /LEN (default 64).
    #[arg(long, value_name = "LEN")]
    persist_prefix6: Option<u8>,
}

impl VipSettings {
    /// `vip add` and `vip set` send the same spec; the agent reads what is absent as the
    /// default (add) or as unchanged (set).
    fn spec(self) -> Result<VipSpec> {
        Ok(VipSpec {
            vip: model::parse_vip_addr(&self.vip.vip)?,
            proto: self.vip.proto,
            algo: self.algo,
            mode: self.mode,
            check: self.check.patch(),
            rate_limit: self.rate_limit,
            burst: self.burst,
            max_new_flows: self.max_new_flows,
            new_flow_burst: self.new_flow_burst,
            persist: self.persist,
            persist_prefix6: self.persist_prefix6,
        })
    }
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
    #[command(after_help = "Examples:
  lb firewall add 203.0.113.0/24
  lb firewall add 2001:db8:bad::/48
  lb firewall add 198.51.100.7        (one address: /32)")]
    Add { cidr: String },
    /// Stop dropping packets from CIDR.
    #[command(after_help = "Examples:
  lb firewall del 203.0.113.0/24")]
    Del { cidr: String },
    /// Rules with their hit counters.
    #[command(after_help = "Examples:
  lb firewall list
  lb firewall list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    /// Add a virtual service.
    #[command(after_help = "Examples:
  lb vip add 10.0.0.10:80 --check http:/healthz --expect 200-399
  lb vip add 10.0.0.10:3306 --algo maglev --check mysql-primary --credentials /etc/lb/mysql.toml
  lb vip add [2001:db8::10]:53 --proto udp
  lb vip add 10.0.0.10:443 --check tls --rate-limit 100
  lb vip add 10.0.0.10:443 --rate-limit 100 --max-new-flows 20000")]
    Add(VipSettings),
    /// Change a VIP's algorithm or health check; the rest stays.
    #[command(after_help = "Examples:
  lb vip set 10.0.0.10:80 --check tcp --interval 500 --fall 2
  lb vip set 10.0.0.10:80 --rate-limit 0    (no limit)
  lb vip set 10.0.0.10:80 --max-new-flows 5000 --new-flow-burst 10000")]
    Set(VipSettings),
    /// Remove a virtual service and its backends.
    #[command(after_help = "Examples:
  lb vip del 10.0.0.10:80
  lb vip del [2001:db8::10]:53 --proto udp")]
    Del(VipArg),
    /// Virtual services with their counters.
    #[command(after_help = "Examples:
  lb vip list
  lb vip list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a backend to a VIP.
    #[command(after_help = "Examples:
  lb backend add 10.0.0.10:80 192.168.1.11
  lb backend add 10.0.0.10:80 192.168.1.12 --weight 2
  lb backend add 10.0.0.10:3306 192.168.1.21 --backup
  lb backend add [2001:db8::10]:53 2001:db8::21 --proto udp")]
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
    #[command(after_help = "Examples:
  lb backend set 10.0.0.10:80 192.168.1.12 --weight 0    (no new flows by weight)
  lb backend set 10.0.0.10:3306 192.168.1.21 --backup false")]
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
    #[command(after_help = "Examples:
  lb backend drain 10.0.0.10:80 192.168.1.11
  lb backend list 10.0.0.10:80    (FLOWS: how many remain)")]
    Drain(BackendArg),
    /// End maintenance: takes new flows again.
    #[command(after_help = "Examples:
  lb backend undrain 10.0.0.10:80 192.168.1.11")]
    Undrain(BackendArg),
    /// Remove a backend gracefully: no new flows at once, removed when its flows end or
    /// after the grace period (listed as leaving until then).
    #[command(after_help = "Examples:
  lb backend del 10.0.0.10:80 192.168.1.11
  lb backend del 10.0.0.10:3306 192.168.1.21 --grace 600
  lb backend del 10.0.0.10:80 192.168.1.11 --now    (its flows move to the others)")]
    Del {
        #[command(flatten)]
        target: BackendArg,
        /// Seconds its flows may take to end [default: 60].
        #[arg(long, conflicts_with = "now")]
        grace: Option<u64>,
        /// Remove it at once; its flows move to the other backends.
        #[arg(long)]
        now: bool,
    },
    /// Backends with their state, health and counters.
    #[command(after_help = "Examples:
  lb backend list
  lb backend list 10.0.0.10:80
  lb backend list [2001:db8::10]:53 --proto udp --json")]
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

    /// What `lb backend add` and `lb backend set` send for this backend.
    fn spec(
        &self,
        weight: Option<u32>,
        backup: Option<bool>,
        check: CheckArgs,
    ) -> Result<BackendSpec> {
        let (vip, proto, backend) = self.parse()?;
        Ok(BackendSpec {
            vip,
            proto,
            backend,
            weight,
            backup,
            check: check.patch(),
        })
    }
}

/// One pin directory per network namespace, so agents in different namespaces (balancer
/// test beds, containers) never share maps, and a restart in the same one finds its own.
fn default_pin_dir() -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata("/proc/self/ns/net")?.ino();
    Ok(PathBuf::from(format!("/sys/fs/bpf/lb/netns-{netns}")))
}

/// Does what the command line says.
pub fn run(cli: Cli) -> Result<()> {
    let (request, json) = match cli.command {
        Command::Run {
            iface,
            config,
            generic,
            pin_dir,
            no_pin,
            keep_forwarding,
            metrics,
            max_flows,
        } => {
            let pin_dir = match (no_pin, pin_dir) {
                (true, _) => None,
                (false, Some(dir)) => Some(dir),
                (false, None) => Some(default_pin_dir()?),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(crate::run::run(crate::run::Options {
                ifaces: iface,
                config,
                socket: cli.socket,
                generic,
                pin_dir,
                keep_forwarding,
                metrics: metrics.0,
                max_flows,
            }));
        }
        Command::Decap {
            iface,
            vips,
            gue_port,
            generic,
            interval,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(crate::decap::run(crate::decap::Options {
                iface,
                vips,
                gue_port,
                generic,
                interval: (interval > 0).then(|| std::time::Duration::from_secs(interval)),
            }));
        }
        Command::Vip(VipCommand::Add(v)) => (Request::VipAdd(v.spec()?), false),
        Command::Vip(VipCommand::Set(v)) => (Request::VipSet(v.spec()?), false),
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
        }) => (
            Request::BackendAdd(target.spec(weight, Some(backup), check)?),
            false,
        ),
        Command::Backend(BackendCommand::Set {
            target,
            weight,
            backup,
            check,
        }) => (
            Request::BackendSet(target.spec(weight, backup, check)?),
            false,
        ),
        Command::Backend(
            BackendCommand::Drain(ref target) | BackendCommand::Undrain(ref target),
        ) => {
            let drain = matches!(cli.command, Command::Backend(BackendCommand::Drain(_)));
            let (vip, proto, backend) = target.parse()?;
            (
                Request::BackendDrain {
                    vip,
                    proto,
                    backend,
                    drain,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::Del { target, grace, now }) => {
            let (vip, proto, backend) = target.parse()?;
            (
                Request::BackendDel {
                    vip,
                    proto,
                    backend,
                    grace_s: grace,
                    now,
                },
                false,
            )
        }
        Command::Backend(BackendCommand::List { vip, proto, json }) => {
            let vip = vip.as_deref().map(model::parse_vip_addr).transpose()?;
            (Request::BackendList { vip, proto }, json)
        }
        Command::Completions { shell } => {
            return crate::manual::completions(Cli::command(), shell);
        }
        Command::Man { dir } => return crate::manual::man_pages(Cli::command(), &dir),
        Command::Apply { file, diff, json } => return apply(&cli.socket, &file, diff, json),
        Command::Stats {
            watch: true, count, ..
        } => return watch::run(&cli.socket, count),
        Command::Stats { json, .. } => (Request::Stats, json),
        Command::Status { json } => (Request::Status, json),
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
        Command::Fleet(command) => return crate::fleet::cli::run(&cli.socket, command),
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
            } else if kind == std::mem::discriminant(&Request::Status) {
                print!("{}", status::render(&typed(data)?));
            } else if kind == std::mem::discriminant(&Request::Stats) {
                print!("{}", table::stats(&typed(data)?));
            } else if kind == std::mem::discriminant(&Request::VipList) {
                print!("{}", table::vips(&typed::<Vec<_>>(data)?));
            } else if kind == std::mem::discriminant(&Request::FirewallList) {
                print!("{}", table::firewall(&typed::<Vec<_>>(data)?));
            } else if !data.is_null() {
                print!("{}", table::backends(&typed::<Vec<_>>(data)?));
            }
        }
    }
    Ok(())
}

/// An answer's data as the view it is.
fn typed<T: serde::de::DeserializeOwned>(data: serde_json::Value) -> Result<T> {
    serde_json::from_value(data)
        .map_err(|e| anyhow::anyhow!("unreadable answer from the agent: {e}"))
}

/// `lb apply -f FILE [--diff]`: the agent parses the text (errors name FILE and the line)
/// and answers with what it changed, or would.
fn apply(
    socket: &std::path::Path,
    file: &std::path::Path,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let request = Request::Apply {
        file: file.display().to_string(),
        text,
        dry_run,
    };
    match control::call(socket, &request)? {
        Response::Error { error } => anyhow::bail!("{error}"),
        Response::Ok { message, data } => {
            let plan: Plan = typed(data)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
                return Ok(());
            }
            if dry_run {
                for change in &plan.changes {
                    println!("{change}");
                }
            }
            if let Some(m) = message {
                println!("{m}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Each subcommand's help starts with what it does, not with a flattened group's title.
    #[test]
    fn every_subcommand_says_what_it_does() {
        let cli = Cli::command();
        for group in cli.get_subcommands() {
            for sub in group.get_subcommands() {
                let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
                let name = format!("lb {} {}", group.get_name(), sub.get_name());
                assert!(!about.is_empty(), "{name} has no description");
                assert!(!about.contains("Health check settings"), "{name}: {about}");
            }
        }
    }

    /// Every command's help (and so its manual page) ends with examples of itself.
    #[test]
    fn every_command_has_an_example() {
        fn check(cmd: &mut clap::Command, path: &str, seen: &mut usize) {
            let help = cmd.render_long_help().to_string();
            let examples = help
                .split_once("Examples:\n")
                .unwrap_or_else(|| panic!("`{path} --help` has no Examples: block:\n{help}"))
                .1;
            assert!(
                examples
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{path} ")) || l.trim() == path),
                "`{path} --help` has no example of `{path}`:\n{examples}"
            );
            *seen += 1;
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .filter(|n| n != "help")
                .collect();
            for name in names {
                let sub = cmd.find_subcommand_mut(&name).expect("listed");
                check(sub, &format!("{path} {name}"), seen);
            }
        }
        let mut cli = Cli::command();
        cli.build();
        let mut seen = 0;
        check(&mut cli, "lb", &mut seen);
        // lb, run, status, apply, stats, completions, man, vip (5), backend (7), firewall (4),
        // fleet (4), decap
        assert_eq!(seen, 28);
    }

    /// The examples are real command lines: each parses.
    #[test]
    fn examples_parse() {
        fn collect(cmd: &clap::Command, out: &mut Vec<String>) {
            if let Some(after) = cmd.get_after_help() {
                let text = after.to_string();
                for line in text.lines().skip(1) {
                    // "  lb vip add ADDR ...    (comment)" or "...   comment"
                    let line = line.trim();
                    let line = line.split("  ").next().unwrap_or(line);
                    let line = line.split(" | ").next().unwrap_or(line);
                    let line = line.split(" > ").next().unwrap_or(line);
                    out.push(line.trim().to_string());
                }
            }
            for sub in cmd.get_subcommands() {
                collect(sub, out);
            }
        }
        let mut lines = Vec::new();
        collect(&Cli::command(), &mut lines);
        assert!(lines.len() > 40, "{lines:?}");
        for line in lines {
            let words = shell_words(&line);
            let parsed = Cli::try_parse_from(&words)
                .map_err(|e| e.to_string())
                .and_then(|cli| check_addresses(cli.command));
            assert!(
                parsed.is_ok(),
                "example `{line}`: {}",
                parsed.err().unwrap()
            );
        }
    }

    fn shell_words(line: &str) -> Vec<String> {
        line.split_whitespace()
            .map(|w| w.trim_matches('\'').to_string())
            .collect()
    }

    /// Addresses in examples parse as the agent would read them.
    fn check_addresses(command: Command) -> Result<(), String> {
        let e = |e: anyhow::Error| e.to_string();
        match command {
            Command::Vip(VipCommand::Add(v) | VipCommand::Set(v)) => {
                model::parse_vip_addr(&v.vip.vip).map_err(e)?;
            }
            Command::Vip(VipCommand::Del(v)) => {
                model::parse_vip_addr(&v.vip).map_err(e)?;
            }
            Command::Backend(
                BackendCommand::Add { target, .. }
                | BackendCommand::Set { target, .. }
                | BackendCommand::Drain(target)
                | BackendCommand::Undrain(target)
                | BackendCommand::Del { target, .. },
            ) => {
                target.parse().map_err(e)?;
            }
            Command::Firewall(FirewallCommand::Add { cidr } | FirewallCommand::Del { cidr }) => {
                model::parse_cidr(&cidr).map_err(e)?;
            }
            _ => {}
        }
        Ok(())
    }
}
