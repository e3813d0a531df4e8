//! Envoy stats through proxy-wasm metrics, all named `handoff_*`.
//!
//! Labels are encoded in the stat name as `.<label>.<value>` pairs (for example
//! `handoff_canary_decisions.variant.canary.reason.hash`); the `stats_tags` in the shipped Envoy
//! configs turn them into Prometheus labels.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::canary::{Reason, Variant};
use crate::drain::{DrainSource, Phase};

pub struct Metrics {
    canary_decisions: Vec<u32>,
    canary_override_rejected: u32,
    drain_state: u32,
    drain_started: Vec<u32>,
    drain_hinted: u32,
    drain_rejected: u32,
    drain_inflight: u32,
}

fn counter(name: &str) -> u32 {
    // Defining a metric only fails outside Envoy; 0 then makes increments no-ops.
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0)
}

fn gauge(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Gauge, name).unwrap_or(0)
}

fn inc(id: u32) {
    let _ = hostcalls::increment_metric(id, 1);
}

impl Metrics {
    pub fn define() -> Metrics {
        let mut canary_decisions = Vec::new();
        for v in Variant::ALL {
            for r in Reason::ALL {
                canary_decisions.push(counter(&format!(
                    "handoff_canary_decisions.variant.{}.reason.{}",
                    v.as_str(),
                    r.as_str()
                )));
            }
        }
        Metrics {
            canary_decisions,
            canary_override_rejected: counter("handoff_canary_override_rejected"),
            drain_state: gauge("handoff_drain_state"),
            drain_started: DrainSource::ALL
                .iter()
                .map(|s| counter(&format!("handoff_drain_started.source.{}", s.as_str())))
                .collect(),
            drain_hinted: counter("handoff_drain_hinted"),
            drain_rejected: counter("handoff_drain_rejected"),
            drain_inflight: gauge("handoff_drain_inflight"),
        }
    }

    pub fn canary_decision(&self, v: Variant, r: Reason) {
        let vi = Variant::ALL.iter().position(|x| *x == v).unwrap_or(0);
        let ri = Reason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        inc(self.canary_decisions[vi * Reason::ALL.len() + ri]);
    }

    pub fn canary_override_rejected(&self) {
        inc(self.canary_override_rejected);
    }

    /// 0 serving, 1 draining, 2 drained.
    pub fn drain_state(&self, phase: Phase) {
        let _ = hostcalls::record_metric(self.drain_state, phase.gauge());
    }

    pub fn drain_started(&self, source: DrainSource) {
        let i = DrainSource::ALL
            .iter()
            .position(|x| *x == source)
            .unwrap_or(0);
        inc(self.drain_started[i]);
    }

    pub fn drain_hinted(&self) {
        inc(self.drain_hinted);
    }

    pub fn drain_rejected(&self) {
        inc(self.drain_rejected);
    }

    pub fn drain_inflight(&self, n: u64) {
        let _ = hostcalls::record_metric(self.drain_inflight, n);
    }
}
