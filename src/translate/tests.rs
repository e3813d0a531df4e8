use super::edit::place;
use super::*;
use crate::config::translate::RawTranslate;
use crate::config::{Config, ConfigError};
use proptest::prelude::*;
use serde_json::json;

/// The payments contract of docs/configure/translate.md.
fn payments(backend: Value, extra: impl FnOnce(&mut Value)) -> Value {
    let mut route = json!({
        "name": "payments",
        "v1_prefix": "/api/v1/payments",
        "v2_prefix": "/api/v2/payments",
        "backend": backend,
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
        "unmapped": "drop",
        "translate_errors": false,
        "max_body_bytes": 1048576
    });
    extra(&mut route);
    json!({"routes": [route]})
}

fn translate(section: Value) -> Translate {
    let raw: RawTranslate = serde_json::from_value(section).expect("shape");
    raw.validate().expect("valid")
}

fn reject(section: Value) -> ConfigError {
    let cfg = json!({"translate": section}).to_string();
    Config::parse(cfg.as_bytes()).expect_err("rejected")
}

fn route_with(entries: Value, unmapped: &str) -> Route {
    let t = translate(json!({"routes": [{
        "name": "r", "v1_prefix": "/v1", "v2_prefix": "/v2", "backend": "v2",
        "request": entries, "unmapped": unmapped
    }]}));
    t.routes[0].clone()
}

fn head<'a>(path: &'a str, content_type: Option<&'a str>, has_body: bool) -> RequestHead<'a> {
    RequestHead {
        path,
        content_type,
        content_encoding: None,
        has_body,
    }
}

fn req(route: &Route, from: ApiVersion, body: Value) -> Result<Value, TranslateError> {
    route.translate_request_value(from, &body)
}

// --- configuration ------------------------------------------------------------------------

#[test]
fn the_contract_parses() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    assert_eq!(r.backend, Backend::Fixed(ApiVersion::V2));
    assert_eq!(r.request.len(), 4);
    assert_eq!(
        r.request[3].default,
        Some(Value::Null),
        "null is a real default"
    );
    assert_eq!(r.request[0].default, None);
    assert!(r.request[2].required);
    assert_eq!(r.unmapped, Unmapped::Drop);
    assert_eq!(r.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
}

#[test]
fn defaults_of_optional_keys() {
    let t = translate(
        json!({"routes": [{"name": "a", "v1_prefix": "/a1", "v2_prefix": "/a2",
        "backend": {"stable": "v1", "canary": "v2"}}]}),
    );
    let r = &t.routes[0];
    assert!(r.request.is_empty() && r.response.is_empty());
    assert_eq!(r.unmapped, Unmapped::Drop);
    assert!(!r.translate_errors);
    assert_eq!(r.max_body_bytes, 1_048_576);
    assert_eq!(
        r.backend,
        Backend::Cohort {
            stable: ApiVersion::V1,
            canary: ApiVersion::V2
        }
    );
}

#[test]
fn cohort_backend_needs_the_canary_section() {
    let e = reject(payments(json!({"stable": "v1", "canary": "v2"}), |_| {}));
    assert_eq!(e.path, "translate.routes[0].backend", "{e}");
    assert!(e.message.contains("canary"), "{e}");
    let with_canary = json!({
        "canary": {"salt": "s", "percent": 10, "user_id": [{"header": "x-user-id"}]},
        "translate": payments(json!({"stable": "v1", "canary": "v2"}), |_| {})
    });
    assert!(Config::parse(with_canary.to_string().as_bytes()).is_ok());
}

#[test]
fn rejects_unknown_keys_and_bad_shapes() {
    let e = reject(payments(json!("v2"), |r| r["unmaped"] = json!("keep")));
    assert_eq!(e.path, "translate.routes[0].unmaped", "{e}");
    let e = reject(payments(json!("v2"), |r| {
        r["request"][0]["v3"] = json!("/x")
    }));
    assert_eq!(e.path, "translate.routes[0].request[0].v3", "{e}");
    let e = reject(payments(json!("v3"), |_| {}));
    assert!(e.path.starts_with("translate.routes[0].backend"), "{e}");
    let e = reject(payments(
        json!({"stable": "v1", "canary": "v2", "x": 1}),
        |_| {},
    ));
    assert!(e.path.starts_with("translate.routes[0].backend"), "{e}");
    let e = reject(payments(json!("v2"), |r| r["unmapped"] = json!("copy")));
    assert_eq!(e.path, "translate.routes[0].unmapped", "{e}");
    let e = reject(json!({}));
    assert!(e.message.contains("routes"), "{e}");
}

