//! Two balancers sharing flows (`tests/flowsync.rs`): the test bed's lb (10.99.0.2) and an
//! added lb2 (10.99.0.3) on one segment with the same backends, both running `lb` with the
//! same round-robin VIP and, when asked, `[flow_sync]` to each other with one shared key.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::testbed::{Agent, Config, Host, Proc, Testbed, VIP4};

use crate::e2e::{field, lb_at, wait_backends};

/// The port both balancers share flows on.
pub const SYNC_PORT: u16 = 7946;

/// One balancer of the pair.
pub struct Balancer {
    pub host: Host,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub agent: Agent,
}

/// Fields drop in order: agents and servers stop before the namespaces go.
pub struct Pair {
    pub lb1: Balancer,
    pub lb2: Balancer,
    pub servers: Vec<Proc>,
    pub bed: Testbed,
}

fn sync_addr(host: &Host) -> SocketAddr {
    SocketAddr::new(host.ipv4.into(), SYNC_PORT)
}

/// A configuration with one round-robin VIP over every backend and, with `peer`, flow
/// sharing with it.
fn config_text(bed: &Testbed, me: &Host, peer: Option<&Host>, key: &Path) -> String {
    let mut text = format!("[[vip]]\naddress = \"{VIP4}:80\"\nalgo = \"rr\"\n");
    for b in &bed.backends {
        text += &format!("\n[[vip.backend]]\naddress = \"{}\"\n", b.ipv4);
    }
    if let Some(peer) = peer {
        text += &format!(
            "\n[flow_sync]\nlisten = \"{}\"\npeers = [\"{}\"]\nkey_file = \"{}\"\n",
            sync_addr(me),
            sync_addr(peer),
            key.display()
        );
    }
    text
}

/// Writes the shared key, root-only as the agent requires.
pub fn write_key(path: &Path, key: &str) {
    std::fs::write(path, key).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

impl Pair {
    /// Two backends serving, lb and lb2 running with the VIP (both backends up on both),
    /// sharing flows with each other if `share`.
    pub fn new(share: bool) -> Pair {
        let mut bed = Testbed::new(Config { backends: 2 }).unwrap_or_else(|e| panic!("{e:#}"));
        let servers = bed.start_backends().unwrap_or_else(|e| panic!("{e:#}"));
        let lb2 = bed.add_balancer().unwrap_or_else(|e| panic!("{e:#}"));
        let key = bed.dir().join("fleet.key");
        write_key(&key, "a shared key of the test fleet, 32+ bytes long");
        let start = |me: &Host, peer: &Host, name: &str| {
            let config = bed.dir().join(format!("{name}.toml"));
            let socket = bed.dir().join(format!("{name}.sock"));
            let text = config_text(&bed, me, share.then_some(peer), &key);
            std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));
            let agent = bed
                .start_agent_on(me, &config, &socket, &[])
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            wait_backends(&bed, &socket, "both backends up", |l| {
                l.len() == 2 && l.iter().all(|b| field(b, "state") == "up")
            });
            Balancer {
                host: me.clone(),
                socket,
                config,
                agent,
            }
        };
        let first = bed.lb.clone();
        let lb1 = start(&first, &lb2, "lb1");
        let lb2 = start(&lb2, &first, "lb2");
        Pair {
            lb1,
            lb2,
            servers,
            bed,
        }
    }

    /// `lb stats --json` of a balancer.
    pub fn stats(&self, lb: &Balancer) -> Value {
        let out = lb_at(&self.bed, &lb.socket, &["stats", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats JSON: {e}: {out}"))
    }

    /// Waits (at most 5 s) until `lb` has installed at least `n` peers' pins.
    pub fn wait_installed(&self, lb: &Balancer, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats(lb);
            let installed = stats["flow_sync"]["installed"].as_u64();
            if installed.is_some_and(|i| i >= n) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "{} has not installed {n} shared pins after 5 s: {}\nlogs:\n{}",
                lb.host.ns,
                stats["flow_sync"],
                self.bed.logs(4000)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client connections from source ports `first..first + n` take `via` whatever the VIP
    /// route says (a policy rule on the client), so a test can make new flows on lb2
    /// while the client's other traffic still goes through lb1.
    pub fn route_ports_via(&self, first: u16, n: u16, via: &Host) {
        let c = &self.bed.client.ns;
        let ports = format!("{first}-{}", first + n - 1);
        self.bed
            .ip(
                c,
                &[
                    "route",
                    "add",
                    &format!("{VIP4}/32"),
                    "via",
                    &via.ipv4.to_string(),
                    "table",
                    "100",
                ],
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.bed
            .ip(
                c,
                &[
                    "rule", "add", "ipproto", "tcp", "sport", &ports, "lookup", "100", "priority",
                    "100",
                ],
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}
