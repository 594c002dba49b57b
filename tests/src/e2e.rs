//! Shared by the end-to-end tests (`tests/e2e.rs`, `tests/ha.rs`): a namespace test bed
//! (see `xtask::testbed`) with backends serving and an agent running, the `lb` CLI, and
//! assertions on what it reports.
//!
//! Every helper panics with the full error (and what it was waiting for) instead of
//! returning it: these are test helpers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{
    testbed::{Agent, Config, HTTP_PORT, KeepAlive, Proc, Testbed, VIP4, VIP6},
    traffic::{Answer, Tally},
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by each test for its whole run: tests of one binary run one at a time. Each builds
/// its own test bed, and test beds could run side by side, but on a small machine parallel
/// agents and servers make the timing of everything worse for no gain.
pub fn serial() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next test needs it all the same.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn vip4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), HTTP_PORT)
}

pub fn vip6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), HTTP_PORT)
}

/// A test bed with every backend serving and the agent running. Fields drop in order:
/// the agent and the servers stop before the test bed removes the namespaces.
pub struct Setup {
    pub agent: Agent,
    /// Backend i's server (1-based) is `servers[i - 1]`: kill it to make the backend fail,
    /// replace it with `bed.start_backend(i)` to bring it back.
    pub servers: Vec<Proc>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub bed: Testbed,
}

impl Setup {
    pub fn new(backends: usize) -> Setup {
        let bed = Testbed::new(Config { backends }).unwrap_or_else(|e| panic!("{e:#}"));
        let servers = bed.start_backends().unwrap_or_else(|e| panic!("{e:#}"));
        let config = bed.dir().join("lb.toml");
        let socket = bed.dir().join("lb.sock");
        let agent = bed
            .start_agent(&config, &socket)
            .unwrap_or_else(|e| panic!("{e:#}"));
        Setup {
            agent,
            servers,
            config,
            socket,
            bed,
        }
    }

    /// A test bed of `backends` backends whose VIP `vip4()` balances over `on` (1-based),
    /// every one of them up.
    pub fn serving(backends: usize, on: &[usize]) -> Setup {
        let s = Setup::new(backends);
        s.configure(vip4(), on);
        s.wait_all_up();
        s
    }

    /// `lb ARGS --socket S`, which must succeed; returns stdout.
    pub fn lb(&self, args: &[&str]) -> String {
        lb_at(&self.bed, &self.socket, args)
    }

    /// `lb ARGS --socket S`, which must fail with exactly one line on stderr; returns it.
    pub fn lb_fails(&self, args: &[&str]) -> String {
        let out = self
            .bed
            .lb_cli(&self.socket, args)
            .unwrap_or_else(|e| panic!("{e:#}"));
        one_line_error(&format!("lb {}", args.join(" ")), &out)
    }

    /// Backend `i` (1-based) by address family.
    pub fn backend(&self, i: usize, v6: bool) -> String {
        self.bed.backends[i - 1].addr(v6).to_string()
    }

    /// A VIP with the given backends (1-based indices), through the CLI.
    pub fn configure(&self, vip: SocketAddr, backends: &[usize]) {
        let v = vip.to_string();
        self.lb(&["vip", "add", &v, "--proto", "tcp"]);
        for &i in backends {
            self.lb(&["backend", "add", &v, &self.backend(i, vip.is_ipv6())]);
        }
    }

    /// One keep-alive connection through `to`, a request every `interval` for at most
    /// `max`, once it has answered three times; with the backend it is pinned to.
    pub fn pinned_keepalive(
        &self,
        to: SocketAddr,
        interval: Duration,
        max: Duration,
    ) -> (KeepAlive, String) {
        let keepalive = self
            .bed
            .keepalive(to, interval, max)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let first = keepalive
            .wait_answers(3, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e:#}"));
        (keepalive, first_backend(&first))
    }

    /// `count` new connections through `to`; every one must be answered.
    pub fn requests(&self, to: SocketAddr, count: u32) -> Tally {
        let tally = self
            .bed
            .requests(to, count)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            tally.errors.is_empty(),
            "{} of {count} connections to {to} failed, first: {}\nagent log:\n{}",
            tally.errors.len(),
            tally.errors[0],
            self.agent.proc.log()
        );
        tally
    }

