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
//! Everything here is pure: the configuration, the state machine and its few-byte encoding
//! (the filter keeps it in proxy-wasm shared data, so every worker sees one state), admin
//! request authorization, the reconnect hint, and the SSE `reconnect` event injection. The
//! filter (`filter::drain`) reads the host and applies the decisions.

use sha2::{Digest, Sha256};

pub const HINT_HEADER: &str = "x-handoff-reconnect-after-ms";
pub const DEFAULT_ADMIN_PATH: &str = "/.well-known/handoff/drain";
/// The docs/problems.md section of the 503 problem answered after the grace period.
pub const DRAINED_ANCHOR: &str = "drain-drained";
pub const FORBIDDEN_ANCHOR: &str = "drain-admin-forbidden";

/// A validated drain section.
#[derive(Debug, Clone)]
pub struct Drain {
    pub admin: Option<Admin>,
    pub upstream_signal: Option<String>,
    pub readiness: Option<Readiness>,
    pub envoy_admin_cluster: Option<String>,
    pub grace_s: u32,
    pub reconnect_jitter_ms: u32,
    pub retry_after_s: u32,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub path: String,
    pub token_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone)]
pub struct Readiness {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub interval_ms: u32,
    pub failure_threshold: u32,
}

pub const MAX_GRACE_S: u32 = 24 * 3600;
pub const MAX_JITTER_MS: u32 = 3_600_000;
pub const MIN_INTERVAL_MS: u32 = 50;
pub const MAX_INTERVAL_MS: u32 = 60_000;

impl Drain {
    /// The tick period of every worker: each sees another worker's transition within one tick.
    pub fn tick_ms(&self) -> u32 {
        self.readiness.as_ref().map_or(1000, |r| r.interval_ms)
    }

    /// A one-line description for the start-up log.
    pub fn summary(&self) -> String {
        let mut triggers = Vec::new();
        if let Some(a) = &self.admin {
            triggers.push(format!("admin {}", a.path));
        }
        if let Some(h) = &self.upstream_signal {
            triggers.push(format!("upstream_signal {h}"));
        }
        if let Some(r) = &self.readiness {
            triggers.push(format!("readiness {}{}", r.cluster, r.path));
        }
        format!("drain ({}, grace {}s)", triggers.join(", "), self.grace_s)
    }
}

/// What started a drain; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainSource {
    Admin,
    UpstreamSignal,
    Readiness,
}

impl DrainSource {
    pub const ALL: [DrainSource; 3] = [
        DrainSource::Admin,
        DrainSource::UpstreamSignal,
        DrainSource::Readiness,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DrainSource::Admin => "admin",
            DrainSource::UpstreamSignal => "upstream_signal",
            DrainSource::Readiness => "readiness",
        }
    }

    fn code(self) -> u8 {
        match self {
            DrainSource::Admin => 1,
            DrainSource::UpstreamSignal => 2,
            DrainSource::Readiness => 3,
        }
    }

    fn from_code(c: u8) -> Option<DrainSource> {
        match c {
            1 => Some(DrainSource::Admin),
            2 => Some(DrainSource::UpstreamSignal),
            3 => Some(DrainSource::Readiness),
            _ => None,
        }
    }
}

/// The phase a request sees, derived from the state and the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Draining,
    Drained,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
        }
    }

    /// The value of the `handoff_drain_state` gauge.
    pub fn gauge(self) -> u64 {
        match self {
            Phase::Serving => 0,
            Phase::Draining => 1,
            Phase::Drained => 2,
        }
    }
}

/// Who cancels a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelBy {
    /// `DELETE` on the admin path: cancels any drain.
    Admin,
    /// The readiness endpoint answers again: cancels only a drain that readiness started.
    ReadinessRecovered,
}

/// The process-wide drain state. `drained` is not stored: it is `draining` once the grace has
/// passed, so no worker has to write anything when the grace ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainState {
    /// `None` while serving.
    pub source: Option<DrainSource>,
    /// Unix ms when the current state began.
    pub since_ms: u64,
    pub grace_s: u32,
    /// Incremented on every transition.
    pub generation: u32,
}

pub const STATE_LEN: usize = 18;
const STATE_VERSION: u8 = 1;

impl DrainState {
    pub fn serving(since_ms: u64) -> DrainState {
        DrainState {
            source: None,
            since_ms,
            grace_s: 0,
            generation: 0,
        }
    }

    pub fn phase(&self, now_ms: u64) -> Phase {
        match self.source {
            None => Phase::Serving,
            Some(_) => {
                let end = self.since_ms.saturating_add(u64::from(self.grace_s) * 1000);
                if now_ms >= end {
                    Phase::Drained
                } else {
                    Phase::Draining
                }
            }
        }
    }

