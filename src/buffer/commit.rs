//! Group commit: appended records become durable chunks, and only then are acknowledged.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::space::DiskRoom;
use super::*;
use crate::config::{BufferConfig, WhenFull};
use crate::metrics::{DropReason, Metrics};
use crate::record::{self, ChunkWriter, NewRecord, SourceType};
use crate::watchdog::Stage;

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
    fn into_append(self, room: OwnedSemaphorePermit) -> Append {
        Append {
            record: self.record,
            done: Done::Quota(self.quota),
            _room: room,
        }
    }
}

/// What sources use to append records. Cheap to clone; the buffer's `run` ends when all are gone.
#[derive(Clone)]
pub struct BufferWriter {
    tx: mpsc::Sender<Append>,
    /// `buffer.intake_max_bytes`, one permit a byte: what records submitted and not yet durable
    /// may take in memory. Counting records alone let 1,000 messages of 2 MiB wait (measured:
    /// 500 MB RSS for a burst of 150).
    room: Arc<Semaphore>,
    room_max: u32,
}

struct Append {
    record: NewRecord,
    done: Done,
    /// Given back when the commit is over and the record leaves memory.
    _room: OwnedSemaphorePermit,
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

/// The sources' end and the committer's end of the intake queue.
pub(super) fn intake(config: &BufferConfig) -> (BufferWriter, Intake) {
    let (tx, rx) = mpsc::channel(INTAKE_CAPACITY);
    let room_max = config.intake_max_bytes.as_u64().min(u64::from(u32::MAX)) as u32;
    let room = Arc::new(Semaphore::new(room_max as usize));
    // With records of at most half of max_bytes (`encode_batch`), a commit of at most a quarter
    // always fits an empty buffer; a larger one could wait for room forever.
    let commit_max_bytes = COMMIT_MAX_BYTES.min(config.max_bytes.as_u64() as usize / 4);
    (
        BufferWriter { tx, room, room_max },
        Intake {
            rx,
            commit_max_bytes,
        },
    )
}

/// The receiving end of the writers, consumed by [`run`].
pub struct Intake {
    rx: mpsc::Receiver<Append>,
    /// Encoded bytes one commit gathers at most (a last record may go past it).
    commit_max_bytes: usize,
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
    /// Queues a record for the next group commit; waits while the intake is full.
    pub async fn submit(&self, record: NewRecord) -> Result<PendingAppend, BufferError> {
        let room = self.room_for(&record).await?;
        let (done, rx) = oneshot::channel();
        let done = Done::Reply(done);
        self.enqueue(Append {
            record,
            done,
            _room: room,
        })
        .await?;
        Ok(PendingAppend(rx))
    }

    /// Queues a record nobody acknowledges; waits while the intake is full.
    pub async fn submit_unacked(&self, unacked: Unacked) -> Result<(), BufferError> {
        let room = self.room_for(&unacked.record).await?;
        self.enqueue(unacked.into_append(room)).await
    }

    async fn enqueue(&self, append: Append) -> Result<(), BufferError> {
        self.tx
            .send(append)
            .await
            .map_err(|_| BufferError::ShuttingDown)
    }

    /// The intake room a record takes: its encoded size, but never more than the whole intake,
    /// so that a record larger than `intake_max_bytes` still passes, alone.
    fn room_needed(&self, record: &NewRecord) -> u32 {
        (record::encoded_size_bound(record) as u64).min(u64::from(self.room_max)) as u32
    }

    async fn room_for(&self, record: &NewRecord) -> Result<OwnedSemaphorePermit, BufferError> {
        let needed = self.room_needed(record);
        self.room
            .clone()
            .acquire_many_owned(needed)
            .await
            .map_err(|_| BufferError::ShuttingDown)
    }

    fn try_room_for(&self, record: &NewRecord) -> Option<OwnedSemaphorePermit> {
        let needed = self.room_needed(record);
        self.room.clone().try_acquire_many_owned(needed).ok()
    }

