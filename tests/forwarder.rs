//! The forwarder against librdkafka's mock cluster, which can inject produce errors: records are
//! resent after retryable failures, dropped (and counted) only when Kafka refuses them for good.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgegate::buffer::{self, Buffer};
use edgegate::config::Config;
use edgegate::converter::Converters;
use edgegate::forwarder;
use edgegate::metrics::{DropReason, Metrics};
use edgegate::record::{now_ms, NewRecord, SourceType};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::*;
use tokio_util::sync::CancellationToken;

struct Harness {
    buffer: Buffer,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Buffers `n` records, then starts the forwarder against `bootstrap`.
async fn forward(bootstrap: &str, n: u32) -> Harness {
    forward_with(bootstrap, n, "").await
}

/// As [`forward`], with extra configuration (`{dir}` stands for the data directory).
async fn forward_with(bootstrap: &str, n: u32, extra: &str) -> Harness {
    let payloads = (0..n).map(|i| payload("sensors/a", u64::from(i), 50));
    forward_payloads(bootstrap, payloads.collect(), extra).await
}

/// Buffers one record per payload (topic `sensors/a`), then starts the forwarder.
async fn forward_payloads(bootstrap: &str, payloads: Vec<Vec<u8>>, extra: &str) -> Harness {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\n\
         topic = \"uplink\"\ncreate_topic = false\n{}",
        dir.path().display(),
        extra.replace("{dir}", &dir.path().display().to_string())
    );
    let config = Arc::new(Config::parse(&text, Path::new("t.toml")).unwrap());
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) =
        Buffer::open(dir.path(), &config.buffer, metrics.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let committer = tokio::spawn({
        let committing = buffer::run(buffer.clone(), intake, shutdown.clone());
        async move { committing.await.unwrap() }
    });
    let mut pending = Vec::new();
    for payload in payloads {
        let record = NewRecord {
            captured_ms: now_ms(),
            source: Arc::from("s"),
            source_type: SourceType::Mqtt,
            meta: vec![("topic".into(), "sensors/a".into())],
            payload,
        };
        pending.push(writer.submit(record).await.unwrap());
    }
    for p in pending {
        p.durable().await.unwrap();
    }
    drop(writer);
    let f = tokio::spawn({
        let (b, m, s) = (buffer.clone(), metrics.clone(), shutdown.clone());
        let converters = Converters::start(&config, m.clone()).unwrap();
        // No reloads here: the sender is gone, which the forwarder takes as "never".
        let (_, reloads) = tokio::sync::mpsc::channel(1);
        async move {
            forwarder::run(config, b, converters, m, reloads, s)
                .await
                .unwrap()
        }
    });
    Harness {
        buffer,
        metrics,
        shutdown,
        tasks: vec![committer, f],
        _dir: dir,
    }
}

impl Harness {
    async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.buffer.stats().records > 0 {
            assert!(
                Instant::now() < deadline,
                "buffer not drained: {:?}",
                self.buffer.stats()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_failures_are_retried_until_everything_is_delivered_in_order() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    // The first produce requests are refused as if the ACL were missing, then it is fixed.
    let refusals = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3];
    cluster.request_errors(RDKafkaApiKey::Produce, &refusals);
    let h = forward(&cluster.bootstrap_servers(), 200).await;
    h.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(h.metrics.dropped_total(), 0);
    assert!(h.metrics.records_out.get() >= 200);
    let msgs = consume_distinct(
        &cluster.bootstrap_servers(),
        "uplink",
        200,
        Duration::from_secs(30),
    );
    assert_complete_in_order(&msgs, &["sensors/a".to_owned()], 200, true);
    h.stop().await;
}

/// Records Kafka refuses for good (invalid) are counted once each, not resent, and the others
/// all arrive: every record is either delivered or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanently_refused_records_are_dropped_counted_once_and_do_not_stall_the_rest() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    let h = forward(&cluster.bootstrap_servers(), 50).await;
    h.wait_drained(Duration::from_secs(30)).await;
    let rejected = h.metrics.dropped(DropReason::RejectedByKafka);
    assert!(rejected >= 1, "the refused batch was not counted");
    assert_eq!(h.metrics.records_out.get() + rejected, 50);
    h.stop().await;
}

/// The broker refuses a whole batch as too large (as Kafka does when its limit is below the
/// producer's): the batch is resent one record per batch, and only the record refused alone is
/// dropped and counted; every other record arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_as_too_large_loses_only_the_record_refused_alone() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    // The first request (the batch), then the first record resent alone.
    let too_large = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 2];
    cluster.request_errors(RDKafkaApiKey::Produce, &too_large);
    let n = 50;
    let h = forward(&cluster.bootstrap_servers(), n).await;
    h.wait_drained(Duration::from_secs(60)).await;
    // Usually one batch takes all records: it is refused, and then the first record resent alone.
    // On a loaded machine librdkafka may send two batches, each refused once: then no record is
    // refused alone and none may be dropped. Never more than one.
    let dropped = h.metrics.dropped(DropReason::TooLarge);
    assert!(dropped <= 1, "{dropped} records dropped as too large");
    assert_eq!(h.metrics.dropped_total(), dropped);
    let msgs = consume_distinct(
        &cluster.bootstrap_servers(),
        "uplink",
        (u64::from(n) - dropped) as usize,
        Duration::from_secs(30),
    );
    let counters = first_copies(&msgs);
    assert_eq!(counters, (dropped..u64::from(n)).collect::<Vec<_>>());
    h.stop().await;
}

