//! Host glue: reads the request from Envoy, asks the pure policies, applies their decisions.
//! Nothing in here decides anything on its own.

mod canary;
mod host;
mod metrics;
mod translate;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

use crate::canary::Variant;
use crate::config::Config;
use metrics::Metrics;

pub fn start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            config: Rc::new(Config::default()),
            metrics: Rc::new(Metrics::define()),
        })
    });
}

struct Root {
    context_id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

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
                true
            }
            Err(e) => {
                // One line, naming the field; returning false makes Envoy refuse the filter.
                error!("handoff[{}]: {e}", self.context_id);
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            canary: None,
            variant: None,
            translate: None,
            request_body: None,
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
    /// The request body as forwarded, when a stage rewrote it (translation), for later stages.
    #[allow(dead_code)]
    request_body: Option<Vec<u8>>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.config.canary.is_some() {
            canary::on_request_headers(self);
        }
        if self.config.translate.is_some() {
            return translate::on_request_headers(self, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.translate.is_some() {
            return translate::on_request_body(self, body_size, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(pending) = self.canary.take() {
            canary::on_response_headers(self, pending);
        }
        if self.translate.is_some() {
            return translate::on_response_headers(self, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.translate.is_some() {
            return translate::on_response_body(self, body_size, end_of_stream);
        }
        Action::Continue
    }
}
