//! The gateway's one TOML configuration file, Vector-style named tables.
//!
//! Every key is documented in `config/edgegate.toml`. Parsing is strict (`deny_unknown_fields`) and
//! every error names the file, the key path and, where it can be found, the line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::sources::framing::Framing;

/// Why a configuration could not be used. Every variant is fatal: print it and exit with status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read; the operator must fix the path or its permissions.
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown, missing or of the wrong type.
    #[error("{path}:{}: {key}: {message}", line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Invalid {
        path: PathBuf,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    pub kafka: KafkaConfig,
    /// Parsed in a second step (see [`SourceConfig`]) so that errors keep their full key path.
    #[serde(default, skip_deserializing)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default, rename = "sources")]
    raw_sources: BTreeMap<String, toml::Table>,
    /// ThingsBoard-style uplink decoders, named by sources with `converter = "<name>"`.
    #[serde(default)]
    pub converters: BTreeMap<String, ConverterConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Commands from Kafka to the devices; absent: no downlink.
    #[serde(default)]
    pub downlink: Option<DownlinkConfig>,
    /// The file as written, which a reload compares with the new one.
    #[serde(skip)]
    pub document: Document,
}

/// A configuration file as written: parsed TOML for reloads to compare, its text to name the
/// line of a key found invalid after parsing. Never printed: it holds the secrets written there.
#[derive(Default)]
pub struct Document {
    pub table: toml::Table,
    text: String,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Document { .. }")
    }
}

/// What a converter script is: an uplink decoder (records to Kafka) or a downlink encoder
/// (Kafka commands to devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConverterKind {
    /// The body of `function Decoder(payload, metadata)`.
    #[default]
    Decoder,
    /// The body of `function Encoder(msg, metadata, msgType, integrationMetadata)`.
    Encoder,
}

/// `[downlink]`: consumes command topics, encodes each record and delivers the result to a
/// device through a source's connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    pub topics: Vec<String>,
    /// The consumer group; `gateway.id` when absent.
    #[serde(default)]
    pub group_id: Option<String>,
    /// An encoder (`type = "encoder"`); without one the record's value is sent as is.
    #[serde(default)]
    pub converter: Option<String>,
    /// A command not delivered this long after its first attempt is dead-lettered and committed.
    #[serde(default = "default_downlink_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Undeliverable commands go here with an `edgegate-error` header; without it they are
    /// counted and dropped.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Where a new consumer group starts: `"earliest"` (commands waiting from before the
    /// gateway's first start are delivered) or `"latest"`. Committed offsets always win.
    #[serde(default)]
    pub start_from: StartFrom,
    /// How long a fetch waits at the broker for new commands (librdkafka's `fetch.wait.max.ms`).
    /// Kafka answers as soon as a command arrives, so this sets the idle request rate, not the
    /// latency; a broker that answers only when the wait is over (Tansu 0.6) adds up to this much.
    #[serde(default = "default_fetch_wait", with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// `msgType` for records without a `msgType` header.
    #[serde(default = "default_msg_type")]
    pub msg_type: String,
    /// Lets a downlink topic equal an uplink or dead-letter topic (loops are then possible).
    #[serde(default)]
    pub allow_loop: bool,
    /// Commands consumed and not yet delivered; when reached, consuming pauses.
    #[serde(default = "default_downlink_max_in_flight")]
    pub max_in_flight: usize,
    /// First and longest wait before an undeliverable command is tried again.
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// First match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

impl StartFrom {
    /// librdkafka's `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// `[[downlink.routes]]`: where an encoded message goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Conditions on the encoder output's metadata: every key must be present with this value.
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// The MQTT or serial source to deliver through.
    pub source: String,
    /// MQTT only: the topic, with `${key}` filled from the metadata.
    #[serde(default)]
    pub topic: Option<String>,
    /// MQTT only.
    #[serde(default = "default_qos")]
    pub qos: u8,
}

/// Bytes of commands the downlink holds between consuming and delivery before consuming pauses
/// (besides `downlink.max_in_flight` commands); a larger command is still taken alone.
pub const DOWNLINK_IN_FLIGHT_BYTES: usize = 4 * 1024 * 1024;

fn default_fetch_wait() -> Duration {
    Duration::from_millis(500)
}
fn default_downlink_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_msg_type() -> String {
    "RPC_CALL_FROM_SERVER_TO_DEVICE".into()
}
fn default_downlink_max_in_flight() -> usize {
    1000
}
fn default_retry_min() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

/// Which conversions a converter records as ThingsBoard-style debug events
/// (`converters.<name>.debug`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DebugMode {
    #[default]
    Off,
    /// Only records that failed.
    Failures,
    /// Every record for the first 15 minutes after start, then failures only.
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConverterConfig {
    /// `"decoder"` (the default) or `"encoder"`.
    #[serde(default, rename = "type")]
    pub kind: ConverterKind,
    /// The decoder: the body of `function Decoder(payload, metadata)`; relative paths are
    /// resolved against the configuration file's directory.
    pub script: PathBuf,
    /// A script running longer than this on one record is interrupted.
    #[serde(default = "default_converter_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// After a timeout the converter pauses this long and tries the record again (a busy machine
    /// times scripts out too); the third timeout of the same record gives it up.
    #[serde(default = "default_timeout_retry_delay", with = "humantime_serde")]
    pub timeout_retry_delay: Duration,
    /// Heap limit of the script's JavaScript runtime.
    #[serde(default = "default_converter_memory")]
    pub memory_limit: ByteSize,
    #[serde(default)]
    pub debug: DebugMode,
    /// Size at which the debug file is rotated (one previous file is kept).
    #[serde(default = "default_debug_max_bytes")]
    pub debug_max_bytes: ByteSize,
    /// Extra `metadata` entries the script sees.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl ConverterConfig {
    /// Default settings for a script given on the command line.
    pub fn for_script(script: PathBuf) -> ConverterConfig {
        ConverterConfig {
            kind: ConverterKind::Decoder,
            script,
            timeout: default_converter_timeout(),
            timeout_retry_delay: default_timeout_retry_delay(),
            memory_limit: default_converter_memory(),
            debug: DebugMode::Off,
            debug_max_bytes: default_debug_max_bytes(),
            metadata: BTreeMap::new(),
        }
    }
}

