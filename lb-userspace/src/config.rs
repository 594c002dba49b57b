//! The TOML configuration file: loaded at start, written back after every change made from
//! the CLI, so a restarted agent comes back with exactly what it had.
//!
//! ```toml
//! [[vip]]
//! address = "10.99.1.1:80"
//! proto = "tcp"
//! algo = "rr"                # or "maglev", "leastconn"
//! mode = "dsr"               # or "nat", "tunnel", "gue" (how packets reach backends)
//! rate_limit = 100           # new flows per second per source; 0 (default) = no limit
//! burst = 200                # default (or 0): one second's worth
//! max_new_flows = 5000       # new flows per second from all sources together; 0 = none
//! new_flow_burst = 10000     # default (or 0): one second's worth
//! persist = 300              # source affinity, seconds; 0 (default) = none
//! persist_prefix6 = 64       # an IPv6 client is its source's /64 (default)
//!
//! [vip.check]                # optional; fields default to HAProxy's
//! check = "http:/health"     # none | tcp | http:/PATH | tls | mysql[-primary|-replica] | pgsql | exec:/PATH
//! interval_ms = 2000
//! rise = 2
//! fall = 3
//!
//! [[vip.backend]]
//! address = "10.99.0.11"
//! weight = 3                 # default 1
//! backup = false
//! drain = false
//!
//! [firewall]
//! drop = ["203.0.113.0/24", "2001:db8:bad::/48"]
//!
//! [nat]                      # full NAT (crate::nat): SNAT addresses and ports
//! snat_v4 = "10.0.0.2"       # default: the egress address toward a NAT backend
//! port_first = 1024          # default 1024-32767
//! port_last = 32767
//!
//! [flow_sync]                # sharing flow pins with peer balancers (crate::flowsync)
//! listen = "10.0.0.2:7946"
//! peers = ["10.0.0.3:7946"]
//! key_file = "/etc/lb/fleet.key"
//!
//! [tunnel]                   # tunnel and gue VIPs (crate::tunnel); read at start
//! source_v4 = "10.0.0.2"     # outer source; default: the first interface's address
//! source_v6 = "fd00::2"
//! gue_port = 6080            # gue's UDP port (default 6080)
//! ```
//!
//! Every error names the line: syntax and type errors from the TOML parser's span, meaning
//! errors (a duplicate backend, a VIP without a port) from the span of the entry at fault.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    health::CheckSpec,
    model::{self, Algo, Mode, Persist, Proto, RateLimit, Service},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<VipConfig>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub firewall: FirewallConfig,
    /// Announcing VIP addresses to routers; kept by `Fleet`, not by the state.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fleet: crate::fleet::FleetConfig,
    /// Sharing flow pins with peer balancers (`crate::flowsync`); read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_sync: Option<crate::flowsync::FlowSyncConfig>,
    /// The balancer's end of tunnel and gue VIPs' tunnels; kept by the agent, read at start.
    #[serde(default, skip_serializing_if = "is_default")]
    pub tunnel: crate::tunnel::TunnelSettings,
    /// Full NAT's SNAT addresses and ports (`crate::nat`); read at start.
    #[serde(default, skip_serializing_if = "is_default")]
    pub nat: crate::nat::NatConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// Sources whose packets are dropped, whoever they are for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub address: SocketAddr,
    #[serde(default)]
    pub proto: Proto,
    #[serde(default)]
    pub algo: Algo,
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "is_default")]
    pub check: CheckSpec,
    /// New flows per second per source address; 0 = no limit (see `model::RateLimit`).
    /// Two plain fields rather than a flattened struct: serde cannot flatten and still
    /// refuse unknown fields.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rate_limit: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub burst: u32,
    /// Ceiling on new flows per second from all sources together; 0 = none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub max_new_flows: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub new_flow_burst: u32,
    /// Source affinity in seconds (see `model::Persist`); 0 = none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub persist: u32,
    /// The IPv6 prefix that makes one client for `persist`.
    #[serde(
        default = "default_prefix6",
        skip_serializing_if = "is_default_prefix6"
    )]
    pub persist_prefix6: u8,
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
    /// Takes new flows only while no primary backend can.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
    /// In maintenance: keeps its flows, gets no new ones.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drain: bool,
    /// Being deleted gracefully (`lb backend del`): gets no new flows and is removed when
    /// its flows end or at this unix time (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_until: Option<u64>,
    /// Replaces the VIP's check for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

fn default_prefix6() -> u8 {
    Persist::DEFAULT_PREFIX6
}

