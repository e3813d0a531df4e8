//! Canary glue: assign the cohort, stamp the route header, echo it and the cookie back.

use log::debug;
use proxy_wasm::traits::HttpContext;

use super::host::{random_bytes, set_request_header, HostRequest};
use super::Http;
use crate::canary::{new_anonymous_id, Variant};

/// The canary's counters are batched per worker and added to Envoy's once a tick
/// ([`super::metrics::Metrics::flush`]): the root ticks at least this often when the canary is on.
pub const FLUSH_MS: u64 = 1000;

pub fn tick_ms(config: &crate::config::Config) -> Option<u64> {
    config.canary.as_ref().map(|_| FLUSH_MS)
}

/// What the response path still has to write.
pub struct Pending {
    variant: Variant,
    set_cookie: Option<String>,
}

pub fn on_request_headers(http: &mut Http) {
    let Some(canary) = http.config.canary.as_ref() else {
        return;
    };
    let mut a = canary.assign(&HostRequest, || new_anonymous_id(random_bytes()));
    if canary.guard.is_some() {
        if http.guard.aborted() {
            a = a.aborted();
        }
        http.guard.start();
    }
    if canary.control.is_some() {
        a = http.rollout.get().apply(a);
    }
    http.variant = Some(a.variant);
    // Always set: whatever the client sent in this header is replaced.
    set_request_header(&canary.route_header, Some(a.variant.as_str()));
    if let Some(ov) = &canary.override_ {
        set_request_header(&ov.header, None);
    }
    http.metrics.canary_decision(a.variant, a.reason);
    if a.override_rejected {
        http.metrics.canary_override_rejected();
    }
    debug!(
        "handoff[{}]: canary {} ({}), bucket {:?}",
        http.context_id,
        a.variant.as_str(),
        a.reason.as_str(),
        a.bucket
    );
    if canary.response_header || a.set_cookie.is_some() {
        http.canary = Some(Pending {
            variant: a.variant,
            set_cookie: a.set_cookie,
        });
    }
}

pub fn on_response_headers(http: &mut Http, pending: Pending) {
    let Some(canary) = http.config.canary.as_ref() else {
        return;
    };
    if canary.response_header {
        http.set_http_response_header(&canary.route_header, Some(pending.variant.as_str()));
    }
    if let Some(cookie) = pending.set_cookie {
        http.add_http_response_header("set-cookie", &cookie);
    }
}
