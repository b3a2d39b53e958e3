use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use serde_json::{json, Value};

use super::*;
use crate::config::DebugMode;

const TB_ENCODER: &str = include_str!("../../../tests/fixtures/encoders/thingsboard.js");
const EXAMPLE_ENCODER: &str = include_str!("../../../config/encoders/commands.js");
const RPC: &str = "RPC_CALL_FROM_SERVER_TO_DEVICE";

/// A command value that makes [`Encoder::encode`] panic, to stand for a bug in encoding.
pub(super) const PANIC_VALUE: &[u8] = b"\xffedgegate-test-encoder-panic";

struct Script {
    dir: tempfile::TempDir,
    config: ConverterConfig,
}

fn script(body: &str) -> Script {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.js");
    std::fs::write(&path, body).unwrap();
    let mut config = ConverterConfig::for_script(path);
    config.kind = ConverterKind::Encoder;
    config.timeout = Duration::from_millis(100);
    Script { dir, config }
}

fn encoder(body: &str) -> (Script, Encoder) {
    let s = script(body);
    let e = Encoder::new("enc", &s.config, None).unwrap();
    (s, e)
}

fn meta(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Encodes `value` with metadata `deviceName=T1`.
fn encode(e: &mut Encoder, value: &[u8]) -> Result<Vec<Downlink>, ConvertError> {
    e.encode(value, &meta(&[("deviceName", "T1")]), RPC, "gw-1", 5)
}

/// The script's `msg` etc. as the result's TEXT data.
fn seen(e: &mut Encoder, value: &[u8]) -> Value {
    let out = encode(e, value).unwrap();
    serde_json::from_slice(&out[0].data).unwrap()
}

fn text(data: &str) -> Downlink {
    Downlink {
        content_type: ContentType::Text,
        data: data.as_bytes().to_vec(),
        metadata: BTreeMap::new(),
    }
}

#[test]
fn the_thingsboard_documentation_encoder_runs_unmodified() {
    let (_s, mut e) = encoder(TB_ENCODER);
    let out = e
        .encode(
            br#"{"temperatureUploadFrequency":60,"humidityUploadFrequency":30}"#,
            &meta(&[
                ("ss_serialNumber", "SN-1"),
                ("deviceType", "thermostat"),
                ("deviceName", "T1"),
            ]),
            RPC,
            "gw-1",
            0,
        )
        .unwrap();
    assert_eq!(
        out,
        [Downlink {
            content_type: ContentType::Json,
            data: br#"{"tempFreq":60,"humFreq":30,"devSerialNumber":"SN-1"}"#.to_vec(),
            metadata: BTreeMap::from([("topic".into(), "thermostat/T1/upload".into())]),
        }]
    );
}

#[test]
fn json_text_and_binary_results_give_their_bytes() {
    let (_s, mut e) = encoder(
        "return {contentType: msg.t, data: msg.d, metadata: {deviceName: metadata.deviceName}};",
    );
    let one = |e: &mut Encoder, t: &str, d: &str| {
        let value = json!({"t": t, "d": d}).to_string();
        let mut out = encode(e, value.as_bytes()).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].metadata["deviceName"], "T1");
        let d = out.remove(0);
        (d.content_type, d.data)
    };
    // JSON data is sent as the script wrote it, spacing included: not re-serialised.
    let (ct, data) = one(&mut e, "JSON", "{ \"a\" : 1.50 }");
    assert_eq!(
        (ct, data),
        (ContentType::Json, b"{ \"a\" : 1.50 }".to_vec())
    );
    let (ct, data) = one(&mut e, "TEXT", "héllo");
    assert_eq!((ct, data), (ContentType::Text, "héllo".as_bytes().to_vec()));
    let (ct, data) = one(&mut e, "BINARY", "AP8Q");
    assert_eq!((ct, data), (ContentType::Binary, vec![0x00, 0xff, 0x10]));
    // Padding is optional, surrounding whitespace ignored.
    assert_eq!(one(&mut e, "BINARY", "AP8=").1, [0x00, 0xff]);
    assert_eq!(one(&mut e, "BINARY", "AP8").1, [0x00, 0xff]);
    assert_eq!(one(&mut e, "BINARY", " AP8=\n").1, [0x00, 0xff]);
    assert_eq!(one(&mut e, "BINARY", "").1, [0u8; 0]);
    // What btoa gives decodes to the bytes the script meant.
    let (_s, mut e) =
        encoder("return {contentType: 'BINARY', data: btoa(String.fromCharCode(1, 0, 200, 255))};");
    assert_eq!(encode(&mut e, b"").unwrap()[0].data, [1, 0, 200, 255]);
}

