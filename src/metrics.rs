//! Counters and gauges for every stage, in the Prometheus data model.
//!
//! Everything dropped is counted here with its reason; the admin endpoint exports the registry.

pub mod live;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::watchdog::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConverterErrorLabels {
    pub converter: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SerialDiscardLabels {
    pub source: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `<index>:<source>` of the `[[downlink.routes]]` entry, or `none` for a command that
    /// reached no route (its encoder failed, nothing matched).
    pub route: String,
}

/// The downlink's counters; the unit is one encoded message (a record can make several).
pub struct DownlinkMetrics {
    pub received: Family<RouteLabels, Counter>,
    pub delivered: Family<RouteLabels, Counter>,
    /// Delivery attempts that failed and will be retried (one per attempt).
    pub failed: Family<RouteLabels, Counter>,
    /// Given up: sent to the dead-letter topic, or dropped when there is none.
    pub dead_lettered: Family<RouteLabels, Counter>,
    /// Records not turned into commands, per reason (`own_record`: the loop guard).
    pub skipped: Family<ReasonLabels, Counter>,
    /// Records in the command topics after the last committed position, summed over partitions.
    pub lag: Gauge,
    /// Kafka record consumed to device delivery (PUBACK, PUBCOMP, serial write done), seconds.
    pub latency: Histogram,
}

impl DownlinkMetrics {
    fn new() -> DownlinkMetrics {
        DownlinkMetrics {
            received: Family::default(),
            delivered: Family::default(),
            failed: Family::default(),
            dead_lettered: Family::default(),
            skipped: Family::default(),
            lag: Gauge::default(),
            latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0,
            ]),
        }
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("downlink");
        r.register(
            "received",
            "Downlink messages consumed and encoded, per route",
            self.received.clone(),
        );
        r.register(
            "delivered",
            "Downlink messages delivered to a device, per route",
            self.delivered.clone(),
        );
        r.register(
            "failed",
            "Downlink delivery attempts that failed and are retried, per route",
            self.failed.clone(),
        );
        r.register(
            "dead_lettered",
            "Downlink messages given up (dead-letter topic, or dropped without one), per route",
            self.dead_lettered.clone(),
        );
        r.register(
            "skipped",
            "Downlink records skipped, per reason (own_record: the loop guard)",
            self.skipped.clone(),
        );
        r.register(
            "lag_records",
            "Downlink records not yet committed (high watermark less committed position)",
            self.lag.clone(),
        );
        r.register(
            "latency_seconds",
            "Downlink record consumed to delivered",
            self.latency.clone(),
        );
    }

    pub fn route(family: &Family<RouteLabels, Counter>, route: &str) -> Counter {
        family
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .clone()
    }
}

/// Why a record left the gateway without reaching Kafka.
#[derive(Debug, Clone, Copy)]
pub enum DropReason {
    /// `when_full = "drop_oldest"` evicted it.
    BufferFull,
    /// Older than `buffer.max_age`.
    MaxAge,
    /// Kafka refused it permanently (invalid, or a batch the broker found too large).
    RejectedByKafka,
    /// Larger than one Kafka record may be (`kafka.max_record_bytes`, or the topic's
    /// `max.message.bytes` when lower), refused alone before it could take a batch with it; or an
    /// MQTT message over the source's `max_payload_bytes`, acknowledged so that it is not
    /// redelivered forever.
    TooLarge,
    /// Its chunk on disk did not decode.
    Corrupt,
    /// Its converter threw on it, and no dead-letter topic is configured.
    ConverterException,
    /// Its converter timed out on it three times, and no dead-letter topic is configured.
    ConverterTimeout,
    /// Its converter ran out of memory on it, and no dead-letter topic is configured.
    ConverterOutOfMemory,
    /// Its converter returned no valid result for it, and no dead-letter topic is configured.
    ConverterInvalidResult,
    /// Converting it panicked, and no dead-letter topic is configured.
    ConverterPanic,
    /// Converting it ended the process twice, and no dead-letter topic is configured.
    ConverterCrash,
    /// A record nobody acknowledges (a serial frame) that the buffer could not store: a disk
    /// failure, or larger than half of `buffer.max_bytes`.
    NotStored,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::BufferFull,
        DropReason::MaxAge,
        DropReason::RejectedByKafka,
        DropReason::TooLarge,
        DropReason::Corrupt,
        DropReason::ConverterException,
        DropReason::ConverterTimeout,
        DropReason::ConverterOutOfMemory,
        DropReason::ConverterInvalidResult,
        DropReason::ConverterPanic,
        DropReason::ConverterCrash,
        DropReason::NotStored,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::MaxAge => "max_age",
            DropReason::RejectedByKafka => "rejected_by_kafka",
            DropReason::TooLarge => "too_large",
            DropReason::Corrupt => "corrupt",
            DropReason::ConverterException => "converter_exception",
            DropReason::ConverterTimeout => "converter_timeout",
            DropReason::ConverterOutOfMemory => "converter_out_of_memory",
            DropReason::ConverterInvalidResult => "converter_invalid_result",
            DropReason::ConverterPanic => "converter_panic",
            DropReason::ConverterCrash => "converter_crash",
            DropReason::NotStored => "not_stored",
        }
    }
}

