//! The serial framers against small reference models, one fuzz target per framing mode.
//!
//! Fuzzer bytes become the framing's settings, `max_frame_bytes` (as `check` accepts them) and a
//! sequence of events: bytes arriving in pieces of any size, the line going quiet (`idle`), the
//! port going away (`reset`). Settings `Framing::validate` refuses are skipped, as the gateway
//! never starts a framer with them. After every event the framer must agree exactly with the
//! model (frames, oversize and incomplete counts, whether a partial frame waits), no frame may be
//! empty or exceed `max_frame_bytes`, and what the framer holds for the partial frame stays within
//! `max_frame_bytes` (plus the delimiter's length for delimited modes).
//!
//! The models take the stream one byte at a time and keep whole segments, no bounds, no
//! shortcuts: a different algorithm from the framer's, for the same documented behaviour.

use arbitrary::{Arbitrary, Result, Unstructured};
use edgegate::sources::framing::{Endian, Framer, Framing, Output};

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Line,
    Delimiter,
    Fixed,
    LengthPrefixed,
    Idle,
}

#[derive(Debug, Arbitrary)]
enum Event {
    Push(Vec<u8>),
    Idle,
    Reset,
}

/// Runs one input; panics on any disagreement.
pub fn run(kind: Kind, data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((framing, max)) = settings(kind, &mut u) else {
        return;
    };
    // `check` refuses these (config::validate_serial): the gateway never builds such a framer.
    if framing.validate(max).is_err() {
        return;
    }
    let Ok(events) = Vec::<Event>::arbitrary_take_rest(u) else {
        return;
    };
    let mut framer = Framer::new(&framing, max);
    let mut model = Model::new(&framing, max);
    let slack = match kind {
        Kind::Line => 1,
        Kind::Delimiter => model.delimiter.len(),
        _ => 0,
    };
    for event in events {
        let (got, want) = match event {
            Event::Push(bytes) => (framer.push(&bytes), model.push(&bytes)),
            Event::Idle => (framer.idle(), model.idle()),
            Event::Reset => {
                let had = model.has_partial();
                assert_eq!(framer.reset(), had, "reset() after {framing:?}, max {max}");
                model.reset();
                (Output::default(), Output::default())
            }
        };
        for frame in &got.frames {
            assert!(!frame.is_empty(), "empty frame ({framing:?})");
            assert!(
                frame.len() <= max,
                "frame of {} bytes, max_frame_bytes {max} ({framing:?})",
                frame.len()
            );
        }
        assert_eq!(got, want, "{framing:?}, max_frame_bytes {max}");
        assert_eq!(
            framer.has_partial(),
            model.has_partial(),
            "has_partial ({framing:?}, max {max})"
        );
        assert!(
            framer.buffered_bytes() <= max.saturating_add(slack),
            "{} bytes held for a partial frame, max_frame_bytes {max} ({framing:?})",
            framer.buffered_bytes()
        );
    }
}

/// What `check` lets through for `max_frame_bytes`: above 0, four of them within a u64
/// `buffer.max_bytes`. Mostly small, so that frames reach it.
fn max_frame_bytes(u: &mut Unstructured) -> Result<usize> {
    let max = match u.int_in_range(0u8..=3)? {
        0 => u.int_in_range(1..=16)?,
        1 => u.int_in_range(1..=4096)?,
        2 => u.int_in_range(1..=u64::from(u32::MAX))?,
        _ => u.int_in_range(1..=u64::MAX / 4)?,
    };
    Ok(usize::try_from(max).unwrap_or(usize::MAX))
}

/// Mostly small numbers, sometimes any.
fn small_or_any(u: &mut Unstructured, small: u64) -> Result<u64> {
    if u.arbitrary()? {
        u.int_in_range(0..=small)
    } else {
        u.arbitrary()
    }
}

