//! The admin endpoint: `GET /metrics` (Prometheus/OpenMetrics text), `GET /healthz` (no stage
//! stalled, not stopping) and `GET /readyz` (buffer open, sources started, not stopping).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is taken or not ours; fatal at start-up (exit 2), fix `admin.listen`.
    #[error("admin.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    stalled_after: Duration,
}

/// Binds now, so a bad address fails start-up instead of surfacing later.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves until `shutdown`. `/healthz` fails while a buffer commit or a conversion has been
/// running for longer than `stalled_after`.
pub async fn run(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stalled_after: Duration,
    shutdown: CancellationToken,
) {
    let state = AdminState {
        metrics,
        ready,
        shutdown: shutdown.clone(),
        stalled_after,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into());
    }
    match s.metrics.health.stalled(s.stalled_after) {
        Some((stage, running)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: {} running for {}s\n",
                stage.name(),
                running.as_secs()
            ),
        ),
        None => (StatusCode::OK, "ok\n".into()),
    }
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}
