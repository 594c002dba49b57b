//! An active-passive pair (`tests/vrrp.rs`): the test bed's lb (10.99.0.2) and an added lb2
//! (10.99.0.3) on one segment, each running `lb` (one round-robin VIP over both backends,
//! `[fleet] track_file`, `[flow_sync]` to the other) and keepalived with the shipped
//! `packaging/keepalived/keepalived.conf`, changed only in name, priority and paths. The
//! client has the VIP on-link: it ARPs for it, and whichever balancer is VRRP master holds
//! the address and answers.
//!
//! Every helper panics with the full error: these are test helpers.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::testbed::{Agent, Config, HOST_IF, Host, Proc, Testbed, VIP4};

use crate::{
    e2e::{field, lb_at, wait_backends},
    fleet::tail,
    flowsync::{SYNC_PORT, write_key},
};

const KEEPALIVED_CONF: &str = include_str!("../../packaging/keepalived/keepalived.conf");
/// The shipped config's priority (the preferred master's) and the backup's.
const MASTER_PRIORITY: &str = "priority 150 ";
const BACKUP_PRIORITY: &str = "priority 100 ";

/// The round-robin VIP the pair shares.
pub fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), 80)
}

/// One balancer of the pair.
pub struct Member {
    pub agent: Option<Agent>,
    pub keepalived: Option<Proc>,
    pub host: Host,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The agent's `[fleet] track_file`.
    pub track: PathBuf,
    /// keepalived's config file.
    pub keepalived_conf: PathBuf,
}

/// Fields drop in order: daemons and agents stop before the namespaces go.
pub struct VrrpPair {
    pub members: Vec<Member>,
    pub servers: Vec<Proc>,
    pub bed: Testbed,
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The shipped keepalived config for member `n` (0: the preferred master).
pub fn keepalived_conf(n: usize, track: &std::path::Path) -> String {
    let shipped = KEEPALIVED_CONF;
    for expected in [
        "router_id lb1 ",
        MASTER_PRIORITY,
        "file \"/etc/lb/serving\"",
        "interface eth0 ",
        &format!("{VIP4}/32 dev eth0"),
    ] {
        assert!(
            shipped.contains(expected),
            "packaging/keepalived/keepalived.conf no longer has `{expected}`"
        );
    }
    assert_eq!(HOST_IF, "eth0");
    let mut conf = shipped
        .replace("router_id lb1 ", &format!("router_id lb{} ", n + 1))
        .replace(
            "file \"/etc/lb/serving\"",
            &format!("file \"{}\"", track.display()),
        );
    if n == 1 {
        conf = conf.replace(MASTER_PRIORITY, BACKUP_PRIORITY);
    }
    conf
}

impl VrrpPair {
    /// Both backends serving, both agents running with both backends up, then keepalived
    /// on both; returns once lb1 is master (holds the VIP) and lb2 is not.
    pub fn start() -> VrrpPair {
        if xtask::testbed::find_in_path("keepalived").is_none() {
            panic!("keepalived is not installed: run ./x.sh setup, or apt install keepalived");
        }
        let mut bed = ok(Testbed::new(Config { backends: 2 }));
        let lb2 = ok(bed.add_balancer());
        let servers = ok(bed.start_backends());
        // The VIP on-link for the client: it ARPs for it, the master answers.
        ok(bed.ip(
            &bed.client.ns,
            &["route", "replace", &format!("{VIP4}/32"), "dev", HOST_IF],
        ));
        let key = bed.dir().join("fleet.key");
        write_key(&key, "a shared key of the test pair, 32+ bytes long");
        let hosts = [bed.lb.clone(), lb2];
        let mut pair = VrrpPair {
            members: Vec::new(),
            servers,
            bed,
        };
        for n in 0..2 {
            let m = pair.start_member(n, &hosts[n], &hosts[1 - n], &key);
            pair.members.push(m);
        }
        for n in 0..2 {
            pair.start_keepalived(n);
        }
        pair.wait_master(0, Duration::from_secs(10));
        assert!(!pair.holds_vip(1), "lb2 holds the VIP too\n{}", pair.logs());
        pair
    }

