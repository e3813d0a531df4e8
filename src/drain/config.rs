//! The `drain` section: its raw shape, defaults and validation.

use serde::Deserialize;

use super::websocket::{Websocket, MAX_CLOSE_REASON};
use super::{DEFAULT_ADMIN_PATH, STATE_TICK_MS};
use crate::config::{check_header_name, ConfigError};

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawDrain {
    pub admin: Option<RawAdmin>,
    pub upstream_signal: Option<RawUpstreamSignal>,
    pub readiness: Option<RawReadiness>,
    pub envoy_admin: Option<RawEnvoyAdmin>,
    #[serde(default = "default_grace_s")]
    pub grace_s: u32,
    #[serde(default = "default_jitter_ms")]
    pub reconnect_jitter_ms: u32,
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u32,
    pub websocket: Option<RawWebsocket>,
}

/// Upgraded WebSocket connections at a drain: an optional migration message, then a Close.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawWebsocket {
    /// A JSON object sent to the client as one text message, with `reconnect_after_ms` added.
    pub migration_message: Option<serde_json::Value>,
    #[serde(default = "default_close_code")]
    pub close_code: u32,
    #[serde(default = "default_close_reason")]
    pub close_reason: String,
}

pub(crate) fn default_close_code() -> u32 {
    1001
}
pub(crate) fn default_close_reason() -> String {
    "going away".to_string()
}

/// The longest migration message accepted, as rendered JSON.
pub const MAX_MIGRATION_BYTES: usize = 4096;

impl RawWebsocket {
    pub fn validate(self) -> Result<Websocket, ConfigError> {
        let migration_prefix = match self.migration_message {
            None => None,
            Some(serde_json::Value::Object(map)) => {
                if map.contains_key("reconnect_after_ms") {
                    return Err(ConfigError::new(
                        "migration_message.reconnect_after_ms",
                        "handoff adds `reconnect_after_ms` itself: remove it",
                    ));
                }
                // Through `to_vec`, the serializer translate already uses: `to_string` would add a
                // second copy of it to the wasm.
                let json = serde_json::to_vec(&serde_json::Value::Object(map))
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                if json.len() > MAX_MIGRATION_BYTES {
                    return Err(ConfigError::new(
                        "migration_message",
                        format!(
                            "expected at most {MAX_MIGRATION_BYTES} bytes of JSON, got {}",
                            json.len()
                        ),
                    ));
                }
                Some(json[..json.len() - 1].to_string())
            }
            Some(_) => {
                return Err(ConfigError::new(
                    "migration_message",
                    "expected a JSON object such as {\"type\": \"server_migration\"}",
                ))
            }
        };
        let close_code = match self.close_code {
            c @ (1000 | 1001 | 4000..=4999) => c as u16,
            c => {
                return Err(ConfigError::new(
                    "close_code",
                    format!("expected 1000, 1001 or 4000 to 4999, got {c}"),
                ))
            }
        };
        if self.close_reason.len() > MAX_CLOSE_REASON {
            return Err(ConfigError::new(
                "close_reason",
                format!(
                    "expected at most {MAX_CLOSE_REASON} bytes of UTF-8, got {}",
                    self.close_reason.len()
                ),
            ));
        }
        Ok(Websocket {
            migration_prefix,
            close_code,
            close_reason: self.close_reason,
        })
    }
}

pub(crate) fn default_grace_s() -> u32 {
    10
}
pub(crate) fn default_jitter_ms() -> u32 {
    5000
}
pub(crate) fn default_retry_after_s() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_path")]
    pub path: String,
    /// Hex SHA-256 of the bearer token accepted from non-loopback peers.
    pub token_sha256: Option<String>,
}

