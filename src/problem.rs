//! Local replies: `application/problem+json` (RFC 9457) bodies the filter answers with.

use serde::Serialize;

/// Every problem `type` is a link to its section of docs/problems.md, whose heading is the
/// anchor itself (`## idempotency-missing-key`); tests/docs.rs checks that each one exists.
pub const PROBLEM_DOCS: &str =
    "https://github.com/handoff-proxy/handoff/blob/main/docs/problems.md#";

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Reply {
    /// A problem+json reply. `anchor` names its section of docs/problems.md.
    pub fn problem(status: u16, anchor: &str, title: &str, detail: &str) -> Reply {
        let body = ProblemBody {
            kind: format!("{PROBLEM_DOCS}{anchor}"),
            title,
            status,
            detail,
        };
        Reply {
            status,
            headers: vec![(
                "content-type".to_string(),
                "application/problem+json".to_string(),
            )],
            // Serializing a struct of strings and a number cannot fail.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_has_the_rfc_9457_members() {
        let r = Reply::problem(400, "idempotency-missing-key", "Missing key", "send one");
        assert_eq!(r.status, 400);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], 400);
        assert_eq!(v["title"], "Missing key");
        assert_eq!(v["detail"], "send one");
        assert!(v["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-missing-key"));
        assert_eq!(r.headers[0].1, "application/problem+json");
    }
}
