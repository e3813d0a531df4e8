//! Host glue: reads the request from Envoy, asks the pure policies, applies their decisions.
//! Nothing in here decides anything on its own.

mod canary;
mod drain;
mod host;
mod metrics;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

use crate::config::Config;
use metrics::Metrics;

pub fn start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            config: Rc::new(Config::default()),
            metrics: Rc::new(Metrics::define()),
            drain: drain::RootDrain::new(),
        })
    });
}

struct Root {
    context_id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    drain: drain::RootDrain,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, _: usize, _: usize) {
        drain::on_root_call_response(self, token_id);
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
                self.config = Rc::new(config);
                drain::configure(self);
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
        drain::on_tick(self);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            canary: None,
            drain: self.drain.http(),
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
    drain: drain::HttpDrain,
}

impl Context for Http {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, _: usize, _: usize) {
        drain::on_http_call_response(self, token_id);
    }

    fn on_done(&mut self) -> bool {
        drain::on_end(self);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Drain first: the admin path and the drained 503 are answered before anything else.
        if let Some(action) = drain::on_request_headers(self, end_of_stream) {
            return action;
        }
        if self.config.canary.is_some() {
            canary::on_request_headers(self);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(pending) = self.canary.take() {
            canary::on_response_headers(self, pending);
        }
        drain::on_response_headers(self)
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        drain::on_response_body(self, body_size);
        Action::Continue
    }

    fn on_log(&mut self) {
        drain::on_end(self);
    }
}
