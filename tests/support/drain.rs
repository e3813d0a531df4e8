//! The drain's admin path (`envoy/drain.yaml`), as the drain tests drive it.

use super::{fixture_plugin_config, h1, Envoy};
use serde_json::{json, Value};

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

/// The state document, from loopback.
pub async fn state(envoy: &Envoy) -> Value {
    let r = h1().get(envoy.url(ADMIN)).send().await.expect("admin GET");
    assert_eq!(r.status(), 200, "GET {ADMIN}");
    r.json().await.expect("state JSON")
}

/// The fixture's drain section with `edit` applied (other capabilities removed).
pub fn drain_config(edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = fixture_plugin_config("drain");
    let mut d = c["drain"].take();
    edit(&mut d);
    json!({ "drain": d })
}

/// The fixture's drain without its readiness probe (started by the admin path or the upstream
/// signal only), then `edit`.
pub fn drain_config_no_readiness(edit: impl FnOnce(&mut Value)) -> Value {
    drain_config(|d| {
        d.as_object_mut().unwrap().remove("readiness");
        edit(d);
    })
}
