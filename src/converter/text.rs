//! JavaScript strings in Rust strings, lone surrogates included.
//!
//! JavaScript strings are UTF-16 and may hold lone surrogates (`'😀'.slice(0, 1)`,
//! `String.fromCharCode(0xdfe9)`); Rust strings cannot. `JSON.stringify` writes a lone surrogate
//! as the escape `\ud83d`, and ThingsBoard receives exactly that, so edgegate must too. Inside a
//! Rust string a lone surrogate travels as two reserved characters: U+FDD0 (a noncharacter,
//! "never interchanged") then U+E000 + (surrogate − 0xD800); a real U+FDD0 travels doubled.
//! [`write_fragment`] (through `number::JsFormatter`) writes them back as `JSON.stringify` does,
//! and [`well_formed`] gives U+FFFD for places that need plain text, such as Kafka keys.

use std::borrow::Cow;
use std::io;

/// Starts a carried lone surrogate, or, doubled, stands for itself.
const MARK: char = '\u{FDD0}';
const CARRIED_BASE: u32 = 0xE000;

/// QuickJS's text of a string (WTF-8: UTF-8 in which lone surrogates are encoded like other code
/// points) as a carrying Rust string.
pub fn from_wtf8(bytes: &[u8]) -> Cow<'_, str> {
    // Most strings a decoder returns are ASCII: one quick pass, no UTF-8 validation.
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8 (and holds no U+FDD0).
        return Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) if !holds_mark(text) => Cow::Borrowed(text),
        Ok(text) => Cow::Owned(double_marks(text)),
        Err(_) => Cow::Owned(decode_wtf8(bytes)),
    }
}

/// Whether `text` holds U+FDD0; a byte search first, as this runs on every string a script
/// returns and `str::contains(char)` costs a substring search for a non-ASCII character.
fn holds_mark(text: &str) -> bool {
    text.as_bytes().contains(&0xef) && text.contains(MARK)
}

fn double_marks(text: &str) -> String {
    text.replace(MARK, "\u{FDD0}\u{FDD0}")
}

fn decode_wtf8(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    loop {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                out.push_str(&double_marks(text));
                return out;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // `valid` is UTF-8 by the error's own account.
                out.push_str(&double_marks(&String::from_utf8_lossy(valid)));
                match rest {
                    [0xed, b1 @ 0xa0..=0xbf, b2 @ 0x80..=0xbf, tail @ ..] => {
                        let surrogate = 0xd000 | (u32::from(b1 & 0x3f) << 6) | u32::from(b2 & 0x3f);
                        carry(&mut out, surrogate);
                        bytes = tail;
                    }
                    [_, tail @ ..] => {
                        out.push(char::REPLACEMENT_CHARACTER); // not WTF-8: cannot come from QuickJS
                        bytes = tail;
                    }
                    [] => return out,
                }
            }
        }
    }
}

fn carry(out: &mut String, surrogate: u32) {
    out.push(MARK);
    out.push(
        char::from_u32(CARRIED_BASE + (surrogate - 0xd800)).unwrap_or(char::REPLACEMENT_CHARACTER),
    );
}

/// JSON text from QuickJS's `JSON.stringify`, with its escapes of lone surrogates turned into
/// carried ones (and real U+FDD0 doubled), so that serde_json can read it.
pub fn carry_escapes(json: &str) -> Cow<'_, str> {
    // Escapes start with a backslash and U+FDD0 with the byte 0xEF: most texts have neither.
    let bytes = json.as_bytes();
    if !bytes.contains(&b'\\') && !bytes.contains(&0xef) {
        return Cow::Borrowed(json);
    }
    let escapes = ["\\ud", "\\uD", "\\uf", "\\uF"]
        .iter()
        .any(|escape| json.contains(escape));
    if !escapes && !holds_mark(json) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if c == MARK {
            out.push_str("\u{FDD0}\u{FDD0}");
            rest = &rest[c.len_utf8()..];
        } else if c == '\\' {
            let (escape, tail) = split_escape(rest);
            match surrogate_escape(escape) {
                Some(high @ 0xd800..=0xdbff) => {
                    // An escaped pair is one character; QuickJS writes pairs unescaped, but
                    // nothing is lost if it did not.
                    let (next, after) = split_escape(tail);
                    match surrogate_escape(next) {
                        Some(low @ 0xdc00..=0xdfff) => {
                            let c = 0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00);
                            out.push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                            rest = after;
                        }
                        _ => {
                            carry(&mut out, high);
                            rest = tail;
                        }
                    }
                }
                Some(low) => {
                    carry(&mut out, low);
                    rest = tail;
                }
                None if escape.eq_ignore_ascii_case("\\ufdd0") => {
                    out.push_str("\u{FDD0}\u{FDD0}");
                    rest = tail;
                }
                None => {
                    out.push_str(escape);
                    rest = tail;
                }
            }
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    Cow::Owned(out)
}

