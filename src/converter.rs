//! ThingsBoard-compatible converters. Uplink: a decoder script turns a raw record into device and
//! asset entities, each sent to Kafka as one normalized JSON record. Downlink: an encoder script
//! turns a Kafka command into messages for devices ([`encoder`]).
//!
//! Conversion happens on the forwarding path, so the buffer keeps raw records and a corrected
//! script applies to everything still buffered. QuickJS runtimes are not `Send`; all decoders
//! live on one dedicated thread ([`Converters`]) that the forwarder hands whole chunks to, and the
//! encoder on one of its own ([`encoder::Encoders`]).

mod crash;
mod debug;
pub mod encoder;
mod engine;
pub mod math;
mod normalize;
pub mod number;
mod read;
pub mod text;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use tokio::sync::oneshot;

use crate::config::{Config, ConverterConfig, ConverterKind};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::watchdog::Stage;

use crate::config::DebugMode;
use crash::{CrashLog, StopHandle};
use debug::{DebugEvent, DebugLog, Direction};
pub use encoder::{ContentType, Downlink, EncodeJob, Encoders};
use engine::{Converted, Engine, EngineError, Limits};
pub use normalize::{normalize, Entity};

/// A converter that cannot be set up. Fatal at start-up; `edgegate check` reports it.
#[derive(Debug, thiserror::Error)]
pub enum ConverterError {
    /// The script file cannot be read; fix `converters.<name>.script` or its permissions.
    #[error("{path}: cannot read script: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The script does not compile; the message names the file and line.
    #[error("{path}:{}: {message}", line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Compile {
        path: PathBuf,
        line: Option<u32>,
        message: String,
    },
    /// The converter thread could not be started; the system is out of resources.
    #[error("cannot start the converter thread: {0}")]
    Thread(std::io::Error),
}

/// Why one record could not be converted. [`ConvertError::is_transient`] failures say nothing
/// about the record: hold it (and everything after it) and convert it again after
/// [`ConvertError::retry_in`]. The others are the record's own: it goes to the dead-letter topic
/// when one is configured, otherwise it is counted and dropped, and the pipeline moves on.
/// Encoders fail a command with the same errors, never a transient one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The script threw an exception.
    #[error("script error: {0}")]
    Exception(String),
    /// The script does not finish on this record: a decoder ran past its `timeout`
    /// [`TIMEOUT_ATTEMPTS`] times, the attempts `timeout_retry_delay` apart; an encoder ran past
    /// it once (encoders do not pause and retry).
    #[error("script timed out after {0:?}")]
    Timeout(Duration),
    /// The script ran past its `timeout`, which a busy machine can cause as well as the record:
    /// transient, retry the record after `retry_in`.
    #[error("script timed out after {timeout:?}; retried in {retry_in:?}")]
    TimedOut {
        timeout: Duration,
        retry_in: Duration,
    },
    /// The script allocated past its `memory_limit`.
    #[error("script exceeded its memory limit of {0}")]
    OutOfMemory(ByteSize),
    /// The script returned something that is not a ThingsBoard uplink (decoder) or downlink
    /// (encoder) result; the message names the element and key.
    #[error("invalid result: {0}")]
    InvalidResult(String),
    /// Converting this record panicked (a bug in edgegate or in QuickJS); the runtime is
    /// recreated and the record given up like a script error, rather than taking the converter
    /// thread, and with it the process, down on every restart.
    #[error("converter panicked: {0}")]
    Panicked(String),
    /// Converting this record ended the process twice (a crash in the script engine, the
    /// watchdog aborting a script stuck past `WatchdogSec`, an out-of-memory kill); it is given up
    /// without running again rather than crash-looping the gateway.
    #[error("converting this record ended the process twice; not run again")]
    Crashed,
    /// The converter is paused after a timeout on another record, so the record was not run:
    /// transient, retry it when the pause ends (in the duration given).
    #[error("converter paused for {0:?} after a timeout")]
    Suspended(Duration),
}

/// Timeouts of the same record after which the record, not the machine, is to blame.
pub const TIMEOUT_ATTEMPTS: u32 = 3;

/// Pauses a converter after a timeout so that the record is tried again later, when a stall of
/// the machine may be over, and counts the attempts of that record.
#[derive(Debug, Default)]
struct Breaker {
    /// The record that timed out last, and how many times it has.
    timed_out: Option<(u64, u32)>,
    paused_until: Option<Instant>,
}

