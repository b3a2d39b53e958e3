//! The forwarder: reads durable chunks from the buffer, produces their records to Kafka and
//! releases a chunk only once Kafka confirmed every record in it.
//!
//! Failures never skip records: a retryable failure stops sending, waits for every outstanding
//! report, then rewinds the buffer to the oldest unconfirmed chunk and resends from there after a
//! backoff (duplicates are possible and carry the same `edgegate-seq`). A fatal producer error
//! replaces the producer and does the same, and so does a converter timeout, which may be a stall
//! of the machine: the rewind then waits for the converter's pause.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::{Buffer, BufferError, ReadChunk};
use crate::config::Config;
use crate::converter::{Conversion, ConvertError, Converters, ConvertersGone};
use crate::kafka::{Batching, ClientEvent, Delivery, Out, Outcome, Refusal, Sink, SinkError};
use crate::metrics::{DropReason, Metrics};
use crate::record::{now_ms, Record};

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The producer cannot be configured; fatal, fix `[kafka]` (`check` reports it too).
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The buffer failed underneath; fatal, the disk needs attention.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The converter thread died again and again (or cannot be restarted); fatal, the process
    /// restarts and resends from the buffer.
    #[error(transparent)]
    Converter(#[from] ConvertersGone),
}

/// Kafka link state as the operator sees it; every change is logged once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down(String),
    /// The broker refused the gateway (credentials, permissions, TLS): retried like a link
    /// that is down, but only a configuration change is likely to help.
    Refused(Refusal),
}

struct LinkState {
    state: Link,
    metrics: Arc<Metrics>,
    /// When the broker last refused us. librdkafka reports a lasting refusal on every retry
    /// (every 10 s at most), so one older than [`REFUSAL_FRESH`] was a passing one.
    last_refusal: Option<Instant>,
}

/// How long a refusal explains the link being down (see `LinkState::last_refusal`).
const REFUSAL_FRESH: Duration = Duration::from_secs(30);

impl LinkState {
    fn set(&mut self, next: Link) {
        // Down for another reason is still down: librdkafka alternates its wording while the
        // broker stays away ("no broker reachable", a metadata timeout), one line each 5 s.
        let still_down = matches!((&self.state, &next), (Link::Down(_), Link::Down(_)));
        if self.state == next || still_down {
            return;
        }
        // While the broker refuses us, the timeouts and unreachable brokers that follow from it
        // are no news: the refusal stays the state (and the one line logged) until the link
        // comes up or the broker refuses for another reason.
        let fresh = self
            .last_refusal
            .is_some_and(|t| t.elapsed() < REFUSAL_FRESH);
        if fresh && matches!(self.state, Link::Refused(_)) && matches!(next, Link::Down(_)) {
            return;
        }
        match &next {
            Link::Up => tracing::info!("kafka link up"),
            Link::Down(reason) => tracing::warn!(%reason, "kafka link down"),
            Link::Unknown | Link::Refused(_) => {}
        }
        self.metrics.kafka_link_up.set(i64::from(next == Link::Up));
        if let Link::Refused(old) = self.state {
            self.metrics.set_kafka_link_refused(old, false);
        }
        if let Link::Refused(new) = next {
            self.metrics.set_kafka_link_refused(new, true);
        }
        let (state, reason) = match &next {
            Link::Unknown => ("unknown", None),
            Link::Up => ("up", None),
            Link::Down(reason) => ("down", Some(reason.clone())),
            Link::Refused(refusal) => ("refused", Some(refusal.label().to_owned())),
        };
        self.metrics.live.set_link(state, reason);
        self.state = next;
    }

    /// The broker refused us; logged at error level once per refusal, naming what to check.
    fn refused(&mut self, refusal: Refusal, detail: &str) {
        self.last_refusal = Some(Instant::now());
        if self.state == Link::Refused(refusal) {
            return;
        }
        tracing::error!(
            reason = refusal.label(),
            detail,
            "{}",
            refusal.advice(detail)
        );
        self.set(Link::Refused(refusal));
        let reason = format!("{}: {detail}", refusal.label());
        self.metrics.live.explain_link(reason);
    }

