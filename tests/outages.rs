//! Uplink failures and crashes: nothing mosquitto accepted may be lost.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Kafka behind a proxy the test controls; Tansu advertises the proxy.
struct Uplink {
    kafka: Tansu,
    proxy: Proxy,
}

impl Uplink {
    fn start() -> Uplink {
        let proxy_port = free_port();
        let kafka = Tansu::start_advertising(free_port(), proxy_port);
        kafka.create_topic("uplink", 3);
        let proxy = Proxy::start(proxy_port, kafka.port);
        Uplink { kafka, proxy }
    }
}

fn topics() -> Vec<String> {
    (0..3).map(|i| format!("sensors/line{i}")).collect()
}

/// Publishes round-robin over `topics` at about `rate` msg/s for `duration`, in 10 ms ticks;
/// returns the next per-topic counter.
async fn publish_steadily(
    p: &Publisher,
    topics: &[String],
    rate: u64,
    duration: Duration,
    start: u64,
) -> u64 {
    let started = Instant::now();
    let rounds_per_tick = (rate / 100 / topics.len() as u64).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = start;
    while started.elapsed() < duration {
        tick.tick().await;
        for _ in 0..rounds_per_tick {
            for t in topics {
                p.publish(t, payload(t, n, 200)).await;
            }
            n += 1;
        }
    }
    n
}

/// Waits until mosquitto acknowledged all `n` rounds, then checks that every one of them reached
/// Kafka, in order per topic (duplicates from redelivery allowed).
async fn everything_accepted_arrives(
    publisher: &Publisher,
    kafka: &Tansu,
    gw: &Gateway,
    topics: &[String],
    n: u64,
) -> Tally {
    let total = n * topics.len() as u64;
    publisher.wait_acked(total, Duration::from_secs(30)).await;
    let msgs = consume_distinct(
        &kafka.bootstrap(),
        "uplink",
        total as usize,
        Duration::from_secs(120),
    );
    assert!(
        msgs.len() as u64 >= total,
        "got {} of {total}; log:\n{}",
        msgs.len(),
        gw.log()
    );
    assert_complete_in_order(&msgs, topics, n, true)
}

async fn outage(mode: ProxyMode) {
    let mqtt = Mosquitto::start();
    let uplink = Uplink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        mqtt.port,
        &uplink.kafka.bootstrap(),
        "uplink",
        "",
    );
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let topics = topics();
    let publisher = Publisher::connect(mqtt.port, "steady").await;

    let n = publish_steadily(&publisher, &topics, 300, Duration::from_secs(3), 0).await;
    gw.wait_for("kafka link up", Duration::from_secs(20));
    uplink.proxy.set(mode);
    let n = publish_steadily(&publisher, &topics, 300, Duration::from_secs(30), n).await;
    // The outage was noticed, by librdkafka or by the stall detector.
    gw.wait_for("kafka link down", Duration::from_secs(5));
    uplink.proxy.set(ProxyMode::Up);
    let restored = Instant::now();
    gw.wait_for_count("kafka link up", 2, Duration::from_secs(60));
    let recovery = restored.elapsed();
    let n = publish_steadily(&publisher, &topics, 300, Duration::from_secs(2), n).await;
    let tally = everything_accepted_arrives(&publisher, &uplink.kafka, &gw, &topics, n).await;
    let scenario = format!("uplink {mode:?} for 30 s at 300 msg/s (recovery: link up again)");
    report(&scenario, tally, Some(recovery));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_cut_for_30s_loses_nothing_and_drains_after() {
    outage(ProxyMode::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_blackholed_for_30s_is_detected_and_loses_nothing() {
    outage(ProxyMode::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_steady_publish_loses_nothing() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 3);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    let mut gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let topics = topics();
    let publisher = Publisher::connect(mqtt.port, "steady").await;

    let mut n = 0;
    let mut recovery = Duration::ZERO;
    for round in 1..=5 {
        n = publish_steadily(&publisher, &topics, 10_000, Duration::from_millis(1500), n).await;
        gw.kill9();
        n = publish_steadily(&publisher, &topics, 10_000, Duration::from_millis(300), n).await;
        let restarted = Instant::now();
        gw.restart();
        gw.wait_for_count("mqtt subscribed", round + 1, Duration::from_secs(10));
        recovery = recovery.max(restarted.elapsed());
    }
    n = publish_steadily(&publisher, &topics, 10_000, Duration::from_secs(1), n).await;
    let tally = everything_accepted_arrives(&publisher, &kafka, &gw, &topics, n).await;
    let scenario = "kill -9 five times at 10,000 msg/s (recovery: restart to subscribed, worst)";
    report(scenario, tally, Some(recovery));
}