impl Breaker {
    fn check(&mut self, name: &str) -> Result<(), ConvertError> {
        let Some(until) = self.paused_until else {
            return Ok(());
        };
        let left = until.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            return Err(ConvertError::Suspended(left));
        }
        tracing::info!(converter = name, "converter resumed after its pause");
        self.paused_until = None;
        Ok(())
    }

    /// What a timeout of record `seq` means: transient (and a pause) until the same record has
    /// timed out [`TIMEOUT_ATTEMPTS`] times.
    fn timed_out(
        &mut self,
        name: &str,
        seq: u64,
        timeout: Duration,
        delay: Duration,
    ) -> ConvertError {
        let attempts = match self.timed_out {
            Some((s, n)) if s == seq => n + 1,
            _ => 1,
        };
        if attempts >= TIMEOUT_ATTEMPTS {
            self.timed_out = None;
            return ConvertError::Timeout(timeout);
        }
        self.timed_out = Some((seq, attempts));
        self.paused_until = Some(Instant::now() + delay);
        tracing::warn!(
            converter = name,
            attempt = attempts,
            pause_s = delay.as_secs_f64(),
            "converter timed out on a record; paused, the record and everything after it wait"
        );
        ConvertError::TimedOut {
            timeout,
            retry_in: delay,
        }
    }
}

impl ConvertError {
    /// The metric label for this kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ConvertError::Exception(_) => "exception",
            ConvertError::Timeout(_) | ConvertError::TimedOut { .. } => "timeout",
            ConvertError::OutOfMemory(_) => "out_of_memory",
            ConvertError::InvalidResult(_) => "invalid_result",
            ConvertError::Panicked(_) => "panic",
            ConvertError::Crashed => "crash",
            ConvertError::Suspended(_) => "suspended",
        }
    }

    /// When the record must be converted again rather than given up, and after how long.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            ConvertError::TimedOut { retry_in, .. } => Some(*retry_in),
            ConvertError::Suspended(left) => Some(*left),
            _ => None,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.retry_in().is_some()
    }
}

/// What to send for one record.
#[derive(Debug)]
pub enum Conversion {
    /// The source has no converter: forward the raw payload.
    Raw,
    /// Zero (the script returned null) or more entities, each one Kafka record.
    Entities {
        converter: Arc<str>,
        entities: Vec<EncodedEntity>,
    },
    /// The script failed on this record.
    Failed {
        converter: Arc<str>,
        error: ConvertError,
    },
}

/// A normalized entity ready for Kafka.
#[derive(Debug)]
pub struct EncodedEntity {
    pub key: String,
    pub value: Vec<u8>,
}

/// A script, its limits and the runtime that runs it: what decoders and encoders share. The
/// runtime is recreated after a failure that may have left it in any state.
struct Sandbox {
    kind: ConverterKind,
    path: PathBuf,
    source: String,
    limits: Limits,
    engine: Option<Engine>,
}

impl Sandbox {
    /// Reads the script and compiles it as `kind`.
    fn load(kind: ConverterKind, config: &ConverterConfig) -> Result<Sandbox, ConverterError> {
        let source =
            std::fs::read_to_string(&config.script).map_err(|source| ConverterError::Read {
                path: config.script.clone(),
                source,
            })?;
        let mut sandbox = Sandbox {
            kind,
            path: config.script.clone(),
            source,
            limits: Limits {
                timeout: config.timeout,
                memory_bytes: config.memory_limit.as_u64() as usize,
            },
            engine: None,
        };
        sandbox.engine()?;
        Ok(sandbox)
    }

    fn engine(&mut self) -> Result<&mut Engine, ConverterError> {
        let engine = match self.engine.take() {
            Some(engine) => engine,
            None => {
                let filename = self.path.display().to_string();
                Engine::compile(self.kind, &self.source, &filename, self.limits).map_err(|e| {
                    ConverterError::Compile {
                        path: self.path.clone(),
                        line: e.line,
                        message: e.message,
                    }
                })?
            }
        };
        Ok(self.engine.insert(engine))
    }

    /// Drops the runtime, whatever it was doing; the next call compiles the script afresh.
    fn reset(&mut self) {
        self.engine = None;
    }

