//! Converters end to end through real brokers: mosquitto → edgegate (QuickJS) → Tansu.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const SEED_DECODER: &str = include_str!("../config/decoders/thingsboard.js");
const SEED_PAYLOAD: &str = include_str!("fixtures/seed-payload.json");

/// A decoder that misbehaves on request: the payload names what to do.
const MOODY_DECODER: &str = r#"
var cmd = decodeToString(payload);
if (cmd === 'throw') throw new Error('device sent garbage');
if (cmd === 'loop') { while (true) {} }
if (cmd === 'oom') { var a = []; for (var i = 0; i < 1024; i++) a.push(new Array(1 << 17).fill(i)); }
if (cmd === 'deep') { var f = function (n) { return 1 + f(n + 1); }; f(0); }
if (cmd === 'number') return 42;
if (cmd === 'undefined') return undefined;
if (cmd === 'skip') return null;
return { deviceName: 'dev-' + cmd, telemetry: { n: parseInt(cmd, 10) } };
"#;

fn kafka_with_proxy() -> (Tansu, Proxy) {
    let proxy_port = free_port();
    let kafka = Tansu::start_advertising(free_port(), proxy_port);
    let proxy = Proxy::start(proxy_port, kafka.port);
    (kafka, proxy)
}

/// A gateway config whose `plant` source goes through converter `tb` running `script`.
fn converter_config(
    dir: &Path,
    mqtt_port: u16,
    bootstrap: &str,
    script: &str,
    kafka_extra: &str,
    converter_extra: &str,
) -> PathBuf {
    std::fs::write(dir.join("decoder.js"), script).unwrap();
    let config = write_config(
        dir,
        mqtt_port,
        bootstrap,
        "uplink",
        &format!(
            "converter = \"tb\"\n\n[converters.tb]\nscript = \"decoder.js\"\n{converter_extra}\n"
        ),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "topic = \"uplink\"",
        &format!("topic = \"uplink\"\n{kafka_extra}"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Adds an admin endpoint on a free port to the configuration; returns the port.
fn with_admin(config: &Path) -> u16 {
    let text = std::fs::read_to_string(config).unwrap();
    let port = free_port();
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n{text}");
    std::fs::write(config, admin).unwrap();
    port
}

/// The gateway running `converter_config(...)`, subscribed, and a device publisher.
async fn start_gateway(
    dir: &Path,
    mqtt: &Mosquitto,
    bootstrap: &str,
    script: &str,
    kafka_extra: &str,
    converter_extra: &str,
) -> (Gateway, Publisher) {
    let config = converter_config(
        dir,
        mqtt.port,
        bootstrap,
        script,
        kafka_extra,
        converter_extra,
    );
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    (gw, Publisher::connect(mqtt.port, "dev").await)
}

fn json_of(m: &KafkaMessage) -> Value {
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_decoder_output_reaches_kafka_and_keeps_capture_time_through_an_outage() {
    let mqtt = Mosquitto::start();
    let (kafka, proxy) = kafka_with_proxy();
    let dir = tempfile::tempdir().unwrap();
    let (gw, publisher) =
        start_gateway(dir.path(), &mqtt, &kafka.bootstrap(), SEED_DECODER, "", "").await;
    publisher
        .publish("sensors/sn-111", SEED_PAYLOAD.as_bytes().to_vec())
        .await;
    publisher.wait_acked(1, Duration::from_secs(10)).await;
    let first = consume(&kafka.bootstrap(), "uplink", 1, Duration::from_secs(30));
    assert_eq!(first.len(), 1, "log:\n{}", gw.log());
    let m = &first[0];
    assert_eq!(m.key.as_deref(), Some(&b"SN-111"[..]));
    assert_eq!(
        json_of(m),
        json!({"deviceName": "SN-111", "deviceType": "default", "attributes": {"model": "Model A"},
               "telemetry": [{"ts": 1607731932000u64, "values": {"battery": 3.99, "temperature": 27.05}},
                             {"ts": 1607775132000u64, "values": {"battery": 3.98, "temperature": 27.06}}]})
    );
    assert_eq!(m.header("edgegate-converter"), "tb");
    assert_eq!(m.header("edgegate-entity"), "0");
    assert_eq!(m.header("edgegate-gateway"), "gw-test");
    assert_eq!(m.header("edgegate-topic"), "sensors/sn-111");

    // Link down: a reading without ts is captured now and forwarded much later.
    proxy.set(ProxyMode::Cut);
    let published_at = now_ms();
    publisher
        .publish(
            "sensors/sn-222",
            br#"{"deviceName":"SN-222","telemetry":{"temperature":-3.5}}"#.to_vec(),
        )
        .await;
    publisher.wait_acked(2, Duration::from_secs(10)).await;
    gw.wait_for("kafka link down", Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let restored_at = now_ms();
    proxy.set(ProxyMode::Up);
    let msgs = consume(&kafka.bootstrap(), "uplink", 2, Duration::from_secs(60));
    let m = msgs
        .iter()
        .find(|m| m.key.as_deref() == Some(&b"SN-222"[..]))
        .unwrap_or_else(|| panic!("SN-222 missing; log:\n{}", gw.log()));
    let ts = json_of(m)["telemetry"][0]["ts"].as_u64().unwrap();
    assert!(
        ts >= published_at.saturating_sub(1000) && ts < restored_at,
        "ts {ts} is not the capture time (published {published_at}, link back {restored_at})"
    );
    assert_eq!(
        m.timestamp,
        Some(ts as i64),
        "record timestamp = capture time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_records_go_to_the_dead_letter_topic_and_the_rest_keeps_flowing() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let (gw, publisher) = start_gateway(
        dir.path(),
        &mqtt,
        &kafka.bootstrap(),
        MOODY_DECODER,
        "dead_letter_topic = \"uplink.dlq\"",
        "timeout = \"200ms\"\ntimeout_retry_delay = \"1s\"",
    )
    .await;
    let bad = ["throw", "loop", "oom", "deep", "number", "undefined"];
    let mut sent = 0;
    let started = Instant::now();
    for (i, cmd) in bad.iter().enumerate() {
        publisher
            .publish("sensors/x", cmd.as_bytes().to_vec())
            .await;
        publisher.publish("sensors/x", b"skip".to_vec()).await;
        publisher
            .publish("sensors/x", i.to_string().into_bytes())
            .await;
        sent += 3;
    }
    publisher.wait_acked(sent, Duration::from_secs(10)).await;

    let good = consume(
        &kafka.bootstrap(),
        "uplink",
        bad.len(),
        Duration::from_secs(60),
    );
    // Keyed by device name, so spread over partitions: compare as a set.
    let mut names: Vec<String> = good
        .iter()
        .map(|m| String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned())
        .collect();
    names.sort();
    let expected: Vec<String> = (0..bad.len()).map(|i| format!("dev-{i}")).collect();
    assert_eq!(names, expected, "log:\n{}", gw.log());
    // Each bad record costs at most its timeout: the good ones are not held up behind them.
    assert!(started.elapsed() < Duration::from_secs(30));

    let dead = consume(
        &kafka.bootstrap(),
        "uplink.dlq",
        bad.len(),
        Duration::from_secs(30),
    );
    let payloads: Vec<String> = dead
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        payloads, bad,
        "dead letters carry the raw payload, in order"
    );
    let error = |i: usize| dead[i].header("edgegate-error").to_owned();
    assert!(error(0).contains("device sent garbage"), "{}", error(0));
    assert!(error(1).contains("timed out"), "{}", error(1));
    assert!(error(2).contains("memory limit"), "{}", error(2));
    assert!(error(3).to_lowercase().contains("stack"), "{}", error(3));
    assert!(error(4).contains("returned a number"), "{}", error(4));
    assert!(error(5).contains("undefined"), "{}", error(5));
    assert!(dead.iter().all(|m| m.header("edgegate-converter") == "tb"));
    assert!(dead.iter().all(|m| !m.header("edgegate-seq").is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_topic_failures_are_counted_logged_once_and_debugged() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = converter_config(
        dir.path(),
        mqtt.port,
        &kafka.bootstrap(),
        MOODY_DECODER,
        "",
        "debug = \"failures\"",
    );
    let admin_port = with_admin(&config);
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "dev").await;
    for _ in 0..5 {
        publisher.publish("sensors/x", b"throw".to_vec()).await;
    }
    publisher.publish("sensors/x", b"7".to_vec()).await;
    publisher.wait_acked(6, Duration::from_secs(10)).await;
    let good = consume(&kafka.bootstrap(), "uplink", 1, Duration::from_secs(30));
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].key.as_deref(), Some(&b"dev-7"[..]));

    let (_, metrics) = http_get(admin_port, "/metrics");
    assert!(
        metrics.contains("edgegate_converter_errors_total{converter=\"tb\",kind=\"exception\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgegate_records_dropped_total{reason=\"converter_exception\"} 5"),
        "{metrics}"
    );
    assert_eq!(gw.count("converter failed on a record"), 1, "{}", gw.log());

    let debug = std::fs::read_to_string(dir.path().join("data/debug/tb.jsonl")).unwrap();
    let events: Vec<Value> = debug
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 5, "only failures are recorded:\n{debug}");
    assert_eq!(events[0]["in"], "throw");
    assert_eq!(events[0]["metadata"]["topic"], "sensors/x");
    assert!(events[0]["error"]
        .as_str()
        .unwrap()
        .contains("device sent garbage"));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until `marker` has held the same text starting with `prefix` for half a second: the
/// converter is stuck on what it names.
fn wait_stuck(marker: &Path, prefix: &str, gw: &Gateway) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Option<(String, Instant)> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "converter never stuck on {prefix:?}; log:\n{}",
            gw.log()
        );
        let text = std::fs::read_to_string(marker).unwrap_or_default();
        match &seen {
            Some((t, since)) if *t == text && text.starts_with(prefix) => {
                if since.elapsed() > Duration::from_millis(500) {
                    return text;
                }
            }
            _ => seen = Some((text, Instant::now())),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A record whose conversion ends the process (here the process is killed while the script hangs
/// on it, as the watchdog would) ends it twice at most: the next run gives it up, counted, and
/// forwards the records around it instead of crash-looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_ends_the_process_twice_is_given_up_instead_of_crash_looping() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = converter_config(
        dir.path(),
        mqtt.port,
        &kafka.bootstrap(),
        MOODY_DECODER,
        "",
        "timeout = \"120s\"",
    );
    let admin_port = with_admin(&config);
    let mut gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "dev").await;
    for cmd in ["1", "loop", "2"] {
        publisher
            .publish("sensors/x", cmd.as_bytes().to_vec())
            .await;
    }
    publisher.wait_acked(3, Duration::from_secs(10)).await;
    let marker = dir.path().join("data/converter.inflight");

    wait_stuck(&marker, "chunk", &gw);
    gw.kill9();
    gw.restart();
    gw.wait_for("converting them one by one", Duration::from_secs(15));
    let named = wait_stuck(&marker, "record", &gw);
    gw.kill9();
    gw.restart();
    gw.wait_for("it is given up", Duration::from_secs(15));

    let good = consume(&kafka.bootstrap(), "uplink", 2, Duration::from_secs(30));
    let mut keys: Vec<String> = good
        .iter()
        .map(|m| String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        ["dev-1", "dev-2"],
        "marker was {named:?}; log:\n{}",
        gw.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(admin_port, "/metrics");
        if metrics.contains("edgegate_records_dropped_total{reason=\"converter_crash\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.kill9();
}
