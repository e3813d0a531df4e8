//! Envoy reaches etcd over TLS with a client certificate, as docs/configure/canary-control.md
//! ("Securing the prefix") configures the `etcd` cluster: etcd runs with --client-cert-auth
//! and a CA made in the test; the cluster's transport socket presents a certificate that CA
//! signed. Proven through the idempotency store (the same cluster, gateway and requests the
//! rollout control uses): a retry is replayed from etcd; without the certificate it cannot
//! be stored and `on_error` decides.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use support::etcd::{idempotency_opts, Etcd};
use support::pki::Pki;
use support::{h1, payment, post, Backend, Envoy};

const PAY: &str = "/api/v1/payments";

/// The `etcd` cluster's transport socket: the CA that signed etcd's certificate, the name in
/// it, and the client certificate `client` (none: TLS without a client certificate).
fn transport_socket(pki: &Pki, client: Option<&str>) -> Value {
    let mut context = json!({
        "validation_context": {
            "trusted_ca": {"filename": pki.path("ca.pem")},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}]
        }
    });
    if let Some(name) = client {
        context["tls_certificates"] = json!([{
            "certificate_chain": {"filename": pki.path(&format!("{name}.pem"))},
            "private_key": {"filename": pki.path(&format!("{name}-key.pem"))}
        }]);
    }
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": context
        }
    })
}

async fn envoy(backend: &Backend, etcd: &Etcd, socket: Value) -> Envoy {
    let opts = idempotency_opts(backend, etcd.client_port, "reject", 30).edit(move |cfg| {
        let clusters = cfg["static_resources"]["clusters"].as_array_mut().unwrap();
        let etcd = clusters.iter_mut().find(|c| c["name"] == "etcd").unwrap();
        etcd["transport_socket"] = socket;
    });
    Envoy::start(opts).await
}

#[tokio::test]
async fn envoy_reaches_etcd_over_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.tls()).await;
    let backend = Backend::start("payments", "v1");

    let a = envoy(&backend, &etcd, transport_socket(&pki, Some("client"))).await;
    let first = post(&h1(), a.url(PAY), Some("tls-1"), &payment(7)).await;
    assert_eq!(first.status, 201);
    let b = envoy(&backend, &etcd, transport_socket(&pki, Some("client"))).await;
    let again = post(&h1(), b.url(PAY), Some("tls-1"), &payment(7)).await;
    assert_eq!(again.status, 201);
    assert_eq!(
        again.headers["idempotent-replayed"], "true",
        "stored in etcd over TLS"
    );
    assert_eq!(again.body, first.body);

    // Without a client certificate etcd refuses the handshake: nothing can be stored, and
    // on_error (reject) answers instead of running the payment unguarded.
    let c = envoy(&backend, &etcd, transport_socket(&pki, None)).await;
    let r = post(&h1(), c.url(PAY), Some("tls-2"), &payment(8)).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
}
