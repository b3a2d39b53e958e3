//! systemd integration: READY=1 once sources and buffer are open, and WATCHDOG=1 pings fed by the
//! pipeline's own health rather than a blind timer.
//!
//! A stage is stalled when an operation that should take milliseconds (a buffer commit, one
//! record's conversion) has been in progress for longer than the watchdog interval. Waiting for a down
//! uplink or for buffer space is not a stall: a restart would not fix either. While a stage is
//! stalled no pings go out, so systemd restarts the service; the buffer keeps every record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The stages whose operations are watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Writing and flushing a commit to disk.
    BufferCommit,
    /// Converting one record with its JavaScript converter. Timed per record, not per chunk: a
    /// chunk of up to 1,024 slow but valid records may take longer than the watchdog interval.
    Conversion,
}

impl Stage {
    const ALL: [Stage; 2] = [Stage::BufferCommit, Stage::Conversion];

    pub fn name(self) -> &'static str {
        match self {
            Stage::BufferCommit => "buffer commit",
            Stage::Conversion => "converter",
        }
    }
}

/// When each watched operation started; 0 while none is running.
#[derive(Debug, Default)]
pub struct Health {
    started_ms: [AtomicU64; 2],
}

/// Marks an operation as running until dropped.
pub struct Running<'a> {
    slot: &'a AtomicU64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Relaxed);
    }
}

/// Milliseconds on a clock that never jumps, from 1: a board without a real-time clock steps its
/// wall clock by hours when NTP syncs, which would fake (or hide) a stall.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Health {
    pub fn begin(&self, stage: Stage) -> Running<'_> {
        let slot = &self.started_ms[stage as usize];
        slot.store(monotonic_ms(), Ordering::Relaxed);
        Running { slot }
    }

    /// The first stage whose current operation has run longer than `limit`, and for how long.
    pub fn stalled(&self, limit: Duration) -> Option<(Stage, Duration)> {
        let now = monotonic_ms();
        Stage::ALL.into_iter().find_map(|stage| {
            let since = self.started_ms[stage as usize].load(Ordering::Relaxed);
            let running = Duration::from_millis(now.saturating_sub(since));
            (since != 0 && running > limit).then_some((stage, running))
        })
    }
}

/// Tells systemd the service is ready (no-op outside systemd).
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd a reload began; `notify_ready` ends it. With the monotonic time systemd needs
/// to tell this reload from an earlier one (`Type=notify-reload`).
pub fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings systemd every half interval while no stage is stalled.
pub async fn run(
    health: impl std::ops::Deref<Target = Health>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval / 2);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match health.stalled(interval) {
            None => {
                if stalled {
                    tracing::info!("watchdog: pipeline healthy again; pings resumed");
                    stalled = false;
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Some((stage, running)) => {
                if !stalled {
                    tracing::error!(
                        stage = stage.name(),
                        running_s = running.as_secs(),
                        "watchdog: stage stalled; withholding pings so systemd restarts edgegate"
                    );
                    stalled = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_running_past_the_limit_is_a_stall_and_ending_it_clears_it() {
        let health = Health::default();
        assert_eq!(health.stalled(Duration::ZERO), None);
        let op = health.begin(Stage::Conversion);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(health.stalled(Duration::from_secs(5)), None);
        let (stage, running) = health.stalled(Duration::from_millis(5)).unwrap();
        assert_eq!(stage, Stage::Conversion);
        assert!(running >= Duration::from_millis(20));
        drop(op);
        assert_eq!(health.stalled(Duration::ZERO), None);
    }
}
