//! The MQTT source against a real mosquitto: PUBACK only after durability.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgegate::buffer::{self, Buffer};
use edgegate::config::{Config, SourceConfig};
use edgegate::metrics::Metrics;
use edgegate::sources::mqtt::{self, SourceContext};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use support::*;
use tokio_util::sync::CancellationToken;

fn source_config(port: u16) -> edgegate::config::MqttSourceConfig {
    source_config_with(port, "")
}

fn source_config_with(port: u16, extra: &str) -> edgegate::config::MqttSourceConfig {
    let text = format!(
        "[gateway]\nid = \"g\"\ndata_dir = \"/tmp/unused\"\n[kafka]\nbootstrap_servers = \"x:1\"\ntopic = \"t\"\n\
         [sources.s]\ntype = \"mqtt\"\nport = {port}\ntopics = [\"sensors/#\"]\nclient_id = \"durable-test\"\n{extra}"
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let SourceConfig::Mqtt(m) = config.sources["s"].clone() else {
        panic!("not mqtt")
    };
    m
}

/// Counts the messages mosquitto (re)delivers to a persistent session with this client id.
async fn redelivered_to(port: u16, client_id: &str) -> usize {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(false);
    let (_client, mut eventloop) = AsyncClient::new(o, 10);
    let mut n = 0;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(e) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = e {
                n += 1;
            }
        }
    })
    .await;
    n
}

/// Runs the source with the buffer's group commit running or not, publishes 20 messages, stops
/// the source, and returns how many mosquitto redelivers afterwards.
async fn redeliveries_after_run(commit: bool) -> usize {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) =
        Buffer::open(dir.path(), &Default::default(), metrics.clone()).unwrap();
    let shutdown = CancellationToken::new();
    // Without `buffer::run` nothing ever becomes durable: the intake is only held.
    let held_intake;
    let committer = if commit {
        held_intake = None;
        Some(tokio::spawn(buffer::run(
            buffer.clone(),
            intake,
            shutdown.clone(),
        )))
    } else {
        held_intake = Some(intake);
        None
    };
    let ctx = SourceContext {
        name: Arc::from("s"),
        client_id: "durable-test".into(),
        writer,
        metrics: metrics.clone(),
    };
    let source_shutdown = CancellationToken::new();
    let source = tokio::spawn(mqtt::run(
        source_config(broker.port),
        ctx,
        source_shutdown.clone(),
    ));
    let received = metrics.source_in("s");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let publisher = Publisher::connect(broker.port, "pub").await;
    for i in 0..20u64 {
        publisher
            .publish("sensors/x", payload("sensors/x", i, 50))
            .await;
    }
    publisher.wait_acked(20, Duration::from_secs(10)).await;
    while received.get() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    source_shutdown.cancel();
    source.await.unwrap().unwrap();
    shutdown.cancel();
    if let Some(c) = committer {
        c.await.unwrap().unwrap();
    }
    drop(held_intake);
    redelivered_to(broker.port, "durable-test").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_before_it_is_durable() {
    assert_eq!(redeliveries_after_run(false).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_messages_are_acknowledged_and_not_redelivered() {
    assert_eq!(redeliveries_after_run(true).await, 0);
}

fn openssl(dir: &Path, script: &str) {
    let ok = std::process::Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl failed: {script}");
}

fn make_ca(dir: &Path, name: &str) {
    openssl(dir, &format!("openssl req -x509 -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.pem -days 1 -subj /CN={name}"));
}

fn make_leaf(dir: &Path, name: &str, san: &str, ca: &str) {
    openssl(dir, &format!(
        "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} && \
         printf 'subjectAltName={san}' > {name}.ext && \
         openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 1 -extfile {name}.ext"
    ));
}

/// Runs the source over TLS (client certificate required) and returns how many of 5 messages it
/// received. `trusted_ca` is the CA file the source trusts.
async fn received_over_tls(trusted_ca: &str) -> u64 {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "ca");
    make_ca(certs.path(), "other-ca");
    make_leaf(certs.path(), "server", "IP:127.0.0.1,DNS:localhost", "ca");
    make_leaf(certs.path(), "client", "DNS:edgegate", "ca");
    let c = |f: &str| certs.path().join(f).display().to_string();
    let tls_port = free_port();
    // `user root`: mosquitto started as root would drop to its own user and lose access to the
    // key in our private temp dir (ignored when not started as root).
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\nuser root\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        c("ca.pem"),
        c("server.pem"),
        c("server.key")
    ));
    wait_for_port(tls_port, Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) =
        Buffer::open(dir.path(), &Default::default(), metrics.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let committer = tokio::spawn(buffer::run(buffer, intake, shutdown.clone()));
    let ctx = SourceContext {
        name: Arc::from("s"),
        client_id: "tls-test".into(),
        writer,
        metrics: metrics.clone(),
    };
    let tls = format!(
        "[sources.s.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        c(trusted_ca),
        c("client.pem"),
        c("client.key")
    );
    let source = tokio::spawn(mqtt::run(
        source_config_with(tls_port, &tls),
        ctx,
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let publisher = Publisher::connect(broker.port, "tls-pub").await;
    for i in 0..5u64 {
        publisher
            .publish("sensors/tls", payload("sensors/tls", i, 20))
            .await;
    }
    publisher.wait_acked(5, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = metrics.source_in("s").get();
    shutdown.cancel();
    source.await.unwrap().unwrap();
    committer.await.unwrap().unwrap();
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_receives_messages() {
    assert_eq!(received_over_tls("ca.pem").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_broker_signed_by_an_untrusted_ca() {
    assert_eq!(received_over_tls("other-ca.pem").await, 0);
}
