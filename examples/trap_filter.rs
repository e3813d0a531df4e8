//! A deliberately broken proxy-wasm filter, for the fault tests only (never shipped): it panics
//! (a wasm trap, since the release profile aborts on panic) on a request that carries
//! `x-trap: 1`, and otherwise marks responses with `x-trap-filter: alive`. This is how
//! `tests/e2e_faults.rs` makes a wasm VM fail on demand, to check which of Envoy's
//! `failure_policy` settings does what to the requests that follow.
//!
//! ```text
//! cargo build --release --target wasm32-wasip1 --example trap_filter
//! ```

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Http))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Http;
    impl Context for Http {}
    impl HttpContext for Http {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let trap = proxy_wasm::hostcalls::get_map_value_bytes(
                proxy_wasm::types::MapType::HttpRequestHeaders,
                "x-trap",
            );
            if matches!(trap, Ok(Some(v)) if v == b"1") {
                panic!("trap requested by x-trap");
            }
            Action::Continue
        }
        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            self.set_http_response_header("x-trap-filter", Some("alive"));
            Action::Continue
        }
    }

    proxy_wasm::main! {{
        // Also installs the panic hook that logs the panic message before the trap.
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}
}
