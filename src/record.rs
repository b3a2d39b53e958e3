//! A device record as it travels through the gateway, and its compact on-disk form.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceType {
    Mqtt,
    Serial,
}

impl SourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Mqtt => "mqtt",
            SourceType::Serial => "serial",
        }
    }
}

/// A record as a source hands it to the buffer: no sequence number yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_ms: u64,
    pub source: Arc<str>,
    pub source_type: SourceType,
    /// What the source knows about the record (`topic` for MQTT, `port` for serial).
    pub meta: Vec<(String, String)>,
    /// Byte-exact payload, any encoding.
    pub payload: Vec<u8>,
}

/// A durable record read back from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Per-gateway sequence number; never repeats, also across restarts.
    pub seq: u64,
    pub captured_ms: u64,
    pub source: String,
    pub source_type: SourceType,
    pub meta: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The stored form: the sequence number is implied by the position in its chunk.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    captured_ms: u64,
    source: &'a str,
    source_type: SourceType,
    meta: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// First byte of every chunk, so the format can change without misreading old buffers.
pub const CHUNK_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The chunk was written by a newer edgegate or is corrupt; keep it, do not forward it.
    #[error("unknown chunk format {0}")]
    UnknownFormat(u8),
    /// The chunk's bytes do not decode; it is corrupt.
    #[error("corrupt chunk: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Appends the encoded record to `out` (a chunk body started with [`CHUNK_FORMAT`]).
pub fn encode_into(record: &NewRecord, out: &mut Vec<u8>) {
    let stored = StoredRecord {
        captured_ms: record.captured_ms,
        source: &record.source,
        source_type: record.source_type,
        meta: record
            .meta
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        payload: &record.payload,
    };
    // Serializing plain data into a Vec cannot fail.
    if let Ok(bytes) = postcard::to_extend(&stored, std::mem::take(out)) {
        *out = bytes;
    }
}

/// Decodes every record of a chunk whose first record has sequence number `first_seq`.
pub fn decode_chunk(first_seq: u64, chunk: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let (&format, mut rest) = chunk.split_first().ok_or(DecodeError::UnknownFormat(0))?;
    if format != CHUNK_FORMAT {
        return Err(DecodeError::UnknownFormat(format));
    }
    let mut records = Vec::new();
    while !rest.is_empty() {
        let (stored, tail): (StoredRecord, _) = postcard::take_from_bytes(rest)?;
        records.push(Record {
            seq: first_seq + records.len() as u64,
            captured_ms: stored.captured_ms,
            source: stored.source.to_owned(),
            source_type: stored.source_type,
            meta: stored
                .meta
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            payload: stored.payload.to_vec(),
        });
        rest = tail;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: &[u8]) -> NewRecord {
        NewRecord {
            captured_ms: 1_607_731_932_000,
            source: Arc::from("plant"),
            source_type: SourceType::Mqtt,
            meta: vec![("topic".into(), "sensors/a".into())],
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn chunk_round_trips_byte_exact_with_sequence_numbers() {
        let inputs = [
            sample(b""),
            sample(&[0xff, 0x00, 0xfe]),
            sample(&[7u8; 70_000]),
        ];
        let mut chunk = vec![CHUNK_FORMAT];
        for r in &inputs {
            encode_into(r, &mut chunk);
        }
        let out = decode_chunk(41, &chunk).unwrap();
        assert_eq!(out.len(), 3);
        for (i, (got, want)) in out.iter().zip(&inputs).enumerate() {
            assert_eq!(got.seq, 41 + i as u64);
            assert_eq!(got.payload, want.payload);
            assert_eq!(got.meta("topic"), Some("sensors/a"));
            assert_eq!(got.captured_ms, want.captured_ms);
        }
    }

    #[test]
    fn per_record_overhead_is_small() {
        let mut chunk = vec![CHUNK_FORMAT];
        encode_into(&sample(&[0u8; 200]), &mut chunk);
        assert!(chunk.len() < 200 + 40, "encoded {} bytes", chunk.len());
    }

    #[test]
    fn foreign_and_corrupt_chunks_are_errors() {
        assert!(matches!(
            decode_chunk(0, &[9, 1, 2]),
            Err(DecodeError::UnknownFormat(9))
        ));
        assert!(decode_chunk(0, &[CHUNK_FORMAT, 0xff, 0xff]).is_err());
    }
}
