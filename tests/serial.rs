//! Serial sources over pseudo-terminals (real ttys): framing on the wire, unplug and replug, the
//! downlink handle, and end to end through a converter into Kafka.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgegate::buffer::{self, Buffer};
use edgegate::config::{Config, SourceConfig};
use edgegate::metrics::Metrics;
use edgegate::record::Record;
use edgegate::sources::serial::{self, SerialContext, SerialHandle};
use support::*;
use tokio_util::sync::CancellationToken;

/// One serial source `dev` reading `<dir>/ttyDEV`, run in-process against a real buffer.
struct Harness {
    buffer: Buffer,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    handle: SerialHandle,
    link: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(source_settings: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyDEV");
    let text = format!(
        "[gateway]\nid = \"g\"\ndata_dir = \"{data}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:9\"\ntopic = \"t\"\n\
         [sources.dev]\ntype = \"serial\"\npath = \"{link}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n{source_settings}\n",
        data = dir.path().display(),
        link = link.display(),
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let SourceConfig::Serial(settings) = config.sources["dev"].clone() else {
        panic!("not a serial source");
    };
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer, intake) =
        Buffer::open(dir.path(), &config.buffer, metrics.clone()).unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(buffer::run(buffer.clone(), intake, shutdown.clone()));
    let (ctx, handle) = SerialContext::new(Arc::from("dev"), writer, metrics.clone());
    tokio::spawn(serial::run(settings, ctx, shutdown.clone()));
    Harness {
        buffer,
        metrics,
        shutdown,
        handle,
        link,
        _dir: dir,
    }
}

impl Harness {
    /// Plugs a new device in at the configured path and waits until the source has it open.
    async fn plug(&self) -> Pty {
        let pty = Pty::open();
        pty.link_as(&self.link);
        self.wait_connected(true).await;
        pty
    }

    async fn wait_connected(&self, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!(
            "edgegate_source_connected{{source=\"dev\"}} {}",
            u8::from(up)
        );
        while !self.metrics.encode().contains(&want) {
            assert!(Instant::now() < deadline, "source never became {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Durable records, in order, until `n` arrived (released as they are read).
    async fn records(&self, n: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.buffer.next_chunk())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} records: {out:?}", out.len()))
                .unwrap();
            self.buffer.release_parts(&chunk.parts).unwrap();
            out.extend(chunk.records);
        }
        out
    }

    fn discarded(&self, reason: &str) -> u64 {
        let needle = format!(
            "edgegate_serial_frames_discarded_total{{source=\"dev\",reason=\"{reason}\"}} "
        );
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&needle)?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.payload.clone()).collect()
}