    fn on_event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::LinkDown(reason) => self.set(Link::Down(reason)),
            ClientEvent::Refused { refusal, detail } => self.refused(refusal, &detail),
            // The pump notices a fatal error through the producer itself.
            ClientEvent::Fatal(_) => {}
        }
    }
}

/// What one record handed to librdkafka costs in memory besides its bytes: librdkafka's message,
/// its copied key and headers, the opaque and the produce request. Measured with a 1,000,000-record
/// drain of 200-byte records: each record in flight added ~1.8 KB of RSS. Counting it makes
/// `kafka.max_in_flight_bytes` bound memory rather than payload bytes.
const IN_FLIGHT_RECORD_COST: usize = 1024;

/// Converter thread deaths in a row survived by restarting it: enough for the converter's crash
/// log to find and skip a record that kills it (two deaths), few enough not to spin.
const CONVERTER_RESTARTS: u32 = 3;

struct InFlightChunk {
    first_seq: u64,
    count: u32,
    /// Records not yet confirmed (delivered or permanently rejected).
    unconfirmed: u32,
    bytes: usize,
    failed: bool,
    /// The stored chunks to release once every record is confirmed.
    parts: Vec<u64>,
}

/// Logs at most once a minute, with how many were suppressed.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn_for(&mut self, what: &str, converter: &str, detail: &str) {
        if self.due() {
            tracing::warn!(converter, suppressed = self.suppressed, detail, "{what}");
            self.reset();
        }
    }

    fn due(&mut self) -> bool {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            self.suppressed += 1;
            return false;
        }
        true
    }

    fn reset(&mut self) {
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }

    fn warn(&mut self, what: &str, detail: &str) {
        if self.due() {
            tracing::warn!(suppressed = self.suppressed, detail, "{what}");
            self.reset();
        }
    }
}

enum PumpExit {
    Shutdown,
    Recreate(String),
    /// New Kafka settings: recreate the producer once in-flight records are confirmed or rewound.
    Reload(Reload),
    /// Nothing is outstanding and the producer must batch differently ([`Forwarder::batching`]).
    Rebatch,
}

struct Forwarder {
    config: Arc<Config>,
    buffer: Buffer,
    metrics: Arc<Metrics>,
    link: LinkState,
    in_flight: VecDeque<InFlightChunk>,
    outstanding: usize,
    outstanding_bytes: usize,
    /// Set when a retryable failure was reported: stop sending, rewind once all reports are in.
    rewind: Option<String>,
    /// How long a converter asked the rewind to wait; the Kafka backoff otherwise.
    hold_for: Option<Duration>,
    /// What the producer is (or is to be) created with.
    batching: Batching,
    /// After a batch the broker refused as too large, records below this sequence number go one
    /// per batch, so only the culprit is refused.
    one_by_one_until: Option<u64>,
    /// `batching` changed: stop sending and recreate the producer once nothing is outstanding.
    rebatch: bool,
    /// Kafka records (seq, part) of chunks not yet released that need no more sending: delivered
    /// in a chunk that failed (so is resent after the rewind), or refused for good and counted.
    /// Without it, a converter's hold would resend, and duplicate, everything before the held
    /// record each time.
    settled: BTreeSet<(u64, u32)>,
    backoff: Backoff,
    last_progress: Instant,
    rejected_log: RateLimitedLog,
    converters: Converters,
    /// One log line per converter per minute for records it failed on.
    converter_logs: HashMap<Arc<str>, RateLimitedLog>,
    /// Converter thread deaths since the last chunk it converted.
    converter_restarts: u32,
}

/// A reloaded configuration for the forwarder: its converters always start again (their scripts
/// may have changed even when the tables did not), the producer only when `kafka` changed.
pub struct Reload {
    pub config: Arc<Config>,
    pub kafka_changed: bool,
    /// Answered once the new settings are in force, or refused with the old ones still running.
    pub applied: oneshot::Sender<Result<(), String>>,
}

