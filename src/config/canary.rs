//! The `canary` section as written ([`RawCanary`]), its walk over the parsed JSON and its
//! validation into the policy's [`Canary`].

use serde::Deserialize;
use serde_json::Value;

use super::error::{check_header_name, ConfigError};
use super::source;
use super::walk::{boolean, float, object, seq, string, strings, u32_, u64_, Result as Walked};
use crate::canary::{threshold, AnonymousCookie, Canary, Override};
use crate::guard::{Guard, LatencyRule, DEFAULT_ADMIN_PATH};
use crate::ids::{IdList, IdSet};
use crate::rollout::EtcdControl;
use crate::source::{Source, MAX_VALUE_LEN};

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub salt: String,
    pub percent: f64,
    #[serde(default)]
    pub user_id: Vec<Source>,
    #[serde(default = "default_route_header")]
    pub route_header: String,
    #[serde(default)]
    #[cfg_attr(not(target_arch = "wasm32"), schemars(with = "Vec<String>"))]
    pub allow: IdList,
    #[serde(default)]
    #[cfg_attr(not(target_arch = "wasm32"), schemars(with = "Vec<String>"))]
    pub deny: IdList,
    pub anonymous_cookie: Option<RawAnonymousCookie>,
    #[serde(rename = "override")]
    pub override_: Option<RawOverride>,
    #[serde(default)]
    pub response_header: bool,
    /// Judges the canary against stable and aborts it on a regression.
    pub guard: Option<RawGuard>,
    /// Fleet-wide control: a rollout record in etcd that every Envoy obeys.
    pub control: Option<RawControl>,
}

