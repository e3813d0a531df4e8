//! `handoffctl`: check, explain and package handoff configurations with the filter's own parser
//! and policy code (the `handoff` library), so what it says is what the filter does.
//!
//! A host tool: its dependencies (YAML, JSON Schema, tar/gzip) are host-only, so wasm builds of
//! the package (the wasm-bindgen golden tests build every binary) get an empty stub.

#[cfg(not(target_arch = "wasm32"))]
mod app;
#[cfg(not(target_arch = "wasm32"))]
mod extract;
#[cfg(not(target_arch = "wasm32"))]
mod gateway;
#[cfg(not(target_arch = "wasm32"))]
mod image;
#[cfg(not(target_arch = "wasm32"))]
mod rollout;
#[cfg(not(target_arch = "wasm32"))]
mod sync;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    app::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
