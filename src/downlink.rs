//! The downlink: commands from Kafka, through an encoder, to the devices behind the gateway.
//!
//! A stage of its own beside the uplink: it consumes `downlink.topics`, encodes each record with
//! a ThingsBoard-style encoder (or passes its value as is), routes every resulting message to an
//! MQTT source's broker connection or a serial source's open port, and commits a record's offset
//! only after all its messages were delivered (PUBACK or PUBCOMP, the serial write done) or given
//! up after `max_age` (dead-letter topic, or counted and dropped).
//!
//! Order: commands with the same Kafka key (one device) are delivered one after the other, in
//! offset order, in a lane of their own; lanes run side by side, so one unreachable device holds
//! up only its own commands. The committed position of a partition never passes a command that
//! has not finished, so after a crash or restart nothing is skipped (some may be delivered again).

mod input;
mod offsets;
mod route;
mod template;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, DownlinkConfig, DOWNLINK_IN_FLIGHT_BYTES};
use crate::converter::{ConvertError, ConverterError, Downlink, EncodeJob, Encoders};
use crate::kafka::RefusalLatch;
use crate::metrics::{DownlinkMetrics, Metrics, ReasonLabels};

pub use input::GATEWAY_HEADER;
use input::{Command, Input};
use offsets::Offsets;
use route::{Delivery, Failed, Routes, Unroutable, NO_ROUTE};
pub use route::{Outlet, Outlets};
pub use template::Template;

/// Why the downlink cannot run. Both are configuration problems: exit 2 and fix the key named.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// librdkafka refused the consumer or dead-letter producer settings (`[kafka]` properties).
    #[error("downlink: cannot create the Kafka {what}: {message}")]
    Client { what: &'static str, message: String },
    /// The encoder script cannot be loaded; `check` names the file and line.
    #[error("downlink: {0}")]
    Encoder(#[from] ConverterError),
    /// The encoder thread stopped, or a delivery task panicked (a bug): the stage ends and the
    /// gateway starts it again from the committed offsets.
    #[error("downlink: {0}")]
    Failed(String),
}

/// How often librdkafka reports statistics, from which the lag gauge is set.
const STATS_INTERVAL_MS: &str = "5000";
/// How long the commands in flight may stay at their bound before fetching is paused and the
/// consumer read again (well below any sensible max.poll.interval.ms).
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// The time an attempt gets when its command is already past `max_age`.
const LAST_ATTEMPT: Duration = Duration::from_secs(1);
/// How long stopping waits for the last offset commit.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown waits for deliveries already under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs the downlink until `shutdown`. Kafka being unreachable is not an error: the consumer
/// waits and resumes from the committed offsets.
pub async fn run(
    config: Arc<Config>,
    outlets: Outlets,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), DownlinkError> {
    let Some(settings) = config.downlink.clone() else {
        shutdown.cancelled().await;
        return Ok(());
    };
    let encoder = match &settings.converter {
        Some(name) => {
            let c = config
                .converters
                .get(name)
                .ok_or_else(|| DownlinkError::Failed(format!("no [converters.{name}] table")))?;
            Some(Encoders::start_sharing(
                name,
                c,
                &config.gateway.data_dir,
                config.gateway.id.clone(),
                Some(metrics.live.debug_events.clone()),
            )?)
        }
        None => None,
    };
    let positions = Positions::default();
    let consumer = Arc::new(consumer(
        &config,
        &settings,
        metrics.clone(),
        positions.clone(),
    )?);
    let dead_letters = match &settings.dead_letter_topic {
        Some(topic) => Some(DeadLetters::new(&config, topic).await?),
        None => None,
    };
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| DownlinkError::Client {
            what: "consumer",
            message: e.to_string(),
        })?;
    let routes = Routes::new(&settings, &outlets);
    for label in routes.labels() {
        // Present from the start, so that a dashboard shows 0 rather than nothing.
        DownlinkMetrics::route(&metrics.downlink.delivered, label);
    }
    tracing::info!(topics = ?settings.topics, group = %group_id(&config, &settings),
        encoder = settings.converter.as_deref().unwrap_or("none"), "downlink consuming");
    let stage = Stage {
        positions,
        lanes: Lanes::default(),
        offsets: Offsets::default(),
        tasks: JoinSet::new(),
        in_flight: 0,
        in_flight_bytes: 0,
        link: ConsumerState::default(),
        paused: false,
        paused_partitions: Default::default(),
        shared: Arc::new(Shared {
            metrics,
            dead_letters,
            max_age: settings.max_age,
            retry: (settings.retry_min, settings.retry_max),
            gateway_id: config.gateway.id.clone(),
            failing_routes: Default::default(),
            dead_letters_failing: AtomicBool::new(false),
            shutdown: shutdown.clone(),
        }),
        settings,
        routes,
        encoder,
        consumer,
    };
    stage.run(shutdown).await
}

