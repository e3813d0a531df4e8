//! Translation and idempotency together, end to end (`envoy/translate.yaml` with an
//! `idempotency` section): the fingerprint is taken after translation, the stored response is
//! the backend's own, and each replay is translated for the client that asks. A v1 retry of an
//! operation first sent as v2 is the same operation and gets a v1 body, and the other way round.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use support::{assert_problem_body, clients, send, Backend, Envoy};

async fn setup() -> (Envoy, Backend, Backend) {
    setup_with(|_| {}).await
}

async fn setup_with(edit: impl FnOnce(&mut Value) + 'static) -> (Envoy, Backend, Backend) {
    let mut cfg = support::fixture_plugin_config("translate");
    cfg["idempotency"] = json!({
        "methods": ["POST"],
        "path_prefixes": ["/api/"],
        "scope": [{"header": "x-user-id"}]
    });
    support::translate_envoy(cfg, edit).await
}

/// A POST with `key` in the scope of user `u-42`: its status, `idempotent-replayed`,
/// `x-handoff-translated` and JSON body.
async fn post_as_user(
    client: &reqwest::Client,
    url: String,
    key: &str,
    body: &Value,
) -> (u16, Option<String>, Option<String>, Value) {
    let r = send(
        client
            .post(url)
            .header("idempotency-key", key)
            .header("x-user-id", "u-42")
            .json(body),
    )
    .await;
    let h = |n: &str| r.header(n).map(str::to_string);
    (
        r.status,
        h("idempotent-replayed"),
        h("x-handoff-translated"),
        r.json(),
    )
}

fn v1_body() -> Value {
    json!({"amount": 12.5, "currency": "EUR", "customer_id": "c-7"})
}

/// The same operation as the v2 API expects it (keys in another order than the filter writes
/// them: the fingerprint compares JSON in canonical form).
fn v2_body() -> Value {
    json!({"customer": {"email": null, "id": "c-7"}, "amount": {"currency": "EUR", "value": 12.5}})
}

#[tokio::test]
async fn a_v1_retry_of_a_v2_operation_is_replayed_with_a_v1_body() {
    let (envoy, _v1, v2) = setup().await;
    for (proto, client) in clients() {
        let key = format!("op-v2-first-{proto}");
        let (s, replayed, _, first) =
            post_as_user(&client, envoy.url("/api/v2/payments"), &key, &v2_body()).await;
        assert_eq!((s, replayed), (201, None), "{proto}: {first}");
        let id = first["id"]
            .as_str()
            .expect("v2 answer has an id")
            .to_string();
        let executed = v2.requests().await;

        let (s, replayed, translated, again) =
            post_as_user(&client, envoy.url("/api/v1/payments"), &key, &v1_body()).await;
        assert_eq!(s, 201, "{proto}: {again}");
        assert_eq!(replayed.as_deref(), Some("true"), "{proto}");
        assert_eq!(translated.as_deref(), Some("v2-v1"), "{proto}");
        assert_eq!(
            again,
            json!({"transaction_id": id, "status": "succeeded"}),
            "{proto}"
        );
        assert_eq!(
            v2.requests().await,
            executed,
            "{proto}: the replay was forwarded"
        );
        assert_eq!(v2.executions().await.get(&key), Some(&1), "{proto}");
    }
}

#[tokio::test]
async fn a_v2_retry_of_a_v1_operation_gets_the_backend_body_and_a_changed_one_is_a_mismatch() {
    let (envoy, _v1, v2) = setup().await;
    for (proto, client) in clients() {
        let key = format!("op-v1-first-{proto}");
        let (s, _, translated, first) =
            post_as_user(&client, envoy.url("/api/v1/payments"), &key, &v1_body()).await;
        assert_eq!(
            (s, translated.as_deref()),
            (201, Some("v2-v1")),
            "{proto}: {first}"
        );
        let id = first["transaction_id"].as_str().unwrap().to_string();

        let (s, replayed, translated, again) =
            post_as_user(&client, envoy.url("/api/v2/payments"), &key, &v2_body()).await;
        assert_eq!(
            (s, replayed.as_deref()),
            (201, Some("true")),
            "{proto}: {again}"
        );
        assert_eq!(
            translated, None,
            "{proto}: a v2 client gets the backend's own body"
        );
        assert_eq!(again["id"], id.as_str(), "{proto}");
        assert_eq!(
            again["amount"],
            json!({"value": 12.5, "currency": "EUR"}),
            "{proto}"
        );

        // Another amount under the same key: another operation, refused before the backend.
        let mut changed = v1_body();
        changed["amount"] = json!(99);
        let (s, _, _, problem) =
            post_as_user(&client, envoy.url("/api/v1/payments"), &key, &changed).await;
        assert_eq!(s, 422, "{proto}: {problem}");
        assert_problem_body(&problem, 422, "idempotency-mismatch");
        assert_eq!(v2.executions().await.get(&key), Some(&1), "{proto}");
    }
    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("handoff_idempotency_outcomes", &[("outcome", "replayed")]),
        2.0
    );
    assert_eq!(
        stats.get("handoff_idempotency_outcomes", &[("outcome", "mismatch")]),
        2.0
    );
}

/// A backend response ended by trailers (over HTTP/2 upstreams) is captured whole before it is
/// translated: the replay is the backend's own body, translated for the client that asks.
#[tokio::test]
async fn a_response_ended_by_trailers_is_stored_and_replayed_whole() {
    let (envoy, _v1, v2) = setup_with(support::h2_upstreams).await;
    for (proto, client) in clients() {
        let key = format!("op-trailers-{proto}");
        let v1_url = envoy.url("/api/v1/payments?trailers=1");
        let (s, replayed, _, first) = post_as_user(&client, v1_url.clone(), &key, &v1_body()).await;
        assert_eq!((s, replayed), (201, None), "{proto}: {first}");
        assert_eq!(first["status"], "succeeded", "{proto}: {first}");
        let (s, replayed, translated, again) =
            post_as_user(&client, v1_url, &key, &v1_body()).await;
        assert_eq!(s, 201, "{proto}: {again}");
        assert_eq!(replayed.as_deref(), Some("true"));
        assert_eq!(translated.as_deref(), Some("v2-v1"));
        assert_eq!(again, first, "{proto}");
        let v2_url = envoy.url("/api/v2/payments?trailers=1");
        let (s, replayed, _, own) = post_as_user(&client, v2_url, &key, &v2_body()).await;
        assert_eq!(
            (s, replayed.as_deref()),
            (201, Some("true")),
            "{proto}: {own}"
        );
        assert_eq!(
            own["id"], first["transaction_id"],
            "{proto}: the backend's own body: {own}"
        );
        assert!(
            own.get("customer").is_some(),
            "{proto}: untranslated: {own}"
        );
    }
    assert_eq!(v2.requests().await, 2, "one execution per protocol");
}