    /// Like [`Setup::requests`], from source ports `first_port`, `first_port + 1`, ...
    /// (see `Testbed::requests_from`).
    pub fn requests_from(&self, to: SocketAddr, count: u32, first_port: u16) -> Tally {
        let tally = self
            .bed
            .requests_from(to, count, first_port)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            tally.errors.is_empty(),
            "{} of {count} connections to {to} from ports {first_port}.. failed, first: {}\n\
             agent log:\n{}",
            tally.errors.len(),
            tally.errors[0],
            self.agent.proc.log()
        );
        tally
    }

    /// `lb backend list --json`.
    pub fn backend_list(&self) -> Vec<Value> {
        backend_list_at(&self.bed, &self.socket)
    }

    /// The backend addresses `lb backend list` lists, in its order.
    pub fn listed_addresses(&self) -> Vec<String> {
        self.backend_list()
            .iter()
            .map(|b| field(b, "address"))
            .collect()
    }

    /// (vip, proto, address, state) of every backend: what bad input must not change.
    pub fn backend_set(&self) -> BTreeSet<(String, String, String, String)> {
        self.backend_list()
            .iter()
            .map(|b| {
                (
                    field(b, "vip"),
                    field(b, "proto"),
                    field(b, "address"),
                    field(b, "state"),
                )
            })
            .collect()
    }

    /// Sends `signal` to the agent.
    pub fn agent_signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on the agent's own pid, which this test bed started.
        let r = unsafe { libc::kill(self.agent.proc.pid() as i32, signal) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// `count` backend addresses on-link to the balancer (10.100.0.0/16, an extra address
    /// on its interface), each with a permanent neighbour entry: the agent resolves them
    /// at once, and nothing is ever sent to them.
    pub fn static_neighbours(&self, count: u32) -> Vec<IpAddr> {
        static_neighbours(&self.bed, count).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until every backend of the agent reports state "up".
    pub fn wait_all_up(&self) {
        wait_backends(&self.bed, &self.socket, "every backend up", |list| {
            !list.is_empty() && list.iter().all(|b| field(b, "state") == "up")
        });
    }
}

/// See [`Setup::static_neighbours`]; for benchmarks too.
pub fn static_neighbours(bed: &Testbed, count: u32) -> anyhow::Result<Vec<IpAddr>> {
    use std::fmt::Write as _;
    bed.ip(
        &bed.lb.ns,
        &["addr", "replace", "10.100.0.1/16", "dev", "eth0"],
    )?;
    let addrs: Vec<IpAddr> = (0..count)
        .map(|i| IpAddr::from([10, 100, (i / 250) as u8, (i % 250) as u8 + 2]))
        .collect();
    let mut batch = String::new();
    for (i, a) in addrs.iter().enumerate() {
        let _ = writeln!(
            batch,
            "neigh replace {a} lladdr 02:bb:00:00:{:02x}:{:02x} dev eth0 nud permanent",
            i >> 8 & 0xff,
            i & 0xff
        );
    }
    let file = bed.dir().join("neighbours.batch");
    std::fs::write(&file, batch)?;
    bed.ip(&bed.lb.ns, &["-batch", &file.to_string_lossy()])?;
    Ok(addrs)
}

/// `lb ARGS --socket SOCKET` (for any agent of the test bed), which must succeed; returns
/// stdout.
pub fn lb_at(bed: &Testbed, socket: &Path, args: &[&str]) -> String {
    bed.lb_cli_ok(socket, args)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `lb vip add VIP --check CHECK --interval INTERVAL_MS --rise RISE --fall FALL` through
/// `lb` (`Setup::lb`, or `lb_at` for another agent).
pub fn add_checked_vip(
    lb: impl Fn(&[&str]) -> String,
    vip: &str,
    check: &str,
    interval_ms: u64,
    rise: u64,
    fall: u64,
) {
    let (interval, rise, fall) = (interval_ms.to_string(), rise.to_string(), fall.to_string());
    lb(&[
        "vip",
        "add",
        vip,
        "--check",
        check,
        "--interval",
        &interval,
        "--rise",
        &rise,
        "--fall",
        &fall,
    ]);
}

/// `lb backend list --json` of the agent on `socket`.
pub fn backend_list_at(bed: &Testbed, socket: &Path) -> Vec<Value> {
    let out = lb_at(bed, socket, &["backend", "list", "--json"]);
    match serde_json::from_str(&out) {
        Ok(Value::Array(v)) => v,
        other => panic!("`lb backend list --json` is not a JSON array: {other:?}\n{out}"),
    }
}

/// Polls `lb backend list --json` of the agent on `socket` every 50 ms until `ok` holds
/// (at most 10 s, then panics with `what` and the last list).
pub fn wait_backends(bed: &Testbed, socket: &Path, what: &str, ok: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = backend_list_at(bed, socket);
        if ok(&list) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} after 10 s: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A JSON field as a string (numbers and strings alike), panicking if it is missing.
pub fn field(v: &Value, name: &str) -> String {
    match v.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(other @ (Value::Number(_) | Value::Bool(_))) => other.to_string(),
        other => panic!("backend entry without \"{name}\" ({other:?}): {v}"),
    }
}

pub fn number(v: &Value, name: &str) -> u64 {
    v.get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number \"{name}\" in {v}"))
}