fn group_id<'a>(config: &'a Config, settings: &'a DownlinkConfig) -> &'a str {
    settings.group_id.as_deref().unwrap_or(&config.gateway.id)
}

type CommandConsumer = StreamConsumer<ConsumerEvents>;

/// Routes librdkafka's logs to tracing (its repeated connection failures at debug level) and sets
/// the lag gauge from its statistics, which cost no extra requests.
struct ConsumerEvents {
    metrics: Arc<Metrics>,
    positions: Positions,
    /// The broker refused the consumer (credentials, permissions, TLS): said once, not per retry.
    refused: RefusalLatch,
}

impl ClientContext for ConsumerEvents {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let severe = matches!(
            level,
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical
        );
        if severe {
            tracing::error!(target: "librdkafka", facility = fac, "{message}");
        } else {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}");
        }
    }

    /// librdkafka's client-wide errors. A refusal (credentials, TLS) is reported once; connection
    /// failures ("all brokers down", transport failures) are an uplink outage, which the consumer
    /// loop reports as a warning when a fetch fails; rdkafka's default callback would log each
    /// one at ERROR level.
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        match crate::kafka::refusal(code) {
            Some(refusal) => self.refused.report("downlink consumer", refusal, reason),
            None => log_client_error("downlink consumer", &error, reason),
        }
    }

    /// Lag: the broker's high watermark less the position that would be committed, per
    /// partition; librdkafka's own figure knows nothing before the first commit.
    fn stats(&self, statistics: Statistics) {
        let positions = lock(&self.positions);
        let lag: i64 = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| t.partitions.values().map(move |p| (topic, p)))
            .filter_map(|(topic, p)| {
                let position = positions.get(&(topic.clone(), p.partition))?;
                Some((p.hi_offset - position).max(0))
            })
            .sum();
        self.metrics.downlink.lag.set(lag);
    }
}

/// Each partition's committable position, shared with the statistics callback for the lag.
type Positions = Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConsumerContext for ConsumerEvents {}

fn consumer(
    config: &Config,
    settings: &DownlinkConfig,
    metrics: Arc<Metrics>,
    positions: Positions,
) -> Result<CommandConsumer, DownlinkError> {
    consumer_config(config, settings)
        .create_with_context(ConsumerEvents {
            metrics,
            positions,
            refused: RefusalLatch::default(),
        })
        .map_err(|e| DownlinkError::Client {
            what: "consumer",
            message: e.to_string(),
        })
}

fn consumer_config(config: &Config, settings: &DownlinkConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("group.id", group_id(config, settings))
        // Static membership: a gateway restarted after a crash takes its partitions back at once
        // instead of waiting for the broker to expire the old session.
        .set(
            "group.instance.id",
            format!("edgegate-{}", config.gateway.id),
        )
        .set(
            "client.id",
            format!("edgegate-{}-downlink", config.gateway.id),
        )
        // Offsets are stored by us once a command finished, and committed in the background.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", settings.start_from.as_str())
        // librdkafka's read-ahead, bounded for small boards.
        .set("queued.max.messages.kbytes", "1024")
        .set("queued.min.messages", "1000")
        .set("fetch.max.bytes", "1048576")
        .set(
            "fetch.wait.max.ms",
            settings.fetch_wait.as_millis().to_string(),
        )
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.ms", "200")
        .set("reconnect.backoff.max.ms", "5000")
        .set("statistics.interval.ms", STATS_INTERVAL_MS)
        .set_log_level(RDKafkaLogLevel::Info);
    for (key, value) in config.kafka_properties() {
        if CONSUMER_PROPERTY_FILTER.contains(&key.as_str()) {
            continue;
        }
        c.set(key, value);
    }
    c
}

