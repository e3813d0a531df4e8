//! Finds the plugin configurations in a file: a plain JSON configuration, Istio `WasmPlugin` /
//! `TrafficExtension` resources, or Envoy configs (bootstrap, EnvoyFilter patches) with wasm
//! HTTP filters.

use serde_json::Value;

use crate::app::Failure;

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// One plugin configuration: where it was found and the JSON text the filter would receive.
pub struct Found {
    pub label: String,
    pub json: String,
}

pub fn plugin_configs(path: &str) -> Result<Vec<Found>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::invalid(format!("cannot read {path}: {e}")))?;
    let trimmed = text.trim_start();
    // A JSON object that is not an Envoy config is a plugin configuration: hand the filter's
    // parser the exact bytes, so errors (with line and column) match what the filter logs.
    if trimmed.starts_with('{') || trimmed.is_empty() {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if !looks_like_envoy_or_k8s(&v) => {
                return Ok(vec![Found {
                    label: path.to_string(),
                    json: text,
                }])
            }
            Ok(_) => {}
            // Invalid JSON: the parser words the error.
            Err(_) if path.ends_with(".json") || trimmed.is_empty() => {
                return Ok(vec![Found {
                    label: path.to_string(),
                    json: text,
                }])
            }
            Err(_) => {}
        }
    }
    let mut found = Vec::new();
    let mut values = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| Failure::invalid(format!("{path}: not YAML or JSON: {e}")))?;
        if value.is_null() {
            continue;
        }
        let value: Value = serde_json::to_value(&value).map_err(|e| {
            Failure::invalid(format!(
                "{path}: document {}: not JSON-like YAML: {e}",
                i + 1
            ))
        })?;
        values.push((i + 1, value));
    }
    let documents = values.len();
    for (n, value) in values {
        // Name the document only where a file has several.
        let place = if documents > 1 {
            format!("{path}: document {n}")
        } else {
            path.to_string()
        };
        from_document(&place, &value, &mut found)?;
    }
    if found.is_empty() {
        return Err(Failure::invalid(format!(
            "{path}: no handoff configuration found in {documents} YAML document(s) \
             (expected a JSON configuration, a WasmPlugin, a TrafficExtension or an Envoy \
             config with a wasm filter)"
        )));
    }
    Ok(found)
}

fn looks_like_envoy_or_k8s(v: &Value) -> bool {
    ["static_resources", "admin", "apiVersion", "kind", "node"]
        .iter()
        .any(|k| v.get(k).is_some())
}

fn from_document(place: &str, doc: &Value, out: &mut Vec<Found>) -> Result<(), Failure> {
    let kind = doc.get("kind").and_then(Value::as_str);
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let plugin = match kind {
        Some("WasmPlugin") => Some(doc.pointer("/spec/pluginConfig")),
        Some("TrafficExtension") => {
            // A Lua TrafficExtension is not ours.
            if doc.pointer("/spec/wasm").is_none() {
                return Ok(());
            }
            Some(doc.pointer("/spec/wasm/pluginConfig"))
        }
        _ => None,
    };
    if let Some(config) = plugin {
        // Istio hands the filter `pluginConfig` as JSON; no pluginConfig means an empty one.
        let json = match config {
            Some(c) => serde_json::to_string(c).unwrap_or_default(),
            None => String::new(),
        };
        out.push(Found {
            label: format!("{place}: {} {name}", kind.unwrap_or_default()),
            json,
        });
        return Ok(());
    }
    if kind.is_none() && doc.is_object() && !looks_like_envoy_or_k8s(doc) {
        // A plugin configuration written as YAML.
        out.push(Found {
            label: place.to_string(),
            json: doc.to_string(),
        });
        return Ok(());
    }
    let mut filters = Vec::new();
    find_wasm_filters(doc, &mut filters);
    for (i, (filter_name, config)) in filters.into_iter().enumerate() {
        let label = match filter_name {
            Some(f) => format!("{place}: wasm filter `{f}`"),
            None => format!("{place}: wasm filter #{}", i + 1),
        };
        let json = match config {
            None => String::new(),
            Some(c) if c.get("@type").and_then(Value::as_str) == Some(STRING_VALUE_TYPE) => c
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            Some(c) => {
                let got = c.get("@type").and_then(Value::as_str).unwrap_or("no @type");
                let want = STRING_VALUE_TYPE;
                return Err(Failure::invalid(format!(
                    "{label}: configuration must be a {want} holding JSON text, got {got}"
                )));
            }
        };
        out.push(Found { label, json });
    }
    Ok(())
}

/// Every wasm HTTP filter config in an Envoy config tree: its filter name (the enclosing
/// `name`, else the plugin's `config.name`) and its `configuration`.
fn find_wasm_filters<'a>(v: &'a Value, out: &mut Vec<(Option<String>, Option<&'a Value>)>) {
    match v {
        Value::Object(map) => {
            if let Some(typed) = map.get("typed_config").or_else(|| map.get("typedConfig")) {
                if typed.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                    let name = map
                        .get("name")
                        .and_then(Value::as_str)
                        .or_else(|| typed.pointer("/config/name").and_then(Value::as_str))
                        .map(str::to_string);
                    out.push((name, typed.pointer("/config/configuration")));
                    return;
                }
            }
            for child in map.values() {
                find_wasm_filters(child, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                find_wasm_filters(child, out);
            }
        }
        _ => {}
    }
}
