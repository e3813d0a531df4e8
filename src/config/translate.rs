//! The `translate` section as written ([`RawTranslate`]), its walk over the parsed JSON and
//! its validation into the policy's [`Translate`].

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::error::ConfigError;
use super::walk::{boolean, error, not_one_key, object, seq, string, u64_, unit_variant};
use crate::translate::{
    prefixes_overlap, ApiVersion, Backend, Entry, Pointer, Route, Translate, Unmapped,
    DEFAULT_MAX_BODY_BYTES,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawTranslate {
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub v1_prefix: String,
    pub v2_prefix: String,
    pub backend: RawBackend,
    #[serde(default)]
    pub request: Vec<RawEntry>,
    #[serde(default)]
    pub response: Vec<RawEntry>,
    #[serde(default)]
    pub unmapped: Unmapped,
    #[serde(default)]
    pub translate_errors: bool,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

/// The version the upstream speaks: fixed, or following the canary cohort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(target_arch = "wasm32"),
    derive(schemars::JsonSchema),
    schemars(untagged)
)]
pub enum RawBackend {
    Fixed(ApiVersion),
    Cohort(RawCohortBackend),
}

// By hand rather than `#[serde(untagged)]`, whose buffering deserializer costs the wasm
// tens of KB; the error also says which shapes are expected.
impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawBackend, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        let parsed = if v.is_string() {
            serde_json::from_value(v).map(RawBackend::Fixed)
        } else {
            serde_json::from_value(v).map(RawBackend::Cohort)
        };
        parsed.map_err(|e| {
            D::Error::custom(format!(
                "expected \"v1\", \"v2\" or {{\"stable\": \"v1\", \"canary\": \"v2\"}}: {e}"
            ))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCohortBackend {
    pub stable: ApiVersion,
    pub canary: ApiVersion,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawEntry {
    pub v1: Option<String>,
    pub v2: Option<String>,
    /// `Some(Value::Null)` is `"default": null`, a real default; `None` is no default at all.
    #[serde(default, deserialize_with = "present")]
    #[cfg_attr(
        not(target_arch = "wasm32"),
        schemars(with = "Option<serde_json::Value>")
    )]
    pub default: Option<Value>,
    #[serde(default)]
    pub required: bool,
}

/// Any value that is present, `null` included, becomes `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

// Stand-ins that let the walk go on past a field in error (see `walk::Object`); a
// configuration with an error is refused, so they never reach the policy.
// Here rather than derived: the policy has no default version.
#[allow(clippy::derivable_impls)]
impl Default for ApiVersion {
    fn default() -> ApiVersion {
        ApiVersion::V1
    }
}

impl Default for RawBackend {
    fn default() -> RawBackend {
        RawBackend::Fixed(ApiVersion::default())
    }
}

#[inline(never)]
pub(super) fn walk(v: &Value) -> Result<RawTranslate, ConfigError> {
    object(v, "RawTranslate", |o| RawTranslate {
        routes: o.req("routes", |v| seq(v, route)),
    })
}

#[inline(never)]
fn route(v: &Value) -> Result<RawRoute, ConfigError> {
    object(v, "RawRoute", |o| RawRoute {
        name: o.req("name", string),
        v1_prefix: o.req("v1_prefix", string),
        v2_prefix: o.req("v2_prefix", string),
        backend: o.req("backend", backend),
        request: o.or("request", |v| seq(v, entry), Vec::new),
        response: o.or("response", |v| seq(v, entry), Vec::new),
        unmapped: o.or(
            "unmapped",
            |v| unit_variant(v, &[("drop", Unmapped::Drop), ("keep", Unmapped::Keep)]),
            Unmapped::default,
        ),
        translate_errors: o.or("translate_errors", boolean, bool::default),
        max_body_bytes: o.or("max_body_bytes", u64_, default_max_body_bytes),
    })
}

/// Only inside `backend`, whose serde impl read it from a `Value`: a map is checked for its
/// single key before its variant.
fn api_version(v: &Value) -> Result<ApiVersion, ConfigError> {
    match v {
        Value::Object(map) if map.len() != 1 => Err(not_one_key()),
        _ => unit_variant(v, &[("v1", ApiVersion::V1), ("v2", ApiVersion::V2)]),
    }
}

/// `"v2"` or `{"stable": "v1", "canary": "v2"}`; the inner error is told after the shapes.
#[inline(never)]
fn backend(v: &Value) -> Result<RawBackend, ConfigError> {
    let parsed = if v.is_string() {
        api_version(v).map(RawBackend::Fixed)
    } else {
        object(v, "RawCohortBackend", |o| {
            RawBackend::Cohort(RawCohortBackend {
                stable: o.req("stable", api_version),
                canary: o.req("canary", api_version),
            })
        })
    };
    parsed.map_err(|e| {
        error(format!(
            "expected \"v1\", \"v2\" or {{\"stable\": \"v1\", \"canary\": \"v2\"}}: {}",
            e.message
        ))
    })
}

#[inline(never)]
fn entry(v: &Value) -> Result<RawEntry, ConfigError> {
    object(v, "RawEntry", |o| RawEntry {
        v1: o.opt("v1", string),
        v2: o.opt("v2", string),
        // Present, `null` included, is a default.
        default: o.get("default").cloned(),
        required: o.or("required", boolean, bool::default),
    })
}

impl RawTranslate {
    pub fn validate(self) -> Result<Translate, ConfigError> {
        if self.routes.is_empty() {
            return Err(ConfigError::new("routes", "expected at least one route"));
        }
        let mut routes: Vec<Route> = Vec::new();
        for (i, raw) in self.routes.into_iter().enumerate() {
            let within = format!("routes[{i}]");
            let route = raw.validate().map_err(|e| e.within(&within))?;
            for prev in &routes {
                if prev.name == route.name {
                    return Err(ConfigError::new(
                        "name",
                        format!("route name {:?} is used twice", route.name),
                    )
                    .within(&within));
                }
                for (field, p) in [
                    ("v1_prefix", &route.v1_prefix),
                    ("v2_prefix", &route.v2_prefix),
                ] {
                    if let Some(q) = [&prev.v1_prefix, &prev.v2_prefix]
                        .into_iter()
                        .find(|q| prefixes_overlap(p, q))
                    {
                        return Err(ConfigError::new(
                            field,
                            format!(
                                "prefix {p:?} overlaps {q:?} of route {:?}: a path must belong \
                                 to one route and one version",
                                prev.name
                            ),
                        )
                        .within(&within));
                    }
                }
            }
            routes.push(route);
        }
        Ok(Translate { routes })
    }
}

fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') {
        return Err(format!(
            "expected a path prefix such as \"/api/v1/payments\" (starting with '/', not \
             ending with '/'), got {p:?}"
        ));
    }
    if p.contains(['?', '#']) || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("expected a plain path prefix, got {p:?}"));
    }
    Ok(())
}