/// Creates (and drops) the downlink's consumer as it would start, for `check` and a reload:
/// librdkafka refuses some combinations of `kafka.properties` only for a consumer
/// (`session.timeout.ms` above `max.poll.interval.ms`, say).
pub fn check_consumer(config: &Config) -> Result<(), String> {
    let Some(settings) = &config.downlink else {
        return Ok(());
    };
    // A plain consumer: the same settings, and no async runtime needed (`check` has none).
    consumer_config(config, settings)
        .create::<rdkafka::consumer::BaseConsumer>()
        .map(drop)
        .map_err(|e| format!("the downlink's Kafka consumer refuses these settings: {e}"))
}

/// Producer settings in `kafka.properties` that a consumer refuses outright.
const CONSUMER_PROPERTY_FILTER: &[&str] = &[
    "acks",
    // The producer's record limit; the consumer's fetch bound is its own.
    "message.max.bytes",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "message.timeout.ms",
    "linger.ms",
    "batch.num.messages",
    "compression.type",
    "compression.codec",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "request.required.acks",
    "retries",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "transactional.id",
];

/// Commands waiting behind the one being delivered, per lane.
type Lanes = HashMap<LaneKey, VecDeque<Job>>;

/// Commands of one device: the Kafka key within a partition; records without a key keep the
/// partition's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LaneKey {
    topic: Arc<str>,
    partition: i32,
    key: Option<Vec<u8>>,
}

/// A consumed record with its messages, from consuming until it is finished.
struct Job {
    command: Command,
    plan: Result<Vec<Delivery>, Unroutable>,
    consumed: Instant,
    bytes: usize,
}

/// What the delivery tasks share.
struct Shared {
    metrics: Arc<Metrics>,
    dead_letters: Option<DeadLetters>,
    max_age: Duration,
    retry: (Duration, Duration),
    gateway_id: String,
    /// Routes whose last attempt failed; one log line when a route fails and when it recovers.
    failing_routes: std::sync::Mutex<HashMap<String, bool>>,
    /// The last dead-letter send failed; one line when that starts and one when it ends.
    dead_letters_failing: AtomicBool,
    shutdown: CancellationToken,
}

struct Stage {
    settings: DownlinkConfig,
    routes: Routes,
    encoder: Option<Encoders>,
    consumer: Arc<CommandConsumer>,
    lanes: Lanes,
    offsets: Offsets,
    positions: Positions,
    tasks: JoinSet<(LaneKey, Finished)>,
    in_flight: usize,
    in_flight_bytes: usize,
    shared: Arc<Shared>,
    link: ConsumerState,
    /// Fetching is paused: `max_in_flight` commands (or their bytes) are in flight.
    paused: bool,
    /// Every partition paused since the last resume.
    paused_partitions: std::collections::BTreeSet<(String, i32)>,
}

/// The consumer's last error, logged when it changes and when records flow again.
#[derive(Default)]
struct ConsumerState {
    error: Option<String>,
    /// The broker refuses the consumer: its client context said so once, with what to check.
    refused: bool,
}

impl ConsumerState {
    fn down(&mut self, error: KafkaError) {
        if crate::kafka::refusal(error.rdkafka_error_code()).is_some() {
            self.refused = true;
            return;
        }
        // While refused, the unreachable broker that follows from it on every retry is no news.
        if self.refused {
            return;
        }
        let error = error.to_string();
        if self.error.as_deref() != Some(error.as_str()) {
            tracing::warn!(%error, "downlink consumer cannot fetch; retrying");
            self.error = Some(error);
        }
    }

    fn up(&mut self) {
        let refused = std::mem::take(&mut self.refused);
        if self.error.take().is_some() || refused {
            tracing::info!("downlink consumer fetching again");
        }
    }
}

/// How a job ended.
struct Finished {
    topic: String,
    partition: i32,
    offset: i64,
    bytes: usize,
    /// False when shutdown interrupted it: not finished, not committed.
    done: bool,
}

