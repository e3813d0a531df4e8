//! etcd v3 through its JSON gateway, as pure request builders and answer parsers: the filter
//! sends a [`Request`] with `dispatch_http_call` to the configured cluster and hands the
//! callout's status and body back as an [`Answer`]. Nothing here knows what the keys mean, so
//! every etcd user (the idempotency store, canary control) shares it.
//!
//! The gateway speaks protobuf's JSON mapping: keys and values are base64, int64 fields are
//! strings, fields at their default value (`false`, `0`, empty lists) are omitted. Errors come
//! back as a non-200 status with `{"error": ..., "code": <gRPC code>, "message": ...}`.

mod scan;

use scan::{field, int_field, number_field, string_field};

pub const RANGE: &str = "/v3/kv/range";
pub const PUT: &str = "/v3/kv/put";
pub const TXN: &str = "/v3/kv/txn";
pub const LEASE_GRANT: &str = "/v3/lease/grant";
pub const LEASE_KEEPALIVE: &str = "/v3/lease/keepalive";
pub const LEASE_REVOKE: &str = "/v3/lease/revoke";

/// One gateway call: `POST path` with a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: &'static str,
    pub body: Vec<u8>,
}

/// A transaction guard on one key.
#[derive(Debug, Clone, Copy)]
pub enum Compare<'a> {
    /// The key does not exist (`create_revision == 0`).
    Absent(&'a str),
    /// The key was last written at this revision.
    ModRevision(&'a str, i64),
    /// The key was created at this revision (it was not deleted and created again since).
    CreateRevision(&'a str, i64),
    /// The key holds exactly this value.
    Value(&'a str, &'a [u8]),
}

/// A transaction operation on one key.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Writes `value`, attached to `lease` when given (the key is deleted when it expires).
    Put {
        key: &'a str,
        value: &'a [u8],
        lease: Option<i64>,
    },
    Range(&'a str),
    Delete(&'a str),
}

// Requests are built as text: every value is a number or base64, so nothing needs escaping
// (and the wasm does not carry a JSON value serializer for it).

fn put_fields(key: &str, value: &[u8], lease: Option<i64>) -> String {
    let lease = lease.map_or(String::new(), |l| format!(r#","lease":"{l}""#));
    format!(
        r#""key":"{}","value":"{}"{lease}"#,
        b64_encode(key.as_bytes()),
        b64_encode(value)
    )
}

fn key_field(key: &str) -> String {
    format!(r#""key":"{}""#, b64_encode(key.as_bytes()))
}

impl Compare<'_> {
    fn json(&self) -> String {
        let (key, target, field, expected) = match *self {
            Compare::Absent(k) => (k, "CREATE", "create_revision", "0".to_string()),
            Compare::ModRevision(k, r) => (k, "MOD", "mod_revision", r.to_string()),
            Compare::CreateRevision(k, r) => (k, "CREATE", "create_revision", r.to_string()),
            Compare::Value(k, v) => (k, "VALUE", "value", b64_encode(v)),
        };
        format!(
            r#"{{{},"result":"EQUAL","target":"{target}","{field}":"{expected}"}}"#,
            key_field(key)
        )
    }
}

impl Op<'_> {
    fn json(&self) -> String {
        match *self {
            Op::Put { key, value, lease } => {
                format!(r#"{{"request_put":{{{}}}}}"#, put_fields(key, value, lease))
            }
            Op::Range(k) => format!(r#"{{"request_range":{{{}}}}}"#, key_field(k)),
            Op::Delete(k) => format!(r#"{{"request_delete_range":{{{}}}}}"#, key_field(k)),
        }
    }
}

/// Appends `"name":[a,b,...]`.
fn list(out: &mut String, name: &str, items: &mut dyn Iterator<Item = String>) {
    out.push('"');
    out.push_str(name);
    out.push_str("\":[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    out.push(']');
}

/// If every `compare` holds, runs `success`, else `failure` (read with [`parse_txn`]).
pub fn txn(compare: &[Compare], success: &[Op], failure: &[Op]) -> Request {
    let mut body = String::from("{");
    list(&mut body, "compare", &mut compare.iter().map(Compare::json));
    body.push(',');
    list(&mut body, "success", &mut success.iter().map(Op::json));
    body.push(',');
    list(&mut body, "failure", &mut failure.iter().map(Op::json));
    body.push('}');
    Request {
        path: TXN,
        body: body.into_bytes(),
    }
}

/// Reads one key (read with [`parse_range`]).
pub fn range(key: &str) -> Request {
    Request {
        path: RANGE,
        body: format!("{{{}}}", key_field(key)).into_bytes(),
    }
}

/// Reads every key that starts with `prefix` (read with [`parse_range_all`]).
pub fn range_prefix(prefix: &str) -> Request {
    let mut end = prefix.as_bytes().to_vec();
    // The first key past the prefix: its last byte + 1 (a prefix ends in '/' here, never 0xff).
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    Request {
        path: RANGE,
        body: format!(
            r#"{{{},"range_end":"{}"}}"#,
            key_field(prefix),
            b64_encode(&end)
        )
        .into_bytes(),
    }
}

/// Writes one key unconditionally (read with [`parse_ok`]).
pub fn put(key: &str, value: &[u8], lease: Option<i64>) -> Request {
    Request {
        path: PUT,
        body: format!("{{{}}}", put_fields(key, value, lease)).into_bytes(),
    }
}

/// A new lease of `ttl_s` seconds (read with [`parse_lease_grant`]).
pub fn lease_grant(ttl_s: u64) -> Request {
    Request {
        path: LEASE_GRANT,
        body: format!(r#"{{"TTL":"{ttl_s}"}}"#).into_bytes(),
    }
}

/// Renews a lease for its full TTL (read with [`parse_keepalive`]).
pub fn lease_keepalive(id: i64) -> Request {
    Request {
        path: LEASE_KEEPALIVE,
        body: format!(r#"{{"ID":"{id}"}}"#).into_bytes(),
    }
}

/// Ends a lease now, deleting its keys (read with [`parse_ok`]).
pub fn lease_revoke(id: i64) -> Request {
    Request {
        path: LEASE_REVOKE,
        body: format!(r#"{{"ID":"{id}"}}"#).into_bytes(),
    }
}

/// What came back from a callout: the `:status` (`None` when there was no answer: refused,
/// reset or timed out) and the body.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub status: Option<u16>,
    pub body: &'a [u8],
}

/// gRPC status codes etcd uses that say "try again".
const UNAVAILABLE: i64 = 14;
const DEADLINE_EXCEEDED: i64 = 4;
const RESOURCE_EXHAUSTED: i64 = 8;
const ABORTED: i64 = 10;

/// Why a call did not give its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No answer: connection refused or reset, or the callout timed out.
    Unreachable,
    /// etcd or the gateway refused or failed: the HTTP status, the gRPC code when given, and
    /// the message (at most 200 bytes, for the log).
    Server {
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// The lease does not exist (expired, revoked, or lost by etcd).
    LeaseNotFound,
    /// A 200 whose body is not the expected answer.
    Malformed,
}

impl Error {
    /// Whether the same request may succeed later (etcd down, overloaded, electing a leader).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable => true,
            Error::Server { status, code, .. } => {
                *status >= 500
                    || matches!(
                        code,
                        Some(UNAVAILABLE | DEADLINE_EXCEEDED | RESOURCE_EXHAUSTED | ABORTED)
                    )
            }
            Error::LeaseNotFound | Error::Malformed => false,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable => write!(f, "no answer (refused, reset or timed out)"),
            Error::Server {
                status,
                code,
                message,
            } => write!(f, "status {status}, code {code:?}: {message}"),
            Error::LeaseNotFound => write!(f, "lease not found"),
            Error::Malformed => write!(f, "unexpected answer"),
        }
    }
}

/// The body of a 200 answer as text, or the error the answer is.
fn ok_body<'a>(a: &Answer<'a>) -> Result<&'a str, Error> {
    let status = a.status.ok_or(Error::Unreachable)?;
    let body = std::str::from_utf8(a.body).ok();
    let error_text =
        body.and_then(|b| string_field(b, "message").or_else(|| string_field(b, "error")));
    if error_text.is_some_and(|m| m.contains("lease not found")) {
        return Err(Error::LeaseNotFound);
    }
    if status != 200 || error_text.is_some() {
        let message = error_text.unwrap_or_default();
        let end = (0..=message.len().min(200))
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        return Err(Error::Server {
            status,
            code: body.and_then(|b| number_field(b, "code")),
            message: message[..end].to_string(),
        });
    }
    let body = body.ok_or(Error::Malformed)?;
    let trimmed = body.trim();
    if trimmed.starts_with('{') && trimmed.ends_with('}') {
        Ok(body)
    } else {
        Err(Error::Malformed)
    }
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// 0 when the key has no lease.
    pub lease: i64,
}

/// The first key of a range response (`kvs` holds at most one for a single-key range).
fn first_kv(body: &str) -> Result<Option<Kv>, Error> {
    field(body, "kvs").map(kv_of).transpose()
}

/// The key that `kvs` starts with.
fn kv_of(kvs: &str) -> Result<Kv, Error> {
    // An empty value is omitted, like every default.
    let value = match string_field(kvs, "value") {
        Some(v) => b64_decode(v).ok_or(Error::Malformed)?,
        None => Vec::new(),
    };
    Ok(Kv {
        value,
        create_revision: int_field(kvs, "create_revision").ok_or(Error::Malformed)?,
        mod_revision: int_field(kvs, "mod_revision").ok_or(Error::Malformed)?,
        lease: int_field(kvs, "lease").unwrap_or(0),
    })
}

/// Every key of a range response. Each object of `kvs` is cut out by its braces: nothing in
/// one (numbers and base64) holds a brace.
fn all_kvs(body: &str) -> Result<Vec<Kv>, Error> {
    let Some(list) = field(body, "kvs") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut rest = list.strip_prefix('[').ok_or(Error::Malformed)?;
    while let Some(open) = rest.find(['{', ']']) {
        if rest[open..].starts_with(']') {
            return Ok(out);
        }
        let close = rest[open..].find('}').ok_or(Error::Malformed)? + open;
        out.push(kv_of(&rest[open..=close])?);
        rest = &rest[close + 1..];
    }
    Err(Error::Malformed)
}

/// A transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Txn {
    /// Every compare held and `success` ran at this revision (a put's new `mod_revision`).
    Succeeded { revision: i64 },
    /// A compare failed and `failure` ran; the key its range read (`None`: no range, or the
    /// key does not exist).
    Failed { kv: Option<Kv> },
}

pub fn parse_txn(a: &Answer) -> Result<Txn, Error> {
    let body = ok_body(a)?;
    if field(body, "succeeded").is_some_and(|v| v.starts_with("true")) {
        let revision = int_field(body, "revision").ok_or(Error::Malformed)?;
        return Ok(Txn::Succeeded { revision });
    }
    Ok(Txn::Failed {
        kv: first_kv(body)?,
    })
}

pub fn parse_range(a: &Answer) -> Result<Option<Kv>, Error> {
    first_kv(ok_body(a)?)
}

pub fn parse_range_all(a: &Answer) -> Result<Vec<Kv>, Error> {
    all_kvs(ok_body(a)?)
}

/// A transaction whose branches both read one key: whether the compares held, and that key.
pub fn parse_txn_range(a: &Answer) -> Result<(bool, Option<Kv>), Error> {
    let body = ok_body(a)?;
    let succeeded = field(body, "succeeded").is_some_and(|v| v.starts_with("true"));
    Ok((succeeded, first_kv(body)?))
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl_s: i64,
}

pub fn parse_lease_grant(a: &Answer) -> Result<Lease, Error> {
    let body = ok_body(a)?;
    let id = int_field(body, "ID")
        .filter(|id| *id != 0)
        .ok_or(Error::Malformed)?;
    Ok(Lease {
        id,
        ttl_s: int_field(body, "TTL").unwrap_or(0),
    })
}

/// The renewed TTL. A lease that no longer exists renews to a TTL of 0 (omitted).
pub fn parse_keepalive(a: &Answer) -> Result<i64, Error> {
    let body = ok_body(a)?;
    match int_field(body, "TTL") {
        Some(ttl) if ttl > 0 => Ok(ttl),
        _ => Err(Error::LeaseNotFound),
    }
}

/// Any answer without a result of its own (put, revoke).
pub fn parse_ok(a: &Answer) -> Result<(), Error> {
    ok_body(a).map(|_| ())
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
pub mod fake;
#[cfg(test)]
mod tests;
