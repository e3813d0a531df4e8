//! The validated `drain` section the policy runs with. Its raw shape, walk and validation are
//! in `crate::config::drain`.

use super::websocket::Websocket;
use super::STATE_TICK_MS;

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
    use crate::config::drain::{RawDrain, MAX_MIGRATION_BYTES};
    use crate::config::ConfigError;
    use crate::drain::DEFAULT_ADMIN_PATH;

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
