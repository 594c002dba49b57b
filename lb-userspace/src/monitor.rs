//! The agent's HTTP listener (`lb run --metrics ADDR:PORT`, default 127.0.0.1:9180):
//! `/metrics` for Prometheus, `/` the status page, `/api/status` the page's data. Also the
//! once-a-second sampler behind the page's rates and chart, and the cached flow-table walk
//! that per-backend flow counts come from.
//!
//! Nothing here holds the agent lock for longer than it takes to copy counters out of the
//! maps ([`Agent::snapshot`]); the flow table (up to a million entries) is walked on a
//! blocking thread through a handle of its own, at most once per [`FLOW_SCAN_MAX_AGE`].

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{FlowKey, FlowValue, MAX_FLOWS};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::Mutex, task::JoinHandle};

use crate::{
    agent::Agent,
    metrics,
    status::{self, AgentInfo, FlowScan, History},
};

/// Where `lb run` serves metrics and the status page unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9180";
/// Flow counts (per backend, table occupancy) may be this old; older, the table is walked
/// again when someone asks.
pub const FLOW_SCAN_MAX_AGE: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

static STATUS_PAGE: &str = include_str!("web/status.html");

/// The `--metrics` value: `ADDR:PORT`, `[ADDR]:PORT`, or `off` (None).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Listen(None));
        }
        s.parse()
            .map(|a| Listen(Some(a)))
            .map_err(|_| format!("{s:?} is not ADDR:PORT ([ADDR]:PORT for IPv6) or off"))
    }
}

/// Binds the listener (before the agent attaches, so a taken port fails the start cleanly).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics listener on {addr} (choose another with --metrics ADDR:PORT, or --metrics off)")
    })
}

// ---- flow-table walks ------------------------------------------------------------------

type FlowTable = BpfHashMap<MapData, FlowKey, FlowValue>;

/// The latest walk of the flow table, renewed on demand when older than asked for.
pub struct FlowCounts {
    table: Arc<FlowTable>,
    latest: std::sync::Mutex<Option<(Instant, Arc<FlowScan>)>>,
    /// Held while walking, so concurrent askers share one walk.
    walking: Mutex<()>,
}

impl FlowCounts {
    pub fn new(table: FlowTable) -> Self {
        Self {
            table: Arc::new(table),
            latest: std::sync::Mutex::new(None),
            walking: Mutex::new(()),
        }
    }

    /// The latest walk, however old.
    pub fn latest(&self) -> Option<Arc<FlowScan>> {
        self.lock_latest().as_ref().map(|(_, s)| s.clone())
    }

    fn lock_latest(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<FlowScan>)>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn within(&self, max_age: Duration) -> Option<Arc<FlowScan>> {
        self.lock_latest()
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= max_age)
            .map(|(_, s)| s.clone())
    }

    /// A walk at most `max_age` old: the latest, or a new one on a blocking thread.
    pub async fn fresh(&self, max_age: Duration) -> Result<Arc<FlowScan>> {
        if let Some(s) = self.within(max_age) {
            return Ok(s);
        }
        let _walking = self.walking.lock().await;
        if let Some(s) = self.within(max_age) {
            return Ok(s); // someone else just walked it
        }
        let table = self.table.clone();
        let scan = Arc::new(tokio::task::spawn_blocking(move || walk(&table)).await?);
        *self.lock_latest() = Some((Instant::now(), scan.clone()));
        Ok(scan)
    }
}

/// Counts the table's entries per (backend id, generation), a batch of entries a syscall
/// (`BPF_MAP_LOOKUP_BATCH`), or, where the kernel cannot, key by key.
fn walk(table: &FlowTable) -> FlowScan {
    let start = Instant::now();
    let mut scan = FlowScan::default();
    let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(table).fd());
    if let Err(e) = walk_batched(fd, &mut scan) {
        log::debug!("batched flow-table walk: {e}; walking key by key");
        scan = FlowScan::default();
        // Bounded: an LRU table that churns while it is walked can send the key iteration
        // back to its start.
        for entry in table.iter().take(2 * MAX_FLOWS as usize) {
            let Ok((_, v)) = entry else { break };
            scan.count(&v);
        }
    }
    scan.entries = scan.entries.min(MAX_FLOWS.into());
    scan.took = start.elapsed();
    scan.time = status::unix_now();
    scan
}

