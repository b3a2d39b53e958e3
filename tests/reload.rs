//! Reloading the configuration while messages flow (mosquitto → edgegate → Tansu): each kind of
//! change is applied in place and nothing is lost; an invalid or restart-only change is refused
//! and the gateway runs on unchanged.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Keeps the test payload (`p`) and says which script version converted it (`v`).
fn decoder(version: u32) -> String {
    format!("var s = decodeToString(payload);\nreturn {{deviceName: 'd', telemetry: {{p: s, v: {version}}}}};\n")
}

/// The parts of a test configuration a reload changes.
#[derive(Clone)]
struct Setup {
    dir: PathBuf,
    mqtt_port: u16,
    bootstrap: String,
    admin_port: u16,
    gateway_id: &'static str,
    kafka_extra: String,
    /// Extra tables appended verbatim (more sources).
    extra: String,
}

impl Setup {
    /// The `plant` source through converter `tb` (`decoder.js`), an admin endpoint on a free port.
    fn new(dir: &Path, mqtt_port: u16, bootstrap: String) -> Setup {
        Setup {
            dir: dir.to_owned(),
            mqtt_port,
            bootstrap,
            admin_port: free_port(),
            gateway_id: "gw-test",
            kafka_extra: String::new(),
            extra: String::new(),
        }
    }