    /// Starts a drain; `None` when one is already running (the first source keeps it).
    pub fn start(&self, source: DrainSource, now_ms: u64, grace_s: u32) -> Option<DrainState> {
        if self.source.is_some() {
            return None;
        }
        Some(DrainState {
            source: Some(source),
            since_ms: now_ms,
            grace_s,
            generation: self.generation.wrapping_add(1),
        })
    }

    /// Cancels a drain; `None` when there is nothing this canceller may cancel.
    pub fn cancel(&self, by: CancelBy, now_ms: u64) -> Option<DrainState> {
        let allowed = match (by, self.source) {
            (_, None) => false,
            (CancelBy::Admin, Some(_)) => true,
            (CancelBy::ReadinessRecovered, Some(s)) => s == DrainSource::Readiness,
        };
        allowed.then(|| DrainState {
            source: None,
            since_ms: now_ms,
            grace_s: 0,
            generation: self.generation.wrapping_add(1),
        })
    }

    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0] = STATE_VERSION;
        b[1] = self.source.map_or(0, DrainSource::code);
        b[2..6].copy_from_slice(&self.grace_s.to_le_bytes());
        b[6..14].copy_from_slice(&self.since_ms.to_le_bytes());
        b[14..18].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<DrainState> {
        if b.len() != STATE_LEN || b[0] != STATE_VERSION {
            return None;
        }
        let source = match b[1] {
            0 => None,
            c => Some(DrainSource::from_code(c)?),
        };
        Some(DrainState {
            source,
            grace_s: u32::from_le_bytes(b[2..6].try_into().ok()?),
            since_ms: u64::from_le_bytes(b[6..14].try_into().ok()?),
            generation: u32::from_le_bytes(b[14..18].try_into().ok()?),
        })
    }
}

/// One worker's share of the in-flight count, in shared data under a key of its own: only that
/// worker writes it, so a request start or end is one unconditional write (no read, no CAS
/// loop). `heartbeat_ms` is refreshed on every tick; a record whose worker stopped ticking
/// (its VM is gone) stops counting after [`WorkerInflight::stale_after_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerInflight {
    pub count: u64,
    pub heartbeat_ms: u64,
}

pub const WORKER_INFLIGHT_LEN: usize = 16;

impl WorkerInflight {
    pub fn encode(&self) -> [u8; WORKER_INFLIGHT_LEN] {
        let mut out = [0u8; WORKER_INFLIGHT_LEN];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..].copy_from_slice(&self.heartbeat_ms.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<WorkerInflight> {
        if b.len() != WORKER_INFLIGHT_LEN {
            return None;
        }
        Some(WorkerInflight {
            count: u64::from_be_bytes(b[..8].try_into().ok()?),
            heartbeat_ms: u64::from_be_bytes(b[8..].try_into().ok()?),
        })
    }

    /// How long a record counts without a heartbeat: three ticks and 10 s of slack (a busy
    /// worker's tick may be late).
    pub fn stale_after_ms(tick_ms: u32) -> u64 {
        3 * u64::from(tick_ms) + 10_000
    }

    pub fn live(&self, now_ms: u64, tick_ms: u32) -> bool {
        now_ms.saturating_sub(self.heartbeat_ms) < Self::stale_after_ms(tick_ms)
    }
}

/// The ids of the workers that publish an in-flight record (shared data, CAS-appended when a
/// worker is configured). At most [`MAX_WORKERS`]: registering drops stale workers first.
pub const MAX_WORKERS: usize = 512;

pub fn decode_workers(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
        .collect()
}

pub fn encode_workers(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

/// The registry with `me` in it, keeping only workers `live` says are still there (and at most
/// [`MAX_WORKERS`], newest last). `None` when `me` is already registered.
pub fn register_worker(ids: &[u64], me: u64, live: &dyn Fn(u64) -> bool) -> Option<Vec<u64>> {
    if ids.contains(&me) {
        return None;
    }
    let mut next: Vec<u64> = ids.iter().copied().filter(|id| live(*id)).collect();
    next.push(me);
    let excess = next.len().saturating_sub(MAX_WORKERS);
    next.drain(..excess);
    Some(next)
}

/// The readiness poller's shared record: which worker polls (a lease, so only one polls at a
/// time) and the consecutive failures seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollLease {
    pub owner: u64,
    pub expires_ms: u64,
    pub failures: u32,
}

pub const LEASE_LEN: usize = 20;

/// What a readiness answer means for the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessVerdict {
    /// Failures just reached the threshold: start a drain.
    Start,
    /// Ready: cancel a drain that readiness started.
    Recovered,
    Nothing,
}

