//! Idempotency with the etcd store, end to end: two Envoys (`envoy/idempotency-etcd.yaml`)
//! sharing one real etcd, in front of one `payments` upstream.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use support::etcd::Etcd;
use support::{h1, h2, Backend, Envoy, EnvoyOpts};

const PAY: &str = "/api/v1/payments";

async fn envoy(backend: &Backend, etcd_port: u16, on_error: &str) -> Envoy {
    envoy_with(backend, etcd_port, on_error, 30).await
}

async fn envoy_with(
    backend: &Backend,
    etcd_port: u16,
    on_error: &str,
    lock_timeout_s: u64,
) -> Envoy {
    let mut config = support::fixture_plugin_config("idempotency-etcd");
    config["idempotency"]["store"]["on_error"] = json!(on_error);
    config["idempotency"]["lock_timeout_s"] = json!(lock_timeout_s);
    // Generous for a loaded CI machine; the fixture's 250 ms is the production default.
    config["idempotency"]["store"]["timeout_ms"] = json!(2000);
    Envoy::start(
        EnvoyOpts::new("idempotency-etcd")
            .upstream(8081, backend)
            .port(2379, etcd_port)
            .plugin_config(config),
    )
    .await
}

fn payment(amount: u64) -> Value {
    json!({"amount": amount, "currency": "EUR", "customer_id": "c-9"})
}

async fn post(client: &reqwest::Client, url: String, key: &str, body: &Value) -> reqwest::Response {
    client
        .post(url)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("request through Envoy")
}

async fn outcome(envoy: &Envoy, name: &str) -> f64 {
    envoy
        .stats()
        .await
        .get("handoff_idempotency_outcomes", &[("outcome", name)])
}

#[tokio::test]
async fn a_retry_on_another_envoy_is_replayed() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("payments", "v1");
    let a = envoy(&backend, etcd.client_port, "reject").await;
    let b = envoy(&backend, etcd.client_port, "reject").await;

    let first = post(&h1(), a.url(PAY), "cross-1", &payment(20)).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.bytes().await.unwrap();

    for (envoy, client) in [(&b, h2()), (&a, h1()), (&b, h1())] {
        let r = post(&client, envoy.url(PAY), "cross-1", &payment(20)).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(
            r.bytes().await.unwrap(),
            first_body,
            "byte-identical replay"
        );
    }
    // A different payload under the same key, on the other Envoy.
    let r = post(&h1(), b.url(PAY), "cross-1", &payment(21)).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // In flight on A: a duplicate on B is a 409.
    let slow_url = a.url(&format!("{PAY}?delay_ms=1500"));
    let slow =
        tokio::spawn(async move { post(&h1(), slow_url, "cross-2", &payment(1)).await.status() });
    support::wait_for(
        "the first request to reach the app",
        std::time::Duration::from_secs(20),
        || async { (backend.executions().await.get("cross-2") == Some(&1)).then_some(()) },
    )
    .await;
    let dup = post(
        &h2(),
        b.url(&format!("{PAY}?delay_ms=1500")),
        "cross-2",
        &payment(1),
    )
    .await;
    assert_eq!(dup.status(), 409);
    assert_eq!(slow.await.unwrap(), 201);

    // A 5xx releases the key in etcd: a retry on the other Envoy executes again.
    let r = post(
        &h1(),
        a.url(&format!("{PAY}?status=500")),
        "cross-3",
        &payment(2),
    )
    .await;
    assert_eq!(r.status(), 500);
    let r = post(
        &h1(),
        b.url(&format!("{PAY}?status=500")),
        "cross-3",
        &payment(2),
    )
    .await;
    assert_eq!(r.status(), 500);

    let executions = backend.executions().await;
    assert_eq!(executions["cross-1"], 1);
    assert_eq!(executions["cross-2"], 1);
    assert_eq!(executions["cross-3"], 2);
    assert_eq!(outcome(&a, "first").await + outcome(&b, "first").await, 4.0);
    assert_eq!(
        outcome(&a, "replayed").await + outcome(&b, "replayed").await,
        3.0
    );
    assert_eq!(outcome(&b, "in_flight_conflict").await, 1.0);
    assert_eq!(outcome(&b, "mismatch").await, 1.0);
    // Records live under the prefix: cross-1 and cross-2 (cross-3 was released).
    assert_eq!(etcd.count("/handoff/idem/").await, 2);
}

#[tokio::test]
async fn with_etcd_down_on_error_decides() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start("payments", "v1");
    let reject = envoy(&backend, etcd.client_port, "reject").await;
    let allow = envoy(&backend, etcd.client_port, "allow").await;
    // Working store first.
    let r = post(&h1(), reject.url(PAY), "down-0", &payment(1)).await;
    assert_eq!(r.status(), 201);
    etcd.stop();

    let r = post(&h1(), reject.url(PAY), "down-1", &payment(1)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    assert!(v["type"]
        .as_str()
        .unwrap()
        .ends_with("#idempotency-store-unavailable"));
    assert!(
        !backend.executions().await.contains_key("down-1"),
        "not forwarded"
    );
    assert_eq!(outcome(&reject, "store_error").await, 1.0);

    for client in [h1(), h2()] {
        let r = post(&client, allow.url(PAY), "down-2", &payment(1)).await;
        assert_eq!(r.status(), 201, "forwarded without protection");
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(backend.executions().await["down-2"], 2);
    assert_eq!(outcome(&allow, "store_error").await, 2.0);
}

#[tokio::test]
async fn an_abandoned_lock_is_taken_over_through_etcd() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("payments", "v1");
    let a = envoy_with(&backend, etcd.client_port, "reject", 1).await;
    let b = envoy_with(&backend, etcd.client_port, "reject", 1).await;
    let url_a = a.url(&format!("{PAY}?delay_ms=2500"));
    let slow = tokio::spawn(async move { post(&h1(), url_a, "stale", &payment(4)).await.status() });
    support::wait_for(
        "the first request to reach the app",
        std::time::Duration::from_secs(20),
        || async { (backend.executions().await.get("stale") == Some(&1)).then_some(()) },
    )
    .await;
    // Retries on the other Envoy: 409 while the lock is fresh, then one takes it over.
    let url_b = b.url(&format!("{PAY}?delay_ms=2500"));
    let status = support::wait_for(
        "a retry past the lock timeout",
        std::time::Duration::from_secs(30),
        || {
            let url = url_b.clone();
            async move {
                let r = post(&h2(), url, "stale", &payment(4)).await;
                (r.status() != 409).then_some(r.status())
            }
        },
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(slow.await.unwrap(), 201);
    assert_eq!(backend.executions().await["stale"], 2);
    // The taker's completion is the stored one; the first request's late completion lost
    // its lock and changed nothing.
    let r = post(
        &h1(),
        a.url(&format!("{PAY}?delay_ms=2500")),
        "stale",
        &payment(4),
    )
    .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(backend.executions().await["stale"], 2);
}