    fn write(&self) -> PathBuf {
        let path = self.dir.join("edgegate.toml");
        let text = format!(
            r#"
[gateway]
id = "{id}"
data_dir = "{data}"

[kafka]
bootstrap_servers = "{bootstrap}"
topic = "uplink"
topic_partitions = 3
stall_timeout = "3s"
{kafka_extra}

[sources.plant]
type = "mqtt"
host = "127.0.0.1"
port = {mqtt}
topics = ["sensors/#"]
reconnect_max = "2s"
converter = "tb"

[converters.tb]
script = "decoder.js"

[admin]
listen = "127.0.0.1:{admin}"
{extra}
"#,
            id = self.gateway_id,
            data = self.dir.join("data").display(),
            bootstrap = self.bootstrap,
            kafka_extra = self.kafka_extra,
            mqtt = self.mqtt_port,
            admin = self.admin_port,
            extra = self.extra,
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// `edgegate reload --config`, off the async threads: (exit code, stdout, stderr).
async fn reload(config: &Path) -> (i32, String, String) {
    let config = config.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        edgegate()
            .args(["reload", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn reload_ok(config: &Path, expect: &str) {
    let (code, out, err) = reload(config).await;
    assert_eq!(code, 0, "reload failed: {out}{err}");
    assert!(out.contains(expect), "{expect:?} not applied: {out}");
}

/// Whether a message points at a line of the configuration file (`…/edgegate.toml:19: key: …`).
fn names_a_line(message: &str) -> bool {
    message.split("edgegate.toml:").skip(1).any(|rest| {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

/// `POST /-/reload` as a browser sends it from another site; the raw answer.
fn post_from_a_page(admin: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    let request = "POST /-/reload HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn sighup(gw: &Gateway) {
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(gw.pid().unwrap() as i32, libc::SIGHUP) };
}

/// The converted record's test payload and script version.
fn converted(m: &KafkaMessage) -> (Vec<u8>, u64) {
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    let telemetry = &v["telemetry"];
    let values = telemetry.get(0).map_or(telemetry, |first| &first["values"]);
    let p = values["p"].as_str().unwrap().as_bytes().to_vec();
    (p, values["v"].as_u64().unwrap())
}

/// Publishes `per_topic` messages on each topic, spread over about `spread`.
fn publish_in_background(
    publisher: Arc<Publisher>,
    topics: Vec<String>,
    per_topic: u64,
    spread: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pause = spread / per_topic as u32;
        for n in 0..per_topic {
            for t in &topics {
                publisher.publish(t, payload(t, n, 100)).await;
            }
            tokio::time::sleep(pause).await;
        }
    })
}

fn mqtt_connects(gw: &Gateway, source: &str) -> usize {
    let needle = format!("source={source}");
    gw.lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("mqtt connected") && l.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_change_applies_under_load_and_nothing_is_lost() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decoder.js"), decoder(1)).unwrap();
    let mut setup = Setup::new(dir.path(), mqtt.port, kafka.bootstrap());
    let config = setup.write();
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let topics: Vec<String> = (0..4).map(|i| format!("sensors/dev{i}")).collect();
    let per_topic = 2500;
    let publisher = Arc::new(Publisher::connect(mqtt.port, "load").await);
    let load = publish_in_background(
        publisher.clone(),
        topics.clone(),
        per_topic,
        Duration::from_secs(12),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A new script: records read from now on are converted by it.
    std::fs::write(dir.path().join("decoder.js"), decoder(2)).unwrap();
    reload_ok(&config, "converters").await;
    // New producer settings: the producer is recreated once in-flight records are confirmed.
    setup.kafka_extra = "properties = { \"linger.ms\" = 3 }".into();
    reload_ok(&setup.write(), "kafka (producer recreated)").await;
    // A source added, changed, then removed; `plant` never notices.
    let extra = |topics: &str| {
        format!("[sources.extra]\ntype = \"mqtt\"\nhost = \"127.0.0.1\"\nport = {}\ntopics = {topics}\nreconnect_max = \"2s\"\n", mqtt.port)
    };
    setup.extra = extra("[\"extra/#\"]");
    reload_ok(&setup.write(), "sources.extra (added)").await;
    gw.wait_for("source=extra", Duration::from_secs(10));
    setup.extra = extra("[\"extra/#\", \"more/#\"]");
    reload_ok(&setup.write(), "sources.extra (restarted)").await;
    gw.wait_for_count("mqtt subscribed", 3, Duration::from_secs(10));
    let side = Publisher::connect(mqtt.port, "side").await;
    side.publish("more/x", payload("more/x", 0, 10)).await;
    side.wait_acked(1, Duration::from_secs(10)).await;
    // Durable before the source goes: removing it leaves undelivered messages in its session.
    let stored = "edgegate_records_in_total{source=\"extra\"}";
    let admin = setup.admin_port;
    tokio::task::spawn_blocking(move || {
        wait_metric(admin, stored, |n| n >= 1.0, Duration::from_secs(10))
    })
    .await
    .unwrap();
    // A new admin address (and the source removed): the old address stops answering, the new
    // one serves. `edgegate reload` would ask the new address, so this is SIGHUP's job.
    let old_admin = setup.admin_port;
    setup.admin_port = free_port();
    setup.extra.clear();
    setup.write();
    sighup(&gw);
    gw.wait_for_count("configuration reloaded", 5, Duration::from_secs(20));
    assert!(
        gw.log().contains("sources.extra (removed), admin"),
        "{}",
        gw.log()
    );
    assert_eq!(http_get(setup.admin_port, "/readyz").0, 200);
    assert!(std::net::TcpStream::connect(("127.0.0.1", old_admin)).is_err());

    load.await.unwrap();
    let total = topics.len() as u64 * per_topic;
    publisher.wait_acked(total, Duration::from_secs(60)).await;
    let mut seqs = std::collections::HashSet::new();
    let mut counted = 0;
    let msgs = consume_until(&kafka.bootstrap(), "uplink", Duration::from_secs(90), |m| {
        seqs.extend(m[counted..].iter().map(KafkaMessage::seq));
        counted = m.len();
        seqs.len() as u64 > total
    });
    let (plant, other): (Vec<_>, Vec<_>) = msgs
        .iter()
        .partition(|m| m.header("edgegate-source") == "plant");
    assert_eq!(other.len(), 1, "the changed source's message");
    assert_eq!(other[0].header("edgegate-topic"), "more/x");
    let mut seen_v2 = std::collections::HashSet::new();
    let plain: Vec<KafkaMessage> = plant
        .iter()
        .map(|m| {
            let (p, version) = converted(m);
            let (topic, _) = parse_payload(&p);
            // Per topic, in order: once the new script ran, the old one never runs again.
            if version == 2 {
                seen_v2.insert(topic.clone());
            } else {
                assert!(
                    !seen_v2.contains(&topic),
                    "{topic}: old script after the new one"
                );
            }
            KafkaMessage {
                payload: p,
                ..(*m).clone()
            }
        })
        .collect();
    assert_eq!(seen_v2.len(), topics.len(), "the new script never ran");
    let tally = assert_complete_in_order(&plain, &topics, per_topic, true);
    // With the link up, none of these reloads may duplicate: a Kafka change waits for the
    // records in flight, the others leave the producer and `plant` alone (RELIABILITY.md).
    assert_eq!((tally.resent, tally.redelivered), (0, 0), "duplicates");
    assert_eq!(
        mqtt_connects(&gw, "plant"),
        1,
        "plant reconnected:\n{}",
        gw.log()
    );
    let took: Vec<u64> = gw
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("configuration reloaded"))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(took.len(), 5, "{}", gw.log());
    println!("reload times (ms) under load: {took:?}");
    report("reload under load (5 reloads)", tally, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_restart_only_change_is_refused_and_the_gateway_runs_on_unchanged() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decoder.js"), decoder(1)).unwrap();
    let setup = Setup::new(dir.path(), mqtt.port, kafka.bootstrap());
    let config = setup.write();
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "dev").await;

    // An unknown key: refused with its name and line, here and by the daemon (SIGHUP).
    let text = std::fs::read_to_string(&config).unwrap();
    let typo = text.replace(
        "reconnect_max = \"2s\"",
        "reconnect_max = \"2s\"\ncolour = \"red\"",
    );
    std::fs::write(&config, &typo).unwrap();
    let (code, _, err) = reload(&config).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sources.plant.colour"), "{err}");
    assert!(names_a_line(&err), "no line number: {err}");
    sighup(&gw);
    gw.wait_for("reload refused", Duration::from_secs(10));
    let refusal = gw
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("reload refused"))
        .cloned()
        .unwrap_or_default();
    assert!(
        refusal.contains("sources.plant.colour") && names_a_line(&refusal),
        "{refusal}"
    );
    // A script that does not compile is refused too; the old one keeps converting.
    std::fs::write(&config, &text).unwrap();
    std::fs::write(dir.path().join("decoder.js"), "return {deviceName: ").unwrap();
    let (code, _, err) = reload(&config).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("converters.tb"), "{err}");
    // The gateway checks for itself too: SIGHUP skips the command's check.
    sighup(&gw);
    gw.wait_for_count("reload refused", 2, Duration::from_secs(10));
    let refusals: Vec<String> = gw
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("reload refused"))
        .cloned()
        .collect();
    assert!(refusals[1].contains("converters.tb"), "{refusals:?}");
    // Published while the broken script is on disk: the old one still converts them.
    for n in 0..10 {
        publisher
            .publish("sensors/early", payload("sensors/early", n, 50))
            .await;
    }
    publisher.wait_acked(10, Duration::from_secs(10)).await;
    let early = consume(&kafka.bootstrap(), "uplink", 10, Duration::from_secs(60));
    assert_eq!(early.len(), 10, "{}", gw.log());
    assert!(early.iter().all(|m| converted(m).1 == 1));
    std::fs::write(dir.path().join("decoder.js"), decoder(1)).unwrap();
    // A restart-only key: named, nothing applied, even with other changes beside it.
    let renamed = Setup {
        gateway_id: "gw-renamed",
        kafka_extra: "properties = { \"linger.ms\" = 3 }".into(),
        ..setup.clone()
    };
    renamed.write();
    let (code, _, err) = reload(&config).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("gateway.id changed: restart"), "{err}");
    assert_eq!(gw.count("configuration reloaded"), 0, "{}", gw.log());

    for n in 0..100 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 50))
            .await;
    }
    publisher.wait_acked(110, Duration::from_secs(10)).await;
    let msgs = consume(&kafka.bootstrap(), "uplink", 110, Duration::from_secs(60));
    assert_eq!(msgs.len(), 110, "{}", gw.log());
    for m in &msgs {
        assert_eq!(
            m.header("edgegate-gateway"),
            "gw-test",
            "old gateway.id in force"
        );
        assert_eq!(converted(m).1, 1, "old script in force");
    }
    let mut gw = gw;
    assert!(gw.is_running());
    assert_eq!(gw.terminate(), Some(0));
}