impl Stage {
    async fn run(mut self, shutdown: CancellationToken) -> Result<(), DownlinkError> {
        let mut full_since: Option<Instant> = None;
        let result = loop {
            let max = self.settings.max_in_flight;
            let full = self.in_flight >= max || self.in_flight_bytes >= DOWNLINK_IN_FLIGHT_BYTES;
            let roomy =
                self.in_flight <= max / 2 && self.in_flight_bytes <= DOWNLINK_IN_FLIGHT_BYTES / 2;
            // A brief full is back-pressure: the consumer is simply not read, and librdkafka's
            // prefetched records wait. Full for longer (a device that cannot be reached holds
            // the slots), fetching is paused and the consumer read again: librdkafka leaves the
            // group when not read for max.poll.interval.ms, and serves its logs and statistics
            // through it. A pause drops the prefetched records (fetched again on resume), so it
            // is resumed only at half.
            full_since = if full {
                full_since.or(Some(Instant::now()))
            } else {
                None
            };
            let stuck = full_since.is_some_and(|t| t.elapsed() >= PAUSE_AFTER);
            if stuck && !self.paused {
                self.pause(true);
            } else if self.paused && roomy {
                self.pause(false);
            }
            let read = !full || self.paused;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(joined) = self.tasks.join_next_with_id() => {
                    if let Err(e) = self.finish(joined) {
                        break Err(e);
                    }
                }
                _ = tokio::time::sleep(PAUSE_AFTER), if full && !self.paused => {}
                received = self.consumer.recv(), if read => match received {
                    Ok(message) => {
                        self.link.up();
                        self.consumer.context().refused.clear();
                        let input = input::read(&message, &self.shared.gateway_id, &self.settings.msg_type);
                        drop(message);
                        if self.paused {
                            // Fetched before the pause, or from a partition assigned since:
                            // pause them all again.
                            self.pause(true);
                        }
                        if let Err(e) = self.take(input).await {
                            break Err(e);
                        }
                    }
                    // librdkafka retries by itself; say once what is wrong (a missing topic, no
                    // broker, not authorised) and once when records flow again.
                    Err(e) => self.link.down(e),
                },
            }
        };
        self.stop().await;
        result
    }

    /// Pauses or resumes fetching. librdkafka then fetches again from the last record consumed,
    /// so nothing is skipped. A pause outlives a rebalance in librdkafka (a partition revoked and
    /// assigned again comes back paused), so a resume covers every partition ever paused as well
    /// as the current assignment, and the flag is cleared only once that succeeded.
    fn pause(&mut self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if pause {
            match self.consumer.pause(&assignment) {
                Ok(()) => {
                    self.paused = true;
                    for e in assignment.elements() {
                        self.paused_partitions
                            .insert((e.topic().to_owned(), e.partition()));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "downlink pause failed"),
            }
            return;
        }
        let mut all = TopicPartitionList::new();
        let current = assignment
            .elements()
            .into_iter()
            .map(|e| (e.topic().to_owned(), e.partition()));
        let every: std::collections::BTreeSet<(String, i32)> = current
            .chain(self.paused_partitions.iter().cloned())
            .collect();
        for (topic, partition) in &every {
            all.add_partition(topic, *partition);
        }
        match self.consumer.resume(&all) {
            Ok(()) => {
                self.paused = false;
                self.paused_partitions.clear();
            }
            Err(e) => tracing::debug!(error = %e, "downlink resume failed"),
        }
    }

    /// A consumed record becomes a job, or is skipped.
    async fn take(&mut self, input: Input) -> Result<(), DownlinkError> {
        let (command, plan) = match input {
            Input::OwnRecord(command) => {
                let (topic, partition) = (&command.topic, command.partition);
                self.consumed(topic, partition, command.offset);
                self.commit(topic, partition, command.offset);
                self.shared
                    .metrics
                    .downlink
                    .skipped
                    .get_or_create(&ReasonLabels {
                        reason: "own_record".into(),
                    })
                    .inc();
                return Ok(());
            }
            Input::Malformed(command, error) => {
                let plan = Err(Unroutable {
                    route: NO_ROUTE.into(),
                    error,
                });
                (command, plan)
            }
            Input::Command(command) => {
                let plan = self.plan(&command).await?;
                (command, plan)
            }
        };
        let received = &self.shared.metrics.downlink.received;
        match &plan {
            Ok(deliveries) => {
                for d in deliveries {
                    DownlinkMetrics::route(received, &d.route).inc();
                }
            }
            Err(u) => {
                DownlinkMetrics::route(received, &u.route).inc();
            }
        }
        let bytes = command.value.len()
            + plan
                .as_ref()
                .map_or(0, |ds| ds.iter().map(Delivery::len).sum());
        self.consumed(&command.topic, command.partition, command.offset);
        let lane = LaneKey {
            topic: Arc::from(command.topic.as_str()),
            partition: command.partition,
            key: command.key.clone(),
        };
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
        let job = Job {
            command,
            plan,
            consumed: Instant::now(),
            bytes,
        };
        match self.lanes.get_mut(&lane) {
            Some(waiting) => waiting.push_back(job),
            None => {
                self.lanes.insert(lane.clone(), VecDeque::new());
                self.spawn(lane, job);
            }
        }
        Ok(())
    }

    /// Encodes a command and routes its messages; a command the encoder fails on, or one with a
    /// message no route takes, is unroutable as a whole.
    async fn plan(
        &mut self,
        command: &Command,
    ) -> Result<Result<Vec<Delivery>, Unroutable>, DownlinkError> {
        let messages = match &self.encoder {
            None => vec![Downlink {
                content_type: crate::converter::ContentType::Text,
                data: command.value.clone(),
                metadata: Default::default(),
            }],
            Some(encoder) => {
                let job = EncodeJob {
                    value: command.value.clone(),
                    metadata: command.metadata.clone(),
                    msg_type: command.msg_type.clone(),
                    seq: u64::try_from(command.offset).unwrap_or(0),
                    origin: format!("{}/{}/{}", command.topic, command.partition, command.offset),
                };
                let encoded = encoder
                    .encode(job)
                    .await
                    .map_err(|e| DownlinkError::Failed(e.to_string()))?;
                match encoded {
                    Ok(messages) => messages,
                    Err(e) => {
                        let metrics = &self.shared.metrics;
                        metrics.converter_failed(encoder.name(), e.kind(), e.to_string());
                        return Ok(Err(encoder_failure(e)));
                    }
                }
            }
        };
        Ok(messages
            .into_iter()
            .map(|m| self.routes.plan(m, &command.metadata))
            .collect())
    }

    fn spawn(&mut self, lane: LaneKey, job: Job) {
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            let finished = deliver(job, &shared).await;
            (lane, finished)
        });
    }

    fn finish(
        &mut self,
        joined: Result<(tokio::task::Id, (LaneKey, Finished)), tokio::task::JoinError>,
    ) -> Result<(), DownlinkError> {
        let (lane, finished) = match joined {
            Ok((_, done)) => done,
            Err(e) => {
                return Err(DownlinkError::Failed(format!(
                    "a delivery task failed: {e}"
                )))
            }
        };
        self.in_flight -= 1;
        self.in_flight_bytes -= finished.bytes;
        if finished.done {
            self.commit(&finished.topic, finished.partition, finished.offset);
        }
        let next = self.lanes.get_mut(&lane).and_then(VecDeque::pop_front);
        match next {
            Some(job) => self.spawn(lane, job),
            None => {
                self.lanes.remove(&lane);
            }
        }
        Ok(())
    }

    fn consumed(&mut self, topic: &str, partition: i32, offset: i64) {
        let first = self.offsets.consumed(topic, partition, offset);
        if let Some(position) = first {
            lock(&self.positions).insert((topic.to_owned(), partition), position);
        }
    }

    /// The command at `offset` finished: stores the partition's new committable position, which
    /// librdkafka commits in the background (`auto.commit.interval.ms`).
    fn commit(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(position) = self.offsets.finished(topic, partition, offset) else {
            return;
        };
        lock(&self.positions).insert((topic.to_owned(), partition), position);
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(position))
            .is_err()
        {
            return;
        }
        // Fails only for a partition no longer assigned to us: its new owner redelivers.
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "downlink offset not stored");
        }
    }

    /// Lets deliveries under way finish briefly, then commits what finished. The rest is
    /// consumed again after the restart.
    async fn stop(mut self) {
        self.shared.shutdown.cancel();
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = self.tasks.join_next_with_id() => match joined {
                    Some(Ok((_, (_, f)))) if f.done => self.commit(&f.topic, f.partition, f.offset),
                    Some(_) => {}
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        self.tasks.abort_all();
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, position) in self.offsets.committable() {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(position));
        }
        let consumer = self.consumer.clone();
        let committing = tokio::task::spawn_blocking(move || {
            if tpl.count() > 0 {
                consumer.commit(&tpl, CommitMode::Sync)
            } else {
                Ok(())
            }
        });
        // A broker that does not answer must not hold up a shutdown or a reload: the commands
        // after the last commit are then delivered again, as after a crash.
        match tokio::time::timeout(FINAL_COMMIT_WAIT, committing).await {
            Ok(Ok(Ok(()))) => tracing::info!("downlink stopped; delivered commands committed"),
            _ => tracing::warn!(
                "downlink stopped; the last commit failed or timed out, some commands will be delivered again"
            ),
        }
    }
}

