//! MQTT source: subscribes with a persistent session and acknowledges each message (PUBACK) only
//! after it is durable in the buffer, in arrival order.
//!
//! Back-pressure: at most `max_pending` messages wait for durability; beyond that the source stops
//! reading the socket, and the broker's own inflight window stops sending. If that lasts longer
//! than the keep-alive the broker drops the connection; unacknowledged messages are then
//! redelivered on reconnect (possible duplicates, never losses).
//!
//! Acks belong to their connection: after a reconnect the acks not yet sent are dropped (the
//! records are stored all the same), since the broker may have given their packet ids to other
//! messages. It redelivers those messages with the DUP flag, and their records are marked
//! `redelivered`. A message over `max_payload_bytes` is acknowledged and dropped, so it cannot
//! wedge the source by being redelivered first forever.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, Publish, QoS, Request, SubscribeFilter, SubscribeReasonCode, Transport,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::{BufferError, BufferWriter, PendingAppend};
use crate::config::{MqttSourceConfig, TopicFilter};
use crate::metrics::{DropReason, Metrics};
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

/// A PUBLISH's variable header at its largest: topic length, a 65,535-byte topic, packet id. With
/// it, rumqttc reads every message whose payload is within `max_payload_bytes`; a larger one it
/// hands over without its payload (vendored patch), so no message is held beyond this.
const PUBLISH_HEADER_MAX: usize = 2 + 65_535 + 2;

/// Everything the source needs besides its configuration.
pub struct SourceContext {
    pub name: Arc<str>,
    pub client_id: String,
    pub writer: BufferWriter,
    pub metrics: Arc<Metrics>,
    /// The downlink publishes through this source's connection while it runs.
    pub outlet: MqttOutlet,
}

/// Why a downlink message was not delivered. Every variant is worth a retry later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The source is not running (starting, restarting, or shut down); retry after a backoff.
    #[error("mqtt source is not running")]
    NotRunning,
    /// The source has no broker connection now; retry after a backoff.
    #[error("mqtt source is not connected to its broker")]
    NotConnected,
    /// rumqttc's request queue is full; retry shortly.
    #[error("mqtt source is busy")]
    Busy,
    /// The message cannot be sent on this connection at all (larger than the source's packet
    /// limit); retrying cannot help: give it up.
    #[error("{size} bytes is more than this mqtt source sends in one message ({max}); raise its max_payload_bytes")]
    TooLarge { size: usize, max: usize },
    /// The connection or the source ended before the broker acknowledged the message, or the
    /// acknowledgement took longer than [`DELIVERY_TIMEOUT`]; the broker may still have it, so
    /// a retry can duplicate it.
    #[error("no acknowledgement from the broker: {0}")]
    Unconfirmed(&'static str),
}

impl PublishError {
    /// Whether the same message can never succeed on this source.
    pub fn is_permanent(&self) -> bool {
        matches!(self, PublishError::TooLarge { .. })
    }
}

/// How long a published downlink message may wait for its PUBACK (PUBCOMP), reconnects included:
/// rumqttc resends unacknowledged messages after a reconnect, so a short outage needs no retry.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes downlink messages through the source's own broker connection (no second client) and
/// tells when the broker acknowledged each one.
///
/// rumqttc reports no completion per publish, only events: a new publish takes the next packet id
/// in request order (`Outgoing::Publish`, or `AwaitAck` while its id is still in use) and is
/// acknowledged by id. The source only ever publishes for the downlink, so the n-th new publish
/// event is the n-th request queued here; the lock makes "queue the request, then its notice"
/// atomic against the event-loop task that pops notices. Resends after a reconnect carry ids
/// already waiting and are not new publishes.
#[derive(Clone)]
pub struct MqttOutlet {
    outbound: Arc<Mutex<Option<Outbound>>>,
    /// Publishes awaiting their acknowledgement. Below rumqttc's outgoing window: when that is
    /// full, rumqttc stops reading its request channel, which also holds the uplink's acks.
    window: Arc<Semaphore>,
}

