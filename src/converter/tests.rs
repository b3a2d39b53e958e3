use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

use super::*;

const SEED_DECODER: &str = include_str!("../../config/decoders/thingsboard.js");
const SEED_PAYLOAD: &str = include_str!("../../tests/fixtures/seed-payload.json");
const T: u64 = 1_700_000_000_000;

struct Script {
    _dir: tempfile::TempDir,
    config: ConverterConfig,
}

fn script(body: &str) -> Script {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decoder.js");
    std::fs::write(&path, body).unwrap();
    Script {
        _dir: dir,
        config: ConverterConfig {
            kind: ConverterKind::Decoder,
            script: path,
            timeout: Duration::from_millis(100),
            timeout_retry_delay: Duration::from_secs(30),
            memory_limit: ByteSize::mib(16),
            debug: DebugMode::Off,
            debug_max_bytes: ByteSize::mib(1),
            metadata: BTreeMap::new(),
        },
    }
}

fn converter(body: &str) -> (Script, Converter) {
    let s = script(body);
    let c = Converter::new("test", &s.config, None).unwrap();
    (s, c)
}

fn raw(c: &mut Converter, payload: &[u8]) -> Result<Value, ConvertError> {
    c.run_raw(payload, &[("topic", "t/1")])
}

#[test]
fn seed_decoder_runs_unmodified_on_the_seed_payload() {
    let (_s, mut c) = converter(SEED_DECODER);
    let entities = c.convert(SEED_PAYLOAD.as_bytes(), &[], T).unwrap();
    assert_eq!(entities.len(), 1);
    assert_eq!(entities[0].name, "SN-111");
    assert_eq!(
        entities[0].value(),
        json!({
            "deviceName": "SN-111",
            "deviceType": "default",
            "attributes": {"model": "Model A"},
            "telemetry": [
                {"ts": 1607731932000u64, "values": {"battery": 3.99, "temperature": 27.05}},
                {"ts": 1607775132000u64, "values": {"battery": 3.98, "temperature": 27.06}}
            ]
        })
    );
}

#[test]
fn normalized_output_is_valid_input_for_the_seed_decoder() {
    let (_s, mut c) = converter(SEED_DECODER);
    let payload = br#"{"deviceName":"D","attributes":{"fw":"1.2"},"telemetry":{"t":21.5}}"#;
    let first = c.convert(payload, &[], T).unwrap();
    let encoded = first[0].json.clone();
    let second = c.convert(&encoded, &[], T + 99_999).unwrap();
    assert_eq!(first, second);
}

#[test]
fn utf8_payloads_arrive_as_utf16_code_units_and_binary_as_bytes() {
    let (_s, mut c) = converter(
        "return {deviceName: 'd', attributes: {p: payload, s: decodeToString(payload)}};",
    );
    let out = raw(&mut c, "21.5°C €𝄞".as_bytes()).unwrap();
    assert_eq!(out["attributes"]["s"], "21.5°C €𝄞");
    let units: Vec<u16> = "21.5°C €𝄞".encode_utf16().collect();
    assert_eq!(out["attributes"]["p"], json!(units));
    let binary = [0x01, 0xff, 0xfe, 0x80, 0x00];
    let out = raw(&mut c, &binary).unwrap();
    assert_eq!(out["attributes"]["p"], json!([1, 255, 254, 128, 0]));
    let out = raw(&mut c, b"").unwrap();
    assert_eq!(out["attributes"]["p"], json!([]));
}

/// The vendored QuickJS takes shortcuts in `String.fromCharCode`, `apply` and array freeing
/// (vendor/README.md); everything off the integer fast path must still follow the standard.
#[test]
fn from_char_code_apply_keeps_standard_semantics_off_its_fast_path() {
    let (_s, mut c) = converter(
        "var s = String.fromCharCode.apply(String, payload);\n\
         var mixed = [72, 105, 0x10041, 65.9, '66', 0xe9, -1, 0x2603, 1.5e9, {valueOf: function () { return 33; }}];\n\
         var big = []; for (var i = 0; i < 3000; i++) big.push(97 + i % 3);\n\
         var sparse = [104, , 105]; sparse.length = 4;\n\
         var longer = [104, 105]; longer.length = 3;\n\
         var shrinking = [65, {valueOf: function () { shrinking.length = 0; return 66; }}, 67];\n\
         return {deviceName: 'x', attributes: {\n\
           s: s, mixed: String.fromCharCode.apply(null, mixed), wideFirst: String.fromCharCode(0x263a, 65),\n\
           big: String.fromCharCode.apply(null, big).slice(0, 6) + String.fromCharCode.apply(null, big).length,\n\
           sparse: JSON.stringify(String.fromCharCode.apply(null, sparse)), kept: payload.length,\n\
           longer: JSON.stringify(String.fromCharCode.apply(null, longer)),\n\
           shrinking: String.fromCharCode.apply(null, shrinking), bound: String.fromCharCode.bind(null, 72).apply(null, [105])}};",
    );
    let out = raw(&mut c, "hé ☃".as_bytes()).unwrap();
    let a = &out["attributes"];
    assert_eq!(a["s"], "hé ☃");
    assert_eq!(a["mixed"], "HiAABé\u{ffff}☃\u{2f00}!");
    assert_eq!(a["wideFirst"], "☺A");
    assert_eq!(a["big"], "abcabc3000");
    assert_eq!(a["sparse"], "\"h\\u0000i\\u0000\"");
    assert_eq!(a["kept"], 4);
    assert_eq!(a["longer"], "\"hi\\u0000\"");
    assert_eq!(a["shrinking"], "ABC");
    assert_eq!(a["bound"], "Hi");
}

