//! `edgegate status` and `edgegate top` against a running gateway with real brokers: the JSON's
//! fields follow the traffic, the exit status follows the health (the Kafka link cut, a
//! converter error), `top` draws sparklines, and a gateway that cannot be asked is "unknown".

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// `edgegate status --json`: (exit status, parsed JSON or Null, stderr).
fn status_json(config: &Path) -> (i32, Value, String) {
    let out = edgegate()
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// Polls `status --json` until `ok` holds; returns the last (exit status, JSON).
fn wait_status(config: &Path, ok: impl Fn(i32, &Value) -> bool, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, json, stderr) = status_json(config);
        if ok(code, &json) {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "status never as expected; last exit {code}: {json:#}\n{stderr}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_traffic_and_its_exit_status_follows_health() {
    let mqtt = Mosquitto::start();
    let proxy_port = free_port();
    let kafka = Tansu::start_advertising(free_port(), proxy_port);
    kafka.create_topic("uplink", 1);
    let proxy = Proxy::start(proxy_port, kafka.port);
    let dir = tempfile::tempdir().unwrap();
    let (config, admin) = meter_config(dir.path(), mqtt.port, &kafka.bootstrap());
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(20));
    let publisher = Publisher::connect(mqtt.port, "status-device").await;
    publish_delivered(
        &publisher,
        admin,
        "sensors/a",
        100,
        100,
        Duration::from_secs(60),
    )
    .await;

    let s = wait_status(
        &config,
        |code, s| code == 0 && s["link"]["state"] == "up",
        Duration::from_secs(20),
    );
    assert_eq!(s["health"]["status"], "ok", "{s:#}");
    assert_eq!(s["health"]["reasons"], serde_json::json!([]));
    assert_eq!(s["gateway"]["id"], "gw-test");
    assert_eq!(s["gateway"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["gateway"]["ready"], true);
    assert!(
        humantime::parse_rfc3339(s["link"]["since"].as_str().unwrap()).is_ok(),
        "{s:#}"
    );
    let plant = &s["sources"]["plant"];
    assert_eq!(plant["type"], "mqtt");
    assert_eq!(plant["connected"], true);
    assert_eq!(plant["records_total"], 100);
    assert_eq!(plant["restarts"], 0);
    assert_eq!(s["sources"].as_object().unwrap().len(), 1);
    assert_eq!(s["backlog"]["records"], 0);
    assert_eq!(s["backlog"]["drain_seconds"], 0.0);
    assert_eq!(s["totals"]["ingested"], 100);
    assert!(s["totals"]["delivered"].as_u64().unwrap() >= 100);
    let tb = &s["converters"]["tb"];
    assert_eq!(
        (&tb["type"], &tb["debug"], &tb["errors_total"]),
        (&"decoder".into(), &"all".into(), &0.into())
    );
    assert_eq!(s["disk"]["buffer_max_bytes"], 1u64 << 30);
    assert!(s["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["memory"]["budget_bytes"], 192u64 << 20);
    assert!(s["memory"]["rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(s["downlink"], Value::Null);
    assert_eq!(s["dropped"], serde_json::json!({}));

    // The human summary says the same.
    let out = edgegate()
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("health OK"), "{text}");
    assert!(text.contains("plant (mqtt) connected"), "{text}");
    assert!(text.contains("link        up since"), "{text}");

    // The page's other sources: converter debug events (debug = "all") and the history.
    let debug: Value = serde_json::from_str(body(&http_get(admin, "/status/debug").1)).unwrap();
    let events = debug["events"].as_array().unwrap();
    assert_eq!(events.len(), 20, "the ring keeps the last 20");
    // The newest last; a rewind could convert a record again after #99, so any of them.
    let last = events
        .iter()
        .find(|e| e["in"].as_str().unwrap_or("").starts_with("sensors/a#99#"))
        .unwrap_or_else(|| panic!("no event for record 99: {debug:#}"));
    assert_eq!(
        (&last["converter"], &last["type"]),
        (&"tb".into(), &"Uplink".into())
    );
    assert!(
        last["out"].as_str().unwrap().contains("meter-1"),
        "{last:#}"
    );
    assert_eq!(last["metadata"]["topic"], "sensors/a");
    let history: Value = serde_json::from_str(body(&http_get(admin, "/status/history").1)).unwrap();
    assert_eq!(history["interval_seconds"], 10);
    assert!(
        !history["points"].as_array().unwrap().is_empty(),
        "{history:#}"
    );

    // `top`: two frames, each cleared, with the rates' sparklines.
    let out = edgegate()
        .args(["top", "-n", "2", "--interval", "300ms", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{top}");
    assert_eq!(top.matches("\x1b[H\x1b[2J").count(), 2, "{top}");
    let sparkline = |name: &str| {
        top.lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l.chars().filter(|c| "▁▂▃▄▅▆▇█".contains(*c)).count())
            .next_back()
            .unwrap_or(0)
    };
    assert_eq!(sparkline("ingest"), 2, "{top}");
    assert_eq!(sparkline("delivery"), 2, "{top}");

    // The uplink cut: a warning (exit 1), records wait, no drain estimate.
    proxy.set(ProxyMode::Cut);
    for n in 100..150 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 100))
            .await;
    }
    let s = wait_status(
        &config,
        |code, s| {
            code == 1
                && s["link"]["state"] == "down"
                && s["backlog"]["records"].as_u64() >= Some(50)
        },
        Duration::from_secs(60),
    );
    assert_eq!(s["health"]["status"], "warning");
    let reasons = s["health"]["reasons"].to_string();
    assert!(reasons.contains("Kafka link is down"), "{reasons}");
    assert_eq!(s["backlog"]["drain_seconds"], Value::Null);
    assert!(s["backlog"]["oldest_capture"].is_string(), "{s:#}");
    assert!(s["backlog"]["bytes"].as_u64().unwrap() >= 50 * 100);

    // Back up: healthy again once the backlog is delivered.
    proxy.set(ProxyMode::Up);
    wait_status(
        &config,
        |code, s| code == 0 && s["backlog"]["records"] == 0 && s["link"]["state"] == "up",
        Duration::from_secs(90),
    );

    // A record the converter fails on: counted by kind, its message kept, a warning.
    publisher.publish("sensors/a", b"a bad one".to_vec()).await;
    let s = wait_status(
        &config,
        |_, s| s["converters"]["tb"]["errors"]["exception"] == 1,
        Duration::from_secs(30),
    );
    let last_error = &s["converters"]["tb"]["last_error"];
    assert_eq!(last_error["kind"], "exception");
    assert!(
        last_error["message"]
            .as_str()
            .unwrap()
            .contains("bad payload: a bad one"),
        "{s:#}"
    );
    assert_eq!(s["dropped"]["converter_exception"], 1);
    assert_eq!(s["health"]["status"], "warning");
    assert!(
        s["health"]["reasons"]
            .to_string()
            .contains("converter errors in the last 15 minutes: 1"),
        "{s:#}"
    );
    let (code, _, _) = status_json(&config);
    assert_eq!(code, 1);
}

#[test]
fn a_gateway_that_cannot_be_asked_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = free_port();
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{nobody}\"\n");
    let config = write_config(dir.path(), free_port(), "127.0.0.1:9", "uplink", &extra);
    for args in [&["status"][..], &["status", "--json"], &["top", "-n", "1"]] {
        let out = edgegate()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot reach the admin endpoint")
                || String::from_utf8_lossy(&out.stdout).contains("cannot reach"),
            "{args:?}: {stderr}"
        );
    }
    let config = write_config(dir.path(), free_port(), "127.0.0.1:9", "uplink", "");
    let out = edgegate()
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [admin] table"));
}

/// The body of a whole HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}