fn encoder_failure(e: ConvertError) -> Unroutable {
    Unroutable {
        route: NO_ROUTE.into(),
        error: format!("encoder: {e}"),
    }
}

/// Delivers a job's messages in order, retrying each with backoff until `max_age` after the
/// command was consumed; then, or at once for an unroutable command, dead-letters it.
async fn deliver(job: Job, shared: &Shared) -> Finished {
    let mut finished = Finished {
        topic: job.command.topic.clone(),
        partition: job.command.partition,
        offset: job.command.offset,
        bytes: job.bytes,
        done: false,
    };
    let deliveries = match &job.plan {
        Ok(deliveries) => deliveries,
        Err(unroutable) => {
            finished.done = dead_letter(
                &job.command,
                &unroutable.route,
                &unroutable.error,
                1,
                shared,
            )
            .await;
            return finished;
        }
    };
    let m = &shared.metrics.downlink;
    for (i, delivery) in deliveries.iter().enumerate() {
        let mut backoff = Backoff::new(shared.retry.0, shared.retry.1);
        loop {
            // No attempt outlasts max_age (an MQTT publish otherwise waits up to 30 s for its
            // ack); one whose command waited in its lane past max_age still gets a second.
            let left = shared.max_age.saturating_sub(job.consumed.elapsed());
            let attempt = tokio::time::timeout(left.max(LAST_ATTEMPT), delivery.attempt());
            let attempted = attempt.await.unwrap_or_else(|_| {
                Err(Failed {
                    error: "no confirmation before max_age".into(),
                    permanent: false,
                })
            });
            let failed = match attempted {
                Ok(()) => {
                    DownlinkMetrics::route(&m.delivered, &delivery.route).inc();
                    m.latency.observe(job.consumed.elapsed().as_secs_f64());
                    route_state(shared, &delivery.route, None);
                    break;
                }
                Err(failed) => failed,
            };
            let rest = (deliveries.len() - i) as u64;
            if failed.permanent {
                finished.done =
                    dead_letter(&job.command, &delivery.route, &failed.error, rest, shared).await;
                return finished;
            }
            let error = failed.error;
            DownlinkMetrics::route(&m.failed, &delivery.route).inc();
            route_state(shared, &delivery.route, Some(&error));
            let left = shared.max_age.saturating_sub(job.consumed.elapsed());
            if left.is_zero() {
                let error = format!("undeliverable for {:?}: {error}", shared.max_age);
                finished.done =
                    dead_letter(&job.command, &delivery.route, &error, rest, shared).await;
                return finished;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay().min(left)) => {}
                _ = shared.shutdown.cancelled() => return finished,
            }
        }
    }
    finished.done = true;
    finished
}

