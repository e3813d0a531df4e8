//! The `idempotency` section as written ([`RawIdempotency`]), its walk over the parsed JSON
//! and its validation into the policy's [`Idempotency`].

use serde::Deserialize;
use serde_json::Value;

use super::error::{check_header_name, ConfigError};
use super::source;
use super::walk::{boolean, object, seq, string, strings, u32_, u64_, unit_variant, usize_};
use crate::idempotency::{
    Idempotency, OnError, Store, WhenFull, MAX_ENTRIES_LIMIT, MAX_KEY_LENGTH_LIMIT,
    MAX_RESPONSE_LIMIT,
};
use crate::source::Source;

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_aliases")]
    pub aliases: Vec<String>,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default = "default_prefixes")]
    pub path_prefixes: Vec<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default = "default_max_key_length")]
    pub max_key_length: usize,
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout_s: u64,
    #[serde(default)]
    pub scope: Vec<Source>,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub store_5xx: bool,
}

fn default_header() -> String {
    "idempotency-key".to_string()
}
fn default_aliases() -> Vec<String> {
    vec!["x-idempotency-key".to_string()]
}
fn default_methods() -> Vec<String> {
    vec!["POST".to_string(), "PATCH".to_string()]
}
fn default_prefixes() -> Vec<String> {
    vec!["/".to_string()]
}
fn default_true() -> bool {
    true
}
fn default_max_key_length() -> usize {
    255
}
fn default_ttl() -> u64 {
    86_400
}
fn default_lock_timeout() -> u64 {
    30
}
fn default_max_entries() -> u32 {
    10_000
}
fn default_max_response_bytes() -> usize {
    65_536
}
fn default_cluster() -> String {
    "etcd".to_string()
}
fn default_prefix() -> String {
    "/handoff/idem/".to_string()
}
fn default_timeout_ms() -> u64 {
    250
}

/// `store`: one object for both kinds (a flat struct keeps serde's buffering of internally
/// tagged enums out of the wasm); `validate` rejects keys that belong to the other kind.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(rename = "type", default)]
    pub kind: StoreKind,
    /// local: the number of slots (default 10000).
    pub max_entries: Option<u32>,
    /// Largest response stored for replay (default 65536).
    pub max_response_bytes: Option<usize>,
    /// local: `accept_unprotected` (default) or `reject`.
    pub when_full: Option<WhenFull>,
    /// etcd: the Envoy cluster that reaches etcd (default `etcd`).
    pub cluster: Option<String>,
    /// etcd: `:authority` of the requests to etcd (default `etcd`).
    pub authority: Option<String>,
    /// etcd: key prefix (default `/handoff/idem/`).
    pub prefix: Option<String>,
    /// etcd: per-request timeout (default 250).
    pub timeout_ms: Option<u64>,
    /// etcd: `reject` (default) or `allow`.
    pub on_error: Option<OnError>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Local,
    Etcd,
}

#[inline(never)]
pub(super) fn walk(v: &Value) -> Result<RawIdempotency, ConfigError> {
    object(v, "RawIdempotency", |o| RawIdempotency {
        header: o.or("header", string, default_header),
        aliases: o.or("aliases", strings, default_aliases),
        methods: o.or("methods", strings, default_methods),
        path_prefixes: o.or("path_prefixes", strings, default_prefixes),
        required: o.or("required", boolean, default_true),
        max_key_length: o.or("max_key_length", usize_, default_max_key_length),
        ttl_s: o.or("ttl_s", u64_, default_ttl),
        lock_timeout_s: o.or("lock_timeout_s", u64_, default_lock_timeout),
        scope: o.or("scope", |v| seq(v, source::walk), Vec::new),
        store: o.or("store", store, RawStore::default),
        store_5xx: o.or("store_5xx", boolean, bool::default),
    })
}

#[inline(never)]
fn store(v: &Value) -> Result<RawStore, ConfigError> {
    object(v, "RawStore", |o| RawStore {
        kind: o.or(
            "type",
            |v| unit_variant(v, &[("local", StoreKind::Local), ("etcd", StoreKind::Etcd)]),
            StoreKind::default,
        ),
        max_entries: o.opt("max_entries", u32_),
        max_response_bytes: o.opt("max_response_bytes", usize_),
        when_full: o.opt("when_full", |v| {
            let names = [
                ("accept_unprotected", WhenFull::AcceptUnprotected),
                ("reject", WhenFull::Reject),
            ];
            unit_variant(v, &names)
        }),
        cluster: o.opt("cluster", string),
        authority: o.opt("authority", string),
        prefix: o.opt("prefix", string),
        timeout_ms: o.opt("timeout_ms", u64_),
        on_error: o.opt("on_error", |v| {
            unit_variant(v, &[("reject", OnError::Reject), ("allow", OnError::Allow)])
        }),
    })
}

