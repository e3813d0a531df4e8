//! Envoy stats through proxy-wasm metrics, all named `handoff_*`.
//!
//! Labels are encoded in the stat name as `.<label>.<value>` pairs (for example
//! `handoff_canary_decisions.variant.canary.reason.hash`); the `stats_tags` in the shipped Envoy
//! configs turn them into Prometheus labels.

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;

use crate::canary::{Reason, Variant};
use crate::drain::{DrainSource, Phase};
use crate::guard::Trigger;
use crate::idempotency::Outcome;

/// The outcomes of `handoff_idempotency_retries`, all defined at start (a dashboard sees 0,
/// not a missing series).
const RETRY_OUTCOMES: [&str; 6] = ["retried", "stored", "lost", "failed", "expired", "dropped"];

pub struct Metrics {
    canary_decisions: Vec<u32>,
    /// Decisions counted since the last flush, per `canary_decisions` entry: added to Envoy's
    /// counters once a tick ([`Metrics::flush`]), not with a host call per request.
    canary_unflushed: RefCell<Vec<u64>>,
    canary_override_rejected: u32,
    /// Counters whose labels come from the configuration (route names), defined on first use.
    by_name: RefCell<HashMap<String, u32>>,
    idempotency_outcomes: Vec<u32>,
    idempotency_slots_used: u32,
    idempotency_retries: Vec<u32>,
    idempotency_retry_pending: u32,
    drain_state: u32,
    drain_started: Vec<u32>,
    drain_hinted: u32,
    drain_rejected: u32,
    drain_inflight: u32,
    websockets_open: u32,
    websocket_migrations: u32,
    websocket_closes: u32,
    websocket_idle: u32,
    websocket_malformed: u32,
    /// Per variant (stable, canary).
    guard_requests: [u32; 2],
    guard_errors: [u32; 2],
    guard_latency: [u32; 2],
    guard_state: u32,
    guard_aborts: Vec<u32>,
    /// etcd requests of the rollout control: reads, writes, lease calls.
    rollout_requests: [u32; 3],
    rollout_errors: Vec<u32>,
    rollout_leader: u32,
    rollout_state: u32,
    rollout_fleet_windows: u32,
    rollout_fleet_aborts: u32,
}

/// The reasons of `handoff_rollout_etcd_errors`, all defined at start.
const ROLLOUT_ERRORS: [&str; 5] = ["unreachable", "server", "lease", "malformed", "record"];
const ROLLOUT_KINDS: [&str; 3] = ["read", "write", "lease"];

fn counter(name: &str) -> u32 {
    // Defining a metric only fails outside Envoy; 0 then makes increments no-ops.
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0)
}

fn gauge(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Gauge, name).unwrap_or(0)
}

