//! Writes the seed corpora of `chunk_decode` and `buffer_read` (fuzz/corpus/) from chunks the
//! gateway's own `ChunkWriter` encodes, plus a chunk of the previous on-disk format and a few
//! corrupt ones. Run from `fuzz/`: `cargo run --bin seeds`.

use std::path::Path;
use std::sync::Arc;

use edgegate::record::{ChunkWriter, NewRecord, SourceType, CHUNK_FORMAT};

const T: u64 = 1_607_731_932_000;

fn record(payload: &[u8]) -> NewRecord {
    NewRecord {
        captured_ms: T,
        source: Arc::from("plant"),
        source_type: SourceType::Mqtt,
        meta: vec![("topic".into(), "sensors/a".into())],
        payload: payload.to_vec(),
    }
}

fn chunk(records: &[NewRecord]) -> Vec<u8> {
    let mut chunk = ChunkWriter::new(records.first().map_or(T, |r| r.captured_ms));
    for r in records {
        chunk.push(r);
    }
    chunk.value().to_vec()
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn text(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A chunk of format 1 (postcard records, every string in full), as older edgegates wrote.
fn chunk_v1() -> Vec<u8> {
    let mut out = vec![1];
    for payload in [&[0xff, 0x01][..], b"{\"t\":21.5}"] {
        varint(&mut out, T);
        text(&mut out, "plant");
        varint(&mut out, 0); // SourceType::Mqtt
        varint(&mut out, 1);
        text(&mut out, "topic");
        text(&mut out, "sensors/a");
        varint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
    }
    out
}

fn main() -> std::io::Result<()> {
    let mut serial = record(&[1, 2, 3]);
    serial.source = Arc::from("rs485");
    serial.source_type = SourceType::Serial;
    serial.meta = vec![("port".into(), "/dev/ttyUSB0".into())];
    serial.captured_ms -= 5_000; // a clock that stepped back
    let mut other_topic = record(b"x");
    other_topic.meta = vec![("topic".into(), "sensors/b".into())];
    other_topic.captured_ms += 70_000;
    let mut no_meta = record(b"");
    no_meta.meta.clear();

    let mut chunks: Vec<(&str, u32, Vec<u8>)> = vec![
        ("one-record", 1, chunk(&[record(b"{\"temperature\":21.5}")])),
        (
            "five-records",
            5,
            chunk(&[
                record(b""),
                record(&[0xff, 0x00, 0xfe]),
                serial,
                other_topic,
                no_meta,
            ]),
        ),
        // Larger than a piece (CHUNK_MAX_BYTES): stored in two sled values.
        ("two-pieces", 1, chunk(&[record(&[7u8; 9000])])),
        ("format-1", 2, chunk_v1()),
        // Corrupt: a varint running off the end, an unknown format, nothing at all.
        ("truncated", 1, vec![CHUNK_FORMAT, 0xff, 0xff]),
        ("unknown-format", 1, vec![9, 1, 2]),
        ("empty", 1, Vec::new()),
    ];
    // A record referring to string #9, which the chunk never defined.
    let mut unknown_string = chunk(&[record(b"a")]);
    unknown_string.extend_from_slice(&[0, 0, 9, 0, 0, 0]);
    chunks.push(("unknown-string", 2, unknown_string));

    let corpus = Path::new("corpus");
    std::fs::create_dir_all(corpus.join("chunk_decode"))?;
    std::fs::create_dir_all(corpus.join("buffer_read"))?;
    for (i, (name, count, value)) in chunks.iter().enumerate() {
        let first_seq: u64 = [0, 41, 1 << 40][i % 3];
        let mut input = first_seq.to_le_bytes().to_vec();
        input.extend_from_slice(value);
        std::fs::write(corpus.join("chunk_decode").join(name), input)?;
        let flags = (i % 2) as u8; // bit 0: a good chunk before the fuzzed one
        let mut input = vec![flags];
        input.extend_from_slice(&(*count as u16).to_le_bytes());
        input.extend_from_slice(value);
        std::fs::write(corpus.join("buffer_read").join(name), input)?;
    }
    Ok(())
}
