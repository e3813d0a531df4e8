//! Idempotency-Key enforcement (draft-ietf-httpapi-idempotency-key-header), as pure policy:
//! the configuration, key parsing ([`key`]), the state machine ([`machine`]), the stored record
//! ([`record`]) and the two stores' logic ([`local`] over a shared-data trait, [`etcd`] as
//! request builders and parsers). The filter (`src/filter/idempotency.rs`) does the I/O.

pub mod capture;
pub mod etcd;
pub mod key;
pub mod local;
pub mod machine;
pub mod outbox;
pub mod record;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::problem::Reply;
use crate::source::{RequestView, Source};
use record::StoredResponse;

/// The response header every replay carries.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// What the local store does with a new key when its slots all hold live keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Forward without protection (counted `evicted`): availability first.
    #[default]
    AcceptUnprotected,
    /// Answer 503 `idempotency-store-full` (counted `evicted`): safety first.
    Reject,
}

/// What to do when etcd cannot answer within `timeout_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// 503 `idempotency-store-unavailable`, not forwarded.
    #[default]
    Reject,
    /// Forward without protection (counted `store_error`).
    Allow,
}

/// The validated section.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub header: String,
    pub aliases: Vec<String>,
    pub methods: Vec<String>,
    pub path_prefixes: Vec<String>,
    pub required: bool,
    pub max_key_length: usize,
    pub ttl_s: u64,
    pub lock_timeout_s: u64,
    pub scope: Vec<Source>,
    pub store: Store,
    pub store_5xx: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    Local {
        max_entries: u32,
        max_response_bytes: usize,
        when_full: WhenFull,
    },
    Etcd {
        cluster: String,
        authority: String,
        prefix: String,
        timeout_ms: u64,
        on_error: OnError,
        max_response_bytes: usize,
    },
}

/// Upper bounds that keep a typo from allocating gigabytes of shared data.
pub const MAX_ENTRIES_LIMIT: u32 = 1_000_000;
pub const MAX_RESPONSE_LIMIT: usize = 4 * 1024 * 1024;
pub const MAX_KEY_LENGTH_LIMIT: usize = 1024;

/// Every outcome counted in `handoff_idempotency_outcomes{outcome=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    First,
    Replayed,
    InFlightConflict,
    Mismatch,
    MissingKey,
    InvalidKey,
    StoreError,
    Evicted,
    NotReplayable,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::First,
        Outcome::Replayed,
        Outcome::InFlightConflict,
        Outcome::Mismatch,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::StoreError,
        Outcome::Evicted,
        Outcome::NotReplayable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::First => "first",
            Outcome::Replayed => "replayed",
            Outcome::InFlightConflict => "in_flight_conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::StoreError => "store_error",
            Outcome::Evicted => "evicted",
            Outcome::NotReplayable => "not_replayable",
        }
    }
}

/// What the request headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// Method or path not covered: pass through.
    NotCovered,
    /// Covered, no key, and `required` is off: pass through.
    Optional,
    /// Answer with this problem (missing or invalid key).
    Reject(Outcome, Reply),
    /// Covered with a valid key: the namespaced store key.
    Key { store_key: [u8; 32], key: String },
}

impl Idempotency {
    /// Whether the method and path (the query is ignored) are covered.
    pub fn covers(&self, method: &str, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.methods.iter().any(|m| m == method)
            && self.path_prefixes.iter().any(|p| path.starts_with(p))
    }

    /// For the start-up log line.
    pub fn store_summary(&self) -> String {
        match &self.store {
            Store::Local { max_entries, .. } => format!("local store, {max_entries} entries"),
            Store::Etcd { cluster, .. } => format!("etcd store via cluster {cluster}"),
        }
    }

    pub fn max_response_bytes(&self) -> usize {
        match &self.store {
            Store::Local {
                max_response_bytes, ..
            }
            | Store::Etcd {
                max_response_bytes, ..
            } => *max_response_bytes,
        }
    }