fn per_variant(kind: MetricType, name: &str) -> [u32; 2] {
    Variant::ALL.map(|v| {
        hostcalls::define_metric(kind, &format!("{name}.variant.{}", v.as_str())).unwrap_or(0)
    })
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
            canary_unflushed: RefCell::new(vec![0; canary_decisions.len()]),
            canary_decisions,
            canary_override_rejected: counter("handoff_canary_override_rejected"),
            by_name: RefCell::new(HashMap::new()),
            idempotency_outcomes: Outcome::ALL
                .iter()
                .map(|o| {
                    counter(&format!(
                        "handoff_idempotency_outcomes.outcome.{}",
                        o.as_str()
                    ))
                })
                .collect(),
            idempotency_slots_used: gauge("handoff_idempotency_local_slots_used"),
            idempotency_retries: RETRY_OUTCOMES
                .iter()
                .map(|o| counter(&format!("handoff_idempotency_retries.outcome.{o}")))
                .collect(),
            idempotency_retry_pending: gauge("handoff_idempotency_retry_pending"),
            drain_state: gauge("handoff_drain_state"),
            drain_started: DrainSource::ALL
                .iter()
                .map(|s| counter(&format!("handoff_drain_started.source.{}", s.as_str())))
                .collect(),
            drain_hinted: counter("handoff_drain_hinted"),
            drain_rejected: counter("handoff_drain_rejected"),
            drain_inflight: gauge("handoff_drain_inflight"),
            websockets_open: gauge("handoff_drain_websockets_open"),
            websocket_migrations: counter("handoff_drain_websocket_migrations"),
            websocket_closes: counter("handoff_drain_websocket_closes"),
            websocket_idle: counter("handoff_drain_websocket_idle_at_grace_end"),
            websocket_malformed: counter("handoff_drain_websocket_malformed"),
            guard_requests: per_variant(MetricType::Counter, "handoff_canary_guard_requests"),
            guard_errors: per_variant(MetricType::Counter, "handoff_canary_guard_errors"),
            guard_latency: per_variant(MetricType::Histogram, "handoff_canary_guard_latency_ms"),
            guard_state: gauge("handoff_canary_guard_state"),
            guard_aborts: Trigger::ALL
                .iter()
                .map(|t| {
                    counter(&format!(
                        "handoff_canary_guard_aborts.trigger.{}",
                        t.as_str()
                    ))
                })
                .collect(),
            rollout_requests: [
                counter("handoff_rollout_etcd_reads"),
                counter("handoff_rollout_etcd_writes"),
                counter("handoff_rollout_etcd_lease_calls"),
            ],
            rollout_errors: ROLLOUT_ERRORS
                .iter()
                .map(|r| counter(&format!("handoff_rollout_etcd_errors.reason.{r}")))
                .collect(),
            rollout_leader: gauge("handoff_rollout_leader"),
            rollout_state: gauge("handoff_rollout_state"),
            rollout_fleet_windows: counter("handoff_rollout_fleet_windows"),
            rollout_fleet_aborts: counter("handoff_rollout_fleet_aborts"),
        }
    }

    /// Counted here; Envoy's counter moves at the next [`Metrics::flush`].
    pub fn canary_decision(&self, v: Variant, r: Reason) {
        let vi = Variant::ALL.iter().position(|x| *x == v).unwrap_or(0);
        let ri = Reason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        if let Some(n) = self
            .canary_unflushed
            .borrow_mut()
            .get_mut(vi * Reason::ALL.len() + ri)
        {
            *n += 1;
        }
    }

    /// Adds the counts batched since the last flush to Envoy's counters: one host call per
    /// counter that moved, once a tick.
    pub fn flush(&self) {
        let mut pending = self.canary_unflushed.borrow_mut();
        for (id, n) in self.canary_decisions.iter().zip(pending.iter_mut()) {
            if *n > 0 {
                let _ = hostcalls::increment_metric(*id, *n as i64);
                *n = 0;
            }
        }
    }

    pub fn canary_override_rejected(&self) {
        inc(self.canary_override_rejected);
    }

    fn inc_named(&self, name: String) {
        let mut by_name = self.by_name.borrow_mut();
        let id = *by_name.entry(name).or_insert_with_key(|n| counter(n));
        inc(id);
    }

    /// `handoff_translate_translations{route, direction, message}`
    pub fn translate_translation(&self, route: &str, direction: &str, message: &str) {
        self.inc_named(format!(
            "handoff_translate_translations.route.{route}.direction.{direction}.message.{message}"
        ));
    }

    /// `handoff_translate_failures{route, message, reason}`
    pub fn translate_failure(&self, route: &str, message: &str, reason: &str) {
        self.inc_named(format!(
            "handoff_translate_failures.route.{route}.message.{message}.reason.{reason}"
        ));
    }

    pub fn idempotency_outcome(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        inc(self.idempotency_outcomes[i]);
    }

    /// Slots of the local store that hold a record (taken from free: +1, released: -1).
    /// Expired records stay counted until their slot is reused.
    pub fn idempotency_slots_used(&self, delta: i64) {
        let _ = hostcalls::increment_metric(self.idempotency_slots_used, delta);
    }

    /// `handoff_idempotency_retries{outcome}`: etcd completions and releases that failed and
    /// are retried (`retried`), and how they ended: `stored`, `lost` (taken over), `failed`
    /// (refused for good), `expired` (deadline passed), `dropped` (queue full, store changed).
    pub fn idempotency_retry(&self, outcome: &str) {
        let i = RETRY_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        inc(self.idempotency_retries[i]);
    }

    /// Writes this worker has queued for retry.
    pub fn idempotency_retry_pending(&self, n: usize) {
        let _ = hostcalls::record_metric(self.idempotency_retry_pending, n as u64);
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

    /// Upgraded WebSockets open now (+1 on the 101, -1 at the stream's end).
    pub fn websockets_open(&self, delta: i64) {
        let _ = hostcalls::increment_metric(self.websockets_open, delta);
    }

    pub fn websocket_migrated(&self) {
        inc(self.websocket_migrations);
    }

    /// A Close sent to a client.
    pub fn websocket_closed(&self) {
        inc(self.websocket_closes);
    }

    /// WebSockets still open and not closed by handoff when the grace ended: no frame came in
    /// either direction that handoff could close them at.
    pub fn websocket_idle_at_grace_end(&self, n: u64) {
        if n > 0 {
            let _ = hostcalls::increment_metric(self.websocket_idle, n as i64);
        }
    }

    pub fn websocket_malformed(&self) {
        inc(self.websocket_malformed);
    }

    /// 0 active, 1 aborted.
    pub fn guard_state(&self, aborted: bool) {
        let _ = hostcalls::record_metric(self.guard_state, u64::from(aborted));
    }

    /// Requests and errors counted since the last tick: `[stable requests, stable errors,
    /// canary requests, canary errors]` (added once per tick, not per request).
    pub fn guard_counts(&self, n: [u64; 4]) {
        for (i, v) in n.iter().enumerate().filter(|(_, v)| **v > 0) {
            let id = if i % 2 == 0 {
                self.guard_requests[i / 2]
            } else {
                self.guard_errors[i / 2]
            };
            let _ = hostcalls::increment_metric(id, *v as i64);
        }
    }

    pub fn guard_latency(&self, v: Variant, ms: u64) {
        let i = usize::from(v == Variant::Canary);
        let _ = hostcalls::record_metric(self.guard_latency[i], ms);
    }

    pub fn guard_aborted(&self, t: Trigger) {
        let i = Trigger::ALL.iter().position(|x| *x == t).unwrap_or(0);
        inc(self.guard_aborts[i]);
    }

    /// An etcd request of the rollout control: `read`, `write` or `lease`.
    pub fn rollout_request(&self, kind: &str) {
        let i = ROLLOUT_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        inc(self.rollout_requests[i]);
    }

    /// `handoff_rollout_etcd_errors{reason}`: unreachable, server, lease, malformed, or a
    /// record that is not one.
    pub fn rollout_error(&self, reason: &str) {
        let i = ROLLOUT_ERRORS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        inc(self.rollout_errors[i]);
    }

    /// 1 while this Envoy judges the fleet.
    pub fn rollout_leader(&self, leader: bool) {
        let _ = hostcalls::record_metric(self.rollout_leader, u64::from(leader));
    }

    /// 0 active, 1 aborted, as the fleet's record says.
    pub fn rollout_state(&self, aborted: bool) {
        let _ = hostcalls::record_metric(self.rollout_state, u64::from(aborted));
    }

    pub fn rollout_fleet_window(&self) {
        inc(self.rollout_fleet_windows);
    }

    pub fn rollout_fleet_abort(&self) {
        inc(self.rollout_fleet_aborts);
    }
}
