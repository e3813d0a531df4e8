//! Sticky canary, end to end: a real Envoy running handoff.wasm with `envoy/canary.yaml`, in
//! front of a stable (v1) and a canary (v2) `payments` instance that identify themselves.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use support::tokens::{jwt, sign_override, HS256_HEADER};
use support::{clients, cohort, h2, user_in, Backend, Envoy, EnvoyOpts};

const SALT: &str = "checkout-2026-11";

struct Setup {
    envoy: Envoy,
    stable: Backend,
    canary: Backend,
}

async fn setup(plugin_config: Option<Value>) -> Setup {
    let (stable, canary) = Backend::versions("stable", "canary");
    let mut opts = EnvoyOpts::new("canary").versions(&stable, &canary);
    if let Some(c) = plugin_config {
        opts = opts.plugin_config(c);
    }
    let envoy = Envoy::start(opts).await;
    Setup {
        envoy,
        stable,
        canary,
    }
}

fn config_with(percent: f64, edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = support::fixture_plugin_config("canary");
    c["canary"]["percent"] = json!(percent);
    edit(&mut c);
    c
}

/// (variant header echoed to the client, instance that answered)
async fn variant_of(client: &reqwest::Client, req: reqwest::RequestBuilder) -> (String, String) {
    let _ = client;
    let r = req.send().await.expect("request through Envoy");
    assert!(r.status().is_success(), "status {}", r.status());
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    (h("x-canary-variant"), h("x-upstream"))
}

/// The anonymous id handoff minted for this response (its `hf_uid` Set-Cookie).
fn minted_id(r: &reqwest::Response) -> String {
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let value = cookie.strip_prefix("hf_uid=").expect("an hf_uid cookie");
    value.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn a_user_keeps_its_variant_and_reaches_that_cluster() {
    let s = setup(None).await;
    // One user of each cohort, found with the same formula any tool can recompute.
    let canary_user = user_in(SALT, 12.5, "canary", "c-");
    let stable_user = user_in(SALT, 12.5, "stable", "s-");
    for (proto, client) in clients() {
        for (user, want) in [(&canary_user, "canary"), (&stable_user, "stable")] {
            for _ in 0..100 {
                let got = variant_of(
                    &client,
                    client
                        .get(s.envoy.url("/"))
                        .header("x-user-id", user.as_str()),
                )
                .await;
                assert_eq!(
                    got,
                    (want.to_string(), want.to_string()),
                    "{proto} user {user}"
                );
            }
        }
    }
    // What the upstream saw is the filter's header.
    let seen = s.canary.last().await;
    assert_eq!(seen["headers"]["x-canary-variant"], "canary");
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "the decisions counted", |st| {
            st.decisions("canary", "hash") >= 200.0 && st.decisions("stable", "hash") >= 200.0
        })
        .await;
    assert_eq!(stats.decisions("canary", "hash"), 200.0);
    assert_eq!(stats.decisions("stable", "hash"), 200.0);
    let _ = &s.stable;
}

/// Sends one request per user over HTTP/2 (64 in flight) and returns the echoed variants.
async fn variants(envoy: &Envoy, users: &[String]) -> Vec<String> {
    let client = h2();
    stream::iter(users.iter().cloned())
        .map(|u| {
            let client = client.clone();
            let url = envoy.url("/");
            async move {
                let r = client
                    .get(url)
                    .header("x-user-id", u)
                    .send()
                    .await
                    .expect("request");
                assert!(r.status().is_success());
                r.headers()["x-canary-variant"]
                    .to_str()
                    .unwrap()
                    .to_string()
            }
        })
        .buffered(64)
        .collect()
        .await
}

#[tokio::test]
async fn canary_share_over_100k_users_matches_percent() {
    let s = setup(None).await;
    let users: Vec<String> = (0..100_000).map(|i| format!("user-{i:06}")).collect();
    let got = variants(&s.envoy, &users).await;
    let canary = got.iter().filter(|v| *v == "canary").count();
    let share = canary as f64 / users.len() as f64 * 100.0;
    assert!(
        (share - 12.5).abs() <= 0.5,
        "canary share {share:.3}% for 12.5%"
    );
    // The filter's decision is exactly the documented formula, user by user.
    for (u, v) in users.iter().zip(&got) {
        assert_eq!(v, cohort(SALT, u, 12.5), "{u}");
    }
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "the decisions counted", |st| {
            st.decisions("canary", "hash") >= canary as f64
        })
        .await;
    assert_eq!(stats.decisions("canary", "hash"), canary as f64);
}

