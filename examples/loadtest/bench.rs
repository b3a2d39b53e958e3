//! `loadtest bench [MESSAGES] [BACKLOG] [RSS_SECS]`: the benchmark matrix behind `scripts/bench`.
//! Ceilings, the naive bridge and edgegate in one run on one machine, each case varying one thing
//! from a baseline (QoS 1, 200-byte payloads, 100 devices, converter off, link up):
//! messages counted in Kafka, p50/p99 publish-to-Kafka latency under that full load, CPU seconds
//! per 100k delivered, peak RSS, and disk bytes written per payload byte (`/proc/PID/io`).
//! Then the drain of a BACKLOG-record backlog, and RSS sampled over RSS_SECS at half the baseline
//! rate.

use super::*;

#[derive(Clone, Copy)]
struct Case {
    qos: QoS,
    size: usize,
    devices: u64,
    /// The seed decoder on the seed payload (`None`: timed payloads of `size`, no converter).
    seed: Option<bool>,
}

const BASELINE: Case = Case {
    qos: QoS::AtLeastOnce,
    size: 200,
    devices: 100,
    seed: None,
};

impl Case {
    fn label(&self) -> String {
        let qos = if self.qos == QoS::AtMostOnce { 0 } else { 1 };
        let what = match self.seed {
            Some(true) => "seed payload, seed decoder".to_owned(),
            Some(false) => "seed payload, no converter".to_owned(),
            None => format!("{} B", self.size),
        };
        format!("QoS {qos}, {what}, {} devices", self.devices)
    }

    /// Messages for a run: fewer for large payloads, so a run moves at most 400 MB.
    fn messages(&self, n: u64) -> u64 {
        n.min(400_000_000 / self.size as u64).max(1000)
    }
}

struct Measured {
    name: String,
    sent: u64,
    delivered: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_per_100k: f64,
    peak_rss_mb: f64,
    /// Bytes the process wrote to disk per payload byte delivered.
    write_amp: Option<f64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }

    fn print(&self, ceiling: f64) {
        let fixed = |v: f64, digits: usize| {
            if v.is_nan() {
                "–".into()
            } else {
                format!("{v:.digits$}")
            }
        };
        let opt = |v: f64| fixed(v, 1);
        let opt2 = |v: f64| fixed(v, 2);
        println!(
            "| {} | {} / {} | {:.0} | {:.0}% | {} | {} | {} | {} | {} |",
            self.name,
            self.delivered,
            self.sent,
            self.rate(),
            self.rate() / ceiling * 100.0,
            opt(self.p50_ms),
            opt(self.p99_ms),
            opt2(self.cpu_per_100k),
            opt(self.peak_rss_mb),
            self.write_amp.map_or("–".into(), |w| format!("{w:.2}")),
        );
    }
}

fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn timed_payload_of(size: usize) -> Vec<u8> {
    let mut p = format!("{:020}|", now_micros()).into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

async fn publish(p: &Publisher, case: &Case, n: u64, seed: &[u8]) {
    for i in 0..n {
        let topic = format!("sensors/dev{}", i % case.devices);
        let payload = match case.seed {
            Some(_) => seed.to_vec(),
            None => timed_payload_of(case.size),
        };
        p.publish_qos(&topic, case.qos, payload).await;
    }
}

/// A subscriber that only counts: the far end of the MQTT ceiling.
async fn bare_subscriber(port: u16, qos: QoS) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let mut o = MqttOptions::new("bare-subscriber", "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20).set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    let counted = count.clone();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("sensors/#", qos);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let _ = subscribed.await;
    count
}

async fn mqtt_ceiling(case: &Case, n: u64) -> Measured {
    let broker = Mosquitto::start();
    let count = bare_subscriber(broker.port, case.qos).await;
    let load = Publisher::connect_with(broker.port, "ceiling", 1000, 10_000).await;
    let t = Instant::now();
    publish(&load, case, n, &[]).await;
    let mut last = (0, Instant::now());
    while last.0 < n && last.1.elapsed() < Duration::from_secs(10) {
        let c = count.load(Ordering::Relaxed);
        if c > last.0 {
            last = (c, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Measured {
        name: format!(
            "ceiling: load tool → mosquitto → bare subscriber ({})",
            case.label()
        ),
        sent: n,
        delivered: last.0,
        secs: (last.1 - t).as_secs_f64(),
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        cpu_per_100k: f64::NAN,
        peak_rss_mb: f64::NAN,
        write_amp: None,
    }
}

/// The process measured: its row name, pid, and whether it keeps a disk buffer.
struct Subject {
    name: String,
    pid: u32,
    disk: bool,
}

/// A child process (edgegate or the bridge) moving `n` messages of `case` into `topic`.
async fn through(
    Subject { name, pid, disk }: Subject,
    broker: &Mosquitto,
    kafka: &Tansu,
    topic: &str,
    case: &Case,
    n: u64,
) -> Measured {
    let seed = std::fs::read(SEED_PAYLOAD).expect("seed payload");
    let load = Publisher::connect_with(broker.port, &format!("load-{topic}"), 1000, 10_000).await;
    let tail = Tail::start(&kafka.bootstrap(), topic);
    let before = proc_sample(pid);
    let written = write_bytes(pid);
    let t = Instant::now();
    publish(&load, case, n, &seed).await;
    let done = wait_kafka(&tail, n, Duration::from_secs(900));
    let after = proc_sample(pid);
    let payload_bytes = done.count as f64
        * if case.seed.is_some() {
            seed.len()
        } else {
            case.size
        } as f64;
    let lat = tail.sorted_latencies();
    Measured {
        name,
        sent: n,
        delivered: done.count,
        secs: (done.at - t).as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_per_100k: (after.cpu_s - before.cpu_s) / done.count.max(1) as f64 * 100_000.0,
        peak_rss_mb: after.hwm_mb,
        write_amp: disk.then(|| (write_bytes(pid) - written) as f64 / payload_bytes.max(1.0)),
    }
}

fn source_lines(case: &Case) -> String {
    let mut lines = String::new();
    if case.qos == QoS::AtMostOnce {
        lines.push_str("qos = 0\n");
    }
    if case.seed == Some(true) {
        let decoder = std::fs::canonicalize(SEED_DECODER).expect("seed decoder");
        lines.push_str(&format!(
            "converter = \"tb\"\n[converters.tb]\nscript = \"{}\"\n",
            decoder.display()
        ));
    }
    lines
}

async fn edgegate_case(
    kafka: &Tansu,
    broker: &Mosquitto,
    case: &Case,
    n: u64,
    i: usize,
) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = format!("bench-edgegate-{i}");
    kafka.create_topic(&topic, 1);
    std::env::set_var("LOADTEST_SOURCE", source_lines(case));
    let config = edgegate_config(
        dir.path(),
        broker.port,
        &kafka.bootstrap(),
        &topic,
        free_port(),
    );
    std::env::remove_var("LOADTEST_SOURCE");
    let mut gw = start_edgegate(&config);
    let name = format!("edgegate: {}", case.label());
    let subject = Subject {
        name,
        pid: gw.id(),
        disk: true,
    };
    let m = through(subject, broker, kafka, &topic, case, n).await;
    let _ = gw.kill();
    let _ = gw.wait();
    m
}

async fn bridge_case(kafka: &Tansu, broker: &Mosquitto, case: &Case, n: u64) -> Measured {
    let topic = "bench-bridge";
    kafka.create_topic(topic, 1);
    let mut bridge = spawn_bridge(broker.port, &kafka.bootstrap(), topic);
    std::thread::sleep(Duration::from_secs(2));
    let name = format!(
        "naive bridge (rumqttc → rdkafka, auto-ack, no disk): {}",
        case.label()
    );
    let subject = Subject {
        name,
        pid: bridge.id(),
        disk: false,
    };
    let m = through(subject, broker, kafka, topic, case, n).await;
    // It subscribes to the same topics: stop it, or mosquitto delivers everything twice.
    let _ = bridge.kill();
    let _ = bridge.wait();
    m
}

/// RSS of edgegate every 10 s while it takes `rate` msg/s for `secs`.
async fn rss_over_time(kafka: &Tansu, broker: &Mosquitto, rate: u64, secs: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = "bench-rss";
    kafka.create_topic(topic, 1);
    let config = edgegate_config(
        dir.path(),
        broker.port,
        &kafka.bootstrap(),
        topic,
        free_port(),
    );
    let mut gw = start_edgegate(&config);
    let pid = gw.id();
    let load = Publisher::connect_with(broker.port, "rss-load", 1000, 10_000).await;
    let tail = Tail::start(&kafka.bootstrap(), topic);
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut sent = 0;
    let mut next_sample = Duration::from_secs(10);
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        publish(&load, &BASELINE, per_tick, &[]).await;
        sent += per_tick;
        if start.elapsed() >= next_sample {
            samples.push(proc_sample(pid).rss_mb);
            next_sample += Duration::from_secs(10);
        }
    }
    let done = wait_kafka(&tail, sent, Duration::from_secs(120));
    let _ = gw.kill();
    let _ = gw.wait();
    // The first minute is warm-up (allocator arenas, sled's cache filling); flat means after it.
    let steady: Vec<f64> = samples.iter().skip(6).copied().collect();
    let mut sorted = steady.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let (min, max) = (
        sorted.first().copied().unwrap_or(f64::NAN),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    println!("\n### RSS over {secs} s at {rate} msg/s (half the baseline rate)\n");
    println!("| measure | value |\n|---|---|");
    println!(
        "| messages sent / counted in Kafka | {sent} / {} |",
        done.count
    );
    println!(
        "| RSS after the first minute: min / median / max | {min:.1} / {median:.1} / {max:.1} MB |"
    );
    println!(
        "| largest deviation from the median | {:+.1}% / {:+.1}% |",
        (min / median - 1.0) * 100.0,
        (max / median - 1.0) * 100.0
    );
    let each: Vec<String> = samples.iter().map(|s| format!("{s:.1}")).collect();
    println!("| every 10 s (MB) | {} |", each.join(" "));
}

pub async fn bench(n: u64, backlog_n: u64, rss_secs: u64) {
    println!(
        "## Benchmark run of {} on {} cores (`scripts/bench`)\n",
        chrono_free_date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "Each row moves up to {n} messages at full speed, counted when readable in Kafka (one partition, acks=all). \
         Latency is publish → readable in Kafka under that full load. `% of ceiling` is against the MQTT ceiling of the same QoS (measured with 200-byte payloads).\n"
    );
    println!("| path | in Kafka / sent | msg/s | % of ceiling | p50 ms | p99 ms | CPU-s / 100k | peak RSS MB | disk written / payload |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let kafka = Tansu::start();
    let broker = Mosquitto::start();
    let qos0 = Case {
        qos: QoS::AtMostOnce,
        ..BASELINE
    };
    let mut ceilings = Vec::new();
    for case in [BASELINE, qos0] {
        let m = mqtt_ceiling(&case, case.messages(n)).await;
        m.print(m.rate());
        ceilings.push(m.rate());
    }
    let kafka_ceiling = rdkafka_ceiling(&kafka, n);
    let kafka_rate = kafka_ceiling.msgs as f64 / kafka_ceiling.secs;
    println!(
        "| ceiling: bare rdkafka producer → Tansu (acks=all, write only, 200 B) | {} / {} | {kafka_rate:.0} | – | – | – | – | – | – |",
        kafka_ceiling.msgs, kafka_ceiling.msgs
    );
    let bridge = bridge_case(&kafka, &broker, &BASELINE, BASELINE.messages(n)).await;
    bridge.print(ceilings[0]);

    let mut cases = vec![BASELINE, qos0];
    for size in [64, 2048, 65536] {
        cases.push(Case { size, ..BASELINE });
    }
    for devices in [1, 10_000] {
        cases.push(Case {
            devices,
            ..BASELINE
        });
    }
    cases.push(Case {
        seed: Some(false),
        ..BASELINE
    });
    cases.push(Case {
        seed: Some(true),
        ..BASELINE
    });
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let ceiling = if case.qos == QoS::AtMostOnce {
            ceilings[1]
        } else {
            ceilings[0]
        };
        let m = edgegate_case(&kafka, &broker, case, case.messages(n), i).await;
        m.print(ceiling);
        results.push(m);
    }
    // A row that did not deliver everything it sent meets no target, whatever its rate.
    let ratio = |a: &Measured, b: f64| {
        if a.delivered < a.sent {
            0.0
        } else {
            a.rate() / b * 100.0
        }
    };
    println!("\n| target | measured | met |\n|---|---|---|");
    let durable = &results[0];
    let r = ratio(durable, bridge.rate());
    println!(
        "| edgegate QoS 1 ≥ naive bridge | {r:.0}% of the bridge | {} |",
        yes(r >= 100.0)
    );
    let r = ratio(durable, ceilings[0]);
    println!(
        "| edgegate QoS 1 ≥ 75% of the MQTT ceiling | {r:.0}% | {} |",
        yes(r >= 75.0)
    );
    let (raw, decoded) = (&results[results.len() - 2], &results[results.len() - 1]);
    let r = ratio(decoded, raw.rate());
    println!(
        "| converter on ≥ 80% of off (seed payload) | {r:.0}% | {} |",
        yes(r >= 80.0)
    );

    rss_over_time(&kafka, &broker, (durable.rate() / 2.0) as u64, rss_secs).await;
    backlog(backlog_n).await;
}

fn yes(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}