fn default_route_header() -> String {
    "x-canary-variant".to_string()
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAnonymousCookie {
    pub name: String,
    #[serde(default = "default_max_age")]
    pub max_age_s: u64,
}

fn default_max_age() -> u64 {
    30 * 24 * 3600
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub header: String,
    pub secret: String,
}

#[inline(never)]
pub(super) fn walk(v: &Value) -> Result<RawCanary, ConfigError> {
    object(v, "RawCanary", |o| RawCanary {
        salt: o.req("salt", string),
        percent: o.req("percent", float),
        user_id: o.or("user_id", |v| seq(v, source::walk), Vec::new),
        route_header: o.or("route_header", string, default_route_header),
        allow: o.or("allow", ids, IdList::default),
        deny: o.or("deny", ids, IdList::default),
        anonymous_cookie: o.opt("anonymous_cookie", |v| {
            object(v, "RawAnonymousCookie", |o| RawAnonymousCookie {
                name: o.req("name", string),
                max_age_s: o.or("max_age_s", u64_, default_max_age),
            })
        }),
        override_: o.opt("override", |v| {
            object(v, "RawOverride", |o| RawOverride {
                header: o.req("header", string),
                secret: o.req("secret", string),
            })
        }),
        response_header: o.or("response_header", boolean, bool::default),
        guard: o.opt("guard", guard_walk),
        control: o.opt("control", control_walk),
    })
}

/// The paths of the id lists, which the JSON parser keeps out of the tree
/// ([`crate::json::parse_lists`]): in the tree each id is a `Value` and an allocation, and
/// the walk would clone it.
pub(super) const ID_LISTS: &[&str] = &[ALLOW, DENY];
const ALLOW: &str = "canary.allow";
const DENY: &str = "canary.deny";

fn ids(v: &Value) -> Walked<IdList> {
    strings(v).map(IdList::from)
}

impl RawCanary {
    /// Puts back the lists the parser took out of the tree (the walk saw them empty).
    pub(super) fn put_back(&mut self, taken: crate::json::Lists) {
        for (path, list) in taken {
            match path {
                ALLOW => self.allow = list,
                DENY => self.deny = list,
                _ => {}
            }
        }
    }

    pub fn validate(self) -> Result<Canary, ConfigError> {
        if self.salt.is_empty() {
            return Err(ConfigError::new("salt", "expected a non-empty string"));
        }
        let p = self.percent;
        if !(0.0..=100.0).contains(&p) || ((p * 100.0).round() - p * 100.0).abs() > 1e-6 {
            return Err(ConfigError::new(
                "percent",
                format!(
                    "expected a number from 0 to 100 with at most two decimals, got {}",
                    // As JSON writes it: core's float formatting would cost the wasm kilobytes.
                    serde_json::Number::from_f64(p).map_or(String::new(), |n| n.to_string())
                ),
            ));
        }
        for (i, s) in self.user_id.iter().enumerate() {
            source::check(s).map_err(|m| ConfigError::new(format!("user_id[{i}]"), m))?;
        }
        if self.user_id.is_empty() && self.anonymous_cookie.is_none() {
            return Err(ConfigError::new(
                "user_id",
                "expected at least one source such as {\"header\": \"x-user-id\"} \
                 (or an anonymous_cookie)",
            ));
        }
        check_header_name(&self.route_header).map_err(|m| ConfigError::new("route_header", m))?;
        let allow = id_set(self.allow, "allow")?;
        let deny = id_set(self.deny, "deny")?;
        let anonymous_cookie = self.anonymous_cookie.map(|c| c.validate()).transpose()?;
        let override_ = self
            .override_
            .map(|o| o.validate(&self.route_header))
            .transpose()?;
        let guard = self
            .guard
            .map(|g| g.validate().map_err(|e| e.within("guard")))
            .transpose()?;
        let control = self
            .control
            .map(|c| c.etcd.validate().map_err(|e| e.within("control.etcd")))
            .transpose()?;
        Ok(Canary {
            salt: self.salt,
            percent: p,
            threshold: threshold(p),
            user_id: self.user_id,
            route_header: self.route_header,
            allow,
            deny,
            anonymous_cookie,
            override_,
            response_header: self.response_header,
            guard,
            control,
        })
    }
}

impl RawAnonymousCookie {
    fn validate(self) -> Result<AnonymousCookie, ConfigError> {
        if !is_cookie_name(&self.name) {
            return Err(ConfigError::new(
                "anonymous_cookie.name",
                format!(
                    "expected a cookie name (token characters), got {:?}",
                    self.name
                ),
            ));
        }
        if self.max_age_s == 0 {
            return Err(ConfigError::new(
                "anonymous_cookie.max_age_s",
                "expected a positive number of seconds",
            ));
        }
        Ok(AnonymousCookie {
            name: self.name,
            max_age_s: self.max_age_s,
        })
    }
}

impl RawOverride {
    fn validate(self, route_header: &str) -> Result<Override, ConfigError> {
        check_header_name(&self.header).map_err(|m| ConfigError::new("override.header", m))?;
        if self.header == route_header {
            return Err(ConfigError::new(
                "override.header",
                "expected a header other than route_header",
            ));
        }
        if self.secret.len() < 8 {
            return Err(ConfigError::new(
                "override.secret",
                "expected a secret of at least 8 characters",
            ));
        }
        Ok(Override {
            header: self.header,
            secret: self.secret.into_bytes(),
        })
    }
}

fn id_set(ids: IdList, field: &str) -> Result<IdSet, ConfigError> {
    if let Some(i) = ids
        .iter()
        .position(|id| id.is_empty() || id.len() > MAX_VALUE_LEN)
    {
        return Err(ConfigError::new(
            format!("{field}[{i}]"),
            format!("expected a non-empty user id of at most {MAX_VALUE_LEN} bytes"),
        ));
    }
    Ok(IdSet::new(ids))
}

fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// ---------------------------------------------------------------------------------------------
// `canary.guard`: the canary judged against stable, window by window (`crate::guard`)

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    #[serde(default = "default_window_s")]
    pub window_s: u32,
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "default_max_error_ratio")]
    pub max_error_ratio: f64,
    /// Absent: no latency check.
    pub latency: Option<RawLatency>,
    #[serde(default = "default_bad_windows")]
    pub bad_windows: u32,
    /// Absent: no admin path.
    pub admin: Option<RawGuardAdmin>,
}