impl RawIdempotency {
    pub fn validate(self) -> Result<Idempotency, ConfigError> {
        check_header_name(&self.header).map_err(|m| ConfigError::new("header", m))?;
        for (i, a) in self.aliases.iter().enumerate() {
            check_header_name(a).map_err(|m| ConfigError::new(format!("aliases[{i}]"), m))?;
            if *a == self.header {
                return Err(ConfigError::new(
                    format!("aliases[{i}]"),
                    "expected a name other than `header`",
                ));
            }
        }
        check_matching(&self.methods, &self.path_prefixes)?;
        if !(1..=MAX_KEY_LENGTH_LIMIT).contains(&self.max_key_length) {
            return Err(ConfigError::new(
                "max_key_length",
                format!(
                    "expected 1 to {MAX_KEY_LENGTH_LIMIT}, got {}",
                    self.max_key_length
                ),
            ));
        }
        if !(1..=366 * 86_400).contains(&self.ttl_s) {
            return Err(ConfigError::new(
                "ttl_s",
                format!("expected 1 to 31622400 seconds, got {}", self.ttl_s),
            ));
        }
        if self.lock_timeout_s == 0 || self.lock_timeout_s > self.ttl_s {
            return Err(ConfigError::new(
                "lock_timeout_s",
                format!(
                    "expected 1 to ttl_s ({}) seconds, got {}",
                    self.ttl_s, self.lock_timeout_s
                ),
            ));
        }
        for (i, s) in self.scope.iter().enumerate() {
            source::check(s).map_err(|m| ConfigError::new(format!("scope[{i}]"), m))?;
        }
        let store = self.store.validate()?;
        Ok(Idempotency {
            header: self.header,
            aliases: self.aliases,
            methods: self.methods,
            path_prefixes: self.path_prefixes,
            required: self.required,
            max_key_length: self.max_key_length,
            ttl_s: self.ttl_s,
            lock_timeout_s: self.lock_timeout_s,
            scope: self.scope,
            store,
            store_5xx: self.store_5xx,
        })
    }
}

/// The requests the section applies to: `methods` and `path_prefixes`.
fn check_matching(methods: &[String], path_prefixes: &[String]) -> Result<(), ConfigError> {
    if methods.is_empty() {
        return Err(ConfigError::new(
            "methods",
            "expected at least one method such as \"POST\"",
        ));
    }
    for (i, m) in methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::new(
                format!("methods[{i}]"),
                format!("expected an uppercase HTTP method such as \"POST\", got {m:?}"),
            ));
        }
    }
    if path_prefixes.is_empty() {
        return Err(ConfigError::new(
            "path_prefixes",
            "expected at least one prefix such as \"/\"",
        ));
    }
    for (i, p) in path_prefixes.iter().enumerate() {
        if !p.starts_with('/') {
            return Err(ConfigError::new(
                format!("path_prefixes[{i}]"),
                format!("expected a path starting with '/', got {p:?}"),
            ));
        }
    }
    Ok(())
}

impl RawStore {
    fn validate(self) -> Result<Store, ConfigError> {
        let max_response_bytes = self
            .max_response_bytes
            .unwrap_or_else(default_max_response_bytes);
        check_response_limit(max_response_bytes)?;
        match self.kind {
            StoreKind::Local => self.local(max_response_bytes),
            StoreKind::Etcd => self.etcd(max_response_bytes),
        }
    }

    fn local(self, max_response_bytes: usize) -> Result<Store, ConfigError> {
        for (key, set) in [
            ("cluster", self.cluster.is_some()),
            ("authority", self.authority.is_some()),
            ("prefix", self.prefix.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("on_error", self.on_error.is_some()),
        ] {
            if set {
                return Err(other(key, "etcd"));
            }
        }
        let max_entries = self.max_entries.unwrap_or_else(default_max_entries);
        if !(1..=MAX_ENTRIES_LIMIT).contains(&max_entries) {
            return Err(ConfigError::new(
                "store.max_entries",
                format!("expected 1 to {MAX_ENTRIES_LIMIT}, got {max_entries}"),
            ));
        }
        Ok(Store::Local {
            max_entries,
            max_response_bytes,
            when_full: self.when_full.unwrap_or_default(),
        })
    }

    fn etcd(self, max_response_bytes: usize) -> Result<Store, ConfigError> {
        if self.max_entries.is_some() {
            return Err(other("max_entries", "local"));
        }
        if self.when_full.is_some() {
            return Err(other("when_full", "local"));
        }
        let cluster = self.cluster.unwrap_or_else(default_cluster);
        if cluster.is_empty() {
            return Err(ConfigError::new(
                "store.cluster",
                "expected the name of the Envoy cluster that reaches etcd",
            ));
        }
        let authority = self.authority.unwrap_or_else(default_cluster);
        if authority.is_empty() {
            return Err(ConfigError::new(
                "store.authority",
                "expected a non-empty :authority for requests to etcd",
            ));
        }
        let prefix = self.prefix.unwrap_or_else(default_prefix);
        if !prefix.starts_with('/') || prefix.len() > 128 {
            return Err(ConfigError::new(
                "store.prefix",
                format!(
                    "expected a key prefix starting with '/' (at most 128 bytes), got {prefix:?}"
                ),
            ));
        }
        let timeout_ms = self.timeout_ms.unwrap_or_else(default_timeout_ms);
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(ConfigError::new(
                "store.timeout_ms",
                format!("expected 1 to 60000, got {timeout_ms}"),
            ));
        }
        Ok(Store::Etcd {
            cluster,
            authority,
            prefix,
            timeout_ms,
            on_error: self.on_error.unwrap_or_default(),
            max_response_bytes,
        })
    }
}

/// A key set for the other kind of store.
fn other(key: &str, kind: &str) -> ConfigError {
    ConfigError::new(
        format!("store.{key}"),
        format!("`{key}` applies to the {kind} store only"),
    )
}

fn check_response_limit(n: usize) -> Result<(), ConfigError> {
    if n > MAX_RESPONSE_LIMIT {
        return Err(ConfigError::new(
            "store.max_response_bytes",
            format!("expected at most {MAX_RESPONSE_LIMIT}, got {n}"),
        ));
    }
    Ok(())
}
