//! Offline buffer tooling (`edgegate buffer stats|export|purge`), for a stopped service. Opening
//! the buffer takes sled's file lock, so a running daemon makes these fail at once with
//! [`BufferError::Locked`] instead of hanging.

use std::io::Write;
use std::sync::Arc;

use base64::Engine as _;
use serde::Serialize;

use super::commit::chunk_info;
use super::{insert_chunk, remove_chunk, Buffer, BufferError, ChunkInfo};
use crate::record::{ChunkWriter, NewRecord, Record};

/// What `buffer purge` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub records: u64,
    pub bytes: u64,
}

/// One exported record: a JSON line.
#[derive(Serialize)]
struct ExportLine<'a> {
    seq: u64,
    captured_ms: u64,
    source: &'a str,
    source_type: &'a str,
    meta: serde_json::Map<String, serde_json::Value>,
    payload_base64: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// Writing the export failed (for example the reader closed the pipe); stop quietly.
    #[error("writing the export: {0}")]
    Output(#[from] std::io::Error),
}

impl Buffer {
    /// Writes every buffered record as a JSON line, oldest first, one chunk in memory at a time.
    /// Returns how many records were written.
    pub fn export(&self, out: &mut impl Write) -> Result<u64, ToolError> {
        let mut n = 0;
        while let Some(chunk) = self.try_next_chunk()? {
            for r in &chunk.records {
                serde_json::to_writer(&mut *out, &export_line(r)).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
                n += 1;
            }
        }
        out.flush()?;
        Ok(n)
    }

    /// Removes records captured before `cutoff_ms` (every record when `None`) and flushes.
    /// Whole chunks go when all their records are older; the chunk straddling the cutoff loses
    /// its older prefix. The count is exactly what was removed.
    pub fn purge(&self, cutoff_ms: Option<u64>) -> Result<Purged, BufferError> {
        let cutoff = cutoff_ms.unwrap_or(u64::MAX);
        let mut purged = Purged::default();
        let gone = self.state().evict_unread(|_, c| c.last_ms < cutoff);
        let mut batch = sled::Batch::default();
        for c in &gone {
            remove_chunk(&mut batch, c.first_seq, c.bytes);
            purged.records += u64::from(c.count);
            purged.bytes += u64::from(c.bytes);
        }
        self.shared.tree.apply_batch(batch)?;
        if let Some(straddling) = self.oldest_chunk().filter(|c| c.first_ms < cutoff) {
            let trimmed = self.trim_prefix(straddling, cutoff)?;
            purged.records += trimmed.records;
            purged.bytes += trimmed.bytes;
        }
        self.flush()?;
        Ok(purged)
    }

    fn oldest_chunk(&self) -> Option<ChunkInfo> {
        self.state().chunks.front().copied()
    }

    /// Rewrites a chunk without its records older than `cutoff`, keeping the rest's sequence
    /// numbers (the chunk key moves to the first kept record).
    fn trim_prefix(&self, info: ChunkInfo, cutoff: u64) -> Result<Purged, BufferError> {
        let Some(value) = self.shared.read_chunk(&info)? else {
            return Ok(Purged::default());
        };
        let Ok(records) = super::decode_stored(&info, &value) else {
            return Ok(Purged::default()); // Corrupt: the forwarder quarantines it.
        };
        let drop_n = records
            .iter()
            .take_while(|r| r.captured_ms < cutoff)
            .count();
        if drop_n == 0 {
            return Ok(Purged::default());
        }
        let kept = &records[drop_n..];
        let mut chunk = ChunkWriter::new(kept.first().map_or(info.first_ms, |r| r.captured_ms));
        for r in kept {
            chunk.push(&new_record(r));
        }
        let new_info = chunk_info(info.first_seq + drop_n as u64, &chunk);
        let mut batch = sled::Batch::default();
        remove_chunk(&mut batch, info.first_seq, info.bytes);
        if !kept.is_empty() {
            insert_chunk(&mut batch, &new_info, chunk.value());
        }
        self.shared.tree.apply_batch(batch)?;
        {
            let mut s = self.state();
            s.remove_at(0);
            if !kept.is_empty() {
                s.insert_front(new_info);
            }
        }
        Ok(Purged {
            records: drop_n as u64,
            bytes: u64::from(info.bytes).saturating_sub(chunk.len() as u64),
        })
    }
}

fn new_record(r: &Record) -> NewRecord {
    NewRecord {
        captured_ms: r.captured_ms,
        source: Arc::from(r.source.as_str()),
        source_type: r.source_type,
        meta: r.meta.clone(),
        payload: r.payload.clone(),
    }
}

fn export_line(r: &Record) -> ExportLine<'_> {
    ExportLine {
        seq: r.seq,
        captured_ms: r.captured_ms,
        source: &r.source,
        source_type: r.source_type.as_str(),
        meta: r
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect(),
        payload_base64: base64::engine::general_purpose::STANDARD.encode(&r.payload),
    }
}
