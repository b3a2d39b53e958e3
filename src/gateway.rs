//! Wires the stages together: sources → buffer → forwarder, with one shutdown token.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminError};
use crate::backoff::Backoff;
use crate::buffer::{self, Buffer, BufferError};
use crate::config::{Config, ConfigError, SourceConfig};
use crate::converter::{self, Converters};
use crate::downlink::{self, DownlinkError, Outlet, Outlets};
use crate::forwarder::{self, ForwarderError};
use crate::kafka;
use crate::metrics::Metrics;
use crate::sources::mqtt::{self, MqttError, MqttOutlet, SourceContext};
use crate::sources::serial::{self, SerialContext, SerialError, SerialOutlet};
use crate::watchdog;

/// A source that stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// An MQTT source cannot start (TLS files); fix its configuration.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// A serial source stopped; it only does so at shutdown.
    #[error(transparent)]
    Serial(#[from] SerialError),
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration or its environment (data_dir, TLS files) is unusable: exit 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The buffer cannot be opened: exit 2 for data_dir/lock problems, 1 otherwise.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// A source cannot start: exit 2.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The admin endpoint cannot listen: exit 2.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The forwarder failed fatally: exit 1, systemd restarts us, the buffer keeps every record.
    #[error(transparent)]
    Forwarder(#[from] ForwarderError),
    /// The downlink cannot run with this configuration (Kafka client settings, encoder): exit 2.
    #[error(transparent)]
    Downlink(#[from] DownlinkError),
    /// The buffer or the forwarder ended while the gateway was running, or panicked: exit 1,
    /// systemd restarts us, the buffer keeps every record.
    #[error("the {stage} stopped unexpectedly: {reason}")]
    StageEnded { stage: &'static str, reason: String },
}

impl GatewayError {
    /// Process exit status: 2 for anything the operator must fix in config or environment.
    pub fn exit_code(&self) -> i32 {
        match self {
            GatewayError::Config(_)
            | GatewayError::Source(_)
            | GatewayError::Admin(_)
            | GatewayError::Downlink(_)
            | GatewayError::Buffer(BufferError::DataDir { .. } | BufferError::Locked(_)) => 2,
            _ => 1,
        }
    }
}

/// Everything `edgegate check` verifies beyond parsing: guarantees, librdkafka properties, data_dir.
pub fn validate(config: &Config, path: &Path) -> Result<(), ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        line: None,
        message,
    };
    kafka::check_guarantees(config).map_err(|(k, m)| invalid(k, m))?;
    converter::load_all(config, None).map_err(|(k, e)| invalid(k, e.to_string()))?;
    converter::load_encoders(config).map_err(|(k, e)| invalid(k, e.to_string()))?;
    check_data_dir(&config.gateway.data_dir).map_err(|m| invalid("gateway.data_dir".into(), m))
}

/// data_dir must be a writable directory, or creatable inside one.
fn check_data_dir(dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    loop {
        match std::fs::metadata(probe) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", probe.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => probe = parent,
                _ => return Ok(()),
            },
            Err(e) => return Err(format!("{}: {e}", probe.display())),
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .map_err(|_| "path contains a NUL byte".to_owned())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let ok = unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK | libc::X_OK) } == 0;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not readable and writable: {}",
            probe.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Runs every stage until `shutdown` is cancelled (or a stage fails fatally), then stops them in
