//! The JSON translator with arbitrary bodies, in both directions and both messages, using the
//! payments mapping of the contract: no panic, every success is valid JSON, and a body the
//! parser refuses (deep nesting, invalid UTF-8) is a `TranslateError`, never a crash.
#![no_main]

use handoff::config::translate::RawTranslate;
use handoff::translate::{ApiVersion, RequestHead, Translate};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CONTRACT: &str = r#"{"routes": [{
    "name": "payments", "v1_prefix": "/api/v1/payments", "v2_prefix": "/api/v2/payments",
    "backend": "v2",
    "request": [
      {"v1": "/amount", "v2": "/amount/value"},
      {"v1": "/currency", "v2": "/amount/currency"},
      {"v1": "/customer_id", "v2": "/customer/id", "required": true},
      {"v2": "/customer/email", "default": null}
    ],
    "response": [
      {"v1": "/transaction_id", "v2": "/id"},
      {"v1": "/status", "v2": "/status"},
      {"v1": "/payments/*/transaction_id", "v2": "/data/*/id"}
    ],
    "unmapped": "drop", "translate_errors": false, "max_body_bytes": 1048576}]}"#;

fn translate() -> &'static Translate {
    static T: OnceLock<Translate> = OnceLock::new();
    T.get_or_init(|| {
        let raw: RawTranslate = serde_json::from_str(CONTRACT).expect("contract parses");
        raw.validate().expect("contract is valid")
    })
}

fuzz_target!(|input: (&[u8], &str, bool)| {
    let (body, path, keep_path) = input;
    let t = translate();
    let route = &t.routes[0];
    for v in [ApiVersion::V1, ApiVersion::V2] {
        if let Ok(out) = route.translate_request(v, body) {
            serde_json::from_slice::<serde_json::Value>(&out).expect("request output is JSON");
        }
        if let Ok(out) = route.translate_response(v, body) {
            serde_json::from_slice::<serde_json::Value>(&out).expect("response output is JSON");
        }
    }
    // Path planning with arbitrary paths under the prefixes.
    let path = if keep_path {
        path.to_string()
    } else {
        format!("/api/v1/payments{path}")
    };
    let head = RequestHead {
        path: &path,
        content_type: Some("application/json"),
        content_encoding: None,
        has_body: true,
    };
    if let Ok(Some(plan)) = t.plan(&head, None) {
        assert!(plan.path.starts_with("/api/v2/payments"), "{}", plan.path);
    }
});
