//! Steps of the system clock, for `max_age`. A board without a real-time clock boots with a
//! clock that is hours or months behind and steps it forward when NTP syncs; records captured
//! before would then look that much older and expire at once. Steps forward seen while the
//! gateway runs are added back to the age of what was captured before them. Steps backward are
//! not taken out: records captured before one expire late, never early.

use std::time::Instant;

use super::*;

/// A forward step smaller than this is left alone (NTP slews small offsets anyway).
const STEP_MS: u64 = 60_000;
/// Steps remembered; beyond, the two oldest merge (see `ClockSteps::observe`).
const STEPS_MAX: usize = 64;

#[derive(Default)]
pub(super) struct ClockSteps {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The last reading of both clocks.
    last: Option<(Instant, u64)>,
    /// Forward steps: the wall time just before the step, and how far it went.
    steps: Vec<(u64, u64)>,
}

impl ClockSteps {
    /// The steps recorded by an earlier run (see [`ClockSteps::encoded`]).
    pub(super) fn load(bytes: &[u8]) -> ClockSteps {
        let steps = bytes
            .chunks_exact(16)
            .filter_map(|c| {
                let before = u64::from_le_bytes(c.get(..8)?.try_into().ok()?);
                let ahead = u64::from_le_bytes(c.get(8..)?.try_into().ok()?);
                Some((before, ahead))
            })
            .take(STEPS_MAX)
            .collect();
        ClockSteps {
            inner: Mutex::new(Inner { last: None, steps }),
        }
    }

    /// The steps as stored in the buffer, so that a restart does not forget them.
    pub(super) fn encoded(&self) -> Vec<u8> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(inner.steps.len() * 16);
        for (before, ahead) in &inner.steps {
            out.extend_from_slice(&before.to_le_bytes());
            out.extend_from_slice(&ahead.to_le_bytes());
        }
        out
    }

    /// Compares how far the wall clock and the monotonic clock moved since the last call; true
    /// when it recorded a forward step.
    pub(super) fn observe(&self, wall_ms: u64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut stepped = false;
        if let Some((then, then_wall)) = inner.last {
            let expected = then_wall + now.duration_since(then).as_millis() as u64;
            let ahead = wall_ms.saturating_sub(expected);
            if ahead >= STEP_MS {
                tracing::warn!(
                    step_seconds = ahead / 1000,
                    "system clock stepped forward; buffer.max_age keeps counting records captured before from the old clock"
                );
                inner.steps.push((expected, ahead));
                stepped = true;
                if inner.steps.len() > STEPS_MAX {
                    // Both steps for what came before the later one: kept longer, never dropped early.
                    let (_, first) = inner.steps.remove(0);
                    inner.steps[0].1 += first;
                }
            } else if expected.saturating_sub(wall_ms) >= STEP_MS {
                tracing::warn!(
                    step_seconds = expected.saturating_sub(wall_ms) / 1000,
                    "system clock stepped back; records captured before expire that much later"
                );
            }
        }
        inner.last = Some((now, wall_ms));
        stepped
    }

    /// `captured_ms` as the clock of now would have read it: plus every later forward step.
    pub(super) fn on_current_clock(&self, captured_ms: u64) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let later: u64 = inner
            .steps
            .iter()
            .filter(|(before, _)| captured_ms <= *before)
            .map(|(_, ahead)| ahead)
            .sum();
        captured_ms.saturating_add(later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_step_is_added_to_what_was_captured_before_it_only() {
        let clock = ClockSteps::default();
        let t0 = 1_000_000_000;
        clock.observe(t0);
        let three_hours = 3 * 3600 * 1000;
        clock.observe(t0 + three_hours);
        assert_eq!(clock.on_current_clock(t0 - 5), t0 - 5 + three_hours);
        assert_eq!(clock.on_current_clock(t0 + three_hours), t0 + three_hours);
        // Backward: nothing changes.
        clock.observe(t0);
        assert_eq!(clock.on_current_clock(t0 - 5), t0 - 5 + three_hours);
    }

    #[test]
    fn steps_survive_a_restart() {
        let clock = ClockSteps::default();
        clock.observe(1_000_000);
        assert!(clock.observe(1_000_000 + 3_600_000));
        let again = ClockSteps::load(&clock.encoded());
        assert_eq!(again.on_current_clock(999_000), 999_000 + 3_600_000);
    }

    #[test]
    fn many_steps_merge_towards_keeping_records_longer() {
        let clock = ClockSteps::default();
        let mut wall = 1_000_000_000;
        clock.observe(wall);
        for _ in 0..STEPS_MAX + 5 {
            wall += STEP_MS;
            clock.observe(wall);
        }
        let steps = (STEPS_MAX + 5) as u64;
        assert_eq!(clock.on_current_clock(0), steps * STEP_MS);
    }
}
