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

/// Chunk format 1 (edgegate before the compact format): postcard records with every string in
/// full. Still read, so a buffer written by an older edgegate drains after an upgrade.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    captured_ms: u64,
    source: &'a str,
    source_type: SourceType,
    meta: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}
const CHUNK_FORMAT_V1: u8 = 1;

/// First byte of every chunk written now: a base capture time, then [`CompactRecord`]s. The format
/// byte lets the format change without misreading old buffers.
pub const CHUNK_FORMAT: u8 = 2;

/// A string interned per chunk: its first use carries the text, later uses its index.
#[derive(Serialize, Deserialize)]
enum Text<'a> {
    Known(u32),
    New(&'a str),
}

/// The stored form: the sequence number is implied by the position in its chunk. About 11 bytes
/// besides the payload, against ~30 with every string in full (measured on 200-byte payloads).
#[derive(Serialize, Deserialize)]
struct CompactRecord<'a> {
    /// Capture time minus the chunk's base time; signed because clocks may step back.
    delta_ms: i64,
    #[serde(borrow)]
    source: Text<'a>,
    source_type: SourceType,
    #[serde(borrow)]
    meta: Vec<(Text<'a>, Text<'a>)>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The chunk was written by a newer edgegate or is corrupt; keep it, do not forward it.
    #[error("unknown chunk format {0}")]
    UnknownFormat(u8),
    /// The chunk's bytes do not decode; it is corrupt.
    #[error("corrupt chunk: {0}")]
    Corrupt(#[from] postcard::Error),
    /// A record refers to a string the chunk never defined; it is corrupt.
    #[error("corrupt chunk: unknown string #{0}")]
    UnknownString(u32),
    /// It holds another number of records than the buffer's index entry for it counts.
    #[error("corrupt chunk: {found} records where its index entry counts {expected}")]
    Count { expected: u32, found: usize },
    /// Its records would be numbered past the largest sequence number (a corrupt index key).
    #[error("corrupt chunk: sequence numbers past {}", u64::MAX)]
    SeqOverflow,
}

/// Builds one chunk value. Records can be appended later (the buffer merges small commits into
/// its unread tail chunk), so the writer keeps the chunk's string table.
#[derive(Debug)]
pub struct ChunkWriter {
    value: Vec<u8>,
    base_ms: u64,
    count: u32,
    first_ms: u64,
    last_ms: u64,
    strings: Vec<Box<str>>,
}

impl ChunkWriter {
    pub fn new(base_ms: u64) -> ChunkWriter {
        let mut value = vec![CHUNK_FORMAT];
        value = postcard::to_extend(&base_ms, value).unwrap_or_else(|_| vec![CHUNK_FORMAT]);
        ChunkWriter {
            value,
            base_ms,
            count: 0,
            first_ms: u64::MAX,
            last_ms: 0,
            strings: Vec::new(),
        }
    }

    /// Room for `bytes` more without growing: growing a chunk by doubling cost a reallocation,
    /// and a glibc free-list consolidation, a dozen times per chunk.
    pub fn reserve(&mut self, bytes: usize) {
        self.value.reserve(bytes);
    }

    pub fn push(&mut self, record: &NewRecord) {
        // Interned in the order the decoder meets them: source, then each key and value.
        let source = self.intern(&record.source);
        let meta = record
            .meta
            .iter()
            .map(|(k, v)| (self.intern(k), self.intern(v)))
            .collect();
        let compact = CompactRecord {
            delta_ms: record.captured_ms.wrapping_sub(self.base_ms) as i64,
            source,
            source_type: record.source_type,
            meta,
            payload: &record.payload,
        };
        // Serializing plain data into a Vec cannot fail.
        if let Ok(value) = postcard::to_extend(&compact, std::mem::take(&mut self.value)) {
            self.value = value;
        }
        self.count += 1;
        self.first_ms = self.first_ms.min(record.captured_ms);
        self.last_ms = self.last_ms.max(record.captured_ms);
    }

