#![no_main]

//! Decoding a buffer chunk from any bytes, as they may be found on disk: the first 8 bytes are
//! the chunk's first sequence number (little-endian), the rest its value. It must never panic;
//! what decodes must be numbered from the first sequence number and survive encoding again.

use std::sync::Arc;

use edgegate::record::{decode_chunk, ChunkWriter, NewRecord};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((seq, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let first_seq = u64::from_le_bytes(*seq);
    let Ok(records) = decode_chunk(first_seq, value) else {
        return;
    };
    let mut chunk = ChunkWriter::new(records.first().map_or(0, |r| r.captured_ms));
    for (i, r) in records.iter().enumerate() {
        assert_eq!(Some(r.seq), first_seq.checked_add(i as u64));
        chunk.push(&NewRecord {
            captured_ms: r.captured_ms,
            source: Arc::from(r.source.as_str()),
            source_type: r.source_type,
            meta: r.meta.clone(),
            payload: r.payload.clone(),
        });
    }
    let again = decode_chunk(first_seq, chunk.value())
        .unwrap_or_else(|e| panic!("a chunk made from decoded records does not decode: {e}"));
    assert_eq!(again, records);
});
