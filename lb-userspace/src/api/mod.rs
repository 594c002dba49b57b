//! The control API: the protocol the CLI speaks ([`protocol`]), the socket server that
//! answers it ([`server`]) and the views it answers with ([`views`]); and [`Agent`], what
//! the server, the run loop and monitoring share.
//!
//! Locking: the state sits behind one fair (FIFO) lock, taken only for work that does not
//! wait: neighbour resolution, flow-table walks and configuration writes happen outside
//! it, so reads never queue behind the network or the disk.

pub mod protocol;
pub mod server;
pub mod views;

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::Mutex;

use crate::{
    config::Config,
    kernel::{
        datapath::Datapath,
        flows::FlowCounts,
        netif::{Netif, Unresolved},
    },
    model::Reach,
    monitor::status::{AgentInfo, History},
    state::{Plan, State},
};

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
}

/// The configuration file, rewritten after every change, in the order of the changes.
pub struct ConfigFile {
    pub path: PathBuf,
    /// The state version last written.
    written: Mutex<u64>,
}

impl ConfigFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            written: Mutex::new(0),
        }
    }

    /// Writes `config`, the state at `version`, unless a later version is on disk already
    /// (it includes this one). Off the agent lock, on a blocking thread.
    pub async fn save(&self, config: Config, version: u64) -> Result<()> {
        let mut written = self.written.lock().await;
        if *written >= version {
            return Ok(());
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || config.save(&path)).await??;
        *written = version;
        Ok(())
    }
}

impl Agent {
    /// Writes the configuration file after a change of fleet state (leave, join), which
    /// the state's version does not count.
    pub async fn save_fleet(&self) -> Result<()> {
        let mut written = self.config.written.lock().await;
        let (mut config, version) = {
            let state = self.state.lock().await;
            (state.config(), state.version())
        };
        config.fleet = self.fleet.config();
        let path = self.config.path.clone();
        tokio::task::spawn_blocking(move || config.save(&path))
            .await?
            .map_err(|e| anyhow!("changed, but the configuration was not saved: {e:#}"))?;
        *written = (*written).max(version);
        Ok(())
    }

    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the state after a change, before the change is acknowledged.
    pub async fn saved(&self, (mut config, version): (Config, u64)) -> Result<()> {
        config.fleet = self.fleet.config();
        self.config
            .save(config, version)
            .await
            .map_err(|e| anyhow!("applied, but the configuration was not saved: {e:#}"))
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
        let (plan, saved) = {
            let mut state = self.state.lock().await;
            let plan = state.apply(config, &reach)?;
            (plan, (state.config(), state.version()))
        };
        if save {
            self.saved(saved).await?;
        }
        Ok(plan)
    }
}
