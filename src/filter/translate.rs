//! Translation glue: plan the request from its head, buffer the body until it is complete,
//! rewrite it, and do the same to the response. Errors are answered here and never forwarded.
//!
//! proxy-wasm turns a paused headers callback into "stop everything" (the body callbacks do
//! not run until the filter resumes), so the headers continue at once and only the body is
//! held. What keeps a failed request away from the backend is the small Lua "hold" filter the
//! shipped Envoy configs put after handoff: it holds headers marked `x-handoff-translated`
//! until the (rewritten) body is complete. Its twin before handoff holds translated responses,
//! so an untranslatable one can still be answered with a 502 instead of a reset.

use log::{debug, warn};
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Action;

use super::host::{request_header, response_header, scrub_request_header, set_request_header};

use super::Http;
use crate::config::Config;
use crate::problem::Reply;
use crate::translate::{
    check_encoding, direction, Message, Plan, RequestHead, Route, TranslateError, TRANSLATED_HEADER,
};

/// What a translated exchange still has to do.
pub struct Pending {
    plan: Plan,
    /// The request body is being buffered for rewriting.
    request_body: bool,
    /// The response body is being buffered for rewriting.
    response_body: bool,
}

pub fn on_request_headers(http: &mut Http, end_of_stream: bool) -> Action {
    let config = http.config.clone();
    let Some(t) = config.translate.as_ref() else {
        return Action::Continue;
    };
    // Only the filter says a request was translated.
    scrub_request_header(TRANSLATED_HEADER);
    if t.route_for_path(http.head.path().unwrap_or_default())
        .is_none()
    {
        return Action::Continue;
    }
    // Owned from here: the stage rewrites the request while it still uses the original path.
    let path = http.head.path().unwrap_or_default().to_string();
    // Each host call copies: the body's headers are read only when there is a body.
    let body_header = |name: &str| {
        if end_of_stream {
            None
        } else {
            request_header(name)
        }
    };
    let content_type = body_header("content-type");
    let content_encoding = body_header("content-encoding");
    let head = RequestHead {
        path: &path,
        content_type: content_type.as_deref(),
        content_encoding: content_encoding.as_deref(),
        has_body: !end_of_stream,
    };
    let plan = match t.plan(&head, http.variant) {
        Ok(Some(plan)) => plan,
        Ok(None) => return Action::Continue,
        Err(e) => {
            let route = t
                .route_for_path(&path)
                .map_or("unknown", |r| r.name.as_str());
            return fail(http, route, Message::Request, &e);
        }
    };
    set_request_header(":path", Some(&plan.path));
    http.head.set_path(&plan.path);
    set_request_header(TRANSLATED_HEADER, Some(plan.header_value()));
    // The response body is rewritten too: ask the backend for it uncompressed.
    set_request_header("accept-encoding", None);
    debug!(
        "handoff[{}]: translate {} {path} -> {}",
        http.context_id,
        plan.header_value(),
        plan.path
    );
    let request_body = plan.translate_body;
    if request_body {
        // The rewritten body has another length; Envoy frames it anew.
        set_request_header("content-length", None);
    } else {
        count(http, &plan, Message::Request);
    }
    http.translate = Some(Pending {
        plan,
        request_body,
        response_body: false,
    });
    Action::Continue
}

pub fn on_request_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Action {
    on_body(http, Message::Request, body_size, end_of_stream)
}

pub fn on_response_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Action {
    on_body(http, Message::Response, body_size, end_of_stream)
}

/// True while the body of `message` is being buffered for rewriting.
fn buffering(http: &Http, message: Message) -> bool {
    http.translate.as_ref().is_some_and(|p| match message {
        Message::Request => p.request_body,
        Message::Response => p.response_body,
    })
}

/// The route of the pending translation.
fn pending_route<'c>(http: &Http, config: &'c Config) -> Option<&'c Route> {
    let p = http.translate.as_ref()?;
    config.translate.as_ref()?.route(&p.plan)
}

/// The buffered body of `message`, its first `len` bytes (Envoy clamps to what it holds).
fn buffered_body(http: &Http, message: Message, len: usize) -> Vec<u8> {
    match message {
        Message::Request => http.get_http_request_body(0, len),
        Message::Response => http.get_http_response_body(0, len),
    }
    .unwrap_or_default()
}

/// A body chunk: checked against the size limit as it streams in, rewritten at its end.
fn on_body(http: &mut Http, message: Message, body_size: usize, end_of_stream: bool) -> Action {
    if !buffering(http, message) {
        return Action::Continue;
    }
    let config = http.config.clone();
    let Some(route) = pending_route(http, &config) else {
        return Action::Continue;
    };
    if let Err(e) = route.check_size(body_size) {
        return fail(http, &route.name, message, &e);
    }
    if !end_of_stream {
        return Action::Pause;
    }
    let body = buffered_body(http, message, body_size);
    rewrite(http, route, message, body_size, &body)
}

