//! Idempotency glue: hold a covered request until its body is complete, ask the store
//! (synchronously for `local`, through the etcd lock flow's callouts for `etcd`), then forward
//! it with the lock held or answer it (replay, 409, 422, 400, 503); capture the upstream's own
//! response and store it when the stream ends, or release the lock on 5xx / reset. An etcd
//! completion or release that fails is queued (`crate::idempotency::outbox`) and retried from
//! the root context's tick.
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

use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::{Cell, RefCell};
use std::time::UNIX_EPOCH;

use super::host::{call_answer, etcd_call, random_bytes, HostRequest};
use super::metrics::Metrics;
use super::shared::HostShared;
use super::{Http, Root};
use crate::config::Config;
use crate::etcd::{Answer, Request};
use crate::idempotency::capture::Capture;
use crate::idempotency::etcd::{
    self as etcd_store, settle, EtcdLock, LeaseCache, LockFlow, Next, Settings, Settled, Write,
};
use crate::idempotency::local::{Begin, LocalLock, LocalStore};
use crate::idempotency::machine::{verdict, Decision, Verdict};
use crate::idempotency::outbox::{self, Answered, Entry, Gone, Limits, Outbox};
use crate::idempotency::record::StoredResponse;
use crate::idempotency::{
    fingerprint, problem, replay_reply, Idempotency, KeyCheck, Outcome, Store, WhenFull,
};
use crate::problem::Reply;

/// The retry tick when no other capability sets one (the drain's tick is used when it does).
const RETRY_TICK_MS: u64 = 100;
/// Extra time after `timeout_ms` before a queued write's unanswered callout is sent again.
const ANSWER_SLACK_MS: u64 = 1000;

std::thread_local! {
    /// This worker's current etcd lease.
    static LEASE: Cell<LeaseCache> = const { Cell::new(LeaseCache::EMPTY) };
    /// This worker's queued etcd writes. A thread local of the VM, not of a root context: it
    /// survives a configuration update (Envoy keeps the VM when only the plugin configuration
    /// changes), and the new root context retries what the old one queued.
    static OUTBOX: RefCell<Outbox> = const { RefCell::new(Outbox::EMPTY) };
}

/// Runs `f` on this worker's queue (one instantiation of the thread-local access).
fn with_outbox(f: &mut dyn FnMut(&mut Outbox)) {
    OUTBOX.with(|q| f(&mut q.borrow_mut()));
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
    /// The lock flow waits for etcd (the request is paused).
    Locking { token: u32, flow: LockFlow },
    /// A completion (the response is held) or a release waits for etcd.
    Writing { token: u32, write: PendingWrite },
    /// Forwarded (or answered); nothing pending.
    Done,
}

/// A completion or release that has left: enough to settle or queue it.
struct PendingWrite {
    write: Write,
    owner: u64,
    request: Request,
    deadline_ms: u64,
}

impl PendingWrite {
    fn entry(self, now: u64, tried: bool) -> Entry {
        if tried {
            Entry::failed_once(self.write, self.owner, self.request, self.deadline_ms, now)
        } else {
            Entry::unsent(self.write, self.owner, self.request, self.deadline_ms, now)
        }
    }
}

enum Lock {
    Local(LocalLock),
    Etcd(EtcdLock),
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The etcd store's settings and where to reach it.
struct EtcdStore<'a> {
    settings: Settings<'a>,
    cluster: &'a str,
    authority: &'a str,
    timeout_ms: u64,
}

fn etcd_store(idem: &Idempotency) -> Option<EtcdStore<'_>> {
    match &idem.store {
        Store::Etcd {
            cluster,
            authority,
            prefix,
            timeout_ms,
            on_error,
            ..
        } => Some(EtcdStore {
            settings: Settings {
                prefix,
                ttl_s: idem.ttl_s,
                lock_timeout_ms: idem.lock_timeout_s * 1000,
                on_error: *on_error,
            },
            cluster,
            authority,
            timeout_ms: *timeout_ms,
        }),
        Store::Local { .. } => None,
    }
}

/// Which store queued writes belong to: they are only retried against the same one.
fn store_tag(config: &Config) -> String {
    config
        .idempotency
        .as_ref()
        .and_then(|i| match &i.store {
            Store::Etcd {
                cluster,
                authority,
                prefix,
                ..
            } => Some(format!("{cluster}|{authority}|{prefix}")),
            Store::Local { .. } => None,
        })
        .unwrap_or_default()
}

