//! Numbers as JavaScript prints them (ECMAScript `Number::toString`), for every JSON text and
//! string the converters make from a script's numbers: `7`, `1.5`, `-0` as `0`, `1e+21`,
//! `1e-7`, `0.000001`, `123456789012345680000`, `9007199254740993` as `9007199254740992`.
//! ThingsBoard serializes decoder results with `JSON.stringify`; serde_json's own float format
//! (`1e21`, `1e-6`, `9007199254740992.0`) differs, so edgegate's JSON goes through
//! [`JsFormatter`].

use std::io;

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter};
use serde_json::{Number, Value};

use super::text;

/// Appends `f` as `String(f)` gives it; non-finite numbers as `null`, as JSON.stringify does.
pub fn write_js_number(out: &mut Vec<u8>, f: f64) {
    if !f.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    let mut buf = [0u8; MAX_NUMBER_TEXT];
    let len = format_js_number(f, &mut buf);
    out.extend_from_slice(&buf[..len]);
}

/// `String(f)` for a finite `f`.
pub fn js_number_text(f: f64) -> String {
    let mut buf = [0u8; MAX_NUMBER_TEXT];
    let len = format_js_number(f, &mut buf);
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// The longest `String(f)`: `-0.0000012345678901234567` has 25 bytes.
pub const MAX_NUMBER_TEXT: usize = 32;

/// Writes ECMAScript's Number::toString(f) (radix 10) for a finite `f`; returns its length.
pub fn format_js_number(f: f64, out: &mut [u8; MAX_NUMBER_TEXT]) -> usize {
    if f == 0.0 {
        out[0] = b'0'; // -0 too
        return 1;
    }
    // Most readings: a fraction between 1e-5 and 1e16, which ryu writes in plain decimal exactly
    // as the standard does (it differs only for integers, "1.0", and outside that range).
    if f.fract() != 0.0 && (1e-5..1e16).contains(&f.abs()) {
        let mut ryu = ryu::Buffer::new();
        let text = ryu.format_finite(f).as_bytes();
        out[..text.len()].copy_from_slice(text);
        return text.len();
    }
    format_general(f, out)
}

/// [`format_js_number`] for any finite, non-zero `f`, by the standard's rules.
fn format_general(f: f64, out: &mut [u8; MAX_NUMBER_TEXT]) -> usize {
    let shortest = Shortest::of(f);
    let (digits, k, point) = (shortest.digits(), shortest.len as i32, shortest.point);
    let mut w = Writer { out, len: 0 };
    if f < 0.0 {
        w.push(b'-');
    }
    if k <= point && point <= 21 {
        w.extend(digits);
        (0..point - k).for_each(|_| w.push(b'0'));
    } else if 0 < point && point <= 21 {
        w.extend(&digits[..point as usize]);
        w.push(b'.');
        w.extend(&digits[point as usize..]);
    } else if -6 < point && point <= 0 {
        w.extend(b"0.");
        (0..-point).for_each(|_| w.push(b'0'));
        w.extend(digits);
    } else {
        w.exponential(digits, point - 1);
    }
    w.len
}

/// Writes `f.toExponential()` (no digit count: as many as the shortest round trip needs) for a
/// finite `f`; returns its length.
pub fn format_js_exponential(f: f64, out: &mut [u8; MAX_NUMBER_TEXT]) -> usize {
    let mut w = Writer { out, len: 0 };
    if f == 0.0 {
        w.extend(b"0e+0"); // -0 too
        return w.len;
    }
    let shortest = Shortest::of(f);
    if f < 0.0 {
        w.push(b'-');
    }
    w.exponential(shortest.digits(), shortest.point - 1);
    w.len
}

/// The shortest decimal digits that read back as a double, and where the point goes: the value
/// is 0.digits × 10^point.
struct Shortest {
    digits: [u8; 20],
    len: usize,
    point: i32,
}

impl Shortest {
    fn of(f: f64) -> Shortest {
        // ryu gives the shortest digits that read back as `f`, the closest of them, ties to
        // even: what the standard asks for and V8 does.
        let mut ryu = ryu::Buffer::new();
        let text = ryu.format_finite(f.abs()).as_bytes();
        let (mantissa, exponent) = match text.iter().position(|&b| b == b'e') {
            Some(e) => (&text[..e], parse_exponent(&text[e + 1..])),
            None => (text, 0),
        };
        let mut shortest = Shortest {
            digits: [0; 20],
            len: 0,
            point: exponent,
        };
        let mut seen_dot = false;
        for &b in mantissa {
            match b {
                b'.' => seen_dot = true,
                b'0' if shortest.len == 0 => {
                    if seen_dot {
                        shortest.point -= 1; // a leading zero after the point
                    }
                }
                _ => {
                    if shortest.len < shortest.digits.len() {
                        shortest.digits[shortest.len] = b;
                        shortest.len += 1;
                    }
                    if !seen_dot {
                        shortest.point += 1;
                    }
                }
            }
        }
        while shortest.len > 1 && shortest.digits[shortest.len - 1] == b'0' {
            shortest.len -= 1;
        }
        shortest
    }

    fn digits(&self) -> &[u8] {
        &self.digits[..self.len]
    }
}

fn parse_exponent(text: &[u8]) -> i32 {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let value = digits
        .iter()
        .fold(0i32, |v, d| v * 10 + i32::from(d.wrapping_sub(b'0')));
    if negative {
        -value
    } else {
        value
    }
}

struct Writer<'a> {
    out: &'a mut [u8; MAX_NUMBER_TEXT],
    len: usize,
}

