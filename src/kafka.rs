//! The Kafka sink: an idempotent, acks=all librdkafka producer whose delivery reports come back to
//! the forwarder as [`Delivery`] values.
//!
//! The durable queue is the disk buffer, not librdkafka's memory: librdkafka's queue is kept small
//! and messages never time out inside it (`message.timeout.ms = 0`), so a record is only ever given
//! up by the forwarder, never silently by the client library.

mod reports;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::record::Record;

/// What became of one produced record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written to all in-sync replicas.
    Delivered,
    /// Kafka will never take it (invalid): retrying cannot help.
    Rejected(String),
    /// The broker refused the record's whole batch as too large. Alone in its batch, the record
    /// is too large; otherwise any record of the batch may be: resend them one per batch.
    TooLarge(String),
    /// Not written; send it again after a pause (authorisation, unknown topic, …).
    Retry(String),
    /// Purged from the producer's queue because the producer is being replaced.
    Purged,
}

#[derive(Debug)]
pub struct Delivery {
    pub seq: u64,
    /// Which Kafka record made from the buffered record: the entity index, 0 otherwise.
    pub part: u32,
    pub captured_ms: u64,
    pub outcome: Outcome,
}

/// Client-level events the forwarder reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The producer is unusable; replace it and resend everything unconfirmed.
    Fatal(String),
    /// No broker can be reached.
    LinkDown(String),
    /// The broker refused us for a reason only a configuration change fixes; `detail` is
    /// librdkafka's text of the first refusal.
    Refused { refusal: Refusal, detail: String },
}

/// Why a broker refuses the gateway, as far as the operator has to act on it. librdkafka keeps
/// retrying, so records wait in the buffer and go out once the broker accepts the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// SASL authentication failed: wrong username or password, or a mechanism the broker does
    /// not offer.
    Authentication,
    /// Authenticated, but the user may not write the topic (Kafka ACLs).
    Authorisation,
    /// The TLS handshake failed: an untrusted broker certificate, a wrong host name, TLS against
    /// a plaintext listener.
    Tls,
}

impl Refusal {
    /// The label of `edgegate_kafka_link_refused`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Authentication => "authentication",
            Refusal::Authorisation => "authorisation",
            Refusal::Tls => "tls",
        }
    }

    /// What the operator should look at; `detail` is librdkafka's error text.
    pub fn advice(self, detail: &str) -> &'static str {
        match self {
            Refusal::Authentication => {
                "kafka authentication failed: check kafka.properties sasl.username and \
                 sasl.password (or kafka.properties_env), and sasl.mechanisms against what the \
                 broker offers; records stay buffered until the broker accepts them"
            }
            Refusal::Authorisation => {
                "kafka refused access: the user lacks permissions (ACLs: Write and Describe on \
                 the topic, IdempotentWrite on the cluster); records stay buffered until it may \
                 write"
            }
            Refusal::Tls if detail.contains("certificate verify failed") => {
                "kafka TLS handshake failed: the broker's certificate is not trusted (or does \
                 not name the broker's host): set kafka.properties ssl.ca.location to the CA that \
                 signed it (or install that CA in the system store); records stay buffered until \
                 the handshake succeeds"
            }
            Refusal::Tls => {
                "kafka TLS handshake failed: check kafka.properties security.protocol (SSL or \
                 SASL_SSL only for TLS listeners) and the ssl.* settings; records stay buffered \
                 until the handshake succeeds"
            }
        }
    }
}

/// For clients without a link state of their own (the downlink's): logs each refusal once, with
/// what to check, until [`RefusalLatch::clear`] (the client works again).
#[derive(Debug, Default)]
pub struct RefusalLatch(AtomicU8);

impl RefusalLatch {
    /// Logs `refusal` of `client` unless it is the one logged last.
    pub fn report(&self, client: &str, refusal: Refusal, detail: &str) {
        let code = refusal as u8 + 1;
        if self.0.swap(code, Ordering::Relaxed) != code {
            tracing::error!(
                client,
                reason = refusal.label(),
                detail,
                "{}",
                refusal.advice(detail)
            );
        }
    }

