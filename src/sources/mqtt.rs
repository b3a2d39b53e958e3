//! MQTT source: subscribes with a persistent session and acknowledges each message (PUBACK) only
//! after it is durable in the buffer, in arrival order.
//!
//! Back-pressure: at most `max_pending` messages wait for durability; beyond that the source stops
//! reading the socket, and the broker's own inflight window stops sending. If that lasts longer
//! than the keep-alive the broker drops the connection; unacknowledged messages are then
//! redelivered on reconnect (possible duplicates, never losses).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    Publish, QoS, SubscribeFilter, SubscribeReasonCode, Transport,
};
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
    ack: AckId,
}

/// What an acknowledgement needs. Kept instead of the message's header (topic included): when
/// the broker's window is wide, tens of thousands of acks can wait here, and they must stay small.
#[derive(Clone, Copy)]
struct AckId {
    pkid: u16,
    qos: QoS,
}

impl AckId {
    fn of(publish: &Publish) -> AckId {
        AckId {
            pkid: publish.pkid,
            qos: publish.qos,
        }
    }

    /// The message as `try_ack` wants it; an empty topic and payload allocate nothing.
    fn as_publish(self) -> Publish {
        Publish {
            dup: false,
            qos: self.qos,
            retain: false,
            topic: String::new(),
            pkid: self.pkid,
            payload: Default::default(),
        }
    }
}

/// Acknowledgements in arrival order: waiting for durability, then waiting to be queued.
///
/// rumqttc only sends what sits in its request channel while its event loop is polled, so the
/// loop is never blocked on anything the loop itself must drain: acks are queued with `try_ack`
/// and kept here when the channel is full.
struct Acks {
    pending: VecDeque<PendingAck>,
    unsent: VecDeque<AckId>,
    store_failures: u64,
    source: Arc<str>,
}

impl Acks {
    /// Resolves when the oldest pending record's append finished; never while none is pending.
    async fn oldest_done(&mut self) -> Result<u64, BufferError> {
        match self.pending.front_mut() {
            Some(p) => (&mut p.append).await,
            None => std::future::pending().await,
        }
    }

    fn complete_oldest(&mut self, result: Result<u64, BufferError>) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        let ack = match result {
            Ok(_) => true,
            // It can never be stored; acknowledging stops endless redelivery of a poison message.
            Err(BufferError::TooLarge(size)) => {
                tracing::warn!(source = %self.source, size, "message larger than the buffer allows; dropped");
                true
            }
            Err(e) => {
                self.store_failures += 1;
                if self.store_failures == 1 || self.store_failures % 1000 == 0 {
                    tracing::warn!(source = %self.source, error = %e, failures = self.store_failures,
                        "message not stored; not acknowledged, the broker will redeliver");
                }
                false
            }
        };
        if ack && p.ack.qos != QoS::AtMostOnce {
            self.unsent.push_back(p.ack);
        }
    }

    fn queue_unsent(&mut self, client: &AsyncClient) {
        while let Some(ack) = self.unsent.front() {
            if client.try_ack(&ack.as_publish()).is_err() {
                return;
            }
            self.unsent.pop_front();
        }
        // A burst can leave a large, empty queue behind; give the memory back.
        if self.unsent.is_empty() && self.unsent.capacity() > 4096 {
            self.unsent.shrink_to(1024);
        }
    }
}

/// Runs the source until `shutdown`, then acknowledges what became durable and disconnects.
pub async fn run(
    config: MqttSourceConfig,
    ctx: SourceContext,
    shutdown: CancellationToken,
) -> Result<(), MqttError> {
    let options = mqtt_options(&config, &ctx)?;
    let (client, mut eventloop) = AsyncClient::new(options, config.max_pending * 2 + 64);
    let filters = subscribe_filters(&config);
    let mut conn = ConnState {
        state: Conn::Connecting,
        source: ctx.name.clone(),
        metrics: ctx.metrics.clone(),
    };
    let mut acks = Acks {
        pending: VecDeque::new(),
        unsent: VecDeque::new(),
        store_failures: 0,
        source: ctx.name.clone(),
    };
    let received = ctx.metrics.source_in(&ctx.name);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    loop {
        acks.queue_unsent(&client);
        // Reading stops while too many records wait for durability; the broker's window fills.
        let may_read = acks.pending.len() < config.max_pending;
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            done = acks.oldest_done() => {
                acks.complete_oldest(done);
                continue;
            }
            event = eventloop.poll(), if may_read => event,
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
                let ack = AckId::of(&publish);
                let record = NewRecord {
                    captured_ms: now_ms(),
                    source: ctx.name.clone(),
                    source_type: SourceType::Mqtt,
                    meta: vec![("topic".to_owned(), publish.topic)],
                    payload: publish.payload.to_vec(),
                };
                // Waits only while the buffer's intake is full (buffer full with `block`).
                let submitted = tokio::select! {
                    s = ctx.writer.submit(record) => s,
                    _ = shutdown.cancelled() => break,
                };
                let Ok(append) = submitted else { break };
                received.inc();
                acks.pending.push_back(PendingAck { append, ack });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                log_suback(&ctx.name, &ack.return_codes, &filters)
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
    finish(client, eventloop, acks, &ctx.name).await;
    conn.set(Conn::Down("shut down".into()));
    Ok(())
}

fn log_suback(name: &str, codes: &[SubscribeReasonCode], filters: &[SubscribeFilter]) {
    let mut refused = 0;
    for (code, filter) in codes.iter().zip(filters) {
        if matches!(code, SubscribeReasonCode::Failure) {
            refused += 1;
            tracing::error!(source = name, filter = %filter.path, "broker refused subscription");
        }
    }
    tracing::info!(
        source = name,
        filters = filters.len() - refused,
        "mqtt subscribed"
    );
}

/// Acknowledges the records already handed to the buffer, then disconnects cleanly.
async fn finish(client: AsyncClient, mut eventloop: EventLoop, mut acks: Acks, name: &str) {
    let flush = async {
        while !acks.pending.is_empty() {
            let done = acks.oldest_done().await;
            acks.complete_oldest(done);
        }
        let mut disconnecting = false;
        loop {
            acks.queue_unsent(&client);
            if acks.unsent.is_empty() && !disconnecting {
                disconnecting = client.try_disconnect().is_ok();
            }
            // Polling sends the queued acks and the DISCONNECT. Keep reading until the broker
            // closes: closing with unread data would reset the connection, and a reset can make
            // the broker discard acks it has not read yet.
            if eventloop.poll().await.is_err() {
                break;
            }
        }
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
                "broker refused the connection: not authorized (check username, password and ACLs)"
                    .into()
            }
            other => format!("broker refused the connection: {other:?}"),
        },
        ConnectionError::Io(io) => format!("network: {io}"),
        other => other.to_string(),
    }
}
