//! The `canary` section as written ([`RawCanary`]), its walk over the parsed JSON and its
//! validation into the policy's [`Canary`].

use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

use super::error::{check_header_name, ConfigError};
use super::source;
use super::walk::{boolean, float, object, seq, string, strings, u64_};
use crate::canary::{threshold, AnonymousCookie, Canary, Override};
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
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub anonymous_cookie: Option<RawAnonymousCookie>,
    #[serde(rename = "override")]
    pub override_: Option<RawOverride>,
    #[serde(default)]
    pub response_header: bool,
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

pub(super) fn walk(v: &Value) -> Result<RawCanary, ConfigError> {
    object(v, "RawCanary", |o| RawCanary {
        salt: o.req("salt", string),
        percent: o.req("percent", float),
        user_id: o.or("user_id", |v| seq(v, source::walk), Vec::new),
        route_header: o.or("route_header", string, default_route_header),
        allow: o.or("allow", strings, Vec::new),
        deny: o.or("deny", strings, Vec::new),
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
    })
}

impl RawCanary {
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

fn id_set(ids: Vec<String>, field: &str) -> Result<HashSet<String>, ConfigError> {
    if let Some(i) = ids
        .iter()
        .position(|id| id.is_empty() || id.len() > MAX_VALUE_LEN)
    {
        return Err(ConfigError::new(
            format!("{field}[{i}]"),
            format!("expected a non-empty user id of at most {MAX_VALUE_LEN} bytes"),
        ));
    }
    Ok(ids.into_iter().collect())
}

fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
