//! MQTT source: subscribes with a persistent session and acknowledges each message (PUBACK) only
//! after it is durable in the buffer, in arrival order.
//!
//! Back-pressure: at most `max_pending` messages wait for durability; beyond that the source stops
//! reading the socket, and the broker's own inflight window stops sending. If that lasts longer
//! than the keep-alive the broker drops the connection; unacknowledged messages are then
//! redelivered on reconnect (possible duplicates, never losses).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    Publish, QoS, SubscribeFilter, SubscribeReasonCode, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::{BufferError, BufferWriter, PendingAppend};
use crate::config::{MqttSourceConfig, TopicFilter};
use crate::metrics::Metrics;
use crate::record::{now_ms, NewRecord, SourceType};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A TLS file cannot be read; fatal, fix the path in the source's `tls` table.
    #[error("source {source_name}: cannot read {path}: {error}")]
    TlsFile {
        source_name: String,
        path: String,
        error: std::io::Error,
    },
}

/// Everything the source needs besides its configuration.
pub struct SourceContext {
    pub name: Arc<str>,
    pub client_id: String,
    pub writer: BufferWriter,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, PartialEq, Eq)]
enum Conn {
    Connecting,
    Connected,
    Down(String),
}

struct ConnState {
    state: Conn,
    source: Arc<str>,
    metrics: Arc<Metrics>,
}

impl ConnState {
    fn set(&mut self, next: Conn) {
        if self.state == next {
            return;
        }
        match &next {
            Conn::Connected => tracing::info!(source = %self.source, "mqtt connected"),
            Conn::Down(reason) => {
                tracing::warn!(source = %self.source, %reason, "mqtt disconnected; retrying")
            }
            Conn::Connecting => {}
        }
        self.metrics
            .set_source_connected(&self.source, next == Conn::Connected);
        self.state = next;
    }
}

/// A received message waiting for durability before its PUBACK.
struct PendingAck {
    append: PendingAppend,
    /// The message without its payload: what `ack` needs (packet id, QoS).
    header: Publish,
}

/// Runs the source until `shutdown`, then acknowledges what became durable and disconnects.
pub async fn run(
    config: MqttSourceConfig,
    ctx: SourceContext,
    shutdown: CancellationToken,
) -> Result<(), MqttError> {
    let options = mqtt_options(&config, &ctx)?;
    let (client, mut eventloop) = AsyncClient::new(options, config.max_pending + 64);
    let (ack_tx, ack_rx) = mpsc::channel(config.max_pending);
    let acker = tokio::spawn(ack_in_order(client.clone(), ack_rx, ctx.name.clone()));
    let filters = subscribe_filters(&config);
    let mut conn = ConnState {
        state: Conn::Connecting,
        source: ctx.name.clone(),
        metrics: ctx.metrics.clone(),
    };
    let received = ctx.metrics.source_in(&ctx.name);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                conn.set(Conn::Connected);
                backoff.reset();
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(source = %ctx.name, error = %e, "cannot queue subscription");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let header = Publish {
                    payload: Default::default(),
                    ..publish.clone()
                };
                let record = NewRecord {
                    captured_ms: now_ms(),
                    source: ctx.name.clone(),
                    source_type: SourceType::Mqtt,
                    meta: vec![("topic".to_owned(), publish.topic)],
                    payload: publish.payload.to_vec(),
                };
                let submitted = tokio::select! {
                    s = ctx.writer.submit(record) => s,
                    _ = shutdown.cancelled() => break,
                };
                let Ok(append) = submitted else { break };
                received.inc();
                let queued = tokio::select! {
                    q = ack_tx.send(PendingAck { append, header }) => q,
                    _ = shutdown.cancelled() => break,
                };
                if queued.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let mut refused = 0;
                for (code, filter) in ack.return_codes.iter().zip(&filters) {
                    if matches!(code, SubscribeReasonCode::Failure) {
                        refused += 1;
                        tracing::error!(source = %ctx.name, filter = %filter.path, "broker refused subscription");
                    }
                }
                tracing::info!(source = %ctx.name, filters = filters.len() - refused, "mqtt subscribed");
            }
            Ok(_) => {}
            Err(e) => {
                conn.set(Conn::Down(describe(&e)));
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    finish(client, eventloop, ack_tx, acker, &ctx.name).await;
    conn.set(Conn::Down("shut down".into()));
    Ok(())
}

/// Lets the acks of records already handed to the buffer go out, then disconnects cleanly.
async fn finish(
    client: AsyncClient,
    mut eventloop: EventLoop,
    ack_tx: mpsc::Sender<PendingAck>,
    acker: tokio::task::JoinHandle<()>,
    name: &str,
) {
    drop(ack_tx);
    let flush = async {
        let _ = acker.await;
        let _ = client.try_disconnect();
        // Polling sends the queued acks and the DISCONNECT; it errors once the socket closes.
        while eventloop.poll().await.is_ok() {}
    };
    if tokio::time::timeout(Duration::from_secs(5), flush)
        .await
        .is_err()
    {
        tracing::warn!(
            source = name,
            "mqtt shutdown timed out; unacknowledged messages will be redelivered"
        );
    }
}

async fn ack_in_order(client: AsyncClient, mut rx: mpsc::Receiver<PendingAck>, name: Arc<str>) {
    let mut failures = 0u64;
    while let Some(p) = rx.recv().await {
        let ack = match p.append.durable().await {
            Ok(_) => true,
            // It can never be stored; acknowledging stops endless redelivery of a poison message.
            Err(BufferError::TooLarge(size)) => {
                tracing::warn!(source = %name, size, "message larger than the buffer allows; dropped");
                true
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 1000 == 0 {
                    tracing::warn!(source = %name, error = %e, failures, "message not stored; not acknowledged, the broker will redeliver");
                }
                false
            }
        };
        if ack && p.header.qos != QoS::AtMostOnce && client.ack(&p.header).await.is_err() {
            return;
        }
    }
}

fn subscribe_filters(config: &MqttSourceConfig) -> Vec<SubscribeFilter> {
    config
        .topics
        .iter()
        .map(|t| {
            let (filter, qos) = match t {
                TopicFilter::Plain(f) => (f.clone(), config.qos),
                TopicFilter::WithQos { filter, qos } => (filter.clone(), qos.unwrap_or(config.qos)),
            };
            SubscribeFilter::new(filter, qos_of(qos))
        })
        .collect()
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn mqtt_options(config: &MqttSourceConfig, ctx: &SourceContext) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(&ctx.client_id, &config.host, config.port);
    o.set_keep_alive(config.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(
            config.max_payload_bytes.as_u64() as usize + 64 * 1024,
            64 * 1024,
        );
    if let Some(user) = &config.username {
        // `check` verified the variable exists; an empty password is what the broker gets otherwise.
        let password = config.resolve_password().ok().flatten().map(|s| s.0);
        o.set_credentials(user, password.unwrap_or_default());
    }
    if let Some(tls) = &config.tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| MqttError::TlsFile {
                source_name: ctx.name.to_string(),
                path: path.display().to_string(),
                error,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        o.set_transport(Transport::tls(ca, client_auth, None));
    }
    Ok(o)
}

/// One operator-readable reason per kind of failure (the state-change log line).
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                "broker refused the connection: bad username or password".into()
            }
            ConnectReturnCode::NotAuthorized => {
                "broker refused the connection: not authorized".into()
            }
            other => format!("broker refused the connection: {other:?}"),
        },
        ConnectionError::Io(io) => format!("network: {io}"),
        other => other.to_string(),
    }
}
