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

use tokio::sync::Notify;

use crate::config::BufferConfig;
use crate::metrics::Metrics;
use crate::record::{ChunkWriter, DecodeError, Record};

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
    /// A write to the disk failed after it started, so the buffer stopped taking and
    /// acknowledging records. Do not acknowledge; fatal for the process: exit non-zero, and the
    /// restarted gateway reopens the buffer from disk, where every acknowledged record is.
    #[error("buffer storage failed, nothing more is acknowledged: {0}")]
    Failed(String),
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

/// A stored chunk's records. One that decodes to another number of records than its index entry
/// counts is corrupt too: the missing records would leave uncounted, and surplus ones would take
/// the next chunk's sequence numbers, by which the forwarder counts confirmations.
fn decode_stored(info: &ChunkInfo, value: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let records = crate::record::decode_chunk(info.first_seq, value)?;
    if records.len() != info.count as usize {
        return Err(DecodeError::Count {
            expected: info.count,
            found: records.len(),
        });
    }
    Ok(records)
}

fn chunk_key(seq: u64) -> [u8; 9] {
    prefixed(b'c', seq)
}

/// A chunk value is stored in pieces of at most this size: the first under its `chunk_key`, the
/// others under that key plus the piece number. No sled value may become a blob: sled keeps blob
/// pages in its cache for good (counted by the size of a pointer, never evicted), so a burst of
/// 150 MQTT messages of 2 MiB held 390 MB of RSS, and it writes them to files of their own.
const PIECE_MAX_BYTES: usize = CHUNK_MAX_BYTES;

fn piece_key(seq: u64, piece: u32) -> Vec<u8> {
    let mut key = chunk_key(seq).to_vec();
    if piece > 0 {
        key.extend_from_slice(&piece.to_be_bytes());
    }
    key
}

/// How many pieces a chunk value of `bytes` is stored in.
fn pieces(bytes: u32) -> u32 {
    (bytes as usize).div_ceil(PIECE_MAX_BYTES).max(1) as u32
}

/// Adds a chunk (its value in pieces) and its index entry to `batch`.
fn insert_chunk(batch: &mut sled::Batch, info: &ChunkInfo, value: &[u8]) {
    for (piece, bytes) in (0..).zip(value.chunks(PIECE_MAX_BYTES)) {
        batch.insert(piece_key(info.first_seq, piece), bytes);
    }
    batch.insert(&info_key(info.first_seq), &info.to_bytes());
}

/// Adds the removal of a chunk of `bytes` (every piece) and of its index entry to `batch`.
fn remove_chunk(batch: &mut sled::Batch, first_seq: u64, bytes: u32) {
    for piece in 0..pieces(bytes) {
        batch.remove(piece_key(first_seq, piece));
    }
    batch.remove(&info_key(first_seq));
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
/// Forward steps of the system clock seen so far, for `max_age` (see `clock.rs`).
const CLOCK_STEPS_KEY: &[u8] = b"mclock_steps";

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
    released: Mutex<Vec<Released>>,
    failure: Failure,
    disk: space::DiskSpace,
    clock: clock::ClockSteps,
}

/// A released chunk still in sled: its first sequence number and its size (for its pieces).
type Released = (u64, u32);

/// The first storage error after a write started. sled's memory may then differ from its disk,
/// and after a failed fsync the kernel may have dropped the very pages it could not write (a
/// retry can succeed without them), so the only safe course is to acknowledge nothing more and let
/// the process restart and reopen the buffer from what is really on disk.
#[derive(Default)]
struct Failure {
    reason: std::sync::OnceLock<String>,
    signal: tokio_util::sync::CancellationToken,
}

/// The forwarder's (and tooling's) handle on the buffer. Cheap to clone.
#[derive(Clone)]
pub struct Buffer {
    shared: Arc<Shared>,
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
        let clock_steps = load_clock_steps(&tree)?;
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
            failure: Failure::default(),
            disk: space::DiskSpace::new(&dir, config),
            clock: clock::ClockSteps::load(&clock_steps),
        });
        let buffer = Buffer { shared };
        buffer.update_gauges();
        let (writer, intake) = commit::intake(config);
        Ok((buffer, writer, intake))
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
    /// Records a storage error after a write started (see [`Failure`]); logged once.
    fn fail(&self, during: &str, error: &BufferError) {
        let reason = format!("{during}: {error}");
        if self.failure.reason.set(reason).is_ok() {
            tracing::error!(during, %error,
                "buffer storage failed; acknowledging nothing more and stopping, so that the buffer reopens from disk");
        }
        self.failure.signal.cancel();
    }

    /// `Err` once a write failed: nothing may be acknowledged any more.
    fn check_failed(&self) -> Result<(), BufferError> {
        match self.failure.reason.get() {
            Some(reason) => Err(BufferError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Runs a write to sled; an error from it is fatal for the buffer (see [`Failure`]).
    fn write<T>(
        &self,
        during: &str,
        write: impl FnOnce() -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        self.check_failed()?;
        write().inspect_err(|e| self.fail(during, e))
    }

    fn released(&self) -> MutexGuard<'_, Vec<Released>> {
        self.released
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds the removal of every released chunk to `batch`.
    fn take_releases(&self, batch: &mut sled::Batch) -> Vec<Released> {
        let taken = std::mem::take(&mut *self.released());
        for &(first_seq, bytes) in &taken {
            remove_chunk(batch, first_seq, bytes);
        }
        taken
    }

    /// A stored chunk's value, joined from its pieces; `None` when it is not there.
    fn read_chunk(&self, info: &ChunkInfo) -> Result<Option<sled::IVec>, BufferError> {
        if pieces(info.bytes) == 1 {
            return Ok(self.tree.get(chunk_key(info.first_seq))?);
        }
        // Also reads a chunk written whole by an older version (one value over the piece size).
        let mut value = Vec::with_capacity(info.bytes as usize);
        for piece in self.tree.scan_prefix(chunk_key(info.first_seq)) {
            value.extend_from_slice(&piece?.1);
        }
        Ok((!value.is_empty()).then(|| value.into()))
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

fn load_clock_steps(tree: &sled::Tree) -> Result<Vec<u8>, BufferError> {
    Ok(tree
        .get(CLOCK_STEPS_KEY)?
        .map(|v| v.to_vec())
        .unwrap_or_default())
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
mod clock;
mod commit;
#[cfg(any(test, feature = "fuzzing"))]
mod fuzzing;
mod housekeeping;
mod read;
mod space;
pub mod tools;

pub use commit::{run, BufferWriter, Intake, PendingAppend, TrySubmit, Unacked};
pub use read::ReadChunk;

#[cfg(test)]
mod tests;
