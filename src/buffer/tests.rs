use super::*;
use crate::config::WhenFull;
use crate::metrics::DropReason;
use crate::record::SourceType;
use crate::record::{self, now_ms, ChunkWriter, NewRecord};
use bytesize::ByteSize;
use tokio_util::sync::CancellationToken;

fn rec(i: u32, size: usize) -> NewRecord {
    let mut payload = i.to_be_bytes().to_vec();
    payload.resize(size.max(4), 0xAB);
    NewRecord {
        captured_ms: now_ms(),
        source: Arc::from("s"),
        source_type: SourceType::Mqtt,
        meta: vec![("topic".into(), format!("t/{i}"))],
        payload,
    }
}

struct Harness {
    buffer: Buffer,
    writer: BufferWriter,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BufferError>>,
}

fn open(dir: &Path, config: BufferConfig) -> Harness {
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) = Buffer::open(dir, &config, metrics.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(buffer.clone(), intake, shutdown.clone()));
    Harness {
        buffer,
        writer,
        metrics,
        shutdown,
        task,
    }
}

impl Harness {
    async fn close(self) {
        self.shutdown.cancel();
        drop(self.writer);
        self.task.await.unwrap().unwrap();
    }

    /// Reads every unread chunk now available.
    fn drain_unread(&self) -> Vec<ReadChunk> {
        let mut out = Vec::new();
        while let Some(c) = self.buffer.try_next_chunk().unwrap() {
            out.push(c);
        }
        out
    }
}

fn seqs(chunks: &[ReadChunk]) -> Vec<u64> {
    chunks
        .iter()
        .flat_map(|c| c.records.iter().map(|r| r.seq))
        .collect()
}

#[tokio::test]
async fn appended_records_come_back_in_order_and_release_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    for i in 0..100 {
        assert_eq!(h.writer.append(rec(i, 200)).await.unwrap(), u64::from(i));
    }
    let chunks = h.drain_unread();
    assert_eq!(seqs(&chunks), (0..100).collect::<Vec<_>>());
    assert_eq!(chunks[0].records[0].payload, rec(0, 200).payload);
    assert_eq!(h.buffer.stats().records, 100);
    for c in &chunks {
        h.buffer.release_parts(&c.parts).unwrap();
    }
    assert_eq!(h.buffer.stats().records, 0);
    assert_eq!(h.buffer.stats().bytes, 0);
    h.close().await;
}

#[tokio::test]
async fn small_sequential_commits_are_merged_into_few_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    for i in 0..500 {
        h.writer.append(rec(i, 100)).await.unwrap();
    }
    let stats = h.buffer.stats();
    assert_eq!(stats.records, 500);
    // 500 x ~110 bytes in ~7.5 KiB chunks: a handful, not 500.
    assert!(stats.chunks <= 8, "{} chunks", stats.chunks);
    assert_eq!(seqs(&h.drain_unread()), (0..500).collect::<Vec<_>>());
    h.close().await;
}

#[tokio::test]
async fn a_large_commit_is_cut_into_chunks_sled_keeps_inline() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    // sled writes a leaf (up to 17 items) bigger than a quarter segment as an uncached blob.
    let inline_limit = SEGMENT_SIZE / 4 / 17;
    // Submitted together, so they share one group commit; one record is bigger than a chunk.
    let mut pending = Vec::new();
    for i in 0..300 {
        let size = if i == 150 { 3 * inline_limit } else { 1000 };
        pending.push(h.writer.submit(rec(i, size)).await.unwrap());
    }
    for p in pending {
        p.durable().await.unwrap();
    }
    let stored: Vec<ChunkInfo> = h.buffer.state().chunks.iter().copied().collect();
    assert!(
        stored.len() >= 300 * 1000 / inline_limit,
        "{} chunks",
        stored.len()
    );
    for c in &stored {
        assert!(c.count == 1 || c.bytes as usize <= inline_limit, "{c:?}");
    }
    // Read back joined into units of work, in order.
    let read = h.drain_unread();
    assert_eq!(seqs(&read), (0..300).collect::<Vec<_>>());
    assert!(read.len() < stored.len());
    let parts: Vec<u64> = read.iter().flat_map(|r| r.parts.clone()).collect();
    assert_eq!(
        parts,
        stored.iter().map(|c| c.first_seq).collect::<Vec<_>>()
    );
    for r in &read {
        h.buffer.release_parts(&r.parts).unwrap();
    }
    assert_eq!(h.buffer.stats().records, 0);
    h.close().await;
}

