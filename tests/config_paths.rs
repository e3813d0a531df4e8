//! The configuration parser names the same field path and gives the same message as
//! `serde_path_to_error` over serde_json's text deserializer, which it replaced in the wasm
//! (the wrapper doubled every config struct's code). Every example configuration
//! under envoy/ and istio/ is broken in every place it can be: each object gets an unknown key
//! and loses each of its keys, each value is replaced by values of every JSON type.

mod manifests;

use handoff::config::{Config, ConfigError, RawConfig};
use manifests::*;
use serde_json::{json, Value};

/// The parser as it was: text straight into the derived types through serde_path_to_error.
fn reference(text: &str) -> Result<RawConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde_json's position suffix: the path says where.
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        ConfigError::new(path, message)
    })?;
    Ok(raw)
}

fn examples() -> Vec<Value> {
    let mut out: Vec<Value> = envoy_files()
        .iter()
        .flat_map(|f| envoy_plugin_configs(f))
        .map(|text| serde_json::from_str(&text).unwrap())
        .collect();
    out.extend(
        istio_documents()
            .iter()
            .filter_map(|(_, _, d)| plugin_config(d)),
    );
    out
}

/// Every JSON pointer in `v`, with whether it names an object.
fn pointers(v: &Value, at: String, out: &mut Vec<(String, bool)>) {
    out.push((at.clone(), v.is_object()));
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, c)| pointers(c, format!("{at}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, c)| pointers(c, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn mutants(config: &Value) -> Vec<Value> {
    let replacements = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1.5),
        json!(4_294_967_296u64),
        json!("v3"),
        json!([]),
        json!([1]),
        json!({}),
        json!({"header": 1}),
        json!({"a": 1, "b": 2}),
    ];
    let mut ptrs = Vec::new();
    pointers(config, String::new(), &mut ptrs);
    let mut out = Vec::new();
    for (ptr, is_object) in ptrs {
        for r in &replacements {
            let mut m = config.clone();
            *m.pointer_mut(&ptr).unwrap() = r.clone();
            out.push(m);
        }
        if is_object {
            let keys: Vec<String> = config
                .pointer(&ptr)
                .and_then(Value::as_object)
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let mut m = config.clone();
            m.pointer_mut(&ptr).unwrap()["unknwn"] = json!(1);
            out.push(m);
            for k in keys {
                let mut m = config.clone();
                m.pointer_mut(&ptr)
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .remove(&k);
                out.push(m);
            }
        }
    }
    out
}

#[test]
fn every_broken_example_is_reported_as_before() {
    let examples = examples();
    assert!(examples.len() >= 8, "{} examples", examples.len());
    let (mut checked, mut rejected) = (0, 0);
    for config in &examples {
        for m in mutants(config) {
            let text = m.to_string();
            // Parsed alike (defaults included) or rejected alike.
            let new = RawConfig::parse(text.as_bytes()).map(|raw| format!("{raw:?}"));
            let old = reference(&text).map(|raw| format!("{raw:?}"));
            checked += 1;
            rejected += new.is_err() as usize;
            match (&new, &old) {
                // Intended: serde_json also read a struct from an array of its fields in
                // declaration order, which no documented form uses.
                (Err(n), _)
                    if n.message
                        .contains("invalid type: sequence, expected struct") => {}
                // Better wording for an enum (`{"header": ..}`) of the wrong type, same path.
                (Err(n), Err(o)) if o.message == "expected value" => {
                    assert_eq!(n.path, o.path, "{text}");
                    let said = ["expected string or map", "expected map with a single key"];
                    assert!(said.iter().any(|s| n.message.contains(s)), "{text}: {n}");
                }
                _ => assert_eq!(new, old, "{text}"),
            }
        }
    }
    // The mutations must mostly break things, or the comparison proves little.
    assert!(rejected * 2 > checked, "{rejected} of {checked} rejected");
}

#[test]
fn syntax_errors_say_where() {
    let e = Config::parse(br#"{"canary": {"salt": "s",}}"#).unwrap_err();
    assert_eq!(e.path, ".");
    assert!(e.message.contains("line 1 column"), "{e}");
}
