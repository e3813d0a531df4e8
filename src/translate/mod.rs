//! API version translation: one declarative mapping between v1 and v2 JSON payloads that
//! serves both directions. v1 clients in front of a v2 backend have their requests rewritten
//! v1 → v2 and the responses v2 → v1; v2 clients in front of a v1 backend get the mirror image
//! from the same entries.
//!
//! Pure: paths, header values and body bytes in, a plan or rewritten bytes out. The host glue
//! is `filter::translate`. Here: the runtime configuration and the public API; [`pointer`]
//! parses the JSON Pointers of the entries, [`plan`] decides a request from its head,
//! [`edit`] rewrites a document and [`error`] turns a failure into the client's answer.

use serde::Deserialize;
use serde_json::Value;

use crate::canary::Variant;

mod edit;
mod error;
mod plan;
mod pointer;
#[cfg(test)]
mod tests;
pub(crate) mod tree;

use edit::translate_tree;
pub use edit::translate_value;
use error::strip_position;
pub use error::TranslateError;
pub(crate) use plan::prefixes_overlap;
pub use plan::{check_encoding, is_json, Plan, RequestHead};
pub use pointer::{Pointer, Segment};
use tree::Node;

/// The request header that tells the backend a request was translated (`v1-v2`: a v1 client
/// on a v2 backend, `v2-v1`: the mirror case). Any client-sent value is removed.
pub const TRANSLATED_HEADER: &str = "x-handoff-translated";

/// Envoy's default per-connection buffer limit: larger bodies need that limit raised too.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1_048_576;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    V1,
    V2,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2 => "v2",
        }
    }

    pub fn other(self) -> ApiVersion {
        match self {
            ApiVersion::V1 => ApiVersion::V2,
            ApiVersion::V2 => ApiVersion::V1,
        }
    }
}

/// `v1-v2` or `v2-v1`: from one version to the other (a metric label and the header value).
pub fn direction(from: ApiVersion) -> &'static str {
    match from {
        ApiVersion::V1 => "v1-v2",
        ApiVersion::V2 => "v2-v1",
    }
}

/// Which message of the exchange a translation or failure concerns (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Request,
    Response,
}

impl Message {
    pub fn as_str(self) -> &'static str {
        match self {
            Message::Request => "request",
            Message::Response => "response",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    /// Fields no entry names are left out.
    #[default]
    Drop,
    /// Fields no entry names are copied unchanged.
    Keep,
}

/// The validated `translate` section.
#[derive(Debug, Clone)]
pub struct Translate {
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub v1_prefix: String,
    pub v2_prefix: String,
    pub backend: Backend,
    pub request: Vec<Entry>,
    pub response: Vec<Entry>,
    pub unmapped: Unmapped,
    pub translate_errors: bool,
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Fixed(ApiVersion),
    Cohort {
        stable: ApiVersion,
        canary: ApiVersion,
    },
}

impl Backend {
    /// The version the upstream of this request speaks. Without a cohort, a backend that
    /// follows the canary is the stable one.
    pub fn version(self, variant: Option<Variant>) -> ApiVersion {
        match self {
            Backend::Fixed(v) => v,
            Backend::Cohort { stable, canary } => match variant {
                Some(Variant::Canary) => canary,
                _ => stable,
            },
        }
    }
}

/// One mapping entry: a v1 pointer, a v2 pointer (at least one of them), a default and
/// whether the source is required. Read v1 → v2 or v2 → v1.
#[derive(Debug, Clone)]
pub struct Entry {
    pub v1: Option<Pointer>,
    pub v2: Option<Pointer>,
    pub default: Option<Value>,
    pub required: bool,
}

impl Entry {
    pub fn side(&self, v: ApiVersion) -> Option<&Pointer> {
        match v {
            ApiVersion::V1 => self.v1.as_ref(),
            ApiVersion::V2 => self.v2.as_ref(),
        }
    }
}

impl Route {
    /// Rewrites a request body sent by a `from` client into the other version.
    pub fn translate_request(
        &self,
        from: ApiVersion,
        body: &[u8],
    ) -> Result<Vec<u8>, TranslateError> {
        self.translate_bytes(&self.request, from, body)
    }

    /// Rewrites a response body from the backend into the `to` client's version.
    pub fn translate_response(
        &self,
        to: ApiVersion,
        body: &[u8],
    ) -> Result<Vec<u8>, TranslateError> {
        self.translate_bytes(&self.response, to.other(), body)
    }

    /// The same as `translate_request`, on a parsed document.
    pub fn translate_request_value(
        &self,
        from: ApiVersion,
        doc: &Value,
    ) -> Result<Value, TranslateError> {
        translate_value(&self.request, from, doc, self.unmapped)
    }

    /// The same as `translate_response`, on a parsed document.
    pub fn translate_response_value(
        &self,
        to: ApiVersion,
        doc: &Value,
    ) -> Result<Value, TranslateError> {
        translate_value(&self.response, to.other(), doc, self.unmapped)
    }

    /// A body of `len` bytes so far is still within `max_body_bytes`.
    pub fn check_size(&self, len: usize) -> Result<(), TranslateError> {
        if len as u64 > self.max_body_bytes {
            Err(TranslateError::TooLarge {
                limit: self.max_body_bytes,
            })
        } else {
            Ok(())
        }
    }

    /// Whether a backend response with this status and content type is rewritten: 2xx (any
    /// status with `translate_errors`) with a JSON body. Anything else passes unchanged.
    pub fn translates_response(&self, status: u16, content_type: Option<&str>) -> bool {
        ((200..300).contains(&status) || self.translate_errors) && content_type.is_some_and(is_json)
    }

    fn translate_bytes(
        &self,
        entries: &[Entry],
        from: ApiVersion,
        body: &[u8],
    ) -> Result<Vec<u8>, TranslateError> {
        self.check_size(body.len())?;
        let doc: Node = serde_json::from_slice(body).map_err(|e| TranslateError::InvalidJson {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })?;
        let out = translate_tree(entries, from, doc, self.unmapped)?;
        // The output is about the size of the input: one allocation, not a series of doublings.
        let mut bytes = Vec::with_capacity(body.len() + body.len() / 2 + 64);
        // Serializing into a Vec cannot fail.
        match serde_json::to_writer(&mut bytes, &out) {
            Ok(()) => Ok(bytes),
            Err(_) => Ok(Vec::new()),
        }
    }
}