#[tokio::test]
async fn raising_the_percent_only_moves_users_from_stable_to_canary() {
    let users: Vec<String> = (0..5_000).map(|i| format!("ramp-{i}")).collect();
    let mut runs = Vec::new();
    for percent in [10.0, 30.0] {
        let s = setup(Some(config_with(percent, |_| {}))).await;
        runs.push(variants(&s.envoy, &users).await);
    }
    let (at10, at30) = (&runs[0], &runs[1]);
    let mut moved = 0;
    for ((u, a), b) in users.iter().zip(at10).zip(at30) {
        assert!(
            !(a == "canary" && b == "stable"),
            "{u} went back to stable at 30%"
        );
        moved += usize::from(a == "stable" && b == "canary");
    }
    let c10 = at10.iter().filter(|v| *v == "canary").count();
    let c30 = at30.iter().filter(|v| *v == "canary").count();
    assert_eq!(c10 + moved, c30);
    assert!(
        (400..600).contains(&c10) && (1350..1650).contains(&c30),
        "{c10} {c30}"
    );
}

#[tokio::test]
async fn a_client_sent_route_header_cannot_choose_the_cohort() {
    let s = setup(None).await;
    let stable_user = user_in(SALT, 12.5, "stable", "s-");
    for (proto, client) in clients() {
        let req = client
            .get(s.envoy.url("/"))
            .header("x-user-id", stable_user.as_str())
            .header("x-canary-variant", "canary");
        assert_eq!(
            variant_of(&client, req).await,
            ("stable".into(), "stable".into()),
            "{proto}"
        );
        let seen = s.stable.last().await;
        assert_eq!(seen["headers"]["x-canary-variant"], "stable", "{proto}");
        // Without any user id the request gets an anonymous id (the fixture mints one) and
        // the cohort of that id, whatever the request claims.
        let req = client
            .get(s.envoy.url("/"))
            .header("x-canary-variant", "canary");
        let r = req.send().await.unwrap();
        let cohort = cohort(SALT, &minted_id(&r), 12.5);
        assert_eq!(r.headers()["x-upstream"], cohort, "{proto}");
        let backend = if cohort == "canary" {
            &s.canary
        } else {
            &s.stable
        };
        assert_eq!(
            backend.last().await["headers"]["x-canary-variant"],
            cohort,
            "{proto}"
        );
    }
}

#[tokio::test]
async fn allow_and_deny_lists_win_over_the_hash_and_deny_wins_over_allow() {
    // A stable-by-hash user on the allow list; a canary-by-hash user on both lists.
    let allowed = user_in(SALT, 12.5, "stable", "a-");
    let denied = user_in(SALT, 12.5, "canary", "d-");
    // 100,000 filler ids, as the scale requires.
    let mut allow: Vec<String> = (0..100_000).map(|i| format!("bulk-{i}")).collect();
    allow.push(allowed.clone());
    allow.push(denied.clone());
    let cfg = config_with(12.5, |c| {
        c["canary"]["allow"] = json!(allow);
        c["canary"]["deny"] = json!([denied.clone()]);
    });
    let s = setup(Some(cfg)).await;
    for (proto, client) in clients() {
        let got = variant_of(
            &client,
            client
                .get(s.envoy.url("/"))
                .header("x-user-id", allowed.as_str()),
        )
        .await;
        assert_eq!(got.0, "canary", "{proto} allow");
        let got = variant_of(
            &client,
            client
                .get(s.envoy.url("/"))
                .header("x-user-id", denied.as_str()),
        )
        .await;
        assert_eq!(got.0, "stable", "{proto} deny");
    }
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "the decisions counted", |st| {
            st.decisions("canary", "allow") >= 2.0 && st.decisions("stable", "deny") >= 2.0
        })
        .await;
    assert_eq!(stats.decisions("canary", "allow"), 2.0);
    assert_eq!(stats.decisions("stable", "deny"), 2.0);
}

#[tokio::test]
async fn anonymous_users_get_a_cookie_and_keep_their_variant() {
    let s = setup(Some(config_with(50.0, |_| {}))).await;
    for (proto, client) in clients() {
        let r = client.get(s.envoy.url("/")).send().await.unwrap();
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Lax")
                && cookie.contains("Max-Age=2592000"),
            "{cookie}"
        );
        let id = minted_id(&r);
        let first = r.headers()["x-canary-variant"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(first, cohort(SALT, &id, 50.0), "{proto}");
        for _ in 0..20 {
            let r = client
                .get(s.envoy.url("/"))
                .header("cookie", format!("other=1; hf_uid={id}"))
                .send()
                .await
                .unwrap();
            assert!(
                r.headers().get("set-cookie").is_none(),
                "{proto}: no new cookie once set"
            );
            assert_eq!(r.headers()["x-canary-variant"], first.as_str(), "{proto}");
            assert_eq!(r.headers()["x-upstream"], first.as_str(), "{proto}");
        }
    }
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "42 decisions counted", |st| {
            st.sum("handoff_canary_decisions") >= 42.0
        })
        .await;
    assert_eq!(stats.sum("handoff_canary_decisions") as u32, 42);
    assert_eq!(
        stats.sum_with("handoff_canary_decisions", &[("reason", "anonymous")]),
        42.0
    );
}