    /// The client works: a later refusal is news again.
    pub fn clear(&self) {
        if self.0.load(Ordering::Relaxed) != 0 {
            self.0.store(0, Ordering::Relaxed);
        }
    }
}

/// Which librdkafka client errors are refusals rather than an unreachable broker.
pub fn refusal(code: Option<RDKafkaErrorCode>) -> Option<Refusal> {
    match code? {
        RDKafkaErrorCode::Authentication
        | RDKafkaErrorCode::SaslAuthenticationFailed
        | RDKafkaErrorCode::UnsupportedSASLMechanism
        | RDKafkaErrorCode::IllegalSASLState => Some(Refusal::Authentication),
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => Some(Refusal::Authorisation),
        RDKafkaErrorCode::SSL => Some(Refusal::Tls),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// librdkafka refused the configuration; fatal (a bad `[kafka.properties]` entry).
    #[error("kafka configuration: {0}")]
    Config(KafkaError),
    /// librdkafka's queue is full; wait for deliveries and send again.
    #[error("producer queue full")]
    QueueFull,
    /// This record can never be produced (invalid); count it dropped and go on.
    #[error("record rejected: {0}")]
    Rejected(String),
    /// This record is larger than the producer's limit (`kafka.max_record_bytes`, or the topic's
    /// `max.message.bytes` when lower): it can never be produced. Count it (`too_large`) and go
    /// on; refusing it here keeps it out of a produce request the broker would refuse whole.
    #[error("record too large: {0}")]
    TooLarge(String),
    /// Not accepted now (for example the topic is not authorised yet); resend it later.
    #[error("record not accepted now: {0}")]
    Retry(String),
    /// The delivery report thread could not start; see [`reports::ReportsError`].
    #[error(transparent)]
    Reports(#[from] reports::ReportsError),
    /// Topic could not be checked or created yet; retry with backoff.
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
}

pub struct SinkContext {
    deliveries: mpsc::UnboundedSender<Delivery>,
    events: mpsc::UnboundedSender<ClientEvent>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka repeats connection failures on every retry; our link state logs the change.
        if matches!(
            level,
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical
        ) {
            tracing::error!(target: "librdkafka", facility = fac, "{message}");
        } else {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let event = match (code, refusal(code)) {
            (_, Some(refusal)) => ClientEvent::Refused {
                refusal,
                detail: reason.to_owned(),
            },
            (Some(RDKafkaErrorCode::Fatal), _) => ClientEvent::Fatal(reason.to_owned()),
            // The reason text varies ("0/1 brokers are down"); the state must not.
            (Some(RDKafkaErrorCode::AllBrokersDown), _) => {
                ClientEvent::LinkDown("no broker reachable".into())
            }
            _ => {
                tracing::debug!(target: "librdkafka", %error, reason, "client error");
                return;
            }
        };
        let _ = self.events.send(event);
    }
}

/// Carried through librdkafka with each message.
pub struct Opaque {
    seq: u64,
    part: u32,
    captured_ms: u64,
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<Opaque>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Opaque>) {
        let outcome = match result {
            Ok(_) => Outcome::Delivered,
            Err((e, _)) => classify(e),
        };
        let _ = self.deliveries.send(Delivery {
            seq: opaque.seq,
            part: opaque.part,
            captured_ms: opaque.captured_ms,
            outcome,
        });
    }
}

fn classify(e: &KafkaError) -> Outcome {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => Outcome::Purged,
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Outcome::TooLarge(e.to_string()),
        Some(
            RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::BadMessage,
        ) => Outcome::Rejected(e.to_string()),
        _ => Outcome::Retry(e.to_string()),
    }
}

