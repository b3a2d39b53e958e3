//! The load tool behind BENCHMARKS.md. Build first: `cargo build --release --examples --bins`.
//!
//! `target/release/examples/loadtest [MESSAGES] [BACKLOG]` runs every scenario on this machine
//! (mosquitto and Tansu on loopback) and prints a Markdown report:
//! - ceilings: load tool → mosquitto (QoS 1, acked), bare rdkafka producer → Tansu;
//! - naive bridge (rumqttc → rdkafka in one process, auto-acks, no disk) vs edgegate, full speed;
//! - end-to-end latency of both at a paced rate a consumer can follow;
//! - edgegate idle RSS, and a backlog of BACKLOG records built with the uplink cut, then drained.
//!
//! Single scenarios: `raw N`, `e2e N`, `backlog N`, `converter-micro N`, `converter N [ROUNDS]` (raw
//! and converter runs alternating for ROUNDS pairs, default 3), `serial PORTS SECS`, `ready N`,
//! `downlink N DEVICES` (Kafka → encoder → MQTT devices: a backlog of N commands, then 1,000/s for
//! latency, and the RSS the downlink adds).
//!
//! `reload [SECS] [RATE]`: RATE msg/s (default 10,000) for SECS seconds (default 30) through the seed
//! decoder while `edgegate reload` applies a converter, a Kafka and a source change in turn
//! every 3 s; prints each reload's time and the messages lost (distinct sequence numbers read
//! back from Kafka against the publishes mosquitto acknowledged).
//!
//! `bench [MESSAGES] [BACKLOG] [RSS_SECS]` is the matrix of `scripts/bench` (see `loadtest/bench.rs`).
//!
//! `loadtest bridge MQTT_PORT BOOTSTRAP TOPIC` is the naive bridge itself (run as a child process
//! so its CPU and memory are measured the same way as edgegate's).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "loadtest/bench.rs"]
mod bench;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::*;

const SIZE: usize = 200;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A 200-byte payload starting with its send time, for latency.
fn timed_payload() -> Vec<u8> {
    let mut p = format!("{:020}|", now_micros()).into_bytes();
    p.resize(SIZE, b'x');
    p
}

fn sent_micros(p: &[u8]) -> Option<u64> {
    std::str::from_utf8(p.get(..20)?).ok()?.parse().ok()
}

// ---------- process measurements ----------

#[derive(Clone, Copy, Default)]
struct ProcSample {
    cpu_s: f64,
    rss_mb: f64,
    hwm_mb: f64,
}

fn proc_sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ProcSample {
        cpu_s: (t(11) + t(12)) / ticks,
        rss_mb: kb("VmRSS:") / 1024.0,
        hwm_mb: kb("VmHWM:") / 1024.0,
    }
}

/// Bytes allocated on disk below `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            total += disk_bytes(&e.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

// ---------- load generation and counting ----------

/// The test suite's publisher with a wide window, plus timed payloads and pacing.
struct Load(Publisher, Option<Vec<u8>>);

impl Load {
    async fn connect(port: u16, id: &str) -> Load {
        Load(Publisher::connect_with(port, id, 1000, 10_000).await, None)
    }

    /// Publishes `payload` instead of timed payloads (no latency samples then).
    fn with_payload(mut self, payload: Option<Vec<u8>>) -> Load {
        self.1 = payload;
        self
    }

    async fn publish(&self, n: u64, topics: u64) {
        for i in 0..n {
            let topic = format!("sensors/dev{}", i % topics);
            let payload = self.1.clone().unwrap_or_else(timed_payload);
            self.0.publish(&topic, payload).await;
        }
    }

    /// Publishes at `rate` msg/s for `secs` seconds in 10 ms ticks.
    async fn publish_paced(&self, rate: u64, secs: u64) -> u64 {
        let per_tick = rate / 100;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0;
        for _ in 0..secs * 100 {
            tick.tick().await;
            self.publish(per_tick, 4).await;
            sent += per_tick;
        }
        sent
    }

    async fn wait_acked(&self, n: u64) {
        self.0.wait_acked(n, Duration::from_secs(600)).await;
    }
}

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "loadtest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer")
}