/// Sends one etcd request from `ctx` (its answer comes back to that context).
fn dispatch(ctx: &dyn Context, store: &EtcdStore, r: &Request) -> Option<u32> {
    match etcd_call(ctx, store.cluster, store.authority, store.timeout_ms, r) {
        Ok(token) => Some(token),
        Err(e) => {
            warn!(
                "handoff: idempotency: cannot call etcd cluster {:?}: {e:?}",
                store.cluster
            );
            None
        }
    }
}

/// After a configuration is accepted: creates the local store's creation guard (once per
/// table), and keeps or drops the queued etcd writes.
pub fn on_configure(config: &Config, metrics: &Metrics) {
    if let Some(Idempotency {
        store: Store::Local { max_entries, .. },
        ..
    }) = &config.idempotency
    {
        let store = LocalStore {
            max_entries: *max_entries,
        };
        if store.prepare(&HostShared) {
            info!("handoff: idempotency local store: {max_entries} slots, created on first use");
        }
    }
    let tag = store_tag(config);
    let limits = Limits::for_store(
        config
            .idempotency
            .as_ref()
            .map_or(0, |i| i.max_response_bytes()),
    );
    let mut dropped = Vec::new();
    with_outbox(&mut |q| dropped = q.configure(limits, &tag));
    for e in &dropped {
        report(metrics, "dropped", e, &"the etcd store changed");
    }
}

/// The root tick period the etcd retry queue needs, if the etcd store is configured.
pub fn tick_ms(config: &Config) -> Option<u64> {
    (!store_tag(config).is_empty()).then_some(RETRY_TICK_MS)
}

/// The root context's tick: retry what is due.
pub fn on_tick(root: &Root) {
    let config = root.config.clone();
    if let Some(store) = config.idempotency.as_ref().and_then(etcd_store) {
        flush(root, &store, &root.metrics);
    }
}

/// Sends the queued writes that are due (from the root context, which gets the answers),
/// after giving up on those past their deadline.
fn flush(root: &Root, store: &EtcdStore, metrics: &Metrics) {
    let now = now_ms();
    with_outbox(&mut |q| {
        for e in q.expire(now, store.timeout_ms + ANSWER_SLACK_MS) {
            report(
                metrics,
                "expired",
                &e,
                &"given up shortly before its lock expires (the key stays locked until \
                  lock_timeout_s, then a retry executes again)",
            );
        }
        for (i, request) in q.due(now) {
            let token = dispatch(root, store, &request);
            q.sent(i, token, now);
        }
        metrics.idempotency_retry_pending(q.len());
    });
}

/// Queues a write etcd did not take; counts and logs a drop when the queue is full.
fn enqueue(metrics: &Metrics, e: Entry) {
    let failed = e.tries > 0;
    let mut e = Some(e);
    let mut refused = None;
    with_outbox(&mut |q| {
        if let Some(e) = e.take() {
            refused = q.push(e).err();
            metrics.idempotency_retry_pending(q.len());
        }
    });
    match refused {
        Some(e) => report(
            metrics,
            "dropped",
            &e,
            &"retry queue full (the key stays locked until lock_timeout_s)",
        ),
        None if failed => metrics.idempotency_retry("retried"),
        None => {}
    }
}

/// Counts `outcome` for a queued write and logs it (`stored` at info, the rest at warn).
fn report(metrics: &Metrics, outcome: &'static str, e: &Entry, detail: &dyn std::fmt::Display) {
    metrics.idempotency_retry(outcome);
    let level = if outcome == "stored" {
        log::Level::Info
    } else {
        log::Level::Warn
    };
    log::log!(
        level,
        "handoff: idempotency: {} of lock owner {:x} after {} attempts: {outcome}: {detail}",
        e.write.as_str(),
        e.owner,
        e.tries
    );
}