    /// Reads the key (header, then aliases; raw bytes from `header`) and the scope, and
    /// returns the namespaced key or the problem to answer.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        header: &dyn Fn(&str) -> Option<Vec<u8>>,
        req: &dyn RequestView,
    ) -> KeyCheck {
        if !self.covers(method, path) {
            return KeyCheck::NotCovered;
        }
        let raw = std::iter::once(&self.header)
            .chain(&self.aliases)
            .find_map(|h| header(h));
        let Some(raw) = raw else {
            return if self.required {
                KeyCheck::Reject(
                    Outcome::MissingKey,
                    Reply::problem(
                        400,
                        "idempotency-missing-key",
                        "Idempotency-Key required",
                        &format!(
                            "{method} {} requires an `{}` header: a unique value per operation, \
                             sent again unchanged on every retry",
                            path.split('?').next().unwrap_or(path),
                            self.header
                        ),
                    ),
                )
            } else {
                KeyCheck::Optional
            };
        };
        match key::parse_key(&raw, self.max_key_length) {
            Ok(key) => {
                let scope = self
                    .scope
                    .iter()
                    .find_map(|s| s.read(req).map(|v| (s.label(), v)));
                let (label, value) = scope.unwrap_or_default();
                KeyCheck::Key {
                    store_key: store_key(&label, &value, &key),
                    key,
                }
            }
            Err(e) => KeyCheck::Reject(
                Outcome::InvalidKey,
                Reply::problem(
                    400,
                    "idempotency-invalid-key",
                    "Invalid Idempotency-Key",
                    &e.detail(),
                ),
            ),
        }
    }
}

/// Length-prefixed concatenation, so that ("ab", "c") and ("a", "bc") differ.
fn hash_parts(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The namespaced key: which scope source matched, its value, and the client's key, hashed
/// together. A caller can only ever address records under its own scope value.
pub fn store_key(scope_label: &str, scope_value: &str, key: &str) -> [u8; 32] {
    hash_parts(
        b"handoff-idempotency-key-v1",
        &[
            scope_label.as_bytes(),
            scope_value.as_bytes(),
            key.as_bytes(),
        ],
    )
}

/// The fingerprint of an operation: method, path (with query) and SHA-256 of the body, all as
/// forwarded upstream.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    // A JSON body is hashed in canonical form (sorted keys, no insignificant white space): the
    // translated body of a v1 request and the same operation sent as v2 are one operation, as
    // are two serializations of one document.
    // (translate's borrowed tree writes exactly what a serde_json::Value would, faster.)
    let canonical = serde_json::from_slice::<crate::translate::tree::Node>(body)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok());
    let body_hash: [u8; 32] = Sha256::digest(canonical.as_deref().unwrap_or(body)).into();
    hash_parts(
        b"handoff-idempotency-fp-v1",
        &[method.as_bytes(), path.as_bytes(), &body_hash],
    )
}

#[cfg(test)]
mod fingerprint_tests {
    use super::fingerprint;