/// Entities of converted records survive refusals and rewinds complete and in order, with the
/// converter reading ahead of the producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_records_are_resent_in_order_after_refusals() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    let refusals = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4];
    cluster.request_errors(RDKafkaApiKey::Produce, &refusals);
    let script = decoder_file("return {deviceName: 'd', telemetry: {p: decodeToString(payload)}};");
    let extra = format!(
        "[sources.s]\ntype = \"serial\"\npath = \"/dev/unused\"\nconverter = \"c\"\n\
         [converters.c]\nscript = \"{}\"\n",
        script.path().display()
    );
    let n = 2000;
    let h = forward_with(&cluster.bootstrap_servers(), n, &extra).await;
    // Each refusal recreates the producer after a growing backoff: about a minute in all.
    h.wait_drained(Duration::from_secs(180)).await;
    assert_eq!(h.metrics.dropped_total(), 0);
    let msgs = consume_until(
        &cluster.bootstrap_servers(),
        "uplink",
        Duration::from_secs(30),
        |m| {
            m.iter()
                .map(|m| m.seq())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= n as usize
        },
    );
    // Check the converted values exactly as raw payloads would be checked.
    let decoded: Vec<KafkaMessage> = msgs
        .into_iter()
        .map(|mut m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            m.payload = v["telemetry"][0]["values"]["p"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec();
            assert_eq!(m.header("edgegate-converter"), "c");
            m
        })
        .collect();
    assert_complete_in_order(&decoded, &["sensors/a".to_owned()], u64::from(n), true);
    h.stop().await;
}

/// A decoder that needs `ms` of CPU for every record, well under its timeout.
fn slow_decoder(ms: u64) -> tempfile::NamedTempFile {
    let script = decoder_file(format!(
        "var end = Date.now() + {ms}; while (Date.now() < end) {{}}\n\
         return {{deviceName: 'd', telemetry: {{p: decodeToString(payload)}}}};"
    ));
    script
}

fn converter_extra(script: &Path, converter: &str) -> String {
    format!(
        "[sources.s]\ntype = \"serial\"\npath = \"/dev/unused\"\nconverter = \"c\"\n\
         [converters.c]\nscript = \"{}\"\n{converter}\n",
        script.display()
    )
}

/// A chunk of slow but valid records takes far longer than the watchdog interval in all, yet
/// every record is progress: the watched conversion never runs longer than one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chunk_of_slow_valid_records_keeps_the_watchdog_fed() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    let script = slow_decoder(20);
    let extra = converter_extra(script.path(), "timeout = \"1s\"");
    let n = 60;
    let started = Instant::now();
    let h = forward_with(&cluster.bootstrap_servers(), n, &extra).await;
    let watchdog_interval = Duration::from_millis(400);
    let mut worst = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.buffer.stats().records > 0 {
        assert!(Instant::now() < deadline, "not drained");
        if let Some((stage, running)) = h.metrics.health.stalled(watchdog_interval) {
            worst = Some((stage, running));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The records took longer than the interval, so a per-chunk timing would have stalled.
    assert!(started.elapsed() > watchdog_interval * 2);
    assert_eq!(worst, None, "watchdog would have withheld its pings");
    assert_eq!(h.metrics.dropped_total(), 0);
    h.stop().await;
}

/// The sorted, distinct payload counters of converted records (`telemetry.p` holds the payload).
fn converted_counters(bootstrap: &str, expected: usize) -> Vec<KafkaMessage> {
    let msgs = consume_until(bootstrap, "uplink", Duration::from_secs(30), |m| {
        m.iter()
            .map(|m| m.seq())
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= expected
    });
    msgs.into_iter()
        .map(|mut m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            m.payload = v["telemetry"][0]["values"]["p"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec();
            m
        })
        .collect()
}

/// A decoder script in a temporary file (removed when dropped).
fn decoder_file(body: impl AsRef<[u8]>) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    file
}

/// The test counters of the messages, each sequence number's first copy only (resends after a
/// refusal or rewind are duplicates with the same seq).
fn first_copies(msgs: &[KafkaMessage]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    msgs.iter()
        .filter(|m| seen.insert(m.seq()))
        .map(|m| parse_payload(&m.payload).1)
        .collect()
}

