//! Drain glue: the drain state lives in proxy-wasm shared data (one record for the whole Envoy
//! process, every worker), written with compare-and-swap. Each worker's root context ticks to
//! refresh its cached copy and polls readiness (one worker at a time, under a lease); HTTP
//! contexts read the cache, except the admin path, which reads and writes the record itself.
//! The worker whose CAS makes a transition is the one that tells Envoy's admin
//! (`/healthcheck/fail` / `/healthcheck/ok`), so each transition is sent exactly once.

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::{Action, BufferType, MapType, Status};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use super::host::{admin_allowed, header_present, random_bytes, request_header, response_header};
use super::metrics::Metrics;
use super::{Http, Root};
use crate::drain::{
    admin_action, hint_ms, is_admin_path, is_ready, reconnect_event, start_grace, status_json,
    AdminAction, CancelBy, Drain, DrainSource, DrainState, Phase, PollLease, ReadinessVerdict,
    SseScanner, WorkerInflight, DRAINED_ANCHOR, FORBIDDEN_ANCHOR, HINT_HEADER,
};
use crate::problem::Reply;

const STATE_KEY: &str = "handoff.drain.state";
/// The registry of workers publishing an in-flight record (`crate::drain::register_worker`).
const WORKERS_KEY: &str = "handoff.drain.workers";
/// Prefix of each worker's in-flight record (the worker id follows).
const INFLIGHT_PREFIX: &str = "handoff.drain.inflight.";
const LEASE_KEY: &str = "handoff.drain.poller";
const CAS_RETRIES: usize = 64;
const ENVOY_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_u32() -> u32 {
    let b = random_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn read_state() -> (DrainState, Option<u32>) {
    match hostcalls::get_shared_data(STATE_KEY) {
        Ok((Some(bytes), cas)) => (
            DrainState::decode(&bytes).unwrap_or(DrainState::serving(0)),
            cas,
        ),
        _ => (DrainState::serving(0), None),
    }
}

/// Applies `f` to the shared state with CAS. Returns the state now in effect and whether this
/// call made the transition.
fn transition(f: &dyn Fn(&DrainState) -> Option<DrainState>) -> (DrainState, bool) {
    let mut current = DrainState::serving(0);
    for _ in 0..CAS_RETRIES {
        let (cur, cas) = read_state();
        current = cur;
        let Some(next) = f(&cur) else {
            return (cur, false);
        };
        match hostcalls::set_shared_data(STATE_KEY, Some(&next.encode()), cas) {
            Ok(()) => return (next, true),
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                error!("handoff: drain state not written: {e:?}");
                break;
            }
        }
    }
    (current, false)
}

fn inflight_key(worker: u64) -> String {
    format!("{INFLIGHT_PREFIX}{worker}")
}

fn read_worker(worker: u64) -> Option<WorkerInflight> {
    match hostcalls::get_shared_data(&inflight_key(worker)) {
        Ok((Some(b), _)) => WorkerInflight::decode(&b),
        _ => None,
    }
}

fn read_workers() -> (Vec<u64>, Option<u32>) {
    match hostcalls::get_shared_data(WORKERS_KEY) {
        Ok((Some(b), cas)) => (crate::drain::decode_workers(&b), cas),
        Ok((None, cas)) => (Vec::new(), cas),
        Err(_) => (Vec::new(), None),
    }
}

/// Requests in flight in this Envoy: the sum of the live workers' records. Each worker writes
/// its record at every request start and end, so the sum is exact for live workers.
fn read_inflight(tick_ms: u32) -> u64 {
    let now = now_ms();
    read_workers()
        .0
        .into_iter()
        .filter_map(read_worker)
        .filter(|w| w.live(now, tick_ms))
        .map(|w| w.count)
        .sum()
}

