//! Idempotency with the local store, end to end: a real Envoy (two workers sharing the store)
//! running `envoy/idempotency.yaml` in front of the `payments` example, which counts
//! executions per `Idempotency-Key`.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use futures::future::join_all;
use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use std::time::Duration;
use support::{h1, h2, payment, post, send, Backend, Envoy, EnvoyOpts, Resp};

const PAY: &str = "/api/v1/payments";

struct Setup {
    envoy: Envoy,
    backend: Backend,
}

async fn setup(edit: impl FnOnce(&mut Value)) -> Setup {
    let backend = Backend::start("payments", "v1");
    let mut config = support::fixture_plugin_config("idempotency");
    edit(&mut config["idempotency"]);
    let envoy = Envoy::start(
        EnvoyOpts::new("idempotency")
            .upstream(8081, &backend)
            .plugin_config(config),
    )
    .await;
    Setup { envoy, backend }
}

/// A POST with the key `shared`, in the scope of `user`.
async fn post_as(client: &reqwest::Client, url: String, user: &str) -> Resp {
    send(
        client
            .post(url)
            .header("idempotency-key", "shared")
            .header("x-user-id", user)
            .json(&payment(5)),
    )
    .await
}

#[tokio::test]
async fn fifty_concurrent_duplicates_execute_once() {
    let s = setup(|_| {}).await;
    let body = payment(50);
    // Several HTTP/1.1 and HTTP/2 connections (each client is its own pool).
    let clients: Vec<reqwest::Client> = (0..10)
        .map(|i| if i % 2 == 0 { h1() } else { h2() })
        .collect();
    // The upstream takes a moment, so many duplicates arrive while the first is in flight.
    let url = s.envoy.url(&format!("{PAY}?delay_ms=300"));
    let all = join_all((0..50).map(|i| {
        post(
            &clients[i % clients.len()],
            url.clone(),
            Some("concurrent-1"),
            &body,
        )
    }))
    .await;
    assert_eq!(s.backend.executions().await["concurrent-1"], 1);
    let originals: Vec<&Resp> = all
        .iter()
        .filter(|r| r.status == 201 && !r.replayed())
        .collect();
    assert_eq!(originals.len(), 1, "exactly one response is the execution");
    let original = &originals[0].body;
    let (mut conflicts, mut replays) = (0, 0);
    for r in &all {
        match r.status {
            409 => {
                r.assert_problem(409, "idempotency-in-flight");
                conflicts += 1;
            }
            201 if r.replayed() => {
                assert_eq!(&r.body, original, "a replay is byte-identical");
                replays += 1;
            }
            201 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(conflicts + replays, 49);
    // A retry after completion is a replay.
    let again = post(&h1(), url, Some("concurrent-1"), &body).await;
    assert!(again.replayed() && &again.body == original);
    assert_eq!(s.envoy.idempotency_outcome("first").await, 1.0);
    assert_eq!(
        s.envoy.idempotency_outcome("in_flight_conflict").await,
        f64::from(conflicts)
    );
    assert_eq!(
        s.envoy.idempotency_outcome("replayed").await,
        f64::from(replays + 1)
    );
}

#[tokio::test]
async fn retry_is_replayed_mismatch_is_422_and_keys_are_checked() {
    let s = setup(|_| {}).await;
    for (proto, client) in support::clients() {
        let key = format!("seq-{proto}");
        let first = post(&client, s.envoy.url(PAY), Some(&key), &payment(10)).await;
        assert_eq!(first.status, 201, "{proto}");
        assert!(!first.replayed());
        assert!(first.json()["transaction_id"].is_string());
        // Held until its body was complete (the buffer filter after handoff), then unmarked:
        // the app sees the request whole, with its length, and never the hold mark.
        let seen = s.backend.last().await;
        assert!(seen["headers"].get("x-handoff-hold").is_none(), "{seen}");
        assert_eq!(
            seen["headers"]["content-length"],
            seen["body_bytes"].to_string(),
            "{proto}"
        );
        let retry = post(&client, s.envoy.url(PAY), Some(&key), &payment(10)).await;
        assert_eq!(retry.status, 201);
        assert!(retry.replayed(), "{proto}: idempotent-replayed: true");
        assert_eq!(retry.body, first.body, "{proto}: byte-identical");
        assert_eq!(
            retry.headers.get("content-type").unwrap(),
            "application/json"
        );
        assert_eq!(retry.headers.get("x-upstream").unwrap(), "payments");
        // The quoted structured-field form and the alias name the same key.
        let quoted = send(
            client
                .post(s.envoy.url(PAY))
                .header("x-idempotency-key", format!("\"{key}\""))
                .json(&payment(10)),
        )
        .await;
        assert!(quoted.replayed() && quoted.body == first.body, "{proto}");
        // Same key, another payload.
        let other = post(&client, s.envoy.url(PAY), Some(&key), &payment(11)).await;
        other.assert_problem(422, "idempotency-mismatch");
        assert_eq!(s.backend.executions().await[&key], 1, "{proto}");
    }
    // A covered request without a body is decided on its headers alone.
    for (proto, client) in support::clients() {
        let key = format!("empty-{proto}");
        let send_empty = || {
            send(
                client
                    .post(s.envoy.url("/echo"))
                    .header("idempotency-key", &key),
            )
        };
        let first = send_empty().await;
        assert_eq!(first.status, 200, "{proto}");
        let again = send_empty().await;
        assert!(again.replayed() && again.body == first.body, "{proto}");
    }
    // Missing key.
    let r = post(&h1(), s.envoy.url(PAY), None, &payment(1)).await;
    r.assert_problem(400, "idempotency-missing-key");
    // Invalid keys: empty, too long, a space, non-ASCII, bad quoting.
    let long = "k".repeat(256);
    let invalid: Vec<HeaderValue> = vec![
        HeaderValue::from_static("\"\""),
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_static("a b"),
        HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        HeaderValue::from_static("\"unterminated"),
    ];
    for (i, v) in invalid.iter().enumerate() {
        for client in [h1(), h2()] {
            let r = send(
                client
                    .post(s.envoy.url(PAY))
                    .header("idempotency-key", v.clone())
                    .json(&payment(1)),
            )
            .await;
            r.assert_problem(400, "idempotency-invalid-key");
            let _ = i;
        }
    }
    // GET is not covered.
    let r = h1().get(s.envoy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.backend.requests().await,
        2 + 2 + 1,
        "rejected requests never reach the app"
    );
    assert_eq!(s.envoy.idempotency_outcome("missing_key").await, 1.0);
    assert_eq!(s.envoy.idempotency_outcome("invalid_key").await, 10.0);
    assert_eq!(s.envoy.idempotency_outcome("mismatch").await, 2.0);
    assert_eq!(s.envoy.idempotency_outcome("replayed").await, 6.0);
    assert_eq!(s.envoy.idempotency_outcome("first").await, 4.0);
}

#[tokio::test]
async fn scopes_are_isolated() {
    let s = setup(|_| {}).await;
    let c = h1();
    let alice = post_as(&c, s.envoy.url(PAY), "alice").await;
    let bob = post_as(&c, s.envoy.url(PAY), "bob").await;
    assert_eq!((alice.status, bob.status), (201, 201));
    assert!(!alice.replayed() && !bob.replayed(), "two operations");
    assert_ne!(alice.body, bob.body);
    assert_eq!(s.backend.executions().await["shared"], 2);
    // Each caller gets its own result back, never the other's.
    let alice2 = post_as(&c, s.envoy.url(PAY), "alice").await;
    let bob2 = post_as(&c, s.envoy.url(PAY), "bob").await;
    assert!(alice2.replayed() && alice2.body == alice.body);
    assert!(bob2.replayed() && bob2.body == bob.body);
    // No scope at all is a third namespace.
    let anon = post(&c, s.envoy.url(PAY), Some("shared"), &payment(5)).await;
    assert!(!anon.replayed());
    assert_eq!(s.backend.executions().await["shared"], 3);
    // A scope value that is not UTF-8 counts as absent (and never breaks the filter).
    for client in [h1(), h2()] {
        let r = send(
            client
                .post(s.envoy.url(PAY))
                .header("idempotency-key", "shared")
                .header("x-user-id", HeaderValue::from_bytes(&[0xff, b'u']).unwrap())
                .json(&payment(5)),
        )
        .await;
        assert!(
            r.replayed() && r.body == anon.body,
            "the anonymous namespace"
        );
    }
}

#[tokio::test]
async fn a_5xx_releases_the_key_and_a_retry_executes_again() {
    let s = setup(|_| {}).await;
    let c = h2();
    let url = s.envoy.url(&format!("{PAY}?status=500"));
    let r = post(&c, url.clone(), Some("fails"), &payment(7)).await;
    assert_eq!(r.status, 500);
    let r = post(&c, url, Some("fails"), &payment(7)).await;
    assert_eq!(r.status, 500);
    assert!(!r.replayed());
    assert_eq!(s.backend.executions().await["fails"], 2);
    // An upstream reset mid-body releases the key too: once the first attempt's stream is
    // over, a retry executes again.
    let url = s.envoy.url(&format!("{PAY}?reset=1"));
    if let Ok(r) = h1()
        .post(url.clone())
        .header("idempotency-key", "resets")
        .json(&payment(7))
        .send()
        .await
    {
        assert!(r.bytes().await.is_err(), "the body is cut short");
    }
    support::wait_for(
        "a retry after the reset to be forwarded",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let r = h1()
                    .post(url)
                    .header("idempotency-key", "resets")
                    .json(&payment(7))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 409 => None,
                    _ => Some(()),
                }
            }
        },
    )
    .await;
    assert_eq!(s.backend.executions().await["resets"], 2);
    assert_eq!(s.envoy.idempotency_outcome("first").await, 4.0);
}