fn default_converter_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_timeout_retry_delay() -> Duration {
    Duration::from_secs(15)
}
fn default_converter_memory() -> ByteSize {
    ByteSize::mib(16)
}
fn default_debug_max_bytes() -> ByteSize {
    ByteSize::mib(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    pub listen: std::net::SocketAddr,
    /// /healthz fails while a buffer commit or a conversion has run longer than this.
    #[serde(default = "default_stalled_after", with = "humantime_serde")]
    pub stalled_after: Duration,
    /// Credentials every request except /healthz and /readyz must carry; absent: none asked.
    #[serde(default)]
    pub auth: Option<AdminAuthConfig>,
    /// Serve HTTPS instead of HTTP.
    #[serde(default)]
    pub tls: Option<AdminTlsConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAuthKind {
    /// `Authorization: Bearer <token>`: scripts, monitoring, the command line.
    Bearer,
    /// User name and password: what a browser asks for, so the status page can use it.
    Basic,
}

/// `[admin.auth]`: the secret comes from the environment, never from the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminAuthConfig {
    #[serde(rename = "type")]
    pub kind: AdminAuthKind,
    /// Bearer: the environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Basic: the user name…
    #[serde(default)]
    pub username: Option<String>,
    /// …and the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
}

/// What a request to the admin endpoint must carry.
#[derive(Debug, Clone)]
pub enum AdminCredentials {
    Bearer(Secret),
    Basic { username: String, password: Secret },
}

impl AdminAuthConfig {
    /// The credentials, read from the environment; `Err` is (key, message).
    pub fn credentials(&self) -> Result<AdminCredentials, (String, String)> {
        let secret = |key: &str, var: &Option<String>| {
            let key = format!("admin.auth.{key}");
            let var = var
                .as_deref()
                .ok_or_else(|| (key.clone(), "missing".to_owned()))?;
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err((key, format!("environment variable {var} is empty"))),
                Err(_) => Err((key, format!("environment variable {var} is not set"))),
            }
        };
        match self.kind {
            AdminAuthKind::Bearer => {
                if self.username.is_some() || self.password_env.is_some() {
                    return Err((
                        "admin.auth.username".into(),
                        "bearer authentication takes token_env only".into(),
                    ));
                }
                Ok(AdminCredentials::Bearer(secret(
                    "token_env",
                    &self.token_env,
                )?))
            }
            AdminAuthKind::Basic => {
                if self.token_env.is_some() {
                    return Err((
                        "admin.auth.token_env".into(),
                        "basic authentication takes username and password_env".into(),
                    ));
                }
                let username = match &self.username {
                    Some(u) if !u.is_empty() && !u.contains(':') => u.clone(),
                    _ => {
                        return Err((
                            "admin.auth.username".into(),
                            "needs a non-empty user name without ':'".into(),
                        ))
                    }
                };
                let password = secret("password_env", &self.password_env)?;
                Ok(AdminCredentials::Basic { username, password })
            }
        }
    }
}

/// `[admin.tls]`: relative paths are resolved against the configuration file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsConfig {
    /// PEM certificate (chain) the endpoint presents.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// For `edgegate status`, `top` and `reload` only: the CA that signed `cert`. Without it
    /// they trust exactly `cert`, read from the same file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl AdminConfig {
    /// What `check` warns about: an endpoint others can reach without credentials, or whose
    /// credentials cross the network in clear text.
    pub fn warnings(&self) -> Vec<String> {
        let ip = self.listen.ip();
        if ip.is_loopback() {
            return Vec::new();
        }
        let listen = self.listen;
        match (&self.auth, &self.tls) {
            (None, _) => vec![format!(
                "admin.listen = \"{listen}\" is reachable beyond this machine without authentication: \
                 anyone who reaches it can read the status and metrics and reload the configuration; \
                 add [admin.auth] (README: \"Admin endpoint security\")"
            )],
            (Some(_), None) => vec![format!(
                "admin.listen = \"{listen}\" serves plain HTTP beyond this machine: the admin.auth \
                 credentials cross the network in clear text; add [admin.tls]"
            )],
            (Some(_), Some(_)) => Vec::new(),
        }
    }
}

fn default_stalled_after() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Identifies this gateway in every Kafka record (`edgegate-gateway` header).
    pub id: String,
    /// Where the durable buffer lives.
    pub data_dir: PathBuf,
    /// What the configured memory bounds may add up to ([`Config::memory_bounds`]); `check`
    /// refuses a configuration above it. Matches the unit's `MemoryMax` by default.
    #[serde(default = "default_memory_budget")]
    pub memory_budget: ByteSize,
}

fn default_memory_budget() -> ByteSize {
    ByteSize::mib(192)
}

/// What the process needs besides its configured bounds: code, the async runtime, librdkafka's
/// threads and sled's IO buffers (measured idle RSS of a release build: 12 MB; a 1M-record
/// drain peaks near 55 MB).
const FIXED_MEMORY: u64 = 40 * 1024 * 1024;
/// An MQTT source's read-ahead (`sources::mqtt`) besides what rumqttc holds.
const MQTT_READ_AHEAD: u64 = 1024 * 1024;
/// Packets rumqttc decodes in one read of its socket (its `max_readb_count`).
const RUMQTTC_READ_BATCH: u64 = 10;
/// The forwarder's read batch (`buffer`), held with its converted copy.
const READ_BATCH: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Stop accepting (and acknowledging) records until the forwarder frees space.
    Block,
    /// Evict the oldest records not yet handed to Kafka, and count them.
    DropOldest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// sled's page cache; small boards want it small.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: ByteSize,
    /// A small commit waits this long for more records, so a trickle shares one flush.
    #[serde(default = "default_commit_linger", with = "humantime_serde")]
    pub commit_linger: Duration,
    /// How long a small commit of serial frames only waits in all. No device waits for their
    /// durability (serial has no acks), so they can share flushes longer than MQTT messages.
    #[serde(default = "default_serial_commit_linger", with = "humantime_serde")]
    pub serial_commit_linger: Duration,
    /// Bytes of records submitted and not yet durable, across every source; sources wait while
    /// it is taken (MQTT stops reading, serial reads pause).
    #[serde(default = "default_intake_max_bytes")]
    pub intake_max_bytes: ByteSize,
    /// Free space the buffer leaves on data_dir's filesystem: below it the buffer stops growing and
    /// `when_full` applies, so a full disk is met as a full buffer and not as a failed write.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: default_max_bytes(),
            when_full: default_when_full(),
            max_age: None,
            cache_bytes: default_cache_bytes(),
            commit_linger: default_commit_linger(),
            serial_commit_linger: default_serial_commit_linger(),
            intake_max_bytes: default_intake_max_bytes(),
            min_free_disk: default_min_free_disk(),
        }
    }
}

