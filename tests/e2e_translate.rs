//! API version translation, end to end: a real Envoy running handoff.wasm with
//! `envoy/translate.yaml`, in front of a v1 and a v2 `payments` instance that answer in their
//! own format and echo what they received. Every scenario runs over HTTP/1.1 and HTTP/2.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use futures::stream;
use serde_json::{json, Value};
use support::{clients, h1, h2, send, Backend, Envoy, EnvoyOpts, Resp};

struct Setup {
    envoy: Envoy,
    v1: Backend,
    v2: Backend,
}

async fn setup(plugin_config: Value) -> Setup {
    setup_edited(plugin_config, |_| {}).await
}

/// [`setup`] with an edit of the whole bootstrap.
async fn setup_edited(plugin_config: Value, edit: impl FnOnce(&mut Value) + 'static) -> Setup {
    let (envoy, v1, v2) = support::translate_envoy(plugin_config, edit).await;
    Setup { envoy, v1, v2 }
}

/// The fixture's plugin configuration (the payments contract), edited.
fn fixture_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = support::fixture_plugin_config("translate");
    edit(&mut c);
    c
}

/// A second route over the echo endpoints (any path the payments API does not know), to see
/// arrays, defaults, required fields and `unmapped: keep` on both messages.
fn orders_route() -> Value {
    json!({
        "name": "orders",
        "v1_prefix": "/api/v1/orders",
        "v2_prefix": "/api/v2/orders",
        "backend": "v2",
        "unmapped": "keep",
        "request": [
            {"v1": "/items/*/sku", "v2": "/lines/*/product/sku"},
            {"v1": "/items/*/qty", "v2": "/lines/*/quantity", "default": 1},
            {"v1": "/email", "v2": "/contacts/0/email"},
            {"v1": "/customer_id", "v2": "/customer/id", "required": true},
            {"v2": "/schema", "default": 2}
        ],
        "response": [
            {"v1": "/received", "v2": "/body"},
            {"v1": "/seen_path", "v2": "/path"}
        ]
    })
}

fn with_orders(c: &mut Value) {
    c["translate"]["routes"]
        .as_array_mut()
        .expect("routes")
        .push(orders_route());
}

