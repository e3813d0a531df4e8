//! `handoff.schema.json`: generated from the configuration's Rust types, committed, current,
//! and every shipped example configuration (envoy/, istio/) satisfies it.

mod manifests;

use manifests::*;
use serde_json::{json, Value};

const REGENERATE: &str = "cargo run --bin handoffctl -- schema > handoff.schema.json";

fn generated() -> String {
    // The same text `handoffctl schema` prints (tests/handoffctl.rs checks the binary).
    let mut text =
        serde_json::to_string_pretty(&schemars::schema_for!(handoff::config::RawConfig)).unwrap();
    text.push('\n');
    text
}

fn committed() -> String {
    std::fs::read_to_string(repo().join("handoff.schema.json"))
        .unwrap_or_else(|e| panic!("handoff.schema.json: {e}; create it with `{REGENERATE}`"))
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&committed()).unwrap();
    jsonschema::validator_for(&schema).expect("handoff.schema.json is a valid JSON Schema")
}

#[test]
fn committed_schema_is_current() {
    assert!(
        committed() == generated(),
        "handoff.schema.json is stale (the configuration types changed); regenerate it with\n    {REGENERATE}"
    );
}

/// Every example configuration: each wasm filter's configuration under envoy/ and each
/// pluginConfig under istio/.
fn examples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for file in envoy_files() {
        for (i, text) in envoy_plugin_configs(&file).into_iter().enumerate() {
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: filter {i}: {e}", file.display()));
            out.push((format!("{} filter {i}", file.display()), v));
        }
    }
    for (file, n, doc) in istio_documents() {
        if let Some(config) = plugin_config(&doc) {
            out.push((format!("{} document {n}", file.display()), config));
        }
    }
    out
}

#[test]
fn every_example_config_validates_against_the_schema() {
    let validator = validator();
    let examples = examples();
    assert!(examples.len() >= 8, "{} examples", examples.len());
    for (name, config) in examples {
        let errors: Vec<String> = validator
            .iter_errors(&config)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{name}: {}", errors.join("; "));
    }
}

#[test]
fn the_schema_rejects_unknown_keys_and_wrong_types() {
    let validator = validator();
    let good = json!({"canary": {"salt": "s", "percent": 5, "user_id": [{"header": "x-user-id"}]}});
    assert!(validator.is_valid(&good));
    for bad in [
        json!({"canery": {}}),
        json!({"canary": {"salt": "s", "percent": 5, "persent": 1}}),
        json!({"canary": {"salt": "s", "percent": "five"}}),
        json!({"canary": {"salt": "s", "percent": 5, "user_id": [{"heder": "x"}]}}),
    ] {
        assert!(!validator.is_valid(&bad), "accepted {bad}");
    }
}