fn default_window_s() -> u32 {
    10
}
fn default_min_requests() -> u64 {
    100
}
fn default_max_error_rate() -> f64 {
    0.05
}
fn default_max_error_ratio() -> f64 {
    2.0
}
fn default_bad_windows() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawLatency {
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    #[serde(default = "default_max_ratio")]
    pub max_ratio: f64,
}

fn default_quantile() -> f64 {
    0.99
}
fn default_max_ms() -> u64 {
    500
}
fn default_max_ratio() -> f64 {
    1.5
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawGuardAdmin {
    #[serde(default = "default_guard_admin_path")]
    pub path: String,
    /// Hex SHA-256 of the bearer token accepted from non-loopback peers.
    pub token_sha256: Option<String>,
}

fn default_guard_admin_path() -> String {
    DEFAULT_ADMIN_PATH.to_string()
}

#[inline(never)]
fn guard_walk(v: &Value) -> Result<RawGuard, ConfigError> {
    object(v, "RawGuard", |o| RawGuard {
        window_s: o.or("window_s", u32_, default_window_s),
        min_requests: o.or("min_requests", u64_, default_min_requests),
        max_error_rate: o.or("max_error_rate", float, default_max_error_rate),
        max_error_ratio: o.or("max_error_ratio", float, default_max_error_ratio),
        latency: o.opt("latency", |v| {
            object(v, "RawLatency", |o| RawLatency {
                quantile: o.or("quantile", float, default_quantile),
                max_ms: o.or("max_ms", u64_, default_max_ms),
                max_ratio: o.or("max_ratio", float, default_max_ratio),
            })
        }),
        bad_windows: o.or("bad_windows", u32_, default_bad_windows),
        admin: o.opt("admin", |v| {
            object(v, "RawGuardAdmin", |o| RawGuardAdmin {
                path: o.or("path", string, default_guard_admin_path),
                token_sha256: o.opt("token_sha256", string),
            })
        }),
    })
}

/// `v` within `lo..=hi` (NaN is not).
fn in_range(v: f64, lo: f64, hi: f64, path: &str, what: &str) -> Result<(), ConfigError> {
    if !(v >= lo && v <= hi) {
        return Err(ConfigError::new(path, format!("expected {what}")));
    }
    Ok(())
}

impl RawGuard {
    pub fn validate(self) -> Result<Guard, ConfigError> {
        if !(1..=3600).contains(&self.window_s) {
            return Err(ConfigError::new("window_s", "expected 1 to 3600 seconds"));
        }
        if !(1..=1_000_000_000).contains(&self.min_requests) {
            return Err(ConfigError::new(
                "min_requests",
                "expected a whole number of requests from 1 to 1000000000",
            ));
        }
        let rate = "a fraction from 0 to 1 (0.05 is 5%)";
        in_range(self.max_error_rate, 0.0, 1.0, "max_error_rate", rate)?;
        let ratio = "a ratio from 1 to 1000";
        in_range(self.max_error_ratio, 1.0, 1000.0, "max_error_ratio", ratio)?;
        let latency = self.latency.map(|l| l.validate()).transpose()?;
        if !(1..=100).contains(&self.bad_windows) {
            return Err(ConfigError::new("bad_windows", "expected 1 to 100 windows"));
        }
        let admin = self.admin.map(|a| a.validate()).transpose()?;
        Ok(Guard {
            window_s: self.window_s,
            min_requests: self.min_requests,
            max_error_rate: self.max_error_rate,
            max_error_ratio: self.max_error_ratio,
            latency,
            bad_windows: self.bad_windows,
            admin,
        })
    }
}

impl RawLatency {
    fn validate(self) -> Result<LatencyRule, ConfigError> {
        let q = "a quantile from 0.5 to 0.9999 (0.99 is p99)";
        in_range(self.quantile, 0.5, 0.9999, "latency.quantile", q)?;
        if !(1..=600_000).contains(&self.max_ms) {
            return Err(ConfigError::new(
                "latency.max_ms",
                "expected 1 to 600000 milliseconds",
            ));
        }
        let ratio = "a ratio from 1 to 1000";
        in_range(self.max_ratio, 1.0, 1000.0, "latency.max_ratio", ratio)?;
        Ok(LatencyRule {
            quantile: self.quantile,
            max_ms: self.max_ms,
            max_ratio: self.max_ratio,
        })
    }
}

impl RawGuardAdmin {
    /// The drain admin path's rules: an absolute path, the token as 64 hex digits.
    fn validate(self) -> Result<crate::drain::Admin, ConfigError> {
        let same = super::drain::RawAdmin {
            path: self.path,
            token_sha256: self.token_sha256,
        };
        same.validate()
    }
}

// ---------------------------------------------------------------------------------------------
// `canary.control`: the rollout record in etcd (`crate::rollout`)

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub etcd: RawEtcdControl,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawEtcdControl {
    /// The Envoy cluster that reaches etcd's JSON gateway.
    pub cluster: String,
    /// `:authority` of the requests to etcd.
    pub authority: String,
    /// Key prefix; the record is `<prefix><salt>` (default `/handoff/rollout/`).
    #[serde(default = "default_control_prefix")]
    pub prefix: String,
    /// How often each Envoy reads the record (default 1000).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Per-request timeout, below `poll_ms` (default 250).
    #[serde(default = "default_control_timeout_ms")]
    pub timeout_ms: u64,
    /// The TTL of each Envoy's lease: its counts and, for the judge, the leader key (default
    /// 10).
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u64,
}

fn default_control_prefix() -> String {
    crate::rollout::record::DEFAULT_PREFIX.to_string()
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_control_timeout_ms() -> u64 {
    250
}
fn default_lease_ttl_s() -> u64 {
    10
}

#[inline(never)]
fn control_walk(v: &Value) -> Result<RawControl, ConfigError> {
    object(v, "RawControl", |o| RawControl {
        etcd: o.req("etcd", |v| {
            object(v, "RawEtcdControl", |o| RawEtcdControl {
                cluster: o.req("cluster", string),
                authority: o.req("authority", string),
                prefix: o.or("prefix", string, default_control_prefix),
                poll_ms: o.or("poll_ms", u64_, default_poll_ms),
                timeout_ms: o.or("timeout_ms", u64_, default_control_timeout_ms),
                lease_ttl_s: o.or("lease_ttl_s", u64_, default_lease_ttl_s),
            })
        }),
    })
}

impl RawEtcdControl {
    pub fn validate(self) -> Result<EtcdControl, ConfigError> {
        if self.cluster.is_empty() {
            return Err(ConfigError::new(
                "cluster",
                "expected the name of the Envoy cluster that reaches etcd",
            ));
        }
        if self.authority.is_empty() {
            return Err(ConfigError::new(
                "authority",
                "expected a non-empty :authority for requests to etcd",
            ));
        }
        let p = &self.prefix;
        if !p.starts_with('/') || !p.ends_with('/') || p.len() > 128 {
            return Err(ConfigError::new(
                "prefix",
                format!("expected a key prefix starting and ending with '/' (at most 128 bytes), got {p:?}"),
            ));
        }
        if !(100..=60_000).contains(&self.poll_ms) {
            return Err(ConfigError::new(
                "poll_ms",
                "expected 100 to 60000 milliseconds",
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms >= self.poll_ms {
            return Err(ConfigError::new(
                "timeout_ms",
                "expected at least 1 millisecond and less than poll_ms",
            ));
        }
        if !(2..=300).contains(&self.lease_ttl_s) {
            return Err(ConfigError::new("lease_ttl_s", "expected 2 to 300 seconds"));
        }
        Ok(EtcdControl {
            cluster: self.cluster,
            authority: self.authority,
            prefix: self.prefix,
            poll_ms: self.poll_ms,
            timeout_ms: self.timeout_ms,
            lease_ttl_s: self.lease_ttl_s,
        })
    }
}