/// One line when a route starts failing, one when it delivers again.
fn route_state(shared: &Shared, route: &str, error: Option<&str>) {
    let mut failing = shared
        .failing_routes
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let was = failing.get(route).copied().unwrap_or(false);
    match error {
        Some(error) if !was => {
            tracing::warn!(route, %error, "downlink route cannot deliver; retrying with backoff");
            failing.insert(route.to_owned(), true);
        }
        None if was => {
            tracing::info!(route, "downlink route delivering again");
            failing.insert(route.to_owned(), false);
        }
        _ => {}
    }
}

/// Gives a command up: to the dead-letter topic when configured (retried until Kafka has it),
/// otherwise counted and dropped. False only when shutdown came first.
async fn dead_letter(
    command: &Command,
    route: &str,
    error: &str,
    messages: u64,
    shared: &Shared,
) -> bool {
    let counter = DownlinkMetrics::route(&shared.metrics.downlink.dead_lettered, route);
    let Some(dlq) = &shared.dead_letters else {
        counter.inc_by(messages);
        dlq_log(route, error, false);
        return true;
    };
    let mut backoff = Backoff::new(shared.retry.0, shared.retry.1);
    loop {
        match dlq.send(command, error, &shared.gateway_id).await {
            Ok(()) => {
                if shared.dead_letters_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("downlink dead-letter topic available again");
                }
                counter.inc_by(messages);
                dlq_log(route, error, true);
                return true;
            }
            Err(e) => {
                if !shared.dead_letters_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "downlink dead-letter topic unavailable; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shared.shutdown.cancelled() => return false,
        }
    }
}