/// Math.* and `**` come from edgegate's fdlibm (V8's), not the C library (vendor/README.md):
/// each expected text is Node.js's `String(...)` of the same expression. With the C library's
/// functions most of these differ in the last digit.
#[test]
fn math_functions_give_nodejs_doubles() {
    let cases = [
        ["Math.acosh(2.6896235716605847)", "1.6460468585955976"],
        ["Math.asinh(327.44406429362954)", "6.484466756652713"],
        ["Math.cos(0.7151797347237641)", "0.7549753918004207"],
        ["Math.cosh(1)", "1.5430806348152437"],
        ["Math.exp(1)", "2.718281828459045"],
        ["Math.log(176)", "5.170483995038151"],
        ["Math.log10(97.43)", "1.9886927025498167"],
        ["Math.log1p(1.7911994803810097e-9)", "1.7911994787768118e-9"],
        ["Math.sin(-2305165834500.4033)", "-0.9635351359070525"],
        ["Math.pow(4.671433934258233, 2.5)", "47.16561786706319"],
        ["(-0.46230782903402456) ** -14", "49086.55190626131"],
        [
            "Math.atan2(-5.89, -1.4734526627704476e-18)",
            "-1.5707963267948966",
        ],
        ["Math.hypot(0.1, 0.2, 0.3)", "0.37416573867739417"],
        ["Math.hypot(3, 4)", "5"],
        ["Math.cbrt(2.5)", "1.3572088082974532"],
        ["Math.tanh(0.3)", "0.2913126124515909"],
        ["Math.sinh(2.5)", "6.0502044810397875"],
        ["Math.atanh(0.6)", "0.6931471805599453"],
        [
            "Math.pow(1.0024218162125542e-3, 11)",
            "1.0269649191155742e-33",
        ],
        ["Math.sin(1e22)", "-0.8522008497671888"],
        ["Math.tan(1e300)", "1.4214488238747245"],
        ["Math.exp(-745.1)", "5e-324"],
        ["Math.pow(2, -1074)", "5e-324"],
        [
            "(6.129982163463556e+54).toString()",
            "6.129982163463556e+54",
        ],
        ["String(1034240355349752.25)", "1034240355349752.2"],
        ["(75382.28571428571).toString(36)", "1m5y.aaaaaaa"],
        [
            "parseInt('zzzzzzzzzzzzzzzzzz', 36)",
            "1.0314424798490537e+28",
        ],
        [
            "parseInt('0fjmyh84iijk3ujr5tco3oefn03pmclcgiqs1', 36)",
            "4.594010682159687e+55",
        ],
        [
            "(6.129982163463556e+54).toExponential()",
            "6.129982163463556e+54",
        ],
        ["(1234.5).toLocaleString()", "1,234.5"],
        ["(1.0005).toLocaleString()", "1.001"],
        ["(-0).toLocaleString()", "-0"],
        ["(12345).toLocaleString()", "12,345"],
        ["(-Infinity).toLocaleString()", "-∞"],
    ];
    let list: Vec<String> = cases.iter().map(|[e, _]| format!("String({e})")).collect();
    let (_s, mut c) = converter(&format!(
        "return {{deviceName: 'x', attributes: {{v: [{}]}}}};",
        list.join(", ")
    ));
    let out = raw(&mut c, b"x").unwrap();
    for (i, [expr, want]) in cases.iter().enumerate() {
        assert_eq!(out["attributes"]["v"][i], *want, "{expr}");
    }
}