fn is_default_prefix6(p: &u8) -> bool {
    *p == Persist::DEFAULT_PREFIX6
}

impl VipConfig {
    /// A TCP VIP with `algo` and `backends` and every other setting as a file that leaves
    /// it out has it (no check, no limits, no affinity).
    pub fn new(address: SocketAddr, algo: Algo, backends: Vec<BackendConfig>) -> Self {
        Self {
            address,
            proto: Proto::Tcp,
            algo,
            mode: Mode::default(),
            check: CheckSpec::default(),
            rate_limit: 0,
            burst: 0,
            max_new_flows: 0,
            new_flow_burst: 0,
            persist: 0,
            persist_prefix6: default_prefix6(),
            backends,
        }
    }

    pub fn persist(&self) -> Persist {
        Persist {
            seconds: self.persist,
            prefix6: self.persist_prefix6,
        }
    }

    pub fn rate(&self) -> RateLimit {
        RateLimit {
            rate_limit: self.rate_limit,
            // Absent (0): one second's worth, as on the command line.
            burst: match self.burst {
                0 => self.rate_limit,
                b => b,
            },
            max_new_flows: self.max_new_flows,
            new_flow_burst: match self.new_flow_burst {
                0 => self.max_new_flows,
                b => b,
            },
        }
    }
}

impl BackendConfig {
    /// A backend as a file that gives only its address has it: weight 1, a primary, not
    /// drained, checked as its VIP says.
    pub fn new(address: IpAddr) -> Self {
        Self {
            address,
            weight: default_weight(),
            backup: false,
            drain: false,
            leaving_until: None,
            check: None,
        }
    }

    /// Checks that a backend can serve `service`, before anything is changed.
    pub fn validate(&self, service: &Service) -> Result<()> {
        let addr = self.address;
        model::check_unicast(addr, "backend")?;
        model::check_weight(self.weight)?;
        if let Some(c) = &self.check {
            c.validate()?;
        }
        if addr.is_ipv4() != service.addr.is_ipv4() {
            bail!("backend {addr} is not of the same address family as VIP {service}");
        }
        Ok(())
    }
}

/// Which entry a meaning error is about.
enum At {
    Vip(usize),
    Backend(usize, usize),
    Firewall(usize),
    Fleet,
    FlowSync,
    Tunnel,
    Nat,
}