/// What waiting for the topic ended with.
enum Waited {
    Ready(Option<u64>),
    Shutdown,
    Reload(Reload),
}

/// Forwards buffered records to Kafka, through their source's converter where one is configured,
/// until `shutdown`, then lets in-flight deliveries finish for `kafka.shutdown_timeout`.
pub async fn run(
    config: Arc<Config>,
    buffer: Buffer,
    converters: Converters,
    metrics: Arc<Metrics>,
    mut reloads: mpsc::Receiver<Reload>,
    shutdown: CancellationToken,
) -> Result<(), ForwarderError> {
    let batching = Batching {
        max_record_bytes: config.kafka.max_record_bytes.as_u64(),
        one_record_per_batch: false,
    };
    let mut f = Forwarder {
        link: LinkState {
            state: Link::Unknown,
            metrics: metrics.clone(),
            last_refusal: None,
        },
        config,
        buffer,
        metrics,
        in_flight: VecDeque::new(),
        outstanding: 0,
        outstanding_bytes: 0,
        rewind: None,
        hold_for: None,
        batching,
        one_by_one_until: None,
        rebatch: false,
        settled: BTreeSet::new(),
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
        last_progress: Instant::now(),
        rejected_log: RateLimitedLog::default(),
        converters,
        converter_logs: HashMap::new(),
        converter_restarts: 0,
    };
    // Once per process: a broker that does not answer costs the describe's timeout each time.
    let mut described = false;
    loop {
        let (sink, (mut deliveries, mut events)) = Sink::new(&f.config, f.batching)?;
        let sink = Arc::new(sink);
        let topic_limit = match f
            .wait_for_topic(&sink, &mut events, !described, &mut reloads, &shutdown)
            .await?
        {
            Waited::Ready(limit) => limit,
            Waited::Shutdown => {
                drop_sink(sink).await;
                return f.finish();
            }
            Waited::Reload(reload) => {
                drop_sink(sink).await;
                described &= !f.reload(reload)?;
                continue;
            }
        };
        described = true;
        if f.lower_record_limit(topic_limit) {
            // message.max.bytes is fixed at creation; a batch must not exceed the topic's limit.
            drop_sink(sink).await;
            continue;
        }
        match f
            .pump(&sink, &mut deliveries, &mut events, &mut reloads, &shutdown)
            .await?
        {
            PumpExit::Shutdown => {
                f.drain(&mut deliveries).await;
                drop_sink(sink).await;
                return f.finish();
            }
            PumpExit::Recreate(reason) => {
                tracing::warn!(%reason, "kafka producer failed fatally; recreating it and resending unconfirmed records");
                drop_sink(sink).await;
                while let Ok(d) = deliveries.try_recv() {
                    f.on_delivery(d);
                }
                f.rewind_now();
                // A reload meanwhile (new Kafka settings, likely the fix) ends the wait.
                match sleep_or_reload(f.backoff.next_delay(), &mut reloads, &shutdown).await {
                    Slept::Shutdown => return f.finish(),
                    Slept::Reload(reload) => described &= !f.reload(reload)?,
                    Slept::Elapsed => {}
                }
            }
            PumpExit::Rebatch => {
                drop_sink(sink).await;
                f.rebatch = false;
                f.rewind_now();
            }
            PumpExit::Reload(reload) => {
                // Confirmed records leave the buffer; those still unconfirmed after
                // shutdown_timeout are sent again by the new producer (duplicates, not losses).
                f.drain(&mut deliveries).await;
                drop_sink(sink).await;
                while let Ok(d) = deliveries.try_recv() {
                    f.on_delivery(d);
                }
                f.rewind_now();
                described &= !f.reload(reload)?;
            }
        }
    }
}

/// Dropping a producer purges and flushes for up to 500 ms; keep that off the async threads.
async fn drop_sink(sink: Arc<Sink>) {
    let _ = tokio::task::spawn_blocking(move || drop(sink)).await;
}