#[test]
fn arrays_give_one_message_each_and_null_or_empty_nothing() {
    let (_s, mut e) = encoder(
        "if (msg === 'none') return null;\n\
         if (msg === 'empty') return [];\n\
         return [{contentType: 'TEXT', data: 'a'}, {contentType: 'TEXT', data: 'b', metadata: null}];",
    );
    assert_eq!(encode(&mut e, b"two").unwrap(), [text("a"), text("b")]);
    assert_eq!(encode(&mut e, b"none").unwrap(), []);
    assert_eq!(encode(&mut e, b"empty").unwrap(), []);
}

#[test]
fn each_invalid_result_names_its_element_and_key() {
    for (ret, want) in [
        ("undefined", "the encoder returned undefined"),
        ("42", "the encoder returned a number"),
        ("'AP8='", "the encoder returned a string"),
        ("{data: 'x'}", "result.contentType: missing"),
        ("{contentType: 'XML', data: 'x'}", "result.contentType: \"XML\" is not one of"),
        ("{contentType: 'json', data: 'x'}", "result.contentType: \"json\""),
        ("{contentType: 1, data: 'x'}", "result.contentType: expected"),
        ("{contentType: 'TEXT'}", "result.data: missing"),
        ("{contentType: 'TEXT', data: undefined}", "result.data: missing"),
        ("{contentType: 'JSON', data: {a: 1}}", "result.data: expected a string, got an object"),
        ("{contentType: 'TEXT', data: null}", "result.data: expected a string, got null"),
        ("{contentType: 'BINARY', data: 'A$=='}", "result.data: BINARY data is not base64"),
        ("{contentType: 'TEXT', data: 'x', metadata: 'k=v'}", "result.metadata: expected an object"),
        ("{contentType: 'TEXT', data: 'x', metadata: [1]}", "result.metadata: expected an object"),
        (
            "{contentType: 'TEXT', data: 'x', metadata: {topic: {a: 1}}}",
            "result.metadata.topic: expected a string, number or boolean, got an object",
        ),
        (
            "{contentType: 'TEXT', data: 'x', metadata: {k: null}}",
            "result.metadata.k: expected a string, number or boolean, got null",
        ),
        (
            "[{contentType: 'TEXT', data: 'ok'}, {contentType: 'TEXT'}]",
            "result[1].data: missing",
        ),
        ("[{contentType: 'TEXT', data: 'ok'}, 'x']", "result[1]: expected an object"),
        (
            "[{contentType: 'TEXT', data: 'ok'}, {contentType: 'TEXT', data: 'x', metadata: {m: [1]}}]",
            "result[1].metadata.m: expected a string, number or boolean, got an array",
        ),
    ] {
        let (_s, mut e) = encoder(&format!("return {ret};"));
        match encode(&mut e, b"{}") {
            Err(ConvertError::InvalidResult(message)) => {
                assert!(message.contains(want), "{ret}: {message}")
            }
            other => panic!("{ret}: expected an invalid result, got {other:?}"),
        }
    }
}

#[test]
fn metadata_numbers_and_booleans_become_their_javascript_text() {
    // QuickJS's own String(v) is the reference for every value.
    let (_s, mut e) = encoder(
        "var values = [7, -3, 1.5, true, false, 0.1, 1e21, 1e-7, 123456789012345680000, 2e-6,\n\
           -1.25e-9, Math.pow(2, 60), 9007199254740993, 1 / 3, -0, 'text', 5e-324, 1.7976931348623157e308];\n\
         var metadata = {};\n\
         values.forEach(function (v, i) { metadata['k' + i] = v; });\n\
         return {contentType: 'JSON', data: JSON.stringify(values.map(String)), metadata: metadata};",
    );
    let out = encode(&mut e, b"").unwrap();
    let expected: Vec<String> = serde_json::from_slice(&out[0].data).unwrap();
    assert_eq!(expected[1], "-3");
    assert_eq!(expected[6], "1e+21");
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&out[0].metadata[&format!("k{i}")], want, "k{i}");
    }
}

