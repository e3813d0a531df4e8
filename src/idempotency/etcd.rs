//! The etcd store, as pure request builders and response parsers for etcd's v3 JSON gateway
//! (`POST /v3/lease/grant`, `/v3/kv/txn`; keys and values base64, int64 as strings). The filter
//! sends them with `dispatch_http_call` to the configured cluster.
//!
//! - lock: grant a lease of `ttl_s`, then one transaction: if the key's `create_revision` is 0
//!   (absent), put the in-flight record with the lease; else range the key, in the same
//!   transaction, so the existing record decides the request.
//! - take over an abandoned lock: put if the key's `mod_revision` is still the one read.
//! - complete: put the completed record (same lease) if `mod_revision` is still our lock's.
//! - release: delete the key if `mod_revision` is still our lock's.
//!
//! Every write compares a revision, so a request only ever changes its own lock.

pub const LEASE_GRANT: &str = "/v3/lease/grant";
pub const TXN: &str = "/v3/kv/txn";

/// The etcd key of a namespaced key: the configured prefix and the hex hash.
pub fn etcd_key(prefix: &str, key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(prefix.len() + 64);
    s.push_str(prefix);
    for b in key {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

// Requests are built as text: every value is a number or base64, so nothing needs escaping
// (and the wasm does not carry a JSON value serializer for it).

pub fn lease_grant(ttl_s: u64) -> Vec<u8> {
    format!(r#"{{"TTL":"{ttl_s}"}}"#).into_bytes()
}

fn put(key: &str, value: &[u8], lease: i64) -> String {
    format!(
        r#"{{"request_put":{{"key":"{key}","value":"{}","lease":"{lease}"}}}}"#,
        b64_encode(value)
    )
}

fn range(key: &str) -> String {
    format!(r#"{{"request_range":{{"key":"{key}"}}}}"#)
}

/// Puts `value` under `key` if the key does not exist; otherwise reads it.
pub fn lock_txn(key: &str, value: &[u8], lease: i64) -> Vec<u8> {
    let k = b64_encode(key.as_bytes());
    format!(
        r#"{{"compare":[{{"key":"{k}","result":"EQUAL","target":"CREATE","create_revision":"0"}}],"success":[{}],"failure":[{}]}}"#,
        put(&k, value, lease),
        range(&k)
    )
    .into_bytes()
}

/// Puts `value` under `key` if its `mod_revision` is still `revision`; otherwise reads it.
pub fn put_if_revision(key: &str, revision: i64, value: &[u8], lease: i64) -> Vec<u8> {
    let k = b64_encode(key.as_bytes());
    format!(
        r#"{{"compare":[{{"key":"{k}","result":"EQUAL","target":"MOD","mod_revision":"{revision}"}}],"success":[{}],"failure":[{}]}}"#,
        put(&k, value, lease),
        range(&k)
    )
    .into_bytes()
}

/// Deletes `key` if its `mod_revision` is still `revision`.
pub fn delete_if_revision(key: &str, revision: i64) -> Vec<u8> {
    let k = b64_encode(key.as_bytes());
    format!(
        r#"{{"compare":[{{"key":"{k}","result":"EQUAL","target":"MOD","mod_revision":"{revision}"}}],"success":[{{"request_delete_range":{{"key":"{k}"}}}}]}}"#
    )
    .into_bytes()
}

/// A transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnResult {
    /// The compare held and the write happened at this revision (the record's mod_revision).
    Written { revision: i64 },
    /// The compare failed; the key's current value and mod_revision (`None` when the key is
    /// gone, e.g. its lease expired in between).
    Existing(Option<(Vec<u8>, i64)>),
}

// The gateway's answers are read with a small scanner instead of a JSON parser (which would
// add a second serde_json instantiation to the wasm): etcd writes compact JSON where every
// field read here is a number-as-string or base64, never escaped, and omits fields that have
// their default value (`succeeded: false`, empty lists).

/// What follows the first `"name":` in `body` (whitespace skipped). The name must not be the
/// tail of a longer name (`"revision"` does not match `"mod_revision"`).
fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let quoted = format!("\"{name}\"");
    let mut from = 0;
    while let Some(i) = body[from..].find(&quoted) {
        let after = &body[from + i + quoted.len()..];
        if let Some(value) = after.trim_start().strip_prefix(':') {
            return Some(value.trim_start());
        }
        from += i + quoted.len();
    }
    None
}

/// The first `"name": "<text>"` in `body`.
fn string_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let rest = field(body, name)?.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

fn int_field(body: &str, name: &str) -> Option<i64> {
    string_field(body, name)?.parse().ok()
}

/// The lease id of a grant response.
pub fn parse_lease(body: &[u8]) -> Option<i64> {
    let body = std::str::from_utf8(body).ok()?;
    int_field(body, "ID").filter(|id| *id != 0)
}

pub fn parse_txn(body: &[u8]) -> Option<TxnResult> {
    let body = std::str::from_utf8(body).ok()?;
    let trimmed = body.trim();
    if !(trimmed.starts_with('{') && trimmed.ends_with('}')) || body.contains("\"error\"") {
        return None;
    }
    if field(body, "succeeded").is_some_and(|v| v.starts_with("true")) {
        let revision = int_field(body, "revision")?;
        return Some(TxnResult::Written { revision });
    }
    // A failed compare: the range response of the failure branch, at most one key.
    let Some(kvs) = field(body, "kvs") else {
        return Some(TxnResult::Existing(None));
    };
    let value = b64_decode(string_field(kvs, "value")?)?;
    let revision = int_field(kvs, "mod_revision")?;
    Some(TxnResult::Existing(Some((value, revision))))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what protobuf's JSON mapping uses for `bytes`).
pub fn b64_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard or URL-safe base64, padded or not.
pub fn b64_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use proptest::prelude::*;
    use serde_json::Value;

    #[test]
    fn keys_are_prefix_and_hex() {
        let k = etcd_key("/handoff/idem/", &[0xab; 32]);
        assert_eq!(k.len(), 14 + 64);
        assert!(k.starts_with("/handoff/idem/abab"));
    }

    #[test]
    fn lock_txn_shape() {
        let v: Value = serde_json::from_slice(&lock_txn("/p/k", b"rec", 42)).unwrap();
        assert_eq!(v["compare"][0]["target"], "CREATE");
        assert_eq!(v["compare"][0]["create_revision"], "0");
        assert_eq!(v["compare"][0]["key"], STANDARD.encode("/p/k"));
        assert_eq!(
            v["success"][0]["request_put"]["value"],
            STANDARD.encode("rec")
        );
        assert_eq!(v["success"][0]["request_put"]["lease"], "42");
        assert_eq!(
            v["failure"][0]["request_range"]["key"],
            STANDARD.encode("/p/k")
        );
        let v: Value = serde_json::from_slice(&put_if_revision("/p/k", 7, b"x", 1)).unwrap();
        assert_eq!(v["compare"][0]["target"], "MOD");
        assert_eq!(v["compare"][0]["mod_revision"], "7");
        let v: Value = serde_json::from_slice(&delete_if_revision("/p/k", 7)).unwrap();
        assert_eq!(
            v["success"][0]["request_delete_range"]["key"],
            STANDARD.encode("/p/k")
        );
    }

    #[test]
    fn parses_gateway_answers() {
        // As etcd 3.4's gateway writes them (defaults omitted, int64 as strings).
        assert_eq!(
            parse_lease(br#"{"header":{"revision":"3"},"ID":"7587869124592123404","TTL":"60"}"#),
            Some(7587869124592123404)
        );
        assert_eq!(parse_lease(br#"{"error":"x"}"#), None);
        assert_eq!(
            parse_txn(br#"{"header":{"revision":"12"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"12"}}}]}"#),
            Some(TxnResult::Written { revision: 12 })
        );
        let failed = format!(
            r#"{{"header":{{"revision":"12"}},"responses":[{{"response_range":{{"header":{{}},"kvs":[{{"key":"eA==","create_revision":"5","mod_revision":"9","version":"2","value":"{}","lease":"1"}}],"count":"1"}}}}]}}"#,
            STANDARD.encode("record")
        );
        assert_eq!(
            parse_txn(failed.as_bytes()),
            Some(TxnResult::Existing(Some((b"record".to_vec(), 9))))
        );
        assert_eq!(
            parse_txn(br#"{"header":{},"responses":[{"response_range":{"header":{}}}]}"#),
            Some(TxnResult::Existing(None))
        );
        assert_eq!(parse_txn(b"not json"), None);
        assert_eq!(
            parse_txn(br#"{"error":"etcdserver: request timed out","code":14}"#),
            None
        );
        // Whitespace the scanner tolerates, and a header before the kvs.
        assert_eq!(
            parse_txn(br#"{ "header": {"revision": "4"}, "succeeded" : true }"#),
            Some(TxnResult::Written { revision: 4 })
        );
        assert_eq!(
            string_field(r#"{"mod_revision":"9","revision":"3"}"#, "revision"),
            Some("3")
        );
    }

    proptest! {
        #[test]
        fn parsing_any_answer_never_panics(body in ".{0,200}") {
            let _ = parse_txn(body.as_bytes());
            let _ = parse_lease(body.as_bytes());
        }

        #[test]
        fn base64_matches_the_reference(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(b64_encode(&b), STANDARD.encode(&b));
            prop_assert_eq!(b64_decode(&STANDARD.encode(&b)), Some(b));
        }
    }
}
