//! Drain, end to end: a real Envoy running handoff.wasm with `envoy/drain.yaml` in front of a
//! `payments` instance. GOAWAY and `connection: close` are observed on the client side (curl's
//! HTTP/2 trace, a raw TCP connection); the non-loopback admin caller comes through the fixture's
//! PROXY-protocol listener, claiming 203.0.113.7 (a documentation address no test ever contacts).
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;
use support::drain::{admin, drain_config, drain_config_no_readiness, state, ADMIN};
use support::{clients, h1, h2, wait_for, Backend, Envoy, EnvoyOpts};

const HINT: &str = "x-handoff-reconnect-after-ms";
const TOKEN: &str = "s3cret-drain-token";
const WAIT: Duration = Duration::from_secs(20);

async fn start(backend: &Backend, concurrency: u32, config: Value) -> Envoy {
    let mut opts = EnvoyOpts::new("drain")
        .upstream(8081, backend)
        .plugin_config(config);
    opts.concurrency = concurrency;
    Envoy::start(opts).await
}

async fn wait_state(envoy: &Envoy, want: &str) -> Value {
    wait_for(&format!("state {want}"), WAIT, || async {
        let s = state(envoy).await;
        (s["state"] == want).then_some(s)
    })
    .await
}

/// A response read off a raw HTTP/1.1 connection.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 connection, byte for byte: what Envoy does to the connection itself is visible.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    fn connect(port: u16) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// A connection to the PROXY-protocol listener that claims to come from `ip`.
    fn proxied(port: u16, ip: &str) -> RawConn {
        let mut c = RawConn::connect(port);
        let header = format!("PROXY TCP4 {ip} 127.0.0.1 5555 10001\r\n");
        c.stream.write_all(header.as_bytes()).unwrap();
        c
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: app\r\ncontent-length: 0\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).expect("send");
        self.read_response()
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    fn read_response(&mut self) -> RawResponse {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(self.fill() > 0, "connection closed before a response");
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .expect("a content-length response");
        while self.buf.len() < len {
            assert!(self.fill() > 0, "connection closed inside a body");
        }
        let body = String::from_utf8_lossy(&self.buf[..len]).to_string();
        self.buf.drain(..len);
        RawResponse {
            status,
            headers,
            body,
        }
    }

    /// True when the peer closed the connection (EOF or reset) rather than sending more.
    fn is_closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }
}

/// Two requests on one HTTP/1.1 connection: both answered, no `connection: close`.
fn keep_alive_works(port: u16) -> bool {
    let mut c = RawConn::connect(port);
    for _ in 0..2 {
        let r = c.request("GET", "/hello", &[]);
        if r.status != 200 || r.header("connection") == Some("close") {
            return false;
        }
    }
    true
}

/// One HTTP/1.1 request on a fresh connection: `connection: close`, then the connection closes.
fn closes_connection(port: u16) -> bool {
    let mut c = RawConn::connect(port);
    let r = c.request("GET", "/hello", &[]);
    assert_eq!(r.status, 200);
    r.header("connection") == Some("close") && c.is_closed_by_peer()
}

/// curl's HTTP/2 (prior knowledge) trace of one request.
fn curl_h2_trace(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sv", "--http2-prior-knowledge", "-o", "/dev/null", url])
        .output()
        .expect("curl is installed (make setup)");
    assert!(out.status.success(), "curl failed: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test]
async fn admin_drain_sends_goaway_and_connection_close_and_delete_restores_keep_alive() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        2,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    let port = envoy.port(10000);
    assert_eq!(state(&envoy).await["state"], "serving");
    assert!(keep_alive_works(port));
    let trace = curl_h2_trace(&envoy.url("/hello"));
    assert!(!trace.contains("GOAWAY"), "{trace}");

    let s = admin(&envoy, reqwest::Method::POST, "").await;
    assert_eq!(s["state"], "draining");
    assert!(s["since"].as_u64().unwrap() > 1_700_000_000_000);

    // Envoy's own drain: GOAWAY on HTTP/2, `connection: close` and a closed socket on HTTP/1.1.
    let trace = curl_h2_trace(&envoy.url("/hello"));
    assert!(
        trace.contains("GOAWAY"),
        "no GOAWAY in curl's trace:\n{trace}"
    );
    assert!(closes_connection(port));
    // Every worker learns the drain: eventually every response carries the hint.
    wait_for("all workers hinting", WAIT, || async {
        for _ in 0..20 {
            let r = h1().get(envoy.url("/hello")).send().await.unwrap();
            r.headers().get(HINT)?;
        }
        Some(())
    })
    .await;

    let s = admin(&envoy, reqwest::Method::DELETE, "").await;
    assert_eq!(s["state"], "serving");
    assert!(keep_alive_works(port), "keep-alive is back after DELETE");
    let trace = curl_h2_trace(&envoy.url("/hello"));
    assert!(!trace.contains("GOAWAY"), "{trace}");

    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("handoff_drain_started", &[("source", "admin")]),
        1.0
    );
    // The admin path never reached the app.
    assert!(app.last().await["path"] != ADMIN);
}