/// order: sources stop intake and ack what became durable, the buffer commits what it holds, the
/// forwarder waits for in-flight deliveries.
pub async fn run(
    config: Config,
    config_path: &Path,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_task = match &config.admin {
        Some(a) => {
            let listener = admin::bind(a.listen).await?;
            tracing::info!(listen = %a.listen, "admin endpoint listening");
            let (m, r) = (metrics.clone(), ready.clone());
            let task = admin::run(listener, m, r, a.stalled_after, shutdown.clone());
            Some(tokio::spawn(task))
        }
        None => None,
    };
    let (buffer, writer, intake) =
        Buffer::open(&config.gateway.data_dir, &config.buffer, metrics.clone())?;
    let stats = buffer.stats();
    tracing::info!(
        records = stats.records,
        bytes = stats.bytes,
        next_seq = stats.next_seq,
        "buffer open"
    );
    let converters =
        Converters::start(&config, metrics.clone()).map_err(|(key, e)| ConfigError::Invalid {
            path: config_path.to_owned(),
            key,
            line: None,
            message: e.to_string(),
        })?;
    let mut core = JoinSet::new();
    core.spawn({
        let committing = buffer::run(buffer.clone(), intake, shutdown.clone());
        async move { Core::Buffer(committing.await) }
    });
    core.spawn({
        let forwarding = forwarder::run(
            config.clone(),
            buffer.clone(),
            converters,
            metrics.clone(),
            shutdown.clone(),
        );
        async move { Core::Forwarder(forwarding.await) }
    });
    let mut sources = JoinSet::new();
    let mut outlets = Outlets::new();
    for (name, source) in &config.sources {
        let source_name: Arc<str> = Arc::from(name.as_str());
        let start: SourceStart = match source {
            SourceConfig::Mqtt(m) => {
                let (m, writer, metrics) = (m.clone(), writer.clone(), metrics.clone());
                let (name, client_id) = (source_name.clone(), config.mqtt_client_id(name, &m));
                let outlet = MqttOutlet::default();
                outlets.insert(source_name.to_string(), Outlet::Mqtt(outlet.clone()));
                Box::new(move |shutdown| {
                    let ctx = SourceContext {
                        name: name.clone(),
                        client_id: client_id.clone(),
                        writer: writer.clone(),
                        metrics: metrics.clone(),
                        outlet: outlet.clone(),
                    };
                    let task = mqtt::run(m.clone(), ctx, shutdown);
                    Box::pin(async move { task.await.map_err(SourceError::from) })
                })
            }
            SourceConfig::Serial(s) => {
                let (s, writer, metrics) = (s.clone(), writer.clone(), metrics.clone());
                let name = source_name.clone();
                let outlet = SerialOutlet::default();
                outlets.insert(source_name.to_string(), Outlet::Serial(outlet.clone()));
                Box::new(move |shutdown| {
                    let (ctx, handle) =
                        SerialContext::new(name.clone(), writer.clone(), metrics.clone());
                    outlet.set(handle);
                    let task = serial::run(s.clone(), ctx, shutdown);
                    Box::pin(async move { task.await.map_err(SourceError::from) })
                })
            }
        };
        let supervised = supervise(source_name, start, metrics.clone(), shutdown.clone());
        sources.spawn(supervised);
    }
    drop(writer);
    core.spawn({
        let downlink =
            supervise_downlink(config.clone(), outlets, metrics.clone(), shutdown.clone());
        async move { Core::Downlink(downlink.await) }
    });
    ready.store(true, Ordering::Relaxed);
    tracing::info!(sources = config.sources.len(), gateway = %config.gateway.id, "edgegate ready");
    watchdog::notify_ready(&format!(
        "{} sources, {} records buffered",
        config.sources.len(),
        stats.records
    ));
    let watchdog_task = watchdog::interval().map(|interval| {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled"
        );
        let health = HealthOf(metrics.clone());
        tokio::spawn(watchdog::run(health, interval, shutdown.clone()))
    });

    let mut failure: Option<GatewayError> = None;
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        // A supervised source ends before shutdown only with an error it cannot recover from
        // (its configuration); first, so that its cause wins over the buffer's end it brings.
        Some(joined) = sources.join_next() => {
            failure = Some(match joined {
                Ok(Err(e)) => e.into(),
                Ok(Ok(())) => GatewayError::StageEnded { stage: "source", reason: "ended before shutdown".into() },
                Err(e) => GatewayError::StageEnded { stage: "source supervisor", reason: e.to_string() },
            });
            shutdown.cancel();
        }
        Some(joined) = core.join_next() => {
            // Before shutdown, even a clean end of the buffer or the forwarder is a failure; a
            // stage that ended cleanly because shutdown came meanwhile is not.
            failure = match core_failure(joined) {
                Ok(e) => Some(e),
                Err(_) if shutdown.is_cancelled() => None,
                Err(stage) => Some(GatewayError::StageEnded {
                    stage,
                    reason: "ended before shutdown".into(),
                }),
            };
            shutdown.cancel();
        }
    }
    tracing::info!("shutting down");
    watchdog::notify_stopping();
    if let Some(task) = watchdog_task {
        task.abort();
    }
    while let Some(joined) = sources.join_next().await {
        if let Ok(Err(e)) = joined {
            failure.get_or_insert(e.into());
        }
    }
    while let Some(joined) = core.join_next().await {
        if let Ok(e) = core_failure(joined) {
            failure.get_or_insert(e);
        }
    }
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    let stats = buffer.stats();
    tracing::info!(
        buffered = stats.records,
        delivered = metrics.records_out.get(),
        dropped = metrics.dropped_total(),
        "stopped; undelivered records stay buffered"
    );
    failure.map_or(Ok(()), Err)
}

