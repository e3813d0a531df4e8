//! The `drain` section as written ([`RawDrain`]), its walk over the parsed JSON and its
//! validation into the policy's [`Drain`].

use serde::Deserialize;
use serde_json::Value;

use super::error::{check_header_name, ConfigError};
use super::walk::{object, string, u32_};
use crate::drain::websocket::{Websocket, MAX_CLOSE_REASON};
use crate::drain::{
    Admin, Drain, Readiness, DEFAULT_ADMIN_PATH, MAX_GRACE_S, MAX_INTERVAL_MS, MAX_JITTER_MS,
    MIN_INTERVAL_MS,
};

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

fn default_close_code() -> u32 {
    1001
}
fn default_close_reason() -> String {
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
                // Through translate's tree, whose serializer the wasm already has (it writes what
                // the `Value` would): serializing the `Value` itself adds a second one.
                let tree =
                    crate::translate::tree::Node::from_value(&serde_json::Value::Object(map));
                let json = serde_json::to_vec(&tree)
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

fn default_grace_s() -> u32 {
    10
}
fn default_jitter_ms() -> u32 {
    5000
}
fn default_retry_after_s() -> u32 {
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

fn default_admin_path() -> String {
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

fn default_ready_path() -> String {
    "/ready".to_string()
}
fn default_interval_ms() -> u32 {
    1000
}
fn default_failure_threshold() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawEnvoyAdmin {
    pub cluster: String,
}

#[inline(never)]
pub(super) fn walk(v: &Value) -> Result<RawDrain, ConfigError> {
    object(v, "RawDrain", |o| RawDrain {
        admin: o.opt("admin", |v| {
            object(v, "RawAdmin", |o| RawAdmin {
                path: o.or("path", string, default_admin_path),
                token_sha256: o.opt("token_sha256", string),
            })
        }),
        upstream_signal: o.opt("upstream_signal", |v| {
            object(v, "RawUpstreamSignal", |o| RawUpstreamSignal {
                header: o.req("header", string),
            })
        }),
        readiness: o.opt("readiness", readiness),
        envoy_admin: o.opt("envoy_admin", |v| {
            object(v, "RawEnvoyAdmin", |o| RawEnvoyAdmin {
                cluster: o.req("cluster", string),
            })
        }),
        grace_s: o.or("grace_s", u32_, default_grace_s),
        reconnect_jitter_ms: o.or("reconnect_jitter_ms", u32_, default_jitter_ms),
        retry_after_s: o.or("retry_after_s", u32_, default_retry_after_s),
        websocket: o.opt("websocket", |v| {
            object(v, "RawWebsocket", |o| RawWebsocket {
                migration_message: o.opt("migration_message", |v| Ok(v.clone())),
                close_code: o.or("close_code", u32_, default_close_code),
                close_reason: o.or("close_reason", string, default_close_reason),
            })
        }),
    })
}

#[inline(never)]
fn readiness(v: &Value) -> Result<RawReadiness, ConfigError> {
    object(v, "RawReadiness", |o| RawReadiness {
        cluster: o.req("cluster", string),
        authority: o.opt("authority", string),
        path: o.or("path", string, default_ready_path),
        interval_ms: o.or("interval_ms", u32_, default_interval_ms),
        failure_threshold: o.or("failure_threshold", u32_, default_failure_threshold),
    })
}

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
        let admin = self.admin.map(RawAdmin::validate).transpose()?;
        let upstream_signal = match self.upstream_signal {
            Some(s) => {
                check_header_name(&s.header)
                    .map_err(|m| ConfigError::new("upstream_signal.header", m))?;
                Some(s.header)
            }
            None => None,
        };
        let readiness = self.readiness.map(RawReadiness::validate).transpose()?;
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

impl RawAdmin {
    pub(super) fn validate(self) -> Result<Admin, ConfigError> {
        check_path(&self.path).map_err(|m| ConfigError::new("admin.path", m))?;
        let token_sha256 = match self.token_sha256 {
            Some(t) => Some(parse_sha256_hex(&t).ok_or_else(|| {
                ConfigError::new(
                    "admin.token_sha256",
                    "expected 64 hex digits (the SHA-256 of the bearer token, \
                     e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                )
            })?),
            None => None,
        };
        Ok(Admin {
            path: self.path,
            token_sha256,
        })
    }
}

impl RawReadiness {
    fn validate(self) -> Result<Readiness, ConfigError> {
        check_cluster(&self.cluster).map_err(|m| ConfigError::new("readiness.cluster", m))?;
        check_path(&self.path).map_err(|m| ConfigError::new("readiness.path", m))?;
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(ConfigError::new(
                "readiness.interval_ms",
                format!(
                    "expected {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} milliseconds, got {}",
                    self.interval_ms
                ),
            ));
        }
        if !(1..=100).contains(&self.failure_threshold) {
            return Err(ConfigError::new(
                "readiness.failure_threshold",
                format!("expected 1 to 100, got {}", self.failure_threshold),
            ));
        }
        let authority = self.authority.unwrap_or_else(|| self.cluster.clone());
        if authority.is_empty() || authority.bytes().any(|b| b <= b' ' || b == b'/') {
            return Err(ConfigError::new(
                "readiness.authority",
                format!("expected a host name such as \"app\", got {authority:?}"),
            ));
        }
        Ok(Readiness {
            cluster: self.cluster,
            authority,
            path: self.path,
            interval_ms: self.interval_ms,
            failure_threshold: self.failure_threshold,
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
