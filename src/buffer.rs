//! The durable buffer: every record is fsync'd here before its source acknowledges it, and leaves
//! only after Kafka confirmed it.
//!
//! Storage layout in one sled tree (one atomic batch per commit):
//! - `c` + first_seq (big-endian) -> a chunk written by [`ChunkWriter`];
//! - `i` + first_seq -> [`ChunkInfo`] (count, bytes, capture times), so opening reads no payloads;
//! - `m` `next_seq` -> the next sequence number, so numbers never repeat across restarts.
//!
//! One chunk per group commit keeps sled's per-key overhead (measured at ~0.9x of a 200-byte record)
//! and its in-memory page table small. Under light load commits are tiny, so a new commit is merged
//! into the unread tail chunk while that stays under [`MERGE_LIMIT`].
//!
//! Ownership: chunks before `read_cursor` are the forwarder's (in flight); eviction and merging
//! touch only chunks at or after it, so nothing in flight disappears underneath the forwarder.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::config::{BufferConfig, WhenFull};
use crate::metrics::{DropReason, Metrics};
use crate::record::{self, now_ms, ChunkWriter, NewRecord, Record, SourceType};
use crate::watchdog::Stage;

/// sled's segment size (its default).
const SEGMENT_SIZE: usize = 512 * 1024;
/// Upper bound of one chunk value; a commit larger than this is written as several chunks (in the
/// same atomic batch). sled 0.34 writes a page whose serialized size exceeds a quarter of a segment
/// as a separate blob file, and its page cache counts such a page by the size of the pointer, not
/// of the data: blob pages are never evicted and RSS grows with the backlog (measured: 320 MB for
/// 1M records). A leaf holds at most 17 items, so chunks this small keep every leaf inline and
/// inside `cache_capacity`. Only a single record larger than this makes a bigger chunk.
const CHUNK_MAX_BYTES: usize = (SEGMENT_SIZE / 4 - 1024) / 17 - 64;
/// The forwarder reads consecutive chunks as one unit up to these sizes, so small stored chunks do
/// not make small conversions, produce loops and releases (measured: 2x slower converter path).
const READ_BATCH_RECORDS: u32 = 1024;
const READ_BATCH_BYTES: u32 = 256 * 1024;
/// A commit merges into the unread tail chunk while the result stays below this size.
const MERGE_LIMIT: usize = CHUNK_MAX_BYTES;
/// Upper bounds of one group commit.
const COMMIT_MAX_RECORDS: usize = 4096;
const COMMIT_MAX_BYTES: usize = 1024 * 1024;
/// Records submitted and not yet committed; sources wait when it is full.
const INTAKE_CAPACITY: usize = 4096;
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// Confirmed chunks wait in memory for the next commit or housekeeping pass up to this many; then
/// the forwarder removes them from sled itself. Draining a 1M backlog (`loadtest backlog`), 128
/// measured 297k-313k records/s at a 51-55 MB peak RSS; 1,024 made sled's batches so large that the
/// peak went to 76 MB.
const RELEASES_PENDING_MAX: usize = 128;
/// A commit of fewer records than this waits `buffer.commit_linger` for company first.
const LINGER_BELOW_RECORDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The data directory cannot be created or used; fatal at start-up (exit 2).
    #[error("data_dir {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    /// Another process (a running edgegate) holds the buffer; stop it first.
    #[error("the buffer in {0} is in use by another process (is edgegate running?)")]
    Locked(PathBuf),
    /// Disk or database failure. For an append: do not acknowledge, the device will resend.
    #[error("buffer storage: {0}")]
    Storage(#[from] sled::Error),
    /// The record alone exceeds `buffer.max_bytes`; it can never be stored. Reject it.
    #[error("record of {0} bytes exceeds buffer.max_bytes")]
    TooLarge(usize),
    /// The gateway is stopping; do not acknowledge, the device will resend after restart.
    #[error("buffer is shutting down")]
    ShuttingDown,
}

impl From<std::io::Error> for BufferError {
    fn from(e: std::io::Error) -> BufferError {
        BufferError::Storage(sled::Error::Io(e))
    }
}

/// Where a chunk is and what it holds; kept in memory for every chunk on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub first_seq: u64,
    pub count: u32,
    pub bytes: u32,
    pub first_ms: u64,
    pub last_ms: u64,
}

impl ChunkInfo {
    pub fn end_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }

    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.count.to_le_bytes());
        b[4..8].copy_from_slice(&self.bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_ms.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_ms.to_le_bytes());
        b
    }

    fn from_bytes(first_seq: u64, b: &[u8]) -> Option<ChunkInfo> {
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(ChunkInfo {
            first_seq,
            count: u32_at(0)?,
            bytes: u32_at(4)?,
            first_ms: u64_at(8)?,
            last_ms: u64_at(16)?,
        })
    }
}

