//! The MQTT source against a real mosquitto: PUBACK only after durability.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgegate::buffer::{self, Buffer};
use edgegate::config::{Config, SourceConfig};
use edgegate::metrics::DropReason;
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
    logs();
    // Tests run side by side and share the log: the source's name tells them apart.
    let name = if commit { "committed" } else { "held" };
    let ctx = SourceContext {
        name: Arc::from(name),
        client_id: "durable-test".into(),
        writer,
        metrics: metrics.clone(),
        outlet: Default::default(),
    };
    let source_shutdown = CancellationToken::new();
    let source = tokio::spawn(mqtt::run(
        source_config(broker.port),
        ctx,
        source_shutdown.clone(),
    ));
    let received = metrics.source_in(name);
    // Messages published before the subscription exists would never reach the session.
    let subscribed = format!("source=\"{name}\"");
    wait_logged(&["mqtt subscribed", &subscribed], Duration::from_secs(10)).await;

    let publisher = Publisher::connect(broker.port, "pub").await;
    for i in 0..20u64 {
        publisher
            .publish("sensors/x", payload("sensors/x", i, 50))
            .await;
    }
    publisher.wait_acked(20, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while received.get() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "received {}",
            received.get()
        );
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

/// What the source logged, for every test in this file (tracing has one global subscriber).
fn logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a logged line contains every one of `needles`.
fn logged(needles: &[&str]) -> bool {
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

async fn wait_logged(needles: &[&str], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !logged(needles) {
        assert!(
            std::time::Instant::now() < deadline,
            "never logged {needles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a TLS source ended up: connected and received this many of 5 messages, or refused.
#[derive(Debug, PartialEq, Eq)]
enum OverTls {
    Received(u64),
    CertificateRefused,
}

/// Runs the source over TLS (client certificate required) and publishes 5 messages. `trusted_ca`
/// is the CA file the source trusts.
async fn received_over_tls(trusted_ca: &str) -> OverTls {
    logs();
    // Tests run side by side and share the log: each source gets a name of its own.
    let name = trusted_ca.trim_end_matches(".pem");
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
        name: Arc::from(name),
        client_id: "tls-test".into(),
        writer,
        metrics: metrics.clone(),
        outlet: Default::default(),
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
    let connected = format!("edgegate_source_connected{{source=\"{name}\"}} 1");
    // rustls: "invalid peer certificate: UnknownIssuer".
    let source_field = format!("source={name} ");
    let refused = [source_field.as_str(), "invalid peer certificate"];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !metrics.encode().contains(&connected) && !logged(&refused) {
        assert!(
            std::time::Instant::now() < deadline,
            "neither connected nor refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = if logged(&refused) {
        OverTls::CertificateRefused
    } else {
        let publisher = Publisher::connect(broker.port, "tls-pub").await;
        for i in 0..5u64 {
            publisher
                .publish("sensors/tls", payload("sensors/tls", i, 20))
                .await;
        }
        publisher.wait_acked(5, Duration::from_secs(10)).await;
        let received = metrics.source_in(name);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while received.get() < 5 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        OverTls::Received(received.get())
    };
    shutdown.cancel();
    source.await.unwrap().unwrap();
    committer.await.unwrap().unwrap();
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_receives_messages() {
    assert_eq!(received_over_tls("ca.pem").await, OverTls::Received(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_broker_signed_by_an_untrusted_ca() {
    assert_eq!(
        received_over_tls("other-ca.pem").await,
        OverTls::CertificateRefused
    );
}

/// A source and its buffer, in this process. The buffer's intake is held (nothing becomes
/// durable) until `start_commits`.
struct Rig {
    buffer: Buffer,
    writer: edgegate::buffer::BufferWriter,
    metrics: Arc<Metrics>,
    intake: Option<edgegate::buffer::Intake>,
    shutdown: CancellationToken,
    committer: Option<tokio::task::JoinHandle<Result<(), edgegate::buffer::BufferError>>>,
    source: Option<(
        tokio::task::JoinHandle<Result<(), mqtt::MqttError>>,
        CancellationToken,
    )>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (buffer, writer, intake) =
            Buffer::open(dir.path(), &Default::default(), metrics.clone()).unwrap();
        Rig {
            buffer,
            writer,
            metrics,
            intake: Some(intake),
            shutdown: CancellationToken::new(),
            committer: None,
            source: None,
            _dir: dir,
        }
    }

    fn start_commits(&mut self) {
        let intake = self.intake.take().unwrap();
        self.committer = Some(tokio::spawn(buffer::run(
            self.buffer.clone(),
            intake,
            self.shutdown.clone(),
        )));
    }

    fn start_source(&mut self, config: edgegate::config::MqttSourceConfig) {
        let ctx = SourceContext {
            name: Arc::from("s"),
            client_id: "durable-test".into(),
            writer: self.writer.clone(),
            metrics: self.metrics.clone(),
            outlet: Default::default(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(mqtt::run(config, ctx, stop.clone()));
        self.source = Some((task, stop));
    }

    /// Like `kill -9` for the source: no ack flushed, no DISCONNECT, its rumqttc state gone.
    async fn crash_source(&mut self) {
        let (task, _) = self.source.take().unwrap();
        task.abort();
        let _ = task.await;
    }

    async fn stop_source(&mut self) {
        let (task, stop) = self.source.take().unwrap();
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    fn received(&self) -> u64 {
        self.metrics.source_in("s").get()
    }

    async fn wait_received(&self, n: u64, timeout: Duration) {
        wait_until(
            timeout,
            || self.received() >= n,
            || format!("source received {} of {n}", self.received()),
        )
        .await;
    }

    /// Every record stored so far, oldest first.
    fn stored(&self) -> Vec<edgegate::record::Record> {
        let mut out = Vec::new();
        while let Some(chunk) = self.buffer.try_next_chunk().unwrap() {
            out.extend(chunk.records);
        }
        out
    }
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The (topic, counter) of each stored record.
fn counters(records: &[edgegate::record::Record]) -> Vec<(String, u64)> {
    records.iter().map(|r| parse_payload(&r.payload)).collect()
}

fn all_of(topic: &str, n: u64) -> std::collections::BTreeSet<(String, u64)> {
    (0..n).map(|i| (topic.to_owned(), i)).collect()
}

/// One MQTT packet seen by the [`Tap`]: its connection (0, 1, ... in accept order), direction,
/// type (4 = PUBACK, 3 = PUBLISH...), packet id, and how many records were durable then.
#[derive(Debug, Clone)]
struct Tapped {
    conn: usize,
    to_broker: bool,
    kind: u8,
    pkid: Option<u16>,
    durable: u64,
}

/// A TCP relay to mosquitto that records the MQTT packets crossing it, each before forwarding it.
struct Tap {
    port: u16,
    seen: Arc<std::sync::Mutex<Vec<Tapped>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    async fn start(upstream: u16, durable: impl Fn() -> u64 + Send + Sync + 'static) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let durable = Arc::new(durable);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            for conn in 0.. {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (br, bw) = broker.into_split();
                tokio::spawn(tap_relay(cr, bw, conn, true, log.clone(), durable.clone()));
                tokio::spawn(tap_relay(br, cw, conn, false, log.clone(), durable.clone()));
            }
        });
        Tap { port, seen, task }
    }

    fn seen(&self) -> Vec<Tapped> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, conn: usize, to_broker: bool, kind: u8) -> usize {
        self.seen()
            .iter()
            .filter(|t| t.conn == conn && t.to_broker == to_broker && t.kind == kind)
            .count()
    }
}

async fn tap_relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: usize,
    to_broker: bool,
    seen: Arc<std::sync::Mutex<Vec<Tapped>>>,
    durable: Arc<impl Fn() -> u64 + Send + Sync + 'static>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some((kind, pkid, len)) = mqtt_frame(&pending) {
            seen.lock().unwrap().push(Tapped {
                conn,
                to_broker,
                kind,
                pkid,
                durable: durable(),
            });
            pending.drain(..len);
        }
        if to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The first complete MQTT packet in `b`: (type, packet id if it has one, length).
fn mqtt_frame(b: &[u8]) -> Option<(u8, Option<u16>, usize)> {
    let (mut remaining, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let byte = *b.get(i)?;
        remaining |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let len = i + remaining;
    if b.len() < len {
        return None;
    }
    let kind = b[0] >> 4;
    let u16_at = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let pkid = match kind {
        3 if (b[0] >> 1) & 3 > 0 => Some(u16_at(i + 2 + usize::from(u16_at(i)))),
        4..=7 => Some(u16_at(i)),
        _ => None,
    };
    Some((kind, pkid, len))
}

async fn publish_all(publisher: &Publisher, topic: &str, range: std::ops::Range<u64>) {
    for i in range {
        publisher.publish(topic, payload(topic, i, 50)).await;
    }
}

/// Issue 13: records received on one connection become durable only after the broker lost the
/// session and the source reconnected, and the broker gave the same packet ids to new messages.
/// Their acks must not be sent on the new connection: they would acknowledge the new messages,
/// possibly before those are durable. Nothing is lost: the old records are stored all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_a_lost_connection_are_not_sent_on_the_next() {
    let mut broker = Mosquitto::start();
    let mut rig = Rig::new();
    let buffer = rig.buffer.clone();
    let tap = Tap::start(broker.port, move || buffer.stats().records).await;
    rig.start_source(source_config(tap.port));
    let tap = &tap;
    let subscribed = |conn| move || tap.count(conn, false, 9) > 0;
    wait_until(Duration::from_secs(10), subscribed(0), || {
        "no SUBACK".into()
    })
    .await;

    let publisher = Publisher::connect(broker.port, "pub").await;
    publish_all(&publisher, "sensors/a", 0..20).await;
    rig.wait_received(20, Duration::from_secs(10)).await;

    // Without persistence the restarted broker knows nothing of the session.
    broker.kill_and_restart();
    wait_until(Duration::from_secs(20), subscribed(1), || {
        "no SUBACK after restart".into()
    })
    .await;
    let publisher = Publisher::connect(broker.port, "pub").await;
    publish_all(&publisher, "sensors/b", 0..20).await;
    rig.wait_received(40, Duration::from_secs(10)).await;

    rig.start_commits();
    wait_until(
        Duration::from_secs(10),
        || rig.buffer.stats().records == 40,
        || "records not durable".into(),
    )
    .await;
    // A clean stop flushes every ack the source will ever send.
    rig.stop_source().await;

    let seen: Vec<Tapped> = tap.seen().into_iter().filter(|t| t.conn == 1).collect();
    let published: Vec<u16> = seen
        .iter()
        .filter(|t| !t.to_broker && t.kind == 3)
        .filter_map(|t| t.pkid)
        .collect();
    assert_eq!(published.len(), 20, "{seen:?}");
    let acks: Vec<&Tapped> = seen.iter().filter(|t| t.to_broker && t.kind == 4).collect();
    let mut acked: Vec<u16> = acks.iter().filter_map(|t| t.pkid).collect();
    acked.sort_unstable();
    let mut expected = published.clone();
    expected.sort_unstable();
    assert_eq!(acked, expected, "each new message acked exactly once");
    for ack in acks {
        // The n-th message of the new connection is record 20 + n.
        let n = published.iter().position(|p| Some(*p) == ack.pkid).unwrap() as u64 + 1;
        assert!(
            ack.durable >= 20 + n,
            "PUBACK {ack:?} before its record was durable"
        );
    }
    let stored: std::collections::BTreeSet<_> = counters(&rig.stored()).into_iter().collect();
    let mut all = all_of("sensors/a", 20);
    all.extend(all_of("sensors/b", 20));
    assert_eq!(stored, all);
    assert_eq!(redelivered_to(broker.port, "durable-test").await, 0);
}

/// Issue 13: a message the broker redelivers after a crash is stored again under a new seq; it is
/// marked (metadata `redelivered`, Kafka header `edgegate-redelivered: 1`) and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_redeliveries_are_marked_and_counted() {
    let broker = Mosquitto::start();
    let mut rig = Rig::new();
    rig.start_source(source_config(broker.port));
    let publisher = Publisher::connect(broker.port, "pub").await;
    wait_until(
        Duration::from_secs(10),
        || {
            rig.metrics
                .encode()
                .contains("edgegate_source_connected{source=\"s\"} 1")
        },
        || "not connected".into(),
    )
    .await;
    // Give the subscription a moment to land: retry until the first message arrives.
    let mut sent = 0;
    while rig.received() == 0 {
        assert!(sent < 100, "subscription never took effect");
        publisher
            .publish("sensors/warmup", payload("sensors/warmup", sent, 10))
            .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.wait_received(sent, Duration::from_secs(10)).await;
    publish_all(&publisher, "sensors/x", 0..5).await;
    rig.wait_received(sent + 5, Duration::from_secs(10)).await;
    // Stored, never acknowledged: the crash comes first.
    rig.crash_source().await;
    rig.start_commits();
    rig.start_source(source_config(broker.port));
    rig.wait_received(2 * (sent + 5), Duration::from_secs(15))
        .await;
    wait_until(
        Duration::from_secs(10),
        || rig.buffer.stats().records == 2 * (sent + 5),
        || "not durable".into(),
    )
    .await;
    rig.stop_source().await;

    let records = rig.stored();
    let (first, again) = records.split_at((sent + 5) as usize);
    assert!(first.iter().all(|r| r.meta("redelivered").is_none()));
    assert!(
        again.iter().all(|r| r.meta("redelivered") == Some("1")),
        "{again:?}"
    );
    assert_eq!(counters(first), counters(again));
    assert_eq!(rig.metrics.mqtt_redelivered("s").get(), sent + 5);
    assert!(rig.metrics.encode().contains(&format!(
        "edgegate_mqtt_redelivered_total{{source=\"s\"}} {}",
        sent + 5
    )));
}

/// Issue 13: a message over `max_payload_bytes` (2 MiB by default) used to fail the connection,
/// and the broker redelivered it first on every reconnect. It is acknowledged, counted and
/// dropped; the messages around it are stored and the source goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_acknowledged_counted_and_dropped() {
    let broker = Mosquitto::start();
    let mut rig = Rig::new();
    rig.start_commits();
    let buffer = rig.buffer.clone();
    let tap = Tap::start(broker.port, move || buffer.stats().records).await;
    rig.start_source(source_config(tap.port));
    wait_until(
        Duration::from_secs(10),
        || tap.count(0, false, 9) > 0,
        || "no SUBACK".into(),
    )
    .await;
    let publisher = Publisher::connect(broker.port, "pub").await;
    publish_all(&publisher, "sensors/x", 0..5).await;
    publisher
        .publish("sensors/big", payload("sensors/big", 0, 3 << 20))
        .await;
    publish_all(&publisher, "sensors/x", 5..10).await;
    publisher.wait_acked(11, Duration::from_secs(10)).await;

    rig.wait_received(10, Duration::from_secs(15)).await;
    wait_until(
        Duration::from_secs(10),
        || rig.buffer.stats().records >= 10,
        || "not durable".into(),
    )
    .await;
    rig.stop_source().await;

    assert_eq!(rig.metrics.dropped(DropReason::TooLarge), 1);
    assert!(rig
        .metrics
        .encode()
        .contains("edgegate_records_dropped_total{reason=\"too_large\"} 1"));
    let stored: Vec<_> = counters(&rig.stored());
    assert_eq!(
        stored,
        all_of("sensors/x", 10).into_iter().collect::<Vec<_>>()
    );
    // One connection all along, and the big message acknowledged: it is not redelivered.
    assert_eq!(tap.count(1, true, 1), 0, "the source reconnected");
    assert_eq!(tap.count(0, true, 4), 11);
    assert_eq!(redelivered_to(broker.port, "durable-test").await, 0);
}

fn qos(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// Publishes `topic`#0..10 at QoS `q` and waits until the broker has them. Under QoS 0 nothing
/// queues for an offline subscriber, so it first waits until the source receives again: probes
/// go out until one arrives (the guarantee is only "no wedge").
async fn publish_batch(rig: &Rig, broker: &Mosquitto, q: u8, topic: &str) {
    let publisher = Publisher::connect(broker.port, &format!("pub-{topic}")).await;
    if q == 0 {
        let before = rig.received();
        let mut probes = 0;
        while rig.received() == before {
            assert!(probes < 300, "QoS 0 source never received again: wedged");
            publisher
                .publish_qos(
                    "sensors/probe",
                    qos(0),
                    payload("sensors/probe", probes, 10),
                )
                .await;
            probes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for i in 0..10 {
        publisher
            .publish_qos(topic, qos(q), payload(topic, i, 50))
            .await;
    }
    if q > 0 {
        publisher.wait_acked(10, Duration::from_secs(10)).await;
    } else {
        let before = rig.received();
        rig.wait_received(before + 10, Duration::from_secs(10))
            .await;
    }
}

/// Issue 13: at each QoS the source survives a broker restart, a `kill -9` of itself and a cut
/// connection, each right after a batch was published (messages in flight). QoS 1 and 2 lose
/// nothing; QoS 0 receives again after each (no wedge). QoS 2 used to wedge when a PUBREL of an
/// earlier connection came back (see `a_pubrel_left_by_a_crashed_gateway_is_answered`).
async fn survives_restarts_crashes_and_reconnects(q: u8) {
    let mut broker = Mosquitto::start_persistent();
    let proxy = Proxy::start(free_port(), broker.port);
    let mut rig = Rig::new();
    rig.start_commits();
    let config = source_config_with(proxy.port, &format!("qos = {q}\nreconnect_max = \"1s\"\n"));
    rig.start_source(config.clone());
    let connected = |rig: &Rig| {
        rig.metrics
            .encode()
            .contains("edgegate_source_connected{source=\"s\"} 1")
    };
    wait_until(
        Duration::from_secs(10),
        || connected(&rig),
        || "not connected".into(),
    )
    .await;
    if q > 0 {
        // The subscription must exist before anything is published; a first batch proves it.
        publish_batch(&rig, &broker, q, "sensors/warmup").await;
        rig.wait_received(10, Duration::from_secs(10)).await;
    }

    publish_batch(&rig, &broker, q, "sensors/before-restart").await;
    broker.restart();
    publish_batch(&rig, &broker, q, "sensors/before-crash").await;
    rig.crash_source().await;
    rig.start_source(config.clone());
    publish_batch(&rig, &broker, q, "sensors/before-cut").await;
    proxy.set(ProxyMode::Cut);
    wait_until(
        Duration::from_secs(10),
        || !connected(&rig),
        || "still connected".into(),
    )
    .await;
    proxy.set(ProxyMode::Up);
    publish_batch(&rig, &broker, q, "sensors/after-cut").await;

    let topics = [
        "sensors/before-restart",
        "sensors/before-crash",
        "sensors/before-cut",
        "sensors/after-cut",
    ];
    let mut expected = std::collections::BTreeSet::new();
    for t in topics {
        expected.extend(all_of(t, 10));
    }
    // QoS 0: only what was published while connected is owed; the last batch was.
    let owed = if q == 0 {
        all_of("sensors/after-cut", 10)
    } else {
        expected
    };
    let mut stored = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        stored.extend(counters(&rig.stored()));
        if owed.is_subset(&stored) {
            break;
        }
        let missing: Vec<_> = owed.difference(&stored).collect();
        assert!(std::time::Instant::now() < deadline, "missing: {missing:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.stop_source().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_survives_restarts_crashes_and_reconnects() {
    survives_restarts_crashes_and_reconnects(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_survives_restarts_crashes_and_reconnects() {
    survives_restarts_crashes_and_reconnects(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_survives_restarts_crashes_and_reconnects() {
    survives_restarts_crashes_and_reconnects(2).await;
}

/// Plays a gateway that subscribed at QoS 2 with the source's client id, answered one message's
/// PUBLISH with PUBREC, received the broker's PUBREL and died before its PUBCOMP.
fn crash_between_pubrec_and_pubcomp(port: u16, publish_one: impl FnOnce()) {
    use rumqttc::{Connect, PubRec, Subscribe};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = tokio_util::bytes::BytesMut::new();
    let send = |s: &mut std::net::TcpStream, p: Packet| {
        let mut out = tokio_util::bytes::BytesMut::new();
        p.write(&mut out, 1 << 20).unwrap();
        s.write_all(&out).unwrap();
    };
    let mut receive = |s: &mut std::net::TcpStream| loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::Error::InsufficientBytes(_)) => {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "broker closed");
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut connect = Connect::new("durable-test");
    connect.clean_session = false;
    connect.keep_alive = 60;
    send(&mut s, Packet::Connect(connect));
    assert!(matches!(receive(&mut s), Packet::ConnAck(_)));
    let mut subscribe = Subscribe::new("sensors/#", rumqttc::QoS::ExactlyOnce);
    subscribe.pkid = 1;
    send(&mut s, Packet::Subscribe(subscribe));
    assert!(matches!(receive(&mut s), Packet::SubAck(_)));
    publish_one();
    let Packet::Publish(publish) = receive(&mut s) else {
        panic!("no publish")
    };
    send(&mut s, Packet::PubRec(PubRec::new(publish.pkid)));
    assert_eq!(
        receive(&mut s),
        Packet::PubRel(rumqttc::PubRel::new(publish.pkid))
    );
}

/// Issue 13: the broker resends that PUBREL when the gateway comes back. rumqttc 0.25 refused a
/// PUBREL it did not know, disconnected, and got the same PUBREL first on every reconnect: the
/// QoS 2 source never received again (vendor/rumqttc, patch 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubrel_left_by_a_crashed_gateway_is_answered() {
    let broker = Mosquitto::start();
    let publisher = Publisher::connect(broker.port, "pub").await;
    let handle = tokio::runtime::Handle::current();
    let port = broker.port;
    tokio::task::block_in_place(|| {
        crash_between_pubrec_and_pubcomp(port, || {
            handle.block_on(publisher.publish_qos(
                "sensors/q",
                rumqttc::QoS::ExactlyOnce,
                payload("sensors/q", 0, 20),
            ));
        })
    });
    let mut rig = Rig::new();
    rig.start_commits();
    let buffer = rig.buffer.clone();
    let tap = Tap::start(broker.port, move || buffer.stats().records).await;
    rig.start_source(source_config_with(tap.port, "qos = 2\n"));
    for i in 1..=10 {
        publisher
            .publish_qos(
                "sensors/q",
                rumqttc::QoS::ExactlyOnce,
                payload("sensors/q", i, 20),
            )
            .await;
    }
    rig.wait_received(10, Duration::from_secs(15)).await;
    // The left-over PUBREL came first on the first connection and got its PUBCOMP there, and so
    // did the PUBRELs of the ten new messages.
    let first = tap
        .seen()
        .into_iter()
        .find(|t| t.conn == 0 && !t.to_broker && t.kind != 2);
    assert_eq!(first.map(|t| t.kind), Some(6), "first packet after CONNACK");
    wait_until(
        Duration::from_secs(10),
        || tap.count(0, true, 7) == 11,
        || format!("{} PUBCOMPs of 11", tap.count(0, true, 7)),
    )
    .await;
    rig.stop_source().await;
    assert_eq!(tap.count(1, true, 1), 0, "the source reconnected");
    let stored = counters(&rig.stored());
    let expected: Vec<_> = (1..=10).map(|i| ("sensors/q".to_owned(), i)).collect();
    assert_eq!(stored, expected);
}

/// Issue 13, end to end: messages the gateway received but had not made durable when it was
/// killed are redelivered by the broker after the restart, and reach Kafka with the header
/// `edgegate-redelivered: 1` (and nothing is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_kill_9_reaches_kafka_marked() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // A long linger keeps the first messages from becoming durable before the kill.
    let slow = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [buffer]\ncommit_linger = \"10s\"\nserial_commit_linger = \"10s\"\n"
    );
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", &slow);
    let mut gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let publisher = Publisher::connect(mqtt.port, "pub").await;
    publish_all(&publisher, "sensors/x", 0..5).await;
    let received = "edgegate_records_in_total{source=\"plant\"} 5";
    wait_until(
        Duration::from_secs(5),
        || http_get(admin, "/metrics").1.contains(received),
        || "gateway did not receive 5".into(),
    )
    .await;
    gw.kill9();

    write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    gw.restart();
    let msgs = consume(&kafka.bootstrap(), "uplink", 5, Duration::from_secs(60));
    let mut got: Vec<_> = msgs.iter().map(|m| parse_payload(&m.payload)).collect();
    got.sort();
    assert_eq!(got, all_of("sensors/x", 5).into_iter().collect::<Vec<_>>());
    for m in &msgs {
        assert_eq!(m.header("edgegate-redelivered"), "1", "{:?}", m.headers);
    }
}

/// A QoS 1 PUBLISH as a broker sends it.
fn publish_packet(pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x32, body.len() as u8];
    packet.extend(body);
    packet
}

/// Reads MQTT packets from `stream` until `kind` arrives; returns every (type, packet id) read.
async fn read_until(stream: &mut tokio::net::TcpStream, kind: u8) -> Vec<(u8, Option<u16>)> {
    use tokio::io::AsyncReadExt;
    let (mut pending, mut seen) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((k, pkid, len)) = mqtt_frame(&pending) {
            pending.drain(..len);
            seen.push((k, pkid));
            if k == kind {
                return seen;
            }
        }
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&chunk[..n]),
            other => panic!("connection ended before packet type {kind}: {other:?}, {seen:?}"),
        }
    }
}

/// A PUBLISH rumqttc decoded in the same read as the connection's end is stored, but its ack must
/// not go out on the next connection, where the broker gave packet id 1 to another message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stranded_by_a_lost_connection_is_not_acknowledged_on_the_next() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut rig = Rig::new();
    rig.start_commits();
    rig.start_source(source_config(port));
    let connack = [0x20, 2, 0, 0];
    // The first connection: CONNACK, then a message and the end of the connection in one go.
    let (mut first, _) = listener.accept().await.unwrap();
    read_until(&mut first, 1).await;
    let old = publish_packet(1, "sensors/x", b"sensors/x#0#old");
    first
        .write_all(&[&connack[..], &old].concat())
        .await
        .unwrap();
    drop(first);
    // The next connection (the broker lost the session): packet id 1 is another message now.
    let (mut second, _) = listener.accept().await.unwrap();
    read_until(&mut second, 1).await;
    let new = publish_packet(1, "sensors/x", b"sensors/x#1#new");
    second
        .write_all(&[&connack[..], &new].concat())
        .await
        .unwrap();
    rig.wait_received(2, Duration::from_secs(20)).await;
    // A clean stop acknowledges everything durable, then disconnects (packet type 14).
    let stopping = tokio::spawn(async move { read_until(&mut second, 14).await });
    wait_until(
        Duration::from_secs(20),
        || rig.buffer.stats().records >= 2,
        || "both messages stored".into(),
    )
    .await;
    rig.stop_source().await;
    let seen = stopping.await.unwrap();
    let pubacks: Vec<_> = seen.iter().filter(|(k, _)| *k == 4).collect();
    assert_eq!(
        pubacks,
        [&(4, Some(1))],
        "acks on the second connection: {seen:?}"
    );
    let stored = counters(&rig.stored());
    assert_eq!(stored.len(), 2, "{stored:?}");
}
