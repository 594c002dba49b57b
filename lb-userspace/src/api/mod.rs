//! The control API: the protocol the CLI speaks ([`protocol`]), the socket server that
//! answers it ([`server`]) and the views it answers with ([`views`]); and [`Agent`], what
//! the server, the run loop and monitoring share.
//!
//! Locking: the state sits behind one fair (FIFO) lock, taken only for work that does not
//! wait: neighbour resolution, flow-table walks and configuration writes happen outside
//! it, so reads never queue behind the network or the disk. Changes also take the
//! configuration file's lock, for the whole change and its save: one change at a time, so
//! one whose save fails is undone before the next begins.

pub mod protocol;
pub mod server;
pub mod views;

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::Mutex;

use crate::{
    config::Config,
    kernel::{
        datapath::Datapath,
        flows::FlowCounts,
        netif::{Netif, Unresolved},
    },
    model::{Reach, Service},
    monitor::status::{AgentInfo, History},
    state::{Plan, State},
};

/// How often leaving backends are looked at (a walk of the flow table each time).
const DEPARTURE_TICK: Duration = Duration::from_secs(2);

/// How long a change that adds backends waits for the kernel to resolve their MACs before
/// answering, so traffic can flow the moment the command returns.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(2);

pub struct Agent {
    pub state: Mutex<State<Datapath>>,
    pub netif: Netif,
    pub flows: FlowCounts,
    pub config: ConfigFile,
    /// What the agent runs as: `lb status`, the status page, `lb_agent_info`.
    pub info: AgentInfo,
    /// Per-second samples (`monitor::sample`): the status page's chart and rates, and the
    /// drops of the last minute in `lb status`.
    pub history: std::sync::Mutex<History>,
    /// Announcing VIP addresses to routers, leave and join (`crate::fleet`).
    pub fleet: crate::fleet::Fleet,
    /// `[tunnel]` as read at start, written back with every change.
    pub tunnel: crate::tunnel::TunnelSettings,
    /// `[nat]` as read at start (`crate::nat`), written back with every change.
    pub nat: crate::nat::NatConfig,
}

/// The configuration file, rewritten after every change.
pub struct ConfigFile {
    pub path: PathBuf,
    /// Held for a whole change, its save included.
    changes: Mutex<()>,
}

impl ConfigFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            changes: Mutex::new(()),
        }
    }

    /// Writes `config`, off the agent lock, on a blocking thread.
    async fn save(&self, config: Config) -> Result<()> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || config.save(&path)).await?
    }
}

impl Agent {
    /// Writes the configuration file after a change of fleet state (leave, join), which
    /// the state does not hold.
    pub async fn save_fleet(&self) -> Result<()> {
        let _one_at_a_time = self.config.changes.lock().await;
        let mut config = self.state.lock().await.config();
        config.fleet = self.fleet.config();
        config.tunnel = self.tunnel.clone();
        config.nat = self.nat.clone();
        self.config
            .save(config)
            .await
            .map_err(|e| anyhow!("changed, but the configuration was not saved: {e:#}"))
    }

    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes one change (see `State::change`: all of it or nothing) and, with `save`,
    /// writes the configuration file before answering. A change that cannot be saved is
    /// undone: what runs is always what a restart would bring back.
    pub async fn change<T>(
        &self,
        save: bool,
        f: impl FnOnce(&mut State<Datapath>) -> Result<T>,
    ) -> Result<T> {
        let _one_at_a_time = self.config.changes.lock().await;
        let (value, undo, config) = {
            let mut state = self.state.lock().await;
            let (value, undo) = state.change(f)?;
            let mut config = state.config();
            config.fleet = self.fleet.config();
            config.tunnel = self.tunnel.clone();
            config.nat = self.nat.clone();
            (value, undo, config)
        };
        // Before answering: a new NAT VIP's first flows need its SNAT address.
        if let Err(e) = crate::nat::refresh_snat(self).await {
            log::warn!("NAT: SNAT address: {e:#}");
        }
        if !save {
            return Ok(value);
        }
        if let Err(e) = self.config.save(config).await {
            let undone = self.state.lock().await.undo(undo);
            return Err(match undone {
                Ok(()) => anyhow!("not applied, the configuration could not be saved: {e:#}"),
                Err(u) => anyhow!(
                    "the configuration could not be saved ({e:#}) and undoing the change failed: {u:#}"
                ),
            });
        }
        Ok(value)
    }

