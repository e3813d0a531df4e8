//! Planning a request from its head: which route, who speaks which version, the upstream path,
//! and whether the body can be read.

use super::error::TranslateError;
use super::{direction, ApiVersion, Route, Translate};
use crate::canary::Variant;

/// `application/json` or `application/<anything>+json`, parameters ignored.
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A body with this `content-encoding` can be read: none, or `identity`.
pub fn check_encoding(content_encoding: Option<&str>) -> Result<(), TranslateError> {
    match content_encoding.map(str::trim) {
        None | Some("") => Ok(()),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(()),
        Some(e) => Err(TranslateError::UnsupportedEncoding {
            content_encoding: e.to_string(),
        }),
    }
}

/// The parts of a request head a plan depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHead<'a> {
    /// `:path`, with the query.
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// More than the headers will arrive (the headers did not end the stream).
    pub has_body: bool,
}

/// What to do with one request: which route, who speaks which version, the upstream path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Index into `Translate::routes`.
    pub route: usize,
    /// The version the client speaks (its path prefix).
    pub client: ApiVersion,
    /// The version the upstream speaks.
    pub backend: ApiVersion,
    /// `:path` for the upstream: the prefix replaced, the rest and the query kept.
    pub path: String,
    /// The request has a body that must be rewritten.
    pub translate_body: bool,
}

impl Plan {
    /// `v1-v2` (a v1 client on a v2 backend) or `v2-v1`: the `x-handoff-translated` value.
    pub fn header_value(&self) -> &'static str {
        direction(self.client)
    }
}

/// True when some path would match both prefixes.
pub(crate) fn prefixes_overlap(a: &str, b: &str) -> bool {
    strip_path_prefix(a, b).is_some() || strip_path_prefix(b, a).is_some()
}

/// `rest` when `path` is `prefix` followed by nothing, `/...` or `?...`.
fn strip_path_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then_some(rest)
}

impl Translate {
    /// Decides a request from its head. `Ok(None)`: pass it through untouched (no route, or
    /// the client already speaks the backend's version). `variant`: the canary cohort, when
    /// the canary section ran. `Err`: refuse it (415) before anything is forwarded.
    pub fn plan(
        &self,
        head: &RequestHead<'_>,
        variant: Option<Variant>,
    ) -> Result<Option<Plan>, TranslateError> {
        let RequestHead {
            path,
            content_type,
            content_encoding,
            has_body,
        } = *head;
        for (i, route) in self.routes.iter().enumerate() {
            let (client, rest) = if let Some(rest) = strip_path_prefix(path, &route.v1_prefix) {
                (ApiVersion::V1, rest)
            } else if let Some(rest) = strip_path_prefix(path, &route.v2_prefix) {
                (ApiVersion::V2, rest)
            } else {
                continue;
            };
            let backend = route.backend.version(variant);
            if client == backend {
                return Ok(None);
            }
            if has_body {
                if !content_type.is_some_and(is_json) {
                    return Err(TranslateError::UnsupportedMediaType {
                        content_type: content_type.map(str::to_string),
                    });
                }
                check_encoding(content_encoding)?;
            }
            let prefix = match backend {
                ApiVersion::V1 => &route.v1_prefix,
                ApiVersion::V2 => &route.v2_prefix,
            };
            return Ok(Some(Plan {
                route: i,
                client,
                backend,
                path: format!("{prefix}{rest}"),
                translate_body: has_body,
            }));
        }
        Ok(None)
    }

    pub fn route(&self, plan: &Plan) -> Option<&Route> {
        self.routes.get(plan.route)
    }

    /// The route whose prefixes `path` starts with, if any (for labelling a refusal).
    pub fn route_for_path(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            strip_path_prefix(path, &r.v1_prefix).is_some()
                || strip_path_prefix(path, &r.v2_prefix).is_some()
        })
    }
}