fn default_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_when_full() -> WhenFull {
    WhenFull::Block
}
fn default_commit_linger() -> Duration {
    Duration::from_millis(10)
}
fn default_serial_commit_linger() -> Duration {
    Duration::from_millis(50)
}
fn default_intake_max_bytes() -> ByteSize {
    ByteSize::mib(16)
}
fn default_min_free_disk() -> ByteSize {
    ByteSize::mib(64)
}
fn default_cache_bytes() -> ByteSize {
    ByteSize::mib(8)
}

/// A librdkafka property value; TOML users write numbers and booleans unquoted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    String(String),
    Integer(i64),
    Bool(bool),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::String(s) => f.write_str(s),
            PropertyValue::Integer(i) => write!(f, "{i}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    #[serde(default = "yes")]
    pub create_topic: bool,
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    #[serde(default = "default_replication")]
    pub topic_replication_factor: i32,
    /// Records handed to librdkafka and not yet confirmed; the rest waits in the disk buffer.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Memory handed to librdkafka and not yet confirmed (record bytes plus a per-record cost).
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: ByteSize,
    /// No delivery confirmation for this long while records are in flight marks the link down.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// How long shutdown waits for in-flight deliveries.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The largest Kafka record produced (key, value and headers), and the producer's
    /// `message.max.bytes`; lowered to the topic's `max.message.bytes` when the broker reports
    /// less. Sources must not accept payloads that cannot fit ([`KafkaConfig::max_payload_bytes`]).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: ByteSize,
    /// Records the converter cannot convert go here (raw payload, error in a header); without it
    /// they are counted and dropped.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Passed to librdkafka unchanged (after edgegate's own defaults, so they can override them).
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
    /// librdkafka property -> name of the environment variable holding its value (secrets).
    #[serde(default)]
    pub properties_env: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}
/// Kafka's own default (`message.max.bytes` 1048588 less the 12 bytes of batch framing).
fn default_max_record_bytes() -> ByteSize {
    ByteSize::mib(1)
}

/// Room for what edgegate adds to a payload in Kafka: key (the MQTT topic), headers (gateway, seq,
/// source, topic or port) and librdkafka's framing, with a topic of up to ~7 KiB.
pub const RECORD_OVERHEAD: u64 = 16 * 1024;

