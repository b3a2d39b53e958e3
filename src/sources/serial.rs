//! Serial source: reads a serial port (RS-232/RS-485/USB adapters), cuts the byte stream into
//! frames and hands each frame to the buffer as one record.
//!
//! Back-pressure: at most `max_pending` frames wait for durability; beyond that the source stops
//! reading, so the kernel's tty buffer, the UART and the device's own flow control hold the data.
//! No device waits for an acknowledgement, so frames go to the buffer without a reply channel: a
//! frame the buffer cannot store is counted there (`reason="not_stored"`).
//! A port that is missing or disappears (USB adapter unplugged) is reopened with backoff; frames
//! already read are in the buffer's hands and are not affected.
//!
//! The port handle is shared with the downlink: [`SerialHandle::write`] sends bytes through the
//! same open port, never a second open.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::{BufferWriter, TrySubmit, Unacked};
use crate::config::{FlowControl, Parity, SerialSourceConfig};
use crate::metrics::Metrics;
use crate::record::{now_ms, NewRecord, SourceType};
use crate::sources::framing::{default_idle_gap, Framer, Framing, Output, DEFAULT_RESYNC_GAP};

/// Why bytes could not be written to a serial device. The caller may retry later.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The port is not open right now (unplugged, or reopening); retry after it reconnects.
    #[error("serial port {0} is not open")]
    NotOpen(String),
    /// The write failed; the port is being reopened.
    #[error("writing to serial port {port}: {error}")]
    Write { port: String, error: std::io::Error },
    /// The device did not take the bytes in time (flow control held, or it stopped reading);
    /// part of them may have gone out. Retry later.
    #[error("serial port {0}: the device did not take the bytes in time")]
    WriteTimedOut(String),
    /// The source has stopped (shutdown).
    #[error("serial source stopped")]
    Stopped,
    /// No serial source has this name.
    #[error("no serial source named {0:?}")]
    UnknownSource(String),
}

struct WriteRequest {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), SerialError>>,
}

/// Sends bytes to a serial source's device through the port the source has open.
#[derive(Clone)]
pub struct SerialHandle {
    tx: mpsc::Sender<WriteRequest>,
}

impl SerialHandle {
    pub async fn write(&self, bytes: Vec<u8>) -> Result<(), SerialError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriteRequest { bytes, done })
            .await
            .map_err(|_| SerialError::Stopped)?;
        rx.await.map_err(|_| SerialError::Stopped)?
    }
}

/// The handle of a serial source's current run, for the downlink: a restarted source has a new
/// one, and writes through an old one fail with [`SerialError::Stopped`].
#[derive(Clone, Default)]
pub struct SerialOutlet(Arc<std::sync::Mutex<Option<SerialHandle>>>);

impl SerialOutlet {
    pub fn set(&self, handle: SerialHandle) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Writes through the port the source has open; serialised with the source's other writers.
    pub async fn write(&self, bytes: Vec<u8>) -> Result<(), SerialError> {
        let handle = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match handle {
            Some(h) => h.write(bytes).await,
            None => Err(SerialError::Stopped),
        }
    }
}

/// Everything the source needs besides its configuration.
pub struct SerialContext {
    pub name: Arc<str>,
    pub writer: BufferWriter,
    pub metrics: Arc<Metrics>,
    writes: mpsc::Receiver<WriteRequest>,
}

