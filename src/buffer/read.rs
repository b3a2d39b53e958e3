//! Reading: the forwarder claims unread chunks, rewinds after failures and releases what Kafka
//! confirmed.

use super::*;
use crate::metrics::DropReason;
use crate::record::Record;

/// Consecutive stored chunks handed to the forwarder as one unit of work.
#[derive(Debug)]
pub struct ReadChunk {
    /// Spans every part: the first part's first_seq, the total count and bytes.
    pub info: ChunkInfo,
    pub records: Vec<Record>,
    /// First sequence numbers of the stored chunks it was read from; release them together.
    pub parts: Vec<u64>,
}

impl ReadChunk {
    fn single(info: ChunkInfo, records: Vec<Record>) -> ReadChunk {
        ReadChunk {
            info,
            records,
            parts: vec![info.first_seq],
        }
    }

    fn absorb(&mut self, next: ReadChunk) {
        self.info.count += next.info.count;
        self.info.bytes += next.info.bytes;
        self.info.first_ms = self.info.first_ms.min(next.info.first_ms);
        self.info.last_ms = self.info.last_ms.max(next.info.last_ms);
        self.records.extend(next.records);
        self.parts.extend(next.parts);
    }
}

impl Buffer {
    /// The next unread chunk, waiting until one is durable.
    pub async fn next_chunk(&self) -> Result<ReadChunk, BufferError> {
        loop {
            let ready = self.shared.data_ready.notified();
            if let Some(chunk) = self.try_next_chunk()? {
                return Ok(chunk);
            }
            ready.await;
        }
    }

    /// The next unread chunks (consecutive ones joined), if any. Corrupt chunks are quarantined,
    /// counted and skipped.
    pub fn try_next_chunk(&self) -> Result<Option<ReadChunk>, BufferError> {
        let Some(mut read) = self.next_stored_chunk()? else {
            return Ok(None);
        };
        while read.info.count < READ_BATCH_RECORDS && read.info.bytes < READ_BATCH_BYTES {
            match self.next_contiguous(read.info.end_seq())? {
                Some(more) => read.absorb(more),
                None => break,
            }
        }
        Ok(Some(read))
    }

    /// The unread chunk starting at `seq`, if it is there and decodes; anything else is left
    /// unread for [`Buffer::next_stored_chunk`] to handle.
    fn next_contiguous(&self, seq: u64) -> Result<Option<ReadChunk>, BufferError> {
        let Some(info) = self.claim_unread(Some(seq)) else {
            return Ok(None);
        };
        let value = self.shared.read_chunk(&info)?;
        match value.map(|v| decode_stored(&info, &v)) {
            Some(Ok(records)) => Ok(Some(ReadChunk::single(info, records))),
            _ => {
                self.rewind(info.first_seq);
                Ok(None)
            }
        }
    }

    fn next_stored_chunk(&self) -> Result<Option<ReadChunk>, BufferError> {
        loop {
            let Some(info) = self.claim_unread(None) else {
                return Ok(None);
            };
            let value = self.shared.read_chunk(&info)?;
            let decoded = value.as_deref().map(|v| decode_stored(&info, v));
            match decoded {
                Some(Ok(records)) => return Ok(Some(ReadChunk::single(info, records))),
                Some(Err(e)) => {
                    tracing::error!(first_seq = info.first_seq, count = info.count, error = %e,
                        "buffer chunk is corrupt; quarantined and skipped");
                    self.quarantine(info, value.as_deref().unwrap_or_default())?;
                }
                None => {
                    tracing::error!(first_seq = info.first_seq, "buffer chunk missing; skipped");
                    self.release(info.first_seq)?;
                    self.shared
                        .metrics
                        .count_dropped(DropReason::Corrupt, info.count.into());
                }
            }
        }
    }

    /// Hands the oldest unread chunk to the reader (only if it starts at `at`, when given).
    fn claim_unread(&self, at: Option<u64>) -> Option<ChunkInfo> {
        let mut s = self.state();
        let idx = s.first_unread();
        let info = s
            .chunks
            .get(idx)
            .copied()
            .filter(|c| at.is_none_or(|seq| c.first_seq == seq))?;
        s.read_cursor = info.end_seq();
        Some(info)
    }

    fn quarantine(&self, info: ChunkInfo, value: &[u8]) -> Result<(), BufferError> {
        let mut batch = sled::Batch::default();
        batch.insert(&quarantine_key(info.first_seq), value);
        let tree = &self.shared.tree;
        self.shared.write("quarantining a corrupt chunk", || {
            Ok(tree.apply_batch(batch)?)
        })?;
        self.release(info.first_seq)?;
        self.shared
            .metrics
            .count_dropped(DropReason::Corrupt, info.count.into());
        Ok(())
    }

    /// Makes every chunk from `first_seq` on unread again (to resend after a failure).
    pub fn rewind(&self, first_seq: u64) {
        let mut s = self.state();
        s.read_cursor = s.read_cursor.min(first_seq);
        drop(s);
        self.shared.data_ready.notify_one();
    }

    /// Removes a chunk whose every record Kafka confirmed.
    pub fn release(&self, first_seq: u64) -> Result<(), BufferError> {
        self.release_parts(&[first_seq])
    }

    /// Removes stored chunks whose every record Kafka confirmed: from memory now, from sled with
    /// the next commit (see [`Shared::released`]).
    pub fn release_parts(&self, parts: &[u64]) -> Result<(), BufferError> {
        let mut gone = Vec::with_capacity(parts.len());
        {
            let mut s = self.state();
            for &first_seq in parts {
                let idx = s.chunks.partition_point(|c| c.first_seq < first_seq);
                let found = s.chunks.get(idx).filter(|c| c.first_seq == first_seq);
                // Not in memory (already gone): its first piece and index entry, if anything.
                let bytes = found.map_or(0, |c| c.bytes);
                if found.is_some() {
                    s.remove_at(idx);
                }
                gone.push((first_seq, bytes));
            }
        }
        let pending = {
            let mut released = self.shared.released();
            released.extend(gone);
            released.len()
        };
        self.shared.space_freed.notify_one();
        if pending >= RELEASES_PENDING_MAX {
            self.write_releases()?;
        }
        Ok(())
    }
}
