//! What each event does to the drain, as steps the glue performs: an admin request, a request,
//! a response, a readiness answer. The steps read and write the shared records through
//! [`SharedData`]; the glue supplies the host's store, the clock and the request's values, and
//! applies what comes back (reply, hold the body, announce a transition and tell Envoy's admin).

use super::admin::{
    admin_action, authorize, is_admin_path, start_grace, status_json, AdminAction, AdminAuth,
};
use super::config::{Admin, Drain};
use super::records::{read_inflight, read_state, record_readiness, transition};
use super::state::{CancelBy, DrainSource, DrainState, Phase, ReadinessVerdict};
use super::{DRAINED_ANCHOR, FORBIDDEN_ANCHOR};
use crate::problem::Reply;
use crate::shared::{SharedData, Update};

/// The result of an attempted transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The state now in effect: the worker caches it.
    pub state: DrainState,
    /// This call made the transition: announce it (log, metrics) and tell Envoy's admin
    /// (`/healthcheck/fail` for a start, `/healthcheck/ok` for a cancel).
    pub changed: bool,
    /// What started the drain, when this was a start.
    pub started: Option<DrainSource>,
    /// The shared record could not be written (contention or a host refusal): log it.
    pub failed: bool,
}

fn attempt(
    store: &dyn SharedData,
    started: Option<DrainSource>,
    f: &dyn Fn(&DrainState) -> Option<DrainState>,
) -> Change {
    let (state, changed, failed) = match transition(store, f) {
        Update::Written(s) => (s, true, false),
        Update::Unchanged(s) => (s, false, false),
        Update::Failed(_) => (read_state(store), false, true),
    };
    Change {
        state,
        changed,
        started: started.filter(|_| changed),
        failed,
    }
}

/// Starts a drain (`None` grace: the configured one).
pub fn start(store: &dyn SharedData, source: DrainSource, now_ms: u64, grace_s: u32) -> Change {
    attempt(store, Some(source), &|s| s.start(source, now_ms, grace_s))
}

pub fn cancel(store: &dyn SharedData, by: CancelBy, now_ms: u64) -> Change {
    attempt(store, None, &|s| s.cancel(by, now_ms))
}

/// An admin request as the glue read it.
#[derive(Debug, Clone, Copy)]
pub struct AdminRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// From this host (see [`super::is_loopback_request`]).
    pub loopback: bool,
    /// The `authorization` header; `None` when missing or not UTF-8.
    pub authorization: Option<&'a str>,
    /// A body follows the headers.
    pub has_body: bool,
}

/// What to do with an admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminStep {
    /// Answer with this (an error).
    Reply(Reply),
    /// Refused: log it and answer with this 403.
    Refused(Reply),
    /// Hold the request (mark it for the hold filter) and pass its body to [`admin_body`].
    ReadBody,
    /// Cache the state; when `changed`, announce it and tell Envoy's admin; then answer with
    /// [`status_reply`] (after Envoy's admin answered, when it was called).
    Transition(Change),
    /// Answer with [`status_reply`].
    Status,
}

fn invalid_start(detail: &str) -> Reply {
    Reply::problem(400, "drain-admin", "Invalid drain request", detail)
}

/// The admin request's headers arrived.
pub fn admin_request(
    d: &Drain,
    admin: &Admin,
    req: &AdminRequest,
    store: &dyn SharedData,
    now_ms: u64,
) -> AdminStep {
    let token = admin.token_sha256.as_ref();
    if authorize(req.loopback, req.authorization, token) == AdminAuth::Denied {
        return AdminStep::Refused(Reply::problem(
            403,
            FORBIDDEN_ANCHOR,
            "Drain admin refused",
            "The drain admin path is open to loopback peers and to the configured bearer \
                 token only.",
        ));
    }
    match admin_action(req.method) {
        AdminAction::Report => AdminStep::Status,
        AdminAction::Cancel => AdminStep::Transition(cancel(store, CancelBy::Admin, now_ms)),
        AdminAction::Start if req.has_body => AdminStep::ReadBody,
        AdminAction::Start => start_by_admin(d, store, req.path, None, now_ms),
        AdminAction::NotAllowed => AdminStep::Reply(
            Reply::problem(
                405,
                "drain-admin",
                "Method not allowed",
                "Use GET (state), POST (start a drain) or DELETE (cancel it).",
            )
            .with_header("allow", "GET, POST, DELETE"),
        ),
    }
}