#[tokio::test]
async fn an_abandoned_lock_times_out() {
    let s = setup(|c| c["lock_timeout_s"] = json!(1)).await;
    let url = s.envoy.url(&format!("{PAY}?delay_ms=2500"));
    let slow = tokio::spawn({
        let url = url.clone();
        async move { post(&h1(), url, Some("slow"), &payment(3)).await }
    });
    support::wait_for(
        "the first request to reach the app",
        Duration::from_secs(20),
        || async { (s.backend.executions().await.get("slow") == Some(&1)).then_some(()) },
    )
    .await;
    // While the first request holds the lock, retries are 409; once the lock is older than
    // lock_timeout_s a retry takes it over and is forwarded.
    let taken_over = support::wait_for(
        "a retry past the lock timeout",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                let r = post(&h2(), url, Some("slow"), &payment(3)).await;
                match r.status {
                    409 => {
                        r.assert_problem(409, "idempotency-in-flight");
                        None
                    }
                    _ => Some(r),
                }
            }
        },
    )
    .await;
    assert_eq!(taken_over.status, 201);
    assert!(!taken_over.replayed());
    let first = slow.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(s.backend.executions().await["slow"], 2);
    assert!(s.envoy.idempotency_outcome("in_flight_conflict").await >= 1.0);
}

