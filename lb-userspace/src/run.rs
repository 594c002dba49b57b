//! `lb run`: load the program, apply the configuration, attach, then serve the control
//! socket and monitoring, keep neighbours current and take in health results until SIGINT
//! or SIGTERM; SIGHUP re-applies the configuration file.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, mpsc},
    task::JoinHandle,
};

use crate::{
    api::{Agent, ConfigFile, server},
    config::Config,
    health,
    kernel::{self, datapath::Datapath, flows::FlowCounts, netif::Netif},
    monitor::{self, status},
    state::State,
};

/// How often unresolved backends are retried; resolved ones are re-checked every
/// `FULL_REFRESH_TICKS` ticks (MAC or interface changes).
const REFRESH_TICK: Duration = Duration::from_millis(250);
const FULL_REFRESH_TICKS: u32 = 20;

pub struct Options {
    pub ifaces: Vec<String>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub generic: bool,
    /// bpffs directory for maps and attachments; None runs unpinned.
    pub pin_dir: Option<PathBuf>,
    /// On a clean stop, leave the program attached and forwarding.
    pub keep_forwarding: bool,
    /// Where to serve /metrics and the status page; None: nowhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Entries of the flow table (`lb_common::MAX_FLOWS` by default).
    pub max_flows: u32,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<()> {
    if opts.ifaces.is_empty() {
        bail!("no interface given: --iface IF[,IF...]");
    }
    let ifindexes = opts
        .ifaces
        .iter()
        .map(|iface| kernel::netif::index(iface))
        .collect::<Result<Vec<u32>>>()?;
    raise_open_file_limit();
    let config = Config::load(&opts.config)?;
    // Before anything touches the pins or the socket: one agent per pin directory.
    let _pin_lock = match &opts.pin_dir {
        Some(dir) => Some(kernel::datapath::PinLock::take(dir)?),
        None => None,
    };
    let listener = server::bind(&opts.socket)?;
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(monitor::bind(addr).await?),
        None => None,
    };

    let netif = Netif::new()?;
    let datapath = match &opts.pin_dir {
        Some(dir) => {
            discard_stale_pins(dir, &netif).await?;
            Datapath::load_pinned(dir, opts.max_flows)?
        }
        None => Datapath::load_sized(opts.max_flows)?,
    };
    let restarted = datapath.adopted_state();
    let pinned = restarted.then(|| datapath.pinned());
    let flows = FlowCounts::new(datapath.flow_table()?);
    let (reports_tx, reports_rx) = mpsc::channel(1024);
    let mut state = State::new(datapath, Some(reports_tx));
    if let Some(pinned) = pinned {
        state.prepare_adoption(pinned);
    }
    let agent = Arc::new(Agent {
        state: Mutex::new(state),
        netif,
        flows,
        config: ConfigFile::new(opts.config.clone()),
        info: status::AgentInfo {
            hostname: status::hostname(),
            version: env!("CARGO_PKG_VERSION"),
            attach_mode: if opts.generic { "generic" } else { "native" },
            interfaces: opts.ifaces.clone(),
            started: status::unix_now(),
        },
        history: Default::default(),
        fleet: crate::fleet::Fleet::new(config.fleet.clone()),
        tunnel: config.tunnel.clone(),
        nat: config.nat.clone(),
    });
    // The same path as `lb apply`: the difference from an empty (or adopted) state.
    let started = std::time::Instant::now();
    agent
        .apply(&config, false, false)
        .await
        .map_err(|e| anyhow!("{}: {e:#}", opts.config.display()))?;
    let flow_sync = crate::flowsync::start(agent.clone(), config.flow_sync.as_ref()).await?;
    // Each interface's own MAC, so the program balances only frames sent to this host.
    let mut rx_macs = Vec::new();
    for &index in &ifindexes {
        rx_macs.push((index, agent.netif.link_mac(index).await?));
    }
    // The outer source of tunnels: configured, else the first interface's address.
    let tunnel = config
        .tunnel
        .entry(&agent.netif.addresses(ifindexes[0]).await?);
    // Before attaching: a NAT VIP's first flows find their SNAT address.
    crate::nat::refresh_snat(&agent).await?;
    {
        let mut state = agent.state.lock().await;
        state.dataplane_mut().set_tunnel(&tunnel)?;
        state.finish_adoption()?;
        // Attach only once the maps hold the configuration: a pinned attachment is
        // switched to this program atomically, a new one starts forwarding with complete
        // state.
        for (index, mac) in rx_macs {
            state.dataplane_mut().set_rx_iface(index, mac)?;
        }
        for (iface, &index) in opts.ifaces.iter().zip(&ifindexes) {
            state.dataplane_mut().attach(iface, opts.generic)?;
            state.add_tx_port(index)?;
        }
        // Attached to the new maps everywhere: an upgrade's copies take their pins' place.
        state.dataplane_mut().finish_upgrade()?;
        for stale in state.dataplane().pinned_ifaces() {
            if !opts.ifaces.contains(&stale) {
                log::info!("detaching from {stale}, which is no longer configured");
                state.dataplane().unpin_link(&stale)?;
            }
        }
        log::info!(
            "{} {} ({} mode); {} VIPs, {} backends applied in {} ms; control socket {}",
            if restarted {
                "took over"
            } else {
                "attached to"
            },
            opts.ifaces.join(","),
            if opts.generic { "generic" } else { "native" },
            state.vips().len(),
            state.vips().iter().map(|v| v.backends.len()).sum::<usize>(),
            started.elapsed().as_millis(),
            opts.socket.display()
        );
    }

