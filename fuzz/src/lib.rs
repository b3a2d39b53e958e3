//! Turns fuzzer bytes into a JavaScript program around `String.fromCharCode.apply(String, a)` and
//! `JSON.parse`, the path the vendored QuickJS shortcuts serve (vendor/README.md), and evaluates it
//! in that QuickJS. The fuzz target and the replay tool share the generator, so an input means the
//! same program to both, and the replay can run it in Node.js too.
//!
//! A program's value is one string: the JSON of every step's result, with no stack texts or error
//! messages in it (they differ between engines by design).

#[cfg(feature = "gateway")]
pub mod framing;

use rquickjs::context::EvalOptions;
use rquickjs::{Context, Ctx, Error, Object, Runtime, Value};

/// Enough for the largest generated arrays (70 000 elements) with room to spare.
pub const MEMORY_LIMIT: usize = 64 << 20;
/// QuickJS calls the interrupt handler every 10 000 or so instructions: this stops a program after
/// about 20 million, far beyond any generated one, and the same way on every run.
const INTERRUPT_TICKS: u32 = 2_000;

pub struct Program {
    pub source: String,
    /// Some array may hold more than 65 535 elements, QuickJS's limit for the arguments of one
    /// call (V8 takes more): the replay classifies a RangeError there as that limit.
    pub large: bool,
    /// An array-like's length is negative: QuickJS takes it by ToUint32 (upstream
    /// `js_get_length32`), so -1 is 4294967295 and too many arguments, where the standard's
    /// ToLength gives 0.
    pub negative_length: bool,
}

/// Reads the input one byte at a time; past its end every byte is 0, so any input is a program.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }

    fn u16(&mut self) -> u32 {
        u32::from(self.byte()) << 8 | u32::from(self.byte())
    }

    fn pick<'s>(&mut self, choices: &[&'s str]) -> &'s str {
        choices[self.below(choices.len())]
    }

    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Formats a step's result, `R` collects the steps. Numbers that JSON cannot hold get names, and a
/// string is summarised by its length, a hash of every code unit and its first and last ones.
const PRELUDE: &str = r#"var R = [];
function K(e) { return 'throws ' + (e !== null && e !== undefined && e.constructor ? e.constructor.name : typeof e); }
function S(s) {
  if (typeof s !== 'string') return ['type', typeof s];
  var h = 0, c = [];
  for (var i = 0; i < s.length; i++) {
    h = (Math.imul(h, 31) + s.charCodeAt(i)) | 0;
    if (i < 12 || i >= s.length - 4) c.push(s.charCodeAt(i));
  }
  return ['string', s.length, h, c];
}
function V(k, v) {
  if (typeof v === 'number') {
    if (v !== v) return 'NaN';
    if (v === 0 && 1 / v < 0) return '-0';
    if (v === Infinity || v === -Infinity) return String(v);
  }
  if (v === undefined) return 'undefined';
  if (typeof v === 'bigint' || typeof v === 'symbol' || typeof v === 'function') return typeof v;
  return v;
}
function L(x) { try { return x === undefined || x === null ? String(x) : x.length; } catch (e) { return K(e); } }
function D(x) {
  try {
    if (x === undefined || x === null || typeof x.length !== 'number' || x.length > 64) return 'big';
    var o = [];
    for (var i = 0; i < x.length; i++) o.push(i in x ? typeof x[i] === 'object' && x[i] !== null ? 'object' : x[i] : 'hole');
    return o;
  } catch (e) { return K(e); }
}
var armed = false;
var t, a, log = [];
"#;