fn settings(kind: Kind, u: &mut Unstructured) -> Result<(Framing, usize)> {
    let max = max_frame_bytes(u)?;
    let framing = match kind {
        Kind::Line => Framing::Line,
        Kind::Delimiter => {
            let (delimiter, delimiter_hex) = match u.int_in_range(0u8..=3)? {
                // Text, usually short.
                0 => (Some(short_string(u)?), None),
                // Bytes as hex, as an operator writes them ("0x", spaces, colons, any case).
                1 => (None, Some(hex_text(u)?)),
                // Anything at all, to reach the validation of both keys.
                2 => (Some(u.arbitrary()?), None),
                _ => (u.arbitrary()?, Some(u.arbitrary()?)),
            };
            Framing::Delimiter {
                delimiter,
                delimiter_hex,
            }
        }
        Kind::Fixed => Framing::Fixed {
            size: usize::try_from(small_or_any(u, 64)?).unwrap_or(usize::MAX),
        },
        Kind::LengthPrefixed => Framing::LengthPrefixed {
            length_bytes: if u.arbitrary()? {
                *u.choose(&[1, 2, 4])?
            } else {
                u.arbitrary()?
            },
            endian: if u.arbitrary()? {
                Endian::Big
            } else {
                Endian::Little
            },
            offset: usize::try_from(small_or_any(u, 8)?).unwrap_or(usize::MAX),
            length_adjust: if u.arbitrary()? {
                u.int_in_range(-8..=8)?
            } else {
                u.arbitrary()?
            },
            resync_gap: None,
        },
        Kind::Idle => Framing::Idle { gap: None },
    };
    Ok((framing, max))
}

fn short_string(u: &mut Unstructured) -> Result<String> {
    let n = u.int_in_range(1..=4)?;
    (0..n).map(|_| u.arbitrary::<char>()).collect()
}

fn hex_text(u: &mut Unstructured) -> Result<String> {
    let n = u.int_in_range(1..=4)?;
    let mut text = String::new();
    if u.arbitrary()? {
        text.push_str(if u.arbitrary()? { "0x" } else { "0X" });
    }
    for i in 0..n {
        if i > 0 {
            text.push_str(u.choose(&["", " ", ":"])?);
        }
        let byte: u8 = u.arbitrary()?;
        if u.arbitrary()? {
            text.push_str(&format!("{byte:02X}"));
        } else {
            text.push_str(&format!("{byte:02x}"));
        }
    }
    Ok(text)
}

/// The reference: the documented behaviour of each mode, a byte at a time.
struct Model {
    mode: ModelMode,
    max: usize,
    delimiter: Vec<u8>,
    /// The current segment, whole (delimited, fixed, idle) or the frame read so far
    /// (length-prefixed).
    segment: Vec<u8>,
    /// Length-prefixed: bytes still to skip after an oversize length field.
    skip: u128,
}

enum ModelMode {
    Delimited {
        strip_cr: bool,
    },
    Fixed(usize),
    LengthPrefixed {
        width: usize,
        endian: Endian,
        offset: usize,
        adjust: i64,
    },
    Idle,
}

impl Model {
    fn new(framing: &Framing, max: usize) -> Model {
        let (mode, delimiter) = match framing {
            Framing::Line => (ModelMode::Delimited { strip_cr: true }, b"\n".to_vec()),
            Framing::Delimiter {
                delimiter,
                delimiter_hex,
            } => (
                ModelMode::Delimited { strip_cr: false },
                match (delimiter, delimiter_hex) {
                    (Some(text), None) => text.as_bytes().to_vec(),
                    (None, Some(hex)) => model_hex(hex),
                    _ => unreachable!("validate refuses both and neither"),
                },
            ),
            Framing::Fixed { size } => (ModelMode::Fixed(*size), Vec::new()),
            Framing::LengthPrefixed {
                length_bytes,
                endian,
                offset,
                length_adjust,
                ..
            } => (
                ModelMode::LengthPrefixed {
                    width: usize::from(*length_bytes),
                    endian: *endian,
                    offset: *offset,
                    adjust: *length_adjust,
                },
                Vec::new(),
            ),
            Framing::Idle { .. } => (ModelMode::Idle, Vec::new()),
        };
        Model {
            mode,
            max,
            delimiter,
            segment: Vec::new(),
            skip: 0,
        }
    }

