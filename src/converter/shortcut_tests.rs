//! The vendored QuickJS's shortcuts on `String.fromCharCode.apply` and `JSON.parse`
//! (vendor/README.md) against Node.js's results, at the edges the differential fuzzer
//! (fuzz/, scripts/fuzz-quickjs) explores. Each expected string is what Node.js 20 gives for the
//! same program.

use rquickjs::context::EvalOptions;
use rquickjs::{Context, Runtime};

/// The program's value as a string, in sloppy mode as decoders run.
fn eval(source: &str) -> String {
    let rt = Runtime::new().unwrap();
    rt.set_memory_limit(64 << 20);
    let ctx = Context::full(&rt).unwrap();
    let mut options = EvalOptions::default();
    options.strict = false;
    ctx.with(|ctx| ctx.eval_with_options::<String, _>(source, options).unwrap())
}

/// An element's valueOf makes an error whose Error.prepareStackTrace hook empties the array and
/// puts an object in it, or throws after the hook shrank it: the read in place must not be
/// taken (there is an object) and the copy must keep what was read.
#[test]
fn from_char_code_apply_sees_the_array_prepare_stack_trace_changed() {
    let source = r#"
var t = [72, {valueOf: function () { armed = true; try { null.x; } catch (e) { e.stack; } armed = false; return 105; }}, 33, 0x263a];
var armed = false;
Error.prepareStackTrace = function (e, frames) { if (armed) { armed = false; t.length = 0; t.push({}, 'x'); } return 'stack'; };
var s = String.fromCharCode.apply(String, t);
var u = [65, {valueOf: function () { armed = true; var e = new Error('x'); e.stack; armed = false; throw e; }}, 67];
var thrown;
Error.prepareStackTrace = function (e, frames) { if (armed) { armed = false; u.length = 1; u[5] = 0x10041; } return 'stack'; };
try { String.fromCharCode.apply(String, u); } catch (e) { thrown = e.constructor.name; }
JSON.stringify([s, t.length, typeof t[0], thrown, u.length, String.fromCharCode.apply(String, u)]);
"#;
    assert_eq!(
        eval(source),
        r#"["Hi!☺",2,"object","Error",6,"A\u0000\u0000\u0000\u0000A"]"#
    );
}

/// 0xff stays in the 8-bit loop, 0x100 and every wrapped or converted code leaves it, in any
/// position.
#[test]
fn from_char_code_wraps_codes_at_and_past_the_8_bit_fast_loop() {
    let source = r#"
var m = [0xff, 0x100, 0x1ff, 0x10041, -1, -65, 65.9, '66', true, null, undefined, NaN, -0, 4294967361, 1.5e9, 0xffff, 0x10000];
var r = [String.fromCharCode.apply(String, m), String.fromCharCode.apply(null, [0x41, 0x42, 0x100]), String.fromCharCode.apply(null, [0x100, 0x41]), String.fromCharCode.apply(null, [255, 'x', 65])];
JSON.stringify(r.map(function (s) { var c = []; for (var i = 0; i < s.length; i++) c.push(s.charCodeAt(i)); return c; }));
"#;
    assert_eq!(
        eval(source),
        r#"[[255,256,511,65,65535,65471,65,66,1,0,0,0,0,65,12032,65535,0],[65,66,256],[256,65],[255,0,65]]"#
    );
}

/// JSON number texts around the 15-digit fast path, with exponents, -0, extremes and invalid
/// forms, through the decoder's path; the expected values are Node.js's.
#[test]
fn json_parse_of_from_char_code_numbers_matches_node() {
    let source = r#"
var texts = ['-0', '0.0', '-0.0', '123456789012345', '1234567890123456', '12345678901234567', '999999999999999.9', '0.000000000000001', '0.0000000000000001', '9007199254740993', '1e21', '1E-7', '2.5e-3', '1.7976931348623157e308', '1e400', '-1e400', '4.9e-324', '1e-400', '100.0000000000001', '0.30000000000000004', '123456789012345e-10', '00', '-01', '01.5', '1.', '.5', '+1', '1e', '0x10', '-'];
JSON.stringify(texts.map(function (t) {
  try { var v = JSON.parse(String.fromCharCode.apply(String, t.split('').map(function (c) { return c.charCodeAt(0); })));
    return Object.is(v, -0) ? '-0' : String(v); } catch (e) { return e.constructor.name; }
}));
"#;
    assert_eq!(
        eval(source),
        r#"["-0","0","-0","123456789012345","1234567890123456","12345678901234568","999999999999999.9","1e-15","1e-16","9007199254740992","1e+21","1e-7","0.0025","1.7976931348623157e+308","Infinity","-Infinity","5e-324","0","100.0000000000001","0.30000000000000004","12345.6789012345","SyntaxError","SyntaxError","SyntaxError","SyntaxError","SyntaxError","SyntaxError","SyntaxError","SyntaxError","SyntaxError"]"#
    );
}