/// edgegate's producer settings; `[kafka.properties]` may override all but the guarantees, which
/// `check` refuses to weaken. `max_record_bytes` caps each record and each produce batch.
fn producer_config(config: &Config, batching: Batching) -> ClientConfig {
    let max_record_bytes = batching.max_record_bytes;
    let k = &config.kafka;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("client.id", format!("edgegate-{}", config.gateway.id))
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("message.timeout.ms", "0")
        .set(
            "queue.buffering.max.messages",
            (k.max_in_flight + 16).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            // Headroom over our own limit for headers and one record of up to message.max.bytes.
            (k.max_in_flight_bytes.as_u64() / 1024 + max_record_bytes / 1024 + 1024).to_string(),
        )
        // A record above it is refused by `send`, alone; a batch never exceeds it, so the broker
        // never refuses a whole batch for one record.
        .set("message.max.bytes", max_record_bytes.to_string())
        .set("linger.ms", "5")
        .set("socket.keepalive.enable", "true")
        .set("socket.timeout.ms", "10000")
        .set("request.timeout.ms", "10000")
        .set("reconnect.backoff.ms", "200")
        .set("reconnect.backoff.max.ms", "5000")
        .set_log_level(RDKafkaLogLevel::Info);
    for (key, value) in config.kafka_properties() {
        c.set(key, value);
    }
    if batching.one_record_per_batch {
        c.set("batch.num.messages", "1");
    }
    c
}

/// How the producer cuts records into produce batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// librdkafka's `message.max.bytes`: the largest record, and the largest batch.
    pub max_record_bytes: u64,
    /// Every record in a batch of its own, so that a broker refusing a batch as too large
    /// refuses that one record only.
    pub one_record_per_batch: bool,
}

/// Properties that would break the no-loss guarantee if a user overrode them.
pub fn check_guarantees(config: &Config) -> Result<(), (String, String)> {
    for (key, value) in config.kafka_properties() {
        if key == "message.max.bytes" {
            return Err((
                format!("kafka.properties.{key}"),
                "set kafka.max_record_bytes instead: the sources' limits are checked against it"
                    .into(),
            ));
        }
        let bad = match key.as_str() {
            "acks" | "request.required.acks" => !matches!(value.as_str(), "all" | "-1"),
            "enable.idempotence" => value != "true",
            _ => false,
        };
        if bad {
            return Err((
                format!("kafka.properties.{key}"),
                format!("{value:?} would allow acknowledged records to be lost; edgegate needs acks=all and idempotence"),
            ));
        }
    }
    // Let librdkafka itself validate every property name and value now, not at the first send.
    let (tx, _) = mpsc::unbounded_channel();
    let (etx, _) = mpsc::unbounded_channel();
    let batching = Batching {
        max_record_bytes: config.kafka.max_record_bytes.as_u64(),
        one_record_per_batch: false,
    };
    producer_config(config, batching)
        .create_with_context::<_, BaseProducer<SinkContext>>(SinkContext {
            deliveries: tx,
            events: etx,
        })
        .map(drop)
        .map_err(|e| {
            let message = e.to_string();
            let key = named_property(config, &message);
            // OpenSSL's text for a missing file is "system lib": say what is wrong.
            let missing = config.kafka_properties().into_iter().find(|(k, v)| {
                k.ends_with(".location")
                    && key.ends_with(&format!(".{k}"))
                    && !std::path::Path::new(v).exists()
            });
            match missing {
                Some((_, path)) => (key, format!("{path} does not exist ({message})")),
                None => (key, message),
            }
        })
}

/// The configured property librdkafka's message is about ("ssl.ca.location failed: …", "No
/// such configuration property: …"), as the operator wrote it; `kafka.properties` when the
/// message names none.
fn named_property(config: &Config, message: &str) -> String {
    let k = &config.kafka;
    let written = k
        .properties
        .keys()
        .map(|key| ("kafka.properties", key))
        .chain(
            k.properties_env
                .keys()
                .map(|key| ("kafka.properties_env", key)),
        );
    let named = written
        .filter(|(_, key)| message.contains(key.as_str()))
        .max_by_key(|(_, key)| key.len());
    if let Some((table, key)) = named {
        return format!("{table}.{key}");
    }
    // A property the operator did not write ("sasl.username and sasl.password must be set").
    let mentioned = message
        .split(|c: char| !(c.is_ascii_lowercase() || c == '.' || c == '_'))
        .map(|word| word.trim_matches('.'))
        .find(|word| word.contains('.') && word.starts_with(|c: char| c.is_ascii_lowercase()));
    match mentioned {
        Some(key) => format!("kafka.properties.{key}"),
        // SASL without sasl.mechanisms means GSSAPI (Kerberos), which edgegate is built without.
        None if message.contains("SASL mechanism") => "kafka.properties.sasl.mechanisms".into(),
        None => "kafka.properties".into(),
    }
}