impl Writer<'_> {
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.out.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.push(b));
    }

    /// `d[.ddd]e±x`
    fn exponential(&mut self, digits: &[u8], e: i32) {
        self.push(digits[0]);
        if digits.len() > 1 {
            self.push(b'.');
            self.extend(&digits[1..]);
        }
        self.push(b'e');
        self.push(if e < 0 { b'-' } else { b'+' });
        let mut exp = itoa_buf(e.unsigned_abs());
        self.extend(exp.text());
    }
}

/// The decimal digits of an exponent (at most 3).
struct ExponentDigits {
    buf: [u8; 4],
    start: usize,
}

impl ExponentDigits {
    fn text(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u32) -> ExponentDigits {
    let mut buf = [0u8; 4];
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    ExponentDigits { buf, start }
}

extern "C" {
    fn JS_SetNumberToString(
        number_to_string: unsafe extern "C" fn(f64, i32, *mut std::ffi::c_char, i32) -> i32,
    );
}

/// Makes every QuickJS runtime print numbers with [`format_js_number`]. Idempotent; the
/// converter calls it before it creates a runtime.
pub fn install() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    // SAFETY: a plain function pointer, set before any runtime of ours exists.
    INSTALLED.call_once(|| unsafe { JS_SetNumberToString(quickjs_number_to_string) });
}

/// QuickJS's number-to-string hook (`JS_SetNumberToString`, vendor/README.md): every
/// `String(x)`, `x.toString()` and `JSON.stringify` of a number in a script (style 0),
/// `x.toExponential()` without a digit count (1) and `x.toLocaleString()` (2).
///
/// # Safety
/// `buf` points to `buf_len` writable bytes.
pub unsafe extern "C" fn quickjs_number_to_string(
    d: f64,
    style: i32,
    buf: *mut std::ffi::c_char,
    buf_len: i32,
) -> i32 {
    let mut text = [0u8; MAX_NUMBER_TEXT];
    let locale;
    let bytes: &[u8] = match style {
        1 => {
            let len = format_js_exponential(d, &mut text);
            &text[..len]
        }
        2 => {
            locale = format_js_locale(d);
            locale.as_bytes()
        }
        _ => {
            let len = format_js_number(d, &mut text);
            &text[..len]
        }
    };
    match i32::try_from(bytes.len()) {
        Ok(len) if len <= buf_len => {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
            len
        }
        _ => -1,
    }
}