#[test]
fn rejects_an_empty_route_list() {
    let e = reject(json!({"routes": []}));
    assert_eq!(e.path, "translate.routes", "{e}");
}

#[test]
fn rejects_bad_route_names() {
    for bad in ["", "pay.ments", "a b", &"x".repeat(65)] {
        let e = reject(payments(json!("v2"), |r| r["name"] = json!(bad)));
        assert_eq!(e.path, "translate.routes[0].name", "{bad:?}: {e}");
    }
}

#[test]
fn rejects_duplicate_route_names_and_prefixes() {
    let mut two = payments(json!("v2"), |_| {});
    let mut second = two["routes"][0].clone();
    second["v1_prefix"] = json!("/other/v1");
    second["v2_prefix"] = json!("/other/v2");
    two["routes"].as_array_mut().unwrap().push(second.clone());
    let e = reject(two.clone());
    assert_eq!(e.path, "translate.routes[1].name", "{e}");
    second["name"] = json!("other");
    second["v1_prefix"] = json!("/api/v2/payments");
    two["routes"][1] = second.clone();
    let e = reject(two.clone());
    assert_eq!(e.path, "translate.routes[1].v1_prefix", "{e}");
    // A prefix inside another route's would be shadowed by it.
    second["v1_prefix"] = json!("/other/v1");
    second["v2_prefix"] = json!("/api/v2/payments/refunds");
    two["routes"][1] = second;
    let e = reject(two);
    assert_eq!(e.path, "translate.routes[1].v2_prefix", "{e}");
    assert!(e.message.contains("payments"), "{e}");
}

#[test]
fn rejects_bad_prefixes() {
    for bad in ["api/v1", "/", "/api/v1/", "", "/a?b", "/a b"] {
        let e = reject(payments(json!("v2"), |r| r["v1_prefix"] = json!(bad)));
        assert_eq!(e.path, "translate.routes[0].v1_prefix", "{bad:?}: {e}");
    }
    let e = reject(payments(json!("v2"), |r| {
        r["v2_prefix"] = json!("/api/v1/payments")
    }));
    assert_eq!(e.path, "translate.routes[0].v2_prefix", "{e}");
    // One inside the other: /api/v1/payments/v2/x would be both versions.
    let e = reject(payments(json!("v2"), |r| {
        r["v2_prefix"] = json!("/api/v1/payments/v2")
    }));
    assert_eq!(e.path, "translate.routes[0].v2_prefix", "{e}");
    // A common start is fine when no path matches both.
    let ok = json!({"translate": payments(json!("v2"), |r| {
        r["v2_prefix"] = json!("/api/v1/paymentsv2")
    })});
    assert!(Config::parse(ok.to_string().as_bytes()).is_ok());
}

#[test]
fn rejects_zero_max_body_bytes() {
    let e = reject(payments(json!("v2"), |r| r["max_body_bytes"] = json!(0)));
    assert_eq!(e.path, "translate.routes[0].max_body_bytes", "{e}");
}

#[test]
fn rejects_bad_pointers() {
    for bad in ["amount", "/a~2b", "/a/~", "/a/99999"] {
        let e = reject(payments(json!("v2"), |r| {
            r["request"][0]["v2"] = json!(bad)
        }));
        assert_eq!(e.path, "translate.routes[0].request[0].v2", "{bad:?}: {e}");
    }
    let e = reject(payments(json!("v2"), |r| {
        r["response"][1]["v1"] = json!("status")
    }));
    assert_eq!(e.path, "translate.routes[0].response[1].v1", "{e}");
}

#[test]
fn rejects_an_entry_without_pointers() {
    let e = reject(payments(json!("v2"), |r| {
        r["request"][0] = json!({"default": 1})
    }));
    assert_eq!(e.path, "translate.routes[0].request[0]", "{e}");
}

#[test]
fn rejects_unequal_wildcards() {
    let e = reject(payments(json!("v2"), |r| {
        r["response"][2] = json!({"v1": "/payments/*/id", "v2": "/data/0/id"})
    }));
    assert_eq!(e.path, "translate.routes[0].response[2].v2", "{e}");
    assert!(e.message.contains('*'), "{e}");
}