/// Adds this worker to the registry (dropping workers whose record went stale).
fn register_worker(me: u64, tick_ms: u32) {
    let now = now_ms();
    let live = |id: u64| read_worker(id).is_some_and(|w| w.live(now, tick_ms));
    for _ in 0..CAS_RETRIES {
        let (ids, cas) = read_workers();
        let Some(next) = crate::drain::register_worker(&ids, me, &live) else {
            return;
        };
        match hostcalls::set_shared_data(
            WORKERS_KEY,
            Some(&crate::drain::encode_workers(&next)),
            cas,
        ) {
            Ok(()) => return,
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    warn!("handoff: drain worker registry not updated (contention)");
}

/// Creates a shared record unless a worker (or an earlier configuration) already did.
fn init_key(key: &str, value: &[u8]) {
    if let Ok((None, _)) = hostcalls::get_shared_data(key) {
        let _ = hostcalls::set_shared_data(key, Some(value), None);
    }
}

/// `POST /healthcheck/fail` (drain) or `/healthcheck/ok` (cancel) on Envoy's own admin, through
/// the configured cluster. The callback goes to the calling context.
fn call_envoy_admin(drain: &Drain, fail: bool) -> Option<u32> {
    let cluster = drain.envoy_admin_cluster.as_deref()?;
    let path = if fail {
        "/healthcheck/fail"
    } else {
        "/healthcheck/ok"
    };
    match hostcalls::dispatch_http_call(
        cluster,
        vec![
            (":method", "POST"),
            (":path", path),
            (":authority", "envoy-admin"),
        ],
        None,
        vec![],
        ENVOY_ADMIN_TIMEOUT,
    ) {
        Ok(token) => Some(token),
        Err(e) => {
            error!("handoff: cannot call Envoy admin {path} through cluster `{cluster}`: {e:?}");
            None
        }
    }
}

fn log_envoy_admin_answer() {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten();
    if status.as_deref() != Some("200") {
        error!(
            "handoff: Envoy admin healthcheck call answered {}",
            status
                .as_deref()
                .unwrap_or("nothing (timeout or no connection)")
        );
    }
}

fn announce(metrics: &Metrics, state: &DrainState, started: Option<DrainSource>) {
    let now = now_ms();
    metrics.drain_state(state.phase(now));
    match started {
        Some(source) => {
            metrics.drain_started(source);
            info!(
                "handoff: drain started by {} (grace {}s)",
                source.as_str(),
                state.grace_s
            );
        }
        None => info!("handoff: drain cancelled, serving"),
    }
}

/// The worker's cached copy of the shared state, shared by its root and HTTP contexts, and
/// its own in-flight count.
pub struct Cache {
    state: Cell<Option<DrainState>>,
    inflight: Cell<WorkerInflight>,
    /// This worker's in-flight record in shared data.
    inflight_key: String,
}

impl Cache {
    /// Publishes this worker's in-flight record (one write; only this worker writes it).
    fn publish(&self, w: WorkerInflight) {
        self.inflight.set(w);
        let _ = hostcalls::set_shared_data(&self.inflight_key, Some(&w.encode()), None);
    }

    fn add_inflight(&self, delta: i64) {
        let mut w = self.inflight.get();
        w.count = w.count.saturating_add_signed(delta);
        self.publish(w);
    }

    fn get(&self) -> DrainState {
        self.state.get().unwrap_or(DrainState::serving(0))
    }

    fn set(&self, s: DrainState) {
        self.state.set(Some(s));
    }
}

pub struct RootDrain {
    cache: Rc<Cache>,
    /// Identifies this worker in the poller lease (context ids repeat across workers).
    worker_id: u64,
    poll: Option<u32>,
    /// Envoy admin calls made from the root context, answered in `on_root_call_response`.
    admin_calls: Vec<u32>,
}

impl RootDrain {
    pub fn new() -> RootDrain {
        let b = random_bytes();
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        let worker_id = u64::from_le_bytes(id).max(1);
        RootDrain {
            cache: Rc::new(Cache {
                state: Cell::new(None),
                inflight: Cell::new(WorkerInflight::default()),
                inflight_key: inflight_key(worker_id),
            }),
            worker_id,
            poll: None,
            admin_calls: Vec::new(),
        }
    }

    pub fn http(&self) -> HttpDrain {
        HttpDrain {
            cache: self.cache.clone(),
            counted: false,
            callout: None,
            sse: None,
            admin_body: None,
        }
    }
}

/// After `on_configure` accepted a configuration.
pub fn configure(root: &mut Root) {
    // Without a drain section the tick is left alone (another capability may use it; on_tick
    // returns early for the drain).
    let Some(d) = root.config.drain.as_ref() else {
        return;
    };
    init_key(STATE_KEY, &DrainState::serving(now_ms()).encode());
    init_key(LEASE_KEY, &PollLease::default().encode());
    let (state, _) = read_state();
    root.drain.cache.set(state);
    let cache = &root.drain.cache;
    cache.publish(WorkerInflight {
        heartbeat_ms: now_ms(),
        ..cache.inflight.get()
    });
    register_worker(root.drain.worker_id, d.tick_ms());
    let _ = hostcalls::set_tick_period(Duration::from_millis(u64::from(d.tick_ms())));
}

pub fn on_tick(root: &mut Root) {
    let config = root.config.clone();
    let Some(d) = config.drain.as_ref() else {
        return;
    };
    let now = now_ms();
    let (state, _) = read_state();
    let cache = &root.drain.cache;
    cache.set(state);
    cache.publish(WorkerInflight {
        heartbeat_ms: now,
        ..cache.inflight.get()
    });
    root.metrics.drain_state(state.phase(now));
    // Published here, not per request: the gauge lags by at most one tick.
    root.metrics.drain_inflight(read_inflight(d.tick_ms()));
    let Some(r) = &d.readiness else {
        return;
    };
    if root.drain.poll.is_some() {
        return; // the previous poll is still out; its timeout bounds the wait
    }
    if !acquire_lease(root.drain.worker_id, now, 3 * u64::from(r.interval_ms)) {
        return;
    }
    match hostcalls::dispatch_http_call(
        &r.cluster,
        vec![
            (":method", "GET"),
            (":path", &r.path),
            (":authority", &r.authority),
        ],
        None,
        vec![],
        Duration::from_millis(u64::from(r.interval_ms)),
    ) {
        Ok(token) => root.drain.poll = Some(token),
        Err(e) => {
            warn!(
                "handoff: readiness poll through cluster `{}` not sent: {e:?}",
                r.cluster
            );
            readiness_result(root, d, false);
        }
    }
}

fn acquire_lease(me: u64, now: u64, ttl: u64) -> bool {
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = hostcalls::get_shared_data(LEASE_KEY).unwrap_or((None, None));
        let lease = bytes
            .and_then(|b| PollLease::decode(&b))
            .unwrap_or_default();
        let Some(next) = lease.acquire(me, now, ttl) else {
            return false;
        };
        match hostcalls::set_shared_data(LEASE_KEY, Some(&next.encode()), cas) {
            Ok(()) => return true,
            Err(Status::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

pub fn on_root_call_response(root: &mut Root, token: u32) {
    if root.drain.poll == Some(token) {
        root.drain.poll = None;
        let config = root.config.clone();
        let Some(d) = config.drain.as_ref() else {
            return;
        };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        readiness_result(root, d, is_ready(status.as_deref()));
    } else if let Some(i) = root.drain.admin_calls.iter().position(|t| *t == token) {
        root.drain.admin_calls.swap_remove(i);
        log_envoy_admin_answer();
    }
}

/// Records a readiness answer in the shared lease record and acts on the verdict.
fn readiness_result(root: &mut Root, d: &Drain, ready: bool) {
    let Some(r) = &d.readiness else {
        return;
    };
    let mut verdict = ReadinessVerdict::Nothing;
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = hostcalls::get_shared_data(LEASE_KEY).unwrap_or((None, None));
        let lease = bytes
            .and_then(|b| PollLease::decode(&b))
            .unwrap_or_default();
        if lease.owner != root.drain.worker_id {
            return; // another worker took over polling
        }
        let (next, v) = lease.record(ready, r.failure_threshold);
        match hostcalls::set_shared_data(LEASE_KEY, Some(&next.encode()), cas) {
            Ok(()) => {
                verdict = v;
                break;
            }
            Err(Status::CasMismatch) => continue,
            Err(_) => return,
        }
    }
    let now = now_ms();
    let (state, changed, started) = match verdict {
        ReadinessVerdict::Start => {
            warn!(
                "handoff: readiness {}{} failed {} times in a row",
                r.cluster, r.path, r.failure_threshold
            );
            let (s, c) = transition(&|s| s.start(DrainSource::Readiness, now, d.grace_s));
            (s, c, Some(DrainSource::Readiness))
        }
        ReadinessVerdict::Recovered => {
            if root.drain.cache.get().source != Some(DrainSource::Readiness)
                && read_state().0.source != Some(DrainSource::Readiness)
            {
                return;
            }
            let (s, c) = transition(&|s| s.cancel(CancelBy::ReadinessRecovered, now));
            (s, c, None)
        }
        ReadinessVerdict::Nothing => return,
    };
    root.drain.cache.set(state);
    if changed {
        announce(&root.metrics, &state, started);
        if let Some(t) = call_envoy_admin(d, started.is_some()) {
            root.drain.admin_calls.push(t);
        }
    }
}

/// What a paused stream waits for from an Envoy admin call.
enum Resume {
    /// Answer the admin request with the state.
    AdminReply,
    /// Let the paused response through.
    Response,
}

struct Sse {
    scanner: SseScanner,
    injected: bool,
}

/// Per-request drain state.
pub struct HttpDrain {
    cache: Rc<Cache>,
    /// Counted in the in-flight total (decremented exactly once, at the end).
    counted: bool,
    callout: Option<(u32, Resume)>,
    sse: Option<Sse>,
    /// An admin `POST` whose body is being read (its `:path`).
    admin_body: Option<String>,
}

fn status_reply(d: &Drain) -> Reply {
    let (state, _) = read_state();
    let body = status_json(
        state.phase(now_ms()),
        state.since_ms,
        read_inflight(d.tick_ms()),
    );
    Reply {
        status: 200,
        headers: vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("cache-control".to_string(), "no-store".to_string()),
        ],
        body: body.into_bytes(),
    }
}

/// Runs first on every request. `Some(action)` when the drain answered the request itself.
pub fn on_request_headers(http: &mut Http, end_of_stream: bool) -> Option<Action> {
    let config = http.config.clone();
    let d = config.drain.as_ref()?;
    if let Some(admin) = &d.admin {
        let path = http.head.path().unwrap_or_default();
        if is_admin_path(path, &admin.path) {
            let path = path.to_string();
            return Some(admin_request(http, d, &path, end_of_stream));
        }
    }
    // Serving (the usual case) needs no clock.
    let cached = http.drain.cache.get();
    if cached.source.is_some() && cached.phase(now_ms()) == Phase::Drained {
        http.metrics.drain_rejected();
        let reply = Reply::problem(
            503,
            DRAINED_ANCHOR,
            "Instance drained",
            "This instance is shutting down and did not process the request; \
             retry it on another instance.",
        )
        .with_header("retry-after", d.retry_after_s.to_string());
        http.send_reply(reply);
        return Some(Action::Pause);
    }
    http.drain.cache.add_inflight(1);
    http.drain.counted = true;
    None
}

fn admin_request(http: &mut Http, d: &Drain, path: &str, end_of_stream: bool) -> Action {
    let token = d.admin.as_ref().and_then(|a| a.token_sha256.as_ref());
    if let Err(peer) = admin_allowed(token) {
        warn!(
            "handoff[{}]: drain admin request refused from {peer}",
            http.context_id
        );
        http.send_reply(Reply::problem(
            403,
            FORBIDDEN_ANCHOR,
            "Drain admin refused",
            "The drain admin path is open to loopback peers and to the configured bearer \
                 token only.",
        ));
        return Action::Pause;
    }
    let method = http.head.method().unwrap_or_default().to_string();
    match admin_action(&method) {
        AdminAction::Report => http.send_reply(status_reply(d)),
        AdminAction::Cancel => {
            let (state, changed) = transition(&|s| s.cancel(CancelBy::Admin, now_ms()));
            http.drain.cache.set(state);
            if changed {
                announce(&http.metrics, &state, None);
                if let Some(t) = call_envoy_admin(d, false) {
                    http.drain.callout = Some((t, Resume::AdminReply));
                    return Action::Pause;
                }
            }
            http.send_reply(status_reply(d));
        }
        AdminAction::Start => {
            let has_body =
                !end_of_stream && request_header("content-length").as_deref() != Some("0");
            if has_body {
                // Read `{"grace_s": N}` first; the hold filter after handoff keeps the headers
                // from the app meanwhile.
                http.drain.admin_body = Some(path.to_string());
                http.set_http_request_header(super::HOLD_HEADER, Some("1"));
                return Action::Continue;
            }
            match start_grace(path, None) {
                Ok(grace) => return start_by_admin(http, d, grace),
                Err(m) => http.send_reply(invalid_start(&m)),
            }
        }
        AdminAction::NotAllowed => {
            let mut r = Reply::problem(
                405,
                "drain-admin",
                "Method not allowed",
                "Use GET (state), POST (start a drain) or DELETE (cancel it).",
            );
            r = r.with_header("allow", "GET, POST, DELETE");
            http.send_reply(r);
        }
    }
    Action::Pause
}

fn invalid_start(detail: &str) -> Reply {
    Reply::problem(400, "drain-admin", "Invalid drain request", detail)
}

/// The body of an admin `POST` (`{"grace_s": N}`). `Some(action)` while the drain owns this
/// request.
pub fn on_request_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Option<Action> {
    let path = http.drain.admin_body.as_ref()?.clone();
    if !end_of_stream {
        return Some(Action::Pause);
    }
    http.drain.admin_body = None;
    let config = http.config.clone();
    let d = config.drain.as_ref()?;
    let body = http.get_http_request_body(0, body_size).unwrap_or_default();
    Some(match start_grace(&path, Some(&body)) {
        Ok(grace) => start_by_admin(http, d, grace),
        Err(m) => {
            http.send_reply(invalid_start(&m));
            Action::Pause
        }
    })
}

fn start_by_admin(http: &mut Http, d: &Drain, grace_s: Option<u32>) -> Action {
    let grace = grace_s.unwrap_or(d.grace_s);
    let (state, changed) = transition(&|s| s.start(DrainSource::Admin, now_ms(), grace));
    http.drain.cache.set(state);
    if changed {
        announce(&http.metrics, &state, Some(DrainSource::Admin));
        if let Some(t) = call_envoy_admin(d, true) {
            http.drain.callout = Some((t, Resume::AdminReply));
            return Action::Pause;
        }
    }
    http.send_reply(status_reply(d));
    Action::Pause
}

pub fn on_response_headers(http: &mut Http) -> Action {
    if !http.drain.counted {
        return Action::Continue;
    }
    let config = http.config.clone();
    let Some(d) = config.drain.as_ref() else {
        return Action::Continue;
    };
    let mut state = http.drain.cache.get();
    let mut action = Action::Continue;
    if let Some(h) = &d.upstream_signal {
        if state.source.is_none() && header_present(MapType::HttpResponseHeaders, h) {
            let now = now_ms();
            let (s, changed) =
                transition(&|s| s.start(DrainSource::UpstreamSignal, now, d.grace_s));
            http.drain.cache.set(s);
            state = s;
            if changed {
                announce(&http.metrics, &s, Some(DrainSource::UpstreamSignal));
                if let Some(t) = call_envoy_admin(d, true) {
                    // Hold this response until Envoy's admin answered, so the call outlives
                    // no stream.
                    http.drain.callout = Some((t, Resume::Response));
                    action = Action::Pause;
                }
            }
        }
    }
    // Any drain phase but serving (no clock needed to tell).
    if state.source.is_some() {
        let n = hint_ms(d.reconnect_jitter_ms, random_u32());
        http.set_http_response_header(HINT_HEADER, Some(&n.to_string()));
        http.metrics.drain_hinted();
    }
    let is_sse = response_header("content-type")
        .is_some_and(|c| c.trim_start().starts_with("text/event-stream"));
    if is_sse {
        // An injected event changes the length.
        http.set_http_response_header("content-length", None);
        http.drain.sse = Some(Sse {
            scanner: SseScanner::default(),
            injected: false,
        });
    }
    action
}

/// Event streams: follows event boundaries, and injects one `reconnect` event at the first
/// chunk seen while draining.
pub fn on_response_body(http: &mut Http, body_size: usize) {
    let Some(sse) = http.drain.sse.as_ref() else {
        return;
    };
    if sse.injected || body_size == 0 {
        return;
    }
    let config = http.config.clone();
    let Some(d) = config.drain.as_ref() else {
        return;
    };
    let chunk = http
        .get_http_response_body(0, body_size)
        .unwrap_or_default();
    let draining = http.drain.cache.get().source.is_some();
    let Some(sse) = http.drain.sse.as_mut() else {
        return;
    };
    if !draining {
        sse.scanner.observe(&chunk);
        return;
    }
    let event = reconnect_event(hint_ms(d.reconnect_jitter_ms, random_u32()));
    if let Some(new) = sse.scanner.inject(&chunk, event.as_bytes()) {
        sse.injected = true;
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &new);
    }
}

pub fn on_http_call_response(http: &mut Http, token: u32) {
    let Some((t, resume)) = http.drain.callout.take() else {
        return;
    };
    if t != token {
        http.drain.callout = Some((t, resume));
        return;
    }
    log_envoy_admin_answer();
    match resume {
        Resume::AdminReply => {
            let config = http.config.clone();
            if let Some(d) = config.drain.as_ref() {
                http.send_reply(status_reply(d));
            }
        }
        Resume::Response => http.resume_http_response(),
    }
}

/// The end of a stream (`on_log` or `on_done`, whichever comes first).
pub fn on_end(http: &mut Http) {
    if std::mem::take(&mut http.drain.counted) {
        http.drain.cache.add_inflight(-1);
    }
}