impl RawRoute {
    fn validate(self) -> Result<Route, ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(ConfigError::new(
                "name",
                format!(
                    "expected 1 to 64 letters, digits, '_' or '-' (it is a metric label), got {:?}",
                    self.name
                ),
            ));
        }
        check_prefix(&self.v1_prefix).map_err(|m| ConfigError::new("v1_prefix", m))?;
        check_prefix(&self.v2_prefix).map_err(|m| ConfigError::new("v2_prefix", m))?;
        if prefixes_overlap(&self.v1_prefix, &self.v2_prefix) {
            return Err(ConfigError::new(
                "v2_prefix",
                format!(
                    "expected a prefix that neither equals nor contains v1_prefix {:?} (a path \
                     must belong to one version), got {:?}",
                    self.v1_prefix, self.v2_prefix
                ),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "max_body_bytes",
                "expected a positive number of bytes",
            ));
        }
        let request = validate_entries(self.request).map_err(|e| e.within("request"))?;
        let response = validate_entries(self.response).map_err(|e| e.within("response"))?;
        Ok(Route {
            name: self.name,
            v1_prefix: self.v1_prefix,
            v2_prefix: self.v2_prefix,
            backend: match self.backend {
                RawBackend::Fixed(v) => Backend::Fixed(v),
                RawBackend::Cohort(c) => Backend::Cohort {
                    stable: c.stable,
                    canary: c.canary,
                },
            },
            request,
            response,
            unmapped: self.unmapped,
            translate_errors: self.translate_errors,
            max_body_bytes: self.max_body_bytes,
        })
    }
}

fn validate_entries(raw: Vec<RawEntry>) -> Result<Vec<Entry>, ConfigError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("[{i}]");
        let entry = validate_entry(r).map_err(|e| e.within(&at))?;
        // Each side is the target of one direction: no two entries may write the same place.
        for (j, prev) in entries.iter().enumerate() {
            for v in [ApiVersion::V1, ApiVersion::V2] {
                if let (Some(a), Some(b)) = (prev.side(v), entry.side(v)) {
                    if a.overlaps(b) {
                        return Err(ConfigError::new(
                            v.as_str(),
                            format!(
                                "{:?} writes the same place as [{j}].{} {:?}",
                                b.text,
                                v.as_str(),
                                a.text
                            ),
                        )
                        .within(&at));
                    }
                }
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// One entry on its own; the paths are relative to it.
fn validate_entry(r: RawEntry) -> Result<Entry, ConfigError> {
    let parse = |p: &Option<String>, field: &str| {
        p.as_deref()
            .map(Pointer::parse)
            .transpose()
            .map_err(|m| ConfigError::new(field, m))
    };
    let v1 = parse(&r.v1, "v1")?;
    let v2 = parse(&r.v2, "v2")?;
    match (&v1, &v2) {
        (None, None) => {
            return Err(ConfigError::new(
                "",
                "expected `v1`, `v2` or both (JSON Pointers)",
            ))
        }
        (Some(a), Some(b)) if a.wildcards() != b.wildcards() => {
            return Err(ConfigError::new(
                "v2",
                format!(
                    "expected as many `*` as in v1 {:?} ({}), got {} in {:?}",
                    a.text,
                    a.wildcards(),
                    b.wildcards(),
                    b.text
                ),
            ))
        }
        (Some(one), None) | (None, Some(one)) => {
            let (has, missing) = if v1.is_some() {
                ("v1", "v2")
            } else {
                ("v2", "v1")
            };
            if r.default.is_none() {
                return Err(ConfigError::new(
                    "default",
                    format!(
                        "an entry with only `{has}` needs a `default` (the value written \
                         when translating from {missing}), or a `{missing}` pointer"
                    ),
                ));
            }
            if r.required {
                return Err(ConfigError::new(
                    "required",
                    format!("`required` needs both pointers (there is no `{missing}` source)"),
                ));
            }
            if one.wildcards() > 0 {
                return Err(ConfigError::new(
                    has,
                    "an entry with one pointer cannot use `*` (there are no elements to \
                     follow)",
                ));
            }
        }
        _ => {}
    }
    Ok(Entry {
        v1,
        v2,
        default: r.default,
        required: r.required,
    })
}