#[test]
fn rejects_one_sided_entries_without_default_with_required_or_wildcards() {
    let e = reject(payments(json!("v2"), |r| {
        r["request"][3] = json!({"v2": "/x"})
    }));
    assert_eq!(e.path, "translate.routes[0].request[3].default", "{e}");
    let e = reject(payments(json!("v2"), |r| {
        r["request"][3] = json!({"v1": "/x", "default": 1, "required": true})
    }));
    assert_eq!(e.path, "translate.routes[0].request[3].required", "{e}");
    let e = reject(payments(json!("v2"), |r| {
        r["request"][3] = json!({"v2": "/x/*/y", "default": 1})
    }));
    assert_eq!(e.path, "translate.routes[0].request[3].v2", "{e}");
}

#[test]
fn rejects_two_entries_writing_the_same_target() {
    // Same v2 target (written v1 -> v2).
    let e = reject(payments(json!("v2"), |r| {
        r["request"][1] = json!({"v1": "/cur", "v2": "/amount/value"})
    }));
    assert_eq!(e.path, "translate.routes[0].request[1].v2", "{e}");
    // A target inside another one.
    let e = reject(payments(json!("v2"), |r| {
        r["request"][1] = json!({"v1": "/cur", "v2": "/amount/value/x"})
    }));
    assert_eq!(e.path, "translate.routes[0].request[1].v2", "{e}");
    // Same v1 target (written v2 -> v1).
    let e = reject(payments(json!("v2"), |r| {
        r["response"][1] = json!({"v1": "/transaction_id", "v2": "/other"})
    }));
    assert_eq!(e.path, "translate.routes[0].response[1].v1", "{e}");
    // `*` overlaps an index.
    let e = reject(payments(json!("v2"), |r| {
        r["response"][1] = json!({"v1": "/payments/0/transaction_id", "v2": "/first"})
    }));
    assert_eq!(e.path, "translate.routes[0].response[2].v1", "{e}");
}

#[test]
fn pointer_syntax() {
    let p = Pointer::parse("/a~1b/~0c/0/*/10/01/").unwrap();
    assert_eq!(
        p.segments,
        vec![
            Segment::Key("a/b".into()),
            Segment::Key("~c".into()),
            Segment::Index(0),
            Segment::Each,
            Segment::Index(10),
            Segment::Key("01".into()),
            Segment::Key("".into()),
        ]
    );
    assert_eq!(p.wildcards(), 1);
    assert!(Pointer::parse("").is_err());
}

// --- planning -----------------------------------------------------------------------------

#[test]
fn plan_rewrites_the_prefix_and_keeps_rest_and_query() {
    let t = translate(payments(json!("v2"), |_| {}));
    let p = t
        .plan(
            &head(
                "/api/v1/payments/42/refund?x=1",
                Some("application/json"),
                true,
            ),
            None,
        )
        .unwrap()
        .unwrap();
    assert_eq!(p.path, "/api/v2/payments/42/refund?x=1");
    assert_eq!((p.client, p.backend), (ApiVersion::V1, ApiVersion::V2));
    assert!(p.translate_body);
    assert_eq!(p.header_value(), "v1-v2");
    let p = t
        .plan(&head("/api/v1/payments?a=b", None, false), None)
        .unwrap()
        .unwrap();
    assert_eq!(p.path, "/api/v2/payments?a=b");
    assert!(!p.translate_body, "no body, no content type needed");
}

#[test]
fn plan_passes_through_same_version_and_other_paths() {
    let t = translate(payments(json!("v2"), |_| {}));
    assert_eq!(
        t.plan(&head("/api/v2/payments", Some("text/plain"), true), None),
        Ok(None)
    );
    assert_eq!(
        t.plan(&head("/api/v1/paymentsX", None, true), None),
        Ok(None)
    );
    assert_eq!(t.plan(&head("/other", None, true), None), Ok(None));
}

#[test]
fn plan_mirror_case() {
    let t = translate(payments(json!("v1"), |_| {}));
    let p = t
        .plan(
            &head(
                "/api/v2/payments",
                Some("application/vnd.pay+json; charset=utf-8"),
                true,
            ),
            None,
        )
        .unwrap()
        .unwrap();
    assert_eq!(p.path, "/api/v1/payments");
    assert_eq!(p.header_value(), "v2-v1");
}

