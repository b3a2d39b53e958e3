#![no_main]

//! Records of any content through `ChunkWriter` and back through `decode_chunk`, appended in two
//! steps as the buffer merges a commit into its tail chunk: byte-exact records, numbered in
//! order, the writer's count, size and time range right, and no record adding more than
//! `encoded_size_bound` says (the buffer sizes its commits by it).

use std::sync::Arc;

use arbitrary::Arbitrary;
use edgegate::record::{decode_chunk, encoded_size_bound, ChunkWriter, NewRecord, SourceType};

#[derive(Debug, Arbitrary)]
struct Input {
    first_seq: u32,
    base_ms: u64,
    /// Records pushed before the writer's value is read once (a commit), the rest after.
    split: u8,
    records: Vec<Rec>,
}

#[derive(Debug, Arbitrary)]
struct Rec {
    captured_ms: u64,
    source: String,
    serial: bool,
    meta: Vec<(String, String)>,
    payload: Vec<u8>,
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let records: Vec<NewRecord> = input
        .records
        .into_iter()
        .map(|r| NewRecord {
            captured_ms: r.captured_ms,
            source: Arc::from(r.source),
            source_type: if r.serial {
                SourceType::Serial
            } else {
                SourceType::Mqtt
            },
            meta: r.meta,
            payload: r.payload,
        })
        .collect();
    let first_seq = u64::from(input.first_seq);
    let mut chunk = ChunkWriter::new(input.base_ms);
    for (i, r) in records.iter().enumerate() {
        if i == usize::from(input.split) {
            let so_far = decode_chunk(first_seq, chunk.value()).expect("a partial chunk decodes");
            assert_eq!(so_far.len(), i);
        }
        let before = chunk.len();
        chunk.push(r);
        assert_eq!(chunk.len(), chunk.value().len());
        assert!(
            chunk.len() - before <= encoded_size_bound(r),
            "{} bytes added, bound {}",
            chunk.len() - before,
            encoded_size_bound(r)
        );
    }
    assert_eq!(chunk.count() as usize, records.len());
    assert_eq!(chunk.is_empty(), records.is_empty());
    if !records.is_empty() {
        let first = records.iter().map(|r| r.captured_ms).min();
        let last = records.iter().map(|r| r.captured_ms).max();
        assert_eq!(Some(chunk.time_range()), first.zip(last));
    }
    let decoded = decode_chunk(first_seq, chunk.value()).expect("a written chunk decodes");
    assert_eq!(decoded.len(), records.len());
    for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
        assert_eq!(got.seq, first_seq + i as u64);
        assert_eq!(got.captured_ms, want.captured_ms);
        assert_eq!(got.source, &*want.source);
        assert_eq!(got.source_type, want.source_type);
        assert_eq!(got.meta, want.meta);
        assert_eq!(got.payload, want.payload);
    }
});