#[tokio::test]
async fn readiness_failing_starts_the_drain_and_recovery_cancels_it() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        2,
        drain_config(|d| {
            d["readiness"]["interval_ms"] = json!(100);
            d["readiness"]["failure_threshold"] = json!(2);
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    let port = envoy.port(10000);
    assert_eq!(state(&envoy).await["state"], "serving");

    app.set_ready_status(503).await;
    wait_state(&envoy, "draining").await;
    assert!(closes_connection(port));
    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("handoff_drain_started", &[("source", "readiness")]),
        1.0
    );
    wait_for("state gauge 1", WAIT, || async {
        (envoy.stats().await.get("handoff_drain_state", &[]) == 1.0).then_some(())
    })
    .await;

    app.set_ready_status(200).await;
    wait_state(&envoy, "serving").await;
    wait_for("keep-alive restored", WAIT, || async {
        keep_alive_works(port).then_some(())
    })
    .await;
    wait_for("state gauge 0", WAIT, || async {
        (envoy.stats().await.get("handoff_drain_state", &[]) == 0.0).then_some(())
    })
    .await;

    // A ready app does not cancel a drain someone else started: after several successful
    // polls (counted by the app itself), the admin's drain is still on.
    admin(&envoy, reqwest::Method::POST, "").await;
    let polls = app.requests().await;
    wait_for("5 more readiness polls", WAIT, || async {
        (app.requests().await >= polls + 5).then_some(())
    })
    .await;
    assert_eq!(state(&envoy).await["state"], "draining");
}

#[tokio::test]
async fn an_upstream_signal_starts_the_drain() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        2,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    app.set_drain_signal(true).await;
    let r = h1().get(envoy.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The signalling response itself is already hinted.
    assert!(r.headers().get(HINT).is_some());
    let s = wait_state(&envoy, "draining").await;
    assert!(s["since"].as_u64().is_some());
    assert!(closes_connection(envoy.port(10000)));
    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("handoff_drain_started", &[("source", "upstream_signal")]),
        1.0
    );
}

#[tokio::test]
async fn reconnect_hints_spread_over_the_jitter_range() {
    let app = Backend::start("app", "v1");
    let jitter = 1000u32;
    let envoy = start(
        &app,
        1,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
            d["reconnect_jitter_ms"] = json!(jitter);
        }),
    )
    .await;
    let r = h1().get(envoy.url("/hello")).send().await.unwrap();
    assert!(r.headers().get(HINT).is_none(), "no hint while serving");
    admin(&envoy, reqwest::Method::POST, "").await;
    let client = h2();
    let mut hints = Vec::new();
    for _ in 0..200 {
        let r = client.get(envoy.url("/hello")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: u32 = r
            .headers()
            .get(HINT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("every response while draining carries the hint");
        hints.push(v);
    }
    hints.sort();
    let q = |p: usize| hints[p * (hints.len() - 1) / 100];
    // Uniform over [0, 1000]: generous bounds (each fails with probability < 1e-6).
    assert!(*hints.last().unwrap() <= jitter);
    assert!(q(0) < 100, "min {}", q(0));
    assert!(q(100) > 900, "max {}", q(100));
    assert!((100..=400).contains(&q(25)), "q1 {}", q(25));
    assert!((350..=650).contains(&q(50)), "median {}", q(50));
    assert!((600..=900).contains(&q(75)), "q3 {}", q(75));
    let mut distinct = hints.clone();
    distinct.dedup();
    assert!(distinct.len() > 100, "{} distinct values", distinct.len());
    assert!(envoy.stats().await.get("handoff_drain_hinted", &[]) >= 200.0);
}

#[tokio::test]
async fn after_the_grace_new_requests_get_503_and_never_reach_the_app() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        1,
        drain_config_no_readiness(|d| {
            d["retry_after_s"] = json!(2);
        }),
    )
    .await;
    // A slow request in flight before the drain finishes normally.
    let slow = tokio::spawn({
        let url = envoy.url("/slow?delay_ms=3000");
        async move { h1().get(url).send().await.map(|r| r.status().as_u16()) }
    });
    wait_for("the slow request in flight", WAIT, || async {
        (state(&envoy).await["inflight"] == 1).then_some(())
    })
    .await;
    // Counted by the app too (Envoy counts it first: on a loaded machine the app may see it
    // later, which would look like one of the refused requests).
    wait_for("the app saw the slow request", WAIT, || async {
        (app.requests().await == 1).then_some(())
    })
    .await;

    let s = admin(&envoy, reqwest::Method::POST, "?grace_s=0").await;
    assert_eq!(s["state"], "drained");
    let before = app.requests().await;
    for (proto, client) in support::clients() {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let r = client
                .request(method.clone(), envoy.url("/api/v1/payments"))
                .body(if method == reqwest::Method::POST {
                    r#"{"amount": 1}"#
                } else {
                    ""
                })
                .send()
                .await
                .unwrap();
            let r = support::Resp::read(r).await;
            r.assert_problem(503, "drain-drained");
            assert_eq!(r.header("retry-after"), Some("2"), "{proto} {method}");
        }
    }
    assert_eq!(app.requests().await, before, "the app saw none of them");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "in-flight request finished"
    );
    assert_eq!(app.requests().await, before, "still none");
    assert_eq!(envoy.stats().await.get("handoff_drain_rejected", &[]), 4.0);
}