pub struct Sink {
    /// Declared first: the thread stops before the producer is dropped.
    _reports: reports::ReportThread,
    producer: Arc<BaseProducer<SinkContext>>,
    topic: String,
    dead_letter_topic: Option<String>,
    gateway_id: String,
}

/// What one Kafka record made from a buffered record carries.
#[derive(Debug, Clone, Copy)]
pub enum Out<'a> {
    /// The raw payload, keyed by the MQTT topic.
    Raw,
    /// Entity `index` of the record's converter result, keyed by device or asset name.
    Entity {
        converter: &'a str,
        index: usize,
        key: &'a str,
        value: &'a [u8],
    },
    /// The raw payload on the dead-letter topic, with the converter's error.
    DeadLetter { converter: &'a str, error: &'a str },
}

impl Out<'_> {
    /// Tells the Kafka records made from one buffered record apart (see [`Delivery::part`]).
    pub fn part(&self) -> u32 {
        match self {
            Out::Entity { index, .. } => u32::try_from(*index).unwrap_or(u32::MAX),
            Out::Raw | Out::DeadLetter { .. } => 0,
        }
    }
}

pub type Receivers = (
    mpsc::UnboundedReceiver<Delivery>,
    mpsc::UnboundedReceiver<ClientEvent>,
);

impl Sink {
    /// A producer that refuses records above `batching.max_record_bytes` (see
    /// [`SinkError::TooLarge`]).
    pub fn new(config: &Config, batching: Batching) -> Result<(Sink, Receivers), SinkError> {
        let (deliveries, drx) = mpsc::unbounded_channel();
        let (events, erx) = mpsc::unbounded_channel();
        let producer: Arc<BaseProducer<SinkContext>> = Arc::new(
            producer_config(config, batching)
                .create_with_context(SinkContext { deliveries, events })
                .map_err(SinkError::Config)?,
        );
        let sink = Sink {
            _reports: reports::ReportThread::start(producer.clone())?,
            producer,
            topic: config.kafka.topic.clone(),
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            gateway_id: config.gateway.id.clone(),
        };
        Ok((sink, (drx, erx)))
    }

