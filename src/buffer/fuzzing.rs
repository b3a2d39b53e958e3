//! A hook for the fuzz targets in `fuzz/` (feature `fuzzing`, never in a release) and the unit
//! tests: bytes stored as a chunk the way a commit stores one, so that the reader meets them as it
//! would meet a chunk that went bad on disk.

use super::*;

impl Buffer {
    /// Stores `value` as the next chunk, its index entry saying it holds `count` records, in
    /// pieces as a commit would; returns its first sequence number. Not durable (no fsync): the
    /// targets read it back in the same process.
    #[doc(hidden)]
    pub fn store_raw_chunk(&self, count: u32, value: &[u8]) -> Result<u64, BufferError> {
        let mut s = self.state();
        let now = crate::record::now_ms();
        let info = ChunkInfo {
            first_seq: s.next_seq,
            count,
            bytes: u32::try_from(value.len()).unwrap_or(u32::MAX),
            first_ms: now,
            last_ms: now,
        };
        let next_seq = info.end_seq();
        let mut batch = sled::Batch::default();
        insert_chunk(&mut batch, &info, value);
        batch.insert(NEXT_SEQ_KEY, &next_seq.to_le_bytes());
        self.shared.tree.apply_batch(batch)?;
        s.bytes += u64::from(info.bytes);
        s.records += u64::from(info.count);
        s.chunks.push_back(info);
        s.next_seq = next_seq;
        // Nothing merges into a chunk this hook wrote.
        s.tail = None;
        drop(s);
        self.shared.data_ready.notify_one();
        Ok(info.first_seq)
    }
}
