//! The agent's HTTP listener (`lb run --metrics ADDR:PORT`, default 127.0.0.1:9180):
//! `/metrics` for Prometheus, `/` the status page, `/api/status` the page's data. Also the
//! once-a-second sampler behind the page's rates and chart.
//!
//! Nothing here holds the agent lock for longer than it takes to copy counters out of the
//! maps ([`status::snapshot`]); flow counts come from the shared flow-table walker
//! (`kernel::flows`), at most [`FLOW_SCAN_MAX_AGE`] old.

pub mod metrics;
pub mod status;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::{net::TcpListener, task::JoinHandle};

use self::status::History;
use crate::api::Agent;
pub use crate::api::server::FLOW_SCAN_MAX_AGE;

/// Where `lb run` serves metrics and the status page unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9180";
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

// ---- the listener ----------------------------------------------------------------------

pub struct Monitor {
    agent: Arc<Agent>,
}

impl Monitor {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.agent.history()
    }
}

/// Starts the HTTP server on `listener`; returns its task (abort it to stop). The history
/// it shows is filled by [`sample`], which runs with or without it.
pub fn start(listener: TcpListener, agent: Arc<Agent>) -> JoinHandle<()> {
    let monitor = Arc::new(Monitor { agent });
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(scrape))
        .route("/api/status", get(api_status))
        .with_state(monitor);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("metrics listener stopped: {e}");
        }
    })
}

/// Once a second: a snapshot into the agent's history (rates, the chart and `lb status`'s
/// drops of the last minute come from these).
pub async fn sample(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = status::snapshot(&*agent.state.lock().await);
        match snapshot {
            Ok(s) => agent.history().push(Arc::new(s)),
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
    let flows = m.agent.flows.fresh(FLOW_SCAN_MAX_AGE).await;
    if let Err(e) = &flows {
        log::warn!("walking the flow table: {e:#}");
    }
    let snapshot = match status::snapshot(&*m.agent.state.lock().await) {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let text = metrics::render(&metrics::Scrape {
        snapshot: &snapshot,
        flows: flows.as_deref().ok(),
        info: &m.agent.info,
        fleet: &m.agent.fleet.view(),
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
    let flows = m.agent.flows.fresh(FLOW_SCAN_MAX_AGE).await.ok();
    let latest = m.history().latest();
    let snapshot = match latest {
        Some(s) => s,
        None => match status::snapshot(&*m.agent.state.lock().await) {
            Ok(s) => Arc::new(s),
            Err(e) => return error(e),
        },
    };
    let body = status::status_json(
        &m.agent.info,
        &snapshot,
        flows.as_deref(),
        &m.history(),
        q.since,
    );
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