fn chunk_key(seq: u64) -> [u8; 9] {
    prefixed(b'c', seq)
}
fn info_key(seq: u64) -> [u8; 9] {
    prefixed(b'i', seq)
}
fn quarantine_key(seq: u64) -> [u8; 9] {
    prefixed(b'q', seq)
}
fn prefixed(p: u8, seq: u64) -> [u8; 9] {
    let mut k = [p; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}
const NEXT_SEQ_KEY: &[u8] = b"mnext_seq";

/// A snapshot of what the buffer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    pub bytes: u64,
    pub chunks: usize,
    pub oldest_ms: Option<u64>,
    pub newest_ms: Option<u64>,
    pub next_seq: u64,
}

struct State {
    chunks: VecDeque<ChunkInfo>,
    bytes: u64,
    records: u64,
    next_seq: u64,
    /// First sequence number not yet handed to the forwarder.
    read_cursor: u64,
    /// The writer of `chunks.back()` while it may still be merged into.
    tail: Option<(u64, ChunkWriter)>,
}

impl State {
    fn first_unread(&self) -> usize {
        self.chunks
            .partition_point(|c| c.first_seq < self.read_cursor)
    }

    fn remove_at(&mut self, idx: usize) -> Option<ChunkInfo> {
        let c = self.chunks.remove(idx)?;
        self.bytes -= u64::from(c.bytes);
        self.records -= u64::from(c.count);
        if self.tail.as_ref().is_some_and(|(s, _)| *s == c.first_seq) {
            self.tail = None;
        }
        Some(c)
    }

    fn insert_front(&mut self, c: ChunkInfo) {
        self.bytes += u64::from(c.bytes);
        self.records += u64::from(c.count);
        self.chunks.push_front(c);
    }

    /// Removes unread chunks from the oldest on while `evict` says so.
    fn evict_unread(
        &mut self,
        mut evict: impl FnMut(&State, &ChunkInfo) -> bool,
    ) -> Vec<ChunkInfo> {
        let idx = self.first_unread();
        let mut gone = Vec::new();
        while let Some(c) = self.chunks.get(idx).copied() {
            if !evict(self, &c) {
                break;
            }
            self.remove_at(idx);
            gone.push(c);
        }
        gone
    }
}

struct Shared {
    db: sled::Db,
    /// sled's log file, for `fdatasync` (see [`Shared::make_durable`]).
    log: std::fs::File,
    tree: sled::Tree,
    state: Mutex<State>,
    data_ready: Notify,
    space_freed: Notify,
    config: BufferConfig,
    metrics: Arc<Metrics>,
    /// Whether the last commit found the buffer full; logged on every change.
    full: std::sync::atomic::AtomicBool,
    /// Chunks Kafka confirmed: gone from `state` at once, removed from sled in the next commit's
    /// batch or by housekeeping. sled rolls its IO buffer around every batch (two extra log
    /// writes), so a batch of their own per delivery report was half of sled's IO at a trickle.
    /// A crash before they are written only makes their records duplicates, never lost.
    released: Mutex<Vec<u64>>,
}

/// The forwarder's (and tooling's) handle on the buffer. Cheap to clone.
#[derive(Clone)]
pub struct Buffer {
    shared: Arc<Shared>,
}

/// Why [`BufferWriter::try_submit`] (or `try_submit_unacked`) did not take a record.
#[derive(Debug)]
pub enum TrySubmit<T = NewRecord> {
    /// The intake queue is full: here is what was submitted back; wait with
    /// [`BufferWriter::submit`] (or `submit_unacked`).
    Full(T),
    /// The buffer is shutting down; stop reading.
    ShuttingDown,
}

/// A record nobody acknowledges (a serial frame), with the room it takes in its source's quota
/// of records not yet durable; the room comes back when the record's commit is over.
#[derive(Debug)]
pub struct Unacked {
    pub record: NewRecord,
    pub quota: OwnedSemaphorePermit,
}

impl Unacked {
    fn into_append(self) -> Append {
        Append {
            record: self.record,
            done: Done::Quota(self.quota),
        }
    }
}

/// What sources use to append records. Cheap to clone; the buffer's `run` ends when all are gone.
#[derive(Clone)]
pub struct BufferWriter {
    tx: mpsc::Sender<Append>,
}

struct Append {
    record: NewRecord,
    done: Done,
}

/// What happens when an append's commit is over.
enum Done {
    /// The outcome goes back to a submitter waiting to acknowledge (an MQTT PUBACK waits on it).
    Reply(oneshot::Sender<Result<u64, BufferError>>),
    /// No one waits: only the quota room is given back, and a failure is counted as a drop.
    /// Saves serial sources a channel per frame and a wake-up per commit.
    Quota(OwnedSemaphorePermit),
}