pub(crate) fn default_admin_path() -> String {
    DEFAULT_ADMIN_PATH.to_string()
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamSignal {
    pub header: String,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawReadiness {
    pub cluster: String,
    /// Defaults to the cluster name.
    pub authority: Option<String>,
    #[serde(default = "default_ready_path")]
    pub path: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

pub(crate) fn default_ready_path() -> String {
    "/ready".to_string()
}
pub(crate) fn default_interval_ms() -> u32 {
    1000
}
pub(crate) fn default_failure_threshold() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawEnvoyAdmin {
    pub cluster: String,
}

/// A validated drain section.
#[derive(Debug, Clone)]
pub struct Drain {
    pub admin: Option<Admin>,
    pub upstream_signal: Option<String>,
    pub readiness: Option<Readiness>,
    pub envoy_admin_cluster: Option<String>,
    pub grace_s: u32,
    pub reconnect_jitter_ms: u32,
    pub retry_after_s: u32,
    pub websocket: Option<Websocket>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub path: String,
    pub token_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone)]
pub struct Readiness {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub interval_ms: u32,
    pub failure_threshold: u32,
}

pub const MAX_GRACE_S: u32 = 24 * 3600;
pub const MAX_JITTER_MS: u32 = 3_600_000;
pub const MIN_INTERVAL_MS: u32 = 50;
pub const MAX_INTERVAL_MS: u32 = 60_000;

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains('?') || path.contains('#') || path.contains(' ') {
        return Err(format!(
            "expected an absolute path starting with '/' (no query), got {path:?}"
        ));
    }
    Ok(())
}

fn check_cluster(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("expected the name of an Envoy cluster".to_string());
    }
    Ok(())
}

impl RawDrain {
    pub fn validate(self) -> Result<Drain, ConfigError> {
        if self.admin.is_none() && self.upstream_signal.is_none() && self.readiness.is_none() {
            return Err(ConfigError::new(
                "",
                "expected at least one trigger: `admin`, `upstream_signal` or `readiness`",
            ));
        }
        let admin = match self.admin {
            Some(a) => {
                check_path(&a.path).map_err(|m| ConfigError::new("admin.path", m))?;
                let token_sha256 = match a.token_sha256 {
                    Some(t) => Some(parse_sha256_hex(&t).ok_or_else(|| {
                        ConfigError::new(
                            "admin.token_sha256",
                            "expected 64 hex digits (the SHA-256 of the bearer token, \
                             e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                        )
                    })?),
                    None => None,
                };
                Some(Admin {
                    path: a.path,
                    token_sha256,
                })
            }
            None => None,
        };
        let upstream_signal = match self.upstream_signal {
            Some(s) => {
                check_header_name(&s.header)
                    .map_err(|m| ConfigError::new("upstream_signal.header", m))?;
                Some(s.header)
            }
            None => None,
        };
        let readiness = match self.readiness {
            Some(r) => {
                check_cluster(&r.cluster).map_err(|m| ConfigError::new("readiness.cluster", m))?;
                check_path(&r.path).map_err(|m| ConfigError::new("readiness.path", m))?;
                if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&r.interval_ms) {
                    return Err(ConfigError::new(
                        "readiness.interval_ms",
                        format!(
                            "expected {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} milliseconds, got {}",
                            r.interval_ms
                        ),
                    ));
                }
                if !(1..=100).contains(&r.failure_threshold) {
                    return Err(ConfigError::new(
                        "readiness.failure_threshold",
                        format!("expected 1 to 100, got {}", r.failure_threshold),
                    ));
                }
                let authority = r.authority.unwrap_or_else(|| r.cluster.clone());
                if authority.is_empty() || authority.bytes().any(|b| b <= b' ' || b == b'/') {
                    return Err(ConfigError::new(
                        "readiness.authority",
                        format!("expected a host name such as \"app\", got {authority:?}"),
                    ));
                }
                Some(Readiness {
                    cluster: r.cluster,
                    authority,
                    path: r.path,
                    interval_ms: r.interval_ms,
                    failure_threshold: r.failure_threshold,
                })
            }
            None => None,
        };
        let envoy_admin_cluster = match self.envoy_admin {
            Some(e) => {
                check_cluster(&e.cluster)
                    .map_err(|m| ConfigError::new("envoy_admin.cluster", m))?;
                Some(e.cluster)
            }
            None => None,
        };
        if self.grace_s > MAX_GRACE_S {
            return Err(ConfigError::new(
                "grace_s",
                format!("expected 0 to {MAX_GRACE_S} seconds, got {}", self.grace_s),
            ));
        }
        if self.reconnect_jitter_ms > MAX_JITTER_MS {
            return Err(ConfigError::new(
                "reconnect_jitter_ms",
                format!(
                    "expected 0 to {MAX_JITTER_MS} milliseconds, got {}",
                    self.reconnect_jitter_ms
                ),
            ));
        }
        if self.retry_after_s > 3600 {
            return Err(ConfigError::new(
                "retry_after_s",
                format!("expected 0 to 3600 seconds, got {}", self.retry_after_s),
            ));
        }
        let websocket = self
            .websocket
            .map(|w| w.validate().map_err(|e| e.within("websocket")))
            .transpose()?;
        Ok(Drain {
            websocket,
            admin,
            upstream_signal,
            readiness,
            envoy_admin_cluster,
            grace_s: self.grace_s,
            reconnect_jitter_ms: self.reconnect_jitter_ms,
            retry_after_s: self.retry_after_s,
        })
    }
}

