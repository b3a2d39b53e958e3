//! ThingsBoard's uplink result rules: what a decoder may return, and the one normalized shape
//! edgegate sends to Kafka.

use serde_json::{Map, Value};

use super::number::{js_number_of, to_vec_js};

/// One device or asset from a decoder result, in normalized form.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// deviceName or assetName: the Kafka key.
    pub name: String,
    /// The Kafka value, compact JSON text:
    /// `{"deviceName","deviceType"[,…],"attributes":{…},"telemetry":[{"ts","values"}]}`.
    pub json: Vec<u8>,
}

impl Entity {
    /// The entity as a JSON value, for the debug log and the command line.
    pub fn value(&self) -> Value {
        let text = String::from_utf8_lossy(&self.json);
        serde_json::from_str(&super::text::carry_escapes(&text)).unwrap_or(Value::Null)
    }
}

/// Normalizes a decoder's return value (as JSON). `Ok(vec![])` for `null`: skip the message.
pub fn normalize(result: Value, captured_ms: u64) -> Result<Vec<Entity>, String> {
    match result {
        Value::Null => Ok(Vec::new()),
        Value::Object(obj) => Ok(vec![entity(obj, captured_ms)?]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(obj) => entity(obj, captured_ms).map_err(|e| format!("[{i}]: {e}")),
                other => Err(format!(
                    "[{i}]: expected an object, got {}",
                    type_name(&other)
                )),
            })
            .collect(),
        other => Err(format!(
            "the decoder returned {}; return an object, an array of objects, or null",
            type_name(&other)
        )),
    }
}

fn entity(mut obj: Map<String, Value>, captured_ms: u64) -> Result<Entity, String> {
    let device = name_field(&mut obj, "deviceName")?;
    let asset = name_field(&mut obj, "assetName")?;
    let mut out = Map::new();
    let name = match (device, asset) {
        (Some(_), Some(_)) => {
            return Err("has both deviceName and assetName; use one of them".into());
        }
        (None, None) => return Err("needs deviceName, or assetName and assetType".into()),
        (Some(name), None) => {
            let kind = name_field(&mut obj, "deviceType")?.unwrap_or_else(|| "default".into());
            out.insert("deviceName".into(), name.clone().into());
            out.insert("deviceType".into(), kind.into());
            copy_optional(&mut obj, &mut out, &["deviceLabel"])?;
            name
        }
        (None, Some(name)) => {
            let kind = name_field(&mut obj, "assetType")?
                .ok_or_else(|| format!("asset {name:?} needs an assetType"))?;
            out.insert("assetName".into(), name.clone().into());
            out.insert("assetType".into(), kind.into());
            copy_optional(&mut obj, &mut out, &["assetLabel"])?;
            name
        }
    };
    copy_optional(&mut obj, &mut out, &["customerName", "groupName"])?;
    let attributes = match obj.remove("attributes") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a,
        Some(other) => {
            return Err(format!(
                "attributes must be an object, got {}",
                type_name(&other)
            ))
        }
    };
    out.insert("attributes".into(), Value::Object(attributes));
    let telemetry = telemetry(obj.remove("telemetry"), captured_ms)?;
    out.insert("telemetry".into(), Value::Array(telemetry));
    Ok(Entity {
        name,
        // Serializing a serde_json::Value cannot fail: its keys are strings.
        json: to_vec_js(&Value::Object(out)),
    })
}

/// A name-like field: a non-empty string, or a number (ThingsBoard reads it as text).
fn name_field(obj: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(format!("{key} must not be empty")),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(js_number_of(&n))),
        Some(other) => Err(format!("{key} must be a string, got {}", type_name(&other))),
    }
}

fn copy_optional(
    obj: &mut Map<String, Value>,
    out: &mut Map<String, Value>,
    keys: &[&str],
) -> Result<(), String> {
    for key in keys {
        if let Some(v) = name_field(obj, key)? {
            out.insert((*key).into(), v.into());
        }
    }
    Ok(())
}

/// `{values}` | `{ts, values}` | an array of either → `[{ts, values}]`; a missing ts is the capture
/// time, never the time of forwarding.
fn telemetry(value: Option<Value>, captured_ms: u64) -> Result<Vec<Value>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => vec![other],
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(obj) => {
                telemetry_entry(obj, captured_ms).map_err(|e| format!("telemetry[{i}]: {e}"))
            }
            other => Err(format!(
                "telemetry[{i}] must be an object, got {}",
                type_name(&other)
            )),
        })
        .collect()
}

