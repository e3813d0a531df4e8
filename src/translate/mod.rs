//! API version translation: one declarative mapping between v1 and v2 JSON payloads that
//! serves both directions. v1 clients in front of a v2 backend have their requests rewritten
//! v1 → v2 and the responses v2 → v1; v2 clients in front of a v1 backend get the mirror image
//! from the same entries.
//!
//! Pure: paths, header values and body bytes in, a plan or rewritten bytes out. The host glue
//! is `filter::translate`.

use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

use crate::canary::Variant;
use crate::problem::Reply;

/// The request header that tells the backend a request was translated (`v1-v2`: a v1 client
/// on a v2 backend, `v2-v1`: the mirror case). Any client-sent value is removed.
pub const TRANSLATED_HEADER: &str = "x-handoff-translated";

/// Envoy's default per-connection buffer limit: larger bodies need that limit raised too.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1_048_576;

/// Numeric pointer segments above this are rejected: writing one pads an array up to it.
const MAX_INDEX: usize = 1023;

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

// ---------------------------------------------------------------------------------------------
// Validated configuration

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

/// A JSON Pointer (RFC 6901) extended with `*`, every element of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub text: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// An object member.
    Key(String),
    /// One array element (or the member with this name, when the value is an object).
    Index(usize),
    /// Every element of an array.
    Each,
}

impl Pointer {
    pub fn parse(text: &str) -> Result<Pointer, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "expected a JSON Pointer starting with '/', such as \"/amount/value\", got {text:?}"
            ));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            segments.push(parse_segment(raw).map_err(|m| format!("{m} in {text:?}"))?);
        }
        Ok(Pointer {
            text: text.to_string(),
            segments,
        })
    }

    pub fn wildcards(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| **s == Segment::Each)
            .count()
    }

    /// True when writing through one pointer writes into (or over) what the other writes:
    /// equal, or one is a prefix of the other. `*` overlaps any index.
    pub(crate) fn overlaps(&self, other: &Pointer) -> bool {
        self.segments
            .iter()
            .zip(&other.segments)
            .all(|(a, b)| match (a, b) {
                (Segment::Each, Segment::Each | Segment::Index(_)) => true,
                (Segment::Index(_), Segment::Each) => true,
                _ => a == b,
            })
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_segment(raw: &str) -> Result<Segment, String> {
    if raw == "*" {
        return Ok(Segment::Each);
    }
    let is_index = !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    if is_index {
        return match raw.parse::<usize>() {
            Ok(n) if n <= MAX_INDEX => Ok(Segment::Index(n)),
            _ => Err(format!("array index {raw} is above {MAX_INDEX}")),
        };
    }
    let mut key = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => key.push('~'),
                Some('1') => key.push('/'),
                _ => return Err("'~' must be followed by 0 or 1".to_string()),
            }
        } else {
            key.push(c);
        }
    }
    Ok(Segment::Key(key))
}

// ---------------------------------------------------------------------------------------------
// Decisions

/// Why a message could not be translated. Each is a client-facing problem and a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TranslateError {
    /// The body needs translating but is not `application/json` or `application/*+json`.
    UnsupportedMediaType { content_type: Option<String> },
    /// The body is compressed (`content-encoding` other than `identity`): it cannot be read.
    UnsupportedEncoding { content_encoding: String },
    /// The body is not JSON; `line` and `column` are 1-based, where parsing stopped.
    InvalidJson {
        line: usize,
        column: usize,
        message: String,
    },
    /// A `required` entry's source is absent; `pointer` names it in the sender's version.
    MissingRequired { pointer: String },
    /// The body is larger than the route's `max_body_bytes`.
    TooLarge { limit: u64 },
}

