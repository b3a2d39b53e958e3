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
    let text = format!(
        "[gateway]\nid = \"g\"\ndata_dir = \"/tmp/unused\"\n[kafka]\nbootstrap_servers = \"x:1\"\ntopic = \"t\"\n\
         [sources.s]\ntype = \"mqtt\"\nport = {port}\ntopics = [\"sensors/#\"]\nclient_id = \"durable-test\"\n"
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let SourceConfig::Mqtt(m) = config.sources["s"].clone();
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
        c.await.unwrap();
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
