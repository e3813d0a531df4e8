//! Faults, end to end: live configuration pushes through file-based LDS (a new plugin
//! configuration, an invalid one, a malformed file) and a failing wasm VM under each of
//! Envoy's `failure_policy` settings.
//!
//! Faults around an idempotency lock (upstream reset mid-response, upstream timeout while the
//! lock is held) are at the end.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::lds::{Lds, LdsCounters, Push};
use support::{assert_survived, cohort, user_in, Backend, Envoy, EnvoyOpts};

const SALT: &str = "checkout-2026-11";

fn config_at(percent: f64) -> Value {
    let mut c = support::fixture_plugin_config("canary");
    c["canary"]["percent"] = json!(percent);
    c
}

/// A client that opens a new connection for every request: each one meets the listener that
/// is current when it connects (a kept-alive connection stays on the listener it was accepted
/// by until Envoy drains it).
fn fresh() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

struct Setup {
    envoy: Envoy,
    lds: Lds,
    _stable: Backend,
    _canary: Backend,
}

async fn setup(percent: f64) -> Setup {
    let (stable, canary) = Backend::versions("stable", "canary");
    let lds = Lds::new();
    let opts = EnvoyOpts::new("canary")
        .versions(&stable, &canary)
        .plugin_config(config_at(percent))
        // Old listeners' connections are closed on their next response, not over 10 minutes.
        .arg("--drain-strategy")
        .arg("immediate")
        .arg("--drain-time-s")
        .arg("1");
    let envoy = Envoy::start(lds.setup(opts)).await;
    Setup {
        envoy,
        lds,
        _stable: stable,
        _canary: canary,
    }
}