impl TranslateError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            TranslateError::UnsupportedMediaType { .. } => "unsupported_media_type",
            TranslateError::UnsupportedEncoding { .. } => "unsupported_encoding",
            TranslateError::InvalidJson { .. } => "invalid_json",
            TranslateError::MissingRequired { .. } => "missing_required",
            TranslateError::TooLarge { .. } => "too_large",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            TranslateError::UnsupportedMediaType { content_type } => format!(
                "this request is translated between API versions, which needs an \
                 application/json body; got content-type {}",
                content_type.as_deref().unwrap_or("(none)")
            ),
            TranslateError::UnsupportedEncoding { content_encoding } => format!(
                "this body is translated between API versions, which needs it uncompressed; \
                 got content-encoding {content_encoding}"
            ),
            TranslateError::InvalidJson {
                line,
                column,
                message,
            } => format!("the body is not valid JSON at line {line}, column {column}: {message}"),
            TranslateError::MissingRequired { pointer } => {
                format!("the required field {pointer} is missing")
            }
            TranslateError::TooLarge { limit } => {
                format!("the body is larger than the {limit} bytes translation allows")
            }
        }
    }

    /// The answer to the client. A request the client sent wrong gets 415/400/422/413; a
    /// response the backend sent that cannot be translated is the gateway's failure: 502.
    pub fn reply(&self, message: Message) -> Reply {
        let (status, anchor, title) = match (message, self) {
            (Message::Response, _) => (
                502,
                "translate-response-failed",
                "Response could not be translated",
            ),
            (_, TranslateError::UnsupportedMediaType { .. }) => (
                415,
                "translate-unsupported-media-type",
                "Unsupported media type",
            ),
            (_, TranslateError::UnsupportedEncoding { .. }) => (
                415,
                "translate-unsupported-media-type",
                "Unsupported content encoding",
            ),
            (_, TranslateError::InvalidJson { .. }) => {
                (400, "translate-invalid-json", "Invalid JSON body")
            }
            (_, TranslateError::MissingRequired { .. }) => {
                (422, "translate-missing-required", "Missing required field")
            }
            (_, TranslateError::TooLarge { .. }) => {
                (413, "translate-too-large", "Body too large to translate")
            }
        };
        let detail = match message {
            Message::Request => self.detail(),
            Message::Response => format!("the backend's response: {}", self.detail()),
        };
        Reply::problem(status, anchor, title, &detail)
    }
}

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

/// serde_json appends " at line L column C"; the problem detail says it once, its own way.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// One place a source pointer leads to in a document; the array index bound to each `*` comes
/// with it.
enum Found<'a, 'v> {
    /// A value.
    Value(&'a mut Node<'v>),
    /// Nothing there; the indices are those bound before the path broke off.
    Absent,
    /// A `*` met an empty array.
    EmptyArray,
}

/// Calls `f` for each place `segs` leads to from `v`, in document order; stops at the first
/// error `f` returns.
fn find<'v, E>(
    v: Option<&mut Node<'v>>,
    segs: &[Segment],
    idx: &mut Vec<usize>,
    f: &mut impl FnMut(Found<'_, 'v>, &[usize]) -> Result<(), E>,
) -> Result<(), E> {
    let Some((seg, rest)) = segs.split_first() else {
        return f(v.map_or(Found::Absent, Found::Value), idx);
    };
    match (seg, v) {
        (Segment::Each, Some(Node::Array(items))) => {
            if items.is_empty() {
                return f(Found::EmptyArray, idx);
            }
            for (i, item) in items.iter_mut().enumerate() {
                idx.push(i);
                find(Some(item), rest, idx, f)?;
                idx.pop();
            }
            Ok(())
        }
        (Segment::Each, _) => f(Found::Absent, idx),
        (Segment::Key(k), v) => find(
            v.and_then(|v| match v {
                Node::Object(m) => m.get_mut(k),
                _ => None,
            }),
            rest,
            idx,
            f,
        ),
        (Segment::Index(n), v) => {
            let child = match v {
                Some(Node::Array(items)) => items.get_mut(*n),
                Some(Node::Object(m)) => m.get_mut(&n.to_string()),
                _ => None,
            };
            find(child, rest, idx, f)
        }
    }
}