    #[test]
    fn json_bodies_are_compared_in_canonical_form() {
        let a = fingerprint("POST", "/p", br#"{"b": 1, "a": {"y": 2, "x": 1}}"#);
        let b = fingerprint("POST", "/p", br#"{"a":{"x":1,"y":2},"b":1}"#);
        assert_eq!(a, b);
        assert_ne!(
            a,
            fingerprint("POST", "/p", br#"{"a":{"x":1,"y":3},"b":1}"#)
        );
        // Not JSON: the bytes themselves.
        assert_ne!(
            fingerprint("POST", "/p", b"a=1 "),
            fingerprint("POST", "/p", b"a=1")
        );
    }
}

/// Response headers that are not stored: hop-by-hop ones, the length (Envoy sets it on the
/// replay) and per-attempt values.
pub fn stored_header(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "date"
            | "x-envoy-upstream-service-time"
    ) && !name.starts_with(':')
        && name != REPLAYED_HEADER
}

/// A stored response as a reply to a duplicate: same status, headers and bytes, marked.
pub fn replay_reply(r: &StoredResponse) -> Reply {
    let mut headers = r.headers.clone();
    headers.push((REPLAYED_HEADER.to_string(), "true".to_string()));
    Reply {
        status: r.status,
        headers,
        body: r.body.clone(),
    }
}

/// The problem replies that do not depend on the request.
pub fn problem(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::InFlightConflict => Reply::problem(
            409,
            "idempotency-in-flight",
            "Request in progress",
            "a request with this Idempotency-Key is still being processed; retry later with \
             the same key",
        ),
        Outcome::Mismatch => Reply::problem(
            422,
            "idempotency-mismatch",
            "Idempotency-Key reused",
            "this Idempotency-Key was already used for a request with a different method, path \
             or body; use a new key for a new operation",
        ),
        Outcome::NotReplayable => Reply::problem(
            409,
            "idempotency-not-replayable",
            "Completed, response not replayable",
            "the request with this Idempotency-Key completed, but its response was too large \
             to store, so it cannot be replayed; it will not be executed again, do not retry \
             with this key",
        ),
        Outcome::StoreError => Reply::problem(
            503,
            "idempotency-store-unavailable",
            "Idempotency store unavailable",
            "the idempotency store did not answer in time; the request was not forwarded and \
             is safe to retry with the same key",
        )
        .with_header("retry-after", "1"),
        Outcome::Evicted => Reply::problem(
            503,
            "idempotency-store-full",
            "Idempotency store full",
            "the idempotency store holds the maximum number of live keys; the request was not \
             forwarded and is safe to retry with the same key",
        )
        .with_header("retry-after", "1"),
        // Missing and invalid keys carry request details: see `Idempotency::check`.
        Outcome::MissingKey | Outcome::InvalidKey | Outcome::First | Outcome::Replayed => {
            Reply::problem(400, "idempotency", "Bad request", "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use crate::source::fake::FakeRequest;
    use proptest::prelude::*;

    fn cfg(json: &str) -> Idempotency {
        Config::parse(format!(r#"{{"idempotency": {json}}}"#).as_bytes())
            .unwrap()
            .idempotency
            .unwrap()
    }

    fn err(json: &str) -> ConfigError {
        Config::parse(format!(r#"{{"idempotency": {json}}}"#).as_bytes()).unwrap_err()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = cfg("{}");
        assert_eq!(c.header, "idempotency-key");
        assert_eq!(c.aliases, vec!["x-idempotency-key"]);
        assert_eq!(c.methods, vec!["POST", "PATCH"]);
        assert_eq!(c.path_prefixes, vec!["/"]);
        assert!(c.required && !c.store_5xx);
        assert_eq!(
            (c.max_key_length, c.ttl_s, c.lock_timeout_s),
            (255, 86400, 30)
        );
        assert!(c.scope.is_empty());
        assert_eq!(
            c.store,
            Store::Local {
                max_entries: 10_000,
                max_response_bytes: 65_536,
                when_full: WhenFull::AcceptUnprotected
            }
        );
        let e = cfg(r#"{"store": {"type": "etcd"}}"#);
        assert_eq!(
            e.store,
            Store::Etcd {
                cluster: "etcd".into(),
                authority: "etcd".into(),
                prefix: "/handoff/idem/".into(),
                timeout_ms: 250,
                on_error: OnError::Reject,
                max_response_bytes: 65_536
            }
        );
        let c = cfg(
            r#"{"scope": [{"header": "x-user-id"}, {"jwt_claim": "sub"}, {"peer_principal": true}],
                "store": {"type": "local", "max_entries": 5, "max_response_bytes": 10, "when_full": "reject"}}"#,
        );
        assert_eq!(c.scope.len(), 3);
        assert_eq!(c.max_response_bytes(), 10);
    }

    #[test]
    fn one_rejection_per_rule() {
        for (json, path) in [
            (r#"{"header": "Idem"}"#, "idempotency.header"),
            (r#"{"aliases": ["a b"]}"#, "idempotency.aliases[0]"),
            (
                r#"{"aliases": ["idempotency-key"]}"#,
                "idempotency.aliases[0]",
            ),
            (r#"{"methods": []}"#, "idempotency.methods"),
            (r#"{"methods": ["post"]}"#, "idempotency.methods[0]"),
            (r#"{"path_prefixes": []}"#, "idempotency.path_prefixes"),
            (
                r#"{"path_prefixes": ["api"]}"#,
                "idempotency.path_prefixes[0]",
            ),
            (r#"{"max_key_length": 0}"#, "idempotency.max_key_length"),
            (r#"{"max_key_length": 5000}"#, "idempotency.max_key_length"),
            (r#"{"ttl_s": 0}"#, "idempotency.ttl_s"),
            (r#"{"lock_timeout_s": 0}"#, "idempotency.lock_timeout_s"),
            (
                r#"{"ttl_s": 10, "lock_timeout_s": 11}"#,
                "idempotency.lock_timeout_s",
            ),
            (r#"{"scope": [{"header": ""}]}"#, "idempotency.scope[0]"),
            (
                r#"{"store": {"type": "local", "max_entries": 0}}"#,
                "idempotency.store.max_entries",
            ),
            (
                r#"{"store": {"type": "local", "max_response_bytes": 99999999}}"#,
                "idempotency.store.max_response_bytes",
            ),
            (
                r#"{"store": {"type": "etcd", "cluster": ""}}"#,
                "idempotency.store.cluster",
            ),
            (
                r#"{"store": {"type": "etcd", "authority": ""}}"#,
                "idempotency.store.authority",
            ),
            (
                r#"{"store": {"type": "etcd", "prefix": "x"}}"#,
                "idempotency.store.prefix",
            ),
            (
                r#"{"store": {"type": "etcd", "timeout_ms": 0}}"#,
                "idempotency.store.timeout_ms",
            ),
            (
                r#"{"store": {"type": "local", "cluster": "etcd"}}"#,
                "idempotency.store.cluster",
            ),
            (
                r#"{"store": {"on_error": "allow"}}"#,
                "idempotency.store.on_error",
            ),
            (
                r#"{"store": {"type": "etcd", "max_entries": 5}}"#,
                "idempotency.store.max_entries",
            ),
            (
                r#"{"store": {"type": "etcd", "when_full": "reject"}}"#,
                "idempotency.store.when_full",
            ),
        ] {
            assert_eq!(err(json).path, path, "{json}: {}", err(json));
        }
        // Shape errors from serde name their path too.
        assert!(err(r#"{"store": {"type": "redis"}}"#)
            .to_string()
            .contains("redis"));
        assert!(err(r#"{"store": {"type": "local", "max_entrie": 1}}"#)
            .to_string()
            .contains("max_entrie"));
        assert!(err(r#"{"store": {"type": "local", "when_full": "drop"}}"#)
            .to_string()
            .contains("drop"));
        assert!(err(r#"{"store": {"type": "etcd", "on_error": "maybe"}}"#)
            .to_string()
            .contains("maybe"));
        assert_eq!(err(r#"{"tll_s": 1}"#).path, "idempotency.tll_s");
    }

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<Vec<u8>> {
        let pairs: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn coverage_and_key_checks() {
        let c = cfg(r#"{"path_prefixes": ["/api/"], "scope": [{"header": "x-user-id"}]}"#);
        let req = FakeRequest::default();
        let none = headers(&[]);
        assert_eq!(c.check("GET", "/api/x", &none, &req), KeyCheck::NotCovered);
        assert_eq!(c.check("POST", "/other", &none, &req), KeyCheck::NotCovered);
        match c.check("POST", "/api/x?a=1", &none, &req) {
            KeyCheck::Reject(Outcome::MissingKey, r) => assert_eq!(r.status, 400),
            other => panic!("{other:?}"),
        }
        match c.check(
            "POST",
            "/api/x",
            &headers(&[("idempotency-key", "a b")]),
            &req,
        ) {
            KeyCheck::Reject(Outcome::InvalidKey, r) => assert_eq!(r.status, 400),
            other => panic!("{other:?}"),
        }
        let via_alias = c.check(
            "POST",
            "/api/x",
            &headers(&[("x-idempotency-key", "\"k1\"")]),
            &req,
        );
        let direct = c.check(
            "POST",
            "/api/x",
            &headers(&[("idempotency-key", "k1")]),
            &req,
        );
        assert_eq!(via_alias, direct);
        let optional = cfg(r#"{"required": false}"#);
        assert_eq!(optional.check("POST", "/", &none, &req), KeyCheck::Optional);
    }

    #[test]
    fn scopes_namespace_keys() {
        let c = cfg(r#"{"scope": [{"header": "x-user-id"}, {"jwt_claim": "sub"}]}"#);
        let h = headers(&[("idempotency-key", "k")]);
        let key_for = |req: &FakeRequest| match c.check("POST", "/", &h, req) {
            KeyCheck::Key { store_key, .. } => store_key,
            other => panic!("{other:?}"),
        };
        let alice = key_for(&FakeRequest::default().with_header("x-user-id", "alice"));
        let bob = key_for(&FakeRequest::default().with_header("x-user-id", "bob"));
        let anon = key_for(&FakeRequest::default());
        let claim = key_for(&FakeRequest::default().with_claim("sub", "alice"));
        assert_ne!(alice, bob);
        assert_ne!(alice, anon);
        assert_ne!(alice, claim, "the source is part of the namespace");
        // The header wins over the claim: the first source present.
        assert_eq!(
            key_for(
                &FakeRequest::default()
                    .with_header("x-user-id", "alice")
                    .with_claim("sub", "x")
            ),
            alice
        );
    }

    #[test]
    fn replies() {
        let r = replay_reply(&StoredResponse {
            status: 201,
            headers: vec![("x-a".into(), "1".into())],
            body: b"abc".to_vec(),
        });
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"abc");
        assert!(r
            .headers
            .contains(&("idempotent-replayed".into(), "true".into())));
        for (o, status, anchor) in [
            (Outcome::InFlightConflict, 409, "#idempotency-in-flight"),
            (Outcome::Mismatch, 422, "#idempotency-mismatch"),
            (Outcome::NotReplayable, 409, "#idempotency-not-replayable"),
            (Outcome::StoreError, 503, "#idempotency-store-unavailable"),
            (Outcome::Evicted, 503, "#idempotency-store-full"),
        ] {
            let p = problem(o);
            assert_eq!(p.status, status);
            let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            assert!(v["type"].as_str().unwrap().ends_with(anchor));
        }
        assert!(stored_header("content-type") && stored_header("x-upstream"));
        assert!(!stored_header("content-length") && !stored_header("transfer-encoding"));
        assert!(!stored_header(":status") && !stored_header("idempotent-replayed"));
        assert_eq!(Outcome::ALL.len(), 9);
    }

    proptest! {
        #[test]
        fn namespacing_is_unambiguous(a in "[a-c]{0,4}", b in "[a-c]{0,4}", c in "[a-c]{0,4}", d in "[a-c]{0,4}") {
            // Different splits of the same characters never collide.
            if (a.as_str(), b.as_str()) != (c.as_str(), d.as_str()) {
                prop_assert_ne!(store_key("h", &a, &b), store_key("h", &c, &d));
            }
        }

        #[test]
        fn fingerprints_separate_method_path_body(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let f = fingerprint("POST", "/p", &body);
            prop_assert_eq!(f, fingerprint("POST", "/p", &body));
            prop_assert_ne!(f, fingerprint("PATCH", "/p", &body));
            prop_assert_ne!(f, fingerprint("POST", "/p?x=1", &body));
            let mut other = body.clone();
            other.push(0);
            prop_assert_ne!(f, fingerprint("POST", "/p", &other));
        }
    }
}
