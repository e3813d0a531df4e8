//! Host glue: reads the request from Envoy, asks the pure policies, applies their decisions.
//! Nothing in here decides anything on its own.

mod canary;
mod drain;
mod guard;
mod host;
mod idempotency;
mod metrics;
mod rollout;
mod shared;
mod translate;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

use crate::canary::Variant;
use crate::config::Config;
use crate::translate::Message;
use metrics::Metrics;

/// Marks a request whose body handoff must see whole before it may be forwarded (translation,
/// an idempotency fingerprint). proxy-wasm cannot hold request headers while it reads the body
/// (a paused headers callback stops the body callbacks too), so the shipped Envoy configs put
/// a small Lua filter after handoff that holds marked requests until their body is complete
/// and removes the mark: a request handoff answers itself never reaches the upstream.
pub const HOLD_HEADER: &str = "x-handoff-hold";

pub fn start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            config: Rc::new(Config::default()),
            metrics: Rc::new(Metrics::define()),
            drain: drain::RootDrain::new(),
            guard: guard::RootGuard::new(),
            rollout: rollout::RootRollout::new(),
        })
    });
}

struct Root {
    context_id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    drain: drain::RootDrain,
    guard: guard::RootGuard,
    rollout: rollout::RootRollout,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, headers: usize, body: usize, _: usize) {
        // Each capability ignores tokens it did not dispatch.
        drain::on_root_call_response(self, token_id);
        idempotency::on_root_call_response(self, token_id, headers, body);
        rollout::on_root_call_response(self, token_id, headers, body);
    }

    fn on_done(&mut self) -> bool {
        // The VM is stopping: what the ticks have not added yet.
        self.metrics.flush();
        true
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        info!(
            "handoff {} started (root context {})",
            env!("CARGO_PKG_VERSION"),
            self.context_id
        );
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&raw) {
            Ok(config) => {
                info!(
                    "handoff[{}]: configuration accepted: {}",
                    self.context_id,
                    config.summary()
                );
                idempotency::on_configure(&config, &self.metrics);
                self.config = Rc::new(config);
                drain::configure(self);
                guard::configure(self);
                rollout::configure(self);
                // One tick serves every section: the shortest period any of them needs.
                let tick = [
                    canary::tick_ms,
                    drain::tick_ms,
                    guard::tick_ms,
                    idempotency::tick_ms,
                    rollout::tick_ms,
                ]
                .iter()
                .filter_map(|f| f(&self.config))
                .min();
                if let Some(ms) = tick {
                    self.set_tick_period(std::time::Duration::from_millis(ms));
                }
                true
            }
            Err(e) => {
                // One line, naming the field; returning false makes Envoy refuse the filter.
                error!("handoff[{}]: {e}", self.context_id);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if guard::drain_due(self) {
            drain::on_tick(self);
        }
        guard::on_tick(self);
        rollout::on_tick(self);
        idempotency::on_tick(self);
        self.metrics.flush();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            canary: None,
            variant: None,
            translate: None,
            idempotency: None,
            replied: false,
            drain: self.drain.http(),
            guard: self.guard.http(),
            rollout: self.rollout.http(),
            head: host::Head::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request state: what each capability decided on the request path and must apply on the
/// response path.
pub(crate) struct Http {
    context_id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    canary: Option<canary::Pending>,
    /// The cohort the canary stage assigned (always set when the canary section is on).
    variant: Option<Variant>,
    translate: Option<translate::Pending>,
    idempotency: Option<idempotency::Pending>,
    drain: drain::HttpDrain,
    guard: guard::HttpGuard,
    /// The fleet's rollout control as this worker applies it.
    rollout: Rc<std::cell::Cell<crate::rollout::Control>>,
    /// A stage answered the request itself: later stages must not run.
    replied: bool,
    /// `:method` and `:path`, read once for every stage.
    head: host::Head,
}

impl Http {
    /// Answers the request locally (a problem or a replay) instead of forwarding it.
    fn send_reply(&mut self, reply: crate::problem::Reply) {
        self.replied = true;
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.send_http_response(u32::from(reply.status), headers, Some(&reply.body));
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        // Each stage ignores tokens it did not dispatch.
        drain::on_http_call_response(self, token);
        idempotency::on_http_call_response(self, token, headers, body);
    }

    // The end of the stream, for every stream Envoy created a context for. handoff does all
    // its end-of-stream work here and exports no `proxy_on_log` (scripts/wasm-roots.json): the
    // host then skips that callback, one call into the VM fewer per request.
    fn on_done(&mut self) -> bool {
        idempotency::on_end(self);
        drain::on_end(self);
        true
    }
}

impl HttpContext for Http {
    // Stage order on the request: drain (its admin path and the drained 503 come first),
    // the canary guard's admin path, canary (decides the cohort; counted by the guard at the
    // response headers), translate (rewrites path and body for the backend's
    // version), idempotency (fingerprints the request as forwarded). On the response,
    // idempotency captures the upstream's own response before translate rewrites it for the
    // client.
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Every stage below reads its request headers from one host call when they read
        // several (dropped when this returns; later callbacks read from the host).
        let _snapshot = self
            .config
            .reads_several_request_headers()
            .then(host::RequestSnapshot::take);
        if let Some(action) = drain::on_request_headers(self, end_of_stream) {
            self.replied = true;
            return action;
        }
        if let Some(action) = guard::on_request_headers(self) {
            return action;
        }
        if self.config.canary.is_some() {
            canary::on_request_headers(self);
        }
        let action = translate::on_request_headers(self, end_of_stream);
        if self.replied {
            return action;
        }
        let action = idempotency::on_request_headers(self, end_of_stream);
        // Only the filter decides which requests are held: a held request's mark replaces
        // whatever the client sent, any other request's is removed. (A request answered here
        // never reaches the hold filter.)
        let holds = self.config.translate.is_some() || self.config.idempotency.is_some();
        if holds && !self.replied {
            if translate::holds_request_body(self) || idempotency::holds_request_body(self) {
                host::set_request_header(HOLD_HEADER, Some("1"));
            } else {
                host::scrub_request_header(HOLD_HEADER);
            }
        }
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(action) = drain::on_request_body(self, body_size, end_of_stream) {
            return action;
        }
        let a = translate::on_request_body(self, body_size, end_of_stream);
        if self.replied {
            return Action::Pause;
        }
        let b = idempotency::on_request_body(self, body_size, end_of_stream);
        both(a, b)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Translation first: idempotency fingerprints the body as forwarded.
        let a = translate::on_trailers(self, Message::Request);
        if self.replied {
            return Action::Pause;
        }
        let b = idempotency::on_request_trailers(self);
        both(a, b)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Capture the upstream's own response before anything rewrites it.
        let a = idempotency::on_response_headers(self, end_of_stream);
        guard::on_response_headers(self);
        if let Some(pending) = self.canary.take() {
            canary::on_response_headers(self, pending);
        }
        let c = drain::on_response_headers(self);
        // A reply handoff sent itself (a replay is already translated for this client) passes
        // back through this filter: it is not rewritten again.
        if self.replied {
            return both(a, c);
        }
        let b = translate::on_response_headers(self, end_of_stream);
        both(both(a, b), c)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // When translate buffers the response, Envoy hands over the whole buffer each time:
        // the capture then reads it once, at the end.
        let a = if !translate::buffers_response(self) || end_of_stream {
            idempotency::on_response_body(self, body_size, end_of_stream)
        } else {
            Action::Continue
        };
        drain::on_response_body(self, body_size);
        if self.replied {
            return a;
        }
        let b = translate::on_response_body(self, body_size, end_of_stream);
        both(a, b)
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body. A body translate buffers reached no body callback with the
        // end of stream: the capture reads it whole here, before translate rewrites it.
        let a = if translate::buffers_response(self) {
            let size = self
                .get_http_response_body(0, u32::MAX as usize)
                .map_or(0, |b| b.len());
            idempotency::on_response_body(self, size, true)
        } else {
            idempotency::on_response_trailers(self)
        };
        if self.replied {
            return a;
        }
        let b = translate::on_trailers(self, Message::Response);
        both(a, b)
    }
}

/// Paused if any stage paused.
fn both(a: Action, b: Action) -> Action {
    if matches!(a, Action::Pause) || matches!(b, Action::Pause) {
        Action::Pause
    } else {
        Action::Continue
    }
}
