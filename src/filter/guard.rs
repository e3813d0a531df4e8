//! Canary guard glue. Each worker counts its requests in a local tally (no shared-data access
//! per request); once per tick it publishes the tally in a shared-data slot of its own, reads
//! the guard's state (one record per experiment, keyed by the salt) and, once a window is over
//! and every live worker has published it, sums the slots and judges the window through the
//! state's compare-and-swap. The worker whose write aborts the canary logs it; every worker
//! applies the state at its next tick.

use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Action;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use super::host::{admin_allowed, response_header};
use super::shared::HostShared;
use super::{Http, Root};
use crate::canary::Variant;
use crate::config::Config;
use crate::drain::is_admin_path;
use crate::guard::{
    claim, describe, experiment_id, status_json, sum_window, Guard, GuardState, Slot, Tally,
    Trigger, Window, FORBIDDEN_ANCHOR, MAX_SLOTS,
};
use crate::problem::Reply;
use crate::shared::{update, SharedData, Step, Update};

const SLOT_PREFIX: &str = "handoff.guard.slot.";
const STATE_PREFIX: &str = "handoff.guard.state.";
const CAS_RETRIES: usize = 16;

pub(super) fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        // Not `as_micros`: its u128 would bring 128-bit division into the wasm.
        .map_or(0, |d| {
            d.as_secs() * 1_000_000 + u64::from(d.subsec_micros())
        })
}

fn slot_key(i: usize) -> String {
    format!("{SLOT_PREFIX}{i}")
}

/// The state key of an experiment: a new salt starts fresh, the same salt (a config update
/// that keeps it) finds its state again.
fn state_key(experiment: u64) -> String {
    format!("{STATE_PREFIX}{}", hex::encode(experiment.to_be_bytes()))
}

fn read_state(experiment: u64, now_window: u64) -> GuardState {
    HostShared
        .get(&state_key(experiment))
        .0
        .and_then(|b| GuardState::decode(&b))
        .unwrap_or_else(|| GuardState::start(now_window))
}

/// Applies `f` to the experiment's state; returns the state in effect and whether this call
/// wrote it (and so made the transition).
fn transition(
    experiment: u64,
    now_window: u64,
    f: &dyn Fn(&GuardState) -> Option<GuardState>,
) -> (GuardState, bool) {
    let out = update(&HostShared, &state_key(experiment), CAS_RETRIES, |v| {
        let cur = v
            .and_then(GuardState::decode)
            .unwrap_or_else(|| GuardState::start(now_window));
        match f(&cur) {
            Some(next) => Step::Write(next.encode(), next),
            None => Step::Keep(cur),
        }
    });
    match out {
        Update::Written(s) => (s, true),
        Update::Unchanged(s) => (s, false),
        Update::Failed(e) => {
            warn!("handoff: canary guard state not written: {e:?}");
            (read_state(experiment, now_window), false)
        }
    }
}

/// The live records of every worker (slots are contiguous from 0: a worker claims the first
/// free or stale one).
fn read_slots() -> Vec<Slot> {
    (0..MAX_SLOTS)
        .map_while(|i| HostShared.get(&slot_key(i)).0)
        .filter_map(|b| Slot::decode(&b))
        .collect()
}

/// A worker's counts, shared by its root and HTTP contexts.
pub struct Local {
    tally: RefCell<Tally>,
    aborted: Cell<bool>,
    /// Requests and errors per variant since the last tick, for the counters.
    unflushed: Cell<[u64; 4]>,
}

pub struct RootGuard {
    local: Rc<Local>,
    worker_id: u64,
    slot: Option<usize>,
    /// The experiment (salt) of the configuration in force.
    experiment: u64,
    /// The no-free-slot warning was logged.
    warned: bool,
    /// When the drain's own tick is next due (the guard may tick faster than the drain).
    pub drain_due_ms: u64,
}

impl RootGuard {
    pub fn new() -> RootGuard {
        let b = super::host::random_bytes();
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        let worker_id = u64::from_le_bytes(id).max(1);
        RootGuard {
            local: Rc::new(Local {
                tally: RefCell::new(Tally::default()),
                aborted: Cell::new(false),
                unflushed: Cell::new([0; 4]),
            }),
            worker_id,
            slot: None,
            experiment: 0,
            warned: false,
            drain_due_ms: 0,
        }
    }

    pub fn http(&self) -> HttpGuard {
        HttpGuard {
            local: self.local.clone(),
            start_us: None,
        }
    }
}

pub struct HttpGuard {
    local: Rc<Local>,
    /// When the request was counted in (its latency runs to the response headers).
    start_us: Option<u64>,
}

impl HttpGuard {
    /// The canary is aborted (as of this worker's last tick or admin request).
    pub fn aborted(&self) -> bool {
        self.local.aborted.get()
    }

