//! Why a message could not be translated, and the problem reply the client gets.

use super::Message;
use crate::problem::Reply;

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

/// serde_json appends " at line L column C"; the problem detail says it once, its own way.
pub(super) fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
