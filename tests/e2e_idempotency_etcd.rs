//! Idempotency with the etcd store, end to end: two Envoys (`envoy/idempotency-etcd.yaml`)
//! sharing one real etcd, in front of one `payments` upstream.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use support::etcd::{idempotency_envoy, outcome, two_envoys, Etcd};
use support::{h1, h2, payment, post, Backend, Envoy};

const PAY: &str = "/api/v1/payments";

async fn envoy(backend: &Backend, etcd_port: u16, on_error: &str) -> Envoy {
    idempotency_envoy(backend, etcd_port, on_error, 30).await
}

#[tokio::test]
async fn a_retry_on_another_envoy_is_replayed() {
    let (etcd, backend, a, b) = two_envoys("reject", 30).await;

    let first = post(&h1(), a.url(PAY), Some("cross-1"), &payment(20)).await;
    assert_eq!(first.status, 201);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let first_body = first.body;

    for (envoy, client) in [(&b, h2()), (&a, h1()), (&b, h1())] {
        let r = post(&client, envoy.url(PAY), Some("cross-1"), &payment(20)).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.headers["idempotent-replayed"], "true");
        assert_eq!(r.body, first_body, "byte-identical replay");
    }
    // A different payload under the same key, on the other Envoy.
    let r = post(&h1(), b.url(PAY), Some("cross-1"), &payment(21)).await;
    r.assert_problem(422, "idempotency-mismatch");

    // In flight on A: a duplicate on B is a 409.
    let slow_url = a.url(&format!("{PAY}?delay_ms=1500"));
    let slow = tokio::spawn(async move {
        post(&h1(), slow_url, Some("cross-2"), &payment(1))
            .await
            .status
    });
    support::wait_for(
        "the first request to reach the app",
        std::time::Duration::from_secs(20),
        || async { (backend.executions().await.get("cross-2") == Some(&1)).then_some(()) },
    )
    .await;
    let dup = post(
        &h2(),
        b.url(&format!("{PAY}?delay_ms=1500")),
        Some("cross-2"),
        &payment(1),
    )
    .await;
    assert_eq!(dup.status, 409);
    assert_eq!(slow.await.unwrap(), 201);

    // A 5xx releases the key in etcd: a retry on the other Envoy executes again.
    let r = post(
        &h1(),
        a.url(&format!("{PAY}?status=500")),
        Some("cross-3"),
        &payment(2),
    )
    .await;
    assert_eq!(r.status, 500);
    let r = post(
        &h1(),
        b.url(&format!("{PAY}?status=500")),
        Some("cross-3"),
        &payment(2),
    )
    .await;
    assert_eq!(r.status, 500);

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

/// An HTTP/1.1 client with a `content-length` response is done when the last byte arrives,
/// which can be before Envoy sees the end of the upstream stream. The body is held until etcd
/// stored the record, so a retry sent the moment the response is read is already a replay.
#[tokio::test]
async fn a_retry_sent_as_soon_as_the_response_is_read_is_replayed() {
    let (_etcd, backend, a, b) = two_envoys("reject", 30).await;
    let (to_a, to_b) = (h1(), h1());
    for i in 0..60 {
        let key = format!("quick-{i}");
        let r = post(&to_a, a.url(PAY), Some(&key), &payment(i)).await;
        assert_eq!(r.status, 201);
        let first = r.body;
        let r = post(&to_b, b.url(PAY), Some(&key), &payment(i)).await;
        assert_eq!(r.status, 201, "retry {i} on the other Envoy");
        assert_eq!(r.headers["idempotent-replayed"], "true");
        assert_eq!(r.body, first);
    }
    let executions = backend.executions().await;
    assert!((0..60).all(|i| executions[&format!("quick-{i}")] == 1));
}