    /// Hands one Kafka record made from `record` to librdkafka; its outcome arrives later as a
    /// [`Delivery`] carrying the record's sequence number.
    pub fn send(&self, record: &Record, out: Out<'_>) -> Result<(), SinkError> {
        let seq = record.seq.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(5 + record.meta.len())
            .insert(header("edgegate-gateway", &self.gateway_id))
            .insert(header("edgegate-seq", &seq))
            .insert(header("edgegate-source", &record.source));
        let mut key = None;
        for (k, v) in &record.meta {
            headers = headers.insert(Header {
                key: &meta_header_name(k),
                value: Some(v.as_bytes()),
            });
            // Raw records are keyed by where they came from, which keeps each device in order.
            if k == "topic" || (k == "port" && key.is_none()) {
                key = Some(v.as_str());
            }
        }
        let mut topic = self.topic.as_str();
        let mut payload = record.payload.as_slice();
        let index;
        match out {
            Out::Raw => {}
            Out::Entity {
                converter,
                index: i,
                key: k,
                value,
            } => {
                index = i.to_string();
                headers = headers
                    .insert(header("edgegate-converter", converter))
                    .insert(header("edgegate-entity", &index));
                key = Some(k);
                payload = value;
            }
            Out::DeadLetter { converter, error } => {
                headers = headers
                    .insert(header("edgegate-converter", converter))
                    .insert(header("edgegate-error", error));
                topic = self.dead_letter_topic.as_deref().ok_or_else(|| {
                    SinkError::Rejected("no kafka.dead_letter_topic configured".into())
                })?;
            }
        }
        let opaque = Box::new(Opaque {
            seq: record.seq,
            part: out.part(),
            captured_ms: record.captured_ms,
        });
        let mut message = BaseRecord::with_opaque_to(topic, opaque)
            .payload(payload)
            .timestamp(record.captured_ms as i64)
            .headers(headers);
        if let Some(key) = key {
            message = message.key(key);
        }
        self.producer.send(message).map_err(|(e, _)| {
            match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::QueueFull) => return SinkError::QueueFull,
                Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    return SinkError::TooLarge(e.to_string())
                }
                _ => {}
            }
            // The rule of delivery reports: only a record Kafka can never take is given up.
            match classify(&e) {
                Outcome::Rejected(reason) => SinkError::Rejected(reason),
                Outcome::TooLarge(reason) => SinkError::TooLarge(reason),
                Outcome::Retry(reason) => SinkError::Retry(reason),
                Outcome::Delivered | Outcome::Purged => SinkError::Retry(e.to_string()),
            }
        })
    }

    /// Why the producer became unusable, if it did. librdkafka reports a fatal error as an error
    /// event carrying the underlying code, so this is the reliable way to notice one.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    /// Makes sure the topic (and the dead-letter topic) exist, creating them when
    /// `create_topic` is set, and with `describe` returns the lowest `max.message.bytes` among
    /// them when the broker tells. Blocking.
    pub fn ensure_topic(
        &self,
        config: &Config,
        timeout: Duration,
        describe: bool,
    ) -> Result<Option<u64>, SinkError> {
        let mut limit: Option<u64> = None;
        for topic in std::iter::once(&self.topic).chain(&self.dead_letter_topic) {
            self.ensure_one_topic(config, topic, timeout)?;
            if !describe {
                continue;
            }
            if let Some(l) = topic_limit(config, topic, timeout) {
                limit = Some(limit.map_or(l, |m| m.min(l)));
            }
        }
        Ok(limit)
    }

    fn ensure_one_topic(
        &self,
        config: &Config,
        topic: &str,
        timeout: Duration,
    ) -> Result<(), SinkError> {
        let topic_err = |message: String| SinkError::Topic {
            topic: topic.to_owned(),
            message,
        };
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| topic_err(e.to_string()))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if exists {
            return Ok(());
        }
        if !config.kafka.create_topic {
            return Err(topic_err(
                "does not exist and kafka.create_topic is false".into(),
            ));
        }
        create_topic(config, topic, timeout).map_err(topic_err)
    }
}

/// `edgegate-<key>`; the keys sources set are spelled out so the hot path does not allocate.
fn meta_header_name(key: &str) -> std::borrow::Cow<'static, str> {
    match key {
        "topic" => "edgegate-topic".into(),
        "port" => "edgegate-port".into(),
        other => format!("edgegate-{other}").into(),
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

fn admin_client(config: &Config) -> Result<AdminClient<DefaultClientContext>, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    for (key, value) in config.kafka_properties() {
        c.set(key, value);
    }
    c.create().map_err(|e| e.to_string())
}

/// Admin calls are async; these run on a blocking thread of their own.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f))
}

/// The topic's `max.message.bytes` (Kafka reports the broker's default when the topic has none of
/// its own). `None` when the broker does not answer: the configured limit stands.
fn topic_limit(config: &Config, topic: &str, timeout: Duration) -> Option<u64> {
    let admin = admin_client(config).ok()?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let resource = ResourceSpecifier::Topic(topic);
    let described = block_on(admin.describe_configs([&resource], &opts))
        .and_then(|r| r.map_err(|e| e.to_string()));
    let results = match described {
        Ok(results) => results,
        Err(e) => {
            tracing::debug!(topic, error = %e, "describe configs failed; using kafka.max_record_bytes");
            return None;
        }
    };
    results.into_iter().find_map(|r| {
        let value = r.ok()?.get("max.message.bytes")?.value.clone()?;
        value.trim().parse().ok()
    })
}