/// A real U+FDD0 (the character `text` carries lone surrogates with) and private-use characters
/// reach Kafka unchanged on both of the converter's paths, and in raw results; Node.js writes them
/// as they are. The first entity goes through JSON.stringify (a number as its name), the second
/// is read directly.
#[test]
fn noncharacters_and_private_use_characters_pass_unchanged() {
    let (_s, mut c) = converter(
        "return [{deviceName: 1.5, attributes: {s: 'x\\uFDD0\\uE000y', d: '\\uFDD0\\uFDD0'}},\n\
                 {deviceName: 'a\\uFDD0\\uE000', attributes: {s: 'x\\uFDD0\\uE000y', d: '\\uFDD0\\uFDD0'}}];",
    );
    let entities = c.convert(b"{}", &[], 7).unwrap();
    let text = |e: &Entity| String::from_utf8(e.json.clone()).unwrap();
    assert_eq!(
        text(&entities[0]),
        "{\"deviceName\":\"1.5\",\"deviceType\":\"default\",\"attributes\":{\"s\":\"x\u{FDD0}\u{E000}y\",\"d\":\"\u{FDD0}\u{FDD0}\"},\"telemetry\":[]}"
    );
    assert_eq!(
        text(&entities[1]),
        "{\"deviceName\":\"a\u{FDD0}\u{E000}\",\"deviceType\":\"default\",\"attributes\":{\"s\":\"x\u{FDD0}\u{E000}y\",\"d\":\"\u{FDD0}\u{FDD0}\"},\"telemetry\":[]}"
    );
    assert_eq!(super::encode(entities[1].clone()).key, "a\u{FDD0}\u{E000}");
    let raw = raw(&mut c, b"{}").unwrap();
    // Values carry strings in `text`'s form; their JSON is Node's.
    assert_eq!(
        crate::converter::number::to_string_js(&raw[1]["attributes"]["d"]),
        "\"\u{FDD0}\u{FDD0}\""
    );
    assert_eq!(
        crate::converter::number::to_string_js(&raw[0]["attributes"]),
        "{\"s\":\"x\u{FDD0}\u{E000}y\",\"d\":\"\u{FDD0}\u{FDD0}\"}"
    );
}