#[tokio::test]
async fn a_chunk_being_read_is_never_merged_into() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    h.writer.append(rec(0, 10)).await.unwrap();
    let first = h.drain_unread();
    h.writer.append(rec(1, 10)).await.unwrap();
    let second = h.drain_unread();
    assert_eq!(seqs(&first), vec![0]);
    assert_eq!(seqs(&second), vec![1]);
    h.close().await;
}

#[tokio::test]
async fn undelivered_records_survive_reopen_and_sequence_never_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    for i in 0..10 {
        h.writer.append(rec(i, 50)).await.unwrap();
    }
    // Deliver everything: the high-water mark must still survive.
    for c in h.drain_unread() {
        h.buffer.release_parts(&c.parts).unwrap();
    }
    for i in 10..15 {
        h.writer.append(rec(i, 50)).await.unwrap();
    }
    h.close().await;

    let h = open(dir.path(), BufferConfig::default());
    let chunks = h.drain_unread();
    assert_eq!(seqs(&chunks), (10..15).collect::<Vec<_>>());
    assert_eq!(h.writer.append(rec(99, 50)).await.unwrap(), 15);
    h.close().await;
}

#[tokio::test]
async fn second_open_of_the_same_buffer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    let again = Buffer::open(
        dir.path(),
        &BufferConfig::default(),
        Arc::new(Metrics::new()),
    );
    assert!(
        matches!(again, Err(BufferError::Locked(_))),
        "{:?}",
        again.err()
    );
    h.close().await;
}

fn small(when_full: WhenFull) -> BufferConfig {
    BufferConfig {
        max_bytes: ByteSize::kib(64),
        when_full,
        ..BufferConfig::default()
    }
}

#[tokio::test]
async fn drop_oldest_evicts_oldest_unread_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), small(WhenFull::DropOldest));
    h.writer.append(rec(0, 1000)).await.unwrap();
    let in_flight = h.drain_unread();
    for i in 1..400 {
        h.writer.append(rec(i, 1000)).await.unwrap();
    }
    let stats = h.buffer.stats();
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    let dropped = h.metrics.dropped(DropReason::BufferFull);
    assert!(dropped > 300, "dropped {dropped}");
    let rest = seqs(&h.drain_unread());
    // The in-flight record survived; the newest are kept, contiguous to the end.
    assert_eq!(seqs(&in_flight), vec![0]);
    assert_eq!(*rest.last().unwrap(), 399);
    assert_eq!(rest.len() as u64 + dropped, 399);
    h.close().await;
}

#[tokio::test]
async fn block_waits_for_space_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), small(WhenFull::Block));
    let mut n = 0;
    // Fill until an append no longer completes.
    loop {
        let pending = h.writer.submit(rec(n, 1000)).await.unwrap();
        n += 1;
        match tokio::time::timeout(Duration::from_millis(300), pending.durable()).await {
            Ok(r) => {
                r.unwrap();
            }
            Err(_) => break,
        }
    }
    assert!(n > 30 && n < 80, "blocked after {n}");
    assert_eq!(h.metrics.dropped(DropReason::BufferFull), 0);
    // Deliver everything; the blocked record then lands.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < n as usize && tokio::time::Instant::now() < deadline {
        for c in h.drain_unread() {
            got.extend(c.records.iter().map(|r| r.seq));
            h.buffer.release_parts(&c.parts).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, (0..u64::from(n)).collect::<Vec<_>>());
    h.close().await;
}

#[tokio::test]
async fn records_older_than_max_age_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_age: Some(Duration::from_secs(60)),
        ..BufferConfig::default()
    };
    let h = open(dir.path(), config);
    let mut old = rec(0, 10);
    old.captured_ms -= 120_000;
    h.writer.append(old).await.unwrap();
    h.buffer.expire().unwrap();
    // Merged into one chunk with the old one would keep it alive; the fresh one comes after.
    assert_eq!(h.metrics.dropped(DropReason::MaxAge), 1);
    h.writer.append(rec(1, 10)).await.unwrap();
    h.buffer.expire().unwrap();
    assert_eq!(seqs(&h.drain_unread()), vec![1]);
    h.close().await;
}

#[tokio::test]
async fn rewind_hands_out_the_same_records_again() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    for i in 0..5 {
        h.writer.append(rec(i, 10)).await.unwrap();
    }
    let first = seqs(&h.drain_unread());
    assert!(h.drain_unread().is_empty());
    h.buffer.rewind(0);
    assert_eq!(seqs(&h.drain_unread()), first);
    h.close().await;
}