#[tokio::test]
async fn a_signed_override_forces_the_variant_and_a_forged_one_is_ignored() {
    let s = setup(None).await;
    let user = user_in(SALT, 12.5, "stable", "o-");
    let good = sign_override("change-me", "canary", &user);
    let forged = [
        sign_override("wrong-secret", "canary", &user),
        sign_override("change-me", "canary", "someone-else"),
        "canary.00".to_string(),
        "canary".to_string(),
    ];
    for (proto, client) in clients() {
        let req = client
            .get(s.envoy.url("/"))
            .header("x-user-id", user.as_str())
            .header("x-canary-override", good.as_str());
        assert_eq!(
            variant_of(&client, req).await,
            ("canary".into(), "canary".into()),
            "{proto}"
        );
        // The override header is consumed by the filter, not passed to the app.
        assert!(s.canary.last().await["headers"]
            .get("x-canary-override")
            .is_none());
        for f in &forged {
            let req = client
                .get(s.envoy.url("/"))
                .header("x-user-id", user.as_str())
                .header("x-canary-override", f.as_str());
            assert_eq!(variant_of(&client, req).await.0, "stable", "{proto} {f}");
        }
    }
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "the decisions counted", |st| {
            st.decisions("canary", "override") >= 2.0
        })
        .await;
    assert_eq!(stats.decisions("canary", "override"), 2.0);
    assert_eq!(stats.get("handoff_canary_override_rejected", &[]), 8.0);
}

#[tokio::test]
async fn the_user_id_comes_from_the_verified_jwt_claim() {
    // Without the anonymous cookie, a request with no usable id is `unidentified`.
    let s = setup(Some(config_with(12.5, |c| {
        c["canary"]
            .as_object_mut()
            .unwrap()
            .remove("anonymous_cookie");
    })))
    .await;
    let key = b"handoff-demo-jwt-secret-0123456789";
    let canary_sub = user_in(SALT, 12.5, "canary", "jwt-");
    for (proto, client) in clients() {
        let token = jwt(
            key,
            HS256_HEADER,
            &json!({"iss": "handoff-demo", "sub": canary_sub}),
        );
        let req = client.get(s.envoy.url("/")).bearer_auth(&token);
        assert_eq!(
            variant_of(&client, req).await,
            ("canary".into(), "canary".into()),
            "{proto}"
        );
        // A token signed with another key is not verified: its claim (an allow-listed id) is
        // never used, and the request is unidentified, hence stable.
        let forged = jwt(
            b"attacker-key-attacker-key-0000000",
            HS256_HEADER,
            &json!({"iss": "handoff-demo", "sub": "u-1"}),
        );
        let req = client.get(s.envoy.url("/")).bearer_auth(&forged);
        assert_eq!(variant_of(&client, req).await.0, "stable", "{proto}");
    }
    let stats = s
        .envoy
        .stats_when("handoff_canary_decisions", "the decisions counted", |st| {
            st.decisions("canary", "hash") >= 2.0 && st.decisions("stable", "unidentified") >= 2.0
        })
        .await;
    assert_eq!(stats.decisions("canary", "hash"), 2.0);
    assert_eq!(stats.decisions("stable", "unidentified"), 2.0);
}

#[tokio::test]
async fn an_invalid_config_makes_envoy_refuse_the_filter() {
    let cases = [
        (
            config_with(150.0, |_| {}),
            "invalid configuration at `canary.percent`: expected a number from 0 to 100",
        ),
        (
            json!({"canary": {"salt": "s", "percent": 1, "user_id": [{"header": "x"}], "persent": 2}}),
            "invalid configuration at `canary.persent`: unknown field `persent`",
        ),
        (json!({"canery": {}}), "unknown field `canery`"),
    ];
    for (cfg, line) in cases {
        let log = Envoy::start_expecting_failure(EnvoyOpts::new("canary").plugin_config(cfg)).await;
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
        assert_eq!(
            hits.len(),
            1,
            "expected exactly one log line with {line:?}:\n{log}"
        );
        assert!(hits[0].contains("[error]"), "{}", hits[0]);
    }
}
