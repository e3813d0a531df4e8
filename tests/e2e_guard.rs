//! Canary guard, end to end: a real Envoy (two workers) running handoff.wasm with
//! `envoy/canary-guard.yaml`, a stable and a canary `payments` instance, and load from 1,201
//! distinct users (one of them allow-listed). The canary turns bad at a known moment (the
//! example's fault switch); the guard must abort it within `bad_windows × window_s + 1 s`,
//! after which every user reaches stable and the canary upstream sees only signed overrides.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use handoff::canary::{bucket, threshold};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::lds::{Lds, Push};
use support::tokens::sign_override;
use support::{h1, wait_for, Backend, Envoy, EnvoyOpts};

const SALT: &str = "guard-e2e-2026";
const PERCENT: f64 = 20.0;
const ADMIN: &str = "/.well-known/handoff/canary";
const TOKEN: &str = "guard-admin-token-0123456789";
const VIP: &str = "vip-1";
const WINDOW_S: u64 = 2;
const BAD_WINDOWS: u64 = 2;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn config(salt: &str, percent: f64) -> Value {
    let mut c = support::fixture_plugin_config("canary-guard");
    let canary = &mut c["canary"];
    canary["salt"] = json!(salt);
    canary["percent"] = json!(percent);
    canary["allow"] = json!([VIP]);
    canary["deny"] = json!([]);
    canary["guard"] = json!({
        "window_s": WINDOW_S,
        "min_requests": 20,
        "max_error_rate": 0.05,
        "max_error_ratio": 2.0,
        "latency": {"quantile": 0.99, "max_ms": 200, "max_ratio": 1.5},
        "bad_windows": BAD_WINDOWS,
        "admin": {"path": ADMIN, "token_sha256": hex::encode(Sha256::digest(TOKEN))}
    });
    c
}

fn users() -> Vec<String> {
    let mut u = vec![VIP.to_string()];
    u.extend((0..1200).map(|i| format!("user-{i}")));
    u
}

fn hash_canary(salt: &str, user: &str, percent: f64) -> bool {
    bucket(salt, user) < threshold(percent)
}

struct Setup {
    envoy: Envoy,
    stable: Backend,
    canary: Backend,
}

async fn setup(lds: Option<&Lds>) -> Setup {
    let stable = Backend::start("stable", "v1");
    let canary = Backend::start("canary", "v2");
    let mut opts = EnvoyOpts::new("canary-guard")
        .upstream(8081, &stable)
        .upstream(8082, &canary)
        .plugin_config(config(SALT, PERCENT));
    if let Some(l) = lds {
        opts = l.setup(opts);
    }
    Setup {
        envoy: Envoy::start(opts).await,
        stable,
        canary,
    }
}

/// One answer seen by the load: when it was sent, by whom, which instance answered.
#[derive(Clone, Debug)]
struct Seen {
    sent_ms: u64,
    user: String,
    upstream: String,
}