/// `x.toLocaleString()` as V8 writes it with ICU's en-US default (no LANG, as ThingsBoard's
/// executor runs): the shortest decimal of `x` rounded half away from zero to at most three
/// fraction digits, the integer part grouped by thousands, `-0` kept. For a finite `x`.
pub fn format_js_locale(x: f64) -> String {
    let mut out = String::with_capacity(24);
    if x.is_sign_negative() {
        out.push('-');
    }
    if x == 0.0 {
        out.push('0');
        return out;
    }
    let shortest = Shortest::of(x);
    // The decimal as integer digits and fraction digits, then rounded at the third fraction digit.
    let point = shortest.point;
    let digit = |i: i32| -> u8 {
        // The i-th digit of 0.digits × 10^point counted from the point (0 = first integer digit
        // of `point` integer digits).
        usize::try_from(i)
            .ok()
            .and_then(|i| shortest.digits().get(i).copied())
            .unwrap_or(b'0')
    };
    let int_len = point.max(0);
    // Digits kept: the integer part and three fraction digits, as a big decimal number.
    let mut kept: Vec<u8> = (0..int_len + 3).map(|i| digit(i + point.min(0))).collect();
    if point < 0 {
        // 0.000ddd: the leading zeros after the point come first.
        kept = (0..3)
            .map(|i| if i < -point { b'0' } else { digit(i + point) })
            .collect();
    }
    let next = if point < 0 {
        if 3 < -point {
            b'0'
        } else {
            digit(3 + point)
        }
    } else {
        digit(int_len + 3)
    };
    if next >= b'5' {
        // Half away from zero on the decimal value: carry up through the kept digits.
        let mut i = kept.len();
        loop {
            if i == 0 {
                kept.insert(0, b'1');
                break;
            }
            i -= 1;
            if kept[i] == b'9' {
                kept[i] = b'0';
            } else {
                kept[i] += 1;
                break;
            }
        }
    }
    let (int_digits, frac_digits) = kept.split_at(kept.len() - 3);
    let int_digits: &[u8] = if int_digits.is_empty() {
        b"0"
    } else {
        int_digits
    };
    let int_start = int_digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(int_digits.len() - 1);
    let int_digits = &int_digits[int_start..];
    for (i, d) in int_digits.iter().enumerate() {
        if i > 0 && (int_digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(char::from(*d));
    }
    let frac_end = frac_digits
        .iter()
        .rposition(|&d| d != b'0')
        .map_or(0, |i| i + 1);
    if frac_end > 0 {
        out.push('.');
        frac_digits[..frac_end]
            .iter()
            .for_each(|d| out.push(char::from(*d)));
    }
    out
}

/// A JSON number as `String(n)` gives it.
pub fn js_number_of(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    n.as_f64()
        .filter(|f| f.is_finite())
        .map_or_else(|| "null".into(), js_number_text)
}

/// serde_json's output, compact or pretty (`F`), with JavaScript's numbers and strings
/// (lone surrogates carried by [`text`] written as `\\udXXX`).
pub struct JsFormatter<F = CompactFormatter>(F);

/// Layout methods handed to the inner formatter unchanged.
macro_rules! layout {
    ($($name:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {$(
        fn $name<W: ?Sized + io::Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> io::Result<()> {
            self.0.$name(w $(, $arg)*)
        }
    )*};
}

impl<F: Formatter> Formatter for JsFormatter<F> {
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        if !value.is_finite() {
            return writer.write_all(b"null");
        }
        let mut text = [0u8; MAX_NUMBER_TEXT];
        let len = format_js_number(value, &mut text);
        writer.write_all(&text[..len])
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(writer, f64::from(value))
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        text::write_fragment(writer, fragment)
    }

    layout! {
        begin_array(), end_array(), begin_array_value(first: bool), end_array_value(),
        begin_object(), end_object(), begin_object_key(first: bool), end_object_key(),
        begin_object_value(), end_object_value(),
    }
}

/// Appends `text` as a JSON string as `JSON.stringify` writes it (lone surrogates carried by
/// [`text`] as `\udXXX`).
pub fn write_js_string(out: &mut Vec<u8>, text: &str) -> Option<()> {
    let mut serializer = serde_json::Serializer::with_formatter(out, JsFormatter(CompactFormatter));
    text.serialize(&mut serializer).ok()
}

/// Compact JSON text of `value`, numbers as JSON.stringify prints them.
pub fn to_vec_js<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, JsFormatter(CompactFormatter));
    // Writing to a Vec cannot fail, and serde_json values have string keys.
    if value.serialize(&mut serializer).is_err() {
        out.clear();
    }
    out
}

