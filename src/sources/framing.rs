//! Cutting a serial byte stream into frames. Pure logic, no I/O: the serial source feeds bytes in
//! as they arrive and tells the framer when the line went quiet.
//!
//! Every mode is bounded by `max_frame_bytes`: an oversize frame is discarded (counted by the
//! caller) and the framer resynchronises at the next frame boundary without buffering the excess.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// How frames are delimited; `[sources.<name>.framing]` or `framing = "line"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Framing {
    /// Ends at LF; a CR before it is stripped; empty lines are skipped.
    Line,
    /// Ends at `delimiter` (text) or `delimiter_hex` (bytes); the delimiter is not part of the frame.
    Delimiter {
        #[serde(default)]
        delimiter: Option<String>,
        #[serde(default)]
        delimiter_hex: Option<String>,
    },
    /// Exactly `size` bytes.
    Fixed { size: usize },
    /// `offset` bytes, a `length_bytes` (1, 2 or 4) length field, then that many bytes plus
    /// `length_adjust`; the frame keeps its header. After `resync_gap` of silence the next byte
    /// starts a new frame, whatever came before.
    LengthPrefixed {
        length_bytes: u8,
        #[serde(default)]
        endian: Endian,
        #[serde(default)]
        offset: usize,
        #[serde(default)]
        length_adjust: i64,
        #[serde(default, with = "humantime_serde")]
        resync_gap: Option<Duration>,
    },
    /// Ends after `gap` of silence (Modbus RTU: 3.5 character times, the default).
    Idle {
        #[serde(default, with = "humantime_serde")]
        gap: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Endian {
    #[default]
    Big,
    Little,
}

/// How long a length-prefixed stream must be quiet before the next byte starts a frame.
pub const DEFAULT_RESYNC_GAP: Duration = Duration::from_millis(100);

/// What the framer produced from some input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub frames: Vec<Vec<u8>>,
    /// Frames discarded because they exceeded `max_frame_bytes`.
    pub oversize: u64,
    /// Partial frames discarded because the line went quiet before they were complete.
    pub incomplete: u64,
}

#[derive(Debug)]
pub struct Framer {
    mode: Mode,
    max: usize,
    buf: Vec<u8>,
    /// Bytes still to throw away (length-prefixed, at most `max`), or `usize::MAX` for "until
    /// the next boundary".
    discarding: usize,
}

#[derive(Debug)]
enum Mode {
    Delimited {
        /// Shared so cutting can read it while the partial frame changes.
        delimiter: Arc<[u8]>,
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

impl Framing {
    /// The byte sequence of a delimiter framing, or why it is unusable (for config errors).
    pub fn delimiter_bytes(
        delimiter: &Option<String>,
        hex: &Option<String>,
    ) -> Result<Vec<u8>, String> {
        let bytes = match (delimiter, hex) {
            (Some(_), Some(_)) => return Err("give delimiter or delimiter_hex, not both".into()),
            (None, None) => return Err("needs delimiter or delimiter_hex".into()),
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(hex)) => parse_hex(hex)?,
        };
        if bytes.is_empty() {
            return Err("delimiter must not be empty".into());
        }
        Ok(bytes)
    }

    /// Checks the settings against `max_frame_bytes`; the message is for the operator.
    pub fn validate(&self, max_frame_bytes: usize) -> Result<(), String> {
        match self {
            Framing::Line | Framing::Idle { .. } => Ok(()),
            Framing::Delimiter {
                delimiter,
                delimiter_hex,
            } => Framing::delimiter_bytes(delimiter, delimiter_hex).map(drop),
            Framing::Fixed { size: 0 } => Err("fixed frames need a size above 0".into()),
            Framing::Fixed { size } if *size > max_frame_bytes => Err(format!(
                "size {size} exceeds max_frame_bytes {max_frame_bytes}"
            )),
            Framing::Fixed { .. } => Ok(()),
            Framing::LengthPrefixed { length_bytes, .. } if ![1, 2, 4].contains(length_bytes) => {
                Err("length_bytes must be 1, 2 or 4".into())
            }
            // The frame keeps its header, so a longer header fits no frame; and the framer holds
            // the header before it can read the length, so it would hold more than the bound.
            Framing::LengthPrefixed {
                length_bytes,
                offset,
                ..
            } if offset
                .checked_add(usize::from(*length_bytes))
                .is_none_or(|header| header > max_frame_bytes) =>
            {
                Err(format!(
                    "offset {offset} and a {length_bytes}-byte length exceed max_frame_bytes \
                     {max_frame_bytes}"
                ))
            }
            Framing::LengthPrefixed { .. } => Ok(()),
        }
    }
}

fn parse_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digits: String = hex
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .unwrap_or(&digits);
    // Checked first so that the pairs below are cut at character boundaries (and so that a sign,
    // which `from_str_radix` takes, is refused too).
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{hex:?} is not hex"));
    }
    if digits.len() % 2 != 0 {
        return Err(format!("{hex:?} is not an even number of hex digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16).map_err(|_| format!("{hex:?} is not hex"))
        })
        .collect()
}

