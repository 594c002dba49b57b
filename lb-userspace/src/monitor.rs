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

/// Counts the table's entries per (backend id, generation). Bounded: an LRU table that
/// churns while it is walked can send the key iteration back to its start.
fn walk(table: &FlowTable) -> FlowScan {
    let start = Instant::now();
    let mut scan = FlowScan::default();
    for entry in table.iter().take(2 * MAX_FLOWS as usize) {
        let Ok((_, v)) = entry else { break };
        scan.entries += 1;
        *scan
            .per_backend
            .entry((v.backend_id, v.backend_generation))
            .or_insert(0) += 1;
    }
    scan.entries = scan.entries.min(MAX_FLOWS.into());
    scan.took = start.elapsed();
    scan.time = status::unix_now();
    scan
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
