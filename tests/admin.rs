//! The admin endpoint scraped while records flow and while the uplink is cut.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_with_the_uplink() {
    let mqtt = Mosquitto::start();
    let proxy_port = free_port();
    let kafka = Tansu::start_advertising(free_port(), proxy_port);
    kafka.create_topic("uplink", 1);
    let proxy = Proxy::start(proxy_port, kafka.port);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", &extra);
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);

    let publisher = Publisher::connect(mqtt.port, "scrape").await;
    publish_delivered(
        &publisher,
        admin,
        "sensors/a",
        100,
        100,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        metric(admin, "edgegate_records_in_total{source=\"plant\"}"),
        100.0
    );
    assert_eq!(metric(admin, "edgegate_kafka_link_up"), 1.0);
    assert_eq!(
        metric(admin, "edgegate_source_connected{source=\"plant\"}"),
        1.0
    );
    assert!(metric(admin, "edgegate_delivery_latency_seconds_count") >= 100.0);

    proxy.set(ProxyMode::Cut);
    for n in 100..150 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 100))
            .await;
    }
    wait_metric(
        admin,
        "edgegate_kafka_link_up",
        |v| v == 0.0,
        Duration::from_secs(30),
    );
    wait_metric(
        admin,
        "edgegate_buffer_records",
        |v| v >= 50.0,
        Duration::from_secs(10),
    );
    // Records wait while the uplink is cut: the oldest has an age (0 when the gauge is missing).
    wait_metric(
        admin,
        "edgegate_buffer_oldest_age_seconds",
        |v| v > 0.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        metric(admin, "edgegate_records_in_total{source=\"plant\"}"),
        150.0
    );

    proxy.set(ProxyMode::Up);
    wait_metric(
        admin,
        "edgegate_records_out_total",
        |v| v >= 150.0,
        Duration::from_secs(60),
    );
    wait_metric(
        admin,
        "edgegate_kafka_link_up",
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    wait_metric(
        admin,
        "edgegate_buffer_records",
        |v| v == 0.0,
        Duration::from_secs(10),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_a_stage_is_stalled() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 1);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // A decoder that spins for its whole 20 s timeout: the converter stage is stalled meanwhile.
    std::fs::write(dir.path().join("decoder.js"), "while (true) {}").unwrap();
    let extra = format!(
        "converter = \"spin\"\n[converters.spin]\nscript = \"decoder.js\"\ntimeout = \"20s\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\nstalled_after = \"1s\"\n"
    );
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", &extra);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for("mqtt subscribed", Duration::from_secs(30));
    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let publisher = Publisher::connect(mqtt.port, "stall-device").await;
    publisher.publish("sensors/a", b"{}".to_vec()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stalled = loop {
        let (status, body) = http_get(admin, "/healthz");
        if status == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "healthz stayed {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(stalled.contains("stalled: converter"), "{stalled}");
    // Stalled is not unready: the gateway still takes and stores records.
    assert_eq!(http_get(admin, "/readyz").0, 200);
    gateway.terminate();
}