/// The deterministic failures; transient ones are held, never dropped.
fn drop_reason(error: &ConvertError) -> DropReason {
    match error {
        ConvertError::Timeout(_) | ConvertError::TimedOut { .. } | ConvertError::Suspended(_) => {
            DropReason::ConverterTimeout
        }
        ConvertError::Exception(_) => DropReason::ConverterException,
        ConvertError::OutOfMemory(_) => DropReason::ConverterOutOfMemory,
        ConvertError::InvalidResult(_) => DropReason::ConverterInvalidResult,
        ConvertError::Panicked(_) => DropReason::ConverterPanic,
        ConvertError::Crashed => DropReason::ConverterCrash,
    }
}

/// How a wait that a reload may cut short ended.
enum Slept {
    Elapsed,
    Shutdown,
    Reload(Reload),
}

async fn sleep_or_reload(
    delay: Duration,
    reloads: &mut mpsc::Receiver<Reload>,
    shutdown: &CancellationToken,
) -> Slept {
    tokio::select! {
        _ = tokio::time::sleep(delay) => Slept::Elapsed,
        _ = shutdown.cancelled() => Slept::Shutdown,
        Some(reload) = reloads.recv() => Slept::Reload(reload),
    }
}

async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

impl Forwarder {
    /// Applies a reload that leaves Kafka alone, between two chunks: records read from now on
    /// are converted by the new scripts. Hands back one that changes Kafka, for the caller to
    /// apply once the producer is idle.
    fn reload_converters_only(&mut self, reload: Reload) -> Result<Option<Reload>, ForwarderError> {
        if reload.kafka_changed {
            return Ok(Some(reload));
        }
        self.reload(reload)?;
        Ok(None)
    }

    /// Puts a reloaded configuration in force: new converters, and the settings the next
    /// producer is created with. True when the topic must be described again. A converter that
    /// cannot start leaves the old ones (and settings) running; fatal only when those cannot
    /// start again either.
    fn reload(&mut self, reload: Reload) -> Result<bool, ForwarderError> {
        let Reload {
            config,
            kafka_changed,
            applied,
        } = reload;
        if let Err((key, e)) = self.converters.replace(&config)? {
            let _ = applied.send(Err(format!("{key}: {e}")));
            return Ok(false);
        }
        // What the old scripts made and Kafka confirmed is keyed by (seq, part); the new
        // scripts number their output afresh, so the whole of a held or rewound chunk is sent
        // again (resent duplicates, never a part of the new output skipped).
        self.settled.clear();
        if kafka_changed {
            self.batching.max_record_bytes = config.kafka.max_record_bytes.as_u64();
        }
        self.config = config;
        let _ = applied.send(Ok(()));
        Ok(kafka_changed)
    }

    /// True when the topic takes smaller records than the producer is set up for.
    fn lower_record_limit(&mut self, topic_limit: Option<u64>) -> bool {
        let current = self.batching.max_record_bytes;
        let Some(lower) = topic_limit.filter(|&l| l < current) else {
            return false;
        };
        tracing::warn!(
            topic_max_message_bytes = lower,
            max_record_bytes = current,
            "the topic takes smaller records than kafka.max_record_bytes; larger ones are dropped (reason=too_large): raise the topic's max.message.bytes or lower max_record_bytes"
        );
        self.batching.max_record_bytes = lower;
        true
    }