/// Checks a failed command: non-zero exit and one non-empty line on stderr.
pub fn one_line_error(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "`{what}` should fail but exited 0; stdout: {}",
        { String::from_utf8_lossy(&out.stdout) }
    );
    let text = stderr.trim_end();
    assert!(
        !text.is_empty(),
        "`{what}` failed ({}) without a message",
        out.status
    );
    assert_eq!(
        text.lines().count(),
        1,
        "`{what}` should say one line on stderr, said:\n{text}"
    );
    text.to_string()
}

/// Runs `cmd` for at most `timeout`; it must succeed. Its stdout; a failure says `what`, the
/// exit status, stdout and stderr.
pub fn run_ok(what: &str, cmd: &mut Command, timeout: Duration) -> String {
    let out = xtask::testbed::run_with_timeout(cmd, timeout)
        .unwrap_or_else(|e| panic!("running {what}: {e:#}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What backend `i` (1-based) answers with.
pub fn name(i: usize) -> String {
    format!("backend-{i}")
}

/// The index of the backend that answers with `name`: the inverse of [`name`].
pub fn index_of(name: &str) -> usize {
    name.strip_prefix("backend-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{name:?} is no backend-N"))
}

/// The backend a keep-alive connection's first answer came from; it must not have failed.
pub fn first_backend(answers: &[Answer]) -> String {
    match &answers[0] {
        Answer::Ok { backend, .. } => backend.clone(),
        Answer::Err { message, .. } => panic!("keep-alive connection failed at once: {message}"),
    }
}

/// Every one of a keep-alive connection's `answers` came from `backend`: none failed, none
/// went elsewhere; `what` says when, for a failure.
pub fn assert_all_from(answers: &[Answer], backend: &str, what: &str) {
    for a in answers {
        match a {
            Answer::Ok { backend: b, .. } if b == backend => {}
            other => panic!("{what}: {other:?} (pinned to {backend}); all: {answers:?}"),
        }
    }
}

/// The counts must be exactly `expected` (backend index, count); nobody else answered.
pub fn assert_split(tally: &Tally, expected: &[(usize, u32)]) {
    let want: BTreeMap<String, u32> = expected
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|&(i, n)| (name(i), n))
        .collect();
    assert_eq!(
        tally.counts, want,
        "connections per backend; in order: {:?}",
        tally.sequence
    );
}