impl SerialContext {
    /// The context and the handle the downlink writes through.
    pub fn new(
        name: Arc<str>,
        writer: BufferWriter,
        metrics: Arc<Metrics>,
    ) -> (SerialContext, SerialHandle) {
        let (tx, writes) = mpsc::channel(16);
        let ctx = SerialContext {
            name,
            writer,
            metrics,
            writes,
        };
        (ctx, SerialHandle { tx })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum PortState {
    Unknown,
    Open,
    Down(String),
}

struct StateLog {
    state: PortState,
    source: Arc<str>,
    path: String,
    metrics: Arc<Metrics>,
}

impl StateLog {
    fn set(&mut self, next: PortState) {
        if self.state == next {
            return;
        }
        match &next {
            PortState::Open => {
                tracing::info!(source = %self.source, port = %self.path, "serial port open")
            }
            PortState::Down(reason) => {
                tracing::warn!(source = %self.source, port = %self.path, %reason,
                "serial port unavailable; reopening with backoff")
            }
            PortState::Unknown => {}
        }
        self.metrics
            .set_source_connected(&self.source, next == PortState::Open);
        self.state = next;
    }
}

enum PortExit {
    Shutdown,
    Failed(String),
}

/// Reads `config.path` until `shutdown`, reopening it whenever it fails.
pub async fn run(
    config: SerialSourceConfig,
    mut ctx: SerialContext,
    shutdown: CancellationToken,
) -> Result<(), SerialError> {
    let path = config.path.display().to_string();
    let mut state = StateLog {
        state: PortState::Unknown,
        source: ctx.name.clone(),
        path: path.clone(),
        metrics: ctx.metrics.clone(),
    };
    let mut reader = FrameReader::new(&config, &ctx);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    loop {
        let reason = match open(&config) {
            Ok(port) => {
                state.set(PortState::Open);
                backoff.reset();
                match reader.read_port(port, &mut ctx, &shutdown).await {
                    PortExit::Shutdown => break,
                    PortExit::Failed(reason) => reason,
                }
            }
            Err(e) => format!("cannot open: {e}"),
        };
        state.set(PortState::Down(reason));
        if reader.framer.reset() {
            ctx.metrics
                .count_serial_discarded(&ctx.name, "incomplete", 1);
        }
        // While the port is away, writes fail at once instead of piling up.
        let wait = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = shutdown.cancelled() => return Ok(()),
                Some(req) = ctx.writes.recv() => {
                    let _ = req.done.send(Err(SerialError::NotOpen(path.clone())));
                }
            }
        }
    }
    Ok(())
}

fn open(config: &SerialSourceConfig) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let path = config.path.to_string_lossy();
    let data_bits = match config.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match config.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = match config.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let flow = match config.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    tokio_serial::new(path, config.baud_rate)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow)
        .open_native_async()
}

/// The framing state and the quota of frames not yet durable; both outlive a single open of the
/// port.
struct FrameReader {
    framer: Framer,
    idle_gap: Option<Duration>,
    meta: Vec<(String, String)>,
    /// One permit per frame not yet durable, `max_pending` in all.
    quota: Arc<Semaphore>,
    /// This source's records-in counter, looked up once rather than per frame.
    received: prometheus_client::metrics::counter::Counter,
    /// Characters the line carries per second, for the write timeout.
    chars_per_second: f64,
}

/// How long a write may take: three times the time on the wire of the bytes and of a full tty
/// output buffer ahead of them, plus a second. A device that holds flow control (or stops
/// reading) longer fails the write instead of stopping the port's reading and every later write
/// for good.
fn write_timeout(len: usize, chars_per_second: f64) -> Duration {
    let queued = (len + TTY_OUTPUT_BUFFER) as f64;
    Duration::from_secs(1) + Duration::from_secs_f64(3.0 * queued / chars_per_second.max(1.0))
}

/// Linux's tty output buffer: a write returns once its bytes are in it, and the port is writable
/// again only when it has nearly drained.
const TTY_OUTPUT_BUFFER: usize = 4096;

impl FrameReader {
    fn new(config: &SerialSourceConfig, ctx: &SerialContext) -> FrameReader {
        let max = config.max_frame_bytes.as_u64() as usize;
        let idle_gap = match &config.framing {
            Framing::Idle { gap } => Some(
                gap.unwrap_or_else(|| default_idle_gap(config.baud_rate, config.bits_per_char())),
            ),
            Framing::LengthPrefixed { resync_gap, .. } => {
                Some(resync_gap.unwrap_or(DEFAULT_RESYNC_GAP))
            }
            _ => None,
        };
        // `port` first: write errors name it.
        let mut meta = vec![("port".to_owned(), config.path.display().to_string())];
        if let Some(name) = &config.device_name {
            meta.push(("deviceName".to_owned(), name.clone()));
        }
        if let Some(kind) = &config.device_type {
            meta.push(("deviceType".to_owned(), kind.clone()));
        }
        FrameReader {
            framer: Framer::new(&config.framing, max),
            // tokio's timers tick in milliseconds; a shorter gap would end frames mid-burst.
            idle_gap: idle_gap.map(|g| g.max(Duration::from_millis(2))),
            meta,
            quota: Arc::new(Semaphore::new(config.max_pending)),
            received: ctx.metrics.source_in(&ctx.name),
            chars_per_second: f64::from(config.baud_rate) / f64::from(config.bits_per_char()),
        }
    }

