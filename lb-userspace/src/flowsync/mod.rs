//! Flow sharing between balancers: every flow this balancer pins goes to its peers, which
//! install the same pin (in their own backend ids), so a flow that the router's ECMP moves
//! to a peer keeps its backend even on a round-robin VIP, whose first choice cannot be
//! computed again.
//!
//! - the data plane writes each new flow's pin into a ring buffer (`lb-ebpf/src/share.rs`)
//!   while the agent has sharing on;
//! - [`sync`]: one task reads the ring, translates backend ids to addresses
//!   ([`directory`]), and sends batches over UDP to the peers; it takes the peers'
//!   batches, checks them ([`wire`]: HMAC-SHA256 with the shared key; [`peers`]: listed
//!   sender, fresh, not replayed) and installs their pins, skipping VIPs and backends this
//!   balancer does not have and flows it pinned itself since.
//!
//! ```toml
//! [flow_sync]
//! listen = "10.0.0.2:7946"          # this balancer's address, as its peers list it
//! peers = ["10.0.0.3:7946"]
//! key_file = "/etc/lb/fleet.key"    # the default; root-only, at least 16 bytes
//! ```

pub mod directory;
pub mod peers;
pub mod sync;
pub mod wire;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::api::Agent;
pub use sync::Stats;

/// The `[flow_sync]` section of the configuration file. Read at start: a change takes
/// effect when the agent restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSyncConfig {
    /// Where to take peers' batches, and the address batches are sent from: one of this
    /// balancer's own addresses (peers recognise it by it), not 0.0.0.0.
    pub listen: SocketAddr,
    /// The other balancers' `listen` addresses; only these are taken from.
    pub peers: Vec<SocketAddr>,
    /// The fleet's shared key: a root-only file; its content (trimmed) is the key.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
}

fn default_key_file() -> PathBuf {
    PathBuf::from("/etc/lb/fleet.key")
}

impl FlowSyncConfig {
    /// What the types cannot say.
    pub fn validate(&self) -> Result<()> {
        let listen = self.listen;
        if listen.ip().is_unspecified() || listen.port() == 0 {
            bail!(
                "flow_sync: listen {listen} must be this balancer's own address and a port, as its peers list it"
            );
        }
        if self.peers.is_empty() {
            bail!("flow_sync: no peers: list the other balancers' listen addresses");
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if *peer == listen {
                bail!("flow_sync: peer {peer} is this balancer's own listen address");
            }
            if self.peers[..i].contains(peer) {
                bail!("flow_sync: peer {peer} is listed twice");
            }
            if peer.is_ipv4() != listen.is_ipv4() {
                bail!("flow_sync: peer {peer} is not of listen's address family");
            }
        }
        Ok(())
    }
}

/// Reads the shared key from a root-only file.
pub fn load_key(path: &Path) -> Result<wire::Key> {
    let text = crate::health::credentials::read_root_only(path, "flow_sync key_file")?;
    wire::Key::new(text.trim().as_bytes())
        .with_context(|| format!("flow_sync key_file {}", path.display()))
}

/// The counters as `lb stats --json` shows them (`flow_sync`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub peers: u64,
    pub events: u64,
    pub ring_drops: u64,
    pub sent: u64,
    pub send_errors: u64,
    pub received: u64,
    pub installed: u64,
    /// Peers' pins not installed, by reason.
    pub skipped: std::collections::BTreeMap<String, u64>,
    /// Peers' datagrams refused whole, by reason.
    pub rejected: std::collections::BTreeMap<String, u64>,
}

impl StatsView {
    /// Two lines for `lb stats`: what went out, what came in.
    pub fn summary(&self) -> String {
        let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
            let parts: Vec<String> = m
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            }
        };
        format!(
            "flow sync out  {} new flows to {} peers: {} pins sent, {} lost to a full ring, {} send errors\n\
             flow sync in   {} pins received, {} installed; skipped: {}; datagrams rejected: {}",
            self.events,
            self.peers,
            self.sent,
            self.ring_drops,
            self.send_errors,
            self.received,
            self.installed,
            nonzero(&self.skipped),
            nonzero(&self.rejected),
        )
    }
}

impl Stats {
    pub fn view(&self) -> StatsView {
        use std::sync::atomic::Ordering::Relaxed;
        StatsView {
            peers: self.peers.load(Relaxed),
            events: self.events.load(Relaxed),
            ring_drops: self.ring_drops.load(Relaxed),
            sent: self.sent.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            received: self.received.load(Relaxed),
            installed: self.installed.load(Relaxed),
            skipped: by_reason(
                directory::Skip::ALL.iter().map(|w| (w.name(), *w as usize)),
                &self.skipped,
            ),
            rejected: by_reason(
                sync::Rejected::ALL.iter().map(|w| (w.name(), *w as usize)),
                &self.rejected,
            ),
        }
    }
}