#[tokio::test]
async fn line_frames_arrive_bytewise_batched_and_between_noise() {
    let h = start("max_frame_bytes = 32");
    let mut dev = h.plug().await;
    for b in b"t=21.5\r\n" {
        dev.send(&[*b]);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    dev.send(b"\r\n\nh=40\nb=3.9\n");
    dev.send(&[b'x'; 100]);
    dev.send(b"\nlast\n");
    let records = h.records(4).await;
    assert_eq!(
        payloads(&records),
        [&b"t=21.5"[..], b"h=40", b"b=3.9", b"last"]
    );
    assert_eq!(records[0].meta("port"), Some(h.link.to_str().unwrap()));
    assert_eq!(h.discarded("oversize"), 1);
}

#[tokio::test]
async fn idle_framing_ends_frames_at_silence() {
    let h = start("framing = { mode = \"idle\", gap = \"40ms\" }");
    let mut dev = h.plug().await;
    // A Modbus-like reply in 1-byte pieces closer together than the gap: one frame.
    for b in [0x01, 0x03, 0x02, 0x00, 0x2A, 0xB8, 0x44] {
        dev.send(&[b]);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // A frame split by a pause longer than the gap: two frames.
    dev.send(&[0x02, 0x03]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    dev.send(&[0x04]);
    let records = h.records(3).await;
    assert_eq!(
        payloads(&records),
        [
            &[0x01, 0x03, 0x02, 0x00, 0x2A, 0xB8, 0x44][..],
            &[0x02, 0x03],
            &[0x04]
        ]
    );
}

#[tokio::test]
async fn fixed_and_length_prefixed_frames_over_a_tty() {
    let h = start("framing = { mode = \"length_prefixed\", length_bytes = 2, offset = 1 }");
    let mut dev = h.plug().await;
    dev.send(&[0xAA, 0x00, 0x02, 0x10, 0x20, 0xAA, 0x00]);
    dev.send(&[0x01, 0x30]);
    let records = h.records(2).await;
    assert_eq!(
        payloads(&records),
        [
            &[0xAA, 0x00, 0x02, 0x10, 0x20][..],
            &[0xAA, 0x00, 0x01, 0x30]
        ]
    );
    drop(h);
    let h = start("framing = { mode = \"fixed\", size = 4 }");
    let mut dev = h.plug().await;
    dev.send(&[1, 2, 3, 4, 5, 6]);
    dev.send(&[7, 8, 9]);
    let records = h.records(2).await;
    assert_eq!(payloads(&records), [&[1, 2, 3, 4][..], &[5, 6, 7, 8]]);
}

#[tokio::test]
async fn a_corrupt_length_field_costs_one_quiet_gap_not_the_stream() {
    let h =
        start("framing = { mode = \"length_prefixed\", length_bytes = 4, resync_gap = \"50ms\" }");
    let mut dev = h.plug().await;
    // Line noise turned a length field into 4 GiB; the device then pauses between replies.
    dev.send(&[0xFF, 0xFF, 0xFF, 0xF0, 0x01, 0x02]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frame = [0x00, 0x00, 0x00, 0x02, 0xA1, 0xA2];
    dev.send(&frame.repeat(3));
    let records = h.records(3).await;
    assert_eq!(payloads(&records), vec![frame.to_vec(); 3]);
    assert_eq!(h.discarded("oversize"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_for_the_buffer_is_not_a_quiet_line() {
    // One frame may wait for its commit, and commits of serial frames linger far longer than the
    // resync gap: reading pauses mid-frame while the rest of the frame waits in the tty.
    let h = start(
        "max_pending = 1\nframing = { mode = \"length_prefixed\", length_bytes = 4, resync_gap = \"50ms\" }\n\
         [buffer]\nserial_commit_linger = \"600ms\"",
    );
    let mut dev = h.plug().await;
    let frames: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![0, 0, 0, 2, i, i]).collect();
    dev.send(&[frames[0].as_slice(), &frames[1][..3]].concat());
    tokio::time::sleep(Duration::from_millis(10)).await;
    dev.send(&[&frames[1][3..], frames[2].as_slice()].concat());
    let records = h.records(3).await;
    assert_eq!(payloads(&records), frames);
    assert_eq!(h.discarded("incomplete"), 0);
}

#[tokio::test]
async fn unplug_and_replug_while_data_flows_loses_nothing_already_read() {
    let h = start("");
    let mut dev = h.plug().await;
    for i in 0..50 {
        dev.send(format!("before-{i}\n").as_bytes());
    }
    let before = h.records(50).await;
    dev.send(b"cut-off-mid-fra");
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(dev);
    h.wait_connected(false).await;
    // The path is gone while unplugged; the source keeps trying.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut dev = h.plug().await;
    for i in 0..50 {
        dev.send(format!("after-{i}\n").as_bytes());
    }
    let after = h.records(50).await;
    let want_before: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("before-{i}").into_bytes())
        .collect();
    let want_after: Vec<Vec<u8>> = (0..50).map(|i| format!("after-{i}").into_bytes()).collect();
    assert_eq!(payloads(&before), want_before);
    assert_eq!(payloads(&after), want_after);
    assert_eq!(h.discarded("incomplete"), 1, "the cut frame is counted");
}

#[tokio::test]
async fn a_port_missing_at_start_is_opened_when_it_appears() {
    let h = start("");
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.wait_connected(false).await;
    let mut dev = h.plug().await;
    dev.send(b"hello\n");
    assert_eq!(payloads(&h.records(1).await), [b"hello".to_vec()]);
}

#[tokio::test]
async fn the_downlink_writes_through_the_open_port() {
    let h = start("");
    let mut dev = h.plug().await;
    h.handle.write(b"SET 21.0\r\n".to_vec()).await.unwrap();
    assert_eq!(dev.receive(10, Duration::from_secs(5)), b"SET 21.0\r\n");
    drop(dev);
    h.wait_connected(false).await;
    let err = h.handle.write(b"x".to_vec()).await.unwrap_err();
    assert!(err.to_string().contains("not open"), "{err}");
}

/// A 12-byte binary sensor frame: marker, id (u16 BE), temperature (i16 BE, 0.1 °C), humidity
/// (%), battery (u16 BE, mV), status 0xFF, two spare bytes, checksum.
fn sensor_frame(id: u16, deci_celsius: i16, humidity: u8, millivolts: u16) -> Vec<u8> {
    let mut f = vec![0xA5];
    f.extend(id.to_be_bytes());
    f.extend(deci_celsius.to_be_bytes());
    f.push(humidity);
    f.extend(millivolts.to_be_bytes());
    f.extend([0xFF, 0x00, 0x00]);
    f.push(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    f
}

const SENSOR_DECODER: &str = r#"
var id = (payload[1] << 8) | payload[2];
var t = (payload[3] << 8) | payload[4];
if (t & 0x8000) t -= 0x10000;
return {
  deviceName: metadata.deviceName + '-' + id,
  deviceType: metadata.deviceType,
  attributes: { port: metadata.port },
  telemetry: { temperature: t / 10, humidity: payload[5], battery: ((payload[6] << 8) | payload[7]) / 1000 }
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_sensor_frame_becomes_a_device_record_in_kafka() {
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyUSB0");
    let mut dev = Pty::open();
    dev.link_as(&link);
    std::fs::write(dir.path().join("sensor.js"), SENSOR_DECODER).unwrap();
    let config = dir.path().join("edgegate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw-serial\"\ndata_dir = \"{data}\"\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"uplink\"\n\
             [sources.rs485]\ntype = \"serial\"\npath = \"{link}\"\nbaud_rate = 115200\nframing = {{ mode = \"fixed\", size = 12 }}\n\
             converter = \"sensor\"\ndevice_name = \"TH\"\ndevice_type = \"thermo-hygrometer\"\n\
             [converters.sensor]\nscript = \"sensor.js\"\n",
            data = dir.path().join("data").display(),
            bootstrap = kafka.bootstrap(),
            link = link.display(),
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config);
    gw.wait_for("serial port open", Duration::from_secs(10));
    let frame = sensor_frame(7, -125, 61, 3650);
    assert_eq!(frame.len(), 12);
    for b in &frame {
        dev.send(&[*b]);
    }
    let msgs = consume(&kafka.bootstrap(), "uplink", 1, Duration::from_secs(30));
    assert_eq!(msgs.len(), 1, "log:\n{}", gw.log());
    let m = &msgs[0];
    assert_eq!(m.key.as_deref(), Some(&b"TH-7"[..]));
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["deviceType"], "thermo-hygrometer");
    assert_eq!(v["attributes"]["port"], link.display().to_string());
    assert_eq!(
        v["telemetry"][0]["values"],
        serde_json::json!({"temperature": -12.5, "humidity": 61, "battery": 3.65})
    );
    assert_eq!(m.header("edgegate-source"), "rs485");
    assert_eq!(m.header("edgegate-port"), link.display().to_string());
}

/// `max_pending` frames at most wait for durability: with the buffer full (`block`) the source
/// stops reading and the tty holds the rest, which all arrive, in order, once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_stops_reading_at_max_pending_and_loses_nothing() {
    let h = start(
        "max_pending = 5\n[buffer]\nmax_bytes = \"1MiB\"\nwhen_full = \"block\"\ncommit_linger = \"0s\"\nserial_commit_linger = \"0s\"",
    );
    let mut dev = h.plug().await;
    let frames: Vec<Vec<u8>> = (0..1500)
        .map(|i| {
            let mut f = format!("{i:05}|").into_bytes();
            f.resize(999, b'x');
            f
        })
        .collect();
    // The tty fills up while the source waits, so the device writes from a thread of its own.
    let writer = std::thread::spawn({
        let frames = frames.clone();
        move || {
            for f in &frames {
                dev.send(&[f.as_slice(), b"\n"].concat());
            }
            dev
        }
    });
    let received = h.metrics.source_in("dev");
    // Reading has stopped once the count holds still for half a second.
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.get() != last {
        assert!(
            Instant::now() < deadline,
            "the source never stopped reading"
        );
        last = received.get();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stored = h.buffer.stats().records;
    assert!(stored < 1500, "the buffer was never full: {stored} stored");
    assert!(
        last - stored <= 5,
        "{} frames waited for durability, more than max_pending",
        last - stored
    );
    let records = h.records(1500).await;
    assert_eq!(
        payloads(&records),
        frames,
        "frames lost or reordered under back-pressure"
    );
    drop(writer.join().unwrap());
}
