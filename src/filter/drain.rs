//! Drain glue: reads the host, performs the steps of `crate::drain::flow` and applies the
//! edits of `crate::drain::websocket`. The drain state lives in proxy-wasm shared data (one
//! record for the whole Envoy process, every worker), reached through [`HostShared`]. Each
//! worker's root context ticks to refresh its cached copy and its in-flight heartbeat, and polls
//! readiness (one worker at a time, under a lease). The worker whose compare-and-swap makes a
//! transition is the one that tells Envoy's admin (`/healthcheck/fail` / `/healthcheck/ok`), so
//! each transition is sent exactly once.

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::{Action, BufferType, MapType};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use super::host::{
    admin_caller, random_bytes, request_bytes, response_bytes, response_header_present,
    set_request_header,
};
use super::metrics::Metrics;
use super::shared::HostShared;
use super::{Http, Root};
use crate::drain::flow::{self, AdminRequest, AdminStep, Change, RequestStep, ResponseHead};
use crate::drain::websocket::{Connection, Direction, Moment};
use crate::drain::{
    hint_ms, inflight_key, is_ready, read_inflight, read_state, reconnect_event, Drain, DrainState,
    ReadinessVerdict, SseScanner, WorkerInflight, HINT_HEADER,
};

const STORE: &HostShared = &HostShared;
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

fn mask_key() -> [u8; 4] {
    let b = random_bytes();
    [b[0], b[1], b[2], b[3]]
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

/// Caches the state a transition left in effect, and announces the transition when this call
/// made it. Returns whether it did (the caller then tells Envoy's admin).
fn apply(cache: &Cache, metrics: &Metrics, c: &Change) -> bool {
    cache.set(c.state);
    if c.failed {
        error!("handoff: drain state not written (contention or a host refusal)");
    }
    if !c.changed {
        return false;
    }
    metrics.drain_state(c.state.phase(now_ms()));
    match c.started {
        Some(source) => {
            metrics.drain_started(source);
            info!(
                "handoff: drain started by {} (grace {}s)",
                source.as_str(),
                c.state.grace_s
            );
        }
        None => info!("handoff: drain cancelled, serving"),
    }
    true
}

/// The worker's cached copy of the shared state, shared by its root and HTTP contexts, and
/// its own in-flight count.
pub struct Cache {
    state: Cell<Option<DrainState>>,
    inflight: Cell<WorkerInflight>,
    /// This worker's in-flight record in shared data.
    inflight_key: String,
    /// This worker's open WebSockets that handoff has not closed yet.
    websockets_unclosed: Cell<u64>,
    /// The drain generation whose end of grace this worker has counted idle WebSockets for.
    idle_counted: Cell<Option<u32>>,
}

impl Cache {
    /// Publishes this worker's in-flight record (one write; only this worker writes it).
    fn publish(&self, w: WorkerInflight) {
        self.inflight.set(w);
        crate::drain::publish_inflight(STORE, &self.inflight_key, w);
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

    fn add_unclosed(&self, delta: i64) {
        let n = self.websockets_unclosed.get().saturating_add_signed(delta);
        self.websockets_unclosed.set(n);
    }
}

pub struct RootDrain {
    cache: Rc<Cache>,
    /// Identifies this worker in the poller lease (context ids repeat across workers).
    worker_id: u64,
    poll: Option<u32>,
    /// When this worker last sent a readiness poll (ticks are faster than polls).
    last_poll_ms: u64,
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
                websockets_unclosed: Cell::new(0),
                idle_counted: Cell::new(None),
            }),
            worker_id,
            poll: None,
            last_poll_ms: 0,
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
            websocket_requested: false,
            websocket: None,
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
    let now = now_ms();
    crate::drain::init(STORE, now);
    let cache = &root.drain.cache;
    cache.set(read_state(STORE));
    cache.publish(WorkerInflight {
        heartbeat_ms: now,
        ..cache.inflight.get()
    });
    if !crate::drain::register_worker(STORE, root.drain.worker_id, now, d.tick_ms()) {
        warn!("handoff: drain worker registry not updated (contention)");
    }
}

/// The root tick period the drain needs, if configured.
pub fn tick_ms(config: &crate::config::Config) -> Option<u64> {
    config.drain.as_ref().map(|d| u64::from(d.tick_ms()))
}