#[tokio::test]
async fn a_record_larger_than_the_buffer_is_refused_not_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), small(WhenFull::Block));
    let err = h.writer.append(rec(0, 200 * 1024)).await;
    assert!(matches!(err, Err(BufferError::TooLarge(_))), "{err:?}");
    h.writer.append(rec(1, 10)).await.unwrap();
    h.close().await;
}

#[tokio::test]
async fn corrupt_chunks_are_quarantined_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    h.writer.append(rec(0, 10)).await.unwrap();
    h.buffer
        .shared
        .tree
        .insert(chunk_key(0), &[record::CHUNK_FORMAT, 0xff, 0xff][..])
        .unwrap();
    assert!(h.buffer.try_next_chunk().unwrap().is_none());
    assert_eq!(h.metrics.dropped(DropReason::Corrupt), 1);
    assert!(h
        .buffer
        .shared
        .tree
        .get(quarantine_key(0))
        .unwrap()
        .is_some());
    h.close().await;
}

/// Found by fuzzing (buffer_read): a chunk whose bytes decode to another number of records than
/// its index entry counts (here none of 2313) was handed to the forwarder as it was. The records
/// missing were released without being counted, and surplus ones would have taken the sequence
/// numbers of the next chunk's, whose confirmations the forwarder counts by them.
#[tokio::test]
async fn a_chunk_holding_another_number_of_records_than_its_index_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    let good = |i| {
        let mut chunk = ChunkWriter::new(0);
        chunk.push(&rec(i, 10));
        chunk
    };
    let first = good(1);
    h.buffer
        .store_raw_chunk(first.count(), first.value())
        .unwrap();
    // The fuzzer's input: a format-2 chunk of a base time and no records, said to hold 2313.
    let bad = h
        .buffer
        .store_raw_chunk(2313, &[record::CHUNK_FORMAT, 0x54])
        .unwrap();
    let last = good(2);
    h.buffer
        .store_raw_chunk(last.count(), last.value())
        .unwrap();
    let read = h.drain_unread();
    for chunk in &read {
        assert_eq!(
            chunk.records.len(),
            chunk.info.count as usize,
            "{:?}",
            chunk.parts
        );
    }
    assert_eq!(seqs(&read), [0, 2314]);
    assert_eq!(h.metrics.dropped(DropReason::Corrupt), 2313);
    assert!(h
        .buffer
        .shared
        .tree
        .get(quarantine_key(bad))
        .unwrap()
        .is_some());
    h.close().await;
}

#[tokio::test]
async fn serial_only_commits_linger_longer_than_acknowledged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        commit_linger: Duration::ZERO,
        serial_commit_linger: Duration::from_millis(400),
        ..BufferConfig::default()
    };
    let h = open(dir.path(), config);
    let started = std::time::Instant::now();
    h.writer.append(rec(0, 10)).await.unwrap();
    let mqtt = started.elapsed();
    let mut frame = rec(1, 10);
    frame.source_type = SourceType::Serial;
    let started = std::time::Instant::now();
    h.writer.append(frame).await.unwrap();
    let serial = started.elapsed();
    assert!(serial >= Duration::from_millis(400), "{serial:?}");
    assert!(mqtt < Duration::from_millis(400), "{mqtt:?}");
    h.close().await;
}

#[tokio::test]
async fn try_submit_hands_the_record_back_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) =
        Buffer::open(dir.path(), &BufferConfig::default(), metrics).unwrap();
    // No commit task yet: the intake fills up.
    let mut pending = Vec::new();
    let returned = loop {
        let i = pending.len() as u32;
        match writer.try_submit(rec(i, 50)) {
            Ok(p) => pending.push(p),
            Err(TrySubmit::Full(record)) => break record,
            Err(TrySubmit::ShuttingDown) => panic!("buffer is open"),
        }
        assert!(pending.len() <= INTAKE_CAPACITY);
    };
    assert_eq!(pending.len(), INTAKE_CAPACITY);
    assert_eq!(returned.payload, rec(INTAKE_CAPACITY as u32, 50).payload);

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(buffer.clone(), intake, shutdown.clone()));
    for (seq, p) in pending.into_iter().enumerate() {
        assert_eq!(p.durable().await.unwrap(), seq as u64);
    }
    shutdown.cancel();
    drop(writer);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn released_chunks_leave_sled_with_the_next_commit_or_flush() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    let on_disk = |first_seq: u64| {
        let tree = &h.buffer.shared.tree;
        let chunk = tree.get(chunk_key(first_seq)).unwrap().is_some();
        assert_eq!(chunk, tree.get(info_key(first_seq)).unwrap().is_some());
        chunk
    };
    h.writer.append(rec(0, 50)).await.unwrap();
    let first = h.drain_unread();
    h.buffer.release_parts(&first[0].parts).unwrap();
    assert_eq!(h.buffer.stats().records, 0);
    // No sled batch of its own: the removal waits for company.
    assert!(on_disk(0));
    h.writer.append(rec(1, 50)).await.unwrap();
    assert!(!on_disk(0), "the commit did not take the release along");
    let second = h.drain_unread();
    h.buffer.release_parts(&second[0].parts).unwrap();
    assert!(on_disk(1));
    h.buffer.flush().unwrap();
    assert!(!on_disk(1), "flush did not write the release");
    h.close().await;
}