/// Where each entry stands in the text; everything else is ignored.
#[derive(Default, Deserialize)]
struct SpanIndex {
    #[serde(default, rename = "vip")]
    vips: Vec<VipSpans>,
    #[serde(default)]
    firewall: FirewallSpans,
    fleet: Option<Spanned<toml::Value>>,
    #[serde(default)]
    flow_sync: Option<Spanned<toml::Value>>,
    #[serde(default)]
    tunnel: Option<Spanned<toml::Value>>,
    nat: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
struct VipSpans {
    address: Spanned<toml::Value>,
    #[serde(default, rename = "backend")]
    backends: Vec<BackendSpans>,
}

#[derive(Deserialize)]
struct BackendSpans {
    address: Spanned<toml::Value>,
}

#[derive(Default, Deserialize)]
struct FirewallSpans {
    #[serde(default)]
    drop: Vec<Spanned<toml::Value>>,
}

fn default_weight() -> u32 {
    1
}

fn is_default_weight(w: &u32) -> bool {
    *w == default_weight()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Config {
    /// Reads `path`; a missing file is an empty configuration (first start).
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(anyhow!("{}: {e}", path.display())),
        };
        Self::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// Parses configuration text; errors are one line and name the line and field.
    pub fn parse(text: &str) -> Result<Self> {
        let line_of = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
        let config: Config = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => anyhow!("line {}: {message}", line_of(span.start)),
                None => anyhow!("{message}"),
            }
        })?;
        if let Err((at, error)) = config.validate() {
            // The same text parsed again for nothing but where each entry stands.
            let spans: SpanIndex = toml::from_str(text).unwrap_or_default();
            let span = match at {
                At::Vip(v) => spans.vips.get(v).map(|v| v.address.span()),
                At::Backend(v, b) => spans
                    .vips
                    .get(v)
                    .and_then(|v| v.backends.get(b))
                    .map(|b| b.address.span()),
                At::Firewall(i) => spans.firewall.drop.get(i).map(|d| d.span()),
                At::Fleet => spans.fleet.as_ref().map(|f| f.span()),
                At::FlowSync => spans.flow_sync.as_ref().map(|f| f.span()),
                At::Tunnel => spans.tunnel.as_ref().map(|t| t.span()),
                At::Nat => spans.nat.as_ref().map(|f| f.span()),
            };
            return Err(match span {
                Some(span) => anyhow!("line {}: {error:#}", line_of(span.start)),
                None => error,
            });
        }
        Ok(config)
    }

    /// What the types cannot say: unique entries, matching families, values in range.
    fn validate(&self) -> Result<(), (At, anyhow::Error)> {
        let mut services = Vec::new();
        for (v, vc) in self.vips.iter().enumerate() {
            let at = |e| (At::Vip(v), e);
            let service = Service::new(vc.address, vc.proto).map_err(at)?;
            if services.contains(&service) {
                return Err(at(anyhow!("VIP {service} is listed twice")));
            }
            services.push(service);
            vc.check
                .validate()
                .map_err(|e| at(anyhow!("VIP {service}: {e:#}")))?;
            vc.rate()
                .validate()
                .map_err(|e| at(anyhow!("VIP {service}: {e:#}")))?;
            vc.persist()
                .validate()
                .map_err(|e| at(anyhow!("VIP {service}: {e:#}")))?;
            let mut seen = Vec::new();
            for (b, bc) in vc.backends.iter().enumerate() {
                let at = |e: anyhow::Error| (At::Backend(v, b), anyhow!("VIP {service}: {e:#}"));
                bc.validate(&service).map_err(at)?;
                if seen.contains(&bc.address) {
                    return Err(at(anyhow!("backend {} is listed twice", bc.address)));
                }
                seen.push(bc.address);
            }
        }
        for (i, net) in self.firewall.drop.iter().enumerate() {
            if self.firewall.drop[..i].contains(net) {
                return Err((At::Firewall(i), anyhow!("drop rule {net} is listed twice")));
            }
            model::check_cidr(net).map_err(|e| (At::Firewall(i), e))?;
        }
        self.fleet.validate().map_err(|e| (At::Fleet, e))?;
        if let Some(f) = &self.flow_sync {
            f.validate().map_err(|e| (At::FlowSync, e))?;
        }
        self.tunnel.validate().map_err(|e| (At::Tunnel, e))?;
        self.nat.validate().map_err(|e| (At::Nat, e))?;
        Ok(())
    }

    /// Writes the configuration so that a crash at any moment leaves either the old file or
    /// the new one, never a torn one: temp file in the same directory, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).context("serializing the configuration")?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp: PathBuf = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("lb.toml")
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(b"# Written by the lb agent; edits made while it runs are overwritten.\n")?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vip_strategy() -> impl Strategy<Value = VipConfig> {
        let addr = prop_oneof![
            (1u8..4, 0u16..3)
                .prop_map(|(h, p)| SocketAddr::from(([10, 0, 0, h], [80, 443, 0][p as usize]))),
            (1u16..3).prop_map(|h| SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, h], 80))),
        ];
        let backend = (
            prop_oneof![
                (1u8..6).prop_map(|h| IpAddr::from([10, 0, 1, h])),
                Just(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, 1])),
                Just(IpAddr::from([127, 0, 0, 1])),
            ],
            0u32..1200,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(address, weight, backup, drain)| BackendConfig {
                address,
                weight,
                backup,
                drain,
                leaving_until: None,
                check: None,
            });
        (
            addr,
            prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
            prop_oneof![Just(Algo::Rr), Just(Algo::Maglev), Just(Algo::Leastconn)],
            (0u32..3, 0u32..3),
            (0u32..3, 0u32..3),
            proptest::collection::vec(backend, 0..4),
        )
            .prop_map(
                |(
                    address,
                    proto,
                    algo,
                    (rate_limit, burst),
                    (max_new_flows, new_flow_burst),
                    backends,
                )| VipConfig {
                    address,
                    proto,
                    algo,
                    mode: Mode::default(),
                    check: CheckSpec::default(),
                    rate_limit,
                    burst,
                    max_new_flows,
                    new_flow_burst,
                    persist: 0,
                    persist_prefix6: Persist::DEFAULT_PREFIX6,
                    backends,
                },
            )
    }

    fn config_strategy() -> impl Strategy<Value = Config> {
        let net = prop_oneof![
            (0u8..4, 0u8..33)
                .prop_map(|(a, len)| IpNet::new(IpAddr::from([198, 51, a, 0]), len).unwrap()),
            (0u8..129).prop_map(|len| IpNet::new(
                IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
                len
            )
            .unwrap()),
        ];
        (
            proptest::collection::vec(vip_strategy(), 0..4),
            proptest::collection::vec(net, 0..4),
        )
            .prop_map(|(vips, drop)| Config {
                vips,
                firewall: FirewallConfig { drop },
                ..Default::default()
            })
    }

    proptest! {
        /// Whatever the bytes, parsing answers Ok or a one-line error; it never panics.
        #[test]
        fn parsing_anything_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = Config::parse(&text) {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }

        /// TOML-shaped junk: real keys, wrong values and places.
        #[test]
        fn parsing_near_misses_never_panics(
            lines in proptest::collection::vec(
                r#"(\[\[vip\]\]|\[\[vip\.backend\]\]|\[firewall\]|\[vip\.check\]|(address|proto|algo|weight|backup|drain|rate_limit|burst|max_new_flows|new_flow_burst|drop|check|rise|fall|interval_ms) = ("[0-9a-f.:/\[\]]{0,16}"|-?[0-9]{1,12}|true|\[\]|\{\}))"#,
                0..12,
            )
        ) {
            let text = lines.join("\n");
            if let Err(e) = Config::parse(&text) {
                prop_assert!(e.to_string().starts_with("line ") || !e.to_string().contains('\n'), "{}", e);
            }
        }

        /// Every configuration the agent could write either reads back identically, or is
        /// refused with a one-line error naming its line (for values out of range).
        #[test]
        fn written_configs_read_back_or_are_refused_with_a_line(config in config_strategy()) {
            let text = toml::to_string_pretty(&config).unwrap();
            match Config::parse(&text) {
                Ok(back) => prop_assert_eq!(back, config),
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("line ") && !e.contains('\n'), "{}", e);
                }
            }
        }
    }

    #[test]
    fn round_trips() {
        let text = r#"
[[vip]]
address = "10.0.0.1:80"
proto = "tcp"
[[vip.backend]]
address = "10.0.0.11"
[[vip.backend]]
address = "10.0.0.12"
weight = 3
backup = true

[[vip]]
address = "[fd00::1]:53"
proto = "udp"
rate_limit = 50
burst = 100
max_new_flows = 5000

[firewall]
drop = ["192.0.2.0/24", "2001:db8::/32"]
"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.vips.len(), 2);
        assert_eq!(config.vips[0].backends.len(), 2);
        assert_eq!(config.vips[1].proto, Proto::Udp);
        assert_eq!(config.vips[0].backends[0].weight, 1);
        assert!(config.vips[0].backends[1].backup);
        assert_eq!(
            config.vips[1].rate(),
            RateLimit::new(50, Some(100)).with_ceiling(5000, Some(5000))
        );
        assert_eq!(config.firewall.drop.len(), 2);
        let again = Config::parse(&toml::to_string_pretty(&config).unwrap()).unwrap();
        assert_eq!(config, again);
    }

    /// Asserts that `text` is refused in one line that starts with `line N:` and says
    /// `says`.
    fn assert_refused(text: &str, line: usize, says: &str) {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("line {line}:")) && err.contains(says) && !err.contains('\n'),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n";
        assert_refused(text, 3, "protocol");
        assert_refused("[[vip]]\naddress = \"10.0.0.1\"\n", 2, "");
    }

    #[test]
    fn meaning_errors_name_the_line_of_the_entry() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2\"\n[[vip.backend]]\naddress = \"10.0.0.2\"\n";
        assert_refused(text, 6, "listed twice");
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\n\n[[vip.backend]]\naddress = \"fd00::2\"\n";
        assert_refused(text, 5, "family");
        assert_refused("[[vip]]\naddress = \"10.0.0.1:0\"\n", 2, "");
        let text = "[firewall]\ndrop = [\n  \"10.0.0.0/8\",\n  \"10.1.0.0/8\",\n]\n";
        assert_refused(text, 4, "host bits");
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\nnew_flow_burst = 10\n";
        assert_refused(text, 2, "max new flows");
    }

    /// A rate without a burst gets one second's worth, as on the command line (the file's
    /// own example says so).
    #[test]
    fn a_rate_limit_without_a_burst_allows_one_seconds_worth() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\nrate_limit = 10\nmax_new_flows = 50\n";
        let config = Config::parse(text).unwrap_or_else(|e| panic!("{e:#}"));
        let rate = config.vips[0].rate();
        assert_eq!((rate.rate_limit, rate.burst), (10, 10));
        assert_eq!((rate.max_new_flows, rate.new_flow_burst), (50, 50));
        assert_refused("[[vip]]\naddress = \"10.0.0.1:80\"\nburst = 10\n", 2, "");
    }

    #[test]
    fn save_is_atomic_and_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let config = Config::parse("[[vip]]\naddress = \"10.0.0.1:80\"\n").unwrap();
        config.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), config);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left behind: {names:?}");
    }
}
