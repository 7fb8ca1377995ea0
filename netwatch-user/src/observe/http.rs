//! The read-only HTTP endpoint: `/metrics` for Prometheus.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

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
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            warn!("metrics endpoint stopped: {err}");
        }
    }))
}

async fn index() -> &'static str {
    "netwatch (read-only)\n  /metrics            Prometheus metrics\n  /api/status         interfaces, rules, lists, counters\n  /api/lookup/IP      incidents and tracked state of an address\n  /api/top?limit=N    busiest tracked sources\n  /api/incidents?limit=N  most recent incidents\n"
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Runs a blocking read and answers it as JSON (500 with the error).
async fn json<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> axum::response::Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => axum::Json(value).into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}\n")).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn api_status(State(state): State<AppState>) -> axum::response::Response {
    json(move || Snapshot::read(state.maps.still_pinned()?)).await
}

async fn api_lookup(
    State(state): State<AppState>,
    axum::extract::Path(ip): axum::extract::Path<String>,
) -> axum::response::Response {
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return (StatusCode::BAD_REQUEST, format!("{ip:?} is not an IP address\n")).into_response();
    };
    json(move || crate::observe::reports::lookup_report(state.maps.still_pinned().ok(), &state.state_dir, ip)).await
}

async fn api_top(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> axum::response::Response {
    json(move || crate::observe::reports::top_report(state.maps.still_pinned()?, q.limit.unwrap_or(10).min(1000))).await
}

async fn api_incidents(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> axum::response::Response {
    json(move || {
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