/// `\x` or `\uXXXX` at the start of `text` (which starts with a backslash), and the rest.
fn split_escape(text: &str) -> (&str, &str) {
    let len = if text.starts_with("\\u") && text.len() >= 6 && text.is_char_boundary(6) {
        6
    } else {
        text.char_indices().nth(2).map_or(text.len(), |(i, _)| i)
    };
    text.split_at(len)
}

/// The code unit of a `\uXXXX` escape of a surrogate.
fn surrogate_escape(escape: &str) -> Option<u32> {
    let hex = escape.strip_prefix("\\u")?;
    u32::from_str_radix(hex, 16)
        .ok()
        .filter(|u| (0xd800..=0xdfff).contains(u))
}

/// Writes the unescaped part of a JSON string as `JSON.stringify` would: carried lone
/// surrogates become `\udXXX`.
pub fn write_fragment<W: ?Sized + io::Write>(writer: &mut W, fragment: &str) -> io::Result<()> {
    if !holds_mark(fragment) {
        return writer.write_all(fragment.as_bytes());
    }
    let mut chars = fragment.chars();
    let mut buf = [0u8; 4];
    while let Some(c) = chars.next() {
        if c != MARK {
            writer.write_all(c.encode_utf8(&mut buf).as_bytes())?;
            continue;
        }
        match chars.next() {
            Some(MARK) => writer.write_all(MARK.encode_utf8(&mut buf).as_bytes())?,
            Some(carried) => match carried_surrogate(carried) {
                Some(unit) => write!(writer, "\\u{unit:04x}")?,
                None => {
                    writer.write_all(MARK.encode_utf8(&mut buf).as_bytes())?;
                    writer.write_all(carried.encode_utf8(&mut buf).as_bytes())?;
                }
            },
            None => writer.write_all(MARK.encode_utf8(&mut buf).as_bytes())?,
        }
    }
    Ok(())
}

fn carried_surrogate(c: char) -> Option<u32> {
    let offset = u32::from(c).checked_sub(CARRIED_BASE)?;
    (offset < 0x800).then_some(0xd800 + offset)
}

/// [`well_formed`] for an owned string: moved back unchanged when it carries nothing.
pub fn into_well_formed(text: String) -> String {
    match well_formed(&text) {
        Cow::Owned(fixed) => fixed,
        Cow::Borrowed(_) => text,
    }
}

/// The text a carrying string stands for, lone surrogates as U+FFFD (what an encoder to UTF-8
/// makes of them): for Kafka keys, topics and other plain text.
pub fn well_formed(text: &str) -> Cow<'_, str> {
    if !holds_mark(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != MARK {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(MARK) => out.push(MARK),
            Some(carried) if carried_surrogate(carried).is_some() => {
                out.push(char::REPLACEMENT_CHARACTER)
            }
            Some(other) => {
                out.push(MARK);
                out.push(other);
            }
            None => out.push(MARK),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_text(carried: &str) -> String {
        let mut out = Vec::new();
        write_fragment(&mut out, carried).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lone_surrogates_survive_as_json_stringify_writes_them() {
        // "é\ud83dZ" as QuickJS's WTF-8, and a real U+FDD0 beside it.
        let wtf8 = b"\xc3\xa9\xed\xa0\xbdZ\xef\xb7\x90";
        let carried = from_wtf8(wtf8);
        assert_eq!(json_text(&carried), "é\\ud83dZ\u{FDD0}");
        assert_eq!(well_formed(&carried), "é\u{FFFD}Z\u{FDD0}");
        // Ordinary text passes untouched and unallocated.
        assert!(matches!(from_wtf8(b"plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn json_stringify_escapes_become_carried_surrogates() {
        let json = r#"{"a":"x\udfe9y","b":"\\ud800 is text","c":"\ud83d\ude00","d":"\uFDD0"}"#;
        let carried = carry_escapes(json);
        let value: serde_json::Value = serde_json::from_str(&carried).unwrap();
        assert_eq!(json_text(value["a"].as_str().unwrap()), "x\\udfe9y");
        assert_eq!(value["b"], "\\ud800 is text");
        assert_eq!(value["c"], "😀");
        assert_eq!(json_text(value["d"].as_str().unwrap()), "\u{FDD0}");
    }
}
