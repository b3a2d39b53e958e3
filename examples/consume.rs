//! Prints the records of a Kafka topic with their keys and edgegate headers.
//!
//! `cargo run --example consume -- BOOTSTRAP TOPIC [COUNT] [TIMEOUT_SECS]`
//! Reads from the beginning of every partition (assign, no consumer group).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: consume BOOTSTRAP TOPIC [COUNT] [TIMEOUT_SECS]");
    };
    let count: usize = rest
        .first()
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(usize::MAX);
    let timeout = Duration::from_secs(rest.get(1).map(|t| t.parse()).transpose()?.unwrap_or(10));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "edgegate-consume-example")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    while seen < count && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message?;
        seen += 1;
        println!(
            "--- partition {} offset {} timestamp {:?}",
            m.partition(),
            m.offset(),
            m.timestamp().to_millis()
        );
        if let Some(key) = m.key() {
            println!("key: {}", String::from_utf8_lossy(key));
        }
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                println!(
                    "header {}: {}",
                    h.key,
                    String::from_utf8_lossy(h.value.unwrap_or_default())
                );
            }
        }
        println!(
            "value: {}",
            String::from_utf8_lossy(m.payload().unwrap_or_default())
        );
    }
    eprintln!("{seen} record(s)");
    Ok(())
}