    fn intern<'a>(&mut self, text: &'a str) -> Text<'a> {
        match self.strings.iter().position(|known| &**known == text) {
            Some(i) => Text::Known(i as u32),
            None => {
                self.strings.push(text.into());
                Text::New(text)
            }
        }
    }

    /// Encoded size so far.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// Earliest and latest capture time of the records in it.
    pub fn time_range(&self) -> (u64, u64) {
        (self.first_ms, self.last_ms)
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }
}

/// An upper bound of what [`ChunkWriter::push`] adds for this record.
pub fn encoded_size_bound(record: &NewRecord) -> usize {
    let texts = record.source.len()
        + record
            .meta
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    record.payload.len() + texts + 16 + 12 * (record.meta.len() + 1)
}

/// Decodes every record of a chunk whose first record has sequence number `first_seq`.
pub fn decode_chunk(first_seq: u64, chunk: &[u8]) -> Result<Vec<Record>, DecodeError> {
    match chunk.split_first() {
        Some((&CHUNK_FORMAT, body)) => decode_compact(first_seq, body),
        Some((&CHUNK_FORMAT_V1, body)) => decode_v1(first_seq, body),
        Some((&other, _)) => Err(DecodeError::UnknownFormat(other)),
        None => Err(DecodeError::UnknownFormat(0)),
    }
}

fn decode_compact(first_seq: u64, body: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let (base_ms, mut rest): (u64, _) = postcard::take_from_bytes(body)?;
    let mut strings: Vec<&str> = Vec::new();
    let mut records = Vec::new();
    while !rest.is_empty() {
        let (compact, tail): (CompactRecord, _) = postcard::take_from_bytes(rest)?;
        let source = resolve_text(&mut strings, compact.source)?;
        let mut meta = Vec::with_capacity(compact.meta.len());
        for (k, v) in compact.meta {
            let k = resolve_text(&mut strings, k)?;
            let v = resolve_text(&mut strings, v)?;
            meta.push((k.to_owned(), v.to_owned()));
        }
        records.push(Record {
            seq: seq_of(first_seq, records.len())?,
            captured_ms: base_ms.wrapping_add(compact.delta_ms as u64),
            source: source.to_owned(),
            source_type: compact.source_type,
            meta,
            payload: compact.payload.to_vec(),
        });
        rest = tail;
    }
    Ok(records)
}

/// The sequence number of a chunk's record at `index`.
fn seq_of(first_seq: u64, index: usize) -> Result<u64, DecodeError> {
    first_seq
        .checked_add(index as u64)
        .ok_or(DecodeError::SeqOverflow)
}

/// The text a [`Text`] stands for; a new one joins the table in the order the writer added it.
fn resolve_text<'a>(strings: &mut Vec<&'a str>, text: Text<'a>) -> Result<&'a str, DecodeError> {
    match text {
        Text::Known(i) => strings
            .get(i as usize)
            .copied()
            .ok_or(DecodeError::UnknownString(i)),
        Text::New(s) => {
            strings.push(s);
            Ok(s)
        }
    }
}