#[test]
fn msg_is_parsed_json_when_it_is_json_and_text_otherwise() {
    let (_s, mut e) = encoder(
        "return {contentType: 'TEXT', data: JSON.stringify({type: typeof msg, msg: msg,\n\
           sum: typeof msg === 'object' && msg !== null ? msg.a + msg.b : null})};",
    );
    let got = seen(&mut e, br#"{"a": 1.5, "b": 2}"#);
    assert_eq!(
        got,
        json!({"type": "object", "msg": {"a": 1.5, "b": 2}, "sum": 3.5})
    );
    assert_eq!(seen(&mut e, b"42")["type"], "number");
    assert_eq!(seen(&mut e, b" [1, 2] ")["msg"], json!([1, 2]));
    assert_eq!(seen(&mut e, b"\"quoted\"")["msg"], "quoted");
    assert_eq!(seen(&mut e, b"null")["type"], "object");
    for (value, text) in [
        (&b"reboot"[..], "reboot"),
        (b"{\"a\": 1", "{\"a\": 1"),
        (b"", ""),
        (b"1\x002", "1\u{0}2"),
        // Invalid UTF-8 is replaced, never an error.
        (b"\xff\x01", "\u{fffd}\u{1}"),
    ] {
        let got = seen(&mut e, value);
        assert_eq!(got["type"], "string", "{value:?}");
        assert_eq!(got["msg"], text, "{value:?}");
    }
}

#[test]
fn the_script_sees_metadata_msg_type_and_integration_metadata() {
    let body = "return {contentType: 'TEXT', data: JSON.stringify({metadata: metadata,\n\
                msgType: msgType, integrationMetadata: integrationMetadata})};";
    let mut s = script(body);
    let mut e = Encoder::new("downlink-enc", &s.config, None).unwrap();
    let got = seen(&mut e, b"{}");
    assert_eq!(
        got,
        json!({
            "metadata": {"deviceName": "T1"},
            "msgType": RPC,
            "integrationMetadata": {"integrationName": "downlink-enc", "gatewayId": "gw-1"}
        })
    );
    s.config
        .metadata
        .insert("integrationName".into(), "TB".into());
    s.config.metadata.insert("site".into(), "north".into());
    let mut e = Encoder::new("downlink-enc", &s.config, None).unwrap();
    let out = e
        .encode(
            b"{}",
            &meta(&[("a", "1"), ("b", "x y")]),
            "ATTRIBUTES_UPDATED",
            "",
            0,
        )
        .unwrap();
    let got: Value = serde_json::from_slice(&out[0].data).unwrap();
    assert_eq!(got["metadata"], json!({"a": "1", "b": "x y"}));
    assert_eq!(got["msgType"], "ATTRIBUTES_UPDATED");
    // No gateway id (the command line without a configuration): no gatewayId.
    assert_eq!(
        got["integrationMetadata"],
        json!({"integrationName": "TB", "site": "north"})
    );
}

#[test]
fn exceptions_timeouts_and_memory_fail_the_command_and_the_next_one_encodes() {
    let (_s, mut e) = encoder(
        "if (msg === 'throw') throw new TypeError('bad command');\n\
         if (msg === 'loop') while (true) {}\n\
         if (msg === 'grow') new ArrayBuffer(1 << 30);\n\
         return {contentType: 'TEXT', data: 'ok'};",
    );
    assert_eq!(
        encode(&mut e, b"throw"),
        Err(ConvertError::Exception("TypeError: bad command".into()))
    );
    let started = Instant::now();
    assert_eq!(
        encode(&mut e, b"loop"),
        Err(ConvertError::Timeout(Duration::from_millis(100)))
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(encode(&mut e, b"next").unwrap(), [text("ok")]);
    assert_eq!(
        encode(&mut e, b"grow"),
        Err(ConvertError::OutOfMemory(ByteSize::mib(16)))
    );
    assert_eq!(encode(&mut e, b"next").unwrap(), [text("ok")]);
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let s = script("var a = 1;\n\nvar b = ;\nreturn null;");
    match Encoder::new("enc", &s.config, None) {
        Err(ConverterError::Compile {
            line,
            message,
            path,
        }) => {
            assert_eq!(line, Some(3), "{message}");
            assert!(message.contains("SyntaxError"), "{message}");
            assert_eq!(path, s.config.script);
        }
        other => panic!("expected a compile error, got {:?}", other.err()),
    }
}

#[test]
fn the_example_encoder_and_its_binary_variant_work() {
    let (_s, mut e) = encoder(EXAMPLE_ENCODER);
    let command = br#"{"method": "setInterval", "params": {"seconds": 300}}"#;
    let out = encode(&mut e, command).unwrap();
    assert_eq!(
        out,
        [Downlink {
            content_type: ContentType::Json,
            data: br#"{"method":"setInterval","params":{"seconds":300}}"#.to_vec(),
            metadata: BTreeMap::from([
                ("deviceName".into(), "T1".into()),
                ("method".into(), "setInterval".into()),
            ]),
        }]
    );
    let err = encode(&mut e, b"reboot").unwrap_err();
    assert!(err.to_string().contains("not a command"), "{err}");
    // The commented BINARY example, uncommented.
    let (_, example) = EXAMPLE_ENCODER.split_once("// BINARY example").unwrap();
    let binary: String = example
        .lines()
        .filter_map(|l| l.strip_prefix("// "))
        .skip_while(|l| !l.starts_with("var "))
        .map(|l| format!("{l}\n"))
        .collect();
    let (_s, mut e) = encoder(&format!("var deviceName = metadata.deviceName;\n{binary}"));
    let out = encode(&mut e, command).unwrap();
    assert_eq!(out[0].content_type, ContentType::Binary);
    assert_eq!(out[0].data, [0x01, 0x01, 0x2c]);
    assert_eq!(out[0].metadata["deviceName"], "T1");
}

#[test]
fn debug_events_are_typed_downlink_with_the_command_and_results() {
    let mut s = script(
        "if (msg === 'bad') return {contentType: 'TEXT'};\n\
         return {contentType: 'BINARY', data: ' AP8 ', metadata: {n: 7}};",
    );
    s.config.debug = DebugMode::All;
    let debug_dir = s.dir.path().join("debug");
    let mut e = Encoder::new("enc", &s.config, Some(&debug_dir)).unwrap();
    encode(&mut e, b"{\"x\":1}").unwrap();
    e.encode(b"bad", &[], "ATTRIBUTES_UPDATED", "gw", 41)
        .unwrap_err();
    let text = std::fs::read_to_string(debug_dir.join("enc.jsonl")).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["type"], "Downlink");
    assert_eq!(events[0]["seq"], 5);
    assert_eq!(events[0]["in"], "{\"x\":1}");
    assert_eq!(events[0]["metadata"], json!({"deviceName": "T1"}));
    assert_eq!(events[0]["msgType"], RPC);
    // data as the script returned it.
    assert_eq!(
        events[0]["out"],
        json!([{"contentType": "BINARY", "data": " AP8 ", "metadata": {"n": "7"}}])
    );
    assert_eq!(events[0]["error"], Value::Null);
    assert_eq!(events[1]["seq"], 41);
    assert_eq!(events[1]["out"], Value::Null);
    assert!(
        events[1]["error"]
            .as_str()
            .unwrap()
            .contains("result.data: missing"),
        "{text}"
    );
}

#[test]
fn encode_json_shows_data_as_returned_and_encode_raw_the_script_value() {
    let (_s, mut e) =
        encoder("return [{contentType: 'BINARY', data: 'AP8', metadata: {ok: true}, extra: 1}];");
    assert_eq!(
        e.encode_json(b"", &[], RPC, "").unwrap(),
        [json!({"contentType": "BINARY", "data": "AP8", "metadata": {"ok": "true"}})]
    );
    assert_eq!(
        e.encode_raw(b"", &[], RPC, "").unwrap(),
        json!([{"contentType": "BINARY", "data": "AP8", "metadata": {"ok": true}, "extra": 1}])
    );
}

fn job(value: &[u8], seq: u64) -> EncodeJob {
    EncodeJob {
        value: value.to_vec(),
        metadata: meta(&[("deviceName", "T1")]),
        msg_type: RPC.into(),
        seq,
        origin: format!("cmds/0/{seq}"),
    }
}

#[tokio::test]
async fn the_encoder_thread_encodes_and_a_panic_fails_only_its_command() {
    let s =
        script("return {contentType: 'TEXT', data: msg + '@' + integrationMetadata.gatewayId};");
    let encoders = Encoders::start("enc", &s.config, s.dir.path(), "gw-9".into()).unwrap();
    assert_eq!(encoders.name().as_ref(), "enc");
    let first = encoders.encode(job(b"a", 1)).await.unwrap();
    assert_eq!(first, Ok(vec![text("a@gw-9")]));
    let panicked = encoders.encode(job(PANIC_VALUE, 2)).await.unwrap();
    assert!(
        matches!(&panicked, Err(ConvertError::Panicked(m)) if m.contains("asked for a panic")),
        "{panicked:?}"
    );
    let after = encoders.encode(job(b"b", 3)).await.unwrap();
    assert_eq!(after, Ok(vec![text("b@gw-9")]));
}

#[test]
fn the_encoder_thread_reports_a_script_that_does_not_compile() {
    let s = script("return {;");
    match Encoders::start("enc", &s.config, s.dir.path(), "gw".into()) {
        Err(ConverterError::Compile { line, .. }) => assert_eq!(line, Some(1)),
        Err(other) => panic!("expected a compile error, got {other}"),
        Ok(_) => panic!("a broken script started"),
    }
}
