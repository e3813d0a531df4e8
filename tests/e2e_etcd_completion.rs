//! etcd fails after the app answered: the completion must not be lost. Two Envoys
//! (`envoy/idempotency-etcd.yaml`) share one real etcd in front of one `payments` upstream.
//! etcd is frozen (SIGSTOP: callouts time out) or killed (SIGKILL: refused) while a request
//! is at the app, so the Envoy that forwarded it cannot store its response. The client still
//! gets its answer; the completion is queued and retried; while etcd is down a retry gets
//! `on_error`'s 503, never a second execution; once etcd is back (within `lock_timeout_s`)
//! the queued completion is stored and a retry through the other Envoy is a replay.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::etcd::{
    idempotency_config, idempotency_envoy, idempotency_opts, outcome, two_envoys, Etcd,
};
use support::lds::{Lds, Push};
use support::{h1, h2, Backend, Envoy};

const PAY: &str = "/api/v1/payments";
/// Long enough for the whole scenario on a loaded machine: the test's etcd timeout is 2 s,
/// so queued writes are retried until 2 s + 20 s / 4 = 7 s before the lock expires.
const LOCK_TIMEOUT_S: u64 = 20;

fn payment(amount: u64) -> Value {
    json!({"amount": amount, "currency": "EUR", "customer_id": "c-completion"})
}

async fn post(client: &reqwest::Client, url: String, key: &str) -> reqwest::Response {
    client
        .post(url)
        .header("idempotency-key", key)
        .json(&payment(5))
        .send()
        .await
        .expect("request through Envoy")
}

async fn retries(envoy: &Envoy, outcome: &str) -> f64 {
    envoy
        .stats()
        .await
        .get("handoff_idempotency_retries", &[("outcome", outcome)])
}

async fn problem_type(r: reqwest::Response) -> String {
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    v["type"].as_str().unwrap_or_default().to_string()
}

/// Sends `key` to `envoy` with the app answering after `delay_ms` (and `extra` query), and
/// waits until the app has it.
async fn at_the_app(
    backend: &Backend,
    envoy: &Envoy,
    key: &'static str,
    query: &str,
) -> tokio::task::JoinHandle<(u16, bool)> {
    let url = envoy.url(&format!("{PAY}?{query}"));
    let first = tokio::spawn(async move {
        let r = post(&h1(), url, key).await;
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (r.status().as_u16(), replayed)
    });
    support::wait_for(
        "the request at the app",
        Duration::from_secs(20),
        || async { (backend.executions().await.get(key) == Some(&1)).then_some(()) },
    )
    .await;
    first
}

/// While etcd is down: retries on both Envoys are refused, never forwarded.
async fn retries_while_down_are_refused(
    backend: &Backend,
    envoys: [&Envoy; 2],
    key: &str,
    query: &str,
) {
    for (envoy, client) in [(envoys[1], h2()), (envoys[0], h1())] {
        let r = post(&client, envoy.url(&format!("{PAY}?{query}")), key).await;
        assert_eq!(r.status(), 503, "on_error reject while etcd is down");
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(problem_type(r)
            .await
            .ends_with("#idempotency-store-unavailable"));
    }
    assert_eq!(
        backend.executions().await[key],
        1,
        "never a second execution"
    );
}

