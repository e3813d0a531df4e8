//! Drain: when this Envoy's workload is going away, tell clients to move elsewhere, gently.
//!
//! ```text
//!            start (admin POST, upstream signal, readiness failing)
//!  serving ─────────────────────────────────────────────▶ draining(since, source, grace)
//!     ▲                                                      │  now ≥ since + grace
//!     │ cancel: admin DELETE (any source),                   ▼
//!     └──────── readiness recovered (readiness only) ───── drained
//! ```
//!
//! Everything here is pure, one concern a file: `config` (the section), `state` (the state
//! machine and the readiness lease), `records` (their bytes in proxy-wasm shared data, so
//! every worker sees one state, and the compare-and-swap updates over
//! [`crate::shared::SharedData`]), `admin` (who may use the admin path, and what it asks for),
//! `flow` (what an admin request, a request, a response and a readiness answer do, as steps),
//! `sse` (the `reconnect` event injection) and `websocket` (the frame scanner and the
//! migration message and Close of an upgraded connection). The filter (`filter::drain`) reads
//! the host, performs the steps and applies the edits.

mod admin;
mod config;
pub mod flow;
mod records;
mod sse;
mod state;
pub mod websocket;

pub use admin::*;
pub use config::*;
pub use records::*;
pub use sse::*;
pub use state::*;
pub use websocket::Websocket;

/// How often each worker refreshes its copy of the shared state (and its in-flight heartbeat):
/// a drain start or cancel reaches every worker within this period.
pub const STATE_TICK_MS: u32 = 100;

pub const HINT_HEADER: &str = "x-handoff-reconnect-after-ms";
pub const DEFAULT_ADMIN_PATH: &str = "/.well-known/handoff/drain";
/// The docs/problems.md section of the 503 problem answered after the grace period.
pub const DRAINED_ANCHOR: &str = "drain-drained";
pub const FORBIDDEN_ANCHOR: &str = "drain-admin-forbidden";

/// The reconnect hint: uniform over `[0, jitter_ms]` given a uniform random `u32`.
pub fn hint_ms(jitter_ms: u32, random: u32) -> u32 {
    ((u64::from(random) * (u64::from(jitter_ms) + 1)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hint_is_within_the_jitter(jitter in 0u32..=MAX_JITTER_MS, r in any::<u32>()) {
            prop_assert!(hint_ms(jitter, r) <= jitter);
        }

        #[test]
        fn hint_covers_the_range(jitter in 0u32..=MAX_JITTER_MS) {
            prop_assert_eq!(hint_ms(jitter, 0), 0);
            prop_assert_eq!(hint_ms(jitter, u32::MAX), jitter);
        }
    }
}