/// A lone surrogate reaches Kafka as JSON.stringify writes it, on both paths; the key gets U+FFFD.
#[test]
fn lone_surrogates_reach_kafka_as_json_stringify_writes_them() {
    let (_s, mut c) = converter(
        "var s = '\\uD83D\\uDE00'.slice(0, 1) + 'x' + String.fromCharCode(0xdfe9);\n\
         return [{deviceName: 2, attributes: {s: s}}, {deviceName: 'k' + s, attributes: {s: s}}];",
    );
    let entities = c.convert(b"{}", &[], 7).unwrap();
    for e in &entities {
        let text = String::from_utf8(e.json.clone()).unwrap();
        assert!(text.contains(r#""s":"\ud83dx\udfe9""#), "{text}");
    }
    assert_eq!(super::encode(entities[1].clone()).key, "k\u{FFFD}x\u{FFFD}");
}

/// JSON.parse's numbers take a shortcut in the vendored QuickJS (vendor/README.md); every one must
/// be the correctly rounded double, as Rust's own parser gives it.
#[test]
fn json_parse_numbers_are_correctly_rounded() {
    let texts = [
        "0",
        "7",
        "-12.340",
        "3.99",
        "27.05",
        "0.1",
        "0.3",
        "1607731932000",
        "123456789012345",
        "999999999999999",
        "0.000000000000001",
        "1234567890123456",
        "9007199254740993",
        "0.30000000000000004",
        "2.5E-3",
        "1e21",
        "-1.7976931348623157e308",
        "0.000000000000000000001",
        "4.35",
        "100.0000000000001",
    ];
    let (_s, mut c) = converter(
        "var texts = decodeToJson(payload);\n\
         var values = texts.map(function (t) { return JSON.parse(t); });\n\
         return {deviceName: 'x', attributes: {values: values, minusZero: Object.is(JSON.parse('-0'), -0)}};",
    );
    let payload = serde_json::to_vec(&texts).unwrap();
    let out = raw(&mut c, &payload).unwrap();
    let values = out["attributes"]["values"].as_array().unwrap();
    for (text, value) in texts.iter().zip(values) {
        let expected: f64 = text.parse().unwrap();
        assert_eq!(
            value.as_f64().unwrap().to_bits(),
            expected.to_bits(),
            "{text}"
        );
    }
    assert_eq!(out["attributes"]["minusZero"], true);
}

#[test]
fn helpers_exist_but_a_scripts_own_definitions_win() {
    let (_s, mut c) = converter(
        "return {deviceName: decodeToJson(payload).n, attributes: {b: btoa('hi'), a: atob('aGk=')}};",
    );
    let out = raw(&mut c, br#"{"n":"x"}"#).unwrap();
    assert_eq!(
        out,
        json!({"deviceName": "x", "attributes": {"b": "aGk=", "a": "hi"}})
    );
    let (_s, mut c) = converter(
        "return {deviceName: decodeToString(payload)};\nfunction decodeToString(p) { return 'mine'; }",
    );
    assert_eq!(raw(&mut c, b"abc").unwrap()["deviceName"], "mine");
}

#[test]
fn es2020_builtins_behave_like_nodejs() {
    // The idioms of ThingsBoard's LoRaWAN device-library decoders.
    let (_s, mut c) = converter(
        r#"
        var bytes = Uint8Array.from(atob(metadata.data), function (ch) { return ch.charCodeAt(0); });
        var view = new DataView(bytes.buffer);
        return {
          deviceName: 'lora',
          telemetry: {
            temp: view.getInt16(0) / 100,
            hex: parseInt('ff', 16),
            hexbytes: Array.from(bytes, function (b) { return ('0' + b.toString(16)).slice(-2); }).join(''),
            iso: new Date(Date.UTC(2020, 11, 12)).toISOString(),
            big: Number(BigInt(2) ** BigInt(40)),
            fixed: (3.14159).toFixed(2),
            nullish: null ?? 'dflt',
            opt: ({}).a?.b === undefined
          }
        };
        "#,
    );
    let out = c.run_raw(b"", &[("data", "CZL/")]).unwrap();
    assert_eq!(
        out["telemetry"],
        json!({"temp": 24.5, "hex": 255, "hexbytes": "0992ff", "iso": "2020-12-12T00:00:00.000Z",
               "big": 1099511627776u64, "fixed": "3.14", "nullish": "dflt", "opt": true})
    );
}

fn record(payload: &[u8]) -> Record {
    Record {
        seq: 7,
        captured_ms: T,
        source: "plant".into(),
        source_type: crate::record::SourceType::Mqtt,
        meta: vec![("topic".into(), "a/b".into())],
        payload: payload.to_vec(),
    }
}

fn converted_attributes(c: &mut Converter) -> Value {
    match c.convert_record(&record(b"x"), "gw-7") {
        Conversion::Entities { entities, .. } => {
            let v: Value = serde_json::from_slice(&entities[0].value).unwrap();
            v["attributes"].clone()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn metadata_has_integration_name_source_fields_and_gateway_id() {
    let mut s = script("return {deviceName: 'd', attributes: metadata};");
    let mut c = Converter::new("c", &s.config, None).unwrap();
    assert_eq!(
        converted_attributes(&mut c),
        json!({"integrationName": "plant", "topic": "a/b", "gatewayId": "gw-7"})
    );
    s.config
        .metadata
        .insert("integrationName".into(), "TB".into());
    s.config.metadata.insert("site".into(), "north".into());
    let mut c = Converter::new("c", &s.config, None).unwrap();
    let attributes = converted_attributes(&mut c);
    assert_eq!(attributes["integrationName"], "TB");
    assert_eq!(attributes["site"], "north");
}

#[test]
fn null_skips_and_arrays_give_several_entities() {
    let (_s, mut c) = converter(
        "return payload.length ? [{deviceName: 'a'}, {assetName: 'b', assetType: 'room'}] : null;",
    );
    assert!(c.convert(b"", &[], T).unwrap().is_empty());
    let two = c.convert(b"x", &[], T).unwrap();
    assert_eq!(two[1].value()["assetType"], "room");
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let s = script("var a = 1;\nvar b = ;\nreturn null;");
    match Converter::new("c", &s.config, None) {
        Err(ConverterError::Compile {
            line,
            message,
            path,
        }) => {
            assert_eq!(line, Some(2), "{message}");
            assert!(message.contains("SyntaxError"), "{message}");
            assert_eq!(path, s.config.script);
        }
        other => panic!("expected a compile error, got {:?}", other.err()),
    }
}

#[test]
fn bad_results_and_exceptions_are_clear_errors() {
    for (body, want) in [
        ("throw new TypeError('bad frame');", "TypeError: bad frame"),
        ("return payload.x.y;", "TypeError"),
        ("throw 'plain string';", "plain string"),
        ("return 42;", "returned a number"),
        ("return 'text';", "returned a string"),
        ("return undefined;", "undefined"),
        (
            "return {deviceName: 'a', assetName: 'b', assetType: 'c'};",
            "both",
        ),
        ("return {telemetry: {}};", "needs deviceName"),
    ] {
        let (_s, mut c) = converter(body);
        let err = c.convert(b"{}", &[], T).unwrap_err();
        assert!(err.to_string().contains(want), "{body}: {err}");
    }
}

#[test]
fn an_endless_loop_stops_at_the_timeout_and_the_next_record_converts() {
    let (_s, mut c) =
        converter("if (payload[0] === 0x6c) { while (true) {} } return {deviceName: 'ok'};");
    let started = Instant::now();
    let err = c.convert(b"loop", &[], T).unwrap_err();
    assert_eq!(err, ConvertError::Timeout(Duration::from_millis(100)));
    assert!(started.elapsed() < Duration::from_secs(2));
    let started = Instant::now();
    assert_eq!(c.convert(b"fine", &[], T).unwrap()[0].name, "ok");
    assert!(started.elapsed() < Duration::from_millis(100));
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Tests that exhaust memory run one at a time: the gigabyte test measures the process's RSS.
static MEMORY_HUNGRY: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_gigabyte_allocation_hits_the_memory_limit_not_the_board() {
    let _alone = MEMORY_HUNGRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = script(
        "if (payload[0] === 0x62) { var a = []; for (var i = 0; i < 1024; i++) a.push(new Array(1 << 17).fill(i)); return {deviceName: 'big', attributes: {n: a.length}}; }\nreturn {deviceName: 'ok'};",
    );
    s.config.timeout = Duration::from_secs(20);
    let mut c = Converter::new("c", &s.config, None).unwrap();
    let before = rss_kib();
    let err = c.convert(b"big", &[], T).unwrap_err();
    assert_eq!(err, ConvertError::OutOfMemory(ByteSize::mib(16)));
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "RSS grew by {grown_mib} MiB");
    assert_eq!(c.convert(b"ok", &[], T).unwrap()[0].name, "ok");
}

/// Freeing a QuickJS runtime right after it ran out of memory is a known abort path: each way
/// of exhausting memory is followed by records that must convert on a recreated runtime (an abort
/// would end this test process).
#[test]
fn running_out_of_memory_in_several_ways_leaves_the_converter_working() {
    let _alone = MEMORY_HUNGRY.lock().unwrap_or_else(|e| e.into_inner());
    let exhaust = [
        "'x'.repeat(1 << 28);",
        "var a = []; while (true) a.push({k: a.length, v: [1, 2, 3]});",
        "var o = {}; var i = 0; while (true) o['k' + i++] = [i];",
        "JSON.parse('[' + '1,'.repeat(1 << 24) + '1]');",
        "new ArrayBuffer(1 << 30);",
        "var m = new Map(); var i = 0; while (true) m.set(i++, 'v' + i);",
    ];
    for body in exhaust {
        let mut s = script(&format!(
            "if (payload[0] === 0x62) {{ {body} }}\nreturn {{deviceName: 'ok'}};"
        ));
        s.config.timeout = Duration::from_secs(20);
        let mut c = Converter::new("c", &s.config, None).unwrap();
        for _ in 0..2 {
            let err = c.convert(b"big", &[], T).unwrap_err();
            let memory = matches!(err, ConvertError::OutOfMemory(_))
                || err.to_string().to_lowercase().contains("memory");
            assert!(memory, "{body}: {err}");
            assert_eq!(c.convert(b"ok", &[], T).unwrap()[0].name, "ok", "{body}");
        }
    }
}

#[test]
fn deep_recursion_is_a_clear_error_and_the_next_record_converts() {
    let (_s, mut c) = converter(
        "function f(n) { return n === 0 ? 0 : 1 + f(n - 1); }\nif (payload.length) f(1e7);\nreturn {deviceName: 'ok'};",
    );
    let err = c.convert(b"deep", &[], T).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("stack"),
        "unexpected: {err}"
    );
    assert_eq!(c.convert(b"", &[], T).unwrap()[0].name, "ok");
}

#[test]
fn scripts_have_no_file_network_or_process_access() {
    let (_s, mut c) = converter(
        "return {deviceName: 'probe', attributes: {names: ['require', 'std', 'os', 'process', 'fetch', 'XMLHttpRequest', 'WebSocket', 'Deno', 'import'].filter(function (n) { return typeof globalThis[n] !== 'undefined'; })}};",
    );
    assert_eq!(raw(&mut c, b"").unwrap()["attributes"]["names"], json!([]));
    let (_s, mut c) =
        converter("return import('os').then(function () { return {deviceName: 'x'}; });");
    // A promise is not a result; and no module can be loaded anyway.
    assert!(c.convert(b"", &[], T).is_err());
}

#[test]
fn results_read_directly_match_json_stringify() {
    // `deviceName` carries the script's own JSON.stringify of the rest, for comparison.
    let (_s, mut c) = converter(
        r#"
        var r = { i: 1, big: 1607731932000, f: 3.99, neg0: -0, nan: NaN, inf: -Infinity,
                  s: "°C \"q\"", b: false, n: null, u: undefined, fn: function () {},
                  arr: [1, undefined, function () {}, [2, [3]], {x: 1}], nested: { a: { b: [] } } };
        if (payload.length) r.when = new Date(0); // toJSON: JSON.stringify's own path
        return { deviceName: JSON.stringify(r), attributes: r };
        "#,
    );
    for payload in [&b""[..], b"d"] {
        let out = raw(&mut c, payload).unwrap();
        let expected: Value = serde_json::from_str(out["deviceName"].as_str().unwrap()).unwrap();
        assert_eq!(out["attributes"], expected);
        assert_eq!(out["attributes"]["big"], json!(1607731932000u64));
    }
    let (_s, mut c) = converter("var a = {deviceName: 'x'}; a.self = a; return a;");
    assert!(raw(&mut c, b"")
        .unwrap_err()
        .to_string()
        .contains("TypeError"));
}

fn record_seq(seq: u64, payload: &[u8]) -> Record {
    Record {
        seq,
        ..record(payload)
    }
}

fn failure(c: &mut Converter, r: &Record) -> Option<ConvertError> {
    match c.convert_record(r, "gw") {
        Conversion::Failed { error, .. } => Some(error),
        _ => None,
    }
}

const LOOPS_ON_L: &str = "if (payload[0] === 0x6c) { while (true) {} } return {deviceName: 'ok'};";

#[test]
fn a_timeout_pauses_the_converter_and_only_the_third_of_one_record_gives_it_up() {
    let (_s, mut c) = converter(LOOPS_ON_L);
    let (hangs, fine) = (record_seq(7, b"loop"), record_seq(8, b"fine"));
    for attempt in 1..TIMEOUT_ATTEMPTS {
        let error = failure(&mut c, &hangs).unwrap();
        assert!(error.is_transient(), "attempt {attempt}: {error}");
        assert_eq!(error.retry_in(), Some(Duration::from_secs(30)));
        // Paused: records wait without running, good ones included.
        let started = Instant::now();
        let waiting = failure(&mut c, &fine).unwrap();
        assert!(matches!(waiting, ConvertError::Suspended(_)), "{waiting}");
        assert!(waiting.is_transient());
        assert!(started.elapsed() < Duration::from_millis(20));
        c.breaker.paused_until = Some(Instant::now());
    }
    let given_up = failure(&mut c, &hangs).unwrap();
    assert!(matches!(given_up, ConvertError::Timeout(_)), "{given_up}");
    assert!(!given_up.is_transient());
    assert_eq!(failure(&mut c, &fine), None);
}

#[test]
fn timeouts_of_different_records_are_each_transient() {
    let (_s, mut c) = converter(LOOPS_ON_L);
    for seq in 0..5 {
        let error = failure(&mut c, &record_seq(seq, b"loop")).unwrap();
        assert!(error.is_transient(), "record {seq}: {error}");
        c.breaker.paused_until = Some(Instant::now());
    }
}

/// What `Engine::convert` did with a result.
#[derive(Debug, PartialEq)]
enum Path {
    Direct(Vec<Entity>),
    General(Result<Vec<Entity>, String>),
}

/// Runs `body` through `Engine::convert`, and through the general rules alone (JSON.stringify's
/// rules, then `normalize`) for comparison.
fn both_paths(body: &str, payload: &[u8]) -> (Path, Result<Vec<Entity>, String>) {
    let limits = Limits {
        timeout: Duration::from_secs(1),
        memory_bytes: 16 << 20,
    };
    let mut engine = Engine::compile(ConverterKind::Decoder, body, "case.js", limits).unwrap();
    let general = |raw: Option<Value>| match raw {
        Some(raw) => normalize(raw, T),
        None => Err("undefined".to_owned()),
    };
    let path = match engine.convert(payload, &[], T) {
        Ok(engine::Converted::Entities(entities)) => Path::Direct(entities),
        Ok(engine::Converted::Result(raw)) => Path::General(general(raw)),
        Err(e) => Path::General(Err(e.to_string())),
    };
    let alone = engine
        .call(payload, &[])
        .map_err(|e| e.to_string())
        .and_then(general);
    (path, alone)
}

#[test]
fn plain_results_are_normalized_directly_to_the_same_text() {
    let cases = [
        SEED_DECODER,
        "return null;",
        "return {deviceName: 'd', deviceType: 't', deviceLabel: 'l', customerName: 'c', \
         groupName: 'g', attributes: {a: 1}, telemetry: {x: 1}};",
        "return {assetName: 'a', assetType: 'room', assetLabel: 'L', deviceType: 'ignored'};",
        "return [{deviceName: 7}, {deviceName: 3.5, telemetry: []}, {deviceName: 'x', attributes: null}];",
        "return {deviceName: 'd', telemetry: [{ts: 5, values: {a: 1}}, {ts: null, values: {b: 2}}, \
         {values: {c: 3}}, {ts: '123', values: {}}, {ts: 5.7, values: {d: 4}}, {e: 5}, \
         {ts: 9, values: [1, 2]}, {ts: 9, values: {f: 6}, extra: 1}, \
         {ts: 9, values: {g: 7}, gone: undefined, fn: function () {}}]};",
        "return {deviceName: 'd', attributes: {s: 'q\"\\\\ °C 😀 \\u0001 \\n', n: [NaN, Infinity, -0, \
         1e21, 1e-7, 9007199254740993, -2.5, 0.1], arr: [undefined, function () {}, null, true, \
         false, {}], '2': 'two', '1': 'one', b: 'b', deep: {x: {y: {z: [[]]}}}}, other: [1, {u: 2}]};",
    ];
    for body in &cases {
        let (path, general) = both_paths(body, SEED_PAYLOAD.as_bytes());
        let general = general.unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(path, Path::Direct(general), "{body}");
    }
}

#[test]
fn what_the_direct_normalizer_does_not_handle_gets_the_general_rules() {
    let cases = [
        "return {deviceName: 'd', attributes: {when: new Date(0)}, telemetry: {m: new Map()}};",
        "return {deviceName: 'd', telemetry: {ts: 1, values: new Map()}};",
        "return {deviceName: 'd', extra: 10n};",
        "var o = {deviceName: 'd'}; o.self = o; return o;",
        "return {deviceName: 'd', get attributes() { throw new Error('no'); }};",
        "return {deviceName: 'd', assetName: 'a', assetType: 't'};",
        "return {attributes: {}};",
        "return {deviceName: ''};",
        "return {assetName: 'a'};",
        "return {deviceName: 'd', attributes: [1]};",
        "return {deviceName: 'd', telemetry: 5};",
        "return {deviceName: 'd', telemetry: [{ts: -1, values: {}}]};",
        "return [{deviceName: 'd'}, 5];",
        "return {deviceName: new String('boxed')};",
        "return 'text';",
        "return undefined;",
    ];
    for body in cases {
        let (path, general) = both_paths(body, b"{}");
        assert_eq!(path, Path::General(general), "{body}");
    }
    // A Date's toJSON and a Map's empty object still convert.
    let (_, general) = both_paths(cases[0], b"{}");
    assert_eq!(
        general.unwrap()[0].value()["attributes"]["when"],
        "1970-01-01T00:00:00.000Z"
    );
}

#[test]
fn metadata_keys_kept_as_atoms_carry_each_records_own_values() {
    let limits = Limits {
        timeout: Duration::from_secs(1),
        memory_bytes: 16 << 20,
    };
    let mut engine =
        Engine::compile(ConverterKind::Decoder, "return metadata;", "m.js", limits).unwrap();
    // More distinct keys than the engine keeps as atoms: the rest still arrive.
    let keys: Vec<String> = (0..80).map(|i| format!("k{i}")).collect();
    for round in ["a", "b"] {
        let values: Vec<String> = keys.iter().map(|k| format!("{k}-{round}")).collect();
        let meta: Vec<(&str, &str)> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let out = engine.call(b"", &meta).unwrap().unwrap();
        assert_eq!(out.as_object().unwrap().len(), 80);
        assert_eq!(out["k0"], format!("k0-{round}"));
        assert_eq!(out["k79"], format!("k79-{round}"));
    }
}

/// A payload that makes `convert_record` panic, to stand for a bug in the conversion.
pub(super) const PANIC_PAYLOAD: &[u8] = b"\xffedgegate-test-panic";

#[test]
fn a_panic_fails_its_record_only_and_the_converter_goes_on() {
    let (_s, c) = converter("return {deviceName: decodeToString(payload)};");
    let metrics = Arc::new(Metrics::new());
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker {
        converters: vec![c],
        by_source: HashMap::from([("plant".to_owned(), 0)]),
        gateway_id: "gw".into(),
        metrics: metrics.clone(),
        crash: CrashLog::open(dir.path()),
    };
    let records = vec![
        record_seq(1, b"a"),
        record_seq(2, PANIC_PAYLOAD),
        record_seq(3, b"b"),
    ];
    let conversions = worker.convert_records(&records);
    let names: Vec<String> = conversions
        .iter()
        .map(|c| match c {
            Conversion::Entities { entities, .. } => entities[0].key.clone(),
            Conversion::Failed { error, .. } => error.kind().to_owned(),
            Conversion::Raw => "raw".into(),
        })
        .collect();
    assert_eq!(names, ["a", "panic", "b"]);
    assert_eq!(metrics.converter_errors_total("test"), 1);
}

/// A chunk holding this payload makes the converter thread itself panic (outside any record).
pub(super) const KILL_THREAD_PAYLOAD: &[u8] = b"\xffedgegate-test-kill-thread";

#[tokio::test]
async fn a_dead_converter_thread_is_restarted() {
    let s = script("return {deviceName: decodeToString(payload)};");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n\
         topic = \"t\"\n[sources.plant]\ntype = \"serial\"\npath = \"/dev/unused\"\n\
         converter = \"c\"\n[converters.c]\nscript = \"{}\"\n",
        dir.path().display(),
        s.config.script.display()
    );
    let config = Arc::new(Config::parse(&text, std::path::Path::new("t.toml")).unwrap());
    let mut converters = Converters::start(&config, Arc::new(Metrics::new())).unwrap();
    let killing = vec![record_seq(1, KILL_THREAD_PAYLOAD)];
    assert!(converters.convert(killing).await.is_err());
    converters.restart().unwrap();
    let (_, conversions) = converters.convert(vec![record_seq(2, b"a")]).await.unwrap();
    assert!(
        matches!(&conversions[0], Conversion::Entities { entities, .. } if entities[0].key == "a")
    );
}

/// Encoders are compiled by `load_encoders`, not run as decoders; a source's converter is found
/// among the decoders even when an encoder sorts before it.
#[tokio::test]
async fn encoders_are_left_out_of_the_decoders_and_checked_on_their_own() {
    let decoder = script("return {deviceName: 'decoded-' + decodeToString(payload)};");
    let encoder = script("return {contentType: 'TEXT', data: 'never a decoder'};");
    let dir = tempfile::tempdir().unwrap();
    let text = |encoder_script: &std::path::Path| {
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n\
             topic = \"t\"\n[sources.plant]\ntype = \"serial\"\npath = \"/dev/unused\"\n\
             converter = \"b\"\n[converters.a]\ntype = \"encoder\"\nscript = \"{}\"\n\
             [converters.b]\nscript = \"{}\"\n",
            dir.path().display(),
            encoder_script.display(),
            decoder.config.script.display()
        )
    };
    let config = Arc::new(
        Config::parse(
            &text(&encoder.config.script),
            std::path::Path::new("t.toml"),
        )
        .unwrap(),
    );
    let decoders = load_all(&config, None).unwrap();
    let names: Vec<&str> = decoders.iter().map(|c| c.name().as_ref()).collect();
    assert_eq!(names, ["b"]);
    load_encoders(&config).unwrap();
    let converters = Converters::start(&config, Arc::new(Metrics::new())).unwrap();
    let (_, conversions) = converters.convert(vec![record_seq(1, b"x")]).await.unwrap();
    assert!(
        matches!(&conversions[0], Conversion::Entities { converter, entities }
            if converter.as_ref() == "b" && entities[0].key == "decoded-x"),
        "{conversions:?}"
    );
    let broken = script("return {;");
    let config =
        Config::parse(&text(&broken.config.script), std::path::Path::new("t.toml")).unwrap();
    match load_encoders(&config) {
        Err((key, ConverterError::Compile { path, .. })) => {
            assert_eq!(key, "converters.a");
            assert_eq!(path, broken.config.script);
        }
        other => panic!("expected the encoder's compile error, got {other:?}"),
    }
}

/// A reload replaces the converters between chunks: the new scripts convert what comes next,
/// and records of a source the new file removed or renamed keep their (new) decoder.
#[tokio::test]
async fn replaced_converters_convert_with_the_new_script_also_for_a_removed_source() {
    let old = script("return {deviceName: 'old-' + decodeToString(payload)};");
    let new = script("return {deviceName: 'new-' + decodeToString(payload)};");
    let dir = tempfile::tempdir().unwrap();
    let config = |source: &str, script: &std::path::Path| {
        let text = format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n\
             topic = \"t\"\n[sources.{source}]\ntype = \"serial\"\npath = \"/dev/unused\"\n\
             converter = \"c\"\n[converters.c]\nscript = \"{}\"\n",
            dir.path().display(),
            script.display()
        );
        Arc::new(Config::parse(&text, std::path::Path::new("t.toml")).unwrap())
    };
    let key = |conversions: &[Conversion]| match &conversions[0] {
        Conversion::Entities { entities, .. } => entities[0].key.clone(),
        other => format!("{other:?}"),
    };
    let mut converters = Converters::start(
        &config("plant", &old.config.script),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let (_, before) = converters.convert(vec![record_seq(1, b"a")]).await.unwrap();
    assert_eq!(key(&before), "old-a");
    converters
        .replace(&config("renamed", &new.config.script))
        .unwrap()
        .unwrap();
    let (_, after) = converters.convert(vec![record_seq(2, b"b")]).await.unwrap();
    assert_eq!(key(&after), "new-b", "the removed source's record");
    let broken = script("return {;");
    let refused = converters.replace(&config("plant", &broken.config.script));
    assert!(
        matches!(refused, Ok(Err(_))),
        "a script that does not compile"
    );
    let (_, kept) = converters.convert(vec![record_seq(3, b"c")]).await.unwrap();
    assert_eq!(key(&kept), "new-c", "the previous converters run on");
}