impl PollLease {
    /// The lease renewed for `me`, or `None` when another live worker holds it.
    pub fn acquire(&self, me: u64, now_ms: u64, ttl_ms: u64) -> Option<PollLease> {
        if self.owner != me && self.owner != 0 && now_ms < self.expires_ms {
            return None;
        }
        Some(PollLease {
            owner: me,
            expires_ms: now_ms.saturating_add(ttl_ms),
            failures: self.failures,
        })
    }

    /// Records one poll result. The drain starts when the consecutive failures reach the
    /// threshold (once per failing streak, so an operator's cancel holds while it lasts).
    pub fn record(&self, ready: bool, threshold: u32) -> (PollLease, ReadinessVerdict) {
        if ready {
            let next = PollLease {
                failures: 0,
                ..*self
            };
            return (next, ReadinessVerdict::Recovered);
        }
        let failures = self.failures.saturating_add(1);
        let verdict = if failures == threshold {
            ReadinessVerdict::Start
        } else {
            ReadinessVerdict::Nothing
        };
        (PollLease { failures, ..*self }, verdict)
    }

    pub fn encode(&self) -> [u8; LEASE_LEN] {
        let mut b = [0u8; LEASE_LEN];
        b[0..8].copy_from_slice(&self.owner.to_le_bytes());
        b[8..16].copy_from_slice(&self.expires_ms.to_le_bytes());
        b[16..20].copy_from_slice(&self.failures.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<PollLease> {
        if b.len() != LEASE_LEN {
            return None;
        }
        Some(PollLease {
            owner: u64::from_le_bytes(b[0..8].try_into().ok()?),
            expires_ms: u64::from_le_bytes(b[8..16].try_into().ok()?),
            failures: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

/// A readiness answer: any 2xx is ready; anything else, or no answer, is a failure.
pub fn is_ready(status: Option<&str>) -> bool {
    status
        .and_then(|s| s.trim().parse::<u16>().ok())
        .is_some_and(|s| (200..300).contains(&s))
}

/// How an admin request was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuth {
    Loopback,
    Token,
    Denied,
}

/// True when `peer` (Envoy's `source.address`: `127.0.0.1:5555`, `[::1]:5555`, or a bare IP)
/// is a loopback address: 127.0.0.0/8, `::1`, or `::ffff:127.x.x.x`. Envoy prints addresses
/// canonically; anything unusual is treated as not loopback. (Parsed by hand: std's IPv6
/// parser costs the wasm ~10 KB.)
pub fn is_loopback_peer(peer: &str) -> bool {
    let host = if let Some(rest) = peer.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else if peer.matches(':').count() == 1 {
        peer.split(':').next().unwrap_or("")
    } else {
        peer
    };
    let host = host.to_ascii_lowercase();
    if host == "::1" || host == "0:0:0:0:0:0:0:1" {
        return true;
    }
    let v4 = host.strip_prefix("::ffff:").unwrap_or(&host);
    let octets: Vec<&str> = v4.split('.').collect();
    octets.len() == 4
        && octets[0] == "127"
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.len() <= 3 && o.parse::<u8>().is_ok())
}

/// True when a request really comes from this host. Envoy's `source.address` is derived from
/// `x-forwarded-for` unless the connection manager sets `use_remote_address` (and from other
/// headers with `original_ip_detection_extensions`), so a client could claim `127.0.0.1` in a
/// header. A request is trusted as loopback only when its peer is loopback, it carries no
/// `x-forwarded-for`, and it arrived on a loopback local address: a remote client can reach
/// none of Envoy's loopback-bound sockets, whatever its headers say.
pub fn is_loopback_request(remote: Option<&str>, local: Option<&str>, forwarded: bool) -> bool {
    !forwarded && remote.is_some_and(is_loopback_peer) && local.is_some_and(is_loopback_peer)
}

/// Who may use the admin path: a loopback request (see [`is_loopback_request`]), or a bearer
/// token whose SHA-256 is the configured one (compared in constant time). No token configured
/// means loopback only.
pub fn authorize(
    loopback: bool,
    authorization: Option<&str>,
    token_sha256: Option<&[u8; 32]>,
) -> AdminAuth {
    if loopback {
        return AdminAuth::Loopback;
    }
    let (Some(want), Some(auth)) = (token_sha256, authorization) else {
        return AdminAuth::Denied;
    };
    let auth = auth.trim();
    let token = match auth.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => return AdminAuth::Denied,
    };
    if token.is_empty() {
        return AdminAuth::Denied;
    }
    let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if constant_time_eq(&got, want) {
        AdminAuth::Token
    } else {
        AdminAuth::Denied
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What an admin request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Report,
    Start,
    Cancel,
    /// Any other method: 405.
    NotAllowed,
}

pub fn admin_action(method: &str) -> AdminAction {
    match method {
        "GET" | "HEAD" => AdminAction::Report,
        "POST" => AdminAction::Start,
        "DELETE" => AdminAction::Cancel,
        _ => AdminAction::NotAllowed,
    }
}

/// True when `:path` (with or without a query string) is the admin path.
pub fn is_admin_path(request_path: &str, admin_path: &str) -> bool {
    let p = request_path.split(['?', '#']).next().unwrap_or("");
    p == admin_path
}

/// The grace of an admin `POST`: `{"grace_s": N}` in the body, else `?grace_s=N` on the admin
/// path, else (`None`) the configured one. `body` is `None` when the request has none.
///
/// proxy-wasm cannot hold request headers while a filter reads the body, so a `POST` with a
/// body is held by the hold filter after handoff (see `x-handoff-hold` in the shipped configs)
/// until handoff has read it and answered: the admin path still never reaches the app.
pub fn start_grace(request_path: &str, body: Option<&[u8]>) -> Result<Option<u32>, String> {
    let from_body = match body.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) {
        None => None,
        Some(b) => grace_in_body(b)
            .map_err(|e| format!("expected a JSON body like {{\"grace_s\": 5}}: {e}"))?,
    };
    let value = from_body.or_else(|| crate::source::query_value(request_path, "grace_s"));
    match value {
        None => Ok(None),
        Some(v) => match v.parse::<u32>() {
            Ok(g) if g <= MAX_GRACE_S => Ok(Some(g)),
            _ => Err(format!(
                "grace_s must be a whole number of seconds from 0 to {MAX_GRACE_S}, got {v:?}"
            )),
        },
    }
}

/// `{"grace_s": N}` (or `{}`) read through a `Value`, not a derived `Deserialize`: a typed
/// serde_json deserializer would bring core's float formatting (kilobytes) into the wasm.
fn grace_in_body(body: &[u8]) -> Result<Option<String>, String> {
    let value = crate::config::strict::value(body)?;
    let Some(fields) = value.as_object() else {
        return Err("expected a JSON object such as {\"grace_s\": 30}".to_string());
    };
    if let Some(k) = fields.keys().find(|k| *k != "grace_s") {
        return Err(format!("unknown field `{k}`, expected `grace_s`"));
    }
    match fields.get("grace_s") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(g) => match g.as_i64() {
            Some(n) => Ok(Some(n.to_string())),
            None => Err("grace_s is not a whole number of seconds".to_string()),
        },
    }
}

/// The admin `GET` answer: `{"state":"draining","since":1763800000000,"inflight":3}`.
pub fn status_json(phase: Phase, since_ms: u64, inflight: u64) -> String {
    format!(
        "{{\"state\":\"{}\",\"since\":{since_ms},\"inflight\":{inflight}}}",
        phase.as_str()
    )
}

/// The reconnect hint: uniform over `[0, jitter_ms]` given a uniform random `u32`.
pub fn hint_ms(jitter_ms: u32, random: u32) -> u32 {
    ((u64::from(random) * (u64::from(jitter_ms) + 1)) >> 32) as u32
}

/// The SSE event that tells a client to reconnect after `after_ms`.
pub fn reconnect_event(after_ms: u32) -> String {
    format!("event: reconnect\ndata: {{\"after_ms\": {after_ms}}}\n\n")
}

/// Tracks where the event boundaries of a `text/event-stream` are, across chunks. An event
/// ends with a blank line; line terminators are `\n`, `\r\n` or `\r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseScanner {
    /// Consecutive line terminators just seen (2 means "after a blank line").
    newlines: u8,
    /// The last byte was `\r` (a following `\n` belongs to it).
    last_cr: bool,
}

impl Default for SseScanner {
    /// The start of a stream is a boundary.
    fn default() -> Self {
        SseScanner {
            newlines: 2,
            last_cr: false,
        }
    }
}

impl SseScanner {
    /// True when an event may be inserted before `next` (the next byte, if known).
    fn boundary_before(&self, next: Option<u8>) -> bool {
        if self.newlines < 2 {
            return false;
        }
        if !self.last_cr {
            return true;
        }
        // After `\r` the boundary is known only once the next byte is not its `\n`.
        matches!(next, Some(b) if b != b'\n')
    }