async fn variants(envoy: &Envoy, users: &[String]) -> Vec<String> {
    let client = fresh();
    let mut out = Vec::new();
    for u in users {
        let r = client
            .get(envoy.url("/"))
            .header("x-user-id", u.as_str())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        out.push(
            r.headers()
                .get("x-canary-variant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        );
    }
    out
}

/// A new plugin configuration pushed through LDS takes effect for new connections as soon as
/// Envoy accepted it (no restart). The canary keeps no state: every user's variant is
/// recomputed from the same formula with the new percent, so a ramp 0 → 50 → 100 only ever
/// moves users from stable to canary.
#[tokio::test]
async fn a_new_plugin_config_pushed_through_lds_takes_effect() {
    let s = setup(0.0).await;
    let users: Vec<String> = (0..200).map(|i| format!("lds-{i}")).collect();
    let mut previous: Option<Vec<String>> = None;
    for percent in [0.0, 50.0, 100.0] {
        if percent > 0.0 {
            assert_eq!(
                s.lds.push_plugin_config(&s.envoy, config_at(percent)).await,
                Push::Accepted,
                "{percent}%"
            );
        }
        let got = variants(&s.envoy, &users).await;
        for (u, v) in users.iter().zip(&got) {
            assert_eq!(v, cohort(SALT, u, percent), "{u} at {percent}%");
        }
        if let Some(prev) = &previous {
            for ((u, a), b) in users.iter().zip(prev).zip(&got) {
                assert!(
                    !(a == "canary" && b == "stable"),
                    "{u} flipped back at {percent}%"
                );
            }
        }
        previous = Some(got);
    }
    for p in ["canary 0%", "canary 50%", "canary 100%"] {
        s.envoy
            .wait_for_log(&format!("configuration accepted: {p}"))
            .await;
    }
    let c = LdsCounters::read(&s.envoy).await;
    assert_eq!((c.success, c.rejected), (3, 0), "{c:?}");
    assert_survived(&s.envoy).await;
}

/// A kept-alive connection accepted before a push keeps the configuration it started with
/// until Envoy drains the old listener; with `--drain-strategy immediate` its next response
/// closes it, and the client's next connection meets the new configuration. No request fails.
#[tokio::test]
async fn a_kept_alive_connection_moves_to_the_new_config_after_the_drain() {
    let s = setup(0.0).await;
    let user = user_in(SALT, 50.0, "canary", "ka-");
    let client = support::h1();
    let ask = || async {
        let r = client
            .get(s.envoy.url("/"))
            .header("x-user-id", user.as_str())
            .send()
            .await
            .expect("no request fails across a config push");
        assert_eq!(r.status(), 200);
        r.headers()["x-canary-variant"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(ask().await, "stable");
    assert_eq!(
        s.lds.push_plugin_config(&s.envoy, config_at(50.0)).await,
        Push::Accepted
    );
    // Within a bounded number of requests the pooled connection is replaced.
    let mut seen = Vec::new();
    for _ in 0..50 {
        let v = ask().await;
        let done = v == "canary";
        seen.push(v);
        if done {
            break;
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("canary"), "{seen:?}");
    // Once moved, it never goes back.
    for _ in 0..20 {
        assert_eq!(ask().await, "canary");
    }
    assert_survived(&s.envoy).await;
}

/// An invalid plugin configuration pushed through LDS: handoff's `on_configure` refuses it
/// with one log line naming the field, Envoy rejects the whole listener update
/// (`listener_manager.lds.update_rejected`), and the old listener keeps serving with the old
/// configuration, on kept-alive and new connections alike.
#[tokio::test]
async fn an_invalid_plugin_config_is_rejected_and_the_old_one_keeps_serving() {
    let s = setup(100.0).await;
    let users: Vec<String> = (0..50).map(|i| format!("bad-{i}")).collect();
    assert!(variants(&s.envoy, &users)
        .await
        .iter()
        .all(|v| v == "canary"));
    let kept = support::h1();
    let r = kept
        .get(s.envoy.url("/"))
        .header("x-user-id", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-canary-variant"], "canary");

    let cases = [
        (
            config_at(150.0),
            "invalid configuration at `canary.percent`: expected a number from 0 to 100",
        ),
        (
            json!({"canary": {"salt": "s", "percent": 1, "user_id": [{"header": "x"}], "persent": 2}}),
            "invalid configuration at `canary.persent`: unknown field `persent`",
        ),
        (json!({"canery": {}}), "unknown field `canery`"),
    ];
    for (i, (cfg, line)) in cases.into_iter().enumerate() {
        assert_eq!(
            s.lds.push_plugin_config(&s.envoy, cfg).await,
            Push::Rejected,
            "{line}"
        );
        let log = s.envoy.wait_for_log(line).await;
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
        assert!(hits.iter().all(|l| l.contains("[error]")), "{hits:?}");
        let c = LdsCounters::read(&s.envoy).await;
        assert_eq!(c.rejected as usize, i + 1, "{c:?}");
        // The old configuration (100%) still answers, on new and kept-alive connections.
        assert!(variants(&s.envoy, &users)
            .await
            .iter()
            .all(|v| v == "canary"));
        let r = kept
            .get(s.envoy.url("/"))
            .header("x-user-id", "kept")
            .send()
            .await
            .expect("the kept-alive connection survives a rejected push");
        assert_eq!(r.headers()["x-canary-variant"], "canary");
    }
    // Envoy's own rejection line names the listener and the plugin, once per push.
    let rejected = "lds: listener 'main' config rejected: Unable to create Wasm plugin handoff";
    support::wait_for("three rejection lines", Duration::from_secs(10), || async {
        (s.envoy.log().matches(rejected).count() == 3).then_some(())
    })
    .await;
    // And a valid push after the bad ones is still accepted.
    assert_eq!(
        s.lds.push_plugin_config(&s.envoy, config_at(0.0)).await,
        Push::Accepted
    );
    assert!(variants(&s.envoy, &users)
        .await
        .iter()
        .all(|v| v == "stable"));
    // The refused configurations are logged as failed plugin loads; nothing crashed.
    let log = s.envoy.wait_for_log("Plugin handoff failed to load").await;
    assert!(support::panic_lines(&log).is_empty(), "{log}");
}

/// A malformed LDS file (not JSON, or a listener Envoy cannot build) is rejected by Envoy
/// before handoff sees anything; the old listener keeps serving.
#[tokio::test]
async fn a_malformed_lds_file_is_rejected_and_the_old_listener_keeps_serving() {
    let s = setup(100.0).await;
    assert_eq!(
        s.lds.push_raw(&s.envoy, b"{ this is not json").await,
        Push::Rejected
    );
    let mut broken = s.lds.listeners();
    // A filter type Envoy does not know (unknown *fields* in dynamic resources are only
    // warned about by default, so they would not do).
    broken[0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        ["typed_config"]["@type"] = json!("type.googleapis.com/handoff.test.NoSuchFilter");
    assert_eq!(s.lds.push(&s.envoy, broken).await, Push::Rejected);
    let got = variants(&s.envoy, &["m-1".to_string(), "m-2".to_string()]).await;
    assert!(got.iter().all(|v| v == "canary"), "{got:?}");
    assert_survived(&s.envoy).await;
}

// --- A failing wasm VM and Envoy's failure_policy --------------------------------------------

fn trap_wasm() -> std::path::PathBuf {
    let p = support::root().join("target/wasm32-wasip1/release/examples/trap_filter.wasm");
    assert!(p.exists(), "{} is missing: run `make build`", p.display());
    p
}

/// Runs the canary fixture with the trapping filter in handoff's place, under `policy`
/// (`failure_policy` of the Wasm filter config: FAIL_CLOSED, FAIL_OPEN, FAIL_RELOAD).
async fn trap_setup(policy: &'static str) -> (Envoy, Backend, Backend) {
    let (stable, canary) = Backend::versions("stable", "canary");
    let wasm = trap_wasm().display().to_string();
    let mut opts = EnvoyOpts::new("canary");
    // One worker, so the trapping request and the ones after it meet the same VM (each worker
    // thread runs its own copy).
    opts.concurrency = 1;
    let envoy = Envoy::start(opts.versions(&stable, &canary).edit(move |cfg| {
        let filters = cfg
            .pointer_mut(
                "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
            )
            .and_then(Value::as_array_mut)
            .expect("http_filters");
        for f in filters.iter_mut() {
            if f["name"] == "handoff" {
                let c = &mut f["typed_config"]["config"];
                c["vm_config"]["code"]["local"]["filename"] = Value::from(wasm.clone());
                c["vm_config"]["vm_id"] = Value::from("trap");
                c["failure_policy"] = Value::from(policy);
            }
        }
    }))
    .await;
    (envoy, stable, canary)
}

async fn get(envoy: &Envoy, trap: bool) -> Result<(u16, bool), String> {
    let mut req = fresh().get(envoy.url("/")).header("x-user-id", "u-1");
    if trap {
        req = req.header("x-trap", "1");
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let alive = r.headers().get("x-trap-filter").is_some();
    Ok((r.status().as_u16(), alive))
}

/// FAIL_CLOSED (Envoy's default): once the VM has trapped, every request through the filter
/// gets a 503 from Envoy until the VM is reloaded by a config push or a restart.
#[tokio::test]
async fn a_failed_vm_with_fail_closed_answers_503() {
    let (envoy, stable, _c) = trap_setup("FAIL_CLOSED").await;
    assert_eq!(get(&envoy, false).await, Ok((200, true)));
    let trapped = get(&envoy, true).await;
    assert!(
        !matches!(trapped, Ok((200, _))),
        "the trapping request got {trapped:?}"
    );
    let before = stable.requests().await;
    for _ in 0..5 {
        assert_eq!(get(&envoy, false).await, Ok((503, false)));
    }
    assert_eq!(
        stable.requests().await,
        before,
        "fail closed forwarded a request"
    );
    envoy.wait_for_log("trap requested by x-trap").await;
}

/// FAIL_OPEN: once the VM has trapped, requests pass through as if the filter were absent.
/// For handoff this means: no cohort decision (everyone reaches the default route, stable), no
/// translation, no idempotency protection, no drain 503s. Choose it only where that is safe.
#[tokio::test]
async fn a_failed_vm_with_fail_open_passes_requests_through() {
    let (envoy, stable, _c) = trap_setup("FAIL_OPEN").await;
    assert_eq!(get(&envoy, false).await, Ok((200, true)));
    let _ = get(&envoy, true).await;
    let before = stable.requests().await;
    for _ in 0..5 {
        assert_eq!(get(&envoy, false).await, Ok((200, false)));
    }
    assert_eq!(stable.requests().await, before + 5);
}

/// FAIL_RELOAD: the failed VM is replaced by a fresh one (after a backoff, 1 s by default) and
/// requests are processed by the filter again; requests during the reload get a 503.
#[tokio::test]
async fn a_failed_vm_with_fail_reload_comes_back() {
    let (envoy, _s, _c) = trap_setup("FAIL_RELOAD").await;
    assert_eq!(get(&envoy, false).await, Ok((200, true)));
    let _ = get(&envoy, true).await;
    support::wait_for(
        "the reloaded VM to process requests again",
        Duration::from_secs(30),
        || async { (get(&envoy, false).await == Ok((200, true))).then_some(()) },
    )
    .await;
    envoy.wait_for_log("trap requested by x-trap").await;
}

// --- Faults around an idempotency lock (envoy/idempotency.yaml) ------------------------------

/// `envoy/idempotency.yaml` with its routes' timeout set to `timeout_s`.
async fn idempotency_setup(timeout_s: u64) -> (Envoy, Backend) {
    let app = Backend::start("app", "v1");
    let envoy = Envoy::start(
        EnvoyOpts::new("idempotency")
            .upstream(8081, &app)
            .edit(move |cfg| set_route_timeouts(cfg, timeout_s)),
    )
    .await;
    (envoy, app)
}

fn set_route_timeouts(v: &mut Value, timeout_s: u64) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(route)) = m.get_mut("route") {
                if route.contains_key("cluster") {
                    route.insert("timeout".into(), json!(format!("{timeout_s}s")));
                }
            }
            m.values_mut()
                .for_each(|c| set_route_timeouts(c, timeout_s));
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|c| set_route_timeouts(c, timeout_s)),
        _ => {}
    }
}

async fn keyed_post(envoy: &Envoy, query: &str, key: &str) -> Result<(u16, bool), String> {
    let r = fresh()
        .post(envoy.url(&format!("/api/v1/payments{query}")))
        .header("idempotency-key", key)
        .header("x-user-id", "u-fault")
        .header("content-type", "application/json")
        .body(r#"{"amount": 1, "currency": "EUR", "customer_id": "c-1"}"#)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let replayed = r.headers().contains_key("idempotent-replayed");
    // A reset mid-body shows here.
    r.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, replayed))
}

/// The upstream resets mid-response (`?reset=1`) while the key is locked: the client sees the
/// failure, nothing is stored, the lock is released, and a retry executes again and is then
/// the stored result (a second retry is replayed, not executed a third time).
#[tokio::test]
async fn upstream_reset_mid_response_releases_the_idempotency_lock() {
    let (envoy, app) = idempotency_setup(15).await;
    let first = keyed_post(&envoy, "?reset=1", "k-reset").await;
    assert!(
        !matches!(first, Ok((s, _)) if (200..300).contains(&s)),
        "a reset response must not look like a success: {first:?}"
    );
    assert_eq!(keyed_post(&envoy, "", "k-reset").await, Ok((201, false)));
    assert_eq!(keyed_post(&envoy, "", "k-reset").await, Ok((201, true)));
    assert_eq!(app.executions().await.get("k-reset"), Some(&2));
    assert_survived(&envoy).await;
}

/// The upstream is slower than the route timeout while the lock is held: the client gets
/// Envoy's 504, the lock is released, and the retry executes again instead of a 409.
#[tokio::test]
async fn upstream_timeout_while_locked_releases_the_lock() {
    let (envoy, app) = idempotency_setup(1).await;
    assert_eq!(
        keyed_post(&envoy, "?delay_ms=3000", "k-timeout").await,
        Ok((504, false))
    );
    assert_eq!(keyed_post(&envoy, "", "k-timeout").await, Ok((201, false)));
    assert_eq!(keyed_post(&envoy, "", "k-timeout").await, Ok((201, true)));
    assert_eq!(app.executions().await.get("k-timeout"), Some(&2));
    assert_survived(&envoy).await;
}