#[test]
fn plan_follows_the_cohort() {
    let t = translate(payments(json!({"stable": "v1", "canary": "v2"}), |_| {}));
    let path = "/api/v1/payments";
    assert_eq!(
        t.plan(&head(path, None, false), Some(Variant::Stable)),
        Ok(None)
    );
    assert_eq!(t.plan(&head(path, None, false), None), Ok(None));
    let p = t
        .plan(&head(path, None, false), Some(Variant::Canary))
        .unwrap()
        .unwrap();
    assert_eq!(p.backend, ApiVersion::V2);
}

#[test]
fn plan_rejects_non_json_bodies_with_415() {
    let t = translate(payments(json!("v2"), |_| {}));
    let e = t
        .plan(&head("/api/v1/payments", Some("text/plain"), true), None)
        .unwrap_err();
    assert_eq!(e.reason(), "unsupported_media_type");
    assert_eq!(e.reply(Message::Request).status, 415);
    let e = t
        .plan(&head("/api/v1/payments", None, true), None)
        .unwrap_err();
    assert!(e.detail().contains("(none)"), "{}", e.detail());
}

#[test]
fn plan_rejects_compressed_bodies_with_415() {
    let t = translate(payments(json!("v2"), |_| {}));
    let mut h = head("/api/v1/payments", Some("application/json"), true);
    for ok in ["identity", "Identity", ""] {
        h.content_encoding = Some(ok);
        assert!(t.plan(&h, None).unwrap().is_some(), "{ok}");
    }
    h.content_encoding = Some("gzip");
    let e = t.plan(&h, None).unwrap_err();
    assert_eq!(e.reason(), "unsupported_encoding");
    assert_eq!(e.reply(Message::Request).status, 415);
    assert_eq!(e.reply(Message::Response).status, 502);
    assert!(e.detail().contains("gzip"));
    // Without a body the encoding does not matter.
    h.has_body = false;
    assert!(t.plan(&h, None).unwrap().is_some());
    assert!(check_encoding(None).is_ok());
    assert!(check_encoding(Some("br")).is_err());
}

#[test]
fn route_for_path_labels_refusals() {
    let t = translate(payments(json!("v2"), |_| {}));
    assert_eq!(
        t.route_for_path("/api/v2/payments/1")
            .map(|r| r.name.as_str()),
        Some("payments")
    );
    assert!(t.route_for_path("/api/v2/paymentsX").is_none());
}

#[test]
fn json_media_types() {
    assert!(is_json("application/json"));
    assert!(is_json("Application/JSON; charset=utf-8"));
    assert!(is_json("application/problem+json"));
    assert!(!is_json("text/json"));
    assert!(!is_json("application/jsonx"));
    assert!(!is_json("application/x-www-form-urlencoded"));
}

#[test]
fn response_translation_follows_status_and_type() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    assert!(r.translates_response(201, Some("application/json")));
    assert!(!r.translates_response(404, Some("application/json")));
    assert!(!r.translates_response(200, Some("text/html")));
    assert!(!r.translates_response(200, None));
    let t = translate(payments(json!("v2"), |r| {
        r["translate_errors"] = json!(true)
    }));
    assert!(t.routes[0].translates_response(404, Some("application/json")));
}

// --- translation --------------------------------------------------------------------------

#[test]
fn payments_request_v1_to_v2_and_back() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    let v1 = json!({"amount": 12.5, "currency": "EUR", "customer_id": "c-1", "note": "x"});
    let v2 = r.translate_request_value(ApiVersion::V1, &v1).unwrap();
    assert_eq!(
        v2,
        json!({"amount": {"value": 12.5, "currency": "EUR"},
               "customer": {"id": "c-1", "email": null}})
    );
    let back = r.translate_request_value(ApiVersion::V2, &v2).unwrap();
    assert_eq!(
        back,
        json!({"amount": 12.5, "currency": "EUR", "customer_id": "c-1"})
    );
}

#[test]
fn payments_responses_both_ways() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    let v2 = br#"{"id": "tx-1", "status": "succeeded", "amount": {"value": 1}}"#;
    let v1: Value =
        serde_json::from_slice(&r.translate_response(ApiVersion::V1, v2).unwrap()).unwrap();
    assert_eq!(v1, json!({"transaction_id": "tx-1", "status": "succeeded"}));
    let list = json!({"data": [{"id": "a", "status": "s"}, {"id": "b"}]});
    let v1 = r.translate_response_value(ApiVersion::V1, &list).unwrap();
    assert_eq!(
        v1,
        json!({"payments": [{"transaction_id": "a"}, {"transaction_id": "b"}]})
    );
    let v2 = r.translate_response_value(ApiVersion::V2, &v1).unwrap();
    assert_eq!(v2, json!({"data": [{"id": "a"}, {"id": "b"}]}));
}

