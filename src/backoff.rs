//! Exponential backoff with full jitter, for reconnect loops (rumqttc and our Kafka retries have
//! none of their own), so a fleet of gateways does not reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay: uniformly random between `min` and the capped exponential ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let (lo, hi) = (self.min.as_millis() as u64, ceiling.as_millis() as u64);
        Duration::from_millis(rand::rng().random_range(lo..=hi.max(lo)))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        // Jitter spreads late delays over [min, max]; the ceiling is reached.
        let late: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
        assert!(late.iter().any(|d| *d > Duration::from_millis(1000)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
