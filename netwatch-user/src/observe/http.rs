//! The read-only HTTP endpoint: `/metrics` for Prometheus.
//!
//! Limits, so that idle or slow clients cannot starve the scrape (or the
//! controller's file descriptors): a client must send a request's headers
//! within [`HEADER_TIMEOUT`] (an idle keep-alive connection is closed
//! after as long); at most [`MAX_CONNECTIONS`] are held, a new one
//! beyond that closes the oldest that never sent a complete request (else
//! the oldest); the JSON endpoints that walk the maps run at most
//! [`MAX_HEAVY`] at a time, the rest answered 503 at once.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use log::warn;

use crate::{
    datapath::PinnedMaps,
    observe::{metrics::Metrics, snapshot::Snapshot},
};

#[derive(Clone)]
pub struct AppState {
    /// Opened once by `run`, shared with its main loop and the detector.
    pub maps: PinnedMaps,
    pub state_dir: PathBuf,
    /// The process's registry, reading `maps` at scrape time.
    pub metrics: Arc<Metrics>,
    /// Permits for the JSON endpoints ([`MAX_HEAVY`]).
    pub heavy: Arc<tokio::sync::Semaphore>,
    /// Where `/api/fleet/lookup/IP` asks, with a fleet.
    pub fleet: Option<crate::config::FleetConfig>,
}

/// Time a client has to send a request's headers, from connecting or
/// from the previous response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once.
pub const MAX_CONNECTIONS: usize = 256;
/// JSON requests served at once (`/api/top` walks the whole per-source
/// map, up to 1 048 576 records).
pub const MAX_HEAVY: usize = 2;

impl AppState {
    pub fn new(maps: PinnedMaps, state_dir: PathBuf, metrics: Arc<Metrics>) -> Self {
        AppState {
            maps,
            state_dir,
            metrics,
            heavy: Arc::new(tokio::sync::Semaphore::new(MAX_HEAVY)),
            fleet: None,
        }
    }
}

/// Binds the endpoint's socket; done before anything is attached, so a
/// bad or busy `--metrics-addr` fails start-up cleanly.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics endpoint to {addr} (--metrics-addr)"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoint in the background (inside a tokio runtime).
pub fn serve(listener: std::net::TcpListener, state: AppState) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_handler))
        .route("/api/status", get(api_status))
        .route("/api/lookup/{ip}", get(api_lookup))
        .route("/api/top", get(api_top))
        .route("/api/incidents", get(api_incidents))
        .route("/api/fleet/lookup/{ip}", get(api_fleet_lookup))
        .with_state(state);
    Ok(tokio::spawn(accept_loop(listener, app)))
}

/// A connection being served, and whether it ever sent a request.
struct Connection {
    task: tokio::task::JoinHandle<()>,
    served: Arc<AtomicBool>,
}

async fn accept_loop(listener: tokio::net::TcpListener, app: Router) {
    let timer = hyper_util::rt::TokioTimer::new();
    let mut held: VecDeque<Connection> = VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and the like: never a busy loop.
                warn!("metrics endpoint: accepting a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        held.retain(|c| !c.task.is_finished());
        if held.len() >= MAX_CONNECTIONS {
            let oldest = held.iter().position(|c| !c.served.load(Relaxed)).unwrap_or(0);
            if let Some(c) = held.remove(oldest) {
                c.task.abort();
            }
        }
        let served = Arc::new(AtomicBool::new(false));
        let service = {
            let served = served.clone();
            let app = hyper_util::service::TowerToHyperService::new(app.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                served.store(true, Relaxed);
                hyper::service::Service::call(&app, req)
            })
        };
        let timer = timer.clone();
        let task = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(timer)
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        held.push_back(Connection { task, served });
    }
}

async fn index() -> &'static str {
    "netwatch (read-only)\n  /metrics            Prometheus metrics\n  /api/status         interfaces, rules, lists, counters\n  /api/lookup/IP      incidents and tracked state of an address\n  /api/top?limit=N    busiest tracked sources\n  /api/incidents?limit=N  most recent incidents\n  /api/fleet/lookup/IP  every sensor's incidents of an address (with a fleet)\n"
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Runs a blocking read and answers it as JSON (500 with the error; 503
/// when [`MAX_HEAVY`] are running already).
async fn json<T: serde::Serialize + Send + 'static>(
    heavy: &tokio::sync::Semaphore,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> axum::response::Response {
    let Ok(_permit) = heavy.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            format!("busy: {MAX_HEAVY} API requests are being answered; retry\n"),
        )
            .into_response();
    };
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => axum::Json(value).into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}\n")).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn api_status(State(state): State<AppState>) -> axum::response::Response {
    let heavy = state.heavy.clone();
    json(&heavy, move || Snapshot::read(state.maps.still_pinned()?)).await
}

async fn api_lookup(
    State(state): State<AppState>,
    axum::extract::Path(ip): axum::extract::Path<String>,
) -> axum::response::Response {
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return (StatusCode::BAD_REQUEST, format!("{ip:?} is not an IP address\n")).into_response();
    };
    let heavy = state.heavy.clone();
    json(&heavy, move || {
        crate::observe::reports::lookup_report(state.maps.still_pinned().ok(), &state.state_dir, ip)
    })
    .await
}

/// Every sensor's incidents of an address (404 without a fleet).
async fn api_fleet_lookup(
    State(state): State<AppState>,
    axum::extract::Path(ip): axum::extract::Path<String>,
) -> axum::response::Response {
    let Some(fleet) = state.fleet.clone() else {
        return (StatusCode::NOT_FOUND, "no fleet is configured ([fleet], --fleet)\n").into_response();
    };
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return (StatusCode::BAD_REQUEST, format!("{ip:?} is not an IP address\n")).into_response();
    };
    let heavy = state.heavy.clone();
    json(&heavy, move || {
        Ok(serde_json::json!({ "ip": ip, "incidents": crate::fleet::fleet_incidents(&fleet, ip)? }))
    })
    .await
}

async fn api_top(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> axum::response::Response {
    let heavy = state.heavy.clone();
    json(&heavy, move || {
        crate::observe::reports::top_report(state.maps.still_pinned()?, q.limit.unwrap_or(10).min(1000))
    })
    .await
}

async fn api_incidents(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> axum::response::Response {
    let heavy = state.heavy.clone();
    json(&heavy, move || {
        let incidents = match crate::detection::incidents::Store::open_read_only(&state.state_dir)? {
            Some(store) => store.recent(q.limit.unwrap_or(100).min(10_000))?,
            None => Vec::new(),
        };
        Ok(serde_json::json!({ "incidents": incidents }))
    })
    .await
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    let result = tokio::task::spawn_blocking(move || -> Result<String> { state.metrics.render() }).await;
    match result {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            body,
        )
            .into_response(),
        Ok(Err(err)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the maps: {err:#}\n"),
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}