/// A decoder that runs past its timeout on every record until `until_ms` (a stall of the
/// machine, as far as the gateway can tell), then converts normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_timing_out_during_a_stall_are_retried_in_order_and_none_is_dropped() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    // The mock cluster does not answer DescribeConfigs: conversions start after its 5 s timeout.
    let until_ms = now_ms() + 8000;
    let script = decoder_file(format!(
        "if (Date.now() < {until_ms}) {{ while (true) {{}} }}\n\
         return {{deviceName: 'd', telemetry: {{p: decodeToString(payload)}}}};"
    ));
    // Attempts at about 5 s and 9 s: the first times out, the stall is over by the second.
    let extra = converter_extra(
        script.path(),
        "timeout = \"100ms\"\ntimeout_retry_delay = \"4s\"",
    );
    let n = 50;
    let h = forward_with(&cluster.bootstrap_servers(), n, &extra).await;
    h.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(h.metrics.dropped_total(), 0);
    assert!(
        h.metrics.converter_errors_total("c") >= 1,
        "the decoder never timed out: the test proves nothing"
    );
    let msgs = converted_counters(&cluster.bootstrap_servers(), n as usize);
    // Held records are resent, those delivered before them are not: no duplicates either.
    assert_complete_in_order(&msgs, &["sensors/a".to_owned()], u64::from(n), false);
    h.stop().await;
}

/// A record the decoder never finishes is given up after three timeouts (counted by reason);
/// the records around it all arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_timing_out_three_times_is_dropped_by_reason_and_the_rest_arrives() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    let script = decoder_file(
        "var p = decodeToString(payload);\n\
     if (p.split('#')[1] === '7') { while (true) {} }\n\
     return {deviceName: 'd', telemetry: {p: p}};",
    );
    let extra = converter_extra(
        script.path(),
        "timeout = \"100ms\"\ntimeout_retry_delay = \"300ms\"",
    );
    let n = 30;
    let h = forward_with(&cluster.bootstrap_servers(), n, &extra).await;
    h.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(h.metrics.dropped(DropReason::ConverterTimeout), 1);
    assert_eq!(h.metrics.dropped_total(), 1);
    let msgs = converted_counters(&cluster.bootstrap_servers(), n as usize - 1);
    let counters = first_copies(&msgs);
    let expected: Vec<u64> = (0..u64::from(n)).filter(|&i| i != 7).collect();
    assert_eq!(counters, expected);
    h.stop().await;
}

/// Records too large for Kafka between normal ones, against a real broker: one above
/// `kafka.max_record_bytes`, one below it but above the topic's `max.message.bytes` (learnt from
/// the broker). Both are refused alone and counted; every normal record arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_kafka_are_counted_and_take_no_other_record_with_them() {
    let kafka = Tansu::start();
    kafka.create_topic_with("uplink", 1, &[("max.message.bytes", "300000")]);
    let mut payloads = Vec::new();
    let mut n = 0;
    for big in [1536 * 1024, 400 * 1000] {
        for _ in 0..10 {
            payloads.push(payload("sensors/a", n, 200));
            n += 1;
        }
        // Would break the counters' order if it arrived.
        payloads.push(payload("sensors/a", 1_000_000 + n, big));
    }
    for _ in 0..10 {
        payloads.push(payload("sensors/a", n, 200));
        n += 1;
    }
    let h = forward_payloads(&kafka.bootstrap(), payloads, "").await;
    h.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(h.metrics.dropped(DropReason::TooLarge), 2);
    assert_eq!(h.metrics.dropped_total(), 2);
    // Tansu's high watermark can lag: count what reads back.
    let msgs = consume_distinct(
        &kafka.bootstrap(),
        "uplink",
        n as usize,
        Duration::from_secs(30),
    );
    assert_complete_in_order(&msgs, &["sensors/a".to_owned()], n, false);
    h.stop().await;
}

/// A record refused locally as too large is counted once, even when its chunk is resent after a
/// retryable failure of the records around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_record_is_counted_once_through_rewinds() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("uplink", 1, 1).unwrap();
    let refusals = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED];
    cluster.request_errors(RDKafkaApiKey::Produce, &refusals);
    let mut payloads: Vec<Vec<u8>> = (0..5).map(|i| payload("sensors/a", i, 100)).collect();
    payloads.push(payload("sensors/a", 1_000_000, 1536 * 1024));
    payloads.extend((5..10).map(|i| payload("sensors/a", i, 100)));
    let h = forward_payloads(&cluster.bootstrap_servers(), payloads, "").await;
    h.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(h.metrics.dropped(DropReason::TooLarge), 1);
    assert_eq!(h.metrics.dropped_total(), 1);
    let msgs = consume_distinct(
        &cluster.bootstrap_servers(),
        "uplink",
        10,
        Duration::from_secs(30),
    );
    assert_complete_in_order(&msgs, &["sensors/a".to_owned()], 10, true);
    h.stop().await;
}