    /// Counts this request in when it gets a response.
    pub fn start(&mut self) {
        self.start_us = Some(now_us());
    }
}

fn guard_of(config: &Config) -> Option<&Guard> {
    config.canary.as_ref()?.guard.as_ref()
}

/// After `on_configure` accepted a configuration (after the drain's).
pub fn configure(root: &mut Root) {
    let config = root.config.clone();
    let (Some(g), Some(c)) = (guard_of(&config), config.canary.as_ref()) else {
        return;
    };
    let experiment = experiment_id(&c.salt);
    root.guard.experiment = experiment;
    let now = now_us() / 1000;
    // A state kept from an earlier configuration with this salt stays in force; a new salt
    // starts judging with the next whole window.
    let out = update(
        &HostShared,
        &state_key(experiment),
        CAS_RETRIES,
        |v| match v {
            Some(b) => Step::Keep(GuardState::decode(b).unwrap_or_default()),
            None => {
                let s = GuardState::start(g.window_of(now));
                Step::Write(s.encode(), s)
            }
        },
    );
    let state = match out {
        Update::Written(s) | Update::Unchanged(s) => s,
        Update::Failed(_) => read_state(experiment, g.window_of(now)),
    };
    root.guard.local.aborted.set(state.aborted.is_some());
    root.metrics.guard_state(state.aborted.is_some());
}

/// The root tick period the guard needs, if configured.
pub fn tick_ms(config: &Config) -> Option<u64> {
    guard_of(config).map(|g| u64::from(g.tick_ms()))
}

/// Whether the drain's tick is due (the tick period is the guard's when it is shorter).
pub fn drain_due(root: &mut Root) -> bool {
    let (Some(d), Some(g)) = (root.config.drain.as_ref(), guard_of(&root.config)) else {
        return true;
    };
    let now = now_us() / 1000;
    if now < root.guard.drain_due_ms {
        return false;
    }
    let slack = u64::from(g.tick_ms().min(d.tick_ms())) / 2;
    root.guard.drain_due_ms = now + u64::from(d.tick_ms()) - slack;
    true
}

pub fn on_tick(root: &mut Root) {
    let config = root.config.clone();
    let Some(g) = guard_of(&config) else {
        return;
    };
    let experiment = root.guard.experiment;
    let now = now_us() / 1000;
    let window = g.window_of(now);
    let local = root.guard.local.clone();
    local.tally.borrow_mut().roll(window);
    publish(root, g, experiment, now);
    let mut state = read_state(experiment, window);
    if state.aborted.is_none() && state.judged + 1 < window {
        let judged = window - 1;
        if let Some(sum) = sum_window(&read_slots(), experiment, judged, now, g) {
            let before = state;
            let (s, wrote) = transition(experiment, window, &|s| {
                s.after_window(g, judged, &sum, now)
            });
            state = s;
            if wrote && before.aborted.is_none() {
                if let Some(a) = &state.aborted {
                    announce(root, g, a);
                }
            }
        }
    }
    local.aborted.set(state.aborted.is_some());
    root.metrics.guard_state(state.aborted.is_some());
    root.metrics.guard_counts(local.unflushed.replace([0; 4]));
}

/// The local guard's abort, when and why (its log line's description), for the fleet's
/// rollout record.
pub fn local_abort(config: &Config) -> Option<(u64, String)> {
    let (g, c) = (guard_of(config)?, config.canary.as_ref()?);
    let window = g.window_of(now_us() / 1000);
    let a = read_state(experiment_id(&c.salt), window).aborted?;
    Some((a.at_ms, describe(g, &a)))
}

/// Resumes the local guard: the fleet's record was resumed after the local abort.
pub fn resume_local(root: &Root) {
    let Some(g) = guard_of(&root.config) else {
        return;
    };
    let window = g.window_of(now_us() / 1000);
    let (s, wrote) = transition(root.guard.experiment, window, &|s| s.resume(window));
    if wrote {
        info!("handoff: canary guard resumed by the fleet's rollout record");
    }
    root.guard.local.aborted.set(s.aborted.is_some());
    root.metrics.guard_state(s.aborted.is_some());
}

/// This Envoy's counts of `window` (its workers' slots summed), once every live worker has
/// published them.
pub fn window_counts(root: &Root, window: u64, now_ms: u64) -> Option<Window> {
    let g = guard_of(&root.config)?;
    sum_window(&read_slots(), root.guard.experiment, window, now_ms, g)
}

fn announce(root: &Root, g: &Guard, a: &crate::guard::Aborted) {
    warn!("handoff: canary aborted: {}", describe(g, a));
    root.metrics.guard_aborted(a.trigger);
}