/// Downlink publishes one source has waiting for the broker at a time: with one round trip
/// through the broker per command, the window is what sets the downlink's rate.
const DOWNLINK_WINDOW: usize = 512;
/// rumqttc's window of unacknowledged outgoing publishes (its packet ids), above
/// [`DOWNLINK_WINDOW`]; its default of 100 held the downlink to about 9,500 commands/s.
const OUTGOING_WINDOW: u16 = 1024;

impl Default for MqttOutlet {
    fn default() -> Self {
        MqttOutlet {
            outbound: Arc::default(),
            window: Arc::new(Semaphore::new(DOWNLINK_WINDOW)),
        }
    }
}

type Notice = oneshot::Sender<()>;

struct Outbound {
    client: AsyncClient,
    /// rumqttc's outgoing packet limit: a larger publish would fail the connection, and be
    /// resent first on every reconnect.
    max_packet: usize,
    connected: bool,
    /// Queued in rumqttc's request channel, not yet given a packet id, in order.
    unassigned: VecDeque<Notice>,
    /// Waiting for PUBACK (QoS 1) or PUBREC (QoS 2), by packet id.
    awaiting_ack: HashMap<u16, Notice>,
    /// QoS 2 after PUBREC, waiting for PUBCOMP. Apart from `awaiting_ack`: rumqttc may give the
    /// id to a new publish meanwhile.
    awaiting_comp: HashMap<u16, Notice>,
    /// A publish whose id was still in use; it goes out when that id is acknowledged.
    collided: Option<(u16, Notice)>,
}

