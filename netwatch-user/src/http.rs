//! The read-only HTTP endpoint: `/metrics` for Prometheus.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use log::warn;

use crate::{datapath::PinnedMaps, metrics, metrics::ControllerStats, snapshot::Snapshot};

#[derive(Clone)]
pub struct AppState {
    pub pin_dir: PathBuf,
    pub stats: Arc<Mutex<ControllerStats>>,
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
pub fn serve(
    listener: std::net::TcpListener,
    state: AppState,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_handler))
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            warn!("metrics endpoint stopped: {err}");
        }
    }))
}

async fn index() -> &'static str {
    "netwatch\n  /metrics  Prometheus metrics\n"
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    let result = tokio::task::spawn_blocking(move || -> Result<String> {
        let maps = PinnedMaps::open(&state.pin_dir)?;
        let snapshot = Snapshot::read(&maps)?;
        let stats = state.stats.lock().map(|s| s.clone()).unwrap_or_default();
        metrics::render(&snapshot, Some(&stats))
    })
    .await;
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
