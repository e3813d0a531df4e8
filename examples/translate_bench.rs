//! Native cost of the JSON translator on the benchmark's bodies (bench variants C3 and C4),
//! without Envoy: the mapping of `bench/envoy/c3-translate-1k.yaml`, the bodies of
//! `bench/envoy/bodies/` (both written by `bench/bench.py configs`).
//!
//! ```text
//! cargo run --release --example translate_bench [ITERATIONS] [CASE]
//! valgrind --tool=callgrind target/release/examples/translate_bench 20 req-64k
//! ```
//! Prints µs per translation for each case (`req-1k`, `req-64k`: v1 → v2 requests;
//! `resp-1k`, `resp-64k`: v2 → v1 responses), or only for CASE. Timings on a shared machine
//! are noisy; under callgrind the instruction count per iteration is the repeatable figure.

use handoff::config::Config;
use handoff::translate::{ApiVersion, Message, Route};
use std::time::Instant;

const FIXTURE: &str = "bench/envoy/c3-translate-1k.yaml";
const BODIES: &str = "bench/envoy/bodies";

/// The plugin configuration (`...configuration.value`) inside an Envoy YAML.
fn plugin_config(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::Mapping(m) => {
            if let Some(s) = m
                .get("configuration")
                .and_then(|c| c.get("value"))
                .and_then(|s| s.as_str())
            {
                return Some(s.to_string());
            }
            m.values().find_map(plugin_config)
        }
        serde_yaml::Value::Sequence(s) => s.iter().find_map(plugin_config),
        _ => None,
    }
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (run from the repository root)"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: u32 = args.next().map_or(200, |n| n.parse().expect("ITERATIONS"));
    let only = args.next();

    let yaml: serde_yaml::Value = serde_yaml::from_slice(&read(FIXTURE)).expect("fixture YAML");
    let json = plugin_config(&yaml).expect("a plugin configuration in the fixture");
    let config = Config::parse(json.as_bytes()).expect("fixture configuration");
    let route: &Route = &config
        .translate
        .as_ref()
        .expect("a translate section")
        .routes[0];

    // A v1 client on a v2 backend: requests v1 -> v2, responses v2 -> v1.
    let run = |message: Message, body: &[u8]| {
        match message {
            Message::Request => route.translate_request(ApiVersion::V1, body),
            Message::Response => route.translate_response(ApiVersion::V1, body),
        }
        .map_or(0, |out| out.len())
    };
    for (name, message) in [
        ("req-1k", Message::Request),
        ("req-64k", Message::Request),
        ("resp-1k", Message::Response),
        ("resp-64k", Message::Response),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let body = read(&format!("{BODIES}/{name}.json"));
        let out_len = run(message, &body);
        assert!(out_len > 0, "{name}: translation failed");
        let start = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(run(message, std::hint::black_box(&body)));
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
        println!(
            "{name:>9}: {:>6} B -> {out_len:>6} B  {per:>9.1} µs/translation ({iterations} iterations)",
            body.len()
        );
    }
}