#[tokio::test]
async fn unacked_records_give_their_quota_back_and_count_when_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_bytes: ByteSize::kb(64),
        ..BufferConfig::default()
    };
    let h = open(dir.path(), config);
    let quota = Arc::new(tokio::sync::Semaphore::new(2));
    for (i, size) in [(0, 50), (1, 100_000)] {
        let unacked = Unacked {
            record: rec(i, size),
            quota: quota.clone().try_acquire_owned().unwrap(),
        };
        h.writer.submit_unacked(unacked).await.unwrap();
    }
    // The second is larger than half the buffer: never stored, but its quota comes back too.
    let all_back = tokio::time::timeout(Duration::from_secs(10), quota.acquire_many(2)).await;
    assert!(all_back.is_ok(), "quota not given back");
    assert_eq!(seqs(&h.drain_unread()), vec![0]);
    assert_eq!(h.metrics.dropped(DropReason::NotStored), 1);
    h.close().await;
}

/// Submits `n` records of `size` bytes without yielding, so they wait in the intake together.
fn burst(h: &Harness, n: u32, size: usize) -> Vec<PendingAppend> {
    (0..n)
        .map(|i| match h.writer.try_submit(rec(i, size)) {
            Ok(pending) => pending,
            Err(_) => panic!("intake full at {i}"),
        })
        .collect()
}

#[tokio::test]
async fn a_burst_larger_than_the_buffer_is_committed_in_parts_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_bytes: ByteSize::mib(1),
        ..small(WhenFull::Block)
    };
    let h = open(dir.path(), config);
    // 1.5 MB waiting at once once made one commit larger than the whole buffer: it never fit.
    let pending = burst(&h, 3000, 500);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < pending.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} records committed",
            got.len(),
            pending.len()
        );
        // Deliver what was committed, as the forwarder does.
        for c in h.drain_unread() {
            got.extend(c.records.iter().map(|r| r.seq));
            h.buffer.release_parts(&c.parts).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, (0..3000).collect::<Vec<_>>());
    for p in pending {
        p.durable().await.unwrap();
    }
    h.close().await;
}

#[tokio::test]
async fn expiry_makes_room_while_a_commit_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_bytes: ByteSize::mib(1),
        max_age: Some(Duration::from_secs(2)),
        ..small(WhenFull::Block)
    };
    let h = open(dir.path(), config);
    // Nothing reads: with the buffer full, only expiry can make room for the rest of the burst.
    let pending = burst(&h, 200, 8000);
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        for p in pending {
            p.durable().await.unwrap();
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "the burst still waits; expired: {}",
        h.metrics.dropped(DropReason::MaxAge)
    );
    assert!(h.metrics.dropped(DropReason::MaxAge) > 0);
    h.close().await;
}

#[tokio::test]
async fn a_large_record_is_stored_in_pieces_and_no_value_becomes_a_blob() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), BufferConfig::default());
    let big = rec(0, 300 * 1024);
    h.writer.append(big.clone()).await.unwrap();
    h.writer.append(rec(1, 10)).await.unwrap();
    let blobs = std::fs::read_dir(dir.path().join("buffer/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "sled wrote a value over its blob limit");
    let chunks = h.drain_unread();
    assert_eq!(seqs(&chunks), vec![0, 1]);
    assert_eq!(chunks[0].records[0].payload, big.payload);
    for c in &chunks {
        h.buffer.release_parts(&c.parts).unwrap();
    }
    h.buffer.flush().unwrap();
    // Every piece left with its chunk.
    assert_eq!(h.buffer.shared.tree.scan_prefix([b'c']).count(), 0);
    h.close().await;
}