#[tokio::test]
async fn an_oversized_response_is_never_executed_twice() {
    let s = setup(|c| c["store"]["max_response_bytes"] = json!(64)).await;
    let c = h1();
    let first = post(&c, s.envoy.url(PAY), Some("big"), &payment(9)).await;
    assert_eq!(first.status, 201);
    assert!(first.body.len() > 64);
    for client in [h1(), h2()] {
        let dup = post(&client, s.envoy.url(PAY), Some("big"), &payment(9)).await;
        dup.assert_problem(409, "idempotency-not-replayable");
    }
    assert_eq!(s.backend.executions().await["big"], 1);
    assert_eq!(s.envoy.idempotency_outcome("not_replayable").await, 2.0);
}

#[tokio::test]
async fn a_full_store_follows_when_full() {
    // One slot: the second live key finds the store full.
    let s = setup(|c| c["store"]["max_entries"] = json!(1)).await;
    let c = h1();
    assert_eq!(
        post(&c, s.envoy.url(PAY), Some("k1"), &payment(1))
            .await
            .status,
        201
    );
    let r = post(&c, s.envoy.url(PAY), Some("k2"), &payment(1)).await;
    assert_eq!(r.status, 201, "accept_unprotected forwards");
    let r = post(&c, s.envoy.url(PAY), Some("k2"), &payment(1)).await;
    assert!(!r.replayed(), "unprotected: executed again");
    assert_eq!(s.backend.executions().await["k2"], 2);
    assert_eq!(s.envoy.idempotency_outcome("evicted").await, 2.0);
    let stats = s.envoy.stats().await;
    assert_eq!(stats.sum("handoff_idempotency_local_slots_used"), 1.0);
    drop(s);

    let s = setup(|c| {
        c["store"]["max_entries"] = json!(1);
        c["store"]["when_full"] = json!("reject");
    })
    .await;
    assert_eq!(
        post(&c, s.envoy.url(PAY), Some("k1"), &payment(1))
            .await
            .status,
        201
    );
    let r = post(&c, s.envoy.url(PAY), Some("k2"), &payment(1)).await;
    r.assert_problem(503, "idempotency-store-full");
    assert!(!s.backend.executions().await.contains_key("k2"));
}

#[tokio::test]
async fn an_invalid_section_is_refused_with_its_path() {
    let mut config = support::fixture_plugin_config("idempotency");
    config["idempotency"]["lock_timeout_s"] = json!(0);
    let log =
        Envoy::start_expecting_failure(EnvoyOpts::new("idempotency").plugin_config(config)).await;
    assert!(
        log.contains("invalid configuration at `idempotency.lock_timeout_s`"),
        "{log}"
    );
}