/// What a mutation does to `t`, the object behind `a`, from user code run during a call.
const MUTATIONS: &[&str] = &[
    "t.length = 0",
    "t.length = 1",
    "t.push(65, 0x263a, 'x')",
    "t[0] = {}",
    "t[1] = 0x10041",
    "t[2] = 'abc'",
    "t[3] = 1.5",
    "t.length = 3",
    "t.pop()",
    "t.shift()",
    "t.splice(0, 2)",
    "t[t.length + 5] = 66",
    "t.reverse()",
    "t.fill(0x2603)",
    "delete t[0]",
    "Object.defineProperty(t, 0, {get: function () { return 67; }, configurable: true})",
    "t.length = t.length + 3",
    "Array.prototype[1] = 68",
    "t[0] = Symbol()",
    "t.unshift(0x41, 0x100, -1)",
];

const NUMBER_SPECIALS: &[&str] = &[
    "-0",
    "0",
    "0.0",
    "-0.0",
    "1e21",
    "9007199254740993",
    "9007199254740992",
    "123456789012345",
    "1234567890123456",
    "12345678901234567",
    "999999999999999",
    "0.1",
    "0.3",
    "0.30000000000000004",
    "2.2250738585072014e-308",
    "2.2250738585072011e-308",
    "4.9e-324",
    "5e-324",
    "2.4703282292062328e-324",
    "1.7976931348623157e308",
    "1.7976931348623159e308",
    "1e-400",
    "1e400",
    "-1e400",
    "00",
    "-01",
    "01.5",
    "1.e5",
    ".5",
    "+1",
    "1e",
    "1e+",
    "0x10",
    "-",
    "1.5E+2",
    "100.0000000000001",
    "0.000000000000001",
    "0.0000000000000001",
    "4.35",
    "27.05",
    "1607731932000",
    "8.000000000000001",
    "-9.999999999999999e22",
    "1e22",
    "1e23",
    "123456789012345e-10",
    "0.00000000000000000000001",
];

fn digits(b: &mut Bytes, n: usize, out: &mut String) {
    for _ in 0..n {
        out.push(char::from(b'0' + b.byte() % 10));
    }
}

/// A JSON number text: 15, 16 and 17 digits are the interesting lengths around the fast path's
/// limit, exponents and leading zeros the texts it must hand to strtod or reject.
fn number_text(b: &mut Bytes) -> String {
    if b.below(3) == 0 {
        return b.pick(NUMBER_SPECIALS).to_string();
    }
    let mut s = String::new();
    if b.below(3) == 0 {
        s.push('-');
    }
    let lengths = [1, 2, 3, 7, 14, 15, 15, 16, 16, 17, 18, 20, 22, 25];
    let int_len = lengths[b.below(lengths.len())];
    let frac_len = if b.below(2) == 0 {
        0
    } else {
        lengths[b.below(lengths.len())]
    };
    if b.below(4) == 0 {
        s.push('0');
    } else {
        s.push(char::from(b'1' + b.byte() % 9));
        digits(b, int_len - 1, &mut s);
    }
    if frac_len > 0 {
        s.push('.');
        if b.below(3) == 0 {
            // leading fraction zeros: the digit count includes them
            for _ in 0..b.below(20) {
                s.push('0');
            }
        }
        digits(b, frac_len, &mut s);
    }
    if b.below(3) == 0 {
        s.push_str(b.pick(&["e", "E"]));
        s.push_str(b.pick(&["", "+", "-"]));
        s.push_str(b.pick(&[
            "0", "1", "5", "15", "22", "23", "100", "307", "308", "309", "323", "324", "400",
            "0001",
        ]));
    }
    s
}

const STRING_PIECES: &[&str] = &[
    "a",
    "key",
    "é",
    "☃",
    "\\u00e9",
    "\\n",
    "\\\\",
    "\\\"",
    "\\ud83d\\ude00",
    "\\ud800",
    "😀",
    "\u{7f}",
    "\u{ff}",
    "\\/",
    " ",
];