#[tokio::test]
async fn an_event_stream_gets_one_reconnect_event_between_whole_events() {
    let app = Backend::start("app", "v1");
    let jitter = 5000u32;
    let envoy = start(
        &app,
        1,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
            d["reconnect_jitter_ms"] = json!(jitter);
        }),
    )
    .await;
    for (proto, client) in support::clients() {
        // Each protocol starts from serving.
        assert_eq!(
            admin(&envoy, reqwest::Method::DELETE, "").await["state"],
            "serving"
        );
        let n = 60;
        let mut r = client
            .get(envoy.url(&format!("/events?n={n}&interval_ms=50")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get(HINT).is_none());
        let mut text = String::new();
        while !text.contains("\"n\": 2}") {
            let chunk = r.chunk().await.unwrap().expect("stream still open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        admin(&envoy, reqwest::Method::POST, "").await;
        while let Some(chunk) = r.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.ends_with("\n\n"), "{proto}: {text:?}");
        let events: Vec<&str> = text.trim_end_matches("\n\n").split("\n\n").collect();
        let mut ticks = 0;
        let mut reconnects = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if let Some(data) = ev.strip_prefix("event: reconnect\ndata: ") {
                let v: Value = serde_json::from_str(data).expect("reconnect data is JSON");
                reconnects.push((i, v["after_ms"].as_u64().unwrap()));
            } else {
                assert_eq!(
                    *ev,
                    format!("event: tick\ndata: {{\"n\": {ticks}}}"),
                    "{proto}: event {i} is whole and in order"
                );
                ticks += 1;
            }
        }
        assert_eq!(ticks, n, "{proto}: every original event arrived");
        assert_eq!(reconnects.len(), 1, "{proto}: {text}");
        assert!(reconnects[0].0 >= 3, "{proto}: after the drain started");
        assert!(reconnects[0].1 <= u64::from(jitter));
    }
}