    fn feed(&mut self, b: u8) {
        match b {
            b'\r' => {
                self.newlines = self.newlines.saturating_add(1);
                self.last_cr = true;
            }
            b'\n' => {
                if !self.last_cr {
                    self.newlines = self.newlines.saturating_add(1);
                }
                self.last_cr = false;
            }
            _ => {
                self.newlines = 0;
                self.last_cr = false;
            }
        }
    }

    /// Follows a chunk that passes unchanged.
    pub fn observe(&mut self, chunk: &[u8]) {
        for &b in chunk {
            self.feed(b);
        }
    }

    /// Inserts `event` at the first event boundary within (or at the start of) `chunk`.
    /// Returns the new chunk, or `None` when the chunk has no boundary (try the next one).
    /// Either way the scanner has followed the whole chunk. `event` must itself be one whole
    /// event ending with a blank line, so the boundary state after it is unchanged.
    pub fn inject(&mut self, chunk: &[u8], event: &[u8]) -> Option<Vec<u8>> {
        for i in 0..chunk.len() {
            if self.boundary_before(Some(chunk[i])) {
                let mut out = Vec::with_capacity(chunk.len() + event.len());
                out.extend_from_slice(&chunk[..i]);
                out.extend_from_slice(event);
                out.extend_from_slice(&chunk[i..]);
                self.observe(&chunk[i..]);
                return Some(out);
            }
            self.feed(chunk[i]);
        }
        if !chunk.is_empty() && self.boundary_before(None) {
            let mut out = chunk.to_vec();
            out.extend_from_slice(event);
            return Some(out);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_inflight_round_trips_and_goes_stale_without_ticks() {
        let w = WorkerInflight {
            count: 3,
            heartbeat_ms: 10_000,
        };
        assert_eq!(WorkerInflight::decode(&w.encode()), Some(w));
        assert_eq!(WorkerInflight::decode(&[1, 2, 3]), None);
        assert!(w.live(10_000 + 12_999, 1000));
        assert!(!w.live(10_000 + 13_000, 1000));
        // Slow ticks (readiness every 60 s) stay live across a late tick.
        assert!(w.live(10_000 + 180_000, 60_000));
    }

    #[test]
    fn registering_a_worker_drops_gone_ones_and_stays_bounded() {
        assert_eq!(decode_workers(&encode_workers(&[1, 2, 3])), vec![1, 2, 3]);
        assert_eq!(register_worker(&[1, 2], 2, &|_| true), None);
        assert_eq!(register_worker(&[1, 2], 3, &|id| id != 1), Some(vec![2, 3]));
        let many: Vec<u64> = (1..=MAX_WORKERS as u64).collect();
        let next = register_worker(&many, 9999, &|_| true).unwrap();
        assert_eq!(next.len(), MAX_WORKERS);
        assert_eq!((next[0], *next.last().unwrap()), (2, 9999));
    }

    use crate::config::drain::{parse_sha256_hex, RawDrain};
    use crate::config::ConfigError;
    use proptest::prelude::*;

    fn parse(json: &str) -> Result<Drain, ConfigError> {
        let raw: RawDrain = serde_json::from_str(json).expect("shape");
        raw.validate()
    }

    fn err(json: &str) -> ConfigError {
        parse(json).unwrap_err()
    }

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn full_contract_is_accepted() {
        let d = parse(&format!(
            r#"{{"admin": {{"path": "/.well-known/handoff/drain", "token_sha256": "{TOKEN_HASH}"}},
            "upstream_signal": {{"header": "x-drain"}},
            "readiness": {{"cluster": "app", "authority": "app", "path": "/ready", "interval_ms": 1000, "failure_threshold": 2}},
            "envoy_admin": {{"cluster": "envoy_admin"}},
            "grace_s": 10, "reconnect_jitter_ms": 5000, "retry_after_s": 1}}"#
        ))
        .unwrap();
        assert_eq!(d.admin.as_ref().unwrap().path, DEFAULT_ADMIN_PATH);
        assert!(d.admin.as_ref().unwrap().token_sha256.is_some());
        assert_eq!(d.upstream_signal.as_deref(), Some("x-drain"));
        assert_eq!(d.readiness.as_ref().unwrap().failure_threshold, 2);
        assert_eq!(d.envoy_admin_cluster.as_deref(), Some("envoy_admin"));
        assert_eq!(d.tick_ms(), 1000);
    }