    /// Runs the engine; a runtime left in an unknown state is dropped.
    fn run<R>(
        &mut self,
        call: impl FnOnce(&mut Engine) -> Result<R, EngineError>,
    ) -> Result<R, ConvertError> {
        let limits = self.limits;
        let engine = self
            .engine()
            .map_err(|e| ConvertError::Exception(e.to_string()))?;
        let result = call(engine);
        if result.as_ref().is_err_and(EngineError::poisons_runtime) {
            self.reset();
        }
        result.map_err(|e| match e {
            EngineError::Timeout => ConvertError::Timeout(limits.timeout),
            EngineError::OutOfMemory => {
                ConvertError::OutOfMemory(ByteSize::b(limits.memory_bytes as u64))
            }
            EngineError::Exception(m) => ConvertError::Exception(m),
        })
    }
}

/// The converter's debug log when `debug_dir` is given and its `debug` setting wants one.
fn debug_log(name: &str, config: &ConverterConfig, debug_dir: Option<&Path>) -> DebugLog {
    match debug_dir {
        Some(dir) if config.debug != DebugMode::Off => DebugLog::new(
            config.debug,
            dir.join(format!("{name}.jsonl")),
            config.debug_max_bytes.as_u64(),
        ),
        _ => DebugLog::disabled(),
    }
}

/// One configured decoder script and the runtime that runs it.
pub struct Converter {
    name: Arc<str>,
    sandbox: Sandbox,
    /// Shared so a record's metadata can borrow it while the script runs (`&mut self`).
    static_metadata: Arc<[(String, String)]>,
    debug: DebugLog,
    breaker: Breaker,
    timeout_retry_delay: Duration,
}