pub struct Metrics {
    pub records_in: Family<SourceLabels, Counter>,
    pub records_out: Counter,
    dropped: Family<ReasonLabels, Counter>,
    pub buffer_records: Gauge,
    pub buffer_bytes: Gauge,
    pub buffer_disk_free_bytes: Gauge,
    pub buffer_oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub kafka_link_up: Gauge,
    /// 1 while the broker refuses the gateway, per reason (authentication, authorisation, tls).
    kafka_link_refused: Family<ReasonLabels, Gauge>,
    pub source_connected: Family<SourceLabels, Gauge>,
    /// Times a source task ended unexpectedly (a panic) and was restarted.
    pub source_restarts: Family<SourceLabels, Counter>,
    /// MQTT messages the broker redelivered (DUP flag), per source; possibly stored before.
    pub mqtt_redelivered: Family<SourceLabels, Counter>,
    /// Records a converter failed on (dead-lettered or dropped), per converter and kind.
    pub converter_errors: Family<ConverterErrorLabels, Counter>,
    /// Serial bytes that never became a record: oversize frames, frames cut by an unplug.
    pub serial_discarded: Family<SerialDiscardLabels, Counter>,
    /// Capture to Kafka confirmation, seconds.
    pub delivery_latency: Histogram,
    pub downlink: DownlinkMetrics,
    /// Which pipeline operations are running, and since when; feeds the systemd watchdog.
    pub health: Health,
    /// Link state, last errors, debug events and history for the status view.
    pub live: live::Live,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edgegate");
        let m = Metrics {
            records_in: Family::default(),
            records_out: Counter::default(),
            dropped: Family::default(),
            buffer_records: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_disk_free_bytes: Gauge::default(),
            buffer_oldest_age_seconds: Gauge::default(),
            kafka_link_up: Gauge::default(),
            kafka_link_refused: Family::default(),
            source_connected: Family::default(),
            source_restarts: Family::default(),
            mqtt_redelivered: Family::default(),
            converter_errors: Family::default(),
            serial_discarded: Family::default(),
            delivery_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
            ]),
            downlink: DownlinkMetrics::new(),
            registry: Registry::default(),
            health: Health::default(),
            live: live::Live::default(),
        };
        let r = &mut registry;
        r.register(
            "records_in",
            "Records made durable, per source",
            m.records_in.clone(),
        );
        r.register(
            "records_out",
            "Records confirmed by Kafka",
            m.records_out.clone(),
        );
        r.register(
            "records_dropped",
            "Records dropped, per reason",
            m.dropped.clone(),
        );
        r.register(
            "buffer_records",
            "Records in the disk buffer",
            m.buffer_records.clone(),
        );
        r.register(
            "buffer_bytes",
            "Stored bytes in the disk buffer",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_disk_free_bytes",
            "Free bytes on data_dir's filesystem, for unprivileged users (checked on commits)",
            m.buffer_disk_free_bytes.clone(),
        );
        r.register(
            "buffer_oldest_age_seconds",
            "Age of the oldest buffered record",
            m.buffer_oldest_age_seconds.clone(),
        );
        r.register(
            "kafka_link_up",
            "1 while Kafka confirms deliveries",
            m.kafka_link_up.clone(),
        );
        r.register(
            "kafka_link_refused",
            "1 while the Kafka broker refuses the gateway, per reason (authentication, authorisation, tls); records stay buffered",
            m.kafka_link_refused.clone(),
        );
        r.register(
            "source_connected",
            "1 while a source is connected to its device or broker",
            m.source_connected.clone(),
        );
        r.register(
            "source_restarts",
            "Times a source task ended unexpectedly and was restarted",
            m.source_restarts.clone(),
        );
        r.register(
            "mqtt_redelivered",
            "MQTT messages redelivered by the broker (DUP flag; header edgegate-redelivered), per source",
            m.mqtt_redelivered.clone(),
        );
        r.register(
            "converter_errors",
            "Records a converter failed on, per converter and kind (exception, timeout, out_of_memory, invalid_result, panic, crash); every timeout counts, also those of records retried later",
            m.converter_errors.clone(),
        );
        r.register(
            "serial_frames_discarded",
            "Serial frames discarded, per source and reason (oversize, incomplete)",
            m.serial_discarded.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Capture to Kafka confirmation",
            m.delivery_latency.clone(),
        );
        m.downlink.register(r);
        Metrics { registry, ..m }
    }

    pub fn count_dropped(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.label().into(),
            })
            .inc_by(n);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.label().into(),
            })
            .get()
    }

    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL.into_iter().map(|r| self.dropped(r)).sum()
    }

    /// Records dropped per reason, for reasons seen; reading creates no series.
    pub fn dropped_by_reason(&self) -> BTreeMap<String, u64> {
        DropReason::ALL
            .into_iter()
            .filter_map(|r| {
                let labels = ReasonLabels {
                    reason: r.label().into(),
                };
                let n = self.dropped.get(&labels).map(|c| c.get())?;
                (n > 0).then(|| (r.label().to_owned(), n))
            })
            .collect()
    }

    pub fn count_converter_error(&self, converter: &str, kind: &str) {
        self.converter_errors
            .get_or_create(&ConverterErrorLabels {
                converter: converter.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// A converter failed on a record: counted, and its message kept as the converter's last.
    pub fn converter_failed(&self, converter: &str, kind: &str, message: String) {
        self.count_converter_error(converter, kind);
        self.live.converter_failed(converter, kind, message);
    }

    pub fn converter_errors_total(&self, converter: &str) -> u64 {
        [
            "exception",
            "timeout",
            "out_of_memory",
            "invalid_result",
            "panic",
        ]
        .into_iter()
        .map(|kind| {
            self.converter_errors
                .get_or_create(&ConverterErrorLabels {
                    converter: converter.into(),
                    kind: kind.into(),
                })
                .get()
        })
        .sum()
    }

    pub fn count_serial_discarded(&self, source: &str, reason: &str, n: u64) {
        self.serial_discarded
            .get_or_create(&SerialDiscardLabels {
                source: source.into(),
                reason: reason.into(),
            })
            .inc_by(n);
    }

    pub fn source_in(&self, source: &str) -> Counter {
        self.records_in
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .clone()
    }

    pub fn count_source_restart(&self, source: &str) {
        self.source_restarts
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc();
    }

    pub fn mqtt_redelivered(&self, source: &str) -> Counter {
        self.mqtt_redelivered
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .clone()
    }

    pub fn set_kafka_link_refused(&self, refusal: crate::kafka::Refusal, refused: bool) {
        self.kafka_link_refused
            .get_or_create(&ReasonLabels {
                reason: refusal.label().into(),
            })
            .set(i64::from(refused));
    }

    pub fn set_source_connected(&self, source: &str, up: bool) {
        self.source_connected
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .set(i64::from(up));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