#[tokio::test]
async fn inflight_counts_slow_requests_across_workers() {
    let app = Backend::start("app", "v1");
    let envoy = start(&app, 2, drain_config_no_readiness(|_| {})).await;
    assert_eq!(state(&envoy).await["inflight"], 0);
    let n = 4;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            // A client each, so the requests spread over connections (and workers).
            let url = envoy.url(&format!("/slow/{i}?delay_ms=4000"));
            let client = if i % 2 == 0 { h1() } else { h2() };
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    wait_for("inflight = 4", WAIT, || async {
        (state(&envoy).await["inflight"] == n).then_some(())
    })
    .await;
    wait_for("inflight gauge = 4", WAIT, || async {
        (envoy.stats().await.get("handoff_drain_inflight", &[]) == f64::from(n)).then_some(())
    })
    .await;
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    wait_for("inflight = 0", WAIT, || async {
        (state(&envoy).await["inflight"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_admin_path_needs_loopback_or_the_token() {
    let app = Backend::start("app", "v1");
    let hash = hex::encode(Sha256::digest(TOKEN.as_bytes()));
    let envoy = start(
        &app,
        1,
        drain_config_no_readiness(|d| {
            d["admin"]["token_sha256"] = json!(hash);
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    let proxied = envoy.port(10001);
    let remote = "203.0.113.7";
    // The proxy-protocol listener works: an ordinary request from the claimed peer passes.
    let r = RawConn::proxied(proxied, remote).request("GET", "/hello", &[]);
    assert_eq!(r.status, 200);

    for auth in [None, Some("Bearer wrong-token"), Some("Basic czNjcmV0")] {
        for method in ["GET", "POST", "DELETE"] {
            let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
            let r = RawConn::proxied(proxied, remote).request(method, ADMIN, &headers);
            assert_eq!(r.status, 403, "{method} with {auth:?}");
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
        }
    }
    // A client cannot pass for a loopback peer by claiming one in a header (Envoy derives
    // `source.address` from x-forwarded-for unless use_remote_address is set).
    for spoof in ["127.0.0.1", "::1", "127.0.0.1, 127.0.0.1"] {
        let r = RawConn::proxied(proxied, remote).request(
            "POST",
            ADMIN,
            &[("x-forwarded-for", spoof), ("x-real-ip", "127.0.0.1")],
        );
        assert_eq!(r.status, 403, "x-forwarded-for: {spoof}");
    }
    // The same header from a real loopback peer is refused too (it cannot be told apart).
    let r = RawConn::connect(envoy.port(10000)).request(
        "GET",
        ADMIN,
        &[("x-forwarded-for", "127.0.0.1")],
    );
    assert_eq!(r.status, 403);
    assert_eq!(state(&envoy).await["state"], "serving", "nothing changed");

    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let r = RawConn::proxied(proxied, remote).request("POST", ADMIN, &auth);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["state"], "draining");
    let r = RawConn::proxied(proxied, remote).request("GET", ADMIN, &auth);
    assert_eq!(r.status, 200);
    // Loopback needs no token.
    assert_eq!(state(&envoy).await["state"], "draining");
    // Only the one ordinary request reached the app, never the admin path.
    assert_eq!(app.requests().await, 1);
}

/// Runs `istio/prestop-drain.sh` against this Envoy's admin path with a deadline and a poll
/// interval (seconds).
async fn prestop(envoy: &Envoy, deadline_s: &'static str, poll_s: &'static str) -> Output {
    let script = support::root().join("istio/prestop-drain.sh");
    let admin_url = envoy.url(ADMIN);
    tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg(script)
            .args(["-u", &admin_url, "-d", deadline_s, "-i", poll_s])
            .output()
            .expect("sh")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn prestop_script_starts_the_drain_and_waits_for_inflight_requests() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        2,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let url = envoy.url(&format!("/slow/{i}?delay_ms=3000"));
            tokio::spawn(async move { h1().get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    wait_for("3 in flight", WAIT, || async {
        (state(&envoy).await["inflight"] == 3).then_some(())
    })
    .await;
    let out = prestop(&envoy, "60", "0.1").await;
    let (code, log) = (out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("drain started"), "{log}");
    let s = state(&envoy).await;
    assert_eq!(
        (s["state"].as_str(), s["inflight"].as_u64()),
        (Some("draining"), Some(0))
    );
    for t in slow {
        assert_eq!(
            t.await.unwrap().unwrap(),
            200,
            "in-flight requests finished"
        );
    }
}

#[tokio::test]
async fn prestop_script_gives_up_at_its_deadline() {
    let app = Backend::start("app", "v1");
    let envoy = start(&app, 1, drain_config_no_readiness(|_| {})).await;
    let url = envoy.url("/stuck?delay_ms=30000");
    let _stuck = tokio::spawn(async move { h1().get(url).send().await.is_ok() });
    wait_for("1 in flight", WAIT, || async {
        (state(&envoy).await["inflight"] == 1).then_some(())
    })
    .await;
    let out = prestop(&envoy, "1", "0.2").await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("deadline"), "{log}");
}

#[tokio::test]
async fn a_drain_section_without_a_trigger_is_refused() {
    let app = Backend::start("app", "v1");
    let log = Envoy::start_expecting_failure(
        EnvoyOpts::new("drain")
            .upstream(8081, &app)
            .plugin_config(json!({"drain": {"envoy_admin": {"cluster": "envoy_admin"}}})),
    )
    .await;
    assert!(
        log.contains("invalid configuration at `drain`: expected at least one trigger"),
        "{log}"
    );
}

#[tokio::test]
async fn an_admin_post_takes_the_grace_from_its_json_body_and_never_reaches_the_app() {
    let app = Backend::start("app", "v1");
    let envoy = start(
        &app,
        2,
        drain_config_no_readiness(|d| {
            d["grace_s"] = json!(600);
        }),
    )
    .await;
    for (proto, client) in clients() {
        // A body that is not the contract's shape is refused, and the drain does not start.
        let r = client
            .post(envoy.url(ADMIN))
            .header("content-type", "application/json")
            .body(r#"{"grace": 0}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{proto}");
        assert_eq!(state(&envoy).await["state"], "serving", "{proto}");
        // {"grace_s": 0} overrides the configured 600 s: drained at once.
        let r = client
            .post(envoy.url(ADMIN))
            .header("content-type", "application/json")
            .body(r#"{"grace_s": 0}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["state"], "drained", "{proto}: {v}");
        let r = client.delete(envoy.url(ADMIN)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{proto}");
    }
    assert_eq!(app.requests().await, 0, "the admin path reached the app");
}
