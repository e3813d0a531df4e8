//! The standalone twins of the Istio sidecars (`envoy/client-side.yaml`,
//! `envoy/server-side.yaml`), run as shipped: the same plugin configurations as the WasmPlugins
//! under istio/ (tests/istio_manifests.rs keeps them identical), on a real Envoy.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use support::{clients, Backend, Envoy, EnvoyOpts};

/// The cohort the client side assigns `user`, from the twin's own salt and percent.
fn cohort_of(user: &str) -> &'static str {
    let config = support::fixture_plugin_config("client-side");
    let salt = config["canary"]["salt"].as_str().unwrap();
    let percent = config["canary"]["percent"].as_f64().unwrap();
    support::cohort(salt, user, percent)
}

#[tokio::test]
async fn client_side_routes_each_cohort_to_its_version() {
    let (stable, canary) = Backend::versions("stable", "canary");
    let envoy = Envoy::start(EnvoyOpts::new("client-side").versions(&stable, &canary)).await;
    let user_in = |want: &'static str| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| cohort_of(u) == want)
            .unwrap()
    };
    for (proto, client) in clients() {
        for want in ["canary", "stable"] {
            let user = user_in(want);
            // A client-sent route header never picks the cohort: the filter replaces it.
            let r = client
                .get(envoy.url("/api/v1/payments"))
                .header("x-user-id", &user)
                .header("x-canary-variant", "canary")
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{proto}: {}", r.status());
            let h = |n: &str| r.headers()[n].to_str().unwrap().to_string();
            assert_eq!(h("x-canary-variant"), want, "{proto} {user}");
            assert_eq!(h("x-upstream"), want, "{proto} {user}");
        }
    }
}

#[tokio::test]
async fn server_side_passes_requests_to_the_app() {
    let app = Backend::start("app", "v1");
    let envoy = Envoy::start(EnvoyOpts::new("server-side").upstream(8081, &app)).await;
    for (proto, client) in clients() {
        let r = client
            .get(envoy.url("/api/v1/payments"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{proto}: {}", r.status());
        assert_eq!(r.headers()["x-upstream"], "app", "{proto}");
    }
}