impl KafkaConfig {
    /// The largest payload a source may accept so that its record fits `max_record_bytes`; the
    /// MQTT and serial limits are checked against it, and a source refuses (and counts) more.
    pub fn max_payload_bytes(&self) -> u64 {
        self.max_record_bytes
            .as_u64()
            .saturating_sub(RECORD_OVERHEAD)
    }
}
fn default_partitions() -> i32 {
    1
}
fn default_replication() -> i32 {
    1
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_max_in_flight_bytes() -> ByteSize {
    ByteSize::mib(4)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as "info" or "edgegate=debug"; `RUST_LOG` wins when set.
    #[serde(default)]
    pub level: Option<String>,
}

/// A value that must never reach a log line.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Mqtt(MqttSourceConfig),
    Serial(SerialSourceConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Mqtt(_) => "mqtt",
            SourceConfig::Serial(_) => "serial",
        }
    }

    /// The converter this source's records go through, if any.
    pub fn converter(&self) -> Option<&str> {
        match self {
            SourceConfig::Mqtt(m) => m.converter.as_deref(),
            SourceConfig::Serial(s) => s.converter.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TopicFilter {
    Plain(String),
    WithQos { filter: String, qos: Option<u8> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Stable across restarts so the broker keeps the session; defaults to `edgegate-<id>-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    pub topics: Vec<TopicFilter>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Environment variable holding the password; keeps it out of the file.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest accepted payload; a larger message is acknowledged, counted and dropped.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: ByteSize,
    /// Messages received but not yet durable; when reached the source stops reading (back-pressure).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Name of a `[converters.<name>]` table; without it the raw payload is forwarded.
    #[serde(default)]
    pub converter: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSourceConfig {
    /// The device, e.g. /dev/ttyUSB0 or a stable /dev/serial/by-id/… symlink.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How the byte stream is cut into records; `"line"` by default.
    #[serde(default = "default_framing")]
    pub framing: Framing,
    /// Longer frames are discarded and counted; the reader resynchronises at the next boundary.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: ByteSize,
    /// Name of a `[converters.<name>]` table; without it the raw frame is forwarded.
    #[serde(default)]
    pub converter: Option<String>,
    /// Static identity for devices whose frames carry none (metadata deviceName/deviceType).
    #[serde(default)]
    pub device_name: Option<String>,
    #[serde(default)]
    pub device_type: Option<String>,
    /// Frames read but not yet durable; when reached, reading stops (the UART carries the rest).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl SerialSourceConfig {
    /// Bits on the wire per character: start, data, parity, stop.
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_framing() -> Framing {
    Framing::Line
}
fn default_max_frame() -> ByteSize {
    ByteSize::kib(64)
}

fn validate_serial(
    s: &SerialSourceConfig,
    prefix: &str,
    buffer: &BufferConfig,
) -> Result<(), (String, String)> {
    let key = |k: &str| format!("{prefix}.{k}");
    if s.path.as_os_str().is_empty() {
        return Err((key("path"), "must not be empty".into()));
    }
    if s.baud_rate == 0 {
        return Err((key("baud_rate"), "must be above 0".into()));
    }
    if !(5..=8).contains(&s.data_bits) {
        return Err((key("data_bits"), "must be 5, 6, 7 or 8".into()));
    }
    if !(1..=2).contains(&s.stop_bits) {
        return Err((key("stop_bits"), "must be 1 or 2".into()));
    }
    if s.max_pending == 0 {
        return Err((key("max_pending"), "must be at least 1".into()));
    }
    let max = s.max_frame_bytes.as_u64();
    if max == 0 || max * 4 > buffer.max_bytes.as_u64() {
        return Err((
            key("max_frame_bytes"),
            "must be above 0 and at most a quarter of buffer.max_bytes".into(),
        ));
    }
    s.framing
        .validate(max as usize)
        .map_err(|m| (key("framing"), m))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_payload() -> ByteSize {
    // Fits the default kafka.max_record_bytes (1 MiB) with RECORD_OVERHEAD to spare.
    ByteSize::kib(1000)
}
fn default_max_pending() -> usize {
    1000
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

impl MqttSourceConfig {
    /// The password from the file or from `password_env`; `Err` names the missing variable.
    pub fn resolve_password(&self) -> Result<Option<Secret>, String> {
        match (&self.password, &self.password_env) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(var)) => std::env::var(var)
                .map(|v| Some(Secret(v)))
                .map_err(|_| format!("environment variable {var} is not set")),
            (None, None) => Ok(None),
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// The line of `key` in the file this configuration came from, when it is written there.
    pub fn line_of_key(&self, key: &str) -> Option<usize> {
        locate_key(&self.document.text, key)
    }

    /// Parses configuration text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            line: locate_key(text, &key),
            path: path.to_owned(),
            key,
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                key: line
                    .and_then(|l| key_on_line(text, l))
                    .unwrap_or_else(|| "(syntax)".into()),
                line,
                message: e.message().trim().to_owned(),
            }
        })?;
        let mut config: Config = deserialize_at(toml::Value::Table(table.clone()), "")
            .map_err(|(k, m)| invalid(k, m))?;
        config.document = Document {
            table,
            text: text.to_owned(),
        };
        for (name, raw) in std::mem::take(&mut config.raw_sources) {
            let prefix = format!("sources.{name}");
            let source = parse_source(raw, &prefix).map_err(|(k, m)| invalid(k, m))?;
            config.sources.insert(name, source);
        }
        let base = path.parent().unwrap_or(Path::new(""));
        for converter in config.converters.values_mut() {
            if converter.script.is_relative() {
                converter.script = base.join(&converter.script);
            }
        }
        if let Some(tls) = config.admin.as_mut().and_then(|a| a.tls.as_mut()) {
            tls.resolve_against(base);
        }
        config.validate().map_err(|(k, m)| invalid(k, m))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if self.gateway.id.trim().is_empty() {
            return err("gateway.id", "must not be empty");
        }
        if self.kafka.topic.trim().is_empty() {
            return err("kafka.topic", "must not be empty");
        }
        if self.kafka.max_in_flight == 0 {
            return err("kafka.max_in_flight", "must be at least 1");
        }
        if let Some(level) = &self.log.level {
            if level
                .parse::<tracing_subscriber::filter::Targets>()
                .is_err()
            {
                return err(
                    "log.level",
                    "expected a level or target=level list, e.g. \"info\" or \"edgegate=debug,librdkafka=warn\"",
                );
            }
        }
        let record = self.kafka.max_record_bytes.as_u64();
        if !(2 * RECORD_OVERHEAD..=1_000_000_000).contains(&record) {
            return err(
                "kafka.max_record_bytes",
                "must be between 32KiB and 1000000000 (librdkafka's largest message.max.bytes)",
            );
        }
        if self.buffer.max_bytes.as_u64() < ByteSize::mib(1).as_u64() {
            return err("buffer.max_bytes", "must be at least 1MiB");
        }
        let intake = self.buffer.intake_max_bytes.as_u64();
        if !(ByteSize::kib(64).as_u64()..=ByteSize::gib(1).as_u64()).contains(&intake) {
            return err("buffer.intake_max_bytes", "must be between 64KiB and 1GiB");
        }
        for (var_key, var) in &self.kafka.properties_env {
            if std::env::var(var).is_err() {
                return Err((
                    format!("kafka.properties_env.{var_key}"),
                    format!("environment variable {var} is not set"),
                ));
            }
        }
        if self
            .kafka
            .dead_letter_topic
            .as_ref()
            .is_some_and(|t| t.trim().is_empty() || *t == self.kafka.topic)
        {
            return err(
                "kafka.dead_letter_topic",
                "must be a non-empty topic other than kafka.topic",
            );
        }
        for (name, c) in &self.converters {
            if c.timeout.is_zero() {
                return Err((
                    format!("converters.{name}.timeout"),
                    "must be above 0".into(),
                ));
            }
            if c.memory_limit.as_u64() < ByteSize::mib(1).as_u64() {
                return Err((
                    format!("converters.{name}.memory_limit"),
                    "must be at least 1MiB".into(),
                ));
            }
        }
        self.check_memory_budget()?;
        for (name, source) in &self.sources {
            let prefix = format!("sources.{name}");
            match source {
                SourceConfig::Mqtt(m) => validate_mqtt(m, &prefix, &self.buffer)?,
                SourceConfig::Serial(s) => validate_serial(s, &prefix, &self.buffer)?,
            }
            self.check_fits_kafka(source, &prefix)?;
            if let Some(c) = source.converter() {
                match self.converters.get(c) {
                    None => {
                        return Err((
                            format!("sources.{name}.converter"),
                            format!("no [converters.{c}] table"),
                        ))
                    }
                    Some(conv) if conv.kind != ConverterKind::Decoder => {
                        return Err((
                            format!("sources.{name}.converter"),
                            format!("[converters.{c}] is an encoder; a source needs a decoder"),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(d) = &self.downlink {
            self.validate_downlink(d)?;
        }
        if let Some(admin) = &self.admin {
            validate_admin(admin)?;
        }
        Ok(())
    }

    fn validate_downlink(&self, d: &DownlinkConfig) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((format!("downlink.{k}"), m));
        if d.topics.is_empty() || d.topics.iter().any(|t| t.trim().is_empty()) {
            return err("topics", "needs at least one non-empty topic".into());
        }
        if d.group_id.as_ref().is_some_and(|g| g.trim().is_empty()) {
            return err("group_id", "must not be empty".into());
        }
        if let Some(c) = &d.converter {
            match self.converters.get(c) {
                None => return err("converter", format!("no [converters.{c}] table")),
                Some(conv) if conv.kind != ConverterKind::Encoder => {
                    return err(
                        "converter",
                        format!("[converters.{c}] is a decoder; set type = \"encoder\" in it"),
                    )
                }
                Some(_) => {}
            }
        }
        if d.max_age.is_zero() {
            return err("max_age", "must be above 0".into());
        }
        if d.max_in_flight == 0 {
            return err("max_in_flight", "must be at least 1".into());
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(300)).contains(&d.fetch_wait) {
            return err("fetch_wait", "must be between 1ms and 300s".into());
        }
        if d.retry_min.is_zero() || d.retry_max < d.retry_min {
            return err(
                "retry_min",
                "must be above 0 and at most downlink.retry_max".into(),
            );
        }
        if let Some(dlq) = &d.dead_letter_topic {
            if dlq.trim().is_empty() || d.topics.contains(dlq) {
                return err(
                    "dead_letter_topic",
                    "must be a non-empty topic that the downlink does not consume".into(),
                );
            }
        }
        if !d.allow_loop {
            let uplink = [
                Some(&self.kafka.topic),
                self.kafka.dead_letter_topic.as_ref(),
            ];
            if let Some((i, t)) = d
                .topics
                .iter()
                .enumerate()
                .find(|(_, t)| uplink.contains(&Some(*t)))
            {
                return err(
                    &format!("topics[{i}]"),
                    format!(
                        "{t:?} is also an uplink topic (kafka.topic or kafka.dead_letter_topic): \
                         the gateway would consume its own records; set downlink.allow_loop = true \
                         if that is intended"
                    ),
                );
            }
        }
        if d.routes.is_empty() {
            return err(
                "routes",
                "needs at least one [[downlink.routes]] table".into(),
            );
        }
        for (i, r) in d.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            match self.sources.get(&r.source) {
                None => return err(&key("source"), format!("no [sources.{}] table", r.source)),
                Some(SourceConfig::Mqtt(_)) => {
                    let Some(topic) = &r.topic else {
                        return err(&key("topic"), "an MQTT route needs a topic".into());
                    };
                    crate::downlink::Template::parse(topic)
                        .map_err(|m| (format!("downlink.{}", key("topic")), m))?;
                    if r.qos > 2 {
                        return err(&key("qos"), "must be 0, 1 or 2".into());
                    }
                }
                Some(SourceConfig::Serial(_)) => {
                    if r.topic.is_some() {
                        return err(&key("topic"), "a serial route has no topic".into());
                    }
                }
            }
        }
        Ok(())
    }

    /// The memory each configured bound allows, by the key that sets it, largest first: what
    /// `check` adds up against `gateway.memory_budget`. It counts bounded queues and caches, not
    /// allocator fragmentation (README: a burst of 2 MiB messages measured above it).
    pub fn memory_bounds(&self) -> Vec<(String, u64)> {
        let mut bounds = vec![
            ("fixed".to_owned(), FIXED_MEMORY),
            (
                "buffer.cache_bytes".to_owned(),
                self.buffer.cache_bytes.as_u64(),
            ),
            // Records waiting for a commit, and the commit's encoded copy of them.
            (
                "buffer.intake_max_bytes".to_owned(),
                2 * self.buffer.intake_max_bytes.as_u64(),
            ),
            (
                "kafka.max_in_flight_bytes".to_owned(),
                self.kafka.max_in_flight_bytes.as_u64(),
            ),
        ];
        let mut largest_record = 0;
        for (name, source) in &self.sources {
            let (key, bytes) = match source {
                SourceConfig::Mqtt(m) => {
                    let packet = m.max_payload_bytes.as_u64() + 64 * 1024;
                    largest_record = largest_record.max(m.max_payload_bytes.as_u64());
                    (
                        "max_payload_bytes",
                        MQTT_READ_AHEAD + RUMQTTC_READ_BATCH * packet,
                    )
                }
                SourceConfig::Serial(s) => {
                    largest_record = largest_record.max(s.max_frame_bytes.as_u64());
                    // The partial frame and one complete frame waiting for room.
                    ("max_frame_bytes", 2 * s.max_frame_bytes.as_u64() + 4096)
                }
            };
            bounds.push((format!("sources.{name}.{key}"), bytes));
        }
        if self.downlink.is_some() {
            // Commands between consuming and delivery, librdkafka's read-ahead queue, a fetch.
            bounds.push((
                "downlink".to_owned(),
                DOWNLINK_IN_FLIGHT_BYTES as u64 + 2 * 1024 * 1024,
            ));
        }
        bounds.push((
            "forwarder read batch".to_owned(),
            2 * READ_BATCH.max(largest_record),
        ));
        for (name, c) in &self.converters {
            bounds.push((
                format!("converters.{name}.memory_limit"),
                c.memory_limit.as_u64(),
            ));
        }
        bounds.sort_by_key(|b| std::cmp::Reverse(b.1));
        bounds
    }

    fn check_memory_budget(&self) -> Result<(), (String, String)> {
        let bounds = self.memory_bounds();
        let total: u64 = bounds.iter().map(|(_, b)| b).sum();
        let budget = self.gateway.memory_budget.as_u64();
        if total <= budget {
            return Ok(());
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let largest: Vec<String> = bounds
            .iter()
            .take(3)
            .map(|(k, b)| format!("{k} {:.1} MiB", mib(*b)))
            .collect();
        Err((
            "gateway.memory_budget".into(),
            format!(
                "the configured bounds add up to {:.1} MiB, above the budget of {:.1} MiB \
                 (largest: {}); lower them, or raise memory_budget with the unit's MemoryMax",
                mib(total),
                mib(budget),
                largest.join(", ")
            ),
        ))
    }

    /// A payload a source accepts must fit one Kafka record: one it acknowledged and Kafka then
    /// refused would be lost.
    fn check_fits_kafka(
        &self,
        source: &SourceConfig,
        prefix: &str,
    ) -> Result<(), (String, String)> {
        let (key, max) = match source {
            SourceConfig::Mqtt(m) => ("max_payload_bytes", m.max_payload_bytes),
            SourceConfig::Serial(s) => ("max_frame_bytes", s.max_frame_bytes),
        };
        let fits = self.kafka.max_payload_bytes();
        if max.as_u64() > fits {
            return Err((
                format!("{prefix}.{key}"),
                format!(
                    "must be at most kafka.max_record_bytes less {RECORD_OVERHEAD} bytes for key and headers ({fits}); raise kafka.max_record_bytes (and the topic's max.message.bytes) to accept more"
                ),
            ));
        }
        Ok(())
    }

    /// The MQTT client id for a source: configured, or derived from the gateway id.
    pub fn mqtt_client_id(&self, source_name: &str, m: &MqttSourceConfig) -> String {
        m.client_id
            .clone()
            .unwrap_or_else(|| format!("edgegate-{}-{}", self.gateway.id, source_name))
    }

    /// librdkafka properties after resolving `properties_env`.
    pub fn kafka_properties(&self) -> Vec<(String, String)> {
        let mut props: Vec<(String, String)> = self
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        for (k, var) in &self.kafka.properties_env {
            if let Ok(v) = std::env::var(var) {
                props.push((k.clone(), v));
            }
        }
        props
    }
}

fn validate_mqtt(
    m: &MqttSourceConfig,
    prefix: &str,
    buffer: &BufferConfig,
) -> Result<(), (String, String)> {
    let key = |k: &str| format!("{prefix}.{k}");
    if m.qos > 2 {
        return Err((key("qos"), "must be 0, 1 or 2".into()));
    }
    if m.topics.is_empty() {
        return Err((key("topics"), "needs at least one topic filter".into()));
    }
    for (i, t) in m.topics.iter().enumerate() {
        let (filter, qos) = match t {
            TopicFilter::Plain(f) => (f, None),
            TopicFilter::WithQos { filter, qos } => (filter, *qos),
        };
        if filter.is_empty() || !rumqttc::valid_filter(filter) {
            return Err((
                key(&format!("topics[{i}]")),
                format!("invalid filter {filter:?}"),
            ));
        }
        if qos.is_some_and(|q| q > 2) {
            return Err((key(&format!("topics[{i}].qos")), "must be 0, 1 or 2".into()));
        }
    }
    if m.max_pending == 0 {
        return Err((key("max_pending"), "must be at least 1".into()));
    }
    if m.max_payload_bytes.as_u64() * 4 > buffer.max_bytes.as_u64() {
        return Err((
            key("max_payload_bytes"),
            "must be at most a quarter of buffer.max_bytes".into(),
        ));
    }
    if m.password.is_some() && m.password_env.is_some() {
        return Err((
            key("password_env"),
            "set password or password_env, not both".into(),
        ));
    }
    m.resolve_password().map_err(|e| (key("password_env"), e))?;
    if (m.password.is_some() || m.password_env.is_some()) && m.username.is_none() {
        return Err((key("username"), "a password needs a username".into()));
    }
    if let Some(tls) = &m.tls {
        let files = [
            ("tls.ca_file", Some(&tls.ca_file)),
            ("tls.client_cert_file", tls.client_cert_file.as_ref()),
            ("tls.client_key_file", tls.client_key_file.as_ref()),
        ];
        for (k, f) in files {
            if let Some(f) = f {
                // Read, not just looked up: the source reads them at every connect, and an
                // unreadable file (a directory, a root-only key) must fail here, not at start.
                std::fs::read(f)
                    .map_err(|e| (key(k), format!("cannot read {}: {e}", f.display())))?;
            }
        }
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            return Err((
                key("tls.client_key_file"),
                "client_cert_file and client_key_file go together".into(),
            ));
        }
    }
    Ok(())
}

fn validate_admin(admin: &AdminConfig) -> Result<(), (String, String)> {
    if let Some(auth) = &admin.auth {
        auth.credentials()?;
    }
    if let Some(tls) = &admin.tls {
        crate::admin::tls::server_config(tls)?;
        if let Some(ca) = &tls.ca_file {
            crate::admin::tls::read_certificates(ca)
                .map_err(|m| ("admin.tls.ca_file".to_owned(), m))?;
        }
    }
    Ok(())
}

impl AdminTlsConfig {
    fn resolve_against(&mut self, base: &Path) {
        for path in [&mut self.cert, &mut self.key] {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if let Some(ca) = self.ca_file.as_mut().filter(|c| c.is_relative()) {
            *ca = base.join(&*ca);
        }
    }
}

/// Only the `[admin]` table of a configuration file: what `status` and `top` need, without the
/// rest's checks (a technician's shell may lack the Kafka secrets). `Ok(None)` without one.
pub fn load_admin(path: &Path) -> Result<Option<AdminConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |key: String, message: String| ConfigError::Invalid {
        line: locate_key(&text, &key),
        path: path.to_owned(),
        key,
        message,
    };
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| invalid("(syntax)".into(), e.message().trim().to_owned()))?;
    let Some(admin) = table.remove("admin") else {
        return Ok(None);
    };
    let mut admin: AdminConfig = deserialize_at(admin, "admin").map_err(|(k, m)| invalid(k, m))?;
    if let Some(tls) = admin.tls.as_mut() {
        tls.resolve_against(path.parent().unwrap_or(Path::new("")));
    }
    Ok(Some(admin))
}

fn parse_source(raw: toml::Table, prefix: &str) -> Result<SourceConfig, (String, String)> {
    let mut raw = raw;
    let kind = match raw.remove("type") {
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err((format!("{prefix}.type"), "must be a string".into())),
        None => {
            return Err((
                format!("{prefix}.type"),
                "missing (one of: mqtt, serial)".into(),
            ))
        }
    };
    match kind.as_str() {
        "mqtt" => deserialize_at(toml::Value::Table(raw), prefix).map(SourceConfig::Mqtt),
        "serial" => {
            // `framing = "idle"` is shorthand for `framing = { mode = "idle" }`.
            if let Some(toml::Value::String(mode)) = raw.get("framing").cloned() {
                let mut table = toml::Table::new();
                table.insert("mode".into(), toml::Value::String(mode));
                raw.insert("framing".into(), toml::Value::Table(table));
            }
            deserialize_at(toml::Value::Table(raw), prefix).map(SourceConfig::Serial)
        }
        other => Err((
            format!("{prefix}.type"),
            format!("unknown source type {other:?} (one of: mqtt, serial)"),
        )),
    }
}

/// Deserializes `value`, reporting errors as (full key path, message).
fn deserialize_at<T: DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let text = e.inner().to_string();
        // toml repeats the path on a second line ("in `framing.mode`"); the key names it already.
        let inner = text
            .split("\nin `")
            .next()
            .unwrap_or(&text)
            .trim()
            .to_owned();
        let mut key = e.path().to_string();
        // For an unknown field the path names the table; name the offending key itself.
        if let Some(field) = unknown_field_name(&inner) {
            if key == "." {
                key = field;
            } else if key.rsplit('.').next() != Some(field.as_str()) {
                key = format!("{key}.{field}");
            }
        }
        let key = match (prefix.is_empty(), key.as_str()) {
            (true, _) => key,
            (false, ".") => prefix.to_owned(),
            (false, _) => format!("{prefix}.{key}"),
        };
        (key, inner)
    })
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// The key written on a line (`name = …` or `[table]`), to name it in syntax errors.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?.trim();
    let key = match l.split_once('=') {
        Some((k, _)) => k.trim(),
        None => l.trim_start_matches('[').trim_end_matches(']').trim(),
    };
    // Emptiness is judged on what is shown: a line of quotes alone names no key.
    let key = key.trim_matches('"').trim();
    (!key.is_empty()).then(|| key.to_owned())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of a dotted key path (`sources.plant.qos`, `a.b[2]`) in the TOML text, going as
/// deep as the path exists so a missing key points at its table.
fn locate_key(text: &str, path: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut best = None;
    for segment in path.split('.') {
        let name = segment.split('[').next().unwrap_or(segment);
        let Some(table) = item.as_table_like() else {
            break;
        };
        let Some((key, next)) = table.get_key_value(name) else {
            break;
        };
        if let Some(span) = key.span() {
            best = Some(line_of(text, span.start));
        }
        item = next;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
id = "gw-01"
data_dir = "/tmp/x"

[kafka]
bootstrap_servers = "127.0.0.1:9092"
topic = "t"

[sources.plant]
type = "mqtt"
topics = ["sensors/#", { filter = "cmd/+", qos = 0 }]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const DOWNLINK: &str = r#"
[downlink]
topics = ["cmds"]
converter = "enc"
[[downlink.routes]]
match = { transport = "mqtt" }
source = "plant"
topic = "devices/${deviceName}/rpc"
[converters.enc]
type = "encoder"
script = "enc.js"
[converters.dec]
script = "dec.js"
"#;

    fn downlink_error(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { key, message, .. }) => (key, message),
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn a_downlink_gets_defaults_and_its_routes() {
        let c = parse(&format!("{MINIMAL}{DOWNLINK}")).unwrap();
        let d = c.downlink.unwrap();
        assert_eq!(d.max_age, Duration::from_secs(3600));
        assert_eq!(d.msg_type, "RPC_CALL_FROM_SERVER_TO_DEVICE");
        assert_eq!(d.start_from, StartFrom::Earliest);
        assert_eq!(d.routes[0].qos, 1);
        assert_eq!(d.routes[0].matches["transport"], "mqtt");
        assert_eq!(c.converters["enc"].kind, ConverterKind::Encoder);
        assert_eq!(c.converters["dec"].kind, ConverterKind::Decoder);
    }

    #[test]
    fn a_downlink_loop_is_refused_unless_allowed() {
        let looping = format!("{MINIMAL}{DOWNLINK}")
            .replace("topics = [\"cmds\"]", "topics = [\"cmds\", \"t\"]");
        let (key, message) = downlink_error(&looping);
        assert_eq!(key, "downlink.topics[1]");
        assert!(message.contains("allow_loop"), "{message}");
        let allowed = looping.replace("[downlink]", "[downlink]\nallow_loop = true");
        assert!(parse(&allowed).is_ok());
    }

    #[test]
    fn downlink_mistakes_are_named_by_key() {
        let base = format!("{MINIMAL}{DOWNLINK}");
        let cases = [
            (
                base.replace("converter = \"enc\"", "converter = \"dec\""),
                "downlink.converter",
            ),
            (
                base.replace("converter = \"enc\"", "converter = \"nope\""),
                "downlink.converter",
            ),
            (
                base.replace("source = \"plant\"", "source = \"nope\""),
                "downlink.routes[0].source",
            ),
            (base.replace("/rpc\"", "/${x\""), "downlink.routes[0].topic"),
            (
                base.replace("topic = \"devices/${deviceName}/rpc\"", ""),
                "downlink.routes[0].topic",
            ),
            (
                base.replace("[downlink]", "[downlink]\ndead_letter_topic = \"cmds\""),
                "downlink.dead_letter_topic",
            ),
            (
                base.replace("[downlink]", "[downlink]\nmax_age = \"0s\""),
                "downlink.max_age",
            ),
            (
                base.replace("[downlink]", "[downlink]\nstart_from = \"middle\""),
                "downlink.start_from",
            ),
            (
                MINIMAL.replace(
                    "topics = [\"sensors/#\"",
                    "converter = \"enc\"\ntopics = [\"sensors/#\"",
                ) + DOWNLINK,
                "sources.plant.converter",
            ),
        ];
        for (text, expected) in cases {
            let (key, message) = downlink_error(&text);
            assert_eq!(key, expected, "{message}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.buffer.max_bytes, ByteSize::gib(1));
        assert_eq!(c.buffer.when_full, WhenFull::Block);
        let SourceConfig::Mqtt(m) = &c.sources["plant"] else {
            panic!("not mqtt")
        };
        assert_eq!(m.qos, 1);
        assert_eq!(m.topics.len(), 2);
        assert_eq!(c.mqtt_client_id("plant", m), "edgegate-gw-01-plant");
    }

    #[test]
    fn sizes_and_durations_accept_strings_and_integers() {
        let text = MINIMAL.replace(
            "[kafka]",
            "[buffer]\nmax_bytes = \"64MiB\"\nmax_age = \"7d\"\nwhen_full = \"drop_oldest\"\n[kafka]",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.buffer.max_bytes, ByteSize::mib(64));
        assert_eq!(c.buffer.max_age, Some(Duration::from_secs(7 * 86400)));
        let c = parse(&text.replace("\"64MiB\"", "20000000")).unwrap();
        assert_eq!(c.buffer.max_bytes.as_u64(), 20_000_000);
    }

    fn invalid(text: &str) -> (String, Option<usize>, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                key, line, message, ..
            }) => (key, line, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn unknown_key_in_source_is_named_with_its_line() {
        let (key, line, _) =
            invalid(&MINIMAL.replace("type = \"mqtt\"", "type = \"mqtt\"\nqoss = 1"));
        assert_eq!(key, "sources.plant.qoss");
        assert_eq!(line, Some(12));
    }

    #[test]
    fn wrong_type_is_named_with_its_line() {
        let (key, line, msg) = invalid(&MINIMAL.replace("topic = \"t\"", "topic = 5"));
        assert_eq!(key, "kafka.topic");
        assert_eq!(line, Some(8));
        assert!(msg.contains("string"), "{msg}");
    }

    #[test]
    fn bad_enum_value_and_qos_are_rejected() {
        let (key, _, _) =
            invalid(&MINIMAL.replace("[kafka]", "[buffer]\nwhen_full = \"maybe\"\n[kafka]"));
        assert_eq!(key, "buffer.when_full");
        let (key, _, _) = invalid(&MINIMAL.replace("type = \"mqtt\"", "type = \"mqtt\"\nqos = 3"));
        assert_eq!(key, "sources.plant.qos");
    }

    #[test]
    fn missing_required_key_and_syntax_errors() {
        let (key, _, msg) = invalid(&MINIMAL.replace("topic = \"t\"\n", ""));
        assert_eq!(key, "kafka");
        assert!(msg.contains("topic"), "{msg}");
        let (key, line, _) = invalid("[gateway\nid = 1");
        assert_eq!(key, "gateway");
        assert_eq!(line, Some(1));
        let (key, line, msg) =
            invalid(&MINIMAL.replace("topic = \"t\"", "topic = \"t\"\ntopic = \"u\""));
        assert_eq!((key.as_str(), line), ("topic", Some(9)));
        assert!(msg.contains("duplicate"), "{msg}");
        let (key, _, _) = invalid(&MINIMAL.replace("\"mqtt\"", "\"carrier-pigeon\""));
        assert_eq!(key, "sources.plant.type");
    }

    /// Found by fuzzing (config_check): a syntax error on a line holding only a quote was
    /// reported under an empty key (`test.toml:6: : key with no value`).
    #[test]
    fn a_syntax_error_on_a_line_of_quotes_is_named_as_syntax() {
        let text = "[gateway]\nid = \"gw\"\ndata_dir = \"data\"\n\n[kafka]\n\"\n";
        let (key, line, _) = invalid(text);
        assert_eq!((key.as_str(), line), ("(syntax)", Some(6)));
        let (key, _, _) = invalid("[gateway]\n\" \"\n");
        assert_eq!(key, "(syntax)");
    }

    #[test]
    fn source_limits_must_fit_one_kafka_record() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.kafka.max_record_bytes, ByteSize::mib(1));
        let big = MINIMAL.replace(
            "type = \"mqtt\"",
            "type = \"mqtt\"\nmax_payload_bytes = \"1MiB\"",
        );
        let (key, _, msg) = invalid(&big);
        assert_eq!(key, "sources.plant.max_payload_bytes");
        assert!(msg.contains("kafka.max_record_bytes"), "{msg}");
        let raised = big.replace(
            "topic = \"t\"",
            "topic = \"t\"\nmax_record_bytes = \"2MiB\"",
        );
        assert_eq!(
            parse(&raised).unwrap().kafka.max_payload_bytes(),
            2 * 1024 * 1024 - RECORD_OVERHEAD
        );
    }

    #[test]
    fn secrets_never_print() {
        let text = MINIMAL.replace(
            "type = \"mqtt\"",
            "type = \"mqtt\"\nusername = \"u\"\npassword = \"hunter2\"",
        );
        let c = parse(&text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn admin_auth_settings_are_checked_by_key() {
        let admin = |auth: &str| {
            let text =
                format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9898\"\n[admin.auth]\n{auth}");
            invalid(&text)
        };
        let (key, _, msg) =
            admin("type = \"bearer\"\ntoken_env = \"EDGEGATE_TEST_SURELY_UNSET\"\n");
        assert_eq!(key, "admin.auth.token_env");
        assert!(
            msg.contains("EDGEGATE_TEST_SURELY_UNSET is not set"),
            "{msg}"
        );
        let (key, _, _) = admin("type = \"bearer\"\n");
        assert_eq!(key, "admin.auth.token_env");
        let (key, _, _) = admin("type = \"basic\"\npassword_env = \"PATH\"\n");
        assert_eq!(key, "admin.auth.username");
        let (key, _, _) = admin("type = \"basic\"\nusername = \"a:b\"\npassword_env = \"PATH\"\n");
        assert_eq!(key, "admin.auth.username");
        let (key, _, _) = admin(
            "type = \"basic\"\nusername = \"u\"\npassword_env = \"PATH\"\ntoken_env = \"PATH\"\n",
        );
        assert_eq!(key, "admin.auth.token_env");
        let (key, _, _) = admin("type = \"digest\"\n");
        assert_eq!(key, "admin.auth.type");
        let ok = format!(
            "{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9898\"\n[admin.auth]\ntype = \"basic\"\nusername = \"u\"\npassword_env = \"PATH\"\n"
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn admin_tls_files_must_be_readable_pem_and_paths_are_relative_to_the_file() {
        let text = format!(
            "{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9898\"\n[admin.tls]\ncert = \"no-such.pem\"\nkey = \"k.pem\"\n"
        );
        let (key, _, msg) = invalid(&text);
        assert_eq!(key, "admin.tls.cert");
        assert!(msg.contains("no-such.pem"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgegate.toml");
        std::fs::write(&path, &text).unwrap();
        let admin = load_admin(&path).unwrap().unwrap();
        let tls = admin.tls.unwrap();
        assert_eq!(tls.cert, dir.path().join("no-such.pem"));
        std::fs::write(&path, MINIMAL).unwrap();
        assert!(load_admin(&path).unwrap().is_none());
    }

    #[test]
    fn warnings_name_an_open_or_clear_text_endpoint_beyond_loopback() {
        let admin = |listen: &str, auth: bool, tls: bool| AdminConfig {
            listen: listen.parse().unwrap(),
            stalled_after: Duration::from_secs(30),
            auth: auth.then(|| AdminAuthConfig {
                kind: AdminAuthKind::Bearer,
                token_env: Some("T".into()),
                username: None,
                password_env: None,
            }),
            tls: tls.then(|| AdminTlsConfig {
                cert: "c".into(),
                key: "k".into(),
                ca_file: None,
            }),
        };
        assert!(admin("127.0.0.1:1", false, false).warnings().is_empty());
        assert!(admin("[::1]:1", false, false).warnings().is_empty());
        assert!(admin("0.0.0.0:1", false, false).warnings()[0].contains("without authentication"));
        assert!(admin("192.0.2.1:1", true, false).warnings()[0].contains("clear text"));
        assert!(admin("[::]:1", true, true).warnings().is_empty());
    }

    #[test]
    fn missing_password_env_is_an_error() {
        let text = MINIMAL.replace(
            "type = \"mqtt\"",
            "type = \"mqtt\"\nusername = \"u\"\npassword_env = \"EDGEGATE_TEST_SURELY_UNSET\"",
        );
        let (key, _, msg) = invalid(&text);
        assert_eq!(key, "sources.plant.password_env");
        assert!(msg.contains("EDGEGATE_TEST_SURELY_UNSET"));
    }

    #[test]
    fn bounds_above_the_memory_budget_are_refused_naming_the_largest() {
        let defaults = parse(MINIMAL).unwrap();
        let total: u64 = defaults.memory_bounds().iter().map(|(_, b)| b).sum();
        assert!(total < 192 << 20, "defaults add up to {total}");
        let text = MINIMAL.replace(
            "[kafka]",
            "[buffer]\nintake_max_bytes = \"256MiB\"\n[kafka]",
        );
        let (key, _, msg) = invalid(&text);
        assert_eq!(key, "gateway.memory_budget");
        assert!(msg.contains("buffer.intake_max_bytes 512.0 MiB"), "{msg}");
        let raised = text.replace(
            "data_dir = \"/tmp/x\"",
            "data_dir = \"/tmp/x\"\nmemory_budget = \"1GiB\"",
        );
        assert!(parse(&raised).is_ok());
    }
}