/// Starts one run of a source until the shutdown token it is given.
type SourceStart = Box<
    dyn FnMut(
            CancellationToken,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send>,
        > + Send,
>;

/// First and longest wait before a source that died is started again.
const SOURCE_RESTART_MIN: Duration = Duration::from_secs(1);
const SOURCE_RESTART_MAX: Duration = Duration::from_secs(60);

/// Runs a source until shutdown, starting it again (with backoff) when its task ends early or
/// panics: one device's bug must not take the other devices down, nor leave its own source dead
/// while the gateway reports ready. An error the source returns (its configuration is unusable)
/// ends the gateway.
async fn supervise(
    name: Arc<str>,
    mut start: SourceStart,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let mut backoff = Backoff::new(SOURCE_RESTART_MIN, SOURCE_RESTART_MAX);
    loop {
        let started = std::time::Instant::now();
        let joined = tokio::spawn(start(shutdown.clone())).await;
        match joined {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) if shutdown.is_cancelled() => return Ok(()),
            Ok(Ok(())) => {
                tracing::error!(source = %name, "source stopped unexpectedly; restarting")
            }
            Err(e) => tracing::error!(source = %name, error = %e, "source task failed; restarting"),
        }
        metrics.set_source_connected(&name, false);
        metrics.count_source_restart(&name);
        if started.elapsed() > SOURCE_RESTART_MAX {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Runs the downlink until shutdown, starting it again from the committed offsets after a
/// failure of its own (a panic); a configuration it cannot use ends the gateway.
async fn supervise_downlink(
    config: Arc<Config>,
    outlets: Outlets,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), DownlinkError> {
    let mut backoff = Backoff::new(SOURCE_RESTART_MIN, SOURCE_RESTART_MAX);
    loop {
        let stage_shutdown = shutdown.child_token();
        let task = tokio::spawn(downlink::run(
            config.clone(),
            outlets.clone(),
            metrics.clone(),
            stage_shutdown,
        ));
        let reason = match task.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(DownlinkError::Failed(reason))) => reason,
            Ok(Err(fatal)) => return Err(fatal),
            Err(e) => e.to_string(),
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::error!(%reason, "downlink failed; restarting from the committed offsets");
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The pipeline's health, which lives in the metrics, lent to the watchdog without it knowing
/// the metrics.
struct HealthOf(Arc<Metrics>);

impl std::ops::Deref for HealthOf {
    type Target = watchdog::Health;

    fn deref(&self) -> &watchdog::Health {
        &self.0.health
    }
}

/// What a core stage's task ended with.
enum Core {
    Buffer(Result<(), BufferError>),
    Forwarder(Result<(), ForwarderError>),
    Downlink(Result<(), DownlinkError>),
}

/// The failure a core stage ended with, or the name of a stage that ended cleanly.
fn core_failure(
    joined: Result<Core, tokio::task::JoinError>,
) -> Result<GatewayError, &'static str> {
    match joined {
        Ok(Core::Buffer(Ok(()))) => Err("buffer"),
        Ok(Core::Forwarder(Ok(()))) => Err("forwarder"),
        Ok(Core::Downlink(Ok(()))) => Err("downlink"),
        Ok(Core::Downlink(Err(e))) => Ok(e.into()),
        Ok(Core::Buffer(Err(e))) => Ok(e.into()),
        Ok(Core::Forwarder(Err(e))) => Ok(e.into()),
        Err(e) => {
            tracing::error!(error = %e, "buffer or forwarder task panicked");
            Ok(GatewayError::StageEnded {
                stage: "buffer or forwarder",
                reason: e.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn a_source_that_panics_is_started_again_and_stops_at_shutdown() {
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let start: SourceStart = Box::new(move |shutdown: CancellationToken| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                assert!(n > 0, "first run fails");
                shutdown.cancelled().await;
                Ok(())
            })
        });
        let task = tokio::spawn(supervise(
            "dev".into(),
            start,
            metrics.clone(),
            shutdown.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while starts.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "never restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(metrics
            .encode()
            .contains("edgegate_source_restarts_total{source=\"dev\"} 1"));
        shutdown.cancel();
        assert!(task.await.unwrap().is_ok());
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_source_error_is_returned_instead_of_a_restart() {
        let start: SourceStart = Box::new(|_| {
            Box::pin(async { Err(SourceError::Serial(SerialError::NotOpen("/dev/x".into()))) })
        });
        let supervised = supervise(
            "dev".into(),
            start,
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        );
        assert!(supervised.await.is_err());
    }
}