/// The whole body of an admin `POST` arrived.
pub fn admin_body(
    d: &Drain,
    store: &dyn SharedData,
    path: &str,
    body: &[u8],
    now_ms: u64,
) -> AdminStep {
    start_by_admin(d, store, path, Some(body), now_ms)
}

fn start_by_admin(
    d: &Drain,
    store: &dyn SharedData,
    path: &str,
    body: Option<&[u8]>,
    now_ms: u64,
) -> AdminStep {
    match start_grace(path, body) {
        Ok(grace) => AdminStep::Transition(start(
            store,
            DrainSource::Admin,
            now_ms,
            grace.unwrap_or(d.grace_s),
        )),
        Err(m) => AdminStep::Reply(invalid_start(&m)),
    }
}

/// The admin `GET` answer, read from the shared records.
pub fn status_reply(d: &Drain, store: &dyn SharedData, now_ms: u64) -> Reply {
    let state = read_state(store);
    let body = status_json(
        state.phase(now_ms),
        state.since_ms,
        read_inflight(store, now_ms, d.tick_ms()),
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

/// What the drain does with a request's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStep {
    /// The admin path: see [`admin_request`].
    Admin,
    /// Drained: answer with this retryable 503 (the request never reaches the app).
    Drained(Reply),
    /// Forward it, counted in flight. `refreshed`: the worker's cached state was stale.
    Forward { refreshed: Option<DrainState> },
}

/// A request's headers. `cached` is this worker's copy of the state; a drained copy is
/// checked against the shared record first, so a cancel is seen by every worker on its next
/// request (a worker's tick refreshes the copy only every [`super::STATE_TICK_MS`]).
pub fn on_request(
    d: &Drain,
    path: Option<&str>,
    cached: &DrainState,
    store: &dyn SharedData,
    now_ms: u64,
) -> RequestStep {
    if let (Some(admin), Some(path)) = (&d.admin, path) {
        if is_admin_path(path, &admin.path) {
            return RequestStep::Admin;
        }
    }
    // Serving (the usual case) needs no clock and no shared-data read.
    if cached.source.is_none() || cached.phase(now_ms) != Phase::Drained {
        return RequestStep::Forward { refreshed: None };
    }
    let current = read_state(store);
    if current.phase(now_ms) != Phase::Drained {
        return RequestStep::Forward {
            refreshed: Some(current),
        };
    }
    RequestStep::Drained(
        Reply::problem(
            503,
            DRAINED_ANCHOR,
            "Instance drained",
            "This instance is shutting down and did not process the request; \
             retry it on another instance.",
        )
        .with_header("retry-after", d.retry_after_s.to_string()),
    )
}

/// A forwarded request's response headers as the glue read them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseHead<'a> {
    /// The configured upstream signal header is present.
    pub signal: bool,
    pub content_type: Option<&'a [u8]>,
    pub status: Option<&'a [u8]>,
    /// The request asked for a WebSocket upgrade (HTTP/1.1 `Upgrade: websocket`, or an
    /// HTTP/2 extended CONNECT, which Envoy presents to filters the same way).
    pub websocket_requested: bool,
}

/// What the drain does with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePlan {
    /// The upstream signalled a drain: the attempt (announce and tell Envoy's admin if changed,
    /// holding this response until Envoy's admin answered).
    pub signalled: Option<Change>,
    /// Draining: add the reconnect hint header.
    pub hint: bool,
    /// An event stream: follow its events (and drop `content-length`).
    pub sse: bool,
    /// An upgraded WebSocket: follow its frames.
    pub websocket: bool,
}