#[test]
fn empty_arrays_stay_arrays() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    let v1 = r
        .translate_response_value(ApiVersion::V1, &json!({"data": []}))
        .unwrap();
    assert_eq!(v1, json!({"payments": []}));
}

#[test]
fn missing_required_names_the_pointer() {
    let t = translate(payments(json!("v2"), |_| {}));
    let r = &t.routes[0];
    let e = r
        .translate_request(ApiVersion::V1, br#"{"amount": 1}"#)
        .unwrap_err();
    assert_eq!(
        e,
        TranslateError::MissingRequired {
            pointer: "/customer_id".into()
        }
    );
    let reply = e.reply(Message::Request);
    assert_eq!(reply.status, 422);
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(body["detail"].as_str().unwrap().contains("/customer_id"));
    // The mirror direction names the v2 pointer.
    let e = r
        .translate_request(ApiVersion::V2, br#"{"customer": {}}"#)
        .unwrap_err();
    assert_eq!(e.reason(), "missing_required");
    assert!(e.detail().contains("/customer/id"));
    // null is present, not missing.
    assert!(r
        .translate_request(ApiVersion::V1, br#"{"customer_id": null}"#)
        .is_ok());
}

#[test]
fn invalid_json_gives_the_position() {
    let t = translate(payments(json!("v2"), |_| {}));
    let e = t.routes[0]
        .translate_request(ApiVersion::V1, b"{\n  \"amount\": 1,\n  oops}")
        .unwrap_err();
    let TranslateError::InvalidJson { line, column, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*line, *column), (3, 3));
    let reply = e.reply(Message::Request);
    assert_eq!(reply.status, 400);
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("line 3, column 3"), "{detail}");
    assert!(!detail.contains("at line 3 column"), "said once: {detail}");
    assert_eq!(
        t.routes[0]
            .translate_request(ApiVersion::V1, b"")
            .unwrap_err()
            .reason(),
        "invalid_json"
    );
}

#[test]
fn too_large_is_413_on_requests_and_502_on_responses() {
    let t = translate(payments(json!("v2"), |r| r["max_body_bytes"] = json!(10)));
    let r = &t.routes[0];
    assert!(r.check_size(10).is_ok());
    let e = r.check_size(11).unwrap_err();
    assert_eq!(e.reason(), "too_large");
    assert_eq!(e.reply(Message::Request).status, 413);
    assert_eq!(e.reply(Message::Response).status, 502);
    assert_eq!(
        r.translate_request(ApiVersion::V1, br#"{"customer_id": "abcdef"}"#),
        Err(TranslateError::TooLarge { limit: 10 })
    );
}

#[test]
fn every_reply_is_problem_json_with_an_anchor() {
    let errors = [
        TranslateError::UnsupportedMediaType { content_type: None },
        TranslateError::InvalidJson {
            line: 1,
            column: 1,
            message: "x".into(),
        },
        TranslateError::MissingRequired {
            pointer: "/a".into(),
        },
        TranslateError::TooLarge { limit: 1 },
    ];
    let statuses: Vec<u16> = errors
        .iter()
        .map(|e| {
            let r = e.reply(Message::Request);
            assert_eq!(r.headers[0].1, "application/problem+json");
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(body["type"].as_str().unwrap().contains("#translate-"));
            r.status
        })
        .collect();
    assert_eq!(statuses, vec![415, 400, 422, 413]);
}

#[test]
fn defaults_fill_absent_sources_only() {
    let r = route_with(
        json!([{"v1": "/a", "v2": "/x/a", "default": 0}, {"v2": "/version", "default": 2},
               {"v1": "/legacy", "default": "yes"}]),
        "drop",
    );
    assert_eq!(
        req(&r, ApiVersion::V1, json!({})).unwrap(),
        json!({"x": {"a": 0}, "version": 2})
    );
    assert_eq!(
        req(&r, ApiVersion::V1, json!({"a": 5})).unwrap(),
        json!({"x": {"a": 5}, "version": 2})
    );
    assert_eq!(
        req(&r, ApiVersion::V2, json!({"version": 2})).unwrap(),
        json!({"a": 0, "legacy": "yes"})
    );
}

#[test]
fn wildcard_defaults_fill_each_element() {
    let r = route_with(
        json!([{"v1": "/items/*/qty", "v2": "/lines/*/quantity", "default": 1},
               {"v1": "/items/*/sku", "v2": "/lines/*/product/sku"}]),
        "drop",
    );
    let v2 = req(
        &r,
        ApiVersion::V1,
        json!({"items": [{"sku": "a", "qty": 3}, {"sku": "b"}]}),
    )
    .unwrap();
    assert_eq!(
        v2,
        json!({"lines": [{"quantity": 3, "product": {"sku": "a"}},
                         {"quantity": 1, "product": {"sku": "b"}}]})
    );
}

#[test]
fn numeric_segments_wrap_and_unwrap() {
    let r = route_with(json!([{"v1": "/email", "v2": "/contacts/0/email"}]), "drop");
    let v2 = req(&r, ApiVersion::V1, json!({"email": "a@b"})).unwrap();
    assert_eq!(v2, json!({"contacts": [{"email": "a@b"}]}));
    let v1 = req(
        &r,
        ApiVersion::V2,
        json!({"contacts": [{"email": "first"}, {"email": "second"}]}),
    )
    .unwrap();
    assert_eq!(v1, json!({"email": "first"}));
    let r = route_with(json!([{"v1": "/tag", "v2": "/tags/0"}]), "drop");
    assert_eq!(
        req(&r, ApiVersion::V1, json!({"tag": "x"})).unwrap(),
        json!({"tags": ["x"]})
    );
    // A numeric segment on an object is a member name.
    assert_eq!(
        req(&r, ApiVersion::V2, json!({"tags": {"0": "y"}})).unwrap(),
        json!({"tag": "y"})
    );
}

#[test]
fn nested_wildcards() {
    let r = route_with(
        json!([{"v1": "/orders/*/items/*/id", "v2": "/o/*/lines/*/ref"}]),
        "drop",
    );
    let v1 = json!({"orders": [{"items": [{"id": 1}, {"id": 2}]}, {"items": [{"id": 3}]}]});
    let v2 = req(&r, ApiVersion::V1, v1.clone()).unwrap();
    assert_eq!(
        v2,
        json!({"o": [{"lines": [{"ref": 1}, {"ref": 2}]}, {"lines": [{"ref": 3}]}]})
    );
    assert_eq!(req(&r, ApiVersion::V2, v2).unwrap(), v1);
}

#[test]
fn unmapped_keep_copies_unnamed_fields() {
    let r = route_with(
        json!([{"v1": "/amount", "v2": "/amount/value"},
               {"v1": "/currency", "v2": "/amount/currency"},
               {"v1": "/customer_id", "v2": "/customer/id"},
               {"v1": "/items/*/id", "v2": "/items/*/sku"}]),
        "keep",
    );
    let v1 = json!({"amount": 5, "currency": "EUR", "customer_id": "c", "note": "hi",
                    "meta": {"a": [1, 2]}, "items": [{"id": 1, "n": 2}, {"id": 3}]});
    let v2 = req(&r, ApiVersion::V1, v1.clone()).unwrap();
    assert_eq!(
        v2,
        json!({"amount": {"value": 5, "currency": "EUR"}, "customer": {"id": "c"},
               "note": "hi", "meta": {"a": [1, 2]}, "items": [{"sku": 1, "n": 2}, {"sku": 3}]})
    );
    // Back again: fields emptied by the mapping leave no hollow objects behind.
    assert_eq!(req(&r, ApiVersion::V2, v2).unwrap(), v1);
    // Elements whose fields were all mapped leave no `[{}, {}]` behind; empty input stays.
    let v1 = json!({"customer_id": "c", "items": [{"id": 1}, {"id": 2}], "empty": {}});
    let v2 = req(&r, ApiVersion::V1, v1.clone()).unwrap();
    assert_eq!(
        v2,
        json!({"customer": {"id": "c"}, "items": [{"sku": 1}, {"sku": 2}], "empty": {}})
    );
    let r2 = route_with(
        json!([{"v1": "/items/*/id", "v2": "/lines/*/sku"},
               {"v1": "/items/*/qty", "v2": "/lines/*/quantity"}]),
        "keep",
    );
    let v2 = req(
        &r2,
        ApiVersion::V1,
        json!({"items": [{"id": 1, "qty": 2}, {"id": 3}]}),
    )
    .unwrap();
    assert_eq!(
        v2,
        json!({"lines": [{"sku": 1, "quantity": 2}, {"sku": 3}]})
    );
    // Drop leaves unnamed fields out.
    let r = route_with(json!([{"v1": "/amount", "v2": "/amount/value"}]), "drop");
    assert_eq!(
        req(&r, ApiVersion::V1, json!({"amount": 5, "note": "hi"})).unwrap(),
        json!({"amount": {"value": 5}})
    );
}

#[test]
fn non_object_documents() {
    let r = route_with(json!([{"v1": "/a", "v2": "/b"}]), "drop");
    assert_eq!(req(&r, ApiVersion::V1, json!([1, 2])).unwrap(), json!({}));
    assert_eq!(req(&r, ApiVersion::V1, json!("s")).unwrap(), json!({}));
    let r = route_with(json!([{"v1": "/a", "v2": "/b"}]), "keep");
    assert_eq!(
        req(&r, ApiVersion::V1, json!([1, 2])).unwrap(),
        json!([1, 2])
    );
}

// --- property: v1 -> v2 -> v1 gives the mapped fields back ---------------------------------

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z0-9 ]{0,8}".prop_map(Value::from),
        prop::collection::vec(any::<i32>().prop_map(Value::from), 0..3).prop_map(Value::from),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,6}",
        Just("a/b".to_string()),
        Just("t~n".to_string())
    ]
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// Entries whose pointers are distinct and prefix-free on each side: the first segment is
/// unique per entry (`k<i>` / `m<i>`), the rest random nesting, optionally through an array.
fn mapping() -> impl Strategy<Value = Vec<(Vec<String>, Vec<String>, bool)>> {
    prop::collection::vec(
        (
            prop::collection::vec(key(), 0..3),
            prop::collection::vec(key(), 0..3),
            any::<bool>(),
        ),
        1..6,
    )
}

