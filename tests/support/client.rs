//! What a test sends and what it gets back: a whole response read at once ([`Resp`]), the
//! problem+json check every capability's errors share, the demo payment body and its POST, and
//! the cohort formula the tests compare the filter's decisions with.

use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use std::path::Path;

/// A response read to its end: status, headers and the body's bytes.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub async fn read(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.expect("response body").to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Answered from the idempotency store (`idempotent-replayed: true`).
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The content-length is there and is the body's real length.
    pub fn assert_length_correct(&self) {
        let l = self.header("content-length").expect("a content-length");
        assert_eq!(
            l.parse::<usize>().unwrap(),
            self.body.len(),
            "content-length"
        );
    }

    /// An answer the filter gave itself: `application/problem+json` with this status, a title,
    /// a detail, and a `type` that links to the section `anchor` of docs/problems.md (which
    /// must exist). Returns the problem body.
    pub fn assert_problem(&self, status: u16, anchor: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let p = self.json();
        assert_problem_body(&p, status, anchor);
        p
    }
}

/// The members of a problem body (RFC 9457) and its documented `type`.
pub fn assert_problem_body(p: &Value, status: u16, anchor: &str) {
    assert_eq!(p["status"], status, "{p}");
    assert_eq!(
        p["type"].as_str().unwrap_or(""),
        format!("{}{anchor}", handoff::problem::PROBLEM_DOCS),
        "{p}"
    );
    assert!(!p["title"].as_str().unwrap_or("").is_empty(), "{p}");
    assert!(!p["detail"].as_str().unwrap_or("").is_empty(), "{p}");
    assert_documented(anchor);
}

/// `anchor` is a section (`## <anchor>`) of docs/problems.md.
pub fn assert_documented(anchor: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/problems.md");
    let page = std::fs::read_to_string(&path).expect("docs/problems.md");
    assert!(
        page.lines().any(|l| l.trim() == format!("## {anchor}")),
        "problem type `{anchor}` has no section `## {anchor}` in docs/problems.md"
    );
}

/// Sends a request and reads the whole answer.
pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    Resp::read(req.send().await.expect("request through Envoy")).await
}

/// A v1 payment of the `payments` example.
pub fn payment(amount: u64) -> Value {
    json!({"amount": amount, "currency": "EUR", "customer_id": "c-1"})
}

/// A JSON POST with an `Idempotency-Key` (none when `key` is `None`).
pub async fn post(client: &reqwest::Client, url: String, key: Option<&str>, body: &Value) -> Resp {
    let mut req = client.post(url).json(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    send(req).await
}

/// The cohort handoff assigns `user` with this salt and percent (no allow, deny or override):
/// the formula of docs/configure/canary.md, computed by the filter's own code.
pub fn cohort(salt: &str, user: &str, percent: f64) -> &'static str {
    use handoff::canary::{bucket, threshold};
    if bucket(salt, user) < threshold(percent) {
        "canary"
    } else {
        "stable"
    }
}

/// The first id `<prefix><n>` that [`cohort`] puts in `want`.
pub fn user_in(salt: &str, percent: f64, want: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| cohort(salt, u, percent) == want)
        .expect("some user of each cohort")
}
