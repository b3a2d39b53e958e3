//! What the status view needs besides counters: the Kafka link's state with its reason and since
//! when, each converter's last error, the last converter debug events and the sampled history.
//! Written where things happen (a state change, a failed record), never per delivered record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::record::now_ms;
use crate::status::history::History;

/// The Kafka link as the forwarder last set it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkRecord {
    /// `up`, `down`, `refused` or `unknown` (nothing confirmed or refused yet).
    pub state: String,
    pub reason: Option<String>,
    pub since_ms: u64,
}

/// A converter's last failed record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastError {
    pub kind: String,
    pub message: String,
    pub at_ms: u64,
}

/// Converter debug events kept in memory for the status page.
pub const DEBUG_EVENTS: usize = 20;
/// Longest payload, output or metadata value kept per event, in bytes.
pub const DEBUG_TEXT_BYTES: usize = 1024;
/// Most metadata entries kept per event.
const DEBUG_METADATA_ENTRIES: usize = 32;

/// One conversion as ThingsBoard's debug tab shows it (In, Out, Metadata, Error), truncated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DebugEventView {
    pub ts_ms: u64,
    pub converter: String,
    /// `Uplink` (a decoder) or `Downlink` (an encoder).
    #[serde(rename = "type")]
    pub direction: String,
    /// The record's buffer sequence number, or the command's Kafka offset.
    pub seq: u64,
    /// The payload as text, or base64 when it is not UTF-8 (`in_base64`).
    #[serde(rename = "in")]
    pub input: String,
    pub in_base64: bool,
    pub metadata: BTreeMap<String, String>,
    pub msg_type: Option<String>,
    /// The script's output as JSON text.
    pub out: Option<String>,
    pub error: Option<String>,
    /// Some text was cut to [`DEBUG_TEXT_BYTES`].
    pub truncated: bool,
}

/// The last [`DEBUG_EVENTS`] debug events of every converter, newest last. Cloned into each
/// converter's debug log; only records the log records (its `debug` mode) reach it.
#[derive(Clone, Default)]
pub struct DebugRing(Arc<Mutex<VecDeque<DebugEventView>>>);

impl DebugRing {
    pub fn push(&self, event: DebugEventView) {
        let mut ring = lock(&self.0);
        if ring.len() == DEBUG_EVENTS {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    pub fn events(&self) -> Vec<DebugEventView> {
        lock(&self.0).iter().cloned().collect()
    }
}

/// `text` cut to at most [`DEBUG_TEXT_BYTES`] on a character boundary; true when cut.
pub fn truncate(text: &str) -> (String, bool) {
    if text.len() <= DEBUG_TEXT_BYTES {
        return (text.to_owned(), false);
    }
    let mut end = DEBUG_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (format!("{}…", &text[..end]), true)
}

/// Metadata entries for a [`DebugEventView`], bounded in number and size; true when cut.
pub fn truncate_metadata(metadata: &[(&str, &str)]) -> (BTreeMap<String, String>, bool) {
    let mut cut = metadata.len() > DEBUG_METADATA_ENTRIES;
    let kept = metadata
        .iter()
        .take(DEBUG_METADATA_ENTRIES)
        .map(|(k, v)| {
            let (k, key_cut) = truncate(k);
            let (v, value_cut) = truncate(v);
            cut |= key_cut || value_cut;
            (k, v)
        })
        .collect();
    (kept, cut)
}

pub struct Live {
    pub started: Instant,
    pub started_ms: u64,
    link: Mutex<LinkRecord>,
    last_errors: Mutex<BTreeMap<String, LastError>>,
    pub debug_events: DebugRing,
    pub history: History,
}

impl Default for Live {
    fn default() -> Live {
        let started_ms = now_ms();
        Live {
            started: Instant::now(),
            started_ms,
            link: Mutex::new(LinkRecord {
                state: "unknown".into(),
                reason: None,
                since_ms: started_ms,
            }),
            last_errors: Mutex::default(),
            debug_events: DebugRing::default(),
            history: History::default(),
        }
    }
}

impl Live {
    /// A new link state; the forwarder calls it once per change.
    pub fn set_link(&self, state: &str, reason: Option<String>) {
        *lock(&self.link) = LinkRecord {
            state: state.to_owned(),
            reason,
            since_ms: now_ms(),
        };
    }

    /// A better reason for the state in force (a refusal's detail), keeping its `since`.
    pub fn explain_link(&self, reason: String) {
        lock(&self.link).reason = Some(reason);
    }

    pub fn link(&self) -> LinkRecord {
        lock(&self.link).clone()
    }

    pub fn converter_failed(&self, converter: &str, kind: &str, message: String) {
        // Messages quote payloads ("bad payload: " + text): keep as much as a debug event.
        let error = LastError {
            kind: kind.to_owned(),
            message: truncate(&message).0,
            at_ms: now_ms(),
        };
        let mut errors = lock(&self.last_errors);
        match errors.get_mut(converter) {
            Some(last) => *last = error,
            None => {
                errors.insert(converter.to_owned(), error);
            }
        }
    }

    pub fn last_error(&self, converter: &str) -> Option<LastError> {
        lock(&self.last_errors).get(converter).cloned()
    }
}

/// A panic elsewhere while holding one of these locks leaves plain data behind; keep using it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_events_and_text_is_cut_on_a_char_boundary() {
        let ring = DebugRing::default();
        for seq in 0..(DEBUG_EVENTS as u64 + 5) {
            ring.push(DebugEventView {
                ts_ms: 0,
                converter: "c".into(),
                direction: "Uplink".into(),
                seq,
                input: String::new(),
                in_base64: false,
                metadata: BTreeMap::new(),
                msg_type: None,
                out: None,
                error: None,
                truncated: false,
            });
        }
        let events = ring.events();
        assert_eq!(events.len(), DEBUG_EVENTS);
        assert_eq!(events[0].seq, 5);
        let long = "é".repeat(DEBUG_TEXT_BYTES);
        let (cut, truncated) = truncate(&long);
        assert!(truncated && cut.len() <= DEBUG_TEXT_BYTES + "…".len());
        assert_eq!(truncate("short"), ("short".into(), false));
    }
}