/// Indented JSON text of `value` (for people: `edgegate convert`), numbers as JavaScript
/// prints them.
pub fn to_string_pretty_js<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(256);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, JsFormatter(PrettyFormatter::new()));
    if value.serialize(&mut serializer).is_err() {
        out.clear();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// [`to_vec_js`] as a string.
pub fn to_string_js(value: &Value) -> String {
    String::from_utf8(to_vec_js(value)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_as_javascript_prints_them() {
        // Each pair from Node.js: String(x).
        let cases: [(f64, &str); 18] = [
            (0.0, "0"),
            (-0.0, "0"),
            (7.0, "7"),
            (-1.5, "-1.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (1.5e-7, "1.5e-7"),
            (9007199254740993.0, "9007199254740992"),
            (2f64.powi(60), "1152921504606847000"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (97.67299916075379, "97.67299916075379"),
            (-1e-300, "-1e-300"),
            (4.35, "4.35"),
        ];
        for (f, want) in cases {
            assert_eq!(js_number_text(f), want, "{f:e}");
        }
        let mut out = Vec::new();
        write_js_number(&mut out, f64::NAN);
        assert_eq!(out, b"null");
    }

    #[test]
    fn the_decimal_shortcut_writes_what_the_standards_rules_write() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let magnitude = 10f64.powi((next() % 24) as i32 - 6);
            let f = (next() % 1_000_000_007) as f64 / 1_000_000_007.0 * magnitude;
            let f = if next() % 2 == 0 { f } else { -f };
            if f == 0.0 {
                continue;
            }
            let (mut fast, mut general) = ([0u8; MAX_NUMBER_TEXT], [0u8; MAX_NUMBER_TEXT]);
            let (a, b) = (
                format_js_number(f, &mut fast),
                format_general(f, &mut general),
            );
            assert_eq!(fast[..a], general[..b], "{f:e}");
        }
    }

    #[test]
    fn locale_strings_are_v8s_en_us_default() {
        // Each pair from Node.js 20: x.toLocaleString().
        let cases: [(f64, &str); 16] = [
            (1.0005, "1.001"),
            (1.0625, "1.063"),
            (2.0005, "2.001"),
            (1.2345678901234568e25, "12,345,678,901,234,568,000,000,000"),
            (0.1234567, "0.123"),
            (1234.5, "1,234.5"),
            (-1234.5678, "-1,234.568"),
            (1e21, "1,000,000,000,000,000,000,000"),
            (-0.0, "-0"),
            (0.0004, "0"),
            (0.0005, "0.001"),
            (999.9995, "1,000"),
            (123456789.987654, "123,456,789.988"),
            (5e-324, "0"),
            (-0.0004, "-0"),
            (100.0, "100"),
        ];
        for (x, want) in cases {
            assert_eq!(format_js_locale(x), want, "{x:e}");
        }
        assert_eq!(format_js_locale(f64::MAX).len(), 411);
        let mut buf = [0u8; MAX_NUMBER_TEXT];
        let len = format_js_exponential(6.129982163463556e54, &mut buf);
        assert_eq!(&buf[..len], b"6.129982163463556e+54");
    }

    #[test]
    fn json_of_values_uses_javascript_numbers() {
        let v = serde_json::json!({"a": 1e21, "b": [1e-7, 0.5, 2.0f64.powi(53)], "c": -3});
        assert_eq!(
            to_string_js(&v),
            r#"{"a":1e+21,"b":[1e-7,0.5,9007199254740992],"c":-3}"#
        );
        assert_eq!(
            to_string_pretty_js(&serde_json::json!({"a": [1e21]})),
            "{\n  \"a\": [\n    1e+21\n  ]\n}"
        );
    }
}