/// At most one line a minute about given-up commands, with how many it stands for.
fn dlq_log(route: &str, error: &str, dead_lettered: bool) {
    static LAST: std::sync::Mutex<Option<(Instant, u64)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let since = match *last {
        Some((at, n)) if at.elapsed() < Duration::from_secs(60) => {
            *last = Some((at, n + 1));
            return;
        }
        Some((_, n)) => n,
        None => 0,
    };
    *last = Some((Instant::now(), 0));
    if dead_lettered {
        tracing::warn!(route, %error, others_since_last = since, "downlink command dead-lettered");
    } else {
        tracing::warn!(route, %error, others_since_last = since,
            "downlink command dropped (no downlink.dead_letter_topic)");
    }
}

/// The downlink's dead-letter producer: acks=all, like the uplink.
struct DeadLetters {
    producer: FutureProducer<DeadLetterEvents>,
    topic: String,
    /// Shared with the producer's [`DeadLetterEvents`].
    refused: Arc<RefusalLatch>,
}

/// The dead-letter producer's client errors: a refusal said once, the rest as librdkafka's.
struct DeadLetterEvents {
    refused: Arc<RefusalLatch>,
}

impl ClientContext for DeadLetterEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        match crate::kafka::refusal(error.rdkafka_error_code()) {
            Some(refusal) => self
                .refused
                .report("downlink dead-letter producer", refusal, reason),
            None => log_client_error("downlink dead-letter producer", &error, reason),
        }
    }
}

/// A librdkafka client error that is no refusal: fatal ones at error level; an unreachable broker
/// is an uplink outage, which the stage reports itself (as a warning, once), so only at debug.
fn log_client_error(client: &str, error: &KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal) => {
            tracing::error!(target: "librdkafka", client, %error, reason, "kafka client failed")
        }
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve,
        ) => tracing::debug!(target: "librdkafka", client, %error, reason, "kafka link error"),
        _ => tracing::warn!(target: "librdkafka", client, %error, reason, "kafka client error"),
    }
}

/// Headers the dead-letter record gets besides the command's own.
pub const ERROR_HEADER: &str = "edgegate-error";

impl DeadLetters {
    async fn new(config: &Arc<Config>, topic: &str) -> Result<DeadLetters, DownlinkError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.kafka.bootstrap_servers)
            .set(
                "client.id",
                format!("edgegate-{}-downlink-dlq", config.gateway.id),
            )
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (key, value) in config.kafka_properties() {
            c.set(key, value);
        }
        let refused = Arc::new(RefusalLatch::default());
        let producer = c
            .create_with_context(DeadLetterEvents {
                refused: refused.clone(),
            })
            .map_err(|e| DownlinkError::Client {
                what: "dead-letter producer",
                message: e.to_string(),
            })?;
        if config.kafka.create_topic {
            let (config, name) = (config.clone(), topic.to_owned());
            // Best effort: an unreachable Kafka now is retried by every send.
            let _ = tokio::task::spawn_blocking(move || {
                crate::kafka::create_topic(&config, &name, Duration::from_secs(5))
            })
            .await;
        }
        Ok(DeadLetters {
            producer,
            topic: topic.to_owned(),
            refused,
        })
    }

    async fn send(&self, command: &Command, error: &str, gateway_id: &str) -> Result<(), String> {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &command.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let origin = format!("{}/{}/{}", command.topic, command.partition, command.offset);
        for (key, value) in [
            (ERROR_HEADER, error),
            (GATEWAY_HEADER, gateway_id),
            ("edgegate-origin", origin.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(&command.value)
            .headers(headers);
        if let Some(key) = &command.key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| self.refused.clear())
            .map_err(|(e, _)| e.to_string())
    }
}