/// A callout answer that may be one of the queue's.
fn queued_answer(root: &Root, metrics: &Metrics, token: u32, num_headers: usize, body_size: usize) {
    let mut ours = false;
    with_outbox(&mut |q| ours = q.carries(token));
    if !ours {
        return;
    }
    let (status, body) = call_answer(root, num_headers, body_size);
    let answer = Answer {
        status,
        body: &body,
    };
    let now = now_ms();
    let mut gone = None;
    with_outbox(&mut |q| {
        gone = q.answered(token, &answer, now);
        metrics.idempotency_retry_pending(q.len());
    });
    match gone {
        Some(Answered::Retrying {
            error,
            first: true,
            unsent,
        }) => {
            if unsent {
                metrics.idempotency_retry("retried");
            }
            warn!(
                "handoff: idempotency: etcd did not take a queued completion/release ({error}); \
                 retrying with backoff until timeout_ms + lock_timeout_s/4 before its lock \
                 expires"
            );
        }
        Some(Answered::Gone(Gone::Settled(e, settled))) => match settled {
            // A write queued only to be confirmed (its request ended before etcd's answer).
            Settled::Done if e.tries == 0 => {}
            Settled::Done => report(metrics, "stored", &e, &"etcd took it"),
            Settled::Lost => report(metrics, "lost", &e, &"the lock was taken over; not stored"),
            Settled::Failed(err) | Settled::Retry(err) => report(metrics, "failed", &e, &err),
        },
        _ => {}
    }
}

