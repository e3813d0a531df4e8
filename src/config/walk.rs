//! The configuration's shape check: a walk over the parsed [`Value`] that builds the `Raw*`
//! types with small typed helpers, each error naming the JSON path of its field
//! (`canary.user_id[0].header`) in serde's words ("missing field `salt`", "unknown field
//! `persent`, expected one of ...", "invalid type: string \"ten\", expected f64").
//!
//! Why not serde's derive: a derived `Deserialize` is generic code per struct and field type,
//! and putting the path on its errors (serde_path_to_error) doubled it again, about 150 KB of
//! the wasm all told; these helpers are shared by every field. The derives stay on the `Raw*`
//! types for the JSON Schema (schemars) and the unit tests, and `tests/config_paths.rs`
//! checks this walk against the derives over every example configuration broken every way.

use serde_json::{Map, Value};

use super::{ConfigError, RawConfig};
use crate::canary::{self, RawAnonymousCookie, RawCanary, RawOverride};
use crate::drain::{
    self, RawAdmin, RawDrain, RawEnvoyAdmin, RawReadiness, RawUpstreamSignal, RawWebsocket,
};
use crate::idempotency::{self, OnError, RawIdempotency, RawStore, StoreKind, WhenFull};
use crate::source::Source;
use crate::translate::{
    self, ApiVersion, RawBackend, RawCohortBackend, RawEntry, RawRoute, RawTranslate, Unmapped,
};

type Result<T> = std::result::Result<T, ConfigError>;
type Parse<T> = fn(&Value) -> Result<T>;

impl RawConfig {
    /// The configuration as written, from its parsed JSON.
    pub fn from_json(v: &Value) -> Result<RawConfig> {
        let o = object(
            v,
            "RawConfig",
            &["canary", "translate", "idempotency", "drain"],
        )?;
        Ok(RawConfig {
            canary: o.opt("canary", canary)?,
            translate: o.opt("translate", translate)?,
            idempotency: o.opt("idempotency", idempotency)?,
            drain: o.opt("drain", drain)?,
        })
    }
}

fn canary(v: &Value) -> Result<RawCanary> {
    let o = object(
        v,
        "RawCanary",
        &[
            "salt",
            "percent",
            "user_id",
            "route_header",
            "allow",
            "deny",
            "anonymous_cookie",
            "override",
            "response_header",
        ],
    )?;
    Ok(RawCanary {
        salt: o.req("salt", string)?,
        percent: o.req("percent", float)?,
        user_id: o.or("user_id", |v| seq(v, source), Vec::new)?,
        route_header: o.or("route_header", string, canary::default_route_header)?,
        allow: o.or("allow", strings, Vec::new)?,
        deny: o.or("deny", strings, Vec::new)?,
        anonymous_cookie: o.opt("anonymous_cookie", |v| {
            let o = object(v, "RawAnonymousCookie", &["name", "max_age_s"])?;
            Ok(RawAnonymousCookie {
                name: o.req("name", string)?,
                max_age_s: o.or("max_age_s", u64_, canary::default_max_age)?,
            })
        })?,
        override_: o.opt("override", |v| {
            let o = object(v, "RawOverride", &["header", "secret"])?;
            Ok(RawOverride {
                header: o.req("header", string)?,
                secret: o.req("secret", string)?,
            })
        })?,
        response_header: o.or("response_header", boolean, bool::default)?,
    })
}

fn source(v: &Value) -> Result<Source> {
    const NAMES: &[&str] = &["header", "cookie", "query", "jwt_claim", "peer_principal"];
    let (i, content) = variant(v, NAMES)?;
    let Some(content) = content else {
        return Err(error(
            "invalid type: unit variant, expected newtype variant",
        ));
    };
    let source = match i {
        0 => string(content).map(Source::Header),
        1 => string(content).map(Source::Cookie),
        2 => string(content).map(Source::Query),
        3 => string(content).map(Source::JwtClaim),
        _ => boolean(content).map(Source::PeerPrincipal),
    };
    source.map_err(|e| e.within(NAMES[i]))
}

fn translate(v: &Value) -> Result<RawTranslate> {
    let o = object(v, "RawTranslate", &["routes"])?;
    Ok(RawTranslate {
        routes: o.req("routes", |v| seq(v, route))?,
    })
}

