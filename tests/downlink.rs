//! The downlink end to end: Kafka (Tansu) → encoder → an MQTT device behind mosquitto or a
//! serial device on a pseudo-terminal, with restarts, unplugged ports and bad commands.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::*;

/// A message as a device received it: topic, payload, QoS.
type Received = (String, Vec<u8>, QoS);

/// A device subscribed on mosquitto: what it received, with the QoS it arrived at.
struct Device {
    received: Arc<Mutex<Vec<Received>>>,
    _client: AsyncClient,
}

impl Device {
    async fn subscribe(port: u16, filter: &str) -> Device {
        let mut options = MqttOptions::new(format!("device-{}", free_port()), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (sink, subscribed) = (received.clone(), Arc::new(tokio::sync::Notify::new()));
        let ready = subscribed.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock()
                            .unwrap()
                            .push((p.topic, p.payload.to_vec(), p.qos));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => ready.notify_one(),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .expect("device subscription");
        Device {
            received,
            _client: client,
        }
    }

    fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        while self.received.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.messages()
    }
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    value: &[u8],
    headers: &[(&str, &[u8])],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::to(topic).payload(value).headers(h);
    if let Some(key) = key {
        record = record.key(key);
    }
    p.send(record, Duration::from_secs(10)).await.unwrap();
}

/// The gateway configuration of these tests: the `plant` MQTT source of `write_config`, a
/// downlink on `cmds` and an admin port; `extra` follows.
fn config(
    dir: &Path,
    mqtt: u16,
    kafka: &Tansu,
    admin: u16,
    downlink: &str,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [downlink]\ntopics = [\"cmds\"]\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n{downlink}\n{extra}"
    );
    write_config(dir, mqtt, &kafka.bootstrap(), "uplink", &text)
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

const JSON_ENCODER: &str = r#"
return {
  contentType: "JSON",
  data: JSON.stringify({method: msg.method, params: msg.params, n: metadata.n}),
  metadata: {deviceName: metadata.kafkaKey, transport: metadata.transport || "mqtt"}
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_an_mqtt_device_on_its_templated_topic_at_qos_1() {
    let (mqtt, kafka) = (Mosquitto::start(), Tansu::start());
    kafka.create_topic("cmds", 2);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let enc = script(dir.path(), "enc.js", JSON_ENCODER);
    let cfg = config(
        dir.path(),
        mqtt.port,
        &kafka,
        admin,
        "converter = \"commands\"\n\
         [[downlink.routes]]\nmatch = { transport = \"mqtt\" }\nsource = \"plant\"\ntopic = \"devices/${deviceName}/rpc\"\nqos = 1\n",
        &format!("[converters.commands]\ntype = \"encoder\"\nscript = \"{enc}\"\n"),
    );
    let device = Device::subscribe(mqtt.port, "devices/#").await;
    let gw = Gateway::start(&cfg);
    gw.wait_for("downlink consuming", Duration::from_secs(20));
    let p = producer(&kafka.bootstrap());
    produce(
        &p,
        "cmds",
        Some("pump-7"),
        br#"{"method":"setValve","params":{"open":true}}"#,
        &[("tb_msg_md_n", b"3")],
    )
    .await;
    let got = device.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "log:\n{}", gw.log());
    assert_eq!(got[0].0, "devices/pump-7/rpc");
    assert_eq!(
        got[0].1,
        br#"{"method":"setValve","params":{"open":true},"n":"3"}"#
    );
    assert_eq!(got[0].2, QoS::AtLeastOnce);
    wait_metric(
        admin,
        "edgegate_downlink_delivered_total",
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    assert_eq!(metric(admin, "edgegate_downlink_received_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_encoder_the_value_goes_as_is_in_order_per_device() {
    let (mqtt, kafka) = (Mosquitto::start(), Tansu::start());
    kafka.create_topic("cmds", 2);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = config(
        dir.path(),
        mqtt.port,
        &kafka,
        admin,
        "[[downlink.routes]]\nsource = \"plant\"\ntopic = \"devices/${kafkaKey}/raw\"\nqos = 2\n",
        "",
    );
    let device = Device::subscribe(mqtt.port, "devices/#").await;
    let gw = Gateway::start(&cfg);
    gw.wait_for("downlink consuming", Duration::from_secs(20));
    let p = producer(&kafka.bootstrap());
    for n in 0..100 {
        for key in ["a", "b", "c"] {
            produce(&p, "cmds", Some(key), format!("{key}-{n}").as_bytes(), &[]).await;
        }
    }
    let got = device.wait_for(300, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 300, "log:\n{}", gw.log());
    for key in ["a", "b", "c"] {
        let topic = format!("devices/{key}/raw");
        let seen: Vec<Vec<u8>> = got
            .iter()
            .filter(|(t, _, _)| *t == topic)
            .map(|(_, p, _)| p.clone())
            .collect();
        let expected: Vec<Vec<u8>> = (0..100)
            .map(|n| format!("{key}-{n}").into_bytes())
            .collect();
        assert_eq!(seen, expected, "{key}: not complete and in order");
    }
    assert!(got.iter().all(|(_, _, q)| *q == QoS::ExactlyOnce));
    wait_metric(
        admin,
        "edgegate_downlink_delivered_total",
        |v| v == 300.0,
        Duration::from_secs(10),
    );
}