impl Framer {
    /// `framing` must have passed [`Framing::validate`].
    pub fn new(framing: &Framing, max_frame_bytes: usize) -> Framer {
        let mode = match framing {
            Framing::Line => Mode::Delimited {
                delimiter: Arc::from(&b"\n"[..]),
                strip_cr: true,
            },
            Framing::Delimiter {
                delimiter,
                delimiter_hex,
            } => Mode::Delimited {
                delimiter: Framing::delimiter_bytes(delimiter, delimiter_hex)
                    .unwrap_or_else(|_| b"\n".to_vec())
                    .into(),
                strip_cr: false,
            },
            Framing::Fixed { size } => Mode::Fixed(*size),
            Framing::LengthPrefixed {
                length_bytes,
                endian,
                offset,
                length_adjust,
                ..
            } => Mode::LengthPrefixed {
                width: usize::from(*length_bytes),
                endian: *endian,
                offset: *offset,
                adjust: *length_adjust,
            },
            Framing::Idle { .. } => Mode::Idle,
        };
        Framer {
            mode,
            max: max_frame_bytes,
            buf: Vec::new(),
            discarding: 0,
        }
    }

    /// Whether a partial frame is waiting (idle mode ends it after the gap).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty() || self.discarding > 0
    }

    /// Bytes held for the partial frame: what the fuzz targets check stays bounded.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Feeds bytes as they were read; returns every frame they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Output {
        let mut out = Output::default();
        while !bytes.is_empty() {
            bytes = match &self.mode {
                Mode::Delimited { .. } => self.push_delimited(bytes, &mut out),
                Mode::Fixed(size) => {
                    let size = *size;
                    self.push_fixed(bytes, size, &mut out)
                }
                Mode::LengthPrefixed { .. } => self.push_length_prefixed(bytes, &mut out),
                Mode::Idle => self.push_idle(bytes, &mut out),
            };
        }
        out
    }

    /// The line was quiet for the idle gap: in idle mode that ends the frame; in length-prefixed
    /// mode it ends whatever was partial, so that a corrupt length field costs one quiet gap.
    pub fn idle(&mut self) -> Output {
        let mut out = Output::default();
        let ends_frame = matches!(self.mode, Mode::Idle);
        if !ends_frame && !matches!(self.mode, Mode::LengthPrefixed { .. }) {
            return out;
        }
        if self.discarding > 0 {
            out.oversize += 1;
        } else if !self.buf.is_empty() {
            if ends_frame {
                out.frames.push(std::mem::take(&mut self.buf));
            } else {
                out.incomplete += 1;
            }
        }
        self.buf.clear();
        self.discarding = 0;
        out
    }

    /// Forgets a partial frame (the port went away); true when there was one.
    pub fn reset(&mut self) -> bool {
        let had = self.has_partial();
        self.buf.clear();
        self.discarding = 0;
        had
    }

    fn push_delimited<'a>(&mut self, bytes: &'a [u8], out: &mut Output) -> &'a [u8] {
        let Mode::Delimited {
            delimiter,
            strip_cr,
        } = &self.mode
        else {
            return &[];
        };
        let (delimiter, strip_cr) = (delimiter.clone(), *strip_cr);
        self.cut_delimited(bytes, &delimiter, strip_cr, out)
    }

    fn cut_delimited<'a>(
        &mut self,
        bytes: &'a [u8],
        delimiter: &[u8],
        strip_cr: bool,
        out: &mut Output,
    ) -> &'a [u8] {
        let last = delimiter[delimiter.len() - 1];
        let Some(pos) = bytes.iter().position(|b| *b == last) else {
            self.append_bounded(bytes, delimiter.len());
            return &[];
        };
        self.append_bounded(&bytes[..=pos], delimiter.len());
        let rest = &bytes[pos + 1..];
        if self.discarding > 0 {
            // The oversize frame ends where this delimiter ends it.
            if self.ends_with_delimiter_or_unknown(delimiter) {
                self.discarding = 0;
                self.buf.clear();
                out.oversize += 1;
            }
            return rest;
        }
        if self.buf.ends_with(delimiter) {
            let mut frame = std::mem::take(&mut self.buf);
            frame.truncate(frame.len() - delimiter.len());
            if strip_cr && frame.last() == Some(&b'\r') {
                frame.pop();
            }
            if !frame.is_empty() {
                out.frames.push(frame);
            }
        }
        rest
    }

    /// While discarding, only the delimiter's tail is kept in `buf` to recognise it.
    fn ends_with_delimiter_or_unknown(&mut self, delimiter: &[u8]) -> bool {
        let done = self.buf.ends_with(delimiter);
        let keep = delimiter.len().saturating_sub(1).min(self.buf.len());
        let tail = self.buf.split_off(self.buf.len() - keep);
        self.buf = tail;
        done
    }

    /// Appends to the partial frame, switching to discard mode past the bound.
    fn append_bounded(&mut self, bytes: &[u8], delimiter_len: usize) {
        self.buf.extend_from_slice(bytes);
        if self.discarding == 0 && self.buf.len() > self.max + delimiter_len {
            self.discarding = usize::MAX;
        }
        if self.discarding > 0 {
            let keep = delimiter_len.min(self.buf.len());
            self.buf.drain(..self.buf.len() - keep);
        }
    }

    fn push_fixed<'a>(&mut self, bytes: &'a [u8], size: usize, out: &mut Output) -> &'a [u8] {
        let take = (size - self.buf.len()).min(bytes.len());
        self.buf.extend_from_slice(&bytes[..take]);
        if self.buf.len() == size {
            out.frames.push(std::mem::take(&mut self.buf));
        }
        &bytes[take..]
    }

    fn push_length_prefixed<'a>(&mut self, mut bytes: &'a [u8], out: &mut Output) -> &'a [u8] {
        if self.discarding > 0 {
            let skip = self.discarding.min(bytes.len());
            self.discarding -= skip;
            if self.discarding == 0 {
                out.oversize += 1;
            }
            return &bytes[skip..];
        }
        let Mode::LengthPrefixed {
            width,
            endian,
            offset,
            adjust,
        } = self.mode
        else {
            return &[];
        };
        let header = offset + width;
        if self.buf.len() < header {
            let take = (header - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            // A complete header is read now, not with the next byte: a frame without a body is
            // complete already, and a quiet line next must not drop it as incomplete.
            if self.buf.len() < header {
                return bytes;
            }
        }
        let field = &self.buf[offset..header];
        let length = field
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, b)| match endian {
                Endian::Big => (acc << 8) | u64::from(*b),
                Endian::Little => acc | (u64::from(*b) << (8 * i)),
            });
        // In 128 bits: a 4-byte length near u32::MAX plus a header, or any length plus an extreme
        // length_adjust, must not wrap (usize is 32 bits on armv7) into a small frame size.
        let body = (i128::from(length) + i128::from(adjust)).max(0);
        let total = body + header as i128;
        if total > self.max as i128 {
            // Skip the declared frame, where the next one starts, but no more than max_frame_bytes:
            // a corrupt length field must not swallow up to 4 GiB of good frames. A quiet line ends
            // the skip earlier (`idle`); past the bound the next byte is read as a header.
            self.buf.clear();
            self.discarding = body.min(self.max as i128) as usize;
            if self.discarding == 0 {
                out.oversize += 1;
            }
            return bytes;
        }
        // At most max_frame_bytes now.
        let total = total as usize;
        let take = (total - self.buf.len()).min(bytes.len());
        self.buf.extend_from_slice(&bytes[..take]);
        if self.buf.len() == total {
            out.frames.push(std::mem::take(&mut self.buf));
        }
        &bytes[take..]
    }

    fn push_idle<'a>(&mut self, bytes: &'a [u8], _out: &mut Output) -> &'a [u8] {
        if self.discarding == 0 && self.buf.len() + bytes.len() > self.max {
            self.discarding = usize::MAX;
            self.buf.clear();
        }
        if self.discarding == 0 {
            self.buf.extend_from_slice(bytes);
        }
        &[]
    }
}

/// Modbus RTU's inter-frame silence: 3.5 character times, at least 1.75 ms above 19200 baud.
pub fn default_idle_gap(baud_rate: u32, bits_per_char: u32) -> Duration {
    if baud_rate > 19_200 {
        return Duration::from_micros(1750);
    }
    let micros = 3.5 * f64::from(bits_per_char) * 1e6 / f64::from(baud_rate.max(1));
    Duration::from_micros(micros as u64)
}

#[cfg(test)]
mod tests;
