//! Housekeeping: removing released and expired chunks, the full/room state and the gauges.

use super::*;
use crate::config::WhenFull;
use crate::metrics::DropReason;
use crate::record::now_ms;

impl Buffer {
    /// Expiry, pending removals and gauges, every [`HOUSEKEEPING_EVERY`].
    pub(super) fn housekeeping(&self) {
        // Their errors are storage failures, logged once by `Shared::fail`; `run` ends on them.
        let _ = self.expire();
        let _ = self.write_releases();
        self.update_gauges();
    }

    /// Removes the released chunks from sled now.
    pub(super) fn write_releases(&self) -> Result<(), BufferError> {
        let mut batch = sled::Batch::default();
        if self.shared.take_releases(&mut batch).is_empty() {
            return Ok(());
        }
        let tree = &self.shared.tree;
        self.shared
            .write("removing delivered chunks", || Ok(tree.apply_batch(batch)?))
    }

    /// Writes everything to disk now, releases included.
    pub fn flush(&self) -> Result<(), BufferError> {
        self.write_releases()?;
        self.shared.write("flush", || self.shared.make_durable())
    }

    pub(super) fn set_full(&self, full: bool) {
        use std::sync::atomic::Ordering;
        if self.shared.full.swap(full, Ordering::Relaxed) == full {
            return;
        }
        let stats = self.stats();
        match (full, self.shared.config.when_full) {
            (true, WhenFull::Block) => tracing::warn!(
                records = stats.records,
                bytes = stats.bytes,
                "buffer full; holding back sources until records are delivered"
            ),
            (true, WhenFull::DropOldest) => tracing::warn!(
                records = stats.records,
                bytes = stats.bytes,
                "buffer full; dropping oldest records"
            ),
            (false, _) => tracing::info!(records = stats.records, "buffer has room again"),
        }
    }

    pub(super) fn update_gauges(&self) {
        let stats = self.stats();
        let m = &self.shared.metrics;
        m.buffer_records.set(stats.records as i64);
        m.buffer_bytes.set(stats.bytes as i64);
        // Also noticed between commits: the last one before a pause may have crossed the reserve.
        self.shared.disk.room(stats.bytes, m);
        let clock = &self.shared.clock;
        let age = stats
            .oldest_ms
            .map(|t| now_ms().saturating_sub(clock.on_current_clock(t)) as f64 / 1000.0)
            .unwrap_or(0.0);
        m.buffer_oldest_age_seconds.set(age);
    }

    /// Drops unread chunks whose every record is older than `max_age`.
    pub(super) fn expire(&self) -> Result<(), BufferError> {
        let now = now_ms();
        let clock = &self.shared.clock;
        if clock.observe(now) {
            let tree = &self.shared.tree;
            let steps = clock.encoded();
            self.shared.write("recording a clock step", || {
                tree.insert(CLOCK_STEPS_KEY, steps)?;
                self.shared.make_durable()
            })?;
        }
        let Some(max_age) = self.shared.config.max_age else {
            return Ok(());
        };
        let cutoff = now.saturating_sub(max_age.as_millis() as u64);
        let gone = self
            .state()
            .evict_unread(|_, c| clock.on_current_clock(c.last_ms) < cutoff);
        self.remove_evicted(&gone, DropReason::MaxAge)
    }

    /// Whether a record captured at `captured_ms` is older than `buffer.max_age`, counting clock
    /// steps as [`expire`](Self::expire) does; for the forwarder, which drops such records instead
    /// of sending them.
    pub fn is_expired(&self, captured_ms: u64, now_ms: u64) -> bool {
        let Some(max_age) = self.shared.config.max_age else {
            return false;
        };
        let cutoff = now_ms.saturating_sub(max_age.as_millis() as u64);
        self.shared.clock.on_current_clock(captured_ms) < cutoff
    }

    pub(super) fn remove_evicted(
        &self,
        gone: &[ChunkInfo],
        reason: DropReason,
    ) -> Result<(), BufferError> {
        if gone.is_empty() {
            return Ok(());
        }
        let n: u64 = gone.iter().map(|c| u64::from(c.count)).sum();
        self.shared.metrics.count_dropped(reason, n);
        tracing::debug!(records = n, ?reason, "evicted from buffer");
        let mut batch = sled::Batch::default();
        for c in gone {
            remove_chunk(&mut batch, c.first_seq, c.bytes);
        }
        let tree = &self.shared.tree;
        self.shared
            .write("removing evicted chunks", || Ok(tree.apply_batch(batch)?))
    }
}