    fn has_partial(&self) -> bool {
        !self.segment.is_empty() || self.skip > 0
    }

    fn reset(&mut self) {
        self.segment.clear();
        self.skip = 0;
    }

    fn push(&mut self, bytes: &[u8]) -> Output {
        let mut out = Output::default();
        for &b in bytes {
            self.byte(b, &mut out);
        }
        out
    }

    fn byte(&mut self, b: u8, out: &mut Output) {
        match self.mode {
            ModelMode::Delimited { strip_cr } => {
                self.segment.push(b);
                if self.segment.ends_with(&self.delimiter) {
                    let mut frame = std::mem::take(&mut self.segment);
                    frame.truncate(frame.len() - self.delimiter.len());
                    // The bound applies to what arrived, before a CR is stripped.
                    if frame.len() > self.max {
                        out.oversize += 1;
                        return;
                    }
                    if strip_cr && frame.last() == Some(&b'\r') {
                        frame.pop();
                    }
                    if !frame.is_empty() {
                        out.frames.push(frame);
                    }
                }
            }
            ModelMode::Fixed(size) => {
                self.segment.push(b);
                if self.segment.len() == size {
                    out.frames.push(std::mem::take(&mut self.segment));
                }
            }
            ModelMode::LengthPrefixed {
                width,
                endian,
                offset,
                adjust,
            } => {
                if self.skip > 0 {
                    self.skip -= 1;
                    if self.skip == 0 {
                        out.oversize += 1;
                    }
                    return;
                }
                self.segment.push(b);
                let header = offset as u128 + width as u128;
                let len = self.segment.len() as u128;
                if len < header {
                    return;
                }
                let field = &self.segment[offset..offset + width];
                let length: u128 = match endian {
                    Endian::Big => field.iter().fold(0, |acc, b| (acc << 8) | u128::from(*b)),
                    Endian::Little => field
                        .iter()
                        .rev()
                        .fold(0, |acc, b| (acc << 8) | u128::from(*b)),
                };
                let body = (length as i128 + i128::from(adjust)).max(0) as u128;
                let total = header + body;
                if total > self.max as u128 {
                    // Skips the declared body, at most max_frame_bytes; the bytes after the
                    // header start the skip.
                    self.segment.clear();
                    self.skip = body.min(self.max as u128);
                    if self.skip == 0 {
                        out.oversize += 1;
                    }
                    return;
                }
                if len == total {
                    out.frames.push(std::mem::take(&mut self.segment));
                }
            }
            ModelMode::Idle => {
                self.segment.push(b);
            }
        }
    }

    fn idle(&mut self) -> Output {
        let mut out = Output::default();
        match self.mode {
            ModelMode::Idle => {
                if self.segment.len() > self.max {
                    out.oversize += 1;
                } else if !self.segment.is_empty() {
                    out.frames.push(std::mem::take(&mut self.segment));
                }
                self.segment.clear();
            }
            ModelMode::LengthPrefixed { .. } => {
                if self.skip > 0 {
                    out.oversize += 1;
                } else if !self.segment.is_empty() {
                    out.incomplete += 1;
                }
                self.reset();
            }
            ModelMode::Delimited { .. } | ModelMode::Fixed(_) => {}
        }
        out
    }
}

/// Hex digits to bytes, ignoring whitespace, colons and one leading 0x; only called on text
/// `Framing::validate` accepted.
fn model_hex(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .map(|c| c as u32 as u8)
        .collect();
    let digits = match digits.as_slice() {
        [b'0', b'x' | b'X', rest @ ..] => rest,
        all => all,
    };
    digits
        .chunks(2)
        .map(|pair| {
            let value = |d: u8| (d as char).to_digit(16).unwrap_or(0) as u8;
            value(pair[0]) << 4 | value(pair[1])
        })
        .collect()
}
