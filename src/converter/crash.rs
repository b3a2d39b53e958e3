//! Remembers across process crashes which records the converter was working on, so that a record
//! that ends the process (a crash inside QuickJS, the watchdog aborting a script stuck past
//! `WatchdogSec`, an out-of-memory kill) is given up after its second crash instead of
//! crash-looping the gateway.
//!
//! Before each chunk the converter thread writes the chunk's range to
//! `<data_dir>/converter.inflight`, and `idle` after it. A range found there at start-up was being
//! converted when the last run died: its records are converted one by one, each named in the file
//! first. A record named there at start-up ended the process twice: it fails without running.
//! Only process crashes matter here, so the file is not fsynced: the page cache survives them.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

const FILE_NAME: &str = "converter.inflight";
/// Every marker is written at offset 0 padded to this length, so no truncation is needed.
const MARKER_LEN: usize = 96;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Marker {
    Idle,
    Chunk(Range<u64>),
    Record { seq: u64, chunk: Range<u64> },
}

impl Marker {
    fn parse(text: &str) -> Marker {
        let numbers: Vec<u64> = text
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect();
        match (text.split_whitespace().next(), numbers.as_slice()) {
            (Some("chunk"), [a, b]) => Marker::Chunk(*a..*b),
            (Some("record"), [seq, a, b]) => Marker::Record {
                seq: *seq,
                chunk: *a..*b,
            },
            _ => Marker::Idle,
        }
    }

    fn bytes(&self) -> [u8; MARKER_LEN] {
        let text = match self {
            Marker::Idle => "idle".to_owned(),
            Marker::Chunk(r) => format!("chunk {} {}", r.start, r.end),
            Marker::Record { seq, chunk } => format!("record {seq} {} {}", chunk.start, chunk.end),
        };
        let mut out = [b' '; MARKER_LEN];
        let n = text.len().min(MARKER_LEN - 1);
        out[..n].copy_from_slice(&text.as_bytes()[..n]);
        out[MARKER_LEN - 1] = b'\n';
        out
    }
}

struct Shared {
    file: Option<File>,
    stopping: bool,
}

/// The converter thread's record of what it is converting; see the module docs.
pub struct CrashLog {
    shared: Arc<Mutex<Shared>>,
    /// Records being converted when the last run died.
    suspect: Option<Range<u64>>,
    /// The record being converted when a run died while converting one by one.
    poison: Option<u64>,
}

/// Lets shutdown mark the converter idle: a record interrupted by a clean stop is no suspect.
#[derive(Clone)]
pub struct StopHandle(Arc<Mutex<Shared>>);

impl StopHandle {
    pub fn stop(&self) {
        let mut shared = lock(&self.0);
        write(&mut shared, &Marker::Idle);
        shared.stopping = true;
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(shared: &mut Shared, marker: &Marker) {
    if shared.stopping {
        return;
    }
    let Some(file) = &shared.file else { return };
    if let Err(e) = file.write_all_at(&marker.bytes(), 0) {
        tracing::warn!(error = %e, "cannot write the converter's in-flight marker; crash-loop protection is off");
        shared.file = None;
    }
}

impl CrashLog {
    /// Reads what the last run left and starts recording; without a writable file the converter
    /// works on, unprotected.
    pub fn open(data_dir: &Path) -> CrashLog {
        let path: PathBuf = data_dir.join(FILE_NAME);
        let left = std::fs::read_to_string(&path).unwrap_or_default();
        let (suspect, poison) = match Marker::parse(&left) {
            Marker::Idle => (None, None),
            Marker::Chunk(chunk) => {
                tracing::warn!(
                    first_seq = chunk.start,
                    end_seq = chunk.end,
                    "the last run ended while converting these records; converting them one by one"
                );
                (Some(chunk), None)
            }
            Marker::Record { seq, chunk } => {
                tracing::error!(
                    seq,
                    "the last two runs ended while converting this record; it is given up"
                );
                (Some(chunk), Some(seq))
            }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .inspect_err(|e| {
                tracing::warn!(path = %path.display(), error = %e,
                "cannot open the converter's in-flight marker; crash-loop protection is off")
            })
            .ok();
        CrashLog {
            shared: Arc::new(Mutex::new(Shared {
                file,
                stopping: false,
            })),
            suspect,
            poison,
        }
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    pub fn begin_chunk(&self, chunk: &Range<u64>) {
        write(&mut lock(&self.shared), &Marker::Chunk(chunk.clone()));
    }

    /// Whether `seq` ended the process twice: give it up without running it.
    pub fn is_poison(&self, seq: u64) -> bool {
        self.poison == Some(seq)
    }

    /// Call before converting `seq`: a suspect record is named in the marker first.
    pub fn begin_record(&self, seq: u64, chunk: &Range<u64>) {
        if self.suspect.as_ref().is_some_and(|s| s.contains(&seq)) {
            let marker = Marker::Record {
                seq,
                chunk: chunk.clone(),
            };
            write(&mut lock(&self.shared), &marker);
        }
    }

    /// The chunk is converted; suspicion ends once the suspect records have all been through.
    pub fn end_chunk(&mut self, chunk: &Range<u64>) {
        write(&mut lock(&self.shared), &Marker::Idle);
        if self.suspect.as_ref().is_some_and(|s| chunk.end >= s.end) {
            self.suspect = None;
            self.poison = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_ends_two_runs_is_poison_and_a_clean_stop_suspects_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 5..10;
        // Run 1 dies converting the chunk.
        let run = CrashLog::open(dir.path());
        run.begin_chunk(&chunk);
        run.begin_record(7, &chunk);
        drop(run);
        // Run 2 converts it one by one and dies on record 7.
        let run = CrashLog::open(dir.path());
        assert!(!run.is_poison(7));
        run.begin_chunk(&chunk);
        run.begin_record(6, &chunk);
        run.begin_record(7, &chunk);
        drop(run);
        // Run 3 gives record 7 up, converts the rest and ends the suspicion.
        let mut run = CrashLog::open(dir.path());
        assert!(run.is_poison(7));
        assert!(!run.is_poison(6));
        run.begin_chunk(&chunk);
        run.begin_record(8, &chunk);
        run.end_chunk(&chunk);
        assert!(!run.is_poison(7));
        drop(run);
        // Run 4 stops cleanly in the middle of a suspect record: nothing is suspected after.
        let run = CrashLog::open(dir.path());
        assert!(!run.is_poison(7));
        run.begin_chunk(&(10..20));
        run.stop_handle().stop();
        run.begin_chunk(&(20..30));
        drop(run);
        let run = CrashLog::open(dir.path());
        assert!(run.suspect.is_none() && run.poison.is_none());
    }

    #[test]
    fn markers_round_trip() {
        for m in [
            Marker::Idle,
            Marker::Chunk(3..1027),
            Marker::Record {
                seq: u64::MAX - 1,
                chunk: u64::MAX - 5..u64::MAX,
            },
        ] {
            let bytes = m.bytes();
            assert_eq!(Marker::parse(std::str::from_utf8(&bytes).unwrap()), m);
        }
    }
}