    #[test]
    fn defaults() {
        let d = parse(r#"{"admin": {}}"#).unwrap();
        assert_eq!(d.admin.unwrap().path, DEFAULT_ADMIN_PATH);
        assert_eq!(
            (d.grace_s, d.reconnect_jitter_ms, d.retry_after_s),
            (10, 5000, 1)
        );
        let d = parse(r#"{"readiness": {"cluster": "app"}}"#).unwrap();
        let r = d.readiness.unwrap();
        assert_eq!(
            (r.authority.as_str(), r.path.as_str(), r.interval_ms),
            ("app", "/ready", 1000)
        );
    }

    #[test]
    fn rejects_no_trigger() {
        let e = err(r#"{"envoy_admin": {"cluster": "envoy_admin"}, "grace_s": 5}"#);
        assert_eq!(e.path, "");
        assert!(e.message.contains("at least one trigger"), "{e}");
    }

    #[test]
    fn rejects_bad_token_hash() {
        assert_eq!(
            err(r#"{"admin": {"token_sha256": "abc"}}"#).path,
            "admin.token_sha256"
        );
        let not_hex = "z".repeat(64);
        assert_eq!(
            err(&format!(r#"{{"admin": {{"token_sha256": "{not_hex}"}}}}"#)).path,
            "admin.token_sha256"
        );
    }

    #[test]
    fn rejects_relative_admin_path() {
        assert_eq!(err(r#"{"admin": {"path": "drain"}}"#).path, "admin.path");
        assert_eq!(
            err(r#"{"admin": {"path": "/drain?x=1"}}"#).path,
            "admin.path"
        );
    }

    #[test]
    fn rejects_bad_signal_header() {
        assert_eq!(
            err(r#"{"upstream_signal": {"header": "X-Drain"}}"#).path,
            "upstream_signal.header"
        );
    }

    #[test]
    fn rejects_bad_readiness() {
        assert_eq!(
            err(r#"{"readiness": {"cluster": ""}}"#).path,
            "readiness.cluster"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "path": "ready"}}"#).path,
            "readiness.path"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "interval_ms": 10}}"#).path,
            "readiness.interval_ms"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "failure_threshold": 0}}"#).path,
            "readiness.failure_threshold"
        );
        assert_eq!(
            err(r#"{"readiness": {"cluster": "app", "authority": "a b"}}"#).path,
            "readiness.authority"
        );
    }

    #[test]
    fn rejects_empty_envoy_admin_cluster() {
        assert_eq!(
            err(r#"{"admin": {}, "envoy_admin": {"cluster": " "}}"#).path,
            "envoy_admin.cluster"
        );
    }

    #[test]
    fn rejects_out_of_range_durations() {
        assert_eq!(err(r#"{"admin": {}, "grace_s": 100000}"#).path, "grace_s");
        assert_eq!(
            err(r#"{"admin": {}, "reconnect_jitter_ms": 4000000}"#).path,
            "reconnect_jitter_ms"
        );
        assert_eq!(
            err(r#"{"admin": {}, "retry_after_s": 4000}"#).path,
            "retry_after_s"
        );
    }

    #[test]
    fn state_machine() {
        let s = DrainState::serving(1000);
        assert_eq!(s.phase(5000), Phase::Serving);
        let d = s.start(DrainSource::Admin, 2000, 10).unwrap();
        assert_eq!(d.phase(2000), Phase::Draining);
        assert_eq!(d.phase(11_999), Phase::Draining);
        assert_eq!(d.phase(12_000), Phase::Drained);
        assert_eq!(d.generation, 1);
        // A running drain keeps its first source and start time.
        assert!(d.start(DrainSource::Readiness, 3000, 10).is_none());
        // Readiness recovery does not cancel someone else's drain; the admin cancels any.
        assert!(d.cancel(CancelBy::ReadinessRecovered, 3000).is_none());
        let c = d.cancel(CancelBy::Admin, 13_000).unwrap();
        assert_eq!(c.phase(13_000), Phase::Serving);
        assert_eq!((c.since_ms, c.generation), (13_000, 2));
        assert!(c.cancel(CancelBy::Admin, 14_000).is_none());
        let r = c.start(DrainSource::Readiness, 15_000, 0).unwrap();
        assert_eq!(r.phase(15_000), Phase::Drained);
        assert!(r.cancel(CancelBy::ReadinessRecovered, 16_000).is_some());
    }

    #[test]
    fn readiness_lease_and_threshold() {
        let l = PollLease::default();
        let mine = l.acquire(7, 1000, 300).unwrap();
        assert_eq!((mine.owner, mine.expires_ms), (7, 1300));
        assert!(mine.acquire(8, 1200, 300).is_none());
        assert!(mine.acquire(7, 1200, 300).is_some());
        assert_eq!(mine.acquire(8, 1300, 300).unwrap().owner, 8);
        let (l1, v1) = mine.record(false, 2);
        let (l2, v2) = l1.record(false, 2);
        let (l3, v3) = l2.record(false, 2);
        assert_eq!(
            (v1, v2, v3),
            (
                ReadinessVerdict::Nothing,
                ReadinessVerdict::Start,
                ReadinessVerdict::Nothing
            )
        );
        let (l4, v4) = l3.record(true, 2);
        assert_eq!((l4.failures, v4), (0, ReadinessVerdict::Recovered));
        assert_eq!(PollLease::decode(&l3.encode()), Some(l3));
        assert!(is_ready(Some("204")));
        assert!(!is_ready(Some("503")));
        assert!(!is_ready(None));
    }

    #[test]
    fn loopback_peers() {
        for p in [
            "127.0.0.1:5555",
            "127.9.0.1:1",
            "[::1]:8080",
            "::1",
            "127.0.0.1",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback_peer(p), "{p}");
        }
        for p in [
            "203.0.113.7:5555",
            "[2001:db8::1]:80",
            "10.0.0.1",
            "",
            "junk",
        ] {
            assert!(!is_loopback_peer(p), "{p}");
        }
    }

    #[test]
    fn authorization() {
        let want = parse_sha256_hex(TOKEN_HASH).unwrap(); // sha256("test")
        let remote = false;
        assert_eq!(authorize(true, None, None), AdminAuth::Loopback);
        assert_eq!(
            authorize(remote, Some("Bearer test"), Some(&want)),
            AdminAuth::Token
        );
        assert_eq!(
            authorize(remote, Some("bearer test"), Some(&want)),
            AdminAuth::Token
        );
        assert_eq!(
            authorize(remote, Some("Bearer wrong"), Some(&want)),
            AdminAuth::Denied
        );
        assert_eq!(authorize(remote, None, Some(&want)), AdminAuth::Denied);
        assert_eq!(
            authorize(remote, Some("Basic test"), Some(&want)),
            AdminAuth::Denied
        );
        assert_eq!(
            authorize(remote, Some("Bearer "), Some(&want)),
            AdminAuth::Denied
        );
        // No token configured: loopback only.
        assert_eq!(
            authorize(remote, Some("Bearer test"), None),
            AdminAuth::Denied
        );
        assert_eq!(authorize(false, None, None), AdminAuth::Denied);
    }

    #[test]
    fn loopback_requests() {
        let lo = Some("127.0.0.1:10000");
        assert!(is_loopback_request(Some("127.0.0.1:5555"), lo, false));
        assert!(is_loopback_request(
            Some("[::1]:5555"),
            Some("[::1]:10000"),
            false
        ));
        // A client-supplied x-forwarded-for may be where the loopback peer came from.
        assert!(!is_loopback_request(Some("127.0.0.1:0"), lo, true));
        // Reached on a non-loopback address: not a local caller, whatever the peer claims.
        assert!(!is_loopback_request(
            Some("127.0.0.1:0"),
            Some("10.0.0.5:8080"),
            false
        ));
        assert!(!is_loopback_request(Some("203.0.113.7:5555"), lo, false));
        assert!(!is_loopback_request(None, lo, false));
        assert!(!is_loopback_request(Some("127.0.0.1:1"), None, false));
    }

    #[test]
    fn admin_requests() {
        assert!(is_admin_path(
            "/.well-known/handoff/drain",
            DEFAULT_ADMIN_PATH
        ));
        assert!(is_admin_path(
            "/.well-known/handoff/drain?x",
            DEFAULT_ADMIN_PATH
        ));
        assert!(!is_admin_path(
            "/.well-known/handoff/drainx",
            DEFAULT_ADMIN_PATH
        ));
        assert_eq!(admin_action("POST"), AdminAction::Start);
        assert_eq!(admin_action("DELETE"), AdminAction::Cancel);
        assert_eq!(admin_action("GET"), AdminAction::Report);
        assert_eq!(admin_action("PUT"), AdminAction::NotAllowed);
        let p = DEFAULT_ADMIN_PATH;
        assert_eq!(start_grace(p, None), Ok(None));
        assert_eq!(start_grace(&format!("{p}?grace_s=3"), None), Ok(Some(3)));
        assert_eq!(
            start_grace(&format!("{p}?x=1&grace_s=0"), None),
            Ok(Some(0))
        );
        assert!(start_grace(&format!("{p}?grace_s=-1"), None).is_err());
        assert!(start_grace(&format!("{p}?grace_s=soon"), None).is_err());
        assert!(start_grace(&format!("{p}?grace_s=999999"), None).is_err());
        // The JSON body of the contract, which wins over the query.
        assert_eq!(start_grace(p, Some(br#"{"grace_s": 7}"#)), Ok(Some(7)));
        assert_eq!(
            start_grace(&format!("{p}?grace_s=3"), Some(br#"{"grace_s": 0}"#)),
            Ok(Some(0))
        );
        assert_eq!(start_grace(p, Some(b"{}")), Ok(None));
        assert_eq!(start_grace(p, Some(b" \n")), Ok(None));
        assert!(start_grace(p, Some(br#"{"grace_s": -2}"#)).is_err());
        assert!(start_grace(p, Some(br#"{"grace": 2}"#)).is_err());
        assert!(start_grace(p, Some(b"grace_s=2")).is_err());
        let v: serde_json::Value =
            serde_json::from_str(&status_json(Phase::Draining, 17, 3)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "draining", "since": 17, "inflight": 3})
        );
    }

    #[test]
    fn sse_injection_examples() {
        let ev = reconnect_event(42);
        assert_eq!(ev, "event: reconnect\ndata: {\"after_ms\": 42}\n\n");
        // At the start of a stream.
        let mut s = SseScanner::default();
        assert_eq!(
            s.inject(b"data: a\n\n", ev.as_bytes()).unwrap(),
            format!("{ev}data: a\n\n").into_bytes()
        );
        // Mid-event: after the end of the current event.
        let mut s = SseScanner::default();
        s.observe(b"data: a\n");
        assert_eq!(
            s.inject(b"data: b\n\ndata: c\n\n", ev.as_bytes()).unwrap(),
            format!("data: b\n\n{ev}data: c\n\n").into_bytes()
        );
        // A chunk that ends exactly at a boundary takes the event at its end.
        let mut s = SseScanner::default();
        s.observe(b"data: a");
        assert_eq!(
            s.inject(b"\n\n", ev.as_bytes()).unwrap(),
            format!("\n\n{ev}").into_bytes()
        );
        // No boundary in the chunk: nothing injected yet.
        let mut s = SseScanner::default();
        s.observe(b"data: a\n\ndata: b");
        assert!(s.inject(b"c\ndata: d\n", ev.as_bytes()).is_none());
        // CRLF: never between `\r` and `\n`.
        let mut s = SseScanner::default();
        s.observe(b"data: a\r\n\r");
        assert_eq!(
            s.inject(b"\ndata: b\r\n\r\n", ev.as_bytes()).unwrap(),
            format!("\n{ev}data: b\r\n\r\n").into_bytes()
        );
    }

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

        #[test]
        fn state_encoding_round_trips(
            src in prop::option::of(0usize..3), since in any::<u64>(),
            grace in any::<u32>(), generation in any::<u32>(),
        ) {
            let s = DrainState {
                source: src.map(|i| DrainSource::ALL[i]),
                since_ms: since,
                grace_s: grace,
                generation,
            };
            prop_assert_eq!(DrainState::decode(&s.encode()), Some(s));
        }

        /// Whatever the events and however the stream is cut into chunks, the reconnect event
        /// lands between two whole events: the output is the input with the event inserted at
        /// an event boundary, and parsing the output gives back every original event.
        #[test]
        fn sse_injection_never_splits_an_event(
            events in prop::collection::vec(
                (prop::collection::vec("[a-z0-9 :{}]{0,12}", 1..4), 0usize..3), 1..6),
            cuts in prop::collection::vec(0usize..200, 0..6),
            start_chunk in 0usize..7,
        ) {
            let eols = ["\n", "\r\n", "\r"];
            let mut stream = Vec::new();
            let mut boundaries = vec![0usize];
            for (lines, eol) in &events {
                let eol = eols[*eol];
                for l in lines {
                    // A line starting with a terminator char is impossible by the regex.
                    stream.extend_from_slice(format!("data: {l}{eol}").as_bytes());
                }
                stream.extend_from_slice(eol.as_bytes());
                boundaries.push(stream.len());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort();
            cuts.dedup();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            let ev = reconnect_event(7).into_bytes();
            let mut scanner = SseScanner::default();
            let mut out = Vec::new();
            let mut inserted_at = None;
            for (i, chunk) in chunks.iter().enumerate() {
                if i >= start_chunk && inserted_at.is_none() {
                    let before = out.len();
                    if let Some(new) = scanner.inject(chunk, &ev) {
                        let at = (0..=chunk.len())
                            .find(|k| new[..*k] == chunk[..*k] && new[*k..].starts_with(&ev)
                                && new[*k + ev.len()..] == chunk[*k..])
                            .expect("the chunk with the event inserted");
                        inserted_at = Some(before + at);
                        out.extend_from_slice(&new);
                        continue;
                    }
                } else {
                    scanner.observe(chunk);
                }
                out.extend_from_slice(chunk);
            }
            if let Some(at) = inserted_at {
                // The insertion point is an event boundary of the original stream: it is
                // never inside an event. (A lone `\r` boundary can only be confirmed by the next
                // byte, so a `\r`-terminated stream's end is not a boundary.)
                prop_assert!(boundaries.contains(&at), "inserted at {} of {:?}", at, boundaries);
                let mut expect = stream.clone();
                expect.splice(at..at, ev.iter().copied());
                prop_assert_eq!(out, expect);
            } else {
                prop_assert_eq!(out, stream);
            }
        }
    }
}
