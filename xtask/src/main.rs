//! `cargo xtask <command>`: development tasks, plus the traffic helpers the test bed runs
//! inside its namespaces (`serve`, `client`, `load`, `keepalive`).

mod cmd;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use xtask::{testbed, traffic};

#[derive(Parser)]
#[command(name = "xtask", about = "Development tasks for the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build everything and run the whole test suite (needs root, ip, nsenter, ethtool).
    Test {
        /// Passed to `cargo test` as they are (e.g. `-- --nocapture`, `--test e2e`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build in release mode and run the benchmarks (BENCHMARKS.md); `--quick` for a short
    /// run, `--only dataplane,e2e,control` for some parts. Installs the traffic tools.
    Bench {
        /// Passed to lb-bench as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show the balancer at work in a throw-away namespace test bed.
    Demo {
        /// Requests to send through the VIP.
        #[arg(long, default_value_t = 10)]
        requests: u32,
        /// Two balancers behind a router (BGP + ECMP, BIRD 2) instead: both carry new
        /// connections, then one dies under load without a failed request.
        #[arg(long)]
        fleet: bool,
        /// The classic stack instead: nginx over HTTPS with source affinity, a MariaDB
        /// primary and replica behind write and read VIPs, and a primary failover.
        #[arg(long)]
        stack: bool,
        /// A VIP in full-NAT mode in front of two plain servers (no VIP, no sysctl).
        #[arg(long)]
        nat: bool,
    },
    /// Bring the test bed up with backends, agent, VIPs (v4 and v6) and two backends each,
    /// keep it for HOLD_SECS (or until Ctrl-C) to look around, then tear it down.
    Up {
        #[arg(long, default_value_t = 300)]
        hold_secs: u64,
    },
    /// Build the Debian package (release build) into target/package/lb_VERSION_ARCH.deb.
    Package,
    /// Delete test bed namespaces left behind by test runs that were killed.
    Clean,
    /// (test bed) Attach an XDP program that passes everything to IFACE (in this netns).
    XdpPass {
        #[arg(long)]
        iface: String,
    },
    /// (test bed) Serve HTTP on [::]:PORT, answering every request with NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// (test bed) Make COUNT new connections to TO, one request each; print a JSON tally.
    Client {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Connect from ports SOURCE_PORT, SOURCE_PORT+1, ... (closing with a reset), so a
        /// repeated run makes the same flows.
        #[arg(long)]
        source_port: Option<u16>,
    },
    /// (test bed) Steady load: a new connection to TO every INTERVAL_MS for MAX_SECS (or
    /// until SIGTERM), one request each (with --udp: one datagram and its answer); prints
    /// `SEQ START_US LATENCY_US ok BACKEND` or `... err MESSAGE` per attempt (START_US on
    /// CLOCK_MONOTONIC).
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60)]
        max_secs: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Attempt N connects from port SOURCE_PORT+N (closing with a reset): every attempt
        /// is a new flow.
        #[arg(long)]
        source_port: Option<u16>,
        /// UDP datagrams (each from a new socket) instead of TCP connections.
        #[arg(long)]
        udp: bool,
    },
    /// (test bed) One keep-alive connection to TO, a request every INTERVAL_MS; prints
    /// `ok SEQ BACKEND` per answer, stops at the first error or after MAX_SECS.
    Keepalive {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60)]
        max_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test { args } => cmd::test::run(&args),
        Command::Bench { args } => cmd::bench::run(&args),
        Command::Demo { fleet: true, .. } => cmd::demo_fleet::run(),
        Command::Demo { stack: true, .. } => cmd::demo::stack(),
        Command::Demo {
            nat: true,
            requests,
            ..
        } => cmd::demo_nat::run(requests),
        Command::Demo { requests, .. } => cmd::demo::run(requests),
        Command::Up { hold_secs } => cmd::demo::up(Duration::from_secs(hold_secs)),
        Command::Package => cmd::package::run(),
        Command::Clean => testbed::clean_stale().map(|deleted| {
            if deleted.is_empty() {
                println!("nothing to clean");
            }
            for ns in deleted {
                println!("deleted namespace {ns}");
            }
        }),
        Command::XdpPass { iface } => xtask::xdp_pass::attach(&iface),
        Command::Serve { name, port } => traffic::serve(&name, port),
        Command::Client {
            to,
            count,
            timeout_ms,
            source_port,
        } => {
            let tally = traffic::client(to, count, Duration::from_millis(timeout_ms), source_port);
            serde_json::to_string(&tally)
                .map_err(Into::into)
                .map(|json| println!("{json}"))
        }
        Command::Load {
            to,
            interval_ms,
            max_secs,
            timeout_ms,
            source_port,
            udp,
        } => traffic::load(traffic::LoadPlan {
            to,
            interval: Duration::from_millis(interval_ms),
            duration: Duration::from_secs(max_secs),
            timeout: Duration::from_millis(timeout_ms),
            source_port,
            udp,
        }),
        Command::Keepalive {
            to,
            interval_ms,
            max_secs,
        } => traffic::keepalive(
            to,
            Duration::from_millis(interval_ms),
            Duration::from_secs(max_secs),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