pub(crate) fn create_topic(config: &Config, topic: &str, timeout: Duration) -> Result<(), String> {
    let admin = admin_client(config)?;
    let new = NewTopic::new(
        topic,
        config.kafka.topic_partitions,
        TopicReplication::Fixed(config.kafka.topic_replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let results = block_on(admin.create_topics([&new], &opts))?.map_err(|e| e.to_string())?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic, "created kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("cannot create: {code}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_errors_are_classified_for_the_forwarder() {
        let e = |c| KafkaError::MessageProduction(c);
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)),
            Outcome::TooLarge(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::InvalidRecord)),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::MessageTimedOut)),
            Outcome::Retry(_)
        ));
        assert_eq!(classify(&e(RDKafkaErrorCode::PurgeQueue)), Outcome::Purged);
    }

    fn config_with(props: &str) -> Config {
        let text = format!(
            "[gateway]\nid = \"g\"\ndata_dir = \"/tmp/x\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\ntopic = \"t\"\n[kafka.properties]\n{props}\n"
        );
        Config::parse(&text, std::path::Path::new("t.toml")).unwrap()
    }

    #[test]
    fn weakening_the_delivery_guarantee_is_refused() {
        let (key, _) = check_guarantees(&config_with("acks = 1")).unwrap_err();
        assert_eq!(key, "kafka.properties.acks");
        let (key, _) =
            check_guarantees(&config_with("\"enable.idempotence\" = false")).unwrap_err();
        assert_eq!(key, "kafka.properties.enable.idempotence");
        check_guarantees(&config_with("\"compression.type\" = \"lz4\"")).unwrap();
        let (key, msg) =
            check_guarantees(&config_with("\"message.max.bytes\" = 16777216")).unwrap_err();
        assert_eq!(key, "kafka.properties.message.max.bytes");
        assert!(msg.contains("kafka.max_record_bytes"), "{msg}");
    }

    #[test]
    fn unknown_librdkafka_properties_are_reported() {
        let (key, msg) = check_guarantees(&config_with("\"no.such.property\" = 1")).unwrap_err();
        assert_eq!(key, "kafka.properties.no.such.property");
        assert!(msg.contains("no.such.property"), "{msg}");
    }

    /// librdkafka loads the CA file when the client is created, so `check` finds a wrong path.
    #[test]
    fn a_missing_ca_file_is_named_by_its_key() {
        let config = config_with(
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"u\"\n\"sasl.password\" = \"p\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"",
        );
        let (key, msg) = check_guarantees(&config).unwrap_err();
        assert_eq!(key, "kafka.properties.ssl.ca.location", "{msg}");
        assert!(
            msg.starts_with("/nonexistent/ca.pem does not exist"),
            "{msg}"
        );
        // SASL without a mechanism is librdkafka's GSSAPI, which this build lacks.
        let (key, msg) =
            check_guarantees(&config_with("\"security.protocol\" = \"SASL_SSL\"")).unwrap_err();
        assert_eq!(key, "kafka.properties.sasl.mechanisms", "{msg}");
        let (key, msg) = check_guarantees(&config_with(
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"PLAIN\"",
        ))
        .unwrap_err();
        assert_eq!(key, "kafka.properties.sasl.username", "{msg}");
        // Without TLS librdkafka never reads the file: nothing to report.
        check_guarantees(&config_with(
            "\"ssl.ca.location\" = \"/nonexistent/ca.pem\"",
        ))
        .unwrap();
    }

    #[test]
    fn refusals_are_told_apart_from_an_unreachable_broker() {
        use RDKafkaErrorCode as C;
        assert_eq!(
            refusal(Some(C::Authentication)),
            Some(Refusal::Authentication)
        );
        assert_eq!(
            refusal(Some(C::SaslAuthenticationFailed)),
            Some(Refusal::Authentication)
        );
        assert_eq!(
            refusal(Some(C::UnsupportedSASLMechanism)),
            Some(Refusal::Authentication)
        );
        assert_eq!(refusal(Some(C::SSL)), Some(Refusal::Tls));
        assert_eq!(
            refusal(Some(C::TopicAuthorizationFailed)),
            Some(Refusal::Authorisation)
        );
        assert_eq!(refusal(Some(C::AllBrokersDown)), None);
        assert_eq!(refusal(Some(C::BrokerTransportFailure)), None);
        let untrusted = "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified";
        assert!(Refusal::Tls.advice(untrusted).contains("ssl.ca.location"));
        assert!(Refusal::Authentication
            .advice("")
            .contains("sasl.username and sasl.password"));
    }
}