fn decode_v1(first_seq: u64, mut rest: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let mut records = Vec::new();
    while !rest.is_empty() {
        let (stored, tail): (StoredRecord, _) = postcard::take_from_bytes(rest)?;
        records.push(Record {
            seq: seq_of(first_seq, records.len())?,
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

    fn chunk_of(records: &[NewRecord]) -> Vec<u8> {
        let mut chunk = ChunkWriter::new(records[0].captured_ms);
        for r in records {
            chunk.push(r);
        }
        chunk.value().to_vec()
    }

    #[test]
    fn chunk_round_trips_byte_exact_with_sequence_numbers() {
        let mut serial = sample(&[1, 2, 3]);
        serial.source = Arc::from("rs485");
        serial.source_type = SourceType::Serial;
        serial.meta = vec![("port".into(), "/dev/ttyUSB0".into())];
        // A clock that stepped back must not corrupt the capture time.
        serial.captured_ms -= 5_000;
        let mut other_topic = sample(b"x");
        other_topic.meta = vec![("topic".into(), "sensors/b".into())];
        other_topic.captured_ms += 70_000;
        let inputs = [
            sample(b""),
            sample(&[0xff, 0x00, 0xfe]),
            serial,
            other_topic,
            sample(&[7u8; 70_000]),
        ];
        let out = decode_chunk(41, &chunk_of(&inputs)).unwrap();
        assert_eq!(out.len(), inputs.len());
        for (i, (got, want)) in out.iter().zip(&inputs).enumerate() {
            assert_eq!(got.seq, 41 + i as u64);
            assert_eq!(got.payload, want.payload);
            assert_eq!(got.meta, want.meta);
            assert_eq!(got.source, &*want.source);
            assert_eq!(got.source_type, want.source_type);
            assert_eq!(got.captured_ms, want.captured_ms);
        }
    }

    #[test]
    fn records_appended_to_an_existing_chunk_decode_too() {
        let mut chunk = ChunkWriter::new(0);
        chunk.push(&sample(b"a"));
        let first_part = chunk.len();
        chunk.push(&sample(b"b"));
        assert!(chunk.len() > first_part);
        let out = decode_chunk(0, chunk.value()).unwrap();
        assert_eq!(out[1].payload, b"b");
        assert_eq!(out[1].meta("topic"), Some("sensors/a"));
        assert_eq!(chunk.count(), 2);
    }

    #[test]
    fn repeated_names_cost_a_few_bytes_per_record() {
        let mut chunk = ChunkWriter::new(1_607_731_932_000);
        chunk.push(&sample(&[0u8; 200]));
        let before = chunk.len();
        let mut next = sample(&[0u8; 200]);
        next.captured_ms += 3;
        chunk.push(&next);
        let overhead = chunk.len() - before - 200;
        assert!(overhead <= 12, "{overhead} bytes besides the payload");
        assert!(chunk.len() - before <= encoded_size_bound(&next));
    }

    #[test]
    fn chunks_written_by_the_previous_format_still_decode() {
        let stored = StoredRecord {
            captured_ms: 1_607_731_932_000,
            source: "plant",
            source_type: SourceType::Mqtt,
            meta: vec![("topic", "sensors/a")],
            payload: &[0xff, 0x01],
        };
        let chunk = postcard::to_extend(&stored, vec![CHUNK_FORMAT_V1]).unwrap();
        let out = decode_chunk(7, &chunk).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].seq, 7);
        assert_eq!(out[0].payload, [0xff, 0x01]);
        assert_eq!(out[0].meta("topic"), Some("sensors/a"));
        assert_eq!(out[0].captured_ms, 1_607_731_932_000);
    }

    /// Found by fuzzing (chunk_decode): the first sequence number comes from a key on disk, and
    /// one near u64::MAX overflowed numbering the second record (a panic in a debug build,
    /// numbers wrapping to 0 in a release build).
    #[test]
    fn records_numbered_past_u64_max_are_corrupt_not_a_panic() {
        let chunk = [CHUNK_FORMAT_V1, 0x74, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            decode_chunk(u64::MAX, &chunk),
            Err(DecodeError::SeqOverflow)
        ));
        let fits = decode_chunk(u64::MAX - 1, &chunk).unwrap();
        assert_eq!(
            fits.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [u64::MAX - 1, u64::MAX]
        );
    }

    #[test]
    fn foreign_and_corrupt_chunks_are_errors() {
        assert!(matches!(
            decode_chunk(0, &[9, 1, 2]),
            Err(DecodeError::UnknownFormat(9))
        ));
        assert!(decode_chunk(0, &[CHUNK_FORMAT, 0xff, 0xff]).is_err());
        // A reference to a string the chunk never defined.
        let mut chunk = chunk_of(&[sample(b"a")]);
        let bogus = CompactRecord {
            delta_ms: 0,
            source: Text::Known(9),
            source_type: SourceType::Mqtt,
            meta: vec![],
            payload: b"",
        };
        chunk = postcard::to_extend(&bogus, chunk).unwrap();
        assert!(matches!(
            decode_chunk(0, &chunk),
            Err(DecodeError::UnknownString(9))
        ));
    }
}
