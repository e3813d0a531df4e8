//! The cookie and query-string parsers, and `Source::read` over them, with arbitrary headers,
//! paths and names: no panic, and what comes out is a bounded, trimmed piece of the input.
#![no_main]

use handoff::source::{cookie_value, query_value, RequestView, Source, MAX_VALUE_LEN};
use libfuzzer_sys::fuzz_target;

struct Req<'a> {
    cookie: &'a str,
    path: &'a str,
}

impl RequestView for Req<'_> {
    fn header(&self, name: &str) -> Option<String> {
        (name == "cookie").then(|| self.cookie.to_string())
    }
    fn path(&self) -> Option<String> {
        Some(self.path.to_string())
    }
    fn jwt_claim(&self, _: &str) -> Option<String> {
        None
    }
    fn peer_principal(&self) -> Option<String> {
        None
    }
}

fuzz_target!(|input: (&str, &str, &str)| {
    let (cookie, path, name) = input;
    if let Some(v) = cookie_value(cookie, name) {
        assert!(cookie.contains(v), "cookie value is not part of the header");
        assert!(!v.contains(';'), "cookie value crosses a pair: {v:?}");
    }
    // Decoding never makes a value longer than its encoding.
    if let Some(v) = query_value(path, name) {
        assert!(v.len() <= path.len());
    }
    let req = Req { cookie, path };
    for source in [
        Source::Cookie(name.to_string()),
        Source::Query(name.to_string()),
    ] {
        if let Some(v) = source.read(&req) {
            assert!(!v.is_empty() && v.len() <= MAX_VALUE_LEN, "{v:?}");
            assert_eq!(v.trim(), v, "value is not trimmed");
        }
    }
});