    async fn read_port(
        &mut self,
        port: tokio_serial::SerialStream,
        ctx: &mut SerialContext,
        shutdown: &CancellationToken,
    ) -> PortExit {
        let (mut rx, mut tx) = tokio::io::split(port);
        let mut buf = vec![0u8; 4096];
        let mut quiet_at: Option<Instant> = None;
        // Made once: registering a fresh waiter on every pass showed in profiles.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let quota = self.quota.clone();
        loop {
            // With `max_pending` frames not yet durable, reading pauses; writes still go out.
            let may_read = quota.available_permits() > 0;
            tokio::select! {
                biased;
                _ = &mut cancelled => return PortExit::Shutdown,
                _ = quota.acquire(), if !may_read => {
                    // The pause was ours, not the line's: the quiet gap starts again.
                    quiet_at = quiet_at.and(self.idle_gap).map(|g| Instant::now() + g);
                }
                read = rx.read(&mut buf), if may_read => match read {
                    Ok(0) => return PortExit::Failed("port closed".into()),
                    Ok(n) => {
                        let out = self.framer.push(&buf[..n]);
                        quiet_at = self.idle_gap.map(|g| Instant::now() + g);
                        if !self.store(out, ctx, shutdown).await {
                            return PortExit::Shutdown;
                        }
                    }
                    Err(e) => return PortExit::Failed(e.to_string()),
                },
                // Only while reading: when reading pauses for the buffer, bytes wait in the tty and
                // the line is not quiet. `biased` reads waiting bytes before this fires.
                _ = sleep_until(quiet_at), if may_read && quiet_at.is_some() && self.framer.has_partial() => {
                    quiet_at = None;
                    let out = self.framer.idle();
                    if !self.store(out, ctx, shutdown).await {
                        return PortExit::Shutdown;
                    }
                }
                Some(req) = ctx.writes.recv() => {
                    if req.done.is_closed() {
                        // Its sender gave up (timed out, dead-lettered): not written late.
                        continue;
                    }
                    let limit = write_timeout(req.bytes.len(), self.chars_per_second);
                    let Ok(written) = tokio::time::timeout(limit, tx.write_all(&req.bytes)).await
                    else {
                        let port = self.meta[0].1.clone();
                        let _ = req.done.send(Err(SerialError::WriteTimedOut(port)));
                        continue;
                    };
                    let failed = written.as_ref().err().map(ToString::to_string);
                    let _ = req.done.send(written.map_err(|error| SerialError::Write {
                        port: self.meta[0].1.clone(),
                        error,
                    }));
                    if let Some(reason) = failed {
                        return PortExit::Failed(format!("write failed: {reason}"));
                    }
                }
            }
        }
    }

    /// Submits every complete frame; false when shutdown came while the buffer was full.
    async fn store(
        &mut self,
        out: Output,
        ctx: &SerialContext,
        shutdown: &CancellationToken,
    ) -> bool {
        if out.oversize > 0 {
            ctx.metrics
                .count_serial_discarded(&ctx.name, "oversize", out.oversize);
        }
        if out.incomplete > 0 {
            ctx.metrics
                .count_serial_discarded(&ctx.name, "incomplete", out.incomplete);
        }
        for frame in out.frames {
            let record = NewRecord {
                captured_ms: now_ms(),
                source: ctx.name.clone(),
                source_type: SourceType::Serial,
                meta: self.meta.clone(),
                payload: frame,
            };
            let Some(quota) = self.take_quota(shutdown).await else {
                return false;
            };
            // Waits only while the buffer's intake is full (buffer full with `block`).
            let submitted = match ctx.writer.try_submit_unacked(Unacked { record, quota }) {
                Ok(()) => Ok(()),
                Err(TrySubmit::ShuttingDown) => return false,
                Err(TrySubmit::Full(unacked)) => tokio::select! {
                    s = ctx.writer.submit_unacked(unacked) => s,
                    _ = shutdown.cancelled() => return false,
                },
            };
            if submitted.is_err() {
                return false;
            }
            self.received.inc();
        }
        true
    }

    /// Room for one more frame not yet durable; waits while `max_pending` frames are. `None` when
    /// shutdown came first.
    async fn take_quota(&self, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(quota) = self.quota.clone().try_acquire_owned() {
            return Some(quota);
        }
        tokio::select! {
            quota = self.quota.clone().acquire_owned() => quota.ok(),
            _ = shutdown.cancelled() => None,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