    /// The topics' lowest `max.message.bytes` if the broker told; `None` when shutdown came first.
    /// The producer's client events are followed meanwhile: a broker refusing the gateway shows
    /// here first, as the topic check then only times out.
    async fn wait_for_topic(
        &mut self,
        sink: &Arc<Sink>,
        events: &mut mpsc::UnboundedReceiver<ClientEvent>,
        describe: bool,
        reloads: &mut mpsc::Receiver<Reload>,
        shutdown: &CancellationToken,
    ) -> Result<Waited, ForwarderError> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let (s, c) = (sink.clone(), self.config.clone());
            let mut check = tokio::task::spawn_blocking(move || {
                s.ensure_topic(&c, Duration::from_secs(5), describe)
            });
            let checked = loop {
                tokio::select! {
                    r = &mut check => break r,
                    Some(event) = events.recv() => self.link.on_event(event),
                    Some(reload) = reloads.recv() => {
                        if let Some(reload) = self.reload_converters_only(reload)? {
                            return Ok(Waited::Reload(reload));
                        }
                    }
                    _ = shutdown.cancelled() => return Ok(Waited::Shutdown),
                }
            };
            // A refusal reported meanwhile explains the failure better than the failure itself.
            while let Ok(event) = events.try_recv() {
                self.link.on_event(event);
            }
            match checked {
                Ok(Ok(limit)) => return Ok(Waited::Ready(limit)),
                Ok(Err(e)) => self.link.set(Link::Down(e.to_string())),
                Err(e) => self.link.set(Link::Down(e.to_string())),
            }
            let pause = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    Some(event) = events.recv() => self.link.on_event(event),
                    Some(reload) = reloads.recv() => {
                        if let Some(reload) = self.reload_converters_only(reload)? {
                            return Ok(Waited::Reload(reload));
                        }
                    }
                    _ = shutdown.cancelled() => return Ok(Waited::Shutdown),
                }
            }
        }
    }

    fn can_send(&self) -> bool {
        self.rewind.is_none()
            && !self.rebatch
            && self.outstanding < self.config.kafka.max_in_flight
            && (self.outstanding_bytes as u64) < self.config.kafka.max_in_flight_bytes.as_u64()
    }

    async fn pump(
        &mut self,
        sink: &Sink,
        deliveries: &mut mpsc::UnboundedReceiver<Delivery>,
        events: &mut mpsc::UnboundedReceiver<ClientEvent>,
        reloads: &mut mpsc::Receiver<Reload>,
        shutdown: &CancellationToken,
    ) -> Result<PumpExit, ForwarderError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Time spent waiting for the topic is not a delivery stall.
        self.last_progress = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(PumpExit::Shutdown),
                Some(d) = deliveries.recv() => self.on_delivery(d),
                Some(event) = events.recv() => match event {
                    ClientEvent::Fatal(reason) => return Ok(PumpExit::Recreate(reason)),
                    event => self.link.on_event(event),
                },
                Some(reload) = reloads.recv() => {
                    if let Some(reload) = self.reload_converters_only(reload)? {
                        return Ok(PumpExit::Reload(reload));
                    }
                }
                _ = tick.tick() => {
                    if let Some(reason) = sink.fatal_error() {
                        return Ok(PumpExit::Recreate(reason));
                    }
                    self.check_stall();
                }
                chunk = self.buffer.next_chunk(), if self.can_send() => {
                    self.send_chunk(sink, chunk?, shutdown).await?;
                }
            }
            if self.rewind.is_some() && self.outstanding == 0 {
                let delay = match self.hold_for {
                    Some(hold) => hold,
                    None => self.backoff.next_delay(),
                };
                self.rewind_now();
                // A reload ends the wait: new scripts are what an operator sends to end a hold.
                match sleep_or_reload(delay, reloads, shutdown).await {
                    Slept::Shutdown => return Ok(PumpExit::Shutdown),
                    Slept::Reload(reload) => {
                        if let Some(reload) = self.reload_converters_only(reload)? {
                            return Ok(PumpExit::Reload(reload));
                        }
                    }
                    Slept::Elapsed => {}
                }
            }
            if self.rebatch && self.outstanding == 0 {
                return Ok(PumpExit::Rebatch);
            }
        }
    }

    async fn send_chunk(
        &mut self,
        sink: &Sink,
        chunk: ReadChunk,
        shutdown: &CancellationToken,
    ) -> Result<(), ForwarderError> {
        let now = now_ms();
        let mut entry = InFlightChunk {
            first_seq: chunk.info.first_seq,
            count: chunk.info.count,
            unconfirmed: 0,
            bytes: chunk.info.bytes as usize + chunk.info.count as usize * IN_FLIGHT_RECORD_COST,
            failed: false,
            parts: chunk.parts.clone(),
        };
        let (records, conversions) = if self.converters.applies_to(&chunk.records) {
            let converted = tokio::select! {
                converted = self.converters.convert(chunk.records) => converted,
                // The chunk stays unreleased in the buffer and is sent after the restart.
                _ = shutdown.cancelled() => return Ok(()),
            };
            match converted {
                Ok(converted) => {
                    self.converter_restarts = 0;
                    converted
                }
                Err(ConvertersGone) => return self.restart_converters(entry.first_seq),
            }
        } else {
            (chunk.records, Vec::new())
        };
        for (i, record) in records.iter().enumerate() {
            if self.buffer.is_expired(record.captured_ms, now) {
                self.metrics.count_dropped(DropReason::MaxAge, 1);
                continue;
            }
            let sent = match conversions.get(i).unwrap_or(&Conversion::Raw) {
                Conversion::Raw => {
                    self.send_one(sink, record, Out::Raw, &mut entry, shutdown)
                        .await
                }
                Conversion::Entities {
                    converter,
                    entities,
                } => {
                    let mut sent = true;
                    for (index, e) in entities.iter().enumerate() {
                        let out = Out::Entity {
                            converter,
                            index,
                            key: &e.key,
                            value: &e.value,
                        };
                        sent = self.send_one(sink, record, out, &mut entry, shutdown).await;
                        if !sent {
                            break;
                        }
                    }
                    sent
                }
                Conversion::Failed { converter, error } if error.is_transient() => {
                    self.hold(converter, error, &mut entry);
                    false
                }
                Conversion::Failed { converter, error } => {
                    self.send_failed(sink, record, converter, error, &mut entry, shutdown)
                        .await
                }
            };
            if !sent {
                break;
            }
        }
        self.outstanding_bytes += entry.bytes;
        let done = entry.unconfirmed == 0 && !entry.failed;
        self.in_flight.push_back(entry);
        if done {
            self.release_confirmed();
        }
        if self.in_flight.back().is_some_and(|c| c.failed) {
            self.rewind
                .get_or_insert_with(|| "shutdown while sending".into());
        }
        Ok(())
    }

    /// The converter thread died with the chunk from `first_seq`: a new thread converts it again
    /// (one record at a time, see the converter's crash log). Fatal after
    /// [`CONVERTER_RESTARTS`] deaths in a row: the process restarts and carries on from there.
    fn restart_converters(&mut self, first_seq: u64) -> Result<(), ForwarderError> {
        self.converter_restarts += 1;
        if self.converter_restarts > CONVERTER_RESTARTS {
            return Err(ConvertersGone.into());
        }
        self.converters.restart()?;
        self.buffer.rewind(first_seq);
        Ok(())
    }

    /// A record its converter could not convert now (a timeout, a pause): it and everything after
    /// it wait for the rewind, which comes after the converter's pause, so nothing is given up
    /// for a stall of the machine. Every source waits with it, to keep the buffer's order.
    fn hold(&mut self, converter: &Arc<str>, error: &ConvertError, entry: &mut InFlightChunk) {
        entry.failed = true;
        let wait = error.retry_in().unwrap_or_default();
        self.hold_for = Some(self.hold_for.map_or(wait, |w| w.max(wait)));
        self.rewind
            .get_or_insert_with(|| format!("converter {converter}: {error}"));
    }

    /// A record its converter failed on: to the dead-letter topic, or counted and dropped.
    async fn send_failed(
        &mut self,
        sink: &Sink,
        record: &Record,
        converter: &Arc<str>,
        error: &ConvertError,
        entry: &mut InFlightChunk,
        shutdown: &CancellationToken,
    ) -> bool {
        let message = error.to_string();
        let dead_letter = self.config.kafka.dead_letter_topic.is_some();
        let what = if dead_letter {
            "converter failed on a record; sent to the dead-letter topic"
        } else {
            "converter failed on a record; dropped (no kafka.dead_letter_topic)"
        };
        self.converter_logs
            .entry(converter.clone())
            .or_default()
            .warn_for(what, converter, &message);
        if !dead_letter {
            self.metrics.count_dropped(drop_reason(error), 1);
            return true;
        }
        let out = Out::DeadLetter {
            converter,
            error: &message,
        };
        self.send_one(sink, record, out, entry, shutdown).await
    }

    /// Hands one Kafka record to the producer. False when the rest of the chunk must wait for a
    /// rewind (the link failed, or shutdown came while the producer queue was full).
    async fn send_one(
        &mut self,
        sink: &Sink,
        record: &Record,
        out: Out<'_>,
        entry: &mut InFlightChunk,
        shutdown: &CancellationToken,
    ) -> bool {
        if self.settled.contains(&(record.seq, out.part())) {
            return true;
        }
        loop {
            match sink.send(record, out) {
                Ok(()) => {
                    entry.unconfirmed += 1;
                    self.outstanding += 1;
                    return true;
                }
                Err(SinkError::QueueFull) => {
                    // Only when record bytes exceed librdkafka's byte limit; wait briefly.
                    if !sleep_or_shutdown(Duration::from_millis(5), shutdown).await {
                        entry.failed = true;
                        return false;
                    }
                }
                Err(SinkError::Retry(reason)) => {
                    // Stop here; the rest of the chunk is resent after the rewind.
                    self.link.set(Link::Down(reason.clone()));
                    self.rewind.get_or_insert(reason);
                    entry.failed = true;
                    return false;
                }
                Err(e) => {
                    let reason = match e {
                        SinkError::TooLarge(_) => DropReason::TooLarge,
                        _ => DropReason::RejectedByKafka,
                    };
                    self.metrics.count_dropped(reason, 1);
                    // Refused again after any rewind: neither resend nor count it twice.
                    self.settled.insert((record.seq, out.part()));
                    self.rejected_log.warn(
                        "record refused by the kafka producer; dropped",
                        &e.to_string(),
                    );
                    return true;
                }
            }
        }
    }

    fn on_delivery(&mut self, d: Delivery) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.last_progress = Instant::now();
        // Everything sent so far may share a batch with the record the broker refused.
        let sent_end = self
            .in_flight
            .back()
            .map_or(d.seq + 1, |c| c.first_seq + u64::from(c.count));
        let idx = self.in_flight.partition_point(|c| c.first_seq <= d.seq);
        let Some(chunk) = idx.checked_sub(1).and_then(|i| self.in_flight.get_mut(i)) else {
            return; // From before a rewind; that chunk is being resent.
        };
        if d.seq >= chunk.first_seq + u64::from(chunk.count) {
            return;
        }
        match d.outcome {
            Outcome::Delivered => {
                chunk.unconfirmed = chunk.unconfirmed.saturating_sub(1);
                if chunk.failed {
                    self.settled.insert((d.seq, d.part));
                }
                self.metrics.records_out.inc();
                let latency = now_ms().saturating_sub(d.captured_ms) as f64 / 1000.0;
                self.metrics.delivery_latency.observe(latency);
                self.link.set(Link::Up);
                self.backoff.reset();
            }
            Outcome::Rejected(reason) => {
                chunk.unconfirmed = chunk.unconfirmed.saturating_sub(1);
                self.settled.insert((d.seq, d.part));
                self.metrics.count_dropped(DropReason::RejectedByKafka, 1);
                self.rejected_log
                    .warn("record rejected by kafka; dropped", &reason);
            }
            // Resent after the rewind anyway; its outcome then is the one that counts.
            Outcome::TooLarge(_) if chunk.failed => {}
            Outcome::TooLarge(reason) if self.batching.one_record_per_batch => {
                chunk.unconfirmed = chunk.unconfirmed.saturating_sub(1);
                self.settled.insert((d.seq, d.part));
                self.metrics.count_dropped(DropReason::TooLarge, 1);
                self.rejected_log
                    .warn("record too large for the broker; dropped", &reason);
            }
            Outcome::TooLarge(reason) => {
                chunk.failed = true;
                tracing::warn!(%reason, "the broker refused a batch as too large; resending its records one per batch");
                self.rewind.get_or_insert(reason);
                self.one_by_one_until = Some(sent_end);
                self.batching.one_record_per_batch = true;
                self.rebatch = true;
            }
            Outcome::Retry(reason) => {
                chunk.failed = true;
                self.link.set(Link::Down(reason.clone()));
                self.rewind.get_or_insert(reason);
            }
            Outcome::Purged => chunk.failed = true,
        }
        self.release_confirmed();
    }

    /// Releases confirmed chunks from the oldest on; order keeps the buffer's head the oldest.
    fn release_confirmed(&mut self) {
        while let Some(front) = self.in_flight.front() {
            if front.unconfirmed > 0 || front.failed {
                break;
            }
            if let Err(e) = self.buffer.release_parts(&front.parts) {
                tracing::error!(error = %e, "releasing a delivered chunk failed; it will be resent");
                break;
            }
            self.outstanding_bytes = self.outstanding_bytes.saturating_sub(front.bytes);
            let end = front.first_seq + u64::from(front.count);
            self.in_flight.pop_front();
            self.settled = self.settled.split_off(&(end, 0));
            if self.one_by_one_until.is_some_and(|until| end >= until) {
                tracing::info!("the batch's records are through; batching again");
                self.one_by_one_until = None;
                self.batching.one_record_per_batch = false;
                self.rebatch = true;
            }
        }
    }

    /// Forgets everything in flight and makes the buffer hand it out again.
    fn rewind_now(&mut self) {
        self.release_confirmed();
        if let Some(front) = self.in_flight.front() {
            self.buffer.rewind(front.first_seq);
        }
        self.in_flight.clear();
        self.outstanding = 0;
        self.outstanding_bytes = 0;
        self.rewind = None;
        self.hold_for = None;
    }

    fn check_stall(&mut self) {
        let stalled =
            self.outstanding > 0 && self.last_progress.elapsed() > self.config.kafka.stall_timeout;
        if stalled {
            // Stable text: the link state is compared, and logged, by its reason.
            self.link.set(Link::Down(format!(
                "no delivery confirmation within {}s while records are in flight",
                self.config.kafka.stall_timeout.as_secs()
            )));
        }
        if self.outstanding == 0 {
            self.last_progress = Instant::now();
        }
    }

    /// After shutdown: give outstanding deliveries `shutdown_timeout` to arrive.
    async fn drain(&mut self, deliveries: &mut mpsc::UnboundedReceiver<Delivery>) {
        let deadline = tokio::time::Instant::now() + self.config.kafka.shutdown_timeout;
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                Ok(Some(d)) => self.on_delivery(d),
                _ => break,
            }
        }
        if self.outstanding > 0 {
            tracing::warn!(
                records = self.outstanding,
                "producer stopping with records unconfirmed: they stay buffered and are sent again"
            );
        }
    }

    fn finish(&mut self) -> Result<(), ForwarderError> {
        self.release_confirmed();
        self.buffer.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod link_tests {
    use super::*;

    fn link() -> LinkState {
        LinkState {
            state: Link::Unknown,
            metrics: Arc::new(Metrics::new()),
            last_refusal: None,
        }
    }

    #[test]
    fn down_for_another_reason_is_no_new_state() {
        let mut link = link();
        link.set(Link::Down("no broker reachable".into()));
        link.set(Link::Down("metadata timeout".into()));
        assert_eq!(link.state, Link::Down("no broker reachable".into()));
    }

    #[test]
    fn a_fresh_refusal_explains_the_link_being_down() {
        let mut link = link();
        link.refused(Refusal::Authentication, "invalid-proof");
        link.set(Link::Down("no broker reachable".into()));
        assert_eq!(link.state, Link::Refused(Refusal::Authentication));
    }

    /// A passing refusal (a failed re-authentication, a reset handshake) must not hide a real
    /// outage after it for good.
    #[test]
    fn a_stale_refusal_gives_way_to_an_outage() {
        let mut link = link();
        link.refused(Refusal::Tls, "handshake");
        link.last_refusal = Instant::now().checked_sub(REFUSAL_FRESH * 2);
        link.set(Link::Down("no broker reachable".into()));
        assert_eq!(link.state, Link::Down("no broker reachable".into()));
        assert_eq!(link.metrics.kafka_link_up.get(), 0);
    }
}