/// Requests from every user in turn, 16 at a time, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(envoy: &Envoy) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let users = Arc::new(users());
        let url = envoy.url("/api/v1/payments");
        let tasks = (0..16)
            .map(|_| {
                let (stop, seen, next, users, url) = (
                    stop.clone(),
                    seen.clone(),
                    next.clone(),
                    users.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = h1();
                    while !stop.load(Ordering::SeqCst) {
                        let user = users[next.fetch_add(1, Ordering::SeqCst) % users.len()].clone();
                        let sent_ms = now_ms();
                        let Ok(r) = client.get(&url).header("x-user-id", &user).send().await else {
                            continue;
                        };
                        let upstream = r
                            .headers()
                            .get("x-upstream")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let _ = r.bytes().await;
                        seen.lock().unwrap().push(Seen {
                            sent_ms,
                            user,
                            upstream,
                        });
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

async fn admin(envoy: &Envoy, method: reqwest::Method) -> Value {
    let r = h1()
        .request(method.clone(), envoy.url(ADMIN))
        .send()
        .await
        .expect("admin path");
    assert_eq!(r.status(), 200, "{method} {ADMIN}");
    r.json().await.expect("admin JSON")
}

/// Waits until the guard reports `state`; returns the report.
async fn wait_state(envoy: &Envoy, state: &str, within: Duration) -> Value {
    wait_for(&format!("guard state {state}"), within, || async {
        let v = admin(envoy, reqwest::Method::GET).await;
        (v["state"] == state).then_some(v)
    })
    .await
}

/// The instance that answers `user` now (one request on a fresh connection).
async fn upstream_of(client: &reqwest::Client, envoy: &Envoy, user: &str) -> String {
    let r = client
        .get(envoy.url("/api/v1/payments"))
        .header("x-user-id", user)
        .send()
        .await
        .expect("request");
    assert!(r.status().is_success(), "{user}: {}", r.status());
    r.headers()["x-upstream"].to_str().unwrap().to_string()
}

/// Every user's instance, 32 at a time.
async fn upstreams(envoy: &Envoy) -> Vec<(String, String)> {
    use futures::stream::{self, StreamExt};
    let client = h1();
    stream::iter(users())
        .map(|u| {
            let client = client.clone();
            async move {
                let up = upstream_of(&client, envoy, &u).await;
                (u, up)
            }
        })
        .buffered(32)
        .collect()
        .await
}

/// The canary turns bad at a known moment; returns the abort's delay from that moment (ms)
/// and the guard's report.
async fn turns_bad(s: &Setup, error_pct: u32, delay_ms: u64) -> (u64, Value) {
    let load = Load::start(&s.envoy);
    // Healthy first: whole windows are judged and nothing is aborted.
    wait_for(
        "a judged healthy window",
        Duration::from_secs(20),
        || async {
            let v = admin(&s.envoy, reqwest::Method::GET).await;
            assert_eq!(v["state"], "active", "aborted while healthy: {v}");
            (v["last"]["figures"]["canary"]["requests"].as_u64() >= Some(20)).then_some(())
        },
    )
    .await;
    s.canary.set_fault(error_pct, delay_ms).await;
    let t0 = now_ms();
    let budget = BAD_WINDOWS * WINDOW_S * 1000 + 1000;
    let report = wait_state(&s.envoy, "aborted", Duration::from_secs(30)).await;
    let at = report["aborted"]["at"].as_u64().expect("aborted.at");
    let delay = at.saturating_sub(t0);
    eprintln!(
        "canary turned bad ({error_pct}% 5xx, +{delay_ms} ms): aborted after {delay} ms \
         (budget {budget} ms): {}",
        report["aborted"]["reason"]
    );
    assert!(
        delay <= budget,
        "abort after {delay} ms, budget {budget} ms"
    );
    let seen = load.stop().await;
    // Every worker applies the abort within a tick (125 ms here): what was sent 500 ms after
    // it reached stable.
    let late: Vec<&Seen> = seen
        .iter()
        .filter(|x| x.sent_ms > at + 500 && x.upstream != "stable")
        .collect();
    assert!(
        late.is_empty(),
        "after the abort: {:?}",
        &late[..late.len().min(5)]
    );
    assert!(
        seen.iter().any(|x| x.upstream == "canary"),
        "the canary had traffic"
    );
    let distinct: std::collections::HashSet<&str> = seen.iter().map(|x| x.user.as_str()).collect();
    assert!(distinct.len() >= 1000, "{} distinct users", distinct.len());
    (delay, report)
}

/// After an abort: every user, hash-canary and allow-listed alike, reaches stable, the canary
/// upstream sees nothing new, and a signed override still reaches it.
/// Every worker applies an abort at its next tick (125 ms here; 500 ms of slack for a loaded
/// machine): the bound the guard promises, counted from the abort's own timestamp.
async fn applied_by_every_worker(aborted_at: u64) {
    wait_for(
        "the abort to be a tick old",
        Duration::from_secs(5),
        || async { (now_ms() > aborted_at + 500).then_some(()) },
    )
    .await;
}

async fn everyone_on_stable_but_overrides(s: &Setup, aborted_at: u64) {
    applied_by_every_worker(aborted_at).await;
    let before = s.canary.requests().await;
    let all = upstreams(&s.envoy).await;
    assert!(all.iter().any(|(u, _)| u == VIP));
    assert!(
        all.iter()
            .filter(|(u, _)| hash_canary(SALT, u, PERCENT))
            .count()
            > 150,
        "hash-canary users among them"
    );
    for (u, up) in &all {
        assert_eq!(up, "stable", "{u} after the abort");
    }
    assert_eq!(
        s.canary.requests().await,
        before,
        "the canary saw no new request"
    );
    let user = "user-7";
    let r = h1()
        .get(s.envoy.url("/api/v1/payments"))
        .header("x-user-id", user)
        .header(
            "x-canary-override",
            sign_override("change-me", "canary", user),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-upstream"],
        "canary",
        "a signed override still works"
    );
    assert_eq!(s.canary.requests().await, before + 1);
}

#[tokio::test]
async fn errors_abort_the_canary_within_two_windows() {
    let s = setup(None).await;
    let (_, report) = turns_bad(&s, 30, 0).await;
    assert_eq!(report["aborted"]["trigger"], "errors");
    everyone_on_stable_but_overrides(&s, report["aborted"]["at"].as_u64().unwrap()).await;
    let log = s.envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains("canary aborted: errors "))
        .expect("the abort's warn line");
    assert!(
        line.contains("[warning]")
            && line.contains("vs stable")
            && line.contains("2 windows of 2 s"),
        "{line}"
    );
    assert_eq!(log.matches("canary aborted:").count(), 1, "logged once");
    assert!(log.contains("configuration accepted: canary 20% guarded (2 s windows)"));
    let stats = s
        .envoy
        .stats_when(
            "handoff_canary_decisions",
            "aborted decisions counted",
            |st| st.sum_with("handoff_canary_decisions", &[("reason", "aborted")]) > 0.0,
        )
        .await;
    let m = |n: &str, l: &[(&str, &str)]| stats.get(n, l);
    assert_eq!(
        m("handoff_canary_guard_aborts", &[("trigger", "errors")]),
        1.0
    );
    assert_eq!(m("handoff_canary_guard_state", &[]), 1.0);
    assert!(m("handoff_canary_guard_errors", &[("variant", "canary")]) > 0.0);
    assert!(m("handoff_canary_guard_requests", &[("variant", "stable")]) > 0.0);
    assert!(
        m(
            "handoff_canary_decisions",
            &[("variant", "stable"), ("reason", "aborted")]
        ) > 0.0
    );
    let hist: Vec<&String> = stats
        .0
        .keys()
        .filter(|k| k.starts_with("handoff_canary_guard_latency_ms"))
        .collect();
    eprintln!("latency histogram series: {}", hist.len());
    support::assert_survived(&s.envoy).await;
    let _ = &s.stable;
}

#[tokio::test]
async fn latency_aborts_the_canary_within_two_windows() {
    let s = setup(None).await;
    let (_, report) = turns_bad(&s, 0, 400).await;
    assert_eq!(report["aborted"]["trigger"], "latency");
    let reason = report["aborted"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("p99 latency "), "{reason}");
    s.canary.set_fault(0, 0).await;
    everyone_on_stable_but_overrides(&s, report["aborted"]["at"].as_u64().unwrap()).await;
}

#[tokio::test]
async fn a_healthy_canary_is_not_aborted() {
    let s = setup(None).await;
    let load = Load::start(&s.envoy);
    let start = now_ms();
    // As long as the bad runs take: five windows and their slack.
    let mut judged = std::collections::BTreeSet::new();
    while now_ms() < start + 10_000 {
        let v = admin(&s.envoy, reqwest::Method::GET).await;
        assert_eq!(v["state"], "active", "a healthy canary was aborted: {v}");
        if v["last"]["figures"]["canary"]["requests"].as_u64() >= Some(20) {
            judged.insert(v["last"]["window_start"].as_u64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = load.stop().await;
    assert!(
        judged.len() >= 3,
        "windows judged with canary traffic: {judged:?}"
    );
    assert!(seen.iter().any(|x| x.upstream == "canary"));
    let stats = s.envoy.stats().await;
    assert_eq!(stats.sum("handoff_canary_guard_aborts"), 0.0);
    assert!(!s.envoy.log().contains("canary aborted"));
    let _ = &s.stable;
}

#[tokio::test]
async fn admin_reports_figures_and_resume_restores_the_cohorts() {
    let s = setup(None).await;
    let load = Load::start(&s.envoy);
    let report = wait_for("a judged window", Duration::from_secs(20), || async {
        let v = admin(&s.envoy, reqwest::Method::GET).await;
        (v["last"]["figures"]["canary"]["requests"].as_u64() >= Some(20)).then_some(v)
    })
    .await;
    load.stop().await;
    eprintln!("GET {ADMIN}: {report}");
    for cohort in ["stable", "canary"] {
        let f = &report["last"]["figures"][cohort];
        assert!(f["requests"].as_u64() > Some(0), "{cohort}: {f}");
        assert!(f["quantile_us"].as_u64() > Some(0), "{cohort}: {f}");
        assert!(report["current"]["figures"][cohort]["requests"].is_u64());
    }
    assert_eq!(
        (report["window_s"].as_u64(), report["quantile"].as_str()),
        (Some(2), Some("p99"))
    );

    // Who may use it: loopback, or the bearer token; never forwarded.
    let counts = (s.stable.requests().await, s.canary.requests().await);
    let forwarded = || {
        h1().get(s.envoy.url(ADMIN))
            .header("x-forwarded-for", "203.0.113.9")
    };
    let r = forwarded().send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = forwarded().bearer_auth("wrong-token").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = forwarded().bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h1().put(s.envoy.url(ADMIN)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        counts,
        (s.stable.requests().await, s.canary.requests().await),
        "never forwarded"
    );

    let before = upstreams(&s.envoy).await;
    let canary_users = before.iter().filter(|(_, up)| up == "canary").count();
    assert!(canary_users > 150, "{canary_users}");
    let v = admin(&s.envoy, reqwest::Method::POST).await;
    assert_eq!(
        (v["state"].as_str(), v["aborted"]["trigger"].as_str()),
        (Some("aborted"), Some("admin"))
    );
    wait_for(
        "every worker to apply the abort",
        Duration::from_secs(5),
        || async {
            upstreams(&s.envoy)
                .await
                .iter()
                .all(|(_, up)| up == "stable")
                .then_some(())
        },
    )
    .await;
    let v = admin(&s.envoy, reqwest::Method::DELETE).await;
    assert_eq!(v["state"], "active");
    wait_for(
        "every worker to apply the resume",
        Duration::from_secs(5),
        || async { (upstreams(&s.envoy).await == before).then_some(()) },
    )
    .await;
    let stats = s.envoy.stats().await;
    assert_eq!(
        stats.get("handoff_canary_guard_aborts", &[("trigger", "admin")]),
        1.0
    );
    assert_eq!(stats.get("handoff_canary_guard_state", &[]), 0.0);
}

#[tokio::test]
async fn the_abort_survives_a_config_update_with_the_same_salt() {
    let lds = Lds::new();
    let s = setup(Some(&lds)).await;
    let canary_user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| hash_canary(SALT, u, PERCENT))
        .unwrap();
    assert_eq!(upstream_of(&h1(), &s.envoy, &canary_user).await, "canary");
    admin(&s.envoy, reqwest::Method::POST).await;
    // The same salt at another percent: a new filter configuration, the same experiment.
    assert_eq!(
        lds.push_plugin_config(&s.envoy, config(SALT, 30.0)).await,
        Push::Accepted
    );
    let v = admin(&s.envoy, reqwest::Method::GET).await;
    assert_eq!(v["state"], "aborted", "{v}");
    // A fresh client: new connections, so the new listener's configuration.
    assert_eq!(upstream_of(&h1(), &s.envoy, &canary_user).await, "stable");
    assert_eq!(upstream_of(&h1(), &s.envoy, VIP).await, "stable");
    // A new salt is a new experiment: it starts fresh.
    let salt2 = "guard-e2e-next";
    assert_eq!(
        lds.push_plugin_config(&s.envoy, config(salt2, PERCENT))
            .await,
        Push::Accepted
    );
    let v = admin(&s.envoy, reqwest::Method::GET).await;
    assert_eq!(v["state"], "active", "{v}");
    let user2 = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| hash_canary(salt2, u, PERCENT))
        .unwrap();
    assert_eq!(upstream_of(&h1(), &s.envoy, &user2).await, "canary");
    assert_eq!(upstream_of(&h1(), &s.envoy, VIP).await, "canary");
    let _ = (&s.stable, &s.canary);
}

/// No upstream answer at all (the canary's process is gone: Envoy's own 503 for the connect
/// failure) counts as an error too.
#[tokio::test]
async fn a_canary_that_stops_answering_is_aborted() {
    let mut s = setup(None).await;
    let load = Load::start(&s.envoy);
    wait_for(
        "a judged healthy window",
        Duration::from_secs(20),
        || async {
            let v = admin(&s.envoy, reqwest::Method::GET).await;
            (v["last"]["figures"]["canary"]["requests"].as_u64() >= Some(20)).then_some(())
        },
    )
    .await;
    s.canary.kill();
    let t0 = now_ms();
    let report = wait_state(&s.envoy, "aborted", Duration::from_secs(30)).await;
    load.stop().await;
    let delay = report["aborted"]["at"].as_u64().unwrap().saturating_sub(t0);
    eprintln!(
        "canary gone: aborted after {delay} ms: {}",
        report["aborted"]["reason"]
    );
    assert_eq!(report["aborted"]["trigger"], "errors");
    assert!(delay <= BAD_WINDOWS * WINDOW_S * 1000 + 1000, "{delay} ms");
    applied_by_every_worker(report["aborted"]["at"].as_u64().unwrap()).await;
    for (u, up) in upstreams(&s.envoy).await {
        assert_eq!(up, "stable", "{u}");
    }
    let _ = &s.stable;
}
