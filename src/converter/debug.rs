//! ThingsBoard-style converter debug events (Type / In / Out / Metadata / Error) as JSON lines under
//! `<data_dir>/debug/<converter>.jsonl`, bounded in size: when a file would pass `max_bytes` it
//! becomes `<converter>.jsonl.1` (replacing the previous one) and a new file starts.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::DebugMode;
use crate::metrics::live::{truncate, truncate_metadata, DebugEventView, DebugRing};

/// How long `debug = "all"` records everything after start before falling back to failures only.
pub const ALL_EVENTS_WINDOW: Duration = Duration::from_secs(15 * 60);

pub struct DebugLog {
    mode: DebugMode,
    all_until: Instant,
    path: PathBuf,
    max_bytes: u64,
    file: Option<BufWriter<File>>,
    written: u64,
    broken: bool,
    /// The status page's ring of recent events, and this converter's name in it.
    shared: Option<(Arc<str>, DebugRing)>,
}

/// Which way a converter works; ThingsBoard shows it as the event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A decoder: device payload to entities.
    Uplink,
    /// An encoder: command to device messages.
    Downlink,
}

/// One conversion, as the debug log records it.
pub struct DebugEvent<'a> {
    pub direction: Direction,
    /// The record's buffer sequence number (uplink) or the command's Kafka offset (downlink).
    pub seq: u64,
    pub payload: &'a [u8],
    pub metadata: &'a [(&'a str, &'a str)],
    /// The encoder's `msgType`; decoders have none.
    pub msg_type: Option<&'a str>,
    pub output: Option<&'a Value>,
    pub error: Option<&'a str>,
}

impl DebugLog {
    pub fn new(mode: DebugMode, path: PathBuf, max_bytes: u64) -> DebugLog {
        DebugLog {
            mode,
            all_until: Instant::now() + ALL_EVENTS_WINDOW,
            path,
            max_bytes,
            file: None,
            written: 0,
            broken: false,
            shared: None,
        }
    }

    /// Also keeps every recorded event, truncated, in `ring` (the status page's).
    pub fn share_with(&mut self, converter: &str, ring: DebugRing) {
        self.shared = Some((Arc::from(converter), ring));
    }

    pub fn disabled() -> DebugLog {
        DebugLog::new(DebugMode::Off, PathBuf::new(), 0)
    }

    /// Whether a successful conversion would be recorded now.
    pub fn wants_successes(&self) -> bool {
        self.mode == DebugMode::All && Instant::now() < self.all_until
    }

    pub fn record(&mut self, event: &DebugEvent<'_>) {
        let wanted = match self.mode {
            DebugMode::Off => false,
            DebugMode::Failures => event.error.is_some(),
            DebugMode::All => event.error.is_some() || self.wants_successes(),
        };
        if !wanted {
            return;
        }
        if let Some((converter, ring)) = &self.shared {
            ring.push(event_view(converter, event));
        }
        if self.broken {
            return;
        }
        let line = super::number::to_string_js(&event_json(event));
        if let Err(e) = self.write_line(&line) {
            // Debugging must never hurt the pipeline: say so once and stop recording.
            tracing::warn!(path = %self.path.display(), error = %e, "converter debug log disabled");
            self.broken = true;
            self.file = None;
        }
    }

    /// Makes recorded events visible to readers; called once per chunk, not per event.
    pub fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.file.is_some() && self.written + len > self.max_bytes {
            self.rotate()?;
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.written = f.metadata()?.len();
            self.file = Some(BufWriter::new(f));
            if self.written + len > self.max_bytes && self.written > 0 {
                self.rotate()?;
                return self.write_line(line);
            }
        }
        if let Some(f) = &mut self.file {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
        }
        self.written += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, old)?;
        self.written = 0;
        Ok(())
    }
}

/// The event as the status page shows it, its texts bounded.
fn event_view(converter: &str, event: &DebugEvent<'_>) -> DebugEventView {
    let (input, in_base64) = match std::str::from_utf8(event.payload) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(event.payload),
            true,
        ),
    };
    let (input, mut truncated) = truncate(&input);
    let (metadata, cut) = truncate_metadata(event.metadata);
    let out = event.output.map(|v| {
        let (text, cut) = truncate(&super::number::to_string_js(v));
        truncated |= cut;
        text
    });
    let error = event.error.map(|e| {
        let (text, cut) = truncate(e);
        truncated |= cut;
        text
    });
    DebugEventView {
        ts_ms: crate::record::now_ms(),
        converter: converter.to_owned(),
        direction: direction_name(event.direction).to_owned(),
        seq: event.seq,
        input,
        in_base64,
        metadata,
        msg_type: event.msg_type.map(str::to_owned),
        out,
        error,
        truncated: truncated || cut,
    }
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Uplink => "Uplink",
        Direction::Downlink => "Downlink",
    }
}

fn event_json(event: &DebugEvent<'_>) -> Value {
    let metadata: serde_json::Map<String, Value> = event
        .metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    let direction = direction_name(event.direction);
    let mut v = json!({
        "ts": crate::record::now_ms(),
        "type": direction,
        "seq": event.seq,
        "metadata": metadata,
        "out": event.output,
        "error": event.error,
    });
    if let Some(msg_type) = event.msg_type {
        v["msgType"] = msg_type.into();
    }
    match std::str::from_utf8(event.payload) {
        Ok(text) => v["in"] = text.into(),
        Err(_) => {
            v["inBase64"] = base64::engine::general_purpose::STANDARD
                .encode(event.payload)
                .into()
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(error: Option<&str>) -> DebugEvent<'_> {
        DebugEvent {
            direction: Direction::Uplink,
            seq: 1,
            payload: b"{\"a\":1}",
            metadata: &[("topic", "t")],
            msg_type: None,
            output: None,
            error,
        }
    }

    #[test]
    fn failures_mode_records_only_errors_and_rotates_at_the_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("debug/c.jsonl");
        let mut log = DebugLog::new(DebugMode::Failures, path.clone(), 400);
        log.record(&event(None));
        log.flush();
        assert!(!path.exists(), "a success was recorded in failures mode");
        for _ in 0..10 {
            log.record(&event(Some("TypeError: boom")));
        }
        log.flush();
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(path.with_extension("jsonl.1")).unwrap();
        assert!(current.len() <= 400 && rotated.len() <= 400);
        let first: Value = serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["error"], "TypeError: boom");
        assert_eq!(first["type"], "Uplink");
        assert_eq!(first["in"], "{\"a\":1}");
        assert_eq!(first["metadata"]["topic"], "t");
    }

    #[test]
    fn recorded_events_reach_the_shared_ring_even_when_the_file_cannot_be_written() {
        let ring = DebugRing::default();
        let mut log = DebugLog::new(
            DebugMode::Failures,
            PathBuf::from("/proc/no/such.jsonl"),
            400,
        );
        log.share_with("tb", ring.clone());
        log.record(&event(None));
        log.record(&event(Some("TypeError: boom")));
        log.record(&event(Some("TypeError: again")));
        let events = ring.events();
        assert_eq!(events.len(), 2, "a success was shared in failures mode");
        assert_eq!(events[0].converter, "tb");
        assert_eq!(events[0].input, "{\"a\":1}");
        assert_eq!(events[1].error.as_deref(), Some("TypeError: again"));
        assert_eq!(events[1].metadata["topic"], "t");
    }

    #[test]
    fn all_mode_records_successes_inside_its_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let mut log = DebugLog::new(DebugMode::All, path.clone(), 1 << 20);
        log.record(&event(None));
        log.all_until = Instant::now();
        log.record(&event(None));
        log.record(&event(Some("x")));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
