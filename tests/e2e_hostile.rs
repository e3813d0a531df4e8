//! Hostile and malformed input, end to end: each case sends what an attacker or a broken client
//! would, asserts the documented status (and problem body where handoff answers), and that
//! neither the wasm VM nor Envoy crashed (no panic, trap or failed callback in Envoy's log, the
//! admin endpoint still ready, a normal request still served).
//!
//! The catalogue is grouped by the capability whose filter sees the input; the translate,
//! idempotency and drain cases run against their contract configs.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::Sha256;
use support::tokens::{jwt, sign_override};
use support::{
    assert_survived, clients, cohort, raw_h1, user_in, Backend, Envoy, EnvoyOpts, Resp, Stats,
};

const SALT: &str = "checkout-2026-11";
/// 10 MiB.
const TEN_MB: usize = 10 * 1024 * 1024;
/// Envoy's default `max_request_headers_kb` (60 KiB): above it the request is refused.
const HEADER_LIMIT: usize = 60 * 1024;

struct Canary {
    envoy: Envoy,
    stable: Backend,
    _canary: Backend,
}

async fn canary() -> Canary {
    let (stable, canary) = Backend::versions("stable", "canary");
    let envoy = Envoy::start(EnvoyOpts::new("canary").versions(&stable, &canary)).await;
    Canary {
        envoy,
        stable,
        _canary: canary,
    }
}

