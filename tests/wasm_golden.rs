//! The cohort assignment compiled to wasm32 and run under wasm-bindgen-test (Node): the same
//! golden vectors as the host tests, so host tools and the filter agree bit for bit.
//! `make test` runs it with `cargo test --target wasm32-unknown-unknown --test wasm_golden`.
#![cfg(target_arch = "wasm32")]

use handoff::canary::{bucket, golden::VECTORS, threshold};
use wasm_bindgen_test::wasm_bindgen_test;

#[wasm_bindgen_test]
fn golden_vectors_match_on_wasm32() {
    for &(salt, user, expected) in VECTORS {
        assert_eq!(bucket(salt, user), expected, "bucket({salt:?}, {user:?})");
    }
}

#[wasm_bindgen_test]
fn thresholds_match_on_wasm32() {
    assert_eq!(threshold(12.5), 1250);
    assert_eq!(threshold(33.33), 3333);
    assert_eq!(threshold(100.0), 10_000);
}
