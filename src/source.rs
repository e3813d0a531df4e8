//! Where a request-derived value (a user id, an idempotency scope) comes from, and the pure
//! parsers for cookies and query strings. The filter implements [`RequestView`] over the host;
//! tests implement it over plain maps.

use serde::Deserialize;

/// Values longer than this are treated as absent: an id is a short token, and a 64 KB cookie
/// must not become a 64 KB allowlist lookup or store key.
pub const MAX_VALUE_LEN: usize = 256;

/// One place to read a value from. JSON form: `{"header": "x-user-id"}`, `{"cookie": "uid"}`,
/// `{"query": "uid"}`, `{"jwt_claim": "sub"}`, `{"peer_principal": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Header(String),
    Cookie(String),
    Query(String),
    /// A claim of the JWT payload that Envoy's jwt_authn filter verified (its dynamic
    /// metadata); never read from the token itself.
    JwtClaim(String),
    /// The peer's identity from mTLS (the SAN URI, e.g. a SPIFFE id in Istio).
    PeerPrincipal(bool),
}

/// Read access to the current request, implemented lazily by the filter so that only the
/// sources actually consulted cost a host call.
pub trait RequestView {
    fn header(&self, name: &str) -> Option<String>;
    /// `:path`, including the query string.
    fn path(&self) -> Option<String>;
    /// A claim of the verified JWT payload, as a string (numbers are rendered as JSON).
    fn jwt_claim(&self, claim: &str) -> Option<String>;
    fn peer_principal(&self) -> Option<String>;
}

impl Source {
    /// The value of this source on the request, if present, non-empty and not oversized.
    pub fn read(&self, req: &dyn RequestView) -> Option<String> {
        let value = match self {
            Source::Header(name) => req.header(name),
            Source::Cookie(name) => req
                .header("cookie")
                .and_then(|c| cookie_value(&c, name).map(str::to_string)),
            Source::Query(name) => req.path().and_then(|p| query_value(&p, name)),
            Source::JwtClaim(claim) => req.jwt_claim(claim),
            Source::PeerPrincipal(true) => req.peer_principal(),
            Source::PeerPrincipal(false) => None,
        }?;
        let value = value.trim();
        if value.is_empty() || value.len() > MAX_VALUE_LEN {
            return None;
        }
        Some(value.to_string())
    }

    /// A short label for logs and metrics: `header:x-user-id`.
    pub fn label(&self) -> String {
        match self {
            Source::Header(n) => format!("header:{n}"),
            Source::Cookie(n) => format!("cookie:{n}"),
            Source::Query(n) => format!("query:{n}"),
            Source::JwtClaim(n) => format!("jwt_claim:{n}"),
            Source::PeerPrincipal(_) => "peer_principal".to_string(),
        }
    }
}

/// The first value of cookie `name` in a `Cookie` header (`a=1; b=2`). Quotes around the value
/// are removed, as RFC 6265 allows them.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k.trim() != name {
            return None;
        }
        let v = v.trim();
        Some(
            v.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or(v),
        )
    })
}

/// The first value of query parameter `name` in a path, percent-decoded. Undecodable values
/// (invalid escapes or UTF-8) are treated as absent.
pub fn query_value(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            percent_decode(v)
        } else {
            None
        }
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
pub mod fake {
    //! A [`RequestView`] over plain data, for tests of the policies.
    use super::RequestView;
    use std::collections::HashMap;

    #[derive(Default, Clone)]
    pub struct FakeRequest {
        pub headers: HashMap<String, String>,
        pub path: String,
        pub claims: HashMap<String, String>,
        pub principal: Option<String>,
    }

    impl FakeRequest {
        pub fn with_header(mut self, k: &str, v: &str) -> Self {
            self.headers.insert(k.to_string(), v.to_string());
            self
        }
        pub fn with_path(mut self, p: &str) -> Self {
            self.path = p.to_string();
            self
        }
        pub fn with_claim(mut self, k: &str, v: &str) -> Self {
            self.claims.insert(k.to_string(), v.to_string());
            self
        }
    }

    impl RequestView for FakeRequest {
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }
        fn path(&self) -> Option<String> {
            Some(self.path.clone())
        }
        fn jwt_claim(&self, claim: &str) -> Option<String> {
            self.claims.get(claim).cloned()
        }
        fn peer_principal(&self) -> Option<String> {
            self.principal.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeRequest;
    use super::*;

    #[test]
    fn cookie_parsing() {
        assert_eq!(cookie_value("a=1; uid=u-7; b=2", "uid"), Some("u-7"));
        assert_eq!(cookie_value("uid=\"q\"", "uid"), Some("q"));
        assert_eq!(cookie_value("xuid=1", "uid"), None);
        assert_eq!(cookie_value("", "uid"), None);
        assert_eq!(cookie_value("garbage;;;=", "uid"), None);
    }

    #[test]
    fn query_parsing() {
        assert_eq!(query_value("/p?uid=u%2D1&x=2", "uid"), Some("u-1".into()));
        assert_eq!(query_value("/p?x=2&uid=a+b", "uid"), Some("a b".into()));
        assert_eq!(query_value("/p", "uid"), None);
        assert_eq!(query_value("/p?uid=%zz", "uid"), None);
        assert_eq!(query_value("/p?uid", "uid"), Some(String::new()));
    }

    #[test]
    fn sources_skip_empty_and_oversized_values() {
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let req = FakeRequest::default()
            .with_header("x-user-id", "  ")
            .with_header("x-big", &long)
            .with_header("cookie", "uid=c-1")
            .with_path("/a?uid=q-1")
            .with_claim("sub", "j-1");
        assert_eq!(Source::Header("x-user-id".into()).read(&req), None);
        assert_eq!(Source::Header("x-big".into()).read(&req), None);
        assert_eq!(Source::Cookie("uid".into()).read(&req), Some("c-1".into()));
        assert_eq!(Source::Query("uid".into()).read(&req), Some("q-1".into()));
        assert_eq!(
            Source::JwtClaim("sub".into()).read(&req),
            Some("j-1".into())
        );
    }

    #[test]
    fn source_json_forms() {
        let s: Vec<Source> = serde_json::from_str(
            r#"[{"header":"x-user-id"},{"cookie":"uid"},{"query":"uid"},{"jwt_claim":"sub"},{"peer_principal":true}]"#,
        )
        .unwrap();
        assert_eq!(s.len(), 5);
        assert!(serde_json::from_str::<Source>(r#"{"hdr":"x"}"#).is_err());
    }
}