fn telemetry_entry(mut obj: Map<String, Value>, captured_ms: u64) -> Result<Value, String> {
    let is_ts_form = obj.get("values").is_some_and(Value::is_object)
        && obj.keys().all(|k| k == "ts" || k == "values");
    let (ts, values) = if is_ts_form {
        let ts = match obj.remove("ts") {
            None | Some(Value::Null) => captured_ms,
            Some(v) => {
                timestamp(&v).ok_or_else(|| format!("ts must be epoch milliseconds, got {v}"))?
            }
        };
        (ts, obj.remove("values").unwrap_or_default())
    } else {
        (captured_ms, Value::Object(obj))
    };
    let mut entry = Map::new();
    entry.insert("ts".into(), ts.into());
    entry.insert("values".into(), values);
    Ok(Value::Object(entry))
}

pub(super) fn timestamp(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: u64 = 1_700_000_000_000;

    #[test]
    fn device_defaults_and_every_telemetry_form() {
        let plain = normalize(json!({"deviceName": "A", "telemetry": {"t": 1}}), T).unwrap();
        assert_eq!(
            plain[0].value(),
            json!({"deviceName": "A", "deviceType": "default", "attributes": {},
                   "telemetry": [{"ts": T, "values": {"t": 1}}]})
        );
        let with_ts = normalize(
            json!({"deviceName": "A", "telemetry": {"ts": 5, "values": {"t": 1}}}),
            T,
        )
        .unwrap();
        assert_eq!(
            with_ts[0].value()["telemetry"],
            json!([{"ts": 5, "values": {"t": 1}}])
        );
        let mixed = normalize(
            json!({"deviceName": "A", "telemetry": [{"ts": 5, "values": {"t": 1}}, {"h": 2}, {"values": {"x": 3}}]}),
            T,
        )
        .unwrap();
        assert_eq!(
            mixed[0].value()["telemetry"],
            json!([{"ts": 5, "values": {"t": 1}}, {"ts": T, "values": {"h": 2}}, {"ts": T, "values": {"x": 3}}])
        );
    }

    #[test]
    fn a_field_named_ts_beside_others_is_a_plain_value() {
        let e = normalize(
            json!({"deviceName": "A", "telemetry": {"ts": 5, "t": 1}}),
            T,
        )
        .unwrap();
        assert_eq!(
            e[0].value()["telemetry"],
            json!([{"ts": T, "values": {"ts": 5, "t": 1}}])
        );
    }

    #[test]
    fn assets_labels_and_names() {
        let e = normalize(
            json!({"assetName": "B", "assetType": "building", "assetLabel": "L", "customerName": "C", "groupName": "G", "attributes": {"a": 1}}),
            T,
        )
        .unwrap();
        assert_eq!(e[0].name, "B");
        assert_eq!(
            e[0].value(),
            json!({"assetName": "B", "assetType": "building", "assetLabel": "L", "customerName": "C",
                   "groupName": "G", "attributes": {"a": 1}, "telemetry": []})
        );
        assert!(normalize(json!({"assetName": "B"}), T)
            .unwrap_err()
            .contains("assetType"));
        assert!(normalize(
            json!({"deviceName": "A", "assetName": "B", "assetType": "x"}),
            T
        )
        .unwrap_err()
        .contains("both"));
        assert!(normalize(json!({"attributes": {}}), T)
            .unwrap_err()
            .contains("needs deviceName"));
        assert_eq!(
            normalize(json!({"deviceName": 42}), T).unwrap()[0].name,
            "42"
        );
    }

    #[test]
    fn shapes_null_arrays_and_invalid_results() {
        assert!(normalize(Value::Null, T).unwrap().is_empty());
        let two = normalize(json!([{"deviceName": "A"}, {"deviceName": "B"}]), T).unwrap();
        assert_eq!(
            two.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        for bad in [json!(1), json!("x"), json!(true), json!([1])] {
            assert!(normalize(bad, T).is_err());
        }
        assert!(normalize(json!({"deviceName": "A", "telemetry": [1]}), T).is_err());
        assert!(normalize(json!({"deviceName": "A", "attributes": 3}), T).is_err());
        assert!(normalize(
            json!({"deviceName": "A", "telemetry": {"ts": "soon", "values": {}}}),
            T
        )
        .is_err());
    }
}