#[tokio::test]
async fn with_etcd_down_on_error_decides() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start("payments", "v1");
    let reject = envoy(&backend, etcd.client_port, "reject").await;
    let allow = envoy(&backend, etcd.client_port, "allow").await;
    // Working store first.
    let r = post(&h1(), reject.url(PAY), Some("down-0"), &payment(1)).await;
    assert_eq!(r.status, 201);
    etcd.stop();

    let r = post(&h1(), reject.url(PAY), Some("down-1"), &payment(1)).await;
    r.assert_problem(503, "idempotency-store-unavailable");
    assert!(
        !backend.executions().await.contains_key("down-1"),
        "not forwarded"
    );
    assert_eq!(outcome(&reject, "store_error").await, 1.0);

    for client in [h1(), h2()] {
        let r = post(&client, allow.url(PAY), Some("down-2"), &payment(1)).await;
        assert_eq!(r.status, 201, "forwarded without protection");
        assert!(r.headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(backend.executions().await["down-2"], 2);
    assert_eq!(outcome(&allow, "store_error").await, 2.0);
}

#[tokio::test]
async fn an_abandoned_lock_is_taken_over_through_etcd() {
    let (_etcd, backend, a, b) = two_envoys("reject", 1).await;
    let url_a = a.url(&format!("{PAY}?delay_ms=2500"));
    let slow =
        tokio::spawn(async move { post(&h1(), url_a, Some("stale"), &payment(4)).await.status });
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
                let r = post(&h2(), url, Some("stale"), &payment(4)).await;
                (r.status != 409).then_some(r.status)
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
        Some("stale"),
        &payment(4),
    )
    .await;
    assert_eq!(r.headers["idempotent-replayed"], "true");
    assert_eq!(backend.executions().await["stale"], 2);
}

/// A server Envoy dies (SIGKILL) while its request is still being processed by the
/// app. Its lock stays in etcd: a retry on the other Envoy gets 409 while the lock is younger
/// than `lock_timeout_s`, then takes it over and is forwarded — the app executes the operation
/// a second time (the dead Envoy had already forwarded it and never stored a result).
#[tokio::test]
async fn a_lock_held_by_a_killed_envoy_is_taken_over_after_lock_timeout() {
    const LOCK_TIMEOUT_S: u64 = 2;
    let (etcd, backend, mut a, b) = two_envoys("reject", LOCK_TIMEOUT_S).await;

    let sent = std::time::Instant::now();
    // The app answers after 3 s: A dies long before that. (The query is part of the
    // fingerprint: every retry sends the same one.)
    let slow = format!("{PAY}?delay_ms=3000");
    let url_a = a.url(&slow);
    let doomed = tokio::spawn(async move {
        h1().post(url_a)
            .header("idempotency-key", "dead-envoy")
            .json(&payment(7))
            .send()
            .await
            .map(|r| r.status())
    });
    support::wait_for(
        "the request to reach the app through A",
        std::time::Duration::from_secs(20),
        || async { (backend.executions().await.get("dead-envoy") == Some(&1)).then_some(()) },
    )
    .await;
    assert_eq!(outcome(&a, "first").await, 1.0, "A took the lock in etcd");
    a.stop();
    assert!(
        doomed.await.unwrap().is_err(),
        "A's client loses its connection"
    );
    assert_eq!(etcd.count("/handoff/idem/").await, 1, "the lock outlives A");

    // Retries on B, over both protocols: 409 while the lock is fresh, then one takes it over.
    let url_b = b.url(&slow);
    let mut conflicts = 0;
    let (status, taken_after) = loop {
        let client = if conflicts % 2 == 0 { h1() } else { h2() };
        let r = post(&client, url_b.clone(), Some("dead-envoy"), &payment(7)).await;
        if r.status != 409 {
            break (r.status, sent.elapsed());
        }
        r.assert_problem(409, "idempotency-in-flight");
        conflicts += 1;
        assert!(
            sent.elapsed() < std::time::Duration::from_secs(30),
            "the lock was never taken over"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status, 201, "the takeover is forwarded");
    assert!(conflicts > 0, "a retry right after the crash is a 409");
    assert!(
        taken_after >= std::time::Duration::from_secs(LOCK_TIMEOUT_S),
        "taken over after {taken_after:?}, before lock_timeout_s"
    );
    // What docs/configure/idempotency.md documents: the dead Envoy's forwarded request was executed by the app, and
    // the takeover executes the operation again.
    assert_eq!(backend.executions().await["dead-envoy"], 2);
    assert_eq!(outcome(&b, "in_flight_conflict").await, conflicts as f64);
    assert_eq!(outcome(&b, "first").await, 1.0);
    // The takeover's completion is stored: further retries are replays, never a third run.
    for client in [h1(), h2()] {
        let r = post(&client, b.url(&slow), Some("dead-envoy"), &payment(7)).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.headers["idempotent-replayed"], "true");
    }
    assert_eq!(backend.executions().await["dead-envoy"], 2);
}
