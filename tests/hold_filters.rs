//! Every copy of the hold filters (the standalone configs under envoy/, the EnvoyFilters under
//! istio/, the benchmark configs under bench/envoy/, which bench/bench.py writes) is the shipped
//! form, behind the matcher that skips it unless the stream carries handoff's mark: the response
//! hold is Lua with one source, `envoy/lua/handoff-hold-response.lua`, byte for byte; the request
//! hold is Envoy's buffer filter, and right after it the header mutation that removes the mark.
#![cfg(not(target_arch = "wasm32"))]

use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The hold filters: name, the mark that lets a stream into it, and where the mark is read.
const HOLDS: [(&str, &str, &str); 3] = [
    (
        "handoff-hold-request",
        "x-handoff-hold",
        "HttpRequestHeaderMatchInput",
    ),
    (
        "handoff-hold-unmark",
        "x-handoff-hold",
        "HttpRequestHeaderMatchInput",
    ),
    (
        "handoff-hold-response",
        "x-handoff-translated",
        "HttpResponseHeaderMatchInput",
    ),
];

/// The filter a hold wraps, as every copy must configure it.
fn expected(name: &str) -> Value {
    match name {
        "handoff-hold-request" => serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 1048576
        }),
        "handoff-hold-unmark" => serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": "x-handoff-hold"}]}
        }),
        _ => serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source(name)}
        }),
    }
}

fn source(name: &str) -> String {
    let path = root().join("envoy/lua").join(format!("{name}.lua"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The name of a filter in a filter list, or of the filter an EnvoyFilter patch inserts.
fn filter_name(item: &Value) -> Option<&str> {
    item.get("name")
        .or_else(|| item.pointer("/patch/value/name"))
        .and_then(Value::as_str)
}

/// Every list that holds the request hold has the unmark right after it (the app must never see
/// the mark, and the unmark must not run before the hold has seen it).
fn unmark_follows_hold(v: &Value, shown: &str, wrong: &mut Vec<String>) {
    match v {
        Value::Array(items) => {
            let names: Vec<Option<&str>> = items.iter().map(filter_name).collect();
            for (i, n) in names.iter().enumerate() {
                if *n == Some("handoff-hold-request")
                    && names.get(i + 1).copied().flatten() != Some("handoff-hold-unmark")
                {
                    wrong.push(format!(
                        "{shown}: handoff-hold-request is not followed by handoff-hold-unmark"
                    ));
                }
            }
            items
                .iter()
                .for_each(|c| unmark_follows_hold(c, shown, wrong));
        }
        Value::Object(map) => map
            .values()
            .for_each(|c| unmark_follows_hold(c, shown, wrong)),
        _ => {}
    }
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every YAML document of a file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

/// A hold filter found in a config: its name, the filter it wraps, and the header its matcher
/// checks.
struct Found {
    name: String,
    wrapped: Option<Value>,
    mark: Option<String>,
    input: Option<String>,
}

/// Every object named `handoff-hold-*` that wraps a filter in an ExtensionWithMatcher.
fn find_holds(v: &Value, out: &mut Vec<Found>) {
    match v {
        Value::Object(map) => {
            let name = map.get("name").and_then(Value::as_str).unwrap_or("");
            let typed = map.get("typed_config");
            let is_wrapper = typed
                .and_then(|t| t.get("@type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("ExtensionWithMatcher"));
            if name.starts_with("handoff-hold") && is_wrapper {
                let t = typed.unwrap();
                let input = t.pointer(
                    "/xds_matcher/matcher_list/matchers/0/predicate/not_matcher/single_predicate/input/typed_config",
                );
                out.push(Found {
                    name: name.to_string(),
                    wrapped: t.pointer("/extension_config/typed_config").cloned(),
                    mark: input
                        .and_then(|i| i.get("header_name"))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    input: input
                        .and_then(|i| i.get("@type"))
                        .and_then(Value::as_str)
                        .and_then(|t| t.rsplit('.').next())
                        .map(str::to_string),
                });
                return;
            }
            map.values().for_each(|c| find_holds(c, out));
        }
        Value::Array(items) => items.iter().for_each(|c| find_holds(c, out)),
        _ => {}
    }
}

#[test]
fn every_hold_filter_is_the_one_source_behind_its_mark() {
    let mut files = Vec::new();
    for dir in ["envoy", "istio", "bench/envoy"] {
        files.extend(yaml_files(dir));
    }
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(root()).unwrap().display().to_string();
        let mut found = Vec::new();
        for doc in documents(file) {
            find_holds(&doc, &mut found);
            unmark_follows_hold(&doc, &shown, &mut wrong);
        }
        // A file that names a hold filter must have it in the shipped form.
        for (name, _, _) in HOLDS {
            if text.contains(name) && !found.iter().any(|f| f.name == name) {
                wrong.push(format!("{shown}: {name} is not a filter behind a matcher"));
            }
        }
        for f in found {
            let Some((_, mark, input)) = HOLDS.iter().find(|(n, _, _)| *n == f.name) else {
                wrong.push(format!("{shown}: unknown hold filter {}", f.name));
                continue;
            };
            if f.wrapped.as_ref() != Some(&expected(&f.name)) {
                wrong.push(format!(
                    "{shown}: {} is not the shipped filter {}",
                    f.name,
                    expected(&f.name)
                ));
            }
            if f.mark.as_deref() != Some(*mark) || f.input.as_deref() != Some(*input) {
                wrong.push(format!(
                    "{shown}: {} is not skipped unless {input} {mark} is present",
                    f.name
                ));
            }
            checked += 1;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // envoy/ alone has 20; a parser that found none would prove nothing.
    assert!(checked >= 30, "only {checked} hold filters found");
}

/// bench/bench.py inlines no Lua of its own: it reads the Lua hold from envoy/lua/.
#[test]
fn the_benchmark_reads_the_hold_filters_from_their_source() {
    let mut python = std::fs::read_to_string(root().join("bench/bench.py")).unwrap();
    for file in std::fs::read_dir(root().join("bench/handoff_bench")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|x| x == "py") {
            python.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let name = "handoff-hold-response";
    let first_line = source(name).lines().next().unwrap().to_string();
    assert!(
        !python.contains(&first_line),
        "bench/ has its own copy of {name} ({first_line})"
    );
    assert!(python.contains("envoy/lua") || python.contains("\"lua\""));
}
