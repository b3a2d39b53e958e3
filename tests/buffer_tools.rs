//! `edgegate buffer stats|export|purge` on a buffer filled during an outage.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::*;

fn tool(args: &[&str], config: &Path) -> (Option<i32>, String, String) {
    let out = edgegate()
        .arg("buffer")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stats(config: &Path) -> serde_json::Value {
    let (code, out, err) = tool(&["stats", "--json"], config);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap()
}

/// (topic, payload) of every exported record, checking seq order and metadata on the way.
fn export(config: &Path) -> Vec<(String, Vec<u8>)> {
    let (code, out, err) = tool(&["export"], config);
    assert_eq!(code, Some(0), "{err}");
    let mut last_seq = None;
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let seq = v["seq"].as_u64().unwrap();
            assert!(last_seq.is_none_or(|s| seq > s), "seq not increasing");
            last_seq = Some(seq);
            assert_eq!(v["source"], "plant");
            assert_eq!(v["source_type"], "mqtt");
            let payload = base64::engine::general_purpose::STANDARD
                .decode(v["payload_base64"].as_str().unwrap())
                .unwrap();
            (v["meta"]["topic"].as_str().unwrap().to_owned(), payload)
        })
        .collect()
}

fn captured(config: &Path, topic: &str) -> Vec<u64> {
    let (_, out, _) = tool(&["export"], config);
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["meta"]["topic"] == topic)
        .map(|v| v["captured_ms"].as_u64().unwrap())
        .collect()
}

fn phase_end(config: &Path, topic: &str) -> u64 {
    captured(config, topic).into_iter().max().unwrap()
}

fn phase_start(config: &Path, topic: &str) -> u64 {
    captured(config, topic).into_iter().min().unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until the gateway's buffer gauge (updated every 2 s) reports `n` records.
fn wait_buffered(admin: u16, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let wanted = format!("edgegate_buffer_records {n}\n");
    while !http_get(admin, "/metrics").1.contains(&wanted) {
        assert!(
            Instant::now() < deadline,
            "buffer never reached {n} records"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Payload `i` of a phase: text or, every third one, bytes that are not UTF-8.
fn phase_payload(phase: u8, i: u32) -> Vec<u8> {
    if i % 3 == 0 {
        vec![0xFF, phase, (i >> 8) as u8, i as u8, 0x00, 0xFE]
    } else {
        format!("phase{phase}-{i}-°C").into_bytes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_export_and_purge_on_a_buffer_filled_during_an_outage() {
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let dead_kafka = format!("127.0.0.1:{}", free_port());
    let admin = free_port();
    let config = write_config(
        dir.path(),
        mqtt.port,
        &dead_kafka,
        "uplink",
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "stall_timeout = \"3s\"",
        "stall_timeout = \"3s\"\nshutdown_timeout = \"1s\"",
    );
    std::fs::write(&config, text).unwrap();
    let mut gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "dev").await;
    let mut sent = HashSet::new();
    for i in 0..300 {
        let p = phase_payload(1, i);
        publisher.publish("sensors/old", p.clone()).await;
        sent.insert(("sensors/old".to_owned(), p));
    }
    publisher.wait_acked(300, Duration::from_secs(20)).await;

    // While the daemon runs, the tools refuse at once instead of hanging.
    let started = Instant::now();
    let (code, _, err) = tool(&["stats"], &config);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..200 {
        let p = phase_payload(2, i);
        publisher.publish("sensors/new", p.clone()).await;
        sent.insert(("sensors/new".to_owned(), p));
    }
    publisher.wait_acked(500, Duration::from_secs(20)).await;
    // The publisher's acks come from mosquitto; wait until the gateway has stored all 500 too.
    wait_buffered(admin, 500, Duration::from_secs(15));
    let stopping = Instant::now();
    assert_eq!(gw.terminate(), Some(0));
    // Kafka is unreachable; shutdown must not wait out a metadata request.
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );

    let s = stats(&config);
    assert_eq!(s["records"], 500, "{s}");
    assert!(s["oldest_ms"].as_u64() < s["newest_ms"].as_u64());
    let exported = export(&config);
    assert_eq!(exported.len(), 500);
    let exported_set: HashSet<_> = exported.iter().cloned().collect();
    assert_eq!(exported_set, sent, "export is not byte-exact");

    // Cut between the phases (6 s apart), whatever the time is now.
    let cut = (phase_end(&config, "sensors/old") + phase_start(&config, "sensors/new")) / 2;
    let older_than = format!("{}ms", now_ms() - cut);
    let (code, out, err) = tool(&["purge", "--older-than", &older_than], &config);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 300 records"), "{out}");
    assert!(out.contains("200 remain"), "{out}");
    assert_eq!(stats(&config)["records"], 200);
    let left = export(&config);
    assert_eq!(left.len(), 200);
    assert!(left.iter().all(|(topic, _)| topic == "sensors/new"));

    let (code, out, _) = tool(&["purge"], &config);
    assert_eq!(code, Some(0));
    assert!(out.contains("purged 200 records"), "{out}");
    assert_eq!(stats(&config)["records"], 0);
}