    /// What the kernel says of reaching `addrs`, waiting up to `wait` for those it has to
    /// resolve first. Never under the state lock.
    pub async fn reach(&self, addrs: &[IpAddr], wait: Duration) -> Result<HashMap<IpAddr, Reach>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut resolved = self.netif.resolve_many(addrs).await?;
        loop {
            // Asked to resolve: worth another look; routed elsewhere: not.
            let pending: Vec<IpAddr> = resolved
                .iter()
                .filter(|(_, r)| matches!(r, Err(Unresolved::NoNeighbour { .. })))
                .map(|(a, _)| *a)
                .collect();
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(resolved.into_iter().map(|(a, r)| (a, r.into())).collect());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            resolved.extend(self.netif.resolve_many(&pending).await?);
        }
    }

    /// Makes the running state what `config` says, as one change: `lb run` at start,
    /// `lb apply` and SIGHUP all come here. With `dry_run`, only says what would change;
    /// with `save`, writes the result to the configuration file (not when that file is
    /// where `config` came from).
    pub async fn apply(&self, config: &Config, dry_run: bool, save: bool) -> Result<Plan> {
        let plan = self.state.lock().await.plan(config)?;
        if dry_run || plan.changes.is_empty() {
            return Ok(plan);
        }
        let new: Vec<IpAddr> = {
            let mut seen = std::collections::HashSet::new();
            plan.changes
                .iter()
                .filter_map(|c| match c {
                    crate::state::Change::AddBackend { backend, .. } => Some(*backend),
                    _ => None,
                })
                .filter(|a| seen.insert(*a))
                .collect()
        };
        let reach = self
            .reach(&new, RESOLVE_WAIT)
            .await
            .context("resolving backends")?;
        self.change(save, |state| state.apply(config, &reach)).await
    }

    /// Removes the leaving backends (`lb backend del`) whose flows have ended (none in a
    /// flow-table walk at most `max_age` old), whose time is up, or that are down; returns
    /// them.
    pub async fn remove_departed(&self, max_age: Duration) -> Result<Vec<(Service, IpAddr)>> {
        let now = crate::model::unix_now() as u64;
        let leaving = self.state.lock().await.leaving(now);
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        let flows = match leaving.iter().all(|l| l.3) {
            true => None,
            false => Some(self.flows.fresh(max_age).await?),
        };
        let gone: Vec<_> = leaving
            .into_iter()
            .filter(|(_, _, (id, g), due)| {
                *due || flows.as_ref().is_some_and(|f| f.backend(*id, *g) == 0)
            })
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        self.change(true, |state| {
            let mut removed = Vec::new();
            for (service, addr, id, _) in gone {
                // Unless it was taken back or replaced meanwhile.
                let same = state
                    .backend(&service, addr)
                    .is_ok_and(|b| (b.id, b.generation) == id && b.leaving_until.is_some());
                if same {
                    state.del_backend(&service, addr)?;
                    removed.push((service, addr));
                }
            }
            Ok(removed)
        })
        .await
    }
}

/// Removes leaving backends as they may go (see `Agent::remove_departed`), until aborted.
pub async fn remove_departed(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(DEPARTURE_TICK).await;
        match agent.remove_departed(DEPARTURE_TICK).await {
            Ok(removed) => {
                for (service, addr) in removed {
                    log::info!("backend {addr} of {service} left");
                }
            }
            Err(e) => log::warn!("removing leaving backends: {e:#}"),
        }
    }
}