/// Each reason's name with its count, `reasons` giving the name and index of each.
fn by_reason(
    reasons: impl Iterator<Item = (&'static str, usize)>,
    counts: &[std::sync::atomic::AtomicU64],
) -> std::collections::BTreeMap<String, u64> {
    let count = |i: usize| counts[i].load(std::sync::atomic::Ordering::Relaxed);
    reasons
        .map(|(name, i)| (name.to_string(), count(i)))
        .collect()
}

/// The running agent's counters (none while it shares nothing), for metrics and `lb stats`.
static AGENT_STATS: OnceLock<Arc<Stats>> = OnceLock::new();

pub fn agent_stats() -> Option<&'static Arc<Stats>> {
    AGENT_STATS.get()
}

/// Turns sharing on or off in the data plane as `config` says and, when on, starts the
/// loop. Called once at start, before the program is attached.
pub async fn start(
    agent: Arc<Agent>,
    config: Option<&FlowSyncConfig>,
) -> Result<Option<JoinHandle<()>>> {
    let mut state = agent.state.lock().await;
    state.flow_sync = config.cloned();
    let Some(config) = config else {
        state.dataplane_mut().set_flow_sharing(false)?;
        return Ok(None);
    };
    let key = load_key(&config.key_file)?;
    let socket = sync::bind(config.listen)
        .with_context(|| format!("flow_sync: listening on {}", config.listen))?;
    let link = sync::Link {
        socket: tokio::net::UdpSocket::from_std(socket)?,
        local: config.listen,
        peers: config.peers.clone(),
        key,
    };
    let maps = sync::Maps {
        ring: state.dataplane_mut().take_flow_events()?,
        flows: state.dataplane().flow_table()?,
        drops: state.dataplane().flow_share_drops()?,
    };
    state.dataplane_mut().set_flow_sharing(true)?;
    drop(state);
    let stats = AGENT_STATS.get_or_init(Default::default).clone();
    log::info!(
        "flow sync on {}, peers {}",
        config.listen,
        config
            .peers
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let source = AgentSource(agent);
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = sync::run(maps, link, source, stats).await {
            log::error!("flow sync stopped: {e:#}");
        }
    })))
}

/// The agent's state as a directory of backend ids.
struct AgentSource(Arc<Agent>);

impl sync::Source for AgentSource {
    async fn directory(&self, version: u64) -> Option<directory::Directory> {
        let state = self.0.state.lock().await;
        if state.version() == version {
            return None;
        }
        let mut d = directory::Directory::new(state.version());
        for vip in state.vips() {
            let key = vip.service.key();
            d.add_vip(key);
            for b in &vip.backends {
                d.add_backend(key, b.addr, b.id, b.generation);
            }
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::config::Config;

    #[test]
    fn the_section_parses_round_trips_and_names_the_line_of_a_mistake() {
        let text = "[flow_sync]\nlisten = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\n";
        let config = Config::parse(text).unwrap();
        let sync = config.flow_sync.as_ref().unwrap();
        assert_eq!(sync.key_file, Path::new("/etc/lb/fleet.key"));
        let again = Config::parse(&toml::to_string_pretty(&config).unwrap()).unwrap();
        assert_eq!(again, config);

        for (bad, says) in [
            (
                "listen = \"0.0.0.0:7946\"\npeers = [\"10.0.0.3:7946\"]",
                "own address",
            ),
            ("listen = \"10.0.0.2:7946\"\npeers = []", "no peers"),
            (
                "listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.2:7946\"]",
                "own listen",
            ),
            (
                "listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:1\", \"10.0.0.3:1\"]",
                "twice",
            ),
            (
                "listen = \"10.0.0.2:7946\"\npeers = [\"[fd00::3]:1\"]",
                "family",
            ),
        ] {
            let text = format!("[firewall]\ndrop = []\n\n[flow_sync]\n{bad}\n");
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains("line 4") && err.contains(says), "{bad}: {err}");
        }
        let err = Config::parse("[flow_sync]\nlisten = \"10.0.0.2:7946\"\npeers = []\nkey = 1\n")
            .unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn the_key_file_must_be_root_only_and_long_enough() {
        // SAFETY: plain syscall.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root: key files must be owned by root"
        );
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let good = write("good", "a key of thirty-two bytes or so.\n", 0o600);
        assert!(load_key(&good).is_ok());
        let open = write("open", "a key of thirty-two bytes or so.\n", 0o644);
        let err = format!("{:#}", load_key(&open).unwrap_err());
        assert!(
            err.contains("chmod 600") && err.contains("key_file"),
            "{err}"
        );
        let short = write("short", "short\n", 0o600);
        let err = format!("{:#}", load_key(&short).unwrap_err());
        assert!(err.contains("at least 16"), "{err}");
    }
}