async fn post_json(client: &reqwest::Client, url: String, body: &Value) -> Resp {
    send(
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

/// The v2 backend's created payment, as a v1 client must see it: exactly the v1 fields.
fn assert_v2_payment_as_v1(a: &Resp, proto: &str) {
    let got = a.json();
    assert_eq!(got["status"], "succeeded", "{proto}: {got}");
    assert!(
        got["transaction_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("tx-v2-")),
        "{proto}: {got}"
    );
    assert_eq!(got.as_object().unwrap().len(), 2, "unmapped dropped: {got}");
}

#[tokio::test]
async fn v1_clients_reach_the_v2_backend_translated_both_ways() {
    let s = setup(support::fixture_plugin_config("translate")).await;
    for (proto, c) in clients() {
        let v1_body = json!({"amount": 12.5, "currency": "EUR", "customer_id": "c-1"});
        let a = send(
            c.post(s.envoy.url("/api/v1/payments?trace=1"))
                .header("content-type", "application/json")
                // A client cannot claim its request was translated.
                .header("x-handoff-translated", "v2-v1")
                // The response is rewritten: the backend is asked for it uncompressed.
                .header("accept-encoding", "gzip")
                .body(v1_body.to_string()),
        )
        .await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-api-version"), Some("v2"), "{proto}");
        assert_eq!(a.header("content-type"), Some("application/json"));
        a.assert_length_correct();
        assert_v2_payment_as_v1(&a, proto);

        let seen = s.v2.last().await;
        assert_eq!(seen["path"], "/api/v2/payments", "{proto}");
        assert_eq!(seen["query"], json!({"trace": "1"}));
        assert_eq!(
            seen["body"],
            json!({"amount": {"value": 12.5, "currency": "EUR"},
                   "customer": {"id": "c-1", "email": null}}),
            "{proto}"
        );
        assert_eq!(seen["headers"]["x-handoff-translated"], "v1-v2");
        assert!(seen["headers"].get("accept-encoding").is_none(), "{seen}");
        // The hold filter gives the upstream an exact length for the rewritten body, and the
        // app never sees the hold mark.
        assert!(seen["headers"].get("x-handoff-hold").is_none(), "{seen}");
        assert_eq!(
            seen["headers"]["content-length"],
            seen["body_bytes"].to_string(),
            "{proto}"
        );

        // A list: `*` maps every element.
        let a = send(c.get(s.envoy.url("/api/v1/payments"))).await;
        assert_eq!(a.status, 200);
        a.assert_length_correct();
        assert_eq!(
            a.json(),
            json!({"payments": [{"transaction_id": "tx-1"}, {"transaction_id": "tx-2"},
                                {"transaction_id": "tx-3"}]}),
            "{proto}"
        );
        let seen = s.v2.last().await;
        assert_eq!(seen["method"], "GET");
        assert_eq!(seen["headers"]["x-handoff-translated"], "v1-v2");
    }
    assert_eq!(s.v1.requests().await, 0, "nothing reached the v1 backend");
    let stats = s.envoy.stats().await;
    let t = "handoff_translate_translations";
    let l = |d, m| [("route", "payments"), ("direction", d), ("message", m)];
    assert_eq!(stats.get(t, &l("v1-v2", "request")), 4.0);
    assert_eq!(stats.get(t, &l("v2-v1", "response")), 4.0);
}

#[tokio::test]
async fn a_client_that_speaks_the_backend_version_passes_byte_for_byte() {
    let s = setup(support::fixture_plugin_config("translate")).await;
    for (proto, c) in clients() {
        // Odd spacing and a field no mapping names: nothing may be re-serialized.
        let raw = "{ \"amount\" :{\"value\":1, \"currency\":\"EUR\"},\n \"customer\":{\"id\":\"c\"}, \"x\":1 }";
        let a = send(
            c.post(s.envoy.url("/api/v2/payments"))
                .header("content-type", "application/json")
                .header("x-handoff-translated", "v1-v2")
                .body(raw),
        )
        .await;
        assert_eq!(a.status, 201, "{proto}");
        let seen = s.v2.last().await;
        assert_eq!(seen["body_bytes"].as_u64().unwrap() as usize, raw.len());
        assert_eq!(seen["headers"]["content-length"], raw.len().to_string());
        assert!(
            seen["headers"].get("x-handoff-translated").is_none(),
            "a client-sent claim is removed: {seen}"
        );
        let got = a.json();
        assert!(
            got.get("id").is_some() && got.get("customer").is_some(),
            "{got}"
        );
        // Even a body translation would reject passes: it is not translated.
        let a = send(
            c.post(s.envoy.url("/api/v2/payments"))
                .header("content-type", "text/plain")
                .body("not json"),
        )
        .await;
        assert_eq!(a.status, 400, "the backend's own answer: {proto}");
        assert_eq!(a.header("x-api-version"), Some("v2"));
    }
    let stats = s.envoy.stats().await;
    assert_eq!(stats.sum_or_zero("handoff_translate_translations"), 0.0);
}

#[tokio::test]
async fn v2_clients_reach_a_v1_backend_with_the_same_mapping_read_backwards() {
    let s = setup(fixture_with(|c| {
        c["translate"]["routes"][0]["backend"] = json!("v1");
    }))
    .await;
    for (proto, c) in clients() {
        let v2_body = json!({"amount": {"value": 7, "currency": "USD"},
                             "customer": {"id": "c-9", "email": "a@b.c"}});
        let a = post_json(&c, s.envoy.url("/api/v2/payments"), &v2_body).await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-api-version"), Some("v1"));
        a.assert_length_correct();
        let got = a.json();
        assert!(got["id"].as_str().unwrap().starts_with("tx-v1-"), "{got}");
        assert_eq!(got["status"], "succeeded");
        assert_eq!(got.as_object().unwrap().len(), 2, "{got}");
        let seen = s.v1.last().await;
        assert_eq!(seen["path"], "/api/v1/payments");
        assert_eq!(
            seen["body"],
            json!({"amount": 7, "currency": "USD", "customer_id": "c-9"}),
            "{proto}"
        );
        assert_eq!(seen["headers"]["x-handoff-translated"], "v2-v1");

        let a = send(c.get(s.envoy.url("/api/v2/payments"))).await;
        assert_eq!(
            a.json(),
            json!({"data": [{"id": "tx-1"}, {"id": "tx-2"}, {"id": "tx-3"}]}),
            "{proto}"
        );
    }
    assert_eq!(s.v2.requests().await, 0);
    let stats = s.envoy.stats().await;
    let t = "handoff_translate_translations";
    let l = |d, m| [("route", "payments"), ("direction", d), ("message", m)];
    assert_eq!(stats.get(t, &l("v2-v1", "request")), 4.0);
    assert_eq!(stats.get(t, &l("v1-v2", "response")), 4.0);
}

#[tokio::test]
async fn the_backend_version_follows_the_canary_cohort() {
    let s = setup(fixture_with(|c| {
        c["canary"] = json!({
            "salt": "translate-e2e", "percent": 0,
            "user_id": [{"header": "x-user-id"}],
            "allow": ["u-canary"]
        });
        c["translate"]["routes"][0]["backend"] = json!({"stable": "v1", "canary": "v2"});
    }))
    .await;
    let v1_body = json!({"amount": 3, "currency": "EUR", "customer_id": "c-3"});
    for (proto, c) in clients() {
        // A canary user speaking v1 is translated to the v2 canary.
        let a = send(
            c.post(s.envoy.url("/api/v1/payments"))
                .header("x-user-id", "u-canary")
                .header("content-type", "application/json")
                .body(v1_body.to_string()),
        )
        .await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-api-version"), Some("v2"));
        assert!(a.json().get("transaction_id").is_some());
        assert_eq!(
            s.v2.last().await["headers"]["x-handoff-translated"],
            "v1-v2"
        );

        // A stable user speaking v1 stays on v1, untouched byte for byte.
        let raw = format!("{}  ", v1_body);
        let a = send(
            c.post(s.envoy.url("/api/v1/payments"))
                .header("x-user-id", "u-stable")
                .header("content-type", "application/json")
                .body(raw.clone()),
        )
        .await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-api-version"), Some("v1"));
        let seen = s.v1.last().await;
        assert_eq!(seen["path"], "/api/v1/payments");
        assert_eq!(seen["body_bytes"].as_u64().unwrap() as usize, raw.len());
        assert!(seen["headers"].get("x-handoff-translated").is_none());
        let got = a.json();
        assert!(got.get("customer_id").is_some(), "v1's own answer: {got}");

        // A stable user speaking v2 is translated down to the stable v1.
        let v2_body = json!({"amount": {"value": 3}, "customer": {"id": "c-3"}});
        let a = send(
            c.post(s.envoy.url("/api/v2/payments"))
                .header("x-user-id", "u-stable")
                .header("content-type", "application/json")
                .body(v2_body.to_string()),
        )
        .await;
        assert_eq!(a.header("x-api-version"), Some("v1"), "{proto}");
        assert!(a.json().get("id").is_some());
        assert_eq!(
            s.v1.last().await["headers"]["x-handoff-translated"],
            "v2-v1"
        );
    }
}

#[tokio::test]
async fn arrays_defaults_wrapping_and_unmapped_keep() {
    let s = setup(fixture_with(with_orders)).await;
    for (proto, c) in clients() {
        let v1_body = json!({
            "customer_id": "c-1",
            "email": "a@b.c",
            "items": [{"sku": "A", "qty": 2}, {"sku": "B"}],
            "note": "leave at door",
            "meta": {"tags": ["x", "y"]}
        });
        let a = post_json(&c, s.envoy.url("/api/v1/orders/7?x=1"), &v1_body).await;
        assert_eq!(a.status, 200, "{proto}");
        a.assert_length_correct();
        let expected_v2 = json!({
            "customer": {"id": "c-1"},
            "contacts": [{"email": "a@b.c"}],
            "lines": [{"product": {"sku": "A"}, "quantity": 2},
                      {"product": {"sku": "B"}, "quantity": 1}],
            "schema": 2,
            "note": "leave at door",
            "meta": {"tags": ["x", "y"]}
        });
        let seen = s.v2.last().await;
        assert_eq!(seen["path"], "/api/v2/orders/7");
        assert_eq!(seen["body"], expected_v2, "{proto}");
        // The echo, translated back: mapped members renamed, the rest kept as they were.
        let got = a.json();
        assert_eq!(got["received"], expected_v2, "{proto}");
        assert_eq!(got["seen_path"], "/api/v2/orders/7");
        assert_eq!(got["instance"], "v2", "kept: {got}");
        assert_eq!(got["headers"]["x-handoff-translated"], "v1-v2");
        assert!(
            got.get("body").is_none() && got.get("path").is_none(),
            "{got}"
        );
    }
}

#[tokio::test]
async fn chunked_http1_and_large_multi_frame_http2_bodies() {
    let s = setup(fixture_with(with_orders)).await;
    // A large order: ~200 KB, far more than one read or one HTTP/2 frame.
    let items: Vec<Value> = (0..4000)
        .map(|i| json!({"sku": format!("sku-{i:06}-{}", "x".repeat(24)), "qty": i}))
        .collect();
    let v1_body = json!({"customer_id": "c-big", "items": items});
    let text = v1_body.to_string();
    assert!(text.len() > 200_000, "{}", text.len());

    // HTTP/1.1 chunked: a streamed body has no content-length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = text
        .as_bytes()
        .chunks(7000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let for_each = |seen: &Value| {
        let lines = seen["body"]["lines"].as_array().expect("lines").clone();
        assert_eq!(lines.len(), 4000);
        assert_eq!(lines[3999]["quantity"], 3999);
        assert_eq!(seen["body"]["customer"]["id"], "c-big");
    };
    let a = send(
        h1().post(s.envoy.url("/api/v1/orders"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream::iter(chunks))),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = s.v2.last().await;
    for_each(&seen);
    // Sent chunked, forwarded with the exact length of the rewritten body.
    assert_eq!(
        seen["headers"]["content-length"],
        seen["body_bytes"].to_string()
    );
    // The response (the echo, > 200 KB) came back translated in one piece.
    a.assert_length_correct();
    for_each(&json!({"body": a.json()["received"]}));

    // HTTP/2, one large body split across many DATA frames; and a streamed one.
    for body in [
        reqwest::Body::from(text.clone()),
        reqwest::Body::wrap_stream(stream::iter(
            text.as_bytes()
                .chunks(1000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )),
    ] {
        let a = send(
            h2().post(s.envoy.url("/api/v1/orders"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        for_each(&s.v2.last().await);
        a.assert_length_correct();
        for_each(&json!({"body": a.json()["received"]}));
    }
}

/// An HTTP/2 request whose body ends with trailers (no END_STREAM on the last DATA frame) is
/// translated when the trailers arrive, like any other.
#[tokio::test]
async fn a_request_body_ended_by_http2_trailers_is_translated() {
    let s = setup(support::fixture_plugin_config("translate")).await;
    let v1_body = json!({"amount": 3, "currency": "EUR", "customer_id": "c-t"});
    let (status, headers, body) = support::h2_post_with_trailers(
        s.envoy.port(10000),
        "/api/v1/payments",
        &[("content-type", "application/json")],
        v1_body.to_string().as_bytes(),
        &[("x-checksum", "abc")],
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-api-version"], "v2");
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        got["status"], "succeeded",
        "translated back for the v1 client: {got}"
    );
    let seen = s.v2.last().await;
    assert_eq!(seen["path"], "/api/v2/payments");
    assert_eq!(
        seen["body"],
        json!({"amount": {"value": 3, "currency": "EUR"},
               "customer": {"id": "c-t", "email": null}}),
        "the backend got the translated body"
    );
    assert_eq!(
        seen["headers"]["content-length"],
        seen["body_bytes"].to_string()
    );
    let stats = s.envoy.stats().await;
    let l = [
        ("route", "payments"),
        ("direction", "v1-v2"),
        ("message", "request"),
    ];
    assert_eq!(stats.get("handoff_translate_translations", &l), 1.0);

    // An untranslatable body ended by trailers is answered with the problem, not forwarded.
    let (status, headers, _) = support::h2_post_with_trailers(
        s.envoy.port(10000),
        "/api/v1/payments",
        &[("content-type", "application/json")],
        b"{not json",
        &[("x-checksum", "abc")],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        s.v2.requests().await,
        1,
        "the bad one never reached the backend"
    );
    support::assert_survived(&s.envoy).await;
}

/// A backend response whose body ends with trailers is translated when they arrive.
#[tokio::test]
async fn a_response_body_ended_by_trailers_is_translated() {
    let s = setup_edited(
        support::fixture_plugin_config("translate"),
        support::h2_upstreams,
    )
    .await;
    let envoy = &s.envoy;
    for (proto, c) in clients() {
        let v1_body = json!({"amount": 4, "currency": "EUR", "customer_id": "c-r"});
        let a = post_json(&c, envoy.url("/api/v1/payments?trailers=1"), &v1_body).await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-api-version"), Some("v2"));
        assert_v2_payment_as_v1(&a, proto);
    }
    let stats = envoy.stats().await;
    let l = [
        ("route", "payments"),
        ("direction", "v2-v1"),
        ("message", "response"),
    ];
    assert_eq!(stats.get("handoff_translate_translations", &l), 2.0);
    support::assert_survived(envoy).await;
}

#[tokio::test]
async fn errors_are_problems_that_never_reach_the_backend() {
    let s = setup(fixture_with(|c| {
        with_orders(c);
        c["translate"]["routes"][1]["max_body_bytes"] = json!(200);
    }))
    .await;
    for (proto, c) in clients() {
        let before = (s.v1.requests().await, s.v2.requests().await);

        // 415: a body that is not JSON.
        let a = send(
            c.post(s.envoy.url("/api/v1/payments"))
                .header("content-type", "text/plain")
                .body("amount=1"),
        )
        .await;
        let p = a.assert_problem(415, "translate-unsupported-media-type");
        assert!(p["detail"].as_str().unwrap().contains("text/plain"), "{p}");
        // ... also without any content type.
        let a = send(c.post(s.envoy.url("/api/v1/payments")).body("{}")).await;
        a.assert_problem(415, "translate-unsupported-media-type");

        // 415: a compressed body cannot be read.
        let a = send(
            c.post(s.envoy.url("/api/v1/payments"))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(vec![0x1f, 0x8b, 0x08, 0x00]),
        )
        .await;
        let p = a.assert_problem(415, "translate-unsupported-media-type");
        assert!(p["detail"].as_str().unwrap().contains("gzip"), "{p}");

        // 400: invalid JSON, with where parsing stopped.
        let a = send(
            c.post(s.envoy.url("/api/v1/payments"))
                .header("content-type", "application/json")
                .body("{\"amount\": 1,\n \"customer_id\": }"),
        )
        .await;
        let p = a.assert_problem(400, "translate-invalid-json");
        assert!(
            p["detail"].as_str().unwrap().contains("line 2, column 17"),
            "{proto}: {p}"
        );

        // 422: a required field is missing, named by its pointer.
        let a = post_json(&c, s.envoy.url("/api/v1/payments"), &json!({"amount": 1})).await;
        let p = a.assert_problem(422, "translate-missing-required");
        assert!(
            p["detail"].as_str().unwrap().contains("/customer_id"),
            "{p}"
        );

        // 413: over max_body_bytes (200 on the orders route), sized or streamed.
        let big = json!({"customer_id": "c", "note": "n".repeat(300)}).to_string();
        let a = send(
            c.post(s.envoy.url("/api/v1/orders"))
                .header("content-type", "application/json")
                .body(big.clone()),
        )
        .await;
        a.assert_problem(413, "translate-too-large");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            big.as_bytes().chunks(50).map(|c| Ok(c.to_vec())).collect();
        let a = send(
            c.post(s.envoy.url("/api/v1/orders"))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(stream::iter(chunks))),
        )
        .await;
        a.assert_problem(413, "translate-too-large");

        assert_eq!(
            (s.v1.requests().await, s.v2.requests().await),
            before,
            "{proto}: no failed request reached a backend"
        );
    }
    let stats = s.envoy.stats().await;
    let f = "handoff_translate_failures";
    let l = |route, reason| [("route", route), ("message", "request"), ("reason", reason)];
    assert_eq!(stats.get(f, &l("payments", "unsupported_media_type")), 4.0);
    assert_eq!(stats.get(f, &l("payments", "unsupported_encoding")), 2.0);
    assert_eq!(stats.get(f, &l("payments", "invalid_json")), 2.0);
    assert_eq!(stats.get(f, &l("payments", "missing_required")), 2.0);
    assert_eq!(stats.get(f, &l("orders", "too_large")), 4.0);
    assert_eq!(stats.sum_or_zero("handoff_translate_translations"), 0.0);
}

#[tokio::test]
async fn error_responses_pass_untranslated_unless_asked_and_bad_responses_are_502() {
    let s = setup(fixture_with(|c| {
        let mut strict = c["translate"]["routes"][0].clone();
        strict["name"] = json!("strict");
        strict["v1_prefix"] = json!("/api/v1/strict");
        strict["v2_prefix"] = json!("/api/v2/strict");
        strict["translate_errors"] = json!(true);
        strict["response"] = json!([
            {"v1": "/transaction_id", "v2": "/id"},
            {"v1": "/answer", "v2": "/nothing_like_this", "required": true}
        ]);
        c["translate"]["routes"]
            .as_array_mut()
            .unwrap()
            .push(strict);
        c["translate"]["routes"][0]["translate_errors"] = json!(false);
        let mut orders = orders_route();
        orders["translate_errors"] = json!(true);
        c["translate"]["routes"]
            .as_array_mut()
            .unwrap()
            .push(orders);
    }))
    .await;
    let v1_body = json!({"amount": 1, "currency": "EUR", "customer_id": "c"});
    for (proto, c) in clients() {
        // A 5xx from the backend reaches the v1 client as the backend wrote it.
        let a = post_json(&c, s.envoy.url("/api/v1/payments?status=503"), &v1_body).await;
        assert_eq!(a.status, 503, "{proto}");
        let got = a.json();
        assert!(got.get("id").is_some(), "untranslated: {got}");
        a.assert_length_correct();

        // With translate_errors, a 4xx is translated like a 2xx (status kept).
        let a = send(c.get(s.envoy.url("/api/v1/orders?status=404"))).await;
        assert_eq!(a.status, 404, "{proto}");
        assert_eq!(a.header("x-handoff-translated"), Some("v2-v1"));
        a.assert_length_correct();
        let got = a.json();
        assert_eq!(got["seen_path"], "/api/v2/orders", "{got}");
        assert!(got.get("path").is_none(), "{got}");

        // A response the mapping cannot translate (a required source is missing): 502.
        let a = send(c.get(s.envoy.url("/api/v1/strict?status=404"))).await;
        let p = a.assert_problem(502, "translate-response-failed");
        assert!(
            p["detail"].as_str().unwrap().contains("/nothing_like_this"),
            "{proto}: {p}"
        );
    }
    let stats = s.envoy.stats().await;
    let l = [
        ("route", "strict"),
        ("message", "response"),
        ("reason", "missing_required"),
    ];
    assert_eq!(stats.get("handoff_translate_failures", &l), 2.0);
}

#[tokio::test]
async fn invalid_translate_configs_are_refused_with_one_log_line() {
    let cases = [
        (
            fixture_with(|c| {
                c["translate"]["routes"][0]["backend"] = json!({"stable": "v1", "canary": "v2"})
            }),
            "translate.routes[0].backend",
        ),
        (
            fixture_with(|c| c["translate"]["routes"][0]["request"][0]["v2"] = json!("amount")),
            "translate.routes[0].request[0].v2",
        ),
    ];
    for (cfg, line) in cases {
        let log =
            Envoy::start_expecting_failure(EnvoyOpts::new("translate").plugin_config(cfg)).await;
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
        assert_eq!(hits.len(), 1, "expected one log line with {line:?}:\n{log}");
        assert!(hits[0].contains("[error]"), "{}", hits[0]);
    }
}

#[tokio::test]
async fn the_demo_translates_for_canary_users_only() {
    // envoy/demo.yaml: canary (allow u-1, deny u-2) routes by cohort; translate follows it.
    // The demo also enforces Idempotency-Key on POSTs under /api/: each request gets its own.
    let (stable, canary) = Backend::versions("stable", "canary");
    let envoy = Envoy::start(EnvoyOpts::new("demo").versions(&stable, &canary)).await;
    let v1_body = json!({"amount": 5, "currency": "EUR", "customer_id": "c-5"});
    for (proto, c) in clients() {
        let post = |user: &str| {
            c.post(envoy.url("/api/v1/payments"))
                .header("x-user-id", user)
                .header("idempotency-key", format!("demo-{proto}-{user}"))
                .header("content-type", "application/json")
                .body(v1_body.to_string())
        };
        let a = send(post("u-1")).await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-upstream"), Some("canary"));
        assert_eq!(a.header("x-handoff-translated"), Some("v2-v1"));
        a.assert_length_correct();
        assert!(a.json().get("transaction_id").is_some(), "{}", a.json());
        let seen = canary.last().await;
        assert_eq!(seen["path"], "/api/v2/payments");
        assert_eq!(seen["body"]["customer"]["id"], "c-5");

        let a = send(post("u-2")).await;
        assert_eq!(a.status, 201, "{proto}");
        assert_eq!(a.header("x-upstream"), Some("stable"));
        assert!(a.header("x-handoff-translated").is_none());
        let seen = stable.last().await;
        assert_eq!(seen["body"], v1_body, "{proto}");
        assert!(seen["headers"].get("x-handoff-translated").is_none());
    }
}
