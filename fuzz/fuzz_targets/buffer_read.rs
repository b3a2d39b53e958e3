#![no_main]

//! The buffer's read path over a chunk whose bytes went bad on disk: a real buffer (sled, in a
//! temporary directory; `scripts/fuzz` puts it in /dev/shm), a good chunk, the fuzzed chunk (its
//! index entry claiming some number of records), another good chunk, then the forwarder's reads
//! until nothing is left. Input: a flags byte (bit 0: a good chunk first), the claimed record
//! count (u16, little-endian), the chunk's bytes.
//!
//! Never a panic or an error; the reader never stops before the good chunk after it; every
//! chunk handed out holds the records its index entry counts, numbered from its first sequence
//! number; and every stored record comes back or is counted as dropped (`corrupt`).

use std::sync::{Arc, Mutex};

use edgegate::buffer::{Buffer, BufferWriter, Intake};
use edgegate::config::BufferConfig;
use edgegate::metrics::{DropReason, Metrics};
use edgegate::record::{ChunkWriter, NewRecord, SourceType};

/// Quarantined chunks stay in sled; a fresh buffer this often keeps its files small.
const RUNS_PER_BUFFER: u32 = 2_000;

struct Env {
    // Dropped in this order: the buffer (and sled) before its directory.
    buffer: Buffer,
    _writer: BufferWriter,
    _intake: Intake,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
    runs: u32,
}

impl Env {
    fn open() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("edgegate-fuzz-buffer")
            .tempdir()
            .expect("a temporary directory");
        let metrics = Arc::new(Metrics::new());
        let (buffer, writer, intake) =
            Buffer::open(dir.path(), &BufferConfig::default(), metrics.clone())
                .expect("a new buffer opens");
        Env {
            buffer,
            _writer: writer,
            _intake: intake,
            metrics,
            _dir: dir,
            runs: 0,
        }
    }
}

static ENV: Mutex<Option<Env>> = Mutex::new(None);

fn good_chunk(tag: u8) -> (u32, Vec<u8>) {
    let mut chunk = ChunkWriter::new(1_700_000_000_000);
    for i in 0..2u8 {
        chunk.push(&NewRecord {
            captured_ms: 1_700_000_000_000 + u64::from(i),
            source: Arc::from("plant"),
            source_type: SourceType::Mqtt,
            meta: vec![("topic".into(), "t".into())],
            payload: vec![tag, i],
        });
    }
    (chunk.count(), chunk.value().to_vec())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [flags, c0, c1, value @ ..] = data else {
        return;
    };
    // A commit never writes a chunk of no records (its successor would share its key).
    let claimed = u32::from(u16::from_le_bytes([*c0, *c1])).max(1);
    let mut env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if env.as_ref().is_none_or(|e| e.runs >= RUNS_PER_BUFFER) {
        *env = None; // the old buffer goes before the new one opens
        *env = Some(Env::open());
    }
    let Some(env) = env.as_mut() else {
        return;
    };
    env.runs += 1;
    run(&env.buffer, &env.metrics, flags & 1 == 1, claimed, value);
});

fn run(buffer: &Buffer, metrics: &Metrics, good_first: bool, claimed: u32, value: &[u8]) {
    let corrupt_before = metrics.dropped(DropReason::Corrupt);
    let mut expected = 0u64;
    if good_first {
        let (count, chunk) = good_chunk(1);
        buffer.store_raw_chunk(count, &chunk).expect("stored");
        expected += u64::from(count);
    }
    let fuzzed = buffer.store_raw_chunk(claimed, value).expect("stored");
    expected += u64::from(claimed);
    let (count, chunk) = good_chunk(2);
    let last = buffer.store_raw_chunk(count, &chunk).expect("stored");
    expected += u64::from(count);

    let mut returned = 0u64;
    let mut seen_last = false;
    while let Some(read) = buffer
        .try_next_chunk()
        .unwrap_or_else(|e| panic!("reading failed: {e}"))
    {
        assert_eq!(
            read.records.len() as u64,
            u64::from(read.info.count),
            "a chunk handed out holds another number of records than its index entry counts \
             (parts {:?}, fuzzed chunk {fuzzed}, claimed {claimed})",
            read.parts
        );
        for (i, r) in read.records.iter().enumerate() {
            assert_eq!(r.seq, read.info.first_seq + i as u64);
        }
        seen_last |= read.parts.contains(&last);
        returned += read.records.len() as u64;
        buffer.release_parts(&read.parts).expect("released");
    }
    assert!(
        seen_last,
        "the reader stopped before the good chunk after the fuzzed one"
    );
    let dropped = metrics.dropped(DropReason::Corrupt) - corrupt_before;
    assert_eq!(
        returned + dropped,
        expected,
        "records neither returned nor counted as dropped"
    );
    assert_eq!(buffer.stats().records, 0);
}
