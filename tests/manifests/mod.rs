//! Reading the shipped manifests and Envoy configs for the host tests (no Envoy, no network).
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of a file, as JSON values (empty documents skipped).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_yaml_docs(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn parse_yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: serde_yaml_ng::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(serde_json::to_value(&v).map_err(|e| e.to_string())?);
        }
    }
    Ok(out)
}

/// Every `*.yaml` under `dir`, recursively, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every document of every manifest under `istio/`: (file, document index, value).
pub fn istio_documents() -> Vec<(PathBuf, usize, Value)> {
    let mut out = Vec::new();
    for file in yaml_files(&repo().join("istio")) {
        for (i, doc) in yaml_docs(&file).into_iter().enumerate() {
            out.push((file.clone(), i + 1, doc));
        }
    }
    assert!(!out.is_empty(), "no manifests under istio/");
    out
}

/// The plugin configuration of a WasmPlugin or a wasm TrafficExtension (None for other kinds).
/// A missing pluginConfig is an empty configuration.
pub fn plugin_config(doc: &Value) -> Option<Value> {
    let pointer = match doc["kind"].as_str()? {
        "WasmPlugin" => "/spec/pluginConfig",
        "TrafficExtension" => "/spec/wasm/pluginConfig",
        _ => return None,
    };
    Some(
        doc.pointer(pointer)
            .cloned()
            .unwrap_or(Value::Object(Default::default())),
    )
}

/// The JSON text of each handoff wasm filter's `configuration` in an Envoy config.
pub fn envoy_plugin_configs(path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for doc in yaml_docs(path) {
        walk(&doc, &mut out);
    }
    out
}

fn walk(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if m.get("@type").and_then(Value::as_str)
                == Some("type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm")
            {
                let value = v
                    .pointer("/config/configuration/value")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                out.push(value.to_string());
                return;
            }
            m.values().for_each(|c| walk(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
        _ => {}
    }
}

/// Every Envoy config shipped under `envoy/`.
pub fn envoy_files() -> Vec<PathBuf> {
    yaml_files(&repo().join("envoy"))
}
