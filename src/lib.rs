//! handoff: zero-disruption rollouts as one proxy-wasm filter.
//!
//! The policy modules (`canary`, ...) are pure: plain data in, a decision out. Only `filter`
//! talks to the proxy-wasm host.

pub mod canary;
pub mod cohort;
pub mod config;
pub mod drain;
pub mod etcd;
pub mod guard;
pub mod headers;
pub mod idempotency;
pub mod ids;
pub mod json;
pub mod problem;
pub mod rollout;
pub mod shared;
pub mod source;
pub mod translate;

// The filter (host glue and entry point) exists only in the proxy-wasm build; the pure policy
// also compiles for the host (tests, handoffctl) and for wasm32-unknown-unknown (the
// wasm-bindgen golden tests).
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
proxy_wasm::main! {{
    filter::start();
}}