/// Waits until `envoy` stored `n` queued writes.
async fn stored(envoy: &Envoy, n: f64) {
    support::wait_for(
        "the queued writes to be stored",
        Duration::from_secs(30),
        || async { (retries(envoy, "stored").await >= n).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_completion_etcd_missed_while_frozen_is_stored_when_it_thaws() {
    let (etcd, backend, a, b) = two_envoys("reject", LOCK_TIMEOUT_S).await;
    // Warm: both Envoys hold a lease, so the frozen etcd is met by lock transactions too.
    for (i, e) in [&a, &b].into_iter().enumerate() {
        let r = post(&h1(), e.url(PAY), ["warm-a", "warm-b"][i]).await;
        assert_eq!(r.status(), 201);
    }
    let started = Instant::now();
    let paid = at_the_app(&backend, &a, "frozen-1", "delay_ms=1500").await;
    // The same with a 500: its release must not wait for lock_timeout_s either.
    let failed = at_the_app(&backend, &a, "frozen-500", "delay_ms=1500&status=500").await;
    etcd.freeze();

    // The client gets the app's answer, although etcd took nothing.
    assert_eq!(paid.await.unwrap(), (201, false));
    assert_eq!(failed.await.unwrap(), (500, false));

    retries_while_down_are_refused(&backend, [&a, &b], "frozen-1", "delay_ms=1500").await;

    assert!(
        a.log()
            .contains("etcd did not take a queued completion/release"),
        "the warn line"
    );
    etcd.thaw();
    stored(&a, 2.0).await;
    assert!(
        started.elapsed() < Duration::from_secs(LOCK_TIMEOUT_S),
        "stored within lock_timeout_s"
    );
    assert_eq!(
        retries(&a, "dropped").await + retries(&a, "expired").await,
        0.0
    );

    // Through the other Envoy, both protocols: the replay, one execution.
    for client in [h1(), h2()] {
        let r = post(&client, b.url(&format!("{PAY}?delay_ms=1500")), "frozen-1").await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(backend.executions().await["frozen-1"], 1);
    // The 500 released its key: a retry executes again at once, long before lock_timeout_s.
    let r = post(
        &h1(),
        b.url(&format!("{PAY}?delay_ms=1500&status=500")),
        "frozen-500",
    )
    .await;
    assert_eq!(r.status(), 500);
    assert_eq!(backend.executions().await["frozen-500"], 2);
    assert!(started.elapsed() < Duration::from_secs(LOCK_TIMEOUT_S));
    assert_eq!(outcome(&b, "replayed").await, 2.0);
}

#[tokio::test]
async fn a_completion_etcd_missed_while_crashed_is_stored_after_its_restart() {
    let (mut etcd, backend, a, b) = two_envoys("reject", LOCK_TIMEOUT_S).await;
    let started = Instant::now();
    let paid = at_the_app(&backend, &a, "crashed-1", "delay_ms=1000").await;
    etcd.stop();
    assert_eq!(paid.await.unwrap(), (201, false));

    retries_while_down_are_refused(&backend, [&a, &b], "crashed-1", "delay_ms=1000").await;
    assert_eq!(
        retries(&a, "stored").await,
        0.0,
        "nothing stored while etcd is down"
    );

    etcd.restart().await;
    stored(&a, 1.0).await;
    assert!(started.elapsed() < Duration::from_secs(LOCK_TIMEOUT_S));
    for client in [h2(), h1()] {
        let r = post(&client, b.url(&format!("{PAY}?delay_ms=1000")), "crashed-1").await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(backend.executions().await["crashed-1"], 1);
    assert_eq!(etcd_count(&etcd).await, 1, "one completed record");
}

/// An upstream reset leaves no response to store: the lock is released, and a release etcd
/// missed is queued and retried like a completion, so a retry executes again long before
/// `lock_timeout_s`.
#[tokio::test]
async fn a_release_etcd_missed_after_a_reset_is_retried() {
    let (etcd, backend, a, b) = two_envoys("reject", LOCK_TIMEOUT_S).await;
    let started = Instant::now();
    let query = "delay_ms=1000&reset=1";
    let cut = at_the_app(&backend, &a, "reset-1", query).await;
    etcd.freeze();
    let _ = cut.await;
    support::wait_for("the release retried", Duration::from_secs(20), || async {
        (retries(&a, "retried").await == 1.0).then_some(())
    })
    .await;
    retries_while_down_are_refused(&backend, [&a, &b], "reset-1", query).await;
    etcd.thaw();
    stored(&a, 1.0).await;
    // The refused retries' lock transactions timed out at the Envoys, but the frozen etcd may
    // still apply them when it thaws: each Envoy queued the undo of its own, and the key is free
    // once both queues are empty.
    for envoy in [&a, &b] {
        support::wait_for(
            "the queued undos to be stored",
            Duration::from_secs(30),
            || async {
                (envoy
                    .stats()
                    .await
                    .get("handoff_idempotency_retry_pending", &[])
                    == 0.0)
                    .then_some(())
            },
        )
        .await;
    }
    // The key is free: the retry is forwarded (and reset again by the app).
    let r = h1()
        .post(b.url(&format!("{PAY}?{query}")))
        .header("idempotency-key", "reset-1")
        .json(&payment(5))
        .send()
        .await;
    if let Ok(r) = r {
        assert_ne!(r.status(), 409, "released, not in flight");
        let _ = r.bytes().await;
    }
    assert_eq!(backend.executions().await["reset-1"], 2);
    assert!(started.elapsed() < Duration::from_secs(LOCK_TIMEOUT_S));
}

/// A configuration update with the same store settings while a completion is queued: the new
/// configuration's root context stores it (the queue lives in the VM, not in a root context).
#[tokio::test]
async fn a_queued_completion_survives_a_configuration_update() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("payments", "v1");
    let lds = Lds::new();
    let a = Envoy::start(lds.setup(idempotency_opts(
        &backend,
        etcd.client_port,
        "reject",
        LOCK_TIMEOUT_S,
    )))
    .await;
    let b = idempotency_envoy(&backend, etcd.client_port, "reject", LOCK_TIMEOUT_S).await;
    let paid = at_the_app(&backend, &a, "updated-1", "delay_ms=1000").await;
    etcd.freeze();
    assert_eq!(paid.await.unwrap(), (201, false));
    support::wait_for("the write retried", Duration::from_secs(20), || async {
        (retries(&a, "retried").await == 1.0).then_some(())
    })
    .await;
    // Another configuration, same store: a longer TTL and 5xx responses stored.
    let mut config = idempotency_config("reject", LOCK_TIMEOUT_S);
    config["idempotency"]["ttl_s"] = json!(3600);
    config["idempotency"]["store_5xx"] = json!(true);
    assert_eq!(lds.push_plugin_config(&a, config).await, Push::Accepted);
    etcd.thaw();
    stored(&a, 1.0).await;
    assert_eq!(retries(&a, "dropped").await, 0.0);
    let r = post(&h2(), b.url(&format!("{PAY}?delay_ms=1000")), "updated-1").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(backend.executions().await["updated-1"], 1);
}

async fn etcd_count(etcd: &Etcd) -> u64 {
    etcd.count("/handoff/idem/").await
}