impl MqttOutlet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outbound>> {
        self.outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes and waits for the broker's acknowledgement (for QoS 0: until it is written).
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let _in_window = self
            .window
            .acquire()
            .await
            .map_err(|_| PublishError::NotRunning)?;
        let acked = {
            let mut guard = self.lock();
            let out = guard.as_mut().ok_or(PublishError::NotRunning)?;
            // Fixed header (5), topic length (2), packet id (2).
            let size = payload.len() + topic.len() + 9;
            if size > out.max_packet {
                let max = out.max_packet;
                return Err(PublishError::TooLarge { size, max });
            }
            if !out.connected {
                return Err(PublishError::NotConnected);
            }
            out.client
                .try_publish(topic, qos_of(qos), false, payload)
                .map_err(|_| PublishError::Busy)?;
            let (notice, acked) = oneshot::channel();
            out.unassigned.push_back(notice);
            acked
        };
        match tokio::time::timeout(DELIVERY_TIMEOUT, acked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(PublishError::Unconfirmed("the mqtt source restarted")),
            Err(_) => Err(PublishError::Unconfirmed("timed out")),
        }
    }

    fn start(&self, client: AsyncClient, max_packet: usize) {
        *self.lock() = Some(Outbound {
            client,
            max_packet,
            connected: false,
            unassigned: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            awaiting_comp: HashMap::new(),
            collided: None,
        });
    }

    /// The source ended: every waiting publish fails (dropping its notice).
    fn stop(&self) {
        self.lock().take();
    }

    fn set_connected(&self, connected: bool) {
        if let Some(out) = self.lock().as_mut() {
            out.connected = connected;
        }
    }

    /// Follows one event of the event loop.
    fn observe(&self, event: &Event) {
        // The uplink's own per-message events (incoming publishes, its acks) take no lock.
        let relevant = matches!(
            event,
            Event::Incoming(
                Packet::ConnAck(_) | Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)
            ) | Event::Outgoing(Outgoing::Publish(_) | Outgoing::AwaitAck(_))
        );
        if !relevant {
            return;
        }
        let mut guard = self.lock();
        let Some(out) = guard.as_mut() else { return };
        match event {
            Event::Incoming(Packet::ConnAck(connack)) if !connack.session_present => {
                // The broker lost the session: rumqttc dropped every publish it was to resend
                // and every request queued while it reconnected. Their notices fail (the
                // commands are retried); kept, they would be completed by the acks of later
                // publishes that reuse their packet ids.
                out.unassigned.clear();
                out.awaiting_ack.clear();
                out.awaiting_comp.clear();
                out.collided = None;
            }
            Event::Outgoing(Outgoing::Publish(0)) => {
                if let Some(notice) = out.unassigned.pop_front() {
                    let _ = notice.send(());
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if out.awaiting_ack.contains_key(pkid) {
                    return; // a resend after a reconnect
                }
                let notice = match out.collided.take() {
                    Some((id, notice)) if id == *pkid => Some(notice),
                    other => {
                        out.collided = other;
                        out.unassigned.pop_front()
                    }
                };
                if let Some(notice) = notice {
                    out.awaiting_ack.insert(*pkid, notice);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                if let Some(notice) = out.unassigned.pop_front() {
                    out.collided = Some((*pkid, notice));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(notice) = out.awaiting_ack.remove(&ack.pkid) {
                    let _ = notice.send(());
                }
            }
            Event::Incoming(Packet::PubRec(rec)) => {
                if let Some(notice) = out.awaiting_ack.remove(&rec.pkid) {
                    out.awaiting_comp.insert(rec.pkid, notice);
                }
            }
            Event::Incoming(Packet::PubComp(comp)) => {
                if let Some(notice) = out.awaiting_comp.remove(&comp.pkid) {
                    let _ = notice.send(());
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Conn {
    Connecting,
    Connected {
        session_present: bool,
    },
    Down(String),
    /// Shutdown, or a reload that removed or changed the source: no retry follows.
    Stopped,
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
            Conn::Connected { session_present } => {
                tracing::info!(source = %self.source, session_present, "mqtt connected")
            }
            Conn::Down(reason) => {
                tracing::warn!(source = %self.source, %reason, "mqtt disconnected; retrying")
            }
            Conn::Stopped => tracing::info!(source = %self.source, "mqtt source stopped"),
            Conn::Connecting => {}
        }
        self.metrics
            .set_source_connected(&self.source, matches!(next, Conn::Connected { .. }));
        self.state = next;
    }
}

/// A received message waiting for durability before its PUBACK.
struct PendingAck {
    /// `None`: nothing to store (the message was dropped as too large); acknowledged in turn.
    append: Option<PendingAppend>,
    ack: AckId,
}

/// What an acknowledgement needs. Kept instead of the message's header (topic included): when
/// the broker's window is wide, tens of thousands of acks can wait here, and they must stay small.
#[derive(Clone, Copy)]
struct AckId {
    pkid: u16,
    qos: QoS,
    /// The connection the message arrived on; its ack is never sent on another one.
    connection: u64,
}

impl AckId {
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

/// Which connection is current, shared by the event-loop task and the acknowledging source.
///
/// An ack must never go out on a later connection than its message's: rumqttc forgets a lost
/// connection's acks, and a broker that lost the session may give the packet id to a new message,
/// which would then be acknowledged before it is durable. The lock makes "is this connection
/// still current, then queue the ack" and "the connection ended, drop every queued ack" exclusive.
#[derive(Clone, Default)]
struct CurrentConnection(Arc<Mutex<u64>>);

#[derive(Debug, PartialEq, Eq)]
enum Queued {
    Yes,
    /// rumqttc's request channel is full; try again later.
    ChannelFull,
    /// The message arrived on an earlier connection; the broker redelivers it.
    Stale,
}

impl CurrentConnection {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        // A panic while holding it left a valid number behind.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn id(&self) -> u64 {
        *self.lock()
    }

    fn try_ack(&self, client: &AsyncClient, ack: AckId) -> Queued {
        let current = self.lock();
        if ack.connection != *current {
            return Queued::Stale;
        }
        match client.try_ack(&ack.as_publish()) {
            Ok(()) => Queued::Yes,
            Err(_) => Queued::ChannelFull,
        }
    }

    /// Called after `poll` failed: later acks of this connection are refused, and the ones already
    /// queued in rumqttc are dropped (its own clean-up keeps PUBRECs for the next connection).
    fn end(&self, eventloop: &mut EventLoop) {
        let mut current = self.lock();
        *current += 1;
        eventloop.clean();
        eventloop
            .pending
            .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
    }
}

/// Acknowledgements in arrival order: waiting for durability, then waiting to be queued.
///
/// rumqttc only sends what sits in its request channel while its event loop is polled, so acks
/// are queued with `try_ack` and kept here when the channel is full.
struct Acks {
    pending: VecDeque<PendingAck>,
    unsent: VecDeque<AckId>,
    store_failures: u64,
    too_large: DropLog,
    source: Arc<str>,
    metrics: Arc<Metrics>,
}

impl Acks {
    fn new(source: Arc<str>, metrics: Arc<Metrics>) -> Acks {
        Acks {
            pending: VecDeque::new(),
            unsent: VecDeque::new(),
            store_failures: 0,
            too_large: DropLog::default(),
            source,
            metrics,
        }
    }

    /// Resolves when the oldest pending record's append finished; never while none is pending.
    async fn oldest_done(&mut self) -> Result<u64, BufferError> {
        match self.pending.front_mut() {
            Some(PendingAck {
                append: Some(append),
                ..
            }) => append.await,
            Some(PendingAck { append: None, .. }) => Ok(0),
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
                self.drop_too_large(size);
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

    fn drop_too_large(&mut self, size: usize) {
        self.metrics.count_dropped(DropReason::TooLarge, 1);
        if let Some(dropped) = self.too_large.due() {
            tracing::warn!(source = %self.source, size, dropped,
                "message larger than max_payload_bytes; acknowledged and dropped (reason=\"too_large\")");
        }
    }

    fn queue_unsent(&mut self, client: &AsyncClient, connection: &CurrentConnection) {
        while let Some(ack) = self.unsent.front() {
            if connection.try_ack(client, *ack) == Queued::ChannelFull {
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

/// Lets a repeated warning out at most once a minute, with how many it stands for.
#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    since_last: u64,
}

impl DropLog {
    /// `Some(count since the last line)` when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.since_last += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since_last))
    }
}

/// What the event-loop task reports.
enum Polled {
    Connected { session_present: bool },
    Down(String),
    Message(Message),
    SubAck(Vec<SubscribeReasonCode>),
}

struct Message {
    publish: Publish,
    /// The payload's size when rumqttc skipped it (over its incoming limit).
    skipped_payload: Option<usize>,
    connection: u64,
    /// Its share of the read-ahead bytes, given back once the source took the payload.
    _read_ahead: OwnedSemaphorePermit,
}

/// Messages the event-loop task may read ahead of the source. Small: `max_pending` is the
/// back-pressure that counts.
const POLLED_CAPACITY: usize = 16;
/// Payload bytes the event-loop task may read ahead of the source (or one message, if larger):
/// sixteen 2 MiB messages would otherwise wait in memory per source.
const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// Polls rumqttc's event loop, which is not documented cancel-safe, in a task of its own that
/// never drops a `poll` midway. Waiting to hand a message over stops the reading (back-pressure);
/// a connection error ends the connection's acks, then waits out the backoff. Returns when the
/// source is gone or, after `stop`, when the connection closes.
async fn poll_events(
    mut eventloop: EventLoop,
    outlet: MqttOutlet,
    connection: CurrentConnection,
    mut backoff: Backoff,
    polled: mpsc::Sender<Polled>,
    stop: CancellationToken,
) {
    let read_ahead = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    // Between polls, never inside one: waiting for room is back-pressure like a full channel.
    let room = |size: usize| {
        let permits = size.clamp(1, READ_AHEAD_BYTES) as u32;
        read_ahead.clone().acquire_many_owned(permits)
    };
    loop {
        let polled_event = eventloop.poll().await;
        if let Ok(event) = &polled_event {
            outlet.observe(event);
        }
        let event = match polled_event {
            Ok(Event::Incoming(packet)) => packet,
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => {
                outlet.set_connected(false);
                // What rumqttc decoded in the read that failed belongs to the lost connection:
                // handed over as such, it is stored but never acknowledged on the next one, where
                // the broker may have given its packet id to another message.
                let lost = connection.id();
                let stranded: Vec<Publish> = eventloop
                    .state
                    .events
                    .drain(..)
                    .inspect(|event| outlet.observe(event))
                    .filter_map(|event| match event {
                        Event::Incoming(Packet::Publish(publish)) => Some(publish),
                        _ => None,
                    })
                    .collect();
                connection.end(&mut eventloop);
                for publish in stranded {
                    let Ok(permit) = room(publish.payload.len()).await else {
                        return;
                    };
                    let message = Message {
                        publish,
                        skipped_payload: None,
                        connection: lost,
                        _read_ahead: permit,
                    };
                    if polled.send(Polled::Message(message)).await.is_err() {
                        return;
                    }
                }
                if stop.is_cancelled() || matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                if polled.send(Polled::Down(describe(&e))).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let report = match event {
            Packet::ConnAck(connack) => {
                backoff.reset();
                if !connack.session_present {
                    // rumqttc dropped the publishes it was to resend, but not a publish waiting
                    // for one of their packet ids: that one would wait for an ack that never
                    // comes, and rumqttc would end every connection on it (CollisionTimeout).
                    eventloop.state.collision = None;
                    eventloop.state.collision_ping_count = 0;
                }
                outlet.set_connected(true);
                Polled::Connected {
                    session_present: connack.session_present,
                }
            }
            Packet::Publish(publish) => {
                let Ok(permit) = room(publish.payload.len()).await else {
                    return;
                };
                Polled::Message(Message {
                    publish,
                    skipped_payload: None,
                    connection: connection.id(),
                    _read_ahead: permit,
                })
            }
            Packet::OversizedPublish {
                publish,
                payload_len,
            } => {
                let Ok(permit) = room(0).await else { return };
                Polled::Message(Message {
                    publish,
                    skipped_payload: Some(payload_len),
                    connection: connection.id(),
                    _read_ahead: permit,
                })
            }
            Packet::SubAck(ack) => Polled::SubAck(ack.return_codes),
            _ => continue,
        };
        if polled.send(report).await.is_err() {
            return;
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
    let (client, eventloop) = AsyncClient::new(options, config.max_pending * 2 + 64);
    ctx.outlet.start(client.clone(), max_packet_size(&config));
    let _stop_outlet = StopOutlet(ctx.outlet.clone());
    let connection = CurrentConnection::default();
    let (polled_tx, mut polled) = mpsc::channel(POLLED_CAPACITY);
    let stop_polling = CancellationToken::new();
    let poller = AbortOnDrop(tokio::spawn(poll_events(
        eventloop,
        ctx.outlet.clone(),
        connection.clone(),
        Backoff::new(config.reconnect_min, config.reconnect_max),
        polled_tx,
        stop_polling.clone(),
    )));
    let filters = subscribe_filters(&config);
    let mut conn = ConnState {
        state: Conn::Connecting,
        source: ctx.name.clone(),
        metrics: ctx.metrics.clone(),
    };
    let mut acks = Acks::new(ctx.name.clone(), ctx.metrics.clone());
    let received = ctx.metrics.source_in(&ctx.name);
    let redelivered = ctx.metrics.mqtt_redelivered(&ctx.name);
    let max_payload = config.max_payload_bytes.as_u64() as usize;
    loop {
        acks.queue_unsent(&client, &connection);
        // Reading stops while too many records wait for durability; the broker's window fills.
        let may_read = acks.pending.len() < config.max_pending;
        let report = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            done = acks.oldest_done() => {
                acks.complete_oldest(done);
                continue;
            }
            report = polled.recv(), if may_read => report,
        };
        match report {
            Some(Polled::Connected { session_present }) => {
                conn.set(Conn::Connected { session_present });
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(source = %ctx.name, error = %e, "cannot queue subscription");
                }
            }
            Some(Polled::Message(message)) => {
                let ack = AckId {
                    pkid: message.publish.pkid,
                    qos: message.publish.qos,
                    connection: message.connection,
                };
                let size = message
                    .skipped_payload
                    .unwrap_or(message.publish.payload.len());
                if size > max_payload {
                    acks.drop_too_large(size);
                    acks.pending.push_back(PendingAck { append: None, ack });
                    continue;
                }
                if message.publish.dup {
                    redelivered.inc();
                }
                // Waits only while the buffer's intake is full (buffer full with `block`).
                let submitted = tokio::select! {
                    s = ctx.writer.submit(record_of(&ctx.name, message.publish)) => s,
                    _ = shutdown.cancelled() => break,
                };
                let Ok(append) = submitted else { break };
                received.inc();
                acks.pending.push_back(PendingAck {
                    append: Some(append),
                    ack,
                });
            }
            Some(Polled::SubAck(codes)) => log_suback(&ctx.name, &codes, &filters),
            Some(Polled::Down(reason)) => {
                // Their connection is gone; `CurrentConnection` would refuse them anyway.
                acks.unsent.clear();
                conn.set(Conn::Down(reason));
            }
            // The event loop only ends before `stop_polling` when the client is gone.
            None => break,
        }
    }
    finish(
        client,
        poller,
        polled,
        stop_polling,
        acks,
        &connection,
        &ctx.name,
    )
    .await;
    conn.set(Conn::Stopped);
    Ok(())
}

/// The stored record of a message. A broker redelivery (DUP flag) is marked: it may already be
/// stored under another sequence number (a crash or reconnect before its ack).
fn record_of(source: &Arc<str>, publish: Publish) -> NewRecord {
    let mut meta = vec![("topic".to_owned(), publish.topic)];
    if publish.dup {
        meta.push(("redelivered".to_owned(), "1".to_owned()));
    }
    NewRecord {
        captured_ms: now_ms(),
        source: source.clone(),
        source_type: SourceType::Mqtt,
        meta,
        payload: publish.payload.to_vec(),
    }
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
async fn finish(
    client: AsyncClient,
    mut poller: AbortOnDrop,
    mut polled: mpsc::Receiver<Polled>,
    stop_polling: CancellationToken,
    mut acks: Acks,
    connection: &CurrentConnection,
    name: &str,
) {
    let flush = async {
        let mut disconnecting = false;
        loop {
            acks.queue_unsent(&client, connection);
            if acks.pending.is_empty() && acks.unsent.is_empty() && !disconnecting {
                disconnecting = client.try_disconnect().is_ok();
                if disconnecting {
                    stop_polling.cancel();
                }
            }
            // rumqttc's request channel was full: the event loop empties it without telling us.
            let retry_soon = !disconnecting && acks.pending.is_empty();
            // The event loop sends the queued acks and the DISCONNECT, and keeps reading until
            // the broker closes: closing with unread data would reset the connection, and a reset
            // can make the broker discard acks it has not read yet. What it still reports is not
            // acknowledged; the broker redelivers it.
            tokio::select! {
                done = acks.oldest_done() => acks.complete_oldest(done),
                report = polled.recv() => {
                    if report.is_none() {
                        break;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(10)), if retry_soon => {}
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
    stop_polling.cancel();
    // A poll cut short here loses nothing: the connection is being dropped with it.
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut poller.0).await;
}

/// Downlink publishes fail once the source ends, also when its task is aborted.
struct StopOutlet(MqttOutlet);

impl Drop for StopOutlet {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The event-loop task ends with the source, also when the source's task is aborted: a
/// leftover connection under the same client id would take the session back and forth.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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

fn max_packet_size(config: &MqttSourceConfig) -> usize {
    config.max_payload_bytes.as_u64() as usize + PUBLISH_HEADER_MAX
}

fn mqtt_options(config: &MqttSourceConfig, ctx: &SourceContext) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(&ctx.client_id, &config.host, config.port);
    o.set_keep_alive(config.keep_alive)
        .set_inflight(OUTGOING_WINDOW)
        .set_clean_session(false)
        .set_manual_acks(true)
        // Downlink commands may be as large as the messages the source accepts.
        .set_max_packet_size(max_packet_size(config), max_packet_size(config));
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

#[cfg(test)]
mod tests {
    use rumqttc::{Codec, Incoming, MqttState, PubComp, PubRel};
    use tokio_util::bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    /// vendor/rumqttc patch 1: a broker resends the PUBREL of a PUBREC sent on an earlier
    /// connection (or by the previous process); refusing it made rumqttc disconnect for good.
    #[test]
    fn a_pubrel_of_an_earlier_connection_gets_its_pubcomp() {
        let mut state = MqttState::new(100, true);
        let reply = state.handle_incoming_packet(Incoming::PubRel(PubRel::new(7)));
        assert_eq!(reply.ok().flatten(), Some(Packet::PubComp(PubComp::new(7))));
    }

    /// vendor/rumqttc patch 2: a PUBLISH over the incoming limit comes out without its payload,
    /// which is skipped as it arrives (never buffered whole), and the next packet still decodes.
    #[test]
    fn an_oversized_publish_is_skipped_and_keeps_its_packet_id() {
        let mut codec = Codec {
            max_incoming_size: 1024,
            max_outgoing_size: 8 << 20,
            skipping: 0,
        };
        let mut wire = BytesMut::new();
        let mut big = Publish::new("sensors/big", QoS::AtLeastOnce, vec![7u8; 3 << 20]);
        big.pkid = 5;
        let mut small = Publish::new("sensors/small", QoS::ExactlyOnce, b"ok".to_vec());
        small.pkid = 6;
        codec.encode(Packet::Publish(big), &mut wire).unwrap();
        codec
            .encode(Packet::Publish(small.clone()), &mut wire)
            .unwrap();

        let mut src = BytesMut::new();
        let mut out = Vec::new();
        let mut largest_buffered = 0;
        for piece in wire.chunks(8 * 1024) {
            src.extend_from_slice(piece);
            largest_buffered = largest_buffered.max(src.len());
            while let Some(packet) = codec.decode(&mut src).unwrap() {
                out.push(packet);
            }
        }
        let Packet::OversizedPublish {
            publish,
            payload_len,
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!((publish.pkid, publish.topic.as_str()), (5, "sensors/big"));
        assert_eq!((payload_len, publish.payload.len()), (&(3 << 20), 0));
        assert_eq!(out[1], Packet::Publish(small));
        assert_eq!(out.len(), 2);
        assert!(largest_buffered <= 16 * 1024, "{largest_buffered}");
    }

    /// Publishes through a started outlet; the returned task ends with the publish's result.
    async fn publish_in_order(
        outlet: &MqttOutlet,
        qos: u8,
    ) -> tokio::task::JoinHandle<Result<(), PublishError>> {
        let before = outlet.lock().as_ref().map_or(0, |o| o.unassigned.len());
        let o = outlet.clone();
        let task = tokio::spawn(async move { o.publish("t".into(), qos, b"x".to_vec()).await });
        // Queued before the next one, as the downlink's lanes would.
        while outlet.lock().as_ref().map_or(0, |o| o.unassigned.len()) == before {
            tokio::task::yield_now().await;
        }
        task
    }

    /// Waits (at most 5 s) until `task` finished. The tests' runtime has one thread, so tasks
    /// notified before it have run by then too: one still unfinished was not notified.
    async fn finished<T>(task: &tokio::task::JoinHandle<T>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !task.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        task.is_finished()
    }

    /// An outlet started on a client whose event loop the test plays itself; the event loop is
    /// returned to keep the request channel open.
    fn started_outlet(max_packet: usize) -> (MqttOutlet, EventLoop) {
        let options = MqttOptions::new("t", "127.0.0.1", 1);
        let (client, eventloop) = AsyncClient::new(options, 100);
        let outlet = MqttOutlet::default();
        outlet.start(client, max_packet);
        outlet.set_connected(true);
        (outlet, eventloop)
    }

    #[tokio::test]
    async fn downlink_publishes_complete_on_their_own_acknowledgement() {
        use rumqttc::{PubAck, PubComp, PubRec};
        let (outlet, _eventloop) = started_outlet(1 << 20);
        let first = publish_in_order(&outlet, 1).await;
        let second = publish_in_order(&outlet, 1).await;
        let third = publish_in_order(&outlet, 2).await;
        let fourth = publish_in_order(&outlet, 1).await;
        let at_most_once = publish_in_order(&outlet, 0).await;
        for pkid in [1, 2, 3] {
            outlet.observe(&Event::Outgoing(Outgoing::Publish(pkid)));
        }
        // The fourth's id is still in use: it waits for that id's acknowledgement.
        outlet.observe(&Event::Outgoing(Outgoing::AwaitAck(1)));
        outlet.observe(&Event::Outgoing(Outgoing::Publish(0)));
        assert!(finished(&at_most_once).await, "QoS 0 is done once written");
        outlet.observe(&Event::Incoming(Packet::PubAck(PubAck::new(2))));
        assert!(finished(&second).await && !first.is_finished());
        // A reconnect resends 1 and 3 with their ids: not new publishes.
        outlet.observe(&Event::Outgoing(Outgoing::Publish(1)));
        outlet.observe(&Event::Outgoing(Outgoing::Publish(3)));
        outlet.observe(&Event::Incoming(Packet::PubRec(PubRec::new(3))));
        outlet.observe(&Event::Incoming(Packet::PubAck(PubAck::new(1))));
        outlet.observe(&Event::Outgoing(Outgoing::Publish(1)));
        assert!(finished(&first).await);
        assert!(!third.is_finished(), "QoS 2 waits for PUBCOMP");
        assert!(!fourth.is_finished());
        outlet.observe(&Event::Incoming(Packet::PubComp(PubComp::new(3))));
        outlet.observe(&Event::Incoming(Packet::PubAck(PubAck::new(1))));
        for task in [first, second, third, fourth, at_most_once] {
            assert!(task.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn downlink_publishes_lost_with_the_broker_session_fail_and_stay_unmatched() {
        use rumqttc::{ConnAck, PubAck};
        let (outlet, _eventloop) = started_outlet(1 << 20);
        let sent = publish_in_order(&outlet, 1).await;
        outlet.observe(&Event::Outgoing(Outgoing::Publish(1)));
        let queued = publish_in_order(&outlet, 1).await;
        // Reconnected to a broker without the session: rumqttc resends neither of them.
        let connack = ConnAck::new(ConnectReturnCode::Success, false);
        outlet.observe(&Event::Incoming(Packet::ConnAck(connack)));
        for lost in [sent, queued] {
            assert!(matches!(
                lost.await.unwrap(),
                Err(PublishError::Unconfirmed(_))
            ));
        }
        // A new publish reusing id 1 completes itself only.
        let next = publish_in_order(&outlet, 1).await;
        outlet.observe(&Event::Outgoing(Outgoing::Publish(1)));
        outlet.observe(&Event::Incoming(Packet::PubAck(PubAck::new(1))));
        assert!(next.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_downlink_message_over_the_packet_limit_is_refused_for_good() {
        let (outlet, _eventloop) = started_outlet(1000);
        let refused = outlet.publish("t".into(), 1, vec![0; 1000]).await;
        assert!(
            refused.as_ref().is_err_and(PublishError::is_permanent),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn downlink_publishes_fail_when_the_source_stops_or_is_down() {
        let options = MqttOptions::new("t", "127.0.0.1", 1);
        let (client, _eventloop) = AsyncClient::new(options, 100);
        let outlet = MqttOutlet::default();
        let refused = outlet.publish("t".into(), 1, vec![]).await;
        assert!(matches!(refused, Err(PublishError::NotRunning)));
        outlet.start(client, 1 << 20);
        let refused = outlet.publish("t".into(), 1, vec![]).await;
        assert!(matches!(refused, Err(PublishError::NotConnected)));
        outlet.set_connected(true);
        let waiting = publish_in_order(&outlet, 1).await;
        outlet.stop();
        assert!(matches!(
            waiting.await.unwrap(),
            Err(PublishError::Unconfirmed(_))
        ));
    }

    #[test]
    fn a_dropped_message_warning_is_let_out_once_a_minute() {
        let mut log = DropLog::default();
        assert_eq!(log.due(), Some(1));
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        log.last = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(log.due(), Some(3));
    }
}