fn route(v: &Value) -> Result<RawRoute> {
    let o = object(
        v,
        "RawRoute",
        &[
            "name",
            "v1_prefix",
            "v2_prefix",
            "backend",
            "request",
            "response",
            "unmapped",
            "translate_errors",
            "max_body_bytes",
        ],
    )?;
    Ok(RawRoute {
        name: o.req("name", string)?,
        v1_prefix: o.req("v1_prefix", string)?,
        v2_prefix: o.req("v2_prefix", string)?,
        backend: o.req("backend", backend)?,
        request: o.or("request", |v| seq(v, entry), Vec::new)?,
        response: o.or("response", |v| seq(v, entry), Vec::new)?,
        unmapped: o.or(
            "unmapped",
            |v| unit_variant(v, &[("drop", Unmapped::Drop), ("keep", Unmapped::Keep)]),
            Unmapped::default,
        )?,
        translate_errors: o.or("translate_errors", boolean, bool::default)?,
        max_body_bytes: o.or("max_body_bytes", u64_, translate::default_max_body_bytes)?,
    })
}

/// Only inside `backend`, whose serde impl read it from a `Value`: a map is checked for its
/// single key before its variant.
fn api_version(v: &Value) -> Result<ApiVersion> {
    match v {
        Value::Object(map) if map.len() != 1 => Err(not_one_key()),
        _ => unit_variant(v, &[("v1", ApiVersion::V1), ("v2", ApiVersion::V2)]),
    }
}

/// `"v2"` or `{"stable": "v1", "canary": "v2"}`; the inner error is told after the shapes.
fn backend(v: &Value) -> Result<RawBackend> {
    let parsed = if v.is_string() {
        api_version(v).map(RawBackend::Fixed)
    } else {
        object(v, "RawCohortBackend", &["stable", "canary"]).and_then(|o| {
            Ok(RawBackend::Cohort(RawCohortBackend {
                stable: o.req("stable", api_version)?,
                canary: o.req("canary", api_version)?,
            }))
        })
    };
    parsed.map_err(|e| {
        error(format!(
            "expected \"v1\", \"v2\" or {{\"stable\": \"v1\", \"canary\": \"v2\"}}: {}",
            e.message
        ))
    })
}

fn entry(v: &Value) -> Result<RawEntry> {
    let o = object(v, "RawEntry", &["v1", "v2", "default", "required"])?;
    Ok(RawEntry {
        v1: o.opt("v1", string)?,
        v2: o.opt("v2", string)?,
        // Present, `null` included, is a default.
        default: o.0.get("default").cloned(),
        required: o.or("required", boolean, bool::default)?,
    })
}

fn idempotency(v: &Value) -> Result<RawIdempotency> {
    let o = object(
        v,
        "RawIdempotency",
        &[
            "header",
            "aliases",
            "methods",
            "path_prefixes",
            "required",
            "max_key_length",
            "ttl_s",
            "lock_timeout_s",
            "scope",
            "store",
            "store_5xx",
        ],
    )?;
    Ok(RawIdempotency {
        header: o.or("header", string, idempotency::default_header)?,
        aliases: o.or("aliases", strings, idempotency::default_aliases)?,
        methods: o.or("methods", strings, idempotency::default_methods)?,
        path_prefixes: o.or("path_prefixes", strings, idempotency::default_prefixes)?,
        required: o.or("required", boolean, idempotency::default_true)?,
        max_key_length: o.or(
            "max_key_length",
            usize_,
            idempotency::default_max_key_length,
        )?,
        ttl_s: o.or("ttl_s", u64_, idempotency::default_ttl)?,
        lock_timeout_s: o.or("lock_timeout_s", u64_, idempotency::default_lock_timeout)?,
        scope: o.or("scope", |v| seq(v, source), Vec::new)?,
        store: o.or("store", store, RawStore::default)?,
        store_5xx: o.or("store_5xx", boolean, bool::default)?,
    })
}

