//! The drain's admin path (`envoy/drain.yaml`), as the drain tests drive it.

use super::{h1, Envoy};
use serde_json::Value;

pub const ADMIN: &str = "/.well-known/handoff/drain";

/// `method` on the admin path (with `query`, e.g. `?grace_s=3`) from loopback; asserts 200 and
/// returns the state document `{"state", "since", "inflight"}`.
pub async fn admin(envoy: &Envoy, method: reqwest::Method, query: &str) -> Value {
    let r = h1()
        .request(method.clone(), envoy.url(&format!("{ADMIN}{query}")))
        .send()
        .await
        .expect("admin request");
    assert_eq!(r.status(), 200, "{method} {ADMIN}{query}");
    r.json().await.expect("state JSON")
}