impl FlowScan {
    fn count(&mut self, v: &FlowValue) {
        self.entries += 1;
        *self
            .per_backend
            .entry((v.backend_id, v.backend_generation))
            .or_insert(0) += 1;
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) over the whole table, 16,384 entries a syscall
/// instead of two syscalls an entry: a full table (a million flows) in about 0.4 s
/// instead of 3.6 s (measured on a 2-core VM).
fn walk_batched(fd: std::os::fd::BorrowedFd<'_>, scan: &mut FlowScan) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BATCH: usize = 16384;
    /// The `batch` member of the kernel's `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowValue::default(); BATCH];
    // Hash maps resume from a bucket number.
    let (mut token, mut next) = (0u32, 0u32);
    for round in 0..(2 * MAX_FLOWS as usize / BATCH + 64) {
        let mut attr = BatchAttr {
            in_batch: if round == 0 {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values into buffers of that
        // many, and a u32 into `next`; all outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (r < 0).then(std::io::Error::last_os_error);
        let done = matches!(&error, Some(e) if e.raw_os_error() == Some(libc::ENOENT));
        if let Some(e) = error
            && !done
        {
            return Err(e);
        }
        for v in &values[..(attr.count as usize).min(BATCH)] {
            scan.count(v);
        }
        if done {
            return Ok(());
        }
        token = next;
    }
    Ok(())
}

// ---- the listener ----------------------------------------------------------------------

pub struct Monitor {
    agent: Arc<Mutex<Agent>>,
    flows: Arc<FlowCounts>,
    history: std::sync::Mutex<History>,
    info: AgentInfo,
}

impl Monitor {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the sampler and the HTTP server on `listener`; returns their tasks (abort them
/// to stop).
pub fn start(
    listener: TcpListener,
    agent: Arc<Mutex<Agent>>,
    flows: Arc<FlowCounts>,
    info: AgentInfo,
) -> Vec<JoinHandle<()>> {
    let monitor = Arc::new(Monitor {
        agent,
        flows,
        history: std::sync::Mutex::new(History::default()),
        info,
    });
    let sampler = tokio::spawn(sample(monitor.clone()));
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(scrape))
        .route("/api/status", get(api_status))
        .with_state(monitor);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("metrics listener stopped: {e}");
        }
    });
    vec![sampler, server]
}

/// Once a second: a snapshot into the history (rates and the chart come from these).
async fn sample(monitor: Arc<Monitor>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = monitor.agent.lock().await.snapshot();
        match snapshot {
            Ok(s) => monitor.history().push(Arc::new(s)),
            Err(e) => log::warn!("sampling counters: {e:#}"),
        }
    }
}

fn error(e: anyhow::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
}

async fn page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

async fn scrape(State(m): State<Arc<Monitor>>) -> Response {
    let flows = m.flows.fresh(FLOW_SCAN_MAX_AGE).await;
    if let Err(e) = &flows {
        log::warn!("walking the flow table: {e:#}");
    }
    let snapshot = match m.agent.lock().await.snapshot() {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let text = metrics::render(&metrics::Scrape {
        snapshot: &snapshot,
        flows: flows.as_deref().ok(),
        info: &m.info,
    });
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

#[derive(Deserialize)]
struct StatusQuery {
    /// Only history samples after this unix time.
    #[serde(default)]
    since: f64,
}

async fn api_status(State(m): State<Arc<Monitor>>, Query(q): Query<StatusQuery>) -> Response {
    let flows = m.flows.fresh(FLOW_SCAN_MAX_AGE).await.ok();
    let latest = m.history().latest();
    let snapshot = match latest {
        Some(s) => s,
        None => match m.agent.lock().await.snapshot() {
            Ok(s) => Arc::new(s),
            Err(e) => return error(e),
        },
    };
    let body = status::status_json(&m.info, &snapshot, flows.as_deref(), &m.history(), q.since);
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_flag() {
        let parse = |s: &str| s.parse::<Listen>().map(|l| l.0);
        assert_eq!(
            parse("127.0.0.1:9180").unwrap(),
            Some("127.0.0.1:9180".parse().unwrap())
        );
        assert_eq!(
            parse("[::1]:9999").unwrap(),
            Some("[::1]:9999".parse().unwrap())
        );
        assert_eq!(parse("off").unwrap(), None);
        assert!(parse("9180").is_err());
        assert!(parse("localhost:9180").is_err());
        assert_eq!(
            parse(DEFAULT_LISTEN).unwrap(),
            Some("127.0.0.1:9180".parse().unwrap())
        );
    }
}