/// The classic field fix: a wrong broker address corrected by a reload, no restart. What was
/// buffered meanwhile is sent once the new producer reaches the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_broker_address_is_fixed_by_a_reload_and_the_backlog_is_sent() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decoder.js"), decoder(1)).unwrap();
    let mut setup = Setup::new(dir.path(), mqtt.port, format!("127.0.0.1:{}", free_port()));
    let config = setup.write();
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "dev").await;
    for n in 0..200 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 50))
            .await;
    }
    publisher.wait_acked(200, Duration::from_secs(10)).await;
    gw.wait_for("kafka link down", Duration::from_secs(30));

    setup.bootstrap = kafka.bootstrap();
    reload_ok(&setup.write(), "kafka (producer recreated)").await;
    let msgs = consume(&kafka.bootstrap(), "uplink", 200, Duration::from_secs(60));
    let plain: Vec<KafkaMessage> = msgs
        .iter()
        .map(|m| KafkaMessage {
            payload: converted(m).0,
            ..m.clone()
        })
        .collect();
    assert_complete_in_order(&plain, &["sensors/a".to_owned()], 200, false);
    assert_eq!(mqtt_connects(&gw, "plant"), 1, "{}", gw.log());
}

/// `edgegate reload` names the file it checked: a gateway running another one refuses (it would
/// re-read its own). Without [admin], `--pid` (the unit's $MAINPID) falls back to SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_its_file_and_falls_back_to_a_signal_without_an_admin_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decoder.js"), decoder(1)).unwrap();
    let setup = Setup::new(
        dir.path(),
        free_port(),
        format!("127.0.0.1:{}", free_port()),
    );
    let config = setup.write();
    let gw = Gateway::start(&config);
    gw.wait_for("edgegate ready", Duration::from_secs(10));
    let other = dir.path().join("staged.toml");
    std::fs::copy(&config, &other).unwrap();
    let (code, _, err) = reload(&other).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("this gateway runs") && err.contains("nothing was reloaded"),
        "{err}"
    );
    assert_eq!(gw.count("reloading the configuration"), 0, "{}", gw.log());
    // A web page (any request with an Origin) cannot reload: browsers resend basic credentials.
    let answer = post_from_a_page(setup.admin_port);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(gw.count("reloading the configuration"), 0, "{}", gw.log());
    reload_ok(&config, "converters").await;

    let text = std::fs::read_to_string(&config).unwrap();
    let start = text.find("[admin]").unwrap();
    std::fs::write(&other, &text[..start]).unwrap();
    let pid = gw.pid().unwrap().to_string();
    let out = edgegate()
        .args(["reload", "--pid", &pid, "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sent SIGHUP"),
        "{out:?}"
    );
    gw.wait_for_count("configuration reloaded", 2, Duration::from_secs(10));
}