/// A normal request still gets its normal answer, over both protocols.
async fn still_serves(envoy: &Envoy) {
    for (proto, client) in clients() {
        let r = client
            .get(envoy.url("/"))
            .header("x-user-id", "after-the-attack")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{proto}: Envoy no longer serves: {e}"));
        assert_eq!(r.status(), 200, "{proto}");
    }
    assert_survived(envoy).await;
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

// --- canary ---------------------------------------------------------------------------------

/// No filter in the canary chain buffers the body, so Envoy streams 10 MB through to the app
/// (no 413: that answer belongs to filters that buffer, see the translate and idempotency
/// cases). The app receives every byte.
#[tokio::test]
async fn a_10_mb_body_streams_through_the_canary_filter() {
    let s = canary().await;
    for (proto, client) in clients() {
        let r = client
            .post(s.envoy.url("/upload"))
            .header("x-user-id", "big-sender")
            .header("content-type", "application/octet-stream")
            .body(vec![b'a'; TEN_MB])
            .send()
            .await
            .unwrap_or_else(|e| panic!("{proto}: {e}"));
        assert_eq!(r.status(), 200, "{proto}");
        let echo: Value = r.json().await.expect("echo");
        assert_eq!(echo["body_bytes"], TEN_MB, "{proto}");
        assert_eq!(
            echo["headers"]["x-canary-variant"],
            cohort(SALT, "big-sender", 12.5)
        );
    }
    let _ = &s.stable;
    still_serves(&s.envoy).await;
}

/// A 64 KB cookie is over Envoy's header limit: Envoy refuses it (HTTP/1.1: 431) before any
/// filter runs. A 40 KB cookie is under the limit and the filter still finds the user id in it;
/// a 40 KB user id is treated as absent (ids are at most 256 bytes), so the user is anonymous.
#[tokio::test]
async fn a_64_kb_cookie_is_refused_by_envoy_and_a_40_kb_one_is_parsed() {
    let s = canary().await;
    let filler = "x".repeat(64 * 1024);
    let req = format!(
        "GET / HTTP/1.1\r\nhost: a\r\ncookie: junk={filler}; uid=u-cookie\r\nconnection: close\r\n\r\n"
    );
    let (status, head, _) = raw_h1(s.envoy.port(10000), req.as_bytes()).await;
    assert_eq!(status, 431, "{head}");

    let r = support::h2()
        .get(s.envoy.url("/"))
        .header("cookie", format!("junk={filler}; uid=u-cookie"))
        .send()
        .await;
    // HTTP/2 has no 431 from the codec: Envoy resets the stream (or answers 431).
    match r {
        Ok(r) => assert_eq!(r.status(), 431, "HTTP/2"),
        Err(e) => assert!(e.is_request() || e.is_body(), "HTTP/2: {e}"),
    }

    let big = "y".repeat(40 * 1024);
    for (proto, client) in clients() {
        let r = client
            .get(s.envoy.url("/"))
            .header("cookie", format!("junk={big}; uid=u-cookie"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
        assert_eq!(
            header(&r, "x-canary-variant"),
            cohort(SALT, "u-cookie", 12.5),
            "{proto}"
        );
        let r = client
            .get(s.envoy.url("/"))
            .header("cookie", format!("uid={big}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
        assert!(
            header(&r, "set-cookie").starts_with("hf_uid="),
            "{proto}: an oversized id is no id; the user gets an anonymous one"
        );
    }
    let stats = s
        .envoy
        .stats_when(
            "handoff_canary_decisions",
            "2 anonymous decisions counted",
            |st| st.sum("handoff_canary_decisions") >= 2.0,
        )
        .await;
    assert_eq!(
        stats.sum_with("handoff_canary_decisions", &[("reason", "anonymous")]),
        2.0
    );
    still_serves(&s.envoy).await;
}

/// Headers beyond Envoy's 60 KiB limit, or more than its 100-header limit: 431 on HTTP/1.1
/// (a reset on HTTP/2), answered by Envoy; the app never sees them.
#[tokio::test]
async fn huge_and_too_many_headers_are_refused_by_envoy() {
    let s = canary().await;
    let before = s.stable.requests().await;
    let huge = "h".repeat(HEADER_LIMIT + 1024);
    let req =
        format!("GET / HTTP/1.1\r\nhost: a\r\nx-user-id: {huge}\r\nconnection: close\r\n\r\n");
    let (status, head, _) = raw_h1(s.envoy.port(10000), req.as_bytes()).await;
    assert_eq!(status, 431, "{head}");

    let mut many = String::from("GET / HTTP/1.1\r\nhost: a\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h-{i}: v\r\n"));
    }
    many.push_str("connection: close\r\n\r\n");
    let (status, head, _) = raw_h1(s.envoy.port(10000), many.as_bytes()).await;
    assert_eq!(status, 431, "{head}");

    let r = support::h2()
        .get(s.envoy.url("/"))
        .header("x-user-id", huge.as_str())
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431, "HTTP/2"),
        Err(e) => assert!(e.is_request() || e.is_body(), "HTTP/2: {e}"),
    }
    assert_eq!(
        s.stable.requests().await,
        before,
        "the app saw a refused request"
    );
    still_serves(&s.envoy).await;
}

/// Two `x-user-id` headers: Envoy hands the filter the first value only, so the user is `a`
/// (not `b`, not `a,b`), every time, on both protocols (no crash, no flapping). The pair is
/// chosen so that only `a` is canary.
#[tokio::test]
async fn duplicate_user_id_headers_give_one_stable_decision() {
    let s = canary().await;
    let (a, b) = (0..)
        .map(|i| (format!("dup-{i}-a"), format!("dup-{i}-b")))
        .find(|(a, b)| {
            cohort(SALT, a, 12.5) == "canary"
                && cohort(SALT, b, 12.5) == "stable"
                && cohort(SALT, &format!("{a},{b}"), 12.5) == "stable"
        })
        .unwrap();
    for (proto, client) in clients() {
        for _ in 0..10 {
            let r = client
                .get(s.envoy.url("/"))
                .header("x-user-id", a.as_str())
                .header("x-user-id", b.as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{proto}");
            assert_eq!(header(&r, "x-canary-variant"), "canary", "{proto}");
        }
    }
    let _ = &s.stable;
    still_serves(&s.envoy).await;
}

/// Control characters in a user id: Envoy's HTTP/1.1 codec refuses NUL, DEL and other raw
/// control characters in header values (400), but drops a bare CR (`ua\rbx` arrives as `uabx`);
/// percent-encoded ones in the query reach the filter decoded, and are an ordinary (if odd) id.
/// Bytes that are not UTF-8 are no id. The decision is made, nothing crashes.
#[tokio::test]
async fn user_ids_with_control_characters() {
    let s = canary().await;
    for bad in [&b"\x01"[..], b"\x7f", b"\x00"] {
        let mut req = b"GET / HTTP/1.1\r\nhost: a\r\nx-user-id: u".to_vec();
        req.extend_from_slice(bad);
        req.extend_from_slice(b"x\r\nconnection: close\r\n\r\n");
        let (status, head, _) = raw_h1(s.envoy.port(10000), &req).await;
        assert_eq!(status, 400, "{bad:?}: {head}");
    }
    // A bare CR inside a value: Envoy's codec accepts it and hands the value on; what the app
    // sees and the decision are those of the value Envoy normalised.
    let req = b"GET / HTTP/1.1\r\nhost: a\r\nx-user-id: ua\rbx\r\nconnection: close\r\n\r\n";
    let (status, head, _) = raw_h1(s.envoy.port(10000), req).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(s.stable.last().await["headers"]["x-user-id"], "uabx");
    assert!(
        head.contains(&format!("x-canary-variant: {}", cohort(SALT, "uabx", 12.5))),
        "{head}"
    );
    for (proto, client) in clients() {
        let r = client
            .get(s.envoy.url("/?uid=u%01%0D%0Ax%00"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
        assert_eq!(
            header(&r, "x-canary-variant"),
            cohort(SALT, "u\u{1}\r\nx\u{0}", 12.5),
            "{proto}"
        );
        // Obs-text (bytes >= 0x80) is legal in a header value, but not UTF-8: it is no id, so
        // the user is anonymous. (Regression: proxy-wasm's String header reader panicked on
        // it, which aborted the VM and answered 503 to every later request.)
        for _ in 0..3 {
            let r = client
                .get(s.envoy.url("/"))
                .header(
                    "x-user-id",
                    reqwest::header::HeaderValue::from_bytes(b"u\xff\xfe").unwrap(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{proto}");
            assert!(header(&r, "set-cookie").starts_with("hf_uid="), "{proto}");
        }
        // Not UTF-8 in a cookie or the query either.
        let r = client
            .get(s.envoy.url("/?uid=%FF%FE"))
            .header(
                "cookie",
                reqwest::header::HeaderValue::from_bytes(b"uid=\xff\xfe").unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
        assert!(header(&r, "set-cookie").starts_with("hf_uid="), "{proto}");
    }
    still_serves(&s.envoy).await;
}

/// Forged override signatures never force a variant: wrong secret, another user's signature,
/// truncated, upper-case hex of a wrong MAC, a 30 KB value, non-hex, an empty value. Each is
/// counted as rejected and the request is decided by the hash; the override header never
/// reaches the app.
#[tokio::test]
async fn forged_override_signatures_are_ignored() {
    let s = canary().await;
    let user = user_in(SALT, 12.5, "stable", "f-");
    let good = sign_override("change-me", "canary", &user);
    let forged = vec![
        sign_override("wrong-secret", "canary", &user),
        sign_override("change-me", "canary", "someone-else"),
        good[..good.len() - 2].to_string(),
        good.to_uppercase(),
        format!("canary.{}", "ab".repeat(15 * 1024)),
        "canary.not-hex-at-all".to_string(),
        "canary.".to_string(),
        ".".to_string(),
        format!("stable.{}", &good["canary.".len()..]),
    ];
    for (proto, client) in clients() {
        for f in &forged {
            let r = client
                .get(s.envoy.url("/"))
                .header("x-user-id", user.as_str())
                .header("x-canary-override", f.as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{proto}");
            assert_eq!(header(&r, "x-canary-variant"), "stable", "{proto} {f:.40}");
            assert!(s.stable.last().await["headers"]
                .get("x-canary-override")
                .is_none());
        }
    }
    let stats = decided(&s.envoy, forged.len() * 2).await;
    assert_eq!(
        stats.get("handoff_canary_override_rejected", &[]),
        (forged.len() * 2) as f64
    );
    assert_eq!(stats.decisions("canary", "override"), 0.0);
    still_serves(&s.envoy).await;
}

/// Forged JWTs never provide the user id: another key, `alg: none`, a tampered payload, a
/// wrong issuer, an expired token, garbage. jwt_authn lets them through without metadata
/// (`allow_missing_or_failed`), so the claim (`u-1`, on the allow list) is never used: the
/// request is anonymous (the fixture mints a cookie), never `allow`.
#[tokio::test]
async fn forged_jwts_never_provide_the_user_id() {
    let s = canary().await;
    let key = b"handoff-demo-jwt-secret-0123456789";
    let hs = r#"{"alg":"HS256","typ":"JWT","kid":"demo"}"#;
    let claims = json!({"iss": "handoff-demo", "sub": "u-1"});
    let valid = jwt(key, hs, &claims);
    let (head, _) = valid.split_once('.').unwrap();
    let tampered_payload =
        URL_SAFE_NO_PAD.encode(json!({"iss": "handoff-demo", "sub": "u-1", "x": 1}).to_string());
    let sig = valid.rsplit('.').next().unwrap();
    let forged = vec![
        jwt(b"attacker-key-attacker-key-0000000", hs, &claims),
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        ),
        format!("{head}.{tampered_payload}.{sig}"),
        jwt(key, hs, &json!({"iss": "someone-else", "sub": "u-1"})),
        jwt(
            key,
            hs,
            &json!({"iss": "handoff-demo", "sub": "u-1", "exp": 1}),
        ),
        "not.a.jwt".to_string(),
        "a".repeat(8 * 1024),
    ];
    for (proto, client) in clients() {
        for f in &forged {
            let r = client
                .get(s.envoy.url("/"))
                .bearer_auth(f)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{proto} {f:.40}");
            assert!(
                header(&r, "set-cookie").starts_with("hf_uid="),
                "{proto}: forged token {f:.40} was taken as an id"
            );
        }
    }
    let stats = decided(&s.envoy, forged.len() * 2).await;
    assert_eq!(stats.decisions("canary", "allow"), 0.0);
    still_serves(&s.envoy).await;
}

// --- translate, idempotency and drain -------------------------------------------------------

/// The translate contract's payments route.
fn translate_config() -> Value {
    // The payments contract mapping, as envoy/translate.yaml ships it.
    support::fixture_plugin_config("translate")
}

/// The idempotency contract's defaults (local store).
fn idempotency_config() -> Value {
    json!({"idempotency": {
        "header": "idempotency-key",
        "aliases": ["x-idempotency-key"],
        "methods": ["POST", "PATCH"],
        "path_prefixes": ["/"],
        "required": true,
        "max_key_length": 255,
        "ttl_s": 86400,
        "lock_timeout_s": 30,
        "scope": [{"header": "x-user-id"}],
        "store": {"type": "local", "max_entries": 10000, "max_response_bytes": 65536},
        "store_5xx": false
    }})
}

/// sha256("s3cret-drain-token")
const DRAIN_TOKEN: &str = "s3cret-drain-token";

fn drain_config() -> Value {
    let hash = hex::encode(<Sha256 as sha2::Digest>::digest(DRAIN_TOKEN.as_bytes()));
    json!({"drain": {
        "admin": {"path": "/.well-known/handoff/drain", "token_sha256": hash},
        "upstream_signal": {"header": "x-drain"},
        "grace_s": 10,
        "reconnect_jitter_ms": 5000,
        "retry_after_s": 1
    }})
}

/// Starts `envoy/<fixture>.yaml` with `config` in front of one v2 app (on 8081 and 8082).
async fn one_app(fixture: &str, config: Value) -> (Envoy, Backend) {
    let app = Backend::start("app", "v2");
    let envoy = Envoy::start(
        EnvoyOpts::new(fixture)
            .versions(&app, &app)
            .plugin_config(config),
    )
    .await;
    (envoy, app)
}

/// `body` POSTed as JSON to the translated v1 route over HTTP/1.1 and HTTP/2: a `status`
/// problem each time, the app never sees it, and Envoy keeps serving.
async fn v1_json_post_is_refused(body: Vec<u8>, status: u16) {
    let (envoy, app) = one_app("translate", translate_config()).await;
    for (_, client) in clients() {
        let r = client
            .post(envoy.url("/api/v1/payments"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        Resp::read(r)
            .await
            .assert_problem(status, "translate-invalid-json");
    }
    assert_eq!(app.requests().await, 0);
    still_serves_path(&envoy, "/api/v2/payments").await;
}

/// A v1 body nested 10,000 levels deep: the JSON parser's depth limit makes it a 400 problem
/// (invalid JSON with a position), never a stack overflow in the VM; the app never sees it.
#[tokio::test]
async fn json_nested_10000_levels_is_a_400_problem() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let body = format!(r#"{{"amount": 1, "customer_id": "c", "x": {deep}}}"#);
    v1_json_post_is_refused(body.into(), 400).await;
}

/// Invalid UTF-8 inside a JSON string: 400 problem, not forwarded.
#[tokio::test]
async fn invalid_utf8_json_is_a_400_problem() {
    let mut body = br#"{"amount": 1, "customer_id": ""#.to_vec();
    body.extend_from_slice(b"\xff\xfe\xc3");
    body.extend_from_slice(br#""}"#);
    v1_json_post_is_refused(body, 400).await;
}

/// A 10 MB body on a route that buffers (translation): 413 problem (over `max_body_bytes`), the
/// app never sees it, the VM survives (its memory stays bounded by the limit).
#[tokio::test]
async fn a_10_mb_body_on_a_translated_route_is_a_413_problem() {
    let (envoy, app) = one_app("translate", translate_config()).await;
    for (_, client) in clients() {
        let r = client
            .post(envoy.url("/api/v1/payments"))
            .header("content-type", "application/json")
            .body(vec![b' '; TEN_MB])
            .send()
            .await;
        // Envoy may close the upload once the answer is sent: accept a 413 or, on HTTP/1.1, a
        // connection closed after it.
        if let Ok(r) = r {
            assert_eq!(r.status(), 413);
        }
    }
    assert_eq!(app.requests().await, 0);
    still_serves_path(&envoy, "/api/v2/payments").await;
}

/// Idempotency keys with control characters or non-ASCII bytes: 400 problem (`invalid_key`),
/// not forwarded. (Raw control characters are refused by Envoy's codec before: 400, no body.)
#[tokio::test]
async fn idempotency_keys_with_control_characters_are_400_problems() {
    let (envoy, app) = one_app("idempotency", idempotency_config()).await;
    for (_, client) in clients() {
        for key in [&b"k\x80ey"[..], b"k ey", b"\"unterminated", b"\xff"] {
            let r = client
                .post(envoy.url("/api/v2/payments"))
                .header(
                    "idempotency-key",
                    reqwest::header::HeaderValue::from_bytes(key).unwrap(),
                )
                .header("content-type", "application/json")
                .body(r#"{"amount": {"value": 1}, "customer": {"id": "c"}}"#)
                .send()
                .await
                .unwrap();
            Resp::read(r)
                .await
                .assert_problem(400, "idempotency-invalid-key");
        }
    }
    let raw = b"POST /api/v2/payments HTTP/1.1\r\nhost: a\r\nidempotency-key: k\x01\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let (status, _, _) = raw_h1(envoy.port(10000), raw).await;
    assert_eq!(status, 400);
    assert_eq!(app.requests().await, 0);
    assert!(app.executions().await.is_empty());
    assert_survived(&envoy).await;
}

/// The drain admin path from a non-loopback peer (set through the PROXY protocol, so the
/// test never leaves loopback; 203.0.113.7 is a documentation address): 403 problem without
/// or with a wrong token, for every method; the drain does not start and the app never sees
/// the admin path.
#[tokio::test]
async fn the_drain_admin_path_refuses_outside_callers() {
    let app = Backend::start("app", "v2");
    let envoy = Envoy::start(
        EnvoyOpts::new("drain")
            .versions(&app, &app)
            .plugin_config(drain_config()),
    )
    .await;
    let path = "/.well-known/handoff/drain";
    for (method, auth) in [
        ("POST", None),
        ("POST", Some("Bearer wrong")),
        ("DELETE", None),
        ("GET", Some("Basic czNjcmV0")),
        ("POST", Some("Bearer ")),
    ] {
        // The fixture's `behind_l4_lb` listener (10001) takes the peer from a PROXY header.
        let mut req = format!(
            "PROXY TCP4 203.0.113.7 127.0.0.1 40000 {} \r\n{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n",
            envoy.port(10001)
        );
        if let Some(a) = auth {
            req.push_str(&format!("authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        let (status, head, body) = raw_h1(envoy.port(10001), req.as_bytes()).await;
        assert_eq!(status, 403, "{method} {auth:?}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("application/problem+json"),
            "{head}"
        );
        let body: Value = serde_json::from_slice(&body).expect("problem body");
        support::assert_problem_body(&body, 403, "drain-admin-forbidden");
    }
    // Still serving, not draining.
    let r = support::h1().get(envoy.url(path)).send().await.unwrap();
    let state: Value = r.json().await.unwrap();
    assert_eq!(state["state"], "serving");
    assert_eq!(app.requests().await, 0, "the admin path reached the app");
    assert_survived(&envoy).await;
}

/// Header values that are not UTF-8 where translate and drain read headers (content-type on a
/// translated route; authorization and x-forwarded-for on the drain admin path): never a VM
/// panic. proxy-wasm's `get_http_request_header` panics on such values (the bug fixed for
/// the canary sources); the glue must read them with `filter::host::request_header`.
#[tokio::test]
async fn non_utf8_header_values_never_crash_translate_or_drain() {
    let hv = |b: &[u8]| reqwest::header::HeaderValue::from_bytes(b).unwrap();
    let (envoy, _app) = one_app("translate", translate_config()).await;
    for (proto, client) in clients() {
        let r = client
            .post(envoy.url("/api/v1/payments"))
            .header("content-type", hv(b"application/json\xff"))
            .body(r#"{"amount": 1, "customer_id": "c"}"#)
            .send()
            .await
            .unwrap();
        // Not a JSON media type: 415 problem, not a crash.
        Resp::read(r)
            .await
            .assert_problem(415, "translate-unsupported-media-type");
        let _ = proto;
    }
    still_serves_path(&envoy, "/api/v2/payments").await;

    let (envoy, _app) = one_app("drain", drain_config()).await;
    for (_, client) in clients() {
        let r = client
            .get(envoy.url("/.well-known/handoff/drain"))
            .header("authorization", hv(b"Bearer \xff\xfe"))
            .header("x-forwarded-for", hv(b"\xff"))
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "{}", r.status());
    }
    still_serves_path(&envoy, "/").await;
}

async fn still_serves_path(envoy: &Envoy, path: &str) {
    for (proto, client) in clients() {
        let r = client
            .get(envoy.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{proto}: Envoy no longer serves: {e}"));
        assert!(r.status().is_success(), "{proto}: {}", r.status());
    }
    assert_survived(envoy).await;
}

/// The stats once the canary's decisions of `n` requests are counted (they are added to Envoy's
/// counters once a tick).
async fn decided(envoy: &Envoy, n: usize) -> Stats {
    envoy
        .stats_when(
            "handoff_canary_decisions",
            "every request's decision counted",
            |st| st.sum("handoff_canary_decisions") >= n as f64,
        )
        .await
}