    let mut tasks: Vec<JoinHandle<()>> = vec![tokio::spawn(monitor::sample(agent.clone()))];
    if let Some(l) = metrics_listener {
        log::info!("metrics and status page on http://{}/", l.local_addr()?);
        tasks.push(monitor::start(l, agent.clone()));
    }
    tasks.push(tokio::spawn(refresh_neighbours(agent.clone())));
    tasks.push(tokio::spawn(take_health_reports(agent.clone(), reports_rx)));
    tasks.push(tokio::spawn(reconcile_active(agent.clone())));
    tasks.push(tokio::spawn(crate::nat::run(agent.clone())));
    tasks.push(tokio::spawn(crate::api::remove_departed(agent.clone())));
    tasks.extend(crate::fleet::announce::start(agent.clone()));
    tasks.extend(flow_sync);

    // The watchdog pings only while the agent's lock can be taken: a stuck agent is restarted.
    let watchdog = crate::service::spawn_watchdog({
        let agent = agent.clone();
        move || {
            let agent = agent.clone();
            async move { drop(agent.state.lock().await) }
        }
    });
    crate::service::ready(&format!("forwarding on {}", opts.ifaces.join(",")));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server::serve(stream, agent).await {
                            log::debug!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => log::warn!("accept on the control socket: {e}"),
            },
            _ = sighup.recv() => reapply(&agent, &opts.config).await,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    crate::service::stopping();
    tasks.extend(watchdog);
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    crate::fleet::announce::withdraw_all(&agent).await;
    let mut state = agent.state.lock().await;
    state.stop_checkers();
    if opts.keep_forwarding && opts.pin_dir.is_some() {
        log::info!("stopping; the data plane keeps forwarding with the pinned state");
    } else {
        state.dataplane_mut().detach_all()?;
        log::info!("detached; bye");
    }
    Ok(())
}

/// Health checks hold a socket each while in flight: many slow backends need many.
fn raise_open_file_limit() {
    match health::fds::raise_open_file_limit() {
        Ok((before, after)) if before != after => {
            log::info!("open file limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => log::warn!("raising the open file limit: {e}"),
    }
}

/// SIGHUP: the configuration file again, through the same path as `lb apply`. A bad file
/// changes nothing and is logged with its line.
async fn reapply(agent: &Agent, path: &Path) {
    crate::service::reload(async {
        let config = Config::load(path)?;
        let plan = agent.apply(&config, false, false).await?;
        Ok(format!("SIGHUP: {}: {}", path.display(), plan.summary()))
    })
    .await
}

/// Least connections: every few seconds, forgets the active flows that went idle or whose
/// backend went, and recounts every least-connections backend (see
/// `Datapath::reconcile_active`).
async fn reconcile_active(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(ACTIVE_RECONCILE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut state = agent.state.lock().await;
        let backends: Vec<(u32, u32)> = state
            .vips()
            .iter()
            .filter(|v| v.algo == crate::model::Algo::Leastconn)
            .flat_map(|v| &v.backends)
            .map(|b| (b.id, b.generation))
            .collect();
        if backends.is_empty() {
            continue;
        }
        let dp = state.dataplane_mut();
        if let Err(e) = dp.reconcile_active(&backends, Default::default()) {
            log::warn!("least connections: recounting active flows: {e:#}");
        }
    }
}

/// How often `reconcile_active` runs.
const ACTIVE_RECONCILE_TICK: Duration = Duration::from_secs(5);

/// Keeps backends' L2 paths current: unresolved ones every tick, all of them every
/// `FULL_REFRESH_TICKS`; asks the kernel outside the lock and applies what changed under
/// it. Also releases quarantined ids and ring regions.
async fn refresh_neighbours(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(REFRESH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u32.. {
        tick.tick().await;
        let targets = {
            let mut state = agent.state.lock().await;
            state.release_retired();
            state.reach_targets(n % FULL_REFRESH_TICKS == 0)
        };
        if targets.is_empty() {
            continue;
        }
        // The kernel is asked now; it answers on a later pass.
        let result = match agent.reach(&targets, Duration::ZERO).await {
            Ok(reach) => agent.state.lock().await.apply_reach(&reach),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            log::warn!("neighbour refresh: {e:#}");
        }
    }
}

async fn take_health_reports(agent: Arc<Agent>, mut reports: mpsc::Receiver<health::Report>) {
    while let Some(report) = reports.recv().await {
        if let Err(e) = agent.state.lock().await.on_report(report) {
            log::warn!("applying a health check result: {e:#}");
        }
    }
}

/// A pinned attachment is live when its interface (in this namespace) runs the program the
/// link points at. Pins whose attachments all died with their interfaces (a deleted
/// namespace whose inode number came round again, a NIC that went away) describe nothing
/// that still forwards: they are removed, maps included, and the agent starts afresh (the
/// directory itself stays: this agent holds its lock).
async fn discard_stale_pins(dir: &Path, netif: &Netif) -> Result<()> {
    let links_dir = dir.join("links");
    let Ok(entries) = std::fs::read_dir(&links_dir) else {
        return Ok(());
    };
    let (mut live, mut dead) = (0, Vec::new());
    for entry in entries.flatten() {
        let pin = entry.path();
        let iface = entry.file_name().to_string_lossy().into_owned();
        let attached = match kernel::netif::index(&iface) {
            Ok(index) => netif.xdp_prog_id(index).await?,
            Err(_) => None,
        };
        let linked = Datapath::pinned_link_program(&pin).unwrap_or(None);
        if linked.is_some() && linked == attached {
            live += 1;
        } else {
            dead.push(pin);
        }
    }
    if live == 0 && !dead.is_empty() {
        log::warn!(
            "{}: pinned state of detached interfaces, discarding it",
            dir.display()
        );
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    } else {
        for pin in dead {
            log::warn!("{}: attachment gone, unpinning", pin.display());
            std::fs::remove_file(&pin)?;
        }
    }
    Ok(())
}
