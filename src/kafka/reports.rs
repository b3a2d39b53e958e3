//! The thread that serves librdkafka's delivery reports, asleep until librdkafka has some.
//!
//! rdkafka's `ThreadedProducer` polls in 100 ms rounds and busy-waits the last fraction of a
//! millisecond of every round, because its deadline loop hands librdkafka whole milliseconds:
//! 0.8% of a core on an idle gateway. Instead, librdkafka writes a byte to a socket when its event
//! queue turns non-empty (`rd_kafka_queue_io_event_enable`), and this thread sleeps in `read` on
//! the other end.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::producer::{BaseProducer, Producer};

use super::SinkContext;

type Client = BaseProducer<SinkContext>;

/// A safety net only: librdkafka's wake-up is what normally ends the sleep.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Events served per pass before the stop flag is looked at again.
const EVENTS_PER_PASS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ReportsError {
    /// The wake-up socket or the thread could not be created (out of descriptors or threads):
    /// the producer cannot be used. The forwarder stops with this error, the gateway exits
    /// non-zero and systemd restarts it; buffered records stay on disk.
    #[error("starting the delivery report thread: {0}")]
    Start(#[from] std::io::Error),
}

/// Stops and joins the report thread when dropped; drop it before the producer.
pub struct ReportThread {
    stop: Arc<AtomicBool>,
    waker: UnixStream,
    handle: Option<JoinHandle<()>>,
}

impl ReportThread {
    pub fn start(producer: Arc<Client>) -> Result<ReportThread, ReportsError> {
        ReportThread::start_with(producer, IDLE_POLL)
    }

    fn start_with(
        producer: Arc<Client>,
        idle_poll: Duration,
    ) -> Result<ReportThread, ReportsError> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        // librdkafka's write must never block its own threads; a full socket already means "wake".
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_read_timeout(Some(idle_poll))?;
        let waker = wake_tx.try_clone()?;
        let queue = MainQueue::wake_on_event(&producer, wake_tx);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name("kafka-reports".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    serve(&producer, &queue, wake_rx, &stop);
                    // The queue reference goes back before this thread's hold on the client.
                    drop(queue);
                    drop(producer);
                }
            })?;
        Ok(ReportThread {
            stop,
            waker,
            handle: Some(handle),
        })
    }
}

impl Drop for ReportThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = (&self.waker).write(&[1]);
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("kafka delivery report thread panicked");
            }
        }
    }
}

fn serve(producer: &Client, queue: &MainQueue, mut wake: UnixStream, stop: &AtomicBool) {
    let mut bytes = [0u8; 64];
    while !stop.load(Ordering::Acquire) {
        let mut served = 0;
        while queue.len() > 0 && served < EVENTS_PER_PASS {
            producer.poll(Duration::ZERO);
            served += 1;
        }
        if served < EVENTS_PER_PASS {
            // Ok, a timeout or an interruption all lead to the same look at the queue.
            let _ = wake.read(&mut bytes);
        }
    }
}

/// A reference to the producer's main event queue with IO wake-ups switched on; dropping it
/// switches them off before the socket they write to is closed.
struct MainQueue {
    queue: *mut rdsys::rd_kafka_queue_t,
    _wake: UnixStream,
}

// SAFETY: librdkafka queues are thread-safe; the pointer is only used through librdkafka's API.
unsafe impl Send for MainQueue {}
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn wake_on_event(producer: &Client, wake: UnixStream) -> MainQueue {
        // SAFETY: the client handle is valid while `producer` lives, and the thread holding this
        // queue holds the producer too; the reference is released in Drop, before the client.
        let queue = unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        // SAFETY: the payload is static and `wake` stays open until Drop switches this off.
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(queue, wake.as_raw_fd(), b"1".as_ptr().cast(), 1)
        };
        MainQueue { queue, _wake: wake }
    }

    fn len(&self) -> usize {
        // SAFETY: `queue` is a live reference (released only in Drop).
        unsafe { rdsys::rd_kafka_queue_length(self.queue) }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: `queue` is a live reference; -1 switches IO events off, then it is released.
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(self.queue, -1, std::ptr::null(), 0);
            rdsys::rd_kafka_queue_destroy(self.queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::BaseRecord;
    use std::time::Instant;
    use tokio::sync::mpsc;

    /// With the safety-net poll half a minute long, only librdkafka's wake-up can deliver the report in
    /// time, and only the stop wake-up can end the thread promptly.
    #[test]
    fn reports_arrive_by_wake_up_and_the_thread_stops_at_once() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let (deliveries, mut reports) = mpsc::unbounded_channel();
        let (events, _events) = mpsc::unbounded_channel();
        let producer: Arc<Client> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .create_with_context(SinkContext { deliveries, events })
                .unwrap(),
        );
        let thread = ReportThread::start_with(producer.clone(), Duration::from_secs(30)).unwrap();
        for seq in 0..3 {
            let opaque = Box::new(super::super::Opaque {
                seq,
                part: 0,
                captured_ms: 0,
            });
            producer
                .send(
                    BaseRecord::with_opaque_to("t", opaque)
                        .payload("p")
                        .key("k"),
                )
                .map_err(|(e, _)| e)
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let report = loop {
                match reports.try_recv() {
                    Ok(report) => break report,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("no delivery report for record {seq}: {e}"),
                }
            };
            assert_eq!(
                (report.seq, report.outcome),
                (seq, super::super::Outcome::Delivered)
            );
        }
        let stopping = Instant::now();
        drop(thread);
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "the report thread did not stop"
        );
    }
}