/// Arguments the in-place read must leave to the copying path: typed arrays, array-likes, holes
/// (also filled from Array.prototype), a Proxy (its trap order) and a getter that empties the array.
#[test]
fn from_char_code_apply_on_typed_arrays_array_likes_holes_proxies_and_getters() {
    let source = r#"
function codes(s) { var c = []; for (var i = 0; i < s.length; i++) c.push(s.charCodeAt(i)); return c.join(','); }
var r = [];
r.push(codes(String.fromCharCode.apply(String, new Uint8Array([104, 105, 300]))));
r.push(codes(String.fromCharCode.apply(String, new Uint16Array([0x263a, 0x41]))));
r.push(codes(String.fromCharCode.apply(String, new Float64Array([65.5, -1, NaN, 1e10]))));
r.push(codes(String.fromCharCode.apply(String, new Int32Array([-1, 0x10041]))));
r.push(codes(String.fromCharCode.apply(String, {length: 3, 0: 72, 1: '105'})));
r.push(codes(String.fromCharCode.apply(String, {length: '2', 0: 0x263a, 1: 33, 2: 99})));
var holes = [65, , 67]; holes.length = 5;
r.push(codes(String.fromCharCode.apply(String, holes)));
Array.prototype[1] = 0x42;
r.push(codes(String.fromCharCode.apply(String, holes)));
delete Array.prototype[1];
var log = [];
var p = new Proxy([72, 73], {get: function (o, k) { if (typeof k === 'string') log.push(k); return o[k]; }});
r.push(codes(String.fromCharCode.apply(String, p)), log.join(','));
var g = [1, 2, 3]; Object.defineProperty(g, 1, {get: function () { g.length = 0; return 0x263a; }});
r.push(codes(String.fromCharCode.apply(String, g)), g.length);
JSON.stringify(r);
"#;
    assert_eq!(
        eval(source),
        r#"["104,105,44","9786,65","65,65535,0,58368","65535,65","72,105,0","9786,33","65,0,67,0,0","65,66,67,0,0","72,73","length,0,1","1,9786,0",0]"#
    );
}

/// A valueOf that empties the array during fromCharCode, other functions that empty the array
/// they were applied with (their arguments are the copy), and 65 535 arguments, QuickJS's limit.
#[test]
fn apply_copies_when_user_code_runs_and_for_other_functions() {
    let source = r#"
var t = [65, 66, {valueOf: function () { t.length = 0; t.push('x', {}); return 67; }}, 68, 1.5];
var r = [String.fromCharCode.apply(String, t), t.length, typeof t[1]];
var args = (function () { t.length = 0; return Array.prototype.slice.call(arguments); }).apply(null, [1, 'two', null, undefined, 4.5, {}]);
var w = [65, 66, 67];
var other = (function () { w.length = 0; w.push(9); return Array.prototype.slice.call(arguments); }).apply(null, w);
r.push(JSON.stringify(args), JSON.stringify(other), w.length);
r.push(Math.max.apply(Math, [1, 5, 3]), Reflect.apply(String.fromCharCode, null, [72, 0x263a]));
var big = []; for (var i = 0; i < 65535; i++) big.push(97 + i % 26);
var s = String.fromCharCode.apply(String, big);
r.push(s.length, s.charCodeAt(65534));
JSON.stringify(r);
"#;
    assert_eq!(
        eval(source),
        r#"["ABCD\u0001",2,"object","[1,\"two\",null,null,4.5,{}]","[65,66,67]",1,5,"H☺",65535,111]"#
    );
}

/// QuickJS takes at most 65 535 arguments in one call (V8 takes more): the fast path keeps the
/// limit, so a payload one longer fails the same way on both paths.
#[test]
fn from_char_code_apply_refuses_65536_arguments_as_the_copying_path_does() {
    let source = r#"
var a = []; for (var i = 0; i < 65536; i++) a.push(65);
var r = [];
try { String.fromCharCode.apply(String, a); } catch (e) { r.push(e.constructor.name); }
a[0] = {};
try { String.fromCharCode.apply(String, a); } catch (e) { r.push(e.constructor.name); }
JSON.stringify(r);
"#;
    assert_eq!(eval(source), r#"["RangeError","RangeError"]"#);
}

/// An element's valueOf grows the array until its storage moves: the array holds an object, so
/// apply must copy it first. Reading it in place instead (is_from_char_code_of_primitives taking
/// objects) is a use after free, which the fuzzer under AddressSanitizer finds within seconds
/// (fuzz/regressions/valueof-unshift-moves-the-array).
#[test]
fn from_char_code_apply_copies_an_array_a_valueof_moves() {
    let source = r#"
var t = [72, {valueOf: function () { for (var i = 0; i < 64; i++) t.unshift(0x41, 0x100, -1); return 105; }}, 33, 0x263a, 0xe9];
var s = String.fromCharCode.apply({}, t);
var c = []; for (var i = 0; i < s.length; i++) c.push(s.charCodeAt(i));
JSON.stringify([c, t.length, t[0], t[t.length - 1]]);
"#;
    assert_eq!(eval(source), r#"[[72,105,33,9786,233],197,65,233]"#);
}
