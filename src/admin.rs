//! The admin endpoint: `GET /metrics` (Prometheus/OpenMetrics text), `GET /healthz` (no stage
//! stalled, not stopping), `GET /readyz` (buffer open, sources started, not stopping) and
//! `POST /-/reload` (re-read the configuration file, as SIGHUP does; `edgegate reload`).

pub mod client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::ReloadHandle;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is taken or not ours; fatal at start-up (exit 2), fix `admin.listen`.
    #[error("admin.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the endpoint reads and may ask of the gateway; it outlives a change of `admin.listen`.
#[derive(Clone)]
pub struct AdminContext {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub buffer: Buffer,
    /// The configuration in force; a reload replaces it.
    pub config: watch::Receiver<Arc<Config>>,
    pub reload: ReloadHandle,
}

#[derive(Clone)]
struct AdminState {
    ctx: AdminContext,
    shutdown: CancellationToken,
}

impl AdminState {
    fn stalled_after(&self) -> Duration {
        let config = self.ctx.config.borrow();
        config
            .admin
            .as_ref()
            .map_or(Duration::from_secs(30), |a| a.stalled_after)
    }
}

/// Binds now, so a bad address fails start-up instead of surfacing later.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Tasks that live as long as the gateway whether or not anyone serves or looks, started once.
pub fn spawn_background(_ctx: &AdminContext, _shutdown: &CancellationToken) {}

/// Serves until `shutdown`. `/healthz` fails while a buffer commit or a conversion has been
/// running for longer than `admin.stalled_after`.
pub async fn run(
    listener: tokio::net::TcpListener,
    ctx: AdminContext,
    shutdown: CancellationToken,
) {
    let state = AdminState {
        ctx,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/-/reload", post(reload))
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
        s.ctx.metrics.encode(),
    )
}

async fn healthz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into());
    }
    match s.ctx.metrics.health.stalled(s.stalled_after()) {
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
    } else if s.ctx.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// 200 with what was applied; otherwise the reason, and the running configuration stays.
async fn reload(State(s): State<AdminState>) -> (StatusCode, String) {
    use crate::reload::ReloadError;
    let outcome = s.ctx.reload.request().await;
    let status = match &outcome {
        Ok(_) => StatusCode::OK,
        Err(ReloadError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        Err(ReloadError::NeedsRestart(_) | ReloadError::Refused { .. }) => StatusCode::CONFLICT,
        Err(ReloadError::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = match outcome {
        Ok(summary) => serde_json::to_value(summary).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    (status, format!("{body}\n"))
}
