//! The last hour in points every [`SAMPLE_EVERY`]: backlog and rates for the status page's plots,
//! and the counter totals recent rates and "errors in the last minutes" are computed from. A fixed
//! number of points: memory stays the same however long the gateway runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// One hour of points.
pub const POINTS: usize = 360;
/// A rate over less than this is mostly noise; the one sample before is used instead.
const SHORTEST_RATE_WINDOW: Duration = Duration::from_secs(2);

/// One point of the plots.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Unix time, milliseconds.
    pub t_ms: u64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    /// Records made durable per second since the point before, over every source.
    pub ingest_rate: f64,
    /// Records confirmed by Kafka per second since the point before.
    pub delivery_rate: f64,
}

/// Counts that only a problem moves; health looks at how much they grew lately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Troubles {
    pub dropped: u64,
    pub converter_errors: u64,
    pub dead_lettered: u64,
}

/// Counter totals at one moment.
#[derive(Debug, Clone)]
pub struct Totals {
    pub at: Instant,
    pub t_ms: u64,
    /// Records made durable, per configured source.
    pub per_source: BTreeMap<String, u64>,
    pub delivered: u64,
    pub troubles: Troubles,
}

impl Totals {
    pub fn ingested(&self) -> u64 {
        self.per_source.values().sum()
    }
}

/// Records per second between two totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub ingest: Option<f64>,
    pub delivery: Option<f64>,
    pub per_source: BTreeMap<String, f64>,
}

struct Sample {
    at: Instant,
    troubles: Troubles,
    point: Point,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    latest: Option<Totals>,
    previous: Option<Totals>,
}

/// Shared by the sampler, which writes every [`SAMPLE_EVERY`], and the admin endpoint.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Inner>>);

impl History {
    /// Adds a point for `now`, dropping the oldest beyond [`POINTS`].
    pub fn record(&self, now: Totals, backlog_records: u64, backlog_bytes: u64) {
        let mut inner = self.lock();
        let rates = inner.latest.as_ref().map(|l| rates_between(l, &now));
        let rates = rates.unwrap_or_default();
        let point = Point {
            t_ms: now.t_ms,
            backlog_records,
            backlog_bytes,
            ingest_rate: rates.ingest.unwrap_or(0.0),
            delivery_rate: rates.delivery.unwrap_or(0.0),
        };
        if inner.samples.len() == POINTS {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample {
            at: now.at,
            troubles: now.troubles,
            point,
        });
        inner.previous = inner.latest.replace(now);
    }

    pub fn points(&self) -> Vec<Point> {
        self.lock().samples.iter().map(|s| s.point).collect()
    }

    /// Rates from the last sample to `now`, or from the one before when the last is too recent;
    /// unknown before the first sample.
    pub fn rates(&self, now: &Totals) -> Rates {
        let inner = self.lock();
        let base = match (&inner.latest, &inner.previous) {
            (Some(l), _) if now.at.duration_since(l.at) >= SHORTEST_RATE_WINDOW => Some(l),
            (Some(_), Some(p)) => Some(p),
            (Some(l), None) => Some(l),
            (None, _) => None,
        };
        base.map_or_else(Rates::default, |b| rates_between(b, now))
    }