impl Done {
    fn send(self, outcome: Result<u64, BufferError>, metrics: &Metrics) {
        match self {
            Done::Reply(tx) => {
                let _ = tx.send(outcome);
            }
            Done::Quota(_) if outcome.is_err() => metrics.count_dropped(DropReason::NotStored, 1),
            Done::Quota(_) => {}
        }
    }
}

/// The receiving end of the writers, consumed by [`run`].
pub struct Intake {
    rx: mpsc::Receiver<Append>,
}

/// Resolves when the record is durable (`Ok(seq)`), or tells why it is not.
pub struct PendingAppend(oneshot::Receiver<Result<u64, BufferError>>);

impl PendingAppend {
    pub async fn durable(self) -> Result<u64, BufferError> {
        self.await
    }
}

/// Polling by `&mut` is cancel-safe: a source can wait on its oldest append inside `select!`.
impl std::future::Future for PendingAppend {
    type Output = Result<u64, BufferError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(BufferError::ShuttingDown)))
    }
}

impl BufferWriter {
    /// Queues a record for the next group commit; waits while the intake queue is full.
    pub async fn submit(&self, record: NewRecord) -> Result<PendingAppend, BufferError> {
        let (done, rx) = oneshot::channel();
        let done = Done::Reply(done);
        self.enqueue(Append { record, done }).await?;
        Ok(PendingAppend(rx))
    }

    /// Queues a record nobody acknowledges; waits while the intake queue is full.
    pub async fn submit_unacked(&self, unacked: Unacked) -> Result<(), BufferError> {
        self.enqueue(unacked.into_append()).await
    }

    async fn enqueue(&self, append: Append) -> Result<(), BufferError> {
        self.tx
            .send(append)
            .await
            .map_err(|_| BufferError::ShuttingDown)
    }

    /// `submit_unacked` without waiting; the record and its quota come back when the intake
    /// queue is full.
    pub fn try_submit_unacked(&self, unacked: Unacked) -> Result<(), TrySubmit<Unacked>> {
        self.tx
            .try_send(unacked.into_append())
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(Append {
                    record,
                    done: Done::Quota(quota),
                }) => TrySubmit::Full(Unacked { record, quota }),
                // Closed; a full queue always hands back the `Quota` built above.
                _ => TrySubmit::ShuttingDown,
            })
    }

    /// `submit` without waiting: the record comes back when the intake queue is full, so the
    /// caller can wait for room alongside its shutdown signal only when it has to.
    pub fn try_submit(&self, record: NewRecord) -> Result<PendingAppend, TrySubmit> {
        let (done, rx) = oneshot::channel();
        let done = Done::Reply(done);
        match self.tx.try_send(Append { record, done }) {
            Ok(()) => Ok(PendingAppend(rx)),
            Err(mpsc::error::TrySendError::Full(append)) => Err(TrySubmit::Full(append.record)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TrySubmit::ShuttingDown),
        }
    }

    /// Appends and waits until the record is durable.
    pub async fn append(&self, record: NewRecord) -> Result<u64, BufferError> {
        self.submit(record).await?.durable().await
    }
}

/// Consecutive stored chunks handed to the forwarder as one unit of work.
#[derive(Debug)]
pub struct ReadChunk {
    /// Spans every part: the first part's first_seq, the total count and bytes.
    pub info: ChunkInfo,
    pub records: Vec<Record>,
    /// First sequence numbers of the stored chunks it was read from; release them together.
    pub parts: Vec<u64>,
}

impl ReadChunk {
    fn single(info: ChunkInfo, records: Vec<Record>) -> ReadChunk {
        ReadChunk {
            info,
            records,
            parts: vec![info.first_seq],
        }
    }

    fn absorb(&mut self, next: ReadChunk) {
        self.info.count += next.info.count;
        self.info.bytes += next.info.bytes;
        self.info.first_ms = self.info.first_ms.min(next.info.first_ms);
        self.info.last_ms = self.info.last_ms.max(next.info.last_ms);
        self.records.extend(next.records);
        self.parts.extend(next.parts);
    }
}