fn pointer(first: String, rest: &[String], each: bool) -> String {
    let mut p = format!("/{first}");
    if each {
        p.push_str("/*");
    }
    for k in rest {
        p.push('/');
        p.push_str(&escape(k));
    }
    p
}

proptest! {
    #[test]
    fn v1_to_v2_to_v1_keeps_mapped_fields(
        shape in mapping(),
        values in prop::collection::vec(prop::collection::vec(leaf(), 1..4), 6),
        keep in any::<bool>(),
        extra in leaf(),
    ) {
        let entries: Vec<Value> = shape
            .iter()
            .enumerate()
            .map(|(i, (a, b, each))| json!({
                "v1": pointer(format!("k{i}"), a, *each),
                "v2": pointer(format!("m{i}"), b, *each),
            }))
            .collect();
        let r = route_with(Value::from(entries.clone()), if keep { "keep" } else { "drop" });
        // A v1 document the mapping covers: each v1 pointer holds values (one per element
        // for `*`), plus a field no entry names.
        let pointers: Vec<Pointer> = shape
            .iter()
            .enumerate()
            .map(|(i, (a, _, each))| Pointer::parse(&pointer(format!("k{i}"), a, *each)).unwrap())
            .collect();
        let mut doc = Node::from_value(&json!({"unnamed": extra}));
        for (i, ((_, _, each), p)) in shape.iter().zip(&pointers).enumerate() {
            let n = if *each { values[i].len() } else { 1 };
            for (j, value) in values[i].iter().take(n).enumerate() {
                *place(&mut doc, &p.segments, &[j], p.segments.len()) = Node::from_value(value);
            }
        }
        let v1 = doc.into_value();
        let v2 = r.translate_request_value(ApiVersion::V1, &v1).unwrap();
        let back = r.translate_request_value(ApiVersion::V2, &v2).unwrap();
        for (i, entry) in entries.iter().enumerate() {
            let p = format!("/k{i}");
            prop_assert_eq!(back.pointer(&p), v1.pointer(&p), "entry {} {:?}", i, entry);
        }
        prop_assert_eq!(back.get("unnamed").is_some(), keep);
        // And the bytes API agrees with the value API.
        let bytes = r.translate_request(ApiVersion::V1, v1.to_string().as_bytes()).unwrap();
        prop_assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), v2);
    }

    #[test]
    fn payments_contract_round_trips(
        amount in leaf(), currency in leaf(), customer in leaf(),
        ids in prop::collection::vec("[a-z0-9-]{1,10}", 0..5),
    ) {
        let t = translate(payments(json!("v2"), |_| {}));
        let r = &t.routes[0];
        let v1 = json!({"amount": amount, "currency": currency, "customer_id": customer});
        let v2 = r.translate_request_value(ApiVersion::V1, &v1).unwrap();
        prop_assert_eq!(r.translate_request_value(ApiVersion::V2, &v2).unwrap(), v1);
        let list = json!({"payments": ids.iter().map(|i| json!({"transaction_id": i})).collect::<Vec<_>>()});
        let v2 = r.translate_response_value(ApiVersion::V2, &list).unwrap();
        prop_assert_eq!(r.translate_response_value(ApiVersion::V1, &v2).unwrap(), list);
    }
}