/// Trailers end a body that has them (gRPC-style HTTP/2 clients and backends): what is
/// buffered so far is the whole body, translated now. The trailers pass unchanged.
pub fn on_trailers(http: &mut Http, message: Message) -> Action {
    if !buffering(http, message) {
        return Action::Continue;
    }
    let config = http.config.clone();
    let Some(route) = pending_route(http, &config) else {
        return Action::Continue;
    };
    // u32::MAX is "all of it" on wasm32.
    let body = buffered_body(http, message, u32::MAX as usize);
    if let Err(e) = route.check_size(body.len()) {
        return fail(http, &route.name, message, &e);
    }
    rewrite(http, route, message, body.len(), &body)
}

/// Replaces the buffered body (`size` bytes) of `message` with its translation, or answers
/// the error.
fn rewrite(http: &mut Http, route: &Route, message: Message, size: usize, body: &[u8]) -> Action {
    let Some(plan) = http.translate.as_ref().map(|p| p.plan.clone()) else {
        return Action::Continue;
    };
    let out = match message {
        Message::Request => route.translate_request(plan.client, body),
        Message::Response => route.translate_response(plan.client, body),
    };
    match out {
        Ok(out) => {
            match message {
                Message::Request => http.set_http_request_body(0, size, &out),
                Message::Response => http.set_http_response_body(0, size, &out),
            }
            if let Some(p) = http.translate.as_mut() {
                match message {
                    Message::Request => p.request_body = false,
                    Message::Response => p.response_body = false,
                }
            }
            count(http, &plan, message);
            Action::Continue
        }
        Err(e) => fail(http, &route.name, message, &e),
    }
}

pub fn on_response_headers(http: &mut Http, end_of_stream: bool) -> Action {
    if end_of_stream {
        return Action::Continue;
    }
    let config = http.config.clone();
    let Some(route) = pending_route(http, &config) else {
        return Action::Continue;
    };
    let status = response_header(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    let content_type = response_header("content-type");
    if !route.translates_response(status, content_type.as_deref()) {
        return Action::Continue;
    }
    let encoding = response_header("content-encoding");
    if let Err(e) = check_encoding(encoding.as_deref()) {
        let name = route.name.clone();
        return fail(http, &name, Message::Response, &e);
    }
    let Some(p) = http.translate.as_mut() else {
        return Action::Continue;
    };
    p.response_body = true;
    let marker = direction(p.plan.backend);
    http.set_http_response_header("content-length", None);
    // Tells the client (and the hold filter) that this body is rewritten: `v2-v1` for a v2
    // backend's answer to a v1 client.
    http.set_http_response_header(TRANSLATED_HEADER, Some(marker));
    Action::Continue
}

fn count(http: &Http, plan: &Plan, message: Message) {
    let Some(route) = http.config.translate.as_ref().and_then(|t| t.route(plan)) else {
        return;
    };
    let from = match message {
        Message::Request => plan.client,
        Message::Response => plan.backend,
    };
    http.metrics
        .translate_translation(&route.name, direction(from), message.as_str());
}

/// Answers the client with the error's problem and stops the exchange here.
fn fail(http: &mut Http, route: &str, message: Message, e: &TranslateError) -> Action {
    warn!(
        "handoff[{}]: translate {} {} failed: {}",
        http.context_id,
        route,
        message.as_str(),
        e.detail()
    );
    http.metrics
        .translate_failure(route, message.as_str(), e.reason());
    http.translate = None;
    http.send_reply(e.reply(message));
    Action::Pause
}

/// True while the request body is buffered for rewriting.
pub fn holds_request_body(http: &Http) -> bool {
    buffering(http, Message::Request)
}

/// True while the response body is buffered for rewriting.
pub fn buffers_response(http: &Http) -> bool {
    buffering(http, Message::Response)
}

/// A reply made from the backend's own response (an idempotency replay), translated for the
/// client of this request exactly as a forwarded response would be.
pub fn for_client(http: &Http, mut reply: Reply) -> Reply {
    let (Some(p), Some(route)) = (http.translate.as_ref(), pending_route(http, &http.config))
    else {
        return reply;
    };
    let content_type = reply
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    if !route.translates_response(reply.status, content_type) {
        return reply;
    }
    match route.translate_response(p.plan.client, &reply.body) {
        Ok(out) => {
            reply.body = out;
            reply.headers.retain(|(k, _)| k != TRANSLATED_HEADER);
            reply.headers.push((
                TRANSLATED_HEADER.to_string(),
                direction(p.plan.backend).to_string(),
            ));
            let plan = p.plan.clone();
            count(http, &plan, Message::Response);
            reply
        }
        Err(e) => {
            http.metrics
                .translate_failure(&route.name, Message::Response.as_str(), e.reason());
            e.reply(Message::Response)
        }
    }
}