    /// `submit_unacked` without waiting; the record and its quota come back when the intake is
    /// full.
    pub fn try_submit_unacked(&self, unacked: Unacked) -> Result<(), TrySubmit<Unacked>> {
        let Some(room) = self.try_room_for(&unacked.record) else {
            return Err(TrySubmit::Full(unacked));
        };
        self.tx
            .try_send(unacked.into_append(room))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(Append {
                    record,
                    done: Done::Quota(quota),
                    ..
                }) => TrySubmit::Full(Unacked { record, quota }),
                // Closed; a full queue always hands back the `Quota` built above.
                _ => TrySubmit::ShuttingDown,
            })
    }

    /// `submit` without waiting: the record comes back when the intake is full, so the caller
    /// can wait for room alongside its shutdown signal only when it has to.
    pub fn try_submit(&self, record: NewRecord) -> Result<PendingAppend, TrySubmit> {
        let Some(room) = self.try_room_for(&record) else {
            return Err(TrySubmit::Full(record));
        };
        let (done, rx) = oneshot::channel();
        let append = Append {
            record,
            done: Done::Reply(done),
            _room: room,
        };
        match self.tx.try_send(append) {
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

/// Group-commits appended records until every [`BufferWriter`] is dropped.
/// Group-commits appended records until every [`BufferWriter`] is dropped. Ends early with
/// [`BufferError::Failed`] when a write to the disk failed; nothing is acknowledged after that.
pub async fn run(
    buffer: Buffer,
    mut intake: Intake,
    shutdown: CancellationToken,
) -> Result<(), BufferError> {
    let failed = buffer.shared.failure.signal.clone();
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    loop {
        let first = tokio::select! {
            biased;
            _ = failed.cancelled() => break,
            append = intake.rx.recv() => match append {
                Some(a) => a,
                None => break,
            },
            _ = housekeeping.tick() => {
                buffer.housekeeping();
                continue;
            }
        };
        let mut batch = vec![first];
        intake.extend_batch(&mut batch);
        linger(&buffer.shared.config, &mut batch, &mut intake).await;
        commit(&buffer, batch, &shutdown).await;
    }
    // Dropping the intake now fails every queued append: none of them is acknowledged.
    drop(intake);
    buffer.shared.check_failed()?;
    let flushed = buffer.flush();
    buffer.update_gauges();
    flushed
}

/// Lets a trickle (serial devices, quiet MQTT) share one flush: each sled flush wakes all of sled's
/// idle IO threads, about 1 ms of CPU. A commit still holding serial frames only after
/// `commit_linger` waits until `serial_commit_linger`, as no device waits for their durability
/// (an MQTT message arriving in that time waits with them).
async fn linger(config: &BufferConfig, batch: &mut Vec<Append>, intake: &mut Intake) {
    let small = |batch: &Vec<Append>| batch.len() < LINGER_BELOW_RECORDS;
    if small(batch) && !config.commit_linger.is_zero() {
        tokio::time::sleep(config.commit_linger).await;
        intake.extend_batch(batch);
    }
    let serial_only = batch
        .iter()
        .all(|a| a.record.source_type == SourceType::Serial);
    let more = config
        .serial_commit_linger
        .saturating_sub(config.commit_linger);
    if serial_only && small(batch) && !more.is_zero() {
        tokio::time::sleep(more).await;
        intake.extend_batch(batch);
    }
}

impl Intake {
    /// Adds what is already waiting, up to one commit's limits.
    fn extend_batch(&mut self, batch: &mut Vec<Append>) {
        let size = |a: &Append| record::encoded_size_bound(&a.record);
        let mut bytes: usize = batch.iter().map(size).sum();
        // One allocation for what is waiting rather than doubling up to it.
        let rx = &mut self.rx;
        batch.reserve(rx.len().min(COMMIT_MAX_RECORDS.saturating_sub(batch.len())));
        while batch.len() < COMMIT_MAX_RECORDS && bytes < self.commit_max_bytes {
            match rx.try_recv() {
                Ok(a) => {
                    bytes += size(&a);
                    batch.push(a);
                }
                Err(_) => break,
            }
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

pub(super) fn chunk_info(first_seq: u64, chunk: &ChunkWriter) -> ChunkInfo {
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
    let (appends, chunks) = number_chunks(enc, plan.first_seq, plan.merge_into);
    let next_seq = plan.first_seq + u64::from(count);
    let written = write_durably(buffer.clone(), chunks, next_seq).await;
    // A failure elsewhere since (a removal, a flush) may have been an fsync error that also
    // covered this commit's pages: acknowledge nothing once the buffer failed.
    let written = written.and_then(|chunks| shared.check_failed().map(|()| chunks));
    let chunks = match written {
        Ok(chunks) => chunks,
        Err(e) => {
            // State and disk may now differ (a merged chunk may be on disk or not); the gateway
            // stops and reopens the buffer from disk, so there is nothing to put back here.
            tracing::debug!(error = %e, records = count, "buffer commit failed; not acknowledged");
            let reason = match shared.check_failed().err().unwrap_or(e) {
                BufferError::Failed(reason) => reason,
                other => other.to_string(),
            };
            return fail_all(appends, &shared.metrics, || {
                BufferError::Failed(reason.clone())
            });
        }
    };
    let mut s = buffer.state();
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

fn fail_all(appends: Vec<Append>, metrics: &Metrics, err: impl Fn() -> BufferError) {
    for a in appends {
        a.done.send(Err(err()), metrics);
    }
}

/// Waits for (or makes) room for `enc` according to `when_full`, then plans the write.
/// `None` when shutdown came first.
async fn reserve(buffer: &Buffer, enc: &Encoded, shutdown: &CancellationToken) -> Option<Plan> {
    let shared = &buffer.shared;
    let max_bytes = shared.config.max_bytes.as_u64();
    let need = enc.bytes() as u64;
    loop {
        let freed = shared.space_freed.notified();
        {
            let mut s = buffer.state();
            let disk = shared.disk.room(s.bytes, &shared.metrics);
            let max = match disk {
                DiskRoom::Plenty => max_bytes,
                DiskRoom::HoldAt(cap) => cap.min(max_bytes),
                DiskRoom::Critical => 0,
            };
            let mut evicted = Vec::new();
            let was_full = s.bytes + need > max;
            // "Room again" only below 90%, so a buffer hovering at the limit does not flap the log.
            let has_room = s.bytes + need <= max - max / 10;
            // Evicting for a batch that could not fit even then would only lose records.
            let may_evict = disk != DiskRoom::Critical && need <= max;
            if was_full && may_evict && shared.config.when_full == WhenFull::DropOldest {
                evicted = s.evict_unread(|s, _| s.bytes + need > max);
            }
            let fits = s.bytes + need <= max;
            let plan = fits.then(|| plan_write(&mut s, enc));
            drop(s);
            if was_full || has_room {
                buffer.set_full(was_full);
            }
            // A failure is the buffer's (logged once); `commit` then acknowledges nothing.
            let _ = buffer.remove_evicted(&evicted, DropReason::BufferFull);
            if plan.is_some() {
                return plan;
            }
            // Whatever is left is in flight to Kafka and is released as confirmations arrive.
        }
        tokio::select! {
            _ = freed => {}
            // `run` waits here and not in its housekeeping loop; expiry is what frees room while
            // Kafka is away, so it must go on.
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {
                let _ = buffer.expire();
                // Housekeeping does not run while the commit waits here; the gauges still must.
                buffer.update_gauges();
            }
            _ = shared.failure.signal.cancelled() => return None,
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
    let failing = buffer.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let shared = &buffer.shared;
        let mut batch = sled::Batch::default();
        for (info, chunk) in &chunks {
            insert_chunk(&mut batch, info, chunk.value());
        }
        batch.insert(NEXT_SEQ_KEY, &next_seq.to_le_bytes());
        shared.take_releases(&mut batch);
        shared.write("commit", || {
            shared.tree.apply_batch(batch)?;
            shared.make_durable()
        })?;
        Ok(chunks)
    })
    .await;
    joined.unwrap_or_else(|e| {
        // A panic inside sled: whatever it did to the disk is unknown.
        let e = BufferError::Failed(e.to_string());
        failing.shared.fail("commit", &e);
        Err(e)
    })
}