/// What serde_json itself writes for `text` parsed as a `Value`: the translator's output for
/// anything it copies (members sorted, the last duplicate key wins, escapes and numbers
/// written anew).
fn as_serde_json_writes(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::from_str::<Value>(text).unwrap()).unwrap()
}

#[test]
fn copied_json_is_written_as_serde_json_writes_it() {
    let keep_all = route_with(json!([]), "keep");
    for text in [
        r#"{"b": 1, "a": [true, null, {"z": "\u00e9\"\n", "y": 2}], "a": {"k": "last wins"}}"#,
        r#"{"d\u0061": 1, "da": 2, "€": "😀", "": {"x": [1e3, -0, -0.0, 1.50, 18446744073709551615]}}"#,
        r#"{"n": -9223372036854775808, "f": 1.5e-7, "s": "\ud83d\ude00", "e": [], "o": {}}"#,
        r#"[{"b": 1, "a": 2, "b": 3}, "x", 1]"#,
        "3",
        "null",
    ] {
        let out = keep_all
            .translate_request(ApiVersion::V1, text.as_bytes())
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(as_serde_json_writes(text)).unwrap(),
            "{text}"
        );
    }
}

proptest! {
    #[test]
    fn duplicate_and_unsorted_keys_read_as_serde_json_reads_them(
        members in prop::collection::vec(("[a-d]{1,2}", leaf()), 0..12),
    ) {
        let text = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("{k:?}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let keep_all = route_with(json!([]), "keep");
        let out = keep_all.translate_request(ApiVersion::V1, text.as_bytes()).unwrap();
        prop_assert_eq!(out, as_serde_json_writes(&text));
        // And a mapped member is the last of its duplicates.
        let r = route_with(json!([{"v1": "/a", "v2": "/x"}]), "drop");
        let out = r.translate_request(ApiVersion::V1, text.as_bytes()).unwrap();
        let last = members.iter().rev().find(|(k, _)| k == "a").map(|(_, v)| v.clone());
        let want = last.map_or(json!({}), |v| json!({"x": v}));
        prop_assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), want);
    }
}

