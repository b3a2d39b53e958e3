//! End to end through real brokers: mosquitto → edgegate → Tansu.

mod support;

use std::time::Duration;

use support::*;

fn topics(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sensors/dev{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_arrive_byte_exact_in_order_without_duplicates() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    // The gateway creates the topic itself (create_topic defaults to true).
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));

    let topics = topics(5);
    let per_topic = 2000;
    let publisher = Publisher::connect(mqtt.port, "load").await;
    for n in 0..per_topic {
        for t in &topics {
            publisher.publish(t, payload(t, n, 200)).await;
        }
    }
    publisher.wait_acked(10_000, Duration::from_secs(60)).await;

    let msgs = consume(
        &kafka.bootstrap(),
        "uplink",
        10_000,
        Duration::from_secs(90),
    );
    let mut gw = gw;
    if msgs.len() != 10_000 {
        gw.terminate();
        let mut by_partition = std::collections::BTreeMap::new();
        for m in &msgs {
            *by_partition.entry(m.partition).or_insert(0) += 1;
        }
        panic!(
            "got {} ({by_partition:?}); gateway log:\n{}",
            msgs.len(),
            gw.log()
        );
    }
    assert_complete_in_order(&msgs, &topics, per_topic, false);
    let m = &msgs[0];
    let (topic, n) = parse_payload(&m.payload);
    assert_eq!(m.payload, payload(&topic, n, 200), "payload not byte-exact");
    assert_eq!(
        m.key.as_deref(),
        Some(topic.as_bytes()),
        "key is the MQTT topic"
    );
    assert_eq!(m.header("edgegate-gateway"), "gw-test");
    assert_eq!(m.header("edgegate-source"), "plant");
    assert_eq!(m.header("edgegate-topic"), topic);
    let now = edgegate::record::now_ms() as i64;
    let ts = m.timestamp.unwrap();
    assert!(
        ts > now - 120_000 && ts <= now,
        "timestamp {ts} is not the capture time"
    );
    let mut seqs: Vec<u64> = msgs.iter().map(KafkaMessage::seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 10_000, "sequence numbers repeat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_large_and_binary_payloads_pass_through_byte_exact() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 1);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));

    // The largest payload the default limits accept: max_payload_bytes, which leaves room for
    // key and headers in one kafka.max_record_bytes (1 MiB) record.
    let big: Vec<u8> = (0..1000 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let payloads = vec![
        Vec::new(),
        vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80],
        big,
        "°C ünïcødé".as_bytes().to_vec(),
    ];
    let publisher = Publisher::connect(mqtt.port, "odd").await;
    for p in &payloads {
        publisher.publish("sensors/odd", p.clone()).await;
    }
    publisher
        .wait_acked(payloads.len() as u64, Duration::from_secs(20))
        .await;

    let msgs = consume(
        &kafka.bootstrap(),
        "uplink",
        payloads.len(),
        Duration::from_secs(60),
    );
    let got: Vec<Vec<u8>> = msgs.into_iter().map(|m| m.payload).collect();
    assert_eq!(got.len(), payloads.len(), "gateway log:\n{}", gw.log());
    for (g, p) in got.iter().zip(&payloads) {
        assert!(
            g == p,
            "payload of {} bytes came back as {} bytes",
            p.len(),
            g.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_kafka_buffers_and_delivers_when_kafka_appears() {
    let mqtt = Mosquitto::start();
    let kafka_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = format!("127.0.0.1:{kafka_port}");
    let config = write_config(dir.path(), mqtt.port, &bootstrap, "uplink", "");
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    gw.wait_for("kafka link down", Duration::from_secs(20));

    let topics = topics(2);
    let publisher = Publisher::connect(mqtt.port, "early").await;
    for n in 0..500 {
        for t in &topics {
            publisher.publish(t, payload(t, n, 100)).await;
        }
    }
    publisher.wait_acked(1000, Duration::from_secs(20)).await;

    let kafka = Tansu::start_advertising(kafka_port, kafka_port);
    let msgs = consume(&kafka.bootstrap(), "uplink", 1000, Duration::from_secs(90));
    assert_eq!(msgs.len(), 1000, "gateway log:\n{}", gw.log());
    assert_complete_in_order(&msgs, &topics, 500, false);
    gw.wait_for("kafka link up", Duration::from_secs(10));
}