/// Writes this worker's tally into its slot, claiming one first when it has none (or lost
/// it to another worker that took it for stale).
fn publish(root: &mut Root, g: &Guard, experiment: u64, now: u64) {
    let me = root.guard.worker_id;
    let record = Slot {
        owner: me,
        heartbeat_ms: now,
        experiment,
        tally: root.guard.local.tally.borrow().clone(),
    }
    .encode();
    let write = |i: usize| {
        let out = update(&HostShared, &slot_key(i), CAS_RETRIES, |v| {
            match claim(v, me, now, g) {
                Some(_) => Step::Write(record.clone(), true),
                None => Step::Keep(false),
            }
        });
        matches!(out, Update::Written(true))
    };
    if let Some(i) = root.guard.slot {
        if write(i) {
            return;
        }
        root.guard.slot = None;
    }
    root.guard.slot = (0..MAX_SLOTS).find(|i| write(*i));
    // Said once per worker, not at every tick while it lasts.
    if root.guard.slot.is_none() && !std::mem::replace(&mut root.guard.warned, true) {
        warn!(
            "handoff: canary guard: all {MAX_SLOTS} shared-data slots are taken; this worker's \
             counts are not judged"
        );
    }
}

/// Counts a request at its response headers: an upstream 5xx, or Envoy's own 5xx for an
/// upstream that did not answer (reset, timeout, connect failure), is an error; answers
/// handoff gave itself are not counted.
pub fn on_response_headers(http: &mut Http) {
    let Some(start) = http.guard.start_us.take() else {
        return;
    };
    let (Some(variant), false) = (http.variant, http.replied) else {
        return;
    };
    let Some(g) = http.config.canary.as_ref().and_then(|c| c.guard.as_ref()) else {
        return;
    };
    let status = response_header(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    let error = status >= 500;
    let now = now_us();
    let latency = now.saturating_sub(start);
    let local = &http.guard.local;
    local
        .tally
        .borrow_mut()
        .record(g.window_of(now / 1000), variant, latency, error);
    let mut n = local.unflushed.get();
    let i = if variant == Variant::Canary { 2 } else { 0 };
    n[i] += 1;
    n[i + 1] += u64::from(error);
    local.unflushed.set(n);
    http.metrics.guard_latency(variant, latency / 1000);
}

/// The admin path, before the canary stage. `Some(action)` when this request was it.
pub fn on_request_headers(http: &mut Http) -> Option<Action> {
    let config = http.config.clone();
    let canary = config.canary.as_ref()?;
    let g = canary.guard.as_ref()?;
    let admin = g.admin.as_ref()?;
    if !is_admin_path(http.head.path().unwrap_or_default(), &admin.path) {
        return None;
    }
    if let Err(peer) = admin_allowed(admin.token_sha256.as_ref()) {
        warn!(
            "handoff[{}]: canary guard admin request refused from {peer}",
            http.context_id
        );
        http.send_reply(Reply::problem(
            403,
            FORBIDDEN_ANCHOR,
            "Canary guard admin refused",
            "The canary guard admin path is open to loopback peers and to the configured \
             bearer token only.",
        ));
        return Some(Action::Pause);
    }
    let experiment = experiment_id(&canary.salt);
    let now = now_us() / 1000;
    let window = g.window_of(now);
    let state = match http.head.method().unwrap_or_default() {
        "GET" | "HEAD" => read_state(experiment, window),
        "POST" => {
            let (s, wrote) = transition(experiment, window, &|s| s.abort_by_admin(now));
            if let (true, Some(a)) = (wrote, &s.aborted) {
                warn!("handoff: canary aborted: {}", describe(g, a));
                http.metrics.guard_aborted(Trigger::Admin);
            }
            s
        }
        "DELETE" => {
            let (s, wrote) = transition(experiment, window, &|s| s.resume(window));
            if wrote {
                info!("handoff: canary resumed by the admin path");
            }
            s
        }
        _ => {
            let r = Reply::problem(
                405,
                "canary-guard-admin",
                "Method not allowed",
                "Use GET (state and figures), POST (abort the canary) or DELETE (resume it).",
            )
            .with_header("allow", "GET, POST, DELETE");
            http.send_reply(r);
            return Some(Action::Pause);
        }
    };
    http.guard.local.aborted.set(state.aborted.is_some());
    http.metrics.guard_state(state.aborted.is_some());
    let mut current = Window::default();
    for s in read_slots()
        .iter()
        .filter(|s| s.experiment == experiment && s.live(now, g))
    {
        if let Some(w) = s.tally.of(window) {
            current.add(w);
        }
    }
    http.send_reply(Reply {
        status: 200,
        headers: vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("cache-control".to_string(), "no-store".to_string()),
        ],
        body: status_json(g, &state, window, &current).into_bytes(),
    });
    Some(Action::Pause)
}
