//! The control protocol between the CLI and the agent: one JSON request line, one JSON
//! response line, over a root-only Unix socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    health::CheckPatch,
    model::{Algo, Mode, Persist, Proto, RatePatch, Service},
};

pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";
/// How long `lb backend del` waits at most for a backend's flows to end: a minute, enough
/// for web requests and short transactions (connection pools: give `--grace`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Longest request line the agent reads; anything longer is refused, not buffered. Room
/// for `lb apply` of a configuration with 100,000 backends.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// A VIP as `lb vip add` and `lb vip set` give it: what is not given takes its default
/// (add) or keeps its value (set).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    pub vip: SocketAddr,
    pub proto: Proto,
    #[serde(default)]
    pub algo: Option<Algo>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub check: CheckPatch,
    /// New flows per second per source; 0 removes the limit.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
    /// Ceiling on new flows per second from all sources together; 0 removes it.
    #[serde(default)]
    pub max_new_flows: Option<u32>,
    #[serde(default)]
    pub new_flow_burst: Option<u32>,
    /// Source affinity in seconds; 0 removes it.
    #[serde(default)]
    pub persist: Option<u32>,
    /// The IPv6 prefix that makes one client for `persist`.
    #[serde(default)]
    pub persist_prefix6: Option<u8>,
}

impl VipSpec {
    /// A spec that gives nothing but the service: add takes every default, set changes
    /// nothing.
    pub fn new(vip: SocketAddr, proto: Proto) -> Self {
        Self {
            vip,
            proto,
            algo: None,
            mode: None,
            check: CheckPatch::default(),
            rate_limit: None,
            burst: None,
            max_new_flows: None,
            new_flow_burst: None,
            persist: None,
            persist_prefix6: None,
        }
    }

    /// The rate limits this spec changes, over whatever the VIP has (add: the defaults).
    pub fn rate(&self) -> RatePatch {
        RatePatch {
            rate_limit: self.rate_limit,
            burst: self.burst,
            max_new_flows: self.max_new_flows,
            new_flow_burst: self.new_flow_burst,
        }
    }

    /// Source affinity as this spec leaves `old`, checked.
    pub fn persist(&self, old: Persist) -> anyhow::Result<Persist> {
        let persist = old.patched(self.persist, self.persist_prefix6);
        persist.validate()?;
        Ok(persist)
    }
}

/// A backend as `lb backend add` and `lb backend set` give it, the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub vip: SocketAddr,
    pub proto: Proto,
    pub backend: IpAddr,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub backup: Option<bool>,
    /// Replaces the VIP's check for this backend.
    #[serde(default)]
    pub check: CheckPatch,
}

impl BackendSpec {
    /// The VIP the backend is of.
    pub fn service(&self) -> Service {
        Service {
            addr: self.vip,
            proto: self.proto,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    VipAdd(VipSpec),
    /// Changes what the spec gives; the rest stays.
    VipSet(VipSpec),
    VipDel {
        vip: SocketAddr,
        proto: Proto,
    },
    VipList,
    BackendAdd(BackendSpec),
    /// Changes what the spec gives; the rest stays.
    BackendSet(BackendSpec),
    BackendDrain {
        vip: SocketAddr,
        proto: Proto,
        backend: IpAddr,
        drain: bool,
    },
    BackendDel {
        vip: SocketAddr,
        proto: Proto,
        backend: IpAddr,
        /// Seconds its flows may take to end (`DEFAULT_GRACE` when not given).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_s: Option<u64>,
        /// Remove it at once: its flows move to the other backends.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        now: bool,
    },
    BackendList {
        vip: Option<SocketAddr>,
        proto: Proto,
    },
    Stats,
    /// The one-screen overview (`lb status`): agent, interfaces, VIPs, recent drops.
    Status,
    FirewallAdd {
        cidr: IpNet,
    },
    FirewallDel {
        cidr: IpNet,
    },
    FirewallList,
    /// Make the running state what this configuration text says (`lb apply -f FILE`);
    /// `file` names it in errors. With `dry_run`, only answer what would change.
    Apply {
        file: String,
        text: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Which VIP addresses this balancer announces (`lb fleet status`).
    FleetStatus,
    /// Withdraw every VIP address, keep forwarding (`lb fleet leave`).
    FleetLeave,
    /// Announce again (`lb fleet join`).
    FleetJoin,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Done; `message` is for people, `data` for `--json` and tables.
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default)]
        data: serde_json::Value,
    },
    /// Refused or failed; the running state is unchanged.
    Error { error: String },
}

impl Response {
    pub fn message(m: impl Into<String>) -> Self {
        Response::Ok {
            message: Some(m.into()),
            data: serde_json::Value::Null,
        }
    }

    pub fn data(data: serde_json::Value) -> Self {
        Response::Ok {
            message: None,
            data,
        }
    }
}

/// Decodes one request line; never panics, whatever the bytes.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

/// Sends one request to the agent at `socket` and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no agent is running on {}: start one with `systemctl start lb@IF` or `lb run --iface IF`, or name its socket with --socket",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            anyhow!(
                "permission denied on {}: the control socket is root-only (run lb with sudo)",
                socket.display()
            )
        }
        _ => anyhow!("cannot reach the agent on {}: {e}", socket.display()),
    })?;
    // Backend changes wait briefly for neighbour resolution; nothing takes longer.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(&answer).map_err(|e| anyhow!("unreadable answer from the agent: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let r = Request::BackendAdd(BackendSpec {
            vip: "[fd00::1]:80".parse().unwrap(),
            proto: Proto::Tcp,
            backend: "fd00::2".parse().unwrap(),
            weight: Some(3),
            backup: None,
            check: CheckPatch {
                check: Some("http:/x".parse().unwrap()),
                ..Default::default()
            },
        });
        let line = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_request(&line).unwrap(), r);
        // The wire form is flat: the command beside the spec's fields.
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.starts_with(r#"{"cmd":"backend_add","vip":"[fd00::1]:80""#),
            "{text}"
        );
        let unknown = br#"{"cmd":"vip_set","vip":"10.0.0.1:80","proto":"tcp","colour":1}"#;
        assert!(
            decode_request(unknown)
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn junk_is_a_clear_error() {
        assert!(decode_request(b"").is_err());
        assert!(
            decode_request(b"{\"cmd\":\"vip_add\"}")
                .unwrap_err()
                .contains("missing field")
        );
        assert!(
            decode_request(b"{\"cmd\":\"vip_add\",\"vip\":\"10.0.0.1\",\"proto\":\"tcp\"}")
                .is_err()
        );
        assert!(decode_request(b"{\"cmd\":\"rm_rf\"}").is_err());
        assert!(decode_request(&vec![b' '; MAX_REQUEST_BYTES + 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_near_misses(s in r#"\{"cmd":"(vip|backend)_(add|del|list)"(,"[a-z]{1,8}":("[0-9a-f.:\[\]]{0,20}"|[0-9]{1,6}|null))*\}"#) {
            let _ = decode_request(s.as_bytes());
        }
    }
}
