//! The durable Tansu of the test support (object store storage, `Tansu::start_durable`) keeps
//! what a real Kafka broker keeps across a restart: records and their offsets, an idempotent
//! producer's id and sequence numbers, and a consumer group's committed offsets.

mod support;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use support::*;

fn produce(producer: &BaseProducer, from: u64, to: u64) {
    for n in from..to {
        producer
            .send(BaseRecord::<(), _>::to("durable").payload(&payload("p", n, 0)))
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

#[test]
fn records_producers_and_offsets_survive_a_restart() {
    let mut kafka = Tansu::start_durable();
    kafka.create_topic("durable", 1);
    // One idempotent producer across the restart: a broker that forgot its id or sequence
    // numbers would fail it fatally or drop its batches as duplicates.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    produce(&producer, 0, 100);
    let bootstrap = kafka.bootstrap();
    let group = || -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "durable-group")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap()
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("durable", 0, Offset::Offset(40))
        .unwrap();
    group().commit(&tpl, CommitMode::Sync).unwrap();

    kafka.restart();

    produce(&producer, 100, 150);
    let msgs = consume(&kafka.bootstrap(), "durable", 150, Duration::from_secs(60));
    let got: Vec<(i64, u64)> = msgs
        .iter()
        .map(|m| (m.offset, parse_payload(&m.payload).1))
        .collect();
    let expected: Vec<(i64, u64)> = (0..150).map(|n| (n as i64, n)).collect();
    assert_eq!(got, expected, "records and offsets after the restart");
    let committed = group()
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        committed.find_partition("durable", 0).map(|p| p.offset()),
        Some(Offset::Offset(40))
    );
}