pub fn on_response(
    d: &Drain,
    cached: &DrainState,
    head: &ResponseHead,
    store: &dyn SharedData,
    now_ms: u64,
) -> ResponsePlan {
    let mut state = *cached;
    let mut signalled = None;
    if d.upstream_signal.is_some() && head.signal && state.source.is_none() {
        let c = start(store, DrainSource::UpstreamSignal, now_ms, d.grace_s);
        state = c.state;
        signalled = Some(c);
    }
    let sse = head.content_type.is_some_and(|c| {
        let c = trim(c);
        c.len() >= 17 && c[..17].eq_ignore_ascii_case(b"text/event-stream")
    });
    let websocket = d.websocket.is_some()
        && head.websocket_requested
        && head.status.is_some_and(|s| trim(s) == b"101");
    ResponsePlan {
        signalled,
        hint: state.source.is_some(),
        sse,
        websocket,
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// True when a request asks for a WebSocket upgrade: its `upgrade` header names `websocket`.
pub fn is_websocket_upgrade(upgrade: Option<&[u8]>) -> bool {
    upgrade.is_some_and(|u| {
        u.split(|b| *b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(b"websocket"))
    })
}

/// A readiness answer from the poller. `None` when it changes nothing. A recovery cancels only
/// a drain that readiness started: an operator's or the app's drain holds.
pub fn on_readiness(
    d: &Drain,
    store: &dyn SharedData,
    me: u64,
    ready: bool,
    cached: &DrainState,
    now_ms: u64,
) -> Option<(ReadinessVerdict, Change)> {
    let r = d.readiness.as_ref()?;
    match record_readiness(store, me, ready, r.failure_threshold) {
        ReadinessVerdict::Start => Some((
            ReadinessVerdict::Start,
            start(store, DrainSource::Readiness, now_ms, d.grace_s),
        )),
        ReadinessVerdict::Recovered => {
            if cached.source != Some(DrainSource::Readiness)
                && read_state(store).source != Some(DrainSource::Readiness)
            {
                return None;
            }
            Some((
                ReadinessVerdict::Recovered,
                cancel(store, CancelBy::ReadinessRecovered, now_ms),
            ))
        }
        ReadinessVerdict::Nothing => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::drain::RawDrain;
    use crate::drain::{init, PollLease, LEASE_KEY, STATE_KEY};
    use crate::shared::Memory;

    fn drain(json: &str) -> Drain {
        serde_json::from_str::<RawDrain>(json)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn fixture() -> (Drain, Memory) {
        let d = drain(
            r#"{"admin": {"token_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
                "upstream_signal": {"header": "x-drain"},
                "readiness": {"cluster": "app", "failure_threshold": 2}, "grace_s": 10}"#,
        );
        let m = Memory::new();
        init(&m, 0);
        (d, m)
    }

    fn req<'a>(method: &'a str, path: &'a str, loopback: bool) -> AdminRequest<'a> {
        AdminRequest {
            method,
            path,
            loopback,
            authorization: None,
            has_body: false,
        }
    }

    fn admin(d: &Drain, r: &AdminRequest, m: &Memory, now: u64) -> AdminStep {
        admin_request(d, d.admin.as_ref().unwrap(), r, m, now)
    }

    const P: &str = "/.well-known/handoff/drain";

    #[test]
    fn admin_auth_and_methods() {
        let (d, m) = fixture();
        assert!(matches!(
            admin(&d, &req("POST", P, false), &m, 0),
            AdminStep::Refused(r) if r.status == 403
        ));
        let with_token = AdminRequest {
            authorization: Some("Bearer test"),
            ..req("GET", P, false)
        };
        assert_eq!(admin(&d, &with_token, &m, 0), AdminStep::Status);
        assert!(matches!(
            admin(&d, &req("PUT", P, true), &m, 0),
            AdminStep::Reply(r) if r.status == 405
        ));
        assert_eq!(
            admin(
                &d,
                &AdminRequest {
                    has_body: true,
                    ..req("POST", P, true)
                },
                &m,
                0
            ),
            AdminStep::ReadBody
        );
        assert!(matches!(
            admin_body(&d, &m, P, b"{\"grace\": 1}", 0),
            AdminStep::Reply(r) if r.status == 400
        ));
        assert_eq!(read_state(&m).source, None, "nothing started by refusals");
    }

    #[test]
    fn admin_start_and_cancel_change_the_shared_state_once() {
        let (d, m) = fixture();
        let AdminStep::Transition(c) =
            admin(&d, &req("POST", &format!("{P}?grace_s=3"), true), &m, 100)
        else {
            panic!()
        };
        assert!(c.changed && !c.failed);
        assert_eq!((c.started, c.state.grace_s), (Some(DrainSource::Admin), 3));
        // Again: the drain is running, nothing to announce.
        let AdminStep::Transition(again) = admin(&d, &req("POST", P, true), &m, 200) else {
            panic!()
        };
        assert_eq!(
            (again.changed, again.started, again.state),
            (false, None, c.state)
        );
        // The body's grace wins over the query.
        let AdminStep::Transition(x) = admin(&d, &req("DELETE", P, true), &m, 300) else {
            panic!()
        };
        assert!(x.changed && x.started.is_none() && x.state.source.is_none());
        let AdminStep::Transition(b) =
            admin_body(&d, &m, &format!("{P}?grace_s=3"), b"{\"grace_s\": 0}", 400)
        else {
            panic!()
        };
        assert_eq!((b.changed, b.state.grace_s), (true, 0));
        // A lost race every time: reported, nothing changed.
        m.lose_next_races(crate::drain::CAS_ATTEMPTS);
        let AdminStep::Transition(f) = admin(&d, &req("DELETE", P, true), &m, 500) else {
            panic!()
        };
        assert!(f.failed && !f.changed);
        assert_eq!(f.state, b.state);
        let v: serde_json::Value = serde_json::from_slice(&status_reply(&d, &m, 500).body).unwrap();
        assert_eq!(v["state"], "drained");
    }

    #[test]
    fn a_drained_worker_checks_the_shared_state_before_refusing() {
        let (d, m) = fixture();
        let c = start(&m, DrainSource::Admin, 0, 0);
        assert!(matches!(
            on_request(&d, Some("/pay"), &c.state, &m, 1),
            RequestStep::Drained(r) if r.status == 503
        ));
        // Another worker cancelled: this worker's copy is stale, the request goes through.
        let x = cancel(&m, CancelBy::Admin, 2);
        assert_eq!(
            on_request(&d, Some("/pay"), &c.state, &m, 3),
            RequestStep::Forward {
                refreshed: Some(x.state)
            }
        );
        assert_eq!(on_request(&d, Some(P), &c.state, &m, 3), RequestStep::Admin);
        // Serving reads nothing.
        let writes = m.writes();
        assert_eq!(
            on_request(&d, Some("/pay"), &x.state, &m, 4),
            RequestStep::Forward { refreshed: None }
        );
        assert_eq!(m.writes(), writes);
    }

    #[test]
    fn responses_signal_hint_and_detect_streams() {
        let (d, m) = fixture();
        let serving = read_state(&m);
        let plan = on_response(&d, &serving, &ResponseHead::default(), &m, 0);
        assert_eq!(
            plan,
            ResponsePlan {
                signalled: None,
                hint: false,
                sse: false,
                websocket: false
            }
        );
        let head = ResponseHead {
            signal: true,
            content_type: Some(b" Text/Event-Stream; charset=utf-8"),
            ..ResponseHead::default()
        };
        let plan = on_response(&d, &serving, &head, &m, 5);
        let c = plan.signalled.unwrap();
        assert_eq!(
            (c.changed, c.started),
            (true, Some(DrainSource::UpstreamSignal))
        );
        assert!(plan.hint && plan.sse);
        // Without a websocket section an upgrade is not followed.
        let ws = ResponseHead {
            status: Some(b"101"),
            websocket_requested: true,
            ..ResponseHead::default()
        };
        assert!(!on_response(&d, &c.state, &ws, &m, 6).websocket);
        let mut d2 = d.clone();
        d2.websocket = Some(crate::drain::Websocket {
            migration_prefix: None,
            close_code: 1001,
            close_reason: String::new(),
        });
        assert!(on_response(&d2, &c.state, &ws, &m, 6).websocket);
        let not_101 = ResponseHead {
            status: Some(b"200"),
            ..ws
        };
        assert!(!on_response(&d2, &c.state, &not_101, &m, 6).websocket);
        assert!(is_websocket_upgrade(Some(b"WebSocket")));
        assert!(is_websocket_upgrade(Some(b"h2c, websocket")));
        assert!(!is_websocket_upgrade(Some(b"h2c")));
        assert!(!is_websocket_upgrade(None));
    }

    #[test]
    fn readiness_recovers_only_its_own_drain() {
        let (d, m) = fixture();
        let me = 7;
        // Only the lease owner's answers count.
        assert_eq!(on_readiness(&d, &m, me, false, &read_state(&m), 0), None);
        let lease = PollLease {
            owner: me,
            expires_ms: u64::MAX,
            failures: 0,
        };
        m.set(LEASE_KEY, &lease.encode(), None).unwrap();
        assert_eq!(on_readiness(&d, &m, me, false, &read_state(&m), 0), None);
        let (v, c) = on_readiness(&d, &m, me, false, &read_state(&m), 1).unwrap();
        assert_eq!(
            (v, c.changed, c.started),
            (ReadinessVerdict::Start, true, Some(DrainSource::Readiness))
        );
        let (v, c) = on_readiness(&d, &m, me, true, &c.state, 2).unwrap();
        assert_eq!((v, c.changed), (ReadinessVerdict::Recovered, true));
        // An admin drain holds when readiness recovers.
        let a = start(&m, DrainSource::Admin, 3, 10);
        assert_eq!(on_readiness(&d, &m, me, true, &a.state, 4), None);
        assert_eq!(read_state(&m).source, Some(DrainSource::Admin));
        assert!(m.value(STATE_KEY).is_some());
    }
}
