//! Wires the stages together: sources → buffer → forwarder, with one shutdown token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminContext, AdminError};
use crate::backoff::Backoff;
use crate::buffer::{self, Buffer, BufferError, BufferWriter};
use crate::config::{Config, ConfigError, DownlinkConfig, SourceConfig};
use crate::converter::{self, Converters};
use crate::downlink::{self, DownlinkError, Outlet, Outlets};
use crate::forwarder::{self, ForwarderError};
use crate::kafka;
use crate::metrics::Metrics;
use crate::reload::{Changes, ReloadError, ReloadHandle, ReloadRequest, ReloadSummary};
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
        line: config.line_of_key(&key),
        key,
        message,
    };
    kafka::check_guarantees(config).map_err(|(k, m)| invalid(k, m))?;
    converter::load_all(config, None).map_err(|(k, e)| invalid(k, e.to_string()))?;
    converter::load_encoders(config).map_err(|(k, e)| invalid(k, e.to_string()))?;
    downlink::check_consumer(config).map_err(|m| invalid("kafka.properties".into(), m))?;
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

/// Reads `path` and makes every check `edgegate check` makes; the one way a configuration is
/// loaded, at start-up and for a reload.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    validate(&config, path)?;
    Ok(config)
}

/// Runs every stage until `shutdown` is cancelled (or a stage fails fatally), then stops them in
/// order: sources stop intake and ack what became durable, the buffer commits what it holds, the
/// forwarder waits for in-flight deliveries. Reload requests re-read `config_path` meanwhile.
pub async fn run(
    config: Config,
    config_path: &Path,
    shutdown: CancellationToken,
    reload: ReloadHandle,
    mut reloads: mpsc::Receiver<ReloadRequest>,
) -> Result<(), GatewayError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener = match &config.admin {
        Some(a) => Some((a.listen, admin::bind(a.listen).await?)),
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
            line: config.line_of_key(&key),
            key,
            message: e.to_string(),
        })?;
    let (config_tx, config_rx) = watch::channel(config.clone());
    let admin_ctx = AdminContext {
        metrics: metrics.clone(),
        ready: ready.clone(),
        buffer: buffer.clone(),
        config: config_rx,
        config_path: config_path.to_owned(),
        reload,
    };
    admin::spawn_background(&admin_ctx, &shutdown);
    let mut core = JoinSet::new();
    core.spawn({
        let committing = buffer::run(buffer.clone(), intake, shutdown.clone());
        async move { Core::Buffer(committing.await) }
    });
    let (forwarder_tx, forwarder_rx) = mpsc::channel(1);
    core.spawn({
        let forwarding = forwarder::run(
            config.clone(),
            buffer.clone(),
            converters,
            metrics.clone(),
            forwarder_rx,
            shutdown.clone(),
        );
        async move { Core::Forwarder(forwarding.await) }
    });
    let (fatal_tx, mut fatal) = mpsc::unbounded_channel();
    let mut pipeline = Pipeline {
        path: config_path.to_owned(),
        encoder_script: encoder_script(&config),
        config,
        config_tx,
        metrics: metrics.clone(),
        writer: Some(writer),
        sources: BTreeMap::new(),
        outlets: Outlets::new(),
        fatal: fatal_tx,
        forwarder: forwarder_tx,
        downlink: None,
        admin_ctx,
        admin: None,
        shutdown: shutdown.clone(),
    };
    let names: Vec<String> = pipeline.config.sources.keys().cloned().collect();
    for name in names {
        pipeline.start_source(&name);
    }
    pipeline.start_downlink();
    if let Some((listen, listener)) = admin_listener {
        tracing::info!(%listen, "admin endpoint listening");
        pipeline.start_admin(listen, listener);
    }
    ready.store(true, Ordering::Relaxed);
    let source_count = pipeline.config.sources.len();
    tracing::info!(sources = source_count, gateway = %pipeline.config.gateway.id, "edgegate ready");
    watchdog::notify_ready(&format!(
        "{source_count} sources, {} records buffered",
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
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // A supervised source or the downlink sends an error only when it cannot recover
            // (its configuration); first, so that its cause wins over the buffer's end it brings.
            Some(e) = fatal.recv() => {
                failure = Some(e);
                shutdown.cancel();
                break;
            }
            Some(joined) = core.join_next() => {
                // Before shutdown, even a clean end of the buffer or the forwarder is a failure;
                // a stage that ended cleanly because shutdown came meanwhile is not.
                failure = match core_failure(joined) {
                    Ok(e) => Some(e),
                    Err(_) if shutdown.is_cancelled() => None,
                    Err(stage) => Some(GatewayError::StageEnded {
                        stage,
                        reason: "ended before shutdown".into(),
                    }),
                };
                shutdown.cancel();
                break;
            }
            Some(request) = reloads.recv() => {
                // Shutdown wins over a reload that waits on a peer (a broker that does not answer).
                tokio::select! {
                    outcome = pipeline.reload() => {
                        let _ = request.reply.send(outcome);
                    }
                    _ = shutdown.cancelled() => {
                        let _ = request.reply.send(Err(ReloadError::Unavailable));
                        break;
                    }
                }
            }
        }
    }
    tracing::info!("shutting down");
    watchdog::notify_stopping();
    if let Some(task) = watchdog_task {
        task.abort();
    }
    drop(reloads);
    pipeline.stop().await;
    while let Ok(e) = fatal.try_recv() {
        failure.get_or_insert(e);
    }
    while let Some(joined) = core.join_next().await {
        if let Ok(e) = core_failure(joined) {
            failure.get_or_insert(e);
        }
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

/// A stage started with a token of its own, so that a reload can stop it alone.
struct Running<T> {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<T>,
}

/// How long shutdown lets the admin endpoint finish its open requests before it drops them.
const ADMIN_STOP_WAIT: Duration = Duration::from_secs(2);

/// How long a reload waits for a stage it replaces to stop before it starts the new one anyway.
const STAGE_STOP_WAIT: Duration = Duration::from_secs(10);

impl<T> Running<T> {
    async fn stop(self) -> Option<T> {
        self.stop.cancel();
        self.task.await.ok()
    }

    /// Stops the stage, waiting at most [`STAGE_STOP_WAIT`]: a stage stuck on a peer is left
    /// to finish on its own (it was told to stop) rather than holding up the reload.
    async fn stop_within(self, stage: &str) {
        self.stop.cancel();
        if tokio::time::timeout(STAGE_STOP_WAIT, self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                stage,
                "a stage did not stop within 10 s; the reload goes on without waiting for it"
            );
        }
    }
}