/// A JSON text, mostly valid: numbers (alone or nested), strings with escapes and wide
/// characters, literals, arrays, objects, whitespace, and now and then a broken piece.
fn json_text(b: &mut Bytes, depth: u32, out: &mut String) {
    let choice = if depth > 3 { b.below(4) } else { b.below(8) };
    match choice {
        0 | 1 => out.push_str(&number_text(b)),
        2 => {
            out.push('"');
            for _ in 0..b.below(5) {
                out.push_str(b.pick(STRING_PIECES));
            }
            out.push('"');
        }
        3 => out.push_str(b.pick(&[
            "true",
            "false",
            "null",
            "nul",
            "NaN",
            "undefined",
            "\"\"",
            "'a'",
        ])),
        4 | 5 => {
            out.push('[');
            let n = b.below(5);
            for i in 0..n {
                if i > 0 {
                    out.push_str(b.pick(&[",", ", ", ",\n\t", ",", ",,"]));
                }
                json_text(b, depth + 1, out);
            }
            if b.below(12) == 0 {
                out.push(',');
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            let n = b.below(4);
            for i in 0..n {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(b.pick(&[
                    "\"t\"",
                    "\"v\"",
                    "\"1\"",
                    "\"__proto__\"",
                    "\"é\"",
                    "\"t\"",
                ]));
                out.push_str(b.pick(&[":", " : "]));
                json_text(b, depth + 1, out);
            }
            out.push('}');
        }
    }
}

/// One element of `a` as JavaScript source. The mutating ones change `t` while a call reads it.
fn element(b: &mut Bytes) -> String {
    match b.below(32) {
        0..=11 => b.byte().to_string(),
        12 => b.u16().to_string(),
        13 => b.pick(&["0x10000", "0x10041", "0x1FFFF", "0x7FFFFFFF", "4294967361", "2147483648"]).to_string(),
        14 => b.pick(&["-1", "-65", "-256", "-65536", "-2147483648", "-0"]).to_string(),
        15 => b.pick(&["65.9", "1.5e9", "-0.5", "1e300", "255.999", "0.1", "65535.5", "4294967361.5", "256.5"]).to_string(),
        16 => b.pick(&["NaN", "Infinity", "-Infinity"]).to_string(),
        17 => b.pick(&["'66'", "'0x41'", "' 65 '", "'abc'", "''", "'1e2'", "'-0'", "'65.9'", "'\\u263a'"]).to_string(),
        18 => b.pick(&["true", "false"]).to_string(),
        19 => "null".to_string(),
        20 => "undefined".to_string(),
        21 => b
            .pick(&[
                "{}",
                "[]",
                "[65]",
                "new Number(66)",
                "new String('67')",
                "{valueOf: function () { return 0x263a; }}",
                "{toString: function () { return '72'; }}",
                "new Boolean(true)",
            ])
            .to_string(),
        22 => {
            let m = b.pick(MUTATIONS);
            format!("{{valueOf: function () {{ {m}; return {}; }}}}", b.byte())
        }
        23 => {
            let m = b.pick(MUTATIONS);
            format!("{{toString: function () {{ {m}; return '{}'; }}}}", b.u16())
        }
        24 => b
            .pick(&[
                "{valueOf: function () { throw new RangeError('x'); }}",
                "{valueOf: function () { throw 5; }}",
                "{valueOf: function () { return {}; }, toString: function () { return {}; }}",
            ])
            .to_string(),
        // Error.prepareStackTrace runs while the call reads the array. V8 calls it when `stack` is
        // first read, QuickJS when the error is made: reading `stack` at once makes both call it
        // before the valueOf goes on.
        25 => b
            .pick(&[
                "{valueOf: function () { armed = true; try { null.x; } catch (e) { e.stack; } armed = false; return 70; }}",
                "{valueOf: function () { armed = true; var e = new Error('x'); e.stack; armed = false; throw e; }}",
                "{valueOf: function () { armed = true; var e = new TypeError('x'); e.stack; armed = false; return 0x263a; }}",
            ])
            .to_string(),
        26 => "Symbol()".to_string(),
        27 => "65n".to_string(),
        _ => (b.byte() & 0x7f).to_string(),
    }
}

/// How the elements of a long array are made: a loop, not a literal of 65 536 numbers.
const PATTERNS: &[&str] = &[
    "i & 255",
    "i",
    "65 + i % 26",
    "i % 3 ? 97 : 0x263a",
    "i * 1.5",
    "i % 2 ? 'a' : 66",
    "0x10000 + (i & 127)",
    "-i",
];

/// Around the 8-bit and argument count limits; the long ones are a quarter, as they are slow.
const LENGTHS: &[usize] = &[
    0, 1, 2, 3, 255, 256, 257, 1000, 0, 255, 256, 65535, 65536, 65537, 65540, 300,
];

/// The elements of `t`: char codes of a JSON text (the decoder's own case), maybe with some
/// replaced by other values, or generated elements, or a long patterned array.
fn elements(b: &mut Bytes, src: &mut String, large: &mut bool) -> (Vec<String>, usize) {
    match b.below(8) {
        0..=3 => {
            let mut text = String::new();
            json_text(b, 0, &mut text);
            let mut els: Vec<String> = text.encode_utf16().map(|c| c.to_string()).collect();
            for _ in 0..b.below(4) {
                if els.is_empty() {
                    break;
                }
                let i = b.below(els.len());
                // an element replaced before is no longer a bare number
                let bare = els[i].parse::<u32>().is_ok();
                els[i] = match b.below(4) {
                    // the same char code, by ToUint16 of other numbers
                    0 if bare => format!("{} + 0x10000", els[i]),
                    1 if bare => format!("{} + 0.5", els[i]),
                    2 if bare => format!("'{}'", els[i]),
                    _ => element(b),
                };
            }
            let n = els.len();
            (els, n)
        }
        4..=5 => {
            let els: Vec<String> = (0..b.below(40)).map(|_| element(b)).collect();
            let n = els.len();
            (els, n)
        }
        _ => {
            let n = LENGTHS[b.below(LENGTHS.len())];
            *large |= n >= 65535;
            let pattern = b.pick(PATTERNS);
            src.push_str(&format!(
                "var P = []; for (var i = 0; i < {n}; i++) P[i] = {pattern};\n"
            ));
            if n > 0 {
                for _ in 0..b.below(3) {
                    let i = b.u16() as usize % n;
                    let e = element(b);
                    src.push_str(&format!("P[{i}] = {e};\n"));
                }
            }
            (Vec::new(), n)
        }
    }
}

fn build(b: &mut Bytes, src: &mut String, large: &mut bool, negative_length: &mut bool) {
    let (els, n) = elements(b, src, large);
    let patterned = src.contains("var P = []");
    let list = if patterned {
        "P".to_string()
    } else {
        format!("[{}]", els.join(", "))
    };
    src.push_str("try {\n");
    match b.below(11) {
        0..=2 => {
            src.push_str(&format!("t = {list};\n"));
            if b.below(4) == 0 {
                src.push_str(b.pick(&[
                    "Object.freeze(t);\n",
                    "Object.seal(t);\n",
                    "Object.preventExtensions(t);\n",
                ]));
            }
            src.push_str("a = t;\n");
        }
        3 => {
            // holes: inside, trailing (length above the element count) or inherited
            src.push_str(&format!("t = {list};\n"));
            match b.below(4) {
                0 => src.push_str(&format!("t.length = t.length + {};\n", b.below(3) + 1)),
                1 => src.push_str(&format!("delete t[{}];\n", b.below(n.max(1)))),
                2 => src.push_str("t = new Array(4); t[1] = 72; t[3] = 0x263a;\n"),
                _ => src.push_str(&format!(
                    "t.length = t.length + 2; var once = true; Object.defineProperty(Array.prototype, t.length - 1, {{get: function () {{ if (once) {{ once = false; {}; }} return 0x263a; }}, configurable: true}});\n",
                    b.pick(MUTATIONS)
                )),
            }
            src.push_str("a = t;\n");
        }
        4 => {
            // sparse: far apart indices make QuickJS leave the fast array representation
            src.push_str(&format!(
                "t = []; t[{}] = 65; t[{}] = 66; t[0] = 67; t.length = {};\na = t;\n",
                b.below(40),
                b.below(300),
                b.pick(&["301", "400", "1000", "300"])
            ));
        }
        5 => {
            src.push_str(&format!("t = {list};\n"));
            for _ in 0..=b.below(3) {
                let i = b.below(n.max(1) + 1);
                let v = element(b);
                let m = if b.below(2) == 0 {
                    b.pick(MUTATIONS)
                } else {
                    "0"
                };
                src.push_str(&format!(
                    "var g{i} = true; Object.defineProperty(t, {i}, {{get: function () {{ if (g{i}) {{ g{i} = false; {m}; }} return {v}; }}, configurable: true, enumerable: true}});\n"
                ));
            }
            src.push_str("a = t;\n");
        }
        6 | 7 => {
            let ctor = b.pick(&["Uint8Array", "Uint16Array", "Float64Array", "Int32Array"]);
            src.push_str(&format!("t = new {ctor}({list});\na = t;\n"));
        }
        8 => {
            // an array-like, with a length that ToLength must make sense of
            let len = b.pick(&[
                "n", "n", "n + 2", "n - 1", "'3'", "2.5", "-1", "null", "65536", "'0x10'", "NaN",
            ]);
            *large |= len == "65536";
            *negative_length |= len == "-1" || (len == "n - 1" && n == 0);
            src.push_str(&format!("t = {{}}; var E = {list}; var n = E.length;\nfor (var i = 0; i < n; i++) t[i] = E[i];\nt.length = {len};\na = t;\n"));
        }
        9 => {
            src.push_str(&format!("t = {list};\n"));
            let m = b.pick(MUTATIONS);
            let at = b.below(n.max(1) + 2);
            src.push_str(&format!(
                "var once = true; a = new Proxy(t, {{get: function (o, k) {{ if (typeof k === 'string' && log.length < 40) log.push(k); if (k === '{at}' && once) {{ once = false; {m}; }} return o[k]; }}}});\n"
            ));
        }
        _ => {
            src.push_str(&format!(
                "t = (function () {{ return arguments; }}).apply(null, {list});\na = t;\n"
            ));
        }
    }
    src.push_str("} catch (e) { R.push(['build', K(e)]); }\n");
}

/// Calls that read `a`. The first three reach the fromCharCode shortcut (magic 0 apply); the
/// others take the original path with the same arrays.
const CALLS: &[&str] = &[
    "S(String.fromCharCode.apply(String, a))",
    "S(Function.prototype.apply.call(String.fromCharCode, null, a))",
    "S(String.fromCharCode.apply({}, a))",
    "S(Reflect.apply(String.fromCharCode, String, a))",
    "Math.max.apply(Math, a)",
    "(function () { return Array.prototype.slice.call(arguments, 0, 16).concat([arguments.length]); }).apply(null, a)",
    "(function () { t.length = 0; return [arguments.length, arguments[0], arguments[arguments.length - 1]]; }).apply(null, a)",
    "S(String.fromCodePoint.apply(null, a))",
    "S(String.fromCharCode.bind(null, 65).apply(null, a))",
    "S(String.fromCharCode(...a))",
    "Reflect.construct(function () { this.n = arguments.length; this.z = arguments[arguments.length - 1]; }, a).n",
    "Array.of.apply(null, a).length",
    "S(String.prototype.concat.apply('', a))",
];

/// The program for `data`: prelude, maybe a mutating Error.prepareStackTrace, the array, the
/// fromCharCode + JSON.parse step, other calls on the same array, JSON number texts parsed
/// directly, and the state of `t` after all of it.
pub fn program(data: &[u8]) -> Program {
    let mut b = Bytes { data, pos: 0 };
    let mut src = String::from(PRELUDE);
    let mut large = false;
    // QuickJS swallows an exception thrown by prepareStackTrace where V8 passes it on to the code
    // that read `stack` (upstream behaviour, not the shortcuts'): the mutation catches its own.
    if b.below(4) == 0 {
        let m = b.pick(MUTATIONS);
        src.push_str(&format!(
            "Error.prepareStackTrace = function (e, frames) {{ if (armed) {{ armed = false; try {{ {m}; }} catch (x) {{}} }} return 'stack'; }};\n"
        ));
    }
    let mut negative_length = false;
    build(&mut b, &mut src, &mut large, &mut negative_length);
    let this = b.pick(&["String", "String", "null", "undefined", "{}"]);
    src.push_str(&format!(
        "var s;\ntry {{ s = String.fromCharCode.apply({this}, a); R.push(['fcc', S(s)]); }} catch (e) {{ R.push(['fcc', K(e)]); }}\n\
         try {{ R.push(['json', JSON.parse(s)]); }} catch (e) {{ R.push(['json', K(e)]); }}\n\
         R.push(['after', L(t), D(t)]);\n"
    ));
    for _ in 0..b.below(4) {
        let call = b.pick(CALLS);
        src.push_str(&format!(
            "try {{ R.push(['call', {call}]); }} catch (e) {{ R.push(['call', K(e)]); }}\nR.push(['after', L(t), D(t)]);\n"
        ));
    }
    if b.below(2) == 0 {
        src.push_str("try { R.push(['json2', JSON.parse(String.fromCharCode.apply(String, a))]); } catch (e) { R.push(['json2', K(e)]); }\n");
    }
    while !b.exhausted() && b.below(3) != 0 {
        let text = number_text(&mut b);
        src.push_str(&format!(
            "try {{ R.push(['num', {text:?}, JSON.parse({text:?})]); }} catch (e) {{ R.push(['num', {text:?}, K(e)]); }}\n"
        ));
    }
    src.push_str("R.push(['log', log]);\nJSON.stringify(R, V);\n");
    Program {
        source: src,
        large,
        negative_length,
    }
}

/// What a QuickJS run gave: the program's string, or what stopped it.
pub fn run_quickjs(source: &str) -> String {
    let Ok(rt) = Runtime::new() else {
        return "no runtime".to_string();
    };
    rt.set_memory_limit(MEMORY_LIMIT);
    let mut ticks = 0u32;
    rt.set_interrupt_handler(Some(Box::new(move || {
        ticks += 1;
        ticks > INTERRUPT_TICKS
    })));
    let Ok(ctx) = Context::full(&rt) else {
        return "no context".to_string();
    };
    // Sloppy global code, as decoders and Node's vm run it (rquickjs's default is strict).
    let mut options = EvalOptions::default();
    options.strict = false;
    ctx.with(
        |ctx| match ctx.eval_with_options::<Value, _>(source, options) {
            Ok(v) => match v.as_string().map(|s| s.to_string()) {
                Some(Ok(s)) => s,
                _ => format!("non-string {}", v.type_name()),
            },
            Err(Error::Exception) => describe_exception(&ctx),
            Err(e) => format!("error {e}"),
        },
    )
}

/// QuickJS's uncatchable stops are named by their message, which only QuickJS has; anything else
/// by its constructor, as the program names what it catches.
fn describe_exception(ctx: &Ctx) -> String {
    let e = ctx.catch();
    let Some(obj) = e.as_object() else {
        return format!("throws {}", e.type_name());
    };
    let message: String = obj.get("message").unwrap_or_default();
    match message.as_str() {
        "interrupted" => return "interrupted".to_string(),
        "out of memory" => return "out of memory".to_string(),
        _ => {}
    }
    let name = obj
        .get::<_, Object>("constructor")
        .and_then(|c| c.get::<_, String>("name"))
        .unwrap_or_default();
    format!("throws {name}")
}