/// A thread reading a topic from the beginning, counting records and their latency (receive time
/// minus the send time in the payload). Counting by consuming, because Tansu 0.6's high
/// watermark lags the last batch.
struct Tail {
    count: Arc<AtomicU64>,
    latencies: Arc<std::sync::Mutex<Vec<u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Tail {
    fn start(bootstrap: &str, topic: &str) -> Tail {
        let t = Tail {
            count: Arc::default(),
            latencies: Arc::default(),
            stop: Arc::default(),
        };
        let (count, lat, stop) = (t.count.clone(), t.latencies.clone(), t.stop.clone());
        let c = consumer(bootstrap);
        let topic = topic.to_owned();
        std::thread::spawn(move || {
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition_offset(&topic, 0, Offset::Beginning);
            let _ = c.assign(&tpl);
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    if let Some(sent) = m.payload().and_then(sent_micros) {
                        if let Ok(mut l) = lat.lock() {
                            l.push(now_micros().saturating_sub(sent));
                        }
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        t
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn sorted_latencies(&self) -> Vec<u64> {
        let mut l = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_unstable();
        l
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How far a topic got: records counted and when the count last grew.
struct Arrival {
    count: u64,
    at: Instant,
}

/// Waits until the topic holds `n` records, or its count stops growing for 15 s.
fn wait_kafka(tail: &Tail, n: u64, timeout: Duration) -> Arrival {
    let deadline = Instant::now() + timeout;
    let mut last = Arrival {
        count: 0,
        at: Instant::now(),
    };
    while Instant::now() < deadline && last.at.elapsed() < Duration::from_secs(15) {
        let count = tail.count();
        if count > last.count {
            last = Arrival {
                count,
                at: Instant::now(),
            };
        }
        if count >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if last.count < n {
        eprintln!("  only {} of {n} reached Kafka", last.count);
    }
    last
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

// ---------- scenarios ----------

struct Row {
    name: String,
    msgs: u64,
    secs: f64,
    cpu_per_100k: Option<f64>,
    peak_rss_mb: Option<f64>,
    note: String,
}

impl Row {
    fn print(&self) {
        let opt = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} |",
            self.name,
            self.msgs,
            self.secs,
            self.msgs as f64 / self.secs,
            opt(self.cpu_per_100k, 2),
            opt(self.peak_rss_mb, 1),
            self.note
        );
    }
}

async fn mosquitto_ceiling(n: u64) -> Row {
    let broker = Mosquitto::start();
    let load = Load::connect(broker.port, "ceiling").await;
    let t = Instant::now();
    load.publish(n, 4).await;
    load.wait_acked(n).await;
    Row {
        name: "load tool → mosquitto (QoS 1, PUBACKed)".into(),
        msgs: n,
        secs: t.elapsed().as_secs_f64(),
        cpu_per_100k: None,
        peak_rss_mb: None,
        note: "ceiling".into(),
    }
}

fn rdkafka_ceiling(kafka: &Tansu, n: u64) -> Row {
    kafka.create_topic("bench-raw", 1);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let payload = vec![b'x'; SIZE];
    let t = Instant::now();
    for _ in 0..n {
        let mut record = BaseRecord::<(), _>::to("bench-raw").payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(120));
    // Write only: the clock stops when every record is acknowledged, before reading them back.
    let secs = t.elapsed().as_secs_f64();
    let tail = Tail::start(&kafka.bootstrap(), "bench-raw");
    let stored = wait_kafka(&tail, n, Duration::from_secs(60)).count;
    Row {
        note: format!("ceiling, write only; {stored} read back"),
        name: "bare rdkafka producer → Tansu (acks=all)".into(),
        msgs: n,
        secs,
        cpu_per_100k: None,
        peak_rss_mb: None,
    }
}

/// A child process (the naive bridge or edgegate) measured while it moves `n` messages; with
/// `payload`, that payload instead of timed ones.
async fn through_process(
    name: &str,
    pid: u32,
    broker: &Mosquitto,
    bootstrap: &str,
    topic: &str,
    n: u64,
    payload: Option<Vec<u8>>,
) -> Row {
    let load = Load::connect(broker.port, &format!("load-{topic}"))
        .await
        .with_payload(payload);
    let tail = Tail::start(bootstrap, topic);
    let before = proc_sample(pid);
    let t = Instant::now();
    load.publish(n, 4).await;
    let done = wait_kafka(&tail, n, Duration::from_secs(600));
    let after = proc_sample(pid);
    let note = if done.count < n {
        format!("only {} of {n} arrived; rate over those", done.count)
    } else {
        "counted in Kafka".into()
    };
    Row {
        name: name.into(),
        msgs: done.count,
        secs: (done.at - t).as_secs_f64(),
        // Per record delivered (counted in Kafka), not per record sent.
        cpu_per_100k: Some((after.cpu_s - before.cpu_s) / done.count.max(1) as f64 * 100_000.0),
        peak_rss_mb: Some(after.hwm_mb),
        note,
    }
}

async fn latency(broker: &Mosquitto, kafka: &Tansu, topic: &str, rate: u64) -> (f64, f64, usize) {
    let load = Load::connect(broker.port, &format!("paced-{topic}")).await;
    let secs = 10;
    let tail = Tail::start(&kafka.bootstrap(), topic);
    let sent = load.publish_paced(rate, secs).await;
    wait_kafka(&tail, sent, Duration::from_secs(60));
    let lat = tail.sorted_latencies();
    (percentile(&lat, 0.5), percentile(&lat, 0.99), lat.len())
}

fn spawn_bridge(mqtt_port: u16, bootstrap: &str, topic: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["bridge", &mqtt_port.to_string(), bootstrap, topic])
        .spawn()
        .expect("bridge")
}

fn edgegate_config(
    dir: &Path,
    mqtt_port: u16,
    bootstrap: &str,
    topic: &str,
    admin: u16,
) -> std::path::PathBuf {
    let path = dir.join("edgegate.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[buffer]\nmax_bytes = \"2GiB\"\ncache_bytes = \"{cache}\"\n{buffer_extra}\n\
             [kafka]\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\n{kafka_extra}\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [sources.plant]\ntype = \"mqtt\"\nport = {mqtt_port}\ntopics = [\"sensors/#\"]\nclient_id = \"bench-{topic}\"\n",
            dir.join("data").display(),
            cache = std::env::var("LOADTEST_CACHE").unwrap_or_else(|_| "8MiB".into()),
            // Extra [buffer] lines, e.g. commit_linger = "50ms".
            buffer_extra = std::env::var("LOADTEST_BUFFER").unwrap_or_default(),
            // Extra [kafka] lines for experiments, e.g. max_in_flight_bytes = "1MiB".
            kafka_extra = std::env::var("LOADTEST_KAFKA").unwrap_or_default(),
        ) + &std::env::var("LOADTEST_SOURCE").unwrap_or_default(),
    )
    .expect("config");
    path
}

fn start_edgegate(config: &Path) -> std::process::Child {
    let binary =
        std::env::var("LOADTEST_EDGEGATE").unwrap_or_else(|_| "target/release/edgegate".into());
    let child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("target/release/edgegate (cargo build --release first)");
    std::thread::sleep(Duration::from_secs(2));
    child
}

/// A counter or gauge from the admin endpoint.
fn metric(admin: u16, name: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return f64::NAN;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: an empty float sum is -0, which printed as "-0 dropped".
        .fold(0.0, |total, v| total + v)
}

async fn backlog(n: u64) {
    let broker = Mosquitto::start();
    let proxy_port = free_port();
    let kafka = Tansu::start_advertising(free_port(), proxy_port);
    kafka.create_topic("bench-backlog", 1);
    let proxy = Proxy::start(proxy_port, kafka.port);
    proxy.set(ProxyMode::Cut);
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = free_port();
    let config = edgegate_config(
        dir.path(),
        broker.port,
        &kafka.bootstrap(),
        "bench-backlog",
        admin,
    );
    let mut child = start_edgegate(&config);
    let pid = child.id();
    let load = Load::connect(broker.port, "backlog").await;
    let t = Instant::now();
    load.publish(n, 4).await;
    while metric(admin, "edgegate_records_in_total") < n as f64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingest = t.elapsed().as_secs_f64();
    let filled = proc_sample(pid);
    let disk = disk_bytes(&dir.path().join("data"));
    let payload = n * SIZE as u64;
    if std::env::var_os("LOADTEST_DISK_DETAIL").is_some() {
        for e in std::fs::read_dir(dir.path().join("data/buffer"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let files = std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(1);
            eprintln!(
                "  {:?}: {:.1} MB in {files} files",
                e.file_name(),
                disk_bytes(&e.path()).max(
                    e.metadata()
                        .map(|m| {
                            use std::os::unix::fs::MetadataExt;
                            m.blocks() * 512
                        })
                        .unwrap_or(0)
                ) as f64
                    / 1e6
            );
        }
    }
    println!("\n### Backlog of {n} records ({SIZE}-byte payloads, uplink cut)\n");
    println!("| measure | value |\n|---|---|");
    println!(
        "| ingest time (received by the gateway) | {ingest:.1} s ({:.0} msg/s) |",
        n as f64 / ingest
    );
    println!(
        "| RSS after ingest / peak so far | {:.1} MB / {:.1} MB |",
        filled.rss_mb, filled.hwm_mb
    );
    println!(
        "| disk (allocated) / payload bytes | {:.1} MB / {:.1} MB = {:.2}x |",
        disk as f64 / 1e6,
        payload as f64 / 1e6,
        disk as f64 / payload as f64
    );
    let tail = Tail::start(&kafka.bootstrap(), "bench-backlog");
    let before = proc_sample(pid);
    let t = Instant::now();
    proxy.set(ProxyMode::Up);
    let done = wait_kafka(&tail, n, Duration::from_secs(900));
    let drain = (done.at - t).as_secs_f64();
    let after = proc_sample(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let disk_after = disk_bytes(&dir.path().join("data"));
    println!(
        "| drain time after the uplink returns | {drain:.1} s ({:.0} msg/s) |",
        n as f64 / drain
    );
    println!(
        "| CPU while draining | {:.2} CPU-s per 100k delivered |",
        (after.cpu_s - before.cpu_s) / done.count.max(1) as f64 * 100_000.0
    );
    println!(
        "| peak RSS over the whole run (VmHWM) | {:.1} MB |",
        after.hwm_mb
    );
    println!(
        "| disk after draining | {:.1} MB |",
        disk_after as f64 / 1e6
    );
    println!(
        "| gateway counters: in / out / buffered / dropped | {} / {} / {} / {} |",
        metric(admin, "edgegate_records_in_total"),
        metric(admin, "edgegate_records_out_total"),
        metric(admin, "edgegate_buffer_records"),
        metric(admin, "edgegate_records_dropped_total"),
    );
    let _ = child.kill();
    let _ = child.wait();
}

async fn all(n: u64, backlog_n: u64) {
    println!(
        "## Run of {} on {} cores\n",
        chrono_free_date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{n} messages of {SIZE} bytes, QoS 1, 4 MQTT topics, one Kafka partition.\n");
    println!("| path | messages | seconds | msg/s | CPU-s / 100k | peak RSS MB | note |");
    println!("|---|---|---|---|---|---|---|");
    mosquitto_ceiling(n).await.print();
    let kafka = Tansu::start();
    rdkafka_ceiling(&kafka, n).print();
    let broker = Mosquitto::start();

    kafka.create_topic("bench-bridge", 1);
    let mut bridge = spawn_bridge(broker.port, &kafka.bootstrap(), "bench-bridge");
    std::thread::sleep(Duration::from_secs(2));
    let row = through_process(
        "naive bridge (rumqttc → rdkafka, auto-ack, no disk)",
        bridge.id(),
        &broker,
        &kafka.bootstrap(),
        "bench-bridge",
        n,
        None,
    )
    .await;
    row.print();
    // It subscribes to the same topics: stop it, or mosquitto delivers everything twice.
    let _ = bridge.kill();
    let _ = bridge.wait();

    let (row, mut gw, idle, _dir) = edgegate_row(&kafka, &broker, n).await;
    row.print();

    let rate = 10_000;
    println!(
        "\n### End-to-end latency at a paced {rate} msg/s for 10 s (publish → readable in Kafka)\n"
    );
    println!("| path | p50 ms | p99 ms | samples |\n|---|---|---|---|");
    let _ = gw.kill();
    let _ = gw.wait();
    kafka.create_topic("lat-bridge", 1);
    let mut bridge = spawn_bridge(broker.port, &kafka.bootstrap(), "lat-bridge");
    std::thread::sleep(Duration::from_secs(2));
    let (p50, p99, k) = latency(&broker, &kafka, "lat-bridge", rate).await;
    println!("| naive bridge | {p50:.1} | {p99:.1} | {k} |");
    let _ = bridge.kill();
    let _ = bridge.wait();
    let dir = tempfile::tempdir().expect("tempdir");
    kafka.create_topic("lat-edgegate", 1);
    let config = edgegate_config(
        dir.path(),
        broker.port,
        &kafka.bootstrap(),
        "lat-edgegate",
        free_port(),
    );
    let mut gw = start_edgegate(&config);
    let (p50, p99, k) = latency(&broker, &kafka, "lat-edgegate", rate).await;
    println!("| edgegate | {p50:.1} | {p99:.1} | {k} |");
    let _ = gw.kill();
    let _ = gw.wait();
    println!(
        "\nedgegate idle RSS (connected, empty buffer, 2 s after start): {:.1} MB",
        idle.rss_mb
    );

    backlog(backlog_n).await;
}

/// edgegate at full speed; returns the row, the still-running gateway, its idle sample taken
/// before the load, and the data directory (kept alive with the gateway).
async fn edgegate_row(
    kafka: &Tansu,
    broker: &Mosquitto,
    n: u64,
) -> (Row, std::process::Child, ProcSample, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    kafka.create_topic("bench-edgegate", 1);
    let (bootstrap, topic) = (kafka.bootstrap(), "bench-edgegate");
    let config = edgegate_config(dir.path(), broker.port, &bootstrap, topic, free_port());
    let gw = start_edgegate(&config);
    let idle = proc_sample(gw.id());
    let name = "edgegate (durable acks, sled, acks=all)";
    let row = through_process(name, gw.id(), broker, &bootstrap, topic, n, None).await;
    (row, gw, idle, dir)
}

/// Only the edgegate full-speed row, for profiling.
async fn edgegate_only(n: u64) {
    let kafka = Tansu::start();
    let broker = Mosquitto::start();
    let (row, mut gw, _, _dir) = edgegate_row(&kafka, &broker, n).await;
    row.print();
    let _ = gw.kill();
    let _ = gw.wait();
}

/// Reloads while `rate` msg/s flow for `secs` seconds; see the module docs.
async fn reload_under_load(secs: u64, rate: u64) {
    let kafka = Tansu::start();
    kafka.create_topic("reload", 1);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = free_port();
    let decoder = std::fs::read_to_string(SEED_DECODER).expect("seed decoder");
    std::fs::write(dir.path().join("decoder.js"), &decoder).expect("decoder");
    let base = edgegate_config(dir.path(), broker.port, &kafka.bootstrap(), "reload", admin);
    let base_text = std::fs::read_to_string(&base).expect("config")
        + "converter = \"tb\"\n[converters.tb]\nscript = \"decoder.js\"\n";
    std::fs::write(&base, &base_text).expect("config");
    let mut gw = start_edgegate(&base);
    let load = Load::connect(broker.port, "reload-load")
        .await
        .with_payload(Some(std::fs::read(SEED_PAYLOAD).expect("seed payload")));
    let publishing = tokio::spawn(async move {
        let sent = load.publish_paced(rate, secs).await;
        load.wait_acked(sent).await;
        sent
    });
    let binary =
        std::env::var("LOADTEST_EDGEGATE").unwrap_or_else(|_| "target/release/edgegate".into());
    let changes = [
        ("converter script", 0),
        ("kafka linger.ms", 1),
        ("source added", 2),
        ("source removed", 3),
    ];
    println!("| change | reload took (gateway) | `edgegate reload` wall time | applied |");
    println!("|---|---|---|---|");
    let mut round = 0u64;
    let started = Instant::now();
    while started.elapsed() + Duration::from_secs(4) < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (name, kind) = changes[(round % changes.len() as u64) as usize];
        round += 1;
        let mut text = base_text.clone();
        match kind {
            0 => std::fs::write(
                dir.path().join("decoder.js"),
                format!("{decoder}\n// round {round}\n"),
            )
            .expect("decoder"),
            1 => {
                text = text.replace(
                    "[kafka]\n",
                    &format!(
                        "[kafka]\nproperties = {{ \"linger.ms\" = {} }}\n",
                        5 + round % 2
                    ),
                )
            }
            2 => {
                text += &format!(
                    "[sources.extra]\ntype = \"mqtt\"\nport = {}\ntopics = [\"extra/#\"]\n",
                    broker.port
                )
            }
            _ => {}
        }
        std::fs::write(&base, &text).expect("config");
        let asked = Instant::now();
        let out = std::process::Command::new(&binary)
            .args(["reload", "--config"])
            .arg(&base)
            .output()
            .expect("edgegate reload");
        let wall = asked.elapsed();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + String::from_utf8_lossy(&out.stderr).trim();
        let took = said
            .strip_prefix("reloaded in ")
            .and_then(|r| r.split(':').next())
            .unwrap_or("refused");
        let applied = said.split_once(": ").map_or(said.as_str(), |(_, a)| a);
        println!(
            "| {name} | {took} | {:.0} ms | {applied} |",
            wall.as_secs_f64() * 1000.0
        );
    }
    let sent = publishing.await.expect("publisher");
    let mut seqs = std::collections::HashSet::new();
    let mut counted = 0;
    let msgs = consume_until(
        &kafka.bootstrap(),
        "reload",
        Duration::from_secs(120),
        |m| {
            seqs.extend(m[counted..].iter().map(KafkaMessage::seq));
            counted = m.len();
            seqs.len() as u64 >= sent
        },
    );
    println!(
        "\n{sent} messages acknowledged by mosquitto at {rate}/s for {secs} s, {round} reloads; {} distinct in Kafka ({} records read), {} lost",
        seqs.len(),
        msgs.len(),
        sent.saturating_sub(seqs.len() as u64)
    );
    let _ = gw.kill();
    let _ = gw.wait();
}

const SEED_DECODER: &str = "config/decoders/thingsboard.js";
const SEED_PAYLOAD: &str = "tests/fixtures/seed-payload.json";

/// The seed decoder on the seed payload in this process, on one thread: records/s and µs/record.
fn converter_in_process(n: u64) {
    use edgegate::config::ConverterConfig;
    use edgegate::converter::Converter;
    let settings = ConverterConfig::for_script(SEED_DECODER.into());
    let mut converter = Converter::new("seed", &settings, None).expect("seed decoder");
    let payload = std::fs::read(SEED_PAYLOAD).expect("seed payload");
    let meta = [
        ("integrationName", "plant"),
        ("topic", "sensors/sn-111"),
        ("gatewayId", "bench"),
    ];
    for _ in 0..1000 {
        let _ = converter.convert(&payload, &meta, 0);
    }
    let t = Instant::now();
    let mut bytes = 0;
    for i in 0..n {
        let entities = converter.convert(&payload, &meta, i).expect("converts");
        // The entities' JSON text is what the forwarder sends to Kafka.
        bytes += entities.iter().map(|e| e.json.len()).sum::<usize>();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| seed decoder, in process, one thread | {n} | {secs:.2} | {:.0} | {:.1} µs/record | {} B out per record |",
        n as f64 / secs,
        secs * 1e6 / n as f64,
        bytes / n.max(1) as usize
    );
}

/// Raw forwarding vs the seed decoder, same payload, same brokers, in `rounds` alternating pairs:
/// this VM's speed drifts by tens of percent within minutes, so one pair can land on either side
/// of a drift; the median of the per-pair ratios is the figure to quote.
async fn converter_e2e(n: u64, rounds: usize) {
    let payload = std::fs::read(SEED_PAYLOAD).expect("seed payload");
    let kafka = Tansu::start();
    let broker = Mosquitto::start();
    let decoder = std::fs::canonicalize(SEED_DECODER).expect("seed decoder");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut rates = Vec::new();
        for (label, source_extra) in [
            ("raw forwarding", String::new()),
            (
                "seed decoder",
                format!(
                    "converter = \"tb\"\n[converters.tb]\nscript = \"{}\"\n",
                    decoder.display()
                ),
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let topic = format!("bench-{}-{round}", label.replace(' ', "-"));
            kafka.create_topic(&topic, 1);
            std::env::set_var("LOADTEST_SOURCE", &source_extra);
            let config = edgegate_config(
                dir.path(),
                broker.port,
                &kafka.bootstrap(),
                &topic,
                free_port(),
            );
            let mut gw = start_edgegate(&config);
            let name = format!("edgegate, {label}, seed payload (round {round})");
            let row = through_process(
                &name,
                gw.id(),
                &broker,
                &kafka.bootstrap(),
                &topic,
                n,
                Some(payload.clone()),
            )
            .await;
            row.print();
            rates.push(row.msgs as f64 / row.secs);
            let _ = gw.kill();
            let _ = gw.wait();
        }
        ratios.push(rates[1] / rates[0] * 100.0);
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.1}%")).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nconverter / raw, per round: {}; median {:.1}%",
        each.join(", "),
        ratios[ratios.len() / 2]
    );
}

/// `ports` serial devices (pseudo-terminals) streaming line frames at 115200 baud (11,520 bytes/s
/// each) for `secs` seconds: edgegate's CPU share, RSS over idle, and frame-to-Kafka latency.
async fn serial(ports: usize, secs: u64) {
    const FRAME: usize = 48;
    let kafka = Tansu::start();
    kafka.create_topic("bench-serial", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut devices = Vec::new();
    let mut sources = String::new();
    for i in 0..ports {
        let pty = Pty::open();
        let link = dir.path().join(format!("ttyBENCH{i}"));
        pty.link_as(&link);
        devices.push(pty);
        // LOADTEST_SERIAL: extra lines for every port, e.g. max_pending = 64.
        sources += &format!(
            "[sources.port{i}]\ntype = \"serial\"\npath = \"{}\"\nbaud_rate = 115200\n{}\n",
            link.display(),
            std::env::var("LOADTEST_SERIAL").unwrap_or_default()
        );
    }
    let admin = free_port();
    let config = dir.path().join("edgegate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[buffer]\n{buffer_extra}\n\
             [kafka]\nbootstrap_servers = \"{}\"\ntopic = \"bench-serial\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n{sources}",
            dir.path().join("data").display(),
            kafka.bootstrap(),
            buffer_extra = std::env::var("LOADTEST_BUFFER").unwrap_or_default(),
        ),
    )
    .expect("config");
    let mut gw = start_edgegate(&config);
    let idle = proc_sample(gw.id());
    let tail = Tail::start(&kafka.bootstrap(), "bench-serial");
    // What the gateway costs with its ports open and nothing arriving: the floor under the
    // streaming figure.
    let quiet_from = proc_sample(gw.id());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet_cpu = (proc_sample(gw.id()).cpu_s - quiet_from.cpu_s) / 5.0;
    let before = proc_sample(gw.id());
    let started = Instant::now();
    let bytes_per_tick = 115_200.0 / 10.0 / 100.0; // 10 bits per character, 10 ms ticks
    let mut owed = vec![0.0f64; ports];
    let mut frames = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        for (i, dev) in devices.iter_mut().enumerate() {
            owed[i] += bytes_per_tick;
            while owed[i] >= FRAME as f64 {
                let mut frame = format!("{:020}|port{i}|", now_micros()).into_bytes();
                frame.resize(FRAME - 1, b'x');
                frame.push(b'\n');
                dev.send(&frame);
                owed[i] -= FRAME as f64;
                frames += 1;
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let after = proc_sample(gw.id());
    let arrived = wait_kafka(&tail, frames, Duration::from_secs(60)).count;
    let lat = tail.sorted_latencies();
    println!("### {ports} serial ports at 115200 baud, {secs} s, {FRAME}-byte line frames\n");
    println!("| measure | value |\n|---|---|");
    println!(
        "| frames written / in Kafka | {frames} / {arrived} ({:.0} frames/s, {:.0} bytes/s) |",
        frames as f64 / wall,
        frames as f64 * FRAME as f64 / wall
    );
    println!(
        "| edgegate CPU while streaming / idle with ports open | {:.1}% / {:.1}% of one core |",
        (after.cpu_s - before.cpu_s) / wall * 100.0,
        quiet_cpu * 100.0
    );
    println!(
        "| edgegate RSS idle (ports open) / after streaming | {:.1} MB / {:.1} MB (+{:.1} MB) |",
        idle.rss_mb,
        after.rss_mb,
        after.rss_mb - idle.rss_mb
    );
    println!(
        "| frame → Kafka latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms ({} samples) |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().map_or(0.0, |v| *v as f64 / 1000.0),
        lat.len()
    );
    println!(
        "| gateway counters: in / out | {} / {} |",
        metric(admin, "edgegate_records_in_total"),
        metric(admin, "edgegate_records_out_total")
    );
    let _ = gw.kill();
    let _ = gw.wait();
}

/// Start-to-READY=1 (systemd notify) with an empty buffer and with `n` buffered records, plus
/// idle RSS; the buffer is filled in-process, Kafka is unreachable (READY must not wait for it).
fn ready(n: u64) {
    use edgegate::buffer::{self, Buffer};
    use edgegate::record::{now_ms, NewRecord, SourceType};
    println!("### Start to READY=1\n\n| buffered records | start → READY=1 | RSS 2 s after READY |\n|---|---|---|");
    for records in [0, n] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("edgegate.toml");
        std::fs::write(
            &config_path,
            format!(
                "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[buffer]\nmax_bytes = \"2GiB\"\n\
                 [kafka]\nbootstrap_servers = \"127.0.0.1:{}\"\ntopic = \"t\"\n",
                dir.path().join("data").display(),
                free_port()
            ),
        )
        .expect("config");
        if records > 0 {
            let config = edgegate::config::Config::load(&config_path).expect("config");
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let metrics = Arc::new(edgegate::metrics::Metrics::new());
                let (buf, writer, intake) =
                    Buffer::open(&config.gateway.data_dir, &config.buffer, metrics)
                        .expect("buffer");
                let shutdown = tokio_util::sync::CancellationToken::new();
                let committer = tokio::spawn(buffer::run(buf.clone(), intake, shutdown.clone()));
                let source: Arc<str> = Arc::from("plant");
                let mut pending = std::collections::VecDeque::new();
                for i in 0..records {
                    let record = NewRecord {
                        captured_ms: now_ms(),
                        source: source.clone(),
                        source_type: SourceType::Mqtt,
                        meta: vec![("topic".into(), format!("sensors/dev{}", i % 4))],
                        payload: timed_payload(),
                    };
                    pending.push_back(writer.submit(record).await.expect("submit"));
                    if pending.len() > 10_000 {
                        let _ = pending.pop_front().expect("pending").await;
                    }
                }
                for p in pending {
                    let _ = p.await;
                }
                drop(writer);
                let _ = committer.await;
                assert_eq!(buf.stats().records, records);
            });
        }
        let socket_path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let binary =
            std::env::var("LOADTEST_EDGEGATE").unwrap_or_else(|_| "target/release/edgegate".into());
        let started = Instant::now();
        let mut child = std::process::Command::new(binary)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("edgegate");
        let mut buf = [0u8; 512];
        let ready_after = loop {
            match socket.recv(&mut buf) {
                Ok(k) if String::from_utf8_lossy(&buf[..k]).contains("READY=1") => {
                    break started.elapsed()
                }
                Ok(_) => {}
                Err(e) => panic!("no READY=1: {e}"),
            }
        };
        std::thread::sleep(Duration::from_secs(2));
        let rss = proc_sample(child.id()).rss_mb;
        println!(
            "| {records} | {:.0} ms | {rss:.1} MB |",
            ready_after.as_secs_f64() * 1000.0
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The naive bridge: what people write first. Acks on receipt, nothing on disk.
async fn bridge(mqtt_port: u16, bootstrap: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut o = MqttOptions::new(format!("bridge-{topic}"), "127.0.0.1", mqtt_port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe("sensors/#", QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let mut record = BaseRecord::to(topic)
                    .key(&p.topic)
                    .payload(p.payload.as_ref());
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---------- downlink ----------

/// The JSON encoder of the downlink benchmark: a command in, `{method, params, t}` out, to the
/// device named by the Kafka key.
const BENCH_ENCODER: &str = r#"
return {
  contentType: "JSON",
  data: JSON.stringify({method: msg.method, params: msg.params, t: msg.t}),
  metadata: {deviceName: metadata.kafkaKey}
};
"#;

/// A device on mosquitto counting commands and their Kafka-produce-to-device latency.
async fn command_device(port: u16) -> Tail {
    let t = Tail {
        count: Arc::default(),
        latencies: Arc::default(),
        stop: Arc::default(),
    };
    let (count, lat) = (t.count.clone(), t.latencies.clone());
    let mut options = MqttOptions::new("bench-device", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    client
        .subscribe("devices/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let (Some(sent), Ok(mut l)) = (command_sent(&p.payload), lat.lock()) {
                        l.push(now_micros().saturating_sub(sent));
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    t
}

fn command(n: u64) -> String {
    format!(
        "{{\"method\":\"setValve\",\"params\":{{\"open\":true,\"n\":{n}}},\"t\":{}}}",
        now_micros()
    )
}

/// Reads `cmds` as it is written (no group) and records produce-to-consume latency: the Kafka
/// part of the downlink's latency, measured beside it.
fn command_tail(bootstrap: &str, fetch_wait: &str) -> Tail {
    let t = Tail {
        count: Arc::default(),
        latencies: Arc::default(),
        stop: Arc::default(),
    };
    let (count, lat, stop) = (t.count.clone(), t.latencies.clone(), t.stop.clone());
    let wait_ms = humantime::parse_duration(fetch_wait).map_or(500, |d| d.as_millis());
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "loadtest-commands")
        .set("fetch.wait.max.ms", wait_ms.to_string())
        .create()
        .expect("consumer");
    std::thread::spawn(move || {
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            let _ = tpl.add_partition_offset("cmds", p, Offset::End);
        }
        let _ = c.assign(&tpl);
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                if let Some(sent) = m.payload().and_then(command_sent) {
                    if let Ok(mut l) = lat.lock() {
                        l.push(now_micros().saturating_sub(sent));
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    t
}

fn command_sent(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let digits = text.split("\"t\":").nth(1)?;
    digits.trim_end_matches('}').parse().ok()
}

/// `loadtest downlink N DEVICES`: N commands over DEVICES keys, produced before the gateway starts,
/// then delivered through the encoder to mosquitto at full speed; then 1,000 commands/s for 10 s
/// for latency; RSS against the same gateway without a downlink.
async fn downlink(n: u64, devices: u64) {
    let broker = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("cmds", 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = free_port();
    let config = edgegate_config(dir.path(), broker.port, &kafka.bootstrap(), "uplink", admin);
    let baseline = {
        let mut gw = start_edgegate(&config);
        std::thread::sleep(Duration::from_secs(5));
        let s = proc_sample(gw.id());
        let _ = gw.kill();
        let _ = gw.wait();
        s
    };
    let encoder = dir.path().join("encoder.js");
    std::fs::write(&encoder, BENCH_ENCODER).expect("encoder");
    let mut text = std::fs::read_to_string(&config).expect("config");
    // LOADTEST_FETCH_WAIT: downlink.fetch_wait, and the bare consumer's fetch.wait.max.ms.
    let fetch_wait = std::env::var("LOADTEST_FETCH_WAIT").unwrap_or_else(|_| "500ms".into());
    text += &format!(
        "[downlink]\ntopics = [\"cmds\"]\nconverter = \"commands\"\nfetch_wait = \"{fetch_wait}\"\n\
         [[downlink.routes]]\nsource = \"plant\"\ntopic = \"devices/${{deviceName}}/rpc\"\nqos = 1\n\
         [converters.commands]\ntype = \"encoder\"\nscript = \"{}\"\n",
        encoder.display()
    );
    std::fs::write(&config, text).expect("config");
    let idle_with_downlink = {
        let mut gw = start_edgegate(&config);
        std::thread::sleep(Duration::from_secs(5));
        let s = proc_sample(gw.id());
        let _ = gw.kill();
        let _ = gw.wait();
        s
    };
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for i in 0..n {
        let key = format!("dev{}", i % devices);
        let value = command(i);
        let mut record = BaseRecord::to("cmds").key(&key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(60));
    let device = command_device(broker.port).await;
    let mut gw = start_edgegate(&config);
    let pid = gw.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    while device.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (start, cpu0) = (Instant::now(), proc_sample(pid).cpu_s);
    let mut peak = 0.0f64;
    while device.count() < n && Instant::now() < deadline {
        peak = peak.max(proc_sample(pid).rss_mb);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = proc_sample(pid).cpu_s - cpu0;
    let delivered = device.count();
    println!(
        "| scenario | commands | seconds | commands/s | CPU-s / 100k | p50 ms | p99 ms | RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| backlog through the encoder, {devices} devices, QoS 1 | {delivered} | {secs:.1} | {:.0} | {:.2} | – | – | peak {peak:.1} |",
        delivered as f64 / secs,
        cpu / delivered as f64 * 100_000.0
    );
    // Paced: 1,000/s for 10 s, latency from produce to the device, and to a bare consumer.
    device.latencies.lock().map(|mut l| l.clear()).ok();
    let kafka_only = command_tail(&kafka.bootstrap(), &fetch_wait);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Tansu's end offset can lie before the backlog's end: count only this phase's commands.
    let phase_start = now_micros();
    let before = device.count();
    let paced = 10_000u64;
    let t0 = Instant::now();
    for i in 0..paced {
        let due = t0 + Duration::from_micros(i * 1000);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let key = format!("dev{}", i % devices);
        let value = command(i);
        let _ = producer.send(BaseRecord::to("cmds").key(&key).payload(&value));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while device.count() < before + paced && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lat = device.sorted_latencies();
    let after = proc_sample(pid);
    let bare: Vec<u64> = kafka_only
        .sorted_latencies()
        .into_iter()
        .filter(|l| *l <= now_micros() - phase_start)
        .collect();
    println!(
        "| the same, produce to a bare consumer (no gateway) | {} | 10 | 1000 | – | {:.1} | {:.1} | – |",
        bare.len(),
        percentile(&bare, 0.5),
        percentile(&bare, 0.99)
    );
    println!(
        "| paced 1,000/s for 10 s | {} | 10 | 1000 | – | {:.1} | {:.1} | {:.1} after; idle {:.1} with the downlink, {:.1} without |",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        after.rss_mb,
        idle_with_downlink.rss_mb,
        baseline.rss_mb
    );
    let _ = gw.kill();
    let _ = gw.wait();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    match args.first().map(String::as_str) {
        Some("raw") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(200_000);
            let kafka = Tansu::start();
            rdkafka_ceiling(&kafka, n).print();
        }
        Some("e2e") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(300_000);
            runtime.block_on(edgegate_only(n));
        }
        Some("backlog") => {
            let n = args
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            runtime.block_on(backlog(n));
        }
        Some("converter") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(200_000);
            println!(
                "| path | records | seconds | records/s | CPU-s / 100k | peak RSS MB | note |"
            );
            println!("|---|---|---|---|---|---|---|");
            let rounds = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
            converter_in_process(n * 2);
            runtime.block_on(converter_e2e(n, rounds));
        }
        Some("converter-micro") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(400_000);
            converter_in_process(n);
        }
        Some("serial") => {
            let ports = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(16);
            let secs = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(30);
            runtime.block_on(serial(ports, secs));
        }
        Some("ready") => {
            let n = args
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            ready(n);
        }
        Some("downlink") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(200_000);
            let devices = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(100);
            runtime.block_on(downlink(n, devices));
        }
        Some("reload") => {
            let secs = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(30);
            let rate = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10_000);
            runtime.block_on(reload_under_load(secs, rate));
        }
        Some("bench") => {
            let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(200_000);
            let backlog = args
                .get(2)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            let rss_secs = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(600);
            runtime.block_on(bench::bench(n, backlog, rss_secs));
        }
        Some("bridge") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).expect("MQTT_PORT");
            runtime.block_on(bridge(port, &args[2], &args[3]));
        }
        _ => {
            let n = args.first().and_then(|v| v.parse().ok()).unwrap_or(300_000);
            let b = args
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            runtime.block_on(all(n, b));
        }
    }
}