fn object<'a, 'v>(v: &'a mut Node<'v>) -> &'a mut Object<'v> {
    if !matches!(v, Node::Object(_)) {
        *v = Node::Object(Object::default());
    }
    match v {
        Node::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

fn element<'a, 'v>(v: &'a mut Node<'v>, i: usize) -> &'a mut Node<'v> {
    if !matches!(v, Node::Array(_)) {
        *v = Node::Array(Vec::new());
    }
    match v {
        Node::Array(items) => {
            if items.len() <= i {
                items.resize(i + 1, Node::Null);
            }
            &mut items[i]
        }
        _ => unreachable!("just made an array"),
    }
}

/// The place `segs` leads to in `doc`, creating objects and arrays on the way, with `idx`
/// bound to the `*`s. Stops before segment `stop`.
fn place<'a, 'v>(
    doc: &'a mut Node<'v>,
    segs: &'v [Segment],
    idx: &[usize],
    stop: usize,
) -> &'a mut Node<'v> {
    let mut cur = doc;
    let mut bound = idx.iter();
    for seg in &segs[..stop] {
        cur = match seg {
            Segment::Key(k) => object(cur).member(Cow::Borrowed(k)),
            Segment::Index(n) if matches!(cur, Node::Object(_)) => {
                object(cur).member(Cow::Owned(n.to_string()))
            }
            Segment::Index(n) => element(cur, *n),
            Segment::Each => element(cur, bound.next().copied().unwrap_or(0)),
        };
    }
    cur
}

/// Removes what `segs` names from `v`; true when something was removed. A container the
/// removal left empty goes too, rather than staying behind as a hollow `{}` of fields that
/// were all mapped elsewhere.
fn remove(v: &mut Node<'_>, segs: &[Segment]) -> bool {
    let Some((seg, rest)) = segs.split_first() else {
        return false;
    };
    match (seg, v) {
        (Segment::Each, Node::Array(items)) => {
            if rest.is_empty() {
                let any = !items.is_empty();
                items.clear();
                return any;
            }
            let mut any = false;
            for item in items.iter_mut() {
                any |= remove(item, rest);
            }
            if any && items.iter().all(is_empty_container) {
                items.clear();
            }
            any
        }
        (Segment::Key(_) | Segment::Index(_), Node::Object(m)) => {
            let key = segment_key(seg);
            if rest.is_empty() {
                return m.remove(&key).is_some();
            }
            let Some(child) = m.get_mut(&key) else {
                return false;
            };
            let removed = remove(child, rest);
            if removed && is_empty_container(child) {
                m.remove(&key);
            }
            removed
        }
        (Segment::Index(n), Node::Array(items)) if *n < items.len() => {
            if rest.is_empty() {
                items.remove(*n);
                return true;
            }
            let removed = remove(&mut items[*n], rest);
            if removed && is_empty_container(&items[*n]) {
                items.remove(*n);
            }
            removed
        }
        _ => false,
    }
}

fn segment_key(seg: &Segment) -> Cow<'_, str> {
    match seg {
        Segment::Key(k) => Cow::Borrowed(k),
        Segment::Index(n) => Cow::Owned(n.to_string()),
        Segment::Each => Cow::Borrowed("*"),
    }
}

fn is_empty_container(v: &Node<'_>) -> bool {
    match v {
        Node::Object(m) => m.is_empty(),
        Node::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Translates a document written in `from` into the other version with `entries`.
pub fn translate_value(
    entries: &[Entry],
    from: ApiVersion,
    doc: &Value,
    unmapped: Unmapped,
) -> Result<Value, TranslateError> {
    translate_tree(entries, from, Node::from_value(doc), unmapped).map(Node::into_value)
}

/// `translate_value` on a document it may take apart: a source no later entry reads again is
/// moved into the result rather than copied (a mapped array of a 64 KB body is most of it).
fn translate_tree<'v>(
    entries: &'v [Entry],
    from: ApiVersion,
    mut doc: Node<'v>,
    unmapped: Unmapped,
) -> Result<Node<'v>, TranslateError> {
    let to = from.other();
    let was_null = doc.is_null();
    let mut out = match unmapped {
        Unmapped::Drop => Node::Null,
        Unmapped::Keep => {
            let mut rest = doc.clone();
            for p in entries.iter().filter_map(|e| e.side(from)) {
                remove(&mut rest, &p.segments);
            }
            rest
        }
    };
    for (i, e) in entries.iter().enumerate() {
        let Some(dst) = e.side(to) else {
            continue;
        };
        let Some(src) = e.side(from) else {
            if let Some(d) = &e.default {
                *place(&mut out, &dst.segments, &[], dst.segments.len()) = Node::from_value(d);
            }
            continue;
        };
        let take = !entries[i + 1..]
            .iter()
            .filter_map(|later| later.side(from))
            .any(|p| p.overlaps(src));
        find(
            Some(&mut doc),
            &src.segments,
            &mut Vec::new(),
            &mut |found, idx| {
                match found {
                    Found::Value(v) => {
                        let v = if take { std::mem::take(v) } else { v.clone() };
                        *place(&mut out, &dst.segments, idx, dst.segments.len()) = v;
                    }
                    Found::Absent => {
                        if e.required {
                            return Err(TranslateError::MissingRequired {
                                pointer: src.text.clone(),
                            });
                        }
                        // A default needs every `*` bound to know where it goes.
                        if let (Some(d), true) = (&e.default, idx.len() == src.wildcards()) {
                            *place(&mut out, &dst.segments, idx, dst.segments.len()) =
                                Node::from_value(d);
                        }
                    }
                    Found::EmptyArray => {
                        // Keep `[]` as `[]`: the target's array at the same `*` exists, empty.
                        let stop = dst
                            .segments
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| **s == Segment::Each)
                            .nth(idx.len())
                            .map_or(dst.segments.len(), |(i, _)| i);
                        let slot = place(&mut out, &dst.segments, idx, stop);
                        if slot.is_null() {
                            *slot = Node::Array(Vec::new());
                        }
                    }
                }
                Ok(())
            },
        )?;
    }
    if out.is_null() && !was_null {
        out = Node::Object(Object::default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
pub(crate) mod tree;

use tree::{Node, Object};