pub fn on_tick(root: &mut Root) {
    let config = root.config.clone();
    let Some(d) = config.drain.as_ref() else {
        return;
    };
    let now = now_ms();
    let state = read_state(STORE);
    let cache = &root.drain.cache;
    cache.set(state);
    cache.publish(WorkerInflight {
        heartbeat_ms: now,
        ..cache.inflight.get()
    });
    let phase = state.phase(now);
    root.metrics.drain_state(phase);
    // Published here, not per request: the gauge lags by at most one tick.
    root.metrics
        .drain_inflight(read_inflight(STORE, now, d.tick_ms()));
    if phase == crate::drain::Phase::Drained && cache.idle_counted.get() != Some(state.generation) {
        // WebSockets still open that no frame let handoff close before the grace ended.
        cache.idle_counted.set(Some(state.generation));
        root.metrics
            .websocket_idle_at_grace_end(cache.websockets_unclosed.get());
    }
    let Some(r) = &d.readiness else {
        return;
    };
    if root.drain.poll.is_some() || now < root.drain.last_poll_ms + u64::from(r.interval_ms) {
        return; // the previous poll is still out (its timeout bounds the wait), or not due
    }
    root.drain.last_poll_ms = now;
    if !crate::drain::acquire_lease(
        STORE,
        root.drain.worker_id,
        now,
        3 * u64::from(r.interval_ms),
    ) {
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

fn readiness_result(root: &mut Root, d: &Drain, ready: bool) {
    let cached = root.drain.cache.get();
    let Some((verdict, change)) =
        flow::on_readiness(d, STORE, root.drain.worker_id, ready, &cached, now_ms())
    else {
        return;
    };
    if let (ReadinessVerdict::Start, Some(r)) = (verdict, &d.readiness) {
        warn!(
            "handoff: readiness {}{} failed {} times in a row",
            r.cluster, r.path, r.failure_threshold
        );
    }
    if apply(&root.drain.cache, &root.metrics, &change) {
        if let Some(t) = call_envoy_admin(d, change.started.is_some()) {
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
    /// The request asked for a WebSocket upgrade (only looked at with a websocket section).
    websocket_requested: bool,
    /// An upgraded WebSocket being followed.
    websocket: Option<Connection>,
}

/// Runs first on every request. `Some(action)` when the drain answered the request itself.
pub fn on_request_headers(http: &mut Http, end_of_stream: bool) -> Option<Action> {
    let config = http.config.clone();
    let d = config.drain.as_ref()?;
    let cached = http.drain.cache.get();
    // The clock is read only when the cached state is not serving.
    let now = if cached.source.is_some() { now_ms() } else { 0 };
    match flow::on_request(d, http.head.path(), &cached, STORE, now) {
        RequestStep::Admin => {
            let path = http.head.path().unwrap_or_default().to_string();
            Some(admin_request(http, d, &path, end_of_stream))
        }
        RequestStep::Drained(reply) => {
            http.metrics.drain_rejected();
            http.send_reply(reply);
            Some(Action::Pause)
        }
        RequestStep::Forward { refreshed } => {
            if let Some(s) = refreshed {
                http.drain.cache.set(s);
            }
            http.drain.cache.add_inflight(1);
            http.drain.counted = true;
            if d.websocket.is_some() {
                http.drain.websocket_requested =
                    flow::is_websocket_upgrade(request_bytes("upgrade").as_deref());
            }
            None
        }
    }
}

fn admin_request(http: &mut Http, d: &Drain, path: &str, end_of_stream: bool) -> Action {
    let Some(admin) = d.admin.as_ref() else {
        return Action::Continue;
    };
    let caller = admin_caller();
    let has_body = !end_of_stream && request_bytes("content-length").as_deref() != Some(b"0");
    let method = http.head.method().unwrap_or_default().to_string();
    let req = AdminRequest {
        method: &method,
        path,
        loopback: caller.loopback,
        authorization: caller.authorization.as_deref(),
        has_body,
    };
    let step = flow::admin_request(d, admin, &req, STORE, now_ms());
    if matches!(step, AdminStep::Refused(_)) {
        warn!(
            "handoff[{}]: drain admin request refused from {}",
            http.context_id,
            caller.peer.as_deref().unwrap_or("an unknown peer")
        );
    }
    perform_admin(http, d, path, step)
}

fn perform_admin(http: &mut Http, d: &Drain, path: &str, step: AdminStep) -> Action {
    match step {
        AdminStep::Reply(r) | AdminStep::Refused(r) => http.send_reply(r),
        AdminStep::ReadBody => {
            // Read `{"grace_s": N}` first; the hold filter after handoff keeps the headers
            // from the app meanwhile.
            http.drain.admin_body = Some(path.to_string());
            set_request_header(super::HOLD_HEADER, Some("1"));
            return Action::Continue;
        }
        AdminStep::Transition(c) => {
            if apply(&http.drain.cache, &http.metrics, &c) {
                if let Some(t) = call_envoy_admin(d, c.started.is_some()) {
                    http.drain.callout = Some((t, Resume::AdminReply));
                    return Action::Pause;
                }
            }
            http.send_reply(flow::status_reply(d, STORE, now_ms()));
        }
        AdminStep::Status => http.send_reply(flow::status_reply(d, STORE, now_ms())),
    }
    Action::Pause
}

/// The body of an admin `POST` (`{"grace_s": N}`), or a WebSocket's client frames. `Some`
/// while the drain owns this request.
pub fn on_request_body(http: &mut Http, body_size: usize, end_of_stream: bool) -> Option<Action> {
    if http.drain.websocket.is_some() {
        websocket_chunk(http, Direction::ToUpstream, body_size);
        return None;
    }
    let path = http.drain.admin_body.as_ref()?.clone();
    if !end_of_stream {
        return Some(Action::Pause);
    }
    http.drain.admin_body = None;
    let config = http.config.clone();
    let d = config.drain.as_ref()?;
    let body = http.get_http_request_body(0, body_size).unwrap_or_default();
    let step = flow::admin_body(d, STORE, &path, &body, now_ms());
    Some(perform_admin(http, d, &path, step))
}

pub fn on_response_headers(http: &mut Http) -> Action {
    if !http.drain.counted {
        return Action::Continue;
    }
    let config = http.config.clone();
    let Some(d) = config.drain.as_ref() else {
        return Action::Continue;
    };
    let cached = http.drain.cache.get();
    let signal = d
        .upstream_signal
        .as_deref()
        .is_some_and(|h| cached.source.is_none() && response_header_present(h));
    let content_type = response_bytes("content-type");
    let status = if http.drain.websocket_requested {
        response_bytes(":status")
    } else {
        None
    };
    let head = ResponseHead {
        signal,
        content_type: content_type.as_deref(),
        status: status.as_deref(),
        websocket_requested: http.drain.websocket_requested,
    };
    let now = if signal { now_ms() } else { 0 };
    let plan = flow::on_response(d, &cached, &head, STORE, now);
    let mut action = Action::Continue;
    if let Some(c) = plan.signalled {
        if apply(&http.drain.cache, &http.metrics, &c) {
            if let Some(t) = call_envoy_admin(d, true) {
                // Hold this response until Envoy's admin answered, so the call outlives no
                // stream.
                http.drain.callout = Some((t, Resume::Response));
                action = Action::Pause;
            }
        }
    }
    if plan.hint {
        let n = hint_ms(d.reconnect_jitter_ms, random_u32());
        http.set_http_response_header(HINT_HEADER, Some(&n.to_string()));
        http.metrics.drain_hinted();
    }
    if plan.sse {
        // An injected event changes the length.
        http.set_http_response_header("content-length", None);
        http.drain.sse = Some(Sse {
            scanner: SseScanner::default(),
            injected: false,
        });
    }
    if plan.websocket {
        http.drain.websocket = Some(Connection::default());
        http.drain.cache.add_unclosed(1);
        http.metrics.websockets_open(1);
    }
    action
}

/// Event streams: follows event boundaries, and injects one `reconnect` event at the first
/// chunk seen while draining. WebSockets: the server's frames.
pub fn on_response_body(http: &mut Http, body_size: usize) {
    if http.drain.websocket.is_some() {
        websocket_chunk(http, Direction::ToClient, body_size);
        return;
    }
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

/// One chunk of an upgraded WebSocket's frames (either direction): followed, and edited while
/// draining (the migration message, a Close).
fn websocket_chunk(http: &mut Http, dir: Direction, body_size: usize) {
    let config = http.config.clone();
    let Some((d, ws)) = config
        .drain
        .as_ref()
        .and_then(|d| d.websocket.as_ref().map(|w| (d, w)))
    else {
        return;
    };
    let buffer = match dir {
        Direction::ToClient => BufferType::HttpResponseBody,
        Direction::ToUpstream => BufferType::HttpRequestBody,
    };
    let chunk = hostcalls::get_buffer(buffer, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    let state = http.drain.cache.get();
    let moment = Moment {
        state: &state,
        now_ms: if state.source.is_some() { now_ms() } else { 0 },
        jitter_ms: d.reconnect_jitter_ms,
        config: ws,
    };
    let Some(conn) = http.drain.websocket.as_mut() else {
        return;
    };
    let was_closing = conn.closing();
    let edit = conn.on_chunk(dir, &chunk, &moment, &mut random_u32, &mut mask_key);
    let now_closing = conn.closing();
    if let Some(new) = edit.replace {
        let _ = hostcalls::set_buffer(buffer, 0, body_size, &new);
    }
    if edit.malformed {
        warn!(
            "handoff[{}]: WebSocket frames not understood: passed through untouched",
            http.context_id
        );
        http.metrics.websocket_malformed();
    }
    if edit.migrated {
        http.metrics.websocket_migrated();
    }
    if edit.closed && dir == Direction::ToClient {
        http.metrics.websocket_closed();
    }
    if now_closing && !was_closing {
        http.drain.cache.add_unclosed(-1);
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
                http.send_reply(flow::status_reply(d, STORE, now_ms()));
            }
        }
        Resume::Response => http.resume_http_response(),
    }
}

/// The end of a stream (`on_done`).
pub fn on_end(http: &mut Http) {
    if std::mem::take(&mut http.drain.counted) {
        http.drain.cache.add_inflight(-1);
    }
    if let Some(conn) = http.drain.websocket.take() {
        http.metrics.websockets_open(-1);
        if !conn.closing() {
            http.drain.cache.add_unclosed(-1);
        }
    }
}