/// The stages a reload may stop and start again, and what they were started with. The buffer
/// and the forwarder (which reloads itself in place) run outside it.
struct Pipeline {
    path: PathBuf,
    config: Arc<Config>,
    config_tx: watch::Sender<Arc<Config>>,
    /// The downlink encoder's script text: a reload that changes only it restarts the downlink.
    encoder_script: Option<Vec<u8>>,
    metrics: Arc<Metrics>,
    /// Held for sources a reload adds; dropped at shutdown, which ends the buffer's intake.
    writer: Option<BufferWriter>,
    sources: BTreeMap<String, Running<()>>,
    outlets: Outlets,
    fatal: mpsc::UnboundedSender<GatewayError>,
    forwarder: mpsc::Sender<forwarder::Reload>,
    downlink: Option<Running<()>>,
    admin_ctx: AdminContext,
    admin: Option<(SocketAddr, Running<()>)>,
    shutdown: CancellationToken,
}

impl Pipeline {
    fn start_source(&mut self, name: &str) {
        let (Some(source), Some(writer)) = (self.config.sources.get(name), &self.writer) else {
            return;
        };
        let source_name: Arc<str> = Arc::from(name);
        let metrics = self.metrics.clone();
        let start: SourceStart = match source {
            SourceConfig::Mqtt(m) => {
                let (m, writer, metrics) = (m.clone(), writer.clone(), metrics.clone());
                let (name, client_id) = (source_name.clone(), self.config.mqtt_client_id(name, &m));
                let outlet = MqttOutlet::default();
                self.outlets
                    .insert(source_name.to_string(), Outlet::Mqtt(outlet.clone()));
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
                self.outlets
                    .insert(source_name.to_string(), Outlet::Serial(outlet.clone()));
                Box::new(move |shutdown| {
                    let (ctx, handle) =
                        SerialContext::new(name.clone(), writer.clone(), metrics.clone());
                    outlet.set(handle);
                    let task = serial::run(s.clone(), ctx, shutdown);
                    Box::pin(async move { task.await.map_err(SourceError::from) })
                })
            }
        };
        let stop = self.shutdown.child_token();
        let fatal = self.fatal.clone();
        let supervised = supervise(source_name, start, metrics, stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = supervised.await {
                let _ = fatal.send(e.into());
            }
        });
        self.sources.insert(name.to_owned(), Running { stop, task });
    }

    fn start_downlink(&mut self) {
        let stop = self.shutdown.child_token();
        let fatal = self.fatal.clone();
        let supervised = supervise_downlink(
            self.config.clone(),
            self.outlets.clone(),
            self.metrics.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = supervised.await {
                let _ = fatal.send(e.into());
            }
        });
        self.downlink = Some(Running { stop, task });
    }

    fn start_admin(&mut self, listen: SocketAddr, listener: tokio::net::TcpListener) {
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(admin::run(listener, self.admin_ctx.clone(), stop.clone()));
        self.admin = Some((listen, Running { stop, task }));
    }

    /// Re-reads the configuration file and applies it, or refuses it whole; see [`crate::reload`].
    async fn reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        let started = Instant::now();
        watchdog::notify_reloading();
        tracing::info!(path = %self.path.display(), "reloading the configuration");
        let outcome = self.apply_reload(started).await;
        match &outcome {
            Ok(summary) => tracing::info!(
                applied = %summary.applied.join(", "),
                took_ms = summary.took.as_millis() as u64,
                "configuration reloaded"
            ),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays in force")
            }
        }
        let status = match &outcome {
            Ok(_) => format!(
                "{} sources; configuration reloaded",
                self.config.sources.len()
            ),
            Err(_) => format!(
                "{} sources; last reload refused (see the log)",
                self.config.sources.len()
            ),
        };
        watchdog::notify_ready(&status);
        outcome
    }

    async fn apply_reload(&mut self, started: Instant) -> Result<ReloadSummary, ReloadError> {
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || load(&path))
            .await
            .map_err(|_| ReloadError::Unavailable)??;
        let changes = Changes::between(&self.config.document.table, &new.document.table);
        if !changes.restart_only.is_empty() {
            return Err(ReloadError::NeedsRestart(changes.restart_only));
        }
        // Everything that can fail is tried before anything is applied.
        let new_listen = new.admin.as_ref().map(|a| a.listen);
        let current_listen = self.admin.as_ref().map(|(listen, _)| *listen);
        let listener = match new_listen {
            Some(listen) if Some(listen) != current_listen => Some(
                admin::bind(listen)
                    .await
                    .map_err(|e| ReloadError::Refused {
                        key: "admin.listen".into(),
                        message: e.to_string(),
                    })?,
            ),
            _ => None,
        };
        let new = Arc::new(new);
        let mut applied = Vec::new();
        let (reply, answer) = oneshot::channel();
        let forwarder = forwarder::Reload {
            config: new.clone(),
            kafka_changed: changes.kafka,
            applied: reply,
        };
        self.forwarder
            .send(forwarder)
            .await
            .map_err(|_| ReloadError::Unavailable)?;
        answer
            .await
            .map_err(|_| ReloadError::Unavailable)?
            .map_err(|message| ReloadError::Refused {
                key: "converters".into(),
                message,
            })?;
        applied.push(if changes.kafka {
            "converters, kafka (producer recreated)".to_owned()
        } else {
            "converters".to_owned()
        });
        let old = std::mem::replace(&mut self.config, new.clone());
        for name in &changes.sources {
            let stopped = self.sources.remove(name);
            let was_running = stopped.is_some();
            if let Some(running) = stopped {
                running.stop_within(&format!("sources.{name}")).await;
                self.outlets.remove(name);
                self.metrics.set_source_connected(name, false);
            }
            self.start_source(name);
            let verb = match (was_running, self.sources.contains_key(name)) {
                (true, true) => "restarted",
                (true, false) => "removed",
                _ => "added",
            };
            applied.push(format!("sources.{name} ({verb})"));
        }
        // Only what the downlink uses restarts it: a restart delivers again the commands
        // delivered since its last offset commit.
        let encoder_script = encoder_script(&new);
        let uses = |config: &Config, pred: &dyn Fn(&DownlinkConfig) -> bool| {
            config.downlink.as_ref().is_some_and(pred)
        };
        let encoder_changed = |d: &DownlinkConfig| {
            d.converter
                .as_ref()
                .is_some_and(|c| changes.converters.contains(c))
        };
        let target_changed =
            |d: &DownlinkConfig| d.routes.iter().any(|r| changes.sources.contains(&r.source));
        let downlink_changed = changes.downlink
            || changes.kafka
            || encoder_script != self.encoder_script
            || uses(&old, &encoder_changed)
            || uses(&old, &target_changed)
            || uses(&new, &target_changed);
        if downlink_changed && (old.downlink.is_some() || new.downlink.is_some()) {
            if let Some(running) = self.downlink.take() {
                running.stop_within("downlink").await;
            }
            self.start_downlink();
            applied.push("downlink (restarted)".into());
        }
        self.encoder_script = encoder_script;
        // Other admin settings are read from the configuration in force at each request.
        let admin_moves = listener.is_some() || (new_listen.is_none() && self.admin.is_some());
        if admin_moves {
            // Not awaited: the old server finishes its open requests, which may include the
            // `POST /-/reload` waiting for this very reload.
            if let Some((_, running)) = self.admin.take() {
                running.stop.cancel();
            }
            if let (Some(listen), Some(listener)) = (new_listen, listener) {
                tracing::info!(%listen, "admin endpoint listening");
                self.start_admin(listen, listener);
            }
        }
        if changes.admin {
            // What start-up warns about (beyond loopback without auth or TLS), a reload does too.
            for warning in new.admin.iter().flat_map(|a| a.warnings()) {
                tracing::warn!("{warning}");
            }
            applied.push("admin".into());
        }
        let _ = self.config_tx.send(new);
        // Milliseconds are what an operator reads; nanoseconds would be noise in the log.
        let took = Duration::from_millis(started.elapsed().as_millis().max(1) as u64);
        Ok(ReloadSummary { applied, took })
    }

    /// Stops the sources first (no new intake; what became durable is acknowledged), then the
    /// downlink and the admin endpoint; the buffer's intake ends with the last writer.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        self.writer = None;
        for (_, running) in std::mem::take(&mut self.sources) {
            running.stop().await;
        }
        if let Some(running) = self.downlink.take() {
            running.stop().await;
        }
        if let Some((_, running)) = self.admin.take() {
            // Open requests get a moment; a client that stalls must not hold up the stop.
            running.stop.cancel();
            let mut task = running.task;
            if tokio::time::timeout(ADMIN_STOP_WAIT, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

/// The text of the downlink encoder's script, if there is one and it can be read.
fn encoder_script(config: &Config) -> Option<Vec<u8>> {
    let name = config.downlink.as_ref()?.converter.as_ref()?;
    std::fs::read(&config.converters.get(name)?.script).ok()
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
}

/// The failure a core stage ended with, or the name of a stage that ended cleanly.
fn core_failure(
    joined: Result<Core, tokio::task::JoinError>,
) -> Result<GatewayError, &'static str> {
    match joined {
        Ok(Core::Buffer(Ok(()))) => Err("buffer"),
        Ok(Core::Forwarder(Ok(()))) => Err("forwarder"),
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
