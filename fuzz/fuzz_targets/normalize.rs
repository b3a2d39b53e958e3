#![no_main]

//! The converter-result normaliser from JSON text, read as the converter reads a script's
//! `JSON.stringify` text (lone surrogate escapes carried). It must never panic; what it accepts
//! must be entities whose Kafka value is JSON naming the entity by its key, with telemetry as
//! `[{ts, values}]`, and which normalise to themselves again (the normal form is a valid result).

use edgegate::converter::normalize;
use edgegate::converter::text::carry_escapes;
use serde_json::Value;

const CAPTURED_MS: u64 = 1_700_000_000_000;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(result) = serde_json::from_str::<Value>(&carry_escapes(text)) else {
        return;
    };
    let Ok(entities) = normalize(result, CAPTURED_MS) else {
        return;
    };
    for e in entities {
        let value = e.value();
        let Value::Object(obj) = &value else {
            panic!(
                "the Kafka value of {:?} is not a JSON object: {:?}",
                e.name, e.json
            );
        };
        let name = obj
            .get("deviceName")
            .or_else(|| obj.get("assetName"))
            .and_then(Value::as_str);
        assert_eq!(name, Some(e.name.as_str()), "{value}");
        assert!(
            obj.get("attributes").is_some_and(Value::is_object),
            "{value}"
        );
        let telemetry = obj.get("telemetry").and_then(Value::as_array);
        for entry in telemetry.unwrap_or_else(|| panic!("no telemetry array: {value}")) {
            assert!(entry.get("ts").is_some_and(Value::is_u64), "{value}");
            assert!(entry.get("values").is_some_and(Value::is_object), "{value}");
        }
        let again = normalize(value.clone(), CAPTURED_MS)
            .unwrap_or_else(|err| panic!("normal form refused ({err}): {value}"));
        assert_eq!(
            again,
            vec![e],
            "the normal form changed when normalised again"
        );
    }
});