fn store(v: &Value) -> Result<RawStore> {
    let o = object(
        v,
        "RawStore",
        &[
            "type",
            "max_entries",
            "max_response_bytes",
            "when_full",
            "cluster",
            "authority",
            "prefix",
            "timeout_ms",
            "on_error",
        ],
    )?;
    Ok(RawStore {
        kind: o.or(
            "type",
            |v| unit_variant(v, &[("local", StoreKind::Local), ("etcd", StoreKind::Etcd)]),
            StoreKind::default,
        )?,
        max_entries: o.opt("max_entries", u32_)?,
        max_response_bytes: o.opt("max_response_bytes", usize_)?,
        when_full: o.opt("when_full", |v| {
            let names = [
                ("accept_unprotected", WhenFull::AcceptUnprotected),
                ("reject", WhenFull::Reject),
            ];
            unit_variant(v, &names)
        })?,
        cluster: o.opt("cluster", string)?,
        authority: o.opt("authority", string)?,
        prefix: o.opt("prefix", string)?,
        timeout_ms: o.opt("timeout_ms", u64_)?,
        on_error: o.opt("on_error", |v| {
            unit_variant(v, &[("reject", OnError::Reject), ("allow", OnError::Allow)])
        })?,
    })
}

fn drain(v: &Value) -> Result<RawDrain> {
    let o = object(
        v,
        "RawDrain",
        &[
            "admin",
            "upstream_signal",
            "readiness",
            "envoy_admin",
            "grace_s",
            "reconnect_jitter_ms",
            "retry_after_s",
            "websocket",
        ],
    )?;
    Ok(RawDrain {
        admin: o.opt("admin", |v| {
            let o = object(v, "RawAdmin", &["path", "token_sha256"])?;
            Ok(RawAdmin {
                path: o.or("path", string, drain::default_admin_path)?,
                token_sha256: o.opt("token_sha256", string)?,
            })
        })?,
        upstream_signal: o.opt("upstream_signal", |v| {
            let o = object(v, "RawUpstreamSignal", &["header"])?;
            Ok(RawUpstreamSignal {
                header: o.req("header", string)?,
            })
        })?,
        readiness: o.opt("readiness", readiness)?,
        envoy_admin: o.opt("envoy_admin", |v| {
            let o = object(v, "RawEnvoyAdmin", &["cluster"])?;
            Ok(RawEnvoyAdmin {
                cluster: o.req("cluster", string)?,
            })
        })?,
        grace_s: o.or("grace_s", u32_, drain::default_grace_s)?,
        reconnect_jitter_ms: o.or("reconnect_jitter_ms", u32_, drain::default_jitter_ms)?,
        retry_after_s: o.or("retry_after_s", u32_, drain::default_retry_after_s)?,
        websocket: o.opt("websocket", |v| {
            let o = object(
                v,
                "RawWebsocket",
                &["migration_message", "close_code", "close_reason"],
            )?;
            Ok(RawWebsocket {
                migration_message: o.opt("migration_message", |v| Ok(v.clone()))?,
                close_code: o.or("close_code", u32_, drain::default_close_code)?,
                close_reason: o.or("close_reason", string, drain::default_close_reason)?,
            })
        })?,
    })
}

fn readiness(v: &Value) -> Result<RawReadiness> {
    let o = object(
        v,
        "RawReadiness",
        &[
            "cluster",
            "authority",
            "path",
            "interval_ms",
            "failure_threshold",
        ],
    )?;
    Ok(RawReadiness {
        cluster: o.req("cluster", string)?,
        authority: o.opt("authority", string)?,
        path: o.or("path", string, drain::default_ready_path)?,
        interval_ms: o.or("interval_ms", u32_, drain::default_interval_ms)?,
        failure_threshold: o.or("failure_threshold", u32_, drain::default_failure_threshold)?,
    })
}

// ---------------------------------------------------------------------------------------------
// The helpers: one copy each, whatever the field.

fn error(message: impl Into<String>) -> ConfigError {
    ConfigError::new("", message)
}

/// An object with only the known keys.
struct Object<'a>(&'a Map<String, Value>);

fn object<'a>(v: &'a Value, name: &str, fields: &[&str]) -> Result<Object<'a>> {
    let Value::Object(map) = v else {
        return Err(invalid_type(v, &format!("struct {name}")));
    };
    match map.keys().find(|k| !fields.contains(&k.as_str())) {
        Some(k) => {
            Err(error(format!("unknown field `{k}`, expected {}", one_of(fields))).within(k))
        }
        None => Ok(Object(map)),
    }
}