/// An answer to a callout the root context sent (queued writes).
pub fn on_root_call_response(root: &Root, token: u32, num_headers: usize, body_size: usize) {
    queued_answer(root, &root.metrics, token, num_headers, body_size);
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
    let read = super::host::request_bytes;
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
    if !holds_request_body(http) {
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
    if !holds_request_body(http) {
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
    let Some(p) = http.idempotency.as_mut() else {
        return Action::Continue;
    };
    p.fingerprint = fp;
    p.phase = Phase::Done;
    let step = match &idem.store {
        Store::Local {
            max_entries,
            when_full,
            ..
        } => local_begin(http, idem, *max_entries, *when_full),
        Store::Etcd { .. } => {
            let (key, owner) = (p.store_key, p.owner);
            let Some(store) = etcd_store(idem) else {
                return Action::Continue;
            };
            let (flow, next) =
                LockFlow::start(&store.settings, key, fp, owner, now_ms(), &LEASE.get());
            etcd_next(http, &store, flow, next)
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
    let Some(p) = http.idempotency.as_mut() else {
        return Step::Forward;
    };
    let begin = store.begin(
        &HostShared,
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
                store.response(&HostShared, slot, &meta)
            } else {
                None
            };
            answer(http, verdict(decision, stored))
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
        Begin::Contended => answer(http, verdict(Decision::InFlight, None)),
    }
}

/// The reply for a request that is not forwarded, counted.
fn answer(http: &mut Http, v: Verdict) -> Step {
    http.metrics.idempotency_outcome(v.outcome());
    Step::Reply(match v {
        Verdict::Replay(r) => replay(http, &r),
        Verdict::Problem(o) => problem(o),
    })
}

/// A stored response as the reply to a duplicate. Translation of the replay for the client
/// that asks goes here.
pub fn replay(http: &Http, stored: &StoredResponse) -> Reply {
    super::translate::for_client(http, replay_reply(stored))
}

// ---------------------------------------------------------------------------------------------
// etcd

/// Performs one step of the lock flow.
fn etcd_next(http: &mut Http, store: &EtcdStore, mut flow: LockFlow, next: Next) -> Step {
    match next {
        Next::Send(request) => match dispatch(&*http, store, &request) {
            Some(token) => {
                if let Some(p) = http.idempotency.as_mut() {
                    p.phase = Phase::Locking { token, flow };
                }
                Step::Wait
            }
            None => {
                let mut leases = LEASE.get();
                let next = flow.unsent(&store.settings, &mut leases);
                LEASE.set(leases);
                etcd_next(http, store, flow, next)
            }
        },
        Next::Locked(lock) => {
            if let Some(p) = http.idempotency.as_mut() {
                p.lock = Some(Lock::Etcd(lock));
            }
            http.metrics.idempotency_outcome(Outcome::First);
            Step::Forward
        }
        Next::Reply(v) => {
            log_failure(http, &flow);
            undo(http, store, &mut flow);
            answer(http, v)
        }
        Next::Unprotected => {
            log_failure(http, &flow);
            undo(http, store, &mut flow);
            http.metrics.idempotency_outcome(Outcome::StoreError);
            Step::Forward
        }
    }
}

/// A lock transaction that failed may have been applied: its release is queued (sent from
/// the root context's tick, retried like a completion), so the key is not locked until
/// `lock_timeout_s`.
fn undo(http: &Http, store: &EtcdStore, flow: &mut LockFlow) {
    if let Some((request, meta)) = flow.take_undo() {
        let w = PendingWrite {
            write: Write::Release,
            owner: meta.owner,
            request,
            deadline_ms: outbox::deadline_ms(&meta, store.timeout_ms),
        };
        enqueue(&http.metrics, w.entry(now_ms(), false));
    }
}

fn log_failure(http: &Http, flow: &LockFlow) {
    if let Some(e) = &flow.failure {
        warn!(
            "handoff[{}]: idempotency: etcd did not answer the lock: {e}",
            http.context_id
        );
    }
}

/// An etcd answer arrived.
pub fn on_http_call_response(http: &mut Http, token: u32, num_headers: usize, body_size: usize) {
    let ours = matches!(
        http.idempotency.as_ref().map(|p| &p.phase),
        Some(Phase::Locking { token: t, .. } | Phase::Writing { token: t, .. }) if *t == token
    );
    if !ours {
        return;
    }
    let config = http.config.clone();
    let Some(store) = config.idempotency.as_ref().and_then(etcd_store) else {
        return;
    };
    let (status, body) = call_answer(&*http, num_headers, body_size);
    let answer = Answer {
        status,
        body: &body,
    };
    let phase = http
        .idempotency
        .as_mut()
        .map(|p| std::mem::replace(&mut p.phase, Phase::Done));
    match phase {
        Some(Phase::Locking { mut flow, .. }) => {
            let mut leases = LEASE.get();
            let next = flow.on_answer(&store.settings, &answer, now_ms(), &mut leases);
            LEASE.set(leases);
            let step = etcd_next(http, &store, flow, next);
            apply_async(http, step);
        }
        Some(Phase::Writing { write, .. }) => {
            let resume = write.write == Write::Complete;
            written(http, write, &answer);
            if resume {
                http.resume_http_response();
            }
        }
        _ => {}
    }
}

/// The answer to a completion or release this request sent.
fn written(http: &mut Http, w: PendingWrite, answer: &Answer) {
    match settle(w.write, w.owner, answer) {
        Settled::Done => {}
        Settled::Lost => warn!(
            "handoff[{}]: idempotency: lock lost before completion (taken over after \
             lock_timeout_s); response not stored",
            http.context_id
        ),
        Settled::Retry(e) => {
            warn!(
                "handoff[{}]: idempotency: etcd did not take the {} ({e}); queued for retry",
                http.context_id,
                w.write.as_str()
            );
            enqueue(&http.metrics, w.entry(now_ms(), true));
        }
        Settled::Failed(e) => warn!(
            "handoff[{}]: idempotency: etcd refused the {}: {e}; not stored",
            http.context_id,
            w.write.as_str()
        ),
    }
}

/// Sends a completion or release from this request; `false` when it could not be sent (it is
/// queued instead).
fn send_write(
    http: &mut Http,
    store: &EtcdStore,
    lock: &EtcdLock,
    write: Write,
    request: Request,
) -> bool {
    let w = PendingWrite {
        write,
        owner: lock.meta.owner,
        request,
        deadline_ms: outbox::deadline_ms(&lock.meta, store.timeout_ms),
    };
    match dispatch(&*http, store, &w.request) {
        Some(token) => {
            if let Some(p) = http.idempotency.as_mut() {
                p.phase = Phase::Writing { token, write: w };
            }
            true
        }
        None => {
            enqueue(&http.metrics, w.entry(now_ms(), true));
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response side: capture, complete, release

/// Captures the upstream's status and headers. Run before any response rewriting.
pub fn on_response_headers(http: &mut Http, end_of_stream: bool) -> Action {
    let Some((store_5xx, max)) = http
        .config
        .idempotency
        .as_ref()
        .map(|i| (i.store_5xx, i.max_response_bytes()))
    else {
        return Action::Continue;
    };
    if !matches!(
        http.idempotency.as_ref(),
        Some(Pending { lock: Some(_), .. })
    ) {
        return Action::Continue;
    }
    // One host call: the pairs carry `:status` too.
    let headers = http.get_http_response_headers_bytes();
    let status = headers
        .iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, s)| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
        .unwrap_or(0);
    let Some(capture) = Capture::start(status, headers, max, store_5xx) else {
        debug!(
            "handoff[{}]: idempotency: upstream answered {status}, lock released",
            http.context_id
        );
        release(http, false);
        return Action::Continue;
    };
    if let Some(p) = http.idempotency.as_mut() {
        p.capture = Some(capture);
    }
    if end_of_stream {
        return complete(http);
    }
    Action::Continue
}

/// Captures the upstream's body chunk by chunk (never more than `max_response_bytes`), and
/// stores the record at the end of the stream. Run before any response rewriting.
pub fn on_response_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Action {
    let Some(unread) = http
        .idempotency
        .as_ref()
        .and_then(|p| p.capture.as_ref())
        .map(|c| c.unread(body_size))
    else {
        return Action::Continue;
    };
    let chunk = unread.and_then(|(from, len)| http.get_http_response_body(from, len));
    let Some(c) = http.idempotency.as_mut().and_then(|p| p.capture.as_mut()) else {
        return Action::Continue;
    };
    if let Some(chunk) = chunk {
        c.append(&chunk);
    }
    if end_of_stream {
        return complete(http);
    }
    if c.holds(body_size) {
        Action::Pause
    } else {
        Action::Continue
    }
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
/// retry sent right after the response is replayed; when etcd fails the response goes on and
/// the completion is queued.
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
    let response = capture.finish();
    let ttl_ms = idem.ttl_s * 1000;
    match (lock, &idem.store) {
        (Lock::Local(lock), Store::Local { max_entries, .. }) => {
            let store = LocalStore {
                max_entries: *max_entries,
            };
            if !store.complete(&HostShared, &lock, response.as_ref(), now_ms(), ttl_ms) {
                warn!(
                    "handoff[{}]: idempotency: lock lost before completion (older than \
                     lock_timeout_s); response not stored",
                    http.context_id
                );
            }
            Action::Continue
        }
        (Lock::Etcd(lock), _) => {
            let Some(store) = etcd_store(idem) else {
                return Action::Continue;
            };
            let request = etcd_store::complete(&lock, response.as_ref(), now_ms(), ttl_ms);
            if send_write(http, &store, &lock, Write::Complete, request) {
                Action::Pause
            } else {
                Action::Continue
            }
        }
        _ => Action::Continue,
    }
}

/// Gives the key back (5xx, reset, timeout): a retry executes again. `ending`: the stream is
/// over, so the release is queued for the root context to send.
fn release(http: &mut Http, ending: bool) {
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
    match (lock, &idem.store) {
        (Lock::Local(lock), Store::Local { max_entries, .. }) => {
            let store = LocalStore {
                max_entries: *max_entries,
            };
            if store.release(&HostShared, &lock) {
                http.metrics.idempotency_slots_used(-1);
            }
        }
        (Lock::Etcd(lock), _) => {
            let Some(store) = etcd_store(idem) else {
                return;
            };
            let request = etcd_store::release(&lock);
            if ending {
                let w = PendingWrite {
                    write: Write::Release,
                    owner: lock.meta.owner,
                    request,
                    deadline_ms: outbox::deadline_ms(&lock.meta, store.timeout_ms),
                };
                // Sent by the root context at its next tick: an answer to a callout made here
                // would be lost with this context.
                enqueue(&http.metrics, w.entry(now_ms(), false));
            } else {
                send_write(http, &store, &lock, Write::Release, request);
            }
        }
        _ => {}
    }
}

/// The stream is over. A lock still held means the upstream never completed a response
/// (reset, timeout, client gone): release it. A write still waiting for etcd will not get its
/// answer here: it is queued, so the root context confirms it; a lock transaction still out is
/// undone the same way.
pub fn on_end(http: &mut Http) {
    let timeout_ms = http
        .config
        .idempotency
        .as_ref()
        .and_then(etcd_store)
        .map_or(0, |s| s.timeout_ms);
    let waiting = http.idempotency.as_mut().and_then(|p| {
        match std::mem::replace(&mut p.phase, Phase::Done) {
            Phase::Writing { write, .. } => Some(write),
            // The client left while the lock transaction was out: release what it may have
            // written, or the key would stay locked until lock_timeout_s.
            Phase::Locking { flow, .. } => flow.abandon().map(|(request, meta)| PendingWrite {
                write: Write::Release,
                owner: meta.owner,
                request,
                deadline_ms: outbox::deadline_ms(&meta, timeout_ms),
            }),
            other => {
                p.phase = other;
                None
            }
        }
    });
    if let Some(w) = waiting {
        enqueue(&http.metrics, w.entry(now_ms(), false));
    }
    if matches!(
        http.idempotency.as_ref(),
        Some(Pending { lock: Some(_), .. })
    ) {
        debug!(
            "handoff[{}]: idempotency: stream ended without a complete response, lock released",
            http.context_id
        );
        release(http, true);
    }
}