pub(crate) fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl Drain {
    /// The tick period of every worker: each sees another worker's transition within one tick
    /// (a drained worker also checks the shared state before each refusal). Readiness is polled
    /// on its own interval, counted on the clock.
    pub fn tick_ms(&self) -> u32 {
        STATE_TICK_MS
    }

    /// A one-line description for the start-up log.
    pub fn summary(&self) -> String {
        let mut triggers = Vec::new();
        if let Some(a) = &self.admin {
            triggers.push(format!("admin {}", a.path));
        }
        if let Some(h) = &self.upstream_signal {
            triggers.push(format!("upstream_signal {h}"));
        }
        if let Some(r) = &self.readiness {
            triggers.push(format!("readiness {}{}", r.cluster, r.path));
        }
        let ws = if self.websocket.is_some() {
            ", websockets"
        } else {
            ""
        };
        format!(
            "drain ({}, grace {}s{ws})",
            triggers.join(", "),
            self.grace_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Drain, ConfigError> {
        let raw: RawDrain = serde_json::from_str(json).expect("shape");
        raw.validate()
    }

    fn err(json: &str) -> ConfigError {
        parse(json).unwrap_err()
    }

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn full_contract_is_accepted() {
        let d = parse(&format!(
            r#"{{"admin": {{"path": "/.well-known/handoff/drain", "token_sha256": "{TOKEN_HASH}"}},
            "upstream_signal": {{"header": "x-drain"}},
            "readiness": {{"cluster": "app", "authority": "app", "path": "/ready", "interval_ms": 1000, "failure_threshold": 2}},
            "envoy_admin": {{"cluster": "envoy_admin"}},
            "grace_s": 10, "reconnect_jitter_ms": 5000, "retry_after_s": 1}}"#
        ))
        .unwrap();
        assert_eq!(d.admin.as_ref().unwrap().path, DEFAULT_ADMIN_PATH);
        assert!(d.admin.as_ref().unwrap().token_sha256.is_some());
        assert_eq!(d.upstream_signal.as_deref(), Some("x-drain"));
        assert_eq!(d.readiness.as_ref().unwrap().failure_threshold, 2);
        assert_eq!(d.envoy_admin_cluster.as_deref(), Some("envoy_admin"));
        assert_eq!(d.tick_ms(), STATE_TICK_MS);
    }

    #[test]
    fn defaults() {
        let d = parse(r#"{"admin": {}}"#).unwrap();
        assert_eq!(d.admin.unwrap().path, DEFAULT_ADMIN_PATH);
        assert_eq!(
            (d.grace_s, d.reconnect_jitter_ms, d.retry_after_s),
            (10, 5000, 1)
        );
        let d = parse(r#"{"readiness": {"cluster": "app"}}"#).unwrap();
        let r = d.readiness.unwrap();
        assert_eq!(
            (r.authority.as_str(), r.path.as_str(), r.interval_ms),
            ("app", "/ready", 1000)
        );
    }

    #[test]
    fn rejects_no_trigger() {
        let e = err(r#"{"envoy_admin": {"cluster": "envoy_admin"}, "grace_s": 5}"#);
        assert_eq!(e.path, "");
        assert!(e.message.contains("at least one trigger"), "{e}");
    }

    #[test]
    fn rejects_bad_token_hash() {
        assert_eq!(
            err(r#"{"admin": {"token_sha256": "abc"}}"#).path,
            "admin.token_sha256"
        );
        let not_hex = "z".repeat(64);
        assert_eq!(
            err(&format!(r#"{{"admin": {{"token_sha256": "{not_hex}"}}}}"#)).path,
            "admin.token_sha256"
        );
    }

    #[test]
    fn rejects_relative_admin_path() {
        assert_eq!(err(r#"{"admin": {"path": "drain"}}"#).path, "admin.path");
        assert_eq!(
            err(r#"{"admin": {"path": "/drain?x=1"}}"#).path,
            "admin.path"
        );
    }

    #[test]
    fn rejects_bad_signal_header() {
        assert_eq!(
            err(r#"{"upstream_signal": {"header": "X-Drain"}}"#).path,
            "upstream_signal.header"
        );
    }

    #[test]
    fn rejects_bad_readiness() {
        assert_eq!(
            err(r#"{"readiness": {"cluster": ""}}"#).path,
            "readiness.cluster"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "path": "ready"}}"#).path,
            "readiness.path"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "interval_ms": 10}}"#).path,
            "readiness.interval_ms"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "failure_threshold": 0}}"#).path,
            "readiness.failure_threshold"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "authority": "a b"}}"#).path,
            "readiness.authority"
        );
    }

    #[test]
    fn rejects_empty_envoy_admin_cluster() {
        assert_eq!(
            err(r#"{"admin": {}, "envoy_admin": {"cluster": " "}}"#).path,
            "envoy_admin.cluster"
        );
    }

    #[test]
    fn rejects_out_of_range_durations() {
        assert_eq!(err(r#"{"admin": {}, "grace_s": 100000}"#).path, "grace_s");
        assert_eq!(
            err(r#"{"admin": {}, "reconnect_jitter_ms": 4000000}"#).path,
            "reconnect_jitter_ms"
        );
        assert_eq!(
            err(r#"{"admin": {}, "retry_after_s": 4000}"#).path,
            "retry_after_s"
        );
    }

    #[test]
    fn websocket_section() {
        let d = parse(r#"{"admin": {}, "websocket": {}}"#).unwrap();
        let w = d.websocket.unwrap();
        assert_eq!(
            (w.close_code, w.close_reason.as_str()),
            (1001, "going away")
        );
        assert_eq!(w.migration_prefix, None);
        let d = parse(
            r#"{"admin": {}, "websocket": {"migration_message": {"type": "server_migration"},
                "close_code": 4001, "close_reason": ""}}"#,
        )
        .unwrap();
        let w = d.websocket.unwrap();
        assert_eq!(
            w.migration_message(5).unwrap(),
            r#"{"type":"server_migration","reconnect_after_ms":5}"#
        );
        for code in [1000, 1001, 4000, 4999] {
            assert!(parse(&format!(
                r#"{{"admin": {{}}, "websocket": {{"close_code": {code}}}}}"#
            ))
            .is_ok());
        }
        for code in [0, 999, 1002, 1006, 3000, 3999, 5000, 70000] {
            assert_eq!(
                err(&format!(
                    r#"{{"admin": {{}}, "websocket": {{"close_code": {code}}}}}"#
                ))
                .path,
                "websocket.close_code"
            );
        }
        let long = "é".repeat(62); // 124 bytes
        assert_eq!(
            err(&format!(
                r#"{{"admin": {{}}, "websocket": {{"close_reason": "{long}"}}}}"#
            ))
            .path,
            "websocket.close_reason"
        );
        assert!(parse(&format!(
            r#"{{"admin": {{}}, "websocket": {{"close_reason": "{}"}}}}"#,
            "a".repeat(123)
        ))
        .is_ok());
        assert_eq!(
            err(r#"{"admin": {}, "websocket": {"migration_message": "move"}}"#).path,
            "websocket.migration_message"
        );
        assert_eq!(
            err(r#"{"admin": {}, "websocket": {"migration_message": {"reconnect_after_ms": 1}}}"#)
                .path,
            "websocket.migration_message.reconnect_after_ms"
        );
        let big = "x".repeat(MAX_MIGRATION_BYTES);
        assert_eq!(
            err(&format!(
                r#"{{"admin": {{}}, "websocket": {{"migration_message": {{"a": "{big}"}}}}}}"#
            ))
            .path,
            "websocket.migration_message"
        );
    }
}