impl Object<'_> {
    /// A field that must be there.
    fn req<T>(&self, key: &str, parse: Parse<T>) -> Result<T> {
        match self.0.get(key) {
            Some(v) => parse(v).map_err(|e| e.within(key)),
            None => Err(error(format!("missing field `{key}`"))),
        }
    }

    /// An `Option` field: absent or `null` is `None`.
    fn opt<T>(&self, key: &str, parse: Parse<T>) -> Result<Option<T>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse(v).map(Some).map_err(|e| e.within(key)),
        }
    }

    /// A field with a default when absent (`null` is not absent).
    fn or<T>(&self, key: &str, parse: Parse<T>, default: fn() -> T) -> Result<T> {
        match self.0.get(key) {
            None => Ok(default()),
            Some(v) => parse(v).map_err(|e| e.within(key)),
        }
    }
}

fn seq<T>(v: &Value, parse: Parse<T>) -> Result<Vec<T>> {
    let Value::Array(items) = v else {
        return Err(invalid_type(v, "a sequence"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(parse(item).map_err(|e| e.within(&format!("[{i}]")))?);
    }
    Ok(out)
}

fn strings(v: &Value) -> Result<Vec<String>> {
    seq(v, string)
}

fn string(v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(invalid_type(v, "a string")),
    }
}

fn boolean(v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => Err(invalid_type(v, "a boolean")),
    }
}

fn float(v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or_default()),
        _ => Err(invalid_type(v, "f64")),
    }
}

/// A non-negative integer up to `max`, named as serde names the Rust type.
fn unsigned(v: &Value, max: u64, name: &str) -> Result<u64> {
    match v {
        Value::Number(n) if n.is_f64() => Err(invalid_type(v, name)),
        Value::Number(n) => match n.as_u64() {
            Some(u) if u <= max => Ok(u),
            _ => Err(error(format!(
                "invalid value: integer `{n}`, expected {name}"
            ))),
        },
        _ => Err(invalid_type(v, name)),
    }
}

fn u64_(v: &Value) -> Result<u64> {
    unsigned(v, u64::MAX, "u64")
}

fn u32_(v: &Value) -> Result<u32> {
    unsigned(v, u32::MAX.into(), "u32").map(|u| u as u32)
}

fn usize_(v: &Value) -> Result<usize> {
    unsigned(v, usize::MAX as u64, "usize").map(|u| u as usize)
}

/// An enum variant as serde_json writes one: `"name"`, or `{"name": content}` (one key).
/// Returns the index of the name and the content, if any.
fn variant<'a>(v: &'a Value, names: &[&str]) -> Result<(usize, Option<&'a Value>)> {
    let (key, content) = match v {
        Value::String(s) => (s, None),
        Value::Object(map) => match map.iter().next() {
            Some((k, c)) => (k, Some(c)),
            None => return Err(not_one_key()),
        },
        _ => return Err(invalid_type(v, "string or map")),
    };
    let Some(i) = names.iter().position(|n| *n == key.as_str()) else {
        return Err(error(format!(
            "unknown variant `{key}`, expected {}",
            one_of(names)
        )));
    };
    match v {
        Value::Object(map) if map.len() > 1 => Err(not_one_key()),
        _ => Ok((i, content)),
    }
}

fn not_one_key() -> ConfigError {
    error("invalid value: map, expected map with a single key")
}

/// A variant without content (`"keep"`; `{"keep": null}` is the same to serde).
fn unit_variant<T: Copy>(v: &Value, variants: &[(&str, T)]) -> Result<T> {
    let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
    let (i, content) = variant(v, &names)?;
    let (name, value) = variants[i];
    match content {
        Some(c) if !c.is_null() => Err(invalid_type(c, "unit variant").within(name)),
        _ => Ok(value),
    }
}

/// `invalid type: string "x", expected a string`, with serde_json's words for the value.
fn invalid_type(v: &Value, expected: &str) -> ConfigError {
    let found = match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".to_string(),
        Value::Object(_) => "map".to_string(),
    };
    error(format!("invalid type: {found}, expected {expected}"))
}

/// serde's list of the expected names: "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
fn one_of(names: &[&str]) -> String {
    match names {
        [a] => format!("`{a}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("one of {}", quoted.join(", "))
        }
    }
}