    fn start_member(&self, n: usize, me: &Host, peer: &Host, key: &std::path::Path) -> Member {
        let bed = &self.bed;
        let name = format!("lb{}", n + 1);
        let config = bed.dir().join(format!("{name}.toml"));
        let socket = bed.dir().join(format!("{name}.sock"));
        let track = bed.dir().join(format!("{name}.serving"));
        let mut text = format!(
            "[fleet]\ntrack_file = \"{}\"\n\n[flow_sync]\nlisten = \"{}:{SYNC_PORT}\"\n\
             peers = [\"{}:{SYNC_PORT}\"]\nkey_file = \"{}\"\n\n\
             [[vip]]\naddress = \"{}\"\nalgo = \"rr\"\n",
            track.display(),
            me.ipv4,
            peer.ipv4,
            key.display(),
            vip()
        );
        for b in &bed.backends {
            text += &format!("\n[[vip.backend]]\naddress = \"{}\"\n", b.ipv4);
        }
        ok(std::fs::write(&config, text).map_err(Into::into));
        let agent = ok(bed.start_agent_on(me, &config, &socket, &[]));
        wait_backends(bed, &socket, "both backends up", |l| {
            l.len() == 2 && l.iter().all(|b| field(b, "state") == "up")
        });
        let conf = bed.dir().join(format!("keepalived-{name}.conf"));
        ok(std::fs::write(&conf, keepalived_conf(n, &track)).map_err(Into::into));
        Member {
            agent: Some(agent),
            keepalived: None,
            host: me.clone(),
            socket,
            config,
            track,
            keepalived_conf: conf,
        }
    }

    /// keepalived for member `n` in the foreground, VRRP only, logging to its stderr, with
    /// pid files of its own (the defaults under /run are the host's).
    pub fn start_keepalived(&mut self, n: usize) {
        let m = &self.members[n];
        let dir = self.bed.dir();
        let pid = |what: &str| {
            dir.join(format!("keepalived-lb{}{what}.pid", n + 1))
                .to_string_lossy()
                .into_owned()
        };
        let conf = m.keepalived_conf.to_string_lossy().into_owned();
        let proc = ok(self.bed.spawn_in(
            &m.host.ns,
            "keepalived",
            [
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--vrrp",
                "--use-file",
                &conf,
                "--pid",
                &pid(""),
                "--vrrp_pid",
                &pid("-vrrp"),
                "--checkers_pid",
                &pid("-checkers"),
            ],
        ));
        self.members[n].keepalived = Some(proc);
    }

    /// `lb ARGS` against member `n`.
    pub fn lb(&self, n: usize, args: &[&str]) -> String {
        lb_at(&self.bed, &self.members[n].socket, args)
    }

    /// Whether member `n` holds the VIP address on its interface (is VRRP master).
    pub fn holds_vip(&self, n: usize) -> bool {
        let out = ok(self.bed.run_in_ok(
            &self.members[n].host.ns,
            "ip",
            ["-j", "addr", "show", "dev", HOST_IF],
        ));
        let addrs: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        addrs
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["addr_info"].as_array().into_iter().flatten())
            .any(|a| a["local"].as_str() == Some(&VIP4.to_string()))
    }

    /// Waits (at most `limit`) until member `n` holds the VIP; returns how long it took.
    pub fn wait_master(&self, n: usize, limit: Duration) -> Duration {
        let start = Instant::now();
        while !self.holds_vip(n) {
            assert!(
                start.elapsed() < limit,
                "lb{} does not hold the VIP after {limit:?}\n{}",
                n + 1,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }

    /// What member `n`'s agent wrote into its track file.
    pub fn track_value(&self, n: usize) -> String {
        let path = &self.members[n].track;
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// New flows member `n` counted for the VIP.
    pub fn new_flows(&self, n: usize) -> u64 {
        let out = self.lb(n, &["vip", "list", "--json"]);
        let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        list.as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vip"].as_str() == Some(&vip().to_string()))
            .and_then(|v| v["new_flows"].as_u64())
            .unwrap_or_else(|| panic!("no {} in `lb vip list --json`: {out}", vip()))
    }

    /// Pins member `n` installed from its peer.
    pub fn installed(&self, n: usize) -> u64 {
        let out = self.lb(n, &["stats", "--json"]);
        let stats: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        stats["flow_sync"]["installed"]
            .as_u64()
            .unwrap_or_else(|| panic!("no flow_sync.installed in `lb stats --json`: {out}"))
    }

    /// keepalived and agent logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            if let Some(k) = &m.keepalived {
                out += &format!("lb{} keepalived:\n{}\n", i + 1, tail(&k.log()));
            }
            if let Some(a) = &m.agent {
                out += &format!("lb{} agent:\n{}\n", i + 1, tail(&a.proc.log()));
            }
        }
        out
    }
}