    /// How much the trouble counts grew within `window` before `now` (since start when the
    /// gateway is younger).
    pub fn troubles_within(&self, now: &Totals, window: Duration) -> Troubles {
        let inner = self.lock();
        let since = now.at.checked_sub(window);
        let base = inner
            .samples
            .iter()
            .find(|s| since.is_none_or(|since| s.at >= since))
            .filter(|_| {
                // Younger than the window: the counters started at zero.
                inner
                    .samples
                    .front()
                    .is_some_and(|f| since.is_some_and(|since| f.at < since))
            })
            .map(|s| s.troubles)
            .unwrap_or_default();
        Troubles {
            dropped: now.troubles.dropped.saturating_sub(base.dropped),
            converter_errors: now
                .troubles
                .converter_errors
                .saturating_sub(base.converter_errors),
            dead_lettered: now
                .troubles
                .dead_lettered
                .saturating_sub(base.dead_lettered),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn rates_between(before: &Totals, after: &Totals) -> Rates {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    if secs <= 0.0 {
        return Rates::default();
    }
    // Three decimals are plenty for records per second, and keep the page's JSON small.
    let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs * 1000.0).round() / 1000.0;
    // Per source, and only over sources in both samples: a reload adds and removes sources,
    // whose counters live on, and a total over different sets would spike or fall.
    let per_source: BTreeMap<String, f64> = after
        .per_source
        .iter()
        .map(|(name, &n)| {
            let was = before.per_source.get(name).copied().unwrap_or(n);
            (name.clone(), rate(n, was))
        })
        .collect();
    Rates {
        ingest: Some((per_source.values().sum::<f64>() * 1000.0).round() / 1000.0),
        delivery: Some(rate(after.delivered, before.delivered)),
        per_source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(at: Instant, ingested: u64, delivered: u64, dropped: u64) -> Totals {
        Totals {
            at,
            t_ms: 0,
            per_source: [("plant".to_owned(), ingested)].into(),
            delivered,
            troubles: Troubles {
                dropped,
                ..Troubles::default()
            },
        }
    }

    /// A reload that adds a source whose counter lives on from before (or removes one) must not
    /// show its whole count as ingest, nor a fall as a negative rate clamped to nothing.
    #[test]
    fn rates_count_only_sources_in_both_samples() {
        let t0 = Instant::now();
        let before = totals(t0, 100, 0, 0);
        let mut after = totals(t0 + Duration::from_secs(10), 110, 0, 0);
        after.per_source.insert("readded".into(), 1_000_000);
        let rates = rates_between(&before, &after);
        assert_eq!(rates.ingest, Some(1.0));
        assert_eq!(rates.per_source["readded"], 0.0);
        let mut removed = before.clone();
        removed.per_source.insert("gone".into(), 500);
        let rates = rates_between(&removed, &after);
        assert_eq!(rates.ingest, Some(1.0));
    }

    #[test]
    fn points_are_bounded_and_rates_come_from_counter_deltas() {
        let history = History::default();
        let t0 = Instant::now();
        for i in 0..(POINTS as u64 + 10) {
            let at = t0 + SAMPLE_EVERY * i as u32;
            history.record(totals(at, i * 100, i * 50, 0), i, i * 10);
        }
        let points = history.points();
        assert_eq!(points.len(), POINTS);
        assert_eq!(points[0].backlog_records, 10);
        let last = points[POINTS - 1];
        assert_eq!((last.ingest_rate, last.delivery_rate), (10.0, 5.0));
        let latest = t0 + SAMPLE_EVERY * (POINTS as u32 + 9);
        let n = POINTS as u64 + 9;
        // 1 s after the last sample is too soon: the rate spans the sample before, 11 s.
        let now = totals(latest + Duration::from_secs(1), n * 100 + 110, 0, 0);
        let rates = history.rates(&now);
        assert_eq!(rates.ingest, Some(19.091), "210 records in 11 s");
        assert_eq!(rates.per_source["plant"], rates.ingest.unwrap_or(0.0));
    }

    #[test]
    fn troubles_count_only_within_the_window() {
        let history = History::default();
        let t0 = Instant::now();
        assert_eq!(history.rates(&totals(t0, 0, 0, 0)), Rates::default());
        for i in 0..100u32 {
            // One drop every sample for the first 50 samples, then none.
            let dropped = u64::from(i.min(50));
            history.record(totals(t0 + SAMPLE_EVERY * i, 0, 0, dropped), 0, 0);
        }
        let now = totals(t0 + SAMPLE_EVERY * 100, 0, 0, 50);
        assert_eq!(history.troubles_within(&now, SAMPLE_EVERY * 30).dropped, 0);
        assert_eq!(history.troubles_within(&now, SAMPLE_EVERY * 60).dropped, 10);
        // The gateway is younger than the window: everything since start counts.
        assert_eq!(
            history.troubles_within(&now, SAMPLE_EVERY * 500).dropped,
            50
        );
    }
}