#[test]
fn a_source_read_twice_is_copied_not_moved() {
    // Validation keeps sources apart; entries built by hand can still overlap, and a value
    // moved out for the first would be missing for the second.
    let mut r = route_with(json!([]), "drop");
    let entry = |v1: &str, v2: &str| Entry {
        v1: Some(Pointer::parse(v1).unwrap()),
        v2: Some(Pointer::parse(v2).unwrap()),
        default: None,
        required: false,
    };
    r.request = vec![entry("/a/b", "/x"), entry("/a", "/y"), entry("/a/b", "/z")];
    let out = req(&r, ApiVersion::V1, json!({"a": {"b": [1, 2], "c": 3}})).unwrap();
    assert_eq!(
        out,
        json!({"x": [1, 2], "y": {"b": [1, 2], "c": 3}, "z": [1, 2]})
    );
}

#[test]
fn the_json_schema_describes_the_section() {
    let schema = serde_json::to_value(schemars::schema_for!(crate::config::RawConfig)).unwrap();
    let text = schema.to_string();
    for key in [
        "translate",
        "v1_prefix",
        "max_body_bytes",
        "unmapped",
        "translate_errors",
    ] {
        assert!(text.contains(key), "{key} missing from the schema");
    }
}

#[test]
fn summary_names_the_section() {
    let cfg = json!({"translate": payments(json!("v2"), |_| {})}).to_string();
    let c = Config::parse(cfg.as_bytes()).unwrap();
    assert!(!c.is_empty());
    assert!(c.summary().contains("translate 1 route"), "{}", c.summary());
}
