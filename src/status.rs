//! The gateway's status as `GET /status` serves it and `edgegate status`, `edgegate top` and the
//! status page show it: built on request from the metrics, the buffer and the configuration in
//! force (only the sources and converters configured now are listed), plus a judgement of its
//! health. The field names are documented in README ("Live status").

pub mod history;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::config::{Config, ConverterKind, DebugMode};
use crate::metrics::live::LastError;
use crate::metrics::{ConverterErrorLabels, DropReason, Metrics, RouteLabels, SourceLabels};
use history::{Totals, Troubles};

/// Errors, drops and dead letters within this window make the health a warning.
pub const RECENT: Duration = Duration::from_secs(15 * 60);
/// Share of `buffer.max_bytes` from which the buffer is a warning, and a critical problem.
const BUFFER_WARNING: f64 = 0.5;
const BUFFER_CRITICAL: f64 = 0.9;
/// Share of `gateway.memory_budget` from which the RSS is a warning.
const MEMORY_WARNING: f64 = 0.8;
/// Converter error kinds, as the `converter_errors` metric labels them.
const ERROR_KINDS: [&str; 6] = [
    "exception",
    "timeout",
    "out_of_memory",
    "invalid_result",
    "panic",
    "crash",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub gateway: GatewayStatus,
    pub health: Health,
    pub link: LinkStatus,
    pub backlog: Backlog,
    pub rates: RatesStatus,
    pub totals: TotalsStatus,
    pub sources: BTreeMap<String, SourceStatus>,
    pub converters: BTreeMap<String, ConverterStatus>,
    /// Absent when no `[downlink]` is configured.
    pub downlink: Option<DownlinkStatus>,
    pub disk: Disk,
    pub memory: Memory,
    /// Records dropped since start, per reason (the `records_dropped` metric); only reasons seen.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GatewayStatus {
    pub id: String,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    pub uptime_seconds: u64,
    /// Sources started and buffer open (`/readyz`).
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum HealthLevel {
    Ok,
    Warning,
    Critical,
}

impl HealthLevel {
    /// `edgegate status`'s exit status: 0 ok, 1 warning, 2 critical (3: no answer).
    pub fn exit_code(self) -> u8 {
        match self {
            HealthLevel::Ok => 0,
            HealthLevel::Warning => 1,
            HealthLevel::Critical => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthLevel::Ok => "ok",
            HealthLevel::Warning => "warning",
            HealthLevel::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: HealthLevel,
    /// One sentence per problem, worst first; empty when ok.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    /// `up`, `down`, `refused` (credentials, permissions, TLS) or `unknown` (nothing sent yet).
    pub state: String,
    pub reason: Option<String>,
    /// RFC 3339: when the link entered this state.
    pub since: String,
    pub for_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    /// RFC 3339 capture time of the oldest buffered record.
    pub oldest_capture: Option<String>,
    pub oldest_age_seconds: Option<f64>,
    /// How long the backlog takes to empty at the recent delivery rate less the ingest rate;
    /// 0 when empty, null while the link is not up or the backlog does not shrink.
    pub drain_seconds: Option<f64>,
    /// `buffer.max_age`, when set: records older than that are dropped (counted).
    #[serde(default)]
    pub max_age_seconds: Option<f64>,
}

/// Records per second over the last 2 to 12 seconds; null before the first sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RatesStatus {
    /// Made durable, every source together.
    pub ingest: Option<f64>,
    /// Confirmed by Kafka.
    pub delivery: Option<f64>,
}

/// Counts since start; `edgegate top` computes its per-second rates from them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TotalsStatus {
    pub ingested: u64,
    pub delivered: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    /// `mqtt` or `serial`.
    #[serde(rename = "type")]
    pub kind: String,
    pub connected: bool,
    pub ingest_rate: Option<f64>,
    pub records_total: u64,
    /// Times its task ended unexpectedly and was started again.
    pub restarts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConverterStatus {
    /// `decoder` or `encoder`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The `debug` setting: `off`, `failures` or `all`.
    pub debug: String,
    /// Records failed since start, per kind; only kinds seen.
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub last_error: Option<LastErrorStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastErrorStatus {
    pub kind: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DownlinkStatus {
    /// Commands in the command topics not yet committed.
    pub lag: i64,
    pub received: u64,
    pub delivered: u64,
    pub failed: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    /// Bytes stored in the buffer, against `buffer.max_bytes`.
    pub buffer_bytes: u64,
    pub buffer_max_bytes: u64,
    /// Free bytes on data_dir's filesystem, against `buffer.min_free_disk`.
    pub free_bytes: Option<u64>,
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Memory {
    /// Resident set size (/proc/self/statm), against `gateway.memory_budget`.
    pub rss_bytes: Option<u64>,
    pub budget_bytes: u64,
}

/// What the status is built from.
pub struct Inputs<'a> {
    pub metrics: &'a Metrics,
    pub buffer: &'a Buffer,
    pub config: &'a Config,
    pub ready: bool,
    pub stalled_after: Duration,
}

/// The status now.
pub fn build(inputs: &Inputs<'_>) -> Status {
    let Inputs {
        metrics, config, ..
    } = *inputs;
    let live = &metrics.live;
    let now = totals(metrics, config);
    let rates = live.history.rates(&now);
    let stats = inputs.buffer.stats();
    let now_ms = now.t_ms;
    let link = live.link();
    let link_up = link.state == "up";
    // What leaves minus what comes in: a backlog delivered as fast as records arrive never
    // drains. Both are counted in Kafka records and records received.
    let drain_seconds = match (stats.records, rates.delivery) {
        (0, _) => Some(0.0),
        (n, Some(out)) if link_up => {
            let net = out - rates.ingest.unwrap_or(0.0);
            (net > 0.0).then(|| n as f64 / net)
        }
        _ => None,
    };
    let sources = config
        .sources
        .iter()
        .map(|(name, s)| {
            let status = SourceStatus {
                kind: s.kind().to_owned(),
                connected: gauge(&metrics.source_connected, name) > 0,
                ingest_rate: rates.per_source.get(name).copied(),
                records_total: now.per_source.get(name).copied().unwrap_or(0),
                restarts: counter(&metrics.source_restarts, name),
            };
            (name.clone(), status)
        })
        .collect();
    let mut status = Status {
        gateway: GatewayStatus {
            id: config.gateway.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: rfc3339(live.started_ms),
            uptime_seconds: live.started.elapsed().as_secs(),
            ready: inputs.ready,
        },
        health: Health {
            status: HealthLevel::Ok,
            reasons: Vec::new(),
        },
        link: LinkStatus {
            since: rfc3339(link.since_ms),
            for_seconds: now_ms.saturating_sub(link.since_ms) / 1000,
            state: link.state,
            reason: link.reason,
        },
        backlog: Backlog {
            records: stats.records,
            bytes: stats.bytes,
            oldest_capture: stats.oldest_ms.map(rfc3339),
            oldest_age_seconds: stats
                .oldest_ms
                .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0),
            drain_seconds,
            max_age_seconds: config.buffer.max_age.map(|d| d.as_secs_f64()),
        },
        rates: RatesStatus {
            ingest: rates.ingest,
            delivery: rates.delivery,
        },
        totals: TotalsStatus {
            ingested: now.ingested(),
            delivered: now.delivered,
            dropped: now.troubles.dropped,
        },
        sources,
        converters: converters(metrics, config),
        downlink: downlink(metrics, config),
        disk: Disk {
            buffer_bytes: stats.bytes,
            buffer_max_bytes: config.buffer.max_bytes.as_u64(),
            free_bytes: disk_free(&config.gateway.data_dir),
            min_free_bytes: config.buffer.min_free_disk.as_u64(),
        },
        memory: Memory {
            rss_bytes: rss_bytes(),
            budget_bytes: config.gateway.memory_budget.as_u64(),
        },
        dropped: metrics.dropped_by_reason(),
    };
    let recent = live.history.troubles_within(&now, RECENT);
    let stalled = metrics.health.stalled(inputs.stalled_after);
    let stalled = stalled.map(|(stage, running)| {
        format!(
            "the {} has been running for {} s (stalled)",
            stage.name(),
            running.as_secs()
        )
    });
    status.health = judge(&status, recent, stalled);
    status
}

/// The health of a status: critical when records cannot leave or will be lost soon without
/// help, a warning when something needs a look.
/// A Kafka outage this long is critical rather than a warning.
const LONG_OUTAGE: std::time::Duration = std::time::Duration::from_secs(3600);
/// The oldest record at this share of `buffer.max_age` is critical: records are about to be lost.
const MAX_AGE_CRITICAL: f64 = 0.8;

pub fn judge(status: &Status, recent: Troubles, stalled: Option<String>) -> Health {
    let mut problems: Vec<(HealthLevel, String)> = Vec::new();
    let mut add = |level, reason: String| problems.push((level, reason));
    if let Some(stalled) = stalled {
        add(HealthLevel::Critical, stalled);
    }
    let link = &status.link;
    let reason = link.reason.as_deref().unwrap_or("no reason given");
    match link.state.as_str() {
        "refused" => add(
            HealthLevel::Critical,
            format!("the Kafka broker refuses the gateway ({reason}); records stay buffered"),
        ),
        "down" => add(
            // An outage is what the buffer is for; a long one is what an operator must know of.
            if link.for_seconds >= LONG_OUTAGE.as_secs() {
                HealthLevel::Critical
            } else {
                HealthLevel::Warning
            },
            format!(
                "the Kafka link is down since {} ({reason}); records stay buffered",
                link.since
            ),
        ),
        _ => {}
    }
    let backlog = &status.backlog;
    if let (Some(age), Some(max)) = (backlog.oldest_age_seconds, backlog.max_age_seconds) {
        if age >= max * MAX_AGE_CRITICAL {
            add(
                HealthLevel::Critical,
                format!(
                    "the oldest buffered record is {:.0}% of buffer.max_age old; older ones are dropped",
                    age / max * 100.0
                ),
            );
        }
    }
    let disk = &status.disk;
    let used = disk.buffer_bytes as f64 / disk.buffer_max_bytes.max(1) as f64;
    if used >= BUFFER_WARNING {
        let level = if used >= BUFFER_CRITICAL {
            HealthLevel::Critical
        } else {
            HealthLevel::Warning
        };
        add(
            level,
            format!("the buffer holds {:.0}% of buffer.max_bytes", used * 100.0),
        );
    }
    if disk
        .free_bytes
        .is_some_and(|free| free < disk.min_free_bytes)
    {
        add(
            HealthLevel::Critical,
            "data_dir's disk is below buffer.min_free_disk; the buffer stops growing".into(),
        );
    }
    if let Some(rss) = status.memory.rss_bytes {
        let share = rss as f64 / status.memory.budget_bytes.max(1) as f64;
        if share > 1.0 {
            add(
                HealthLevel::Critical,
                "memory use is above gateway.memory_budget".into(),
            );
        } else if share >= MEMORY_WARNING {
            add(
                HealthLevel::Warning,
                format!(
                    "memory use is at {:.0}% of gateway.memory_budget",
                    share * 100.0
                ),
            );
        }
    }
    if !status.gateway.ready {
        add(HealthLevel::Warning, "the gateway is starting".into());
    }
    for (name, source) in &status.sources {
        if !source.connected {
            add(
                HealthLevel::Warning,
                format!("source {name} is not connected"),
            );
        }
    }
    let minutes = RECENT.as_secs() / 60;
    let recent_counts = [
        (recent.converter_errors, "converter errors"),
        (recent.dropped, "records dropped"),
        (recent.dead_lettered, "downlink commands dead-lettered"),
    ];
    for (n, what) in recent_counts {
        if n > 0 {
            add(
                HealthLevel::Warning,
                format!("{what} in the last {minutes} minutes: {n}"),
            );
        }
    }
    // Worst first; the order of equal ones is the order above.
    problems.sort_by_key(|(level, _)| std::cmp::Reverse(*level));
    Health {
        status: problems.first().map_or(HealthLevel::Ok, |(l, _)| *l),
        reasons: problems.into_iter().map(|(_, r)| r).collect(),
    }
}

/// The counter totals the history and the rates are made of.
pub fn totals(metrics: &Metrics, config: &Config) -> Totals {
    let per_source = config
        .sources
        .keys()
        .map(|name| (name.clone(), counter(&metrics.records_in, name)))
        .collect();
    let converter_errors = config
        .converters
        .keys()
        .map(|name| converter_errors(metrics, name).values().sum::<u64>())
        .sum();
    let dead_lettered = downlink(metrics, config).map_or(0, |d| d.dead_lettered);
    Totals {
        at: Instant::now(),
        t_ms: crate::record::now_ms(),
        per_source,
        delivered: metrics.records_out.get(),
        troubles: Troubles {
            dropped: metrics.dropped_by_reason().values().sum(),
            converter_errors,
            dead_lettered,
        },
    }
}

/// Samples the history every [`history::SAMPLE_EVERY`] until `shutdown`: a few counters read,
/// no work per record. Runs whether or not anyone looks, so the page has the last hour at once.
pub async fn sample(
    metrics: std::sync::Arc<Metrics>,
    config: watch::Receiver<std::sync::Arc<Config>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(history::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let config = config.borrow().clone();
        let now = totals(&metrics, &config);
        let records = u64::try_from(metrics.buffer_records.get()).unwrap_or(0);
        let bytes = u64::try_from(metrics.buffer_bytes.get()).unwrap_or(0);
        metrics.live.history.record(now, records, bytes);
    }
}

fn converters(metrics: &Metrics, config: &Config) -> BTreeMap<String, ConverterStatus> {
    config
        .converters
        .iter()
        .map(|(name, c)| {
            let errors = converter_errors(metrics, name);
            let status = ConverterStatus {
                kind: match c.kind {
                    ConverterKind::Decoder => "decoder",
                    ConverterKind::Encoder => "encoder",
                }
                .to_owned(),
                debug: match c.debug {
                    DebugMode::Off => "off",
                    DebugMode::Failures => "failures",
                    DebugMode::All => "all",
                }
                .to_owned(),
                errors_total: errors.values().sum(),
                errors,
                last_error: metrics.live.last_error(name).map(last_error),
            };
            (name.clone(), status)
        })
        .collect()
}

fn last_error(e: LastError) -> LastErrorStatus {
    LastErrorStatus {
        kind: e.kind,
        message: e.message,
        at: rfc3339(e.at_ms),
    }
}

/// Non-zero error counts of one converter, by kind; reading creates no series.
fn converter_errors(metrics: &Metrics, converter: &str) -> BTreeMap<String, u64> {
    ERROR_KINDS
        .iter()
        .filter_map(|kind| {
            let labels = ConverterErrorLabels {
                converter: converter.to_owned(),
                kind: (*kind).to_owned(),
            };
            let n = metrics.converter_errors.get(&labels).map(|c| c.get())?;
            (n > 0).then(|| ((*kind).to_owned(), n))
        })
        .collect()
}

fn downlink(metrics: &Metrics, config: &Config) -> Option<DownlinkStatus> {
    let d = config.downlink.as_ref()?;
    let labels: Vec<String> = d
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{i}:{}", r.source))
        // The downlink's label for commands that reached no route.
        .chain(["none".to_owned()])
        .collect();
    let sum = |family: &Family<RouteLabels, Counter>| -> u64 {
        labels
            .iter()
            .filter_map(|route| {
                let labels = RouteLabels {
                    route: route.clone(),
                };
                family.get(&labels).map(|c| c.get())
            })
            .sum()
    };
    let m = &metrics.downlink;
    Some(DownlinkStatus {
        lag: m.lag.get(),
        received: sum(&m.received),
        delivered: sum(&m.delivered),
        failed: sum(&m.failed),
        dead_lettered: sum(&m.dead_lettered),
    })
}

fn counter(family: &Family<SourceLabels, Counter>, source: &str) -> u64 {
    let labels = SourceLabels {
        source: source.to_owned(),
    };
    family.get(&labels).map_or(0, |c| c.get())
}

fn gauge(family: &Family<SourceLabels, Gauge>, source: &str) -> i64 {
    let labels = SourceLabels {
        source: source.to_owned(),
    };
    family.get(&labels).map_or(0, |g| g.get())
}

/// Every drop reason's label, for documentation and tests.
pub fn drop_reasons() -> impl Iterator<Item = &'static str> {
    DropReason::ALL.into_iter().map(DropReason::label)
}

pub fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Unix milliseconds of an RFC 3339 time as [`rfc3339`] writes it.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// Resident set size from `/proc/self/statm` (its second field, in pages).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Bytes an unprivileged process may still write on `dir`'s filesystem.
fn disk_free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we own; `path` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::useless_conversion)] // u32 fields on 32-bit ARM
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

#[cfg(test)]
mod tests;
