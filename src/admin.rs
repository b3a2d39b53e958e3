//! The admin endpoint: `GET /metrics` (Prometheus/OpenMetrics text), `GET /healthz` (no stage
//! stalled, not stopping), `GET /readyz` (buffer open, sources started, not stopping),
//! `POST /-/reload` (re-read the configuration file, as SIGHUP does; `edgegate reload`), and the
//! live status: `GET /status` (JSON), `GET /status/history` (the last hour), `GET /status/debug`
//! (the last converter debug events) and `GET /` (the status page). With `[admin.auth]` every
//! path but `/healthz` and `/readyz` asks for credentials; with `[admin.tls]` it speaks HTTPS.

pub mod auth;
pub mod client;
pub mod tls;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::ReloadHandle;
use crate::status;

/// The status page: one file, its style and script inline, nothing fetched from elsewhere.
const PAGE: &str = include_str!("admin/page.html");

/// The page's Content-Security-Policy: its own inline script, named by its SHA-256, so that no
/// injected script or inline event handler can run even if device data ever reached the page
/// as HTML; its own style; requests to this endpoint only.
fn page_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine as _;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let digest = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
        let hash = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'none'"
        )
    })
}

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
    /// The file a reload re-reads.
    pub config_path: std::path::PathBuf,
    pub reload: ReloadHandle,
}

/// The header `edgegate reload` names its file in (hex of the path's bytes): a gateway running
/// another file refuses, as reloading its own would not apply what the caller checked.
pub const CONFIG_HEADER: &str = "x-edgegate-config";

/// Whether two paths name the same file (as written, or once resolved).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The path `edgegate reload` sent, if it sent one that decodes.
fn named_config(headers: &axum::http::HeaderMap) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let hex = headers.get(CONFIG_HEADER)?.to_str().ok()?;
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(std::ffi::OsString::from_vec(bytes).into())
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

/// Tasks that live as long as the gateway whether or not anyone serves or looks, started once:
/// the status history's sampler.
pub fn spawn_background(ctx: &AdminContext, shutdown: &CancellationToken) {
    tokio::spawn(status::sample(
        ctx.metrics.clone(),
        ctx.config.clone(),
        shutdown.clone(),
    ));
}

/// Serves until `shutdown`. `/healthz` fails while a buffer commit or a conversion has been
/// running for longer than `admin.stalled_after`.
pub async fn run(
    listener: tokio::net::TcpListener,
    ctx: AdminContext,
    shutdown: CancellationToken,
) {
    if let Some(admin) = &ctx.config.borrow().admin {
        for warning in admin.warnings() {
            tracing::warn!("{warning}");
        }
    }
    let listener = tls::AdminListener::new(listener, ctx.config.clone());
    let state = AdminState {
        ctx,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/status", get(status_json))
        .route("/status/history", get(history_json))
        .route("/status/debug", get(debug_json))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/-/reload", post(reload))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_credentials,
        ))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

/// With `[admin.auth]`, a request without the right credentials gets 401 and a challenge.
async fn require_credentials(
    State(s): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    if auth::OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let configured = {
        let config = s.ctx.config.borrow();
        config.admin.as_ref().and_then(|a| a.auth.clone())
    };
    let Some(configured) = configured else {
        return next.run(request).await;
    };
    let credentials = match configured.credentials() {
        Ok(c) => c,
        Err((key, message)) => {
            // `check` verified the variable; it cannot vanish from a running process.
            tracing::error!(%key, %message, "admin endpoint: credentials unavailable");
            return (StatusCode::SERVICE_UNAVAILABLE, "credentials unavailable\n").into_response();
        }
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth::allows(&credentials, given) {
        return next.run(request).await;
    }
    tracing::debug!(path = %request.uri().path(), "admin endpoint: request without valid credentials");
    let challenge = HeaderValue::from_static(auth::challenge(&credentials));
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        "unauthorized\n",
    )
        .into_response()
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, page_policy()),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

fn json(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn to_json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json(body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn status_json(State(s): State<AdminState>) -> Response {
    let config = s.ctx.config.borrow().clone();
    let status = status::build(&status::Inputs {
        metrics: &s.ctx.metrics,
        buffer: &s.ctx.buffer,
        config: &config,
        ready: s.ctx.ready.load(Ordering::Relaxed) && !s.shutdown.is_cancelled(),
        stalled_after: s.stalled_after(),
    });
    to_json(&status)
}

async fn history_json(State(s): State<AdminState>) -> Response {
    let history = serde_json::json!({
        "interval_seconds": status::history::SAMPLE_EVERY.as_secs(),
        "points": s.ctx.metrics.live.history.points(),
    });
    to_json(&history)
}

async fn debug_json(State(s): State<AdminState>) -> Response {
    let events = serde_json::json!({ "events": s.ctx.metrics.live.debug_events.events() });
    to_json(&events)
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
async fn reload(
    State(s): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> (StatusCode, String) {
    use crate::reload::ReloadError;
    // Browsers send Origin with every POST; `edgegate reload` and curl do not. A page in a
    // technician's browser (which resends basic credentials) must not reload the gateway.
    if headers.contains_key(axum::http::header::ORIGIN) {
        let body = serde_json::json!({ "error": "reloads are not taken from a web page; use edgegate reload or systemctl reload" });
        return (StatusCode::FORBIDDEN, format!("{body}\n"));
    }
    if let Some(named) = named_config(&headers) {
        if !same_file(&named, &s.ctx.config_path) {
            let error = format!(
                "this gateway runs {}, not {}; nothing was reloaded",
                s.ctx.config_path.display(),
                named.display()
            );
            let body = serde_json::json!({ "error": error });
            return (StatusCode::CONFLICT, format!("{body}\n"));
        }
    }
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