impl Converter {
    /// Reads and compiles the script as a decoder (whatever its `type`); `debug_dir` enables the
    /// debug log where configured.
    pub fn new(
        name: &str,
        config: &ConverterConfig,
        debug_dir: Option<&Path>,
    ) -> Result<Converter, ConverterError> {
        Ok(Converter {
            name: Arc::from(name),
            sandbox: Sandbox::load(ConverterKind::Decoder, config)?,
            static_metadata: static_metadata(config),
            debug: debug_log(name, config, debug_dir),
            breaker: Breaker::default(),
            timeout_retry_delay: config.timeout_retry_delay,
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The converter's own `metadata` table.
    pub fn static_metadata(&self) -> Arc<[(String, String)]> {
        self.static_metadata.clone()
    }

    /// Runs the script and returns its own result, unnormalized (`edgegate convert --raw`).
    /// Strings are in [`text`]'s carrying form: print the value with [`number::to_string_js`].
    pub fn run_raw(
        &mut self,
        payload: &[u8],
        metadata: &[(&str, &str)],
    ) -> Result<serde_json::Value, ConvertError> {
        self.run(|engine| engine.call(payload, metadata))?
            .ok_or_else(undefined_result)
    }

    /// Runs the script and normalizes its result; telemetry without ts gets `captured_ms`.
    pub fn convert(
        &mut self,
        payload: &[u8],
        metadata: &[(&str, &str)],
        captured_ms: u64,
    ) -> Result<Vec<Entity>, ConvertError> {
        match self.run(|engine| engine.convert(payload, metadata, captured_ms))? {
            Converted::Entities(entities) => Ok(entities),
            Converted::Result(None) => Err(undefined_result()),
            Converted::Result(Some(raw)) => {
                normalize(raw, captured_ms).map_err(ConvertError::InvalidResult)
            }
        }
    }

    /// Runs the engine (see [`Sandbox::run`]).
    fn run<R>(
        &mut self,
        call: impl FnOnce(&mut Engine) -> Result<R, EngineError>,
    ) -> Result<R, ConvertError> {
        self.sandbox.run(call)
    }

    /// Converts one buffered record, records a debug event, and encodes the entities.
    /// A paused converter does not run; a timeout pauses it (see [`Breaker`]).
    fn convert_record(&mut self, record: &Record, gateway_id: &str) -> Conversion {
        #[cfg(test)]
        if record.payload == tests::PANIC_PAYLOAD {
            panic!("a test asked for a panic");
        }
        if let Err(error) = self.breaker.check(&self.name) {
            return Conversion::Failed {
                converter: self.name.clone(),
                error,
            };
        }
        let static_meta = self.static_metadata.clone();
        let meta = script_metadata(&static_meta, &record.source, gateway_id, &record.meta);
        let result = match self.convert(&record.payload, &meta, record.captured_ms) {
            Err(ConvertError::Timeout(timeout)) => Err(self.breaker.timed_out(
                &self.name,
                record.seq,
                timeout,
                self.timeout_retry_delay,
            )),
            other => other,
        };
        self.record_debug(record, &meta, &result);
        match result {
            Ok(entities) => Conversion::Entities {
                converter: self.name.clone(),
                entities: entities.into_iter().map(encode).collect(),
            },
            Err(error) => Conversion::Failed {
                converter: self.name.clone(),
                error,
            },
        }
    }

    fn record_debug(
        &mut self,
        record: &Record,
        meta: &[(&str, &str)],
        result: &Result<Vec<Entity>, ConvertError>,
    ) {
        if result.is_ok() && !self.debug.wants_successes() {
            return;
        }
        let output = result
            .as_ref()
            .ok()
            .map(|entities| serde_json::Value::Array(entities.iter().map(Entity::value).collect()));
        let error = result.as_ref().err().map(ToString::to_string);
        self.debug.record(&DebugEvent {
            direction: Direction::Uplink,
            seq: record.seq,
            payload: &record.payload,
            metadata: meta,
            msg_type: None,
            output: output.as_ref(),
            error: error.as_deref(),
        });
    }
}

/// The converter's own `metadata` table, shared with each record's metadata while a script runs.
fn static_metadata(config: &ConverterConfig) -> Arc<[(String, String)]> {
    config
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn undefined_result() -> ConvertError {
    ConvertError::InvalidResult(
        "the decoder returned undefined; return an object, an array of objects, or null".into(),
    )
}

/// Makes decoders see dates as ThingsBoard's JavaScript executor does, in UTC, not in the board's
/// `/etc/localtime`: `getTimezoneOffset()` is 0, `new Date(2026, 0, 1)` is midnight UTC and
/// `toString()` ends in "(Coordinated Universal Time)". A `TZ` already in the environment
/// (`Environment=TZ=Europe/Berlin` in the unit) stays in force. Call it before any other thread
/// reads the environment (the C library's time functions read `TZ` without Rust's lock).
pub fn dates_in_utc_unless_tz_is_set() {
    if std::env::var_os("TZ").is_none() {
        std::env::set_var("TZ", "UTC");
    }
}

/// `integrationName` (the source name unless the converter sets it), the converter's own table,
/// what the source knows (`topic`, `port`), and `gatewayId`.
pub fn script_metadata<'a>(
    static_metadata: &'a [(String, String)],
    integration: &'a str,
    gateway_id: &'a str,
    source_meta: &'a [(String, String)],
) -> Vec<(&'a str, &'a str)> {
    let mut meta: Vec<(&str, &str)> = Vec::with_capacity(3 + static_metadata.len());
    if !static_metadata.iter().any(|(k, _)| k == "integrationName") {
        meta.push(("integrationName", integration));
    }
    meta.extend(
        static_metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    meta.extend(source_meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    meta.push(("gatewayId", gateway_id));
    meta
}

fn encode(entity: Entity) -> EncodedEntity {
    EncodedEntity {
        value: entity.json,
        // A key is plain text: a name with lone surrogates gets U+FFFD for them.
        key: text::into_well_formed(entity.name),
    }
}

/// The configured decoders, in the order [`load_all`] compiles them: [`Converters`] finds a
/// source's converter by its index here.
fn decoders(config: &Config) -> impl Iterator<Item = (&String, &ConverterConfig)> {
    config
        .converters
        .iter()
        .filter(|(_, c)| c.kind == ConverterKind::Decoder)
}

/// Compiles every configured decoder; `check` and start-up both use it. Encoders run elsewhere
/// ([`load_encoders`]).
pub fn load_all(
    config: &Config,
    debug_dir: Option<&Path>,
) -> Result<Vec<Converter>, (String, ConverterError)> {
    decoders(config)
        .map(|(name, c)| {
            Converter::new(name, c, debug_dir).map_err(|e| (format!("converters.{name}"), e))
        })
        .collect()
}

/// Compiles every configured encoder once, so that `check` names a broken one (its key, file and
/// line) before the downlink ever starts it.
pub fn load_encoders(config: &Config) -> Result<(), (String, ConverterError)> {
    config
        .converters
        .iter()
        .filter(|(_, c)| c.kind == ConverterKind::Encoder)
        .try_for_each(|(name, c)| {
            encoder::Encoder::new(name, c, None)
                .map(drop)
                .map_err(|e| (format!("converters.{name}"), e))
        })
}

struct Job {
    records: Vec<Record>,
    reply: oneshot::Sender<(Vec<Record>, Vec<Conversion>)>,
}

/// The converter thread, as the forwarder sees it.
pub struct Converters {
    // Dropping the sender ends the thread after its current job. It is not joined: a script
    // stuck until its timeout must not hold up shutdown.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    _thread: Option<std::thread::JoinHandle<()>>,
    by_source: HashMap<String, usize>,
    /// Marks the converter idle when the gateway stops cleanly.
    stop: Option<StopHandle>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl Drop for Converters {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            stop.stop();
        }
    }
}

/// The converter thread has gone (it panicked): [`Converters::restart`] it, and convert the chunk
/// it had again.
#[derive(Debug, thiserror::Error)]
#[error("the converter thread stopped")]
pub struct ConvertersGone;

impl Converters {
    /// Starts the thread and compiles every converter on it (QuickJS runtimes cannot move
    /// between threads). Sources without a converter forward raw records.
    pub fn start(
        config: &Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Result<Converters, (String, ConverterError)> {
        let mut converters = Converters {
            jobs: None,
            _thread: None,
            by_source: by_source(config),
            stop: None,
            config: config.clone(),
            metrics,
        };
        if !converters.by_source.is_empty() {
            converters.spawn()?;
        }
        Ok(converters)
    }

    /// Stops the converter thread and starts one with `config`'s converters (a reload), between
    /// two chunks. When the new ones cannot start, the old ones run again and the inner error
    /// says why; [`ConvertersGone`] when even they cannot (records must not pass unconverted).
    pub fn replace(
        &mut self,
        config: &Arc<Config>,
    ) -> Result<Result<(), (String, ConverterError)>, ConvertersGone> {
        let old = (self.config.clone(), std::mem::take(&mut self.by_source));
        // The old thread is idle between chunks; it must be stopped before the new one opens
        // the crash log, or the new one would take its last marker for a crash.
        self.stop_thread();
        self.by_source = by_source(config);
        // Records of a source the new file removed or renamed may still be buffered: they keep
        // their decoder while it is configured, rather than going to Kafka unconverted.
        for (source, &i) in &old.1 {
            if config.sources.contains_key(source) {
                continue;
            }
            let Some((name, _)) = decoders(&old.0).nth(i) else {
                continue;
            };
            if let Some(j) = decoders(config).position(|(c, _)| c == name) {
                self.by_source.insert(source.clone(), j);
            }
        }
        self.config = config.clone();
        if self.by_source.is_empty() {
            return Ok(Ok(()));
        }
        let Err(e) = self.spawn() else {
            return Ok(Ok(()));
        };
        self.stop_thread();
        (self.config, self.by_source) = old;
        if !self.by_source.is_empty() {
            self.spawn().map_err(|(_, again)| {
                tracing::error!(error = %again, "the previous converters cannot start again");
                ConvertersGone
            })?;
        }
        Ok(Err(e))
    }

    fn stop_thread(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.stop();
        }
        self.jobs = None;
        self._thread = None;
    }

    /// Starts a new converter thread after the last one died; its scripts compiled before.
    pub fn restart(&mut self) -> Result<(), ConvertersGone> {
        tracing::error!("the converter thread stopped; starting a new one");
        self.spawn().map_err(|(_, e)| {
            tracing::error!(error = %e, "the converter thread cannot be restarted");
            ConvertersGone
        })
    }

    fn spawn(&mut self) -> Result<(), (String, ConverterError)> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
        let crash = CrashLog::open(&self.config.gateway.data_dir);
        let stop = crash.stop_handle();
        let (config, metrics) = (self.config.clone(), self.metrics.clone());
        let routes = self.by_source.clone();
        let thread = std::thread::Builder::new()
            .name("edgegate-converter".into())
            .stack_size(engine::THREAD_STACK_BYTES)
            .spawn(move || {
                let debug_dir = config.gateway.data_dir.join("debug");
                let mut converters = match load_all(&config, Some(&debug_dir)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let _ = loaded_tx.send(Ok(()));
                for c in &mut converters {
                    let ring = metrics.live.debug_events.clone();
                    c.debug.share_with(&c.name, ring);
                }
                let mut worker = Worker {
                    converters,
                    by_source: routes,
                    gateway_id: config.gateway.id.clone(),
                    metrics,
                    crash,
                };
                while let Ok(job) = rx.recv() {
                    let conversions = worker.convert_records(&job.records);
                    let _ = job.reply.send((job.records, conversions));
                }
            })
            .map_err(|e| ("converters".to_owned(), ConverterError::Thread(e)))?;
        loaded_rx.recv().unwrap_or_else(|_| {
            Err((
                "converters".to_owned(),
                ConverterError::Thread(std::io::Error::other("converter thread died at start")),
            ))
        })?;
        self.jobs = Some(tx);
        self._thread = Some(thread);
        self.stop = Some(stop);
        Ok(())
    }

    /// Whether any of these records comes from a source with a converter.
    pub fn applies_to(&self, records: &[Record]) -> bool {
        !self.by_source.is_empty()
            && records
                .iter()
                .any(|r| self.by_source.contains_key(&r.source))
    }

    /// Converts a chunk on the converter thread; one [`Conversion`] per record, in order.
    pub async fn convert(
        &self,
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Conversion>), ConvertersGone> {
        let Some(jobs) = &self.jobs else {
            let raw = records.iter().map(|_| Conversion::Raw).collect();
            return Ok((records, raw));
        };
        let (reply, answer) = oneshot::channel();
        jobs.send(Job { records, reply })
            .map_err(|_| ConvertersGone)?;
        answer.await.map_err(|_| ConvertersGone)
    }
}

/// Each source with a converter, and the index of its decoder in `decoders(config)`.
fn by_source(config: &Config) -> HashMap<String, usize> {
    config
        .sources
        .iter()
        .filter_map(|(name, s)| {
            let i = decoders(config).position(|(c, _)| Some(c.as_str()) == s.converter())?;
            Some((name.clone(), i))
        })
        .collect()
}

struct Worker {
    converters: Vec<Converter>,
    by_source: HashMap<String, usize>,
    gateway_id: String,
    metrics: Arc<Metrics>,
    crash: CrashLog,
}

impl Worker {
    /// Converts records read together (one buffer chunk, in sequence order).
    fn convert_records(&mut self, records: &[Record]) -> Vec<Conversion> {
        #[cfg(test)]
        if records
            .iter()
            .any(|r| r.payload == tests::KILL_THREAD_PAYLOAD)
        {
            panic!("a test asked the converter thread to die");
        }
        let metrics = self.metrics.clone();
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Vec::new();
        };
        let range = first.seq..last.seq.saturating_add(1);
        self.crash.begin_chunk(&range);
        let conversions = records
            .iter()
            .map(|record| {
                let Some(&i) = self.by_source.get(&record.source) else {
                    return Conversion::Raw;
                };
                // Timed per record: a chunk of slow but valid records is progress, and a chunk
                // can take longer than the watchdog interval.
                let _running = metrics.health.begin(Stage::Conversion);
                let conversion = self.convert_logged(i, record, &range);
                let failed = match &conversion {
                    Conversion::Failed { converter, error } => Some((converter, error)),
                    _ => None,
                };
                // A paused converter's records did not fail, they wait.
                if let Some((converter, error)) =
                    failed.filter(|(_, e)| !matches!(e, ConvertError::Suspended(_)))
                {
                    metrics.converter_failed(converter, error.kind(), error.to_string());
                }
                conversion
            })
            .collect();
        self.crash.end_chunk(&range);
        for c in &mut self.converters {
            c.debug.flush();
        }
        conversions
    }

    /// Converts one record unless it ended the process twice (see [`CrashLog`]).
    fn convert_logged(&mut self, i: usize, record: &Record, chunk: &Range<u64>) -> Conversion {
        if self.crash.is_poison(record.seq) {
            return Conversion::Failed {
                converter: self.converters[i].name.clone(),
                error: ConvertError::Crashed,
            };
        }
        self.crash.begin_record(record.seq, chunk);
        self.convert_guarded(i, record)
    }

    /// Converts one record; a panic fails this record only (the release profile unwinds).
    fn convert_guarded(&mut self, i: usize, record: &Record) -> Conversion {
        let converter = &mut self.converters[i];
        let gateway_id = &self.gateway_id;
        let converted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            converter.convert_record(record, gateway_id)
        }));
        converted.unwrap_or_else(|panic| {
            let message = panic_message(&*panic);
            tracing::error!(converter = %converter.name, seq = record.seq, %message,
                "converter panicked on a record; the record fails, the runtime is recreated");
            // Whatever the runtime was doing is unfinished; start from a fresh one.
            converter.sandbox.reset();
            Conversion::Failed {
                converter: converter.name.clone(),
                error: ConvertError::Panicked(message),
            }
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into())
}

#[cfg(test)]
mod shortcut_tests;
#[cfg(test)]
mod tests;