impl Buffer {
    /// Opens (or creates) the buffer in `<data_dir>/buffer`.
    pub fn open(
        data_dir: &Path,
        config: &BufferConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Buffer, BufferWriter, Intake), BufferError> {
        let dir = prepare_data_dir(data_dir)?;
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(config.cache_bytes.as_u64())
            .mode(sled::Mode::LowSpace)
            .segment_size(SEGMENT_SIZE)
            // We fsync after every group commit; this only bounds how long releases stay unflushed.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| open_error(&dir, e))?;
        let log = open_log_for_sync(&dir)?;
        let tree: sled::Tree = (*db).clone();
        let state = load_state(&tree)?;
        let shared = Arc::new(Shared {
            db,
            log,
            tree,
            state: Mutex::new(state),
            data_ready: Notify::new(),
            space_freed: Notify::new(),
            config: config.clone(),
            metrics,
            full: std::sync::atomic::AtomicBool::new(false),
            released: Mutex::new(Vec::new()),
        });
        let buffer = Buffer { shared };
        buffer.update_gauges();
        let (tx, rx) = mpsc::channel(INTAKE_CAPACITY);
        Ok((buffer, BufferWriter { tx }, Intake { rx }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind; keep going with them.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn stats(&self) -> Stats {
        let s = self.state();
        Stats {
            records: s.records,
            bytes: s.bytes,
            chunks: s.chunks.len(),
            oldest_ms: s.chunks.iter().map(|c| c.first_ms).min(),
            newest_ms: s.chunks.iter().map(|c| c.last_ms).max(),
            next_seq: s.next_seq,
        }
    }

    /// Bytes sled occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }

    /// The next unread chunk, waiting until one is durable.
    pub async fn next_chunk(&self) -> Result<ReadChunk, BufferError> {
        loop {
            let ready = self.shared.data_ready.notified();
            if let Some(chunk) = self.try_next_chunk()? {
                return Ok(chunk);
            }
            ready.await;
        }
    }

    /// The next unread chunks (consecutive ones joined), if any. Corrupt chunks are quarantined,
    /// counted and skipped.
    pub fn try_next_chunk(&self) -> Result<Option<ReadChunk>, BufferError> {
        let Some(mut read) = self.next_stored_chunk()? else {
            return Ok(None);
        };
        while read.info.count < READ_BATCH_RECORDS && read.info.bytes < READ_BATCH_BYTES {
            match self.next_contiguous(read.info.end_seq())? {
                Some(more) => read.absorb(more),
                None => break,
            }
        }
        Ok(Some(read))
    }

    /// The unread chunk starting at `seq`, if it is there and decodes; anything else is left
    /// unread for [`Buffer::next_stored_chunk`] to handle.
    fn next_contiguous(&self, seq: u64) -> Result<Option<ReadChunk>, BufferError> {
        let Some(info) = self.claim_unread(Some(seq)) else {
            return Ok(None);
        };
        let value = self.shared.tree.get(chunk_key(info.first_seq))?;
        match value.map(|v| record::decode_chunk(info.first_seq, &v)) {
            Some(Ok(records)) => Ok(Some(ReadChunk::single(info, records))),
            _ => {
                self.rewind(info.first_seq);
                Ok(None)
            }
        }
    }

    fn next_stored_chunk(&self) -> Result<Option<ReadChunk>, BufferError> {
        loop {
            let Some(info) = self.claim_unread(None) else {
                return Ok(None);
            };
            let value = self.shared.tree.get(chunk_key(info.first_seq))?;
            let decoded = value
                .as_deref()
                .map(|v| record::decode_chunk(info.first_seq, v));
            match decoded {
                Some(Ok(records)) => return Ok(Some(ReadChunk::single(info, records))),
                Some(Err(e)) => {
                    tracing::error!(first_seq = info.first_seq, count = info.count, error = %e,
                        "buffer chunk is corrupt; quarantined and skipped");
                    self.quarantine(info, value.as_deref().unwrap_or_default())?;
                }
                None => {
                    tracing::error!(first_seq = info.first_seq, "buffer chunk missing; skipped");
                    self.release(info.first_seq)?;
                    self.shared
                        .metrics
                        .count_dropped(DropReason::Corrupt, info.count.into());
                }
            }
        }
    }

    /// Hands the oldest unread chunk to the reader (only if it starts at `at`, when given).
    fn claim_unread(&self, at: Option<u64>) -> Option<ChunkInfo> {
        let mut s = self.state();
        let idx = s.first_unread();
        let info = s
            .chunks
            .get(idx)
            .copied()
            .filter(|c| at.is_none_or(|seq| c.first_seq == seq))?;
        s.read_cursor = info.end_seq();
        Some(info)
    }

    fn quarantine(&self, info: ChunkInfo, value: &[u8]) -> Result<(), BufferError> {
        let mut batch = sled::Batch::default();
        batch.insert(&quarantine_key(info.first_seq), value);
        self.shared.tree.apply_batch(batch)?;
        self.release(info.first_seq)?;
        self.shared
            .metrics
            .count_dropped(DropReason::Corrupt, info.count.into());
        Ok(())
    }

    /// Makes every chunk from `first_seq` on unread again (to resend after a failure).
    pub fn rewind(&self, first_seq: u64) {
        let mut s = self.state();
        s.read_cursor = s.read_cursor.min(first_seq);
        drop(s);
        self.shared.data_ready.notify_one();
    }

    /// Removes a chunk whose every record Kafka confirmed.
    pub fn release(&self, first_seq: u64) -> Result<(), BufferError> {
        self.release_parts(&[first_seq])
    }

    /// Removes stored chunks whose every record Kafka confirmed: from memory now, from sled with
    /// the next commit (see [`Shared::released`]).
    pub fn release_parts(&self, parts: &[u64]) -> Result<(), BufferError> {
        {
            let mut s = self.state();
            for &first_seq in parts {
                let idx = s.chunks.partition_point(|c| c.first_seq < first_seq);
                if s.chunks.get(idx).is_some_and(|c| c.first_seq == first_seq) {
                    s.remove_at(idx);
                }
            }
        }
        let pending = {
            let mut released = self.shared.released();
            released.extend_from_slice(parts);
            released.len()
        };
        self.shared.space_freed.notify_one();
        if pending >= RELEASES_PENDING_MAX {
            self.write_releases()?;
        }
        Ok(())
    }

    /// Removes the released chunks from sled now.
    fn write_releases(&self) -> Result<(), BufferError> {
        let mut batch = sled::Batch::default();
        let taken = self.shared.take_releases(&mut batch);
        if taken.is_empty() {
            return Ok(());
        }
        self.shared
            .tree
            .apply_batch(batch)
            .inspect_err(|_| self.shared.restore_releases(taken))?;
        Ok(())
    }

    /// Writes everything to disk now, releases included.
    pub fn flush(&self) -> Result<(), BufferError> {
        self.write_releases()?;
        self.shared.make_durable()
    }

    pub fn max_age(&self) -> Option<Duration> {
        self.shared.config.max_age
    }

    fn set_full(&self, full: bool) {
        use std::sync::atomic::Ordering;
        if self.shared.full.swap(full, Ordering::Relaxed) == full {
            return;
        }
        let stats = self.stats();
        match (full, self.shared.config.when_full) {
            (true, WhenFull::Block) => tracing::warn!(
                records = stats.records,
                bytes = stats.bytes,
                "buffer full; holding back sources until records are delivered"
            ),
            (true, WhenFull::DropOldest) => tracing::warn!(
                records = stats.records,
                bytes = stats.bytes,
                "buffer full; dropping oldest records"
            ),
            (false, _) => tracing::info!(records = stats.records, "buffer has room again"),
        }
    }

    fn update_gauges(&self) {
        let stats = self.stats();
        let m = &self.shared.metrics;
        m.buffer_records.set(stats.records as i64);
        m.buffer_bytes.set(stats.bytes as i64);
        let age = stats
            .oldest_ms
            .map(|t| now_ms().saturating_sub(t) as f64 / 1000.0)
            .unwrap_or(0.0);
        m.buffer_oldest_age_seconds.set(age);
    }

    /// Drops unread chunks whose every record is older than `max_age`.
    fn expire(&self) -> Result<(), BufferError> {
        let Some(max_age) = self.shared.config.max_age else {
            return Ok(());
        };
        let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
        let gone = self.state().evict_unread(|_, c| c.last_ms < cutoff);
        self.remove_evicted(&gone, DropReason::MaxAge)
    }

    fn remove_evicted(&self, gone: &[ChunkInfo], reason: DropReason) -> Result<(), BufferError> {
        if gone.is_empty() {
            return Ok(());
        }
        let n: u64 = gone.iter().map(|c| u64::from(c.count)).sum();
        self.shared.metrics.count_dropped(reason, n);
        tracing::debug!(records = n, ?reason, "evicted from buffer");
        let mut batch = sled::Batch::default();
        for c in gone {
            batch.remove(&chunk_key(c.first_seq));
            batch.remove(&info_key(c.first_seq));
        }
        self.shared.tree.apply_batch(batch)?;
        Ok(())
    }
}

fn prepare_data_dir(data_dir: &Path) -> Result<PathBuf, BufferError> {
    let err = |message: String| BufferError::DataDir {
        path: data_dir.to_owned(),
        message,
    };
    std::fs::create_dir_all(data_dir).map_err(|e| err(e.to_string()))?;
    let dir = data_dir.join("buffer");
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| err(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(probe);
    Ok(dir)
}

/// sled's log file (`db`), opened a second time so that commits can `fdatasync` it. The directory
/// is synced too, once, so that a freshly created log file survives a power cut.
fn open_log_for_sync(dir: &Path) -> Result<std::fs::File, BufferError> {
    let log = std::fs::File::open(dir.join("db"))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(log)
}

impl Shared {
    fn released(&self) -> MutexGuard<'_, Vec<u64>> {
        self.released
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds the removal of every released chunk to `batch`; the taken list goes back with
    /// [`Shared::restore_releases`] if the batch fails.
    fn take_releases(&self, batch: &mut sled::Batch) -> Vec<u64> {
        let taken = std::mem::take(&mut *self.released());
        for &first_seq in &taken {
            batch.remove(&chunk_key(first_seq));
            batch.remove(&info_key(first_seq));
        }
        taken
    }

    fn restore_releases(&self, taken: Vec<u64>) {
        self.released().extend(taken);
    }

    /// sled's `flush` writes its log with `sync_file_range`, which neither persists the file's
    /// size and extents when the log grew nor flushes the disk's write cache, so a power cut could
    /// still lose what it wrote. `fdatasync` does both; only after it is a record acknowledged.
    fn make_durable(&self) -> Result<(), BufferError> {
        self.db.flush()?;
        self.log.sync_data()?;
        Ok(())
    }
}

fn open_error(dir: &Path, e: sled::Error) -> BufferError {
    match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
            BufferError::Locked(dir.to_owned())
        }
        sled::Error::Io(io) if io.to_string().contains("lock") => {
            BufferError::Locked(dir.to_owned())
        }
        _ => BufferError::Storage(e),
    }
}

fn load_state(tree: &sled::Tree) -> Result<State, BufferError> {
    let mut chunks = VecDeque::new();
    let (mut bytes, mut records) = (0u64, 0u64);
    for item in tree.scan_prefix([b'i']) {
        let (k, v) = item?;
        let seq = k
            .get(1..9)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        match seq.and_then(|seq| ChunkInfo::from_bytes(seq, &v)) {
            Some(info) => {
                bytes += u64::from(info.bytes);
                records += u64::from(info.count);
                chunks.push_back(info);
            }
            None => tracing::error!(key = ?k, "unreadable chunk index entry ignored"),
        }
    }
    let stored_next = tree
        .get(NEXT_SEQ_KEY)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0);
    let next_seq = chunks
        .back()
        .map(|c| c.end_seq())
        .unwrap_or(0)
        .max(stored_next);
    Ok(State {
        chunks,
        bytes,
        records,
        next_seq,
        read_cursor: 0,
        tail: None,
    })
}

/// Group-commits appended records until every [`BufferWriter`] is dropped.
pub async fn run(buffer: Buffer, mut intake: Intake, shutdown: CancellationToken) {
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    loop {
        let first = tokio::select! {
            append = intake.rx.recv() => match append {
                Some(a) => a,
                None => break,
            },
            _ = housekeeping.tick() => {
                if let Err(e) = buffer.expire() {
                    tracing::error!(error = %e, "buffer expiry failed");
                }
                if let Err(e) = buffer.write_releases() {
                    tracing::error!(error = %e, "removing delivered records from the buffer failed; retrying");
                }
                buffer.update_gauges();
                continue;
            }
        };
        let mut batch = collect_batch(first, &mut intake.rx);
        linger(&buffer.shared.config, &mut batch, &mut intake.rx).await;
        commit(&buffer, batch, &shutdown).await;
    }
    if let Err(e) = buffer.flush() {
        tracing::error!(error = %e, "final buffer flush failed");
    }
    buffer.update_gauges();
}

/// Lets a trickle (serial devices, quiet MQTT) share one flush: each sled flush wakes all of sled's
/// idle IO threads, about 1 ms of CPU. A commit still holding serial frames only after
/// `commit_linger` waits until `serial_commit_linger`, as no device waits for their durability
/// (an MQTT message arriving in that time waits with them).
async fn linger(config: &BufferConfig, batch: &mut Vec<Append>, rx: &mut mpsc::Receiver<Append>) {
    let small = |batch: &Vec<Append>| batch.len() < LINGER_BELOW_RECORDS;
    if small(batch) && !config.commit_linger.is_zero() {
        tokio::time::sleep(config.commit_linger).await;
        extend_batch(batch, rx);
    }
    let serial_only = batch
        .iter()
        .all(|a| a.record.source_type == SourceType::Serial);
    let more = config
        .serial_commit_linger
        .saturating_sub(config.commit_linger);
    if serial_only && small(batch) && !more.is_zero() {
        tokio::time::sleep(more).await;
        extend_batch(batch, rx);
    }
}

fn collect_batch(first: Append, rx: &mut mpsc::Receiver<Append>) -> Vec<Append> {
    let mut batch = vec![first];
    extend_batch(&mut batch, rx);
    batch
}

/// Adds what is already waiting, up to one commit's limits.
fn extend_batch(batch: &mut Vec<Append>, rx: &mut mpsc::Receiver<Append>) {
    let mut bytes: usize = batch.iter().map(|a| a.record.payload.len()).sum();
    // One allocation for what is waiting rather than doubling up to it.
    batch.reserve(rx.len().min(COMMIT_MAX_RECORDS.saturating_sub(batch.len())));
    while batch.len() < COMMIT_MAX_RECORDS && bytes < COMMIT_MAX_BYTES {
        match rx.try_recv() {
            Ok(a) => {
                bytes += a.record.payload.len();
                batch.push(a);
            }
            Err(_) => break,
        }
    }
}

/// The records of one commit, encoded as chunks of at most [`CHUNK_MAX_BYTES`] (a bigger record
/// gets a chunk of its own).
struct Encoded {
    appends: Vec<Append>,
    chunks: Vec<ChunkWriter>,
}

impl Encoded {
    fn bytes(&self) -> usize {
        self.chunks.iter().map(ChunkWriter::len).sum()
    }
}

fn encode_batch(batch: Vec<Append>, max_bytes: u64, metrics: &Metrics) -> Option<Encoded> {
    let mut enc = Encoded {
        appends: Vec::with_capacity(batch.len()),
        chunks: Vec::new(),
    };
    for a in batch {
        let bound = record::encoded_size_bound(&a.record);
        if bound as u64 > max_bytes / 2 {
            let too_large = BufferError::TooLarge(a.record.payload.len());
            a.done.send(Err(too_large), metrics);
            continue;
        }
        match enc.chunks.last_mut() {
            Some(chunk) if chunk.len() + bound <= CHUNK_MAX_BYTES => chunk.push(&a.record),
            _ => {
                let mut chunk = ChunkWriter::new(a.record.captured_ms);
                chunk.reserve(CHUNK_MAX_BYTES.max(bound));
                chunk.push(&a.record);
                enc.chunks.push(chunk);
            }
        }
        enc.appends.push(a);
    }
    (!enc.appends.is_empty()).then_some(enc)
}

/// Numbers the commit's chunks from `first_seq`, or appends its records to the tail chunk
/// `plan_write` chose to merge into.
fn number_chunks(
    enc: Encoded,
    first_seq: u64,
    merge_into: Option<(ChunkInfo, ChunkWriter)>,
) -> (Vec<Append>, Vec<(ChunkInfo, ChunkWriter)>) {
    let chunks = match merge_into {
        Some((old, mut tail)) => {
            for a in &enc.appends {
                tail.push(&a.record);
            }
            vec![(chunk_info(old.first_seq, &tail), tail)]
        }
        None => {
            let mut seq = first_seq;
            let mut numbered = Vec::with_capacity(enc.chunks.len());
            for chunk in enc.chunks {
                let info = chunk_info(seq, &chunk);
                seq = info.end_seq();
                numbered.push((info, chunk));
            }
            numbered
        }
    };
    (enc.appends, chunks)
}

fn chunk_info(first_seq: u64, chunk: &ChunkWriter) -> ChunkInfo {
    let (first_ms, last_ms) = chunk.time_range();
    ChunkInfo {
        first_seq,
        count: chunk.count(),
        bytes: chunk.len() as u32,
        first_ms,
        last_ms,
    }
}

/// What one commit writes, decided under the state lock.
struct Plan {
    first_seq: u64,
    /// The chunk merged into: its info (already hidden from the forwarder) and value.
    merge_into: Option<(ChunkInfo, ChunkWriter)>,
}

async fn commit(buffer: &Buffer, batch: Vec<Append>, shutdown: &CancellationToken) {
    let shared = &buffer.shared;
    let Some(enc) = encode_batch(batch, shared.config.max_bytes.as_u64(), &shared.metrics) else {
        return;
    };
    let plan = match reserve(buffer, &enc, shutdown).await {
        Some(plan) => plan,
        None => return fail_all(enc.appends, &shared.metrics, || BufferError::ShuttingDown),
    };
    let count = enc.appends.len() as u32;
    let merged_info = plan.merge_into.as_ref().map(|(i, _)| *i);
    let (appends, chunks) = number_chunks(enc, plan.first_seq, plan.merge_into);
    let next_seq = plan.first_seq + u64::from(count);
    let written = write_durably(buffer.clone(), chunks, next_seq).await;
    let mut s = buffer.state();
    match written {
        Ok(chunks) => {
            // plan_write took a merged chunk out of the totals; the new info includes it.
            for (info, _) in &chunks {
                s.bytes += u64::from(info.bytes);
                s.records += u64::from(info.count);
                s.chunks.push_back(*info);
            }
            s.tail = chunks
                .into_iter()
                .last()
                .filter(|(_, chunk)| chunk.len() < MERGE_LIMIT)
                .map(|(info, chunk)| (info.first_seq, chunk));
            drop(s);
            shared.data_ready.notify_one();
            for (i, a) in appends.into_iter().enumerate() {
                a.done.send(Ok(plan.first_seq + i as u64), &shared.metrics);
            }
        }
        Err(e) => {
            // A merged chunk is still on disk unchanged: make it visible again.
            if let Some(old) = merged_info {
                s.bytes += u64::from(old.bytes);
                s.records += u64::from(old.count);
                s.chunks.push_back(old);
            }
            drop(s);
            tracing::error!(error = %e, records = count, "buffer commit failed; not acknowledged");
            let msg = e.to_string();
            fail_all(appends, &shared.metrics, || {
                BufferError::Storage(sled::Error::Io(std::io::Error::other(msg.clone())))
            });
        }
    }
}

fn fail_all(appends: Vec<Append>, metrics: &Metrics, err: impl Fn() -> BufferError) {
    for a in appends {
        a.done.send(Err(err()), metrics);
    }
}

/// Waits for (or makes) room for `enc` according to `when_full`, then plans the write.
/// `None` when shutdown came first.
async fn reserve(buffer: &Buffer, enc: &Encoded, shutdown: &CancellationToken) -> Option<Plan> {
    let shared = &buffer.shared;
    let max = shared.config.max_bytes.as_u64();
    let need = enc.bytes() as u64;
    loop {
        let freed = shared.space_freed.notified();
        {
            let mut s = buffer.state();
            let mut evicted = Vec::new();
            let was_full = s.bytes + need > max;
            // "Room again" only below 90%, so a buffer hovering at the limit does not flap the log.
            let has_room = s.bytes + need <= max - max / 10;
            if was_full && shared.config.when_full == WhenFull::DropOldest {
                evicted = s.evict_unread(|s, _| s.bytes + need > max);
            }
            let fits = s.bytes + need <= max;
            let plan = fits.then(|| plan_write(&mut s, enc));
            drop(s);
            if was_full || has_room {
                buffer.set_full(was_full);
            }
            if let Err(e) = buffer.remove_evicted(&evicted, DropReason::BufferFull) {
                tracing::error!(error = %e, "removing evicted chunks failed");
            }
            if plan.is_some() {
                return plan;
            }
            // Whatever is left is in flight to Kafka and is released as confirmations arrive.
        }
        tokio::select! {
            _ = freed => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

fn plan_write(s: &mut State, enc: &Encoded) -> Plan {
    let first_seq = s.next_seq;
    let mergeable = match (s.chunks.back(), &s.tail) {
        (Some(back), Some((tail_seq, tail))) => {
            *tail_seq == back.first_seq
                && back.end_seq() == first_seq
                && back.first_seq >= s.read_cursor
                && enc.chunks.len() == 1
                && tail.len() + enc.bytes() <= MERGE_LIMIT
        }
        _ => false,
    };
    s.next_seq += enc.appends.len() as u64;
    let merge_into = if mergeable {
        // Hidden from the forwarder until the merged chunk is durable.
        let info = s.chunks.pop_back();
        let value = s.tail.take().map(|(_, v)| v);
        info.zip(value).map(|(info, value)| {
            s.bytes -= u64::from(info.bytes);
            s.records -= u64::from(info.count);
            (info, value)
        })
    } else {
        None
    };
    Plan {
        first_seq,
        merge_into,
    }
}

/// Writes the chunks, their index entries and the sequence high-water mark atomically, then
/// fsyncs. Gives the chunks back so the last one can stay the mergeable tail.
async fn write_durably(
    buffer: Buffer,
    chunks: Vec<(ChunkInfo, ChunkWriter)>,
    next_seq: u64,
) -> Result<Vec<(ChunkInfo, ChunkWriter)>, BufferError> {
    let metrics = buffer.shared.metrics.clone();
    let _running = metrics.health.begin(Stage::BufferCommit);
    let joined = tokio::task::spawn_blocking(move || {
        let shared = &buffer.shared;
        let mut batch = sled::Batch::default();
        for (info, chunk) in &chunks {
            batch.insert(&chunk_key(info.first_seq), chunk.value());
            batch.insert(&info_key(info.first_seq), &info.to_bytes());
        }
        batch.insert(NEXT_SEQ_KEY, &next_seq.to_le_bytes());
        let released = shared.take_releases(&mut batch);
        if let Err(e) = shared.tree.apply_batch(batch) {
            shared.restore_releases(released);
            return Err(e.into());
        }
        shared.make_durable()?;
        Ok(chunks)
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err(BufferError::Storage(sled::Error::Io(
            std::io::Error::other(e),
        )))
    })
}

pub mod tools;

#[cfg(test)]
mod tests;
