//! Idempotency glue: hold a covered request until its body is complete, ask the store
//! (synchronously for `local`, through etcd callouts for `etcd`), then forward it with the lock
//! held or answer it (replay, 409, 422, 400, 503); capture the upstream's own response and
//! store it when the stream ends, or release the lock on 5xx / reset.
//!
//! Integration points for other capabilities (translation):
//! - [`forwarded_request_body`] / [`forwarded_request_path`]: the fingerprint is taken on the
//!   request as it goes upstream. Run request rewriting BEFORE [`on_request_body`].
//! - [`on_response_headers`] / [`on_response_body`] capture the upstream's response: run them
//!   BEFORE any response rewriting, so the stored record is the backend's own response.
//!   [`on_response_body`] appends the `body_size` bytes it is shown to the capture, so it must
//!   see each byte once: call it on every chunk when nothing buffers the response (the body
//!   callbacks return `Continue`), or only at end of stream, with the whole buffered body, when
//!   a rewrite buffers it (returns `Pause` until the end).
//! - [`replay`]: every replay goes through it; translate the stored response for the client
//!   there.

use log::{debug, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::time::{Duration, UNIX_EPOCH};

use super::host::{random_bytes, HostRequest};
use super::Http;
use crate::config::Config;
use crate::idempotency::etcd::{self, TxnResult};
use crate::idempotency::local::{Begin, LocalLock, LocalStore, Slots};
use crate::idempotency::machine::{completed_record, decide, lock_record, stores_status, Decision};
use crate::idempotency::record::{decode_full, encode_full, Meta, StoredResponse};
use crate::idempotency::{
    fingerprint, problem, replay_reply, stored_header, Idempotency, KeyCheck, OnError, Outcome,
    Store, WhenFull,
};
use crate::problem::Reply;

/// Takeover / lock transactions retried after a lost race before answering 409.
const ETCD_ATTEMPTS: u8 = 3;

/// Largest response body held until its record is stored: Envoy's default per-connection
/// buffer limit (a held body beyond the connection's limit would reset the stream).
const HOLD_LIMIT: usize = 1024 * 1024;

/// How long a worker reuses one etcd lease for the records it writes. Leases are not granted
/// per request (etcd keeps every lease in memory until it expires): a worker holds at most
/// `ttl_s / LEASE_REUSE_S + 1` leases, and a record lives between `ttl_s` and
/// `ttl_s + LEASE_REUSE_S` seconds.
const LEASE_REUSE_S: u64 = 60;

std::thread_local! {
    /// This worker's current lease: (id, granted at ms).
    static LEASE: std::cell::Cell<Option<(i64, u64)>> = const { std::cell::Cell::new(None) };
}

/// The cached lease if it is still fresh enough to carry a record for `ttl_s`.
fn cached_lease(now: u64) -> Option<i64> {
    LEASE
        .get()
        .filter(|(_, at)| now.saturating_sub(*at) < LEASE_REUSE_S * 1000)
        .map(|(id, _)| id)
}

/// Per-request state.
pub struct Pending {
    store_key: [u8; 32],
    /// `:method` and `:path` as forwarded (read in the headers callback: Envoy no longer
    /// exposes request headers once they have continued).
    method: String,
    path: String,
    owner: u64,
    fingerprint: [u8; 32],
    phase: Phase,
    lock: Option<Lock>,
    capture: Option<Capture>,
}

enum Phase {
    /// Buffering the request body.
    Body,
    /// Waiting for etcd (the request or the response is paused).
    Etcd { token: u32, step: EtcdStep },
    /// Forwarded (or answered); nothing pending.
    Done,
}

#[derive(Clone, Copy)]
enum EtcdStep {
    Lease,
    Lock { lease: i64, attempt: u8 },
    Complete,
    Release,
}

enum Lock {
    Local(LocalLock),
    Etcd {
        key: String,
        revision: i64,
        lease: i64,
        meta: Meta,
    },
}

struct Capture {
    response: StoredResponse,
    oversized: bool,
    /// The response has a `content-length` (within `max_response_bytes`): its body is held
    /// until the record is stored. A client that counts bytes is done when the last byte
    /// arrives, before the end of the stream: releasing the body early would let its retry
    /// arrive while the key is still locked (a 409 instead of the replay).
    hold: bool,
    /// Bytes at the start of Envoy's response buffer that are already captured (the buffer
    /// grows while the body is held).
    held: usize,
}

/// Shared data over the host: one meta entry and one response entry per slot. The table size
/// is part of the names, so a resized table never reads the old one's records.
pub struct HostSlots {
    prefix: String,
}

impl HostSlots {
    pub fn new(max_entries: u32) -> HostSlots {
        HostSlots {
            prefix: format!("handoff.idem.{max_entries}."),
        }
    }
}

impl Slots for HostSlots {
    fn get_meta(&self, slot: u32) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(&format!("{}m{slot}", self.prefix)).unwrap_or((None, None))
    }
    fn set_meta(&self, slot: u32, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(&format!("{}m{slot}", self.prefix), Some(value), cas).is_ok()
    }
    fn get_response(&self, slot: u32) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&format!("{}r{slot}", self.prefix))
            .ok()
            .and_then(|(v, _)| v)
    }
    fn set_response(&self, slot: u32, value: &[u8]) {
        let _ = hostcalls::set_shared_data(&format!("{}r{slot}", self.prefix), Some(value), None);
    }
    fn get_guard(&self) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(&format!("{}guard", self.prefix)).unwrap_or((None, None))
    }
    fn set_guard(&self, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(&format!("{}guard", self.prefix), Some(value), cas).is_ok()
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates the local store's creation guard (once per table); slots are created on first use.
pub fn on_configure(config: &Config) {
    if let Some(Idempotency {
        store: Store::Local { max_entries, .. },
        ..
    }) = &config.idempotency
    {
        let store = LocalStore {
            max_entries: *max_entries,
        };
        if store.prepare(&HostSlots::new(*max_entries)) {
            log::info!(
                "handoff: idempotency local store: {max_entries} slots, created on first use"
            );
        }
    }
}

/// What to do with the paused request.
enum Step {
    Forward,
    Reply(Reply),
    Wait,
}

pub fn on_request_headers(http: &mut Http, end_of_stream: bool) -> Action {
    let config = http.config.clone();
    let Some(idem) = config.idempotency.as_ref() else {
        return Action::Continue;
    };
    // Bytes, read lossily: the SDK's string getter panics on a non-UTF-8 value.
    let method = http.head.method_lossy();
    let path = http.head.path_lossy();
    let read = |name: &str| http.get_http_request_header_bytes(name);
    match idem.check(&method, &path, &read, &HostRequest) {
        KeyCheck::NotCovered | KeyCheck::Optional => Action::Continue,
        KeyCheck::Reject(outcome, reply) => {
            http.metrics.idempotency_outcome(outcome);
            http.send_reply(reply);
            Action::Pause
        }
        KeyCheck::Key { store_key, key } => {
            debug!("handoff[{}]: idempotency key {key:?}", http.context_id);
            let owner = u64::from_be_bytes(random_bytes()[..8].try_into().unwrap_or([0; 8]));
            http.idempotency = Some(Pending {
                store_key,
                method,
                path,
                owner,
                fingerprint: [0; 32],
                phase: Phase::Body,
                lock: None,
                capture: None,
            });
            if end_of_stream {
                decide_now(http, idem, false)
            } else {
                // The decision needs the whole body. Envoy turns a paused request-headers
                // callback into "stop all iteration" (no body callbacks until resumed), so the
                // headers continue and the body is held in `on_request_body` instead; the
                // hold filter after handoff (see `HOLD_HEADER`) keeps the headers from the
                // upstream until the decision, so a duplicate never reaches it.
                Action::Continue
            }
        }
    }
}

/// True while the request body is buffered for the fingerprint.
pub fn holds_request_body(http: &Http) -> bool {
    matches!(
        http.idempotency.as_ref().map(|p| &p.phase),
        Some(Phase::Body)
    )
}

pub fn on_request_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Action {
    if !matches!(
        http.idempotency.as_ref().map(|p| &p.phase),
        Some(Phase::Body)
    ) {
        return Action::Continue;
    }
    if !end_of_stream {
        // Buffer until the whole body is there: the fingerprint needs it.
        return Action::Pause;
    }
    let config = http.config.clone();
    match config.idempotency.as_ref() {
        Some(idem) => decide_now(http, idem, body_size > 0),
        None => Action::Continue,
    }
}

/// Trailers end the request stream when present.
pub fn on_request_trailers(http: &mut Http) -> Action {
    if !matches!(
        http.idempotency.as_ref().map(|p| &p.phase),
        Some(Phase::Body)
    ) {
        return Action::Continue;
    }
    let config = http.config.clone();
    match config.idempotency.as_ref() {
        Some(idem) => decide_now(http, idem, true),
        None => Action::Continue,
    }
}

/// The request body exactly as it is forwarded upstream: the whole buffered body as it is
/// now, so a rewrite done earlier in this callback (translation) is what gets hashed, whatever
/// its new size.
pub fn forwarded_request_body(http: &Http) -> Vec<u8> {
    // Envoy clamps the length to the buffer; u32::MAX is "all of it" on wasm32.
    http.get_http_request_body(0, u32::MAX as usize)
        .unwrap_or_default()
}

/// The `:method` and `:path` as forwarded upstream (as they were when the request headers
/// left this filter: run request-path rewriting before [`on_request_headers`]).
pub fn forwarded_request_path(http: &Http) -> (String, String) {
    http.idempotency
        .as_ref()
        .map(|p| (p.method.clone(), p.path.clone()))
        .unwrap_or_default()
}

fn decide_now(http: &mut Http, idem: &Idempotency, has_body: bool) -> Action {
    let body = if has_body {
        forwarded_request_body(http)
    } else {
        Vec::new()
    };
    let (method, path) = forwarded_request_path(http);
    let fp = fingerprint(&method, &path, &body);
    drop(body);
    let step = {
        let Some(p) = http.idempotency.as_mut() else {
            return Action::Continue;
        };
        p.fingerprint = fp;
        p.phase = Phase::Done;
        match &idem.store {
            Store::Local {
                max_entries,
                when_full,
                ..
            } => local_begin(http, idem, *max_entries, *when_full),
            Store::Etcd { .. } => match cached_lease(now_ms()) {
                Some(lease) => etcd_lock(http, idem, lease, 0, None),
                None => etcd_send(http, idem, EtcdStep::Lease, Vec::new()),
            },
        }
    };
    match step {
        Step::Forward => Action::Continue,
        Step::Reply(r) => {
            http.send_reply(r);
            Action::Pause
        }
        Step::Wait => Action::Pause,
    }
}

/// Applies a step decided in a callout callback, when the request is paused.
fn apply_async(http: &mut Http, step: Step) {
    match step {
        Step::Forward => {
            http.resume_http_request();
        }
        Step::Reply(r) => http.send_reply(r),
        Step::Wait => {}
    }
}

fn local_begin(http: &mut Http, idem: &Idempotency, max_entries: u32, when_full: WhenFull) -> Step {
    let store = LocalStore { max_entries };
    let slots = HostSlots::new(max_entries);
    let Some(p) = http.idempotency.as_mut() else {
        return Step::Forward;
    };
    let begin = store.begin(
        &slots,
        p.store_key,
        p.fingerprint,
        p.owner,
        now_ms(),
        idem.lock_timeout_s * 1000,
    );
    match begin {
        Begin::Locked { lock, was_free } => {
            p.lock = Some(Lock::Local(lock));
            if was_free {
                http.metrics.idempotency_slots_used(1);
            }
            http.metrics.idempotency_outcome(Outcome::First);
            Step::Forward
        }
        Begin::Found {
            decision,
            slot,
            meta,
        } => {
            let stored = if decision == Decision::Replay {
                store.response(&slots, slot, &meta)
            } else {
                None
            };
            answer(http, decision, stored)
        }
        Begin::Full => {
            http.metrics.idempotency_outcome(Outcome::Evicted);
            warn!(
                "handoff[{}]: idempotency local store full ({max_entries} entries)",
                http.context_id
            );
            match when_full {
                WhenFull::AcceptUnprotected => Step::Forward,
                WhenFull::Reject => Step::Reply(problem(Outcome::Evicted)),
            }
        }
        Begin::Contended => answer(http, Decision::InFlight, None),
    }
}

/// The reply for a request that is not forwarded because of the record found.
fn answer(http: &mut Http, decision: Decision, stored: Option<StoredResponse>) -> Step {
    let outcome = match decision {
        Decision::Replay => match stored {
            Some(r) => {
                http.metrics.idempotency_outcome(Outcome::Replayed);
                return Step::Reply(replay(http, &r));
            }
            // The response entry was overwritten (the slot was reused in between): the store
            // cannot answer for this key.
            None => Outcome::StoreError,
        },
        Decision::InFlight => Outcome::InFlightConflict,
        Decision::Mismatch => Outcome::Mismatch,
        Decision::NotReplayable => Outcome::NotReplayable,
        // Acquire / TakeOver are handled by the callers.
        Decision::Acquire | Decision::TakeOver => Outcome::InFlightConflict,
    };
    http.metrics.idempotency_outcome(outcome);
    Step::Reply(problem(outcome))
}

/// A stored response as the reply to a duplicate. Translation of the replay for the client
/// that asks goes here.
pub fn replay(http: &Http, stored: &StoredResponse) -> Reply {
    super::translate::for_client(http, replay_reply(stored))
}

// ---------------------------------------------------------------------------------------------
// etcd

fn etcd_config(idem: &Idempotency) -> Option<(&str, &str, &str, u64, OnError)> {
    match &idem.store {
        Store::Etcd {
            cluster,
            authority,
            prefix,
            timeout_ms,
            on_error,
            ..
        } => Some((cluster, authority, prefix, *timeout_ms, *on_error)),
        Store::Local { .. } => None,
    }
}

/// Sends one etcd request for `step` (the lease grant builds its own body) and records the
/// callout; on a dispatch failure answers as a store error.
fn etcd_send(http: &mut Http, idem: &Idempotency, step: EtcdStep, body: Vec<u8>) -> Step {
    let Some((cluster, authority, _, timeout_ms, _)) = etcd_config(idem) else {
        return Step::Forward;
    };
    let (path, body) = match step {
        EtcdStep::Lease => (
            etcd::LEASE_GRANT,
            etcd::lease_grant(idem.ttl_s + LEASE_REUSE_S),
        ),
        _ => (etcd::TXN, body),
    };
    let token = http.dispatch_http_call(
        cluster,
        vec![
            (":method", "POST"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/json"),
        ],
        Some(&body),
        vec![],
        Duration::from_millis(timeout_ms),
    );
    match token {
        Ok(token) => {
            if let Some(p) = http.idempotency.as_mut() {
                p.phase = Phase::Etcd { token, step };
            }
            Step::Wait
        }
        Err(e) => {
            warn!(
                "handoff[{}]: idempotency: cannot call etcd cluster {cluster:?}: {e:?}",
                http.context_id
            );
            match step {
                EtcdStep::Lease | EtcdStep::Lock { .. } => store_error(http, idem),
                EtcdStep::Complete | EtcdStep::Release => Step::Forward,
            }
        }
    }
}

fn store_error(http: &mut Http, idem: &Idempotency) -> Step {
    // The lease may be the problem (etcd lost it): grant a new one next time.
    LEASE.set(None);
    http.metrics.idempotency_outcome(Outcome::StoreError);
    if let Some(p) = http.idempotency.as_mut() {
        p.lock = None;
        p.phase = Phase::Done;
    }
    match etcd_config(idem).map(|c| c.4) {
        Some(OnError::Allow) => Step::Forward,
        _ => Step::Reply(problem(Outcome::StoreError)),
    }
}

/// An etcd answer arrived.
pub fn on_http_call_response(http: &mut Http, token: u32, num_headers: usize, body_size: usize) {
    let step = match http.idempotency.as_ref().map(|p| &p.phase) {
        Some(Phase::Etcd { token: t, step }) if *t == token => *step,
        _ => return,
    };
    if let Some(p) = http.idempotency.as_mut() {
        p.phase = Phase::Done;
    }
    let config = http.config.clone();
    let Some(idem) = config.idempotency.as_ref() else {
        return;
    };
    // No headers: the callout failed or timed out.
    let ok =
        num_headers > 0 && http.get_http_call_response_header(":status").as_deref() == Some("200");
    let body = if ok {
        http.get_http_call_response_body(0, body_size)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if !ok {
        warn!(
            "handoff[{}]: idempotency: etcd did not answer ({} headers, status {:?})",
            http.context_id,
            num_headers,
            http.get_http_call_response_header(":status")
        );
    }
    match step {
        EtcdStep::Lease => {
            let step = match etcd::parse_lease(&body) {
                Some(lease) => {
                    LEASE.set(Some((lease, now_ms())));
                    etcd_lock(http, idem, lease, 0, None)
                }
                None => store_error(http, idem),
            };
            apply_async(http, step);
        }
        EtcdStep::Lock { lease, attempt } => {
            let step = match etcd::parse_txn(&body) {
                Some(result) => etcd_locked(http, idem, lease, attempt, result),
                None => store_error(http, idem),
            };
            apply_async(http, step);
        }
        EtcdStep::Complete => {
            if let Some(p) = http.idempotency.as_mut() {
                p.lock = None;
            }
            if !matches!(etcd::parse_txn(&body), Some(TxnResult::Written { .. })) {
                warn!(
                    "handoff[{}]: idempotency: the completed record was not stored in etcd",
                    http.context_id
                );
            }
            http.resume_http_response();
        }
        EtcdStep::Release => {}
    }
}

/// Takes the lock: create the key (`over = None`) or take over the record at `over` revision.
fn etcd_lock(
    http: &mut Http,
    idem: &Idempotency,
    lease: i64,
    attempt: u8,
    over: Option<i64>,
) -> Step {
    let Some((_, _, prefix, _, _)) = etcd_config(idem) else {
        return Step::Forward;
    };
    let Some(p) = http.idempotency.as_ref() else {
        return Step::Forward;
    };
    let key = etcd::etcd_key(prefix, &p.store_key);
    let meta = lock_record(
        p.store_key,
        p.fingerprint,
        p.owner,
        now_ms(),
        idem.lock_timeout_s * 1000,
    );
    let value = encode_full(&meta, None);
    let body = match over {
        None => etcd::lock_txn(&key, &value, lease),
        Some(rev) => etcd::put_if_revision(&key, rev, &value, lease),
    };
    etcd_send(http, idem, EtcdStep::Lock { lease, attempt }, body)
}

fn etcd_locked(
    http: &mut Http,
    idem: &Idempotency,
    lease: i64,
    attempt: u8,
    result: TxnResult,
) -> Step {
    let Some(prefix) = etcd_config(idem).map(|c| c.2.to_string()) else {
        return Step::Forward;
    };
    let Some(p) = http.idempotency.as_mut() else {
        return Step::Forward;
    };
    match result {
        TxnResult::Written { revision } => {
            let meta = lock_record(
                p.store_key,
                p.fingerprint,
                p.owner,
                now_ms(),
                idem.lock_timeout_s * 1000,
            );
            p.lock = Some(Lock::Etcd {
                key: etcd::etcd_key(&prefix, &p.store_key),
                revision,
                lease,
                meta,
            });
            http.metrics.idempotency_outcome(Outcome::First);
            Step::Forward
        }
        TxnResult::Existing(existing) => {
            let record = existing
                .as_ref()
                .and_then(|(value, rev)| decode_full(value).map(|r| (r, *rev)));
            let fp = p.fingerprint;
            let decision = match &record {
                Some(((meta, _), _)) => decide(Some(meta), &fp, now_ms()),
                None => Decision::Acquire,
            };
            match decision {
                Decision::Acquire | Decision::TakeOver => {
                    if attempt + 1 >= ETCD_ATTEMPTS {
                        return answer(http, Decision::InFlight, None);
                    }
                    // Vanished (lease expired) or abandoned: try again, against the revision
                    // read so that only one taker wins.
                    let over = match (&record, existing) {
                        (Some((_, rev)), _) => Some(*rev),
                        (None, Some((_, rev))) => Some(rev),
                        (None, None) => None,
                    };
                    etcd_lock(http, idem, lease, attempt + 1, over)
                }
                decision => {
                    let stored = record.and_then(|((_, r), _)| r);
                    answer(http, decision, stored)
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response side: capture, complete, release

/// Captures the upstream's status and headers. Run before any response rewriting.
pub fn on_response_headers(http: &mut Http, end_of_stream: bool) -> Action {
    let Some(store_5xx) = http.config.idempotency.as_ref().map(|i| i.store_5xx) else {
        return Action::Continue;
    };
    if !matches!(
        http.idempotency.as_ref(),
        Some(Pending { lock: Some(_), .. })
    ) {
        return Action::Continue;
    }
    let status = http
        .get_http_response_header_bytes(":status")
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        .unwrap_or(0);
    if !stores_status(status, store_5xx) {
        debug!(
            "handoff[{}]: idempotency: upstream answered {status}, lock released",
            http.context_id
        );
        release(http);
        return Action::Continue;
    }
    let headers: Vec<(String, String)> = http
        .get_http_response_headers_bytes()
        .into_iter()
        .filter(|(n, _)| stored_header(n))
        .filter_map(|(n, v)| String::from_utf8(v).ok().map(|v| (n, v)))
        .collect();
    let max = http
        .config
        .idempotency
        .as_ref()
        .map_or(0, |i| i.max_response_bytes());
    let hold = http
        .get_http_response_header_bytes("content-length")
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok())
        .is_some_and(|len| len <= max.min(HOLD_LIMIT));
    if let Some(p) = http.idempotency.as_mut() {
        p.capture = Some(Capture {
            response: StoredResponse {
                status,
                headers,
                body: Vec::new(),
            },
            oversized: false,
            hold,
            held: 0,
        });
    }
    if end_of_stream {
        return complete(http);
    }
    Action::Continue
}

/// Captures the upstream's body chunk by chunk (never more than `max_response_bytes`), and
/// stores the record at the end of the stream. Run before any response rewriting.
pub fn on_response_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Action {
    let Some(max) = http
        .config
        .idempotency
        .as_ref()
        .map(|i| i.max_response_bytes())
    else {
        return Action::Continue;
    };
    let (capturing, held) = match http.idempotency.as_ref().and_then(|p| p.capture.as_ref()) {
        Some(c) => (!c.oversized, if c.hold { c.held } else { 0 }),
        None => (false, 0),
    };
    // While the body is held, Envoy shows the whole buffer each time: read only the new part.
    let fresh = body_size.saturating_sub(held);
    if capturing && fresh > 0 {
        let chunk = http.get_http_response_body(held, fresh).unwrap_or_default();
        if let Some(c) = http.idempotency.as_mut().and_then(|p| p.capture.as_mut()) {
            if c.response.encoded_len() + chunk.len() > max {
                c.oversized = true;
                c.hold = false;
                c.response.body = Vec::new();
            } else {
                c.response.body.extend_from_slice(&chunk);
            }
        }
    }
    let Some(c) = http.idempotency.as_mut().and_then(|p| p.capture.as_mut()) else {
        return Action::Continue;
    };
    if end_of_stream {
        return complete(http);
    }
    if c.hold {
        c.held = body_size;
        return Action::Pause;
    }
    Action::Continue
}

/// Trailers end a response that has them (they are not stored).
pub fn on_response_trailers(http: &mut Http) -> Action {
    if matches!(
        http.idempotency.as_ref(),
        Some(Pending {
            capture: Some(_),
            ..
        })
    ) {
        return complete(http);
    }
    Action::Continue
}

/// Stores the completed record. With etcd the response is held until etcd confirms, so that a
/// retry sent right after the response is replayed.
fn complete(http: &mut Http) -> Action {
    let config = http.config.clone();
    let Some(idem) = config.idempotency.as_ref() else {
        return Action::Continue;
    };
    let Some(p) = http.idempotency.as_mut() else {
        return Action::Continue;
    };
    let (Some(lock), Some(capture)) = (p.lock.take(), p.capture.take()) else {
        return Action::Continue;
    };
    let replayable = !capture.oversized;
    let response = replayable.then_some(&capture.response);
    let ttl_ms = idem.ttl_s * 1000;
    match lock {
        Lock::Local(lock) => {
            let max_entries = match idem.store {
                Store::Local { max_entries, .. } => max_entries,
                Store::Etcd { .. } => return Action::Continue,
            };
            let store = LocalStore { max_entries };
            if !store.complete(
                &HostSlots::new(max_entries),
                &lock,
                response,
                now_ms(),
                ttl_ms,
            ) {
                warn!(
                    "handoff[{}]: idempotency: lock lost before completion (older than \
                     lock_timeout_s); response not stored",
                    http.context_id
                );
            }
            Action::Continue
        }
        Lock::Etcd {
            key,
            revision,
            lease,
            meta,
        } => {
            let done = completed_record(&meta, replayable, now_ms(), ttl_ms);
            let value = encode_full(&done, response);
            let body = etcd::put_if_revision(&key, revision, &value, lease);
            match etcd_send(http, idem, EtcdStep::Complete, body) {
                Step::Wait => Action::Pause,
                _ => Action::Continue,
            }
        }
    }
}

/// Gives the key back (5xx, reset, timeout): a retry executes again.
fn release(http: &mut Http) {
    let config = http.config.clone();
    let Some(idem) = config.idempotency.as_ref() else {
        return;
    };
    let Some(lock) = http.idempotency.as_mut().and_then(|p| p.lock.take()) else {
        return;
    };
    if let Some(p) = http.idempotency.as_mut() {
        p.capture = None;
    }
    match lock {
        Lock::Local(lock) => {
            if let Store::Local { max_entries, .. } = idem.store {
                let store = LocalStore { max_entries };
                if store.release(&HostSlots::new(max_entries), &lock) {
                    http.metrics.idempotency_slots_used(-1);
                }
            }
        }
        Lock::Etcd { key, revision, .. } => {
            // Best effort: if Envoy cannot deliver it (the stream is being destroyed), the
            // lock is abandoned after lock_timeout_s and the next retry takes it over.
            let body = etcd::delete_if_revision(&key, revision);
            let _ = etcd_send(http, idem, EtcdStep::Release, body);
        }
    }
}

/// The stream is over. A lock still held means the upstream never completed a response
/// (reset, timeout, client gone): release it.
pub fn on_log(http: &mut Http) {
    if matches!(
        http.idempotency.as_ref(),
        Some(Pending { lock: Some(_), .. })
    ) {
        debug!(
            "handoff[{}]: idempotency: stream ended without a complete response, lock released",
            http.context_id
        );
        release(http);
    }
}
